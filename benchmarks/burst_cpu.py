"""Bursts against their CPU-time floor, and where the CPU of a run goes.

    python benchmarks/burst_cpu.py --providers docker,local --sizes 8,16 --rounds 3

Each round, per provider (order rotating): one cold run alone, then a burst of K cold runs
started at once for each K. A run is what `sandbay bench` times: create → the scripted
model's answer → sandbox removed. For each, the CPU seconds spent on this machine are read
from the kernel, by where they went:

=========== ==============================================================================
host        this process (sandbay, the Agent SDK, the scripted model) and its reaped
            children (the local provider's sandboxes), from ``getrusage``
containers  every docker container's processes (cgroup v1 ``cpuacct`` of ``/docker``)
daemons     ``dockerd`` and ``containerd`` (``/proc/<pid>/stat``)
other       the rest of the machine's busy time (``/proc/stat``): containerd shims,
            ``runc``, the kernel, and whatever else ran
=========== ==============================================================================

The floor of a burst of K on C cores is K × (one run's CPU seconds, the median of the solo
runs in this invocation) / C: no scheduler can finish K runs sooner than the machine can do
their work. The report gives each burst's p95 run time (each run from its own start to its
sandbox removed) and its wall time (first start → last removal) over that floor, and the
share of the machine left idle during the burst (time waiting on something other than CPU).
Run it on an otherwise idle machine: "other" includes every other process. Writes
``OUT.json`` and ``OUT.md`` (default benchmarks/results/burst-cpu).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from claude_agent_sdk import ClaudeAgentOptions, ResultMessage

import sandbay
from sandbay import SandboxSpec
from sandbay.testing import ScriptedModel

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")
CPUACCT_DOCKER = Path("/sys/fs/cgroup/cpuacct/docker/cpuacct.usage")
DAEMONS = ("dockerd", "containerd")
PROMPT = "Say hello."


def _machine() -> tuple[float, float]:
    """Busy and idle CPU seconds of the whole machine since boot (all cores)."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / TICK, (idle + iowait) / TICK


def _host() -> float:
    self_, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return self_.ru_utime + self_.ru_stime + children.ru_utime + children.ru_stime


def _containers() -> float | None:
    try:
        return int(CPUACCT_DOCKER.read_text()) / 1e9
    except (OSError, ValueError):
        return None


def _daemons() -> float:
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
                stat = fh.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name in DAEMONS:
            rest = stat[stat.rindex(")") + 2 :].split()
            total += int(rest[11]) + int(rest[12])  # utime, stime
    return total / TICK


@dataclass
class Snapshot:
    at: float = field(default_factory=time.perf_counter)
    machine: tuple[float, float] = field(default_factory=_machine)
    host: float = field(default_factory=_host)
    containers: float | None = field(default_factory=_containers)
    daemons: float = field(default_factory=_daemons)

    def since(self, before: Snapshot) -> dict[str, float]:
        busy = self.machine[0] - before.machine[0]
        idle = self.machine[1] - before.machine[1]
        parts = {
            "host": self.host - before.host,
            "containers": (self.containers or 0.0) - (before.containers or 0.0),
            "daemons": self.daemons - before.daemons,
        }
        parts["other"] = busy - sum(parts.values())
        return {"wall": self.at - before.at, "busy": busy, "idle": idle, **parts}


async def _one(provider: str, env: dict[str, str], options: ClaudeAgentOptions) -> float:
    started = time.perf_counter()
    async with sandbay.open_sandbox(provider, SandboxSpec(network="host")) as sandbox:
        run = sandbay.run_agent(PROMPT, sandbox=sandbox, options=options, env=env, timeout=300)
        async with run:
            async for message in run:
                if isinstance(message, ResultMessage) and message.is_error:
                    raise RuntimeError(f"run failed: {message.result}")
    return time.perf_counter() - started


