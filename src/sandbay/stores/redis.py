"""`RedisSessionStore`: session transcripts in Redis (``pip install "sandbay[redis]"``).

Layout, with ``P`` the prefix, ``{pk}`` the project key as a hash tag (every key of a
project lands in one Redis Cluster slot) and each part percent-encoded so ``:`` only
separates::

    P{pk}:sessions        sorted set  session_id -> mtime (epoch ms) of its main transcript
    P{pk}:<sid>:t:        list        the main transcript, one JSON text per line
    P{pk}:<sid>:t:<sub>   list        a subagent transcript
    P{pk}:<sid>:u:<sub>   set         the uuids already in that transcript (idempotency)
    P{pk}:<sid>:s         sorted set  subpath -> mtime of each subagent transcript
    P{pk}:<sid>:m         hash        the session's summary: data (JSON), mtime

An append runs as one Lua script (lines, uuids, index and mtime from the server's clock
together); for a main transcript it also writes the summary, in a ``WATCH``/``MULTI``
transaction on the summary so concurrent appends fold in turn. Uses `redis.asyncio`, so it
needs anyio's asyncio backend.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

from claude_agent_sdk import (
    SessionKey,
    SessionListSubkeysKey,
    SessionStore,
    SessionStoreEntry,
    SessionStoreListEntry,
    SessionSummaryEntry,
    fold_session_summary,
)
from pydantic import SecretStr
from typing_extensions import override

from .._errors import ConfigError, ProviderUnavailableError, SandboxError, SandboxTimeoutError
from ._common import (
    DEFAULT_MAX_ENTRY_BYTES,
    DEFAULT_MAX_LOAD_BYTES,
    Key,
    LoadBudget,
    check_key,
    check_limits,
    check_project_key,
    closed,
    decode_entries,
    encode_entries,
    missing_dependency,
)

if TYPE_CHECKING:
    import redis.asyncio

__all__ = ["RedisSessionStore"]

NAME = "redis"
_WATCH_ATTEMPTS = 20
_PAGE = 500  # lines per LRANGE while loading, so the load budget stops a huge list early

# KEYS: transcript list, uuid set, index zset, summary hash (main only)
# ARGV: index member, summary data JSON ("" for none), then (uuid or "", entry JSON) pairs
_APPEND = """
local t = redis.call('TIME')
local mtime = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prev = redis.call('ZSCORE', KEYS[3], ARGV[1])
if prev and tonumber(prev) >= mtime then mtime = tonumber(prev) + 1 end
for i = 3, #ARGV, 2 do
  if ARGV[i] == '' or redis.call('SADD', KEYS[2], ARGV[i]) == 1 then
    redis.call('RPUSH', KEYS[1], ARGV[i + 1])
  end
