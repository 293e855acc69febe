"""A warm pool: sandboxes provisioned ahead of time, the agent entrypoint already waiting.

`SandboxPool` keeps ``size`` sandboxes ready. Each holds a started entrypoint that has
imported the Agent SDK and, when the pool was given agent ``options``, has also started the
``claude`` CLI and finished its handshake. `run_agent(..., pool=pool)` takes one, sends the
prompt and so skips provisioning, upload and CLI start-up. A sandbox is used once: the run
destroys it, and the pool provisions a replacement in the background.
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

import anyio
from anyio.abc import TaskGroup
from claude_agent_sdk import ClaudeAgentOptions
from typing_extensions import Self

from ._agent import _EnvelopeReader
from ._api import create_sandbox
from ._config import ProviderConfig, SandbayConfig
from ._errors import (
    AgentError,
    ConfigError,
    SandboxClosedError,
    SandboxError,
    SandboxTimeoutError,
)
from ._provider import EXPIRY
from ._sandbox import CLOSE_TIMEOUT, Process, Sandbox, SandboxSpec

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found,unused-ignore]

__all__ = ["Lease", "SandboxPool"]

#: Seconds one sandbox may take to provision and warm before the attempt is abandoned.
PROVISION_TIMEOUT = 300.0
#: A pooled sandbox this close to its expiry (at most a quarter of its lifetime) is replaced
#: instead of handed out.
EXPIRY_MARGIN_S = 120.0


@dataclass
class Lease:
    """A ready sandbox taken from a pool: the caller now owns it and must close it.

    Attributes:
        sandbox: The sandbox.
        process: Its entrypoint, waiting for a request on stdin.
        run_dir: The run's directory inside the sandbox.
        run_id: The run's id.
        prepared: Whether the ``claude`` CLI is already started with the pool's options.
        reader: Frames the entrypoint's stdout; holds anything read past the warm-up.
    """

    sandbox: Sandbox
    process: Process
    run_dir: str
    run_id: str
    prepared: bool
    reader: _EnvelopeReader


class SandboxPool:
    """Keeps ``size`` sandboxes provisioned with the entrypoint started, for instant runs.

    Use it as an async context manager; closing drains it (every pooled sandbox is
    destroyed, provisioning in flight is finished and destroyed)::

        async with sandbay.SandboxPool("docker", size=2, options=opts, env=model.env()) as pool:
            async with sandbay.run_agent("...", pool=pool) as run:
                async for message in run:
                    ...

    Args:
        provider: Provider name or config; ``None`` reads the config file / environment.
        spec: What to provision.
        size: How many ready sandboxes to keep.
        concurrency: Most sandboxes provisioned at once.
        options: Agent options to start the ``claude`` CLI with ahead of time. Runs taking
            from this pool then use these options (``run_agent`` refuses different ones).
        env: Agent environment (model endpoint, keys) for the pre-started CLI.
    """

    def __init__(
        self,
        provider: str | ProviderConfig | SandbayConfig | None = None,
        spec: SandboxSpec | None = None,
        *,
        size: int = 2,
        concurrency: int = 2,
        options: ClaudeAgentOptions | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        from ._agent import agent_env, options_to_wire

        if size < 1:
            raise ConfigError(f"pool size must be at least 1, got {size}")
        if concurrency < 1:
            raise ConfigError(f"pool concurrency must be at least 1, got {concurrency}")
        self.size = size
        self._provider = provider
        self._spec = spec
        self._options = options
        self._wire_options = options_to_wire(options) if options is not None else None
        self._env = agent_env(env)
        self._limiter = anyio.CapacityLimiter(concurrency)
        self._ready_send, self._ready = anyio.create_memory_object_stream[Lease](math.inf)
        self._tg: TaskGroup | None = None
        self._closed = False
        self._failures: list[BaseException] = []
        #: Counters for reports: provisioned, handed out, failed.
        self.stats = {"provisioned": 0, "acquired": 0, "failed": 0}

    @property
    def agent_env(self) -> Mapping[str, str]:
        """The agent environment the pool's CLIs are started with (``env`` and forwarded)."""
        return self._env

    @property
    def options(self) -> ClaudeAgentOptions | None:
        """The agent options the pool's CLIs were started with, if any."""
        return self._options

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        for _ in range(self.size):
            self._tg.start_soon(self._provision)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose(exc_type, exc, tb)

    async def aclose(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        """Drain the pool: destroy every ready sandbox and those still provisioning.

        An error raised inside the pool's ``async with`` block comes out of it as itself,
        not wrapped in an ``ExceptionGroup``.
        """
        if self._closed:
            return
        self._closed = True
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                # Provisioning in flight is shielded: it finishes, sees the pool closed and
                # destroys what it made. The task group must exit in the scope it entered.
                tg.cancel_scope.cancel()
                try:
                    await tg.__aexit__(exc_type, exc, tb)
                except BaseExceptionGroup as group:
                    # The task group wraps the block's own exception (and anything a
                    # provisioning task raised); callers expect the error itself.
                    single = _single(group)
                    if single is None:
                        raise
                    if single is exc:
                        return  # ``async with`` re-raises it, traceback intact
                    raise single from None
        finally:
            with anyio.CancelScope(shield=True):
                self._ready_send.close()
                async for lease in self._ready:
                    await _discard(lease)
                self._ready.close()

    @property
    def ready(self) -> int:
        """How many sandboxes are ready to hand out now."""
        return self._ready.statistics().current_buffer_used

    async def wait_ready(self, count: int | None = None, *, timeout: float | None = None) -> None:
        """Wait until ``count`` (default: ``size``) sandboxes are ready.

        Raises:
            SandboxTimeoutError: They were not ready within ``timeout`` seconds.
            SandboxError: Provisioning failed: the error provisioning raised (a
                `ConfigError`, `AgentError`, …) itself.
        """
        wanted = self.size if count is None else count
        try:
            with anyio.fail_after(timeout):
                while self.ready < wanted:
                    if self._failures:
                        self._raise_failure()
                    await anyio.sleep(0.02)
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
            SandboxClosedError: The pool is closed.
            SandboxTimeoutError: None became ready within ``timeout`` seconds.
            SandboxError: Provisioning keeps failing: the error it last raised (a
                `ConfigError`, `AgentError`, …) itself.
        """
        if self._closed or self._tg is None:
            raise SandboxClosedError("the pool is closed (use it inside `async with`)")
        try:
            with anyio.fail_after(timeout):
                while True:
                    if self._failures and self.ready == 0:
                        self._raise_failure()  # nothing ready and provisioning failed
                    with anyio.move_on_after(0.5):
                        lease = await self._ready.receive()
                        if not _expires_soon(lease):
                            break
                        await _discard(lease)
                        self._tg.start_soon(self._provision)
        except TimeoutError as exc:
            if isinstance(exc, SandboxError):
                raise
            raise SandboxTimeoutError(
                f"no pooled sandbox became ready within {timeout:g} s; "
                "raise the pool's size or concurrency"
            ) from None
        self.stats["acquired"] += 1
        self._tg.start_soon(self._provision)
        return lease

    def _raise_failure(self) -> None:
        """Surface the latest provisioning failure (rather than wait forever) and retry."""
        failure = self._failures.pop()
        if self._tg is not None:
            self._tg.start_soon(self._provision)
        if isinstance(failure, SandboxError):
            raise failure  # typed already: ``except ConfigError`` and the like keep working
        if isinstance(failure, TimeoutError):
            raise SandboxTimeoutError(
                f"provisioning a pooled sandbox took longer than {PROVISION_TIMEOUT:g} s"
            ) from failure
        raise SandboxError(f"the pool could not provision a sandbox: {failure}") from failure

    def check_options(self, wire_options: Mapping[str, object]) -> None:
        """Refuse options that differ from those the pool's CLIs were started with."""
        if self._wire_options is None or not wire_options:
            return
        if dict(wire_options) != self._wire_options:
            raise ConfigError(
                "this pool started its agents with other options; pass options=None to use "
                "the pool's, or make a pool with these options"
            )

    async def _provision(self) -> None:
        async with self._limiter:
            if self._closed:
                return
            lease: Lease | None = None
            try:
                # Shielded: a sandbox half-created when the pool closes is finished and then
                # destroyed, never orphaned.
                with anyio.CancelScope(shield=True), anyio.fail_after(PROVISION_TIMEOUT):
                    lease = await self._warm()
            except (SandboxError, OSError, TimeoutError) as exc:
                self.stats["failed"] += 1
                self._failures.append(exc)
                return
            assert lease is not None
            if self._closed:
                await _discard(lease)
                return
            self.stats["provisioned"] += 1
            self._ready_send.send_nowait(lease)

    async def _warm(self) -> Lease:
        from ._agent import _send, check_sandbox, sandbox_agent_env, start_entrypoint

        sandbox = await create_sandbox(self._provider, self._spec)
        try:
            if self._wire_options is not None:
                check_sandbox(sandbox, wire_options=self._wire_options, env=self._env)
            run_id = uuid.uuid4().hex[:16]
            proc, run_dir = await start_entrypoint(sandbox, run_id)
            reader = _EnvelopeReader(proc, sandbox=sandbox)
            await _expect(reader, "ready", sandbox, proc, run_dir)
            if self._wire_options is not None:
                options = {"cwd": sandbox.workdir, **self._wire_options}
                env = sandbox_agent_env(sandbox, self._env)
                await _send(proc, {"kind": "prepare", "options": options, "env": env})
                await _expect(reader, "prepared", sandbox, proc, run_dir)
            return Lease(sandbox, proc, run_dir, run_id, self._wire_options is not None, reader)
        except BaseException:
            await sandbox.aclose()
            raise


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception a (nested) group holds, or ``None`` if it holds several."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        item = pending.pop()
        if isinstance(item, BaseExceptionGroup):
            pending.extend(item.exceptions)
        else:
            leaves.append(item)
    return leaves[0] if len(leaves) == 1 else None


async def _expect(
    reader: _EnvelopeReader, kind: str, sandbox: Sandbox, proc: Process, run_dir: str
) -> None:
    from ._agent import _exit_code, stderr_tail

    envelope = await reader.next()
    if envelope is None or envelope.kind != kind:
        detail = envelope.data if envelope is not None else "end of stream"
        exit_code = await _exit_code(proc) if envelope is None else None
        raise AgentError(
            f"the entrypoint did not report {kind!r} while warming: {detail}",
            exit_code=exit_code,
            stderr_tail=await stderr_tail(sandbox, run_dir),
            provider=sandbox.provider,
            sandbox_id=sandbox.id,
        )


def _expires_soon(lease: Lease) -> bool:
    try:
        expiry = float(lease.sandbox.labels[EXPIRY])
    except (KeyError, ValueError):
        return False
    margin = min(EXPIRY_MARGIN_S, lease.sandbox.spec.lifetime_s / 4)
    return time.time() + margin > expiry


async def _discard(lease: Lease) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
        try:
            await lease.process.kill()
        except (SandboxError, OSError):
            pass
        await lease.sandbox.aclose()
