"""The benchmark's statistics: percentiles of samples and the per-provider summary.

Pure functions of the samples: no I/O, no clock, so every figure in a report can be checked
by hand (tests/test_bench.py does).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from ._samples import COLD_PHASES, WARM_PHASES, RunSample

__all__ = ["phase_split", "stats", "summarize"]


def stats(values: Sequence[float]) -> dict[str, float]:
    """min / p50 / p95 / p99 / max and the count; empty dict for no values.

    p95 and p99 are nearest-rank percentiles (the smallest sample with at least that share
    of samples at or below it: with 20 samples, p95 is the 19th and p99 the 20th); p50 is the
    median (the mean of the two middle samples for an even count).
    """
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


def summarize(
    samples: Sequence[RunSample],
    *,
    mode: str,
    raw: Mapping[str, Sequence[float]],
    raw_errors: Mapping[str, int],
    labels: Mapping[str, str],
    cli: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, Any]:
    """Per provider, in the order first sampled: runs, failures, stats, the raw ratio.

    Failed runs count in ``runs`` and ``failures`` (with up to five distinct errors) and are
    left out of every timing.

    Args:
        samples: Every measured run.
        mode: ``cold``, ``warm``, ``burst`` or ``staggered``: which phases and derived spans
            to report. ``staggered`` adds ``launch_offset`` (stats of the measured launch
            offsets) and ``ramp``: per launch index, its median offset and times.
        raw: Raw-SDK create → first exec seconds per provider.
        raw_errors: Failed raw baselines per provider.
        labels: Shown beside a provider's name.
        cli: The bare CLI's start → first message seconds per provider; with ``raw``, the
            floor (the sum of the two medians) that ``ratio_vs_floor`` divides by.
    """
    out: dict[str, Any] = {}
    phases = WARM_PHASES if mode == "warm" else COLD_PHASES
    for name in dict.fromkeys(s.provider for s in samples):
        ok = [s for s in samples if s.provider == name and s.error is None]
        failed = [s for s in samples if s.provider == name and s.error is not None]
        entry: dict[str, Any] = {
            "runs": len(ok) + len(failed),
            "failures": len(failed),
            "errors": sorted({s.error for s in failed if s.error})[:5],
            "label": labels.get(name, ""),
            "phases": {p: stats([s.phases[p] for s in ok if p in s.phases]) for p in phases},
            "total": stats([s.total for s in ok]),
        }
        entry["model"] = stats([s.model_s for s in ok if s.model_s is not None])
        entry["agent_first_msg"] = stats(
            [s.agent_first_msg_s for s in ok if s.agent_first_msg_s is not None]
        )
        if mode == "warm":
            to_first = {
                id(s): s.phases["acquire"] + s.phases["inject"] + s.phases["first_msg"] for s in ok
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
        if mode == "staggered":
            entry["launch_offset"] = stats(
                [s.launch_offset_s for s in ok if s.launch_offset_s is not None]
            )
            entry["ramp"] = _ramp(ok)
        raw_values = raw.get(name, [])
        entry["raw_create_to_first_exec"] = stats(raw_values)
        entry["raw_failures"] = raw_errors.get(name, 0)
        ours = entry.get("create_to_first_exec", {}).get("p50")
        if raw_values and ours:
            entry["ratio_vs_raw"] = ours / statistics.median(raw_values)
        cli_values = (cli or {}).get(name, [])
        entry["cli_start_to_first_msg"] = stats(cli_values)
        to_first_msg = entry.get("create_to_first_msg", {}).get("p50")
        if raw_values and cli_values and to_first_msg:
            floor = statistics.median(raw_values) + statistics.median(cli_values)
            entry["floor_to_first_msg"] = floor
            entry["ratio_vs_floor"] = to_first_msg / floor
        out[name] = entry
    return out


def _ramp(ok: Sequence[RunSample]) -> list[dict[str, Any]]:
    """Per launch index (over rounds): median offset, create → first message and total."""
    out = []
    for index in sorted({s.launch_index for s in ok if s.launch_index is not None}):
        runs = [s for s in ok if s.launch_index == index]
        out.append(
            {
                "index": index,
                "n": len(runs),
                "offset_p50": statistics.median(s.launch_offset_s or 0.0 for s in runs),
                "create_to_first_msg_p50": statistics.median(
                    s.phases["provision"]
                    + s.phases["ready"]
                    + s.phases["inject"]
                    + s.phases["first_msg"]
                    for s in runs
                ),
                "total_p50": statistics.median(s.total for s in runs),
            }
        )
    return out


def phase_split(
    samples: Sequence[RunSample], raw_phases: Mapping[str, Sequence[Mapping[str, float]]]
) -> dict[str, dict[str, float]]:
    """Per provider whose raw baseline timed its steps apart: sandbay's client overhead.

    Medians, in seconds, of one report's runs and raw baselines (same rounds, same load):
    sandbay's ``provision`` beside the raw SDK's create, sandbay's ``ready`` beside the raw
    first exec, and each difference (``*_overhead``): what sandbay's client adds to that
    phase. The raw figures are what the provider (or its fake control plane) and its SDK take
    anyway. Providers without successful runs or timed steps are left out.
    """
    split: dict[str, dict[str, float]] = {}
    for name, raw in raw_phases.items():
        ok = [
            s for s in samples if s.provider == name and s.error is None and "provision" in s.phases
        ]
        if not raw or not ok:
            continue
        provision = statistics.median(s.phases["provision"] for s in ok)
        ready = statistics.median(s.phases["ready"] for s in ok)
        create = statistics.median(r["create"] for r in raw)
        first_exec = statistics.median(r["first_exec"] for r in raw)
        split[name] = {
            "runs": len(ok),
            "raw_runs": len(raw),
            "provision": provision,
            "raw_create": create,
            "provision_overhead": provision - create,
            "ready": ready,
            "raw_first_exec": first_exec,
            "ready_overhead": ready - first_exec,
        }
    return split
