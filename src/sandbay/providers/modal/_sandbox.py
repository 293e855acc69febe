"""`ModalSandbox`: one Modal Sandbox; processes and file operations as Modal execs.

Modal runs every exec as root with no user option, so each exec goes through a small shell
launcher (`LAUNCH`) that drops to the sandbox's user with ``setpriv`` (setting ``HOME``
from the user's entry), changes to the working directory as that user, and ``exec``\\ s the
command: a missing command exits 127, a missing directory or user exits non-zero naming it.
Modal has no per-exec kill either: every exec carries a token in its environment, and
`_ModalProcess.kill` kills, as the process's user, every process whose environment holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
from typing_extensions import override

from ..._errors import (
    ConfigError,
    SandboxError,
)
from ..._provider import EXPIRY
from ..._sandbox import CLOSE_TIMEOUT, ByteStream, Process, Sandbox, SandboxSpec
from ..._shellfiles import FILE_ERRORS as _FILE_ERRORS
from ..._shellfiles import WRITE_SCRIPT as _WRITE_SCRIPT
from ._errors import NAME, modal_errors

if TYPE_CHECKING:
    from ._provider import ModalProvider

#: The sandbox's lease: the Unix time (whole seconds) after which its main process exits and
#: Modal ends the sandbox. Root's, in a directory only root may write.
LEASE_FILE = "/run/sandbay/expiry"

# The sandbox's own command (Modal's entrypoint), as root, with the lease file and the first
# expiry: writes the file (unless an extend came first) and exits once the time in it passed.
_LEASE_SCRIPT = (
    'f=$1; d=${f%/*}; mkdir -p "$d" && chmod 755 "$d"; '
    '[ -e "$f" ] || echo "$2" >"$f"; '
    'while read -r e <"$f" && n=$(date +%s) && [ "$n" -lt "$e" ]; do '
    's=$((e - n)); [ "$s" -le 5 ] || s=5; sleep "$s"; done'
)
# extend, as root: the new expiry ($1) replaces the lease file whole.
_EXTEND_SCRIPT = (
    f'f={LEASE_FILE}; d=${{f%/*}}; mkdir -p "$d" && t="$d/.expiry.$$" && '
    'echo "$1" >"$t" && chmod 644 "$t" && mv -f -- "$t" "$f"'
)


def lease_command(expiry: float) -> list[str]:
    """The sandbox's main process: a lease that ends at ``expiry`` unless extended."""
    return ["sh", "-c", _LEASE_SCRIPT, "sandbay-lease", LEASE_FILE, str(math.ceil(expiry))]


#: Environment variable marking every process of one exec, so `kill` finds what it started.
EXEC_TOKEN = "SANDBAY_EXEC_ID"

# Every exec: $1 the working directory, $2 the user ("" for root), $3 "1" to set HOME from
# the user's entry, then the command. The user is dropped to first, so the directory is
# entered with the user's rights.
LAUNCH = r"""
d=$1; u=$2; h=$3; shift 3
if [ -n "$u" ]; then
  case $u in
    *:*) uid=${u%%:*}; gid=${u#*:}; groups=--clear-groups ;;
    *) uid=$u; groups=--init-groups
       gid=$(id -g -- "$u" 2>/dev/null) || {
         echo "sandbay: user $u does not exist in the sandbox" >&2; exit 125; } ;;
  esac
  if [ "$h" = 1 ]; then
    home=$(getent passwd "$uid" | cut -d: -f6); export HOME="${home:-/}"
  fi
  exec setpriv --reuid="$uid" --regid="$gid" $groups -- \
    sh -c 'cd -- "$0" || exit 2; exec "$@"' "$d" "$@"
fi
cd -- "$d" || exit 2
exec "$@"
"""

