"""The transport layer: the only module that imports mpi4py. Every MPI call of the program is here.

- ``Comm``: the job's communicator with the few collectives the job set-up and the commands need
  (an agreed check, gathers and broadcasts of small values, a barrier, the abort) and ``split`` for a
  sub-communicator, so that a pipeline stage can be held by a group of ranks of its own.
- ``Ring``: one rank's neighbour links over MPI, a ``ring.Link`` (as ``ring.LocalRing`` is for a
  job of one rank), carrying ``ring.Packet``s.
- ``Peers``: the ranks that hold one stage together (``--tp``): the leader shares each message with
  them, and they add their partial products in a fixed order.

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

import os
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
from mdi_mpi.model import tree_sum
from mdi_mpi.prefix_cache import Copy
from mdi_mpi.ring import Link, LocalRing, Packet
from mdi_mpi.stats import FIELDS

_FIXED = 6  # kind, group, n_segments, n_rows, n_copies, n_ids
_PER_SEG = 5  # slot, start, length, sampled, long (longrope's long factors)
_PER_COPY = 3  # src, dst, length
COPIES_PER_SEGMENT = 2  # a slot's step may save its old prefix in a cache slot, then load another
TAG = 7
ABORT_GRACE_S = 1.0  # time for the launcher to forward a failing rank's last words before the abort
ABORT_DEADLINE_S = 5  # a rank whose abort has not ended it by then ends itself
MAX_NAP_S = 5e-4  # longest sleep between two checks of a pending request
SPIN_S = 0.01  # how long a stage's rank waits for its leader's next message without sleeping

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


    def peers(self, max_segments: int, max_rows: int, dim: int, dtype: torch.dtype, timeout_s: float | None = None,
              first_rank: int = 0) -> Peers:
        """This communicator as the ranks of one stage (``--tp``); ``first_rank``: its leader's rank in the job."""
        return Peers(self, max_segments, max_rows, dim, dtype, timeout_s, self.hosts(), first_rank)


def world() -> Comm:
    """The job's communicator (MPI starts here, on the first call)."""
    return Comm(MPI.COMM_WORLD)


def wait(req: MPI.Request, timeout_s: float | None = None, spin_s: float = 0.0) -> bool:
    """Complete ``req`` without holding a core: check it, then sleep in naps that grow from 10 us
    to ``MAX_NAP_S``. ``MPI_Wait`` would spin, taking a core from the ranks that compute whenever a
    node runs more ranks than it has cores, and heating a Pi that needs its thermal headroom; a
    message that arrives mid-nap waits at most 0.5 ms, well under a stage's time per token.

    ``spin_s``: first check for that long without sleeping, yielding the core to any other process
    that wants it between checks, for the waits that are short and many (a stage's ranks meet twice
    per layer, and a nap there would cost more than the layer).

    Gives up after ``timeout_s`` seconds (None: never) and returns False: a frozen or unreachable
    node must end the job, not hang it until the scheduler's time limit."""
    start = time.monotonic()
    deadline = None if timeout_s is None else start + timeout_s
    if spin_s > 0:
        spin_until = start + spin_s if deadline is None else min(start + spin_s, deadline)
        checks = 0
        while not req.Test():
            checks += 1
            if checks % 64 == 0 and time.monotonic() > spin_until:
                break
            os.sched_yield()
        else:
            return True
    nap = 1e-5
    while not req.Test():
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(nap)
        nap = min(2 * nap, MAX_NAP_S)
    return True


