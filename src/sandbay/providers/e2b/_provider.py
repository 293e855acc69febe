"""`E2BProvider`: creates, finds and kills E2B sandboxes through ``e2b.AsyncSandbox``."""

from __future__ import annotations

import builtins
import hashlib
import json
import math
import random
import re
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import anyio
from e2b import AsyncSandbox, AsyncTemplate, BuildException, SandboxQuery
from typing_extensions import override

from ..._config import E2BConfig
from ..._errors import ConfigError, ImageError, SandboxError, SandboxNotFoundError
from ..._image import IMAGE_LOG, AgentImageRecipe, ImageUser, agent_image_recipe
from ..._provider import EXPIRY, MANAGED, SESSION, Provider, ProviderStatus, SandboxInfo
from ..._sandbox import Sandbox, SandboxSpec
from ._errors import NAME, e2b_errors, map_e2b_error, retryable
from ._sandbox import E2BSandbox

#: Metadata key holding what `connect` needs to rebuild a sandbox's spec (env names only:
#: values may be secrets, and metadata is visible to anyone who lists the account's sandboxes).
SPEC_LABEL = "sandbay.spec"

#: Sandboxes asked for per page when listing.
PAGE_SIZE = 100

# Backoff between create attempts: base * 2**attempt, at most the cap, with jitter.
_BACKOFF_BASE_S = 0.5
_BACKOFF_CAP_S = 8.0

_IDEMPOTENCY_KEY = re.compile(r"[a-z0-9-]{1,255}")


def agent_recipe() -> AgentImageRecipe:
    """The agent image recipe as an E2B template: E2B's own ``user`` (uid 1000) runs it."""
    return agent_image_recipe(user=ImageUser(name="user", home="/home/user"))


def agent_template() -> str:
    """The name of the agent template for this host's claude-agent-sdk."""
    recipe = agent_recipe()
    return f"{recipe.name}-{recipe.digest}"


