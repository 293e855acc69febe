"""`PostgresSessionStore`: session transcripts in PostgreSQL (``pip install "sandbay[postgres]"``).

Layout (three tables named from ``table``, created on first use unless told not to)::

    <table>_entries    (id, project_key, session_id, subpath, uuid, entry json)  one row per line
    <table>_keys       (project_key, session_id, subpath, mtime)                one per transcript
    <table>_summaries  (project_key, session_id, mtime, data json)              one per session

``subpath`` is ``''`` for a main transcript. ``id`` (a sequence) orders a transcript's lines and
a partial unique index on ``uuid`` makes a repeated line a no-op. Lines are ``json``, not
``jsonb``: ``json`` keeps the text as written and takes ``\\u0000``, which tool output can hold.
An append is one transaction holding an advisory lock on its session, so concurrent appends
fold the summary in turn; ``mtime`` comes from the server's clock.

Uses psycopg 3's asyncio API with a connection pool, so it needs anyio's asyncio backend.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
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
    import psycopg
    import psycopg_pool
    from psycopg import sql

__all__ = ["PostgresSessionStore"]

NAME = "postgres"
_TABLE = re.compile(r"[a-z_][a-z0-9_]{0,39}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {entries} (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    project_key TEXT NOT NULL,
    session_id TEXT NOT NULL,
    subpath TEXT NOT NULL,
    uuid TEXT,
    entry JSON NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS {entries_uuid}
    ON {entries} (project_key, session_id, subpath, uuid) WHERE uuid IS NOT NULL;
CREATE INDEX IF NOT EXISTS {entries_order} ON {entries} (project_key, session_id, subpath, id);
CREATE TABLE IF NOT EXISTS {keys} (
    project_key TEXT NOT NULL,
    session_id TEXT NOT NULL,
    subpath TEXT NOT NULL,
    mtime BIGINT NOT NULL,
    PRIMARY KEY (project_key, session_id, subpath)
);
CREATE TABLE IF NOT EXISTS {summaries} (
    project_key TEXT NOT NULL,
    session_id TEXT NOT NULL,
    mtime BIGINT NOT NULL,
    data JSON NOT NULL,
    PRIMARY KEY (project_key, session_id)
);
"""


def map_postgres_error(exc: BaseException, *, where: str) -> SandboxError:
    """Turn an exception of psycopg or of its pool into the matching sandbay error.

    Args:
        exc: What psycopg raised.
        where: The server and database without credentials, for messages.
    """
    import psycopg
    import psycopg.errors
    import psycopg_pool

    if isinstance(
        exc, psycopg.errors.InvalidPassword | psycopg.errors.InvalidAuthorizationSpecification
    ):
        return ConfigError(f"PostgreSQL at {where} refused the credentials: {exc}", provider=NAME)
    if isinstance(exc, psycopg.errors.QueryCanceled):
        return SandboxTimeoutError(f"PostgreSQL at {where} cancelled a query: {exc}", provider=NAME)
    if isinstance(exc, TimeoutError):
        return SandboxTimeoutError(f"PostgreSQL at {where} did not answer in time", provider=NAME)
    if isinstance(exc, psycopg_pool.PoolTimeout):
        return SandboxTimeoutError(
            f"no connection to PostgreSQL at {where} came free in time: {exc}", provider=NAME
        )
    if isinstance(exc, psycopg.OperationalError | psycopg_pool.PoolClosed | OSError):
        return ProviderUnavailableError(
            f"cannot reach PostgreSQL at {where}: {exc}; is the server running?", provider=NAME
        )
    return SandboxError(f"PostgreSQL at {where}: {exc}", provider=NAME)


