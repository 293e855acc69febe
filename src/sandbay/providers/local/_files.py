"""File operations of the local provider, in a worker thread, with typed errors.

Unisolated, a sandbox's paths are host paths and a file operation is a plain one.

Isolated, a path names a file in the sandbox's mount namespace, which the host reproduces
here: `Mounts` is the table bubblewrap was given, and `_Walk` resolves a path one component
at a time with directory file descriptors (``openat`` with ``O_NOFOLLOW``), following each
symlink it meets as the sandbox would (an absolute target starts again from the sandbox's
root, never the host's). No path is checked and then used by name, so a process flipping a
directory to a link while sandbay looks cannot lead it to a host file. Where the host has
rights the sandbox lacks (root, whose capabilities bubblewrap drops), the file modes are
checked as the kernel checks them for a process without capabilities.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import secrets
import stat
from collections import deque
from dataclasses import dataclass, field

CHUNK = 256 * 1024
# As the kernel's MAXSYMLINKS: more links than this in one path is a loop.
_MAX_LINKS = 40
_O_PATH = getattr(os, "O_PATH", 0)


@dataclass(frozen=True)
class Mounts:
    """What an isolated sandbox sees where: the mount table bubblewrap was given."""

    binds: dict[str, str]
    """Sandbox path -> host path of each bind mount (directories or files)."""
    writable: frozenset[str] = frozenset()
    """The sandbox paths of the binds it may write to."""
    links: dict[str, str] = field(default_factory=dict)
    """Sandbox path -> target of each symlink bubblewrap creates (merged /usr)."""
    opaque: frozenset[str] = frozenset()
    """Mounts the host cannot reproduce (/proc, /dev)."""

    def is_parent_of_mount(self, path: str) -> bool:
        """Whether path is a directory bubblewrap created to hold a mount below it."""
        prefix = path.rstrip("/") + "/"
        return any(p.startswith(prefix) for p in (*self.binds, *self.links, *self.opaque))


class FileError(Exception):
    """A file operation failed; ``errno`` says why, as an OSError would."""

    def __init__(self, code: int, detail: str = "") -> None:
        super().__init__(code, detail)
        self.errno = code
        self.detail = detail


# --- unisolated -------------------------------------------------------------------------


def open_for_reading(path: str) -> int:
    """Open a host path for reading; a directory raises ``IsADirectoryError``."""
    return _checked(os.open(path, _READ_FLAGS))


# Non-blocking, so that opening a FIFO cannot hang a worker thread; `_checked` undoes it.
_READ_FLAGS = os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK


def _checked(fd: int) -> int:
    """fd, made blocking, if it is a file that can be read to its end; else close it."""
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise FileError(errno.EISDIR)
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            raise FileError(errno.EOPNOTSUPP, "it is a FIFO or socket; read it with exec")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_host(path: str, data: bytes, mode: int) -> None:
    """Write a host file atomically, creating parent directories."""
    parent, name = posixpath.split(path)
    try:
        os.makedirs(parent or "/", exist_ok=True)
    except FileExistsError:
        # A parent is a file: what mkdir -p and a shell's redirection report.
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path) from None
    fd = os.open(parent or "/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _replace(fd, name, data, mode)
    finally:
        os.close(fd)


def read_chunk(fd: int) -> bytes:
    return os.read(fd, CHUNK)


# --- isolated ---------------------------------------------------------------------------


@dataclass
class _Dir:
    name: str
    fd: int | None  # None: a directory bubblewrap made, which exists only in the sandbox
    writable: bool


class _Walk:
    """A path's resolution in an isolated sandbox; holds directory fds until closed."""

    def __init__(self, mounts: Mounts, *, check_modes: bool) -> None:
        self._mounts = mounts
        self._check_modes = check_modes
        self._stack: list[_Dir] = []
        self._links = 0

    def close(self) -> None:
        while self._stack:
            self._pop()

    def _pop(self) -> None:
        top = self._stack.pop()
        if top.fd is not None:
            os.close(top.fd)

    def _here(self, name: str | None = None) -> str:
        names = [d.name for d in self._stack] + ([name] if name is not None else [])
        return "/" + "/".join(names)

    def resolve_parent(self, path: str, *, create: bool) -> str:
        """Walk to the directory holding path's last component; return that component.

        With ``create``, missing directories are made on the way (as ``mkdir -p``).
        """
        self.close()
        return self._walk_to_last(deque(_parts(path)), create=create)

    def _step(self, todo: deque[str], *, create: bool) -> None:
        name = todo.popleft()
        if name == "..":
            if self._stack:
                self._pop()
            return
        inner = self._here(name)
        if inner in self._mounts.links:
            self._follow(self._mounts.links[inner], todo)
            return
        if inner in self._mounts.opaque:
            raise FileError(errno.EOPNOTSUPP, f"{inner} cannot be reached from the host")
        if inner in self._mounts.binds:
            fd = os.open(self._mounts.binds[inner], _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            self._stack.append(_Dir(name, fd, inner in self._mounts.writable))
            self._check(fd, os.X_OK)
            return
        parent = self._stack[-1] if self._stack else _Dir("", None, False)
        if parent.fd is None:
            if self._mounts.is_parent_of_mount(inner):
                self._stack.append(_Dir(name, None, False))
                return
            raise FileError(errno.EROFS if create else errno.ENOENT)
        fd = self._open_entry(parent, name, create=create)
        info = os.fstat(fd)
        if stat.S_ISLNK(info.st_mode):
            try:
                target = os.readlink("", dir_fd=fd)
            finally:
                os.close(fd)
            self._follow(target, todo)
        elif stat.S_ISDIR(info.st_mode):
            self._stack.append(_Dir(name, fd, parent.writable))
            self._check(fd, os.X_OK)
        else:
            os.close(fd)
            raise FileError(errno.ENOTDIR)

    def _open_entry(self, parent: _Dir, name: str, *, create: bool) -> int:
        assert parent.fd is not None
        try:
            return os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        except FileNotFoundError:
            if not create:
                raise
        if not parent.writable:
            raise FileError(errno.EROFS)
        self._check(parent.fd, os.W_OK | os.X_OK)
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o777, dir_fd=parent.fd)
        return os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)

    def _follow(self, target: str, todo: deque[str]) -> None:
        self._links += 1
        if self._links > _MAX_LINKS:
            raise FileError(errno.ELOOP)
        if target.startswith("/"):
            while self._stack:
                self._pop()
        todo.extendleft(reversed(_parts(target)))

    def _check(self, fd: int, want: int) -> None:
        if self._check_modes and not _permits(os.fstat(fd), want):
            raise FileError(errno.EACCES)

    def open_last(self, name: str, *, write: bool) -> tuple[int | None, str, int | None]:
        """The parent's fd, the last component and an O_PATH fd of it (None if missing).

        Follows a link in the last component as the sandbox would; returns with the walk
        positioned at the directory that holds the final file.
        """
        while True:
            inner = self._here(name)
            if inner in self._mounts.links:
                todo = deque[str]()
                self._follow(self._mounts.links[inner], todo)
                name = self._walk_to_last(todo, create=write)
                continue
            if inner in self._mounts.opaque:
                raise FileError(errno.EOPNOTSUPP, f"{inner} cannot be reached from the host")
            if inner in self._mounts.binds:
                host = self._mounts.binds[inner]
                return None, host, os.open(host, _O_PATH | os.O_CLOEXEC)
            parent = self._stack[-1] if self._stack else _Dir("", None, False)
            if parent.fd is None:
                if self._mounts.is_parent_of_mount(inner) or inner == "/":
                    raise FileError(errno.EISDIR)
                raise FileError(errno.EROFS if write else errno.ENOENT)
            try:
                fd = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
            except FileNotFoundError:
                if write:
                    return parent.fd, name, None
                raise
            info = os.fstat(fd)
            if not stat.S_ISLNK(info.st_mode):
                return parent.fd, name, fd
            try:
                target = os.readlink("", dir_fd=fd)
            finally:
                os.close(fd)
            todo = deque[str]()
            self._follow(target, todo)
            if not todo:
                raise FileError(errno.EISDIR)  # a link to the root
            name = self._walk_to_last(todo, create=write)

    def _walk_to_last(self, todo: deque[str], *, create: bool) -> str:
        while len(todo) > 1 or (todo and todo[0] == ".."):
            self._step(todo, create=create)
        if not todo:
            raise FileError(errno.EISDIR)  # the root
        return todo[0]

    def parent_writable(self) -> bool:
        return bool(self._stack) and self._stack[-1].writable


