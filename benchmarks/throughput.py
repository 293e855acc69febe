"""Throughput and host cost: stdout MB/s, host CPU per agent message, host RSS per run.

    python benchmarks/throughput.py --mb 200 --rounds 5 --messages 20 --live 4 --pool 2 \
        --out benchmarks/results/throughput

Three parts, each side by side in one run:

- **stream**: a process in the sandbox writes ``--mb`` MB of zeros to stdout (``head -c N
  /dev/zero``) and this process reads all of it. sandbay's docker provider against the
  docker SDK's ``exec_run(stream=True)`` in the same container; sandbay's local provider
  against ``asyncio`` subprocesses: the same command under the same bubblewrap command line
  the sandbox uses (when it isolates), and plain, without isolation. Interleaved round by
  round with rotating order, the first round excluded. MB/s (10^6 bytes) from the first byte
  to the last (the stream's own rate) and from the start of the command to the last byte
  (its start included), this process's CPU seconds (``time.process_time``, every thread),
  plus, for local, the reaped children's CPU (``getrusage(RUSAGE_CHILDREN)``).
- **messages**: one scripted agent run of ``--messages`` tool turns (``Bash true``) per
  provider. The model is ``sandbay model serve`` in a process of its own, so this process's
  CPU is sandbay's and the Agent SDK's alone. Host CPU per agent message: this process's CPU
  from the first message to the result, over the messages in between. Against the run's
  total CPU: this process for the whole run (create to removed) plus the sandbox's own (the
  container's cgroup for docker, the reaped children for local); both one message's share
  and all messages' share of it. The Agent SDK's own local ``query()`` is measured the same
  way beside it.
- **memory**: ``--live`` runs at once, each held open by a slow scripted answer; this process's
  RSS growth per live run once every run has delivered its first message. A
  ``SandboxPool(size=--pool)``: RSS growth of this process per pooled sandbox once the pool is
  full, and the sandbox's own memory (the container's for docker, its processes' RSS for
  local).

Prints the tables and writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import docker
from claude_agent_sdk import ClaudeAgentOptions, ResultMessage

import sandbay
from sandbay import SandboxSpec
from sandbay.testing import Turn

MB = 1_000_000
SANDBAY_CLI = [sys.executable, "-m", "sandbay"]
OPTIONS = ClaudeAgentOptions(max_turns=1000, allowed_tools=["Bash"])


def _rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process, from /proc."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) * 1024 if match else 0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- stream ---------------------------------------------------------------------------------


#: A reader of one stream sample: calls its argument at the first byte, returns the bytes read.
Reader = Callable[[Callable[[], None]], Awaitable[int]]


async def _sandbay_stream(sandbox: sandbay.Sandbox, size: int, first: Callable[[], None]) -> int:
    proc = await sandbox.start(["head", "-c", str(size), "/dev/zero"])
    total = 0
    async for chunk in proc.stdout:
        if not total:
            first()
        total += len(chunk)
    await proc.wait()
    return total


def _docker_sdk_stream(container: Any, size: int, first: Callable[[], None]) -> int:
    result = container.exec_run(["head", "-c", str(size), "/dev/zero"], stream=True)
    total = 0
    for chunk in result.output:
        if not total:
            first()
        total += len(chunk)
    return total


async def _asyncio_stream(argv: list[str], folder: str, first: Callable[[], None]) -> int:
    proc = await asyncio.create_subprocess_exec(*argv, cwd=folder, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    total = 0
    while chunk := await proc.stdout.read(1 << 16):
        if not total:
            first()
        total += len(chunk)
    await proc.wait()
    return total


async def _timed(read: Reader, size: int) -> dict[str, float]:
    children = _children_cpu()
    cpu = time.process_time()
    started = time.perf_counter()
    first: list[float] = []
    total = await read(lambda: first.append(time.perf_counter()))
    ended = time.perf_counter()
    cpu = time.process_time() - cpu
    if total != size or not first:
        raise RuntimeError(f"read {total} bytes, expected {size}")
    return {
        "stream_mb_s": total / MB / (ended - first[0]),
        "mb_s": total / MB / (ended - started),
        "first_byte_ms": (first[0] - started) * 1000,
        "wall_s": ended - started,
        "cpu_s": cpu,
        "children_cpu_s": _children_cpu() - children,
    }


#: Each sandbay row and the raw rows it is compared with, the first the goal's baseline.
STREAM_ROWS = {
    "sandbay docker": ["docker SDK exec_run(stream=True)"],
    "sandbay local": ["asyncio subprocess, same bubblewrap", "asyncio subprocess, no sandbox"],
}


def _bwrap_command(sandbox: sandbay.Sandbox, argv: list[str]) -> tuple[list[str], str] | None:
    """The command line (and host directory) the local sandbox runs ``argv`` with, if it
    isolates: its own bubblewrap arguments, so the raw row pays for the same isolation."""
    from sandbay.providers.local import LocalSandbox

    if not isinstance(sandbox, LocalSandbox) or not sandbox.isolated:
        return None
    wrapper = sandbox._bwrap_args(sandbox.workdir)
    return [*wrapper, "--", "/bin/sh", "-c", 'exec "$@"', "sh", *argv], str(sandbox._folder)


async def stream(size: int, rounds: int) -> dict[str, list[dict[str, float]]]:
    client = docker.from_env()
    folder = tempfile.mkdtemp(prefix="sandbay-bench-")
    head = ["head", "-c", str(size), "/dev/zero"]
    samples: dict[str, list[dict[str, float]]] = {}
    try:
        async with (
            sandbay.open_sandbox("docker", SandboxSpec(network="none")) as dsb,
            sandbay.open_sandbox("local", SandboxSpec(network="none")) as lsb,
        ):
            container = client.containers.get(dsb.id)
            bwrap = _bwrap_command(lsb, head)

            def sdk(first: Callable[[], None]) -> Awaitable[int]:
                return anyio.to_thread.run_sync(_docker_sdk_stream, container, size, first)

            methods: list[tuple[str, Reader]] = [
                ("sandbay docker", lambda first: _sandbay_stream(dsb, size, first)),
                ("docker SDK exec_run(stream=True)", sdk),
                ("sandbay local", lambda first: _sandbay_stream(lsb, size, first)),
                ("asyncio subprocess, no sandbox", lambda f: _asyncio_stream(head, folder, f)),
            ]
            if bwrap is not None:
                argv, cwd = bwrap
                methods.append(
                    ("asyncio subprocess, same bubblewrap", lambda f: _asyncio_stream(argv, cwd, f))
                )
            samples = {name: [] for name, _ in methods}
            for index in range(rounds + 1):
                shift = index % len(methods)
                for name, read in methods[shift:] + methods[:shift]:
                    sample = await _timed(read, size)
                    if index:  # the first round warms up
                        samples[name].append(sample)
                print(f"stream round {index}/{rounds} done", file=sys.stderr, flush=True)
    finally:
        client.close()
        shutil.rmtree(folder, ignore_errors=True)
    return samples


# --- messages -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _model_process(script: list[Any]) -> AsyncIterator[dict[str, str]]:
    """``sandbay model serve`` in a process of its own; yields the agent env it prints.

    Its pid is in the env as ``BENCH_MODEL_PID`` (for leaving it out of the sandbox's CPU).
    """
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump([_turn_json(turn) for turn in script], file)
    proc = await anyio.open_process([*SANDBAY_CLI, "model", "serve", "--script", file.name])
    try:
        assert proc.stdout is not None
        out = b""
        with anyio.fail_after(120):
            while b"Ctrl-C" not in out:
                out += await proc.stdout.receive()
        env = dict(re.findall(r"export (\w+)=(\S+)", out.decode()))
        if "ANTHROPIC_BASE_URL" not in env:
            raise RuntimeError(f"sandbay model serve did not start: {out!r}")
        env = {key: value.strip("'") for key, value in env.items()}
        yield {**env, "BENCH_MODEL_PID": str(proc.pid)}
    finally:
        proc.terminate()
        with anyio.CancelScope(shield=True):
            await proc.wait()
            await proc.aclose()
        os.unlink(file.name)


def _turn_json(turn: Turn) -> dict[str, Any]:
    return {"content": [dict(block) for block in turn.content], "delay_s": turn.delay_s}


def _script(turns: int) -> list[Any]:
    tool = Turn.tool_use("Bash", {"command": "true"})
    return [*([tool] * turns), Turn.text("done")]


def _descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _descendants_cpu(exclude: int) -> float:
    """CPU seconds of this process's descendants (and their reaped children), but one."""
    ticks = 0
    for pid in _descendants(os.getpid()) - {exclude}:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


async def _sandbox_cpu(sandbox: sandbay.Sandbox, provider: str, model_pid: int) -> float:
    """The sandbox's CPU seconds so far: its processes' (local), its cgroup's (docker)."""
    if provider != "docker":
        return _descendants_cpu(exclude=model_pid)
    command = (
        "cat /sys/fs/cgroup/cpuacct/cpuacct.usage 2>/dev/null || "
        "sed -n 's/^usage_usec //p' /sys/fs/cgroup/cpu.stat"
    )
    result = await sandbox.exec(["sh", "-c", command], user="root")
    v1 = await sandbox.exec(["test", "-e", "/sys/fs/cgroup/cpuacct/cpuacct.usage"])
    return int(result.stdout.split()[0]) / (1e9 if v1.ok else 1e6)  # v1: ns, v2: µs


async def messages(provider: str, turns: int) -> dict[str, float]:
    spec = SandboxSpec(network="host")
    async with _model_process(_script(turns)) as env:
        model_pid = int(env.pop("BENCH_MODEL_PID"))
        cpu_start = time.process_time()
        first_cpu = last_cpu = 0.0
        count = 0
        async with sandbay.open_sandbox(provider, spec) as sandbox:
            sandbox_cpu = await _sandbox_cpu(sandbox, provider, model_pid)
            run = sandbay.run_agent("go", sandbox=sandbox, options=OPTIONS, env=env, timeout=600)
            async with run:
                async for message in run:
                    now = time.process_time()
                    if count == 0:
                        first_cpu = now
                    count += 1
                    last_cpu = now
                    if isinstance(message, ResultMessage):
                        if message.is_error:
                            raise RuntimeError(f"the run failed: {message.result}")
                        # The CLI is still alive here: its CPU (and its tools') is readable.
                        sandbox_cpu = await _sandbox_cpu(sandbox, provider, model_pid) - sandbox_cpu
        host_cpu = time.process_time() - cpu_start
        children_cpu = 0.0
    per_message = (last_cpu - first_cpu) / (count - 1)
    total = host_cpu + children_cpu + sandbox_cpu
    return {
        "messages": count,
        "host_us_per_message": per_message * 1e6,
        "host_cpu_s": host_cpu,
        "sandbox_cpu_s": children_cpu + sandbox_cpu,
        "run_cpu_s": total,
        "per_message_share_of_run": per_message * count / total,
    }


async def sdk_query_messages(turns: int) -> dict[str, float]:
    """The Agent SDK's own local ``query()``, the CLI a child of this process."""
    from claude_agent_sdk import query

    async with _model_process(_script(turns)) as env:
        env.pop("BENCH_MODEL_PID")
        children = _children_cpu()
        cpu_start = time.process_time()
        first_cpu = last_cpu = 0.0
        count = 0
        folder = tempfile.mkdtemp(prefix="sandbay-bench-")
        try:
            options = ClaudeAgentOptions(
                max_turns=1000, allowed_tools=["Bash"], env=env, cwd=folder
            )
            async for _ in query(prompt="go", options=options):
                now = time.process_time()
                if count == 0:
                    first_cpu = now
                count += 1
                last_cpu = now
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        host_cpu = time.process_time() - cpu_start
        children_cpu = _children_cpu() - children
    per_message = (last_cpu - first_cpu) / (count - 1)
    total = host_cpu + children_cpu
    return {
        "messages": count,
        "host_us_per_message": per_message * 1e6,
        "host_cpu_s": host_cpu,
        "sandbox_cpu_s": children_cpu,
        "run_cpu_s": total,
        "per_message_share_of_run": per_message * count / total,
    }


# --- memory ---------------------------------------------------------------------------------


async def live_runs(provider: str, count: int) -> dict[str, float]:
    spec = SandboxSpec(network="host")
    script = [Turn.text("held", delay_s=30.0) for _ in range(count)]
    async with _model_process(script) as env:
        env.pop("BENCH_MODEL_PID")
        # One run first, so that what every run loads once (the SDK, the image) is not counted.
        async with sandbay.run_agent("go", provider=provider, spec=spec, env=env) as run:
            async for _ in run:
                break
        before = _rss_bytes()
        started = 0
        all_started = anyio.Event()
        done = anyio.Event()
        peak = 0

        async def one() -> None:
            nonlocal started
            async with sandbay.run_agent("go", provider=provider, spec=spec, env=env) as run:
                async for _ in run:
                    started += 1
                    if started == count:
                        all_started.set()
                    await done.wait()
                    break

        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(one)
            with anyio.fail_after(300):
                await all_started.wait()
            peak = _rss_bytes()
            done.set()
    return {
        "runs": count,
        "rss_before_mib": before / 2**20,
        "per_run_mib": (peak - before) / count / 2**20,
    }


async def pooled(provider: str, size: int) -> dict[str, float]:
    mark = uuid.uuid4().hex  # finds this pool's containers, and no one else's
    spec = SandboxSpec(network="host", labels={"sandbay-bench": mark})
    async with _model_process([Turn.text("unused")]) as env:
        model_pid = int(env.pop("BENCH_MODEL_PID"))
        before = _rss_bytes()
        async with sandbay.SandboxPool(provider, spec, size=size, env=env, options=OPTIONS) as pool:
            await pool.wait_ready(size, timeout=300)
            await anyio.sleep(1.0)  # let the pre-started CLIs settle before reading memory
            host = _rss_bytes() - before
            if provider == "docker":
                client = docker.from_env()
                try:
                    sandbox_bytes = 0
                    for container in client.containers.list(
                        filters={"label": f"sandbay-bench={mark}"}
                    ):
                        stats = await anyio.to_thread.run_sync(
                            lambda c=container: c.stats(stream=False)
                        )
                        sandbox_bytes += stats["memory_stats"].get("usage", 0)
                    per_sandbox = sandbox_bytes / size
                finally:
                    client.close()
            else:
                pids = _descendants(os.getpid()) - {model_pid}
                per_sandbox = sum(_rss_bytes(pid) for pid in pids) / size
    return {
        "size": size,
        "host_per_sandbox_mib": host / size / 2**20,
        "sandbox_per_sandbox_mib": per_sandbox / 2**20,
    }


# --- report ---------------------------------------------------------------------------------


def _median(samples: list[dict[str, float]], key: str) -> float:
    return statistics.median(s[key] for s in samples)


def report(args: argparse.Namespace, data: dict[str, Any]) -> str:
    lines: list[str] = []
    if "stream" in data:
        s = data["stream"]
        lines += [
            f"### stdout throughput: {args.mb} MB, {args.rounds} rounds (median)",
            "",
            "| | MB/s, first byte to last | ratio | MB/s, start to last byte | ratio "
            "| first byte ms | host CPU s | ratio | children CPU s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for ours, raws in STREAM_ROWS.items():
            raws = [raw for raw in raws if raw in s]
            for name in [*raws, ours]:
                row = [f"| {name}"]
                for key, digits in (("stream_mb_s", 0), ("mb_s", 0)):
                    value = _median(s[name], key)
                    row += [f"{value:.{digits}f}", f"{value / _median(s[raws[0]], key):.2f}×"]
                cpu = _median(s[name], "cpu_s")
                row += [
                    f"{_median(s[name], 'first_byte_ms'):.1f}",
                    f"{cpu:.2f}",
                    f"{cpu / _median(s[raws[0]], 'cpu_s'):.2f}×",
                    f"{_median(s[name], 'children_cpu_s'):.2f} |",
                ]
                lines.append(" | ".join(row))
        lines += [
            "",
            "Ratios are to the first row of each group: "
            + ", ".join(raws[0] for raws in STREAM_ROWS.values())
            + ".",
            "",
        ]
    if "messages" in data:
        lines += [
            f"### host CPU per agent message: {args.messages} tool turns per run",
            "",
            "| | messages | host µs per message | host CPU s, whole run | sandbox CPU s "
            "| run's CPU s | one message, share of the run | all messages, share of the run |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, m in data["messages"].items():
            one = m["host_us_per_message"] / 1e6 / m["run_cpu_s"]
            lines.append(
                f"| {name} | {m['messages']} | {m['host_us_per_message']:.0f} | "
                f"{m['host_cpu_s']:.2f} | {m['sandbox_cpu_s']:.2f} | {m['run_cpu_s']:.2f} | "
                f"{one * 100:.3f} % | {m['per_message_share_of_run'] * 100:.2f} % |"
            )
        lines.append("")
    if "memory" in data:
        lines += [
            "### host memory",
            "",
            "| | live runs: host RSS per run, MiB | pool: host RSS per sandbox, MiB "
            "| pool: the sandbox's own memory, MiB |",
            "|---|---:|---:|---:|",
        ]
        for name, m in data["memory"].items():
            lines.append(
                f"| {name} ({m['live']['runs']} live, pool of {m['pool']['size']}) | "
                f"{m['live']['per_run_mib']:.2f} | {m['pool']['host_per_sandbox_mib']:.2f} | "
                f"{m['pool']['sandbox_per_sandbox_mib']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--parts", default="stream,messages,memory")
    parser.add_argument("--providers", default="docker,local")
    parser.add_argument("--mb", type=int, default=200, help="MB of stdout per stream sample")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--messages", type=int, default=20, help="tool turns per agent run")
    parser.add_argument("--live", type=int, default=4, help="runs live at once")
    parser.add_argument("--pool", type=int, default=2, help="pool size")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    providers = args.providers.split(",")
    data: dict[str, Any] = {}
    if "stream" in parts:
        data["stream"] = await stream(args.mb * MB, args.rounds)
    if "messages" in parts:
        data["messages"] = {f"sandbay {p}": await messages(p, args.messages) for p in providers}
        data["messages"]["Agent SDK query(), local, no sandbox"] = await sdk_query_messages(
            args.messages
        )
    if "memory" in parts:
        data["memory"] = {
            p: {"live": await live_runs(p, args.live), "pool": await pooled(p, args.pool)}
            for p in providers
        }
    table = report(args, data)
    print(table)
    if args.out is not None:
        command = (
            f"python benchmarks/throughput.py --parts {args.parts} --providers {args.providers} "
            f"--mb {args.mb} --rounds {args.rounds} --messages {args.messages} "
            f"--live {args.live} --pool {args.pool} --out {args.out}"
        )
        meta = {
            "command": command,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "when": time.strftime("%Y-%m-%d"),
        }
        args.out.with_suffix(".json").write_text(json.dumps({**meta, **data}, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(
            f"# Throughput and host cost\n\n`{command}`\n\n{table}"
        )


if __name__ == "__main__":
    anyio.run(main)
