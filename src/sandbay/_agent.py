"""Running an agent inside a sandbox and streaming its messages back as typed SDK objects.

The Agent SDK runs here, the ``claude`` CLI in the sandbox: a run drives the SDK's own control
protocol (`sandbay._query.raw_query`) over a `SandboxTransport`, whose relay starts the CLI in
the sandbox and logs each of its lines with a sequence number. Each message is parsed here by
the same function the SDK's own ``query()`` uses, so hooks, ``can_use_tool``, SDK MCP servers
and session stores work as they do locally.

If the stream breaks while the relay keeps running, the transport reattaches with the
relay's ``replay`` from the last sequence number it saw; `resume_run` does the same from
another process.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import math
import os
import time
import urllib.parse
import uuid
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from contextlib import aclosing
from pathlib import PurePath
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import anyio
from claude_agent_sdk import ClaudeAgentOptions, Message
from claude_agent_sdk._internal.message_parser import parse_message
from pydantic import ValidationError
from typing_extensions import Self

from ._api import Providers, connect_sandbox, get_provider
from ._config import (
    BaseProviderConfig,
    ProviderConfig,
    SandbayConfig,
    config_from_data,
    load_config,
    provider_config,
)
from ._errors import AgentError, ConfigError, ProtocolError, SandboxError, SandboxTimeoutError
from ._provider import Provider, managed_labels
from ._sandbox import CLOSE_TIMEOUT, Process, Sandbox, SandboxSpec

if TYPE_CHECKING:
    from claude_agent_sdk._internal.query import Query

    from ._model_relay import ModelRelay
    from ._transport import RequestHandler, RunInput, SandboxTransport

__all__ = [
    "AgentRun",
    "Envelope",
    "Lease",
    "LeaseSource",
    "RunHandle",
    "RunTimings",
    "replay_agent",
    "resume_run",
    "run_agent",
]

WIRE_VERSION = 1

#: Lease (seconds) of a sandbox a run creates inside ``async with``, renewed while the run is
#: open: a host process killed mid-run leaves its sandbox behind for at most about this long.
RUN_LEASE_S = 180.0

_logger = logging.getLogger("sandbay")
#: Host variables an agent needs, passed on stdin (never in argv or the sandbox's env).
FORWARDED_ENV = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_MODEL",
    "ANTHROPIC_SMALL_FAST_MODEL",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
    "CLAUDE_CODE_USE_BEDROCK",
    "CLAUDE_CODE_USE_VERTEX",
)
#: Any of these lets the agent authenticate to the model (or to Bedrock / Vertex).
CREDENTIALS = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "CLAUDE_CODE_USE_BEDROCK",
    "CLAUDE_CODE_USE_VERTEX",
)
#: Options that are code, not data: they run on the host, in the Agent SDK.
CODE_OPTIONS = frozenset({"can_use_tool", "hooks", "stderr", "session_store", "debug_stderr"})
RECONNECTS = 3
#: Longest envelope line the host accepts, in bytes: the cap on what one line from the
#: sandbox may make the host hold (stream-json messages with images run to a few MiB).
MAX_ENVELOPE_BYTES = 32 * 1024 * 1024
#: How much of the end of the relay's stderr log an `AgentError` reports from.
STDERR_TAIL_BYTES = 64 * 1024
#: Largest sequence number accepted (a run never comes near it).
MAX_SEQ = 2**53
#: Deepest nesting of lists and objects accepted in an envelope's data; the CLI's own
#: messages stay within a dozen levels.
MAX_DEPTH = 100


@dataclasses.dataclass(frozen=True)
class Envelope:
    """One message of a run, from its log.

    Attributes:
        seq: Sequence number of the run's logged envelopes (0 for unlogged ones).
        kind: ``message``.
        data: The payload; for ``message``, the raw stream-json dict.
    """

    seq: int
    kind: str
    data: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class RunTimings:
    """When a run reached each milestone: `time.perf_counter` values, ``None`` until reached.

    `AgentRun.timings` is replaced by a new record at each milestone, so a record once read
    never changes. Subtract two fields for a phase: ``t.first_message - t.request``.

    Attributes:
        start: Iteration began.
        sandbox: The sandbox was provisioned, or taken from the pool.
        request: The relay was started, and with it the CLI (or, from a pool, taken
            started).
        first_message: The first agent message arrived (``system/init``).
        first_assistant: The first assistant message arrived.
        result: The result message arrived.
        closed: The run was torn down (its sandbox removed, if the run owned it).
    """

    start: float | None = None
    sandbox: float | None = None
    request: float | None = None
    first_message: float | None = None
    first_assistant: float | None = None
    result: float | None = None
    closed: float | None = None

    def as_dict(self) -> dict[str, float]:
        """The milestones reached, by name, in the order they are reached."""
        return {
            field.name: value
            for field in dataclasses.fields(self)
            if (value := getattr(self, field.name)) is not None
        }

    # Read access as a dict, which `AgentRun.timings` was: deprecated, kept for old callers.

    def __getitem__(self, name: str) -> float:
        _warn_dict_access()
        return self.as_dict()[name]

    def get(self, name: str, default: float | None = None) -> float | None:
        """Deprecated dict access: use the attribute (``None`` until reached)."""
        _warn_dict_access()
        return self.as_dict().get(name, default)

    def __contains__(self, name: object) -> bool:
        _warn_dict_access()
        return name in self.as_dict()

    def __iter__(self) -> Iterator[str]:
        _warn_dict_access()
        return iter(self.as_dict())

    def keys(self) -> Iterator[str]:
        """Deprecated dict access: use `as_dict`."""
        _warn_dict_access()
        return iter(self.as_dict())

    def items(self) -> Iterator[tuple[str, float]]:
        """Deprecated dict access: use `as_dict`."""
        _warn_dict_access()
        return iter(self.as_dict().items())


def _warn_dict_access() -> None:
    warnings.warn(
        "AgentRun.timings is a RunTimings record, not a dict: read its attributes "
        "(run.timings.first_message) or call run.timings.as_dict()",
        DeprecationWarning,
        stacklevel=3,
    )


@dataclasses.dataclass
class Lease:
    """A ready sandbox taken from a pool: the caller now owns it and must close it.

    Attributes:
        sandbox: The sandbox.
        transport: The run's transport, its relay uploaded; connected (the ``claude`` CLI
            started with the pool's options) if ``prepared``.
        run_id: The run's id.
        prepared: Whether the ``claude`` CLI is already started with the pool's options.
        query: The Agent SDK's control-protocol session over ``transport``, its initialize
            handshake done with the pool's options' callbacks; ``None`` if the pool did not
            do it ahead of time.
        env: The agent environment the pool started the CLI with.
    """

    sandbox: Sandbox
    transport: SandboxTransport | None
    run_id: str
    prepared: bool
    query: Query | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)

    async def kill(self) -> None:
        """Kill what the pool started in the sandbox (the relay and the CLI, if prepared).

        The sandbox stays open: close it too, unless a run takes it over.
        """
        if self.transport is not None:
            await self.transport.kill()
        if self.query is not None:
            await self.query.close()  # its reader task; the transport is dead already
            self.query.close_receive_stream()

    async def adopt(
        self, options: ClaudeAgentOptions | None, *, env: Mapping[str, str] | None = None
    ) -> tuple[SandboxTransport, Query | None]:
        """The transport (and handshake) a run or session taking this lease runs over.

        ``options`` ``None`` takes the pool's, callbacks included. Otherwise their data are
        the pool's (the pool's `check_options` passed) or all defaults (the pool's data
        then), and their callbacks are the run's, always: never the pool's in their place.
        A prepared CLI serves them when they have the pool's `handshake_shape` (with the
        handshake done: the run's callbacks take the places the pool's were registered in;
        without it: the run does the handshake); otherwise it is killed and a CLI started
        for them in the same sandbox, and the handshake happens in the run. The returned
        transport may still need ``connect()``.
        """
        from ._query import command_line_shape, handshake_shape
        from ._transport import SandboxTransport

        run_env = {**self.env, **(env or {})}
        pooled = self.transport
        if pooled is None or not self.prepared:
            return SandboxTransport(self.sandbox, options, env=run_env, run_id=self.run_id), None
        effective = options_for_lease(pooled.options, options)
        shape = handshake_shape if self.query is not None else command_line_shape
        if shape(effective) == shape(pooled.options):
            pooled.options = effective  # its stderr callback is the run's too
            return pooled, self.query
        _logger.info(
            "sandbox %s: the run's callbacks differ in shape from the pool's; its CLI is "
            "started anew",
            self.sandbox.id,
        )
        await self.kill()
        self.query = None
        self.run_id = uuid.uuid4().hex[:16]
        return SandboxTransport(self.sandbox, effective, env=run_env, run_id=self.run_id), None


def options_for_lease(
    pool_options: ClaudeAgentOptions, options: ClaudeAgentOptions | None
) -> ClaudeAgentOptions:
    """The options a run taking a prepared pooled CLI runs with (see `Lease.adopt`)."""
    if options is None:
        return pool_options
    if options_to_wire(options):
        return options
    return dataclasses.replace(
        pool_options, **{name: getattr(options, name) for name in CODE_OPTIONS}
    )


class LeaseSource(Protocol):
    """What a run needs from a pool (`SandboxPool` is one): ready sandboxes, one at a time.

    The agent layer knows pools only through this, so the pool builds on the agent layer
    and not the other way round.
    """

    @property
    def agent_env(self) -> Mapping[str, str]:
        """The agent environment the pool's CLIs were started with."""
        ...

    @property
    def provider(self) -> str | BaseProviderConfig | SandbayConfig | Provider | None:
        """The provider the pool's sandboxes come from, as it was given to the pool."""
        ...

    def check_options(self, wire_options: Mapping[str, object]) -> None:
        """Raise `ConfigError` if a run's options differ from the pool's."""
        ...

    async def acquire(self, *, timeout: float | None = None) -> Lease:
        """Take a ready sandbox; the caller owns it from then on."""
        ...


