"""Running the cold-start benchmark: rounds of runs per provider, each phase timed.

Each run times phases with a monotonic clock (`time.perf_counter`):

========== =================================================================================
provision  create requested → the provider accepted it and returned a sandbox
ready      → the first exec returned (it writes the run's nonce: the fresh-sandbox check)
inject     → sandbay's relay uploaded and started, and with it the CLI
first_msg  → the first agent message arrived (``system/init``)
first_asst → the first assistant message arrived (includes the model's first answer)
result     → the result message arrived
teardown   → the sandbox is removed
========== =================================================================================

In ``warm`` mode a `SandboxPool` has done provision, ready, the CLI's start-up and the SDK's
initialize handshake ahead of time: ``acquire`` (take a ready sandbox) replaces provision and
ready, and the fresh-sandbox check runs after the result, off the critical path. A second
row per provider (`AT_TAKE`) takes from a pool made with ``initialize=False``: its runs do
the handshake after they take the sandbox. ``burst`` starts K cold runs at once;
``staggered`` starts K cold runs one fixed interval apart (`BenchConfig.stagger_ms`), as
computesdk's staggered mode does, so load ramps up instead of arriving at once. Each run
records when it was launched (``launch_offset_s``, measured from the round's start), and the
report keeps each launch's time beside its offset: how a run degrades as more runs overlap.

Providers are interleaved run by run (their order rotating), one warm-up run each is
excluded, and failures are counted, not dropped. A raw baseline (create → first exec with
the provider's own SDK, `RAW_BASELINES`) runs in the same rounds, so the report shows
sandbay's overhead as a ratio measured side by side. In ``cold`` mode so does the bare CLI's
start → first message in an already running sandbox (`cli_start`): raw create → first exec
plus that is the floor a cold create → first agent message is held to (``ratio_vs_floor``).
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
from claude_agent_sdk import ClaudeAgentOptions, ResultMessage

from .._agent import RunTimings, run_agent
from .._api import create_sandbox
from .._config import SandbayConfig, parse_config
from .._errors import ConfigError, SandboxError
from .._pool import SandboxPool
from .._sandbox import SandboxSpec
from ._baselines import LABELS, RAW_BASELINES, RawTime, cli_start, sandbox_cli
from ._report import BenchReport, machine_info
from ._samples import RunSample

__all__ = ["DEFAULT_STAGGER_MS", "MODES", "BenchConfig", "Mode", "check_config", "run_bench"]

Mode = Literal["cold", "warm", "burst", "staggered"]
MODES: tuple[Mode, ...] = ("cold", "warm", "burst", "staggered")
#: computesdk's default interval between staggered launches.
DEFAULT_STAGGER_MS = 200.0
PROMPT = "Run `echo benchmark` and report what it printed."
NONCE_GLOB = ".sandbay-bench-nonce-"
#: Seconds a full warm pool is left idle before a measured run, so the last refill settles.
WARM_SETTLE_S = 1.0
#: Suffix of the warm row whose pool leaves the SDK's handshake to the run.
AT_TAKE = " (handshake at take)"


@dataclass
class BenchConfig:
    """What to measure.

    Attributes:
        providers: Provider names or configs, measured side by side.
        runs: Measured runs per provider (after one warm-up run).
        mode: ``cold``, ``warm``, ``burst`` or ``staggered``.
        concurrency: Runs per round in ``burst`` (all at once) and ``staggered`` (one
            ``stagger_ms`` apart) mode; pool concurrency in ``warm``.
        model: ``scripted`` (the loopback scripted model) or ``real`` (your API key).
        spec: Spec for every sandbox (``network`` is forced to ``host`` with the scripted
            model, which listens on the host's loopback).
        raw_baseline: Also time create → first exec with each provider's own SDK.
        cli_baseline: In ``cold`` mode, also time the bare CLI's start → first message in a
            running sandbox (the second half of the floor).
        stagger_ms: Milliseconds between launches in ``staggered`` mode (computesdk's
            default, 200, unless set); only that mode takes it.
    """

    providers: Sequence[str | SandbayConfig]
    runs: int = 10
    mode: Mode = "cold"
    concurrency: int = 8
    model: Literal["scripted", "real"] = "scripted"
    spec: SandboxSpec = field(default_factory=SandboxSpec)
    raw_baseline: bool = True
    cli_baseline: bool = True
    stagger_ms: float | None = None

    @property
    def interval_s(self) -> float:
        """Seconds between launches: the staggered interval, 0 (all at once) otherwise."""
        if self.mode != "staggered":
            return 0.0
        return (DEFAULT_STAGGER_MS if self.stagger_ms is None else self.stagger_ms) / 1000


def check_config(config: BenchConfig) -> None:
    """Refuse settings the benchmark cannot run, before anything starts.

    Raises:
        ConfigError: Saying which setting is wrong and what it takes.
    """
    if config.mode not in MODES:
        raise ConfigError(f"unknown bench mode {config.mode!r}: use one of {', '.join(MODES)}")
    if config.runs < 1:
        raise ConfigError(f"runs must be at least 1, got {config.runs}")
    if config.concurrency < 1:
        raise ConfigError(f"concurrency must be at least 1, got {config.concurrency}")
    if config.stagger_ms is None:
        return
    if config.mode != "staggered":
        raise ConfigError(
            f"stagger_ms (--stagger-ms) applies to the staggered mode only, not "
            f"{config.mode!r}: leave it unset, or use the staggered mode"
        )
    if isinstance(config.stagger_ms, bool) or not isinstance(config.stagger_ms, (int, float)):
        raise ConfigError(f"stagger_ms must be a number of milliseconds, got {config.stagger_ms!r}")
    if not math.isfinite(config.stagger_ms) or not 0 <= config.stagger_ms <= 60_000:
        raise ConfigError(
            f"stagger_ms must be between 0 and 60000 milliseconds, got {config.stagger_ms}"
        )


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


def provider_configs(
    providers: Sequence[str | SandbayConfig],
) -> tuple[list[SandbayConfig], list[str]]:
    """Each provider as a config (a name gets that provider's defaults), and the name each is
    reported under (``docker#1`` where one type is measured twice)."""
    configs = [
        p if isinstance(p, SandbayConfig) else parse_config({"provider": {"type": p}})
        for p in providers
    ]
    names = [c.provider.type for c in configs]
    if len(set(names)) != len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    return configs, names


async def run_bench(
    config: BenchConfig, *, progress: Callable[[int, str], _Progress] | None = None
) -> BenchReport:
    """Run the benchmark and return its report.

    Raises:
        ConfigError: Unknown provider or bad settings.
    """
    from ..testing import ScriptedModel

    check_config(config)
    configs, names = provider_configs(config.providers)
    report = BenchReport(
        config={
            "providers": names,
            "runs": config.runs,
            "mode": config.mode,
            "concurrency": config.concurrency,
            "model": config.model,
            **({"stagger_ms": config.interval_s * 1000} if config.mode == "staggered" else {}),
        },
        machine=machine_info(),
    )
    for name, cfg in zip(names, configs, strict=True):
        report.labels[name] = LABELS.get(cfg.provider.type, "")
        if config.mode == "warm":  # the pool's second row is the same provider's
            report.labels[name + AT_TAKE] = report.labels[name]
        report.raw[name] = []
        report.raw_errors[name] = 0
        report.cli[name] = []

    per_round = config.concurrency if config.mode in ("burst", "staggered") else 1
    model = None
    env: dict[str, str] = {}
    spec = config.spec
    if config.model == "scripted":
        model = ScriptedModel(_bench_script(2 * len(names) * (config.runs + 1) * per_round + 16))
        model.start()
        env = model.env()
        spec = spec.model_copy(update={"network": "host"})
    # The benchmark's script answers in text only; allowed_tools is all a run needs, on every
    # provider (bypassPermissions is for isolated sandboxes only).
    options = ClaudeAgentOptions(max_turns=3, allowed_tools=["Bash"])
    with_cli = config.cli_baseline and config.mode == "cold"
    samples_per_round = 2 if config.mode == "warm" else per_round
    bar = (progress or _Progress)(
        len(names)
        * (config.runs + 1)
        * (samples_per_round + per_round * (int(config.raw_baseline) + int(with_cli))),
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
                    pools[name + AT_TAKE] = await stack.enter_async_context(
                        SandboxPool(
                            cfg,
                            spec,
                            size=2,
                            concurrency=2,
                            options=options,
                            env=env,
                            initialize=False,
                        )
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
                        # Under the same load as the runs: K at once in burst mode, K
                        # one interval apart in staggered mode.
                        for raw in await _raw_round(cfg, spec, per_round, config.interval_s):
                            bar.step(f"{name} raw")
                            if warmup:
                                continue
                            if raw is None:
                                report.raw_errors[name] += 1
                            elif raw >= 0:
                                report.raw[name].append(raw)
                                if isinstance(raw, RawTime):
                                    report.raw_phases.setdefault(name, []).append(
                                        {"create": raw.create, "first_exec": raw.first_exec}
                                    )
                    if with_cli:
                        cli = await _cli_round(cfg, spec, options, env)
                        bar.step(f"{name} cli")
                        if warmup:
                            continue
                        if cli is None:
                            report.raw_errors[name] += 1
                        else:
                            report.cli[name].append(cli)
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
        return [
            await _warm_run(name, pools[name], seen),
            await _warm_run(name + AT_TAKE, pools[name + AT_TAKE], seen),
        ]
    if config.mode == "cold":
        return [await _cold_run(name, cfg, spec, options, env, seen)]
    samples: list[RunSample] = []

    async def one(index: int, offset: float) -> None:
        sample = await _cold_run(name, cfg, spec, options, env, seen)
        sample.launch_index, sample.launch_offset_s = index, offset
        samples.append(sample)

    await _launch(config.concurrency, config.interval_s, one)
    return sorted(samples, key=lambda s: s.launch_index or 0)


async def _launch(
    count: int, interval_s: float, run: Callable[[int, float], Coroutine[Any, Any, None]]
) -> list[float]:
    """Start ``count`` runs ``interval_s`` apart (all at once for 0); wait for all of them.

    Each run gets its launch index and its measured launch offset: seconds from the first
    launch to its own, as the clock saw it (under load a launch can start late; the report
    shows when it did start, not when it was meant to). Returns the offsets, in launch order.
    """
    offsets: list[float] = []
    async with anyio.create_task_group() as tg:
        started = time.perf_counter()
        for index in range(count):
            if interval_s and index:
                # Sleep until this launch's time on the round's clock, so that a late launch
                # does not push every later one back.
                await anyio.sleep(max(0.0, started + index * interval_s - time.perf_counter()))
            offsets.append(time.perf_counter() - started)
            tg.start_soon(run, index, offsets[-1])
    return offsets


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
        tm = _Reached(run.timings)
        sample.agent_first_msg_s = _agent_first_msg(run.sandbox_timings)
        await sandbox.aclose()
        t3 = time.perf_counter()
        sample.phases = {
            "provision": t1 - t0,
            "ready": t2 - t1,
            "inject": tm.request - t2,
            "first_msg": tm.first_message - tm.request,
            "first_asst": tm.first_assistant - tm.first_message,
            "result": tm.result - tm.first_assistant,
            "teardown": t3 - tm.result,
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
        tm = _Reached(run.timings)
        sample.agent_first_msg_s = _agent_first_msg(run.sandbox_timings)
        sample.phases = {
            "acquire": tm.sandbox - tm.start,
            "inject": tm.request - tm.sandbox,
            "first_msg": tm.first_message - tm.request,
            "first_asst": tm.first_assistant - tm.first_message,
            "result": tm.result - tm.first_assistant,
            "teardown": tm.closed - checked_at,
        }
    except (SandboxError, OSError, KeyError, TimeoutError) as exc:
        sample.error = f"{type(exc).__name__}: {exc}"[:300]
    return sample


class _Reached:
    """A run's milestones as floats; `KeyError` (a failed sample) for one it never reached."""

    def __init__(self, timings: RunTimings) -> None:
        self._timings = timings

    def __getattr__(self, milestone: str) -> float:
        value: float | None = getattr(self._timings, milestone)
        if value is None:
            raise KeyError(f"the run never reached {milestone!r}")
        return value


def _agent_first_msg(timings: dict[str, float]) -> float | None:
    """The CLI's own prompt → first message, timed by the relay in the sandbox: from passing
    the prompt to the CLI's stdin to the CLI's first line the SDK passes on."""
    start, end = timings.get("prompt_in_ms"), timings.get("first_message_ms")
    return None if start is None or end is None else (end - start) / 1000


async def _cli_round(
    cfg: SandbayConfig, spec: SandboxSpec, options: ClaudeAgentOptions, env: dict[str, str]
) -> float | None:
    """The bare CLI's start → first message in a fresh sandbox, created and warmed untimed."""
    try:
        async with await create_sandbox(cfg, spec) as sandbox:
            cli = await sandbox_cli(sandbox)  # also the sandbox's first exec
            return await cli_start(sandbox, options, env, cli=cli)
    except (SandboxError, OSError, ValueError):
        return None


async def _raw_round(
    cfg: SandbayConfig, spec: SandboxSpec, count: int, interval_s: float = 0.0
) -> list[float | None]:
    """``count`` raw baselines, started at once or ``interval_s`` apart."""
    results: list[float | None] = []

    async def one(index: int, offset: float) -> None:
        results.append(await _raw(cfg, spec))

    await _launch(count, interval_s, one)
    return results


async def _raw(cfg: SandbayConfig, spec: SandboxSpec) -> float | None:
    """Seconds for create → first exec with the provider's own SDK; -1 if it has none."""
    baseline = RAW_BASELINES.get(cfg.provider.type)
    if baseline is None:
        return -1.0
    try:
        return await baseline(cfg, spec)
    except (SandboxError, OSError):
        return None
