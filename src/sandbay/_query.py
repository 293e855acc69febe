"""One prompt through the Agent SDK's own control protocol, over a given transport.

This is what ``claude_agent_sdk.query(prompt=..., options=..., transport=...)`` does, step for
step (``InternalClient.process_query`` of the SDK releases in
`sandbay._transport.CHECKED_SDK_VERSIONS`), except that it yields each message as the raw
stream-json dict the CLI wrote, before parsing: `run_agent` needs the dict (for ``--json``)
and the relay's sequence number of each message (for run handles), and parses the dict
itself with the SDK's own parser. Hooks, ``can_use_tool``, SDK MCP servers and the session
store mirror are the SDK's own code, set up as ``query()`` sets them up.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
from claude_agent_sdk import ClaudeAgentOptions, SessionStoreEntry, Transport
from claude_agent_sdk import __version__ as sdk_version
from claude_agent_sdk._internal.query import Query, run_end_ceiling_ms, stamp_user_message
from claude_agent_sdk._internal.session_resume import build_mirror_batcher
from claude_agent_sdk._internal.session_store_validation import validate_session_store_options
from claude_agent_sdk._internal.transcript_mirror_batcher import TranscriptMirrorBatcher
from claude_agent_sdk.types import _configure_can_use_tool, _hooks_to_internal_format
from typing_extensions import override

from ._errors import ConfigError

__all__ = ["command_line_shape", "handshake_shape", "make_query", "raw_query", "rebind"]


@dataclasses.dataclass
class _SandboxMirrorBatcher(TranscriptMirrorBatcher):
    """The SDK's transcript mirror, for a CLI whose config directory is in a sandbox.

    The SDK keys each transcript file by its path under the host's config directory; the
    CLI in a sandbox writes under its own (its ``$HOME/.claude`` there, or its
    ``CLAUDE_CONFIG_DIR``). The first mirrored path names that directory: keys are taken
    relative to it from then on.
    """

    _located: bool = False
    #: ``(old, new)``: transcripts under the CLI's project folder ``old`` are kept under
    #: the project key ``new`` (see `sandbay._session.store_project_key`).
    rename_project: tuple[str, str] | None = None

    @override
    def enqueue(self, file_path: str, entries: list[SessionStoreEntry]) -> None:
        if self.rename_project is not None:
            old, new = self.rename_project
            file_path = file_path.replace(f"/projects/{old}/", f"/projects/{new}/", 1)
        if not self._located:
            self._located = True
            cut = file_path.rfind("/projects/")
            if cut != -1:
                self.projects_dir = file_path[: cut + len("/projects")]
        super().enqueue(file_path, entries)


async def raw_query(
    prompt: str,
    options: ClaudeAgentOptions,
    transport: Transport,
    *,
    abort: Callable[[], Awaitable[None]] | None = None,
    query: Query | None = None,
) -> AsyncGenerator[dict[str, Any], None]:
    """Run ``prompt`` over ``transport`` as ``query()`` would; yield the raw messages.

    The transport is connected here (a connected one is used as it is) and closed when the
    generator ends or is closed. ``abort``, if given, is awaited first when the generator is
    left by an exception (a cancellation, a deadline): it stops the CLI at once, where
    closing the transport would give it time to finish. ``query``, if given, is a `Query` over
    ``transport`` whose initialize handshake was done ahead of time (a warm pool's) with
    callbacks of the same `handshake_shape` as ``options``'; it gets ``options``' callbacks
    (`rebind`) and the prompt goes straight to the CLI.

    Raises:
        Whatever the transport raises reading (its `AgentError` / `ProtocolError` as they
        are), and the SDK's own errors (a control request that failed or timed out).
    """
    validate_session_store_options(options)
    configured = _configure_can_use_tool(options)
    user_message = {
        "type": "user",
        "session_id": "",
        "message": {"role": "user", "content": prompt},
        "parent_tool_use_id": None,
    }
    line = json.dumps(stamp_user_message(user_message, configured.verbatim_prompts)) + "\n"
    prepared = query is not None and query._initialized
    if query is None:
        await transport.connect()
        # The prompt follows the initialize request at once rather than after its answer:
        # the CLI reads its input in order, so it still handles the request (hooks
        # registered, agents set) first, and a cold start saves a round trip through the
        # sandbox. The answer is still awaited, and its errors raised, by `initialize`.
        query = make_query(configured, _PromptAfterFirstWrite(transport, line))
    else:
        rebind(query, configured)
    try:
        if not prepared:
            await query.start()
            await query.initialize()
        if not isinstance(query.transport, _PromptAfterFirstWrite):
            await transport.write(line)
        query.spawn_task(query.wait_for_result_and_end_input())
        async for data in query.receive_messages():
            yield data
    except BaseException:
        if abort is not None:
            with anyio.CancelScope(shield=True):
                await abort()
        raise
    finally:
        await query.close()
        query.close_receive_stream()


class _PromptAfterFirstWrite(Transport):
    """``transport`` as it is, except that its first write (the SDK's initialize request) is
    followed at once by ``prompt``, the user's message."""

    def __init__(self, transport: Transport, prompt: str) -> None:
        self.inner = transport
        self.prompt: str | None = prompt

    @override
    async def connect(self) -> None:
        await self.inner.connect()

    @override
    async def write(self, data: str) -> None:
        await self.inner.write(data)
        if self.prompt is not None:
            prompt, self.prompt = self.prompt, None
            await self.inner.write(prompt)

    @override
    def read_messages(self) -> AsyncIterator[dict[str, Any]]:
        return self.inner.read_messages()

    @override
    async def close(self) -> None:
        await self.inner.close()

    @override
    def is_ready(self) -> bool:
        return self.inner.is_ready()

    @override
    async def end_input(self) -> None:
        await self.inner.end_input()


def make_query(
    configured: ClaudeAgentOptions,
    transport: Transport,
    *,
    rename_project: tuple[str, str] | None = None,
) -> Query:
    """The SDK's `Query` for options over ``transport``, set up as ``query()`` sets it up.

    ``configured``: the options, through the SDK's ``_configure_can_use_tool``. Not started:
    call ``start()`` and ``initialize()`` (the handshake) on it. ``rename_project``: see
    `_SandboxMirrorBatcher`.
    """
    servers = configured.mcp_servers if isinstance(configured.mcp_servers, dict) else {}
    sdk_mcp_servers = {
        name: config["instance"]  # type: ignore[typeddict-item]
        for name, config in servers.items()
        if isinstance(config, dict) and config.get("type") == "sdk"
    }
    exclude_dynamic_sections: bool | None = None
    system_prompt_snapshot: bool | None = None
    sp = configured.system_prompt
    if isinstance(sp, dict) and sp.get("type") == "preset":
        eds = sp.get("exclude_dynamic_sections")
        if isinstance(eds, bool):
            exclude_dynamic_sections = eds
    if isinstance(sp, dict) and sp.get("type") in ("preset", "custom"):
        snapshot = sp.get("snapshot")
        if isinstance(snapshot, bool):
            system_prompt_snapshot = snapshot
    agents = None
    if configured.agents:
        agents = {
            name: {k: v for k, v in dataclasses.asdict(agent).items() if v is not None}
            for name, agent in configured.agents.items()
        }
    timeout_ms = int(os.environ.get("CLAUDE_CODE_STREAM_CLOSE_TIMEOUT", "60000"))
    query = Query(
        transport=transport,
        is_streaming_mode=True,
        can_use_tool=configured.can_use_tool,
        hooks=_hooks_to_internal_format(configured.hooks) if configured.hooks else None,
        sdk_mcp_servers=sdk_mcp_servers,
        initialize_timeout=max(timeout_ms / 1000.0, 60.0),
        agents=agents,
        exclude_dynamic_sections=exclude_dynamic_sections,
        system_prompt_snapshot=system_prompt_snapshot,
        skills=configured.skills,
        forward_subagent_text=configured.forward_subagent_text,
        verbatim_prompts=configured.verbatim_prompts,
        run_end_ceiling_ms=run_end_ceiling_ms(configured.env),
    )
    if configured.session_store is not None:
        _attach_mirror(query, configured, rename_project)
    return query


def _attach_mirror(
    query: Query, configured: ClaudeAgentOptions, rename_project: tuple[str, str] | None
) -> None:
    """Mirror the CLI's transcripts to ``configured.session_store`` (set), as ``query()`` does."""
    assert configured.session_store is not None

    async def on_mirror_error(key: Any, error: str) -> None:
        query.report_mirror_error(key, error)

    built = build_mirror_batcher(
        store=configured.session_store,
        materialized=None,
        env=configured.env,
        on_error=on_mirror_error,
        flush_mode=configured.session_store_flush,
    )
    query.set_transcript_mirror_batcher(
        _SandboxMirrorBatcher(
            store=built.store,
            projects_dir=built.projects_dir,
            on_error=built.on_error,
            max_pending_entries=built.max_pending_entries,
            max_pending_bytes=built.max_pending_bytes,
            rename_project=rename_project,
        )
    )


def _hook_matchers(options: ClaudeAgentOptions) -> list[tuple[str, dict[str, Any]]]:
    """The hook matchers the initialize handshake registers, in its order (events with none
    are left out, as the SDK leaves them out)."""
    internal = _hooks_to_internal_format(options.hooks) if options.hooks else {}
    return [(event, m) for event, matchers in internal.items() if matchers for m in matchers]


def command_line_shape(options: ClaudeAgentOptions) -> tuple[bool, bool]:
    """What of ``options``' callbacks shows in the CLI's command line.

    ``--permission-prompt-tool stdio`` for a ``can_use_tool``, ``--session-mirror`` for a
    session store: a started CLI serves callbacks only with these the same.
    """
    return options.can_use_tool is not None, options.session_store is not None


def handshake_shape(options: ClaudeAgentOptions) -> tuple[object, ...]:
    """What of ``options``, beyond their data, the CLI's command line and handshake fix.

    The initialize handshake registers each hook callback by an id (``hook_0``, … in order)
    with its event, matcher, timeout and ``on_failure``; the callable itself is looked up by
    id when the CLI calls it. The command line has `command_line_shape`. The CLI lists an SDK
    MCP server's tools from the instance it talked to first. So a CLI started and
    initialized for options of one shape serves options of the same shape (and the same
    data) with their own callbacks (`rebind`); for any other shape it must be started anew.
    """
    hooks = tuple(
        (event, m.get("matcher"), len(m.get("hooks", [])), m.get("timeout"), m.get("on_failure"))
        for event, m in _hook_matchers(options)
    )
    servers = options.mcp_servers if isinstance(options.mcp_servers, dict) else {}
    sdk_servers = tuple(
        sorted(
            (name, id(config.get("instance")))
            for name, config in servers.items()
            if isinstance(config, dict) and config.get("type") == "sdk"
        )
    )
    return hooks, command_line_shape(options), sdk_servers


def rebind(
    query: Query,
    configured: ClaudeAgentOptions,
    *,
    rename_project: tuple[str, str] | None = None,
) -> None:
    """Give a started `Query` the callbacks of ``configured`` in place of its own.

    ``configured`` (options through ``_configure_can_use_tool``) have the `handshake_shape`
    of those ``query`` was made with. Hook callbacks are registered under the ids the
    handshake gave their places; ``can_use_tool`` and the session store's mirror are
    replaced; the SDK MCP servers are the same instances.

    Raises:
        ConfigError: The query's registered callbacks do not line up with the hooks (an
            SDK that numbers them otherwise than the releases sandbay was checked with).
    """
    callbacks: dict[str, Any] = {}
    for _, matcher in _hook_matchers(configured):
        for callback in matcher.get("hooks", []):
            callbacks[f"hook_{len(callbacks)}"] = callback
    if callbacks.keys() != query.hook_callbacks.keys():
        raise ConfigError(
            f"claude-agent-sdk {sdk_version} registered hook callbacks "
            f"{sorted(query.hook_callbacks)} where sandbay expected {sorted(callbacks)}; "
            "a CLI initialized ahead of time cannot take these hooks"
        )
    query.hooks = _hooks_to_internal_format(configured.hooks) if configured.hooks else {}
    query.hook_callbacks = callbacks
    query.can_use_tool = configured.can_use_tool
    if configured.session_store is None:
        query._transcript_mirror_batcher = None
    else:
        _attach_mirror(query, configured, rename_project)
