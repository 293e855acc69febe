"""`AgentSession`: a live ``claude`` CLI in a sandbox, held across turns.

The Agent SDK's `ClaudeSDKClient` runs here, on the host, over a `SandboxTransport`; the
CLI runs in the sandbox. Each session has its own working directory and its own
``CLAUDE_CONFIG_DIR`` in the sandbox, so several sessions can share one sandbox (the
multi-agent pattern) without seeing each other's transcripts or settings::

    async with sandbay.AgentSession(provider="docker", options=options) as session:
        await session.query("first task")
        async for message in session.receive_response():
            ...
        await session.query("follow-up")
        ...

With ``options.session_store`` set, the CLI mirrors its transcript to that store on the
host (the SDK's own mirror, as with a local CLI). With ``options.resume`` as well, the
stored transcript is first written into the new sandbox's config directory, where the CLI's
``--resume`` finds it: the SDK does that only for its own local CLI, never for a custom
transport. Store keys do not depend on where the sandbox keeps its workspace on the host:
a session's project is its working directory as the sandbox's spec names it, so a session
mirrored from one sandbox resumes in another.
"""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any, cast

import anyio
from claude_agent_sdk import (
    ClaudeAgentOptions,
    ClaudeSDKClient,
    Message,
    ResultMessage,
    SessionKey,
    SessionStore,
    SystemMessage,
    project_key_for_directory,
)
from claude_agent_sdk._internal.query import Query
from claude_agent_sdk.types import (
    ContextUsageResponse,
    McpStatusResponse,
    PermissionMode,
    _configure_can_use_tool,
)
from typing_extensions import Self, override

from ._agent import Lease, LeaseSource, options_to_wire
from ._api import ProviderArg, create_sandbox
from ._errors import ConfigError, SandboxError, SandboxTimeoutError
from ._query import make_query, rebind
from ._sandbox import CLOSE_TIMEOUT, Sandbox, SandboxSpec
from ._transport import CLOSE_GRACE_S, SandboxTransport, check_tenant, tenant_options

__all__ = ["AgentSession"]

#: Seconds an interrupted turn gets to end with its result once its deadline passed.
INTERRUPT_GRACE_S = 10.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")


