"""`SandboxTransport`: the Agent SDK on the host, the real ``claude`` CLI in a sandbox.

Against ScriptedModel, on local (unisolated), local under bubblewrap and docker: the SDK's
host-side features (hooks, ``can_use_tool``, SDK MCP tools) are invoked by the CLI inside the
sandbox. A fault-injecting wrapper sandbox cuts the relay's stream to exercise replay.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    HookContext,
    HookMatcher,
    InMemorySessionStore,
    PermissionResultAllow,
    PermissionResultDeny,
    ResultMessage,
    SystemMessage,
    ToolPermissionContext,
    ToolUseBlock,
    create_sdk_mcp_server,
    query,
    tool,
)
from claude_agent_sdk import __version__ as sdk_version
from claude_agent_sdk.types import HookInput, HookJSONOutput
from typing_extensions import override

import sandbay
from sandbay import Process, Sandbox
from sandbay._agent import _nests_deeper
from sandbay._relay import wire
from sandbay._transport import CHECKED_SDK_VERSIONS, cli_argv, parse_frame
from sandbay.testing import ScriptedModel, Turn
from sandbox_kinds import KINDS
from test_agent import _CutProcess, shape
from wrapping import WrappedSandbox

pytestmark = pytest.mark.anyio

OPTIONS = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"])
RELAY_DIR = Path(sandbay.__file__).parent / "_relay"


def bash_then_done(command: str, *, delay_s: float = 0.0) -> list[Any]:
    return [Turn.tool_use("Bash", {"command": command}), Turn.text("done", delay_s=delay_s)]


# -- the CLI's command line -----------------------------------------------------------------


async def _allow(*_: Any) -> PermissionResultAllow:
    return PermissionResultAllow()


@tool("add", "Add two numbers", {"a": int, "b": int})
async def add(args: dict[str, Any]) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": f"sum={args['a'] + args['b']}"}]}


def test_cli_argv_is_what_the_checked_sdk_builds() -> None:
    # Pinned: if the installed SDK's builder changes what it makes of these options, this
    # fails, and cli_argv must be checked against the new SDK (CHECKED_SDK_VERSIONS).
    assert sdk_version in CHECKED_SDK_VERSIONS, (
        f"claude-agent-sdk {sdk_version} was not checked: compare cli_argv with its builder"
    )
    assert cli_argv(ClaudeAgentOptions()) == [
        "claude",
        "--output-format",
        "stream-json",
        "--verbose",
        "--system-prompt",
        "",
        "--input-format",
        "stream-json",
    ]
    rich = ClaudeAgentOptions(
        system_prompt="be brief",
        allowed_tools=["Read", "Bash(echo:*)"],
        disallowed_tools=["Write"],
        max_turns=3,
        model="claude-sonnet-4-5",
        permission_mode="acceptEdits",
        resume="abc",
        settings='{"a":1}',
        add_dirs=["/data"],
        include_partial_messages=True,
        setting_sources=["project"],
        extra_args={"debug-to-stderr": None, "foo": "-x"},
        mcp_servers={
            "host": create_sdk_mcp_server("host", tools=[add]),
            "ext": {"type": "stdio", "command": "srv", "args": ["-v"]},
        },
        thinking={"type": "adaptive"},
        effort="low",
        output_format={"type": "json_schema", "schema": {"type": "object"}},
        session_store=InMemorySessionStore(),
        can_use_tool=_allow,
    )
    mcp = {
        "mcpServers": {
            "host": {"type": "sdk", "name": "host"},
            "ext": {"type": "stdio", "command": "srv", "args": ["-v"]},
        }
    }
    assert cli_argv(rich, cli="/opt/claude") == [
        "/opt/claude",
        "--output-format",
        "stream-json",
        "--verbose",
        "--system-prompt",
        "be brief",
        "--allowedTools",
        "Read,Bash(echo:*)",
        "--max-turns",
        "3",
        "--disallowedTools",
        "Write",
        "--model",
        "claude-sonnet-4-5",
        "--permission-prompt-tool",
        "stdio",  # can_use_tool: permission prompts come to the host
        "--permission-mode",
        "acceptEdits",
        "--resume=abc",
        "--settings",
        '{"a":1}',
        "--add-dir",
        "/data",
        "--mcp-config",
        json.dumps(mcp),
        "--include-partial-messages",
        "--session-mirror",
        "--setting-sources=project",
        "--debug-to-stderr",
        "--foo=-x",
        "--thinking",
        "adaptive",
        "--effort",
        "low",
        "--json-schema",
        '{"type": "object"}',
        "--input-format",
        "stream-json",
    ]
    with pytest.raises(sandbay.ConfigError, match="not both"):
        cli_argv(ClaudeAgentOptions(can_use_tool=_allow, permission_prompt_tool_name="mcp__x"))


# -- the wire -------------------------------------------------------------------------------


def test_relay_is_stdlib_only_and_speaks_the_hosts_wire(tmp_path: Path) -> None:
    for name in ("relay.py", "wire.py"):
        tree = ast.parse((RELAY_DIR / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in sys.stdlib_module_names or root == "wire", f"{name}: {root}"
    # As uploaded: the two files side by side, run as a script, outside sandbay.
    for name in ("relay.py", "wire.py"):
        shutil.copy(RELAY_DIR / name, tmp_path / name)
    probe = (
        "import sys; sys.argv = ['relay']; import relay; "
        "print(relay.wire.VERSION, sorted(relay.wire.KINDS), relay.wire.END_INPUT_LINE); "
        "print('claude_agent_sdk' in sys.modules, 'sandbay' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == f"{wire.VERSION} {sorted(wire.KINDS)} {wire.END_INPUT_LINE}"
    assert out[1] == "False False"
    assert wire.KINDS == {"ready", "timings", "request", "line", "stderr", "end", "error"}
    assert json.loads(wire.END_INPUT_LINE) == {"sandbay": wire.VERSION, "kind": "end_input"}


def _boot(where: Path, code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the relay's one-process start (`_BOOT`) on this machine, its code on stdin."""
    from sandbay._transport import _BOOT, RELAY_PYTHON_FLAGS

    return subprocess.run(
        [sys.executable, *RELAY_PYTHON_FLAGS, "-c", _BOOT, str(where), *args],
        input=json.dumps({"code": code}) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_relay_starts_from_the_hosts_bytecode_without_compiling(tmp_path: Path) -> None:
    from sandbay._transport import _relay_code

    where = tmp_path / "relay"
    # An unknown command: the relay's code is installed and imported, then it says why.
    done = _boot(where, _relay_code(), "no-such-command")
    assert done.returncode == 2 and "usage: sandbay-relay" in done.stderr
    tag = sys.implementation.cache_tag
    for name in ("relay", "wire"):
        pyc = (where / "__pycache__" / f"{name}.{tag}.pyc").read_bytes()
        # Hash-based, checked against the source's hash (not its time stamp).
        assert int.from_bytes(pyc[4:8], "little") == 0b11
        assert (where / f"{name}.py").read_bytes() == (RELAY_DIR / f"{name}.py").read_bytes()
    # Importing it again compiles nothing: compile() fails, the import still works.
    probe = (
        f"import builtins, sys; sys.path.insert(0, {str(where)!r}); "
        "builtins.compile = None; import relay; print(relay.wire.VERSION)"
    )
    out = subprocess.run(
        [sys.executable, "-E", "-s", "-S", "-c", probe], capture_output=True, text=True
    )
    assert out.stdout.strip() == str(wire.VERSION), out.stderr
    # A relay.py replaced another way (an older upload) is never run from stale bytecode.
    source = where / "relay.py"
    source.write_bytes(source.read_bytes() + b"\nREPLACED = True\n")
    probe = f"import sys; sys.path.insert(0, {str(where)!r}); import relay; print(relay.REPLACED)"
    out = subprocess.run(
        [sys.executable, "-E", "-s", "-S", "-c", probe], capture_output=True, text=True
    )
    assert out.stdout.strip() == "True", out.stderr


def test_relay_compiles_its_code_where_the_hosts_bytecode_does_not_fit(tmp_path: Path) -> None:
    # Another Python (another magic number) in the sandbox: the source is installed alone,
    # and that Python compiles it as it would any module.
    import base64
    import zlib

    from sandbay._transport import _relay_code

    code = json.loads(zlib.decompress(base64.b64decode(_relay_code())))
    code["magic"] = "00000000"
    other = base64.b64encode(zlib.compress(json.dumps(code).encode())).decode()
    where = tmp_path / "relay"
    done = _boot(where, other, "no-such-command")
    assert done.returncode == 2 and "usage: sandbay-relay" in done.stderr
    pyc = (where / "__pycache__" / f"relay.{sys.implementation.cache_tag}.pyc").read_bytes()
    assert int.from_bytes(pyc[4:8], "little") == 0  # Python's own, timestamp-checked


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        ([], "usage: sandbay-relay {serve,replay,attach} [options]"),
        (["serve"], "serve: --run-dir required"),
        (["serve", "--run-dir"], "serve: --run-dir needs a value"),
        (["replay", "--run-dir", "d", "--after", "x"], "replay: --after takes a whole number"),
        (["attach", "--run-dir", "d", "--link"], "attach: unknown argument '--link'"),
        (["serve", "--run-dir", "d", "extra"], "serve: unknown argument 'extra'"),
    ],
)
def test_relay_command_line_errors_say_what_is_wrong(argv: list[str], error: str) -> None:
    from sandbay._relay import relay

    with pytest.raises(ValueError, match="^" + re.escape(error) + "$"):
        relay._parse_args(argv)
    command, args = relay._parse_args(["replay", "--run-dir", "d", "--after", "7", "--link"])
    assert (command, args) == ("replay", {"run_dir": "d", "after": "7", "link": True})


