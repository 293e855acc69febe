"""What a sandbox writes back cannot exhaust or crash the host.

Code in the sandbox may be hostile (a poisoned repository, a prompt injection). It can write
to the relay's stdout, flood its stderr log, or replace the relay outright.
Each test here has a real process in a real local sandbox do that, and checks the host stops
it with a typed error, holding bounded memory.
"""

from __future__ import annotations

import json
import shlex
import time
import tracemalloc
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from claude_agent_sdk import ClaudeAgentOptions
from typing_extensions import override

import sandbay
import sandbay._transport
from sandbay import Process, Sandbox
from sandbay._relay import wire
from sandbay._transport import _BOOT
from sandbay.testing import ScriptedModel, Turn
from wrapping import WrappedSandbox

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024
CAP = 1 * MiB
FLOOD = 64 * MiB
KEY = {"ANTHROPIC_API_KEY": "unused"}


class HostileRelay(WrappedSandbox):
    """A real sandbox in which the uploaded relay is replaced by ``script``."""

    provider = "hostile"

    def __init__(self, inner: Sandbox, script: str) -> None:
        super().__init__(inner)
        self.script = script

    @override
    async def start_relay(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None
    ) -> Process:
        # The relay is installed and started by one command on the relay's side,
        # ``sh -c '... PYTHON FLAGS -c BOOT RELAY_DIR serve ...'``: the script takes the place
        # of ``-c BOOT RELAY_DIR`` (the rest, its run directory and stderr log, stays).
        boot = f"-c {shlex.quote(_BOOT)} "
        command = str(argv[2]) if len(argv) == 3 else ""
        if list(argv[:2]) == ["sh", "-c"] and boot in command and " serve " in command:
            head, _, rest = command.partition(boot)
            relay_dir, _, rest = rest.partition(" ")
            path = f"{shlex.split(relay_dir)[0]}/hostile.py"
            data = self.script.encode()
            # Written on the relay's side, where the relay's code would be.
            install = f'mkdir -p "${{1%/*}}" && head -c {len(data)} >"$1"'
            writer = await self.inner.start_relay(["sh", "-c", install, "sh", path], env=env)
            await writer.write(data)
            await writer.close_stdin()
            assert await writer.wait() == 0
            command = f"{head}{shlex.quote(path)} {rest}"
            return await self.inner.start_relay(["sh", "-c", command], env=env)
        return await self.inner.start_relay(argv, env=env)


def printing(*lines: bytes | str, then: str = "time.sleep(60)") -> str:
    """A fake relay: reads its start line, says ready, answers the SDK's ``initialize``
    (so the host is past its handshake), prints ``lines``, then runs ``then``."""
    raw = [line.encode() if isinstance(line, str) else line for line in lines]
    return (
        "import json, sys, time\n"
        "out = sys.stdout.buffer\n"
        "sys.stdin.readline()\n"
        f'out.write(b\'{{"sandbay": {wire.VERSION}, "seq": 0, "kind": "ready", '
        '"data": {}}\\n\')\n'
        "out.flush()\n"
        "request = json.loads(json.loads(sys.stdin.readline())['data'])\n"
        "reply = {'type': 'control_response', 'response': {'subtype': 'success', "
        "'request_id': request['request_id'], 'response': {}}}\n"
        f"envelope = {{'sandbay': {wire.VERSION}, 'seq': 1, 'kind': 'line', 'data': reply}}\n"
        "out.write(json.dumps(envelope).encode() + b'\\n')\n"
        "out.flush()\n"
        f"for line in {raw!r}:\n"
        "    out.write(line + b'\\n')\n"
        "    out.flush()\n"
        f"{then}\n"
    )


async def run_with(script: str) -> list[Any]:
    async with sandbay.open_sandbox("local") as inner:
        hostile = HostileRelay(inner, script)
        async with sandbay.run_agent("go", sandbox=hostile, env=KEY, timeout=20) as run:
            return [message async for message in run]


# -- line length and memory ----------------------------------------------------------------


