"""Tensor-parallel stages (``--tp``): the split itself, in one process (threads stand in for a stage's
ranks, adding their partial products with ``tree_sum`` as ``transport.Peers`` does), and whole jobs
under mpiexec: tokens equal transformers and do not change with the layout, and a failing tensor
rank ends the job."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from support.launch import run_cli
from support.models import build_hf_model
from transformers import AutoModelForCausalLM

from mdi_mpi.checkpoint import Checkpoint, load_stage
from mdi_mpi.config import ModelConfig
from mdi_mpi.errors import UserError
from mdi_mpi.kernels import default_cache
from mdi_mpi.kv_cache import Batch
from mdi_mpi.layout import Link, predict
from mdi_mpi.model import TensorSplit, tree_sum
from mdi_mpi.quant import Quant

# Four KV heads (so up to 4 blocks), and widths whose blocks hold whole int4 groups of 32.
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=4)
TP_VARIANTS = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),  # q, k, v biases: split with their rows
    "qwen3": ("Qwen3Config", dict(head_dim=32, tie_word_embeddings=True)),  # per-head q and k norms
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=5, pad_token_id=0,
                                        layer_types=["sliding_attention", "full_attention"] * 2)),
}


@pytest.fixture(scope="module")
def tp_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tp-models")
    return {name: build_hf_model(root / name, kind, {**SHAPE, **ov}) for name, (kind, ov) in TP_VARIANTS.items()}


@pytest.mark.parametrize("n, order", [(1, "a"), (2, "(a+b)"), (4, "((a+b)+(c+d))"), (3, "(a+(b+c))"),
                                      (8, "(((a+b)+(c+d))+((e+f)+(g+h)))")])
def test_tree_sum_adds_halves_first(n, order):
    class Term(str):
        def __add__(self, other):
            return Term(f"({self}+{other})")

    assert tree_sum([Term(c) for c in "abcdefgh"[:n]]) == order


def test_tree_sum_of_each_ranks_share_is_the_tree_of_all():
    xs = [torch.randn(3, 5, dtype=torch.float32, generator=torch.Generator().manual_seed(i)) * 10 ** i for i in range(8)]
    whole = tree_sum(xs)
    for t in (1, 2, 4, 8):
        shares = [tree_sum(xs[i * 8 // t : (i + 1) * 8 // t]) for i in range(t)]
        assert torch.equal(tree_sum(shares), whole), t
    assert not torch.equal(sum(xs[1:], xs[0]), whole)  # these values do round differently in another order


@pytest.mark.parametrize("tp, parts, needs", [(3, 3, "power of two"), (2, 1, "divides --tp-parts"), (8, 8, "KV heads"),
                                              (4, 4, None), (1, 2, None)])
def test_a_split_must_divide_the_model(tp_models, tp, parts, needs):
    config = Checkpoint(tp_models["llama"]).config
    if needs is None:
        TensorSplit(0, tp, parts).check(config)
    else:
        with pytest.raises(UserError, match=needs):
            TensorSplit(0, tp, parts).check(config)


def test_a_mixture_of_experts_is_not_split(models):
    with pytest.raises(UserError, match="mixture of experts"):
        TensorSplit(0, 2, 2).check(Checkpoint(models["qwen3-moe"]).config)


def _logits(path, split: TensorSplit, dtype, quant, combine=None) -> list[torch.Tensor]:
    """Logits of a 20-token prompt, then of 3 decoded tokens, from this rank's share of the model."""
    stage = load_stage(Checkpoint(path), range(4), True, dtype, quant, split)
    stage.setup_cache(1, 64)
    stage.choose_kernels(cache=default_cache())
    if combine is not None:
        stage.set_combine(combine)
    out = [stage(torch.arange(3, 23), Batch.make([0], [0], [20]), all_logits=True)]
    for pos, token in enumerate((7, 99, 42), start=20):
        out.append(stage(torch.tensor([token]), Batch.make([0], [pos], [1])))
    return out


def _threaded(path, tp: int, parts: int, dtype, quant) -> list[list[torch.Tensor]]:
    """Each of ``tp`` threads holds one share of the model; their partials meet as on a stage's ranks."""
    barrier, slots, results, errors = threading.Barrier(tp), [None] * tp, [None] * tp, []

    def run(i: int) -> None:
        def combine(x: torch.Tensor) -> torch.Tensor:
            slots[i] = x
            barrier.wait()
            total = tree_sum(list(slots))
            barrier.wait()
            return total

        try:
            results[i] = _logits(path, TensorSplit(i, tp, parts), dtype, quant, combine)
        except BaseException as e:  # noqa: BLE001 - reported below, and the others let go
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return results


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(TP_VARIANTS))
@pytest.mark.parametrize("dtype, quant", [(torch.float32, None), (torch.bfloat16, None),
                                          (torch.bfloat16, Quant("int8")), (torch.bfloat16, Quant("int4", 32))])
