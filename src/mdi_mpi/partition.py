"""Split a model's decoder layers into contiguous blocks, one per rank, and predict each rank's
memory (pure functions).

Rank 0 also embeds tokens and runs the final norm, the LM head and the sampler, so the default split
gives it fewer layers: its extra load counts as ``edge_cost`` layers. Every rank holds at least one
layer (a rank with none would only relay activations and add a hop), so more ranks than layers is
an error. ``stage_memory`` is the memory model: weights (quantized or not), KV cache, message buffers,
and the peak with the runtime, the loading transient and activations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mdi_mpi.quant import Quant

import math
import re

from mdi_mpi.config import ModelConfig
from mdi_mpi.errors import UserError


def edge_cost(config: ModelConfig) -> float:
    """Rank 0's extra per-token work in units of one decoder layer: the LM head's matmul
    (the embedding is a lookup and costs next to nothing). A token computes with only its top-k
    experts, so a mixture of experts' layer costs its active parameters."""
    per_layer = config.layers_param_count(range(config.n_layers), active=True) / config.n_layers
    return config.vocab_size * config.hidden_size / per_layer


def parse_split(text: str) -> list[int]:
    """Parse an explicit split such as ``"6,8,8"``."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise UserError(f"--layers expects comma-separated layer counts such as 6,8,8, got {text!r}") from None
    return counts


def split_layers(
    n_layers: int,
    n_ranks: int,
    extra: float = 0.0,
    weights: list[float] | None = None,
    split: list[int] | None = None,
) -> list[range]:
    """Contiguous layer ranges, one per rank, in ring order.

    ``split`` (explicit layer counts) wins. Otherwise the split minimises the slowest rank's time,
    where rank r takes (its layers + ``extra`` if r == 0) / ``weights[r]`` (relative speed or memory;
    all equal by default).
    """
    if n_ranks < 1:
        raise UserError(f"need at least one rank, got {n_ranks}")
    if n_ranks > n_layers:
        raise UserError(f"{n_ranks} ranks but the model has only {n_layers} layers; use at most {n_layers} ranks")
    if split is not None:
        counts = list(split)
        if len(counts) != n_ranks:
            raise UserError(f"--layers gives {len(counts)} counts for {n_ranks} ranks")
        if sum(counts) != n_layers:
            raise UserError(f"--layers {','.join(map(str, counts))} sums to {sum(counts)}, the model has {n_layers} layers")
        if min(counts) < 1:
            raise UserError("--layers: every rank needs at least one layer")
    else:
        counts = _balanced_counts(n_layers, n_ranks, extra, weights or [1.0] * n_ranks)
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _balanced_counts(n_layers: int, n_ranks: int, extra: float, weights: list[float]) -> list[int]:
    if len(weights) != n_ranks:
        raise UserError(f"{len(weights)} rank weights for {n_ranks} ranks")
    if min(weights) <= 0 or not all(math.isfinite(w) for w in weights):
        raise UserError(f"rank weights must be positive numbers, got {weights}")
    extras = [extra] + [0.0] * (n_ranks - 1)

    def counts_within(limit: float) -> list[int]:
        return [max(1, math.floor(limit * w - e + 1e-9)) for w, e in zip(weights, extras)]

    def load(r: int, n: int) -> float:
        return (n + extras[r]) / weights[r]

    # The best limit is the load of some rank with some layer count: try them in increasing order.
    candidates = sorted({load(r, n) for r in range(n_ranks) for n in range(1, n_layers + 1)})
    for limit in candidates:
        counts = counts_within(limit)
        if sum(counts) >= n_layers:
            break
    while sum(counts) > n_layers:  # trim the most loaded ranks first; on ties the earlier rank (rank 0 has the head)
        r = max((r for r in range(n_ranks) if counts[r] > 1), key=lambda r: (load(r, counts[r]), -r))
        counts[r] -= 1
    return counts


RUNTIME_BYTES = 450 * 2**20  # Python, torch and the tokenizer, measured on x86 Linux (~0.4 GiB)


def parse_bytes(text: str) -> int:
    """``"4GiB"``, ``"512MiB"``, ``"8G"``, ``"1.5GB"`` or plain bytes -> bytes (units are binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if m is None or float(m.group(1)) <= 0:
        raise UserError(f"cannot read the memory size {text!r}; write it like 4GiB, 512MiB or 8G")
    return int(float(m.group(1)) * 2 ** (10 * " KMGT".index(m.group(2) or " ")))


def default_micro_batch(n_slots: int, n_ranks: int) -> int:
    """ceil(K / N) slots per message: N groups keep N ranks busy."""
    return -(-n_slots // n_ranks)


def stage_memory(
    config: ModelConfig,
    layers: range,
    edges: bool,
    element_size: int,
    n_slots: int,
    max_seq_len: int,
    micro_batch: int,
    prefill_chunk: int,
    n_ranks: int,
    quant: Quant | None = None,
    cache_slots: int = 0,
    tp: int = 1,
) -> dict[str, int]:
    """Predicted bytes of one rank (with ``tp``, of one of a stage's ranks, which holds its share of
    the layers and of stage 0's embedding and LM head): weights (quantized with ``quant``; every expert of a mixture
    of experts), KV cache (for ``n_slots`` running slots and ``cache_slots`` that hold prefixes),
    message buffers, and the predicted peak (those plus the runtime, the transient of loading the
    largest tensor in full precision, and activations). Experts are read and quantized one at a
    time, so the largest tensor is a dense MLP's or one expert's."""
    per_weight = float(element_size) if quant is None else quant.bytes_per_weight(element_size)
    weights = int(config.layers_param_count(layers) * per_weight / tp)
    inner = max(config.intermediate_size, 2 * config.expert_size)
    largest = config.hidden_size * inner * element_size
    if edges:
        weights += int(config.edge_param_count() * (element_size if quant is None else 1) / tp)  # int8 embedding and head
        largest = config.vocab_size * config.hidden_size * element_size // tp
    kv = (n_slots + cache_slots) * max_seq_len * len(layers) * 2 * config.n_kv_heads * config.head_dim * element_size // tp
    rows = micro_batch * prefill_chunk
    groups = -(-n_slots // micro_batch)
    message = rows * config.hidden_size * element_size + 8 * (4 + 4 * micro_batch)
    buffers = 0 if n_ranks == 1 else 2 * groups * message
    if tp > 1:  # the message the leader shares, and every rank's float32 partial products
        buffers += message + tp * rows * config.hidden_size * 4
    activations = rows * (4 * config.hidden_size + 3 * inner + config.n_experts) * 4
    peak = RUNTIME_BYTES + weights + kv + buffers + largest + activations  # largest: a cast while loading
    return {"weight_bytes": weights, "kv_cache_bytes": kv, "buffer_bytes": buffers, "peak_bytes": peak}


def slot_groups(n_slots: int, micro_batch: int) -> list[list[int]]:
    """Split slots 0..n_slots-1 into consecutive groups (micro-batches) of at most ``micro_batch``."""
    if n_slots < 1 or micro_batch < 1:
        raise ValueError("n_slots and micro_batch must be at least 1")
    return [list(range(a, min(a + micro_batch, n_slots))) for a in range(0, n_slots, micro_batch)]
