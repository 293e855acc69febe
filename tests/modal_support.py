"""What the modal provider's tests share: the agent image and a config for a fake."""

from __future__ import annotations

import functools
from typing import Any

import anyio
from pydantic import SecretStr

from fakes.modal import FakeModal
from sandbay import ModalConfig


@functools.cache
def agent_image() -> str:
    """sandbay's agent image on the local engine (built if missing), for the fake's sandboxes."""
    import docker

    from sandbay.providers.docker._image import ensure_agent_image

    return anyio.run(ensure_agent_image, docker.from_env)


def fake_config(fake: FakeModal, **changes: Any) -> ModalConfig:
    """A modal provider config for the fake: its URL, a throwaway token, nothing else."""
    return ModalConfig(
        server_url=fake.url,
        token_id=SecretStr("ak-fake"),
        token_secret=SecretStr("as-fake"),
        host_network=True,
        **changes,
    )
