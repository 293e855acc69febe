"""The local provider: processes on this machine, each sandbox a private directory.

It needs nothing installed, which makes it the default and the fastest to start. Without
``isolate`` it is a convenience, not a security boundary; see `LocalProvider`.

Layout on the host::

    <root>/sandbay-<id>/          mode 0700, removed on close
        work/                     the working directory (bound at spec.workdir under bwrap)
        tmp/                      TMPDIR (bound at /tmp under bwrap)
    <registry>/<id>.json          labels, paths and process groups, so that `list`, `gc` and
                                  `destroy` work from other processes

The registry is ``$XDG_RUNTIME_DIR/sandbay-local`` when that is set, else
``<temp dir>/sandbay-local-<uid>``.

The code is split by concern: `_provider` (`LocalProvider`), `_sandbox` (`LocalSandbox`),
`_process` (host processes), `_supervisor` (the subreaper each unisolated command runs
under), `_files` (file operations, resolved as the sandbox sees its paths), `_bwrap`
(isolation and spec checks) and `_registry` (the registry, sandbox folders and recorded
processes).
"""

from __future__ import annotations

from ._provider import LocalProvider
from ._sandbox import LocalSandbox

__all__ = ["LocalProvider", "LocalSandbox"]
