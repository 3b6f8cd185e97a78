"""The rank watcher's message for each way a rank can end (a wait status is ``code << 8`` for an
exit, the signal number for a death by signal)."""

from __future__ import annotations

import signal

import pytest

from mdi_mpi.watch import message


@pytest.mark.parametrize(
    "status, text",
    [
        (0, None),  # exited by itself: it said why, if anything went wrong
        (1 << 8, None),
        (143 << 8, None),
        (int(signal.SIGKILL), "rank 2 on pi3: killed by SIGKILL (sent by the kernel's out-of-memory killer when memory "
                              "runs out, or by kill -9; dmesg on that host tells which)"),
        (int(signal.SIGSEGV), "rank 2 on pi3: killed by SIGSEGV (a crash in native code)"),
        (int(signal.SIGILL), "rank 2 on pi3: killed by SIGILL (an instruction this CPU does not have: a library built "
                             "for another CPU)"),
        (int(signal.SIGHUP), "rank 2 on pi3: killed by SIGHUP"),
    ],
)
def test_message(status, text):
    assert message("rank 2 on pi3", status) == text
