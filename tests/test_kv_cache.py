"""Slot isolation, slot reuse, chunked prefill and the cache's own checks."""

from __future__ import annotations

import pytest
import torch
from support.stages import full_stage, generate

from mdi_mpi.kv_cache import Batch, KVCache


@pytest.fixture(scope="module")
def stage(models):
    return full_stage(models["llama-gqa-llama3"], n_slots=4)


PROMPTS = [[5, 9, 17, 33, 65], list(range(3, 40)), [7], list(range(100, 120))]


def test_interleaved_slots_equal_each_sequence_alone(stage):
    together = generate(stage, PROMPTS, n_slots=4, prefill_chunk=8, max_new_tokens=16)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(stage, [prompt], n_slots=1, max_new_tokens=16)
        assert together[str(i)] == alone["0"]


def test_reused_slot_is_correct(stage):
    # One slot serves all prompts in turn: each later one reuses a dirty slot.
    reused = generate(stage, PROMPTS[::-1], n_slots=1, max_new_tokens=12)
    fresh = generate(stage, PROMPTS[::-1], n_slots=4, max_new_tokens=12)
    assert reused == fresh


def test_chunked_prefill_is_within_1e5_of_prefill_at_once(stage):
    # Not bit-equal: a chunk's rows go through kernels for their own row count, and attention reduces
    # over the cache plus the chunk instead of one masked block.
    ids = torch.arange(3, 40)
    at_once = stage(ids, Batch.make([0], [0], [37]), all_logits=True)
    chunks = [stage(ids[a:b], Batch.make([1], [a], [b - a]), all_logits=True) for a, b in ((0, 5), (5, 6), (6, 30), (30, 37))]
    assert torch.allclose(torch.cat(chunks), at_once, atol=1e-5)


def test_mixed_batch_of_prefill_and_decode(stage):
    # Slot 2 prefills 6 tokens while slot 3 decodes at position 4: one packed forward.
    a, b = torch.arange(10, 16), torch.arange(20, 25)
    ref_a = stage(a, Batch.make([0], [0], [6]))
    stage(b[:4], Batch.make([1], [0], [4]))
    ref_b = stage(b[4:], Batch.make([1], [4], [1]))
    stage(b[:4], Batch.make([3], [0], [4]))
    both = stage(torch.cat([b[4:], a]), Batch.make([3, 2], [4, 0], [1, 6]))
    assert torch.equal(both, torch.cat([ref_b, ref_a]))


def test_cache_refuses_gaps_and_overflow():
    cache = KVCache(2, 1, 8, 4, torch.float32)
    kv = torch.ones(3, 1, 4)
    cache.update(0, 0, kv, kv)
    with pytest.raises(RuntimeError, match="gap"):
        cache.update(0, 5, kv, kv)
    with pytest.raises(RuntimeError, match="beyond the cache"):
        cache.update(0, 3, torch.ones(6, 1, 4), torch.ones(6, 1, 4))
    assert cache.nbytes() == 2 * 2 * 1 * 8 * 4 * 4


def test_batch_validation():
    with pytest.raises(ValueError):
        Batch.make([0, 0], [0, 1], [1, 1])
    with pytest.raises(ValueError):
        Batch.make([0], [0], [0])
    with pytest.raises(ValueError, match="single-token segments must come first"):
        Batch.make([0, 1], [0, 5], [3, 1])
    b = Batch.make([0, 3, 1], [9, 2, 0], [1, 2, 3])
    assert b.positions.tolist() == [9, 2, 3, 0, 1, 2]
    assert b.last.tolist() == [0, 2, 5]
    assert b.n_single == 1
