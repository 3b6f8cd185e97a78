"""Memory-aware plans, per-rank shards, and the start-up checks that use them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.launch import run_cli

from mdi_mpi.config import ModelConfig
from mdi_mpi.demo import TINYLLAMA_CONFIG
from mdi_mpi.errors import UserError
from mdi_mpi.layout import check_fit, make_plan, pick_dtype, suggestion
from mdi_mpi.partition import parse_bytes

TINYLLAMA = ModelConfig.from_dict({**TINYLLAMA_CONFIG, "model_type": "llama"})
KW = dict(n_slots=3, max_seq_len=2048, micro_batch=1, prefill_chunk=128)
GIB = 2**30


def counts(plan):
    return [len(r) for r in plan.layers]


def test_predicted_memory_adds_up():
    plan = make_plan(TINYLLAMA, 3, torch.bfloat16, **KW)
    assert counts(plan) == [6, 8, 8]
    m0, m1 = plan.memory[0], plan.memory[1]
    layer = TINYLLAMA.layer_param_count() * 2
    assert m1["weight_bytes"] == 8 * layer
    assert m0["weight_bytes"] == 6 * layer + TINYLLAMA.edge_param_count() * 2
    assert m1["kv_cache_bytes"] == 3 * 2048 * 8 * 2 * 4 * 64 * 2
    assert all(m["peak_bytes"] > m["weight_bytes"] + m["kv_cache_bytes"] for m in plan.memory)


# Qwen3-30B-A3B's config.json, as far as the plan needs it
QWEN3_30B_A3B = ModelConfig.from_dict(dict(
    model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
    num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960, tie_word_embeddings=False))


@pytest.mark.parametrize("name", ["qwen3-moe", "mixtral-window", "qwen2-moe", "olmoe", "gpt-oss"])
def test_plan_counts_every_expert_of_a_stage(models, name):
    from mdi_mpi.checkpoint import Checkpoint, load_stage
    from mdi_mpi.partition import stage_memory
    from mdi_mpi.quant import Quant

    ckpt = Checkpoint(models[name])
    for layers, edges in ((range(0, 2), True), (range(2, 4), False)):
        predicted = stage_memory(ckpt.config, layers, edges, 4, 1, 64, 1, 16, 2)["weight_bytes"]
        assert predicted == load_stage(ckpt, layers, edges, torch.float32).weight_bytes()
        predicted = stage_memory(ckpt.config, layers, edges, 2, 1, 64, 1, 16, 2, Quant("int8"))["weight_bytes"]
        held = load_stage(ckpt, layers, edges, torch.bfloat16, Quant("int8")).weight_bytes()
        assert 0.85 < predicted / held <= 1.0  # per-row scales and the routers, unquantized, are the difference


def test_qwen3_30b_a3b_on_four_8gb_nodes():
    """All 128 experts of every layer count: bf16 (~57 GiB) needs 9 nodes of 8 GiB, int8 5, and
    int4 fits 4 (3 would do)."""
    from mdi_mpi.quant import Quant

    kw = dict(n_slots=4, max_seq_len=2048, micro_batch=1, prefill_chunk=128)
    bf16 = make_plan(QWEN3_30B_A3B, 4, torch.bfloat16, **kw)
    assert 55 * GIB < sum(m["weight_bytes"] for m in bf16.memory) < 60 * GIB
    assert suggestion(QWEN3_30B_A3B, torch.bfloat16, 8 * GIB, **kw) == "9 ranks of this size would fit"
    assert suggestion(QWEN3_30B_A3B, torch.bfloat16, 8 * GIB, quant=Quant("int8"), **kw) == "5 ranks of this size would fit"
    assert suggestion(QWEN3_30B_A3B, torch.bfloat16, 8 * GIB, 4, **kw) == \
        "9 ranks of this size would fit; with --quant int4, 3 ranks would"  # what a 4-node cluster can do
    int4 = make_plan(QWEN3_30B_A3B, 4, torch.bfloat16, quant=Quant("int4"), available=[8 * GIB] * 4, **kw)
    check_fit(int4)
    assert max(m["peak_bytes"] for m in int4.memory) < 5.5 * GIB


def test_memory_balance_follows_rank_memory():
    plan = make_plan(TINYLLAMA, 3, torch.bfloat16, available=[4 * GIB, 1 * GIB, 1 * GIB], balance="memory", **KW)
    assert counts(plan)[0] > counts(plan)[1] and sum(counts(plan)) == 22
    check_fit(plan)  # a split in proportion to memory fits where the even one does not
    even = make_plan(TINYLLAMA, 3, torch.bfloat16, available=[4 * GIB, 1 * GIB, 1 * GIB], **KW)
    with pytest.raises(UserError, match="rank 1 .* needs about"):
        check_fit(even)


def test_speed_balance_and_explicit_split_wins():
    fast_first = make_plan(TINYLLAMA, 2, torch.bfloat16, balance="speed", speeds=[3.0, 1.0], **KW)
    assert counts(fast_first)[0] > counts(fast_first)[1]
    explicit = make_plan(TINYLLAMA, 2, torch.bfloat16, split=[2, 20], balance="speed", speeds=[3.0, 1.0], **KW)
    assert counts(explicit) == [2, 20]


def test_suggestions():
    assert suggestion(TINYLLAMA, torch.bfloat16, int(1.2 * GIB), **KW) == "4 ranks of this size would fit"
    assert "with --dtype bfloat16" in suggestion(TINYLLAMA, torch.float32, int(1.2 * GIB), **KW)
    assert parse_bytes("1.5GiB") == int(1.5 * GIB) and parse_bytes("512M") == 512 * 2**20


def _plan_cli(*args):
    return subprocess.run([sys.executable, "-m", "mdi_mpi.plan", *args], capture_output=True, text=True)


@pytest.mark.subprocess
def test_plan_cli_refuses_and_accepts(random_dir):
    m = ("--model", str(random_dir))
    bad = _plan_cli(*m, "--ranks", "2", "--mem-per-rank", "200MiB")
    assert bad.returncode == 2 and "needs about" in bad.stderr and "DOES NOT FIT" in bad.stdout
    good = _plan_cli(*m, "--ranks", "3", "--mem-per-rank", "1GiB", "--slots", "6")
    assert good.returncode == 0, good.stderr
    assert good.stdout.count(" ok") == 3 and "0-2" in good.stdout
    mixed = _plan_cli(*m, "--ranks", "3", "--mem", "2GiB,1GiB", "--balance", "memory")
    assert mixed.returncode == 2 and "2 sizes for 3 ranks" in mixed.stderr


@pytest.mark.mpi
def test_generate_refuses_a_plan_that_does_not_fit(demo_dir):
    res = run_cli(["--prompt", "x", "--mem-per-rank", "300MiB"], ranks=2)
    assert res.returncode == 2 and res.stderr.count("needs about") == 1, res.stderr


@pytest.mark.timeout(300)
@pytest.mark.mpi
def test_split_checkpoint_gives_the_same_tokens(models, tmp_path):
    model = models["llama-gqa-llama3"]
    shards = tmp_path / "shards"
    res = subprocess.run([sys.executable, "-m", "mdi_mpi.split", "--model", str(model), "--ranks", "3",
                          "--out", str(shards), "--dtype", "float32"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    split = json.loads((shards / "mdi_split.json").read_text())
    assert split["ranks"] == 3 and [b - a for a, b in split["layers"]] == [1, 1, 2]
    # Each shard holds only its rank's tensors.
    from mdi_mpi.checkpoint import Checkpoint

    names = set(Checkpoint(shards / "rank-1").files)
    assert names and all(n.startswith("model.layers.1.") for n in names)
    assert "lm_head.weight" in Checkpoint(shards / "rank-0").files
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "input_ids": list(range(3, 3 + 4 * i + 1))}) + "\n" for i in range(4)))
    out = {}
    for name, path, ranks in (("full", model, 1), ("split", shards, 3)):
        o = tmp_path / f"{name}.jsonl"
        r = run_cli(["--model", str(path), "--dtype", "float32", "--prompts-file", str(prompts),
                     "--max-new-tokens", "10", "--output", str(o), "--quiet"], ranks=ranks)
        assert r.returncode == 0, r.stderr
        out[name] = {rec["id"]: rec["tokens"] for rec in map(json.loads, o.read_text().splitlines())}
    assert out["split"] == out["full"]
    wrong = run_cli(["--model", str(shards), "--prompts-file", str(prompts)], ranks=2)
    assert wrong.returncode == 2 and "split for 3 ranks, but the job has 2" in wrong.stderr
    conflict = run_cli(["--model", str(shards), "--prompts-file", str(prompts), "--layers", "2,1,1"], ranks=3)
    assert conflict.returncode == 2 and "--layers 2,1,1 does not match the split's layers 1,1,2" in conflict.stderr
    assert conflict.stderr.count("error:") == 1 and "Traceback" not in conflict.stderr
    again = subprocess.run([sys.executable, "-m", "mdi_mpi.split", "--model", str(model), "--ranks", "3",
                            "--out", str(shards)], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr


@pytest.mark.timeout(180)
@pytest.mark.mpi
def test_balance_speed_follows_the_ranks_measured_speeds(models, tmp_path):
    """Each rank's layer speed is faked from outside the product (tests/inject/sitecustomize.py): the
    faster rank gets more layers, and the tokens equal those of the same split given by --layers."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"input_ids": [5, 6, 7]}) + "\n")
    inject = str(Path(__file__).parent / "inject")

    def run(*flags: str, speeds: str = "1,1") -> tuple[list[int], list[int]]:
        stats, out = tmp_path / "stats.json", tmp_path / "out.jsonl"
        out.unlink(missing_ok=True)
        res = run_cli(["--model", str(models["llama-tied"]), "--prompts-file", str(prompts), "--max-new-tokens", "6",
                       "--stats-json", str(stats), "--output", str(out), "--quiet", *flags], ranks=2,
                      env={"PYTHONPATH": inject, "MDI_TEST_SPEED": speeds})
        assert res.returncode == 0, res.stderr
        layers = [b - a for a, b in (r["layers"] for r in json.loads(stats.read_text())["per_rank"])]
        return layers, json.loads(out.read_text())["tokens"]

    fast_first, tokens = run("--balance", "speed", speeds="5,1")
    slow_first, _ = run("--balance", "speed", speeds="1,5")
    assert fast_first[0] > fast_first[1] and slow_first[0] < slow_first[1], (fast_first, slow_first)
    control, control_tokens = run("--layers", ",".join(map(str, fast_first)), speeds="1,5")  # --layers wins
    assert control == fast_first and control_tokens == tokens


