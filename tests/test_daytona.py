"""The daytona provider on the real ``daytona`` SDK, against the fake control plane in
tests/fakes/daytona (REST API and toolbox on 127.0.0.1, sandboxes as real process trees)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import SecretStr

pytest.importorskip("daytona")

from typing_extensions import override

import sandbay
from fakes.daytona import FakeDaytona
from sandbay import (
    ConfigError,
    DaytonaConfig,
    ProviderUnavailableError,
    SandboxNotFoundError,
    SandboxSpec,
)
from sandbay.testing.conformance import check_names, run_check
from wrapping import WrappedSandbox

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="the fake runs sandboxes in bwrap"),
]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeDaytona]:
    with FakeDaytona() as running:
        yield running


@pytest.fixture
def config(fake: FakeDaytona) -> DaytonaConfig:
    fake.faults.__init__()  # type: ignore[misc]
    return DaytonaConfig(api_key=SecretStr("test-key"), api_url=fake.api_url)


@pytest.mark.parametrize("check", check_names())
async def test_conformance(config: DaytonaConfig, check: str) -> None:
    await run_check(check, config, spec=SandboxSpec())


async def test_close_stdin_is_a_sentinel_the_command_never_sees(config: DaytonaConfig) -> None:
    # Daytona has no stdin EOF; the shim's end-of-input record must end cat's input, and no
    # line the user might send (not even the shim's own words) may end it early.
    async with sandbay.open_sandbox(config) as sb:
        proc = await sb.start(["cat"])
        await proc.write(b"e\nk\nd AAAA\n\x00\xff")
        await proc.close_stdin()
        assert await proc.stdout.read() == b"e\nk\nd AAAA\n\x00\xff"
        assert await proc.wait() == 0


async def test_cut_logs_stream_loses_and_repeats_nothing(
    config: DaytonaConfig, fake: FakeDaytona
) -> None:
    script = "for i in $(seq 1 400); do echo out$i; echo err$i >&2; done"
    async with sandbay.open_sandbox(config) as sb:
        for abrupt in (False, True):
            fake.faults.cut_abruptly = abrupt
            fake.faults.cut_after_bytes = 3000
            fake.faults.cut_logs = 3
            result = await sb.exec(["sh", "-c", script])
            assert fake.faults.cut_logs == 0, "the logs stream was not cut three times"
            assert result.ok
            assert result.stdout == b"".join(b"out%d\n" % i for i in range(1, 401))
            assert result.stderr == b"".join(b"err%d\n" % i for i in range(1, 401))


async def test_create_5xx_is_provider_unavailable_and_leaves_nothing(
    config: DaytonaConfig, fake: FakeDaytona
) -> None:
    before = set(fake.sandbox_ids())
    fake.faults.create_errors = 1
    with pytest.raises(ProviderUnavailableError, match="daytona"):
        async with sandbay.open_sandbox(config):
            pass
    assert set(fake.sandbox_ids()) == before


async def test_slow_starting_state_is_waited_for(config: DaytonaConfig, fake: FakeDaytona) -> None:
    fake.faults.starting_s = 1.5
    started = time.monotonic()
    async with sandbay.open_sandbox(config) as sb:
        assert time.monotonic() - started >= 1.5
        assert (await sb.exec(["echo", "up"])).stdout == b"up\n"


async def test_unknown_id_is_not_found(config: DaytonaConfig) -> None:
    with pytest.raises(SandboxNotFoundError):
        await sandbay.connect_sandbox(config, "no-such-sandbox")
    provider = sandbay.get_provider(config)
    await provider.destroy("no-such-sandbox")  # gone already: not an error


async def test_extend_sets_label_and_ttl(config: DaytonaConfig, fake: FakeDaytona) -> None:
    async with sandbay.open_sandbox(config, SandboxSpec(lifetime_s=120)) as sb:
        expiry = await sb.extend(3600)
        assert fake.sandbox_labels(sb.id)["sandbay.expiry"] == f"{int(expiry)}"
        destroy_at = fake.destroy_at(sb.id)
        assert destroy_at is not None and expiry <= destroy_at < expiry + 61
        (info,) = [i for i in await sandbay.get_provider(config).list() if i.id == sb.id]
        assert info.expiry == expiry


async def test_gc_reaps_leftovers(config: DaytonaConfig, fake: FakeDaytona) -> None:
    provider = sandbay.get_provider(config)
    left = await provider.create(SandboxSpec(lifetime_s=1, labels={"test": "gc"}))
    kept = await provider.create(SandboxSpec(lifetime_s=3600, labels={"test": "gc"}))
    try:
        removed = await provider.gc(now=time.time() + 5)
        assert [info.id for info, _ in removed] == [left.id]
        assert left.id not in fake.sandbox_ids() and kept.id in fake.sandbox_ids()
    finally:
        await left.aclose()
        await kept.aclose()


_REATTACH = """
import sys, anyio, sandbay
async def main():
    cfg = sandbay.DaytonaConfig(api_key="test-key", api_url=sys.argv[1])
    sb = await sandbay.connect_sandbox(cfg, sys.argv[2])
    print((await sb.read_file("note.txt")).decode(), sb.labels["mark"], flush=True)
    await sb.aclose()
