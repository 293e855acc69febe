"""The agent image on Docker: the recipe rendered as a Dockerfile, built without network.

`sandbay._image.AgentImageRecipe` says what the image holds: the base's own Python and the
``claude`` CLI the host's claude-agent-sdk bundles, nothing installed into that Python. This
module builds it in two steps, neither of which needs a registry or network inside Docker:

1. The base image is run once to check its Python (3.10+, CPython), its C library (glibc, new
   enough for the CLI) and its CPU (the CLI's).
2. ``docker build`` receives a build context streamed straight from the host's installed SDK
   (the ~400 MB binary is read once, hashed on the way and checked against the SDK's record,
   never copied to a temporary file), copies it to ``/opt/sandbay/bin/claude``, checks that it
   runs, and adds the user, the workdir and the environment. One stage, no package manager.

The image is tagged ``sandbay-agent:<hash of inputs>`` (the rendered Dockerfile, which names
the CLI's version and SHA-256, and the base image's id) and ``sandbay-agent:latest``. Its
labels record a recipe key (a hash of the Dockerfile) so `ensure_agent_image` finds a fitting
image with one API call and builds only when none exists. Progress is logged on
``sandbay.image``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tarfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from ..._errors import ImageError
from ..._image import IMAGE_LOG as LOG
from ..._image import (
    SYSTEM_PATH,
    AgentImageRecipe,
    HostCLI,
    agent_image_recipe,
    content_hash,
    host_cli,
)
from ._errors import docker_client, docker_errors

if TYPE_CHECKING:
    from ..._config import DockerConfig

__all__ = [
    "AGENT_IMAGE",
    "AGENT_REPOSITORY",
    "DEFAULT_BASE_IMAGE",
    "build_agent_image",
    "ensure_agent_image",
    "render_dockerfile",
]

AGENT_REPOSITORY = "sandbay-agent"
AGENT_IMAGE = f"{AGENT_REPOSITORY}:latest"
DEFAULT_BASE_IMAGE = "sandbay-base:bookworm"

LABEL_KEY = "sandbay.agent.key"
LABEL_BASE = "sandbay.agent.base"
LABEL_BASE_ID = "sandbay.agent.base-id"
LABEL_SDK = "sandbay.agent.sdk"
LABEL_CLI = "sandbay.agent.cli"
#: Label of the first stage of images built before the CLI-only recipe; removed if found.
LABEL_STAGE = "sandbay.agent.stage"
#: The CLI's name in the build context.
_CONTEXT_CLI = "claude"

_ENSURE_LOCK = threading.Lock()

# Changing this text changes every tag (the tag hashes it).
_DOCKERFILE = """\
# sandbay agent image (recipe {revision}); built by `sandbay image build`.
# The base's Python and the claude CLI {cli_version} (sha256 {cli_sha256}) bundled with
# claude-agent-sdk {sdk_version}; the SDK itself runs on the host.
FROM {base}
COPY {context_cli} {cli_path}
RUN HOME=/tmp/sandbay-cli-check {cli_path} --version \\
 && rm -rf /tmp/sandbay-cli-check \\
 && (getent group {gid} >/dev/null || groupadd --gid {gid} {user}) \\
 && (getent passwd {uid} >/dev/null \\
      || useradd --uid {uid} --gid {gid} --create-home --home-dir {home} \\
           --shell {shell} {user}) \\
 && mkdir -p {workdir} && chown {ids} {workdir}
ENV PATH={cli_dir}:${{PATH:-{system_path}}}{env}
USER {ids}
WORKDIR {workdir}
CMD ["/bin/sh"]
"""


def render_dockerfile(recipe: AgentImageRecipe, *, base: str) -> str:
    """The recipe as a Dockerfile on ``base``, whose context holds the CLI as ``claude``.

    Docker sandboxes are behind a real boundary, so the environment has ``IS_SANDBOX``.
    """
    user = recipe.user
    env = "".join(
        f" \\\n    {key}={_env_value(value)}"
        for key, value in recipe.environment(isolated=True).items()
    )
    return _DOCKERFILE.format(
        revision=recipe.revision,
        cli_version=recipe.cli_version or "(unknown)",
        cli_sha256=recipe.cli_sha256 or "(unknown)",
        sdk_version=recipe.sdk_version,
        base=base,
        context_cli=_CONTEXT_CLI,
        cli_path=recipe.cli_path,
        cli_dir=recipe.cli_dir,
        uid=user.uid,
        gid=user.gid,
        user=user.name,
        home=user.home,
        shell=user.shell,
        ids=user.ids,
        workdir=recipe.workdir,
        system_path=SYSTEM_PATH,
        env=env,
    )


def _env_value(value: str) -> str:
    plain = value and not any(c.isspace() or c in "\"'\\$" for c in value)
    return value if plain else json.dumps(value)


# Run in the base image to learn what the CLI must fit.
_PROBE = """\
import json, os, platform, sys
try:
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
except (ValueError, OSError):
    libc = ""
