"""sandbay: run Claude Agent SDK agents inside sandboxes from any provider, behind one interface."""

from ._agent import AgentRun, replay_agent, run_agent
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
from ._pool import SandboxPool
from ._provider import Provider, ProviderStatus, SandboxInfo
from ._sandbox import ByteStream, ExecResult, Process, Sandbox, SandboxSpec

__version__ = "0.1.0"

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
