"""`LocalProvider`: creates, lists and removes sandboxes that are directories on this host."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import anyio
from typing_extensions import override

from ..._config import LocalConfig
from ..._provider import Provider, ProviderStatus, SandboxInfo
from ..._sandbox import Sandbox, SandboxSpec
from ._bwrap import _BWRAP_HELP, _check_spec, _find_bwrap
from ._registry import NAME, _kill_recorded, _make_folder, _read_entries, _read_entry, _remove
from ._sandbox import LocalSandbox, _live


class LocalProvider(Provider):
    """Sandboxes that are directories on this machine, optionally isolated by bubblewrap.

    What it does not do:

    - ``cpu`` and ``memory_mb`` are not enforced (that needs cgroups); they are accepted and
      ignored, so a spec written for another provider still runs here.
    - Without ``isolate`` a process runs as you, with your files and your network: the
      private directory only keeps sandboxes apart from each other by convention, and
      absolute paths given to `Sandbox.write_file` are host paths. Only the environment is
      kept clean (your variables, and so your secrets, do not leak in).
    - With ``isolate`` the process sees the read-only system directories, the Python
      installation, its workspace and a private /tmp, and no network (unless
      ``spec.network == "host"``). It still shares the host's kernel: a kernel bug is an
      escape. Use Docker with gVisor or a cloud provider for untrusted code.
    - ``spec.image`` cannot be honoured (there are no images); ``spec.network == "none"``
      needs ``isolate``; ``spec.user`` can only be the current user. Each raises
      `ConfigError` naming the field.
    - A sandbox does not expire by itself: ``spec.lifetime_s`` becomes its expiry label and
      `gc` removes it after that.
    """

    name = NAME

    def __init__(self, config: LocalConfig) -> None:
        self.config = config
        self._bwrap_checked = False

    @override
    async def create(self, spec: SandboxSpec) -> Sandbox:
        _check_spec(spec, isolate=self.config.isolate)
        bwrap = _find_bwrap() if self.config.isolate else None
        folder = await anyio.to_thread.run_sync(_make_folder, self.config.root)
        sandbox = LocalSandbox(spec, folder=folder, config=self.config, bwrap=bwrap)
        try:
            await anyio.to_thread.run_sync(sandbox._save_entry, [])
            if bwrap and not self._bwrap_checked:
                await sandbox._check_bwrap()
                self._bwrap_checked = True
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_remove, sandbox.id, folder)
            raise
        _live[sandbox.id] = sandbox
        return sandbox

    @override
    async def list(self, *, labels: Mapping[str, str] | None = None) -> list[SandboxInfo]:
        entries = await anyio.to_thread.run_sync(_read_entries)
        wanted = dict(labels or {})
        return [
            SandboxInfo(
                id=entry["id"],
                provider=NAME,
                labels=entry["labels"],
                status=entry["status"],
            )
            for entry in entries
            if all(entry["labels"].get(key) == value for key, value in wanted.items())
        ]

    @override
    async def destroy(self, sandbox_id: str) -> None:
        sandbox = _live.get(sandbox_id)
        if sandbox is not None:
            await sandbox._stop_processes()
        entry = await anyio.to_thread.run_sync(_read_entry, sandbox_id)
        if entry is None:
            return
        await anyio.to_thread.run_sync(_kill_recorded, entry.get("processes", []))
        await anyio.to_thread.run_sync(_remove, sandbox_id, Path(entry["folder"]))

    @override
    async def raw_create_exec(self, spec: SandboxSpec) -> float:
        """create → first exec without sandbay: a temporary folder and one process in it."""
        started = time.perf_counter()
        folder = tempfile.mkdtemp(prefix="sandbay-raw-")
        try:
            await anyio.run_process(["true"], cwd=folder)
            return time.perf_counter() - started
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @override
    async def status(self) -> ProviderStatus:
        bwrap = shutil.which("bwrap")
        if bwrap:
            detail = f"bubblewrap at {bwrap}: isolate = true is available"
        else:
            detail = f"bubblewrap not found, so isolate = true is unavailable: {_BWRAP_HELP}"
        # Usable unless isolation was asked for and cannot be had.
        reachable = bool(bwrap) or not self.config.isolate
        return ProviderStatus(name=NAME, installed=True, reachable=reachable, detail=detail)
