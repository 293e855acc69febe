"""Docker errors and the client: SDK and ``requests`` exceptions to sandbay's error tree.

`map_docker_error` picks the most specific sandbay error for an exception of the SDK (or of
``requests`` beneath it); `docker_errors` applies it to a block; `docker_client` connects.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

import docker
import docker.errors
import requests.exceptions

from ..._config import DockerConfig
from ..._errors import (
    ConfigError,
    ImageError,
    ProviderUnavailableError,
    SandboxError,
    SandboxNotFoundError,
)

NAME = "docker"
DEFAULT_SOCKET = "unix:///var/run/docker.sock"


def _address(base_url: str | None) -> str:
    return base_url or os.environ.get("DOCKER_HOST") or DEFAULT_SOCKET


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def map_docker_error(
    exc: BaseException,
    *,
    base_url: str | None = None,
    sandbox_id: str | None = None,
    image: str | None = None,
) -> SandboxError:
    """Turn an exception of the docker SDK or of requests into the matching sandbay error.

    Args:
        exc: What the SDK raised.
        base_url: The engine address, for messages.
        sandbox_id: The container involved, if any.
        image: The image involved, if any.
    """
    where = _address(base_url)
    ctx = {"provider": NAME, "sandbox_id": sandbox_id}
    chain = list(_chain(exc))
    if any(isinstance(e, PermissionError) for e in chain):
        return ProviderUnavailableError(
            f"permission denied on the Docker socket {where}: add your user to the docker group "
            "(`sudo usermod -aG docker $USER`, then log in again) or run as root",
            **ctx,
        )
    if any(isinstance(e, requests.exceptions.Timeout) for e in chain):
        return ProviderUnavailableError(
            f"the Docker daemon at {where} did not answer in time; check `docker info`", **ctx
        )
    if any(
        isinstance(e, (requests.exceptions.ConnectionError, ConnectionError, FileNotFoundError))
        for e in chain
    ):
        return ProviderUnavailableError(
            f"cannot reach the Docker daemon at {where}: is it running? "
            "start it: `sudo dockerd &` or `sudo systemctl start docker`",
            **ctx,
        )
    if isinstance(exc, docker.errors.ImageNotFound) or (
        isinstance(exc, docker.errors.NotFound) and "no such image" in _explain(exc).lower()
    ):
        return ImageError(
            f"image {image or ''!r} is not on the Docker engine and sandbay never pulls: build "
            "the agent image with `sandbay image build`, or `docker pull` the image yourself",
            **ctx,
        )
    if isinstance(exc, docker.errors.APIError):
        explanation = _explain(exc)
        lowered = explanation.lower()
        if isinstance(exc, docker.errors.NotFound) and (
            "no such container" in lowered or "no such exec" in lowered
        ):
            return SandboxNotFoundError(f"the container no longer exists ({explanation})", **ctx)
        if "is not running" in lowered or "is paused" in lowered or "is restarting" in lowered:
            return SandboxNotFoundError(
                "the container is not running any more (its lease ran out, or it was "
                f"stopped); open a new sandbox ({explanation})",
                **ctx,
            )
        if "unable to find user" in lowered or "no matching entries in passwd" in lowered:
            return ConfigError(f"the user does not exist in the image: {explanation}", **ctx)
        if "runtime" in lowered and ("unknown" in lowered or "invalid" in lowered):
            return ConfigError(f"the engine does not know this OCI runtime: {explanation}", **ctx)
        if exc.status_code == 400:
            return ConfigError(f"Docker rejected the request: {explanation}", **ctx)
        return SandboxError(f"Docker API error: {explanation}", **ctx)
    return SandboxError(f"Docker SDK error: {exc}", **ctx)


def _container_gone(exc: BaseException) -> bool:
    return "no such container" in _explain(exc).lower()


def _explain(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc)


@contextlib.contextmanager
def docker_errors(
    *, base_url: str | None = None, sandbox_id: str | None = None, image: str | None = None
) -> Iterator[None]:
    """Re-raise docker SDK and requests exceptions as sandbay errors (`map_docker_error`)."""
    try:
        yield
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise map_docker_error(exc, base_url=base_url, sandbox_id=sandbox_id, image=image) from exc


def docker_client(config: DockerConfig) -> Any:
    """A ``docker.DockerClient`` for the config's engine. Blocking: asks the engine its version.

    Raises:
        ProviderUnavailableError: The engine's unix socket is missing or refuses connections.
        docker.errors.DockerException: Wrap the call in `docker_errors`.
    """
    address = _address(config.base_url)
    if address.startswith(("unix://", "http+unix://")):
        _check_socket(address)
    if config.base_url:
        return docker.DockerClient(base_url=config.base_url, max_pool_size=32)
    return docker.from_env(max_pool_size=32)


def _check_socket(address: str) -> None:
    # The SDK leaks its socket when a unix connect fails (a ResourceWarning later); trying
    # the socket first gives the same answer with the socket closed.
    path = "/" + address.split("://", 1)[1].lstrip("/")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(10)
        try:
            probe.connect(path)
        except OSError as exc:
            raise map_docker_error(exc, base_url=address) from exc
