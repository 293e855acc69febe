"""Egress policy: a sandbox reaches only what `SandboxSpec.egress` allows, checked on the host.

Two tiny HTTP servers on the host's loopback, one allowed and one not. The real ``claude``
CLI runs in a sandbox without a network of its own; a Bash tool call (driven by the scripted
model, as a hostile prompt could drive it) tries the allowed server through the relay's
proxy (plain HTTP and a CONNECT tunnel), the disallowed one the same ways, and both by a
raw socket that ignores the proxy.
"""

from __future__ import annotations

import http.server
import shutil
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from claude_agent_sdk import ClaudeAgentOptions, ResultMessage, query

import sandbay
from sandbay import ConfigError, SandboxSpec
from sandbay._egress import EgressGate, parse_rule
from sandbay._transport import RequestError
from sandbay.testing import ScriptedModel, Turn

pytestmark = pytest.mark.anyio

#: Tries each target (port, way) and prints one ``port/way=outcome`` line per try.
PROBE = r"""
import http.client, os, socket, sys, urllib.request
proxy = os.environ.get("HTTP_PROXY", "")
print("proxy=" + proxy)
for port in sys.argv[1:]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/x", timeout=20) as r:
            print(f"{port}/http=" + r.read().decode())
    except Exception as exc:
        print(f"{port}/http=failed:{getattr(exc, 'code', type(exc).__name__)}")
    try:
        host, _, pport = proxy[len("http://"):].partition(":")
        conn = http.client.HTTPConnection(host, int(pport), timeout=20)
        conn.set_tunnel("127.0.0.1", int(port))
        conn.request("GET", "/y")
        print(f"{port}/connect=" + conn.getresponse().read().decode())
    except Exception as exc:
        print(f"{port}/connect=failed:{type(exc).__name__}:{str(exc)[:60]}")
    try:
        socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()
        print(f"{port}/raw=connected")
    except OSError as exc:
        print(f"{port}/raw=failed:{type(exc).__name__}")
"""


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello-from-{self.server.server_port}".encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def servers() -> Iterator[tuple[int, int]]:
    made = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello) for _ in range(2)]
    for server in made:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield made[0].server_address[1], made[1].server_address[1]
    finally:
        for server in made:
            server.shutdown()
            server.server_close()


def _config(provider: str) -> sandbay.BaseProviderConfig:
    if provider == "bwrap":
        if not shutil.which("bwrap"):
            pytest.skip("bubblewrap is not installed")
        return sandbay.LocalConfig(isolate=True)
    return sandbay.DockerConfig()


@pytest.mark.parametrize(
    "provider",
    [
        pytest.param("bwrap", marks=pytest.mark.bwrap),
        pytest.param("docker", marks=pytest.mark.docker),
    ],
)
async def test_only_the_allowed_host_is_reached_and_only_through_the_proxy(
    provider: str, servers: tuple[int, int]
) -> None:
    allowed, denied = servers
    spec = SandboxSpec(egress=[f"127.0.0.1:{allowed}"])
    assert spec.network == "none"
    async with sandbay.open_sandbox(_config(provider), spec) as sb:
        await sb.write_file("probe.py", PROBE.encode())
        command = f"python3 {sb.resolve('probe.py')} {allowed} {denied}"
        script = [Turn.tool_use("Bash", {"command": command}), Turn.text("done")]
        async with ScriptedModel(script) as model:
            options = ClaudeAgentOptions(max_turns=3, allowed_tools=["Bash"], env=model.env())
            transport = sandbay.SandboxTransport(sb, options)
            with anyio.fail_after(240):
                messages = [
                    m async for m in query(prompt="go", options=options, transport=transport)
                ]
            results = model.tool_results()
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error, messages[-1]
    output = str(results[0].get("content"))
    lines = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    assert lines.get("proxy", "").startswith("http://127.0.0.1:"), output
    assert lines.get(f"{allowed}/http") == f"hello-from-{allowed}", output
    assert lines.get(f"{allowed}/connect") == f"hello-from-{allowed}", output
    assert lines.get(f"{denied}/http") == "failed:403", output
    assert lines.get(f"{denied}/connect", "").startswith(
        "failed:OSError:Tunnel connection failed: 403"
    ), output
    assert lines.get(f"{allowed}/raw", "").startswith("failed:"), output
    assert lines.get(f"{denied}/raw", "").startswith("failed:"), output
    assert transport.egress is not None
    assert any(f"127.0.0.1:{denied}" in r for r in transport.egress.refused)


