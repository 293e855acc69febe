"""`DaytonaProvider`: create, reattach, list and remove Daytona sandboxes."""

from __future__ import annotations

import builtins
import contextlib
import logging
import math
import shlex
import time
import uuid
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import anyio
from daytona import (
    AsyncDaytona,
    AsyncSandbox,
    CreateSandboxFromImageParams,
    CreateSandboxFromSnapshotParams,
    CreateSnapshotParams,
    DaytonaNotFoundError,
    Image,
    ListSandboxesQuery,
    Resources,
)
from typing_extensions import override

from ..._config import BaseProviderConfig, DaytonaConfig
from ..._errors import ConfigError, ImageError, SandboxError, SandboxNotFoundError
from ..._image import SYSTEM_PATH, agent_image_recipe
from ..._provider import MANAGED, Provider, ProviderStatus, SandboxInfo, managed_labels
from ..._sandbox import CLOSE_TIMEOUT, Sandbox, SandboxSpec
from ._client import close_client, make_client
from ._errors import NAME, daytona_errors
from ._sandbox import DaytonaSandbox, ttl_minutes

#: Labels sandbay keeps for `connect` to rebuild a spec (not shown as the spec's labels),
#: with the SDK's own language label.
WORKDIR = "sandbay.workdir"
NETWORK = "sandbay.network"
CREATE = "sandbay.create"
_INTERNAL = (WORKDIR, NETWORK, CREATE, "code-toolbox-language")

image_logger = logging.getLogger("sandbay.image")