async def _burst(
    provider: str, k: int, env: dict[str, str], options: ClaudeAgentOptions
) -> tuple[list[float], int]:
    times: list[float] = []
    failures = 0

    async def one() -> None:
        nonlocal failures
        try:
            times.append(await _one(provider, env, options))
        except Exception as exc:  # counted and shown, never dropped silently
            failures += 1
            print(f"{provider}: run failed: {type(exc).__name__}: {exc}"[:300], file=sys.stderr)

    async with anyio.create_task_group() as tg:
        for _ in range(k):
            tg.start_soon(one)
    return times, failures


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, -(-95 * len(ordered) // 100) - 1)]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default="docker,local")
    parser.add_argument("--sizes", default="8,16", help="burst sizes K")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "burst-cpu"))
    args = parser.parse_args()
    providers = [p.strip() for p in args.providers.split(",")]
    sizes = [int(k) for k in args.sizes.split(",")]
    cores = os.cpu_count() or 1
    turns = (args.rounds + 1) * len(providers) * (1 + sum(sizes)) + 16
    options = ClaudeAgentOptions(max_turns=3, allowed_tools=["Bash"])
    solo: dict[str, list[dict[str, float]]] = {p: [] for p in providers}
    bursts: dict[str, dict[int, list[dict[str, Any]]]] = {
        p: {k: [] for k in sizes} for p in providers
    }
    with ScriptedModel([{"text": "hello"}] * turns) as model:
        env = model.env()
        for provider in providers:  # warm-up, not counted: images, caches, the host's imports
            await _one(provider, env, options)
        for round_no in range(args.rounds):
            shift = round_no % len(providers)
            for provider in providers[shift:] + providers[:shift]:
                before = Snapshot()
                await _one(provider, env, options)
                solo[provider].append(Snapshot().since(before))
                for k in sizes:
                    before = Snapshot()
                    times, failures = await _burst(provider, k, env, options)
                    usage = Snapshot().since(before)
                    bursts[provider][k].append({**usage, "runs": times, "failures": failures})
                    print(
                        f"round {round_no + 1}/{args.rounds} {provider} burst {k}: "
                        f"wall {usage['wall']:.2f} s, busy {usage['busy']:.2f} CPU-s",
                        file=sys.stderr,
                    )
    report = _report(solo, bursts, cores, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(report))
    print(_markdown(report))


def _report(
    solo: dict[str, list[dict[str, float]]],
    bursts: dict[str, dict[int, list[dict[str, Any]]]],
    cores: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    providers: dict[str, Any] = {}
    for provider, runs in solo.items():
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        entry: dict[str, Any] = {"solo": med, "solo_samples": runs, "bursts": {}}
        for k, rounds in bursts[provider].items():
            times = [t for r in rounds for t in r["runs"]]
            floor = k * med["busy"] / cores
            wall = statistics.median(r["wall"] for r in rounds)
            busy = statistics.median(r["busy"] for r in rounds)
            parts = {
                key: statistics.median(r[key] for r in rounds) / k
                for key in ("host", "containers", "daemons", "other")
            }
            entry["bursts"][k] = {
                "runs": len(times),
                "failures": sum(r["failures"] for r in rounds),
                "run_p50": statistics.median(times) if times else None,
                "run_p95": _p95(times) if times else None,
                "wall": wall,
                "floor": floor,
                "p95_over_floor": _p95(times) / floor if times else None,
                "wall_over_floor": wall / floor,
                "cpu_per_run": busy / k,
                "cpu_per_run_parts": parts,
                "idle_share": statistics.median(
                    r["idle"] / (r["idle"] + r["busy"]) for r in rounds
                ),
                "samples": rounds,
            }
        providers[provider] = entry
    return {
        "command": shlex.join(["python", "benchmarks/burst_cpu.py", *sys.argv[1:]]),
        "machine": {
            "cores": cores,
            "platform": f"{platform.system()} {platform.machine()}",
            "python": platform.python_version(),
            "cgroup_cpuacct_docker": CPUACCT_DOCKER.exists(),
        },
        "rounds": args.rounds,
        "providers": providers,
    }


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "## Bursts against their CPU-time floor",
        "",
        f"Produced by `{report['command']}`; {report['machine']['cores']} cores, "
        f"{report['machine']['platform']}, Python {report['machine']['python']}. "
        f"{report['rounds']} rounds, providers interleaved; seconds.",
        "",
        "One run alone (median): CPU seconds by where they went.",
        "",
        "| provider | wall | CPU | host | containers | daemons | other |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in report["providers"].items():
        s = entry["solo"]
        lines.append(
            f"| {name} | {s['wall']:.2f} | {s['busy']:.2f} | {s['host']:.2f} | "
            f"{s['containers']:.2f} | {s['daemons']:.2f} | {s['other']:.2f} |"
        )
    lines += [
        "",
        "Bursts: floor = K × one run's CPU / cores. CPU per run by where it went, in the burst.",
        "",
        "| provider | K | runs | failed | run p50 | run p95 | wall | floor | p95 / floor "
        "| wall / floor | idle | CPU/run | host | containers | daemons | other |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in report["providers"].items():
        for k, b in entry["bursts"].items():
            parts = b["cpu_per_run_parts"]
            p50 = f"{b['run_p50']:.2f}" if b["run_p50"] is not None else "–"
            p95 = f"{b['run_p95']:.2f}" if b["run_p95"] is not None else "–"
            ratio = f"{b['p95_over_floor']:.2f}×" if b["p95_over_floor"] is not None else "–"
            lines.append(
                f"| {name} | {k} | {b['runs']} | {b['failures']} | {p50} | {p95} | "
                f"{b['wall']:.2f} | {b['floor']:.2f} | {ratio} | {b['wall_over_floor']:.2f}× | "
                f"{b['idle_share']:.0%} | {b['cpu_per_run']:.2f} | {parts['host']:.2f} | "
                f"{parts['containers']:.2f} | {parts['daemons']:.2f} | {parts['other']:.2f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    anyio.run(main)
