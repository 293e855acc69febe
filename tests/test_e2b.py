"""The e2b provider on the real ``e2b`` SDK, against the local fake E2B (tests/e2b_fake.py).

The fake speaks E2B's REST API and envd's Connect-RPC; its sandboxes run under bubblewrap
on this machine, so the real ``claude`` CLI runs in them against the scripted model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from claude_agent_sdk import ClaudeAgentOptions, ResultMessage, SystemMessage, query

import sandbay
from e2b_fake import API_KEY, FakeE2B
from sandbay import SandboxSpec
from sandbay.testing import ScriptedModel, Turn
from sandbay.testing.conformance import _APPEARS

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.bwrap,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bwrap not installed"),
]

OPTIONS = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"])


@pytest.fixture
def fake() -> Iterator[FakeE2B]:
    with FakeE2B() as running:
        yield running


def bash_then_done(command: str, *, delay_s: float = 0.0) -> list[Any]:
    return [Turn.tool_use("Bash", {"command": command}), Turn.text("done", delay_s=delay_s)]


def shape(messages: list[Any]) -> list[str]:
    return [type(m).__name__ for m in messages]


# --- creates: retries, faults, refusals ---------------------------------------------------


@pytest.mark.parametrize("idempotent", [True, False], ids=["idempotent", "labels-only"])
async def test_create_retried_on_429_and_5xx_leaves_exactly_one_sandbox(
    fake: FakeE2B, idempotent: bool
) -> None:
    # A 429, a 503, then a create that makes the sandbox but answers 500: the retry must
    # find the sandbox that landed by its labels and adopt it, not make a second, even
    # where the control plane ignores the idempotency key.
    fake.idempotent = idempotent
    fake.create_faults = [429, 503]
    fake.create_faults_after = [500]
    config = fake.config()
    async with sandbay.open_sandbox(config, SandboxSpec(labels={"t": "retry"})) as sb:
        assert (await sb.exec(["echo", "ok"])).stdout == b"ok\n"
        assert list(fake.sandboxes) == [sb.id]
        listed = await sandbay.get_provider(config).list(labels={"t": "retry"})
        assert [info.id for info in listed] == [sb.id]
    assert fake.creates == 1
    assert fake.create_faults == [] and fake.create_faults_after == []
    assert not fake.sandboxes


async def test_create_gives_up_after_its_attempts_and_leaves_nothing(fake: FakeE2B) -> None:
    fake.create_faults = [429] * 3
    with pytest.raises(sandbay.ProviderUnavailableError, match="rate limiting"):
        async with sandbay.open_sandbox(fake.config(create_attempts=3)):
            pass
    assert fake.creates == 0 and not fake.sandboxes


async def test_slow_create_that_lands_after_the_client_gave_up_is_adopted(
    fake: FakeE2B,
) -> None:
    # The first try times out on the client while the control plane goes on to make the
    # sandbox; the retry (same idempotency key) must end with that one sandbox. (Without
    # the key, a try still in flight when the last one returned could land later: E2B's
    # timeout, the lease, bounds it; docs/providers/e2b.md says so.)
    fake.create_delay_s = 1.5
    config = fake.config(request_timeout=1.0)
    async with sandbay.open_sandbox(config) as sb:
        assert (await sb.exec(["true"])).ok
        await anyio.sleep(2)  # anything still in flight lands
        assert list(fake.sandboxes) == [sb.id]
    assert fake.creates == 1


async def test_unknown_template_is_an_image_error(fake: FakeE2B) -> None:
    with pytest.raises(sandbay.ImageError, match="sandbay image build --provider e2b"):
        async with sandbay.open_sandbox(fake.config(template="no-such-template")):
            pass
    assert fake.creates == 0


@pytest.mark.parametrize("field", ["cpu", "memory_mb"])
async def test_cpu_and_memory_are_refused_before_any_request(fake: FakeE2B, field: str) -> None:
    spec = SandboxSpec.model_validate({field: 1})
    with pytest.raises(sandbay.ConfigError, match=f"spec.{field}.*template"):
        async with sandbay.open_sandbox(fake.config(), spec):
            pass
    assert fake.requests == []


async def test_host_network_is_refused_on_a_real_account(fake: FakeE2B) -> None:
    config = fake.config(reaches_host_loopback=False)
    with pytest.raises(sandbay.ConfigError, match="network"):
        async with sandbay.open_sandbox(config, SandboxSpec(network="host")):
            pass


async def test_wrong_api_key_is_a_config_error(fake: FakeE2B) -> None:
    with pytest.raises(sandbay.ConfigError, match="E2B_API_KEY"):
        async with sandbay.open_sandbox(fake.config(api_key="e2b_wrong")):
            pass


async def test_unknown_id_is_not_found(fake: FakeE2B) -> None:
    with pytest.raises(sandbay.SandboxNotFoundError):
        await sandbay.get_provider(fake.config()).connect("i0000000000000000")
    await sandbay.get_provider(fake.config()).destroy("i0000000000000000")  # not an error


async def test_users_are_e2b_users(fake: FakeE2B) -> None:
    async with sandbay.open_sandbox(fake.config()) as sb:
        assert (await sb.exec(["sh", "-c", "echo $USER"])).stdout == b"user\n"
        assert (await sb.exec(["sh", "-c", "echo $USER"], user="root")).stdout == b"root\n"
        with pytest.raises(sandbay.ConfigError, match="nobody-here"):
            await sb.exec(["true"], user="nobody-here")


# --- list, lease, gc, reattach ------------------------------------------------------------


async def test_list_follows_pagination() -> None:
    with FakeE2B(page_size=2) as fake:
        config = fake.config()
        marker = {"page": str(time.time())}
        async with (
            sandbay.open_sandbox(config, SandboxSpec(labels=marker)) as a,
            sandbay.open_sandbox(config, SandboxSpec(labels=marker)) as b,
            sandbay.open_sandbox(config, SandboxSpec(labels=marker)) as c,
            sandbay.open_sandbox(config, SandboxSpec(labels={"page": "other"})),
            sandbay.open_sandbox(config, SandboxSpec(labels=marker)) as d,
        ):
            fake.requests.clear()
            found = await sandbay.get_provider(config).list(labels=marker)
            assert sorted(i.id for i in found) == sorted(s.id for s in (a, b, c, d))
            pages = [r for r in fake.requests if r == ("GET", "/v2/sandboxes")]
            assert len(pages) == 2  # 4 matches, 2 per page


async def test_extend_moves_e2b_timeout(fake: FakeE2B) -> None:
    config = fake.config()
    async with sandbay.open_sandbox(config, SandboxSpec(lifetime_s=120)) as sb:
        expiry = await sb.extend(3000)
        (info,) = [i for i in await sandbay.get_provider(config).list() if i.id == sb.id]
        assert info.lease is not None and abs(info.lease - expiry) <= 1.5
        assert abs(fake.sandboxes[sb.id].end_at.timestamp() - expiry) <= 1.5


async def test_extend_rides_out_a_rate_limit(fake: FakeE2B) -> None:
    # Creates run without the SDK's retries (sandbay retries them itself); the lease
    # renewal must not inherit that: a 429 on set_timeout is retried by the SDK.
    async with sandbay.open_sandbox(fake.config()) as sb:
        fake.timeout_faults = [429]
        expiry = await sb.extend(600)
        assert fake.timeout_faults == []
        assert abs(fake.sandboxes[sb.id].end_at.timestamp() - expiry) <= 1.5


async def test_e2b_kills_a_sandbox_whose_timeout_passed(fake: FakeE2B) -> None:
    sb = await sandbay.create_sandbox(fake.config(), SandboxSpec(lifetime_s=1))
    try:
        assert await anyio.to_thread.run_sync(fake.wait_killed, sb.id, 30)
        with pytest.raises(sandbay.SandboxNotFoundError):
            await sb.exec(["true"])
    finally:
        await sb.aclose()


def _child(fake: FakeE2B, code: str, *args: str) -> str:
    """Run ``code`` in another Python process with the fake's config (key from the env)."""
    config = fake.config().public_data()
    env = {**os.environ, "E2B_API_KEY": API_KEY}
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(config), *args],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().strip()


