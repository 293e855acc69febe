"""`DockerSandbox`: one container; processes as ``docker exec``, files as tar archives."""

from __future__ import annotations

import posixpath
import secrets
import tarfile
import time
from collections.abc import AsyncGenerator, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import docker.errors
import docker.utils
from typing_extensions import override

from ..._errors import ConfigError, SandboxError, SandboxFileNotFoundError
from ..._sandbox import Process, Sandbox, SandboxSpec
from ._errors import NAME, _container_gone, _explain
from ._process import _DockerProcess

if TYPE_CHECKING:
    from ._provider import DockerProvider

ROOT = "0:0"

#: Environment variable marking every process of one exec, so `kill` finds what it started.
EXEC_TOKEN = "SANDBAY_EXEC_ID"

_MODE_DIR = 1 << 31  # Go's os.ModeDir, as the archive stat header reports it
_MODE_SYMLINK = 1 << 27

# Kills every process whose environment carries the exec's token: the command and what it
# started. Runs as the command's user, who may read its /proc/<pid>/environ. Processes are
# stopped first (twice over, for children forked meanwhile) so that a parent cannot run on
# for an instant after its child dies.
_KILL_SCRIPT = (
    f't="{EXEC_TOKEN}=$1"; pids=; for pass in 1 2; do for d in /proc/[0-9]*; do '
    'case "$(cat "$d/environ" 2>/dev/null)" in *"$t"*) p="${d#/proc/}"; '
    'kill -STOP "$p" 2>/dev/null && pids="$pids $p";; esac; done; done; '
    'if [ -n "$pids" ]; then kill -KILL $pids 2>/dev/null; fi; true'
)
_MKDIR_OWNED = 'if [ ! -d "$1" ]; then mkdir -p -- "$1" && chown -- "$2" "$1"; fi'