end
redis.call('ZADD', KEYS[3], mtime, ARGV[1])
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[4], 'data', ARGV[2], 'mtime', mtime)
end
return mtime
"""


def _part(value: str) -> str:
    return quote(value, safe="")


def map_redis_error(exc: BaseException, *, url: str) -> SandboxError:
    """Turn an exception of redis-py into the matching sandbay error.

    Args:
        exc: What redis-py raised.
        url: The server address without credentials, for messages.
    """
    import redis.exceptions as rex

    if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError):
        return ConfigError(f"Redis at {url} refused the credentials: {exc}", provider=NAME)
    if isinstance(exc, rex.TimeoutError):
        return SandboxTimeoutError(f"Redis at {url} did not answer in time: {exc}", provider=NAME)
    if isinstance(exc, rex.ConnectionError | OSError):
        return ProviderUnavailableError(
            f"cannot reach Redis at {url}: {exc}; is redis-server running?", provider=NAME
        )
    return SandboxError(f"Redis at {url}: {exc}", provider=NAME)


class RedisSessionStore(SessionStore):
    """A `claude_agent_sdk.SessionStore` in Redis.

    Implements every method of the protocol. `load` returns None for a transcript that was
    never written or was emptied (Redis keeps no empty lists). Retention is yours: `delete`
    sessions you no longer need.

    Example::

        store = RedisSessionStore("redis://localhost:6379/0")
        options = ClaudeAgentOptions(session_store=store)
        ...
        await store.aclose()
    """

    def __init__(
        self,
        url: str,
        *,
        password: SecretStr | str | None = None,
        prefix: str = "sandbay:session:",
        socket_timeout: float = 10.0,
        max_connections: int = 16,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        max_load_bytes: int = DEFAULT_MAX_LOAD_BYTES,
    ) -> None:
        """Configure the client; no connection is made before the first call.

        Args:
            url: ``redis://[user@]host:port/db`` (or ``rediss://`` for TLS,
                ``unix:///path``). A password in the URL works but is better passed apart.
            password: The server's password, kept out of messages.
            prefix: Put before every key, so several stores can share a database.
            socket_timeout: Seconds to wait for the server on connect and on each call.
            max_connections: The size of the connection pool.
            max_entry_bytes: `append` refuses an entry larger than this, encoded.
            max_load_bytes: `load` refuses a transcript larger than this.

        Raises:
            MissingDependencyError: redis-py is not installed.
            ConfigError: An argument is out of range or the URL cannot be parsed.
        """
        try:
            import redis.asyncio as aioredis
        except ImportError as exc:
            raise missing_dependency("redis", "redis") from exc
        check_limits(max_entry_bytes=max_entry_bytes, max_load_bytes=max_load_bytes)
        if not socket_timeout > 0 or max_connections < 1:
            raise ConfigError("socket_timeout and max_connections must be positive")
        if "{" in prefix or "}" in prefix:
            raise ConfigError("the Redis key prefix may not hold { or }: they form hash tags")
        secret = password.get_secret_value() if isinstance(password, SecretStr) else password
        try:
            pool = aioredis.ConnectionPool.from_url(
                url,
                password=secret,
                socket_timeout=socket_timeout,
                socket_connect_timeout=socket_timeout,
                max_connections=max_connections,
            )
        except ValueError as exc:
            raise ConfigError(f"bad Redis URL: {exc}", provider=NAME) from exc
        kwargs = pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}"
        self._url = f"{where}/{kwargs.get('db', 0)}"
        self._client: redis.asyncio.Redis = aioredis.Redis.from_pool(pool)  # owns the pool
        self._append_script = self._client.register_script(_APPEND)
        self._prefix = prefix
        self._max_entry_bytes = max_entry_bytes
        self._max_load_bytes = max_load_bytes
        self._closed = False

    # -- plumbing ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _errors(self) -> AsyncIterator[None]:
        import redis.exceptions as rex

        if self._closed:
            raise closed(NAME)
        try:
            yield
        except SandboxError:
            raise
        except (rex.RedisError, OSError) as exc:
            raise map_redis_error(exc, url=self._url) from exc

    def _project(self, project_key: str) -> str:
        return f"{self._prefix}{{{_part(project_key)}}}"

    def _session(self, k: Key) -> str:
        return f"{self._project(k.project_key)}:{_part(k.session_id)}"

    def _keys(self, k: Key) -> tuple[str, str]:
        """The transcript list and its uuid set."""
        session, sub = self._session(k), _part(k.subpath)
        return f"{session}:t:{sub}", f"{session}:u:{sub}"

    # -- the protocol -----------------------------------------------------------------------

    @override
    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        """Append a batch in order; an entry whose ``uuid`` is already stored is skipped.

        Raises:
            ConfigError: A bad key, an entry that is not a JSON object, refused credentials.
            SandboxFileTooLargeError: An entry is larger than ``max_entry_bytes``.
            ProviderUnavailableError: The server cannot be reached.
            SandboxTimeoutError: The server did not answer within ``socket_timeout``.
            SandboxClosedError: After `aclose`.
        """
        import redis.exceptions as rex

        k = check_key(key, store=NAME)
        encoded = encode_entries(entries, max_entry_bytes=self._max_entry_bytes, store=NAME)
        if not encoded:
            return
        pairs: list[str] = []
        for e in encoded:
            pairs += [e.uuid or "", e.text]
        transcript, uuids = self._keys(k)
        session = self._session(k)
        async with self._errors():
            if not k.is_main:
                keys = [transcript, uuids, f"{session}:s"]
                await self._append_script(keys=keys, args=[k.subpath, "", *pairs])
                return
            summary = f"{session}:m"
            keys = [transcript, uuids, f"{self._project(k.project_key)}:sessions", summary]
            for _ in range(_WATCH_ATTEMPTS):
                async with self._client.pipeline(transaction=True) as pipe:
                    try:
                        await pipe.watch(summary)
                        stored = cast(
                            "list[bytes | None]", await pipe.hmget(summary, ["data", "mtime"])
                        )
                        prev: SessionSummaryEntry | None = None
                        if stored[0] is not None and stored[1] is not None:
                            prev = {
                                "session_id": k.session_id,
                                "mtime": int(stored[1]),
                                "data": json.loads(stored[0]),
                            }
                        folded = fold_session_summary(prev, _main_key(k), entries)
                        data = json.dumps(folded["data"], ensure_ascii=False)
                        pipe.multi()  # type: ignore[no-untyped-call]
                        await self._append_script(
                            keys=keys, args=[k.session_id, data, *pairs], client=pipe
                        )
                        await pipe.execute()
                        break
                    except rex.WatchError:
                        continue
            else:
                raise SandboxError(
                    f"the summary of session {k.session_id} changed under {_WATCH_ATTEMPTS} "
                    "appends in a row; try again",
                    provider=NAME,
                )

    @override
    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        """Return a transcript's entries in append order, or None if there are none.

        Raises:
            SandboxFileTooLargeError: The transcript is larger than ``max_load_bytes``.
            ConfigError, ProviderUnavailableError, SandboxTimeoutError, SandboxClosedError:
                As for `append`.
        """
        k = check_key(key, store=NAME)
        transcript, _ = self._keys(k)
        budget = LoadBudget(k, max_load_bytes=self._max_load_bytes, store=NAME)
        out: list[Any] = []
        async with self._errors():
            start = 0
            while True:
                page = cast(
                    "list[bytes]",
                    await self._client.lrange(transcript, start, start + _PAGE - 1),
                )
                out += decode_entries(page, budget)
                if len(page) < _PAGE:
                    break
                start += _PAGE
        return out or None

    @override
    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        """The main transcripts of a project, each with its last write time (epoch ms)."""
        pk = check_project_key(project_key, store=NAME)
        async with self._errors():
            rows = cast(
                "list[tuple[bytes, float]]",
                await self._client.zrange(f"{self._project(pk)}:sessions", 0, -1, withscores=True),
            )
        return [{"session_id": sid.decode(), "mtime": int(score)} for sid, score in rows]

    @override
    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        """The summaries `append` keeps for each main transcript of a project."""
        pk = check_project_key(project_key, store=NAME)
        sessions = await self.list_sessions(pk)
        out: list[SessionSummaryEntry] = []
        async with self._errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for s in sessions:
                    pipe.hmget(f"{self._project(pk)}:{_part(s['session_id'])}:m", ["data", "mtime"])
                rows = cast("list[list[bytes | None]]", await pipe.execute())
        for s, (data, mtime) in zip(sessions, rows, strict=True):
            if data is not None and mtime is not None:
                out.append(
                    {"session_id": s["session_id"], "mtime": int(mtime), "data": json.loads(data)}
                )
        return out

    @override
    async def delete(self, key: SessionKey) -> None:
        """Delete a transcript; a main key also deletes its subkeys and summary."""
        import redis.exceptions as rex

        k = check_key(key, store=NAME)
        session = self._session(k)
        async with self._errors():
            if not k.is_main:
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.delete(*self._keys(k))
                    pipe.zrem(f"{session}:s", k.subpath)
                    await pipe.execute()
                return
            subkeys = f"{session}:s"
            for _ in range(_WATCH_ATTEMPTS):
                async with self._client.pipeline(transaction=True) as pipe:
                    try:
                        await pipe.watch(subkeys)
                        subs = [
                            s.decode()
                            for s in cast("list[bytes]", await pipe.zrange(subkeys, 0, -1))
                        ]
                        names = [*self._keys(k), subkeys, f"{session}:m"]
                        for sub in subs:
                            names += self._keys(k._replace(subpath=sub))
                        pipe.multi()  # type: ignore[no-untyped-call]
                        pipe.delete(*names)
                        pipe.zrem(f"{self._project(k.project_key)}:sessions", k.session_id)
                        await pipe.execute()
                        return
                    except rex.WatchError:
                        continue
            raise SandboxError(
                f"session {k.session_id} kept gaining subagent transcripts while being deleted",
                provider=NAME,
            )

    @override
    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        """The subpaths (subagent transcripts) stored under a session."""
        k = check_key(
            {"project_key": key["project_key"], "session_id": key["session_id"]}, store=NAME
        )
        async with self._errors():
            subs = cast("list[bytes]", await self._client.zrange(f"{self._session(k)}:s", 0, -1))
        return sorted(s.decode() for s in subs)

    async def aclose(self) -> None:
        """Close the connection pool. Idempotent; later calls raise `SandboxClosedError`."""
        if self._closed:
            return
        self._closed = True
        import anyio

        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            await self._client.aclose()

    async def __aenter__(self) -> RedisSessionStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _main_key(k: Key) -> SessionKey:
    return {"project_key": k.project_key, "session_id": k.session_id}
