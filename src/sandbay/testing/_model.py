"""`ScriptedModel`: a fake Anthropic Messages API that answers from a script.

It speaks enough of the Messages API (``POST /v1/messages``, streaming and not, and
``POST /v1/messages/count_tokens``) for the real ``claude`` CLI to run whole agent turns
against it, offline and deterministically. Point an agent at it with `ScriptedModel.env`.

Each main turn the CLI requests gets the next `Turn` of the script; the CLI runs the tools
the script asks for, and sends their results back in the next request, which the model
records (`ScriptedModel.turn_requests`, `ScriptedModel.tool_results`).

The CLI also makes side requests that are not agent turns (a session title, say). They must
not consume the script; `is_side_request` tells them apart, and they get a short harmless
answer. What the CLI sends, and why the rule is what it is, is in `is_side_request`.

The HTTP server runs in a background thread, so it serves the CLI subprocess even while the
caller's event loop is blocked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, TypeAlias
from urllib.parse import urlsplit

import anyio
from typing_extensions import Self, override

from .._errors import ConfigError

__all__ = [
    "RecordedRequest",
    "ScriptedModel",
    "Turn",
    "TurnLike",
    "default_script",
    "is_side_request",
    "serve",
]

_log = logging.getLogger(__name__)

#: Seconds `ScriptedModel.stop` gives each of its threads to finish.
STOP_TIMEOUT = 5.0
#: A request with at most this many ``max_tokens`` is a probe, not an agent turn.
PROBE_MAX_TOKENS = 16

# Streamed deltas carry at most this many characters, so clients must reassemble them.
_DELTA_CHARS = 24


@dataclass(frozen=True)
class Turn:
    """One scripted assistant message.

    Build one with `Turn.text` or `Turn.tool_use`, or pass ``content`` blocks in Messages API
    shape (``{"type": "text", "text": ...}``, ``{"type": "tool_use", "name": ..., "input":
    {...}}``; a tool_use block without ``id`` gets a fresh one when served).

    Attributes:
        content: The message's content blocks, in order. Not empty.
        delay_s: Seconds to wait before answering (the model's "thinking time").
    """

    content: tuple[Mapping[str, Any], ...]
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        # Own copies, so a caller mutating its dicts later cannot change the script.
        object.__setattr__(self, "content", tuple(dict(b) for b in self.content))
        if not self.content:
            raise ConfigError("a scripted turn needs at least one content block")
        if self.delay_s < 0:
            raise ConfigError(f"delay_s must be >= 0, got {self.delay_s}")
        for block in self.content:
            _check_block(block)

    @classmethod
    def text(cls, text: str, *, delay_s: float = 0.0) -> Turn:
        """A turn that answers with one text block (and ends the agent's turn)."""
        return cls(({"type": "text", "text": text},), delay_s=delay_s)

    @classmethod
    def tool_use(
        cls,
        name: str,
        input: Mapping[str, Any],
        *,
        id: str | None = None,
        delay_s: float = 0.0,
    ) -> Turn:
        """A turn that calls one tool, e.g. ``Turn.tool_use("Bash", {"command": "ls"})``.

        Args:
            name: The tool's name as the CLI knows it (``Bash``, ``Read``, ``Write``...).
            input: The tool's arguments.
            id: The tool_use id; by default a fresh one is made when the turn is served.
            delay_s: Seconds to wait before answering.
        """
        block: dict[str, Any] = {"type": "tool_use", "name": name, "input": dict(input)}
        if id is not None:
            block["id"] = id
        return cls((block,), delay_s=delay_s)

    @classmethod
    def parse(cls, raw: TurnLike) -> Turn:
        """Read one script entry.

        Accepted forms: a `Turn`; a string (one text block); ``{"text": "..."}``;
        ``{"tool_use": {"name": "Bash", "input": {...}, "id": "optional"}}``; or
        ``{"content": [<blocks>]}`` where each block is a string, one of the two forms above, or a
        Messages API block with a ``type``. Any mapping form may add ``"delay_s": <seconds>``.

        Raises:
            ConfigError: The entry is none of these.
        """
        if isinstance(raw, Turn):
            return raw
        if isinstance(raw, str):
            return cls.text(raw)
        if not isinstance(raw, Mapping):
            raise ConfigError(f"a scripted turn is a string or an object, got {raw!r}")
        spec = dict(raw)
        delay = spec.pop("delay_s", 0.0)
        if isinstance(delay, bool) or not isinstance(delay, (int, float)):
            raise ConfigError(f"delay_s must be a number, got {delay!r}")
        if set(spec) == {"content"}:
            if not isinstance(spec["content"], list):
                raise ConfigError(f"'content' must be a list of blocks, got {spec['content']!r}")
            blocks = tuple(_parse_block(b) for b in spec["content"])
        else:
            blocks = (_parse_block(spec),)
        return cls(blocks, delay_s=float(delay))

    @property
    def stop_reason(self) -> Literal["end_turn", "tool_use"]:
        """``tool_use`` when the turn calls a tool, else ``end_turn``."""
        return "tool_use" if any(b["type"] == "tool_use" for b in self.content) else "end_turn"


#: A script entry: a `Turn`, a string (one text block), or a mapping (see `Turn.parse`).
TurnLike: TypeAlias = Turn | str | Mapping[str, Any]


def _check_block(block: Mapping[str, Any]) -> None:
    kind = block.get("type")
    if kind == "text":
        if not isinstance(block.get("text"), str):
            raise ConfigError(f"a text block needs a string 'text': {block!r}")
    elif kind == "tool_use":
        if not isinstance(block.get("name"), str) or not block["name"]:
            raise ConfigError(f"a tool_use block needs a 'name': {block!r}")
        if not isinstance(block.get("input", {}), Mapping):
            raise ConfigError(f"a tool_use block's 'input' must be an object: {block!r}")
        if "id" in block and not isinstance(block["id"], str):
            raise ConfigError(f"a tool_use block's 'id' must be a string: {block!r}")
    else:
        raise ConfigError(f"scripted blocks are 'text' or 'tool_use', got {block!r}")


def _parse_block(raw: Any) -> Mapping[str, Any]:
    if isinstance(raw, str):
        return {"type": "text", "text": raw}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a content block is a string or an object, got {raw!r}")
    if "type" in raw:
        return dict(raw)
    if set(raw) == {"text"}:
        return {"type": "text", "text": raw["text"]}
    if set(raw) == {"tool_use"} and isinstance(raw["tool_use"], Mapping):
        unknown = set(raw["tool_use"]) - {"name", "input", "id"}
        if unknown:
            raise ConfigError(f"unknown tool_use keys {sorted(unknown)} in {raw!r}")
        return {"type": "tool_use", "input": {}, **raw["tool_use"]}
    raise ConfigError(f"cannot read content block {raw!r}")


def default_script() -> list[Turn]:
    """The offline demo's script: run one Bash command, then sum up.

    Deterministic: the same two turns every time, whatever the sandbox answers.
    """
    return [
        Turn.tool_use(
            "Bash",
            {
                "command": DEMO_COMMAND,
                "description": "Say where this command runs",
            },
        ),
        Turn.text(
            "The command above printed where it ran: the kind of sandbox, then its host name, "
            "user, working directory and kernel. (This answer is scripted; no real model was "
            "called.)"
        ),
    ]


#: The demo's Bash step. The hostname alone cannot tell a container on the host's network
#: from the host, so it names the kind of sandbox from what is visible inside: a Docker
#: container's id in the mount table (its /etc/hostname comes from the engine's container
#: folder); bubblewrap as process 1 of a private PID namespace, with the hostname sandbay's
#: bubblewrap sets; else the machine itself.
DEMO_COMMAND = (
    "id=$(grep -o 'containers/[0-9a-f]\\{12\\}' /proc/self/mountinfo 2>/dev/null"
    " | head -n 1 | cut -d / -f 2);"
    ' if [ -n "$id" ]; then where="Docker container $id";'
    ' elif [ "$(cat /proc/1/comm 2>/dev/null)" = bwrap ] || [ "$(uname -n)" = sandbay ]; then'
    ' where="a bubblewrap sandbox (the local provider, isolated)";'
    ' else where="this machine (the local provider, not isolated)"; fi;'
    ' echo "hello from $where";'
    ' echo "host $(uname -n) · user $(id -un 2>/dev/null || id -u) · cwd $(pwd) · $(uname -sr)"'
)


def is_side_request(body: Mapping[str, Any]) -> bool:
    """Whether a ``POST /v1/messages`` body is a side request rather than an agent turn.

    A request is a side request when any of these holds:

    1. It asks for structured output (``output_config.format`` is set). The CLI names each
       session this way: a one-message request whose system prompt begins "You are naming a
       coding session", ``tools: []``, no ``thinking`` (or ``{"type": "disabled"}``), and
       ``output_config.format`` a JSON schema for ``{"title": string}``. It goes out
       concurrently with the first agent turn (often arriving before it), with `query` and
       `ClaudeSDKClient` alike, unless ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1``; so
       arrival order cannot tell it apart. Agent turns never set a format.
    2. ``max_tokens`` is at most `PROBE_MAX_TOKENS` (16): quota and reachability probes ask for
       a token or so; agent turns ask for thousands (32000 or 128000 in CLI 2.1.329).
    3. There is no ``tools`` key at all (or it is ``null``). Every agent turn the CLI sends
       has one, even an agent with no tools (``ClaudeAgentOptions(tools=[])`` sends
       ``"tools": []``), so "has no tools" must not mean "is a side request"; a missing key
       is a helper call's shape.

    Not signals, because agent turns vary in them: the model (it is whatever the agent was
    given, and the title request uses it too), ``thinking`` (absent for models without it,
    ``disabled`` with ``max_thinking_tokens=0``), and an empty ``tools`` list. Subagent
    requests are agent turns and consume the script.

    Observed with CLI 2.1.329 besides agent turns: ``HEAD /api/hello`` (a reachability check,
    gone with ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1``) and the title request above.

    Args:
        body: The parsed JSON body.
    """
    output_config = body.get("output_config")
    if isinstance(output_config, Mapping) and output_config.get("format"):
        return True
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens <= PROBE_MAX_TOKENS:
        return True
    return body.get("tools") is None


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request the model received.

    Attributes:
        method: The HTTP method.
        path: The path, query string included (the CLI sends ``/v1/messages?beta=true``).
        headers: The request headers, names lower-cased (a repeated header: its last value).
        body: The parsed JSON body; ``None`` without one, the raw text if it is not JSON.
        kind: ``turn`` (served from the script), ``side`` (see `is_side_request`),
            ``count_tokens``, or ``other`` (answered 404 or 400).
        turn: For ``turn``: the 0-based index of the scripted turn served, or ``None`` when
            the script was exhausted.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    body: Any
    kind: Literal["turn", "side", "count_tokens", "other"]
    turn: int | None = None

    @property
    def messages(self) -> list[Any]:
        """The body's ``messages``, or ``[]``."""
        if isinstance(self.body, Mapping) and isinstance(self.body.get("messages"), list):
            return list(self.body["messages"])
        return []


@dataclass
class _State:
    """What handler threads share; guarded by ``lock``."""

    script: tuple[Turn, ...]
    is_side: Callable[[Mapping[str, Any]], bool]
    latency_s: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)
    requests: list[RecordedRequest] = field(default_factory=list)
    next_turn: int = 0
    exhausted: int = 0
    served_ids: int = 0

    def fresh_id(self, prefix: str) -> str:
        with self.lock:
            self.served_ids += 1
            return f"{prefix}_sandbay{self.served_ids:06d}"


class ScriptedModel:
    """A local fake of the Anthropic Messages API whose answers come from a script.

    Use it from async code::

        async with ScriptedModel([Turn.tool_use("Bash", {"command": "ls"}), "done"]) as model:
            options = ClaudeAgentOptions(env=model.env(), ...)

    or from sync code with ``with ScriptedModel(...) as model:`` or `start` / `stop`.

    Each agent turn gets the next scripted `Turn`; once the script is exhausted, every further
    turn gets the text `EXHAUSTED_TEXT` and `exhausted` counts them. Side requests (see
    `is_side_request`) get `SIDE_TEXT`, or, when they ask for structured output, the smallest
    JSON value their schema allows, and never consume the script. Every request is recorded.

    Args:
        script: The turns, in order; entries as `Turn.parse` reads them.
        host: Address to listen on.
        port: Port to listen on; 0 picks a free one.
        latency_s: Seconds added before every turn's answer (side requests are answered at
            once), on top of each turn's own ``delay_s``.
        side_request: Predicate on a request body deciding it is a side request; replaces
            `is_side_request` (e.g. ``lambda body: False`` for a client that is not the CLI).

    Raises:
        ConfigError: A script entry cannot be read, or ``latency_s`` is negative.
    """

    EXHAUSTED_TEXT: ClassVar[str] = "(script exhausted)"
    """Text of the turn served once the script has run out."""
    SIDE_TEXT: ClassVar[str] = "ok"
    """Text answering a side request that does not ask for structured output."""

    def __init__(
        self,
        script: Sequence[TurnLike] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        latency_s: float = 0.0,
        side_request: Callable[[Mapping[str, Any]], bool] = is_side_request,
    ) -> None:
        if isinstance(script, (str, Mapping)):
            raise ConfigError("script is a list of turns; wrap a single turn in a list")
        if latency_s < 0:
            raise ConfigError(f"latency_s must be >= 0, got {latency_s}")
        self._state = _State(tuple(Turn.parse(t) for t in script), side_request, latency_s)
        self._host = host
        self._port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> Self:
        """Load a script from a JSON file holding a list of turns.

        Args:
            path: The file.
            **kwargs: Passed on to `ScriptedModel`.

        Raises:
            ConfigError: The file cannot be read or is not a valid script.
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read script {path}: {exc}") from exc
        if not isinstance(data, list):
            raise ConfigError(f"script {path} must hold a JSON list of turns")
        try:
            return cls(data, **kwargs)
        except ConfigError as exc:
            raise ConfigError(f"script {path}: {exc.message}") from exc

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind the port and serve in a background thread. Returns the model itself.

        Raises:
            RuntimeError: The model was already started.
            OSError: The address cannot be bound.
        """
        if self._server is not None or self._stopped:
            raise RuntimeError("a ScriptedModel starts once")
        server = _Server((self._host, self._port), self._state)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"sandbay-scripted-model:{server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open connections and wait (bounded) for threads. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._state.stopping.set()
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        deadline = time.monotonic() + STOP_TIMEOUT
        if thread.is_alive():
            # Returns within one poll interval: the accept loop never blocks for longer.
            server.shutdown()
        thread.join(max(0.0, deadline - time.monotonic()))
        server.close_connections(deadline)
        server.server_close()
        if thread.is_alive():
            _log.warning("ScriptedModel server thread did not stop within %ss", STOP_TIMEOUT)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.stop)

    # -- where to reach it ----------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port being served.

        Raises:
            RuntimeError: The model is not started.
        """
        if self._server is None:
            raise RuntimeError("ScriptedModel is not started; use start() or `with`")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:41234`` (a wildcard host reads as loopback)."""
        host = self._host if self._host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def env(self, *, base_url: str | None = None) -> dict[str, str]:
        """The environment variables that point an agent at this model.

        Args:
            base_url: The URL the agent reaches the model at, when not `url` (an agent in a
                container reaches the host at another address).
        """
        return {
            "ANTHROPIC_BASE_URL": base_url or self.url,
            "ANTHROPIC_API_KEY": "sk-ant-sandbay-scripted-model",
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        }

    # -- what it saw ----------------------------------------------------------------------

    @property
    def script(self) -> tuple[Turn, ...]:
        """The script's turns."""
        return self._state.script

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, in order of arrival (a copy)."""
        with self._state.lock:
            return list(self._state.requests)

    @property
    def turn_requests(self) -> list[RecordedRequest]:
        """The agent-turn requests (those answered from the script, or exhausted)."""
        return [r for r in self.requests if r.kind == "turn"]

    @property
    def side_requests(self) -> list[RecordedRequest]:
        """The side requests (see `is_side_request`)."""
        return [r for r in self.requests if r.kind == "side"]

    @property
    def turns_served(self) -> int:
        """How many scripted turns have been served."""
        with self._state.lock:
            return self._state.next_turn

    @property
    def exhausted(self) -> int:
        """How many turns were answered with `EXHAUSTED_TEXT` because the script ran out."""
        with self._state.lock:
            return self._state.exhausted

    def tool_results(self) -> list[Mapping[str, Any]]:
        """The ``tool_result`` blocks the agent sent back, in order, each once.

        Each turn request repeats the conversation so far; blocks are told apart by
        ``tool_use_id``. A block's ``content`` is a string or a list of content blocks.
        """
        seen: dict[Any, Mapping[str, Any]] = {}
        for request in self.turn_requests:
            for block in _content_blocks(request.messages):
                if block.get("type") == "tool_result":
                    seen.setdefault(block.get("tool_use_id"), block)
        return list(seen.values())

    @override
    def __repr__(self) -> str:
        where = self.url if self._server is not None and not self._stopped else "not serving"
        return (
            f"<ScriptedModel {where} turns={self.turns_served}/{len(self.script)} "
            f"exhausted={self.exhausted}>"
        )


def _content_blocks(messages: list[Any]) -> Iterator[Mapping[str, Any]]:
    for message in messages:
        if isinstance(message, Mapping) and isinstance(message.get("content"), list):
            for block in message["content"]:
                if isinstance(block, Mapping):
                    yield block


# -- the HTTP side --------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    """A threading server that tracks its connections so `stop` can cut and join them."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], state: _State) -> None:
        self.state = state
        self._conn_lock = threading.Lock()
        self._conns: dict[threading.Thread, socket.socket] = {}
        super().__init__(address, _Handler)

    @override
    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"sandbay-scripted-model-conn:{client_address[1]}",
            daemon=True,
        )
        with self._conn_lock:
            self._conns[thread] = request
        thread.start()

    def _serve_connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._conn_lock:
                self._conns.pop(threading.current_thread(), None)

    @override
    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hang up on keep-alive connections whenever they exit; that is not an error.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)) or self.state.stopping.is_set():
            return
        _log.exception("ScriptedModel: error serving %s", client_address)

    def close_connections(self, deadline: float) -> None:
        """Unblock every connection thread (they may wait on idle keep-alive reads) and join."""
        with self._conn_lock:
            conns = dict(self._conns)
        for sock in conns.values():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in conns:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                _log.warning("ScriptedModel connection thread %s did not stop", thread.name)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # As a real endpoint does: a streamed event goes out at once, not after the client's
    # (delayed) acknowledgement of the one before.
    disable_nagle_algorithm = True
    server_version = "sandbay-scripted-model"
    server: _Server

    @override
    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("%s - " + format, self.address_string(), *args)

    def do_POST(self) -> None:
        self._dispatch()

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        state = self.server.state
        raw = self._read_body()
        body: Any = None
        bad_json = False
        if raw:
            try:
                body = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                body, bad_json = raw.decode("utf-8", "replace"), True
        path = urlsplit(self.path).path.rstrip("/")
        headers = {name.lower(): value for name, value in self.headers.items()}

        def record(kind: Literal["side", "count_tokens", "other"]) -> None:
            entry = RecordedRequest(self.command, self.path, headers, body, kind)
            with state.lock:
                state.requests.append(entry)

        if self.command != "POST" or path not in ("/v1/messages", "/v1/messages/count_tokens"):
            record("other")
            self._send_error(404, "not_found_error", f"{self.command} {path} is not served here")
            return
        if bad_json or not isinstance(body, Mapping):
            record("other")
            self._send_error(400, "invalid_request_error", "the body must be a JSON object")
            return
        if path == "/v1/messages/count_tokens":
            record("count_tokens")
            self._send_json(200, {"input_tokens": _estimate_tokens(body)})
            return

        turn: Turn
        index: int | None = None
        if state.is_side(body):
            record("side")
            turn = Turn.text(_side_answer(body))
            delay = 0.0
        else:
            with state.lock:
                if state.next_turn < len(state.script):
                    index = state.next_turn
                    state.next_turn += 1
                    turn = state.script[index]
                else:
                    state.exhausted += 1
                    turn = Turn.text(ScriptedModel.EXHAUSTED_TEXT)
                state.requests.append(
                    RecordedRequest(self.command, self.path, headers, body, "turn", index)
                )
            delay = state.latency_s + turn.delay_s
        if delay and state.stopping.wait(delay):
            self.close_connection = True
            return
        message = self._message(body, turn)
        if body.get("stream"):
            self._send_stream(message)
        else:
            self._send_json(200, message)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _message(self, body: Mapping[str, Any], turn: Turn) -> dict[str, Any]:
        state = self.server.state
        content: list[dict[str, Any]] = []
        for block in turn.content:
            block = dict(block)
            if block["type"] == "tool_use":
                block.setdefault("id", state.fresh_id("toolu"))
                block["input"] = dict(block.get("input", {}))
            content.append(block)
        return {
            "id": state.fresh_id("msg"),
            "type": "message",
            "role": "assistant",
            "model": str(body.get("model") or "scripted-model"),
            "content": content,
            "stop_reason": turn.stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": _estimate_tokens(body),
                "output_tokens": _estimate_tokens(content),
            },
        }

    def _send_stream(self, message: dict[str, Any]) -> None:
        # Chunked, on a connection that stays open for the next request, as the real API
        # streams.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("request-id", message["id"].replace("msg_", "req_", 1))
        self.end_headers()
        for event in _stream_events(message):
            data = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _send_json(self, status: int, payload: Mapping[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_error(self, status: int, kind: str, message: str) -> None:
        self._send_json(status, {"type": "error", "error": {"type": kind, "message": message}})


def _stream_events(message: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The server-sent events of a streamed message, in the Messages API's order."""
    usage = message["usage"]
    yield {
        "type": "message_start",
        "message": {
            **message,
            "content": [],
            "stop_reason": None,
            "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 1},
        },
    }
    yield {"type": "ping"}
    for index, block in enumerate(message["content"]):
        if block["type"] == "tool_use":
            start = {**block, "input": {}}
            delta_type, key, payload = (
                "input_json_delta",
                "partial_json",
                json.dumps(block["input"]),
            )
        else:
            start = {**block, "text": ""}
            delta_type, key, payload = "text_delta", "text", block["text"]
        yield {"type": "content_block_start", "index": index, "content_block": start}
        for i in range(0, len(payload), _DELTA_CHARS):
            piece = payload[i : i + _DELTA_CHARS]
            yield {
                "type": "content_block_delta",
                "index": index,
                "delta": {"type": delta_type, key: piece},
            }
        yield {"type": "content_block_stop", "index": index}
    yield {
        "type": "message_delta",
        "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
        "usage": {"output_tokens": usage["output_tokens"]},
    }
    yield {"type": "message_stop"}


def _estimate_tokens(value: Any) -> int:
    """A stable stand-in for a token count: about four characters per token."""
    return max(1, len(json.dumps(value, default=str)) // 4)


def _side_answer(body: Mapping[str, Any]) -> str:
    output_config = body.get("output_config")
    if isinstance(output_config, Mapping):
        fmt = output_config.get("format")
        if isinstance(fmt, Mapping) and isinstance(fmt.get("schema"), Mapping):
            return json.dumps(_schema_example(fmt["schema"]))
    return ScriptedModel.SIDE_TEXT


def _schema_example(schema: Mapping[str, Any], depth: int = 0) -> Any:
    """The smallest value a (simple) JSON schema accepts: required fields only."""
    if depth > 8:
        return None
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options and isinstance(options[0], Mapping):
            return _schema_example(options[0], depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = schema.get("properties") or {}
        return {
            name: _schema_example(properties.get(name) or {}, depth + 1)
            for name in schema.get("required") or []
        }
    return {
        "string": "Scripted",
        "integer": 0,
        "number": 0,
        "boolean": False,
        "array": [],
    }.get(str(kind))


def serve(script_path: str | None, *, host: str = "127.0.0.1", port: int = 0) -> None:
    """Serve a scripted model until Ctrl-C, printing its URL and the env lines to export.

    Args:
        script_path: A JSON script file (see `ScriptedModel.from_file`); ``None``: the demo's
            `default_script`.
        host: Address to listen on.
        port: Port to listen on; 0 picks a free one.

    Raises:
        ConfigError: The script file cannot be read or is not a valid script.
    """
    if script_path is None:
        model = ScriptedModel(default_script(), host=host, port=port)
    else:
        model = ScriptedModel.from_file(script_path, host=host, port=port)
    with model:
        source = script_path or "the built-in demo script"
        print(f"Scripted model serving {len(model.script)} turns from {source} at {model.url}")
        print("Point an agent at it with:")
        for key, value in model.env().items():
            print(f"  export {key}={shlex.quote(value)}")
        print("Press Ctrl-C to stop.", flush=True)
        try:
            while not model._state.stopping.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
    print(
        f"Stopped: {model.turns_served} scripted turns served, {model.exhausted} past the end, "
        f"{len(model.side_requests)} side requests."
    )
