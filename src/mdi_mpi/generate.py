"""Command line: ``mpirun -np N python -m mdi_mpi.generate [options]``.

Every rank parses the same flags and sets the job up the same way (``job.py``); rank 0 also reads
and tokenizes the prompts, runs the scheduler and writes the results as they finish.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING

from mdi_mpi.cli import Parser, add_job_arguments, positive_int
from mdi_mpi.errors import UserError
from mdi_mpi.job import Job, JobSpec, Prepared, start
from mdi_mpi.process import run_command
from mdi_mpi.scheduler import Listener

if TYPE_CHECKING:
    from mdi_mpi.pipeline import Recorder
    from mdi_mpi.transport import Comm

EXAMPLES = """\
examples:
  python -m mdi_mpi.generate --prompt "Once upon a time"          # demo model, one process
  mpirun -np 3 python -m mdi_mpi.generate --model ~/TinyLlama-1.1B --dtype bf16 \\
      --prompts-file prompts.jsonl --n-samples 4 --temperature 0.8 --output out.jsonl

prompts file: plain text (one prompt per line) or JSONL with "id", "prompt" or "input_ids", and
optional per-request "max_new_tokens", "temperature", "top_k", "top_p", "seed",
"presence_penalty", "frequency_penalty" and "logit_bias" ({"token id": bias from -100 to 100}).
Use "--prompts-file -" to read standard input (rank 0's).
"""


def build_parser() -> Parser:
    p = Parser(
        prog="python -m mdi_mpi.generate",
        description="Generate text with a Llama-family model split across MPI ranks "
        "(recurrent pipeline parallelism). Run under mpirun/srun for several ranks.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_job_arguments(p)
    r = p.add_argument_group("requests")
    r.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    r.add_argument("--prompts-file", metavar="FILE", help="prompts, one per line (text or JSONL); - reads standard input")
    r.add_argument("--n-samples", type=positive_int, default=1, metavar="K", help="samples per prompt (default: 1)")
    r.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    g = p.add_argument_group("sampling (defaults for every request)")
    g.add_argument("--max-new-tokens", type=positive_int, default=64, metavar="N", help="default: 64")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 means greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens; 0: all (default)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass; 1: all (default)")
    g.add_argument("--seed", type=int, default=0, help="base seed; request i samples from a generator seeded with (seed, i)")
    g.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    g.add_argument("--presence-penalty", type=float, default=0.0, metavar="P",
                   help="subtract P (-2 to 2) from the logit of every token generated so far (default: 0)")
    g.add_argument("--frequency-penalty", type=float, default=0.0, metavar="F",
                   help="subtract F (-2 to 2) from a token's logit per time it was generated (default: 0)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the EOS token (for benchmarks)")
    o = p.add_argument_group("output")
    o.add_argument("--output", metavar="FILE.jsonl", help="append one JSON record per finished request, as it finishes")
    o.add_argument("--resume", action="store_true", help="skip the requests whose id is already in --output (a job "
                   "that was stopped or requeued carries on; a torn last line is dropped and its request redone)")
    o.add_argument("--stats-json", metavar="FILE", help="write the run summary (throughput, per-rank time and memory) as JSON")
    o.add_argument("--trace", metavar="FILE.h5", help="record every rank's event timeline into one HDF5 file (see python -m mdi_mpi.trace)")
    o.add_argument("--quiet", action="store_true", help="print no completions on stdout (records still go to --output)")
    return p


def run(args: argparse.Namespace, spec: JobSpec, comm: Comm) -> dict:
    """Run the generation job described by ``args`` on this rank; rank 0 returns the run summary."""
    from mdi_mpi import demo
    from mdi_mpi.requests import Prompt, build_requests, finished_ids, load_tokenizer, read_prompts_file, stop_token_ids
    from mdi_mpi.sampling import SamplingParams, to_sampling_params

    def check() -> SamplingParams:
        if not args.prompt and not args.prompts_file:
            raise UserError("no prompts: give --prompt TEXT, --prompts-file FILE, or --prompts-file - for standard input")
        if args.resume and not args.output:
            raise UserError("--resume needs --output: the file whose finished requests are skipped")
        try:
            return to_sampling_params(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                                      ignore_eos=args.ignore_eos, presence_penalty=args.presence_penalty,
                                      frequency_penalty=args.frequency_penalty)
        except ValueError as e:
            raise UserError(str(e)) from None

    def prepare(config, tokenizer_dir: str, max_seq_len: int) -> Prepared:
        tokenizer = load_tokenizer(tokenizer_dir)
        prompts = [Prompt(None, text, None) for text in args.prompt]
        if args.prompts_file:
            prompts += read_prompts_file(args.prompts_file)
        if args.stop and tokenizer is None:
            raise UserError("--stop needs a tokenizer, and this checkpoint has none")
        reqs = build_requests(prompts, check(), tokenizer, config.vocab_size, max_seq_len, chat=args.chat,
                              n_samples=args.n_samples)
        if args.resume:
            seen: set[str] = set()
            for r in reqs:
                if r.id in seen:
                    raise UserError(f"--resume needs unique request ids, and {r.id!r} appears twice")
                seen.add(r.id)
            done = finished_ids(args.output)
            reqs = [r for r in reqs if r.id not in done]  # each keeps its index, so its seed: same tokens
            print(f"resuming: {len(seen) - len(reqs)} of {len(seen)} requests already in {args.output}",
                  file=sys.stderr, flush=True)
        return Prepared((reqs, stop_token_ids(config.eos_token_ids, tokenizer_dir, tokenizer)), len(reqs), tokenizer)

    job = start(comm, spec, prepare, check=check)
    if job.rank != 0:
        return _summarize(job, job.run(trace=spec.trace), None, args)
    if job.is_demo:
        print(demo.DEMO_NOTE, file=sys.stderr, flush=True)
    (requests, eos), tokenizer = job.prepared.items, job.prepared.tokenizer
    out = open(args.output, "a", encoding="utf-8") if args.output else None
    printer = _Printer(len(requests), out, tokenizer is not None, streaming=len(requests) == 1 and not args.quiet,
                       quiet=args.quiet)
    sched = job.scheduler(eos, tokenizer, printer)
    sched.add(requests)
    try:
        rec = job.run(sched, trace=spec.trace)
    finally:
        if out is not None:
            out.close()
    return _summarize(job, rec, printer, args)


def _summarize(job: Job, rec: Recorder, printer: _Printer | None, args: argparse.Namespace) -> dict:
    """Gather every rank's figures; rank 0 prints the summary and writes the stats and the trace."""
    from mdi_mpi.trace import write_trace

    ranks = job.gather(job.rank_stats(rec))
    events = job.gather(rec.event_array()) if args.trace else None
    if job.rank != 0:
        return {}
    n_done, n_tokens = printer.n_done, printer.n_tokens
    summary = {
        **job.describe(),
        "prefill_chunk": args.prefill_chunk,
        "requests": n_done,
        "generated_tokens": n_tokens,
        "generate_s": round(rec.wall_s, 4),
        "tokens_per_s": round(n_tokens / rec.wall_s, 3) if rec.wall_s else 0.0,
        "tokens_per_s_per_sequence": round(printer.rate_sum / max(1, n_done), 3),
        "mean_ttft_s": round(printer.ttft_sum / max(1, n_done), 4),
        "prompt_tokens": printer.prompt_tokens,
        "prompt_tokens_cached": printer.cached_tokens,
        "bytes_sent_per_token": round(sum(r["bytes_sent"] for r in ranks) / max(1, n_tokens), 1),
        "per_rank": ranks,
    }
    print_summary(summary)
    if args.stats_json:
        with open(args.stats_json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    if args.trace:
        write_trace(args.trace, summary, job.groups, events)
    return summary


class _Printer(Listener):
    """Rank 0's view of the run: appends each finished record to the output file, prints completions
    on stdout (one request streams token by token, never showing a stop string nor text that may begin
    one; several print as they finish) and keeps the totals of the summary."""

    def __init__(self, n_requests: int, out, decoded: bool, streaming: bool, quiet: bool):
        self.out = out
        self.decoded = decoded  # False: the checkpoint has no tokenizer, so tokens print as ids
        self.streaming = streaming
        self.quiet = quiet
        self.n_requests = n_requests
        self.n_done = self.n_tokens = 0
        self.prompt_tokens = self.cached_tokens = 0
        self.ttft_sum = self.rate_sum = 0.0
        self.t0 = time.perf_counter()
        self.progress = sys.stderr.isatty() and not streaming

    def token(self, step) -> None:
        if self.streaming:
            sys.stdout.write(step.text if self.decoded else f"{step.token} ")
            sys.stdout.flush()

    def admitted(self, request, cached) -> None:
        self.prompt_tokens += len(request.input_ids)
        self.cached_tokens += cached

    def finished(self, request, result) -> None:
        if self.out is not None:
            self.out.write(result.to_json() + "\n")
            self.out.flush()
        self.n_done += 1
        self.n_tokens += len(result.tokens)
        self.ttft_sum += result.ttft_s or 0.0
        self.rate_sum += len(result.tokens) / result.duration_s if result.duration_s else 0.0
        if self.progress:  # on a terminal only: never mixed into redirected output
            rate = self.n_tokens / (time.perf_counter() - self.t0)
            end = "\n" if self.n_done == self.n_requests else ""
            print(f"\r{self.n_done}/{self.n_requests} requests, {rate:.1f} tokens/s", end=end, file=sys.stderr, flush=True)
        if self.quiet:
            return
        if self.streaming:
            sys.stdout.write("\n")
        else:
            body = result.text if result.text is not None else " ".join(map(str, result.tokens))
            sys.stdout.write(f"--- {result.id} ({result.finish_reason}, {len(result.tokens)} tokens)\n{body}\n")
        sys.stdout.flush()


def print_summary(s: dict) -> None:
    """The run summary on stderr: throughput, then each rank's layers, memory and time split."""
    from mdi_mpi.layout import gib

    err = sys.stderr
    print(
        f"{s['requests']} requests, {s['generated_tokens']} tokens in {s['generate_s']:.2f} s: "
        f"{s['tokens_per_s']:.2f} tokens/s, mean time to first token {s['mean_ttft_s']:.3f} s "
        f"({s['ranks']} ranks, {s['slots']} slots, micro-batch {s['micro_batch']}, {s['dtype']})",
        file=err,
    )
    if s["prompt_tokens_cached"]:
        print(f"  prefix cache: {s['prompt_tokens_cached']} of {s['prompt_tokens']} prompt tokens found in the cache",
              file=err)
    for r in s["per_rank"]:
        busy = r["compute_s"] + r["prefill_s"] + r["sample_s"]
        wall = r["wall_s"] or 1.0
        print(
            f"  rank {r['rank']}: layers {r['layers'][0]}-{r['layers'][1] - 1}, weights {gib(r['weight_bytes'])}, "
            f"KV cache {gib(r['kv_cache_bytes'])}, peak RSS {gib(r['peak_rss_bytes'])}, "
            f"busy {100 * busy / wall:.0f}%, waiting {100 * r['recv_wait_s'] / wall:.0f}%",
            file=err,
        )
    print(f"  dtype: {s['dtype_reason']}", file=err)
    if s["quant"]:
        q = s["per_rank"]
        counts = {k: sum(r["quantized_linears"][k] for r in q) for k in ("int4", "int8", "none")}
        print(f"  quantized: {s['quant']}" + (f" (group {s['quant_group']})" if s["quant_group"] else "")
              + f"; decoder linears: {counts['int4']} int4, {counts['int8']} int8, {counts['none']} unquantized;"
              " embedding and LM head int8", file=err)
    for r in s["per_rank"]:
        k = r["kernels"]
        shapes = "; ".join(
            f"{key.split('|')[0]} {v['decode']['1']}, {v['decode']['8']}"
            + ("" if key.endswith("|head") else f" / {v['prefill']['16']}, {v['prefill']['64']}")
            for key, v in k["shapes"].items()
        )
        if shapes:
            print(f"  rank {r['rank']} kernels ({k['measured']} shapes measured, {k['cached']} cached, {k['seconds']:.2f} s) "
                  f"for 1, 8 decode rows / 16, 64 prompt rows: {shapes}", file=err)
        if k["quant"]:
            quant = "; ".join(f"{key.split('|')[1]} {c['kernel']}" + (" row by row" if c["row_by_row"] else "")
                              for key, c in k["quant"].items())
            print(f"  rank {r['rank']} quantized kernels: {quant}", file=err)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (aborts the whole job on an unexpected failure)."""
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
