"""The recurrent pipeline: rank 0's loop (admit, embed, sample) and the other ranks' loop.

Slots are split into groups (micro-batches) that travel round the ring independently: while group
g is on rank 2, groups g+1 and g+2 are on ranks 1 and 0, so with at least N groups no rank idles.
When group g comes back to rank 0, its sampled tokens are drawn and its next step leaves at once.
The last rank sends back only the rows rank 0 samples from.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mdi_mpi.kv_cache import Batch
from mdi_mpi.scheduler import Scheduler, Work
from mdi_mpi.stage import Stage
from mdi_mpi.transport import STOP

def slot_groups(n_slots: int, micro_batch: int) -> list[list[int]]:
    """Split slots 0..n_slots-1 into consecutive groups of at most ``micro_batch``."""
    if n_slots < 1 or micro_batch < 1:
        raise ValueError("n_slots and micro_batch must be at least 1")
    return [list(range(a, min(a + micro_batch, n_slots))) for a in range(0, n_slots, micro_batch)]


@dataclass
class RankStats:
    """Where one rank's wall time went."""

    compute_s: float = 0.0
    sample_s: float = 0.0
    wall_s: float = 0.0
    steps: int = 0
    extra: dict = field(default_factory=dict)


@torch.inference_mode()
def run_first(
    stage: Stage, sched: Scheduler, ring, groups: list[list[int]], fail_at: int | None = None
) -> RankStats:
    """Rank 0: feed every group into the ring, sample what comes back, refill, then stop the ring."""
    stats = RankStats()
    t_start = time.perf_counter()
    works: dict[int, Work] = {}
    last = ring.size == 1

    def launch(g: int) -> bool:
        work = sched.plan(groups[g])
        if work is None:
            return False
        _maybe_fail(stats.steps, fail_at)
        t0 = time.perf_counter()
        h = stage.forward_layers(stage.embed(work.ids), work.batch)  # [T, D]
        if last:
            h = h[work.batch.last[work.sampled]]
        stats.compute_s += time.perf_counter() - t0
        works[g] = work
        b = work.batch
        ring.send(g, g, b.slots, b.starts, b.lengths, work.sampled, h)
        stats.steps += 1
        return True

    in_flight = sum(launch(g) for g in range(len(groups)))
    while in_flight:
        msg = ring.recv()
        work = works.pop(msg.group)
        t0 = time.perf_counter()
        logits = stage.head(msg.rows) if work.sampled else None  # [len(sampled), V]
        ring.release(msg)
        t1 = time.perf_counter()
        if logits is not None:
            sched.complete(work, logits)
        stats.compute_s += t1 - t0
        stats.sample_s += time.perf_counter() - t1
        in_flight -= 1
        in_flight += launch(msg.group)
    ring.send(0, 0, (), (), (), [], None, kind=STOP)
    msg = ring.recv()
    assert msg.kind == STOP, "the ring returned work after the stop message"
    ring.close()
    stats.wall_s = time.perf_counter() - t_start
    return stats


@torch.inference_mode()
def run_worker(stage: Stage, ring, fail_at: int | None = None) -> RankStats:
    """Ranks 1..N-1: run this stage on each message and pass it on, until the stop message."""
    stats = RankStats()
    t_start = time.perf_counter()
    last = ring.rank == ring.size - 1
    while True:
        msg = ring.recv()
        if msg.kind == STOP:
            ring.send(0, 0, (), (), (), [], None, kind=STOP)
            break
        _maybe_fail(stats.steps, fail_at)
        t0 = time.perf_counter()
        batch = Batch.make(msg.slots, msg.starts, msg.lengths)
        h = stage.forward_layers(msg.rows, batch)  # [T, D]
        ring.release(msg)
        if last:
            h = h[batch.last[msg.sampled]]
        stats.compute_s += time.perf_counter() - t0
        ring.send(msg.group, msg.group, batch.slots, batch.starts, batch.lengths, msg.sampled, h)
        stats.steps += 1
    ring.close()
    stats.wall_s = time.perf_counter() - t_start
    return stats


def _maybe_fail(step: int, fail_at: int | None) -> None:
    """Test hook: raise at step ``fail_at`` to check that a failing rank ends the whole job."""
    if step == fail_at:
        raise RuntimeError(f"injected failure at step {step}")
