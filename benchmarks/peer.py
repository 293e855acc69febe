"""A peer side by side: sandbay, the raw docker SDK and llm-sandbox on the same image.

    python benchmarks/peer.py --rounds 15 --out benchmarks/results/peer

Each library does what its user would write to get a container, run one command in it and
be done: open → first command (``true``) → close, each phase timed on the host with
``time.perf_counter``. All three use sandbay's agent image and network ``none``, and one
docker client opened beforehand (not timed):

- **raw docker SDK**: ``containers.run(image, ["sleep", "infinity"], detach=True,
  network_mode="none")`` with sandbay's default limits (1 core, 1 GiB), ``exec_run(["true"])``,
  ``remove(force=True)``.
- **sandbay**: ``open_sandbox("docker", SandboxSpec(network="none"))``, ``exec("true")``,
  leaving the ``async with`` block.
- **llm-sandbox** (``pip install 'llm-sandbox[docker]'``; skipped with a message when absent):
  ``SandboxSession(backend="docker", image=..., skip_environment_setup=True,
  runtime_configs={"network_mode": "none"})`` as its docs show, ``execute_command("true")``,
  ``close()``.

Libraries take turns round by round, their order rotating; the first round is a warm-up and
not counted. A probe then shows why llm-sandbox's close takes as long as it does: what PID 1
is in its container and whether it handles SIGTERM, and how that container ended.
Prints a table and writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import docker

import sandbay
from sandbay import SandboxSpec
from sandbay.providers.docker import DockerProvider

PHASES = ("open", "exec", "close", "total")
RAW, SANDBAY, PEER = "raw docker SDK", "sandbay", "llm-sandbox"
LIMITS = {"nano_cpus": 1_000_000_000, "mem_limit": "1024m"}  # sandbay's docker defaults


def _raw(client: Any, image: str) -> dict[str, float]:
    t0 = time.perf_counter()
    container = client.containers.run(
        image, ["sleep", "infinity"], detach=True, network_mode="none", **LIMITS
    )
    t1 = time.perf_counter()
    result = container.exec_run(["true"])
    t2 = time.perf_counter()
    container.remove(force=True)
    t3 = time.perf_counter()
    if result.exit_code != 0:
        raise RuntimeError(f"raw: true exited {result.exit_code}")
    return {"open": t1 - t0, "exec": t2 - t1, "close": t3 - t2}


async def _sandbay() -> dict[str, float]:
    t0 = time.perf_counter()
    async with sandbay.open_sandbox("docker", SandboxSpec(network="none")) as sb:
        t1 = time.perf_counter()
        result = await sb.exec("true")
        t2 = time.perf_counter()
    t3 = time.perf_counter()
    if result.exit_code != 0:
        raise RuntimeError(f"sandbay: true exited {result.exit_code}")
    return {"open": t1 - t0, "exec": t2 - t1, "close": t3 - t2}


def _llm_sandbox_session(client: Any, image: str) -> Any:
    """llm-sandbox's docker session as its docs show it, on ``image``, without network."""
    from llm_sandbox import SandboxBackend, SandboxSession

    return SandboxSession(
        backend=SandboxBackend.DOCKER,
        client=client,
        image=image,
        lang="python",
        skip_environment_setup=True,
        runtime_configs={"network_mode": "none"},
    )


def _peer(client: Any, image: str) -> dict[str, float]:
    t0 = time.perf_counter()
    session = _llm_sandbox_session(client, image)
    session.open()
    t1 = time.perf_counter()
    try:
        result = session.execute_command("true")
        t2 = time.perf_counter()
    finally:
        session.close()
    t3 = time.perf_counter()
    if result.exit_code != 0:
        raise RuntimeError(f"llm-sandbox: true exited {result.exit_code}")
    return {"open": t1 - t0, "exec": t2 - t1, "close": t3 - t2}


