"""The Docker provider against hostile or careless use: file rights, typed file errors,
streamed reads, launch errors that always arrive, pid exhaustion, default limits.

Containers use network ``none`` only. A fake engine on a unix socket stands in where the
real one cannot be made to show a behaviour on demand (bytes sent with the HTTP headers).
"""

from __future__ import annotations

import tempfile
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest

import sandbay
from fake_engine import FakeEngine, frame
from sandbay import (
    DockerConfig,
    SandboxFileNotFoundError,
    SandboxIsADirectoryError,
    SandboxNotADirectoryError,
    SandboxPermissionError,
    SandboxSpec,
)
from sandbay.providers.docker import DockerProvider, DockerSandbox

pytestmark = pytest.mark.docker

CONFIG = DockerConfig()


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    engine = docker.from_env()
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
def marker() -> str:
    return uuid.uuid4().hex


def spec(marker: str, **fields: Any) -> SandboxSpec:
    fields.setdefault("network", "none")
    return SandboxSpec(labels={"test": marker}, **fields)


@pytest.fixture
async def sandbox(marker: str) -> AsyncIterator[sandbay.Sandbox]:
    async with sandbay.open_sandbox(CONFIG, spec(marker)) as sb:
        yield sb


async def as_root(sb: sandbay.Sandbox, command: str) -> bytes:
    result = await sb.exec(["sh", "-c", command], user="0")
    assert result.ok, result
    return result.stdout


# --- typed file errors ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_read_errors_are_typed(sandbox: sandbay.Sandbox) -> None:
    with pytest.raises(SandboxIsADirectoryError) as directory:
        await sandbox.read_file("/etc")
    assert isinstance(directory.value, IsADirectoryError)
    with pytest.raises(SandboxNotADirectoryError) as not_dir:
        await sandbox.read_file("/etc/passwd/x")
    assert isinstance(not_dir.value, NotADirectoryError)
    with pytest.raises(SandboxPermissionError) as denied:
        await sandbox.read_file("/etc/shadow")  # root's, mode 640: not the user's to read
    assert isinstance(denied.value, PermissionError)
    with pytest.raises(SandboxFileNotFoundError):
        await sandbox.read_file("/workspace/none")
    await sandbox.write_file("empty", b"")
    assert await sandbox.read_file("empty") == b""


@pytest.mark.anyio
async def test_write_errors_are_typed_and_leave_nothing(sandbox: sandbay.Sandbox) -> None:
    await sandbox.write_file("dir/keep", b"keep")
    with pytest.raises(SandboxIsADirectoryError):
        await sandbox.write_file("dir", b"x")
    await sandbox.write_file("plain", b"file")
    with pytest.raises(SandboxNotADirectoryError):
        await sandbox.write_file("plain/x", b"x")
    with pytest.raises(SandboxNotADirectoryError):
        await sandbox.write_file("plain/deeper/x", b"x")
    with pytest.raises(SandboxPermissionError):
        await sandbox.write_file("/etc/sandbay-test", b"x")
    with pytest.raises(SandboxPermissionError):
        await sandbox.write_file("/opt/sandbay-test/conf/x.txt", b"x")
    listing = await as_root(sandbox, "ls -a /workspace /workspace/dir; ls /etc /opt")
    assert b"sandbay-test" not in listing
    assert b".sandbay-write" not in listing  # no temporary file left behind
    assert await sandbox.read_file("dir/keep") == b"keep"
    assert await sandbox.read_file("plain") == b"file"


@pytest.mark.anyio
async def test_paths_named_like_errors_are_not_taken_for_them(sandbox: sandbay.Sandbox) -> None:
    with pytest.raises(SandboxFileNotFoundError):
        await sandbox.read_file("Is a directory")
    with pytest.raises(SandboxFileNotFoundError):
        await sandbox.read_file("Permission denied")
    await sandbox.write_file("Not a directory/Is a directory", b"odd names")
    assert await sandbox.read_file("Not a directory/Is a directory") == b"odd names"


