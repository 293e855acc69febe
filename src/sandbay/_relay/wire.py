"""The wire between sandbay's relay (in the sandbox) and `SandboxTransport` (on the host).

Standard library only, Python 3.10+: the relay imports this module beside it in the sandbox,
the host imports it from the package, so both sides speak the same version.

Host → relay, on the relay's stdin: first one ``start`` line (JSON)::

    {"sandbay": 2, "kind": "start", "argv": [...], "env": {...}, "cwd": "...", "find_cli": true}

then the CLI's own stdin lines, passed on unchanged, in order; `END_INPUT_LINE` (or end of
file) ends the CLI's input, for providers that cannot send end of file.

Relay → host, on its stdout, one envelope per line::

    {"sandbay": 2, "seq": 7, "kind": "line", "data": {...one stream-json line of the CLI...}}

Kinds: ``ready`` (seq 0; data: pid, cli_pid, cli), ``line`` (one CLI stdout line, logged),
``stderr`` (seq 0; data: line, one CLI stderr line, cut to `MAX_STDERR_LINE`), ``end``
(logged; data: exit_code of the CLI) and ``error`` (logged; data: type, message,
exit_code, stderr; the relay could not run the CLI). ``end`` and ``error`` close a run.
Logged envelopes carry consecutive sequence numbers from 1 and are appended to the run's
log (`LOG_NAME`) before they are written to stdout, so ``replay`` can repeat any of them.
"""

from __future__ import annotations

#: Version of this wire; the host refuses any other (the old entrypoint spoke 1).
VERSION = 2
#: Envelope kinds the relay sends.
KINDS = frozenset({"ready", "line", "stderr", "end", "error"})
#: Kinds that are logged with a sequence number (the others carry seq 0).
LOGGED_KINDS = frozenset({"line", "end", "error"})
#: Kinds after which nothing follows.
FINAL_KINDS = frozenset({"end", "error"})
#: Longest CLI stdout line the relay forwards, in bytes (the SDK's own default bound is 1 MiB;
#: messages with images run to a few MiB).
MAX_LINE = 32 * 1024 * 1024
#: Longest CLI stderr line forwarded as one ``stderr`` envelope; the rest is cut.
MAX_STDERR_LINE = 8 * 1024
#: The run's envelope log in its run directory.
LOG_NAME = "lines.jsonl"
#: The relay's pid, for ``replay`` to tell a live run from a dead one.
PID_NAME = "relay.pid"
#: A line on the relay's stdin that ends the CLI's input, as end of file would.
END_INPUT_LINE = f'{{"sandbay":{VERSION},"kind":"end_input"}}'
