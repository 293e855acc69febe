"""The local provider: what the conformance suite cannot check because it is local-specific."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import stat
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import sandbay
from sandbay import (
    ConfigError,
    LocalConfig,
    SandboxFileNotFoundError,
    SandboxNotFoundError,
    SandboxPermissionError,
    SandboxSpec,
)

pytestmark = pytest.mark.anyio

REAL_PYTHON = os.path.realpath(sys.executable)

needs_bwrap = [
    pytest.mark.bwrap,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed"),
]
ISOLATED = LocalConfig(isolate=True)
PLAIN = LocalConfig(isolate=False)
BOTH = [
    pytest.param(PLAIN, id="plain"),
    pytest.param(ISOLATED, id="isolated", marks=needs_bwrap),
]


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie nobody reaped counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _exists(path: str | Path) -> bool:
    return Path(path).exists()


def _environ(pid: int) -> bytes:
    return Path(f"/proc/{pid}/environ").read_bytes()


def _entries(path: Path) -> list[Path]:
    return list(path.iterdir())


async def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        await anyio.sleep(0.05)
    return False


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP listener on the host's loopback; yields its port."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


CONNECT = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 3)"


# --- environment ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", BOTH)
async def test_host_environment_does_not_leak(
    config: LocalConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"hunter2-{uuid.uuid4().hex}"
    monkeypatch.setenv("SANDBAY_TEST_SECRET", secret)
    async with sandbay.open_sandbox(config, SandboxSpec(env={"GIVEN": "yes"})) as sb:
        result = await sb.exec(["env"])
    assert result.ok
    assert secret.encode() not in result.stdout
    names = {line.split(b"=", 1)[0] for line in result.stdout.splitlines()}
    assert b"SANDBAY_TEST_SECRET" not in names
    assert b"GIVEN" in names
    assert names <= {b"PATH", b"HOME", b"TMPDIR", b"LANG", b"GIVEN", b"PWD", b"SHLVL", b"_"}


async def test_home_and_tmp_are_inside_the_sandbox(tmp_path: Path) -> None:
    async with sandbay.open_sandbox(LocalConfig(root=tmp_path, isolate=False)) as sb:
        result = await sb.exec('printf "%s\\n%s" "$HOME" "$TMPDIR"')
        home, tmp = result.text.splitlines()
        assert home == sb.workdir
        assert Path(tmp).parent == Path(sb.workdir).parent
        assert _exists(tmp)


async def test_python_is_the_running_interpreter_unless_configured() -> None:
    async with sandbay.open_sandbox(PLAIN) as sb:
        assert sb.python == sys.executable
        result = await sb.exec([sb.python, "-c", "import sys; print(sys.prefix)"])
        assert result.text.strip() == sys.prefix
    async with sandbay.open_sandbox(LocalConfig(python="/usr/bin/python3", isolate=False)) as sb:
        assert sb.python == "/usr/bin/python3"


# --- folder, registry, lifecycle -------------------------------------------------------------


async def test_private_folder_under_root_removed_on_close(tmp_path: Path) -> None:
    provider = sandbay.get_provider(LocalConfig(root=tmp_path, isolate=False))
    async with sandbay.open_sandbox(LocalConfig(root=tmp_path, isolate=False)) as sb:
        folder = tmp_path / f"sandbay-{sb.id}"
        assert folder.is_dir()
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert Path(sb.workdir).is_relative_to(folder)
        await sb.write_file("nested/dir/file", b"x")
        await sb.exec("mkdir -p ro/inner && chmod 500 ro ro/inner")  # must not stop removal
        assert sb.id in [info.id for info in await provider.list()]
    assert not _exists(folder)
    assert _entries(tmp_path) == []
    assert sb.id not in [info.id for info in await provider.list()]


async def test_close_kills_background_processes_left_by_exec() -> None:
    async with sandbay.open_sandbox(PLAIN) as sb:
        result = await sb.exec("sleep 300 >/dev/null 2>&1 & echo $!")
        pid = int(result.text)
        assert _alive(pid)
    assert await _gone(pid), "a background process outlived its sandbox"


async def _lease_passed(provider: sandbay.Provider, sandbox_id: str) -> None:
    """Return once the sandbox's lease (whole seconds) is over."""
    (info,) = [info for info in await provider.list() if info.id == sandbox_id]
    assert info.expiry is not None
    await anyio.sleep(max(0.0, info.expiry - time.time()) + 0.1)


