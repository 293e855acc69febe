"""The agent image on Docker: the recipe rendered as a Dockerfile, built without network.

`sandbay._image.AgentImageRecipe` says what the image holds; this module builds it in three
steps, none of which needs a registry or network inside Docker:

1. The base image is run once to learn its Python version, C library and CPU.
2. The HOST's pip fetches wheels for exactly that interpreter and platform into a cache
   (``~/.cache/sandbay/wheels``; ``$XDG_CACHE_HOME`` is honoured). A cache that already holds
   a complete set is used without asking the index.
3. ``docker build`` receives a build context streamed straight from the cache (the 166 MB
   claude-agent-sdk wheel is read once, never copied to a temporary file), installs the
   wheels with ``pip install --no-index`` in a first stage, and copies only the finished venv
   into the final image, so the wheels do not stay in a layer.

The image is tagged ``sandbay-agent:<hash of inputs>`` (the rendered Dockerfile, the base
image's id, the wheel files) and ``sandbay-agent:latest``. Its labels record a recipe key (a
hash of the Dockerfile, which names the base and the SDK version) so `ensure_agent_image`
finds a fitting image with one API call and builds only when none exists. Progress is logged
on ``sandbay.image``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import anyio

from ..._errors import ImageError
from ..._image import IMAGE_LOG as LOG
from ..._image import SYSTEM_PATH, AgentImageRecipe, agent_image_recipe, content_hash
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
    "wheel_cache_dir",
]

AGENT_REPOSITORY = "sandbay-agent"
AGENT_IMAGE = f"{AGENT_REPOSITORY}:latest"
DEFAULT_BASE_IMAGE = "sandbay-base:bookworm"

LABEL_KEY = "sandbay.agent.key"
LABEL_BASE = "sandbay.agent.base"
LABEL_BASE_ID = "sandbay.agent.base-id"
LABEL_SDK = "sandbay.agent.sdk"
LABEL_STAGE = "sandbay.agent.stage"

_ENSURE_LOCK = threading.Lock()

# Changing this text changes every tag, so CI's cached image is rebuilt: the default recipe
# renders byte for byte what it did before the recipe existed (a test pins it).
_DOCKERFILE = """\
# sandbay agent image (recipe {revision}); built by `sandbay image build`.
FROM {base} AS install
LABEL {stage_label}=install
COPY wheels/ /tmp/sandbay-wheels/
RUN python3 -m venv {venv} \\
 && {venv}/bin/python -m pip install --no-index --no-cache-dir --disable-pip-version-check \\
      --find-links /tmp/sandbay-wheels '{requirement}' \\
 && {venv}/bin/python -c "import claude_agent_sdk" \\
 && sdk="$({venv}/bin/python -c \\
      'import claude_agent_sdk, os; print(os.path.dirname(claude_agent_sdk.__file__))')" \\
 && bundled="$sdk/_bundled/claude" \\
 && if [ -x "$bundled" ]; then ln -s "$bundled" {venv}/bin/claude && "$bundled" --version; fi

FROM {base}
RUN (getent group {gid} >/dev/null || groupadd --gid {gid} {user}) \\
 && (getent passwd {uid} >/dev/null \\
      || useradd --uid {uid} --gid {gid} --create-home --home-dir {home} \\
           --shell {shell} {user}) \\
 && mkdir -p {workdir} && chown {ids} {workdir}
COPY --from=install {venv} {venv}
ENV PATH={venv}/bin:${{PATH:-{system_path}}}{env}
USER {ids}
WORKDIR {workdir}
CMD ["/bin/sh"]
"""


def render_dockerfile(recipe: AgentImageRecipe, *, base: str) -> str:
    """The recipe as a two-stage Dockerfile on ``base``, whose context holds ``wheels/``.

    The first stage installs the wheels into the venv without an index; the second copies
    only the venv onto a fresh ``base`` with the user, the workdir and the environment.
    Docker sandboxes are behind a real boundary, so the environment has ``IS_SANDBOX``.
    """
    user = recipe.user
    env = "".join(
        f" \\\n    {key}={_env_value(value)}"
        for key, value in recipe.environment(isolated=True).items()
    )
    return _DOCKERFILE.format(
        revision=recipe.revision,
        stage_label=LABEL_STAGE,
        base=base,
        venv=recipe.venv,
        requirement=recipe.requirement,
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


# Run in the base image to learn what the wheels must fit.
_PROBE = """\
import json, os, platform, sys
try:
    import ensurepip, venv
    has_venv = True