def test_logits_are_bitwise_the_same_for_any_tp_with_the_same_parts(tp_models, name, dtype, quant):
    one = _logits(tp_models[name], TensorSplit(0, 1, 4), dtype, quant)
    for tp in (2, 4):
        shares = _threaded(tp_models[name], tp, 4, dtype, quant)  # each rank's columns of the vocabulary
        assert all(torch.equal(torch.cat([s[step] for s in shares], dim=-1), one[step]) for step in range(len(one))), tp


@pytest.mark.parametrize("name", list(TP_VARIANTS))
def test_split_logits_match_transformers(tp_models, name):
    hf = AutoModelForCausalLM.from_pretrained(tp_models[name], dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.arange(3, 23)[None]).logits[0]
    shares = _threaded(tp_models[name], 2, 2, torch.float32, None)
    assert (torch.cat([s[0] for s in shares], dim=-1) - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["llama", "qwen3"])  # an LM head of its own, and one tied to the embedding
def test_a_rank_holds_its_share_of_the_weights(tp_models, name):
    """Target 4: each rank of a 2-rank stage holds at most 0.55x of the bytes of a whole one, stage 0's
    embedding and LM head included."""
    ckpt = Checkpoint(tp_models[name])
    for quant in (None, Quant("int8"), Quant("int4", 32)):
        whole = load_stage(ckpt, range(4), True, torch.bfloat16, quant).weight_bytes()
        for i in (0, 1):
            half = load_stage(ckpt, range(4), True, torch.bfloat16, quant, TensorSplit(i, 2, 2)).weight_bytes()
            assert half <= 0.55 * whole, (quant, i, half / whole)


PROMPTS = [[5, 9, 17], list(range(3, 30)), [7], list(range(40, 52)), [100, 3, 4, 5, 6]]


def _run(path, tmp_path, ranks: int, flags: list[str], tag: str) -> dict[str, list[int]]:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "input_ids": p}) + "\n" for i, p in enumerate(PROMPTS)))
    out = tmp_path / f"{tag}.jsonl"
    res = run_cli(["--model", str(path), "--prompts-file", str(prompts), "--output", str(out), "--quiet",
                   "--max-new-tokens", "12", *flags], ranks=ranks, timeout=150)
    assert res.returncode == 0, res.stderr
    return {r["id"]: r["tokens"] for r in map(json.loads, out.read_text().splitlines())}


LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4)]  # (stages, ranks per stage)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["llama", "qwen3"])
@pytest.mark.mpi
def test_sampled_tokens_are_identical_on_every_layout(tp_models, tmp_path, name):
    runs = {}
    for stages, tp in LAYOUTS:
        runs[(stages, tp)] = _run(tp_models[name], tmp_path, stages * tp, [
            "--tp", str(tp), "--tp-parts", "4", "--dtype", "bfloat16", "--temperature", "0.9", "--seed", "5",
            "--n-samples", "2", "--slots", "4", "--prefill-chunk", "6"], f"{stages}-{tp}")
    first = runs[(1, 1)]
    assert len(first) == 2 * len(PROMPTS) and first["p0-0"] != first["p0-1"]
    for layout, tokens in runs.items():
        assert tokens == first, layout


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(TP_VARIANTS))
@pytest.mark.mpi
def test_greedy_tokens_equal_transformers_with_tensor_parallel_stages(tp_models, tmp_path, name):
    hf = AutoModelForCausalLM.from_pretrained(tp_models[name], dtype=torch.float32).eval()
    ref = {}
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            ref[f"p{i}"] = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
    assert _run(tp_models[name], tmp_path, 4, ["--tp", "2", "--dtype", "float32", "--slots", "3"], "greedy") == ref


