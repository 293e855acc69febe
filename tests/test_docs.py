"""The docs' code is code: README and docs examples compile, use only the safe run pattern,
and the README's Python examples run as written against the local provider and the scripted
model (the only edits: the provider comes from a sandbay.toml instead of "docker", and the
docker-sized spec becomes the default one).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sandbay.testing import ScriptedModel, default_script

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)

# README text -> what runs here. Each must occur, so an edited README cannot skip them.
SUBSTITUTIONS = {
    '"docker"': "None",  # the provider then comes from the sandbay.toml written below
    "sandbay.SandboxSpec(cpu=1, memory_mb=1024)": "sandbay.SandboxSpec()",
}
# The scripted model listens on the host's loopback.
LOCAL_CONFIG = '[provider]\ntype = "local"\n\n[spec]\nnetwork = "host"\n'


def blocks(path: Path, language: str | None = None) -> list[str]:
    return [code for lang, code in FENCE.findall(path.read_text()) if language in (None, lang)]


def readme_examples() -> list[str]:
    return blocks(ROOT / "README.md", "python")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_examples_compile(path: Path) -> None:
    for code in blocks(path, "python"):
        compile(code, str(path), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_runs_are_always_iterated_inside_async_with(path: Path) -> None:
    # `async for m in run_agent(...)` without `async with` leaks the run on `break`.
    for code in blocks(path):
        assert not re.search(r"async\s+for\s+\w+\s+in\s+(sandbay\.)?run_agent\(", code), code
        assert not re.search(r"\bfor\s+\w+\s+in\s+(sandbay\.)?sync\.run_agent\(", code), code
        for call in re.finditer(r"^(.*)\brun_agent\(", code, re.MULTILINE):
            # The blocking facade's run (sandbay.sync) is a plain context manager.
            prefix = call.group(1)
            managed = "async with" in prefix or re.search(r"\bwith\s+(sandbay\.)?sync\.$", prefix)
            assert managed, f"{path.name}: {call.group(0)}"


def test_readme_examples_are_complete_scripts() -> None:
    examples = readme_examples()
    assert len(examples) >= 3
    for code in examples:
        assert code.rstrip().endswith("anyio.run(main)"), code
    joined = "\n".join(examples)
    for text in SUBSTITUTIONS:
        assert text in joined, f"the README no longer contains {text!r}: update this test"


def test_readme_shows_the_two_commands_first() -> None:
    first = blocks(ROOT / "README.md")[0].splitlines()
    assert len(first) == 2
    assert "pip install -e ." in first[0] and "sandbay run" in first[0]
    assert first[1] == "scripts/test"


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_example_runs(index: int, tmp_path: Path) -> None:
    code = readme_examples()[index]
    for text, replacement in SUBSTITUTIONS.items():
        code = code.replace(text, replacement)
    (tmp_path / "sandbay.toml").write_text(LOCAL_CONFIG)
    (tmp_path / "example.py").write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "SANDBAY_"))}
    with ScriptedModel(default_script() * 4) as model:
        result = subprocess.run(
            [sys.executable, "example.py"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**env, **model.env()},
            timeout=240,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    if "run_agent" in code:
        runs = code.count("run_agent") * (2 if "for task in" in code else 1)
        assert result.stdout.count("ResultMessage(subtype='success'") == runs, result.stdout
        assert "hello from" in result.stdout  # the scripted Bash step ran in the sandbox
    else:
        assert "42" in result.stdout and "b'data'" in result.stdout
