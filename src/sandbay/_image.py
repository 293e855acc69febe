"""The agent image as one provider-neutral recipe, which each provider renders its own way.

`AgentImageRecipe` says what an image that runs sandbay's agents holds, and nothing about how
it is built:

- a Python 3.10+ (CPython on glibc: the bundled ``claude`` CLI needs glibc) with ``venv``;
- a venv (``/opt/sandbay/venv``) with claude-agent-sdk pinned to the host's version (the host
  parses the messages, so both ends agree on them), first on ``PATH``: ``python3`` is the
  venv's, and ``claude`` is the CLI bundled in the wheel;
- a non-root user (uid/gid 1000, ``sandbay``, home ``/home/sandbay``) processes run as, the
  workdir ``/workspace`` owned by it, and ``/tmp`` where sandbay keeps each run's files
  (``/tmp/sandbay``, made at run time by that user);
- the environment, with ``IS_SANDBOX=1`` only for providers that put a real boundary around
  the sandbox (every provider with images does).

Renderers: the docker provider turns the recipe into a Dockerfile and a build context
(`sandbay.providers.docker`); `AgentImageRecipe.render_shell_script` gives the same steps as
a POSIX script for providers whose templates are shell steps. Which provider builds is the
provider's business: `Provider.build_image`.

This module imports no provider: providers import it. Progress is logged on the
``sandbay.image`` logger (`IMAGE_LOG`); the CLI shows it on stderr.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shlex
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from ._errors import ImageError

__all__ = [
    "IMAGE_LOG",
    "AgentImageRecipe",
    "ImageUser",
    "agent_image_recipe",
    "content_hash",
    "sdk_version",
]

#: Where image builds log their progress (milestones at INFO, tools' output at DEBUG).
IMAGE_LOG = logging.getLogger("sandbay.image")

SDK_DISTRIBUTION = "claude-agent-sdk"
#: Fallback ``PATH`` behind the venv when the base sets none.
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
class AgentImageRecipe:
    """What the agent image holds, for any provider to render (see the module docstring).

    Frozen: one recipe, one `digest`. Build it with `agent_image_recipe` to pin the host's SDK.

    Attributes:
        sdk_version: The claude-agent-sdk version installed in the image.
        name: The image's name (a Docker repository, a template's name).
        revision: Bumped when the steps change in a way the fields do not show.
        min_python: Oldest Python the base may have.
        os_packages: Debian packages that give the base what the recipe needs, for renderers
            that may install them (a Docker build has no network and installs nothing: its
            base must already hold them).
        venv: Where the venv with the SDK lives; its ``bin`` comes first on ``PATH``.
        user: The non-root user processes run as.
        workdir: The working directory, owned by `user`.
        run_dir: Where sandbay keeps each run's entrypoint and logs; made at run time by the
            sandbox's user, so the image only needs ``/tmp`` writable.
        env: Environment every process gets, besides ``PATH`` and ``VIRTUAL_ENV``.
        sandbox_env: Environment only for providers with a real boundary around the sandbox
            (``IS_SANDBOX=1`` lets the CLI bypass permissions as root).
    """

    sdk_version: str
    name: str = "sandbay-agent"
    revision: str = "1"
    min_python: tuple[int, int] = (3, 10)
    os_packages: tuple[str, ...] = ("python3", "python3-venv")
    venv: str = "/opt/sandbay/venv"
    user: ImageUser = field(default_factory=ImageUser)
    workdir: str = "/workspace"
    run_dir: str = "/tmp/sandbay"
    env: tuple[tuple[str, str], ...] = (("SHELL", "/bin/bash"), ("LANG", "C.UTF-8"))
    sandbox_env: tuple[tuple[str, str], ...] = (("IS_SANDBOX", "1"),)

    @property
    def requirement(self) -> str:
        """The pip requirement the venv installs: claude-agent-sdk at `sdk_version`."""
        return f"{SDK_DISTRIBUTION}=={self.sdk_version}"

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
        return {
            "VIRTUAL_ENV": self.venv,
            **(dict(self.sandbox_env) if isolated else {}),
            **dict(self.env),
        }

    def render_shell_script(self, *, find_links: str | None = None, isolated: bool = True) -> str:
        """The recipe as a POSIX ``sh`` script, run as root on a Debian-like base.

        For providers whose templates are shell steps. It installs `os_packages` with
        ``apt-get`` only when the base lacks Python or venv, checks the Python version,
        installs the SDK into the venv, links the bundled ``claude`` into the venv's ``bin``,
        creates the user and the workdir, and writes the environment to
        ``/etc/profile.d/sandbay-agent.sh`` (providers that set environment natively use
        `environment` instead). Running it twice changes nothing more.

        Args:
            find_links: A directory of wheels to install from without the package index.
            isolated: Whether the sandbox is behind a real boundary (see `environment`).
        """
        q = shlex.quote
        venv, user = q(self.venv), self.user
        pip_from = f"--no-index --find-links {q(find_links)} " if find_links else ""
        major, minor = self.min_python
        exports = "".join(
            f"export {key}={q(value)}\n"
            for key, value in self.environment(isolated=isolated).items()
        )
        path = f'export PATH={q(self.venv + "/bin")}:"${{PATH:-{SYSTEM_PATH}}}"\n'
        return (
            f"#!/bin/sh\n"
            f"# sandbay agent image {self.tag} (recipe {self.revision}), as shell steps.\n"
            f"set -eu\n"
            f"if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then\n"
            f"  apt-get update -qq\n"
            f"  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq"
            f" {' '.join(q(p) for p in self.os_packages)}\n"
            f"fi\n"
            f"python3 -c 'import sys; sys.exit(sys.version_info < ({major}, {minor}))' || {{\n"
            f"  echo 'sandbay: the base needs Python {major}.{minor} or newer' >&2; exit 1; }}\n"
            f"[ -x {venv}/bin/python ] || python3 -m venv {venv}\n"
            f"{venv}/bin/python -m pip install --no-cache-dir --disable-pip-version-check "
            f"{pip_from}{q(self.requirement)}\n"
            f'sdk="$({venv}/bin/python -c '
            f"'import claude_agent_sdk, os; print(os.path.dirname(claude_agent_sdk.__file__))')\"\n"
            f'bundled="$sdk/_bundled/claude"\n'
            f'if [ -x "$bundled" ]; then ln -sf "$bundled" {venv}/bin/claude'
            f' && "$bundled" --version; fi\n'
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
    """The agent image recipe for this host: claude-agent-sdk at the host's version.

    Args:
        **changes: Fields to set other than the defaults (see `AgentImageRecipe`).

    Raises:
        ImageError: claude-agent-sdk is not installed on the host.
    """
    recipe = AgentImageRecipe(sdk_version=sdk_version())
    return dataclasses.replace(recipe, **changes) if changes else recipe


def sdk_version() -> str:
    """The claude-agent-sdk version installed on the host; the image gets the same."""
    try:
        return metadata.version(SDK_DISTRIBUTION)
    except metadata.PackageNotFoundError:  # pragma: no cover - it is a dependency of sandbay
        raise ImageError(
            f"{SDK_DISTRIBUTION} is not installed on the host: pip install {SDK_DISTRIBUTION}"
        ) from None


def content_hash(*parts: str) -> str:
    """12 hex digits of SHA-256 over ``parts``, each ended by a NUL byte. Tags are made of it."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:12]
