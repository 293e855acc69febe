"""`AsyncDaytona` clients made from sandbay's config and nothing else.

The SDK reads ``DAYTONA_*`` values from the process environment and from ``.env`` and
``.env.local`` in the working directory (API key, organisation, target, polling mode,
tracing), and warns on every construction when such a file names another API URL. A file in
the user's working directory must not choose the account, organisation, region or endpoint,
nor print warnings: while a client is constructed (synchronously, under a lock), the SDK's
environment reader is replaced by one that knows no values, so every setting comes from
`sandbay.DaytonaConfig`.

Each client's two REST clients (the API's and the toolbox's) would also each build a default
TLS context, loading the system's CA certificates: tens of milliseconds per sandbox created.
While a client is constructed they share one such context instead, made once per process
(sandbay never gives them a CA file, client certificate or unverified TLS).
"""

from __future__ import annotations

import ssl
import threading
from typing import Any

import anyio
import daytona._async.daytona as _sdk_module
import daytona_api_client_async.rest as _api_rest
import daytona_toolbox_api_client_async.rest as _toolbox_rest
from daytona import AsyncDaytona
from daytona import DaytonaConfig as SdkConfig

from ..._config import DaytonaConfig
from ..._errors import ConfigError

_lock = threading.Lock()


class _NoEnvironment:
    """Stands in for the SDK's ``DaytonaEnvReader``: no variable is ever set."""

    def get(self, name: str) -> str | None:
        return None

    def get_from_process_env(self, name: str) -> str | None:
        return None

    def get_from_file(self, name: str) -> str | None:
        return None


class _SharedTls:
    """Stands in for the ``ssl`` module of the SDK's REST clients while one is made: a default
    context (no CA file or data) is made once and shared; anything else is ``ssl``'s own."""

    def __init__(self) -> None:
        self.context: ssl.SSLContext | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(ssl, name)

    def create_default_context(self, **options: Any) -> ssl.SSLContext:
        if any(value is not None for value in options.values()):
            return ssl.create_default_context(**options)
        if self.context is None:
            self.context = ssl.create_default_context()
        return self.context


_shared_tls = _SharedTls()


def make_client(config: DaytonaConfig) -> AsyncDaytona:
    """A new client for ``config``: no I/O until first used. Close it with ``close()``.

    Raises:
        ConfigError: No API key (set ``DAYTONA_API_KEY`` or the config's ``api_key``).
    """
    if config.api_key is None or not config.api_key.get_secret_value():
        raise ConfigError(
            "the daytona provider needs an API key: set DAYTONA_API_KEY, or api_key in "
            "[provider] of the config file",
            provider="daytona",
        )
    sdk_config = SdkConfig(
        api_key=config.api_key.get_secret_value(),
        api_url=config.api_url,
        target=config.target,
    )
    with _lock:
        original: Any = getattr(_sdk_module, "DaytonaEnvReader")  # noqa: B009 - not exported
        setattr(_sdk_module, "DaytonaEnvReader", _NoEnvironment)  # noqa: B010
        for rest in (_api_rest, _toolbox_rest):
            setattr(rest, "ssl", _shared_tls)  # noqa: B010
        try:
            return AsyncDaytona(sdk_config)
        finally:
            setattr(_sdk_module, "DaytonaEnvReader", original)  # noqa: B010
            for rest in (_api_rest, _toolbox_rest):
                setattr(rest, "ssl", ssl)  # noqa: B010


async def close_client(client: AsyncDaytona) -> None:
    """Close a client's HTTP session, shielded and bounded (it may run on cancellation)."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(10):
        await client.close()  # type: ignore[no-untyped-call]
