"""A blocking facade over sandbay's async API, for scripts and notebooks' worker threads.

::

    import sandbay.sync

    with sandbay.sync.open_sandbox("local") as sb:
        print(sb.exec(["echo", "hi"]).text)
        sb.write_file("notes.txt", b"hello")
        assert sb.read_file("notes.txt") == b"hello"

    with sandbay.sync.run_agent("list the files", provider="docker") as run:
        for message in run:
            print(message)

Each object here runs the async API on an event loop of its own, in a thread of its own (an
anyio blocking portal), and blocks the calling thread until each call is done. The objects
keep the async API's promises: leaving a ``with`` block (normally, by ``break``, by an
exception or Ctrl-C) kills the agent and removes the sandbox before the block exits; without
``with``, call ``close()``.

**Inside a running event loop** (an ``async def``, or a Jupyter notebook, whose cells run on
the kernel's loop) every call raises `RuntimeError`: a blocking call there would stall the
loop and everything else on it. Use the async API instead (a notebook runs top-level
``await``: ``async with sandbay.open_sandbox("local") as sb: await sb.exec(...)``), or call
this facade from a worker thread (``await anyio.to_thread.run_sync(script)``,
``await asyncio.to_thread(script)``), where it works as in a script.

Errors are the async API's (`SandboxError` and its subclasses), raised in the calling thread.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.lowlevel
from anyio.from_thread import BlockingPortal, start_blocking_portal
from typing_extensions import Self

from . import _api
from ._errors import SandboxClosedError, SandboxError

if TYPE_CHECKING:
    from concurrent.futures import Future

    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from claude_agent_sdk import ClaudeAgentOptions

    from . import _agent
    from ._agent import RunTimings
    from ._config import ProviderConfig, SandbayConfig
    from ._sandbox import ExecResult, SandboxSpec
    from ._sandbox import Sandbox as AsyncSandbox

__all__ = ["AgentRun", "Sandbox", "create_sandbox", "open_sandbox", "run_agent"]

T = TypeVar("T")

_IN_LOOP = (
    "sandbay.sync cannot be called inside a running event loop ({what}): a blocking call "
    "would stall it. Use the async API there (in Jupyter, top-level `await`: "
    "`async with sandbay.open_sandbox(...) as sb`), or call sandbay.sync from a worker "
    "thread (`await anyio.to_thread.run_sync(fn)`, `await asyncio.to_thread(fn)`)"
)


def _refuse_running_loop() -> None:
    """Raise `RuntimeError` if this thread is running an event loop (asyncio or trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(_IN_LOOP.format(what="asyncio"))
    try:
        anyio.lowlevel.current_token()
    except RuntimeError:
        return
    raise RuntimeError(_IN_LOOP.format(what="anyio"))


class _Loop:
    """An event loop in a thread of its own, running one facade object's async calls."""

    def __init__(self) -> None:
        _refuse_running_loop()
        self._manager: AbstractContextManager[BlockingPortal] = start_blocking_portal()
        self.portal = self._manager.__enter__()
        self.running = True

    def call(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        _refuse_running_loop()
        return self.portal.call(fn, *args)

    def close(self) -> None:
        """Stop the loop and join its thread. Idempotent.

        Called once the object's own cleanup has run on the loop; what is left (a call a
        Ctrl-C abandoned) is cancelled rather than waited for.
        """
        if self.running:
            self.running = False
            with contextlib.suppress(RuntimeError):
                self.portal.call(self.portal.stop, True)
            self._manager.__exit__(None, None, None)


class Sandbox:
    """A sandbox with blocking methods; see `sandbay.Sandbox` for what each one does.

    Made by `create_sandbox` or `open_sandbox`. Use it as a context manager, or `close` it.
    """

    def __init__(self, sandbox: AsyncSandbox, loop: _Loop) -> None:
        self._sandbox = sandbox
        self._loop = loop

    @property
    def id(self) -> str:
        """The provider's id for this sandbox."""
        return self._sandbox.id

    @property
    def provider(self) -> str:
        """The provider's name."""
        return self._sandbox.provider

    @property
    def spec(self) -> SandboxSpec:
        """What it was provisioned with."""
        return self._sandbox.spec

    @property
    def workdir(self) -> str:
        """The working directory relative paths resolve against."""
        return self._sandbox.workdir

    @property
    def closed(self) -> bool:
        """Whether `close` was called."""
        return self._sandbox.closed

    def exec(
        self,
        argv: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        input: bytes | str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run a command to completion (`sandbay.Sandbox.exec`)."""
        return self.call(
            lambda sb: sb.exec(argv, env=env, cwd=cwd, user=user, input=input, timeout=timeout)
        )

    def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Write a file, creating parent directories (`sandbay.Sandbox.write_file`)."""
        self.call(lambda sb: sb.write_file(path, data, mode=mode))

    def read_file(self, path: str, *, max_bytes: int | None = None) -> bytes:
        """Read a whole file (`sandbay.Sandbox.read_file`)."""
        return self.call(lambda sb: sb.read_file(path, max_bytes=max_bytes))

    def call(self, fn: Callable[[AsyncSandbox], Awaitable[T]]) -> T:
        """Run ``fn(sandbox)`` on the async sandbox, in its loop, and return its result.

        For any part of the async API this facade does not wrap::

            sb.call(lambda s: s.exec("make", timeout=600))

        Raises:
            SandboxClosedError: The sandbox was closed.
        """
        if not self._loop.running:
            raise SandboxClosedError(
                "the sandbox was closed", provider=self.provider, sandbox_id=self.id
            )
        return self._loop.call(fn, self._sandbox)

    def close(self) -> None:
        """Remove the sandbox and stop its loop. Idempotent."""
        if self._loop.running:
            try:
                self._loop.call(self._sandbox.aclose)
            finally:
                self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<sandbay.sync.Sandbox {self._sandbox!r}>"


def create_sandbox(
    provider: str | ProviderConfig | SandbayConfig | None = None,
    spec: SandboxSpec | None = None,
    *,
    session: str | None = None,
) -> Sandbox:
    """Provision a sandbox; the caller must `Sandbox.close` it (prefer `open_sandbox`).

    Arguments, and errors, are those of `sandbay.create_sandbox`.

    Raises:
        RuntimeError: Called inside a running event loop (see the module's docstring).
    """
    loop = _Loop()
    try:
        sandbox = loop.call(lambda: _api.create_sandbox(provider, spec, session=session))
    except BaseException:
        loop.close()
        raise
    return Sandbox(sandbox, loop)


class open_sandbox:
    """Provision a sandbox for the body of a ``with`` block; remove it on exit.

    ``with sandbay.sync.open_sandbox("docker") as sb: sb.exec(["make"])``

    Arguments, and errors, are those of `sandbay.open_sandbox`; inside a running event loop it
    raises `RuntimeError` (see the module's docstring).
    """

    def __init__(
        self,
        provider: str | ProviderConfig | SandbayConfig | None = None,
        spec: SandboxSpec | None = None,
        *,
        session: str | None = None,
    ) -> None:
        self._args = (provider, spec, session)
        self._sandbox: Sandbox | None = None

    def __enter__(self) -> Sandbox:
        provider, spec, session = self._args
        self._sandbox = create_sandbox(provider, spec, session=session)
        return self._sandbox

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sandbox is not None:
            self._sandbox.close()


class AgentRun:
    """An agent run whose messages a plain ``for`` loop reads; see `sandbay.AgentRun`.

    Made by `run_agent`. The run starts when iteration does. Leaving the ``with`` block (or
    `close`) kills the agent and removes the sandbox the run created before it returns.
    """

    def __init__(self, run: _agent.AgentRun, loop: _Loop, *, owns_loop: bool) -> None:
        self._run = run
        self._loop = loop
        self._owns_loop = owns_loop
        self._receive: MemoryObjectReceiveStream[Any] | None = None
        self._scope: anyio.CancelScope | None = None
        self._pump: Future[None] | None = None
        self._closed = False

    @property
    def run_id(self) -> str:
        """Identifies the run inside its sandbox (for `sandbay.replay_agent`)."""
        return self._run.run_id

    @property
    def last_seq(self) -> int:
        """Sequence number of the last message received."""
        return self._run.last_seq

    @property
    def sandbox_id(self) -> str | None:
        """Id of the sandbox it runs in, once provisioned."""
        return self._run.sandbox.id if self._run.sandbox is not None else None

    @property
    def timings(self) -> RunTimings:
        """When the run reached each milestone (`sandbay.RunTimings`)."""
        return self._run.timings

    @property
    def sandbox_timings(self) -> dict[str, float]:
        """Measured inside the sandbox, reported when the run ends."""
        return self._run.sandbox_timings

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> Any:
        if self._closed:
            raise StopIteration
        if self._receive is None:
            self._start()
        assert self._receive is not None
        try:
            return self._loop.call(self._receive.receive)
        except anyio.EndOfStream:
            self._finish()
            raise StopIteration from None

    def _start(self) -> None:
        send, receive = self._loop.call(_stream)
        self._receive = receive
        self._pump, _ = self._loop.portal.start_task(self._forward, send)

    async def _forward(
        self, send: MemoryObjectSendStream[Any], *, task_status: anyio.abc.TaskStatus[None]
    ) -> None:
        # The whole run lives in this one task: the async run is entered, iterated and left
        # in the same task, whichever thread asks for its messages.
        with anyio.CancelScope() as self._scope:
            task_status.started()
            async with send, self._run:
                async for message in self._run:
                    await send.send(message)

    def _finish(self) -> None:
        """Wait for the run to end; raise its error, if it failed."""
        self._closed = True
        try:
            if self._pump is not None:
                self._pump.result()
        finally:
            self._release()

    def _release(self) -> None:
        if self._receive is not None and self._loop.running:
            self._loop.portal.call(self._receive.aclose)
        if self._owns_loop:
            self._loop.close()

    def close(self) -> None:
        """Stop the run: kill the agent and remove the sandbox the run created. Idempotent.

        An error the run raised after the last message read is not raised here: the caller
        chose to stop reading.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._pump is not None:
                if self._scope is not None:
                    self._loop.portal.call(self._scope.cancel)
                with contextlib.suppress(SandboxError):
                    self._pump.result()
        finally:
            self._release()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def _stream() -> tuple[MemoryObjectSendStream[Any], MemoryObjectReceiveStream[Any]]:
    # Unbuffered: the run reads the next message only when the caller asks for one.
    return anyio.create_memory_object_stream[Any](0)


def run_agent(
    prompt: str,
    *,
    provider: str | ProviderConfig | SandbayConfig | None = None,
    options: ClaudeAgentOptions | None = None,
    timeout: float | None = None,
    spec: SandboxSpec | None = None,
    sandbox: Sandbox | None = None,
    env: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> AgentRun:
    """Run a Claude agent in a sandbox; iterate the result for its typed messages.

    ::

        with sandbay.sync.run_agent("fix the failing test", provider="docker") as run:
            for message in run:
                print(message)

    Arguments, messages and errors are those of `sandbay.run_agent`; ``sandbox`` is a sandbox
    from this module (left open when the run ends). A pool is async only.

    Raises:
        RuntimeError: Called inside a running event loop (see the module's docstring).
    """
    from ._agent import run_agent as async_run_agent

    if sandbox is not None and not sandbox._loop.running:
        raise SandboxClosedError(
            "the sandbox was closed", provider=sandbox.provider, sandbox_id=sandbox.id
        )
    owns_loop = sandbox is None
    loop = _Loop() if sandbox is None else sandbox._loop
    try:
        run = async_run_agent(
            prompt,
            provider=provider,
            options=options,
            timeout=timeout,
            spec=spec,
            sandbox=sandbox._sandbox if sandbox is not None else None,
            env=env,
            run_id=run_id,
        )
    except BaseException:
        if owns_loop:
            loop.close()
        raise
    return AgentRun(run, loop, owns_loop=owns_loop)
