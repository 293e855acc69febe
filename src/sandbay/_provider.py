"""The provider side of the interface: create, list and destroy sandboxes, and health checks.

A provider module under `sandbay.providers` defines one `Provider` subclass built on its
SDK. Everything provider-neutral (labels, garbage collection, the registry) is here.
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, ClassVar

from ._errors import ConfigError, MissingDependencyError
from ._sandbox import EXPIRY_LABEL, Sandbox, SandboxSpec

if TYPE_CHECKING:
    from ._config import ProviderConfig

__all__ = ["Provider", "ProviderStatus", "SandboxInfo", "managed_labels"]

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

    `__init__` does no I/O: clients connect on first use.
    """

    name: ClassVar[str]
    #: Shown beside the provider in benchmark reports (e.g. "local fake: client overhead only").
    bench_label: ClassVar[str] = ""

    @abc.abstractmethod
    async def create(self, spec: SandboxSpec) -> Sandbox:
        """Provision a sandbox and return it ready: its first `exec` may run at once.

        The spec's labels (sandbay's own among them) must be attached so that `list` finds
        it. On failure nothing may be left behind.

        Raises:
            ProviderUnavailableError: The provider cannot be reached.
            ConfigError: The spec asks for something this provider cannot do.
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

    async def raw_create_exec(self, spec: SandboxSpec) -> float:
        """Seconds for create → first exec (``true``) done directly with the provider's SDK.

        The benchmark's baseline for sandbay's own overhead. The sandbox is removed
        afterwards (not timed).

        Raises:
            NotImplementedError: The provider has no raw baseline.
        """
        raise NotImplementedError

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


# name -> (module, class, pip extra or None)
_REGISTRY: dict[str, tuple[str, str, str | None]] = {
    "local": ("sandbay.providers.local", "LocalProvider", None),
    "docker": ("sandbay.providers.docker", "DockerProvider", "docker"),
}


def provider_names() -> list[str]:
    """Names of every provider sandbay knows."""
    return sorted(_REGISTRY)


def make_provider(config: ProviderConfig) -> Provider:
    """Instantiate the provider a config selects, importing its module lazily.

    Raises:
        ConfigError: Unknown provider.
        MissingDependencyError: Its SDK is not installed (the message names the extra).
    """
    module = provider_module(config.type)
    cls: type[Provider] = getattr(module, _REGISTRY[config.type][1])
    return cls(config)  # type: ignore[call-arg]


def provider_module(name: str) -> ModuleType:
    """Import a provider's module (and so its SDK), or say which extra installs it.

    Raises:
        ConfigError: Unknown provider.
        MissingDependencyError: Its SDK is not installed (the message names the extra).
    """
    try:
        module_name, _, extra = _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown provider {name!r}; valid providers: {', '.join(provider_names())}"
        ) from None
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        missing = exc.name or "its SDK"
        raise MissingDependencyError(
            f"the {name} provider needs {missing!r}, which is not installed: "
            f'pip install "sandbay[{extra}]"',
            provider=name,
        ) from exc
