"""`WrappedSandbox`: a real sandbox seen through a wrapper that tests subclass to inject faults.

Every part of the interface goes to the wrapped sandbox; a test overrides the one it twists
(a stream cut short, an entrypoint replaced). Nothing is mocked: the processes and files are
the inner sandbox's own.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from typing_extensions import override

from sandbay import Process, Sandbox


class WrappedSandbox(Sandbox):
    """Delegates everything to ``inner``, an open sandbox it closes with itself."""

    provider = "wrapped"

    def __init__(self, inner: Sandbox) -> None:
        super().__init__(inner.spec)
        self.inner = inner

    @property
    @override
    def id(self) -> str:
        return self.inner.id

    @property
    @override
    def workdir(self) -> str:
        return self.inner.workdir

    @property
    @override
    def python(self) -> str:
        return self.inner.python

    @property
    @override
    def agent_dir(self) -> str:
        return self.inner.agent_dir

    @property
    @override
    def isolated(self) -> bool:
        return self.inner.isolated

    @property
    @override
    def reaches_host_loopback(self) -> bool:
        return self.inner.reaches_host_loopback

    @override
    async def _start(
        self, argv: list[str], *, env: dict[str, str], cwd: str, user: str | None
    ) -> Process:
        return await self.inner.start(argv, env=env, cwd=cwd, user=user)

    @override
    async def _write_file(self, path: str, data: bytes, *, mode: int) -> None:
        await self.inner.write_file(path, data, mode=mode)

    @override
    async def _read_stream(self, path: str) -> AsyncGenerator[bytes, None]:
        async for chunk in self.inner.read_file_stream(path):
            yield chunk

    @override
    async def _aclose(self) -> None:
        await self.inner.aclose()
