"""The file API's machinery: a helper program run in the sandbox, and the host side of trees.

`Sandbox.list_dir`, `stat`, `remove`, `make_dir`, `upload` and `download` run `HELPER` with
the sandbox's Python, as the sandbox's user, from ``/``: so they have that user's rights and
see what its processes see, on every provider, with nothing provider-specific. It answers in
records, one JSON object a line (``ensure_ascii``, so names that are not UTF-8 travel as
surrogate escapes, as Python's ``os`` functions give and take them):

- an entry: ``{"type", "size", "mode", "mtime"}`` plus ``"name"`` (listings), ``"path"``
  (trees, relative to the tree's root, ``"."`` for the root) and ``"target"`` (symlinks);
- ``{"error": "ENOENT", "path", "message"}``, the last record of a failed operation;
- ``{"end": true}``, the last record of one that succeeded.

A tree travels in the same records, both ways: directories before what they hold, each
regular file's record followed by exactly ``size`` bytes of contents and one status byte
(``.``, or ``!`` and then an error record). The host never trusts what the sandbox sends:
`Records` bounds every line it reads, `entry` checks every field, and `LocalTree` writes a
downloaded tree under its root only, never through a link (see its docstring).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import secrets
import stat
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from ._errors import (
    ProtocolError,
    SandboxError,
    SandboxFileExistsError,
    SandboxFileNotFoundError,
    SandboxIsADirectoryError,
    SandboxNotADirectoryError,
    SandboxPermissionError,
)

if TYPE_CHECKING:
    from ._sandbox import ByteStream

logger = logging.getLogger("sandbay")

#: Bytes of file contents moved per read or write, either way.
CHUNK = 256 * 1024
#: Files up to this size are read (or written) on the host in one worker-thread call.
SMALL_FILE = 1024 * 1024
#: Longest record line accepted from the sandbox (a name is at most 255 bytes and a link's
#: target 4096, each up to six characters a byte once escaped).
MAX_RECORD = 64 * 1024

# Runs in the sandbox, with the sandbox's Python (3.10+, `-I -S`), as the sandbox's user.
# argv: the operation, then its arguments. Never imports anything outside the stdlib.
HELPER = r"""
import errno, json, os, stat, sys

out = sys.stdout.buffer
CHUNK = 256 * 1024


def emit(record):
    out.write(json.dumps(record).encode("ascii") + b"\n")


def fail(exc, path):
    name = exc.filename if isinstance(exc.filename, str) else path
    emit({"error": errno.errorcode.get(exc.errno or 0, "EIO"), "path": name,
          "message": exc.strerror or str(exc)})
    out.flush()
    sys.exit(3)


def kind(mode):
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    return "other"


def describe(location, st, **extra):
    record = {"type": kind(st.st_mode), "size": st.st_size,
              "mode": stat.S_IMODE(st.st_mode), "mtime": st.st_mtime}
    if stat.S_ISLNK(st.st_mode):
        try:
            record["target"] = os.readlink(location)
        except OSError:
            record["target"] = ""
    record.update(extra)
    return record


def op_stat(path, follow, probe):
    try:
        st = os.stat(path) if follow == "1" else os.lstat(path)
    except OSError as exc:
        if probe == "1" and exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            emit({"missing": True})
            return
        fail(exc, path)
    emit(describe(path, st))


def op_list(path):
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed meanwhile
                emit(describe(entry.path, st, name=entry.name))
    except OSError as exc:
        fail(exc, path)


def op_remove(path, recursive, missing_ok):
    try:
        st = os.lstat(path)
    except FileNotFoundError as exc:
        if missing_ok == "1":
            return
        fail(exc, path)
    except OSError as exc:
        fail(exc, path)
    try:
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path)  # a link itself, never what it leads to
        elif recursive != "1":
            raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
        else:
            import shutil
            shutil.rmtree(path)  # with directory fds: never follows a link inside
    except OSError as exc:
        fail(exc, path)


def op_mkdir(path, parents, exist_ok):
    try:
        if parents == "1":
            os.makedirs(path, exist_ok=exist_ok == "1")
        else:
            os.mkdir(path)
    except FileExistsError as exc:
        if exist_ok != "1" or not os.path.isdir(path):
            fail(exc, path)
    except OSError as exc:
        fail(exc, path)


