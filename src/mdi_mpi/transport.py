"""The transport layer: the only module that imports mpi4py. Every MPI call of the program is here.

- ``Comm``: the job's communicator with the few collectives the job set-up and the commands need
  (an agreed check, gathers and broadcasts of small values, a barrier, the abort) and ``split`` for a
  sub-communicator, so that a pipeline stage can be held by a group of ranks of its own.
- ``Ring``: one rank's neighbour links over MPI, a ``ring.Link`` (as ``ring.LocalRing`` is for a
  job of one rank), carrying ``ring.Packet``s.

Each ring message is one preallocated byte buffer: a fixed header of int64s followed by the
activation payload in the model dtype (bf16 travels as 2 bytes per value). Per-token traffic uses
``Isend`` and ``Irecv`` on these buffers, nothing is pickled. Every rank keeps one posted receive per
group that can be in flight, so a message always finds a receive waiting and no send ever blocks
the ring.

Header: ``[kind, group, n_segments, n_rows, then every rank's stats row (stats.FIELDS), then (slot,
start, length, sampled, long) per segment]``. Each rank writes its own stats into every message it
sends and keeps the others' from every message it receives, so rank 0 knows how every rank spends
its time, at most one trip round the ring late, at no extra message.
"""

from __future__ import annotations

import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from mpi4py import MPI

from mdi_mpi.errors import AgreedError, UserError
from mdi_mpi.kv_cache import Batch
from mdi_mpi.prefix_cache import Copy
from mdi_mpi.ring import Link, LocalRing, Packet
from mdi_mpi.stats import FIELDS

_FIXED = 5  # kind, group, n_segments, n_rows, n_copies
_PER_SEG = 5  # slot, start, length, sampled, long (longrope's long factors)
_PER_COPY = 3  # src, dst, length
COPIES_PER_SEGMENT = 2  # a slot's step may save its old prefix in a cache slot, then load another
TAG = 7
ABORT_GRACE_S = 1.0  # time for the launcher to forward a failing rank's last words before the abort
ABORT_DEADLINE_S = 5  # a rank whose abort has not ended it by then ends itself
MAX_NAP_S = 5e-4  # longest sleep between two checks of a pending request

T = TypeVar("T")


