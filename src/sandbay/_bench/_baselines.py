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
"""

from __future__ import annotations

import inspect
import json
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import anyio

from .._config import DockerConfig, SandbayConfig
from .._errors import SandboxError

if TYPE_CHECKING:
    from claude_agent_sdk import ClaudeAgentOptions

    from .._sandbox import Sandbox, SandboxSpec

__all__ = ["LABELS", "RAW_BASELINES", "RawBaseline", "cli_start", "sandbox_cli"]

#: Seconds for create → first exec of a fresh sandbox made with the provider's SDK; the
#: sandbox is removed afterwards (not timed). Raises `SandboxError` or `OSError` on failure.
RawBaseline = Callable[[SandbayConfig, "SandboxSpec"], Awaitable[float]]


async def _local(config: SandbayConfig, spec: SandboxSpec) -> float:
    """A temporary folder and one process in it: what a sandbox costs without sandbay."""
    started = time.perf_counter()
    folder = tempfile.mkdtemp(prefix="sandbay-raw-")
    try:
        await anyio.run_process(["true"], cwd=folder)
        return time.perf_counter() - started
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

    def measure(image: str) -> float:
        with docker_errors(base_url=docker.base_url, image=image):
            client = docker_client(docker)  # connecting is not timed: a user's client is open
            try:
                started = time.perf_counter()
                container = client.containers.run(image, ["sleep", "600"], **options)
                try:
                    container.exec_run(["true"])
                    return time.perf_counter() - started
                finally:
                    container.remove(force=True)
            finally:
                client.close()

    return float(await anyio.to_thread.run_sync(measure, image))


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


#: Raw baselines by provider name.
RAW_BASELINES: dict[str, RawBaseline] = {"local": _local, "docker": _docker}
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
