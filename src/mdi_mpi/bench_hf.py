"""The transformers row of ``mdi_mpi.bench``: ``generate`` on the benchmark's workload, run by the
bench in a fresh process so that its peak RSS is its own; prints one JSON summary line.

    python -m mdi_mpi.bench_hf MODEL DTYPE THREADS BATCH PROMPT_LEN NEW_TOKENS
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from mdi_mpi.probes import peak_rss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("dtype", help="a torch dtype name: bfloat16, float16, float32")
    p.add_argument("threads", type=int)
    p.add_argument("batch", type=int)
    p.add_argument("prompt_len", type=int)
    p.add_argument("new_tokens", type=int)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len), generator=g)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **kw)
        wall = time.perf_counter() - t
    n = (out.shape[1] - args.prompt_len) * args.batch
    print(json.dumps({"tokens_per_s": n / wall, "tokens_per_s_per_sequence": n / wall / args.batch, "ttft_s": ttft,
                      "generated_tokens": n, "peak_rss_bytes": [peak_rss()]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
