"""Layouts and memory plans: which layers each rank holds and whether that fits its memory.

``Layout`` is the layout flags parsed once (``cli.layout_of``); ``plan_layout`` is the one path from a
layout to a checked ``Plan``, used by ``generate``/``serve``/``perplexity`` at start-up (``job.start``)
and by the ``plan`` and ``split`` commands.

Balancing (``--balance``): ``cost`` (default) evens out per-token compute, counting rank 0's LM
head; ``memory`` splits layers in proportion to each rank's memory (use it when nodes differ in RAM,
e.g. a Pi 5 8GB with two Pi 4 4GB); ``speed`` splits in proportion to each rank's measured speed on
one decoder layer (use it when nodes differ in speed, e.g. a laptop with Pis), within memory limits.
An explicit ``--layers`` always wins. Also here: the ``--dtype auto`` rule (``pick_dtype``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mdi_mpi.config import ModelConfig
from mdi_mpi.errors import UserError
from mdi_mpi.partition import default_micro_batch, edge_cost, split_layers, stage_memory
from mdi_mpi.quant import Quant

BALANCES = ("cost", "memory", "speed")
DEFAULT_PREFILL_CHUNK = 128


@dataclass(frozen=True)
class Layout:
    """The layout flags as typed values: how layers are split and what the memory plan assumes.
    None means the default, which depends on the job (its ranks, its requests, the model)."""

    split: tuple[int, ...] | None = None  # --layers: layer count per rank
    quant: Quant | None = None  # --quant with --quant-group (group 128 when not given)
    quant_group: int | None = None  # --quant-group as given: shards keep their own group unless it is given
    max_seq_len: int | None = None
    slots: int | None = None
    micro_batch: int | None = None
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    prefix_cache: bool = True  # reuse the KV of prompt prefixes across requests (--no-prefix-cache: off)
    cache_slots: int = 0  # slots that only hold cached prefixes
    mem_per_rank: int | None = None  # bytes, every rank
    mem: tuple[int, ...] | None = None  # bytes, per rank
    balance: str = "cost"
    tp: int = 1  # --tp: ranks that hold each pipeline stage together
    tp_parts: int | None = None  # --tp-parts: blocks of each split weight (default: --tp)

    @property
    def parts(self) -> int:
        return self.tp_parts or self.tp

    def stages(self, n_ranks: int) -> int:
        """Pipeline stages of a job of ``n_ranks`` ranks: ``UserError`` unless ``--tp`` divides it."""
        if n_ranks % self.tp:
            raise UserError(f"--tp {self.tp} does not divide the job's {n_ranks} ranks (stages x --tp ranks)")
        return n_ranks // self.tp

    def memory(self, n_ranks: int) -> list[int] | None:
        """Per-rank memory as ``--mem-per-rank`` or ``--mem`` give it; None when neither does."""
        if self.mem_per_rank is not None:
            return [self.mem_per_rank] * n_ranks
        if self.mem is not None:
            if len(self.mem) != n_ranks:
                raise UserError(f"--mem gives {len(self.mem)} sizes for {n_ranks} ranks")
            return list(self.mem)
        return None


@dataclass
class Plan:
    """Layer ranges and predicted memory per rank."""

    layers: list[range]  # per stage
    memory: list[dict[str, int]]  # per stage (of each of its ranks): weight_bytes, kv_cache_bytes, buffer_bytes, peak_bytes
    available: list[int] | None  # per stage (its ranks' least) memory, when known
    tp: int = 1  # ranks per stage

    def who(self, stage: int) -> str:
        """How messages name a stage: ``rank R``, or ``stage S (ranks A-B)`` with ``--tp``."""
        if self.tp == 1:
            return f"rank {stage}"
        return f"stage {stage} (ranks {stage * self.tp}-{(stage + 1) * self.tp - 1})"


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
    cache_slots: int = 0,
    tp: int = 1,
) -> Plan:
    """Split the layers over ``n_ranks`` stages (explicit ``split`` > ``balance``) and predict each
    stage's memory (with ``tp``, that of each of its ranks)."""
    if balance not in BALANCES:
        raise UserError(f"--balance must be one of {', '.join(BALANCES)}")
    esize = torch.empty((), dtype=dtype).element_size()

    def memory(ranges: list[range]) -> list[dict[str, int]]:
        return [
            stage_memory(config, r, i == 0, esize, n_slots, max_seq_len, micro_batch, prefill_chunk, n_ranks * tp, quant,
                         cache_slots, tp)
            for i, r in enumerate(ranges)
        ]

    by_memory = None
    if available is not None and split is None and balance in ("memory", "speed"):
        # Memory left for layers once the fixed costs are paid, in units of an average layer's bytes
        # (a mixture of experts may hold dense layers among sparse ones).
        fixed = memory([range(0, 0)] * n_ranks)
        every = memory([range(0, config.n_layers)] * n_ranks)[-1]["peak_bytes"]
        per_layer = (every - fixed[-1]["peak_bytes"]) / config.n_layers
        room = [max(1.0, (a - f["peak_bytes"]) / per_layer) for a, f in zip(available, fixed)]
        by_memory = split_layers(config.n_layers, n_ranks, 0.0, room)
    if split is not None:
        ranges = split_layers(config.n_layers, n_ranks, split=list(split))
    elif balance == "memory" and by_memory is not None:
        ranges = by_memory
    elif balance == "speed" and speeds is not None:
        ranges = split_layers(config.n_layers, n_ranks, edge_cost(config), speeds)
        if available is not None and not fits(memory(ranges), available) and by_memory is not None:
            ranges = by_memory  # the fastest split does not fit: fall back to memory proportions
    else:
        ranges = split_layers(config.n_layers, n_ranks, edge_cost(config))
    return Plan(ranges, memory(ranges), available, tp)