@pytest.mark.parametrize(
    "provider",
    [
        pytest.param("bwrap", marks=pytest.mark.bwrap),
        pytest.param("docker", marks=pytest.mark.docker),
    ],
)
async def test_egress_model_reaches_the_model_and_nothing_else(
    provider: str, servers: tuple[int, int]
) -> None:
    allowed, _ = servers
    async with sandbay.open_sandbox(_config(provider), SandboxSpec(egress="model")) as sb:
        await sb.write_file("probe.py", PROBE.encode())
        command = f"python3 {sb.resolve('probe.py')} {allowed}"
        script = [Turn.tool_use("Bash", {"command": command}), Turn.text("done")]
        async with ScriptedModel(script) as model:
            options = ClaudeAgentOptions(max_turns=3, allowed_tools=["Bash"], env=model.env())
            transport = sandbay.SandboxTransport(sb, options)
            with anyio.fail_after(240):
                messages = [
                    m async for m in query(prompt="go", options=options, transport=transport)
                ]
            results = model.tool_results()
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error, messages[-1]
    output = str(results[0].get("content"))
    lines = dict(line.split("=", 1) for line in output.splitlines() if "=" in line)
    for way in ("http", "connect", "raw"):
        assert lines.get(f"{allowed}/{way}", "").startswith("failed:"), output
    assert transport.model_relay is not None
    if provider == "docker":  # the relay shares the CLI's network: no proxy at all
        assert lines.get("proxy") == "" and transport.egress is None, output
    else:  # the model through the proxy, which lets nothing else through
        assert transport.egress is not None and not transport.egress.opened
        assert len(transport.egress.refused) == 2, transport.egress.refused


async def test_egress_none_and_a_model_relay_turned_off_refuse_an_agent_run() -> None:
    options = ClaudeAgentOptions(env={"ANTHROPIC_API_KEY": "sk-test"})
    config = sandbay.LocalConfig(isolate=True)
    if not shutil.which("bwrap"):
        pytest.skip("bubblewrap is not installed")
    async with sandbay.open_sandbox(config, SandboxSpec(egress="none")) as sb:
        with pytest.raises(ConfigError, match=r"egress='none'.*egress='model'"):
            await sandbay.SandboxTransport(sb, options).connect()
    async with sandbay.open_sandbox(config, SandboxSpec(egress="model")) as sb:
        transport = sandbay.SandboxTransport(sb, options, model_relay=False)
        with pytest.raises(ConfigError, match="model_relay=False"):
            await transport.connect()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("example.com", "for one host, write"),
        ([], "allows nothing"),
        (["exa mple.com"], "not a host name"),
        (["example.com:0"], "port must be 1-65535"),
        (["example.com:"], "port must be 1-65535"),
        (["[::1"], "IPv6"),
        ([7], "must be a host name"),
    ],
)
def test_bad_egress_values_are_config_errors(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        SandboxSpec(egress=value)  # type: ignore[arg-type]


def test_egress_cuts_the_network_and_refuses_the_hosts() -> None:
    assert SandboxSpec(egress="model").network == "none"
    assert SandboxSpec(egress=["example.com"], network="none").network == "none"
    assert SandboxSpec(egress=["example.com"]).egress == ("example.com",)
    with pytest.raises(ConfigError, match="network='host'"):
        SandboxSpec(egress="model", network="host")


async def test_the_gate_checks_names_addresses_and_ports() -> None:
    gate = EgressGate(["127.0.0.1:8080", "*.example.test", "localhost:9000", "[::1]:443"])
    assert [str(a) for a in await gate.check("127.0.0.1", 8080)] == ["127.0.0.1"]
    assert [str(a) for a in await gate.check("[::1]", 443)] == ["::1"]
    refusals = [
        ("127.0.0.1", 8081, "address is not on"),  # a listed address, another port
        ("127.0.0.2", 8080, "address is not on"),  # an IP literal not listed
        ("example.test", 443, "host is not on"),  # *. covers subdomains only
        ("evil.test", 443, "host is not on"),
        ("a.example.test", 22, "host is not on"),  # ports 80 and 443 only by default
        # A listed name that leads to the host's loopback, which is not listed itself.
        ("localhost", 9000, "resolves to"),
    ]
    for host, port, reason in refusals:
        with pytest.raises(RequestError, match=reason) as caught:
            await gate.check(host, port)
        assert caught.value.kind == "Forbidden"
    assert len(gate.refused) == len(refusals)
    # Listing the address the name leads to lets it through.
    assert await EgressGate(["localhost:9000", "127.0.0.1:9000", "[::1]:9000"]).check(
        "localhost", 9000
    )


def test_rules_parse() -> None:
    assert parse_rule("Example.COM").name == "example.com"
    assert parse_rule("example.com").ports == (80, 443)
    assert parse_rule("[::1]:8443").ports == (8443,)
    assert parse_rule("*.example.com:8443").allows_name("a.example.com", 8443)
    assert not parse_rule("*.example.com").allows_name("badexample.com", 443)