def _frame(**fields: Any) -> bytes:
    envelope = {"sandbay": wire.VERSION, "seq": 1, "kind": "line", "data": {"type": "system"}}
    envelope.update(fields)
    return json.dumps({k: v for k, v in envelope.items() if v is not ...}).encode()


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[1, 2]",
        _frame(sandbay=1),
        _frame(sandbay="2"),
        _frame(sandbay=...),
        _frame(seq=-1),
        _frame(seq=1.0),
        _frame(seq=True),
        _frame(seq=0),  # a line must be numbered
        _frame(kind="stderr", seq=3, data={"line": "x"}),  # stderr is never numbered
        _frame(kind="message"),
        _frame(kind=None),
        _frame(data=[]),
        _frame(data={"no": "type"}),
        _frame(data={"type": 7}),
        _frame(extra=1),
        _frame(kind="stderr", seq=0, data={"line": 5}),
        _frame(kind="end", data={}),
        _frame(kind="end", data={"exit_code": "0"}),
        _frame(kind="end", data={"exit_code": 2**40}),
        _frame(kind="error", data={"message": ["x"]}),
        _frame(kind="ready", seq=0, data={"pid": "1"}),
        b'{"sandbay":3,"seq":1,"kind":"line","data":' + b"[" * 5000 + b"]" * 5000 + b"}",
        _frame(data={"type": "x", "deep": json.loads("[" * 150 + "]" * 150)}),
    ],
)
def test_malformed_frames_are_protocol_errors(line: bytes) -> None:
    with pytest.raises(sandbay.ProtocolError):
        parse_frame(line)


