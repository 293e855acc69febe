"""The modal provider on the real ``modal`` SDK, against the local fake control plane.

What a Modal account would show, shown against `fakes.modal.FakeModal`: the SDK's own gRPC
calls, the fake's sandboxes real containers of sandbay's agent image. Faults the fake
injects (UNAVAILABLE on create, revoked router JWTs, short-lived auth tokens, cut stdio
streams, a slow image build) must be invisible to the caller or reported as sandbay's
errors, with nothing left running.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from claude_agent_sdk import AssistantMessage, ClaudeAgentOptions, ResultMessage, ToolUseBlock

import sandbay
from sandbay import (
    ConfigError,
    ModalConfig,
    Providers,
    ProviderUnavailableError,
    SandboxNotFoundError,
    SandboxSpec,
)
from sandbay._image import agent_image_recipe
from sandbay.testing import ScriptedModel, Turn

pytest.importorskip("modal")

from fakes.modal import FakeModal
from modal_support import agent_image, fake_config

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

SPEC = SandboxSpec(network="none")


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeModal]:
    with FakeModal(agent_image()) as running:
        yield running


@pytest.fixture
def faults(fake: FakeModal) -> Iterator[FakeModal]:
    """The fake, with its faults reset after the test."""
    try:
        yield fake
    finally:
        fake.faults.unavailable_creates = 0
        fake.faults.cut_stdio_every = None
        fake.faults.image_build_s = 0.0
        fake.faults.auth_token_lifetime_s = 3600.0
        fake.faults.router_jwt_lifetime_s = 3600.0


@pytest.fixture
async def providers() -> AsyncIterator[Providers]:
    async with Providers() as made:
        yield made


async def test_create_maps_the_spec_onto_modal(fake: FakeModal, providers: Providers) -> None:
    spec = SandboxSpec(
        cpu=0.5, memory_mb=768, env={"GREETING": "hi"}, labels={"team": "a"}, network="none"
    )
    async with providers.open_sandbox(fake_config(fake), spec) as sb:
        definition = fake.definition_of(sb.id)
        assert definition.resources.milli_cpu == 500
        assert definition.resources.milli_cpu_max == 500
        assert definition.resources.memory_mb == definition.resources.memory_mb_max == 768
        assert definition.timeout_secs == 86400  # Modal's backstop; the lease ends it sooner
        blocked = definition.network_access.NetworkAccessType.BLOCKED
        assert definition.network_access.network_access_type == blocked
        assert definition.workdir == "/workspace"
        assert list(definition.entrypoint_args)[:2] == ["sh", "-c"]  # the lease
        tags = fake.tags_of(sb.id)
        assert tags["team"] == "a" and tags["sandbay.managed"] == "1"
        assert tags["sandbay.expiry"] == sb.labels["sandbay.expiry"]
        # Values Modal's tag rule refuses are stored encoded, and read back as they were.
        assert tags["sandbay.owner"].startswith("b64.")
        listed = {info.id: info for info in await providers.get(fake_config(fake)).list()}
        assert listed[sb.id].owner == sb.labels["sandbay.owner"]
        assert listed[sb.id].labels == sb.labels
        result = await sb.exec(["sh", "-c", 'echo "$GREETING $IS_SANDBOX $(id -u) $HOME $PWD"'])
        assert result.text == "hi 1 1000 /home/sandbay /workspace\n", result
        # Modal's sandboxes run as root: every one says it is a sandbox, whatever its image.
        assert fake.env_of(sb.id) == {"IS_SANDBOX": "1", "GREETING": "hi"}
        as_root = await sb.exec(["id", "-u"], user="root")
        assert as_root.text == "0\n"
    assert sb.id not in fake.live_sandboxes()


async def test_agent_image_is_the_recipe_rendered_for_modal(
    fake: FakeModal, providers: Providers
) -> None:
    provider = providers.get(fake_config(fake))
    assert (await provider.build_image()).startswith("im-")
    # Modal keeps a built image for the process: whichever test built it first, it is here.
    commands = [c for image in fake.images for c in image.dockerfile_commands]
    assert "FROM python:3.12-slim-bookworm" in commands
    run = next(c for c in commands if "base64 -d" in c)
    script = base64.b64decode(run.split("echo ", 1)[1].split(" |", 1)[0]).decode()
    assert script == agent_image_recipe().render_shell_script()
    env = " ".join(commands)
    assert "IS_SANDBOX" in env and f"{agent_image_recipe().cli_dir}:" in env


async def test_a_configured_image_is_used_as_is(fake: FakeModal, providers: Providers) -> None:
    before = len(fake.images)
    config = fake_config(fake, image="registry.example/agent:1")
    async with providers.open_sandbox(config, SPEC) as sb:
        assert (await sb.exec(["true"])).ok
    commands = [c for image in fake.images[before:] for c in image.dockerfile_commands]
    assert commands == ["FROM registry.example/agent:1"]


async def test_unavailable_on_create_is_retried_then_reported(
    faults: FakeModal, providers: Providers
) -> None:
    faults.faults.unavailable_creates = 1  # the SDK retries a transient failure
    async with providers.open_sandbox(fake_config(faults), SPEC) as sb:
        assert (await sb.exec(["true"])).ok
    live = set(faults.live_sandboxes())
    faults.faults.unavailable_creates = 1000
    with pytest.raises(ProviderUnavailableError, match="cannot reach Modal"):
        async with providers.open_sandbox(fake_config(faults), SPEC):
            pass
    assert set(faults.live_sandboxes()) == live  # nothing left behind


async def test_expired_router_jwts_are_refreshed(faults: FakeModal, providers: Providers) -> None:
    faults.faults.router_jwt_lifetime_s = 2.0  # the fake refuses a router JWT past its expiry
    async with providers.open_sandbox(fake_config(faults), SPEC) as sb:
        assert (await sb.exec(["echo", "one"])).text == "one\n"
        before = faults.calls.count("SandboxGetCommandRouterAccess")
        await anyio.sleep(2.5)  # the JWT the client holds has expired now
        assert (await sb.exec(["echo", "two"])).text == "two\n"
        assert faults.calls.count("SandboxGetCommandRouterAccess") > before


async def test_expired_auth_tokens_are_renewed(faults: FakeModal) -> None:
    faults.faults.auth_token_lifetime_s = 2.0  # the fake refuses a token past its expiry
    async with Providers() as providers:
        provider = providers.get(fake_config(faults))
        async with providers.open_sandbox(fake_config(faults), SPEC) as sb:
            issued = faults.calls.count("AuthTokenGet")
            await anyio.sleep(2.5)  # the token the client holds has expired now
            assert sb.id in {info.id for info in await provider.list()}
            assert faults.calls.count("AuthTokenGet") > issued


async def test_cut_stdio_streams_lose_and_duplicate_nothing(
    faults: FakeModal, providers: Providers
) -> None:
    faults.faults.cut_stdio_every = 7000  # every read stream is cut after 7000 bytes
    script = (
        "import sys\n"
        "for i in range(20000):\n"
        "    sys.stdout.write(f'out {i:06d}\\n'); sys.stderr.write(f'err {i:06d}\\n')\n"
    )
    async with providers.open_sandbox(fake_config(faults), SPEC) as sb:
        cut_before = faults.calls.count("TaskExecStdioRead")
        result = await sb.exec(["python3", "-c", script], timeout=120)
        assert result.ok, result.stderr[-500:]
        assert result.stdout == b"".join(b"out %06d\n" % i for i in range(20000))
        assert result.stderr == b"".join(b"err %06d\n" % i for i in range(20000))
        # 240 000 bytes a stream, cut every 7000: the SDK reopened each many times.
        assert faults.calls.count("TaskExecStdioRead") - cut_before > 60


async def test_slow_image_build_is_waited_for(faults: FakeModal, providers: Providers) -> None:
    faults.faults.image_build_s = 1.5
    before = faults.calls.count("ImageJoinStreaming")
    # An image not built before in this process (Modal keeps built ones).
    config = fake_config(faults, image=f"registry.example/slow:{uuid.uuid4().hex[:8]}")
    started = time.monotonic()
    async with providers.open_sandbox(config, SPEC) as sb:
        assert time.monotonic() - started >= 1.5
        assert (await sb.exec(["true"])).ok
    assert faults.calls.count("ImageJoinStreaming") > before


async def test_gc_reaps_leftovers_and_keeps_the_rest(fake: FakeModal) -> None:
    config = fake_config(fake)
    async with Providers() as providers:
        provider = providers.get(config)
        short = await providers.create_sandbox(config, SandboxSpec(network="none", lifetime_s=60))
        kept = await providers.create_sandbox(config, SandboxSpec(network="none", lifetime_s=7200))
        try:
            # An hour on, the first lease has run out and the second has not.
            removed = await provider.gc(now=time.time() + 3600)
            assert [(info.id, why) for info, why in removed] == [(short.id, "expired")]
            assert short.id not in fake.live_sandboxes()
            assert kept.id in fake.live_sandboxes()
        finally:
            await short.aclose()
            await kept.aclose()


async def test_the_lease_ends_the_sandbox_on_modal(fake: FakeModal, providers: Providers) -> None:
    config = fake_config(fake)
    sb = await providers.create_sandbox(config, SandboxSpec(network="none", lifetime_s=2))
    try:
        assert await anyio.to_thread.run_sync(fake.wait_finished, sb.id, 60.0)
        with pytest.raises(SandboxNotFoundError):
            await providers.get(config).connect(sb.id)
    finally:
        await sb.aclose()


_REATTACH = textwrap.dedent(
    """
    import json, sys
    import anyio
    from pydantic import SecretStr
    import sandbay

    async def main() -> None:
        config = sandbay.ModalConfig(
            server_url=sys.argv[1], token_id=SecretStr("ak-fake"), token_secret=SecretStr("as")
        )
        async with sandbay.Providers() as providers:
            sb = await providers.get(config).connect(sys.argv[2])
            data = await sb.read_file("note.txt")
            result = await sb.exec(["sh", "-c", "echo $$ > second.pid; id -u"])
            print(json.dumps({"data": data.decode(), "uid": result.text.strip(),
                              "team": sb.labels.get("team")}))

    anyio.run(main)
    """
)


async def test_a_second_process_reattaches_by_id(fake: FakeModal, providers: Providers) -> None:
    spec = SandboxSpec(network="none", labels={"team": "b"})
    async with providers.open_sandbox(fake_config(fake), spec) as sb:
        await sb.write_file("note.txt", b"from the first process")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
        done = await anyio.run_process(
            [sys.executable, "-W", "error", "-c", _REATTACH, fake.url, sb.id],
            env=env,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        seen = json.loads(done.stdout.decode().splitlines()[-1])
        assert seen == {"data": "from the first process", "uid": "1000", "team": "b"}
        assert (await sb.read_file("second.pid")).strip().isdigit()


async def test_config_problems_are_config_errors(fake: FakeModal, providers: Providers) -> None:
    cloud = fake_config(fake).model_copy(update={"host_network": False})
    with pytest.raises(ConfigError, match="network='host' is not possible on Modal"):
        async with providers.open_sandbox(cloud, SandboxSpec(network="host")):
            pass
    no_token = ModalConfig(server_url=fake.url, token_id=None, token_secret=None)
    with pytest.raises(ConfigError, match="MODAL_TOKEN_ID"):
        async with providers.open_sandbox(no_token, SPEC):
            pass


def test_labels_become_valid_modal_tags_and_back() -> None:
    from sandbay.providers.modal._tags import labels_to_tags, tags_to_labels

    labels = {
        "plain": "v1.2_x-y",
        "path": "/workspace/a b",
        "sandbay.owner": "h" * 80 + ":1234",
        "tricky": "b64.looks-encoded",
    }
    tags = labels_to_tags(labels)
    assert all(re.fullmatch(r"[a-zA-Z0-9._-]{1,63}", v) for v in tags.values()), tags
    back = tags_to_labels(tags)
    assert {k: back[k] for k in ("plain", "path", "tricky")} == {
        k: labels[k] for k in ("plain", "path", "tricky")
    }
    assert back["sandbay.owner"].endswith(":1234")  # informational: the host part shortened
    with pytest.raises(ConfigError, match="cannot be a Modal tag"):
        labels_to_tags({"bad key": "v"})
    with pytest.raises(ConfigError, match="too long for a Modal tag"):
        labels_to_tags({"long": "x" * 64})


async def test_status_says_whether_modal_answers(fake: FakeModal, providers: Providers) -> None:
    status = await providers.get(fake_config(fake)).status()
    assert status.installed and status.reachable, status
    assert fake.url in status.detail
    no_token = ModalConfig(server_url=fake.url, token_id=None, token_secret=None)
    status = await providers.get(no_token).status()
    assert status.installed and not status.reachable
    assert "MODAL_TOKEN_ID" in status.detail


def test_the_token_is_not_in_public_data() -> None:
    from pydantic import SecretStr

    config = ModalConfig(token_id=SecretStr("ak-1"), token_secret=SecretStr("as-1"))
    data = config.public_data()
    assert "token_id" not in data and "token_secret" not in data
    assert "as-1" not in json.dumps(data)


async def test_run_agent_with_the_real_cli_through_the_fake(fake: FakeModal) -> None:
    script: list[Any] = [
        Turn.tool_use("Bash", {"command": "echo modal-$((6*7)) && id -u"}),
        Turn.text("done"),
    ]
    options = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"])
    async with ScriptedModel(script) as model:
        run = sandbay.run_agent(
            "go",
            provider=fake_config(fake),
            options=options,
            env=model.env(),
            spec=SandboxSpec(network="host"),
            timeout=180,
        )
        async with run:
            messages = [message async for message in run]
        results = str(model.tool_results())
    assert any(
        isinstance(b, ToolUseBlock)
        for m in messages
        if isinstance(m, AssistantMessage)
        for b in m.content
    )
    assert "modal-42" in results and "1000" in results
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error
    assert run.sandbox is not None and run.sandbox.id not in fake.live_sandboxes()


def test_only_the_provider_imports_modal() -> None:
    code = "import sandbay, sys; sandbay.ModalConfig(); print('modal' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
