"""The prefix cache: its bookkeeping as table tests, then through the real scheduler and pipeline,
where a request must give the same tokens, and the same log-probabilities bit for bit, with the
cache as without it."""

from __future__ import annotations

import pytest
import torch
from support.stages import full_stage, run_one_process, scheduler

from mdi_mpi.kv_cache import KVCache
from mdi_mpi.prefix_cache import Copy, Entry, Placement, PrefixCache
from mdi_mpi.requests import Request
from mdi_mpi.sampling import SamplingParams

C = 8  # the prefill chunk, and so the block, of the scheduler tests


def holding(n_slots: int, cache_slots: int, held: dict[int, tuple[list[int], int]], block: int = 4) -> PrefixCache:
    """A cache whose slot s holds held[s] = (tokens, n); entries are used in slot order."""
    cache = PrefixCache(n_slots, cache_slots, block)
    for s, (tokens, n) in held.items():
        cache.entries[s] = Entry(tokens, n, used=s + 1)
    return cache


TWELVE = list(range(12))


@pytest.mark.parametrize("ids, long, expected", [
    (TWELVE + [99], False, 12),  # all it holds
    (TWELVE[:6] + [50] * 7, False, 4),  # whole blocks only: the 5th and 6th tokens match but do not fill one
    (TWELVE, False, 8),  # the same prompt: its last token is computed again, so its logits are there to sample
    ([1] + TWELVE, False, 0),  # a prefix, not any common run
    (TWELVE + [99], True, 0),  # held with the short factors, wanted with the long ones
    (TWELVE[:3], False, 0),  # shorter than a block
])
def test_shared_counts_whole_blocks_and_leaves_a_token(ids, long, expected):
    assert holding(1, 0, {0: (TWELVE, 12)}).shared(0, ids, long) == expected


@pytest.mark.parametrize("steps, expected", [
    ([(0, 4), (4, 4), (8, 4)], 12),  # whole aligned chunks extend what it holds
    ([(0, 4), (4, 3)], 4),  # a prompt's partial last chunk is not held
    ([(0, 4), (4, 4), (8, 2), (10, 1), (11, 1)], 8),  # nor decode steps
    ([(0, 2), (2, 4)], 0),  # an unaligned chunk: nothing from 0
])
def test_computed_extends_only_by_whole_aligned_chunks(steps, expected):
    cache = PrefixCache(1, 0, 4)
    cache.occupy(0, list(range(20)), 0, False)
    for start, n in steps:
        cache.computed(0, start, n)
    assert cache.entries[0].n == expected


def test_restart_drops_what_the_slot_holds():
    cache = holding(1, 0, {0: (TWELVE, 12)})
    cache.restart(0, long=True)
    assert cache.entries[0].n == 0 and cache.entries[0].long


@pytest.mark.parametrize("n_slots, cache_slots, held, free, expected", [
    # the free slot that holds the prefix is taken, with no copy
    (2, 0, {0: (TWELVE, 12), 1: ([7] * 12, 12)}, [0, 1], Placement(0, 12, ())),
    # held by a busy slot: copied into the least recently used free slot
    (3, 0, {0: (TWELVE, 12), 1: ([7] * 12, 12), 2: ([8] * 12, 12)}, [1, 2], Placement(1, 12, (Copy(0, 1, 12),))),
    # nothing matches: the least recently used free slot
    (3, 0, {0: ([6] * 12, 12), 1: ([7] * 12, 12), 2: ([8] * 12, 12)}, [2, 1], Placement(1, 0, ())),
    # a cache slot: the taken slot's prefix is saved in it first, then the match is copied in
    (2, 1, {0: (TWELVE, 12), 1: ([7] * 12, 12)}, [1], Placement(1, 12, (Copy(1, 2, 12), Copy(0, 1, 12)))),
    # the taken slot's prefix is held whole by another slot: nothing to save
    (2, 1, {0: ([7] * 12, 12), 1: ([7] * 8, 8)}, [1], Placement(1, 0, ())),
    # the match is in the cache slot itself: it is not the one overwritten by the save
    (1, 2, {0: ([7] * 12, 12), 1: (TWELVE, 12), 2: ([9] * 4, 4)}, [0], Placement(0, 12, (Copy(0, 2, 12), Copy(1, 0, 12)))),
])
def test_place(n_slots, cache_slots, held, free, expected):
    cache = holding(n_slots, cache_slots, held)
    assert cache.place(TWELVE + [42], False, free) == expected


