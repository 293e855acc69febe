"""`SandboxTransport`: the Agent SDK runs on the host, the ``claude`` CLI inside a sandbox.

The SDK's public seam for this is a custom `claude_agent_sdk.Transport`: it writes the CLI's
stdin lines and reads its stdout messages. This one runs the CLI through sandbay's relay
(``_relay/relay.py``, standard library only), uploaded into the sandbox: the relay starts
the CLI, passes stdin on in order, and returns each stdout line in a checked envelope
(``_relay/wire.py``) that it also logs with a sequence number. Everything else (the control
protocol, hooks, ``can_use_tool``, SDK MCP servers, message parsing) is the SDK's own code,
running here, unchanged::

    async with sandbay.open_sandbox("docker") as sb:
        transport = sandbay.SandboxTransport(sb, options)
        async for message in query(prompt="...", options=options, transport=transport):
            ...

If the stream from the relay breaks while the CLI runs on, the transport reattaches with
the relay's ``replay`` from the last sequence number it saw, without loss or duplication.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import importlib.resources
import importlib.util
import json
import marshal
import posixpath
import re
import shlex
import uuid
import zlib
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Mapping,
)
from contextlib import aclosing
from typing import Any

import anyio
import sniffio
from claude_agent_sdk import ClaudeAgentOptions, Transport
from claude_agent_sdk import __version__ as sdk_version
from claude_agent_sdk._internal.transport.subprocess_cli import SubprocessCLITransport
from typing_extensions import override

from ._agent import (
    MAX_DEPTH,
    MAX_SEQ,
    RECONNECTS,
    _exit_code,
    _is_finite_number,
    _kill,
    _nests_deeper,
    _show_value,
    _tail,
    agent_env,
    check_credentials,
    check_sandbox,
    sandbox_agent_env,
    stderr_tail,
)
from ._egress import ACK as EGRESS_ACK
from ._egress import CLOSE as EGRESS_CLOSE
from ._egress import OPEN as EGRESS_OPEN
from ._egress import SEND as EGRESS_SEND
from ._egress import EgressGate
from ._errors import AgentError, ConfigError, ProtocolError
from ._model_relay import METHOD as MODEL_METHOD
from ._model_relay import ModelRelay, model_relay_wanted, relay_for
from ._relay import wire
from ._sandbox import CLOSE_TIMEOUT, Process, Sandbox
from ._tool_gate import ToolGate

__all__ = [
    "CHECKED_SDK_VERSIONS",
    "Frame",
    "RequestError",
    "RequestHandler",
    "RequestServer",
    "RunInput",
    "SandboxTransport",
    "check_tenant",
    "cli_argv",
    "cli_env",
    "tenant_options",
]

#: claude-agent-sdk releases whose CLI argv builder `cli_argv` was checked against (the
#: test of `cli_argv` pins its output for representative options).
CHECKED_SDK_VERSIONS = ("0.2.186", "0.2.187", "0.2.188", "0.2.189")
#: Longest envelope line accepted: a CLI line at the relay's bound plus the envelope around it.
MAX_FRAME_BYTES = wire.MAX_LINE + 1024
#: Seconds `SandboxTransport.close` lets the CLI finish after its input ended (it flushes
#: its transcript), as the SDK's own transport does, before it is killed.
CLOSE_GRACE_S = 5.0
_RELAY_FILES = ("relay.py", "wire.py")
#: CLI message types the SDK consumes itself and never passes on.
_CONTROL_TYPES = wire.SDK_HANDLED_TYPES
#: argv[0] placeholder when the relay is to find the CLI itself.
_FIND_CLI = "claude"
#: Writes $2 bytes of stdin to $1 whole (a new file renamed over it), readable by all,
#: writable by the relay's user only. It reads exactly that many, so it needs no end of file
#: on stdin (which some providers cannot send).
_INSTALL = (
    'umask 022 && mkdir -p -- "${1%/*}" && head -c "$2" >"$1.$$" '
    '&& [ "$(wc -c <"$1.$$")" -eq "$2" ] && mv -f -- "$1.$$" "$1"'
)
#: Reads the first line of stdin, a JSON object that carries the relay's files (``code``,
#: `_relay_code`) and, for ``serve``, the start frame's fields; installs the files into the
#: directory argv[1] (each replaced whole, only where it changed), with their compiled
#: bytecode where this Python reads the host's, and runs the relay there with the rest of
#: argv (and the start frame without its code, noting when this process began). Every relay
#: command starts this way: one process start where a cold start took three (two installs
#: and the relay), no compiling where the bytecode fits, and no command finds the files
#: missing or half written.
_BOOT = """\
import time
boot = time.monotonic()
import binascii, json, os, sys, zlib
where = sys.argv[1]
first = sys.stdin.buffer.readline(64 << 20)
try:
    frame = json.loads(first)
    code = json.loads(zlib.decompress(binascii.a2b_base64(frame.pop("code"))))
    files = {str(name): str(text).encode() for name, text in code["files"].items()}
    magic = getattr(sys.modules.get("_frozen_importlib_external"), "MAGIC_NUMBER", b"")
    if magic.hex() == code["magic"] and sys.implementation.cache_tag:
        for name, data in code["pyc"].items():
            pyc = f"__pycache__/{name[:-3]}.{sys.implementation.cache_tag}.pyc"
            files[pyc] = binascii.a2b_base64(data)
except (ValueError, KeyError, TypeError, AttributeError, zlib.error):
    files, frame = {}, None
for name, data in files.items():
    path = os.path.join(where, name)
    try:
        with open(path, "rb") as fh:
            same = fh.read() == data
    except OSError:
        same = False
    if not same:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        part = f"{path}.{os.getpid()}"
        with open(part, "wb") as fh:
            fh.write(data)
        os.chmod(part, 0o644)
        os.replace(part, path)
sys.path.insert(0, where)
sys.argv = [os.path.join(where, "relay.py"), *sys.argv[2:]]
import relay
if frame:
    frame["boot_ms"] = round(boot * 1000, 3)
start = first if frame is None else json.dumps(frame).encode() + b"\\n" if frame else None
sys.exit(relay.main(sys.argv[1:], start_line=start))
"""
#: Python flags of the relay: no PYTHON* variables, no user or site directories (no .pth
#: file anyone planted runs in it), only the standard library and the relay's own files.
RELAY_PYTHON_FLAGS = ("-E", "-s", "-S")


#: Answers one request of the relay: gets its payload and a function that sends a reply part
#: (``final: false``) to the sandbox; returns the final reply's data. Raise `RequestError`
#: to answer with an error; any other exception is answered as an internal error.
RequestHandler = Callable[
    [dict[str, Any], Callable[[dict[str, Any]], Awaitable[None]]], Awaitable[dict[str, Any]]
]


class RequestError(Exception):
    """Raised by a `RequestHandler`: the relay's request is answered with this error.

    Args:
        kind: A short name for the error (``Unauthorized``, ``BadRequest``, …).
        message: What went wrong, for the sandbox's side.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


