"""The agent layer end to end: the real ``claude`` CLI inside a sandbox, against ScriptedModel.

Runs on the local provider always and on Docker where marked. Nothing here is mocked: a
fault-injecting wrapper around a real sandbox cuts a stream to exercise the replay path.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    HookContext,
    HookInput,
    HookJSONOutput,
    HookMatcher,
    InMemorySessionStore,
    PermissionResultAllow,
    PermissionResultDeny,
    ResultMessage,
    SessionKey,
    SessionStoreEntry,
    SystemMessage,
    ToolPermissionContext,
    ToolResultBlock,
    ToolUseBlock,
    UserMessage,
    create_sdk_mcp_server,
    query,
    tool,
)
from typing_extensions import override

import sandbay
import sandbay._agent
from sandbay import ByteStream, Process, Sandbox, SandboxSpec
from sandbay.testing import ScriptedModel, Turn
from wrapping import WrappedSandbox

pytestmark = pytest.mark.anyio

# allowed_tools lets the CLI run Bash unasked; bypassPermissions is for isolated sandboxes.
OPTIONS = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"])
BYPASS = ClaudeAgentOptions(
    max_turns=4, allowed_tools=["Bash"], permission_mode="bypassPermissions"
)


def bash_then_done(command: str, *, delay_s: float = 0.0) -> list[Any]:
    return [Turn.tool_use("Bash", {"command": command}), Turn.text("done", delay_s=delay_s)]


async def collect(run: sandbay.AgentRun) -> list[Any]:
    async with run:
        return [message async for message in run]


async def sandboxes_with_session(provider: str, session: str) -> list[sandbay.SandboxInfo]:
    return await sandbay.get_provider(provider).list(labels={"sandbay.session": session})


def shape(messages: list[Any]) -> list[tuple[str, ...]]:
    """What must match between a local query() and a sandboxed run: types and blocks."""
    out = []
    for m in messages:
        if isinstance(m, (AssistantMessage, UserMessage)) and isinstance(m.content, list):
            out.append((type(m).__name__, *(type(b).__name__ for b in m.content)))
        elif isinstance(m, SystemMessage):
            out.append(("SystemMessage", m.subtype))
        else:
            out.append((type(m).__name__,))
    return out


async def test_messages_match_a_local_query_and_tools_act_in_the_sandbox() -> None:
    script = bash_then_done("echo sandbay-$((6*7)); pwd")
    async with ScriptedModel(script) as model:
        # Unisolated, so that the sandbox's working directory is its host folder.
        plain = sandbay.LocalConfig(isolate=False, allow_bypass_permissions=True)
        messages = await collect(
            sandbay.run_agent("go", provider=plain, options=OPTIONS, env=model.env(), timeout=120)
        )
        sandboxed_results = model.tool_results()
    async with ScriptedModel(script) as model:
        local_options = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"], env=model.env())
        local = [m async for m in query(prompt="go", options=local_options)]

    assert shape(messages) == shape(local)
    assert isinstance(messages[0], SystemMessage) and messages[0].subtype == "init"
    tool_use = next(
        b
        for m in messages
        if isinstance(m, AssistantMessage)
        for b in m.content
        if isinstance(b, ToolUseBlock)
    )
    assert tool_use.name == "Bash"
    result_block = next(
        b
        for m in messages
        if isinstance(m, UserMessage)
        for b in m.content
        if isinstance(b, ToolResultBlock)
    )
    output = str(result_block.content)
    assert "sandbay-42" in output
    # pwd printed the sandbox's own working directory, not the test's.
    cwd = messages[0].data["cwd"]
    assert cwd in output and "sandbay-" in cwd
    assert "sandbay-42" in str(sandboxed_results)
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error


async def test_messages_stream_as_produced_not_at_the_end() -> None:
    async with ScriptedModel(bash_then_done("true", delay_s=2.0)) as model:
        arrivals: list[tuple[float, Any]] = []
        run = sandbay.run_agent("go", provider="local", options=OPTIONS, env=model.env())
        async with run:
            async for message in run:
                arrivals.append((time.monotonic(), message))
    first_assistant = next(t for t, m in arrivals if isinstance(m, AssistantMessage))
    result = next(t for t, m in arrivals if isinstance(m, ResultMessage))
    assert result - first_assistant >= 1.5, "messages were buffered until the end"


async def test_timeout_yields_what_arrived_then_raises_and_removes_the_sandbox() -> None:
    script = [Turn.text("never in time", delay_s=30)]
    async with ScriptedModel(script) as model:
        received: list[Any] = []
        run = sandbay.run_agent("go", provider="local", options=OPTIONS, env=model.env(), timeout=6)
        started = time.monotonic()
        with pytest.raises(sandbay.SandboxTimeoutError, match="deadline") as info:
            async for message in run:
                received.append(message)
        assert time.monotonic() - started < 15
    assert isinstance(info.value, TimeoutError)
    assert received and isinstance(received[0], SystemMessage)  # init arrived before the deadline
    assert run.sandbox is not None and run.sandbox.closed
    listed = await sandbay.get_provider("local").list()
    assert run.sandbox.id not in {s.id for s in listed}


async def test_cancelling_the_consumer_removes_the_sandbox() -> None:
    async with ScriptedModel([Turn.text("slow", delay_s=30)]) as model:
        run = sandbay.run_agent("go", provider="local", options=OPTIONS, env=model.env())
        got_first = anyio.Event()

        async def consume() -> None:
            async for _ in run:
                got_first.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            with anyio.fail_after(30):
                await got_first.wait()
            tg.cancel_scope.cancel()
    assert run.sandbox is not None and run.sandbox.closed
    assert run.sandbox.id not in {s.id for s in await sandbay.get_provider("local").list()}


#: The unisolated local provider: its processes are host processes with host paths, so a test
#: can find them in /proc (under isolation every sandbox's workdir reads /workspace).
UNISOLATED = sandbay.LocalConfig(isolate=False)


def agent_pids(sandbox: Sandbox, run_id: str) -> set[int]:
    """Host processes of a local run: its entrypoint (named by the run id) and any process
    working inside the sandbox's workdir (the CLI and its tools)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue  # gone, or a zombie
        if run_id.encode() in cmdline or cwd.startswith(sandbox.workdir):
            found.add(int(entry.name))
    return found


