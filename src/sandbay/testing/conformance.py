"""The conformance suite: what "this provider works" means, as runnable checks.

Every provider runs the same checks, through the public API only. Run them all at once::

    report = await run_conformance("docker", spec=SandboxSpec(network="none"))
    report.raise_for_failures()

or one pytest test per check::

    @pytest.mark.parametrize("check", check_names())
    async def test_conformance(check):
        await run_check(check, "docker", spec=SandboxSpec(network="none"))

Each check opens its own sandboxes (labelled ``sandbay-conformance``) and closes them, so
checks are independent and can run in any order. The checks that need the provider itself
(`Provider.list`, `Provider.gc`, `Provider.destroy`) get it from `sandbay.get_provider`.

A check fails by raising `CheckFailed` (an `AssertionError`) with a message that says what was
expected and what happened; any other exception is a failure too.

Checks that depend on timing wait for events, not for fixed lengths of time, so a slow
provider makes them slower, not flaky: a line the process prints, a file it writes once it
is ready, a lock that comes free when the last process holding it is gone. Where a promise
depends on who the sandbox's user is (root may read anything), the check asks a process of
that user inside the sandbox first and holds the file API to the same answer.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shlex
import tempfile
import time
import traceback
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import aclosing
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar, Union

import anyio

from .._api import get_provider, open_sandbox
from .._config import ProviderConfig, SandbayConfig
from .._errors import (
    ConfigError,
    SandboxClosedError,
    SandboxError,
    SandboxFileExistsError,
    SandboxFileNotFoundError,
    SandboxFileTooLargeError,
    SandboxIsADirectoryError,
    SandboxNotADirectoryError,
    SandboxNotFoundError,
    SandboxPermissionError,
    SandboxTimeoutError,
)
from .._provider import Provider, SandboxInfo
from .._sandbox import CLOSE_TIMEOUT, ExecResult, Process, Sandbox, SandboxSpec

__all__ = [
    "CHECKS",
    "Check",
    "CheckFailed",
    "CheckResult",
    "ConformanceReport",
    "Target",
    "check_names",
    "run_check",
    "run_conformance",
]

#: Seconds one check may take before it counts as failed (50 MB round trips included).
DEFAULT_TIMEOUT = 120.0
#: Label on every sandbox the suite opens, so leftovers are easy to find.
LABEL = "sandbay-conformance"

ProviderArg = Union[str, ProviderConfig, SandbayConfig]  # noqa: UP007 - a runtime alias


class CheckFailed(AssertionError):
    """A conformance check found the provider breaking the `Sandbox` contract."""


@dataclass(frozen=True)
class Target:
    """What the checks run against: a provider and the spec its sandboxes start from.

    Attributes:
        provider: A provider name or config, as `sandbay.open_sandbox` takes it.
        spec: The base spec; checks add labels, env, a lifetime or limits to it.
    """

    provider: ProviderArg
    spec: SandboxSpec = field(default_factory=SandboxSpec)

    def sandbox(
        self,
        *,
        labels: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        lifetime_s: float | None = None,
        cpu: float | None = None,
        memory_mb: int | None = None,
    ) -> open_sandbox:
        """An ``async with`` block holding a new sandbox built from `spec` plus these."""
        data = self.spec.model_dump()
        data["labels"] = {**self.spec.labels, LABEL: "1", **(labels or {})}
        data["env"] = {**self.spec.env, **(env or {})}
        for name, value in (("lifetime_s", lifetime_s), ("cpu", cpu), ("memory_mb", memory_mb)):
            if value is not None:
                data[name] = value
        return open_sandbox(self.provider, SandboxSpec.model_validate(data))

    def get_provider(self) -> Provider:
        """The `Provider` the sandboxes come from."""
        return get_provider(self.provider)


Check = Callable[[Target], Awaitable[None]]
"""One conformance check: raises `CheckFailed` (or anything else) when the provider fails."""

_checks: dict[str, Check] = {}
CHECKS: Mapping[str, Check] = MappingProxyType(_checks)
"""Every check by name, in the order they run."""

_C = TypeVar("_C", bound=Check)
_T = TypeVar("_T")


def _check(func: _C) -> _C:
    _checks[func.__name__.removeprefix("check_")] = func
    return func


def check_names() -> list[str]:
    """Names of all checks, in the order `run_conformance` runs them."""
    return list(_checks)


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check.

    Attributes:
        name: The check's name.
        passed: Whether it passed.
        seconds: How long it took.
        error: Why it failed (``None`` if it passed).
        details: The traceback of an unexpected exception, if any.
    """

    name: str
    passed: bool
    seconds: float
    error: str | None = None
    details: str | None = None


