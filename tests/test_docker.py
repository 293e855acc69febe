"""The Docker provider and the agent image, against a real Docker engine.

Containers use network ``none`` (or ``host``) only. Without a reachable engine the module is
skipped, unless ``SANDBAY_REQUIRE_DOCKER=1`` (CI), where that is a failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import logging
import os
import struct
import termios
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import docker
import docker.errors
import pytest
import requests.exceptions

import sandbay
from fake_engine import FakeEngine, frame
from sandbay import (
    ConfigError,
    DockerConfig,
    ImageError,
    ProviderUnavailableError,
    SandboxError,
    SandboxFileNotFoundError,
    SandboxNotFoundError,
    SandboxPermissionError,
    SandboxSpec,
)
from sandbay.providers.docker import DockerProvider, DockerSandbox, map_docker_error
from sandbay.providers.docker._image import AGENT_IMAGE, build_agent_image
from sandbay.providers.docker._process import _READ_SIZE, _ROUND_BYTES, Connection
from sandbay.providers.docker._process import _DockerProcess as DockerProcess

pytestmark = pytest.mark.docker

CONFIG = DockerConfig()
MISSING_SOCKET = "unix:///tmp/sandbay-no-such-docker.sock"


def _engine_answers() -> bool:
    try:
        client = docker.from_env()
    except docker.errors.DockerException:
        return False
    try:
        return bool(client.ping())
    except (docker.errors.DockerException, requests.exceptions.RequestException):
        return False
    finally:
        client.close()


if not _engine_answers():
    if os.environ.get("SANDBAY_REQUIRE_DOCKER") == "1":
        raise RuntimeError("SANDBAY_REQUIRE_DOCKER=1 but the Docker engine does not answer")
    pytest.skip("no Docker engine", allow_module_level=True)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    engine = docker.from_env()
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
def marker() -> str:
    """A label value unique to one test, to find its containers."""
    return uuid.uuid4().hex


def spec(marker: str, **fields: Any) -> SandboxSpec:
    fields.setdefault("network", "none")
    return SandboxSpec(labels={"test": marker}, **fields)


@pytest.fixture
async def sandbox(marker: str) -> AsyncIterator[sandbay.Sandbox]:
    async with sandbay.open_sandbox(CONFIG, spec(marker)) as sb:
        yield sb


def containers(client: Any, marker: str) -> list[Any]:
    return list(client.containers.list(all=True, filters={"label": f"test={marker}"}))


# --- processes ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_exec_exit_codes_and_output(sandbox: sandbay.Sandbox) -> None:
    assert isinstance(sandbox, DockerSandbox)
    result = await sandbox.exec("echo out; echo err >&2; exit 3")
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"out\n", b"err\n")
    assert (await sandbox.exec(["true"])).ok
    assert (await sandbox.exec(["sh", "-c", "exit 42"])).exit_code == 42


@pytest.mark.anyio
async def test_missing_command_is_127_not_an_exception(sandbox: sandbay.Sandbox) -> None:
    result = await sandbox.exec(["sandbay-no-such-command", "arg"])
    assert result.exit_code == 127
    assert b"sandbay-no-such-command" in result.stderr
    assert result.stdout == b""
    # A missing file given by path is "command not found" too; a non-executable one is 126.
    assert (await sandbox.exec(["/no/such/file"])).exit_code == 127
    assert (await sandbox.exec(["/etc/passwd"])).exit_code == 126


@pytest.mark.anyio
async def test_output_that_looks_like_a_docker_error_is_left_alone(
    sandbox: sandbay.Sandbox,
) -> None:
    text = "OCI runtime exec failed: not really"
    result = await sandbox.exec(["sh", "-c", f"echo '{text}'; exit 126"])
    assert result.exit_code == 126
    assert result.stdout == f"{text}\n".encode()


@pytest.mark.anyio
async def test_streaming_stdin_echo(sandbox: sandbay.Sandbox) -> None:
    proc = await sandbox.start(["sh", "-c", 'while read -r l; do echo "echo:$l"; done'])
    lines = proc.stdout.lines()
    for word in ("one", "two", "three"):
        await proc.write(f"{word}\n".encode())
        with anyio.fail_after(10):
            assert await anext(lines) == f"echo:{word}".encode()
    await proc.close_stdin()
    await proc.close_stdin()  # idempotent
    with anyio.fail_after(10):
        assert await proc.wait() == 0
    assert [line async for line in lines] == []
    with pytest.raises(BrokenPipeError):
        await proc.write(b"late\n")


@pytest.mark.anyio
async def test_stderr_arrives_while_stdout_waits(sandbox: sandbay.Sandbox) -> None:
    # The stdout reader holds the socket when stderr's frame comes in: it must reach the
    # stderr reader at once, not when stdout next has something.
    proc = await sandbox.start(["sh", "-c", "echo err >&2; read -r x; echo out"])
    out: list[bytes] = []

    async def read_stdout() -> None:
        out.append(await proc.stdout.read())

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_stdout)
        await anyio.sleep(0.1)  # stdout's reader is at work first
        with anyio.fail_after(10):
            assert await anext(aiter(proc.stderr)) == b"err\n"
        await proc.write(b"go\n")
        await proc.close_stdin()
    assert out == [b"out\n"]
    assert await proc.wait() == 0


@pytest.mark.anyio
async def test_cancelled_read_loses_nothing(sandbox: sandbay.Sandbox) -> None:
    proc = await sandbox.start(["sh", "-c", "read -r x; echo one; sleep 0.2; echo two"])
    with anyio.move_on_after(0.2) as scope:
        await anext(aiter(proc.stdout))
    assert scope.cancelled_caught
    await proc.write(b"go\n")  # the abandoned read now gets "one"
    with anyio.fail_after(10):
        assert await proc.stdout.read() == b"one\ntwo\n"
        assert await proc.wait() == 0


async def _all_output_waiting(sandbox: sandbay.Sandbox, size: int) -> DockerProcess:
    """A process that wrote ``size`` bytes and ended, all of them on the host: in its socket
    or (on asyncio, where the loop reads as it arrives) queued by the process object, up to
    one buffer's worth in the HTTP reader, read with the headers."""
    proc = await sandbox.start(["sh", "-c", f"head -c {size} /dev/zero; touch written"])
    assert isinstance(proc, DockerProcess)
    with anyio.fail_after(60):
        while not await sandbox.exists("written"):  # noqa: ASYNC110 - the sandbox's state
            await anyio.sleep(0.05)
        while _on_the_host(proc) < size - 8192:  # noqa: ASYNC110 - the kernel's count
            await anyio.sleep(0.05)
    return proc