@pytest.mark.parametrize("how", ["aclose", "async_with"])
async def test_stopping_early_kills_the_agent_and_removes_the_sandbox(how: str) -> None:
    async with ScriptedModel([Turn.text("slow", delay_s=30)]) as model:
        run = sandbay.run_agent("go", provider=UNISOLATED, options=OPTIONS, env=model.env())
        if how == "aclose":
            async for _ in run:
                break
        else:
            async with run:
                async for _ in run:
                    break
        assert run.sandbox is not None
        if how == "aclose":
            assert agent_pids(run.sandbox, run.run_id), "the agent should still be running"
            await run.aclose()
        # Nothing waits for a finalizer: the moment aclose / the block returns, it is over.
        assert run.sandbox.closed
        assert run.sandbox.id not in {s.id for s in await sandbay.get_provider(UNISOLATED).list()}
        assert agent_pids(run.sandbox, run.run_id) == set()
        await run.aclose()  # idempotent


@pytest.mark.docker
async def test_docker_aclose_after_break_leaves_no_container() -> None:
    import docker

    async with ScriptedModel([Turn.text("slow", delay_s=30)]) as model:
        run = sandbay.run_agent(
            "go",
            provider=sandbay.DockerConfig(),
            options=OPTIONS,
            env=model.env(),
            spec=SandboxSpec(network="host"),
            timeout=120,
        )
        async for _ in run:
            break
        assert run.sandbox is not None
        session = run.sandbox.labels["sandbay.session"]
        assert await sandboxes_with_session("docker", session)
        await run.aclose()
        assert await sandboxes_with_session("docker", session) == []
    client = docker.from_env()
    try:
        found = client.containers.list(all=True, filters={"label": f"sandbay.session={session}"})
        assert found == []
    finally:
        client.close()


