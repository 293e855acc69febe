"""Shared fixtures and the Docker gate.

Tests marked ``docker`` need a running engine. Locally they skip without one; with
``SANDBAY_REQUIRE_DOCKER=1`` (CI) they fail instead, so a broken engine never passes silently.
"""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator

import pytest

from sandbay import Sandbox
from sandbox_kinds import open_kind


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def sandbox(request: pytest.FixtureRequest) -> AsyncIterator[Sandbox]:
    """An open sandbox of the kind the test is parametrised with (``indirect=True``, one of
    `sandbox_kinds.KINDS`), ``local`` by default. Modules may define their own."""
    async with open_kind(getattr(request, "param", "local")) as sb:
        yield sb


@functools.cache
def docker_problem() -> str | None:
    """Why Docker tests cannot run here, or None."""
    try:
        import docker
    except ImportError:
        return 'the docker SDK is not installed (pip install "sandbay[docker]")'
    try:
        client = docker.from_env(timeout=5)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as exc:  # any failure means: no usable engine
        return f"no Docker engine reachable: {exc}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    required = os.environ.get("SANDBAY_REQUIRE_DOCKER") == "1"
    for item in items:
        if "docker" not in item.keywords:
            continue
        problem = docker_problem()
        if problem is None:
            continue
        if required:
            item.add_marker(pytest.mark.usefixtures("_docker_required"))
        else:
            item.add_marker(pytest.mark.skip(reason=problem))


@pytest.fixture
def _docker_required() -> None:
    pytest.fail(f"SANDBAY_REQUIRE_DOCKER=1 but {docker_problem()}")