def _on_the_host(proc: DockerProcess) -> int:
    """Output of a process on the host, not yet read: queued, or in its socket."""
    in_socket = 0 if proc._lost else _unread_bytes(proc._sock)
    return proc._unread + in_socket


@pytest.mark.anyio
async def test_one_read_round_takes_all_output_that_has_arrived(
    sandbox: sandbay.Sandbox,
) -> None:
    # Output that has arrived is taken in one read round, not a round per frame: each round
    # (a trip to a thread, a wait for the socket) cost throughput. Counted, not timed.
    size = 128 * 1024
    proc = await _all_output_waiting(sandbox, size)
    rounds = 0
    fill = proc._fill

    async def counted(want: int | None) -> None:
        nonlocal rounds
        rounds += 1
        await fill(want)

    proc._fill = counted  # type: ignore[method-assign]
    with anyio.fail_after(60):
        assert await proc.stdout.read() == bytes(size)
    assert rounds <= 2, f"{rounds} read rounds for {size} bytes that had all arrived"
    assert await proc.wait() == 0


@pytest.mark.anyio
async def test_frames_that_arrived_together_reach_the_reader_as_one_chunk(
    sandbox: sandbay.Sandbox,
) -> None:
    # Docker cuts output into frames of a few KiB; a reader pays per chunk, so the frames of
    # one stream read in one round are joined. Counted, not timed.
    size = 128 * 1024
    proc = await _all_output_waiting(sandbox, size)
    with anyio.fail_after(60):
        chunks = [chunk async for chunk in proc.stdout]
    assert b"".join(chunks) == bytes(size)
    assert len(chunks) <= 2, f"{len(chunks)} chunks for {size} bytes that had all arrived"
    assert await proc.wait() == 0