async def test_byte_stream_lines_refuse_a_line_past_max_line() -> None:
    script = (
        f"import sys; sys.stdout.buffer.write(b'a\\nbb\\n' + b'x' * {FLOOD}); sys.stdout.flush()"
    )
    async with sandbay.open_sandbox("local") as sb:
        proc = await sb.start(["python3", "-c", script])
        got: list[bytes] = []
        with pytest.raises(sandbay.ProtocolError, match=f"max_line={CAP}"):
            async for line in proc.stdout.lines(max_line=CAP):
                got.append(line)
        assert got == [b"a", b"bb"]
        rest = 0
        async for chunk in proc.stdout:
            rest += len(chunk)
        assert FLOOD - rest <= CAP + 2 * 65536


async def test_byte_stream_lines_without_a_limit_still_frame_lines() -> None:
    async with sandbay.open_sandbox("local") as sb:
        proc = await sb.start(["printf", "one\\ntwo\\nlast"])
        assert [line async for line in proc.stdout.lines()] == [b"one", b"two", b"last"]
        with pytest.raises(sandbay.ConfigError, match="max_line"):
            async for _ in proc.stdout.lines(max_line=0):
                pass


async def test_a_tool_flooding_the_relays_stdout_stops_the_run_and_removes_the_sandbox(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sandbay._transport, "MAX_FRAME_BYTES", CAP)
    run_id = f"flood{time.time_ns()}"
    # Code the agent runs finds the relay (whose argv names the run) and writes a line
    # without end straight into its stdout, which the host reads. Only the unisolated local
    # provider lets a tool reach the relay (test_authentic_stream.py): the host's bound
    # is what stops it there.
    flood = (
        "import os\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        argv = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')\n"
        "    except OSError:\n"
        "        continue\n"
        f"    if b'serve' in argv and any(b'{run_id}' in a for a in argv):\n"
        f"        open(f'/proc/{{pid}}/fd/1', 'wb').write(b'x' * {FLOOD})\n"
    )
    command = f"python3 -c {shlex.quote(flood)}"
    script = [Turn.tool_use("Bash", {"command": command}), Turn.text("done")]
    options = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"])
    async with ScriptedModel(script) as model:
        run = sandbay.run_agent(
            "go",
            provider=sandbay.LocalConfig(isolate=False),
            options=options,
            env=model.env(),
            run_id=run_id,
            timeout=120,
        )
        started = time.monotonic()
        with pytest.raises(sandbay.ProtocolError, match=f"longer than max_line={CAP}"):
            async with run:
                async for _ in run:
                    pass
        assert time.monotonic() - started < 30
    assert run.sandbox is not None and run.sandbox.closed
    listed = await sandbay.get_provider(sandbay.LocalConfig(isolate=False)).list()
    assert run.sandbox.id not in {s.id for s in listed}


async def test_a_huge_stderr_log_is_tailed_in_bounded_memory() -> None:
    # The relay dies after writing 64 MiB to its stderr log: the AgentError carries the
    # last lines without the host holding the whole log.
    script = printing(
        then=(
            f"for _ in range({FLOOD // MiB}):\n"
            "    sys.stderr.write('noise ' * (1024 * 1024 // 6) + '\\n')\n"
            "sys.stderr.write('last words\\n')\n"
            "sys.stderr.flush()\n"
            "sys.exit(3)"
        )
    )
    tracemalloc.start()
    try:
        with pytest.raises(sandbay.AgentError) as info:
            await run_with(script)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.exit_code == 3
    assert info.value.stderr_tail.endswith("last words")
    assert peak < 8 * MiB, f"held {peak / MiB:.0f} MiB reading a {FLOOD // MiB} MiB log"


# -- malformed envelopes -------------------------------------------------------------------


def envelope(**fields: Any) -> str:
    return json.dumps({"sandbay": wire.VERSION, "seq": 2, "kind": "line", **fields})


NESTED = "[" * 200 + "]" * 200
DEEP_MESSAGE = (
    f'{{"sandbay": {wire.VERSION}, "seq": 2, "kind": "line", '
    '"data": {"type": "assistant", "message": '
    '{"model": "m", "content": [{"type": "tool_use", "id": "t", "name": "Bash", "input": '
    '{"x": ' + NESTED + "}}]}}}"
)

