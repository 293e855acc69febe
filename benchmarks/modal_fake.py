"""The modal provider's benchmark rows, against the local fake Modal control plane.

    python benchmarks/modal_fake.py --runs 10 --burst-runs 2 --concurrency 4
    python benchmarks/modal_fake.py --modes cold --runs 5 --also docker

writes benchmarks/results/{cold,warm,burst}-modal-fake[-docker].{json,md,png}. The fake
(tests/fakes/modal) serves the real ``modal`` SDK's gRPC calls on 127.0.0.1 and runs each
sandbox as a Docker container, each exec as ``docker exec``: the rows measure sandbay's and
the Modal client's overhead on top of a local engine, not Modal's service, and are labelled
so. ``--also docker`` measures the docker provider in the same rounds: the difference is
what the gRPC round trips (and the fake's ``docker`` CLI calls) add. Needs Docker and
sandbay's agent image (built on first use).

The raw baseline (the ``modal`` SDK alone: ``Sandbox.create.aio`` in the app,
``exec.aio("true")`` and its ``wait``) runs against the same fake in the same rounds, and in
cold mode the bare CLI too, so the cold rows show sandbay over the raw SDK, over its floor,
and per phase (provision and ready beside the raw create and first exec): the difference is
sandbay's client-side overhead, the raw time the fake's and the SDK's own.
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
    sys.path.insert(0, str(ROOT / "tests"))
    from fakes.modal import FakeModal
    from modal_support import agent_image, fake_config

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--burst-runs", type=int, default=2, help="bursts")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--modes", default="cold,warm,burst")
    parser.add_argument(
        "--also",
        default="",
        help="other providers measured in the same rounds, e.g. docker (the fake's own engine)",
    )
    args = parser.parse_args()
    command = "python benchmarks/modal_fake.py " + " ".join(sys.argv[1:])
    with FakeModal(await anyio.to_thread.run_sync(agent_image)) as fake:
        config = SandbayConfig(provider=fake_config(fake))
        also = [name.strip() for name in args.also.split(",") if name.strip()]
        stem = "-".join(["modal-fake", *also])
        for mode in args.modes.split(","):
            report = await run_bench(
                BenchConfig(
                    providers=[config, *also],
                    runs=args.burst_runs if mode == "burst" else args.runs,
                    mode=mode,  # type: ignore[arg-type]
                    concurrency=args.concurrency,
                )
            )
            for name in report.labels:  # warm: both of modal's rows
                if name.startswith("modal"):
                    report.labels[name] = LABEL
            report.config["command"] = command
            print(report.to_markdown())
            paths = write_results(report, RESULTS, stem=f"{mode}-{stem}")
            for path in paths:
                print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    anyio.run(main)