_LEAVE_BEHIND = """
import anyio, json, os, sys
import sandbay
from sandbay._config import config_from_data

async def main():
    config = config_from_data(json.loads(sys.argv[1]))
    sb = await sandbay.create_sandbox(config, sandbay.SandboxSpec(lifetime_s=600))
    await sb.write_file("left.txt", b"by the dead host")
    print(sb.id, flush=True)
    os._exit(0)  # dies without closing anything, as a killed host would

anyio.run(main)
"""

_REATTACH = """
import anyio, json, os, sys
import sandbay
from sandbay._config import config_from_data

async def main():
    config = config_from_data(json.loads(sys.argv[1]))
    sb = await sandbay.get_provider(config).connect(sys.argv[2])
    data = await sb.read_file("left.txt")
    result = await sb.exec(["sh", "-c", "echo reattached > back.txt && cat left.txt"])
    print(data.decode(), result.stdout.decode(), sb.labels["sandbay.managed"], sb.workdir)

anyio.run(main)
# The e2b SDK's HTTP client (pyqwest) can abort the interpreter while it shuts down, after
# all of the above succeeded; the sandbay command leaves the same way for that reason.
sys.stdout.flush()
os._exit(0)
"""


async def test_gc_reaps_what_a_killed_host_left_and_another_process_reattaches(
    fake: FakeE2B,
) -> None:
    sandbox_id = await anyio.to_thread.run_sync(_child, fake, _LEAVE_BEHIND)
    assert sandbox_id in fake.sandboxes
    # A second OS process reattaches by id and works in it.
    out = await anyio.to_thread.run_sync(_child, fake, _REATTACH, sandbox_id)
    assert out == "by the dead host by the dead host 1 /workspace"
    provider = sandbay.get_provider(fake.config())
    sb = await provider.connect(sandbox_id)
    assert await sb.read_file("back.txt") == b"reattached\n"
    # gc keeps it while its lease runs, and removes it once the lease passed.
    assert await provider.gc() == []
    removed = await provider.gc(now=time.time() + 700)
    assert [(info.id, reason) for info, reason in removed] == [(sandbox_id, "expired")]
    assert sandbox_id not in fake.sandboxes
    assert sandbox_id in fake.killed


