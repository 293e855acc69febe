"""The local provider: processes on this machine, each sandbox a private directory.

It needs nothing installed, which makes it the default and the fastest to start. Without
``isolate`` it is a convenience, not a security boundary; see `LocalProvider`.

Layout on the host::

    <root>/sandbay-<id>/          mode 0700, removed on close
        work/                     the working directory (bound at spec.workdir under bwrap)
        tmp/                      TMPDIR (bound at /tmp under bwrap)
    <registry>/<id>.json          labels, paths and process groups, so that `list`, `gc` and
                                  `destroy` work from other processes

The registry is ``$XDG_RUNTIME_DIR/sandbay-local`` when that is set, else
``<temp dir>/sandbay-local-<uid>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import pwd
import secrets
import shutil
import signal
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from typing_extensions import override

from .._config import LocalConfig
from .._errors import (
    ConfigError,
    SandboxError,
    SandboxFileNotFoundError,
    SandboxNotFoundError,
)
from .._provider import Provider, ProviderStatus, SandboxInfo
from .._sandbox import ByteStream, Process, Sandbox, SandboxSpec

__all__ = ["LocalProvider", "LocalSandbox"]

NAME = "local"
_CHUNK = 65536
# Seconds to wait for a killed process's pipes to close before giving up on it.
_REAP_TIMEOUT = 5.0
_BWRAP_HELP = (
    "install bubblewrap (apt-get install bubblewrap, dnf install bubblewrap) "
    "or set isolate = false in the local provider's config"
)
# Directories a process under bwrap sees read-only, when they exist on the host. Symlinks
# (merged /usr) are recreated as symlinks.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Only the parts of /etc that programs need to run: not shadow files, not host secrets.
_ETC_FILES = (
    "alternatives", "ca-certificates", "ca-certificates.conf", "debian_version", "group",
    "host.conf", "hosts", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "locale.alias",
    "localtime", "mime.types", "nsswitch.conf", "os-release", "passwd", "pki", "protocols",
    "resolv.conf", "services", "ssl", "timezone",
)  # fmt: skip

# Sandboxes open in this process, so `destroy` can stop their processes cleanly.
_live: weakref.WeakValueDictionary[str, LocalSandbox] = weakref.WeakValueDictionary()


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


class LocalSandbox(Sandbox):
    """A private directory on this machine; processes run as the current user.

    Without isolation `workdir` is the directory's host path (``spec.workdir`` is not used)
    and HOME points at it; with isolation the directory is mounted at ``spec.workdir``. Each
    process gets a clean environment: PATH, HOME, TMPDIR, LANG, then ``spec.env`` and the
    command's own env. Every command runs in its own process group, so `Process.kill` and
    `aclose` also stop what it started (on Linux, even children of commands that finished).

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
        full_env = {**self._base_env(), **env}
        if self._bwrap:
            command = [*self._bwrap_args(cwd), "--", "/bin/sh", "-c", 'exec "$@"', "sh", *argv]
            host_cwd = str(self._folder)
        else:
            command, host_cwd = argv, cwd
            if not await anyio.to_thread.run_sync(os.path.isdir, cwd):
                return FailedProcess(1, f"sandbay: working directory {cwd!r} does not exist\n")
        before = _boot_ticks()
        try:
            proc = await anyio.open_process(
                command, cwd=host_cwd, env=full_env, start_new_session=True
            )
        except FileNotFoundError:
            if self._bwrap:
                return FailedProcess(127, f"sandbay: bubblewrap vanished: {_BWRAP_HELP}\n")
            return FailedProcess(127, f"sandbay: {argv[0]}: command not found\n")
        except PermissionError:
            return FailedProcess(126, f"sandbay: {argv[0]}: permission denied\n")
        except OSError as exc:
            return FailedProcess(126, f"sandbay: {argv[0]}: {exc.strerror or exc}\n")
        after = _boot_ticks()
        process = LocalProcess(proc, on_closed=self._processes.discard)
        self._processes.add(process)
        if before is not None and after is not None:
            # Its start time lies in this window (reading it now could be too late: a quick
            # command may already be reaped); a pid reused later starts after it.
            self._groups[process.pid] = (before - 1, after + 1)
        await self._record_processes()
        return process

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

    def _bwrap_args(self, cwd: str) -> list[str]:
        assert self._bwrap is not None
        args = [self._bwrap, "--unshare-all", "--die-with-parent", "--new-session"]
        if self.spec.network == "host":
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
        for path in self._binds:
            args += ["--ro-bind", path, path]
        args += ["--proc", "/proc", "--dev", "/dev"]
        args += ["--bind", str(self._folder / "tmp"), "/tmp"]
        args += ["--bind", str(self._folder / "work"), self._inner_workdir]
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
            groups = [[pid, lo, hi] for pid, (lo, hi) in self._groups.items()]
            await anyio.to_thread.run_sync(self._save_entry, groups)

    def _save_entry(self, groups: list[list[int]]) -> None:
        entry = {
            "id": self.id,
            "folder": str(self._folder),
            "labels": dict(self.spec.labels),
            "isolated": bool(self._bwrap),
            "processes": groups,
        }
        _atomic_write(_registry() / f"{self.id}.json", json.dumps(entry).encode(), 0o600)

    async def _stop_processes(self) -> None:
        processes = list(self._processes)
        for process in processes:
            await process.kill()
        groups = [[pid, lo, hi] for pid, (lo, hi) in self._groups.items()]
        await anyio.to_thread.run_sync(_kill_recorded, groups)
        for process in processes:
            with anyio.move_on_after(_REAP_TIMEOUT):
                await process.aclose()
        self._processes.clear()

    # --- files --------------------------------------------------------------------------

    @override
    async def _write_file(self, path: str, data: bytes, *, mode: int) -> None:
        self._check_exists()
        host = self._host_path(path, write=True)
        try:
            await anyio.to_thread.run_sync(_write, host, data, mode)
        except IsADirectoryError:
            raise ConfigError(
                f"cannot write {path!r}: it is a directory", **self._where()
            ) from None
        except OSError as exc:
            raise SandboxError(
                f"cannot write {path!r}: {exc.strerror or exc}", **self._where()
            ) from None

    @override
    async def _read_file(self, path: str) -> bytes:
        self._check_exists()
        host = self._host_path(path, write=False)
        try:
            return await anyio.to_thread.run_sync(host.read_bytes)
        except (FileNotFoundError, NotADirectoryError):
            raise SandboxFileNotFoundError(f"no file at {path!r}", **self._where()) from None
        except IsADirectoryError:
            raise SandboxFileNotFoundError(
                f"{path!r} is a directory, not a file", **self._where()
            ) from None
        except OSError as exc:
            raise SandboxError(
                f"cannot read {path!r}: {exc.strerror or exc}", **self._where()
            ) from None

    def _host_path(self, path: str, *, write: bool) -> Path:
        """Where a path the sandbox's processes see lives on the host."""
        path = posixpath.normpath(path)
        if not self._bwrap:
            return Path(path)
        for inner, outer in ((self._inner_workdir, "work"), ("/tmp", "tmp")):
            if path == inner or path.startswith(inner.rstrip("/") + "/"):
                base = os.path.realpath(self._folder / outer)
                host = os.path.join(base, posixpath.relpath(path, inner))
                # A process may have planted a symlink to a host path it cannot see itself.
                if os.path.commonpath([base, os.path.realpath(host)]) != base:
                    if write:
                        raise ConfigError(f"{path!r} leads out of the sandbox", **self._where())
                    raise SandboxFileNotFoundError(f"no file at {path!r}", **self._where())
                return Path(host)
        if write:
            raise ConfigError(
                f"cannot write {path!r}: an isolated local sandbox can write only under "
                f"{self._inner_workdir} and /tmp",
                **self._where(),
            )
        parts = path.split("/")
        visible = any(path.startswith(p + "/") for p in (*self._binds, *_SYSTEM_DIRS)) or (
            len(parts) > 2 and parts[1] == "etc" and parts[2] in _ETC_FILES
        )
        if visible:
            return Path(path)  # read-only binds: the same file on both sides
        raise SandboxFileNotFoundError(f"no file at {path!r}", **self._where())

    # --- lifecycle ----------------------------------------------------------------------

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