@dataclass(frozen=True)
class ConformanceReport:
    """All results of one `run_conformance` call.

    Attributes:
        provider: The provider's name.
        results: One result per check run, in order.
    """

    provider: str
    results: tuple[CheckResult, ...]

    @property
    def ok(self) -> bool:
        """Whether every check that ran passed."""
        return all(result.passed for result in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        """The checks that failed."""
        return [result for result in self.results if not result.passed]

    def __str__(self) -> str:
        passed = len(self.results) - len(self.failures)
        lines = [f"{self.provider}: {passed}/{len(self.results)} conformance checks passed"]
        lines += [f"  FAIL {result.name}: {result.error}" for result in self.failures]
        return "\n".join(lines)

    def raise_for_failures(self) -> None:
        """Raise `CheckFailed` listing every failure, if there is any."""
        if not self.ok:
            raise CheckFailed(str(self))


async def run_check(
    name: str,
    provider: ProviderArg,
    *,
    spec: SandboxSpec | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Run one check; return if it passes, raise if it fails.

    Args:
        name: One of `check_names`.
        provider: A provider name or config, as `sandbay.open_sandbox` takes it.
        spec: The spec sandboxes start from; default that of a `SandbayConfig`, else
            `SandboxSpec()`.
        timeout: Seconds the check may take.

    Raises:
        CheckFailed: The provider broke the contract, or the check ran past ``timeout``.
        ConfigError: Unknown check name.
    """
    check = _checks.get(name)
    if check is None:
        raise ConfigError(f"unknown conformance check {name!r}; valid: {', '.join(_checks)}")
    target = Target(provider, _default_spec(provider, spec))
    with anyio.move_on_after(timeout) as scope:
        await check(target)
    if scope.cancelled_caught:
        raise CheckFailed(f"{name}: did not finish within {timeout:g} s")


async def run_conformance(
    provider: ProviderArg,
    *,
    spec: SandboxSpec | None = None,
    only: Collection[str] | None = None,
    skip: Collection[str] = (),
    timeout: float = DEFAULT_TIMEOUT,
) -> ConformanceReport:
    """Run the checks one after another and report every result; never raises for a failure.

    Args:
        provider: A provider name or config, as `sandbay.open_sandbox` takes it.
        spec: The spec sandboxes start from (see `run_check`).
        only: Run just these checks.
        skip: Leave these out (for a contract point a provider documents it cannot keep).
        timeout: Seconds each check may take.

    Raises:
        ConfigError: ``only`` or ``skip`` names an unknown check.
    """
    unknown = sorted((set(only or ()) | set(skip)) - set(_checks))
    if unknown:
        raise ConfigError(f"unknown conformance checks {unknown}; valid: {', '.join(_checks)}")
    names = [n for n in _checks if (only is None or n in only) and n not in skip]
    results = []
    for name in names:
        started = time.monotonic()
        try:
            await run_check(name, provider, spec=spec, timeout=timeout)
        except CheckFailed as exc:
            results.append(CheckResult(name, False, time.monotonic() - started, str(exc)))
        except Exception as exc:
            results.append(
                CheckResult(
                    name,
                    False,
                    time.monotonic() - started,
                    _describe(exc),
                    traceback.format_exc(),
                )
            )
        else:
            results.append(CheckResult(name, True, time.monotonic() - started))
    return ConformanceReport(_provider_name(provider), tuple(results))


def _default_spec(provider: ProviderArg, spec: SandboxSpec | None) -> SandboxSpec:
    if spec is not None:
        return spec
    return provider.spec if isinstance(provider, SandbayConfig) else SandboxSpec()


def _provider_name(provider: ProviderArg) -> str:
    if isinstance(provider, str):
        return provider
    if isinstance(provider, SandbayConfig):
        return provider.provider.type
    return provider.type


# --- helpers -------------------------------------------------------------------------------


def expect(condition: object, message: str) -> None:
    """Fail the check with ``message`` unless ``condition`` holds."""
    if not condition:
        raise CheckFailed(message)


def _describe(exc: BaseException) -> str:
    """``Type: message``, looking inside exception groups (what leaked out of a task group)."""
    inner = getattr(exc, "exceptions", None)
    if isinstance(inner, tuple) and inner:
        return f"{type(exc).__name__}[{', '.join(_describe(e) for e in inner)}]"
    return f"{type(exc).__name__}: {exc}"


def _short(data: bytes | str, limit: int = 200) -> str:
    text = repr(data)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(data)} in all)"


def _py(sb: Sandbox, code: str, *args: str) -> list[str]:
    return [sb.python, "-c", code, *args]


async def _run(sb: Sandbox, argv: str | Sequence[str], **kwargs: Any) -> ExecResult:
    """exec that fails the check when the command fails."""
    result = await sb.exec(argv, **kwargs)
    expect(
        result.exit_code == 0,
        f"{argv!r} exited {result.exit_code}; stderr: {_short(result.stderr)}",
    )
    return result


async def _expect_raises(
    error: type[BaseException], action: Callable[[], Awaitable[object]], what: str
) -> BaseException:
    try:
        await action()
    except error as exc:
        return exc
    except Exception as exc:
        raise CheckFailed(f"{what}: expected {error.__name__}, got {_describe(exc)}") from exc
    raise CheckFailed(f"{what}: expected {error.__name__}, nothing was raised")


async def _expect_missing(sb: Sandbox, path: str, why: str) -> None:
    try:
        data = await sb.read_file(path)
    except SandboxFileNotFoundError:
        return
    raise CheckFailed(f"{path} exists (contents {_short(data)}): {why}")


async def _first_line(proc: Process, timeout: float = 10) -> bytes:
    with anyio.move_on_after(timeout):
        async with _closing(proc.stdout.lines()) as lines:
            async for line in lines:
                return line
        raise CheckFailed("the process ended its stdout without writing a line")
    raise CheckFailed(f"no line on stdout within {timeout:g} s")


async def _wait(proc: Process, timeout: float = 10) -> int:
    with _within(timeout, "waiting for the process to exit"):
        return await proc.wait()
    raise AssertionError("unreachable")  # pragma: no cover - _within raises


@contextlib.asynccontextmanager
async def _closing(lines: AsyncIterator[bytes]) -> AsyncIterator[AsyncIterator[bytes]]:
    """Finalise an async generator such as `ByteStream.lines` when the block ends early."""
    try:
        yield lines
    finally:
        aclose = getattr(lines, "aclose", None)
        if aclose is not None:
            await aclose()


@contextlib.contextmanager
def _within(seconds: float, what: str) -> Iterator[None]:
    """Fail the check (rather than hang) if the block takes longer than ``seconds``."""
    with anyio.move_on_after(seconds) as scope:
        yield
    if scope.cancelled_caught:
        raise CheckFailed(f"{what}: no result within {seconds:g} s")


async def _gather(calls: Sequence[Callable[[], Awaitable[_T]]]) -> list[_T]:
    """Run calls at once and return their results in order (they should not raise)."""
    results: dict[int, _T] = {}

    async def one(i: int) -> None:
        results[i] = await calls[i]()

    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(one, i)
    return [results[i] for i in range(len(calls))]


def _fail_all(problems: Sequence[str], what: str) -> None:
    """Fail with every problem found (checks that try several cases report them all)."""
    if problems:
        raise CheckFailed(f"{what}: " + "; ".join(problems))


def _digest(data: bytes) -> str:
    # Never the contents: the file may be one the sandbox's user must not see.
    return f"{len(data)} bytes (sha256 {hashlib.sha256(data).hexdigest()[:12]})"


async def _exists(sb: Sandbox, path: str) -> bool:
    result = await sb.exec(["test", "-e", path])
    return result.ok


# Exit 0 as soon as argv[1] exists, 1 if it has not within argv[2] seconds.
_APPEARS = """\
import os, sys, time
deadline = time.monotonic() + float(sys.argv[2])
while not os.path.lexists(sys.argv[1]):
    if time.monotonic() > deadline:
        sys.exit(1)
    time.sleep(0.02)
"""


async def _appears(sb: Sandbox, path: str, within: float) -> bool:
    """Whether a file shows up within ``within`` seconds (a process announcing an event)."""
    result = await sb.exec(_py(sb, _APPEARS, path, str(within)), timeout=within + 30)
    return result.ok


# --- what the sandbox's own user sees --------------------------------------------------------

# Reads a file as a process of the sandbox's user, as `cat` would (the same open and read),
# and names the errno when that fails: the bytes on stdout, or exit 3 and the name on stderr.
_READ_AS_USER = """\
import errno, sys
try:
    with open(sys.argv[1], 'rb') as f:
        data = f.read()
except OSError as exc:
    sys.stderr.write(errno.errorcode.get(exc.errno, str(exc.errno)))
    sys.exit(3)
sys.stdout.buffer.write(data)
"""

# Whether the sandbox's user could do what write_file promises (create the parents, then the
# file), as `mkdir -p` and `echo x > path` would; undoes it. Exit 0 and the directories it
# made (deepest first, as JSON), or exit 3 and the errno's name on stderr. It never touches
# an existing file: only new paths (and directories, which fail with EISDIR) are probed.
_CREATE_AS_USER = """\
import errno, json, os, sys
path = sys.argv[1]
if os.path.lexists(path) and not os.path.isdir(path):
    sys.exit(f'{path} exists: only new paths are probed')
parent = os.path.dirname(path.rstrip('/')) or '.'
made, p = [], parent
while not os.path.lexists(p):
    made.append(p)
    p = os.path.dirname(p) or '.'
try:
    if made:
        os.makedirs(parent)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
except OSError as exc:
    for d in made:
        try:
            os.rmdir(d)
        except OSError:
            pass
    sys.stderr.write(errno.errorcode.get(exc.errno, str(exc.errno)))
    sys.exit(3)
os.unlink(path)
for d in made:
    os.rmdir(d)
print(json.dumps(made))
"""

_ERRNO_ERRORS: Mapping[str, type[SandboxError]] = {
    "ENOENT": SandboxFileNotFoundError,
    "EACCES": SandboxPermissionError,
    "EPERM": SandboxPermissionError,
    "EISDIR": SandboxIsADirectoryError,
    "ENOTDIR": SandboxNotADirectoryError,
}


async def _read_as_user(sb: Sandbox, path: str) -> tuple[bytes | None, str]:
    """What a process of the sandbox's user reads at path: (bytes, "") or (None, errno name)."""
    result = await sb.exec(_py(sb, _READ_AS_USER, path))
    if result.exit_code == 0:
        return result.stdout, ""
    expect(
        result.exit_code == 3 and result.stderr,
        f"reading {path!r} in the sandbox failed oddly: {result.exit_code}, "
        f"{_short(result.stderr)}",
    )
    return None, result.stderr.decode(errors="replace").strip()


async def _read_matches_user(sb: Sandbox, path: str) -> str | None:
    """Compare read_file(path) with what the sandbox's user reads there; None if they agree,
    else what differs."""
    seen, errname = await _read_as_user(sb, path)
    wanted = _ERRNO_ERRORS.get(errname, SandboxError)
    try:
        data = await sb.read_file(path)
    except Exception as exc:
        if seen is not None:
            return (
                f"read_file({path!r}) raised {_describe(exc)}, but the sandbox's "
                f"user reads {_digest(seen)} there"
            )
        if not isinstance(exc, wanted):
            return (
                f"read_file({path!r}) raised {_describe(exc)}; the sandbox's user "
                f"gets {errname} there, so {wanted.__name__} was expected"
            )
        return None
    if seen is None:
        return (
            f"read_file({path!r}) returned {_digest(data)}, which the sandbox's user cannot "
            f"read ({errname}); expected {wanted.__name__}"
        )
    if data != seen:
        return (
            f"read_file({path!r}) returned {_digest(data)}, the sandbox's user reads "
            f"{_digest(seen)} there"
        )
    return None


async def _write_matches_user(sb: Sandbox, path: str) -> str | None:
    """Compare write_file(path) with what the sandbox's user could do there; None if they
    agree, else what differs. Removes what it created where the user could create it."""
    data = b"written by the sandbay conformance suite\n"
    probe = await sb.exec(_py(sb, _CREATE_AS_USER, path))
    if probe.exit_code == 0:
        made: list[str] = json.loads(probe.stdout)
        try:
            await sb.write_file(path, data)
            back, errname = await _read_as_user(sb, path)
            if back != data:
                seen = _digest(back) if back is not None else errname
                return f"write_file({path!r}) succeeded, but the sandbox's user reads {seen}"
        except Exception as exc:
            return (
                f"write_file({path!r}) raised {_describe(exc)}, but the sandbox's "
                "user may create that file"
            )
        finally:
            await sb.exec(["rm", "-f", "--", path])
            for directory in made:
                await sb.exec(["rmdir", "--", directory])
        return None
    expect(
        probe.exit_code == 3 and probe.stderr,
        f"probing {path!r} in the sandbox failed oddly: {probe.exit_code}, {_short(probe.stderr)}",
    )
    errname = probe.stderr.decode(errors="replace").strip()
    wanted = _ERRNO_ERRORS.get(errname, SandboxError)
    try:
        await sb.write_file(path, data)
    except Exception as exc:
        if not isinstance(exc, wanted):
            return (
                f"write_file({path!r}) raised {_describe(exc)}; the sandbox's user "
                f"gets {errname} there, so {wanted.__name__} was expected"
            )
        if (await sb.exec(["test", "-f", path])).ok:
            return f"write_file({path!r}) raised {wanted.__name__} but created the file anyway"
        return None
    created = (await sb.exec(["test", "-f", path])).ok
    return (
        f"write_file({path!r}) succeeded{' (a file is there now)' if created else ''}, where "
        f"the sandbox's user gets {errname}; expected {wanted.__name__}"
    )


# --- processes that try to outlive their command ----------------------------------------------

_HOLDER = ".sandbay-hold.py"
# Takes an exclusive flock on argv[1] and holds it for a minute, announcing itself with its
# pid on stdout (and in argv[1].pid, written once it holds the lock), then letting go of the
# command's stdio. A lock dies with the last process holding it, so another exec can tell
# whether the holder still runs by waiting for the lock: an event, where `kill -0 <pid>`
# would need the same PID namespace (each isolated exec may have its own). With "daemon" it
# first detaches as daemons do: fork, new session, fork again.
_HOLD = """\
import fcntl, os, sys, time
lock, how = sys.argv[1], sys.argv[2]
if how == 'daemon':
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
f = open(lock, 'a')
fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
with open(lock + '.tmp', 'w') as out:
    out.write(str(os.getpid()))
os.replace(lock + '.tmp', lock + '.pid')
try:
    print('held', os.getpid(), flush=True)
except OSError:
    pass  # nobody reads any more: keep holding regardless
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
time.sleep(60)
"""

# Exit 0 once the lock on argv[1] is free (waiting up to argv[2] whole seconds), else 1.
_LOCK_FREE = """\
import fcntl, signal, sys
f = open(sys.argv[1], 'a')
wait = int(sys.argv[2])
if wait:
    signal.signal(signal.SIGALRM, lambda *_: sys.exit(1))
    signal.alarm(wait)
    fcntl.flock(f, fcntl.LOCK_EX)
else:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        sys.exit(1)
"""

#: Seconds a killed process's descendants get to be gone.
_GONE_WITHIN = 10

# Ways a command's child leaves its process group or session (or its parent) behind.
_ESCAPES: Mapping[str, str] = {
    "setsid": "setsid {hold} plain </dev/null &",
    "double fork": "( {hold} plain </dev/null & )",
    "nohup": "nohup {hold} plain </dev/null &",
    "daemon (fork, setsid, fork)": "{hold} daemon </dev/null",
}


async def _install_holder(sb: Sandbox) -> None:
    await sb.write_file(_HOLDER, _HOLD.encode())


def _hold(sb: Sandbox, lock: str) -> str:
    """The shell words that start the lock holder on ``lock`` (its mode follows)."""
    return f"{shlex.quote(sb.python)} {_HOLDER} {shlex.quote(lock)}"


def _escape_script(sb: Sandbox, how: str, lock: str) -> str:
    """A command that leaves a lock holder behind in the given way, then sleeps."""
    return _ESCAPES[how].format(hold=_hold(sb, lock)) + "\nexec sleep 60\n"


async def _lock_free(sb: Sandbox, lock: str, wait: int) -> bool:
    result = await sb.exec(_py(sb, _LOCK_FREE, lock, str(wait)), timeout=wait + 30)
    expect(
        result.exit_code in (0, 1),
        f"waiting for the lock {lock!r} failed: {result.exit_code}, {_short(result.stderr)}",
    )
    return result.exit_code == 0


async def _holder_pid(sb: Sandbox, lock: str) -> str:
    try:
        return (await sb.read_file(lock + ".pid")).decode(errors="replace")
    except SandboxFileNotFoundError:
        return ""


async def _still_running(sb: Sandbox, lock: str) -> str | None:
    """None once the holder of ``lock`` is gone (waiting a bounded time), else a complaint."""
    if await _lock_free(sb, lock, _GONE_WITHIN):
        return None
    pid = await _holder_pid(sb, lock)
    who = f"a descendant (pid {pid} in the sandbox)" if pid else "a descendant"
    return f"{who} still ran {_GONE_WITHIN} s later"


async def _exec_past_timeout(sb: Sandbox, script: Callable[[str], str], name: str) -> list[str]:
    """Run ``exec(["sh", "-c", script(lock)], timeout=t)`` until the command took its lock
    before its timeout (t doubles from 1 s, so a slow provider gets time to start it).

    Returns:
        The lock of each try, the last one taken; their holders must all be gone.
    """
    timeout = 1.0
    locks: list[str] = []
    while True:
        lock = f"{name}-{len(locks)}.lock"
        locks.append(lock)
        try:
            result = await sb.exec(["sh", "-c", script(lock)], timeout=timeout)
        except SandboxTimeoutError:
            pass
        else:
            raise CheckFailed(f"{name}: the command ended before its timeout: {result}")
        if await _exists(sb, lock + ".pid"):
            return locks
        if timeout >= 16:
            raise CheckFailed(f"{name}: the command did not start its child within {timeout:g} s")
        timeout *= 2


# --- commands ------------------------------------------------------------------------------


@_check
async def check_exit_codes(target: Target) -> None:
    """Exit statuses 0, 1 and 42 come back as they are; `ok` is true only for 0."""
    async with target.sandbox() as sb:
        for code in (0, 1, 42):
            result = await sb.exec(["sh", "-c", f"exit {code}"])
            expect(result.exit_code == code, f"`exit {code}` gave exit code {result.exit_code}")
            expect(result.ok == (code == 0), f"ExecResult.ok is {result.ok} for exit {code}")


@_check
async def check_stdout_stderr_separate(target: Target) -> None:
    """stdout and stderr are kept apart."""
    async with target.sandbox() as sb:
        result = await _run(sb, ["sh", "-c", "printf out; printf err >&2; printf out2"])
        expect(result.stdout == b"outout2", f"stdout was {_short(result.stdout)}")
        expect(result.stderr == b"err", f"stderr was {_short(result.stderr)}")


@_check
async def check_large_output_both_streams(target: Target) -> None:
    """10 MiB on stdout and 10 MiB on stderr, interleaved, arrive whole without deadlock."""
    code = (
        "import sys\n"
        "out, err = b'o' * 65536, b'e' * 65536\n"
        "for _ in range(160):\n"
        "    sys.stdout.buffer.write(out); sys.stdout.flush()\n"
        "    sys.stderr.buffer.write(err); sys.stderr.flush()\n"
    )
    size = 160 * 65536
    async with target.sandbox() as sb:
        result = await _run(sb, _py(sb, code))
        expect(len(result.stdout) == size, f"stdout had {len(result.stdout)} bytes, not {size}")
        expect(len(result.stderr) == size, f"stderr had {len(result.stderr)} bytes, not {size}")
        expect(result.stdout == b"o" * size, "stdout held bytes the command did not write")
        expect(result.stderr == b"e" * size, "stderr held bytes the command did not write")


@_check
async def check_binary_output_exact(target: Target) -> None:
    """Every byte value, NUL and CR included, comes through stdout unchanged."""
    data = bytes(range(256)) * 64 + b"\r\n\x00\r"
    async with target.sandbox() as sb:
        result = await _run(sb, _py(sb, f"import sys; sys.stdout.buffer.write({data!r})"))
        expect(result.stdout == data, f"stdout was {_short(result.stdout)}, not the 256 values")


@_check
async def check_non_utf8_output(target: Target) -> None:
    """Bytes that are not UTF-8 are kept as bytes; `ExecResult.text` replaces them."""
    data = b"caf\xe9 \xff\xfe\x80\n"
    code = f"import sys; sys.stdout.buffer.write({data!r}); sys.stderr.buffer.write({data!r})"
    async with target.sandbox() as sb:
        result = await _run(sb, _py(sb, code))
        expect(result.stdout == data, f"stdout was {_short(result.stdout)}, not {data!r}")
        expect(result.stderr == data, f"stderr was {_short(result.stderr)}, not {data!r}")
        expect("\ufffd" in result.text, f"ExecResult.text was {result.text!r}")


@_check
async def check_output_streams_before_exit(target: Target) -> None:
    """Output is readable while the process runs, not only once it exits."""
    code = "import sys, time; print('first', flush=True); time.sleep(60)"
    async with target.sandbox() as sb:
        proc = await sb.start(_py(sb, code))
        try:
            line = await _first_line(proc)
            expect(line == b"first", f"first line was {line!r}")
            expect(proc.returncode is None, "the process had exited; it sleeps for 60 s")
        finally:
            await proc.kill()
        await _wait(proc)


@_check
async def check_stdin_interactive(target: Target) -> None:
    """stdin streams while output is read: each line written gets its answer back at once."""
    code = (
        "import sys\n"
        "while True:\n"
        "    line = sys.stdin.readline()\n"
        "    if not line: break\n"
        "    sys.stdout.write('echo:' + line); sys.stdout.flush()\n"
    )
    async with target.sandbox() as sb:
        proc = await sb.start(_py(sb, code))
        async with _closing(proc.stdout.lines()) as lines:
            for i in range(5):
                await proc.write(f"line {i}\n".encode())
                answer = b""
                with _within(10, f"reading the answer to line {i}"):
                    answer = await lines.__anext__()
                expect(answer == f"echo:line {i}".encode(), f"answer {i} was {answer!r}")
        await proc.close_stdin()
        code_ = await _wait(proc)
        expect(code_ == 0, f"the echo process exited {code_} after end of input")


@_check
async def check_stdin_eof_ends_cat(target: Target) -> None:
    """`close_stdin` sends end-of-file (cat exits); it is idempotent."""
    async with target.sandbox() as sb:
        proc = await sb.start(["cat"])
        await proc.write(b"hello\n")
        await proc.write(b"world")
        await proc.close_stdin()
        await proc.close_stdin()
        out = b""
        with _within(10, "reading cat's output after close_stdin"):
            out = await proc.stdout.read()
        expect(out == b"hello\nworld", f"cat echoed {out!r}")
        code = await _wait(proc)
        expect(code == 0, f"cat exited {code}")


@_check
async def check_exec_without_input_gets_eof(target: Target) -> None:
    """exec without ``input`` gives the command an empty stdin, so `cat` returns at once."""
    async with target.sandbox() as sb:
        try:
            result = await sb.exec(["cat"], timeout=10)
        except SandboxTimeoutError:
            raise CheckFailed("`cat` waited for stdin: exec did not close it") from None
        expect(result.ok and result.stdout == b"", f"cat gave {result}")


@_check
async def check_exec_large_input(target: Target) -> None:
    """8 MiB through exec(input=...) into `cat` comes back whole (stdin and stdout at once)."""
    data = os.urandom(8 * 2**20)
    async with target.sandbox() as sb:
        result = await _run(sb, ["cat"], input=data)
        expect(
            result.stdout == data,
            f"cat returned {len(result.stdout)} bytes, not the {len(data)} fed to it"
            if len(result.stdout) != len(data)
            else "cat returned different bytes than it was fed",
        )


@_check
async def check_write_after_close_stdin(target: Target) -> None:
    """`write` after `close_stdin` raises BrokenPipeError."""
    async with target.sandbox() as sb:
        proc = await sb.start(["cat"])
        await proc.close_stdin()
        await _expect_raises(
            BrokenPipeError, lambda: proc.write(b"late"), "write after close_stdin"
        )
        await _wait(proc)


@_check
async def check_write_after_exit(target: Target) -> None:
    """`write` to a process that has exited raises BrokenPipeError (soon, if not at once)."""
    async with target.sandbox() as sb:
        proc = await sb.start(["sh", "-c", "exit 0"])
        await _wait(proc)

        async def write_until_broken() -> None:
            for _ in range(64):
                await proc.write(b"x" * 65536)

        await _expect_raises(BrokenPipeError, write_until_broken, "writing 4 MiB after exit")


@_check
async def check_exec_input_str(target: Target) -> None:
    """exec(input=...) takes a str too, fed to stdin as UTF-8."""
    text: Any = "héllo wörld €\n😀"  # Any: a str where older signatures said bytes
    async with target.sandbox() as sb:
        try:
            result = await sb.exec(["cat"], input=text)
        except Exception as exc:
            raise CheckFailed(f"exec(input=str) raised {_describe(exc)}") from exc
        expect(result.ok, f"cat exited {result.exit_code}: {_short(result.stderr)}")
        expect(
            result.stdout == text.encode(),
            f"cat printed {result.stdout!r}, not the UTF-8 of {text!r}",
        )


@_check
async def check_exec_timeout_validated(target: Target) -> None:
    """A timeout that is not a positive finite number raises ConfigError naming it, and the
    command does not run."""
    argv = ["sh", "-c", "echo ran >> timeout-ran.txt"]
    async with target.sandbox() as sb:
        problems = []
        for bad in (-1, 0, -0.5, math.nan, math.inf):
            try:
                await sb.exec(argv, timeout=bad)
            except ConfigError as exc:
                if "timeout" not in str(exc):
                    problems.append(f"timeout={bad!r}: ConfigError does not name it: {exc}")
            except Exception as exc:
                problems.append(f"timeout={bad!r}: {_describe(exc)}")
            else:
                problems.append(f"timeout={bad!r} was accepted")
        if await _exists(sb, "timeout-ran.txt"):
            problems.append("the command ran despite the invalid timeout")
        _fail_all(problems, "expected ConfigError for each")


# --- environment and working directory ------------------------------------------------------

_SHOW_ENV = 'printf "%s|%s|%s" "$SANDBAY_CHECK_A" "$SANDBAY_CHECK_B" "$SANDBAY_CHECK_C"'


@_check
async def check_env_from_spec(target: Target) -> None:
    """The spec's env reaches every process."""
    env = {"SANDBAY_CHECK_A": "from spec", "SANDBAY_CHECK_B": "b=1;'x'"}
    async with target.sandbox(env=env) as sb:
        for argv in (["sh", "-c", _SHOW_ENV], _SHOW_ENV):
            result = await _run(sb, argv)
            expect(
                result.stdout == b"from spec|b=1;'x'|", f"env was {result.stdout!r} for {argv!r}"
            )


@_check
async def check_env_per_exec_override(target: Target) -> None:
    """env given to exec adds and overrides variables for that command only."""
    async with target.sandbox(env={"SANDBAY_CHECK_A": "spec", "SANDBAY_CHECK_B": "kept"}) as sb:
        result = await _run(
            sb, _SHOW_ENV, env={"SANDBAY_CHECK_A": "exec", "SANDBAY_CHECK_C": "new"}
        )
        expect(result.stdout == b"exec|kept|new", f"with exec env, got {result.stdout!r}")
        result = await _run(sb, _SHOW_ENV)
        expect(result.stdout == b"spec|kept|", f"the override persisted: {result.stdout!r}")


_SAME_DIR = "import os, sys; print(os.getcwd()); sys.exit(0 if os.path.samefile(os.getcwd(), sys.argv[1]) else 3)"  # noqa: E501


@_check
async def check_cwd_default_is_workdir(target: Target) -> None:
    """Processes start in `Sandbox.workdir`, an absolute path."""
    async with target.sandbox() as sb:
        expect(sb.workdir.startswith("/"), f"workdir {sb.workdir!r} is not absolute")
        result = await sb.exec(_py(sb, _SAME_DIR, sb.workdir))
        expect(result.ok, f"cwd was {result.text.strip()!r}, not workdir {sb.workdir!r}")


@_check
async def check_cwd_explicit(target: Target) -> None:
    """cwd relative to workdir, and absolute, are honoured."""
    async with target.sandbox() as sb:
        await sb.write_file("sub/dir/keep", b"")
        result = await sb.exec(_py(sb, _SAME_DIR, sb.resolve("sub/dir")), cwd="sub/dir")
        expect(result.ok, f"cwd='sub/dir' ran in {result.text.strip()!r}")
        absolute = sb.resolve("sub")
        result = await sb.exec(_py(sb, _SAME_DIR, absolute), cwd=absolute)
        expect(result.ok, f"cwd={absolute!r} ran in {result.text.strip()!r}")


@_check
async def check_relative_paths_resolve_to_workdir(target: Target) -> None:
    """Relative paths in write_file and read_file mean the same file processes see there."""
    async with target.sandbox() as sb:
        await sb.write_file("rel.txt", b"relative")
        for argv in (["cat", "rel.txt"], ["cat", f"{sb.workdir.rstrip('/')}/rel.txt"]):
            result = await _run(sb, argv)
            expect(result.stdout == b"relative", f"{argv!r} printed {result.stdout!r}")
        await _run(sb, "printf made > made.txt")
        for path in ("made.txt", sb.resolve("made.txt")):
            data = await sb.read_file(path)
            expect(data == b"made", f"read_file({path!r}) gave {data!r}")


#: Tries one after another, then at once, of a failure whose message could get lost.
_TRIES_ALONE, _TRIES_AT_ONCE = 4, 20


async def _tries(one: Callable[[int], Awaitable[str | None]]) -> list[str]:
    """Run ``one(i)`` alone, then many at once; return its problems, each once, counted."""
    found = [await one(i) for i in range(_TRIES_ALONE)]
    total = _TRIES_ALONE + _TRIES_AT_ONCE
    found += await _gather([functools.partial(one, i) for i in range(_TRIES_ALONE, total)])
    problems = [p for p in found if p]
    if not problems:
        return []
    return [f"{len(problems)} of {total} tries failed", *problems[:3]]


@_check
async def check_bad_cwd_reported(target: Target) -> None:
    """exec with a cwd that does not exist exits non-zero with the directory named on stderr,
    every time: 4 tries one after another, then 20 at once (no message lost under load)."""
    async with target.sandbox() as sb:

        async def one(i: int) -> str | None:
            name = f"sandbay-no-such-dir-{i}"
            cwd = name if i % 2 else sb.resolve(name)
            result = await sb.exec(["true"], cwd=cwd)
            if result.exit_code == 0:
                return f"cwd={cwd!r} exited 0"
            if name.encode() not in result.stderr:
                return (
                    f"cwd={cwd!r} exited {result.exit_code} without naming it on stderr "
                    f"(stderr {_short(result.stderr)}, stdout {_short(result.stdout)})"
                )
            return None

        found = await _tries(one)
        _fail_all(found, "a missing working directory")


_NO_USER = "nosuchuser-sandbay"


@_check
async def check_bad_user_reported(target: Target) -> None:
    """exec as a user that does not exist raises ConfigError naming the user, or exits
    non-zero with the user named on stderr: every time, 4 tries one after another, then 20 at
    once (Docker's message must not get lost under load)."""
    async with target.sandbox() as sb:

        async def one(i: int) -> str | None:
            try:
                result = await sb.exec(["true"], user=_NO_USER)
            except ConfigError as exc:
                return None if _NO_USER in str(exc) else f"try {i}: ConfigError: {exc}"
            except Exception as exc:
                return f"try {i}: {_describe(exc)}"
            if result.exit_code == 0:
                return f"try {i}: exited 0"
            if _NO_USER.encode() not in result.stderr:
                return (
                    f"try {i}: exited {result.exit_code} without naming the user on stderr "
                    f"(stderr {_short(result.stderr)}, stdout {_short(result.stdout)})"
                )
            return None

        found = await _tries(one)
        _fail_all(found, f"user={_NO_USER!r}")


# --- timeouts, kill, signals ----------------------------------------------------------------


@_check
async def check_exec_timeout_kills(target: Target) -> None:
    """A command past its timeout raises SandboxTimeoutError soon and is really killed.

    Killed means gone: the command holds a lock, and the lock must come free (an event, not
    a wait of fixed length). The timeout grows from 1 s until the command has taken its lock
    before being killed, so a slow provider cannot make the check pass without testing.
    """
    async with target.sandbox() as sb:
        started = time.monotonic()
        exc = await _expect_raises(
            SandboxTimeoutError,
            lambda: sb.exec(["sh", "-c", "sleep 60"], timeout=0.5),
            "exec past its timeout",
        )
        elapsed = time.monotonic() - started
        expect(isinstance(exc, TimeoutError), "SandboxTimeoutError is not a TimeoutError")
        expect(elapsed < 10, f"exec(timeout=0.5) returned only after {elapsed:.1f} s")
        await _install_holder(sb)
        locks = await _exec_past_timeout(
            sb, lambda lock: f"exec {_hold(sb, lock)} plain", "timeout"
        )
        for lock in locks:
            problem = await _still_running(sb, lock)
            expect(problem is None, f"the timed-out command kept running: {problem}")


@_check
async def check_cancelled_exec_kills(target: Target) -> None:
    """Cancelling the task running exec kills the command (once it has surely started)."""
    async with target.sandbox() as sb:
        await _install_holder(sb)
        lock = "cancel.lock"
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(sb.exec, ["sh", "-c", f"exec {_hold(sb, lock)} plain"]))
            started = await _appears(sb, lock + ".pid", 30)
            tg.cancel_scope.cancel()
        expect(started, "the command did not start within 30 s")
        problem = await _still_running(sb, lock)
        expect(problem is None, f"the cancelled command kept running: {problem}")


@_check
async def check_kill_started_process(target: Target) -> None:
    """kill ends a running process; wait returns non-zero; kill and wait repeat safely."""
    async with target.sandbox() as sb:
        proc = await sb.start(["sleep", "60"])
        expect(proc.returncode is None, f"returncode was {proc.returncode} while running")
        await proc.kill()
        code = await _wait(proc)
        expect(code != 0, "a killed process reported exit code 0")
        expect(proc.returncode == code, f"returncode {proc.returncode} != wait() {code}")
        await proc.kill()
        again = await _wait(proc)
        expect(again == code, f"a second wait() gave {again}, the first {code}")


@_check
async def check_kill_kills_children(target: Target) -> None:
    """kill also stops what the process started (a background child here)."""
    async with target.sandbox() as sb:
        await _install_holder(sb)
        proc = await sb.start(["sh", "-c", f"{_hold(sb, 'child.lock')} plain & wait"])
        line = await _first_line(proc, timeout=30)
        expect(line.startswith(b"held "), f"first line was {line!r}")
        await proc.kill()
        await _wait(proc)
        problem = await _still_running(sb, "child.lock")
        expect(problem is None, f"kill left the command's child running: {problem}")


@_check
async def check_kill_after_exit_keeps_code(target: Target) -> None:
    """kill after the process exited is harmless and keeps its exit code."""
    async with target.sandbox() as sb:
        proc = await sb.start(["sh", "-c", "exit 7"])
        expect(await _wait(proc) == 7, "`exit 7` did not give 7")
        await proc.kill()
        code = await _wait(proc)
        expect(code == 7 and proc.returncode == 7, f"after kill, exit code became {code}")


@_check
async def check_signal_exit_code(target: Target) -> None:
    """A process killed by signal N reports -N (or 128+N where the provider cannot tell)."""
    async with target.sandbox() as sb:
        result = await sb.exec(["sh", "-c", "kill -TERM $$"])
        expect(result.exit_code in (-15, 143), f"SIGTERM gave exit code {result.exit_code}")


@_check
async def check_returncode_none_while_running(target: Target) -> None:
    """returncode is None until the process exits, then its exit code."""
    async with target.sandbox() as sb:
        proc = await sb.start(["cat"])
        expect(proc.returncode is None, f"returncode {proc.returncode} right after start")
        await proc.write(b"x\n")
        echoed = b""
        with _within(10, "reading what cat echoed"):
            echoed = await proc.stdout.__anext__()
        expect(echoed == b"x\n", f"cat echoed {echoed!r}")
        expect(proc.returncode is None, f"returncode {proc.returncode} while cat waits")
        await proc.close_stdin()
        await proc.stdout.read()
        code = await _wait(proc)
        expect(code == 0 and proc.returncode == 0, f"cat exited {code}, {proc.returncode}")


# Each command announces itself, then waits (at most 30 s) until all 8 have: it can only get
# past this barrier if the execs really run at the same time.
_BARRIER = (
    'touch "started.$1"; n=0; '
    'while [ "$(ls started.* | wc -l)" -lt 8 ]; do '
    'n=$((n + 1)); [ "$n" -gt 600 ] && exit 9; sleep 0.05; done; '
    'echo "$1"; echo "e$1" >&2'
)


@_check
async def check_concurrent_execs(target: Target) -> None:
    """8 execs in one sandbox run at the same time (each waits until all have started), each
    with its own output."""
    async with target.sandbox() as sb:
        results = await _gather(
            [functools.partial(sb.exec, ["sh", "-c", _BARRIER, "sh", str(i)]) for i in range(8)]
        )
        for i, r in enumerate(results):
            expect(
                r.exit_code != 9,
                f"exec {i} waited 30 s for the other 7 to start: the execs did not overlap",
            )
            expect(
                r.ok and r.stdout == f"{i}\n".encode() and r.stderr == f"e{i}\n".encode(),
                f"exec {i} gave {r}",
            )


def _slug(how: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in how)


@_check
async def check_kill_stops_escaped_descendants(target: Target) -> None:
    """Process.kill stops every descendant, whatever it did to its session or process group:
    a child started with ``setsid``, a double-forked one, one under ``nohup``, and a daemon
    (fork, setsid, fork).

    Each descendant holds a lock and prints its pid once it does; after kill, the lock must
    come free within a bound (another exec waits for it), which needs no shared PID namespace.
    """
    async with target.sandbox() as sb:
        await _install_holder(sb)
        problems = []
        for how in _ESCAPES:
            lock = f"kill-{_slug(how)}.lock"
            proc = await sb.start(["sh", "-c", _escape_script(sb, how, lock)])
            try:
                line = await _first_line(proc, timeout=30)
                expect(line.startswith(b"held "), f"{how}: first line was {line!r}")
                expect(
                    not await _lock_free(sb, lock, 0),
                    f"{how}: another exec does not see the lock held: cannot check",
                )
            finally:
                with _within(_GONE_WITHIN, f"{how}: Process.kill"):
                    await proc.kill()
            await _wait(proc)
            problem = await _still_running(sb, lock)
            if problem:
                problems.append(f"{how}: {problem}")
        _fail_all(problems, "Process.kill left descendants running")


@_check
async def check_exec_timeout_stops_escaped_descendants(target: Target) -> None:
    """An exec killed by its timeout takes every descendant with it: ``setsid``, double fork,
    ``nohup`` and a daemon, as in `kill_stops_escaped_descendants`. The timeout starts at
    1 s and doubles until the descendant was running before the timeout struck."""
    async with target.sandbox() as sb:
        await _install_holder(sb)
        problems = []
        for how in _ESCAPES:
            locks = await _exec_past_timeout(
                sb,
                functools.partial(_escape_script, sb, how),
                f"timeout-{_slug(how)}",
            )
            for lock in locks:
                problem = await _still_running(sb, lock)
                if problem:
                    problems.append(f"{how}: {problem}")
        _fail_all(problems, "exec(timeout=...) left descendants running")


#: Processes the pid-pressure check starts: bounded, so the host survives an unisolated run.
_PRESSURE = 300


@_check
async def check_kill_under_pid_pressure(target: Target) -> None:
    """With hundreds of processes running in the sandbox, kill returns within a bound and
    takes them all down, and the next exec runs within a bound.

    The command starts 300 ``sleep 60`` children (a cap, so that an unisolated local sandbox
    cannot exhaust the host; exhausting a provider's own pids limit is that provider's test),
    all sharing one locked file description: the lock comes free only when every one of
    them is gone.
    """
    async with target.sandbox() as sb:
        take = shlex.join(_py(sb, "import fcntl; fcntl.flock(9, fcntl.LOCK_EX)"))
        script = (
            "exec 9>>pressure.lock\n"
            f"{take} || exit 3\n"
            f'i=0; while [ "$i" -lt {_PRESSURE} ]; do '
            "sleep 60 </dev/null >/dev/null 2>&1 & i=$((i + 1)); done\n"
            "echo spawned\n"
            "wait\n"
        )
        proc = await sb.start(["sh", "-c", script])
        try:
            line = await _first_line(proc, timeout=60)
            expect(line == b"spawned", f"first line was {line!r}")
            expect(
                not await _lock_free(sb, "pressure.lock", 0), "the lock is not held: cannot check"
            )
        finally:
            with _within(15, f"Process.kill with {_PRESSURE} processes running"):
                await proc.kill()
        await _wait(proc, timeout=15)
        with _within(15, f"exec after killing {_PRESSURE} processes"):
            result = await sb.exec(["true"])
            expect(result.ok, f"`true` exited {result.exit_code}: {_short(result.stderr)}")
        problem = await _still_running(sb, "pressure.lock")
        expect(problem is None, f"kill left some of the {_PRESSURE} processes: {problem}")


@_check
async def check_missing_command_127(target: Target) -> None:
    """A command that does not exist exits 127 with a message on stderr, not an exception."""
    name = "sandbay-no-such-command"
    async with target.sandbox() as sb:
        result = await sb.exec([name, "arg"])
        expect(result.exit_code == 127, f"argv [{name!r}] exited {result.exit_code}")
        expect(result.stderr.strip(), "no message on stderr for a missing command")
        result = await sb.exec(name)
        expect(result.exit_code == 127, f"'{name}' through sh exited {result.exit_code}")
        proc = await sb.start([name])
        code = await _wait(proc)
        expect(code == 127, f"start([{name!r}]) exited {code}")


@_check
async def check_string_argv_runs_via_sh(target: Target) -> None:
    """A string command runs through ``sh -c``: pipes, expansion and redirection work."""
    async with target.sandbox() as sb:
        result = await _run(sb, "echo $((6 * 7)) | tr 4 X; echo second >&2")
        expect(result.stdout == b"X2\n", f"stdout was {result.stdout!r}")
        expect(result.stderr == b"second\n", f"stderr was {result.stderr!r}")


@_check
async def check_list_argv_not_shell_parsed(target: Target) -> None:
    """A list argv reaches the program as is: no expansion, quoting or splitting."""
    tricky = "$HOME; `id` * 'q' \"d\""
    async with target.sandbox() as sb:
        result = await _run(sb, ["printf", "%s|%s", tricky, "a b"])
        expected = f"{tricky}|a b".encode()
        expect(result.stdout == expected, f"printf got {result.stdout!r}, not {expected!r}")


@_check
async def check_empty_argv_config_error(target: Target) -> None:
    """An empty command raises ConfigError (a ValueError) before anything runs."""
    async with target.sandbox() as sb:
        for argv in ([], "", "   ", [""]):
            exc = await _expect_raises(
                ConfigError, functools.partial(sb.exec, argv), f"exec({argv!r})"
            )
            expect(isinstance(exc, ValueError), "ConfigError is not a ValueError")
        await _expect_raises(ConfigError, lambda: sb.start([]), "start([])")


# --- files ---------------------------------------------------------------------------------


@_check
async def check_missing_file_not_found(target: Target) -> None:
    """read_file of a missing path raises SandboxFileNotFoundError (a FileNotFoundError)."""
    async with target.sandbox() as sb:
        for path in ("missing.txt", "no/such/dir/file", sb.resolve("missing-abs.txt")):
            exc = await _expect_raises(
                SandboxFileNotFoundError, functools.partial(sb.read_file, path), f"read {path!r}"
            )
            expect(isinstance(exc, FileNotFoundError), "not a FileNotFoundError")


_SHA = "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())"


@_check
async def check_file_binary_roundtrip(target: Target) -> None:
    """A binary file comes back byte for byte, and processes see the same bytes."""
    data = bytes(range(256)) * 1024 + b"\r\n\x00"
    async with target.sandbox() as sb:
        await sb.write_file("bin/data.bin", data)
        back = await sb.read_file("bin/data.bin")
        expect(back == data, f"read back {len(back)} bytes, different from the {len(data)}")
        digest = (await _run(sb, _py(sb, _SHA, "bin/data.bin"))).text.strip()
        expect(digest == hashlib.sha256(data).hexdigest(), "processes see different bytes")


@_check
async def check_file_large_roundtrip(target: Target) -> None:
    """A 50 MiB file goes in and comes out whole."""
    data = os.urandom(50 * 2**20)
    async with target.sandbox() as sb:
        await sb.write_file("big.bin", data)
        digest = (await _run(sb, _py(sb, _SHA, "big.bin"))).text.strip()
        expect(digest == hashlib.sha256(data).hexdigest(), "the file in the sandbox differs")
        back = await sb.read_file("big.bin")
        expect(len(back) == len(data), f"read back {len(back)} bytes of {len(data)}")
        expect(back == data, "read back different bytes")


@_check
async def check_write_file_replaces(target: Target) -> None:
    """write_file replaces a file whole: a shorter write leaves no tail of the longer one."""
    async with target.sandbox() as sb:
        await sb.write_file("f.txt", b"a long first version\n" * 100)
        await sb.write_file("f.txt", b"short")
        back = await sb.read_file("f.txt")
        expect(back == b"short", f"read back {_short(back)}")
        seen = (await _run(sb, ["cat", "f.txt"])).stdout
        expect(seen == b"short", f"cat saw {_short(seen)}")


@_check
async def check_write_file_creates_parents(target: Target) -> None:
    """write_file creates missing parent directories."""
    async with target.sandbox() as sb:
        await sb.write_file("deep/er/still/file.txt", b"deep")
        await _run(sb, ["test", "-d", "deep/er/still"])
        back = await sb.read_file("deep/er/still/file.txt")
        expect(back == b"deep", f"read back {back!r}")


_MODE = "import os, stat, sys; print(oct(stat.S_IMODE(os.stat(sys.argv[1]).st_mode)))"


@_check
async def check_file_mode_honoured(target: Target) -> None:
    """write_file's mode is the file's mode; an executable script runs."""
    async with target.sandbox() as sb:
        await sb.write_file("run.sh", b"#!/bin/sh\necho ran\n", mode=0o755)
        seen = (await _run(sb, _py(sb, _MODE, "run.sh"))).text.strip()
        expect(seen == "0o755", f"written with mode 0o755, the file has {seen}")
        result = await _run(sb, ["./run.sh"])
        expect(result.stdout == b"ran\n", f"./run.sh printed {result.stdout!r}")
        await sb.write_file("run.sh", b"secret", mode=0o600)
        seen = (await _run(sb, _py(sb, _MODE, "run.sh"))).text.strip()
        expect(seen == "0o600", f"rewritten with mode 0o600, the file has {seen}")


@_check
async def check_read_directory_is_a_directory(target: Target) -> None:
    """read_file (and read_file_stream) of a directory raises SandboxIsADirectoryError, an
    IsADirectoryError."""
    async with target.sandbox() as sb:
        await _run(sb, ["mkdir", "-p", "adir/sub"])
        problems = []
        for path in ("adir", "adir/sub", "adir/", sb.workdir):
            for what, action in (
                ("read_file", functools.partial(sb.read_file, path)),
                ("read_file_stream", functools.partial(_drain, sb, path)),
            ):
                try:
                    await action()
                except SandboxIsADirectoryError as exc:
                    if not isinstance(exc, IsADirectoryError):
                        problems.append("SandboxIsADirectoryError is not an IsADirectoryError")
                except Exception as exc:
                    problems.append(f"{what}({path!r}) raised {_describe(exc)}")
                else:
                    problems.append(f"{what}({path!r}) raised nothing")
        _fail_all(problems, "expected SandboxIsADirectoryError")


async def _drain(sb: Sandbox, path: str) -> None:
    async with aclosing(sb.read_file_stream(path)) as chunks:
        async for _ in chunks:
            pass


@_check
async def check_write_directory_is_a_directory(target: Target) -> None:
    """write_file to a path that is a directory raises SandboxIsADirectoryError (an
    IsADirectoryError) and leaves the directory as it was."""
    async with target.sandbox() as sb:
        await sb.write_file("adir/keep.txt", b"kept")
        for path in ("adir", sb.resolve("adir")):
            exc = await _expect_raises(
                SandboxIsADirectoryError,
                functools.partial(sb.write_file, path, b"x"),
                f"write_file({path!r}) on a directory",
            )
            expect(isinstance(exc, IsADirectoryError), "not an IsADirectoryError")
        await _run(sb, ["test", "-d", "adir"])
        kept = await sb.read_file("adir/keep.txt")
        expect(kept == b"kept", f"the directory's file now holds {kept!r}")


@_check
async def check_parent_not_a_directory(target: Target) -> None:
    """A path running through a file raises SandboxNotADirectoryError (a NotADirectoryError)
    from read_file and write_file, and leaves the file as it was."""
    async with target.sandbox() as sb:
        await sb.write_file("plain.txt", b"plain")
        problems = []
        actions: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("read_file('plain.txt/inner')", functools.partial(sb.read_file, "plain.txt/inner")),
            (
                "write_file('plain.txt/inner')",
                functools.partial(sb.write_file, "plain.txt/inner", b"x"),
            ),
            (
                "write_file('plain.txt/a/b')",
                functools.partial(sb.write_file, "plain.txt/a/b", b"x"),
            ),
        ]
        for what, action in actions:
            try:
                await action()
            except SandboxNotADirectoryError as exc:
                if not isinstance(exc, NotADirectoryError):
                    problems.append("SandboxNotADirectoryError is not a NotADirectoryError")
            except Exception as exc:
                problems.append(f"{what} raised {_describe(exc)}")
            else:
                problems.append(f"{what} raised nothing")
        kept = await sb.read_file("plain.txt")
        if kept != b"plain":
            problems.append(f"plain.txt now holds {_short(kept)}")
        _fail_all(problems, "expected SandboxNotADirectoryError")


