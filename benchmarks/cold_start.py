"""Cold-start benchmark for scripted runs: every mode the report commits, in one go.

    python benchmarks/cold_start.py --providers docker,local --runs 10

writes benchmarks/results/{cold,warm,burst}-<providers>.{json,md,png} (add ``staggered`` to
--modes for K launches --stagger-ms apart), each naming the command
that produced it. In ``cold`` mode each round also times the floor side by side: raw create →
first exec and the bare ``claude`` CLI's start → first message in a running sandbox; the report
gives create → first agent message over that floor. The same measurement is `sandbay bench`
(one mode at a time); the method is in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import anyio

from sandbay._bench import MODES, BenchConfig, run_bench, write_results

RESULTS = Path(__file__).resolve().parent / "results"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default="docker,local")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--burst-runs", type=int, default=3, help="burst (and staggered) rounds per provider"
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--stagger-ms", type=float, default=None, help="staggered: ms apart")
    parser.add_argument("--modes", default="cold,warm,burst", help="any of " + ",".join(MODES))
    args = parser.parse_args()
    providers = [p.strip() for p in args.providers.split(",")]
    for mode in args.modes.split(","):
        config = BenchConfig(
            providers=providers,
            runs=args.burst_runs if mode in ("burst", "staggered") else args.runs,
            mode=mode,  # type: ignore[arg-type]
            concurrency=args.concurrency,
            stagger_ms=args.stagger_ms if mode == "staggered" else None,
        )
        report = await run_bench(config)
        report.config["command"] = shlex.join(["python", "benchmarks/cold_start.py", *sys.argv[1:]])
        print(report.to_markdown())
        for path in write_results(report, RESULTS):
            print(f"wrote {path.relative_to(RESULTS.parent.parent)}")


if __name__ == "__main__":
    anyio.run(main)
