"""`SQLiteSessionStore`: session transcripts in one SQLite file, with no server and no extra.

Layout (three tables, created on first use)::

    sandbay_entries    (id, project_key, session_id, subpath, uuid, entry)   one row per line
    sandbay_keys       (project_key, session_id, subpath, mtime)            one row per transcript
    sandbay_summaries  (project_key, session_id, mtime, data)               one row per session

``subpath`` is ``''`` for a main transcript. ``id`` orders a transcript's lines; a unique index
on ``(project_key, session_id, subpath, uuid)`` makes a repeated ``uuid`` a no-op. An append
writes its lines, the transcript's ``mtime`` and the session's summary in one transaction.

`sqlite3` blocks, so every call runs in a worker thread (`anyio.to_thread.run_sync`), one at a
time per store. Several processes may share a file: it is opened in WAL mode and waits up to
`busy_timeout` seconds for another writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from claude_agent_sdk import (
    SessionKey,
    SessionListSubkeysKey,
    SessionStore,
    SessionStoreEntry,
    SessionStoreListEntry,
    SessionSummaryEntry,
    fold_session_summary,
)
from typing_extensions import override

from .._errors import ConfigError, ProviderUnavailableError, SandboxError
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
    now_ms,
)

__all__ = ["SQLiteSessionStore"]

NAME = "sqlite"
_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandbay_entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project_key TEXT NOT NULL,
    session_id TEXT NOT NULL,
    subpath TEXT NOT NULL,
    uuid TEXT,
    entry TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS sandbay_entries_uuid
    ON sandbay_entries (project_key, session_id, subpath, uuid) WHERE uuid IS NOT NULL;
CREATE INDEX IF NOT EXISTS sandbay_entries_order
    ON sandbay_entries (project_key, session_id, subpath, id);
CREATE TABLE IF NOT EXISTS sandbay_keys (
    project_key TEXT NOT NULL,
    session_id TEXT NOT NULL,
    subpath TEXT NOT NULL,
    mtime INTEGER NOT NULL,
    PRIMARY KEY (project_key, session_id, subpath)
);
CREATE TABLE IF NOT EXISTS sandbay_summaries (
    project_key TEXT NOT NULL,
    session_id TEXT NOT NULL,
    mtime INTEGER NOT NULL,
    data TEXT NOT NULL,
    PRIMARY KEY (project_key, session_id)
);
"""


def map_sqlite_error(exc: BaseException, *, path: str) -> SandboxError:
    """Turn an exception of `sqlite3` (or of the file system beneath it) into a sandbay error.

    Args:
        exc: What `sqlite3` raised.
        path: The database file, for messages.
    """
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc)
        if "locked" in text or "busy" in text:
            return ProviderUnavailableError(
                f"the SQLite database {path} stayed locked by another writer: {text}",
                provider=NAME,
            )
        if "unable to open" in text or "readonly" in text:
            return ProviderUnavailableError(
                f"cannot open the SQLite database {path} for writing: {text}", provider=NAME
            )
    if isinstance(exc, sqlite3.DatabaseError):
        return SandboxError(f"SQLite database {path}: {exc}", provider=NAME)
    if isinstance(exc, OSError):
        return ProviderUnavailableError(f"SQLite database {path}: {exc}", provider=NAME)
    return SandboxError(f"SQLite database {path}: {exc!r}", provider=NAME)


