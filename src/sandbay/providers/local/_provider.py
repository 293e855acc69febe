"""`LocalProvider`: creates, lists and removes sandboxes that are directories on this host."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

import anyio
from typing_extensions import override

from ..._config import LocalConfig
from ..._errors import ConfigError, SandboxNotFoundError
from ..._provider import Provider, ProviderStatus, SandboxInfo
from ..._sandbox import Sandbox, SandboxSpec
from ._bwrap import _BWRAP_HELP, _check_spec, _find_bwrap
from ._registry import NAME, _kill_recorded, _make_folder, _read_entries, _read_entry, _remove
from ._sandbox import LocalSandbox, _live


def _lease(entry: Mapping[str, object]) -> float | None:
    """The expiry `Sandbox.extend` last wrote to a registry entry (none in older entries)."""
    expiry = entry.get("expiry")
    if isinstance(expiry, (int, float)) and not isinstance(expiry, bool):
        return float(expiry)
    return None


# bwrap path -> whether it could create a sandbox here, once tried in this process.
_BWRAP_WORKS: dict[str, bool] = {}


class LocalProvider(Provider):
    """Sandboxes that are directories on this machine, isolated by bubblewrap where it works.

    ``config.isolate`` unset (the default) isolates whenever ``bwrap`` is on PATH and can
    create a sandbox here, and otherwise runs unisolated; `LocalSandbox.isolated` tells
    which a sandbox got.

    What it does not do:

    - ``cpu`` and ``memory_mb`` cannot be enforced; a spec that sets them raises
      `ConfigError` naming the field (as the spec contract asks), rather than running
      without the limit.
    - Unisolated, a process runs as you, with your files, your network and your other
      processes (and, through /proc, their environments, secrets included): the private
      directory only keeps sandboxes apart by convention, and absolute paths given to
      `Sandbox.write_file` are host paths. Only the environment a process starts with is
      kept clean. Each command runs under a small supervisor that adopts whatever it starts
      (``setsid``, ``nohup`` and double forks included), so kill and close leave nothing
      behind; a process that kills its own supervisor can still escape.
    - Isolated, the process sees the read-only system directories, the Python installation,
      its workspace and a private /tmp, its own processes only, and no network (unless
      ``spec.network == "host"``). It still shares the host's kernel: a kernel bug is an
      escape. Use Docker with gVisor or a cloud provider for untrusted code.
    - ``spec.image`` cannot be honoured (there are no images); ``spec.network == "none"``
      needs isolation; ``spec.user`` can only be the current user. Each raises
      `ConfigError` naming the field.
    - A sandbox does not expire by itself: its lease (``spec.lifetime_s`` from creation,
      renewed by `Sandbox.extend`) is kept in its registry entry, and `gc`, from any
      process, removes it once that passed.
    - `connect` works from any process of the same user on this machine (the registry is
      per user). The whole spec, env included, is kept in the registry entry (mode 0600),
      so a reattached sandbox has it all. An isolated sandbox needs ``bwrap`` where it is
      reattached, too, and its processes die with the process that started them
      (bubblewrap's ``--die-with-parent``): its files outlive a crashed worker, a running
      agent does not (unisolated, it runs on, and `sandbay.resume_run` follows it). The
      reattaching provider's config (``python``, ``allow_bypass_permissions``) applies
      from then on.
    """

    name = NAME
    config: LocalConfig

    def __init__(self, config: LocalConfig) -> None:
        self.config = config

    @override
    async def create(self, spec: SandboxSpec) -> Sandbox:
        isolate = self.config.isolate
        bwrap = _find_bwrap() if isolate else shutil.which("bwrap") if isolate is None else None
        if isolate is None and bwrap is not None and _BWRAP_WORKS.get(bwrap) is False:
            bwrap = None  # tried before in this process: it cannot create a sandbox here
        _check_spec(spec, isolate=bool(bwrap) or bool(isolate))
        folder = await anyio.to_thread.run_sync(_make_folder, self.config.root)
        sandbox = LocalSandbox(spec, folder=folder, config=self.config, bwrap=bwrap)
        try:
            await anyio.to_thread.run_sync(sandbox._save_entry, [])
            if bwrap and not _BWRAP_WORKS.get(bwrap):
                try:
                    await sandbox._check_bwrap()
                    _BWRAP_WORKS[bwrap] = True
                except ConfigError:
                    if isolate:
                        raise
                    # The default: no user namespaces here (a container, a locked-down
                    # kernel), so run unisolated, as without bwrap.
                    _BWRAP_WORKS[bwrap] = False
                    _check_spec(spec, isolate=False)
                    sandbox = LocalSandbox(spec, folder=folder, config=self.config, bwrap=None)
                    await anyio.to_thread.run_sync(sandbox._save_entry, [])
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_remove, sandbox.id, folder)
            raise
        _live[sandbox.id] = sandbox
        return sandbox

    @override
    async def connect(self, sandbox_id: str) -> Sandbox:
        entry = await anyio.to_thread.run_sync(_read_entry, sandbox_id)
        folder = Path(entry["folder"]) if entry is not None else None
        if (
            entry is None
            or folder is None
            or folder.name != f"sandbay-{sandbox_id}"
            or not await anyio.to_thread.run_sync(folder.is_dir)
        ):
            raise SandboxNotFoundError(
                f"no local sandbox {sandbox_id!r} on this machine for this user (removed, or "
                "never created here); `sandbay ls` lists the live ones",
                provider=NAME,
                sandbox_id=sandbox_id,
            )
        spec = _stored_spec(entry)
        bwrap = None
        if entry.get("isolated"):
            bwrap = _find_bwrap()  # raises ConfigError saying how to install it
        sandbox = LocalSandbox(spec, folder=folder, config=self.config, bwrap=bwrap)
        # The entry holds the lease as last renewed (the label only its first value), and
        # the entry is rewritten from this object: never put an older expiry back.
        lease = _lease(entry)
        if lease is not None:
            sandbox._expiry = lease
        # What it started before (also what it left running) is stopped when it closes.
        sandbox._groups.update(_recorded_groups(entry.get("processes")))
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
                lease=_lease(entry),
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
    async def status(self) -> ProviderStatus:
        bwrap = shutil.which("bwrap")
        if bwrap:
            detail = f"bubblewrap at {bwrap}: sandboxes are isolated"
            if self.config.isolate is False:
                detail = f"bubblewrap at {bwrap}, but isolate = false: sandboxes are not isolated"
        elif self.config.isolate:
            detail = f"bubblewrap not found, so isolate = true is unavailable: {_BWRAP_HELP}"
        else:
            detail = (
                "bubblewrap not found: sandboxes run unisolated, as you; install bubblewrap "
                "(apt-get install bubblewrap, dnf install bubblewrap) to isolate them"
            )
        # Usable unless isolation was required and cannot be had.
        reachable = bool(bwrap) or not self.config.isolate
        return ProviderStatus(name=NAME, installed=True, reachable=reachable, detail=detail)

    @override
    async def build_image(self, *, refresh: bool = False) -> str:
        raise ConfigError(
            "the local provider runs on this machine and has no images "
            "(its agents use the Python running sandbay)"
        )


def _stored_spec(entry: Mapping[str, object]) -> SandboxSpec:
    """The spec a registry entry recorded; its labels at least, for entries without one."""
    labels = entry.get("labels")
    stored = entry.get("spec")
    data = dict(stored) if isinstance(stored, dict) else {}
    data["labels"] = dict(labels) if isinstance(labels, dict) else {}
    try:
        return SandboxSpec.model_validate(data)
    except ConfigError:  # written by another version of sandbay: keep what still fits
        return SandboxSpec(labels=data["labels"])


def _recorded_groups(processes: object) -> dict[int, tuple[int, int]]:
    groups: dict[int, tuple[int, int]] = {}
    if isinstance(processes, list):
        for item in processes:
            if isinstance(item, list) and len(item) == 3 and all(type(x) is int for x in item):
                groups[item[0]] = (item[1], item[2])
    return groups
