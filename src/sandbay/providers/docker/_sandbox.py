"""`DockerSandbox`: one container; processes and file operations as ``docker exec``."""

from __future__ import annotations

import contextlib
import math
import secrets
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import anyio
from typing_extensions import override

from ..._errors import (
    ConfigError,
    SandboxError,
)
from ..._sandbox import (
    CLOSE_TIMEOUT,
    ByteStream,
    CliLaunch,
    Process,
    RelaySeparation,
    Sandbox,
    SandboxSpec,
    TenantDirs,
)
from ..._shellfiles import FILE_ERRORS as _FILE_ERRORS
from ..._shellfiles import WRITE_SCRIPT as _WRITE_SCRIPT
from ._errors import NAME
from ._process import _LAUNCH_ERROR, Connection, _DockerProcess, start_exec

if TYPE_CHECKING:
    from ._provider import DockerProvider

ROOT = "0:0"

#: Where the relay keeps its code and run directories: root's, in /run, which only root may
#: write (the lease process makes /run/sandbay), so nothing can be planted there beforehand.
RELAY_DIR = "/run/sandbay"
#: Where tenants' directories live: root's (mode 0711), each tenant's own below it (0700).
TENANT_ROOT = "/home/tenants"

#: The container's lease: the Unix time (whole seconds, one line) after which its main process
#: exits and the container stops. Root's, in a directory only root may write: the sandbox's
#: user can read its lease but neither extend it nor replace the file.
LEASE_FILE = "/run/sandbay/expiry"

# The container's main process, run as root under Docker's init with the first expiry as $1:
# it writes the lease file (unless an extend came first) and exits once the time in it has
# passed, reading it again every few seconds, so a renewed lease keeps the container and a
# shortened one ends it. Python where the image has it: it forks nothing, so a sandbox that
# spent every pid of its limit keeps its lease. Otherwise a shell, which needs two forks per
# look (a look that cannot fork ends the lease early).
_LEASE_PY = """
import os, sys, time
try:
    with open("/proc/self/comm", "w") as h:
        h.write("sandbay-lease")  # in ps, not one of the sandbox's own python3 processes
except OSError:
    pass
path = sys.argv[1]
os.makedirs(os.path.dirname(path), exist_ok=True)
os.chmod(os.path.dirname(path), 0o755)
try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
except FileExistsError:
    pass
else:
    os.write(fd, sys.argv[2].encode() + b"\\n")
    os.close(fd)
while True:
    try:
        with open(path, "rb") as h:
            left = int(h.read(64)) - time.time()
    except (OSError, ValueError):
        break
    if left <= 0:
        break
    time.sleep(min(left, 2.0))
"""
_LEASE_SH = (
    'f=$1; command -v python3 >/dev/null 2>&1 && exec python3 -S -I -c "$3" "$f" "$2"; '
    'd=${f%/*}; mkdir -p "$d" && chmod 755 "$d"; { set -C; echo "$2" >"$f"; } 2>/dev/null; set +C; '
    'while read -r e <"$f" && n=$(date +%s) && [ "$n" -lt "$e" ]; do '
    's=$((e - n)); [ "$s" -le 10 ] || s=10; sleep "$s"; done'
)
# extend, as root: the new expiry ($1) replaces the lease file whole (renamed over it), so the
# main process never reads half of it.
_EXTEND_SCRIPT = (
    f'f={LEASE_FILE}; d=${{f%/*}}; mkdir -p "$d" && t="$d/.expiry.$$" && '
    'echo "$1" >"$t" && chmod 644 "$t" && mv -f -- "$t" "$f"'
)


def lease_command(expiry: float) -> list[str]:
    """The container's main process: a lease that ends at ``expiry`` unless extended."""
    return ["sh", "-c", _LEASE_SH, "sandbay-lease", LEASE_FILE, str(math.ceil(expiry)), _LEASE_PY]


#: Environment variable marking every process of one exec, so `kill` finds what it started.
EXEC_TOKEN = "SANDBAY_EXEC_ID"