@pytest.mark.parametrize(
    "bf16_ms, fp32_ms, fp32_fits, picked",
    [
        (1.0, 1.9, True, torch.bfloat16),  # native bf16: half the bytes, faster
        (2.6, 1.9, True, torch.float32),  # bf16 converts in software: float32 is 1.37x faster and fits
        (2.6, 1.9, False, torch.bfloat16),  # ... but not when float32 does not fit
        (2.2, 1.9, True, torch.bfloat16),  # 1.16x faster is not worth twice the memory
    ],
)
def test_pick_dtype(bf16_ms, fp32_ms, fp32_fits, picked):
    dtype, why = pick_dtype({"bfloat16": bf16_ms, "float32": fp32_ms}, fp32_fits)
    assert dtype == picked
    assert why.startswith(str(picked).removeprefix("torch.")) and f"{bf16_ms:.2f} ms" in why
    assert ("does not fit" in why) == (not fp32_fits and bf16_ms >= 1.25 * fp32_ms)


@pytest.mark.parametrize("tool", ["plan", "split"])
@pytest.mark.subprocess
def test_zero_counts_are_refused_not_ignored(tool, random_dir, tmp_path):
    """--slots 0 used to be silently replaced by the default in plan and split."""
    extra = ["--out", str(tmp_path / "s")] if tool == "split" else []
    res = subprocess.run([sys.executable, "-m", f"mdi_mpi.{tool}", "--model", str(random_dir), "--ranks", "2",
                          "--slots", "0", *extra], capture_output=True, text=True)
    assert res.returncode == 2 and "argument --slots: must be at least 1, got 0" in res.stderr, res.stderr
    assert not (tmp_path / "s").exists()
