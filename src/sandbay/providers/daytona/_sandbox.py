"""`DaytonaSandbox`: one Daytona sandbox, its processes and files."""

from __future__ import annotations

import math
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, ClassVar

import anyio
from daytona import SessionExecuteRequest
from typing_extensions import override

from ..._errors import (
    SandboxError,
    SandboxFileNotFoundError,
    SandboxIsADirectoryError,
    SandboxNotADirectoryError,
    SandboxPermissionError,
)
from ..._provider import EXPIRY
from ..._sandbox import ByteStream, Process, Sandbox, SandboxSpec
from ._client import close_client
from ._errors import NAME, daytona_errors
from ._process import DaytonaProcess, shim_command, spec_record

if TYPE_CHECKING:
    from daytona import AsyncDaytona, AsyncSandbox

# Files are read and written by a small program run as the sandbox's user, so they carry
# that user's rights and see links as its processes do. Its exit code is the errno.
_WRITE = (
    "import os,sys\n"
    "p,m=sys.argv[1],int(sys.argv[2],8)\n"
    "try:\n"
    " d=os.path.dirname(p)\n"
    " if d and not os.path.isdir(d):\n"
    "  try: os.makedirs(d,exist_ok=True)\n"
    "  except FileExistsError: raise NotADirectoryError(20,'Not a directory',d)\n"
    " f=os.open(p,os.O_WRONLY|os.O_CREAT|os.O_TRUNC,m)\n"
    "except OSError as e:\n"
    " sys.stderr.write(str(e)); sys.exit(e.errno or 1)\n"
    "os.fchmod(f,m)\n"
    "while True:\n"
    " b=sys.stdin.buffer.read(65536)\n"
    " if not b: break\n"
    " os.write(f,b)\n"
    "os.close(f)\n"
)
_READ = (
    "import os,sys,stat\n"
    "try:\n"
    " f=os.open(sys.argv[1],os.O_RDONLY)\n"
    " if stat.S_ISDIR(os.fstat(f).st_mode): raise IsADirectoryError(21,'Is a directory')\n"
    "except OSError as e:\n"
    " sys.stderr.write(str(e)); sys.exit(e.errno or 1)\n"
    "o=sys.stdout.buffer; o.write(b'+'); o.flush()\n"
    "while True:\n"
    " b=os.read(f,65536)\n"
    " if not b: break\n"
    " o.write(b); o.flush()\n"
)
_ERRNO = {
    2: SandboxFileNotFoundError,
    21: SandboxIsADirectoryError,
    20: SandboxNotADirectoryError,
    13: SandboxPermissionError,
    1: SandboxPermissionError,
}


class DaytonaSandbox(Sandbox):
    """A Daytona sandbox. It owns its SDK client, closed with the sandbox.

    Every process runs under a small shim (see `sandbay.providers.daytona._shim`), started
    by ``python3`` in the sandbox: the image needs Python 3.9+ (sandbay's agent image has it).
    ``user=`` is honoured where the sandbox's OS user is root (the shim switches user);
    otherwise only the sandbox's own user can run processes (another raises on stderr).
    """

    provider: ClassVar[str] = NAME

    def __init__(
        self,
        spec: SandboxSpec,
        client: AsyncDaytona,
        sdk: AsyncSandbox,
        *,
        release: Callable[[AsyncDaytona], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__(spec)
        self._client = client
        self._release = release
        self._procs: weakref.WeakSet[DaytonaProcess] = weakref.WeakSet()
        self._sdk = sdk
        self._id = str(sdk.id)

    @property
    @override
    def id(self) -> str:
        return self._id

    @property
    @override
    def reaches_host_loopback(self) -> bool:
        # The provider accepts network="host" only from a control plane whose sandboxes
        # share this machine's network (`DaytonaConfig.host_network`).
        return self.spec.network == "host"

    @override
    async def _start(
        self, argv: list[str], *, env: dict[str, str], cwd: str, user: str | None
    ) -> Process:
        session = f"sandbay-{uuid.uuid4().hex}"
        with daytona_errors("starting a process", sandbox_id=self.id):
            await self._sdk.process.create_session(session)
            try:
                response = await self._sdk.process.execute_session_command(
                    session,
                    SessionExecuteRequest(
                        command=shim_command(self.python),
                        run_async=True,
                        suppress_input_echo=True,
                    ),
                )
                proc = DaytonaProcess(self._sdk, session, str(response.cmd_id))
                self._procs.add(proc)
                await proc.send(spec_record(argv, env, cwd, user))
            except BaseException:
                with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                    await self._sdk.process.delete_session(session)
                raise
        return proc

    async def _helper(self, code: str, args: list[str]) -> DaytonaProcess:
        proc = await self.start([self.python, "-I", "-S", "-c", code, *args], cwd="/")
        assert isinstance(proc, DaytonaProcess)
        return proc

    async def _file_error(self, proc: DaytonaProcess, path: str, stderr: ByteStream) -> None:
        code = await proc.wait()
        if code == 0:
            return
        message = (await stderr.read()).decode(errors="replace").strip()
        cls = _ERRNO.get(code, SandboxError)
        raise cls(f"{path!r}: {message or f'exit code {code}'}", provider=NAME, sandbox_id=self.id)

    @override
    async def _write_file(self, path: str, data: bytes, *, mode: int) -> None:
        proc = await self._helper(_WRITE, [path, f"{mode:o}"])
        try:
            try:
                await proc.write(data)
            except BrokenPipeError:
                pass  # it failed to open the file: its exit code says why
            await proc.close_stdin()
            await self._file_error(proc, path, proc.stderr)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await proc.kill()
            raise

    @override
    async def _read_stream(self, path: str) -> AsyncGenerator[bytes, None]:
        proc = await self._helper(_READ, [path])
        try:
            await proc.close_stdin()
            first = True
            async for chunk in proc.stdout:
                if first:
                    first = False
                    chunk = chunk[1:]  # the '+' that says the file opened
                if chunk:
                    yield chunk
            await self._file_error(proc, path, proc.stderr)
        finally:
            if proc.returncode is None:
                with anyio.CancelScope(shield=True):
                    await proc.kill()
                    await proc.drop_stream()

    @override
    async def _extend(self, expiry: float) -> None:
        stamp = f"{math.ceil(expiry)}"
        with daytona_errors("extending the lease", sandbox_id=self.id):
            await self._sdk.set_labels({**self._sdk.labels, EXPIRY: stamp})
            await self._sdk.set_ttl(ttl_minutes(expiry))
        self.spec = self.spec.model_copy(update={"labels": {**self.spec.labels, EXPIRY: stamp}})

    @override
    async def _aclose(self) -> None:
        for proc in list(self._procs):
            await proc.drop_stream()  # a logs WebSocket still open would outlive its client
        try:
            with daytona_errors("removing the sandbox", sandbox_id=self.id):
                await self._client.delete(self._sdk)
        except SandboxError:
            pass  # gone already, or out of reach: its TTL removes it
        finally:
            if self._release is not None:
                await self._release(self._client)
            else:
                await close_client(self._client)


def ttl_minutes(expiry: float) -> int:
    """Daytona's TTL (whole minutes from now) that outlasts ``expiry`` by under a minute."""
    return max(1, math.ceil((expiry - time.time()) / 60))
