"""A local sandbox's processes: `LocalProcess` runs on the host; `FailedProcess` never started."""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
from typing_extensions import override

from ..._sandbox import ByteStream, Process
from ._registry import _kill_recorded

_CHUNK = 65536


class LocalProcess(Process):
    """A host process in its own session: a command's supervisor, or bubblewrap.

    Unisolated (on Linux), the process started is `_supervisor`, which runs the command and
    reports its exit code on ``status``; it stays after the command exits for as long as
    anything the command started still runs, so `kill` (and the sandbox's close) can find
    and kill all of it. Under bubblewrap the process is bwrap, whose PID namespace holds
    everything the command starts; there is no status socket then.
    """

    def __init__(
        self,
        proc: anyio.abc.Process,
        *,
        status: socket.socket | None,
        window: tuple[int, int] | None,
        on_closed: Callable[[LocalProcess], None],
    ) -> None:
        self._proc = proc
        self._status = status
        self._window = window
        self._on_closed = on_closed
        self._stdin_closed = False
        self._eof = {"stdout": False, "stderr": False}
        self._released = False
        self._closed = False
        self._killed = False
        self._buffer = b""
        self._code: int | None = None
        self._status_eof = False
        self._wait_lock = anyio.Lock()
        self.pid = proc.pid
        self.stdout = ByteStream(self._receiver("stdout"))
        self.stderr = ByteStream(self._receiver("stderr"))

    def _receiver(self, name: str) -> Callable[[], Any]:
        async def receive() -> bytes | None:
            stream = getattr(self._proc, name)
            if self._eof[name]:
                return None
            try:
                return bytes(await stream.receive(_CHUNK))
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                self._eof[name] = True
                await self._maybe_release()
                return None

        return receive

    @override
    async def write(self, data: bytes) -> None:
        if self._stdin_closed or self._proc.stdin is None:
            raise BrokenPipeError("stdin is closed (close_stdin was called)")
        try:
            await self._proc.stdin.send(data)
        except (
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            BrokenPipeError,
            ConnectionResetError,
        ):
            raise BrokenPipeError("stdin is closed: the process exited") from None

    @override
    async def close_stdin(self) -> None:
        if self._stdin_closed:
            return
        self._stdin_closed = True
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError, anyio.BrokenResourceError):
                await self._proc.stdin.aclose()

    @override
    async def wait(self) -> int:
        if self._status is None:
            code = await self._proc.wait()
        else:
            async with self._wait_lock:
                code = await self._wait_status()
        await self._maybe_release()
        return code

    async def _wait_status(self) -> int:
        assert self._status is not None
        while True:
            code = self.returncode
            if code is not None:
                return code
            if self._status_eof:
                # The supervisor died without a word (killed from outside): its own code.
                return await self._proc.wait()
            await _wait_readable(self._status)

    @override
    async def kill(self) -> None:
        if self._closed:
            return
        self._killed = True
        # The supervisor (or bwrap) and everything beneath it, whatever session or process
        # group each is in; then its process group.
        lo, hi = self._window or (0, 2**62)
        await anyio.to_thread.run_sync(_kill_recorded, [[self.pid, lo, hi]])

    @property
    @override
    def returncode(self) -> int | None:
        if self._status is None:
            return self._proc.returncode
        if self._code is None and not self._status_eof:
            self._poll_status()
        if self._code is not None:
            return self._code
        if self._status_eof and self._killed:
            return -signal.SIGKILL
        return self._proc.returncode if self._status_eof else None

    def _poll_status(self) -> None:
        assert self._status is not None
        try:
            data = self._status.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._status_eof = True
            return
        self._buffer += data
        line, newline, _ = self._buffer.partition(b"\n")
        if newline:
            try:
                self._code = int(line)
            except ValueError:
                self._status_eof = True

    @property
    def finished(self) -> bool:
        """Whether the process itself (the supervisor, once nothing it holds runs) exited."""
        return self._proc.returncode is not None

    async def reap_if_done(self) -> None:
        """Reap the process if it exited and its pipes were released; else leave it."""
        if self._released and self.finished:
            await self.aclose()

    async def _maybe_release(self) -> None:
        # Once the command exited and both pipes hit end of file nothing is left to read:
        # release the pipes now rather than at sandbox close; and the process too, unless
        # its supervisor still holds processes the command left running.
        if self.returncode is not None and all(self._eof.values()):
            await self.release()
            if self.finished:
                await self.aclose()

    async def release(self) -> None:
        """Close the pipes (the process, or what it left running, may go on)."""
        if self._released:
            return
        self._released = True
        self._stdin_closed = True
        with anyio.CancelScope(shield=True):
            for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError, anyio.BrokenResourceError):
                        await stream.aclose()

    async def aclose(self) -> None:
        """Close the pipes and reap the process (after `kill`, or once it has exited)."""
        if self._closed:
            return
        await self.release()
        with anyio.CancelScope(shield=True):
            await self._proc.aclose()
        self._closed = True
        if self._status is not None:
            self._status.close()
        self._on_closed(self)


async def _wait_readable(sock: socket.socket) -> None:
    if hasattr(anyio, "wait_readable"):
        await anyio.wait_readable(sock)
    else:  # anyio < 4.7
        await anyio.wait_socket_readable(sock)


class FailedProcess(Process):
    """A process that could not start: it has already exited with a message on stderr."""

    def __init__(self, code: int, message: str) -> None:
        self._code = code
        chunks = [message.encode()]

        async def stderr() -> bytes | None:
            return chunks.pop() if chunks else None

        async def stdout() -> bytes | None:
            return None

        self.stdout = ByteStream(stdout)
        self.stderr = ByteStream(stderr)

    @override
    async def write(self, data: bytes) -> None:
        raise BrokenPipeError("the process never started")

    @override
    async def close_stdin(self) -> None:
        pass

    @override
    async def wait(self) -> int:
        return self._code

    @override
    async def kill(self) -> None:
        pass

    @property
    @override
    def returncode(self) -> int:
        return self._code
