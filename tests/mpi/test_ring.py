"""The transport and the recurrent pipeline on real MPI ranks (run under ``mpirun -np 2``)."""

from __future__ import annotations

import socket

import pytest
import torch
from support.stages import run_one_process, scheduler

from mdi_mpi.config import ModelConfig
from mdi_mpi.kernels import default_cache
from mdi_mpi.kv_cache import Batch
from mdi_mpi.model import tree_sum
from mdi_mpi.partition import slot_groups
from mdi_mpi.pipeline import Recorder, run_first, run_worker
from mdi_mpi.requests import Request
from mdi_mpi.ring import HEAD, STOP, WORK, Packet, signal_packet
from mdi_mpi.sampling import SamplingParams
from mdi_mpi.stage import Stage
from mdi_mpi.stats import FIELDS
from mdi_mpi.transport import Comm, Ring

CONFIG = ModelConfig.from_dict(dict(
    model_type="llama", vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, eos_token_id=2,
))
MAX_SEQ = 96


def full_model() -> Stage:
    torch.manual_seed(0)
    stage = Stage(CONFIG, range(CONFIG.n_layers), edges=True)
    for p in stage.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return stage.requires_grad_(False)


def my_stage(full: Stage, rank: int, size: int) -> Stage:
    """This rank's pruned copy of ``full``: layers split evenly, rank 0 with the edges."""
    per = CONFIG.n_layers // size
    stage = Stage(CONFIG, range(rank * per, (rank + 1) * per), edges=rank == 0)
    stage.load_state_dict({k: v for k, v in full.state_dict().items() if k in stage.state_dict()}, strict=True)
    return stage


def requests(n: int, temperature: float = 0.0) -> list[Request]:
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        prompt = torch.randint(3, CONFIG.vocab_size, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)
        params = SamplingParams(max_new_tokens=int(torch.randint(1, 12, (1,), generator=g)), temperature=temperature)
        out.append(Request(str(i), i, None, prompt.tolist(), params))
    return out


def reference(reqs: list[Request]) -> dict[str, list[int]]:
    full = full_model()
    full.setup_cache(1, MAX_SEQ)
    full.choose_kernels(cache=default_cache())
    sched = scheduler(reqs, 1, MAX_SEQ, 1000, CONFIG.eos_token_ids)
    return {r.id: r.tokens for r in run_one_process(full, sched)}


def run_ring(comm: Comm, reqs, n_slots: int, micro_batch: int, prefill_chunk: int = 8) -> dict[str, list[int]] | None:
    rank, size = comm.rank, comm.size
    stage = my_stage(full_model(), rank, size)
    stage.setup_cache(n_slots, MAX_SEQ)
    stage.choose_kernels(cache=default_cache())
    groups = slot_groups(n_slots, micro_batch)
    ring = Ring(comm, len(groups), micro_batch, micro_batch * prefill_chunk, CONFIG.hidden_size, torch.float32)
    if rank == 0:
        sched = scheduler(reqs, n_slots, MAX_SEQ, prefill_chunk, CONFIG.eos_token_ids)
        run_first(stage, sched, ring, groups, Recorder())
        assert sched.done
        return {r.id: r.tokens for r in sched.listener.results}
    run_worker(stage, ring, Recorder())
    return None


def test_transport_round_trip(comm):
    rank, n_stats = comm.rank, len(FIELDS)
    ring = Ring(comm, 2, 3, 10, 16, torch.bfloat16)
    rows = torch.arange(5 * 16, dtype=torch.float32).view(5, 16).to(torch.bfloat16)
    ring.stats[rank] = [rank * 10 + k for k in range(n_stats)]  # this rank's running stats, carried in the headers
    if rank == 0:
        ring.send(Packet(WORK, 1, Batch.make([2, 0], [7, 0], [1, 4], [True, False]), [1], rows))
        back = ring.recv()
        assert ring.stats.tolist() == [[r * 10 + k for k in range(n_stats)] for r in range(comm.size)]
        b = back.batch
        assert (back.kind, back.group, b.slots, b.starts, b.lengths, back.sampled_segs) == (1, 1, (2, 0), (7, 0), (1, 4), [1])
        assert b.long == (True, False)
        assert torch.equal(back.rows, rows * 2)
        ring.release(back)
        ring.send(signal_packet(STOP))
        assert ring.recv().kind == STOP
    else:
        msg = ring.recv()
        assert msg.rows.dtype == torch.bfloat16 and msg.rows.shape == (5, 16)
        ring.send(Packet(WORK, msg.group, msg.batch, msg.sampled_segs, msg.rows * 2))
        ring.release(msg)
        assert ring.recv().kind == STOP
        ring.send(signal_packet(STOP))
    ring.close()
    # header int64s (6 fixed, one stats row per rank, and for up to 3 segments 5 each and 3 for each of
    # the 2 KV copies a segment may bring) plus 2 bytes per value
    assert ring.bytes_sent == 2 * 8 * (6 + n_stats * comm.size + 5 * 3 + 3 * 2 * 3) + 5 * 16 * 2