def options_to_wire(options: ClaudeAgentOptions | None) -> dict[str, Any]:
    """The data fields of options that differ from their defaults, as JSON-ready values.

    Code (callbacks, a session store, SDK MCP server instances) stays out: it runs on the
    host, in the Agent SDK, and is not data. An SDK MCP server is named by its name. This is
    what a pool compares a run's options by, and what the checks before a run read.

    Raises:
        ConfigError: A data field holds something that is not plain data.
    """
    if options is None:
        return {}
    wire: dict[str, Any] = {}
    for field in dataclasses.fields(options):
        if field.name in CODE_OPTIONS:
            continue
        value = getattr(options, field.name)
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:  # pragma: no cover - every option has a default today
            default = dataclasses.MISSING
        if value is None or value == default:
            continue
        if field.name == "mcp_servers" and isinstance(value, dict):
            value = {
                name: {"type": "sdk", "name": config.get("name", name)}
                if isinstance(config, dict) and config.get("type") == "sdk"
                else config
                for name, config in value.items()
            }
        wire[field.name] = _jsonable(value, f"ClaudeAgentOptions.{field.name}")
    return wire


def _jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            k: _jsonable(v, f"{where}.{k}")
            for k, v in dataclasses.asdict(value).items()
            if v is not None
        }
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(
        f"{where} holds a {type(value).__name__}, which cannot cross into the sandbox; "
        "give plain data (str, number, list, dict)"
    )


