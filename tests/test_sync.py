"""The blocking facade: sandboxes and agent runs from plain code, cleaned up like the async API.

Everything runs for real on the local provider, with the real ``claude`` CLI against
ScriptedModel on loopback.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from claude_agent_sdk import ClaudeAgentOptions, ResultMessage, SystemMessage

import sandbay
import sandbay.sync
from sandbay.testing import ScriptedModel, Turn

OPTIONS = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"])
# Unisolated: the sandbox's working directory is a host folder the test can look at.
UNISOLATED = sandbay.LocalConfig(isolate=False)


def live_ids() -> set[str]:
    return {s.id for s in anyio.run(sandbay.get_provider(UNISOLATED).list)}


def portal_threads() -> int:
    return sum(1 for t in threading.enumerate() if "portal" in t.name)


def test_open_exec_write_read_close_on_local() -> None:
    threads = portal_threads()
    with sandbay.sync.open_sandbox(UNISOLATED) as sb:
        result = sb.exec(["echo", "hi"])
        assert result.ok and result.stdout == b"hi\n"
        assert sb.exec("exit 3").exit_code == 3
        sb.write_file("sub/notes.txt", b"hello")
        assert sb.read_file("sub/notes.txt") == b"hello"
        assert sb.exec(["cat", "sub/notes.txt"]).stdout == b"hello"
        assert sb.call(lambda s: s.exec(["pwd"])).stdout.decode().strip() == sb.workdir
        with pytest.raises(sandbay.SandboxFileNotFoundError):  # the async API's typed errors
            sb.read_file("missing.txt")
        workdir = Path(sb.workdir)
        assert workdir.is_dir() and sb.id in live_ids()
    assert sb.closed and not workdir.exists() and sb.id not in live_ids()
    with pytest.raises(sandbay.SandboxClosedError):
        sb.exec(["true"])
    sb.close()  # idempotent
    assert portal_threads() == threads  # its loop's thread is gone too


def test_create_sandbox_without_with_is_closed_by_close() -> None:
    sb = sandbay.sync.create_sandbox(UNISOLATED)
    try:
        assert sb.exec(["true"]).ok
    finally:
        sb.close()
    assert sb.id not in live_ids()


def test_a_run_with_the_scripted_model() -> None:
    with ScriptedModel(
        [Turn.tool_use("Bash", {"command": "echo sync-$((6*7))"}), Turn.text("ok")]
    ) as model:
        with sandbay.sync.run_agent(
            "go", provider=UNISOLATED, options=OPTIONS, env=model.env(), timeout=120
        ) as run:
            messages = list(run)
        assert "sync-42" in str(model.tool_results())
    assert isinstance(messages[0], SystemMessage)
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error
    assert run.last_seq >= len(messages) and run.sandbox_id is not None
    t = run.timings
    assert t.start is not None and t.result is not None and t.closed is not None
    assert t.start <= t.result <= t.closed
    assert run.sandbox_id not in live_ids()


def test_a_run_in_an_open_sandbox_leaves_it_open() -> None:
    with ScriptedModel(
        [Turn.tool_use("Bash", {"command": "echo made > made.txt"}), Turn.text("ok")]
    ) as model:
        with sandbay.sync.open_sandbox(UNISOLATED) as sb:
            with sandbay.sync.run_agent("go", sandbox=sb, options=OPTIONS, env=model.env()) as run:
                assert isinstance(list(run)[-1], ResultMessage)
            assert not sb.closed and sb.read_file("made.txt") == b"made\n"
        with pytest.raises(sandbay.SandboxClosedError):
            sandbay.sync.run_agent("go", sandbox=sb, options=OPTIONS, env=model.env())


def test_breaking_out_of_a_run_leaves_no_sandbox() -> None:
    with ScriptedModel([Turn.text("slow", delay_s=30)]) as model:
        started = time.monotonic()
        with sandbay.sync.run_agent(
            "go", provider=UNISOLATED, options=OPTIONS, env=model.env()
        ) as run:
            for _ in run:
                break
            assert run.sandbox_id in live_ids()
        # The block's exit killed the agent mid-answer and removed its sandbox.
        assert time.monotonic() - started < 20
        assert run.sandbox_id not in live_ids()
        assert list(run) == []  # closed: nothing more


def test_a_failed_run_raises_its_error_from_the_loop() -> None:
    broken = sandbay.LocalConfig(isolate=False, python="/nonexistent/python")
    with ScriptedModel([Turn.text("never")]) as model:
        with pytest.raises(sandbay.AgentError):
            with sandbay.sync.run_agent("go", provider=broken, env=model.env()) as run:
                list(run)
    assert run.sandbox_id not in live_ids()


@pytest.mark.anyio
async def test_inside_a_running_loop_it_refuses_but_works_from_a_worker_thread() -> None:
    threads = portal_threads()
    with pytest.raises(RuntimeError, match=r"running event loop.*async API.*worker thread"):
        sandbay.sync.open_sandbox(UNISOLATED).__enter__()
    with pytest.raises(RuntimeError, match="running event loop"):
        sandbay.sync.run_agent("go", provider=UNISOLATED)
    assert portal_threads() == threads  # nothing was started

    def script() -> bytes:
        with sandbay.sync.open_sandbox(UNISOLATED) as sb:
            return sb.exec(["echo", "from a thread"]).stdout

    assert await anyio.to_thread.run_sync(script) == b"from a thread\n"


@pytest.mark.anyio
async def test_a_sandbox_made_in_a_thread_refuses_calls_from_the_loop() -> None:
    sb: Any = await anyio.to_thread.run_sync(sandbay.sync.create_sandbox, UNISOLATED)
    try:
        with pytest.raises(RuntimeError, match="running event loop"):
            sb.exec(["true"])
    finally:
        await anyio.to_thread.run_sync(sb.close)
    assert sb.closed


def test_import_sandbay_sync_stays_light() -> None:
    from test_startup import imported_after

    assert imported_after("import sandbay.sync") == []


def ids_on(provider: str | sandbay.ProviderConfig) -> set[str]:
    return {s.id for s in anyio.run(sandbay.get_provider(provider).list)}


async def is_isolated(sandbox: sandbay.Sandbox) -> bool:
    return sandbox.isolated


ISOLATING = [
    pytest.param("local", id="local-bwrap"),
    pytest.param(sandbay.DockerConfig(), id="docker", marks=pytest.mark.docker),
]


@pytest.mark.parametrize("provider", ISOLATING)
def test_files_and_exec_on_isolating_providers(provider: str | sandbay.ProviderConfig) -> None:
    with sandbay.sync.open_sandbox(provider, sandbay.SandboxSpec(network="none")) as sb:
        assert sb.call(is_isolated) is True
        sb.write_file("in/data.bin", bytes(range(256)))
        assert sb.read_file("in/data.bin") == bytes(range(256))
        assert sb.exec(["wc", "-c", "in/data.bin"]).text.split()[0] == "256"
        assert sb.id in ids_on(provider)
    assert sb.id not in ids_on(provider)


@pytest.mark.parametrize("provider", ISOLATING)
def test_breaking_out_of_a_run_on_isolating_providers(
    provider: str | sandbay.ProviderConfig,
) -> None:
    with ScriptedModel([Turn.text("slow", delay_s=30)]) as model:
        with sandbay.sync.run_agent(
            "go",
            provider=provider,
            options=OPTIONS,
            env=model.env(),
            spec=sandbay.SandboxSpec(network="host"),
            timeout=120,
        ) as run:
            for message in run:
                assert isinstance(message, SystemMessage)
                break
            assert run.sandbox_id in ids_on(provider)
        assert run.sandbox_id not in ids_on(provider)


def test_an_exception_in_the_loop_body_leaves_no_sandbox() -> None:
    with ScriptedModel([Turn.text("slow", delay_s=30)]) as model:
        with pytest.raises(KeyboardInterrupt):
            with sandbay.sync.run_agent(
                "go", provider=UNISOLATED, options=OPTIONS, env=model.env()
            ) as run:
                for _ in run:
                    raise KeyboardInterrupt  # as Ctrl-C would, mid-run
        assert run.sandbox_id is not None and run.sandbox_id not in live_ids()
