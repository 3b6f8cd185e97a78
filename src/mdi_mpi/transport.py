"""The ring transport: the only module that imports mpi4py.

Each message is one preallocated byte buffer: a fixed header of int64s followed by the activation
payload in the model dtype (bf16 travels as 2 bytes per value). Per-token traffic uses ``Isend`` and
``Irecv`` on these buffers, nothing is pickled. Every rank keeps one posted receive per group that
can be in flight, so a message always finds a receive waiting and no send ever blocks the ring.

Header: ``[kind, group, n_segments, n_rows, then every rank's running stats, then (slot, start,
length, sampled, long) per segment]``. Each rank writes its own stats (microseconds spent per event kind,
then its peak RSS in KiB) into every message it sends and keeps the others' from every message it
receives, so rank 0 knows how every rank spends its time, at most one trip round the ring late, at no
extra message.
"""

from __future__ import annotations

import signal
import sys
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from mpi4py import MPI

from mdi_mpi.trace import EVENT_KINDS

RANK_STATS = len(EVENT_KINDS) + 1  # per rank: microseconds per event kind, then peak RSS in KiB

WORK, STOP, HEARTBEAT = 1, 2, 3
_FIXED = 4  # kind, group, n_segments, n_rows
_PER_SEG = 5  # slot, start, length, sampled, long (longrope's long factors)
TAG = 7
ABORT_GRACE_S = 1.0  # time for the launcher to forward a failing rank's last words before the abort
ABORT_DEADLINE_S = 5  # a rank whose abort has not ended it by then ends itself
MAX_NAP_S = 5e-4  # longest sleep between two checks of a pending request


def wait(req: MPI.Request, timeout_s: float | None = None) -> bool:
    """Complete ``req`` without holding a core: check it, then sleep in naps that grow from 10 us
    to ``MAX_NAP_S``. ``MPI_Wait`` would spin, taking a core from the ranks that compute whenever a
    node runs more ranks than it has cores, and heating a Pi that needs its thermal headroom; a
    message that arrives mid-nap waits at most 0.5 ms, well under a stage's time per token.

    Gives up after ``timeout_s`` seconds (None: never) and returns False: a frozen or unreachable
    node must end the job, not hang it until the scheduler's time limit."""
    nap = 1e-5
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not req.Test():
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(nap)
        nap = min(2 * nap, MAX_NAP_S)
    return True


@dataclass
class Message:
    """A received message; ``rows`` views the receive buffer and is valid until it is released."""

    kind: int
    group: int
    slots: list[int]
    starts: list[int]
    lengths: list[int]
    sampled_segs: list[int]  # indices of the segments whose last token rank 0 samples
    long: list[bool]  # per segment: rotated with longrope's long factors
    rows: torch.Tensor | None  # [n_rows, D]
    buffer: int  # which receive buffer holds it