async def test_cli_crash_is_an_agent_error_with_exit_code_and_stderr() -> None:
    options = ClaudeAgentOptions(extra_args={"no-such-flag-xyz": None})
    async with ScriptedModel(["hi"]) as model:
        with pytest.raises(sandbay.AgentError) as info:
            await collect(
                sandbay.run_agent(
                    "go", provider="local", options=options, env=model.env(), timeout=60
                )
            )
    assert info.value.exit_code not in (None, 0)
    assert "no-such-flag-xyz" in info.value.stderr_tail
    assert "no-such-flag-xyz" in str(info.value)


async def test_entrypoint_that_cannot_start_reports_exit_code_and_stderr() -> None:
    config = sandbay.LocalConfig(python="/nonexistent/python3")
    with pytest.raises(sandbay.AgentError) as info:
        await collect(
            sandbay.run_agent("go", provider=config, env={"ANTHROPIC_API_KEY": "x"}, timeout=60)
        )
    assert info.value.exit_code == 127
    assert "/nonexistent/python3" in info.value.stderr_tail


@tool("add", "Add two numbers", {"a": int, "b": int})
async def add(args: dict[str, Any]) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": f"sum={args['a'] + args['b']}"}]}


class _RecordingStore(InMemorySessionStore):
    """The SDK's in-memory store, noting which sessions it was sent transcript entries of."""

    def __init__(self) -> None:
        super().__init__()
        self.appended: set[str] = set()

    @override
    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        self.appended.add(key["session_id"])
        await super().append(key, entries)


@pytest.mark.parametrize("via", ["sandbox", "pool"])
async def test_callbacks_and_a_session_store_work_through_run_agent(via: str) -> None:
    # Once refused with a ConfigError: now the SDK runs here and the CLI in the sandbox
    # calls back into this process for each of them.
    hooked: list[str] = []
    asked: list[str] = []
    stderr_lines: list[str] = []

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

    store = _RecordingStore()
    script = [
        Turn.tool_use("Bash", {"command": "echo hello-from-bash"}),
        Turn.tool_use("Write", {"file_path": "nope.txt", "content": "x"}),
        Turn.tool_use("mcp__host__add", {"a": 2, "b": 40}),
        Turn.text("done"),
    ]
    options = ClaudeAgentOptions(
        max_turns=6,
        hooks={"PreToolUse": [HookMatcher(matcher=None, hooks=[pre_tool_use])]},
        can_use_tool=decide,
        mcp_servers={"host": create_sdk_mcp_server("host", tools=[add])},
        stderr=stderr_lines.append,
        session_store=store,
        extra_args={"debug-to-stderr": None},
    )
    async with ScriptedModel(script) as model:
        if via == "pool":
            async with sandbay.SandboxPool(
                "local", size=1, options=options, env=model.env()
            ) as pool:
                run = sandbay.run_agent("go", pool=pool, timeout=120)
                messages = await collect(run)
        else:
            async with sandbay.open_sandbox("local") as sb:
                run = sandbay.run_agent("go", sandbox=sb, options=options, env=model.env())
                messages = await collect(run)
                assert not await sb.exists("nope.txt")
        results = model.tool_results()
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error
    assert hooked == ["Bash", "Write", "mcp__host__add"]
    assert asked[-2:] == ["Write", "mcp__host__add"]  # a plain echo needs no asking
    by_turn = [str(r.get("content")) for r in results]
    assert "hello-from-bash" in by_turn[0]
    assert "denied-by-the-host" in by_turn[1]
    assert "sum=42" in by_turn[2]
    assert stderr_lines, "the CLI's stderr reaches the stderr callback"
    session_ids = {m.session_id for m in messages if isinstance(m, ResultMessage)}
    assert session_ids and session_ids <= store.appended, "the transcript reached the store"


