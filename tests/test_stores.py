"""The session-store adapters against real servers started here, on 127.0.0.1 only.

redis-server and PostgreSQL come from Debian packages (scripts/setup installs them), the S3
endpoint is moto's standalone server from PyPI, spoken to by boto3. A test whose server is
missing skips locally and fails under CI=true or SANDBAY_REQUIRE_DOCKER=1, so CI never passes
without having run them.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from claude_agent_sdk import SessionStore
from claude_agent_sdk.testing import run_session_store_conformance
from pydantic import SecretStr

from sandbay import (
    ConfigError,
    MissingDependencyError,
    ProviderUnavailableError,
    SandboxClosedError,
    SandboxFileTooLargeError,
)
from sandbay.stores import (
    PostgresSessionStore,
    RedisSessionStore,
    S3SessionStore,
    SQLiteSessionStore,
)

pytestmark = pytest.mark.anyio

KINDS = [
    "sqlite",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("postgres", marks=pytest.mark.postgres),
    pytest.param("s3", marks=pytest.mark.s3),
]
BUCKET = "sandbay-sessions"
START_TIMEOUT = 30.0


def _required() -> bool:
    return os.environ.get("CI") == "true" or os.environ.get("SANDBAY_REQUIRE_DOCKER") == "1"


def _missing(what: str) -> None:
    """Skip, or fail where the servers are required."""
    if _required():
        pytest.fail(f"{what}; CI needs it (scripts/setup installs it)")
    pytest.skip(what)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _closed_port() -> int:
    return _free_port()  # nothing listens there once the probe socket is closed


def _wait_for_line(stream: IO[str], needle: str, proc: subprocess.Popen[str]) -> str:
    """Read `stream` until a line holds `needle`; the server's own signal that it is up."""
    seen = []
    for line in stream:
        seen.append(line)
        if needle in line:
            return line
    proc.wait(timeout=5)
    raise RuntimeError(f"server exited ({proc.returncode}) before {needle!r}:\n{''.join(seen)}")


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for thread in _drains.pop(proc.pid, []):
        thread.join(timeout=5)  # EOF once the server (and its children) are gone
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


_drains: dict[int, list[threading.Thread]] = {}


def _drain(proc: subprocess.Popen[str], stream: IO[str]) -> None:
    """Keep reading a server's output in a thread so a full pipe never blocks it."""

    def read() -> None:
        for _ in stream:
            pass

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    _drains.setdefault(proc.pid, []).append(thread)


# -- the servers ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        _missing("redis-server is not installed (apt-get install redis-server)")
        raise AssertionError  # unreachable
    port = _free_port()
    argv = [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        _wait_for_line(proc.stdout, "Ready to accept connections", proc)
        _drain(proc, proc.stdout)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _stop(proc)


def _postgres_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    # Debian keeps the server's programs out of PATH, under its major version.
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return candidates[-1] if candidates else None


def _traversable_tmp() -> str:
    """A temp folder another user can reach (a root-only /tmp is common in containers)."""
    for base in (tempfile.gettempdir(), "/var/tmp", "/dev/shm"):
        path = Path(base)
        if path.is_dir() and all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents]):
            return str(path)
    raise RuntimeError("no temp folder that the postgres user can reach")


