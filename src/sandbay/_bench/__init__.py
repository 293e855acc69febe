"""The cold-start benchmark behind ``sandbay bench`` and ``benchmarks/cold_start.py``.

- `_running`: the rounds of runs, each phase timed (the method is in its docstring);
- `_baselines`: the raw create → first exec baselines, one per provider, on its own SDK;
- `_statistics`: percentiles and the per-provider summary;
- `_report` and `_rendering`: the report, its JSON, Markdown and chart;
- `_capacity`: capacity planning, a representative session's peak memory and CPU per
  provider and the hosting guide's agents-per-host formula filled in from them.
"""

from __future__ import annotations

from ._baselines import LABELS, RAW_BASELINES, RawBaseline
from ._capacity import (
    CapacityConfig,
    CapacityReport,
    CapacitySample,
    agents_per_cores,
    agents_per_host,
    run_capacity,
)
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
    "CapacityConfig",
    "CapacityReport",
    "CapacitySample",
    "Mode",
    "RawBaseline",
    "RunSample",
    "agents_per_cores",
    "agents_per_host",
    "check_config",
    "machine_info",
    "run_bench",
    "run_capacity",
    "stats",
    "summarize",
    "write_results",
]
