"""A token's result must not depend on the other tokens in its forward call."""

from __future__ import annotations

import pytest
import torch
from helpers import full_stage

from mdi_mpi.kv_cache import Batch
from mdi_mpi.model import mv_matches_tiles, tiled_linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_linear_rows_do_not_depend_on_the_batch(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 1024, generator=g).to(dtype)
    b = torch.randn(1536, generator=g).to(dtype)
    x = torch.randn(40, 1024, generator=g).to(dtype)
    mv = mv_matches_tiles(w, b)
    alone = torch.cat([tiled_linear(x[i : i + 1], w, b, 1, mv) for i in range(40)])
    for m in (2, 3, 8, 9, 17, 40):
        assert torch.equal(tiled_linear(x[:m], w, b, m, mv), alone[:m]), m
    # Prompt rows use their own tile shape, wherever they stand in the call.
    prompt = tiled_linear(x[5:30], w, b, 0, mv)
    assert torch.equal(tiled_linear(x[:30], w, b, 5, mv), torch.cat([alone[:5], prompt]))
    assert torch.equal(tiled_linear(x[3:30], w, b, 2, mv)[2:], prompt)


def test_stage_logits_are_bitwise_independent_of_batch_companions(models):
    stage = full_stage(models["qwen2"], dtype=torch.bfloat16, n_slots=6)
    prompts = [torch.arange(3, 3 + n) for n in (5, 9, 1, 14, 3, 7)]
    alone = []
    for s, p in enumerate(prompts):
        stage(p, Batch.make([s], [0], [len(p)]))
        alone.append(stage(torch.tensor([17]), Batch.make([s], [len(p)], [1])))
    # The same decode steps again, all slots in one call, after re-prefilling them in one mixed call.
    lengths = [len(p) for p in prompts]
    order = sorted(range(6), key=lambda s: lengths[s] > 1)
    stage(torch.cat([prompts[s] for s in order]), Batch.make(order, [0] * 6, [lengths[s] for s in order]))
    together = stage(torch.full((6,), 17), Batch.make(list(range(6)), lengths, [1] * 6))
    assert torch.equal(together, torch.cat(alone))
