"""Configuration: one frozen model per provider, and the registry of providers it implies.

A config file (``sandbay.toml``, or any file given with ``--config``) looks like::

    [provider]
    type = "docker"          # the one line that picks the provider
    image = "sandbay-agent:latest"

    [spec]                   # defaults for every sandbox (a SandboxSpec)
    memory_mb = 2048

``SANDBAY_PROVIDER`` overrides the provider's type; the other fields of ``[provider]`` then
apply only if they belong to the new type.

The config models are the registry. Each subclasses `BaseProviderConfig` and names its provider
class as an import path (``provider_class``), imported only when a provider is made; the
built-in ones are joined in the discriminated union `ProviderConfig`. A provider shipped in
another distribution registers its config model under the entry-point group
``sandbay.providers`` (the entry point's name is its ``type``)::

    [project.entry-points."sandbay.providers"]
    acme = "acme_sandbay:AcmeConfig"

A ``[provider]`` table whose ``type`` is not built in is validated by the model its entry
point names. This module imports no provider: `sandbay._provider` imports it, never the
reverse.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretBytes,
    SecretStr,
    SerializeAsAny,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

from ._errors import ConfigError
from ._sandbox import SandboxSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "BaseProviderConfig",
    "DaytonaConfig",
    "DockerConfig",
    "E2BConfig",
    "LocalConfig",
    "ModalConfig",
    "ProviderConfig",
    "SandbayConfig",
    "load_config",
]

CONFIG_FILE = "sandbay.toml"
#: Entry-point group through which other distributions add providers.
ENTRY_POINT_GROUP = "sandbay.providers"


class _Base(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BaseProviderConfig(_Base):
    """What every provider's config model is: the one place a provider is registered.

    A subclass sets ``type`` to a ``Literal`` with the provider's name as its default, and
    ``provider_class`` to the ``"module:Class"`` path of its `Provider` subclass, whose
    constructor takes the config. The module is imported only when a provider is made, so
    loading a config never imports a provider's SDK. Secrets are ``SecretStr`` fields: they
    are left out of `public_data` (what a run handle stores).
    """

    type: str
    """Selects the provider."""

    provider_class: ClassVar[str]
    """``"module:Class"`` of the `Provider` this config makes."""
    extra: ClassVar[str | None] = None
    """The pip extra that installs the provider's SDK (named when its import fails)."""

    def public_data(self) -> dict[str, Any]:
        """The config as JSON-ready data without its secrets (``SecretStr`` fields).

        `config_from_data` turns it back into a config; secrets then come from their
        defaults (the environment), as when the config was first loaded.
        """
        secret = {
            name
            for name in type(self).model_fields
            if isinstance(getattr(self, name), (SecretStr, SecretBytes))
        }
        return self.model_dump(mode="json", exclude=secret)


class LocalConfig(BaseProviderConfig):
    """The embedded default: processes on this machine in a private working directory."""

    type: Literal["local"] = "local"
    """Selects this provider."""
    provider_class: ClassVar[str] = "sandbay.providers.local:LocalProvider"
    root: Path | None = None
    """Directory under which each sandbox gets its own folder. Default: the system temp dir."""
    isolate: bool | None = None
    """Run processes under bubblewrap: only the workspace and read-only system dirs visible,
    no network. ``None`` (the default): isolate when ``bwrap`` is on PATH and can create a
    sandbox here, else run unisolated (``LocalSandbox.isolated`` tells which a sandbox got).
    ``True``: require it (an error says how to install it). ``False``: never isolate."""
    python: str | None = None
    """Python that runs the agent entrypoint. Default: the interpreter running sandbay."""
    allow_bypass_permissions: bool = False
    """Let agents on the unisolated local provider use ``permission_mode="bypassPermissions"``:
    they then act on this machine as you, unasked. Isolated sandboxes allow it anyway."""


class DockerConfig(BaseProviderConfig):
    """Containers on a Docker engine, through the ``docker`` SDK."""

    type: Literal["docker"] = "docker"
    """Selects this provider."""
    provider_class: ClassVar[str] = "sandbay.providers.docker:DockerProvider"
    extra: ClassVar[str | None] = "docker"
    base_url: str | None = None
    """Engine address (``unix:///var/run/docker.sock``). Default: ``DOCKER_HOST`` or the socket."""
    image: str | None = None
    """Image for sandboxes. Default: sandbay's agent image, built on first use."""
    base_image: str = "sandbay-base:bookworm"
    """Base the agent image is built on when it is missing (needs Python 3.10+ and pip)."""
    user: str = "1000:1000"
    """User processes run as unless the spec names one."""
    pids_limit: int = Field(default=1024, gt=0)
    """Most processes (threads included) a container may hold."""
    cpu: float = Field(default=1.0, gt=0)
    """CPU cores a container may use when its spec sets no ``cpu``."""
    memory_mb: int = Field(default=1024, gt=0)
    """Memory limit in MiB (swap included) when the spec sets no ``memory_mb``."""
    runtime: str | None = None
    """OCI runtime (e.g. ``runsc`` for gVisor), if not the engine's default."""


