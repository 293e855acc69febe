"""Opening sandboxes: provider lookup, sandbay's labels, and the context manager."""

from __future__ import annotations

from types import TracebackType

from ._config import ProviderConfig, SandbayConfig, load_config, provider_config
from ._provider import Provider, make_provider, managed_labels
from ._sandbox import Sandbox, SandboxSpec

__all__ = ["create_sandbox", "get_provider", "open_sandbox"]

_providers: dict[str, Provider] = {}


def get_provider(provider: str | ProviderConfig | SandbayConfig | None = None) -> Provider:
    """The `Provider` for a name, a config, or (``None``) the config file and environment.

    Instances are shared per distinct config, so clients are not rebuilt for every sandbox.

    Raises:
        ConfigError: Unknown provider or invalid config.
        MissingDependencyError: The provider's SDK is not installed.
    """
    config = provider_config(provider)
    key = config.model_dump_json()
    found = _providers.get(key)
    if found is None:
        found = _providers[key] = make_provider(config)
    return found


async def create_sandbox(
    provider: str | ProviderConfig | SandbayConfig | None = None,
    spec: SandboxSpec | None = None,
    *,
    session: str | None = None,
) -> Sandbox:
    """Provision a sandbox; the caller must `Sandbox.aclose` it (prefer `open_sandbox`).

    Args:
        provider: A provider name, a config, or ``None`` for the config file / environment.
        spec: What to provision. Default: the ``[spec]`` of the config file when ``provider``
            is ``None`` (``$SANDBAY_CONFIG`` or ``./sandbay.toml``), or of the
            `SandbayConfig` given; `SandboxSpec()` for a provider name or a provider config.
            A spec given here replaces the config's whole ``[spec]``.
        session: Value of the ``sandbay.session`` label; default a new random id.

    Raises:
        ConfigError: Unknown provider, invalid config, a missing config file, or a spec the
            provider cannot honour.
        MissingDependencyError: The provider's SDK is not installed.
        ProviderUnavailableError: The provider cannot be reached.
    """
    if provider is None:
        provider = load_config()  # read once: the provider and the spec come from the same file
    if spec is None:
        spec = provider.spec if isinstance(provider, SandbayConfig) else SandboxSpec()
    labelled = spec.model_copy(update={"labels": managed_labels(spec, session=session)})
    return await get_provider(provider).create(labelled)


class open_sandbox:
    """Provision a sandbox for the body of an ``async with`` block; remove it on exit.

    ``async with sandbay.open_sandbox("docker", SandboxSpec(cpu=1)) as sb: ...``

    The sandbox is removed however the block ends: normally, by an exception, or by
    cancellation. Arguments are those of `create_sandbox`.
    """

    def __init__(
        self,
        provider: str | ProviderConfig | SandbayConfig | None = None,
        spec: SandboxSpec | None = None,
        *,
        session: str | None = None,
    ) -> None:
        self._args = (provider, spec, session)
        self._sandbox: Sandbox | None = None

    async def __aenter__(self) -> Sandbox:
        provider, spec, session = self._args
        self._sandbox = await create_sandbox(provider, spec, session=session)
        return self._sandbox

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sandbox is not None:
            await self._sandbox.aclose()
