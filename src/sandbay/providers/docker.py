"""Docker provider: each sandbox is a container on a Docker engine, driven by the ``docker`` SDK.

A container runs ``sleep <lifetime_s>`` under Docker's init, so it stops by itself when its
lifetime ends even if nobody removes it (``sandbay gc`` then removes it). Processes are
``docker exec`` sessions whose hijacked socket carries stdin one way and multiplexed
stdout/stderr frames the other; the frames are demultiplexed here, on demand, by whichever
stream is being read. Files move through the archive endpoints as in-memory tar streams.

Every blocking SDK call runs in a worker thread. Every exception of the SDK (and of
``requests`` beneath it) is turned into sandbay's error tree by `map_docker_error`.
"""

from __future__ import annotations

import contextlib
import math
import os
import posixpath
import re
import secrets
import socket
import sys
import tarfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import docker  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]
import docker.utils  # type: ignore[import-untyped]
import requests.exceptions
from typing_extensions import override

from .._config import DockerConfig
from .._errors import (
    ConfigError,
    ImageError,
    ProviderUnavailableError,
    SandboxError,
    SandboxFileNotFoundError,
    SandboxNotFoundError,
)
from .._provider import MANAGED, Provider, ProviderStatus, SandboxInfo
from .._sandbox import CLOSE_TIMEOUT, ByteStream, Process, Sandbox, SandboxSpec

__all__ = ["DockerProvider", "DockerSandbox", "docker_client", "docker_errors", "map_docker_error"]

NAME = "docker"
DEFAULT_SOCKET = "unix:///var/run/docker.sock"
AGENT_WORKDIR = "/workspace"
ROOT = "0:0"

#: Environment variable marking every process of one exec, so `kill` finds what it started.
EXEC_TOKEN = "SANDBAY_EXEC_ID"

# Root in the sandbox keeps what package installs and sandbay's own root execs need.
_CAPABILITIES = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID"]

_STDOUT, _STDERR = 1, 2
_FRAME_HEADER = 8
_MODE_DIR = 1 << 31  # Go's os.ModeDir, as the archive stat header reports it
_MODE_SYMLINK = 1 << 27
_KILL_GRACE_S = 5.0

# Docker reports a failed launch (no such executable, bad cwd or user) as text on stdout.
_LAUNCH_ERROR = re.compile(rb"^(OCI runtime|exec failed|unable to find user)")

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


# --- errors ------------------------------------------------------------------------------


def _address(base_url: str | None) -> str:
    return base_url or os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def map_docker_error(
    exc: BaseException,
    *,
    base_url: str | None = None,
    sandbox_id: str | None = None,
    image: str | None = None,
) -> SandboxError:
    """Turn an exception of the docker SDK or of requests into the matching sandbay error.

    Args:
        exc: What the SDK raised.
        base_url: The engine address, for messages.
        sandbox_id: The container involved, if any.
        image: The image involved, if any.
    """
    where = _address(base_url)
    ctx = {"provider": NAME, "sandbox_id": sandbox_id}
    chain = list(_chain(exc))
    if any(isinstance(e, PermissionError) for e in chain):
        return ProviderUnavailableError(
            f"permission denied on the Docker socket {where}: add your user to the docker group "
            "(`sudo usermod -aG docker $USER`, then log in again) or run as root",
            **ctx,
        )
    if any(isinstance(e, requests.exceptions.Timeout) for e in chain):
        return ProviderUnavailableError(
            f"the Docker daemon at {where} did not answer in time; check `docker info`", **ctx
        )
    if any(
        isinstance(e, (requests.exceptions.ConnectionError, ConnectionError, FileNotFoundError))
        for e in chain
    ):
        return ProviderUnavailableError(
            f"cannot reach the Docker daemon at {where}: is it running? "
            "start it: `sudo dockerd &` or `sudo systemctl start docker`",
            **ctx,
        )
    if isinstance(exc, docker.errors.ImageNotFound) or (
        isinstance(exc, docker.errors.NotFound) and "no such image" in _explain(exc).lower()
    ):
        return ImageError(
            f"image {image or ''!r} is not on the Docker engine and sandbay never pulls: build "
            "the agent image with `sandbay image build`, or `docker pull` the image yourself",
            **ctx,
        )
    if isinstance(exc, docker.errors.APIError):
        explanation = _explain(exc)
        lowered = explanation.lower()
        if isinstance(exc, docker.errors.NotFound) and (
            "no such container" in lowered or "no such exec" in lowered
        ):
            return SandboxNotFoundError(f"the container no longer exists ({explanation})", **ctx)
        if "is not running" in lowered or "is paused" in lowered or "is restarting" in lowered:
            return SandboxNotFoundError(
                "the container is not running any more (its lifetime_s passed, or it was "
                f"stopped); open a new sandbox ({explanation})",
                **ctx,
            )
        if "unable to find user" in lowered or "no matching entries in passwd" in lowered:
            return ConfigError(f"the user does not exist in the image: {explanation}", **ctx)
        if "runtime" in lowered and ("unknown" in lowered or "invalid" in lowered):
            return ConfigError(f"the engine does not know this OCI runtime: {explanation}", **ctx)
        if exc.status_code == 400:
            return ConfigError(f"Docker rejected the request: {explanation}", **ctx)
        return SandboxError(f"Docker API error: {explanation}", **ctx)
    return SandboxError(f"Docker SDK error: {exc}", **ctx)


