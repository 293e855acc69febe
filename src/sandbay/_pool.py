"""A warm pool: sandboxes provisioned ahead of time, the relay and the CLI already started.

`SandboxPool` keeps ``size`` sandboxes ready, sandbay's relay uploaded into each. When the
pool was given agent ``options``, each also has the relay and the ``claude`` CLI started
with them and (unless ``initialize=False``) the Agent SDK's initialize handshake done, the
CLI waiting for its first user message. `run_agent(..., pool=pool)` and
`AgentSession(pool=pool)` take one and so skip provisioning, upload and (with options) the
CLI's start-up and the handshake. The handshake registers hook callbacks by id; a run whose
callbacks have the same shape as the pool's (`sandbay._query.handshake_shape`) gets its own
callbacks put in their places, and one whose callbacks differ gets a CLI started anew in the
warm sandbox (the handshake then happens in the run): a run's callbacks are never dropped
for the pool's. A sandbox is used once: the run destroys it, and the pool provisions a
replacement in the background.

The pool's background work (provisioning, discarding) runs in a task group owned by one
runner task, not by the caller's task, so a service may open the pool in its startup hook
and close it in its shutdown hook, whichever tasks those run in. Everything that waits
(`SandboxPool.acquire`, `SandboxPool.wait_ready`, closing) wakes on events the pool sets
when its state changes; nothing polls.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import shlex
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from types import TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus
from claude_agent_sdk import ClaudeAgentOptions
from claude_agent_sdk.types import _configure_can_use_tool
from typing_extensions import Self

from ._agent import (
    Lease,
    _exit_code,
    agent_env,
    options_to_wire,
    provision_sandbox,
)
from ._config import BaseProviderConfig, ProviderConfig, SandbayConfig
from ._errors import (
    AgentError,
    ConfigError,
    SandboxClosedError,
    SandboxError,
    SandboxTimeoutError,
)
from ._provider import Provider
from ._query import make_query
from ._sandbox import CLOSE_TIMEOUT, Sandbox, SandboxSpec

__all__ = ["Lease", "SandboxPool"]

logger = logging.getLogger("sandbay")

#: Seconds one sandbox may take to provision and warm before the attempt is abandoned.
PROVISION_TIMEOUT = 300.0
#: A pooled sandbox this close to its expiry (at most a quarter of its lifetime) is replaced
#: instead of handed out.
EXPIRY_MARGIN_S = 120.0
#: Default bound, in seconds, on `SandboxPool.aclose`: well under the 30 s a Kubernetes pod
#: gets between SIGTERM and SIGKILL, with room for the rest of a service's shutdown.
CLOSE_TIMEOUT_S = 10.0


class SandboxPool:
    """Keeps ``size`` sandboxes provisioned with the relay (and CLI) started, for instant runs.

    Use it as an async context manager; closing drains it (every pooled sandbox is
    destroyed, provisioning in flight is cancelled and what it made destroyed)::

        async with sandbay.SandboxPool("docker", size=2, options=opts, env=model.env()) as pool:
            async with sandbay.run_agent("...", pool=pool) as run:
                async for message in run:
                    ...

    In a service, open it in the startup hook and close it in the shutdown hook; they may
    run in different tasks::

        pool = sandbay.SandboxPool("docker", size=4, options=opts)

        async def startup() -> None:
            await pool.start()

        async def shutdown() -> None:
            await pool.aclose()  # returns within close_timeout

    The pool's background work runs in a runner task of its own (or, with
    ``start(task_group=tg)``, in a task of ``tg``), never in the task that called `start`.

    Args:
        provider: Provider name or config, or a `Provider` to use as it is; ``None`` reads
            the config file / environment.
        spec: What to provision.
        size: How many ready sandboxes to keep.
        concurrency: Most sandboxes provisioned at once.
        options: Agent options to start the ``claude`` CLI with ahead of time, callbacks
            included (they run in this process). Runs taking from this pool use these
            options' data (``run_agent`` and ``AgentSession`` refuse different data); with
            ``options=None`` they use the pool's callbacks too, otherwise their own.
        env: Agent environment (model endpoint, keys) for the pre-started CLI.
        initialize: Do the Agent SDK's initialize handshake ahead of time too (with
            ``options``). Turn it off when runs bring callbacks of another shape than the
            pool's: each would otherwise get a CLI started anew.
        close_timeout: Longest `aclose` waits for the pool's background work, in seconds.
            What is still running then (a provider that does not answer) is left to finish
            on its own; a sandbox it leaves behind carries its expiry label, by which
            ``sandbay gc`` removes it.

    Raises:
        ConfigError: ``size``, ``concurrency`` or ``close_timeout`` out of range, or
            ``options`` that cannot cross into a sandbox.
    """

    def __init__(
        self,
        provider: str | ProviderConfig | SandbayConfig | Provider | None = None,
        spec: SandboxSpec | None = None,
        *,
        size: int = 2,
        concurrency: int = 2,
        options: ClaudeAgentOptions | None = None,
        env: Mapping[str, str] | None = None,
        initialize: bool = True,
        close_timeout: float = CLOSE_TIMEOUT_S,
    ) -> None:
        if size < 1:
            raise ConfigError(f"pool size must be at least 1, got {size}")
        if concurrency < 1:
            raise ConfigError(f"pool concurrency must be at least 1, got {concurrency}")
        if not (isinstance(close_timeout, (int, float)) and 0 < close_timeout < math.inf):
            raise ConfigError(
                f"pool close_timeout must be a positive, finite number of seconds, "
                f"got {close_timeout!r}"
            )
        self.size = size
        self.close_timeout = float(close_timeout)
        self._provider = provider
        self._spec = spec
        self._options = options
        self._initialize = initialize
        self._wire_options = options_to_wire(options) if options is not None else None
        self._env = agent_env(env)
        self._concurrency = concurrency
        self._ready: collections.deque[Lease] = collections.deque()
        self._failures: list[Exception] = []
        self._started = False
        self._closed = False
        # Made by `start`, inside the event loop (anyio's primitives belong to one).
        self._limiter: anyio.CapacityLimiter | None = None
        self._changed: anyio.Event | None = None
        self._stop: anyio.Event | None = None
        self._stopped: anyio.Event | None = None
        self._tg: TaskGroup | None = None
        self._runner: object = None  # the runner task, held so it is not collected
        #: Counters for reports: provisioned, handed out, failed.
        self.stats = {"provisioned": 0, "acquired": 0, "failed": 0}

    @property
    def provider(self) -> str | BaseProviderConfig | SandbayConfig | Provider | None:
        """The provider the pool's sandboxes come from, as it was given to the pool."""
        return self._provider

    @property
    def agent_env(self) -> Mapping[str, str]:
        """The agent environment the pool's CLIs are started with (``env`` and forwarded)."""
        return self._env

    @property
    def options(self) -> ClaudeAgentOptions | None:
        """The agent options the pool's CLIs were started with, if any."""
        return self._options

    @property
    def ready(self) -> int:
        """How many sandboxes are ready to hand out now."""
        return len(self._ready)

    @property
    def closed(self) -> bool:
        """Whether `aclose` has been called."""
        return self._closed

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self, *, task_group: TaskGroup | None = None) -> Self:
        """Start provisioning in the background and return at once.

        May be called from any task; `aclose` may then be called from any other.

        Args:
            task_group: Run the pool's background work as a task of this group (which then
                does not exit before the pool is closed). By default it runs in a runner
                task of the event loop's own, for hooks that cannot share a task group.

        Returns:
            The pool.

        Raises:
            SandboxClosedError: The pool was closed; make a new one.
            ConfigError: The pool was started already.
        """
        if self._closed:
            raise SandboxClosedError("the pool is closed; make a new SandboxPool")
        if self._started:
            raise ConfigError("the pool is started already")
        self._started = True
        self._limiter = anyio.CapacityLimiter(self._concurrency)
        self._changed = anyio.Event()
        self._stop = anyio.Event()
        self._stopped = anyio.Event()
        if task_group is not None:
            await task_group.start(self._serve)
        else:
            entered = anyio.Event()
            self._runner = _spawn_runner(lambda: self._serve(task_status=_Started(entered)))
            await entered.wait()
        return self

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Drain the pool: destroy every ready sandbox, cancel provisioning in flight.

        Callable from any task, and idempotent: each call waits up to ``close_timeout``
        seconds for the background work to end, shielded from cancellation, then returns.
        Work still running then (a provider call that does not return) goes on in the
        background and destroys what it made when it returns; if the process exits first,
        the sandbox's expiry label lets ``sandbay gc`` remove it.
        """
        first = not self._closed
        self._closed = True
        if not self._started or self._stop is None or self._stopped is None:
            return
        self._notify()  # waiters in acquire / wait_ready see the pool closed
        self._stop.set()
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.close_timeout):
            await self._stopped.wait()
        if first and not self._stopped.is_set():
            logger.warning(
                "the pool's background work did not end within %g s; what it still "
                "provisions is destroyed when the provider answers, else by `sandbay gc` "
                "after its expiry",
                self.close_timeout,
            )

    async def _serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The runner: owns the task group all background work runs in, until `aclose`."""
        assert self._stop is not None and self._stopped is not None
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                for _ in range(self.size):
                    tg.start_soon(self._provision)
                task_status.started()
                await self._stop.wait()
                # Ready sandboxes are discarded in tasks of their own, shielded and bounded,
                # concurrently; provisioning in flight is cancelled, and providers clean up
                # what a cancelled create made.
                while self._ready:
                    tg.start_soon(_discard, self._ready.popleft())
                tg.cancel_scope.cancel()
        except BaseException:  # pragma: no cover - only a bug in this module gets here
            logger.exception("the sandbox pool's runner failed")
            raise
        finally:
            self._tg = None
            self._closed = True
            self._stopped.set()
            self._notify()

    # --- taking sandboxes ----------------------------------------------------------------

    async def wait_ready(self, count: int | None = None, *, timeout: float | None = None) -> None:
        """Wait until ``count`` (default: ``size``) sandboxes are ready.

        Raises:
            SandboxClosedError: The pool is not started, or was closed.
            SandboxTimeoutError: They were not ready within ``timeout`` seconds.
            SandboxError: Provisioning failed: the error provisioning raised (a
                `ConfigError`, `AgentError`, …) itself.
        """
        wanted = self.size if count is None else count
        try:
            with anyio.fail_after(timeout):
                while True:
                    self._check_open()
                    if len(self._ready) >= wanted:
                        return
                    if self._failures:
                        self._raise_failure()
                    await self._wait_for_change()
        except TimeoutError as exc:
            if isinstance(exc, SandboxError):
                raise
            raise SandboxTimeoutError(
                f"{wanted} pooled sandboxes were not ready within {timeout:g} s; "
                "raise the timeout or the pool's concurrency"
            ) from None

    async def acquire(self, *, timeout: float | None = None) -> Lease:
        """Take a ready sandbox, waiting for one if none is; a replacement starts at once.

        A sandbox close to its expiry (``spec.lifetime_s``) is discarded rather than handed
        out: it could stop in the middle of the run.

        Raises:
            SandboxClosedError: The pool is not started, or was closed (also while waiting).
            SandboxTimeoutError: None became ready within ``timeout`` seconds.
            SandboxError: Provisioning failed and nothing is ready: the error it raised (a
                `ConfigError`, `AgentError`, …) itself; a new attempt has started.
        """
        try:
            with anyio.fail_after(timeout):
                while True:
                    self._check_open()
                    if self._ready:
                        lease = self._ready.popleft()
                        self._background(self._provision)  # its replacement
                        if not _expires_soon(lease):
                            break
                        self._background(_discard, lease)
                        continue
                    if self._failures:
                        self._raise_failure()  # nothing ready and provisioning failed
                    await self._wait_for_change()
        except TimeoutError as exc:
            if isinstance(exc, SandboxError):
                raise
            raise SandboxTimeoutError(
                f"no pooled sandbox became ready within {timeout:g} s; "
                "raise the pool's size or concurrency"
            ) from None
        self.stats["acquired"] += 1
        return lease

    def check_options(self, wire_options: Mapping[str, object]) -> None:
        """Refuse options that differ from those the pool's CLIs were started with."""
        if self._wire_options is None or not wire_options:
            return
        if dict(wire_options) != self._wire_options:
            raise ConfigError(
                "this pool started its agents with other options; pass options=None to use "
                "the pool's, or make a pool with these options"
            )

    # --- internals -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if not self._started:
            raise SandboxClosedError(
                "the pool is not started: use it inside `async with`, or call `start()`"
            )
        if self._closed:
            raise SandboxClosedError("the pool is closed")

    def _notify(self) -> None:
        """Wake every task waiting for the pool's state to change."""
        if self._changed is not None:
            self._changed.set()
            self._changed = anyio.Event()

    async def _wait_for_change(self) -> None:
        assert self._changed is not None
        await self._changed.wait()

    def _background(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        if self._tg is not None:
            self._tg.start_soon(fn, *args)

    def _raise_failure(self) -> None:
        """Surface the oldest provisioning failure (rather than wait forever) and retry."""
        failure = self._failures.pop(0)
        self._background(self._provision)
        if isinstance(failure, SandboxError):
            raise failure  # typed already: ``except ConfigError`` and the like keep working
        if isinstance(failure, TimeoutError):
            raise SandboxTimeoutError(
                f"provisioning a pooled sandbox took longer than {PROVISION_TIMEOUT:g} s"
            ) from failure
        raise SandboxError(f"the pool could not provision a sandbox: {failure!r}") from failure

    async def _provision(self) -> None:
        assert self._limiter is not None
        async with self._limiter:
            if self._closed:
                return
            try:
                with anyio.fail_after(PROVISION_TIMEOUT):
                    lease = await self._warm()
            except Exception as exc:  # any failure is the acquirer's to see, typed
                if not self._closed:
                    self.stats["failed"] += 1
                    self._failures.append(exc)
                    self._notify()
                return
            if self._closed:
                await _discard(lease)  # closed while it was being made
                return
            self.stats["provisioned"] += 1
            self._ready.append(lease)
            self._notify()

    async def _warm(self) -> Lease:
        from ._transport import SandboxTransport

        run_id = uuid.uuid4().hex[:16]
        sandbox = await provision_sandbox(self._provider, self._spec)
        lease = Lease(sandbox, None, run_id, False, env=self._env)
        try:
            transport = SandboxTransport(sandbox, self._options, env=self._env, run_id=run_id)
            lease.transport = transport
            if self._options is not None:
                # The relay and the CLI start now; the CLI waits for its first input. The
                # checks (credentials, bypassPermissions, a loopback model URL) run first.
                await transport.connect()
                await transport.wait_started()
                lease.prepared = True
                if self._initialize:
                    # The handshake, with the pool's callbacks: a run of the same shape
                    # puts its own in their places (`Lease.adopt`).
                    lease.query = make_query(_configure_can_use_tool(self._options), transport)
                    await lease.query.start()
                    await lease.query.initialize()
            else:
                await transport.upload()
                await _check_python(sandbox)
            return lease
        except BaseException:
            with anyio.CancelScope(shield=True):
                await lease.kill()
                await sandbox.aclose()
            raise


class _Started:
    """The `TaskStatus` of a runner started outside a task group: sets an event."""

    def __init__(self, event: anyio.Event) -> None:
        self._event = event

    def started(self, value: object = None) -> None:
        self._event.set()


def _spawn_runner(serve: Callable[[], Awaitable[None]]) -> object:
    """Run ``serve`` as a task of the event loop's own, and return the task to hold.

    anyio runs every task in a task group, and a task group must be exited by the task that
    entered it; a pool opened in one hook and closed in another has no such task. So its
    runner is the event loop's own task (asyncio) or a system task (trio); the pool stops it
    through an event and waits for it, bounded, in `SandboxPool.aclose`.
    """

    async def run() -> None:
        await serve()

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio: trio is anyio's other backend
        import trio  # type: ignore[import-not-found, unused-ignore]

        trio.lowlevel.spawn_system_task(run)
        return None
    return loop.create_task(run(), name="sandbay-pool")


async def _check_python(sandbox: Sandbox) -> None:
    """Raise `AgentError` if the sandbox's Python cannot run the relay."""
    proc = await sandbox.start(["sh", "-c", f"exec {shlex.quote(sandbox.python)} -c pass 2>&1"])
    output = (await proc.stdout.read()).decode("utf-8", "replace")
    code = await _exit_code(proc)
    if code != 0:
        raise AgentError(
            f"the relay could not report 'ready' while warming: {sandbox.python} failed",
            exit_code=code,
            stderr_tail=output[-4000:],
            provider=sandbox.provider,
            sandbox_id=sandbox.id,
        )


def _expires_soon(lease: Lease) -> bool:
    expiry = lease.sandbox.expiry
    if expiry is None:
        return False
    margin = min(EXPIRY_MARGIN_S, lease.sandbox.spec.lifetime_s / 4)
    return time.time() + margin > expiry


async def _discard(lease: Lease) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
        try:
            await lease.kill()
        except (SandboxError, OSError):
            pass
        await lease.sandbox.aclose()
