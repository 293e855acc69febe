"""Modal errors and the client: the SDK's exceptions to sandbay's error tree, in one place.

`map_modal_error` picks the most specific sandbay error for an exception of the ``modal`` SDK
(or of grpclib and the network beneath it); `modal_errors` applies it to a block;
`open_client` makes the provider's own client from its config.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import grpclib
import grpclib.exceptions
import modal
import modal.exception
from modal_proto import api_pb2

from ..._config import ModalConfig
from ..._errors import (
    ConfigError,
    ImageError,
    ProviderUnavailableError,
    SandboxError,
    SandboxNotFoundError,
    SandboxTimeoutError,
)

NAME = "modal"

_UNAVAILABLE = (
    grpclib.Status.UNAVAILABLE,
    grpclib.Status.DEADLINE_EXCEEDED,
    grpclib.Status.CANCELLED,
    grpclib.Status.UNKNOWN,
    grpclib.Status.INTERNAL,
)


def map_modal_error(
    exc: BaseException, *, server_url: str | None = None, sandbox_id: str | None = None
) -> SandboxError:
    """Turn an exception of the modal SDK (or grpclib, or the network) into a sandbay error.

    Args:
        exc: What the SDK raised.
        server_url: The control plane's URL, for messages.
        sandbox_id: The sandbox involved, if any.
    """
    where = server_url or "Modal"
    ctx: dict[str, Any] = {"provider": NAME, "sandbox_id": sandbox_id}
    text = str(exc) or type(exc).__name__
    err = modal.exception
    if isinstance(exc, (err.AuthError, err.PermissionDeniedError)):
        return ProviderUnavailableError(
            f"Modal at {where} refused the credentials ({text}): set token_id and token_secret "
            "in the modal provider's config (or MODAL_TOKEN_ID / MODAL_TOKEN_SECRET); "
            "`modal token new` makes a token",
            **ctx,
        )
    if isinstance(exc, (err.SandboxTerminatedError, err.SandboxTimeoutError)):
        return SandboxNotFoundError(
            f"the Modal sandbox has finished (terminated, or its lifetime ran out): {text}", **ctx
        )
    if isinstance(exc, err.NotFoundError) or (
        isinstance(exc, err.ConflictError) and "finished" in text.lower()
    ):
        return SandboxNotFoundError(f"no such Modal sandbox (removed, or finished): {text}", **ctx)
    if isinstance(exc, err.ExecTimeoutError):
        return SandboxTimeoutError(f"a Modal exec ran out of time: {text}", **ctx)
    if isinstance(exc, (err.ImageBuildError, err.RemoteError)):
        return ImageError(f"Modal could not build the sandbox's image: {text}", **ctx)
    if isinstance(exc, err.InvalidError):
        return ConfigError(f"Modal rejected the request: {text}", **ctx)
    if isinstance(exc, err.ResourceExhaustedError):
        return ProviderUnavailableError(
            f"Modal is out of capacity or over a quota for this workspace: {text}", **ctx
        )
    # The SDK's own errors subclass GRPCError for now, and warn when its status is read.
    status = (
        None
        if isinstance(exc, modal.exception.Error) or not isinstance(exc, grpclib.GRPCError)
        else exc.status
    )
    if status == grpclib.Status.UNAUTHENTICATED:
        return ProviderUnavailableError(f"Modal at {where} refused the request: {text}", **ctx)
    if isinstance(
        exc,
        (
            err.ConnectionError,
            err.ServiceError,
            err.InternalError,
            err.ClientClosed,
            grpclib.exceptions.StreamTerminatedError,
            ConnectionError,
            OSError,
            TimeoutError,
        ),
    ) or (isinstance(exc, grpclib.GRPCError) and exc.status in _UNAVAILABLE):
        return ProviderUnavailableError(
            f"cannot reach Modal at {where} ({text}); check the network (and a proxy: "
            "HTTPS_PROXY needs `modal[api-proxy-support]`, MODAL_DISABLE_API_PROXY=1 goes "
            "direct), or https://status.modal.com",
            **ctx,
        )
    return SandboxError(f"Modal error: {text}", **ctx)


#: What `modal_errors` converts: everything the SDK and its transport raise.
CONVERTED: tuple[type[BaseException], ...] = (
    modal.exception.Error,
    grpclib.GRPCError,
    grpclib.exceptions.StreamTerminatedError,
    OSError,
    TimeoutError,
)


@contextlib.contextmanager
def modal_errors(*, server_url: str | None = None, sandbox_id: str | None = None) -> Iterator[None]:
    """Re-raise the SDK's exceptions as sandbay errors (`map_modal_error`); sandbay's pass."""
    try:
        yield
    except SandboxError:
        raise
    except CONVERTED as exc:
        raise map_modal_error(exc, server_url=server_url, sandbox_id=sandbox_id) from exc


async def open_client(config: ModalConfig) -> Any:
    """A connected ``modal.Client`` made from the config alone; the caller closes it.

    The token comes from the config (whose defaults read ``MODAL_TOKEN_ID`` and
    ``MODAL_TOKEN_SECRET``); only with ``use_modal_config`` does Modal's own config
    (``~/.modal.toml``, its active profile) fill in what the config leaves unset.

    Raises:
        ConfigError: No token is configured.
    """
    token_id = config.token_id.get_secret_value() if config.token_id else None
    token_secret = config.token_secret.get_secret_value() if config.token_secret else None
    server_url = config.server_url
    if config.use_modal_config:
        from modal.config import config as modal_config

        token_id = token_id or modal_config.get("token_id")
        token_secret = token_secret or modal_config.get("token_secret")
        server_url = server_url or modal_config.get("server_url")
    if not token_id or not token_secret:
        raise ConfigError(
            "the modal provider needs a Modal token: set MODAL_TOKEN_ID and "
            "MODAL_TOKEN_SECRET (or token_id / token_secret in [provider]), or "
            "use_modal_config = true to use the profile `modal token new` wrote",
            provider=NAME,
        )
    client: Any = modal.Client(
        server_url or "https://api.modal.com",
        api_pb2.CLIENT_TYPE_CLIENT,
        (token_id, token_secret),
    )
    with modal_errors(server_url=server_url):
        await client.__aenter__()
    return client