def fits(memory: list[dict[str, int]], available: list[int]) -> bool:
    return all(m["peak_bytes"] <= a for m, a in zip(memory, available))


def check_fit(plan: Plan, suggest: Callable[[], str] | None = None) -> None:
    """Raise ``UserError`` naming the first rank whose predicted peak exceeds its memory."""
    if plan.available is None:
        return
    for rank, (m, a) in enumerate(zip(plan.memory, plan.available)):
        if m["peak_bytes"] > a:
            hint = f"; {suggest()}" if suggest else ""
            raise UserError(
                f"{plan.who(rank)} (layers {plan.layers[rank].start}-{plan.layers[rank].stop - 1}) needs about "
                f"{gib(m['peak_bytes'])} but has {gib(a)}{hint}"
            )


def suggestion(config: ModelConfig, dtype: torch.dtype, per_rank: int, ranks: int | None = None, **kw) -> str:
    """The smallest rank count, or else a smaller dtype, or else a (smaller) ``--quant``, with which
    every rank fits ``per_rank``; when that rank count exceeds the job's ``ranks``, also the
    smallest ``--quant`` with which ``ranks`` or fewer would fit (a big mixture of experts on a few
    nodes)."""
    tp = kw.get("tp", 1)
    for n in range(1, config.n_layers + 1):
        if fits(make_plan(config, n, dtype, **kw).memory, [per_rank] * n):
            also = _quant_within(config, dtype, per_rank, ranks, **kw) if ranks is not None and n > ranks else ""
            return f"{n * tp} ranks of this size would fit{also}"
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


def _quant_within(config: ModelConfig, dtype: torch.dtype, per_rank: int, ranks: int, **kw) -> str:
    """``"; with --quant Q, N ranks"``: the first (smaller) ``--quant`` with which at most ``ranks``
    ranks fit, or "" if none does."""
    current = kw.pop("quant", None)
    for q in [Quant("int8"), Quant("int4")][0 if current is None else 1 if current.kind == "int8" else 2:]:
        for n in range(1, ranks + 1):
            if fits(make_plan(config, n, dtype, quant=q, **kw).memory, [per_rank] * n):
                return f"; with --quant {q.kind}, {n} ranks would"
    return ""


@dataclass(frozen=True)
class Sizes:
    """What the plan assumes of the job besides its layers: slots, context, message sizes."""

    n_slots: int
    max_seq_len: int
    micro_batch: int
    prefill_chunk: int
    cache_slots: int = 0  # KV slots beyond n_slots that only hold cached prefixes
    tp: int = 1  # ranks per stage

    @classmethod
    def of(cls, layout: Layout, config: ModelConfig, n_ranks: int, n_slots: int | None = None,
           max_seq_len: int | None = None) -> Sizes:
        """The sizes a layout gives (a job's own slot count and context win; the defaults of
        ``plan`` and ``split``: one slot per rank, the model's context up to 2048)."""
        stages = layout.stages(n_ranks)
        slots = n_slots or layout.slots or stages
        return cls(slots, max_seq_len or layout.max_seq_len or config.default_context(),
                   layout.micro_batch or default_micro_batch(slots, stages), layout.prefill_chunk, layout.cache_slots,
                   layout.tp)

    def plan_kw(self, quant: Quant | None) -> dict:
        """These sizes (and ``quant``) as ``make_plan``'s and ``suggestion``'s keyword arguments."""
        return dict(n_slots=self.n_slots, max_seq_len=self.max_seq_len, micro_batch=self.micro_batch,
                    prefill_chunk=self.prefill_chunk, quant=quant, cache_slots=self.cache_slots, tp=self.tp)


