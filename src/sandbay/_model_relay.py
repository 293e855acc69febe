"""The model relay: the real credential stays on the host, the sandbox gets a per-run token.

The relay in the sandbox listens on 127.0.0.1 there and the CLI gets that address as
``ANTHROPIC_BASE_URL`` and a token made for this run as its key. Each HTTP request the CLI
makes there travels to the host as a ``model.http`` request over the relay's own process
channel (so a sandbox without any network reaches the model), where `ModelRelay.handle`
checks the token, puts the real credential in its place and forwards the request to the
real endpoint, sending the response's bytes back as they arrive (unbuffered: event streams
stream). Connections to the endpoint are kept open between requests (as the CLI's own client
keeps them when it talks to the endpoint directly): a request costs no new TCP and TLS
handshake, and `ModelRelay.aclose` closes them when the run ends. The token is refused once
the run ends (`ModelRelay.revoke`), and is worthless anywhere but this relay.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import os
import secrets
import socket
import ssl
import sys
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.abc

from ._errors import ConfigError

__all__ = ["METHOD", "ModelRelay", "model_relay_wanted", "relay_for"]

#: The request method the relay's model listener uses.
METHOD = "model.http"
#: Variables that hold a credential the relay can stand in for, most preferred first:
#: ``ANTHROPIC_API_KEY`` goes out as ``x-api-key``, ``ANTHROPIC_AUTH_TOKEN`` as a bearer token.
RELAYED_CREDENTIALS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN")
#: Settings under which the CLI talks to another kind of endpoint: no relay then.
_OTHER_BACKENDS = (
    "CLAUDE_CODE_USE_BEDROCK",
    "CLAUDE_CODE_USE_VERTEX",
    "CLAUDE_CODE_USE_FOUNDRY",
    "CLAUDE_CODE_OAUTH_TOKEN",
)
#: Set to ``0`` (in the host's environment or the agent's) to turn the relay off by default.
SWITCH = "SANDBAY_MODEL_RELAY"
DEFAULT_BASE_URL = "https://api.anthropic.com"
#: Bytes read from the endpoint per chunk sent back (a chunk goes back as soon as it arrives,
#: whatever its size).
CHUNK = 64 * 1024
CONNECT_TIMEOUT_S = 30.0
#: Connections to the endpoint kept open between requests, at most.
KEEP_CONNECTIONS = 4
#: Seconds an open connection may wait for the next request before it is closed instead.
KEEP_IDLE_S = 20.0
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Request headers that are not passed on: hop-by-hop, framing (set again here), the
#: credential (replaced) and the host (the endpoint's).
_DROPPED = frozenset(
    {
        "authorization",
        "x-api-key",
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
    }
)

Part = Callable[[dict[str, Any]], Awaitable[None]]


def model_relay_wanted(env: Mapping[str, str], setting: bool | None) -> bool:
    """Whether a run with the CLI environment ``env`` goes through the model relay.

    ``setting`` decides if given; by default (``None``) the relay is used when ``env``
    carries ``ANTHROPIC_API_KEY`` or ``ANTHROPIC_AUTH_TOKEN``, the CLI is not set up for
    another backend (Bedrock, Vertex, Foundry, an OAuth token) and `SWITCH` is not ``0``.
    """
    if setting is not None:
        return setting
    switch = env.get(SWITCH, os.environ.get(SWITCH, "1")).strip().lower()
    if switch in ("0", "false", "no", "off"):
        return False
    if any(env.get(name) for name in _OTHER_BACKENDS):
        return False
    return any(env.get(name) for name in RELAYED_CREDENTIALS)


def relay_for(env: Mapping[str, str], *, token: str | None = None) -> ModelRelay | None:
    """A relay for the credential and endpoint in ``env`` (``None`` without a credential).

    Args:
        env: The CLI's environment as configured (credential, ``ANTHROPIC_BASE_URL``).
        token: The run's token, when resuming a run another process started.
    """
    name = next((n for n in RELAYED_CREDENTIALS if env.get(n)), None)
    if name is None:
        return None
    relay = ModelRelay(
        base_url=env.get("ANTHROPIC_BASE_URL") or DEFAULT_BASE_URL,
        credential_name=name,
        credential=env[name],
    )
    if token is not None:
        relay.token = token
    return relay


class ModelRelay:
    """The host's side of one run's model relay.

    Args:
        base_url: The real endpoint (``http`` or ``https``, with an optional path prefix).
        credential_name: `RELAYED_CREDENTIALS` entry the credential came from.
        credential: The real key or token; it never leaves this process but to the endpoint.

    Attributes:
        token: The run's stand-in key the sandbox gets.
        requests: Requests forwarded so far.
        refused: Requests refused (wrong or expired token).
    """

    def __init__(self, *, base_url: str, credential_name: str, credential: str) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"ANTHROPIC_BASE_URL={base_url!r} is not an http(s) URL the model relay can "
                "forward to; fix it, or turn the relay off (model_relay=False)"
            )
        if credential_name not in RELAYED_CREDENTIALS:
            raise ConfigError(f"the model relay cannot stand in for {credential_name}")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._netloc = parts.netloc.rpartition("@")[2]
        self._prefix = parts.path.rstrip("/")
        self._credential_name = credential_name
        self._credential = credential
        self.token = f"sk-sandbay-run-{secrets.token_urlsafe(32)}"
        self._revoked = False
        self._closed = False
        self._idle: list[tuple[anyio.abc.ByteStream, float]] = []
        self.requests = 0
        self.refused = 0

    def revoke(self) -> None:
        """Refuse the token from now on (the run ended). Idempotent.

        Call `aclose` too, to close the connections to the endpoint kept open.
        """
        self._revoked = True

    def sandbox_env(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` as the sandbox gets it: no credential and no endpoint, the token instead.

        The relay in the sandbox sets ``ANTHROPIC_BASE_URL`` to its listener.
        """
        out = {
            k: v
            for k, v in env.items()
            if k not in RELAYED_CREDENTIALS and k != "ANTHROPIC_BASE_URL" and k != SWITCH
        }
        out[self._credential_name] = self.token
        return out

    async def handle(self, payload: dict[str, Any], part: Part) -> dict[str, Any]:
        """Answer one ``model.http`` request of the relay (a `RequestHandler`)."""
        from ._transport import RequestError

        head, body = _request_of(payload)
        method, target, headers = _parse_head(head)
        if self._revoked or not self._authorized(headers):
            self.refused += 1
            raise RequestError(
                "Unauthorized",
                "this run's model token is not valid (wrong, or the run has ended)",
            )
        self.requests += 1
        lines = [f"{method} {self._prefix}{target} HTTP/1.1", f"host: {self._netloc}"]
        lines += [f"{k}: {v}" for k, v in headers if k.lower() not in _DROPPED]
        if self._credential_name == "ANTHROPIC_API_KEY":
            lines.append(f"x-api-key: {self._credential}")
        else:
            lines.append(f"authorization: Bearer {self._credential}")
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"content-length: {len(body)}")
        request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        while True:
            stream, reused = await self._take()
            end = _ResponseEnd(head_only=method == "HEAD")
            forwarded = False
            try:
                try:
                    await stream.send(request)
                    _ack_at_once(stream)
                except (OSError, anyio.BrokenResourceError, ssl.SSLError):
                    if reused:
                        continue  # the endpoint closed it while it waited: a new one
                    raise RequestError(
                        "BadGateway", f"the model at {self._netloc} hung up"
                    ) from None
                while not end.done:
                    try:
                        chunk = await stream.receive(CHUNK)
                    except (anyio.EndOfStream, anyio.BrokenResourceError, OSError, ssl.SSLError):
                        end.at_eof()
                        break
                    _ack_at_once(stream)
                    used = end.feed(chunk)
                    if used < len(chunk):
                        end.reusable = False  # more than the response: not a clean end
                    if used:
                        forwarded = True
                        await part({"data": base64.b64encode(chunk[:used]).decode("ascii")})
            finally:
                await self._give_back(stream, keep=end.done and end.reusable)
            if forwarded or not reused:
                return {}
            # A kept connection that ended before answering: the endpoint closed it while
            # it waited (it got nothing it could have acted on). Once more, on a new one.

    async def _take(self) -> tuple[anyio.abc.ByteStream, bool]:
        """An open connection to the endpoint (and whether it was kept from an earlier
        request), else a new one."""
        from ._transport import RequestError

        now = time.monotonic()
        while self._idle:
            stream, since = self._idle.pop()
            if now - since < KEEP_IDLE_S:
                return stream, True
            await _close(stream)
        try:
            with anyio.fail_after(CONNECT_TIMEOUT_S):
                return await self._connect(), False
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise RequestError(
                "BadGateway", f"cannot reach the model at {self._netloc}: {exc}"
            ) from None

    async def _give_back(self, stream: anyio.abc.ByteStream, *, keep: bool) -> None:
        if keep and not self._closed and len(self._idle) < KEEP_CONNECTIONS:
            self._idle.append((stream, time.monotonic()))
        else:
            await _close(stream)

    async def aclose(self) -> None:
        """Revoke the token and close the connections kept open. Idempotent.

        A request still being answered closes its connection when it ends.
        """
        self.revoke()
        self._closed = True
        idle, self._idle = self._idle, []
        for stream, _ in idle:
            await _close(stream)

    async def _connect(self) -> anyio.abc.ByteStream:
        if self._tls:
            return await anyio.connect_tcp(
                self._host, self._port, tls=True, tls_hostname=self._host
            )
        return await anyio.connect_tcp(self._host, self._port)

    def _authorized(self, headers: list[tuple[str, str]]) -> bool:
        offered = [
            v.strip()
            for k, v in headers
            if k.lower() == "x-api-key"
            or (k.lower() == "authorization" and v.strip().lower().startswith("bearer "))
        ]
        offered = [v[7:].strip() if v.lower().startswith("bearer ") else v for v in offered]
        want = self.token.encode()
        return bool(offered) and all(hmac.compare_digest(v.encode(), want) for v in offered)