@dataclasses.dataclass(frozen=True)
class Frame:
    """One checked envelope from the relay.

    Attributes:
        seq: Sequence number (``line``, ``end``, ``error``); 0 for the unlogged kinds.
        kind: One of `wire.KINDS`.
        data: The payload; for ``line``, the CLI's stream-json message as a dict.
    """

    seq: int
    kind: str
    data: dict[str, Any]


def cli_argv(options: ClaudeAgentOptions, *, cli: str = _FIND_CLI) -> list[str]:
    """The ``claude`` command line the Agent SDK would run for ``options``, with ``cli`` first.

    The SDK applies none of its CLI-flag options to a custom transport, so the transport
    must: this is the one place that does, with the SDK's own builder (constructing its
    subprocess transport spawns nothing). A ``can_use_tool`` callback routes permission
    prompts over the control protocol (``--permission-prompt-tool stdio``), as the SDK does
    before it builds its own transport. Checked against `CHECKED_SDK_VERSIONS`.

    Raises:
        ConfigError: The options cannot be turned into a command line (the SDK's own
            checks), or the installed SDK no longer has the builder.
    """
    if options.can_use_tool is not None:
        if options.permission_prompt_tool_name:
            raise ConfigError(
                "ClaudeAgentOptions: give can_use_tool or permission_prompt_tool_name, not both"
            )
        options = dataclasses.replace(options, permission_prompt_tool_name="stdio")
    try:
        builder = SubprocessCLITransport("", dataclasses.replace(options, cli_path=cli))
        return list(builder._build_command())
    except AttributeError as exc:  # pragma: no cover - only on an unchecked SDK
        raise ConfigError(
            f"claude-agent-sdk {sdk_version} has no CLI argv builder sandbay knows "
            f"(checked: {', '.join(CHECKED_SDK_VERSIONS)}): {exc}"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"ClaudeAgentOptions cannot start the claude CLI: {exc}") from None


def cli_env(
    sandbox: Sandbox, options: ClaudeAgentOptions, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The variables the CLI gets in ``sandbox``, on top of the sandbox's own environment.

    What the SDK's own transport sets (never the host's whole environment), ``options.env``,
    then the forwarded auth/endpoint variables and ``env`` (`agent_env`), and ``IS_SANDBOX``
    only where the sandbox is isolated (`sandbox_agent_env`). They travel to the relay on its
    stdin, never in argv or the sandbox's environment.
    """
    out = {"CLAUDE_CODE_ENTRYPOINT": "sdk-py", **options.env, **agent_env(env)}
    out["CLAUDE_AGENT_SDK_VERSION"] = sdk_version
    if options.client_app is not None:
        out["CLAUDE_AGENT_SDK_CLIENT_APP"] = options.client_app
    if not any(key.upper() == "CLAUDE_CODE_SDK_READS_SESSION_STATE" for key in out):
        out["CLAUDE_CODE_SDK_READS_SESSION_STATE"] = "1"
    if options.enable_file_checkpointing:
        out["CLAUDE_CODE_ENABLE_SDK_FILE_CHECKPOINTING"] = "true"
    return sandbox_agent_env(sandbox, out)


_TENANT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")


def check_tenant(tenant: str | None) -> None:
    """Refuse a tenant name that cannot name a directory of its own.

    Raises:
        ConfigError: Not 1 to 64 letters, digits, ``_``, ``.`` or ``-`` (not starting with
            ``.``).
    """
    if tenant is not None and not (isinstance(tenant, str) and _TENANT_NAME.fullmatch(tenant)):
        raise ConfigError(
            f"tenant {tenant!r}: use 1 to 64 letters, digits, '_', '.' or '-', not starting "
            "with '.'"
        )


def tenant_options(
    sandbox: Sandbox, options: ClaudeAgentOptions, tenant: str, env: dict[str, str]
) -> tuple[ClaudeAgentOptions, str]:
    """The options and working directory of ``tenant``'s CLI; its variables go into ``env``.

    Its own working directory, ``HOME``, ``CLAUDE_CONFIG_DIR`` and ``TMPDIR``, no setting
    sources (no settings file, hook or CLAUDE.md that anyone planted is loaded) and no auto
    memory.

    Raises:
        ConfigError: ``options.cwd`` leads outside the tenant's working directory, or
            ``CLAUDE_CONFIG_DIR`` is set to another directory than the tenant's.
    """
    dirs = sandbox.tenant_dirs(tenant)
    cwd = dirs.work
    if options.cwd:
        given = str(options.cwd)
        cwd = posixpath.normpath(given if given.startswith("/") else f"{dirs.work}/{given}")
        if cwd != dirs.work and not cwd.startswith(dirs.work + "/"):
            raise ConfigError(
                f"options.cwd={given!r} is outside tenant {tenant!r}'s working directory "
                f"{dirs.work}; give a path inside it (relative paths are taken inside it)"
            )
    configured = env.get("CLAUDE_CONFIG_DIR")
    if configured and posixpath.normpath(configured) != dirs.config_dir:
        raise ConfigError(
            f"CLAUDE_CONFIG_DIR={configured!r} is not tenant {tenant!r}'s own "
            f"({dirs.config_dir}); leave it unset with a tenant"
        )
    env.update(
        {
            "CLAUDE_CONFIG_DIR": dirs.config_dir,
            "HOME": dirs.home,
            "TMPDIR": dirs.tmp,
            "CLAUDE_CODE_DISABLE_AUTO_MEMORY": "1",
        }
    )
    return dataclasses.replace(options, setting_sources=[], cwd=cwd), cwd


def check_egress(egress: object, model_relay: bool | None) -> None:
    """Refuse a run the sandbox's egress policy (`SandboxSpec.egress`) cannot carry."""
    if egress == "none":
        raise ConfigError(
            "this sandbox has egress='none': it reaches nothing, not even the model; create "
            "it with egress='model' (the model only) to run an agent in it"
        )
    if egress is not None and model_relay is False:
        raise ConfigError(
            f"egress={egress!r} reaches the model only through sandbay's model relay: "
            "drop model_relay=False"
        )