class _CutProcess(Process):
    """A real process whose stdout, as seen by the host, stops after ``keep`` lines."""

    def __init__(self, inner: Process, keep: int) -> None:
        self._inner = inner
        self._lines = 0
        self._keep = keep
        self._pending = bytearray()
        self.stdout = ByteStream(self._receive)
        self.stderr = inner.stderr

    async def _receive(self) -> bytes | None:
        if self._lines >= self._keep:
            return None  # the "connection" drops; the process runs on
        chunk = await self._inner.stdout.__anext__()
        out = bytearray()
        for byte in chunk:
            out.append(byte)
            if byte == ord("\n"):
                self._lines += 1
                if self._lines >= self._keep:
                    break
        return bytes(out)

    @override
    async def write(self, data: bytes) -> None:
        await self._inner.write(data)

    @override
    async def close_stdin(self) -> None:
        await self._inner.close_stdin()

    @override
    async def wait(self) -> int:
        return await self._inner.wait()

    @override
    async def kill(self) -> None:
        await self._inner.kill()

    @property
    @override
    def returncode(self) -> int | None:
        return None  # as a broken connection looks: no exit code known


class _FlakySandbox(WrappedSandbox):
    """Wraps a real sandbox; the first agent entrypoint's stream breaks after ``keep`` lines."""

    provider = "flaky"

    def __init__(self, inner: Sandbox, keep: int) -> None:
        super().__init__(inner)
        self.keep = keep
        self.cuts = 0

    @override
    async def _start(
        self, argv: list[str], *, env: dict[str, str], cwd: str, user: str | None
    ) -> Process:
        proc = await self.inner.start(argv, env=env, cwd=cwd, user=user)
        if self.cuts == 0 and " serve " in " ".join(argv):
            self.cuts += 1
            return _CutProcess(proc, self.keep)
        return proc


async def test_broken_stream_is_resumed_from_the_last_sequence_number() -> None:
    # Turn 2 is slow so the cut happens while the entrypoint is still running.
    script = bash_then_done("echo resumed-ok", delay_s=1.5)
    async with ScriptedModel(script) as model, sandbay.open_sandbox("local") as inner:
        flaky = _FlakySandbox(inner, keep=2)  # "ready" + the first message get through
        run = sandbay.run_agent("go", sandbox=flaky, options=OPTIONS, env=model.env(), timeout=60)
        messages: list[Any] = []
        seqs: list[int] = []
        async with run:
            async for message in run:
                messages.append(message)
                seqs.append(run.last_seq)
        assert flaky.cuts == 1
        assert isinstance(messages[0], SystemMessage)
        assert isinstance(messages[-1], ResultMessage)
        assert "resumed-ok" in str(messages)
        kinds = [type(m).__name__ for m in messages]
        assert kinds.count("ResultMessage") == 1 and kinds.count("SystemMessage") == 1
        # Replay of the finished run from its log: everything after message 2 (the log
        # numbers the CLI's control lines too, so message 2 has a sequence number of its own).
        assert seqs == sorted(set(seqs))
        # (Through the wrapper, whose relay ran where the wrapper starts it.)
        replayed = [m async for m in sandbay.replay_agent(flaky, run.run_id, after=seqs[1])]
        assert shape(replayed) == shape(messages[2:])
        assert run.last_seq >= len(messages)


async def test_run_in_a_given_sandbox_leaves_it_open() -> None:
    async with ScriptedModel(bash_then_done("echo hi > made-by-agent.txt")) as model:
        async with sandbay.open_sandbox("local") as sb:
            await collect(sandbay.run_agent("go", sandbox=sb, options=OPTIONS, env=model.env()))
            assert not sb.closed
            assert (await sb.read_file("made-by-agent.txt")).strip() == b"hi"


