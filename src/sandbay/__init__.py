"""sandbay: run Claude Agent SDK agents inside sandboxes from any provider, behind one interface.

The agent layer (`run_agent`, `replay_agent`, `AgentRun`, `SandboxPool`) imports
claude-agent-sdk, which takes most of a second to load; it is imported on first use, so
``import sandbay`` and the ``sandbay`` command stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._api import create_sandbox, get_provider, open_sandbox
from ._config import DockerConfig, LocalConfig, ProviderConfig, SandbayConfig, load_config
from ._errors import (
    AgentError,
    ConfigError,
    ImageError,
    MissingDependencyError,
    ProtocolError,
    ProviderUnavailableError,
    SandboxClosedError,
    SandboxError,
    SandboxFileNotFoundError,
    SandboxFileTooLargeError,
    SandboxIsADirectoryError,
    SandboxNotADirectoryError,
    SandboxNotFoundError,
    SandboxPermissionError,
    SandboxTimeoutError,
)
from ._provider import Provider, ProviderStatus, SandboxInfo
from ._sandbox import ByteStream, ExecResult, Process, Sandbox, SandboxSpec

if TYPE_CHECKING:
    from ._agent import AgentRun, replay_agent, run_agent
    from ._pool import SandboxPool

__version__ = "0.1.0"

# Public name -> the private module that defines it, imported on first access.
_LAZY = {
    "AgentRun": "._agent",
    "replay_agent": "._agent",
    "run_agent": "._agent",
    "SandboxPool": "._pool",
}

__all__ = [
    "AgentError",
    "AgentRun",
    "ByteStream",
    "ConfigError",
    "DockerConfig",
    "ExecResult",
    "ImageError",
    "LocalConfig",
    "MissingDependencyError",
    "Process",
    "ProtocolError",
    "Provider",
    "ProviderConfig",
    "ProviderStatus",
    "ProviderUnavailableError",
    "SandbayConfig",
    "Sandbox",
    "SandboxClosedError",
    "SandboxError",
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
    "create_sandbox",
    "get_provider",
    "load_config",
    "open_sandbox",
    "replay_agent",
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
