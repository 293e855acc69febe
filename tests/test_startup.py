"""Start-up stays light: the package and the CLI load the Agent SDK only when a run needs it.

How fast is measured by benchmarks/startup.py, not here: these tests check what is imported.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import sandbay

HEAVY = ("claude_agent_sdk", "mcp", "docker", "modal", "grpclib")


def imported_after(code: str) -> list[str]:
    """Top-level packages among HEAVY that a fresh interpreter has loaded after ``code``."""
    probe = (
        f"{code}\n"
        "import json as _j, sys as _s\n"
        f"print(_j.dumps(sorted({{m.split('.')[0] for m in _s.modules}} & {set(HEAVY)!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    loaded: list[str] = json.loads(result.stdout.splitlines()[-1])
    return loaded


def test_import_sandbay_does_not_load_the_agent_sdk() -> None:
    assert imported_after("import sandbay") == []


def test_cli_help_does_not_load_the_agent_sdk() -> None:
    code = (
        "import contextlib, io\n"
        "from sandbay._cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
    )
    assert imported_after(code) == []


def test_cli_ls_on_the_local_provider_loads_no_sdk(tmp_path: object) -> None:
    code = (
        "import contextlib, io\n"
        "from sandbay._cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['ls', '--provider', 'local']) == 0\n"
    )
    assert imported_after(code) == []


def test_lazy_names_resolve_and_are_listed() -> None:
    assert sandbay.__all__ == sorted(sandbay.__all__)
    assert set(sandbay.__all__) <= set(dir(sandbay))
    for name in sandbay.__all__:
        assert getattr(sandbay, name) is not None
    from sandbay._agent import run_agent
    from sandbay._pool import SandboxPool

    assert sandbay.run_agent is run_agent and sandbay.SandboxPool is SandboxPool


def test_star_import_and_unknown_names() -> None:
    namespace: dict[str, object] = {}
    exec("from sandbay import *", namespace)
    assert {"run_agent", "SandboxPool", "AgentRun", "replay_agent"} <= set(namespace)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sandbay.nope  # type: ignore[attr-defined]  # noqa: B018


def test_every_lazy_name_is_public_and_defined_where_it_says() -> None:
    lazy: dict[str, str] = sandbay._LAZY
    assert set(lazy) <= set(sandbay.__all__)
    eager = set(sandbay.__all__) - set(lazy)
    assert all(getattr(sandbay, name).__module__ == "sandbay._errors" for name in eager)