def send_file(rel, path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        fail(exc, path)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            emit(describe(path, st, path=rel))
            return
        os.set_blocking(fd, True)
        emit(describe(path, st, path=rel))
        left, problem = st.st_size, None
        while left:
            data = b""
            if problem is None:
                try:
                    data = os.read(fd, min(CHUNK, left))
                except OSError as exc:
                    problem = exc
                if not data and problem is None:
                    problem = OSError(errno.EIO, "the file shrank while it was read", path)
            data = data or bytes(min(CHUNK, left))
            out.write(data)
            left -= len(data)
        if problem is not None:
            out.write(b"!")
            fail(problem, path)
        out.write(b".")
    finally:
        os.close(fd)


def op_get(root):
    try:
        st = os.stat(root)
    except OSError as exc:
        fail(exc, root)
    if stat.S_ISREG(st.st_mode):
        send_file(".", root)
        return
    emit(describe(root, st, path="."))
    if not stat.S_ISDIR(st.st_mode):
        return
    todo = [(".", root)]
    while todo:
        rel, path = todo.pop()
        try:
            with os.scandir(path) as entries:
                names = sorted(entry.name for entry in entries)
        except OSError as exc:
            fail(exc, path)
        base = path.rstrip("/") + "/"
        subdirs = []
        for name in names:
            child, crel = base + name, (name if rel == "." else rel + "/" + name)
            try:
                st = os.lstat(child)
            except FileNotFoundError:
                continue  # removed meanwhile
            except OSError as exc:
                fail(exc, child)
            if stat.S_ISREG(st.st_mode):
                send_file(crel, child)
            else:
                emit(describe(child, st, path=crel))
                if stat.S_ISDIR(st.st_mode):
                    subdirs.append((crel, child))
        todo.extend(reversed(subdirs))


def op_put(root):
    inp = sys.stdin.buffer
    made = []  # directories this made: their modes and times are set last

    def record():
        line = inp.readline(1 << 20)
        if not line.endswith(b"\n"):
            sys.exit(4)  # the host stopped sending
        return json.loads(line)

    def target(rel):
        return root if rel == "." else root.rstrip("/") + "/" + rel

    def put_file(path, rec):
        parent = os.path.dirname(path) or "/"
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", path)
        name = os.path.basename(path)[:100]
        tmp = "%s/.%s.%s.sandbay-upload" % (parent, name, os.urandom(4).hex())
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except PermissionError:
            if not os.path.isfile(path):
                raise
            # The user may write the file but not create one beside it: in place, as `cat >`.
            tmp, fd = None, os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
        try:
            left = rec["size"]
            while left:
                data = inp.read(min(CHUNK, left))
                if not data:
                    sys.exit(4)  # the host stopped sending
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                left -= len(data)
            if tmp is not None:
                os.fchmod(fd, rec["mode"])
            os.utime(fd, (rec["mtime"], rec["mtime"]))
        except BaseException:
            os.close(fd)
            if tmp is not None:
                os.unlink(tmp)
            raise
        os.close(fd)
        if tmp is not None:
            os.replace(tmp, path)

    rec = record()
    path = root
    try:
        if rec["path"] != ".":
            sys.exit(5)
        if rec["type"] == "dir":
            if not os.path.isdir(root):
                try:
                    os.makedirs(root)
                except FileExistsError:
                    raise NotADirectoryError(errno.ENOTDIR, "Not a directory", root) from None
                made.append((root, rec))
        else:
            try:
                os.makedirs(os.path.dirname(root) or "/", exist_ok=True)
            except FileExistsError:
                raise NotADirectoryError(errno.ENOTDIR, "Not a directory", root) from None
            put_file(root, rec)
        while True:
            rec = record()
            if rec.get("end"):
                break
            path = target(rec["path"])
            if rec["type"] == "dir":
                try:
                    os.mkdir(path, 0o700)
                    made.append((path, rec))
                except FileExistsError:
                    if not os.path.isdir(path):
                        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", path) from None
            elif rec["type"] == "file":
                put_file(path, rec)
            elif rec["type"] == "symlink":
                try:
                    os.symlink(rec["target"], path)
                except FileExistsError:
                    if os.path.isdir(path) and not os.path.islink(path):
                        raise IsADirectoryError(errno.EISDIR, "Is a directory", path) from None
                    os.unlink(path)
                    os.symlink(rec["target"], path)
        for path, rec in reversed(made):
            os.chmod(path, rec["mode"])
            os.utime(path, (rec["mtime"], rec["mtime"]))
    except OSError as exc:
        fail(exc, path)


OPS = {"stat": op_stat, "list": op_list, "remove": op_remove, "mkdir": op_mkdir,
       "get": op_get, "put": op_put}
OPS[sys.argv[1]](*sys.argv[2:])
emit({"end": True})
out.flush()
"""

FILE_TYPES = frozenset({"file", "dir", "symlink", "other"})

# errno names the helper reports -> sandbay's typed errors.
_ERRORS: Mapping[str, type[SandboxError]] = {
    "ENOENT": SandboxFileNotFoundError,
    "EISDIR": SandboxIsADirectoryError,
    "ENOTDIR": SandboxNotADirectoryError,
    "EACCES": SandboxPermissionError,
    "EPERM": SandboxPermissionError,
    "EROFS": SandboxPermissionError,
    "EEXIST": SandboxFileExistsError,
}


def error_from(record: Mapping[str, Any], what: str, **where: Any) -> SandboxError:
    """The typed error for the helper's error record."""
    name = str(record.get("error"))
    path = record.get("path")
    message = str(record.get("message") or name)[:500]
    detail = f"{message}: {path!r}" if isinstance(path, str) else message
    kind = _ERRORS.get(name, SandboxError)
    return kind(f"{what}: {detail} ({name})", **where)


class Ended(Exception):
    """The helper's output ended before its last record."""


class Records:
    """The helper's stdout: records and file contents, read with bounded memory.

    Args:
        stream: The helper's stdout.
        what: What failed, for the message of an error record's typed error.
        where: ``provider`` and ``sandbox_id`` for the errors.
    """

    def __init__(self, stream: ByteStream, *, what: str, where: Mapping[str, Any]) -> None:
        self._chunks = aiter(stream)
        self._buffer = bytearray()
        self._what = what
        self._where = dict(where)

    async def _fill(self) -> bool:
        chunk = await anext(self._chunks, None)
        if chunk is None:
            return False
        self._buffer += chunk
        return True

    async def next(self) -> dict[str, Any]:
        """The next record.

        Raises:
            Ended: Output ended first.
            ProtocolError: A line too long, or not a JSON object.
            SandboxError: The record is an error record: its typed error.
        """
        start = 0
        while (end := self._buffer.find(b"\n", start)) < 0:
            if len(self._buffer) > MAX_RECORD:
                raise ProtocolError("the sandbox's file helper sent an over-long record")
            start = len(self._buffer)
            if not await self._fill():
                raise Ended
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise ProtocolError(f"the sandbox's file helper sent {line[:100]!r}, not a record")
        if "error" in record:
            raise error_from(record, self._what, **self._where)
        return record

    async def data(self, size: int) -> AsyncIterator[bytes]:
        """Exactly ``size`` bytes of file contents, in chunks of at most about `CHUNK`."""
        while size:
            if not self._buffer and not await self._fill():
                raise Ended
            piece = bytes(self._buffer[: min(size, CHUNK)])
            del self._buffer[: len(piece)]
            size -= len(piece)
            yield piece

    async def status(self) -> bool:
        """The status byte after a file's contents: whether it was read without error."""
        if not self._buffer and not await self._fill():
            raise Ended
        byte = bytes(self._buffer[:1])
        del self._buffer[:1]
        if byte not in (b".", b"!"):
            raise ProtocolError(f"the sandbox's file helper sent {bytes(byte)!r} after a file")
        return byte == b"."


def entry(record: Mapping[str, Any], *, key: str | None = None) -> dict[str, Any]:
    """Check an entry record's fields; return it. ``key``: the name field it must have.

    Raises:
        ProtocolError: A field is missing or of the wrong kind.
    """
    kind = record.get("type")
    size, mode, mtime = record.get("size"), record.get("mode"), record.get("mtime")
    ok = (
        kind in FILE_TYPES
        and isinstance(size, int)
        and _is_int(size)
        and size >= 0
        and isinstance(mode, int)
        and _is_int(mode)
        and 0 <= mode <= 0o7777
        and isinstance(mtime, (int, float))
        and not isinstance(mtime, bool)
        and math.isfinite(mtime)
        and (kind != "symlink" or isinstance(record.get("target"), str))
        and (key is None or isinstance(record.get(key), str))
    )
    if not ok:
        raise ProtocolError(f"the sandbox's file helper sent a malformed entry: {record!r:.200}")
    return dict(record)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_name(name: str) -> str:
    """A directory entry's name as the sandbox sent it; refuse anything but one component."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ProtocolError(f"the sandbox's file helper sent the entry name {name!r:.200}")
    return name


def split_relative(rel: str) -> list[str]:
    """A tree entry's path as components; refuse what could leave the tree."""
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise ProtocolError(
            f"the sandbox sent the tree entry {rel!r:.200}, which would leave the directory; "
            "nothing was written outside it"
        )
    return parts


def link_stays_inside(parts: list[str], target: str) -> bool:
    """Whether a link at ``parts`` (within a tree) to ``target`` leads nowhere outside it.

    Only a relative target whose leading ``..`` climb no higher than the tree's root, and
    with no ``..`` after them, qualifies. Every directory of the tree is a real one (links
    are never followed while writing), so following such a link, even through other links
    that qualify, never leaves the tree; a ``..`` after a link could.
    """
    if not target or target.startswith("/") or "\0" in target:
        return False
    words = [w for w in target.split("/") if w not in ("", ".")]
    ups = 0
    while ups < len(words) and words[ups] == "..":
        ups += 1
    return ups <= len(parts) - 1 and ".." not in words[ups:]


# --- the host side of a download ------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def host_file_mode(mode: int) -> int:
    """A downloaded file's mode: no set-id or sticky bits, no write for group and others."""
    return mode & 0o755


def host_dir_mode(mode: int) -> int:
    """A downloaded directory's mode: as a file's, and always the owner's to write and remove."""
    return (mode & 0o755) | 0o700


class LocalTree:
    """Writes a downloaded file or tree at a local path, and nowhere else. Blocking.

    Every entry's path is checked (`split_relative`) and reached from the root with
    directory fds and ``O_NOFOLLOW``, so neither a name nor a link (one the tree brought,
    or one already there) leads a write out of the root. Files are written beside their
    name and renamed over it, so a link already at that name is replaced, never written
    through. Links are created only where `link_stays_inside`.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self._root_fd: int | None = None
        self._cache: tuple[tuple[str, ...], int] | None = None
        self.created_root = False

    def close(self) -> None:
        if self._cache is not None:
            os.close(self._cache[1])
            self._cache = None
        if self._root_fd is not None:
            os.close(self._root_fd)
            self._root_fd = None

    def begin_dir(self, mode: int) -> None:
        """The tree is a directory: make the root one (merging with one already there)."""
        if not os.path.isdir(self.root):
            os.makedirs(self.root, 0o700)
            self.created_root = True
        self._root_fd = os.open(self.root, _DIR_FLAGS)
        if self.created_root:
            os.chmod(self._root_fd, host_dir_mode(mode))

    def begin_file(self) -> None:
        """The tree is one file, written at the root's path."""
        parent = os.path.dirname(self.root)
        os.makedirs(parent, exist_ok=True)
        self._root_fd = os.open(parent, _DIR_FLAGS)

    def _dir(self, parts: tuple[str, ...]) -> int:
        """An fd of the directory at parts below the root (borrowed: do not close it)."""
        assert self._root_fd is not None
        if not parts:
            return self._root_fd
        if self._cache is not None and self._cache[0] == parts:
            return self._cache[1]
        fd = os.dup(self._root_fd)
        try:
            for name in parts:
                try:
                    inner = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                except FileNotFoundError:
                    os.mkdir(name, 0o700, dir_fd=fd)
                    inner = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise NotADirectoryError(
                            errno.ENOTDIR,
                            "not a directory here (a link is never followed)",
                            os.path.join(self.root, *parts),
                        ) from None
                    raise
                os.close(fd)
                fd = inner
        except BaseException:
            os.close(fd)
            raise
        if self._cache is not None:
            os.close(self._cache[1])
        self._cache = (parts, fd)
        return fd

    def make_dir(self, parts: list[str], mode: int) -> None:
        fd = self._dir(tuple(parts[:-1]))
        name = parts[-1]
        try:
            os.mkdir(name, 0o700, dir_fd=fd)
        except FileExistsError:
            if not stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                raise NotADirectoryError(
                    errno.ENOTDIR, "something else is there", os.path.join(self.root, *parts)
                ) from None
            return  # merge with the directory already there
        inner = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
        try:
            os.chmod(inner, host_dir_mode(mode))
        finally:
            os.close(inner)

    def open_file(self, parts: list[str]) -> tuple[int, int, str, str]:
        """Start a file: (its fd, its directory's fd, the temporary name, the final name)."""
        if parts:
            fd, name = self._dir(tuple(parts[:-1])), parts[-1]
        else:
            assert self._root_fd is not None
            fd, name = self._root_fd, os.path.basename(self.root)
        tmp = f".{name[:100]}.{secrets.token_hex(4)}.sandbay-download"
        return os.open(tmp, _NEW_FILE, 0o600, dir_fd=fd), fd, tmp, name

    @staticmethod
    def write(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    @staticmethod
    def finish_file(
        opened: tuple[int, int, str, str], mode: int, mtime: float, *, keep: bool
    ) -> None:
        """Set the file's mode and time and rename it into place; or, without keep, drop it."""
        fd, dir_fd, tmp, name = opened
        try:
            if keep:
                os.fchmod(fd, host_file_mode(mode))
                os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)
        try:
            if keep:
                os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dir_fd)

    def small_file(self, parts: list[str], data: bytes, mode: int, mtime: float) -> None:
        opened = self.open_file(parts)
        ok = False
        try:
            self.write(opened[0], data)
            ok = True
        finally:
            self.finish_file(opened, mode, mtime, keep=ok)

    def make_link(self, parts: list[str], target: str) -> bool:
        """Create a link if it stays inside the tree; whether it was created."""
        if not link_stays_inside(parts, target):
            return False
        fd, name = self._dir(tuple(parts[:-1])), parts[-1]
        try:
            os.symlink(target, name, dir_fd=fd)
        except FileExistsError:
            if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                raise IsADirectoryError(
                    errno.EISDIR, "a directory is there", os.path.join(self.root, *parts)
                ) from None
            os.unlink(name, dir_fd=fd)
            os.symlink(target, name, dir_fd=fd)
        return True


