"""The sandbay exception tree.

Every error sandbay raises derives from `SandboxError`. Where a builtin exception has the same
meaning, the subclass inherits it too, so ``except TimeoutError`` keeps working::

    SandboxError
    ├── ConfigError (ValueError)              bad config, unknown provider, bad argument
    ├── MissingDependencyError (ImportError)  a provider's optional SDK is not installed
    ├── ProviderUnavailableError (ConnectionError)
    │                                         the provider's daemon or API cannot be reached
    ├── SandboxNotFoundError (LookupError)    no sandbox with that id
    ├── SandboxClosedError (RuntimeError)     the sandbox was used after aclose()
    ├── SandboxTimeoutError (TimeoutError)    a command or a run passed its deadline
    ├── SandboxFileNotFoundError (FileNotFoundError)
    │                                         read_file on a path that does not exist
    ├── SandboxIsADirectoryError (IsADirectoryError)
    │                                         a file operation on a path that is a directory
    ├── SandboxNotADirectoryError (NotADirectoryError)
    │                                         a path whose parent part is not a directory
    ├── SandboxPermissionError (PermissionError)
    │                                         the sandbox's user may not read or write that path
    ├── SandboxFileExistsError (FileExistsError)
    │                                         make_dir(exist_ok=False) on a path that exists
    ├── SandboxFileTooLargeError              a file is larger than the caller's max_bytes
    ├── ImageError                            the agent image could not be built or found
    ├── AgentError                            the agent inside the sandbox failed
    └── ProtocolError                         the host and the relay disagree on the wire

Each error carries ``provider`` and ``sandbox_id`` (``None`` where they do not apply), and its
message says what the user can do about it.
"""

from __future__ import annotations

__all__ = [
    "AgentError",
    "ConfigError",
    "ImageError",
    "MissingDependencyError",
    "ProtocolError",
    "ProviderUnavailableError",
    "SandboxClosedError",
    "SandboxError",
    "SandboxFileExistsError",
    "SandboxFileNotFoundError",
    "SandboxFileTooLargeError",
    "SandboxIsADirectoryError",
    "SandboxNotADirectoryError",
    "SandboxNotFoundError",
    "SandboxPermissionError",
    "SandboxTimeoutError",
]


class SandboxError(Exception):
    """Root of every error sandbay raises.

    Attributes:
        provider: Name of the provider involved, if any.
        sandbox_id: Id of the sandbox involved, if any.
    """

    def __init__(
        self, message: str, *, provider: str | None = None, sandbox_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.sandbox_id = sandbox_id

    def __str__(self) -> str:
        where = [part for part in (self.provider, self.sandbox_id) if part]
        return f"[{' '.join(where)}] {self.message}" if where else self.message


class ConfigError(SandboxError, ValueError):
    """Invalid configuration or argument: unknown provider, bad field, empty prompt."""


class MissingDependencyError(SandboxError, ImportError):
    """A provider's optional SDK is not installed; the message names the extra to install."""


class ProviderUnavailableError(SandboxError, ConnectionError):
    """The provider's daemon or API cannot be reached; the message says how to start it."""


class SandboxNotFoundError(SandboxError, LookupError):
    """No sandbox with the given id exists (any more)."""


class SandboxClosedError(SandboxError, RuntimeError):
    """The sandbox was used after `Sandbox.aclose`."""


class SandboxTimeoutError(SandboxError, TimeoutError):
    """A command or an agent run passed its deadline and was killed."""


class SandboxFileNotFoundError(SandboxError, FileNotFoundError):
    """`Sandbox.read_file` was given a path that does not exist in the sandbox."""


class SandboxIsADirectoryError(SandboxError, IsADirectoryError):
    """`Sandbox.read_file` or `Sandbox.write_file` was given a path that is a directory."""


class SandboxNotADirectoryError(SandboxError, NotADirectoryError):
    """A file path runs through something that is not a directory (``/a/file/b``)."""


class SandboxPermissionError(SandboxError, PermissionError):
    """The sandbox's user has no right to read or write that path.

    File operations carry the rights of the sandbox's user, never more: a path that the
    user cannot read, or a link planted in the sandbox that leads where the user may not go,
    raises this.
    """


class SandboxFileExistsError(SandboxError, FileExistsError):
    """`Sandbox.make_dir` found something at the path: a directory (with ``exist_ok=False``)
    or another kind of file."""


class SandboxFileTooLargeError(SandboxError):
    """`Sandbox.read_file` found more bytes than its ``max_bytes``; nothing was returned."""


class ImageError(SandboxError):
    """The agent image could not be built or found."""


class AgentError(SandboxError):
    """The agent inside the sandbox failed.

    Attributes:
        exit_code: Exit code of the CLI (or the relay), if it exited.
        stderr_tail: The last lines it wrote to stderr.
    """

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        stderr_tail: str = "",
        provider: str | None = None,
        sandbox_id: str | None = None,
    ) -> None:
        if exit_code is not None:
            message = f"{message} (exit code {exit_code})"
        if stderr_tail:
            message = f"{message}\n--- last lines of stderr ---\n{stderr_tail}"
        super().__init__(message, provider=provider, sandbox_id=sandbox_id)
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail


class ProtocolError(SandboxError):
    """The host and the in-sandbox relay disagree about the wire format."""
