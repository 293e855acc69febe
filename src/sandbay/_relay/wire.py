"""The wire between sandbay's relay (in the sandbox) and `SandboxTransport` (on the host).

Standard library only, Python 3.10+: the relay imports this module beside it in the sandbox,
the host imports it from the package, so both sides speak the same version. Both directions
carry one JSON object per line, each with ``"sandbay": VERSION`` and a ``kind``; each side
checks every field of what it reads (the host in `sandbay._transport.parse_frame`, the relay
with `parse_host_frame`).

Host → relay, on the relay's stdin (`HOST_KINDS`). First one ``start``::

    {"sandbay": 3, "kind": "start", "argv": [...], "env": {...}, "cwd": "...",
     "find_cli": true, "model_listener": false, "keep_input_s": 0}

(``boot_ms``, added by the one-process start, is when the relay's process began, in monotonic
milliseconds: the first of its ``timings``), then any of::

    {"sandbay": 3, "kind": "input", "n": 1, "data": "...text for the CLI's stdin...",
     "writer": "host"}
    {"sandbay": 3, "kind": "end_input"}
    {"sandbay": 3, "kind": "reply", "id": 4, "final": false, "data": {...}}
    {"sandbay": 3, "kind": "reply", "id": 4, "final": true, "error": {"type": "...",
     "message": "..."}}

The CLI's own stdin only ever travels inside ``input`` frames (``data`` is passed on byte for
byte), so nothing the CLI reads can be mistaken for sandbay's messages or the other way
round. Each writer (``writer``, default `HOST_WRITER`) numbers its inputs from 1: the relay
passes on a writer's input ``n`` only right after its ``n - 1`` and drops a number it already
passed on, so a writer that is unsure whether its input arrived sends it again. Writers in
other processes reach the relay through the run's `INPUT_SOCKET` (``relay.py attach``); the
CLI gets the inputs of all writers in the order the relay receives them. ``end_input`` ends
the CLI's input (as end of file would, for providers that cannot send one). End of file
without it (the host's stream broke) ends the input ``keep_input_s`` seconds later (default
0) unless a writer is attached then: the window in which another process takes over.
``reply`` answers a ``request`` of the relay: any number of parts with ``final: false``,
then one with ``final: true`` (or an ``error``).

Relay → host, on its stdout (`KINDS`), one envelope per line::

    {"sandbay": 3, "seq": 7, "kind": "line", "data": {...one stream-json line of the CLI...}}

Kinds: ``ready`` (seq 0; data: pid, cli_pid, cli, model_url), ``timings`` (seq 0; data:
`TIMING_NAMES`, each monotonic milliseconds in the sandbox or ``null`` until reached),
``request`` (seq 0; data: id, method, payload: a request to the host, answered by ``reply``
frames), ``line`` (one CLI stdout line, logged), ``stderr`` (seq 0; data: line, one CLI
stderr line, cut to `MAX_STDERR_LINE`), ``end`` (logged; data: exit_code of the CLI) and
``error`` (logged; data: type, message, exit_code, stderr; the relay could not run the CLI).
``end`` and ``error`` close a run.

``egress_proxy`` in ``start`` (``"tcp"``, or ``"unix:"`` and a socket path when the relay is
outside the CLI's network namespace and a forwarder there connects to it) has the relay
serve an HTTP proxy (CONNECT, and plain-HTTP absolute-form requests) whose each tunnel is an
``egress.open`` request (payload: host, port; the first reply part: ``tunnel``, an id; then
``data`` parts, base64, the target's bytes, at most `EGRESS_WINDOW` ahead of the relay's
``egress.ack`` (tunnel, acked: bytes passed on so far)); the client's bytes go as
``egress.send`` (tunnel, data, eof), one at a time per tunnel; ``egress.close`` (tunnel)
drops it. The CLI gets ``HTTPS_PROXY``/``HTTP_PROXY`` and ``NO_PROXY`` (the model listener).

Requests the relay makes: ``model.http`` (payload: ``head``, the HTTP request head as
Latin-1 text, and ``body``, base64), one per request the CLI makes to the model listener
(``model_listener`` in ``start``; its address is ``model_url`` in ``ready`` and the CLI's
``ANTHROPIC_BASE_URL``). Each reply part's data holds ``data``, the next bytes of the raw
HTTP response (base64), written to the CLI as they come. After a cut stream the host's
``relay.py replay --link`` carries requests and replies through `INPUT_SOCKET`.

Logged envelopes carry consecutive sequence numbers from 1 and are appended to the run's
log (`LOG_NAME`) before they are written to stdout, so ``replay`` can repeat any of them.
"""

