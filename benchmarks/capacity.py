"""Capacity planning: a representative session's peak memory and CPU, and agents per host.

    python benchmarks/capacity.py --providers docker,local --runs 3 --turns 6

writes benchmarks/results/capacity.{json,md}, naming the command that produced it. Each
session runs a scripted model's Bash tool calls that do real work in the sandbox; the report
fills in the Agent SDK hosting guide's formula, agents per host = (host RAM − overhead) /
per-session ceiling, with the measured numbers and this machine's. The same measurement is
`sandbay bench --mode capacity`; the method is in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import anyio

from sandbay._bench import CapacityConfig, run_capacity

RESULTS = Path(__file__).resolve().parent / "results"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default="docker,local")
    parser.add_argument("--runs", type=int, default=3, help="measured sessions per provider")
    parser.add_argument("--turns", type=int, default=6, help="Bash tool calls per session")
    parser.add_argument("--alloc-mib", type=int, default=64)
    parser.add_argument("--write-mib", type=int, default=4)
    parser.add_argument("--reserve-mib", type=int, default=1024)
    args = parser.parse_args()
    report = await run_capacity(
        CapacityConfig(
            providers=[p.strip() for p in args.providers.split(",")],
            runs=args.runs,
            turns=args.turns,
            alloc_mib=args.alloc_mib,
            write_mib=args.write_mib,
            reserve_mib=args.reserve_mib,
        )
    )
    report.config["command"] = shlex.join(["python", "benchmarks/capacity.py", *sys.argv[1:]])
    print(report.to_markdown())
    for path in report.write(RESULTS):
        print(f"wrote {path.relative_to(RESULTS.parent.parent)}")


if __name__ == "__main__":
    anyio.run(main)
