"""The process between mlaprop and the server: it owns the server's whole process tree and kills it when
mlaprop goes, however mlaprop goes (SIGKILL included).

Run by :mod:`mlaprop.server` as ``python -I -S watchdog.py FD GRACE -- COMMAND...`` (standard library only,
so it starts in a few tens of milliseconds and needs nothing from the environment). It

1. makes itself the *child subreaper* of what it starts (Linux ``prctl(PR_SET_CHILD_SUBREAPER)``, since
   3.4): a descendant whose parent exits is re-parented to the watchdog, not to PID 1, whatever session,
   process group or environment it has. So the watchdog's descendants are always exactly the server's tree;
2. starts ``COMMAND`` in a new session, with ``PR_SET_PDEATHSIG=SIGKILL`` (if the watchdog itself is killed,
   the kernel kills the server);
3. tells mlaprop, on the socket ``FD`` (one end of a ``socketpair``), ``pid N`` once started and
   ``exit RC`` when the server exits (``RC`` as :attr:`subprocess.Popen.returncode`: negative for a signal);
4. reaps every zombie re-parented to it;
5. when the socket reaches end of file, which the kernel delivers when mlaprop's last descriptor of it
   closes (mlaprop exited, crashed or was killed by any signal), or on SIGTERM / SIGHUP / SIGINT: SIGTERM to
   every descendant, up to ``GRACE`` seconds, SIGKILL to what is left, then it exits once none is left.

mlaprop normally tears the tree down itself first (:meth:`mlaprop.server.Server.stop`) and then closes the
socket, so the watchdog finds nothing left to kill. A parent-death signal alone would not do: it reaches
only the direct child, and it fires when the *thread* that started the child ends, not the process.
Without ``PR_SET_CHILD_SUBREAPER`` (not Linux) the watchdog still kills the server's process group and
the descendants it can still walk to on mlaprop's death.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    """``prctl(option, value)``; ``False`` where it is not available (not Linux) or refused."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, value, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def set_child_subreaper() -> bool:
    """Make this process the child subreaper of its descendants. Returns whether that worked."""
    return _prctl(PR_SET_CHILD_SUBREAPER, 1)


def _die_with_parent() -> None:  # runs in the forked child, before exec
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def descendants(root: int) -> list[int]:
    """Pids of every live descendant of ``root``, read from ``/proc`` (empty where there is none)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields and fields[0] == b"Z":
            continue  # a zombie holds nothing; it is reaped below
        children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    todo = [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            out.append(pid)
            todo.append(pid)
    return out


class _Guard:
    def __init__(self, sock: socket.socket, grace: float) -> None:
        self.sock = sock
        self.grace = grace
        self.server: subprocess.Popen[bytes] | None = None
        self.stop_signal: int | None = None

    def send(self, line: str) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(line.encode() + b"\n")

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.server is not None and pid == self.server.pid:
                rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                self.server.returncode = rc
                self.send(f"exit {rc}")

    def kill_tree(self) -> None:
        me = os.getpid()
        for sig, wait in ((signal.SIGTERM, self.grace), (signal.SIGKILL, 5.0)):
            if self.server is not None:
                with contextlib.suppress(OSError):
                    os.killpg(self.server.pid, sig)
            deadline = time.monotonic() + wait
            signalled: set[int] = set()
            while True:
                self.reap()
                alive = descendants(me)
                if not alive:
                    return
                for pid in alive:
                    if pid not in signalled or sig == signal.SIGKILL:
                        with contextlib.suppress(OSError):
                            os.kill(pid, sig)
                        signalled.add(pid)
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.02)

    def run(self, argv: list[str]) -> int:
        try:
            self.server = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # safe: this process has one thread
            )
        except OSError as exc:
            self.send(f"error {exc}")
            return 127
        self.send(f"pid {self.server.pid}")
        while True:
            ready, _, _ = select.select([self.sock], [], [], 0.05)
            self.reap()
            if self.stop_signal is not None:
                break
            if ready:
                try:
                    data = self.sock.recv(4096)
                except OSError:
                    data = b""
                if not data:  # mlaprop is gone (or done): nothing of its server may outlive it
                    break
        self.kill_tree()
        self.reap()
        return 0


def main(args: list[str]) -> int:
    """Entry point: ``FD GRACE -- COMMAND...``; returns the exit status (0, 2 usage, 127 no command)."""
    if len(args) < 4 or args[2] != "--":
        print("usage: watchdog.py FD GRACE -- COMMAND...", file=sys.stderr)
        return 2
    sock = socket.socket(fileno=int(args[0]))
    guard = _Guard(sock, float(args[1]))

    def stop(signum: int, frame: object) -> None:
        guard.stop_signal = signum

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, stop)
    if not set_child_subreaper():
        print(
            "mlaprop watchdog: PR_SET_CHILD_SUBREAPER unavailable; re-parented processes may escape",
            file=sys.stderr,
        )
    return guard.run(args[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