# --- the host side of an upload --------------------------------------------------------------


def local_entry(path: str, rel: str, info: os.stat_result) -> dict[str, Any] | None:
    """The record of a local entry to upload; None for what cannot travel (a FIFO, …)."""
    mode = info.st_mode
    record: dict[str, Any] = {
        "path": rel,
        "size": info.st_size,
        "mode": stat.S_IMODE(mode) & 0o777,
        "mtime": info.st_mtime,
    }
    if stat.S_ISDIR(mode):
        record["type"] = "dir"
    elif stat.S_ISREG(mode):
        record["type"] = "file"
    elif stat.S_ISLNK(mode):
        record.update(type="symlink", target=os.readlink(path))
    else:
        return None
    return record


def scan(path: str) -> list[tuple[str, os.stat_result]]:
    """A local directory's entries, by name, with their lstat. Blocking."""
    with os.scandir(path) as entries:
        found = [(e.name, e.stat(follow_symlinks=False)) for e in entries]
    return sorted(found, key=lambda item: item[0])


def encode(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record).encode("ascii") + b"\n"


def open_local(path: str) -> tuple[int, os.stat_result]:
    """Open a local regular file for reading (not through a link); its fd and fstat."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def read_exactly(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes from fd (fewer only at end of file)."""
    parts, left = [], size
    while left:
        data = os.read(fd, min(left, CHUNK))
        if not data:
            break
        parts.append(data)
        left -= len(data)
    return b"".join(parts)
