"""sandbay: run Claude Agent SDK agents inside sandboxes from any provider, behind one interface.

Public names are imported on first use: the agent layer (`run_agent`, `SandboxPool`, …) loads
claude-agent-sdk, which takes most of a second, and the config and sandbox models load
pydantic. So ``import sandbay`` and ``sandbay --help`` stay fast, and each command pays only
for what it uses. Type checkers and IDEs see ordinary imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import (
    AgentError,
    ConfigError,
    ImageError,
    MissingDependencyError,
    ProtocolError,
    ProviderUnavailableError,
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

if TYPE_CHECKING:
    from ._agent import (
        AgentRun,
        ResumedRun,
        RunHandle,
        RunTimings,
        replay_agent,
        resume_run,
        run_agent,
    )
    from ._api import Providers, connect_sandbox, create_sandbox, get_provider, open_sandbox
    from ._config import (
        BaseProviderConfig,
        DaytonaConfig,
        DockerConfig,
        E2BConfig,
        LocalConfig,
        ModalConfig,
        ProviderConfig,
        SandbayConfig,
        load_config,
    )
    from ._pool import SandboxPool
    from ._provider import Provider, ProviderStatus, SandboxInfo
    from ._sandbox import ByteStream, ExecResult, FileInfo, FileType, Process, Sandbox, SandboxSpec
    from ._session import AgentSession
    from ._transport import SandboxTransport

__version__ = "0.1.0"

# Public name -> the private module that defines it, imported on first access.
_LAZY = {
    "AgentSession": "._session",
    "AgentRun": "._agent",
    "ResumedRun": "._agent",
    "RunHandle": "._agent",
    "replay_agent": "._agent",
    "RunTimings": "._agent",
    "resume_run": "._agent",
    "run_agent": "._agent",
    "Providers": "._api",
    "connect_sandbox": "._api",
    "create_sandbox": "._api",
    "get_provider": "._api",
    "open_sandbox": "._api",
    "BaseProviderConfig": "._config",
    "DaytonaConfig": "._config",
    "DockerConfig": "._config",
    "E2BConfig": "._config",
    "ModalConfig": "._config",
    "LocalConfig": "._config",
    "ProviderConfig": "._config",
    "SandbayConfig": "._config",
    "load_config": "._config",
    "SandboxPool": "._pool",
    "Provider": "._provider",
    "ProviderStatus": "._provider",
    "SandboxInfo": "._provider",
    "ByteStream": "._sandbox",
    "ExecResult": "._sandbox",
    "Process": "._sandbox",
    "Sandbox": "._sandbox",
    "SandboxSpec": "._sandbox",
    "FileInfo": "._sandbox",
    "FileType": "._sandbox",
    "SandboxTransport": "._transport",
}

__all__ = [
    "AgentError",
    "AgentRun",
    "AgentSession",
    "BaseProviderConfig",
    "ByteStream",
    "ConfigError",
    "DaytonaConfig",
    "DockerConfig",
    "E2BConfig",
    "ExecResult",
    "FileInfo",
    "FileType",
    "ImageError",
    "LocalConfig",
    "MissingDependencyError",
    "ModalConfig",
    "Process",
    "ProtocolError",
    "Provider",
    "ProviderConfig",
    "ProviderStatus",
    "ProviderUnavailableError",
    "Providers",
    "ResumedRun",
    "RunHandle",
    "RunTimings",
    "SandbayConfig",
    "Sandbox",
    "SandboxClosedError",
    "SandboxError",
    "SandboxFileExistsError",
    "SandboxFileNotFoundError",
    "SandboxFileTooLargeError",
    "SandboxInfo",
    "SandboxIsADirectoryError",
    "SandboxNotADirectoryError",
    "SandboxNotFoundError",
    "SandboxPermissionError",
    "SandboxPool",
    "SandboxSpec",
    "SandboxTimeoutError",
    "SandboxTransport",
    "connect_sandbox",
    "create_sandbox",
    "get_provider",
    "load_config",
    "open_sandbox",
    "replay_agent",
    "resume_run",
    "run_agent",
]


if not TYPE_CHECKING:  # type checkers see the imports above; a module __getattr__ hides typos

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