class Codec:
    """The layout of one message in a byte buffer: the header of int64s (``header_len`` of them:
    kind, group, counts, ``n_stats`` rows of stats, segments, KV copies, up to ``max_ids`` token
    ids), then the rows."""

    def __init__(self, n_stats: int, max_segments: int, max_rows: int, dim: int, dtype: torch.dtype, max_ids: int = 0):
        self.stats_shape = (n_stats, len(FIELDS))
        self.max_segments, self.max_copies, self.max_rows = max_segments, COPIES_PER_SEGMENT * max_segments, max_rows
        self.seg_at = _FIXED + n_stats * len(FIELDS)
        self.copy_at = self.seg_at + _PER_SEG * max_segments
        self.ids_at = self.copy_at + _PER_COPY * self.max_copies
        self.max_ids = max_ids
        self.header_len = self.ids_at + max_ids
        self.dim, self.dtype = dim, dtype
        self.row_bytes = dim * torch.empty((), dtype=dtype).element_size()
        self.nbytes = 8 * self.header_len + max_rows * self.row_bytes

    def pack(self, packet: Packet, buf: torch.Tensor, stats: np.ndarray | None = None) -> int:
        """Write ``packet`` (and the ``stats`` rows) into ``buf`` (uint8); returns the bytes used."""
        batch, rows = packet.batch, packet.rows
        header = buf[: 8 * self.header_len].numpy().view(np.int64)
        n_rows = 0 if rows is None else rows.shape[0]
        if n_rows > self.max_rows:
            raise RuntimeError(f"message of {n_rows} rows exceeds the buffer ({self.max_rows} rows)")
        n = 0 if batch is None else len(batch.slots)
        n_copies = len(packet.copies)
        if n_copies > self.max_copies:
            raise RuntimeError(f"message of {n_copies} KV copies exceeds the header ({self.max_copies})")
        n_ids = 0 if packet.ids is None else len(packet.ids)
        if n_ids > self.max_ids:
            raise RuntimeError(f"message of {n_ids} token ids exceeds the header ({self.max_ids})")
        header[:_FIXED] = (packet.kind, packet.group, n, n_rows, n_copies, n_ids)
        if n_ids:
            header[self.ids_at : self.ids_at + n_ids] = packet.ids.numpy()
        if stats is not None:
            header[_FIXED : self.seg_at].reshape(self.stats_shape)[:] = stats
        if n:
            seg = header[self.seg_at : self.seg_at + _PER_SEG * n].reshape(n, _PER_SEG)
            seg[:, 0], seg[:, 1], seg[:, 2] = batch.slots, batch.starts, batch.lengths
            seg[:, 3] = 0
            seg[packet.sampled_segs, 3] = 1
            seg[:, 4] = batch.long
        if n_copies:
            header[self.copy_at : self.copy_at + _PER_COPY * n_copies] = [
                x for cp in packet.copies for x in (cp.src, cp.dst, cp.length)]
        end = 8 * self.header_len
        if n_rows:
            buf[end : end + n_rows * self.row_bytes].view(self.dtype).view(n_rows, self.dim).copy_(rows)
            end += n_rows * self.row_bytes
        return end

    def n_rows(self, buf: torch.Tensor) -> int:
        """The row count of the message whose header is in ``buf``."""
        return int(buf[: 8 * _FIXED].numpy().view(np.int64)[3])

    def unpack(self, buf: torch.Tensor, index: int = 0) -> tuple[Packet, np.ndarray]:
        """The message in ``buf`` (its rows a view of ``buf``; ``index``: which buffer it is), and
        its stats rows (a view of the header)."""
        header = buf[: 8 * self.header_len].numpy().view(np.int64)
        kind, group, n, n_rows, n_copies, n_ids = (int(x) for x in header[:_FIXED])
        batch, sampled = None, []
        if n:
            seg = header[self.seg_at : self.seg_at + _PER_SEG * n].reshape(n, _PER_SEG).tolist()
            batch = Batch.make([s[0] for s in seg], [s[1] for s in seg], [s[2] for s in seg], [bool(s[4]) for s in seg])
            sampled = [j for j, s in enumerate(seg) if s[3]]
        flat = header[self.copy_at : self.copy_at + _PER_COPY * n_copies].tolist()
        copies = tuple(Copy(*flat[j : j + _PER_COPY]) for j in range(0, len(flat), _PER_COPY))
        rows = None
        if n_rows:
            start = 8 * self.header_len
            rows = buf[start : start + n_rows * self.row_bytes].view(self.dtype).view(n_rows, self.dim)
        ids = torch.from_numpy(header[self.ids_at : self.ids_at + n_ids].copy()) if n_ids else None
        packet = Packet(kind, group, batch, sampled, rows, index, copies, ids)
        return packet, header[_FIXED : self.seg_at].reshape(self.stats_shape)


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
        self.codec = Codec(self.size, max_segments, max_rows, dim, dtype)
        self.recv_bufs = [torch.zeros(self.codec.nbytes, dtype=torch.uint8) for _ in range(n_buffers)]
        self.send_bufs = [torch.zeros(self.codec.nbytes, dtype=torch.uint8) for _ in range(n_buffers)]
        self.recv_views = [b.numpy() for b in self.recv_bufs]
        self.send_views = [b.numpy() for b in self.send_bufs]
        self.send_reqs: list[MPI.Request] = [MPI.REQUEST_NULL] * n_buffers
        self.pending: deque[tuple[int, MPI.Request]] = deque()  # posted receives, in matching order
        self.bytes_sent = 0
        for i in range(n_buffers):
            self._post(i)

    def _name(self, rank: int) -> str:
        return f"rank {rank}" + (f" on {self.hosts[rank]}" if self.hosts else "")

    def buffer_bytes(self) -> int:
        return sum(b.nbytes for b in self.recv_bufs + self.send_bufs)

    def _post(self, i: int) -> None:
        self.pending.append((i, self.mpi.Irecv([self.recv_views[i], MPI.BYTE], source=self.src, tag=TAG)))

    def send(self, packet: Packet) -> None:
        """Send ``packet`` to the next rank from its group's send buffer (waiting for that buffer's
        previous send first); its rows [n_rows, D] are copied into the buffer."""
        buf = packet.group
        self._wait_send(buf)
        end = self.codec.pack(packet, self.send_bufs[buf], self.stats)
        self.send_reqs[buf] = self.mpi.Isend([self.send_views[buf][:end], MPI.BYTE], dest=self.dest, tag=TAG)
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
        packet, stats = self.codec.unpack(self.recv_bufs[i], i)
        mine = self.stats[self.rank].copy()
        self.stats[:] = stats
        self.stats[self.rank] = mine
        return packet

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


