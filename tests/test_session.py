"""`AgentSession`: a live ``claude`` CLI in a sandbox across turns, against ScriptedModel.

Multi-turn with an interrupt and a per-turn deadline; two sessions in one sandbox kept
apart; hybrid sessions (turn 1 in sandbox A, A removed, turn 2 in a fresh sandbox B resumes
from a host-side store) with each store adapter against its real server; nothing left
running after the session.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    HookMatcher,
    InMemorySessionStore,
    Message,
    ResultMessage,
    SessionStore,
    SystemMessage,
    ToolUseBlock,
    UserMessage,
    create_sdk_mcp_server,
    project_key_for_directory,
    tool,
)

import sandbay
from sandbay import Sandbox, SandboxSpec
from sandbay._session import store_project_key
from sandbay.stores import (
    PostgresSessionStore,
    RedisSessionStore,
    S3SessionStore,
    SQLiteSessionStore,
)
from sandbay.testing import ScriptedModel, Turn
from test_pool import RecordingPool

# pytest finds fixtures by name: the store servers are those of the store tests.
from test_stores import BUCKET, postgres_dsn, redis_url, s3_endpoint  # noqa: F401
from test_transport import run_pids

pytestmark = pytest.mark.anyio

UNISOLATED = sandbay.LocalConfig(isolate=False)
CONFIGS: dict[str, sandbay.BaseProviderConfig] = {
    "local": UNISOLATED,
    "bwrap": sandbay.LocalConfig(isolate=True),
    "docker": sandbay.DockerConfig(),
}
PROVIDERS = [
    pytest.param("local", id="local"),
    pytest.param("bwrap", id="bwrap", marks=pytest.mark.bwrap),
    pytest.param("docker", id="docker", marks=pytest.mark.docker),
]
HOST_NET = SandboxSpec(network="host")
SLOW_BASH = "python3 -c 'import time; time.sleep(30)'"


def config(kind: str) -> sandbay.BaseProviderConfig:
    if kind == "bwrap" and not shutil.which("bwrap"):
        pytest.skip("bubblewrap is not installed")
    return CONFIGS[kind]


@pytest.fixture
async def sandbox(request: pytest.FixtureRequest) -> AsyncIterator[Sandbox]:
    async with sandbay.open_sandbox(config(getattr(request, "param", "local")), HOST_NET) as sb:
        yield sb


async def turn(session: sandbay.AgentSession, prompt: str) -> list[Message]:
    await session.query(prompt)
    return [m async for m in session.receive_response()]


def tool_output(model: ScriptedModel, index: int = -1) -> str:
    return str(model.tool_results()[index].get("content"))


# -- one session, many turns ---------------------------------------------------------------


@pytest.mark.parametrize("sandbox", PROVIDERS, indirect=True)
async def test_multi_turn_session_with_an_interrupt(sandbox: Sandbox) -> None:
    script = [
        Turn.text("first answer"),
        Turn.tool_use("Bash", {"command": SLOW_BASH}),
        Turn.text("third answer"),
    ]
    async with ScriptedModel(script) as model:
        options = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"], env=model.env())
        with anyio.fail_after(180):
            async with sandbay.AgentSession(sandbox=sandbox, options=options) as session:
                first = await turn(session, "one")
                assert "first answer" in str(first)
                session_id = session.session_id
                assert session_id is not None

                # A slow tool call, interrupted once the model asked for it.
                await session.query("two")
                interrupted: list[Message] = []
                with anyio.fail_after(25):  # well before the tool's 30 s
                    async for message in session.receive_response():
                        interrupted.append(message)
                        if isinstance(message, AssistantMessage) and any(
                            isinstance(b, ToolUseBlock) for b in message.content
                        ):
                            await session.interrupt()
                result = interrupted[-1]
                assert isinstance(result, ResultMessage)
                assert result.subtype == "error_during_execution"

                # The session goes on: same CLI, same conversation, a new model.
                await session.set_model("claude-session-test")
                await session.set_permission_mode("acceptEdits")
                third = await turn(session, "three")
                assert "third answer" in str(third)
                assert isinstance(third[-1], ResultMessage) and not third[-1].is_error
                assert session.session_id == session_id
        last = model.turn_requests[-1]
    assert "first answer" in json.dumps(last.messages)
    assert last.body["model"] == "claude-session-test"
    assert not sandbox.closed  # a given sandbox stays open


async def test_turn_deadline_interrupts_the_turn_and_the_session_goes_on(
    sandbox: Sandbox,
) -> None:
    script = [Turn.tool_use("Bash", {"command": SLOW_BASH}), Turn.text("next answer")]
    async with ScriptedModel(script) as model:
        options = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"], env=model.env())
        async with sandbay.AgentSession(
            sandbox=sandbox, options=options, turn_timeout=5
        ) as session:
            with anyio.fail_after(25):
                await session.query("slow")
                seen: list[Message] = []
                with pytest.raises(sandbay.SandboxTimeoutError, match="5 s deadline"):
                    async for message in session.receive_response():
                        seen.append(message)
            assert not any(isinstance(m, ResultMessage) for m in seen)
            with anyio.fail_after(60):
                after = await turn(session, "again")
            # The interrupted turn's result was read off: this turn's messages are its own.
            assert "next answer" in str(after)
            assert isinstance(after[-1], ResultMessage) and not after[-1].is_error


# -- several sessions in one sandbox --------------------------------------------------------


def _listing_script(config_dir: str) -> list[Any]:
    command = f'pwd; echo "env=$CLAUDE_CONFIG_DIR"; find {config_dir} -name "*.jsonl"'
    return [Turn.tool_use("Bash", {"command": command}), Turn.text("listed")]


@pytest.mark.parametrize("sandbox", PROVIDERS, indirect=True)
async def test_two_sessions_in_one_sandbox_are_kept_apart(sandbox: Sandbox) -> None:
    b_config = f"{sandbox.agent_dir}/sessions/b/claude"  # where B's config dir goes
    async with (
        ScriptedModel([Turn.text("a first")]) as a_model,
        ScriptedModel(_listing_script(b_config)) as b_model,
    ):
        a = sandbay.AgentSession(
            sandbox=sandbox,
            options=ClaudeAgentOptions(cwd="agent-a", max_turns=3, env=a_model.env()),
            name="a",
        )
        b = sandbay.AgentSession(
            sandbox=sandbox,
            options=ClaudeAgentOptions(
                cwd="agent-b", max_turns=3, allowed_tools=["Bash"], env=b_model.env()
            ),
            name="b",
        )
        with anyio.fail_after(180):
            async with a, b:  # both CLIs live at once
                await turn(a, "hello")
                a_id = a.session_id
                assert a_id is not None and a.config_dir is not None and a.cwd is not None
                a_transcript = (
                    f"{a.config_dir}/projects/{project_key_for_directory(a.cwd)}/{a_id}.jsonl"
                )
                assert await sandbox.exists(a_transcript)
                assert b.config_dir == b_config
                await turn(b, "list")
                b_id = b.session_id
        listing = tool_output(b_model)
    assert a.cwd == sandbox.resolve("agent-a") and b.cwd == sandbox.resolve("agent-b")
    lines = listing.replace("\\n", "\n").splitlines()
    assert b.cwd in lines[0] and "agent-a" not in lines[0]
    assert f"env={b_config}" in listing
    assert a_id not in listing and "a first" not in listing  # A's transcript is not in B's
    assert b_id is not None and b_id != a_id


# -- hybrid: a store on the host, the session across sandboxes -------------------------------

STORES = [
    "sqlite",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("s3", marks=pytest.mark.s3),
]


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    kind: str = request.param
    tag = uuid.uuid4().hex[:12]
    made: Any
    if kind == "sqlite":
        made = SQLiteSessionStore(tmp_path / "sessions.sqlite3")
    elif kind == "redis":
        made = RedisSessionStore(request.getfixturevalue("redis_url"), prefix=f"t-{tag}:")
    elif kind == "postgres":
        made = PostgresSessionStore(request.getfixturevalue("postgres_dsn"), table=f"t_{tag}")
    else:
        made = S3SessionStore(
            BUCKET,
            prefix=f"{tag}/",
            endpoint_url=request.getfixturevalue("s3_endpoint"),
            region_name="us-east-1",
            access_key_id="testing",
            secret_access_key="testing",
        )
    yield made
    await made.aclose()


async def _resume_across_sandboxes(kind: str, store: SessionStore) -> None:
    provider = config(kind)
    async with ScriptedModel([Turn.text("the word is PELICAN")]) as model:
        options = ClaudeAgentOptions(max_turns=2, env=model.env(), session_store=store)
        with anyio.fail_after(180):
            async with sandbay.AgentSession(
                provider=provider, spec=HOST_NET, options=options
            ) as first:
                assert "PELICAN" in str(await turn(first, "remember a word"))
                session_id = first.session_id
                sandbox_a = first.sandbox
    assert session_id is not None and sandbox_a is not None
    assert sandbox_a.closed  # A is gone; only the host's store holds the session
    # The store keys the session by the workdir as the spec names it, whatever the host path.
    key = project_key_for_directory("/workspace")
    stored = await store.load({"project_key": key, "session_id": session_id})
    assert stored and "PELICAN" in json.dumps(stored)

    async with ScriptedModel([Turn.text("it was PELICAN")]) as model:
        options = ClaudeAgentOptions(
            max_turns=2, env=model.env(), session_store=store, resume=session_id
        )
        with anyio.fail_after(180):
            async with sandbay.AgentSession(
                provider=provider, spec=HOST_NET, options=options
            ) as second:
                assert second.sandbox is not None and second.sandbox.id != sandbox_a.id
                answer = await turn(second, "what was the word?")
                assert second.session_id == session_id
        sent = json.dumps(model.turn_requests[-1].messages)
    # The CLI in B sent turn 1 (its prompt and the model's answer) along with turn 2.
    assert "remember a word" in sent and "the word is PELICAN" in sent
    assert "what was the word?" in sent
    assert isinstance(answer[-1], ResultMessage) and not answer[-1].is_error
    # Turn 2 was mirrored too, into the same stored session.
    stored = await store.load({"project_key": key, "session_id": session_id})
    assert stored and "it was PELICAN" in json.dumps(stored)


async def test_hybrid_session_resumes_in_a_fresh_sandbox_from_each_store(
    store: SessionStore,
) -> None:
    await _resume_across_sandboxes("local", store)


@pytest.mark.parametrize("kind", [p for p in PROVIDERS if p.id != "local"])
async def test_hybrid_session_resumes_in_a_fresh_isolated_sandbox(
    kind: str, tmp_path: Path
) -> None:
    store = SQLiteSessionStore(tmp_path / "sessions.sqlite3")
    try:
        await _resume_across_sandboxes(kind, store)
    finally:
        await store.aclose()


def test_store_keys_do_not_depend_on_the_hosts_workspace_path() -> None:
    host = "/tmp/sandbay-abc123/" + "work"  # an unisolated sandbox's workdir on the host

    class Unisolated:  # what store_project_key reads of a sandbox
        workdir = host
        spec = SandboxSpec()

    sb: Any = Unisolated()
    assert store_project_key(sb, host) == "-workspace"
    assert store_project_key(sb, f"{host}/a") == "-workspace-a"
    assert store_project_key(sb, "/srv/other") == "-srv-other"


# -- cleanup ---------------------------------------------------------------------------------


async def test_exit_stops_the_cli_and_keeps_a_given_sandbox() -> None:
    async with (
        ScriptedModel([Turn.text("hi"), Turn.text("slow", delay_s=30)]) as model,
        sandbay.open_sandbox(UNISOLATED) as sb,
    ):
        options = ClaudeAgentOptions(max_turns=2, env=model.env())
        with anyio.fail_after(60):
            async with sandbay.AgentSession(sandbox=sb, options=options, name="s1") as session:
                await turn(session, "one")
                await session.query("two")  # still running when the block ends
                assert session.transport is not None
                run_id = session.transport.run_id
                assert len(run_pids(sb, run_id)) >= 2  # the relay and the CLI
        assert run_pids(sb, run_id) == set()
        assert not sb.closed
        await session.aclose()  # idempotent


async def test_exit_removes_a_sandbox_the_session_created() -> None:
    async with ScriptedModel([Turn.text("hi")]) as model:
        options = ClaudeAgentOptions(max_turns=2, env=model.env())
        with anyio.fail_after(60):
            async with sandbay.AgentSession(provider=UNISOLATED, options=options) as session:
                await turn(session, "one")
                sb = session.sandbox
                assert sb is not None and session.transport is not None
                run_id = session.transport.run_id
                assert run_pids(sb, run_id)
    assert sb.closed
    assert sb.id not in {s.id for s in await sandbay.get_provider(UNISOLATED).list()}
    assert run_pids(sb, run_id) == set()


async def test_a_session_that_cannot_start_removes_its_sandbox() -> None:
    options = ClaudeAgentOptions(cli_path="/nonexistent/claude", env={"ANTHROPIC_API_KEY": "k"})
    session = sandbay.AgentSession(provider=UNISOLATED, options=options)
    with pytest.raises(sandbay.SandboxError), anyio.fail_after(60):
        async with session:
            await turn(session, "one")
    assert session.sandbox is not None and session.sandbox.closed


async def test_arguments_are_checked() -> None:
    async with sandbay.open_sandbox(UNISOLATED) as sb:
        with pytest.raises(sandbay.ConfigError, match="not both"):
            sandbay.AgentSession(sandbox=sb, provider="local")
    with pytest.raises(sandbay.ConfigError, match="name"):
        sandbay.AgentSession(provider="local", name="../x")
    with pytest.raises(sandbay.ConfigError, match="turn_timeout"):
        sandbay.AgentSession(provider="local", turn_timeout=0)
    with pytest.raises(sandbay.SandboxError, match="not running"):
        await sandbay.AgentSession(provider="local").query("x")


# -- sessions from a warm pool ---------------------------------------------------------------


@pytest.mark.parametrize("kind", PROVIDERS)
async def test_a_session_from_a_pool_starts_with_its_cli_running(kind: str) -> None:
    async with ScriptedModel([Turn.text("warm answer"), Turn.text("second answer")]) as model:
        options = ClaudeAgentOptions(max_turns=3, env=model.env())
        with anyio.fail_after(240):
            provider: Any = config(kind)
            async with RecordingPool(
                provider, HOST_NET, size=1, options=options, env=model.env()
            ) as pool:
                await pool.wait_ready(timeout=180)
                async with sandbay.AgentSession(pool=pool) as session:
                    [taken] = pool.taken
                    # Before the session took it, the relay had reported the CLI started
                    # and the CLI had answered the SDK's initialize handshake.
                    assert taken.cli_pid is not None and taken.initialized
                    assert "warm answer" in str(await turn(session, "one"))
                    # The turn ran on that CLI, over that handshake: none in the take.
                    transport = session.transport
                    assert transport is not None and transport is taken.lease.transport
                    assert transport.cli_pid == taken.cli_pid
                    assert session.client is not None
                    assert session.client._query is taken.lease.query
                    info = await session.client.get_server_info()
                    assert info is not None and "commands" in info
                    second = await turn(session, "two")
                    assert "second answer" in str(second)
                    assert isinstance(second[-1], ResultMessage) and not second[-1].is_error
                    # The pool refills behind the session it handed out.
                    await pool.wait_ready(timeout=180)
                    assert pool.stats["provisioned"] == 2
                sandbox = session.sandbox
                assert sandbox is not None and sandbox.closed  # the session owned it
        assert "warm answer" in json.dumps(model.turn_requests[-1].messages)


def _hook(seen: list[str], tag: str) -> Any:
    async def hook(data: Any, tool_use_id: str | None, context: Any) -> Any:
        seen.append(f"{tag}:{data.get('tool_name')}")
        return {}

    return hook


@pytest.mark.parametrize("kind", PROVIDERS)
@pytest.mark.parametrize("shape", ["same", "other", "pool's"])
async def test_a_session_from_a_pool_runs_its_own_callbacks(kind: str, shape: str) -> None:
    seen: list[str] = []
    script = [Turn.tool_use("Bash", {"command": "echo from-bash"}), Turn.text("done")]
    async with ScriptedModel(script) as model:
        data: dict[str, Any] = {"max_turns": 3, "allowed_tools": ["Bash"], "env": model.env()}
        pool_options = ClaudeAgentOptions(
            **data, hooks={"PreToolUse": [HookMatcher(hooks=[_hook(seen, "pool")])]}
        )
        if shape == "same":  # the pool's handshake, the session's callable in its place
            options: ClaudeAgentOptions | None = ClaudeAgentOptions(
                **data, hooks={"PreToolUse": [HookMatcher(hooks=[_hook(seen, "mine")])]}
            )
        elif shape == "other":  # a second hook: the CLI is started anew for it
            hooks = [_hook(seen, "mine"), _hook(seen, "mine-too")]
            options = ClaudeAgentOptions(**data, hooks={"PreToolUse": [HookMatcher(hooks=hooks)]})
        else:
            options = None
        with anyio.fail_after(180):
            provider: Any = config(kind)
            async with RecordingPool(
                provider, HOST_NET, size=1, options=pool_options, env=model.env()
            ) as pool:
                await pool.wait_ready(timeout=120)
                async with sandbay.AgentSession(pool=pool, options=options) as session:
                    [taken] = pool.taken
                    messages = await turn(session, "go")
                    assert session.transport is not None
                    restarted = session.transport is not taken.lease.transport
        assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error
    assert "from-bash" in tool_output(model, 0)
    if shape == "same":
        assert seen == ["mine:Bash"] and not restarted
    elif shape == "other":
        assert seen == ["mine:Bash", "mine-too:Bash"] and restarted
    else:
        assert seen == ["pool:Bash"] and not restarted


async def test_closing_the_pool_leaves_a_session_it_handed_out_working() -> None:
    script = [Turn.text("after the pool closed")]
    async with ScriptedModel(script) as model:
        options = ClaudeAgentOptions(max_turns=3, env=model.env())
        with anyio.fail_after(180):
            pool = sandbay.SandboxPool(UNISOLATED, size=2, options=options, env=model.env())
            async with pool:
                await pool.wait_ready(timeout=120)
                session = sandbay.AgentSession(pool=pool)
                await session.__aenter__()
            try:
                # Closing the pool removed what it held, not what it handed out.
                assert pool.closed and session.sandbox is not None
                assert not session.sandbox.closed
                assert "after the pool closed" in str(await turn(session, "go on"))
                transport = session.transport
                assert transport is not None and run_pids(session.sandbox, transport.run_id)
            finally:
                await session.aclose()
    assert session.sandbox.closed
    assert run_pids(session.sandbox, transport.run_id) == set()
    live = {s.id for s in await sandbay.get_provider("local").list()}
    assert session.sandbox.id not in live


async def test_a_session_from_a_pool_refuses_other_data_and_a_store_resume() -> None:
    async with sandbay.SandboxPool(
        UNISOLATED, size=1, options=ClaudeAgentOptions(max_turns=3), env={"ANTHROPIC_API_KEY": "x"}
    ) as pool:
        with pytest.raises(sandbay.ConfigError, match="other options"):
            sandbay.AgentSession(pool=pool, options=ClaudeAgentOptions(max_turns=9))
        with pytest.raises(sandbay.ConfigError, match="give pool, or sandbox"):
            sandbay.AgentSession(pool=pool, provider="local")


# -- what ClaudeSDKClient offers ----------------------------------------------------------------


def test_every_public_method_of_the_sdk_client_has_its_session_counterpart() -> None:
    # Entering and leaving the session's block are the client's connect and disconnect.
    methods = {
        name
        for name, value in vars(ClaudeSDKClient).items()
        if not name.startswith("_") and callable(value)
    }
    missing = methods - {"connect", "disconnect"} - set(dir(sandbay.AgentSession))
    assert not missing, f"AgentSession lacks {sorted(missing)}: forward them, with a test"


@tool("add", "Add two numbers", {"a": int, "b": int})
async def add(args: dict[str, Any]) -> dict[str, Any]:
    return {"content": [{"type": "text", "text": f"sum={args['a'] + args['b']}"}]}


@pytest.mark.parametrize("sandbox", PROVIDERS[:2], indirect=True)
async def test_the_sdk_clients_controls_reach_the_cli_in_the_sandbox(sandbox: Sandbox) -> None:
    background = {"command": SLOW_BASH.replace("30", "120"), "run_in_background": True}
    script = [
        Turn.tool_use("Write", {"file_path": "made.txt", "content": "x"}),
        Turn.text("written"),
        Turn.tool_use("Bash", background),
        Turn.text("started"),
    ]
    async with ScriptedModel(script) as model:
        options = ClaudeAgentOptions(
            max_turns=4,
            allowed_tools=["Write", "Bash"],
            env=model.env(),
            mcp_servers={"host": create_sdk_mcp_server("host", tools=[add])},
            enable_file_checkpointing=True,
            extra_args={"replay-user-messages": None},
        )
        with anyio.fail_after(180):
            async with sandbay.AgentSession(sandbox=sandbox, options=options) as session:
                info = await session.get_server_info()
                assert info is not None and info["commands"]

                await session.toggle_mcp_server("host", False)
                [host] = (await session.get_mcp_status())["mcpServers"]
                assert host["name"] == "host" and host["status"] == "disabled"
                await session.toggle_mcp_server("host", True)
                [host] = (await session.get_mcp_status())["mcpServers"]
                assert host["status"] == "connected"
                # The CLI reconnects only servers it runs itself; its refusal comes back.
                with pytest.raises(Exception) as refused:
                    await session.reconnect_mcp_server("host")
                assert not isinstance(refused.value, sandbay.SandboxError)

                await session.query("write")
                replayed = [
                    m.uuid
                    async for m in session.receive_response()
                    if isinstance(m, UserMessage) and m.uuid
                ]
                assert await sandbox.exists("made.txt")
                await session.rewind_files(replayed[0])  # the prompt, before the write
                assert not await sandbox.exists("made.txt")

                usage = await session.get_context_usage()
                assert usage["categories"]

                await session.query("background")
                started = [
                    m
                    async for m in session.receive_response()
                    if isinstance(m, SystemMessage) and m.subtype == "task_started"
                ]
                task_id = started[0].data["task_id"]
                await session.stop_task(task_id)
                async for message in session.receive_messages():
                    if (
                        isinstance(message, SystemMessage)
                        and message.subtype == "task_updated"
                        and message.data.get("task_id") == task_id
                        and message.data.get("patch", {}).get("status") == "killed"
                    ):
                        break


@pytest.mark.parametrize("kind", ["local", pytest.param("bwrap", marks=pytest.mark.bwrap)])
async def test_a_session_from_a_pool_mirrors_to_its_own_store_under_the_specs_project(
    kind: str,
) -> None:
    pools_store, mine = InMemorySessionStore(), InMemorySessionStore()
    async with ScriptedModel([Turn.text("kept in my store")]) as model:
        data: dict[str, Any] = {"max_turns": 2, "env": model.env()}
        provider: Any = config(kind)
        with anyio.fail_after(180):
            async with RecordingPool(
                provider,
                HOST_NET,
                size=1,
                options=ClaudeAgentOptions(**data, session_store=pools_store),
                env=model.env(),
            ) as pool:
                await pool.wait_ready(timeout=120)
                options = ClaudeAgentOptions(**data, session_store=mine)
                async with sandbay.AgentSession(pool=pool, options=options) as session:
                    await turn(session, "remember")
                    [taken] = pool.taken
                    assert session.transport is taken.lease.transport  # no CLI started anew
                    session_id = session.session_id
    assert session_id is not None
    # Under the working directory as the spec names it, whichever folder the sandbox uses.
    assert [s["session_id"] for s in await mine.list_sessions("-workspace")] == [session_id]
    entries = await mine.load({"project_key": "-workspace", "session_id": session_id})
    assert entries and "kept in my store" in json.dumps(entries)
    assert await pools_store.list_sessions("-workspace") == []
