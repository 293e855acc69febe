"""Every error the ``daytona`` SDK (and aiohttp beneath it) raises, as sandbay's: one place."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import aiohttp
from daytona import (
    DaytonaAuthenticationError,
    DaytonaError,
    DaytonaNotFoundError,
    DaytonaRateLimitError,
    DaytonaTimeoutError,
)
from daytona.common.errors import (
    DaytonaBadRequestError,
    DaytonaConnectionError,
    DaytonaForbiddenError,
)

from ..._errors import (
    ConfigError,
    ProviderUnavailableError,
    SandboxError,
    SandboxNotFoundError,
    SandboxTimeoutError,
)

NAME = "daytona"


def convert(exc: BaseException, *, sandbox_id: str | None = None, doing: str) -> SandboxError:
    """The sandbay error for an SDK (or transport) error raised while ``doing`` something."""
    where = {"provider": NAME, "sandbox_id": sandbox_id}
    text = f"{doing}: {exc}"
    if isinstance(exc, DaytonaNotFoundError):
        return SandboxNotFoundError(f"{doing}: no such sandbox (removed, or never made)", **where)
    if isinstance(exc, (DaytonaAuthenticationError, DaytonaForbiddenError)):
        return ConfigError(
            f"{text}; check the api_key of the daytona provider (DAYTONA_API_KEY)", **where
        )
    if isinstance(exc, DaytonaBadRequestError):
        return ConfigError(text, **where)
    if isinstance(exc, (DaytonaConnectionError, aiohttp.ClientError, OSError)):
        return ProviderUnavailableError(
            f"{text}; check the daytona provider's api_url and your network", **where
        )
    if isinstance(exc, DaytonaTimeoutError):
        return SandboxTimeoutError(text, **where)
    if isinstance(exc, DaytonaRateLimitError):
        return ProviderUnavailableError(f"{text}; Daytona is rate limiting: retry later", **where)
    status = getattr(exc, "status_code", None)
    if isinstance(exc, DaytonaError) and (status is None or status >= 500):
        return ProviderUnavailableError(f"{text}; Daytona failed, retry later", **where)
    return SandboxError(text, **where)


@contextlib.contextmanager
def daytona_errors(doing: str, *, sandbox_id: str | None = None) -> Iterator[None]:
    """Raise sandbay's error for any SDK error inside the block."""
    try:
        yield
    except (DaytonaError, aiohttp.ClientError, OSError) as exc:
        raise convert(exc, sandbox_id=sandbox_id, doing=doing) from exc
