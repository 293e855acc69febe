"""The local provider leaves nothing behind: every descendant of a command dies with it.

Each test starts processes that leave their session or process group (``setsid``, ``nohup``,
a subshell's background job, a double fork), waits until they run (a line printed, the
processes seen in /proc), then checks that the exit path under test killed every one of them.
A process is found by a marker in its command line, so the same check works under
bubblewrap, whose processes have other pids inside their namespace.
"""

from __future__ import annotations

import secrets
import shlex
import shutil
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from claude_agent_sdk import ClaudeAgentOptions, ResultMessage

import sandbay
from sandbay import LocalConfig, Sandbox
from sandbay.testing import ScriptedModel, Turn

pytestmark = pytest.mark.anyio

PLAIN = LocalConfig(isolate=False)
ISOLATED = LocalConfig(isolate=True)
needs_bwrap = [
    pytest.mark.bwrap,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed"),
]
BOTH = [
    pytest.param(PLAIN, id="plain"),
    pytest.param(ISOLATED, id="isolated", marks=needs_bwrap),
]
PYTHON = sys.executable
# Each escapes its parent's session or process group in its own way.
WAYS = 4


def _marker() -> str:
    """Seconds for `sleep` that no other process on the machine uses."""
    return f"{300 + secrets.randbelow(10_000)}.{secrets.randbelow(10**6):06d}"


def _daemons(sb: Sandbox | None, marker: str) -> str:
    """Shell that starts WAYS processes running `sleep marker`, each escaping differently."""
    quiet = ">/dev/null 2>&1 </dev/null"
    double_fork = (
        "import os, sys; os.fork() and os._exit(0); os.setsid(); os.fork() and os._exit(0); "
        "os.execvp('sleep', ['sleep', sys.argv[1]])"
    )
    return "\n".join(
        [
            f"setsid sleep {marker} {quiet} &",
            f"(sleep {marker} {quiet} &)",
            f"nohup sleep {marker} {quiet} &",
            f"{shlex.quote(sb.python if sb else PYTHON)} -c {shlex.quote(double_fork)} "
            f"{marker} {quiet}\n",
        ]
    )