async def test_pool_runs_are_warm_and_never_reuse_a_sandbox() -> None:
    async with ScriptedModel(bash_then_done("echo pooled") * 3) as model:
        async with sandbay.SandboxPool("local", size=2, options=OPTIONS, env=model.env()) as pool:
            ids = []
            for _ in range(3):
                await pool.wait_ready(timeout=60)
                run = sandbay.run_agent("go", pool=pool)
                messages = await collect(run)
                assert isinstance(messages[-1], ResultMessage)
                assert run.sandbox is not None and run.sandbox.closed
                ids.append(run.sandbox.id)
                # That the CLI was started ahead of time is shown by events, not by a time
                # bound: tests/test_pool.py::test_a_pooled_run_starts_no_cli_and_does_no_handshake.
                t = run.timings
                assert t.start is not None and t.first_message is not None
                assert t.start <= t.first_message
            assert len(set(ids)) == 3
            with pytest.raises(sandbay.ConfigError, match="other options"):
                sandbay.run_agent("go", pool=pool, options=ClaudeAgentOptions(max_turns=9))
        live = {s.id for s in await sandbay.get_provider("local").list()}
        assert not live & set(ids)
        assert pool.stats["acquired"] == 3


async def test_closing_a_pool_while_it_provisions_leaks_nothing() -> None:
    before = {s.id for s in await sandbay.get_provider("local").list()}
    async with sandbay.SandboxPool("local", size=3, concurrency=3) as pool:
        await anyio.sleep(0.05)  # provisioning is under way
    after = {s.id for s in await sandbay.get_provider("local").list()}
    assert after <= before
    with pytest.raises(sandbay.SandboxClosedError):
        await pool.acquire()


@pytest.mark.docker
async def test_agent_in_docker_runs_its_tools_in_the_container() -> None:
    marker = f"marker-{time.time_ns()}"
    command = "cat /workspace/marker.txt; test -f /.dockerenv && echo in-docker; id -u"
    async with ScriptedModel(bash_then_done(command)) as model:
        spec = SandboxSpec(network="host")
        async with sandbay.open_sandbox("docker", spec) as sb:
            await sb.write_file("/workspace/marker.txt", marker.encode())
            messages = await collect(
                sandbay.run_agent("go", sandbox=sb, options=OPTIONS, env=model.env(), timeout=120)
            )
        output = str(model.tool_results())
    assert marker in output and "in-docker" in output and "1000" in output
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error
    assert messages[0].data["cwd"] == "/workspace"


@pytest.mark.docker
async def test_docker_timeout_and_cancel_leave_no_container() -> None:
    import docker

    async with ScriptedModel([Turn.text("slow", delay_s=30)]) as model:
        run = sandbay.run_agent(
            "go",
            provider="docker",
            options=OPTIONS,
            env=model.env(),
            spec=SandboxSpec(network="host"),
            timeout=8,
        )
        with pytest.raises(sandbay.SandboxTimeoutError):
            await collect(run)
        assert run.sandbox is not None
        session = run.sandbox.labels["sandbay.session"]

        run2 = sandbay.run_agent(
            "go",
            provider="docker",
            options=OPTIONS,
            env=model.env(),
            spec=SandboxSpec(network="host"),
        )
        with anyio.move_on_after(6):
            await collect(run2)
        assert run2.sandbox is not None
        session2 = run2.sandbox.labels["sandbay.session"]
    client = docker.from_env()
    try:
        for label in (session, session2):
            found = client.containers.list(all=True, filters={"label": f"sandbay.session={label}"})
            assert found == [], f"container left behind for session {label}"
    finally:
        client.close()


