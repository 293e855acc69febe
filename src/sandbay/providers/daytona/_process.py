"""`DaytonaProcess`: one process under `_shim`, run as a Daytona session command.

Each process gets its own session. Its input goes through ``send_session_command_input`` as
the shim's text records; its output is the command's log, read over the toolbox WebSocket
(``…/command/{id}/logs?follow=true``) on demand: a reader that finds its stream's queue empty
reads more frames. Daytona's frames carry chunks behind a 3-byte stdout or stderr prefix;
the shim's stdout inside them is numbered ASCII records (see `_shim`).

A logs stream that breaks (a proxy drops it, Daytona closes it with an error) is opened
again: Daytona replays a command's log from its start, and records already delivered are
skipped by their number, so nothing is lost or repeated.
"""

from __future__ import annotations

import base64
import json
import re
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
from daytona import DaytonaError
from typing_extensions import override

from ..._errors import ProviderUnavailableError, SandboxNotFoundError
from ..._sandbox import CLOSE_TIMEOUT, ByteStream, Process
from ._errors import NAME, convert

if TYPE_CHECKING:
    from daytona import AsyncSandbox

_STDOUT, _STDERR = b"\x01\x01\x01", b"\x02\x02\x02"
_INPUT_CHUNK = 96 * 1024
_RECONNECTS = 8

SHIM = Path(__file__).with_name("_shim.py").read_text()


def shim_command(python: str) -> str:
    """The session command that runs the shim (its source inline: nothing to install)."""
    return f"exec {python} -I -S -c {_quote(SHIM)}"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def spec_record(argv: list[str], env: dict[str, str], cwd: str, user: str | None) -> str:
    """The shim's first input record: what to run, where, as whom."""
    spec = {"argv": argv, "env": env, "cwd": cwd, "user": user}
    return "s " + base64.b64encode(json.dumps(spec).encode()).decode() + "\n"


