"""`AsyncDaytona` clients made from sandbay's config and nothing else.

The SDK reads ``DAYTONA_*`` values from the process environment and from ``.env`` and
``.env.local`` in the working directory (API key, organisation, target, polling mode,
tracing), and warns on every construction when such a file names another API URL. A file in
the user's working directory must not choose the account, organisation, region or endpoint,
nor print warnings: while a client is constructed (synchronously, under a lock), the SDK's
environment reader is replaced by one that knows no values, so every setting comes from
`sandbay.DaytonaConfig`.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import daytona._async.daytona as _sdk_module
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
        try:
            return AsyncDaytona(sdk_config)
        finally:
            setattr(_sdk_module, "DaytonaEnvReader", original)  # noqa: B010


async def close_client(client: AsyncDaytona) -> None:
    """Close a client's HTTP session, shielded and bounded (it may run on cancellation)."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(10):
        await client.close()  # type: ignore[no-untyped-call]