async def test_destroy_from_another_process_kills_recorded_processes() -> None:
    script = textwrap.dedent(
        """
        import os, anyio, sandbay
        async def main():
            spec = sandbay.SandboxSpec(lifetime_s=1)
            sb = await sandbay.create_sandbox(sandbay.LocalConfig(isolate=False), spec)
            proc = await sb.start(["sleep", "300"])
            print(sb.id, proc.pid, flush=True)
            os._exit(0)  # a crash: nothing is closed
        anyio.run(main)
        """
    )
    with anyio.fail_after(60):
        out = (await anyio.run_process([sys.executable, "-c", script])).stdout
    sandbox_id, pid_text = out.decode().split()
    pid = int(pid_text)
    provider = sandbay.get_provider("local")
    assert _alive(pid), "the orphaned sandbox's process should survive its owner"
    await _lease_passed(provider, sandbox_id)
    removed = {info.id: why for info, why in await provider.gc()}
    # None: another process's gc on this machine was quicker.
    assert removed.get(sandbox_id) in ("expired", None)
    assert await _gone(pid), "gc left the orphaned sandbox's process running"
    assert sandbox_id not in [info.id for info in await provider.list()]


async def test_destroyed_sandbox_is_not_recreated_by_writes(tmp_path: Path) -> None:
    provider = sandbay.get_provider(LocalConfig(root=tmp_path, isolate=False))
    async with sandbay.open_sandbox(LocalConfig(root=tmp_path, isolate=False)) as sb:
        proc = await sb.start(["sleep", "300"])
        await provider.destroy(sb.id)
        assert proc.returncode is not None or await _gone(getattr(proc, "pid"))  # noqa: B009
        with pytest.raises(SandboxNotFoundError):
            await sb.write_file("file", b"x")
        with pytest.raises(SandboxNotFoundError):
            await sb.read_file("file")
    assert _entries(tmp_path) == []