def _request_of(payload: dict[str, Any]) -> tuple[str, bytes]:
    from ._relay import wire
    from ._transport import RequestError

    head, body = payload.get("head"), payload.get("body")
    if set(payload) != {"head", "body"} or not isinstance(head, str) or not isinstance(body, str):
        raise RequestError("BadRequest", "a model.http request carries text head and body")
    if len(head) > wire.MAX_HTTP_HEAD or len(body) > wire.MAX_HTTP_BODY * 4 // 3 + 4:
        raise RequestError("BadRequest", "request too large")
    try:
        return head, _b64decode(body)
    except (binascii.Error, ValueError):
        raise RequestError("BadRequest", "the body is not base64") from None


def _b64decode(text: str) -> bytes:
    """Strict base64 (no characters outside the alphabet, correct padding)."""
    if sys.version_info >= (3, 11):
        return binascii.a2b_base64(text, strict_mode=True)
    return base64.b64decode(text, validate=True)  # pragma: no cover - Python 3.10


def _ack_at_once(stream: anyio.abc.ByteStream) -> None:
    """Acknowledge what the endpoint sends at once, not after the kernel's delay (Linux).

    On a kept connection the kernel delays acknowledgements (up to 40 ms); an endpoint that
    writes a response's head and body separately with Nagle's algorithm on waits for that
    acknowledgement before it sends the body. A new connection starts in this mode; a kept
    one leaves it, so it is asked for again around each read (it does not stick).
    """
    quickack = getattr(socket, "TCP_QUICKACK", None)
    if quickack is None:
        return
    sock = stream.extra(anyio.abc.SocketAttribute.raw_socket, None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)


