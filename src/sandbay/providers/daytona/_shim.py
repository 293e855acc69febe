"""The shim each process of a Daytona sandbox runs under: stdlib only, run with ``python3 -c``.

A Daytona session command takes input as text, never ends its stdin, and reports its output
as text with stdout and stderr told apart by a prefix. The shim turns that into a process
with a real stdin, binary output and an exit code, in lines of ASCII only:

- input, one record a line: ``s <b64 json>`` first (argv, env, cwd, user), then
  ``d <b64>`` (bytes for the command's stdin), ``e`` (end of file: the shim closes the
  command's stdin; the command never sees this line), ``k`` (kill the command and all it
  started);
- output, numbered so a host that lost the stream and reads it again from the start skips
  what it had: ``<n> o <b64>`` (stdout), ``<n> e <b64>`` (stderr), ``<n> x <code>`` (the exit
  code, ``-N`` for signal N; the last record).

It makes itself a child subreaper, so whatever the command starts (``setsid``, double fork,
daemons) stays beneath it, and ``k`` (or the host going away) kills that whole tree.
"""

import base64
import ctypes
import json
import os
import sys
import threading
from typing import Any, BinaryIO

PR_SET_CHILD_SUBREAPER = 36
CHUNK = 48 * 1024


class Out:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seq = 0

    def emit(self, kind: bytes, payload: bytes) -> None:
        with self.lock:
            self.seq += 1
            data = b"%d %s %s\n" % (self.seq, kind, payload)
            while data:
                data = data[os.write(1, data) :]


def descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] != b"Z":
            parents.setdefault(int(fields[1]), []).append(int(name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree() -> None:
    me = os.getpid()
    for _ in range(200):
        pids = descendants(me)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, 9)
            except OSError:
                pass


def run_child(spec: dict[str, Any], fds: tuple[int, int, int]) -> None:
    in_r, out_w, err_w = fds
    os.dup2(in_r, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    os.setsid()
    signals = sys.modules["_signal"]
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signals, name):
            signals.signal(getattr(signals, name), signals.SIG_DFL)
    argv = spec["argv"]
    user = spec.get("user")
    try:
        if user:
            become(user)
        os.chdir(spec["cwd"])
    except OSError as exc:
        os.write(2, f"sandbay: cannot start in {spec['cwd']!r}: {exc}\n".encode())
        os._exit(1)
    except LookupError as exc:
        os.write(2, f"sandbay: {exc}\n".encode())
        os._exit(126)
    env = dict(os.environ)
    env.update(spec["env"])
    try:
        os.execvpe(argv[0], argv, env)
    except FileNotFoundError:
        os.write(2, f"sandbay: {argv[0]}: command not found\n".encode())
        os._exit(127)
    except OSError as exc:
        os.write(2, f"sandbay: {argv[0]}: {exc.strerror or exc}\n".encode())
        os._exit(126)


def become(user: str) -> None:
    import pwd

    name, _, group = user.partition(":")
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        if not name.isdigit():
            raise LookupError(f"no such user: {name!r}") from None
        uid, gid, entry = int(name), int(name), None
    if group:
        gid = int(group)
    if (uid, gid) == (os.getuid(), os.getgid()):
        return
    if os.getuid() != 0:
        raise LookupError(f"cannot run as {user!r}: the sandbox's user is not root")
    if entry is not None:
        os.initgroups(entry.pw_name, gid)
    else:
        os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def pump(fd: int, kind: bytes, out: Out) -> None:
    while True:
        try:
            data = os.read(fd, CHUNK)
        except OSError:
            data = b""
        if not data:
            os.close(fd)
            return
        out.emit(kind, base64.b64encode(data))


def feed(stdin: BinaryIO, in_w: int) -> None:
    writable = True
    for line in stdin:
        op = line[:1]
        if op == b"d" and writable:
            data = base64.b64decode(line[2:])
            try:
                while data:
                    data = data[os.write(in_w, data) :]
            except OSError:
                writable = False
        elif op == b"e" and writable:
            os.close(in_w)
            writable = False
        elif op == b"k":
            kill_tree()
    kill_tree()  # the host went away: nothing may outlive it


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    stdin = sys.stdin.buffer
    first = stdin.readline()
    spec = json.loads(base64.b64decode(first[2:]))
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    child = os.fork()
    if child == 0:
        for fd in (in_w, out_r, err_r):
            os.close(fd)
        run_child(spec, (in_r, out_w, err_w))
    for fd in (in_r, out_w, err_w):
        os.close(fd)
    out = Out()
    readers = [
        threading.Thread(target=pump, args=(out_r, b"o", out), daemon=True),
        threading.Thread(target=pump, args=(err_r, b"e", out), daemon=True),
    ]
    for thread in readers:
        thread.start()
    threading.Thread(target=feed, args=(stdin, in_w), daemon=True).start()
    code = None
    while code is None:
        pid, status = os.waitpid(-1, 0)
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
    for thread in readers:
        thread.join()
    out.emit(b"x", str(code).encode())
    os._exit(0)


if __name__ == "__main__":
    main()