def _daytona_api_key() -> SecretStr | None:
    key = os.environ.get("DAYTONA_API_KEY")
    return SecretStr(key) if key else None


class DaytonaConfig(BaseProviderConfig):
    """Sandboxes on Daytona, through the ``daytona`` SDK (``AsyncDaytona``).

    Only this model configures the SDK: ``DAYTONA_*`` values in ``.env`` files of the working
    directory (which the SDK would read) are ignored, and so are the process environment's,
    except ``DAYTONA_API_KEY`` as this model's default.
    """

    type: Literal["daytona"] = "daytona"
    """Selects this provider."""
    provider_class: ClassVar[str] = "sandbay.providers.daytona:DaytonaProvider"
    extra: ClassVar[str | None] = "daytona"
    api_key: SecretStr | None = Field(default_factory=_daytona_api_key)
    """API key. Default: ``DAYTONA_API_KEY`` from the process environment."""
    api_url: str = "https://app.daytona.io/api"
    """Daytona's API endpoint."""
    target: str | None = None
    """Region sandboxes run in (``us``, ``eu``). Default: the organisation's default region."""
    snapshot: str | None = None
    """Snapshot sandboxes start from when the spec names no image. Default: sandbay's agent
    snapshot (``sandbay image build --provider daytona`` makes it)."""
    base_image: str = "python:3.12-slim-bookworm"
    """Image the agent snapshot is built on (``sandbay image build --provider daytona``)."""
    os_user: str | None = None
    """The sandbox's OS user. Default: the snapshot's (``daytona`` on Daytona's images)."""
    disk_gb: int | None = Field(default=None, gt=0)
    """Disk in GiB for sandboxes created from an image. Default: Daytona's."""
    create_timeout: float = Field(default=120.0, gt=0)
    """Seconds to wait for a new sandbox to reach ``started``."""
    host_network: bool = False
    """Whether this control plane's sandboxes share this machine's network: true only for a
    local Daytona-compatible control plane (sandbay's tests run one), never for Daytona's
    cloud. Then ``SandboxSpec(network="host")`` is accepted and 127.0.0.1 is this machine's."""


def _env_secret(name: str) -> SecretStr | None:
    value = os.environ.get(name)
    return SecretStr(value) if value else None


class ModalConfig(BaseProviderConfig):
    """Modal Sandboxes, through the ``modal`` SDK (``pip install "sandbay[modal]"``)."""

    type: Literal["modal"] = "modal"
    """Selects this provider."""
    provider_class: ClassVar[str] = "sandbay.providers.modal:ModalProvider"
    extra: ClassVar[str | None] = "modal"
    token_id: SecretStr | None = Field(default_factory=lambda: _env_secret("MODAL_TOKEN_ID"))
    """Modal token id. Default: ``MODAL_TOKEN_ID``."""
    token_secret: SecretStr | None = Field(
        default_factory=lambda: _env_secret("MODAL_TOKEN_SECRET")
    )
    """Modal token secret. Default: ``MODAL_TOKEN_SECRET``."""
    server_url: str | None = Field(default_factory=lambda: os.environ.get("MODAL_SERVER_URL"))
    """Modal's API. Default: ``MODAL_SERVER_URL``, else ``https://api.modal.com``."""
    use_modal_config: bool = False
    """Fill what is unset above from Modal's own config (``~/.modal.toml``, its active
    profile), as ``modal token new`` writes it. Off by default: only this config counts."""
    environment: str | None = None
    """Modal environment. Default: the workspace's default environment."""
    app_name: str = "sandbay"
    """The Modal app sandboxes belong to (created if missing)."""
    image: str | None = None
    """A registry image to run as is (it needs Python 3.10+ and the ``claude`` CLI for
    agents). Default: sandbay's agent image, built by Modal from the recipe."""
    base_image: str = "python:3.12-slim-bookworm"
    """Registry image the agent image is built on (Debian-like, Python 3.10+)."""
    user: str = "1000:1000"
    """User processes run as unless the spec names one (the agent image's user; sandboxes
    themselves run as root, which sandbay's lease and kills use)."""
    cpu: float = Field(default=1.0, gt=0)
    """CPU cores (request and limit) when the spec sets no ``cpu``."""
    memory_mb: int = Field(default=1024, gt=0)
    """Memory in MiB (request and limit) when the spec sets no ``memory_mb``."""
    max_lifetime_s: int = Field(default=86400, gt=0, le=86400)
    """Modal's own ``timeout``: a sandbox ends this long after creation whatever its lease
    says (Modal's maximum is 24 hours). The lease (``spec.lifetime_s``) ends it sooner."""
    host_network: bool = False
    """Whether this control plane's sandboxes share this machine's network: true only for a
    local Modal-compatible control plane (sandbay's tests run one), never for Modal's cloud.
    Then ``SandboxSpec(network="host")`` is accepted and 127.0.0.1 is this machine's."""


