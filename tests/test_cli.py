"""``python -m mdi_mpi.generate`` end to end, in one process and under mpiexec."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support import REPO
from support.launch import mpiexec, ranks_of, run_cli
from transformers import AutoModelForCausalLM

from mdi_mpi.bench import CAP_NEEDS
from mdi_mpi.probes import cpu_features

FIELDS = {"id", "prompt", "input_ids", "tokens", "text", "finish_reason", "ttft_s", "duration_s", "cached_tokens"}


def write_prompts(path, prompts: list[list[int]], **extra) -> str:
    path.write_text("".join(json.dumps({"id": f"p{i}", "input_ids": p, **extra}) + "\n" for i, p in enumerate(prompts)))
    return str(path)


def records(path) -> dict[str, dict]:
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        assert set(rec) == FIELDS
        out[rec["id"]] = rec
    return out


PROMPTS = [[5, 9, 17], list(range(3, 30)), [7], list(range(40, 52)), [100, 3, 4, 5, 6], [11, 12]]


@pytest.fixture(scope="module")
def greedy_reference(models):
    path = models["llama-gqa-llama3"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = {}
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, pad_token_id=0)
        ref[f"p{i}"] = out[0, len(p):].tolist()
    return ref


@pytest.mark.timeout(240)
@pytest.mark.parametrize("ranks, slots", [(1, 1), (1, 4), (2, 2), (3, 3), (3, 6)])
@pytest.mark.mpi
def test_greedy_equals_transformers_for_any_ranks_and_slots(models, greedy_reference, tmp_path, ranks, slots):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "out.jsonl"
    res = run_cli(["--model", str(models["llama-gqa-llama3"]), "--dtype", "float32", "--prompts-file", prompts,
                   "--max-new-tokens", "20", "--slots", str(slots), "--output", str(out), "--quiet"], ranks=ranks)
    assert res.returncode == 0, res.stderr
    recs = records(out)
    assert {k: r["tokens"] for k, r in recs.items()} == greedy_reference
    assert all(r["text"] is None and r["finish_reason"] in ("length", "stop") for r in recs.values())
    assert f"{ranks} ranks, {slots} slots" in res.stderr


@pytest.mark.timeout(300)
@pytest.mark.mpi
def test_sampled_output_is_identical_across_ranks_slots_and_micro_batches(models, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:4])
    runs = {}
    for ranks, slots, micro in [(1, 1, 1), (1, 5, 5), (2, 2, 1), (2, 6, 3), (3, 3, 1), (3, 6, 2), (3, 4, 1)]:
        out = tmp_path / f"out-{ranks}-{slots}-{micro}.jsonl"
        res = run_cli(["--model", str(models["qwen2"]), "--dtype", "bfloat16", "--prompts-file", prompts,
                       "--n-samples", "2", "--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "7",
                       "--max-new-tokens", "12", "--slots", str(slots), "--micro-batch", str(micro),
                       "--prefill-chunk", "5", "--output", str(out), "--quiet"], ranks=ranks)
        assert res.returncode == 0, res.stderr
        runs[(ranks, slots, micro)] = {k: r["tokens"] for k, r in records(out).items()}
    first = next(iter(runs.values()))
    assert len(first) == 8
    assert first["p0-0"] != first["p0-1"]  # samples of one prompt differ
    for key, tokens in runs.items():
        assert tokens == first, key


PENALTIES = [  # per-request overrides, one per prompt of PROMPTS
    {"frequency_penalty": 0.7, "presence_penalty": 0.3},
    {"presence_penalty": 1.5},
    {"frequency_penalty": -0.4, "logit_bias": {"9": 0.8}},
    {"logit_bias": {"11": 100}},
    {"frequency_penalty": 2.0, "logit_bias": {"3": -100, "4": 1.25}},
    {},
]


class OpenAIPenalties:
    """A transformers logits processor with OpenAI's formula, written out once more for the reference:
    logit[j] - count[j] * frequency - (count[j] > 0) * presence + bias[j], counting generated tokens."""

    def __init__(self, prompt_len: int, overrides: dict):
        self.prompt_len = prompt_len
        self.presence = overrides.get("presence_penalty", 0.0)
        self.frequency = overrides.get("frequency_penalty", 0.0)
        self.bias = {int(k): v for k, v in overrides.get("logit_bias", {}).items()}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        generated = input_ids[0, self.prompt_len:].tolist()
        for token in set(generated):
            scores[0, token] -= generated.count(token) * self.frequency + self.presence
        for token, bias in self.bias.items():
            scores[0, token] += bias
        return scores


@pytest.mark.timeout(300)
@pytest.mark.mpi
def test_penalties_and_logit_bias_equal_transformers_with_the_same_formula(models, greedy_reference, tmp_path):
    from transformers import LogitsProcessorList

    path = models["llama-gqa-llama3"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = {}
    for i, (p, overrides) in enumerate(zip(PROMPTS, PENALTIES)):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, pad_token_id=0,
                              logits_processor=LogitsProcessorList([OpenAIPenalties(len(p), overrides)]))
        ref[f"p{i}"] = out[0, len(p):].tolist()
    assert ref["p3"] == [11] * 20
    assert sum(ref[k] != greedy_reference[k] for k in ref) >= 4  # the penalties change what greedy picks
    file = tmp_path / "p.jsonl"
    file.write_text("".join(json.dumps({"id": f"p{i}", "input_ids": p, **o}) + "\n"
                            for i, (p, o) in enumerate(zip(PROMPTS, PENALTIES))))
    for ranks, slots in [(1, 1), (3, 6)]:
        out = tmp_path / f"out-{ranks}.jsonl"
        res = run_cli(["--model", str(path), "--dtype", "float32", "--threads", "1", "--prompts-file", str(file),
                       "--max-new-tokens", "20", "--slots", str(slots), "--output", str(out), "--quiet"], ranks=ranks)
        assert res.returncode == 0, res.stderr
        assert {k: r["tokens"] for k, r in records(out).items()} == ref, (ranks, slots)
    # The flags set the default for every request.
    out = tmp_path / "flags.jsonl"
    res = run_cli(["--model", str(path), "--dtype", "float32", "--threads", "1",
                   "--prompts-file", write_prompts(tmp_path / "plain.jsonl", PROMPTS[1:2]), "--presence-penalty", "1.5",
                   "--max-new-tokens", "20", "--output", str(out), "--quiet"])
    assert res.returncode == 0, res.stderr
    assert records(out)["p0"]["tokens"] == ref["p1"]


@pytest.mark.subprocess
def test_demo_model_single_process(demo_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    res = run_cli(["--prompt", "Once upon a time", "--prompt", "Hello", "--max-new-tokens", "8",
                   "--output", str(out), "--stop", "zzz-never", "--ignore-eos"])
    assert res.returncode == 0, res.stderr
    assert "trained for a few minutes on Python's standard library" in res.stderr
    recs = records(out)
    assert set(recs) == {"0", "1"}
    assert recs["0"]["prompt"] == "Once upon a time" and recs["0"]["input_ids"][0] == 1  # BOS
    assert all(isinstance(r["text"], str) and len(r["tokens"]) == 8 for r in recs.values())
    assert "--- 0 (length, 8 tokens)" in res.stdout
    assert "tokens/s" in res.stderr and "rank 0: layers 0-3" in res.stderr


@pytest.mark.timeout(120)
@pytest.mark.subprocess
def test_a_streamed_stop_string_is_never_printed(demo_dir, tmp_path):
    """One request streams to stdout; with --stop WORD taken from its own greedy output, stdout ends
    before the word and equals the record's text."""
    args = ["--prompt", "def main(", "--max-new-tokens", "24", "--ignore-eos"]
    free = run_cli([*args, "--output", str(tmp_path / "free.jsonl")])
    assert free.returncode == 0, free.stderr
    text = records(tmp_path / "free.jsonl")["0"]["text"]
    words = [w for w in text.split() if len(w) >= 3 and text.index(w) > 3]
    assert words, text
    stop = words[0]
    res = run_cli([*args, "--stop", stop, "--output", str(tmp_path / "stop.jsonl")])
    assert res.returncode == 0, res.stderr
    rec = records(tmp_path / "stop.jsonl")["0"]
    assert rec["finish_reason"] == "stop" and rec["text"] == text[: text.index(stop)]
    assert res.stdout == rec["text"] + "\n" and stop not in res.stdout


