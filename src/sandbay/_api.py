"""Opening sandboxes: who owns the providers, sandbay's labels, and the context managers.

Providers hold SDK clients, so something must close them. An application that opens and
closes (a service's startup and shutdown) owns them through `Providers`::

    async with sandbay.Providers() as providers:
        async with providers.open_sandbox("docker") as sb:
            ...

The module-level functions (`open_sandbox`, `create_sandbox`, `connect_sandbox`,
`get_provider`) use one process-wide `Providers`, made on first use and closed when the
interpreter exits. Either way a provider is shared only by configs that are equal, secrets
included (never by configs that merely serialise alike), and no provider binds a client to
an event loop (see `Provider`), so the process-wide one serves every ``anyio.run``.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from collections.abc import Generator
from types import TracebackType
from typing import Any

import anyio
from typing_extensions import Self

from ._config import BaseProviderConfig, SandbayConfig, load_config, provider_config
from ._errors import ConfigError
from ._provider import Provider, make_provider, managed_labels
from ._sandbox import CLOSE_TIMEOUT, Sandbox, SandboxSpec

__all__ = [
    "Providers",
    "connect_sandbox",
    "create_sandbox",
    "get_provider",
    "open_sandbox",
]

ProviderArg = str | BaseProviderConfig | SandbayConfig | None


class Providers:
    """Owns provider instances: makes one per distinct config and closes them all on exit.

    ``async with sandbay.Providers() as providers`` (or `aclose` yourself, e.g. from a
    service's shutdown hook: it need not be the task that made them). Configs that are equal
    (``==``, secrets compared by value) share one provider; two tenants' configs that differ
    only in a ``SecretStr`` get one each. Nothing here is bound to an event loop.

    Sandboxes opened through it stay the caller's to close; closing `Providers` closes the
    providers' clients, not the sandboxes.
    """

    def __init__(self) -> None:
        self._made: list[tuple[BaseProviderConfig, Provider]] = []
        self._lock = threading.Lock()  # `get` may be called from worker threads too
        self._closed = False

    def get(self, provider: ProviderArg = None) -> Provider:
        """The `Provider` for a name, a config, or (``None``) the config file and environment.

        Raises:
            ConfigError: Unknown provider, invalid config, or `Providers` is closed.
            MissingDependencyError: The provider's SDK is not installed.
        """
        config = provider_config(provider)
        with self._lock:
            if self._closed:
                raise ConfigError("these Providers are closed; open a new sandbay.Providers()")
            for known, made in self._made:
                if type(known) is type(config) and known == config:
                    return made
            made = make_provider(config)
            self._made.append((config, made))
            return made

    async def create_sandbox(
        self,
        provider: ProviderArg = None,
        spec: SandboxSpec | None = None,
        *,
        session: str | None = None,
    ) -> Sandbox:
        """Provision a sandbox; the caller must `Sandbox.aclose` it (see `create_sandbox`)."""
        if provider is None:
            provider = load_config()  # read once: the provider and the spec come from one file
        if spec is None:
            spec = provider.spec if isinstance(provider, SandbayConfig) else SandboxSpec()
        labelled = spec.model_copy(update={"labels": managed_labels(spec, session=session)})
        return await self.get(provider).create(labelled)

    def open_sandbox(
        self,
        provider: ProviderArg = None,
        spec: SandboxSpec | None = None,
        *,
        session: str | None = None,
    ) -> open_sandbox:
        """A sandbox for an ``async with`` block, removed on exit. See `sandbay.open_sandbox`."""
        return open_sandbox(provider, spec, session=session, providers=self)

    def connect_sandbox(self, provider: ProviderArg, sandbox_id: str) -> connect_sandbox:
        """Reattach to a sandbox by id. See `sandbay.connect_sandbox`."""
        return connect_sandbox(provider, sandbox_id, providers=self)

    async def aclose(self) -> None:
        """Close every provider made here (their SDK clients). Idempotent; bounded, shielded.

        Later `get` calls raise `ConfigError`.
        """
        with self._lock:
            self._closed = True
            made, self._made = self._made, []
        with anyio.CancelScope(shield=True):
            for _, provider in made:
                with anyio.move_on_after(CLOSE_TIMEOUT):
                    await provider.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __len__(self) -> int:
        return len(self._made)


_default: Providers | None = None
_default_lock = threading.Lock()


def default_providers() -> Providers:
    """The process-wide `Providers` the module-level functions use; closed at exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Providers()
            atexit.register(_close_default)
        return _default


def _close_default() -> None:
    global _default
    providers, _default = _default, None
    if providers is not None and len(providers):
        with contextlib.suppress(Exception):  # at exit, a client that will not close is let go
            anyio.run(providers.aclose)


def get_provider(provider: ProviderArg = None) -> Provider:
    """The `Provider` for a name, a config, or (``None``) the config file and environment.

    It belongs to the process-wide `Providers` (closed at exit): equal configs share one,
    so clients are not rebuilt for every sandbox. An application that wants to close its
    providers itself uses its own `Providers`.

    Raises:
        ConfigError: Unknown provider or invalid config.
        MissingDependencyError: The provider's SDK is not installed.
    """
    return default_providers().get(provider)


async def create_sandbox(
    provider: ProviderArg = None,
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
    return await default_providers().create_sandbox(provider, spec, session=session)


class open_sandbox:
    """Provision a sandbox for the body of an ``async with`` block; remove it on exit.

    ``async with sandbay.open_sandbox("docker", SandboxSpec(cpu=1)) as sb: ...``

    The sandbox is removed however the block ends: normally, by an exception, or by
    cancellation. Arguments are those of `create_sandbox`; ``providers`` is the `Providers`
    that owns the provider (default: the process-wide one).
    """

    def __init__(
        self,
        provider: ProviderArg = None,
        spec: SandboxSpec | None = None,
        *,
        session: str | None = None,
        providers: Providers | None = None,
    ) -> None:
        self._args = (provider, spec, session)
        self._providers = providers
        self._sandbox: Sandbox | None = None

    async def __aenter__(self) -> Sandbox:
        provider, spec, session = self._args
        providers = self._providers or default_providers()
        self._sandbox = await providers.create_sandbox(provider, spec, session=session)
        return self._sandbox

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sandbox is not None:
            await self._sandbox.aclose()


class connect_sandbox:
    """Reattach to a sandbox by id, from any process: await it, or use it with ``async with``.

    ``sb = await sandbay.connect_sandbox("docker", sandbox_id)`` returns the sandbox; the
    caller now owns it (its `Sandbox.aclose` removes it). ``async with
    sandbay.connect_sandbox("docker", sandbox_id) as sb:`` removes it when the block ends,
    as `open_sandbox` does.

    Args:
        provider: A provider name, a config, or ``None`` for the config file / environment:
            the provider the sandbox was created on.
        sandbox_id: `Sandbox.id` of the sandbox.
        providers: The `Providers` that owns the provider; default the process-wide one.

    Raises:
        SandboxNotFoundError: No sandbox with this id on that provider (or it was removed).
        ConfigError: Unknown provider or invalid config.
        MissingDependencyError: The provider's SDK is not installed.
        ProviderUnavailableError: The provider cannot be reached.
    """

    def __init__(
        self,
        provider: ProviderArg,
        sandbox_id: str,
        *,
        providers: Providers | None = None,
    ) -> None:
        self._provider = provider
        self._sandbox_id = sandbox_id
        self._providers = providers
        self._sandbox: Sandbox | None = None

    async def _connect(self) -> Sandbox:
        providers = self._providers or default_providers()
        return await providers.get(self._provider).connect(self._sandbox_id)

    def __await__(self) -> Generator[Any, None, Sandbox]:
        return self._connect().__await__()

    async def __aenter__(self) -> Sandbox:
        self._sandbox = await self._connect()
        return self._sandbox

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sandbox is not None:
            await self._sandbox.aclose()
