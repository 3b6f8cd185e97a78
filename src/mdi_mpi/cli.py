"""The flags that several commands share, their argparse types, and their parsing into typed values.

Only command-line modules import this module; everything below them takes the typed values it
builds (``Layout``, ``JobSpec``) and never sees argparse.
"""

from __future__ import annotations

import argparse

from mdi_mpi.config import parse_dtype
from mdi_mpi.errors import UserError
from mdi_mpi.job import JobSpec
from mdi_mpi.kernels import ROWS
from mdi_mpi.layout import BALANCES, DEFAULT_PREFILL_CHUNK, Layout
from mdi_mpi.partition import parse_bytes, parse_split
from mdi_mpi.quant import KERNELS, QUANTS, Quant


class Parser(argparse.ArgumentParser):
    """argparse that raises ``UserError`` instead of exiting, so that all ranks leave together."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (a count of slots, ranks, tokens...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_layout_arguments(p, prefix_cache: bool = True) -> None:
    """The flags that say how a model is laid out over the ranks and what the plan assumes, shared
    by generate, serve, perplexity, plan and split (one name, type, default and help each);
    ``prefix_cache``: with ``--cache-slots`` (not perplexity's, which reuses no prefix)."""
    p.add_argument("--layers", metavar="A,B,...", help="explicit layer counts per rank, e.g. 6,8,8 (wins over "
                   "--balance); default: balanced, rank 0 fewer (it also runs the LM head)")
    p.add_argument("--quant", choices=QUANTS, help="store weights quantized: int8 (per output channel) or int4 (per "
                   "group of --quant-group input columns); the embedding and LM head are int8 with either; default: none")
    p.add_argument("--quant-group", type=positive_int, metavar="G", help="int4 group size: 32, 64, 128 (default) or 256")
    p.add_argument("--max-seq-len", type=positive_int, metavar="L", help="positions per sequence in the KV cache; "
                   "default: min(model's max, 2048)")
    p.add_argument("--slots", type=positive_int, metavar="K", help="sequences in flight at once; default: generate "
                   "max(N, min(requests, 4N)), serve 4N, plan and split N")
    p.add_argument("--micro-batch", type=positive_int, metavar="M", help="slots that travel together as one message; "
                   "default: ceil(K / N), so that N groups keep N ranks busy")
    p.add_argument("--prefill-chunk", type=positive_int, default=DEFAULT_PREFILL_CHUNK, metavar="C",
                   help=f"prompt tokens per slot per step (default: {DEFAULT_PREFILL_CHUNK})")
    if prefix_cache:
        p.add_argument("--cache-slots", type=int, default=0, metavar="S", help="KV slots beyond --slots that only "
                       "keep prompt prefixes for later requests, in the memory plan like any slot (default: 0)")
    p.add_argument("--mem-per-rank", metavar="SIZE", help="memory of every rank, e.g. 4GiB (default for generate: "
                   "the node's available memory divided by its ranks)")
    p.add_argument("--mem", metavar="A,B,...", help="memory of each rank, e.g. 8GiB,4GiB,4GiB")
    p.add_argument("--balance", choices=BALANCES, default="cost",
                   help="how to split layers: cost (default: even compute, rank 0 runs the head), memory "
                   "(in proportion to rank memory), speed (in proportion to measured speed, within memory)")
    p.add_argument("--tp", type=positive_int, default=1, metavar="T", help="tensor parallelism: T ranks (a power of two) "
                   "hold each pipeline stage together, splitting its attention heads and MLP, so that one sequence gets "
                   "faster; the job's N ranks make N/T stages, ranks sT..sT+T-1 stage s (default: 1, a pipeline)")
    p.add_argument("--tp-parts", type=positive_int, metavar="C", help="blocks each split weight is computed in "
                   "(a multiple of --tp that divides the KV heads): jobs with the same C give the same tokens whatever "
                   "their --tp, at some cost in speed; default: --tp")


def add_job_arguments(p: argparse.ArgumentParser, prefix_cache: bool = True) -> None:
    """The model, rank and scheduling flags every MPI command shares (parsed by ``job_spec``);
    ``prefix_cache``: with the prefix cache's flags (generate and serve)."""
    m = p.add_argument_group("model, ranks and scheduling")
    m.add_argument("--model", metavar="DIR", help="Hugging Face checkpoint directory (safetensors) or split shards; "
                   "default: the built-in demo model (trained on Python's standard library)")
    m.add_argument("--dtype", default="auto", help="weights and activations dtype: auto (default: bfloat16, or float32 "
                   "where this CPU decodes float32 at least 1.25x faster and it fits in memory), bfloat16, float32, float16")
    m.add_argument("--kernel", default="auto", choices=("auto", *ROWS), help="matmul kernel for every linear layer: "
                   "auto (default: measured per weight shape on each rank's CPU, cached), or one of mv, row, tile2..tile256")
    m.add_argument("--quant-kernel", default="auto", choices=("auto", *KERNELS["int8"]), help="kernel of int8 weights "
                   "(--quant int8, int4 shapes that fall back to int8, the int8 LM head): auto (default: the faster on each rank's CPU, "
                   "measured per weight shape, cached), w8 (activations in the model dtype) or w8a8 (activations rounded "
                   "to int8 per row, exact integer dot products; needs VNNI or AMX on x86)")
    m.add_argument("--threads", type=positive_int, metavar="T", help="torch threads per rank; default: the node's cores divided by its ranks")
    add_layout_arguments(m, prefix_cache)
    if prefix_cache:
        m.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                       help="compute every prompt from its first token (default: a request skips the whole prompt "
                       "chunks whose KV a slot holds from an earlier request, with the same tokens as without)")
    m.add_argument("--timeout", type=float, default=600.0, metavar="S", help="end the job when a rank waits more than S "
                   "seconds for a message, as when a node hangs or drops off the network (default: 600; 0: never)")


