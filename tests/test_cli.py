"""The ``sandbay`` command as a user runs it: a real subprocess each time."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

import sandbay

SANDBAY = [sys.executable, "-m", "sandbay"]


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "SANDBAY_"))}
    return subprocess.run(
        [*SANDBAY, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
        cwd=cwd,
        check=False,
    )


def test_run_offline_on_the_default_provider(tmp_path: Path) -> None:
    result = run_cli("run", "Say hello from inside the sandbox", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "offline" in result.stderr and "provider: local" in result.stderr
    assert "→ Bash:" in result.stdout
    # The tool's output, produced in the sandbox, says where it ran.
    printed = _tool_output(result.stdout)
    assert "hello from" in printed and "the local provider" in printed
    assert "Docker container" not in printed
    assert "✓ success" in result.stdout


@pytest.mark.docker
def test_offline_demo_on_docker_says_it_ran_in_the_container(tmp_path: Path) -> None:
    result = run_cli("run", "hello", "--provider", "docker", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sandbox_id = _reported_sandbox(result.stderr)
    # The network is the host's, and so is the hostname: what it prints must still differ.
    printed = _tool_output(result.stdout)
    assert f"hello from Docker container {sandbox_id[:12]}" in printed, result.stdout
    assert "the local provider" not in printed


def _tool_output(stdout: str) -> str:
    """What the demo's Bash step printed (the indented block under its command)."""
    return "\n".join(line for line in stdout.splitlines() if line.startswith("  │ "))


def _reported_sandbox(stderr: str) -> str:
    for line in stderr.splitlines():
        if line.startswith("sandbay: sandbox "):
            return line.split()[2]
    raise AssertionError(f"the run never reported its sandbox:\n{stderr}")


def _run_into_head(provider: str, tmp_path: Path) -> tuple[str, str, str]:
    """``sandbay run … | head -1`` through a real shell pipe: (status, stdout, stderr)."""
    script = tmp_path / "late.json"
    # The first answer comes a second after the session line, so `head` has surely exited
    # (closing the pipe) by the time the run prints it.
    script.write_text(
        json.dumps(
            [
                {"tool_use": {"name": "Bash", "input": {"command": "echo piped"}}, "delay_s": 1},
                "finished",
            ]
        )
    )
    command = (
        f"{shlex.join(SANDBAY)} run go --offline --provider {provider} --script {script}"
        ' | head -n 1; echo "sandbay-status=${PIPESTATUS[0]}" >&2'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "SANDBAY_"))}
    result = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    status = result.stderr.rsplit("sandbay-status=", 1)[-1].strip()
    return status, result.stdout, result.stderr


async def _check_closed_stdout(provider: str, tmp_path: Path) -> None:
    status, out, err = _run_into_head(provider, tmp_path)
    assert status in ("0", "141"), err
    assert out.startswith("● session") and len(out.splitlines()) == 1
    assert "Traceback" not in err and "Error" not in err and "Exception" not in err, err
    sandbox_id = _reported_sandbox(err)
    live = await sandbay.get_provider(provider).list(labels={"sandbay.managed": "1"})
    assert sandbox_id not in {info.id for info in live}


@pytest.mark.anyio
async def test_closed_stdout_ends_the_run_quietly_and_removes_the_local_sandbox(
    tmp_path: Path,
) -> None:
    await _check_closed_stdout("local", tmp_path)


@pytest.mark.docker
@pytest.mark.anyio
async def test_closed_stdout_ends_the_run_quietly_and_removes_the_container(
    tmp_path: Path,
) -> None:
    await _check_closed_stdout("docker", tmp_path)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--timeout", "nan"),
        ("--timeout", "inf"),
        ("--timeout", "0"),
        ("--timeout", "-5"),
        ("--timeout", "soon"),
        ("--max-turns", "0"),
        ("--max-turns", "-1"),
    ],
)
def test_bad_run_numbers_are_refused_naming_the_option(
    option: str, value: str, tmp_path: Path
) -> None:
    result = run_cli("run", "hi", option, value, cwd=tmp_path)
    assert result.returncode == 2
    assert f"argument {option}" in result.stderr and repr(value) in result.stderr
    assert "Traceback" not in result.stderr