# --- the agent end to end -----------------------------------------------------------------


async def test_run_agent_end_to_end_through_the_fake(fake: FakeE2B) -> None:
    script = bash_then_done("echo e2b-$((6*7)); pwd")
    async with ScriptedModel(script) as model:
        run = sandbay.run_agent(
            "go", provider=fake.config(), options=OPTIONS, env=model.env(), timeout=120
        )
        async with run:
            messages = [m async for m in run]
        results = model.tool_results()
    assert isinstance(messages[0], SystemMessage) and messages[0].subtype == "init"
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error
    assert "e2b-42" in str(results) and "/workspace" in str(results)
    assert run.sandbox is not None and run.sandbox.closed
    assert not fake.sandboxes
    starts = [r for r in fake.requests if r[1] == "/process.Process/Start"]
    assert starts  # the relay ran through envd's process service


async def test_cut_process_stream_is_resumed_from_the_log_without_loss(fake: FakeE2B) -> None:
    # The last turn is slow, so the cut comes while the CLI is still running. The fake
    # drops the relay's Start stream right after the first assistant message went out.
    script = bash_then_done("echo resumed-ok", delay_s=4)
    fake.cut_stdout_after(b'"type":"assistant"', command=" serve --run-dir ")
    async with ScriptedModel(script) as model:
        options = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"], env=model.env())
        async with sandbay.open_sandbox(fake.config()) as sb:
            transport = sandbay.SandboxTransport(sb, options)
            with anyio.fail_after(120):
                messages = [
                    m async for m in query(prompt="go", options=options, transport=transport)
                ]
    async with ScriptedModel(script) as model:
        local_options = ClaudeAgentOptions(max_turns=4, allowed_tools=["Bash"], env=model.env())
        local = [m async for m in query(prompt="go", options=local_options)]
    assert fake.cut_rules[0].times == 0, "the stream was never cut"
    assert any("replay" in c for c in fake.started), "the transport never replayed the log"
    assert shape(messages) == shape(local)
    assert "resumed-ok" in str(messages)
    assert isinstance(messages[-1], ResultMessage) and not messages[-1].is_error