print(json.dumps({
    "implementation": sys.implementation.name,
    "version": list(sys.version_info[:2]),
    "libc": libc,
    "machine": platform.machine(),
}))
"""


@dataclass(frozen=True)
class _BaseInfo:
    """What the base image's Python and C library are."""

    image_id: str
    python: tuple[int, int]
    glibc: tuple[int, int]
    machine: str


def build_agent_image(
    config: DockerConfig | None = None,
    *,
    base: str | None = None,
    refresh: bool = False,
    recipe: AgentImageRecipe | None = None,
) -> str:
    """Build the agent image (or find it built) and return its tag. Blocking.

    Building is skipped when an image with the same inputs exists; ``sandbay-agent:latest``
    then points at it. Progress is logged on ``sandbay.image``.

    Args:
        config: Which engine (``base_url``) and default base image; default `DockerConfig()`.
        base: Base image to build on; default ``config.base_image``.
        refresh: Accepted for other providers' builds; a docker build downloads nothing
            (the CLI comes from the host's installed claude-agent-sdk).
        recipe: What to build; default `agent_image_recipe()` (the host's bundled CLI).

    Returns:
        The tag ``sandbay-agent:<hash>``.

    Raises:
        ImageError: The base image is missing or unsuitable, the host's SDK has no bundled
            CLI, or the build failed; the message says which and what to do.
        ProviderUnavailableError: The Docker daemon cannot be reached.
    """
    from ..._config import DockerConfig

    config = config or DockerConfig()
    with docker_errors(base_url=config.base_url):
        client = docker_client(config)
        try:
            with _ENSURE_LOCK:
                return _build(
                    client,
                    recipe or agent_image_recipe(),
                    base=base or config.base_image,
                    refresh=refresh,
                )
        finally:
            client.close()


async def ensure_agent_image(
    client_factory: Callable[[], Any],
    *,
    base: str = DEFAULT_BASE_IMAGE,
    build: bool = False,
    refresh: bool = False,
    recipe: AgentImageRecipe | None = None,
) -> str:
    """Return an agent image fitting ``base`` and the recipe, building it if none exists.

    Finding an existing image costs two API calls; building the first time takes under a
    minute (mostly sending the ~400 MB CLI to the engine). Concurrent first uses in one
    process build once.

    Args:
        client_factory: Returns a ``docker.DockerClient`` (blocking; called in a worker thread).
        base: Base image to build on when needed.
        build: Go through the build's steps even when a fitting image exists (they skip the
            ``docker build`` itself when the inputs are built), as ``sandbay image build``.
        refresh: Accepted for other providers' builds; a docker build downloads nothing.
        recipe: What the image must hold; default `agent_image_recipe()`.

    Returns:
        An image reference (``sandbay-agent:<hash>``, or the image id if it has no such tag).

    Raises:
        ImageError: No fitting image exists and building one failed.
        ProviderUnavailableError: The Docker daemon cannot be reached.
    """
    wanted = recipe or agent_image_recipe()

    def ensure() -> str:
        with docker_errors(), _ENSURE_LOCK:
            client = client_factory()
            if not build:
                found = _find(client, wanted, base=base)
                if found is not None:
                    return found
                LOG.info("no agent image for %s yet: building it (a minute or two)", base)
            return _build(client, wanted, base=base, refresh=refresh)

    return await anyio.to_thread.run_sync(ensure)


# --- internals ---------------------------------------------------------------------------


def _recipe_key(recipe: AgentImageRecipe, base: str) -> str:
    """What an existing image must match to be reused, known without asking pip."""
    return hashlib.sha256(render_dockerfile(recipe, base=base).encode()).hexdigest()[:16]


def _image_id(client: Any, base: str) -> str | None:
    import docker.errors

    try:
        return str(client.api.inspect_image(base)["Id"])
    except docker.errors.NotFound:
        return None


