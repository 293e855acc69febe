"""The agent image recipe, its renderings, the ``build_image`` hook and ``sandbay image build``."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import pytest
from typing_extensions import override

import sandbay
from sandbay import ConfigError, LocalConfig, SandboxSpec
from sandbay._image import (
    AgentImageRecipe,
    ImageUser,
    agent_image_recipe,
    host_cli,
    sdk_version,
)
from sandbay._provider import Provider, ProviderStatus, SandboxInfo
from sandbay._sandbox import Sandbox
from sandbay.providers.local import LocalProvider

SRC = Path(sandbay.__file__).parent


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "SANDBAY_"))}
    return subprocess.run(
        [sys.executable, "-m", "sandbay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
        check=False,
    )


# --- the recipe ----------------------------------------------------------------------------


def test_recipe_pins_the_hosts_cli_and_hashes_its_content() -> None:
    recipe = agent_image_recipe()
    cli = host_cli()
    assert recipe.sdk_version == sdk_version()
    assert (recipe.cli_version, recipe.cli_sha256) == (cli.version, cli.sha256)
    assert recipe.cli_version[0].isdigit() and " " not in recipe.cli_version
    assert recipe.cli_path == "/opt/sandbay/bin/claude"
    assert agent_image_recipe().digest == recipe.digest  # same content, same digest
    assert recipe.tag == f"sandbay-agent:{recipe.digest}" and len(recipe.digest) == 12
    changed = [
        dataclasses.replace(recipe, sdk_version="0.0.1"),
        dataclasses.replace(recipe, cli_version="0.0.1"),
        dataclasses.replace(recipe, cli_sha256="0" * 64),
        dataclasses.replace(recipe, user=ImageUser(uid=1001)),
        dataclasses.replace(recipe, workdir="/work"),
        dataclasses.replace(recipe, revision="3"),
    ]
    assert len({recipe.digest, *(r.digest for r in changed)}) == 1 + len(changed)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.workdir = "/elsewhere"  # type: ignore[misc]


def test_host_cli_is_the_sdks_bundled_binary_with_its_recorded_hash() -> None:
    cli = host_cli()
    assert cli.path.name == "claude" and cli.path.parent.name == "_bundled"
    assert os.access(cli.path, os.X_OK) and cli.path.stat().st_size == cli.size
    digest = hashlib.sha256()
    with cli.path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == cli.sha256
    with cli.path.open("rb") as fh:
        assert fh.read(4) == b"\x7fELF"
    assert cli.machine == platform.machine() and cli.glibc >= (2, 17)


def test_is_sandbox_only_behind_a_real_boundary() -> None:
    recipe = AgentImageRecipe(sdk_version="0.1.0")
    assert recipe.environment()["IS_SANDBOX"] == "1"
    unbounded = recipe.environment(isolated=False)
    assert "IS_SANDBOX" not in unbounded
    assert unbounded == {"SHELL": "/bin/bash", "LANG": "C.UTF-8"}
    assert "IS_SANDBOX" not in recipe.render_shell_script(isolated=False)
    assert "export IS_SANDBOX=1" in recipe.render_shell_script()


def test_shell_rendering_is_a_posix_script_of_the_same_recipe() -> None:
    recipe = AgentImageRecipe(sdk_version="0.1.0", user=ImageUser(uid=1234, gid=1235))
    for script in (
        recipe.render_shell_script(cli_source="/upload dir/claude"),
        recipe.render_shell_script(find_links="/wheels dir"),
    ):
        parsed = subprocess.run(["sh", "-n"], input=script, text=True, capture_output=True)
        assert parsed.returncode == 0, parsed.stderr
        lines = script.splitlines()
        assert lines[0] == "#!/bin/sh" and "set -eu" in lines
        assert "useradd --uid 1234 --gid 1235" in script
        assert "mkdir -p /workspace && chown 1234:1235 /workspace" in script
        assert "export PATH=/opt/sandbay/bin:" in script
        assert "/opt/sandbay/bin/claude --version" in script
        # Nothing is installed into the image's Python: no venv or pip survives the script.
        assert "VIRTUAL_ENV" not in script and "/opt/sandbay/venv" not in script
    uploaded = recipe.render_shell_script(cli_source="/upload dir/claude")
    assert "install -m 0755 '/upload dir/claude' /opt/sandbay/bin/claude" in uploaded
    assert "pip" not in uploaded and "apt-get install -y -qq python3\n" in uploaded
    fetched = recipe.render_shell_script(find_links="/wheels dir")
    install = next(line for line in fetched.splitlines() if " -m pip install " in line)
    wheels = "--no-deps --no-index --find-links '/wheels dir' claude-agent-sdk==0.1.0"
    assert install.endswith(wheels)
    assert fetched.rstrip().count("rm -rf /tmp/sandbay-cli-fetch") == 2
    # Without wheels at hand it fetches from the index.
    assert "--no-index" not in recipe.render_shell_script()


def test_docker_rendering_holds_only_the_cli_and_is_pinned() -> None:
    # Tags hash the Dockerfile: any change to its text makes every engine build again.
    pytest.importorskip("docker")
    from sandbay.providers.docker._image import render_dockerfile

    recipe = AgentImageRecipe(sdk_version="0.1.0", cli_version="2.0.0", cli_sha256="ab" * 32)
    text = render_dockerfile(recipe, base="sandbay-base:bookworm")
    assert hashlib.sha256(text.encode()).hexdigest() == (
        "3e9559af645543853c05cfbc4a115c4cb0f50d225db714a0e843aa483cea48f4"
    ), text
    assert "COPY claude /opt/sandbay/bin/claude" in text
    assert "claude CLI 2.0.0 (sha256 " + "ab" * 32 + ")" in text
    for absent in ("pip", "venv", "wheels", "AS install"):
        assert absent not in text
    other = AgentImageRecipe(sdk_version="0.1.0", user=ImageUser(uid=2000, gid=2000))
    rendered = render_dockerfile(other, base="debian:12")
    assert "USER 2000:2000" in rendered and "FROM debian:12\n" in rendered


# --- no import cycle through the image code ------------------------------------------------


def _imports(path: Path, module: str) -> set[str]:
    """sandbay modules ``path`` imports anywhere (functions too), except for type checking."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sandbay"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("sandbay"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if _module_path(sub) is not None else target)
    return {name for name in found if _module_path(name) is not None}


