"""The local provider's file API and the removal of its folders: links and rights.

A sandbox's processes may plant links and leave odd modes behind; neither may lead sandbay
to touch a host file, and every failure is the typed error of the `Sandbox` contract.
"""

from __future__ import annotations

import os
import stat
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

import sandbay
from sandbay import LocalConfig

pytestmark = pytest.mark.anyio

PLAIN = LocalConfig(isolate=False)

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
