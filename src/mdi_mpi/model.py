"""The Llama-family decoder in plain PyTorch: RMSNorm, RoPE (also partial and longrope, phi3), GQA
attention (with qwen3's per-head q/k norms, olmoe's whole-projection ones), SwiGLU MLP, and the
sparse mixture of experts (``SparseMoE``: qwen3_moe, mixtral, qwen2_moe, olmoe, gpt_oss), and
gpt_oss's attention sinks.

Module and parameter names follow Hugging Face's so checkpoint tensors map one to one. Tokens are
packed: a forward call sees ``T`` tokens from one or more sequences, described by a ``Batch``.
Nothing here knows about MPI.

Batch invariance: every linear layer computes each row with a kernel of a fixed shape chosen per
machine (``kernels.py``), so a token's result does not depend on which other tokens share its forward
call, and output does not change with the number of ranks, slots or micro-batches. A mixture of
experts keeps that: each expert's rows go through the same kernels (decode rows first, as in the
whole call), and each row's expert outputs are summed in expert order (``SparseMoE``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mdi_mpi.config import ModelConfig
from mdi_mpi.errors import UserError
from mdi_mpi.kernels import Selection, ShapeKernels, choose_kernels
from mdi_mpi.kv_cache import Batch, KVCache
from mdi_mpi.quant import QuantWeight, choose_quant_kernels, one_rounding


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n_single: int, kernels: ShapeKernels) -> torch.Tensor:
    """Batch-invariant linear: ``x`` [T, in] -> [T, out]; rows [:n_single] are decode rows (one
    token of a sequence), the rest prompt rows, each computed with the kernels chosen for them.
    The bias is added after the product, row by row: a bias fused into the kernels can round
    differently between kernels too rarely for the start-up probe to see (bf16 ``addmv`` against
    ``F.linear`` on AVX2), so kernels are chosen, and compute, without it."""
    if n_single == x.shape[0]:
        y = kernels.decode.apply(x, weight, None)
    elif n_single == 0:
        y = kernels.prefill.apply(x, weight, None)
    else:
        y = torch.cat([kernels.decode.apply(x[:n_single], weight, None), kernels.prefill.apply(x[n_single:], weight, None)])
    return y if bias is None else y + bias


class Linear(nn.Linear):
    """``nn.Linear`` whose rows are computed by batch-invariant kernels (see ``kernels.py``), or
    by a quantized weight's kernel (``qweight``, which replaces ``weight``)."""

    kernels: ShapeKernels  # set by Stage.choose_kernels

    def __init__(self, *args, quantizable: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.qweight: QuantWeight | None = None  # set by Stage.set_quantized
        self.quantizable = quantizable  # False for a router, whose choices --quant must not move

    def forward(self, x: torch.Tensor, n_single: int) -> torch.Tensor:  # type: ignore[override]
        if self.qweight is not None:
            y = self.qweight(x)
            return y if self.bias is None else y + self.bias
        return linear(x, self.weight, self.bias, n_single, self.kernels)


@dataclass(frozen=True)
class TensorSplit:
    """This rank's share of every decoder layer when ``size`` ranks hold a stage together (``--tp``):
    attention by KV-head groups (each query head stays with its KV head), the MLP by intermediate
    columns, the embedding and LM head (on stage 0) by vocabulary. Each split weight is held as
    ``parts`` blocks in all, ``parts / size`` on each rank, and each block is computed on its own: column-parallel ones (q, k, v, gate, up) give some
    output columns each, row-parallel ones (o_proj, down_proj) a partial product each, added in one
    fixed tree over the blocks (``tree_sum``). So a token's bits depend on ``parts``, never on
    ``size``: every layout with the same ``parts`` gives the same tokens. ``parts == 1`` (one
    rank, the default) is the unsplit model."""

    index: int = 0  # this rank's place among the stage's ranks
    size: int = 1
    parts: int = 1

    @property
    def blocks(self) -> range:
        """The blocks this rank holds, of ``parts``."""
        n = self.parts // self.size
        return range(self.index * n, (self.index + 1) * n)

    def vocab(self, size: int) -> range:
        """The rows of the embedding and LM head this rank holds (stage 0 splits them by vocabulary)."""
        return range(self.blocks.start * size // self.parts, self.blocks.stop * size // self.parts)

    def check(self, config: ModelConfig) -> None:
        """``UserError`` unless this split divides the model: a power-of-two ``size`` that divides
        ``parts``, which divides the KV heads, the intermediate size and the vocabulary; and a dense
        model (mixtures of experts are not split)."""
        t, c = self.size, self.parts
        if t & (t - 1) or c % t:
            raise UserError(f"--tp {t} must be a power of two that divides --tp-parts {c}")
        if c == 1:
            return
        if config.n_experts or config.qk_norm_full:
            raise UserError(f"--tp and --tp-parts do not split {config.model_type} (a mixture of experts) yet: "
                            "use a pipeline (--tp 1) for it")
        if config.n_kv_heads % c or config.intermediate_size % c or config.vocab_size % c:
            raise UserError(f"--tp-parts {c} must divide the model's {config.n_kv_heads} KV heads, its "
                            f"intermediate size {config.intermediate_size} and its vocabulary {config.vocab_size}")


WHOLE = TensorSplit()  # the model not split: one rank holds every layer whole


def tree_sum(xs: list[torch.Tensor]) -> torch.Tensor:
    """``xs`` added in one fixed order: each half summed, then the halves. Ranks that hold equal
    power-of-two shares of the blocks sum their own first, and the result does not change."""
    if len(xs) == 1:
        return xs[0]
    mid = len(xs) // 2
    return tree_sum(xs[:mid]) + tree_sum(xs[mid:])


class ColumnParallel(nn.Module):
    """A linear layer split by output columns into ``split.parts`` blocks, of which this rank holds
    ``split.blocks`` (``parts.i`` is block ``split.blocks[i]``, with its bias): x [T, in] ->
    [T, out * len(blocks) / parts]."""

    def __init__(self, d_in: int, d_out: int, bias: bool, split: TensorSplit):
        super().__init__()
        self.parts = nn.ModuleList(Linear(d_in, d_out // split.parts, bias=bias) for _ in split.blocks)

    def forward(self, x: torch.Tensor, n_single: int) -> torch.Tensor:
        ys = [p(x, n_single) for p in self.parts]
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)


class RowParallel(nn.Module):
    """A linear layer split by input columns into ``split.parts`` blocks, of which this rank holds
    ``split.blocks``: x [T, in * len(blocks) / parts] -> [T, out]. Each block's product is summed in
    float32 in ``tree_sum``'s order, first on this rank, then across the stage's ranks by
    ``combine`` (set by ``Stage.set_combine``; alone, a rank holds every block), rounded once, and
    the bias (held whole) added."""

    def __init__(self, d_in: int, d_out: int, bias: bool, split: TensorSplit):
        super().__init__()
        self.parts = nn.ModuleList(Linear(d_in // split.parts, d_out, bias=False) for _ in split.blocks)
        self.bias = nn.Parameter(torch.empty(d_out)) if bias else None
        self.combine: Callable[[torch.Tensor], torch.Tensor] = lambda x: x

    def forward(self, x: torch.Tensor, n_single: int) -> torch.Tensor:
        xs = [xi.contiguous() for xi in x.chunk(len(self.parts), dim=-1)]  # the kernels were chosen on whole rows
        y = self.combine(tree_sum([p(xi, n_single).float() for p, xi in zip(self.parts, xs)])).to(x.dtype)  # [T, out]
        return y if self.bias is None else y + self.bias


def column(d_in: int, d_out: int, bias: bool, split: TensorSplit) -> nn.Module:
    """A column-parallel linear layer, or a plain ``Linear`` when the model is not split."""
    return Linear(d_in, d_out, bias=bias) if split.parts == 1 else ColumnParallel(d_in, d_out, bias, split)


def row(d_in: int, d_out: int, bias: bool, split: TensorSplit) -> nn.Module:
    """A row-parallel linear layer, or a plain ``Linear`` when the model is not split."""
    return Linear(d_in, d_out, bias=bias) if split.parts == 1 else RowParallel(d_in, d_out, bias, split)


def pick_kernels(
    root: nn.Module, forced: str | None, cache: Path | None, head: torch.Tensor | None = None, quant_forced: str | None = None
) -> tuple[Selection, ShapeKernels | None]:
    """Choose the kernels of every ``Linear`` under ``root`` (and of an LM ``head`` weight, whose
    rows are all decode rows; its kernels are returned) with ``kernels.choose_kernels``, and of every
    quantized weight under it with ``quant.choose_quant_kernels`` (``quant_forced``: for int8 weights)."""
    linears = [m for m in root.modules() if isinstance(m, Linear) and m.qweight is None]
    experts = [m for m in root.modules() if isinstance(m, Experts) and m.gate_up_q is None]
    weights = [(m.weight, None, False) for m in linears]  # biases are added after the kernels (``linear``)
    weights += [(w, None, False) for m in experts for w in (m.gate_up_proj[0], m.down_proj[0])]  # one shape each
    weights += [(head, None, True)] if head is not None else []
    selection, chosen = choose_kernels(weights, forced, cache)
    t0 = time.perf_counter()
    selection.quant = choose_quant_kernels([m for m in root.modules() if isinstance(m, QuantWeight)], quant_forced, cache)
    selection.seconds += time.perf_counter() - t0
    for m, k in zip(linears, chosen):
        m.kernels = k
    rest = iter(chosen[len(linears):])
    for m in experts:
        m.gate_up_kernels, m.down_kernels = next(rest), next(rest)
    return selection, chosen[-1] if head is not None else None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, gemma: bool = False, float_scale: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.gemma = gemma  # the weight is an offset from 1, applied in float32
        self.float_scale = float_scale  # gpt_oss: the weight applied in float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the model dtype (gemma, gpt_oss: in float32), as transformers does.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma:
            return (x32 * (1.0 + self.weight.float())).to(dtype)
        if self.float_scale:
            return (self.weight * x32).to(dtype)
        return self.weight * x32.to(dtype)


def rope_tables(config: ModelConfig, max_seq_len: int, dtype: torch.dtype, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [max_seq_len, rotary_dim], computed in float32 and cast to ``dtype``
    (``local``: for gemma3's sliding-window layers). With longrope, [2 * max_seq_len, rotary_dim]:
    the short factors' rows, then the long factors' (row ``max_seq_len + p`` for position p)."""
    kinds = (False, True) if config.long_rope_after is not None and not local else (False,)
    positions = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = torch.cat([torch.outer(positions, config.inv_freq(local, long)) for long in kinds])  # [L or 2L, rd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [L or 2L, rd]
    scale = config.rope_attention_factor
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``rd`` dims of each head of ``x`` [T, H, hd] by cos/sin [T, 1, rd] (the
    rotate-half convention of HF checkpoints); the rest pass through (partial rotary, phi3)."""
    rd = cos.shape[-1]
    xr = x[..., :rd] if rd < x.shape[-1] else x
    half = rd // 2
    rotated = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
    out = xr * cos + rotated * sin
    return out if rd == x.shape[-1] else torch.cat((out, x[..., rd:]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, window: int | None = None, split: TensorSplit = WHOLE):
        super().__init__()
        self.window = window  # sliding window: a query sees only the last ``window`` keys (None: all)
        self.scale = config.attn_scale or None
        self.softcap = config.attn_softcap
        d, hd, held = config.hidden_size, config.head_dim, len(split.blocks)
        self.n_heads, self.n_kv_heads = config.n_heads * held // split.parts, config.n_kv_heads * held // split.parts  # this rank's
        self.head_dim = hd
        self.q_proj = column(d, config.n_heads * hd, config.qkv_bias, split)
        self.k_proj = column(d, config.n_kv_heads * hd, config.qkv_bias, split)
        self.v_proj = column(d, config.n_kv_heads * hd, config.qkv_bias, split)
        self.o_proj = row(config.n_heads * hd, d, config.o_bias, split)
        # qwen3: RMSNorm over each head of q and of k, before RoPE; olmoe: over the whole projections
        self.full_qk_norm = config.qk_norm_full
        q_dim, k_dim = (config.n_heads * hd, config.n_kv_heads * hd) if config.qk_norm_full else (hd, hd)
        norm = config.qk_norm or config.qk_norm_full
        self.q_norm = RMSNorm(q_dim, config.rms_norm_eps, config.gemma) if norm else None
        self.k_norm = RMSNorm(k_dim, config.rms_norm_eps, config.gemma) if norm else None
        self.clip = config.clip_qkv
        # gpt_oss: a learned logit per head beside the keys' in the softmax (its probability is dropped)
        self.sinks = nn.Parameter(torch.empty(config.n_heads)) if config.gpt_oss else None
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, batch: Batch, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [T, D]; cos, sin: [T, 1, hd]
        t, ns = x.shape[0], batch.n_single
        with one_rounding():
            q, k, v = self.q_proj(x, ns), self.k_proj(x, ns), self.v_proj(x, ns)  # [T, H*hd], [T, Hkv*hd] x 2
        if self.full_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (z.clamp(-self.clip, self.clip) for z in (q, k, v))
        q = q.view(t, self.n_heads, self.head_dim)  # [T, H, hd]
        k = k.view(t, self.n_kv_heads, self.head_dim)  # [T, Hkv, hd]
        v = v.view(t, self.n_kv_heads, self.head_dim)  # [T, Hkv, hd]
        if self.q_norm is not None and not self.full_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        outs = []
        off = 0
        for slot, start, n in zip(batch.slots, batch.starts, batch.lengths):
            keys, values = self.kv_cache.update(slot, start, k[off : off + n], v[off : off + n])  # [1, Hkv, L, hd]
            qs = q[off : off + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, hd]
            lo = 0 if self.window is None else max(0, start - self.window + 1)  # oldest key the first query sees
            if lo:
                keys, values = keys[:, :, lo:], values[:, :, lo:]  # [1, Hkv, L - lo, hd]
            mask, causal = None, n > 1 and start == 0 and (self.window is None or n <= self.window)
            if n > 1 and not causal:  # query i (position start+i) sees keys start+i-W < j <= start+i
                kpos, qpos = torch.arange(lo, start + n), torch.arange(start, start + n)[:, None]
                mask = kpos <= qpos  # [n, L - lo]
                if self.window is not None:
                    mask &= kpos > qpos - self.window
            if self.softcap is None and self.sinks is None:
                o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=True,
                                                   scale=self.scale)  # [1, H, n, hd]
            else:
                o = self._explicit(qs, keys, values, mask, causal)
            outs.append(o[0].transpose(0, 1).reshape(n, -1))
            off += n
        y = outs[0] if len(outs) == 1 else torch.cat(outs)  # [T, H*hd]
        return self.o_proj(y, ns)

    def _explicit(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                  causal: bool) -> torch.Tensor:
        """Attention written out, for what SDPA lacks: gemma2's tanh soft cap on the logits, and
        gpt_oss's sinks (a per-head logit in the softmax whose probability goes nowhere): q [1, H, n, hd]."""
        group = self.n_heads // self.n_kv_heads
        k, v = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)  # [1, H, L, hd]
        s = q @ k.transpose(2, 3) * (self.scale or self.head_dim**-0.5)  # [1, H, n, L]
        if self.softcap is not None:
            s = torch.tanh(s / self.softcap) * self.softcap
        if causal:
            mask = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        if self.sinks is None:
            return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v
        s = torch.cat([s, self.sinks.view(1, -1, 1, 1).expand(*s.shape[:-1], 1).to(s.dtype)], dim=-1)  # [1, H, n, L + 1]
        s = s - s.amax(dim=-1, keepdim=True)  # in the model dtype, as transformers' eager attention for sinks
        return torch.softmax(s, dim=-1, dtype=s.dtype)[..., :-1] @ v


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, intermediate: int | None = None, split: TensorSplit = WHOLE):
        super().__init__()
        d, i = config.hidden_size, intermediate or config.intermediate_size
        self.gate_proj = column(d, i, False, split)
        self.up_proj = column(d, i, False, split)
        self.down_proj = row(i, d, False, split)
        self.act = (lambda g: F.gelu(g, approximate="tanh")) if config.gemma else F.silu  # GeGLU or SwiGLU

    def forward(self, x: torch.Tensor, n_single: int) -> torch.Tensor:
        with one_rounding():
            gate, up = self.gate_proj(x, n_single), self.up_proj(x, n_single)
        return self.down_proj(self.act(gate) * up, n_single)


class Experts(nn.Module):
    """A sparse layer's SwiGLU experts, held as transformers holds them: ``gate_up_proj`` [E, 2I, D]
    (each expert's gate rows, then its up rows) and ``down_proj`` [E, D, I]; or, quantized, one
    ``QuantWeight`` per expert in ``gate_up_q`` and ``down_q`` (the 3-D parameters are then gone)."""

    gate_up_kernels: ShapeKernels  # set by pick_kernels: every expert has the same shapes
    down_kernels: ShapeKernels

    def __init__(self, n_experts: int, hidden: int, inner: int, clamped: tuple[float, float] | None = None):
        super().__init__()
        self.n_experts = n_experts
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inner))
        self.gate_up_q: nn.ModuleList | None = None  # set by Stage.set_quantized_experts
        self.down_q: nn.ModuleList | None = None
        # gpt_oss: biases, and the clamped SwiGLU (alpha, limit): (up + 1) * gate * sigmoid(alpha * gate)
        self.clamped = clamped
        self.gate_up_proj_bias = nn.Parameter(torch.empty(n_experts, 2 * inner)) if clamped else None
        self.down_proj_bias = nn.Parameter(torch.empty(n_experts, hidden)) if clamped else None

    def biases(self, e: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Expert ``e``'s gate_up and down biases (None without)."""
        if self.clamped is None:
            return None, None
        return self.gate_up_proj_bias[e], self.down_proj_bias[e]

    def act(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.clamped is None:
            return F.silu(gate) * up
        alpha, limit = self.clamped
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    def forward(self, e: int, x: torch.Tensor, n_single: int) -> torch.Tensor:
        """Expert ``e`` on its rows ``x`` [n, D] (the first ``n_single`` decode rows) -> [n, D]."""
        b1, b2 = self.biases(e)
        if self.gate_up_q is not None:
            h = self.gate_up_q[e](x)  # [n, 2I]
            h = h if b1 is None else h + b1
        else:
            h = linear(x, self.gate_up_proj[e], b1, n_single, self.gate_up_kernels)
        a = self.act(*h.chunk(2, dim=-1))  # [n, I]
        if self.down_q is not None:
            y = self.down_q[e](a)
            return y if b2 is None else y + b2
        return linear(a, self.down_proj[e], b2, n_single, self.down_kernels)


class SparseMoE(nn.Module):
    """A mixture of experts in place of the MLP: a router (``gate``) picks each row's top-k
    experts, only the experts some row chose are computed, each on its own rows, and a row's output
    is the sum of its experts' outputs times their routing weights; qwen2_moe adds a shared expert
    scaled by a sigmoid gate.

    Batch invariance: an expert's rows keep their order in the call (decode rows first), so they go
    through the same batch-invariant kernels as any linear layer; and each row's k weighted expert
    outputs are added one after another in expert order, in float32 (k - 1 additions over all rows
    at once), so a row's bits do not depend on which rows share its call or on how many of them
    chose the same experts."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d, n = config.hidden_size, config.n_experts
        self.top_k, self.norm_topk = config.n_experts_per_tok, config.norm_topk_prob
        self.float_weights = config.float_routing_weights
        self.softmax_after_topk = config.gpt_oss  # gpt_oss: top-k of the logits, then softmax over them
        self.gate = Linear(d, n, bias=config.gpt_oss, quantizable=False)  # the router
        clamped = (config.swiglu_alpha, config.swiglu_limit) if config.gpt_oss else None
        self.experts = Experts(n, d, config.expert_size, clamped)
        shared = config.shared_expert_size
        self.shared_expert = MLP(config, shared) if shared else None
        self.shared_expert_gate = Linear(d, 1, bias=False, quantizable=False) if shared else None

    def route(self, x: torch.Tensor, n_single: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's top-k experts [T, k] and their weights [T, k], as transformers computes them:
        softmax in float32 over all experts, top-k, renormalised if the family does, in x's dtype
        (mixtral: float32); gpt_oss: top-k of the logits, softmax over those in x's dtype."""
        logits = self.gate(x, n_single)  # [T, E]
        if self.softmax_after_topk:
            top, chosen = torch.topk(logits, self.top_k, dim=-1)  # [T, k]
            return chosen, torch.softmax(top, dim=-1, dtype=top.dtype)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)  # [T, k]
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return chosen, weights if self.float_weights else weights.to(x.dtype)

    def forward(self, x: torch.Tensor, n_single: int) -> torch.Tensor:
        # x: [T, D]
        t, k, n = x.shape[0], self.top_k, self.experts.n_experts
        chosen, weights = self.route(x, n_single)
        chosen, rank = chosen.sort(dim=-1)  # each row's experts in expert order: the order they are added in
        weights = weights.gather(1, rank)
        flat = chosen.flatten()  # [T*k]: row t's experts at t*k .. t*k+k-1
        order = torch.argsort(flat, stable=True)  # the (row, expert) pairs grouped by expert, rows ascending
        xs = x[order // k]  # [T*k, D]: each expert's rows together, its decode rows first
        counts = torch.bincount(flat, minlength=n).tolist()
        singles = torch.bincount(flat[: n_single * k], minlength=n).tolist()  # decode rows come first
        ys, off = [], 0
        for e in [e for e, c in enumerate(counts) if c]:  # only the experts some row chose
            ys.append(self.experts(e, xs[off : off + counts[e]], singles[e]))
            off += counts[e]
        back = torch.empty_like(order)
        back[order] = torch.arange(t * k)
        y = (torch.cat(ys)[back] * weights.reshape(-1, 1)).view(t, k, -1)  # [T, k, D] by row, experts in order
        out = y[:, 0].float()  # (a view of y in float32: y is not read again but for its other columns)
        for j in range(1, k):  # a row's outputs added one by one in expert order, whatever the batch
            out += y[:, j]
        out = out.to(x.dtype)  # summed in float32 and rounded once, as transformers' grouped experts do
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x, n_single)) * self.shared_expert(x, n_single)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int, split: TensorSplit = WHOLE):
        super().__init__()
        d, eps, g = config.hidden_size, config.rms_norm_eps, config.gemma
        self.input_layernorm = RMSNorm(d, eps, g, config.gpt_oss)
        self.self_attn = Attention(config, config.layer_windows[index], split)
        self.post_attention_layernorm = RMSNorm(d, eps, g, config.gpt_oss)  # llama: before the MLP; gemma: on the attention's output
        self.mlp = SparseMoE(config) if config.is_sparse(index) else MLP(config, split=split)
        # gemma: norms before and after the MLP as well
        self.pre_feedforward_layernorm = RMSNorm(d, eps, g) if g else None
        self.post_feedforward_layernorm = RMSNorm(d, eps, g) if g else None
        # gemma3: sliding-window layers use their own RoPE (Stage passes the matching tables)
        self.local_rope = config.local_rope_theta is not None and config.layer_windows[index] is not None

    def forward(self, x: torch.Tensor, batch: Batch, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [T, D]
        if self.pre_feedforward_layernorm is not None:
            x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), batch, cos, sin))
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), batch.n_single))
        x = x + self.self_attn(self.input_layernorm(x), batch, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x), batch.n_single)
