"""Leases, not owner pids: a sandbox lives as long as its lease, whoever created it.

A killed host leaves its run's sandbox behind for about one (short) lease: docker's container
stops by itself, `gc` removes the local one. A sandbox whose creator died but whose lease
runs is kept (a restarted worker finds it again), wherever gc runs. The sandbox's own user
cannot extend its lease.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import uuid
from typing import Any

import anyio
import anyio.abc
import pytest

import sandbay
from sandbay import LocalConfig, SandboxSpec
from sandbay.testing import ScriptedModel, Turn

pytestmark = pytest.mark.anyio

LOCAL = LocalConfig(isolate=False)
PROVIDERS = [
    pytest.param("local", id="local"),
    pytest.param("docker", id="docker", marks=pytest.mark.docker),
]


def _config(provider: str) -> LocalConfig | str:
    return LOCAL if provider == "local" else provider


def _spec(provider: str, **fields: Any) -> SandboxSpec:
    if provider == "docker":
        fields.setdefault("network", "none")
    return SandboxSpec(labels={"test-lease": uuid.uuid4().hex}, **fields)


async def _info(provider: str, sandbox_id: str) -> sandbay.SandboxInfo | None:
    found = await sandbay.get_provider(_config(provider)).list()
    return next((info for info in found if info.id == sandbox_id), None)


def _running(sandbox_id: str) -> bool:
    import docker

    client = docker.from_env()
    try:
        return bool(client.api.inspect_container(sandbox_id)["State"]["Running"])
    except docker.errors.NotFound:
        return False
    finally:
        client.close()


def _wait_stopped(sandbox_id: str, timeout: float) -> None:
    import docker

    client = docker.from_env(timeout=int(timeout) + 5)
    try:
        client.api.wait(sandbox_id, timeout=timeout)  # raises if it runs on past timeout
    finally:
        client.close()


async def _first_line(proc: anyio.abc.Process, timeout: float) -> str:
    assert proc.stdout is not None
    data = b""
    with anyio.fail_after(timeout):
        while b"\n" not in data:
            data += await proc.stdout.receive()
    return data.decode().splitlines()[0]


# A worker that creates a sandbox with an hour's lease and is killed before it closes it.
_WORKER = """
import os, signal, sys, anyio, sandbay
async def main():
    config = sandbay.LocalConfig(isolate=False) if sys.argv[1] == "local" else "docker"
    spec = sandbay.SandboxSpec.model_validate_json(sys.argv[2])
    sb = await sandbay.create_sandbox(config, spec)
    print(sb.id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
anyio.run(main)
"""


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_killed_workers_sandbox_lives_out_its_lease_wherever_gc_runs(
    provider: str,
) -> None:
    spec = _spec(provider, lifetime_s=3600)
    worker = await anyio.run_process(
        [sys.executable, "-c", _WORKER, provider, spec.model_dump_json()], check=False
    )
    assert worker.returncode == -signal.SIGKILL
    orphan = worker.stdout.decode().strip()
    # And one whose creator (this process) is alive, judged by a gc in another PID namespace,
    # where this process's pid means nothing.
    async with sandbay.open_sandbox(_config(provider), _spec(provider, lifetime_s=3600)) as live:
        try:
            removed = await sandbay.get_provider(_config(provider)).gc()
            assert orphan not in {info.id for info, _ in removed}, "gc removed a leased sandbox"
            gc = [sys.executable, "-m", "sandbay", "gc", "--provider", provider]
            if shutil.which("unshare") and os.geteuid() == 0:
                gc = ["unshare", "--pid", "--fork", *gc]
            result = await anyio.run_process(gc, check=False)
            assert result.returncode == 0, result.stderr.decode()
            output = result.stdout.decode()
            assert orphan not in output and live.id not in output, output
            assert await _info(provider, orphan) is not None
            assert await _info(provider, live.id) is not None
            assert (await live.exec(["true"])).ok
        finally:
            await sandbay.get_provider(_config(provider)).destroy(orphan)


# A host process running an agent with a 3 s lease; it prints the sandbox's id and first
# expiry at the first message, and the model keeps it waiting until it is killed.
_HOST = """
import json, sys, anyio, sandbay, sandbay._agent
from claude_agent_sdk import ClaudeAgentOptions
sandbay._agent.RUN_LEASE_S = 3.0
async def main():
    provider, env = sys.argv[1], json.loads(sys.argv[2])
    config = sandbay.LocalConfig(isolate=False) if provider == "local" else "docker"
    spec = sandbay.SandboxSpec(network="host") if provider == "docker" else sandbay.SandboxSpec()
    options = ClaudeAgentOptions(max_turns=1)
    run = sandbay.run_agent("go", provider=config, spec=spec, env=env, options=options)
    async with run:
        async for _ in run:
            assert run.sandbox is not None
            print(run.sandbox.id, run.sandbox.expiry, flush=True)
anyio.run(main)
"""


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_killed_runs_sandbox_expires_one_short_lease_later(provider: str) -> None:
    async with (
        ScriptedModel([Turn.text("slow", delay_s=120)]) as model,
        await anyio.open_process(
            [sys.executable, "-c", _HOST, provider, json.dumps(model.env())]
        ) as host,
    ):
        try:
            sandbox_id, first_text = (await _first_line(host, timeout=120)).split()
            first = float(first_text)
            assert first <= time.time() + 4, "the run's sandbox got a long lease"
            # Past its first lease, the live run has renewed it: nothing removes it.
            await anyio.sleep(max(0.0, first - time.time()) + 2.5)
            assert host.returncode is None
            removed = await sandbay.get_provider(_config(provider)).gc()
            assert sandbox_id not in {info.id for info, _ in removed}
            info = await _info(provider, sandbox_id)
            assert info is not None and info.expiry is not None and info.expiry > first
            if provider == "docker":
                assert _running(sandbox_id)
        finally:
            host.kill()
            await host.wait()
        renewed = info.expiry
    if provider == "docker":
        # Its main process ends the container once the lease passes (looked at every 2 s).
        await anyio.to_thread.run_sync(_wait_stopped, sandbox_id, renewed - time.time() + 15)
        assert time.time() >= renewed - 1, "the container stopped before its lease ended"
    else:
        await anyio.sleep(max(0.0, renewed - time.time()) + 0.1)
    removed = await sandbay.get_provider(_config(provider)).gc()
    # Not among them: another process's gc on this machine was quicker.
    assert dict((info.id, why) for info, why in removed).get(sandbox_id) in ("expired", None)
    assert await _info(provider, sandbox_id) is None


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_renewed_sandbox_outlives_its_first_lease(provider: str) -> None:
    async with sandbay.open_sandbox(_config(provider), _spec(provider, lifetime_s=2)) as sb:
        first = sb.expiry
        assert first is not None
        for _ in range(5):  # about 5 s: past the first lease and one look of docker's
            expiry = await sb.extend(3)
            assert sb.expiry == expiry >= time.time() + 2
            await anyio.sleep(1)
        assert time.time() > first + 1.5
        removed = await sandbay.get_provider(_config(provider)).gc()
        assert sb.id not in {info.id for info, _ in removed}
        assert (await sb.exec(["true"])).ok


@pytest.mark.docker
async def test_docker_sandbox_user_cannot_extend_its_own_lease() -> None:
    async with sandbay.open_sandbox("docker", _spec("docker", lifetime_s=60)) as sb:
        expiry = sb.expiry
        later = int(time.time()) + 10**6
        attempts = [
            f"echo {later} > /run/sandbay/expiry",
            f"echo {later} > /tmp/e && mv -f /tmp/e /run/sandbay/expiry",
            "rm -f /run/sandbay/expiry",
            "chmod 666 /run/sandbay/expiry",
            f"echo {later} > /run/sandbay/.expiry.1",
        ]
        for attempt in attempts:
            result = await sb.exec(attempt)
            assert not result.ok, f"the sandbox's user could run {attempt!r}"
        kept = await sb.exec(["cat", "/run/sandbay/expiry"], user="0")
        assert kept.text.strip() == f"{expiry:.0f}"
        info = await _info("docker", sb.id)
        assert info is not None and info.expiry == expiry


@pytest.mark.docker
async def test_docker_lease_in_an_image_without_python_is_kept_by_the_shell() -> None:
    from sandbay.providers.docker._sandbox import lease_command

    async with sandbay.open_sandbox("docker", _spec("docker")) as sb:
        tools = "mkdir chmod date sleep"
        setup = f"mkdir -p /nopy && for t in {tools}; do ln -sf $(command -v $t) /nopy/; done"
        assert (await sb.exec(setup, user="0")).ok
        argv = lease_command(time.time() + 2)
        argv[0], argv[4] = "/bin/sh", "/tmp/lease/expiry"
        started = time.monotonic()
        result = await sb.exec(argv, user="0", env={"PATH": "/nopy"}, timeout=30)
        took = time.monotonic() - started
        assert result.ok, result.stderr
        assert 0.5 < took < 12, f"the shell's lease ended after {took:.1f} s, not about 2"
        written = await sb.exec(["stat", "-c", "%U %a", "/tmp/lease", "/tmp/lease/expiry"])
        assert written.text.split("\n")[:2] == ["root 755", "root 644"]