def test_well_formed_frames_parse() -> None:
    assert parse_frame(_frame()).data == {"type": "system"}
    assert parse_frame(_frame(kind="end", seq=4, data={"exit_code": 0})).seq == 4
    error = parse_frame(_frame(kind="error", seq=0, data={"type": "X", "exit_code": None}))
    assert error.kind == "error"


def test_only_frames_with_many_brackets_have_their_depth_walked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Walking every message's data for its depth cost host CPU on each message; a line with
    # no more brackets than the limit cannot nest deeper, so only the others are walked.
    import sandbay._transport as transport_module

    walked: list[object] = []
    walk = _nests_deeper

    def counted(value: object, limit: int) -> bool:
        walked.append(value)
        return walk(value, limit)

    monkeypatch.setattr(transport_module, "_nests_deeper", counted)
    assert parse_frame(_frame(data={"type": "assistant", "content": [{"a": [1, 2]}]})).seq == 1
    assert walked == []
    # Brackets in text count too: walked, and shallow, so accepted.
    shallow = {"type": "x", "text": "[{" * 200}
    assert parse_frame(_frame(data=shallow)).data == shallow
    assert len(walked) == 1
    with pytest.raises(sandbay.ProtocolError, match="deeper than"):
        parse_frame(_frame(data={"type": "x", "deep": json.loads("[" * 101 + "]" * 101)}))
    # Exactly at the limit in the text: not walked, and not too deep (the envelope is one).
    assert parse_frame(_frame(data={"type": "x", "d": json.loads("[" * 98 + "]" * 98)}))
    assert len(walked) == 2


