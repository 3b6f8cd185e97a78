"""A rank's share of the model: the full decoder pruned to one contiguous block of layers.

Layers are kept in a dict keyed by their *global* index so checkpoint names still match. The
embedding, the final norm and the LM head exist only on the stage that owns the model's edges
(rank 0 in the ring); elsewhere they are ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from mdi_mpi.config import ModelConfig
from mdi_mpi.kernels import Selection, ShapeKernels
from mdi_mpi.kv_cache import Batch, KVCache
from mdi_mpi.model import (
    WHOLE,
    DecoderLayer,
    Experts,
    Linear,
    RMSNorm,
    RowParallel,
    TensorSplit,
    linear,
    pick_kernels,
    rope_tables,
)
from mdi_mpi.prefix_cache import Copy
from mdi_mpi.quant import Quant, QuantWeight, choose_quant_kernels, rows_independent


class Stage(nn.Module):
    """Decoder layers ``layers`` (a range of global indices), plus the edges when ``edges`` is true;
    with ``split``, this rank's share of each layer and of the edges (``--tp``: the embedding and LM
    head hold the rank's rows of the vocabulary, ``vocab``)."""

    def __init__(self, config: ModelConfig, layers: range, edges: bool, split: TensorSplit = WHOLE):
        super().__init__()
        self.config = config
        self.layer_range = layers
        self.split = split
        d = config.hidden_size
        self.vocab = split.vocab(config.vocab_size)  # rows of the embedding and LM head held here
        vocab = len(self.vocab)
        self.embed_tokens = nn.Embedding(vocab, d) if edges else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(config, i, split) for i in layers})
        self.norm = RMSNorm(d, config.rms_norm_eps, config.gemma, config.gpt_oss) if edges else None
        self.lm_head = Linear(d, vocab, bias=False) if edges and not config.tie_word_embeddings else None
        self.cos: torch.Tensor | None = None  # [L, rd] RoPE tables ([2L, rd] with longrope: short, then long)
        self.sin: torch.Tensor | None = None
        self.local_cos: torch.Tensor | None = None  # gemma3's sliding-window layers' own tables
        self.local_sin: torch.Tensor | None = None
        self.head_kernels: ShapeKernels | None = None
        self.embed_q: QuantWeight | None = None  # int8 embedding table (quantized stages)
        self.head_q: QuantWeight | None = None  # int8 LM head (the embedding's when tied)
        self.max_seq_len = 0  # positions per slot, set with the cache
        self.combine: Callable[[torch.Tensor], torch.Tensor] = lambda x: x  # the stage's ranks' sum (set_combine)

    @property
    def has_edges(self) -> bool:
        return self.embed_tokens is not None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def setup_cache(self, n_slots: int, max_seq_len: int) -> None:
        """Allocate the KV caches and RoPE tables once, after the weights are loaded."""
        c = self.config
        self.max_seq_len = max_seq_len
        for layer in self.layers.values():
            attn = layer.self_attn
            attn.kv_cache = KVCache(n_slots, attn.n_kv_heads, max_seq_len, c.head_dim, self.dtype)
        self.cos, self.sin = rope_tables(c, max_seq_len, self.dtype)
        if any(layer.local_rope for layer in self.layers.values()):
            self.local_cos, self.local_sin = rope_tables(c, max_seq_len, self.dtype, local=True)

    def set_combine(self, combine: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Have every row-parallel layer (and a split embedding) add its partial products [T, D]
        (float32) with those of the stage's other ranks through ``combine`` (``transport.Peers``)."""
        self.combine = combine
        for m in self.layers.modules():
            if isinstance(m, RowParallel):
                m.combine = combine

    def quantizable(self) -> set[str]:
        """Names of the parameters a quantized stage stores as integers: every decoder-layer linear
        weight but the routers, every expert (the 3-D ``gate_up_proj`` and ``down_proj``), the
        embedding table and the LM head."""
        names = set()
        for n, m in self.layers.named_modules():
            if isinstance(m, Linear) and m.quantizable:
                names.add(f"layers.{n}.weight")
            elif isinstance(m, Experts):
                names |= {f"layers.{n}.gate_up_proj", f"layers.{n}.down_proj"}
        if self.has_edges:
            names.add("embed_tokens.weight")
            if self.lm_head is not None:
                names.add("lm_head.weight")
        return names

    def set_quantized(self, owner: str, qw: QuantWeight) -> None:
        """Store ``qw`` in place of the weight of module ``owner`` (a name from ``quantizable``)."""
        if owner == "embed_tokens":
            self.embed_q = qw
            if self.lm_head is None:  # tied: the head reads the same integers
                self.head_q = qw
            del self.embed_tokens.weight
        elif owner == "lm_head":
            self.head_q = qw
            del self.lm_head.weight
        else:
            m = self.get_submodule(owner)
            m.qweight = qw
            del m.weight

    def set_quantized_experts(self, owner: str, attr: str, qws: list[QuantWeight]) -> None:
        """Store one ``QuantWeight`` per expert in place of the 3-D parameter ``attr`` (``gate_up_proj``
        or ``down_proj``) of the ``Experts`` module ``owner``."""
        m = self.get_submodule(owner)
        setattr(m, attr.removesuffix("_proj") + "_q", nn.ModuleList(qws))
        delattr(m, attr)

    def quant_summary(self) -> dict[str, int]:
        """How many decoder-layer linear weights (each expert's two counted apart) are int4, int8
        or not quantized (a shape the int4 kernel cannot take falls back to int8; routers stay
        unquantized)."""
        kinds = []
        for m in self.layers.modules():
            if isinstance(m, Linear):
                kinds.append(m.qweight.kind if m.qweight is not None else "none")
            elif isinstance(m, Experts):
                kinds += [q.kind for q in m.gate_up_q] + [q.kind for q in m.down_q] if m.gate_up_q is not None else ["none"] * 2 * m.n_experts
        return {k: kinds.count(k) for k in ("int4", "int8", "none")}

    def choose_kernels(self, forced: str | None = None, cache: Path | None = None, quant_forced: str | None = None) -> Selection:
        """Pick each linear layer's matmul kernels on this machine (see ``kernels.py`` and ``quant.py``):
        measured on the loaded weights, or read from ``cache``; ``forced`` names one kernel for all
        unquantized weights, ``quant_forced`` one for the int8 ones. The int8 LM head is chosen for
        too, unless it is read in row blocks (``--tp-parts``) or is the embedding table (tied), which
        keep ``w8`` (row by row if its rows depend on each other)."""
        head = self.head_weight[: len(self.vocab) // len(self.split.blocks)] if self.has_edges and self.head_q is None else None
        selection, self.head_kernels = pick_kernels(self.layers, forced, cache, head, quant_forced)
        if self.head_q is not None and self.head_q is not self.embed_q and len(self.split.blocks) == 1:
            selection.quant.update(choose_quant_kernels([self.head_q], quant_forced, cache))
        elif self.head_q is not None:
            with torch.inference_mode():
                self.head_q.per_row = not rows_independent(self.head_q)
        return selection

    @property
    def head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def cache_bytes(self) -> int:
        return sum(layer.self_attn.kv_cache.nbytes() for layer in self.layers.values())

    def weight_bytes(self) -> int:
        """Bytes of weights, quantized or not (KV caches excluded)."""
        return sum(p.nbytes for p in self.parameters()) + sum(m.nbytes() for m in self.modules() if isinstance(m, QuantWeight))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [T] -> hidden states [T, D]. Split by vocabulary, each rank looks up the ids it
        holds, zeros for the others, and the stage adds them (exactly: one term is not zero)."""
        if len(self.vocab) < self.config.vocab_size:
            local = ids - self.vocab.start
            held = (local >= 0) & (local < len(self.vocab))  # [T]
            h = self._lookup(local.clamp(0, len(self.vocab) - 1)) * held[:, None].to(self.dtype)
            h = self.combine(h.float()).to(self.dtype)
        else:
            h = self._lookup(ids)
        if self.config.gemma:  # embeddings scaled by sqrt(D), rounded to the model dtype as transformers does
            h = h * torch.tensor(self.config.hidden_size**0.5, dtype=h.dtype)
        return h

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_q.rows(ids, self.dtype) if self.embed_q is not None else self.embed_tokens(ids)  # [T, D]

    def copy_kv(self, copies: Iterable[Copy]) -> None:
        """Make each KV copy (slot to slot, a prefix of positions) in every layer of this stage, in order."""
        for cp in copies:
            for layer in self.layers.values():
                layer.self_attn.kv_cache.copy(cp.src, cp.dst, cp.length)

    def forward_layers(self, h: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Run this stage's decoder layers on hidden states [T, D], writing the slots' KV caches."""
        rows = batch.positions if batch.long_tokens is None else batch.positions + self.max_seq_len * batch.long_tokens
        cos = self.cos[rows].unsqueeze(1)  # [T, 1, rd]
        sin = self.sin[rows].unsqueeze(1)  # [T, 1, rd]
        if self.local_cos is not None:
            local = (self.local_cos[batch.positions].unsqueeze(1), self.local_sin[batch.positions].unsqueeze(1))
        for layer in self.layers.values():
            h = layer(h, batch, *(local if layer.local_rope else (cos, sin)))
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, D] of sampled tokens -> float32 logits [B, V] (final norm, then LM head);
        split by vocabulary, this rank's columns of them [B, len(vocab)], a block of
        ``vocab_size / parts`` rows at a time."""
        x = self.norm(h)
        n = len(self.vocab) // len(self.split.blocks)  # rows of one block
        blocks = [range(a, a + n) for a in range(0, len(self.vocab), n)]
        if self.head_q is not None:
            parts = [self.head_q(x, None if len(blocks) == 1 else b) for b in blocks]
        else:
            w = self.head_weight
            parts = [linear(x, w[b.start : b.stop], None, h.shape[0], self.head_kernels) for b in blocks]
        logits = (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).float()
        cap = self.config.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, batch: Batch, all_logits: bool = False) -> torch.Tensor:
        """A whole-model stage: token ids [T] -> logits of each segment's last token [B, V]
        (or of every token [T, V] with ``all_logits``)."""
        h = self.forward_layers(self.embed(ids), batch)
        return self.head(h if all_logits else h[batch.last])


def layer_speed(config: ModelConfig, dtype: torch.dtype, steps: int = 8, quant: Quant | None = None) -> float:
    """Decode steps per second of one decoder layer on this rank (random weights, quantized with
    ``quant``): the rank's relative speed for ``--balance speed``, and ``plan --layouts``' unit."""
    import time

    from mdi_mpi.kernels import default_cache

    with torch.device("meta"):
        layer = DecoderLayer(config, 0)
    layer = layer.to_empty(device="cpu").to(dtype).requires_grad_(False)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(0))
    if quant is not None:
        for m in layer.modules():
            if isinstance(m, Linear) and m.quantizable:
                m.qweight = QuantWeight.of(m.weight, quant, dtype)
                del m.weight
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
