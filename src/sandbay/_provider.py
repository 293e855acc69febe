"""The provider side of the interface: create, reattach, list and destroy sandboxes.

A provider module under `sandbay.providers` defines one `Provider` subclass built on its
SDK, and its config model (in `sandbay._config`, or in its own distribution registered by
entry point) names that class: the config models are the registry. Everything
provider-neutral (labels, garbage collection, making a provider from a config) is here.
"""

from __future__ import annotations

import abc
import builtins
import importlib
import math
import os
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import ClassVar

from ._config import BaseProviderConfig, config_type
from ._config import provider_names as provider_names
from ._errors import ConfigError, MissingDependencyError
from ._sandbox import EXPIRY_LABEL, Process, Sandbox, SandboxSpec

__all__ = ["Launch", "Provider", "ProviderStatus", "SandboxInfo", "managed_labels"]

LABEL_PREFIX = "sandbay."
MANAGED = "sandbay.managed"
SESSION = "sandbay.session"
OWNER = "sandbay.owner"
EXPIRY = EXPIRY_LABEL


@dataclass(frozen=True)
class SandboxInfo:
    """A sandbox as `Provider.list` sees it.

    Attributes:
        id: The provider's id.
        provider: The provider's name.
        labels: All its labels.
        status: The provider's word for its state (``running``, ``exited``, …).
        lease: Unix time its lease ends as the provider keeps it (renewed by
            `Sandbox.extend`), where that is apart from the labels; ``None``: the
            ``sandbay.expiry`` label is the lease.
    """

    id: str
    provider: str
    labels: Mapping[str, str] = field(default_factory=dict)
    status: str = "unknown"
    lease: float | None = None

    @property
    def expiry(self) -> float | None:
        """Unix time after which the sandbox may be removed: its lease, else its label."""
        if self.lease is not None:
            return self.lease
        try:
            return float(self.labels[EXPIRY])
        except (KeyError, ValueError):
            return None

    @property
    def owner(self) -> str | None:
        """``host:pid`` of the process that created it, if labelled.

        Informational only: a sandbox outlives the process that created it for as long as
        its lease runs (a restarted worker keeps its sandboxes), so gc never looks at it.
        """
        return self.labels.get(OWNER)

    def orphaned(self, *, now: float | None = None) -> str | None:
        """Why `sandbay gc` should remove it (``"expired"``), or ``None`` to keep it.

        Only the lease decides. A sandbox without an expiry is kept.
        """
        expiry = self.expiry
        if expiry is not None and (now if now is not None else time.time()) > expiry:
            return "expired"
        return None


@dataclass(frozen=True)
class Launch:
    """A process to start in a new sandbox, with the files it needs written first.

    Attributes:
        argv: The command (argv[0] looked up on PATH), started in the sandbox's `workdir`.
        files: Absolute path -> contents, written (mode 0644, as the sandbox's user,
            parent directories created) before the process starts.
    """

    argv: list[str]
    files: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class ProviderStatus:
    """What `sandbay providers` reports for one provider.

    Attributes:
        name: The provider's name.
        installed: Whether its SDK imports.
        reachable: Whether its daemon or API answered.
        detail: What was found, or what to do about it.
    """

    name: str
    installed: bool
    reachable: bool
    detail: str


