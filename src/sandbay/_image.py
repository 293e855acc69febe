"""The agent image as one provider-neutral recipe, which each provider renders its own way.

`AgentImageRecipe` says what an image that runs sandbay's agents holds, and nothing about how
it is built:

- the system Python 3.10+ (CPython on glibc: the ``claude`` CLI is a native glibc program),
  with nothing installed into it: sandbay's relay uses the standard library only;
- the ``claude`` CLI at a fixed path, ``/opt/sandbay/bin/claude``, whose directory comes first
  on ``PATH``: the very binary the host's claude-agent-sdk bundles (same version, same bytes;
  `HostCLI` finds it), so the CLI in the sandbox is the one the host's SDK was released with.
  The Agent SDK itself runs on the host and is not in the image;
- a non-root user (uid/gid 1000, ``sandbay``, home ``/home/sandbay``) processes run as, the
  workdir ``/workspace`` owned by it, and ``/tmp`` where sandbay keeps each run's files
  (``/tmp/sandbay``, made at run time by that user);
- the environment, with ``IS_SANDBOX=1`` only for providers that put a real boundary around
  the sandbox (every provider with images does).

How the relay finds the CLI, on every provider: ``ClaudeAgentOptions.cli_path`` if set; else
the ``claude`` bundled with a claude-agent-sdk importable by the Python running the relay
(the local providers run it with the host's Python: the host's own bundled CLI); else
``claude`` on ``PATH`` (images: `AgentImageRecipe.cli_path`).

Renderers: the docker provider turns the recipe into a Dockerfile and a build context
(`sandbay.providers.docker`); `AgentImageRecipe.render_shell_script` gives the same steps as
a POSIX script for providers whose templates are shell steps. Which provider builds is the
provider's business: `Provider.build_image`.

This module imports no provider: providers import it. Progress is logged on the
``sandbay.image`` logger (`IMAGE_LOG`); the CLI shows it on stderr.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import re
import shlex
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ._errors import ImageError

__all__ = [
    "IMAGE_LOG",
    "AgentImageRecipe",
    "HostCLI",
    "ImageUser",
    "agent_image_recipe",
    "content_hash",
    "host_cli",
    "sdk_version",
]

#: Where image builds log their progress (milestones at INFO, tools' output at DEBUG).
IMAGE_LOG = logging.getLogger("sandbay.image")

SDK_DISTRIBUTION = "claude-agent-sdk"
#: Where the SDK's wheel keeps its CLI, relative to its installation.
BUNDLED_CLI = "claude_agent_sdk/_bundled/claude"
#: Fallback ``PATH`` behind the CLI's directory when the base sets none.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ImageUser:
    """The non-root user an agent image runs its processes as.

    Attributes:
        uid: Its user id; an existing user with this id is kept as it is.
        gid: Its group id; an existing group with this id is kept.
        name: Its name when the image has to create it.
        home: Its home directory when the image has to create it.
        shell: Its login shell.
    """

    uid: int = 1000
    gid: int = 1000
    name: str = "sandbay"
    home: str = "/home/sandbay"
    shell: str = "/bin/bash"

    @property
    def ids(self) -> str:
        """``uid:gid``, as ``chown`` and a container's ``USER`` take it."""
        return f"{self.uid}:{self.gid}"


@dataclass(frozen=True)
class HostCLI:
    """The ``claude`` CLI the host's claude-agent-sdk bundles: what the image gets.

    Found without importing the SDK (which takes most of a second): its installed files and
    their record, which holds the binary's SHA-256 as the wheel shipped it.

    Attributes:
        path: The binary on the host.
        version: The CLI's version (``_bundled/claude.version``).
        sha256: Hex SHA-256 of the binary, from the wheel's record.
        size: Its size in bytes, from the record.
        machine: The CPU it runs on (``x86_64``, ``aarch64``), from the wheel's tag.
        glibc: The oldest glibc it runs on, from the wheel's ``manylinux_X_Y`` tag.
    """

    path: Path
    version: str
    sha256: str
    size: int
    machine: str
    glibc: tuple[int, int]


