"""The agent image: a base image plus a venv holding claude-agent-sdk, built without network.

The build runs in three steps, none of which needs a registry or network inside Docker:

1. The base image is run once to learn its Python version, C library and CPU.
2. The HOST's pip fetches wheels for exactly that interpreter and platform into a cache
   (``~/.cache/sandbay/wheels``; ``$XDG_CACHE_HOME`` is honoured). A cache that already holds
   a complete set is used without asking the index.
3. ``docker build`` receives a build context streamed straight from the cache (the 166 MB
   claude-agent-sdk wheel is read once, never copied to a temporary file), installs the
   wheels with ``pip install --no-index`` in a first stage, and copies only the finished venv
   into the final image, so the wheels do not stay in a layer.

The image is tagged ``sandbay-agent:<hash of inputs>`` (the Dockerfile, the base image's id,
the wheel files) and ``sandbay-agent:latest``. Its labels record a recipe key (Dockerfile,
base name, claude-agent-sdk version) so `ensure_agent_image` finds a fitting image with one
API call and builds only when none exists.

What the image holds:

- ``/opt/sandbay/venv`` with claude-agent-sdk pinned to the host's version (the host parses the
  messages, so both ends agree on them), first on ``PATH``: ``python3`` is the venv's, and
  ``claude`` is the CLI bundled in the wheel;
- a user ``sandbay`` (uid/gid 1000, home ``/home/sandbay``) it runs as by default, and
  ``/workspace`` owned by it;
- ``IS_SANDBOX=1``.
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
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import anyio

from ._errors import ImageError

if TYPE_CHECKING:
    from ._config import DockerConfig

__all__ = [
    "AGENT_IMAGE",
    "AGENT_REPOSITORY",
    "DEFAULT_BASE_IMAGE",
    "build_agent_image",
    "build_agent_image_cli",
    "ensure_agent_image",
    "wheel_cache_dir",
]

AGENT_REPOSITORY = "sandbay-agent"
AGENT_IMAGE = f"{AGENT_REPOSITORY}:latest"
DEFAULT_BASE_IMAGE = "sandbay-base:bookworm"
VENV = "/opt/sandbay/venv"
WORKSPACE = "/workspace"

LABEL_KEY = "sandbay.agent.key"
LABEL_BASE = "sandbay.agent.base"
LABEL_BASE_ID = "sandbay.agent.base-id"
LABEL_SDK = "sandbay.agent.sdk"
LABEL_STAGE = "sandbay.agent.stage"

SDK_DISTRIBUTION = "claude-agent-sdk"
MIN_PYTHON = (3, 10)

Progress = Callable[[str], None]

_ENSURE_LOCK = threading.Lock()

# Bump when the recipe changes in a way the Dockerfile text does not show.
_RECIPE_VERSION = "1"

_DOCKERFILE = """\
# sandbay agent image (recipe {recipe_version}); built by `sandbay image build`.
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
RUN (getent group 1000 >/dev/null || groupadd --gid 1000 sandbay) \\
 && (getent passwd 1000 >/dev/null \\
      || useradd --uid 1000 --gid 1000 --create-home --home-dir /home/sandbay \\
           --shell /bin/bash sandbay) \\
 && mkdir -p {workspace} && chown 1000:1000 {workspace}
COPY --from=install {venv} {venv}
ENV PATH={venv}/bin:${{PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}} \\
    VIRTUAL_ENV={venv} \\
    IS_SANDBOX=1 \\
    SHELL=/bin/bash \\
    LANG=C.UTF-8