class E2BProvider(Provider):
    """Sandboxes on E2B. No I/O until first use; the SDK holds no per-loop client.

    A sandbox's labels are its E2B metadata, so `list` and ``sandbay gc`` find it by them; its
    lease is E2B's own timeout (E2B kills it when the timeout passes, `Sandbox.extend` moves
    it). `connect` rebuilds the spec from the metadata: the labels, workdir, user and
    network; the env's names but not its values (they may be secrets, and every process in
    the sandbox has them anyway).
    """

    name: ClassVar[str] = NAME
    config: E2BConfig

    def __init__(self, config: E2BConfig) -> None:
        self.config = config

    def _opts(self) -> dict[str, Any]:
        """Connection options every SDK call takes (the SDK keeps no client between calls)."""
        config = self.config
        opts: dict[str, Any] = {"request_timeout": config.request_timeout}
        if config.api_key is not None:
            opts["api_key"] = config.api_key.get_secret_value()
        for key in ("domain", "api_url", "sandbox_url"):
            value = getattr(config, key)
            if value:
                opts[key] = value
        return opts

    def _template(self, spec: SandboxSpec) -> str:
        return spec.image or self.config.template or agent_template()

    def _check_spec(self, spec: SandboxSpec) -> None:
        for field, value in (("cpu", spec.cpu), ("memory_mb", spec.memory_mb)):
            if value is not None:
                raise ConfigError(
                    f"spec.{field} = {value!r}: on E2B, cpu and memory belong to the template, "
                    f"not to one sandbox; unset spec.{field} (also in the [spec] section of "
                    "sandbay.toml) and build a template with the size you need "
                    "(docs/providers/e2b.md, 'Sizes')",
                    provider=NAME,
                )
        if spec.network == "host" and not self.config.reaches_host_loopback:
            raise ConfigError(
                'spec.network = "host": an E2B sandbox is a VM in E2B\'s cloud and cannot share '
                'this machine\'s network; use "default" (internet) or "none"',
                provider=NAME,
            )
        if self.config.api_key is None and not self.config.api_url:
            raise ConfigError(
                "no E2B API key: set E2B_API_KEY (or api_key in the e2b provider's config) "
                "to a key from the E2B dashboard",
                provider=NAME,
            )

    @override
    async def create(self, spec: SandboxSpec) -> Sandbox:
        self._check_spec(spec)
        template = self._template(spec)
        labels = dict(spec.labels)
        labels[SPEC_LABEL] = _spec_label(spec, spec.user or self.config.user)
        # E2B kills the sandbox when its timeout passes: that is the lease.
        try:
            expiry = float(spec.labels[EXPIRY])
        except (KeyError, ValueError):
            expiry = time.time() + spec.lifetime_s
        session = spec.labels.get(SESSION)
        key = _idempotency_key(session) if session else None
        sdk = await self._create_sdk(spec, template, labels, expiry, key)
        sandbox = E2BSandbox(spec, provider=self, sdk=sdk)
        try:
            await anyio.lowlevel.checkpoint()
            await sandbox._prepare()
        except BaseException:
            await sandbox.aclose()
            raise
        return sandbox

    async def _create_sdk(
        self,
        spec: SandboxSpec,
        template: str,
        labels: dict[str, str],
        expiry: float,
        key: str | None,
    ) -> Any:
        """Create the sandbox, trying again on 429/5xx; adopt one an earlier try made.

        A try that failed may have created the sandbox all the same (a 5xx after it was
        made, an answer lost on the way): before each new try, the sandboxes carrying this
        create's session label are looked up, and one found is adopted (any more removed),
        so a create never leaves two. The idempotency key asks E2B for the same.
        """
        session = labels.get(SESSION)
        attempts = self.config.create_attempts
        last: BaseException | None = None
        for attempt in range(attempts):
            if attempt:
                delay = min(_BACKOFF_CAP_S, _BACKOFF_BASE_S * 2 ** (attempt - 1))
                await anyio.sleep(delay * (0.5 + random.random() / 2))
                if session:
                    adopted = await self._adopt(session)
                    if adopted is not None:
                        return adopted
            try:
                # Shielded: a sandbox made while the caller was cancelled must not leak.
                with anyio.CancelScope(shield=True):
                    sdk = await AsyncSandbox.create(
                        template,
                        timeout=max(1, math.ceil(expiry - time.time())),
                        metadata=labels,
                        envs=dict(spec.env),
                        allow_internet_access=spec.network != "none",
                        idempotency_key=key,
                        retries=0,  # sandbay retries, looking for a landed sandbox first
                        **self._opts(),
                    )
            except Exception as exc:
                if not retryable(exc):
                    raise map_e2b_error(exc, template=template) from exc
                last = exc
                continue
            if attempt and session:
                # An earlier try may have landed after all (its answer lost): keep one.
                await self._remove_others(session, keep=str(sdk.sandbox_id))
            return sdk
        if session:
            adopted = await self._adopt(session)
            if adopted is not None:
                return adopted
        assert last is not None
        raise map_e2b_error(last, template=template) from last

    async def _remove_others(self, session: str, *, keep: str) -> None:
        with anyio.CancelScope(shield=True):
            try:
                for info in await self.list(labels={SESSION: session}):
                    if info.id != keep:
                        await self.destroy(info.id)
            except SandboxError:
                pass  # the sandbox made is fine; a stray one lives out its timeout

    async def _adopt(self, session: str) -> Any | None:
        """The sandbox an earlier try of this create made, connected; extras removed."""
        try:
            found = await self.list(labels={SESSION: session})
        except SandboxError:
            return None  # still unreachable: the next try will tell
        if not found:
            return None
        keep, *extra = sorted(found, key=lambda info: info.id)
        for info in extra:
            await self.destroy(info.id)
        with e2b_errors(sandbox_id=keep.id):
            return await AsyncSandbox.connect(keep.id, **self._opts())

    @override
    async def connect(self, sandbox_id: str) -> Sandbox:
        if not sandbox_id:
            raise SandboxNotFoundError("no sandbox id given", provider=NAME)
        try:
            with e2b_errors(sandbox_id=sandbox_id):
                info = await AsyncSandbox.get_info(sandbox_id, **self._opts())
        except SandboxNotFoundError:
            info = None
        metadata = dict(info.metadata or {}) if info is not None else {}
        if info is None or metadata.get(MANAGED) != "1":
            raise SandboxNotFoundError(
                f"no sandbay sandbox {sandbox_id!r} on E2B (killed, timed out, or not "
                "sandbay's); `sandbay ls --provider e2b` lists the live ones",
                provider=NAME,
                sandbox_id=sandbox_id,
            )
        with e2b_errors(sandbox_id=sandbox_id):
            sdk = await AsyncSandbox.connect(sandbox_id, **self._opts())
        return E2BSandbox(_stored_spec(metadata), provider=self, sdk=sdk)

    @override
    async def list(self, *, labels: Mapping[str, str] | None = None) -> builtins.list[SandboxInfo]:
        wanted = {MANAGED: "1", **(labels or {})}
        paginator = AsyncSandbox.list(
            query=SandboxQuery(metadata=wanted), limit=PAGE_SIZE, **self._opts()
        )
        found: builtins.list[SandboxInfo] = []
        with e2b_errors():
            while paginator.has_next:
                for item in await paginator.next_items():
                    metadata = dict(item.metadata or {})
                    if any(metadata.get(k) != v for k, v in wanted.items()):
                        continue  # the filter is E2B's; sandbay checks it all the same
                    end = getattr(item, "end_at", None)
                    found.append(
                        SandboxInfo(
                            id=item.sandbox_id,
                            provider=NAME,
                            labels={k: v for k, v in metadata.items() if k != SPEC_LABEL},
                            status=str(getattr(item.state, "value", item.state)),
                            lease=end.timestamp() if end is not None else None,
                        )
                    )
        return found

    @override
    async def destroy(self, sandbox_id: str) -> None:
        with e2b_errors(sandbox_id=sandbox_id):
            await AsyncSandbox.kill(sandbox_id, **self._opts())

    @override
    async def build_image(self, *, refresh: bool = False) -> str:
        """Build the agent template with E2B's template builder, or find it built.

        The template is `sandbay._image.AgentImageRecipe` as its shell steps, run as root on
        `E2BConfig.base_image`, with E2B's ``user`` for processes and the recipe's workdir;
        its name carries the recipe's digest, so a new CLI (the host's claude-agent-sdk) builds
        a new one.
        """
        recipe = agent_recipe()
        name = agent_template()
        opts = self._opts()
        self._check_spec(SandboxSpec())
        with e2b_errors(template=name):
            if not refresh and await AsyncTemplate.exists(name, **opts):
                IMAGE_LOG.info("E2B template %s is built", name)
                return name
        template = (
            AsyncTemplate()
            .from_image(self.config.base_image)
            .run_cmd(recipe.render_shell_script(isolated=True), user="root")
            .set_user("user")
            .set_workdir(recipe.workdir)
        )
        IMAGE_LOG.info("building E2B template %s on %s", name, self.config.base_image)
        try:
            await AsyncTemplate.build(
                template,
                name,
                cpu_count=self.config.template_cpu,
                memory_mb=self.config.template_memory_mb,
                skip_cache=refresh,
                on_build_logs=lambda entry: IMAGE_LOG.info("%s", entry.message),
                **opts,
            )
        except BuildException as exc:
            raise ImageError(
                f"E2B could not build the template {name!r}: {exc}", provider=NAME
            ) from exc
        except Exception as exc:
            raise map_e2b_error(exc, template=name) from exc
        IMAGE_LOG.info("E2B template %s is built", name)
        return name

    @override
    async def status(self) -> ProviderStatus:
        where = self.config.api_url or f"api.{self.config.domain or 'e2b.app'}"
        try:
            self._check_spec(SandboxSpec())
            paginator = AsyncSandbox.list(
                query=SandboxQuery(metadata={MANAGED: "1"}), limit=1, **self._opts()
            )
            with e2b_errors():
                await paginator.next_items()
        except SandboxError as exc:
            return ProviderStatus(NAME, installed=True, reachable=False, detail=exc.message)
        template = self.config.template or agent_template()
        return ProviderStatus(
            NAME,
            installed=True,
            reachable=True,
            detail=f"E2B API at {where} (e2b {e2b_version()}); template {template}",
        )