@functools.cache
def _relay_code() -> str:
    """The relay's files for `_BOOT`: their text and this Python's bytecode of each (a
    hash-based pyc, which Python uses only while the source beside it has the hash it
    records, so a relay.py replaced another way is never run from stale bytecode),
    zlib-compressed in base64. Made once per process."""
    pyc: dict[str, str] = {}
    for name in _RELAY_FILES:
        source = relay_source(name)
        bytecode = compile(source, name, "exec", dont_inherit=True)
        header = importlib.util.MAGIC_NUMBER + (0b11).to_bytes(4, "little")  # hash, checked
        data = header + importlib.util.source_hash(source) + marshal.dumps(bytecode)
        pyc[name] = base64.b64encode(data).decode("ascii")
    code = {
        "files": {name: relay_source(name).decode() for name in _RELAY_FILES},
        "magic": importlib.util.MAGIC_NUMBER.hex(),
        "pyc": pyc,
    }
    return base64.b64encode(zlib.compress(json.dumps(code).encode(), 6)).decode("ascii")


async def start_relay_command(sandbox: Sandbox, command: str, *args: str) -> Process:
    """Start the relay's ``command`` (``replay``, ``attach``) on the relay's side of
    ``sandbox`` (`Sandbox.start_relay`), its code sent along (`_BOOT`)."""
    argv = [sandbox.python, *RELAY_PYTHON_FLAGS, "-c", _BOOT, f"{sandbox.relay_dir}/relay"]
    proc = await sandbox.start_relay([*argv, command, *args])
    try:
        await proc.write(json.dumps({"code": _relay_code()}).encode() + b"\n")
    except BrokenPipeError:
        pass  # it failed at once: its output and exit code say why
    return proc


@functools.cache
def relay_source(name: str) -> bytes:
    """One of the relay's files, as uploaded into sandboxes (read once per process)."""
    return importlib.resources.files("sandbay._relay").joinpath(name).read_bytes()


