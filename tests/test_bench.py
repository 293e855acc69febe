"""The benchmark: its statistics, its fresh-sandbox check, and a small real run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

import sandbay
from sandbay._bench import (
    COLD_PHASES,
    RAW_BASELINES,
    WARM_PHASES,
    BenchConfig,
    BenchReport,
    RunSample,
    run_bench,
    stats,
    summarize,
    write_results,
)
from sandbay._bench._baselines import RawTime
from sandbay._bench._running import _check_fresh, _nonce_command

pytestmark = pytest.mark.anyio


def test_stats_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    s = stats(values)
    assert s["min"] == 1 and s["max"] == 100
    assert s["p50"] == 50.5
    assert s["p95"] == 95 and s["p99"] == 99
    assert stats([]) == {}
    assert stats([3.0])["p99"] == 3.0


async def test_fresh_sandbox_check_catches_a_reused_sandbox() -> None:
    async with sandbay.open_sandbox("local") as sb:
        first = await sb.exec(_nonce_command("aaa"))
        _check_fresh(first.stdout, "aaa", set())  # fresh: nothing found
        second = await sb.exec(_nonce_command("bbb"))  # same sandbox again: a cheat
        with pytest.raises(sandbay.SandboxError, match="not fresh"):
            _check_fresh(second.stdout, "bbb", set())


@pytest.mark.parametrize("mode", ["cold", "warm", "burst"])
async def test_a_small_run_reports_every_phase(mode: str, tmp_path: Path) -> None:
    config = BenchConfig(providers=["local"], runs=2, mode=mode, concurrency=2)  # type: ignore[arg-type]
    report = await run_bench(config)
    per_round = 2 if mode == "burst" else 1
    rows = 2 if mode == "warm" else 1  # warm: the handshake done by the pool, or in the run
    assert len(report.samples) == 2 * per_round * rows  # the warm-up round is excluded
    assert all(s.error is None for s in report.samples), [s.error for s in report.samples]
    phases = WARM_PHASES if mode == "warm" else COLD_PHASES
    for sample in report.samples:
        assert set(sample.phases) == set(phases)
        assert all(v >= 0 for v in sample.phases.values())
    assert all(isinstance(s.model_s, float) for s in report.samples)
    summary = report.summary()["local"]
    assert summary["failures"] == 0 and summary["total"]["p50"] > 0
    assert len(report.raw["local"]) == 2 * per_round  # raw baseline: same rounds, same load
    if mode == "cold":  # the bare CLI too: the floor is measured in the same rounds
        assert len(report.cli["local"]) == 2 and summary["ratio_vs_floor"] > 0
        assert summary["floor_to_first_msg"] > max(report.cli["local"]) / 2
    else:
        assert report.cli["local"] == [] and "ratio_vs_floor" not in summary
    paths = write_results(report, tmp_path)
    data = json.loads(paths[0].read_text())
    assert data["machine"]["cpus"] and data["config"]["mode"] == mode
    markdown = paths[1].read_text()
    assert "| local |" in markdown and "cores" in markdown
    assert ("over its floor" in markdown) == (mode == "cold")
    if mode == "warm":
        assert "| local (handshake at take) |" in markdown
    assert any(p.suffix == ".png" and p.stat().st_size > 1000 for p in paths)


async def test_a_label_marks_every_row_of_its_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    # A provider measured against a fake control plane is labelled so in every row: in warm
    # mode also the row whose pool leaves the handshake to the run.
    from sandbay._bench import LABELS

    monkeypatch.setitem(LABELS, "local", "fake control plane: client overhead only")
    report = await run_bench(BenchConfig(providers=["local"], runs=1, mode="warm"))
    markdown = report.to_markdown()
    rows = [line for line in markdown.splitlines() if line.startswith("| local")]
    assert len(rows) >= 4 and any("(handshake at take)" in row for row in rows), markdown
    for row in rows:
        assert row.split("|")[1].strip().endswith("(fake control plane: client overhead only)")


async def test_failures_are_counted_not_dropped() -> None:
    broken = sandbay.SandbayConfig(provider=sandbay.LocalConfig(python="/nonexistent/python"))
    report = await run_bench(BenchConfig(providers=[broken], runs=2, raw_baseline=False))
    summary = report.summary()["local"]
    assert summary["runs"] == 2 and summary["failures"] == 2
    assert "AgentError" in summary["errors"][0]
    assert "Failures on local" in report.to_markdown()


def test_a_report_renders_the_same_after_a_json_round_trip() -> None:
    report = BenchReport(
        config={
            "providers": ["p"],
            "runs": 2,
            "mode": "cold",
            "concurrency": 8,
            "model": "scripted",
        },
        machine={"cpus": 2, "memory_gib": 24, "platform": "x", "python": "3"},
    )
    for total in (1.0, 2.0):
        report.samples.append(RunSample("p", dict.fromkeys(COLD_PHASES, total / 7)))
    report.samples.append(RunSample("p", error="AgentError: boom"))
    report.raw["p"] = [0.1, 0.2]
    report.cli["p"] = [0.4, 0.5]
    again = BenchReport.from_json(report.to_json())
    assert "p 857 / 600 ms = 1.43×" in again.to_markdown()
    assert again.to_markdown() == report.to_markdown()
    assert again.summary()["p"]["failures"] == 1
    assert again.summary()["p"]["create_to_first_msg"]["p50"] > 0


def test_floor_is_raw_create_plus_the_bare_cli_and_the_ratio_divides_by_it() -> None:
    def run(to_first_msg: float) -> RunSample:
        phases = dict.fromkeys(COLD_PHASES, 0.01)
        phases.update(provision=0.1, ready=0.1, inject=0.1, first_msg=to_first_msg - 0.3)
        return RunSample("p", phases)

    samples = [run(1.0), run(1.2), run(1.4)]
    entry = summarize(
        samples,
        mode="cold",
        raw={"p": [0.1, 0.3, 0.2]},
        raw_errors={},
        labels={},
        cli={"p": [0.9, 0.6, 0.7]},
    )["p"]
    assert entry["create_to_first_msg"]["p50"] == pytest.approx(1.2)
    assert entry["floor_to_first_msg"] == pytest.approx(0.2 + 0.7)  # medians, summed
    assert entry["ratio_vs_floor"] == pytest.approx(1.2 / 0.9)
    assert entry["cli_start_to_first_msg"]["p50"] == pytest.approx(0.7)
    # Without the CLI's half there is no floor to divide by.
    bare = summarize(samples, mode="cold", raw={"p": [0.2]}, raw_errors={}, labels={})["p"]
    assert "ratio_vs_floor" not in bare and bare["cli_start_to_first_msg"] == {}


async def test_bare_cli_baseline_runs_the_cli_the_relay_would_to_its_first_message() -> None:
    from claude_agent_sdk import ClaudeAgentOptions

    from sandbay._bench._baselines import cli_start, sandbox_cli
    from sandbay._image import host_cli
    from sandbay.testing import ScriptedModel, Turn

    async with ScriptedModel([Turn.text("hi")] * 2) as model, sandbay.open_sandbox("local") as sb:
        cli = await sandbox_cli(sb)
        assert cli == str(host_cli().path)  # local: the host SDK's own bundled CLI
        seconds = await cli_start(sb, ClaudeAgentOptions(max_turns=1), model.env(), cli=cli)
    assert 0.05 < seconds < 60


_LATE_INIT_CLI = """\
import json, sys, time
print(json.dumps({"type": "control_response", "response": {"subtype": "success"}}), flush=True)
print(json.dumps({"type": "system", "subtype": "session_state_changed", "state": "running",
                  "sdk_host_only": True}), flush=True)