class LocalProcess(Process):
    """A host process (or a bubblewrap namespace) in its own process group."""

    def __init__(
        self, proc: anyio.abc.Process, *, on_closed: Callable[[LocalProcess], None]
    ) -> None:
        self._proc = proc
        self._on_closed = on_closed
        self._stdin_closed = False
        self._eof = {"stdout": False, "stderr": False}
        self._closed = False
        self.pid = proc.pid
        self.stdout = ByteStream(self._receiver("stdout"))
        self.stderr = ByteStream(self._receiver("stderr"))

    def _receiver(self, name: str) -> Callable[[], Any]:
        async def receive() -> bytes | None:
            stream = getattr(self._proc, name)
            if self._eof[name]:
                return None
            try:
                return bytes(await stream.receive(_CHUNK))
            except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
                self._eof[name] = True
                await self._maybe_close()
                return None

        return receive

    @override
    async def write(self, data: bytes) -> None:
        if self._stdin_closed or self._proc.stdin is None:
            raise BrokenPipeError("stdin is closed (close_stdin was called)")
        try:
            await self._proc.stdin.send(data)
        except (
            anyio.BrokenResourceError,
            anyio.ClosedResourceError,
            BrokenPipeError,
            ConnectionResetError,
        ):
            raise BrokenPipeError("stdin is closed: the process exited") from None

    @override
    async def close_stdin(self) -> None:
        if self._stdin_closed:
            return
        self._stdin_closed = True
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError, anyio.BrokenResourceError):
                await self._proc.stdin.aclose()

    @override
    async def wait(self) -> int:
        code = await self._proc.wait()
        await self._maybe_close()
        return code

    @override
    async def kill(self) -> None:
        if self._closed:
            return
        # The whole group: children the command started die with it. Under bwrap the group
        # leader is bwrap, and --die-with-parent takes the namespace down with it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    @property
    @override
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def _maybe_close(self) -> None:
        # Once it exited and both pipes hit end of file nothing is left to read: release the
        # pipes now rather than at sandbox close.
        if self._proc.returncode is not None and all(self._eof.values()):
            await self.aclose()

    async def aclose(self) -> None:
        """Close the pipes and reap the process (after `kill`, or once it has exited)."""
        if self._closed:
            return
        self._closed = True
        self._stdin_closed = True
        with anyio.CancelScope(shield=True):
            await self._proc.aclose()
        self._on_closed(self)