def _unread_bytes(sock: Any) -> int:
    """Bytes waiting in a socket's receive queue (``FIONREAD``)."""
    data = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", data)[0])


_NUMBERED = """
import sys
out = sys.stdout.buffer
for i in range(1024):
    out.write(i.to_bytes(4, "big") * 16384)
out.flush()
open("written", "w").close()
"""


@pytest.mark.anyio
async def test_output_nobody_reads_stays_bounded_on_the_host(sandbox: sandbay.Sandbox) -> None:
    # 64 MiB that nobody reads for a while: the host takes about a MiB of it, the rest waits
    # in the engine and the process. Then reading takes every byte, in order.
    proc = await sandbox.start(["python3", "-c", _NUMBERED])
    assert isinstance(proc, DockerProcess)
    bound = _ROUND_BYTES + _READ_SIZE
    with anyio.fail_after(60):
        # The host stopped taking: output has piled up in its socket behind the queue.
        while proc._unread < _ROUND_BYTES or _unread_bytes(proc._sock) == 0:
            assert proc._unread <= bound
            await anyio.sleep(0.02)
    for _ in range(25):  # and it stays so while nobody reads
        assert proc._unread <= bound
        assert not await sandbox.exists("written")
        await anyio.sleep(0.02)
    expected = b"".join(i.to_bytes(4, "big") * 16384 for i in range(1024))
    with anyio.fail_after(120):
        assert await proc.stdout.read() == expected
        assert await proc.wait() == 0


@pytest.mark.anyio
async def test_quiet_process_outlives_the_client_timeout(marker: str) -> None:
    # The SDK's sockets time out after 60 s by default; a short client timeout proves
    # a process's stream does not inherit it.
    provider = DockerProvider(CONFIG)
    try:
        provider._docker_client().api.timeout = 2
        async with await provider.create(spec(marker)) as sb:
            result = await sb.exec(["sh", "-c", "sleep 3; echo done"])
            assert result.stdout == b"done\n"
    finally:
        await provider.aclose()


@pytest.mark.anyio
async def test_kill_ends_the_process_and_its_children(sandbox: sandbay.Sandbox) -> None:
    proc = await sandbox.start(["sh", "-c", "(sleep 30; touch child-ran) & sleep 30; touch ran"])
    await anyio.sleep(0.3)
    await proc.kill()
    with anyio.fail_after(10):
        assert await proc.wait() == -9
    assert proc.returncode == -9
    left = await sandbox.exec("ps -eo args | grep -c '^sleep 30' || true")
    assert left.stdout.strip() == b"0"


@pytest.mark.anyio
async def test_stopped_container_is_not_found(marker: str) -> None:
    async with sandbay.open_sandbox(CONFIG, spec(marker, lifetime_s=1)) as sb:
        await anyio.sleep(2.5)  # `sleep 1`, the container's command, has ended
        with pytest.raises(SandboxNotFoundError, match="not running"):
            await sb.exec(["true"])


_SLOW_STDIN = """
import sys, time
print("up", flush=True)
total = 0
while data := sys.stdin.buffer.read1(1 << 16):
    total += len(data)
    time.sleep(0.002)
print(total, flush=True)
"""


@pytest.mark.anyio
async def test_large_write_waits_for_a_slow_reader(sandbox: sandbay.Sandbox) -> None:
    # Far more than the socket holds: the write waits for room, again and again.
    size = 8 << 20
    proc = await sandbox.start(["python3", "-c", _SLOW_STDIN])
    lines = proc.stdout.lines()
    with anyio.fail_after(120):
        assert await anext(lines) == b"up"
        await proc.write(os.urandom(1 << 20) * 8)
        await proc.close_stdin()
        assert await anext(lines) == str(size).encode()
        assert await proc.wait() == 0


