"""The Llama-family decoder in plain PyTorch: RMSNorm, RoPE, GQA attention, SwiGLU MLP.

Module and parameter names follow Hugging Face's so checkpoint tensors map one to one. Tokens are
packed: a forward call sees ``T`` tokens from one or more sequences, described by a ``Batch``.
Nothing here knows about MPI.

Batch invariance: a matmul library picks its kernel (and so its summation order) by the number of
rows, so a token's result would depend on which other tokens share its forward call, and output
would change with the number of slots or the micro-batch size. Every linear layer therefore gives
each row a computation of a fixed shape: a decode row goes through ``mv`` (the fastest way to stream
weights for one row), and several decode rows through tiles of ``DECODE_TILE`` rows where that
kernel agrees with ``mv`` bit for bit (checked per stage at set-up; true for bf16 here), else
through ``mv`` one by one; prompt rows go through tiles of ``PREFILL_TILE`` rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mdi_mpi.config import ModelConfig
from mdi_mpi.kv_cache import Batch, KVCache

DECODE_TILE = 8  # rows per matmul for decode rows
PREFILL_TILE = 64  # rows per matmul for prompt rows


def _tiles(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: int) -> torch.Tensor:
    """``x`` [m, in] @ weight.T in row tiles of exactly ``tile`` rows (zero-padded) -> [m, out]."""
    m = x.shape[0]
    pad = -m % tile
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    if x.shape[0] == tile:
        return F.linear(x, weight, bias)[:m]
    return torch.cat([F.linear(t, weight, bias) for t in x.split(tile)])[:m]


def _rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x`` [m, in] @ weight.T one row at a time with ``mv`` -> [m, out]."""
    out = [torch.mv(weight, r) if bias is None else torch.addmv(bias, weight, r) for r in x]
    return out[0].unsqueeze(0) if len(out) == 1 else torch.stack(out)


def tiled_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, n_single: int, mv_tiles: bool
) -> torch.Tensor:
    """Batch-invariant linear: ``x`` [T, in] -> [T, out]; rows [:n_single] are decode rows, the rest
    prompt rows. A lone decode row always uses ``mv``; several use decode tiles if ``mv_tiles`` (mv
    and the tile agree bit for bit), else ``mv`` row by row."""

    def decode(d: torch.Tensor) -> torch.Tensor:
        return _tiles(d, weight, bias, DECODE_TILE) if mv_tiles and d.shape[0] > 1 else _rows(d, weight, bias)

    if n_single == x.shape[0]:
        return decode(x)
    if n_single == 0:
        return _tiles(x, weight, bias, PREFILL_TILE)
    return torch.cat([decode(x[:n_single]), _tiles(x[n_single:], weight, bias, PREFILL_TILE)])


def mv_matches_tiles(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether ``mv`` gives, bit for bit, what a decode tile gives for each row (true for bf16 and
    fp16 on x86 with oneDNN, false for fp32 there)."""
    x = torch.randn(DECODE_TILE, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    return torch.equal(_rows(x, weight, bias), _tiles(x, weight, bias, DECODE_TILE))


class Linear(nn.Linear):
    """``nn.Linear`` whose rows are computed in fixed tiles (see the module docstring)."""

    mv_tiles = False  # decode tiles agree with mv (set by Stage.setup_cache)

    def forward(self, x: torch.Tensor, n_single: int) -> torch.Tensor:  # type: ignore[override]
        return tiled_linear(x, self.weight, self.bias, n_single, self.mv_tiles)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the model dtype, as transformers does.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_tables(config: ModelConfig, max_seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each [max_seq_len, head_dim], computed in float32 and cast to ``dtype``."""
    inv = config.inv_freq()  # [hd/2]
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv)  # [L, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [L, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [T, H, hd] by cos/sin [T, 1, hd] (the rotate-half convention of HF checkpoints)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, hd
        self.q_proj = Linear(d, config.n_heads * hd, bias=config.qkv_bias)
        self.k_proj = Linear(d, config.n_kv_heads * hd, bias=config.qkv_bias)
        self.v_proj = Linear(d, config.n_kv_heads * hd, bias=config.qkv_bias)
        self.o_proj = Linear(config.n_heads * hd, d, bias=config.o_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, batch: Batch, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [T, D]; cos, sin: [T, 1, hd]
        t, ns = x.shape[0], batch.n_single
        q = apply_rope(self.q_proj(x, ns).view(t, self.n_heads, self.head_dim), cos, sin)  # [T, H, hd]
        k = apply_rope(self.k_proj(x, ns).view(t, self.n_kv_heads, self.head_dim), cos, sin)  # [T, Hkv, hd]
        v = self.v_proj(x, ns).view(t, self.n_kv_heads, self.head_dim)  # [T, Hkv, hd]
        outs = []
        off = 0
        for slot, start, n in zip(batch.slots, batch.starts, batch.lengths):
            keys, values = self.kv_cache.update(slot, start, k[off : off + n], v[off : off + n])  # [1, Hkv, L, hd]
            qs = q[off : off + n].transpose(0, 1).unsqueeze(0)  # [1, H, n, hd]
            mask = None
            if n > 1 and start > 0:  # a chunk after earlier tokens: query i sees keys 0..start+i
                mask = torch.arange(start + n) <= torch.arange(start, start + n)[:, None]  # [n, L]
            o = F.scaled_dot_product_attention(
                qs, keys, values, attn_mask=mask, is_causal=n > 1 and start == 0, enable_gqa=True
            )  # [1, H, n, hd]
            outs.append(o[0].transpose(0, 1).reshape(n, -1))
            off += n
        y = outs[0] if len(outs) == 1 else torch.cat(outs)  # [T, H*hd]
        return self.o_proj(y, ns)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj = Linear(d, i, bias=False)
        self.up_proj = Linear(d, i, bias=False)
        self.down_proj = Linear(i, d, bias=False)

    def forward(self, x: torch.Tensor, n_single: int) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, n_single)) * self.up_proj(x, n_single), n_single)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, batch: Batch, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [T, D]
        x = x + self.self_attn(self.input_layernorm(x), batch, cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x), batch.n_single)
