"""Rendering a benchmark report: Markdown tables, a PNG chart, and the files they go to."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._samples import COLD_PHASES, WARM_PHASES

if TYPE_CHECKING:
    from ._report import BenchReport

__all__ = ["render_markdown", "render_plot", "write_results"]


def _rounds(config: dict[str, Any]) -> str:
    """How the runs were launched, for titles: bursts of K, or K launches N ms apart."""
    if config["mode"] == "burst":
        return f", bursts of {config['concurrency']}"
    if config["mode"] == "staggered":
        return f", rounds of {config['concurrency']} launches {_interval(config)} ms apart"
    return ""


def _interval(config: dict[str, Any]) -> str:
    return f"{config['stagger_ms']:g}"


def render_markdown(report: BenchReport) -> str:
    """The report's tables: per-phase p50 (p95), then min / percentiles / max per span.

    A staggered report names its launch interval in its title and in every table (a column),
    and adds the ramp: each launch's median offset and times, in launch order.
    """
    summary = report.summary()
    mode = report.config["mode"]
    staggered = mode == "staggered"
    phases = WARM_PHASES if mode == "warm" else COLD_PHASES
    # In staggered mode every row says the interval it was measured at.
    icol = ["interval (ms)"] if staggered else []
    ival = [_interval(report.config)] if staggered else []
    lines = [
        f"## {mode} start, {report.config['runs']} "
        + ("rounds" if staggered else "runs")
        + " per provider"
        + _rounds(report.config),
        "",
        f"Machine: {report.machine['cpus']} cores, {report.machine['memory_gib']} GiB, "
        f"{report.machine['platform']}, Python {report.machine['python']}. "
        f"Model: {report.config['model']}. Times in ms; p50 (p95).",
        "",
        *([f"Produced by `{report.config['command']}`.", ""] if "command" in report.config else []),
        "| "
        + " | ".join(["provider", *icol, "runs", "failed", *phases, "total p50", "total p95"])
        + " |",
        "|---|" + "---:|" * (len(icol) + 2 + len(phases) + 2),
    ]
    for name, entry in summary.items():
        label = f" ({entry['label']})" if entry["label"] else ""
        cells = [
            f"{_ms(entry['phases'][p].get('p50'))} ({_ms(entry['phases'][p].get('p95'))})"
            for p in phases
        ]
        row = [f"{name}{label}", *ival, str(entry["runs"]), str(entry["failures"]), *cells]
        row += [_ms(entry["total"].get("p50")), _ms(entry["total"].get("p95"))]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "| " + " | ".join(["provider", *icol, "stat", "min", "p50", "p95", "p99", "max"]) + " |",
        "|---|" + "---:|" * len(icol) + "---|---:|---:|---:|---:|---:|",
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
        rows.append(
            ("bare CLI start → first message (running sandbox)", entry["cli_start_to_first_msg"])
        )
        if staggered:
            rows.append(("launch offset (measured)", entry["launch_offset"]))
        rows.append(("model's own time (duration_api_ms)", entry["model"]))
        rows.append(("agent's own prompt → first message (in sandbox)", entry["agent_first_msg"]))
        shown = f"{name} ({entry['label']})" if entry["label"] else name
        for title, st in rows:
            if st:
                cells = [_ms(st[k]) for k in ("min", "p50", "p95", "p99", "max")]
                lines.append("| " + " | ".join([shown, *ival, title, *cells]) + " |")
    if staggered:
        lines += [
            "",
            "Ramp: each launch's median over rounds, in launch order (how a run fares as "
            "more runs overlap it).",
            "",
            "| provider | interval (ms) | launch | offset p50 | create → first agent message "
            "p50 | total p50 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, entry in summary.items():
            for step in entry["ramp"]:
                lines.append(
                    f"| {name} | {ival[0]} | {step['index'] + 1} | {_ms(step['offset_p50'])} | "
                    f"{_ms(step['create_to_first_msg_p50'])} | {_ms(step['total_p50'])} |"
                )
    ratios = {n: e["ratio_vs_raw"] for n, e in summary.items() if "ratio_vs_raw" in e}
    if ratios:
        lines += [
            "",
            "sandbay create → first exec over the raw SDK (median ratio, same run): "
            + ", ".join(f"{n} {r:.2f}×" for n, r in ratios.items()),
        ]
    floors = {n: e for n, e in summary.items() if "ratio_vs_floor" in e}
    if floors:
        lines += [
            "",
            "Cold create → first agent message over its floor (raw create → first exec + bare "
            "CLI start → first message; medians, same run): "
            + ", ".join(
                f"{n} {_ms(e['create_to_first_msg']['p50'])} / {_ms(e['floor_to_first_msg'])} ms "
                f"= {e['ratio_vs_floor']:.2f}×"
                for n, e in floors.items()
            ),
        ]
    lines += _split_lines(report.phase_split(), summary)
    failures = {n: e["errors"] for n, e in summary.items() if e["errors"]}
    for name, errors in failures.items():
        lines.append(f"\nFailures on {name}: " + "; ".join(errors))
    return "\n".join(lines) + "\n"


def _split_lines(split: dict[str, dict[str, float]], summary: dict[str, Any]) -> list[str]:
    if not split:
        return []
    lines = [
        "",
        "Client-side overhead per phase: sandbay's phase beside the raw SDK's step "
        "(medians in ms, same run); the difference is what sandbay's client adds, the raw "
        "step what the provider (or its fake) and its SDK take anyway.",
        "",
        "| provider | provision (sandbay) | create (raw SDK) | added | "
        "ready (sandbay) | first exec (raw SDK) | added |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in split.items():
        label = summary.get(name, {}).get("label")
        shown = f"{name} ({label})" if label else name
        lines.append(
            f"| {shown} | {_ms(e['provision'])} | {_ms(e['raw_create'])} | "
            f"{_ms(e['provision_overhead'])} | {_ms(e['ready'])} | {_ms(e['raw_first_exec'])} | "
            f"{_ms(e['ready_overhead'])} |"
        )
    return lines


def render_plot(report: BenchReport, path: Path) -> bool:
    """Stacked bars of p50 per phase, with p95-of-total whiskers. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    summary = report.summary()
    mode = report.config["mode"]
    phases = WARM_PHASES if mode == "warm" else COLD_PHASES
    names = list(summary)
    if mode == "staggered":
        fig, (ax, ramp) = plt.subplots(
            2, 1, figsize=(10, 4.6 + 0.8 * len(names)), height_ratios=[1.6 + 0.8 * len(names), 3]
        )
        _plot_ramp(ramp, report)
    else:
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
    ax.set_title(
        f"sandbay {mode} start{_rounds(report.config)}: {report.machine['cpus']} cores, "
        f"{report.machine['memory_gib']} GiB, model {report.config['model']}"
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_ramp(ax: Any, report: BenchReport) -> None:
    """Each run's total against its launch offset, per provider: the staggered ramp."""
    for name in report.summary():
        runs = [
            s
            for s in report.samples
            if s.provider == name and s.error is None and s.launch_offset_s is not None
        ]
        ax.scatter(
            [(s.launch_offset_s or 0.0) * 1000 for s in runs],
            [s.total * 1000 for s in runs],
            label=name,
            s=14,
        )
    ax.set_xlabel(f"launch offset, ms (launches {_interval(report.config)} ms apart)")
    ax.set_ylabel("run total, ms")
    ax.legend(fontsize=8)


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
