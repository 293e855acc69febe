"""Cold create → first message: `SandboxTransport` (SDK on the host) vs `run_agent`, side by side.

    python benchmarks/transport_cold_start.py --providers local,docker --runs 5

Each run creates a sandbox and stops the clock at the first agent message (``system/init``),
against ScriptedModel. Both run the SDK on the host and the CLI through the relay
(``run_agent`` adds its checks, deadline and keep-alive around it). The two alternate, so
both see the same machine. Prints the medians in milliseconds; informational, nothing committed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import anyio
from claude_agent_sdk import ClaudeAgentOptions, ClaudeSDKClient

import sandbay
from sandbay import SandboxSpec
from sandbay.testing import ScriptedModel, Turn


def provider(name: str) -> sandbay.BaseProviderConfig:
    if name == "local":
        return sandbay.LocalConfig(isolate=False)
    return sandbay.DockerConfig()


async def with_transport(name: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    async with sandbay.open_sandbox(provider(name), SandboxSpec(network="host")) as sb:
        options = ClaudeAgentOptions(max_turns=1, env=env)
        transport = sandbay.SandboxTransport(sb, options)
        async with ClaudeSDKClient(options, transport=transport) as client:
            await client.query("go")
            async for _ in client.receive_response():
                return (time.perf_counter() - started) * 1000
    raise RuntimeError("no message")


async def with_run_agent(name: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    run = sandbay.run_agent(
        "go",
        provider=provider(name),
        options=ClaudeAgentOptions(max_turns=1),
        env=env,
        spec=SandboxSpec(network="host"),
    )
    async with run:
        async for _ in run:
            return (time.perf_counter() - started) * 1000
    raise RuntimeError("no message")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default="local,docker")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    for name in args.providers.split(","):
        times: dict[str, list[float]] = {"transport": [], "run_agent": []}
        async with ScriptedModel([Turn.text("hi")] * (2 * args.runs + 2)) as model:
            env = model.env()
            await with_run_agent(name, env)  # warm the image and the page cache once
            for _ in range(args.runs):
                times["transport"].append(await with_transport(name, env))
                times["run_agent"].append(await with_run_agent(name, env))
        medians = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"{name}: cold create -> first message, median of {args.runs}: "
            f"transport {medians['transport']:.0f} ms, run_agent {medians['run_agent']:.0f} ms"
        )


if __name__ == "__main__":
    anyio.run(main)