def _running(marker: str) -> list[int]:
    """Host pids of live processes whose arguments are marker (``sleep marker``) or end in
    the one-line Python program marker (``python3 -c marker``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")[1:-1]
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if args in ([marker.encode()], [b"-c", marker.encode()]) and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


async def _started(marker: str, count: int, within: float = 20.0) -> list[int]:
    """Wait until count processes with marker run; return their pids."""
    deadline = time.monotonic() + within
    pids = _running(marker)
    while len(pids) < count and time.monotonic() < deadline:
        await anyio.sleep(0.02)
        pids = _running(marker)
    assert len(pids) == count, f"expected {count} processes to start, found {pids}"
    return pids


async def _all_gone(marker: str, within: float = 5.0) -> list[int]:
    """Wait until no process with marker runs; return the survivors (empty when none)."""
    deadline = time.monotonic() + within
    left = _running(marker)
    while left and time.monotonic() < deadline:
        await anyio.sleep(0.05)
        left = _running(marker)
    return left


async def _first_line(proc: sandbay.Process) -> bytes:
    with anyio.fail_after(20):
        async for line in proc.stdout.lines():
            return line
    return b""


@pytest.mark.parametrize("config", BOTH)
async def test_kill_takes_every_descendant(config: LocalConfig) -> None:
    marker = _marker()
    async with sandbay.open_sandbox(config) as sb:
        proc = await sb.start(f"{_daemons(sb, marker)}echo started; exec sleep 300")
        assert await _first_line(proc) == b"started"
        await _started(marker, WAYS)
        await proc.kill()
        assert await proc.wait() == -9
        assert await _all_gone(marker) == [], "kill left descendants running"


@pytest.mark.parametrize("config", BOTH)
async def test_exec_timeout_takes_every_descendant(config: LocalConfig) -> None:
    marker = _marker()
    seen: list[int] = []

    async def watch() -> None:
        seen.extend(await _started(marker, WAYS))

    async with sandbay.open_sandbox(config) as sb, anyio.create_task_group() as tg:
        tg.start_soon(watch)
        with pytest.raises(sandbay.SandboxTimeoutError):
            await sb.exec(f"{_daemons(sb, marker)}exec sleep 300", timeout=6)
        assert len(seen) == WAYS, "the processes had not started before the timeout"
        assert await _all_gone(marker) == [], "the exec timeout left descendants running"


@pytest.mark.parametrize("config", BOTH)
async def test_close_takes_every_descendant(config: LocalConfig) -> None:
    marker, finished_marker = _marker(), _marker()
    async with sandbay.open_sandbox(config) as sb:
        proc = await sb.start(f"{_daemons(sb, marker)}echo started; exec sleep 300")
        assert await _first_line(proc) == b"started"
        await _started(marker, WAYS)
        # A command that has finished leaves its daemons behind too (unisolated they live on
        # until the sandbox closes, as in a container; under bubblewrap they end with it).
        result = await sb.exec(f"{_daemons(sb, finished_marker)}echo done")
        assert result.text == "done\n"
    assert await _all_gone(marker) == [], "closing the sandbox left descendants running"
    assert await _all_gone(finished_marker) == [], "a finished command's daemons survived"


async def test_finished_command_keeps_its_exit_code_and_its_daemons_until_close() -> None:
    marker = _marker()
    async with sandbay.open_sandbox(PLAIN) as sb:
        result = await sb.exec(f"{_daemons(sb, marker)}echo out; echo err >&2; exit 3")
        assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
        await _started(marker, WAYS)  # the command's exit does not end them
        # Commands started since did not disturb them, nor were they blocked by them.
        assert (await sb.exec(["sh", "-c", "kill -TERM $$"])).exit_code == -15
        assert len(_running(marker)) == WAYS
    assert await _all_gone(marker) == []


@pytest.mark.parametrize("config", BOTH)
async def test_gc_from_another_process_takes_every_descendant(config: LocalConfig) -> None:
    marker = _marker()
    command = f"{_daemons(None, marker)}echo started; exec sleep 300"
    script = textwrap.dedent(
        f"""
        import os, anyio, sandbay
        async def main():
            config = sandbay.LocalConfig(isolate={config.isolate})
            sb = await sandbay.create_sandbox(config, sandbay.SandboxSpec(lifetime_s=1))
            proc = await sb.start({command!r})
            async for line in proc.stdout.lines():
                break
            print(sb.id, flush=True)
            os._exit(0)  # a crash: nothing is closed
        anyio.run(main)
        """
    )
    with anyio.fail_after(60):
        out = (await anyio.run_process([sys.executable, "-c", script])).stdout
    sandbox_id = out.decode().strip()
    if not config.isolate:
        await _started(marker, WAYS)  # they outlive their owner (bwrap dies with its parent)
    provider = sandbay.get_provider(config)
    (info,) = [info for info in await provider.list() if info.id == sandbox_id]
    assert info.expiry is not None
    await anyio.sleep(max(0.0, info.expiry - time.time()) + 0.1)  # the crashed owner's lease
    removed = {info.id: why for info, why in await provider.gc()}
    # None: another process's gc on this machine was quicker.
    assert removed.get(sandbox_id) in ("expired", None)
    assert await _all_gone(marker) == [], "gc left the crashed owner's descendants running"


# --- agent runs ------------------------------------------------------------------------


def _agent_configs() -> list[Any]:
    plain = LocalConfig(isolate=False)
    return [
        pytest.param(plain, id="plain"),
        pytest.param(ISOLATED, id="isolated", marks=needs_bwrap),
    ]


# allowed_tools lets the agent run Bash unasked; bypassPermissions is refused unisolated, and
# the CLI itself refuses it as root where no boundary sets IS_SANDBOX.
OPTIONS = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"])


def _agent_daemon(program: str) -> str:
    return f"setsid python3 -c '{program}' & echo started"


def _sleep_program() -> str:
    return f"import time; time.sleep({_marker()})"


@pytest.mark.parametrize("config", _agent_configs())
async def test_agent_run_end_takes_what_its_tools_started(config: LocalConfig) -> None:
    marker = _sleep_program()
    script = [Turn.tool_use("Bash", {"command": _agent_daemon(marker)}), Turn.text("done")]
    async with ScriptedModel(script) as model:
        run = sandbay.run_agent("go", provider=config, options=OPTIONS, env=model.env())
        async with run:
            messages = [message async for message in run]
        assert "started" in str(model.tool_results())
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error
    assert await _all_gone(marker) == [], "the agent's background process outlived the run"


@pytest.mark.parametrize("config", _agent_configs())
async def test_agent_run_timeout_takes_what_its_tools_started(config: LocalConfig) -> None:
    marker = _sleep_program()
    script = [
        Turn.tool_use("Bash", {"command": _agent_daemon(marker)}),
        Turn.text("never in time", delay_s=60),
    ]
    seen: list[int] = []

    async def watch() -> None:
        seen.extend(await _started(marker, 1, within=30))

    async with ScriptedModel(script) as model, anyio.create_task_group() as tg:
        tg.start_soon(watch)
        run = sandbay.run_agent("go", provider=config, options=OPTIONS, env=model.env(), timeout=10)
        with pytest.raises(sandbay.SandboxTimeoutError):
            async with run:
                async for _ in run:
                    pass
    assert "started" in str(model.tool_results())
    assert seen, "the agent's background process never ran"
    assert await _all_gone(marker) == [], "the agent's background process outlived the timeout"


@pytest.mark.parametrize("config", BOTH)
async def test_ctrl_c_takes_every_descendant(config: LocalConfig) -> None:
    marker = _marker()
    command = f"{_daemons(None, marker)}echo started; exec sleep 300"
    script = textwrap.dedent(
        f"""
        import anyio, sandbay
        async def main():
            config = sandbay.LocalConfig(isolate={config.isolate})
            async with sandbay.open_sandbox(config) as sb:
                proc = await sb.start({command!r})
                async for line in proc.stdout.lines():
                    break
                print("ready", flush=True)
                await anyio.sleep(120)
        anyio.run(main)
        """
    )
    async with await anyio.open_process([sys.executable, "-c", script]) as owner:
        assert owner.stdout is not None
        with anyio.fail_after(30):
            ready = await owner.stdout.receive()
        assert ready.strip() == b"ready"
        await _started(marker, WAYS)
        owner.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal sends
        with anyio.fail_after(30):
            await owner.wait()
    assert await _all_gone(marker) == [], "Ctrl-C left descendants running"