# -- end to end -----------------------------------------------------------------------------


@pytest.mark.parametrize("sandbox", KINDS, indirect=True)
async def test_messages_match_a_local_query(sandbox: Sandbox) -> None:
    script = bash_then_done("echo sandbay-$((6*7)); pwd")
    async with ScriptedModel(script) as model:
        options = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"], env=model.env())
        transport = sandbay.SandboxTransport(sandbox, options)
        messages = [m async for m in query(prompt="go", options=options, transport=transport)]
        output = str(model.tool_results())
    async with ScriptedModel(script) as model:
        local_options = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"], env=model.env())
        local = [m async for m in query(prompt="go", options=local_options)]
    assert shape(messages) == shape(local)
    assert isinstance(messages[0], SystemMessage) and messages[0].data["cwd"] == sandbox.workdir
    assert "sandbay-42" in output and sandbox.workdir in output
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error
    assert transport.exit_code == 0
    # Every CLI line was logged in the sandbox, numbered, and ended with "end".
    # (Read on the relay's side: the run directory is the relay's alone.)
    reader = await sandbox.start_relay(["cat", f"{transport.run_dir}/{wire.LOG_NAME}"])
    log = await reader.stdout.read()
    assert await reader.wait() == 0
    logged = [json.loads(line) for line in log.splitlines()]
    assert [e["seq"] for e in logged] == list(range(1, len(logged) + 1))
    assert logged[-1]["kind"] == "end" and transport.last_seq == len(logged)


@pytest.mark.parametrize("sandbox", KINDS, indirect=True)
async def test_hook_permission_callback_and_sdk_mcp_tool_run_on_the_host(
    sandbox: Sandbox,
) -> None:
    hooked: list[str] = []
    asked: list[str] = []

    async def pre_tool_use(
        data: HookInput, tool_use_id: str | None, context: HookContext
    ) -> HookJSONOutput:
        hooked.append(str(data.get("tool_name")))
        return {}

    async def decide(
        name: str, arguments: dict[str, Any], context: ToolPermissionContext
    ) -> PermissionResultAllow | PermissionResultDeny:
        asked.append(name)
        if name == "Write":
            return PermissionResultDeny(message="denied-by-the-host")
        return PermissionResultAllow()

    script = [
        Turn.tool_use("Bash", {"command": "echo from-$(hostname)-bash-${IS_SANDBOX:-none}"}),
        Turn.tool_use("Write", {"file_path": f"{sandbox.workdir}/nope.txt", "content": "x"}),
        Turn.tool_use("mcp__host__add", {"a": 2, "b": 40}),
        Turn.text("done"),
    ]
    async with ScriptedModel(script) as model:
        options = ClaudeAgentOptions(
            max_turns=6,
            env=model.env(),
            hooks={"PreToolUse": [HookMatcher(matcher=None, hooks=[pre_tool_use])]},
            can_use_tool=decide,
            mcp_servers={"host": create_sdk_mcp_server("host", tools=[add])},
        )
        transport = sandbay.SandboxTransport(sandbox, options)
        with anyio.fail_after(180):
            messages = [m async for m in query(prompt="go", options=options, transport=transport)]
        results = model.tool_results()
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error
    assert hooked == ["Bash", "Write", "mcp__host__add"]
    assert asked == ["Bash", "Write", "mcp__host__add"]
    by_turn = [str(r.get("content")) for r in results]
    assert "from-" in by_turn[0] and "-bash-" in by_turn[0]
    # IS_SANDBOX only where a real boundary exists.
    assert by_turn[0].count("-bash-1" if sandbox.isolated else "-bash-none") == 1
    assert "denied-by-the-host" in by_turn[1] and results[1].get("is_error") is True
    assert "sum=42" in by_turn[2]
    assert not await sandbox.exists("nope.txt")


