"""The watcher of one rank: says so when the rank is killed by a signal it could not report itself.

``job.watch_rank`` forks each rank of a multi-rank job; the child runs the rank, and the parent,
which the launcher knows as the rank, becomes this script (``python -S -E watch.py PID FD LABEL``:
standard library only, a few MB). It passes SIGINT and SIGTERM on to the child, waits for it and
exits as it did, or dies of the same signal. When the child dies of a signal without having reported its own failure on ``FD``
(SIGKILL from the kernel's out-of-memory killer, SIGSEGV or SIGILL in native code), it prints
``LABEL: killed by SIGNAL (why)`` first, where the launcher would only say that a process ended.
"""

from __future__ import annotations

import os
import resource
import signal
import sys

WHY = {
    signal.SIGKILL: "sent by the kernel's out-of-memory killer when memory runs out, or by kill -9; "
    "dmesg on that host tells which",
    signal.SIGSEGV: "a crash in native code",
    signal.SIGBUS: "a crash in native code, or a memory-mapped file that shrank",
    signal.SIGILL: "an instruction this CPU does not have: a library built for another CPU",
    signal.SIGFPE: "a crash in native code",
}


def message(label: str, status: int) -> str | None:
    """What to print for a child that ended with wait ``status``; None when it exited by itself."""
    code = os.waitstatus_to_exitcode(status)
    if code >= 0:
        return None
    sig = signal.Signals(-code)
    why = WHY.get(sig)
    return f"{label}: killed by {sig.name}" + (f" ({why})" if why else "")


def watch(child: int, reported_fd: int, label: str) -> int:
    """Wait for ``child``, passing signals on; returns its exit code, or dies of its signal."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: os.kill(child, signum))
    _, status = os.waitpid(child, 0)  # retried after each signal handler (PEP 475)
    for sig in (signal.SIGINT, signal.SIGTERM):  # the child's pid is free again: never signal it now
        signal.signal(sig, signal.SIG_IGN)
    os.set_blocking(reported_fd, False)
    try:
        reported = os.read(reported_fd, 1) != b""  # the child wrote a byte once it had printed why it failed
    except BlockingIOError:  # a process the child forked still holds the pipe: nothing written
        reported = False
    text = None if reported else message(label, status)
    if text:
        print(text, file=sys.stderr, flush=True)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # end as the child did, so that the launcher sees that death and ends the job
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # but leave no core file of this watcher
        if -code != signal.SIGKILL:  # whose action cannot be changed
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(watch(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]))