@_check
async def check_read_permission_as_user(target: Target) -> None:
    """read_file has the rights of the sandbox's user: a file it made unreadable (chmod 000),
    or one in a directory it closed, raises SandboxPermissionError (a PermissionError) where
    the user's own read (as `cat` does it) is refused.

    Where the user may read it anyway (root with its capabilities: the unisolated local
    provider run as root), no permission error can be produced, and the check asserts
    instead that read_file returns the same bytes the user reads.
    """
    async with target.sandbox() as sb:
        await _run(sb, "printf 'not for you' > locked.txt && chmod 000 locked.txt")
        await _run(sb, "mkdir -p closed && printf inside > closed/f.txt && chmod 000 closed")
        problems = []
        for path in ("locked.txt", "closed/f.txt"):
            problem = await _read_matches_user(sb, path)
            if problem:
                problems.append(problem)
        await sb.exec(["chmod", "-R", "u+rwx", "locked.txt", "closed"])
        _fail_all(problems, "read_file must see what the sandbox's user sees")


@_check
async def check_write_permission_as_user(target: Target) -> None:
    """write_file has the rights of the sandbox's user: in a directory it made read-only
    (chmod 555), writing a new file (or one in a new subdirectory) raises
    SandboxPermissionError where the user's own ``mkdir -p``/``echo x > path`` is refused,
    and creates nothing.

    Where the user may write there anyway (root with its capabilities: the unisolated local
    provider run as root), the check asserts instead that write_file succeeds and the user
    reads back what was written.
    """
    async with target.sandbox() as sb:
        await _run(sb, "mkdir -p ro && chmod 555 ro")
        problems = []
        for path in ("ro/new.txt", "ro/newdir/new.txt"):
            problem = await _write_matches_user(sb, path)
            if problem:
                problems.append(problem)
        await sb.exec(["chmod", "-R", "u+rwx", "ro"])
        _fail_all(problems, "write_file must have the sandbox's user's rights")


