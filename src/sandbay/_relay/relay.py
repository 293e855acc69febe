"""sandbay's relay: runs the ``claude`` CLI inside a sandbox for a host-side Agent SDK.

sandbay uploads this file and ``wire.py`` beside it into a sandbox and runs it with the
sandbox's Python. Standard library only (Python 3.10+); it never imports claude_agent_sdk.
The wire is described in ``wire.py``. Three commands:

``serve --run-dir DIR [--cli-user USER] [--tenant NAME --tenant-root ROOT] [--cli-wrapper JSON]``
    Reads one ``start`` frame from stdin (argv, environment with the secrets, working
    directory), starts the CLI, then passes the host's ``input`` frames on to the CLI in order
    and each CLI stdout line back as a ``line`` envelope, logged to ``DIR`` with its sequence
    number; sends the host requests (``request``) and routes its ``reply`` frames back. If the
    host's stream breaks it carries on logging, so nothing is lost. It exits when the CLI has.
    ``DIR`` is the relay's alone (mode 0700). Run as root, it starts the CLI as ``USER``
    (``uid[:gid]`` or a name, supplementary groups cleared), or with ``--tenant`` as that
    tenant's own uid, its directories under ``ROOT`` made 0700 and owned by it; so neither
    the CLI nor its tools can reach the relay's process or files. ``--cli-wrapper`` (a JSON
    list) is put before the CLI's argv: a namespace the CLI runs in, without the relay.

``attach --run-dir DIR --writer NAME``
    Passes ``input`` and ``end_input`` frames of writer NAME from its stdin to the serving
    relay of that run (through the run's input socket), so a host process other than the one
    that started the run can write to the CLI. Prints one line first, ``{"input_seq": N}``
    (the writer's last input the CLI got), then the same again after each frame passed on.

``replay --run-dir DIR --after N``
    Prints the logged envelopes numbered above N and follows the log until the run ends,
    so a host that lost its stream picks up where it left off.
"""

from __future__ import annotations

import binascii
import collections
import contextlib
import fcntl
import grp
import json
import os
import pwd
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

# Not ``typing``'s: what the relay imports is paid for by every cold start (mypy reads any
# ``TYPE_CHECKING`` as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import IO, Any

if TYPE_CHECKING or __package__:
    from . import wire
else:  # run as a script: wire.py lies beside it
    import wire


class Emitter:
    """Writes envelopes to the log (logged kinds) and to stdout while it lasts."""

    def __init__(self, run_dir: str) -> None:
        _private_dir(run_dir)
        self.log = open(os.path.join(run_dir, wire.LOG_NAME), "ab")
        self.seq = 0
        self.stdout_ok = True
        self.lock = threading.Lock()
        self.timings: dict[str, float | None] = dict.fromkeys(wire.TIMING_NAMES)

    def emit(self, kind: str, data: Any) -> bool:
        return self.emit_raw(kind, json.dumps(data, separators=(",", ":")).encode())

    def emit_raw(self, kind: str, data: bytes) -> bool:
        """Emit an envelope around ``data``, the text of one JSON object, as it is.

        Returns whether it reached the host's stream (a logged envelope is in the log either
        way).
        """
        with self.lock:
            logged = kind in wire.LOGGED_KINDS
            if logged:
                self.seq += 1
            head = f'{{"sandbay":{wire.VERSION},"seq":{self.seq if logged else 0},'
            line = head.encode() + f'"kind":"{kind}","data":'.encode() + data + b"}\n"
            if logged:
                self.log.write(line)
                self.log.flush()
            if self.stdout_ok:
                try:
                    sys.stdout.buffer.write(line)
                    sys.stdout.buffer.flush()
                except (BrokenPipeError, OSError):
                    # The host's stream broke; it will reattach with ``replay``. Point stdout
                    # at /dev/null so the interpreter's final flush does not fail either.
                    self.stdout_ok = False
                    devnull = os.open(os.devnull, os.O_WRONLY)
                    os.dup2(devnull, sys.stdout.fileno())
                    os.close(devnull)
            return self.stdout_ok

    def emit_line(self, line: bytes) -> bool:
        """Write an unlogged envelope line to stdout; whether it got there."""
        with self.lock:
            if self.stdout_ok:
                try:
                    sys.stdout.buffer.write(line)
                    sys.stdout.buffer.flush()
                except (BrokenPipeError, OSError):
                    self.stdout_ok = False
            return self.stdout_ok

    def reached(self, name: str) -> None:
        """Record a milestone (monotonic ms) and send the milestones so far."""
        if self.timings[name] is None:
            self.timings[name] = round(time.monotonic() * 1000, 3)
            self.emit("timings", self.timings)