class DaytonaProvider(Provider):
    """Sandboxes on Daytona.

    The lease is the ``sandbay.expiry`` label (what gc judges by) and a Daytona TTL rounded
    up to the minute, so Daytona removes a sandbox whose owner died even if gc never runs.
    `Sandbox.extend` renews both. ``spec.cpu``/``memory_mb`` need an image (Daytona sets
    resources per snapshot); ``network="none"`` blocks all traffic (``network_block_all``);
    ``"host"`` is refused unless the config's ``host_network`` says the control plane's
    sandboxes share this machine's network (a local one, as in sandbay's tests).

    Each call makes its own SDK client (an ``AsyncDaytona`` belongs to one event loop);
    each sandbox owns the one it was made with.
    """

    name: ClassVar[str] = NAME

    def __init__(self, config: BaseProviderConfig) -> None:
        if not isinstance(config, DaytonaConfig):
            raise ConfigError(f"DaytonaProvider needs a DaytonaConfig, got {type(config).__name__}")
        super().__init__(config)
        self.dconfig = config
        # Clients of sandboxes not closed yet: closing the provider closes those left.
        self._clients: set[AsyncDaytona] = set()

    def _client(self) -> AsyncDaytona:
        client = make_client(self.dconfig)
        self._clients.add(client)
        return client

    async def _release(self, client: AsyncDaytona) -> None:
        self._clients.discard(client)
        await close_client(client)

    @override
    async def aclose(self) -> None:
        for client in list(self._clients):
            with contextlib.suppress(Exception):  # one of another event loop, say
                await self._release(client)

    def _params(self, spec: SandboxSpec, labels: dict[str, str]) -> Any:
        if spec.network == "host" and not self.dconfig.host_network:
            raise ConfigError(
                "the daytona provider cannot share the host's network: use "
                "network='default' or 'none'",
                provider=NAME,
            )
        common: dict[str, Any] = {
            "env_vars": dict(spec.env),
            "labels": labels,
            "os_user": self.dconfig.os_user,
            "network_block_all": spec.network == "none",
            "ttl_minutes": ttl_minutes(float(labels["sandbay.expiry"])),
            "auto_stop_interval": 0,
        }
        if spec.image is not None:
            resources = Resources(
                cpu=math.ceil(spec.cpu) if spec.cpu else None,
                memory=math.ceil(spec.memory_mb / 1024) if spec.memory_mb else None,
                disk=self.dconfig.disk_gb,
            )
            return CreateSandboxFromImageParams(image=spec.image, resources=resources, **common)
        if spec.cpu is not None or spec.memory_mb is not None:
            raise ConfigError(
                "the daytona provider sets cpu and memory per image, not per snapshot: give "
                "spec.image (Daytona then builds it with these resources), or drop cpu and "
                "memory_mb",
                provider=NAME,
            )
        snapshot = self.dconfig.snapshot or agent_snapshot()
        return CreateSandboxFromSnapshotParams(snapshot=snapshot, **common)

    @override
    async def create(self, spec: SandboxSpec) -> Sandbox:
        if MANAGED not in spec.labels:
            spec = spec.model_copy(update={"labels": managed_labels(spec)})
        # A token only this create knows: whatever stops it (a timeout, a cancel, an error
        # after Daytona accepted), the sandbox it may have made is found and removed.
        token = uuid.uuid4().hex
        labels = {**spec.labels, WORKDIR: spec.workdir, NETWORK: spec.network, CREATE: token}
        params = self._params(spec, labels)
        client = self._client()
        try:
            with daytona_errors("creating a sandbox"):
                sdk = await client.create(params, timeout=self.dconfig.create_timeout)
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                await self._remove_made(client, token)
            await self._release(client)
            raise
        return DaytonaSandbox(spec, client, sdk, release=self._release)

    async def _remove_made(self, client: AsyncDaytona, token: str) -> None:
        try:
            with daytona_errors("removing a sandbox whose creation failed"):
                async for sdk in client.list(ListSandboxesQuery(labels={CREATE: token})):
                    await client.delete(sdk)
        except SandboxError:
            pass  # out of reach: its TTL removes it

    @override
    async def connect(self, sandbox_id: str) -> Sandbox:
        client = self._client()
        try:
            with daytona_errors("reattaching", sandbox_id=sandbox_id):
                sdk = await client.get(sandbox_id)
                if sdk.labels.get(MANAGED) != "1":
                    raise SandboxNotFoundError(
                        "not a sandbox sandbay made", provider=NAME, sandbox_id=sandbox_id
                    )
                if str(sdk.state.value if sdk.state else "") == "stopped":
                    await sdk.start(timeout=self.dconfig.create_timeout)
            spec = SandboxSpec(
                labels={k: v for k, v in sdk.labels.items() if k not in _INTERNAL},
                env=dict(sdk.env or {}),
                workdir=sdk.labels.get(WORKDIR, "/workspace"),
                network=_network(sdk.labels.get(NETWORK), host=self.dconfig.host_network),
            )
            return DaytonaSandbox(spec, client, sdk, release=self._release)
        except BaseException:
            await self._release(client)
            raise

    @override
    async def list(self, *, labels: Mapping[str, str] | None = None) -> builtins.list[SandboxInfo]:
        client = self._client()
        try:
            found = []
            with daytona_errors("listing sandboxes"):
                query = ListSandboxesQuery(labels={MANAGED: "1", **(labels or {})})
                async for sdk in client.list(query):
                    state = sdk.state.value if sdk.state is not None else "unknown"
                    if state in ("destroyed", "destroying"):
                        continue
                    kept = {k: v for k, v in sdk.labels.items() if k not in _INTERNAL}
                    found.append(SandboxInfo(id=sdk.id, provider=NAME, labels=kept, status=state))
            return found
        finally:
            await self._release(client)

    @override
    async def destroy(self, sandbox_id: str) -> None:
        client = self._client()
        try:
            await self._destroy_with(client, sandbox_id)
        finally:
            await self._release(client)

    async def _destroy_with(self, client: AsyncDaytona, sandbox_id: str) -> None:
        try:
            with daytona_errors("removing a sandbox", sandbox_id=sandbox_id):
                sdk: AsyncSandbox = await client.get(sandbox_id)
                await client.delete(sdk)
        except SandboxNotFoundError:
            pass

    @override
    async def build_image(self, *, refresh: bool = False) -> str:
        """Make the agent snapshot from sandbay's `AgentImageRecipe`, unless it exists.

        The recipe's shell script becomes one ``RUN`` step of a Daytona ``Image`` on
        `DaytonaConfig.base_image` (Daytona builds it, with network: the SDK comes from
        PyPI, and the CLI is taken from its wheel), with the recipe's environment, the CLI's
        directory first on ``PATH`` and its workdir.
        The snapshot is named by the recipe's hash, so a new recipe makes a new snapshot.
        """
        recipe = agent_image_recipe()
        name = self.dconfig.snapshot or agent_snapshot()
        image = (
            Image.base(self.dconfig.base_image)
            .run_commands(f"sh -c {shlex.quote(recipe.render_shell_script())}")
            .env({**recipe.environment(), "PATH": f"{recipe.cli_dir}:{SYSTEM_PATH}"})
            .workdir(recipe.workdir)
        )
        client = self._client()
        try:
            with daytona_errors(f"building the snapshot {name!r}"):
                if not refresh:
                    try:
                        found = await client.snapshot.get(name)
                        if str(getattr(found.state, "value", found.state)) == "active":
                            image_logger.info("snapshot %s exists", name)
                            return name
                    except DaytonaNotFoundError:
                        pass
                made = await client.snapshot.create(
                    CreateSnapshotParams(name=name, image=image), on_logs=image_logger.info
                )
            state = str(getattr(made.state, "value", made.state))
            if state != "active":
                raise ImageError(
                    f"Daytona could not build the snapshot {name!r} ({state}): "
                    f"{made.error_reason or 'no reason given'}",
                    provider=NAME,
                )
            return name
        finally:
            await self._release(client)

    @override
    async def status(self) -> ProviderStatus:
        started = time.monotonic()
        try:
            await self.list(labels={"sandbay.status-probe": "1"})
        except (SandboxError, ConfigError) as exc:
            return ProviderStatus(NAME, True, False, exc.message)
        ms = (time.monotonic() - started) * 1000
        return ProviderStatus(NAME, True, True, f"{self.dconfig.api_url} answered in {ms:.0f} ms")


def agent_snapshot() -> str:
    """The name of the snapshot holding sandbay's agent image (by the recipe's hash)."""
    return f"sandbay-agent-{agent_image_recipe().digest[:12]}"


def _network(label: str | None, *, host: bool) -> Literal["default", "none", "host"]:
    """The spec's network, from the label `create` left (``host`` only where allowed)."""
    if label == "none":
        return "none"
    return "host" if label == "host" and host else "default"