@_check
async def check_planted_links_read_as_user(target: Target) -> None:
    """read_file follows links planted in the sandbox as a process of its user would: to
    /etc/shadow, through a link to /etc, to a directory, relative ones climbing out of the
    workdir. It returns exactly what the user reads there (its sandbox's files, never the
    host's) or raises the error the user gets (SandboxPermissionError for /etc/shadow as a
    non-root user). Where the user is root on the host, it reads what root reads: the same."""
    links = {
        "shadow-link": "/etc/shadow",
        "etc-link": "/etc",
        "passwd-link": "/etc/passwd",
        "up-link": "../../../../../../../../etc/shadow",
        "chain-link": "shadow-link",
    }
    async with target.sandbox() as sb:
        for name, points_to in links.items():
            await _run(sb, ["ln", "-s", points_to, name])
        problems = []
        for path in (*links, "etc-link/shadow", "etc-link/passwd", "etc-link/hostname"):
            problem = await _read_matches_user(sb, path)
            if problem:
                problems.append(problem)
        _fail_all(problems, "read_file must see what the sandbox's user sees")


@_check
async def check_planted_links_write_as_user(target: Target) -> None:
    """write_file through a link planted in the sandbox (``etc-link`` -> /etc) creates a file
    only where the sandbox's user could (its own ``echo x > path`` decides; what the user
    may create is created and then removed again), and otherwise raises the error the user
    gets, creating nothing: never a file in the image's or the host's /etc.

    A sandbox without a boundary (`Sandbox.isolated` False) passes without writing: its
    user is the host's, whose /etc the check would only touch."""
    name = f".sandbay-conformance-{uuid.uuid4().hex[:12]}"
    async with target.sandbox() as sb:
        if not sb.isolated:
            return
        await _run(sb, ["ln", "-s", "/etc", "etc-link"])
        problems = []
        # Each case its own name: what one wrongly creates must not decide the next.
        for path in (f"etc-link/{name}-file", f"etc-link/{name}-dir/inner", "etc-link"):
            problem = await _write_matches_user(sb, path)
            if problem:
                problems.append(problem)
        _fail_all(problems, "write_file must have the sandbox's user's rights")


