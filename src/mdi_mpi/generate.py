"""Command line: ``mpirun -np N python -m mdi_mpi.generate [options]``.

Every rank parses the same flags and plans the same partition; rank 0 also reads and tokenizes the
prompts. Input errors are found before the weights are loaded, reported once by rank 0, and every
rank exits with code 2. Any other failure on any rank prints ``rank R: message`` and aborts the job.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mdi_mpi.errors import UserError
from mdi_mpi.kernels import ROWS
from mdi_mpi.plan import add_plan_arguments
from mdi_mpi.quant import QUANTS

EXIT_USAGE = 2
EXAMPLES = """\
examples:
  python -m mdi_mpi.generate --prompt "Once upon a time"          # demo model, one process
  mpirun -np 3 python -m mdi_mpi.generate --model ~/TinyLlama-1.1B --dtype bf16 \\
      --prompts-file prompts.jsonl --n-samples 4 --temperature 0.8 --output out.jsonl

prompts file: plain text (one prompt per line) or JSONL with "id", "prompt" or "input_ids", and
optional per-request "max_new_tokens", "temperature", "top_k", "top_p", "seed". Use
"--prompts-file -" to read standard input (rank 0's).
"""


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so that all ranks leave together."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)


def build_parser() -> Parser:
    p = Parser(
        prog="python -m mdi_mpi.generate",
        description="Generate text with a Llama-family model split across MPI ranks "
        "(recurrent pipeline parallelism). Run under mpirun/srun for several ranks.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m = p.add_argument_group("model and ranks")
    m.add_argument("--model", metavar="DIR", help="Hugging Face checkpoint directory (safetensors); default: the built-in demo model (random weights)")
    m.add_argument("--dtype", default="auto", help="weights and activations dtype: auto (default: bfloat16, or float32 "
                   "where this CPU decodes float32 at least 1.25x faster and it fits in memory), bfloat16, float32, float16")
    m.add_argument("--max-seq-len", type=int, metavar="L", help="positions per sequence in the KV cache (prompt + generated); default: min(model's max, 2048)")
    m.add_argument("--threads", type=int, metavar="T", help="torch threads per rank; default: the node's cores divided by its ranks")
    m.add_argument("--layers", metavar="A,B,...", help="explicit layer counts per rank, e.g. 6,8,8; default: balanced, rank 0 fewer (it also runs the LM head)")
    add_plan_arguments(m)
    m.add_argument("--kernel", default="auto", choices=("auto", *ROWS), help="matmul kernel for every linear layer: "
                   "auto (default: measured per weight shape on each rank's CPU, cached), or one of mv, row, tile2..tile64")
    m.add_argument("--quant", choices=QUANTS, help="store weights quantized: int8 (per output channel) or int4 (per "
                   "group of --quant-group input columns); the embedding and LM head are int8 with either; default: none")
    m.add_argument("--quant-group", type=int, default=128, metavar="G", help="int4 group size: 32, 64, 128 (default) or 256")
    s = p.add_argument_group("scheduling")
    s.add_argument("--slots", type=int, metavar="K", help="sequences in flight at once; default: max(N, min(requests, 4N))")
    s.add_argument("--micro-batch", type=int, metavar="M", help="slots that travel together as one message; default: ceil(K / N), so that N groups keep N ranks busy")
    s.add_argument("--prefill-chunk", type=int, default=128, metavar="C", help="prompt tokens per slot per step (default: 128)")
    s.add_argument("--timeout", type=float, default=600.0, metavar="S", help="end the job when a rank waits more than S "
                   "seconds for a message, as when a node hangs or drops off the network (default: 600; 0: never)")
    r = p.add_argument_group("requests")
    r.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeatable)")
    r.add_argument("--prompts-file", metavar="FILE", help="prompts, one per line (text or JSONL); - reads standard input")
    r.add_argument("--n-samples", type=int, default=1, metavar="K", help="samples per prompt (default: 1)")
    r.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")
    g = p.add_argument_group("sampling (defaults for every request)")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="default: 64")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 means greedy (default: 0)")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="keep the K most likely tokens; 0: all (default)")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass; 1: all (default)")
    g.add_argument("--seed", type=int, default=0, help="base seed; request i samples from a generator seeded with (seed, i)")
    g.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the EOS token (for benchmarks)")
    o = p.add_argument_group("output")
    o.add_argument("--output", metavar="FILE.jsonl", help="append one JSON record per finished request, as it finishes")
    o.add_argument("--stats-json", metavar="FILE", help="write the run summary (throughput, per-rank time and memory) as JSON")
    o.add_argument("--trace", metavar="FILE.h5", help="record every rank's event timeline into one HDF5 file (see python -m mdi_mpi.trace)")
    o.add_argument("--quiet", action="store_true", help="print no completions on stdout (records still go to --output)")
    return p


@dataclass
class Settings:
    """What rank 0 decides from the requests and every rank needs."""

    n_slots: int
    micro_batch: int
    max_rows: int


class AgreedError(UserError):
    """A user error that every rank knows about, so each can exit on its own."""


def _agree(comm, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank and return its local value; if it raises ``UserError`` on any rank,
    raise ``AgreedError`` on all (naming the rank if not 0)."""
    try:
        value, err = fn(), None
    except UserError as e:
        value, err = None, str(e)
    errors = comm.allgather(err) if comm.Get_size() > 1 else [err]
    for r, e in enumerate(errors):
        if e:
            raise AgreedError(e if r == 0 else f"rank {r}: {e}")
    return value


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def run(args: argparse.Namespace, comm) -> dict:
    """Run the job described by ``args`` on this rank; rank 0 returns the run summary."""
    import torch

    from mdi_mpi import demo
    from mdi_mpi.checkpoint import Checkpoint, load_stage
    from mdi_mpi.config import parse_dtype
    from mdi_mpi.kernels import decode_row_ms, default_cache
    from mdi_mpi.partition import parse_split, split_layers
    from mdi_mpi.pipeline import Recorder, run_first, run_worker, slot_groups
    from mdi_mpi.plan import (
        Plan,
        available_memory,
        check_fit,
        fits,
        layer_speed,
        make_plan,
        peak_rss,
        pick_dtype,
        rank_memory,
        suggestion,
    )
    from mdi_mpi.quant import GROUPS, Quant
    from mdi_mpi.requests import Prompt, build_requests, load_tokenizer, read_prompts_file
    from mdi_mpi.sampling import SamplingParams
    from mdi_mpi.scheduler import Scheduler
    from mdi_mpi.split import read_split, shard_dir
    from mdi_mpi.trace import write_trace
    from mdi_mpi.transport import LocalRing, Ring, local_ranks

    rank, size = comm.Get_rank(), comm.Get_size()
    t0 = time.perf_counter()

    def check_flags() -> None:
        for name in ("max_seq_len", "threads", "slots", "micro_batch", "prefill_chunk", "n_samples", "max_new_tokens"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not args.timeout >= 0:
            raise UserError(f"--timeout must be 0 (never) or a number of seconds, got {args.timeout}")
        if args.dtype != "auto":
            parse_dtype(args.dtype)
        if args.quant_group not in GROUPS:
            raise UserError(f"--quant-group must be one of {', '.join(map(str, GROUPS))}, got {args.quant_group}")
        try:
            SamplingParams(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, tuple(args.stop))
        except ValueError as e:
            raise UserError(str(e)) from None
        _check_launcher(size)
        if not args.prompt and not args.prompts_file:
            raise UserError("no prompts: give --prompt TEXT, --prompts-file FILE, or --prompts-file - for standard input")

    _agree(comm, check_flags)
    threads = args.threads or max(1, (len(os.sched_getaffinity(0)) // local_ranks(comm)))
    torch.set_num_threads(threads)

    # The demo model: rank 0 builds it first; on a cluster without a shared cache each node builds its own.
    is_demo = args.model is None
    if is_demo:
        if rank == 0:
            demo.demo_model()
        comm.Barrier()
        model_dir = str(demo.demo_model())
    else:
        model_dir = os.path.expanduser(args.model)

    def open_checkpoint() -> tuple[Checkpoint, list[int] | None, str, int]:
        # Every rank opens its checkpoint itself (each node may have its own copy or its own shard).
        split = parse_split(args.layers) if args.layers else None
        shards = read_split(model_dir)
        if shards is not None:
            if shards["ranks"] != size:
                raise UserError(f"{model_dir} is split for {shards['ranks']} ranks, but the job has {size}")
            counts = [len(r) for r in shards["layers"]]
            if split is not None and split != counts:
                raise UserError(f"--layers {args.layers} does not match the split's layers {','.join(map(str, counts))}")
            ckpt, tokenizer_dir = Checkpoint(shard_dir(model_dir, rank)), shard_dir(model_dir, 0)
            split = counts
        else:
            ckpt, tokenizer_dir = Checkpoint(model_dir), model_dir
        max_seq_len = args.max_seq_len or min(ckpt.config.max_position_embeddings, 2048)
        ckpt.config.check_context(max_seq_len)
        split_layers(ckpt.config.n_layers, size, split=split)  # fail early on too many ranks or a bad split
        rank_memory(args, size)
        return ckpt, split, tokenizer_dir, max_seq_len

    ckpt, split, tokenizer_dir, max_seq_len = _agree(comm, open_checkpoint)
    cfg = ckpt.config

    tokenizer = None

    def prepare_requests() -> tuple[list, Settings]:
        nonlocal tokenizer
        tokenizer = load_tokenizer(tokenizer_dir)
        prompts = [Prompt(None, text, None) for text in args.prompt]
        if args.prompts_file:
            prompts += read_prompts_file(args.prompts_file)
        if args.stop and tokenizer is None:
            raise UserError("--stop needs a tokenizer, and this checkpoint has none")
        defaults = SamplingParams(
            args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, tuple(args.stop)
        )
        reqs = build_requests(
            prompts, defaults, tokenizer, cfg.vocab_size, max_seq_len, chat=args.chat, n_samples=args.n_samples
        )
        n_slots = args.slots or max(size, min(len(reqs), 4 * size))
        micro = args.micro_batch or -(-n_slots // size)
        if micro > n_slots:
            raise UserError(f"--micro-batch {micro} is larger than --slots {n_slots}")
        return reqs, Settings(n_slots, micro, micro * args.prefill_chunk)

    requests: list = []

    def prepare_on_first() -> Settings | None:
        nonlocal requests
        if rank != 0:
            return None
        requests, settings = prepare_requests()
        return settings

    settings: Settings = comm.bcast(_agree(comm, prepare_on_first), root=0)
    groups = slot_groups(settings.n_slots, settings.micro_batch)

    # Plan with every rank's memory (and speed, for --balance speed), and check that it fits.
    mems = rank_memory(args, size) or comm.allgather(available_memory(local_ranks(comm)))
    quant = Quant(args.quant, args.quant_group) if args.quant else None
    kw = dict(n_slots=settings.n_slots, max_seq_len=max_seq_len, micro_batch=settings.micro_batch,
              prefill_chunk=args.prefill_chunk, quant=quant)
    kernel_cache = default_cache()
    if args.dtype == "auto" and quant is not None:
        dtype, dtype_reason = torch.bfloat16, "bfloat16 (the int8 and int4 kernels are vectorized for bfloat16 activations)"
    elif args.dtype == "auto":
        shape = (cfg.intermediate_size, cfg.hidden_size)
        ms = comm.allgather({d: decode_row_ms(shape, parse_dtype(d), kernel_cache) for d in ("bfloat16", "float32")})
        float32_fits = fits(make_plan(cfg, size, torch.float32, split=split, available=mems, **kw).memory, mems)
        dtype, dtype_reason = pick_dtype({d: sum(m[d] for m in ms) for d in ms[0]}, float32_fits)
    else:
        dtype, dtype_reason = parse_dtype(args.dtype), "given by --dtype"
    speeds = comm.allgather(layer_speed(cfg, dtype)) if args.balance == "speed" and split is None else None

    def plan_and_check() -> Plan:
        plan = make_plan(cfg, size, dtype, split=split, available=mems, balance=args.balance, speeds=speeds, **kw)
        check_fit(plan, lambda: suggestion(cfg, dtype, min(mems), **kw))
        return plan

    plan = _agree(comm, plan_and_check)
    layers = plan.layers[rank]

    t_load = time.perf_counter()
    stage = _agree(comm, lambda: load_stage(ckpt, layers, rank == 0, dtype, quant))
    stage.setup_cache(settings.n_slots, max_seq_len)
    load_s = time.perf_counter() - t_load
    kernels = _agree(comm, lambda: stage.choose_kernels(None if args.kernel == "auto" else args.kernel, kernel_cache))

    ring = (
        LocalRing()
        if size == 1
        else Ring(comm, max(2, len(groups)), settings.micro_batch, settings.max_rows, cfg.hidden_size, dtype,
                  timeout_s=args.timeout or None)
    )
    comm.Barrier()
    rec = Recorder(trace=bool(args.trace))  # origin: just after the barrier, shared by all ranks
    fail_at = _injected_failure(rank)
    if rank == 0:
        if is_demo:
            print(demo.DEMO_WARNING, file=sys.stderr, flush=True)
        out = open(args.output, "a", encoding="utf-8") if args.output else None
        printer = _Printer(tokenizer, len(requests), streaming=len(requests) == 1 and not args.quiet, quiet=args.quiet)

        def on_finish(result) -> None:
            if out is not None:
                out.write(result.to_json() + "\n")
                out.flush()
            printer.finished(result)

        eos = () if args.ignore_eos else cfg.eos_token_ids
        sched = Scheduler(
            requests, settings.n_slots, max_seq_len, args.prefill_chunk, eos, tokenizer,
            on_finish=on_finish, on_token=printer.token,
        )
        try:
            run_first(stage, sched, ring, groups, rec, fail_at=fail_at)
        finally:
            if out is not None:
                out.close()
    else:
        run_worker(stage, ring, rec, fail_at=fail_at)

    mine = {
        "rank": rank,
        "host": socket.gethostname(),
        "layers": [layers.start, layers.stop],
        "weight_bytes": stage.weight_bytes(),
        "kv_cache_bytes": stage.cache_bytes(),
        "predicted_peak_bytes": plan.memory[rank]["peak_bytes"],
        "buffer_bytes": ring.buffer_bytes(),
        "peak_rss_bytes": peak_rss(),
        "load_s": round(load_s, 3),
        "kernels": kernels.describe(),
        "quantized_linears": stage.quant_summary(),
        "threads": threads,
        "bytes_sent": ring.bytes_sent,
        **rec.summary(),
    }
    ranks = comm.gather(mine, root=0)
    events = comm.gather(rec.event_array(), root=0) if args.trace else None
    if rank != 0:
        return {}
    results = sched.results
    n_tokens = sum(len(r.tokens) for r in results)
    summary = {
        "model": model_dir,
        "demo": is_demo,
        "dtype": str(dtype).removeprefix("torch."),
        "dtype_reason": dtype_reason,
        "quant": args.quant,
        "quant_group": args.quant_group if args.quant == "int4" else None,
        "ranks": size,
        "slots": settings.n_slots,
        "micro_batch": settings.micro_batch,
        "prefill_chunk": args.prefill_chunk,
        "max_seq_len": max_seq_len,
        "requests": len(results),
        "generated_tokens": n_tokens,
        "generate_s": round(rec.wall_s, 4),
        "tokens_per_s": round(n_tokens / rec.wall_s, 3) if rec.wall_s else 0.0,
        "tokens_per_s_per_sequence": round(
            sum(len(r.tokens) / r.duration_s for r in results if r.duration_s) / max(1, len(results)), 3
        ),
        "mean_ttft_s": round(sum(r.ttft_s for r in results) / max(1, len(results)), 4),
        "bytes_sent_per_token": round(sum(r["bytes_sent"] for r in ranks) / max(1, n_tokens), 1),
        "startup_s": round(t_load - t0, 3),
        "per_rank": ranks,
    }
    _print_summary(summary)
    if args.stats_json:
        with open(args.stats_json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1)
    if args.trace:
        write_trace(args.trace, summary, groups, events)
    return summary


class _Printer:
    """Completions on stdout: one request streams token by token, several print as they finish."""

    def __init__(self, tokenizer, n_requests: int, streaming: bool, quiet: bool):
        self.tokenizer = tokenizer
        self.streaming = streaming
        self.quiet = quiet
        self.generated: list[int] = []
        self.shown = ""
        self.n_requests = n_requests
        self.n_done = 0
        self.n_tokens = 0
        self.t0 = time.perf_counter()
        self.progress = sys.stderr.isatty() and not streaming

    def token(self, request, token: int) -> None:
        if not self.streaming:
            return
        self.generated.append(token)
        if self.tokenizer is None:
            sys.stdout.write(f"{token} ")
        else:
            text = self.tokenizer.decode(self.generated, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
                return
            sys.stdout.write(text[len(self.shown) :])
            self.shown = text
        sys.stdout.flush()

    def finished(self, result) -> None:
        self.n_done += 1
        self.n_tokens += len(result.tokens)
        if self.progress:  # on a terminal only: never mixed into redirected output
            rate = self.n_tokens / (time.perf_counter() - self.t0)
            end = "\n" if self.n_done == self.n_requests else ""
            print(f"\r{self.n_done}/{self.n_requests} requests, {rate:.1f} tokens/s", end=end, file=sys.stderr, flush=True)
        if self.quiet:
            return
        if self.streaming:
            rest = "" if result.text is None else result.text[len(self.shown) :]
            sys.stdout.write(rest + "\n")
        else:
            body = result.text if result.text is not None else " ".join(map(str, result.tokens))
            sys.stdout.write(f"--- {result.id} ({result.finish_reason}, {len(result.tokens)} tokens)\n{body}\n")
        sys.stdout.flush()


def _print_summary(s: dict) -> None:
    err = sys.stderr
    print(
        f"{s['requests']} requests, {s['generated_tokens']} tokens in {s['generate_s']:.2f} s: "
        f"{s['tokens_per_s']:.2f} tokens/s, mean time to first token {s['mean_ttft_s']:.3f} s "
        f"({s['ranks']} ranks, {s['slots']} slots, micro-batch {s['micro_batch']}, {s['dtype']})",
        file=err,
    )
    for r in s["per_rank"]:
        busy = r["compute_s"] + r["prefill_s"] + r["sample_s"]
        wall = r["wall_s"] or 1.0
        print(
            f"  rank {r['rank']}: layers {r['layers'][0]}-{r['layers'][1] - 1}, weights {_gib(r['weight_bytes'])}, "
            f"KV cache {_gib(r['kv_cache_bytes'])}, peak RSS {_gib(r['peak_rss_bytes'])}, "
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


def _check_launcher(size: int) -> None:
    """Refuse to run as one of several independent one-rank jobs: that is what a plain ``srun``
    does when Slurm has no MPI plugin (``MpiDefault=none``), or an ``mpirun`` of another MPI."""
    if size > 1:
        return
    for var in ("SLURM_NTASKS", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE"):
        n = os.environ.get(var, "1")
        if n.isdigit() and int(n) > 1:
            raise UserError(
                f"this process is a 1-rank MPI job, but {var}={n}: the launcher started {n} separate jobs. "
                "Under Slurm use 'srun --mpi=pmi2' (or pmix, per 'srun --mpi=list'), or mpiexec from the "
                "same MPI that mpi4py was built with"
            )


def _injected_failure(rank: int) -> int | None:
    """Test hook: ``MDI_MPI_FAIL=R:S`` makes rank R raise at its step S."""
    spec = os.environ.get("MDI_MPI_FAIL")
    if not spec:
        return None
    r, step = spec.split(":")
    return int(step) if int(r) == rank else None


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (aborts the whole job on an unexpected failure)."""
    from mdi_mpi.transport import abort, world

    comm = world()
    rank = comm.Get_rank()
    try:
        parser = build_parser()
        if any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv)):
            if rank == 0:
                parser.print_help()
            return 0
        args = _agree(comm, lambda: parser.parse_args(argv))
        run(args, comm)
        return 0
    except AgreedError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except UserError as e:  # found by this rank alone, mid-run: the others must be stopped
        print(f"{'error' if comm.Get_size() == 1 else f'rank {rank}'}: {e}", file=sys.stderr, flush=True)
        if comm.Get_size() > 1:
            abort(comm, EXIT_USAGE)
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 - any failure must end every rank, not hang them
        print(f"rank {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if os.environ.get("MDI_MPI_DEBUG"):
            import traceback

            traceback.print_exc()
        if comm.Get_size() > 1:
            abort(comm, 1)
        return 1


if __name__ == "__main__":
    sys.exit(main())
