"""A local Modal control plane and task command router, on the servicers ``modal_proto`` ships.

Two grpclib servers on 127.0.0.1, served from a thread of their own (so any event loop, any
thread and any process may use them): the control plane (``modal.client.ModalClient``) and
the task command router (``modal.task_command_router.TaskCommandRouter``), whose URL and
JWT the control plane hands out as Modal's does. Every RPC the fake does not implement
answers UNIMPLEMENTED, so a client that starts calling something new fails loudly.

Each sandbox is a Docker container (``--user 0:0``, as Modal's sandboxes run as root) of one
image the test names; the image a client builds is recorded, not built. Each exec is a
``docker exec -i`` whose output is kept whole, so a stdio read may start at any offset, as
Modal's router allows. Faults on demand (`Faults`): UNAVAILABLE on create, short-lived auth
tokens and router JWTs (the fake rejects expired ones), stdio streams cut every N
bytes, a slow image build.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import itertools
import json
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from google.protobuf import empty_pb2
from grpclib import GRPCError, Status
from grpclib.server import Server, Stream
from modal._utils.grpc_utils import custom_detail_codec
from modal_proto import api_pb2
from modal_proto import task_command_router_pb2 as tcr_pb2
from modal_proto.api_grpc import ModalClientBase
from modal_proto.task_command_router_grpc import TaskCommandRouterBase

_T = TypeVar("_T")
#: Label on every container a fake starts; its value names the fake.
CONTAINER_LABEL = "sandbay-test-fake-modal"

_STDOUT = int(api_pb2.FILE_DESCRIPTOR_STDOUT)
_STDERR = int(api_pb2.FILE_DESCRIPTOR_STDERR)


@dataclass
class Faults:
    """Failures the fake produces on demand; change them while it runs.

    Attributes:
        unavailable_creates: The next this many SandboxCreateV2 calls answer UNAVAILABLE.
        auth_token_lifetime_s: Lifetime of each auth token AuthTokenGet issues; a V2 call
            carrying an expired one is refused with UNAUTHENTICATED.
        router_jwt_lifetime_s: Lifetime of each router JWT the control plane hands out; a
            router call carrying an expired one is refused with UNAUTHENTICATED.
        cut_stdio_every: Cut each stdio read stream (UNAVAILABLE) after this many bytes.
        image_build_s: How long each image build takes (answered through ImageJoinStreaming).
    """

    unavailable_creates: int = 0
    auth_token_lifetime_s: float = 3600.0
    router_jwt_lifetime_s: float = 3600.0
    cut_stdio_every: int | None = None
    image_build_s: float = 0.0


def _jwt(exp: float, nonce: str) -> str:
    def part(data: dict[str, Any]) -> str:
        raw = json.dumps(data, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part({'exp': exp, 'n': nonce})}.c2ln"


def _jwt_exp(token: str) -> float | None:
    try:
        body = token.split(".")[1]
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        return float(data["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def _unimplemented(name: str) -> Callable[[Any, Stream[Any, Any]], Awaitable[None]]:
    async def method(self: Any, stream: Stream[Any, Any]) -> None:
        raise GRPCError(Status.UNIMPLEMENTED, f"the fake Modal does not implement {name}")

    method.__name__ = name
    return method


def _complete(base: type[_T]) -> type[_T]:
    """``base`` with every abstract RPC answering UNIMPLEMENTED."""
    names: frozenset[str] = getattr(base, "__abstractmethods__", frozenset())
    return type(f"Fake{base.__name__}", (base,), {n: _unimplemented(n) for n in names})


class _Exec:
    """One ``docker exec -i``: its output kept whole, its stdin fed in offset order."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.out = {_STDOUT: bytearray(), _STDERR: bytearray()}
        self.ended = {_STDOUT: False, _STDERR: False}
        self.changed = asyncio.Condition()
        self.stdin_offset = 0
        self.stdin_lock = asyncio.Lock()
        self.code: int | None = None

    def readable(self, fd: int, offset: int) -> bool:
        """Whether a read from ``offset`` has something to return (data, or the end)."""
        return len(self.out[fd]) > offset or self.ended[fd]

    async def pump(self, fd: int, reader: asyncio.StreamReader) -> None:
        while True:
            data = await reader.read(65536)
            async with self.changed:
                if data:
                    self.out[fd] += data
                else:
                    self.ended[fd] = True
                self.changed.notify_all()
            if not data:
                return

    async def reap(self) -> None:
        code = await self.proc.wait()
        async with self.changed:
            self.code = code
            self.changed.notify_all()


