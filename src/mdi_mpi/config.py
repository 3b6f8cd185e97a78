"""Model configuration read from a Hugging Face ``config.json`` (llama, mistral, qwen2, qwen3).

Reads both the transformers 4 keys (``torch_dtype``, ``rope_theta``, ``rope_scaling``) and the
transformers 5 keys (``dtype``, ``rope_parameters``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mdi_mpi.errors import UserError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
DEFAULT_CONTEXT = 2048  # the --max-seq-len default when the model allows more
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(name: str) -> torch.dtype:
    """Map a dtype name (``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``) to torch."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; choose one of float32, bfloat16, float16") from None


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, as far as inference needs it."""

    model_type: str  # llama, mistral or qwen2
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # MLP inner width
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (GQA when < n_heads)
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict = field(default_factory=dict)  # {"rope_type": "llama3"|"linear", ...} or {}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # q/k/v projections carry a bias (qwen2, llama attention_bias)
    o_bias: bool = False  # o_proj carries a bias (llama attention_bias)
    sliding_window: int | None = None  # attention window; we only run within it
    qk_norm: bool = False  # RMSNorm over each head of q and of k before RoPE (qwen3)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None  # dtype the checkpoint was saved in, if stated

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        """Build from a parsed ``config.json``; unsupported models or features raise ``UserError``."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"unsupported model_type {model_type!r}; mdi-mpi supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        qc = raw.get("quantization_config")
        if qc:
            method = qc.get("quant_method", "an unknown method") if isinstance(qc, dict) else "an unknown method"
            raise UserError(
                f"this checkpoint is already quantized ({method}), a format mdi-mpi does not read; use the "
                "original bf16/fp16/fp32 checkpoint with --quant int8|int4, or shards from 'python -m mdi_mpi.split --quant'"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"unsupported hidden_act {act!r}; only 'silu' (SwiGLU) is supported")
        if raw.get("mlp_bias"):
            raise UserError("unsupported feature mlp_bias=true")
        try:
            hidden = int(raw["hidden_size"])
            n_heads = int(raw["num_attention_heads"])
            n_layers = int(raw["num_hidden_layers"])
            vocab = int(raw["vocab_size"])
            inter = int(raw["intermediate_size"])
        except KeyError as e:
            raise UserError(f"config.json lacks the required key {e.args[0]!r}") from None
        n_kv = int(raw.get("num_key_value_heads") or n_heads)
        if n_heads % n_kv:
            raise UserError(f"num_key_value_heads={n_kv} does not divide num_attention_heads={n_heads}")
        head_dim = int(raw.get("head_dim") or hidden // n_heads)

        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UserError(f"unsupported RoPE scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise UserError("unsupported feature partial_rotary_factor != 1")
        rope = {"rope_type": rope_type, **{k: v for k, v in rope.items() if k not in ("type", "rope_type")}}
        if rope_type == "default":
            rope = {}

        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
            window = raw.get("sliding_window") if raw.get("use_sliding_window") else None
        elif model_type == "qwen3":
            qkv_bias = o_bias = bool(raw.get("attention_bias", False))
            window = raw.get("sliding_window") if raw.get("use_sliding_window") else None
        else:
            qkv_bias = o_bias = bool(raw.get("attention_bias", False))
            window = raw.get("sliding_window")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            sliding_window=int(window) if window else None,
            qk_norm=model_type == "qwen3",
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` from a checkpoint directory."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise UserError(f"no config.json in {path}: not a Hugging Face checkpoint directory")
        try:
            raw = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{file} is not valid JSON: {e}") from None
        return cls.from_dict(raw)

    def default_context(self, cap: int = DEFAULT_CONTEXT) -> int:
        """The ``--max-seq-len`` default: the model's own maximum, at most ``cap``."""
        return min(self.max_position_embeddings, cap)

    def check_context(self, max_seq_len: int) -> None:
        """Refuse a context length the model cannot serve exactly."""
        if max_seq_len < 2:
            raise UserError(f"--max-seq-len must be at least 2, got {max_seq_len}")
        if self.sliding_window is not None and max_seq_len > self.sliding_window:
            raise UserError(
                f"--max-seq-len {max_seq_len} exceeds the model's sliding_window {self.sliding_window}; "
                "sliding-window attention is not implemented, so use --max-seq-len <= the window"
            )

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies [head_dim // 2] in float32, with linear or llama3 scaling applied."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        kind = self.rope_scaling.get("rope_type")
        if kind == "linear":
            return inv / float(self.rope_scaling["factor"])
        if kind == "llama3":
            s = self.rope_scaling
            factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
            old_len = float(s.get("original_max_position_embeddings", self.max_position_embeddings))
            low_wavelen, high_wavelen = old_len / low, old_len / high
            wavelen = 2 * math.pi / inv
            scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv

    def layer_param_count(self) -> int:
        """Parameters in one decoder layer."""
        d, q, kv = self.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.o_bias:
            attn += d
        if self.qk_norm:
            attn += 2 * self.head_dim
        return attn + 3 * d * self.intermediate_size + 2 * d

    def edge_param_count(self) -> int:
        """Parameters rank 0 holds besides its layers: embedding, final norm and LM head."""
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + self.hidden_size + head

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """KV cache bytes one position of one sequence takes in one layer."""
        return 2 * self.n_kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()