from __future__ import annotations

import json
import re

TYPE_CHECKING = False  # not typing's: the relay imports this module, at every cold start
if TYPE_CHECKING:
    from typing import Any

#: Version of this wire; each side refuses any other (the old entrypoint spoke 1).
VERSION = 3
#: Envelope kinds the relay sends.
KINDS = frozenset({"ready", "timings", "request", "line", "stderr", "end", "error"})
#: Kinds that are logged with a sequence number (the others carry seq 0).
LOGGED_KINDS = frozenset({"line", "end", "error"})
#: Kinds after which nothing follows.
FINAL_KINDS = frozenset({"end", "error"})
#: Types of CLI output the Agent SDK handles itself and never passes on to its caller.
SDK_HANDLED_TYPES = frozenset(
    {"control_request", "control_response", "control_cancel_request", "transcript_mirror"}
)


def sdk_yields(message: dict[str, Any]) -> bool:
    """Whether the Agent SDK passes this CLI output on to its caller: not what it handles
    itself (`SDK_HANDLED_TYPES`), nor a ``session_state_changed`` the CLI sent for it alone."""
    if message.get("type") in SDK_HANDLED_TYPES:
        return False
    return not (
        message.get("type") == "system"
        and message.get("subtype") == "session_state_changed"
        and message.get("sdk_host_only") is True
    )


#: Frame kinds the host sends.
HOST_KINDS = frozenset({"start", "input", "end_input", "reply"})
#: The milestones of a ``timings`` envelope.
TIMING_NAMES = (
    "relay_boot_ms",
    "relay_start_ms",
    "cli_spawned_ms",
    "cli_first_line_ms",
    "prompt_in_ms",
    "first_message_ms",
)
#: Longest CLI stdout line the relay forwards, in bytes (the SDK's own default bound is 1 MiB;
#: messages with images run to a few MiB).
MAX_LINE = 32 * 1024 * 1024
#: Longest CLI stderr line forwarded as one ``stderr`` envelope; the rest is cut.
MAX_STDERR_LINE = 8 * 1024
#: Longest frame the host sends (an input, or a reply part), in bytes.
MAX_HOST_FRAME = 48 * 1024 * 1024
#: Largest request id; ids are positive.
MAX_REQUEST_ID = 2**31
#: Requests of the relay the host answers at once; more is a protocol error.
MAX_INFLIGHT = 64
#: A request's method: lower-case words joined by dots.
METHOD_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,30}(\.[a-z][a-z0-9_]{0,30}){0,3}")
#: Longest HTTP request head the model listener takes from the CLI.
MAX_HTTP_HEAD = 64 * 1024
#: Largest HTTP request body the model listener takes from the CLI (a conversation with
#: images runs to a few MiB).
MAX_HTTP_BODY = 32 * 1024 * 1024
#: Bytes of a tunnel the host sends ahead of the relay's ``egress.ack``; the relay acks
#: every half of it.
EGRESS_WINDOW = 1024 * 1024
#: Bytes of the client's per ``egress.send``.
EGRESS_CHUNK = 48 * 1024
#: Port of the forwarder in the CLI's namespace that connects to an ``egress_proxy`` socket.
EGRESS_FORWARDER_PORT = 3128
#: Longest proxy request head the relay takes from a client.
MAX_PROXY_HEAD = 16 * 1024
#: Seconds a request of the relay waits for the host to reattach when its stream is gone.
LINK_WAIT_S = 30.0
#: The writer of inputs without one: the host process that started the run.
HOST_WRITER = "host"
#: A writer's name (each writer numbers its inputs from 1).
WRITER_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: The run's envelope log in its run directory.
LOG_NAME = "lines.jsonl"
#: The relay's pid, for ``replay`` to tell a live run from a dead one.
PID_NAME = "relay.pid"
#: The Unix socket in the run directory through which ``relay.py attach`` writes to the CLI.
INPUT_SOCKET = "input.sock"
#: The frame that ends the CLI's input, as end of file would.
END_INPUT_LINE = f'{{"sandbay":{VERSION},"kind":"end_input"}}'


