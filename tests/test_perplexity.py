"""The perplexity tool: against transformers, across ranks and slots, and what quantization costs on
the trained demo model."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from support.launch import mpiexec
from support.stages import full_stage

from mdi_mpi.perplexity import Scorer, windows


def run_ppl(args: list[str], ranks: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mdi_mpi.perplexity", *args]
    if ranks > 1:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    from mdi_mpi.demo import held_out_text

    path = tmp_path_factory.mktemp("text") / "held-out.py"
    path.write_text(held_out_text(60_000))
    return path


@pytest.mark.parametrize("ids, length, limit, want", [
    (list(range(10)), 4, None, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]),
    (list(range(9)), 4, None, [[0, 1, 2, 3], [4, 5, 6, 7]]),  # a last window of one token predicts nothing
    (list(range(10)), 4, 6, [[0, 1, 2, 3], [4, 5]]),
])
def test_windows(ids, length, limit, want):
    assert windows(ids, length, limit) == want


def test_scorer_feeds_every_token_once_and_scores_every_next_token():
    ws = [list(range(3, 14)), list(range(20, 25)), [7, 8]]
    sc = Scorer(ws, n_slots=2, prefill_chunk=4)
    vocab = 32
    while not sc.done:
        work = sc.next_work([0, 1])
        logits = torch.zeros(work.batch.n_tokens, vocab)  # uniform: every target costs log(vocab)
        sc.complete(work, logits)
    assert sc.n_fed == 11 + 5 + 2 and sc.n_targets == 10 + 4 + 1
    assert sc.nll == pytest.approx(sc.n_targets * math.log(vocab))


@pytest.mark.timeout(240)
@pytest.mark.subprocess
def test_perplexity_equals_transformers(random_dir, held_out, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "ppl.json"
    res = run_ppl(["--model", str(random_dir), "--text", str(held_out), "--max-tokens", "300", "--max-seq-len", "64",
                   "--dtype", "float32", "--prefill-chunk", "24", "--json", str(out)])
    assert res.returncode == 0, res.stderr
    ours = json.loads(out.read_text())
    tok = AutoTokenizer.from_pretrained(random_dir)
    hf = AutoModelForCausalLM.from_pretrained(random_dir, dtype=torch.float32).eval()
    nll, n = 0.0, 0
    for w in windows(tok.encode(held_out.read_text(), add_special_tokens=False), 64, 300):
        with torch.no_grad():
            logits = hf(torch.tensor([w])).logits[0].double()
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="sum"))
        n += len(w) - 1
    assert ours["scored_tokens"] == n and ours["tokens"] == 300
    assert ours["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert f"perplexity {ours['perplexity']:.4f} over {n} tokens" in res.stdout


@pytest.mark.timeout(300)
@pytest.mark.mpi
def test_perplexity_is_the_same_for_any_ranks_and_slots(demo_dir, held_out, tmp_path):
    seen = {}
    for ranks, slots, micro in [(1, 1, 1), (2, 2, 1), (3, 6, 2)]:
        out = tmp_path / f"{ranks}-{slots}.json"
        res = run_ppl(["--text", str(held_out), "--max-tokens", "1200", "--max-seq-len", "128", "--dtype", "bfloat16",
                       "--threads", "1",  # kernels are chosen per thread count: one for every layout
                       "--slots", str(slots), "--micro-batch", str(micro), "--json", str(out)], ranks=ranks)
        assert res.returncode == 0, res.stderr
        seen[(ranks, slots)] = json.loads(out.read_text())["nll_per_token"]
    first = seen[(1, 1)]
    assert all(v == pytest.approx(first, rel=1e-12) for v in seen.values()), seen


@pytest.mark.timeout(400)
@pytest.mark.mpi
def test_quantization_costs_little_perplexity_on_the_trained_model(demo_dir, held_out, tmp_path):
    from mdi_mpi.quant import integer_products_exact

    ppl = {}
    runs = [("bf16", []), ("int8", ["--quant", "int8", "--quant-kernel", "w8"]), ("int4", ["--quant", "int4", "--quant-group", "128"])]
    if integer_products_exact(128):  # activations rounded to int8 too, where this CPU can
        runs.append(("int8 w8a8", ["--quant", "int8", "--quant-kernel", "w8a8"]))
    for name, extra in runs:
        out = tmp_path / f"{name}.json"
        res = run_ppl(["--text", str(held_out), "--max-tokens", "6000", "--max-seq-len", "256", "--dtype", "bfloat16",
                       "--json", str(out), *extra], ranks=2)
        assert res.returncode == 0, res.stderr
        ppl[name] = json.loads(out.read_text())["perplexity"]
    assert ppl["bf16"] < 150, ppl  # it has learned Python: a random model of this vocabulary scores ~2000
    assert ppl["int8"] <= 1.02 * ppl["bf16"], ppl
    assert ppl.get("int8 w8a8", 0) <= 1.02 * ppl["bf16"], ppl
    assert ppl["int4"] <= 1.10 * ppl["bf16"], ppl


@pytest.mark.mpi
def test_bad_input_is_one_clear_error(models, held_out, tmp_path):
    res = run_ppl(["--model", str(models["qwen2"]), "--text", str(held_out)])
    assert res.returncode == 2 and "has no tokenizer" in res.stderr and "Traceback" not in res.stderr, res.stderr
    res = run_ppl(["--text", str(tmp_path / "missing.txt")], ranks=2)
    assert res.returncode == 2 and res.stderr.count("cannot read --text") == 1, res.stderr
    (tmp_path / "short.txt").write_text("a")
    res = run_ppl(["--text", str(tmp_path / "short.txt")])
    assert res.returncode == 2 and "nothing to score" in res.stderr, res.stderr


@pytest.mark.timeout(120)
def test_windows_past_longropes_original_context_score_as_transformers(models):
    """A window longer than the original context (128 here) is scored with the long factors, as
    transformers scores it in one forward; a shorter one with the short factors."""
    from transformers import AutoModelForCausalLM

    from mdi_mpi.pipeline import Recorder, run_first
    from mdi_mpi.ring import LocalRing

    path = models["phi3-longrope"]
    stage = full_stage(path, n_slots=2, max_seq_len=256)
    g = torch.Generator().manual_seed(5)
    ws = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (200, 90)]
    sc = Scorer(ws, n_slots=2, prefill_chunk=64, long_rope_after=stage.config.long_rope_after)
    run_first(stage, sc, LocalRing(), [[0, 1]], Recorder(), all_rows=True)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nll = 0.0
    for w in ws:
        with torch.no_grad():
            logits = hf(torch.tensor([w])).logits[0].double()
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(w[1:]), reduction="sum"))
    assert sc.n_targets == 199 + 89
    assert sc.nll == pytest.approx(nll, rel=1e-6)