@dataclass
class _Sandbox:
    id: str
    task_id: str
    app_id: str
    container: str
    created_at: float
    tags: dict[str, str]
    definition: api_pb2.Sandbox
    env: dict[str, str] = field(default_factory=dict)
    result: api_pb2.GenericResult | None = None
    execs: dict[str, _Exec] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class FakeModal:
    """The fake's state and its two servers. Use as a context manager (it starts and stops).

    Attributes:
        image: The Docker image every sandbox runs.
        faults: What to break; change it at any time.
        calls: The name of every RPC received, in order.
        images: Every image definition a client asked to build.
        network: Docker network for sandboxes that do not block the network (``host``, so
            they reach the host's loopback as the tests' model server needs).
    """

    def __init__(self, image: str, *, network: str = "host") -> None:
        self.image = image
        self.network = network
        self.faults = Faults()
        self.calls: list[str] = []
        self.images: list[api_pb2.Image] = []
        self.name = f"fake-{uuid.uuid4().hex[:8]}"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._servers: list[_Server] = []
        self._ports: list[int] = []
        self._sandboxes: dict[str, _Sandbox] = {}
        self._by_task: dict[str, _Sandbox] = {}
        self._apps: dict[str, str] = {}
        self._router_jwts: set[str] = set()
        self._ids = itertools.count(1)
        self._background: set[asyncio.Task[Any]] = set()

    # --- lifecycle ---

    @property
    def url(self) -> str:
        """The control plane's URL (``MODAL_SERVER_URL``)."""
        return f"http://127.0.0.1:{self._ports[0]}"

    @property
    def router_url(self) -> str:
        """The task command router's URL, as the control plane hands it out."""
        return f"http://127.0.0.1:{self._ports[1]}"

    def __enter__(self) -> FakeModal:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._stop())
            loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        ready.wait(60)
        if failure:
            raise failure[0]
        return self

    def __exit__(self, *exc_info: object) -> None:
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(120)
        subprocess.run(
            f"docker ps -aq --filter label={CONTAINER_LABEL}={self.name} | xargs -r docker rm -f",
            shell=True,
            capture_output=True,
            check=False,
        )

    async def _start(self) -> None:
        for servicer in (_ControlPlane(self), _Router(self)):
            server = _Server([servicer])
            await server.start("127.0.0.1", 0)
            listening: Any = server._server
            self._ports.append(int(listening.sockets[0].getsockname()[1]))
            self._servers.append(server)

    async def _stop(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            for transport in server.transports:
                transport.close()
        for server in self._servers:
            await server.wait_closed()
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sandbox in self._sandboxes.values():
            for ex in sandbox.execs.values():
                with contextlib.suppress(ProcessLookupError):
                    ex.proc.kill()
                await ex.proc.wait()

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run a coroutine on the fake's loop from another thread, and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(120)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- what tests look at ---

    def live_sandboxes(self) -> list[str]:
        """Ids of the sandboxes still running."""
        return [s.id for s in list(self._sandboxes.values()) if s.result is None]

    def wait_finished(self, sandbox_id: str, timeout: float) -> bool:
        """Block until a sandbox has finished (however it ended); whether it did in time."""
        sandbox = self._sandboxes[sandbox_id]

        async def wait() -> bool:
            try:
                await asyncio.wait_for(sandbox.done.wait(), timeout)
            except asyncio.TimeoutError:
                return False
            return True

        return self.run(wait())

    def tags_of(self, sandbox_id: str) -> dict[str, str]:
        """A sandbox's tags."""
        return dict(self._sandboxes[sandbox_id].tags)

    def env_of(self, sandbox_id: str) -> dict[str, str]:
        """The environment a sandbox was created with (its ``env=``)."""
        return dict(self._sandboxes[sandbox_id].env)

    def definition_of(self, sandbox_id: str) -> api_pb2.Sandbox:
        """The definition a sandbox was created with."""
        return self._sandboxes[sandbox_id].definition

    # --- helpers for the servicers ---

    def _record(self, name: str) -> None:
        self.calls.append(name)

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):04d}{uuid.uuid4().hex[:12]}"

    def _check_auth_token(self, stream: Stream[Any, Any]) -> None:
        token = dict(stream.metadata or {}).get("x-modal-auth-token")
        exp = _jwt_exp(str(token)) if token else None
        if exp is None or exp < time.time():
            raise GRPCError(Status.UNAUTHENTICATED, "missing or expired x-modal-auth-token")

    def _check_router_jwt(self, stream: Stream[Any, Any]) -> None:
        auth = str(dict(stream.metadata or {}).get("authorization", ""))
        jwt = auth.removeprefix("Bearer ")
        exp = _jwt_exp(jwt)
        if jwt not in self._router_jwts or exp is None or exp < time.time():
            raise GRPCError(Status.UNAUTHENTICATED, "invalid or expired router JWT")

    def _router_access(self) -> api_pb2.CommandRouterAccess:
        jwt = _jwt(time.time() + self.faults.router_jwt_lifetime_s, uuid.uuid4().hex)
        self._router_jwts.add(jwt)
        return api_pb2.CommandRouterAccess(url=self.router_url, jwt=jwt)

    def _sandbox(self, sandbox_id: str) -> _Sandbox:
        found = self._sandboxes.get(sandbox_id)
        if found is None:
            raise GRPCError(Status.NOT_FOUND, f"Sandbox {sandbox_id} not found")
        return found

    def _task(self, task_id: str) -> _Sandbox:
        found = self._by_task.get(task_id)
        if found is None or found.result is not None:
            raise GRPCError(Status.NOT_FOUND, f"Task {task_id} not found")
        return found

    async def _create(self, req: api_pb2.SandboxCreateV2Request) -> _Sandbox:
        definition = req.definition
        tags = _checked_tags(req.tags)
        env: dict[str, str] = {}
        for source in req.secret_sources:
            env.update(source.env.contents)
        argv = ["docker", "run", "-d", "--user", "0:0", "--init"]
        argv += ["--label", f"{CONTAINER_LABEL}={self.name}", "--pids-limit", "4096"]
        network_type = definition.network_access.network_access_type
        blocked = definition.block_network or (
            network_type == api_pb2.NetworkAccess.NetworkAccessType.BLOCKED
        )
        argv += ["--network", "none" if blocked else self.network]
        if definition.resources.milli_cpu:
            limit = definition.resources.milli_cpu_max or definition.resources.milli_cpu
            argv += ["--cpus", f"{limit / 1000:g}"]
        if definition.resources.memory_mb:
            limit = definition.resources.memory_mb_max or definition.resources.memory_mb
            argv += ["--memory", f"{limit}m", "--memory-swap", f"{limit}m"]
        if definition.workdir:
            argv += ["-w", definition.workdir]
        for key, value in env.items():
            argv += ["-e", f"{key}={value}"]
        argv.append(self.image)
        argv += list(definition.entrypoint_args) or ["sleep", "infinity"]
        code, out, err = await _run(argv)
        if code != 0:
            raise GRPCError(Status.INTERNAL, f"docker run failed: {err.decode(errors='replace')}")
        sandbox = _Sandbox(
            id=self._new_id("sb"),
            task_id=self._new_id("ta") + "V",
            app_id=req.app_id,
            container=out.decode().strip(),
            created_at=time.time(),
            tags=tags,
            definition=definition,
            env=env,
        )
        self._sandboxes[sandbox.id] = sandbox
        self._by_task[sandbox.task_id] = sandbox
        self._spawn(self._watch(sandbox))
        return sandbox

    async def _watch(self, sandbox: _Sandbox) -> None:
        timeout = sandbox.definition.timeout_secs or 300
        waiter = asyncio.ensure_future(_run(["docker", "wait", sandbox.container]))
        try:
            done, _ = await asyncio.wait({waiter}, timeout=timeout)
        except asyncio.CancelledError:
            waiter.cancel()
            raise
        if not done:
            await self._finish(sandbox, api_pb2.GenericResult.GENERIC_STATUS_TIMEOUT)
            return
        _, out, _ = waiter.result()
        try:
            code = int(out.strip() or b"0")
        except ValueError:
            code = 0
        status = (
            api_pb2.GenericResult.GENERIC_STATUS_SUCCESS
            if code == 0
            else api_pb2.GenericResult.GENERIC_STATUS_FAILURE
        )
        await self._finish(sandbox, status, exitcode=code)

    async def _finish(self, sandbox: _Sandbox, status: int, *, exitcode: int = 0) -> None:
        if sandbox.result is None:
            sandbox.result = api_pb2.GenericResult(status=status, exitcode=exitcode)  # type: ignore[arg-type]
            sandbox.done.set()
        await _run(["docker", "rm", "-f", sandbox.container])
        for ex in sandbox.execs.values():
            with contextlib.suppress(ProcessLookupError):
                ex.proc.kill()

    async def _exec_start(self, sandbox: _Sandbox, req: tcr_pb2.TaskExecStartRequest) -> None:
        if req.exec_id in sandbox.execs:
            return  # idempotent retry
        env: dict[str, str] = dict(req.env)
        for source in req.secret_sources:
            env.update(source.env.contents)
        argv = ["docker", "exec", "-i"]
        if req.workdir:
            argv += ["-w", req.workdir]
        for key, value in env.items():
            argv += ["-e", f"{key}={value}"]
        argv += [sandbox.container, *req.command_args]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        ex = _Exec(proc)
        sandbox.execs[req.exec_id] = ex
        assert proc.stdout is not None and proc.stderr is not None
        self._spawn(ex.pump(_STDOUT, proc.stdout))
        self._spawn(ex.pump(_STDERR, proc.stderr))
        self._spawn(ex.reap())


