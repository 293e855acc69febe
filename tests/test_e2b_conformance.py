"""The shipped conformance suite on the e2b provider, against the local fake E2B.

The fake's sandboxes run under bubblewrap on this machine (``local``: fast) or as Docker
containers from the agent image (``docker``: the template as E2B would run it).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from e2b_fake import FakeE2B
from sandbay import SandboxSpec
from sandbay.testing.conformance import check_names, run_check

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.bwrap,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed"),
]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeE2B]:
    with FakeE2B() as running:
        yield running


@pytest.mark.parametrize("check", check_names())
async def test_conformance_e2b(fake: FakeE2B, check: str) -> None:
    await run_check(check, fake.config(), spec=SandboxSpec())