@pytest.mark.subprocess
def test_demo_chat_and_streaming(demo_dir, tmp_path):
    from mdi_mpi.requests import load_tokenizer

    out = tmp_path / "chat.jsonl"
    res = run_cli(["--prompt", "What is MPI?", "--chat", "--max-new-tokens", "12", "--ignore-eos", "--output", str(out)])
    assert res.returncode == 0, res.stderr
    rec = records(out)["0"]
    tok = load_tokenizer(demo_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "What is MPI?"}], tokenize=False, add_generation_prompt=True)
    assert rec["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]  # the chat template, no extra BOS
    assert rec["text"].strip() and len(rec["tokens"]) == 12
    assert res.stdout == rec["text"] + "\n"  # a single request streams exactly its text, no header


@pytest.mark.subprocess
def test_help_lists_the_flags():
    res = run_cli(["--help"])
    assert res.returncode == 0
    for flag in ("--model", "--dtype", "--max-seq-len", "--threads", "--layers", "--slots", "--micro-batch",
                 "--prefill-chunk", "--prompts-file", "--n-samples", "--temperature", "--top-k", "--top-p",
                 "--seed", "--chat", "--output"):
        assert flag in res.stdout


def _bad(tmp_path, models):
    m = str(models["mistral"])
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"input_ids": list(range(3, 40))}) + "\n")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"input_ids": [1, 2]}\n{"input_ids": [1, 2\n')
    return [
        (["--model", str(tmp_path / "missing"), "--prompt", "x"], "does not exist"),
        (["--model", m, "--prompt", "x", "--temperature", "-1"], "temperature must be >= 0"),
        (["--model", m, "--prompt", "x", "--bogus"], "unrecognized arguments: --bogus"),
        (["--model", m, "--prompt", "x", "--slots", "0"], "argument --slots: must be at least 1, got 0"),
        (["--model", m, "--prompt", "x"], "has no tokenizer, so give prompts as input_ids"),
        (["--model", m, "--prompts-file", str(broken)], "broken.jsonl line 2: invalid JSON"),
        (["--model", m, "--prompts-file", str(tmp_path / "none.txt")], "does not exist"),
        (["--model", m, "--prompts-file", str(long_prompt), "--max-seq-len", "16"], "37 tokens, longer than the context"),
        (["--model", m], "no prompts"),
        (["--model", m, "--prompt", "x", "--dtype", "int3"], "unknown dtype"),
    ]


@pytest.mark.subprocess
def test_bad_input_single_process(models, tmp_path):
    for args, message in _bad(tmp_path, models):
        res = run_cli(args, timeout=60)
        assert res.returncode == 2, (args, res.stderr)
        assert message in res.stderr, (args, res.stderr)
        assert "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.timeout(300)
@pytest.mark.mpi
def test_bad_input_every_rank_exits_2_with_one_message(models, tmp_path):
    cases = _bad(tmp_path, models)[:6:2] + [
        (["--model", str(models["mistral"]), "--prompt", "x"], "has no tokenizer"),
        (["--model", str(models["mistral"]), "--prompt", "x", "--layers", "1,1,1"], "sums to 3, the model has 4 layers"),
    ]
    for args, message in cases:
        res = run_cli(args, ranks=3, timeout=60)
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.count(message) == 1, (args, res.stderr)
        assert "Traceback" not in res.stderr
    res = run_cli(["--model", str(models["mistral"]), "--prompt", "x"], ranks=5, timeout=60)
    assert res.returncode == 2 and res.stderr.count("5 ranks but the model has only 4 layers") == 1, res.stderr


INJECT = str(REPO / "tests" / "inject")
HOST = socket.gethostname()  # failure lines name the rank's host  # sitecustomize.py: makes a rank fail from outside the product


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind, line", [("error", f"rank 1 on {HOST}: RuntimeError: injected failure at call 7"),
                                        ("interrupt", f"rank 1 on {HOST}: KeyboardInterrupt"),
                                        ("segfault", f"rank 1 on {HOST}: killed by SIGSEGV (a crash in native code)")])
