"""The ``sandbay`` command line.

Start-up is kept short: this module imports only the standard library and sandbay's light
modules at load time; each command imports what it needs (the Agent SDK, a provider's SDK)
when it runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ._errors import SandboxError

USAGE_ERROR = 2
#: Exit status when stdout was closed early (``sandbay run … | head -1``): 128 + SIGPIPE, what a
#: shell reports for a command that a closed pipe ended.
BROKEN_PIPE = 141
#: The logger image builds report progress on (`sandbay._image.IMAGE_LOG`), not imported here
#: to keep start-up light.
IMAGE_LOGGER = "sandbay.image"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sandbay`` command (``argv`` given: called, not the process's own
    command, so it always returns)."""
    code = _main(argv)
    if argv is None:
        _leave_if_finalizing_could_abort(code)
    return code


def _leave_if_finalizing_could_abort(code: int) -> None:
    """End the process now, once its output is flushed, where Python's finalization could
    abort it: the E2B SDK's HTTP client (pyqwest, threads of a Rust runtime) kills the
    interpreter with SIGABRT when one of its threads is still finishing a response while
    Python shuts down, after a command that did everything it should. Everything the
    command opened is closed by now (sandboxes included); only interpreter teardown is
    skipped."""
    if "pyqwest" not in sys.modules:
        return
    import logging

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def _main(argv: Sequence[str] | None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return USAGE_ERROR
    try:
        if getattr(args, "blocking", False):
            return int(args.func(args) or 0)
        import anyio

        return int(anyio.run(args.func, args) or 0)
    except KeyboardInterrupt:
        # Cancellation already ran every cleanup (sandboxes removed) before we got here.
        print("\ninterrupted; sandboxes removed", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whoever read our output stopped reading: a normal way for a command to end.
        _silence_stdout()
        return BROKEN_PIPE
    except SandboxError as exc:
        print(f"sandbay: error: {exc}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so flushing it at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor behind stdout
        pass


def _number(
    kind: type[int] | type[float], *, minimum: float, inclusive: bool, what: str
) -> Callable[[str], Any]:
    """An argparse ``type`` for a finite number past ``minimum``; errors name the option."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        ok = math.isfinite(value) and (value >= minimum if inclusive else value > minimum)
        if not ok:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    return parse


_seconds = _number(float, minimum=0, inclusive=False, what="a positive finite number of seconds")
_count = _number(int, minimum=1, inclusive=True, what="a whole number of at least 1")
_port = _number(int, minimum=0, inclusive=True, what="a port number (0: any free port)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sandbay",
        description="Run Claude agents inside sandboxes from any provider.",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            metavar="FILE",
            help="config file (default: $SANDBAY_CONFIG, else ./sandbay.toml if present)",
        )

    def with_provider(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--provider",
            help="provider name (default: $SANDBAY_PROVIDER, else the config file's, else local)",
        )
        with_config(p)

    run = sub.add_parser("run", help="run an agent on a prompt and stream its messages")
    run.add_argument("prompt", help="what the agent should do")
    with_provider(run)
    run.add_argument("--json", action="store_true", help="print raw stream-json messages")
    run.add_argument(
        "--offline",
        action="store_true",
        help="use the scripted model on loopback (default when ANTHROPIC_API_KEY is unset)",
    )
    run.add_argument(
        "--script", metavar="FILE", help="offline: the scripted model's turns (JSON list)"
    )
    run.add_argument(
        "--timeout",
        type=_seconds,
        metavar="S",
        help="wall-clock deadline for the run, seconds (default: none)",
    )
    run.add_argument(
        "--max-turns",
        type=_count,
        default=10,
        metavar="N",
        help="most turns (default: %(default)s)",
    )
    run.add_argument(
        "--allowed-tools",
        default="Bash,Read,Write,Edit",
        metavar="TOOLS",
        help="comma-separated tools the agent may use without asking (default: %(default)s)",
    )
    run.add_argument(
        "--permission-mode",
        choices=["default", "acceptEdits", "plan", "bypassPermissions"],
        default="default",
        help="the agent's permission mode (default: %(default)s); bypassPermissions lets it "
        "use every tool, and is refused on the unisolated local provider",
    )
    run.add_argument("--model", help="model name passed to the agent (default: the CLI's)")
    run.set_defaults(func=_run)

    bench = sub.add_parser("bench", help="cold-start benchmark across providers, side by side")
    bench.add_argument(
        "--providers",
        help="comma-separated, e.g. docker,local (default: the configured provider)",
    )
    with_config(bench)
    bench.add_argument(
        "--runs", type=_count, default=10, help="measured runs per provider (default: %(default)s)"
    )
    bench.add_argument(
        "--mode",
        choices=["cold", "warm", "burst", "staggered", "capacity"],
        default="cold",
        help="what to measure (default: %(default)s); capacity: a representative session's "
        "peak memory and CPU per provider, and agents per host from them",
    )
    bench.add_argument(
        "--concurrency",
        type=_count,
        default=8,
        help="runs per round in burst (at once) and staggered mode (default: %(default)s)",
    )
    bench.add_argument(
        "--stagger-ms",
        type=float,
        metavar="N",
        help="staggered mode: milliseconds between launches (default: 200)",
    )
    bench.add_argument(
        "--model",
        choices=["scripted", "real"],
        default="scripted",
        help="scripted: the loopback model; real: your API key (default: %(default)s)",
    )
    bench.add_argument(
        "--turns", type=_count, help="capacity: Bash tool calls per session (default: 6)"
    )
    bench.add_argument(
        "--alloc-mib",
        type=int,
        help="capacity: MiB each tool call allocates and touches (default: 64)",
    )
    bench.add_argument(
        "--reserve-mib",
        type=int,
        help="capacity: host MiB kept for the OS and other services (default: 1024)",
    )
    bench.add_argument("--no-raw", action="store_true", help="skip the raw SDK baseline")
    bench.add_argument(
        "--out",
        default="benchmarks/results",
        metavar="DIR",
        help="directory for the results (default: %(default)s)",
    )
    bench.set_defaults(func=_bench)

    providers = sub.add_parser("providers", help="which providers are installed and reachable")
    with_config(providers)
    providers.set_defaults(func=_providers)

    def with_all(p: argparse.ArgumentParser) -> None:
        with_provider(p)
        p.add_argument(
            "--all",
            action="store_true",
            help="every installed provider, with its default settings, instead of the "
            "configured one",
        )

    ls = sub.add_parser(
        "ls",
        help="list live sandboxes sandbay manages",
        description="List the live sandboxes sandbay manages on the configured provider "
        "(as `run` chooses it: --provider, $SANDBAY_PROVIDER, --config, $SANDBAY_CONFIG, "
        "./sandbay.toml, else local), or with --all on every installed provider.",
    )
    with_all(ls)
    ls.set_defaults(func=_ls)

    gc = sub.add_parser(
        "gc",
        help="remove sandboxes whose lease (expiry) passed",
        description="Remove orphaned sandboxes on the configured provider (chosen as for "
        "`ls`), or with --all on every installed provider.",
    )
    with_all(gc)
    gc.set_defaults(func=_gc)

    image = sub.add_parser("image", help="the agent image a provider runs agents in")
    image_sub = image.add_subparsers(title="image commands", metavar="COMMAND")
    build = image_sub.add_parser(
        "build",
        help="build the agent image for a provider (docker: the host's bundled claude CLI)",
        description="Build the agent image the way the provider builds images, or find it "
        "built, and print its reference. The provider is --provider, else the configured one "
        "(as for `run`); docker when that one has no images (local).",
    )
    build.add_argument(
        "--base",
        help="base image with Python 3.10+, for providers that build on one "
        "(default: the config's, else sandbay-base)",
    )
    build.add_argument(
        "--refresh",
        action="store_true",
        help="fetch the newest dependencies even when cached ones would do",
    )
    with_provider(build)
    build.set_defaults(func=_image_build)

    model = sub.add_parser("model", help="the scripted Messages-API model")
    model_sub = model.add_subparsers(title="model commands", metavar="COMMAND")
    serve = model_sub.add_parser("serve", help="serve a scripted model on loopback")
    serve.add_argument("--script", help="JSON file: a list of turns (default: the demo script)")
    serve.add_argument(
        "--port", type=_port, default=0, help="port on 127.0.0.1 (default: %(default)s, any free)"
    )
    serve.set_defaults(func=_model_serve, blocking=True)

    return parser


def _config(args: argparse.Namespace) -> Any:
    from ._config import load_config, parse_config

    config = load_config(getattr(args, "config", None))
    if getattr(args, "provider", None) and config.provider.type != args.provider:
        # Only when --provider names another type: a dump masks secrets (SecretStr), so
        # rebuilding the same provider's config from one would lose its API key.
        data = config.model_dump(mode="json", exclude_none=True)
        data["provider"] = {"type": args.provider}
        config = parse_config(data, where="--provider")
    return config


async def _run(args: argparse.Namespace) -> int:
    import anyio
    from claude_agent_sdk import ClaudeAgentOptions

    from ._agent import run_agent
    from .testing import ScriptedModel, default_script

    config = _config(args)
    _show_progress()  # a first run on docker builds the agent image
    offline = (
        args.offline
        or args.script
        or not (os.environ.get("ANTHROPIC_API_KEY") or os.environ.get("CLAUDE_CODE_OAUTH_TOKEN"))
    )
    tools = [t.strip() for t in args.allowed_tools.split(",") if t.strip()]
    # Not bypassPermissions by default: allowed_tools already lets a non-interactive run use
    # those tools, and bypassing every check is only safe behind a real isolation boundary.
    options = ClaudeAgentOptions(
        max_turns=args.max_turns,
        allowed_tools=tools,
        permission_mode=args.permission_mode,
        model=args.model,
    )
    spec = config.spec
    model: ScriptedModel | None = None
    env: dict[str, str] = {}
    if offline:
        model = (
            ScriptedModel.from_file(args.script) if args.script else ScriptedModel(default_script())
        )
        model.start()
        env = model.env()
        # The scripted model listens on the host's loopback.
        spec = spec.model_copy(update={"network": "host"})
        _note("offline: using the scripted model (set ANTHROPIC_API_KEY for a real one)")
    _note(f"provider: {config.provider.type}")
    printer = _Printer(json_lines=args.json, scripted=offline)
    try:
        run = run_agent(
            args.prompt, provider=config, options=options, timeout=args.timeout, spec=spec, env=env
        )
        if args.json:
            run.raw()
        with anyio.CancelScope() as stop:
            async with run:
                async for message in run:
                    if run.sandbox is not None and not printer.announced:
                        printer.announced = True
                        _note(f"sandbox {run.sandbox.id} ({run.sandbox.provider})")
                    try:
                        printer.show(message)
                    except BrokenPipeError:
                        # The reader went away (`| head -1`). Stop the run from inside: the
                        # cancellation reaches the run at its next step, which kills the agent
                        # and removes the sandbox before the loop ends.
                        _silence_stdout()
                        printer.closed = True
                        stop.cancel()
    finally:
        if model is not None:
            model.stop()
    if printer.closed:
        return BROKEN_PIPE
    return 0 if printer.ok else 1


class _Printer:
    def __init__(self, *, json_lines: bool, scripted: bool = False) -> None:
        self.json_lines = json_lines
        self.scripted = scripted  # a scripted model's token counts price nothing real
        self.ok = True
        self.announced = False
        self.closed = False  # stdout's reader went away: print nothing more

    def show(self, message: Any) -> None:
        if self.closed:
            return
        if self.json_lines:
            print(json.dumps(message), flush=True)
            if message.get("type") == "result" and message.get("is_error"):
                self.ok = False
            return
        from claude_agent_sdk import (
            AssistantMessage,
            ResultMessage,
            SystemMessage,
            TextBlock,
            ToolResultBlock,
            ToolUseBlock,
            UserMessage,
        )

        if isinstance(message, SystemMessage):
            if message.subtype == "init":
                data = message.data
                print(
                    f"● session {data.get('session_id', '?')[:8]} · model {data.get('model')}"
                    f" · cwd {data.get('cwd')}",
                    flush=True,
                )
        elif isinstance(message, AssistantMessage):
            for block in message.content:
                if isinstance(block, TextBlock):
                    print(block.text, flush=True)
                elif isinstance(block, ToolUseBlock):
                    shown = block.input.get("command") or json.dumps(block.input)
                    print(f"→ {block.name}: {shown}", flush=True)
        elif isinstance(message, UserMessage) and isinstance(message.content, list):
            for block in message.content:
                if isinstance(block, ToolResultBlock):
                    print(_indent(_content_text(block.content)), flush=True)
        elif isinstance(message, ResultMessage):
            self.ok = not message.is_error
            mark = "✗" if message.is_error else "✓"
            cost = ""
            if message.total_cost_usd and not self.scripted:
                cost = f" · ${message.total_cost_usd:.4f}"
            print(
                f"{mark} {message.subtype} · {message.num_turns} turns · "
                f"{message.duration_ms / 1000:.1f} s{cost}",
                flush=True,
            )


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _indent(text: str, limit: int = 20) -> str:
    lines = text.rstrip().splitlines() or [""]
    if len(lines) > limit:
        lines = [*lines[:limit], f"… {len(lines) - limit} more lines"]
    return "\n".join(f"  │ {line}" for line in lines)


async def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ._bench import BenchConfig, run_bench, write_results
    from ._config import SandbayConfig, load_config, parse_config
    from ._errors import ConfigError

    config = load_config(args.config)
    names = [n.strip() for n in (args.providers or config.provider.type).split(",") if n.strip()]
    if not names:
        raise ConfigError("--providers is empty: name at least one provider")
    # The configured provider keeps its settings; any other named one gets its defaults.
    providers: list[str | SandbayConfig] = [
        config if name == config.provider.type else parse_config({"provider": {"type": name}})
        for name in names
    ]
    if args.mode == "capacity":
        return await _bench_capacity(args, providers, config.spec)
    capacity_only = {"--turns": args.turns, "--alloc-mib": args.alloc_mib}
    capacity_only["--reserve-mib"] = args.reserve_mib
    given = [flag for flag, value in capacity_only.items() if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} applies to --mode capacity only")
    report = await run_bench(
        BenchConfig(
            providers=providers,
            runs=args.runs,
            mode=args.mode,
            concurrency=args.concurrency,
            model=args.model,
            spec=config.spec,
            raw_baseline=not args.no_raw,
            stagger_ms=args.stagger_ms,
        )
    )
    print(report.to_markdown())
    for path in write_results(report, Path(args.out)):
        _note(f"wrote {path}")
    return 0 if all(s.error is None for s in report.samples) else 1


async def _bench_capacity(args: argparse.Namespace, providers: list[Any], spec: Any) -> int:
    from pathlib import Path

    from ._bench import CapacityConfig, run_capacity
    from ._errors import ConfigError

    if args.stagger_ms is not None:
        raise ConfigError("--stagger-ms applies to --mode staggered only")
    settings = {"turns": args.turns, "alloc_mib": args.alloc_mib, "reserve_mib": args.reserve_mib}
    report = await run_capacity(
        CapacityConfig(
            providers=providers,
            runs=args.runs,
            spec=spec,
            **{k: v for k, v in settings.items() if v is not None},
        )
    )
    print(report.to_markdown())
    for path in report.write(Path(args.out)):
        _note(f"wrote {path}")
    return 0 if all(s.error is None for s in report.samples) else 1


async def _providers(args: argparse.Namespace) -> int:
    from ._config import parse_config
    from ._errors import MissingDependencyError
    from ._provider import make_provider, provider_names

    configured = None
    try:
        configured = _config(args).provider.type
    except SandboxError as exc:
        _note(f"config: {exc}")
    width = max(len(n) for n in provider_names())
    for name in provider_names():
        mark = "*" if name == configured else " "
        try:
            provider = make_provider(parse_config({"provider": {"type": name}}).provider)
            status = await provider.status()
            state = "ready" if status.reachable else "unreachable"
            detail = status.detail
        except MissingDependencyError as exc:
            state, detail = "not installed", exc.message
        print(f"{mark} {name:<{width}}  {state:<13}  {detail}")
    print("(* = configured provider)")
    return 0


def _until(expiry: float) -> str:
    """How long a lease has left (``12m``), or how long ago it ran out (``-3s``)."""
    import time

    left = expiry - time.time()
    size = abs(left)
    text = (
        f"{size:.0f}s"
        if size < 120
        else f"{size / 60:.0f}m"
        if size < 7200
        else f"{size / 3600:.0f}h"
    )
    return text if left >= 0 else f"-{text}"


async def _ls(args: argparse.Namespace) -> int:
    for name, provider in _chosen_providers(args):
        for info in await _listed(args, name, provider.list):
            labels = ",".join(
                f"{k}={v}" for k, v in sorted(info.labels.items()) if not k.startswith("sandbay.")
            )
            expiry = info.expiry
            lease = "lease=?" if expiry is None else f"lease={_until(expiry)}"
            print(f"{name:<8} {info.id:<24} {info.status:<10} {lease} {labels}")
    return 0


async def _gc(args: argparse.Namespace) -> int:
    total = 0
    for name, provider in _chosen_providers(args):
        for info, reason in await _listed(args, name, provider.gc):
            print(f"removed {name} {info.id} ({reason})")
            total += 1
    print(f"{total} sandbox(es) removed")
    return 0


async def _listed(
    args: argparse.Namespace, name: str, call: Callable[[], Awaitable[list[Any]]]
) -> list[Any]:
    """``call()``; with ``--all``, a provider that is not set up here (an installed cloud SDK
    without its credentials, or out of reach) is noted and skipped rather than ending the
    listing."""
    from ._errors import ConfigError, ProviderUnavailableError

    try:
        found: list[Any] = await call()
    except (ConfigError, ProviderUnavailableError) as exc:
        if not args.all:
            raise
        _note(f"{name} skipped: {exc.message}")
        return []
    return found


def _chosen_providers(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """The configured provider, or with ``--all`` every installed one."""
    from ._api import get_provider
    from ._errors import ConfigError, MissingDependencyError
    from ._provider import provider_names

    if not args.all:
        config = _config(args)
        return [(config.provider.type, get_provider(config))]
    if args.provider or args.config:
        raise ConfigError("--all lists every provider with its defaults: drop --provider/--config")
    chosen = []
    for name in provider_names():
        try:
            chosen.append((name, get_provider(name)))
        except MissingDependencyError:
            continue
    return chosen


async def _image_build(args: argparse.Namespace) -> int:
    from ._config import DockerConfig
    from ._errors import ConfigError
    from ._provider import make_provider

    config = _config(args).provider
    if args.provider is None and config.type == "local":
        # Before images were per provider, `image build` meant docker's: it still does
        # when nothing names a provider with images.
        config = DockerConfig()
    if args.base:
        if "base_image" not in type(config).model_fields:
            raise ConfigError(f"--base: the {config.type} provider builds on no base image")
        config = config.model_copy(update={"base_image": args.base})
    _show_progress()
    provider = make_provider(config)
    try:
        reference = await provider.build_image(refresh=args.refresh)
    finally:
        await provider.aclose()
    print(reference)
    return 0


def _model_serve(args: argparse.Namespace) -> int:
    from .testing._model import serve

    serve(args.script, port=args.port)  # until Ctrl-C
    return 0


def _note(text: str) -> None:
    print(f"sandbay: {text}", file=sys.stderr, flush=True)


def _show_progress() -> None:
    """Show the library's progress on stderr: its INFO records, and every line of a build."""
    import logging

    root = logging.getLogger("sandbay")
    if any(getattr(h, "name", None) == _PROGRESS for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.name = _PROGRESS
    handler.addFilter(_label)
    handler.setFormatter(logging.Formatter("sandbay: %(sandbay_what)s%(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger(IMAGE_LOGGER).setLevel(logging.DEBUG)


_PROGRESS = "sandbay-cli-progress"


def _label(record: Any) -> bool:
    record.sandbay_what = "agent image: " if record.name.startswith(IMAGE_LOGGER) else ""
    return True