def test_apply_records_the_copies():
    cache = holding(2, 1, {0: (TWELVE, 12), 1: ([7] * 12, 12)})
    cache.apply((Copy(1, 2, 12), Copy(0, 1, 8)))
    assert cache.shared(2, [7] * 13, False) == 12 and cache.shared(1, TWELVE + [1], False) == 8


def test_kv_copy_copies_a_prefix_of_positions():
    cache = KVCache(3, 2, 16, 4, torch.float32)
    k, v = torch.randn(10, 2, 4), torch.randn(10, 2, 4)
    cache.update(0, 0, k, v)
    cache.copy(0, 2, 8)
    assert torch.equal(cache.k[2, :, :8], k[:8].transpose(0, 1)) and cache.lengths[2] == 8
    with pytest.raises(RuntimeError, match="holds 10 positions"):
        cache.copy(0, 1, 12)


# -- through the scheduler and the pipeline ---------------------------------------------------------


@pytest.fixture(scope="module")
def stage(models):
    return full_stage(models["llama-gqa-llama3"], n_slots=6, max_seq_len=160)


def request(ident: str, ids: list[int], **params) -> Request:
    p = SamplingParams(**{"max_new_tokens": 10, "logprobs": 0, **params})
    return Request(ident, 0, None, ids, p)


class Conversations:
    """Runs batches of requests one after another through one scheduler (the slots keep their KV
    from batch to batch), with the prefix cache or without it."""

    def __init__(self, stage, n_slots: int, cache_slots: int | None, micro_batch: int | None = None):
        self.stage, self.micro = stage, micro_batch
        self.sched = scheduler([], n_slots, stage.max_seq_len, C, stage.config.eos_token_ids,
                               long_rope_after=stage.config.long_rope_after, cache_slots=cache_slots)
        self.logprobs: dict[str, list[float]] = {}
        listener = self.sched.listener
        listener.token = lambda step: self.logprobs.setdefault(step.request.id, []).append(step.logprob)

    def run(self, requests: list[Request]) -> dict:
        """Each request's result, by id."""
        self.sched.listener.results = []
        self.sched.add(requests)
        return {r.id: r for r in run_one_process(self.stage, self.sched, self.micro)}


def chat(stage, conv: Conversations, turns: int, talkers: list[str], seed: int = 0) -> dict:
    """``talkers`` hold conversations in turns; each turn's prompt is the last prompt, its answer and
    a new question. Returns every result, by id."""
    gen = torch.Generator().manual_seed(seed)
    prompts = {t: torch.randint(3, 300, (11,), generator=gen).tolist() for t in talkers}
    out = {}
    for turn in range(turns):
        batch = [request(f"{t}{turn}", prompts[t], seed=turn, temperature=0.8) for t in talkers]
        results = conv.run(batch)
        out.update(results)
        for t in talkers:
            question = torch.randint(3, 300, (5,), generator=gen).tolist()
            prompts[t] = prompts[t] + results[f"{t}{turn}"].tokens + question
    return out


@pytest.mark.parametrize("n_slots, talkers, cache_slots", [
    (1, ["a"], 0),  # one conversation in one slot
    (2, ["a", "b", "c"], 0),  # more conversations than slots: prefixes are evicted
    (1, ["a", "b"], 2),  # cache slots keep what a running slot must give up
])
def test_conversations_give_the_same_tokens_and_logprobs_with_the_cache(stage, n_slots, talkers, cache_slots):
    cached = chat(stage, Conversations(stage, n_slots, cache_slots), 4, talkers)
    plain = chat(stage, Conversations(stage, n_slots, None), 4, talkers)
    assert {k: r.tokens for k, r in cached.items()} == {k: r.tokens for k, r in plain.items()}
    assert all(r.cached_tokens == 0 for r in plain.values())
    found = sum(r.cached_tokens for r in cached.values())
    assert found > 0 and all(r.cached_tokens % C == 0 for r in cached.values())


def test_logprobs_are_bit_equal_with_the_cache(stage):
    on, off = Conversations(stage, 1, 0), Conversations(stage, 1, None)
    a, b = chat(stage, on, 3, ["a"]), chat(stage, off, 3, ["a"])
    assert on.logprobs == off.logprobs  # floats compared exactly
    assert a["a1"].cached_tokens >= C and a["a2"].cached_tokens > a["a1"].cached_tokens
    assert b["a2"].cached_tokens == 0