@pytest.mark.mpi
def test_a_failing_rank_ends_the_job_and_keeps_results(models, tmp_path, kind, line):
    """Any exception on one rank, KeyboardInterrupt included, or a crash ends every rank at once."""
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS * 3, max_new_tokens=2)
    out = tmp_path / "out.jsonl"
    res = run_cli(["--model", str(models["llama-tied"]), "--prompts-file", prompts, "--slots", "1",
                   "--output", str(out), "--quiet"], ranks=3, timeout=60,
                  env={"MDI_TEST_FAIL": f"1:7:{kind}", "PYTHONPATH": INJECT})
    ended = time.time()
    assert res.returncode != 0
    assert line in res.stderr, res.stderr
    assert res.stderr.count("killed by") == (kind == "segfault"), res.stderr  # no watcher speaks for the others
    stamp = re.search(r"injected \w+ at ([\d.]+)", res.stderr)
    assert stamp, "the failure was never injected: " + res.stderr
    assert ended - float(stamp.group(1)) < 10  # the whole job ended within seconds of the failure
    done = records(out)  # every line written is a whole record
    assert 2 <= len(done) < len(PROMPTS) * 3


def _start_and_hit_rank_1(models, tmp_path, sig: int, extra: list[str], launcher: bool = False,
                          ranks: int = 3) -> tuple[str, float]:
    """Start a 3-rank job (or ``ranks``), wait for two finished records, send ``sig`` to rank 1 (or the launcher),
    check that the whole job ends with its records intact; return its stderr and the seconds from
    the signal to the launcher's exit."""
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS * 20, max_new_tokens=30)
    out = tmp_path / "out.jsonl"
    tag = tmp_path.name
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mdi_mpi.generate", "--model", str(models["llama-tied"]),
           "--prompts-file", prompts, "--slots", "1", "--output", str(out), "--quiet", *extra]
    job = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "MDI_TEST_TAG": tag},
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (out.is_file() and out.read_text().count("\n") >= 2) and time.time() < deadline:
            time.sleep(0.1)
        pids = ranks_of(tag)
        assert set(pids) == set(range(ranks)) and job.poll() is None, (pids, job.poll())
        sent = time.time()
        os.kill(job.pid if launcher else pids[1], sig)
        _, stderr = job.communicate(timeout=30)  # no hang: the other ranks end too
        took = time.time() - sent
        deadline = time.time() + 10  # the launcher has sent its kills; give them a moment to land
        while ranks_of(tag) and time.time() < deadline:
            time.sleep(0.1)
        assert not ranks_of(tag), "ranks outlived the launcher"
    finally:
        job.kill()
        for pid in ranks_of(tag).values():
            os.kill(pid, signal.SIGKILL)
    assert job.returncode != 0
    done = records(out)  # every line written is a whole record
    assert 2 <= len(done) < len(PROMPTS) * 20, stderr
    return stderr, took


