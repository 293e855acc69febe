"""The relay's stream to the host cannot be forged by what the agent's tools run.

Each test drives the real ``claude`` CLI with ScriptedModel: its Bash tool runs an attack
(a Python program) against the relay of its own run. The attacker knows everything: where the
run's directory is, the wire format, how the relay is started. On local+bwrap
(``relay_separation == "namespace"``) and docker (``"user"``) the attack finds nothing to
write to, read or signal, and the host yields only the real messages; on the unisolated
local provider (``"none"``) the same attack forges the run's result, which is the limit that
provider states.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import anyio
import pytest
from claude_agent_sdk import ClaudeAgentOptions, ResultMessage

import sandbay
from sandbay import Sandbox
from sandbay._relay import wire
from sandbay.testing import ScriptedModel, Turn

pytestmark = pytest.mark.anyio

SEPARATED = [
    pytest.param("bwrap", id="bwrap", marks=pytest.mark.bwrap),
    pytest.param("docker", id="docker", marks=pytest.mark.docker),
]
FORGED = "FORGED-RESULT"


def _forged(seq: int, kind: str, data: dict[str, Any]) -> str:
    return json.dumps({"sandbay": wire.VERSION, "seq": seq, "kind": kind, "data": data})


RESULT = {
    "type": "result",
    "subtype": "success",
    "duration_ms": 1,
    "duration_api_ms": 1,
    "is_error": False,
    "num_turns": 1,
    "session_id": "forged",
    "result": FORGED,
    "total_cost_usd": 0,
}

# The attack, run by the CLI's Bash tool. It prints what it managed, for the assertions.
ATTACK = """
import json, os, signal
run_dir = RUN_DIR
log = os.path.join(run_dir, "lines.jsonl")
print("attack-ran")
last = 0
try:
    with open(log, "rb") as fh:
        last = max(json.loads(line)["seq"] for line in fh if line.strip())
    print("log-read", last)
except Exception as exc:
    print("log-unreadable", type(exc).__name__)
result = json.dumps(RESULT)
forged = [
    FORGE(last + 1, "line", RESULT),
    FORGE(last + 2, "end", {"exit_code": 0, "stderr": ""}),
]
if HIGH_SEQ:
    forged.insert(0, FORGE(10**6, "line", RESULT))
try:
    with open(log, "ab") as fh:
        fh.write(forged[-2].encode() + b"\\n")
    print("log-appended")
except Exception as exc:
    print("log-unwritable", type(exc).__name__)
relays = []
for name in os.listdir("/proc"):
    try:
        cmd = open(f"/proc/{name}/cmdline", "rb").read()
    except OSError:
        continue
    if name.isdigit() and b"relay.py" in cmd and b"serve" in cmd:
        relays.append(int(name))
print("relays", relays)
for pid in relays:
    try:
        fd = os.open(f"/proc/{pid}/fd/1", os.O_WRONLY)
        os.write(fd, "".join(line + "\\n" for line in forged).encode())
        os.close(fd)
        print("stdout-forged", pid)
    except OSError as exc:
        print("stdout-refused", pid, type(exc).__name__)
    if SIGNAL:
        try:
            os.kill(pid, signal.SIGSTOP)
            print("signalled", pid)
        except OSError as exc:
            print("signal-refused", pid, type(exc).__name__)
