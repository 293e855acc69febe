"""The public surface: names, the error tree, and clear errors for bad input."""

from __future__ import annotations

import builtins
import time
from typing import Any

import pytest
from claude_agent_sdk import AgentDefinition, ClaudeAgentOptions

import sandbay
from sandbay._agent import options_to_wire


def test_all_is_sorted_and_importable() -> None:
    assert sandbay.__all__ == sorted(sandbay.__all__)
    for name in sandbay.__all__:
        assert getattr(sandbay, name) is not None


def test_fixed_public_names_exist() -> None:
    for name in (
        "run_agent",
        "open_sandbox",
        "Sandbox",
        "SandboxSpec",
        "ExecResult",
        "Process",
        "load_config",
        "SandboxError",
    ):
        assert hasattr(sandbay, name), name
    from sandbay.testing import ScriptedModel  # noqa: F401


@pytest.mark.parametrize(
    ("error", "builtin"),
    [
        (sandbay.ConfigError, ValueError),
        (sandbay.MissingDependencyError, ImportError),
        (sandbay.ProviderUnavailableError, ConnectionError),
        (sandbay.SandboxNotFoundError, LookupError),
        (sandbay.SandboxClosedError, RuntimeError),
        (sandbay.SandboxTimeoutError, TimeoutError),
        (sandbay.SandboxFileNotFoundError, FileNotFoundError),
    ],
)
def test_errors_inherit_root_and_builtin(error: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(error, sandbay.SandboxError)
    assert issubclass(error, builtin)
    assert issubclass(builtin, builtins.BaseException)


def test_every_exported_error_derives_from_root() -> None:
    errors = [getattr(sandbay, n) for n in sandbay.__all__ if n.endswith("Error")]
    assert len(errors) >= 10
    assert all(issubclass(e, sandbay.SandboxError) for e in errors)


def test_error_message_names_provider_and_sandbox() -> None:
    err = sandbay.SandboxTimeoutError("too slow", provider="docker", sandbox_id="abc")
    assert str(err) == "[docker abc] too slow"
    agent = sandbay.AgentError("boom", exit_code=3, stderr_tail="line1\nline2")
    assert "exit code 3" in str(agent) and "line2" in str(agent)
    assert agent.exit_code == 3


def test_unknown_provider_names_the_valid_ones() -> None:
    with pytest.raises(sandbay.ConfigError, match=r"unknown provider 'dokcer'.*docker.*local"):
        sandbay.get_provider("dokcer")


def test_empty_prompt_is_refused() -> None:
    with pytest.raises(sandbay.ConfigError, match="empty prompt"):
        sandbay.run_agent("   ", provider="local")


def test_bad_timeout_is_refused() -> None:
    with pytest.raises(sandbay.ConfigError, match="timeout"):
        sandbay.run_agent("hi", provider="local", timeout=0)


def test_spec_rejects_unknown_fields_and_bad_values() -> None:
    with pytest.raises(ValueError, match="memroy_mb"):
        sandbay.SandboxSpec(memroy_mb=5)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="network"):
        sandbay.SandboxSpec(network="bridge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cpu"):
        sandbay.SandboxSpec(cpu=0)


def test_reserved_label_prefix_is_refused() -> None:
    from sandbay._provider import managed_labels

    with pytest.raises(sandbay.ConfigError, match="reserved prefix"):
        managed_labels(sandbay.SandboxSpec(labels={"sandbay.owner": "me"}))
    labels = managed_labels(sandbay.SandboxSpec(labels={"team": "a"}, lifetime_s=60))
    assert labels["team"] == "a" and labels["sandbay.managed"] == "1"
    assert {"sandbay.session", "sandbay.owner", "sandbay.expiry"} <= set(labels)


def test_options_data_fields_cross() -> None:
    options = ClaudeAgentOptions(
        max_turns=3,
        allowed_tools=["Bash", "Read"],
        model="claude-x",
        env={"A": "1"},
        agents={"rev": AgentDefinition(description="reviews", prompt="review it")},
        add_dirs=["/data"],
    )
    wire = options_to_wire(options)
    assert wire["max_turns"] == 3
    assert wire["allowed_tools"] == ["Bash", "Read"]
    assert wire["agents"]["rev"]["prompt"] == "review it"
    assert "hooks" not in wire and "debug_stderr" not in wire
    rebuilt = ClaudeAgentOptions(
        **{**wire, "agents": {k: AgentDefinition(**v) for k, v in wire["agents"].items()}}
    )
    for field in ("max_turns", "allowed_tools", "model", "env", "add_dirs", "agents"):
        assert getattr(rebuilt, field) == getattr(options, field), field
    assert options_to_wire(None) == {}
    assert options_to_wire(ClaudeAgentOptions()) == {}


def test_code_in_options_stays_out_of_their_data() -> None:
    # Callbacks, a store and SDK MCP server instances run on the host, in the Agent SDK:
    # the data a pool compares options by holds none of them (an SDK server by its name).
    options = ClaudeAgentOptions(
        max_turns=2,
        can_use_tool=lambda *a: None,  # type: ignore[arg-type]
        hooks={"PreToolUse": []},
        stderr=print,
        mcp_servers={"mine": {"type": "sdk", "name": "mine", "instance": object()}},  # type: ignore[typeddict-item]
    )
    assert options_to_wire(options) == {
        "max_turns": 2,
        "mcp_servers": {"mine": {"type": "sdk", "name": "mine"}},
    }


@pytest.mark.anyio
@pytest.mark.parametrize("timeout", [-1, 0, 0.0, float("nan"), float("inf"), "5", True])
async def test_exec_refuses_a_timeout_that_is_not_positive_and_finite(timeout: Any) -> None:
    async with sandbay.open_sandbox("local") as sb:
        started = time.monotonic()
        with pytest.raises(sandbay.ConfigError, match="timeout"):
            await sb.exec(["python3", "-c", "import time; time.sleep(30)"], timeout=timeout)
        assert time.monotonic() - started < 5  # refused, not run


@pytest.mark.anyio
async def test_exec_input_takes_text_as_utf8_and_bytes_alike() -> None:
    async with sandbay.open_sandbox("local") as sb:
        text = await sb.exec(["cat"], input="héllo ✓\n", timeout=30)
        assert text.stdout == "héllo ✓\n".encode()
        raw = await sb.exec(["cat"], input=b"\x00\xff", timeout=30)
        assert raw.stdout == b"\x00\xff"
        for bad in (123, ["a"], {"a": 1}):
            with pytest.raises(sandbay.ConfigError, match="input must be bytes or str"):
                await sb.exec(["cat"], input=bad, timeout=30)  # type: ignore[arg-type]