@pytest.mark.timeout(120)
@pytest.mark.mpi
def test_a_rank_killed_by_a_signal_ends_the_job(models, tmp_path):
    # What the OOM killer does: SIGKILL, no chance to call MPI_Abort. The launcher must end the rest,
    # and the rank's watcher says what happened.
    stderr, took = _start_and_hit_rank_1(models, tmp_path, signal.SIGKILL, [])
    assert took < 10
    assert stderr.count(f"rank 1 on {HOST}: killed by SIGKILL (sent by the kernel's out-of-memory killer") == 1, stderr


@pytest.mark.timeout(120)
@pytest.mark.mpi
def test_sigint_to_one_rank_ends_the_job(models, tmp_path):
    # Ctrl-C on one node: KeyboardInterrupt in that rank must abort the job, not hang in MPI finalization.
    stderr, took = _start_and_hit_rank_1(models, tmp_path, signal.SIGINT, [])
    assert f"rank 1 on {HOST}: KeyboardInterrupt" in stderr, stderr
    assert took < 10


@pytest.mark.timeout(120)
@pytest.mark.mpi
def test_sigterm_to_the_launcher_ends_the_job_and_says_so(models, tmp_path):
    # kill, scancel or a time limit: every rank is told, says so, and the records written are kept.
    stderr, took = _start_and_hit_rank_1(models, tmp_path, signal.SIGTERM, [], launcher=True)
    assert f"on {HOST}: Terminated: the job was terminated by SIGTERM" in stderr, stderr
    assert took < 10 and "Traceback" not in stderr