@pytest.mark.anyio
async def test_write_to_a_process_that_does_not_read_is_cancellable(
    sandbox: sandbay.Sandbox,
) -> None:
    proc = await sandbox.start(
        ["python3", "-c", "import time; print('up', flush=True); time.sleep(60)"]
    )
    assert isinstance(proc, DockerProcess)
    with anyio.fail_after(30):
        assert await anext(aiter(proc.stdout)) == b"up\n"
    with anyio.move_on_after(1) as scope:
        await proc.write(bytes(16 << 20))
    assert scope.cancelled_caught

    # A write blocked on the full socket is woken by a kill from another task.
    failed = anyio.Event()

    async def write() -> None:
        with pytest.raises(BrokenPipeError):
            await proc.write(bytes(16 << 20))
        failed.set()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(write)
            while proc._sending is None:  # noqa: ASYNC110 - the write's own state
                await anyio.sleep(0.01)
            await proc.kill()
            await failed.wait()
        assert await proc.wait() == -9


@pytest.mark.anyio
async def test_connections_read_in_threads_keep_their_promises(
    sandbox: sandbay.Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Connections that are not plain sockets (TLS, ssh) are read and written in threads.
    monkeypatch.setattr(Connection, "on_loop", lambda self: False)
    proc = await sandbox.start(["sh", "-c", "read -r x; echo one; echo err >&2; echo two"])
    assert isinstance(proc, DockerProcess)
    assert not proc._on_loop
    with anyio.move_on_after(0.2) as scope:
        await anext(aiter(proc.stdout))
    assert scope.cancelled_caught
    await proc.write(b"go\n")
    with anyio.fail_after(30):
        assert await proc.stdout.read() == b"one\ntwo\n"
        assert await proc.stderr.read() == b"err\n"
        assert await proc.wait() == 0
    with pytest.raises(BrokenPipeError):
        await proc.write(b"late\n")
    missing = await sandbox.exec(["sandbay-no-such-command"])
    assert missing.exit_code == 127
    assert b"sandbay-no-such-command" in missing.stderr


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_output_read_with_the_headers_comes_first_on_the_loop(
    transport: str, tmp_path: Path
) -> None:
    # The HTTP client's buffer holds the first frame; the socket has nothing more for now.
    engine = FakeEngine(
        transport, tmp_path, with_headers=frame(b"first\n"), after_stdin=[frame(b"second\n")]
    )
    async with _exec_on(engine) as proc:
        assert proc._on_loop
        with anyio.fail_after(20):
            assert await anext(aiter(proc.stdout)) == b"first\n"
            await proc.close_stdin()
            assert await proc.stdout.read() == b"second\n"
            assert await proc.wait() == 0


@contextlib.asynccontextmanager
async def _exec_on(engine: FakeEngine) -> AsyncIterator[DockerProcess]:
    """An exec started on the fake ``engine``; closed, with the engine, on the way out."""
    provider = DockerProvider(DockerConfig(base_url=engine.url))
    sb = DockerSandbox(SandboxSpec(), provider=provider, container_id="c1", user="1000")
    try:
        proc = await sb.start(["anything"])
        assert isinstance(proc, DockerProcess)
        try:
            yield proc
        finally:
            proc._close()
    finally:
        await provider.aclose()  # the sandbox is left open: a fake engine has nothing to remove
        engine.close()


@pytest.mark.anyio
async def test_frames_cut_anywhere_by_the_reads_arrive_whole(tmp_path: Path) -> None:
    # Frames of both streams, some empty, written in pieces that cut headers and payloads
    # at every offset: each stream gets its bytes, whole and in order.
    frames = [
        frame(b"a" * 5000, 1),
        frame(b"e1", 2),
        frame(b"", 1),
        frame(b"b" * 3, 1),
        *(frame(bytes([65 + i]) * (i + 1), 1 + i % 2) for i in range(20)),
        frame(bytes(range(256)) * 300, 1),
        frame(b"e2" * 1000, 2),
    ]
    stream = b"".join(frames)
    sizes = [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 4093]
    pieces: list[bytes] = []
    at = 0
    while at < len(stream):
        size = sizes[len(pieces) % len(sizes)]
        pieces.append(stream[at : at + size])
        at += size
    out = b"first\n" + b"a" * 5000 + b"b" * 3
    out += b"".join(bytes([65 + i]) * (i + 1) for i in range(0, 20, 2))
    out += bytes(range(256)) * 300
    err = b"e1" + b"".join(bytes([65 + i]) * (i + 1) for i in range(1, 20, 2)) + b"e2" * 1000

    engine = FakeEngine("unix", tmp_path, with_headers=frame(b"first\n"), after_stdin=pieces)
    async with _exec_on(engine) as proc:
        got: dict[str, bytes] = {}

        async def read(name: str, stream: sandbay.ByteStream) -> None:
            got[name] = await stream.read()

        with anyio.fail_after(60):
            await proc.close_stdin()
            async with anyio.create_task_group() as tg:
                tg.start_soon(read, "out", proc.stdout)
                tg.start_soon(read, "err", proc.stderr)
            assert await proc.wait() == 0
        assert got == {"out": out, "err": err}


# --- the container -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_labels_are_on_the_container(client: Any, marker: str) -> None:
    async with sandbay.open_sandbox(CONFIG, spec(marker), session="s-123") as sb:
        labels = client.api.inspect_container(sb.id)["Config"]["Labels"]
        assert labels["test"] == marker
        assert labels["sandbay.managed"] == "1"
        assert labels["sandbay.session"] == "s-123"
        assert float(labels["sandbay.expiry"]) > time.time()
        assert labels["sandbay.owner"].endswith(f":{os.getpid()}")


@pytest.mark.anyio
async def test_resource_limits_are_applied(client: Any, marker: str) -> None:
    limited = spec(marker, cpu=0.5, memory_mb=256)
    config = DockerConfig(pids_limit=77)
    async with sandbay.open_sandbox(config, limited) as sb:
        host = client.api.inspect_container(sb.id)["HostConfig"]
        assert host["NanoCpus"] == 500_000_000
        assert host["Memory"] == 256 * 1024 * 1024
        assert host["PidsLimit"] == 77
        assert host["Init"] is True
        assert host["CapDrop"] == ["ALL"]
        assert "no-new-privileges" in host["SecurityOpt"]
        assert host["NetworkMode"] == "none"
        assert host["AutoRemove"] is False


@pytest.mark.anyio
async def test_runs_as_non_root_by_default(sandbox: sandbay.Sandbox) -> None:
    assert (await sandbox.exec(["id", "-u"])).stdout == b"1000\n"
    assert (await sandbox.exec(["id", "-u"], user="0")).stdout == b"0\n"
    home = await sandbox.exec(["sh", "-c", 'echo "$HOME"; pwd; echo "$IS_SANDBOX"'])
    assert home.stdout == b"/home/sandbay\n/workspace\n1\n"
    status = (await sandbox.exec(["cat", "/proc/self/status"])).stdout
    assert b"NoNewPrivs:\t1" in status
    assert b"CapEff:\t0000000000000000" in status


@pytest.mark.anyio
async def test_network_none_has_only_loopback(sandbox: sandbay.Sandbox) -> None:
    result = await sandbox.exec(["ls", "/sys/class/net"])
    assert result.stdout.split() == [b"lo"]


@pytest.mark.anyio
async def test_network_host_shares_the_hosts_interfaces(marker: str) -> None:
    # Containers come and go (veth pairs), so compare the host's lasting interfaces only.
    lasting = {n.encode() for n in os.listdir("/sys/class/net") if not n.startswith("veth")}
    async with sandbay.open_sandbox(CONFIG, spec(marker, network="host")) as sb:
        inside = set((await sb.exec(["ls", "/sys/class/net"])).stdout.split())
    assert len(lasting) > 1
    assert lasting <= inside


@pytest.mark.anyio
async def test_other_workdir_is_created_for_the_user(marker: str) -> None:
    async with sandbay.open_sandbox(CONFIG, spec(marker, workdir="/srv/job/work")) as sb:
        result = await sb.exec(["sh", "-c", "pwd; stat -c %u . ; touch mine"])
        assert result.stdout == b"/srv/job/work\n1000\n"
        assert result.ok


@pytest.mark.anyio
async def test_named_user_and_custom_image(marker: str) -> None:
    # Any image works (here the base image, which lacks /workspace and the sandbay user).
    named = spec(marker, image="sandbay-base:bookworm", user="nobody")
    async with sandbay.open_sandbox(CONFIG, named) as sb:
        assert (await sb.exec(["id", "-un"])).stdout == b"nobody\n"
        assert (await sb.exec(["pwd"])).stdout == b"/workspace\n"
        await sb.write_file("owned.txt", b"x")
        owner = await sb.exec(["stat", "-c", "%U", "owned.txt"])
        assert owner.stdout == b"nobody\n"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("user", "owner"),
    [("1000", b"1000:1000"), ("sandbay:nogroup", b"1000:65534"), ("nobody:1000", b"65534:1000")],
)
async def test_files_belong_to_the_user_as_docker_resolves_it(
    marker: str, user: str, owner: bytes
) -> None:
    async with sandbay.open_sandbox(CONFIG, spec(marker, user=user)) as sb:
        await sb.write_file("/tmp/owned", b"x")
        ids = await sb.exec(["sh", "-c", "stat -c %u:%g /tmp/owned; echo $(id -u):$(id -g)"])
        assert ids.stdout == owner + b"\n" + owner + b"\n"


