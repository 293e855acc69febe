"""The `Sandbox` interface every provider implements, and the values it exchanges.

The contract lives in these docstrings. A provider subclasses `Sandbox` and implements the
underscore methods (`_start`, `_write_file`, `_read_stream`, `_aclose`) plus `id`; everything
else (argument checks, the closed state, `exec`, relative paths, the context manager) is
concrete here and written once. `sandbay.testing.conformance` checks that a provider keeps it.

Output is read on demand: a `Process`'s `stdout` and `stderr` pull bytes from the provider
when iterated, with no background task. So a sandbox may be created in one task and used in
another (a pool does this), and nothing runs after the caller stops reading.
"""

from __future__ import annotations

import abc
import codecs
import functools
import math
import os
import posixpath
import shlex
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from typing_extensions import Self

from . import _fileops
from ._errors import (
    ConfigError,
    ProtocolError,
    SandboxClosedError,
    SandboxError,
    SandboxFileTooLargeError,
    SandboxTimeoutError,
)

__all__ = [
    "ByteStream",
    "CliLaunch",
    "ExecResult",
    "FileInfo",
    "FileType",
    "Process",
    "RelaySeparation",
    "Sandbox",
    "SandboxSpec",
    "TenantDirs",
]

_R = TypeVar("_R")

#: Seconds `Sandbox.aclose` and `Process.kill` give each provider call before giving up.
CLOSE_TIMEOUT = 30.0

#: The label holding a sandbox's expiry (Unix time) as it was when the sandbox was created.
EXPIRY_LABEL = "sandbay.expiry"


class _CheckedModel(BaseModel):
    """A model whose invalid values raise `ConfigError` naming each field, not pydantic's error.

    Covers the constructor and the ``model_validate*`` class methods. A config model that
    holds one as a field still gets pydantic's `ValidationError` (its loader names the file).
    """

    if not TYPE_CHECKING:  # type checkers keep pydantic's synthesised, typed signatures

        def __init__(self, /, **data: Any) -> None:
            try:
                super().__init__(**data)
            except ValidationError as exc:
                raise _config_error(type(self), exc) from None

        # Marks this __init__ as pydantic's own, so nested validation keeps its fast path
        # (as pydantic's RootModel does) instead of calling it and wrapping its ConfigError.
        __init__.__pydantic_base_init__ = True

        @classmethod
        def model_validate(cls, *args: Any, **kwargs: Any) -> Self:
            try:
                return super().model_validate(*args, **kwargs)
            except ValidationError as exc:
                raise _config_error(cls, exc) from None

        @classmethod
        def model_validate_json(cls, *args: Any, **kwargs: Any) -> Self:
            try:
                return super().model_validate_json(*args, **kwargs)
            except ValidationError as exc:
                raise _config_error(cls, exc) from None

        @classmethod
        def model_validate_strings(cls, *args: Any, **kwargs: Any) -> Self:
            try:
                return super().model_validate_strings(*args, **kwargs)
            except ValidationError as exc:
                raise _config_error(cls, exc) from None


def _config_error(cls: type[BaseModel], exc: ValidationError) -> ConfigError:
    problems = []
    for err in exc.errors():
        field = ".".join(str(part) for part in err["loc"]) or "value"
        problems.append(f"{field}: {err['msg']} (got {err.get('input')!r})")
    return ConfigError(f"invalid {cls.__name__}: {'; '.join(problems)}")