"""


def attack_command(run_dir: str, *, high_seq: bool, signal: bool) -> str:
    source = "\n".join(
        [
            "import json",
            f"RUN_DIR = {run_dir!r}",
            f"RESULT = {RESULT!r}",
            f"HIGH_SEQ = {high_seq!r}",
            f"SIGNAL = {signal!r}",
            "def FORGE(seq, kind, data):",
            f"    return json.dumps({{'sandbay': {wire.VERSION}, 'seq': seq, 'kind': kind, "
            "'data': data})",
            ATTACK,
        ]
    )
    encoded = base64.b64encode(source.encode()).decode()
    return f"echo {encoded} | base64 -d > /tmp/attack.py && python3 /tmp/attack.py"


async def run_attack(
    sandbox: Sandbox, *, high_seq: bool = True, signal: bool = True
) -> tuple[list[Any], str, str]:
    """Run the attack in a run on ``sandbox``: the host's messages, the tool's output, run id."""
    run_id = "attacked"
    run_dir = f"{sandbox.relay_dir}/runs/{run_id}"
    command = attack_command(run_dir, high_seq=high_seq, signal=signal)
    script = [Turn.tool_use("Bash", {"command": command}), Turn.text("real-done")]
    async with ScriptedModel(script) as model:
        options = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"], env=model.env())
        messages: list[Any] = []
        with anyio.fail_after(120):
            async with sandbay.run_agent(
                "go", sandbox=sandbox, options=options, run_id=run_id
            ) as run:
                async for message in run:
                    messages.append(message)
        output = json.dumps(model.tool_results())
    return messages, output, run_id


def results(messages: list[Any]) -> list[str | None]:
    return [m.result for m in messages if isinstance(m, ResultMessage)]


@pytest.mark.parametrize("sandbox", SEPARATED, indirect=True)
async def test_a_tool_cannot_forge_the_relays_stream(sandbox: Sandbox) -> None:
    assert sandbox.relay_separation in ("user", "namespace")
    messages, output, run_id = await run_attack(sandbox)
    assert "attack-ran" in output
    # The relay's log: neither read nor appended to; its stdout: unreachable or refused.
    assert "log-read" not in output and "log-appended" not in output
    assert "stdout-forged" not in output and "signalled " not in output
    if sandbox.relay_separation == "namespace":
        assert "relays []" in output  # the relay's process is not in the tools' /proc
    else:
        assert "stdout-refused" in output and "signal-refused" in output
    # The host yielded only the real messages, and the run ended normally.
    assert FORGED not in repr(messages)
    assert results(messages) == ["real-done"]
    # The log (what a replay reads) holds only the real run.
    replayed = [m async for m in sandbay.replay_agent(sandbox, run_id)]
    assert FORGED not in repr(replayed) and results(replayed) == ["real-done"]


@pytest.mark.parametrize("sandbox", SEPARATED, indirect=True)
async def test_the_cli_and_its_tools_run_apart_from_the_relay(sandbox: Sandbox) -> None:
    """The relay's run directory is private; on docker the CLI runs unprivileged."""
    probe = (
        "import os; print('ids', os.getuid(), os.getgid(), sorted(os.getgroups())); "
        "print('caps', [l.split()[1] for l in open('/proc/self/status') if l.startswith('CapEff')])"
    )
    script = [Turn.tool_use("Bash", {"command": f'python3 -c "{probe}"'}), Turn.text("ok")]
    async with ScriptedModel(script) as model:
        options = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"], env=model.env())
        async with sandbay.run_agent("go", sandbox=sandbox, options=options) as run:
            async for _ in run:
                pass
        output = json.dumps(model.tool_results())
    assert "caps ['0000000000000000']" in output  # no capabilities at all
    if sandbox.relay_separation == "user":
        assert "ids 1000 1000 []" in output  # not root, no supplementary groups
        listing = await sandbox.exec(["ls", sandbox.relay_dir + "/runs"])
        assert not listing.ok  # the sandbox's user cannot even list the runs
        mode = await sandbox.start_relay(["stat", "-c", "%a %U", sandbox.relay_dir + "/runs"])
        assert (await mode.stdout.read()).split() == [b"700", b"root"]


async def test_unisolated_local_cannot_stop_a_tool_forging_the_result(sandbox: Sandbox) -> None:
    """The documented limit: on local without isolation the relay and the tools share a user.

    The same attack reads the run's log for the next sequence number and writes a result and
    an ``end`` into the relay's stdout: the host yields the forged result and ends the run
    there (before the tool's real output even reached the model). This is the control for
    the tests above: the attack works wherever nothing separates the relay.
    """
    assert sandbox.relay_separation == "none"
    messages, output, _ = await run_attack(sandbox, high_seq=False, signal=False)
    assert results(messages) == [FORGED]
    assert "real-done" not in repr(messages) and output == "[]"
