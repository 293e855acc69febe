"""A local sandbox's processes: `LocalProcess` runs on the host; `FailedProcess` never started."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
from typing_extensions import override

from ..._sandbox import ByteStream, Process

_CHUNK = 65536


class LocalProcess(Process):
    """A host process (or a bubblewrap namespace) in its own process group."""

    def __init__(
        self, proc: anyio.abc.Process, *, on_closed: Callable[[LocalProcess], None]
    ) -> None:
        self._proc = proc
        self._on_closed = on_closed
        self._stdin_closed = False
        self._eof = {"stdout": False, "stderr": False}
        self._closed = False
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
                await self._maybe_close()
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
        code = await self._proc.wait()
        await self._maybe_close()
        return code

    @override
    async def kill(self) -> None:
        if self._closed:
            return
        # The whole group: children the command started die with it. Under bwrap the group
        # leader is bwrap, and --die-with-parent takes the namespace down with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    @property
    @override
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def _maybe_close(self) -> None:
        # Once it exited and both pipes hit end of file nothing is left to read: release the
        # pipes now rather than at sandbox close.
        if self._proc.returncode is not None and all(self._eof.values()):
            await self.aclose()

    async def aclose(self) -> None:
        """Close the pipes and reap the process (after `kill`, or once it has exited)."""
        if self._closed:
            return
        self._closed = True
        self._stdin_closed = True
        with anyio.CancelScope(shield=True):
            await self._proc.aclose()
        self._on_closed(self)


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
