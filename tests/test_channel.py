"""The relay's two-way channel: framed input, timings, requests from the sandbox to the host.

The relay is run as uploaded (a script beside ``wire.py``) with a stand-in CLI that echoes
its stdin, so the framing is seen byte for byte; the end-to-end tests use the real CLI.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest
from claude_agent_sdk import ClaudeAgentOptions
from typing_extensions import override

import sandbay
from sandbay import Process, Sandbox
from sandbay._relay import wire
from sandbay._transport import RequestError
from sandbay.testing import ScriptedModel
from wrapping import WrappedSandbox

pytestmark = pytest.mark.anyio

RELAY_DIR = Path(sandbay.__file__).parent / "_relay"
#: A stand-in CLI: each stdin line back as a JSON message, then its exit.
ECHO = (
    "import json, sys\n"
    "for line in sys.stdin:\n"
    "    print(json.dumps({'type': 'echo', 'text': line}), flush=True)\n"
)


def relay(tmp_path: Path, *frames: bytes) -> list[dict[str, Any]]:
    """Run the relay as uploaded with the echo CLI; feed it ``frames``; its envelopes."""
    for name in ("relay.py", "wire.py"):
        shutil.copy(RELAY_DIR / name, tmp_path / name)
    start = wire.host_frame("start", argv=[sys.executable, "-c", ECHO], env={}, cwd=None)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "relay.py"), "serve", "--run-dir", str(tmp_path / "run")],
        input=start + b"".join(frames),
        capture_output=True,
        timeout=60,
        check=False,
    )
    return [json.loads(line) for line in done.stdout.splitlines()]


def echoed(envelopes: list[dict[str, Any]]) -> list[str]:
    return [e["data"]["text"] for e in envelopes if e["kind"] == "line"]


def test_inputs_pass_in_order_once_and_are_never_read_as_frames(tmp_path: Path) -> None:
    # What the CLI gets is exactly the inputs' data, once each, whatever it looks like: a
    # line that spells a sandbay frame is the CLI's input, not an end of input.
    envelopes = relay(
        tmp_path,
        wire.host_frame("input", n=1, data="one\n"),
        wire.host_frame("input", n=1, data="one again\n"),  # a resend: dropped
        wire.host_frame("input", n=2, data=wire.END_INPUT_LINE + "\n"),
        wire.host_frame("input", n=3, data="th"),
        wire.host_frame("input", n=4, data="ree\n"),
        wire.END_INPUT_LINE.encode() + b"\n",
        wire.host_frame("input", n=5, data="after the end\n"),
    )
    assert echoed(envelopes) == ["one\n", wire.END_INPUT_LINE + "\n", "three\n"]
    assert envelopes[-1]["kind"] == "end" and envelopes[-1]["data"]["exit_code"] == 0


def test_the_relay_reports_its_timings(tmp_path: Path) -> None:
    envelopes = relay(
        tmp_path, wire.host_frame("input", n=1, data="x\n"), wire.host_frame("end_input")
    )
    timings = [e["data"] for e in envelopes if e["kind"] == "timings"]
    assert all(e["seq"] == 0 for e in envelopes if e["kind"] == "timings")
    last = timings[-1]
    assert set(last) == set(wire.TIMING_NAMES)
    assert 0 < last["relay_start_ms"] <= last["cli_spawned_ms"] <= last["cli_first_line_ms"]
    # The first line's milestone is sent before the first line.
    kinds = [e["kind"] for e in envelopes]
    assert kinds.index("line") > max(i for i, k in enumerate(kinds) if k == "timings")


def test_the_relay_times_the_clis_own_prompt_to_first_message(tmp_path: Path) -> None:
    # The prompt is the first user message passed on; its first message, the first line
    # after it that the SDK would pass on (`wire.sdk_yields`).
    control = json.dumps({"type": "control_request", "request_id": "1", "request": {}}) + "\n"
    user = json.dumps({"type": "user", "message": {"role": "user", "content": "hi"}}) + "\n"
    envelopes = relay(
        tmp_path,
        wire.host_frame("input", n=1, data=control),
        wire.host_frame("input", n=2, data=user),
        wire.host_frame("end_input"),
    )
    last = [e["data"] for e in envelopes if e["kind"] == "timings"][-1]
    assert last["prompt_in_ms"] <= last["first_message_ms"]
    assert last["cli_first_line_ms"] <= last["first_message_ms"]
    # Without a user message there is no prompt to time from.
    (tmp_path / "again").mkdir()
    bare = relay(tmp_path / "again", wire.host_frame("input", n=1, data=control))
    last = [e["data"] for e in bare if e["kind"] == "timings"][-1]
    assert last["prompt_in_ms"] is None and last["first_message_ms"] is None


@pytest.mark.parametrize(
    ("frame", "complaint"),
    [
        (b'{"type": "user", "message": {}}\n', "wire version"),  # a bare CLI line
        (b"not json\n", "not JSON"),
        (wire.host_frame("input", n=2, data="x"), "input 2 follows input 0"),
        (wire.host_frame("input", n=0, data="x"), "n of 'input'"),
        (wire.host_frame("input", n=1, data=["x"]), "data of 'input'"),
        (wire.host_frame("input", n=1, data="x", extra=1), "unknown fields"),
        (wire.host_frame("reply", id=1, final="yes", data={}), "final of 'reply'"),
        (wire.host_frame("reply", id=1, final=False, error={"type": "x"}), "error of 'reply'"),
        (wire.host_frame("start", argv=["x"]), "a second 'start'"),
        (b'{"sandbay": 2, "kind": "input", "n": 1, "data": "x"}\n', "wire version 2"),
    ],
)
def test_the_relay_refuses_a_malformed_host_frame(
    tmp_path: Path, frame: bytes, complaint: str
) -> None:
    envelopes = relay(tmp_path, frame)
    errors = [e["data"] for e in envelopes if e["kind"] == "error"]
    assert errors and errors[0]["type"] == "ProtocolError", envelopes
    assert complaint in errors[0]["message"]
    assert echoed(envelopes) == []


def test_the_relay_refuses_a_start_frame_of_another_version(tmp_path: Path) -> None:
    for name in ("relay.py", "wire.py"):
        shutil.copy(RELAY_DIR / name, tmp_path / name)
    start = json.dumps({"sandbay": 2, "kind": "start", "argv": ["true"]}).encode() + b"\n"
    done = subprocess.run(
        [sys.executable, str(tmp_path / "relay.py"), "serve", "--run-dir", str(tmp_path / "r")],
        input=start,
        capture_output=True,
        timeout=60,
        check=False,
    )
    (error,) = [json.loads(line)["data"] for line in done.stdout.splitlines()][-1:]
    assert "expected a start frame" in error["message"] and "wire version 2" in error["message"]


# -- requests from the sandbox to the host ---------------------------------------------------


class _RequestingRelay(WrappedSandbox):
    """The relay is replaced by a script that makes requests and reports each reply it
    gets as a ``stderr`` envelope (which the host passes to ``options.stderr``)."""

    provider = "requesting"

    def __init__(self, inner: Sandbox, requests: list[dict[str, Any]]) -> None:
        super().__init__(inner)
        self.requests = requests

    @override
    async def _start(
        self, argv: list[str], *, env: dict[str, str], cwd: str, user: str | None
    ) -> Process:
        if " serve " in " ".join(argv):
            script = textwrap.dedent(f"""
                import json, sys
                V = {wire.VERSION}
                def out(kind, data, seq=0):
                    line = {{"sandbay": V, "seq": seq, "kind": kind, "data": data}}
                    sys.stdout.write(json.dumps(line) + "\\n")
                    sys.stdout.flush()
                sys.stdin.readline()
                out("ready", {{}})
                requests = {self.requests!r}
                for request in requests:
                    out("request", request)
                finals = 0
                while finals < len(requests):
                    frame = json.loads(sys.stdin.readline())
                    if frame["kind"] != "reply":
                        continue
                    out("stderr", {{"line": json.dumps(frame, sort_keys=True)}})
                    finals += frame["final"]
                out("end", {{"exit_code": 0}}, seq=1)
            """)
            argv = [self.inner.python, "-c", script]
        return await self.inner.start(argv, env=env, cwd=cwd, user=user)


async def test_requests_are_answered_by_handlers_on_the_host() -> None:
    async def echo(payload: dict[str, Any], part: Any) -> dict[str, Any]:
        await part({"chunk": 1})
        await part({"chunk": 2})
        return {"echo": payload}

    async def refuse(payload: dict[str, Any], part: Any) -> dict[str, Any]:
        raise RequestError("Unauthorized", "no")

    async def broken(payload: dict[str, Any], part: Any) -> dict[str, Any]:
        raise KeyError("a bug")

    requests = [
        {"id": 1, "method": "test.echo", "payload": {"a": [1]}},
        {"id": 2, "method": "test.nothing", "payload": {}},
        {"id": 3, "method": "test.refuse", "payload": {}},
        {"id": 4, "method": "test.broken", "payload": {}},
    ]
    replies: list[dict[str, Any]] = []
    async with sandbay.open_sandbox(sandbay.LocalConfig(isolate=False)) as inner:
        options = ClaudeAgentOptions(
            env={"ANTHROPIC_API_KEY": "k"}, stderr=lambda line: replies.append(json.loads(line))
        )
        transport = sandbay.SandboxTransport(_RequestingRelay(inner, requests), options)
        transport.handle_requests("test.echo", echo)
        transport.handle_requests("test.refuse", refuse)
        transport.handle_requests("test.broken", broken)
        await transport.connect()
        try:
            with anyio.fail_after(30):
                assert [m async for m in transport.read_messages()] == []
        finally:
            await transport.close()
    by_id: dict[int, list[dict[str, Any]]] = {}
    for reply in replies:
        assert reply["sandbay"] == wire.VERSION and reply["kind"] == "reply"
        by_id.setdefault(reply["id"], []).append(reply)
    assert [(r["final"], r.get("data")) for r in by_id[1]] == [
        (False, {"chunk": 1}),
        (False, {"chunk": 2}),
        (True, {"echo": {"a": [1]}}),
    ]
    assert by_id[2] == [
        {
            "sandbay": wire.VERSION,
            "kind": "reply",
            "id": 2,
            "final": True,
            "error": {
                "type": "UnknownMethod",
                "message": "no handler for 'test.nothing' on the host",
            },
        }
    ]
    assert by_id[3][0]["error"] == {"type": "Unauthorized", "message": "no"}
    assert by_id[4][0]["error"]["type"] == "InternalError"
    assert "a bug" not in json.dumps(by_id[4])  # the host's internals stay on the host


def test_a_handler_for_a_method_that_is_no_method_name_is_refused() -> None:
    transport = sandbay.SandboxTransport.__new__(sandbay.SandboxTransport)
    transport._handlers = {}

    async def handler(payload: dict[str, Any], part: Any) -> dict[str, Any]:
        return {}

    with pytest.raises(sandbay.ConfigError, match="not a request method"):
        transport.handle_requests("Model HTTP", handler)


async def test_run_agent_surfaces_the_relays_timings() -> None:
    async with ScriptedModel(["hi"]) as model:
        provider = sandbay.LocalConfig(isolate=False)
        async with sandbay.run_agent("go", provider=provider, env=model.env(), timeout=60) as run:
            messages = [m async for m in run]
    assert messages
    timings = run.sandbox_timings
    assert set(timings) == set(wire.TIMING_NAMES)
    assert timings["relay_start_ms"] <= timings["cli_spawned_ms"] <= timings["cli_first_line_ms"]
    # The relay's process began before its code was loaded; the prompt went in before the
    # first message came out.
    assert timings["relay_boot_ms"] <= timings["relay_start_ms"]
    assert timings["prompt_in_ms"] <= timings["first_message_ms"]
