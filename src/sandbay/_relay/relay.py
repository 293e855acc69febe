"""sandbay's relay: runs the ``claude`` CLI inside a sandbox for a host-side Agent SDK.

sandbay uploads this file and ``wire.py`` beside it into a sandbox and runs it with the
sandbox's Python. Standard library only (Python 3.10+); it never imports claude_agent_sdk.
The wire is described in ``wire.py``. Two commands:

``serve --run-dir DIR``
    Reads one ``start`` line from stdin (argv, environment with the secrets, working
    directory), starts the CLI, then passes stdin on to the CLI in order and each CLI stdout
    line back as a ``line`` envelope, logged to ``DIR`` with its sequence number. If the host's
    stream breaks it carries on logging, so nothing is lost. It exits when the CLI has.

``replay --run-dir DIR --after N``
    Prints the logged envelopes numbered above N and follows the log until the run ends,
    so a host that lost its stream picks up where it left off.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import shutil
import signal
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
        os.makedirs(run_dir, exist_ok=True)
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
    for location in (spec.submodule_search_locations or []) if spec else []:
        bundled = os.path.join(location, "_bundled", "claude")
        if os.path.isfile(bundled) and os.access(bundled, os.X_OK):
            return bundled
    return shutil.which("claude")


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


def serve(run_dir: str) -> int:
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
    try:
        cli = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **env},
            cwd=cwd,
            preexec_fn=_die_with_parent,  # only prctl: takes no locks
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
    replay_cmd = sub.add_parser("replay")
    replay_cmd.add_argument("--run-dir", required=True)
    replay_cmd.add_argument("--after", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "replay":
        return replay(args.run_dir, args.after)
    code = serve(args.run_dir)
    sys.stdout.flush()
    sys.stderr.flush()
    # The stdin thread may still be blocked on a read: leave without joining it.
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
