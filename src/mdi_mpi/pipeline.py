"""The recurrent pipeline: rank 0's loop (admit, embed, sample) and the other ranks' loop.

Slots are split into groups (micro-batches) that travel round the ring independently: while group
g is on rank 2, groups g+1 and g+2 are on ranks 1 and 0, so with at least N groups no rank idles.
When group g comes back to rank 0, its sampled tokens are drawn and its next step leaves at once.
The last rank sends back only the rows rank 0 samples from.

A server's rank 0 also takes requests that arrive over time, from an ``Inbox``: while nothing is in
flight it waits on the inbox, and every ``heartbeat_s`` of quiet it sends a heartbeat round the ring,
so that the other ranks (which end the job after ``--timeout`` without a message) know it is alive,
and a rank that has died or frozen is noticed while the server is idle, as under load.

A stage held by several ranks (``--tp``): its leader is the stage's rank in the ring and shares
every message with the others (its ``StagePeers``) before it runs it; they run ``run_member``, and
all of them add their row-parallel products through the peers inside the layers.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import torch

from mdi_mpi.kv_cache import Batch
from mdi_mpi.prefix_cache import Copy
from mdi_mpi.probes import peak_rss
from mdi_mpi.ring import HEAD, HEARTBEAT, STOP, WORK, Link, Packet, signal_packet
from mdi_mpi.scheduler import Inbox, Planner, Work
from mdi_mpi.stage import Stage
from mdi_mpi.stats import COMPUTE, EVENT_KINDS, PREFILL, RECV, SAMPLE, SEND, to_row


class StagePeers(Protocol):
    """The ranks of one stage as the loops see them (``transport.Peers``)."""

    def share(self, packet: Packet) -> None: ...

    def receive(self) -> Packet: ...

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor | None: ...


class Recorder:
    """Where one rank's time goes: totals per event kind, and with ``trace`` the whole timeline
    (kind, group, start, end; seconds since ``origin``, a moment all ranks share)."""

    def __init__(self, trace: bool = False, origin: float | None = None):
        self.origin = time.perf_counter() if origin is None else origin
        self.totals = [0.0] * len(EVENT_KINDS)
        self.events: list[tuple[int, int, float, float]] | None = [] if trace else None
        self.steps = 0
        self.wall_s = 0.0
        self.rss_read_at = -1e9  # when peak_rss_kib was last read
        self.peak_rss_kib = 0

    def add(self, kind: int, group: int, t0: float, t1: float) -> None:
        self.totals[kind] += t1 - t0
        if self.events is not None:
            self.events.append((kind, group, t0 - self.origin, t1 - self.origin))

    def summary(self) -> dict[str, float]:
        """Seconds per kind, plus the wall time of the loop."""
        out = {f"{k.replace('-', '_')}_s": round(v, 4) for k, v in zip(EVENT_KINDS, self.totals)}
        return {**out, "wall_s": round(self.wall_s, 4), "steps": self.steps}

    def event_array(self) -> np.ndarray:
        """The timeline as a structured array (empty when tracing is off)."""
        dtype = [("kind", "i1"), ("group", "i4"), ("start", "f8"), ("end", "f8")]
        return np.array(self.events or [], dtype=dtype)


def _compute_kind(batch: Batch) -> int:
    return PREFILL if batch.n_tokens > len(batch.slots) else COMPUTE


def _recv(ring: Link, rec: Recorder) -> Packet:
    t0 = time.perf_counter()
    msg = ring.recv()
    rec.add(RECV, msg.group, t0, time.perf_counter())
    return msg


def _send(ring: Link, rec: Recorder, group: int, batch: Batch, sampled_segs: list[int], h: torch.Tensor,
          back: bool, copies: tuple[Copy, ...]) -> None:
    """Send a group's rows on, with the step's KV copies; ``back``: to rank 0, which kept the
    group's segments, so the packet carries none (and rank 0 rebuilds no ``Batch``)."""
    t0 = time.perf_counter()
    _report(ring, rec)
    ring.send(Packet(WORK, group, rows=h) if back else Packet(WORK, group, batch, sampled_segs, h, copies=copies))
    rec.add(SEND, group, t0, time.perf_counter())


def _rows_to_return(h: torch.Tensor, batch: Batch, sampled_segs: list[int], all_rows: bool) -> torch.Tensor:
    """What the last rank sends back to rank 0 from ``h`` [T, D]: the rows of the sampled segments'
    last tokens [len(sampled_segs), D], or every row with ``all_rows``."""
    return h if all_rows else h[batch.last[sampled_segs]]


def _report(ring: Link, rec: Recorder) -> None:
    """Put this rank's running stats into the ring's header (peak RSS read once a second)."""
    now = time.perf_counter()
    if now - rec.rss_read_at > 1.0:
        rec.rss_read_at, rec.peak_rss_kib = now, peak_rss() // 1024
    ring.stats[ring.rank] = to_row(rec.totals, rec.peak_rss_kib)


def _signal(ring: Link, rec: Recorder, kind: int, peers: StagePeers | None) -> None:
    """Send a message with no work (a stop or a heartbeat) to the stage's other ranks and the next rank."""
    if peers is not None:
        peers.share(signal_packet(kind))
    _report(ring, rec)
    ring.send(signal_packet(kind))