class Channel:
    """Requests from the relay to the host, answered by the host's ``reply`` frames.

    Requests go out on the relay's stdout, or, once the host reattached after a cut
    stream, on the newest link (a ``replay --link`` connected to the input socket), which
    also carries the replies back. A request that got no reply yet is sent again on a new
    link (the host answers an id once).
    """

    def __init__(self, emitter: Emitter) -> None:
        self.emitter = emitter
        self.lock = threading.Condition()
        self.next_id = 0
        self.pending: dict[int, queue.Queue[dict[str, Any] | None]] = {}
        self.unanswered: dict[int, bytes] = {}
        self.links: list[Callable[[bytes], None]] = []
        self.stdin_open = True

    def request(self, method: str, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Send a request; yield the data of each reply part, the final one last.

        Raises:
            ChannelError: The host answered with an error, the channel is full, or the
                host's stream is gone and no link came within `wire.LINK_WAIT_S`.
        """
        with self.lock:
            if len(self.pending) >= wire.MAX_INFLIGHT:
                raise ChannelError("Busy", f"more than {wire.MAX_INFLIGHT} requests at once")
            self.next_id = self.next_id % wire.MAX_REQUEST_ID + 1
            rid = self.next_id
            replies: queue.Queue[dict[str, Any] | None] = queue.Queue()
            self.pending[rid] = replies
            data = {"id": rid, "method": method, "payload": payload}
            envelope = {"sandbay": wire.VERSION, "seq": 0, "kind": "request", "data": data}
            line = json.dumps(envelope, separators=(",", ":")).encode() + b"\n"
            self.unanswered[rid] = line
        try:
            if not self._send(line):
                raise ChannelError("Disconnected", "the host's stream is gone")
            while True:
                frame = replies.get()
                if frame is None:
                    raise ChannelError("Disconnected", "the host's stream ended")
                if "error" in frame:
                    error = frame["error"]
                    raise ChannelError(error["type"], error["message"])
                yield frame["data"]
                if frame["final"]:
                    return
        finally:
            with self.lock:
                self.pending.pop(rid, None)
                self.unanswered.pop(rid, None)

    def _send(self, line: bytes) -> bool:
        deadline = time.monotonic() + wire.LINK_WAIT_S
        with self.lock:
            while True:
                while self.links:
                    try:
                        self.links[-1](line)
                        return True
                    except OSError:
                        self.links.pop()
                if self.stdin_open and self.emitter.stdout_ok:
                    break
                # The host's stream is gone: wait for it to reattach with a link.
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.lock.wait(left)
        return self.emitter.emit_line(line)

    def add_link(self, send: Callable[[bytes], None]) -> None:
        """A reattached host: requests go there from now on, unanswered ones again."""
        with self.lock:
            self.links.append(send)
            for line in list(self.unanswered.values()):
                with contextlib.suppress(OSError):
                    send(line)
            self.lock.notify_all()

    def drop_link(self, send: Callable[[bytes], None]) -> None:
        with self.lock:
            if send in self.links:
                self.links.remove(send)

    def deliver(self, frame: dict[str, Any]) -> None:
        """Route a ``reply`` frame to its request (one no longer waited for is dropped)."""
        with self.lock:
            replies = self.pending.get(frame["id"])
            self.unanswered.pop(frame["id"], None)
        if replies is not None:
            replies.put(frame)

    def close(self) -> None:
        """The host's stdin ended: without a link, every waiting request fails."""
        with self.lock:
            self.stdin_open = False
            if not self.links:
                for replies in self.pending.values():
                    replies.put(None)
            self.lock.notify_all()


class ChannelError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class InputGate:
    """Passes numbered inputs on to the CLI's stdin in order, each once, from any writer."""

    def __init__(self, target: IO[bytes], emitter: Emitter | None = None) -> None:
        self.target = target
        self.emitter = emitter
        self.lock = threading.Lock()
        self.applied: dict[str, int] = {}
        self.ended = False
        self.attached = 0

    def orphaned(self, keep_s: float) -> None:
        """The host's stream ended without ``end_input``: end the input after ``keep_s``
        seconds in which no writer was attached."""
        deadline = time.monotonic() + keep_s
        while not self.ended:
            if self.attached:
                deadline = time.monotonic() + keep_s
            elif time.monotonic() >= deadline:
                self.end()
                return
            time.sleep(0.1)

    def last(self, writer: str) -> int:
        with self.lock:
            return self.applied.get(writer, 0)

    def apply(self, frame: dict[str, Any]) -> int:
        """Pass on an ``input`` or ``end_input`` frame; return its writer's last input number.

        Raises:
            wire.WireError: An input number that skips one (an input was lost).
        """
        writer = frame.get("writer", wire.HOST_WRITER)
        with self.lock:
            last = self.applied.get(writer, 0)
            if frame["kind"] == "end_input":
                self._end()
            elif frame["n"] > last + 1:
                raise wire.WireError(f"input {frame['n']} follows input {last} of {writer!r}")
            elif frame["n"] == last + 1 and not self.ended:
                self.applied[writer] = last = frame["n"]
                try:
                    self.target.write(frame["data"].encode())
                    self.target.flush()
                except (BrokenPipeError, OSError):
                    pass  # the CLI exited: its stdout ends and its exit code is reported
                if self.emitter is not None and _is_user_message(frame["data"]):
                    self.emitter.reached("prompt_in_ms")
            return last

    def end(self) -> None:
        with self.lock:
            self._end()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            try:
                self.target.close()
            except OSError:
                pass


def _is_user_message(data: str) -> bool:
    """Whether an input is a user message (only for the relay's timings: inputs pass on as
    they came, whatever they are)."""
    if '"user"' not in data:
        return False
    try:
        return bool(json.loads(data).get("type") == "user")
    except (ValueError, AttributeError):
        return False


def find_cli() -> str | None:
    """The ``claude`` to run when the host named none (``ClaudeAgentOptions.cli_path``).

    One rule on every provider: the ``claude`` bundled with a claude-agent-sdk that this
    Python can import, else ``claude`` on ``PATH``. The local providers run the relay with
    the host's Python, so they get the CLI the host's SDK was released with; an agent image
    has no SDK and holds that same binary at ``/opt/sandbay/bin/claude``, first on its
    ``PATH``. ``find_spec`` of a top-level package locates it without importing it.
    """
    locations: list[str] = []
    if not sys.flags.no_site:
        import importlib.util

        try:
            spec = importlib.util.find_spec("claude_agent_sdk")
        except (ImportError, ValueError):
            spec = None
        locations += (spec.submodule_search_locations or []) if spec else []
    else:
        # Run with -S (as root the relay reads no .pth file a tool could have planted): look
        # where site would have, the venv of this interpreter included.
        prefix = os.path.dirname(os.path.dirname(os.path.abspath(sys.executable)))
        version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
        for base in (prefix, sys.prefix):
            for lib in ("lib", "lib64"):
                for sub in ("site-packages", "dist-packages"):
                    locations.append(os.path.join(base, lib, version, sub, "claude_agent_sdk"))
    for location in locations:
        bundled = os.path.join(location, "_bundled", "claude")
        if os.path.isfile(bundled) and os.access(bundled, os.X_OK):
            return bundled
    import shutil  # only here: every import is paid for by each cold start

    return shutil.which("claude")


#: The first uid the relay gives a tenant of its own (as root, `--tenant`).
TENANT_UID_BASE = 200000


def _private_dir(path: str, *, uid: int | None = None) -> None:
    """Make ``path`` (and missing parents) a directory of ``uid`` (default: this process's
    user), mode 0700, or refuse one that is a link or someone else's."""
    owner = os.geteuid() if uid is None else uid
    old = os.umask(0o077)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    finally:
        os.umask(old)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise OSError(f"{path} is not a directory")
    if info.st_uid != owner:
        if info.st_uid != os.geteuid():
            raise OSError(f"{path} belongs to uid {info.st_uid}, not to {owner}")
        os.chown(path, owner, owner, follow_symlinks=False)
    os.chmod(path, 0o700)  # a directory, checked above: no link to follow


def _resolve_user(text: str) -> tuple[int, int, str]:
    """``uid[:gid]`` or ``name[:group]``: the uid, gid and home directory."""
    name, _, group = text.partition(":")
    entry: pwd.struct_passwd | None
    if name.isdigit():
        uid = int(name)
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            entry = None
    else:
        entry = pwd.getpwnam(name)
        uid = entry.pw_uid
    if group:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    else:
        gid = entry.pw_gid if entry else uid
    return uid, gid, entry.pw_dir if entry else "/"


def _tenant_uid(root: str, name: str) -> int:
    """The uid of tenant ``name`` (given once, kept in ``root``), its directories made.

    As root: ``root`` is root's (mode 0711: a tenant reaches its own directory but lists no
    other), ``root/name`` and its ``work``, ``home`` and ``tmp`` the tenant's, mode 0700.
    """
    if not name or name.startswith(".") or "/" in name:
        raise ValueError(f"bad tenant name {name!r}")
    os.makedirs(root, mode=0o711, exist_ok=True)
    info = os.lstat(root)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0:
        raise OSError(f"{root} is not root's directory")
    os.chmod(root, 0o711)
    fd = os.open(os.path.join(root, ".uids"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with os.fdopen(os.dup(fd), "r+", encoding="utf-8") as registry:
            text = registry.read()
            uids: dict[str, int] = json.loads(text) if text.strip() else {}
            uid = uids.get(name)
            if uid is None:
                uid = TENANT_UID_BASE + len(uids)
                uids[name] = uid
                registry.seek(0)
                registry.truncate()
                registry.write(json.dumps(uids))
    finally:
        os.close(fd)
    for sub in ("", "work", "home", "tmp"):
        _private_dir(os.path.join(root, name, sub) if sub else os.path.join(root, name), uid=uid)
    return uid


def _die_with_parent() -> None:
    """In the CLI's child process: be killed when the relay dies (Linux), so none outlives it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _pump_stdout(cli: subprocess.Popen[bytes], emitter: Emitter) -> None:
    stdout = cli.stdout
    assert stdout is not None
    while True:
        line = stdout.readline(wire.MAX_LINE + 1)
        if not line:
            return
        if len(line) > wire.MAX_LINE and not line.endswith(b"\n"):
            emitter.emit(
                "error",
                {
                    "type": "ProtocolError",
                    "message": f"the CLI wrote a line longer than {wire.MAX_LINE} bytes",
                    "exit_code": None,
                    "stderr": "",
                },
            )
            cli.kill()
            return
        text = line.strip()
        # As the SDK does: lines that are not a JSON object (debug output) carry no message.
        if not text.startswith(b"{"):
            continue
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            emitter.emit(
                "error",
                {
                    "type": "ProtocolError",
                    "message": f"the CLI wrote a line that is not JSON: {text[:200]!r}",
                    "exit_code": None,
                    "stderr": "",
                },
            )
            cli.kill()
            return
        # A whole JSON object: spliced in as it came, without encoding it again.
        emitter.reached("cli_first_line_ms")
        if emitter.timings["prompt_in_ms"] is not None and wire.sdk_yields(parsed):
            emitter.reached("first_message_ms")
        emitter.emit_raw("line", text)


def _pump_stderr(
    cli: subprocess.Popen[bytes], emitter: Emitter, tail: collections.deque[str]
) -> None:
    stderr = cli.stderr
    assert stderr is not None
    while True:
        line = stderr.readline(wire.MAX_STDERR_LINE)
        if not line:
            return
        if not line.endswith(b"\n"):
            # Cut the rest of an over-long line.
            while (rest := stderr.readline(wire.MAX_STDERR_LINE)) and not rest.endswith(b"\n"):
                pass
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
        tail.append(text)
        emitter.emit("stderr", {"line": text})


def _read_host(
    stdin: IO[bytes],
    gate: InputGate,
    channel: Channel,
    fail: Callable[[str], None],
    keep_input_s: float,
) -> None:
    """Route the host's frames: inputs to the CLI (through ``gate``), replies to ``channel``.

    End of file without ``end_input`` leaves the CLI's input open ``keep_input_s`` for an
    ``attach``.
    """
    try:
        while True:
            line = stdin.readline(wire.MAX_HOST_FRAME + 1)
            if not line:
                channel.close()
                gate.orphaned(keep_input_s)
                return
            if not line.strip():
                continue
            try:
                if not line.endswith(b"\n") and len(line) > wire.MAX_HOST_FRAME:
                    raise wire.WireError(f"a frame longer than {wire.MAX_HOST_FRAME} bytes")
                frame = wire.parse_host_frame(line)
                if frame["kind"] == "start":
                    raise wire.WireError("a second 'start'")
                if frame["kind"] == "reply":
                    channel.deliver(frame)
                else:
                    gate.apply(frame)
            except wire.WireError as exc:
                fail(f"the host sent a malformed frame: {exc}")
                return
    except OSError:
        return
    finally:
        channel.close()


class AttachServer:
    """The run's input socket: ``relay.py attach`` of another host process writes through it."""

    def __init__(self, run_dir: str, gate: InputGate, channel: Channel) -> None:
        self.path = os.path.join(run_dir, wire.INPUT_SOCKET)
        self.gate = gate
        self.channel = channel
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket: the relay's user only
        try:
            self.sock.bind(self.path)
        finally:
            os.umask(old)
        self.sock.listen(4)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with self.gate.lock:
            self.gate.attached += 1
        try:
            self._serve_writer(conn)
        finally:
            with self.gate.lock:
                self.gate.attached -= 1

    def _serve_link(self, conn: socket.socket, reader: IO[bytes]) -> None:
        _serve_link_of(self.channel, conn, reader)

    def _serve_writer(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            try:
                hello = json.loads(reader.readline(256) or b"null")
                if hello == {"link": True}:
                    self._serve_link(conn, reader)
                    return
                writer = hello.get("writer") if isinstance(hello, dict) else None
                if not isinstance(writer, str) or not wire.WRITER_PATTERN.fullmatch(writer):
                    raise wire.WireError("attach must first name its writer")
                conn.sendall(_seq_line(self.gate.last(writer)))
                while line := reader.readline(wire.MAX_HOST_FRAME + 1):
                    frame = wire.parse_host_frame(line)
                    if frame["kind"] not in ("input", "end_input"):
                        raise wire.WireError(f"{frame['kind']!r} cannot be attached")
                    if frame["kind"] == "input" and frame.get("writer") != writer:
                        raise wire.WireError(f"an input of another writer than {writer!r}")
                    conn.sendall(_seq_line(self.gate.apply({**frame, "writer": writer})))
            except (wire.WireError, ValueError) as exc:
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps({"error": str(exc)}).encode() + b"\n")
            except OSError:
                pass


#: Run in the CLI's network namespace, where it has one apart from the relay's (a nested
#: bwrap): listens on 127.0.0.1 there, points ``ANTHROPIC_BASE_URL`` at that, and carries
#: each connection to the relay's model socket (argv[1], bound into the namespace); then it
#: becomes the CLI (argv after ``--``), its pump living on in a child that dies with it.
FORWARDER = """
import ctypes, os, signal, socket, sys, threading
path, argv = sys.argv[1], sys.argv[3:]
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(64)
port = server.getsockname()[1]
if os.fork() == 0:
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    except Exception:
        pass
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    def pump(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass
    def carry(conn):
        up = socket.socket(socket.AF_UNIX)
        try:
            up.connect(path)
        except OSError:
            conn.close()
            return
        threading.Thread(target=pump, args=(up, conn), daemon=True).start()
        pump(conn, up)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=carry, args=(conn,), daemon=True).start()
server.close()
os.environ["ANTHROPIC_BASE_URL"] = f"http://127.0.0.1:{port}"
os.execvp(argv[0], argv)
"""


class ModelListener:
    """The model's endpoint for the CLI, inside the sandbox: each HTTP request it gets is
    carried to the host as a ``model.http`` request, and the response bytes the host sends
    back are written to the client as they arrive (event streams stream).

    Listens on 127.0.0.1 in the sandbox's own network namespace; the host checks the run's
    token, puts the real credential in its place and forwards the request.
    """

    def __init__(self, channel: Channel, *, path: str | None = None) -> None:
        self.channel = channel
        if path is None:
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", 0))
            self.url: str | None = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        else:
            # The CLI runs in a network namespace of its own: it reaches this socket through
            # a forwarder in its namespace (`FORWARDER`), which gives it the URL.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(path)
            self.url = None
        self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            try:
                if conn.family == socket.AF_INET:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                request = _read_http_request(reader)
                if request is None:
                    return
                head, body = request
                payload = {"head": head.decode("latin-1"), "body": _b64(body)}
                started = False
                try:
                    for part in self.channel.request("model.http", payload):
                        data = part.get("data")
                        if isinstance(data, str) and data:
                            conn.sendall(binascii.a2b_base64(data))
                            started = True
                except ChannelError as exc:
                    if not started:
                        status = (
                            "401 Unauthorized" if exc.kind == "Unauthorized" else "502 Bad Gateway"
                        )
                        conn.sendall(_http_error(status, str(exc)))
            except _HttpError as exc:
                conn.sendall(_http_error(exc.status, exc.message))
            except (OSError, ValueError):
                pass  # the client went away, or the host sent bytes that do not decode


class EgressProxy:
    """An HTTP proxy for the CLI and its tools whose every tunnel is checked and carried by
    the host (``egress.open``, ``egress.send``, ``egress.ack``, ``egress.close``).

    Takes ``CONNECT host:port`` and plain-HTTP absolute-form requests (``GET http://...``,
    forwarded as origin-form with ``connection: close``). Listens on 127.0.0.1 in this
    namespace (``tcp``), or on a Unix socket a forwarder in the CLI's namespace connects to.
    A request for the model listener's own address is connected to it here, so the model is
    reached whatever the client makes of ``NO_PROXY``.
    """

    def __init__(self, channel: Channel, where: str, model_url: str | None) -> None:
        self.channel = channel
        self.model = model_url.rpartition("/")[2] if model_url else None
        if where == "tcp":
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        else:
            path = where.partition(":")[2]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.bind(path)
            os.chmod(path, 0o666)  # the CLI's user connects (the directory guards it)
            self.url = f"http://127.0.0.1:{wire.EGRESS_FORWARDER_PORT}"
        self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            try:
                head = b""
                while len(head) <= wire.MAX_PROXY_HEAD:
                    line = reader.readline(wire.MAX_PROXY_HEAD + 1)
                    if not line:
                        return
                    head += line
                    if line in (b"\r\n", b"\n"):
                        break
                else:
                    conn.sendall(_proxy_error("431 Request Header Fields Too Large"))
                    return
                target = _proxy_target(head)
                if target is None:
                    conn.sendall(_proxy_error("400 Bad Request"))
                    return
                host, port, first = target
                if self.model is not None and f"{host}:{port}" == self.model:
                    self._local(conn, reader, port, first)
                    return
                self._tunnel(conn, reader, host, port, first)
            except (OSError, ValueError):
                pass

    def _local(self, conn: socket.socket, reader: IO[bytes], port: int, first: bytes) -> None:
        up = socket.create_connection(("127.0.0.1", port))
        with up:
            if not first:
                conn.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            else:
                up.sendall(first)
            thread = threading.Thread(target=_pump_socket, args=(up, conn), daemon=True)
            thread.start()
            try:
                while data := reader.read1(65536):  # type: ignore[attr-defined]
                    up.sendall(data)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                up.shutdown(socket.SHUT_WR)
            thread.join()

    def _tunnel(
        self, conn: socket.socket, reader: IO[bytes], host: str, port: int, first: bytes
    ) -> None:
        replies = self.channel.request("egress.open", {"host": host, "port": port})
        try:
            opened = next(replies)
            tid = opened.get("tunnel")
            if not isinstance(tid, str):
                raise ChannelError("ProtocolError", "the host opened no tunnel")
        except ChannelError as exc:
            status = "403 Forbidden" if exc.kind == "Forbidden" else "502 Bad Gateway"
            conn.sendall(_proxy_error(status, str(exc)))
            return
        except StopIteration:
            conn.sendall(_proxy_error("502 Bad Gateway", "the host opened no tunnel"))
            return
        if not first:
            conn.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        sender = threading.Thread(
            target=self._upstream, args=(conn, reader, tid, first), daemon=True
        )
        sender.start()
        passed = acked = 0
        try:
            for part in replies:
                data = part.get("data")
                if isinstance(data, str) and data:
                    chunk = binascii.a2b_base64(data)
                    conn.sendall(chunk)
                    passed += len(chunk)
                    if passed - acked >= wire.EGRESS_WINDOW // 2:
                        acked = passed
                        for _ in self.channel.request(
                            "egress.ack", {"tunnel": tid, "acked": acked}
                        ):
                            pass
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
            sender.join()
        except (ChannelError, OSError):
            replies.close()  # type: ignore[attr-defined]
            with contextlib.suppress(ChannelError):
                for _ in self.channel.request("egress.close", {"tunnel": tid}):
                    pass

    def _upstream(self, conn: socket.socket, reader: IO[bytes], tid: str, first: bytes) -> None:
        try:
            if first:
                self._send(tid, first, False)
            while True:
                data = reader.read1(wire.EGRESS_CHUNK)  # type: ignore[attr-defined]
                if not data:
                    self._send(tid, b"", True)
                    return
                self._send(tid, data, False)
        except (ChannelError, OSError, ValueError):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _send(self, tid: str, data: bytes, eof: bool) -> None:
        payload = {"tunnel": tid, "data": _b64(data), "eof": eof}
        for _ in self.channel.request("egress.send", payload):
            pass


def _proxy_env(url: str, model_url: str | None) -> dict[str, str]:
    """The proxy variables for the CLI and its tools (both spellings, as tools differ)."""
    no_proxy = model_url.rpartition("/")[2] if model_url else ""
    env = {}
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"):
        value = no_proxy if name == "NO_PROXY" else url
        env[name] = env[name.lower()] = value
    return env


def _proxy_target(head: bytes) -> tuple[str, int, bytes] | None:
    """``(host, port, first bytes to send)`` of a proxy request head, or ``None``.

    CONNECT sends nothing first; an absolute-form request is sent as origin-form with
    ``connection: close`` (one request per connection).
    """
    text = head.decode("latin-1")
    lines = text.replace("\r\n", "\n").split("\n")
    words = lines[0].split(" ")
    if len(words) != 3 or not words[2].startswith("HTTP/1."):
        return None
    method, target, version = words
    if method == "CONNECT":
        host, port = _host_port(target, None)
        return (host, port, b"") if host else None
    if not target.lower().startswith("http://"):
        return None
    rest = target[7:]
    authority, slash, path = rest.partition("/")
    host, port = _host_port(authority.rpartition("@")[2], 80)
    if not host:
        return None
    out = [f"{method} /{path if slash else ''} {version}"]
    for line in lines[1:]:
        name = line.partition(":")[0].strip().lower()
        if line and name not in (
            "connection",
            "proxy-connection",
            "keep-alive",
            "proxy-authorization",
        ):
            out.append(line)
    out.append("connection: close")
    return host, port, ("\r\n".join(out) + "\r\n\r\n").encode("latin-1")


def _host_port(text: str, default: int | None) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
    if not port_text and default is not None:
        return host, default
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        return "", 0
    return host, int(port_text)


def _pump_socket(a: socket.socket, b: socket.socket) -> None:
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        b.shutdown(socket.SHUT_WR)


def _proxy_error(status: str, message: str = "") -> bytes:
    body = (message or status).encode() + b"\n"
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: text/plain\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class _HttpError(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _read_http_request(reader: IO[bytes]) -> tuple[bytes, bytes] | None:
    """One HTTP/1.1 request's head and (de-chunked) body, bounded."""
    head = b""
    while True:
        line = reader.readline(wire.MAX_HTTP_HEAD + 1)
        if not line:
            return None
        head += line
        if len(head) > wire.MAX_HTTP_HEAD:
            raise _HttpError("431 Request Header Fields Too Large", "request head too long")
        if line in (b"\r\n", b"\n"):
            break
    length = 0
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            try:
                length = int(value.strip())
            except ValueError:
                raise _HttpError("400 Bad Request", "bad Content-Length") from None
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        body = b""
        while True:
            size_line = reader.readline(1024)
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError:
                raise _HttpError("400 Bad Request", "bad chunk") from None
            if size == 0:
                while reader.readline(8192) not in (b"\r\n", b"\n", b""):
                    pass
                break
            if len(body) + size > wire.MAX_HTTP_BODY:
                raise _HttpError("413 Content Too Large", "request body too large")
            body += reader.read(size)
            reader.readline(8)
        return head, body
    if not 0 <= length <= wire.MAX_HTTP_BODY:
        raise _HttpError("413 Content Too Large", "request body too large")
    return head, reader.read(length)


def _http_error(status: str, message: str) -> bytes:
    body = json.dumps(
        {"type": "error", "error": {"type": "sandbay_model_relay", "message": message}}
    ).encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _serve_link_of(channel: Channel, conn: socket.socket, reader: IO[bytes]) -> None:
    lock = threading.Lock()

    def send(line: bytes) -> None:
        with lock:
            conn.sendall(line)

    channel.add_link(send)
    try:
        while line := reader.readline(wire.MAX_HOST_FRAME + 1):
            frame = wire.parse_host_frame(line)
            if frame["kind"] != "reply":
                raise wire.WireError(f"a link carries replies, not {frame['kind']!r}")
            channel.deliver(frame)
    finally:
        channel.drop_link(send)


def _seq_line(n: int) -> bytes:
    return json.dumps({"input_seq": n}).encode() + b"\n"


def attach(run_dir: str, writer: str) -> int:
    """Pass ``input`` frames from stdin to the serving relay of ``run_dir``; print its acks."""
    path = os.path.join(run_dir, wire.INPUT_SOCKET)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    give_up = time.monotonic() + 10  # a run just started may not have its socket yet
    while True:
        try:
            sock.connect(path)
            sock.sendall(json.dumps({"writer": writer}).encode() + b"\n")
            break
        except OSError as exc:
            pid = _read_pid(run_dir)
            starting = pid is None or _alive(pid)
            if not starting or time.monotonic() > give_up or os.path.exists(path):
                _print_error("AgentError", f"the run is not running or takes no input: {exc}")
                return 1
            time.sleep(0.05)
    out = sys.stdout.buffer

    def acks() -> None:
        with sock.makefile("rb") as reader:
            for line in reader:
                out.write(line)
                out.flush()
        os._exit(0)  # the relay closed the connection (its run ended, or an error)

    threading.Thread(target=acks, daemon=True).start()
    for line in sys.stdin.buffer:
        sock.sendall(line)
    sock.shutdown(socket.SHUT_WR)
    threading.Event().wait()  # until the relay closes the connection
    return 0


def _run_channel(
    run_dir: str,
    cli: subprocess.Popen[bytes],
    emitter: Emitter,
    stdin: IO[bytes],
    path: str,
    start: dict[str, Any],
    channel: Channel,
    listener: ModelListener | None,
) -> None:
    """Once the CLI runs: report it, and route the host's frames and attached writers."""
    emitter.reached("cli_spawned_ms")
    assert cli.stdin is not None
    gate = InputGate(cli.stdin, emitter)

    def fail(message: str) -> None:
        emitter.emit(
            "error",
            {"type": "ProtocolError", "message": message, "exit_code": None, "stderr": ""},
        )
        cli.kill()

    ready = {"pid": os.getpid(), "cli_pid": cli.pid, "cli": path}
    if listener is not None and listener.url is not None:
        ready["model_url"] = listener.url
    emitter.emit("ready", ready)
    try:
        AttachServer(run_dir, gate, channel)
    except OSError as exc:  # a path too long for a socket, say: the run goes on without
        sys.stderr.write(f"sandbay relay: no input socket, attach is off: {exc}\n")
    # stdin may never end (the host keeps it open): it is read on a thread nobody joins.
    keep = float(start.get("keep_input_s", 0))
    threading.Thread(
        target=_read_host, args=(stdin, gate, channel, fail, keep), daemon=True
    ).start()


def serve(
    run_dir: str,
    *,
    cli_user: str | None = None,
    tenant: str | None = None,
    tenant_root: str | None = None,
    wrapper: list[str] | None = None,
    socket_dir: str | None = None,
    socket_dir_inner: str | None = None,
    start_line: bytes | None = None,
) -> int:
    emitter = Emitter(run_dir)
    emitter.reached("relay_start_ms")
    with open(os.path.join(run_dir, wire.PID_NAME), "w", encoding="ascii") as fh:
        fh.write(str(os.getpid()))
    stdin = sys.stdin.buffer
    stderr_tail: collections.deque[str] = collections.deque(maxlen=40)

    def fail(kind: str, message: str, exit_code: int | None = None) -> int:
        emitter.emit(
            "error",
            {
                "type": kind,
                "message": message,
                "exit_code": exit_code,
                "stderr": "\n".join(stderr_tail),
            },
        )
        return 1

    first = start_line if start_line is not None else stdin.readline(wire.MAX_HOST_FRAME + 1)
    try:
        start = wire.parse_host_frame(first)
        if start["kind"] != "start":
            raise wire.WireError(f"a {start['kind']!r} frame first")
    except wire.WireError as exc:
        return fail("ProtocolError", f"the relay expected a start frame on stdin: {exc}")
    if start.get("boot_ms"):  # when this process began, before its imports
        emitter.timings["relay_boot_ms"] = float(start["boot_ms"])
    argv = list(start["argv"])
    env = dict(start.get("env", {}))
    cwd = start.get("cwd") or None
    channel = Channel(emitter)
    listener = None
    # With an egress proxy across the CLI's namespace, the CLI reaches the model through
    # that proxy, which connects to a listener here; otherwise through the model socket.
    proxied = str(start.get("egress_proxy") or "").startswith("unix:")
    if start.get("model_listener"):
        if socket_dir is not None and not proxied:
            listener = ModelListener(channel, path=os.path.join(socket_dir, "model.sock"))
        else:
            listener = ModelListener(channel)
            env["ANTHROPIC_BASE_URL"] = str(listener.url)
    if start.get("egress_proxy"):
        try:
            proxy = EgressProxy(channel, start["egress_proxy"], listener.url if listener else None)
        except OSError as exc:
            return fail(type(exc).__name__, f"cannot start the egress proxy: {exc}")
        # Through a forwarder, the model listener is not in the CLI's namespace: the CLI
        # reaches it through the proxy too (NO_PROXY empty), which connects to it here.
        direct = listener.url if listener and start["egress_proxy"] == "tcp" else None
        env.update(_proxy_env(proxy.url, direct))
    if start.get("find_cli"):
        cli_path = find_cli()
        if cli_path is None:
            return fail(
                "CLINotFoundError",
                "no claude CLI in this sandbox: neither a claude-agent-sdk importable by "
                f"{sys.executable} (its bundled CLI) nor claude on PATH "
                f"({os.environ.get('PATH', '')}). Run agents in sandbay's agent image "
                "(`sandbay image build`; it holds /opt/sandbay/bin/claude), install "
                "claude-agent-sdk for that Python, put claude on PATH, or set "
                "ClaudeAgentOptions.cli_path",
                127,
            )
        argv[0] = cli_path
    identity: dict[str, Any] = {}
    try:
        if tenant is not None and tenant_root is not None:
            uid = _tenant_uid(tenant_root, tenant)
            identity = {"user": uid, "group": uid, "extra_groups": []}
        elif cli_user is not None:
            uid, gid, home = _resolve_user(cli_user)
            identity = {"user": uid, "group": gid, "extra_groups": []}
            env.setdefault("HOME", home)
        if identity and os.geteuid() != 0:
            raise PermissionError("the relay must run as root to start the CLI as another user")
    except (OSError, KeyError, ValueError) as exc:
        return fail(type(exc).__name__, f"cannot prepare the CLI's user: {exc}", 126)
    if listener is not None and listener.url is None and socket_dir is not None:
        inner = os.path.join(socket_dir_inner or socket_dir, "model.sock")
        argv = [sys.executable, "-E", "-s", "-S", "-c", FORWARDER, inner, "--", *argv]
    if wrapper:
        argv = [*wrapper, *argv]
        cwd = None  # the wrapper enters it, inside its namespace
    try:
        cli = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **env},
            cwd=cwd,
            preexec_fn=_die_with_parent,  # only prctl (after the user switch): takes no locks
            **identity,
        )
    except OSError as exc:
        return fail(type(exc).__name__, f"cannot start {argv[0]}: {exc}", 127)

    def stop(signum: int, _frame: object) -> None:
        cli.kill()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    _run_channel(run_dir, cli, emitter, stdin, argv[0], start, channel, listener)
    threads = [
        threading.Thread(target=_pump_stdout, args=(cli, emitter), daemon=True),
        threading.Thread(target=_pump_stderr, args=(cli, emitter, stderr_tail), daemon=True),
    ]
    for thread in threads:
        thread.start()
    code = cli.wait()
    for thread in threads:
        thread.join()
    emitter.emit("end", {"exit_code": code, "stderr": "\n".join(stderr_tail)})
    return 0


def _link(run_dir: str, out_lock: threading.Lock) -> None:
    """Carry the serving relay's requests to stdout and the host's replies from stdin."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.path.join(run_dir, wire.INPUT_SOCKET))
        sock.sendall(b'{"link": true}\n')
    except OSError:
        return  # the run has ended, or takes no requests: a plain replay

    def requests() -> None:
        with sock.makefile("rb") as reader:
            for line in reader:
                with out_lock:
                    sys.stdout.buffer.write(line)
                    sys.stdout.buffer.flush()

    def replies() -> None:
        with contextlib.suppress(OSError):
            for line in sys.stdin.buffer:
                sock.sendall(line)

    threading.Thread(target=requests, daemon=True).start()
    threading.Thread(target=replies, daemon=True).start()


def replay(run_dir: str, after: int, link: bool = False) -> int:
    path = os.path.join(run_dir, wire.LOG_NAME)
    pid = _read_pid(run_dir)
    give_up = time.monotonic() + 10
    while not os.path.exists(path):
        if time.monotonic() > give_up:
            _print_error("LookupError", f"no run log at {path}")
            return 2
        time.sleep(0.05)
    out_lock = threading.Lock()
    if link:
        _link(run_dir, out_lock)
    out = _LockedOut(sys.stdout.buffer, out_lock)
    with open(path, "rb") as log:
        pending = b""
        while True:
            chunk = log.readline()
            if chunk:
                pending += chunk
                if not pending.endswith(b"\n"):
                    continue  # a line still being written
                line, pending = pending, b""
                envelope = json.loads(line)
                if envelope["seq"] > after:
                    out.write(line)
                    out.flush()
                if envelope["kind"] in wire.FINAL_KINDS:
                    return 0
                continue
            if pid is not None and not _alive(pid):
                rest = log.read()
                if rest:
                    pending += rest
                    continue
                _print_error("AgentError", "the relay died before the run ended")
                return 1
            time.sleep(0.02)


class _LockedOut:
    def __init__(self, out: IO[bytes], lock: threading.Lock) -> None:
        self.out = out
        self.lock = lock

    def write(self, line: bytes) -> None:
        with self.lock:
            self.out.write(line)

    def flush(self) -> None:
        with self.lock:
            self.out.flush()


def _print_error(kind: str, message: str) -> None:
    # Not logged, so seq 0: the host reads it as the end of this replay.
    data = {"type": kind, "message": message, "exit_code": None, "stderr": ""}
    envelope = {"sandbay": wire.VERSION, "seq": 0, "kind": "error", "data": data}
    print(json.dumps(envelope), flush=True)


def _read_pid(run_dir: str) -> int | None:
    try:
        with open(os.path.join(run_dir, wire.PID_NAME), encoding="ascii") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None, *, start_line: bytes | None = None) -> int:
    """The relay's command line. ``start_line``: ``serve``'s start frame, already read from
    stdin by whoever ran this (the one-process install and start on the host's side)."""
    try:
        command, args = _parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as exc:
        sys.stderr.write(f"sandbay-relay: {exc}\n")
        return 2
    if command == "replay":
        code = replay(str(args["run_dir"]), int(args.get("after") or 0), bool(args.get("link")))
        sys.stdout.flush()
        os._exit(code)  # the link's threads may still block on reads
    if command == "attach":
        code = attach(str(args["run_dir"]), str(args["writer"]))
        sys.stdout.flush()
        os._exit(code)
    wrapper = args.get("cli_wrapper")
    code = serve(
        str(args["run_dir"]),
        cli_user=_opt(args, "cli_user"),
        tenant=_opt(args, "tenant"),
        tenant_root=_opt(args, "tenant_root"),
        wrapper=json.loads(wrapper) if isinstance(wrapper, str) else None,
        socket_dir=_opt(args, "socket_dir"),
        socket_dir_inner=_opt(args, "socket_dir_inner"),
        start_line=start_line,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    # The stdin thread may still be blocked on a read: leave without joining it.
    os._exit(code)


#: The relay's commands, each with its options (``True``: a flag; else required or not).
_COMMANDS: dict[str, dict[str, bool | None]] = {
    "serve": {
        "run_dir": None,
        "cli_user": False,
        "tenant": False,
        "tenant_root": False,
        "cli_wrapper": False,
        "socket_dir": False,
        "socket_dir_inner": False,
    },
    "replay": {"run_dir": None, "after": False, "link": True},
    "attach": {"run_dir": None, "writer": None},
}


def _parse_args(argv: list[str]) -> tuple[str, dict[str, str | bool]]:
    """``COMMAND --option value ... --flag``, by `_COMMANDS` (not argparse: every module
    the relay imports is paid for by each cold start). Raises `ValueError` naming what is
    wrong."""
    if not argv or argv[0] not in _COMMANDS:
        raise ValueError(f"usage: sandbay-relay {{{','.join(_COMMANDS)}}} [options]")
    command, known = argv[0], _COMMANDS[argv[0]]
    args: dict[str, str | bool] = {}
    rest = argv[1:]
    while rest:
        option = rest.pop(0)
        name = option[2:].replace("-", "_")
        if not option.startswith("--") or name not in known:
            raise ValueError(f"{command}: unknown argument {option!r}")
        if known[name] is True:
            args[name] = True
        elif not rest:
            raise ValueError(f"{command}: {option} needs a value")
        else:
            value = rest.pop(0)
            if name == "after" and not value.isdigit():
                raise ValueError(f"{command}: --after takes a whole number")
            args[name] = value
    missing = [
        f"--{name.replace('_', '-')}"
        for name, kind in known.items()
        if kind is None and name not in args
    ]
    if missing:
        raise ValueError(f"{command}: {', '.join(missing)} required")
    return command, args


def _opt(args: dict[str, str | bool], name: str) -> str | None:
    value = args.get(name)
    return value if isinstance(value, str) else None


if __name__ == "__main__":
    sys.exit(main())
