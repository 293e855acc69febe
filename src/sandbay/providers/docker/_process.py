"""`_DockerProcess`: a ``docker exec`` session, its stdin and its demultiplexed output.

The exec's hijacked socket carries stdin one way and Docker's multiplexed stream the other:
frames of an 8-byte header (stream, size) and a payload, read and split here on demand.

`start_exec` takes the connection over without losing a byte: the HTTP client reads the
response's headers through a buffer that may already hold the first frames (a launch error
such as an unknown user is often all of the stream, sent with the headers). docker-py hands
out the raw socket and those bytes are lost; sandbay takes them from that buffer first.

Over a plain socket (a unix socket or TCP to the engine) the socket is made non-blocking and
read and written on the event loop: a worker-thread round trip per read round and per write
cost host CPU on every agent message. On asyncio the socket is handed to the loop as a
transport whose protocol (`_Stream`) splits frames as they arrive: the socket stays
registered with the loop, where waiting for it readable on every read round cost more than
the read. On other event loops (trio) a read round waits for the socket to become readable.
Other connections (TLS, ssh, named pipes) are read in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import select
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel
import docker.errors
import requests.exceptions
import sniffio
from typing_extensions import override

from ..._errors import SandboxError
from ..._sandbox import CLOSE_TIMEOUT, ByteStream, Process

if TYPE_CHECKING:
    from ._sandbox import DockerSandbox

_STDOUT, _STDERR = 1, 2
_FRAME_HEADER = 8
_SIZE = struct.Struct(">I")  # a frame's payload size, at offset 4 of its header
_KILL_GRACE_S = 5.0
#: Bytes asked of the socket per read.
_READ_SIZE = 1 << 18
#: Most bytes one read round queues while more is ready at once: a round drains what has
#: arrived rather than returning after the first frame (a round per frame halved
#: throughput), and this bounds what it holds for readers that fell behind and how long a
#: round on the event loop keeps other tasks waiting. On asyncio, the output queued unread
#: at which reading pauses.
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
        self._closing: Any = None  # the reader once `go_non_blocking` took its bytes
        self._poll: Any = None
        with contextlib.suppress(AttributeError, OSError, ValueError):
            poll = select.poll()  # absent on Windows: then every round reads once
            poll.register(self.sock.fileno(), select.POLLIN)
            self._poll = poll

    def on_loop(self) -> bool:
        """Whether the socket can be read and written on the event loop (a plain socket)."""
        # Subclasses (ssl.SSLSocket, docker's SSHSocket) buffer or proxy data of their own,
        # so readiness of the file descriptor says nothing about them.
        return type(self.sock) is socket.socket and sys.platform != "win32"

    def go_non_blocking(self) -> bytes:
        """Make the socket non-blocking and return what the HTTP client read past the headers.

        From then on `recv` reads the socket alone (it raises `BlockingIOError` when nothing
        has arrived), so no byte can stay behind in the HTTP client's buffer.
        """
        self.sock.setblocking(False)
        reader, self.reader = self.reader, None
        self._closing = reader
        if reader is None:
            return b""
        # With bytes buffered, peek returns them without touching the socket; with none, it
        # reads the socket once, and whatever that read is then buffered and taken here.
        data = reader.peek(_READ_SIZE)
        return bytes(reader.read1(len(data))) if data else b""

    def close(self) -> None:
        """Close the buffered reader, the socket's file object and the socket."""
        reader = self.reader if self.reader is not None else self._closing
        if reader is not None:
            with contextlib.suppress(OSError, ValueError):
                reader.close()
        with contextlib.suppress(OSError):
            self.io.close()
        with contextlib.suppress(OSError):
            self.sock.close()

    def recv_into(self, buffer: bytearray) -> int:
        """Append what has arrived on the socket, up to `_READ_SIZE` bytes, to ``buffer``.

        Returns how many bytes were appended: 0 at the end of the stream. For a non-blocking
        socket (see `go_non_blocking`); raises `BlockingIOError` when nothing has arrived.
        """
        scratch = _scratch()  # `recv` would allocate `_READ_SIZE` bytes per call
        size = self.sock.recv_into(scratch)
        buffer += scratch[:size]
        return int(size)

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


_local = threading.local()


