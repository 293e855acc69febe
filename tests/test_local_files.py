"""The local provider's file API and the removal of its folders: links and rights.

A sandbox's processes may plant links and leave odd modes behind; neither may lead sandbay
to touch a host file, and every failure is the typed error of the `Sandbox` contract.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import sys
import textwrap
from contextlib import aclosing
from pathlib import Path

import anyio
import pytest

import sandbay
from sandbay import (
    LocalConfig,
    SandboxError,
    SandboxFileNotFoundError,
    SandboxFileTooLargeError,
    SandboxIsADirectoryError,
    SandboxNotADirectoryError,
    SandboxPermissionError,
)

pytestmark = pytest.mark.anyio

PLAIN = LocalConfig(isolate=False)
ISOLATED = LocalConfig(isolate=True)
BOTH = [
    pytest.param(PLAIN, id="plain"),
    pytest.param(
        ISOLATED,
        id="isolated",
        marks=[
            pytest.mark.bwrap,
            pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed"),
        ],
    ),
]

# Run Python without the capabilities that let root ignore file modes (a no-op for others),
# so that a read-only directory stops root as it stops everyone else.
WITHOUT_CAPABILITIES = textwrap.dedent(
    """
    import ctypes, os
    if os.geteuid() == 0:
        class Header(ctypes.Structure):
            _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
        class Data(ctypes.Structure):
            _fields_ = [(n, ctypes.c_uint32) for n in ("effective", "permitted", "inheritable")]
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.capset(ctypes.byref(Header(0x20080522, 0)), (Data * 2)()) != 0:
            raise OSError(ctypes.get_errno(), "capset")
    """
)


async def test_removal_never_chmods_a_host_file_through_a_planted_link(tmp_path: Path) -> None:
    host_file = tmp_path / "host.txt"
    host_file.write_text("host")
    host_file.chmod(0o644)
    root = tmp_path / "root"
    config = LocalConfig(isolate=False, root=root)
    async with sandbay.open_sandbox(config) as sb:
        # A read-only directory holding a link to a host file: removing the link fails
        # until the directory is made writable, which runs the removal's error handler.
        planted = await sb.exec(f"mkdir ro && ln -s {host_file} ro/link && chmod 500 ro")
        assert planted.ok, planted.stderr
        script = WITHOUT_CAPABILITIES + textwrap.dedent(
            f"""
            import anyio, sandbay
            anyio.run(sandbay.get_provider(sandbay.LocalConfig(root={str(root)!r})).destroy,
                      {sb.id!r})
            """
        )
        with anyio.fail_after(60):
            done = await anyio.run_process([sys.executable, "-c", script], check=False)
        assert done.returncode == 0, done.stderr.decode()
        assert not (root / f"sandbay-{sb.id}").exists(), "the sandbox's folder was not removed"
    assert stat.S_IMODE(host_file.stat().st_mode) == 0o644, "removal changed a host file's mode"
    assert host_file.read_text() == "host"
    assert os.listdir(root) == []


# --- typed errors and streamed reads ---------------------------------------------------------


@pytest.mark.parametrize("config", BOTH)
async def test_file_errors_are_typed(config: LocalConfig) -> None:
    async with sandbay.open_sandbox(config) as sb:
        assert (await sb.exec("mkdir -p dir && echo hi > file")).ok
        with pytest.raises(SandboxIsADirectoryError, match="directory") as read_dir:
            await sb.read_file("dir")
        assert isinstance(read_dir.value, IsADirectoryError)
        with pytest.raises(SandboxIsADirectoryError) as write_dir:
            await sb.write_file("dir", b"x")
        assert isinstance(write_dir.value, IsADirectoryError)
        for path in ("file/child", "file/child/deeper"):
            with pytest.raises(SandboxNotADirectoryError) as write_under:
                await sb.write_file(path, b"x")
            assert isinstance(write_under.value, NotADirectoryError)
            with pytest.raises(SandboxNotADirectoryError):
                await sb.read_file(path)
        with pytest.raises(SandboxFileNotFoundError):
            await sb.read_file("missing")
        assert await sb.read_file("file") == b"hi\n"
        assert (await sb.exec("ls dir")).stdout == b"", "a failed write left a file behind"


@pytest.mark.bwrap
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed")
async def test_isolated_permission_denied_as_for_the_sandbox_user() -> None:
    # Run as root, the host could read anything; the sandbox's processes (no capabilities)
    # cannot, and the file API carries their rights.
    async with sandbay.open_sandbox(ISOLATED) as sb:
        assert (await sb.exec("echo s > secret && chmod 000 secret")).ok
        assert (await sb.exec("mkdir ro && chmod 500 ro")).ok
        assert not (await sb.exec("cat secret")).ok
        with pytest.raises(SandboxPermissionError) as read_denied:
            await sb.read_file("secret")
        assert isinstance(read_denied.value, PermissionError)
        with pytest.raises(SandboxPermissionError):
            await sb.write_file("ro/new", b"x")
        with pytest.raises(SandboxPermissionError):
            await sb.write_file("ro/sub/new", b"x")
        with pytest.raises(SandboxPermissionError, match="read-only"):
            await sb.write_file("/usr/new", b"x")


async def test_unisolated_permission_denied_is_typed(tmp_path: Path) -> None:
    # Without root's capabilities, as an ordinary user runs it.
    script = WITHOUT_CAPABILITIES + textwrap.dedent(
        """
        import anyio, sandbay
        async def main():
            config = sandbay.LocalConfig(isolate=False)
            async with sandbay.open_sandbox(config) as sb:
                await sb.exec("echo s > secret && chmod 000 secret && mkdir ro && chmod 500 ro")
                for call in (sb.read_file("secret"), sb.write_file("ro/new", b"x")):
                    try:
                        await call
                    except PermissionError as exc:
                        print(type(exc).__name__)
                await sb.exec("chmod 700 ro")
        anyio.run(main)
        """
    )
    with anyio.fail_after(60):
        done = await anyio.run_process([sys.executable, "-c", script], check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["SandboxPermissionError"] * 2


@pytest.mark.parametrize("config", BOTH)
async def test_reads_stream_in_chunks(config: LocalConfig) -> None:
    async with sandbay.open_sandbox(config) as sb:
        assert (await sb.exec("head -c 3000000 /dev/zero | tr '\\0' x > big")).ok
        sizes = []
        async with aclosing(sb.read_file_stream("big")) as chunks:
            async for chunk in chunks:
                assert chunk == b"x" * len(chunk)
                sizes.append(len(chunk))
        assert sum(sizes) == 3_000_000
        assert len(sizes) > 1 and max(sizes) <= 1 << 20, "the file was read in one piece"
        with pytest.raises(SandboxFileTooLargeError):
            await sb.read_file("big", max_bytes=1000)
        assert await sb.read_file("big", max_bytes=3_000_000) == b"x" * 3_000_000


# --- links the sandbox plants ----------------------------------------------------------------


@pytest.mark.bwrap
@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed")
async def test_isolated_file_api_never_follows_a_racing_link_to_the_host(tmp_path: Path) -> None:
    host_dir = tmp_path / "host"
    host_dir.mkdir()
    (host_dir / "f").write_text("HOST SECRET")
    # Flip /workspace/d between a directory and a link to the host directory, as fast as
    # it goes, until told to stop (or a bound: it never outlives the test).
    flipper = textwrap.dedent(
        """
        import os, sys
        os.mkdir("a"); open("a/f", "w").write("sandbox"); os.symlink(sys.argv[1], "b")
        print("flipping", flush=True)
        for i in range(2_000_000):
            try:
                os.rename("a", "d"); os.rename("d", "a"); os.rename("b", "d"); os.rename("d", "b")
            except OSError:
                # write_file made a directory d of its own (as mkdir -p would): set it aside.
                if os.path.islink("d"):
                    os.rename("d", "b")
                elif os.path.exists("d/f") and not os.path.exists("a"):
                    os.rename("d", "a")
                elif os.path.lexists("d"):
                    os.rename("d", f"made-{i}")
            if i % 500 == 0 and os.path.exists("stop"):
                break
        """
    )
    async with sandbay.open_sandbox(ISOLATED) as sb:
        proc = await sb.start([sb.python, "-c", flipper, str(host_dir)])
        with anyio.fail_after(30):
            async for line in proc.stdout.lines():
                assert line == b"flipping"
                break
        outcomes: dict[str, int] = {}
        for i in range(2000):
            try:
                got = await sb.read_file("d/f")
            except (SandboxFileNotFoundError, SandboxNotADirectoryError) as exc:
                outcome = type(exc).__name__
            else:
                assert got == b"sandbox", f"read_file returned a host file: {got!r}"
                outcome = "read"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            with contextlib.suppress(SandboxError):
                await sb.write_file(f"d/new-{i}", b"x")
        await sb.write_file("stop", b"")
        with anyio.fail_after(30):
            await proc.wait()
        assert os.listdir(host_dir) == ["f"], "write_file created files in a host directory"
        assert (host_dir / "f").read_text() == "HOST SECRET"
        assert outcomes.get("read", 0) > 0, f"the race never let a read through: {outcomes}"


@pytest.mark.parametrize("config", BOTH)
async def test_a_fifo_does_not_hang_read_file(config: LocalConfig) -> None:
    async with sandbay.open_sandbox(config) as sb:
        assert (await sb.exec("mkfifo pipe")).ok
        with anyio.fail_after(10):
            with pytest.raises(SandboxError, match="FIFO"):
                await sb.read_file("pipe")
