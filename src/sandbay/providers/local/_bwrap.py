"""Isolation with bubblewrap, and what a spec may ask of the local provider.

The system directories and /etc files a process under bwrap sees, finding bwrap, the
directories the agent's Python needs, and the checks that reject a spec this provider
cannot honour.
"""

from __future__ import annotations

import os
import posixpath
import pwd
import shutil
import sys

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
    """The directories the agent's Python needs, to bind read-only under bwrap."""
    candidates = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    found = shutil.which(python)
    if found:
        for exe in (found, os.path.realpath(found)):
            candidates.add(os.path.dirname(os.path.dirname(os.path.abspath(exe))))
    covered = ("/usr", "/bin", "/lib", "/etc")
    dirs = sorted(
        os.path.abspath(d)
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
    return kept
