"""`E2BProcess`: one envd process, its output read on demand from envd's event stream.

The SDK's ``commands.run`` decodes output to text (undecodable bytes replaced) before any
callback sees it, and sandbay's streams are bytes, exact. So a process is started with the
same ``process.Process/Start`` request ``commands.run(..., background=True, stdin=True,
timeout=0)`` sends (``/bin/bash -l -c``, stdin open, no deadline on the stream), through
the SDK's own envd client, and its raw ``data`` events are read here; stdin, EOF and kill
go through the SDK's public ``commands.send_stdin``, ``close_stdin`` and ``kill``.

Whichever of stdout and stderr is read pulls the next event off the one stream and keeps
what belongs to the other. When the stream breaks before the process ended (a dropped
connection, a proxy's timeout), both streams end where they broke and `wait` reattaches
with ``process.Process/Connect`` to learn the exit code: the process itself runs on.
"""

from __future__ import annotations

import collections
import secrets
import shlex
import signal
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, cast

import anyio
import anyio.lowlevel
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b.connection_config import KEEPALIVE_PING_HEADER, KEEPALIVE_PING_INTERVAL_SEC
from e2b.envd.process import process_pb
from e2b.envd.rpc import is_transport_failure
from e2b.envd.utils import authentication_header
from protobuf import Oneof
from typing_extensions import override

from ..._errors import SandboxError, SandboxNotFoundError
from ..._sandbox import CLOSE_TIMEOUT, ByteStream, Process
from ._errors import NAME, cancellation, e2b_errors, map_e2b_error

if TYPE_CHECKING:
    from ._sandbox import E2BSandbox

#: Environment variable marking every process of one start, so `kill` finds what it started.
EXEC_TOKEN = "SANDBAY_EXEC_ID"

# Runs the command from its working directory: a missing one is named on stderr (bash's
# `cd` says which) with exit 1, and a missing program exits 127 as a shell reports it.
_LAUNCH = 'cd -- "$1" || exit 1; shift; exec "$@"'

# Kills every process whose environment carries the token: the command and what it started,
# however it detached (setsid, double fork, nohup). Processes are stopped first, twice over,
# so a parent cannot fork on while its children die. Runs as the command's user.
_KILL_SCRIPT = (
    f't="{EXEC_TOKEN}=$1"; pids=; for pass in 1 2; do '
    'for f in $(grep -lsF -- "$t" /proc/[0-9]*/environ); do p="${f#/proc/}"; p="${p%/environ}"; '
    '[ "$p" = "$$" ] && continue; '
    'kill -STOP "$p" 2>/dev/null && pids="$pids $p"; done; done; '
    'if [ -n "$pids" ]; then kill -KILL $pids 2>/dev/null; fi; true'
)

# Go reports a process killed by a signal as exit code -1 and "signal: <name>", with the
# names of its own table; they are strsignal's, lowercased.
_SIGNALS = {
    signal.strsignal(sig).lower(): int(sig)  # type: ignore[union-attr]
    for sig in signal.Signals
    if signal.strsignal(sig)
}

# Connection failures in a row after which reattaching to a process gives up.
_REATTACH_TRIES = 20

#: The most stdin bytes sent in one ``SendInput``.
STDIN_CHUNK = 256 * 1024

#: Exit code reported when a process ended while no stream was attached and envd forgot it.
UNKNOWN_EXIT = 255


def launch_args(argv: list[str], cwd: str) -> list[str]:
    """The arguments of ``/bin/bash`` that run argv from cwd, as envd starts it."""
    return ["-l", "-c", _LAUNCH, "sandbay", cwd, *argv]


def exit_code(end: Any) -> int:
    """An envd end event's exit code; -N for a process killed by signal N."""
    code = int(end.exit_code)
    status = str(end.status or "")
    if status.startswith("signal: "):
        name = status.removeprefix("signal: ").removesuffix(" (core dumped)").strip()
        sig = _SIGNALS.get(name)
        if sig is not None:
            return -sig
    return code