class Provider(abc.ABC):
    """Creates sandboxes of one kind. One instance per config; cheap to construct.

    `__init__` takes the provider's config (a `BaseProviderConfig` subclass, whose
    ``provider_class`` names this class) and does no I/O: clients connect on first use.
    Whoever made a provider closes it with `aclose` (`sandbay.Providers` does, on exit).

    A provider must not bind a client to the event loop it happens to be first used in:
    the same instance may serve ``anyio.run`` after ``anyio.run``, and another thread's loop.
    A synchronous SDK client (docker's) is fine; an SDK whose client belongs to one loop
    makes it per call, or per loop.

    Attributes:
        config: The config it was made from.
    """

    name: ClassVar[str]

    def __init__(self, config: BaseProviderConfig) -> None:
        self.config = config

    @abc.abstractmethod
    async def create(self, spec: SandboxSpec) -> Sandbox:
        """Provision a sandbox and return it ready: its first `exec` may run at once.

        The spec's labels (sandbay's own among them) must be attached so that `list` finds
        it. On failure nothing may be left behind.

        Raises:
            ProviderUnavailableError: The provider cannot be reached.
            ConfigError: The spec asks for something this provider cannot do.
        """

    async def create_with_process(
        self, spec: SandboxSpec, launch: Callable[[Sandbox], Launch]
    ) -> tuple[Sandbox, Process]:
        """Provision a sandbox and start one process in it, as early as the provider can.

        The agent layer starts its entrypoint this way, so that the entrypoint's own
        start-up overlaps the provider's. This default is `create`, then `Sandbox.write_file`
        for each file, then `Sandbox.start`; a provider overrides it to do the same in fewer
        round trips (one call that writes the files and starts the process, the sandbox's
        own first command, …). The result must be indistinguishable from the default's.

        Args:
            spec: What to provision, as for `create`.
            launch: Called once, with the new sandbox before anything runs in it (its
                `Sandbox.agent_dir`, `Sandbox.python` and `Sandbox.workdir` are known),
                to say what to start.

        Returns:
            The sandbox, ready as after `create`, and the started process (its stdin open).

        Raises:
            ProviderUnavailableError: The provider cannot be reached.
            ConfigError: The spec asks for something this provider cannot do.
            SandboxError: Writing a file or starting the process failed. On any failure,
                cancellation included, the sandbox is removed: nothing is left behind.
        """
        sandbox = await self.create(spec)
        try:
            plan = launch(sandbox)
            for path, data in plan.files.items():
                await sandbox.write_file(path, data)
            return sandbox, await sandbox.start(plan.argv)
        except BaseException:
            await sandbox.aclose()
            raise

    @abc.abstractmethod
    async def connect(self, sandbox_id: str) -> Sandbox:
        """Reattach to a sandbox this provider created, from any process, by its id.

        The sandbox returned works fully (`Sandbox.exec`, `Sandbox.start`, files) and is
        owned by the caller: its `Sandbox.aclose` removes it, as if it had been created
        here. Its `Sandbox.spec` is rebuilt from what the provider stores: the labels
        always; the workdir, the user, the network and the env where the provider keeps
        them (each provider's docstring says which it cannot). Processes started before
        are not adopted as `Process` objects, but closing the sandbox stops them.

        Raises:
            SandboxNotFoundError: No sandbox with this id (never one, or removed).
            ProviderUnavailableError: The provider cannot be reached.
        """

    @abc.abstractmethod
    async def list(self, *, labels: Mapping[str, str] | None = None) -> list[SandboxInfo]:
        """Sandboxes sandbay manages on this provider, filtered by labels."""

    @abc.abstractmethod
    async def destroy(self, sandbox_id: str) -> None:
        """Remove a sandbox by id; a sandbox already gone is not an error."""

    @abc.abstractmethod
    async def status(self) -> ProviderStatus:
        """Check whether the provider is usable, without creating anything."""

    async def build_image(self, *, refresh: bool = False) -> str:
        """Build the agent image this provider runs agents in, or find it built.

        The image is `sandbay._image.AgentImageRecipe` rendered the provider's way (a
        Dockerfile, a template, a snapshot). Progress is logged on the ``sandbay.image``
        logger. ``sandbay image build --provider NAME`` calls this. Providers build their
        image on first use anyway; this does it ahead of time.

        Args:
            refresh: Fetch the newest dependencies even when cached ones would do.

        Returns:
            The provider's reference to the image (a tag, a template id).

        Raises:
            ConfigError: The provider has no images (the default).
            ImageError: Building failed; the message says why and what to do.
            ProviderUnavailableError: The provider cannot be reached.
        """
        raise ConfigError(f"the {self.name} provider has no images to build")

    async def gc(self, *, now: float | None = None) -> builtins.list[tuple[SandboxInfo, str]]:
        """Destroy sandboxes whose lease ran out (`SandboxInfo.orphaned`).

        Only the expiry decides (as `list` reports it, renewals included): a sandbox whose
        creator died lives out its lease, and one whose creator lives on is removed once
        its lease passed unrenewed. Which process created it does not matter, so gc may run
        anywhere (another host, another PID namespace) with the same result.

        Args:
            now: The time to judge by (Unix time); default the current time.

        Returns:
            Each removed sandbox with the reason.
        """
        removed = []
        for info in await self.list():
            reason = info.orphaned(now=now)
            if reason:
                await self.destroy(info.id)
                removed.append((info, reason))
        return removed

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most providers hold nothing
        """Release clients the provider holds."""


def managed_labels(spec: SandboxSpec, *, session: str | None = None) -> dict[str, str]:
    """sandbay's own labels for a new sandbox, merged under the user's.

    The user's labels cannot override ``sandbay.*`` ones: gc depends on them. The expiry
    is the first lease (``spec.lifetime_s`` from now; `Sandbox.extend` renews it); the
    owner (``host:pid``) is informational and gc ignores it.
    """
    bad = sorted(key for key in spec.labels if key.startswith(LABEL_PREFIX))
    if bad:
        raise ConfigError(f"labels {bad} use the reserved prefix {LABEL_PREFIX!r}; rename them")
    return {
        **spec.labels,
        MANAGED: "1",
        SESSION: session or uuid.uuid4().hex,
        OWNER: f"{socket.gethostname()}:{os.getpid()}",
        EXPIRY: f"{math.ceil(time.time() + spec.lifetime_s)}",
    }


def provider_class(config: BaseProviderConfig) -> type[Provider]:
    """The `Provider` subclass a config names, importing its module (and so its SDK).

    Raises:
        MissingDependencyError: Its SDK is not installed (the message names the extra).
        ConfigError: ``provider_class`` does not name a `Provider` subclass.
    """
    module_name, _, class_name = type(config).provider_class.partition(":")
    module = _import_provider(config.type, module_name, type(config).extra)
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise ConfigError(
            f"{type(config).__name__}.provider_class {type(config).provider_class!r} does "
            "not name a Provider subclass",
            provider=config.type,
        )
    return cls


def make_provider(config: BaseProviderConfig) -> Provider:
    """Instantiate the provider a config selects, importing its module lazily.

    The caller owns it: close it with `Provider.aclose` (or let `sandbay.Providers` own it).

    Raises:
        ConfigError: Unknown provider.
        MissingDependencyError: Its SDK is not installed (the message names the extra).
    """
    return provider_class(config)(config)


def provider_module(name: str) -> ModuleType:
    """Import a provider's module (and so its SDK), or say which extra installs it.

    Raises:
        ConfigError: Unknown provider.
        MissingDependencyError: Its SDK is not installed (the message names the extra).
    """
    model = config_type(name)
    return _import_provider(name, model.provider_class.partition(":")[0], model.extra)


def _import_provider(name: str, module_name: str, extra: str | None) -> ModuleType:
    try:
        return importlib.import_module(module_name)
    except MissingDependencyError:
        raise  # the provider said itself what is missing (a Python too old for its SDK)
    except ImportError as exc:
        missing = exc.name or "its SDK"
        how = f'pip install "sandbay[{extra}]"' if extra else "install it"
        raise MissingDependencyError(
            f"the {name} provider needs {missing!r}, which is not installed: {how}",
            provider=name,
        ) from exc
