"""The floor a cold run is held to: raw create → first exec, and the bare CLI's own start.

Raw baselines: create → first exec done directly with each provider's own SDK. With
`cli_start` (the bare ``claude`` CLI started in an already running sandbox, to its first
message) they make the floor of a cold run: nothing can start an agent faster than creating
the sandbox and starting the CLI in it.

The benchmark times these in the same rounds as sandbay's runs, so a report shows sandbay's
overhead as a ratio measured side by side. They are benchmark code, written as a user of the
plain SDK would write them, and each imports its provider's SDK only when it runs. A provider
without an entry here has no raw baseline (its rows leave it out).

A provider measured against a local fake of its control plane (rather than the real service)
has an entry in `LABELS`, shown beside its name in every table and chart, since its rows then
measure sandbay's client overhead only.

The cloud baselines (e2b, modal, daytona) time their two steps apart and return a `RawTime`:
still the seconds of create → first exec, as every caller takes them, with ``create`` and
``first_exec`` beside. `phase_split` sets those against sandbay's ``provision`` and ``ready``
of the same report: what sandbay's client adds to each phase, apart from what the control
plane (a real one or a fake) and its SDK spend anyway. `write_phase_split` adds that table to
a report's files.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio

from .._config import DaytonaConfig, DockerConfig, E2BConfig, ModalConfig, SandbayConfig
from .._errors import ConfigError, SandboxError
from .._sandbox import CLOSE_TIMEOUT

if TYPE_CHECKING:
    from claude_agent_sdk import ClaudeAgentOptions

    from .._sandbox import Sandbox, SandboxSpec

__all__ = [
    "LABELS",
    "RAW_BASELINES",
    "RawBaseline",
    "RawTime",
    "cli_start",
    "sandbox_cli",
]

#: Seconds for create → first exec of a fresh sandbox made with the provider's SDK; the
#: sandbox is removed afterwards (not timed). Raises `SandboxError` or `OSError` on failure.
RawBaseline = Callable[[SandbayConfig, "SandboxSpec"], Awaitable[float]]


class RawTime(float):
    """Seconds for raw create → first exec, with the two steps it was timed in.

    A `float` (their sum), so it stands wherever a baseline's seconds go.

    Attributes:
        create: Seconds from asking for the sandbox to the SDK returning it.
        first_exec: Seconds from there to the first command's exit.
    """

    create: float
    first_exec: float

    def __new__(cls, create: float, first_exec: float) -> RawTime:
        value = super().__new__(cls, create + first_exec)
        value.create = create
        value.first_exec = first_exec
        return value


async def _local(config: SandbayConfig, spec: SandboxSpec) -> float:
    """A temporary folder and one process in it: what a sandbox costs without sandbay."""
    started = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="sandbay-raw-")
    try:
        created = time.perf_counter()
        await anyio.run_process(["true"], cwd=folder)
        return RawTime(created - started, time.perf_counter() - created)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def _docker(config: SandbayConfig, spec: SandboxSpec) -> float:
    """``containers.run(detach=True)`` then ``exec_run``, with sandbay's image and limits.

    Same image, network, CPU and memory as a sandbay sandbox of this config and spec (the
    config's defaults, 1 core and 1 GiB, unless the spec sets its own).
    """
    from .._api import get_provider
    from ..providers.docker._errors import docker_client, docker_errors
    from ..providers.docker._provider import DockerProvider

    docker = config.provider
    assert isinstance(docker, DockerConfig)
    image = spec.image or docker.image
    if image is None:
        provider = get_provider(config)
        assert isinstance(provider, DockerProvider)
        image = await provider.agent_image()
    options = _docker_run_options(docker, spec)

    def measure(image: str) -> RawTime:
        with docker_errors(base_url=docker.base_url, image=image):
            client = docker_client(docker)  # connecting is not timed: a user's client is open
            try:
                started = time.perf_counter()
                container = client.containers.run(image, ["sleep", "600"], **options)
                try:
                    created = time.perf_counter()
                    container.exec_run(["true"])
                    return RawTime(created - started, time.perf_counter() - created)
                finally:
                    container.remove(force=True)
            finally:
                client.close()

    return await anyio.to_thread.run_sync(measure, image)


def _docker_run_options(docker: DockerConfig, spec: SandboxSpec) -> dict[str, Any]:
    """``containers.run`` options: the spec's limits and network, else the config's defaults."""
    cpu = spec.cpu if spec.cpu is not None else docker.cpu
    memory_mb = spec.memory_mb if spec.memory_mb is not None else docker.memory_mb
    options: dict[str, Any] = {
        "detach": True,
        "nano_cpus": int(cpu * 1e9),
        "mem_limit": f"{memory_mb}m",
    }
    if spec.network != "default":
        options["network_mode"] = spec.network
    return options


async def _e2b(config: SandbayConfig, spec: SandboxSpec) -> RawTime:
    """``AsyncSandbox.create`` then ``commands.run("true")``; ``kill`` afterwards.

    The template, user and internet access a sandbay sandbox of this config and spec gets
    (on E2B the template sets cpu and memory); connection settings from the config.
    """
    from e2b import AsyncSandbox

    from ..providers.e2b._errors import e2b_errors
    from ..providers.e2b._provider import agent_template

    e2b = config.provider
    assert isinstance(e2b, E2BConfig)
    if spec.cpu is not None or spec.memory_mb is not None:
        raise ConfigError(
            "on E2B, cpu and memory belong to the template: unset them", provider="e2b"
        )
    template = spec.image or e2b.template or agent_template()
    opts: dict[str, Any] = {"request_timeout": e2b.request_timeout}
    if e2b.api_key is not None:
        opts["api_key"] = e2b.api_key.get_secret_value()
    for key in ("domain", "api_url", "sandbox_url"):
        if value := getattr(e2b, key):
            opts[key] = value
    with e2b_errors(template=template):
        started = time.perf_counter()
        with anyio.CancelScope(shield=True):  # a sandbox made while cancelled must not leak
            sandbox = await AsyncSandbox.create(
                template,
                timeout=math.ceil(spec.lifetime_s),
                envs=dict(spec.env),
                allow_internet_access=spec.network != "none",
                **opts,
            )
        try:
            created = time.perf_counter()
            await sandbox.commands.run("true", user=spec.user or e2b.user)
            return RawTime(created - started, time.perf_counter() - created)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                await sandbox.kill()


async def _modal(config: SandbayConfig, spec: SandboxSpec) -> RawTime:
    """``Sandbox.create.aio`` in the app, then ``exec.aio("true")`` and its ``wait``.

    The image, cpu and memory (request and limit), workdir and network a sandbay sandbox of
    this config and spec gets. As for docker, what a user's program has open before its first
    sandbox is not timed: the client, the app, the image (hydrated, as sandbay's provider
    keeps it). The sandbox is terminated afterwards.
    """
    import modal

    from .._image import agent_image_recipe
    from ..providers.modal._errors import modal_errors, open_client
    from ..providers.modal._provider import render_image

    settings = config.provider
    assert isinstance(settings, ModalConfig)
    reference = spec.image or settings.image
    cpu = spec.cpu if spec.cpu is not None else settings.cpu
    memory_mb = spec.memory_mb if spec.memory_mb is not None else settings.memory_mb
    client = await open_client(settings)
    try:
        with modal_errors(server_url=settings.server_url):
            app = await modal.App.lookup.aio(
                settings.app_name,
                create_if_missing=True,
                environment_name=settings.environment,
                client=client,
            )
            image = (
                modal.Image.from_registry(reference)
                if reference
                else render_image(agent_image_recipe(), base=settings.base_image)
            )
            await image.build.aio(app)
            started = time.perf_counter()
            with anyio.CancelScope(shield=True):  # a sandbox made while cancelled must not leak
                sandbox: Any = await modal.Sandbox.create.aio(
                    app=app,
                    image=image,
                    cpu=(cpu, cpu),
                    memory=(memory_mb, memory_mb),
                    timeout=settings.max_lifetime_s,
                    workdir=spec.workdir,
                    env=dict(spec.env),
                    block_network=spec.network == "none",
                    client=client,
                )
            try:
                created = time.perf_counter()
                process = await sandbox.exec.aio("true")
                code = await process.wait.aio()
                elapsed = RawTime(created - started, time.perf_counter() - created)
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                    await sandbox.terminate.aio()
                    await sandbox.detach.aio()
    finally:
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
            await client.__aexit__(None, None, None)
    if code != 0:
        raise SandboxError(f"`true` exited {code} in a Modal sandbox", provider="modal")
    return elapsed


async def _daytona(config: SandbayConfig, spec: SandboxSpec) -> RawTime:
    """``AsyncDaytona.create`` then ``process.exec("true")``; ``delete`` afterwards.

    The snapshot (or image with its resources), OS user, environment and network a sandbay
    sandbox of this config and spec gets; the client, made from the config's API key and URL,
    is open before the clock starts.
    """
    from daytona import CreateSandboxFromImageParams, CreateSandboxFromSnapshotParams, Resources

    from ..providers.daytona._client import close_client, make_client
    from ..providers.daytona._errors import daytona_errors
    from ..providers.daytona._provider import agent_snapshot

    daytona = config.provider
    assert isinstance(daytona, DaytonaConfig)
    common: dict[str, Any] = {
        "env_vars": dict(spec.env),
        "os_user": daytona.os_user,
        "network_block_all": spec.network == "none",
    }
    params: Any
    if spec.image is not None:
        resources = Resources(
            cpu=math.ceil(spec.cpu) if spec.cpu else None,
            memory=math.ceil(spec.memory_mb / 1024) if spec.memory_mb else None,
            disk=daytona.disk_gb,
        )
        params = CreateSandboxFromImageParams(image=spec.image, resources=resources, **common)
    elif spec.cpu is not None or spec.memory_mb is not None:
        raise ConfigError(
            "on Daytona, cpu and memory need spec.image: unset them", provider="daytona"
        )
    else:
        snapshot = daytona.snapshot or agent_snapshot()
        params = CreateSandboxFromSnapshotParams(snapshot=snapshot, **common)
    client = make_client(daytona)
    try:
        with daytona_errors("creating a sandbox (raw baseline)"):
            started = time.perf_counter()
            with anyio.CancelScope(shield=True):  # a sandbox made while cancelled must not leak
                sandbox = await client.create(params, timeout=daytona.create_timeout)
            try:
                created = time.perf_counter()
                response = await sandbox.process.exec("true")
                elapsed = RawTime(created - started, time.perf_counter() - created)
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
                    await client.delete(sandbox)
    finally:
        await close_client(client)
    if response.exit_code != 0:
        raise SandboxError(
            f"`true` exited {response.exit_code} in a Daytona sandbox", provider="daytona"
        )
    return elapsed


#: Raw baselines by provider name.
RAW_BASELINES: dict[str, RawBaseline] = {
    "local": _local,
    "docker": _docker,
    "e2b": _e2b,
    "modal": _modal,
    "daytona": _daytona,
}
#: Shown beside a provider's name in reports, by provider name (none today).
LABELS: dict[str, str] = {}


#: The lines the Agent SDK writes first: its ``initialize`` request, then the prompt.
_CLI_INPUT = (
    b'{"type":"control_request","request_id":"req_1_bench",'
    b'"request":{"subtype":"initialize","hooks":null}}\n'
    b'{"type":"user","message":{"role":"user","content":"benchmark"},'
    b'"parent_tool_use_id":null,"session_id":"default"}\n'
)


async def sandbox_cli(sandbox: Sandbox) -> str:
    """The CLI the relay would run in ``sandbox``, found by the relay's own rule (not timed)."""
    from .._relay import relay
    from .._transport import RELAY_PYTHON_FLAGS

    code = f"import importlib.util, os, shutil, sys\n{inspect.getsource(relay.find_cli)}\n"
    argv = [sandbox.python, *RELAY_PYTHON_FLAGS, "-c", code + "print(find_cli() or '')"]
    result = await sandbox.exec(argv)
    path = result.stdout.decode().strip()
    if not result.ok or not path:
        raise SandboxError(f"no claude CLI in the sandbox: {result.stderr[-300:]!r}")
    return path


async def cli_start(
    sandbox: Sandbox, options: ClaudeAgentOptions, env: Mapping[str, str], *, cli: str
) -> float:
    """Seconds from starting the bare CLI in a running sandbox to its first agent message.

    The CLI gets the argv and environment `SandboxTransport` gives it (`cli_argv`,
    `cli_env`) and the lines the SDK writes first; the clock stops at its first message
    that a run yields (``system/init``), where a run's ``first_msg`` stops: not at the
    answer to ``initialize``, nor at a ``session_state_changed`` the CLI sends for the SDK
    alone (the SDK passes neither on). No relay, no SDK: this is the CLI's own share of the
    floor.

    Raises:
        SandboxError: The CLI ended or wrote something else than JSON before that message.
    """
    from .._relay import wire
    from .._transport import MAX_FRAME_BYTES, cli_argv, cli_env

    argv = cli_argv(options, cli=cli)
    cli_environment = cli_env(sandbox, options, env)
    started = time.perf_counter()
    proc = await sandbox.start(argv, env=cli_environment, cwd=sandbox.workdir)
    try:
        await proc.write(_CLI_INPUT)
        async for line in proc.stdout.lines(max_line=MAX_FRAME_BYTES):
            # As the SDK does: only JSON objects are messages (the rest is debug output).
            if not line.lstrip().startswith(b"{"):
                continue
            message = json.loads(line)
            if wire.sdk_yields(message):
                return time.perf_counter() - started
        raise SandboxError(f"the CLI ended before its first message (exit {await proc.wait()})")
    finally:
        await proc.kill()