class DaytonaProcess(Process):
    """A process in a Daytona sandbox (see the module docstring)."""

    def __init__(self, sdk: AsyncSandbox, session: str, cmd_id: str) -> None:
        self._sdk = sdk
        self._session = session
        self._cmd_id = cmd_id
        self._queues: dict[str, deque[bytes]] = {"o": deque(), "e": deque()}
        self._seq = 0  # last record delivered
        self._raw_err = 0  # bytes of the command's own stderr delivered (the shim's failures)
        self._eof = False
        self._returncode: int | None = None
        self._read_lock = anyio.Lock()
        self._write_lock = anyio.Lock()
        self._stdin_closed = False
        self._ws: Any = None
        self._frames = bytearray()
        self._kind = b""
        self._line = bytearray()
        self._raw_seen = 0
        self._cleaned = False
        self.stdout = ByteStream(lambda: self._receive("o"))
        self.stderr = ByteStream(lambda: self._receive("e"))

    @property
    @override
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def sandbox_id(self) -> str:
        """The sandbox's id."""
        return str(self._sdk.id)

    # --- input ---

    async def send(self, text: str) -> None:
        """Send one record (or several) to the shim, in order."""
        await self._sdk.process.send_session_command_input(self._session, self._cmd_id, text)

    @override
    async def write(self, data: bytes) -> None:
        if self._stdin_closed or self._returncode is not None:
            raise BrokenPipeError("the process's stdin is closed")
        async with self._write_lock:
            for start in range(0, len(data), _INPUT_CHUNK):
                piece = base64.b64encode(data[start : start + _INPUT_CHUNK]).decode()
                try:
                    await self.send(f"d {piece}\n")
                except (DaytonaError, aiohttp.ClientError) as exc:
                    if await self._ended():
                        raise BrokenPipeError("the process exited") from exc
                    raise convert(exc, sandbox_id=self.sandbox_id, doing="writing stdin") from exc

    @override
    async def close_stdin(self) -> None:
        if self._stdin_closed:
            return
        self._stdin_closed = True
        if self._returncode is not None:
            return
        async with self._write_lock:
            try:
                await self.send("e\n")
            except (DaytonaError, aiohttp.ClientError):
                pass  # the command is gone: its stdin is closed anyway

    @override
    async def kill(self) -> None:
        if self._returncode is not None:
            return
        try:
            await self.send("k\n")
        except (DaytonaError, aiohttp.ClientError):
            # The shim does not answer: end its session instead, and with it the process.
            await self._cleanup()
            if self._returncode is None:
                self._returncode = -9
                self._eof = True

    async def _ended(self) -> bool:
        try:
            cmd = await self._sdk.process.get_session_command(self._session, self._cmd_id)
        except (DaytonaError, aiohttp.ClientError):
            return True
        return cmd.exit_code is not None

    # --- output ---

    @override
    async def wait(self) -> int:
        while self._returncode is None:
            await self._fill()
        return self._returncode

    async def _receive(self, kind: str) -> bytes | None:
        queue = self._queues[kind]
        while True:
            if queue:
                return queue.popleft()
            if self._eof:
                return None
            await self._fill()

    async def _fill(self) -> None:
        """Read from the logs stream until something was queued, or the end."""
        async with self._read_lock:
            before = sum(len(q) for q in self._queues.values())
            failures = 0
            while not self._eof and sum(len(q) for q in self._queues.values()) == before:
                try:
                    await self._read_frame()
                    failures = 0
                except (DaytonaError, aiohttp.ClientError, OSError, _Cut) as exc:
                    await self._drop_ws()
                    if isinstance(exc, aiohttp.WSServerHandshakeError) and exc.status == 404:
                        raise SandboxNotFoundError(
                            "the process's sandbox (or its session) is gone",
                            provider=NAME,
                            sandbox_id=self.sandbox_id,
                        ) from exc
                    failures += 1
                    if failures > _RECONNECTS:
                        raise ProviderUnavailableError(
                            f"the logs stream of a process kept breaking: {exc}",
                            provider=NAME,
                            sandbox_id=self.sandbox_id,
                        ) from exc
                    await anyio.sleep(min(0.05 * 2**failures, 2.0))
            if self._eof and self._ws is not None:
                await self._drop_ws()
                await self._cleanup()

    async def _read_frame(self) -> None:
        if self._ws is None:
            api = self._sdk.process._api_client
            _, url, headers, *_ = api._get_session_command_logs_serialize(
                session_id=self._session,
                command_id=self._cmd_id,
                follow=True,
                _request_auth=None,
                _content_type=None,
                _headers=None,
                _host_index=None,
            )
            self._ws = await self._sdk.process._open_ws(re.sub(r"^http", "ws", url), headers)
            self._frames.clear()
            self._line.clear()
            self._kind = b""
            self._raw_seen = 0
        msg = await self._ws.receive()
        if msg.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
            data = msg.data if isinstance(msg.data, bytes) else msg.data.encode()
            self._frames += data
            self._demux(final=False)
            return
        if msg.type == aiohttp.WSMsgType.CLOSE and msg.data in (None, 1000):
            self._demux(final=True)
            await self._drop_ws()
            await self._stream_ended()
            return
        raise _Cut(f"logs stream closed ({msg.type.name}, {msg.data!r})")

    def _demux(self, *, final: bool) -> None:
        buf = self._frames
        while buf:
            so, se = buf.find(_STDOUT), buf.find(_STDERR)
            cut = min(i for i in (so, se, len(buf)) if i != -1)
            if cut == len(buf) and not final:
                # Hold back a tail that may be the start of a prefix.
                keep = 0
                while keep < 2 and keep < len(buf) and buf[-1 - keep] in (1, 2):
                    keep += 1
                cut = len(buf) - keep
                if cut == 0:
                    return
            if cut:
                self._payload(bytes(buf[:cut]))
                del buf[:cut]
                continue
            self._kind = bytes(buf[:3])
            del buf[:3]

    def _payload(self, data: bytes) -> None:
        if self._kind == _STDERR:
            # The shim's own failures (no python3 in the image, say): the command's stderr.
            start = self._raw_seen
            self._raw_seen += len(data)
            fresh = data[max(self._raw_err - start, 0) :]
            if fresh:
                self._raw_err += len(fresh)
                self._queues["e"].append(fresh)
            return
        self._line += data
        while (end := self._line.find(b"\n")) != -1:
            record = bytes(self._line[:end])
            del self._line[: end + 1]
            self._record(record)

    def _record(self, record: bytes) -> None:
        seq_text, _, rest = record.partition(b" ")
        kind, _, payload = rest.partition(b" ")
        try:
            seq = int(seq_text)
        except ValueError:
            return  # not the shim's: a line the session printed before it started
        if seq <= self._seq:
            return  # replayed after a reconnect: delivered already
        self._seq = seq
        if kind == b"x":
            self._returncode = int(payload)
            self._eof = True
        elif kind in (b"o", b"e"):
            self._queues[kind.decode()].append(base64.b64decode(payload))

    async def _stream_ended(self) -> None:
        """The log ended cleanly: the exit record came, or ask Daytona how it went."""
        if self._eof:
            await self._cleanup()
            return
        cmd = await self._sdk.process.get_session_command(self._session, self._cmd_id)
        if cmd.exit_code is None:
            raise _Cut("the logs stream ended while the command runs")
        self._returncode = int(cmd.exit_code)
        self._eof = True
        await self._cleanup()

    async def drop_stream(self) -> None:
        """Close the logs WebSocket, if open (the sandbox is going away)."""
        await self._drop_ws()

    async def _drop_ws(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await ws.close()

    async def _cleanup(self) -> None:
        """End the command's session (it holds a shell in the sandbox); once."""
        if self._cleaned:
            return
        self._cleaned = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
            try:
                await self._sdk.process.delete_session(self._session)
            except (DaytonaError, aiohttp.ClientError):
                pass  # the sandbox is gone, or the session with it


class _Cut(Exception):
    """The logs stream broke; it is opened again."""