class SandboxTransport(Transport):
    """A `claude_agent_sdk.Transport` whose ``claude`` CLI runs inside a sandbox.

    Give it to ``query(prompt=..., options=options, transport=...)`` or
    ``ClaudeSDKClient(options, transport=...)`` with the same ``options``: the SDK runs
    here, hooks, ``can_use_tool`` and SDK MCP servers included, and the CLI (with its tools)
    runs in ``sandbox``. One transport runs one CLI; the sandbox stays open after it.

    Args:
        sandbox: An open sandbox with Python 3.10+ and a ``claude`` CLI: bundled with a
            claude-agent-sdk its Python can import (the local providers: the host's), else
            on ``PATH`` (the agent image: ``/opt/sandbay/bin/claude``).
        options: The options the SDK is given; their CLI flags are applied here
            (`cli_argv`). ``cwd`` is a path in the sandbox (default its workdir);
            ``cli_path``, if set, is the CLI's path in the sandbox.
        env: Variables for the CLI on top of ``options.env`` and the forwarded auth and
            endpoint variables (``ANTHROPIC_API_KEY``, ``ANTHROPIC_BASE_URL``, …).
        run_id: Names the run's directory under ``sandbox.relay_dir`` (default random).
        reconnects: How often a broken stream is reattached before `AgentError`.
        tenant: Run for this tenant (letters, digits, ``_``, ``.``, ``-``): the CLI gets the
            tenant's own working directory, ``HOME``, ``CLAUDE_CONFIG_DIR`` and ``TMPDIR``
            (`Sandbox.tenant_dirs`), ``setting_sources=[]`` and
            ``CLAUDE_CODE_DISABLE_AUTO_MEMORY=1``, and runs where the sandbox keeps it from
            other tenants' files (`Sandbox.cli_launch`). A relative ``options.cwd`` is
            taken inside the tenant's working directory.
        keep_input_s: If this process's stream to the relay breaks without the input
            ended (it crashed, or the provider dropped the connection), the CLI's input
            stays open this long for a writer in another process (`RunInput`,
            `ResumedRun.write`) to take over; 0 (the default) ends it at once, so a
            one-shot run finishes by itself.
        model_relay: Whether the CLI reaches the model through the relay's channel with a
            per-run token, the real credential staying here (`sandbay._model_relay`). By
            default it does when the CLI's environment carries ``ANTHROPIC_API_KEY`` or
            ``ANTHROPIC_AUTH_TOKEN`` (from ``options.env``, ``env`` or this process's
            environment) and no other backend is set up; ``SANDBAY_MODEL_RELAY=0`` turns
            that default off. ``False`` sends the credential into the sandbox as before.

    Attributes:
        run_id: The run's id in the sandbox.
        last_seq: Sequence number of the last logged envelope received.
        exit_code: The CLI's exit code once it ended, else ``None``.
        cli_pid: The CLI's process id inside the sandbox, once the relay started it.
    """

    def __init__(
        self,
        sandbox: Sandbox,
        options: ClaudeAgentOptions | None = None,
        *,
        env: Mapping[str, str] | None = None,
        run_id: str | None = None,
        reconnects: int = RECONNECTS,
        tenant: str | None = None,
        keep_input_s: float = 0.0,
        model_relay: bool | None = None,
    ) -> None:
        check_tenant(tenant)
        self.tenant = tenant
        if not 0 <= keep_input_s <= 7 * 86400:
            raise ConfigError(f"keep_input_s must be 0 to a week in seconds, got {keep_input_s}")
        self.keep_input_s = keep_input_s
        self._model_relay_setting = model_relay
        #: The run's model relay, once connected through one (`model_relay`).
        self.model_relay: ModelRelay | None = None
        #: The run's egress proxy on the host, with `SandboxSpec.egress` a list of hosts.
        self.egress: EgressGate | None = None
        self.sandbox = sandbox
        self.options = options if options is not None else ClaudeAgentOptions()
        self.run_id = run_id or uuid.uuid4().hex[:16]
        self.last_seq = 0
        self.exit_code: int | None = None
        self.cli_pid: int | None = None
        self._env = dict(env or {})
        self._reconnects = reconnects
        self._proc: Process | None = None
        self._replays: list[Process] = []
        self._ready = False
        self._closing = False
        self._ended = False
        self._input_ended = False
        self._write_lock = anyio.Lock()
        self._stderr_tail: list[str] = []
        self._uploaded = False
        # Messages handed to the SDK that it may pass on to its reader, by identity: seq.
        self._seqs: dict[int, tuple[int, dict[str, Any]]] = {}
        self._lines: AsyncIterator[bytes] | None = None
        #: The relay's milestones in the sandbox (`wire.TIMING_NAMES`, monotonic ms there).
        self.sandbox_timings: dict[str, float] = {}
        #: Number of the last input written to the CLI (inputs are numbered from 1).
        self.input_seq = 0
        self._handlers: dict[str, RequestHandler] = {}
        self._inflight: dict[int, _Task] = {}
        #: Lets an SDK MCP tool call reach the SDK only as the model could (`_tool_gate`).
        self.tool_gate = ToolGate.for_options(self.options)

    def handle_requests(self, method: str, handler: RequestHandler) -> None:
        """Answer the relay's requests of ``method`` with ``handler`` (before `connect`).

        Requests run concurrently, each in its own task, while the CLI's messages are read;
        `close` cancels those still running. A request of a method without a handler is
        answered with an ``UnknownMethod`` error.
        """
        if not wire.METHOD_PATTERN.fullmatch(method):
            raise ConfigError(f"not a request method: {method!r} (lower-case words and dots)")
        self._handlers[method] = handler

    @property
    def run_dir(self) -> str:
        """The run's directory in the sandbox: the relay's log and stderr (the relay's alone)."""
        return f"{self.sandbox.relay_dir}/runs/{self.run_id}"

    def _relay_path(self, name: str) -> str:
        return f"{self.sandbox.relay_dir}/relay/{name}"

    async def upload(self) -> None:
        """Upload the relay's files into the sandbox (once; `connect` does it if not done).

        Written by a process on the relay's side (`Sandbox.start_relay`), so where the relay
        is separated from the CLI, the CLI's tools cannot change the code the relay runs.
        """
        if self._uploaded:
            return
        async with anyio.create_task_group() as tg:
            for name in _RELAY_FILES:
                tg.start_soon(self._install, self._relay_path(name), relay_source(name))
        self._uploaded = True

    async def _install(self, path: str, data: bytes) -> None:
        proc = await self.sandbox.start_relay(["sh", "-c", _INSTALL, "sh", path, str(len(data))])
        try:
            with anyio.fail_after(CLOSE_TIMEOUT):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(proc.stderr.read)
                    try:
                        await proc.write(data)
                    except BrokenPipeError:
                        pass  # it failed: its exit code says so
                    await proc.close_stdin()
                code = await proc.wait()
        finally:
            await _kill(proc)
        if code != 0:
            raise AgentError(
                f"could not install sandbay's relay at {path} in the sandbox (exit code {code})",
                exit_code=code,
                provider=self.sandbox.provider,
                sandbox_id=self.sandbox.id,
            )

    @override
    async def connect(self) -> None:
        """Upload the relay, start it and send it the CLI's argv and environment.

        Returns once the relay is started; the CLI's start-up overlaps the SDK's first
        writes (they queue on the relay's stdin).

        Raises:
            ConfigError: No credentials for the model, options the sandbox refuses
                (``bypassPermissions`` where it is not isolated, a loopback model URL it
                cannot reach), or options with no command line.
            AgentError: The relay exited at once (no Python in the sandbox, say), with its
                exit code and stderr.
            SandboxError: The sandbox could not start the relay.
        """
        if self._proc is not None:
            return
        options = self.options
        env = cli_env(self.sandbox, options, self._env)
        check_credentials(env, self.sandbox.spec.env)
        relay: ModelRelay | None = None
        option_env = dict(options.env)
        egress = self.sandbox.spec.egress
        check_egress(egress, self._model_relay_setting)
        wanted = self._model_relay_setting if egress is None else True
        if model_relay_wanted(env, wanted):
            relay = relay_for(env)
        if egress is not None and relay is None:
            raise ConfigError(
                f"egress={egress!r} lets the sandbox reach the model only through sandbay's "
                "model relay, which needs ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN (not "
                "Bedrock, Vertex, Foundry or an OAuth token)"
            )
        if relay is not None:
            env = relay.sandbox_env(env)
            # The endpoint is reached from here, so a loopback one is fine.
            option_env.pop("ANTHROPIC_BASE_URL", None)
        check_sandbox(
            self.sandbox,
            wire_options={
                "permission_mode": options.permission_mode,
                "extra_args": options.extra_args,
                "env": option_env,
            },
            env=env,
        )
        cwd = self.sandbox.resolve(str(options.cwd)) if options.cwd else self.sandbox.workdir
        if self.tenant is not None:
            options, cwd = tenant_options(self.sandbox, options, self.tenant, env)
        cli = str(options.cli_path) if options.cli_path is not None else _FIND_CLI
        argv = cli_argv(options, cli=cli)
        env["PWD"] = cwd
        egress_proxy: str | None = None
        namespace = self.sandbox.relay_separation == "namespace"
        if isinstance(egress, tuple) or (egress == "model" and namespace):
            # Where the relay is outside the CLI's namespace, the CLI reaches even the model
            # listener only through the proxy (a policy of "model" then allows nothing else).
            if namespace:
                egress_proxy = f"unix:{self.run_dir}/egress.sock"
                launch = await self.sandbox.egress_cli_launch(
                    cwd=cwd, tenant=self.tenant, socket=egress_proxy[5:]
                )
            else:
                egress_proxy = "tcp"
                launch = await self.sandbox.cli_launch(cwd=cwd, tenant=self.tenant)
            self.egress = EgressGate(egress if isinstance(egress, tuple) else ())
            self.handle_requests(EGRESS_OPEN, self.egress.handle_open)
            self.handle_requests(EGRESS_SEND, self.egress.handle_send)
            self.handle_requests(EGRESS_ACK, self.egress.handle_ack)
            self.handle_requests(EGRESS_CLOSE, self.egress.handle_close)
        else:
            launch = await self.sandbox.cli_launch(cwd=cwd, tenant=self.tenant)
        flags: list[str] = []
        if launch.user is not None:
            flags += ["--cli-user", launch.user]
        if self.tenant is not None and launch.tenant_root is not None:
            flags += ["--tenant", self.tenant, "--tenant-root", launch.tenant_root]
        if launch.wrapper:
            flags += ["--cli-wrapper", json.dumps(list(launch.wrapper))]
        if launch.socket_dir is not None:
            flags += ["--socket-dir", launch.socket_dir]
            flags += ["--socket-dir-inner", launch.socket_dir_inner or launch.socket_dir]
        start = wire.host_frame(
            "start",
            argv=argv,
            env=env,
            cwd=cwd,
            find_cli=options.cli_path is None,
            keep_input_s=self.keep_input_s,
            model_listener=relay is not None,
            **({"egress_proxy": egress_proxy} if egress_proxy else {}),
        )
        if relay is not None:
            self.model_relay = relay
            self.handle_requests(MODEL_METHOD, relay.handle)
        directory = shlex.quote(self.run_dir)
        if self._uploaded:
            script = shlex.quote(self._relay_path("relay.py"))
        else:
            # One process installs the relay's files and becomes the relay: its code rides
            # in the start frame (`_BOOT`), so a cold start pays for one process start.
            relay_dir = posixpath.dirname(self._relay_path("relay.py"))
            script = f"-c {shlex.quote(_BOOT)} {shlex.quote(relay_dir)}"
            start = start[:-2] + b',"code":"' + _relay_code().encode() + b'"}\n'
        # umask 077: the run's directory and its log are the relay's user's alone.
        command = (
            f"umask 077 && mkdir -p {directory} && exec {shlex.quote(self.sandbox.python)} "
            f"{' '.join(RELAY_PYTHON_FLAGS)} {script} "
            f"serve --run-dir {directory} {shlex.join(flags)} "
            f"2>>{shlex.quote(self.run_dir + '/stderr.log')}"
        )
        proc = await self.sandbox.start_relay(["sh", "-c", command])
        try:
            await proc.write(start)
            self._uploaded = True
        except BrokenPipeError:
            error = await self._gone(proc)
            await _kill(proc)
            raise error from None
        self._proc = proc
        self._lines = proc.stdout.lines(max_line=MAX_FRAME_BYTES)
        self._ready = True

    async def wait_started(self) -> None:
        """Wait until the relay reports the CLI started (its ``ready``); after `connect`.

        For a warm pool: the CLI then runs, waiting for its first input. What arrives
        before ``ready`` (lines of the CLI's stderr) is handled as `read_messages` would.

        Raises:
            AgentError: The relay ended, or could not start the CLI, before ``ready``
                (with its exit code and the tail of its stderr).
            ProtocolError: The relay sent something malformed.
        """
        if self._proc is None or self._lines is None:
            raise AgentError(
                "the transport is not connected: call connect() first",
                provider=self.sandbox.provider,
                sandbox_id=self.sandbox.id,
            )
        async for line in self._lines:
            if not line.strip():
                continue
            frame = parse_frame(line, self.sandbox)
            if frame.kind == "ready":
                self.cli_pid = frame.data.get("cli_pid")
                return
            if frame.kind == "stderr":
                self._on_stderr(str(frame.data["line"]))
                continue
            if frame.kind == "timings":
                self._on_timings(frame.data)
                continue
            raise (
                self._error(frame.data)
                if frame.kind == "error"
                else self._malformed(f"a {frame.kind!r} envelope before 'ready'")
            )
        raise AgentError(
            "the relay ended before it reported 'ready'",
            exit_code=await _exit_code(self._proc),
            stderr_tail=await stderr_tail(self.sandbox, self.run_dir),
            provider=self.sandbox.provider,
            sandbox_id=self.sandbox.id,
        )

    async def kill(self) -> None:
        """Kill the relay and the CLI at once, without `close`'s grace. Idempotent."""
        self._closing = True
        self._ready = False
        if self.model_relay is not None:
            self.model_relay.revoke()
        with anyio.CancelScope(shield=True):
            await self._cancel_requests()
            if self.model_relay is not None:
                await self.model_relay.aclose()
            if self._proc is not None:
                await _kill(self._proc)
            for replay in self._replays:
                await _kill(replay)

    @override
    async def write(self, data: str) -> None:
        """Write one or more lines to the CLI's stdin, in order.

        Raises:
            AgentError: The transport is not connected, its input ended, or the relay is gone.
        """
        self.tool_gate.on_sdk_write(data)  # before the CLI can act on an approval
        async with self._write_lock:
            if not self._ready or self._proc is None or self._input_ended:
                raise AgentError(
                    "the transport is not ready for writing (not connected, closed, or its "
                    "input ended)",
                    provider=self.sandbox.provider,
                    sandbox_id=self.sandbox.id,
                )
            try:
                await self._proc.write(wire.host_frame("input", n=self.input_seq + 1, data=data))
            except BrokenPipeError:
                raise await self._gone(self._proc) from None
            self.input_seq += 1

    async def _gone(self, proc: Process) -> AgentError:
        """The error for a relay that exited under a write: its exit code and stderr."""
        return AgentError(
            "the relay in the sandbox is gone; cannot write to the claude CLI",
            exit_code=await _exit_code(proc),
            stderr_tail=await stderr_tail(self.sandbox, self.run_dir),
            provider=self.sandbox.provider,
            sandbox_id=self.sandbox.id,
        )

    @override
    async def end_input(self) -> None:
        """End the CLI's input with the relay's ``end_input`` frame. Idempotent.

        The relay's stdin stays open until `close`: it still carries the replies to the
        relay's requests (the model relay's responses) while the CLI finishes.
        """
        async with self._write_lock:
            if self._proc is None or self._input_ended:
                return
            self._input_ended = True
            try:
                await self._proc.write(wire.END_INPUT_LINE.encode() + b"\n")
            except BrokenPipeError:
                pass  # the relay already exited: its stream says why

    @override
    def is_ready(self) -> bool:
        return self._ready

    @override
    def read_messages(self) -> AsyncIterator[dict[str, Any]]:
        """The CLI's stdout messages, as dicts, in order, once each, until it ends.

        Raises:
            AgentError: The CLI exited non-zero or could not start (with its exit code and
                the tail of its stderr), or the relay died or the stream broke more than
                ``reconnects`` times.
            ProtocolError: The relay sent something malformed, out of order, or missing.
        """
        return self._messages()

    async def _messages(self) -> AsyncGenerator[dict[str, Any], None]:
        if self._proc is None:
            raise AgentError(
                "the transport is not connected: call connect() first",
                provider=self.sandbox.provider,
                sandbox_id=self.sandbox.id,
            )
        proc = self._proc
        reconnects = 0
        while True:
            async with aclosing(self._frames(proc)) as frames:
                async for frame in frames:
                    if frame.kind == "ready":
                        self.cli_pid = frame.data.get("cli_pid")
                        continue
                    if frame.kind == "stderr":
                        self._on_stderr(str(frame.data["line"]))
                        continue
                    if frame.kind == "timings":
                        self._on_timings(frame.data)
                        continue
                    if frame.kind == "request":
                        self._on_request(frame.data, proc)
                        continue
                    if frame.seq == 0:  # an unlogged error: a replay that could not follow
                        raise self._error(frame.data)
                    if frame.seq <= self.last_seq:
                        continue  # seen before the stream was reattached
                    if frame.seq != self.last_seq + 1:
                        raise self._malformed(
                            f"envelope {frame.seq} follows {self.last_seq}: the stream lost some"
                        )
                    self.last_seq = frame.seq
                    if frame.kind == "line":
                        refusal = self.tool_gate.on_cli_message(frame.data)
                        if refusal is not None:  # the CLI gets the answer, the SDK nothing
                            with contextlib.suppress(AgentError):
                                await self.write(json.dumps(refusal) + "\n")
                            continue
                        if frame.data.get("type") not in _CONTROL_TYPES:
                            self._seqs[id(frame.data)] = (frame.seq, frame.data)
                        yield frame.data
                    elif frame.kind == "end":
                        self._ended = True
                        self.exit_code = frame.data["exit_code"]
                        if self.exit_code != 0 and not self._closing:
                            tail = str(frame.data.get("stderr") or "") or "\n".join(
                                self._stderr_tail
                            )
                            raise AgentError(
                                "the claude CLI exited with an error",
                                exit_code=self.exit_code,
                                stderr_tail=_tail(tail),
                                provider=self.sandbox.provider,
                                sandbox_id=self.sandbox.id,
                            )
                        return
                    else:  # error
                        self._ended = True
                        raise self._error(frame.data)
            if self._closing:
                return
            # The stream ended before the run did: the relay died, or the provider dropped
            # the connection while it kept running (or it finished meanwhile: exit code 0;
            # its log has the rest either way).
            code = await _exit_code(proc)
            if code not in (None, 0) or reconnects >= self._reconnects:
                raise AgentError(
                    "the relay's stream ended before the claude CLI did"
                    + ("" if code else f" {reconnects + 1} times"),
                    exit_code=code,
                    stderr_tail=await stderr_tail(self.sandbox, self.run_dir),
                    provider=self.sandbox.provider,
                    sandbox_id=self.sandbox.id,
                )
            reconnects += 1
            proc = await self._replay(self.last_seq)

    async def _replay(self, after: int) -> Process:
        """Start the relay's ``replay`` of the logged envelopes numbered above ``after``."""
        # --link: the relay's requests (the model relay's) come this way now.
        args = ["--run-dir", self.run_dir, "--after", str(after), "--link"]
        proc = await start_relay_command(self.sandbox, "replay", *args)
        self._replays.append(proc)
        return proc

    async def _frames(self, proc: Process) -> AsyncGenerator[Frame, None]:
        lines = self._lines if proc is self._proc and self._lines is not None else None
        if lines is None:
            lines = proc.stdout.lines(max_line=MAX_FRAME_BYTES)
        try:
            async for line in lines:
                if line.strip():
                    yield parse_frame(line, self.sandbox)
        finally:
            if proc is not self._proc:  # a replay: done with it
                with anyio.CancelScope(shield=True):
                    await _kill(proc)

    def seq_of(self, message: dict[str, Any]) -> int | None:
        """The sequence number of a message this transport read, as the SDK passed it on.

        ``None`` for a message the SDK made itself. Forgets it and every earlier message.
        """
        entry = self._seqs.pop(id(message), None)
        if entry is None or entry[1] is not message:
            return None
        for key in [k for k, (seq, _) in self._seqs.items() if seq < entry[0]]:
            del self._seqs[key]
        return entry[0]

    def _on_timings(self, data: Mapping[str, Any]) -> None:
        self.sandbox_timings = {k: float(v) for k, v in data.items() if v is not None}

    def _on_request(self, data: Mapping[str, Any], proc: Process) -> None:
        """Start answering a request of the relay, in a task of its own; the replies go
        back the way it came (the relay's stdin, or a replay's link)."""
        rid, method, payload = data["id"], data["method"], data["payload"]
        if rid in self._inflight:
            return  # sent again on a new link: it is being answered
        if len(self._inflight) >= wire.MAX_INFLIGHT:
            raise self._malformed(f"more than {wire.MAX_INFLIGHT} requests at once")
        if self._closing:
            return
        self._inflight[rid] = _spawn(self._answer(proc, rid, method, payload))

    async def _answer(self, proc: Process, rid: int, method: str, payload: dict[str, Any]) -> None:
        try:
            await answer_request(proc, self._write_lock, self._handlers, rid, method, payload)
        finally:
            self._inflight.pop(rid, None)

    async def _cancel_requests(self) -> None:
        tasks, self._inflight = list(self._inflight.values()), {}
        for task in tasks:
            task.cancel()
        with anyio.move_on_after(CLOSE_TIMEOUT):
            for task in tasks:
                await task.wait()

    def _on_stderr(self, line: str) -> None:
        self._stderr_tail = [*self._stderr_tail[-39:], line]
        callback: Callable[[str], None] | None = self.options.stderr
        if callback is not None:
            callback(line)

    def _error(self, data: Mapping[str, Any]) -> AgentError:
        return AgentError(
            f"the relay could not run the claude CLI: {data.get('type')}: {data.get('message')}",
            exit_code=data.get("exit_code"),
            stderr_tail=_tail(str(data.get("stderr") or "")),
            provider=self.sandbox.provider,
            sandbox_id=self.sandbox.id,
        )

    def _malformed(self, what: str) -> ProtocolError:
        return ProtocolError(
            f"the relay sent {what}; the run was stopped",
            provider=self.sandbox.provider,
            sandbox_id=self.sandbox.id,
        )

    @override
    async def close(self) -> None:
        """Stop the CLI and the relay; nothing of the run keeps running. Idempotent, bounded.

        The CLI gets `CLOSE_GRACE_S` after its input ends to finish (it flushes its
        transcript), as with the SDK's own transport; then the relay and the CLI are killed.
        The sandbox stays open.
        """
        self._closing = True
        self._ready = False
        proc, self._proc = self._proc, None
        replays, self._replays = self._replays, []
        with anyio.CancelScope(shield=True):
            if proc is not None:
                if not self._input_ended:
                    with anyio.move_on_after(CLOSE_TIMEOUT):
                        await self._end_input_of(proc)
                if proc.returncode is None and not self._ended:
                    with anyio.move_on_after(CLOSE_GRACE_S):
                        await proc.wait()
                await _kill(proc)
            if self.model_relay is not None:
                self.model_relay.revoke()
            await self._cancel_requests()
            if self.model_relay is not None:
                await self.model_relay.aclose()
            for replay in replays:
                await _kill(replay)

    async def _end_input_of(self, proc: Process) -> None:
        async with self._write_lock:
            self._input_ended = True
            try:
                await proc.write(wire.END_INPUT_LINE.encode() + b"\n")
                await proc.close_stdin()
            except BrokenPipeError:
                pass


