"""Modal provider: each sandbox is a Modal Sandbox, driven by the ``modal`` SDK's ``.aio`` API.

A sandbox's main process is sandbay's lease, run as root: it exits once the expiry in a
root-owned file (`LEASE_FILE`, rewritten by `Sandbox.extend`) has passed, and Modal then ends
the sandbox; Modal's own ``timeout`` is the backstop. Processes are Modal execs through a
launcher that drops to the sandbox's user; their output streams through Modal's task command
router, read on demand. Files move as execs of ``cat`` and a small shell script, as the
sandbox's user. Labels are Modal tags, so `ModalProvider.list` and ``gc`` find sandboxes
by them.

Sandboxes run as root on Modal: the agent image sets ``IS_SANDBOX=1`` (the ``claude`` CLI
then accepts bypassing permissions as root), and sandbay's processes run as the image's
non-root user unless told otherwise.

Every exception of the SDK is turned into sandbay's error tree by `map_modal_error`. Only
this package imports ``modal``.
"""

from __future__ import annotations

from ._errors import map_modal_error, modal_errors, open_client
from ._provider import ModalProvider, render_image
from ._sandbox import LEASE_FILE, ModalSandbox

__all__ = [
    "LEASE_FILE",
    "ModalProvider",
    "ModalSandbox",
    "map_modal_error",
    "modal_errors",
    "open_client",
    "render_image",
]