@pytest.mark.anyio
async def test_missing_image_is_an_image_error_and_leaves_nothing(client: Any, marker: str) -> None:
    with pytest.raises(ImageError, match="never pulls"):
        await sandbay.create_sandbox(CONFIG, spec(marker, image="sandbay-no-such-image:0"))
    assert containers(client, marker) == []


@pytest.mark.anyio
async def test_unknown_user_is_a_config_error_and_leaves_nothing(client: Any, marker: str) -> None:
    with pytest.raises(ConfigError, match="user"):
        await sandbay.create_sandbox(CONFIG, spec(marker, user="sandbay-no-such-user"))
    assert containers(client, marker) == []


# --- files -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_file_round_trip_owner_and_mode(sandbox: sandbay.Sandbox) -> None:
    data = bytes(range(256)) * 3
    await sandbox.write_file("deep/er/file.bin", data, mode=0o640)
    assert await sandbox.read_file("deep/er/file.bin") == data
    stat = await sandbox.exec(["stat", "-c", "%u:%g %a", "deep/er/file.bin", "deep/er", "deep"])
    assert stat.stdout.split(b"\n")[:3] == [b"1000:1000 640", b"1000:1000 755", b"1000:1000 755"]
    # The user can add files next to it, so the parents really are theirs.
    assert (await sandbox.exec(["touch", "deep/er/more"])).ok