@pytest.mark.timeout(120)
@pytest.mark.mpi
def test_a_frozen_rank_ends_the_job_after_the_timeout(models, tmp_path):
    # A node that hangs without dying (SIGSTOP here): its neighbours give up after --timeout.
    stderr, took = _start_and_hit_rank_1(models, tmp_path, signal.SIGSTOP, ["--timeout", "3"])
    assert f"no message from rank 1 on {HOST} for 3 s" in stderr or f"rank 1 on {HOST} has not taken a message for 3 s" in stderr, stderr
    assert "Traceback" not in stderr
    assert 3 <= took < 15  # the --timeout, not something else, ended it


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig, line", [
    (signal.SIGKILL, f"rank 1 on {HOST}: killed by SIGKILL"),
    (signal.SIGSTOP, f"for 3 s among the stage's ranks 0-1 on {HOST}: one of them has hung or lost its connection")])
@pytest.mark.mpi
def test_a_tensor_rank_that_dies_or_freezes_ends_the_job(models, tmp_path, sig, line):
    # Rank 1 holds half of stage 0 with rank 0 (--tp 2): it is in no ring, only in its stage's exchanges.
    stderr, took = _start_and_hit_rank_1(models, tmp_path, sig, ["--tp", "2", "--timeout", "3"], ranks=4)
    assert line in stderr, stderr
    assert took < 15 and "Traceback" not in stderr


@pytest.mark.timeout(120)
@pytest.mark.mpi
def test_an_error_on_a_tensor_rank_ends_the_job(models, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS * 3, max_new_tokens=2)
    res = run_cli(["--model", str(models["llama-tied"]), "--prompts-file", prompts, "--tp", "2", "--slots", "1",
                   "--output", str(tmp_path / "out.jsonl"), "--quiet"], ranks=4, timeout=60,
                  env={"MDI_TEST_FAIL": "3:7:error", "PYTHONPATH": INJECT})
    assert res.returncode != 0
    assert f"rank 3 on {HOST}: RuntimeError: injected failure at call 7" in res.stderr, res.stderr
    assert 2 <= len(records(tmp_path / "out.jsonl")) < len(PROMPTS) * 3


@pytest.mark.timeout(120)
@pytest.mark.mpi
def test_hostfile_launcher_runs_one_rank_per_line(demo_dir, tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("# this machine, twice\nlocalhost\nlocalhost\n")
    env = {**os.environ, "HOSTS": str(hosts), "THREADS": "1", "VENV": str(Path(sys.executable).parent.parent)}
    res = subprocess.run(["bash", str(REPO / "jobs" / "hostfile-run.sh"), "--prompt", "hi", "--max-new-tokens", "3",
                          "--quiet"], env=env, capture_output=True, text=True, timeout=100)
    assert res.returncode == 0, res.stderr
    assert "(2 ranks," in res.stderr and "rank 1: layers " in res.stderr and "rank 0: layers 0-" in res.stderr


CAPS = {"none": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
        "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512"}}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kernel, cap", [("auto", "none"), ("auto", "avx2"), ("row", "none"), ("tile8", "none"), ("mv", "avx512")])
@pytest.mark.mpi
def test_invariance_holds_for_each_kernel_and_under_isa_caps(models, tmp_path, kernel, cap):
    """Sampled bf16 tokens equal across rank, slot and micro-batch counts, whichever kernel is used
    (forced or chosen) and with the CPU capped to an older instruction set."""
    need = CAP_NEEDS.get(cap)
    if need is not None and need not in cpu_features()[1]:
        pytest.skip(f"this CPU has no {need}: the {cap} cap cannot emulate it")
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:3])
    runs = {}
    for ranks, slots, micro in [(1, 1, 1), (2, 4, 2), (3, 6, 2)]:
        out = tmp_path / f"out-{ranks}-{slots}-{micro}.jsonl"
        res = run_cli(["--model", str(models["qwen2"]), "--dtype", "bfloat16", "--kernel", kernel, "--prompts-file", prompts,
                       "--n-samples", "2", "--temperature", "0.9", "--seed", "3", "--max-new-tokens", "10",
                       "--slots", str(slots), "--micro-batch", str(micro), "--prefill-chunk", "5", "--threads", "1",
                       "--output", str(out), "--quiet", "--stats-json", str(tmp_path / "stats.json")],
                      ranks=ranks, env=CAPS[cap])
        assert res.returncode == 0, res.stderr
        runs[(ranks, slots, micro)] = {k: r["tokens"] for k, r in records(out).items()}
        kernels = json.loads((tmp_path / "stats.json").read_text())["per_rank"][0]["kernels"]
        used = {k for shape in kernels["shapes"].values() for plan in (*shape["decode"].values(), *shape["prefill"].values())
                for k in plan.replace("x", " ").split("+")}
        if kernel != "auto":
            assert {u.split()[-1] for u in used} == {kernel}
    first = runs[(1, 1, 1)]
    assert len(first) == 6
    for key, tokens in runs.items():
        assert tokens == first, key


