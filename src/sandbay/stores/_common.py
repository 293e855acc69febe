"""What every session-store adapter shares: key checks, entry encoding, bounds, the clock.

Entries are opaque JSON objects to a store. Each adapter encodes them here, once, so the
bounds (`max_entry_bytes` on append, `max_load_bytes` on load) and the error for a bad key
are the same everywhere.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from claude_agent_sdk import SessionKey, SessionListSubkeysKey

from .._errors import (
    ConfigError,
    MissingDependencyError,
    SandboxClosedError,
    SandboxFileTooLargeError,
)

DEFAULT_MAX_ENTRY_BYTES = 16 * 1024 * 1024
"""One transcript line larger than this is refused by `append` (16 MiB: images fit)."""

DEFAULT_MAX_LOAD_BYTES = 256 * 1024 * 1024
"""A transcript larger than this is refused by `load` rather than read into memory."""

MAX_KEY_PART = 1024
"""Longest `project_key`, `session_id` or `subpath` accepted, in characters."""


class Key(NamedTuple):
    """A checked session key: `subpath` is ``""`` for the main transcript."""

    project_key: str
    session_id: str
    subpath: str

    @property
    def is_main(self) -> bool:
        return not self.subpath


def check_key(key: SessionKey | SessionListSubkeysKey, *, store: str) -> Key:
    """Validate a key from the SDK and return it as a `Key`.

    Raises:
        ConfigError: A part is missing, empty, not a string, too long or holds a NUL.
    """
    parts = []
    for name in ("project_key", "session_id"):
        parts.append(_check_part(key.get(name), name, store=store))
    subpath = key.get("subpath")
    if subpath is None:
        parts.append("")
    else:
        parts.append(_check_part(subpath, "subpath", store=store))
    return Key(*parts)


def check_project_key(project_key: str, *, store: str) -> str:
    """Validate a bare `project_key` (for `list_sessions`)."""
    return _check_part(project_key, "project_key", store=store)


def _check_part(value: object, name: str, *, store: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"session key {name} must be a non-empty string, got {value!r}")
    if len(value) > MAX_KEY_PART:
        raise ConfigError(
            f"session key {name} is {len(value)} characters long; at most {MAX_KEY_PART}",
            provider=store,
        )
    if "\x00" in value:
        raise ConfigError(f"session key {name} holds a NUL character", provider=store)
    return value


class Encoded(NamedTuple):
    """One entry as stored: its idempotency key (or None) and its JSON text."""

    uuid: str | None
    text: str


def encode_entries(entries: Sequence[Any], *, max_entry_bytes: int, store: str) -> list[Encoded]:
    """Encode a batch for storage, refusing what is not a JSON object or is too large.

    Entries that share a ``uuid`` with an earlier one of the same batch are dropped: the
    ``uuid`` is the idempotency key.

    Raises:
        ConfigError: An entry is not a JSON-serialisable object.
        SandboxFileTooLargeError: An entry encodes to more than `max_entry_bytes`.
    """
    out: list[Encoded] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ConfigError(
                f"entry {index} is a {type(entry).__name__}, not a JSON object", provider=store
            )
        try:
            text = json.dumps(entry, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"entry {index} is not JSON: {exc}", provider=store) from exc
        size = len(text.encode())
        if size > max_entry_bytes:
            raise SandboxFileTooLargeError(
                f"entry {index} is {size} bytes encoded; this store takes at most "
                f"{max_entry_bytes} (max_entry_bytes)",
                provider=store,
            )
        uuid = entry.get("uuid")
        uuid = uuid if isinstance(uuid, str) and uuid else None
        if uuid is not None:
            if uuid in seen:
                continue
            seen.add(uuid)
        out.append(Encoded(uuid, text))
    return out


class LoadBudget:
    """Counts the bytes a `load` has read and stops it past `max_load_bytes`."""

    def __init__(self, key: Key, *, max_load_bytes: int, store: str) -> None:
        self._key = key
        self._left = max_load_bytes
        self._max = max_load_bytes
        self._store = store

    def take(self, size: int) -> None:
        """Account for `size` more bytes.

        Raises:
            SandboxFileTooLargeError: The transcript is larger than the budget.
        """
        self._left -= size
        if self._left < 0:
            raise SandboxFileTooLargeError(
                f"the transcript {'/'.join(p for p in self._key if p)} is larger than "
                f"{self._max} bytes (max_load_bytes); nothing was returned",
                provider=self._store,
            )


def decode_entries(texts: Iterable[str | bytes], budget: LoadBudget) -> list[Any]:
    """Decode stored JSON texts in order, each counted against `budget`."""
    out = []
    for text in texts:
        budget.take(len(text))
        out.append(json.loads(text))
    return out


def dedup_by_uuid(entries: list[Any]) -> list[Any]:
    """Keep the first entry for each ``uuid``; entries without one are all kept."""
    seen: set[str] = set()
    out = []
    for entry in entries:
        uuid = entry.get("uuid") if isinstance(entry, dict) else None
        if isinstance(uuid, str) and uuid:
            if uuid in seen:
                continue
            seen.add(uuid)
        out.append(entry)
    return out


def check_limits(*, max_entry_bytes: int, max_load_bytes: int) -> None:
    """Refuse non-positive bounds at construction.

    Raises:
        ConfigError: A bound is not a positive integer.
    """
    for name, value in (("max_entry_bytes", max_entry_bytes), ("max_load_bytes", max_load_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def now_ms() -> int:
    """Wall-clock time in Unix epoch milliseconds."""
    return time.time_ns() // 1_000_000


def missing_dependency(extra: str, module: str) -> MissingDependencyError:
    """The error for an adapter whose client library is not installed."""
    return MissingDependencyError(
        f"the {extra} session store needs {module!r}, which is not installed: "
        f'pip install "sandbay[{extra}]"',
        provider=extra,
    )


def closed(store: str) -> SandboxClosedError:
    """The error for a store used after `aclose()`."""
    return SandboxClosedError(f"the {store} session store was used after aclose()", provider=store)