class Ring:
    """Neighbour links of one rank in the ring 0 -> 1 -> ... -> N-1 -> 0."""

    def __init__(
        self,
        comm: MPI.Comm,
        n_buffers: int,
        max_segments: int,
        max_rows: int,
        dim: int,
        dtype: torch.dtype,
        timeout_s: float | None = None,
        hosts: list[str] | None = None,
    ):
        self.comm = comm
        self.timeout_s = timeout_s  # longest wait for a message or a send (None: no limit)
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.dest, self.src = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        self.hosts = hosts  # every rank's host, to name a neighbour that stops answering
        self.stats = np.zeros((self.size, RANK_STATS), dtype=np.int64)  # [rank, stat], as last reported
        self.header_len = _FIXED + self.stats.size + _PER_SEG * max_segments
        self.dim, self.dtype = dim, dtype
        self.row_bytes = dim * torch.empty((), dtype=dtype).element_size()
        nbytes = 8 * self.header_len + max_rows * self.row_bytes
        self.max_rows = max_rows
        self.recv_bufs = [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(n_buffers)]
        self.send_bufs = [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(n_buffers)]
        self.recv_views = [b.numpy() for b in self.recv_bufs]
        self.send_views = [b.numpy() for b in self.send_bufs]
        self.send_reqs: list[MPI.Request] = [MPI.REQUEST_NULL] * n_buffers
        self.pending: deque[tuple[int, MPI.Request]] = deque()  # posted receives, in matching order
        self.bytes_sent = 0
        for i in range(n_buffers):
            self._post(i)

    def _name(self, rank: int) -> str:
        return f"rank {rank}" + (f" on {self.hosts[rank]}" if self.hosts else "")

    @property
    def _seg_at(self) -> int:
        return _FIXED + self.stats.size

    def buffer_bytes(self) -> int:
        return sum(b.nbytes for b in self.recv_bufs + self.send_bufs)

    def _post(self, i: int) -> None:
        self.pending.append((i, self.comm.Irecv([self.recv_views[i], MPI.BYTE], source=self.src, tag=TAG)))

    def send(
        self,
        group: int,
        slots: tuple[int, ...],
        starts: tuple[int, ...],
        lengths: tuple[int, ...],
        sampled_segs: list[int],
        rows: torch.Tensor | None,
        kind: int = WORK,
        long: tuple[bool, ...] = (),
    ) -> None:
        """Send a message to the next rank from group ``group``'s send buffer (waiting for that
        buffer's previous send first). ``rows`` [n_rows, D] is copied into the buffer."""
        buf = group
        self._wait_send(buf)
        view = self.send_views[buf]
        header = view[: 8 * self.header_len].view(np.int64)
        n_rows = 0 if rows is None else rows.shape[0]
        if n_rows > self.max_rows:
            raise RuntimeError(f"message of {n_rows} rows exceeds the buffer ({self.max_rows} rows)")
        n = len(slots)
        header[:_FIXED] = (kind, group, n, n_rows)
        header[_FIXED : self._seg_at].reshape(self.stats.shape)[:] = self.stats
        seg = header[self._seg_at : self._seg_at + _PER_SEG * n].reshape(n, _PER_SEG)
        seg[:, 0], seg[:, 1], seg[:, 2] = slots, starts, lengths
        seg[:, 3] = 0
        seg[sampled_segs, 3] = 1
        seg[:, 4] = long or 0
        end = 8 * self.header_len
        if n_rows:
            payload = self.send_bufs[buf][end : end + n_rows * self.row_bytes].view(self.dtype).view(n_rows, self.dim)
            payload.copy_(rows)
            end += n_rows * self.row_bytes
        self.send_reqs[buf] = self.comm.Isend([view[:end], MPI.BYTE], dest=self.dest, tag=TAG)
        self.bytes_sent += end

    def _wait_send(self, buf: int) -> None:
        if not wait(self.send_reqs[buf], self.timeout_s):
            raise TimeoutError(f"{self._name(self.dest)} has not taken a message for {self.timeout_s:g} s: it has "
                               "hung or lost its connection")

    def recv(self) -> Message:
        """Wait for the next message from the previous rank."""
        i, req = self.pending.popleft()
        if not wait(req, self.timeout_s):
            raise TimeoutError(f"no message from {self._name(self.src)} for {self.timeout_s:g} s: it has hung or lost "
                               "its connection, or one trip round the ring takes longer than --timeout")
        header = self.recv_views[i][: 8 * self.header_len].view(np.int64)
        kind, group, n, n_rows = (int(x) for x in header[:_FIXED])
        mine = self.stats[self.rank].copy()
        self.stats[:] = header[_FIXED : self._seg_at].reshape(self.stats.shape)
        self.stats[self.rank] = mine
        seg = header[self._seg_at : self._seg_at + _PER_SEG * n].reshape(n, _PER_SEG).tolist()
        rows = None
        if n_rows:
            start = 8 * self.header_len
            rows = self.recv_bufs[i][start : start + n_rows * self.row_bytes].view(self.dtype).view(n_rows, self.dim)
        return Message(
            kind,
            group,
            [s[0] for s in seg],
            [s[1] for s in seg],
            [s[2] for s in seg],
            [j for j, s in enumerate(seg) if s[3]],
            [bool(s[4]) for s in seg],
            rows,
            i,
        )

    def release(self, msg: Message) -> None:
        """Hand a message's buffer back to MPI for the next receive."""
        self._post(msg.buffer)

    def close(self) -> None:
        """Finish outstanding sends and cancel the receives still posted."""
        for buf in range(len(self.send_reqs)):
            self._wait_send(buf)
        for _, req in self.pending:
            req.Cancel()
            req.Wait()
        self.pending.clear()


@dataclass
class LocalMessage:
    kind: int
    group: int
    rows: torch.Tensor | None
    buffer: int = 0


class LocalRing:
    """The ring of one rank: what rank 0 sends comes straight back to it."""

    size, rank = 1, 0

    def __init__(self) -> None:
        self.queue: deque[LocalMessage] = deque()
        self.bytes_sent = 0
        self.stats = np.zeros((1, RANK_STATS), dtype=np.int64)

    def send(self, group, slots, starts, lengths, sampled_segs, rows, kind=WORK, long=()) -> None:
        self.queue.append(LocalMessage(kind, group, rows))

    def recv(self) -> LocalMessage:
        return self.queue.popleft()

    def release(self, msg) -> None:
        pass

    def close(self) -> None:
        pass

    def buffer_bytes(self) -> int:
        return 0


def world() -> MPI.Comm:
    """The job's communicator."""
    return MPI.COMM_WORLD


def abort(comm: MPI.Comm, code: int) -> None:
    """End every rank of the job now.

    The launcher kills every process as soon as it hears of the abort, and may do so before it has
    forwarded what this rank just wrote to stderr; a short pause lets the error message get out. A
    rank cut off from the launcher (its network is down) cannot deliver the abort, and MPI_Abort
    would wait for it forever: an alarm ends this process regardless.
    """
    sys.stderr.flush()
    signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the kernel ends the process, even inside MPI
    signal.alarm(ABORT_DEADLINE_S)
    time.sleep(ABORT_GRACE_S)
    comm.Abort(code)


def local_ranks(comm: MPI.Comm) -> int:
    """How many ranks of the job share this rank's node."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    n = node.Get_size()
    node.Free()
    return n