def _find(client: Any, recipe: AgentImageRecipe, *, base: str) -> str | None:
    """An existing agent image for this base and recipe, or ``None``."""
    key = _recipe_key(recipe, base)
    images = client.api.images(filters={"label": f"{LABEL_KEY}={key}"})
    if not images:
        return None
    base_id = _image_id(client, base)
    for image in sorted(images, key=lambda i: i.get("Created", 0), reverse=True):
        labels = image.get("Labels") or {}
        # A base image rebuilt since (new id) means a stale agent image; a base image removed
        # since is fine: the agent image does not need it.
        if base_id is None or labels.get(LABEL_BASE_ID) == base_id:
            return _reference(image)
    return None


def _reference(image: dict[str, Any]) -> str:
    tags = [t for t in image.get("RepoTags") or [] if t.startswith(AGENT_REPOSITORY + ":")]
    named = [t for t in tags if t != AGENT_IMAGE]
    return str((named or tags or [image["Id"]])[0])


def _build(client: Any, recipe: AgentImageRecipe, *, base: str, refresh: bool) -> str:
    del refresh  # nothing is downloaded: the CLI comes from the host's installed SDK
    base_id = _image_id(client, base)
    if base_id is None:
        hint = (
            "build it with .ci/base-image.sh (debootstrap + docker import)"
            if base == DEFAULT_BASE_IMAGE
            else "pull or build it first"
        )
        raise ImageError(
            f"base image {base!r} is not present on the Docker engine (sandbay never pulls): "
            f"{hint}, or give another base with Python 3.10+ on glibc "
            "(`sandbay image build --base IMAGE`, or base_image in the docker config)"
        )
    cli = host_cli()
    if recipe.cli_sha256 and recipe.cli_sha256 != cli.sha256:
        raise ImageError(
            f"the recipe wants the claude CLI with SHA-256 {recipe.cli_sha256}, but the host's "
            f"claude-agent-sdk bundles {cli.sha256} ({cli.version}): build with "
            "agent_image_recipe(), which takes the host's"
        )
    LOG.info("probing base image %s", base)
    info = _probe(client, recipe, base, base_id, cli)
    dockerfile = render_dockerfile(recipe, base=base)
    tag = f"{AGENT_REPOSITORY}:{content_hash(dockerfile, base_id)}"

    if _image_id(client, tag) is None:
        LOG.info(
            "building %s on %s (Python %d.%d) with the claude CLI %s (%d MB) from %s",
            tag,
            base,
            *info.python,
            cli.version,
            cli.size // 2**20,
            cli.path.parent,
        )
        labels = {
            LABEL_KEY: _recipe_key(recipe, base),
            LABEL_BASE: base,
            LABEL_BASE_ID: base_id,
            LABEL_SDK: recipe.sdk_version,
            LABEL_CLI: cli.version,
        }
        try:
            _docker_build(client, tag, _context(dockerfile, cli), labels=labels)
        finally:
            _remove_install_stage(client)
    else:
        LOG.info("%s is already built", tag)
    client.api.tag(tag, AGENT_REPOSITORY, "latest")
    LOG.info("tagged %s as %s", tag, AGENT_IMAGE)
    return tag


