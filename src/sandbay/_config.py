"""Configuration: one frozen model per provider, joined in an explicit discriminated union.

A config file (``sandbay.toml``, or any file given with ``--config``) looks like::

    [provider]
    type = "docker"          # the one line that picks the provider
    image = "sandbay-agent:latest"

    [spec]                   # defaults for every sandbox (a SandboxSpec)
    memory_mb = 2048

``SANDBAY_PROVIDER`` overrides the provider's type; the other fields of ``[provider]`` then
apply only if they belong to the new type.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._errors import ConfigError
from ._sandbox import SandboxSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

__all__ = ["DockerConfig", "LocalConfig", "ProviderConfig", "SandbayConfig", "load_config"]

CONFIG_FILE = "sandbay.toml"


class _Base(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LocalConfig(_Base):
    """The embedded default: processes on this machine in a private working directory."""

    type: Literal["local"] = "local"
    """Selects this provider."""
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


class DockerConfig(_Base):
    """Containers on a Docker engine, through the ``docker`` SDK."""

    type: Literal["docker"] = "docker"
    """Selects this provider."""
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


ProviderConfig = Annotated[LocalConfig | DockerConfig, Field(discriminator="type")]
"""Any provider's config; ``type`` selects which."""


class SandbayConfig(_Base):
    """A whole config file: the provider and the defaults for every sandbox."""

    provider: ProviderConfig = Field(default_factory=LocalConfig)
    """Which provider, and its settings."""
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
    from ._provider import provider_names

    kind = data.get("provider", {}).get("type") if isinstance(data.get("provider"), dict) else None
    if kind is not None and kind not in provider_names():
        raise ConfigError(
            f"{where}: unknown provider {kind!r} in provider.type; "
            f"valid providers: {', '.join(provider_names())}"
        )
    try:
        return SandbayConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{where}: invalid config: {problems}") from None


def provider_config(provider: str | ProviderConfig | SandbayConfig | None) -> ProviderConfig:
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
    from ._provider import provider_names

    if name not in provider_names():
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
