"""The warm pool as a service uses it: opened and closed from different tasks, closed within a
bound while a provider hangs, woken by events, errors typed. Real local sandboxes throughout;
the hanging provider is a real `LocalProvider` whose create waits on the test's signal.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from claude_agent_sdk import (
    ClaudeAgentOptions,
    HookMatcher,
    InMemorySessionStore,
    ResultMessage,
    SessionKey,
    SessionStoreEntry,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from typing_extensions import override

import sandbay
from sandbay import Sandbox, SandboxSpec
from sandbay._agent import Lease
from sandbay._provider import Launch, managed_labels
from sandbay.providers.local import LocalProvider
from sandbay.testing import ScriptedModel, Turn

pytestmark = pytest.mark.anyio


async def live_ids() -> set[str]:
    return {s.id for s in await sandbay.get_provider("local").list()}


class HangingProvider(LocalProvider):
    """Local sandboxes whose create, after the first ``fast`` ones, waits for ``release``.

    The wait is shielded, as a blocking SDK call in a worker thread is: cancelling the caller
    does not end it.
    """

    def __init__(self, *, fast: int = 0) -> None:
        super().__init__(sandbay.LocalConfig())
        self.fast = fast
        self.release = anyio.Event()
        self.hanging = anyio.Event()
        self.made: list[str] = []

    @override
    async def create(self, spec: SandboxSpec) -> Sandbox:
        if self.fast > 0:
            self.fast -= 1
        else:
            self.hanging.set()
            with anyio.CancelScope(shield=True):
                await self.release.wait()
                sandbox = await super().create(spec)
                self.made.append(sandbox.id)
                return sandbox
        sandbox = await super().create(spec)
        self.made.append(sandbox.id)
        return sandbox


class RecordingProvider(LocalProvider):
    """Local sandboxes, the ids of those made noted (other tests may run beside these)."""

    made: list[str]

    @override
    async def create(self, spec: SandboxSpec) -> Sandbox:
        sandbox = await super().create(spec)
        self.made = [*getattr(self, "made", []), sandbox.id]
        return sandbox


class GatedProvider(LocalProvider):
    """Local sandboxes whose create waits (cancellably) until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__(sandbay.LocalConfig())
        self.gate = anyio.Event()

    @override
    async def create(self, spec: SandboxSpec) -> Sandbox:
        await self.gate.wait()
        return await super().create(spec)


async def test_close_is_bounded_while_a_provision_hangs() -> None:
    provider = HangingProvider(fast=1)
    pool = sandbay.SandboxPool(provider, size=2, concurrency=2, close_timeout=1.0)
    await pool.start()
    await pool.wait_ready(1, timeout=60)
    with anyio.fail_after(10):
        await provider.hanging.wait()
    ready_id = next(iter(provider.made))
    started = time.monotonic()
    await pool.aclose()
    took = time.monotonic() - started
    assert took < 3.0, f"aclose took {took:.1f} s with close_timeout=1"
    assert ready_id not in await live_ids(), "the ready sandbox was not destroyed"
    # The straggler returns later: what it made is destroyed, not handed out or leaked.
    provider.release.set()
    await pool.aclose()  # waits again, bounded, for the background work to end
    assert len(provider.made) == 2
    assert not set(provider.made) & await live_ids()
    with pytest.raises(sandbay.SandboxClosedError):
        await pool.acquire()


@pytest.mark.parametrize("opener", ["start", "async_with"])
async def test_a_pool_opened_in_one_task_is_closed_from_another(opener: str) -> None:
    pool = sandbay.SandboxPool("local", size=1)

    async def startup_hook() -> None:
        if opener == "start":
            await pool.start()
        else:
            await pool.__aenter__()

    leased: list[str] = []

    async def shutdown_hook() -> None:
        lease = await pool.acquire(timeout=60)
        leased.append(lease.sandbox.id)
        await lease.sandbox.aclose()
        await pool.wait_ready(timeout=60)  # the replacement
        await pool.aclose()

    async with anyio.create_task_group() as tg:
        tg.start_soon(startup_hook)  # this task ends once the pool is started
    async with anyio.create_task_group() as tg:
        tg.start_soon(shutdown_hook)
    assert pool.closed and pool.stats["provisioned"] == 2
    assert not set(leased) & await live_ids()
    assert pool.ready == 0


