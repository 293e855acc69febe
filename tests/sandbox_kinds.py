"""The three kinds of sandbox most tests run on: unisolated local, local under bubblewrap, and
docker. A test takes the ``sandbox`` fixture (conftest.py) and is parametrised with `KINDS`
(``indirect=True``), or opens one itself with `open_kind`."""

from __future__ import annotations

import shutil
from contextlib import AbstractAsyncContextManager
from typing import Literal

import pytest

import sandbay
from sandbay import Sandbox, SandboxSpec

KINDS = [
    pytest.param("local", id="local"),
    pytest.param("bwrap", id="bwrap", marks=pytest.mark.bwrap),
    pytest.param("docker", id="docker", marks=pytest.mark.docker),
]


def open_kind(
    kind: str, *, network: Literal["default", "none", "host"] = "host"
) -> AbstractAsyncContextManager[Sandbox]:
    """Open a sandbox of ``kind`` (skipping the test where bubblewrap is missing)."""
    if kind == "bwrap" and not shutil.which("bwrap"):
        pytest.skip("bubblewrap is not installed")
    provider: sandbay.BaseProviderConfig = {
        "local": sandbay.LocalConfig(isolate=False),
        "bwrap": sandbay.LocalConfig(isolate=True),
        "docker": sandbay.DockerConfig(),
    }[kind]
    return sandbay.open_sandbox(provider, SandboxSpec(network=network))