class E2BConfig(BaseProviderConfig):
    """Sandboxes on E2B (micro-VMs from a template), through the ``e2b`` SDK.

    Needs Python 3.11+ (the e2b SDK's own floor) and ``pip install "sandbay[e2b]"``.
    """

    type: Literal["e2b"] = "e2b"
    """Selects this provider."""
    provider_class: ClassVar[str] = "sandbay.providers.e2b:E2BProvider"
    extra: ClassVar[str | None] = "e2b"
    api_key: SecretStr | None = Field(
        default_factory=lambda: (
            SecretStr(os.environ["E2B_API_KEY"]) if os.environ.get("E2B_API_KEY") else None
        )
    )
    """E2B API key. Default: ``E2B_API_KEY``."""
    template: str | None = None
    """Template sandboxes start from. Default: sandbay's agent template
    (``sandbay image build --provider e2b`` builds it). cpu and memory are the template's."""
    user: str = "user"
    """User processes run as unless the spec names one: E2B templates have ``user`` and
    ``root``."""
    base_image: str = "e2bdev/base"
    """Image the agent template is built on (``sandbay image build --provider e2b``): E2B's
    base image; any Debian-like image with Python 3.10+ (or apt) will do."""
    template_cpu: int | None = Field(default=None, gt=0)
    """vCPUs of sandboxes from the agent template. Default: E2B's (2)."""
    template_memory_mb: int | None = Field(default=None, gt=0)
    """Memory of sandboxes from the agent template, in MiB. Default: E2B's (512)."""
    domain: str | None = None
    """E2B domain. Default: ``E2B_DOMAIN``, else E2B's own."""
    api_url: str | None = None
    """Control-plane URL, for a self-hosted or test control plane. Default: E2B's."""
    sandbox_url: str | None = None
    """Base URL of every sandbox's envd, for a self-hosted or test control plane."""
    request_timeout: float = Field(default=60.0, gt=0)
    """Seconds each API request may take."""
    create_attempts: int = Field(default=4, ge=1)
    """How often a create is tried when E2B answers 429 or 5xx (with backoff)."""
    reaches_host_loopback: bool = False
    """Whether ``127.0.0.1`` in a sandbox is this machine's. Only for a control plane whose
    sandboxes share this host's network (a local test control plane); never on E2B."""


ProviderConfig = Annotated[
    LocalConfig | DockerConfig | DaytonaConfig | E2BConfig | ModalConfig,
    Field(discriminator="type"),
]
"""Any built-in provider's config; ``type`` selects which. A new built-in provider's config
joins this union, and nothing else outside its own folder."""

_BUILTIN: TypeAdapter[LocalConfig | DockerConfig | DaytonaConfig | E2BConfig | ModalConfig] = (
    TypeAdapter(ProviderConfig)
)


def builtin_config_types() -> dict[str, type[BaseProviderConfig]]:
    """The built-in config models by provider name, read off the `ProviderConfig` union."""
    union = get_args(ProviderConfig)[0]
    return {model.model_fields["type"].default: model for model in get_args(union)}


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def provider_names() -> list[str]:
    """Names of every provider: the built-in ones and those registered by entry point."""
    return sorted({*builtin_config_types(), *_entry_points()})


def config_type(name: str) -> type[BaseProviderConfig]:
    """The config model of the provider called ``name``.

    Built-in providers come first; any other name is looked up in the ``sandbay.providers``
    entry-point group, whose entry point names the config model.

    Raises:
        ConfigError: No provider has that name, or its entry point does not load a config
            model for it.
    """
    builtin = builtin_config_types()
    if name in builtin:
        return builtin[name]
    entry = _entry_points().get(name)
    if entry is None:
        raise ConfigError(
            f"unknown provider {name!r}; valid providers: {', '.join(provider_names())}"
        )
    try:
        model = entry.load()
    except Exception as exc:  # a broken plugin: say which, whatever it raised
        raise ConfigError(
            f"the {name!r} provider's entry point {entry.value!r} failed to load: {exc}"
        ) from exc
    if not (
        isinstance(model, type)
        and issubclass(model, BaseProviderConfig)
        and model.model_fields["type"].default == name
        and isinstance(getattr(model, "provider_class", None), str)
    ):
        raise ConfigError(
            f"the {name!r} provider's entry point {entry.value!r} must name a "
            f"BaseProviderConfig subclass whose type defaults to {name!r} and which sets "
            "provider_class"
        )
    return model