@dataclass(frozen=True)
class AgentImageRecipe:
    """What the agent image holds, for any provider to render (see the module docstring).

    Frozen: one recipe, one `digest`. Build it with `agent_image_recipe` to pin the host's CLI.

    Attributes:
        sdk_version: The host's claude-agent-sdk version, whose bundled CLI the image holds.
        cli_version: The version of that CLI (``claude --version``).
        cli_sha256: Hex SHA-256 of the CLI binary: the image's content, in its `digest`.
        name: The image's name (a Docker repository, a template's name).
        revision: Bumped when the steps change in a way the fields do not show.
        min_python: Oldest Python the base may have.
        os_packages: Debian packages that give the base what the recipe needs, for renderers
            that may install them (a Docker build has no network and installs nothing: its
            base must already hold them).
        cli_dir: Directory of the ``claude`` binary; it comes first on ``PATH``.
        user: The non-root user processes run as.
        workdir: The working directory, owned by `user`.
        run_dir: Where sandbay keeps each run's relay and logs; made at run time by the
            sandbox's user, so the image only needs ``/tmp`` writable.
        env: Environment every process gets, besides ``PATH``.
        sandbox_env: Environment only for providers with a real boundary around the sandbox
            (``IS_SANDBOX=1`` lets the CLI bypass permissions as root).
    """

    sdk_version: str
    cli_version: str = ""
    cli_sha256: str = ""
    name: str = "sandbay-agent"
    revision: str = "2"
    min_python: tuple[int, int] = (3, 10)
    os_packages: tuple[str, ...] = ("python3",)
    cli_dir: str = "/opt/sandbay/bin"
    user: ImageUser = field(default_factory=ImageUser)
    workdir: str = "/workspace"
    run_dir: str = "/tmp/sandbay"
    env: tuple[tuple[str, str], ...] = (("SHELL", "/bin/bash"), ("LANG", "C.UTF-8"))
    sandbox_env: tuple[tuple[str, str], ...] = (("IS_SANDBOX", "1"),)

    @property
    def requirement(self) -> str:
        """The pip requirement whose wheel bundles the CLI: claude-agent-sdk at `sdk_version`."""
        return f"{SDK_DISTRIBUTION}=={self.sdk_version}"

    @property
    def cli_path(self) -> str:
        """Where the image keeps the ``claude`` binary."""
        return f"{self.cli_dir}/claude"

    @property
    def digest(self) -> str:
        """A hash of every field: equal recipes, equal digests. 12 hex digits."""
        data = json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))
        return content_hash(data)

    @property
    def tag(self) -> str:
        """``name:digest``: an image name that changes whenever the recipe does."""
        return f"{self.name}:{self.digest}"

    def environment(self, *, isolated: bool = True) -> dict[str, str]:
        """The environment variables the image sets, ``PATH`` excepted (it extends the base's).

        Args:
            isolated: Whether the provider keeps the sandbox behind a real boundary; only
                then is `sandbox_env` included.
        """
        return {**(dict(self.sandbox_env) if isolated else {}), **dict(self.env)}

    def render_shell_script(
        self,
        *,
        cli_source: str | None = None,
        find_links: str | None = None,
        isolated: bool = True,
    ) -> str:
        """The recipe as a POSIX ``sh`` script, run as root on a Debian-like base.

        For providers whose templates are shell steps. It installs `os_packages` with
        ``apt-get`` only when the base lacks Python, checks the Python version, puts the CLI
        at `cli_path` and checks that it runs, creates the user and the workdir, and writes
        the environment to ``/etc/profile.d/sandbay-agent.sh`` (providers that set
        environment natively use `environment` instead). Running it twice changes nothing
        more.

        The CLI comes from ``cli_source``, a copy of the host's binary (`host_cli`) the
        provider uploaded; without one, the script takes it from the claude-agent-sdk wheel
        at `sdk_version`, fetched by pip in a throwaway venv that is removed afterwards.

        Args:
            cli_source: Path, where the script runs, of the ``claude`` binary to install.
            find_links: Without ``cli_source``: a directory of wheels to fetch the SDK's
                from, without the package index.
            isolated: Whether the sandbox is behind a real boundary (see `environment`).
        """
        q = shlex.quote
        user = self.user
        cli, cli_dir = q(self.cli_path), q(self.cli_dir)
        major, minor = self.min_python
        exports = "".join(
            f"export {key}={q(value)}\n"
            for key, value in self.environment(isolated=isolated).items()
        )
        path = f'export PATH={cli_dir}:"${{PATH:-{SYSTEM_PATH}}}"\n'
        if cli_source is not None:
            install = f"install -m 0755 {q(cli_source)} {cli}\n"
        else:
            pip_from = f"--no-index --find-links {q(find_links)} " if find_links else ""
            fetch = "/tmp/sandbay-cli-fetch"
            install = (
                f"if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then\n"
                f"  apt-get update -qq\n"
                f"  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv\n"
                f"fi\n"
                f"rm -rf {fetch} && python3 -m venv {fetch}\n"
                f"{fetch}/bin/python -m pip install --no-cache-dir --disable-pip-version-check "
                f"--no-deps {pip_from}{q(self.requirement)}\n"
                f'sdk="$({fetch}/bin/python -c '
                f"'import claude_agent_sdk, os; "
                f"print(os.path.dirname(claude_agent_sdk.__file__))')\"\n"
                f'install -m 0755 "$sdk/_bundled/claude" {cli}\n'
                f"rm -rf {fetch}\n"
            )
            if self.cli_version:
                # A base that holds this very CLI already (an image of this recipe) keeps it.
                have = f'"$(HOME=/tmp/sandbay-cli-check {cli} --version 2>/dev/null || true)"'
                body = "".join(f"    {line}\n" for line in install.splitlines())
                install = f"case {have} in\n  {q(self.cli_version)}' '*) ;;\n  *)\n{body}esac\n"
        return (
            f"#!/bin/sh\n"
            f"# sandbay agent image {self.tag} (recipe {self.revision}), as shell steps.\n"
            f"set -eu\n"
            f"if ! command -v python3 >/dev/null 2>&1; then\n"
            f"  apt-get update -qq\n"
            f"  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq"
            f" {' '.join(q(p) for p in self.os_packages)}\n"
            f"fi\n"
            f"python3 -c 'import sys; sys.exit(sys.version_info < ({major}, {minor}))' || {{\n"
            f"  echo 'sandbay: the base needs Python {major}.{minor} or newer' >&2; exit 1; }}\n"
            f"mkdir -p {cli_dir}\n"
            f"{install}"
            f"HOME=/tmp/sandbay-cli-check {cli} --version && rm -rf /tmp/sandbay-cli-check\n"
            f"getent group {user.gid} >/dev/null || groupadd --gid {user.gid} {q(user.name)}\n"
            f"getent passwd {user.uid} >/dev/null || useradd --uid {user.uid} --gid {user.gid}"
            f" --create-home --home-dir {q(user.home)} --shell {q(user.shell)} {q(user.name)}\n"
            f"mkdir -p {q(self.workdir)} && chown {user.ids} {q(self.workdir)}\n"
            f"mkdir -p /etc/profile.d\n"
            f"cat > /etc/profile.d/sandbay-agent.sh <<'SANDBAY_ENV'\n"
            f"{path}{exports}"
            f"SANDBAY_ENV\n"
        )