@pytest.mark.anyio
async def test_file_outside_the_users_reach_is_refused(sandbox: sandbay.Sandbox) -> None:
    # File operations carry the sandbox user's rights: /opt is root's.
    with pytest.raises(SandboxPermissionError):
        await sandbox.write_file("/opt/sandbay-test/conf/x.txt", b"hello")
    assert (await sandbox.exec(["test", "-e", "/opt/sandbay-test"])).exit_code == 1


@pytest.mark.anyio
async def test_fifty_megabytes_round_trip(sandbox: sandbay.Sandbox) -> None:
    data = os.urandom(1 << 20) * 50
    await sandbox.write_file("/tmp/big.bin", data)
    assert await sandbox.read_file("/tmp/big.bin") == data
    size = await sandbox.exec(["stat", "-c", "%s", "/tmp/big.bin"])
    assert size.stdout == f"{len(data)}\n".encode()


@pytest.mark.anyio
async def test_read_missing_file_directory_and_symlink(sandbox: sandbay.Sandbox) -> None:
    with pytest.raises(SandboxFileNotFoundError):
        await sandbox.read_file("no/such/file")
    with pytest.raises(FileNotFoundError):
        await sandbox.read_file("/no-such-top-level")
    with pytest.raises(SandboxError, match="directory"):
        await sandbox.read_file("/etc")
    await sandbox.write_file("target.txt", b"through the link")
    assert (await sandbox.exec(["ln", "-s", "target.txt", "link"])).ok
    assert await sandbox.read_file("link") == b"through the link"
    assert (
        await sandbox.read_file("/etc/os-release")
        == (await sandbox.exec(["cat", "/etc/os-release"])).stdout
    )


