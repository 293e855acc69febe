"""Start-up time of the ``sandbay`` command and of ``import sandbay``: medians of N runs.

    python benchmarks/startup.py --runs 21

writes benchmarks/results/startup.{json,md}. Each run is a fresh subprocess, timed from spawn
to exit with a monotonic clock, in a scratch directory with no sandbay.toml, so ``sandbay ls``
lists the default (local) provider. One warm-up run of each command is not counted. The
commands take turns run by run, so a slow moment on a shared machine hurts each alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
GOAL_S = 0.25  # for the two commands a user types first

COMMANDS: dict[str, list[str]] = {
    "sandbay --help": ["-m", "sandbay", "--help"],
    "sandbay ls": ["-m", "sandbay", "ls"],
    'python -c "import sandbay"': ["-c", "import sandbay"],
    # Names load on first use; this is what a script that opens a sandbox pays up front.
    'python -c "import sandbay; sandbay.open_sandbox"': [
        "-c",
        "import sandbay; sandbay.open_sandbox",
    ],
    "python (empty, for reference)": ["-c", "pass"],
}


def sandbay_command(python: str) -> list[str]:
    """The installed ``sandbay`` script next to ``python``, else ``python -m sandbay``."""
    script = Path(python).with_name("sandbay")
    return [str(script)] if script.exists() else [python, "-m", "sandbay"]


def time_once(argv: list[str], cwd: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21, help="measured runs per command")
    parser.add_argument("--python", default=sys.executable, help="interpreter with sandbay")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    script = sandbay_command(args.python)
    argvs = {
        name: (script + argv[2:]) if argv[:2] == ["-m", "sandbay"] else [args.python, *argv]
        for name, argv in COMMANDS.items()
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SANDBAY_", "ANTHROPIC_"))}
    samples: dict[str, list[float]] = {name: [] for name in argvs}
    with tempfile.TemporaryDirectory() as cwd:
        for round_no in range(args.runs + 1):
            for name, argv in argvs.items():
                elapsed = time_once(argv, cwd, env)
                if round_no:  # the first round warms the OS's file cache
                    samples[name].append(elapsed)

    rows = {
        name: {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "max_s": max(values),
            "runs": len(values),
        }
        for name, values in samples.items()
    }
    report = {
        "what": "wall time from spawn to exit of a fresh process, seconds",
        "goal_s": GOAL_S,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "results": rows,
        "samples": samples,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "startup.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Start-up, median of {args.runs} runs (fresh process, spawn to exit; "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs)",
        "",
        "| command | median ms | min ms | max ms |",
        "|---|---:|---:|---:|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| `{name}` | {row['median_s'] * 1000:.0f} | {row['min_s'] * 1000:.0f} "
            f"| {row['max_s'] * 1000:.0f} |"
        )
    lines += ["", f"Goal: `sandbay --help` and `sandbay ls` under {GOAL_S * 1000:.0f} ms."]
    markdown = "\n".join(lines) + "\n"
    (args.out / "startup.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
