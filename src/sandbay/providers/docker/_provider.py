"""`DockerProvider`: creates, lists and removes the containers that are Docker sandboxes."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import anyio
import anyio.lowlevel
import docker.errors
import requests.exceptions
from typing_extensions import override

from ..._config import DockerConfig
from ..._errors import SandboxError, SandboxNotFoundError
from ..._provider import EXPIRY, MANAGED, Provider, ProviderStatus, SandboxInfo
from ..._sandbox import Sandbox, SandboxSpec
from ._errors import NAME, _address, _explain, docker_client, docker_errors
from ._image import ensure_agent_image
from ._sandbox import LEASE_FILE, ROOT, DockerSandbox, _is_numeric, lease_command

AGENT_WORKDIR = "/workspace"
#: Label holding what `connect` needs to rebuild a sandbox's spec (no env values: those are
#: read back from the container's own environment).
SPEC_LABEL = "sandbay.spec"

# Lease files read at once by `list`, and the most of an archive read for one.
_LEASE_READERS = 8
_LEASE_ARCHIVE_MAX = 64 * 1024

# Root in the sandbox keeps what package installs and sandbay's own root execs need.
_CAPABILITIES = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID"]


class DockerProvider(Provider):
    """Sandboxes as containers on a Docker engine. Connects on first use.

    `connect` rebuilds a sandbox from its container: the spec (workdir, user, network,
    limits, image, env names) from a ``sandbay.spec`` label written at create, the env's
    values and the labels from the container itself. Any process that reaches the same
    engine may reattach; a container whose lifetime ran out has stopped and cannot be.
    """

    name: ClassVar[str] = NAME
    config: DockerConfig

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
            self._agent_image = await ensure_agent_image(
                self._docker_client, base=self.config.base_image
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
        cpu, memory_mb = self._limits(spec)
        host_config["nano_cpus"] = int(cpu * 1e9)
        host_config["mem_limit"] = host_config["memswap_limit"] = f"{memory_mb}m"
        if spec.network != "default":
            host_config["network_mode"] = spec.network
        if self.config.runtime:
            host_config["runtime"] = self.config.runtime
        try:
            expiry = float(spec.labels[EXPIRY])
        except (KeyError, ValueError):
            expiry = time.time() + spec.lifetime_s

        def run() -> str:
            api = self._api()
            created = api.create_container(
                image,
                command=lease_command(expiry),
                # Root here only holds the lease; processes run as `user`, given to each exec.
                # A non-root container user would leave root execs without capabilities.
                user=ROOT,
                environment=dict(spec.env),
                working_dir=spec.workdir if ready_workdir else None,
                labels={**spec.labels, SPEC_LABEL: _spec_label(spec, user, ready_workdir)},
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
            if not _is_numeric(user):
                await sandbox._check_user()  # a user name must exist in the image
            if not ready_workdir:
                await sandbox._prepare_workdir()
        except BaseException:
            await sandbox.aclose()
            raise
        return sandbox

    @override
    async def connect(self, sandbox_id: str) -> Sandbox:
        def inspect() -> dict[str, Any] | None:
            with self._errors(sandbox_id=sandbox_id):
                try:
                    found: dict[str, Any] = self._api().inspect_container(sandbox_id)
                    return found
                except docker.errors.NotFound:
                    return None

        found = await anyio.to_thread.run_sync(inspect) if sandbox_id else None
        config = (found or {}).get("Config") or {}
        labels = dict(config.get("Labels") or {})
        if found is None or labels.get(MANAGED) != "1":
            raise SandboxNotFoundError(
                f"no sandbay container {sandbox_id!r} on the engine (removed, or not "
                "sandbay's); `sandbay ls` lists the live ones",
                provider=NAME,
                sandbox_id=sandbox_id,
            )
        container_id = str(found["Id"])
        if not (found.get("State") or {}).get("Running"):
            raise SandboxNotFoundError(
                f"container {container_id[:12]} has stopped (its lifetime ran out?); "
                "`sandbay gc` removes it",
                provider=NAME,
                sandbox_id=container_id,
            )
        spec, user, ready_workdir = _stored_spec(labels, config.get("Env") or [])
        return DockerSandbox(
            spec,
            provider=self,
            container_id=container_id,
            user=user or self.config.user,
            workdir=spec.workdir if ready_workdir else None,
        )

    def _limits(self, spec: SandboxSpec) -> tuple[float, int]:
        """CPU cores and MiB of memory: the spec's, else the config's defaults."""
        cpu = spec.cpu if spec.cpu is not None else self.config.cpu
        memory_mb = spec.memory_mb if spec.memory_mb is not None else self.config.memory_mb
        return cpu, memory_mb

    @override
    async def list(self, *, labels: Mapping[str, str] | None = None) -> list[SandboxInfo]:
        wanted = [f"{MANAGED}=1", *(f"{k}={v}" for k, v in (labels or {}).items())]
        found = await self._call(
            lambda: self._api().containers(all=True, filters={"label": wanted})
        )
        # The labels hold the first expiry only (a running container's labels cannot
        # change): each container's lease file holds the current one.
        leases: dict[str, float | None] = {}
        limiter = anyio.CapacityLimiter(_LEASE_READERS)

        async def read(container_id: str) -> None:
            leases[container_id] = await anyio.to_thread.run_sync(
                self._read_lease, container_id, limiter=limiter
            )

        async with anyio.create_task_group() as tg:
            for item in found:
                tg.start_soon(read, str(item["Id"]))
        return [
            SandboxInfo(
                id=str(item["Id"]),
                provider=NAME,
                labels={k: v for k, v in (item.get("Labels") or {}).items() if k != SPEC_LABEL},
                status=str(item.get("State") or "unknown"),
                lease=leases.get(str(item["Id"])),
            )
            for item in found
        ]

    def _read_lease(self, container_id: str) -> float | None:
        """The expiry in a container's lease file, or ``None`` (no file: its label rules).

        Read through the archive endpoint, which starts no process in the container (one
        that spent its pids limit still answers) and works on a stopped one. Blocking.
        """
        try:
            with self._errors(sandbox_id=container_id):
                stream, _ = self._api().get_archive(container_id, LEASE_FILE)
                data = bytearray()
                for chunk in stream:
                    data += chunk
                    if len(data) > _LEASE_ARCHIVE_MAX:
                        return None
        except SandboxError:
            return None
        try:
            with tarfile.open(fileobj=io.BytesIO(bytes(data))) as archive:
                member = archive.next()
                handle = archive.extractfile(member) if member and member.isfile() else None
                return float(int(handle.read(64))) if handle else None
        except (tarfile.TarError, ValueError, OSError):
            return None

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
    async def build_image(self, *, refresh: bool = False) -> str:
        self._agent_image = await ensure_agent_image(
            self._docker_client, base=self.config.base_image, build=True, refresh=refresh
        )
        return self._agent_image

    @override
    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await anyio.to_thread.run_sync(client.close)


def _spec_label(spec: SandboxSpec, user: str, ready_workdir: bool) -> str:
    data = spec.model_dump(mode="json", exclude={"env", "labels"})
    data["env_names"] = sorted(spec.env)
    data["label_names"] = sorted(spec.labels)  # the image's own labels are not the spec's
    data["sandbox_user"] = user
    data["ready_workdir"] = ready_workdir
    return json.dumps(data, separators=(",", ":"))


def _stored_spec(labels: Mapping[str, str], env: list[str]) -> tuple[SandboxSpec, str | None, bool]:
    """The spec, the user processes run as, and whether the container's workdir is the spec's."""
    try:
        data = json.loads(labels.get(SPEC_LABEL, "{}"))
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    names = data.pop("env_names", [])
    label_names = data.pop("label_names", None)
    user = data.pop("sandbox_user", None)
    ready_workdir = data.pop("ready_workdir", False) is True
    values = dict(item.partition("=")[::2] for item in env if isinstance(item, str))
    if isinstance(names, list):
        data["env"] = {name: values[name] for name in names if name in values}
    if isinstance(label_names, list):
        data["labels"] = {k: labels[k] for k in label_names if k in labels}
    else:
        data["labels"] = {k: v for k, v in labels.items() if k != SPEC_LABEL}
    try:
        spec = SandboxSpec.model_validate(data)
    except SandboxError:  # written by another version of sandbay: keep what still fits
        spec, ready_workdir = SandboxSpec(labels=data["labels"]), False
    return spec, user if isinstance(user, str) else None, ready_workdir


def _remove_quietly(api: Any, container_id: str) -> None:
    with contextlib.suppress(docker.errors.DockerException, requests.exceptions.RequestException):
        api.remove_container(container_id, force=True, v=True)
