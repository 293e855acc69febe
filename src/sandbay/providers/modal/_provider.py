"""`ModalProvider`: creates, lists and terminates the Modal Sandboxes that are sandboxes."""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import anyio
import modal
from typing_extensions import override

from ..._config import ModalConfig
from ..._errors import ConfigError, SandboxError, SandboxNotFoundError
from ..._image import SYSTEM_PATH, AgentImageRecipe, agent_image_recipe
from ..._provider import EXPIRY, MANAGED, Provider, ProviderStatus, SandboxInfo
from ..._sandbox import Sandbox, SandboxSpec
from ._errors import NAME, modal_errors, open_client
from ._sandbox import ModalSandbox, lease_command
from ._tags import (
    NETWORK,
    USER,
    WORKDIR,
    decode_value,
    labels_to_tags,
    tags_to_labels,
)

# Tags read at once by `list`.
_TAG_READERS = 8


def render_image(recipe: AgentImageRecipe, *, base: str) -> Any:
    """The agent image recipe as a ``modal.Image``: the recipe's shell steps on ``base``.

    The script travels base64-encoded in one build step (Modal's steps are Dockerfile
    ``RUN`` lines, which a multi-line script would break), and the environment is set
    natively, ``PATH`` with the CLI's directory first.
    """
    script = base64.b64encode(recipe.render_shell_script().encode()).decode()
    return (
        modal.Image.from_registry(base)
        .run_commands(
            f"echo {script} | base64 -d > /tmp/sandbay-image.sh && sh /tmp/sandbay-image.sh "
            "&& rm /tmp/sandbay-image.sh"
        )
        .env({**recipe.environment(), "PATH": f"{recipe.cli_dir}:{SYSTEM_PATH}"})
    )


