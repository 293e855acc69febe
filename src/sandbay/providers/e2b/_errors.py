"""E2B errors to sandbay's error tree, in one place.

`map_e2b_error` picks the most specific sandbay error for anything the ``e2b`` SDK raises
(its own exceptions, the Connect-RPC errors of envd, the transport's connection errors);
`e2b_errors` applies it to a block. `retryable` says which failures of a create are worth
another try (429 and 5xx answers, a connection that broke).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import e2b
import httpx
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from e2b.envd.rpc import handle_rpc_exception

from ..._errors import (
    ConfigError,
    ImageError,
    ProviderUnavailableError,
    SandboxError,
    SandboxNotFoundError,
    SandboxTimeoutError,
)

NAME = "e2b"

#: Statuses of a control-plane answer after which a create is tried again.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


def _status(exc: BaseException) -> int | None:
    if isinstance(exc, e2b.RateLimitException):
        return 429
    if isinstance(exc, e2b.exceptions.ServiceBusyException):
        return 503
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def _message(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__


def retryable(exc: BaseException) -> bool:
    """Whether a failed create may be tried again: E2B was busy, or the connection broke.

    The create may have landed all the same (a 5xx after the sandbox was made, an answer
    lost on the way back), so whoever retries must look for it first.
    """
    if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, e2b.TimeoutException):
        return True
    status = _status(exc)
    return status is not None and status in RETRY_STATUSES


def cancellation(exc: BaseException) -> BaseException | None:
    """The cancellation an SDK error stands for, if it is one.

    connectrpc turns a cancelled call into ``ConnectError(CANCELED)`` caused by the
    ``CancelledError``; that must travel on as the cancellation it is, never as an error.
    """
    cause = exc.__cause__
    if isinstance(exc, ConnectError) and isinstance(cause, BaseException):
        if not isinstance(cause, Exception):
            return cause
    return None


def map_e2b_error(
    exc: BaseException,
    *,
    sandbox_id: str | None = None,
    template: str | None = None,
    user: str | None = None,
) -> SandboxError:
    """Turn an exception of the e2b SDK (or of its transports) into a sandbay error.

    Args:
        exc: What the SDK raised.
        sandbox_id: The sandbox involved, if any.
        template: The template involved (a create), if any.
        user: The user a process was started as, if any.
    """
    if isinstance(exc, SandboxError):
        return exc
    if isinstance(exc, ConnectError):
        converted = handle_rpc_exception(exc)
        if isinstance(converted, Exception) and converted is not exc:
            return map_e2b_error(converted, sandbox_id=sandbox_id, template=template, user=user)
        if exc.code is Code.UNAUTHENTICATED and user is not None:
            return ConfigError(
                f"user {user!r} does not exist in the sandbox ({exc.message}); E2B templates "
                'have "user" and "root", or the users the template adds',
                provider=NAME,
                sandbox_id=sandbox_id,
            )
    ctx = {"provider": NAME, "sandbox_id": sandbox_id}
    text = _message(exc)
    if isinstance(exc, e2b.AuthenticationException):
        if user is not None:
            return ConfigError(
                f"user {user!r} does not exist in the sandbox ({text}); E2B templates have "
                '"user" and "root", or the users the template adds',
                **ctx,
            )
        return ConfigError(
            f"E2B refused the API key ({text}): set E2B_API_KEY (or api_key in the e2b "
            "provider's config) to a key from the E2B dashboard",
            **ctx,
        )
    if isinstance(exc, (e2b.SandboxNotFoundException, e2b.exceptions.SandboxNotRunningException)):
        return SandboxNotFoundError(
            f"the sandbox no longer exists (killed, or its timeout ran out): {text}", **ctx
        )
    if isinstance(exc, e2b.exceptions.SandboxUnreachableException):
        return ProviderUnavailableError(f"the sandbox cannot be reached: {text}", **ctx)
    status = _status(exc)
    if status == 429:
        return ProviderUnavailableError(
            f"E2B is rate limiting this account ({text}); lower the concurrency "
            "(SandboxPool size, sandbay bench --concurrency) or try again later",
            **ctx,
        )
    if status is not None and status >= 500:
        return ProviderUnavailableError(f"E2B answered {status}: {text}; try again later", **ctx)
    if isinstance(exc, e2b.NotFoundException) or status == 404:
        if template is not None and sandbox_id is None:
            return ImageError(
                f"E2B has no template {template!r} ({text}): build it with "
                "`sandbay image build --provider e2b`, or name one you have",
                **ctx,
            )
        return SandboxNotFoundError(f"not found on E2B: {text}", **ctx)
    if isinstance(exc, e2b.TemplateException):
        return ImageError(f"the template cannot be used: {text}", **ctx)
    if isinstance(exc, e2b.InvalidArgumentException) or status == 400:
        return ConfigError(f"E2B rejected the request: {text}", **ctx)
    if isinstance(exc, e2b.TimeoutException):
        return SandboxTimeoutError(f"E2B did not answer in time: {text}", **ctx)
    if isinstance(exc, (httpx.TransportError, ConnectionError, OSError)):
        return ProviderUnavailableError(
            f"cannot reach E2B ({text}): check the network, E2B's status page, and "
            "api_url/domain in the e2b provider's config",
            **ctx,
        )
    return SandboxError(f"E2B error: {text}", **ctx)


@contextlib.contextmanager
def e2b_errors(
    *, sandbox_id: str | None = None, template: str | None = None, user: str | None = None
) -> Iterator[None]:
    """Re-raise what the e2b SDK raises as sandbay errors (`map_e2b_error`)."""
    try:
        yield
    except SandboxError:
        raise
    except ConnectError as exc:
        cancelled = cancellation(exc)
        if cancelled is not None:
            raise cancelled from None
        raise map_e2b_error(exc, sandbox_id=sandbox_id, template=template, user=user) from exc
    except (e2b.SandboxException, e2b.AuthenticationException) as exc:
        raise map_e2b_error(exc, sandbox_id=sandbox_id, template=template, user=user) from exc
    except (httpx.TransportError, OSError) as exc:
        raise map_e2b_error(exc, sandbox_id=sandbox_id, template=template, user=user) from exc
    except Exception as exc:
        # The SDK raises bare Exceptions in places ("Command ended without an end event").
        if type(exc).__module__.startswith(("e2b", "connectrpc", "pyqwest", "httpx")):
            raise map_e2b_error(exc, sandbox_id=sandbox_id, template=template, user=user) from exc
        raise