@pytest.mark.timeout(600)
@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.mpi
def test_quantized_tokens_are_identical_on_every_layout(tp_models, tmp_path, quant):
    flags = ["--quant", quant, "--quant-group", "32", "--tp-parts", "4", "--slots", "2"]
    runs = {tp: _run(tp_models["qwen2"], tmp_path, tp, ["--tp", str(tp), *flags], f"q{tp}") for tp in (1, 2, 4)}
    assert runs[1] == runs[2] == runs[4]


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("flags, message", [(["--tp", "3"], "--tp 3 does not divide the job's 2 ranks"),
                                            (["--tp", "2", "--tp-parts", "8"], "must divide the model's 4 KV heads")])
def test_a_layout_that_does_not_fit_gets_one_message(tp_models, tmp_path, flags, message):
    res = run_cli(["--model", str(tp_models["llama"]), "--prompt", "x", *flags], ranks=2)
    assert res.returncode == 2
    assert res.stderr.count(message) == 1 and "Traceback" not in res.stderr, res.stderr


@pytest.mark.timeout(600)
@pytest.mark.mpi
def test_perplexity_is_bitwise_the_same_on_every_layout(tmp_path):
    """float32 log-likelihoods show any change in how the partial products are added: an all-reduce,
    or a sum in another order on 4 ranks, changes their last bits."""
    from mdi_mpi.demo import RANDOM_CONFIG, build_checkpoint, held_out_text

    model = build_checkpoint(tmp_path / "model", {**RANDOM_CONFIG, "num_hidden_layers": 4, "num_key_value_heads": 4,
                                                  "intermediate_size": 768})
    text = tmp_path / "text.py"
    text.write_text(held_out_text(3000))
    nll = {}
    for stages, tp in LAYOUTS:
        out = tmp_path / f"{stages}-{tp}.json"
        cmd = ["--model", str(model), "--text", str(text), "--dtype", "float32", "--max-seq-len", "128", "--tp", str(tp),
               "--tp-parts", "4", "--json", str(out)]
        res = run_cli(cmd, ranks=stages * tp, timeout=150, module="mdi_mpi.perplexity")
        assert res.returncode == 0, res.stderr
        nll[(stages, tp)] = json.loads(out.read_text())["nll_per_token"]
    assert len(set(nll.values())) == 1, nll


SERVER_PROMPTS = ["def main(", "import os\n", "class Foo:", "for i in range(", "return self.", "if __name__ =="]


@pytest.mark.timeout(300)
@pytest.mark.server
@pytest.mark.mpi
def test_a_server_on_two_stages_of_two_ranks(tmp_path):
    """Continuous batching, cancellation, the dashboard's rows and the drain under --tp 2: the tokens
    are those of one rank with the same --tp-parts."""
    import asyncio

    import httpx
    import openai
    from support.launch import ranks_of
    from support.servers import Server

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in enumerate(SERVER_PROMPTS)))
    out = tmp_path / "one.jsonl"
    res = run_cli(["--prompts-file", str(prompts), "--max-new-tokens", "20", "--tp-parts", "2", "--dtype", "bfloat16",
                   "--output", str(out), "--quiet"])
    assert res.returncode == 0, res.stderr
    one = [json.loads(line) for line in out.read_text().splitlines()]
    one = {SERVER_PROMPTS[int(r["id"])]: r["text"] for r in one}
    server = Server(4, "--tp", "2", "--tp-parts", "2", "--dtype", "bfloat16", "--slots", "3", "--threads", "1",
                    tag=tmp_path.name)
    try:
        async def main() -> list[str]:
            c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)

            async def complete(p: str) -> str:
                r = await c.completions.create(model=server.model, prompt=p, max_tokens=20, temperature=0)
                return r.choices[0].text

            return await asyncio.gather(*(complete(p) for p in SERVER_PROMPTS * 2))  # 12 requests on 3 slots

        assert asyncio.run(main()) == [one[p] for p in SERVER_PROMPTS * 2]
        stream = server.client().completions.create(model=server.model, prompt="while True:", max_tokens=400,
                                                    stream=True, extra_body={"ignore_eos": True})
        for _, _ in zip(range(3), stream):
            pass
        stream.close()
        deadline = time.time() + 5
        while server.metric("mdi_mpi_requests_running") and time.time() < deadline:
            time.sleep(0.05)
        assert server.metric("mdi_mpi_requests_running") == 0
        status = httpx.get(server.url + "/v1/status").json()
        assert [(r["rank"], r["layers"]) for r in status["ranks"]] == [("0-1", [0, 2]), ("2-3", [2, 4])]
        assert server.stop() == 0, "".join(server.stderr)
        deadline = time.time() + 5
        while ranks_of(server.tag) and time.time() < deadline:
            time.sleep(0.1)
        assert not ranks_of(server.tag)
    finally:
        server.kill()


