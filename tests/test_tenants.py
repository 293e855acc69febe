"""Tenant isolation (``run_agent(tenant=...)``): the attacks of a tenant on another, replayed.

Tenant A's Bash tool leaves a secret in its working directory and plants a
``settings.json`` hook everywhere it can reach; then tenant B's tool looks for A's files,
transcript and run log, and B's run checks whether A's hook ran in it. On docker (a uid per
tenant) and local+bwrap (a namespace per tenant) in a shared sandbox, and on local+bwrap in
separate sandboxes, B finds none of it. Controls show the same attacks getting through
without the preset (docker) and on the unisolated local provider (its stated limit).
"""

from __future__ import annotations

import base64
import json
import posixpath
from typing import Any

import anyio
import pytest
from claude_agent_sdk import ClaudeAgentOptions, ResultMessage

import sandbay
from sandbay import Sandbox
from sandbay.testing import ScriptedModel, Turn
from sandbox_kinds import open_kind

pytestmark = pytest.mark.anyio

SEPARATED = [
    pytest.param("bwrap", id="bwrap", marks=pytest.mark.bwrap),
    pytest.param("docker", id="docker", marks=pytest.mark.docker),
]
SECRET = "A-SECRET-7f3a"
HOOK = {
    "hooks": {
        "PreToolUse": [
            {
                "matcher": "Bash",
                "hooks": [{"type": "command", "command": 'echo ran >> "$HOME/hook-ran"'}],
            }
        ]
    }
}

# Tenant A: a secret in its cwd, the hook in every settings file it can write.
PLANT = """
import json, os, sys
open("secret.txt", "w").write(SECRET)
for target in [os.path.expanduser("~/.claude/settings.json"), *TARGETS]:
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "w").write(json.dumps(HOOK))
        print("planted", target)
    except OSError as exc:
        print("refused", target, type(exc).__name__)
"""

# Tenant B: read everything of A's it was told about; did A's hook run here?
PROBE = """
import os
for path in PATHS:
    try:
        if os.path.isdir(path):
            print("LISTED", path, os.listdir(path))
        else:
            print("READ", path, open(path, errors="replace").read()[:200])
    except OSError as exc:
        print("denied", path, type(exc).__name__)
try:
    print("HOOK-RAN", open(os.path.expanduser("~/hook-ran")).read())
except OSError:
    print("no-hook")
"""


def command(program: str, **values: Any) -> str:
    source = "".join(f"{name} = {value!r}\n" for name, value in values.items()) + program
    encoded = base64.b64encode(source.encode()).decode()
    return f"echo {encoded} | base64 -d | python3 -"


async def run(sandbox: Sandbox, tenant: str | None, bash: str, run_id: str) -> str:
    """One run whose only tool call is ``bash``; returns what the tool printed."""
    script = [Turn.tool_use("Bash", {"command": bash}), Turn.text("done")]
    async with ScriptedModel(script) as model:
        options = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"], env=model.env())
        with anyio.fail_after(120):
            async with sandbay.run_agent(
                "go", sandbox=sandbox, options=options, run_id=run_id, tenant=tenant
            ) as agent_run:
                messages = [m async for m in agent_run]
        assert isinstance(messages[-1], ResultMessage) and messages[-1].result == "done"
        return json.dumps(model.tool_results())


def a_paths(sandbox: Sandbox, tenant: str | None, run_id: str) -> list[str]:
    """Where A's secret, transcript folder and run log are, in ``sandbox``."""
    if tenant is None:
        work, config = sandbox.workdir, "~/.claude"
    else:
        dirs = sandbox.tenant_dirs(tenant)
        work, config = dirs.work, dirs.config_dir
    return [f"{work}/secret.txt", f"{config}/projects", f"{sandbox.relay_dir}/runs/{run_id}"]


async def attack(
    sandbox_a: Sandbox, sandbox_b: Sandbox, *, tenants: tuple[str | None, str | None]
) -> tuple[str, str]:
    a, b = tenants
    targets = ["/home/sandbay/.claude/settings.json", f"{sandbox_a.workdir}/.claude/settings.json"]
    if b is not None:
        targets.append(f"{sandbox_b.tenant_dirs(b).config_dir}/settings.json")
    planted = await run(
        sandbox_a, a, command(PLANT, SECRET=SECRET, HOOK=HOOK, TARGETS=targets), "run-a"
    )
    paths = a_paths(sandbox_a, a, "run-a")
    if sandbox_a is not sandbox_b and sandbox_a.relay_separation == "namespace":
        # Separate local sandboxes: A's folder on the host, by its real path.
        folder = posixpath.dirname(sandbox_a.relay_dir)
        tenant = posixpath.join(folder, "tenants", str(a))
        paths += [posixpath.join(tenant, "work", "secret.txt"), posixpath.join(tenant, "home")]
    probed = await run(sandbox_b, b, command(PROBE, PATHS=paths), "run-b")
    return planted, probed


