"""The e2b provider's rows of the cold-start benchmark, against the local fake E2B.

    python benchmarks/e2b_fake.py --runs 10
    python benchmarks/e2b_fake.py --runs 5 --modes cold

starts the fake control plane of the tests (tests/e2b_fake.py: E2B's REST API and envd on
127.0.0.1, its sandboxes under bubblewrap on this machine) and writes
benchmarks/results/{cold,warm,burst}-e2b-fake.{json,md,png}. Every row and chart is labelled
"fake control plane: client overhead only": no E2B server was involved, so the numbers are
the e2b SDK's and sandbay's own cost (requests, process streams, the relay and the CLI on
this machine), not E2B's cold start.

The raw baseline (the ``e2b`` SDK alone: ``AsyncSandbox.create``, ``commands.run("true")``)
runs against the same fake in the same rounds, and in cold mode the bare CLI too, so the
cold rows show sandbay over the raw SDK, over its floor, and per phase (provision and ready
beside the raw create and first exec): the difference is sandbay's client-side overhead,
the raw time the fake's and the SDK's own.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import anyio

from sandbay import SandbayConfig
from sandbay._bench import BenchConfig, run_bench, write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LABEL = "fake control plane: client overhead only"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--burst-runs", type=int, default=3, help="bursts")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--modes", default="cold,warm,burst")
    args = parser.parse_args()
    command = "python benchmarks/e2b_fake.py " + " ".join(sys.argv[1:])
    sys.path.insert(0, str(ROOT / "tests"))
    from e2b_fake import FakeE2B

    with FakeE2B() as fake:
        provider = SandbayConfig(provider=fake.config(template=None))
        for mode in args.modes.split(","):
            config = BenchConfig(
                providers=[provider],
                runs=args.burst_runs if mode == "burst" else args.runs,
                mode=mode,  # type: ignore[arg-type]
                concurrency=args.concurrency,
            )
            report = await run_bench(config)
            report.labels = {name: LABEL for name in report.labels}
            report.config["command"] = command
            print(report.to_markdown())
            paths = write_results(report, RESULTS, stem=f"{mode}-e2b-fake")
            for path in paths:
                print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    anyio.run(main)