def _container_gone(exc: BaseException) -> bool:
    return "no such container" in _explain(exc).lower()


def _explain(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc)


@contextlib.contextmanager
def docker_errors(
    *, base_url: str | None = None, sandbox_id: str | None = None, image: str | None = None
) -> Iterator[None]:
    """Re-raise docker SDK and requests exceptions as sandbay errors (`map_docker_error`)."""
    try:
        yield
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise map_docker_error(exc, base_url=base_url, sandbox_id=sandbox_id, image=image) from exc


def docker_client(config: DockerConfig) -> Any:
    """A ``docker.DockerClient`` for the config's engine. Blocking: asks the engine its version.

    Raises:
        ProviderUnavailableError: The engine's unix socket is missing or refuses connections.
        docker.errors.DockerException: Wrap the call in `docker_errors`.
    """
    address = _address(config.base_url)
    if address.startswith(("unix://", "http+unix://")):
        _check_socket(address)
    if config.base_url:
        return docker.DockerClient(base_url=config.base_url, max_pool_size=32)
    return docker.from_env(max_pool_size=32)


def _check_socket(address: str) -> None:
    # The SDK leaks its socket when a unix connect fails (a ResourceWarning later); trying
    # the socket first gives the same answer with the socket closed.
    path = "/" + address.split("://", 1)[1].lstrip("/")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(10)
        try:
            probe.connect(path)
        except OSError as exc:
            raise map_docker_error(exc, base_url=address) from exc


# --- provider ----------------------------------------------------------------------------