class AgentSession:
    """A long-running agent session: one ``claude`` CLI in a sandbox, many turns.

    Use it as an async context manager. Inside, it offers what `ClaudeSDKClient` offers
    locally (`query`, `receive_response`, `receive_messages`, `interrupt`, `set_model`,
    `set_permission_mode`, `get_server_info`, `get_mcp_status`, `get_context_usage`,
    `reconnect_mcp_server`, `toggle_mcp_server`, `rewind_files`, `stop_task`; entering and
    leaving the block are its ``connect`` and ``disconnect``), with the SDK (hooks,
    ``can_use_tool``, SDK MCP servers, the session-store mirror) on the host and the CLI
    with its tools in the sandbox. On exit the CLI is stopped, and a sandbox the session
    created is removed; a sandbox it was given stays open, with the session's files in it.

    Args:
        sandbox: An open sandbox to run in. Several sessions may share one.
        provider: Otherwise, where to create a sandbox for this session (a provider name,
            a config, or ``None`` for the config file / environment; see
            `sandbay.create_sandbox`). Give ``sandbox``, ``provider`` or ``pool``, one.
        pool: Or take a warm sandbox from this `SandboxPool`; the session owns it and
            removes it on exit. From a pool made with agent options, the session starts with
            the pool's CLI already running (and, by default, its handshake done): it runs
            in the pool's working directory with the pool's config directory, its options'
            data must be the pool's (or all defaults), ``resume`` is not possible, and
            callbacks of another shape than the pool's get a CLI started anew (see
            `SandboxPool`). From a pool without options, only the sandbox is warm and the
            session is what it is with ``sandbox``.
        spec: The spec of a sandbox the session creates.
        options: The SDK's options. ``cwd`` is the session's working directory in the
            sandbox (relative to its workdir; default the workdir), created if missing.
            ``env["CLAUDE_CONFIG_DIR"]``, if set, is its config directory in the
            sandbox (default one of its own under ``sandbox.agent_dir``). With
            ``session_store``, transcripts reach the store; with ``resume`` (or
            ``continue_conversation``) as well, the stored session is resumed.
        env: Variables for the CLI on top of ``options.env`` and the forwarded auth and
            endpoint variables (see `SandboxTransport`).
        name: Names the session's directory in the sandbox (default random): letters,
            digits, ``_``, ``.``, ``-``.
        tenant: Isolate the session as this tenant's, as ``run_agent(tenant=...)`` does:
            ``cwd`` and ``CLAUDE_CONFIG_DIR`` are the tenant's own (a relative ``cwd`` is
            taken inside its working directory). Not with a resume from ``session_store``.
        turn_timeout: Wall-clock seconds from `query` to the turn's result. When it
            passes, `receive_response` interrupts the turn, lets it end, and raises
            `SandboxTimeoutError`; the session stays usable. ``None``: no deadline.

    Attributes:
        sandbox: The sandbox, once entered.
        name: The session's name in the sandbox.
        cwd: The CLI's working directory in the sandbox, once entered.
        config_dir: The CLI's ``CLAUDE_CONFIG_DIR`` in the sandbox, once entered.
        session_id: The CLI's session id: the resumed one, then what the CLI reports.
        transport: The `SandboxTransport` the client runs over, once entered.
        client: The `ClaudeSDKClient`, once entered, for what this class does not wrap.
    """

    def __init__(
        self,
        *,
        sandbox: Sandbox | None = None,
        provider: ProviderArg = None,
        spec: SandboxSpec | None = None,
        pool: LeaseSource | None = None,
        options: ClaudeAgentOptions | None = None,
        env: Mapping[str, str] | None = None,
        name: str | None = None,
        turn_timeout: float | None = None,
        tenant: str | None = None,
    ) -> None:
        check_tenant(tenant)
        self.tenant = tenant
        if sandbox is not None and (provider is not None or spec is not None):
            raise ConfigError("AgentSession: give sandbox, or provider and spec, not both")
        if pool is not None and (sandbox is not None or provider is not None or spec is not None):
            raise ConfigError("AgentSession: give pool, or sandbox, or provider and spec; one")
        if pool is not None:
            pool.check_options(options_to_wire(options))
        if name is not None and not _NAME.match(name):
            raise ConfigError(
                f"AgentSession name {name!r}: use 1 to 64 letters, digits, '_', '.' or '-'"
            )
        if turn_timeout is not None and not (turn_timeout > 0 and math.isfinite(turn_timeout)):
            raise ConfigError(f"turn_timeout must be a positive number, got {turn_timeout!r}")
        self._given = sandbox
        self._provider = provider
        self._spec = spec
        self._pool = pool
        self._given_options = options
        self.options = options if options is not None else ClaudeAgentOptions()
        self._env = dict(env or {})
        self.name = name or uuid.uuid4().hex[:16]
        self.turn_timeout = turn_timeout
        self.sandbox: Sandbox | None = sandbox
        self.cwd: str | None = None
        self.config_dir: str | None = None
        self.session_id: str | None = None
        self.transport: SandboxTransport | None = None
        self.client: ClaudeSDKClient | None = None
        self._owned: Sandbox | None = None
        self._deadline = math.inf
        self._entered = False
        self._closed = False

    # -- life cycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        """Open the sandbox (unless given), prepare the session's directories, start the CLI.

        Raises:
            ConfigError: Invalid options, or options the sandbox refuses (see
                `SandboxTransport.connect`).
            AgentError: The CLI could not start.
            SandboxError: The sandbox could not be created or written to.
            RuntimeError: The session store failed while a resume was loaded from it.
        """
        if self._entered:
            raise ConfigError("an AgentSession can be entered once; make a new one")
        self._entered = True
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _start(self) -> None:
        if self._pool is not None:
            lease = await self._pool.acquire()
            self._owned = self.sandbox = lease.sandbox
            if lease.prepared:
                await self._start_pooled(lease)
                return
            await lease.kill()  # nothing runs in it yet; the session starts its own CLI
        elif self._given is None:
            self._owned = await create_sandbox(self._provider, self._spec)
            self.sandbox = self._owned
        sandbox = self.sandbox
        assert sandbox is not None
        options = self.options
        if options.session_store is not None and options.enable_file_checkpointing:
            raise ConfigError(
                "session_store cannot be combined with enable_file_checkpointing "
                "(checkpoints stay on the sandbox's disk)"
            )
        if self.tenant is not None:
            # The tenant's own directories, made where the sandbox keeps them apart (by the
            # relay, as the tenant's user, where it has one).
            if options.session_store is not None and (
                options.resume is not None or options.continue_conversation
            ):
                raise ConfigError(
                    "AgentSession: resuming from a session_store is not supported with a "
                    "tenant yet; resume the tenant's session in its sandbox instead"
                )
            tenant_env = dict(options.env)
            options, cwd = tenant_options(sandbox, options, self.tenant, tenant_env)
            options = dataclasses.replace(options, env=tenant_env)
            config_dir = tenant_env["CLAUDE_CONFIG_DIR"]
        else:
            cwd = sandbox.resolve(str(options.cwd)) if options.cwd else sandbox.workdir
            cwd = posixpath.normpath(cwd)
            configured = options.env.get("CLAUDE_CONFIG_DIR")
            config_dir = posixpath.normpath(
                sandbox.resolve(configured)
                if configured
                else f"{sandbox.agent_dir}/sessions/{self.name}/claude"
            )
        self.cwd, self.config_dir = cwd, config_dir
        if self.tenant is None:
            async with anyio.create_task_group() as tg:
                tg.start_soon(sandbox.make_dir, cwd)
                tg.start_soon(sandbox.make_dir, config_dir)
        # The CLI names its project folder after its cwd; the store gets a name that does
        # not depend on where this sandbox keeps its workspace (see `store_project_key`).
        cli_key = project_key_for_directory(cwd)
        store_key = store_project_key(sandbox, cwd)
        resume = options.resume
        store = options.session_store
        if store is not None and (resume is not None or options.continue_conversation):
            resumed = await _materialize(
                sandbox,
                store,
                store_key=store_key,
                projects_dir=f"{config_dir}/projects/{cli_key}",
                resume=resume,
                timeout_s=options.load_timeout_ms / 1000,
            )
            if resumed is not None:
                resume = resumed
        options = dataclasses.replace(
            options,
            cwd=cwd,
            env={**options.env, "CLAUDE_CONFIG_DIR": config_dir},
            resume=resume,
            continue_conversation=options.continue_conversation and resume is None,
        )
        self.session_id = resume
        rename = None
        if store is not None and store_key != cli_key:
            rename = (f"{config_dir}/projects/{cli_key}/", f"{config_dir}/projects/{store_key}/")
        self.transport = _SessionTransport(
            sandbox,
            options,
            env=self._env,
            run_id=f"session-{self.name}",
            rename=rename,
            tenant=self.tenant,
        )
        self.client = ClaudeSDKClient(options, transport=self.transport)
        await self.client.connect()

    async def _start_pooled(self, lease: Lease) -> None:
        """Run over the CLI a warm pool started (and initialized) with its options."""
        try:
            transport, query = await lease.adopt(self._given_options, env=self._env)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await lease.kill()
            raise
        sandbox = lease.sandbox
        options = transport.options
        if options.session_store is not None and (
            options.resume is not None or options.continue_conversation
        ):
            with anyio.CancelScope(shield=True):
                await lease.kill()
            raise ConfigError(
                "a session from a warm pool cannot resume from a session store (the stored "
                "transcript must be in the sandbox before its CLI starts): give sandbox= or "
                "provider= instead"
            )
        self.options = options
        self.cwd = posixpath.normpath(
            sandbox.resolve(str(options.cwd)) if options.cwd else sandbox.workdir
        )
        configured = options.env.get("CLAUDE_CONFIG_DIR")
        self.config_dir = posixpath.normpath(sandbox.resolve(configured)) if configured else None
        self.session_id = options.resume
        cli_key = project_key_for_directory(self.cwd)
        store_key = store_project_key(sandbox, self.cwd)
        self.transport = transport
        self.client = _PooledClient(
            options,
            transport,
            query=query,
            rename=(cli_key, store_key) if store_key != cli_key else None,
        )
        await self.client.connect()

    async def aclose(self) -> None:
        """Stop the CLI and remove a sandbox the session created. Idempotent, bounded."""
        if self._closed:
            return
        self._closed = True
        client, self.client = self.client, None
        with anyio.CancelScope(shield=True):
            if client is not None:
                with anyio.move_on_after(CLOSE_GRACE_S + 2 * CLOSE_TIMEOUT):
                    await client.disconnect()
            if self.transport is not None:
                await self.transport.close()  # idempotent: kills what disconnect left
            if self._owned is not None:
                await self._owned.aclose()

    # -- turns ------------------------------------------------------------------------------

    def _live(self) -> ClaudeSDKClient:
        if self.client is None:
            raise SandboxError(
                "the session is not running: use it inside `async with AgentSession(...)`",
                provider=self.sandbox.provider if self.sandbox else None,
                sandbox_id=self.sandbox.id if self.sandbox else None,
            )
        return self.client

    async def query(self, prompt: str) -> None:
        """Send the next user turn; read its messages with `receive_response`.

        Starts the turn's deadline (``turn_timeout``).
        """
        client = self._live()
        if self.turn_timeout is not None:
            self._deadline = anyio.current_time() + self.turn_timeout
        await client.query(prompt)

    async def receive_response(self) -> AsyncGenerator[Message, None]:
        """The turn's messages, as they come, up to and including its `ResultMessage`.

        Raises:
            SandboxTimeoutError: The turn passed ``turn_timeout``: it was interrupted and
                ended (its remaining messages were read and dropped).
            AgentError: The CLI failed.
        """
        client = self._live()
        # An async generator (typed as an iterator): closed here however the turn ends.
        messages = cast(AsyncGenerator[Message, None], client.receive_response())
        try:
            while True:
                with anyio.CancelScope(deadline=self._deadline) as scope:
                    try:
                        message = await messages.__anext__()
                    except StopAsyncIteration:
                        return
                if scope.cancelled_caught:
                    raise await self._timed_out(client)
                self._note(message)
                yield message
                if isinstance(message, ResultMessage):
                    self._deadline = math.inf
                    return
        finally:
            await messages.aclose()

    async def receive_messages(self) -> AsyncIterator[Message]:
        """Every message of the session, across turns, with no deadline."""
        async for message in self._live().receive_messages():
            self._note(message)
            yield message

    async def _timed_out(self, client: ClaudeSDKClient) -> SandboxTimeoutError:
        """Interrupt the overdue turn and read it to its end, so the next turn starts clean."""
        self._deadline = math.inf
        with anyio.move_on_after(INTERRUPT_GRACE_S):
            await client.interrupt()
            async for message in client.receive_response():
                self._note(message)
        sandbox = self.sandbox
        return SandboxTimeoutError(
            f"the session's turn passed its {self.turn_timeout:g} s deadline and was "
            "interrupted; the session can take another turn",
            provider=sandbox.provider if sandbox else None,
            sandbox_id=sandbox.id if sandbox else None,
        )

    def _note(self, message: Message) -> None:
        if isinstance(message, ResultMessage):
            self.session_id = message.session_id
        elif isinstance(message, SystemMessage) and message.subtype == "init":
            session_id = message.data.get("session_id")
            if isinstance(session_id, str):
                self.session_id = session_id

    async def interrupt(self) -> None:
        """Interrupt the running turn; it ends with a `ResultMessage`, the session goes on."""
        await self._live().interrupt()

    async def set_model(self, model: str | None = None) -> None:
        """Use ``model`` from the next request on (``None``: the default)."""
        await self._live().set_model(model)

    async def set_permission_mode(self, mode: PermissionMode) -> None:
        """Change the permission mode for what follows (see `ClaudeSDKClient`)."""
        await self._live().set_permission_mode(mode)

    async def get_server_info(self) -> dict[str, Any] | None:
        """What the CLI answered the SDK's initialize handshake with (commands, models, …)."""
        return await self._live().get_server_info()

    async def get_mcp_status(self) -> McpStatusResponse:
        """The MCP servers the CLI knows and how each is (SDK MCP servers run on the host)."""
        return await self._live().get_mcp_status()

    async def get_context_usage(self) -> ContextUsageResponse:
        """How the conversation's context window is used, by category."""
        return await self._live().get_context_usage()

    async def reconnect_mcp_server(self, server_name: str) -> None:
        """Reconnect the MCP server ``server_name`` (one that failed, say)."""
        await self._live().reconnect_mcp_server(server_name)

    async def toggle_mcp_server(self, server_name: str, enabled: bool) -> None:
        """Enable or disable the MCP server ``server_name`` for what follows."""
        await self._live().toggle_mcp_server(server_name, enabled)

    async def rewind_files(self, user_message_id: str) -> None:
        """Put the sandbox's files the agent changed back as they were at that user message.

        Needs ``options.enable_file_checkpointing`` (the checkpoints stay in the sandbox) and,
        to see user messages' ids, ``extra_args={"replay-user-messages": None}``.
        """
        await self._live().rewind_files(user_message_id)

    async def stop_task(self, task_id: str) -> None:
        """Stop a background task (its id from the ``task_started`` system message)."""
        await self._live().stop_task(task_id)