# Kills every process whose environment carries the exec's token; stops them first (three
# passes, for children forked meanwhile) so that none runs on after its parent dies.
_KILL_SCRIPT = (
    f't="{EXEC_TOKEN}=$1"; pids=; for pass in 1 2 3; do '
    'for f in $(grep -lsF -- "$t" /proc/[0-9]*/environ); do p="${f#/proc/}"; p="${p%/environ}"; '
    'kill -STOP "$p" 2>/dev/null && pids="$pids $p"; done; done; '
    'if [ -n "$pids" ]; then kill -KILL $pids 2>/dev/null; fi; true'
)

_MKDIR_OWNED = 'if [ ! -d "$1" ]; then mkdir -p -- "$1" && chown -- "$2" "$1"; fi'

#: Most bytes of stdin sent in one message (the SDK buffers at most 16 MiB before a drain).
_STDIN_CHUNK = 1 << 20

_ROOT_USERS = frozenset({"", "0", "0:0", "root", "root:root"})


class ModalSandbox(Sandbox):
    """A Modal Sandbox. Create it with `ModalProvider.create` (or `connect`)."""

    provider: ClassVar[str] = NAME

    def __init__(
        self, spec: SandboxSpec, *, provider: ModalProvider, handle: Any, user: str
    ) -> None:
        super().__init__(spec)
        self._provider = provider
        self._handle = handle
        self._id = str(handle.object_id)
        self._user = user
        self._processes: set[_ModalProcess] = set()

    @property
    @override
    def id(self) -> str:
        return self._id

    @property
    @override
    def reaches_host_loopback(self) -> bool:
        return self._provider.config.host_network and self.spec.network == "host"

    def _errors(self) -> Any:
        return modal_errors(server_url=self._provider.config.server_url, sandbox_id=self._id)

    # --- processes ---

    @override
    async def _start(
        self, argv: list[str], *, env: dict[str, str], cwd: str, user: str | None
    ) -> Process:
        return await self._exec(argv, env=env, cwd=cwd, user=user or self._user)

    async def _exec(
        self, argv: list[str], *, env: dict[str, str], cwd: str, user: str
    ) -> _ModalProcess:
        token = secrets.token_hex(8)
        drop = "" if user in _ROOT_USERS else user
        launch = ["sh", "-c", LAUNCH, "sandbay-exec", cwd, drop, "" if "HOME" in env else "1"]
        with self._errors(), anyio.CancelScope(shield=True):
            proc = await self._handle.exec.aio(
                *launch, *argv, env={**env, EXEC_TOKEN: token}, text=False
            )
        process = _ModalProcess(self, proc, token=token, user=user)
        self._processes.add(process)
        return process

    async def _run(
        self, argv: list[str], *, user: str, input: bytes = b"", env: dict[str, str] | None = None
    ) -> tuple[int, bytes, bytes]:
        """Run a command to completion from ``/``; return its exit code, stdout and stderr."""
        proc = await self._exec(argv, env={**self.spec.env, **(env or {})}, cwd="/", user=user)
        out: list[bytes] = []
        err: list[bytes] = []

        async def collect(stream: ByteStream, into: list[bytes]) -> None:
            async for chunk in stream:
                into.append(chunk)

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(collect, proc.stdout, out)
                tg.start_soon(collect, proc.stderr, err)
                if input:
                    await proc.write(input)
                await proc.close_stdin()
            code = await proc.wait()
        except BaseException:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                await proc.kill()
                await proc._close_streams()
            raise
        self._processes.discard(proc)
        return code, b"".join(out), b"".join(err)

    async def _kill_tagged(self, token: str, *, user: str) -> None:
        # As the command's user: reading another user's /proc/<pid>/environ needs
        # CAP_SYS_PTRACE, which a sandbox's root may lack.
        await self._run(["sh", "-c", _KILL_SCRIPT, "sh", token], user=user)

    async def _prepare_workdir(self) -> None:
        code, out, err = await self._run(
            ["sh", "-c", _MKDIR_OWNED, "sh", self.workdir, self._user], user="root"
        )
        if code != 0:
            raise SandboxError(
                f"could not create the workdir {self.workdir!r} (exit code {code}): "
                f"{(err or out).decode(errors='replace').strip()}",
                provider=NAME,
                sandbox_id=self._id,
            )

    # --- files: processes as the sandbox's user, with its rights and no more ---

    def _file_env(self) -> dict[str, str]:
        return {**self.spec.env, "LC_ALL": "C"}

    @override
    async def _write_file(self, path: str, data: bytes, *, mode: int) -> None:
        if path.endswith("/"):
            raise ConfigError(f"{path!r} names a directory; give a file path")
        argv = ["sh", "-c", _WRITE_SCRIPT, "sh", path, format(mode & 0o7777, "o")]
        code, _, err = await self._run(argv, user=self._user, input=data, env=self._file_env())
        if code != 0:
            raise self._file_error("write", path, code, err)

    @override
    async def _read_stream(self, path: str) -> AsyncGenerator[bytes, None]:
        proc = await self._exec(["cat", "--", path], env=self._file_env(), cwd="/", user=self._user)
        finished = False
        try:
            await proc.close_stdin()
            async for chunk in proc.stdout:
                yield chunk
            code = await proc.wait()
            finished = True
            if code != 0:
                raise self._file_error("read", path, code, await proc.stderr.read())
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                if not finished:
                    await proc.kill()
                await proc._close_streams()

    def _file_error(self, verb: str, path: str, code: int, stderr: bytes) -> SandboxError:
        text = stderr.decode(errors="replace").strip()
        reason = text.splitlines()[-1].rsplit(": ", 1)[-1].lower() if text else ""
        known = _FILE_ERRORS.get(reason)
        ctx: dict[str, Any] = {"provider": NAME, "sandbox_id": self._id}
        if known is not None:
            cls, why = known
            return cls(f"cannot {verb} {path!r}: {why}", **ctx)
        return SandboxError(
            f"cannot {verb} {path!r} (exit code {code}): {text or 'no message'}", **ctx
        )

    # --- lease and removal ---

    @override
    async def _extend(self, expiry: float) -> None:
        stamp = str(math.ceil(expiry))
        code, out, err = await self._run(["sh", "-c", _EXTEND_SCRIPT, "sh", stamp], user="root")
        if code != 0:
            raise SandboxError(
                f"could not renew the lease (exit code {code}): "
                f"{(err or out).decode(errors='replace').strip()}",
                provider=NAME,
                sandbox_id=self._id,
            )
        with self._errors():
            tags = dict(await self._handle.get_tags.aio())
            tags[EXPIRY] = stamp  # whole seconds: a valid tag as it is
            await self._handle.set_tags.aio(tags)

    @override
    async def _aclose(self) -> None:
        try:
            await self._provider._terminate(self._handle, self._id)
        finally:
            processes, self._processes = self._processes, set()
            for process in processes:
                await process._close_streams()