USER 1000:1000
WORKDIR {workspace}
CMD ["/bin/sh"]
"""

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


def sdk_version() -> str:
    """The claude-agent-sdk version installed on the host; the image gets the same."""
    try:
        return metadata.version(SDK_DISTRIBUTION)
    except metadata.PackageNotFoundError:  # pragma: no cover - it is a dependency of sandbay
        raise ImageError(
            f"{SDK_DISTRIBUTION} is not installed on the host: pip install {SDK_DISTRIBUTION}"
        ) from None


def build_agent_image(
    config: DockerConfig | None = None,
    *,
    base: str | None = None,
    progress: Progress | None = None,
    refresh: bool = False,
) -> str:
    """Build the agent image (or find it built) and return its tag. Blocking.

    This is ``sandbay image build [--base IMAGE]``. Building is skipped when an image with
    the same inputs exists; ``sandbay-agent:latest`` then points at it.

    Args:
        config: Which engine (``base_url``) and default base image; default `DockerConfig()`.
        base: Base image to build on; default ``config.base_image``.
        progress: Called with each line of progress (pip's and Docker's output).
        refresh: Ask the package index for the newest dependencies even when the wheel cache
            already holds a complete set.

    Returns:
        The tag ``sandbay-agent:<hash>``.

    Raises:
        ImageError: The base image is missing or unsuitable, wheels could not be fetched, or
            the build failed; the message says which and what to do.
        ProviderUnavailableError: The Docker daemon cannot be reached.
    """
    from ._config import DockerConfig
    from .providers.docker import docker_client, docker_errors

    config = config or DockerConfig()
    with docker_errors(base_url=config.base_url):
        client = docker_client(config)
        try:
            return _build(
                client, base=base or config.base_image, progress=progress, refresh=refresh
            )
        finally:
            client.close()


async def build_agent_image_cli(
    *, base: str | None = None, config_file: str | None = None, refresh: bool = False
) -> int:
    """``sandbay image build``: build with progress on stderr, print the tag on stdout.

    The engine and the default base come from the config file's ``[provider]`` when it is a
    docker one. Errors are raised (`ImageError`, `ProviderUnavailableError`) for the CLI to
    report.
    """
    from functools import partial

    from ._config import DockerConfig, load_config

    provider = load_config(config_file).provider
    config = provider if isinstance(provider, DockerConfig) else DockerConfig()

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    build = partial(build_agent_image, config, base=base, progress=say, refresh=refresh)
    tag = await anyio.to_thread.run_sync(build)
    print(tag)
    return 0


async def ensure_agent_image(
    client_factory: Callable[[], Any],
    *,
    base: str = DEFAULT_BASE_IMAGE,
    progress: Progress | None = None,
) -> str:
    """Return an agent image fitting ``base`` and the host's SDK, building it if none exists.

    Finding an existing image costs two API calls; building takes a minute or two the first
    time. ``progress`` is called from a worker thread.

    Args:
        client_factory: Returns a ``docker.DockerClient`` (blocking; called in a worker thread).
        base: Base image to build on when needed.
        progress: Called with each line of build progress.

    Returns:
        An image reference (``sandbay-agent:<hash>``, or the image id if it has no such tag).

    Raises:
        ImageError: No fitting image exists and building one failed.
        ProviderUnavailableError: The Docker daemon cannot be reached.
    """
    from .providers.docker import docker_errors

    def ensure() -> str:
        with docker_errors(), _ENSURE_LOCK:  # concurrent first uses build once
            client = client_factory()
            found = _find(client, base=base)
            if found is not None:
                return found
            return _build(client, base=base, progress=progress, refresh=False)

    return await anyio.to_thread.run_sync(ensure)


# --- internals ---------------------------------------------------------------------------


def _say(progress: Progress | None, line: str) -> None:
    if progress is not None:
        progress(line)


def _dockerfile(base: str, requirement: str) -> str:
    return _DOCKERFILE.format(
        recipe_version=_RECIPE_VERSION,
        stage_label=LABEL_STAGE,
        base=base,
        venv=VENV,
        workspace=WORKSPACE,
        requirement=requirement,
    )


def _recipe_key(base: str, version: str) -> str:
    """What an existing image must match to be reused, known without asking pip."""
    text = _dockerfile(base, f"{SDK_DISTRIBUTION}=={version}")
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _image_id(client: Any, base: str) -> str | None:
    import docker.errors

    try:
        return str(client.api.inspect_image(base)["Id"])
    except docker.errors.NotFound:
        return None


def _find(client: Any, *, base: str) -> str | None:
    """An existing agent image for this base and SDK version, or ``None``."""
    key = _recipe_key(base, sdk_version())
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


def _build(client: Any, *, base: str, progress: Progress | None, refresh: bool) -> str:
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
    _say(progress, f"probing base image {base}")
    info = _probe(client, base, base_id)
    version = sdk_version()
    requirement = f"{SDK_DISTRIBUTION}=={version}"
    wheels = _wheels(info, requirement, progress=progress, refresh=refresh)
    dockerfile = _dockerfile(base, requirement)

    digest = hashlib.sha256()
    for part in (dockerfile, base_id, *sorted(w.name for w in wheels)):
        digest.update(part.encode())
        digest.update(b"\0")
    tag = f"{AGENT_REPOSITORY}:{digest.hexdigest()[:12]}"

    if _image_id(client, tag) is None:
        _say(progress, f"building {tag} on {base} (Python {info.python[0]}.{info.python[1]})")
        labels = {
            LABEL_KEY: _recipe_key(base, version),
            LABEL_BASE: base,
            LABEL_BASE_ID: base_id,
            LABEL_SDK: version,
        }
        try:
            _docker_build(
                client, tag, _context(dockerfile, wheels), labels=labels, progress=progress
            )
        finally:
            _remove_install_stage(client)
    else:
        _say(progress, f"{tag} is already built")
    client.api.tag(tag, AGENT_REPOSITORY, "latest")
    _say(progress, f"tagged {tag} as {AGENT_IMAGE}")
    return tag


def _probe(client: Any, base: str, base_id: str) -> _BaseInfo:
    import docker.errors

    advice = "use a base with Python 3.10+ and its venv module (Debian: python3 python3-venv)"
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
    if python < MIN_PYTHON:
        problems.append(f"its Python is {python[0]}.{python[1]}, older than 3.10")
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


def _wheels(
    info: _BaseInfo, requirement: str, *, progress: Progress | None, refresh: bool
) -> list[Path]:
    """The wheel files, one per distribution, that install ``requirement`` on the base."""
    cache = wheel_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    if not refresh:
        cached = _resolve_offline(cache, info, requirement)
        if cached is not None:
            _say(progress, f"using {len(cached)} cached wheels from {cache}")
            return cached
    _say(progress, f"downloading wheels for {requirement} into {cache}")
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
    code, tail = _stream_command(command, progress)
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


def _stream_command(command: Sequence[str], progress: Progress | None) -> tuple[int, str]:
    """Run a command, passing each output line to ``progress``; return its code and tail."""
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
                _say(progress, line)
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
    progress: Progress | None,
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
                    _say(progress, line)
        if "aux" in event and isinstance(event["aux"], dict) and "ID" in event["aux"]:
            built = True
    if not built:
        raise ImageError(
            f"building {tag} ended without an image\n--- last lines of the build ---\n"
            + "\n".join(tail)
        )
