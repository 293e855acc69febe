"""The daytona provider's benchmark rows, against the local fake Daytona control plane.

    python benchmarks/daytona_fake.py --runs 5 --burst-runs 2 --concurrency 4
    python benchmarks/daytona_fake.py --runs 5 --modes cold

starts the fake control plane of the tests (tests/fakes/daytona: Daytona's REST API and
toolbox on 127.0.0.1, its sandboxes as process trees under bubblewrap on this machine,
sharing its network) and writes benchmarks/results/{cold,warm,burst}-daytona-fake.{json,md,png}
from `sandbay bench`'s measurement (`run_bench`, the scripted model, the real ``claude``
CLI). The ``exec`` mode times the provider's own calls: create, the first exec (``true``),
three more, close; it writes benchmarks/results/exec-daytona-fake.{json,md}.

Every row and chart is labelled "fake control plane: client overhead only": the fake answers
at once (``started`` on create), so the numbers are the ``daytona`` SDK's and sandbay's own
cost (requests, sessions, the logs WebSocket, the shim every process runs under, the relay
and the CLI on this machine), never Daytona's. Needs bubblewrap.

The raw baseline (the ``daytona`` SDK alone: ``AsyncDaytona.create``, ``process.exec("true")``)
runs against the same fake in the same rounds, and in cold mode the bare CLI too, so the
cold rows show sandbay over the raw SDK, over its floor, and per phase (provision and ready
beside the raw create and first exec): the difference is sandbay's client-side overhead,
the raw time the fake's and the SDK's own.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import anyio
from pydantic import SecretStr

from sandbay import DaytonaConfig, SandbayConfig
from sandbay._bench import BenchConfig, run_bench, write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LABEL = "fake control plane: client overhead only"
MODES = ("cold", "warm", "burst", "exec")


async def measure_calls(config: DaytonaConfig, runs: int) -> dict[str, list[float]]:
    """Seconds per provider call: create, first exec, later execs, close (one warm-up)."""
    import sandbay

    phases: dict[str, list[float]] = {"create": [], "first exec": [], "exec": [], "close": []}
    async with sandbay.Providers() as providers:
        await (await providers.create_sandbox(config)).aclose()  # warm-up, not counted
        for _ in range(runs):
            started = time.perf_counter()
            sb = await providers.create_sandbox(config)
            created = time.perf_counter()
            await sb.exec(["true"])
            phases["create"].append(created - started)
            phases["first exec"].append(time.perf_counter() - created)
            for _ in range(3):
                before = time.perf_counter()
                await sb.exec(["true"])
                phases["exec"].append(time.perf_counter() - before)
            before = time.perf_counter()
            await sb.aclose()
            phases["close"].append(time.perf_counter() - before)
    return phases


def write_calls(phases: dict[str, list[float]], runs: int, command: str) -> list[Path]:
    """exec-daytona-fake.{json,md}: p50 and p95 per call, in milliseconds."""
    ms = {
        name: {
            "p50": statistics.median(xs) * 1000,
            "p95": sorted(xs)[round(0.95 * (len(xs) - 1))] * 1000,
        }
        for name, xs in phases.items()
    }
    machine = f"{platform.machine()}, Python {platform.python_version()}"
    json_path, md_path = RESULTS / "exec-daytona-fake.json", RESULTS / "exec-daytona-fake.md"
    data = {"label": LABEL, "runs": runs, "machine": machine, "command": command, "ms": ms}
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        f"## daytona ({LABEL}): provider calls, {runs} runs",
        "",
        f"Machine: {machine}. Times in ms. Produced by `{command}`.",
        "",
        "| phase | p50 | p95 |",
        "|---|---:|---:|",
        *(f"| {name} | {v['p50']:.0f} | {v['p95']:.0f} |" for name, v in ms.items()),
        "",
    ]
    md_path.write_text("\n".join(lines))
    print("\n".join(lines))
    return [json_path, md_path]


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--burst-runs", type=int, default=2, help="bursts")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--modes", default=",".join(MODES), help="any of " + ", ".join(MODES))
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if unknown := sorted(set(modes) - set(MODES)):
        parser.error(f"unknown mode(s) {', '.join(unknown)}: use any of {', '.join(MODES)}")
    command = "python benchmarks/daytona_fake.py " + " ".join(sys.argv[1:])
    sys.path.insert(0, str(ROOT / "tests"))
    from fakes.daytona import FakeDaytona

    RESULTS.mkdir(parents=True, exist_ok=True)
    with FakeDaytona() as fake:
        daytona = DaytonaConfig(
            api_key=SecretStr(fake.api_key), api_url=fake.api_url, host_network=True
        )
        for mode in modes:
            if mode == "exec":
                paths = write_calls(await measure_calls(daytona, args.runs), args.runs, command)
            else:
                report = await run_bench(
                    BenchConfig(
                        providers=[SandbayConfig(provider=daytona)],
                        runs=args.burst_runs if mode == "burst" else args.runs,
                        mode=mode,  # type: ignore[arg-type]
                        concurrency=args.concurrency,
                    )
                )
                report.labels = dict.fromkeys(report.labels, LABEL)  # warm: both rows
                report.config["command"] = command
                print(report.to_markdown())
                paths = write_results(report, RESULTS, stem=f"{mode}-daytona-fake")
            for path in paths:
                print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    anyio.run(main)