@_check
async def check_read_max_bytes(target: Target) -> None:
    """read_file(max_bytes=n) returns a file of at most n bytes and raises
    SandboxFileTooLargeError for a larger one."""
    data = os.urandom(100_000)
    async with target.sandbox() as sb:
        await sb.write_file("sized.bin", data)
        await sb.write_file("empty.bin", b"")
        for limit in (0, 1, 99_999):
            await _expect_raises(
                SandboxFileTooLargeError,
                functools.partial(sb.read_file, "sized.bin", max_bytes=limit),
                f"read_file of 100000 bytes with max_bytes={limit}",
            )
        for limit in (100_000, 10**9):
            back = await sb.read_file("sized.bin", max_bytes=limit)
            expect(back == data, f"max_bytes={limit} gave {_digest(back)}, not the file")
        empty = await sb.read_file("empty.bin", max_bytes=0)
        expect(empty == b"", f"an empty file with max_bytes=0 gave {empty!r}")


@_check
async def check_read_file_stream_large(target: Target) -> None:
    """read_file_stream yields the exact bytes of an 8 MiB file a process wrote; stopping
    early releases it and leaves the sandbox usable; a missing file raises at once."""
    size = 8 * 2**20
    code = (
        "import hashlib, os, sys; d = os.urandom(int(sys.argv[2])); "
        "open(sys.argv[1], 'wb').write(d); print(hashlib.sha256(d).hexdigest())"
    )
    async with target.sandbox() as sb:
        digest = (await _run(sb, _py(sb, code, "stream.bin", str(size)))).text.strip()
        hasher, total = hashlib.sha256(), 0
        async with aclosing(sb.read_file_stream("stream.bin")) as chunks:
            async for chunk in chunks:
                expect(isinstance(chunk, bytes) and chunk, f"a chunk was {chunk!r}")
                hasher.update(chunk)
                total += len(chunk)
        expect(total == size, f"streamed {total} bytes of {size}")
        expect(hasher.hexdigest() == digest, "streamed different bytes than the process wrote")
        async with aclosing(sb.read_file_stream("stream.bin")) as chunks:
            first = await chunks.__anext__()
            expect(first, "the first chunk was empty")
        await _run(sb, ["true"])
        await _expect_raises(
            SandboxFileNotFoundError,
            functools.partial(_drain, sb, "missing.bin"),
            "read_file_stream of a missing file",
        )


# --- stream framing --------------------------------------------------------------------------


@_check
async def check_text_chunks_multibyte(target: Target) -> None:
    """text_chunks decodes characters split across writes (é, €, 😀) without damage."""
    code = (
        "import sys, time\n"
        "for part in (b'\\xc3', b'\\xa9 \\xe2\\x82', b'\\xac \\xf0\\x9f', b'\\x98\\x80\\n'):\n"
        "    sys.stdout.buffer.write(part); sys.stdout.flush(); time.sleep(0.1)\n"
    )
    async with target.sandbox() as sb:
        proc = await sb.start(_py(sb, code))
        text = ""
        with _within(10, "reading text_chunks"):
            text = "".join([t async for t in proc.stdout.text_chunks()])
        await _wait(proc)
        expect(text == "é € 😀\n", f"decoded {text!r}")