def _why_peer_close_is_slow(client: Any, image: str) -> dict[str, Any]:
    """PID 1 of an llm-sandbox container, its signal handling, and how `stop` ended it."""
    session = _llm_sandbox_session(client, image)
    session.open()
    container = session.container
    try:
        status = session.execute_command("cat /proc/1/status").stdout
        cmdline = session.execute_command("cat /proc/1/cmdline").stdout.replace("\0", " ")
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        caught = int(fields["SigCgt"], 16)
        started = time.perf_counter()
        container.stop()  # what llm-sandbox's close() calls first
        stop_s = time.perf_counter() - started
        container.reload()
        state = container.attrs["State"]
        return {
            "pid1": cmdline.strip(),
            "pid1_catches_sigterm": bool(caught & (1 << (15 - 1))),
            "stop_s": stop_s,
            "exit_code_after_stop": state["ExitCode"],
            "stop_timeout_s": container.attrs["Config"].get("StopTimeout") or 10,
        }
    finally:
        session.close()


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def rank(p: float) -> float:
        return ordered[max(0, min(len(ordered) - 1, -(-len(ordered) * p // 100) - 1))]

    return {"p50": statistics.median(ordered), "p95": rank(95), "n": len(ordered)}


def _have_peer() -> bool:
    try:
        import llm_sandbox  # noqa: F401
    except ImportError:
        return False
    return True


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    provider = sandbay.get_provider("docker")
    assert isinstance(provider, DockerProvider)
    image = await provider.agent_image()
    client = docker.from_env()
    runners: dict[str, Callable[[], Awaitable[dict[str, float]]]] = {
        RAW: lambda: anyio.to_thread.run_sync(_raw, client, image),
        SANDBAY: _sandbay,
    }
    skipped = None
    if _have_peer():
        runners[PEER] = lambda: anyio.to_thread.run_sync(_peer, client, image)
    else:
        skipped = "llm-sandbox is not installed: pip install 'llm-sandbox[docker]'"
        print(f"skipping {PEER}: {skipped}", file=sys.stderr)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    names = list(runners)
    try:
        for index in range(args.rounds + 1):
            shift = index % len(names)
            for name in names[shift:] + names[:shift]:
                sample = await runners[name]()
                sample["total"] = sample["open"] + sample["exec"] + sample["close"]
                if index:  # the first round warms up
                    samples[name].append(sample)
            print(f"round {index}/{args.rounds} done", file=sys.stderr, flush=True)
        why = (
            await anyio.to_thread.run_sync(_why_peer_close_is_slow, client, image)
            if (PEER in runners)
            else None
        )
    finally:
        client.close()

    stats = {
        name: {phase: _stats([s[phase] * 1000 for s in rows]) for phase in PHASES}
        for name, rows in samples.items()
    }
    lines = [
        "| ms | open p50 | open p95 | first command p50 | p95 | close p50 | p95 "
        "| total p50 | total p95 | total p50 / raw |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    raw_total = stats[RAW]["total"]["p50"]
    for name, row in stats.items():
        cells = " | ".join(f"{row[p]['p50']:.0f} | {row[p]['p95']:.0f}" for p in PHASES)
        lines.append(f"| {name} | {cells} | {row['total']['p50'] / raw_total:.2f}× |")
    table = "\n".join(lines)
    print(table)
    if why:
        print(json.dumps(why, indent=2))
    if args.out is not None:
        from importlib.metadata import version

        command = f"python benchmarks/peer.py --rounds {args.rounds} --out {args.out}"
        meta = {
            "command": command,
            "image": image,
            "llm_sandbox": version("llm-sandbox") if PEER in runners else None,
            "docker_sdk": version("docker"),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "when": time.strftime("%Y-%m-%d"),
        }
        out = {**meta, "skipped": skipped, "why_peer_close": why, "stats": stats}
        out["samples_ms"] = {
            name: [{k: v * 1000 for k, v in s.items()} for s in rows]
            for name, rows in samples.items()
        }
        args.out.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(_note(command, meta, table, why, skipped))


def _note(
    command: str, meta: dict[str, Any], table: str, why: dict[str, Any] | None, skipped: str | None
) -> str:
    text = (
        "# A peer side by side: open → first command → close\n\n"
        f"`{command}`\n\n"
        f"Same image (`{meta['image']}`), network none, one docker client each, interleaved "
        f"with rotating order, first round excluded; llm-sandbox {meta['llm_sandbox']}, "
        f"docker SDK {meta['docker_sdk']}.\n\n{table}\n"
    )
    if skipped:
        text += f"\nllm-sandbox skipped: {skipped}\n"
    if why:
        text += (
            "\nWhy llm-sandbox's close is slow: its `close()` calls `container.stop()` first. "
            f"In its container PID 1 is `{why['pid1']}` (the image's command, run with a tty), "
            f"which {'catches' if why['pid1_catches_sigterm'] else 'has no handler for'} "
            "SIGTERM; the kernel drops a signal without a handler sent to a namespace's "
            f"PID 1, so Docker waits out its stop grace ({why['stop_timeout_s']} s) and then "
            f"kills: the probe's stop took {why['stop_s']:.1f} s and the container exited "
            f"{why['exit_code_after_stop']} (128 + SIGKILL). sandbay and the raw SDK remove "
            "with force (SIGKILL at once).\n"
        )
    return text


if __name__ == "__main__":
    anyio.run(main)
