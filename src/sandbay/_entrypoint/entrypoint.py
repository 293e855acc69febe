"""sandbay's agent entrypoint. sandbay uploads this file into a sandbox and runs it there.

It needs only the standard library and claude-agent-sdk (Python 3.10+). Two commands:

``serve --run-dir DIR``
    Prints a ``ready`` envelope once claude_agent_sdk is imported, then reads JSON lines from
    stdin: an optional ``prepare`` (options: start the ``claude`` CLI and finish its handshake
    ahead of time) and one ``request`` (prompt, options, env). It runs the agent and writes one
    envelope per message to stdout and to ``DIR/messages.jsonl``. If the host's stream breaks,
    it carries on writing the log, so nothing is lost.

``replay --run-dir DIR --after N``
    Prints the logged envelopes with a sequence number above N and follows the log until the
    run ends, so a host that lost its stream picks up where it left off.

Envelope (one JSON object per line)::

    {"sandbay": 1, "seq": 7, "kind": "message", "data": {...stream-json message...}}

kinds: ``ready`` and ``prepared`` (seq 0, not logged), ``message``, ``error`` (data: type,
message, exit_code, stderr), ``end`` (data: {}). ``error`` and ``end`` close a run.
The ``data`` of a message is exactly the dict the ``claude`` CLI emitted and the SDK parsed, so
the host rebuilds the same typed message a local ``query()`` yields.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import traceback
from typing import Any

WIRE_VERSION = 1
LOG_NAME = "messages.jsonl"
PID_NAME = "pid"


class Emitter:
    """Writes envelopes to stdout while it lasts, and always to the log."""

    def __init__(self, run_dir: str) -> None:
        os.makedirs(run_dir, exist_ok=True)
        self.log = open(os.path.join(run_dir, LOG_NAME), "a", encoding="utf-8")
        self.seq = 0
        self.stdout_ok = True
        # Monotonic times inside the sandbox, reported with ``end`` (milliseconds apart).
        self.marks: dict[str, float] = {}

    def emit(self, kind: str, data: Any, *, logged: bool = True) -> None:
        if logged:
            self.seq += 1
        line = json.dumps(
            {"sandbay": WIRE_VERSION, "seq": self.seq if logged else 0, "kind": kind, "data": data},
            separators=(",", ":"),
        )
        if logged:
            self.log.write(line + "\n")
            self.log.flush()
        if self.stdout_ok:
            try:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
            except (BrokenPipeError, OSError):
                # The host's stream broke; it will reattach with ``replay``. Point stdout at
                # /dev/null so the interpreter's final flush does not fail either.
                self.stdout_ok = False
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)


def _options(sdk: Any, fields: dict[str, Any], env: dict[str, str], stderr: Any) -> Any:
    fields = dict(fields)
    if fields.get("agents"):
        fields["agents"] = {
            name: sdk.AgentDefinition(**spec) for name, spec in fields["agents"].items()
        }
    fields["env"] = {**fields.get("env", {}), **env}
    fields["stderr"] = stderr
    return sdk.ClaudeAgentOptions(**fields)


def _tap(emitter: Emitter) -> None:
    """Emit every raw message dict the SDK parses, at the moment it parses it."""
    from claude_agent_sdk._internal import client as internal_client
    from claude_agent_sdk._internal import message_parser

    original = message_parser.parse_message

    def parse_and_emit(data: dict[str, Any]) -> Any:
        message = original(data)
        if message is not None:
            emitter.marks.setdefault("first_message", time.monotonic())
            emitter.emit("message", data)
        return message

    message_parser.parse_message = parse_and_emit
    # query() imported the name directly, so replace it there too.
    internal_client.parse_message = parse_and_emit  # type: ignore[attr-defined]


async def _serve(emitter: Emitter) -> int:
    import anyio
    import claude_agent_sdk as sdk

    _tap(emitter)
    stderr_tail: collections.deque[str] = collections.deque(maxlen=40)
    emitter.emit("ready", {"pid": os.getpid(), "sdk": sdk.__version__}, logged=False)

    stdin = anyio.wrap_file(sys.stdin)
    client = None
    try:
        while True:
            line = await stdin.readline()
            if not line:
                error = {"type": "EOFError", "message": "stdin closed before a request"}
                emitter.emit("error", error)
                return 2
            request = json.loads(line)
            kind = request.get("kind")
            options = _options(
                sdk, request.get("options", {}), request.get("env", {}), stderr_tail.append
            )
            if kind == "prepare":
                client = sdk.ClaudeSDKClient(options)
                await client.connect()
                emitter.emit("prepared", {}, logged=False)
                continue
            if kind != "request":
                raise ValueError(f"unknown request kind {kind!r}")
            prompt = request["prompt"]
            emitter.marks["prompt"] = time.monotonic()
            if client is not None:
                await client.query(prompt)
                async for _ in client.receive_response():
                    pass
            else:
                async for _ in sdk.query(prompt=prompt, options=options):
                    pass
            marks = emitter.marks
            timings = {}
            if "first_message" in marks:
                timings["prompt_to_first_message_ms"] = (
                    marks["first_message"] - marks["prompt"]
                ) * 1000
            emitter.emit("end", {"timings": timings})
            return 0
    except Exception as exc:  # every failure reaches the host as an envelope
        emitter.emit(
            "error",
            {
                "type": type(exc).__name__,
                "message": str(exc),
                "exit_code": getattr(exc, "exit_code", None),
                "stderr": "\n".join(line.rstrip("\n") for line in stderr_tail)
                or (getattr(exc, "stderr", None) or ""),
                "traceback": traceback.format_exc(limit=8),
            },
        )
        return 1
    finally:
        if client is not None:
            await client.disconnect()


def _replay(run_dir: str, after: int) -> int:
    path = os.path.join(run_dir, LOG_NAME)
    pid = _read_pid(run_dir)
    deadline_without_log = time.monotonic() + 10
    while not os.path.exists(path):
        if time.monotonic() > deadline_without_log:
            error = {"type": "LookupError", "message": f"no run log at {path}"}
            print(_envelope_line("error", error))
            return 2
        time.sleep(0.05)
    with open(path, encoding="utf-8") as log:
        pending = ""
        while True:
            chunk = log.readline()
            if chunk:
                pending += chunk
                if not pending.endswith("\n"):
                    continue  # a line still being written
                line, pending = pending, ""
                envelope = json.loads(line)
                if envelope["seq"] > after:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if envelope["kind"] in ("end", "error"):
                    return 0
                continue
            if pid is not None and not _alive(pid):
                # The writer is gone; read what it flushed last, then give up.
                rest = log.read()
                if rest:
                    pending += rest
                    continue
                error = {
                    "type": "AgentError",
                    "message": "the entrypoint died before the run ended",
                }
                print(_envelope_line("error", error))
                return 1
            time.sleep(0.02)


def _envelope_line(kind: str, data: Any) -> str:
    return json.dumps({"sandbay": WIRE_VERSION, "seq": 0, "kind": kind, "data": data})


def _read_pid(run_dir: str) -> int | None:
    try:
        with open(os.path.join(run_dir, PID_NAME), encoding="ascii") as fh:
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
    parser = argparse.ArgumentParser(prog="sandbay-entrypoint")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve")
    serve.add_argument("--run-dir", required=True)
    replay = sub.add_parser("replay")
    replay.add_argument("--run-dir", required=True)
    replay.add_argument("--after", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "replay":
        return _replay(args.run_dir, args.after)
    emitter = Emitter(args.run_dir)
    with open(os.path.join(args.run_dir, PID_NAME), "w", encoding="ascii") as fh:
        fh.write(str(os.getpid()))
    import anyio

    code = anyio.run(_serve, emitter)
    # The run is over and every envelope is flushed to the log and stdout. Skip the
    # interpreter's teardown of the SDK's modules (about a quarter of a second), which the
    # host would otherwise wait for.
    emitter.log.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
