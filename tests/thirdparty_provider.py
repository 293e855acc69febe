"""A provider from outside sandbay, registered only through a ``sandbay.providers`` entry point.

`tests/test_registry.py` writes a dist-info whose entry point names `ThirdPartyConfig`, so
sandbay finds it through ``importlib.metadata`` as it would an installed distribution. Its
sandboxes are the unisolated local provider's; what is under test is how it is found, made,
validated and closed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import SecretStr
from typing_extensions import override

from sandbay import (
    BaseProviderConfig,
    LocalConfig,
    Provider,
    ProviderStatus,
    Sandbox,
    SandboxInfo,
    SandboxSpec,
)
from sandbay.providers.local import LocalProvider


class ThirdPartyConfig(BaseProviderConfig):
    """Config of the third-party provider: a secret, as cloud providers have."""

    type: Literal["thirdparty"] = "thirdparty"
    """Selects this provider."""
    provider_class: ClassVar[str] = "thirdparty_provider:ThirdPartyProvider"
    token: SecretStr = SecretStr("")
    """An API token (only compared, never used)."""
    root: Path | None = None
    """Where the sandboxes' folders go."""


class ThirdPartyProvider(Provider):
    """Delegates to an unisolated local provider; records whether it was closed."""

    name: ClassVar[str] = "thirdparty"
    config: ThirdPartyConfig

    def __init__(self, config: ThirdPartyConfig) -> None:
        self.config = config
        self.closed = False
        self._local = LocalProvider(LocalConfig(isolate=False, root=config.root))

    @override
    async def create(self, spec: SandboxSpec) -> Sandbox:
        return await self._local.create(spec)

    @override
    async def connect(self, sandbox_id: str) -> Sandbox:
        return await self._local.connect(sandbox_id)

    @override
    async def list(self, *, labels: Mapping[str, str] | None = None) -> list[SandboxInfo]:
        return await self._local.list(labels=labels)

    @override
    async def destroy(self, sandbox_id: str) -> None:
        await self._local.destroy(sandbox_id)

    @override
    async def status(self) -> ProviderStatus:
        return ProviderStatus(self.name, installed=True, reachable=True, detail="a test provider")

    @override
    async def aclose(self) -> None:
        self.closed = True
        await self._local.aclose()
