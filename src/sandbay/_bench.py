"""Cold-start benchmarks: what a user waits for before an agent says anything, per provider.

Each run times phases with a monotonic clock (`time.perf_counter`):

========== =================================================================================
provision  create requested → the provider accepted it and returned a sandbox
ready      → the first exec returned (it writes the run's nonce: the fresh-sandbox check)
inject     → sandbay's entrypoint uploaded and started, the request sent
first_msg  → the first agent message arrived (``system/init``)
first_asst → the first assistant message arrived (includes the model's first answer)
result     → the result message arrived
teardown   → the sandbox is removed
========== =================================================================================

In ``warm`` mode a `SandboxPool` has done provision, ready and the CLI's start-up ahead of
time: ``acquire`` (take a ready sandbox) replaces provision and ready, and the fresh-sandbox
check runs after the result, off the critical path. ``burst`` starts K cold runs at once.

Providers are interleaved run by run (their order rotating), one warm-up run each is
excluded, and failures are counted, not dropped. A raw baseline (create → first exec with
the provider's own SDK, `Provider.raw_create_exec`) runs in the same rounds, so the report
shows sandbay's overhead as a ratio measured side by side.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
from claude_agent_sdk import ClaudeAgentOptions, ResultMessage

from ._agent import run_agent
from ._api import create_sandbox, get_provider
from ._config import SandbayConfig, parse_config
from ._errors import SandboxError
from ._pool import SandboxPool
from ._sandbox import SandboxSpec

__all__ = ["BenchConfig", "BenchReport", "run_bench"]

Mode = Literal["cold", "warm", "burst"]
COLD_PHASES = ("provision", "ready", "inject", "first_msg", "first_asst", "result", "teardown")
WARM_PHASES = ("acquire", "inject", "first_msg", "first_asst", "result", "teardown")
PROMPT = "Run `echo benchmark` and report what it printed."
NONCE_GLOB = ".sandbay-bench-nonce-"
#: Seconds a full warm pool is left idle before a measured run, so the last refill settles.
WARM_SETTLE_S = 1.0


@dataclass
class BenchConfig:
    """What to measure.

    Attributes:
        providers: Provider names or configs, measured side by side.
        runs: Measured runs per provider (after one warm-up run).
        mode: ``cold``, ``warm`` or ``burst``.
        concurrency: Runs started at once in ``burst`` mode; pool concurrency in ``warm``.
        model: ``scripted`` (the loopback scripted model) or ``real`` (your API key).
        spec: Spec for every sandbox (``network`` is forced to ``host`` with the scripted
            model, which listens on the host's loopback).
        raw_baseline: Also time create → first exec with each provider's own SDK.
    """

    providers: Sequence[str | SandbayConfig]
    runs: int = 10
    mode: Mode = "cold"
    concurrency: int = 8
    model: Literal["scripted", "real"] = "scripted"
    spec: SandboxSpec = field(default_factory=SandboxSpec)
    raw_baseline: bool = True


@dataclass
class RunSample:
    """One measured run: phase durations in seconds, or the failure."""

    provider: str
    phases: dict[str, float] = field(default_factory=dict)
    model_s: float | None = None
    agent_first_msg_s: float | None = None
    error: str | None = None

    @property
    def total(self) -> float:
        return sum(self.phases.values())


@dataclass
class BenchReport:
    """Everything a run of the benchmark measured, plus where it ran."""

    config: dict[str, Any]
    machine: dict[str, Any]
    samples: list[RunSample] = field(default_factory=list)
    raw: dict[str, list[float]] = field(default_factory=dict)
    raw_errors: dict[str, int] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Per provider: count, failures, stats per phase and total, the raw ratio."""
        out: dict[str, Any] = {}
        phases = WARM_PHASES if self.config["mode"] == "warm" else COLD_PHASES
        for name in dict.fromkeys(s.provider for s in self.samples):
            ok = [s for s in self.samples if s.provider == name and s.error is None]
            failed = [s for s in self.samples if s.provider == name and s.error is not None]
            entry: dict[str, Any] = {
                "runs": len(ok) + len(failed),
                "failures": len(failed),
                "errors": sorted({s.error for s in failed if s.error})[:5],
                "label": self.labels.get(name, ""),
                "phases": {p: stats([s.phases[p] for s in ok if p in s.phases]) for p in phases},
                "total": stats([s.total for s in ok]),
            }
            models = [s.model_s for s in ok if s.model_s is not None]
            entry["model"] = stats(models)
            entry["agent_first_msg"] = stats(
                [s.agent_first_msg_s for s in ok if s.agent_first_msg_s is not None]
            )
            if self.config["mode"] == "warm":
                to_first = {
                    id(s): s.phases["acquire"] + s.phases["inject"] + s.phases["first_msg"]
                    for s in ok
                }
                entry["acquire_to_first_msg"] = stats(list(to_first.values()))
                # What sandbay adds: the host's wait minus the agent's own time in the sandbox.
                entry["sandbay_overhead_to_first_msg"] = stats(
                    [
                        to_first[id(s)] - s.agent_first_msg_s
                        for s in ok
                        if s.agent_first_msg_s is not None
                    ]
                )
            else:
                entry["create_to_first_exec"] = stats(
                    [s.phases["provision"] + s.phases["ready"] for s in ok]
                )
                entry["create_to_first_msg"] = stats(
                    [
                        s.phases["provision"]
                        + s.phases["ready"]
                        + s.phases["inject"]
                        + s.phases["first_msg"]
                        for s in ok
                    ]
                )
            raw = self.raw.get(name, [])
            entry["raw_create_to_first_exec"] = stats(raw)
            entry["raw_failures"] = self.raw_errors.get(name, 0)
            ours = entry.get("create_to_first_exec", {}).get("p50")
            if raw and ours:
                entry["ratio_vs_raw"] = ours / statistics.median(raw)
            out[name] = entry
        return out

    @classmethod
    def from_json(cls, text: str) -> BenchReport:
        """Read a report `to_json` wrote, e.g. to render committed results again."""
        data = json.loads(text)
        report = cls(config=data["config"], machine=data["machine"], raw=data.get("raw", {}))
        report.samples = [RunSample(**sample) for sample in data["samples"]]
        report.labels = {name: e.get("label", "") for name, e in data["summary"].items()}
        report.raw_errors = {name: e.get("raw_failures", 0) for name, e in data["summary"].items()}
        return report

    def to_json(self) -> str:
        return json.dumps(
            {
                "config": self.config,
                "machine": self.machine,
                "summary": self.summary(),
                "samples": [s.__dict__ for s in self.samples],
                "raw": self.raw,
            },
            indent=2,
        )

    def to_markdown(self) -> str:
        summary = self.summary()
        mode = self.config["mode"]
        phases = WARM_PHASES if mode == "warm" else COLD_PHASES
        lines = [
            f"## {mode} start, {self.config['runs']} runs per provider"
            + (f", bursts of {self.config['concurrency']}" if mode == "burst" else ""),
            "",
            f"Machine: {self.machine['cpus']} cores, {self.machine['memory_gib']} GiB, "
            f"{self.machine['platform']}, Python {self.machine['python']}. "
            f"Model: {self.config['model']}. Times in ms; p50 (p95).",
            "",
            "| provider | runs | failed | " + " | ".join(phases) + " | total p50 | total p95 |",
            "|---|---:|---:|" + "---:|" * len(phases) + "---:|---:|",
        ]
        for name, entry in summary.items():
            label = f" ({entry['label']})" if entry["label"] else ""
            cells = [
                f"{_ms(entry['phases'][p].get('p50'))} ({_ms(entry['phases'][p].get('p95'))})"
                for p in phases
            ]
            lines.append(
                f"| {name}{label} | {entry['runs']} | {entry['failures']} | "
                + " | ".join(cells)
                + f" | {_ms(entry['total'].get('p50'))} | {_ms(entry['total'].get('p95'))} |"
            )
        lines += [
            "",
            "| provider | stat | min | p50 | p95 | p99 | max |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for name, entry in summary.items():
            rows = [("total", entry["total"])]
            if mode == "warm":
                rows.append(("acquire → first agent message", entry["acquire_to_first_msg"]))
                rows.append(
                    (
                        "  of which sandbay (minus the agent's own)",
                        entry["sandbay_overhead_to_first_msg"],
                    )
                )
            else:
                rows.append(("create → first agent message", entry["create_to_first_msg"]))
                rows.append(("create → first exec (sandbay)", entry["create_to_first_exec"]))
            rows.append(("create → first exec (raw SDK)", entry["raw_create_to_first_exec"]))
            rows.append(("model's own time (duration_api_ms)", entry["model"]))
            rows.append(
                ("agent's own prompt → first message (in sandbox)", entry["agent_first_msg"])
            )
            for title, st in rows:
                if st:
                    lines.append(
                        f"| {name} | {title} | {_ms(st['min'])} | {_ms(st['p50'])} | "
                        f"{_ms(st['p95'])} | {_ms(st['p99'])} | {_ms(st['max'])} |"
                    )
        ratios = {n: e["ratio_vs_raw"] for n, e in summary.items() if "ratio_vs_raw" in e}
        if ratios:
            lines += [
                "",
                "sandbay create → first exec over the raw SDK (median ratio, same run): "
                + ", ".join(f"{n} {r:.2f}×" for n, r in ratios.items()),
            ]
        failures = {n: e["errors"] for n, e in summary.items() if e["errors"]}
        for name, errors in failures.items():
            lines.append(f"\nFailures on {name}: " + "; ".join(errors))
        return "\n".join(lines) + "\n"

    def plot(self, path: Path) -> bool:
        """Stacked bars of p50 per phase, with p95-of-total whiskers. False without matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        summary = self.summary()
        mode = self.config["mode"]
        phases = WARM_PHASES if mode == "warm" else COLD_PHASES
        names = list(summary)
        fig, ax = plt.subplots(figsize=(10, 1.6 + 0.8 * len(names)))
        lefts = [0.0] * len(names)
        colors = plt.get_cmap("tab10")
        for i, phase in enumerate(phases):
            widths = [summary[n]["phases"][phase].get("p50", 0) * 1000 for n in names]
            ax.barh(names, widths, left=lefts, color=colors(i), label=phase)
            lefts = [a + b for a, b in zip(lefts, widths, strict=True)]
        p50 = [summary[n]["total"].get("p50", 0) * 1000 for n in names]
        p95 = [summary[n]["total"].get("p95", 0) * 1000 for n in names]
        ax.errorbar(
            lefts,
            names,
            xerr=[[0] * len(names), [max(b - a, 0) for a, b in zip(p50, p95, strict=True)]],
            fmt="none",
            ecolor="black",
            capsize=4,
            label="p95 total",
        )
        ax.set_yticks(
            range(len(names)),
            [f"{n}\n({summary[n]['label']})" if summary[n]["label"] else n for n in names],
        )
        ax.set_xlabel("milliseconds (stacked phase p50s; whisker to total p95)")
        burst = f", bursts of {self.config['concurrency']}" if mode == "burst" else ""
        ax.set_title(
            f"sandbay {mode} start{burst}: {self.machine['cpus']} cores, "
            f"{self.machine['memory_gib']} GiB, model {self.config['model']}"
        )
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return True


def stats(values: Sequence[float]) -> dict[str, float]:
    """min / p50 / p95 / p99 / max (nearest-rank percentiles); empty dict for no values."""
    if not values:
        return {}
    ordered = sorted(values)

    def pct(q: float) -> float:
        rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
        return ordered[rank - 1]

    return {
        "min": ordered[0],
        "p50": statistics.median(ordered),
        "p95": pct(95),
        "p99": pct(99),
        "max": ordered[-1],
        "n": len(ordered),
    }


def machine_info() -> dict[str, Any]:
    """Cores, memory and platform of this machine, for the report."""
    memory = 0.0
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        memory = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpus": os.cpu_count(),
        "memory_gib": memory,
        "platform": f"{platform.system()} {platform.machine()}",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


class _Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, title: str) -> None:
        self.total, self.done, self.title = total, 0, title
        self.tty = sys.stderr.isatty()
        self.last_line = 0.0

    def step(self, note: str) -> None:
        self.done += 1
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        line = (
            f"{self.title} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {note}"
        )
        if self.tty:
            print(f"\r{line[:120]:<120}", end="", file=sys.stderr, flush=True)
            if self.done == self.total:
                print(file=sys.stderr)
        elif self.done == self.total or time.monotonic() - self.last_line > 5:
            self.last_line = time.monotonic()
            print(line, file=sys.stderr, flush=True)


async def run_bench(
    config: BenchConfig, *, progress: Callable[[int, str], _Progress] | None = None
) -> BenchReport:
    """Run the benchmark and return its report.

    Raises:
        ConfigError: Unknown provider or bad settings.
    """
    from .testing import ScriptedModel

    configs = [
        p if isinstance(p, SandbayConfig) else parse_config({"provider": {"type": p}})
        for p in config.providers
    ]
    names: list[str] = [c.provider.type for c in configs]
    if len(set(names)) != len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    report = BenchReport(
        config={
            "providers": names,
            "runs": config.runs,
            "mode": config.mode,
            "concurrency": config.concurrency,
            "model": config.model,
        },
        machine=machine_info(),
    )
    for name, cfg in zip(names, configs, strict=True):
        provider = get_provider(cfg)
        report.labels[name] = provider.bench_label
        report.raw[name] = []
        report.raw_errors[name] = 0

    per_round = config.concurrency if config.mode == "burst" else 1
    model = None
    env: dict[str, str] = {}
    spec = config.spec
    if config.model == "scripted":
        model = ScriptedModel(_bench_script(len(names) * (config.runs + 1) * per_round + 16))
        model.start()
        env = model.env()
        spec = spec.model_copy(update={"network": "host"})
    # allowed_tools lets the agent run Bash unasked on every provider; bypassPermissions is
    # refused on the unisolated local provider.
    options = ClaudeAgentOptions(max_turns=3, allowed_tools=["Bash"])
    bar = (progress or _Progress)(
        len(names) * (config.runs + 1) * per_round * (2 if config.raw_baseline else 1),
        f"bench {config.mode}",
    )
    seen_nonces: set[str] = set()
    try:
        pools: dict[str, SandboxPool] = {}
        async with AsyncExitStack() as stack:
            if config.mode == "warm":
                for name, cfg in zip(names, configs, strict=True):
                    pools[name] = await stack.enter_async_context(
                        SandboxPool(cfg, spec, size=2, concurrency=2, options=options, env=env)
                    )
            for round_no in range(config.runs + 1):
                warmup = round_no == 0
                shift = round_no % len(names)
                for name, cfg in (
                    list(zip(names, configs, strict=True))[shift:]
                    + list(zip(names, configs, strict=True))[:shift]
                ):
                    samples = await _round(
                        config, name, cfg, spec, options, env, pools, seen_nonces
                    )
                    for sample in samples:
                        bar.step(f"{name} {'warm-up' if warmup else ''}")
                        if not warmup:
                            report.samples.append(sample)
                    if config.raw_baseline:
                        # Under the same load as the runs: K at once in burst mode.
                        for raw in await _raw_round(cfg, spec, per_round):
                            bar.step(f"{name} raw")
                            if warmup:
                                continue
                            if raw is None:
                                report.raw_errors[name] += 1
                            elif raw >= 0:
                                report.raw[name].append(raw)
    finally:
        if model is not None:
            model.stop()
    return report


def _bench_script(turns: int) -> list[Any]:
    # One text turn per run: under a burst, runs share the model, and a single-turn script
    # keeps every run identical whichever order their requests arrive in.
    return [{"text": "benchmark done"}] * turns


async def _round(
    config: BenchConfig,
    name: str,
    cfg: SandbayConfig,
    spec: SandboxSpec,
    options: ClaudeAgentOptions,
    env: dict[str, str],
    pools: dict[str, SandboxPool],
    seen: set[str],
) -> list[RunSample]:
    if config.mode == "warm":
        return [await _warm_run(name, pools[name], seen)]
    if config.mode == "cold":
        return [await _cold_run(name, cfg, spec, options, env, seen)]
    samples: list[RunSample] = []

    async def one() -> None:
        samples.append(await _cold_run(name, cfg, spec, options, env, seen))

    async with anyio.create_task_group() as tg:
        for _ in range(config.concurrency):
            tg.start_soon(one)
    return samples


def _nonce_command(nonce: str) -> str:
    # Lists nonces earlier runs left (there must be none), then leaves this run's.
    return f"ls -a | grep '^{NONCE_GLOB}' || true; echo {nonce} > {NONCE_GLOB}{nonce}"


def _check_fresh(output: bytes, nonce: str, seen: set[str]) -> None:
    found = [line for line in output.decode().split() if line.startswith(NONCE_GLOB)]
    if found:
        raise SandboxError(f"sandbox not fresh: found {found} from an earlier run")
    seen.add(nonce)


async def _cold_run(
    name: str,
    cfg: SandbayConfig,
    spec: SandboxSpec,
    options: ClaudeAgentOptions,
    env: dict[str, str],
    seen: set[str],
) -> RunSample:
    sample = RunSample(name)
    nonce = uuid.uuid4().hex
    t0 = time.perf_counter()
    sandbox = None
    try:
        sandbox = await create_sandbox(cfg, spec)
        t1 = time.perf_counter()
        result = await sandbox.exec(_nonce_command(nonce), timeout=60)
        t2 = time.perf_counter()
        if not result.ok:
            raise SandboxError(f"nonce exec failed: {result.stderr[-300:]!r}")
        _check_fresh(result.stdout, nonce, seen)
        run = run_agent(PROMPT, sandbox=sandbox, options=options, env=env, timeout=120)
        async with run:
            async for message in run:
                if isinstance(message, ResultMessage):
                    sample.model_s = message.duration_api_ms / 1000
        tm = run.timings
        sample.agent_first_msg_s = _agent_first_msg(run.sandbox_timings)
        await sandbox.aclose()
        t3 = time.perf_counter()
        sample.phases = {
            "provision": t1 - t0,
            "ready": t2 - t1,
            "inject": tm["request"] - t2,
            "first_msg": tm["first_message"] - tm["request"],
            "first_asst": tm["first_assistant"] - tm["first_message"],
            "result": tm["result"] - tm["first_assistant"],
            "teardown": t3 - tm["result"],
        }
    except (SandboxError, OSError, KeyError, TimeoutError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        if sandbox is not None:
            await sandbox.aclose()
    return sample


async def _warm_run(name: str, pool: SandboxPool, seen: set[str]) -> RunSample:
    sample = RunSample(name)
    nonce = uuid.uuid4().hex
    try:
        # Steady state, not timed: the pool is full and its last refill has settled, as in a
        # pool that keeps up with demand. (Refilling still runs during the measured run.)
        await pool.wait_ready(timeout=300)
        await anyio.sleep(WARM_SETTLE_S)
        run = run_agent(PROMPT, pool=pool, timeout=120)
        checked_at = 0.0
        async with run:
            async for message in run:
                if isinstance(message, ResultMessage):
                    sample.model_s = message.duration_api_ms / 1000
                    # Fresh-sandbox check, after the result: off the critical path.
                    assert run.sandbox is not None
                    result = await run.sandbox.exec(_nonce_command(nonce), timeout=60)
                    _check_fresh(result.stdout, nonce, seen)
                    checked_at = time.perf_counter()
        tm = run.timings
        sample.agent_first_msg_s = _agent_first_msg(run.sandbox_timings)
        sample.phases = {
            "acquire": tm["sandbox"] - tm["start"],
            "inject": tm["request"] - tm["sandbox"],
            "first_msg": tm["first_message"] - tm["request"],
            "first_asst": tm["first_assistant"] - tm["first_message"],
            "result": tm["result"] - tm["first_assistant"],
            "teardown": tm["closed"] - checked_at,
        }
    except (SandboxError, OSError, KeyError, TimeoutError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"[:300]
    return sample


def _agent_first_msg(timings: dict[str, float]) -> float | None:
    value = timings.get("prompt_to_first_message_ms")
    return None if value is None else value / 1000


async def _raw_round(cfg: SandbayConfig, spec: SandboxSpec, count: int) -> list[float | None]:
    """``count`` raw baselines started at once."""
    results: list[float | None] = []

    async def one() -> None:
        results.append(await _raw(cfg, spec))

    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(one)
    return results


async def _raw(cfg: SandbayConfig, spec: SandboxSpec) -> float | None:
    """Seconds for create → first exec with the provider's own SDK; -1 if it has none."""
    try:
        return await get_provider(cfg).raw_create_exec(spec)
    except NotImplementedError:
        return -1.0
    except (SandboxError, OSError):
        return None


def write_results(report: BenchReport, directory: Path, *, stem: str | None = None) -> list[Path]:
    """Write JSON, Markdown and (with matplotlib) PNG; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    stem = stem or f"{report.config['mode']}-{'-'.join(report.config['providers'])}"
    paths = [directory / f"{stem}.json", directory / f"{stem}.md"]
    paths[0].write_text(report.to_json())
    paths[1].write_text(report.to_markdown())
    png = directory / f"{stem}.png"
    if report.plot(png):
        paths.append(png)
    return paths


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1000:.0f}"