@_check
async def check_lines_framing(target: Target) -> None:
    """lines() splits on newlines across chunk boundaries and yields an unterminated tail."""
    code = (
        "import sys, time\n"
        "for part in (b'a\\nb', b'c\\n\\nd\\r\\ne', b'f'):\n"
        "    sys.stdout.buffer.write(part); sys.stdout.flush(); time.sleep(0.1)\n"
    )
    async with target.sandbox() as sb:
        proc = await sb.start(_py(sb, code))
        lines: list[bytes] = []
        with _within(10, "reading lines"):
            lines = [line async for line in proc.stdout.lines()]
        await _wait(proc)
        expect(lines == [b"a", b"bc", b"", b"d\r", b"ef"], f"lines() gave {lines!r}")


# --- lifecycle -----------------------------------------------------------------------------


@_check
async def check_aclose_twice(target: Target) -> None:
    """aclose is idempotent (and the context manager's own close after it is harmless)."""
    async with target.sandbox() as sb:
        expect(not sb.closed, "a new sandbox says it is closed")
        await sb.aclose()
        expect(sb.closed, "closed is False after aclose")
        await sb.aclose()


@_check
async def check_use_after_close(target: Target) -> None:
    """After aclose, exec, start, read_file and write_file raise SandboxClosedError."""
    async with target.sandbox() as sb:
        await sb.write_file("kept.txt", b"x")
        await sb.aclose()
        actions: dict[str, Callable[[], Awaitable[object]]] = {
            "exec": lambda: sb.exec(["true"]),
            "start": lambda: sb.start(["true"]),
            "read_file": lambda: sb.read_file("kept.txt"),
            "write_file": lambda: sb.write_file("new.txt", b"x"),
        }
        for what, action in actions.items():
            exc = await _expect_raises(SandboxClosedError, action, f"{what} after aclose")
            expect(isinstance(exc, RuntimeError), "SandboxClosedError is not a RuntimeError")


@_check
async def check_python_runs_the_relay_and_finds_the_cli(target: Target) -> None:
    """`Sandbox.python` is a Python 3.10+ that runs with the relay's flags (standard library
    only), and the relay's rule finds a ``claude`` CLI that runs."""
    import inspect

    from .._relay import relay
    from .._transport import RELAY_PYTHON_FLAGS

    code = (
        "import importlib.util, os, shutil, sys\n"
        f"{inspect.getsource(relay.find_cli)}\n"
        "assert sys.version_info >= (3, 10), sys.version\n"
        "print(find_cli() or '')\n"
    )
    async with target.sandbox() as sb:
        result = await sb.exec([sb.python, *RELAY_PYTHON_FLAGS, "-c", code])
        expect(result.ok, f"{sb.python!r} cannot run the relay: {_short(result.stderr)}")
        cli = result.stdout.decode().strip()
        expect(bool(cli), "the relay's rule finds no claude CLI (bundled or on PATH)")
        version = await sb.exec([cli, "--version"])
        expect(version.ok, f"{cli} --version failed: {_short(version.stderr)}")


@_check
async def check_sandboxes_kept_apart(target: Target) -> None:
    """Two sandboxes have different ids and do not see each other's files."""
    async with target.sandbox() as one, target.sandbox() as two:
        expect(one.id != two.id, f"two sandboxes share the id {one.id}")
        await one.write_file("only-in-one.txt", b"1")
        await _expect_missing(two, "only-in-one.txt", "a file written in one sandbox is in another")


# --- the provider: labels, list, gc, destroy -------------------------------------------------


async def _listed(provider: Provider, marker: str) -> dict[str, Mapping[str, str]]:
    return {info.id: info.labels for info in await provider.list(labels={LABEL: marker})}


@_check
async def check_labels_listed(target: Target) -> None:
    """Provider.list finds a sandbox by its labels, with sandbay's own labels and the user's."""
    marker, other = uuid.uuid4().hex, uuid.uuid4().hex
    provider = target.get_provider()
    async with target.sandbox(labels={LABEL: marker, "team": "conformance"}) as sb:
        found = await _listed(provider, marker)
        expect(list(found) == [sb.id], f"list(labels=...) found {sorted(found)}, not [{sb.id}]")
        labels = found[sb.id]
        expect(labels.get("team") == "conformance", f"the user's label is missing: {labels}")
        expect(labels.get("sandbay.managed") == "1", f"sandbay.managed is missing: {labels}")
        for key in ("sandbay.session", "sandbay.owner", "sandbay.expiry"):
            expect(labels.get(key), f"{key} is missing from the listed labels {labels}")
            expect(sb.labels.get(key) == labels[key], f"{key} differs in Sandbox.labels")
        expiry = float(labels["sandbay.expiry"])
        expect(expiry > time.time(), f"sandbay.expiry {expiry} is already past")
        expect(not await _listed(provider, other), "list matched a label value it should not")
        infos = [i for i in await provider.list() if i.id == sb.id]
        expect(infos and infos[0].provider == sb.provider, f"list() without filter: {infos}")


@_check
async def check_closed_removed_from_list(target: Target) -> None:
    """A closed sandbox is gone from Provider.list."""
    marker = uuid.uuid4().hex
    provider = target.get_provider()
    async with target.sandbox(labels={LABEL: marker}) as sb:
        expect(sb.id in await _listed(provider, marker), "the open sandbox is not listed")
    expect(not await _listed(provider, marker), f"closed sandbox {sb.id} is still listed")


@_check
async def check_aclose_removes_at_once(target: Target) -> None:
    """Once ``await sb.aclose()`` returns (with a process still running in the sandbox),
    Provider.list no longer shows it, with no waiting; Provider.destroy of its id is then a
    no-op, twice over."""
    marker = uuid.uuid4().hex
    provider = target.get_provider()
    async with target.sandbox(labels={LABEL: marker}) as sb:
        proc = await sb.start(_py(sb, "import time; print('up', flush=True); time.sleep(60)"))
        line = await _first_line(proc, timeout=30)
        expect(line == b"up", f"first line was {line!r}")
        expect(sb.id in await _listed(provider, marker), "the open sandbox is not listed")
        with _within(CLOSE_TIMEOUT + 10, "aclose"):
            await sb.aclose()
        listed = await _listed(provider, marker)
        expect(not listed, f"Provider.list still shows {sorted(listed)} after aclose returned")
        await provider.destroy(sb.id)
        await provider.destroy(sb.id)
        expect(not await _listed(provider, marker), "destroy after aclose brought it back")


@_check
async def check_aclose_with_escaped_descendants(target: Target) -> None:
    """aclose of a sandbox with daemonised processes in it (``setsid``, double fork,
    ``nohup``, daemon) returns within its deadline, after which Provider.list no longer
    shows the sandbox and Provider.destroy of its id is a no-op.

    That is all the API can show: once closed, a sandbox's files and processes are out of
    reach, so whether those processes are gone cannot be observed generically from here.
    tests/test_local.py checks the host's pids for the local provider; a container's
    processes end with the container. What closing has to do for them, `Process.kill` does
    too, and `kill_stops_escaped_descendants` checks that from inside.
    """
    marker = uuid.uuid4().hex
    provider = target.get_provider()
    async with target.sandbox(labels={LABEL: marker}) as sb:
        await _install_holder(sb)
        for how in _ESCAPES:
            proc = await sb.start(["sh", "-c", _escape_script(sb, how, f"close-{_slug(how)}")])
            line = await _first_line(proc, timeout=30)
            expect(line.startswith(b"held "), f"{how}: first line was {line!r}")
        with _within(CLOSE_TIMEOUT + 10, "aclose with daemonised processes"):
            await sb.aclose()
        listed = await _listed(provider, marker)
        expect(not listed, f"Provider.list still shows {sorted(listed)} after aclose returned")
        await provider.destroy(sb.id)
        expect(not await _listed(provider, marker), "destroy after aclose brought it back")


@_check
async def check_gc_removes_expired(target: Target) -> None:
    """Provider.gc removes a sandbox whose lifetime passed and keeps one still in its time."""
    marker = uuid.uuid4().hex
    provider = target.get_provider()
    async with (
        target.sandbox(labels={LABEL: marker}, lifetime_s=1) as short,
        target.sandbox(labels={LABEL: marker}, lifetime_s=3600) as long,
    ):
        # A minute ahead: only sandboxes made to expire at once (or long forgotten) go.
        found: Sequence[tuple[SandboxInfo, str]] = await provider.gc(now=time.time() + 60)
        removed = {info.id: why for info, why in found}
        listed = await _listed(provider, marker)
        expect(short.id not in listed, f"gc left expired sandbox {short.id}")
        expect(long.id in listed, f"gc removed {long.id}, which had an hour to live")
        expect(long.id not in removed, "gc reported removing the sandbox it kept")
        if short.id in removed:  # else another process's gc was quicker
            expect(removed[short.id] == "expired", f"gc gave the reason {removed[short.id]!r}")


@_check
async def check_destroy_by_id(target: Target) -> None:
    """Provider.destroy removes a sandbox by id; using it then raises SandboxNotFoundError;
    destroying it again, or an id that never existed, is not an error."""
    marker = uuid.uuid4().hex
    provider = target.get_provider()
    async with target.sandbox(labels={LABEL: marker}) as sb:
        await provider.destroy(sb.id)
        expect(sb.id not in await _listed(provider, marker), "destroyed sandbox still listed")
        await _expect_raises(
            SandboxNotFoundError, lambda: sb.exec(["true"]), "exec in a destroyed sandbox"
        )
        await provider.destroy(sb.id)
    await provider.destroy("sandbay-conformance-never-existed")


# --- the spec: limits are honoured or refused ------------------------------------------------

# Prints, as JSON, every memory limit (bytes) and CPU limit (cores) a process can see: cgroup
# v2 memory.max and cpu.max, v1 memory.limit_in_bytes and cpu.cfs_quota_us (its own cgroup
# and every ancestor, where the limit may sit), RLIMIT_AS and RLIMIT_DATA, CPU affinity.
_LIMITS = """\
import json, os, resource

def read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None

def ancestors(path):
    path = path.rstrip('/') or '/'
    while True:
        yield '' if path == '/' else path
        if path == '/':
            return
        path = os.path.dirname(path)

memory, cpu = [], []
try:
    with open('/proc/self/cgroup') as f:
        lines = f.read().splitlines()
except OSError:
    lines = []
for line in lines:
    _, names, path = line.split(':', 2)
    controllers = [n for n in names.split(',') if n]
    roots = {'/sys/fs/cgroup/' + n for n in (*controllers, ','.join(controllers))}
    for root in roots if controllers else ['/sys/fs/cgroup']:
        for p in ancestors(path):
            base = root + p
            for name in ('memory.max', 'memory.limit_in_bytes'):
                v = read(f'{base}/{name}')
                if v and v.isdigit() and int(v) < 2**62:
                    memory.append([int(v), f'{base}/{name}'])
            v = read(f'{base}/cpu.max')
            if v and not v.startswith('max'):
                q, per = v.split()[:2]
                cpu.append([int(q) / int(per), f'{base}/cpu.max'])
            q, per = read(f'{base}/cpu.cfs_quota_us'), read(f'{base}/cpu.cfs_period_us')
            if q and per and q.isdigit() and per.isdigit():
                cpu.append([int(q) / int(per), f'{base}/cpu.cfs_quota_us'])
for name in ('RLIMIT_AS', 'RLIMIT_DATA'):
    soft = resource.getrlimit(getattr(resource, name))[0]
    if soft != resource.RLIM_INFINITY:
        memory.append([soft, name])
if hasattr(os, 'sched_getaffinity'):
    cpu.append([len(os.sched_getaffinity(0)), 'CPU affinity'])
print(json.dumps({'memory': memory, 'cpu': cpu}))
"""


@_check
async def check_spec_limits_honoured_or_refused(target: Target) -> None:
    """A spec with cpu=1, or with memory_mb=512, either opens a sandbox whose processes are
    under that limit or raises ConfigError naming the field: never silent acceptance.

    "Under the limit" means a process there sees it: a cgroup's cpu.max or cpu.cfs_quota_us
    (or its CPU affinity) allowing at most 1 CPU; memory.max, memory.limit_in_bytes,
    RLIMIT_AS or RLIMIT_DATA of at most 512 MiB. On a one-core host, cpu=1 holds by itself.
    """
    problems = []
    cases: list[tuple[str, Callable[[], open_sandbox], str, float, str]] = [
        ("cpu=1", functools.partial(target.sandbox, cpu=1.0), "cpu", 1.0, "1 CPU"),
        (
            "memory_mb=512",
            functools.partial(target.sandbox, memory_mb=512),
            "memory",
            2**29,
            "512 MiB",
        ),
    ]
    for fields, opener, kind, bound, shown_bound in cases:
        async with contextlib.AsyncExitStack() as stack:
            try:
                sb = await stack.enter_async_context(opener())
            except ConfigError as exc:
                if kind not in str(exc):
                    problems.append(f"{fields}: the ConfigError does not name the field: {exc}")
                continue
            seen = json.loads((await _run(sb, _py(sb, _LIMITS))).stdout)[kind]
            if not any(0 < value <= bound for value, _ in seen):
                shown = ", ".join(f"{where}={value}" for value, where in seen) or "none"
                problems.append(
                    f"{fields} was accepted, but no limit of at most {shown_bound} is "
                    f"visible inside (seen: {shown})"
                )
    _fail_all(problems, "limits must be honoured or refused with ConfigError")