class DockerProvider(Provider):
    """Sandboxes as containers on a Docker engine. Connects on first use."""

    name: ClassVar[str] = NAME

    def __init__(self, config: DockerConfig) -> None:
        self.config = config
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._agent_image: str | None = None

    def _api(self) -> Any:
        """The low-level API client; created on first use. Blocking."""
        client = self._client
        if client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = docker_client(self.config)
                client = self._client
        return client.api

    def _docker_client(self) -> Any:
        self._api()
        return self._client

    def _errors(self, *, sandbox_id: str | None = None, image: str | None = None) -> Any:
        return docker_errors(base_url=self.config.base_url, sandbox_id=sandbox_id, image=image)

    async def _call(self, fn: Callable[[], Any], *, sandbox_id: str | None = None) -> Any:
        """Run a blocking SDK call in a worker thread, mapping its errors."""

        def call() -> Any:
            with self._errors(sandbox_id=sandbox_id):
                return fn()

        return await anyio.to_thread.run_sync(call)

    async def agent_image(self) -> str:
        """The agent image for this config's base, built (once) if missing."""
        if self._agent_image is None:
            from .._image import ensure_agent_image

            self._agent_image = await ensure_agent_image(
                self._docker_client, base=self.config.base_image, progress=_progress_to_stderr
            )
        return self._agent_image

    @override
    async def create(self, spec: SandboxSpec) -> Sandbox:
        explicit = spec.image or self.config.image
        image = explicit or await self.agent_image()
        user = spec.user or self.config.user
        # Only the agent image is known to have the default workdir, owned by its user.
        ready_workdir = explicit is None and spec.workdir == AGENT_WORKDIR
        host_config: dict[str, Any] = {
            "init": True,
            "pids_limit": self.config.pids_limit,
            "cap_drop": ["ALL"],
            "cap_add": _CAPABILITIES,
            "security_opt": ["no-new-privileges"],
        }
        if spec.cpu is not None:
            host_config["nano_cpus"] = int(spec.cpu * 1e9)
        if spec.memory_mb is not None:
            host_config["mem_limit"] = host_config["memswap_limit"] = f"{spec.memory_mb}m"
        if spec.network != "default":
            host_config["network_mode"] = spec.network
        if self.config.runtime:
            host_config["runtime"] = self.config.runtime
        lifetime = str(max(1, math.ceil(spec.lifetime_s)))

        def run() -> str:
            api = self._api()
            created = api.create_container(
                image,
                command=["sleep", lifetime],
                # Root here only holds `sleep`; processes run as `user`, given to each exec.
                # A non-root container user would leave root execs without capabilities.
                user=ROOT,
                environment=dict(spec.env),
                working_dir=spec.workdir if ready_workdir else None,
                labels=dict(spec.labels),
                host_config=api.create_host_config(**host_config),
                detach=True,
            )
            container_id = str(created["Id"])
            try:
                api.start(container_id)
            except BaseException:
                _remove_quietly(api, container_id)
                raise
            return container_id

        def create() -> str:
            with self._errors(image=image):
                return run()

        # Shielded: a container created while the caller was cancelled must not leak.
        with anyio.CancelScope(shield=True):
            container_id = await anyio.to_thread.run_sync(create)
        sandbox = DockerSandbox(
            spec,
            provider=self,
            container_id=container_id,
            user=user,
            workdir=spec.workdir if ready_workdir else None,
        )
        try:
            await anyio.lowlevel.checkpoint()
            if _numeric_owner(user) is None:
                await sandbox._owner_ids()  # a user name must exist in the image
            if not ready_workdir:
                await sandbox._prepare_workdir()
        except BaseException:
            await sandbox.aclose()
            raise
        return sandbox

    @override
    async def raw_create_exec(self, spec: SandboxSpec) -> float:
        """create → first exec as a user of the plain SDK would write it, for the benchmark.

        Same image, network and limits as `create`; ``containers.run(detach=True)`` then
        ``exec_run``. Removing the container is not timed.
        """
        image = spec.image or self.config.image or await self.agent_image()
        options: dict[str, Any] = {"detach": True}
        if spec.network != "default":
            options["network_mode"] = spec.network
        if spec.cpu is not None:
            options["nano_cpus"] = int(spec.cpu * 1e9)
        if spec.memory_mb is not None:
            options["mem_limit"] = f"{spec.memory_mb}m"

        def measure() -> float:
            with self._errors(image=image):
                client = self._docker_client()
                started = time.perf_counter()
                container = client.containers.run(image, ["sleep", "600"], **options)
                try:
                    container.exec_run(["true"])
                    return time.perf_counter() - started
                finally:
                    container.remove(force=True)

        return float(await anyio.to_thread.run_sync(measure))

    @override
    async def list(self, *, labels: Mapping[str, str] | None = None) -> list[SandboxInfo]:
        wanted = [f"{MANAGED}=1", *(f"{k}={v}" for k, v in (labels or {}).items())]
        found = await self._call(
            lambda: self._api().containers(all=True, filters={"label": wanted})
        )
        return [
            SandboxInfo(
                id=str(item["Id"]),
                provider=NAME,
                labels=dict(item.get("Labels") or {}),
                status=str(item.get("State") or "unknown"),
            )
            for item in found
        ]

    @override
    async def destroy(self, sandbox_id: str) -> None:
        def remove() -> None:
            with self._errors(sandbox_id=sandbox_id):
                try:
                    self._api().remove_container(sandbox_id, force=True, v=True)
                except docker.errors.NotFound:
                    pass  # already gone
                except docker.errors.APIError as exc:
                    if "already in progress" not in _explain(exc):
                        raise

        await anyio.to_thread.run_sync(remove)

    @override
    async def status(self) -> ProviderStatus:
        def check() -> ProviderStatus:
            try:
                with self._errors():
                    api = self._api()
                    api.ping()
                    version = api.version().get("Version", "?")
                    image = self.config.image or "sandbay-agent:latest"
                    try:
                        api.inspect_image(image)
                        image = f"image {image} present"
                    except docker.errors.NotFound:
                        image = (
                            f"image {self.config.image} missing (sandbay never pulls)"
                            if self.config.image
                            else "agent image not built yet (built on first use, or "
                            "`sandbay image build`)"
                        )
            except SandboxError as exc:
                return ProviderStatus(NAME, installed=True, reachable=False, detail=exc.message)
            detail = f"Docker {version} at {_address(self.config.base_url)}; {image}"
            return ProviderStatus(NAME, installed=True, reachable=True, detail=detail)

        return await anyio.to_thread.run_sync(check)

    @override
    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await anyio.to_thread.run_sync(client.close)