@pytest.mark.parametrize("sandbox", SEPARATED, indirect=True)
async def test_tenant_b_finds_nothing_of_a_in_a_shared_sandbox(sandbox: Sandbox) -> None:
    planted, probed = await attack(sandbox, sandbox, tenants=("acme", "bolt"))
    assert SECRET not in planted  # (the tool's own output does not echo it)
    assert "planted" in planted  # A's own settings file, at least
    # B read and listed nothing of A's: secret, transcripts, run log.
    assert "READ" not in probed and "LISTED" not in probed
    assert probed.count("denied") == 3  # each of the three was tried, and refused
    assert SECRET not in probed
    assert "no-hook" in probed and "HOOK-RAN" not in probed
    # A could not plant into B's config dir or the sandbox user's.
    assert f"planted {sandbox.tenant_dirs('bolt').config_dir}" not in planted


@pytest.mark.parametrize("sandbox", SEPARATED, indirect=True)
async def test_a_tenants_cli_gets_its_own_dirs_and_no_settings(sandbox: Sandbox) -> None:
    probe = 'echo "cwd=$PWD home=$HOME cfg=$CLAUDE_CONFIG_DIR mem=$CLAUDE_CODE_DISABLE_AUTO_MEMORY"'
    out = await run(sandbox, "acme", f"{probe}; id -u; stat -c %a .", "run-dirs")
    dirs = sandbox.tenant_dirs("acme")
    assert f"cwd={dirs.work} home={dirs.home} cfg={dirs.config_dir} mem=1" in out
    assert "700" in out
    if sandbox.relay_separation == "user":
        assert "200" in out.split("mem=1")[1]  # a uid of its own (from 200000), not 1000


@pytest.mark.docker
async def test_control_without_the_preset_b_reads_a_and_runs_its_hook() -> None:
    """Without tenant=, the same attack gets through on docker: the tests above can fail."""
    async with open_kind("docker") as sb:
        _, probed = await attack(sb, sb, tenants=(None, None))
    assert f"READ {sb.workdir}/secret.txt {SECRET}" in probed
    assert "HOOK-RAN" in probed


@pytest.mark.bwrap
async def test_separate_bwrap_sandboxes_of_two_tenants_see_nothing_of_each_other() -> None:
    async with open_kind("bwrap") as sb_a, open_kind("bwrap") as sb_b:
        _, probed = await attack(sb_a, sb_b, tenants=("acme", "bolt"))
    assert "READ" not in probed and "LISTED" not in probed and SECRET not in probed
    assert probed.count("denied") == 5
    assert "no-hook" in probed


async def test_unisolated_local_keeps_tenants_apart_only_by_path() -> None:
    """The stated limit: on local without isolation tenants are processes of one user.

    B's CLI loads none of A's settings (its own config dir, no setting sources), but B's
    tool reads A's secret and run log once it knows their paths.
    """
    async with open_kind("local") as sb_a, open_kind("local") as sb_b:
        assert sb_b.relay_separation == "none"
        _, probed = await attack(sb_a, sb_b, tenants=("acme", "bolt"))
    assert "no-hook" in probed
    assert f"READ {sb_a.tenant_dirs('acme').work}/secret.txt {SECRET}" in probed
    assert f"LISTED {sb_a.relay_dir}/runs/run-a" in probed


async def test_bad_tenant_names_are_refused() -> None:
    for name in ["", ".hidden", "a/b", "x" * 65, "sp ace"]:
        with pytest.raises(sandbay.ConfigError, match="tenant"):
            sandbay.run_agent("go", tenant=name, env={"ANTHROPIC_API_KEY": "k"})


@pytest.mark.parametrize("sandbox", SEPARATED, indirect=True)
async def test_a_tenant_session_works_in_the_tenants_own_dirs(sandbox: Sandbox) -> None:
    script = [Turn.tool_use("Bash", {"command": "echo in=$PWD"}), Turn.text("done")]
    async with ScriptedModel(script) as model:
        options = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"], env=model.env())
        async with sandbay.AgentSession(sandbox=sandbox, options=options, tenant="acme") as s:
            await s.query("go")
            messages = [m async for m in s.receive_response()]
        output = json.dumps(model.tool_results())
    dirs = sandbox.tenant_dirs("acme")
    assert s.cwd == dirs.work and s.config_dir == dirs.config_dir
    assert f"in={dirs.work}" in output
    assert isinstance(messages[-1], ResultMessage) and messages[-1].result == "done"