def layout_of(args: argparse.Namespace) -> Layout:
    """The layout flags as a ``Layout``; ``UserError`` for a value that does not parse."""
    if args.mem_per_rank and args.mem:
        raise UserError("give --mem-per-rank or --mem, not both")
    cache_slots, prefix_cache = getattr(args, "cache_slots", 0), getattr(args, "prefix_cache", False)
    if cache_slots < 0:
        raise UserError(f"--cache-slots must be 0 or more, got {cache_slots}")
    if cache_slots and not getattr(args, "prefix_cache", True):
        raise UserError("--cache-slots keeps prefixes for the prefix cache: drop it or --no-prefix-cache")
    try:
        quant = Quant(args.quant, args.quant_group or 128) if args.quant else None
    except ValueError as e:
        raise UserError(str(e)) from None
    return Layout(
        split=tuple(parse_split(args.layers)) if args.layers else None,
        quant=quant,
        quant_group=args.quant_group,
        max_seq_len=args.max_seq_len,
        slots=args.slots,
        micro_batch=args.micro_batch,
        prefill_chunk=args.prefill_chunk,
        prefix_cache=prefix_cache,
        cache_slots=cache_slots,
        mem_per_rank=parse_bytes(args.mem_per_rank) if args.mem_per_rank else None,
        mem=tuple(parse_bytes(m) for m in args.mem.split(",")) if args.mem else None,
        balance=args.balance,
        tp=args.tp,
        tp_parts=args.tp_parts,
    )


def job_spec(args: argparse.Namespace) -> JobSpec:
    """The shared job flags (``add_job_arguments``, and ``--trace`` where a command has it) as a
    ``JobSpec``; ``UserError`` for a bad value."""
    if not args.timeout >= 0:
        raise UserError(f"--timeout must be 0 (never) or a number of seconds, got {args.timeout}")
    return JobSpec(
        model=args.model,
        dtype=None if args.dtype == "auto" else parse_dtype(args.dtype),
        kernel=None if args.kernel == "auto" else args.kernel,
        quant_kernel=None if args.quant_kernel == "auto" else args.quant_kernel,
        threads=args.threads,
        layout=layout_of(args),
        timeout_s=args.timeout or None,
        trace=bool(getattr(args, "trace", None)),
    )
