"""`S3SessionStore`: session transcripts as objects in an S3 bucket (``pip install "sandbay[s3]"``).

Layout, with ``P`` the prefix and each part percent-encoded so ``/`` only separates::

    P<project_key>/<session_id>/main/<part>.jsonl              the main transcript
    P<project_key>/<session_id>/sub/<subpath>/<part>.jsonl     a subagent transcript

S3 cannot append to an object, so each `append` writes one new part (its lines as JSONL);
part names start with the write time in milliseconds and a per-store counter, so listing
them in name order gives the lines in append order. `load` lists a transcript's parts, refuses
it if their sizes add up past ``max_load_bytes``, then reads them in order and drops a line
whose ``uuid`` came before (the idempotency key: a retried batch is written twice but read
once). ``mtime`` in `list_sessions` is the newest part's ``LastModified``.

`list_session_summaries` is not implemented: a summary kept beside the parts would need a
read-fold-write that plain S3 cannot serialise between processes; the SDK then falls back to
`list_sessions` and `load`.

Uses boto3, whose calls block, through `anyio.to_thread.run_sync`; the client (thread-safe) is
made on first use.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, unquote

import anyio
import anyio.to_thread
from claude_agent_sdk import (
    SessionKey,
    SessionListSubkeysKey,
    SessionStore,
    SessionStoreEntry,
    SessionStoreListEntry,
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
    dedup_by_uuid,
    encode_entries,
    missing_dependency,
    now_ms,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["S3SessionStore"]

NAME = "s3"
_T = TypeVar("_T")
_CONFIG_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "InvalidBucketName",
    "NoSuchBucket",
    "SignatureDoesNotMatch",
}


def _part(value: str) -> str:
    return quote(value, safe="")


def map_s3_error(exc: BaseException, *, bucket: str, endpoint: str) -> SandboxError:
    """Turn an exception of boto3/botocore into the matching sandbay error.

    Args:
        exc: What boto3 raised.
        bucket: The bucket, for messages.
        endpoint: The endpoint (or "AWS"), for messages.
    """
    import botocore.exceptions as bex

    where = f"bucket {bucket!r} at {endpoint}"
    if isinstance(exc, bex.NoCredentialsError | bex.PartialCredentialsError):
        return ConfigError(f"no S3 credentials for {where}: {exc}", provider=NAME)
    if isinstance(exc, bex.ReadTimeoutError):
        return SandboxTimeoutError(f"S3 {where} did not answer in time: {exc}", provider=NAME)
    if isinstance(exc, bex.EndpointConnectionError | bex.ConnectionError | OSError):
        return ProviderUnavailableError(f"cannot reach S3 {where}: {exc}", provider=NAME)
    if isinstance(exc, bex.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in _CONFIG_CODES:
            return ConfigError(f"S3 {where} refused the request ({code}): {exc}", provider=NAME)
    return SandboxError(f"S3 {where}: {exc}", provider=NAME)


class S3SessionStore(SessionStore):
    """A `claude_agent_sdk.SessionStore` in an S3 bucket (AWS or any S3-compatible server).

    Implements `append`, `load`, `list_sessions`, `delete` (a main key cascades to its
    subkeys) and `list_subkeys`. The bucket must exist. Credentials not given here come from
    boto3's usual chain (environment, config files, instance roles).

    Example::

        store = S3SessionStore("my-bucket", prefix="agents/sessions/")
        options = ClaudeAgentOptions(session_store=store)
        ...
        await store.aclose()
    """

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "sandbay/sessions/",
        endpoint_url: str | None = None,
        region_name: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: SecretStr | str | None = None,
        session_token: SecretStr | str | None = None,
        timeout: float = 30.0,
        max_attempts: int = 3,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        max_load_bytes: int = DEFAULT_MAX_LOAD_BYTES,
    ) -> None:
        """Configure the store; the client is made and the bucket reached on first use.

        Args:
            bucket: The bucket's name; it must exist.
            prefix: Put before every object key (end it with ``/`` for a folder).
            endpoint_url: An S3-compatible server (MinIO, R2, …); None for AWS.
            region_name: The bucket's region; None for boto3's default.
            access_key_id: With `secret_access_key`: credentials; None for boto3's chain.
            secret_access_key: The secret key, kept out of messages.
            session_token: A temporary session token, if the credentials need one.
            timeout: Seconds to connect and to wait for each answer.
            max_attempts: Attempts per request, retries included.
            max_entry_bytes: `append` refuses an entry larger than this, encoded.
            max_load_bytes: `load` refuses a transcript larger than this.

        Raises:
            MissingDependencyError: boto3 is not installed.
            ConfigError: An argument is out of range.
        """
        try:
            import boto3  # noqa: F401  (checked here, used on first call)
        except ImportError as exc:
            raise missing_dependency("s3", "boto3") from exc
        check_limits(max_entry_bytes=max_entry_bytes, max_load_bytes=max_load_bytes)
        if not bucket:
            raise ConfigError("S3SessionStore needs a bucket name", provider=NAME)
        if not timeout > 0 or max_attempts < 1:
            raise ConfigError("timeout and max_attempts must be positive")
        if (access_key_id is None) != (secret_access_key is None):
            raise ConfigError("give both access_key_id and secret_access_key, or neither")
        self._bucket = bucket
        self._prefix = prefix
        self._endpoint_url = endpoint_url
        self._region_name = region_name
        self._access_key_id = access_key_id
        self._secret_access_key = _secret(secret_access_key)
        self._session_token = _secret(session_token)
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._max_entry_bytes = max_entry_bytes
        self._max_load_bytes = max_load_bytes
        self._client: S3Client | None = None
        self._client_lock = threading.Lock()
        self._counter = itertools.count()
        self._last_ms = 0
        self._closed = False

    # -- plumbing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        import botocore.exceptions as bex

        try:
            yield
        except SandboxError:
            raise
        except (bex.BotoCoreError, bex.ClientError, OSError) as exc:
            endpoint = self._endpoint_url or "AWS"
            raise map_s3_error(exc, bucket=self._bucket, endpoint=endpoint) from exc

    def _get_client(self) -> S3Client:
        with self._client_lock:
            if self._client is None:
                import boto3.session
                from botocore.config import Config

                session = boto3.session.Session(
                    aws_access_key_id=self._access_key_id,
                    aws_secret_access_key=self._secret_access_key,
                    aws_session_token=self._session_token,
                    region_name=self._region_name,
                )
                self._client = session.client(
                    "s3",
                    endpoint_url=self._endpoint_url,
                    config=Config(
                        connect_timeout=self._timeout,
                        read_timeout=self._timeout,
                        retries={"max_attempts": self._max_attempts, "mode": "standard"},
                    ),
                )
            return self._client

    async def _run(self, fn: Callable[[S3Client], _T]) -> _T:
        if self._closed:
            raise closed(NAME)

        def call() -> _T:
            with self._errors():
                return fn(self._get_client())

        return await anyio.to_thread.run_sync(call)

    def _session_prefix(self, k: Key) -> str:
        return f"{self._prefix}{_part(k.project_key)}/{_part(k.session_id)}/"

    def _transcript_prefix(self, k: Key) -> str:
        if k.is_main:
            return self._session_prefix(k) + "main/"
        return self._session_prefix(k) + f"sub/{_part(k.subpath)}/"

    def _list(self, client: S3Client, prefix: str) -> Iterator[dict[str, Any]]:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=self._bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                yield dict(obj)

    def _part_name(self) -> str:
        # Name order is append order within this store: time first, then a counter.
        self._last_ms = max(now_ms(), self._last_ms)
        return f"{self._last_ms:013d}-{next(self._counter):010d}-{secrets.token_hex(4)}.jsonl"

    # -- the protocol -----------------------------------------------------------------------

    @override
    async def append(self, key: SessionKey, entries: list[SessionStoreEntry]) -> None:
        """Write a batch as one new part of its transcript.

        Raises:
            ConfigError: A bad key, an entry that is not a JSON object, no credentials, a
                missing bucket or refused access.
            SandboxFileTooLargeError: An entry is larger than ``max_entry_bytes``.
            ProviderUnavailableError: The endpoint cannot be reached.
            SandboxTimeoutError: The endpoint did not answer within ``timeout``.
            SandboxClosedError: After `aclose`.
        """
        k = check_key(key, store=NAME)
        encoded = encode_entries(entries, max_entry_bytes=self._max_entry_bytes, store=NAME)
        if not encoded:
            return
        body = "".join(e.text + "\n" for e in encoded).encode()
        name = self._transcript_prefix(k) + self._part_name()

        def put(client: S3Client) -> None:
            client.put_object(
                Bucket=self._bucket, Key=name, Body=body, ContentType="application/x-ndjson"
            )

        await self._run(put)

    @override
    async def load(self, key: SessionKey) -> list[SessionStoreEntry] | None:
        """Return a transcript's entries in append order, or None if it has no parts.

        Raises:
            SandboxFileTooLargeError: The transcript is larger than ``max_load_bytes``.
            ConfigError, ProviderUnavailableError, SandboxTimeoutError, SandboxClosedError:
                As for `append`.
        """
        k = check_key(key, store=NAME)
        prefix = self._transcript_prefix(k)

        def read(client: S3Client) -> list[Any] | None:
            parts = sorted(
                (o for o in self._list(client, prefix) if "/" not in o["Key"][len(prefix) :]),
                key=lambda o: str(o["Key"]),
            )
            if not parts:
                return None
            # Refuse from the listing, before a byte is downloaded.
            LoadBudget(k, max_load_bytes=self._max_load_bytes, store=NAME).take(
                sum(int(o.get("Size", 0)) for o in parts)
            )
            budget = LoadBudget(k, max_load_bytes=self._max_load_bytes, store=NAME)
            out: list[Any] = []
            for o in parts:
                body = client.get_object(Bucket=self._bucket, Key=o["Key"])["Body"]
                with contextlib.closing(body):
                    data = body.read(self._max_load_bytes + 1)
                out += decode_entries(data.splitlines(), budget)
            return dedup_by_uuid(out)

        return await self._run(read)

    @override
    async def list_sessions(self, project_key: str) -> list[SessionStoreListEntry]:
        """The sessions of a project with a main transcript, each with its newest part's
        ``LastModified`` (epoch ms)."""
        pk = check_project_key(project_key, store=NAME)
        prefix = f"{self._prefix}{_part(pk)}/"

        def read(client: S3Client) -> list[SessionStoreListEntry]:
            newest: dict[str, int] = {}
            for o in self._list(client, prefix):
                parts = o["Key"][len(prefix) :].split("/")
                if len(parts) == 3 and parts[1] == "main":
                    sid = unquote(parts[0])
                    mtime = int(o["LastModified"].timestamp() * 1000)
                    newest[sid] = max(newest.get(sid, 0), mtime)
            return [{"session_id": sid, "mtime": mtime} for sid, mtime in newest.items()]

        return await self._run(read)

    @override
    async def delete(self, key: SessionKey) -> None:
        """Delete a transcript's parts; a main key also deletes its subkeys."""
        k = check_key(key, store=NAME)
        prefix = self._session_prefix(k) if k.is_main else self._transcript_prefix(k)

        def remove(client: S3Client) -> None:
            names = [o["Key"] for o in self._list(client, prefix)]
            for start in range(0, len(names), 1000):  # DeleteObjects takes 1000 at most
                batch = names[start : start + 1000]
                reply = client.delete_objects(
                    Bucket=self._bucket,
                    Delete={"Objects": [{"Key": n} for n in batch], "Quiet": True},
                )
                errors = reply.get("Errors", [])
                if errors:
                    first = errors[0]
                    raise SandboxError(
                        f"S3 did not delete {len(errors)} object(s) of session "
                        f"{k.session_id}, first {first.get('Key')}: {first.get('Message')}",
                        provider=NAME,
                    )

        await self._run(remove)

    @override
    async def list_subkeys(self, key: SessionListSubkeysKey) -> list[str]:
        """The subpaths (subagent transcripts) stored under a session."""
        k = check_key(
            {"project_key": key["project_key"], "session_id": key["session_id"]}, store=NAME
        )
        prefix = self._session_prefix(k) + "sub/"

        def read(client: S3Client) -> list[str]:
            subs = {
                unquote(o["Key"][len(prefix) :].split("/")[0]) for o in self._list(client, prefix)
            }
            return sorted(subs)

        return await self._run(read)

    # Not implemented (see the module docstring): the SDK probes for an override of the
    # protocol's default, finds this one, and falls back to list_sessions + load.
    list_session_summaries = SessionStore.list_session_summaries

    async def aclose(self) -> None:
        """Close the client's connections. Idempotent; later calls raise `SandboxClosedError`."""
        if self._closed:
            return
        self._closed = True
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(client.close)

    async def __aenter__(self) -> S3SessionStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _secret(value: SecretStr | str | None) -> str | None:
    return value.get_secret_value() if isinstance(value, SecretStr) else value
