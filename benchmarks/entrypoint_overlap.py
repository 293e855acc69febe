"""Cold create → first agent message, with the entrypoint started after the sandbox is ready
(`Provider.create_with_process` as the base class does it) and as each provider does it.

    python benchmarks/entrypoint_overlap.py --providers docker,local --runs 10

Runs alternate between the two ways (each first in half the pairs), so both see the same
machine; prints medians in ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import anyio

import sandbay
from sandbay._agent import _EnvelopeReader, entrypoint_launch, sandbox_agent_env
from sandbay._provider import Provider, managed_labels
from sandbay.testing import ScriptedModel, Turn


async def one(provider: Provider, base: bool, env: dict[str, str]) -> float:
    spec = sandbay.SandboxSpec(network="host")
    spec = spec.model_copy(update={"labels": managed_labels(spec)})
    launch = entrypoint_launch("bench")
    started = time.perf_counter()
    if base:
        sandbox, proc = await Provider.create_with_process(provider, spec, launch)
    else:
        sandbox, proc = await provider.create_with_process(spec, launch)
    async with sandbox:
        options = {"cwd": sandbox.workdir, "max_turns": 1}
        request = {
            "kind": "request",
            "prompt": "go",
            "options": options,
            "env": sandbox_agent_env(sandbox, env),
        }
        await proc.write(json.dumps(request).encode() + b"\n")
        reader = _EnvelopeReader(proc, sandbox=sandbox)
        while (envelope := await reader.next()) is not None and envelope.kind != "message":
            pass
        took = time.perf_counter() - started
        await proc.kill()
    return took


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default="docker,local")
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    async with ScriptedModel([Turn.text("done")] * (4 * args.runs + 8)) as model:
        for name in args.providers.split(","):
            provider = sandbay.get_provider(name.strip())
            await one(provider, True, model.env())  # warm-up: images, caches
            times: dict[str, list[float]] = {"after ready": [], "with create": []}
            pair = [("after ready", True), ("with create", False)]
            for i in range(args.runs):
                for key, base in pair if i % 2 == 0 else pair[::-1]:  # neither always first
                    times[key].append(await one(provider, base, model.env()))
            medians = {k: statistics.median(v) * 1000 for k, v in times.items()}
            print(
                f"{name}: create → first agent message, median of {args.runs}: "
                + ", ".join(f"{k} {v:.0f} ms" for k, v in medians.items())
                + f" (saved {medians['after ready'] - medians['with create']:.0f} ms)"
            )


if __name__ == "__main__":
    anyio.run(main)