def agent_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables the agent gets: forwarded auth/endpoint settings, then ``extra``."""
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    env.update(extra or {})
    return env


def sandbox_agent_env(sandbox: Sandbox, env: Mapping[str, str]) -> dict[str, str]:
    """``env`` as sent to the agent in ``sandbox``.

    ``IS_SANDBOX=1`` (which lets the CLI bypass permissions as root) is added only where a
    real boundary exists (`Sandbox.isolated`); on the host it would let an agent act as root.
    """
    return {"IS_SANDBOX": "1", **env} if sandbox.isolated else dict(env)


def check_credentials(*envs: Mapping[str, str] | None) -> None:
    """Refuse a run whose agent would have no way to authenticate to the model.

    Raises:
        ConfigError: None of `CREDENTIALS` is set in any of ``envs``.
    """
    if any(env and env.get(name) for env in envs for name in CREDENTIALS):
        return
    raise ConfigError(
        "ANTHROPIC_API_KEY is not set, so the agent cannot reach the model (the claude CLI "
        "would only say 'Not logged in'). Export ANTHROPIC_API_KEY (or pass "
        "env={'ANTHROPIC_API_KEY': ...}); to run without a model account, use "
        "`sandbay run --offline`, or start sandbay.testing.ScriptedModel and pass "
        "env=model.env()"
    )


def check_sandbox(
    sandbox: Sandbox, *, wire_options: Mapping[str, Any], env: Mapping[str, str]
) -> None:
    """Refuse what cannot work, or must not run, in this sandbox; before the agent starts.

    Args:
        sandbox: Where the agent is about to run.
        wire_options: Its options, as `options_to_wire` gives them.
        env: The environment sent with the request (it overrides ``options.env``).

    Raises:
        ConfigError: ``bypassPermissions`` on a sandbox that does not allow it
            (`Sandbox.allows_bypass_permissions`), or a model URL on loopback that the
            sandbox cannot reach (`Sandbox.reaches_host_loopback`).
    """
    if _bypasses_permissions(wire_options) and not sandbox.allows_bypass_permissions:
        raise ConfigError(
            f"permission_mode='bypassPermissions' refused on this {sandbox.provider} sandbox: "
            "it is not isolated, so the agent would run every command on this machine as you, "
            "without asking. Use an isolated sandbox (docker, or local with isolate=true), "
            "let allowed_tools decide what the agent may run, or opt in explicitly in the "
            "provider's config",
            provider=sandbox.provider,
            sandbox_id=sandbox.id,
        )
    option_env = wire_options.get("env")
    url = (
        env.get("ANTHROPIC_BASE_URL")
        or (option_env.get("ANTHROPIC_BASE_URL") if isinstance(option_env, dict) else None)
        or sandbox.spec.env.get("ANTHROPIC_BASE_URL")
    )
    if url and _is_loopback_url(str(url)) and not sandbox.reaches_host_loopback:
        raise ConfigError(
            f"ANTHROPIC_BASE_URL={url} is a loopback address, and loopback inside this "
            f"{sandbox.provider} sandbox is the sandbox's own, not this machine's: the agent "
            "would retry until its deadline. Leave sandbay's model relay on (the default with "
            "an ANTHROPIC_API_KEY: the host reaches the model for it; SANDBAY_MODEL_RELAY=0 "
            "turned it off), give the sandbox the host's network "
            "(SandboxSpec(network='host')), or use an address the sandbox can reach",
            provider=sandbox.provider,
            sandbox_id=sandbox.id,
        )


def _bypasses_permissions(wire_options: Mapping[str, Any]) -> bool:
    if wire_options.get("permission_mode") == "bypassPermissions":
        return True
    extra = wire_options.get("extra_args") or {}
    return isinstance(extra, dict) and (
        extra.get("permission-mode") == "bypassPermissions"
        or "dangerously-skip-permissions" in extra
        or "allow-dangerously-skip-permissions" in extra
    )


def _is_loopback_url(url: str) -> bool:
    try:
        host = urllib.parse.urlsplit(url.strip()).hostname
    except ValueError:
        return False
    if not host:
        return False
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_unspecified


class AgentRun:
    """One agent run: an async iterator of typed `claude_agent_sdk` messages.

    Use it as an async context manager and iterate it inside::

        async with sandbay.run_agent("...") as run:
            async for message in run:
                ...

    Leaving the block, however it is left (the loop ran out, ``break``, an exception,
    cancellation), kills the agent and removes the sandbox the run created before the block
    exits. A bare ``async for`` over the run cannot promise that when it stops early: Python
    closes an abandoned async generator only when it is garbage collected, so call `aclose`
    yourself if you do not use ``async with``.

    Inside ``async with``, a sandbox the run creates gets a short lease (`RUN_LEASE_S`, at
    most ``spec.lifetime_s``) that a task of the run renews until the block exits or
    ``spec.lifetime_s`` has passed: if the host process dies, its sandbox expires soon after
    (docker's stops by itself; `sandbay gc` removes the rest). Iterated without
    ``async with``, the sandbox's lease is ``spec.lifetime_s``, unrenewed.

    Attributes:
        run_id: Identifies the run inside its sandbox (for `replay_agent`).
        last_seq: Sequence number of the last message received.
        sandbox: The sandbox it runs in, once provisioned.
        timings: When the run reached each milestone, a `RunTimings` record (``start``,
            ``sandbox``, ``request``, ``first_message``, ``first_assistant``, ``result``,
            ``closed``).
        sandbox_timings: Milestones the relay measured inside the sandbox, in monotonic
            milliseconds of the sandbox's clock, as they arrive: ``relay_boot_ms`` (its
            process began), ``relay_start_ms`` (its code loaded), ``cli_spawned_ms``,
            ``cli_first_line_ms``. Subtract two for a phase.
    """

    def __init__(
        self,
        prompt: str,
        *,
        provider: str | ProviderConfig | SandbayConfig | None,
        options: ClaudeAgentOptions | None,
        timeout: float | None,
        spec: SandboxSpec | None,
        sandbox: Sandbox | None,
        pool: LeaseSource | None,
        env: Mapping[str, str] | None,
        run_id: str | None,
        tenant: str | None = None,
    ) -> None:
        from ._transport import check_tenant

        check_tenant(tenant)
        if tenant is not None and pool is not None:
            raise ConfigError(
                "tenant= cannot be combined with pool=: a pooled sandbox's CLI was started "
                "for no tenant; give sandbox= or provider= with a tenant"
            )
        self.tenant = tenant
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("empty prompt: give the agent something to do")
        if timeout is not None and timeout <= 0:
            raise ConfigError(f"timeout must be positive seconds, got {timeout!r}")
        if sum(x is not None for x in (sandbox, pool)) > 1:
            raise ConfigError("give sandbox= or pool=, not both")
        self.prompt = prompt
        self.run_id = run_id or uuid.uuid4().hex[:16]
        self.last_seq = 0
        self.sandbox: Sandbox | None = sandbox
        self._provider = provider
        self._options = options if options is not None else ClaudeAgentOptions()
        self._given_options = options
        self._query: Query | None = None
        self._wire_options = options_to_wire(options)
        if pool is not None:
            pool.check_options(self._wire_options)
        self._timeout = timeout
        self._spec = spec
        self._pool = pool
        self._env = agent_env(env)
        option_env = self._wire_options.get("env")
        check_credentials(
            self._env,
            option_env if isinstance(option_env, dict) else None,
            pool.agent_env if pool is not None else None,
            (sandbox.spec if sandbox is not None else spec or SandboxSpec()).env,
        )
        self._owns_sandbox = sandbox is None
        self._transport: SandboxTransport | None = None
        self._run_dir = ""
        self.timings = RunTimings()
        self.sandbox_timings: dict[str, float] = {}
        self._raw = False
        self._gen: AsyncGenerator[Any, None] | None = None
        self._keep_alive: _KeepAlive | None = None

    def raw(self) -> Self:
        """Yield the raw stream-json dicts instead of typed messages (for ``--json``)."""
        self._raw = True
        return self

    def __aiter__(self) -> AsyncGenerator[Any, None]:
        if self._gen is None:
            self._gen = self._messages()
        return self._gen

    async def __aenter__(self) -> Self:
        if self._owns_sandbox and self._pool is None and self._keep_alive is None:
            self._keep_alive = _KeepAlive()
            await self._keep_alive.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        keep_alive, self._keep_alive = self._keep_alive, None
        if keep_alive is None:
            await self.aclose()
            return None
        keep_alive.stop()
        try:
            await self.aclose()
        except BaseException as error:
            await keep_alive.__aexit__(type(error), error, error.__traceback__)
            raise
        return await keep_alive.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        """Stop the run: kill the agent and remove the sandbox the run created. Idempotent.

        When it returns, the relay and the CLI have been killed and a sandbox the run
        provisioned (or took from a pool) is removed.
        """
        if self._gen is not None:
            await self._gen.aclose()

    def handle(self, *, provider: str | BaseProviderConfig | None = None) -> RunHandle:
        """A serialisable handle with which another process resumes this run (`resume_run`).

        Take it once the run has its sandbox (after the first message), and again for a
        later ``last_seq``. It holds the provider's config as data (secrets left out: they
        come from the resuming process's environment), the sandbox id, the run id, the last
        sequence number received, and whether the run owns its sandbox (then the resumer
        removes it when done). The run started here still kills the agent and removes the
        sandbox when it is closed; a handle is for when this process cannot go on (it
        crashed, or the worker restarted), not for two readers at once.

        Args:
            provider: The config of the provider the sandbox is on, when the run was given
                a ``sandbox=`` made from something other than that provider's defaults.

        Raises:
            ConfigError: The run has no sandbox yet.
        """
        sandbox = self.sandbox
        if sandbox is None:
            raise ConfigError("the run has no sandbox yet: take its handle after it started")
        if provider is None:
            source = self._pool.provider if self._pool is not None else self._provider
            if isinstance(source, Provider):
                source = source.config
            if source is None and not self._owns_sandbox:
                # A sandbox given without its config: the provider's defaults.
                config = config_from_data({"type": sandbox.provider})
            else:
                config = provider_config(source)
        else:
            config = provider_config(provider)
        relay = self._transport.model_relay if self._transport is not None else None
        return RunHandle(
            provider=config.public_data(),
            sandbox_id=sandbox.id,
            run_id=self.run_id,
            last_seq=self.last_seq,
            owns_sandbox=self._owns_sandbox,
            model_token=relay.token if relay is not None else None,
        )

    async def _messages(self) -> AsyncGenerator[Any, None]:
        from ._query import raw_query

        self._reached("start")
        deadline = math.inf if self._timeout is None else anyio.current_time() + self._timeout
        transport: SandboxTransport | None = None
        finished = False
        try:
            with _deadline(deadline) as scope:
                transport = await self._launch()
            if scope.cancelled_caught or transport is None:
                raise self._timed_out("while provisioning the sandbox")
            self._transport = transport
            # Closed explicitly: closing this generator must close the query (whose
            # ``finally`` closes the transport) at once, not when the garbage collector runs;
            # a run that stops early kills the CLI first, so closing does not wait for it.
            stream = raw_query(
                self.prompt, transport.options, transport, abort=transport.kill, query=self._query
            )
            try:
                while True:
                    with _deadline(deadline) as scope:
                        try:
                            data = await stream.__anext__()
                        except StopAsyncIteration:
                            break
                    if scope.cancelled_caught:
                        raise self._timed_out(f"after {self.last_seq} messages")
                    # Parsed in raw mode too: what the caller gets was checked either way.
                    message = _parse_message(Envelope(self.last_seq, "message", data), self.sandbox)
                    seq = transport.seq_of(data)
                    if seq is not None:
                        self.last_seq = seq
                    self.sandbox_timings = dict(transport.sandbox_timings)
                    self._mark(data.get("type"))
                    if self._raw:
                        yield data
                    elif message is not None:
                        yield message
                finished = True
            finally:
                with anyio.CancelScope(shield=True):
                    if not finished:
                        await transport.kill()
                    await stream.aclose()
        finally:
            with anyio.CancelScope(shield=True):
                if transport is not None and not finished:
                    await transport.kill()
                if self._query is not None:
                    await self._query.close()  # a pool's, in case the stream never took it
                    self._query.close_receive_stream()
                if self._owns_sandbox and self.sandbox is not None:
                    await self.sandbox.aclose()
                self._reached("closed")

    def _mark(self, message_type: object) -> None:
        now = time.perf_counter()
        if self.timings.first_message is None:
            self._reached("first_message", now)
        if message_type == "assistant" and self.timings.first_assistant is None:
            self._reached("first_assistant", now)
        elif message_type == "result" and self.timings.result is None:
            self._reached("result", now)

    def _reached(self, milestone: str, at: float | None = None) -> None:
        """Record a milestone in a new `RunTimings` (records handed out never change)."""
        at = time.perf_counter() if at is None else at
        self.timings = dataclasses.replace(self.timings, **{milestone: at})

    async def _launch(self) -> SandboxTransport:
        """Provision (or take) the sandbox and start the relay (with it the CLI)."""
        from ._transport import SandboxTransport

        if self._pool is not None:
            lease = await self._pool.acquire()
            # A pooled sandbox is used once: this run owns it and destroys it.
            self.sandbox = lease.sandbox
            self._reached("sandbox")
            try:
                transport, self._query = await lease.adopt(self._given_options, env=self._env)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await lease.kill()
                raise
            self.run_id = transport.run_id
        else:
            if self.sandbox is None:
                provider = self._provider if self._provider is not None else load_config()
                spec = self._spec
                if spec is None:
                    spec = provider.spec if isinstance(provider, SandbayConfig) else SandboxSpec()
                keep_alive = self._keep_alive
                if keep_alive is not None:
                    spec = keep_alive.shorten(spec)
                self.sandbox = await provision_sandbox(provider, spec)
                if keep_alive is not None:
                    keep_alive.renew(self.sandbox)
            self._reached("sandbox")
            transport = SandboxTransport(
                self.sandbox, self._options, env=self._env, run_id=self.run_id, tenant=self.tenant
            )
        # Checks the credentials, bypassPermissions and a loopback model URL before the
        # CLI starts; a prepared (pooled) transport was checked when it was started.
        await transport.connect()
        self._run_dir = transport.run_dir
        self._reached("request")
        return transport

    def _timed_out(self, when: str) -> SandboxTimeoutError:
        return SandboxTimeoutError(
            f"the agent run passed its {self._timeout:g} s deadline {when}; "
            "it was killed and its sandbox removed",
            provider=self.sandbox.provider if self.sandbox else None,
            sandbox_id=self.sandbox.id if self.sandbox else None,
        )

    def _agent_error(self, data: Mapping[str, Any]) -> AgentError:
        sb = self.sandbox
        return AgentError(
            f"the agent failed inside the sandbox: {data.get('type')}: {data.get('message')}",
            exit_code=data.get("exit_code"),
            stderr_tail=_tail(str(data.get("stderr") or "")),
            provider=sb.provider if sb else None,
            sandbox_id=sb.id if sb else None,
        )


class _KeepAlive:
    """Renews the lease of the sandbox a run created, in a task group the run's block owns.

    Entered and exited in `AgentRun.__aenter__` and ``__aexit__``, so its task lives exactly
    as long as the ``async with`` block. The task never raises: a renewal that fails is
    logged and tried again, the lease leaving room for two more tries.
    """

    def __init__(self) -> None:
        self._tg = anyio.create_task_group()
        self._scope = anyio.CancelScope()
        self._lease = RUN_LEASE_S
        self._until = math.inf

    def shorten(self, spec: SandboxSpec) -> SandboxSpec:
        """The spec to create with: the short lease; renewals stop at its full lifetime."""
        self._lease = min(RUN_LEASE_S, spec.lifetime_s)
        self._until = time.time() + spec.lifetime_s
        return spec.model_copy(update={"lifetime_s": self._lease})

    def renew(self, sandbox: Sandbox) -> None:
        self._tg.start_soon(self._run, sandbox)

    def stop(self) -> None:
        self._scope.cancel()

    async def _run(self, sandbox: Sandbox) -> None:
        with self._scope:
            while True:
                await anyio.sleep(self._lease / 3)
                left = self._until - time.time()
                if left <= 0 or sandbox.closed:
                    return  # its lifetime is spent: let the lease run out
                try:
                    await sandbox.extend(min(self._lease, left))
                except Exception as exc:  # retried; a failed renewal must not end the run
                    _logger.warning("could not renew the lease of sandbox %s: %s", sandbox.id, exc)

    async def __aenter__(self) -> None:
        await self._tg.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        # Its task is stopped first and never raises, so the group ends empty-handed; the
        # block's own exception (if any) is not handed to it, or it would come out wrapped
        # in an ExceptionGroup instead of as itself.
        self._scope.cancel()
        await self._tg.__aexit__(None, None, None)
        return None


def run_agent(
    prompt: str,
    *,
    provider: str | ProviderConfig | SandbayConfig | None = None,
    options: ClaudeAgentOptions | None = None,
    timeout: float | None = None,
    spec: SandboxSpec | None = None,
    sandbox: Sandbox | None = None,
    pool: LeaseSource | None = None,
    env: Mapping[str, str] | None = None,
    run_id: str | None = None,
    tenant: str | None = None,
) -> AgentRun:
    """Run a Claude agent inside a sandbox and stream its messages as they are produced.

    Yields the same typed `claude_agent_sdk` messages (``SystemMessage``, ``AssistantMessage``,
    ``UserMessage``, ``ResultMessage``, …) a local ``query()`` would, in order::

        async with sandbay.run_agent("fix the failing test", provider="docker") as run:
            async for message in run:
                print(message)

    The ``async with`` block is what removes the sandbox when you stop early (``break``, an
    exception): by the time the block exits, the agent is killed and the sandbox gone.

    Args:
        prompt: What the agent should do.
        provider: Provider name or config; ``None`` reads ``sandbay.toml`` / the environment.
        options: Agent options, everything `ClaudeAgentOptions` holds: the CLI in the
            sandbox gets the flags, and callbacks (hooks, ``can_use_tool``, SDK MCP servers,
            ``stderr``, a ``session_store``) run here, in this process. ``cwd`` is a path in
            the sandbox, default its working directory.
        timeout: Wall-clock deadline in seconds for the whole run, provisioning included.
        spec: What to provision; ignored with ``sandbox`` or ``pool``.
        sandbox: Run in this open sandbox instead of provisioning one; it is left open.
        pool: Take a ready sandbox from this `SandboxPool`; it is destroyed afterwards.
        env: Extra environment for the agent (on top of the forwarded ``ANTHROPIC_*``).
        run_id: Name of the run inside the sandbox; default random.
        tenant: Isolate the run as this tenant's (1 to 64 letters, digits, ``_``, ``.``,
            ``-``): its own working directory, ``HOME``, ``CLAUDE_CONFIG_DIR`` and
            ``TMPDIR`` (`Sandbox.tenant_dirs`), ``setting_sources=[]``,
            ``CLAUDE_CODE_DISABLE_AUTO_MEMORY=1``, its run log private to the relay; on
            docker its CLI runs as a uid of its own, under bubblewrap in a namespace that
            holds only its directories (see docs/security.md for what each provider keeps
            apart). Not with ``pool``.

    Returns:
        An `AgentRun`: enter it with ``async with``, then iterate it with ``async for``.

    Raises:
        ConfigError: Empty prompt, bad timeout, options holding something other than data
            where data belongs, or no model
            credentials (none of `CREDENTIALS` in the host's environment, ``env``,
            ``options.env`` or the spec's env): raised by ``run_agent`` itself. Once the
            sandbox exists, before the agent starts: ``bypassPermissions`` on a sandbox that
            does not allow it (`Sandbox.allows_bypass_permissions`), or an
            ``ANTHROPIC_BASE_URL`` on loopback the sandbox cannot reach; a sandbox the run
            created is removed.
        SandboxTimeoutError: The deadline passed; messages received before it were yielded,
            the agent was killed and the sandbox (if sandbay created it) removed.
        AgentError: The agent or its CLI failed inside the sandbox; carries the exit code
            and the tail of its stderr.
    """
    return AgentRun(
        prompt,
        provider=provider,
        options=options,
        timeout=timeout,
        spec=spec,
        sandbox=sandbox,
        pool=pool,
        env=env,
        run_id=run_id,
        tenant=tenant,
    )


async def replay_agent(sandbox: Sandbox, run_id: str, *, after: int = 0) -> AsyncIterator[Message]:
    """Replay a run's messages from its log in the sandbox, following it until it ends.

    Args:
        sandbox: The sandbox the run ran (or runs) in.
        run_id: `AgentRun.run_id` of the run.
        after: Skip messages up to this sequence number (`AgentRun.last_seq`).

    Raises:
        AgentError: The run failed, or its relay died before it ended.
    """
    async with aclosing(_replay_envelopes(sandbox, run_id, after)) as envelopes:
        async for envelope in envelopes:
            message = _parse_message(envelope, sandbox)
            if message is not None:
                yield message


@dataclasses.dataclass(frozen=True)
class RunHandle:
    """Where a run lives, as data: another process resumes it with `resume_run`.

    Made by `AgentRun.handle`; `to_json` and `from_json` carry it across processes.

    Attributes:
        provider: The provider's config as JSON-ready data (``type`` and its fields, secrets
            left out).
        sandbox_id: `Sandbox.id` of the run's sandbox.
        run_id: `AgentRun.run_id`.
        last_seq: Sequence number of the last message the handle's holder received;
            resuming yields the messages after it.
        owns_sandbox: Whether the run created its sandbox (then the resumer removes it).
        model_token: The run's model relay token, if it has one: the resumer answers the
            CLI's model requests with its own credential for this token. Worthless once the
            run ended and anywhere but this run's relay; keep the handle as private as the
            run.
    """

    provider: Mapping[str, Any]
    sandbox_id: str
    run_id: str
    last_seq: int = 0
    owns_sandbox: bool = True
    model_token: str | None = None

    VERSION: ClassVar[int] = 1

    def config(self) -> BaseProviderConfig:
        """The provider's config, secrets from the environment as when it was first loaded.

        Raises:
            ConfigError: The provider is unknown here, or its data is invalid.
        """
        try:
            return config_from_data(self.provider)
        except ValidationError as exc:
            raise ConfigError(f"run handle: invalid provider config: {exc}") from None

    def to_json(self) -> str:
        """The handle as one line of JSON."""
        data = {"version": self.VERSION, **dataclasses.asdict(self)}
        data["provider"] = dict(self.provider)
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> RunHandle:
        """Read a handle written by `to_json`.

        Raises:
            ConfigError: Not a run handle, or one of another version.
        """
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"not a run handle (invalid JSON: {exc})") from None
        if not isinstance(data, dict) or data.get("version") != cls.VERSION:
            raise ConfigError(f"not a version {cls.VERSION} run handle")
        provider = data.get("provider")
        fields = (data.get("sandbox_id"), data.get("run_id"))
        last_seq, owns = data.get("last_seq"), data.get("owns_sandbox")
        token = data.get("model_token")
        if not (token is None or (isinstance(token, str) and 0 < len(token) < 256)) or set(data) - {
            "version",
            "provider",
            "sandbox_id",
            "run_id",
            "last_seq",
        } - {"owns_sandbox", "model_token"}:
            raise ConfigError("not a valid run handle: unknown fields or a bad model_token")
        if (
            not isinstance(provider, dict)
            or not isinstance(provider.get("type"), str)
            or not all(isinstance(x, str) and x for x in fields)
            or type(last_seq) is not int
            or not 0 <= last_seq <= MAX_SEQ
            or type(owns) is not bool
        ):
            raise ConfigError("not a valid run handle: a field is missing or of the wrong type")
        return cls(
            provider=provider,
            sandbox_id=str(fields[0]),
            run_id=str(fields[1]),
            last_seq=last_seq,
            owns_sandbox=owns,
            model_token=token,
        )


class ResumedRun:
    """A run resumed from its `RunHandle`: an async iterator of the messages still to come.

    Use it as an async context manager, as an `AgentRun`::

        async with sandbay.resume_run(handle) as run:
            async for message in run:
                ...

    Leaving the block removes the sandbox if the handle says the run owned it (the agent
    with it); a sandbox the run was lent is left open, the agent still running in it if the
    block was left early.

    Attributes:
        run_id: The run's id.
        last_seq: Sequence number of the last message received (the handle's, at first).
        sandbox: The reattached sandbox, once connected.
    """

    def __init__(self, handle: RunHandle, *, providers: Providers | None) -> None:
        self._handle = handle
        self._config = handle.config()
        self._providers = providers
        self.run_id = handle.run_id
        self.last_seq = handle.last_seq
        self.sandbox: Sandbox | None = None
        self._gen: AsyncGenerator[Message, None] | None = None
        self._input: RunInput | None = None

    async def write(self, data: str) -> None:
        """Write stream-json lines to the run's CLI, from this process (`RunInput`).

        Inputs of this run reach the CLI once each, in order, after those of the process
        that started it and of other resumers (in the order the relay got them).

        Raises:
            AgentError: The run is not running, or its input ended.
        """
        await (await self._writer()).write(data)

    async def query(self, prompt: str, *, session_id: str = "default") -> None:
        """Send the CLI a new user turn, as ``ClaudeSDKClient.query`` does."""
        message = {
            "type": "user",
            "message": {"role": "user", "content": prompt},
            "parent_tool_use_id": None,
            "session_id": session_id,
        }
        await self.write(json.dumps(message) + "\n")

    async def end_input(self) -> None:
        """End the CLI's input: it finishes its turn and exits."""
        await (await self._writer()).end_input()

    async def _writer(self) -> RunInput:
        from ._transport import RunInput

        if self.sandbox is None:
            self.sandbox = await connect_sandbox(
                self._config, self._handle.sandbox_id, providers=self._providers
            )
        if self._input is None:
            self._input = RunInput(self.sandbox, self.run_id)
        return self._input

    def _model_relay(self) -> ModelRelay | None:
        """The model relay, if the run has one and this process a credential."""
        from ._model_relay import relay_for

        token = self._handle.model_token
        return relay_for(agent_env(), token=token) if token is not None else None

    def handle(self) -> RunHandle:
        """A handle to resume from where this one got to."""
        return dataclasses.replace(self._handle, last_seq=self.last_seq)

    def __aiter__(self) -> AsyncGenerator[Message, None]:
        if self._gen is None:
            self._gen = self._messages()
        return self._gen

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop following the run; remove the sandbox if the run owned it. Idempotent."""
        writer, self._input = self._input, None
        if writer is not None:
            await writer.aclose()
        if self._gen is None:
            self._gen = self._messages()  # never iterated: still release the sandbox
            with anyio.CancelScope(shield=True):
                await self._release()
        await self._gen.aclose()

    async def _messages(self) -> AsyncGenerator[Message, None]:
        from ._model_relay import METHOD

        relay = self._model_relay()
        handlers: dict[str, RequestHandler] = {METHOD: relay.handle} if relay else {}
        try:
            if self.sandbox is None:
                self.sandbox = await connect_sandbox(
                    self._config, self._handle.sandbox_id, providers=self._providers
                )
            async with aclosing(
                _replay_envelopes(self.sandbox, self.run_id, self.last_seq, handlers=handlers)
            ) as envelopes:
                async for envelope in envelopes:
                    message = _parse_message(envelope, self.sandbox)
                    self.last_seq = max(self.last_seq, envelope.seq)
                    if message is not None:
                        yield message
        finally:
            with anyio.CancelScope(shield=True):
                if relay is not None:
                    await relay.aclose()
                await self._release()

    async def _release(self) -> None:
        if self._handle.owns_sandbox:
            if self.sandbox is None:
                with anyio.move_on_after(CLOSE_TIMEOUT):
                    try:
                        self.sandbox = await connect_sandbox(
                            self._config, self._handle.sandbox_id, providers=self._providers
                        )
                    except SandboxError:
                        return
            if self.sandbox is not None:
                await self.sandbox.aclose()


def resume_run(handle: RunHandle | str, *, providers: Providers | None = None) -> ResumedRun:
    """Resume a run from its handle, in any process: reattach and follow its messages.

    The messages after ``handle.last_seq`` are replayed from the run's log in the sandbox,
    then followed as the agent produces them, until the run ends::

        handle = run.handle()                  # in the process that started it
        text = handle.to_json()                # stored, sent to another worker
        async with sandbay.resume_run(text) as run:   # anywhere that reaches the provider
            async for message in run:
                ...

    Args:
        handle: A `RunHandle`, or its `RunHandle.to_json`.
        providers: The `Providers` that owns the provider; default the process-wide one.

    Returns:
        A `ResumedRun`: enter it with ``async with``, then iterate it with ``async for``.

    Raises:
        ConfigError: Not a valid handle, or an unknown provider: raised by ``resume_run``.
        SandboxNotFoundError: The sandbox is gone (raised on iteration).
        AgentError: The run failed, or its relay died before it ended.
    """
    if not isinstance(handle, RunHandle):
        handle = RunHandle.from_json(handle)
    return ResumedRun(handle, providers=providers)


async def _replay_envelopes(
    sandbox: Sandbox,
    run_id: str,
    after: int,
    *,
    handlers: Mapping[str, RequestHandler] | None = None,
) -> AsyncGenerator[Envelope, None]:
    """The run's messages after ``after``, from the relay's log, until the run ends.

    With ``handlers``, the relay's requests come this way too and are answered with them.

    Raises:
        AgentError: The run failed, or its relay died before it ended.
        ProtocolError: The log holds something malformed.
    """
    from ._relay.wire import sdk_yields
    from ._transport import (
        MAX_FRAME_BYTES,
        RequestServer,
        parse_frame,
        start_relay_command,
    )

    directory = run_dir(sandbox, run_id)
    args = ["--run-dir", directory, "--after", str(after)]
    if handlers:
        args.append("--link")
    proc = await start_relay_command(sandbox, "replay", *args)
    server = RequestServer(proc, handlers) if handlers else None
    try:
        async for line in proc.stdout.lines(max_line=MAX_FRAME_BYTES):
            if not line.strip():
                continue
            frame = parse_frame(line, sandbox)
            if frame.kind == "request":
                if server is not None:
                    server.on_request(frame.data)
            elif frame.kind == "line":
                if sdk_yields(frame.data):
                    yield Envelope(frame.seq, "message", frame.data)
            elif frame.kind == "end":
                code = frame.data.get("exit_code")
                if code:
                    raise AgentError(
                        "the run failed: the claude CLI exited with an error",
                        exit_code=code,
                        stderr_tail=_tail(str(frame.data.get("stderr") or "")),
                        provider=sandbox.provider,
                        sandbox_id=sandbox.id,
                    )
                return
            elif frame.kind == "error":
                raise AgentError(
                    f"the run failed: {frame.data.get('type')}: {frame.data.get('message')}",
                    exit_code=frame.data.get("exit_code"),
                    stderr_tail=_tail(str(frame.data.get("stderr") or "")),
                    provider=sandbox.provider,
                    sandbox_id=sandbox.id,
                )
        raise AgentError(
            "the run's log ended before the run did",
            exit_code=await _exit_code(proc),
            provider=sandbox.provider,
            sandbox_id=sandbox.id,
        )
    finally:
        with anyio.CancelScope(shield=True):
            if server is not None:
                await server.aclose()
            await _kill(proc)


def run_dir(sandbox: Sandbox, run_id: str) -> str:
    """Directory in the sandbox that holds one run's log (the relay's alone)."""
    return f"{sandbox.relay_dir}/runs/{run_id}"


async def provision_sandbox(
    provider: str | ProviderConfig | SandbayConfig | Provider | None,
    spec: SandboxSpec | None,
) -> Sandbox:
    """Provision a sandbox labelled as sandbay's, for a run or a pool.

    Arguments are those of `create_sandbox`; a `Provider` instance is used as it is.

    Returns:
        The sandbox; the caller must close it.
    """
    if isinstance(provider, Provider):
        chosen = provider
        spec = spec or SandboxSpec()
    else:
        if provider is None:
            provider = load_config()  # read once: provider and spec from the same file
        if spec is None:
            spec = provider.spec if isinstance(provider, SandbayConfig) else SandboxSpec()
        chosen = get_provider(provider)
    return await chosen.create(spec.model_copy(update={"labels": managed_labels(spec)}))


async def stderr_tail(sandbox: Sandbox, directory: str) -> str:
    """The last lines the relay in ``directory`` wrote to stderr ("" if unreadable).

    The sandbox decides how large that log is: ``tail`` inside the sandbox cuts it to its
    last `STDERR_TAIL_BYTES` (a sandbox without ``tail`` streams it past, keeping as much),
    no more than that is ever held, and the read gives up after `CLOSE_TIMEOUT`.
    """
    path = f"{directory}/stderr.log"
    kept = bytearray()
    try:
        with anyio.move_on_after(CLOSE_TIMEOUT):
            # On the relay's side: where it is separated, its run directory is its alone.
            proc = await sandbox.start_relay(["tail", "-c", str(STDERR_TAIL_BYTES), path])
            try:
                async for chunk in proc.stdout:
                    kept += chunk
                    del kept[:-STDERR_TAIL_BYTES]
                code = await proc.wait()
            finally:
                await _kill(proc)
            if code == 127:  # no tail in this sandbox
                async with aclosing(sandbox.read_file_stream(path)) as chunks:
                    async for chunk in chunks:
                        kept += chunk
                        del kept[:-STDERR_TAIL_BYTES]
    except SandboxError:
        pass
    return _tail(kept.decode("utf-8", "replace"))


def _parse_message(envelope: Envelope, sandbox: Sandbox | None) -> Message | None:
    """The typed SDK message of a ``message`` envelope; a `ProtocolError` if it has none."""
    try:
        return parse_message(envelope.data)
    except Exception as exc:  # the SDK's parser raises KeyError, TypeError, … on odd input
        raise ProtocolError(
            f"the sandbox sent a message the Agent SDK cannot parse "
            f"({type(exc).__name__}: {str(exc)[:200]}); the run was stopped",
            provider=sandbox.provider if sandbox else None,
            sandbox_id=sandbox.id if sandbox else None,
        ) from None


def _nests_deeper(value: object, limit: int) -> bool:
    """Whether JSON data nests more than ``limit`` lists/objects deep (without recursion)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


def _is_finite_number(value: object) -> bool:
    return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]


def _show_value(value: object) -> str:
    """A short, safe rendering of a value from the sandbox (no deep repr of containers)."""
    if value is None or isinstance(value, (bool, int, float)):
        text = repr(value)
    elif isinstance(value, str):
        text = repr(value[:60])
    else:
        return f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


class _deadline:
    """A cancel scope expiring at an absolute `anyio.current_time` (``inf`` for none)."""

    def __init__(self, when: float) -> None:
        self._scope = anyio.CancelScope(deadline=when)

    def __enter__(self) -> anyio.CancelScope:
        return self._scope.__enter__()

    def __exit__(self, *exc_info: Any) -> bool:
        return bool(self._scope.__exit__(*exc_info))


async def _exit_code(proc: Process) -> int | None:
    """The exit code if the process ends within a moment, else ``None`` (still running)."""
    with anyio.move_on_after(2):
        return await proc.wait()
    return None


async def _kill(proc: Process) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
        if proc.returncode is None:
            await proc.kill()


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