class PostgresSessionStore(SessionStore):
    """A `claude_agent_sdk.SessionStore` in PostgreSQL.

    Implements every method of the protocol. Nothing connects before the first call; the
    first call connects once on its own (so a refused password or an unreachable server
    raises its own error), creates the tables if asked, then opens the pool.

    Example::

        store = PostgresSessionStore("postgresql://app@db:5432/app", password=secret)
        options = ClaudeAgentOptions(session_store=store)
        ...
        await store.aclose()
    """

    def __init__(
        self,
        dsn: str,
        *,
        password: SecretStr | str | None = None,
        table: str = "sandbay_session",
        create_tables: bool = True,
        connect_timeout: float = 10.0,
        max_connections: int = 8,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        max_load_bytes: int = DEFAULT_MAX_LOAD_BYTES,
    ) -> None:
        """Configure the store; no connection is made before the first call.

        Args:
            dsn: A libpq connection string or URI (``postgresql://user@host:port/db``). A
                password in it works but is better passed apart.
            password: The role's password, kept out of messages.
            table: Prefix of the three table names (lower case letters, digits, ``_``).
            create_tables: Create the tables and indexes if they do not exist.
            connect_timeout: Seconds to wait for a connection.
            max_connections: The largest size of the connection pool.
            max_entry_bytes: `append` refuses an entry larger than this, encoded.
            max_load_bytes: `load` refuses a transcript larger than this.

        Raises:
            MissingDependencyError: psycopg or psycopg-pool is not installed.
            ConfigError: An argument is out of range or the DSN cannot be parsed.
        """
        try:
            import psycopg
            import psycopg.conninfo
            import psycopg_pool  # noqa: F401  (checked here, used on first call)
        except ImportError as exc:
            raise missing_dependency("postgres", exc.name or "psycopg") from exc
        check_limits(max_entry_bytes=max_entry_bytes, max_load_bytes=max_load_bytes)
        if not _TABLE.fullmatch(table):
            raise ConfigError(
                f"table must be 1-40 lower case letters, digits or _, got {table!r}",
                provider=NAME,
            )
        if not connect_timeout > 0 or max_connections < 1:
            raise ConfigError("connect_timeout and max_connections must be positive")
        secret = password.get_secret_value() if isinstance(password, SecretStr) else password
        extra: dict[str, Any] = {"connect_timeout": max(1, round(connect_timeout))}
        if secret is not None:
            extra["password"] = secret
        try:
            self._conninfo = psycopg.conninfo.make_conninfo(dsn, **extra)
            parts = psycopg.conninfo.conninfo_to_dict(self._conninfo)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(f"bad PostgreSQL DSN: {exc}", provider=NAME) from exc
        self._where = (
            f"{parts.get('host', 'localhost')}:{parts.get('port', 5432)}/{parts.get('dbname', '')}"
        )
        self._table = table
        self._create_tables = create_tables
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._max_entry_bytes = max_entry_bytes
        self._max_load_bytes = max_load_bytes
        self._pool: psycopg_pool.AsyncConnectionPool[Any] | None = None
        self._opening = anyio.Lock()
        self._closed = False

    # -- plumbing ---------------------------------------------------------------------------

    def _sql(self, text: str) -> sql.Composed:
        from psycopg import sql

        t = self._table
        return sql.SQL(text).format(
            entries=sql.Identifier(f"{t}_entries"),
            entries_uuid=sql.Identifier(f"{t}_entries_uuid"),
            entries_order=sql.Identifier(f"{t}_entries_order"),
            keys=sql.Identifier(f"{t}_keys"),
            summaries=sql.Identifier(f"{t}_summaries"),
        )

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A pooled connection inside a transaction, with errors mapped."""
        import psycopg
        import psycopg_pool

        if self._closed:
            raise closed(NAME)
        try:
            pool = await self._open()
            async with pool.connection(timeout=self._connect_timeout) as conn:
                async with conn.transaction():
                    yield conn
        except SandboxError:
            raise
        except (
            psycopg.Error,
            psycopg_pool.PoolTimeout,
            psycopg_pool.PoolClosed,
            OSError,
            TimeoutError,
        ) as exc:
            raise map_postgres_error(exc, where=self._where) from exc

    async def _open(self) -> psycopg_pool.AsyncConnectionPool[Any]:
        async with self._opening:
            if self._pool is not None:
                return self._pool
            import psycopg
            import psycopg_pool

            # One connection of our own first: its error (refused password, no server) says
            # more than a pool's timeout would.
            with anyio.fail_after(self._connect_timeout + 1):
                conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            async with conn:
                if self._create_tables:
                    async with conn.transaction():
                        # Two stores creating the tables at once would race on the catalog.
                        await conn.execute(
                            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                            (f"sandbay schema {self._table}",),
                        )
                        await conn.execute(self._sql(_SCHEMA))
            pool: psycopg_pool.AsyncConnectionPool[Any] = psycopg_pool.AsyncConnectionPool(
                self._conninfo,
                min_size=1,
                max_size=self._max_connections,
                timeout=self._connect_timeout,
                open=False,
            )
            await pool.open(wait=True, timeout=self._connect_timeout)
            self._pool = pool
            return pool

    # -- the protocol -----------------------------------------------------------------------

    @override
    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        """Append a batch in order; an entry whose ``uuid`` is already stored is skipped.

        Raises:
            ConfigError: A bad key, an entry that is not a JSON object, refused credentials.
            SandboxFileTooLargeError: An entry is larger than ``max_entry_bytes``.
            ProviderUnavailableError: The server cannot be reached.
            SandboxTimeoutError: No pooled connection came free, or a query was cancelled.
            SandboxClosedError: After `aclose`.
        """
        k = check_key(key, store=NAME)
        encoded = encode_entries(entries, max_entry_bytes=self._max_entry_bytes, store=NAME)
        if not encoded:
            return
        async with self._connection() as conn:
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                (json.dumps([self._table, k.project_key, k.session_id]),),
            )
            async with conn.cursor() as cur:
                await cur.executemany(
                    self._sql(
                        "INSERT INTO {entries} (project_key, session_id, subpath, uuid, entry)"
                        " VALUES (%s, %s, %s, %s, %s::json)"
                        " ON CONFLICT (project_key, session_id, subpath, uuid)"
                        " WHERE uuid IS NOT NULL DO NOTHING"
                    ),
                    [(*k, e.uuid, e.text) for e in encoded],
                )
            # Strictly increasing per transcript, from the server's clock.
            row = await (
                await conn.execute(
                    self._sql(
                        "INSERT INTO {keys} AS k (project_key, session_id, subpath, mtime)"
                        " VALUES (%s, %s, %s,"
                        " (extract(epoch FROM clock_timestamp()) * 1000)::bigint)"
                        " ON CONFLICT (project_key, session_id, subpath) DO UPDATE"
                        " SET mtime = GREATEST(excluded.mtime, k.mtime + 1) RETURNING mtime"
                    ),
                    k,
                )
            ).fetchone()
            assert row is not None
            mtime = row[0]
            if not k.is_main:
                return
            stored = await (
                await conn.execute(
                    self._sql(
                        "SELECT mtime, data::text FROM {summaries}"
                        " WHERE project_key = %s AND session_id = %s"
                    ),
                    k[:2],
                )
            ).fetchone()
            prev: SessionSummaryEntry | None = None
            if stored is not None:
                prev = {"session_id": k.session_id, "mtime": stored[0], "data": {}}
                prev["data"] = json.loads(stored[1])
            folded = fold_session_summary(prev, _main_key(k), entries)
            await conn.execute(
                self._sql(
                    "INSERT INTO {summaries} (project_key, session_id, mtime, data)"
                    " VALUES (%s, %s, %s, %s::json) ON CONFLICT (project_key, session_id)"
                    " DO UPDATE SET mtime = excluded.mtime, data = excluded.data"
                ),
                (*k[:2], mtime, json.dumps(folded["data"], ensure_ascii=False)),
            )

    @override
    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        """Return a transcript's entries in append order, or None if it was never written.

        Lines are fetched in pages through a server-side cursor, so a transcript larger than
        ``max_load_bytes`` is refused before it is all in memory.

        Raises:
            SandboxFileTooLargeError: The transcript is larger than ``max_load_bytes``.
            ConfigError, ProviderUnavailableError, SandboxTimeoutError, SandboxClosedError:
                As for `append`.
        """
        k = check_key(key, store=NAME)
        budget = LoadBudget(k, max_load_bytes=self._max_load_bytes, store=NAME)
        out: list[Any] = []
        where = " WHERE project_key = %s AND session_id = %s AND subpath = %s"
        async with self._connection() as conn:
            exists = await (
                await conn.execute(self._sql("SELECT 1 FROM {keys}" + where), k)
            ).fetchone()
            if exists is None:
                return None
            async with conn.cursor(name="sandbay_load") as cur:
                cur.itersize = 500
                await cur.execute(
                    self._sql("SELECT entry::text FROM {entries}" + where + " ORDER BY id"), k
                )
                async for (text,) in cur:
                    out += decode_entries([text], budget)
        return out

    @override
    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        """The main transcripts of a project, each with its last write time (epoch ms)."""
        pk = check_project_key(project_key, store=NAME)
        async with self._connection() as conn:
            rows = await (
                await conn.execute(
                    self._sql(
                        "SELECT session_id, mtime FROM {keys}"
                        " WHERE project_key = %s AND subpath = ''"
                    ),
                    (pk,),
                )
            ).fetchall()
        return [{"session_id": sid, "mtime": mtime} for sid, mtime in rows]

    @override
    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        """The summaries `append` keeps for each main transcript of a project."""
        pk = check_project_key(project_key, store=NAME)
        async with self._connection() as conn:
            rows = await (
                await conn.execute(
                    self._sql(
                        "SELECT session_id, mtime, data::text FROM {summaries}"
                        " WHERE project_key = %s"
                    ),
                    (pk,),
                )
            ).fetchall()
        return [
            {"session_id": sid, "mtime": mtime, "data": json.loads(data)}
            for sid, mtime, data in rows
        ]

    @override
    async def delete(self, key: SessionKey) -> None:
        """Delete a transcript; a main key also deletes its subkeys and summary."""
        k = check_key(key, store=NAME)
        where = " WHERE project_key = %s AND session_id = %s"
        args: tuple[str, ...] = k[:2]
        if not k.is_main:
            where += " AND subpath = %s"
            args = tuple(k)
        async with self._connection() as conn:
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                (json.dumps([self._table, k.project_key, k.session_id]),),
            )
            await conn.execute(self._sql("DELETE FROM {entries}" + where), args)
            await conn.execute(self._sql("DELETE FROM {keys}" + where), args)
            if k.is_main:
                await conn.execute(self._sql("DELETE FROM {summaries}" + where), args)

    @override
    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        """The subpaths (subagent transcripts) stored under a session."""
        k = check_key(
            {"project_key": key["project_key"], "session_id": key["session_id"]}, store=NAME
        )
        async with self._connection() as conn:
            rows = await (
                await conn.execute(
                    self._sql(
                        "SELECT subpath FROM {keys} WHERE project_key = %s AND session_id = %s"
                        " AND subpath <> '' ORDER BY subpath"
                    ),
                    k[:2],
                )
            ).fetchall()
        return [row[0] for row in rows]

    async def aclose(self) -> None:
        """Close the pool. Idempotent; later calls raise `SandboxClosedError`."""
        with anyio.CancelScope(shield=True):
            async with self._opening:
                if self._closed:
                    return
                self._closed = True
                pool, self._pool = self._pool, None
            if pool is not None:
                await pool.close(timeout=5)

    async def __aenter__(self) -> PostgresSessionStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _main_key(k: Key) -> SessionKey:
    return {"project_key": k.project_key, "session_id": k.session_id}
