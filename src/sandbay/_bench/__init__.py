"""The cold-start benchmark behind ``sandbay bench`` and ``benchmarks/cold_start.py``.

- `_running`: the rounds of runs, each phase timed (the method is in its docstring);
- `_baselines`: the raw create → first exec baselines, one per provider, on its own SDK;
- `_statistics`: percentiles and the per-provider summary;
- `_report` and `_rendering`: the report, its JSON, Markdown and chart.
"""

from __future__ import annotations

from ._baselines import LABELS, RAW_BASELINES, RawBaseline
from ._rendering import write_results
from ._report import BenchReport, machine_info
from ._running import DEFAULT_STAGGER_MS, MODES, BenchConfig, Mode, check_config, run_bench
from ._samples import COLD_PHASES, WARM_PHASES, RunSample
from ._statistics import stats, summarize

__all__ = [
    "COLD_PHASES",
    "DEFAULT_STAGGER_MS",
    "LABELS",
    "MODES",
    "RAW_BASELINES",
    "WARM_PHASES",
    "BenchConfig",
    "BenchReport",
    "Mode",
    "RawBaseline",
    "RunSample",
    "check_config",
    "machine_info",
    "run_bench",
    "stats",
    "summarize",
    "write_results",
]
