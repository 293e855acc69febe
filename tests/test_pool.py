"""The warm pool as a service uses it: opened and closed from different tasks, closed within a
bound while a provider hangs, woken by events, errors typed. Real local sandboxes throughout;
the hanging provider is a real `LocalProvider` whose create waits on the test's signal.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from typing_extensions import override

import sandbay
from sandbay import Sandbox, SandboxSpec
from sandbay._provider import Launch, managed_labels
from sandbay.providers.local import LocalProvider

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