@pytest.mark.anyio
async def test_write_replaces_a_file_with_the_mode_given(sandbox: sandbay.Sandbox) -> None:
    await sandbox.write_file("run.sh", b"#!/bin/sh\necho one\n", mode=0o755)
    await sandbox.write_file("run.sh", b"#!/bin/sh\necho two\n", mode=0o700)
    assert (await sandbox.exec(["./run.sh"])).stdout == b"two\n"
    stat = await sandbox.exec(["stat", "-c", "%a %u", "run.sh"])
    assert stat.stdout == b"700 1000\n"


# --- links planted by the sandbox ----------------------------------------------------------


@pytest.mark.anyio
async def test_planted_link_to_a_file_the_user_cannot_read(sandbox: sandbay.Sandbox) -> None:
    assert (await sandbox.exec("ln -s /etc/shadow shadow")).ok
    with pytest.raises(SandboxPermissionError):
        await sandbox.read_file("shadow")
    with pytest.raises(SandboxPermissionError):
        async with aclosing(sandbox.read_file_stream("shadow")) as chunks:
            async for _ in chunks:
                pass


@pytest.mark.anyio
async def test_writes_through_planted_links_are_refused(sandbox: sandbay.Sandbox) -> None:
    planted = "ln -s /etc etc; ln -s /etc/sandbay-planted file; mkdir -p /tmp/sandbay-x"
    assert (await sandbox.exec(planted)).ok
    for path in ("etc/sandbay-planted", "file", "etc/sub/sandbay-planted"):
        with pytest.raises(SandboxPermissionError):
            await sandbox.write_file(path, b"owned")
    assert b"sandbay-planted" not in await as_root(sandbox, "ls -a /etc")
    assert (await sandbox.exec(["test", "-e", "/etc/sub"])).exit_code == 1


@pytest.mark.anyio
async def test_sandbays_own_files_cannot_be_redirected(sandbox: sandbay.Sandbox) -> None:
    # The agent plants a link where sandbay keeps its entrypoint: the next run's upload
    # must not follow it into a directory the user cannot write.
    assert (await sandbox.exec(["ln", "-s", "/etc", "/tmp/sandbay"])).ok
    with pytest.raises(SandboxPermissionError):
        await sandbox.write_file(f"{sandbox.agent_dir}/entrypoint.py", b"print()")
    assert b"entrypoint.py" not in await as_root(sandbox, "ls -a /etc")


# --- streamed reads ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_read_stream_holds_about_one_chunk(sandbox: sandbay.Sandbox) -> None:
    size = 128 << 20
    assert (await sandbox.exec(f"head -c {size} /dev/zero > /tmp/big")).ok
    total = largest = 0
    tracemalloc.start()
    try:
        async with aclosing(sandbox.read_file_stream("/tmp/big")) as chunks:
            async for chunk in chunks:
                total += len(chunk)
                largest = max(largest, len(chunk))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size
    assert largest <= 1 << 20
    assert peak < 16 << 20, f"host memory peaked at {peak} bytes for a {size}-byte file"


@pytest.mark.anyio
async def test_stopping_a_stream_early_ends_its_reader(sandbox: sandbay.Sandbox) -> None:
    assert (await sandbox.exec("head -c 50000000 /dev/zero > /tmp/big")).ok
    async with aclosing(sandbox.read_file_stream("/tmp/big")) as chunks:
        assert await anext(chunks)
    left = await sandbox.exec(["sh", "-c", "ps -eo comm | grep -cx cat || true"])
    assert left.stdout == b"0\n"
    assert await sandbox.read_file("/etc/hostname")  # the sandbox still serves files


# --- launch errors -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_launch_errors_always_name_their_cause(sandbox: sandbay.Sandbox) -> None:
    cases: list[tuple[dict[str, Any], list[str], bytes]] = [
        ({"user": "sandbay-no-such-user"}, ["true"], b"sandbay-no-such-user"),
        ({"cwd": "/sandbay/no/such/dir"}, ["true"], b"/sandbay/no/such/dir"),
        ({}, ["sandbay-no-such-command"], b"sandbay-no-such-command"),
    ]
    failures: list[str] = []

    async def one(kwargs: dict[str, Any], argv: list[str], name: bytes) -> None:
        result = await sandbox.exec(argv, **kwargs)
        if result.exit_code == 0 or name not in result.stderr or result.stdout:
            failures.append(f"{kwargs or argv}: {result}")

    for _ in range(5):  # 30 runs: each case six times, half of them at once
        async with anyio.create_task_group() as tg:
            for kwargs, argv, name in cases:
                tg.start_soon(one, kwargs, argv, name)
        for kwargs, argv, name in cases:
            await one(kwargs, argv, name)
    assert failures == []