# --- the file API: list, stat, exists, remove, make_dir, trees -------------------------------

_BIG = b"3 MiB and 17 bytes of random data, made when the tree is"
# A tree for the round trip: (relative path, contents or None for a directory, mode).
_TREE: Sequence[tuple[str, bytes | None, int]] = (
    ("bin", None, 0o755),
    ("bin/run.sh", b"#!/bin/sh\necho ran\n", 0o755),
    ("data", None, 0o750),
    ("data/blob.bin", bytes(range(256)) * 64 + b"\x00\r\n", 0o644),
    ("data/secret.key", b"k" * 10, 0o600),
    ("data/deep", None, 0o755),
    ("data/deep/er", None, 0o755),
    ("data/deep/er/big.bin", _BIG, 0o640),
    ("data/empty.txt", b"", 0o644),
    ("empty-dir", None, 0o700),
    ("naïve name with spaces", b"unicode\n", 0o644),
)
_TREE_LINKS = {"bin/latest": "run.sh", "data/deep/up": "../blob.bin"}


def _make_local_tree(root: str) -> None:
    os.makedirs(root)
    for rel, data, _ in _TREE:
        path = os.path.join(root, rel)
        if data is None:
            os.mkdir(path)
        else:
            _write_local(path, os.urandom(3 * 2**20 + 17) if data is _BIG else data)
        os.utime(path, (1_600_000_000, 1_600_000_000))
    for rel, target in _TREE_LINKS.items():
        os.symlink(target, os.path.join(root, rel))
    for rel, _, mode in reversed(_TREE):
        os.chmod(os.path.join(root, rel), mode)


def _local_tree(root: str) -> dict[str, tuple[str, int, str]]:
    """Every entry below root: relative path -> (type, mode, digest of contents or target)."""
    found: dict[str, tuple[str, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            info = os.lstat(path)
            mode = info.st_mode & 0o7777
            if os.path.islink(path):
                found[rel] = ("symlink", 0, os.readlink(path))
            elif os.path.isdir(path):
                found[rel] = ("dir", mode, "")
            else:
                with open(path, "rb") as f:
                    found[rel] = ("file", mode, hashlib.sha256(f.read()).hexdigest())
    return found


# Prints, as JSON, every entry below argv[1]: relative path -> [type, mode, sha256 or target].
_TREE_AS_USER = """\
import hashlib, json, os, stat, sys
root, found = sys.argv[1], {}
for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames + filenames:
        path = os.path.join(dirpath, name)
        st = os.lstat(path)
        rel = os.path.relpath(path, root)
        if stat.S_ISLNK(st.st_mode):
            found[rel] = ['symlink', 0, os.readlink(path)]
        elif stat.S_ISDIR(st.st_mode):
            found[rel] = ['dir', stat.S_IMODE(st.st_mode), '']
        else:
            found[rel] = ['file', stat.S_IMODE(st.st_mode),
                          hashlib.sha256(open(path, 'rb').read()).hexdigest()]
print(json.dumps(found))
"""


@_check
async def check_file_api_list_stat_exists(target: Target) -> None:
    """list_dir lists a directory sorted by name, each entry as it is (a link as a symlink
    with its target, never followed), with type, size and mode; stat follows a final link
    unless follow_symlinks=False; exists says False for missing paths and dangling links;
    missing paths raise SandboxFileNotFoundError, a file listed or passed through
    SandboxNotADirectoryError."""
    async with target.sandbox() as sb:
        await sb.write_file("d/b.txt", b"12345", mode=0o640)
        await _run(sb, "mkdir d/sub && ln -s b.txt d/a-link && ln -s /nowhere/at/all d/dangling")
        await _run(sb, "ln -s /etc d/etc-link && mkfifo d/fifo")
        entries = await sb.list_dir("d")
        names = [e.name for e in entries]
        expect(names == ["a-link", "b.txt", "dangling", "etc-link", "fifo", "sub"], f"{names}")
        by = {e.name: e for e in entries}
        b = by["b.txt"]
        expect((b.type, b.size, b.mode) == ("file", 5, 0o640), f"b.txt listed as {b}")
        expect(b.path == sb.resolve("d/b.txt"), f"b.txt's path is {b.path!r}")
        expect(by["sub"].is_dir, f"sub listed as {by['sub']}")
        expect(by["fifo"].type == "other", f"a FIFO listed as {by['fifo']}")
        link = by["etc-link"]
        expect(link.is_symlink and link.link_target == "/etc", f"etc-link listed as {link}")
        expect(abs(b.mtime - time.time()) < 3600, f"b.txt's mtime {b.mtime} is not about now")
        followed = await sb.stat("d/a-link")
        expect(followed.is_file and followed.size == 5, f"stat of a link to b.txt: {followed}")
        expect(followed.name == "a-link", f"stat names it {followed.name!r}")
        own = await sb.stat("d/a-link", follow_symlinks=False)
        expect(own.is_symlink and own.link_target == "b.txt", f"lstat of the link: {own}")
        expect((await sb.stat(sb.resolve("d"))).is_dir, "stat of an absolute dir path")
        for path, want in (("d/b.txt", True), ("d", True), ("d/nope", False), ("d/b.txt/x", False)):
            got = await sb.exists(path)
            expect(got is want, f"exists({path!r}) is {got}")
        expect(not await sb.exists("d/dangling"), "exists() of a dangling link is True")
        expect(await sb.exists("d/dangling", follow_symlinks=False), "the link itself exists")
        errors: list[tuple[type[BaseException], str, Callable[[], Awaitable[object]]]] = [
            (SandboxFileNotFoundError, "list_dir('nope')", lambda: sb.list_dir("nope")),
            (SandboxFileNotFoundError, "stat('nope')", lambda: sb.stat("nope")),
            (SandboxFileNotFoundError, "stat of a dangling link", lambda: sb.stat("d/dangling")),
            (SandboxNotADirectoryError, "list_dir of a file", lambda: sb.list_dir("d/b.txt")),
            (SandboxNotADirectoryError, "stat through a file", lambda: sb.stat("d/b.txt/x")),
        ]
        for error, what, action in errors:
            exc = await _expect_raises(error, action, what)
            expect(isinstance(exc, OSError), f"{what}: {type(exc).__name__} is no OSError")
        await sb.aclose()
        for what, action in (
            ("list_dir", lambda: sb.list_dir("d")),
            ("stat", lambda: sb.stat("d")),
            ("exists", lambda: sb.exists("d")),
            ("remove", lambda: sb.remove("d", recursive=True)),
            ("make_dir", lambda: sb.make_dir("e")),
        ):
            await _expect_raises(SandboxClosedError, action, f"{what} after aclose")


@_check
async def check_file_api_make_dir_remove(target: Target) -> None:
    """make_dir makes parents and accepts an existing directory by default; exist_ok=False
    and a file in the way raise SandboxFileExistsError, parents=False with a missing parent
    SandboxFileNotFoundError. remove removes files and links, refuses a directory without
    recursive (SandboxIsADirectoryError), removes it with recursive, raises
    SandboxFileNotFoundError for a missing path unless missing_ok, refuses '/'."""
    async with target.sandbox() as sb:
        await sb.make_dir("p/q/r")
        await _run(sb, ["test", "-d", "p/q/r"])
        await sb.make_dir("p/q/r")
        await sb.make_dir("p/q/s", parents=False)
        await _run(sb, ["test", "-d", "p/q/s"])
        await sb.write_file("p/file", b"x")
        for what, action, error in (
            ("exist_ok=False", lambda: sb.make_dir("p/q", exist_ok=False), SandboxFileExistsError),
            ("over a file", lambda: sb.make_dir("p/file"), SandboxFileExistsError),
            ("through a file", lambda: sb.make_dir("p/file/x"), SandboxNotADirectoryError),
            (
                "parents=False",
                lambda: sb.make_dir("p/x/y", parents=False),
                SandboxFileNotFoundError,
            ),
        ):
            await _expect_raises(error, action, f"make_dir {what}")
        await _run(sb, "ln -s q p/q-link && printf keep > p/q/r/kept")
        await sb.remove("p/q-link")
        expect(not await sb.exists("p/q-link", follow_symlinks=False), "the link is still there")
        expect(await sb.exists("p/q/r/kept"), "removing a link removed what it leads to")
        await sb.remove("p/file")
        expect(not await sb.exists("p/file"), "the file is still there")
        await _expect_raises(SandboxIsADirectoryError, lambda: sb.remove("p"), "remove(dir)")
        expect(await sb.exists("p/q/r/kept"), "a refused remove removed something")
        await _expect_raises(
            SandboxFileNotFoundError, lambda: sb.remove("p/none"), "remove missing"
        )
        await sb.remove("p/none", missing_ok=True)
        await sb.remove("p/q/", recursive=True)
        expect(not await sb.exists("p/q"), "remove(recursive=True) left the directory")
        expect(await sb.exists("p"), "remove(recursive=True) removed the parent")
        await _expect_raises(ConfigError, lambda: sb.remove("/", recursive=True), "remove('/')")


@_check
async def check_file_api_rights_as_user(target: Target) -> None:
    """list_dir, make_dir and remove have the sandbox's user's rights: in a directory it
    closed (chmod 000) or made read-only (chmod 555) they raise SandboxPermissionError
    where the user's own ``ls``, ``mkdir`` or ``rm`` is refused, and change nothing; where
    the user may (root), they succeed as its commands do."""
    async with target.sandbox() as sb:
        await _run(sb, "mkdir -p closed ro && touch closed/f ro/f && chmod 000 closed")
        await _run(sb, "chmod 555 ro")
        problems = []
        cases: list[tuple[str, str, Callable[[], Awaitable[object]]]] = [
            ("list_dir('closed')", "ls closed", lambda: sb.list_dir("closed")),
            (
                "make_dir('ro/new')",
                "mkdir ro/new-probe && rmdir ro/new-probe",
                lambda: sb.make_dir("ro/new"),
            ),
            ("remove('ro/f')", "cp ro/f ro/f-probe && rm ro/f-probe", lambda: sb.remove("ro/f")),
        ]
        allowed: dict[str, bool] = {}
        for what, probe, action in cases:
            user_may = allowed[what] = (await sb.exec(["sh", "-c", probe])).ok
            try:
                await action()
            except SandboxPermissionError as exc:
                if user_may:
                    problems.append(f"{what} raised {_describe(exc)}; the user may do it")
                elif not isinstance(exc, PermissionError):
                    problems.append(f"{what}: SandboxPermissionError is no PermissionError")
            except Exception as exc:
                problems.append(f"{what} raised {_describe(exc)}")
            else:
                if not user_may:
                    problems.append(f"{what} succeeded where the sandbox's user may not")
        if not allowed["remove('ro/f')"]:
            expect(await sb.exists("ro/f"), "a refused remove removed the file")
        await sb.exec(["chmod", "-R", "u+rwx", "closed", "ro"])
        _fail_all(problems, "the file API must have the sandbox's user's rights")


@_check
async def check_file_api_links_not_followed_out(target: Target) -> None:
    """Links planted in the sandbox lead the file API nowhere new: list_dir shows them as
    links; remove of a link removes the link; a recursive remove of a directory holding
    links (absolute, relative, to directories outside it) removes the links and keeps what
    they lead to; download creates no link that leads out of its copy, and writes nothing
    outside it; in an isolated sandbox, upload and make_dir through a link to /etc create
    only what the user's own mkdir could (else SandboxPermissionError, nothing made)."""
    async with target.sandbox() as sb:
        await sb.write_file("keep/canary", b"still here")
        keep = sb.resolve("keep")
        await _run(sb, ["mkdir", "-p", "doomed/sub"])
        await _run(sb, ["ln", "-s", keep, "doomed/abs-link"])
        await _run(sb, ["ln", "-s", "../keep", "doomed/rel-link"])
        await _run(sb, ["ln", "-s", "../../keep/canary", "doomed/sub/file-link"])
        await _run(sb, ["ln", "-s", "/etc", "doomed/etc-link"])
        listed = {e.name: e.type for e in await sb.list_dir("doomed")}
        expect(listed.get("abs-link") == "symlink", f"list_dir shows {listed}")
        with tempfile.TemporaryDirectory() as tmp:
            dest = os.path.join(tmp, "dest")
            await sb.download("doomed", dest)
            _expect_contained(tmp, dest)
            expect(sorted(os.listdir(tmp)) == ["dest"], f"download wrote {os.listdir(tmp)}")
            expect(sorted(os.listdir(dest)) == ["sub"], f"the copy holds {os.listdir(dest)}")
        if sb.isolated:  # else the user is the host's, and /etc the host's own
            await _upload_through_link_as_user(sb, "doomed/etc-link")
        await sb.remove("doomed/etc-link")
        expect((await sb.stat("/etc")).is_dir, "removing a link to /etc touched /etc")
        await sb.remove("doomed", recursive=True)
        expect(not await sb.exists("doomed"), "the directory is still there")
        back = await sb.read_file("keep/canary")
        expect(back == b"still here", f"the canary a link led to now holds {back!r}")


async def _upload_through_link_as_user(sb: Sandbox, link: str) -> None:
    """upload and make_dir through a link to /etc create only what the user's own mkdir
    could, and otherwise raise SandboxPermissionError, creating nothing."""
    name = f"{link}/.sandbay-conformance-{uuid.uuid4().hex[:12]}"
    user_may = (await sb.exec(["sh", "-c", f"mkdir {name} && rmdir {name}"])).ok
    with tempfile.TemporaryDirectory() as tmp:
        _write_local(os.path.join(tmp, "f.txt"), b"uploaded")
        actions: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("upload", lambda: sb.upload(tmp, name)),
            ("make_dir", lambda: sb.make_dir(name)),
        ]
        for what, action in actions:
            if user_may:
                await action()
                await sb.remove(name, recursive=True)
            else:
                await _expect_raises(SandboxPermissionError, action, f"{what} through {link}")
            made = await sb.exists(name, follow_symlinks=False)
            expect(not made, f"{what} through {link} left {name} behind")


def _expect_contained(top: str, dest: str) -> None:
    """Fail if anything below top is outside dest, or a link below dest leads out of it."""
    real = os.path.realpath(dest)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            expect(
                os.path.commonpath([path, dest]) == dest or path == dest,
                f"download wrote {path!r}, outside {dest!r}",
            )
            if os.path.islink(path):
                lands = os.path.realpath(path)
                expect(
                    os.path.commonpath([lands, real]) == real,
                    f"download made the link {path!r} -> {os.readlink(path)!r}, which leads "
                    f"out of the copy (to {lands!r})",
                )


@_check
async def check_file_tree_roundtrip(target: Target) -> None:
    """upload copies a local tree (nested directories, binary files of up to 3 MiB, modes,
    an empty directory, links, a non-ASCII name) into the sandbox, where its processes see
    the same bytes, modes and links; download copies it back out identical; a single file
    goes both ways too."""
    async with target.sandbox() as sb:
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "src")
            _make_local_tree(src)
            want = _local_tree(src)
            await sb.upload(src, "up/tree")
            seen = json.loads((await _run(sb, _py(sb, _TREE_AS_USER, "up/tree"))).stdout)
            problems = []
            for rel, (kind, mode, content) in want.items():
                got = seen.get(rel)
                if got is None:
                    problems.append(f"{rel!r} is missing in the sandbox")
                    continue
                if got != [kind, mode, content]:
                    problems.append(f"{rel!r} is {got} in the sandbox, {kind} {oct(mode)}")
            extra = set(seen) - set(want)
            if extra:
                problems.append(f"the sandbox has entries the tree lacks: {sorted(extra)}")
            _fail_all(problems, "upload must copy the tree")
            info = await sb.stat("up/tree/data/blob.bin")
            expect(int(info.mtime) == 1_600_000_000, f"upload lost the mtime: {info.mtime}")
            out = os.path.join(tmp, "out", "copy")
            await sb.download("up/tree", out)
            back = _local_tree(out)
            expect(back == want, f"download gave a different tree: {_tree_diff(want, back)}")
            expect(
                int(os.stat(os.path.join(out, "data/blob.bin")).st_mtime) == 1_600_000_000,
                "download lost the mtime",
            )
            one = os.path.join(tmp, "one.bin")
            await sb.upload(os.path.join(src, "data/deep/er/big.bin"), "single/big.bin")
            await sb.download("single/big.bin", one)
            same = _read_local(one) == _read_local(os.path.join(src, "data/deep/er/big.bin"))
            expect(same, "a single file came back different")