class FailedProcess(Process):
    """A process that could not start: it has already exited with a message on stderr."""

    def __init__(self, code: int, message: str) -> None:
        self._code = code
        chunks = [message.encode()]

        async def stderr() -> bytes | None:
            return chunks.pop() if chunks else None

        async def stdout() -> bytes | None:
            return None

        self.stdout = ByteStream(stdout)
        self.stderr = ByteStream(stderr)

    @override
    async def write(self, data: bytes) -> None:
        raise BrokenPipeError("the process never started")

    @override
    async def close_stdin(self) -> None:
        pass

    @override
    async def wait(self) -> int:
        return self._code

    @override
    async def kill(self) -> None:
        pass

    @property
    @override
    def returncode(self) -> int:
        return self._code


# --- helpers (blocking ones run in a worker thread) ----------------------------------------


def _check_spec(spec: SandboxSpec, *, isolate: bool) -> None:
    if spec.image is not None:
        raise ConfigError(
            f"spec.image = {spec.image!r}: the local provider runs on this machine and has no "
            "images; unset it or use the docker provider",
            provider=NAME,
        )
    if spec.network == "none" and not isolate:
        raise ConfigError(
            'spec.network = "none" needs isolation: set isolate = true in the local provider\'s '
            "config (it uses bubblewrap), or use the docker provider",
            provider=NAME,
        )
    if not _is_current_user(spec.user):
        raise ConfigError(
            f"spec.user = {spec.user!r}: the local provider runs processes as the current user "
            "only; unset it or use the docker provider",
            provider=NAME,
        )
    if isolate:
        workdir = posixpath.normpath(spec.workdir)
        reserved = ("/proc", "/dev", "/etc", *_SYSTEM_DIRS)
        if (
            not workdir.startswith("/")
            or workdir in ("/", "/tmp")
            or any(workdir == p or workdir.startswith(p + "/") for p in reserved)
        ):
            raise ConfigError(
                f"spec.workdir = {spec.workdir!r}: under isolation the workspace must be an "
                "absolute path outside the system directories, such as /workspace",
                provider=NAME,
            )


def _find_bwrap() -> str:
    found = shutil.which("bwrap")
    if found is None:
        raise ConfigError(
            f"isolate = true needs bubblewrap (bwrap), which is not on PATH: {_BWRAP_HELP}",
            provider=NAME,
        )
    return found


def _is_current_user(user: str | None) -> bool:
    if user is None:
        return True
    uid, gid = os.getuid(), os.getgid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    return user in {name, str(uid), f"{uid}:{gid}", f"{name}:{gid}"}