NO_LINK = Link(0.0, float("inf"))


@pytest.mark.parametrize("ranks, tp, streams, link, one_ms, round_ms", [
    # 22 layers of 10 ms; the LM head is 1.49 layers (65.5M parameters against 44.0M): 234.9 ms a token alone
    (1, 1, 1, NO_LINK, 234.9, 234.9),
    (2, 2, 1, NO_LINK, 117.4, 117.4),  # half of every layer and of the head on each rank
    (2, 1, 1, NO_LINK, 234.9, 234.9),  # a pipeline: one stream gets no faster
    (2, 1, 2, NO_LINK, 234.9, 240.0),  # two streams keep both stages busy: 10 layers + head, 12 layers
    (2, 1, 2, Link(1e-3, float("inf")), 236.9, 242.0),  # a hop of 1 ms after each stage
    (4, 4, 8, Link(1e-3, float("inf")), 102.7, 102.7),  # 22 x (2.5 ms + 2 gathers of 1 ms) + a quarter of the head
    # 8 KB gathers of 1 ms, hops of 4 KB (0.5 ms): stages of 10 layers + half the head + hop (77.9 ms), 12 + hop (84.5)
    (4, 2, 8, Link(0.0, 8192 / 1e-3), 77.9 + 84.5, 2 * 84.5),
])
def test_predicted_layout_speed(ranks, tp, streams, link, one_ms, round_ms):
    config = ModelConfig.from_dict(dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                        num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4))
    one, many = predict(config, ranks, tp, 0.010, streams, link)
    assert 1e3 / one == pytest.approx(one_ms, abs=0.1)
    assert 1e3 * streams / many == pytest.approx(round_ms, abs=0.1)


@pytest.mark.subprocess
@pytest.mark.timeout(120)
def test_plan_lists_the_layouts_the_model_allows_and_recommends_one():
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "mdi_mpi.plan", "--ranks", "4", "--layouts", "--streams", "8", "--threads", "1",
                          "--link-latency-ms", "4", "--link-mbit", "50"], capture_output=True, text=True, timeout=100)
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0] + "x" + line.split()[2]: line.split() for line in res.stdout.splitlines() if line.strip()[:1].isdigit()}
    assert set(rows) == {"4x1", "2x2"}  # the demo model's 2 KV heads allow no stage of 4 ranks
    assert all(r[3] == "yes" for r in rows.values())
    # over Wi-Fi, two gathers per layer cost more than they save: the pipeline wins for 8 streams
    assert float(rows["4x1"][5]) > float(rows["2x2"][5])
    assert res.stdout.splitlines()[-1] == "recommended for 8 streams: --tp 1"


@pytest.mark.timeout(300)
@pytest.mark.mpi
def test_split_shards_hold_each_tensor_ranks_slices(tp_models, tmp_path):
    import subprocess
    import sys

    model, shards = tp_models["qwen2"], tmp_path / "shards"
    res = subprocess.run([sys.executable, "-m", "mdi_mpi.split", "--model", str(model), "--ranks", "4", "--tp", "2",
                          "--quant", "int8", "--out", str(shards)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    split = json.loads((shards / "mdi_split.json").read_text())
    assert (split["ranks"], split["tp"], split["tp_parts"], len(split["layers"])) == (4, 2, 2, 2)
    one = Checkpoint(shards / "rank-1")  # the second half of stage 0: half the vocabulary, half of each layer
    shape = lambda name: one.files[name].tensors[name]["shape"]  # noqa: E731
    assert shape("model.embed_tokens.weight.q") == [384 // 2, 128]
    assert shape("model.layers.0.mlp.down_proj.parts.0.weight.q") == [128, 256 // 2]
    assert shape("model.layers.0.self_attn.k_proj.parts.0.bias") == [4 * 16 // 2]  # 4 KV heads of 16
    assert not any(".layers.2." in n for n in one.files)
    whole = _run(model, tmp_path, 4, ["--tp", "2", "--quant", "int8", "--slots", "2"], "whole")
    assert _run(shards, tmp_path, 4, ["--slots", "2"], "shards") == whole  # the split's --tp, adopted
    wrong = run_cli(["--model", str(shards), "--prompt", "x", "--tp", "4"], ranks=4)
    assert wrong.returncode == 2 and "is split for --tp 2 --tp-parts 2" in wrong.stderr, wrong.stderr
