"""sandbay's relay: runs the ``claude`` CLI inside a sandbox for a host-side Agent SDK.

sandbay uploads this file and ``wire.py`` beside it into a sandbox and runs it with the
sandbox's Python. Standard library only (Python 3.10+); it never imports claude_agent_sdk.
The wire is described in ``wire.py``. Two commands:

``serve --run-dir DIR [--cli-user USER] [--tenant NAME --tenant-root ROOT] [--cli-wrapper JSON]``
    Reads one ``start`` line from stdin (argv, environment with the secrets, working
    directory), starts the CLI, then passes stdin on to the CLI in order and each CLI stdout
    line back as a ``line`` envelope, logged to ``DIR`` with its sequence number. If the host's
    stream breaks it carries on logging, so nothing is lost. It exits when the CLI has.
    ``DIR`` is the relay's alone (mode 0700). Run as root, it starts the CLI as ``USER``
    (``uid[:gid]`` or a name, supplementary groups cleared), or with ``--tenant`` as that
    tenant's own uid, its directories under ``ROOT`` made 0700 and owned by it; so neither
    the CLI nor its tools can reach the relay's process or files. ``--cli-wrapper`` (a JSON
    list) is put before the CLI's argv: a namespace the CLI runs in, without the relay.

``replay --run-dir DIR --after N``
    Prints the logged envelopes numbered above N and follows the log until the run ends,
    so a host that lost its stream picks up where it left off.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import grp
import importlib.util
import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Any

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

    def emit(self, kind: str, data: Any) -> None:
        self.emit_raw(kind, json.dumps(data, separators=(",", ":")).encode())

    def emit_raw(self, kind: str, data: bytes) -> None:
        """Emit an envelope around ``data``, the text of one JSON object, as it is."""
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


def find_cli() -> str | None:
    """The ``claude`` to run when the host named none (``ClaudeAgentOptions.cli_path``).

    One rule on every provider: the ``claude`` bundled with a claude-agent-sdk that this
    Python can import, else ``claude`` on ``PATH``. The local providers run the relay with
    the host's Python, so they get the CLI the host's SDK was released with; an agent image
    has no SDK and holds that same binary at ``/opt/sandbay/bin/claude``, first on its
    ``PATH``. ``find_spec`` of a top-level package locates it without importing it.
    """
    try:
        spec = importlib.util.find_spec("claude_agent_sdk")
    except (ImportError, ValueError):
        spec = None
    locations = list((spec.submodule_search_locations or []) if spec else [])
    if sys.flags.no_site:
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


def _pump_stdin(stdin: IO[bytes], cli: subprocess.Popen[bytes]) -> None:
    """Pass the host's lines to the CLI in order; end its input on end of file or the marker."""
    target = cli.stdin
    assert target is not None
    end = wire.END_INPUT_LINE.encode()
    try:
        for line in stdin:
            if line.strip() == end:
                break
            target.write(line)
            target.flush()
    except (BrokenPipeError, OSError):
        pass  # the CLI exited: its stdout ends and its exit code is reported
    finally:
        try:
            target.close()
        except OSError:
            pass


def serve(
    run_dir: str,
    *,
    cli_user: str | None = None,
    tenant: str | None = None,
    tenant_root: str | None = None,
    wrapper: list[str] | None = None,
) -> int:
    emitter = Emitter(run_dir)
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

    first = stdin.readline()
    try:
        start = json.loads(first)
        argv = [str(a) for a in start["argv"]]
        env = {str(k): str(v) for k, v in start.get("env", {}).items()}
        cwd = start.get("cwd") or None
        if start.get("kind") != "start" or start.get("sandbay") != wire.VERSION or not argv:
            raise ValueError("not a start line of this wire version")
    except (ValueError, KeyError, TypeError, AttributeError):
        return fail("ProtocolError", "the relay expected a start line on stdin")
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
    emitter.emit("ready", {"pid": os.getpid(), "cli_pid": cli.pid, "cli": argv[0]})
    threads = [
        threading.Thread(target=_pump_stdout, args=(cli, emitter), daemon=True),
        threading.Thread(target=_pump_stderr, args=(cli, emitter, stderr_tail), daemon=True),
    ]
    for thread in threads:
        thread.start()
    # stdin may never end (the host keeps it open): it is read on a thread nobody joins.
    threading.Thread(target=_pump_stdin, args=(stdin, cli), daemon=True).start()
    code = cli.wait()
    for thread in threads:
        thread.join()
    emitter.emit("end", {"exit_code": code, "stderr": "\n".join(stderr_tail)})
    return 0


def replay(run_dir: str, after: int) -> int:
    path = os.path.join(run_dir, wire.LOG_NAME)
    pid = _read_pid(run_dir)
    give_up = time.monotonic() + 10
    while not os.path.exists(path):
        if time.monotonic() > give_up:
            _print_error("LookupError", f"no run log at {path}")
            return 2
        time.sleep(0.05)
    out = sys.stdout.buffer
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sandbay-relay")
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve")
    serve_cmd.add_argument("--run-dir", required=True)
    serve_cmd.add_argument("--cli-user")
    serve_cmd.add_argument("--tenant")
    serve_cmd.add_argument("--tenant-root")
    serve_cmd.add_argument("--cli-wrapper", type=json.loads)
    replay_cmd = sub.add_parser("replay")
    replay_cmd.add_argument("--run-dir", required=True)
    replay_cmd.add_argument("--after", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "replay":
        return replay(args.run_dir, args.after)
    code = serve(
        args.run_dir,
        cli_user=args.cli_user,
        tenant=args.tenant,
        tenant_root=args.tenant_root,
        wrapper=args.cli_wrapper,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    # The stdin thread may still be blocked on a read: leave without joining it.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