@pytest.fixture(scope="module")
def postgres_dsn() -> Iterator[str]:
    initdb, postgres = _postgres_bin("initdb"), _postgres_bin("postgres")
    if initdb is None or postgres is None:
        _missing("PostgreSQL is not installed (apt-get install postgresql)")
        raise AssertionError  # unreachable
    # PostgreSQL refuses to run as root: run it as the postgres user the package made.
    user: dict[str, Any] = {}
    if os.geteuid() == 0:
        user = {"user": "postgres", "group": "postgres", "extra_groups": []}
    root = tempfile.mkdtemp(prefix="sandbay-pg-", dir=_traversable_tmp())
    try:
        if user:
            shutil.chown(root, "postgres", "postgres")
        data = os.path.join(root, "data")
        subprocess.run(
            [initdb, "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "-N"],
            check=True,
            capture_output=True,
            **user,
        )
        port = _free_port()
        argv = [postgres, "-D", data, "-h", "127.0.0.1", "-p", str(port), "-k", root, "-F"]
        proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **user
        )
        try:
            assert proc.stderr is not None
            _wait_for_line(proc.stderr, "ready to accept connections", proc)
            _drain(proc, proc.stderr)
            yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
        finally:
            _stop(proc, signal.SIGINT)  # SIGINT: fast shutdown
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which(
        "moto_server"
    )
    if exe is None:
        _missing('moto_server is not installed (pip install "moto[server]")')
        raise AssertionError  # unreachable
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        _wait_for_line(proc.stderr, "Running on", proc)
        _drain(proc, proc.stderr)
        url = f"http://127.0.0.1:{port}"
        import boto3

        client = boto3.client("s3", endpoint_url=url, **_S3_CREDENTIALS)
        try:
            client.create_bucket(Bucket=BUCKET)
        finally:
            client.close()
        yield url
    finally:
        _stop(proc)


_S3_CREDENTIALS: dict[str, Any] = {
    "region_name": "us-east-1",
    "aws_access_key_id": "testing",
    "aws_secret_access_key": "testing",
}


# -- one factory per kind: each call a fresh, isolated store -------------------------------

Factory = Callable[..., Any]  # entries are open JSON objects: Any, not the TypedDict


@pytest.fixture(params=KINDS)
async def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    kind: str = request.param
    made: list[Any] = []
    base = _server_for(request, kind)

    shared_tag = uuid.uuid4().hex[:12]

    def make(*, shared: bool = False, **options: Any) -> Any:
        """A store with data of its own, or (`shared`) the data of the test's shared store."""
        tag = shared_tag if shared else uuid.uuid4().hex[:12]
        store: Any
        if kind == "sqlite":
            store = SQLiteSessionStore(tmp_path / f"{tag}.sqlite3", **options)
        elif kind == "redis":
            store = RedisSessionStore(base, prefix=f"test-{tag}:", **options)
        elif kind == "postgres":
            store = PostgresSessionStore(base, table=f"t_{tag}", **options)
        else:
            store = S3SessionStore(
                BUCKET,
                prefix=f"{tag}/",
                endpoint_url=base,
                region_name="us-east-1",
                access_key_id="testing",
                secret_access_key="testing",
                **options,
            )
        made.append(store)
        return store

    yield make
    for store in made:
        await store.aclose()


def _server_for(request: pytest.FixtureRequest, kind: str) -> str:
    if kind == "sqlite":
        return ""
    fixture = {"redis": "redis_url", "postgres": "postgres_dsn", "s3": "s3_endpoint"}[kind]
    value: str = request.getfixturevalue(fixture)
    return value


# -- the SDK's conformance suite -----------------------------------------------------------


async def test_conformance(make_store: Factory) -> None:
    """All 14 contracts (13 for S3, which has no summaries) against the real server."""
    await run_session_store_conformance(make_store)


async def test_optional_methods_implemented(make_store: Factory) -> None:
    """The conformance run above skips what a store does not implement: pin what each does."""
    store = make_store()
    base = SessionStore
    implemented = {
        m
        for m in ("list_sessions", "list_session_summaries", "delete", "list_subkeys")
        if getattr(type(store), m) is not getattr(base, m)
    }
    expected = {"list_sessions", "delete", "list_subkeys"}
    if not isinstance(store, S3SessionStore):
        expected.add("list_session_summaries")
    assert implemented == expected


# -- what the suite does not cover ---------------------------------------------------------

KEY: Any = {"project_key": "proj", "session_id": "sess"}