@torch.inference_mode()
def run_first(
    stage: Stage,
    sched: Planner,
    ring: Link,
    groups: list[list[int]],
    rec: Recorder,
    all_rows: bool = False,
    inbox: Inbox | None = None,
    peers: StagePeers | None = None,
) -> None:
    """Rank 0: feed every group into the ring, sample what comes back, refill, then stop the ring.
    ``sched`` plans each group's next step and takes the logits of its sampled segments' last tokens
    (``all_rows``: of every token, as teacher-forced scoring needs; every rank must be told). Without
    an ``inbox`` the loop ends when the scheduler's requests are done; with one, when the inbox is
    closed and the last request has ended."""
    works: dict[int, Work] = {}
    is_last_rank = ring.size == 1

    def launch(g: int) -> bool:
        work = sched.next_work(groups[g])
        if work is None:
            return False
        t0 = time.perf_counter()
        stage.copy_kv(work.copies)
        if peers is not None:  # stage 0's ranks embed the ids together
            peers.share(Packet(WORK, g, work.batch, work.sampled_segs, copies=work.copies, ids=work.ids))
        h = stage.forward_layers(stage.embed(work.ids), work.batch)  # [T, D]
        if is_last_rank:
            h = _rows_to_return(h, work.batch, work.sampled_segs, all_rows)
        rec.add(_compute_kind(work.batch), g, t0, time.perf_counter())
        works[g] = work
        _send(ring, rec, g, work.batch, work.sampled_segs, h, is_last_rank, work.copies)
        sched.sent(work)  # e.g. grammar masks, made while the group travels
        rec.steps += 1
        return True

    idle = list(range(len(groups)))  # groups not in the ring
    while True:
        if inbox is not None:
            quiet = not works and sched.done
            if quiet and inbox.closed:
                break
            if not inbox.deliver(sched, inbox.heartbeat_s if quiet else 0.0) and quiet:
                _signal(ring, rec, HEARTBEAT, peers)
                _expect(ring, rec, HEARTBEAT)
                continue
        idle = [g for g in idle if not launch(g)]
        if not works:
            if inbox is None:
                break
            continue
        msg = _recv(ring, rec)
        work = works.pop(msg.group)
        if work.sampled_segs:
            t0 = time.perf_counter()
            logits = _head(stage, msg, peers)  # [len(sampled_segs), V]
            t1 = time.perf_counter()
            rec.add(COMPUTE, msg.group, t0, t1)
            sched.complete(work, logits)
            rec.add(SAMPLE, msg.group, t1, time.perf_counter())
        ring.release(msg)
        idle.append(msg.group)
    _signal(ring, rec, STOP, peers)
    _expect(ring, rec, STOP)
    ring.close()
    rec.wall_s = time.perf_counter() - rec.origin


def _head(stage: Stage, msg: Packet, peers: StagePeers | None) -> torch.Tensor:
    """The logits of the rows ``msg`` brought back [B, V]; stage 0's ranks (``--tp``) compute a
    share of the vocabulary each."""
    if peers is None:
        return stage.head(msg.rows)
    peers.share(Packet(HEAD, msg.group, rows=msg.rows))
    return peers.gather_logits(stage.head(msg.rows))


def _expect(ring: Link, rec: Recorder, kind: int) -> None:
    """Receive the message rank 0 sent round the ring with no work, which must come back next."""
    msg = _recv(ring, rec)
    if msg.kind != kind:
        raise RuntimeError(f"the ring returned message kind {msg.kind} where kind {kind} was expected")
    ring.release(msg)


@torch.inference_mode()
def run_worker(stage: Stage, ring: Link, rec: Recorder, all_rows: bool = False, peers: StagePeers | None = None) -> None:
    """Ranks 1..N-1 of the ring: run this stage on each message and pass it on, until the stop
    message. The last rank sends back only the rows rank 0 samples from, or every row with ``all_rows``."""
    is_last_rank = ring.rank == ring.size - 1
    while True:
        msg = _recv(ring, rec)
        if msg.kind != WORK:  # a stop or a heartbeat: pass it on
            ring.release(msg)
            _signal(ring, rec, msg.kind, peers)
            if msg.kind == STOP:
                break
            continue
        t0 = time.perf_counter()
        batch = msg.batch
        if peers is not None:
            peers.share(msg)
        stage.copy_kv(msg.copies)
        h = stage.forward_layers(msg.rows, batch)  # [T, D]
        ring.release(msg)
        if is_last_rank:
            h = _rows_to_return(h, batch, msg.sampled_segs, all_rows)
        rec.add(_compute_kind(batch), msg.group, t0, time.perf_counter())
        _send(ring, rec, msg.group, batch, msg.sampled_segs, h, is_last_rank, msg.copies)
        rec.steps += 1
    ring.close()
    rec.wall_s = time.perf_counter() - rec.origin



@torch.inference_mode()
def run_member(stage: Stage, peers: StagePeers, rec: Recorder) -> None:
    """A stage's ranks other than its leader (``--tp``): run this rank's share of the stage on each
    message the leader shares, until the stop message."""
    while True:
        t0 = time.perf_counter()
        msg = peers.receive()
        rec.add(RECV, msg.group, t0, time.perf_counter())
        if msg.kind == STOP:
            break
        t0 = time.perf_counter()
        if msg.kind == HEAD:  # stage 0: this rank's share of the vocabulary's logits
            peers.gather_logits(stage.head(msg.rows))
            rec.add(COMPUTE, msg.group, t0, time.perf_counter())
            continue
        if msg.kind != WORK:
            continue
        stage.copy_kv(msg.copies)
        stage.forward_layers(stage.embed(msg.ids) if msg.ids is not None else msg.rows, msg.batch)
        rec.add(_compute_kind(msg.batch), msg.group, t0, time.perf_counter())
        rec.steps += 1
    rec.wall_s = time.perf_counter() - rec.origin
