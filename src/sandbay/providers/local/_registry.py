"""Host-side state of the local provider; the blocking helpers run in a worker thread.

The registry (one JSON entry per sandbox, so that `list`, `gc` and `destroy` work from other
processes), the sandboxes' folders, atomic file writes, and the process groups a sandbox
started, recorded so they can be killed later without hitting a reused pid. Also `NAME`, the
provider's name, which every module of this package uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..._errors import ConfigError

NAME = "local"


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
        # A process may have left read-only directories behind. Only directories are made
        # writable, opened without following links: a link the sandbox planted must never
        # lead this chmod to a host file.
        for directory in (os.path.dirname(path), path):
            _make_dir_writable(directory)
        with contextlib.suppress(FileNotFoundError):
            func(path)

    if not folder.exists():
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(folder, onexc=retry)
    else:
        shutil.rmtree(folder, onerror=retry)


def _make_dir_writable(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY)
    except OSError:
        return  # not a directory (or a link to one): leave it alone
    try:
        os.fchmod(fd, 0o700)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    """Kill recorded processes ``[pid, earliest, latest start]`` unless the pid was reused.

    Each pid is a command's supervisor (or, under bubblewrap, bwrap itself): the tree beneath
    it is killed, then its process group. A group outlives its leader while its members run,
    and the kernel does not hand out its id meanwhile; so a leader that is gone still leaves
    the id safe to signal.
    """
    for group in groups:
        try:
            pid, lo, hi = (int(value) for value in group)
        except (TypeError, ValueError):
            continue
        started = _start_time(pid)
        if started is not None:
            if not lo <= started <= hi:
                continue  # another process has this pid: the one we started is gone
            _kill_tree(pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _kill_tree(pid: int) -> None:
    """SIGKILL pid and every process beneath it, whatever their session or process group.

    Each is stopped first and the tree walked again until no new process appears, so none
    can fork away between the walk and the kill; only then is every one of them killed.
    With pid a child subreaper (see `_supervisor`), orphans stay beneath it until then.
    """
    stopped = [pid]
    _signal(pid, signal.SIGSTOP)
    while True:
        new = [child for child in descendants(pid) if child not in stopped]
        if not new:
            break
        for child in new:
            _signal(child, signal.SIGSTOP)
        stopped += new
    for target in reversed(stopped):
        _signal(target, signal.SIGKILL)
    # A killed process runs no more code, but it is listed until the kernel has torn it
    # down: wait for that (briefly), so that "closed" means no process of it is left.
    deadline = time.monotonic() + _TEARDOWN_WAIT
    while any(_alive(target) for target in stopped) and time.monotonic() < deadline:
        time.sleep(0.005)


#: Seconds `_kill_tree` waits for the kernel to tear killed processes down.
_TEARDOWN_WAIT = 2.0


def _alive(pid: int) -> bool:
    """Whether pid is a process that has not yet exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :][:1] not in ("Z", "X")


_HAS_CHILDREN_FILES = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def descendants(pid: int) -> list[int]:
    """Every process beneath pid, from /proc (Linux); empty where /proc is not there."""
    # /proc/<pid>/task/<tid>/children needs CONFIG_PROC_CHILDREN; else scan every parent.
    children = None if _HAS_CHILDREN_FILES else _children_map()
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        kids = children.get(parent, []) if children is not None else _children(parent)
        for kid in kids:
            if kid not in found and kid != pid:
                found.append(kid)
                todo.append(kid)
    return found


def _children(pid: int) -> list[int]:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    kids: list[int] = []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                kids += [int(kid) for kid in fh.read().split()]
        except (OSError, ValueError):
            continue
    return kids


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        with contextlib.suppress(IndexError, ValueError):
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children