# --- the profile and status ---------------------------------------------------------------


async def test_profile_loads_and_status_tells_what_is_missing(
    fake: FakeE2B, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("E2B_API_KEY", raising=False)
    profile = sandbay.load_config(Path(__file__).parents[1] / "providers" / "e2b.toml")
    assert isinstance(profile.provider, sandbay.E2BConfig)
    assert profile.provider.user == "user" and profile.spec.lifetime_s == 3600
    status = await sandbay.get_provider(profile.provider).status()
    assert not status.reachable and "E2B_API_KEY" in status.detail
    monkeypatch.setenv("E2B_API_KEY", API_KEY)
    keyed = sandbay.load_config(Path(__file__).parents[1] / "providers" / "e2b.toml")
    assert keyed.provider.api_key is not None  # type: ignore[attr-defined]
    status = await sandbay.get_provider(fake.config()).status()
    assert status.reachable and fake.url in status.detail


async def test_closing_a_sandbox_lets_go_of_unread_process_streams(fake: FakeE2B) -> None:
    # A process nobody read to its end (a pool's idle relay, a killed command) holds an
    # HTTP stream; closing the sandbox must close it, not leave it to the loop's finalizer.
    async with sandbay.open_sandbox(fake.config()) as sb:
        idle = await sb.start(["sleep", "60"])
        killed = await sb.start(["sleep", "60"])
        await killed.kill()
    for proc in (idle, killed):
        assert proc._events is None  # type: ignore[attr-defined]


# Holds an exclusive lock on argv[1] for a minute, having said so in argv[1] + ".held"; a
# lock dies with its holder, so another process (in another PID namespace) can tell whether
# it still runs.
_HOLDER = """\
import fcntl, sys, time
f = open(sys.argv[1], "a")
fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
open(sys.argv[1] + ".held", "w").close()
time.sleep(60)
"""

# Exit 0 once the lock on argv[1] is free (within argv[2] seconds), else 1.
_LOCK_FREE = """\
import fcntl, sys, time
f = open(sys.argv[1], "a")
deadline = time.monotonic() + float(sys.argv[2])
while True:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        sys.exit(0)
    except BlockingIOError:
        if time.monotonic() > deadline:
            sys.exit(1)
        time.sleep(0.1)
"""


async def test_exec_cancelled_before_envd_reported_its_start_kills_what_envd_started(
    fake: FakeE2B,
) -> None:
    # envd starts a process before it sends the start event that carries its pid, and a
    # loaded host may read that event late: an exec cancelled in between must still kill
    # the process envd started, not drop the stream and leave it running.
    async with sandbay.open_sandbox(fake.config()) as sb:
        await sb.write_file("holder.py", _HOLDER.encode())
        release = fake.hold_start_events("holder.py")

        try:
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(sb.exec, [sb.python, "holder.py", "late.lock"])
                    appeared = await sb.exec([sb.python, "-c", _APPEARS, "late.lock.held", "30"])
                    assert appeared.ok, "the holder did not start within 30 s"
                    tg.cancel_scope.cancel()
                    release()  # the start event now reaches a start that was cancelled
        finally:
            release()
        free = await sb.exec([sb.python, "-c", _LOCK_FREE, "late.lock", "10"])
        assert free.exit_code == 0, "the cancelled command's process still ran 10 s later"


@pytest.mark.parametrize("mode", ["cold", "warm", "burst"])
def test_committed_benchmark_rows_say_they_are_client_overhead_only(mode: str) -> None:
    from sandbay._bench._report import BenchReport

    results = Path(__file__).parents[1] / "benchmarks" / "results"
    report = BenchReport.from_json((results / f"{mode}-e2b-fake.json").read_text())
    label = "(fake control plane: client overhead only)"
    rendered = report.to_markdown()
    rows = [line for line in rendered.splitlines() if line.startswith("| e2b")]
    # Every row, the warm mode's "(handshake at take)" one included, names the fake.
    assert rows and all(row.split(" | ")[0].endswith(label) for row in rows)
    assert (results / f"{mode}-e2b-fake.md").read_text() == rendered
