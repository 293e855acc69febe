"""The e2b provider against the fake E2B whose sandboxes are Docker containers.

Each fake sandbox is a container from sandbay's agent image on the host's network, set up as
the E2B agent template would be (E2B's ``user`` at uid 1000, the recipe's login profile), so
users, root and the real ``claude`` CLI behave as in an E2B sandbox built from the recipe.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from claude_agent_sdk import ClaudeAgentOptions, ResultMessage, SystemMessage

import sandbay
from e2b_fake import API_KEY, DEFAULT_TEMPLATE, FakeE2B, Template
from sandbay import DockerConfig, SandboxSpec
from sandbay._image import agent_image_recipe
from sandbay.providers.e2b import agent_template
from sandbay.providers.e2b._provider import agent_recipe
from sandbay.testing import ScriptedModel, Turn
from sandbay.testing.conformance import check_names, run_check

pytestmark = [pytest.mark.anyio, pytest.mark.docker]


def _template_profile() -> str:
    """The login profile the E2B template build writes (from the recipe's shell steps)."""
    script = agent_recipe().render_shell_script()
    found = re.search(r"<<'SANDBAY_ENV'\n(.*?)SANDBAY_ENV\n", script, re.S)
    assert found, "the recipe no longer writes its environment to a login profile"
    return found.group(1)


def _agent_image() -> str:
    from sandbay.providers.docker import DockerProvider

    async def image() -> str:
        provider = DockerProvider(DockerConfig())
        try:
            return await provider.agent_image()
        finally:
            await provider.aclose()

    return anyio.run(image)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeE2B]:
    template = Template(
        image=_agent_image(),
        profile=_template_profile(),
        users={"user": "1000:1000", "root": "root"},
    )
    templates = {DEFAULT_TEMPLATE: template, agent_template(): template}
    with FakeE2B(executor=DockerConfig(), templates=templates) as running:
        yield running


@pytest.mark.parametrize("check", check_names())
async def test_conformance_e2b_on_docker(fake: FakeE2B, check: str) -> None:
    await run_check(check, fake.config(template=None), spec=SandboxSpec())


async def test_user_and_root_are_the_template_users(fake: FakeE2B) -> None:
    async with sandbay.open_sandbox(fake.config()) as sb:
        assert (await sb.exec(["id", "-u"])).stdout == b"1000\n"
        assert (await sb.exec(["id", "-u"], user="root")).stdout == b"0\n"
        assert (await sb.exec(["sh", "-c", "command -v claude"])).ok


async def test_files_never_go_through_envd_which_reads_as_root(fake: FakeE2B) -> None:
    # envd's /files acts as root: a link the sandbox's user planted reads a root-only file
    # through it. sandbay's read_file has the user's rights and refuses.
    async with sandbay.open_sandbox(fake.config()) as sb:
        secret = "echo s3cret > /root/secret && chmod 600 /root/secret"
        await sb.exec(["sh", "-c", secret], user="root")
        await sb.exec(["ln", "-s", "/root/secret", "planted"])
        sdk: Any = sb.sdk  # type: ignore[attr-defined]
        assert await sdk.files.read(f"{sb.workdir}/planted") == "s3cret\n"
        with pytest.raises(sandbay.SandboxPermissionError):
            await sb.read_file("planted")
        with pytest.raises(sandbay.SandboxPermissionError):
            await sb.write_file("/root/owned", b"x")


async def test_run_agent_with_the_real_cli_in_a_template_sandbox(fake: FakeE2B) -> None:
    script = [Turn.tool_use("Bash", {"command": "echo e2b-$((6*7)); id -un"}), Turn.text("done")]
    options = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"])
    async with ScriptedModel(script) as model:
        run = sandbay.run_agent(
            "go", provider=fake.config(template=None), options=options, env=model.env(), timeout=180
        )
        async with run:
            messages = [m async for m in run]
        results = str(model.tool_results())
    assert isinstance(messages[0], SystemMessage) and messages[0].subtype == "init"
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error
    assert "e2b-42" in results
    assert not fake.sandboxes


async def test_image_build_makes_the_agent_template_with_e2b_template_builder() -> None:
    # `sandbay image build --provider e2b` through E2B's template API: the recipe's shell
    # steps run as root on the base (here the Docker agent image, so pip needs no network),
    # then sandboxes start from the template by its name, with no template configured.
    base = await anyio.to_thread.run_sync(_agent_image)
    with FakeE2B(executor=DockerConfig(), templates={}) as fake:
        config = fake.config(template=None, base_image=base)
        provider = sandbay.get_provider(config)
        with pytest.raises(sandbay.ImageError, match="image build --provider e2b"):
            async with sandbay.open_sandbox(config):
                pass
        name = await provider.build_image()
        assert name == agent_template() and name in fake.templates
        assert ("POST", "/v3/templates") in fake.requests
        again = len(fake.requests)
        assert await provider.build_image() == name  # found built: no second build
        assert ("POST", "/v3/templates") not in fake.requests[again:]
        async with sandbay.open_sandbox(config) as sb:
            # uid 1000 is E2B's "user" (named "sandbay" in this base, which had it already).
            login = await sb.exec(["sh", "-c", "id -u; command -v claude; pwd"])
            claude = f"{agent_image_recipe().cli_dir}/claude"
            assert login.stdout.decode().split() == ["1000", claude, "/workspace"]
            # Only the CLI: the SDK runs on the host.
            check = "import importlib.util; print(importlib.util.find_spec('claude_agent_sdk'))"
            assert (await sb.exec(["python3", "-c", check])).stdout == b"None\n"


async def test_sandbay_image_build_command_builds_the_template(tmp_path: Path) -> None:
    # The CLI as a user runs it, in another process: `sandbay image build --provider e2b`
    # with the profile's settings pointed at the fake, the key from E2B_API_KEY.
    base = await anyio.to_thread.run_sync(_agent_image)
    with FakeE2B(executor=DockerConfig(), templates={}) as fake:
        config = tmp_path / "sandbay.toml"
        config.write_text(
            f'[provider]\ntype = "e2b"\napi_url = "{fake.url}"\nsandbox_url = "{fake.url}"\n'
        )
        env = {**os.environ, "E2B_API_KEY": API_KEY}
        argv = [sys.executable, "-m", "sandbay", "image", "build", "--provider", "e2b"]
        done = await anyio.run_process(
            [*argv, "--config", str(config), "--base", base], env=env, check=False
        )
        assert done.returncode == 0, done.stderr.decode()
        assert done.stdout.decode().strip().endswith(agent_template())
        assert "building E2B template" in done.stderr.decode()
        assert agent_template() in fake.templates