def _parts(path: str) -> list[str]:
    return [part for part in path.split("/") if part not in ("", ".")]


def _permits(info: os.stat_result, want: int) -> bool:
    """Whether a process of this uid without capabilities may do ``want`` (R/W/X_OK)."""
    if info.st_uid == os.geteuid():
        bits = (info.st_mode >> 6) & 7
    elif info.st_gid == os.getegid() or info.st_gid in os.getgroups():
        bits = (info.st_mode >> 3) & 7
    else:
        bits = info.st_mode & 7
    return bits & want == want


def isolated_open(mounts: Mounts, path: str) -> int:
    """Open a file of an isolated sandbox for reading, as a process in it would."""
    walk = _Walk(mounts, check_modes=_host_has_more_rights())
    try:
        name = walk.resolve_parent(path, create=False)
        parent_fd, name, probe = walk.open_last(name, write=False)
        assert probe is not None
        try:
            info = os.fstat(probe)
        finally:
            os.close(probe)
        if stat.S_ISDIR(info.st_mode):
            raise FileError(errno.EISDIR)
        if walk._check_modes and not _permits(info, os.R_OK):
            raise FileError(errno.EACCES)
        if parent_fd is None:
            # A file bound from the host, the same on both sides.
            return _checked(os.open(name, _READ_FLAGS))
        # The last component was no link a moment ago; if it is one now, refuse rather
        # than follow it.
        return _checked(os.open(name, _READ_FLAGS | os.O_NOFOLLOW, dir_fd=parent_fd))
    finally:
        walk.close()


def isolated_write(mounts: Mounts, path: str, data: bytes, mode: int) -> None:
    """Write a file of an isolated sandbox atomically, as a process in it could."""
    walk = _Walk(mounts, check_modes=_host_has_more_rights())
    try:
        name = walk.resolve_parent(path, create=True)
        parent_fd, name, probe = walk.open_last(name, write=True)
        if probe is not None:
            try:
                is_dir = stat.S_ISDIR(os.fstat(probe).st_mode)
            finally:
                os.close(probe)
            if is_dir:
                raise FileError(errno.EISDIR)
        if parent_fd is None or not walk.parent_writable():
            raise FileError(errno.EROFS)
        if walk._check_modes and not _permits(os.fstat(parent_fd), os.W_OK | os.X_OK):
            raise FileError(errno.EACCES)
        _replace(parent_fd, name, data, mode)
    finally:
        walk.close()


def _replace(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Write name in the directory dir_fd through a temporary file and a rename."""
    tmp = f".{name[:200]}.{secrets.token_hex(4)}.sandbay"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            os.fchmod(fh.fileno(), mode)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def _host_has_more_rights() -> bool:
    # Root's capabilities ignore file modes; bubblewrap drops them for the sandbox.
    return os.geteuid() == 0
