"""`LocalSandbox`: a private directory on this host, its processes and its files."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import posixpath
import socket
import sys
import tempfile
import weakref
from collections.abc import AsyncGenerator, Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
from typing_extensions import override

from ..._config import LocalConfig
from ..._errors import (
    ConfigError,
    SandboxError,
    SandboxFileNotFoundError,
    SandboxIsADirectoryError,
    SandboxNotADirectoryError,
    SandboxNotFoundError,
    SandboxPermissionError,
)
from ..._sandbox import CliLaunch, Process, RelaySeparation, Sandbox, SandboxSpec, TenantDirs
from . import _files
from ._bwrap import _BWRAP_HELP, _ETC_FILES, _SYSTEM_DIRS, _is_current_user, _python_dirs
from ._process import FailedProcess, LocalProcess
from ._registry import (
    NAME,
    _atomic_write,
    _boot_ticks,
    _group_exists,
    _kill_recorded,
    _registry,
    _remove,
)

# Seconds to wait for a killed process's pipes to close before giving up on it.
_REAP_TIMEOUT = 5.0

# Unisolated commands run under a supervisor that keeps every process they start (Linux).
#: Where a CLI under bwrap finds the relay's sockets (`CliLaunch.socket_dir`).
_SOCKET_DIR = "/run/sandbay"
_SUPERVISE = sys.platform.startswith("linux") and bool(sys.executable)
_SUPERVISOR = [sys.executable, "-S", "-I", str(Path(__file__).with_name("_supervisor.py"))]

# Sandboxes open in this process, so `destroy` can stop their processes cleanly.
_live: weakref.WeakValueDictionary[str, LocalSandbox] = weakref.WeakValueDictionary()


class LocalSandbox(Sandbox):
    """A private directory on this machine; processes run as the current user.

    Without isolation `workdir` is the directory's host path (``spec.workdir`` is not used)
    and HOME points at it; with isolation the directory is mounted at ``spec.workdir``. Each
    process gets a clean environment: PATH, HOME, TMPDIR, LANG, then ``spec.env`` and the
    command's own env. Every command runs in its own session. Unisolated (on Linux) it runs
    under a supervisor (`_supervisor`) that adopts everything it starts, whatever that does
    to its session or process group; under bubblewrap its PID namespace holds it all. So
    `Process.kill` and `aclose` stop everything a command started, also what it left running
    after it finished (which, unisolated, runs on until then, as in a container).

    See `LocalProvider` for what it does and does not protect against.
    """

    provider = NAME

    def __init__(
        self, spec: SandboxSpec, *, folder: Path, config: LocalConfig, bwrap: str | None
    ) -> None:
        super().__init__(spec)
        self._id = folder.name.removeprefix("sandbay-")
        self._folder = folder
        self._config = config
        self._bwrap = bwrap
        self._processes: set[LocalProcess] = set()
        # pid -> start time of every process group this sandbox started, finished ones too:
        # a command may leave background children behind in its group.
        self._groups: dict[int, tuple[int, int]] = {}
        self._registry_lock = anyio.Lock()
        self._mounts: _files.Mounts | None = None
        if bwrap:
            self._inner_workdir = posixpath.normpath(spec.workdir)
            self._binds = _python_dirs(self.python)

    @property
    @override
    def id(self) -> str:
        return self._id

    @property
    @override
    def workdir(self) -> str:
        if self._bwrap:
            return self._inner_workdir
        return str(self._folder / "work")

    @property
    @override
    def python(self) -> str:
        return self._config.python or sys.executable

    @property
    @override
    def agent_dir(self) -> str:
        # In the sandbox's own tmp/ (which isolation mounts at /tmp), so run logs go with it.
        if self._bwrap:
            return "/tmp/sandbay"
        return str(self._folder / "tmp" / "sandbay")

    @property
    @override
    def isolated(self) -> bool:
        return bool(self._bwrap)

    @property
    @override
    def allows_bypass_permissions(self) -> bool:
        return self.isolated or self._config.allow_bypass_permissions

    @property
    @override
    def reaches_host_loopback(self) -> bool:
        # Unisolated processes are host processes; under bwrap, all but network "none"
        # share the host's network.
        return not self._bwrap or self.spec.network != "none"

    # --- the relay, apart from the CLI ----------------------------------------------------
    #
    # Under bubblewrap the relay runs on this host, outside the sandbox, with its code and
    # runs in the sandbox's folder but not mounted into it; it starts the CLI in a bwrap of
    # its own (its PID namespace, a fresh /proc), so the CLI's tools see neither the relay's
    # process nor its files. (A bwrap inside a bwrap cannot map its user when this host's
    # user is root; one level of it, started from outside, always can.) Unisolated, the
    # relay and the CLI are processes of one user on one system: nothing stops a tool.

    @property
    @override
    def relay_separation(self) -> RelaySeparation:
        return "namespace" if self._bwrap else "none"

    @property
    @override
    def relay_dir(self) -> str:
        if self._bwrap:
            return str(self._folder / "relay")
        return self.agent_dir

    @override
    async def start_relay(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None
    ) -> Process:
        self._check_open()
        full = {**self.spec.env, **(env or {})}
        return await self._launch(list(argv), env=full, cwd="/", outside=True)

    def _tenant_folder(self, tenant: str) -> Path:
        return self._folder / "tenants" / tenant

    @override
    def tenant_dirs(self, tenant: str) -> TenantDirs:
        root = f"/tenants/{tenant}" if self._bwrap else str(self._tenant_folder(tenant))
        return TenantDirs(work=f"{root}/work", home=f"{root}/home", tmp=f"{root}/tmp")

    @override
    async def cli_launch(self, *, cwd: str, tenant: str | None = None) -> CliLaunch:
        self._check_exists()
        if tenant is not None:
            await anyio.to_thread.run_sync(self._make_tenant_folder, tenant)
        if not self._bwrap:
            return CliLaunch()
        if self.spec.network != "none":
            # The CLI shares this host's network: it reaches the relay's listener here.
            return CliLaunch(wrapper=(*self._bwrap_args(cwd, tenant=tenant), "--"))
        # The CLI's namespace has no network: the relay, on this host, offers its services
        # through Unix sockets in a directory of this launch alone, bound into that
        # namespace, where a forwarder gives the CLI a loopback address for them.
        sockets = await anyio.to_thread.run_sync(self._make_socket_dir)
        return CliLaunch(
            wrapper=(*self._bwrap_args(cwd, tenant=tenant, sockets=sockets), "--"),
            socket_dir=sockets,
            socket_dir_inner=_SOCKET_DIR,
        )

    def _make_socket_dir(self) -> str:
        parent = self._folder / "relay" / "sockets"
        parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return tempfile.mkdtemp(dir=parent)

    @override
    async def egress_cli_launch(
        self, *, cwd: str, tenant: str | None = None, socket: str
    ) -> CliLaunch:
        from ..._egress import FORWARDER_SOCKET, forwarder_argv

        plain = await self.cli_launch(cwd=cwd, tenant=tenant)
        if not self._bwrap:
            return plain
        # The relay's proxy socket, read-only (a socket still connects), and the forwarder
        # that listens in the CLI's network namespace and runs the CLI; the relay's other
        # sockets (the model's) as in `cli_launch`.
        args = self._bwrap_args(
            cwd,
            tenant=tenant,
            sockets=plain.socket_dir,
            extra=("--ro-bind", socket, FORWARDER_SOCKET),
        )
        return dataclasses.replace(plain, wrapper=(*args, "--", *forwarder_argv(self.python)))

    def _make_tenant_folder(self, tenant: str) -> None:
        folder = self._tenant_folder(tenant)
        for path in (folder.parent, folder, folder / "work", folder / "home", folder / "tmp"):
            path.mkdir(mode=0o700, exist_ok=True)
            path.chmod(0o700)

    # --- processes ----------------------------------------------------------------------

    @override
    async def _start(
        self, argv: list[str], *, env: dict[str, str], cwd: str, user: str | None
    ) -> Process:
        self._check_exists()
        if not _is_current_user(user):
            raise ConfigError(
                f"the local provider runs processes as the current user only, not {user!r}; "
                "use the docker provider to run as another user",
                provider=NAME,
                sandbox_id=self.id,
            )
        return await self._launch(argv, env=env, cwd=cwd, outside=False)

    async def _launch(
        self, argv: list[str], *, env: dict[str, str], cwd: str, outside: bool
    ) -> Process:
        """Start argv in the sandbox, or (``outside``) as a host process of the sandbox."""
        self._check_exists()
        full_env = {**self._base_env(), **env}
        status = report = None
        if self._bwrap and not outside:
            command = [*self._bwrap_args(cwd), "--", "/bin/sh", "-c", 'exec "$@"', "sh", *argv]
            host_cwd = str(self._folder)
        else:
            command, host_cwd = argv, cwd
            if not await anyio.to_thread.run_sync(os.path.isdir, cwd):
                return FailedProcess(1, f"sandbay: working directory {cwd!r} does not exist\n")
            if _SUPERVISE:
                status, report = socket.socketpair()
                status.setblocking(False)
                command = [*_SUPERVISOR, str(report.fileno()), *argv]
        await self._reap_finished()
        before = _boot_ticks()
        try:
            proc = await anyio.open_process(
                command,
                cwd=host_cwd,
                env=full_env,
                start_new_session=True,
                pass_fds=(report.fileno(),) if report else (),
            )
        except BaseException as exc:
            if status is not None:
                status.close()
            if isinstance(exc, OSError):
                return self._spawn_failed(exc, argv)
            raise
        finally:
            if report is not None:
                report.close()  # the supervisor has its own copy
        after = _boot_ticks()
        window = (before - 1, after + 1) if before is not None and after is not None else None
        process = LocalProcess(
            proc, status=status, window=window, on_closed=self._processes.discard
        )
        self._processes.add(process)
        if window is not None:
            # Its start time lies in this window (reading it now could be too late: a quick
            # command may already be reaped); a pid reused later starts after it.
            self._groups[process.pid] = window
        await self._record_processes()
        return process

    def _spawn_failed(self, exc: OSError, argv: list[str]) -> Process:
        if isinstance(exc, FileNotFoundError):
            if self._bwrap:
                return FailedProcess(127, f"sandbay: bubblewrap vanished: {_BWRAP_HELP}\n")
            return FailedProcess(127, f"sandbay: {argv[0]}: command not found\n")
        if isinstance(exc, PermissionError):
            return FailedProcess(126, f"sandbay: {argv[0]}: permission denied\n")
        return FailedProcess(126, f"sandbay: {argv[0]}: {exc.strerror or exc}\n")

    async def _reap_finished(self) -> None:
        # Supervisors that stayed for what their command left running, and have exited since.
        for process in list(self._processes):
            await process.reap_if_done()

    def _base_env(self) -> dict[str, str]:
        if self._bwrap:
            home, tmp = self._inner_workdir, "/tmp"
        else:
            home, tmp = str(self._folder / "work"), str(self._folder / "tmp")
        # The Python that has the Agent SDK comes first, then the host's search path (not a
        # secret, and the tools people expect); nothing else is inherited.
        search = [os.path.dirname(self.python), os.environ.get("PATH") or os.defpath]
        path = os.pathsep.join(part for part in search if part)  # "" would mean the cwd
        lang = os.environ.get("LANG") or "C.UTF-8"
        return {"PATH": path, "HOME": home, "TMPDIR": tmp, "LANG": lang}

    def _bwrap_args(
        self,
        cwd: str,
        *,
        tenant: str | None = None,
        sockets: str | None = None,
        extra: Sequence[str] = (),
    ) -> list[str]:
        assert self._bwrap is not None
        args = [self._bwrap, "--unshare-all", "--die-with-parent", "--new-session"]
        if self.spec.network != "none":
            # bwrap has no network of its own to route out through: "default" shares the
            # host's, as "host" does, so that the agent reaches its model.
            args.append("--share-net")
        args += ["--cap-drop", "ALL", "--hostname", "sandbay"]
        for path in _SYSTEM_DIRS:
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                args += ["--ro-bind", path, path]
        for name in _ETC_FILES:
            if os.path.exists(f"/etc/{name}"):
                args += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        if tenant is None:
            args += ["--bind", str(self._folder / "tmp"), "/tmp"]
            args += ["--bind", str(self._folder / "work"), self._inner_workdir]
        else:
            # The tenant's own directories and nothing else of the sandbox's.
            inner, folder = self.tenant_dirs(tenant), self._tenant_folder(tenant)
            args += ["--bind", str(folder / "tmp"), "/tmp"]
            for name, path in (("work", inner.work), ("home", inner.home), ("tmp", inner.tmp)):
                args += ["--bind", str(folder / name), path]
        # Last, so a Python installed under /tmp (a venv in a checkout there) stays visible.
        for path in self._binds:
            args += ["--ro-bind", path, path]
        if sockets is not None:
            args += ["--bind", sockets, _SOCKET_DIR]
        args += extra
        # The root bwrap builds is a tmpfs; without this, /etc and / itself are writable.
        args += ["--remount-ro", "/", "--chdir", cwd]
        return args

    async def _check_bwrap(self) -> None:
        """Run `true` once under bwrap so a kernel without user namespaces fails at create."""
        assert self._bwrap is not None
        command = [*self._bwrap_args(self._inner_workdir), "--", "/bin/sh", "-c", "true"]
        try:
            result = await anyio.run_process(
                command, cwd=str(self._folder), env=self._base_env(), check=False
            )
        except OSError as exc:
            raise ConfigError(f"bubblewrap failed to start ({exc}); {_BWRAP_HELP}") from None
        if result.returncode != 0:
            reason = result.stderr.decode(errors="replace").strip()
            raise ConfigError(
                f"bubblewrap cannot create a sandbox here ({reason}); it needs user namespaces "
                f"(sysctl kernel.unprivileged_userns_clone=1) or root, or set isolate = false",
                provider=NAME,
            )

    async def _record_processes(self) -> None:
        # Recorded for `destroy` from another process (e.g. `sandbay gc` after a crash).
        async with self._registry_lock:
            live = {p.pid for p in self._processes}
            for pid in [pid for pid in self._groups if pid not in live]:
                if not _group_exists(pid):
                    del self._groups[pid]
            await anyio.to_thread.run_sync(self._save_entry, self._recorded_groups())

    def _recorded_groups(self) -> list[list[int]]:
        return [[pid, lo, hi] for pid, (lo, hi) in self._groups.items()]

    def _save_entry(self, groups: list[list[int]]) -> None:
        # The entry is the lease: `list` and `gc` (in any process) read "expiry" from it.
        entry = {
            "id": self.id,
            "folder": str(self._folder),
            "labels": dict(self.spec.labels),
            # For `LocalProvider.connect`; the file is the user's alone (0600).
            "spec": self.spec.model_dump(mode="json", exclude={"labels"}),
            "isolated": bool(self._bwrap),
            "processes": groups,
            "expiry": self.expiry,
        }
        _atomic_write(_registry() / f"{self.id}.json", json.dumps(entry).encode(), 0o600)

    async def _stop_processes(self) -> None:
        processes = list(self._processes)
        for process in processes:
            await process.kill()
        await anyio.to_thread.run_sync(_kill_recorded, self._recorded_groups())
        for process in processes:
            with anyio.move_on_after(_REAP_TIMEOUT):
                await process.aclose()
        self._processes.clear()

    # --- files --------------------------------------------------------------------------

    @override
    async def _write_file(self, path: str, data: bytes, *, mode: int) -> None:
        self._check_exists()
        try:
            if self._bwrap:
                mounts = await anyio.to_thread.run_sync(self._mount_table)
                await anyio.to_thread.run_sync(_files.isolated_write, mounts, path, data, mode)
            else:
                await anyio.to_thread.run_sync(_files.write_host, path, data, mode)
        except (OSError, _files.FileError) as exc:
            raise self._file_error(exc, path, write=True) from None

    @override
    async def _read_stream(self, path: str) -> AsyncGenerator[bytes, None]:
        self._check_exists()
        try:
            if self._bwrap:
                mounts = await anyio.to_thread.run_sync(self._mount_table)
                fd = await anyio.to_thread.run_sync(_files.isolated_open, mounts, path)
            else:
                fd = await anyio.to_thread.run_sync(_files.open_for_reading, path)
        except (OSError, _files.FileError) as exc:
            raise self._file_error(exc, path, write=False) from None
        try:
            while True:
                try:
                    chunk = await anyio.to_thread.run_sync(_files.read_chunk, fd)
                except OSError as exc:
                    raise self._file_error(exc, path, write=False) from None
                if not chunk:
                    return
                yield chunk
        finally:
            os.close(fd)

    def _file_error(
        self, exc: OSError | _files.FileError, path: str, *, write: bool
    ) -> SandboxError:
        where = self._where()
        code = exc.errno
        verb = "write" if write else "read"
        if code == errno.ENOENT:
            return SandboxFileNotFoundError(f"no file at {path!r}", **where)
        if code == errno.EISDIR:
            return SandboxIsADirectoryError(f"cannot {verb} {path!r}: it is a directory", **where)
        if code == errno.ENOTDIR:
            return SandboxNotADirectoryError(
                f"cannot {verb} {path!r}: a parent in the path is not a directory", **where
            )
        if code == errno.EROFS:
            return SandboxPermissionError(
                f"cannot write {path!r}: it is read-only in the sandbox; an isolated local "
                f"sandbox can write only under {self.workdir} and /tmp",
                **where,
            )
        if code in (errno.EACCES, errno.EPERM):
            return SandboxPermissionError(
                f"cannot {verb} {path!r}: permission denied to the sandbox's user", **where
            )
        if isinstance(exc, _files.FileError):
            detail = exc.detail or os.strerror(exc.errno)
        else:
            detail = exc.strerror or str(exc)
        return SandboxError(f"cannot {verb} {path!r}: {detail}", **where)

    def _mount_table(self) -> _files.Mounts:
        """The paths bubblewrap mounts, as `_bwrap_args` mounts them (a worker thread)."""
        if self._mounts is None:
            binds: dict[str, str] = {}
            links: dict[str, str] = {}
            for path in _SYSTEM_DIRS:
                if os.path.islink(path):
                    links[path] = os.readlink(path)
                elif os.path.isdir(path):
                    binds[path] = path
            for name in _ETC_FILES:
                if os.path.exists(f"/etc/{name}"):
                    binds[f"/etc/{name}"] = f"/etc/{name}"
            binds["/tmp"] = str(self._folder / "tmp")
            binds[self._inner_workdir] = str(self._folder / "work")
            for path in self._binds:
                binds[path] = path
            self._mounts = _files.Mounts(
                binds=binds,
                writable=frozenset({"/tmp", self._inner_workdir} - set(self._binds)),
                links=links,
                opaque=frozenset({"/proc", "/dev"}),
            )
        return self._mounts

    # --- lifecycle ----------------------------------------------------------------------

    @override
    async def _extend(self, expiry: float) -> None:
        # Only the host writes the registry: a process in the sandbox cannot reach it
        # isolated; unisolated it runs as you and could, as it could do anything you can.
        self._check_exists()
        async with self._registry_lock:
            previous, self._expiry = self._expiry, expiry
            try:
                await anyio.to_thread.run_sync(self._save_entry, self._recorded_groups())
            except BaseException:
                self._expiry = previous
                raise

    @override
    async def _aclose(self) -> None:
        _live.pop(self.id, None)
        await self._stop_processes()
        await anyio.to_thread.run_sync(_remove, self.id, self._folder)

    def _check_exists(self) -> None:
        if not self._folder.is_dir():
            raise SandboxNotFoundError(
                f"the sandbox's directory {str(self._folder)!r} is gone (destroyed by "
                "`sandbay gc` or another process?); open a new sandbox",
                **self._where(),
            )

    def _where(self) -> dict[str, Any]:
        return {"provider": NAME, "sandbox_id": self.id}
