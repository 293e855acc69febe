"""Capacity planning: how many agents one host holds, from a measured representative session.

The Agent SDK's hosting guide recommends 1 GiB RAM and 1 CPU per SDK instance, to vary with
the task; sizing a host from a per-session figure is

    agents per host = (host RAM − overhead) / per-session ceiling

This module measures the ceiling instead of assuming it: it runs a representative session
(a scripted model asking for several Bash tool calls that do real work: allocate and touch
memory in ``python3``, hash it, run a CPU loop, write a file) to a target length on each
provider, and
records for each session

- the **sandbox's peak memory and CPU seconds** (how, per provider, is in `METHODS`);
- the **host side**: sandbay's own process, its RSS (sampled) and CPU seconds
  (``getrusage(RUSAGE_SELF)``, minus the sampler's own thread time). The scripted model's
  server runs in the same process, so on the host side it is an upper bound on sandbay's own.

From them it fills in the formula with this machine's RAM and cores, and the CPU-bound
counterpart, ``agents busy at once = cores / per-session CPU rate`` (the session's CPU
seconds, sandbox and host side, over its wall time). With the scripted model a session waits
for no one, so its CPU rate is as high as a session's can be; a real model's latency lowers it.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
from claude_agent_sdk import ClaudeAgentOptions, ResultMessage

from .._agent import run_agent
from .._api import create_sandbox
from .._config import DockerConfig, SandbayConfig
from .._errors import ConfigError, SandboxError
from .._sandbox import Sandbox, SandboxSpec
from ..providers.local._registry import descendants
from ._report import machine_info
from ._running import provider_configs

__all__ = [
    "GUIDE_SESSION_MIB",
    "METHODS",
    "CapacityConfig",
    "CapacityReport",
    "CapacitySample",
    "agents_per_cores",
    "agents_per_host",
    "run_capacity",
    "session_script",
]

#: The hosting guide's recommended memory per SDK instance, for comparison.
GUIDE_SESSION_MIB = 1024
_MIB = 2**20

#: What is measured, per provider kind: shown in the report beside the numbers.
METHODS: dict[str, dict[str, str]] = {
    "local": {
        "memory": "the sandbox's process tree (every descendant of sandbay's process): the "
        "sum of VmRSS from /proc/<pid>/status, sampled; the largest sum. RSS counts shared "
        "pages (libraries) once per process, so the sum overcounts them; a peak shorter than "
        "the sampling interval can be missed. Local sandboxes have no cgroup of their own.",
        "cpu": "getrusage(RUSAGE_CHILDREN) user + system seconds, before the sandbox is "
        "created and after it is removed: every descendant process, reaped by then.",
    },
    "docker": {
        "memory": "the container's cgroup high-water mark: Docker's memory_stats.max_usage "
        "(cgroup v1 memory.max_usage_in_bytes), read before removal; it includes the page "
        "cache of files the session wrote. On cgroup v2, which has no such field in the "
        "API, the largest sampled memory_stats.usage.",
        "cpu": "the container's cgroup CPU time at the end (cpu_stats.cpu_usage.total_usage): "
        "every process in the container, its start included; not dockerd's or containerd's.",
    },
}


@dataclass
class CapacityConfig:
    """What to measure.

    Attributes:
        providers: Provider names or configs, measured one session at a time, interleaved.
        runs: Measured sessions per provider (after one warm-up session unless ``warmup``
            is false).
        turns: Bash tool calls per session (then one closing text turn): the target length.
        alloc_mib: MiB each tool call allocates and touches in ``python3``, and hashes.
        write_mib: MiB each tool call writes to a new file in the sandbox.
        reserve_mib: Host memory kept for everything but the agents (the OS, other
            services): with sandbay's own RSS, the formula's overhead.
        sample_interval_s: Seconds between samples of memory.
        spec: Spec for every sandbox (``network`` is forced to ``host``: the scripted model
            listens on the host's loopback).
        warmup: Run one session per provider first, not counted.
    """

    providers: Sequence[str | SandbayConfig]
    runs: int = 3
    turns: int = 6
    alloc_mib: int = 64
    write_mib: int = 4
    reserve_mib: int = 1024
    sample_interval_s: float = 0.05
    spec: SandboxSpec = field(default_factory=SandboxSpec)
    warmup: bool = True

    def check(self) -> None:
        """Refuse settings a session cannot run with.

        Raises:
            ConfigError: Naming the setting and what it takes.
        """
        limits = {
            "runs": (self.runs, 1, 1000),
            "turns": (self.turns, 1, 100),
            "alloc_mib": (self.alloc_mib, 0, 16384),
            "write_mib": (self.write_mib, 0, 4096),
            "reserve_mib": (self.reserve_mib, 0, 2**24),
        }
        for name, (value, low, high) in limits.items():
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(
                    f"capacity {name} must be a whole number from {low} to {high}, got {value!r}"
                )
        interval = self.sample_interval_s
        if not isinstance(interval, (int, float)) or not 0.005 <= interval <= 10:
            raise ConfigError(
                f"capacity sample_interval_s must be 0.005 to 10 seconds, got {interval!r}"
            )


@dataclass
class CapacitySample:
    """One measured session, or its failure.

    Attributes:
        provider: The provider's name in the report.
        kind: The provider's type (``local``, ``docker``): which `METHODS` measured it.
        wall_s: Seconds from create requested to the sandbox removed.
        turns_done: Tool results the model received (each a turn's work done).
        sandbox_peak_mib: The sandbox's peak memory.
        sandbox_cpu_s: The sandbox's CPU seconds.
        host_rss_start_mib: sandbay's process RSS before the session.
        host_rss_peak_mib: sandbay's process RSS, the largest sample during the session.
        host_cpu_s: sandbay's process CPU seconds during the session, the sampler's own
            thread time left out.
        memory_samples: How many memory samples the session took.
        error: Why the session failed; ``None`` if it did not.
    """

    provider: str
    kind: str = ""
    wall_s: float = 0.0
    turns_done: int = 0
    sandbox_peak_mib: float = 0.0
    sandbox_cpu_s: float = 0.0
    host_rss_start_mib: float = 0.0
    host_rss_peak_mib: float = 0.0
    host_cpu_s: float = 0.0
    memory_samples: int = 0
    error: str | None = None

    @property
    def cpu_rate(self) -> float:
        """Cores the session kept busy on average: its CPU seconds (both sides) over wall."""
        return (self.sandbox_cpu_s + self.host_cpu_s) / self.wall_s if self.wall_s else 0.0

    @property
    def host_mib_per_session(self) -> float:
        """What a live session added to sandbay's process RSS (never below zero)."""
        return max(0.0, self.host_rss_peak_mib - self.host_rss_start_mib)


def agents_per_host(*, host_ram_mib: float, overhead_mib: float, per_session_mib: float) -> float:
    """The hosting guide's formula: (host RAM − overhead) / per-session ceiling; 0 if no room.

    Raises:
        ConfigError: A non-positive per-session ceiling (nothing was measured).
    """
    if not per_session_mib > 0:
        raise ConfigError(f"the per-session ceiling must be above 0 MiB, got {per_session_mib}")
    return max(0.0, host_ram_mib - overhead_mib) / per_session_mib


def agents_per_cores(*, cores: float, per_session_cores: float) -> float:
    """The CPU-bound counterpart: cores / per-session CPU rate (sessions busy at once).

    Raises:
        ConfigError: A non-positive CPU rate (nothing was measured).
    """
    if not per_session_cores > 0:
        raise ConfigError(f"the per-session CPU rate must be above 0, got {per_session_cores}")
    return cores / per_session_cores


def session_script(turns: int, *, alloc_mib: int, write_mib: int) -> list[dict[str, Any]]:
    """The representative session: ``turns`` Bash calls doing real work, then a text turn.

    Each call starts ``python3``, which allocates ``alloc_mib`` MiB and writes every byte of
    it, hashes it four times, runs a CPU loop, writes ``write_mib`` MiB of random bytes to a
    new file, and prints a line naming its turn (which the model receives back).
    """
    script: list[dict[str, Any]] = []
    for turn in range(1, turns + 1):
        code = (
            "import hashlib, os; "
            f"b = bytearray(b'x') * ({alloc_mib} << 20); "
            "h = [hashlib.sha256(b).hexdigest() for _ in range(4)][-1]; "
            "n = sum(i * i for i in range(300000)); "
            f"open('capacity-{turn}.bin', 'wb').write(os.urandom({write_mib} << 20)); "
            f"print('capacity turn {turn}', h[:12], n % 97, len(os.listdir('.')))"
        )
        script.append({"tool_use": {"name": "Bash", "input": {"command": f'python3 -c "{code}"'}}})
    script.append({"text": "capacity session done"})
    return script


# --- measuring ------------------------------------------------------------------------------


def _status_kib(pid: int | str, key: str) -> int:
    """A ``kB`` field of /proc/<pid>/status (0 if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class _Meter:
    """Samples one sandbox and sandbay's process; `settle` and `closed` give the totals."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self.cpu_s = 0.0
        self.samples = 0
        self.host_peak_kib = 0
        self.sampler_cpu_s = 0.0  # the sampler's own thread time: not sandbay's cost

    def sample(self) -> None:
        """One sample (blocking: run it in a worker thread)."""
        started = time.thread_time()
        self.host_peak_kib = max(self.host_peak_kib, _status_kib("self", "VmRSS"))
        self._sample()
        self.samples += 1
        self.sampler_cpu_s += time.thread_time() - started

    def _sample(self) -> None:
        raise NotImplementedError

    def settle(self) -> None:
        """After the session, before the sandbox is removed (blocking)."""

    def closed(self) -> None:
        """After the sandbox is removed (blocking)."""

    def release(self) -> None:
        """Free what the meter holds, whether or not the session succeeded (blocking)."""


class _LocalMeter(_Meter):
    def __init__(self, cpu_before: float) -> None:
        super().__init__()
        self._cpu_before = cpu_before

    def _sample(self) -> None:
        total = sum(_status_kib(pid, "VmRSS") for pid in descendants(os.getpid())) * 1024
        self.peak_bytes = max(self.peak_bytes, total)

    def closed(self) -> None:
        self.cpu_s = _children_cpu_s() - self._cpu_before


class _DockerMeter(_Meter):
    def __init__(self, config: DockerConfig, container_id: str) -> None:
        from ..providers.docker._errors import docker_client, docker_errors

        super().__init__()
        self._base_url = config.base_url
        with docker_errors(base_url=config.base_url, sandbox_id=container_id):
            self._client = docker_client(config)
        self._id = container_id

    def _stats(self) -> dict[str, Any]:
        from ..providers.docker._errors import docker_errors

        with docker_errors(base_url=self._base_url, sandbox_id=self._id):
            stats: dict[str, Any] = self._client.api.stats(self._id, stream=False, one_shot=True)
        return stats

    def _sample(self) -> None:
        usage = int(self._stats().get("memory_stats", {}).get("usage") or 0)
        self.peak_bytes = max(self.peak_bytes, usage)

    def settle(self) -> None:
        stats = self._stats()
        memory = stats.get("memory_stats", {})
        # cgroup v1: the kernel's own high-water mark, exact; v2 reports no such field.
        self.peak_bytes = max(self.peak_bytes, int(memory.get("max_usage") or 0))
        self.cpu_s = int(stats["cpu_stats"]["cpu_usage"]["total_usage"]) / 1e9

    def release(self) -> None:
        self._client.close()


def _meter(config: SandbayConfig, sandbox: Sandbox, children_cpu_before: float) -> _Meter:
    if isinstance(config.provider, DockerConfig):
        return _DockerMeter(config.provider, sandbox.id)
    if config.provider.type == "local":
        return _LocalMeter(children_cpu_before)
    raise ConfigError(
        f"capacity measures local and docker sandboxes, not {config.provider.type!r}: "
        "a cloud sandbox's memory and CPU are the provider's to report"
    )


async def _session(
    name: str, config: SandbayConfig, capacity: CapacityConfig, spec: SandboxSpec
) -> CapacitySample:
    from ..testing import ScriptedModel

    sample = CapacitySample(name, kind=config.provider.type)
    script = session_script(
        capacity.turns, alloc_mib=capacity.alloc_mib, write_mib=capacity.write_mib
    )
    options = ClaudeAgentOptions(max_turns=capacity.turns + 2, allowed_tools=["Bash"])
    meter: _Meter | None = None
    try:
        async with ScriptedModel(script) as model:
            sample.host_rss_start_mib = _status_kib("self", "VmRSS") / 1024
            host_before = _self_cpu_s()
            children_before = _children_cpu_s()  # local: the create's processes count too
            started = time.perf_counter()
            sandbox = await create_sandbox(config, spec)
            try:
                meter = await anyio.to_thread.run_sync(_meter, config, sandbox, children_before)
                failure: BaseException | None = None
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_sample_until_cancelled, meter, capacity.sample_interval_s)
                    try:
                        await _run_session(sandbox, options, model.env(), capacity.turns)
                    except (SandboxError, OSError, KeyError, TimeoutError) as exc:
                        failure = exc  # raised below: out of a task group it would be grouped
                    tg.cancel_scope.cancel()
                if failure is not None:
                    raise failure
                await anyio.to_thread.run_sync(meter.settle)
            finally:
                await sandbox.aclose()
                if meter is not None:
                    await anyio.to_thread.run_sync(meter.release)
            sample.wall_s = time.perf_counter() - started
            await anyio.to_thread.run_sync(meter.closed)
            sample.host_cpu_s = max(0.0, _self_cpu_s() - host_before - meter.sampler_cpu_s)
            sample.turns_done = sum(
                f"capacity turn {turn} " in json.dumps(result)
                for result in model.tool_results()
                for turn in range(1, capacity.turns + 1)
            )
        sample.sandbox_peak_mib = meter.peak_bytes / _MIB
        sample.sandbox_cpu_s = meter.cpu_s
        sample.host_rss_peak_mib = max(meter.host_peak_kib / 1024, sample.host_rss_start_mib)
        sample.memory_samples = meter.samples
        if sample.turns_done != capacity.turns:
            raise SandboxError(f"{sample.turns_done} of {capacity.turns} turns did their work")
    except (SandboxError, OSError, KeyError, TimeoutError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"[:300]
    return sample


async def _run_session(
    sandbox: Sandbox, options: ClaudeAgentOptions, env: dict[str, str], turns: int
) -> None:
    run = run_agent(
        "Do the session's work.",
        sandbox=sandbox,
        options=options,
        env=env,
        timeout=60 + 30 * turns,
    )
    async with run:
        async for message in run:
            if isinstance(message, ResultMessage) and message.is_error:
                raise SandboxError(f"the session ended in error: {message.result}")


async def _sample_until_cancelled(meter: _Meter, interval: float) -> None:
    while True:
        await anyio.to_thread.run_sync(meter.sample)
        await anyio.sleep(interval)


async def run_capacity(config: CapacityConfig) -> CapacityReport:
    """Run the sessions, provider by provider interleaved, and return the report.

    Raises:
        ConfigError: Bad settings, or a provider this cannot measure (cloud providers).
    """
    config.check()
    configs, names = provider_configs(config.providers)
    for cfg in configs:
        if cfg.provider.type not in METHODS:
            raise ConfigError(
                f"capacity measures {' and '.join(METHODS)} sandboxes, not "
                f"{cfg.provider.type!r}: a cloud sandbox's memory and CPU are the provider's "
                "to report"
            )
    spec = config.spec.model_copy(update={"network": "host"})
    report = CapacityReport(
        config={
            "providers": names,
            "runs": config.runs,
            "turns": config.turns,
            "alloc_mib": config.alloc_mib,
            "write_mib": config.write_mib,
            "reserve_mib": config.reserve_mib,
            "sample_interval_ms": config.sample_interval_s * 1000,
            "model": "scripted",
        },
        machine=_machine(),
    )
    for round_no in range(config.runs + int(config.warmup)):
        shift = round_no % len(names)
        pairs = list(zip(names, configs, strict=True))
        for name, cfg in pairs[shift:] + pairs[:shift]:
            sample = await _session(name, cfg, config, spec)
            if config.warmup and round_no == 0:
                continue
            report.samples.append(sample)
    return report


def _machine() -> dict[str, Any]:
    info = machine_info()
    try:
        info["memory_mib"] = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / _MIB
    except (ValueError, OSError):
        info["memory_mib"] = info["memory_gib"] * 1024
    return info


# --- the report -------------------------------------------------------------------------------


@dataclass
class CapacityReport:
    """The measured sessions, where they ran, and the formula filled in.

    Attributes:
        config: What was measured (`CapacityConfig`'s settings; ``command`` if a script
            ran it).
        machine: Where: `machine_info` plus ``memory_mib``.
        samples: Every measured session, failures included.
    """

    config: dict[str, Any]
    machine: dict[str, Any]
    samples: list[CapacitySample] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Per provider: the sessions' figures and the formula's terms and results.

        - ``per_session_mib``: the ceiling, the largest sandbox peak plus the largest
          growth of sandbay's process during a session;
        - ``overhead_mib``: ``reserve_mib`` plus sandbay's process RSS before a session
          (the median);
        - ``cpu_rate``: the largest session CPU rate (cores);
        - ``agents_by_memory``, ``agents_by_cpu`` and ``agents_at_guide_default`` (the
          guide's 1 GiB per session, same overhead).
        """
        ram = float(self.machine["memory_mib"])
        cores = float(self.machine["cpus"])
        out: dict[str, Any] = {}
        for name in dict.fromkeys(s.provider for s in self.samples):
            ok = [s for s in self.samples if s.provider == name and s.error is None]
            failed = [s for s in self.samples if s.provider == name and s.error is not None]
            entry: dict[str, Any] = {
                "sessions": len(ok) + len(failed),
                "failures": len(failed),
                "errors": sorted({s.error for s in failed if s.error})[:5],
                "methods": METHODS.get((ok or failed)[0].kind if (ok or failed) else "", {}),
            }
            if ok:
                peaks = [s.sandbox_peak_mib for s in ok]
                ceiling = max(peaks) + max(s.host_mib_per_session for s in ok)
                overhead = self.config["reserve_mib"] + statistics.median(
                    s.host_rss_start_mib for s in ok
                )
                rate = max(s.cpu_rate for s in ok)
                entry.update(
                    wall_s_p50=statistics.median(s.wall_s for s in ok),
                    sandbox_peak_mib_p50=statistics.median(peaks),
                    sandbox_peak_mib_max=max(peaks),
                    sandbox_cpu_s_p50=statistics.median(s.sandbox_cpu_s for s in ok),
                    host_rss_mib_max=max(s.host_rss_peak_mib for s in ok),
                    host_mib_per_session_max=max(s.host_mib_per_session for s in ok),
                    host_cpu_s_p50=statistics.median(s.host_cpu_s for s in ok),
                    cpu_rate_p50=statistics.median(s.cpu_rate for s in ok),
                    cpu_rate=rate,
                    per_session_mib=ceiling,
                    overhead_mib=overhead,
                    agents_by_memory=agents_per_host(
                        host_ram_mib=ram, overhead_mib=overhead, per_session_mib=ceiling
                    ),
                    agents_at_guide_default=agents_per_host(
                        host_ram_mib=ram, overhead_mib=overhead, per_session_mib=GUIDE_SESSION_MIB
                    ),
                    agents_by_cpu=agents_per_cores(cores=cores, per_session_cores=rate)
                    if rate > 0
                    else None,
                )
            out[name] = entry
        return out

    @classmethod
    def from_json(cls, text: str) -> CapacityReport:
        """Read a report `to_json` wrote."""
        data = json.loads(text)
        return cls(
            config=data["config"],
            machine=data["machine"],
            samples=[CapacitySample(**s) for s in data["samples"]],
        )

    def to_json(self) -> str:
        """The config, machine, summary and every session, as JSON."""
        return json.dumps(
            {
                "config": self.config,
                "machine": self.machine,
                "summary": self.summary(),
                "samples": [asdict(s) for s in self.samples],
            },
            indent=2,
        )

    def to_markdown(self) -> str:
        """The sessions' table, what was measured, and the formula filled in."""
        c, m = self.config, self.machine
        summary = self.summary()
        lines = [
            f"## Capacity: {c['turns']}-turn sessions, {c['runs']} per provider",
            "",
            f"Machine: {m['cpus']} cores, {m['memory_mib'] / 1024:.1f} GiB, {m['platform']}, "
            f"Python {m['python']}. Model: {c['model']}. Each session: {c['turns']} Bash "
            f"tool calls, each running python3 to allocate and touch {c['alloc_mib']} MiB, hash "
            f"it four times, run a CPU loop and write {c['write_mib']} MiB to a new file; then "
            f"a closing text turn. Memory sampled every {c['sample_interval_ms']:g} ms.",
            "",
            *([f"Produced by `{c['command']}`.", ""] if "command" in c else []),
            "| provider | sessions | failed | wall p50 (s) | sandbox peak MiB p50 (max) | "
            "sandbox CPU s p50 | CPU rate p50 (max), cores | sandbay RSS MiB max "
            "(+ per session) | sandbay CPU s p50 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, e in summary.items():
            if "per_session_mib" not in e:
                lines.append(f"| {name} | {e['sessions']} | {e['failures']} |" + " – |" * 6)
                continue
            lines.append(
                f"| {name} | {e['sessions']} | {e['failures']} | {e['wall_s_p50']:.1f} | "
                f"{e['sandbox_peak_mib_p50']:.0f} ({e['sandbox_peak_mib_max']:.0f}) | "
                f"{e['sandbox_cpu_s_p50']:.2f} | {e['cpu_rate_p50']:.2f} ({e['cpu_rate']:.2f}) | "
                f"{e['host_rss_mib_max']:.0f} (+{e['host_mib_per_session_max']:.1f}) | "
                f"{e['host_cpu_s_p50']:.2f} |"
            )
        lines += [
            "",
            "### Agents per host",
            "",
            "The hosting guide's formula, agents per host = (host RAM − overhead) / "
            "per-session ceiling, filled in: RAM is this machine's; overhead is "
            f"{c['reserve_mib']} MiB kept for the OS and other services plus sandbay's own "
            "process (its RSS before a session, median); the ceiling is the largest sandbox "
            "peak plus the most sandbay's process grew during a session. The CPU-bound "
            "counterpart is cores / per-session CPU rate (the largest session's CPU seconds, "
            "sandbox and sandbay, over its wall time).",
            "",
            "| provider | by memory: (RAM − overhead) / ceiling | agents | at the guide's 1 GiB "
            "| by CPU: cores / rate | agents busy at once |",
            "|---|---|---:|---:|---|---:|",
        ]
        ram = m["memory_mib"]
        for name, e in summary.items():
            if "per_session_mib" not in e:
                continue
            by_cpu = e["agents_by_cpu"]
            lines.append(
                f"| {name} | ({ram:.0f} − {e['overhead_mib']:.0f}) / "
                f"{e['per_session_mib']:.0f} MiB | {math.floor(e['agents_by_memory'])} | "
                f"{math.floor(e['agents_at_guide_default'])} | "
                f"{m['cpus']} / {e['cpu_rate']:.2f} | "
                + ("–" if by_cpu is None else f"{by_cpu:.1f}")
                + " |"
            )
        lines += ["", "What is measured:", ""]
        for name, e in summary.items():
            for what, how in e["methods"].items():
                lines.append(f"- {name}, {what}: {how}")
        lines.append(
            "- sandbay's process (host side): VmRSS of its own /proc/self/status, sampled "
            "with the sandbox; CPU from getrusage(RUSAGE_SELF) minus the sampler's thread "
            "time. The scripted model's server runs in this process too, so it is an upper "
            "bound on sandbay's own."
        )
        for name, e in summary.items():
            if e["errors"]:
                lines.append(f"\nFailures on {name}: " + "; ".join(e["errors"]))
        return "\n".join(lines) + "\n"

    def write(self, directory: Path, *, stem: str = "capacity") -> list[Path]:
        """Write ``<stem>.json`` and ``<stem>.md``; returns the paths."""
        directory.mkdir(parents=True, exist_ok=True)
        paths = [directory / f"{stem}.json", directory / f"{stem}.md"]
        paths[0].write_text(self.to_json())
        paths[1].write_text(self.to_markdown())
        return paths