except ImportError:
    has_venv = False
try:
    libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
except (ValueError, OSError):
    libc = ""
print(json.dumps({
    "implementation": sys.implementation.name,
    "version": list(sys.version_info[:2]),
    "libc": libc,
    "machine": platform.machine(),
    "venv": has_venv,
}))
"""


@dataclass(frozen=True)
class _BaseInfo:
    """What the base image's Python is: the wheels must match it."""

    image_id: str
    python: tuple[int, int]
    glibc: tuple[int, int]
    machine: str

    @property
    def platforms(self) -> list[str]:
        """Platform tags the base can run, most specific first (pip does not expand them)."""
        major, minor = self.glibc
        tags = [f"manylinux_{major}_{m}_{self.machine}" for m in range(minor, 16, -1)]
        tags.append(f"manylinux2014_{self.machine}")
        if self.machine in ("x86_64", "i686"):
            tags += [f"manylinux2010_{self.machine}", f"manylinux1_{self.machine}"]
        return tags


def wheel_cache_dir() -> Path:
    """Where downloaded wheels are kept between builds."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "sandbay" / "wheels"


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
        refresh: Ask the package index for the newest dependencies even when the wheel cache
            already holds a complete set.
        recipe: What to build; default `agent_image_recipe()` (the host's SDK version).

    Returns:
        The tag ``sandbay-agent:<hash>``.

    Raises:
        ImageError: The base image is missing or unsuitable, wheels could not be fetched, or
            the build failed; the message says which and what to do.
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

    Finding an existing image costs two API calls; building takes a minute or two the first
    time. Concurrent first uses in one process build once.

    Args:
        client_factory: Returns a ``docker.DockerClient`` (blocking; called in a worker thread).
        base: Base image to build on when needed.
        build: Go through the build's steps even when a fitting image exists (they skip the
            ``docker build`` itself when the inputs are built), as ``sandbay image build``.
        refresh: With ``build``, ask the package index for the newest dependencies.
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
    base_id = _image_id(client, base)
    if base_id is None:
        hint = (
            "build it with .ci/base-image.sh (debootstrap + docker import)"
            if base == DEFAULT_BASE_IMAGE
            else "pull or build it first"
        )
        raise ImageError(
            f"base image {base!r} is not present on the Docker engine (sandbay never pulls): "
            f"{hint}, or give another base with Python 3.10+ and venv "
            "(`sandbay image build --base IMAGE`, or base_image in the docker config)"
        )
    LOG.info("probing base image %s", base)
    info = _probe(client, recipe, base, base_id)
    wheels = _wheels(info, recipe.requirement, refresh=refresh)
    dockerfile = render_dockerfile(recipe, base=base)
    tag = f"{AGENT_REPOSITORY}:{content_hash(dockerfile, base_id, *sorted(w.name for w in wheels))}"

    if _image_id(client, tag) is None:
        LOG.info("building %s on %s (Python %d.%d)", tag, base, *info.python)
        labels = {
            LABEL_KEY: _recipe_key(recipe, base),
            LABEL_BASE: base,
            LABEL_BASE_ID: base_id,
            LABEL_SDK: recipe.sdk_version,
        }
        try:
            _docker_build(client, tag, _context(dockerfile, wheels), labels=labels)
        finally:
            _remove_install_stage(client)
    else:
        LOG.info("%s is already built", tag)
    client.api.tag(tag, AGENT_REPOSITORY, "latest")
    LOG.info("tagged %s as %s", tag, AGENT_IMAGE)
    return tag


def _probe(client: Any, recipe: AgentImageRecipe, base: str, base_id: str) -> _BaseInfo:
    import docker.errors

    advice = (
        f"use a base with Python {recipe.min_python[0]}.{recipe.min_python[1]}+ and its venv "
        f"module (Debian: {' '.join(recipe.os_packages)})"
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
    if not found["venv"]:
        problems.append("its Python lacks venv/ensurepip (Debian: apt-get install python3-venv)")
    libc_name, _, libc_version = str(found["libc"]).partition(" ")
    if libc_name != "glibc":
        problems.append("it is not glibc-based (musl images cannot run the bundled claude CLI)")
    if problems:
        raise ImageError(f"base image {base!r} is unsuitable: {'; '.join(problems)}")
    major, minor = (int(part) for part in libc_version.split(".")[:2])
    return _BaseInfo(base_id, python, (major, minor), str(found["machine"]))


def _pip_target(info: _BaseInfo) -> list[str]:
    major, minor = info.python
    args = [
        "--only-binary=:all:",
        "--python-version",
        f"{major}.{minor}",
        "--implementation",
        "cp",
        "--abi",
        f"cp{major}{minor}",
    ]
    for platform in info.platforms:
        args += ["--platform", platform]
    return args


def _wheels(info: _BaseInfo, requirement: str, *, refresh: bool) -> list[Path]:
    """The wheel files, one per distribution, that install ``requirement`` on the base."""
    cache = wheel_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    if not refresh:
        cached = _resolve_offline(cache, info, requirement)
        if cached is not None:
            LOG.info("using %d cached wheels from %s", len(cached), cache)
            return cached
    LOG.info("downloading wheels for %s into %s", requirement, cache)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        *_pip_target(info),
        "--dest",
        str(cache),
        requirement,
    ]
    code, tail = _stream_command(command)
    if code != 0:
        raise ImageError(
            f"pip could not download wheels for {requirement} "
            f"(Python {info.python[0]}.{info.python[1]}, {info.machine}); it needs access to "
            f"the package index. Last lines:\n{tail}"
        )
    resolved = _resolve_offline(cache, info, requirement)
    if resolved is None:
        raise ImageError(
            f"pip downloaded wheels into {cache} but they do not resolve {requirement}"
        )
    return resolved


def _resolve_offline(cache: Path, info: _BaseInfo, requirement: str) -> list[Path] | None:
    """Ask pip which cached files install ``requirement``; ``None`` if the cache falls short."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--isolated",  # only our cache counts, whatever the user's pip config says
        "--disable-pip-version-check",
        "--quiet",
        "--dry-run",
        "--ignore-installed",
        "--no-index",
        "--find-links",
        str(cache),
        "--report",
        "-",
        # pip insists on --target with platform options, even for a dry run; nothing is written.
        "--target",
        str(cache / ".dry-run-target"),
        *_pip_target(info),
        requirement,
    ]
    result = subprocess.run(command, capture_output=True, check=False)
    if result.returncode != 0:
        if b"No module named pip" in result.stderr:
            raise ImageError(
                f"the host's Python ({sys.executable}) has no pip, which downloads the agent "
                "image's wheels: python -m ensurepip"
            )
        if b"no such option" in result.stderr:
            raise ImageError(_OLD_PIP)
        return None
    try:
        report = json.loads(result.stdout)
        urls = [item["download_info"]["url"] for item in report["install"]]
    except (ValueError, KeyError, TypeError):
        raise ImageError(_OLD_PIP) from None
    files = []
    for url in urls:
        parsed = urlparse(url)
        path = Path(unquote(parsed.path))
        if parsed.scheme != "file" or path.suffix != ".whl" or not path.is_file():
            return None
        files.append(path)
    return files


