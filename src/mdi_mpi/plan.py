"""Memory-aware planning: which layers each rank holds and whether that fits its memory.

    python -m mdi_mpi.plan --model DIR --ranks 3 --mem-per-rank 4GiB --slots 6 --dtype bf16

prints each rank's layer range, weight, KV cache and buffer bytes and its predicted peak memory, and
refuses (exit 2) a plan that does not fit, suggesting the smallest rank count or dtype that does.
``generate`` runs the same check at start-up, before loading anything.

Balancing (``--balance``): ``cost`` (default) evens out per-token compute, counting rank 0's LM
head; ``memory`` splits layers in proportion to each rank's memory (use it when nodes differ in RAM,
e.g. a Pi 5 8GB with two Pi 4 4GB); ``speed`` splits in proportion to each rank's measured speed on
one decoder layer (use it when nodes differ in speed, e.g. a laptop with Pis), within memory limits.
An explicit ``--layers`` always wins.

Also here, for ``generate``'s start-up: what each rank measures of its node (available memory, peak
RSS, one layer's speed), and the ``--dtype auto`` rule.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from mdi_mpi.config import ModelConfig, parse_dtype
from mdi_mpi.errors import UserError, cli_main
from mdi_mpi.partition import default_micro_batch, edge_cost, parse_bytes, parse_split, split_layers, stage_memory
from mdi_mpi.quant import QUANTS, Quant

BALANCES = ("cost", "memory", "speed")


@dataclass
class Plan:
    """Layer ranges and predicted memory per rank."""

    layers: list[range]
    memory: list[dict[str, int]]  # per rank: weight_bytes, kv_cache_bytes, buffer_bytes, peak_bytes
    available: list[int] | None  # per rank memory, when known


def make_plan(
    config: ModelConfig,
    n_ranks: int,
    dtype: torch.dtype,
    n_slots: int,
    max_seq_len: int,
    micro_batch: int,
    prefill_chunk: int,
    split: list[int] | None = None,
    available: list[int] | None = None,
    balance: str = "cost",
    speeds: list[float] | None = None,
    quant: Quant | None = None,
) -> Plan:
    """Split the layers (explicit ``split`` > ``balance``) and predict each rank's memory."""
    if balance not in BALANCES:
        raise UserError(f"--balance must be one of {', '.join(BALANCES)}")
    esize = torch.empty((), dtype=dtype).element_size()

    def memory(ranges: list[range]) -> list[dict[str, int]]:
        return [
            stage_memory(config, r, i == 0, esize, n_slots, max_seq_len, micro_batch, prefill_chunk, n_ranks, quant)
            for i, r in enumerate(ranges)
        ]

    by_memory = None
    if available is not None and split is None and balance in ("memory", "speed"):
        # Memory left for layers once the fixed costs are paid, in units of one layer's bytes.
        fixed = memory([range(0, 0)] * n_ranks)
        per_layer = memory([range(0, 1)] * n_ranks)[1]["peak_bytes"] - fixed[1]["peak_bytes"]
        room = [max(1.0, (a - f["peak_bytes"]) / per_layer) for a, f in zip(available, fixed)]
        by_memory = split_layers(config.n_layers, n_ranks, 0.0, room)
    if split is not None:
        ranges = split_layers(config.n_layers, n_ranks, split=split)
    elif balance == "memory" and by_memory is not None:
        ranges = by_memory
    elif balance == "speed" and speeds is not None:
        ranges = split_layers(config.n_layers, n_ranks, edge_cost(config), speeds)
        if available is not None and not fits(memory(ranges), available) and by_memory is not None:
            ranges = by_memory  # the fastest split does not fit: fall back to memory proportions
    else:
        ranges = split_layers(config.n_layers, n_ranks, edge_cost(config))
    return Plan(ranges, memory(ranges), available)


def fits(memory: list[dict[str, int]], available: list[int]) -> bool:
    return all(m["peak_bytes"] <= a for m, a in zip(memory, available))


def check_fit(plan: Plan, suggest: callable | None = None) -> None:
    """Raise ``UserError`` naming the first rank whose predicted peak exceeds its memory."""
    if plan.available is None:
        return
    for rank, (m, a) in enumerate(zip(plan.memory, plan.available)):
        if m["peak_bytes"] > a:
            hint = f"; {suggest()}" if suggest else ""
            raise UserError(
                f"rank {rank} (layers {plan.layers[rank].start}-{plan.layers[rank].stop - 1}) needs about "
                f"{gib(m['peak_bytes'])} but has {gib(a)}{hint}"
            )


