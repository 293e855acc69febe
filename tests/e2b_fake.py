"""A local E2B control plane and envd that speak E2B's wire protocol, for tests.

`FakeE2B` serves, on one loopback port, what the ``e2b`` SDK talks to when pointed there with
``api_url`` and ``sandbox_url``:

- the control plane's REST API (JSON shaped by the SDK's own generated models): create
  (``POST /v2/sandboxes``, ``Idempotency-Key`` honoured), get, list with the metadata
  filter, ``state`` and pagination (``limit``, ``nextToken``, the ``x-next-token`` header),
  kill, timeout, connect; sandboxes are killed when their timeout passes, as E2B does;
- envd, routed by the ``E2b-Sandbox-Id`` header and checked against the access token the
  create returned: the Connect-RPC process service (``Start`` and ``Connect`` server streams,
  ``SendInput``, ``CloseStdin``, ``SendSignal``, ``List``) served by the
  ``ProcessASGIApplication`` the ``e2b`` package ships, and the plain-HTTP ``/files`` and
  ``/health``. Users come from the ``Authorization: Basic`` header as envd reads them.

Its sandboxes really run: each is a sandbox of another sandbay provider (the executor):
local under bubblewrap (a private /tmp and /workspace, real processes; fast) or a Docker
container from the agent image with the host's network (so the real ``claude`` CLI runs and
reaches a model on loopback). ``/files`` acts as root, as envd does.

Faults on demand: `create_faults` (statuses answered instead of creating),
`create_faults_after` (statuses answered after the sandbox was made), `create_delay_s` (a
slow start), `cut_stdout_after` (a process stream cut mid-run, the process running on),
`hold_start_events` (a process started whose start event is late, as over a slow link), and
unknown ids answer as E2B does (404 from the API, a 502 "was not found" from the proxy).

It runs its own event loop in a thread, so any test loop (or another OS process) may use it.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import dataclasses
import datetime
import email.parser
import json
import posixpath
import secrets
import signal
import socket
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any

import uvicorn
from connectrpc.code import Code
from connectrpc.errors import ConnectError
from connectrpc.request import RequestContext
from e2b.api.client.models import (
    BuildLogEntry,
    BuildStatusReason,
    ListedSandbox,
    LogLevel,
    NewSandbox,
    SandboxDetail,
    SandboxState,
    TemplateBuildInfo,
    TemplateBuildStartV2,
    TemplateBuildStatus,
    TemplateRequestResponseV3,
)
from e2b.api.client.models import Sandbox as SandboxModel
from e2b.envd.process import process_connect, process_pb
from protobuf import Oneof

import sandbay
from sandbay import BaseProviderConfig, E2BConfig, LocalConfig, Process, Sandbox, SandboxSpec
from sandbay._provider import Provider, make_provider

ENVD_VERSION = "0.5.7"
API_KEY = "e2b_fake_key"
DEFAULT_TEMPLATE = "base"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class _Cut(BaseException):
    """Raised out of the ASGI app to drop a connection mid-response, as a network fault."""


@dataclasses.dataclass
class Template:
    """What a template name stands for: the executor's spec for its sandboxes.

    Attributes:
        image: The Docker image (Docker executor), or ``None``.
        profile: Shell lines written to ``/etc/profile.d/`` at create (what a template's
            build would have left there), or ``""``.
        users: E2B user name -> the executor's user (``None``: its default).
    """

    image: str | None = None
    profile: str = ""
    users: Mapping[str, str | None] = dataclasses.field(
        default_factory=lambda: {"user": None, "root": None}
    )


@dataclasses.dataclass
class _Build:
    template_id: str
    build_id: str
    status: TemplateBuildStatus = TemplateBuildStatus.WAITING
    logs: list[BuildLogEntry] = dataclasses.field(default_factory=list)
    reason: str | None = None


@dataclasses.dataclass
class _CutRule:
    command: str
    marker: bytes
    times: int


class _FakeProcess:
    """One process of a fake sandbox, its events fanned out to every attached stream."""

    def __init__(self, pid: int, inner: Process, config: process_pb.ProcessConfig, tag: str):
        self.pid = pid
        self.inner = inner
        self.config = config
        self.tag = tag
        self.subscribers: list[asyncio.Queue[process_pb.ProcessEvent | None]] = []
        self.ended = asyncio.Event()
        self.stdin_open = True

    def subscribe(self) -> asyncio.Queue[process_pb.ProcessEvent | None]:
        queue: asyncio.Queue[process_pb.ProcessEvent | None] = asyncio.Queue()
        self.subscribers.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[process_pb.ProcessEvent | None]) -> None:
        if queue in self.subscribers:
            self.subscribers.remove(queue)

    def publish(self, event: process_pb.ProcessEvent | None) -> None:
        for queue in list(self.subscribers):
            queue.put_nowait(event)

    async def pump(self, forget: Callable[[], None]) -> None:
        async def read(stream: sandbay.ByteStream, field: str) -> None:
            async for chunk in stream:
                data = process_pb.ProcessEvent.DataEvent(output=_oneof(field, chunk))
                self.publish(process_pb.ProcessEvent(event=_oneof("data", data)))

        try:
            await asyncio.gather(
                read(self.inner.stdout, "stdout"), read(self.inner.stderr, "stderr")
            )
            code = await self.inner.wait()
        except Exception as exc:  # the executor failed: envd reports it as an error end
            end = process_pb.ProcessEvent.EndEvent(
                exit_code=-1, exited=False, status="error", error=str(exc)
            )
        else:
            end = _go_end(code)
        forget()  # envd forgets a process once it ended
        self.publish(process_pb.ProcessEvent(event=_oneof("end", end)))
        self.publish(None)
        self.ended.set()


def _go_end(code: int) -> process_pb.ProcessEvent.EndEvent:
    """The end event envd (Go's os/exec) sends for an exit code (-N: killed by signal N)."""
    if code < 0:
        name = (signal.strsignal(-code) or f"signal {-code}").lower()
        return process_pb.ProcessEvent.EndEvent(
            exit_code=-1, exited=False, status=f"signal: {name}"
        )
    return process_pb.ProcessEvent.EndEvent(
        exit_code=code, exited=True, status=f"exit status {code}"
    )


class _FakeSandbox:
    def __init__(
        self,
        *,
        sandbox_id: str,
        template: str,
        metadata: dict[str, str],
        env_vars: dict[str, str],
        timeout: int,
        inner: Sandbox,
        users: Mapping[str, str | None],
    ) -> None:
        self.id = sandbox_id
        self.template = template
        self.metadata = metadata
        self.env_vars = env_vars
        self.started_at = datetime.datetime.now(datetime.timezone.utc)
        self.end_at = self.started_at + datetime.timedelta(seconds=timeout)
        self.inner = inner
        self.users = users
        self.access_token = secrets.token_hex(16)
        self.processes: dict[int, _FakeProcess] = {}
        self.next_pid = 1000
        self.tasks: set[asyncio.Task[None]] = set()

    def model(self) -> SandboxModel:
        return SandboxModel(
            template_id=self.template,
            sandbox_id=self.id,
            client_id="fake",
            envd_version=ENVD_VERSION,
            envd_access_token=self.access_token,
        )

    def listed(self) -> ListedSandbox:
        return ListedSandbox(
            template_id=self.template,
            sandbox_id=self.id,
            client_id="fake",
            started_at=self.started_at,
            end_at=self.end_at,
            cpu_count=2,
            memory_mb=512,
            disk_size_mb=1024,
            state=SandboxState.RUNNING,
            envd_version=ENVD_VERSION,
            metadata=dict(self.metadata),
        )

    def detail(self) -> SandboxDetail:
        return SandboxDetail(
            template_id=self.template,
            sandbox_id=self.id,
            client_id="fake",
            started_at=self.started_at,
            end_at=self.end_at,
            envd_version=ENVD_VERSION,
            cpu_count=2,
            memory_mb=512,
            disk_size_mb=1024,
            state=SandboxState.RUNNING,
            envd_access_token=self.access_token,
            metadata=dict(self.metadata),
        )


_request_state: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("request_state")


class FakeE2B:
    """The fake control plane. Use as a context manager; `config` points sandbay at it.

    Args:
        executor: The sandbay provider config whose sandboxes the fake's sandboxes are.
            Default: local under bubblewrap.
        templates: Template name -> `Template`. Unknown templates answer 404, as E2B does.
            Default: ``base`` and sandbay's agent template, both on the executor's defaults.
        page_size: The most sandboxes one list page holds (E2B's limit is 100).
    """

    def __init__(
        self,
        *,
        executor: BaseProviderConfig | None = None,
        templates: Mapping[str, Template] | None = None,
        page_size: int = 100,
    ) -> None:
        from sandbay.providers.e2b import agent_template

        self.executor_config = executor or LocalConfig(isolate=True)
        if templates is None:
            templates = {DEFAULT_TEMPLATE: Template(), agent_template(): Template()}
        self.templates = dict(templates)
        self.page_size = page_size
        # Faults, set by tests at any time.
        self.create_faults: list[int] = []
        self.create_faults_after: list[int] = []
        self.create_delay_s = 0.0
        self.timeout_faults: list[int] = []  # statuses answered to the next timeout calls
        self.idempotent = True  # False: ignore Idempotency-Key, as an older API would
        self.cut_rules: list[_CutRule] = []
        self.start_holds: list[tuple[str, asyncio.Event]] = []
        # What happened, for assertions.
        self.requests: list[tuple[str, str]] = []
        self.creates = 0
        self.started: list[str] = []  # command lines of every Start, in order
        self.sandboxes: dict[str, _FakeSandbox] = {}
        self.idempotency: dict[str, asyncio.Future[str]] = {}
        self.killed: list[str] = []
        self._killed_changed = threading.Condition()
        self.builds: dict[str, _Build] = {}
        self.build_tasks: set[asyncio.Task[None]] = set()
        self.built_images: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: uvicorn.Server | None = None
        self._executor: Provider | None = None
        self._process_app = process_connect.ProcessASGIApplication(_ProcessService(self))
        self.url = ""

    # --- running ---

    def __enter__(self) -> FakeE2B:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(
            self._asgi, log_level="error", lifespan="off", loop="asyncio", interface="asgi3"
        )
        self._server = uvicorn.Server(config)
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._executor = make_provider(self.executor_config)
            reaper = loop.create_task(self._reap_expired())
            loop.call_soon(started.set)
            assert self._server is not None
            try:
                loop.run_until_complete(self._server.serve(sockets=[sock]))
            finally:
                reaper.cancel()
                loop.run_until_complete(self._shutdown())
                loop.run_until_complete(asyncio.sleep(0))
                loop.close()
                sock.close()

        self._thread = threading.Thread(target=run, name="fake-e2b", daemon=True)
        self._thread.start()
        if not started.wait(30):
            raise RuntimeError("the fake E2B did not start")
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the fake E2B's server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._server.force_exit = True
        self._thread.join(60)

    async def _shutdown(self) -> None:
        for sandbox_id in list(self.sandboxes):
            await self._kill(sandbox_id)
        if self._executor is not None:
            await self._executor.aclose()
        for task in list(self.build_tasks):
            task.cancel()
        for image in self.built_images:
            # The image by id, after any container still made from it: an untagged image
            # left behind would still carry the base's labels.
            users = await _docker("ps", "-aq", "--filter", f"ancestor={image}", check=False)
            for container in users.split():
                await _docker("rm", "-f", container, check=False)
            await _docker("rmi", "-f", image, check=False)

    def config(self, **changes: Any) -> E2BConfig:
        """An `E2BConfig` pointing at this fake."""
        data: dict[str, Any] = {
            "api_key": API_KEY,
            "api_url": self.url,
            "sandbox_url": self.url,
            "template": DEFAULT_TEMPLATE,
            "reaches_host_loopback": True,
            "request_timeout": 60.0,
            **changes,
        }
        return E2BConfig.model_validate(data)

    def call(self, fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run a coroutine on the fake's loop (from a test) and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(fn(), self._loop).result(120)

    def wait_killed(self, sandbox_id: str, timeout: float) -> bool:
        """Block until the fake killed the sandbox (its timeout passed, or a kill came)."""
        with self._killed_changed:
            return self._killed_changed.wait_for(lambda: sandbox_id in self.killed, timeout)

    def cut_stdout_after(self, marker: bytes, *, command: str, times: int = 1) -> None:
        """Drop the connection of the next ``times`` Start streams whose command line holds
        ``command``, right after a stdout chunk holding ``marker`` was sent; the process
        runs on."""
        self.cut_rules.append(_CutRule(command, marker, times))

    def hold_start_events(self, command: str) -> Callable[[], None]:
        """Hold back the start event of every Start whose command line holds ``command``
        (the process itself starts and runs) until the function returned is called."""
        assert self._loop is not None
        released = asyncio.Event()
        self.start_holds.append((command, released))

        def release() -> None:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(released.set)

        return release

    def start_hold_for(self, proc: _FakeProcess) -> asyncio.Event | None:
        line = " ".join([proc.config.cmd, *proc.config.args])
        for command, released in self.start_holds:
            if command in line and not released.is_set():
                return released
        return None

    # --- the ASGI app ---

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        self.requests.append((method, path))
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if path.startswith("/process.Process/"):
            error = self._check_envd(headers)
            if error is not None:
                await _json(send, *error)
                return
            _request_state.set({})
            await self._process_app(scope, receive, send)
            return
        if path in ("/files", "/health") or path.startswith("/filesystem."):
            error = self._check_envd(headers)
            if error is not None:
                await _json(send, *error)
                return
            await self._envd_http(scope, receive, send, headers)
            return
        if headers.get("x-api-key") != API_KEY:
            await _json(send, 401, {"code": 401, "message": "Invalid API key"})
            return
        body = await _body(receive)
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode())
        try:
            await self._rest(method, path, query, body, headers, send)
        except _Cut:
            raise
        except Exception as exc:  # a bug in the fake: answer 500 as a server would
            await _json(send, 500, {"code": 500, "message": f"fake E2B: {exc!r}"})

    def _check_envd(self, headers: Mapping[str, str]) -> tuple[int, Any] | None:
        sandbox_id = headers.get("e2b-sandbox-id", "")
        sandbox = self.sandboxes.get(sandbox_id)
        if sandbox is None:
            # The edge proxy's answer for a sandbox that is gone.
            return 502, {"code": 502, "message": f"The sandbox {sandbox_id} was not found"}
        if headers.get("x-access-token") != sandbox.access_token:
            return 401, {"code": 401, "message": "invalid access token"}
        return None

    async def _rest(
        self,
        method: str,
        path: str,
        query: Mapping[str, list[str]],
        body: bytes,
        headers: Mapping[str, str],
        send: Send,
    ) -> None:
        parts = [p for p in path.split("/") if p]
        if parts[:1] == ["templates"] or parts[:2] in (["v3", "templates"], ["v2", "templates"]):
            await self._templates(method, parts, json.loads(body or b"{}"), query, send)
        elif method == "POST" and parts == ["v2", "sandboxes"]:
            await self._create(json.loads(body or b"{}"), headers, send)
        elif method == "GET" and parts == ["v2", "sandboxes"]:
            await self._list(query, send)
        elif (len(parts) >= 2 and parts[0] == "sandboxes") or parts[:2] == ["v2", "sandboxes"]:
            sandbox_id = parts[1] if parts[0] == "sandboxes" else parts[2]
            action = parts[2:] if parts[0] == "sandboxes" else parts[3:]
            sandbox = self.sandboxes.get(sandbox_id)
            if sandbox is None:
                await _json(
                    send, 404, {"code": 404, "message": f'sandbox "{sandbox_id}" doesn\'t exist'}
                )
                return
            data = json.loads(body or b"{}")
            if method == "GET" and not action:
                await _json(send, 200, sandbox.detail().to_dict())
            elif method == "DELETE" and not action:
                await self._kill(sandbox_id)
                await _empty(send, 204)
            elif method == "POST" and action == ["timeout"] and self.timeout_faults:
                status = self.timeout_faults.pop(0)
                await _json(send, status, {"code": status, "message": "fake: injected fault"})
            elif method == "POST" and action == ["timeout"]:
                sandbox.end_at = _now() + datetime.timedelta(seconds=int(data["timeout"]))
                await _empty(send, 204)
            elif method == "POST" and action == ["connect"]:
                timeout = data.get("timeout")
                if isinstance(timeout, int):  # only ever lengthens a running sandbox's
                    sandbox.end_at = max(
                        sandbox.end_at, _now() + datetime.timedelta(seconds=timeout)
                    )
                await _json(send, 200, sandbox.model().to_dict())
            else:
                await _json(send, 404, {"code": 404, "message": f"no route {method} {path}"})
        else:
            await _json(send, 404, {"code": 404, "message": f"no route {method} {path}"})

    async def _create(self, data: dict[str, Any], headers: Mapping[str, str], send: Send) -> None:
        request = NewSandbox.from_dict(data)
        key = headers.get("idempotency-key") if self.idempotent else None
        if key and key in self.idempotency:
            # The same create again (a retry): the first one's sandbox, once it is made.
            sandbox_id = await asyncio.shield(self.idempotency[key])
            if sandbox_id in self.sandboxes:
                await _json(send, 201, self.sandboxes[sandbox_id].model().to_dict())
                return
        made: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if key:
            self.idempotency[key] = made
        try:
            sandbox = await self._make(request, send)
        except BaseException:
            self.idempotency.pop(key or "", None)
            made.cancel()
            raise
        if sandbox is None:
            self.idempotency.pop(key or "", None)
            made.cancel()
            return
        made.set_result(sandbox.id)
        if self.create_faults_after:
            status = self.create_faults_after.pop(0)
            await _json(send, status, {"code": status, "message": "fake: injected fault"})
            return
        await _json(send, 201, sandbox.model().to_dict())

    async def _make(self, request: NewSandbox, send: Send) -> _FakeSandbox | None:
        """Make the sandbox a create asks for; ``None`` when a fault (or a bad template)
        was answered instead."""
        if self.create_delay_s:
            await asyncio.sleep(self.create_delay_s)
        if self.create_faults:
            status = self.create_faults.pop(0)
            await _json(send, status, {"code": status, "message": "fake: injected fault"})
            return None
        template = self.templates.get(request.template_id)
        if template is None:
            await _json(
                send, 404, {"code": 404, "message": f"template '{request.template_id}' not found"}
            )
            return None
        self.creates += 1
        metadata = {str(k): str(v) for k, v in dict(_set(request.metadata) or {}).items()}
        env_vars = {str(k): str(v) for k, v in dict(_set(request.env_vars) or {}).items()}
        timeout = int(_set(request.timeout) or 15)
        spec = SandboxSpec(
            image=template.image,
            env=env_vars,
            network="host" if template.image else "default",
            lifetime_s=max(timeout, 60),
        )
        assert self._executor is not None
        inner = await self._executor.create(spec)
        sandbox = _FakeSandbox(
            sandbox_id="i" + secrets.token_hex(10),
            template=request.template_id,
            metadata=metadata,
            env_vars=env_vars,
            timeout=timeout,
            inner=inner,
            users=template.users,
        )
        if template.image:
            # What E2B's base template has, and what the template's build left in the
            # login shell's profile.
            setup = (
                "mkdir -p /home/user /etc/profile.d && chown 1000:1000 /home/user && "
                "cat > /etc/profile.d/template.sh"
            )
            await inner.exec(
                ["sh", "-c", setup], input=template.profile, user=sandbox.users.get("root")
            )
        self.sandboxes[sandbox.id] = sandbox
        return sandbox

    # --- the template builder: steps run in a container, committed as the template's image ---

    async def _templates(
        self,
        method: str,
        parts: list[str],
        data: dict[str, Any],
        query: Mapping[str, list[str]],
        send: Send,
    ) -> None:
        if method == "GET" and parts[:2] == ["templates", "aliases"] and len(parts) == 3:
            if parts[2] in self.templates:
                await _json(send, 200, {"templateID": parts[2], "public": False})
            else:
                await _json(send, 404, {"code": 404, "message": f"alias '{parts[2]}' not found"})
        elif method == "POST" and parts == ["v3", "templates"]:
            name = str(data["name"])
            build = _Build(template_id=name, build_id=secrets.token_hex(8))
            self.builds[build.build_id] = build
            response = TemplateRequestResponseV3(
                template_id=name,
                build_id=build.build_id,
                public=False,
                names=[name],
                tags=[],
                aliases=[name],
            )
            await _json(send, 202, response.to_dict())
        elif method == "POST" and parts[:2] == ["v2", "templates"] and len(parts) == 5:
            started = self.builds.get(parts[4])
            if started is None:
                await _json(send, 404, {"code": 404, "message": "no such build"})
                return
            start = TemplateBuildStartV2.from_dict(data)
            started.status = TemplateBuildStatus.BUILDING
            task = asyncio.get_running_loop().create_task(self._run_build(started, start))
            self.build_tasks.add(task)
            task.add_done_callback(self.build_tasks.discard)
            await _empty(send, 202)
        elif method == "GET" and parts[:1] == ["templates"] and parts[-1:] == ["status"]:
            known = self.builds.get(parts[3]) if len(parts) == 5 else None
            if known is None:
                await _json(send, 404, {"code": 404, "message": "no such build"})
                return
            offset = int(query.get("logsOffset", ["0"])[0])
            info = TemplateBuildInfo(
                logs=[],
                log_entries=known.logs[offset : offset + 100],
                template_id=known.template_id,
                build_id=known.build_id,
                status=known.status,
            )
            if known.reason:
                info.reason = BuildStatusReason(message=known.reason)
            await _json(send, 200, info.to_dict())
        else:
            await _json(
                send, 404, {"code": 404, "message": f"no route {method} /{'/'.join(parts)}"}
            )

    async def _run_build(self, build: _Build, start: TemplateBuildStartV2) -> None:
        """Run the steps in a container from the base image (no network), commit it."""

        def log(message: str, level: str = "info") -> None:
            build.logs.append(
                BuildLogEntry(timestamp=_now(), message=message, level=LogLevel(level))
            )

        base = _set(start.from_image)
        users = {"user": "1000:1000", "root": "root"}
        container = ""
        try:
            if not base:
                raise RuntimeError("the fake builds only from a local image (from_image)")
            container = (
                await _docker(
                    "run",
                    "-d",
                    "--network",
                    "none",
                    "--user",
                    "root",
                    "--label",
                    "sandbay-fake-e2b=build",
                    base,
                    "sleep",
                    "infinity",
                )
            ).strip()
            env: dict[str, str] = {}
            user, workdir = "root", "/"
            for step in _set(start.steps) or []:
                args = list(_set(step.args) or [])
                log(f"{step.type_} {' '.join(args)[:200]}")
                if step.type_ == "RUN":
                    as_user = users.get(args[1] if len(args) > 1 else user, "root")
                    flags = [f"--env={k}={v}" for k, v in env.items()]
                    out = await _docker(
                        "exec",
                        "-u",
                        as_user,
                        "-w",
                        workdir,
                        *flags,
                        container,
                        "bash",
                        "-c",
                        args[0],
                    )
                    for line in out.splitlines()[-20:]:
                        log(line)
                elif step.type_ == "ENV":
                    env.update(zip(args[::2], args[1::2], strict=False))
                elif step.type_ == "USER":
                    user = args[0]
                elif step.type_ == "WORKDIR":
                    workdir = args[0]
                    await _docker("exec", "-u", "root", container, "mkdir", "-p", workdir)
                else:
                    raise RuntimeError(f"the fake builder does not run {step.type_} steps")
            image = f"sandbay-fake-e2b/{build.template_id}:{build.build_id}"
            # Not an agent image of the docker provider's, whatever labels the base had.
            image_id = await _docker(
                "commit",
                "--change",
                'CMD ["sh"]',
                "--change",
                "LABEL sandbay.agent.key=fake-e2b-template sandbay-fake-e2b=template",
                container,
                image,
            )
            self.built_images.append(image_id.strip())
            self.templates[build.template_id] = Template(image=image, profile="", users=users)
            build.status = TemplateBuildStatus.READY
            log("build finished")
        except Exception as exc:
            if container:  # what the build container said before it stopped
                said = await _docker("logs", container, check=False)
                exc = RuntimeError(f"{exc}; the build container said: {said[-500:]}")
            log(f"build failed: {exc}", "error")
            build.reason = str(exc)[-1000:]
            build.status = TemplateBuildStatus.ERROR
        finally:
            if container:
                await _docker("rm", "-f", container)

    async def _list(self, query: Mapping[str, list[str]], send: Send) -> None:
        wanted: dict[str, str] = {}
        for raw in query.get("metadata", []):
            # The SDK quotes keys and values, then urlencodes the pairs: undo both.
            for key, value in urllib.parse.parse_qsl(raw, keep_blank_values=True):
                wanted[urllib.parse.unquote(key)] = urllib.parse.unquote(value)
        states = {s for raw in query.get("state", []) for s in raw.split(",") if s}
        if states and "running" not in states:
            await _json(send, 200, [])
            return
        limit = min(int(query.get("limit", [str(self.page_size)])[0]), self.page_size)
        start = query.get("nextToken", [""])[0]
        matching = sorted(
            (
                s
                for s in self.sandboxes.values()
                if all(s.metadata.get(k) == v for k, v in wanted.items())
            ),
            key=lambda s: s.id,
        )
        if start:
            matching = [s for s in matching if s.id >= start]
        page, rest = matching[:limit], matching[limit:]
        extra = {"x-next-token": rest[0].id} if rest else {}
        await _json(send, 200, [s.listed().to_dict() for s in page], extra)

    async def _kill(self, sandbox_id: str) -> None:
        sandbox = self.sandboxes.pop(sandbox_id, None)
        if sandbox is None:
            return
        with self._killed_changed:
            self.killed.append(sandbox_id)
            self._killed_changed.notify_all()
        await sandbox.inner.aclose()
        for task in list(sandbox.tasks):
            task.cancel()

    async def _reap_expired(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = _now()
            for sandbox in list(self.sandboxes.values()):
                if sandbox.end_at <= now:
                    await self._kill(sandbox.id)

    # --- envd over plain HTTP ---

    async def _envd_http(
        self, scope: Scope, receive: Receive, send: Send, headers: Mapping[str, str]
    ) -> None:
        sandbox = self.sandboxes[headers["e2b-sandbox-id"]]
        path: str = scope["path"]
        if path == "/health":
            await _empty(send, 204)
            return
        if path != "/files":
            await _json(send, 404, {"code": 404, "message": "not found"})
            return
        query = dict(urllib.parse.parse_qsl(scope.get("query_string", b"").decode()))
        file_path = query.get("path", "")
        user = query.get("username") or _basic_user(headers) or "user"
        if user not in sandbox.users:
            await _json(send, 401, {"code": 401, "message": f"error looking up user '{user}'"})
            return
        home = "/root" if user == "root" else f"/home/{user}"
        if not file_path.startswith("/"):
            file_path = posixpath.join(home, file_path)
        # envd reads and writes files as root, whatever the user (it only chowns uploads).
        root = sandbox.users.get("root")
        if scope["method"] == "GET":
            result = await sandbox.inner.exec(
                [
                    "sh",
                    "-c",
                    '[ -e "$1" ] || exit 44; [ -d "$1" ] && exit 40; exec cat -- "$1"',
                    "sh",
                    file_path,
                ],
                user=root,
            )
            if result.exit_code == 44:
                await _json(
                    send, 404, {"code": 404, "message": f"path '{file_path}' does not exist"}
                )
            elif result.exit_code == 40:
                await _json(
                    send, 400, {"code": 400, "message": f"path '{file_path}' is a directory"}
                )
            elif result.exit_code != 0:
                await _json(
                    send, 500, {"code": 500, "message": result.stderr.decode(errors="replace")}
                )
            else:
                await _raw(send, 200, result.stdout, "application/octet-stream")
            return
        body = await _body(receive)
        content_type = headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            message = email.parser.BytesParser().parsebytes(
                f"Content-Type: {content_type}\r\n\r\n".encode() + body
            )
            parts = [p for p in message.walk() if not p.is_multipart()]
            data = parts[0].get_payload(decode=True) if parts else b""
            assert isinstance(data, bytes)
        else:
            data = body
        owner = "0:0" if user == "root" else "1000:1000"
        result = await sandbox.inner.exec(
            [
                "sh",
                "-c",
                'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"'
                ' && chown "$2" "$1" 2>/dev/null; true',
                "sh",
                file_path,
                owner,
            ],
            input=data,
            user=root,
        )
        if result.exit_code != 0:
            await _json(send, 500, {"code": 500, "message": result.stderr.decode(errors="replace")})
            return
        name = posixpath.basename(file_path)
        await _json(send, 200, [{"name": name, "type": "file", "path": file_path}])

    # --- processes ---

    async def spawn(
        self, sandbox: _FakeSandbox, request: process_pb.StartRequest, user: str
    ) -> _FakeProcess:
        config = request.process or process_pb.ProcessConfig()
        if user not in sandbox.users:
            raise ConnectError(Code.UNAUTHENTICATED, f"invalid username: '{user}'")
        argv = [config.cmd, *config.args]
        self.started.append(" ".join(argv))
        cwd = config.cwd if config.has_field("cwd") and config.cwd else None
        home = "/root" if user == "root" else f"/home/{user}"
        env = {"HOME": home, "USER": user, **dict(config.envs)}
        try:
            inner = await sandbox.inner.start(
                argv, env=env, cwd=cwd or "/", user=sandbox.users[user]
            )
        except sandbay.SandboxError as exc:
            raise ConnectError(Code.INTERNAL, f"error starting process: {exc}") from exc
        if not request.stdin:
            await inner.close_stdin()
        pid = sandbox.next_pid
        sandbox.next_pid += 1
        proc = _FakeProcess(pid, inner, config, request.tag if request.has_field("tag") else "")
        sandbox.processes[pid] = proc
        proc.stdin_open = bool(request.stdin)
        return proc

    def start_pump(self, sandbox: _FakeSandbox, proc: _FakeProcess) -> None:
        task = asyncio.get_running_loop().create_task(proc.pump(lambda: _forget(sandbox, proc.pid)))
        sandbox.tasks.add(task)
        task.add_done_callback(sandbox.tasks.discard)

    def cut_rule_for(self, proc: _FakeProcess) -> _CutRule | None:
        line = " ".join([proc.config.cmd, *proc.config.args])
        for rule in self.cut_rules:
            if rule.times > 0 and rule.command in line:
                return rule
        return None


class _ProcessService(process_connect.Process):
    """envd's process service over a fake sandbox's executor."""

    def __init__(self, fake: FakeE2B) -> None:
        self.fake = fake

    def _sandbox(self, ctx: RequestContext[Any, Any]) -> _FakeSandbox:
        sandbox_id = ctx.request_headers.get("e2b-sandbox-id") or ""
        sandbox = self.fake.sandboxes.get(sandbox_id)
        if sandbox is None:
            raise ConnectError(Code.UNAVAILABLE, f"The sandbox {sandbox_id} was not found")
        return sandbox

    def _process(self, ctx: RequestContext[Any, Any], selector: Any) -> _FakeProcess:
        sandbox = self._sandbox(ctx)
        pid = selector.selector.value if selector and selector.selector else None
        proc = sandbox.processes.get(pid) if isinstance(pid, int) else None
        if proc is None:
            raise ConnectError(Code.NOT_FOUND, f"process with pid {pid} not found")
        return proc

    async def _stream(
        self,
        proc: _FakeProcess,
        queue: asyncio.Queue[process_pb.ProcessEvent | None],
        ctx: RequestContext[Any, Any],
        cut: _CutRule | None,
    ) -> AsyncIterator[process_pb.ProcessEvent]:
        interval = float(ctx.request_headers.get("keepalive-ping-interval") or 0)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), interval or None)
                except TimeoutError:
                    yield process_pb.ProcessEvent(
                        event=_oneof("keepalive", process_pb.ProcessEvent.KeepAlive())
                    )
                    continue
                if event is None:
                    return
                yield event
                payload = event.event
                data = payload.value if isinstance(payload, Oneof) else None
                output = (
                    data.output if isinstance(data, process_pb.ProcessEvent.DataEvent) else None
                )
                if (
                    cut is not None
                    and isinstance(payload, Oneof)
                    and payload.field == "data"
                    and output is not None
                    and output.field == "stdout"
                    and cut.marker in output.value
                    and cut.times > 0
                ):
                    cut.times -= 1
                    raise _Cut()
        finally:
            proc.unsubscribe(queue)

    async def start(
        self, request: process_pb.StartRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[process_pb.StartResponse]:
        sandbox = self._sandbox(ctx)
        user = _basic_user(ctx.request_headers) or "user"
        proc = await self.fake.spawn(sandbox, request, user)
        queue = proc.subscribe()
        self.fake.start_pump(sandbox, proc)
        cut = self.fake.cut_rule_for(proc)
        hold = self.fake.start_hold_for(proc)
        if hold is not None:
            await hold.wait()  # the process runs meanwhile; its output waits in the queue
        start = process_pb.ProcessEvent.StartEvent(pid=proc.pid)
        yield process_pb.StartResponse(event=process_pb.ProcessEvent(event=_oneof("start", start)))
        async for event in self._stream(proc, queue, ctx, cut):
            yield process_pb.StartResponse(event=event)

    async def connect(
        self, request: process_pb.ConnectRequest, ctx: RequestContext[Any, Any]
    ) -> AsyncIterator[process_pb.ConnectResponse]:
        proc = self._process(ctx, request.process)
        queue = proc.subscribe()
        start = process_pb.ProcessEvent.StartEvent(pid=proc.pid)
        yield process_pb.ConnectResponse(
            event=process_pb.ProcessEvent(event=_oneof("start", start))
        )
        async for event in self._stream(proc, queue, ctx, None):
            yield process_pb.ConnectResponse(event=event)

    async def send_input(
        self, request: process_pb.SendInputRequest, ctx: RequestContext[Any, Any]
    ) -> process_pb.SendInputResponse:
        proc = self._process(ctx, request.process)
        data = request.input.input.value if request.input and request.input.input else b""
        if not proc.stdin_open:
            raise ConnectError(Code.FAILED_PRECONDITION, "stdin is closed")
        try:
            await proc.inner.write(bytes(data))
        except BrokenPipeError as exc:
            raise ConnectError(Code.INTERNAL, f"error writing to stdin: {exc}") from exc
        return process_pb.SendInputResponse()

    async def close_stdin(
        self, request: process_pb.CloseStdinRequest, ctx: RequestContext[Any, Any]
    ) -> process_pb.CloseStdinResponse:
        proc = self._process(ctx, request.process)
        proc.stdin_open = False
        await proc.inner.close_stdin()
        return process_pb.CloseStdinResponse()

    async def send_signal(
        self, request: process_pb.SendSignalRequest, ctx: RequestContext[Any, Any]
    ) -> process_pb.SendSignalResponse:
        proc = self._process(ctx, request.process)
        await proc.inner.kill()  # the executor kills the process and its descendants
        return process_pb.SendSignalResponse()

    async def list(
        self, request: process_pb.ListRequest, ctx: RequestContext[Any, Any]
    ) -> process_pb.ListResponse:
        sandbox = self._sandbox(ctx)
        return process_pb.ListResponse(
            processes=[
                process_pb.ProcessInfo(config=p.config, pid=p.pid, tag=p.tag or None)
                for p in sandbox.processes.values()
            ]
        )


def _forget(sandbox: _FakeSandbox, pid: int) -> None:
    sandbox.processes.pop(pid, None)


def _oneof(field: str, value: Any) -> Any:
    """A oneof value (typed loosely: the generated stubs want a literal field name)."""
    return Oneof(field, value)


def _basic_user(headers: Any) -> str | None:
    value = headers.get("authorization") or ""
    if not value.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(value[6:]).decode()
    except ValueError:
        return None
    return decoded.partition(":")[0] or None


def _set(value: Any) -> Any:
    """A generated model's field, ``None`` where it is UNSET."""
    return None if type(value).__name__ == "Unset" else value


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


async def _docker(*args: str, check: bool = True) -> str:
    """Run the docker CLI; its stdout (stderr folded in). Raises on failure if ``check``."""
    proc = await asyncio.create_subprocess_exec(
        "docker",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    if check and proc.returncode != 0:
        raise RuntimeError(f"docker {args[0]} failed ({proc.returncode}): {text[-2000:]}")
    return text


async def _body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _raw(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    raw = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _json(
    send: Send, status: int, data: Any, headers: Mapping[str, str] | None = None
) -> None:
    await _raw(send, status, json.dumps(data).encode(), "application/json", headers)


async def _empty(send: Send, status: int) -> None:
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})
