"""A fake Daytona control plane on 127.0.0.1 that the real ``daytona`` SDK talks to.

It serves what ``daytona.AsyncDaytona`` 0.226 sends (``DaytonaConfig(api_url=fake.api_url)``):

- the REST API under ``/api``: create (``POST /sandbox``), get, list by labels, delete,
  start/stop, labels, TTL and auto-stop/auto-delete intervals, the toolbox proxy URL; the
  socket.io endpoint answers 404, so the SDK polls ``GET /sandbox/{id}`` for state changes, as
  it does when Daytona's event stream is down;
- the toolbox under ``/toolbox/{sandboxId}``: sessions, session commands (``runAsync``,
  ``suppressInputEcho``: without it input is echoed into the log, as the daemon does), their
  logs over a WebSocket (binary frames, each a ``\\x01\\x01\\x01`` stdout or ``\\x02\\x02\\x02``
  stderr prefix and a chunk; close code 1000 at the end), input, one-shot execute, and bulk
  upload/download.

Its sandboxes really run: each is a private folder whose ``workspace``, ``tmp`` and ``home``
are bind-mounted by bubblewrap over ``/workspace``, ``/tmp`` and ``/root`` of a read-only view
of this machine; every command runs there as a real process tree in its own PID namespace
(so deleting a session or a sandbox leaves nothing behind), sharing the host's network.
With ``docker_image=``, each sandbox is instead a container of that image (sandbay's agent
image) on the host's network, and commands run in it through ``docker exec``.

Faults on demand (`Faults`): 5xx answers to create, a slow ``starting`` state, a logs
WebSocket cut after some bytes, and a TTL that really destroys the sandbox. Unknown ids get
Daytona's 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import MultipartWriter, WSMsgType, web
from daytona_api_client_async.models.sandbox import Sandbox as SandboxModel
from daytona_api_client_async.models.sandbox_list_item import SandboxListItem
from daytona_api_client_async.models.snapshot_dto import SnapshotDto

STDOUT_PREFIX = b"\x01\x01\x01"
STDERR_PREFIX = b"\x02\x02\x02"


@dataclass
class Faults:
    """Failures the fake injects, changeable while it runs.

    Attributes:
        create_errors: The next this many ``POST /sandbox`` answer 503.
        starting_s: New (and restarted) sandboxes stay ``starting`` this long.
        cut_logs: The next this many logs WebSockets are cut (close code 1011) once
            `cut_after_bytes` bytes of log went out on them.
        cut_after_bytes: See `cut_logs`.
        cut_abruptly: Cut by dropping the TCP connection instead of a close frame.
    """

    create_errors: int = 0
    starting_s: float = 0.0
    cut_logs: int = 0
    cut_after_bytes: int = 1
    cut_abruptly: bool = False


@dataclass
class _Command:
    id: str
    command: str
    proc: asyncio.subprocess.Process
    echo: bool
    log: list[bytes] = field(default_factory=list)  # each a prefixed chunk
    exit_code: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    pump: asyncio.Future[None] | None = None


@dataclass
class _Sandbox:
    id: str
    root: str
    labels: dict[str, str]
    env: dict[str, str]
    user: str
    cpu: int
    memory: int
    disk: int
    snapshot: str | None
    auto_stop: int
    auto_delete: int
    destroy_at: float | None
    ready_at: float
    container: str | None = None
    state: str = "starting"
    created: float = field(default_factory=time.time)
    sessions: dict[str, dict[str, _Command]] = field(default_factory=dict)


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).isoformat()


def _error(status: int, message: str) -> web.Response:
    reason = {400: "Bad Request", 404: "Not Found", 409: "Conflict", 503: "Service Unavailable"}
    body = {"statusCode": status, "message": message, "error": reason.get(status, "Error")}
    return web.json_response(body, status=status)


class FakeDaytona:
    """The fake, serving on 127.0.0.1 from a thread of its own.

    Use it as a context manager; `api_url` is what ``DaytonaConfig(api_url=…)`` takes.

    Attributes:
        api_key: The only API key it accepts (as ``Authorization: Bearer``); others get 401.
        faults: Failures to inject (see `Faults`).
        requests: ``(method, path)`` of every request served, in order.
    """

    def __init__(
        self,
        *,
        root: str | None = None,
        docker_image: str | None = None,
        api_key: str = "test-key",
    ) -> None:
        self.docker_image = docker_image
        self.api_key = api_key
        self.faults = Faults()
        self.requests: list[tuple[str, str]] = []
        self._root = tempfile.mkdtemp(prefix="fake-daytona-", dir=root)
        self._sandboxes: dict[str, _Sandbox] = {}
        self._container_user = "root"
        self.snapshots: dict[str, dict[str, Any]] = {}
        """Snapshots by name: the ``CreateSnapshot`` body each was made from (its Dockerfile in
        ``buildInfo``). They build at once; sandboxes from them run as any other here."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    # --- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> FakeDaytona:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(30)
        return self

    def __exit__(self, *exc_info: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()
        shutil.rmtree(self._root, ignore_errors=True)

    @property
    def api_url(self) -> str:
        """The REST API's base URL."""
        return f"http://127.0.0.1:{self.port}/api"

    def sandbox_ids(self) -> list[str]:
        """Ids of the sandboxes that exist (not destroyed)."""
        return list(self._sandboxes)

    def sandbox_labels(self, sandbox_id: str) -> dict[str, str]:
        """A sandbox's labels as the fake holds them."""
        return dict(self._sandboxes[sandbox_id].labels)

    def destroy_at(self, sandbox_id: str) -> float | None:
        """When the sandbox's TTL destroys it (Unix time), if it has one."""
        return self._sandboxes[sandbox_id].destroy_at

    def running_commands(self, sandbox_id: str) -> int:
        """How many session commands of a sandbox are still running."""
        sb = self._sandboxes[sandbox_id]
        return sum(1 for s in sb.sessions.values() for c in s.values() if c.exit_code is None)

    async def _serve(self) -> None:
        app = web.Application(middlewares=[self._record], client_max_size=1 << 30)
        api, box = "/api", "/toolbox/{sid}"
        app.router.add_get(api + "/socket.io/", self._not_found)
        app.router.add_post(api + "/sandbox", self._create)
        app.router.add_get(api + "/sandbox", self._list)
        app.router.add_get(api + "/sandbox/{id}", self._get)
        app.router.add_delete(api + "/sandbox/{id}", self._delete)
        app.router.add_post(api + "/sandbox/{id}/start", self._start)
        app.router.add_post(api + "/sandbox/{id}/stop", self._stop)
        app.router.add_put(api + "/sandbox/{id}/labels", self._labels)
        app.router.add_post(api + "/sandbox/{id}/ttl/{minutes}", self._ttl)
        app.router.add_post(api + "/sandbox/{id}/autostop/{minutes}", self._autostop)
        app.router.add_post(api + "/sandbox/{id}/autodelete/{minutes}", self._autodelete)
        app.router.add_get(api + "/sandbox/{id}/toolbox-proxy-url", self._proxy_url)
        app.router.add_post(api + "/snapshots", self._create_snapshot)
        app.router.add_get(api + "/snapshots/{id}", self._get_snapshot)
        app.router.add_post(box + "/process/session", self._create_session)
        app.router.add_delete(box + "/process/session/{session}", self._delete_session)
        app.router.add_post(box + "/process/session/{session}/exec", self._exec)
        app.router.add_get(box + "/process/session/{session}/command/{cmd}", self._command)
        app.router.add_get(box + "/process/session/{session}/command/{cmd}/logs", self._logs)
        app.router.add_post(box + "/process/session/{session}/command/{cmd}/input", self._input)
        app.router.add_post(box + "/process/execute", self._execute)
        app.router.add_post(box + "/files/bulk-upload", self._upload)
        app.router.add_post(box + "/files/bulk-download", self._download)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._reaper = asyncio.ensure_future(self._reap())

    async def _shutdown(self) -> None:
        self._reaper.cancel()
        for sb in list(self._sandboxes.values()):
            await self._destroy(sb)
        if self._runner is not None:
            await self._runner.cleanup()

    async def _reap(self) -> None:
        """Destroy sandboxes whose TTL ran out, as Daytona does."""
        while True:
            await asyncio.sleep(0.2)
            now = time.time()
            for sb in list(self._sandboxes.values()):
                if sb.destroy_at is not None and now >= sb.destroy_at:
                    await self._destroy(sb)

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        if (
            not request.path.endswith("/socket.io/")
            and request.headers.get("Authorization") != f"Bearer {self.api_key}"
        ):
            body = {"statusCode": 401, "message": "Unauthorized", "error": "Unauthorized"}
            return web.json_response(body, status=401)
        response: web.StreamResponse = await handler(request)
        return response

    # --- REST API ----------------------------------------------------------------------

    async def _not_found(self, request: web.Request) -> web.Response:
        return _error(404, "Cannot GET " + request.path)

    def _find(self, request: web.Request, key: str = "id") -> _Sandbox | None:
        ident = request.match_info[key]
        sb = self._sandboxes.get(ident)
        if sb is None:
            return None
        if sb.state == "starting" and time.time() >= sb.ready_at:
            sb.state = "started"
        return sb

    def _model(self, sb: _Sandbox) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": sb.id,
            "organizationId": "org-fake",
            "name": sb.id,
            "snapshot": sb.snapshot,
            "user": sb.user,
            "env": sb.env,
            "labels": sb.labels,
            "public": False,
            "networkBlockAll": False,
            "kvm": False,
            "target": "us",
            "cpu": sb.cpu,
            "gpu": 0,
            "memory": sb.memory,
            "disk": sb.disk,
            "state": sb.state,
            "autoStopInterval": sb.auto_stop,
            "autoDeleteInterval": sb.auto_delete,
            "autoDestroyAt": _iso(sb.destroy_at),
            "createdAt": _iso(sb.created),
            "updatedAt": _iso(time.time()),
            "toolboxProxyUrl": f"http://127.0.0.1:{self.port}/toolbox",
        }
        # Through the SDK's own model: a field the SDK requires cannot go missing.
        return SandboxModel.from_dict(data).to_dict()  # type: ignore[union-attr]

    async def _create(self, request: web.Request) -> web.Response:
        if self.faults.create_errors > 0:
            self.faults.create_errors -= 1
            return _error(503, "runner capacity exhausted, try again")
        body = await request.json()
        ident = str(uuid.uuid4())
        root = os.path.join(self._root, ident)
        for part in ("workspace", "tmp", "home"):
            os.makedirs(os.path.join(root, part))
        ttl = body.get("ttlMinutes") or 0
        now = time.time()
        sb = _Sandbox(
            id=ident,
            root=root,
            labels=dict(body.get("labels") or {}),
            env=dict(body.get("env") or {}),
            user=body.get("user") or "root",
            cpu=int(body.get("cpu") or 1),
            memory=int(body.get("memory") or 1),
            disk=int(body.get("disk") or 3),
            snapshot=body.get("snapshot"),
            auto_stop=int(body.get("autoStopInterval") or 0),
            auto_delete=int(body.get("autoDeleteInterval") or -1),
            destroy_at=now + ttl * 60 if ttl else None,
            ready_at=now + self.faults.starting_s,
        )
        if self.docker_image is not None:
            sb.container = await self._run_container(sb)
            sb.user = self._container_user
        if sb.ready_at <= now:
            sb.state = "started"
        self._sandboxes[ident] = sb
        return web.json_response(self._model(sb))

    async def _get(self, request: web.Request) -> web.Response:
        sb = self._find(request)
        if sb is None:
            return _error(404, f"Sandbox with ID or name {request.match_info['id']} not found")
        return web.json_response(self._model(sb))

    async def _list(self, request: web.Request) -> web.Response:
        wanted = json.loads(request.query.get("labels") or "{}")
        items = []
        for sb in list(self._sandboxes.values()):
            if all(sb.labels.get(k) == v for k, v in wanted.items()):
                data = self._model(sb)
                items.append(SandboxListItem.from_dict(data).to_dict())  # type: ignore[union-attr]
        return web.json_response({"items": items, "nextCursor": None})

    async def _delete(self, request: web.Request) -> web.Response:
        sb = self._find(request)
        if sb is None:
            return _error(404, f"Sandbox with ID or name {request.match_info['id']} not found")
        await self._destroy(sb)
        return web.json_response(self._model(sb))

    async def _run_container(self, sb: _Sandbox) -> str:
        """A container of `docker_image` on the host's network, idle until told otherwise."""
        assert self.docker_image is not None
        env = [arg for k, v in sb.env.items() for arg in ("-e", f"{k}={v}")]
        name = f"fake-daytona-{sb.id}"
        code, out = await _docker(
            "run", "-d", "--rm", "--network", "host", "--name", name,
            "--label", "sandbay-test=fake-daytona", *env,
            "--entrypoint", "sleep", self.docker_image, "infinity",
        )  # fmt: skip
        if code:
            raise RuntimeError(f"docker run failed: {out.decode(errors='replace')}")
        _, user = await _docker("exec", name, "id", "-un")
        self._container_user = user.decode().strip() or "root"
        return name

    async def _destroy(self, sb: _Sandbox) -> None:
        self._sandboxes.pop(sb.id, None)
        await self._kill_all(sb)
        if sb.container is not None:
            await _docker("rm", "-f", sb.container)
        sb.state = "destroyed"
        await asyncio.to_thread(shutil.rmtree, sb.root, True)

    async def _kill_all(self, sb: _Sandbox) -> None:
        for session in list(sb.sessions.values()):
            for cmd in session.values():
                await _kill(cmd)
        sb.sessions.clear()

    async def _start(self, request: web.Request) -> web.Response:
        sb = self._find(request)
        if sb is None:
            return _error(404, f"Sandbox with ID or name {request.match_info['id']} not found")
        if sb.state != "started":
            sb.ready_at = time.time() + self.faults.starting_s
            sb.state = "starting" if self.faults.starting_s else "started"
        return web.json_response(self._model(sb))

    async def _stop(self, request: web.Request) -> web.Response:
        sb = self._find(request)
        if sb is None:
            return _error(404, f"Sandbox with ID or name {request.match_info['id']} not found")
        await self._kill_all(sb)
        sb.state = "stopped"
        return web.json_response(self._model(sb))

    async def _labels(self, request: web.Request) -> web.Response:
        sb = self._find(request)
        if sb is None:
            return _error(404, f"Sandbox with ID or name {request.match_info['id']} not found")
        sb.labels = dict((await request.json())["labels"])
        return web.json_response({"labels": sb.labels})

    async def _ttl(self, request: web.Request) -> web.Response:
        sb = self._find(request)
        if sb is None:
            return _error(404, f"Sandbox with ID or name {request.match_info['id']} not found")
        minutes = int(request.match_info["minutes"])
        sb.destroy_at = time.time() + minutes * 60 if minutes else None
        return web.json_response(self._model(sb))

    async def _autostop(self, request: web.Request) -> web.Response:
        sb = self._find(request)
        if sb is None:
            return _error(404, f"Sandbox with ID or name {request.match_info['id']} not found")
        sb.auto_stop = int(request.match_info["minutes"])
        return web.json_response(self._model(sb))

    async def _autodelete(self, request: web.Request) -> web.Response:
        sb = self._find(request)
        if sb is None:
            return _error(404, f"Sandbox with ID or name {request.match_info['id']} not found")
        sb.auto_delete = int(request.match_info["minutes"])
        return web.json_response(self._model(sb))

    async def _proxy_url(self, request: web.Request) -> web.Response:
        return web.json_response({"url": f"http://127.0.0.1:{self.port}/toolbox"})

    def _snapshot(self, name: str) -> dict[str, Any]:
        body = self.snapshots[name]
        now = _iso(time.time())
        data = {
            "id": name,
            "general": False,
            "name": name,
            "imageName": body.get("imageName"),
            "state": "active",
            "size": 1.0,
            "entrypoint": None,
            "cpu": body.get("cpu") or 1,
            "gpu": 0,
            "mem": body.get("memory") or 1,
            "disk": body.get("disk") or 3,
            "errorReason": None,
            "createdAt": now,
            "updatedAt": now,
            "lastUsedAt": None,
            "sourceSandboxId": None,
        }
        made = SnapshotDto.from_dict(data)
        assert made is not None
        result: dict[str, Any] = json.loads(made.to_json())
        return result

    async def _create_snapshot(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = body["name"]
        if name in self.snapshots:
            return _error(409, f"snapshot {name} already exists")
        self.snapshots[name] = body
        return web.json_response(self._snapshot(name))

    async def _get_snapshot(self, request: web.Request) -> web.Response:
        name = request.match_info["id"]
        if name not in self.snapshots:
            return _error(404, f"Snapshot {name} not found")
        return web.json_response(self._snapshot(name))

    # --- toolbox -----------------------------------------------------------------------

    def _box(self, request: web.Request) -> _Sandbox | web.Response:
        sb = self._find(request, "sid")
        if sb is None:
            return _error(404, "sandbox not found")
        if sb.state != "started":
            return _error(409, f"sandbox is {sb.state}")
        return sb

    def _session(self, request: web.Request) -> tuple[_Sandbox, dict[str, _Command]] | web.Response:
        sb = self._box(request)
        if isinstance(sb, web.Response):
            return sb
        session = sb.sessions.get(request.match_info["session"])
        if session is None:
            return _error(404, "session not found")
        return sb, session

    def _cmd(self, request: web.Request) -> _Command | web.Response:
        found = self._session(request)
        if isinstance(found, web.Response):
            return found
        cmd = found[1].get(request.match_info["cmd"])
        if cmd is None:
            return _error(404, "command not found")
        return cmd

    async def _create_session(self, request: web.Request) -> web.Response:
        sb = self._box(request)
        if isinstance(sb, web.Response):
            return sb
        name = (await request.json())["sessionId"]
        if name in sb.sessions:
            return _error(409, f"session {name} already exists")
        sb.sessions[name] = {}
        return web.Response(status=201)

    async def _delete_session(self, request: web.Request) -> web.Response:
        found = self._session(request)
        if isinstance(found, web.Response):
            return found
        sb, session = found
        for cmd in session.values():
            await _kill(cmd)
        sb.sessions.pop(request.match_info["session"], None)
        return web.Response(status=204)

    async def _spawn(self, sb: _Sandbox, command: str, *, echo: bool) -> _Command:
        if sb.container is not None:
            # Killing `docker exec` ends the command's stdin, not the command: a session's
            # processes end with their container (what runs under sandbay's shim ends
            # its tree when its input ends).
            argv = ["docker", "exec", "-i", "-w", "/workspace", sb.container]
        else:
            argv = self._bwrap(sb)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            "sh",
            "-c",
            command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env(sb),
            start_new_session=True,
        )
        cmd = _Command(id=str(uuid.uuid4()), command=command, proc=proc, echo=echo)
        cmd.pump = asyncio.ensure_future(_pump(cmd))
        return cmd

    def _env(self, sb: _Sandbox) -> dict[str, str]:
        # Python with the Agent SDK comes first on PATH, as in sandbay's agent image.
        path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
        base = {
            "PATH": os.path.dirname(sys.executable) + os.pathsep + path,
            "HOME": "/root",
            "LANG": "C.UTF-8",
        }
        return {**base, **sb.env}

    def _bwrap(self, sb: _Sandbox) -> list[str]:
        args = ["bwrap", "--tmpfs", "/"]
        private = {"proc", "dev", "tmp", "workspace", "root", "sys"}
        for name in sorted(os.listdir("/")):
            path = "/" + name
            if name in private:
                continue
            if os.path.islink(path):
                args += ["--symlink", os.readlink(path), path]
            else:
                args += ["--ro-bind", path, path]
        args += ["--ro-bind", "/sys", "/sys", "--proc", "/proc", "--dev", "/dev"]
        args += ["--bind", os.path.join(sb.root, "workspace"), "/workspace"]
        args += ["--bind", os.path.join(sb.root, "tmp"), "/tmp"]
        args += ["--bind", os.path.join(sb.root, "home"), "/root"]
        pyenv = "/root/.pyenv"
        if os.path.isdir(pyenv):
            args += ["--ro-bind", pyenv, pyenv]
        # The host's Python environment (and with it the bundled claude CLI), where it lies
        # under a directory the sandbox gets its own of (a checkout under /tmp, say).
        for prefix in sorted({sys.prefix, sys.base_prefix}):
            top = prefix.strip("/").split("/", 1)[0]
            if top in private and os.path.isdir(prefix):
                args += ["--ro-bind", prefix, prefix]
        args += ["--unshare-pid", "--die-with-parent", "--chdir", "/workspace", "--"]
        return args

    async def _exec(self, request: web.Request) -> web.Response:
        found = self._session(request)
        if isinstance(found, web.Response):
            return found
        sb, session = found
        body = await request.json()
        cmd = await self._spawn(sb, body["command"], echo=not body.get("suppressInputEcho"))
        session[cmd.id] = cmd
        if body.get("runAsync") or body.get("async"):
            return web.json_response({"cmdId": cmd.id}, status=202)
        await cmd.done.wait()
        out, err = _split(cmd.log)
        return web.json_response(
            {
                "cmdId": cmd.id,
                "exitCode": cmd.exit_code,
                "output": (out + err).decode(errors="replace"),
                "stdout": out.decode(errors="replace"),
                "stderr": err.decode(errors="replace"),
            }
        )

    async def _command(self, request: web.Request) -> web.Response:
        cmd = self._cmd(request)
        if isinstance(cmd, web.Response):
            return cmd
        return web.json_response({"id": cmd.id, "command": cmd.command, "exitCode": cmd.exit_code})

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        cmd = self._cmd(request)
        if isinstance(cmd, web.Response):
            return cmd
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(text=b"".join(cmd.log).decode(errors="replace"))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        cut = self.faults.cut_logs > 0
        if cut:
            self.faults.cut_logs -= 1
        sent = index = 0
        while True:
            async with cmd.changed:
                await cmd.changed.wait_for(functools.partial(_news, cmd, index))
                chunks = cmd.log[index:]
                index = len(cmd.log)
                finished = cmd.done.is_set() and index == len(cmd.log)
            for chunk in chunks:
                if cut and sent + len(chunk) >= self.faults.cut_after_bytes:
                    # Part of the chunk goes out, then the connection breaks.
                    part = max(self.faults.cut_after_bytes - sent, 0)
                    if part:
                        await ws.send_bytes(chunk[:part])
                    if self.faults.cut_abruptly and request.transport is not None:
                        request.transport.abort()
                    else:
                        await ws.close(code=1011, message=b"upstream connection lost")
                    return ws
                await ws.send_bytes(chunk)
                sent += len(chunk)
            if finished:
                break
        await ws.close(code=1000)
        with contextlib.suppress(Exception):
            async for msg in ws:
                if msg.type == WSMsgType.CLOSE:
                    break
        return ws

    async def _input(self, request: web.Request) -> web.Response:
        cmd = self._cmd(request)
        if isinstance(cmd, web.Response):
            return cmd
        data = (await request.json())["data"].encode()
        if cmd.exit_code is not None or cmd.proc.stdin is None:
            return _error(400, "command is not running")
        if cmd.echo:
            await _append(cmd, STDOUT_PREFIX + data)
        try:
            cmd.proc.stdin.write(data)
            await cmd.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            return _error(400, "command is not reading input")
        return web.Response(status=204)

    async def _execute(self, request: web.Request) -> web.Response:
        sb = self._box(request)
        if isinstance(sb, web.Response):
            return sb
        body = await request.json()
        command = body["command"]
        if body.get("cwd"):
            command = f"cd {_quote(body['cwd'])} && {command}"
        cmd = await self._spawn(sb, command, echo=False)
        assert cmd.proc.stdin is not None
        cmd.proc.stdin.close()
        await cmd.done.wait()
        out, err = _split(cmd.log)
        return web.json_response({"exitCode": cmd.exit_code, "result": (out + err).decode()})

    def _host_path(self, sb: _Sandbox, path: str) -> str | None:
        for inside, part in (("/workspace", "workspace"), ("/tmp", "tmp"), ("/root", "home")):
            if path == inside or path.startswith(inside + "/"):
                rest = os.path.normpath(path[len(inside) :].lstrip("/"))
                if rest.startswith(".."):
                    return None
                return os.path.join(sb.root, part, "" if rest == "." else rest)
        return None

    async def _upload(self, request: web.Request) -> web.Response:
        sb = self._box(request)
        if isinstance(sb, web.Response):
            return sb
        reader = await request.multipart()
        paths: dict[str, str] = {}
        while (part := await reader.next()) is not None:
            name = part.name or ""  # type: ignore[union-attr]
            index, _, kind = name.partition("].")
            if kind == "path":
                paths[index] = (await part.read()).decode()  # type: ignore[union-attr]
            elif kind == "file":
                path = paths.get(index)
                target = self._host_path(sb, path) if path else None
                if target is None and sb.container is None:
                    return _error(400, f"cannot write {path!r}: read-only file system")
                data = await part.read()  # type: ignore[union-attr]
                if sb.container is not None:
                    script = 'mkdir -p "$(dirname "$1")" && cat > "$1"'
                    code, out = await _docker(
                        "exec", "-i", sb.container, "sh", "-c", script, "sh", str(path), input=data
                    )
                    if code:
                        return _error(400, f"cannot write {path!r}: {out.decode(errors='replace')}")
                elif target is not None:
                    await asyncio.to_thread(_write, target, data)
        return web.Response(status=200)

    async def _download(self, request: web.Request) -> web.StreamResponse:
        sb = self._box(request)
        if isinstance(sb, web.Response):
            return sb
        paths = (await request.json())["paths"]
        with MultipartWriter("form-data") as mp:
            for path in paths:
                target = self._host_path(sb, path)
                try:
                    if sb.container is not None:
                        code, data = await _docker("exec", sb.container, "cat", path)
                        if code:
                            raise FileNotFoundError(path)
                    elif target is None:
                        raise FileNotFoundError(path)
                    else:
                        data = await asyncio.to_thread(_read, target)
                    part = mp.append(data, {"Content-Type": "application/octet-stream"})
                    part.set_content_disposition(
                        "form-data", quote_fields=False, name="file", filename=path
                    )
                except OSError as exc:
                    err = json.dumps({"message": str(exc), "statusCode": 404})
                    part = mp.append(err, {"Content-Type": "application/json"})
                    part.set_content_disposition(
                        "form-data", quote_fields=False, name="error", filename=path
                    )
        response = web.Response(body=mp)
        return response


