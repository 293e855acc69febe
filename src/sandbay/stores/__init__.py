"""Session stores: where the Agent SDK mirrors session transcripts, so a session outlives its
sandbox.

Each class implements `claude_agent_sdk.SessionStore` and passes the SDK's conformance suite
(`claude_agent_sdk.testing.run_session_store_conformance`) against a real server. Pass one as
``ClaudeAgentOptions(session_store=...)``; close it with ``await store.aclose()`` (or
``async with``).

==========================  ================================  ===========================
store                       keeps transcripts in              install
==========================  ================================  ===========================
`SQLiteSessionStore`        one local SQLite file             (standard library)
`RedisSessionStore`         Redis lists, sets and hashes      ``sandbay[redis]``
`PostgresSessionStore`      three PostgreSQL tables           ``sandbay[postgres]``
`S3SessionStore`            one object per append, in S3      ``sandbay[s3]``
==========================  ================================  ===========================

Client libraries are imported when a store is made, never by ``import sandbay``; a missing
one raises `sandbay.MissingDependencyError` naming the extra to install.
"""

from __future__ import annotations

from .postgres import PostgresSessionStore
from .redis import RedisSessionStore
from .s3 import S3SessionStore
from .sqlite import SQLiteSessionStore

__all__ = ["PostgresSessionStore", "RedisSessionStore", "S3SessionStore", "SQLiteSessionStore"]