@pytest.mark.timeout(300)
@pytest.mark.mpi
def test_prompts_that_share_a_prefix_give_the_same_tokens_with_the_cache_on_any_layout(models, tmp_path):
    """JSONL prompts sharing a 20-token prefix: the cache copies it between slots of groups in flight
    round 3 ranks, and every layout gives the tokens of one rank without the cache."""
    shared = list(range(60, 80))
    prompts = write_prompts(tmp_path / "p.jsonl", [shared + [200 + i] * (1 + i % 3) for i in range(8)])
    runs, found = {}, {}
    for ranks, slots, micro, cache in [(1, 1, 1, False), (1, 3, 1, True), (2, 4, 2, True), (3, 6, 2, True)]:
        out, stats = tmp_path / f"out-{ranks}-{slots}-{cache}.jsonl", tmp_path / f"stats-{ranks}.json"
        res = run_cli(["--model", str(models["qwen2"]), "--dtype", "bfloat16", "--prompts-file", prompts, "--temperature",
                       "0.9", "--seed", "3", "--max-new-tokens", "8", "--slots", str(slots), "--micro-batch", str(micro),
                       "--prefill-chunk", "4", "--threads", "1", "--output", str(out), "--quiet", "--stats-json", str(stats),
                       *([] if cache else ["--no-prefix-cache"])], ranks=ranks)
        assert res.returncode == 0, res.stderr
        recs = records(out)
        runs[(ranks, slots)] = {k: r["tokens"] for k, r in recs.items()}
        found[(ranks, slots)] = json.loads(stats.read_text())["prompt_tokens_cached"]
        assert found[(ranks, slots)] == sum(r["cached_tokens"] for r in recs.values())
    first = runs[(1, 1)]
    assert len(first) == 8 and all(tokens == first for tokens in runs.values())
    assert found[(1, 1)] == 0 and all(n >= 7 * 20 for key, n in found.items() if key != (1, 1))


@pytest.mark.timeout(120)
@pytest.mark.mpi
def test_dtype_auto_says_what_it_picked(models, tmp_path):
    stats = tmp_path / "stats.json"
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:1])
    res = run_cli(["--model", str(models["qwen2"]), "--prompts-file", prompts, "--max-new-tokens", "2", "--quiet",
                   "--stats-json", str(stats)], ranks=2)
    assert res.returncode == 0, res.stderr
    s = json.loads(stats.read_text())
    assert s["dtype"] in ("bfloat16", "float32")
    assert s["dtype_reason"].startswith(s["dtype"]) and "bfloat16" in s["dtype_reason"] and "float32" in s["dtype_reason"]
    assert f"dtype: {s['dtype_reason']}" in res.stderr
    res = run_cli(["--model", str(models["qwen2"]), "--prompts-file", prompts, "--max-new-tokens", "2", "--quiet", "--dtype", "fp16",
                   "--stats-json", str(stats)])
    assert res.returncode == 0, res.stderr
    assert json.loads(stats.read_text())["dtype"] == "float16"


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["qwen3", "phi3-longrope", "mistral-window", "qwen2-window", "gemma2", "gemma3"])
@pytest.mark.mpi
def test_new_families_greedy_equals_transformers_on_any_ranks(models, tmp_path, name):
    path = models[name]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = {}
    for i, p in enumerate(PROMPTS[:3]):
        with torch.no_grad():
            want[f"p{i}"] = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS[:3])
    for ranks, slots in [(1, 1), (2, 3), (3, 3)]:
        out = tmp_path / f"out-{ranks}.jsonl"
        res = run_cli(["--model", str(path), "--dtype", "float32", "--prompts-file", prompts, "--max-new-tokens", "16",
                       "--slots", str(slots), "--output", str(out), "--quiet", "--max-seq-len", "128"], ranks=ranks)
        assert res.returncode == 0, res.stderr
        assert {k: r["tokens"] for k, r in records(out).items()} == want, ranks