def _module_path(name: str) -> Path | None:
    relative = Path(*name.split(".")[1:])
    for candidate in (SRC / relative / "__init__.py", SRC / relative.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _graph() -> dict[str, set[str]]:
    graph = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(("sandbay", *parts[: -1 if parts[-1] == "__init__" else None]))
        graph[name] = _imports(path, name)
    return graph


def _reachable(graph: Mapping[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return seen


def test_image_code_is_on_no_import_cycle() -> None:
    graph = _graph()
    recipe, docker = "sandbay._image", "sandbay.providers.docker._image"
    assert docker in graph, "docker's image building lives in providers/docker"
    for module in (recipe, docker):
        assert module not in _reachable(graph, module), f"{module} imports itself back"
    # The recipe is neutral: no provider and no agent layer beneath it.
    beneath = _reachable(graph, recipe)
    assert not {m for m in beneath if m.startswith("sandbay.providers")}
    assert not beneath & {"sandbay._agent", "sandbay._pool", "sandbay._api"}


# --- the build_image hook --------------------------------------------------------------------


class _Imageless(Provider):
    """A provider of nothing, to see what the hook does when a provider does not override it."""

    name = "imageless"

    @override
    async def create(self, spec: SandboxSpec) -> Sandbox:
        raise NotImplementedError

    @override
    async def connect(self, sandbox_id: str) -> Sandbox:
        raise NotImplementedError

    @override
    async def list(self, *, labels: Mapping[str, str] | None = None) -> list[SandboxInfo]:
        return []

    @override
    async def destroy(self, sandbox_id: str) -> None:
        pass

    @override
    async def status(self) -> ProviderStatus:
        return ProviderStatus(self.name, installed=True, reachable=True, detail="")


@pytest.mark.anyio
async def test_providers_without_images_say_so() -> None:
    with pytest.raises(ConfigError, match="the imageless provider has no images"):
        await _Imageless(LocalConfig()).build_image()
    with pytest.raises(ConfigError, match="local provider runs on this machine and has no images"):
        await LocalProvider(LocalConfig()).build_image()


def test_cli_image_build_for_a_provider_without_images(tmp_path: Path) -> None:
    result = run_cli("image", "build", "--provider", "local", cwd=tmp_path)
    assert result.returncode == 1
    assert "the local provider runs on this machine and has no images" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


# --- sandbay image build, and the first use inside `run`, on Docker -------------------------


@pytest.mark.docker
def test_cli_image_build_shows_progress_and_prints_the_tag(tmp_path: Path) -> None:
    from sandbay.providers.docker._image import build_agent_image

    for args in ((), ("--provider", "docker")):
        result = run_cli("image", "build", *args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        tag = result.stdout.strip()
        assert tag.startswith("sandbay-agent:")
        progress = result.stderr.splitlines()
        assert "sandbay: agent image: probing base image sandbay-base:bookworm" in progress
        assert f"sandbay: agent image: {tag} is already built" in progress
    assert build_agent_image() == tag


@pytest.mark.docker
def test_cli_image_build_takes_the_base_from_the_config_or_the_flag(tmp_path: Path) -> None:
    config = tmp_path / "docker.toml"
    config.write_text('[provider]\ntype = "docker"\nbase_image = "sandbay-no-such-base:1"\n')
    from_config = run_cli("image", "build", "--config", str(config), cwd=tmp_path)
    assert from_config.returncode == 1
    assert "'sandbay-no-such-base:1' is not present" in from_config.stderr
    flag = run_cli(
        "image", "build", "--config", str(config), "--base", "sandbay-no:2", cwd=tmp_path
    )
    assert flag.returncode == 1 and "'sandbay-no:2' is not present" in flag.stderr


@pytest.mark.docker
def test_cli_run_shows_the_first_use_build(tmp_path: Path) -> None:
    # A base nobody built: the run must first build the agent image, and says so as it starts.
    config = tmp_path / "sandbay.toml"
    config.write_text('[provider]\ntype = "docker"\nbase_image = "sandbay-no-such-base:3"\n')
    result = run_cli("run", "hello", "--offline", cwd=tmp_path)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert (
        "sandbay: agent image: no agent image for sandbay-no-such-base:3 yet: "
        "building it (a minute or two)" in lines
    ), result.stderr
    assert any("'sandbay-no-such-base:3' is not present" in line for line in lines)


@pytest.mark.docker
def test_shell_rendering_builds_a_working_agent_image_in_the_base() -> None:
    # The script's steps, run in the plain base without network, with the host's CLI
    # uploaded: what the Dockerfile gives (the CLI on PATH, the user, no SDK in its Python).
    import docker

    from sandbay.providers.docker._image import DEFAULT_BASE_IMAGE

    cli = host_cli()
    script = agent_image_recipe().render_shell_script(cli_source="/upload/claude")
    check = (
        "sh /recipe.sh >/tmp/log 2>&1 || { tail -20 /tmp/log; exit 1; }; "
        ". /etc/profile.d/sandbay-agent.sh; command -v claude; claude --version; "
        "python3 -c 'import claude_agent_sdk' 2>/dev/null && echo sdk-importable; "
        'id -u sandbay; stat -c %U /workspace; echo "IS_SANDBOX=$IS_SANDBOX"; '
        "sh /recipe.sh >/dev/null 2>&1 && echo again"
    )
    client = docker.from_env()
    try:
        out = client.containers.run(
            DEFAULT_BASE_IMAGE,
            ["sh", "-c", f"cat > /recipe.sh <<'EOF'\n{script}EOF\n{check}"],
            remove=True,
            network_mode="none",
            volumes={str(cli.path.parent): {"bind": "/upload", "mode": "ro"}},
        ).decode()
    finally:
        client.close()
    lines = out.splitlines()
    assert lines[0] == "/opt/sandbay/bin/claude", out
    assert lines[1] == f"{cli.version} (Claude Code)", out
    assert lines[2:] == ["1000", "sandbay", "IS_SANDBOX=1", "again"], out


@pytest.mark.docker
def test_docker_image_holds_the_cli_and_no_sdk() -> None:
    import docker

    from sandbay.providers.docker._image import AGENT_IMAGE, build_agent_image

    tag = build_agent_image()
    cli = host_cli()
    script = (
        "import importlib.util, shutil, subprocess, sys\n"
        "print(sys.executable)\n"
        "print(importlib.util.find_spec('claude_agent_sdk'))\n"
        "print(shutil.which('claude'))\n"
        "print(subprocess.run(['claude', '--version'], capture_output=True, text=True).stdout)\n"
    )
    client = docker.from_env()
    try:
        for name in (tag, AGENT_IMAGE):
            out = client.containers.run(
                name, ["python3", "-c", script], remove=True, network_mode="none"
            ).decode()
            assert out.splitlines()[:4] == [
                "/usr/bin/python3",
                "None",  # the SDK runs on the host: its Python cannot import it
                "/opt/sandbay/bin/claude",
                f"{cli.version} (Claude Code)",
            ], out
        image = client.images.get(tag)
        base = client.images.get(image.labels["sandbay.agent.base-id"])
        # The CLI is all it adds to the base (a few KB for the user and workdir).
        added = image.attrs["Size"] - base.attrs["Size"]
        assert cli.size <= added < cli.size + (1 << 20), added
        assert image.labels["sandbay.agent.cli"] == cli.version
    finally:
        client.close()


@pytest.mark.docker
@pytest.mark.anyio
async def test_run_agent_without_a_cli_in_the_sandbox_says_where_it_looked() -> None:
    # The base image has Python but no claude: the relay says so, and how to fix it.
    from claude_agent_sdk import ClaudeAgentOptions

    from sandbay.providers.docker._image import DEFAULT_BASE_IMAGE
    from sandbay.testing import ScriptedModel, Turn

    async with ScriptedModel([Turn.text("hi")]) as model:
        run = sandbay.run_agent(
            "hello",
            provider="docker",
            options=ClaudeAgentOptions(max_turns=1),
            env=model.env(),
            spec=SandboxSpec(image=DEFAULT_BASE_IMAGE, network="host"),
            timeout=120,
        )
        with pytest.raises(sandbay.AgentError) as caught:
            async with run:
                async for _ in run:
                    pass
    message = str(caught.value)
    assert "CLINotFoundError: no claude CLI in this sandbox" in message
    assert "nor claude on PATH (" in message and "sandbay image build" in message
    assert "ClaudeAgentOptions.cli_path" in message