_OLD_PIP = (
    "could not read pip's installation report: the host needs pip 22.2 or newer "
    "(python -m pip install -U pip)"
)


def _stream_command(command: Sequence[str]) -> tuple[int, str]:
    """Run a command, logging each output line at DEBUG; return its code and tail."""
    tail: deque[str] = deque(maxlen=20)
    try:
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
    except OSError as exc:
        raise ImageError(f"could not run {command[0]}: {exc}") from exc
    with proc:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if line:
                tail.append(line)
                LOG.debug("%s", line)
    return proc.returncode, "\n".join(tail)


def _context(dockerfile: str, wheels: Sequence[Path]) -> Iterator[bytes]:
    """A build context as a tar stream, reading each wheel straight from the cache."""
    now = int(time.time())
    entries: list[tuple[str, bytes | Path]] = [("Dockerfile", dockerfile.encode())]
    entries += [(f"wheels/{wheel.name}", wheel) for wheel in wheels]
    for name, source in entries:
        info = tarfile.TarInfo(name)
        info.size = len(source) if isinstance(source, bytes) else source.stat().st_size
        info.mode = 0o644
        info.mtime = now
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        if isinstance(source, bytes):
            yield source
        else:
            with source.open("rb") as fh:
                while chunk := fh.read(1 << 20):
                    yield chunk
        if info.size % tarfile.BLOCKSIZE:
            yield tarfile.NUL * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
    yield tarfile.NUL * (2 * tarfile.BLOCKSIZE)  # end of archive


def _remove_install_stage(client: Any) -> None:
    """Drop the first stage (wheels and a venv copy, ~600 MB): the agent image does not use it.

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