class RunInput:
    """Writes to the CLI of a running run from any host process, not only the one that
    started it: through the relay's ``attach`` and the run's input socket.

    Each `RunInput` is one writer: it numbers its inputs, waits until the relay confirms each,
    and if the connection breaks first it reconnects and sends again only what the relay did
    not get, so every input reaches the CLI once, in order. The CLI gets the inputs of all
    writers of the run in the order the relay receives them.

    Args:
        sandbox: The run's sandbox (reattached with `sandbay.connect_sandbox`, say).
        run_id: The run's id.
        writer: This writer's name (letters, digits, ``._-``); default a random one. A
            writer that reuses a name continues its numbering, so it must not be in use.
    """

    def __init__(self, sandbox: Sandbox, run_id: str, *, writer: str | None = None) -> None:
        writer = writer or f"w{uuid.uuid4().hex[:12]}"
        if not wire.WRITER_PATTERN.fullmatch(writer) or writer == wire.HOST_WRITER:
            raise ConfigError(f"not a writer's name: {writer!r} (letters, digits, '._-')")
        self.sandbox = sandbox
        self.run_id = run_id
        self.writer = writer
        #: Number of this writer's last input the relay confirmed.
        self.input_seq = 0
        self._next = 0
        self._pending: list[tuple[int, bytes]] = []
        self._proc: Process | None = None
        self._acks: AsyncIterator[bytes] | None = None
        self._lock = anyio.Lock()

    async def write(self, data: str) -> None:
        """Write ``data`` to the CLI's stdin (one or more whole stream-json lines).

        Raises:
            AgentError: The run is not running (or its input ended), even after a reconnect.
        """
        async with self._lock:
            if self._proc is None:
                await self._connect_or_fail()
            self._next += 1
            n = self._next
            self._pending.append((n, wire.host_frame("input", n=n, data=data, writer=self.writer)))
            await self._flush(n)

    async def end_input(self) -> None:
        """End the CLI's input (for every writer: the CLI reads its last turn and exits)."""
        async with self._lock:
            await self._flush(self._next)
            assert self._proc is not None
            await self._proc.write(wire.END_INPUT_LINE.encode() + b"\n")
            await self._ack()

    async def aclose(self) -> None:
        """Close the connection to the relay (the run goes on). Idempotent."""
        proc, self._proc, self._acks = self._proc, None, None
        if proc is not None:
            with anyio.CancelScope(shield=True):
                await _kill(proc)

    async def _flush(self, upto: int) -> None:
        """Send what the relay has not confirmed, up to input ``upto``; one reconnect."""
        for attempt in (1, 2):
            try:
                if self._proc is None:
                    await self._connect()
                assert self._proc is not None
                for _, frame in self._pending:
                    await self._proc.write(frame)
                while self.input_seq < upto:
                    await self._ack()
                self._pending = [p for p in self._pending if p[0] > self.input_seq]
                return
            except (BrokenPipeError, _Disconnected):
                await self.aclose()
                if attempt == 2:
                    raise AgentError(
                        f"cannot write to run {self.run_id}: the relay's input socket closed "
                        "(the run ended, or its input did)",
                        provider=self.sandbox.provider,
                        sandbox_id=self.sandbox.id,
                    ) from None

    async def _connect_or_fail(self) -> None:
        try:
            await self._connect()
        except (BrokenPipeError, _Disconnected):
            await self.aclose()
            raise AgentError(
                f"cannot write to run {self.run_id}: it is not running (or takes no input)",
                provider=self.sandbox.provider,
                sandbox_id=self.sandbox.id,
            ) from None

    async def _connect(self) -> None:
        run_dir = f"{self.sandbox.relay_dir}/runs/{self.run_id}"
        args = ["--run-dir", run_dir, "--writer", self.writer]
        self._proc = await start_relay_command(self.sandbox, "attach", *args)
        self._acks = self._proc.stdout.lines(max_line=64 * 1024)
        await self._ack()
        # A writer whose name was used before continues its numbering.
        self._next = max(self._next, self.input_seq)
        self._pending = [p for p in self._pending if p[0] > self.input_seq]

    async def _ack(self) -> None:
        """Read the relay's next confirmation: this writer's last input it passed on."""
        assert self._acks is not None
        async for line in self._acks:
            try:
                ack = json.loads(line)
            except ValueError:
                ack = None
            seq = ack.get("input_seq") if isinstance(ack, dict) else None
            if type(seq) is not int or not 0 <= seq <= 2**53:
                if isinstance(ack, dict) and ack.get("kind") == "error":
                    raise _Disconnected  # not running: the relay's error envelope
                raise ProtocolError(
                    f"the relay's attach sent {line[:200]!r}, not a confirmation",
                    provider=self.sandbox.provider,
                    sandbox_id=self.sandbox.id,
                )
            self.input_seq = max(self.input_seq, seq)
            return
        raise _Disconnected