class WireError(ValueError):
    """A frame that is not what this wire allows; the message says which field."""


def host_frame(kind: str, **fields: Any) -> bytes:
    """One host → relay frame as a line (``kind`` and ``fields`` as described above)."""
    frame = {"sandbay": VERSION, "kind": kind, **fields}
    return json.dumps(frame, separators=(",", ":")).encode() + b"\n"


def parse_host_frame(line: bytes) -> dict[str, Any]:
    """Check every field of one host → relay frame; anything off is a `WireError`."""
    if len(line) > MAX_HOST_FRAME:
        raise WireError(f"a frame longer than {MAX_HOST_FRAME} bytes")
    try:
        frame = json.loads(line)
    except (ValueError, RecursionError):
        raise WireError(f"a line that is not JSON: {line[:100]!r}") from None
    if not isinstance(frame, dict):
        raise WireError("a frame that is not a JSON object")
    version = frame.get("sandbay")
    if type(version) is not int or version != VERSION:
        raise WireError(f"wire version {version!r}, the relay speaks {VERSION}")
    kind = frame.get("kind")
    if kind not in HOST_KINDS:
        raise WireError(f"kind must be one of {sorted(HOST_KINDS)}, got {kind!r}")
    allowed = {
        "start": {
            "argv",
            "env",
            "cwd",
            "find_cli",
            "model_listener",
            "keep_input_s",
            "egress_proxy",
            "boot_ms",
        },
        "input": {"n", "data", "writer"},
        "end_input": set(),
        "reply": {"id", "final", "data", "error"},
    }[kind]
    unknown = set(frame) - allowed - {"sandbay", "kind"}
    if unknown:
        raise WireError(f"unknown fields {sorted(unknown)[:5]} in {kind!r}")
    if kind == "start":
        argv, env, cwd = frame.get("argv"), frame.get("env", {}), frame.get("cwd")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise WireError("argv of 'start' must be a non-empty list of text")
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise WireError("env of 'start' must map text to text")
        if cwd is not None and not isinstance(cwd, str):
            raise WireError("cwd of 'start' must be text")
        keep = frame.get("keep_input_s", 0)
        if type(keep) not in (int, float) or not 0 <= keep <= 7 * 86400:
            raise WireError("keep_input_s of 'start' must be seconds, at most a week")
        proxy = frame.get("egress_proxy")
        if proxy is not None and not (
            isinstance(proxy, str)
            and (proxy == "tcp" or (proxy.startswith("unix:/") and len(proxy) < 4096))
        ):
            raise WireError("egress_proxy of 'start' must be 'tcp' or 'unix:' and a path")
        boot = frame.get("boot_ms", 0)
        if type(boot) not in (int, float) or not 0 <= boot < 2**53:
            raise WireError("boot_ms of 'start' must be a time in milliseconds")
        for flag in ("find_cli", "model_listener"):
            if type(frame.get(flag, False)) is not bool:
                raise WireError(f"{flag} of 'start' must be true or false")
    elif kind == "input":
        n = frame.get("n")
        if type(n) is not int or not 1 <= n <= 2**53:
            raise WireError(f"n of 'input' must be a whole number from 1, got {n!r}")
        if not isinstance(frame.get("data"), str):
            raise WireError("data of 'input' must be text")
        writer = frame.get("writer", HOST_WRITER)
        if not isinstance(writer, str) or not WRITER_PATTERN.fullmatch(writer):
            raise WireError(f"writer of 'input' must be a short name, got {writer!r:.80}")
    elif kind == "reply":
        rid = frame.get("id")
        if type(rid) is not int or not 1 <= rid <= MAX_REQUEST_ID:
            raise WireError(f"id of 'reply' must be a whole number from 1, got {rid!r}")
        if type(frame.get("final")) is not bool:
            raise WireError("final of 'reply' must be true or false")
        if "error" in frame:
            error = frame["error"]
            if (
                not frame["final"]
                or "data" in frame
                or not isinstance(error, dict)
                or set(error) != {"type", "message"}
                or not all(isinstance(v, str) for v in error.values())
            ):
                raise WireError("error of 'reply' must be a final {type, message} of text")
        elif not isinstance(frame.get("data"), dict):
            raise WireError("data of 'reply' must be an object")
    return frame