time.sleep(0.6)
print(json.dumps({"type": "system", "subtype": "init"}), flush=True)
sys.stdin.read()
"""


async def test_bare_cli_baseline_stops_where_a_run_does_at_the_first_message_yielded() -> None:
    # The SDK passes on neither the answer to its initialize nor a session_state_changed
    # the CLI sends for it alone: the floor must not stop at them when a run cannot.
    from claude_agent_sdk import ClaudeAgentOptions

    from sandbay._bench._baselines import cli_start

    async with sandbay.open_sandbox("local") as sb:
        await sb.write_file("late-init", f"#!{sb.python}\n{_LATE_INIT_CLI}".encode(), mode=0o755)
        cli = f"{sb.workdir}/late-init"
        seconds = await cli_start(sb, ClaudeAgentOptions(max_turns=1), {}, cli=cli)
    assert 0.6 <= seconds < 30


def test_percentiles_are_nearest_rank() -> None:
    # 20 samples: p95 is the 19th smallest, p99 the 20th; the median averages the middle two.
    twenty = [float(v) for v in range(20, 0, -1)]
    s = stats(twenty)
    assert (s["p95"], s["p99"], s["p50"], s["n"]) == (19.0, 20.0, 10.5, 20)
    # 10 samples: ceil(9.5) = 10, so p95 is already the largest; an odd count has a middle one.
    ten = stats([float(v) for v in range(1, 11)])
    assert ten["p95"] == ten["p99"] == 10.0
    assert stats([5.0, 1.0, 3.0])["p50"] == 3.0
    # Nearest rank picks a sample, never interpolates between two.
    gap = stats([1.0] * 18 + [100.0, 1000.0])
    assert gap["p95"] == 100.0 and gap["p99"] == 1000.0


def test_summary_counts_failures_and_keeps_them_out_of_timings() -> None:
    phases = dict.fromkeys(COLD_PHASES, 0.1)
    samples = [
        RunSample("a", dict(phases), model_s=0.05),
        RunSample("a", {**phases, "provision": 0.5}),
        RunSample("a", error="AgentError: boom"),
        RunSample("a", error="AgentError: boom"),
        RunSample("a", error="SandboxTimeoutError: late"),
        RunSample("b", error="ProviderUnavailableError: down"),
    ]
    summary = summarize(
        samples, mode="cold", raw={"a": [0.1, 0.3]}, raw_errors={"a": 1}, labels={"b": "fake"}
    )
    a, b = summary["a"], summary["b"]
    assert (a["runs"], a["failures"]) == (5, 3)
    assert a["errors"] == ["AgentError: boom", "SandboxTimeoutError: late"]  # distinct, sorted
    assert a["phases"]["provision"]["n"] == 2 and a["phases"]["provision"]["max"] == 0.5
    assert a["total"]["min"] == pytest.approx(0.7) and a["total"]["n"] == 2
    assert a["model"]["n"] == 1 and a["raw_failures"] == 1
    # create → first exec: median of (0.2, 0.6) over the raw median (0.2)
    assert a["ratio_vs_raw"] == pytest.approx(0.4 / 0.2)
    assert (b["runs"], b["failures"], b["label"]) == (1, 1, "fake")
    assert b["total"] == {} and "ratio_vs_raw" not in b


def test_warm_summary_subtracts_the_agents_own_time() -> None:
    phases = {**dict.fromkeys(WARM_PHASES, 0.0), "acquire": 0.01, "first_msg": 0.09}
    sample = RunSample("a", phases, agent_first_msg_s=0.08)
    a = summarize([sample], mode="warm", raw={}, raw_errors={}, labels={})["a"]
    assert a["acquire_to_first_msg"]["p50"] == pytest.approx(0.1)
    assert a["sandbay_overhead_to_first_msg"]["p50"] == pytest.approx(0.02)
    assert "create_to_first_exec" not in a


def test_raw_baselines_live_in_the_benchmark_not_on_the_provider() -> None:
    assert not hasattr(sandbay.Provider, "raw_create_exec")
    assert not hasattr(sandbay.Provider, "bench_label")
    assert {"local", "docker"} <= set(RAW_BASELINES)


async def test_local_raw_baseline_times_a_folder_and_one_process() -> None:
    config = sandbay.SandbayConfig(provider=sandbay.LocalConfig())
    seconds = await RAW_BASELINES["local"](config, sandbay.SandboxSpec())
    assert 0 < seconds < 10


def test_docker_raw_baseline_applies_sandbays_default_limits() -> None:
    from sandbay._bench._baselines import _docker_run_options

    defaults = _docker_run_options(sandbay.DockerConfig(), sandbay.SandboxSpec())
    assert defaults == {"detach": True, "nano_cpus": 10**9, "mem_limit": "1024m"}
    spec = sandbay.SandboxSpec(cpu=0.5, memory_mb=256, network="none")
    assert _docker_run_options(sandbay.DockerConfig(cpu=2), spec) == {
        "detach": True,
        "nano_cpus": 5 * 10**8,
        "mem_limit": "256m",
        "network_mode": "none",
    }


@pytest.mark.docker
async def test_docker_raw_baseline_runs_and_maps_errors() -> None:
    config = sandbay.SandbayConfig(provider=sandbay.DockerConfig())
    seconds = await RAW_BASELINES["docker"](config, sandbay.SandboxSpec(network="none"))
    assert 0 < seconds < 60
    # SDK errors become sandbay's, which the benchmark counts as failed baselines.
    gone = sandbay.SandbayConfig(
        provider=sandbay.DockerConfig(base_url="unix:///tmp/sandbay-no-such-docker.sock")
    )
    with pytest.raises(sandbay.ProviderUnavailableError):
        await RAW_BASELINES["docker"](gone, sandbay.SandboxSpec(image="any", network="none"))


def test_run_timings_are_a_record_and_dict_access_is_deprecated() -> None:
    timings = sandbay.RunTimings(start=1.0, request=2.5)
    assert timings.request == 2.5 and timings.result is None
    assert timings.as_dict() == {"start": 1.0, "request": 2.5}
    with pytest.raises(AttributeError):
        timings.start = 3.0  # type: ignore[misc]
    with pytest.warns(DeprecationWarning, match="run.timings.first_message"):
        assert timings["request"] == 2.5
    with pytest.warns(DeprecationWarning), pytest.raises(KeyError):
        timings["result"]
    with pytest.warns(DeprecationWarning):
        assert "start" in timings and timings.get("closed") is None
    with pytest.warns(DeprecationWarning):
        assert dict(timings.items()) == {"start": 1.0, "request": 2.5}


# --- staggered mode ---------------------------------------------------------------------


async def test_staggered_launches_are_spaced_from_the_rounds_own_clock() -> None:
    from sandbay._bench._running import _launch

    seen: list[tuple[int, float]] = []

    async def run(index: int, offset: float) -> None:
        seen.append((index, offset))
        if index == 0:
            await anyio.sleep(0.2)  # a slow run does not push later launches back

    offsets = await _launch(4, 0.05, run)
    assert sorted(i for i, _ in seen) == [0, 1, 2, 3]
    assert offsets == [o for _, o in sorted(seen)]
    # Each launch waits for its own time on the round's clock, never less (1 ms of clock slack).
    assert offsets[0] < 0.01
    for index, offset in enumerate(offsets):
        assert offset >= index * 0.05 - 0.001
    assert offsets == sorted(offsets)
    # interval 0: a burst, every run launched before any yields
    assert len(await _launch(3, 0.0, run)) == 3


async def test_a_small_staggered_run_records_each_launch(tmp_path: Path) -> None:
    config = BenchConfig(
        providers=["local"], runs=1, mode="staggered", concurrency=2, stagger_ms=300
    )
    report = await run_bench(config)
    assert report.config["stagger_ms"] == 300
    assert len(report.samples) == 2  # one round of two, after the warm-up round
    assert all(s.error is None for s in report.samples), [s.error for s in report.samples]
    assert [s.launch_index for s in report.samples] == [0, 1]
    first, second = (s.launch_offset_s for s in report.samples)
    assert first is not None and second is not None and second >= 0.299
    for sample in report.samples:
        assert set(sample.phases) == set(COLD_PHASES)
    summary = report.summary()["local"]
    assert [step["index"] for step in summary["ramp"]] == [0, 1]
    assert summary["launch_offset"]["n"] == 2
    assert len(report.raw["local"]) == 2 and report.cli["local"] == []
    paths = write_results(report, tmp_path)
    assert paths[0].name == "staggered-local.json"
    assert "launches 300 ms apart" in paths[1].read_text()
    assert any(p.suffix == ".png" and p.stat().st_size > 1000 for p in paths)


def _staggered_report(stagger_ms: float) -> BenchReport:
    report = BenchReport(
        config={
            "providers": ["p"],
            "runs": 2,
            "mode": "staggered",
            "concurrency": 3,
            "model": "scripted",
            "stagger_ms": stagger_ms,
        },
        machine={"cpus": 2, "memory_gib": 24, "platform": "x", "python": "3"},
    )
    for round_no in range(2):
        for index in range(3):
            phases = dict.fromkeys(COLD_PHASES, 0.1 + 0.1 * index + 0.01 * round_no)
            report.samples.append(
                RunSample("p", phases, launch_index=index, launch_offset_s=index * 0.25)
            )
    return report


def test_staggered_rendering_carries_the_interval_in_every_table() -> None:
    report = _staggered_report(250)
    markdown = report.to_markdown()
    assert markdown.startswith("## staggered start, 2 rounds per provider, rounds of 3 launches")
    assert "launches 250 ms apart" in markdown.splitlines()[0]
    tables = [block for block in markdown.split("\n\n") if block.startswith("| ")]
    assert len(tables) == 3  # phases, distributions, ramp
    for table in tables:
        header, _, *rows = table.splitlines()
        assert "interval (ms)" in header
        assert rows and all(row.split(" | ")[1] == "250" for row in rows), table
    assert "| p | 250 | launch offset (measured) | 0 | 250 | 500 | 500 | 500 |" in markdown
    # The ramp: launch 3 (offset 500 ms) took 7 phases of 0.3 s (round 0) and 0.31 s (round 1).
    assert "| p | 250 | 3 | 500 | 1220 | 2135 |" in markdown
    again = BenchReport.from_json(report.to_json())
    assert again.to_markdown() == markdown
    assert json.loads(report.to_json())["config"]["stagger_ms"] == 250
    # Other modes keep their tables as they were: no interval column.
    report.config["mode"] = "burst"
    assert "interval" not in report.to_markdown()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"mode": "staggered", "stagger_ms": -1}, "between 0 and 60000"),
        ({"mode": "staggered", "stagger_ms": float("nan")}, "between 0 and 60000"),
        ({"mode": "staggered", "stagger_ms": float("inf")}, "between 0 and 60000"),
        ({"mode": "staggered", "stagger_ms": 120_000}, "between 0 and 60000"),
        ({"mode": "staggered", "stagger_ms": "200"}, "number of milliseconds"),
        ({"mode": "burst", "stagger_ms": 200}, "staggered mode only"),
        ({"mode": "cold", "stagger_ms": 0}, "staggered mode only"),
        ({"mode": "sideways"}, "unknown bench mode 'sideways'"),
        ({"mode": "staggered", "concurrency": 0}, "concurrency must be at least 1"),
        ({"runs": 0}, "runs must be at least 1"),
    ],
)
async def test_bad_bench_settings_are_config_errors_before_anything_runs(
    settings: dict[str, Any], message: str
) -> None:
    config = BenchConfig(providers=["local"], **settings)
    with pytest.raises(sandbay.ConfigError, match=message):
        await run_bench(config)


def test_the_staggered_interval_defaults_to_computesdks() -> None:
    assert BenchConfig(providers=["local"], mode="staggered").interval_s == 0.2
    assert BenchConfig(providers=["local"], mode="staggered", stagger_ms=0).interval_s == 0
    assert BenchConfig(providers=["local"], mode="burst").interval_s == 0


# --- capacity ---------------------------------------------------------------------------


def test_agents_per_host_is_the_guides_formula() -> None:
    from sandbay._bench import agents_per_cores, agents_per_host

    # (host RAM − overhead) / per-session ceiling
    assert agents_per_host(host_ram_mib=16384, overhead_mib=1124, per_session_mib=512) == (
        pytest.approx((16384 - 1124) / 512)
    )
    assert agents_per_host(host_ram_mib=1000, overhead_mib=2000, per_session_mib=100) == 0
    assert agents_per_cores(cores=2, per_session_cores=0.5) == 4
    with pytest.raises(sandbay.ConfigError, match="ceiling must be above 0"):
        agents_per_host(host_ram_mib=1000, overhead_mib=0, per_session_mib=0)
    with pytest.raises(sandbay.ConfigError, match="CPU rate must be above 0"):
        agents_per_cores(cores=2, per_session_cores=0)


def test_capacity_summary_fills_the_formula_from_the_sessions() -> None:
    from sandbay._bench import CapacityReport, CapacitySample

    report = CapacityReport(
        config={
            "providers": ["p"],
            "runs": 3,
            "turns": 6,
            "alloc_mib": 64,
            "write_mib": 4,
            "reserve_mib": 1000,
            "sample_interval_ms": 50,
            "model": "scripted",
        },
        machine={"cpus": 2, "memory_mib": 9000.0, "platform": "x", "python": "3"},
    )

    def session(peak: float, cpu: float, rss: tuple[float, float]) -> CapacitySample:
        return CapacitySample(
            "p",
            kind="local",
            wall_s=10.0,
            turns_done=6,
            sandbox_peak_mib=peak,
            sandbox_cpu_s=cpu,
            host_rss_start_mib=rss[0],
            host_rss_peak_mib=rss[1],
            host_cpu_s=1.0,
        )

    report.samples += [
        session(300, 4.0, (80, 82)),
        session(450, 6.0, (70, 71)),
        session(400, 3.0, (90, 90)),
    ]
    report.samples.append(CapacitySample("p", kind="local", error="AgentError: boom"))
    entry = report.summary()["p"]
    assert (entry["sessions"], entry["failures"]) == (4, 1)
    assert entry["per_session_mib"] == 450 + 2  # largest peak + most sandbay grew
    assert entry["overhead_mib"] == 1000 + 80  # reserve + sandbay's median RSS
    assert entry["cpu_rate"] == pytest.approx(0.7)  # (6 + 1) / 10, the largest
    assert entry["agents_by_memory"] == pytest.approx((9000 - 1080) / 452)
    assert entry["agents_at_guide_default"] == pytest.approx((9000 - 1080) / 1024)
    assert entry["agents_by_cpu"] == pytest.approx(2 / 0.7)
    markdown = report.to_markdown()
    assert "| p | (9000 − 1080) / 452 MiB | 17 | 7 | 2 / 0.70 | 2.9 |" in markdown
    assert "getrusage(RUSAGE_CHILDREN)" in markdown and "Failures on p: AgentError" in markdown
    assert CapacityReport.from_json(report.to_json()).to_markdown() == markdown


async def test_a_short_local_session_is_measured(tmp_path: Path) -> None:
    from sandbay._bench import CapacityConfig, run_capacity

    config = CapacityConfig(
        providers=["local"], runs=1, turns=2, alloc_mib=300, write_mib=1, warmup=False
    )
    report = await run_capacity(config)
    (sample,) = report.samples
    assert sample.error is None, sample.error
    assert sample.turns_done == 2  # the model got both turns' output back
    # The tree's peak holds the 300 MiB python3 allocated, on top of the CLI's own.
    assert sample.sandbox_peak_mib >= 300 and sample.memory_samples >= 2
    # CPU: the work (hashing 4 × 300 MiB twice) took CPU, and no more than the cores allow.
    assert sample.sandbox_cpu_s > 0 and sample.host_cpu_s > 0
    assert 0 < sample.cpu_rate <= (os.cpu_count() or 1) * 1.05
    assert 10 < sample.host_rss_start_mib <= sample.host_rss_peak_mib
    entry = report.summary()["local"]
    assert entry["per_session_mib"] >= sample.sandbox_peak_mib
    ram = report.machine["memory_mib"]
    assert entry["agents_by_memory"] == pytest.approx(
        (ram - entry["overhead_mib"]) / entry["per_session_mib"]
    )
    paths = report.write(tmp_path)
    assert [p.name for p in paths] == ["capacity.json", "capacity.md"]
    assert "agents per host = (host RAM − overhead) / per-session ceiling" in paths[1].read_text()
    assert json.loads(paths[0].read_text())["samples"][0]["turns_done"] == 2


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"turns": 0}, "turns must be a whole number from 1"),
        ({"alloc_mib": -1}, "alloc_mib must be a whole number from 0"),
        ({"runs": 1.5}, "runs must be a whole number"),
        ({"sample_interval_s": 0}, "sample_interval_s must be 0.005 to 10"),
        ({"providers": ["e2b"]}, "not 'e2b'"),
    ],
)
async def test_capacity_refuses_bad_settings_before_anything_runs(
    settings: dict[str, Any], message: str
) -> None:
    from sandbay._bench import CapacityConfig, run_capacity

    config = CapacityConfig(**{"providers": ["local"], **settings})
    with pytest.raises(sandbay.ConfigError, match=message):
        await run_capacity(config)


def _bench_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "SANDBAY_"))}
    return subprocess.run(
        [sys.executable, "-m", "sandbay", "bench", "--providers", "local", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "cold", "--stagger-ms", "100"], "applies to the staggered mode only"),
        (["--mode", "staggered", "--stagger-ms", "-5"], "between 0 and 60000"),
        (["--mode", "burst", "--turns", "3"], "--turns applies to --mode capacity only"),
        (["--mode", "capacity", "--stagger-ms", "100"], "--stagger-ms applies to --mode staggered"),
        (["--mode", "capacity", "--alloc-mib", "-1"], "alloc_mib must be a whole number"),
    ],
)
def test_bench_cli_refuses_settings_of_another_mode(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = _bench_cli(tmp_path, *args)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert not (tmp_path / "benchmarks").exists()  # refused before anything ran


def test_bench_cli_capacity_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = _bench_cli(
        tmp_path, "--mode", "capacity", "--runs", "1", "--turns", "1", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert "agents per host" in result.stdout
    data = json.loads((out / "capacity.json").read_text())
    assert data["config"]["turns"] == 1 and len(data["samples"]) == 1
    assert data["samples"][0]["error"] is None and data["samples"][0]["sandbox_peak_mib"] > 0


@pytest.mark.docker
async def test_a_short_docker_session_reads_the_containers_cgroup() -> None:
    from sandbay._bench import CapacityConfig, run_capacity

    config = CapacityConfig(
        providers=["docker"], runs=1, turns=1, alloc_mib=128, write_mib=1, warmup=False
    )
    (sample,) = (await run_capacity(config)).samples
    assert sample.error is None, sample.error
    assert sample.turns_done == 1
    # The cgroup's high-water mark saw the 128 MiB python3 wrote, whatever the sampling missed.
    assert sample.sandbox_peak_mib >= 128
    assert 0 < sample.sandbox_cpu_s and 0 < sample.cpu_rate <= (os.cpu_count() or 1) * 1.05


# --- raw baselines of the cloud providers, each against its fake control plane ---

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="the fake needs bwrap")


def _timed_apart(seconds: float) -> RawTime:
    assert isinstance(seconds, RawTime)
    assert seconds.create > 0 and seconds.first_exec > 0
    assert float(seconds) == pytest.approx(seconds.create + seconds.first_exec)
    assert 0 < seconds < 60
    return seconds


@needs_bwrap
async def test_e2b_raw_baseline_runs_on_the_sdk_and_kills_its_sandbox() -> None:
    from e2b_fake import FakeE2B

    with FakeE2B() as fake:
        config = sandbay.SandbayConfig(provider=fake.config(template=None))
        _timed_apart(await RAW_BASELINES["e2b"](config, sandbay.SandboxSpec(network="host")))
        assert fake.creates == 1 and fake.sandboxes == {} and len(fake.killed) == 1
        assert any(cmd.endswith("true") for cmd in fake.started)
        # A first exec that fails still kills the sandbox, and the error is sandbay's.
        with pytest.raises(sandbay.SandboxError):
            await RAW_BASELINES["e2b"](config, sandbay.SandboxSpec(user="no-such-user"))
        assert fake.creates == 2 and fake.sandboxes == {} and len(fake.killed) == 2


@pytest.mark.docker
async def test_modal_raw_baseline_runs_on_the_sdk_and_terminates_its_sandbox() -> None:
    import anyio

    from fakes.modal import FakeModal
    from modal_support import agent_image, fake_config

    with FakeModal(await anyio.to_thread.run_sync(agent_image)) as fake:
        config = sandbay.SandbayConfig(provider=fake_config(fake))
        spec = sandbay.SandboxSpec(network="host", cpu=0.5, memory_mb=512)
        _timed_apart(await RAW_BASELINES["modal"](config, spec))
        assert fake.live_sandboxes() == []
        (made,) = fake._sandboxes.values()
        assert made.definition.resources.milli_cpu == 500
        assert made.definition.resources.memory_mb_max == 512


@needs_bwrap
async def test_daytona_raw_baseline_runs_on_the_sdk_and_deletes_its_sandbox() -> None:
    from pydantic import SecretStr

    from fakes.daytona import FakeDaytona

    with FakeDaytona() as fake:
        provider = sandbay.DaytonaConfig(
            api_key=SecretStr(fake.api_key), api_url=fake.api_url, host_network=True
        )
        config = sandbay.SandbayConfig(provider=provider)
        _timed_apart(await RAW_BASELINES["daytona"](config, sandbay.SandboxSpec(network="host")))
        assert fake.sandbox_ids() == []
        assert [m for m, p in fake.requests if p.endswith("/process/execute")] == ["POST"]
        assert [m for m, p in fake.requests if p == "/api/sandbox"] == ["POST"]


def test_phase_split_sets_each_raw_step_beside_sandbays_phase(tmp_path: Path) -> None:
    config = {"mode": "cold", "runs": 2, "model": "scripted", "providers": ["p"], "concurrency": 1}
    report = BenchReport(config=config, machine={})
    report.machine = {"cpus": 2, "memory_gib": 1, "platform": "x", "python": "3"}
    phases = dict.fromkeys(COLD_PHASES, 0.01)
    report.samples = [
        RunSample("p", phases={**phases, "provision": 0.3, "ready": 0.1}),
        RunSample("p", phases={**phases, "provision": 0.5, "ready": 0.3}),
        RunSample("p", error="boom"),
    ]
    report.raw = {"p": [RawTime(0.2, 0.05), RawTime(0.3, 0.15)], "q": [0.1]}
    report.raw_phases = {
        "p": [{"create": 0.2, "first_exec": 0.05}, {"create": 0.3, "first_exec": 0.15}]
    }
    report.labels = {"p": "fake"}
    split = report.phase_split()
    assert set(split) == {"p"}  # q's baseline timed only the whole
    p = split["p"]
    assert p["provision"] == pytest.approx(0.4) and p["raw_create"] == pytest.approx(0.25)
    assert p["provision_overhead"] == pytest.approx(0.15)
    assert p["ready"] == pytest.approx(0.2) and p["raw_first_exec"] == pytest.approx(0.1)
    assert p["ready_overhead"] == pytest.approx(0.1)
    # The ratio over the raw SDK still divides by the whole: a RawTime is its sum.
    assert report.summary()["p"]["ratio_vs_raw"] == pytest.approx(0.6 / 0.35)
    paths = write_results(report, tmp_path)
    data = json.loads(paths[0].read_text())
    assert data["phase_split"]["p"]["raw_create"] == pytest.approx(0.25)
    assert data["raw_phases"]["p"][1] == {"create": 0.3, "first_exec": 0.15}
    assert data["raw"]["p"] == [pytest.approx(0.25), pytest.approx(0.45)]
    row = "| p (fake) | 400 | 250 | 150 | 200 | 100 | 100 |"
    assert row in paths[1].read_text()
    # Rendered again from its JSON, the report keeps the split.
    assert row in BenchReport.from_json(paths[0].read_text()).to_markdown()
    report.raw_phases = {}
    assert "Client-side overhead per phase" not in report.to_markdown()