def agent_image_recipe(**changes: Any) -> AgentImageRecipe:
    """The agent image recipe for this host: the CLI its claude-agent-sdk bundles.

    Args:
        **changes: Fields to set other than the defaults (see `AgentImageRecipe`).

    Raises:
        ImageError: claude-agent-sdk is not installed on the host, or has no bundled CLI.
    """
    cli = host_cli()
    recipe = AgentImageRecipe(
        sdk_version=sdk_version(), cli_version=cli.version, cli_sha256=cli.sha256
    )
    return dataclasses.replace(recipe, **changes) if changes else recipe


def sdk_version() -> str:
    """The claude-agent-sdk version installed on the host; the image gets its CLI."""
    try:
        return metadata.version(SDK_DISTRIBUTION)
    except metadata.PackageNotFoundError:  # pragma: no cover - it is a dependency of sandbay
        raise ImageError(
            f"{SDK_DISTRIBUTION} is not installed on the host: pip install {SDK_DISTRIBUTION}"
        ) from None


def host_cli() -> HostCLI:
    """The ``claude`` binary the host's claude-agent-sdk bundles, with its version and hash.

    Raises:
        ImageError: The SDK is not installed, or was installed from a wheel without a CLI
            (a platform the SDK ships no CLI for), or its files are not what its record says.
    """
    try:
        dist = metadata.distribution(SDK_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise ImageError(
            f"{SDK_DISTRIBUTION} is not installed on the host, and the agent image takes its "
            f"bundled claude CLI: pip install {SDK_DISTRIBUTION}"
        ) from None
    record = next((f for f in dist.files or () if str(f) == BUNDLED_CLI), None)
    path = Path(str(dist.locate_file(BUNDLED_CLI)))
    if record is None or record.hash is None or record.size is None or not path.is_file():
        raise ImageError(
            f"{SDK_DISTRIBUTION} {dist.version} on this host has no bundled claude CLI "
            f"(expected {path}); the agent image copies it. Install the SDK's wheel for a "
            "Linux platform it ships the CLI for (manylinux x86_64 or aarch64)"
        )
    if record.size != path.stat().st_size:
        raise ImageError(
            f"{path} is {path.stat().st_size} bytes, but {SDK_DISTRIBUTION}'s record says "
            f"{record.size}: reinstall it (pip install --force-reinstall {SDK_DISTRIBUTION})"
        )
    sha256 = base64.urlsafe_b64decode(record.hash.value + "==").hex()
    version_file = path.with_name("claude.version")
    version = (version_file.read_text().split() or [""])[0] if version_file.is_file() else ""
    tags = re.findall(r"manylinux_(\d+)_(\d+)_(\w+)", dist.read_text("WHEEL") or "")
    if tags:
        major, minor, machine = tags[0]
        glibc = (int(major), int(minor))
    else:
        import platform

        machine, glibc = platform.machine(), (2, 17)
    return HostCLI(path, version or f"(of {dist.version})", sha256, record.size, machine, glibc)


def content_hash(*parts: str) -> str:
    """12 hex digits of SHA-256 over ``parts``, each ended by a NUL byte. Tags are made of it."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:12]