def _python_dirs(python: str) -> list[str]:
    """The directories the agent's Python needs, to bind read-only under bwrap."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    found = shutil.which(python)
    if found:
        for exe in (found, os.path.realpath(found)):
            candidates.add(os.path.dirname(os.path.dirname(os.path.abspath(exe))))
    covered = ("/usr", "/bin", "/lib", "/etc")
    dirs = sorted(
        os.path.abspath(d)
        for d in candidates
        if os.path.isdir(d)
        and not any(d == c or d.startswith(c + "/") for c in covered)
        and d != "/"
    )
    # Parents first; drop directories already inside one kept.
    kept: list[str] = []
    for d in dirs:
        if not any(d.startswith(k + "/") for k in kept):
            kept.append(d)
    return kept


def _registry() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        path = Path(runtime) / "sandbay-local"
    else:
        path = Path(tempfile.gettempdir()) / f"sandbay-local-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise ConfigError(
            f"the local provider's registry {str(path)!r} belongs to another user or is "
            "writable by others; remove it",
            provider=NAME,
        )
    return path


def _make_folder(configured: Path | None) -> Path:
    root = Path(configured or tempfile.gettempdir()).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    while True:
        folder = root / f"sandbay-{secrets.token_hex(6)}"
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            continue
        folder.chmod(0o700)  # mkdir's mode is filtered by the umask
        (folder / "work").mkdir(mode=0o700)
        (folder / "tmp").mkdir(mode=0o700)
        return folder


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".sandbay")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            os.fchmod(fh.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write(path: Path, data: bytes, mode: int) -> None:
    if path.is_dir():
        raise IsADirectoryError(path)
    _atomic_write(path, data, mode)


def _valid_id(sandbox_id: str) -> bool:
    return len(sandbox_id) == 12 and all(c in "0123456789abcdef" for c in sandbox_id)


def _read_entry(sandbox_id: str) -> dict[str, Any] | None:
    if not _valid_id(sandbox_id):
        return None
    return _load(_registry() / f"{sandbox_id}.json")


def _read_entries() -> list[dict[str, Any]]:
    entries = [_load(file) for file in sorted(_registry().glob("*.json"))]
    found = [entry for entry in entries if entry is not None]
    for entry in found:
        entry["status"] = "running" if Path(entry["folder"]).is_dir() else "missing"
    return found


def _load(file: Path) -> dict[str, Any] | None:
    try:
        entry = json.loads(file.read_bytes())
    except (OSError, ValueError):
        return None
    valid = (
        isinstance(entry, dict)
        and _valid_id(str(entry.get("id")))
        and file.stem == entry["id"]
        and isinstance(entry.get("labels"), dict)
        and isinstance(entry.get("folder"), str)
    )
    return entry if valid else None


def _remove(sandbox_id: str, folder: Path) -> None:
    # Never follow a registry entry to a folder that is not a sandbox's.
    if folder.name == f"sandbay-{sandbox_id}":
        _rmtree(folder)
    with contextlib.suppress(FileNotFoundError):
        (_registry() / f"{sandbox_id}.json").unlink()


def _rmtree(folder: Path) -> None:
    def retry(func: Callable[..., Any], path: str, *_: object) -> None:
        # A process may have left read-only directories behind.
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(path), 0o700)
            os.chmod(path, 0o700)
        with contextlib.suppress(FileNotFoundError):
            func(path)

    if not folder.exists():
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(folder, onexc=retry)
    else:
        shutil.rmtree(folder, onerror=retry)


def _boot_ticks() -> int | None:
    """Clock ticks since boot, the unit of a process's start time in /proc; Linux only."""
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    if clock is None or not os.path.isdir("/proc/self"):
        return None
    return int(time.clock_gettime(clock) * os.sysconf("SC_CLK_TCK"))


def _start_time(pid: int) -> int | None:
    """When a process started (clock ticks since boot), to tell a reused pid; Linux only."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; fields resume after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_recorded(groups: list[list[int]]) -> None:
    """Kill recorded process groups ``[pid, earliest, latest start]`` unless the pid was reused.

    A group outlives its leader while its members run, and the kernel does not hand out its
    id meanwhile; so a leader that is gone still leaves the id safe to signal.
    """
    for group in groups:
        try:
            pid, lo, hi = (int(value) for value in group)
        except (TypeError, ValueError):
            continue
        started = _start_time(pid)
        if started is not None and not lo <= started <= hi:
            continue  # another process has this pid: the group we started is gone
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