class Comm:
    """A communicator of the job (the world, or a group split from it) and its collectives.

    Collectives move small Python values (pickled by mpi4py between our own ranks, never from a file
    or the network's other users); the ring's per-token traffic goes through ``Ring``."""

    def __init__(self, mpi: MPI.Comm):
        self.mpi = mpi
        self.rank: int = mpi.Get_rank()
        self.size: int = mpi.Get_size()

    def agree(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank and return its local value; if it raises ``UserError`` on any
        rank, raise ``AgreedError`` on all (naming the rank if not 0), so each can exit on its own."""
        try:
            value, err = fn(), None
        except UserError as e:
            value, err = None, str(e)
        errors = self.allgather(err)
        for r, e in enumerate(errors):
            if e:
                raise AgreedError(e if r == 0 else f"rank {r}: {e}")
        return value

    def allgather(self, value: T) -> list[T]:
        """Every rank's ``value``, in rank order, on every rank."""
        return self.mpi.allgather(value) if self.size > 1 else [value]

    def gather(self, value: T, root: int = 0) -> list[T] | None:
        """Every rank's ``value`` on ``root`` (None elsewhere)."""
        return self.mpi.gather(value, root=root) if self.size > 1 else [value]

    def bcast(self, value: T, root: int = 0) -> T:
        """``root``'s ``value`` on every rank."""
        return self.mpi.bcast(value, root=root) if self.size > 1 else value

    def barrier(self) -> None:
        if self.size > 1:
            self.mpi.Barrier()

    def split(self, color: int, key: int | None = None) -> Comm:
        """The sub-communicator of the ranks that give the same ``color`` (ordered by ``key``, default
        this rank): a stage held by a group of ranks talks within its group through it."""
        return Comm(self.mpi.Split(color, self.rank if key is None else key))

    def local_ranks(self) -> int:
        """How many ranks of this communicator share this rank's node."""
        node = self.mpi.Split_type(MPI.COMM_TYPE_SHARED)
        n = node.Get_size()
        node.Free()
        return n

    def hosts(self) -> list[str]:
        """Every rank's host name, in rank order."""
        return self.allgather(socket.gethostname())

    def abort(self, code: int) -> None:
        """End every rank of the job now.

        The launcher kills every process as soon as it hears of the abort, and may do so before it
        has forwarded what this rank just wrote to stderr; a short pause lets the error message get
        out. A rank cut off from the launcher (its network is down) cannot deliver the abort, and
        MPI_Abort would wait for it forever: an alarm ends this process regardless."""
        sys.stderr.flush()
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # the kernel ends the process, even inside MPI
        signal.alarm(ABORT_DEADLINE_S)
        time.sleep(ABORT_GRACE_S)
        self.mpi.Abort(code)

    def ring(self, n_buffers: int, max_segments: int, max_rows: int, dim: int, dtype: torch.dtype,
             timeout_s: float | None = None) -> Link:
        """This rank's link in the ring of all the communicator's ranks (a ``LocalRing`` for one)."""
        if self.size == 1:
            return LocalRing()
        return Ring(self, n_buffers, max_segments, max_rows, dim, dtype, timeout_s, self.hosts())


def world() -> Comm:
    """The job's communicator (MPI starts here, on the first call)."""
    return Comm(MPI.COMM_WORLD)


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


class Ring:
    """Neighbour links of one rank in the ring 0 -> 1 -> ... -> N-1 -> 0."""

    def __init__(
        self,
        comm: Comm,
        n_buffers: int,
        max_segments: int,
        max_rows: int,
        dim: int,
        dtype: torch.dtype,
        timeout_s: float | None = None,
        hosts: list[str] | None = None,
    ):
        self.mpi = comm.mpi
        self.timeout_s = timeout_s  # longest wait for a message or a send (None: no limit)
        self.rank, self.size = comm.rank, comm.size
        self.dest, self.src = (self.rank + 1) % self.size, (self.rank - 1) % self.size
        self.hosts = hosts  # every rank's host, to name a neighbour that stops answering
        self.stats = np.zeros((self.size, len(FIELDS)), dtype=np.int64)
        self.max_copies = COPIES_PER_SEGMENT * max_segments
        self.header_len = _FIXED + self.stats.size + _PER_SEG * max_segments + _PER_COPY * self.max_copies
        self._copy_at = _FIXED + self.stats.size + _PER_SEG * max_segments
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
        self.pending.append((i, self.mpi.Irecv([self.recv_views[i], MPI.BYTE], source=self.src, tag=TAG)))

    def send(self, packet: Packet) -> None:
        """Send ``packet`` to the next rank from its group's send buffer (waiting for that buffer's
        previous send first); its rows [n_rows, D] are copied into the buffer."""
        buf, batch, rows = packet.group, packet.batch, packet.rows
        self._wait_send(buf)
        view = self.send_views[buf]
        header = view[: 8 * self.header_len].view(np.int64)
        n_rows = 0 if rows is None else rows.shape[0]
        if n_rows > self.max_rows:
            raise RuntimeError(f"message of {n_rows} rows exceeds the buffer ({self.max_rows} rows)")
        n = 0 if batch is None else len(batch.slots)
        n_copies = len(packet.copies)
        if n_copies > self.max_copies:
            raise RuntimeError(f"message of {n_copies} KV copies exceeds the header ({self.max_copies})")
        header[:_FIXED] = (packet.kind, packet.group, n, n_rows, n_copies)
        header[_FIXED : self._seg_at].reshape(self.stats.shape)[:] = self.stats
        if n:
            seg = header[self._seg_at : self._seg_at + _PER_SEG * n].reshape(n, _PER_SEG)
            seg[:, 0], seg[:, 1], seg[:, 2] = batch.slots, batch.starts, batch.lengths
            seg[:, 3] = 0
            seg[packet.sampled_segs, 3] = 1
            seg[:, 4] = batch.long
        if n_copies:
            header[self._copy_at : self._copy_at + _PER_COPY * n_copies] = [
                x for cp in packet.copies for x in (cp.src, cp.dst, cp.length)]
        end = 8 * self.header_len
        if n_rows:
            payload = self.send_bufs[buf][end : end + n_rows * self.row_bytes].view(self.dtype).view(n_rows, self.dim)
            payload.copy_(rows)
            end += n_rows * self.row_bytes
        self.send_reqs[buf] = self.mpi.Isend([view[:end], MPI.BYTE], dest=self.dest, tag=TAG)
        self.bytes_sent += end

    def _wait_send(self, buf: int) -> None:
        if not wait(self.send_reqs[buf], self.timeout_s):
            raise TimeoutError(f"{self._name(self.dest)} has not taken a message for {self.timeout_s:g} s: it has "
                               "hung or lost its connection")

    def recv(self) -> Packet:
        """Wait for the next message from the previous rank."""
        i, req = self.pending.popleft()
        if not wait(req, self.timeout_s):
            raise TimeoutError(f"no message from {self._name(self.src)} for {self.timeout_s:g} s: it has hung or lost "
                               "its connection, or one trip round the ring takes longer than --timeout")
        header = self.recv_views[i][: 8 * self.header_len].view(np.int64)
        kind, group, n, n_rows, n_copies = (int(x) for x in header[:_FIXED])
        mine = self.stats[self.rank].copy()
        self.stats[:] = header[_FIXED : self._seg_at].reshape(self.stats.shape)
        self.stats[self.rank] = mine
        batch, sampled = None, []
        if n:
            seg = header[self._seg_at : self._seg_at + _PER_SEG * n].reshape(n, _PER_SEG).tolist()
            batch = Batch.make([s[0] for s in seg], [s[1] for s in seg], [s[2] for s in seg], [bool(s[4]) for s in seg])
            sampled = [j for j, s in enumerate(seg) if s[3]]
        flat = header[self._copy_at : self._copy_at + _PER_COPY * n_copies].tolist()
        copies = tuple(Copy(*flat[j : j + _PER_COPY]) for j in range(0, len(flat), _PER_COPY))
        rows = None
        if n_rows:
            start = 8 * self.header_len
            rows = self.recv_bufs[i][start : start + n_rows * self.row_bytes].view(self.dtype).view(n_rows, self.dim)
        return Packet(kind, group, batch, sampled, rows, i, copies)

    def release(self, packet: Packet) -> None:
        """Hand a packet's buffer back to MPI for the next receive."""
        self._post(packet.buffer)

    def close(self) -> None:
        """Finish outstanding sends and cancel the receives still posted."""
        for buf in range(len(self.send_reqs)):
            self._wait_send(buf)
        for _, req in self.pending:
            req.Cancel()
            req.Wait()
        self.pending.clear()