def test_cache_slots_keep_a_conversation_that_lost_its_slot(stage):
    with_slots, without = Conversations(stage, 1, 2), Conversations(stage, 1, 0)
    a, b = chat(stage, with_slots, 2, ["a", "b"]), chat(stage, without, 2, ["a", "b"])
    assert a["a1"].cached_tokens > 0 and b["a1"].cached_tokens == 0  # "b" took the one slot in between


def test_a_shared_prefix_is_computed_once_and_copied(stage):
    system = list(range(40, 80))  # 5 blocks
    reqs = [request(str(i), system + [300 + i] * 5) for i in range(6)]
    on = Conversations(stage, 3, 0, micro_batch=1)
    found = on.run(reqs)
    off = Conversations(stage, 3, None, micro_batch=1).run(
        [request(str(i), system + [300 + i] * 5) for i in range(6)])
    assert {k: r.tokens for k, r in found.items()} == {k: r.tokens for k, r in off.items()}
    assert found["0"].cached_tokens == 0
    assert all(found[str(i)].cached_tokens == 40 for i in range(1, 6))  # they waited for it, then copied it


def test_a_request_cancelled_in_its_prefill_leaves_only_what_it_computed(stage):
    prompt = list(range(100, 141))  # 41 tokens: 5 chunks
    sched = scheduler([], 1, stage.max_seq_len, C, stage.config.eos_token_ids, cache_slots=0)
    first = request("cut", prompt)
    sched.add([first])
    for _ in range(2):  # two chunks computed, as the pipeline would
        work = sched.next_work([0])
        stage.copy_kv(work.copies)
        stage.forward_layers(stage.embed(work.ids), work.batch)
    sched.cancel(first)
    assert sched.next_work([0]) is None and sched.listener.results[0].finish_reason == "cancelled"
    sched.listener.results = []
    sched.add([request("again", prompt)])
    again = run_one_process(stage, sched)[0]
    fresh = Conversations(stage, 1, None).run([request("again", prompt)])["again"]
    assert again.cached_tokens == 2 * C and again.tokens == fresh.tokens


def test_longrope_switch_is_part_of_the_match(models):
    stage = full_stage(models["phi3-longrope"], n_slots=1, max_seq_len=256)
    after = stage.config.long_rope_after  # 128: past it, a prompt is rotated with the long factors
    short = list(range(3, 3 + after - 20))
    runs = []
    for cache_slots in (0, None):
        conv = Conversations(stage, 1, cache_slots)
        first = conv.run([request("short", short, max_new_tokens=4)])["short"]
        grown = short + first.tokens + list(range(200, 240))  # past the original context
        runs.append((first, conv.run([request("long", grown, max_new_tokens=4)])["long"]))
    (on_first, on_long), (off_first, off_long) = runs
    assert on_long.tokens == off_long.tokens and on_first.tokens == off_first.tokens
    assert on_long.cached_tokens == 0  # held with the short factors: no match for a long prompt


@pytest.mark.parametrize("variant, quant", [("mistral-window", None), ("gemma2", None), ("qwen3", "int8"),
                                            ("llama-gqa-llama3", "int4")])
def test_windows_softcaps_and_quantized_weights_give_the_same_tokens_with_the_cache(models, variant, quant):
    """Sliding windows shorter than the prompts, gemma2's soft-capped attention, int8 and int4 weights."""
    from mdi_mpi.checkpoint import Checkpoint, load_stage
    from mdi_mpi.quant import Quant

    ckpt = Checkpoint(models[variant])
    st = load_stage(ckpt, range(ckpt.config.n_layers), True, torch.bfloat16 if quant else torch.float32,
                    Quant(quant, 32) if quant else None)
    st.setup_cache(2, 160)
    st.choose_kernels()
    on, off = Conversations(st, 1, 1), Conversations(st, 1, None)
    a, b = chat(st, on, 3, ["a", "b"]), chat(st, off, 3, ["a", "b"])
    assert {k: r.tokens for k, r in a.items()} == {k: r.tokens for k, r in b.items()}
    assert on.logprobs == off.logprobs and sum(r.cached_tokens for r in a.values()) > 0
