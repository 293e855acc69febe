"""The benchmark: its statistics, its fresh-sandbox check, and a small real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import sandbay
from sandbay._bench import (
    COLD_PHASES,
    WARM_PHASES,
    BenchConfig,
    _check_fresh,
    _nonce_command,
    run_bench,
    stats,
    write_results,
)

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
    assert len(report.samples) == 2 * per_round  # the warm-up round is excluded
    assert all(s.error is None for s in report.samples), [s.error for s in report.samples]
    phases = WARM_PHASES if mode == "warm" else COLD_PHASES
    for sample in report.samples:
        assert set(sample.phases) == set(phases)
        assert all(v >= 0 for v in sample.phases.values())
    summary = report.summary()["local"]
    assert summary["failures"] == 0 and summary["total"]["p50"] > 0
    assert len(report.raw["local"]) == 2 * per_round  # raw baseline: same rounds, same load
    paths = write_results(report, tmp_path)
    data = json.loads(paths[0].read_text())
    assert data["machine"]["cpus"] and data["config"]["mode"] == mode
    markdown = paths[1].read_text()
    assert "| local |" in markdown and "cores" in markdown
    assert any(p.suffix == ".png" and p.stat().st_size > 1000 for p in paths)


async def test_failures_are_counted_not_dropped() -> None:
    broken = sandbay.SandbayConfig(provider=sandbay.LocalConfig(python="/nonexistent/python"))
    report = await run_bench(BenchConfig(providers=[broken], runs=2, raw_baseline=False))
    summary = report.summary()["local"]
    assert summary["runs"] == 2 and summary["failures"] == 2
    assert "AgentError" in summary["errors"][0]
    assert "Failures on local" in report.to_markdown()


def test_a_report_renders_the_same_after_a_json_round_trip() -> None:
    from sandbay._bench import BenchReport, RunSample

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
    again = BenchReport.from_json(report.to_json())
    assert again.to_markdown() == report.to_markdown()
    assert again.summary()["p"]["failures"] == 1
    assert again.summary()["p"]["create_to_first_msg"]["p50"] > 0