def suggestion(config: ModelConfig, dtype: torch.dtype, per_rank: int, **kw) -> str:
    """The smallest rank count, or else a smaller dtype, or else a (smaller) ``--quant``, with which
    every rank fits ``per_rank``."""
    for n in range(1, config.n_layers + 1):
        if fits(make_plan(config, n, dtype, **kw).memory, [per_rank] * n):
            return f"{n} ranks of this size would fit"
    if dtype == torch.float32:
        for n in range(1, config.n_layers + 1):
            if fits(make_plan(config, n, torch.bfloat16, **kw).memory, [per_rank] * n):
                return f"with --dtype bfloat16, {n} ranks of this size would fit"
    current = kw.pop("quant", None)
    for q in [Quant("int8"), Quant("int4")][0 if current is None else 1 if current.kind == "int8" else 2:]:
        for n in range(1, config.n_layers + 1):
            if fits(make_plan(config, n, dtype, quant=q, **kw).memory, [per_rank] * n):
                return f"with --quant {q.kind}, {n} ranks of this size would fit"
    return "no rank count fits this memory: use a smaller --max-seq-len or --slots, or bigger nodes"


AUTO_FLOAT32_GAIN = 1.25  # float32 must decode this much faster to be worth twice the memory


def pick_dtype(row_ms: dict[str, float], float32_fits: bool) -> tuple[torch.dtype, str]:
    """``--dtype auto``: bfloat16, unless float32 decodes a row at least ``AUTO_FLOAT32_GAIN`` times
    faster on these CPUs (no native bf16 arithmetic) and its plan fits; ``row_ms`` are the
    milliseconds per decoded row through the model's largest weight, summed over the ranks."""
    bf16, fp32 = row_ms["bfloat16"], row_ms["float32"]
    timing = f"a row through the largest weight: bfloat16 {bf16:.2f} ms, float32 {fp32:.2f} ms"
    if bf16 >= AUTO_FLOAT32_GAIN * fp32:
        if float32_fits:
            return torch.float32, f"float32 ({timing}; float32 fits in memory)"
        return torch.bfloat16, f"bfloat16 ({timing}; float32 would be faster but does not fit in memory)"
    return torch.bfloat16, f"bfloat16 ({timing})"


def gib(n: float) -> str:
    """Bytes as GiB with two decimals, as every summary prints them."""
    return f"{n / 2**30:.2f} GiB"


def layer_speed(config: ModelConfig, dtype: torch.dtype, steps: int = 8) -> float:
    """Decode steps per second of one decoder layer on this rank (random weights): the rank's
    relative speed for ``--balance speed``."""
    import time

    from mdi_mpi.kernels import default_cache
    from mdi_mpi.kv_cache import Batch, KVCache
    from mdi_mpi.model import DecoderLayer, pick_kernels, rope_tables

    with torch.device("meta"):
        layer = DecoderLayer(config, 0)
    layer = layer.to_empty(device="cpu").to(dtype).requires_grad_(False)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(0))
    length = steps + 2
    pick_kernels(layer, None, default_cache())
    layer.self_attn.kv_cache = KVCache(1, config.n_kv_heads, length, config.head_dim, dtype)
    cos, sin = rope_tables(config, length, dtype)
    x = torch.randn(1, config.hidden_size).to(dtype)
    with torch.inference_mode():
        for pos in range(length):
            if pos == 2:
                t0 = time.perf_counter()
            layer(x, Batch.make([0], [pos], [1]), cos[pos : pos + 1, None], sin[pos : pos + 1, None])
    return steps / (time.perf_counter() - t0)


def peak_rss() -> int:
    """This process's peak resident memory in bytes since it started (exec), from the kernel's
    high-water mark; ``ru_maxrss`` is the fallback off Linux (it also counts a forking parent's RSS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def available_memory(local_ranks: int) -> int:
    """This rank's share of the node's available memory (MemAvailable / ranks on the node)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // max(1, local_ranks)
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local_ranks)


