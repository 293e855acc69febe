"""A Docker engine's API on a unix socket or loopback TCP, just enough to start one exec.

It answers ``GET /version``, ``POST /containers/<id>/exec`` and ``GET /exec/<id>/json``, and
the exec's ``POST /exec/<id>/start`` with the upgrade's headers and ``with_headers`` (the
exec's first bytes, frames of Docker's multiplexed stream) in one write, as the real engine
may. Then, without ``after_stdin``, it closes the stream (the exec is over); with it, it reads
the client's stdin until the client ends it and sends those bytes one write at a time, a
moment apart, and closes.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any


def frame(data: bytes, stream: int = 1) -> bytes:
    """One frame of Docker's multiplexed stream (1: stdout, 2: stderr)."""
    return bytes([stream, 0, 0, 0]) + len(data).to_bytes(4, "big") + data


class FakeEngine:
    """See the module. ``url`` is the engine's address for ``DockerConfig(base_url=...)``.

    Args:
        transport: ``"unix"`` (a socket in ``folder``) or ``"tcp"`` (127.0.0.1).
        folder: Where the unix socket goes.
        with_headers: The bytes sent with the start's headers.
        after_stdin: The writes that follow once stdin ended, if any.
        exit_code: What inspecting the exec reports, with ``pid`` (0: it never started).
    """

    def __init__(
        self,
        transport: str,
        folder: Path,
        *,
        with_headers: bytes,
        after_stdin: list[bytes] | None = None,
        exit_code: int = 0,
        pid: int = 7,
    ) -> None:
        self._with_headers = with_headers
        self._after_stdin = after_stdin
        self._inspect = {"Running": False, "ExitCode": exit_code, "Pid": pid}
        if transport == "unix":
            path = str(folder / "docker.sock")
            self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._server.bind(path)
            self.url = f"unix://{path}"
        else:
            self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._server.bind(("127.0.0.1", 0))
            self.url = f"tcp://127.0.0.1:{self._server.getsockname()[1]}"
        self._server.listen(8)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.close()
        self._thread.join(5)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            while request := reader.readline():
                headers: dict[str, str] = {}
                while (line := reader.readline().strip()) != b"":
                    key, _, value = line.decode().partition(":")
                    headers[key.strip().lower()] = value.strip()
                reader.read(int(headers.get("content-length", "0")))
                method, target = request.decode().split()[:2]
                if method == "POST" and target.endswith("/start"):
                    conn.sendall(
                        b"HTTP/1.1 101 UPGRADED\r\nContent-Type: "
                        b"application/vnd.docker.raw-stream\r\nConnection: Upgrade\r\n"
                        b"Upgrade: tcp\r\n\r\n" + self._with_headers
                    )
                    if self._after_stdin is not None:
                        with contextlib.suppress(OSError):  # the client may have hung up
                            while reader.read1(1 << 16):
                                pass  # stdin, until the client ends it
                            for piece in self._after_stdin:
                                conn.sendall(piece)
                                time.sleep(0.001)  # one read each, mostly
                    return
                if target.endswith("/version"):
                    body: Any = {"ApiVersion": "1.43", "Version": "fake"}
                elif method == "POST" and target.endswith("/exec"):
                    body = {"Id": "exec1"}
                else:  # GET /exec/exec1/json
                    body = self._inspect
                data = json.dumps(body).encode()
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(data)}\r\n\r\n".encode()
                    + data
                )