async def _docker(*args: str, input: bytes | None = None) -> tuple[int, bytes]:
    proc = await asyncio.create_subprocess_exec(
        "docker",
        *args,
        stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate(input)
    return proc.returncode or 0, out


async def _append(cmd: _Command, chunk: bytes) -> None:
    async with cmd.changed:
        cmd.log.append(chunk)
        cmd.changed.notify_all()


async def _pump(cmd: _Command) -> None:
    async def read(stream: asyncio.StreamReader | None, prefix: bytes) -> None:
        assert stream is not None
        while chunk := await stream.read(65536):
            await _append(cmd, prefix + chunk)

    await asyncio.gather(read(cmd.proc.stdout, STDOUT_PREFIX), read(cmd.proc.stderr, STDERR_PREFIX))
    code = await cmd.proc.wait()
    async with cmd.changed:
        cmd.exit_code = code if code >= 0 else 128 - code
        cmd.done.set()
        cmd.changed.notify_all()


async def _kill(cmd: _Command) -> None:
    if cmd.exit_code is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cmd.proc.pid, signal.SIGKILL)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(cmd.done.wait(), 10)


def _news(cmd: _Command, index: int) -> bool:
    return index < len(cmd.log) or cmd.done.is_set()


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _split(log: list[bytes]) -> tuple[bytes, bytes]:
    out = b"".join(c[3:] for c in log if c.startswith(STDOUT_PREFIX))
    err = b"".join(c[3:] for c in log if c.startswith(STDERR_PREFIX))
    return out, err


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


@contextlib.contextmanager
def running() -> Iterator[FakeDaytona]:
    """A fake for the length of a ``with`` block."""
    with FakeDaytona() as fake:
        yield fake
