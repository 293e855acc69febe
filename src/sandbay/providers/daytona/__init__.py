"""The Daytona provider: sandboxes on Daytona through the ``daytona`` SDK's ``AsyncDaytona``.

`_client` makes SDK clients from sandbay's config alone; `_errors` maps the SDK's errors;
`_process` runs each process under `_shim` over a session command; `_sandbox` and
`_provider` implement the interface.
"""

from ._provider import DaytonaProvider
from ._sandbox import DaytonaSandbox

__all__ = ["DaytonaProvider", "DaytonaSandbox"]