@pytest.mark.parametrize("sandbox", KINDS, indirect=True)
async def test_two_turns_over_one_transport_with_the_client(sandbox: Sandbox) -> None:
    script = [Turn.text("first answer"), Turn.text("second answer")]
    async with ScriptedModel(script) as model:
        options = ClaudeAgentOptions(max_turns=2, env=model.env())
        transport = sandbay.SandboxTransport(sandbox, options)
        texts: list[str] = []
        with anyio.fail_after(120):
            async with ClaudeSDKClient(options, transport=transport) as client:
                for prompt in ("one", "two"):
                    await client.query(prompt)
                    async for message in client.receive_response():
                        if isinstance(message, AssistantMessage):
                            texts.append(str(message.content))
        second = model.turn_requests[-1]
    assert "first answer" in texts[0] and "second answer" in texts[1]
    assert "first answer" in json.dumps(second.messages)  # one CLI, one conversation


#: The unisolated local provider: its processes are host processes, visible in /proc.
UNISOLATED = sandbay.LocalConfig(isolate=False)


def run_pids(sandbox: Sandbox, run_id: str) -> set[int]:
    """Host processes of a transport's run: the relay (its argv names the run) and what
    works inside the sandbox's workdir (the CLI and its tools)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        if run_id.encode() in cmdline or cwd.startswith(sandbox.workdir):
            found.add(int(entry.name))
    return found


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


async def test_close_mid_turn_leaves_no_process() -> None:
    async with (
        ScriptedModel([Turn.text("slow", delay_s=30)]) as model,
        sandbay.open_sandbox(UNISOLATED) as sb,
    ):
        options = ClaudeAgentOptions(max_turns=2, env=model.env())
        transport = sandbay.SandboxTransport(sb, options)
        async with ClaudeSDKClient(options, transport=transport) as client:
            await client.query("go")
            pids = run_pids(sb, transport.run_id)
            assert len(pids) >= 2  # the relay and the CLI
            # The key went on the relay's stdin: no process's argv holds it.
            key = model.env()["ANTHROPIC_API_KEY"].encode()
            assert not any(key in cmdline(pid) for pid in pids)
        # The client disconnected while the model was still "thinking".
        assert run_pids(sb, transport.run_id) == set()
        await transport.close()  # idempotent
        assert not sb.closed


@pytest.mark.parametrize("sandbox", KINDS, indirect=True)
async def test_close_mid_turn_stops_the_cli_in_the_sandbox(sandbox: Sandbox) -> None:
    async with ScriptedModel([Turn.text("slow", delay_s=30)]) as model:
        options = ClaudeAgentOptions(max_turns=2, env=model.env())
        transport = sandbay.SandboxTransport(sandbox, options)
        with anyio.fail_after(60):
            async with ClaudeSDKClient(options, transport=transport) as client:
                await client.query("go")
                async for message in client.receive_messages():
                    assert isinstance(message, SystemMessage)  # init: the turn has begun
                    break
    pid = transport.cli_pid
    assert pid is not None
    # Its state inside the sandbox: gone, or a zombie (dead, waiting for its reaper).
    probe = (
        "try:\n"
        f" print(open('/proc/{pid}/stat').read().rsplit(')', 1)[1].split()[0])\n"
        "except OSError:\n"
        " print('gone')"
    )
    result = await sandbox.exec([sandbox.python, "-c", probe])
    assert result.stdout.strip() in (b"gone", b"Z"), "the CLI outlived close()"
    assert not sandbox.closed


async def test_cli_crash_is_an_agent_error_with_exit_code_and_stderr(sandbox: Sandbox) -> None:
    seen: list[str] = []
    options = ClaudeAgentOptions(
        extra_args={"no-such-flag-xyz": None},
        env={"ANTHROPIC_API_KEY": "k"},
        stderr=seen.append,
    )
    transport = sandbay.SandboxTransport(sandbox, options)
    with pytest.raises(sandbay.AgentError) as info, anyio.fail_after(60):
        async for _ in query(prompt="go", options=options, transport=transport):
            pass
    assert info.value.exit_code not in (None, 0)
    assert "no-such-flag-xyz" in info.value.stderr_tail
    assert any("no-such-flag-xyz" in line for line in seen)  # options.stderr got the lines


async def test_missing_cli_is_an_agent_error(sandbox: Sandbox) -> None:
    options = ClaudeAgentOptions(cli_path="/nonexistent/claude", env={"ANTHROPIC_API_KEY": "k"})
    transport = sandbay.SandboxTransport(sandbox, options)
    with pytest.raises(sandbay.AgentError, match="/nonexistent/claude") as info:
        async for _ in query(prompt="go", options=options, transport=transport):
            pass
    assert info.value.exit_code == 127


async def test_relay_that_cannot_start_reports_exit_code_and_stderr() -> None:
    config = sandbay.LocalConfig(isolate=False, python="/nonexistent/python3")
    async with sandbay.open_sandbox(config) as sb:
        options = ClaudeAgentOptions(env={"ANTHROPIC_API_KEY": "k"})
        transport = sandbay.SandboxTransport(sb, options)
        with pytest.raises(sandbay.AgentError) as info, anyio.fail_after(60):
            async for _ in query(prompt="go", options=options, transport=transport):
                pass
    assert info.value.exit_code == 127
    assert "/nonexistent/python3" in info.value.stderr_tail


class _CutRelaySandbox(WrappedSandbox):
    """The relay's stream to the host breaks after ``keep`` lines; the relay runs on."""

    provider = "cut"

    def __init__(self, inner: Sandbox, keep: int) -> None:
        super().__init__(inner)
        self.keep = keep
        self.cuts = 0
        self.replays = 0

    @override
    async def _start(
        self, argv: list[str], *, env: dict[str, str], cwd: str, user: str | None
    ) -> Process:
        proc = await self.inner.start(argv, env=env, cwd=cwd, user=user)
        command = " ".join(argv)
        if " replay --run-dir " in command:
            self.replays += 1
        if self.cuts == 0 and " serve " in command:
            self.cuts += 1
            return _CutProcess(proc, self.keep)
        return proc