class SQLiteSessionStore(SessionStore):
    """A `claude_agent_sdk.SessionStore` in a local SQLite file: the embedded default.

    Implements every method of the protocol: `append` (idempotent per ``uuid``), `load`,
    `list_sessions`, `list_session_summaries`, `delete` (a main key cascades to its subkeys)
    and `list_subkeys`. Nothing touches the disk before the first call.

    Example::

        store = SQLiteSessionStore("sessions.sqlite3")
        options = ClaudeAgentOptions(session_store=store)
        ...
        await store.aclose()
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 10.0,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        max_load_bytes: int = DEFAULT_MAX_LOAD_BYTES,
    ) -> None:
        """Configure the store; the file is opened (and created) on first use.

        Args:
            path: The database file (its directory must exist), or ``":memory:"`` for a
                store that lives as long as this object.
            busy_timeout: Seconds to wait for another process's write lock.
            max_entry_bytes: `append` refuses an entry larger than this, encoded.
            max_load_bytes: `load` refuses a transcript larger than this.

        Raises:
            ConfigError: An argument is out of range.
        """
        path = os.fspath(path)
        if not isinstance(path, str) or not path:
            raise ConfigError("SQLiteSessionStore needs a database path", provider=NAME)
        if not busy_timeout > 0:
            raise ConfigError(f"busy_timeout must be positive, got {busy_timeout!r}")
        check_limits(max_entry_bytes=max_entry_bytes, max_load_bytes=max_load_bytes)
        self._path = path
        self._busy_timeout = busy_timeout
        self._max_entry_bytes = max_entry_bytes
        self._max_load_bytes = max_load_bytes
        self._conn: sqlite3.Connection | None = None
        self._lock = anyio.Lock()
        self._closed = False

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    # -- plumbing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except SandboxError:
            raise
        except (sqlite3.Error, OSError) as exc:
            raise map_sqlite_error(exc, path=self._path) from exc

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout,
            isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE … COMMIT
            check_same_thread=False,  # one thread at a time, under self._lock
        )
        try:
            # Two stores opening one new file at once race to switch it to WAL and create the
            # tables; SQLite may answer "locked" at once there instead of waiting out
            # busy_timeout, so the set-up is retried until that much time has passed.
            deadline = time.monotonic() + self._busy_timeout
            while True:
                try:
                    if self._path != ":memory:":
                        mode = conn.execute("PRAGMA journal_mode").fetchone()
                        if not mode or str(mode[0]).lower() != "wal":
                            conn.execute("PRAGMA journal_mode=WAL")
                    conn.executescript(_SCHEMA)
                    break
                except sqlite3.OperationalError as exc:
                    text = str(exc).lower()
                    if not ("locked" in text or "busy" in text) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        async with self._lock:
            if self._closed:
                raise closed(NAME)

            def call() -> _T:
                with self._errors():
                    if self._conn is None:
                        self._conn = self._connect()
                    return fn(self._conn)

            # The lock is held until the thread returns, even if the caller is cancelled.
            return await anyio.to_thread.run_sync(call)

    @staticmethod
    @contextlib.contextmanager
    def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- the protocol -----------------------------------------------------------------------

    @override
    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        """Append a batch in order; an entry whose ``uuid`` is already stored is skipped.

        Raises:
            ConfigError: A bad key, or an entry that is not a JSON object.
            SandboxFileTooLargeError: An entry is larger than ``max_entry_bytes``.
            ProviderUnavailableError: The file cannot be opened or stays locked.
            SandboxClosedError: After `aclose`.
        """
        k = check_key(key, store=NAME)
        encoded = encode_entries(entries, max_entry_bytes=self._max_entry_bytes, store=NAME)
        if not encoded:
            return

        def write(conn: sqlite3.Connection) -> None:
            with self._transaction(conn):
                conn.executemany(
                    "INSERT OR IGNORE INTO sandbay_entries"
                    " (project_key, session_id, subpath, uuid, entry) VALUES (?, ?, ?, ?, ?)",
                    [(*k, e.uuid, e.text) for e in encoded],
                )
                mtime = self._next_mtime(conn, k)
                conn.execute(
                    "INSERT INTO sandbay_keys (project_key, session_id, subpath, mtime)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (project_key, session_id, subpath)"
                    " DO UPDATE SET mtime = excluded.mtime",
                    (*k, mtime),
                )
                if k.is_main:
                    row = conn.execute(
                        "SELECT mtime, data FROM sandbay_summaries"
                        " WHERE project_key = ? AND session_id = ?",
                        k[:2],
                    ).fetchone()
                    prev: SessionSummaryEntry | None = None
                    if row is not None:
                        prev = {"session_id": k.session_id, "mtime": row[0], "data": {}}
                        prev["data"] = json.loads(row[1])
                    folded = fold_session_summary(prev, _main_key(k), entries)
                    conn.execute(
                        "INSERT INTO sandbay_summaries (project_key, session_id, mtime, data)"
                        " VALUES (?, ?, ?, ?) ON CONFLICT (project_key, session_id) DO UPDATE"
                        " SET mtime = excluded.mtime, data = excluded.data",
                        (*k[:2], mtime, json.dumps(folded["data"], ensure_ascii=False)),
                    )

        await self._run(write)

    @staticmethod
    def _next_mtime(conn: sqlite3.Connection, k: Key) -> int:
        # Strictly increasing per transcript, so two appends in one millisecond still differ.
        row = conn.execute(
            "SELECT mtime FROM sandbay_keys WHERE project_key = ? AND session_id = ?"
            " AND subpath = ?",
            k,
        ).fetchone()
        now = now_ms()
        return max(now, row[0] + 1) if row is not None else now

    @override
    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        """Return a transcript's entries in append order, or None if it was never written.

        Raises:
            SandboxFileTooLargeError: The transcript is larger than ``max_load_bytes``.
            ConfigError, ProviderUnavailableError, SandboxClosedError: As for `append`.
        """
        k = check_key(key, store=NAME)
        budget = LoadBudget(k, max_load_bytes=self._max_load_bytes, store=NAME)

        def read(conn: sqlite3.Connection) -> list[Any] | None:
            exists = conn.execute(
                "SELECT 1 FROM sandbay_keys WHERE project_key = ? AND session_id = ?"
                " AND subpath = ?",
                k,
            ).fetchone()
            if exists is None:
                return None
            rows = conn.execute(
                "SELECT entry FROM sandbay_entries WHERE project_key = ? AND session_id = ?"
                " AND subpath = ? ORDER BY id",
                k,
            )
            return decode_entries((row[0] for row in rows), budget)

        return await self._run(read)

    @override
    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        """The main transcripts of a project, each with its last write time (epoch ms)."""
        pk = check_project_key(project_key, store=NAME)

        def read(conn: sqlite3.Connection) -> list[SessionStoreListEntry]:
            rows = conn.execute(
                "SELECT session_id, mtime FROM sandbay_keys WHERE project_key = ? AND subpath = ''",
                (pk,),
            )
            return [{"session_id": sid, "mtime": mtime} for sid, mtime in rows]

        return await self._run(read)

    @override
    async def list_session_summaries(self, project_key: str) -> list[SessionSummaryEntry]:
        """The summaries `append` keeps for each main transcript of a project."""
        pk = check_project_key(project_key, store=NAME)

        def read(conn: sqlite3.Connection) -> list[SessionSummaryEntry]:
            rows = conn.execute(
                "SELECT session_id, mtime, data FROM sandbay_summaries WHERE project_key = ?",
                (pk,),
            )
            return [
                {"session_id": sid, "mtime": mtime, "data": json.loads(data)}
                for sid, mtime, data in rows
            ]

        return await self._run(read)

    @override
    async def delete(self, key: SessionKey) -> None:
        """Delete a transcript; a main key also deletes its subkeys and summary."""
        k = check_key(key, store=NAME)
        where = "project_key = ? AND session_id = ?"
        args: tuple[str, ...] = k[:2]
        if not k.is_main:
            where += " AND subpath = ?"
            args = tuple(k)

        def write(conn: sqlite3.Connection) -> None:
            with self._transaction(conn):
                conn.execute(f"DELETE FROM sandbay_entries WHERE {where}", args)
                conn.execute(f"DELETE FROM sandbay_keys WHERE {where}", args)
                if k.is_main:
                    conn.execute(f"DELETE FROM sandbay_summaries WHERE {where}", args)

        await self._run(write)

    @override
    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        """The subpaths (subagent transcripts) stored under a session."""
        k = check_key(
            {"project_key": key["project_key"], "session_id": key["session_id"]}, store=NAME
        )

        def read(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT subpath FROM sandbay_keys WHERE project_key = ? AND session_id = ?"
                " AND subpath != '' ORDER BY subpath",
                k[:2],
            )
            return [row[0] for row in rows]

        return await self._run(read)

    async def aclose(self) -> None:
        """Close the database. Idempotent; later calls raise `SandboxClosedError`."""
        with anyio.CancelScope(shield=True):
            async with self._lock:
                if self._closed:
                    return
                self._closed = True
                conn, self._conn = self._conn, None
                if conn is not None:
                    await anyio.to_thread.run_sync(conn.close)

    async def __aenter__(self) -> SQLiteSessionStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _main_key(k: Key) -> SessionKey:
    return {"project_key": k.project_key, "session_id": k.session_id}
