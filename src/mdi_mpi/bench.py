"""Benchmark: one workload through transformers and through mdi-mpi on 1..N ranks, in one run.

    python -m mdi_mpi.bench                       # the full table (TinyLlama-1.1B-shaped, bf16)
    python -m mdi_mpi.bench --tiny --json b.json  # a quick check on a small model

Every configuration runs in its own process (mdi-mpi under ``mpiexec``, launched from here), so its
peak RSS is its own. The workload: prompts of ``--prompt-len`` random token ids, ``--new-tokens``
greedy tokens each (EOS ignored), as many requests as slots (transformers: the batch size).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mdi_mpi.cli import positive_int
from mdi_mpi.demo import FAMILY_SHAPES
from mdi_mpi.errors import UserError, cli_main
from mdi_mpi.partition import default_micro_batch
from mdi_mpi.probes import cpu_features, cpu_flags


def _mpiexec() -> str:
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")
    if found is None:
        raise UserError("mpiexec not found: install an MPI (pip install mpich) or put it on PATH")
    return found


# --cap NAME: environment that makes oneDNN and ATen use only an older instruction set, to emulate
# another CPU (both engines run under it).
CAPS = {
    "none": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},  # a laptop or an older server
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512"},  # AVX-512 without bf16 or AMX
}


CAP_NEEDS = {"avx2": "avx2", "avx512": "avx512f"}  # the CPU flag a cap's instruction set needs


def check_cap(cap: str) -> None:
    """A cap can only take instruction sets away: ``UserError`` for one this CPU does not have
    (its kernels would die of SIGILL)."""
    need = CAP_NEEDS.get(cap)
    name, flags = cpu_features()
    if need is not None and need not in flags:
        raise UserError(f"--cap {cap} emulates a CPU with {need}, which this one ({name}) does not have; "
                        f"choose a cap below this CPU, or none")


def _env(threads: int, cap: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), **CAPS[cap]}


def run_hf(model: str, dtype: str, threads: int, batch: int, prompt_len: int, new_tokens: int, cap: str = "none") -> dict:
    """transformers ``generate`` in a fresh process (``mdi_mpi.bench_hf``)."""
    cmd = [sys.executable, "-m", "mdi_mpi.bench_hf", model, dtype, str(threads), str(batch), str(prompt_len), str(new_tokens)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads, cap))
    if out.returncode:
        raise RuntimeError(f"transformers run failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def workload(model: str, n: int, prompt_len: int) -> list[list[int]]:
    """``n`` prompts of ``prompt_len`` random token ids (the same for every engine and run)."""
    import torch

    g = torch.Generator().manual_seed(0)
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    return [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(n)]


def run_mdi(model: str, dtype: str, threads: int, ranks: int, slots: int, micro: int, prompt_len: int,
            new_tokens: int, work: Path, trace: str | None = None, cap: str = "none", quant: str | None = None,
            prefill_chunk: int = 128, n_requests: int | None = None, tp: int = 1) -> dict:
    """``mpiexec -n ranks python -m mdi_mpi.generate`` on the workload (``n_requests`` prompts,
    default one per slot; ``tp``: ranks per stage); returns its summary."""
    prompts = work / "prompts.jsonl"
    with prompts.open("w") as f:
        for i, ids in enumerate(workload(model, n_requests or slots, prompt_len)):
            f.write(json.dumps({"id": i, "input_ids": ids}) + "\n")
    stats = work / "stats.json"
    cmd = [_mpiexec(), "-n", str(ranks), sys.executable, "-m", "mdi_mpi.generate", "--model", model, "--dtype", dtype,
           "--threads", str(threads), "--slots", str(slots), "--micro-batch", str(micro), "--prompts-file", str(prompts),
           "--max-new-tokens", str(new_tokens), "--ignore-eos", "--quiet", "--stats-json", str(stats),
           "--max-seq-len", str(prompt_len + new_tokens + 1), "--prefill-chunk", str(prefill_chunk)]
    if trace:
        cmd += ["--trace", trace]
    if quant:
        cmd += ["--quant", quant]
    if tp > 1:
        cmd += ["--tp", str(tp)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads, cap))
    if out.returncode:
        raise RuntimeError(f"mdi-mpi run failed ({' '.join(cmd)}): {out.stderr[-2000:]}")
    s = json.loads(stats.read_text())
    per_rank = s["per_rank"]
    return {
        "tokens_per_s": s["tokens_per_s"],
        "tokens_per_s_per_sequence": s["tokens_per_s_per_sequence"],
        "ttft_s": s["mean_ttft_s"],
        "generated_tokens": s["generated_tokens"],
        "peak_rss_bytes": [r["peak_rss_bytes"] for r in per_rank],
        "weight_bytes": [r["weight_bytes"] for r in per_rank],
        "kv_cache_bytes": [r["kv_cache_bytes"] for r in per_rank],
        "layers": [r["layers"] for r in per_rank],
        "fractions": [
            {k: round(r[f"{k}_s"] / r["wall_s"], 4) if r["wall_s"] else 0.0
             for k in ("compute", "prefill", "recv_wait", "send", "sample")}
            for r in per_rank
        ],
        "bytes_sent_per_token": s["bytes_sent_per_token"],
        "kernel_s": [r["kernels"]["seconds"] for r in per_rank],
        "kernels": per_rank[0]["kernels"]["shapes"],
    }


@contextmanager
def serving(model: str, dtype: str, threads: int, ranks: int, slots: int, max_seq_len: int, max_waiting: int,
            flags: tuple[str, ...] = (), bpe: bool = False, env: dict | None = None) -> Iterator[str]:
    """``mdi_mpi.serve`` on ``ranks`` ranks and ``slots`` slots (and ``flags``; ``bpe``: with a BPE
    tokenizer where the model has none; ``env``: more environment), stopped on exit: yields its URL."""
    import re
    import signal

    tmp = Path(tempfile.mkdtemp(prefix="mdi-bench-serve-"))
    served = _with_tokenizer(model, tmp, bpe)  # the model itself when it has a tokenizer: never removed
    cmd = [_mpiexec(), "-n", str(ranks), sys.executable, "-m", "mdi_mpi.serve", "--model", served, "--dtype", dtype,
           "--threads", str(threads), "--slots", str(slots), "--port", "0", "--max-waiting", str(max_waiting),
           "--max-seq-len", str(max_seq_len), *flags]
    server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env={**_env(threads, "none"), **(env or {})})
    try:
        url, lines = None, []
        for line in server.stderr:
            lines.append(line)
            m = re.search(r"serving \S+ at (http://\S+)/v1 ", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            server.wait()
            raise RuntimeError("the server did not start: " + "".join(lines)[-2000:])
        yield url
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)


async def _stream(client, url: str, ids: list[int], new_tokens: int, ttfts: list, gaps: list,
                  extra: dict | None = None) -> tuple[int, int]:
    """One streaming greedy completion of the token ids ``ids`` (EOS ignored; ``extra``: more body
    fields); appends its time to first token and its gaps between tokens; returns its completion
    tokens and the prompt tokens the server found in its prefix cache."""
    import time

    body = {"prompt": ids, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    t0 = time.perf_counter()
    last, usage = None, {}
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                (ttfts.append(now - t0) if last is None else gaps.append(now - last))
                last = now
    return usage["completion_tokens"], usage["prompt_tokens_details"]["cached_tokens"]


def _pct(xs: list[float], q: int) -> float:
    import statistics

    return round(statistics.quantiles(xs, n=100)[q - 1], 4) if len(xs) > 1 else round(xs[0], 4)


def _httpx():
    try:
        import httpx
    except ImportError:
        raise UserError("bench --serve needs httpx: pip install httpx") from None
    return httpx


def load_server(url: str, prompts: list[list[int]], clients: int, new_tokens: int, extra: dict | None = None) -> dict:
    """``clients`` clients stream greedy completions of ``prompts`` between them (after a warm-up
    request of the first prompt's first 16 tokens, too few to share a prompt chunk with it): the aggregate tokens/s and the p50 and p95 of time to first token and inter-token
    latency, as the clients see them."""
    import asyncio
    import time

    httpx = _httpx()

    async def load() -> dict:
        queue = list(prompts)
        ttfts, gaps, cached = [], [], []
        async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients)) as client:
            async def worker() -> int:
                total = 0
                while queue:
                    n, found = await _stream(client, url, queue.pop(), new_tokens, ttfts, gaps, extra)
                    total += n
                    cached.append(found)
                return total

            await _stream(client, url, prompts[0][:16], new_tokens, [], [], extra)
            t0 = time.perf_counter()
            tokens = sum(await asyncio.gather(*(worker() for _ in range(clients))))
            wall = time.perf_counter() - t0
        return {"clients": clients, "tokens_per_s": round(tokens / wall, 2), "generated_tokens": tokens,
                "prompt_tokens_cached": sum(cached),
                "ttft_p50_s": _pct(ttfts, 50), "ttft_p95_s": _pct(ttfts, 95),
                "itl_p50_s": _pct(gaps, 50) if gaps else None, "itl_p95_s": _pct(gaps, 95) if gaps else None}

    return asyncio.run(load())


def run_serve(model: str, dtype: str, threads: int, ranks: int, slots: int, clients: list[int], n_requests: int,
              prompt_len: int, new_tokens: int) -> list[dict]:
    """The server under each client count C: C clients stream ``n_requests`` greedy completions
    of distinct prompts between them (``load_server``)."""
    prompts = workload(model, n_requests, prompt_len)
    with serving(model, dtype, threads, ranks, slots, prompt_len + new_tokens + 1, n_requests) as url:
        return [load_server(url, prompts, c, new_tokens) for c in clients]


SCENARIOS = ("distinct", "conversation", "system-prompt", "json")
# --scenario json: every token of the answer is masked, and most tokens are allowed (a string that never ends)
LONG_STRING = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {
    "type": "object", "properties": {"answer": {"type": "string", "minLength": 100000}}, "required": ["answer"]}}}
# prompts of 1400, 1500, 1600 and 1700 tokens (--tiny: 200 .. 320), each the last, an answer and a question
CONVERSATION = {False: dict(first=1400, answer=50, question=50, turns=4), True: dict(first=200, answer=20, question=20, turns=4)}
SYSTEM_PROMPT = {False: dict(system=1000, question=50, clients=16, new_tokens=8),
                 True: dict(system=200, question=20, clients=4, new_tokens=4)}


def conversation_turns(url: str, model: str, c: dict) -> list[tuple[float, int]]:
    """One client's conversation of ``c["turns"]`` turns: each turn's prompt is the last one, an
    answer and a question (token ids); per turn, the time to first token and the prompt tokens
    found in the cache."""
    import asyncio

    httpx = _httpx()
    ids = workload(model, 1, c["first"] + c["turns"] * (c["answer"] + c["question"]))[0]

    async def talk() -> list[tuple[float, int]]:
        turns = []
        async with httpx.AsyncClient(timeout=None) as client:
            await _stream(client, url, ids[-16:], 2, [], [])  # warm-up, sharing nothing with the conversation
            for t in range(c["turns"]):
                ttft: list[float] = []
                _, cached = await _stream(client, url, ids[: c["first"] + t * (c["answer"] + c["question"])],
                                          c["answer"], ttft, [])
                turns.append((ttft[0], cached))
        return turns

    return asyncio.run(talk())


def copy_vs_prefill(model: str, dtype: str, threads: int, tokens: int, chunk: int = 128) -> dict:
    """What a shared prefix of ``tokens`` tokens costs without the cache and with it, on one rank
    that holds every layer: seconds to prefill it in chunks of ``chunk``, and to copy its KV from
    one slot to another (the best of 5)."""
    import time

    import torch

    from mdi_mpi.checkpoint import Checkpoint, load_stage
    from mdi_mpi.config import parse_dtype
    from mdi_mpi.kv_cache import Batch
    from mdi_mpi.prefix_cache import Copy

    torch.set_num_threads(threads)
    ckpt = Checkpoint(model)
    stage = load_stage(ckpt, range(ckpt.config.n_layers), True, parse_dtype(dtype))
    stage.setup_cache(2, tokens)
    stage.choose_kernels()
    ids = torch.tensor(workload(model, 1, tokens)[0])
    with torch.inference_mode():
        t0 = time.perf_counter()
        for a in range(0, tokens, chunk):
            n = min(chunk, tokens - a)
            stage.forward_layers(stage.embed(ids[a : a + n]), Batch.make([0], [a], [n]))
        prefill = time.perf_counter() - t0
        copies = []
        for _ in range(5):
            t0 = time.perf_counter()
            stage.copy_kv([Copy(0, 1, tokens)])
            copies.append(time.perf_counter() - t0)
    return {"tokens": tokens, "prefill_s": round(prefill, 4), "copy_s": round(min(copies), 6),
            "prefill_over_copy": round(prefill / min(copies), 1)}


def prefix_table(model: str, dtype: str, threads: int, ranks: int, scenario: str, tiny: bool, prefill_chunk: int,
                 json_path: str | None) -> None:
    """A prefix-cache scenario with the cache on and off (``--no-prefix-cache``), one after the other."""
    settings = (CONVERSATION if scenario == "conversation" else SYSTEM_PROMPT)[tiny]
    print(f"model {model}; scenario {scenario} {settings}; N = {ranks}, {threads} thread(s) per rank, {dtype}, "
          f"prefill chunk {prefill_chunk}; {cpu_flags()}", flush=True)
    rows = []
    for cache in (True, False):
        flags = ("--prefill-chunk", str(prefill_chunk)) + (() if cache else ("--no-prefix-cache",))
        if scenario == "conversation":
            c = settings
            longest = c["first"] + c["turns"] * (c["answer"] + c["question"])
            with serving(model, dtype, threads, ranks, ranks, longest + 1, 8, flags) as url:
                turns = conversation_turns(url, model, c)
            ttfts = [t for t, _ in turns]
            row = {"cache": cache, "ttft_s_per_turn": [round(t, 4) for t in ttfts],
                   "cached_tokens_per_turn": [n for _, n in turns],
                   "ttft_later_turns_mean_s": round(sum(ttfts[1:]) / len(ttfts[1:]), 4)}
            print(f"cache {'on ' if cache else 'off'}: time to first token per turn "
                  f"{', '.join(f'{t:.3f}' for t in ttfts)} s; prompt tokens from the cache "
                  f"{', '.join(str(n) for _, n in turns)}", flush=True)
        else:
            c = settings
            ids = workload(model, c["clients"] + 1, c["system"] + c["question"])
            prompts = [ids[0][: c["system"]] + q[-c["question"]:] for q in ids[1:]]
            with serving(model, dtype, threads, ranks, c["clients"], c["system"] + c["question"] + c["new_tokens"] + 1,
                         c["clients"], flags) as url:
                row = {"cache": cache, **load_server(url, prompts, c["clients"], c["new_tokens"])}
            print(f"cache {'on ' if cache else 'off'}: TTFT p50 {row['ttft_p50_s']:.3f} s, p95 {row['ttft_p95_s']:.3f} s; "
                  f"{row['prompt_tokens_cached']} prompt tokens from the cache", flush=True)
        rows.append(row)
    key = "ttft_later_turns_mean_s" if scenario == "conversation" else "ttft_p50_s"
    ratio = rows[1][key] / rows[0][key]
    print(f"{key}: {ratio:.2f}x shorter with the cache", flush=True)
    cost = None
    if scenario == "system-prompt":
        cost = copy_vs_prefill(model, dtype, threads, settings["system"], prefill_chunk)
        print(f"one rank, every layer: prefilling the {cost['tokens']}-token system prompt {cost['prefill_s']:.3f} s, "
              f"copying its KV to another slot {1000 * cost['copy_s']:.2f} ms ({cost['prefill_over_copy']:.0f}x less)",
              flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps({"model": model, "cpu": cpu_flags(), "ranks": ranks, "dtype": dtype,
                                               "scenario": scenario, "settings": settings,
                                               "prefill_chunk": prefill_chunk, "rows": rows,
                                               "ratio": round(ratio, 3), "copy_vs_prefill": cost}, indent=1))


def _with_tokenizer(model: str, out: Path, bpe: bool = False) -> str:
    """``model`` itself if it has a tokenizer; else a directory of links to its files plus a
    word-level tokenizer of made-up words ``t0``, ``t1``, ... covering its vocabulary (the server
    needs one to show text; random benchmark checkpoints have none), or with ``bpe`` a byte-level
    BPE of the whole vocabulary (``bpe_tokenizer``), as a grammar engine needs."""
    from mdi_mpi.requests import TOKENIZER_FILES

    src = Path(model).resolve()
    if any((src / f).is_file() for f in TOKENIZER_FILES):
        return model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    for f in src.iterdir():
        (out / f.name).symlink_to(f)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    if bpe:
        bpe_tokenizer(vocab).save_pretrained(out)
        return str(out)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(out)
    return str(out)


def bpe_tokenizer(vocab: int):
    """A byte-level BPE of ``vocab`` tokens (the last being ``</s>``), trained on this Python's own
    library sources and cached: a real tokenizer's size and shape, built without a download."""
    import sysconfig

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mdi_mpi.probes import cache_dir

    folder = cache_dir() / f"bench-bpe-{vocab}"
    if not (folder / "tokenizer.json").is_file():
        files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:3000]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab - 1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator((f.read_text(errors="ignore") for f in files), trainer=trainer)
        tok.add_special_tokens(["</s>"])
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def mxfp4_load(work: Path, threads: int, rounds: int = 3) -> dict:
    """gpt-oss-20b's experts of one layer at their real widths (32 experts, gate_up [5760, 2880] and
    down [2880, 2880]), loaded into bf16 as ``load_stage`` does: from MXFP4 (read and decoded), from
    transformers' bf16 layout (read, transposed, de-interleaved), and the plain read of the same bf16
    bytes. Seconds on ``threads`` torch threads, the best of ``rounds`` from the page cache, and
    once each from the disk where this process may drop the page cache (root)."""
    import time

    import torch
    from safetensors.torch import save_file

    from mdi_mpi.checkpoint import Checkpoint, decode_mxfp4, read_expert

    torch.set_num_threads(threads)
    _, config = FAMILY_SHAPES["gpt-oss-20b"]
    config = {**config, "num_hidden_layers": 1, "layer_types": config["layer_types"][:1], "model_type": "gpt_oss"}
    n_exp, d, inter = config["num_local_experts"], config["hidden_size"], config["intermediate_size"]
    shapes = {"gate_up_proj": (2 * inter, d), "down_proj": (d, inter)}  # ours: [out, in] per expert
    g = torch.Generator().manual_seed(0)
    dirs = {k: work / k for k in ("mxfp4", "bf16", "plain")}
    stored: dict[str, dict] = {k: {} for k in dirs}
    for name, (n_out, n_in) in shapes.items():
        key = f"model.layers.0.mlp.experts.{name}"
        blocks = torch.randint(0, 256, (n_exp, n_out, n_in // 32, 16), dtype=torch.uint8, generator=g)
        scales = torch.randint(118, 132, (n_exp, n_out, n_in // 32), dtype=torch.uint8, generator=g)
        stored["mxfp4"] |= {f"{key}_blocks": blocks, f"{key}_scales": scales}
        decoded = torch.stack([decode_mxfp4(b, s, torch.bfloat16) for b, s in zip(blocks, scales)])  # [E, out, in]
        stored["bf16"][key] = decoded.transpose(1, 2).contiguous()  # transformers' [E, in, out], rows interleaved
        stored["plain"][key] = decoded
    for k, path in dirs.items():
        path.mkdir()
        save_file(stored[k], path / "model.safetensors")
        quant = {"quantization_config": {"quant_method": "mxfp4"}} if k == "mxfp4" else {}
        (path / "config.json").write_text(json.dumps({**config, **quant}))
    del stored, decoded

    def load(k: str) -> float:
        ckpt = Checkpoint(dirs[k])
        t = time.perf_counter()
        for name, shape in shapes.items():
            out = torch.empty((n_exp, *shape), dtype=torch.bfloat16)
            if k == "plain":
                ckpt.read_into(f"model.layers.0.mlp.experts.{name}", out)
                continue
            for e in range(n_exp):
                read_expert(ckpt, f"layers.0.mlp.experts.{name}", e, out[e])
        return time.perf_counter() - t

    drop = Path("/proc/sys/vm/drop_caches")
    cold = {}
    if os.access(drop, os.W_OK):
        for k in dirs:
            os.sync()
            drop.write_text("3\n")
            cold[k] = load(k)
    runs: dict[str, list[float]] = {k: [] for k in dirs}
    for _ in range(rounds):  # interleaved
        for k in dirs:
            runs[k].append(load(k))
    warm = {k: min(v) for k, v in runs.items()}
    sizes = {k: (dirs[k] / "model.safetensors").stat().st_size for k in dirs}
    return {"threads": threads, "experts": n_exp, "shapes": shapes, "file_bytes": sizes, "warm_s": warm, "cold_s": cold,
            "mxfp4_vs_plain_warm": warm["mxfp4"] / warm["plain"],
            "mxfp4_vs_plain_cold": cold["mxfp4"] / cold["plain"] if cold else None}


def hot_path(model: str, dtype: str, tokens: int = 64) -> dict:
    """Profile single-process decode: what torch allocates per token and whether RSS grows. The
    model is set up as ``generate`` sets it up (``job.start``, one rank, one thread, one slot)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mdi_mpi.config import parse_dtype
    from mdi_mpi.job import JobSpec, Prepared, start
    from mdi_mpi.kv_cache import Batch
    from mdi_mpi.layout import Layout
    from mdi_mpi.transport import world

    spec = JobSpec(model, parse_dtype(dtype), threads=1, layout=Layout(max_seq_len=2 * tokens + 32, slots=1))
    stage = start(world(), spec, lambda config, tokenizer_dir, max_seq_len: Prepared(None, 1)).stage
    token = torch.tensor([5])

    def rss() -> int:  # resident bytes now
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def decode(first: int, n: int) -> None:
        for pos in range(first, first + n):
            stage(token, Batch.make([0], [pos], [1]))

    with torch.inference_mode():
        stage(torch.arange(3, 19), Batch.make([0], [0], [16]))
        decode(16, 8)  # warm-up: the allocator reaches its steady state
        before = rss()
        decode(24, tokens)
        after = rss()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            decode(24 + tokens, tokens)
    events = [e for e in prof.key_averages() if e.self_cpu_memory_usage > 0]
    allocated = sum(e.self_cpu_memory_usage for e in events)
    return {
        "tokens": tokens,
        "torch_bytes_allocated_per_token": allocated // tokens,
        "rss_growth_over_the_tokens_bytes": after - before,
        "top_allocating_ops": sorted(((e.key, e.self_cpu_memory_usage // tokens) for e in events), key=lambda x: -x[1])[:6],
    }


# --profile: torch op names by where a decode step's time goes
PROFILE_KINDS = {
    "matmul kernels": ("linear", "mm", "addmm", "mv", "addmv", "addmv_", "matmul", "_weight_int8pack_mm", "_weight_int4pack_mm",
                       "_weight_int4pack_mm_for_cpu", "qlinear_pointwise", "bmm"),
    "attention": ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu", "softmax", "_softmax",
                  "index_copy_", "copy_", "narrow", "slice"),
    "norms, RoPE, activations": ("pow", "mean", "rsqrt", "mul", "add", "sub", "neg", "cat", "silu", "to", "_to_copy",
                                 "float", "type_as", "view_as_real", "stack"),
    "tensor views and allocation": ("as_strided", "empty", "empty_strided", "view", "reshape", "transpose", "unsqueeze",
                                    "select", "expand", "contiguous", "clone", "zeros", "index", "t", "resize_"),
}


def step_profile(model: str, dtype: str, quant: str | None, tokens: int = 32) -> dict:
    """Where one decode step's time goes on one rank of one thread (the whole model, one slot, set
    up as ``generate`` sets it up): each category's share of the wall time, from torch's profiler
    (the ops' own CPU time), and the rest, Python and the framework between the ops."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    from mdi_mpi.config import parse_dtype
    from mdi_mpi.job import JobSpec, Prepared, start
    from mdi_mpi.kv_cache import Batch
    from mdi_mpi.layout import Layout
    from mdi_mpi.quant import Quant
    from mdi_mpi.transport import world

    layout = Layout(max_seq_len=3 * tokens + 32, slots=1, quant=None if quant is None else Quant(quant))
    stage = start(world(), JobSpec(model, parse_dtype(dtype), threads=1, layout=layout),
                  lambda config, tokenizer_dir, max_seq_len: Prepared(None, 1)).stage
    token = torch.tensor([5])

    def decode(first: int, n: int) -> float:
        t0 = time.perf_counter()
        for pos in range(first, first + n):
            stage.head(stage.forward_layers(stage.embed(token), Batch.make([0], [pos], [1])))
        return time.perf_counter() - t0

    with torch.inference_mode():
        stage.forward_layers(stage.embed(torch.arange(3, 19)), Batch.make([0], [0], [16]))
        decode(16, 8)
        plain = decode(24, tokens)  # without the profiler's own cost
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall = decode(24 + tokens, tokens)
    names = {name: kind for kind, ops in PROFILE_KINDS.items() for name in ops}
    spent = dict.fromkeys([*PROFILE_KINDS, "other ops"], 0.0)
    others = []
    for e in prof.key_averages():
        kind = names.get(e.key.split("::")[-1], "other ops")
        spent[kind] += e.self_cpu_time_total / 1e6
        if kind == "other ops":
            others.append((e.key, round(e.self_cpu_time_total / 1e6 / wall, 3)))
    shares = {k: round(v / wall, 3) for k, v in spent.items()}
    shares["Python and the framework"] = round(1 - sum(shares.values()), 3)
    return {"dtype": dtype, "quant": quant or "none", "ms_per_token": round(plain / tokens * 1e3, 2),
            "ms_per_token_profiled": round(wall / tokens * 1e3, 2), "shares": shares,
            "top_other_ops": sorted(others, key=lambda o: -o[1])[:8]}


def configurations(ranks: list[int], slots: list[str], hf: bool, hf_threads: list[int],
                   hf_batches: list[int] | None = None, mb1: bool = True, tps: tuple[int, ...] = (1,)) -> list[dict]:
    """The configurations of one table: transformers baselines (batch sizes ``hf_batches``, default:
    the slot counts at N = 1), then mdi-mpi per N, T (each of ``tps`` that divides N), K, and
    micro-batching (with ``mb1``, also one slot per message)."""
    out = []
    for n in ranks:
        ks = sorted({_slot_count(k, n) for k in slots})
        for t in [t for t in tps if n % t == 0]:
            stages = n // t
            for k in ks:
                out.append({"engine": "mdi-mpi", "ranks": n, "tp": t, "slots": k,
                            "micro_batch": default_micro_batch(k, stages)})
                if mb1 and k > stages:  # without micro-batching: one slot per message, K groups
                    out.append({"engine": "mdi-mpi", "ranks": n, "tp": t, "slots": k, "micro_batch": 1})
    if hf:
        batches = sorted(set(hf_batches) if hf_batches else {_slot_count(k, 1) for k in slots} | {1})
        out = [{"engine": "transformers", "batch": b, "threads": t} for t in hf_threads for b in batches] + out
    return out


def _slot_count(spec: str, n: int) -> int:
    """``"N"``, ``"2N"`` or an integer."""
    spec = spec.strip().upper()
    if spec.endswith("N"):
        return int(spec[:-1] or 1) * n
    return int(spec)


HEADER = f"{'engine':<13}{'N':>3}{'T':>3}{'K':>4}{'MB':>4}{'thr':>4}{'tok/s':>9}{'tok/s/seq':>10}{'TTFT s':>8}  {'peak RSS GiB per rank':<24}{'B/token':>9}  max recv-wait"


def format_row(r: dict) -> str:
    """One configuration's line of the table."""
    rss = ",".join(f"{b / 2**30:.2f}" for b in r["peak_rss_bytes"])
    if r["engine"] == "transformers":
        cfg = f"{'transformers':<13}{1:>3}{'-':>3}{r['batch']:>4}{'-':>4}{r['threads']:>4}"
        extra = f"{'-':>9}  -"
    else:
        cfg = f"{r['engine']:<13}{r['ranks']:>3}{r.get('tp', 1):>3}{r['slots']:>4}{r['micro_batch']:>4}{r['threads']:>4}"
        wait = max(f["recv_wait"] for f in r["fractions"]) if r["ranks"] > 1 else 0.0
        extra = f"{r['bytes_sent_per_token']:>9.0f}  {100 * wait:.1f}%"
    return f"{cfg}{r['tokens_per_s']:>9.2f}{r['tokens_per_s_per_sequence']:>10.2f}{r['ttft_s']:>8.3f}  {rss:<24}{extra}"


def _config_key(r: dict) -> tuple:
    return (r["engine"], r["dtype"], r.get("ranks"), r.get("tp"), r.get("slots"), r.get("micro_batch"), r.get("batch"),
            r["threads"])


def best_and_median(rows: list[dict]) -> list[dict]:
    """Per configuration, over its rounds: the best and the median tokens/s (and the rounds' figures),
    in the order the configurations first ran."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(_config_key(r), []).append(r)
    out = []
    for runs in groups.values():
        tps = sorted(r["tokens_per_s"] for r in runs)
        n = len(tps)
        median = tps[n // 2] if n % 2 else (tps[n // 2 - 1] + tps[n // 2]) / 2
        keys = ("engine", "dtype", "ranks", "tp", "slots", "micro_batch", "batch", "threads")
        out.append({**{k: runs[0][k] for k in keys if k in runs[0]}, "best_tokens_per_s": tps[-1],
                    "median_tokens_per_s": median, "tokens_per_s": [r["tokens_per_s"] for r in runs]})
    return out


SUMMARY_HEADER = f"{'engine':<13}{'N':>3}{'T':>3}{'K':>4}{'MB':>4}{'thr':>4}{'best':>9}{'median':>9}  rounds (tok/s)"


def format_summary(s: dict) -> str:
    """One configuration's line of the best-and-median table."""
    if s["engine"] == "transformers":
        cfg = f"{'transformers':<13}{1:>3}{'-':>3}{s['batch']:>4}{'-':>4}{s['threads']:>4}"
    else:
        cfg = f"{s['engine']:<13}{s['ranks']:>3}{s.get('tp', 1):>3}{s['slots']:>4}{s['micro_batch']:>4}{s['threads']:>4}"
    return f"{cfg}{s['best_tokens_per_s']:>9.2f}{s['median_tokens_per_s']:>9.2f}  " + " ".join(f"{t:.2f}" for t in s["tokens_per_s"])


def read_bandwidth(n_bytes: int = 2**31, rounds: int = 3) -> float:
    """Bytes per second that one thread reads: the best of ``rounds`` sums over ``n_bytes`` (the
    bound that decoding one token at a time, which reads every weight once, cannot beat)."""
    import time

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.ones(n_bytes // 4, dtype=torch.float32)
        best = float("inf")
        for _ in range(rounds):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
        return n_bytes / best
    finally:
        torch.set_num_threads(threads)


def json_table(model: str, dtype: str, threads: int, ranks: int, slots: int, n_requests: int, prompt_len: int,
               new_tokens: int, rounds: int, json_path: str | None, base: str | None) -> None:
    """What constrained decoding costs: ``slots`` clients stream ``n_requests`` completions each
    round, free and then masked by ``LONG_STRING``'s grammar, on one server; with ``base`` (a
    source tree of an earlier mdi-mpi), free requests on that version too, its server started
    after this one's in every round."""
    print(f"model {model}; {n_requests} requests of {prompt_len} prompt tokens, {new_tokens} new tokens greedy, "
          f"{slots} clients; N = {ranks}, K = {slots}, {threads} thread(s) per rank, {dtype}; {cpu_flags()}", flush=True)
    prompts = workload(model, n_requests, prompt_len)
    sides = [("this", None)] + ([("base", {"PYTHONPATH": str(Path(base).resolve() / "src")})] if base else [])
    rows = []
    for rnd in range(1, rounds + 1):
        for side, env in sides:
            with serving(model, dtype, threads, ranks, slots, prompt_len + new_tokens + 1, n_requests,
                         bpe=True, env=env) as url:
                kinds = [("free", None)] + ([("json_schema", {"response_format": LONG_STRING})] if side == "this" else [])
                for kind, extra in kinds:
                    r = {"round": rnd, "version": side, "requests": kind,
                         **load_server(url, prompts, slots, new_tokens, extra)}
                    rows.append(r)
                    print(f"round {rnd}  {side:>4}  {kind:<11}  {r['tokens_per_s']:>8.2f} tokens/s  "
                          f"ITL p50 {r['itl_p50_s']:.4f}s", flush=True)
    best = {}
    for r in rows:
        key = (r["version"], r["requests"])
        best[key] = max(best.get(key, 0.0), r["tokens_per_s"])
    free = best[("this", "free")]
    summary = {"constrained_over_free": round(best[("this", "json_schema")] / free, 3)}
    if base:
        summary["free_over_base"] = round(free / best[("base", "free")], 3)
    print(f"best of {rounds}: " + ", ".join(f"{k} {v}" for k, v in summary.items()), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps({"model": model, "cpu": cpu_flags(), "ranks": ranks, "slots": slots,
                                               "dtype": dtype, "requests": n_requests, "prompt_len": prompt_len,
                                               "new_tokens": new_tokens, "schema": LONG_STRING, "rows": rows,
                                               "best_tokens_per_s": {f"{v} {k}": t for (v, k), t in best.items()},
                                               "summary": summary}, indent=1))


def serve_table(model: str, dtype: str, threads: int, ranks: int, slots: int, clients: list[int], n_requests: int,
                prompt_len: int, new_tokens: int, json_path: str | None) -> None:
    """The serving table: generate on the prompts, then the server under each client count."""
    print(f"model {model}; {n_requests} requests of {prompt_len} prompt tokens, {new_tokens} new tokens greedy; "
          f"N = {ranks}, K = {slots}, {threads} thread(s) per rank, {dtype}; {cpu_flags()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = run_mdi(model, dtype, threads, ranks, slots, default_micro_batch(slots, ranks), prompt_len, new_tokens,
                       Path(tmp), n_requests=n_requests)
    print(f"generate, K = {slots}: {base['tokens_per_s']:.2f} tokens/s", flush=True)
    print("clients  tokens/s  vs generate  TTFT p50  TTFT p95  ITL p50  ITL p95", flush=True)
    rows = run_serve(model, dtype, threads, ranks, slots, clients, n_requests, prompt_len, new_tokens)
    for r in rows:
        r["vs_generate"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
        print(f"{r['clients']:>7}  {r['tokens_per_s']:>8.2f}  {r['vs_generate']:>10.2f}x  {r['ttft_p50_s']:>7.3f}s  "
              f"{r['ttft_p95_s']:>7.3f}s  {r['itl_p50_s']:>6.3f}s  {r['itl_p95_s']:>6.3f}s", flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps({"model": model, "cpu": cpu_flags(), "ranks": ranks, "slots": slots,
                                               "dtype": dtype, "generate_tokens_per_s": base["tokens_per_s"],
                                               "requests": n_requests, "prompt_len": prompt_len,
                                               "new_tokens": new_tokens, "rows": rows}, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mdi_mpi.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", help="checkpoint; default: the TinyLlama-1.1B-shaped random model (built once, ~2.2 GB)")
    p.add_argument("--tiny", action="store_true", help="use the small demo model and few tokens (a quick check)")
    p.add_argument("--shape", choices=("tinyllama", *FAMILY_SHAPES), default="tinyllama",
                   help="random-weight model shape to build and run when no --model is given (default: tinyllama)")
    p.add_argument("--layers", type=positive_int, metavar="L", help="--shape: only the first L decoder layers of the "
                   "shape (for mixtures of experts too big for this machine whole; default: all of them)")
    p.add_argument("--dtypes", default="bfloat16", help="comma-separated dtypes (default: bfloat16)")
    p.add_argument("--ranks", default="1,2,3", help="rank counts N (default: 1,2,3)")
    p.add_argument("--tp", default="1", metavar="T,...", help="ranks per stage (--tp) for mdi-mpi, each with every "
                   "rank count N it divides (default: 1)")
    p.add_argument("--slots", default="1,N,2N,8", help="slot counts K; N means the rank count (default: 1,N,2N,8)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default: 1)")
    p.add_argument("--hf-threads", default="1,2", help="thread counts for the transformers baseline (default: 1,2)")
    p.add_argument("--hf-batches", metavar="B,...", help="batch sizes for the transformers baseline (default: the slot counts at N = 1, and 1)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--quants", default="none", metavar="Q,...", help="weight formats for mdi-mpi: none, int8, int4 (default: none)")
    p.add_argument("--no-mb1", action="store_true", help="skip the one-slot-per-message runs of K > N")
    p.add_argument("--cap", choices=tuple(CAPS), default="none", help="emulate an older CPU: oneDNN and ATen limited to "
                   "AVX2 (avx2) or AVX-512 without bf16 (avx512), for both engines (default: none)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--prefill-chunk", type=int, default=128, help="mdi-mpi's prompt tokens per slot per step (default: 128)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeat", type=positive_int, default=1, metavar="R", help="run the whole table R times, "
                   "every configuration once per round (interleaved), and report each one's best and median tokens/s "
                   "(default: 1)")
    p.add_argument("--json", metavar="FILE", help="write the table as JSON")
    p.add_argument("--hot-path", action="store_true", help="instead of the table: profile what one decode step allocates")
    p.add_argument("--profile", action="store_true", help="instead of the table: where one decode step's time goes "
                   "(one rank, one thread, one slot), for each of --quants: matmul kernels, attention, norms and RoPE, "
                   "other ops, Python")
    p.add_argument("--mxfp4-load", action="store_true", help="instead of the table: time loading one gpt-oss-20b "
                   "layer's experts from MXFP4 against reading the same values in bf16 (writes 2.5 GB in a temporary "
                   "directory)")
    p.add_argument("--serve", metavar="C,...", help="instead of the table: load the server (on the first of --ranks "
                   "and the last of --slots) with C concurrent streaming clients, against generate on the same prompts")
    p.add_argument("--requests", type=int, default=32, help="--serve: requests per client count (default: 32)")
    p.add_argument("--scenario", choices=SCENARIOS, default="distinct", help="--serve: distinct prompts (default: the "
                   "table per client count), or a prefix-cache scenario run with the cache on and off: a conversation "
                   "growing from 1400 to 1700 tokens (N slots), or 16 clients sharing a 1000-token system prompt "
                   "(16 slots); or json: K clients' requests free and then held to a JSON schema by the grammar engine "
                   "(the model gets a byte-level BPE tokenizer of its vocabulary where it has none), --repeat rounds")
    p.add_argument("--base", metavar="DIR", help="--scenario json: also serve free requests with the mdi-mpi source "
                   "tree DIR (an earlier commit), one server after the other in each round")
    args = p.parse_args(argv)

    def body() -> None:
        from mdi_mpi import demo

        check_cap(args.cap)
        if args.mxfp4_load:
            with tempfile.TemporaryDirectory() as tmp:
                result = {"cpu": cpu_flags(), **mxfp4_load(Path(tmp), args.threads)}
            print(json.dumps(result, indent=1))
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1))
            return

        if args.model:
            model = args.model
        elif args.tiny:
            model = str(demo.demo_model())
        elif args.shape == "tinyllama" and args.layers is None:
            model = str(demo.tinyllama_model())
        elif args.shape == "tinyllama":
            raise UserError("--layers applies to the family shapes, not to tinyllama")
        else:
            model = str(demo.family_model(args.shape, layers=args.layers))
        if args.tiny:
            args.new_tokens = min(args.new_tokens, 8)
        if args.hot_path:
            print(json.dumps(hot_path(model, args.dtypes.split(",")[0]), indent=1))
            return
        if args.profile:
            profiles = [step_profile(model, args.dtypes.split(",")[0], None if q == "none" else q)
                        for q in args.quants.split(",")]
            print(json.dumps({"model": model, "cpu": cpu_flags(), "profiles": profiles}, indent=1))
            if args.json:
                Path(args.json).write_text(json.dumps({"model": model, "cpu": cpu_flags(), "profiles": profiles}, indent=1))
            return
        ranks = [int(x) for x in args.ranks.split(",")]
        slots = args.slots.split(",")
        if args.serve and args.scenario == "json":
            json_table(model, args.dtypes.split(",")[0], args.threads, ranks[0], _slot_count(slots[-1], ranks[0]),
                       args.requests, args.prompt_len, args.new_tokens, args.repeat, args.json, args.base)
            return
        if args.serve and args.scenario != "distinct":
            prefix_table(model, args.dtypes.split(",")[0], args.threads, ranks[0], args.scenario, args.tiny,
                         args.prefill_chunk, args.json)
            return
        if args.serve:
            serve_table(model, args.dtypes.split(",")[0], args.threads, ranks[0], _slot_count(slots[-1], ranks[0]),
                        [int(c) for c in args.serve.split(",")], args.requests, args.prompt_len, args.new_tokens, args.json)
            return
        hf_batches = [int(x) for x in args.hf_batches.split(",")] if args.hf_batches else None
        configs = configurations(ranks, slots, not args.no_hf, [int(x) for x in args.hf_threads.split(",")],
                                 hf_batches, mb1=not args.no_mb1, tps=tuple(int(x) for x in args.tp.split(",")))
        bandwidth = read_bandwidth()
        print(f"model {model}; prompts of {args.prompt_len} tokens, {args.new_tokens} new tokens greedy; "
              f"{os.cpu_count()} cores, {args.threads} thread(s) per rank; CPU cap: {args.cap} {CAPS[args.cap]}; "
              f"{cpu_flags()}; read bandwidth {bandwidth / 1e9:.1f} GB/s on 1 thread", flush=True)
        rows, summary = [], []
        with tempfile.TemporaryDirectory() as tmp:
            for dtype in args.dtypes.split(","):
                table = []
                for rnd in range(1, args.repeat + 1):  # rounds: every configuration once per round, interleaved
                    print(f"\ndtype {dtype}" + (f", round {rnd} of {args.repeat}" if args.repeat > 1 else "") +
                          f"\n{HEADER}", flush=True)
                    for c in configs:
                        if c["engine"] == "transformers":
                            r = run_hf(model, dtype, c["threads"], c["batch"], args.prompt_len, args.new_tokens, args.cap)
                            rows_c = [{**c, "dtype": dtype, **r}]
                        else:
                            rows_c = []
                            for q in args.quants.split(","):
                                r = run_mdi(model, dtype, args.threads, c["ranks"], c["slots"], c["micro_batch"],
                                            args.prompt_len, args.new_tokens, Path(tmp), cap=args.cap,
                                            quant=None if q == "none" else q, prefill_chunk=args.prefill_chunk,
                                            tp=c["tp"])
                                rows_c.append({**c, "engine": "mdi-mpi" if q == "none" else f"mdi-{q}", "dtype": dtype,
                                               "threads": args.threads, **r})
                        for row in rows_c:
                            table.append({**row, "round": rnd})
                            print(format_row(row), flush=True)
                rows += table
                if args.repeat > 1:
                    summary += best_and_median(table)
                    print(f"\ndtype {dtype}: best and median of {args.repeat} rounds\n{SUMMARY_HEADER}", flush=True)
                    for s in summary:
                        if s["dtype"] == dtype:
                            print(format_summary(s), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({"model": model, "cpu": cpu_flags(), "cap": args.cap,
                                                   "read_bandwidth_bytes_per_s": bandwidth, "prompt_len": args.prompt_len,
                                                   "new_tokens": args.new_tokens, "repeat": args.repeat, "rows": rows,
                                                   "summary": summary}, indent=1))

    return cli_main(body)


if __name__ == "__main__":
    sys.exit(main())
