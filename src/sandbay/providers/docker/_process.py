"""`_DockerProcess`: a ``docker exec`` session, its stdin and its demultiplexed output.

The exec's hijacked socket carries stdin one way and Docker's multiplexed stream the other:
frames of an 8-byte header (stream, size) and a payload, read and split here on demand.

`start_exec` takes the connection over without losing a byte: the HTTP client reads the
response's headers through a buffer that may already hold the first frames (a launch error
such as an unknown user is often all of the stream, sent with the headers). docker-py hands
out the raw socket and those bytes are lost; sandbay keeps reading through that buffer.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import anyio
import docker.errors
import requests.exceptions
from typing_extensions import override

from ..._errors import SandboxError
from ..._sandbox import CLOSE_TIMEOUT, ByteStream, Process

if TYPE_CHECKING:
    from ._sandbox import DockerSandbox

_STDOUT, _STDERR = 1, 2
_FRAME_HEADER = 8
_KILL_GRACE_S = 5.0
#: Bytes asked of the socket per read.
_READ_SIZE = 1 << 18
#: Most bytes one worker-thread round queues while more is ready at once: a round drains
#: what has arrived rather than returning after the first frame (a thread round trip per
#: frame halved throughput), and this bounds what it holds for readers that fell behind.
_ROUND_BYTES = 1 << 20

# Docker reports a failed launch (no such executable, bad cwd or user) as text on stdout.
_LAUNCH_ERROR = re.compile(rb"^(OCI runtime|exec failed|unable to find user)")


class Connection:
    """A started exec's hijacked connection.

    Attributes:
        sock: The socket (for writing stdin, shutting down and timeouts).
        io: What to close: the socket's file object, or the socket itself.
        reader: A buffered reader over the socket holding any bytes read with the headers,
            or ``None`` where the transport has none (then ``sock`` is read directly).
    """

    def __init__(self, response: Any, sock: Any) -> None:
        self._response = response  # keeps the connection from being collected and closed
        self.io = sock  # socket.SocketIO over a unix socket, else the transport's socket
        self.sock: Any = getattr(sock, "_sock", None) or sock
        fp = getattr(getattr(getattr(response, "raw", None), "_fp", None), "fp", None)
        self.reader: Any = fp if callable(getattr(fp, "read1", None)) else None
        self._poll: Any = None
        with contextlib.suppress(AttributeError, OSError, ValueError):
            poll = select.poll()  # absent on Windows: then every round reads once
            poll.register(self.sock.fileno(), select.POLLIN)
            self._poll = poll

    def recv(self) -> bytes:
        """Up to `_READ_SIZE` bytes: what is buffered first, else one read of the socket."""
        if self.reader is not None:
            # Asking for more than the reader's buffer holds empties it, and reads the socket
            # directly when it is empty: after a call, `ready` sees everything still unread.
            data: bytes = self.reader.read1(_READ_SIZE)
            return data
        data = self.sock.recv(_READ_SIZE)
        return bytes(data)

    def ready(self) -> bool:
        """Whether a `recv` would return at once (data, end of stream or an error)."""
        if self._poll is None:
            return False
        try:
            return bool(self._poll.poll(0))
        except (OSError, ValueError):
            return False


def start_exec(api: Any, exec_id: str) -> Connection:
    """Start a created exec attached to its streams and take its connection over. Blocking.

    Raises:
        docker.errors.APIError: The engine refused (wrap the call in ``docker_errors``).
    """
    response = api._post_json(
        api._url("/exec/{0}/start", exec_id),
        headers={"Connection": "Upgrade", "Upgrade": "tcp"},
        data={"Tty": False, "Detach": False},
        stream=True,
    )
    return Connection(response, api._get_raw_response_socket(response))


class _DockerProcess(Process):
    """One ``docker exec`` session on a hijacked socket.

    Output is read on demand: a reader that finds its stream's queue empty reads more frames
    from the socket in a worker thread, queueing frames of the other stream for its reader.
    One such round waits for the first frame, then takes whatever else has already arrived,
    up to `_ROUND_BYTES`; nothing is read while queued output waits for its reader.
    Only one thread reads the socket at a time (``_frame_lock``); a reader cancelled while its
    thread waits leaves that thread to finish the frame, which is queued, not lost.
    """

    def __init__(
        self, sandbox: DockerSandbox, exec_id: str, conn: Connection, *, token: str, user: str
    ) -> None:
        self._sandbox = sandbox
        self._exec_id = exec_id
        self._conn = conn
        self._io = conn.io
        self._sock = conn.sock
        with contextlib.suppress(AttributeError, OSError):
            self._sock.settimeout(None)  # the client's 60 s timeout would cut quiet processes
        self._token = token
        self._user = user

        self._chunks: dict[int, deque[bytes]] = {_STDOUT: deque(), _STDERR: deque()}
        self._buffer = bytearray()
        self._eof = False
        self._first_frame = True
        self._held: bytes | None = None
        self._launch_error: bytes | None = None
        self._frame_lock = threading.Lock()
        self._reading: anyio.Event | None = None
        self._limiter: anyio.CapacityLimiter | None = None

        self._state = threading.Lock()
        self._busy = 0
        self._close_wanted = False
        self._sock_closed = False
        self._write_lock = threading.Lock()
        self._stdin_closed = False
        self._killed = False
        self._returncode: int | None = None

        self.stdout = ByteStream(lambda: self._receive(_STDOUT))
        self.stderr = ByteStream(lambda: self._receive(_STDERR))

    @property
    @override
    def returncode(self) -> int | None:
        return self._returncode

    def _threads(self) -> anyio.CapacityLimiter:
        # Each process gets its own few threads: a reader blocked on a quiet process must
        # not hold a token of the shared default limiter other processes need.
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(4)
        return self._limiter

    # --- reading ---

    async def _receive(self, stream: int) -> bytes | None:
        queue = self._chunks[stream]
        while True:
            ended = self._eof  # read first: a reader thread queues its data, then sets it
            if queue:
                return queue.popleft()
            if ended:
                return None
            await self._fill(stream)

    async def _fill(self, want: int | None) -> None:
        """Make progress: wait for the reader at work, or become it for one round."""
        reading = self._reading
        if reading is not None:
            await reading.wait()
            return
        done = self._reading = anyio.Event()
        try:
            await anyio.to_thread.run_sync(
                self._read_frames, want, abandon_on_cancel=True, limiter=self._threads()
            )
        finally:
            self._reading = None
            done.set()

    def _read_frames(self, want: int | None) -> None:
        """Read from the socket until a frame is queued and no more is ready, or end of stream."""
        with self._frame_lock:
            if self._eof or (want is not None and self._chunks[want]):
                return  # an abandoned reader already delivered
            if not self._enter():
                self._eof = True
                return
            ended = False
            queued = 0
            try:
                while True:
                    queued += self._parse_frames()
                    if queued and (queued >= _ROUND_BYTES or not self._conn.ready()):
                        break
                    data = self._conn.recv()
                    if not data:
                        ended = True
                        break
                    self._buffer += data
            except (OSError, ValueError):  # ValueError: the reader was closed
                ended = True
            finally:
                if ended:
                    self._release_held(at_end=True)
                    self._set_eof()
                self._leave()

    def _parse_frames(self) -> int:
        """Queue every complete frame in the buffer; return how many bytes were queued.

        Consecutive frames of one stream are queued as one chunk: a reader's cost is per
        chunk, and Docker cuts output into frames of a few KiB.
        """
        buffer = self._buffer
        queued = 0
        start = 0
        run: list[memoryview] = []  # payloads of consecutive frames of one stream
        run_stream = _STDOUT
        with memoryview(buffer) as view:  # one copy per chunk, the buffer cut once
            while len(buffer) - start >= _FRAME_HEADER:
                size = int.from_bytes(view[start + 4 : start + 8], "big")
                end = start + _FRAME_HEADER + size
                if len(buffer) < end:
                    break
                kind = buffer[start]
                payload = view[start + _FRAME_HEADER : end]
                start = end
                if not payload or kind not in (_STDOUT, _STDERR, 3):
                    continue
                stream = _STDERR if kind == 3 else kind
                if self._first_frame:
                    self._first_frame = False
                    if kind == _STDOUT and _LAUNCH_ERROR.match(payload):
                        # Docker's launch errors end the stream at once: hold it until we know.
                        self._held = bytes(payload)
                        continue
                queued += self._release_held(at_end=False)
                if run and stream != run_stream:
                    queued += self._queue_run(run_stream, run)
                run_stream = stream
                run.append(payload)
            if run:
                queued += self._queue_run(run_stream, run)
            del run
            payload = view[:0]  # the views of the buffer go before it is cut
            del payload
        del buffer[:start]
        return queued

    def _queue_run(self, stream: int, run: list[memoryview]) -> int:
        chunk = b"".join(run)
        run.clear()
        self._chunks[stream].append(chunk)
        return len(chunk)

    def _release_held(self, *, at_end: bool) -> int:
        """Queue a held first frame: on stderr if it is Docker's launch error, else stdout.

        Returns how many bytes were queued.
        """
        payload, self._held = self._held, None
        if payload is None:
            return 0
        if at_end and self._never_started():
            self._launch_error = payload
            self._chunks[_STDERR].append(payload.replace(b"\r\n", b"\n"))
        else:
            self._chunks[_STDOUT].append(payload)
        return len(payload)

    def _never_started(self) -> bool:
        """Whether the exec ended without a process (Docker reports no pid for it)."""
        api = self._sandbox._provider._api()
        deadline = time.monotonic() + 5
        try:
            while True:
                info = api.exec_inspect(self._exec_id)
                if not info.get("Running") or time.monotonic() > deadline:
                    return not info.get("Running") and not info.get("Pid")
                time.sleep(0.005)
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            return False

    def _set_eof(self) -> None:
        self._eof = True
        with self._state:
            self._close_wanted = True

    # --- socket ownership: closed once no thread uses it ---

    def _enter(self) -> bool:
        with self._state:
            if self._sock_closed:
                return False
            self._busy += 1
            return True

    def _leave(self) -> None:
        with self._state:
            self._busy -= 1
            if self._close_wanted and not self._busy:
                self._close_now()

    def _close(self) -> None:
        """Close the socket; threads blocked on it are woken and the last one closes it."""
        with self._state:
            if self._sock_closed:
                return
            self._close_wanted = True
            if self._busy:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
            else:
                self._close_now()

    def _close_now(self) -> None:
        # Called with self._state held.
        self._sock_closed = True
        self._eof = True
        if self._conn.reader is not None:
            with contextlib.suppress(OSError, ValueError):
                self._conn.reader.close()
        with contextlib.suppress(OSError):
            self._io.close()
        with contextlib.suppress(OSError):
            self._sock.close()
        self._sandbox._forget(self)

    # --- stdin ---

    @override
    async def write(self, data: bytes) -> None:
        if self._stdin_closed:
            raise BrokenPipeError("stdin was closed")
        if data:
            await anyio.to_thread.run_sync(
                self._send, bytes(data), abandon_on_cancel=True, limiter=self._threads()
            )

    def _send(self, data: bytes) -> None:
        if not self._enter():
            raise BrokenPipeError("the process has exited")
        try:
            with self._write_lock:
                self._sock.sendall(data)
        except OSError as exc:
            raise BrokenPipeError(f"the process's stdin is gone: {exc}") from None
        finally:
            self._leave()

    @override
    async def close_stdin(self) -> None:
        if self._stdin_closed:
            return
        self._stdin_closed = True
        with self._state:
            if not self._sock_closed:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_WR)

    # --- exit ---

    @override
    async def wait(self) -> int:
        if self._returncode is not None:
            return self._returncode
        while not self._eof:  # keeps unread output for the streams
            await self._fill(None)
        api = self._sandbox._provider._api
        delay, waited = 0.002, 0.0
        while True:
            info = await self._sandbox._provider._call(
                lambda: api().exec_inspect(self._exec_id), sandbox_id=self._sandbox.id
            )
            code = info.get("ExitCode")
            if not info.get("Running") and code is not None:
                break
            if self._killed and waited > _KILL_GRACE_S:
                code = 137  # the kill did not reach it; the container's removal will
                break
            await anyio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.1)
        self._returncode = self._normalise(int(code))
        return self._returncode

    def _normalise(self, code: int) -> int:
        if self._launch_error is not None and code == 126:
            text = self._launch_error.lower()
            if b"executable file not found" in text or (
                b"no such file or directory" in text and b"chdir" not in text
            ):
                return 127  # as a shell reports a missing command
        if self._killed and code == 128 + 9:
            return -9
        return code

    @override
    async def kill(self) -> None:
        if self._killed or self._returncode is not None:
            return
        self._killed = True
        # Hang up first: output nobody will read fills the stream, and the engine, waiting
        # to deliver it, would hold the container (the kill's own exec included) meanwhile.
        self._close()
        try:
            with anyio.move_on_after(CLOSE_TIMEOUT):
                await self._sandbox._kill_tagged(self._token, user=self._user)
        except SandboxError:
            pass  # the container is gone, and the process with it