@pytest.mark.bwrap
async def test_agent_under_bubblewrap_sees_only_its_workspace(tmp_path: Any) -> None:
    import shutil

    if not shutil.which("bwrap"):
        pytest.skip("bubblewrap is not installed")
    secret = tmp_path / "host-secret.txt"
    secret.write_text("do-not-leak")
    command = f"pwd; cat {secret} 2>&1; ls /root | wc -l; env | grep IS_SANDBOX"
    async with ScriptedModel(bash_then_done(command)) as model:
        messages = await collect(
            sandbay.run_agent(
                "go",
                provider=sandbay.LocalConfig(isolate=True),
                options=BYPASS,  # allowed: a real boundary exists
                env=model.env(),
                spec=SandboxSpec(network="host"),
                timeout=120,
            )
        )
        output = str(model.tool_results())
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error
    assert "/workspace" in output
    assert "do-not-leak" not in output and "No such file" in output
    assert "IS_SANDBOX=1" in output


@pytest.mark.parametrize("call", ["wait_ready", "acquire", "run_agent"])
async def test_pool_errors_arrive_as_themselves_not_in_a_group(call: str) -> None:
    # The entrypoint cannot start, so every sandbox the pool warms fails with an AgentError.
    config = sandbay.LocalConfig(python="/nonexistent/python3")
    with pytest.raises(sandbay.AgentError, match="ready") as info:
        async with sandbay.SandboxPool(config, size=1) as pool:
            if call == "wait_ready":
                await pool.wait_ready(timeout=60)
            elif call == "acquire":
                await pool.acquire(timeout=60)
            else:
                await collect(
                    sandbay.run_agent("go", pool=pool, env={"ANTHROPIC_API_KEY": "unused"})
                )
    assert type(info.value) is sandbay.AgentError
    assert "/nonexistent/python3" in str(info.value)


async def test_an_error_in_a_pool_block_comes_out_as_itself() -> None:
    with pytest.raises(KeyError, match="mine"):
        async with sandbay.SandboxPool("local", size=1):
            raise KeyError("mine")


async def test_pool_replaces_a_sandbox_near_its_expiry() -> None:
    spec = SandboxSpec(lifetime_s=8)  # margin: a quarter of it, 2 s
    async with sandbay.SandboxPool("local", spec, size=1) as pool:
        await pool.wait_ready(timeout=60)
        assert pool.ready == 1
        await anyio.sleep(7.0)  # now within 2 s of its expiry
        lease = await pool.acquire(timeout=60)
        try:
            expiry = float(lease.sandbox.labels["sandbay.expiry"])
            assert expiry - time.time() > 4, "handed out a sandbox about to expire"
        finally:
            await lease.kill()
            await lease.sandbox.aclose()


# -- refused up front ----------------------------------------------------------------------


def without_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in sandbay._agent.CREDENTIALS:
        monkeypatch.delenv(name, raising=False)


def test_no_credentials_is_refused_before_anything_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    without_credentials(monkeypatch)
    with pytest.raises(sandbay.ConfigError) as info:
        sandbay.run_agent("go", provider="local")
    message = str(info.value)
    assert "ANTHROPIC_API_KEY is not set" in message
    assert "--offline" in message and "ScriptedModel" in message
    # Any one credential, from the host, env=, options.env or the spec, is enough.
    sandbay.run_agent("go", provider="local", env={"ANTHROPIC_API_KEY": "k"})
    sandbay.run_agent("go", provider="local", env={"CLAUDE_CODE_USE_BEDROCK": "1"})
    sandbay.run_agent("go", options=ClaudeAgentOptions(env={"ANTHROPIC_AUTH_TOKEN": "t"}))
    sandbay.run_agent("go", spec=SandboxSpec(env={"CLAUDE_CODE_OAUTH_TOKEN": "o"}))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "from-the-host")
    sandbay.run_agent("go", provider="local")


#: Turns sandbay's model relay off for a run, so the CLI in the sandbox reaches the model itself.
NO_MODEL_RELAY = {"SANDBAY_MODEL_RELAY": "0"}

