"""Writing to a run's CLI from a process other than the one that started it.

The relay takes inputs of other writers through the run's input socket (``relay.py
attach``); `RunInput` and `ResumedRun.write` use it. The writers here are separate OS
processes, as a restarted worker would be.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio
import pytest
from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient, ResultMessage

import sandbay
from sandbay import RunHandle, Sandbox
from sandbay._relay import wire
from sandbay._transport import RunInput
from sandbay.testing import ScriptedModel, Turn

pytestmark = pytest.mark.anyio

LOCAL = sandbay.LocalConfig(isolate=False)
#: A stand-in CLI: each stdin line back as a JSON message.
ECHO = (
    "#!/usr/bin/env python3\n"
    "import json, sys\n"
    "for line in sys.stdin:\n"
    "    print(json.dumps({'type': 'echo', 'text': line}), flush=True)\n"
)

# Writes the lines of argv[2:] to the run whose handle is argv[1], then leaves.
_WRITER = """
import anyio, sys
import sandbay

async def main():
    async with sandbay.resume_run(sys.argv[1]) as run:
        for line in sys.argv[2:]:
            await run.write(line + "\\n")

anyio.run(main)
"""


async def echo_transport(sb: Sandbox, **kwargs: Any) -> sandbay.SandboxTransport:
    await sb.write_file("echo-cli", ECHO.encode(), mode=0o755)
    options = ClaudeAgentOptions(
        cli_path=sb.resolve("echo-cli"), env={"ANTHROPIC_API_KEY": "unused"}
    )
    transport = sandbay.SandboxTransport(sb, options, **kwargs)
    await transport.connect()
    return transport


def handle_of(sb: Sandbox, transport: sandbay.SandboxTransport) -> str:
    return RunHandle(
        provider=LOCAL.public_data(),
        sandbox_id=sb.id,
        run_id=transport.run_id,
        last_seq=transport.last_seq,
        owns_sandbox=False,
    ).to_json()


async def write_from_another_process(handle: str, *lines: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBAY_")}
    done = await anyio.run_process(
        [sys.executable, "-c", _WRITER, handle, *lines], env=env, check=False
    )
    assert done.returncode == 0, done.stderr.decode()


async def test_another_process_writes_to_the_cli_in_order_once() -> None:
    async with sandbay.open_sandbox(LOCAL) as sb:
        transport = await echo_transport(sb)
        texts: list[str] = []
        try:
            with anyio.fail_after(60):
                await transport.write("host-1\n")
                await write_from_another_process(handle_of(sb, transport), "other-1", "other-2")
                await write_from_another_process(handle_of(sb, transport), "third-1")
                await transport.write("host-2\n")
                await transport.end_input()
                texts = [m["text"] async for m in transport.read_messages()]
        finally:
            await transport.close()
    assert texts == ["host-1\n", "other-1\n", "other-2\n", "third-1\n", "host-2\n"]
    assert transport.exit_code == 0


async def test_a_writer_that_reconnects_sends_only_what_the_relay_did_not_get() -> None:
    async with sandbay.open_sandbox(LOCAL) as sb:
        transport = await echo_transport(sb)
        try:
            with anyio.fail_after(60):
                writer = RunInput(sb, transport.run_id, writer="resender")
                await writer.write("r1\n")
                # The confirmation of r1 is lost with the connection: r1 is still pending.
                frame = wire.host_frame("input", n=1, data="r1\n", writer="resender")
                writer._pending = [(1, frame)]
                writer.input_seq = 0
                await writer.aclose()
                await writer.write("r2\n")
                assert writer.input_seq == 2
                # Another writer of the same name continues its numbering.
                again = RunInput(sb, transport.run_id, writer="resender")
                await again.write("r3\n")
                assert again.input_seq == 3
                await again.end_input()
                await writer.aclose()
                await again.aclose()
                texts = [m["text"] async for m in transport.read_messages()]
        finally:
            await transport.close()
    assert texts == ["r1\n", "r2\n", "r3\n"]


async def test_writing_to_a_run_that_ended_is_an_agent_error() -> None:
    async with sandbay.open_sandbox(LOCAL) as sb:
        transport = await echo_transport(sb)
        await transport.end_input()
        with anyio.fail_after(60):
            assert [m async for m in transport.read_messages()] == []
        await transport.close()
        writer = RunInput(sb, transport.run_id)
        with pytest.raises(sandbay.AgentError, match="not running"), anyio.fail_after(30):
            await writer.write("late\n")
        await writer.aclose()
        with pytest.raises(sandbay.ConfigError, match="writer"):
            RunInput(sb, transport.run_id, writer="host")


async def test_the_input_stays_open_for_another_writer_when_the_host_stream_breaks() -> None:
    async with sandbay.open_sandbox(LOCAL) as sb:
        transport = await echo_transport(sb, keep_input_s=30)
        proc = transport._proc
        assert proc is not None
        try:
            with anyio.fail_after(60):
                await transport.write("before\n")
                await proc.close_stdin()  # as if this process had died: no end_input
                await write_from_another_process(handle_of(sb, transport), "after")
                writer = RunInput(sb, transport.run_id)
                await writer.end_input()
                await writer.aclose()
                texts = [m["text"] async for m in transport.read_messages()]
        finally:
            await transport.close()
    assert texts == ["before\n", "after\n"]


# Resumes the session whose handle is argv[1], sends it a turn and reports the turn's reply.
_RESUMER = """
import anyio, json, sys
import sandbay
from claude_agent_sdk import AssistantMessage, ResultMessage

async def main():
    async with sandbay.resume_run(sys.argv[1]) as run:
        await run.query("second turn, from another process")
        texts = []
        async for message in run:
            if isinstance(message, AssistantMessage):
                texts.append(str(message.content))
            if isinstance(message, ResultMessage):
                break
    print(json.dumps(texts))

anyio.run(main)
"""


async def test_a_session_takes_its_next_turn_from_another_process() -> None:
    script = [Turn.text("first-answer"), Turn.text("second-answer")]
    async with ScriptedModel(script) as model, sandbay.open_sandbox(LOCAL) as sb:
        options = ClaudeAgentOptions(max_turns=2, env=model.env())
        transport = sandbay.SandboxTransport(sb, options)
        async with ClaudeSDKClient(options, transport=transport) as client:
            with anyio.fail_after(120):
                await client.query("first turn")
                first = [m async for m in client.receive_response()]
                assert isinstance(first[-1], ResultMessage)
                handle = handle_of(sb, transport)
                env = {k: v for k, v in os.environ.items() if not k.startswith("SANDBAY_")}
                done = await anyio.run_process(
                    [sys.executable, "-c", _RESUMER, handle], env=env, check=False
                )
                assert done.returncode == 0, done.stderr.decode()
                # This process's client sees the turn the other one asked for, too.
                second = [m async for m in client.receive_response()]
        assert isinstance(second[-1], ResultMessage)
        prompts = [str(r.messages[-1]) for r in model.turn_requests]
    assert "second-answer" in json.loads(done.stdout)[0]
    assert len(prompts) == 2 and "from another process" in prompts[1]
