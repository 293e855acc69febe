"""The model relay: the real key stays on the host; the sandbox gets a per-run token.

The real ``claude`` CLI runs in the sandbox against ScriptedModel on the host's loopback; a
Bash tool call (driven by the scripted model, as a hostile prompt could drive it) searches
the sandbox for the key: the environment of every process it can see, and the files of the
run directory, working directory, home and temporary directory.
"""

from __future__ import annotations

import base64
import http.server
import shutil
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, ClassVar

import anyio
import pytest
from claude_agent_sdk import ClaudeAgentOptions, ResultMessage, query

import sandbay
from sandbay import Sandbox, SandboxSpec
from sandbay._model_relay import ModelRelay, _ResponseEnd, model_relay_wanted
from sandbay._transport import RequestError
from sandbay.testing import ScriptedModel, Turn
from sandbox_kinds import open_kind

pytestmark = pytest.mark.anyio

PROVIDERS = [
    pytest.param(("local", "host"), id="local"),
    pytest.param(("bwrap", "none"), id="bwrap-none", marks=pytest.mark.bwrap),
    pytest.param(("docker", "host"), id="docker", marks=pytest.mark.docker),
    pytest.param(("docker", "none"), id="docker-none", marks=pytest.mark.docker),
]

#: Searches for a key (given reversed, so the search itself does not hold it) in the
#: environment of every process and in the files under the roots given.
SCAN = r"""
import os, sys
key = sys.argv[1][::-1].encode()
hits = []
for pid in os.listdir("/proc"):
    if pid.isdigit():
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if key in fh.read():
                    hits.append(f"environ of {pid}")
        except OSError:
            pass
files = 0
for root in sys.argv[2:]:
    for top, dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(top, name)
            try:
                if os.path.islink(path) or os.path.getsize(path) > 64 * 2**20:
                    continue
                with open(path, "rb") as fh:
                    files += 1
                    if key in fh.read():
                        hits.append(path)
            except OSError:
                pass
print(f"scanned-{files}-files hits={hits}")
"""

#: Asks the model listener in the sandbox with the token given; prints the status.
ASK = r"""
import json, os, sys, urllib.error, urllib.request
body = json.dumps({"model": "m", "max_tokens": 5, "messages": []}).encode()
url = os.environ["ANTHROPIC_BASE_URL"] + "/v1/messages/count_tokens"
request = urllib.request.Request(url, data=body, headers={"x-api-key": sys.argv[1]})
try:
    status = urllib.request.urlopen(request, timeout=30).status
except urllib.error.HTTPError as exc:
    status = exc.code
print(f"status-{sys.argv[2]}-{status}")
"""


@pytest.fixture
async def sandbox(request: pytest.FixtureRequest) -> AsyncIterator[Sandbox]:
    kind, network = request.param
    async with open_kind(kind, network=network) as sb:
        yield sb


async def roots_of(sb: Sandbox) -> list[str]:
    result = await sb.exec(["sh", "-c", 'echo "$HOME"; echo "${TMPDIR:-/tmp}"'])
    home, tmp = result.stdout.decode().split()
    return [sb.agent_dir, sb.workdir, home, tmp]


