"""Shared fixtures. Docker tests are required in CI (SANDBAY_REQUIRE_DOCKER=1): there a missing
engine fails the run instead of skipping."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"