class DockerSandbox(Sandbox):
    """A container. Create it with `DockerProvider.create`."""

    provider: ClassVar[str] = NAME

    def __init__(
        self,
        spec: SandboxSpec,
        *,
        provider: DockerProvider,
        container_id: str,
        user: str,
        workdir: str | None = None,
    ) -> None:
        super().__init__(spec)
        self._provider = provider
        self._id = container_id
        self._user = user
        self._container_workdir = workdir  # the container's own working directory, if set
        self._owner: tuple[int, int] | None = _numeric_owner(user)
        self._processes: set[_DockerProcess] = set()

    @property
    @override
    def id(self) -> str:
        return self._id

    @property
    @override
    def reaches_host_loopback(self) -> bool:
        return self.spec.network == "host"

    # --- processes ---

    @override
    async def _start(
        self, argv: list[str], *, env: dict[str, str], cwd: str, user: str | None
    ) -> Process:
        user = user or self._user
        token = secrets.token_hex(8)
        # The container already has the spec's env and (if set) its workdir: send what differs.
        extra = {k: v for k, v in env.items() if self.spec.env.get(k) != v}
        workdir = None if cwd == self._container_workdir else cwd

        def start() -> tuple[str, Any]:
            api = self._provider._api()
            exec_id = str(
                api.exec_create(
                    self._id,
                    argv,
                    stdin=True,
                    stdout=True,
                    stderr=True,
                    tty=False,
                    environment={**extra, EXEC_TOKEN: token},
                    workdir=workdir,
                    user=user,
                )["Id"]
            )
            return exec_id, api.exec_start(exec_id, socket=True)

        with anyio.CancelScope(shield=True):
            exec_id, sock = await self._provider._call(start, sandbox_id=self._id)
        process = _DockerProcess(self, exec_id, sock, token=token, user=user)
        self._processes.add(process)
        return process

    async def _run(self, argv: list[str], *, user: str) -> tuple[int, bytes]:
        """Run a helper command to completion; return its exit code and combined output."""

        def run() -> tuple[int, bytes]:
            api = self._provider._api()
            exec_id = api.exec_create(self._id, argv, user=user, workdir="/")["Id"]
            output = api.exec_start(exec_id)
            code = api.exec_inspect(exec_id).get("ExitCode")
            return (code if isinstance(code, int) else 126), bytes(output or b"")

        result: tuple[int, bytes] = await self._provider._call(run, sandbox_id=self._id)
        return result

    async def _prepare_workdir(self) -> None:
        code, output = await self._run(
            ["sh", "-c", _MKDIR_OWNED, "sh", self.workdir, self._user], user=ROOT
        )
        if code != 0:
            raise SandboxError(
                f"could not create the workdir {self.workdir!r} (exit code {code}): "
                f"{output.decode(errors='replace').strip()}",
                provider=NAME,
                sandbox_id=self._id,
            )

    async def _kill_tagged(self, token: str, *, user: str) -> None:
        await self._run(["sh", "-c", _KILL_SCRIPT, "sh", token], user=user)

    # --- files ---

    async def _owner_ids(self) -> tuple[int, int]:
        """uid and gid of the sandbox's user, resolved in the image's /etc/passwd and /etc/group
        (as Docker resolves them) when not numeric; once per sandbox."""
        if self._owner is None:
            name, _, group = self._user.partition(":")
            passwd = await self._account_file("/etc/passwd")
            if name.isdigit():
                uid = int(name)
                gid = next((int(e[3]) for e in passwd if e[2] == name and e[3].isdigit()), 0)
            else:
                entry = next((e for e in passwd if e[0] == name), None)
                if entry is None or not (entry[2].isdigit() and entry[3].isdigit()):
                    raise self._no_such_user(name, "/etc/passwd")
                uid, gid = int(entry[2]), int(entry[3])
            if group.isdigit():
                gid = int(group)
            elif group:
                found = [e for e in await self._account_file("/etc/group") if e[0] == group]
                if not found or not found[0][2].isdigit():
                    raise self._no_such_user(group, "/etc/group")
                gid = int(found[0][2])
            self._owner = (uid, gid)
        return self._owner

    async def _account_file(self, path: str) -> list[list[str]]:
        try:
            text = (await self._read_file(path)).decode(errors="replace")
        except SandboxFileNotFoundError:
            return []
        return [line.split(":") for line in text.splitlines() if line.count(":") >= 3]

    def _no_such_user(self, name: str, where: str) -> ConfigError:
        return ConfigError(
            f"user {self._user!r}: {name!r} is not in the image's {where}; give a user the "
            "image has, or numeric uid:gid",
            provider=NAME,
            sandbox_id=self._id,
        )

    @override
    async def _write_file(self, path: str, data: bytes, *, mode: int) -> None:
        parent, name = posixpath.split(path)
        if not name:
            raise ConfigError(f"{path!r} names a directory; give a file path")
        uid, gid = await self._owner_ids()

        def chunks() -> Iterator[bytes]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.uid, info.gid = len(data), mode & 0o7777, uid, gid
            info.mtime = int(time.time())
            yield info.tobuf(format=tarfile.PAX_FORMAT)
            yield data
            yield tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE + 2 * tarfile.BLOCKSIZE)

        def put() -> bool:
            api = self._provider._api()
            try:
                response = api._put(
                    api._url("/containers/{0}/archive", self._id),
                    params={"path": parent or "/", "noOverwriteDirNonDir": "true"},
                    data=chunks(),
                )
                with response:
                    api._raise_for_status(response)
            except docker.errors.NotFound as exc:
                if _container_gone(exc):
                    raise
                return False  # the parent directory is missing
            except docker.errors.APIError as exc:
                if "cannot overwrite" in _explain(exc).lower():
                    raise SandboxError(
                        f"cannot write {path!r}: it is a directory",
                        provider=NAME,
                        sandbox_id=self._id,
                    ) from None
                raise
            return True

        if await self._provider._call(put, sandbox_id=self._id):
            return
        # Parents the sandbox's user can create are theirs; elsewhere root makes them.
        code, _ = await self._run(["mkdir", "-p", "--", parent], user=self._user)
        if code != 0:
            code, output = await self._run(["mkdir", "-p", "--", parent], user=ROOT)
            if code != 0:
                raise SandboxError(
                    f"cannot create directory {parent!r}: "
                    f"{output.decode(errors='replace').strip()}",
                    provider=NAME,
                    sandbox_id=self._id,
                )
        if not await self._provider._call(put, sandbox_id=self._id):
            raise SandboxError(
                f"cannot write {path!r}: its directory vanished", provider=NAME, sandbox_id=self._id
            )

    @override
    async def _read_stream(self, path: str) -> AsyncGenerator[bytes, None]:
        yield await self._read_file(path)

    async def _read_file(self, path: str) -> bytes:
        def read() -> bytes:
            api = self._provider._api()
            current = path
            for _ in range(40):  # symlink hops, as the kernel allows
                response = api._get(
                    api._url("/containers/{0}/archive", self._id),
                    params={"path": current},
                    stream=True,
                    headers={"Accept-Encoding": "identity"},
                )
                with response:
                    try:
                        api._raise_for_status(response)
                    except docker.errors.NotFound as exc:
                        if _container_gone(exc):
                            raise
                        raise SandboxFileNotFoundError(
                            f"no file {path!r} in the sandbox", provider=NAME, sandbox_id=self._id
                        ) from None
                    stat = docker.utils.decode_json_header(
                        response.headers["X-Docker-Container-Path-Stat"]
                    )
                    mode = int(stat.get("mode", 0))
                    if mode & _MODE_SYMLINK and stat.get("linkTarget"):
                        current = posixpath.join(posixpath.dirname(current), stat["linkTarget"])
                        continue
                    if mode & _MODE_DIR:
                        raise SandboxError(
                            f"cannot read {path!r}: it is a directory",
                            provider=NAME,
                            sandbox_id=self._id,
                        )
                    with tarfile.open(fileobj=response.raw, mode="r|", bufsize=1 << 20) as archive:
                        for member in archive:
                            extracted = archive.extractfile(member)
                            if extracted is not None:
                                data = extracted.read()
                                break
                        else:
                            data = b""
                    response.raw.read()  # the archive's end, so the connection is reused
                    return data
            raise SandboxError(
                f"cannot read {path!r}: too many symlinks", provider=NAME, sandbox_id=self._id
            )

        result: bytes = await self._provider._call(read, sandbox_id=self._id)
        return result

    # --- lifecycle ---

    @override
    async def _aclose(self) -> None:
        try:
            await self._provider.destroy(self._id)
        finally:
            for process in list(self._processes):
                process._close()

    def _forget(self, process: _DockerProcess) -> None:
        self._processes.discard(process)


def _numeric_owner(user: str) -> tuple[int, int] | None:
    if user in ("root", "0", "0:0"):
        return (0, 0)
    uid, sep, gid = user.partition(":")
    if sep and uid.isdigit() and gid.isdigit():
        return (int(uid), int(gid))
    return None
