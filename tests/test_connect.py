"""Reattaching by id: connect_sandbox, and runs resumed from their handle in another process."""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

import anyio
import pytest

import sandbay
from sandbay import DockerConfig, LocalConfig, RunHandle, SandboxSpec
from sandbay._provider import make_provider
from sandbay.testing import ScriptedModel, Turn

pytestmark = pytest.mark.anyio

bwrap_missing = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed")

PROVIDERS = [
    pytest.param(LocalConfig(isolate=False), id="local"),
    pytest.param(
        LocalConfig(isolate=True), id="local-isolated", marks=[pytest.mark.bwrap, bwrap_missing]
    ),
    pytest.param(DockerConfig(), id="docker", marks=pytest.mark.docker),
]


@pytest.mark.parametrize("config", PROVIDERS)
async def test_connect_rebuilds_the_spec_and_owns_the_sandbox(
    config: LocalConfig | DockerConfig,
) -> None:
    workdir = "/home/sandbay-work" if config.type == "docker" or config.isolate else "/workspace"
    spec = SandboxSpec(
        env={"GREETING": "hello there"},
        labels={"team": "a"},
        workdir=workdir,
        network="none" if config.type == "docker" else "default",
    )
    original = await sandbay.create_sandbox(config, spec)
    try:
        await original.write_file("note.txt", b"kept")
        provider = make_provider(config)  # a new instance: nothing shared with the first
        try:
            again = await sandbay.connect_sandbox(config, original.id)
            assert again is not original and again.id == original.id
            assert again.spec.env == {"GREETING": "hello there"}
            assert again.labels == original.labels
            assert again.spec.workdir == original.spec.workdir
            assert again.spec.network == original.spec.network
            assert again.workdir == original.workdir
            assert (await again.exec('printf %s "$GREETING"')).text == "hello there"
            assert (await again.read_file("note.txt")) == b"kept"
            assert (await again.exec("pwd")).text.strip() == original.workdir
            await again.aclose()
            assert original.id not in {info.id for info in await provider.list()}
        finally:
            await provider.aclose()
    finally:
        await original.aclose()  # already removed through the reattached one: no error


async def test_connect_sandbox_as_a_context_manager_removes_it_on_exit() -> None:
    config = LocalConfig(isolate=False)
    original = await sandbay.create_sandbox(config)
    async with sandbay.Providers() as providers:
        async with providers.connect_sandbox(config, original.id) as again:
            assert (await again.exec("echo ok")).text == "ok\n"
        with pytest.raises(sandbay.SandboxNotFoundError):
            await providers.connect_sandbox(config, original.id)
    await original.aclose()


# Creates a sandbox, leaves a process running in it, prints both ids and dies on the spot.
_LEAVER = """
import anyio, os, sandbay

async def main():
    sb = await sandbay.create_sandbox(sandbay.LocalConfig(isolate=False))
    started = await sb.exec("python3 -c 'import time; time.sleep(120)' >/dev/null 2>&1 & echo $!")
    print(sb.id, started.text.strip(), flush=True)
    os._exit(0)

anyio.run(main)
"""


async def test_closing_a_reattached_local_sandbox_stops_what_ran_before() -> None:
    left = await anyio.run_process([sys.executable, "-c", _LEAVER])
    sandbox_id, pid = left.stdout.decode().split()
    ended = os.pidfd_open(int(pid))  # readable once the process is gone: it runs on until then
    try:
        provider = make_provider(LocalConfig(isolate=False))
        await (await provider.connect(sandbox_id)).aclose()
        with anyio.fail_after(10):
            await anyio.wait_readable(ended)
    finally:
        os.close(ended)


def test_run_handle_round_trips_as_json_without_secrets() -> None:
    handle = RunHandle(
        provider=DockerConfig(image="img:1").public_data(),
        sandbox_id="abc",
        run_id="r1",
        last_seq=7,
        owns_sandbox=False,
    )
    again = RunHandle.from_json(handle.to_json())
    assert again == handle
    assert again.config() == DockerConfig(image="img:1")
    for bad in (
        "{",
        "[]",
        '{"version": 1}',
        handle.to_json().replace('"last_seq":7', '"last_seq":-1'),
    ):
        with pytest.raises(sandbay.ConfigError):
            RunHandle.from_json(bad)


async def test_handle_before_the_run_has_a_sandbox_is_a_config_error() -> None:
    run = sandbay.run_agent("go", provider="local", env={"ANTHROPIC_API_KEY": "x"})
    with pytest.raises(sandbay.ConfigError, match="no sandbox yet"):
        run.handle()


# Runs an agent until its first message, prints the run's handle, and dies on the spot (as a
# crashed worker would): nothing is cleaned up, the agent runs on in its sandbox.
_STARTER = """
import anyio, os, sys
import sandbay
from claude_agent_sdk import ClaudeAgentOptions

async def main():
    config = sandbay.SandbayConfig.model_validate_json(sys.argv[1])
    options = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"])
    run = sandbay.run_agent("go", provider=config.provider, spec=config.spec, options=options)
    async for message in run:
        print(run.handle().to_json(), flush=True)
        os._exit(0)

anyio.run(main)
"""

# Resumes the run from the handle on stdin and reports what it received.
_RESUMER = """
import anyio, json, sys
import sandbay

async def main():
    handle = sys.stdin.read()
    async with sandbay.resume_run(handle) as run:
        messages = [message async for message in run]
    print(json.dumps({
        "kinds": [type(m).__name__ for m in messages],
        "text": str(messages),
        "last_seq": run.last_seq,
    }))

anyio.run(main)
"""


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(sandbay.SandbayConfig(provider=LocalConfig(isolate=False)), id="local"),
        pytest.param(
            sandbay.SandbayConfig(provider=DockerConfig(), spec=SandboxSpec(network="host")),
            id="docker",
            marks=pytest.mark.docker,
        ),
    ],
)
async def test_a_run_is_resumed_from_its_handle_in_another_process(
    config: sandbay.SandbayConfig,
) -> None:
    script = [Turn.tool_use("Bash", {"command": "echo resumed-ok"}), Turn.text("done", delay_s=2)]
    async with ScriptedModel(script) as model:
        env = {**os.environ, **model.env()}
        env.pop("SANDBAY_PROVIDER", None)
        env.pop("SANDBAY_CONFIG", None)
        first = await anyio.run_process(
            [sys.executable, "-c", _STARTER, config.model_dump_json()], env=env, check=False
        )
        assert first.returncode == 0, first.stderr.decode()
        handle = RunHandle.from_json(first.stdout.decode().strip())
        # The relay numbers every line of the CLI it logs, the SDK's control lines too.
        assert handle.last_seq >= 1 and handle.owns_sandbox
        assert handle.provider["type"] == config.provider.type

        second = await anyio.run_process(
            [sys.executable, "-c", _RESUMER], input=handle.to_json().encode(), env=env, check=False
        )
        assert second.returncode == 0, second.stderr.decode()
        seen: dict[str, Any] = json.loads(second.stdout)
    kinds = seen["kinds"]
    assert "SystemMessage" not in kinds, kinds  # message 1 was the first process's
    assert kinds[-1] == "ResultMessage" and "AssistantMessage" in kinds, kinds
    assert "resumed-ok" in seen["text"]
    assert seen["last_seq"] >= handle.last_seq + len(kinds)
    # The resumed run owned the sandbox, so it removed it when it ended.
    with pytest.raises(sandbay.SandboxNotFoundError):
        await sandbay.connect_sandbox(config.provider, handle.sandbox_id)