class _ModalProcess(Process):
    """One Modal exec: output pulled on demand, stdin written and drained in order."""

    def __init__(self, sandbox: ModalSandbox, proc: Any, *, token: str, user: str) -> None:
        self._sandbox = sandbox
        self._user = user
        self._proc = proc
        self._token = token
        self._returncode: int | None = None
        self._killed = False
        self._stdin_closed = False
        self._write_lock = anyio.Lock()
        self._unpolled = 0  # bytes written since the last poll
        self._pulls = (_Pull(sandbox, proc.stdout), _Pull(sandbox, proc.stderr))
        self.stdout = ByteStream(self._pulls[0].receive)
        self.stderr = ByteStream(self._pulls[1].receive)

    async def _close_streams(self) -> None:
        """Stop reading its output (the SDK's readers are closed here, in this loop)."""
        self._sandbox._processes.discard(self)
        for pull in self._pulls:
            await pull.aclose()

    @override
    async def write(self, data: bytes) -> None:
        if self._stdin_closed:
            raise BrokenPipeError("stdin was closed")
        if self._returncode is not None:
            raise BrokenPipeError("the process has exited")
        if not data:
            return
        async with self._write_lock:
            try:
                with self._sandbox._errors():
                    view = memoryview(bytes(data))
                    for start in range(0, len(view), _STDIN_CHUNK):
                        self._proc.stdin.write(view[start : start + _STDIN_CHUNK])
                        await self._proc.stdin.drain.aio()
            except SandboxError as exc:
                raise BrokenPipeError(f"the process's stdin is gone: {exc}") from None
            # Modal may accept stdin for a process that has exited: ask whether it has, once
            # per MiB written (not per message, which would double each write's round trips).
            self._unpolled += len(data)
            if self._unpolled < _STDIN_CHUNK:
                return
            self._unpolled = 0
            with self._sandbox._errors():
                code = await self._proc.poll.aio()
            if code is not None:
                self._set_code(code)
                raise BrokenPipeError("the process has exited")

    @override
    async def close_stdin(self) -> None:
        if self._stdin_closed:
            return
        self._stdin_closed = True
        if self._returncode is not None:
            return
        async with self._write_lock:
            try:
                with self._sandbox._errors(), anyio.CancelScope(shield=True):
                    self._proc.stdin.write_eof()
                    await self._proc.stdin.drain.aio()
            except SandboxError:
                pass  # the process is gone: its stdin with it

    @override
    async def wait(self) -> int:
        if self._returncode is None:
            with self._sandbox._errors():
                code = await self._proc.wait.aio()
            self._set_code(code)
        assert self._returncode is not None
        return self._returncode

    def _set_code(self, code: int) -> None:
        if self._returncode is None:
            self._returncode = -9 if self._killed and code in (137, -1) else int(code)

    @override
    async def kill(self) -> None:
        if self._killed or self._returncode is not None:
            return
        self._killed = True
        try:
            with anyio.move_on_after(CLOSE_TIMEOUT):
                # An exec Modal has accepted may not have started in the sandbox yet, so a
                # kill can find nothing to kill: kill again until Modal reports it ended.
                delay = 0.05
                while True:
                    await self._sandbox._kill_tagged(self._token, user=self._user)
                    with self._sandbox._errors():
                        code = await self._proc.poll.aio()
                    if code is not None:
                        self._set_code(code)
                        return
                    await anyio.sleep(delay)
                    delay = min(delay * 2, 0.5)
        except SandboxError:
            pass  # the sandbox is gone, and the process with it

    @property
    @override
    def returncode(self) -> int | None:
        return self._returncode