# Kills every process whose environment carries the exec's token: the command and what it
# started. Runs as the command's user, who may read its /proc/<pid>/environ. Processes are
# stopped first (twice over, for children forked meanwhile) so that a parent cannot run on
# for an instant after its child dies. One grep per pass, not a process per pid: it must
# run in the few pids a container that spent its limit is lent (`_kill_tagged`).
_KILL_SCRIPT = (
    f't="{EXEC_TOKEN}=$1"; pids=; for pass in 1 2; do '
    'for f in $(grep -lsF -- "$t" /proc/[0-9]*/environ); do p="${f#/proc/}"; p="${p%/environ}"; '
    'kill -STOP "$p" 2>/dev/null && pids="$pids $p"; done; done; '
    'if [ -n "$pids" ]; then kill -KILL $pids 2>/dev/null; fi; true'
)
#: Extra pids lent, in turn, to a container too full to start the kill.
_PIDS_HEADROOM = (64, 512)

# The same kill without a single fork, for a container whose fork loop takes every pid as
# soon as one is free: Python (exec'd in place of the shell) where the image has it. It
# stops what it finds until a pass finds nothing new, so children forked meanwhile are
# caught too, then kills them all.
_KILL_PY = """
import os, signal, sys
token = b"\\0" + sys.argv[1].encode() + b"\\0"
found = set()
for _ in range(50):
    new = set()
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) not in found and int(name) != os.getpid():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if token in b"\\0" + f.read() + b"\\0":
                        os.kill(int(name), signal.SIGSTOP)
                        new.add(int(name))
            except OSError:
                pass
    if not new:
        break
    found |= new
for pid in found:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""
_KILL_WITHOUT_FORKS = (
    f'command -v python3 >/dev/null && exec python3 -c "$2" "{EXEC_TOKEN}=$1"; {_KILL_SCRIPT}'
)
_MKDIR_OWNED = 'if [ ! -d "$1" ]; then mkdir -p -- "$1" && chown -- "$2" "$1"; fi'


class DockerSandbox(Sandbox):
    """A container. Create it with `DockerProvider.create`."""

    provider: ClassVar[str] = NAME

    def __init__(
        self,
        spec: SandboxSpec,
        *,
        provider: DockerProvider,
        container_id: str,
        user: str,
        workdir: str | None = None,
    ) -> None:
        super().__init__(spec)
        self._provider = provider
        self._id = container_id
        self._user = user
        self._container_workdir = workdir  # the container's own working directory, if set
        self._processes: set[_DockerProcess] = set()
        self._pids_lock = anyio.Lock()

    @property
    @override
    def id(self) -> str:
        return self._id

    @property
    @override
    def reaches_host_loopback(self) -> bool:
        return self.spec.network == "host"

    # --- the relay, apart from the CLI ---
    #
    # The relay runs as root; it starts the CLI as the sandbox's user (or a tenant's own
    # uid) with no supplementary groups. The container keeps CAP_SETUID and CAP_SETGID for
    # that, and no-new-privileges: the CLI's tools can neither regain root nor reach a
    # root process's /proc entries, signal it, or read its 0700 run directory.

    def _runs_as_root(self) -> bool:
        name, _, _ = self._user.partition(":")
        return name in ("0", "root")

    @property
    @override
    def relay_separation(self) -> RelaySeparation:
        return "none" if self._runs_as_root() else "user"

    @property
    @override
    def relay_dir(self) -> str:
        return RELAY_DIR

    @override
    async def start_relay(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None
    ) -> Process:
        return await self.start(argv, env=env, cwd="/", user=ROOT)

    @override
    def tenant_dirs(self, tenant: str) -> TenantDirs:
        root = f"{TENANT_ROOT}/{tenant}"
        return TenantDirs(work=f"{root}/work", home=f"{root}/home", tmp=f"{root}/tmp")

    @override
    async def cli_launch(self, *, cwd: str, tenant: str | None = None) -> CliLaunch:
        if tenant is not None:
            # The relay (root) gives the tenant a uid of its own and makes its directories.
            return CliLaunch(tenant_root=TENANT_ROOT)
        return CliLaunch(user=None if self._runs_as_root() else self._user)

    # --- processes ---

    @override
    async def _start(
        self, argv: list[str], *, env: dict[str, str], cwd: str, user: str | None
    ) -> Process:
        return await self._start_exec(argv, env=env, cwd=cwd, user=user)

    async def _start_exec(
        self, argv: list[str], *, env: dict[str, str], cwd: str, user: str | None
    ) -> _DockerProcess:
        user = user or self._user
        token = secrets.token_hex(8)
        # The container already has the spec's env and (if set) its workdir: send what differs.
        extra = {k: v for k, v in env.items() if self.spec.env.get(k) != v}
        workdir = None if cwd == self._container_workdir else cwd

        def start() -> tuple[str, Connection]:
            api = self._provider._api()
            exec_id = str(
                api.exec_create(
                    self._id,
                    argv,
                    stdin=True,
                    stdout=True,
                    stderr=True,
                    tty=False,
                    environment={**extra, EXEC_TOKEN: token},
                    workdir=workdir,
                    user=user,
                )["Id"]
            )
            return exec_id, start_exec(api, exec_id)

        with anyio.CancelScope(shield=True):
            exec_id, conn = await self._provider._call(start, sandbox_id=self._id)
            process = _DockerProcess(self, exec_id, conn, token=token, user=user)
            self._processes.add(process)
            await process.attach()
        return process

    async def _run(
        self, argv: list[str], *, user: str, input: bytes = b"", env: dict[str, str] | None = None
    ) -> tuple[int, bytes, bytes]:
        """Run a command to completion from ``/``; return its exit code, stdout and stderr."""
        proc = await self._start_exec(
            argv, env={**self.spec.env, **(env or {})}, cwd="/", user=user
        )
        try:
            return await _communicate(proc, input)
        finally:
            proc._close()

    async def _check_user(self) -> None:
        """Raise `ConfigError` if Docker cannot run a command as the sandbox's user."""
        code, out, err = await self._run(["sh", "-c", ":"], user=self._user)
        text = (err or out).decode(errors="replace").strip()
        if code != 0 and "user" in text.lower():
            raise ConfigError(
                f"user {self._user!r} is not in the image ({text}); give a user the image "
                "has, or numeric uid:gid",
                provider=NAME,
                sandbox_id=self._id,
            )

    async def _prepare_workdir(self) -> None:
        code, out, err = await self._run(
            ["sh", "-c", _MKDIR_OWNED, "sh", self.workdir, self._user], user=ROOT
        )
        if code != 0:
            raise SandboxError(
                f"could not create the workdir {self.workdir!r} (exit code {code}): "
                f"{(err or out).decode(errors='replace').strip()}",
                provider=NAME,
                sandbox_id=self._id,
            )

    async def _kill_tagged(self, token: str, *, user: str) -> None:
        argv = ["sh", "-c", _KILL_SCRIPT, "sh", token]
        code, out, err = await self._run(argv, user=user)
        if code == 0 or b"unable to find user" in out + err:
            return  # killed; or a user that never ran anything, so there is nothing to kill
        # The kill could not even start: its script always exits 0. The likely cause is
        # that the sandbox spent every pid of its limit (a fork loop), and no exec starts
        # then. Lend the container a few pids through the engine, kill, and take them back.
        # The kill stops what it finds before it kills it, so a loop cannot refill them.
        argv = ["sh", "-c", _KILL_WITHOUT_FORKS, "sh", token, _KILL_PY]
        async with self._pids_lock:
            limit = self._provider.config.pids_limit
            try:
                for extra in _PIDS_HEADROOM:
                    await self._set_pids_limit(limit + extra)
                    code, _, _ = await self._run(argv, user=user)
                    if code == 0:
                        return
            finally:
                with contextlib.suppress(SandboxError):
                    await self._set_pids_limit(limit)

    async def _set_pids_limit(self, limit: int) -> None:
        def update() -> None:
            api = self._provider._api()
            response = api._post_json(
                api._url("/containers/{0}/update", self._id), data={"PidsLimit": limit}
            )
            api._raise_for_status(response)

        with anyio.CancelScope(shield=True):
            await self._provider._call(update, sandbox_id=self._id)

    # --- files ---
    #
    # Every file operation is a process run as the sandbox's user, so it has that user's
    # rights and no more, and follows a link exactly as the user's own processes would: a
    # link the agent planted can lead it nowhere the agent could not go itself. (Docker's
    # archive API acts as root and would follow such a link into /etc.) This holds for
    # sandbay's own files too: the entrypoint is written as the user who then runs it, so
    # whatever the agent planted under /tmp/sandbay, the write has no rights the agent lacks.

    def _file_env(self) -> dict[str, str]:
        return {**self.spec.env, "LC_ALL": "C"}  # error messages in English, to map them

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
        proc = await self._start_exec(
            ["cat", "--", path], env=self._file_env(), cwd="/", user=self._user
        )
        finished = False
        try:
            await proc.close_stdin()
            chunks = aiter(proc.stdout)
            chunk = await anext(chunks, None)
            if chunk is not None:  # cat writes nothing before it has opened the file
                yield chunk
                async for chunk in chunks:
                    yield chunk
            code = await proc.wait()
            finished = True
            if code != 0:
                raise self._file_error("read", path, code, await proc.stderr.read())
        finally:
            if not finished:  # closed early: cat would wait on its output for ever
                with anyio.CancelScope(shield=True):
                    await proc.kill()
            proc._close()

    def _file_error(self, verb: str, path: str, code: int, stderr: bytes) -> SandboxError:
        text = stderr.decode(errors="replace").strip()
        ctx = {"provider": NAME, "sandbox_id": self._id}
        reason = text.splitlines()[-1].rsplit(": ", 1)[-1].lower() if text else ""
        known = None if _LAUNCH_ERROR.match(stderr) else _FILE_ERRORS.get(reason)
        if known is not None:
            kind, why = known
            return kind(f"cannot {verb} {path!r}: {why} ({text})", **ctx)
        return SandboxError(
            f"cannot {verb} {path!r}: {text or f'exit code {code}'}",
            **ctx,
        )

    # --- lifecycle ---

    @override
    async def _extend(self, expiry: float) -> None:
        code, out, err = await self._run(
            ["sh", "-c", _EXTEND_SCRIPT, "sh", str(math.ceil(expiry))], user=ROOT
        )
        if code != 0:
            raise SandboxError(
                f"could not extend the lease (exit code {code}): "
                f"{(err or out).decode(errors='replace').strip()}",
                provider=NAME,
                sandbox_id=self._id,
            )

    @override
    async def _aclose(self) -> None:
        # Hang up first: the engine holds a container while it waits to deliver output.
        for process in list(self._processes):
            process._close()
        await self._provider.destroy(self._id)

    def _forget(self, process: _DockerProcess) -> None:
        self._processes.discard(process)


def _is_numeric(user: str) -> bool:
    """Whether a user is given as uid or uid:gid, which needs no lookup in the image."""
    uid, _, gid = user.partition(":")
    return uid.isdigit() and (not gid or gid.isdigit())


async def _communicate(proc: _DockerProcess, input: bytes) -> tuple[int, bytes, bytes]:
    """Feed stdin, read both streams to their end, wait; kill the process if interrupted."""
    out: list[bytes] = []
    err: list[bytes] = []

    async def collect(stream: ByteStream, into: list[bytes]) -> None:
        async for chunk in stream:
            into.append(chunk)

    async def feed() -> None:
        try:
            if input:
                await proc.write(input)
        except BrokenPipeError:
            pass  # it exited without reading everything: its exit code says why
        finally:
            await proc.close_stdin()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(collect, proc.stdout, out)
            tg.start_soon(collect, proc.stderr, err)
            tg.start_soon(feed)
        code = await proc.wait()
    except BaseException:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
            await proc.kill()
        raise
    return code, b"".join(out), b"".join(err)