# Each line a hostile relay may send, and what the host must say of it.
HOSTILE_LINES = [
    pytest.param(envelope(seq="abc", data={}), "seq must be", id="seq-text"),
    pytest.param(
        f'{{"sandbay": {wire.VERSION}, "seq": 1e999, "kind": "line", "data": {{}}}}',
        "seq must be",
        id="seq-infinite",
    ),
    pytest.param(envelope(seq=[1], data={}), "seq must be", id="seq-list"),
    pytest.param(envelope(seq=-3, data={}), "seq must be", id="seq-negative"),
    pytest.param(envelope(seq=2**70, data={}), "seq must be", id="seq-huge"),
    pytest.param(envelope(seq=5, data={"type": "system"}), "lost some", id="seq-gap"),
    pytest.param(
        json.dumps({"sandbay": True, "seq": 2, "kind": "end", "data": {}}),
        "wire version True",
        id="version-bool",
    ),
    pytest.param(envelope(kind=7, data={}), "kind must be one of", id="kind-number"),
    pytest.param(envelope(data="text"), "data of a 'line'", id="data-text"),
    pytest.param(envelope(data=[]), "data of a 'line'", id="data-list"),
    pytest.param(envelope(data={"type": 5}), "text type", id="type-number"),
    pytest.param(envelope(data={"type": "assistant"}), "cannot parse", id="message-incomplete"),
    pytest.param(envelope(data={"type": "user", "message": "x"}), "cannot parse", id="message-odd"),
    pytest.param("[" * 100_000 + "]" * 100_000, "nests too deep", id="json-deep"),
    pytest.param(DEEP_MESSAGE, "deeper than 100", id="data-deep"),
    pytest.param(envelope(kind="end", data={"exit_code": "x"}), "exit_code", id="end-code-text"),
    pytest.param(envelope(kind="error", data={"exit_code": "x"}), "exit_code", id="exit-code-text"),
    pytest.param(b"\xff\xfe not utf-8", "not JSON", id="not-utf8"),
    # The relay's own kinds: timings and requests to the host.
    pytest.param(
        envelope(kind="timings", seq=0, data={"relay_start_ms": "x"}),
        "must be milliseconds",
        id="timings-text",
    ),
    pytest.param(
        envelope(kind="timings", seq=0, data={"relay_start_ms": -1}),
        "must be milliseconds",
        id="timings-negative",
    ),
    pytest.param(
        envelope(kind="timings", seq=0, data={"cpu": 1}), "unknown timings", id="timings-unknown"
    ),
    pytest.param(
        envelope(kind="timings", seq=3, data={}), "carries no sequence", id="timings-numbered"
    ),
    pytest.param(
        envelope(kind="request", seq=0, data={"id": 0, "method": "m", "payload": {}}),
        "id of 'request'",
        id="request-id-zero",
    ),
    pytest.param(
        envelope(kind="request", seq=0, data={"id": 2**40, "method": "m", "payload": {}}),
        "id of 'request'",
        id="request-id-huge",
    ),
    pytest.param(
        envelope(kind="request", seq=0, data={"id": True, "method": "m", "payload": {}}),
        "id of 'request'",
        id="request-id-bool",
    ),
    pytest.param(
        envelope(kind="request", seq=0, data={"id": 1, "method": "../x", "payload": {}}),
        "not a method name",
        id="request-method-path",
    ),
    pytest.param(
        envelope(kind="request", seq=0, data={"id": 1, "method": "m" * 200, "payload": {}}),
        "not a method name",
        id="request-method-long",
    ),
    pytest.param(
        envelope(kind="request", seq=0, data={"id": 1, "method": "m", "payload": []}),
        "payload of 'request'",
        id="request-payload-list",
    ),
    pytest.param(
        envelope(kind="request", seq=0, data={"id": 1, "method": "m"}),
        "exactly id, method and payload",
        id="request-no-payload",
    ),
    pytest.param(
        envelope(kind="request", seq=0, data={"id": 1, "method": "m", "payload": {}, "x": 1}),
        "exactly id, method and payload",
        id="request-extra",
    ),
    pytest.param(
        envelope(kind="request", seq=4, data={"id": 1, "method": "m", "payload": {}}),
        "carries no sequence",
        id="request-numbered",
    ),
]


@pytest.mark.parametrize(("line", "complaint"), HOSTILE_LINES)
async def test_a_malformed_envelope_is_a_protocol_error(line: str | bytes, complaint: str) -> None:
    started = time.monotonic()
    with pytest.raises(sandbay.ProtocolError, match=complaint) as info:
        await run_with(printing(line))
    assert info.value.provider == "hostile" and info.value.sandbox_id
    assert time.monotonic() - started < 15, "waited for the deadline instead"