class _Pull:
    """Reads one of an exec's streams on demand; a read cancelled half-way loses nothing.

    The SDK's reader is an async generator that a cancelled ``__anext__`` would close, so
    each read runs as its own task, shielded: a cancelled caller leaves it running, and the
    next read takes its chunk.
    """

    def __init__(self, sandbox: ModalSandbox, reader: Any) -> None:
        self._sandbox = sandbox
        self._reader = reader
        self._chunks: AsyncIterator[bytes] | None = None
        self._pending: asyncio.Future[bytes] | None = None

    async def receive(self) -> bytes | None:
        if self._chunks is None:
            self._chunks = aiter(self._reader)
        if self._pending is None:
            self._pending = asyncio.ensure_future(anext(self._chunks))
        pending = self._pending
        try:
            with self._sandbox._errors():
                chunk = await asyncio.shield(pending)
        except StopAsyncIteration:
            self._pending = None
            return None
        except BaseException:
            if pending.done():
                self._pending = None
            raise
        self._pending = None
        return bytes(chunk)

    async def aclose(self) -> None:
        """Close the SDK's reader; a read in flight is abandoned."""
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.cancel()
        if pending is not None:
            with contextlib.suppress(BaseException):
                await pending
        chunks, self._chunks = self._chunks, None
        if chunks is not None:
            with contextlib.suppress(Exception):
                await chunks.aclose()  # type: ignore[attr-defined]