def plan_layout(config: ModelConfig, n_ranks: int, dtype: torch.dtype, layout: Layout, sizes: Sizes,
                quant: Quant | None, available: list[int] | None = None, speeds: list[float] | None = None,
                check: bool = True) -> Plan:
    """The plan of ``layout`` for ``n_ranks`` ranks of ``available`` bytes each (default: the
    layout's ``--mem``/``--mem-per-rank``; ``speeds``: each rank's, for ``--balance speed``), in
    ``n_ranks / --tp`` stages; with ``check``, a ``UserError`` that names the first rank or stage
    that does not fit and suggests what would."""
    stages, tp = layout.stages(n_ranks), layout.tp
    mems = layout.memory(n_ranks) if available is None else available

    def per_stage(xs: list | None) -> list | None:  # a stage's least
        return None if xs is None else [min(xs[s * tp : (s + 1) * tp]) for s in range(stages)]

    plan = make_plan(config, stages, dtype, split=layout.split, available=per_stage(mems), balance=layout.balance,
                     speeds=per_stage(speeds), **sizes.plan_kw(quant))
    if check:
        check_plan(plan, config, dtype, sizes, quant)
    return plan


def check_plan(plan: Plan, config: ModelConfig, dtype: torch.dtype, sizes: Sizes, quant: Quant | None) -> None:
    """``check_fit`` with the suggestion of the smallest layout that would fit."""
    if plan.available is not None:
        check_fit(plan, lambda: suggestion(config, dtype, min(plan.available), len(plan.layers), **sizes.plan_kw(quant)))


@dataclass(frozen=True)
class Link:
    """What ``predict`` assumes of the network between ranks: one message's latency and the bandwidth."""

    latency_s: float = 100e-6  # gigabit Ethernet between two Pis: about 0.1 ms one way
    bytes_per_s: float = 125e6  # 1 Gbit/s

    def send_s(self, n_bytes: int) -> float:
        return self.latency_s + n_bytes / self.bytes_per_s


def predict(config: ModelConfig, n_ranks: int, tp: int, layer_s: float, streams: int, link: Link,
            act_bytes: int = 2, head_s: float | None = None) -> tuple[float, float]:
    """Predicted decode tokens/s of ``n_ranks`` ranks as stages of ``tp``: one stream alone, and
    ``streams`` streams together. ``layer_s``: one decoder layer's time per token on one rank
    (decoding reads every weight once, so a rank of a ``tp`` stage takes ``layer_s / tp``, and a
    token's time hardly grows with the rows a step carries); rank 0's LM head takes ``head_s``
    (default: ``edge_cost`` layers), shared by stage 0's ranks. Each stage hands one row (``act_bytes`` per value) to the next over ``link``; with
    ``tp``, each layer also gathers two float32 rows from every rank of the stage.

    One stream visits every stage in turn; with as many streams as stages or more, every stage
    works all the time, and a round (each group one token further) takes the longest of the
    stream's own time and the stages' work."""
    stages = n_ranks // tp
    per_stage = [len(r) for r in split_layers(config.n_layers, stages, edge_cost(config))]
    d = config.hidden_size
    gather = 0.0 if tp == 1 else 2 * link.send_s((tp - 1) * d * 4)  # per layer: o_proj, then the MLP's down_proj
    hop = 0.0 if stages == 1 else link.send_s(d * act_bytes)
    stage_s = [n * (layer_s / tp + gather) + hop for n in per_stage]
    stage_s[0] += (edge_cost(config) * layer_s if head_s is None else head_s) / tp
    one = sum(stage_s)
    rounds = max(one, min(streams, stages) * max(stage_s))  # a group per stage at most: more streams share the groups
    return 1.0 / one, streams / rounds


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


def print_plan(plan: Plan, dtype: torch.dtype, quant: Quant | None = None) -> None:
    """The plan as a table: each rank's layers, weight, KV cache, buffer and peak bytes (with
    ``--tp``: each stage's, per rank of the stage)."""
    if plan.tp > 1:
        print(f"{len(plan.layers)} stages of {plan.tp} ranks (--tp {plan.tp}): ranks sT..sT+T-1 hold stage s; "
              "bytes are per rank")
    print(f"{'rank' if plan.tp == 1 else 'stage':>4}  {'layers':>7}  {'weights':>10}  {'KV cache':>10}  {'buffers':>10}  {'peak':>10}  {'memory':>10}")
    for r, (layers, m) in enumerate(zip(plan.layers, plan.memory)):
        mem = gib(plan.available[r]) if plan.available else "-"
        ok = "" if not plan.available else ("  ok" if m["peak_bytes"] <= plan.available[r] else "  DOES NOT FIT")
        print(f"{r:>4}  {f'{layers.start}-{layers.stop - 1}':>7}  {gib(m['weight_bytes']):>10}  "
              f"{gib(m['kv_cache_bytes']):>10}  {gib(m['buffer_bytes']):>10}  {gib(m['peak_bytes']):>10}  {mem:>10}{ok}")
    q = "" if quant is None else f", weights {quant.kind}" + (f" (group {quant.group})" if quant.kind == "int4" else "")
    print(f"dtype {str(dtype).removeprefix('torch.')}{q}; peak = weights + KV cache + buffers + runtime and loading overhead")
