"""The supervisor each command of an unisolated local sandbox runs under (Linux).

Run as ``python -S -I _supervisor.py STATUS_FD COMMAND...``: stdlib only, nothing imported
from sandbay, so it starts in a few milliseconds. It makes itself a child subreaper, forks the
command (which inherits stdin, stdout and stderr untouched) and lets go of those streams
itself, so end of file and broken pipes behave as if the command were started directly.

A process the command starts stays beneath the supervisor whatever it does to its session or
process group (``setsid``, ``nohup``, a double fork): when its parent exits, the kernel hands
it to the nearest subreaper above it, which is this process. So the tree under the
supervisor's pid is everything the command ever started that still runs, and killing that
tree (see ``_registry._kill_tree``) leaves nothing behind.

The command's exit code (``-N`` for signal N) is written to STATUS_FD as one line as soon as
the command exits; the supervisor itself stays, reaping adopted orphans, until none is left.
"""

import ctypes
import os
import sys

PR_SET_CHILD_SUBREAPER = 36


def main() -> None:
    status_fd = int(sys.argv[1])
    argv = sys.argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        os.write(2, b"sandbay: cannot become a child subreaper; descendants may escape\n")
    child = os.fork()
    if child == 0:
        _run(argv, status_fd)
    # The streams belong to the command: holding them would delay its end of file.
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break  # the command and every orphan it left have exited
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            try:
                os.write(status_fd, f"{code}\n".encode())
                os.close(status_fd)
            except OSError:
                pass  # the host went away; keep reaping until the tree is gone
    os._exit(0)


def _run(argv: list[str], status_fd: int) -> None:
    os.close(status_fd)
    # Python ignores these; an ignored signal stays ignored across exec. (_signal, loaded at
    # startup, rather than signal, whose import of enum would double the start-up time.)
    signals = sys.modules["_signal"]
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signals, name):
            signals.signal(getattr(signals, name), signals.SIG_DFL)
    try:
        _execvp(argv)
    except FileNotFoundError:
        os.write(2, f"sandbay: {argv[0]}: command not found\n".encode())
        os._exit(127)
    except PermissionError:
        os.write(2, f"sandbay: {argv[0]}: permission denied\n".encode())
        os._exit(126)
    except OSError as exc:
        os.write(2, f"sandbay: {argv[0]}: {exc.strerror or exc}\n".encode())
        os._exit(126)


def _execvp(argv: list[str]) -> None:
    # os.execvp, without the import of warnings it costs.
    name = argv[0]
    if "/" in name:
        os.execv(name, argv)
    error: OSError = FileNotFoundError(name)
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        try:
            os.execv(os.path.join(directory or ".", name), argv)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:
            error = exc  # as execvp: remember it, and look further along PATH
    raise error


if __name__ == "__main__":
    main()