def test_help_shows_defaults(tmp_path: Path) -> None:
    def words(*args: str) -> str:
        return " ".join(run_cli(*args, cwd=tmp_path).stdout.split())  # undo line wrapping

    run = words("run", "--help")
    assert "(default: 10)" in run  # --max-turns
    assert "(default: Bash,Read,Write,Edit)" in run
    bench = words("bench", "--help")
    assert "(default: cold)" in bench and "(default: benchmarks/results)" in bench
    assert "--config" in bench


def test_bench_takes_a_config_file(tmp_path: Path) -> None:
    config = tmp_path / "bench.toml"
    config.write_text('[provider]\ntype = "local"\n[spec]\nlabels = { purpose = "bench" }\n')
    out = tmp_path / "results"
    args = ["--runs", "1", "--no-raw", "--out", str(out)]
    result = run_cli("bench", "--config", str(config), *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "local" in result.stdout and list(out.glob("cold-local.*"))
    missing = run_cli("bench", "--config", str(tmp_path / "nope.toml"), *args, cwd=tmp_path)
    assert missing.returncode == 1 and "nope.toml" in missing.stderr


def test_image_build_without_the_docker_extra_names_the_extra(tmp_path: Path) -> None:
    # The docker SDK is made to look uninstalled: a finder ahead of all others refuses it.
    code = (
        "import importlib.abc, sys\n"
        "class NoDocker(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'docker' or name.startswith('docker.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, NoDocker())\n"
        "from sandbay._cli import main\n"
        "sys.exit(main(['image', 'build']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert 'pip install "sandbay[docker]"' in result.stderr
    assert "Traceback" not in result.stderr


def test_ls_and_gc_fail_clearly_on_a_missing_config_file(tmp_path: Path) -> None:
    for command in ("ls", "gc"):
        result = run_cli(command, env={"SANDBAY_CONFIG": "missing.toml"}, cwd=tmp_path)
        assert result.returncode == 1, (command, result.stdout)
        assert "missing.toml" in result.stderr and "does not exist" in result.stderr
        flag = run_cli(command, "--config", "missing.toml", cwd=tmp_path)
        assert flag.returncode == 1 and "does not exist" in flag.stderr


def test_ls_and_gc_use_the_config_file(tmp_path: Path) -> None:
    # A docker engine that does not exist: only a command that read sandbay.toml goes there.
    socket = "unix:///nonexistent/sandbay-test.sock"
    (tmp_path / "sandbay.toml").write_text(f'[provider]\ntype = "docker"\nbase_url = "{socket}"\n')
    for command in ("ls", "gc"):
        result = run_cli(command, cwd=tmp_path)
        assert result.returncode == 1, (command, result.stdout)
        assert socket in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "sandbay.toml").write_text('[provider]\ntype = "local"\nrooot = "x"\n')
    for command in ("ls", "gc"):
        result = run_cli(command, cwd=tmp_path)
        assert result.returncode == 1, (command, result.stdout)
        assert "sandbay.toml" in result.stderr and "rooot" in result.stderr


def test_ls_all_lists_every_installed_provider(tmp_path: Path) -> None:
    (tmp_path / "sandbay.toml").write_text('[provider]\ntype = "local"\nrooot = "x"\n')
    result = run_cli("ls", "--all", cwd=tmp_path)  # --all: each provider's defaults
    assert result.returncode == 0, result.stderr


def test_ls_all_skips_a_provider_that_is_not_set_up(tmp_path: Path) -> None:
    # The e2b SDK is installed, but without E2B_API_KEY its provider cannot list: --all
    # says so and lists the others.
    if os.environ.get("E2B_API_KEY"):
        pytest.skip("E2B_API_KEY is set here")
    for command in ("ls", "gc"):
        result = run_cli(command, "--all", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "e2b skipped" in result.stderr and "E2B_API_KEY" in result.stderr


def test_run_json_prints_stream_json_lines(tmp_path: Path) -> None:
    result = run_cli("run", "hi", "--json", "--offline", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["type"] == "system" and lines[0]["subtype"] == "init"
    assert lines[-1]["type"] == "result" and lines[-1]["is_error"] is False
    assert {"assistant", "user"} <= {line["type"] for line in lines}


def test_run_does_not_bypass_permissions_by_default(tmp_path: Path) -> None:
    # On the unisolated local provider the agent acts on this machine as this user: the
    # allowed tools suffice for the demo's Bash step, and nothing else is waved through.
    result = run_cli("run", "hi", "--json", "--offline", "--provider", "local", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[0]["subtype"] == "init" and lines[0]["permissionMode"] == "default"
    outputs = [
        block.get("content")
        for line in lines
        if line["type"] == "user"
        for block in line["message"]["content"]
        if isinstance(block, dict) and block.get("type") == "tool_result"
    ]
    assert any("hello from" in str(output) for output in outputs), outputs


def test_run_with_a_script_file(tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(
        json.dumps(
            [
                {"tool_use": {"name": "Bash", "input": {"command": "echo scripted-$((40+2))"}}},
                "finished",
            ]
        )
    )
    result = run_cli("run", "go", "--script", str(script), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "scripted-42" in result.stdout and "finished" in result.stdout


def test_unknown_provider_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli("run", "hi", "--provider", "dockr", cwd=tmp_path)
    assert result.returncode == 1
    assert (
        "unknown provider 'dockr'" in result.stderr
        and "valid providers: daytona, docker" in result.stderr
    )
    assert "Traceback" not in result.stderr


def test_invalid_config_names_field_and_file(tmp_path: Path) -> None:
    (tmp_path / "sandbay.toml").write_text('[provider]\ntype = "local"\nisolated = true\n')
    result = run_cli("run", "hi", cwd=tmp_path)
    assert result.returncode == 1
    assert "sandbay.toml" in result.stderr and "isolated" in result.stderr
    assert "Traceback" not in result.stderr


def test_empty_prompt_is_refused(tmp_path: Path) -> None:
    result = run_cli("run", "  ", cwd=tmp_path)
    assert result.returncode == 1 and "empty prompt" in result.stderr


def test_providers_lists_each_with_its_state(tmp_path: Path) -> None:
    result = run_cli("providers", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("* local") for line in lines)
    docker_line = next(line for line in lines if "docker" in line)
    assert "ready" in docker_line or "unreachable" in docker_line or "not installed" in docker_line


def test_missing_sdk_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['docker'] = None\n"
        "import sandbay\n"
        "try:\n    sandbay.get_provider('docker')\n"
        "except sandbay.MissingDependencyError as exc:\n    print(exc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert 'pip install "sandbay[docker]"' in result.stdout


def test_ls_and_gc_find_and_remove_an_orphan(tmp_path: Path) -> None:
    # A child process opens a sandbox with a short lease and dies without closing it.
    code = (
        "import anyio, sandbay\n"
        "async def main():\n"
        "    spec = sandbay.SandboxSpec(labels={'t': 'orphan'}, lifetime_s=1)\n"
        "    sb = await sandbay.create_sandbox('local', spec)\n"
        "    print(sb.id, flush=True)\n"
        "anyio.run(main)\n"
    )
    orphan = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    listed = run_cli("ls", "--provider", "local", cwd=tmp_path)
    assert orphan in listed.stdout and "t=orphan" in listed.stdout
    (line,) = [line for line in listed.stdout.splitlines() if orphan in line]
    assert re.search(r" lease=-?[0-9]+s ", line), f"ls shows the lease left: {line!r}"
    infos = anyio.run(sandbay.get_provider("local").list)
    (expiry,) = [info.expiry for info in infos if info.id == orphan]
    assert expiry is not None
    while time.time() <= expiry:
        time.sleep(0.1)  # its lease (whole seconds) runs out
    collected = run_cli("gc", "--provider", "local", cwd=tmp_path)
    if orphan in collected.stdout:  # else another process's gc on this machine was quicker
        assert f"removed local {orphan} (expired)" in collected.stdout
    assert orphan not in run_cli("ls", "--provider", "local", cwd=tmp_path).stdout


def test_model_serve_answers_the_messages_api(tmp_path: Path) -> None:
    import urllib.request

    proc = subprocess.Popen(
        [*SANDBAY, "model", "serve"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert proc.stdout is not None
        url = ""
        deadline = time.monotonic() + 30
        while not url and time.monotonic() < deadline:
            line = proc.stdout.readline()
            for word in line.split():
                if word.startswith("http://127.0.0.1:"):
                    url = word.rstrip(".,")
        assert url, "serve printed no URL"
        body = json.dumps(
            {
                "model": "m",
                "max_tokens": 100,
                "tools": [],
                "messages": [{"role": "user", "content": "hi"}],
            }
        ).encode()
        request = urllib.request.Request(
            f"{url}/v1/messages", data=body, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
        assert answer["type"] == "message" and answer["content"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
        if proc.stdout:
            proc.stdout.close()


def _interrupt_run(provider: str, tmp_path: Path) -> tuple[int, str, str]:
    """Start `sandbay run` on a slow script, Ctrl-C it once the sandbox exists."""
    script = tmp_path / "slow.json"
    script.write_text(json.dumps([{"text": "too late", "delay_s": 60}]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "SANDBAY_"))}
    proc = subprocess.Popen(
        [*SANDBAY, "run", "go", "--provider", provider, "--script", str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    assert proc.stderr is not None
    sandbox_id = ""
    deadline = time.monotonic() + 120
    while not sandbox_id and time.monotonic() < deadline:
        line = proc.stderr.readline()
        if line.startswith("sandbay: sandbox "):
            sandbox_id = line.split()[2]
        if not line and proc.poll() is not None:
            break
    assert sandbox_id, "the run never reported its sandbox"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, sandbox_id, err


@pytest.mark.anyio
async def test_ctrl_c_removes_the_local_sandbox(tmp_path: Path) -> None:
    code, sandbox_id, err = _interrupt_run("local", tmp_path)
    assert code == 130, err
    assert "interrupted" in err
    live = {s.id for s in await sandbay.get_provider("local").list()}
    assert sandbox_id not in live


@pytest.mark.docker
def test_ctrl_c_removes_the_docker_container(tmp_path: Path) -> None:
    import docker

    code, sandbox_id, err = _interrupt_run("docker", tmp_path)
    assert code == 130, err
    client = docker.from_env()
    try:
        with pytest.raises(docker.errors.NotFound):
            client.containers.get(sandbox_id)
    finally:
        client.close()


@pytest.mark.parametrize("loaded", [False, True], ids=["plain", "e2b-http-client"])
def test_the_command_skips_interpreter_teardown_only_after_the_e2b_http_client(
    loaded: bool,
) -> None:
    # That client's threads can abort Python's teardown with SIGABRT after a command that
    # succeeded; once it was loaded the command leaves as soon as its output is flushed
    # (an exit handler does not run), with its own status. Otherwise teardown runs as usual.
    probe = (
        "import atexit, sys, types\n"
        + ("sys.modules['pyqwest'] = types.ModuleType('pyqwest')\n" if loaded else "")
        + "atexit.register(lambda: print('teardown ran', flush=True))\n"
        "from sandbay._cli import main\n"
        "sys.argv = ['sandbay']\n"
        "print('output', end='')\n"
        "sys.exit(main())\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2  # no command given: the usage status, either way
    assert done.stdout.startswith("output") and "usage: sandbay" in done.stdout
    assert ("teardown ran" in done.stdout) == (not loaded)