#: Docker's answer to an exec as a user the image lacks: all of it sent with the headers.
LAUNCH_ERROR = b"unable to find user ghost: no matching entries in passwd file\r\n"


@pytest.fixture
def fake_engine() -> Iterator[FakeEngine]:
    with tempfile.TemporaryDirectory() as directory:
        engine = FakeEngine(
            "unix", Path(directory), with_headers=frame(LAUNCH_ERROR), exit_code=126, pid=0
        )
        try:
            yield engine
        finally:
            engine.close()


@pytest.mark.anyio
async def test_output_sent_with_the_headers_is_not_lost(fake_engine: FakeEngine) -> None:
    provider = DockerProvider(DockerConfig(base_url=fake_engine.url))
    sb = DockerSandbox(SandboxSpec(), provider=provider, container_id="c1", user="1000")
    try:
        with anyio.fail_after(20):
            result = await sb.exec(["true"], user="ghost")
        assert result.exit_code == 126
        assert result.stderr == LAUNCH_ERROR.replace(b"\r\n", b"\n")
    finally:
        await provider.aclose()  # the sandbox is left open: a fake engine has nothing to remove


# --- pid exhaustion ------------------------------------------------------------------------

# Forks sleeping children for up to 60 s, retrying at once when the pids limit refuses: a
# loop that takes any pid freed or lent, as a fork bomb would.
_FORK_LOOP = """
import os, time
said, deadline = False, time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        if os.fork() == 0:
            time.sleep(120)
            os._exit(0)
    except OSError:
        if not said:
            print("full", flush=True)
            said = True
        time.sleep(0.001)
"""


async def _exhaust(sb: sandbay.Sandbox) -> sandbay.Process:
    proc = await sb.start(["python3", "-c", _FORK_LOOP])
    with anyio.fail_after(60):
        assert await anext(proc.stdout.lines()) == b"full"
    return proc


@pytest.mark.anyio
async def test_kill_works_when_the_pids_are_exhausted(marker: str) -> None:
    async with sandbay.open_sandbox(DockerConfig(pids_limit=64), spec(marker)) as sb:
        proc = await _exhaust(sb)
        refused = await sb.exec(["sh", "-c", "true & wait"])
        assert refused.exit_code != 0  # the sandbox really is full: nothing can fork
        with anyio.fail_after(30):
            await proc.kill()
            assert await proc.wait() == -9
        with anyio.fail_after(30):
            left = await sb.exec(["sh", "-c", "ps -eo comm | grep -c python3 || true"])
        assert (left.exit_code, left.stdout) == (0, b"0\n")
        assert (await sb.exec(["true"])).ok


@pytest.mark.anyio
async def test_aclose_is_prompt_when_the_pids_are_exhausted(client: Any, marker: str) -> None:
    sb = await sandbay.create_sandbox(DockerConfig(pids_limit=64), spec(marker))
    try:
        await _exhaust(sb)
    finally:
        started = time.monotonic()
        await sb.aclose()
    assert time.monotonic() - started < 10
    assert client.containers.list(all=True, filters={"label": f"test={marker}"}) == []


# --- default limits ------------------------------------------------------------------------


@pytest.mark.anyio
async def test_default_sandbox_has_one_cpu_and_one_gib(client: Any, marker: str) -> None:
    async with sandbay.open_sandbox(CONFIG, spec(marker)) as sb:
        host = client.api.inspect_container(sb.id)["HostConfig"]
    assert host["NanoCpus"] == 1_000_000_000
    assert host["Memory"] == host["MemorySwap"] == 1 << 30
    configured = DockerConfig(cpu=2, memory_mb=512)
    async with sandbay.open_sandbox(configured, spec(marker, memory_mb=300)) as sb:
        host = client.api.inspect_container(sb.id)["HostConfig"]
    assert host["NanoCpus"] == 2_000_000_000
    assert host["Memory"] == 300 << 20