async def asgi_get(app: Starlette) -> tuple[int, str]:
    """One GET / through the ASGI interface, in a task of its own, as a server serves it."""
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"app")],
        "server": ("app", 80),
        "client": ("127.0.0.1", 1),
    }
    async with anyio.create_task_group() as tg:
        tg.start_soon(app, scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return int(start["status"]), body.decode()


async def test_a_starlette_lifespan_opens_the_pool_and_requests_use_it() -> None:
    pool = sandbay.SandboxPool("local", size=1, close_timeout=5.0)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await pool.start()
        yield
        await pool.aclose()

    async def handler(request: Request) -> PlainTextResponse:
        lease = await pool.acquire(timeout=60)
        async with lease.sandbox:
            await lease.kill()
            result = await lease.sandbox.exec(["echo", "served"])
        return PlainTextResponse(result.stdout.decode().strip() + f" {lease.sandbox.id}")

    app = Starlette(routes=[Route("/", handler)], lifespan=lifespan)

    # The server's side of the ASGI lifespan protocol, as uvicorn runs it: the app's
    # lifespan in a task of its own, requests in others.
    to_app, app_receives = anyio.create_memory_object_stream[dict[str, Any]](4)
    app_sends, from_app = anyio.create_memory_object_stream[MutableMapping[str, Any]](4)

    async def receive() -> dict[str, Any]:
        return await app_receives.receive()

    async def send(message: MutableMapping[str, Any]) -> None:
        await app_sends.send(message)

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    async with to_app, app_receives, app_sends, from_app, anyio.create_task_group() as tg:
        tg.start_soon(app, scope, receive, send)
        await to_app.send({"type": "lifespan.startup"})
        assert (await from_app.receive())["type"] == "lifespan.startup.complete"
        status, body = await asgi_get(app)
        assert status == 200 and body.startswith("served ")
        served_id = body.split()[1]
        started = time.monotonic()
        await to_app.send({"type": "lifespan.shutdown"})
        assert (await from_app.receive())["type"] == "lifespan.shutdown.complete"
        assert time.monotonic() - started < 5.0 + 2.0
    assert pool.closed
    assert served_id not in await live_ids()


async def watch(pool: sandbay.SandboxPool, seen: list[float]) -> None:
    """Note (to the millisecond) when the pool first provisions a sandbox."""
    while pool.stats["provisioned"] == 0:  # noqa: ASYNC110 - a watcher, timing the pool
        await anyio.sleep(0.001)
    seen.append(time.monotonic())


@pytest.mark.parametrize("call", ["acquire", "wait_ready"])
async def test_waiters_wake_as_soon_as_a_sandbox_is_ready(call: str) -> None:
    provider = GatedProvider()
    async with sandbay.SandboxPool(provider, size=1) as pool:
        woke: list[float] = []
        ready_at: list[float] = []

        async def take() -> None:
            if call == "acquire":
                lease = await pool.acquire(timeout=60)
                woke.append(time.monotonic())
                await lease.kill()
                await lease.sandbox.aclose()
            else:
                await pool.wait_ready(timeout=60)
                woke.append(time.monotonic())

        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            await anyio.sleep(0.1)  # the waiter is waiting; nothing can be ready yet
            assert pool.ready == 0 and not woke
            tg.start_soon(watch, pool, ready_at)
            provider.gate.set()
        lag = woke[0] - ready_at[0]
        assert lag < 0.05, f"{call} woke {lag:.3f} s after the sandbox was ready"


class FailingWhenOpened(GatedProvider):
    """Create fails with a `ConfigError` once the gate opens."""

    @override
    async def create(self, spec: SandboxSpec) -> Sandbox:
        await self.gate.wait()
        raise sandbay.ConfigError("this spec cannot be had")


@pytest.mark.parametrize("attempt", range(3))
async def test_acquire_sees_a_provisioning_failure_at_once(attempt: int) -> None:
    # A poll of every 0.5 s would see it 0.25 s late on average, and late in most attempts.
    provider = FailingWhenOpened()
    async with sandbay.SandboxPool(provider, size=1) as pool:
        raised: list[float] = []

        async def take() -> None:
            with pytest.raises(sandbay.ConfigError, match="cannot be had"):
                await pool.acquire(timeout=60)
            raised.append(time.monotonic())

        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            await anyio.sleep(0.1 + attempt * 0.13)
            opened = time.monotonic()
            provider.gate.set()
        assert raised[0] - opened < 0.05, f"acquire raised {raised[0] - opened:.3f} s late"


async def test_acquire_in_a_closing_pool_raises_closed_at_once() -> None:
    provider = GatedProvider()  # nothing ever becomes ready
    pool = await sandbay.SandboxPool(provider, size=1).start()
    errors: list[BaseException] = []

    async def take() -> None:
        try:
            await pool.acquire()
        except sandbay.SandboxClosedError as exc:
            errors.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(take)
            await anyio.sleep(0.1)
            await pool.aclose()
    assert len(errors) == 1


@pytest.mark.parametrize("call", ["wait_ready", "acquire"])
async def test_provisioning_errors_keep_their_type_across_tasks(call: str) -> None:
    config = sandbay.LocalConfig(python="/nonexistent/python3")
    pool = await sandbay.SandboxPool(config, size=1).start()
    try:
        with pytest.raises(sandbay.AgentError, match="ready") as info:
            if call == "wait_ready":
                await pool.wait_ready(timeout=60)
            else:
                await pool.acquire(timeout=60)
        assert type(info.value) is sandbay.AgentError
        assert "/nonexistent/python3" in str(info.value)
    finally:
        await pool.aclose()


async def test_a_bug_in_provisioning_reaches_the_caller_as_a_sandbox_error() -> None:
    class Broken(LocalProvider):
        @override
        async def create(self, spec: SandboxSpec) -> Sandbox:
            raise ZeroDivisionError("a provider bug")

    async with sandbay.SandboxPool(Broken(sandbay.LocalConfig()), size=1) as pool:
        with pytest.raises(sandbay.SandboxError, match="a provider bug") as info:
            await pool.acquire(timeout=60)
        assert isinstance(info.value.__cause__, ZeroDivisionError)
        with pytest.raises(sandbay.SandboxError):  # it retried, and failed again
            await pool.acquire(timeout=60)


def test_a_pool_can_be_made_outside_an_event_loop() -> None:
    pool = sandbay.SandboxPool("local", size=1)  # at import time of a service module
    assert pool.ready == 0 and not pool.closed
    with pytest.raises(sandbay.ConfigError, match="close_timeout"):
        sandbay.SandboxPool("local", close_timeout=0)


# -- starting a process as part of creating the sandbox ------------------------------------


@pytest.mark.parametrize("provider", ["local", pytest.param("docker", marks=pytest.mark.docker)])
async def test_create_with_process_writes_the_files_then_starts_with_stdin_intact(
    provider: str,
) -> None:
    chosen = sandbay.get_provider(provider)
    payload = bytes(range(256)) * 300  # larger than a pipe's buffer, every byte value

    def launch(sandbox: Sandbox) -> Launch:
        path = f"{sandbox.agent_dir}/sub/payload.bin"
        script = f"wc -c < {path}; read line; echo got $line"
        return Launch(argv=["sh", "-c", script], files={path: payload})

    spec = SandboxSpec(labels={}).model_copy(update={"labels": managed_labels(SandboxSpec())})
    sandbox, proc = await chosen.create_with_process(spec, launch)
    async with sandbox:
        await proc.write(b"hello\n")
        out = await proc.stdout.read()
        assert await proc.wait() == 0
        assert out.split() == [str(len(payload)).encode(), b"got", b"hello"]
        path = f"{sandbox.agent_dir}/sub/payload.bin"
        assert await sandbox.read_file(path) == payload


@pytest.mark.docker
async def test_a_cold_docker_run_starts_its_entrypoint_with_the_sandbox() -> None:
    from sandbay.testing import ScriptedModel, Turn

    async with ScriptedModel([Turn.text("cold done")]) as model:
        run = sandbay.run_agent(
            "go",
            provider="docker",
            env=model.env(),
            spec=SandboxSpec(network="host"),
            timeout=120,
        )
        async with run:
            messages = [m async for m in run]
    assert type(messages[-1]).__name__ == "ResultMessage"
    assert run.sandbox is not None and run.sandbox.closed


# -- the SDK's handshake done ahead of time ------------------------------------------------------


@dataclasses.dataclass
class Taken:
    """What was already done in a lease when the pool handed it out."""

    lease: Lease
    cli_pid: int | None
    initialized: bool


class RecordingPool(sandbay.SandboxPool):
    """A real pool that notes, as it hands each lease out, what was done in it already."""

    taken: list[Taken]

    @override
    async def acquire(self, *, timeout: float | None = None) -> Lease:
        lease = await super().acquire(timeout=timeout)
        self.taken = [
            *getattr(self, "taken", []),
            Taken(
                lease,
                lease.transport.cli_pid if lease.transport is not None else None,
                lease.query is not None and lease.query._initialization_result is not None,
            ),
        ]
        return lease


def _hook(seen: list[str], tag: str) -> Any:
    async def hook(data: Any, tool_use_id: str | None, context: Any) -> Any:
        seen.append(f"{tag}:{data.get('tool_name')}")
        return {}

    return hook


class _Store(InMemorySessionStore):
    def __init__(self) -> None:
        super().__init__()
        self.appended = 0

    @override
    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        self.appended += len(entries)
        await super().append(key, entries)


@pytest.mark.parametrize("shape", ["same", "other", "other, at take", "store", "pool's"])
async def test_a_run_from_a_pool_runs_its_own_callbacks_never_the_pools(shape: str) -> None:
    # The pool's CLI once ran every run with the pool's callbacks: the run's own hooks and
    # session store were dropped without a word.
    seen: list[str] = []
    store = _Store()
    script = [Turn.tool_use("Bash", {"command": "echo from-bash"}), Turn.text("done")]
    async with ScriptedModel(script) as model:
        data: dict[str, Any] = {"max_turns": 3, "allowed_tools": ["Bash"]}
        pool_options = ClaudeAgentOptions(
            **data, hooks={"PreToolUse": [HookMatcher(hooks=[_hook(seen, "pool")])]}
        )
        options: ClaudeAgentOptions | None = None
        if shape == "same":  # the pool's handshake, the run's callable in its place
            options = ClaudeAgentOptions(
                **data, hooks={"PreToolUse": [HookMatcher(hooks=[_hook(seen, "mine")])]}
            )
        elif shape.startswith("other"):  # two hooks where the pool registered one
            hooks = [_hook(seen, "mine"), _hook(seen, "mine-too")]
            options = ClaudeAgentOptions(**data, hooks={"PreToolUse": [HookMatcher(hooks=hooks)]})
        elif shape == "store":  # the CLI must mirror its transcript: a new CLI
            options = ClaudeAgentOptions(
                **data,
                hooks={"PreToolUse": [HookMatcher(hooks=[_hook(seen, "mine")])]},
                session_store=store,
            )
        with anyio.fail_after(180):
            async with RecordingPool(
                "local",
                size=1,
                options=pool_options,
                env=model.env(),
                initialize=shape != "other, at take",
            ) as pool:
                await pool.wait_ready(timeout=120)
                run = sandbay.run_agent("go", pool=pool, options=options)
                async with run:
                    messages = [m async for m in run]
                [taken] = pool.taken
        restarted = run.run_id != taken.lease.transport.run_id if taken.lease.transport else True
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error
    assert "from-bash" in str(model.tool_results()[0].get("content"))
    assert taken.initialized is (shape != "other, at take")
    if shape == "same":
        assert seen == ["mine:Bash"] and not restarted
    elif shape == "other":  # the pool's handshake cannot take them: a new CLI
        assert seen == ["mine:Bash", "mine-too:Bash"] and restarted
    elif shape == "other, at take":  # the pool's warm CLI, the handshake in the run
        assert seen == ["mine:Bash", "mine-too:Bash"] and not restarted
    elif shape == "store":
        assert seen == ["mine:Bash"] and restarted and store.appended > 0
    else:
        assert seen == ["pool:Bash"] and not restarted


async def test_a_pooled_run_starts_no_cli_and_does_no_handshake() -> None:
    async with ScriptedModel([Turn.text("warm")] * 2) as model:
        options = ClaudeAgentOptions(max_turns=2)
        for initialize in (True, False):
            async with RecordingPool(
                "local", size=1, options=options, env=model.env(), initialize=initialize
            ) as pool:
                await pool.wait_ready(timeout=120)
                run = sandbay.run_agent("go", pool=pool)
                async with run:
                    messages = [m async for m in run]
                [taken] = pool.taken
            assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error
            # The relay had reported the CLI started before the run took the sandbox; the
            # run went on over that CLI (its run), with the handshake done or not.
            assert taken.cli_pid is not None
            assert taken.lease.transport is not None
            assert run.run_id == taken.lease.transport.run_id
            assert taken.initialized is initialize
            assert (taken.lease.query is not None) is initialize


FAKE_CLI = """\
import os, sys
sys.stderr.write(f"fake-cli pid={os.getpid()}\\n")
sys.stderr.flush()
for line in sys.stdin:
    if '"initialize"' in line:
        sys.stderr.write("fake-cli got initialize\\n")
        sys.stderr.flush()
        # and never answers it
sys.stdin.read()
"""


async def test_closing_a_pool_in_the_middle_of_a_handshake_leaves_nothing(
    tmp_path: Path,
) -> None:
    cli = tmp_path / "fake-claude"
    cli.write_text(f"#!{sys.executable}\n{FAKE_CLI}")
    cli.chmod(0o755)
    lines: list[str] = []
    asked = anyio.Event()

    def on_stderr(line: str) -> None:
        lines.append(line)
        if "got initialize" in line:
            asked.set()

    options = ClaudeAgentOptions(cli_path=str(cli), stderr=on_stderr)
    provider = RecordingProvider(sandbay.LocalConfig(isolate=False))  # the CLI is the host's
    with anyio.fail_after(60):
        async with sandbay.SandboxPool(
            provider,
            size=1,
            options=options,
            env={"ANTHROPIC_API_KEY": "unused"},
        ) as pool:
            await asked.wait()  # the pool waits for the CLI's answer to its initialize
            assert pool.ready == 0
    pids = [int(line.split("pid=")[1]) for line in lines if "pid=" in line]
    assert pids
    assert all(_gone(pid) for pid in pids)
    assert provider.made and not set(provider.made) & await live_ids()


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
