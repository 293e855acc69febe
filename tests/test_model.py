"""`sandbay.testing.ScriptedModel`: the wire format, the script, side requests, the lifecycle,
and whole agent turns of the real ``claude`` CLI against it."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
import pytest
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    ResultMessage,
    TextBlock,
    ToolUseBlock,
    query,
)

import sandbay.testing
from sandbay import ConfigError
from sandbay.testing import RecordedRequest, ScriptedModel, Turn, default_script, is_side_request

# What an agent turn of CLI 2.1.329 looks like, trimmed to the keys that matter.
AGENT_TURN: dict[str, Any] = {
    "model": "claude-opus-5-5",
    "max_tokens": 128000,
    "stream": True,
    "system": [{"type": "text", "text": "You are a Claude agent."}],
    "messages": [{"role": "user", "content": [{"type": "text", "text": "run it"}]}],
    "tools": [{"name": "Bash", "input_schema": {"type": "object"}}],
    "thinking": {"type": "adaptive"},
}
# The CLI's session-title request (sent alongside the first turn).
TITLE_REQUEST: dict[str, Any] = {
    "model": "claude-opus-5-5",
    "max_tokens": 128000,
    "stream": True,
    "system": [{"type": "text", "text": "You are naming a coding session..."}],
    "messages": [{"role": "user", "content": [{"type": "text", "text": "<session>x</session>"}]}],
    "tools": [],
    "output_config": {
        "effort": "medium",
        "format": {
            "type": "json_schema",
            "schema": {
                "type": "object",
                "properties": {"title": {"type": "string"}},
                "required": ["title"],
                "additionalProperties": False,
            },
        },
    },
}


def post(
    model: ScriptedModel, path: str, body: Any, *, method: str = "POST"
) -> tuple[int, str, bytes]:
    """Send one request; return status, content type and body."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        model.url + path,
        data=data if method == "POST" else None,
        method=method,
        headers={"content-type": "application/json", "anthropic-version": "2023-06-01"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers["content-type"], response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["content-type"], exc.read()


def message(server: ScriptedModel, /, **overrides: Any) -> dict[str, Any]:
    """A non-streamed agent turn's answer; ``overrides`` replace keys of `AGENT_TURN`."""
    status, _, data = post(server, "/v1/messages", {**AGENT_TURN, "stream": False, **overrides})
    assert status == 200
    result: dict[str, Any] = json.loads(data)
    return result


def sse_events(data: bytes) -> list[dict[str, Any]]:
    """Parse a server-sent event stream, checking each event's name matches its type."""
    events = []
    for chunk in data.decode().split("\n\n"):
        if not chunk.strip():
            continue
        fields = dict(line.split(": ", 1) for line in chunk.splitlines())
        event = json.loads(fields["data"])
        assert fields["event"] == event["type"]
        events.append(event)
    return events


def assemble(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Rebuild the message from its stream, as a client does."""
    msg = dict(events[0]["message"])
    blocks: dict[int, dict[str, Any]] = {}
    partial: dict[int, str] = {}
    for event in events[1:]:
        if event["type"] == "content_block_start":
            blocks[event["index"]] = dict(event["content_block"])
        elif event["type"] == "content_block_delta":
            delta = event["delta"]
            if delta["type"] == "text_delta":
                blocks[event["index"]]["text"] += delta["text"]
            else:
                assert delta["type"] == "input_json_delta"
                partial[event["index"]] = partial.get(event["index"], "") + delta["partial_json"]
        elif event["type"] == "content_block_stop" and event["index"] in partial:
            blocks[event["index"]]["input"] = json.loads(partial[event["index"]])
        elif event["type"] == "message_delta":
            msg["stop_reason"] = event["delta"]["stop_reason"]
            msg["usage"] = {**msg["usage"], **event["usage"]}
    msg["content"] = [blocks[i] for i in sorted(blocks)]
    return msg


def model_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("sandbay-scripted-model")]


def test_public_names_are_exported_and_sorted() -> None:
    assert sandbay.testing.__all__ == sorted(sandbay.testing.__all__)
    for name in sandbay.testing.__all__:
        assert getattr(sandbay.testing, name) is not None


# -- the wire format -----------------------------------------------------------------------


def test_non_streaming_text_turn() -> None:
    with ScriptedModel(["hello there"]) as model:
        msg = message(model, model="claude-test-1")
    assert msg["type"] == "message"
    assert msg["role"] == "assistant"
    assert msg["id"].startswith("msg_")
    assert msg["model"] == "claude-test-1"
    assert msg["content"] == [{"type": "text", "text": "hello there"}]
    assert msg["stop_reason"] == "end_turn"
    assert msg["usage"]["input_tokens"] > 0 and msg["usage"]["output_tokens"] > 0


def test_streamed_tool_use_reassembles_to_the_scripted_input() -> None:
    command = "echo sandbay-$((6*7)) && printf '%s\\n' \"quotes, unicode: é ☃\""
    with ScriptedModel([Turn.tool_use("Bash", {"command": command, "timeout": 5000})]) as model:
        status, content_type, data = post(model, "/v1/messages", AGENT_TURN)
    assert status == 200
    assert content_type.startswith("text/event-stream")
    events = sse_events(data)
    types = [e["type"] for e in events]
    assert types[:2] == ["message_start", "ping"]
    assert types[-2:] == ["message_delta", "message_stop"]
    assert types.count("content_block_start") == types.count("content_block_stop") == 1
    # The input arrives in several pieces, as from the real API, and must be joined.
    assert types.count("content_block_delta") > 1
    start = next(e for e in events if e["type"] == "content_block_start")["content_block"]
    assert start["type"] == "tool_use" and start["name"] == "Bash" and start["input"] == {}
    assert start["id"].startswith("toolu_")
    msg = assemble(events)
    assert msg["content"][0]["input"] == {"command": command, "timeout": 5000}
    assert msg["stop_reason"] == "tool_use"
    assert events[0]["message"]["stop_reason"] is None


def test_streamed_multi_block_turn() -> None:
    turn = {
        "content": [
            "Let me look.",
            {"tool_use": {"name": "Read", "input": {"file_path": "/etc/hostname"}, "id": "t1"}},
            {"type": "tool_use", "name": "Bash", "input": {"command": "true"}},
        ]
    }
    with ScriptedModel([turn]) as model:
        _, _, data = post(model, "/v1/messages", AGENT_TURN)
    msg = assemble(sse_events(data))
    assert [b["type"] for b in msg["content"]] == ["text", "tool_use", "tool_use"]
    assert msg["content"][0]["text"] == "Let me look."
    assert msg["content"][1] == {
        "type": "tool_use",
        "id": "t1",
        "name": "Read",
        "input": {"file_path": "/etc/hostname"},
    }
    assert msg["content"][2]["id"] not in ("t1", "")
    assert msg["stop_reason"] == "tool_use"


def test_tool_use_ids_are_unique_when_a_turn_repeats() -> None:
    turn = Turn.tool_use("Bash", {"command": "true"})
    with ScriptedModel([turn, turn]) as model:
        ids = {message(model)["content"][0]["id"] for _ in range(2)}
    assert len(ids) == 2


def test_count_tokens_does_not_consume_the_script() -> None:
    with ScriptedModel(["first"]) as model:
        status, _, data = post(model, "/v1/messages/count_tokens", AGENT_TURN)
        assert message(model)["content"][0]["text"] == "first"
    assert status == 200
    tokens = json.loads(data)
    assert set(tokens) == {"input_tokens"}
    assert isinstance(tokens["input_tokens"], int) and tokens["input_tokens"] > 0
    assert [r.kind for r in model.requests] == ["count_tokens", "turn"]


def test_other_paths_get_a_json_404_and_bad_bodies_a_400() -> None:
    with ScriptedModel(["unused"]) as model:
        status, content_type, data = post(model, "/v1/models", None, method="GET")
        assert status == 404 and content_type == "application/json"
        error = json.loads(data)
        assert error["type"] == "error" and error["error"]["type"] == "not_found_error"
        status, _, _ = post(model, "/api/hello", None, method="HEAD")
        assert status == 404
        status, _, data = post(model, "/v1/messages", b"{not json")
        assert status == 400
        assert json.loads(data)["error"]["type"] == "invalid_request_error"
        assert model.turns_served == 0
    assert [(r.method, r.kind) for r in model.requests] == [
        ("GET", "other"),
        ("HEAD", "other"),
        ("POST", "other"),
    ]
    assert model.requests[2].body == "{not json"


# -- the script ----------------------------------------------------------------------------


def test_exhausted_script_answers_with_a_fixed_text_and_counts() -> None:
    with ScriptedModel(["only"]) as model:
        texts = [message(model)["content"][0]["text"] for _ in range(3)]
        assert model.turns_served == 1
        assert model.exhausted == 2
    assert texts == ["only", ScriptedModel.EXHAUSTED_TEXT, ScriptedModel.EXHAUSTED_TEXT]
    assert [r.turn for r in model.turn_requests] == [0, None, None]


def test_script_forms_parse_to_turns() -> None:
    assert Turn.parse("hi") == Turn.text("hi")
    assert Turn.parse({"text": "hi", "delay_s": 2}) == Turn.text("hi", delay_s=2.0)
    assert Turn.parse({"tool_use": {"name": "Bash", "input": {"command": "ls"}}}) == (
        Turn.tool_use("Bash", {"command": "ls"})
    )
    both = Turn.parse({"content": ["a", {"tool_use": {"name": "Read"}}]})
    assert both.content == (
        {"type": "text", "text": "a"},
        {"type": "tool_use", "name": "Read", "input": {}},
    )
    assert both.stop_reason == "tool_use"
    assert Turn.text("x").stop_reason == "end_turn"


@pytest.mark.parametrize(
    "bad",
    [
        {"txt": "typo"},
        {"content": []},
        {"content": "not a list"},
        {"tool_use": {"name": "Bash", "inputs": {}}},
        {"tool_use": {"input": {}}},
        {"type": "image", "source": {}},
        {"text": "x", "delay_s": -1},
        {"text": "x", "delay_s": "soon"},
        42,
    ],
)
def test_bad_script_entries_raise_config_error(bad: Any) -> None:
    with pytest.raises(ConfigError):
        ScriptedModel([bad])


def test_a_bare_string_is_not_a_script() -> None:
    with pytest.raises(ConfigError, match="list of turns"):
        ScriptedModel("hello")


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "script.json"
    path.write_text(
        json.dumps([{"tool_use": {"name": "Bash", "input": {"command": "ls"}}}, "done"])
    )
    model = ScriptedModel.from_file(path, latency_s=0.0)
    assert model.script == (Turn.tool_use("Bash", {"command": "ls"}), Turn.text("done"))

    path.write_text('{"not": "a list"}')
    with pytest.raises(ConfigError, match="list of turns"):
        ScriptedModel.from_file(path)
    path.write_text("[")
    with pytest.raises(ConfigError, match="cannot read"):
        ScriptedModel.from_file(path)
    with pytest.raises(ConfigError, match="cannot read"):
        ScriptedModel.from_file(tmp_path / "missing.json")
    path.write_text('[{"bogus": 1}]')
    with pytest.raises(ConfigError, match=r"script\.json"):
        ScriptedModel.from_file(path)


def test_default_script_is_a_bash_call_then_a_summary() -> None:
    script = default_script()
    assert script == default_script()
    assert len(script) == 2
    (call,) = script[0].content
    assert call["type"] == "tool_use" and call["name"] == "Bash"
    assert "hello from" in call["input"]["command"]
    assert script[0].stop_reason == "tool_use"
    assert script[1].stop_reason == "end_turn"


# -- side requests -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "side"),
    [
        (AGENT_TURN, False),
        # An agent without tools still sends "tools": [], and older models send no thinking.
        ({**AGENT_TURN, "tools": [], "thinking": None, "model": "claude-3-5-haiku"}, False),
        ({**AGENT_TURN, "thinking": {"type": "disabled"}, "max_tokens": 32000}, False),
        (TITLE_REQUEST, True),
        ({**AGENT_TURN, "max_tokens": 1}, True),
        ({k: v for k, v in AGENT_TURN.items() if k != "tools"}, True),
        ({**AGENT_TURN, "tools": None}, True),
    ],
)
def test_is_side_request(body: Mapping[str, Any], side: bool) -> None:
    assert is_side_request(body) is side


def test_side_requests_do_not_consume_turns() -> None:
    with ScriptedModel(["first", "second"]) as model:
        _, _, data = post(model, "/v1/messages", TITLE_REQUEST)
        title = assemble(sse_events(data))
        probe = message(model, max_tokens=1)
        no_tools = message(model, tools=None)
        first = message(model)
    # A structured-output side request gets JSON its schema accepts.
    assert json.loads(title["content"][0]["text"]) == {"title": "Scripted"}
    assert probe["content"] == [{"type": "text", "text": ScriptedModel.SIDE_TEXT}]
    assert no_tools["content"] == probe["content"]
    assert first["content"][0]["text"] == "first"
    assert model.turns_served == 1
    assert len(model.side_requests) == 3
    assert [r.turn for r in model.turn_requests] == [0]


def test_side_request_predicate_can_be_replaced() -> None:
    with ScriptedModel(["first"], side_request=lambda body: False) as model:
        msg = message(model, tools=None)
    assert msg["content"][0]["text"] == "first"


# -- recording -----------------------------------------------------------------------------


def test_requests_are_recorded_with_headers_and_body() -> None:
    conversation = [
        {"role": "user", "content": [{"type": "text", "text": "go"}]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Bash"}]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}],
        },
    ]
    with ScriptedModel(["a", "b"]) as model:
        message(model)
        message(model, messages=conversation)
        message(model, messages=[*conversation, {"role": "user", "content": "more"}])
    first = model.requests[0]
    assert isinstance(first, RecordedRequest)
    assert (first.method, first.path, first.kind, first.turn) == ("POST", "/v1/messages", "turn", 0)
    assert first.headers["anthropic-version"] == "2023-06-01"
    assert first.body["model"] == AGENT_TURN["model"]
    assert first.messages == AGENT_TURN["messages"]
    # Each request repeats the conversation; each tool_result is reported once.
    assert model.tool_results() == [conversation[2]["content"][0]]


# -- timing and lifecycle ------------------------------------------------------------------


def test_delays_apply_to_turns_not_side_requests() -> None:
    with ScriptedModel([{"text": "slow", "delay_s": 0.3}, "fast"], latency_s=0.1) as model:
        started = time.monotonic()
        message(model, max_tokens=1)
        side = time.monotonic() - started
        started = time.monotonic()
        message(model)
        slow = time.monotonic() - started
        started = time.monotonic()
        message(model)
        fast = time.monotonic() - started
    assert side < 0.1
    assert slow >= 0.4
    assert 0.1 <= fast < 0.4


def test_stop_interrupts_a_delayed_turn_and_leaves_no_threads() -> None:
    model = ScriptedModel([Turn.text("never", delay_s=60)]).start()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            message(model)
        except Exception as exc:  # the server hangs up: that is the point
            errors.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 10
    while not model.turn_requests and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    model.stop()
    assert time.monotonic() - started < 2
    caller.join(10)
    assert not caller.is_alive()
    assert len(errors) == 1
    assert model_threads() == []


def test_lifecycle_with_an_idle_keep_alive_connection() -> None:
    model = ScriptedModel(["x"])
    with pytest.raises(RuntimeError, match="not started"):
        model.url  # noqa: B018
    model.start()
    assert model.url == f"http://127.0.0.1:{model.port}"
    with pytest.raises(RuntimeError):
        model.start()
    # A keep-alive connection parks a server thread on a read; stop() must still finish.
    conn = http.client.HTTPConnection("127.0.0.1", model.port, timeout=10)
    try:
        conn.request("POST", "/v1/messages/count_tokens", body=json.dumps(AGENT_TURN))
        response = conn.getresponse()
        assert response.status == 200
        response.read()
        assert model_threads()
        started = time.monotonic()
        model.stop()
        assert time.monotonic() - started < 2
    finally:
        conn.close()
    assert model_threads() == []
    model.stop()  # idempotent
    with pytest.raises(RuntimeError):
        model.start()


def test_env_points_at_the_model() -> None:
    with ScriptedModel() as model:
        env = model.env()
        assert env["ANTHROPIC_BASE_URL"] == model.url
        assert env["ANTHROPIC_API_KEY"]
        assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
        other = model.env(base_url="http://host.docker.internal:1234")
        assert other["ANTHROPIC_BASE_URL"] == "http://host.docker.internal:1234"


@pytest.mark.anyio
async def test_async_context_manager() -> None:
    async with ScriptedModel(["async hello"]) as model:
        msg = await anyio.to_thread.run_sync(message, model)
        assert msg["content"][0]["text"] == "async hello"
    assert model_threads() == []


def test_serve_prints_env_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps(["served"]))
    code = "import sys; from sandbay.testing import serve; serve(sys.argv[1])"
    with subprocess.Popen(
        [sys.executable, "-u", "-c", code, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        lines: list[str] = []
        while not lines or not lines[-1].startswith("Press Ctrl-C"):
            line = proc.stdout.readline()
            assert line, f"serve exited early: {lines}"
            lines.append(line.strip())
        exports = dict(
            line.removeprefix("export ").split("=", 1)
            for line in lines
            if line.startswith("export ")
        )
        url = exports["ANTHROPIC_BASE_URL"]
        assert url.startswith("http://127.0.0.1:")
        assert exports["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
        with urllib.request.urlopen(
            urllib.request.Request(
                url + "/v1/messages",
                data=json.dumps({**AGENT_TURN, "stream": False}).encode(),
                method="POST",
            ),
            timeout=10,
        ) as response:
            assert json.loads(response.read())["content"][0]["text"] == "served"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert "1 scripted turns served" in out


# -- the real claude CLI -------------------------------------------------------------------


def agent_options(model: ScriptedModel, tmp_path: Path, **overrides: Any) -> ClaudeAgentOptions:
    env = {
        **model.env(),
        # The CLI refuses bypassPermissions as root unless it is told it is sandboxed.
        "IS_SANDBOX": "1",
        # Keep the CLI's session files out of the real home directory.
        "CLAUDE_CONFIG_DIR": str(tmp_path / "claude-config"),
    }
    env.update(overrides.pop("env", {}))
    workdir = tmp_path / "work"
    workdir.mkdir(exist_ok=True)
    options: dict[str, Any] = {
        "env": env,
        "permission_mode": "bypassPermissions",
        "allowed_tools": ["Bash"],
        "max_turns": 4,
        "cwd": workdir,
    }
    options.update(overrides)
    return ClaudeAgentOptions(**options)


@pytest.mark.anyio
async def test_claude_cli_runs_a_tool_turn_against_the_script(tmp_path: Path) -> None:
    script = [Turn.tool_use("Bash", {"command": "echo sandbay-$((6*7))"}), Turn.text("done")]
    async with ScriptedModel(script) as model:
        started = time.monotonic()
        messages = [m async for m in query(prompt="run it", options=agent_options(model, tmp_path))]
        elapsed = time.monotonic() - started

    tool_uses = [
        block
        for m in messages
        if isinstance(m, AssistantMessage)
        for block in m.content
        if isinstance(block, ToolUseBlock)
    ]
    assert [(b.name, b.input) for b in tool_uses] == [
        ("Bash", {"command": "echo sandbay-$((6*7))"})
    ]
    results = [m for m in messages if isinstance(m, ResultMessage)]
    assert len(results) == 1 and not results[0].is_error, results
    texts = [
        block.text
        for m in messages
        if isinstance(m, AssistantMessage)
        for block in m.content
        if isinstance(block, TextBlock)
    ]
    assert texts == ["done"]
    assert model.turns_served == 2 and model.exhausted == 0
    # The CLI really ran the command and sent its output back to the model.
    (result,) = model.tool_results()
    assert result["tool_use_id"] == tool_uses[0].id
    assert "sandbay-42" in json.dumps(result["content"])
    assert model_threads() == []
    assert elapsed < 60, f"one agent run took {elapsed:.1f}s"


@pytest.mark.anyio
async def test_claude_cli_runs_the_default_script(tmp_path: Path) -> None:
    script = default_script()
    async with ScriptedModel(script) as model:
        messages = [m async for m in query(prompt="hi", options=agent_options(model, tmp_path))]
    assert model.turns_served == 2 and model.exhausted == 0
    (result,) = model.tool_results()
    assert "hello from " in json.dumps(result["content"])
    assert not result.get("is_error")
    final = [m for m in messages if isinstance(m, AssistantMessage)][-1]
    assert final.content == [TextBlock(text=script[1].content[0]["text"])]


@pytest.mark.anyio
async def test_claude_cli_side_requests_leave_the_script_alone(tmp_path: Path) -> None:
    # With nonessential traffic allowed, the CLI names the session with a request sent
    # alongside the first turn; the replies must still follow the script.
    async with ScriptedModel(["one", "two", "three"]) as model:
        env = {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": ""}
        replies = []
        async with ClaudeSDKClient(agent_options(model, tmp_path, env=env)) as client:
            for prompt in ["first prompt", "second prompt", "third prompt"]:
                await client.query(prompt)
                async for m in client.receive_response():
                    if isinstance(m, AssistantMessage):
                        replies += [b.text for b in m.content if isinstance(b, TextBlock)]
    assert replies == ["one", "two", "three"]
    assert model.turns_served == 3 and model.exhausted == 0
    # CLI 2.1.329 sends one session-title request here; if that stops, revisit is_side_request.
    assert model.side_requests, [r.kind for r in model.requests]
    for side in model.side_requests:
        assert is_side_request(side.body)
        assert side.body["output_config"]["format"]["type"] == "json_schema"


def test_no_scripted_model_threads_left_over() -> None:
    # Run last in this module (pytest keeps file order): earlier tests leaked nothing.
    assert model_threads() == []