def _probe(
    client: Any, recipe: AgentImageRecipe, base: str, base_id: str, cli: HostCLI
) -> _BaseInfo:
    import docker.errors

    advice = (
        f"use a glibc base with Python {recipe.min_python[0]}.{recipe.min_python[1]}+ "
        f"(Debian: {' '.join(recipe.os_packages)})"
    )
    api = client.api
    container = api.create_container(
        base_id,
        ["python3", "-c", _PROBE],
        user="0:0",
        host_config=api.create_host_config(network_mode="none"),
    )["Id"]
    try:
        try:
            api.start(container)
        except docker.errors.APIError as exc:
            # The runtime could not start python3 at all (missing executable).
            raise ImageError(
                f"base image {base!r} has no usable python3 ({exc.explanation}); {advice}"
            ) from None
        code = api.wait(container, timeout=120).get("StatusCode")
        out = api.logs(container, stdout=True, stderr=False)
        err = api.logs(container, stdout=False, stderr=True)
    finally:
        api.remove_container(container, force=True)
    if code != 0:
        detail = err.decode(errors="replace").strip()[-500:]
        raise ImageError(
            f"base image {base!r} cannot run python3 (exit code {code}): {detail}; {advice}"
        )
    try:
        found = json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise ImageError(f"could not read Python details from base image {base!r}") from None
    python = (int(found["version"][0]), int(found["version"][1]))
    problems = []
    if found["implementation"] != "cpython":
        problems.append(f"its python3 is {found['implementation']}, not CPython")
    if python < recipe.min_python:
        want = ".".join(map(str, recipe.min_python))
        problems.append(f"its Python is {python[0]}.{python[1]}, older than {want}")
    libc_name, _, libc_version = str(found["libc"]).partition(" ")
    glibc = (0, 0)
    if libc_name != "glibc":
        problems.append("it is not glibc-based (musl images cannot run the claude CLI)")
    else:
        major, minor = (int(part) for part in libc_version.split(".")[:2])
        glibc = (major, minor)
        if glibc < cli.glibc:
            problems.append(
                f"its glibc is {major}.{minor}; the claude CLI {cli.version} needs "
                f"{cli.glibc[0]}.{cli.glibc[1]} or newer"
            )
    machine = str(found["machine"])
    if machine != cli.machine:
        problems.append(
            f"it runs on {machine}, and the host's claude CLI (which the image gets) is "
            f"built for {cli.machine}"
        )
    if problems:
        raise ImageError(f"base image {base!r} is unsuitable: {'; '.join(problems)}")
    return _BaseInfo(base_id, python, glibc, machine)


def _context(dockerfile: str, cli: HostCLI) -> Iterator[bytes]:
    """A build context as a tar stream: the Dockerfile, and the CLI read straight from the SDK.

    The CLI is hashed as it streams; a binary that is not the one the SDK's record names
    ends the stream with `ImageError` before the archive is complete, so nothing is built.
    """
    now = int(time.time())
    for name, size, mode in (
        ("Dockerfile", len(dockerfile.encode()), 0o644),
        (_CONTEXT_CLI, cli.size, 0o755),
    ):
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, mode, now
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        if name == "Dockerfile":
            yield dockerfile.encode()
        else:
            digest, read = hashlib.sha256(), 0
            with cli.path.open("rb") as fh:
                while read < size and (chunk := fh.read(min(1 << 20, size - read))):
                    digest.update(chunk)
                    read += len(chunk)
                    yield chunk
            if read != size or digest.hexdigest() != cli.sha256:
                raise ImageError(
                    f"{cli.path} changed or is not the CLI claude-agent-sdk's record names "
                    "(size or SHA-256 differ): reinstall claude-agent-sdk"
                )
        if size % tarfile.BLOCKSIZE:
            yield tarfile.NUL * (tarfile.BLOCKSIZE - size % tarfile.BLOCKSIZE)
    yield tarfile.NUL * (2 * tarfile.BLOCKSIZE)  # end of archive


def _remove_install_stage(client: Any) -> None:
    """Drop a leftover first stage of an older recipe's build (wheels and a venv, ~600 MB).

    A concurrent build still using it keeps it (removal fails and is ignored).
    """
    import docker.errors

    stages = client.api.images(filters={"label": f"{LABEL_STAGE}=install", "dangling": True})
    for image in stages:
        with contextlib.suppress(docker.errors.APIError):
            client.api.remove_image(image["Id"])


def _docker_build(
    client: Any,
    tag: str,
    context: Iterator[bytes],
    *,
    labels: dict[str, str],
) -> None:
    tail: deque[str] = deque(maxlen=25)
    built = False
    stream = client.api.build(
        fileobj=context,
        custom_context=True,
        tag=tag,
        labels=labels,
        rm=True,
        forcerm=True,
        pull=False,
        network_mode="none",  # the wheels are in the context; nothing may be fetched
        use_config_proxy=False,
        decode=True,
    )
    for event in stream:
        if "error" in event:
            detail = event.get("errorDetail", {}).get("message") or event["error"]
            raise ImageError(
                f"building {tag} failed: {str(detail).strip()}\n"
                "--- last lines of the build ---\n" + "\n".join(tail)
            )
        text = event.get("stream")
        if isinstance(text, str):
            for line in text.splitlines():
                if line.strip():
                    tail.append(line)
                    LOG.debug("%s", line)
        if "aux" in event and isinstance(event["aux"], dict) and "ID" in event["aux"]:
            built = True
    if not built:
        raise ImageError(
            f"building {tag} ended without an image\n--- last lines of the build ---\n"
            + "\n".join(tail)
        )