async def test_uuid_is_an_idempotency_key(make_store: Factory) -> None:
    """A retried batch (the SDK retries failed appends) is stored once."""
    store = make_store()
    batch = [{"type": "user", "uuid": "u1", "n": 1}, {"type": "x", "n": 2}]
    await store.append(KEY, batch)
    await store.append(KEY, [batch[0], {"type": "user", "uuid": "u2", "n": 3}])
    assert await store.load(KEY) == [*batch, {"type": "user", "uuid": "u2", "n": 3}]


async def test_entries_round_trip_unusual_json(make_store: Factory) -> None:
    """NUL characters, non-ASCII text, nesting and big numbers come back deep-equal."""
    store = make_store()
    entry = {
        "type": "tool_result",
        "uuid": "u",
        "text": "nul\x00 ünïcode 日本 \U0001f600 \n\t",
        "nested": {"a": [1, 2.5, None, True, {"b": {}}], "": []},
        "big": 2**62,
    }
    await store.append(KEY, [entry])
    assert await store.load(KEY) == [entry]


async def test_entry_larger_than_max_entry_bytes_is_refused(make_store: Factory) -> None:
    store = make_store(max_entry_bytes=1000)
    with pytest.raises(SandboxFileTooLargeError, match="max_entry_bytes"):
        await store.append(KEY, [{"type": "x", "blob": "a" * 2000}])
    assert await store.load(KEY) is None  # nothing of the batch was written


async def test_transcript_larger_than_max_load_bytes_is_refused(make_store: Factory) -> None:
    store = make_store(max_load_bytes=5000)
    for i in range(10):
        await store.append(KEY, [{"type": "x", "uuid": f"u{i}", "blob": "a" * 900}])
    with pytest.raises(SandboxFileTooLargeError, match="max_load_bytes"):
        await store.load(KEY)


@pytest.mark.parametrize(
    "key",
    [
        {"project_key": "", "session_id": "s"},
        {"project_key": "p", "session_id": 7},
        {"project_key": "p", "session_id": "s", "subpath": ""},
        {"project_key": "p" * 2000, "session_id": "s"},
    ],
)
async def test_bad_key_is_a_config_error(make_store: Factory, key: Any) -> None:
    store = make_store()
    with pytest.raises(ConfigError):
        await store.append(key, [{"type": "x"}])


async def test_keys_with_separators_stay_apart(make_store: Factory) -> None:
    """Parts holding the layout's separators (/ : { } %) cannot collide with other keys."""
    store = make_store()
    a: Any = {"project_key": "a/b", "session_id": "c"}
    b: Any = {"project_key": "a", "session_id": "b/c"}
    c: Any = {"project_key": "a:{x}%2F", "session_id": "s:t", "subpath": "subagents/x:y"}
    for i, key in enumerate((a, b, c)):
        await store.append(key, [{"type": "x", "i": i}])
    assert [await store.load(k) for k in (a, b, c)] == [
        [{"type": "x", "i": 0}],
        [{"type": "x", "i": 1}],
        [{"type": "x", "i": 2}],
    ]
    assert await store.list_subkeys({"project_key": c["project_key"], "session_id": "s:t"}) == [
        "subagents/x:y"
    ]


async def test_aclose_is_idempotent_and_final(make_store: Factory) -> None:
    store: Any = make_store()
    await store.append(KEY, [{"type": "x"}])
    await store.aclose()
    await store.aclose()
    with pytest.raises(SandboxClosedError):
        await store.load(KEY)


async def test_two_stores_share_the_data(make_store: Factory) -> None:
    """What one store object wrote, another one (another process, another sandbox) reads."""
    first = make_store(shared=True)
    await first.append(KEY, [{"type": "x", "uuid": "1"}])
    second = make_store(shared=True)
    assert await second.load(KEY) == [{"type": "x", "uuid": "1"}]
    await second.append(KEY, [{"type": "x", "uuid": "2"}])
    assert await second.list_sessions("proj") == await first.list_sessions("proj")
    assert await first.load(KEY) == [{"type": "x", "uuid": "1"}, {"type": "x", "uuid": "2"}]