anyio.run(main)
"""


async def test_second_process_reattaches_by_id(config: DaytonaConfig, fake: FakeDaytona) -> None:
    sb = await sandbay.create_sandbox(config, SandboxSpec(labels={"mark": "m1"}))
    try:
        await sb.write_file("note.txt", b"written by the first")
        out = await anyio.run_process(
            [sys.executable, "-c", _REATTACH, fake.api_url, sb.id], check=True
        )
        assert out.stdout.decode().split() == ["written", "by", "the", "first", "m1"]
        assert sb.id not in fake.sandbox_ids(), "the second process's aclose removed it"
    finally:
        await sb.aclose()


async def test_hostile_dotenv_in_cwd_changes_nothing(
    config: DaytonaConfig, fake: FakeDaytona, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (".env", ".env.local"):
        (tmp_path / name).write_text(
            "DAYTONA_API_URL=http://127.0.0.1:9/api\n"
            "DAYTONA_SERVER_URL=http://127.0.0.1:9/api\n"
            "DAYTONA_API_KEY=stolen-elsewhere\n"
            "DAYTONA_ORGANIZATION_ID=org-attacker\n"
            "DAYTONA_JWT_TOKEN=jwt-attacker\n"
            "DAYTONA_TARGET=attacker-region\n"
            "DAYTONA_OTEL_ENABLED=true\n"
            "DAYTONA_USE_DEPRECATED_POLLING=true\n"
        )
    monkeypatch.chdir(tmp_path)
    fake.requests.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any SDK warning fails the test
        async with sandbay.open_sandbox(config) as sb:
            assert (await sb.exec(["true"])).ok
            sdk = sb._client  # type: ignore[attr-defined]
            assert sdk._target is None and sdk._organization_id is None
            assert sdk._api_url == config.api_url and sdk._tracer_provider is None
            headers = sdk._api_client.default_headers
            assert headers["Authorization"] == "Bearer test-key"
            assert "X-Daytona-Organization-ID" not in headers
    assert fake.requests, "nothing reached the configured endpoint"


def test_missing_api_key_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DAYTONA_API_KEY", raising=False)
    from sandbay.providers.daytona._client import make_client

    with pytest.raises(ConfigError, match="DAYTONA_API_KEY"):
        make_client(DaytonaConfig())


def test_clients_share_one_verifying_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    # Each client would load the system's CA certificates twice (its API and toolbox REST
    # clients): tens of milliseconds per sandbox. They share one, which still verifies.
    import ssl

    from sandbay.providers.daytona import _client

    made: list[ssl.SSLContext] = []
    real = ssl.create_default_context

    def counting(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(ssl, "create_default_context", counting)
    monkeypatch.setattr(_client, "_shared_tls", _client._SharedTls())
    config = DaytonaConfig(api_key=SecretStr("k"), api_url="http://127.0.0.1:9/api")
    clients = [_client.make_client(config) for _ in range(3)]
    contexts = {
        id(rest.rest_client.ssl_context)
        for c in clients
        for rest in (c._api_client, c._toolbox_api_client)
    }
    assert len(made) == 1 and contexts == {id(made[0])}
    assert made[0].verify_mode == ssl.CERT_REQUIRED and made[0].check_hostname
    # Outside the construction, the SDK's modules see the real ssl module again.
    import daytona_api_client_async.rest as api_rest

    assert getattr(api_rest, "ssl") is ssl  # noqa: B009 - not exported


def test_config_reads_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAYTONA_API_KEY", "from-env")
    cfg = sandbay._config.config_from_data({"type": "daytona"})
    assert isinstance(cfg, DaytonaConfig)
    assert cfg.api_key is not None and cfg.api_key.get_secret_value() == "from-env"
    assert "api_key" not in json.dumps(cfg.public_data())


async def test_spec_limits_need_an_image(config: DaytonaConfig) -> None:
    with pytest.raises(ConfigError, match="per image"):
        async with sandbay.open_sandbox(config, SandboxSpec(cpu=2)):
            pass
    with pytest.raises(ConfigError, match="host"):
        async with sandbay.open_sandbox(config, SandboxSpec(network="host")):
            pass


def test_shim_runs_standalone() -> None:
    # The shim is plain stdlib Python run with -I -S: it must not import sandbay.
    from sandbay.providers.daytona._process import SHIM

    assert "sandbay" not in "".join(
        line for line in SHIM.splitlines() if line.startswith(("import", "from"))
    )
    assert os.path.basename(sys.executable)


class _HostNetwork(WrappedSandbox):
    """The fake's sandboxes share this machine's network (Daytona's do not): the model
    server on 127.0.0.1 is in their reach. Everything else is the daytona sandbox's own."""

    @property
    @override
    def reaches_host_loopback(self) -> bool:
        return True


async def test_run_agent_with_the_real_cli_end_to_end(config: DaytonaConfig) -> None:
    from claude_agent_sdk import AssistantMessage, ClaudeAgentOptions, ResultMessage
    from claude_agent_sdk.types import ToolResultBlock, UserMessage

    from sandbay.testing import ScriptedModel, Turn

    script = [
        Turn.tool_use("Bash", {"command": "echo daytona-$((6*7)) > made.txt; cat made.txt"}),
        Turn.text("done"),
    ]
    options = ClaudeAgentOptions(
        max_turns=4, allowed_tools=["Bash"], permission_mode="bypassPermissions"
    )
    async with ScriptedModel(script) as model, sandbay.open_sandbox(config) as inner:
        sb = _HostNetwork(inner)
        messages = [
            m
            async for m in sandbay.run_agent(
                "go", sandbox=sb, options=options, env=model.env(), timeout=180
            )
        ]
        assert await inner.read_file("made.txt") == b"daytona-42\n"
    results = [
        b
        for m in messages
        if isinstance(m, UserMessage) and isinstance(m.content, list)
        for b in m.content
        if isinstance(b, ToolResultBlock)
    ]
    assert "daytona-42" in str(results[0].content)
    assert any(isinstance(m, AssistantMessage) for m in messages)
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error


async def test_image_build_makes_the_agent_snapshot_once(
    config: DaytonaConfig, fake: FakeDaytona
) -> None:
    from sandbay._image import agent_image_recipe
    from sandbay.providers.daytona._provider import agent_snapshot

    provider = sandbay.get_provider(config)
    name = await provider.build_image()
    assert name == agent_snapshot() and agent_image_recipe().digest[:12] in name
    dockerfile = fake.snapshots[name]["buildInfo"]["dockerfileContent"]
    assert dockerfile.startswith("FROM python:3.12-slim-bookworm")
    assert agent_image_recipe().requirement in dockerfile
    assert f"{agent_image_recipe().cli_dir}:" in dockerfile
    fake.requests.clear()
    assert await provider.build_image() == name  # found: not built again
    assert ("POST", "/api/snapshots") not in fake.requests
    # A sandbox with no image starts from that snapshot.
    async with sandbay.open_sandbox(config) as sb:
        assert sb._sdk.snapshot == name  # type: ignore[attr-defined]


async def test_cli_image_build_with_provider_daytona(fake: FakeDaytona, tmp_path: Path) -> None:
    from sandbay.providers.daytona._provider import agent_snapshot

    conf = tmp_path / "sandbay.toml"
    conf.write_text(f'[provider]\ntype = "daytona"\napi_url = "{fake.api_url}"\n')
    env = {**os.environ, "DAYTONA_API_KEY": "test-key"}
    fake.snapshots.pop(agent_snapshot(), None)
    out = await anyio.run_process(
        [sys.executable, "-m", "sandbay", "image", "build", "--config", str(conf), "--refresh"],
        env=env,
        check=True,
    )
    assert out.stdout.decode().strip() == agent_snapshot()
    assert agent_snapshot() in fake.snapshots


async def test_fake_bulk_files_speak_the_sdk_protocol(config: DaytonaConfig) -> None:
    # The SDK's own bulk upload and download against the fake, checked through sandbay.
    async with sandbay.open_sandbox(config) as sb:
        sdk = sb._sdk  # type: ignore[attr-defined]
        await sdk.fs.upload_file(b"\x00bulk\xff", "/workspace/d/bulk.bin")
        assert await sb.read_file("d/bulk.bin") == b"\x00bulk\xff"
        await sb.write_file("back.bin", b"\x01back")
        assert await sdk.fs.download_file("/workspace/back.bin") == b"\x01back"


async def test_ls_all_skips_daytona_without_a_key_and_says_so(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DAYTONA_API_KEY"}
    out = await anyio.run_process(
        [sys.executable, "-m", "sandbay", "ls", "--all"], cwd=tmp_path, env=env, check=False
    )
    assert out.returncode == 0, out.stderr.decode()
    assert "daytona skipped" in out.stderr.decode() and "DAYTONA_API_KEY" in out.stderr.decode()


async def test_reading_a_process_of_a_removed_sandbox_is_not_found(
    config: DaytonaConfig,
) -> None:
    provider = sandbay.get_provider(config)
    sb = await provider.create(SandboxSpec())
    try:
        proc = await sb.start(["sleep", "60"])
        await provider.destroy(sb.id)
        started = time.monotonic()
        with pytest.raises(SandboxNotFoundError):
            await proc.stdout.read()
        assert time.monotonic() - started < 5, "it retried a stream that cannot come back"
        await proc.kill()  # harmless: nothing left to kill
    finally:
        await sb.aclose()


async def test_create_cancelled_while_starting_leaves_nothing(
    config: DaytonaConfig, fake: FakeDaytona
) -> None:
    before = set(fake.sandbox_ids())
    fake.faults.starting_s = 30
    provider = sandbay.get_provider(config)
    with anyio.move_on_after(1.5) as scope:
        await provider.create(SandboxSpec())
    assert scope.cancelled_caught
    assert set(fake.sandbox_ids()) == before
    assert ("POST", "/api/sandbox") in fake.requests


def _agent_image() -> str | None:
    """sandbay's agent image as the docker provider built it here, if it did (never built
    by this test: that takes minutes and the network)."""
    import docker

    from sandbay._image import agent_image_recipe
    from sandbay.providers.docker._image import _find

    client = docker.from_env()
    try:
        found: str | None = _find(
            client, agent_image_recipe(), base=sandbay.DockerConfig().base_image
        )
        return found
    finally:
        client.close()


@pytest.mark.docker
async def test_run_agent_in_agent_image_containers_through_the_fake() -> None:
    # The fake's other mode: each sandbox is a container of sandbay's agent image (host
    # network), so the CLI, Python and the SDK are the image's own, as on Daytona.
    from claude_agent_sdk import ClaudeAgentOptions, ResultMessage

    from sandbay.testing import ScriptedModel, Turn

    image = _agent_image()
    if image is None:
        pytest.skip("no agent image built here: run `sandbay image build --provider docker`")
    script = [
        Turn.tool_use("Bash", {"command": "cat /etc/os-release | head -1; id -un > who.txt"}),
        Turn.text("done"),
    ]
    options = ClaudeAgentOptions(
        max_turns=4, allowed_tools=["Bash"], permission_mode="bypassPermissions"
    )
    with FakeDaytona(docker_image=image) as fake:
        config = DaytonaConfig(api_key=SecretStr("test-key"), api_url=fake.api_url)
        async with ScriptedModel(script) as model, sandbay.open_sandbox(config) as inner:
            messages = [
                m
                async for m in sandbay.run_agent(
                    "go", sandbox=_HostNetwork(inner), options=options, env=model.env(),
                    timeout=180,
                )
            ]  # fmt: skip
            who = (await inner.read_file("who.txt")).decode().strip()
            assert who == (await inner.exec(["id", "-un"])).text.strip()
            cli = await inner.exec(["sh", "-c", "command -v claude"])
            assert cli.text.startswith("/opt/sandbay/bin/"), cli
        assert fake.sandbox_ids() == []
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error


async def test_user_is_honoured_when_the_sandbox_user_is_root(config: DaytonaConfig) -> None:
    async with sandbay.open_sandbox(config) as sb:
        assert (await sb.exec(["id", "-un"])).text.strip() == "root"
        result = await sb.exec(["id", "-un"], user="nobody")
        assert result.ok and result.text.strip() == "nobody", result
        result = await sb.exec(["sh", "-c", "id -u; id -g"], user="65534:65534")
        assert result.text.split() == ["65534", "65534"], result
        # nobody may not write root's workspace: the switch is real.
        denied = await sb.exec(["sh", "-c", "echo x > /workspace/nope"], user="nobody")
        assert not denied.ok and b"ermission denied" in denied.stderr


async def test_wrong_key_is_a_config_error_naming_the_key(fake: FakeDaytona) -> None:
    wrong = DaytonaConfig(api_key=SecretStr("not-the-key"), api_url=fake.api_url)
    with pytest.raises(ConfigError, match="DAYTONA_API_KEY"):
        async with sandbay.open_sandbox(wrong):
            pass
    with pytest.raises(ConfigError, match="DAYTONA_API_KEY"):
        await sandbay.get_provider(wrong).list()


async def test_connect_starts_a_stopped_sandbox(config: DaytonaConfig) -> None:
    sb = await sandbay.create_sandbox(config)
    try:
        await sb.write_file("kept.txt", b"kept")
        await sb._sdk.stop()  # type: ignore[attr-defined]
        again = await sandbay.connect_sandbox(config, sb.id)
        try:
            assert await again.read_file("kept.txt") == b"kept"
        finally:
            await again.aclose()
    finally:
        await sb.aclose()


async def test_host_network_only_where_the_control_plane_shares_this_host(
    fake: FakeDaytona,
) -> None:
    # Daytona's cloud never shares this machine's network: network="host" is refused. A
    # local control plane (this fake) may say its sandboxes do, and then a model server on
    # this machine's 127.0.0.1 is in an agent's reach (the benchmark runs on this).
    from claude_agent_sdk import ClaudeAgentOptions, ResultMessage

    from sandbay.testing import ScriptedModel, Turn

    host = SandboxSpec(network="host")
    cloud = DaytonaConfig(api_key=SecretStr("test-key"), api_url=fake.api_url)
    with pytest.raises(ConfigError, match="host's network"):
        await sandbay.get_provider(cloud).create(host)
    async with sandbay.open_sandbox(cloud) as sb:
        assert not sb.reaches_host_loopback
    local = cloud.model_copy(update={"host_network": True})
    async with ScriptedModel([Turn.text("done")]) as model:
        async with sandbay.open_sandbox(local, spec=host) as sb:
            assert sb.reaches_host_loopback
            messages = [
                m
                async for m in sandbay.run_agent(
                    "go", sandbox=sb, options=ClaudeAgentOptions(max_turns=2), env=model.env(),
                    timeout=180,
                )
            ]  # fmt: skip
            again = await sandbay.get_provider(local).connect(sb.id)
            assert again.spec.network == "host" and again.reaches_host_loopback
            await again.aclose()
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error