def _progress_to_stderr(line: str) -> None:
    print(f"sandbay: agent image: {line}", file=sys.stderr, flush=True)


def _remove_quietly(api: Any, container_id: str) -> None:
    with contextlib.suppress(docker.errors.DockerException, requests.exceptions.RequestException):
        api.remove_container(container_id, force=True, v=True)


# --- sandbox -----------------------------------------------------------------------------


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


# --- processes ---------------------------------------------------------------------------


class _DockerProcess(Process):
    """One ``docker exec`` session on a hijacked socket.

    Output is read on demand: a reader that finds its stream's queue empty reads more frames
    from the socket in a worker thread, queueing frames of the other stream for its reader.
    Only one thread reads the socket at a time (``_frame_lock``); a reader cancelled while its
    thread waits leaves that thread to finish the frame, which is queued, not lost.
    """

    def __init__(
        self, sandbox: DockerSandbox, exec_id: str, sock: Any, *, token: str, user: str
    ) -> None:
        self._sandbox = sandbox
        self._exec_id = exec_id
        self._io = sock  # socket.SocketIO over a unix socket, else the transport's socket
        self._sock: Any = getattr(sock, "_sock", None) or sock
        with contextlib.suppress(AttributeError, OSError):
            self._sock.settimeout(None)  # the client's 60 s timeout would cut quiet processes
        self._token = token
        self._user = user

        self._chunks: dict[int, deque[bytes]] = {_STDOUT: deque(), _STDERR: deque()}
        self._buffer = bytearray()
        self._eof = False
        self._first_frame = True
        self._held: bytes | None = None
        self._launch_error: bytes | None = None
        self._frame_lock = threading.Lock()
        self._reading: anyio.Event | None = None
        self._limiter: anyio.CapacityLimiter | None = None

        self._state = threading.Lock()
        self._busy = 0
        self._close_wanted = False
        self._sock_closed = False
        self._write_lock = threading.Lock()
        self._stdin_closed = False
        self._killed = False
        self._returncode: int | None = None

        self.stdout = ByteStream(lambda: self._receive(_STDOUT))
        self.stderr = ByteStream(lambda: self._receive(_STDERR))

    @property
    @override
    def returncode(self) -> int | None:
        return self._returncode

    def _threads(self) -> anyio.CapacityLimiter:
        # Each process gets its own few threads: a reader blocked on a quiet process must
        # not hold a token of the shared default limiter other processes need.
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(4)
        return self._limiter

    # --- reading ---

    async def _receive(self, stream: int) -> bytes | None:
        queue = self._chunks[stream]
        while True:
            ended = self._eof  # read first: a reader thread queues its data, then sets it
            if queue:
                return queue.popleft()
            if ended:
                return None
            await self._fill(stream)

    async def _fill(self, want: int | None) -> None:
        """Make progress: wait for the reader at work, or become it for one round."""
        reading = self._reading
        if reading is not None:
            await reading.wait()
            return
        done = self._reading = anyio.Event()
        try:
            await anyio.to_thread.run_sync(
                self._read_frames, want, abandon_on_cancel=True, limiter=self._threads()
            )
        finally:
            self._reading = None
            done.set()

    def _read_frames(self, want: int | None) -> None:
        """Read from the socket until at least one frame is queued, or end of stream."""
        with self._frame_lock:
            if self._eof or (want is not None and self._chunks[want]):
                return  # an abandoned reader already delivered
            if not self._enter():
                self._eof = True
                return
            ended = False
            try:
                while not self._parse_frames():
                    data = self._sock.recv(1 << 16)
                    if not data:
                        ended = True
                        break
                    self._buffer += data
            except OSError:
                ended = True
            finally:
                if ended:
                    self._release_held(at_end=True)
                    self._set_eof()
                self._leave()

    def _parse_frames(self) -> bool:
        """Queue every complete frame in the buffer; return whether any was queued."""
        buffer = self._buffer
        queued = False
        while len(buffer) >= _FRAME_HEADER:
            size = int.from_bytes(buffer[4:8], "big")
            end = _FRAME_HEADER + size
            if len(buffer) < end:
                break
            kind = buffer[0]
            payload = bytes(buffer[_FRAME_HEADER:end])
            del buffer[:end]
            if not payload or kind not in (_STDOUT, _STDERR, 3):
                continue
            if self._first_frame:
                self._first_frame = False
                if kind == _STDOUT and _LAUNCH_ERROR.match(payload):
                    # Docker's launch errors end the stream at once: hold it until we know.
                    self._held = payload
                    continue
            queued = self._release_held(at_end=False) or queued
            self._chunks[_STDERR if kind == 3 else kind].append(payload)
            queued = True
        return queued

    def _release_held(self, *, at_end: bool) -> bool:
        """Queue a held first frame: on stderr if it is Docker's launch error, else stdout."""
        payload, self._held = self._held, None
        if payload is None:
            return False
        if at_end and self._never_started():
            self._launch_error = payload
            self._chunks[_STDERR].append(payload.replace(b"\r\n", b"\n"))
        else:
            self._chunks[_STDOUT].append(payload)
        return True

    def _never_started(self) -> bool:
        """Whether the exec ended without a process (Docker reports no pid for it)."""
        api = self._sandbox._provider._api()
        deadline = time.monotonic() + 5
        try:
            while True:
                info = api.exec_inspect(self._exec_id)
                if not info.get("Running") or time.monotonic() > deadline:
                    return not info.get("Running") and not info.get("Pid")
                time.sleep(0.005)
        except (docker.errors.DockerException, requests.exceptions.RequestException):
            return False

    def _set_eof(self) -> None:
        self._eof = True
        with self._state:
            self._close_wanted = True

    # --- socket ownership: closed once no thread uses it ---

    def _enter(self) -> bool:
        with self._state:
            if self._sock_closed:
                return False
            self._busy += 1
            return True

    def _leave(self) -> None:
        with self._state:
            self._busy -= 1
            if self._close_wanted and not self._busy:
                self._close_now()

    def _close(self) -> None:
        """Close the socket; threads blocked on it are woken and the last one closes it."""
        with self._state:
            if self._sock_closed:
                return
            self._close_wanted = True
            if self._busy:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)
            else:
                self._close_now()

    def _close_now(self) -> None:
        # Called with self._state held.
        self._sock_closed = True
        self._eof = True
        with contextlib.suppress(OSError):
            self._io.close()
        with contextlib.suppress(OSError):
            self._sock.close()
        self._sandbox._forget(self)

    # --- stdin ---

    @override
    async def write(self, data: bytes) -> None:
        if self._stdin_closed:
            raise BrokenPipeError("stdin was closed")
        if data:
            await anyio.to_thread.run_sync(
                self._send, bytes(data), abandon_on_cancel=True, limiter=self._threads()
            )

    def _send(self, data: bytes) -> None:
        if not self._enter():
            raise BrokenPipeError("the process has exited")
        try:
            with self._write_lock:
                self._sock.sendall(data)
        except OSError as exc:
            raise BrokenPipeError(f"the process's stdin is gone: {exc}") from None
        finally:
            self._leave()

    @override
    async def close_stdin(self) -> None:
        if self._stdin_closed:
            return
        self._stdin_closed = True
        with self._state:
            if not self._sock_closed:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_WR)

    # --- exit ---

    @override
    async def wait(self) -> int:
        if self._returncode is not None:
            return self._returncode
        while not self._eof:  # keeps unread output for the streams
            await self._fill(None)
        api = self._sandbox._provider._api
        delay, waited = 0.002, 0.0
        while True:
            info = await self._sandbox._provider._call(
                lambda: api().exec_inspect(self._exec_id), sandbox_id=self._sandbox.id
            )
            code = info.get("ExitCode")
            if not info.get("Running") and code is not None:
                break
            if self._killed and waited > _KILL_GRACE_S:
                code = 137  # the kill did not reach it; the container's removal will
                break
            await anyio.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.1)
        self._returncode = self._normalise(int(code))
        return self._returncode

    def _normalise(self, code: int) -> int:
        if self._launch_error is not None and code == 126:
            text = self._launch_error.lower()
            if b"executable file not found" in text or (
                b"no such file or directory" in text and b"chdir" not in text
            ):
                return 127  # as a shell reports a missing command
        if self._killed and code == 128 + 9:
            return -9
        return code

    @override
    async def kill(self) -> None:
        if self._killed or self._returncode is not None:
            return
        self._killed = True
        try:
            with anyio.move_on_after(CLOSE_TIMEOUT):
                await self._sandbox._kill_tagged(self._token, user=self._user)
        except SandboxError:
            pass  # the container is gone, and the process with it
        finally:
            self._close()