async def test_status_reports_bubblewrap(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    status = await sandbay.get_provider("local").status()
    assert status.installed and status.reachable
    assert "bubblewrap" in status.detail
    monkeypatch.setenv("PATH", str(tmp_path))
    status = await sandbay.get_provider(ISOLATED).status()
    assert status.installed and not status.reachable
    assert "apt-get install bubblewrap" in status.detail


# --- processes -----------------------------------------------------------------------------


async def test_signal_exit_codes_are_negative() -> None:
    async with sandbay.open_sandbox(PLAIN) as sb:
        assert (await sb.exec(["sh", "-c", "kill -TERM $$"])).exit_code == -15
        proc = await sb.start(["sleep", "60"])
        await proc.kill()
        assert await proc.wait() == -9


async def test_missing_working_directory_is_an_exit_code() -> None:
    async with sandbay.open_sandbox(PLAIN) as sb:
        result = await sb.exec(["true"], cwd="no/such/dir")
        assert result.exit_code == 1
        assert b"does not exist" in result.stderr


async def test_non_executable_file_exits_126() -> None:
    async with sandbay.open_sandbox(PLAIN) as sb:
        await sb.write_file("script", b"#!/bin/sh\necho hi\n", mode=0o644)
        result = await sb.exec(["./script"])
        assert result.exit_code == 126
        assert result.stderr


# --- spec fields the provider cannot honour -------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (SandboxSpec(image="python:3.12"), "spec.image"),
        (SandboxSpec(network="none"), "spec.network"),
        (SandboxSpec(user="nobody-at-all"), "spec.user"),
        (SandboxSpec(cpu=1), "spec.cpu"),
        (SandboxSpec(memory_mb=64), "spec.memory_mb"),
    ],
)
async def test_unsupported_spec_fields_raise(spec: SandboxSpec, field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        async with sandbay.open_sandbox(PLAIN, spec):
            pass


@pytest.mark.parametrize("config", [*BOTH, pytest.param(LocalConfig(), id="default")])
@pytest.mark.parametrize("field", ["cpu", "memory_mb"])
async def test_limits_are_refused_not_ignored(
    config: LocalConfig, field: str, tmp_path: Path
) -> None:
    spec = SandboxSpec.model_validate({field: 2})
    with pytest.raises(ConfigError, match=rf"spec\.{field} = 2.*docker provider") as info:
        async with sandbay.open_sandbox(config.model_copy(update={"root": tmp_path}), spec):
            pass
    assert "cannot limit" in str(info.value)
    assert _entries(tmp_path) == [], "a refused spec left a folder behind"


async def test_other_user_per_exec_raises_and_current_user_works() -> None:
    async with sandbay.open_sandbox(PLAIN) as sb:
        with pytest.raises(ConfigError, match="current user"):
            await sb.exec(["true"], user="nobody-at-all")
        assert (await sb.exec(["true"], user=str(os.getuid()))).ok


async def test_bwrap_missing_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without bwrap on it
    with pytest.raises(ConfigError, match="apt-get install bubblewrap") as info:
        async with sandbay.open_sandbox(LocalConfig(isolate=True, root=tmp_path)):
            pass
    assert "isolate = false" in str(info.value)
    assert _entries(tmp_path) == [], "a failed create left a folder behind"


# --- isolation -----------------------------------------------------------------------------


@pytest.mark.bwrap
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed")
async def test_isolated_sandbox_with_network_none_has_no_network(listener: int) -> None:
    async with sandbay.open_sandbox(ISOLATED, SandboxSpec(network="none")) as sb:
        assert not sb.reaches_host_loopback
        result = await sb.exec([sb.python, "-c", CONNECT, str(listener)])
    assert result.exit_code != 0
    assert b"Error" in result.stderr


@pytest.mark.parametrize("network", ["default", "host"])
@pytest.mark.bwrap
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed")
async def test_isolated_sandbox_shares_the_network_unless_none(listener: int, network: str) -> None:
    # The control for the test above; and "default" must reach the agent's model, which
    # bwrap (with no network of its own to route out through) can only do on the host's.
    async with sandbay.open_sandbox(ISOLATED, SandboxSpec(network=network)) as sb:  # type: ignore[arg-type]
        assert sb.reaches_host_loopback
        result = await sb.exec([sb.python, "-c", CONNECT, str(listener)])
    assert result.ok, result.stderr


async def test_plain_sandbox_shares_the_network(listener: int) -> None:
    async with sandbay.open_sandbox(PLAIN) as sb:
        result = await sb.exec([sb.python, "-c", CONNECT, str(listener)])
    assert result.ok, result.stderr


@pytest.mark.bwrap
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed")
async def test_isolated_sandbox_cannot_see_home_or_host_files(tmp_path: Path) -> None:
    secret = Path.home() / f".sandbay-test-secret-{uuid.uuid4().hex}"
    secret.write_text("top secret")
    host_file = tmp_path / "host-only.txt"
    host_file.write_text("host")
    try:
        async with sandbay.open_sandbox(ISOLATED) as sb:
            assert sb.workdir == "/workspace"
            for path in (secret, host_file, Path("/etc/shadow"), Path(__file__)):
                result = await sb.exec(["cat", str(path)])
                assert result.exit_code != 0, f"{path} is visible in the sandbox"
            listing = (await sb.exec(["ls", "-A", str(Path.home())])).text.split()
            # Only the way to the Python installation may show (pyenv lives in /root here).
            assert secret.name not in listing
            assert all(Path(sys.base_prefix).is_relative_to(Path.home() / n) for n in listing)
            result = await sb.exec(["ls", "/"])
            assert b"workspace" in result.stdout
            assert b"home" not in result.stdout.split()
    finally:
        secret.unlink()


@pytest.mark.bwrap
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed")
async def test_isolated_workspace_writable_system_read_only() -> None:
    async with sandbay.open_sandbox(ISOLATED) as sb:
        assert (await sb.exec("echo hi > /workspace/made && cat made")).text == "hi\n"
        assert await sb.read_file("made") == b"hi\n"
        assert not (await sb.exec("touch /usr/sandbay-test")).ok
        assert not (await sb.exec("touch /etc/sandbay-test")).ok
        assert not _exists("/usr/sandbay-test")


@pytest.mark.bwrap
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed")
async def test_isolated_tmp_is_private_and_kept_between_commands() -> None:
    name = f"sandbay-test-{uuid.uuid4().hex}"
    async with sandbay.open_sandbox(ISOLATED) as sb, sandbay.open_sandbox(ISOLATED) as other:
        assert (await sb.exec(f"echo kept > /tmp/{name}")).ok
        assert (await sb.exec(["cat", f"/tmp/{name}"])).text == "kept\n"
        assert await sb.read_file(f"/tmp/{name}") == b"kept\n"
        await sb.write_file(f"/tmp/{name}-2", b"from host")
        assert (await sb.exec(["cat", f"/tmp/{name}-2"])).text == "from host"
        assert not (await other.exec(["cat", f"/tmp/{name}"])).ok
        assert not _exists(f"/tmp/{name}")


@pytest.mark.bwrap
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed")
async def test_isolated_file_api_stays_inside(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("host secret")
    async with sandbay.open_sandbox(ISOLATED) as sb:
        with pytest.raises(SandboxPermissionError, match="can write only under"):
            await sb.write_file("/etc/sandbay-test", b"x")
        # A process plants a symlink to a host path it cannot see itself: it leads where
        # it leads in the sandbox (nowhere yet), never to the host file.
        assert (await sb.exec(["ln", "-s", str(outside), "link"])).ok
        with pytest.raises(SandboxFileNotFoundError):
            await sb.read_file("link")
        await sb.write_file("link", b"overwrite")
        assert outside.read_text() == "host secret"
        assert (await sb.exec(["cat", "link"])).stdout == b"overwrite"
        assert await sb.read_file("link") == b"overwrite"
        assert (await sb.exec(["ln", "-s", str(tmp_path), "dirlink"])).ok
        await sb.write_file("dirlink/new.txt", b"x")
        assert not _exists(tmp_path / "new.txt")
        assert (await sb.exec(["cat", "dirlink/new.txt"])).stdout == b"x"
        # Host files the sandbox cannot see are not readable through the file API either.
        # (The host path the link named is the sandbox's own file now, in its private /tmp.)
        assert await sb.read_file(str(outside)) == b"overwrite"
        (tmp_path / "host-only").write_text("host")
        for hidden in ("/etc/shadow", "/root/.bashrc", str(tmp_path / "host-only")):
            with pytest.raises(SandboxFileNotFoundError):
                await sb.read_file(hidden)
        # Read-only system files read the same on both sides.
        assert await sb.read_file("/etc/hosts") == await anyio.Path("/etc/hosts").read_bytes()


@pytest.mark.bwrap
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed")
async def test_isolated_kill_takes_down_the_namespace() -> None:
    async with sandbay.open_sandbox(ISOLATED) as sb:
        seconds = str(300 + secrets.randbelow(10_000))  # tells our sleep from others
        proc = await sb.start(["sh", "-c", f"sleep {seconds} & echo $!; wait"])
        async for line in proc.stdout.lines():
            assert int(line) > 0  # a pid inside the namespace: not the host's
            break
        host_sleeps: list[int] = []
        with anyio.move_on_after(5):
            while not host_sleeps:  # the child may not have exec'd sleep yet
                host_sleeps = _sleep_pids(seconds)
                await anyio.sleep(0.02)
        assert host_sleeps
        await proc.kill()
        assert await proc.wait() != 0
    for pid in host_sleeps:
        assert await _gone(pid)


def _sleep_pids(seconds: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline == f"sleep\x00{seconds}\x00".encode() and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


@pytest.mark.bwrap
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed")
@pytest.mark.parametrize("workdir", ["relative", "/usr/work", "/", "/proc/x"])
async def test_isolated_workdir_must_be_outside_system_dirs(workdir: str) -> None:
    with pytest.raises(ConfigError, match=r"spec\.workdir"):
        async with sandbay.open_sandbox(ISOLATED, SandboxSpec(workdir=workdir)):
            pass


@pytest.mark.bwrap
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed")
async def test_isolated_custom_workdir() -> None:
    async with sandbay.open_sandbox(ISOLATED, SandboxSpec(workdir="/home/agent/project")) as sb:
        assert sb.workdir == "/home/agent/project"
        assert (await sb.exec("pwd; echo x > f")).text == "/home/agent/project\n"
        assert await sb.read_file("/home/agent/project/f") == b"x\n"


@pytest.mark.bwrap
async def test_isolated_python_installed_under_tmp_stays_visible(tmp_path: Path) -> None:
    # A checkout (and its venv) under /tmp must not be hidden by the sandbox's private /tmp.
    if not shutil.which("bwrap"):
        pytest.skip("bubblewrap is not installed")
    assert str(tmp_path).startswith("/tmp/")
    (tmp_path / "bin").mkdir()
    python = tmp_path / "bin" / "python3"
    python.symlink_to(REAL_PYTHON)
    config = sandbay.LocalConfig(isolate=True, python=str(python))
    async with sandbay.open_sandbox(config) as sb:
        result = await sb.exec([sb.python, "-c", "print(6 * 7)"])
        assert result.stdout.strip() == b"42", result.stderr
        assert (await sb.exec("echo private > /tmp/x && cat /tmp/x")).stdout == b"private\n"


# --- the default: isolated where bubblewrap works --------------------------------------------


@pytest.mark.bwrap
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed")
async def test_default_is_isolated_where_bwrap_works() -> None:
    assert LocalConfig().isolate is None
    async with sandbay.open_sandbox(LocalConfig()) as sb:
        assert sb.isolated and sb.allows_bypass_permissions
        assert (await sb.exec("pwd")).text == "/workspace\n"
    async with sandbay.open_sandbox("local", SandboxSpec(network="none")) as sb:
        assert sb.isolated and not sb.reaches_host_loopback


async def test_default_without_bwrap_runs_unisolated(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without bwrap on it
    async with sandbay.open_sandbox(LocalConfig()) as sb:
        assert not sb.isolated
        assert not sb.allows_bypass_permissions, "unisolated agents bypass only when allowed"
        assert (await sb.exec([sb.python, "-c", "print(6 * 7)"])).text == "42\n"
    async with sandbay.open_sandbox(LocalConfig(allow_bypass_permissions=True)) as sb:
        assert not sb.isolated and sb.allows_bypass_permissions
    with pytest.raises(ConfigError, match=r'network = "none".*install'):
        async with sandbay.open_sandbox(LocalConfig(), SandboxSpec(network="none")):
            pass
    status = await sandbay.get_provider(LocalConfig()).status()
    assert status.reachable and "unisolated" in status.detail
    assert "apt-get install bubblewrap" in status.detail


async def test_default_runs_unisolated_where_bwrap_cannot_create_a_sandbox(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A bwrap that fails the way it does without user namespaces (e.g. in a container).
    fake = tmp_path / "bin" / "bwrap"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to create new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    async with sandbay.open_sandbox(LocalConfig()) as sb:
        assert not sb.isolated and not sb.allows_bypass_permissions
        assert (await sb.exec(["pwd"])).text == f"{sb.workdir}\n"
    with pytest.raises(ConfigError, match="user namespaces"):
        async with sandbay.open_sandbox(LocalConfig(isolate=True, root=tmp_path / "root")):
            pass
    assert _entries(tmp_path / "root") == []


@pytest.mark.bwrap
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed")
@pytest.mark.parametrize("layout", ["home-bin", "venv-in-home"])
async def test_isolated_python_under_home_does_not_expose_the_home(
    layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    canary = f"canary-{uuid.uuid4().hex}"
    (home / ".ssh" / "id_rsa").write_text(canary)
    monkeypatch.setenv("HOME", str(home))
    if layout == "home-bin":  # ~/bin/python3, a link to an installation elsewhere
        python = home / "bin" / "python3"
        python.parent.mkdir()
        python.symlink_to(REAL_PYTHON)
    else:  # a venv made in the home directory
        made = await anyio.run_process(
            [REAL_PYTHON, "-m", "venv", "--without-pip", str(home / "venv")], check=False
        )
        assert made.returncode == 0, made.stderr
        python = home / "venv" / "bin" / "python"
    async with sandbay.open_sandbox(LocalConfig(isolate=True, python=str(python))) as sb:
        result = await sb.exec([sb.python, "-c", "import sys; print(6 * 7, sys.prefix)"])
        assert result.stdout.split()[0] == b"42", result.stderr
        if layout == "venv-in-home":
            assert result.stdout.split()[1] == str(home / "venv").encode()
        peek = await sb.exec(f"cat {home}/.ssh/id_rsa; ls -A {home}")
        assert canary.encode() not in peek.stdout
        assert b".ssh" not in peek.stdout.split(), "the home directory is visible"
        with pytest.raises(SandboxFileNotFoundError):
            await sb.read_file(str(home / ".ssh" / "id_rsa"))


@pytest.mark.parametrize("config", BOTH)
async def test_host_process_environments_through_proc(config: LocalConfig) -> None:
    # A host process holding a secret in its environment, as the application running
    # sandbay may. Isolated, the sandbox has its own PID namespace and cannot see it;
    # unisolated it can (processes run as you), which docs/security.md says.
    value = f"canary-{uuid.uuid4().hex}"
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": value}
    script = "import sys; print('ready', flush=True); sys.stdin.read()"
    async with await anyio.open_process([sys.executable, "-c", script], env=env) as host:
        try:
            assert host.stdout is not None
            with anyio.fail_after(60):  # its environ is its own once it runs, not at fork
                assert (await host.stdout.receive()).startswith(b"ready")
            assert value.encode() in _environ(host.pid)
            async with sandbay.open_sandbox(config) as sb:
                result = await sb.exec("cat /proc/[0-9]*/environ 2>/dev/null; true")
        finally:
            host.kill()
    assert (value.encode() in result.stdout) is not sb.isolated