def docker_inspect(sb: Sandbox) -> str:
    return subprocess.run(
        ["docker", "inspect", sb.id], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.parametrize("sandbox", PROVIDERS, indirect=True)
async def test_the_key_never_enters_the_sandbox_and_the_model_gets_it(sandbox: Sandbox) -> None:
    key = f"sk-ant-real-{uuid.uuid4().hex}"
    await sandbox.write_file("scan.py", SCAN.encode())
    roots = " ".join(await roots_of(sandbox))
    scan = f"python3 {sandbox.resolve('scan.py')} {key[::-1]} {roots}"
    script = [Turn.tool_use("Bash", {"command": scan}), Turn.text("done")]
    async with ScriptedModel(script) as model:
        env = {**model.env(), "ANTHROPIC_API_KEY": key}
        options = ClaudeAgentOptions(max_turns=3, allowed_tools=["Bash"], env=env)
        transport = sandbay.SandboxTransport(sandbox, options)
        with anyio.fail_after(180):
            messages = [m async for m in query(prompt="go", options=options, transport=transport)]
        seen = [r.headers.get("x-api-key") for r in model.requests]
        results = model.tool_results()
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error
    assert transport.model_relay is not None
    # The model got the real key on every request, never the token.
    assert seen and all(k == key for k in seen), seen
    output = str(results[0].get("content"))
    assert "scanned-" in output and "hits=[]" in output, output
    assert int(output.split("scanned-")[1].split("-")[0]) > 3  # the run's log among them
    # Once the run is over too (its logs complete), the sandbox holds no trace of the key.
    scanned = await sandbox.exec(["python3", sandbox.resolve("scan.py"), key[::-1], *roots.split()])
    assert "hits=[]" in scanned.stdout.decode(), scanned.stdout
    if sandbox.provider == "docker":
        assert key not in docker_inspect(sandbox)


@pytest.mark.parametrize("sandbox", PROVIDERS[:1] + PROVIDERS[3:], indirect=True)
async def test_a_runs_token_is_refused_once_the_run_ended(sandbox: Sandbox) -> None:
    await sandbox.write_file("ask.py", ASK.encode())
    ask = f"python3 {sandbox.resolve('ask.py')}"
    async with ScriptedModel([Turn.text("first run")]) as model:
        options = ClaudeAgentOptions(max_turns=1, env=model.env())
        first = sandbay.SandboxTransport(sandbox, options)
        with anyio.fail_after(120):
            async for _ in query(prompt="go", options=options, transport=first):
                pass
        assert first.model_relay is not None
        old = first.model_relay.token
        # A second run in the same sandbox: its tool tries the first run's token, and its own.
        script = [
            Turn.tool_use("Bash", {"command": f'{ask} {old} old; {ask} "$ANTHROPIC_API_KEY" own'}),
            Turn.text("done"),
        ]
    async with ScriptedModel(script) as model:
        options = ClaudeAgentOptions(max_turns=3, allowed_tools=["Bash"], env=model.env())
        second = sandbay.SandboxTransport(sandbox, options)
        with anyio.fail_after(180):
            async for _ in query(prompt="go", options=options, transport=second):
                pass
        output = str(model.tool_results()[0].get("content"))
    assert "status-old-401" in output, output
    assert "status-own-" in output and "status-own-401" not in output, output
    assert second.model_relay is not None and second.model_relay.refused == 1


async def test_the_host_refuses_a_wrong_or_expired_token() -> None:
    async with ScriptedModel([Turn.text("x")]) as model:
        relay = ModelRelay(base_url=model.url, credential_name="ANTHROPIC_API_KEY", credential="k")
        parts: list[dict[str, Any]] = []

        async def part(data: dict[str, Any]) -> None:
            parts.append(data)

        def request(token: str) -> dict[str, Any]:
            head = f"GET /v1/models HTTP/1.1\r\nx-api-key: {token}\r\n\r\n"
            return {"head": head, "body": ""}

        with pytest.raises(RequestError, match="not valid"):
            await relay.handle(request("sk-ant-guess"), part)
        await relay.handle(request(relay.token), part)
        assert parts and base64.b64decode(parts[0]["data"]).startswith(b"HTTP/1.")
        await relay.aclose()
        with pytest.raises(RequestError, match="not valid"):
            await relay.handle(request(relay.token), part)
        assert [r.headers.get("x-api-key") for r in model.requests] == ["k"]
        for bad in (
            {"head": "GET http://elsewhere/ HTTP/1.1\r\n\r\n", "body": ""},
            {"head": "GET //elsewhere/ HTTP/1.1\r\n\r\n", "body": ""},
            {"head": "CONNECT x:443 HTTP/1.1\r\n\r\n", "body": ""},
            {"head": "GET / HTTP/1.1\r\n\r\n", "body": "!!"},
            {"head": "GET / HTTP/1.1\r\n\r\n"},
            {"head": f"GET / HTTP/1.1\r\nx-api-key: {relay.token}\rx-evil: 1\r\n\r\n", "body": ""},
        ):
            with pytest.raises(RequestError, match="BadRequest"):
                await relay.handle(bad, part)


def test_the_relay_is_on_by_default_where_a_key_is_configured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("SANDBAY_MODEL_RELAY", raising=False)
    assert model_relay_wanted({"ANTHROPIC_API_KEY": "k"}, None)
    assert model_relay_wanted({"ANTHROPIC_AUTH_TOKEN": "t"}, None)
    assert not model_relay_wanted({}, None)
    assert not model_relay_wanted({"ANTHROPIC_API_KEY": "k"}, False)
    assert not model_relay_wanted({"ANTHROPIC_API_KEY": "k", "CLAUDE_CODE_USE_BEDROCK": "1"}, None)
    assert not model_relay_wanted({"ANTHROPIC_API_KEY": "k", "SANDBAY_MODEL_RELAY": "0"}, None)
    monkeypatch.setenv("SANDBAY_MODEL_RELAY", "off")
    assert not model_relay_wanted({"ANTHROPIC_API_KEY": "k"}, None)
    assert model_relay_wanted({"ANTHROPIC_API_KEY": "k"}, True)


@pytest.mark.parametrize(
    "provider",
    [
        pytest.param("bwrap", marks=pytest.mark.bwrap),
        pytest.param("docker", marks=pytest.mark.docker),
    ],
)
async def test_run_agent_reaches_the_model_with_the_sandboxs_network_off(provider: str) -> None:
    if provider == "bwrap" and not shutil.which("bwrap"):
        pytest.skip("bubblewrap is not installed")
    config: sandbay.LocalConfig | sandbay.DockerConfig = (
        sandbay.LocalConfig(isolate=True) if provider == "bwrap" else sandbay.DockerConfig()
    )
    script = [Turn.tool_use("Bash", {"command": "echo offline-$((6*7))"}), Turn.text("done")]
    async with ScriptedModel(script) as model:
        options = ClaudeAgentOptions(max_turns=3, allowed_tools=["Bash"])
        async with sandbay.run_agent(
            "go",
            provider=config,
            spec=SandboxSpec(network="none"),
            options=options,
            env=model.env(),
            timeout=180,
        ) as run:
            messages = [m async for m in run]
        results = model.tool_results()
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error
    assert "offline-42" in str(results[0].get("content"))
    assert len(model.turn_requests) == 2


async def test_opting_out_sends_the_key_as_before() -> None:
    async with ScriptedModel([Turn.text("x")]) as model:
        async with sandbay.open_sandbox(sandbay.LocalConfig(isolate=False)) as sb:
            options = ClaudeAgentOptions(max_turns=1, env=model.env())
            transport = sandbay.SandboxTransport(sb, options, model_relay=False)
            with anyio.fail_after(120):
                async for _ in query(prompt="go", options=options, transport=transport):
                    pass
        assert transport.model_relay is None
        assert (
            model.requests
            and model.requests[0].headers["x-api-key"] == model.env()["ANTHROPIC_API_KEY"]
        )


#: Reads the first event of a stream through the relay, then asks the server to send the
#: rest: if the relay held the response back, the first event would not come before it.
STREAM_PROBE = r"""#!/usr/bin/env python3
import json, os, urllib.request
base, key = os.environ["ANTHROPIC_BASE_URL"], os.environ["ANTHROPIC_API_KEY"]
def get(path):
    return urllib.request.urlopen(
        urllib.request.Request(base + path, headers={"x-api-key": key}), timeout=60
    )
with get("/stream") as stream:
    first = stream.read1(4096).decode()
    get("/release").read()
    rest = stream.read().decode()
print(json.dumps({"type": "probe", "first": first, "rest": rest}), flush=True)
"""


class _SlowStream(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    released: ClassVar[threading.Event] = threading.Event()
    order: ClassVar[list[str]] = []

    def log_message(self, *_: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/release":
            self.order.append("release")
            self.released.set()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self.wfile.write(b"event: one\ndata: {}\n\n")
        self.wfile.flush()
        self.order.append("one")
        released = self.released.wait(60)
        self.order.append("two" if released else "two-unreleased")
        self.wfile.write(b"event: two\ndata: {}\n\n")


async def _run_probe(
    probe: str, url: str, *, before_close: Callable[[], object] = lambda: None
) -> list[dict[str, Any]]:
    """Run ``probe`` where the CLI runs (unisolated local), with the model at ``url``
    through the relay; its messages. ``before_close`` is called after the last one."""
    async with sandbay.open_sandbox(sandbay.LocalConfig(isolate=False)) as sb:
        await sb.write_file("probe", probe.encode(), mode=0o755)
        env = {"ANTHROPIC_BASE_URL": url, "ANTHROPIC_API_KEY": "sk-real"}
        options = ClaudeAgentOptions(cli_path=sb.resolve("probe"), env=env)
        transport = sandbay.SandboxTransport(sb, options)
        await transport.connect()
        await transport.end_input()
        try:
            with anyio.fail_after(120):
                out = [m async for m in transport.read_messages()]
            before_close()
        finally:
            await transport.close()
    return out


async def test_a_streamed_response_streams_through_the_relay() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowStream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        out = await _run_probe(STREAM_PROBE, url)
    finally:
        server.shutdown()
        server.server_close()
    assert _SlowStream.order == ["one", "release", "two"]
    assert out[0]["first"].startswith("event: one") and "event: two" in out[0]["rest"]


class _KeepAlive(http.server.BaseHTTPRequestHandler):
    """Answers on connections kept open (chunked, as the real API streams), and records them.

    ``GET /close-after`` answers with a length and then hangs up without saying so, as an
    endpoint that drops an idle connection does.
    """

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    ports: ClassVar[list[int]] = []
    open_now: ClassVar[set[int]] = set()

    def log_message(self, *_: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.open_now.add(self.client_address[1])

    def finish(self) -> None:
        super().finish()
        self.open_now.discard(self.client_address[1])

    def do_GET(self) -> None:
        self.ports.append(self.client_address[1])
        self.send_response(200)
        if self.path == "/close-after":
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
            self.close_connection = True
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event in (b"event: one\n\n", b"event: two\n\n"):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
        self.wfile.write(b"0\r\ntrailer: t\r\n\r\n")


@pytest.fixture
def keep_alive() -> Iterator[str]:
    _KeepAlive.ports.clear()
    _KeepAlive.open_now.clear()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _KeepAlive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def _ask(relay: ModelRelay, path: str) -> bytes:
    parts: list[bytes] = []

    async def part(data: dict[str, Any]) -> None:
        parts.append(base64.b64decode(data["data"]))

    head = f"GET {path} HTTP/1.1\r\nx-api-key: {relay.token}\r\n\r\n"
    with anyio.fail_after(30):
        await relay.handle({"head": head, "body": ""}, part)
    return b"".join(parts)


async def _until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(30):
        while not condition():  # noqa: ASYNC110 - set by the server's threads
            await anyio.sleep(0.01)


async def test_requests_share_a_kept_connection_closed_when_the_relay_closes(
    keep_alive: str,
) -> None:
    relay = ModelRelay(base_url=keep_alive, credential_name="ANTHROPIC_API_KEY", credential="k")
    answers = [await _ask(relay, "/events") for _ in range(3)]
    for answer in answers:  # each whole, and nothing of the next one's
        assert answer.startswith(b"HTTP/1.1 200")
        assert answer.endswith(b"0\r\ntrailer: t\r\n\r\n") and answer.count(b"event: one") == 1
    assert len(_KeepAlive.ports) == 3 and len(set(_KeepAlive.ports)) == 1
    assert len(_KeepAlive.open_now) == 1
    await relay.aclose()
    await _until(lambda: not _KeepAlive.open_now)
    with pytest.raises(RequestError, match="not valid"):
        await _ask(relay, "/events")


async def test_a_kept_connection_the_endpoint_dropped_is_replaced(keep_alive: str) -> None:
    relay = ModelRelay(base_url=keep_alive, credential_name="ANTHROPIC_API_KEY", credential="k")
    try:
        assert (await _ask(relay, "/close-after")).endswith(b"\r\n\r\nok")
        await _until(lambda: not _KeepAlive.open_now)  # it hung up after answering
        answer = await _ask(relay, "/events")
        assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\n")
        assert len(set(_KeepAlive.ports)) == 2
    finally:
        await relay.aclose()


async def test_a_run_leaves_no_connection_to_the_endpoint_open(keep_alive: str) -> None:
    kept: list[int] = []
    out = await _run_probe(
        KEEP_PROBE, keep_alive, before_close=lambda: kept.extend(_KeepAlive.open_now)
    )
    assert kept  # kept for the run's next request until the run ended
    assert out == [{"type": "probe", "events": 6}]
    assert len(set(_KeepAlive.ports)) == 1
    await _until(lambda: not _KeepAlive.open_now)


#: Three requests through the relay, each read to its end.
KEEP_PROBE = r"""#!/usr/bin/env python3
import json, os, urllib.request
base, key = os.environ["ANTHROPIC_BASE_URL"], os.environ["ANTHROPIC_API_KEY"]
events = 0
for _ in range(3):
    request = urllib.request.Request(base + "/events", headers={"x-api-key": key})
    with urllib.request.urlopen(request, timeout=60) as response:
        events += response.read().count(b"event: ")
print(json.dumps({"type": "probe", "events": events}), flush=True)
"""


@pytest.mark.parametrize(
    ("method", "response", "reusable"),
    [
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", True),
        ("GET", b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", True),
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", True),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n", True),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", True),
        (
            "GET",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            True,
        ),
        (
            "POST",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nx-trailer: 1\r\n\r\n",
            True,
        ),
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", False),
        ("GET", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        ("GET", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok", True),
    ],
)
def test_the_end_of_a_response_is_found_however_its_bytes_arrive(
    method: str, response: bytes, reusable: bool
) -> None:
    for size in (1, 3, len(response)):
        end = _ResponseEnd(head_only=method == "HEAD")
        used = 0
        for start in range(0, len(response), size):
            assert not end.done
            used += end.feed(response[start : start + size])
        assert end.done and used == len(response), size
        assert end.reusable is reusable
        # Bytes past the end are not the response's.
        assert end.feed(b"HTTP/1.1 200 OK\r\n") == 0


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\n\r\nuntil the end",  # no length: ends when the endpoint hangs up
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzzz",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokNOT-CRLF\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\nanything",
        b"garbage\r\n\r\nmore",
    ],
)
def test_a_response_without_a_clear_end_runs_to_end_of_stream_and_is_not_kept(
    response: bytes,
) -> None:
    end = _ResponseEnd(head_only=False)
    assert end.feed(response) == len(response)
    assert not end.done
    end.at_eof()
    assert end.done and not end.reusable


class _NagleOn(http.server.BaseHTTPRequestHandler):
    """Writes a response's head and body separately with Nagle's algorithm on (as Python's
    own server does): the body waits until the client acknowledged the head."""

    protocol_version = "HTTP/1.1"
    ports: ClassVar[list[int]] = []

    def log_message(self, *_: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.ports.append(self.client_address[1])
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")


async def test_a_kept_connection_does_not_wait_on_delayed_acknowledgements() -> None:
    # Delayed, the acknowledgement of the head comes after at least 40 ms (Linux's least
    # delay), and every request on the kept connection would take that long.
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NagleOn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    relay = ModelRelay(base_url=url, credential_name="ANTHROPIC_API_KEY", credential="k")
    try:
        times = []
        for _ in range(21):
            started = time.perf_counter()
            assert (await _ask(relay, "/")).endswith(b"\r\n\r\nok")
            times.append(time.perf_counter() - started)
        assert len(set(_NagleOn.ports)) == 1  # one kept connection
        assert statistics.median(times[1:]) < 0.040, times
    finally:
        await relay.aclose()
        server.shutdown()
        server.server_close()