def store_project_key(sandbox: Sandbox, cwd: str) -> str:
    """The ``project_key`` under which a session working in ``cwd`` is kept in a store.

    The CLI names it after its real working directory. Where a sandbox keeps its
    workspace elsewhere than its spec says (the unisolated local provider: a folder on the
    host), the path is taken as the spec names it, so the key is the same in every
    sandbox with that spec.
    """
    workdir = posixpath.normpath(sandbox.workdir)
    named = posixpath.normpath(sandbox.spec.workdir)
    if workdir != named and (cwd == workdir or cwd.startswith(workdir + "/")):
        cwd = named + cwd[len(workdir) :]
    return project_key_for_directory(cwd)


class _PooledClient(ClaudeSDKClient):
    """`ClaudeSDKClient` over a pooled CLI: its `Query` made by sandbay's `make_query` (whose
    mirror finds the CLI's config directory in the sandbox by itself), or the pool's own
    with its handshake done, given the session's callbacks (`rebind`)."""

    def __init__(
        self,
        options: ClaudeAgentOptions,
        transport: SandboxTransport,
        *,
        query: Query | None,
        rename: tuple[str, str] | None,
    ) -> None:
        super().__init__(options, transport=transport)
        self._sandbay_transport = transport
        self._prepared = query
        self._rename = rename

    @override
    async def _connect_inner(self, prompt: Any, actual_prompt: Any) -> None:
        configured = _configure_can_use_tool(self.options)
        self._verbatim_prompts = self.options.verbatim_prompts
        self._transport = transport = self._sandbay_transport
        await transport.connect()
        query, self._prepared = self._prepared, None
        if query is not None and query._initialized:
            self._query = query  # closed by disconnect, however what follows ends
            rebind(query, configured, rename_project=self._rename)
            return
        self._query = make_query(configured, transport, rename_project=self._rename)
        await self._query.start()
        await self._query.initialize()