def _tree_diff(want: Mapping[str, object], got: Mapping[str, object]) -> str:
    keys = sorted(set(want) | set(got))
    diffs = [f"{k}: {want.get(k)} != {got.get(k)}" for k in keys if want.get(k) != got.get(k)]
    return "; ".join(diffs[:10])


# Builds a tree whose names and links try to lead a download out of its copy: names with
# newlines, backslashes, leading dashes and dots, bytes that are not UTF-8; links that are
# absolute, climb out, or climb out only in combination (l2 goes through l1, which climbs
# back up to the tree's root, then one level more).
_HOSTILE_TREE = r"""
import os, sys
root = sys.argv[1]
os.makedirs(os.path.join(root, 'd', 'e'))
for name in ['line\nbreak', 'back\\slash', '-dash', '..dots', '.hidden', 'sp ace']:
    with open(os.path.join(root, name), 'w') as f:
        f.write(name)
with open(os.path.join(os.fsencode(root), b'bad-\xff-utf8'), 'w') as f:
    f.write('bytes')
links = {'abs': '/etc', 'up': '../../../../../../../../etc', 'self-up': '..',
         'd/e/l1': '..', 'l2': 'd/e/l1/../../..', 'd/ok': '../sp ace',
         'd/e/deep-up': '../../..', 'dot-dot-later': 'd/../..'}
for rel, target in links.items():
    os.symlink(target, os.path.join(root, rel))
"""


@_check
async def check_file_download_hostile_tree(target: Target) -> None:
    """download of a tree the sandbox built to escape (links that are absolute, climb out
    directly or only in combination; odd names, bytes that are not UTF-8) writes nothing
    outside the local directory and creates no link that leads out of it; every regular
    file arrives with its name and contents, and links that stay inside are kept."""
    async with target.sandbox() as sb:
        await _run(sb, _py(sb, _HOSTILE_TREE, "hostile"))
        with tempfile.TemporaryDirectory() as tmp:
            _write_local(os.path.join(tmp, "outside.txt"), b"untouched")
            dest = os.path.join(tmp, "box", "dest")
            await sb.download("hostile", dest)
            _check_hostile_copy(tmp, dest)


def _read_local(path: str | bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _write_local(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _check_hostile_copy(tmp: str, dest: str) -> None:
    _expect_contained(os.path.join(tmp, "box"), dest)
    expect(sorted(os.listdir(tmp)) == ["box", "outside.txt"], f"{os.listdir(tmp)}")
    expect(_read_local(os.path.join(tmp, "outside.txt")) == b"untouched", "outside.txt changed")
    for name in ["line\nbreak", "back\\slash", "-dash", "..dots", ".hidden", "sp ace"]:
        got = _read_local(os.path.join(dest, name))
        expect(got == name.encode(), f"{name!r} arrived as {got!r}")
    odd = os.path.join(os.fsencode(dest), b"bad-\xff-utf8")
    expect(_read_local(odd) == b"bytes", "the file whose name is not UTF-8 arrived different")
    expect(os.readlink(os.path.join(dest, "d/ok")) == "../sp ace", "an inside link was lost")
    for gone in ("abs", "up", "self-up", "l2", "d/e/deep-up", "dot-dot-later"):
        expect(
            not os.path.lexists(os.path.join(dest, gone)),
            f"the link {gone!r}, which leads out, was created",
        )


# --- reattaching by id ------------------------------------------------------------------


def _in_fresh_loop(func: Callable[[], Awaitable[_T]]) -> Awaitable[_T]:
    """Run ``func`` in a new event loop on a worker thread, as another process would."""
    return anyio.to_thread.run_sync(anyio.run, func)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@_check
async def check_reattach_by_id_from_a_fresh_provider(target: Target) -> None:
    """A sandbox created, written to and then let go of (every object dropped, its provider
    closed) is reattached by id from a new provider instance in another event loop: the
    file reads back, a process runs, the labels survive, and closing it removes it (a
    second connect raises SandboxNotFoundError).
    """
    import gc

    from .._api import Providers
    from .._config import provider_config
    from .._provider import make_provider

    config = provider_config(target.provider)
    data = target.spec.model_dump()
    data["labels"] = {**target.spec.labels, LABEL: "1", "reattach": "yes"}
    spec = SandboxSpec.model_validate(data)
    payload = os.urandom(1024) + b"reattached"

    async def create() -> str:
        async with Providers() as providers:
            sb = await providers.create_sandbox(config, spec)
            try:
                await sb.write_file("reattach.bin", payload)
            except BaseException:
                await sb.aclose()
                raise
            return sb.id  # the sandbox is let go, not closed

    sandbox_id = await _in_fresh_loop(create)
    gc.collect()  # nothing of the first loop's objects is left to lean on

    async def reattach() -> None:
        provider = make_provider(config)  # a new instance, as a new process would make
        try:
            sb = await provider.connect(sandbox_id)
            async with sb:
                _require(sb.id == sandbox_id, f"connect returned sandbox {sb.id}, not {sandbox_id}")
                got = await sb.read_file("reattach.bin")
                _require(
                    got == payload, f"the file read back {len(got)} bytes, not the 1034 written"
                )
                result = await sb.exec("echo alive")
                _require(result.text == "alive\n", f"exec after connect gave {result!r}")
                _require(
                    sb.labels.get("reattach") == "yes",
                    f"the labels did not survive reattaching: {dict(sb.labels)}",
                )
            listed = {info.id for info in await provider.list(labels={"reattach": "yes"})}
            _require(sandbox_id not in listed, "closing the reattached sandbox did not remove it")
            try:
                again = await provider.connect(sandbox_id)
            except SandboxNotFoundError:
                pass
            else:
                await again.aclose()
                raise CheckFailed("connect to a removed sandbox did not raise SandboxNotFoundError")
        finally:
            with anyio.CancelScope(shield=True):
                await provider.destroy(sandbox_id)  # whatever failed above, nothing is left
                await provider.aclose()

    await _in_fresh_loop(reattach)


@_check
async def check_connect_unknown_id_not_found(target: Target) -> None:
    """Provider.connect with an id no sandbox has raises SandboxNotFoundError."""
    provider = target.get_provider()
    for unknown in ("0123456789ab", "sandbay-no-such-sandbox"):
        try:
            sb = await provider.connect(unknown)
        except SandboxNotFoundError:
            continue
        await sb.aclose()
        raise CheckFailed(f"connect({unknown!r}) returned a sandbox instead of raising")


# --- leases (Sandbox.extend) -------------------------------------------------------------


@_check
async def check_extend_lease(target: Target) -> None:
    """Sandbox.extend renews the lease: `expiry` and Provider.list show the later expiry, the
    sandbox still works; a non-positive or non-finite lease raises ConfigError; extend after
    close raises SandboxClosedError."""
    marker = uuid.uuid4().hex
    provider = target.get_provider()
    async with target.sandbox(labels={LABEL: marker}, lifetime_s=60) as sb:
        first = sb.expiry
        expect(first is not None, "a new sandbox has no expiry")
        assert first is not None
        before = time.time()
        renewed = await sb.extend(3600)
        expect(
            before + 3600 <= renewed <= time.time() + 3601,
            f"extend(3600) returned {renewed}, not about an hour from now",
        )
        expect(sb.expiry == renewed, f"Sandbox.expiry is {sb.expiry}, extend returned {renewed}")
        listed = {info.id: info for info in await provider.list(labels={LABEL: marker})}
        expect(sb.id in listed, "the extended sandbox is not listed")
        seen = listed[sb.id].expiry
        expect(
            seen is not None and abs(seen - renewed) <= 1,
            f"Provider.list shows expiry {seen}, not the renewed {renewed} (was {first})",
        )
        expect((await sb.exec(["true"])).ok, "the sandbox does not run commands after extend")
        for bad in (0, -5, math.inf, math.nan):
            try:
                await sb.extend(bad)
            except ConfigError:
                continue
            raise CheckFailed(f"extend({bad!r}) was accepted")
    try:
        await sb.extend(60)
    except SandboxClosedError:
        pass
    else:
        raise CheckFailed("extend after aclose did not raise SandboxClosedError")