@pytest.mark.timeout(300)
@pytest.mark.mpi
def test_moe_tokens_equal_transformers_and_do_not_change_with_ranks_or_slots(models, tmp_path):
    """qwen2-moe (top-4 of 8 experts and a shared expert) on 2 ranks: greedy tokens equal transformers'
    (as on one rank, test_model.py); with int4 experts, greedy and seeded sampled requests side by side
    give the same tokens on 1 rank and on 2 ranks with the slots in groups."""
    path = models["qwen2-moe"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = {}
    for i, p in enumerate(PROMPTS[:3]):
        with torch.no_grad():
            want[f"p{i}"] = hf.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
    file = tmp_path / "p.jsonl"
    sampled = {"temperature": 0.9, "seed": 3}
    file.write_text("".join(json.dumps({"id": f"p{i}", "input_ids": p, **({} if i < 3 else sampled)}) + "\n"
                            for i, p in enumerate(PROMPTS[:5])))
    runs = {}
    for name, ranks, slots, extra in [("fp32", 2, 4, ["--dtype", "float32"]),
                                      ("int4-1", 1, 1, ["--quant", "int4", "--quant-group", "32"]),
                                      ("int4-2", 2, 4, ["--quant", "int4", "--quant-group", "32"])]:
        out = tmp_path / f"{name}.jsonl"
        res = run_cli(["--model", str(path), "--prompts-file", str(file), "--max-new-tokens", "16", "--slots", str(slots),
                       "--micro-batch", str(-(-slots // 2)), "--prefill-chunk", "5", "--max-seq-len", "128",
                       "--output", str(out), "--quiet", *extra], ranks=ranks)
        assert res.returncode == 0, res.stderr
        runs[name] = {k: r["tokens"] for k, r in records(out).items()}
    assert {k: runs["fp32"][k] for k in want} == want
    assert runs["int4-1"] == runs["int4-2"] and len(runs["int4-1"]) == 5


@pytest.mark.timeout(300)
@pytest.mark.mpi
def test_longrope_past_the_original_context_equals_transformers(models, tmp_path):
    """Phi-3's longrope: a prompt longer than the original context (128 here) uses the long factors
    from the start; one that grows past it switches, and transformers recomputes the whole sequence
    with the long factors at that point, as we do. Greedy tokens equal, on any ranks and slots."""
    path = models["phi3-longrope"]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (100, 140, 20)]
    want = {}
    for i, p in enumerate(prompts):
        with torch.no_grad():
            want[f"p{i}"] = hf.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False, pad_token_id=0,
                                       eos_token_id=None)[0, len(p):].tolist()
    file = write_prompts(tmp_path / "p.jsonl", prompts)
    for ranks, slots, chunk in [(1, 1, 128), (2, 3, 32), (3, 2, 64)]:
        out = tmp_path / f"out-{ranks}.jsonl"
        res = run_cli(["--model", str(path), "--dtype", "float32", "--prompts-file", file, "--max-new-tokens", "40",
                       "--slots", str(slots), "--prefill-chunk", str(chunk), "--max-seq-len", "256", "--output", str(out),
                       "--quiet", "--ignore-eos"], ranks=ranks)
        assert res.returncode == 0, res.stderr
        assert {k: r["tokens"] for k, r in records(out).items()} == want, (ranks, slots)


@pytest.mark.timeout(120)
@pytest.mark.mpi
def test_flags_of_a_successful_run_do_what_they_say(models, tmp_path):
    """--layers, --mem, --timeout 0, --prompts-file -, --quiet and --stats-json on one 2-rank run, and
    the default slots (max(N, min(requests, 4N))) and micro-batch (ceil(K / N))."""
    stats = tmp_path / "stats.json"
    lines = "".join(json.dumps({"id": f"r{i}", "input_ids": p}) + "\n" for i, p in enumerate(PROMPTS * 2))
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "mdi_mpi.generate", "--model", str(models["llama-tied"]),
           "--layers", "1,3", "--mem", "8GiB,6GiB", "--timeout", "0", "--prompts-file", "-", "--quiet",
           "--threads", "1", "--max-new-tokens", "3", "--stats-json", str(stats), "--output", str(tmp_path / "o.jsonl")]
    res = subprocess.run(cmd, input=lines, capture_output=True, text=True, timeout=100,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""  # --quiet
    s = json.loads(stats.read_text())
    assert s["requests"] == 12 and s["generated_tokens"] == sum(len(r["tokens"]) for r in records(tmp_path / "o.jsonl").values())
    assert [r["layers"] for r in s["per_rank"]] == [[0, 1], [1, 4]]  # --layers 1,3
    assert s["slots"] == 8 and s["micro_batch"] == 4  # min(12 requests, 4N = 8); ceil(8 / 2)
    assert all(r["threads"] == 1 and r["predicted_peak_bytes"] > r["weight_bytes"] > 0 for r in s["per_rank"])
    assert {"tokens_per_s", "mean_ttft_s", "dtype", "dtype_reason", "kernels"} <= set(s) | set(s["per_rank"][0])


@pytest.mark.mpi
def test_flag_errors_on_every_rank(models, tmp_path):
    m = str(models["llama-tied"])
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    res = run_cli(["--model", m, "--prompts-file", prompts, "--slots", "2", "--micro-batch", "3"], ranks=2)
    assert res.returncode == 2 and res.stderr.count("--micro-batch 3 is larger than --slots 2") == 1, res.stderr
    res = run_cli(["--model", m, "--prompt", "x"], env={"PMI_SIZE": "3"})
    assert res.returncode == 2 and "PMI_SIZE=3: the launcher started 3 separate jobs" in res.stderr, res.stderr
    res = run_cli(["--model", m, "--prompt", "x", "--mem", "8GiB"], ranks=2)
    assert res.returncode == 2 and res.stderr.count("--mem gives 1 sizes for 2 ranks") == 1, res.stderr


@pytest.mark.timeout(240)
@pytest.mark.mpi
def test_a_killed_job_resumes_where_it_stopped(models, tmp_path):
    """Kill a 3-rank job mid-run, resume it (on 2 ranks): every request appears exactly once, with the
    tokens of an uninterrupted run, greedy and seeded alike."""
    sampling = ["--temperature", "0.8", "--seed", "3", "--threads", "1"]  # one thread: one kernel and dtype choice
    _start_and_hit_rank_1(models, tmp_path, signal.SIGKILL, sampling)
    out, prompts = tmp_path / "out.jsonl", str(tmp_path / "p.jsonl")
    before = len(records(out))
    with open(out, "a") as f:
        f.write('{"id": "p9", "prompt": null, "tok')  # a torn last line, as a crash mid-write leaves
    args = ["--model", str(models["llama-tied"]), "--prompts-file", prompts, "--slots", "2", "--quiet", *sampling]
    res = run_cli([*args, "--output", str(out), "--resume"], ranks=2)
    assert res.returncode == 0, res.stderr
    assert f"resuming: {before} of {len(PROMPTS) * 20} requests already in" in res.stderr
    lines = out.read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert sorted(ids) == sorted(f"p{i}" for i in range(len(PROMPTS) * 20))  # each exactly once
    ref = tmp_path / "ref.jsonl"
    res = run_cli([*args, "--output", str(ref)], ranks=1)
    assert res.returncode == 0, res.stderr
    assert {k: r["tokens"] for k, r in records(out).items()} == {k: r["tokens"] for k, r in records(ref).items()}
    # resuming a finished job does nothing, and duplicate ids are refused
    res = run_cli([*args, "--output", str(out), "--resume"], ranks=2)
    assert res.returncode == 0 and out.read_text().splitlines() == lines, res.stderr
    dup = write_prompts(tmp_path / "dup.jsonl", [[5, 6], [7, 8]])
    Path(dup).write_text(Path(dup).read_text().replace('"p1"', '"p0"'))
    res = run_cli(["--model", str(models["llama-tied"]), "--prompts-file", dup, "--output", str(out), "--resume"])
    assert res.returncode == 2 and "'p0' appears twice" in res.stderr, res.stderr
    res = run_cli(["--model", str(models["llama-tied"]), "--prompts-file", dup, "--resume"])
    assert res.returncode == 2 and "--resume needs --output" in res.stderr, res.stderr