class ModalProvider(Provider):
    """Sandboxes as Modal Sandboxes, through the ``modal`` SDK's async (``.aio``) API.

    The provider makes its own ``modal.Client`` from its config on first use and closes it
    in `aclose`: no process-wide client, and ``~/.modal.toml`` only with
    ``use_modal_config``. Every sandbox belongs to the app ``config.app_name`` (created if
    missing). Its main process is sandbay's lease (`lease_command`): the sandbox ends when
    its lease does, and Modal's own ``timeout`` (``config.max_lifetime_s``) is the backstop.
    Labels are Modal tags; `extend` rewrites the lease and the ``sandbay.expiry`` tag.

    `connect` rebuilds the spec's workdir, user and network (from a tag) and its labels; the
    env's values are not readable back from Modal, so the reattached spec's env is empty
    (processes still get it: it is the sandbox's own environment).
    """

    name: ClassVar[str] = NAME
    config: ModalConfig

    def __init__(self, config: ModalConfig) -> None:
        self.config = config
        self._client: Any = None
        self._client_lock = anyio.Lock()
        self._app: Any = None
        self._image: Any = None

    def _errors(self, *, sandbox_id: str | None = None) -> Any:
        return modal_errors(server_url=self.config.server_url, sandbox_id=sandbox_id)

    async def _modal_client(self) -> Any:
        async with self._client_lock:
            if self._client is None:
                self._client = await open_client(self.config)
            return self._client

    async def _modal_app(self) -> Any:
        if self._app is None:
            client = await self._modal_client()
            with self._errors():
                self._app = await modal.App.lookup.aio(
                    self.config.app_name,
                    create_if_missing=True,
                    environment_name=self.config.environment,
                    client=client,
                )
        return self._app

    def _agent_image(self, spec: SandboxSpec) -> Any:
        reference = spec.image or self.config.image
        if reference:
            return modal.Image.from_registry(reference)
        if self._image is None:
            self._image = render_image(agent_image_recipe(), base=self.config.base_image)
        return self._image

    def _limits(self, spec: SandboxSpec) -> tuple[float, int]:
        cpu = spec.cpu if spec.cpu is not None else self.config.cpu
        memory_mb = spec.memory_mb if spec.memory_mb is not None else self.config.memory_mb
        return cpu, memory_mb

    @override
    async def create(self, spec: SandboxSpec) -> Sandbox:
        if spec.network == "host" and not self.config.host_network:
            raise ConfigError(
                "network='host' is not possible on Modal: a Modal sandbox never shares your "
                "machine's network; use network='default' (or 'none' to block it)",
                provider=NAME,
            )
        user = spec.user or self.config.user
        explicit = bool(spec.image or self.config.image)
        ready_workdir = not explicit and spec.workdir == agent_image_recipe().workdir
        try:
            expiry = float(spec.labels[EXPIRY])
        except (KeyError, ValueError):
            expiry = time.time() + spec.lifetime_s
        cpu, memory_mb = self._limits(spec)
        client = await self._modal_client()
        app = await self._modal_app()
        tags = labels_to_tags({**spec.labels, **_spec_tags(spec, user)})
        # Shielded: a sandbox created while the caller was cancelled must not leak.
        with anyio.CancelScope(shield=True), self._errors():
            handle = await modal.Sandbox.create.aio(
                *lease_command(expiry),
                app=app,
                image=self._agent_image(spec),
                cpu=(cpu, cpu),
                memory=(memory_mb, memory_mb),
                timeout=self.config.max_lifetime_s,
                workdir=spec.workdir,
                # Root in an isolated sandbox: the claude CLI accepts bypassing permissions
                # as root only with IS_SANDBOX=1 (the agent image sets it too; a configured
                # image may not).
                env={"IS_SANDBOX": "1", **spec.env},
                tags=tags,
                block_network=spec.network == "none",
                client=client,
            )
        sandbox = ModalSandbox(spec, provider=self, handle=handle, user=user)
        try:
            if not ready_workdir:
                await sandbox._prepare_workdir()
        except BaseException:
            await sandbox.aclose()
            raise
        return sandbox

    @override
    async def connect(self, sandbox_id: str) -> Sandbox:
        client = await self._modal_client()
        missing = SandboxNotFoundError(
            f"no running Modal sandbox {sandbox_id!r} of sandbay's (finished, removed, or "
            "not sandbay's); `sandbay ls` lists the live ones",
            provider=NAME,
            sandbox_id=sandbox_id,
        )
        if not sandbox_id:
            raise missing
        try:
            with self._errors(sandbox_id=sandbox_id):
                handle = await modal.Sandbox.from_id.aio(sandbox_id, client=client)
                if await handle.poll.aio() is not None:
                    raise missing
                tags = dict(await handle.get_tags.aio())
        except SandboxNotFoundError:
            raise missing from None
        except SandboxError as exc:
            if "not found" in exc.message.lower() or "invalid" in exc.message.lower():
                raise missing from None
            raise
        if tags.get(MANAGED) != "1":
            raise missing
        spec, user = _stored_spec(tags)
        return ModalSandbox(spec, provider=self, handle=handle, user=user or self.config.user)

    @override
    async def list(self, *, labels: Mapping[str, str] | None = None) -> list[SandboxInfo]:
        client = await self._modal_client()
        app = await self._modal_app()
        wanted = labels_to_tags({MANAGED: "1", **(labels or {})})
        with self._errors():
            handles = [
                handle
                async for handle in modal.Sandbox.list.aio(
                    app_id=app.app_id, tags=wanted, client=client
                )
            ]
        found: dict[str, dict[str, str]] = {}
        limiter = anyio.CapacityLimiter(_TAG_READERS)

        async def read(handle: Any) -> None:
            async with limiter:
                try:
                    with self._errors(sandbox_id=handle.object_id):
                        found[handle.object_id] = dict(await handle.get_tags.aio())
                except SandboxNotFoundError:
                    pass  # finished meanwhile

        async with anyio.create_task_group() as tg:
            for handle in handles:
                tg.start_soon(read, handle)
        return [
            SandboxInfo(
                id=handle.object_id,
                provider=NAME,
                labels=tags_to_labels(found[handle.object_id]),
                status="running",
            )
            for handle in handles
            if handle.object_id in found
        ]

    @override
    async def destroy(self, sandbox_id: str) -> None:
        client = await self._modal_client()
        try:
            with self._errors(sandbox_id=sandbox_id):
                handle = await modal.Sandbox.from_id.aio(sandbox_id, client=client)
        except SandboxNotFoundError:
            return
        await self._terminate(handle, sandbox_id)

    async def _terminate(self, handle: Any, sandbox_id: str) -> None:
        try:
            with self._errors(sandbox_id=sandbox_id):
                await handle.terminate.aio()
        except SandboxNotFoundError:
            pass  # already gone
        finally:
            with self._errors(sandbox_id=sandbox_id):
                await handle.detach.aio()

    @override
    async def status(self) -> ProviderStatus:
        try:
            await self._modal_app()
        except SandboxError as exc:
            return ProviderStatus(NAME, installed=True, reachable=False, detail=exc.message)
        detail = (
            f"Modal at {self.config.server_url or 'https://api.modal.com'}, app "
            f"{self.config.app_name!r}; the agent image is built by Modal on first use"
        )
        return ProviderStatus(NAME, installed=True, reachable=True, detail=detail)

    @override
    async def build_image(self, *, refresh: bool = False) -> str:
        """Build the agent image on Modal (cached there by its steps); ``refresh`` is ignored:
        the recipe pins the CLI's version, so a cached build is the same image."""
        await self._modal_client()
        app = await self._modal_app()
        image = self._agent_image(SandboxSpec())
        with self._errors():
            await image.build.aio(app)
        return str(image.object_id)

    @override
    async def aclose(self) -> None:
        client, self._client = self._client, None
        self._app = None
        self._image = None
        if client is not None:
            with anyio.CancelScope(shield=True), self._errors():
                await client.__aexit__(None, None, None)
        del client


def _spec_tags(spec: SandboxSpec, user: str) -> dict[str, str]:
    return {WORKDIR: spec.workdir, USER: user, NETWORK: spec.network}


def _stored_spec(tags: Mapping[str, str]) -> tuple[SandboxSpec, str | None]:
    """The spec (labels, workdir, network) and the user, from a sandbox's tags."""
    labels = tags_to_labels(tags)
    data = {
        name: decode_value(tags[key])
        for name, key in (("workdir", WORKDIR), ("network", NETWORK))
        if key in tags
    }
    try:
        spec = SandboxSpec.model_validate({**data, "labels": labels})
    except SandboxError:  # written by another version of sandbay: keep what still fits
        spec = SandboxSpec(labels=labels)
    user = decode_value(tags[USER]) if USER in tags else None
    return spec, user