@pytest.mark.anyio
async def test_write_over_a_directory_is_refused(sandbox: sandbay.Sandbox) -> None:
    await sandbox.write_file("dir/keep.txt", b"keep")
    with pytest.raises(SandboxError, match="directory"):
        await sandbox.write_file("dir", b"would replace the directory")
    assert await sandbox.read_file("dir/keep.txt") == b"keep"


# --- lifecycle, listing, gc --------------------------------------------------------------


@pytest.mark.anyio
async def test_close_removes_the_container(client: Any, marker: str) -> None:
    sb = await sandbay.create_sandbox(CONFIG, spec(marker))
    proc = await sb.start(["sleep", "60"])  # a live process does not hold the close up
    assert [c.id for c in containers(client, marker)] == [sb.id]
    await sb.aclose()
    assert containers(client, marker) == []
    with anyio.fail_after(10):
        assert await proc.stdout.read() == b""


@pytest.mark.anyio
async def test_processes_left_to_the_sandbox_close_their_connections(marker: str) -> None:
    # Processes nobody closed, one mid-output and one mid-write, dropped once their sandbox
    # closed: every connection is closed, none left for the collector to warn about. And the
    # close is prompt: the engine held the container while it waited to deliver the output
    # nobody read (about 20 s when the processes were hung up after the removal).
    sb = await sandbay.create_sandbox(CONFIG, spec(marker))
    talker = await sb.start(["sh", "-c", "echo up; exec head -c 100000000 /dev/zero"])
    deaf = await sb.start(["python3", "-c", "import time; print('up', flush=True); time.sleep(60)"])
    assert isinstance(talker, DockerProcess) and isinstance(deaf, DockerProcess)
    with anyio.fail_after(30):
        assert await anext(talker.stdout.lines()) == b"up"
        assert await anext(deaf.stdout.lines()) == b"up"
    socks = [talker._sock, deaf._sock]
    with anyio.move_on_after(0.5):
        await deaf.write(bytes(16 << 20))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.monotonic()
        await sb.aclose()  # shielded: a timeout would not interrupt it
        closing = time.monotonic() - started
        del talker, deaf
        for _ in range(3):
            await anyio.lowlevel.checkpoint()  # the loop finishes closing what it hung up
        gc.collect()
    assert [w.message for w in caught if issubclass(w.category, ResourceWarning)] == []
    assert [sock.fileno() for sock in socks] == [-1, -1]
    assert closing < 10, f"closing the sandbox took {closing:.1f} s"


@pytest.mark.anyio
async def test_list_and_destroy(marker: str) -> None:
    provider = sandbay.get_provider(CONFIG)
    async with sandbay.open_sandbox(CONFIG, spec(marker)) as sb:
        (info,) = await provider.list(labels={"test": marker})
        assert (info.id, info.provider, info.status) == (sb.id, "docker", "running")
        assert info.labels["sandbay.managed"] == "1"
        await provider.destroy(sb.id)
        assert await provider.list(labels={"test": marker}) == []
        with pytest.raises(SandboxNotFoundError):
            await sb.exec(["true"])
        await provider.destroy(sb.id)  # already gone: fine