class E2BProcess(Process):
    """A process started in an E2B sandbox through envd's process service."""

    def __init__(
        self,
        sandbox: E2BSandbox,
        *,
        pid: int,
        events: AsyncGenerator[Any, Any],
        token: str,
        user: str,
    ) -> None:
        self._sandbox = sandbox
        self.pid = pid
        self._events: AsyncGenerator[Any, Any] | None = events
        self._token = token
        self._user = user
        self._out: collections.deque[bytes] = collections.deque()
        self._err: collections.deque[bytes] = collections.deque()
        self._stream_over = False  # the event stream ended, with or without an end event
        self._code: int | None = None
        self._stdin_closed = False
        self._killed = False
        self._pull_lock = anyio.Lock()
        self._wait_lock = anyio.Lock()
        self.stdout = ByteStream(lambda: self._receive(self._out))
        self.stderr = ByteStream(lambda: self._receive(self._err))

    @classmethod
    async def start(
        cls,
        sandbox: E2BSandbox,
        argv: list[str],
        *,
        env: dict[str, str],
        cwd: str,
        user: str,
    ) -> E2BProcess:
        """Start argv in the sandbox as ``user`` and return once envd reported its pid."""
        token = secrets.token_hex(8)
        request = process_pb.StartRequest(
            process=process_pb.ProcessConfig(
                cmd="/bin/bash",
                args=launch_args(argv, cwd),
                envs={**env, EXEC_TOKEN: token},
                cwd="/",
            ),
            stdin=True,
        )
        headers = {
            **authentication_header(sandbox.sdk._envd_version, user),
            KEEPALIVE_PING_HEADER: str(KEEPALIVE_PING_INTERVAL_SEC),
        }
        rpc = sandbox.rpc
        # timeout_ms=None: the stream has no deadline (commands.run's timeout=0); the
        # default of 60 s would end a long agent run.
        events: AsyncGenerator[Any, Any] = rpc.start(request, headers=headers, timeout_ms=None)
        try:
            # Shielded: envd starts the process before it sends the start event, so a cancel
            # that dropped the stream here would leave a process running that nobody knows
            # the pid of. The wait stays bounded; a cancel is honoured once the pid is known.
            with anyio.CancelScope(shield=True), anyio.fail_after(sandbox.request_timeout):
                first = await events.__anext__()
            pid = _start_pid(first)
        except BaseException as exc:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                await events.aclose()
            cancelled = cancellation(exc)
            if cancelled is not None:
                raise cancelled from None
            if isinstance(exc, TimeoutError):
                raise SandboxError(
                    f"envd did not start {shlex.join(argv)[:80]!r} within "
                    f"{sandbox.request_timeout:g} s",
                    provider=NAME,
                    sandbox_id=sandbox.id,
                ) from None
            if isinstance(exc, Exception) and not isinstance(exc, SandboxError):
                raise map_e2b_error(exc, sandbox_id=sandbox.id, user=user) from exc
            raise
        proc = cls(sandbox, pid=pid, events=events, token=token, user=user)
        sandbox._processes.add(proc)
        try:
            await anyio.lowlevel.checkpoint()  # a cancel that came while envd started it
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                await proc.kill()
                await proc._close_stream()
            raise
        return proc

    # --- output ---

    async def _receive(self, queue: collections.deque[bytes]) -> bytes | None:
        while True:
            if queue:
                return queue.popleft()
            if self._stream_over:
                return None
            async with self._pull_lock:
                if queue or self._stream_over:
                    continue
                await self._pull()

    async def _pull(self) -> None:
        """Take one event off the stream (caller holds the pull lock)."""
        events = self._events
        if events is None:
            self._stream_over = True
            return
        try:
            event = await events.__anext__()
        except StopAsyncIteration:
            self._end_stream()
            return
        except BaseException as exc:
            # Cancelled mid-read, or the connection broke: this stream is done either way
            # (a generator interrupted in a read cannot be resumed). The process runs on;
            # `wait` reattaches to learn how it ended.
            self._end_stream()
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                try:
                    await events.aclose()
                except Exception:
                    pass
            cancelled = cancellation(exc)
            if cancelled is not None:
                raise cancelled from None
            if isinstance(exc, Exception):
                return
            raise
        payload = event.event.event if event.event is not None else None
        match payload:
            case Oneof(field="data", value=data):
                match data.output:
                    case Oneof(field="stdout", value=chunk) if chunk:
                        self._out.append(bytes(chunk))
                    case Oneof(field="stderr", value=chunk) if chunk:
                        self._err.append(bytes(chunk))
                    case _:
                        pass
            case Oneof(field="end", value=end):
                self._code = exit_code(end)
                self._end_stream()
            case _:
                pass  # keepalive

    def _end_stream(self) -> None:
        self._stream_over = True
        self._events = None
        self._sandbox._processes.discard(self)

    async def _close_stream(self) -> None:
        """Let go of the event stream (the sandbox is gone): shielded, bounded, once no read
        is in flight; a read in flight ends with the stream anyway."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
            async with self._pull_lock:
                events = self._events
                self._end_stream()
                if events is not None:
                    try:
                        await events.aclose()
                    except Exception:
                        pass  # the connection is gone with the sandbox

    # --- stdin ---

    @override
    async def write(self, data: bytes) -> None:
        if self._stdin_closed or self._code is not None:
            raise BrokenPipeError("the process's stdin is closed")
        if not data:
            return
        try:
            with e2b_errors(sandbox_id=self._sandbox.id):
                # In pieces: one request carries its bytes as base64 JSON, and envd (as any
                # Connect server) limits the size of one message.
                for start in range(0, len(data), STDIN_CHUNK):
                    piece = bytes(data[start : start + STDIN_CHUNK])
                    await self._sandbox.sdk.commands.send_stdin(self.pid, piece)
        except SandboxNotFoundError:
            raise BrokenPipeError("the process has exited") from None
        except SandboxError as exc:
            # envd answers "error writing to stdin" when the process closed its stdin or is
            # exiting (it may not have reported its end yet): a broken pipe either way.
            if "writing to stdin" in str(exc) or await self._gone():
                raise BrokenPipeError("the process has exited") from exc
            raise

    @override
    async def close_stdin(self) -> None:
        if self._stdin_closed:
            return
        self._stdin_closed = True
        if self._code is not None:
            return
        try:
            with e2b_errors(sandbox_id=self._sandbox.id):
                await self._sandbox.sdk.commands.close_stdin(self.pid)
        except SandboxError:
            pass  # it exited already: nothing to end

    async def _gone(self) -> bool:
        """Whether envd no longer knows the process (it exited)."""
        try:
            with e2b_errors(sandbox_id=self._sandbox.id):
                pids = {p.pid for p in await self._sandbox.sdk.commands.list()}
        except SandboxError:
            return False
        return self.pid not in pids

    # --- exit ---

    @property
    @override
    def returncode(self) -> int | None:
        return self._code

    @override
    async def wait(self) -> int:
        while self._code is None and not self._stream_over:
            # Read the streams to their end, keeping what the caller has not read yet.
            async with self._pull_lock:
                if self._code is None and not self._stream_over:
                    await self._pull()
        if self._code is None:
            async with self._wait_lock:
                if self._code is None:
                    self._code = await self._reattach_for_exit()
        return self._code

    async def _reattach_for_exit(self) -> int:
        """Follow the process over a new ``Connect`` stream until it ends; its output is
        dropped (the broken stream's readers have ended)."""
        request = process_pb.ConnectRequest(
            process=process_pb.ProcessSelector(selector=cast(Any, Oneof("pid", self.pid)))
        )
        headers = {KEEPALIVE_PING_HEADER: str(KEEPALIVE_PING_INTERVAL_SEC)}
        failures = 0
        while True:
            events = self._sandbox.rpc.connect(request, headers=headers, timeout_ms=None)
            try:
                async for event in events:
                    payload = event.event.event if event.event is not None else None
                    if isinstance(payload, Oneof) and payload.field == "end":
                        return exit_code(payload.value)
            except ConnectError as exc:
                cancelled = cancellation(exc)
                if cancelled is not None:
                    raise cancelled from None
                error = map_e2b_error(exc, sandbox_id=self._sandbox.id)
                if exc.code is Code.NOT_FOUND:
                    # envd forgets a process once it ended: it ended while nobody
                    # listened, with a code nobody can learn any more.
                    return -signal.SIGKILL if self._killed else UNKNOWN_EXIT
                failures += 1
                if not is_transport_failure(exc) or failures > _REATTACH_TRIES:
                    raise error from exc
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                    await events.aclose()
            # The connection broke (again): the process may well run on.
            await anyio.sleep(0.2)

    @override
    async def kill(self) -> None:
        if self._code is not None:
            return
        self._killed = True
        # Everything that carries the token first (escaped descendants included), then
        # the process itself through envd, in case it cleared its environment.
        try:
            await self._sandbox._kill_tagged(self._token, user=self._user)
        except SandboxError:
            pass
        try:
            with e2b_errors(sandbox_id=self._sandbox.id):
                await self._sandbox.sdk.commands.kill(self.pid)
        except SandboxError:
            pass


def kill_script_argv(token: str) -> list[str]:
    """The command that kills every process started with ``token``."""
    return ["sh", "-c", _KILL_SCRIPT, "sh", token]


def _start_pid(event: Any) -> int:
    payload = event.event.event if event.event is not None else None
    if isinstance(payload, Oneof) and payload.field == "start":
        return int(payload.value.pid)
    raise SandboxError(
        f"envd opened a process stream with {payload!r}, not a start event", provider=NAME
    )
