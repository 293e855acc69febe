"""The shipped conformance suite, one test per provider and check."""

from __future__ import annotations

import shutil

import pytest

from sandbay import DockerConfig, LocalConfig, SandboxSpec
from sandbay.testing.conformance import (
    CHECKS,
    CheckFailed,
    ConformanceReport,
    check_names,
    run_check,
    run_conformance,
)

pytestmark = pytest.mark.anyio

bwrap_missing = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed")

PROVIDERS = [
    pytest.param(LocalConfig(isolate=False), SandboxSpec(), id="local"),
    pytest.param(
        LocalConfig(isolate=True),
        SandboxSpec(),
        id="local-isolated",
        marks=[pytest.mark.bwrap, bwrap_missing],
    ),
    pytest.param(
        DockerConfig(), SandboxSpec(network="none"), id="docker", marks=pytest.mark.docker
    ),
]


@pytest.mark.parametrize("check", check_names())
@pytest.mark.parametrize(("provider", "spec"), PROVIDERS)
async def test_conformance(
    provider: LocalConfig | DockerConfig, spec: SandboxSpec, check: str
) -> None:
    await run_check(check, provider, spec=spec)


def test_suite_is_substantial() -> None:
    names = check_names()
    assert len(names) >= 30
    assert len(set(names)) == len(names)
    assert list(CHECKS) == names
    assert all(CHECKS[name].__doc__ for name in names), "every check explains itself"


async def test_run_conformance_reports_each_check() -> None:
    only = ["exit_codes", "missing_file_not_found", "labels_listed"]
    report = await run_conformance(LocalConfig(), only=only)
    assert isinstance(report, ConformanceReport)
    assert [r.name for r in report.results] == only
    assert report.ok, str(report)
    assert report.provider == "local"
    report.raise_for_failures()


async def test_run_conformance_reports_a_failure() -> None:
    # The local provider cannot cut the network off without isolation: every sandbox the
    # checks open fails to be created, and the report says so instead of raising.
    report = await run_conformance(
        LocalConfig(isolate=False), spec=SandboxSpec(network="none"), only=["exit_codes"]
    )
    assert not report.ok
    (failure,) = report.failures
    assert failure.name == "exit_codes"
    assert failure.error is not None and "ConfigError" in failure.error
    assert "0/1 conformance checks passed" in str(report)
    with pytest.raises(CheckFailed, match="exit_codes"):
        report.raise_for_failures()


async def test_unknown_check_names_are_rejected() -> None:
    from sandbay import ConfigError

    with pytest.raises(ConfigError, match="no_such_check"):
        await run_conformance("local", skip=["no_such_check"])
    with pytest.raises(ConfigError, match="no_such_check"):
        await run_check("no_such_check", "local")


async def test_check_timeout_is_a_failure() -> None:
    # exec_timeout_kills waits out a 0.5 s exec timeout, then one of at least 1 s.
    with pytest.raises(CheckFailed, match="did not finish within"):
        await run_check("exec_timeout_kills", LocalConfig(), timeout=0.3)
