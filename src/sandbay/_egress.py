"""Egress policy: what a sandbox may reach, enforced on the host, outside the agent's reach.

`SandboxSpec.egress` sets it. A sandbox with a policy has no network of its own; the relay
offers the CLI and its tools an HTTP proxy (``HTTPS_PROXY``/``HTTP_PROXY``) in the CLI's
network namespace, and carries each tunnel through its own process channel to the host as an
``egress.open`` request, where `EgressGate.handle_open` checks the target against the
allowlist (the name as asked, then every address it resolves to) before the host connects.
A tool that ignores the proxy variables has no network at all.

Policies: ``"none"`` (nothing, not even the model), ``"model"`` (only the model relay) or a
list of entries: ``host``, ``host:port``, ``*.domain``, ``*.domain:port``, an IP address
(``10.0.0.5``, ``[::1]:8443``). An entry without a port allows ports 80 and 443.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc

__all__ = [
    "ACK",
    "CLOSE",
    "OPEN",
    "SEND",
    "EgressGate",
    "EgressRule",
    "Policy",
    "forwarder_argv",
    "parse_policy",
]

OPEN = "egress.open"
SEND = "egress.send"
ACK = "egress.ack"
CLOSE = "egress.close"
#: Ports an entry without one allows.
DEFAULT_PORTS = (80, 443)
#: Bytes the host sends into a tunnel ahead of the relay's acknowledgements.
WINDOW = 1024 * 1024  # = wire.EGRESS_WINDOW
CHUNK = 64 * 1024
CONNECT_TIMEOUT_S = 30.0
#: Tunnels open at once per run.
MAX_TUNNELS = 16
#: Where the forwarder finds the relay's proxy socket, inside the CLI's namespace.
FORWARDER_SOCKET = "/.sandbay-egress.sock"

Part = Callable[[dict[str, Any]], Awaitable[None]]
Policy = str | tuple[str, ...]


@dataclass(frozen=True)
class EgressRule:
    """One allowlist entry: a name (``*.`` for any subdomain), or an address; its ports."""

    name: str | None
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    ports: tuple[int, ...]

    def allows_name(self, host: str, port: int) -> bool:
        if self.name is None or port not in self.ports:
            return False
        if self.name.startswith("*."):
            return host.endswith(self.name[1:]) and len(host) > len(self.name) - 1
        return host == self.name

    def allows_address(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return self.address is not None and self.address == address


def parse_rule(entry: str) -> EgressRule:
    """One allowlist entry; a `ValueError` says what is wrong with it."""
    if not isinstance(entry, str) or not entry or entry != entry.strip():
        raise ValueError(f"egress entry {entry!r} must be a host name or address, no spaces")
    text, port_text = entry.lower(), None
    ports: tuple[int, ...] = DEFAULT_PORTS
    if text.startswith("["):
        inner, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"egress entry {entry!r}: write an IPv6 address as [addr]:port")
        text, port_text = inner, rest[1:] if rest else None
    elif text.count(":") == 1:
        text, _, port_text = text.partition(":")
    if port_text is not None:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"egress entry {entry!r}: the port must be 1-65535")
        ports = (int(port_text),)
    try:
        return EgressRule(name=None, address=ipaddress.ip_address(text), ports=ports)
    except ValueError:
        pass
    label = text[2:] if text.startswith("*.") else text
    parts = label.split(".")
    if not label or len(label) > 253 or not all(_label_ok(p) for p in parts):
        raise ValueError(
            f"egress entry {entry!r} is not a host name (example.com, *.example.com), "
            "an IP address or either with :port"
        )
    return EgressRule(name=text, address=None, ports=ports)


def _label_ok(part: str) -> bool:
    return (
        0 < len(part) <= 63
        and all(c.isalnum() or c == "-" for c in part)
        and part.isascii()
        and not part.startswith("-")
        and not part.endswith("-")
    )


def parse_policy(value: object) -> object:
    """Check a `SandboxSpec.egress` value; return it normalised (a list as a tuple)."""
    if value is None or value in ("none", "model"):
        return value
    if isinstance(value, str):
        raise ValueError(
            f"egress must be 'none', 'model' or a list of allowed hosts, got {value!r} "
            "(for one host, write [" + repr(value) + "])"
        )
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"egress must be 'none', 'model' or a list of hosts, got {value!r}")
    if not value:
        raise ValueError("egress=[] allows nothing: write 'model' (or 'none') for that")
    for entry in value:
        parse_rule(entry)
    return tuple(value)


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _exposed(address: Address) -> bool:
    """Addresses a name may not lead to unless listed: the host itself and its neighbours'
    link-local services (cloud metadata), and what is not an address one connects to."""
    return (
        address.is_loopback
        or address.is_link_local
        or address.is_unspecified
        or address.is_multicast
        or (isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None)
    )


class EgressGate:
    """The host's side of one run's egress proxy: checks each tunnel, then carries it.

    Args:
        rules: The allowlist (`SandboxSpec.egress` entries).

    Attributes:
        refused: Tunnels refused so far, each as ``host:port`` and the reason.
        opened: Tunnels opened so far, as ``host:port``.
    """

    def __init__(self, rules: Sequence[str]) -> None:
        self.rules = [parse_rule(entry) for entry in rules]
        self.refused: list[str] = []
        self.opened: list[str] = []
        self._tunnels: dict[str, _Tunnel] = {}

    async def check(self, host: str, port: int) -> list[Address]:
        """The addresses ``host:port`` may be reached at, or a `RequestError` why not."""
        from ._transport import RequestError

        def refuse(reason: str) -> RequestError:
            self.refused.append(f"{host}:{port} ({reason})")
            return RequestError("Forbidden", f"egress to {host}:{port} refused: {reason}")

        host = host.lower().rstrip(".")
        try:
            literal: Address | None = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            literal = None
        if literal is not None:
            if any(r.allows_address(literal) and port in r.ports for r in self.rules):
                return [literal]
            raise refuse("the address is not on the sandbox's egress list")
        if not any(r.allows_name(host, port) for r in self.rules):
            raise refuse("the host is not on the sandbox's egress list")
        try:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise refuse(f"the name does not resolve ({exc})") from None
        addresses: list[Address] = []
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).partition("%")[0])
            listed = any(r.allows_address(address) and port in r.ports for r in self.rules)
            if _exposed(address) and not listed:
                raise refuse(f"the name resolves to {address}, which is not on the list")
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise refuse("the name has no address")
        return addresses

    async def handle_open(self, payload: dict[str, Any], part: Part) -> dict[str, Any]:
        """Answer ``egress.open`` (``host``, ``port``): check, connect, then stream what the
        target sends back as parts (``data``, base64) until it closes its side."""
        from ._transport import RequestError

        host, port = payload.get("host"), payload.get("port")
        if (
            set(payload) != {"host", "port"}
            or not isinstance(host, str)
            or not 0 < len(host) <= 255
            or type(port) is not int
            or not 1 <= port <= 65535
        ):
            raise RequestError("BadRequest", "egress.open carries a host and a port")
        if len(self._tunnels) >= MAX_TUNNELS:
            raise RequestError("Busy", f"more than {MAX_TUNNELS} tunnels at once")
        addresses = await self.check(host, port)
        stream: anyio.abc.SocketStream | None = None
        error: OSError | TimeoutError | None = None
        for address in addresses:
            try:
                with anyio.fail_after(CONNECT_TIMEOUT_S):
                    stream = await anyio.connect_tcp(str(address), port)
                break
            except (OSError, TimeoutError) as exc:
                error = exc
        if stream is None:
            raise RequestError("BadGateway", f"cannot reach {host}:{port}: {error}")
        tunnel = _Tunnel(stream)
        tid = secrets.token_urlsafe(12)
        self._tunnels[tid] = tunnel
        self.opened.append(f"{host}:{port}")
        try:
            async with stream:
                await part({"tunnel": tid})
                with anyio.CancelScope() as scope:
                    tunnel.scope = scope
                    while True:
                        try:
                            chunk = await stream.receive(CHUNK)
                        except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                            break
                        while tunnel.sent - tunnel.acked >= WINDOW:
                            await tunnel.acks.wait()
                            tunnel.acks = anyio.Event()
                        tunnel.sent += len(chunk)
                        await part({"data": base64.b64encode(chunk).decode("ascii")})
        finally:
            del self._tunnels[tid]
        return {}

    async def handle_send(self, payload: dict[str, Any], part: Part) -> dict[str, Any]:
        """Answer ``egress.send`` (``tunnel``, ``data``; ``eof``): bytes for the target."""
        from ._transport import RequestError

        tunnel = self._tunnel_of(payload, {"tunnel", "data", "eof"})
        data, eof = payload.get("data", ""), payload.get("eof", False)
        if not isinstance(data, str) or len(data) > CHUNK * 2 or type(eof) is not bool:
            raise RequestError("BadRequest", "egress.send carries base64 data and eof")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("BadRequest", "egress.send data is not base64") from None
        try:
            if raw:
                await tunnel.stream.send(raw)
            if eof:
                await tunnel.stream.send_eof()
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
            raise RequestError("BadGateway", f"the tunnel's target is gone: {exc}") from None
        return {}

    async def handle_ack(self, payload: dict[str, Any], part: Part) -> dict[str, Any]:
        """Answer ``egress.ack`` (``tunnel``, ``acked``: bytes the relay passed on so far)."""
        from ._transport import RequestError

        tunnel = self._tunnel_of(payload, {"tunnel", "acked"})
        acked = payload.get("acked")
        if type(acked) is not int or not tunnel.acked <= acked <= tunnel.sent:
            raise RequestError("BadRequest", "egress.ack acknowledges bytes it was sent")
        tunnel.acked = acked
        tunnel.acks.set()
        return {}

    async def handle_close(self, payload: dict[str, Any], part: Part) -> dict[str, Any]:
        """Answer ``egress.close`` (``tunnel``): the client went away; drop the tunnel."""
        tunnel = self._tunnel_of(payload, {"tunnel"})
        if tunnel.scope is not None:
            tunnel.scope.cancel()
        await tunnel.stream.aclose()
        return {}

    def _tunnel_of(self, payload: dict[str, Any], fields: set[str]) -> _Tunnel:
        from ._transport import RequestError

        tunnel = self._tunnels.get(payload.get("tunnel"))  # type: ignore[arg-type]
        if tunnel is None or not set(payload) <= fields:
            raise RequestError("BadRequest", "no such tunnel")
        return tunnel


class _Tunnel:
    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.sent = 0
        self.acked = 0
        self.acks = anyio.Event()
        self.scope: anyio.CancelScope | None = None


#: The forwarder run in the CLI's network namespace where the relay is outside it: listens
#: on 127.0.0.1:PORT there, passes each connection to the relay's proxy socket, and runs the
#: CLI (argv 3 on) in the foreground. Standard library only.
_FORWARDER = r"""
import os, socket, sys, threading
port, path, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind(("127.0.0.1", port))
ls.listen(64)
if os.fork():
    ls.close()
    os.execvp(argv[0], argv)
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
def pump(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    try:
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass
def serve(conn):
    up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        up.connect(path)
    except OSError:
        conn.close()
        return
    t = threading.Thread(target=pump, args=(up, conn), daemon=True)
    t.start()
    pump(conn, up)
    t.join()
    conn.close()
    up.close()
while True:
    c, _ = ls.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def forwarder_argv(python: str) -> list[str]:
    """The command that runs the forwarder before the CLI's argv (appended to it)."""
    from ._relay import wire

    return [python, "-S", "-c", _FORWARDER, str(wire.EGRESS_FORWARDER_PORT), FORWARDER_SOCKET]
