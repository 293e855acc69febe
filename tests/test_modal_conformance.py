"""The provider conformance suite on the modal provider, against the local fake control plane.

The real ``modal`` SDK talks gRPC to `fakes.modal.FakeModal` on 127.0.0.1, whose sandboxes
are Docker containers of sandbay's agent image: every check runs real processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sandbay import ModalConfig, SandboxSpec
from sandbay.testing.conformance import check_names, run_check

pytest.importorskip("modal")

from fakes.modal import FakeModal
from modal_support import agent_image, fake_config

pytestmark = [pytest.mark.anyio, pytest.mark.docker]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeModal]:
    with FakeModal(agent_image()) as running:
        yield running


@pytest.fixture(scope="module")
def config(fake: FakeModal) -> ModalConfig:
    return fake_config(fake)


@pytest.mark.parametrize("check", check_names())
async def test_conformance(config: ModalConfig, check: str) -> None:
    await run_check(check, config, spec=SandboxSpec(network="none"))
