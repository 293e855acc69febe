"""The daytona provider's client overhead, against the fake control plane in tests/fakes.

    python benchmarks/daytona_fake.py --runs 20

writes benchmarks/results/daytona-fake.{json,md}. Fake control plane: client overhead only.
The fake answers on 127.0.0.1 at once (``started`` on create), so these are the costs of
sandbay, the ``daytona`` SDK and the shim each process runs under, never Daytona's own. Each
run: create a sandbox, the first exec (``true``), three more, then close it, each timed with
a monotonic clock. Needs bubblewrap (the fake's sandboxes run under it).
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

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
LABEL = "fake control plane: client overhead only"


async def measure(api_url: str, key: str, runs: int) -> dict[str, list[float]]:
    import sandbay

    config = sandbay.DaytonaConfig(api_key=SecretStr(key), api_url=api_url)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from fakes.daytona import FakeDaytona

    with FakeDaytona() as fake:
        phases = anyio.run(measure, fake.api_url, fake.api_key, args.runs)
    ms = {
        name: {
            "p50": statistics.median(xs) * 1000,
            "p95": sorted(xs)[int(0.95 * (len(xs) - 1))] * 1000,
        }
        for name, xs in phases.items()
    }
    machine = f"{platform.machine()}, Python {platform.python_version()}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "daytona-fake.json").write_text(
        json.dumps({"label": LABEL, "runs": args.runs, "machine": machine, "ms": ms}, indent=2)
        + "\n"
    )
    lines = [
        f"## daytona ({LABEL}), {args.runs} runs",
        "",
        f"Machine: {machine}. Times in ms.",
        "",
        "| phase | p50 | p95 |",
        "|---|---:|---:|",
        *(f"| {name} | {v['p50']:.0f} | {v['p95']:.0f} |" for name, v in ms.items()),
        "",
    ]
    (RESULTS / "daytona-fake.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