async def _close(stream: anyio.abc.ByteStream) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        try:
            await stream.aclose()
        except (OSError, anyio.BrokenResourceError, ssl.SSLError):
            pass


class _ResponseEnd:
    """Follows an HTTP/1.1 response's framing as its bytes pass, to tell where it ends.

    Bytes are passed on as they came; this only finds the end: after the head for a
    response without a body, after ``Content-Length`` bytes, after the last chunk and the
    trailers of a chunked body, else (or where the framing makes no sense) at end of stream,
    and then the connection is not kept.

    Attributes:
        done: The response ended.
        reusable: The connection can carry another request once the response ended.
    """

    _HEAD, _BODY, _SIZE, _CRLF, _TRAILER, _EOF = range(6)
    _MAX_LINE = 64 * 1024

    def __init__(self, *, head_only: bool) -> None:
        self._head_only = head_only
        self._state = self._HEAD
        self._line = bytearray()
        self._head: list[bytes] = []
        self._left = 0
        self._chunked = False
        self.done = False
        self.reusable = True

    def feed(self, data: bytes) -> int:
        """Take the next bytes received; returns how many of them belong to the response."""
        pos = 0
        while pos < len(data) and not self.done:
            if self._state == self._EOF:
                return len(data)
            if self._state == self._BODY:
                take = min(self._left, len(data) - pos)
                pos += take
                self._left -= take
                if not self._left:
                    self._state = self._CRLF if self._chunked else self._HEAD
                    self.done = not self._chunked
                continue
            newline = data.find(b"\n", pos)
            if newline == -1:
                self._line += data[pos:]
                if len(self._line) > self._MAX_LINE:
                    self._give_up()
                return len(data)
            self._line += data[pos:newline]
            pos = newline + 1
            line = bytes(self._line).rstrip(b"\r")
            self._line.clear()
            self._on_line(line)
        return pos

    def at_eof(self) -> None:
        """The endpoint closed the connection."""
        self.reusable = False
        if self._state == self._EOF:
            self.done = True

    def _give_up(self) -> None:
        self._state = self._EOF
        self.reusable = False

    def _on_line(self, line: bytes) -> None:
        if self._state == self._SIZE:
            try:
                size = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                size = -1
            if size < 0:
                self._give_up()
            elif size == 0:
                self._state = self._TRAILER
            else:
                self._state, self._left = self._BODY, size
        elif self._state == self._CRLF:
            if line:
                self._give_up()
            else:
                self._state = self._SIZE
        elif self._state == self._TRAILER:
            self.done = not line
        elif line:
            self._head.append(line)
            if len(self._head) > 200:
                self._give_up()
        elif self._head:
            head, self._head = self._head, []
            self._on_head(head)

    def _on_head(self, head: list[bytes]) -> None:
        words = head[0].split(None, 2)
        try:
            status = int(words[1])
        except (IndexError, ValueError):
            self._give_up()
            return
        fields: dict[bytes, bytes] = {}
        for line in head[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            fields[name] = fields[name] + b"," + value.strip() if name in fields else value.strip()
        if 100 <= status < 200 and status != 101:
            return  # an interim response: the real one follows
        tokens = {t.strip() for t in fields.get(b"connection", b"").lower().split(b",")}
        if b"close" in tokens or (words[0] == b"HTTP/1.0" and b"keep-alive" not in tokens):
            self.reusable = False
        coding = fields.get(b"transfer-encoding", b"").lower().split(b",")[-1].strip()
        if status == 101:
            self._give_up()
        elif self._head_only or status in (204, 304):
            self.done = True
        elif coding == b"chunked":
            self._chunked = True
            self._state = self._SIZE
        elif coding or b"content-length" not in fields:
            self._give_up()
        else:
            try:
                length = int(fields[b"content-length"])
            except ValueError:
                length = -1
            if length < 0 or b"," in fields[b"content-length"]:
                self._give_up()
            elif length == 0:
                self.done = True
            else:
                self._state, self._left = self._BODY, length


def _parse_head(head: str) -> tuple[str, str, list[tuple[str, str]]]:
    from ._transport import RequestError

    lines = head.replace("\r\n", "\n").split("\n")
    words = lines[0].split(" ")
    if (
        len(words) != 3
        or words[0] not in _METHODS
        or not words[1].startswith("/")
        or words[1].startswith("//")
        or not words[2].startswith("HTTP/1.")
        or any(c in words[1] for c in "\r\n\t ")
    ):
        raise RequestError(
            "BadRequest", f"not a request line the relay forwards: {lines[0]!r:.100}"
        )
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if (
            not sep
            or not name
            or name != name.strip()
            or any(c in name for c in " \t")
            or any(c in line for c in "\r\0")
        ):
            raise RequestError("BadRequest", f"not a header line: {line!r:.100}")
        headers.append((name, value.strip()))
    return words[0], words[1], headers
