"""The model relay's cost: latency per request and streaming throughput, relay vs direct.

    python benchmarks/model_relay.py --providers local,docker --requests 200 --mib 64 \
        --out benchmarks/results/model-relay

A small HTTP server on the host's loopback stands in for the model endpoint: ``POST
/v1/messages`` answers a small JSON body, ``GET /big`` streams ``--mib`` MiB in 64 KiB
chunks. A probe (Python, in the sandbox, standing where the CLI stands) times the same
requests twice: direct to the server (the sandbox has the host's network for this) and
through the model relay (the relay's listener in the sandbox, the process channel, the
host's relay, the server). Both use a new connection per request, as the relay's listener
closes each. Prints a table and writes ``OUT.json`` and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
from claude_agent_sdk import ClaudeAgentOptions

import sandbay
from sandbay import SandboxSpec

KEY = "sk-bench-real-key"
CHUNK = 64 * 1024

PROBE = r"""#!/usr/bin/env python3
import json, os, sys, time, urllib.request
relay_url, relay_key = os.environ["ANTHROPIC_BASE_URL"], os.environ["ANTHROPIC_API_KEY"]
direct_url, direct_key = os.environ["BENCH_DIRECT_URL"], os.environ["BENCH_DIRECT_KEY"]
requests, mib = int(os.environ["BENCH_REQUESTS"]), int(os.environ["BENCH_MIB"])
body = json.dumps({"model": "m", "max_tokens": 1, "messages": []}).encode()

def small(url, key):
    request = urllib.request.Request(url + "/v1/messages", data=body, headers={"x-api-key": key})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()
    return (time.perf_counter() - started) * 1000

def big(url, key):
    request = urllib.request.Request(url + f"/big?mib={mib}", headers={"x-api-key": key})
    started = time.perf_counter()
    first = None
    total = 0
    with urllib.request.urlopen(request, timeout=600) as response:
        while chunk := response.read1(1 << 16):
            if first is None:
                first = time.perf_counter()
            total += len(chunk)
    elapsed = time.perf_counter() - started
    first_ms = (first - started) * 1000
    return {"mib_s": total / 2**20 / elapsed, "bytes": total, "first_byte_ms": first_ms}

out = {"type": "bench"}
for mode, url, key in (("direct", direct_url, direct_key), ("relay", relay_url, relay_key)):
    for _ in range(5):
        small(url, key)
    latencies = []
    for i in range(requests):
        latencies.append(small(url, key))
    out[mode] = {"latency_ms": latencies, "stream": [big(url, key) for _ in range(3)]}
print(json.dumps(out), flush=True)
"""


class _Endpoint(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ok = self.headers.get("x-api-key") == KEY
        data = json.dumps({"type": "message", "content": [], "ok": ok}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        mib = int(self.path.split("mib=")[1])
        self.send_response(200 if self.headers.get("x-api-key") == KEY else 401)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        block = b"data: " + b"x" * (CHUNK - 8) + b"\n\n"
        for _ in range(mib * 2**20 // CHUNK):
            self.wfile.write(block)
            self.wfile.flush()


def provider(name: str) -> sandbay.LocalConfig | sandbay.DockerConfig:
    return sandbay.LocalConfig(isolate=False) if name == "local" else sandbay.DockerConfig()


async def measure(name: str, url: str, requests: int, mib: int) -> dict[str, Any]:
    async with sandbay.open_sandbox(provider(name), SandboxSpec(network="host")) as sb:
        await sb.write_file("probe", PROBE.encode(), mode=0o755)
        env = {
            "ANTHROPIC_BASE_URL": url,
            "ANTHROPIC_API_KEY": KEY,
            "BENCH_DIRECT_URL": url,
            "BENCH_DIRECT_KEY": KEY,
            "BENCH_REQUESTS": str(requests),
            "BENCH_MIB": str(mib),
        }
        options = ClaudeAgentOptions(cli_path=sb.resolve("probe"), env=env)
        transport = sandbay.SandboxTransport(sb, options, model_relay=True)
        await transport.connect()
        await transport.end_input()
        result: dict[str, Any] = {}
        try:
            async for message in transport.read_messages():
                if message.get("type") == "bench":
                    result = message
        finally:
            await transport.close()
        return result


def summary(result: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for mode in ("direct", "relay"):
        latencies = sorted(result[mode]["latency_ms"])
        out[f"{mode}_p50_ms"] = statistics.median(latencies)
        out[f"{mode}_p90_ms"] = latencies[int(len(latencies) * 0.9)]
        out[f"{mode}_mib_s"] = statistics.median(s["mib_s"] for s in result[mode]["stream"])
        out[f"{mode}_first_byte_ms"] = statistics.median(
            s["first_byte_ms"] for s in result[mode]["stream"]
        )
    out["added_p50_ms"] = out["relay_p50_ms"] - out["direct_p50_ms"]
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--providers", default="local,docker")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    rows: dict[str, dict[str, float]] = {}
    try:
        for name in args.providers.split(","):
            rows[name] = summary(await measure(name, url, args.requests, args.mib))
    finally:
        server.shutdown()
        server.server_close()
    header = (
        "| provider | direct p50 ms | relay p50 ms | added p50 ms | direct p90 ms | relay p90 ms "
        "| direct MiB/s | relay MiB/s | direct first byte ms | relay first byte ms |"
    )
    lines = [header, "|" + "---|" * 10]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['direct_p50_ms']:.2f} | {r['relay_p50_ms']:.2f} | "
            f"{r['added_p50_ms']:.2f} | {r['direct_p90_ms']:.2f} | {r['relay_p90_ms']:.2f} | "
            f"{r['direct_mib_s']:.0f} | {r['relay_mib_s']:.0f} | "
            f"{r['direct_first_byte_ms']:.2f} | {r['relay_first_byte_ms']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        meta = {
            "requests": args.requests,
            "mib": args.mib,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "when": time.strftime("%Y-%m-%d"),
        }
        args.out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
        note = (
            "# Model relay: added latency and throughput\n\n"
            f"`python benchmarks/model_relay.py --providers {args.providers} "
            f"--requests {args.requests} --mib {args.mib} --out {args.out}`\n\n"
            "Latency: one small `POST /v1/messages` per new connection, "
            f"{args.requests} after 5 warm-up, from a probe where the CLI stands. "
            f"Throughput: a {args.mib} MiB streamed response (64 KiB events), median of 3. "
            "Direct: the probe reaches the host's loopback server itself (network host); relay: "
            "through the model relay over the sandbox's process channel.\n\n" + table + "\n"
        )
        args.out.with_suffix(".md").write_text(note)


if __name__ == "__main__":
    anyio.run(main)