async def test_concurrent_appends_from_two_stores_lose_nothing(make_store: Factory) -> None:
    """Two writers (two sandboxes' mirrors) on one session: every line lands, each writer's in
    its own order, and the summary stays readable."""
    import anyio

    stores = [make_store(shared=True), make_store(shared=True)]

    async def writer(w: int) -> None:
        for i in range(15):
            await stores[w].append(KEY, [{"type": "x", "uuid": f"{w}-{i}", "w": w, "i": i}])

    async with anyio.create_task_group() as tg:
        for w in (0, 1):
            tg.start_soon(writer, w)
    loaded = await stores[0].load(KEY)
    assert len(loaded) == 30
    for w in (0, 1):
        assert [e["i"] for e in loaded if e["w"] == w] == list(range(15))
    if not isinstance(stores[0], S3SessionStore):
        summaries = await stores[1].list_session_summaries("proj")
        assert [s["session_id"] for s in summaries] == ["sess"]


# -- errors --------------------------------------------------------------------------------


async def test_unreachable_servers_raise_provider_unavailable() -> None:
    """A refused connection is a ProviderUnavailableError naming the address, not the secret."""
    port = _closed_port()
    secret = SecretStr("hunter2-secret")
    stores: list[Any] = [
        RedisSessionStore(f"redis://127.0.0.1:{port}/0", password=secret, socket_timeout=5),
        PostgresSessionStore(f"postgresql://postgres@127.0.0.1:{port}/postgres", password=secret),
        S3SessionStore(
            BUCKET,
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            access_key_id="testing",
            secret_access_key=secret,
            max_attempts=1,
        ),
    ]
    for store in stores:
        try:
            with pytest.raises(ProviderUnavailableError, match=f"127.0.0.1:{port}") as caught:
                await store.append(KEY, [{"type": "x"}])
            assert "hunter2" not in str(caught.value)
            assert "hunter2" not in repr(caught.value)
        finally:
            await store.aclose()


@pytest.mark.s3
async def test_missing_bucket_is_a_config_error(s3_endpoint: str) -> None:
    store = S3SessionStore(
        "no-such-bucket",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        access_key_id="testing",
        secret_access_key="testing",
    )
    async with store:
        with pytest.raises(ConfigError, match="NoSuchBucket"):
            await store.append(KEY, [{"type": "x"}])


@pytest.mark.parametrize(
    ("module", "make", "extra"),
    [
        ("redis", lambda: RedisSessionStore("redis://127.0.0.1:1/0"), "redis"),
        ("psycopg", lambda: PostgresSessionStore("postgresql://127.0.0.1:1/x"), "postgres"),
        ("psycopg_pool", lambda: PostgresSessionStore("postgresql://127.0.0.1:1/x"), "postgres"),
        ("boto3", lambda: S3SessionStore(BUCKET), "s3"),
    ],
)
def test_missing_client_library_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str, make: Callable[[], object], extra: str
) -> None:
    # A None entry in sys.modules makes `import module` raise ImportError, as if uninstalled.
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependencyError, match=rf'pip install "sandbay\[{extra}\]"'):
        make()


@pytest.mark.parametrize(
    "make",
    [
        lambda: SQLiteSessionStore(":memory:", max_entry_bytes=0),
        lambda: RedisSessionStore("redis://127.0.0.1:1/0", prefix="a{b}"),
        lambda: RedisSessionStore("http://127.0.0.1:1/0"),
        lambda: PostgresSessionStore("postgresql://127.0.0.1:1/x", table="Robert'); DROP"),
        lambda: S3SessionStore(BUCKET, access_key_id="only-half"),
    ],
)
def test_bad_settings_are_config_errors(make: Callable[[], object]) -> None:
    with pytest.raises(ConfigError):
        make()


def test_import_sandbay_does_not_import_stores_or_clients() -> None:
    code = (
        "import sys, sandbay, sandbay.stores\n"
        "print(sorted(m for m in ('redis', 'psycopg', 'psycopg_pool', 'boto3', 'botocore')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == []
    code = "import sys, sandbay; print('sandbay.stores' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