class SandboxSpec(_CheckedModel):
    """What to provision. Every field is optional; providers fill in their defaults.

    A provider that cannot honour a field raises `ConfigError` naming it, rather than
    silently ignoring it (for example E2B sets cpu and memory per template, not per sandbox).
    An invalid value (``SandboxSpec(cpu=-1)``, an unknown field) raises `ConfigError` naming
    the field.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    image: str | None = None
    """Image or template to start from. ``None``: the provider's agent image."""
    cpu: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """CPU cores the sandbox may use."""
    memory_mb: int | None = Field(default=None, gt=0)
    """Memory limit in MiB."""
    lifetime_s: float = Field(default=3600.0, gt=0, allow_inf_nan=False)
    """The sandbox's first lease: it expires this long after creation unless `Sandbox.extend`
    renews it; after that, `sandbay gc` (or the provider) removes it."""
    env: dict[str, str] = Field(default_factory=dict)
    """Environment variables for every process in the sandbox."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels for finding the sandbox again (``sandbay ls``, ``Sandbox.list``)."""
    workdir: str = "/workspace"
    """Working directory of processes; relative file paths resolve against it."""
    network: Literal["default", "none", "host"] = "default"
    """``none`` cuts the sandbox off; ``host`` shares the host's network (local tests)."""
    user: str | None = None
    """User processes run as. ``None``: the provider's default (non-root where it can)."""
    egress: Literal["none", "model"] | Sequence[str] | None = None
    """What the sandbox may reach, enforced on the host (`sandbay._egress`). ``None``: as
    `network` says. Otherwise the sandbox has no network of its own (`network` becomes
    ``none``; ``host`` is refused) and: ``"none"`` reaches nothing, not even the model (an
    agent run is refused); ``"model"`` reaches only the model, through sandbay's relay; a
    list of ``host``, ``host:port``, ``*.domain``, IP address entries (a port defaults to
    80 and 443) is reached through an HTTP proxy the relay gives the CLI and its tools
    (``HTTPS_PROXY``, ``HTTP_PROXY``) during an agent run, each connection checked on the
    host by name and by the addresses it resolves to."""

    @field_validator("egress", mode="before")
    @classmethod
    def _check_egress(cls, value: object) -> object:
        from ._egress import parse_policy

        return parse_policy(value)

    @model_validator(mode="before")
    @classmethod
    def _egress_cuts_network(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("egress") is not None:
            network = data.get("network", "default")
            if network == "host":
                raise ValueError(
                    "egress cannot be enforced with network='host' (the sandbox would have "
                    "the host's network): drop network, or set it to 'none'"
                )
            if network == "default":
                data = {**data, "network": "none"}
        return data


@dataclass(frozen=True)
class ExecResult:
    """The outcome of `Sandbox.exec`.

    Attributes:
        exit_code: Exit status; negative -N when killed by signal N (where the provider knows).
        stdout: Everything the command wrote to stdout.
        stderr: Everything the command wrote to stderr.
    """

    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def ok(self) -> bool:
        """Whether the command exited with status 0."""
        return self.exit_code == 0

    @property
    def text(self) -> str:
        """stdout decoded as UTF-8, undecodable bytes replaced."""
        return self.stdout.decode("utf-8", "replace")


FileType = Literal["file", "dir", "symlink", "other"]
"""What a `FileInfo` describes: ``other`` is a FIFO, socket or device."""


@dataclass(frozen=True)
class FileInfo:
    """One entry of a sandbox's file system, as `Sandbox.stat` and `Sandbox.list_dir` see it.

    Names are text; bytes that are not UTF-8 come as surrogate escapes, as Python's ``os``
    functions give them (pass such a path back to the sandbox unchanged).

    Attributes:
        name: The last component of `path` (``"/"`` for the root).
        path: The absolute path in the sandbox, as asked for (links in it not resolved).
        type: ``"file"``, ``"dir"``, ``"symlink"`` or ``"other"`` (FIFO, socket, device).
        size: Size in bytes (of a link: the length of its target).
        mode: Permission bits, set-id and sticky bits included (``0o755``).
        mtime: Time of last modification, in seconds since the epoch.
        link_target: Where a symlink points, as written in the link; ``None`` for others.
    """

    name: str
    path: str
    type: FileType
    size: int
    mode: int
    mtime: float
    link_target: str | None = None

    @property
    def is_file(self) -> bool:
        """Whether it is a regular file."""
        return self.type == "file"

    @property
    def is_dir(self) -> bool:
        """Whether it is a directory."""
        return self.type == "dir"

    @property
    def is_symlink(self) -> bool:
        """Whether it is a symbolic link."""
        return self.type == "symlink"


RelaySeparation = Literal["user", "namespace", "none"]
"""How a sandbox keeps sandbay's relay apart from the ``claude`` CLI and its tools.

``user``: the relay runs as another user (root) than the CLI, which it starts as the
sandbox's user; the relay's process and its private directory are out of the tools' reach.
``namespace``: the CLI runs in a PID and mount namespace of its own (a fresh ``/proc``)
that holds neither the relay's process nor its directory. ``none``: the relay and the CLI
run as one user with one view of the system, so the CLI's tools can write to the relay's
stream, read its log and signal it (the unisolated local provider says so plainly).
"""


@dataclass(frozen=True)
class TenantDirs:
    """Where one tenant's files live in a sandbox, as the tenant's CLI sees them.

    Attributes:
        work: The tenant's working directory (the CLI's cwd by default).
        home: The tenant's ``HOME``; its ``CLAUDE_CONFIG_DIR`` is ``home/.claude``.
        tmp: The tenant's ``TMPDIR``.
    """

    work: str
    home: str
    tmp: str

    @property
    def config_dir(self) -> str:
        """The tenant's ``CLAUDE_CONFIG_DIR``: transcripts, settings, memory."""
        return f"{self.home}/.claude"


@dataclass(frozen=True)
class CliLaunch:
    """How the relay starts the ``claude`` CLI in a sandbox (`Sandbox.cli_launch`).

    Attributes:
        user: The relay switches to this user (``uid[:gid]`` or a name), supplementary
            groups cleared, before it runs the CLI; it must run as root for that.
        tenant_root: With a tenant whose CLI gets a uid of its own: the root-owned directory
            the relay (as root) keeps each tenant's directories in, owned by that uid, mode
            0700. ``None``: the tenant's directories exist already (`Sandbox.cli_launch`
            made them) and the CLI runs as `user`.
        wrapper: The CLI's argv is appended to this (a namespace it runs in); it ends with
            whatever separates the wrapper's options from the command.
        socket_dir: Where the CLI's network namespace is not the relay's: a directory, as
            the relay sees it, that the wrapper binds into the CLI's namespace (at
            ``socket_dir_inner``). The relay offers its services there as Unix sockets (the
            model relay), and a forwarder in the CLI's namespace gives the CLI a loopback
            address for them. ``None``: the relay listens on the loopback the CLI shares.
        socket_dir_inner: `socket_dir` as the CLI sees it (default: the same path).
    """

    user: str | None = None
    tenant_root: str | None = None
    wrapper: tuple[str, ...] = ()
    socket_dir: str | None = None
    socket_dir_inner: str | None = None


class ByteStream:
    """One output stream of a `Process`: an async iterator of non-empty byte chunks.

    Chunks arrive at whatever boundaries the provider delivers them; use `lines` or
    `text_chunks` to reframe. Iteration ends at end of stream.
    """

    def __init__(self, receive: Callable[[], Awaitable[bytes | None]]) -> None:
        # receive() returns the next chunk, or None at end of stream.
        self._receive = receive
        self._eof = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> bytes:
        while not self._eof:
            chunk = await self._receive()
            if chunk is None:
                self._eof = True
            elif chunk:
                return chunk
        raise StopAsyncIteration

    async def read(self) -> bytes:
        """Read to end of stream and return everything."""
        return b"".join([chunk async for chunk in self])

    async def lines(self, *, max_line: int | None = None) -> AsyncIterator[bytes]:
        """Yield complete lines (without the newline); a final unterminated line too.

        Args:
            max_line: Longest line accepted, in bytes. The process decides how long its
                lines are: with a limit, at most about ``max_line`` bytes plus one chunk are
                held, however long a line grows.

        Raises:
            ProtocolError: A line is longer than ``max_line``.
        """
        if max_line is not None and max_line < 1:
            raise ConfigError(f"max_line must be at least 1 byte, got {max_line!r}")
        buffer = bytearray()
        async for chunk in self:
            start = len(buffer)
            buffer += chunk
            # Only the new chunk can hold a newline the buffer did not already have.
            end = buffer.find(b"\n", start)
            begin = 0
            while end != -1:
                if max_line is not None and end - begin > max_line:
                    raise _line_too_long(max_line)
                yield bytes(buffer[begin:end])
                begin = end + 1
                end = buffer.find(b"\n", begin)
            del buffer[:begin]
            if max_line is not None and len(buffer) > max_line:
                raise _line_too_long(max_line)
        if buffer:
            yield bytes(buffer)

    async def text_chunks(self, encoding: str = "utf-8") -> AsyncIterator[str]:
        """Yield decoded text; multi-byte characters split across chunks decode correctly."""
        decoder = codecs.getincrementaldecoder(encoding)("replace")
        async for chunk in self:
            text = decoder.decode(chunk)
            if text:
                yield text
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail


class Process(abc.ABC):
    """A process running in a sandbox, started by `Sandbox.start`.

    Read `stdout` and `stderr` as they are produced; write to stdin with `write` and end it
    with `close_stdin`. Output a caller does not read is buffered by the provider or by the
    pipe: read both streams (as `Sandbox.exec` does) when a command may write a lot to both.

    Attributes:
        stdout: The process's standard output.
        stderr: The process's standard error.
    """

    stdout: ByteStream
    stderr: ByteStream

    @abc.abstractmethod
    async def write(self, data: bytes) -> None:
        """Write bytes to the process's stdin, in order.

        Raises:
            BrokenPipeError: stdin was closed, or the process exited.
        """

    @abc.abstractmethod
    async def close_stdin(self) -> None:
        """Send end-of-file on stdin. Idempotent."""

    @abc.abstractmethod
    async def wait(self) -> int:
        """Wait for the process to exit and return its exit code.

        A process killed by signal N returns -N where the provider can tell, else 128+N.
        """

    @abc.abstractmethod
    async def kill(self) -> None:
        """Kill the process (and what it started, where the provider can). Idempotent.

        Returns promptly; `wait` then returns the exit code.
        """

    @property
    @abc.abstractmethod
    def returncode(self) -> int | None:
        """The exit code once known, else ``None``."""


class Sandbox(abc.ABC):
    """One sandbox: an isolated place to run processes and keep files.

    Use it as an async context manager (``async with sandbay.open_sandbox(...) as sb``) or
    call `aclose` yourself; either way it is removed from the provider when closed. After
    `aclose`, every method raises `SandboxClosedError`.

    Providers implement `id`, `_start`, `_write_file`, `_read_stream` and `_aclose`, and
    `_extend` where leases can be renewed. Those receive absolute paths and a normalised
    argv; they must raise:

    - `SandboxFileNotFoundError` from `_read_stream` for a missing path;
    - `SandboxIsADirectoryError` from `_read_stream` and `_write_file` for a path that is a
      directory, `SandboxNotADirectoryError` for a path running through a non-directory,
      and `SandboxPermissionError` where the sandbox's user has no right to the path;
    - `ProviderUnavailableError` when the provider cannot be reached;
    - `SandboxNotFoundError` when the sandbox vanished underneath;

    and never let their SDK's own exceptions escape. A command that does not exist is not an
    exception: its process exits with status 127 (as a shell reports it).

    File operations carry the rights of the sandbox's user and see what its processes see:
    a link planted inside the sandbox leads where it would lead a process there, never to a
    host file and never with more rights (``read_file(p)`` returns what ``cat p`` run as the
    sandbox's user would print, or raises the matching error).

    The rest of the file API (`list_dir`, `stat`, `exists`, `remove`, `make_dir`, `upload`,
    `download`) is concrete: a small helper program run with `python` as the sandbox's
    user, which keeps that promise on every provider. A provider may override any of them
    with a faster native path that keeps the same contract.

    Attributes:
        provider: The provider's name (``"docker"``, ``"local"``, …).
        spec: The spec the sandbox was created from, labels included.
    """

    provider: ClassVar[str]

    def __init__(self, spec: SandboxSpec) -> None:
        self.spec = spec
        self._closed = False
        try:
            self._expiry: float | None = float(spec.labels[EXPIRY_LABEL])
        except (KeyError, ValueError):
            self._expiry = None

    # --- to implement ------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def id(self) -> str:
        """The provider's id for this sandbox."""

    @abc.abstractmethod
    async def _start(
        self, argv: list[str], *, env: dict[str, str], cwd: str, user: str | None
    ) -> Process:
        """Start argv (non-empty, argv[0] looked up on PATH) and return at once."""

    @abc.abstractmethod
    async def _write_file(self, path: str, data: bytes, *, mode: int) -> None:
        """Write data to absolute path, creating parent directories, replacing any file."""

    @abc.abstractmethod
    def _read_stream(self, path: str) -> AsyncGenerator[bytes, None]:
        """Yield the contents of absolute path in chunks, as they are read.

        An async generator: the file errors (`SandboxFileNotFoundError`,
        `SandboxIsADirectoryError`, …) are raised on the first iteration, before any chunk.
        It must hold no more than about one chunk in memory, so a caller may stop reading a
        huge file at any point; closing the generator releases what it holds.
        """

    @abc.abstractmethod
    async def _aclose(self) -> None:
        """Remove the sandbox from the provider. Called once, shielded, with a deadline."""

    async def _extend(self, expiry: float) -> None:
        """Make the sandbox's lease end at ``expiry`` (Unix time, whole seconds), sooner or later.

        Where `Provider.list` reads the expiry from must show it afterwards, and `gc` (and
        the provider itself, where sandboxes stop on their own) must judge by it. The
        sandbox's own processes must not be able to do the same. The default refuses.

        Raises:
            ConfigError: The provider cannot renew a lease.
        """
        raise ConfigError(
            f"the {self.provider} provider cannot extend a sandbox's lease; create the "
            "sandbox with a longer spec.lifetime_s",
            provider=self.provider,
            sandbox_id=self.id,
        )

    # --- concrete ----------------------------------------------------------------------

    @property
    def labels(self) -> Mapping[str, str]:
        """The sandbox's labels, sandbay's own (``sandbay.*``) included."""
        return self.spec.labels

    @property
    def workdir(self) -> str:
        """Absolute working directory processes start in."""
        return self.spec.workdir

    @property
    def python(self) -> str:
        """Command that runs the Python with claude-agent-sdk, for the agent entrypoint."""
        return "python3"

    @property
    def agent_dir(self) -> str:
        """Directory sandbay keeps its entrypoint and run logs in, outside the workspace."""
        return "/tmp/sandbay"

    @property
    def relay_separation(self) -> RelaySeparation:
        """How sandbay's relay is kept apart from the CLI and its tools (`RelaySeparation`).

        The contract a provider signs by returning ``user`` or ``namespace``: nothing the
        CLI's tools run can write to the relay's stream to the host, read or change the
        relay's log and run directory (`relay_dir`), or signal the relay; `start_relay`
        starts processes on the relay's side of that line and `cli_launch` says how the
        relay starts the CLI on the other. The default, ``none``, promises nothing.
        """
        return "none"

    @property
    def relay_dir(self) -> str:
        """Directory the relay keeps its code and run directories in.

        Where `relay_separation` is not ``none``, the CLI and its tools can neither read
        nor change it (nor plant anything in it beforehand). Default: `agent_dir`.
        """
        return self.agent_dir

    async def start_relay(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None
    ) -> Process:
        """Start a process on the relay's side of `relay_separation` (the relay, its replay).

        The default starts it as any other process (`start`); a provider that separates the
        relay starts it as the relay's user, or outside the CLI's namespace.

        Raises:
            SandboxClosedError: The sandbox was closed.
        """
        return await self.start(argv, env=env, cwd="/")

    def tenant_dirs(self, tenant: str) -> TenantDirs:
        """Where ``tenant``'s working directory, home and temporary files are in this sandbox.

        Default: under `agent_dir`/tenants/<tenant>.
        """
        root = f"{self.agent_dir}/tenants/{tenant}"
        return TenantDirs(work=f"{root}/work", home=f"{root}/home", tmp=f"{root}/tmp")

    async def cli_launch(self, *, cwd: str, tenant: str | None = None) -> CliLaunch:
        """How the relay is to start the CLI working in ``cwd``, for ``tenant`` if given.

        A provider that separates the relay (`relay_separation`) returns the user or the
        namespace wrapper that keeps the CLI on its side of the line; with a tenant, one that
        keeps the tenant's tools out of other tenants' files (its own uid, or a namespace
        that holds only its `tenant_dirs`). The default makes the tenant's directories
        (mode 0700) as the sandbox's user and returns a plain launch.

        Raises:
            SandboxError: The tenant's directories could not be made.
        """
        if tenant is not None:
            dirs = self.tenant_dirs(tenant)
            made = await self.exec(
                [
                    "sh",
                    "-c",
                    'umask 077 && mkdir -p -- "$@" && chmod 700 -- "$@"',
                    "sh",
                    dirs.work,
                    dirs.home,
                    dirs.tmp,
                    posixpath.dirname(dirs.work),
                ]
            )
            if not made.ok:
                raise SandboxError(
                    f"could not make the directories of tenant {tenant!r}: "
                    f"{made.stderr.decode(errors='replace').strip()}",
                    provider=self.provider,
                    sandbox_id=self.id,
                )
        return CliLaunch()

    async def egress_cli_launch(
        self, *, cwd: str, tenant: str | None = None, socket: str
    ) -> CliLaunch:
        """As `cli_launch`, with the relay's egress proxy (a Unix socket at ``socket``, on
        the relay's side) reachable in the CLI's network namespace at
        ``127.0.0.1:`` `wire.EGRESS_FORWARDER_PORT`. Only asked of a provider whose
        `relay_separation` is ``namespace`` (elsewhere the relay shares the CLI's network).

        Raises:
            ConfigError: The provider cannot carry the proxy into the CLI's namespace.
        """
        raise ConfigError(
            f"the {self.provider} provider cannot give the CLI an egress proxy across its "
            "namespace: use egress='model' or 'none' here"
        )

    @property
    def isolated(self) -> bool:
        """Whether a real boundary keeps the sandbox's processes off the host.

        ``False`` only where processes run on the host as its user (the local provider
        without isolation). The agent layer relies on it: ``IS_SANDBOX=1`` and
        ``bypassPermissions`` are for isolated sandboxes.
        """
        return True

    @property
    def allows_bypass_permissions(self) -> bool:
        """Whether an agent here may run with ``permission_mode="bypassPermissions"``.

        By default only where the sandbox is `isolated`: elsewhere the agent would act on
        the host as its user without asking. A provider may let its config opt in.
        """
        return self.isolated

    @property
    def reaches_host_loopback(self) -> bool:
        """Whether ``127.0.0.1`` inside the sandbox is the host's loopback.

        True for processes on the host and for a shared host network; a container's own
        loopback is not the host's, so a model server the host runs on 127.0.0.1 is out of
        its reach.
        """
        return False

    @property
    def closed(self) -> bool:
        """Whether `aclose` has been called."""
        return self._closed

    @property
    def expiry(self) -> float | None:
        """Unix time the sandbox's lease ends, as this object last set it.

        The ``sandbay.expiry`` label at creation, then what `extend` returned. Another
        process may have renewed it since: `Provider.list` shows the provider's current
        value. ``None`` for a sandbox created without sandbay's labels.
        """
        return self._expiry

    def resolve(self, path: str) -> str:
        """Turn a path relative to `workdir` into an absolute one."""
        if not path:
            raise ConfigError("empty path: give a file path inside the sandbox")
        if path.startswith("/"):
            return path
        return self.workdir.rstrip("/") + "/" + path

    def _check_open(self) -> None:
        if self._closed:
            raise SandboxClosedError(
                "the sandbox is closed; open a new one with sandbay.open_sandbox()",
                provider=self.provider,
                sandbox_id=self.id,
            )

    async def start(
        self,
        argv: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> Process:
        """Start a process and return it while it runs.

        Args:
            argv: The command; a string runs through ``sh -c``.
            env: Variables added to the sandbox's environment for this process.
            cwd: Working directory (relative to `workdir`); default `workdir`.
            user: Run as this user instead of the sandbox's default.

        Returns:
            The running `Process`. Its stdin stays open until `Process.close_stdin`.

        Raises:
            SandboxClosedError: The sandbox was closed.
            ConfigError: argv is empty.
        """
        self._check_open()
        return await self._start(
            _argv(argv),
            env={**self.spec.env, **(env or {})},
            cwd=self.resolve(cwd) if cwd else self.workdir,
            user=user if user is not None else self.spec.user,
        )

    async def exec(
        self,
        argv: str | Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        input: bytes | str | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run a command to completion and return its exit code and output.

        stdout and stderr are read concurrently, so a command writing a lot to both never
        blocks. stdin gets ``input`` (if any) and then end-of-file.

        Args:
            argv: The command; a string runs through ``sh -c``.
            env: Variables added for this command.
            cwd: Working directory (relative to `workdir`); default `workdir`.
            user: Run as this user instead of the sandbox's default.
            input: Fed to stdin: bytes, or text (sent as UTF-8).
            timeout: Seconds before the command is killed: a positive, finite number.

        Returns:
            The `ExecResult`; a non-zero exit code is not an exception.

        Raises:
            ConfigError: ``timeout`` is not a positive finite number, or ``input`` is
                neither bytes nor text; nothing was started.
            SandboxTimeoutError: The command ran past ``timeout``; it was killed.
            SandboxClosedError: The sandbox was closed.
        """
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise ConfigError(
                f"exec timeout must be a positive, finite number of seconds, got {timeout!r}; "
                "pass None for no timeout"
            )
        data: bytes | None
        if isinstance(input, str):
            data = input.encode("utf-8")
        elif isinstance(input, (bytes, bytearray, memoryview)):
            data = bytes(input)
        elif input is None:
            data = None
        else:
            raise ConfigError(
                f"exec input must be bytes or str, got {type(input).__name__}; encode it first"
            )
        proc = await self.start(argv, env=env, cwd=cwd, user=user)
        out: list[bytes] = []
        err: list[bytes] = []

        async def collect(stream: ByteStream, into: list[bytes]) -> None:
            async for chunk in stream:
                into.append(chunk)

        async def feed() -> None:
            try:
                if data:
                    await proc.write(data)
            except BrokenPipeError:
                pass  # the command exited without reading all of it; as in a shell
            finally:
                await proc.close_stdin()

        try:
            with anyio.fail_after(timeout) if timeout is not None else nullcontext():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(collect, proc.stdout, out)
                    tg.start_soon(collect, proc.stderr, err)
                    tg.start_soon(feed)
                code = await proc.wait()
        except TimeoutError:
            await _kill_shielded(proc)
            raise SandboxTimeoutError(
                f"command {_show(argv)} ran past its {timeout:g} s timeout and was killed",
                provider=self.provider,
                sandbox_id=self.id,
            ) from None
        except BaseException:
            await _kill_shielded(proc)
            raise
        return ExecResult(code, b"".join(out), b"".join(err))

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o644) -> None:
        """Write a file, creating parent directories and replacing what was there.

        Args:
            path: Absolute, or relative to `workdir`.
            data: The contents.
            mode: Permission bits of the new file.

        Raises:
            SandboxIsADirectoryError: The path is a directory.
            SandboxNotADirectoryError: A parent in the path is not a directory.
            SandboxPermissionError: The sandbox's user may not write there.
            SandboxClosedError: The sandbox was closed.
        """
        self._check_open()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ConfigError(f"write_file needs bytes, got {type(data).__name__}; encode text")
        await self._write_file(self.resolve(path), bytes(data), mode=mode)

    async def read_file(self, path: str, *, max_bytes: int | None = None) -> bytes:
        """Read a whole file.

        Args:
            path: Absolute, or relative to `workdir`.
            max_bytes: Refuse a file larger than this, having read at most this much of it
                (the sandbox decides how large its files are; bound what your host holds).

        Returns:
            Its contents.

        Raises:
            SandboxFileNotFoundError: No file at that path.
            SandboxIsADirectoryError: The path is a directory.
            SandboxNotADirectoryError: A parent in the path is not a directory.
            SandboxPermissionError: The sandbox's user may not read it.
            SandboxFileTooLargeError: It holds more than ``max_bytes``.
            SandboxClosedError: The sandbox was closed.
        """
        if max_bytes is not None and max_bytes < 0:
            raise ConfigError(f"max_bytes must be 0 or more, got {max_bytes!r}")
        parts: list[bytes] = []
        size = 0
        async with aclosing(self.read_file_stream(path)) as chunks:
            async for chunk in chunks:
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise SandboxFileTooLargeError(
                        f"{path!r} holds more than max_bytes={max_bytes} bytes; read it with "
                        "read_file_stream() or raise the limit",
                        provider=self.provider,
                        sandbox_id=self.id,
                    )
                parts.append(chunk)
        return b"".join(parts)

    async def read_file_stream(self, path: str) -> AsyncGenerator[bytes, None]:
        """Read a file chunk by chunk, holding about one chunk in memory at a time.

        Use it under ``contextlib.aclosing`` when you may stop early::

            async with aclosing(sb.read_file_stream("big.log")) as chunks:
                async for chunk in chunks: ...

        Args:
            path: Absolute, or relative to `workdir`.

        Raises:
            The errors of `read_file` (but never `SandboxFileTooLargeError`), on the first
            iteration.
        """
        self._check_open()
        async with aclosing(self._read_stream(self.resolve(path))) as chunks:
            async for chunk in chunks:
                if chunk:
                    yield chunk

    async def list_dir(self, path: str) -> list[FileInfo]:
        """List a directory's entries, sorted by name (without ``.`` and ``..``).

        Each entry is described as it is, not what it leads to: a link is a ``symlink``
        with its `FileInfo.link_target`. A link given as ``path`` itself is followed, as
        ``ls`` follows it.

        Args:
            path: Absolute, or relative to `workdir`.

        Returns:
            One `FileInfo` per entry.

        Raises:
            SandboxFileNotFoundError: Nothing at that path.
            SandboxNotADirectoryError: It (or a parent in it) is not a directory.
            SandboxPermissionError: The sandbox's user may not list it.
            SandboxClosedError: The sandbox was closed.
        """
        where = self.resolve(path)

        async def receive(records: _fileops.Records) -> list[FileInfo]:
            found = []
            while not (record := await records.next()).get("end"):
                entry = _fileops.entry(record, key="name")
                name = _fileops.check_name(entry["name"])
                found.append(_file_info(name, posixpath.join(where, name), entry))
            return found

        found = await self._file_helper(
            "list", [where], what=f"cannot list {path!r}", receive=receive
        )
        return sorted(found, key=lambda info: info.name)

    async def stat(self, path: str, *, follow_symlinks: bool = True) -> FileInfo:
        """Describe one path, as ``os.stat`` (or ``os.lstat``) would there.

        Args:
            path: Absolute, or relative to `workdir`.
            follow_symlinks: Describe what a final link leads to (as ``os.stat``); with
                ``False``, the link itself (as ``os.lstat``). Links earlier in the path are
                always followed, as the sandbox's processes follow them.

        Returns:
            Its `FileInfo`; `FileInfo.path` is the path as given, made absolute.

        Raises:
            SandboxFileNotFoundError: Nothing at that path (or a final link leads nowhere).
            SandboxNotADirectoryError: A parent in the path is not a directory.
            SandboxPermissionError: The sandbox's user may not look there.
            SandboxClosedError: The sandbox was closed.
        """
        where = self.resolve(path)
        info = await self._stat(where, follow_symlinks=follow_symlinks, probe=False)
        assert info is not None
        return info

    async def exists(self, path: str, *, follow_symlinks: bool = True) -> bool:
        """Whether something is at path, as ``os.path.exists`` (or ``lexists``) says there.

        Args:
            path: Absolute, or relative to `workdir`.
            follow_symlinks: With ``True`` a link that leads nowhere (or into a loop) does
                not count; with ``False`` every link does.

        Returns:
            ``False`` where the path, or a parent in it, is missing or not a directory.

        Raises:
            SandboxPermissionError: The sandbox's user may not look there (whether the path
                exists is not the user's to know).
            SandboxClosedError: The sandbox was closed.
        """
        where = self.resolve(path)
        info = await self._stat(where, follow_symlinks=follow_symlinks, probe=True)
        return info is not None

    async def _stat(self, where: str, *, follow_symlinks: bool, probe: bool) -> FileInfo | None:
        async def receive(records: _fileops.Records) -> FileInfo | None:
            record = await records.next()
            info = None
            if not record.get("missing"):
                name = posixpath.basename(where.rstrip("/")) or "/"
                info = _file_info(name, where, _fileops.entry(record))
            if not (await records.next()).get("end"):
                raise ProtocolError("the sandbox's file helper sent more than one entry")
            return info

        flags = ["1" if follow_symlinks else "0", "1" if probe else "0"]
        return await self._file_helper(
            "stat", [where, *flags], what=f"cannot stat {where!r}", receive=receive
        )

    async def remove(self, path: str, *, recursive: bool = False, missing_ok: bool = False) -> None:
        """Remove a file, a link or (with ``recursive``) a directory and all it holds.

        A link is removed itself, never what it leads to; a recursive removal never follows
        a link inside the directory (links there are removed, their targets kept). A
        trailing ``/`` is ignored. It needs the rights ``rm`` needs as the sandbox's user.

        Args:
            path: Absolute, or relative to `workdir`; never ``/``.
            recursive: Remove a directory with everything in it, as ``rm -r`` does.
            missing_ok: Do nothing where nothing is at path, instead of raising.

        Raises:
            SandboxFileNotFoundError: Nothing at that path (unless ``missing_ok``).
            SandboxIsADirectoryError: It is a directory and ``recursive`` is not set.
            SandboxNotADirectoryError: A parent in the path is not a directory.
            SandboxPermissionError: The sandbox's user may not remove it (or something in
                it: what could be removed before that is gone).
            ConfigError: The path is the root.
            SandboxClosedError: The sandbox was closed.
        """
        where = self.resolve(path).rstrip("/")
        if not where:
            raise ConfigError("refusing to remove '/': give a path below the root")

        async def receive(records: _fileops.Records) -> None:
            await _expect_end(records)

        flags = ["1" if recursive else "0", "1" if missing_ok else "0"]
        await self._file_helper(
            "remove", [where, *flags], what=f"cannot remove {path!r}", receive=receive
        )

    async def make_dir(self, path: str, *, parents: bool = True, exist_ok: bool = True) -> None:
        """Create a directory, as ``mkdir -p`` does by default (``os.makedirs``).

        New directories get mode ``0o777`` less the sandbox's umask, and belong to the
        sandbox's user. Links in the path are followed, as its processes follow them.

        Args:
            path: Absolute, or relative to `workdir`.
            parents: Create missing parent directories too; without it a missing parent
                raises `SandboxFileNotFoundError`.
            exist_ok: Accept a directory already at path; without it, that raises
                `SandboxFileExistsError`.

        Raises:
            SandboxFileExistsError: Something that is not a directory is at path, or (with
                ``exist_ok=False``) a directory is.
            SandboxFileNotFoundError: A parent is missing and ``parents`` is not set.
            SandboxNotADirectoryError: A parent in the path is not a directory.
            SandboxPermissionError: The sandbox's user may not create it.
            SandboxClosedError: The sandbox was closed.
        """
        where = self.resolve(path)

        async def receive(records: _fileops.Records) -> None:
            await _expect_end(records)

        flags = ["1" if parents else "0", "1" if exist_ok else "0"]
        await self._file_helper(
            "mkdir", [where, *flags], what=f"cannot make directory {path!r}", receive=receive
        )

    async def upload(self, local_path: str | os.PathLike[str], remote_path: str) -> None:
        """Copy a local file or directory tree into the sandbox; ``remote_path`` becomes it.

        A directory is created at ``remote_path`` (with missing parents) or merged into the
        one there: every directory, regular file and symlink of the tree is created under
        it, replacing files of the same name. Files keep their permission bits (set-id and
        sticky bits dropped) and modification times; links are copied as links, their
        targets unchanged; FIFOs, sockets and devices are skipped. A file becomes the file
        at ``remote_path``. Everything is created as the sandbox's user, with that user's
        rights, following links in the sandbox as its processes would.

        Contents stream from disk: about one chunk is held in memory at a time. Each file
        is written beside its name and renamed over it, so a process never reads half of
        one; on an error, what was copied before it stays.

        Args:
            local_path: A file or directory on this host (a link there is followed).
            remote_path: Absolute, or relative to `workdir`.

        Raises:
            SandboxNotADirectoryError: Something that is not a directory is where the tree
                needs one.
            SandboxIsADirectoryError: A directory is where the tree has a file.
            SandboxPermissionError: The sandbox's user may not create something there.
            OSError: Reading ``local_path`` failed (``FileNotFoundError`` if it is missing).
            ConfigError: ``local_path`` is neither a file nor a directory.
            SandboxClosedError: The sandbox was closed.
        """
        local = os.fspath(local_path)
        where = self.resolve(remote_path)
        self._check_open()
        info = await anyio.to_thread.run_sync(os.stat, local)
        if not (_is_dir(info) or _is_file(info)):
            raise ConfigError(f"cannot upload {local!r}: it is neither a file nor a directory")

        async def send(proc: Process) -> None:
            sender = _Sender(proc)
            if _is_file(info):
                await _send_file(sender, local, ".", follow=True)
            else:
                root = _fileops.local_entry(local, ".", info)
                assert root is not None
                await sender.put(_fileops.encode(root))
                await _send_tree(sender, local)
            await sender.put(_fileops.encode({"end": True}))
            await sender.flush()

        async def receive(records: _fileops.Records) -> None:
            await _expect_end(records)

        await self._file_helper(
            "put",
            [where],
            what=f"cannot upload {local!r} to {remote_path!r}",
            receive=receive,
            send=send,
        )

    async def download(self, remote_path: str, local_path: str | os.PathLike[str]) -> None:
        """Copy a file or directory tree out of the sandbox; ``local_path`` becomes it.

        It reads as the sandbox's user: what that user may not read raises. A link given as
        ``remote_path`` is followed; links inside the tree are copied as links, not
        followed. A directory is created at ``local_path`` (with missing parents) or merged
        into the one there; a file becomes the file at ``local_path``.

        Nothing is ever written outside ``local_path``, whatever the sandbox holds or sends:
        every name is checked, links are never followed while writing, and a link is
        created only where its target stays inside the copy (relative, its leading ``..``
        climbing no higher than ``local_path``, no ``..`` after them; like rsync's
        ``--safe-links``, stricter). Other links, and FIFOs, sockets and devices, are
        skipped and named in a warning on the ``sandbay`` logger. Files lose their set-id
        and sticky bits and group and other write; directories stay writable by you, so
        the copy can be changed and removed; modification times of files are kept.

        Contents stream to disk: about one chunk is held in memory at a time. Each file is
        written beside its name and renamed over it (a file or link already there is
        replaced, never written through); on an error, what was copied before it stays.

        Args:
            remote_path: Absolute, or relative to `workdir`.
            local_path: Where on this host the copy goes.

        Raises:
            SandboxFileNotFoundError: Nothing at ``remote_path``.
            SandboxNotADirectoryError: A parent in the path is not a directory.
            SandboxPermissionError: The sandbox's user may not read something in the tree.
            ProtocolError: The sandbox sent a name that would leave ``local_path`` (or
                anything else malformed); nothing was written outside ``local_path``.
            SandboxError: ``remote_path`` is neither a file nor a directory, or a file
                changed while it was read.
            OSError: Writing ``local_path`` failed (something else is in the way there).
            SandboxClosedError: The sandbox was closed.
        """
        where = self.resolve(remote_path)
        tree = _fileops.LocalTree(os.fspath(local_path))
        skipped: list[str] = []

        async def receive(records: _fileops.Records) -> None:
            first = _fileops.entry(await records.next(), key="path")
            if first["path"] != ".":
                raise ProtocolError("the sandbox's file helper did not start with the root")
            if first["type"] == "file":
                await anyio.to_thread.run_sync(tree.begin_file)
                await _receive_file(records, tree, [], first)
            elif first["type"] == "dir":
                await anyio.to_thread.run_sync(tree.begin_dir, first["mode"])
            else:
                raise SandboxError(
                    f"cannot download {remote_path!r}: it is neither a file nor a directory",
                    provider=self.provider,
                    sandbox_id=self.id,
                )
            while not (record := await records.next()).get("end"):
                entry = _fileops.entry(record, key="path")
                parts = _fileops.split_relative(entry["path"])
                if first["type"] != "dir":
                    raise ProtocolError("the sandbox's file helper sent entries in a file")
                if entry["type"] == "dir":
                    await anyio.to_thread.run_sync(tree.make_dir, parts, entry["mode"])
                elif entry["type"] == "file":
                    await _receive_file(records, tree, parts, entry)
                elif entry["type"] != "symlink" or not await anyio.to_thread.run_sync(
                    tree.make_link, parts, entry["target"]
                ):
                    skipped.append(entry["path"])

        try:
            await self._file_helper(
                "get",
                [where],
                what=f"cannot download {remote_path!r}",
                receive=receive,
            )
        finally:
            await anyio.to_thread.run_sync(tree.close)
            if skipped:
                shown = ", ".join(repr(p) for p in skipped[:20])
                more = f" and {len(skipped) - 20} more" if len(skipped) > 20 else ""
                _fileops.logger.warning(
                    "download of %r to %r skipped %d entries (links leading out of the "
                    "copy, FIFOs, sockets, devices): %s%s",
                    remote_path,
                    tree.root,
                    len(skipped),
                    shown,
                    more,
                )

    async def _file_helper(
        self,
        op: str,
        args: Sequence[str],
        *,
        what: str,
        receive: Callable[[_fileops.Records], Awaitable[_R]],
        send: Callable[[Process], Awaitable[None]] | None = None,
    ) -> _R:
        """Run the file helper's ``op`` as the sandbox's user; ``receive`` reads its records
        up to the last; ``send`` (if any) feeds its stdin meanwhile."""
        self._check_open()
        where = {"provider": self.provider, "sandbox_id": self.id}
        argv = [self.python, "-I", "-S", "-c", _fileops.HELPER, op, *args]
        proc = await self.start(argv, cwd="/")
        records = _fileops.Records(proc.stdout, what=what, where=where)
        tail = bytearray()
        local_errors: list[Exception] = []

        async def drain_stderr() -> None:
            async for chunk in proc.stderr:
                tail.extend(chunk)
                del tail[:-2000]

        async def feed() -> None:
            try:
                if send is not None:
                    await send(proc)
            except BrokenPipeError:
                pass  # the helper stopped reading: its records say why
            except Exception as exc:
                local_errors.append(exc)  # ending stdin early makes the helper clean up
            finally:
                await proc.close_stdin()

        ended = False
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain_stderr)
                tg.start_soon(feed)
                try:
                    result = await receive(records)
                except _fileops.Ended:
                    ended = True
                except Exception as exc:
                    # Raised below, as itself rather than inside an exception group.
                    failure = exc
                    tg.cancel_scope.cancel()
            if failure is None:
                code = await proc.wait()
        except BaseException:
            await _kill_shielded(proc)
            raise
        if failure is not None or local_errors:
            await _kill_shielded(proc)
            error = local_errors[0] if local_errors else failure
            assert error is not None
            raise error from None
        if ended or code != 0:
            text = tail.decode(errors="replace").strip()
            if code == 127:
                detail = (
                    f"the file API runs {self.python!r} in the sandbox, and it is not there; "
                    "use an image with Python 3.10+"
                )
            else:
                detail = f"the file helper failed (exit code {code}): {text or 'no output'}"
            raise SandboxError(f"{what}: {detail}", **where)
        return result

    async def aclose(self) -> None:
        """Remove the sandbox. Idempotent; runs shielded and bounds its own wait.

        A provider that does not answer within `CLOSE_TIMEOUT` seconds is given up on; the
        sandbox's lease (`expiry`) lets `sandbay gc` remove it later.
        """
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
            await self._aclose()

    async def extend(self, seconds: float) -> float:
        """Renew the sandbox's lease: it now expires ``seconds`` from now (a keep-alive).

        A sandbox whose lease ends is removed by `sandbay gc`, or stops by itself where the
        provider can do that (docker); so a process that renews the lease of the sandboxes
        it uses, and dies, leaves them behind for at most one lease. The new expiry replaces
        the old one, sooner or later, rounded up to a whole second.

        Args:
            seconds: How long from now the lease lasts: a positive, finite number.

        Returns:
            The new expiry, as Unix time (also `expiry` from now on).

        Raises:
            ConfigError: ``seconds`` is not a positive finite number, or the provider
                cannot renew leases.
            SandboxClosedError: The sandbox was closed.
            SandboxNotFoundError: The sandbox vanished (its lease already ran out?).
        """
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not math.isfinite(seconds)
            or seconds <= 0
        ):
            raise ConfigError(f"extend needs a positive, finite number of seconds, got {seconds!r}")
        self._check_open()
        expiry = float(math.ceil(time.time() + seconds))
        await self._extend(expiry)
        self._expiry = expiry
        return expiry

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<{type(self).__name__} {self.provider} {self.id} {state}>"


def _line_too_long(max_line: int) -> ProtocolError:
    return ProtocolError(
        f"the process wrote a line longer than max_line={max_line} bytes; "
        "raise the limit or read the stream in chunks"
    )


def _argv(argv: str | Sequence[str]) -> list[str]:
    if isinstance(argv, str):
        if not argv.strip():
            raise ConfigError("empty command: give a program and its arguments")
        return ["sh", "-c", argv]
    result = [str(part) for part in argv]
    if not result or not result[0]:
        raise ConfigError("empty argv: give a program and its arguments")
    return result


def _show(argv: str | Sequence[str]) -> str:
    text = argv if isinstance(argv, str) else shlex.join(str(a) for a in argv)
    return repr(text if len(text) <= 80 else text[:77] + "...")


async def _kill_shielded(proc: Process) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
        await proc.kill()


def _file_info(name: str, path: str, entry: Mapping[str, Any]) -> FileInfo:
    return FileInfo(
        name=name,
        path=path,
        type=entry["type"],
        size=entry["size"],
        mode=entry["mode"],
        mtime=float(entry["mtime"]),
        link_target=entry["target"] if entry["type"] == "symlink" else None,
    )


async def _expect_end(records: _fileops.Records) -> None:
    if not (await records.next()).get("end"):
        raise ProtocolError("the sandbox's file helper sent an unexpected record")


def _is_dir(info: os.stat_result) -> bool:
    return info.st_mode & 0o170000 == 0o040000


def _is_file(info: os.stat_result) -> bool:
    return info.st_mode & 0o170000 == 0o100000


class _Sender:
    """Writes to a process's stdin in chunks of about `_fileops.CHUNK`."""

    def __init__(self, proc: Process) -> None:
        self._proc = proc
        self._buffer = bytearray()

    async def put(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= _fileops.CHUNK:
            await self.flush()

    async def flush(self) -> None:
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            await self._proc.write(data)


async def _send_file(sender: _Sender, path: str, rel: str, *, follow: bool) -> None:
    """Send one local regular file's record and contents (about one chunk held at a time)."""
    if follow:
        path = await anyio.to_thread.run_sync(os.path.realpath, path)
    fd, info = await anyio.to_thread.run_sync(_fileops.open_local, path)
    try:
        record = _fileops.local_entry(path, rel, info)
        if record is None or record["type"] != "file":
            return  # no longer a regular file
        size = record["size"]
        await sender.put(_fileops.encode(record))
        left = size
        while left:
            data = await anyio.to_thread.run_sync(
                _fileops.read_exactly, fd, min(left, _fileops.SMALL_FILE)
            )
            if not data:
                raise OSError(f"{path!r} shrank while it was uploaded")
            await sender.put(data)
            left -= len(data)
    finally:
        os.close(fd)


async def _send_tree(sender: _Sender, root: str) -> None:
    """Send every entry below a local directory, directories before what they hold."""
    todo = [(".", root)]
    while todo:
        rel, path = todo.pop()
        subdirs = []
        for name, info in await anyio.to_thread.run_sync(_fileops.scan, path):
            child = os.path.join(path, name)
            crel = name if rel == "." else f"{rel}/{name}"
            if _is_file(info):
                await _send_file(sender, child, crel, follow=False)
                continue
            record = await anyio.to_thread.run_sync(_fileops.local_entry, child, crel, info)
            if record is None:
                _fileops.logger.warning("upload skipped %r: not a file, directory or link", child)
                continue
            await sender.put(_fileops.encode(record))
            if record["type"] == "dir":
                subdirs.append((crel, child))
        todo.extend(reversed(subdirs))


async def _receive_file(
    records: _fileops.Records, tree: _fileops.LocalTree, parts: list[str], entry: Mapping[str, Any]
) -> None:
    """Write one downloaded file's contents, holding about one chunk at a time."""
    size, mode, mtime = entry["size"], entry["mode"], float(entry["mtime"])
    if size <= _fileops.SMALL_FILE:
        data = b"".join([chunk async for chunk in records.data(size)])
        if await records.status():
            await anyio.to_thread.run_sync(tree.small_file, parts, data, mode, mtime)
            return
    else:
        opened = await anyio.to_thread.run_sync(tree.open_file, parts)
        keep = False
        try:
            async for chunk in records.data(size):
                await anyio.to_thread.run_sync(tree.write, opened[0], chunk)
            keep = await records.status()
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(
                    functools.partial(tree.finish_file, opened, mode, mtime, keep=keep)
                )
        if keep:
            return
    await records.next()  # the error record: raises its typed error
    raise ProtocolError("the sandbox's file helper failed a file without saying why")
