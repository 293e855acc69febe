"""Shell steps the providers without a file API of their own share: how a file is written
as the sandbox's user, and what a failed ``cat``, ``mkdir`` or redirection means."""

from __future__ import annotations

from ._errors import (
    SandboxError,
    SandboxFileNotFoundError,
    SandboxIsADirectoryError,
    SandboxNotADirectoryError,
    SandboxPermissionError,
)

__all__ = ["FILE_ERRORS", "WRITE_SCRIPT"]

# write_file, as the sandbox's user: $1 the path, $2 the octal mode, the data on stdin.
# A regular file is replaced whole (a new file renamed over it), so a process starting the
# old one never reads half of the new; where the user may not create files next to it (or
# the path is a link) it is written in place, as `cat > path` would, links followed.
WRITE_SCRIPT = """
p=$1; m=$2; d=${p%/*}; d=${d:-/}
if [ -d "$p" ]; then echo "$p: Is a directory" >&2; exit 1; fi
[ -d "$d" ] || mkdir -p -- "$d" || exit 1
if [ ! -L "$p" ] && t=$(mktemp "$d/.sandbay-write.XXXXXX" 2>/dev/null); then
  if cat >"$t" && chmod "$m" "$t" && mv -f -- "$t" "$p"; then exit 0; fi
  rm -f -- "$t"; exit 1
fi
if [ -e "$p" ]; then exec cat >"$p"; fi
cat >"$p" && chmod "$m" "$p"
"""

# What a failed cat, mkdir or sh redirection ends its message with (``prog: path: reason``,
# in the C locale), as sandbay's typed errors. Only the end is compared: a path may hold
# any of these words.
FILE_ERRORS: dict[str, tuple[type[SandboxError], str]] = {
    "permission denied": (SandboxPermissionError, "the sandbox's user has no right to it"),
    "operation not permitted": (SandboxPermissionError, "the sandbox's user has no right to it"),
    "read-only file system": (SandboxPermissionError, "it is on a read-only file system"),
    "is a directory": (SandboxIsADirectoryError, "it is a directory"),
    "not a directory": (SandboxNotADirectoryError, "a parent in the path is not a directory"),
    "no such file or directory": (SandboxFileNotFoundError, "no such file in the sandbox"),
    # mkdir -p meeting a file where a parent directory should be
    "file exists": (SandboxNotADirectoryError, "a parent in the path is not a directory"),
}
