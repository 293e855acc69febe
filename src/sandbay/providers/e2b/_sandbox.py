"""`E2BSandbox`: one E2B sandbox, driven through an ``e2b.AsyncSandbox``."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
from e2b import AsyncSandbox
from typing_extensions import override

from ..._errors import (
    ConfigError,
    SandboxError,
)
from ..._sandbox import CLOSE_TIMEOUT, ByteStream, Process, Sandbox, SandboxSpec
from ..._shellfiles import FILE_ERRORS as _FILE_ERRORS
from ..._shellfiles import WRITE_SCRIPT as _WRITE_SCRIPT
from ._errors import NAME, e2b_errors
from ._process import E2BProcess, kill_script_argv

if TYPE_CHECKING:
    from ._provider import E2BProvider

ROOT = "root"


class E2BSandbox(Sandbox):
    """An E2B sandbox. Create it with `E2BProvider.create`, or reattach with `connect`.

    Processes run as the spec's user (default: the config's, ``user``), each started
    through envd's process service. Files move through processes run as that user too,
    never through envd's ``/files``: envd serves those as root, so a link planted in the
    sandbox would lead a read or a write where the user may not go.
    """

    provider: ClassVar[str] = NAME

    def __init__(self, spec: SandboxSpec, *, provider: E2BProvider, sdk: Any) -> None:
        super().__init__(spec)
        self._provider = provider
        self.sdk = sdk
        self._user = spec.user or provider.config.user
        self._processes: set[E2BProcess] = set()  # those whose event stream is open

    @property
    @override
    def id(self) -> str:
        return str(self.sdk.sandbox_id)

    @property
    @override
    def reaches_host_loopback(self) -> bool:
        return self._provider.config.reaches_host_loopback

    @property
    def user(self) -> str:
        """The user processes run as unless `start` names another."""
        return self._user

    @property
    def rpc(self) -> Any:
        """The SDK's envd process client for this sandbox."""
        return self.sdk.commands._rpc

    @property
    def request_timeout(self) -> float:
        return self._provider.config.request_timeout

    # --- processes ---

    @override
    async def _start(
        self, argv: list[str], *, env: dict[str, str], cwd: str, user: str | None
    ) -> Process:
        return await E2BProcess.start(self, argv, env=env, cwd=cwd, user=user or self._user)

    async def _run(
        self, argv: list[str], *, user: str, input: bytes = b"", env: dict[str, str] | None = None
    ) -> tuple[int, bytes, bytes]:
        """Run a command to completion from ``/``; return its exit code, stdout and stderr."""
        proc = await E2BProcess.start(self, argv, env=env or {}, cwd="/", user=user)
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
                pass
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

    async def _kill_tagged(self, token: str, *, user: str) -> None:
        await self._run(kill_script_argv(token), user=user)

    async def _prepare(self) -> None:
        """Make sure the workdir is there for the user: one check as the user (which also
        tells whether the template has the user), and only when it is missing, root makes it."""
        check = '[ -d "$1" ] && [ -w "$1" ] || exit 4'
        code, out, err = await self._run(["sh", "-c", check, "sh", self.workdir], user=self._user)
        if code == 4:
            make = 'mkdir -p -- "$1" && chown -- "$2" "$1"'
            code, out, err = await self._run(
                ["sh", "-c", make, "sh", self.workdir, self._user], user=ROOT
            )
        if code != 0:
            raise SandboxError(
                f"could not create the workdir {self.workdir!r} for user {self._user!r} "
                f"(exit code {code}): {(err or out).decode(errors='replace').strip()}",
                provider=NAME,
                sandbox_id=self.id,
            )

    # --- files ---

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
        proc = await E2BProcess.start(
            self, ["cat", "--", path], env=self._file_env(), cwd="/", user=self._user
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
            if not finished:
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                    await proc.kill()

    def _file_error(self, verb: str, path: str, code: int, stderr: bytes) -> SandboxError:
        text = stderr.decode(errors="replace").strip()
        ctx = {"provider": NAME, "sandbox_id": self.id}
        reason = text.splitlines()[-1].rsplit(": ", 1)[-1].lower() if text else ""
        known = _FILE_ERRORS.get(reason)
        if known is not None:
            kind, why = known
            return kind(f"cannot {verb} {path!r}: {why} ({text})", **ctx)
        return SandboxError(f"cannot {verb} {path!r}: {text or f'exit code {code}'}", **ctx)

    # --- lifecycle ---

    @override
    async def _extend(self, expiry: float) -> None:
        seconds = max(1, math.ceil(expiry - time.time()))
        # By id, with the provider's options: the sandbox object carries the create's
        # (no SDK retries, since sandbay retries creates itself).
        with e2b_errors(sandbox_id=self.id):
            await AsyncSandbox.set_timeout(self.id, seconds, **self._provider._opts())

    @override
    async def _aclose(self) -> None:
        try:
            await self._provider.destroy(self.id)
        finally:
            for process in list(self._processes):
                await process._close_stream()
