"""Isolation with bubblewrap, and what a spec may ask of the local provider.

The system directories and /etc files a process under bwrap sees, finding bwrap, the
directories the agent's Python needs, and the checks that reject a spec this provider
cannot honour.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import pwd
import shutil
import subprocess
import sys
import sysconfig

from ..._errors import ConfigError
from ..._sandbox import SandboxSpec
from ._registry import NAME

_BWRAP_HELP = (
    "install bubblewrap (apt-get install bubblewrap, dnf install bubblewrap) "
    "or set isolate = false in the local provider's config"
)
# Directories a process under bwrap sees read-only, when they exist on the host. Symlinks
# (merged /usr) are recreated as symlinks.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Only the parts of /etc that programs need to run: not shadow files, not host secrets.
_ETC_FILES = (
    "alternatives", "ca-certificates", "ca-certificates.conf", "debian_version", "group",
    "host.conf", "hosts", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "locale.alias",
    "localtime", "mime.types", "nsswitch.conf", "os-release", "passwd", "pki", "protocols",
    "resolv.conf", "services", "ssl", "timezone",
)  # fmt: skip


def _check_spec(spec: SandboxSpec, *, isolate: bool) -> None:
    if spec.image is not None:
        raise ConfigError(
            f"spec.image = {spec.image!r}: the local provider runs on this machine and has no "
            "images; unset it or use the docker provider",
            provider=NAME,
        )
    for field, value in (("cpu", spec.cpu), ("memory_mb", spec.memory_mb)):
        if value is not None:
            raise ConfigError(
                f"spec.{field} = {value!r}: the local provider cannot limit cpu or memory; "
                f"unset spec.{field} (also in the [spec] section of sandbay.toml) or use the "
                "docker provider, which enforces it",
                provider=NAME,
            )
    if spec.network == "none" and not isolate:
        raise ConfigError(
            'spec.network = "none" needs isolation, which needs bubblewrap: install it '
            "(apt-get install bubblewrap) and leave isolate unset or true in the local "
            "provider's config, or use the docker provider",
            provider=NAME,
        )
    if not _is_current_user(spec.user):
        raise ConfigError(
            f"spec.user = {spec.user!r}: the local provider runs processes as the current user "
            "only; unset it or use the docker provider",
            provider=NAME,
        )
    if isolate:
        workdir = posixpath.normpath(spec.workdir)
        reserved = ("/proc", "/dev", "/etc", *_SYSTEM_DIRS)
        if (
            not workdir.startswith("/")
            or workdir in ("/", "/tmp")
            or any(workdir == p or workdir.startswith(p + "/") for p in reserved)
        ):
            raise ConfigError(
                f"spec.workdir = {spec.workdir!r}: under isolation the workspace must be an "
                "absolute path outside the system directories, such as /workspace",
                provider=NAME,
            )


def _find_bwrap() -> str:
    found = shutil.which("bwrap")
    if found is None:
        raise ConfigError(
            f"isolate = true needs bubblewrap (bwrap), which is not on PATH: {_BWRAP_HELP}",
            provider=NAME,
        )
    return found


def _is_current_user(user: str | None) -> bool:
    if user is None:
        return True
    uid, gid = os.getuid(), os.getgid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = None
    return user in {name, str(uid), f"{uid}:{gid}", f"{name}:{gid}"}


def _python_dirs(python: str) -> list[str]:
    """What the agent's Python needs, to bind read-only under bwrap; never a home directory.

    Its installation trees (``sys.prefix`` and ``sys.base_prefix``, so a venv and the
    Python it was made from) and its executable. A tree that is a home directory (or holds
    one) is replaced by the library directories inside it.
    """
    found = shutil.which(python)
    exe = os.path.abspath(found) if found else None
    if exe is None or exe == os.path.abspath(sys.executable):
        prefixes = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
        libraries = _library_dirs()
    else:
        prefixes, libraries = _ask_python(exe)
    homes = _homes()
    candidates: set[str] = set()
    for tree in prefixes:
        tree = os.path.abspath(tree)
        if any(home == tree or home.startswith(tree.rstrip("/") + "/") for home in homes):
            candidates.update(d for d in libraries if d.startswith(tree.rstrip("/") + "/"))
        else:
            candidates.add(tree)
    covered = ("/usr", "/bin", "/lib", "/etc")
    dirs = sorted(
        d
        for d in candidates
        if os.path.isdir(d)
        and not any(d == c or d.startswith(c + "/") for c in covered)
        and d != "/"
    )
    # Parents first; drop directories already inside one kept.
    kept: list[str] = []
    for d in dirs:
        if not any(d.startswith(k + "/") for k in kept):
            kept.append(d)
    if exe is not None and not any(exe.startswith(k + "/") for k in (*kept, *covered)):
        # E.g. ~/bin/python3, a link into an installation kept above: bound as the file it
        # leads to, which finds its installation from its compiled-in prefix.
        kept.append(exe)
    return kept


def _library_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return [paths[name] for name in ("stdlib", "platstdlib", "purelib", "platlib")]


@functools.lru_cache(maxsize=16)
def _ask_python(exe: str) -> tuple[list[str], list[str]]:
    """The installation trees and library directories of another interpreter."""
    code = (
        "import json, sys, sysconfig; p = sysconfig.get_paths(); print(json.dumps(["
        "[sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix], "
        "[p[n] for n in ('stdlib', 'platstdlib', 'purelib', 'platlib')]]))"
    )
    try:
        done = subprocess.run([exe, "-I", "-c", code], capture_output=True, timeout=60, check=True)
        prefixes, libraries = json.loads(done.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise ConfigError(
            f"python = {exe!r} in the local provider's config could not be run to find its "
            f"installation ({exc}); point it at a Python interpreter",
            provider=NAME,
        ) from None
    return [str(p) for p in prefixes], [str(p) for p in libraries]


def _homes() -> set[str]:
    homes = {os.path.abspath(os.path.expanduser("~"))}
    with contextlib.suppress(KeyError):
        homes.add(os.path.abspath(pwd.getpwuid(os.getuid()).pw_dir))
    return homes