@pytest.mark.anyio
async def test_gc_removes_an_expired_sandbox(client: Any, marker: str) -> None:
    provider = sandbay.get_provider(CONFIG)
    async with (
        sandbay.open_sandbox(CONFIG, spec(marker, lifetime_s=1)) as short,
        sandbay.open_sandbox(CONFIG, spec(marker, lifetime_s=3600)) as long,
    ):
        await anyio.sleep(2.5)  # its expiry (whole seconds) has passed
        removed = {info.id: why for info, why in await provider.gc()}
        assert removed.get(short.id) == "expired"
        assert long.id not in removed
        assert [c.id for c in containers(client, marker)] == [long.id]


# --- errors and status -------------------------------------------------------------------


@pytest.mark.anyio
async def test_unreachable_daemon_says_how_to_start_it(marker: str) -> None:
    config = DockerConfig(base_url=MISSING_SOCKET)
    provider = DockerProvider(config)  # no I/O yet
    with pytest.raises(ProviderUnavailableError, match="sudo dockerd") as caught:
        await provider.create(spec(marker, image="sandbay-base:bookworm"))
    assert isinstance(caught.value, ConnectionError)
    assert MISSING_SOCKET in str(caught.value)
    status = await provider.status()
    assert (status.installed, status.reachable) == (True, False)
    assert "systemctl start docker" in status.detail
    with pytest.raises(ProviderUnavailableError):
        await provider.list()


@pytest.mark.anyio
async def test_status_of_a_running_engine() -> None:
    status = await DockerProvider(CONFIG).status()
    assert status.reachable and status.installed
    assert "Docker" in status.detail


def test_permission_denied_on_the_socket_is_explained() -> None:
    # The error requests raises for a socket the user may not open, as it chains it.
    denied = requests.exceptions.ConnectionError("Connection aborted.")
    denied.__context__ = PermissionError(13, "Permission denied")
    error = map_docker_error(docker.errors.DockerException("fetching version"))
    assert not isinstance(error, ProviderUnavailableError)
    wrapped = docker.errors.DockerException("Error while fetching server API version")
    wrapped.__cause__ = denied
    error = map_docker_error(wrapped, base_url="unix:///var/run/docker.sock")
    assert isinstance(error, ProviderUnavailableError)
    assert "docker group" in str(error)


# --- the agent image ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_agent_image_has_the_claude_cli_and_not_the_sdk(client: Any) -> None:
    image = await DockerProvider(CONFIG).agent_image()
    assert image.startswith("sandbay-agent:")
    script = (
        "import importlib.util, shutil, subprocess, sys\n"
        "print(sys.executable, importlib.util.find_spec('claude_agent_sdk'))\n"
        "print(subprocess.run([shutil.which('claude'), '--version'], capture_output=True,"
        " text=True).stdout)\n"
    )
    for name in (image, AGENT_IMAGE):
        out = client.containers.run(
            name, ["python3", "-c", script], remove=True, network_mode="none"
        ).decode()
        assert out.startswith("/usr/bin/python3 None\n"), out
        assert "Claude Code" in out


def test_build_is_skipped_when_the_inputs_are_built(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    with caplog.at_level(logging.DEBUG, logger="sandbay.image"):
        tag = build_agent_image(CONFIG)
    assert tag.startswith("sandbay-agent:")
    lines = [r.getMessage() for r in caplog.records if r.name == "sandbay.image"]
    assert f"{tag} is already built" in lines
    assert not any(line.startswith("Step ") for line in lines)
    # Progress is logged, not printed: a library leaves the terminal to its application.
    assert capsys.readouterr() == ("", "")


@pytest.mark.anyio
async def test_provider_builds_its_image_through_the_hook(
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = DockerProvider(CONFIG)
    try:
        with caplog.at_level(logging.INFO, logger="sandbay.image"):
            tag = await provider.build_image()
        # The hook's image is the one sandboxes then use, found without building again.
        assert await provider.agent_image() == tag
    finally:
        await provider.aclose()
    assert f"{tag} is already built" in caplog.messages
    assert build_agent_image(CONFIG) == tag


def test_missing_base_image_is_explained() -> None:
    with pytest.raises(ImageError, match=r"sandbay-no-such-base:0.*never pulls"):
        build_agent_image(CONFIG, base="sandbay-no-such-base:0")