def test_peers_share_ids_and_rows_combine_in_tree_order_and_gather_logits(comm):
    peers = comm.peers(2, 8, 4, torch.bfloat16, timeout_s=30)
    rows = torch.arange(12, dtype=torch.float32).view(3, 4).to(torch.bfloat16)
    ids = torch.tensor([5, 9, 2])
    if comm.rank == 0:
        peers.share(Packet(WORK, 1, Batch.make([1], [4], [3]), [0], copies=(), ids=ids))
        peers.share(Packet(HEAD, 0, rows=rows))
    else:
        got = peers.receive()
        assert (got.kind, got.group, got.batch.slots, got.batch.starts, got.rows) == (WORK, 1, (1,), (4,), None)
        assert got.ids.tolist() == [5, 9, 2]
        got = peers.receive()
        assert got.kind == HEAD and torch.equal(got.rows, rows) and got.ids is None
    partial = torch.full((2, 4), 1.0 + comm.rank * 2.0**-24)  # the second rank's share rounds away unless added first
    total = peers.combine(partial)
    assert torch.equal(total, tree_sum([torch.full((2, 4), 1.0 + r * 2.0**-24) for r in range(comm.size)]))
    logits = peers.gather_logits(torch.full((2, 3), float(comm.rank)))
    if comm.rank == 0:
        assert logits.tolist() == [[float(r) for r in range(comm.size) for _ in range(3)]] * 2
    else:
        assert logits is None


def test_transport_refuses_oversized_message(comm):
    ring = Ring(comm, 1, 1, 2, 8, torch.float32)
    if comm.rank == 0:
        with pytest.raises(RuntimeError, match="exceeds the buffer"):
            ring.send(Packet(WORK, 0, Batch.make([0], [0], [3]), [0], torch.zeros(3, 8)))
    ring.close()


def test_a_receive_that_never_comes_times_out(comm):
    ring = Ring(comm, 1, 1, 1, 8, torch.float32, timeout_s=0.3, hosts=comm.hosts())
    if comm.rank == 0:
        with pytest.raises(TimeoutError, match=f"no message from rank 1 on {socket.gethostname()} for 0.3 s"):
            ring.recv()
    comm.barrier()
    ring.close()


def test_agree_raises_on_every_rank_naming_the_rank(comm):
    from mdi_mpi.errors import AgreedError, UserError

    def fail_on_last() -> int:
        if comm.rank == comm.size - 1:
            raise UserError("bad input")
        return comm.rank

    with pytest.raises(AgreedError, match=f"rank {comm.size - 1}: bad input"):
        comm.agree(fail_on_last)
    assert comm.agree(lambda: comm.rank) == comm.rank


def test_split_gives_a_group_communicator(comm):
    """A stage held by a group of ranks talks within its group (here: one group per rank parity)."""
    group = comm.split(comm.rank % 2)
    assert group.size == len(range(comm.rank % 2, comm.size, 2))
    assert group.allgather(comm.rank) == list(range(comm.rank % 2, comm.size, 2))
    group.mpi.Free()


@pytest.mark.parametrize("n_slots, micro_batch", [(1, 1), (2, 1), (2, 2), (5, 1), (5, 2), (5, 3)])
def test_ring_greedy_equals_single_process(comm, n_slots, micro_batch):
    reqs = requests(9)
    got = run_ring(comm, reqs, n_slots, micro_batch)
    if comm.rank == 0:
        assert got == reference(reqs)
        eos = set(CONFIG.eos_token_ids)  # a sequence is cut short only by its EOS token
        assert len(got) == 9
        assert all(len(got[r.id]) == r.params.max_new_tokens or got[r.id][-1] in eos for r in reqs)


def test_ring_sampled_is_schedule_independent(comm):
    reqs = requests(7, temperature=1.0)
    a = run_ring(comm, reqs, 5, 2, prefill_chunk=4)
    b = run_ring(comm, reqs, 2, 1, prefill_chunk=16)
    if comm.rank == 0:
        assert a == b == reference(reqs)


def test_slot_refill_with_long_and_short_requests(comm):
    # One slot per group, requests of very different lengths: slots are reused many times.
    reqs = requests(12)
    for r, n in zip(reqs, [1, 11, 2, 9, 1, 1, 7, 3, 11, 1, 5, 2]):
        r.params = SamplingParams(max_new_tokens=n)
    got = run_ring(comm, reqs, 2, 1)
    if comm.rank == 0:
        eos = set(CONFIG.eos_token_ids)
        assert all(len(got[str(i)]) == n or got[str(i)][-1] in eos for i, n in enumerate([1, 11, 2, 9, 1, 1, 7, 3, 11, 1, 5, 2]))
        assert got == reference(reqs)


def test_stop_with_fewer_requests_than_groups(comm):
    reqs = requests(1)
    got = run_ring(comm, reqs, 4, 1)
    if comm.rank == 0:
        assert got == reference(reqs)


def test_per_token_path_pickles_nothing(comm):
    import pickle

    from mpi4py import MPI

    calls = []

    def dumps(obj, *args):
        calls.append("dumps")
        return pickle.dumps(obj, *args)

    def loads(data, *args):
        calls.append("loads")
        return pickle.loads(data, *args)

    comm.barrier()
    MPI.pickle.__init__(dumps, loads)
    try:
        comm.bcast("the counter works", root=0)
        assert calls, "the counting pickler is not in use"
        calls.clear()
        got = run_ring(comm, requests(5), 3, 1)
        assert calls == [], f"the pipeline pickled: {calls}"
    finally:
        MPI.pickle.__init__(pickle.dumps, pickle.loads)
    if comm.rank == 0:
        assert len(got) == 5