def e2b_version() -> str:
    from importlib import metadata

    return metadata.version("e2b")


def _idempotency_key(session: str) -> str:
    """An idempotency key for a create (E2B takes 1-255 of ``[a-z0-9-]``)."""
    if _IDEMPOTENCY_KEY.fullmatch(session):
        return session
    return hashlib.sha256(session.encode()).hexdigest()


def _spec_label(spec: SandboxSpec, user: str) -> str:
    data = spec.model_dump(mode="json", exclude={"env", "labels", "cpu", "memory_mb"})
    data["user"] = user
    data["env_names"] = sorted(spec.env)
    data["label_names"] = sorted(spec.labels)
    return json.dumps(data, separators=(",", ":"))


def _stored_spec(metadata: Mapping[str, str]) -> SandboxSpec:
    try:
        data = json.loads(metadata.get(SPEC_LABEL, "{}"))
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    data.pop("env_names", None)
    label_names = data.pop("label_names", None)
    if isinstance(label_names, list):
        data["labels"] = {k: metadata[k] for k in label_names if k in metadata}
    else:
        data["labels"] = {k: v for k, v in metadata.items() if k != SPEC_LABEL}
    try:
        return SandboxSpec.model_validate(data)
    except SandboxError:  # written by another version of sandbay: keep what still fits
        return SandboxSpec(labels=data["labels"])