class _Server(Server):
    """A grpclib server that closes its clients' connections when it stops.

    grpclib's `Server.close` ends requests but leaves connections open until their clients
    hang up; a client that outlives the fake would leave them to the loop's end.
    """

    def __init__(self, handlers: list[Any]) -> None:
        super().__init__(handlers, status_details_codec=custom_detail_codec)
        self.transports: list[asyncio.BaseTransport] = []

    def _protocol_factory(self) -> Any:
        protocol = super()._protocol_factory()
        made = protocol.connection_made

        def connection_made(transport: asyncio.BaseTransport) -> None:
            self.transports.append(transport)
            made(transport)

        protocol.connection_made = connection_made  # type: ignore[method-assign]
        return protocol


class _ControlPlane(_complete(ModalClientBase)):  # type: ignore[misc]
    def __init__(self, fake: FakeModal) -> None:
        self.fake = fake

    async def AppGetOrCreate(self, stream: Stream[Any, Any]) -> None:
        req: api_pb2.AppGetOrCreateRequest = await _recv(stream)
        self.fake._record("AppGetOrCreate")
        key = f"{req.environment_name}/{req.app_name}"
        app_id = self.fake._apps.setdefault(key, self.fake._new_id("ap"))
        await stream.send_message(api_pb2.AppGetOrCreateResponse(app_id=app_id))

    async def EnvironmentGetOrCreate(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        self.fake._record("EnvironmentGetOrCreate")
        settings = api_pb2.EnvironmentSettings(image_builder_version="2025.06")
        metadata = api_pb2.EnvironmentMetadata(name="main", settings=settings)
        await stream.send_message(
            api_pb2.EnvironmentGetOrCreateResponse(environment_id="en-fake", metadata=metadata)
        )

    async def ImageGetOrCreate(self, stream: Stream[Any, Any]) -> None:
        req: api_pb2.ImageGetOrCreateRequest = await _recv(stream)
        self.fake._record("ImageGetOrCreate")
        self.fake.images.append(req.image)
        image_id = self.fake._new_id("im")
        if self.fake.faults.image_build_s > 0:
            await stream.send_message(api_pb2.ImageGetOrCreateResponse(image_id=image_id))
            return
        result = api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS)
        await stream.send_message(
            api_pb2.ImageGetOrCreateResponse(image_id=image_id, result=result)
        )

    async def ImageJoinStreaming(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        self.fake._record("ImageJoinStreaming")
        await asyncio.sleep(self.fake.faults.image_build_s)
        result = api_pb2.GenericResult(status=api_pb2.GenericResult.GENERIC_STATUS_SUCCESS)
        await stream.send_message(api_pb2.ImageJoinStreamingResponse(result=result, eof=True))

    async def AuthTokenGet(self, stream: Stream[Any, Any]) -> None:
        await stream.recv_message()
        self.fake._record("AuthTokenGet")
        exp = time.time() + self.fake.faults.auth_token_lifetime_s
        await stream.send_message(api_pb2.AuthTokenGetResponse(token=_jwt(exp, uuid.uuid4().hex)))

    async def SandboxCreateV2(self, stream: Stream[Any, Any]) -> None:
        req: api_pb2.SandboxCreateV2Request = await _recv(stream)
        self.fake._record("SandboxCreateV2")
        self.fake._check_auth_token(stream)
        if self.fake.faults.unavailable_creates > 0:
            self.fake.faults.unavailable_creates -= 1
            raise GRPCError(Status.UNAVAILABLE, "the fake is unavailable on purpose")
        sandbox = await self.fake._create(req)
        await stream.send_message(
            api_pb2.SandboxCreateV2Response(
                sandbox_id=sandbox.id,
                task_id=sandbox.task_id,
                metadata=api_pb2.SandboxHandleMetadata(app_id=sandbox.app_id),
                command_router_access=self.fake._router_access(),
            )
        )

    async def SandboxWaitV2(self, stream: Stream[Any, Any]) -> None:
        req: api_pb2.SandboxWaitRequest = await _recv(stream)
        self.fake._record("SandboxWaitV2")
        self.fake._check_auth_token(stream)
        sandbox = self.fake._sandbox(req.sandbox_id)
        if sandbox.result is None and req.timeout > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(sandbox.done.wait(), timeout=min(req.timeout, 30))
        metadata = api_pb2.SandboxHandleMetadata(app_id=sandbox.app_id)
        if sandbox.result is not None:
            metadata.result.CopyFrom(sandbox.result)
            response = api_pb2.SandboxWaitResponse(result=sandbox.result, metadata=metadata)
        else:
            response = api_pb2.SandboxWaitResponse(metadata=metadata)
        await stream.send_message(response)

    async def SandboxGetTaskIdV2(self, stream: Stream[Any, Any]) -> None:
        req: api_pb2.SandboxGetTaskIdRequest = await _recv(stream)
        self.fake._record("SandboxGetTaskIdV2")
        self.fake._check_auth_token(stream)
        sandbox = self.fake._sandbox(req.sandbox_id)
        if sandbox.result is not None:
            response = api_pb2.SandboxGetTaskIdResponse(task_result=sandbox.result)
        else:
            response = api_pb2.SandboxGetTaskIdResponse(task_id=sandbox.task_id)
        await stream.send_message(response)

    async def SandboxGetCommandRouterAccess(self, stream: Stream[Any, Any]) -> None:
        req: api_pb2.SandboxGetCommandRouterAccessRequest = await _recv(stream)
        self.fake._record("SandboxGetCommandRouterAccess")
        self.fake._check_auth_token(stream)
        if req.sandbox_id:
            self.fake._sandbox(req.sandbox_id)
        access = self.fake._router_access()
        await stream.send_message(
            api_pb2.SandboxGetCommandRouterAccessResponse(url=access.url, jwt=access.jwt)
        )

    async def SandboxListV2(self, stream: Stream[Any, Any]) -> None:
        req: api_pb2.SandboxListRequest = await _recv(stream)
        self.fake._record("SandboxListV2")
        self.fake._check_auth_token(stream)
        wanted = {t.tag_name: t.tag_value for t in req.tags}
        found = [
            s
            for s in self.fake._sandboxes.values()
            if (req.include_finished or s.result is None)
            and (not req.app_id or s.app_id == req.app_id)
            and (not req.before_timestamp or s.created_at < req.before_timestamp)
            and all(s.tags.get(k) == v for k, v in wanted.items())
        ]
        found.sort(key=lambda s: s.created_at, reverse=True)
        await stream.send_message(
            api_pb2.SandboxListResponse(
                sandboxes=[
                    api_pb2.SandboxInfo(
                        id=s.id,
                        created_at=s.created_at,
                        app_id=s.app_id,
                        tags=_tags(s.tags),
                        task_info=api_pb2.TaskInfo(id=s.task_id, result=s.result),
                    )
                    for s in found[:20]
                ]
            )
        )

    async def SandboxTerminateV2(self, stream: Stream[Any, Any]) -> None:
        req: api_pb2.SandboxTerminateRequest = await _recv(stream)
        self.fake._record("SandboxTerminateV2")
        self.fake._check_auth_token(stream)
        sandbox = self.fake._sandbox(req.sandbox_id)
        await self.fake._finish(sandbox, api_pb2.GenericResult.GENERIC_STATUS_TERMINATED)
        await stream.send_message(api_pb2.SandboxTerminateResponse())

    async def SandboxTagsGetV2(self, stream: Stream[Any, Any]) -> None:
        req: api_pb2.SandboxTagsGetRequest = await _recv(stream)
        self.fake._record("SandboxTagsGetV2")
        self.fake._check_auth_token(stream)
        sandbox = self.fake._sandbox(req.sandbox_id)
        await stream.send_message(api_pb2.SandboxTagsGetResponse(tags=_tags(sandbox.tags)))

    async def SandboxTagsSetV2(self, stream: Stream[Any, Any]) -> None:
        req: api_pb2.SandboxTagsSetRequest = await _recv(stream)
        self.fake._record("SandboxTagsSetV2")
        self.fake._check_auth_token(stream)
        sandbox = self.fake._sandbox(req.sandbox_id)
        sandbox.tags = _checked_tags(req.tags)
        await stream.send_message(empty_pb2.Empty())


class _Router(_complete(TaskCommandRouterBase)):  # type: ignore[misc]
    def __init__(self, fake: FakeModal) -> None:
        self.fake = fake

    def _exec(self, sandbox: _Sandbox, exec_id: str) -> _Exec:
        found = sandbox.execs.get(exec_id)
        if found is None:
            raise GRPCError(Status.NOT_FOUND, f"exec {exec_id} not found")
        return found

    async def TaskExecStart(self, stream: Stream[Any, Any]) -> None:
        req: tcr_pb2.TaskExecStartRequest = await _recv(stream)
        self.fake._record("TaskExecStart")
        self.fake._check_router_jwt(stream)
        await self.fake._exec_start(self.fake._task(req.task_id), req)
        await stream.send_message(tcr_pb2.TaskExecStartResponse())

    async def TaskExecStdinWrite(self, stream: Stream[Any, Any]) -> None:
        req: tcr_pb2.TaskExecStdinWriteRequest = await _recv(stream)
        self.fake._record("TaskExecStdinWrite")
        self.fake._check_router_jwt(stream)
        ex = self._exec(self.fake._task(req.task_id), req.exec_id)
        stdin = ex.proc.stdin
        assert stdin is not None
        async with ex.stdin_lock:
            # Offsets make retries safe: bytes already written are skipped.
            skip = ex.stdin_offset - req.offset
            data = req.data[skip:] if skip > 0 else req.data
            if skip < 0:
                raise GRPCError(Status.INVALID_ARGUMENT, "stdin offset beyond what was written")
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                if data:
                    stdin.write(data)
                    await stdin.drain()
                ex.stdin_offset += len(data)
                if req.eof and not stdin.is_closing():
                    stdin.close()
        await stream.send_message(tcr_pb2.TaskExecStdinWriteResponse())

    async def TaskExecStdioRead(self, stream: Stream[Any, Any]) -> None:
        req: tcr_pb2.TaskExecStdioReadRequest = await _recv(stream)
        self.fake._record("TaskExecStdioRead")
        self.fake._check_router_jwt(stream)
        ex = self._exec(self.fake._task(req.task_id), req.exec_id)
        fd = (
            _STDERR
            if req.file_descriptor == tcr_pb2.TASK_EXEC_STDIO_FILE_DESCRIPTOR_STDERR
            else _STDOUT
        )
        offset, sent = req.offset, 0
        cut = self.fake.faults.cut_stdio_every
        while True:
            async with ex.changed:
                await ex.changed.wait_for(functools.partial(ex.readable, fd, offset))
                data = bytes(ex.out[fd][offset : offset + 65536])
                ended = ex.ended[fd]
            if not data and ended:
                return
            if cut is not None and sent + len(data) > cut:
                data = data[: max(cut - sent, 1)]
                await stream.send_message(tcr_pb2.TaskExecStdioReadResponse(data=data))
                raise GRPCError(Status.UNAVAILABLE, "stdio stream cut on purpose")
            await stream.send_message(tcr_pb2.TaskExecStdioReadResponse(data=data))
            offset += len(data)
            sent += len(data)

    async def TaskExecWait(self, stream: Stream[Any, Any]) -> None:
        req: tcr_pb2.TaskExecWaitRequest = await _recv(stream)
        self.fake._record("TaskExecWait")
        self.fake._check_router_jwt(stream)
        ex = self._exec(self.fake._task(req.task_id), req.exec_id)
        async with ex.changed:
            await ex.changed.wait_for(lambda: ex.code is not None)
        await stream.send_message(tcr_pb2.TaskExecWaitResponse(code=ex.code or 0))

    async def TaskExecPoll(self, stream: Stream[Any, Any]) -> None:
        req: tcr_pb2.TaskExecPollRequest = await _recv(stream)
        self.fake._record("TaskExecPoll")
        self.fake._check_router_jwt(stream)
        ex = self._exec(self.fake._task(req.task_id), req.exec_id)
        if ex.code is None:
            await stream.send_message(tcr_pb2.TaskExecPollResponse())
        else:
            await stream.send_message(tcr_pb2.TaskExecPollResponse(code=ex.code))


async def _recv(stream: Stream[Any, Any]) -> Any:
    message = await stream.recv_message()
    if message is None:
        raise GRPCError(Status.INVALID_ARGUMENT, "no request message")
    return message


_TAG = re.compile(r"^[a-zA-Z0-9._-]{1,63}$")


def _checked_tags(tags: Iterable[api_pb2.SandboxTag]) -> dict[str, str]:
    """Tags as a dict, held to Modal's documented rule for tags (as its SDK holds an app's)."""
    found = {t.tag_name: t.tag_value for t in tags}
    for key, value in found.items():
        if not (_TAG.match(key) and _TAG.match(value)):
            raise GRPCError(Status.INVALID_ARGUMENT, f"Invalid tag: {key}={value}")
    return found


def _tags(tags: dict[str, str]) -> Iterable[api_pb2.SandboxTag]:
    return [api_pb2.SandboxTag(tag_name=k, tag_value=v) for k, v in tags.items()]


async def _run(argv: list[str]) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out, err


def docker_available() -> bool:
    """Whether the Docker CLI reaches an engine."""
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


__all__ = ["CONTAINER_LABEL", "FakeModal", "Faults", "docker_available"]