def _scratch() -> memoryview:
    """A buffer of `_READ_SIZE` bytes to receive into, one per thread.

    What is received into it is queued (copied) before the next receive on that thread: the
    processes read on one event loop share it.
    """
    view: memoryview | None = getattr(_local, "scratch", None)
    if view is None:
        view = _local.scratch = memoryview(bytearray(_READ_SIZE))
    return view


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

    Frames are queued per stream; a read returns everything its stream has queued, as one
    chunk. How they get there depends on the connection:

    - A plain socket on asyncio (`attach`): the loop reads the socket as data arrives and
      `_Stream` queues its frames; a reader waits for its stream's queue, and a reader
      cancelled there has taken nothing. Reading pauses while `_ROUND_BYTES` or more wait
      unread in the queues (but for `wait`, which takes everything to the end) and resumes
      once readers took them below it: output nobody reads stays in the engine's and the
      kernel's buffers, not in host memory. Writes go through the transport.
    - Otherwise output is read on demand: a reader that finds its stream's queue empty reads
      a round of frames, queueing frames of the other stream for its reader. A round waits
      for the first frame, then takes whatever else has already arrived, up to
      `_ROUND_BYTES`; nothing is read while queued output waits for its reader. Only one
      reader reads at a time (``_reading``). Over a plain socket (trio) a round runs on the
      loop and waits for the socket to become readable: a reader cancelled there has taken
      nothing from it. Over other connections a round runs in a worker thread (one at a
      time, ``_frame_lock``); a reader cancelled while its thread waits leaves that thread to
      finish the frame, which is queued, not lost.
    """

    def __init__(
        self, sandbox: DockerSandbox, exec_id: str, conn: Connection, *, token: str, user: str
    ) -> None:
        self._sandbox = sandbox
        self._exec_id = exec_id
        self._conn = conn
        self._sock = conn.sock
        self._token = token
        self._user = user

        self._chunks: dict[int, deque[bytes]] = {_STDOUT: deque(), _STDERR: deque()}
        self._queued = 0  # bytes ever queued: a round that changed it made progress
        self._unread = 0  # bytes queued and not yet read
        self._buffer = bytearray()
        self._ended = False  # the socket's stream is over (frames may still be held)
        self._eof = False  # and everything in it has been queued
        self._first_frame = True
        self._held: bytes | None = None
        self._launch_error: bytes | None = None
        self._frame_lock = threading.Lock()
        self._reading: anyio.Event | None = None
        self._sending: anyio.Event | None = None
        self._limiter: anyio.CapacityLimiter | None = None

        self._state = threading.Lock()
        self._busy = 0
        self._close_wanted = False
        self._sock_closed = False
        self._write_lock = threading.Lock()
        self._stdin_closed = False
        self._killed = False
        self._returncode: int | None = None

        # On asyncio, once `attach` handed the socket to the loop:
        self._transport: asyncio.Transport | None = None
        self._paused = False  # reading, while too much waits unread
        self._draining = 0  # `wait` calls taking everything to the end, bound or not
        self._write_paused = False  # the transport's buffer is full
        self._lost = False  # the connection is gone
        # Who waits for what: a stream's output (1, 2), the end (0), room to write (-1).
        self._waiters: dict[int, asyncio.Event] = {}

        self._on_loop = conn.on_loop()
        if self._on_loop:
            try:
                self._buffer += conn.go_non_blocking()
            except (OSError, ValueError):
                self._ended = True  # reset with the headers: the stream ends at what it has
        else:
            with contextlib.suppress(AttributeError, OSError):
                self._sock.settimeout(None)  # the client's 60 s timeout would cut quiet ones

        self.stdout = ByteStream(lambda: self._receive(_STDOUT))
        self.stderr = ByteStream(lambda: self._receive(_STDERR))

    @property
    @override
    def returncode(self) -> int | None:
        return self._returncode

    async def attach(self) -> None:
        """On asyncio, hand a plain socket to the event loop as a transport (see the class).

        The bytes read with the headers are queued first. Call it once, right after
        construction; elsewhere it does nothing.
        """
        if not self._on_loop or self._ended or sniffio.current_async_library() != "asyncio":
            return
        self._parse_frames()  # what the HTTP client read with the headers comes first
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_connection(lambda: _Stream(self), sock=self._sock)
        except (OSError, ValueError):
            self._ended = True  # the loop's path ends at what it has, as a reset does
            return
        self._transport = transport

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
                count = len(queue)  # popped one by one: a reader thread may append meanwhile
                chunk = queue.popleft() if count == 1 else b"".join(_take(queue, count))
                self._unread -= len(chunk)
                if self._paused and self._unread < _ROUND_BYTES and self._transport is not None:
                    self._paused = False
                    self._transport.resume_reading()
                return chunk
            if ended:
                return None
            await self._fill(stream)

    async def _fill(self, want: int | None) -> None:
        """Make progress: wait for the reader at work, or become it for one round.

        On asyncio's transport: wait for output, or once the stream is over, settle it.
        """
        if self._transport is not None and not self._ended:
            await self._arrival(want)
            return
        reading = self._reading
        if reading is not None:
            await reading.wait()
            return
        done = self._reading = anyio.Event()
        try:
            if self._transport is not None:
                # The stream is over (`_stream_over`): is a held first frame a launch error?
                # Cancelled meanwhile, the frame stays held.
                failed = self._held is not None and await anyio.to_thread.run_sync(
                    self._never_started, abandon_on_cancel=True, limiter=self._threads()
                )
                self._end(failed=failed)
            elif self._on_loop:
                await self._fill_on_loop(want)
            else:
                await anyio.to_thread.run_sync(
                    self._read_frames, want, abandon_on_cancel=True, limiter=self._threads()
                )
        finally:
            self._reading = None
            done.set()

    async def _arrival(self, want: int | None) -> None:
        """Wait until ``want``'s stream has output or the stream is over (for ``None``: over).

        For ``None`` the queues take everything that comes, past the bound.
        """
        key = 0 if want is None else want
        event = self._waiters.get(key)
        if event is None:
            event = self._waiters[key] = asyncio.Event()
        if want is not None:
            await event.wait()
            return
        self._draining += 1
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        try:
            await event.wait()
        finally:
            self._draining -= 1

    def _wake(self, key: int) -> None:
        event = self._waiters.pop(key, None)
        if event is not None:
            event.set()

    def _received(self, size: int) -> None:
        """`_Stream`: ``size`` bytes arrived in `_scratch`; queue the frames they complete."""
        before = len(self._chunks[_STDOUT]), len(self._chunks[_STDERR])
        data = _scratch()[:size]
        buffer = self._buffer
        if buffer:
            # A frame the last read cut: complete it from ``data`` and queue it first.
            need = _FRAME_HEADER - len(buffer)
            if need > 0:
                part = data[:need]
                buffer += part
                data = data[len(part) :]
            if len(buffer) >= _FRAME_HEADER:
                need = _FRAME_HEADER + _SIZE.unpack_from(buffer, 4)[0] - len(buffer)
                part = data[:need]
                buffer += part
                data = data[len(part) :]
                if len(part) == need:
                    self._parse_frames()
        if data:
            _, taken = self._split(data)
            self._buffer += data[taken:]  # a frame this read cut, kept for the next
        if len(self._chunks[_STDOUT]) != before[0]:
            self._wake(_STDOUT)
        if len(self._chunks[_STDERR]) != before[1]:
            self._wake(_STDERR)
        if self._unread >= _ROUND_BYTES and not self._draining and not self._paused:
            assert self._transport is not None
            self._paused = True
            self._transport.pause_reading()

    def _stream_over(self) -> None:
        """`_Stream`: the engine ended the stream, or the connection is gone."""
        if not self._ended:
            self._ended = True
            if self._held is None:
                self._end(failed=False)
        for key in list(self._waiters):
            self._wake(key)

    def _connection_lost(self) -> None:
        """`_Stream`: the transport closed its socket; close the rest of the connection."""
        self._lost = True
        self._write_paused = False
        self._stream_over()
        self._conn.close()  # the socket's file objects, so that the socket itself closes
        self._sandbox._forget(self)

    async def _fill_on_loop(self, want: int | None) -> None:
        """One round on the event loop: until something is queued or the stream is over."""
        if not self._enter():
            self._eof = True
            return
        try:
            queued = self._queued
            waited = False
            while True:
                self._read_frames(want)
                if self._eof or self._queued != queued:
                    if not waited:  # a reader kept busy must still let other tasks run
                        await anyio.lowlevel.checkpoint()
                    return
                if self._ended:
                    # Whether a held first frame is Docker's launch error takes the engine's
                    # word (blocking calls). Cancelled meanwhile, the frame stays held.
                    failed = self._held is not None and await anyio.to_thread.run_sync(
                        self._never_started, abandon_on_cancel=True, limiter=self._threads()
                    )
                    self._end(failed=failed)
                    return
                await _wait_readable(self._sock)
                waited = True
        finally:
            self._leave()

    def _read_frames(self, want: int | None) -> None:
        """Read from the socket until a frame is queued and no more is ready, or end of stream.

        On the event loop it returns as well when nothing more has arrived; in a worker
        thread it ends the stream itself (`_end`).
        """
        with self._frame_lock:
            if self._eof or self._ended or (want is not None and self._chunks[want]):
                return  # an abandoned reader already delivered
            if not self._enter():
                self._eof = True
                return
            try:
                queued = 0
                more = True  # on the loop: whether a read may find more right now
                while True:
                    queued += self._parse_frames()
                    if queued and (
                        queued >= _ROUND_BYTES
                        or not (more if self._on_loop else self._conn.ready())
                    ):
                        break
                    if self._on_loop:
                        arrived = self._conn.recv_into(self._buffer)
                        # A read of a stream socket takes all that has arrived, up to its
                        # size: a short one leaves nothing to read again for.
                        more = arrived == _READ_SIZE
                    else:
                        data = self._conn.recv()
                        self._buffer += data
                        arrived = len(data)
                    if not arrived:
                        self._ended = True
                        break
            except BlockingIOError:
                pass  # nothing more has arrived (on the event loop)
            except (OSError, ValueError):  # ValueError: the reader was closed
                self._ended = True
            finally:
                if self._ended and not self._on_loop:
                    self._end(failed=self._held is not None and self._never_started())
                self._leave()

    def _parse_frames(self) -> int:
        """Queue every complete frame in the buffer; return how many bytes were queued."""
        buffer = self._buffer
        with memoryview(buffer) as view:  # one copy per chunk, the buffer cut once
            queued, taken = self._split(view)
        del buffer[:taken]
        return queued

    def _split(self, view: memoryview) -> tuple[int, int]:
        """Queue the complete frames at the start of ``view``.

        Returns how many bytes were queued and how many of ``view`` were taken (the frames,
        headers included). Consecutive frames of one stream are queued as one chunk: a
        reader's cost is per chunk, and Docker cuts output into frames of a few KiB.
        """
        queued = 0
        start = 0
        run: list[memoryview] = []  # payloads of consecutive frames of one stream
        run_stream = _STDOUT
        length = len(view)
        while length - start >= _FRAME_HEADER:
            end = start + _FRAME_HEADER + _SIZE.unpack_from(view, start + 4)[0]
            if length < end:
                break
            kind = view[start]
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
            if self._held is not None:
                queued += self._release_held(failed=False)
            if run and stream != run_stream:
                queued += self._queue_run(run_stream, run)
            run_stream = stream
            run.append(payload)
        if run:
            queued += self._queue_run(run_stream, run)
        return queued, start

    def _queue_run(self, stream: int, run: list[memoryview]) -> int:
        chunk = b"".join(run)
        run.clear()
        self._chunks[stream].append(chunk)
        self._queued += len(chunk)
        self._unread += len(chunk)
        return len(chunk)

    def _release_held(self, *, failed: bool) -> int:
        """Queue a held first frame: on stderr if the exec failed to launch, else stdout.

        Returns how many bytes were queued.
        """
        payload, self._held = self._held, None
        if payload is None:
            return 0
        if failed:
            self._launch_error = payload
            self._chunks[_STDERR].append(payload.replace(b"\r\n", b"\n"))
        else:
            self._chunks[_STDOUT].append(payload)
        self._queued += len(payload)
        self._unread += len(payload)
        return len(payload)

    def _never_started(self) -> bool:
        """Whether the exec ended without a process (Docker reports no pid for it). Blocking."""
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

    def _end(self, *, failed: bool) -> None:
        """The stream is over: queue a held frame, let readers see the end, close when idle."""
        self._release_held(failed=failed)
        self._eof = True
        with self._state:
            self._close_wanted = True

    # --- socket ownership: closed once no reader or writer uses it ---

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
        """Close the socket; whoever waits on it is woken and the last one out closes it."""
        if self._transport is not None:
            # Hung up at once, unsent stdin dropped; the loop closes the socket next
            # (`_connection_lost`). Readers see the end of what they have.
            self._eof = True
            self._transport.abort()
            for key in list(self._waiters):
                self._wake(key)
            return
        with self._state:
            if self._sock_closed:
                return
            self._close_wanted = True
            if self._busy:
                # A shut-down socket reads as ended and fails writes: threads blocked on it
                # return, and it turns readable and writable for tasks waiting on the loop.
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
            else:
                self._close_now()

    def _close_now(self) -> None:
        # Called with self._state held.
        self._sock_closed = True
        self._eof = True
        self._conn.close()
        self._sandbox._forget(self)

    # --- stdin ---

    @override
    async def write(self, data: bytes) -> None:
        if self._stdin_closed:
            raise BrokenPipeError("stdin was closed")
        if not data:
            return
        if self._transport is not None:
            await self._send_to_transport(bytes(data))
        elif self._on_loop:
            await self._send_on_loop(bytes(data))
        else:
            await anyio.to_thread.run_sync(
                self._send, bytes(data), abandon_on_cancel=True, limiter=self._threads()
            )

    async def _send_to_transport(self, data: bytes) -> None:
        """Hand ``data`` to the transport, then wait while its buffer is full.

        Cancelled while it waits, ``data`` is still sent.
        """
        while self._sending is not None:  # one write at a time, or they would interleave
            await self._sending.wait()
        assert self._transport is not None
        if self._lost or self._transport.is_closing():
            raise BrokenPipeError("the process has exited")
        done = self._sending = anyio.Event()
        try:
            self._transport.write(data)
            while self._write_paused:
                event = self._waiters.get(-1)
                if event is None:
                    event = self._waiters[-1] = asyncio.Event()
                await event.wait()
                if self._lost or self._transport.is_closing():
                    raise BrokenPipeError("the process's stdin is gone")
        finally:
            self._sending = None
            done.set()

    async def _send_on_loop(self, data: bytes) -> None:
        """Send all of ``data``, waiting on the loop while the socket's buffer is full.

        Cancelled while it waits, part of ``data`` may have been sent.
        """
        while self._sending is not None:  # one write at a time, or they would interleave
            await self._sending.wait()
        if not self._enter():
            raise BrokenPipeError("the process has exited")
        done = self._sending = anyio.Event()
        try:
            view = memoryview(data)
            while view:
                try:
                    view = view[self._sock.send(view) :]
                except BlockingIOError:
                    await _wait_writable(self._sock)
        except OSError as exc:
            raise BrokenPipeError(f"the process's stdin is gone: {exc}") from None
        finally:
            self._sending = None
            done.set()
            self._leave()

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
        if self._transport is not None:
            if not self._transport.is_closing():
                with contextlib.suppress(OSError):
                    self._transport.write_eof()
            return
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


def _take(queue: deque[bytes], count: int) -> Iterator[bytes]:
    for _ in range(count):
        yield queue.popleft()


class _Stream(asyncio.BufferedProtocol):
    """The protocol of an exec's connection on asyncio: it feeds its `_DockerProcess`."""

    def __init__(self, process: _DockerProcess) -> None:
        self._process = process

    @override
    def get_buffer(self, sizehint: int) -> memoryview:
        return _scratch()

    @override
    def buffer_updated(self, nbytes: int) -> None:
        self._process._received(nbytes)

    @override
    def eof_received(self) -> bool:
        self._process._stream_over()
        return False  # the transport closes: the stream is over and stdin goes nowhere

    @override
    def connection_lost(self, exc: Exception | None) -> None:
        self._process._connection_lost()

    @override
    def pause_writing(self) -> None:
        self._process._write_paused = True

    @override
    def resume_writing(self) -> None:
        self._process._write_paused = False
        self._process._wake(-1)


async def _wait_readable(sock: socket.socket) -> None:
    if hasattr(anyio, "wait_readable"):
        await anyio.wait_readable(sock)
    else:  # anyio < 4.7
        await anyio.wait_socket_readable(sock)


async def _wait_writable(sock: socket.socket) -> None:
    if hasattr(anyio, "wait_writable"):
        await anyio.wait_writable(sock)
    else:  # anyio < 4.7
        await anyio.wait_socket_writable(sock)