LOOPBACK_URLS = [
    "http://127.0.0.1:9",
    "http://127.8.9.10:9/v1",
    "http://localhost:9",
    "http://[::1]:9",
]


@pytest.mark.bwrap
@pytest.mark.parametrize("url", LOOPBACK_URLS)
async def test_loopback_model_url_out_of_an_isolated_sandboxs_reach_is_refused(url: str) -> None:
    import shutil

    if not shutil.which("bwrap"):
        pytest.skip("bubblewrap is not installed")
    # With the model relay (the default) the host reaches the URL for the sandbox; without
    # it, the CLI in the sandbox would have to, and cannot.
    run = sandbay.run_agent(
        "go",
        provider=sandbay.LocalConfig(isolate=True),
        spec=SandboxSpec(network="none"),
        env={"ANTHROPIC_API_KEY": "k", "ANTHROPIC_BASE_URL": url, **NO_MODEL_RELAY},
        timeout=60,
    )
    started = time.monotonic()
    with pytest.raises(sandbay.ConfigError, match="loopback inside this local sandbox"):
        await collect(run)
    assert time.monotonic() - started < 15
    assert run.sandbox is not None and run.sandbox.closed
    assert run.sandbox.id not in {s.id for s in await sandbay.get_provider("local").list()}


@pytest.mark.docker
async def test_docker_loopback_model_url_is_refused_fast_and_the_container_removed() -> None:
    # network "none": loopback in the container is its own, as on docker's default network;
    # nothing connects anywhere.
    run = sandbay.run_agent(
        "go",
        provider=sandbay.DockerConfig(),
        spec=SandboxSpec(network="none"),
        env={
            "ANTHROPIC_API_KEY": "k",
            "ANTHROPIC_BASE_URL": "http://127.0.0.1:9",
            **NO_MODEL_RELAY,
        },
        timeout=120,
    )
    started = time.monotonic()
    with pytest.raises(sandbay.ConfigError, match=r"network=.host.") as info:
        await collect(run)
    assert "model relay" in str(info.value)
    assert time.monotonic() - started < 30
    assert run.sandbox is not None
    assert await sandboxes_with_session("docker", run.sandbox.labels["sandbay.session"]) == []


async def test_unisolated_local_refuses_bypass_permissions_and_says_why() -> None:
    key = {"ANTHROPIC_API_KEY": "k"}
    run = sandbay.run_agent("go", provider=UNISOLATED, options=BYPASS, env=key)
    with pytest.raises(sandbay.ConfigError, match="bypassPermissions") as info:
        await collect(run)
    assert "not isolated" in str(info.value) and "as you" in str(info.value)
    assert "opt in" in str(info.value)
    assert run.sandbox is not None and run.sandbox.closed
    assert run.sandbox.id not in {s.id for s in await sandbay.get_provider(UNISOLATED).list()}
    skip = ClaudeAgentOptions(extra_args={"dangerously-skip-permissions": None})
    with pytest.raises(sandbay.ConfigError, match="bypassPermissions"):
        await collect(sandbay.run_agent("go", provider=UNISOLATED, options=skip, env=key))
    # A pool starting its CLIs that way is refused as it warms them.
    with pytest.raises(sandbay.ConfigError, match="bypassPermissions"):
        async with sandbay.SandboxPool(UNISOLATED, size=1, options=BYPASS, env=key) as pool:
            await pool.wait_ready(timeout=60)


async def test_unisolated_agent_does_not_get_is_sandbox() -> None:
    async with ScriptedModel(bash_then_done("env; echo env-listed")) as model:
        messages = await collect(
            sandbay.run_agent(
                "go", provider=UNISOLATED, options=OPTIONS, env=model.env(), timeout=120
            )
        )
        output = str(model.tool_results())
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error
    assert "env-listed" in output and "ANTHROPIC_BASE_URL=" in output
    assert "IS_SANDBOX" not in output
