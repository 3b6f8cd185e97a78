"""A token's result must not depend on the other tokens in its forward call, whichever kernels the
machine picks (or the user forces), and the choice itself follows the measurements."""

from __future__ import annotations

import pytest
import torch
from support.stages import full_stage

from mdi_mpi.config import ModelConfig
from mdi_mpi.kernels import ROWS, Choice, ShapeKernels, choose_kernels, cover, families_of, probe, select
from mdi_mpi.kv_cache import Batch
from mdi_mpi.model import SparseMoE, linear, pick_kernels


def _weights(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1536, 1024, generator=g).to(dtype)
    b = torch.randn(1536, generator=g).to(dtype)
    x = torch.randn(40, 1024, generator=g).to(dtype)
    return w, b, x


def _check_rows_independent(k: ShapeKernels, w, b, x) -> None:
    alone = torch.cat([linear(x[i : i + 1], w, b, 1, k) for i in range(40)])
    for m in (2, 3, 8, 9, 17, 40):
        assert torch.equal(linear(x[:m], w, b, m, k), alone[:m]), m
    # Prompt rows use their own kernels, wherever they stand in the call.
    prompt = linear(x[5:30], w, b, 0, k)
    assert torch.equal(linear(x[:30], w, b, 5, k), torch.cat([alone[:5], prompt]))
    assert torch.equal(linear(x[3:30], w, b, 2, k)[2:], prompt)
    assert torch.equal(torch.cat([linear(x[5:21], w, b, 0, k), linear(x[21:30], w, b, 0, k)]), prompt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chosen_kernels_keep_rows_independent(dtype, tmp_path):
    w, b, x = _weights(dtype)
    sel, (k,) = choose_kernels([(w, b, False)], None, tmp_path / "kernels.json")
    assert sel.measured == 1 and sel.cached == 0
    _check_rows_independent(k, w, b, x)
    # A second start-up reads the cache and makes the same choice.
    sel2, (k2,) = choose_kernels([(w, b, False)], None, tmp_path / "kernels.json")
    assert (sel2.measured, sel2.cached) == (0, 1) and k2.describe() == k.describe()


@pytest.mark.parametrize("forced", sorted(ROWS))
def test_each_forced_kernel_keeps_rows_independent(forced, tmp_path):
    w, b, x = _weights(torch.bfloat16)
    outs = probe(w, b, [forced])
    if outs[forced] is None:
        pytest.skip(f"{forced}: rows depend on their place in the tile on this CPU (refused when forced)")
    _, (k,) = choose_kernels([(w, b, False)], forced, tmp_path / "kernels.json")
    assert k.decode.family == k.prefill.family == (forced,)
    _check_rows_independent(k, w, b, x)


def test_families_group_kernels_by_their_bits():
    w, b, _ = _weights(torch.float32)
    outs = probe(w, b, ROWS)
    fams = families_of(outs)
    for fam in fams:  # members agree with each other, and with no member of another family
        assert all(torch.equal(outs[fam[0]], outs[k]) for k in fam)
    for f1 in fams:
        for f2 in fams:
            if f1 != f2:
                assert not torch.equal(outs[f1[0]], outs[f2[0]])
    assert sorted(k for f in fams for k in f) == sorted(k for k, y in outs.items() if y is not None)


@pytest.mark.parametrize(
    "times, m, plan",
    [
        ({"row": 1.0, "tile8": 2.0}, 1, ("row",)),
        ({"row": 1.0, "tile8": 2.0}, 3, ("tile8",)),  # 3 rows: one padded tile beats three calls
        ({"row": 1.0, "tile8": 2.0}, 9, ("tile8", "row")),
        ({"row": 1.0, "tile2": 0.9, "tile8": 2.0}, 1, ("tile2",)),  # a lone row rides in a tile of 2
        ({"tile16": 1.5, "tile64": 3.8}, 16, ("tile16",)),  # 16 prompt rows do not pay for 64
        ({"tile16": 1.5, "tile64": 3.8}, 80, ("tile64", "tile16")),
        ({"mv": 5.0}, 4, ("mv",) * 4),
    ],
)
def test_cover_is_the_cheapest(times, m, plan):
    assert cover(times, m) == plan


@pytest.mark.parametrize(
    "times, pick",
    [
        # Native bf16 (AVX512-BF16): mv agrees with the tiles, and a tile of 2 beats any one-row kernel.
        ({"mv": 1.6, "tile2": 1.0, "tile8": 1.2, "row": 1.05}, ("mv", "tile2", "tile8")),
        # Capped at AVX512_CORE: one-row kernels are fast, tiles slow and in another family.
        ({"mv": 0.6, "tile2": 2.4, "tile8": 4.0, "row": 0.5}, ("row",)),
    ],
)
def test_selection_follows_the_timings(times, pick):
    families = [("mv", "tile2", "tile8"), ("row",)]
    assert select(families, times, (1, 2, 4, 8)) == pick


def test_the_choice_changes_when_the_faster_kernel_changes(tmp_path, monkeypatch):
    """Faked timings: whichever family is faster is chosen, and the rows stay independent."""
    import mdi_mpi.kernels as kernels

    w, b, x = _weights(torch.float32)  # on x86, one-row kernels and tiles differ in float32
    fams = families_of(probe(w, b, ROWS))
    if len(fams) < 2:
        pytest.skip("every kernel gives the same bits on this CPU: nothing to choose between")
    picks = []
    for fast in (fams[0], fams[1]):
        monkeypatch.setattr(kernels, "measure", lambda w, b, names, fast=fast: {n: 0.1 if n in fast else 9.0 for n in names})
        _, (k,) = choose_kernels([(w, b, False)], None, None)
        assert set(k.decode.family) <= set(fast) and set(k.prefill.family) <= set(fast)
        _check_rows_independent(k, w, b, x)
        picks.append(k.decode.family)
    assert picks[0] != picks[1]


def test_a_position_dependent_forced_kernel_is_refused(tmp_path, monkeypatch):
    import mdi_mpi.kernels as kernels
    from mdi_mpi.errors import UserError

    w, b, _ = _weights(torch.bfloat16)
    real = kernels.probe
    monkeypatch.setattr(kernels, "probe", lambda w, b, names, **kw: {**real(w, b, names, **kw), "tile8": None})
    with pytest.raises(UserError, match="tile8"):
        choose_kernels([(w, b, False)], "tile8", tmp_path / "kernels.json")


def test_choice_apply_matches_its_plan():
    w, b, x = _weights(torch.bfloat16)
    c = Choice({"row": 1.0, "tile8": 2.0})
    assert torch.equal(c.apply(x[:9], w, b), torch.cat([c.apply(x[:8], w, b), c.apply(x[8:9], w, b)]))


@pytest.mark.parametrize("name", ["qwen2", "qwen3-moe", "qwen2-moe", "gpt-oss"])
def test_stage_logits_are_bitwise_independent_of_batch_companions(models, name):
    stage = full_stage(models[name], dtype=torch.bfloat16, n_slots=6)
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


def _moe_block(dtype: torch.dtype, forced: str | None, cache) -> SparseMoE:
    """A qwen2_moe block (8 experts, top-2, a shared expert) of real-ish widths, random weights."""
    config = ModelConfig.from_dict(dict(
        model_type="qwen2_moe", vocab_size=8, hidden_size=512, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
        shared_expert_intermediate_size=128))
    block = SparseMoE(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    block = block.to(dtype).requires_grad_(False)
    pick_kernels(block, forced, cache)
    return block


@pytest.mark.parametrize("forced", [None, "row", "tile8"])
def test_moe_rows_do_not_depend_on_who_shares_their_experts(forced, tmp_path):
    """A row's output is the same bits alone, among 40 rows (many of which chose its experts), and
    as a prompt row in calls of other sizes; and it is the weighted sum of its top-k experts."""
    block = _moe_block(torch.bfloat16, forced, tmp_path / "kernels.json")
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.inference_mode():
        alone = torch.cat([block(x[i : i + 1], 1) for i in range(40)])
        counts = torch.bincount(block.route(x, 40)[0].flatten(), minlength=8)
        assert (counts > 2).sum() >= 4  # experts shared by many rows
        for m in (2, 7, 40):
            assert torch.equal(block(x[:m], m), alone[:m]), m
        prompt = block(x[5:30], 0)
        assert torch.equal(block(x[:30], 5), torch.cat([alone[:5], prompt]))
        assert torch.equal(torch.cat([block(x[5:21], 0), block(x[21:30], 0)]), prompt)
        # Against a dense reference in float64: every expert on every row, weighted by the routing.
        chosen, weights = block.route(x, 40)
        e = block.experts
        x64 = x.double()
        h = torch.einsum("td,eid->tei", x64, e.gate_up_proj.double())
        gate, up = h.chunk(2, dim=-1)
        y = torch.einsum("tei,edi->ted", torch.nn.functional.silu(gate) * up, e.down_proj.double())  # [T, E, D]
        ref = (y.gather(1, chosen[..., None].expand(-1, -1, 512)) * weights.double()[..., None]).sum(1)
        s = block.shared_expert
        shared = (torch.nn.functional.silu(x64 @ s.gate_proj.weight.double().t()) * (x64 @ s.up_proj.weight.double().t())) @ s.down_proj.weight.double().t()
        ref = ref + torch.sigmoid(x64 @ block.shared_expert_gate.weight.double().t()) * shared
    torch.testing.assert_close(alone.double(), ref, atol=0.02 * ref.abs().max().item(), rtol=0)


def test_a_bias_is_added_after_the_kernels():
    """bf16 ``addmv`` with a fused bias rounds differently from ``F.linear``'s in rows too rare for
    the start-up probe to see (on AVX2, 64x64 weights); ``linear`` adds the bias after a bias-free
    kernel, so every member of a family gives the same bits on many rows."""
    g = torch.Generator().manual_seed(3)
    w, b = (torch.randn(64, 64, generator=g) * 0.1).bfloat16(), (torch.randn(64, generator=g) * 0.1).bfloat16()
    x = torch.randn(512, 64, generator=g).bfloat16()
    for fam in families_of(probe(w, None, ROWS)):
        outs = [linear(x, w, b, 512, ShapeKernels(Choice({k: 1.0}), Choice({k: 1.0}))) for k in fam]
        assert all(torch.equal(o, outs[0]) for o in outs[1:]), fam


@pytest.mark.parametrize("shape", [(256, 768), (768, 256), (64, 160), (2048, 256)])
def test_every_family_the_probe_forms_agrees_on_many_rows(shape):
    """Kernels that sum in another order can disagree in rare rows only (on an AVX-512 BF16 Xeon,
    F.linear's 64- and 128-row tiles against its one-row call on a bf16 [256, 768] weight: 1 row in
    256): the start-up probe (heavy-tailed rows, as many as the weight's size allows) must keep them
    in separate families, or tokens change with the rows that share a call."""
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(*shape, generator=g) * 0.05).bfloat16()
    x = (torch.randn(1024, shape[1], generator=g) * torch.exp(2 * torch.randn(1024, shape[1], generator=g))).bfloat16()
    for fam in families_of(probe(w, None, ROWS)):
        outs = [linear(x, w, None, 1024, ShapeKernels(Choice({k: 1.0}), Choice({k: 1.0}))) for k in fam]
        assert all(torch.equal(o, outs[0]) for o in outs[1:]), fam