def memory_flags(mem_per_rank: str | None, mem: str | None, n_ranks: int) -> list[int] | None:
    """Per-rank memory from ``--mem-per-rank`` or ``--mem``; None when neither is given."""
    if mem_per_rank and mem:
        raise UserError("give --mem-per-rank or --mem, not both")
    if mem_per_rank:
        return [parse_bytes(mem_per_rank)] * n_ranks
    if mem:
        mems = [parse_bytes(m) for m in mem.split(",")]
        if len(mems) != n_ranks:
            raise UserError(f"--mem gives {len(mems)} sizes for {n_ranks} ranks")
        return mems
    return None


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1 (a count of slots, ranks, tokens...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_layout_arguments(p) -> None:
    """The flags that say how a model is laid out over the ranks and what the plan assumes, shared
    by generate, serve, perplexity, plan and split (one name, type, default and help each)."""
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
    p.add_argument("--prefill-chunk", type=positive_int, default=128, metavar="C", help="prompt tokens per slot per "
                   "step (default: 128)")
    p.add_argument("--mem-per-rank", metavar="SIZE", help="memory of every rank, e.g. 4GiB (default for generate: "
                   "the node's available memory divided by its ranks)")
    p.add_argument("--mem", metavar="A,B,...", help="memory of each rank, e.g. 8GiB,4GiB,4GiB")
    p.add_argument("--balance", choices=BALANCES, default="cost",
                   help="how to split layers: cost (default: even compute, rank 0 runs the head), memory "
                   "(in proportion to rank memory), speed (in proportion to measured speed, within memory)")


def print_plan(plan: Plan, dtype: torch.dtype, quant: Quant | None = None) -> None:
    print(f"{'rank':>4}  {'layers':>7}  {'weights':>10}  {'KV cache':>10}  {'buffers':>10}  {'peak':>10}  {'memory':>10}")
    for r, (layers, m) in enumerate(zip(plan.layers, plan.memory)):
        mem = gib(plan.available[r]) if plan.available else "-"
        ok = "" if not plan.available else ("  ok" if m["peak_bytes"] <= plan.available[r] else "  DOES NOT FIT")
        print(f"{r:>4}  {f'{layers.start}-{layers.stop - 1}':>7}  {gib(m['weight_bytes']):>10}  "
              f"{gib(m['kv_cache_bytes']):>10}  {gib(m['buffer_bytes']):>10}  {gib(m['peak_bytes']):>10}  {mem:>10}{ok}")
    q = "" if quant is None else f", weights {quant.kind}" + (f" (group {quant.group})" if quant.kind == "int4" else "")
    print(f"dtype {str(dtype).removeprefix('torch.')}{q}; peak = weights + KV cache + buffers + runtime and loading overhead")


def quant_of(kind: str | None, group: int) -> Quant | None:
    """The ``--quant``/``--quant-group`` flags as a ``Quant`` (None without ``--quant``)."""
    try:
        return Quant(kind, group) if kind else None
    except ValueError as e:
        raise UserError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mdi_mpi.plan", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the demo model)")
    p.add_argument("--ranks", type=positive_int, required=True, metavar="N")
    p.add_argument("--dtype", default="bfloat16", help="weights and activations dtype (default: bfloat16)")
    add_layout_arguments(p)
    args = p.parse_args(argv)

    def body() -> None:
        from mdi_mpi import demo

        model = args.model or str(demo.demo_model())
        config = ModelConfig.from_dir(model)
        dtype = parse_dtype(args.dtype)
        slots = args.slots or args.ranks
        kw = dict(
            n_slots=slots,
            max_seq_len=args.max_seq_len or config.default_context(),
            micro_batch=args.micro_batch or default_micro_batch(slots, args.ranks),
            prefill_chunk=args.prefill_chunk,
            quant=quant_of(args.quant, args.quant_group or 128),
        )
        if args.balance == "speed":
            raise UserError("--balance speed needs the ranks themselves: use it with generate or split")
        mems = memory_flags(args.mem_per_rank, args.mem, args.ranks)
        split = parse_split(args.layers) if args.layers else None
        plan = make_plan(config, args.ranks, dtype, split=split, available=mems, balance=args.balance, **kw)
        print_plan(plan, dtype, kw["quant"])
        smallest = min(mems) if mems else 0
        check_fit(plan, lambda: suggestion(config, dtype, smallest, **kw))

    return cli_main(body)


if __name__ == "__main__":
    sys.exit(main())
