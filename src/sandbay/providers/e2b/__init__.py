"""E2B provider: each sandbox is an E2B micro-VM from a template, driven by the ``e2b`` SDK.

Lifecycle (create, connect, timeout, kill, list by metadata) goes through
``e2b.AsyncSandbox``; processes through envd's Connect-RPC process service (``Start``,
``SendInput``, ``CloseStdin``, ``SendSignal``, ``Connect``) with the SDK's own client; files
through processes run as the sandbox's user. Every exception of the SDK is turned into
sandbay's error tree by `map_e2b_error`.

Split by concern: `_errors` (error mapping), `_provider` (`E2BProvider`), `_sandbox`
(`E2BSandbox`), `_process` (`E2BProcess`). Only this package imports the ``e2b`` SDK, which
needs Python 3.11 or newer.
"""

from __future__ import annotations

import sys

from ..._errors import MissingDependencyError

if sys.version_info < (3, 11):  # pragma: no cover - exercised on 3.10 only
    raise MissingDependencyError(
        "the e2b provider needs Python 3.11 or newer (the e2b SDK it is verified with, "
        "2.63+, does); run sandbay on Python 3.11+",
        provider="e2b",
    )

from ._errors import map_e2b_error
from ._provider import E2BProvider, agent_template
from ._sandbox import E2BSandbox

__all__ = ["E2BProvider", "E2BSandbox", "agent_template", "map_e2b_error"]