def config_from_data(data: Mapping[str, Any]) -> BaseProviderConfig:
    """Validate one provider's config (a ``[provider]`` table); ``type`` selects the model.

    Raises:
        ConfigError: Unknown provider (the message lists the valid ones).
        ValidationError: A field is invalid.
    """
    config: BaseProviderConfig = _validate_provider(dict(data), None)
    return config


def _validate_provider(value: Any, handler: ValidatorFunctionWrapHandler | None) -> Any:
    if isinstance(value, BaseProviderConfig):
        return value
    kind = value.get("type") if isinstance(value, Mapping) else None
    if isinstance(kind, str) and kind not in builtin_config_types():
        return config_type(kind).model_validate(value)
    return _BUILTIN.validate_python(value)


class SandbayConfig(_Base):
    """A whole config file: the provider and the defaults for every sandbox."""

    # SerializeAsAny: dumped as the config it is, not as the base class's lone ``type``.
    provider: Annotated[SerializeAsAny[BaseProviderConfig], WrapValidator(_validate_provider)] = (
        Field(default_factory=LocalConfig)
    )
    """Which provider, and its settings: a built-in `ProviderConfig`, or the config model a
    ``sandbay.providers`` entry point registers for ``type``."""
    spec: SandboxSpec = Field(default_factory=SandboxSpec)
    """Defaults for the sandboxes sandbay opens."""


def load_config(path: str | os.PathLike[str] | None = None) -> SandbayConfig:
    """Load the config from a file, the environment, or the defaults.

    Looks in ``path``, else ``$SANDBAY_CONFIG``, else ``./sandbay.toml``, else uses defaults
    (the local provider). ``SANDBAY_PROVIDER`` then overrides the provider's type.

    Raises:
        ConfigError: The file is missing, is not TOML, or has an invalid field; the message
            names the file and the field.
    """
    source = config_source(path)
    data: dict[str, Any] = {}
    where = "defaults"
    if source is not None:
        if not source.is_file():
            raise ConfigError(f"config file {str(source)!r} does not exist")
        data, where = _read_toml(source), str(source)
    override = os.environ.get("SANDBAY_PROVIDER")
    if override:
        data = _with_provider(data, override, where="SANDBAY_PROVIDER")
    return parse_config(data, where=where)


def config_source(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file `load_config` reads: ``path``, ``$SANDBAY_CONFIG``, ``./sandbay.toml``.

    ``None`` when none is named and ``./sandbay.toml`` does not exist (the defaults apply).
    A named file is returned whether or not it exists; `load_config` reports a missing one.
    """
    named = path or os.environ.get("SANDBAY_CONFIG")
    if named:
        return Path(named)
    if Path(CONFIG_FILE).is_file():
        return Path(CONFIG_FILE)
    return None


def parse_config(data: dict[str, Any], *, where: str = "config") -> SandbayConfig:
    """Validate a config mapping; errors name each bad field and ``where`` it came from."""
    kind = data.get("provider", {}).get("type") if isinstance(data.get("provider"), dict) else None
    if isinstance(kind, str) and kind not in builtin_config_types():
        try:
            config_type(kind)
        except ConfigError as exc:
            detail = exc.message.replace(
                f"provider {kind!r};", f"provider {kind!r} in provider.type;"
            )
            raise ConfigError(f"{where}: {detail}") from None
    try:
        return SandbayConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{where}: invalid config: {problems}") from None


def provider_config(
    provider: str | BaseProviderConfig | SandbayConfig | None,
) -> BaseProviderConfig:
    """Turn a provider name, a config object or ``None`` (config file / env) into a config."""
    if provider is None:
        return load_config().provider
    if isinstance(provider, str):
        data = _with_provider({}, provider, where="provider")
        return parse_config(data, where="provider").provider
    if isinstance(provider, SandbayConfig):
        return provider.provider
    return provider


def _with_provider(data: dict[str, Any], name: str, *, where: str) -> dict[str, Any]:
    if name not in builtin_config_types() and name not in _entry_points():
        raise ConfigError(
            f"{where}: unknown provider {name!r}; valid providers: {', '.join(provider_names())}"
        )
    current = dict(data.get("provider") or {})
    if current.get("type", "local") != name:
        current = {"type": name}  # the other type's fields do not apply
    current["type"] = name
    return {**data, "provider": current}


def _read_toml(file: Path) -> dict[str, Any]:
    try:
        with file.open("rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
            return data
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: not valid TOML: {exc}") from None