class Peers:
    """The ranks that hold one pipeline stage together (``--tp``), from one rank's side. The
    leader (index 0) is the stage's rank in the ring: it shares each message it runs with the
    others (``share``, two broadcasts: the header, then the rows), which take it with ``receive``;
    every rank then computes its share of each layer, and ``combine`` adds the row-parallel
    partial products of all of them.

    ``combine`` gathers every rank's float32 partial [T, D] (an all-gather, not an all-reduce: an
    all-reduce's summation order is MPI's) and adds them in ``tree_sum``'s order, the same on every
    rank and for every group size, so the tokens do not depend on how many ranks hold a stage."""

    def __init__(self, comm: Comm, max_segments: int, max_rows: int, dim: int, dtype: torch.dtype,
                 timeout_s: float | None = None, hosts: list[str] | None = None, first_rank: int = 0):
        self.mpi = comm.mpi
        self.index, self.size = comm.rank, comm.size
        self.timeout_s = timeout_s
        self.names = f"ranks {first_rank}-{first_rank + comm.size - 1}" + (f" on {', '.join(sorted(set(hosts)))}" if hosts else "")
        self.codec = Codec(0, max_segments, max_rows, dim, dtype, max_ids=max_rows if first_rank == 0 else 0)
        self.buf = torch.zeros(self.codec.nbytes, dtype=torch.uint8)
        self.view = self.buf.numpy()
        self.partials = torch.zeros(comm.size * max_rows * dim, dtype=torch.float32)  # every rank's, in rank order
        self.bytes_sent = 0
        self.combine_s = 0.0  # time in ``combine``: mostly waiting for the slowest rank of the stage
    def buffer_bytes(self) -> int:
        return self.buf.nbytes + self.partials.nbytes

    def _wait(self, req: MPI.Request, what: str, spin_s: float = float("inf")) -> None:
        if not wait(req, self.timeout_s, spin_s):
            raise TimeoutError(f"{what} for {self.timeout_s:g} s among the stage's {self.names}: one of them has hung "
                               "or lost its connection")

    def share(self, packet: Packet) -> None:
        """The leader: send ``packet`` (its rows copied) to the stage's other ranks."""
        end = self.codec.pack(packet, self.buf)
        head = 8 * self.codec.header_len
        self._wait(self.mpi.Ibcast([self.view[:head], MPI.BYTE], root=0), "no answer to a message")
        if end > head:
            self._wait(self.mpi.Ibcast([self.view[head:end], MPI.BYTE], root=0), "no answer to a message")
        self.bytes_sent += (self.size - 1) * end

    def receive(self) -> Packet:
        """Another rank than the leader: the next message the leader shares (valid until the next)."""
        head = 8 * self.codec.header_len
        self._wait(self.mpi.Ibcast([self.view[:head], MPI.BYTE], root=0), "no message from the stage's leader", SPIN_S)
        end = head + self.codec.n_rows(self.buf) * self.codec.row_bytes
        if end > head:
            self._wait(self.mpi.Ibcast([self.view[head:end], MPI.BYTE], root=0), "no message from the stage's leader")
        return self.codec.unpack(self.buf)[0]

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Every rank's share of the vocabulary's logits [B, V / size] (float32), side by side in
        rank order, on the leader [B, V]; None on the others."""
        mine = logits.contiguous()
        whole = torch.empty((self.size, *mine.shape), dtype=torch.float32) if self.index == 0 else None
        self._wait(self.mpi.Igather([mine.numpy(), MPI.FLOAT], [whole.numpy(), MPI.FLOAT] if whole is not None else None,
                                    root=0), "no logits")
        self.bytes_sent += 0 if self.index == 0 else mine.numel() * 4
        return None if whole is None else whole.permute(1, 0, 2).reshape(mine.shape[0], -1)

    def combine(self, partial: torch.Tensor) -> torch.Tensor:
        """Every rank's float32 ``partial`` [T, D], added in ``tree_sum``'s order: [T, D]."""
        t0 = time.perf_counter()
        n = partial.numel()
        gathered = self.partials[: self.size * n]
        self._wait(self.mpi.Iallgather([partial.contiguous().numpy(), MPI.FLOAT], [gathered.numpy(), MPI.FLOAT]),
                   "no partial product")
        self.bytes_sent += 4 * n
        self.combine_s += time.perf_counter() - t0
        return tree_sum(list(gathered.view(self.size, *partial.shape).unbind(0)))