class _Disconnected(Exception):
    """The relay's ``attach`` ended."""


async def answer_request(
    proc: Process,
    lock: anyio.Lock,
    handlers: Mapping[str, RequestHandler],
    rid: int,
    method: str,
    payload: dict[str, Any],
) -> None:
    """Answer the relay's request ``rid`` with ``handlers[method]``: its parts, then a final
    reply (its result, or the error it raised), written to ``proc``'s stdin under ``lock``.
    A handler's bug is answered as an internal error without its details; a relay that is
    gone gets nothing."""

    async def send(final: bool, **fields: Any) -> None:
        async with lock:
            await proc.write(wire.host_frame("reply", id=rid, final=final, **fields))

    async def part(data: dict[str, Any]) -> None:
        await send(False, data=data)

    try:
        handler = handlers.get(method)
        try:
            if handler is None:
                raise RequestError("UnknownMethod", f"no handler for {method!r} on the host")
            result = await handler(payload, part)
        except RequestError as exc:
            await send(True, error={"type": exc.kind, "message": exc.message})
        except Exception as exc:  # a bug in a handler must not stop the run
            message = f"the host's handler of {method!r} failed: {type(exc).__name__}"
            await send(True, error={"type": "InternalError", "message": message})
        else:
            await send(True, data=result)
    except (BrokenPipeError, OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass  # the relay is gone: nobody waits for the reply


class RequestServer:
    """Answers the relay's requests that arrive on one process's stream (a replay with a
    link, in a process that resumed the run), each in a task of its own.

    Args:
        proc: The process whose stdin takes the replies.
        handlers: Request method → handler.
    """

    def __init__(self, proc: Process, handlers: Mapping[str, RequestHandler]) -> None:
        self._proc = proc
        self._handlers = dict(handlers)
        self._tasks: dict[int, _Task] = {}
        self._lock = anyio.Lock()

    def on_request(self, data: Mapping[str, Any]) -> None:
        rid = data["id"]
        if rid in self._tasks:
            return
        if len(self._tasks) >= wire.MAX_INFLIGHT:
            raise ProtocolError(f"the relay sent more than {wire.MAX_INFLIGHT} requests at once")
        self._tasks[rid] = _spawn(self._answer(rid, data["method"], data["payload"]))

    async def _answer(self, rid: int, method: str, payload: dict[str, Any]) -> None:
        try:
            await answer_request(self._proc, self._lock, self._handlers, rid, method, payload)
        finally:
            self._tasks.pop(rid, None)

    async def aclose(self) -> None:
        """Cancel the requests still answered and wait for them (bounded)."""
        tasks, self._tasks = list(self._tasks.values()), {}
        for task in tasks:
            task.cancel()
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
            for task in tasks:
                await task.wait()


class _Task:
    """A task answering one request: the transport's reads and writes are driven by the SDK's
    own tasks (a `Transport` owns no task group between `connect` and `close`), so, as the
    SDK does for its control requests, these run detached and `close` cancels and awaits
    them."""

    def __init__(self, coro: Coroutine[Any, Any, None]) -> None:
        self._done = anyio.Event()
        self._scope = anyio.CancelScope()
        backend = sniffio.current_async_library()
        if backend == "asyncio":
            import asyncio

            self._handle: Any = asyncio.get_running_loop().create_task(self._run(coro))
        elif backend == "trio":  # pragma: no cover - sandbay's tests run on asyncio
            import trio  # type: ignore[import-not-found,unused-ignore]

            trio.lowlevel.spawn_system_task(self._run, coro)
        else:  # pragma: no cover
            coro.close()
            raise ConfigError(f"unsupported async library: {backend}")

    async def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            with self._scope:
                await coro
        finally:
            self._done.set()

    def cancel(self) -> None:
        self._scope.cancel()

    async def wait(self) -> None:
        await self._done.wait()


def _spawn(coro: Coroutine[Any, Any, None]) -> _Task:
    return _Task(coro)


def parse_frame(line: bytes, sandbox: Sandbox | None = None) -> Frame:
    """Check every field of one envelope line from the relay; anything off is a `ProtocolError`.

    The line comes from the sandbox, whose code may be hostile: no value in it may raise
    anything but `ProtocolError` on the host, now or when the SDK uses the message.
    """

    def malformed(what: str) -> ProtocolError:
        return ProtocolError(
            f"the relay sent a malformed envelope: {what}; the run was stopped",
            provider=sandbox.provider if sandbox else None,
            sandbox_id=sandbox.id if sandbox else None,
        )

    try:
        raw = json.loads(line)
    except RecursionError:
        raise malformed("it nests too deep to parse") from None
    except ValueError:
        raise malformed(f"a line that is not JSON: {line[:200]!r}") from None
    if not isinstance(raw, dict):
        raise malformed(f"a JSON {type(raw).__name__} instead of an object")
    version = raw.get("sandbay")
    if type(version) is not int or version != wire.VERSION:
        raise ProtocolError(
            f"the relay speaks wire version {_show_value(version)}, this sandbay speaks "
            f"{wire.VERSION}: use the same sandbay on both sides",
            provider=sandbox.provider if sandbox else None,
            sandbox_id=sandbox.id if sandbox else None,
        )
    unknown = set(raw) - {"sandbay", "seq", "kind", "data"}
    if unknown:
        raise malformed(f"unknown fields {sorted(unknown)[:5]}")
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in wire.KINDS:
        raise malformed(f"kind must be one of {sorted(wire.KINDS)}, got {_show_value(kind)}")
    seq = raw.get("seq")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise malformed(f"seq must be a whole number from 0 to {MAX_SEQ}, got {_show_value(seq)}")
    if seq == 0 and kind in wire.LOGGED_KINDS - {"error"}:
        raise malformed(f"a {kind!r} envelope must carry a sequence number")
    if seq != 0 and kind not in wire.LOGGED_KINDS:
        raise malformed(f"a {kind!r} envelope carries no sequence number, got {seq}")
    data = raw.get("data")
    if not isinstance(data, dict):
        raise malformed(f"data of a {kind!r} envelope must be an object, got {_show_value(data)}")
    # Each level needs a bracket of its own in the text, so a line with few brackets cannot
    # nest too deep: counting them (in C) spares most messages the walk of their data.
    if line.count(b"{") + line.count(b"[") > MAX_DEPTH and _nests_deeper(data, MAX_DEPTH):
        raise malformed(f"data of a {kind!r} envelope nests deeper than {MAX_DEPTH} levels")

    def text(name: str, *, optional: bool = True) -> None:
        value = data.get(name)
        if not isinstance(value, str) and not (optional and value is None):
            raise malformed(f"{name} of {kind!r} must be text, got {_show_value(value)}")

    def integer(name: str, *, optional: bool = True) -> None:
        value = data.get(name)
        if value is None and optional:
            return
        if type(value) is not int or abs(value) > 2**31:
            raise malformed(f"{name} of {kind!r} must be an integer, got {_show_value(value)}")

    if kind == "line":
        if not isinstance(data.get("type"), str):
            raise malformed(f"a CLI message needs a text type, got {_show_value(data.get('type'))}")
    elif kind == "stderr":
        text("line", optional=False)
    elif kind == "ready":
        integer("pid")
        integer("cli_pid")
        text("cli")
        text("model_url")
    elif kind == "timings":
        if set(data) - set(wire.TIMING_NAMES):
            raise malformed(f"unknown timings {sorted(set(data) - set(wire.TIMING_NAMES))[:5]}")
        for name in wire.TIMING_NAMES:
            value = data.get(name)
            if value is not None and (
                type(value) not in (int, float) or not _is_finite_number(value) or value < 0
            ):
                raise malformed(f"{name} of 'timings' must be milliseconds, got {value!r:.50}")
    elif kind == "request":
        if set(data) != {"id", "method", "payload"}:
            raise malformed("a 'request' carries exactly id, method and payload")
        rid, method = data["id"], data["method"]
        if type(rid) is not int or not 1 <= rid <= wire.MAX_REQUEST_ID:
            raise malformed(f"id of 'request' must be a whole number from 1, got {rid!r:.50}")
        if not isinstance(method, str) or not wire.METHOD_PATTERN.fullmatch(method):
            raise malformed(f"method of 'request' is not a method name: {method!r:.50}")
        if not isinstance(data["payload"], dict):
            raise malformed("payload of 'request' must be an object")
    elif kind == "end":
        integer("exit_code", optional=False)
        text("stderr")
    else:  # error
        integer("exit_code")
        for name in ("type", "message", "stderr"):
            text(name)
    for value in data.values() if kind != "line" else ():
        if isinstance(value, float) and not _is_finite_number(value):
            raise malformed(f"a number in {kind!r} that is not finite")
    return Frame(seq, kind, data)