async def test_cut_stream_is_replayed_without_loss_or_duplication() -> None:
    # The last turn is slow, so the cut comes while the CLI is still running.
    script = bash_then_done("echo replayed-ok", delay_s=4)
    async with ScriptedModel(script) as model, sandbay.open_sandbox(UNISOLATED) as inner:
        cut = _CutRelaySandbox(inner, keep=4)  # ready, init, and a little more get through
        options = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"], env=model.env())
        transport = sandbay.SandboxTransport(cut, options)
        with anyio.fail_after(120):
            messages = [m async for m in query(prompt="go", options=options, transport=transport)]
        assert cut.cuts == 1 and cut.replays == 1
    async with ScriptedModel(script) as model:
        local_options = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"], env=model.env())
        local = [m async for m in query(prompt="go", options=local_options)]
    assert shape(messages) == shape(local)
    tool_uses = [
        b
        for m in messages
        if isinstance(m, AssistantMessage)
        for b in m.content
        if isinstance(b, ToolUseBlock)
    ]
    assert len(tool_uses) == 1
    assert "replayed-ok" in str(messages)
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error


async def test_cut_stream_without_reattach_is_an_agent_error() -> None:
    async with ScriptedModel(bash_then_done("true", delay_s=4)) as model:
        async with sandbay.open_sandbox(UNISOLATED) as inner:
            cut = _CutRelaySandbox(inner, keep=4)
            options = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"], env=model.env())
            transport = sandbay.SandboxTransport(cut, options, reconnects=0)
            with pytest.raises(sandbay.AgentError, match="stream ended"), anyio.fail_after(60):
                async for _ in query(prompt="go", options=options, transport=transport):
                    pass
            assert cut.replays == 0