class _SessionTransport(SandboxTransport):
    """The transport with transcript-mirror paths renamed to the store's project key."""

    def __init__(
        self,
        sandbox: Sandbox,
        options: ClaudeAgentOptions,
        *,
        env: Mapping[str, str],
        run_id: str,
        rename: tuple[str, str] | None,
        tenant: str | None = None,
    ) -> None:
        super().__init__(sandbox, options, env=env, run_id=run_id, tenant=tenant)
        self._rename = rename

    @override
    def read_messages(self) -> AsyncIterator[dict[str, Any]]:
        messages = super().read_messages()
        return messages if self._rename is None else self._renamed(messages, *self._rename)

    @staticmethod
    async def _renamed(
        messages: AsyncIterator[dict[str, Any]], old: str, new: str
    ) -> AsyncGenerator[dict[str, Any], None]:
        async for message in messages:
            path = message.get("filePath")
            if (
                message.get("type") == "transcript_mirror"
                and isinstance(path, str)
                and path.startswith(old)
            ):
                message = {**message, "filePath": new + path[len(old) :]}
            yield message


async def _materialize(
    sandbox: Sandbox,
    store: SessionStore,
    *,
    store_key: str,
    projects_dir: str,
    resume: str | None,
    timeout_s: float,
) -> str | None:
    """Write a stored session into the sandbox where the CLI's ``--resume`` looks for it.

    ``resume`` names the session; ``None`` takes the store's most recent main session (for
    ``continue_conversation``). Returns its id, or ``None`` when the store has nothing to
    resume (the CLI then gets the options unchanged, as the SDK does locally).
    """

    async def bounded(what: str, call: Any) -> Any:
        try:
            with anyio.fail_after(timeout_s):
                return await call
        except TimeoutError:
            raise RuntimeError(
                f"SessionStore.{what} timed out after {timeout_s:g} s while the session was "
                "loaded for resume"
            ) from None
        except Exception as exc:
            raise RuntimeError(
                f"SessionStore.{what} failed while the session was loaded for resume: {exc}"
            ) from exc

    if resume is not None:
        if not _UUID.match(resume):
            return None  # not a session id: the CLI decides what to make of it
        candidates = [resume]
    else:
        listed = await bounded("list_sessions()", store.list_sessions(store_key))
        listed = sorted(listed, key=lambda s: s["mtime"], reverse=True)
        candidates = [s["session_id"] for s in listed if _UUID.match(s["session_id"])]
    for session_id in candidates:
        key: SessionKey = {"project_key": store_key, "session_id": session_id}
        entries = await bounded("load()", store.load(key))
        if not entries:
            continue
        first = entries[0]
        if resume is None and isinstance(first, dict) and first.get("isSidechain") is True:
            continue  # a subagent's transcript, not a conversation to continue
        await sandbox.write_file(f"{projects_dir}/{session_id}.jsonl", _jsonl(entries), mode=0o600)
        if _implements(store, "list_subkeys"):
            subkeys = await bounded("list_subkeys()", store.list_subkeys(key))
            for subpath in subkeys:
                if not _safe_subpath(subpath):
                    continue  # from the store: never a path out of the session's folder
                sub: SessionKey = {**key, "subpath": subpath}
                sub_entries = await bounded("load()", store.load(sub))
                transcript = [
                    e
                    for e in sub_entries or []
                    if not (isinstance(e, dict) and e.get("type") == "agent_metadata")
                ]
                if transcript:
                    await sandbox.write_file(
                        f"{projects_dir}/{session_id}/{subpath}.jsonl",
                        _jsonl(transcript),
                        mode=0o600,
                    )
        return session_id
    return None


def _jsonl(entries: list[Any]) -> bytes:
    return "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries).encode()


def _implements(store: SessionStore, method: str) -> bool:
    """Whether ``store`` has its own ``method`` (the protocol's default raises)."""
    return getattr(type(store), method, None) is not getattr(SessionStore, method, None)


def _safe_subpath(subpath: object) -> bool:
    if not isinstance(subpath, str) or not subpath or "\x00" in subpath:
        return False
    parts = subpath.split("/")
    return not subpath.startswith("/") and all(p not in ("", ".", "..") for p in parts)
