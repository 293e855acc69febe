"""A benchmark's report: its samples, where they were measured, and their JSON form."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._rendering import render_markdown, render_plot
from ._samples import RunSample
from ._statistics import phase_split, summarize

__all__ = ["BenchReport", "machine_info"]


@dataclass
class BenchReport:
    """Everything a run of the benchmark measured, plus where it ran.

    Attributes:
        config: What was measured (providers, runs, mode, concurrency, model).
        machine: Where (`machine_info`).
        samples: Every measured run, failures included; warm-up runs are not.
        raw: Raw-SDK create → first exec seconds per provider.
        raw_errors: Failed raw (and bare CLI) baselines per provider.
        cli: The bare CLI's start → first message seconds per provider (``cold`` mode).
        labels: Shown beside a provider's name (e.g. a fake control plane).
        raw_phases: Per provider whose raw baseline times its steps apart, each baseline's
            ``create`` and ``first_exec`` seconds (`phase_split`).
    """

    config: dict[str, Any]
    machine: dict[str, Any]
    samples: list[RunSample] = field(default_factory=list)
    raw: dict[str, list[float]] = field(default_factory=dict)
    raw_errors: dict[str, int] = field(default_factory=dict)
    cli: dict[str, list[float]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    raw_phases: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """Per provider: count, failures, stats per phase and total, the raw ratio."""
        return summarize(
            self.samples,
            mode=self.config["mode"],
            raw=self.raw,
            raw_errors=self.raw_errors,
            labels=self.labels,
            cli=self.cli,
        )

    def phase_split(self) -> dict[str, dict[str, float]]:
        """sandbay's client overhead per phase beside the raw SDK's steps (`phase_split`)."""
        return phase_split(self.samples, self.raw_phases)

    @classmethod
    def from_json(cls, text: str) -> BenchReport:
        """Read a report `to_json` wrote, e.g. to render committed results again."""
        data = json.loads(text)
        report = cls(
            config=data["config"],
            machine=data["machine"],
            raw=data.get("raw", {}),
            cli=data.get("cli", {}),
            raw_phases=data.get("raw_phases", {}),
        )
        report.samples = [RunSample(**sample) for sample in data["samples"]]
        report.labels = {name: e.get("label", "") for name, e in data["summary"].items()}
        report.raw_errors = {name: e.get("raw_failures", 0) for name, e in data["summary"].items()}
        return report

    def to_json(self) -> str:
        """The config, machine, summary, every sample and the baselines, as JSON."""
        return json.dumps(
            {
                "config": self.config,
                "machine": self.machine,
                "summary": self.summary(),
                "samples": [s.__dict__ for s in self.samples],
                "raw": self.raw,
                "raw_phases": self.raw_phases,
                "phase_split": self.phase_split(),
                "cli": self.cli,
            },
            indent=2,
        )

    def to_markdown(self) -> str:
        """The report's tables, as committed in ``benchmarks/results``."""
        return render_markdown(self)

    def plot(self, path: Path) -> bool:
        """Stacked bars of p50 per phase, with p95-of-total whiskers. False without matplotlib."""
        return render_plot(self, path)


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