class _FakeRelaySandbox(WrappedSandbox):
    """The relay is replaced by a script that prints ``lines`` (as hostile code could)."""

    provider = "fake-relay"

    def __init__(self, inner: Sandbox, lines: list[str]) -> None:
        super().__init__(inner)
        self.lines = lines

    @override
    async def _start(
        self, argv: list[str], *, env: dict[str, str], cwd: str, user: str | None
    ) -> Process:
        if " serve " in " ".join(argv):
            script = (
                f"import sys; sys.stdout.write({''.join(line + chr(10) for line in self.lines)!r})"
            )
            argv = [self.inner.python, "-c", script]
        return await self.inner.start(argv, env=env, cwd=cwd, user=user)


def _line(seq: int, data: dict[str, Any], kind: str = "line") -> str:
    return json.dumps({"sandbay": wire.VERSION, "seq": seq, "kind": kind, "data": data})


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        ([_line(1, {"type": "system"}), _line(3, {"type": "system"})], "lost some"),
        ([_line(1, {"type": 5})], "text type"),
        (['{"sandbay": 1, "seq": 1, "kind": "message", "data": {}}'], "wire version"),
        (["x" * 100], "not JSON"),
    ],
)
async def test_a_hostile_relay_is_a_protocol_error(lines: list[str], error: str) -> None:
    async with sandbay.open_sandbox(UNISOLATED) as inner:
        fake = _FakeRelaySandbox(inner, lines)
        options = ClaudeAgentOptions(env={"ANTHROPIC_API_KEY": "k"})
        transport = sandbay.SandboxTransport(fake, options)
        await transport.connect()
        try:
            with pytest.raises(sandbay.ProtocolError, match=error), anyio.fail_after(30):
                async for _ in transport.read_messages():
                    pass
        finally:
            await transport.close()


class _NoEofProcess(_CutProcess):
    """A real process whose provider cannot send end of file on stdin."""

    @override
    async def close_stdin(self) -> None:
        pass


class _NoEofSandbox(WrappedSandbox):
    provider = "no-eof"

    @override
    async def _start(
        self, argv: list[str], *, env: dict[str, str], cwd: str, user: str | None
    ) -> Process:
        return _NoEofProcess(await self.inner.start(argv, env=env, cwd=cwd, user=user), 10**9)


async def test_input_ends_without_end_of_file_through_the_relay() -> None:
    async with ScriptedModel(["hi"]) as model, sandbay.open_sandbox(UNISOLATED) as inner:
        options = ClaudeAgentOptions(max_turns=1, env=model.env())
        transport = sandbay.SandboxTransport(_NoEofSandbox(inner), options)
        with anyio.fail_after(60):
            messages = [m async for m in query(prompt="go", options=options, transport=transport)]
        # The CLI saw the end of its input (the relay's end-input line) and exited by itself.
        assert isinstance(messages[-1], ResultMessage) and transport.exit_code == 0
