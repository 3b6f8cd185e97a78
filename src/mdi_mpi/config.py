"""Model configuration read from a Hugging Face ``config.json`` (llama, mistral, qwen2, qwen3, phi3,
gemma2, gemma3, and the mixtures of experts qwen3_moe, mixtral, qwen2_moe, olmoe, gpt_oss).

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

MOE_MODEL_TYPES = ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "gpt_oss")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", *MOE_MODEL_TYPES)
# Families whose design we do not implement, and what it is (named in the error).
UNSUPPORTED_DESIGNS = {
    "deepseek_v2": "DeepSeek's multi-head latent attention (MLA) and grouped expert routing",
    "deepseek_v3": "DeepSeek's multi-head latent attention (MLA) and grouped expert routing",
    "deepseek_v32": "DeepSeek's multi-head latent attention (MLA) and sparse attention",
    "kimi_k2": "DeepSeek's multi-head latent attention (MLA), which Kimi K2 uses",
    "qwen3_next": "Qwen3-Next's hybrid linear attention (Gated DeltaNet)",
    "qwen3_5_moe": "Qwen3.5's hybrid linear attention (Gated DeltaNet)",
    "jamba": "Jamba's Mamba layers",
    "granitemoehybrid": "Granite's Mamba layers",
    "glm4_moe": "GLM-4-MoE's grouped expert routing with a score-correction bias",
    "dbrx": "DBRX's fused expert layout and clipped QKV",
    "phimoe": "PhiMoE's sparsemixer routing",
}
DEFAULT_CONTEXT = 2048  # the --max-seq-len default when the model allows more
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def _layer_windows(raw: dict, model_type: str, n_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding attention window (None: global), as transformers decides it: from
    ``layer_types`` when the config lists them; else mistral and phi3 slide on every layer when
    ``sliding_window`` is set, and qwen2/qwen3 with ``use_sliding_window`` from ``max_window_layers`` on."""
    window = raw.get("sliding_window")
    types = raw.get("layer_types")
    if types is not None:
        if len(types) != n_layers or any(t not in ("full_attention", "sliding_attention") for t in types):
            raise UserError(f"unsupported layer_types {types!r}: expected {n_layers} of full_attention or sliding_attention")
        if "sliding_attention" in types and not window:
            raise UserError("layer_types has sliding_attention layers but sliding_window is not set")
        return tuple(int(window) if t == "sliding_attention" else None for t in types)
    if not window or model_type == "olmoe":
        return (None,) * n_layers
    if model_type == "qwen3_moe":  # every layer, with use_sliding_window
        return (int(window) if raw.get("use_sliding_window") else None,) * n_layers
    if model_type == "qwen2_moe":  # transformers' default layer_types: odd layers below max_window_layers
        first = int(raw.get("max_window_layers", n_layers))
        slide = bool(raw.get("use_sliding_window"))
        return tuple(int(window) if slide and (i + 1) % 2 and i < first else None for i in range(n_layers))
    if model_type in ("qwen2", "qwen3"):
        if not raw.get("use_sliding_window"):
            return (None,) * n_layers
        first = int(raw.get("max_window_layers", n_layers))
        return tuple(int(window) if i >= first else None for i in range(n_layers))
    return (int(window),) * n_layers


def _sparse_layers(raw: dict, model_type: str, n_layers: int) -> tuple[bool, ...]:
    """Which layers hold a mixture of experts (the others a dense MLP): qwen's ``mlp_only_layers``
    and ``decoder_sparse_step``; every layer of mixtral and olmoe; none of a dense model."""
    if model_type not in MOE_MODEL_TYPES:
        return (False,) * n_layers
    if model_type in ("mixtral", "olmoe", "gpt_oss"):
        return (True,) * n_layers
    dense = set(raw.get("mlp_only_layers") or ())
    step = int(raw.get("decoder_sparse_step") or 1)
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(n_layers))


def parse_dtype(name: str) -> torch.dtype:
    """Map a dtype name (``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``) to torch."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; choose one of float32, bfloat16, float16") from None


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, as far as inference needs it."""

    model_type: str  # one of SUPPORTED_MODEL_TYPES
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
    layer_windows: tuple[int | None, ...] = ()  # per layer: the sliding attention window, or None (global)
    qk_norm: bool = False  # RMSNorm over each head of q and of k before RoPE (qwen3)
    qk_norm_full: bool = False  # olmoe: RMSNorm over the whole q and k projections (all heads at once)
    clip_qkv: float | None = None  # olmoe: q, k and v clamped to [-clip, clip]
    n_experts: int = 0  # routed experts of each sparse layer (0: a dense model)
    n_experts_per_tok: int = 0  # experts each token is routed to (top-k)
    expert_size: int = 0  # inner width of each expert's SwiGLU MLP
    norm_topk_prob: bool = False  # renormalise the top-k routing weights to sum to 1 (mixtral, qwen3_moe)
    float_routing_weights: bool = False  # mixtral: the weights scale the experts' outputs in float32
    gpt_oss: bool = False  # attention sinks; a router with a bias, softmax over the top-k; experts with biases
    # and a clamped SwiGLU (gate and up interleaved in the checkpoint); norms scaled in float32
    swiglu_alpha: float = 1.702  # gpt_oss: glu = gate * sigmoid(alpha * gate)
    swiglu_limit: float = 7.0  # gpt_oss: gate clamped to <= limit, up to [-limit, limit]
    shared_expert_size: int = 0  # qwen2_moe: inner width of the shared expert beside the routed ones (0: none)
    sparse_layers: tuple[bool, ...] = ()  # per layer: a mixture of experts (else a dense MLP)
    gemma: bool = False  # gemma: (1 + w) norms around attention and MLP, GeGLU, embeddings scaled by sqrt(D)
    local_rope_theta: float | None = None  # gemma3: sliding-window layers' own RoPE base (no scaling)
    attn_scale: float = 0.0  # attention logits scale: query_pre_attn_scalar ** -0.5 (default head_dim ** -0.5)
    attn_softcap: float | None = None  # gemma2: tanh soft cap of attention logits
    final_softcap: float | None = None  # gemma2: tanh soft cap of the LM head's logits
    fused_projections: bool = False  # checkpoint stores qkv_proj and gate_up_proj fused (phi3); split at load
    rotary_dim: int = 0  # leading dims of each head that RoPE rotates (partial_rotary_factor); 0: all
    original_max_position_embeddings: int | None = None  # longrope: the pretrained context
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None  # dtype the checkpoint was saved in, if stated

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        """Build from a parsed ``config.json``; unsupported models or features raise ``UserError``."""
        model_type = raw.get("model_type")
        if model_type == "gemma3" and isinstance(raw.get("text_config"), dict):  # multimodal: its text tower
            top = {k: raw[k] for k in ("eos_token_id", "bos_token_id", "tie_word_embeddings") if k in raw}
            return cls.from_dict({**top, **raw["text_config"], "model_type": "gemma3_text"})
        if model_type in UNSUPPORTED_DESIGNS:
            raise UserError(
                f"unsupported model_type {model_type!r}: mdi-mpi does not implement {UNSUPPORTED_DESIGNS[model_type]}; "
                f"it supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(
                f"unsupported model_type {model_type!r}; mdi-mpi supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        qc = raw.get("quantization_config")
        if model_type == "gpt_oss" and isinstance(qc, dict) and qc.get("quant_method") == "mxfp4":
            qc = None  # its experts' MXFP4 blocks are decoded at load (checkpoint.read_expert)
        if qc:
            method = qc.get("quant_method", "an unknown method") if isinstance(qc, dict) else "an unknown method"
            raise UserError(
                f"this checkpoint is already quantized ({method}), a format mdi-mpi does not read; use the "
                "original bf16/fp16/fp32 checkpoint with --quant int8|int4, or shards from 'python -m mdi_mpi.split --quant'"
            )
        gemma = model_type in ("gemma2", "gemma3_text")
        act = raw.get("hidden_activation") or raw.get("hidden_act", "silu") if gemma else raw.get("hidden_act", "silu")
        if act not in (("gelu_pytorch_tanh",) if gemma else ("silu",)):
            raise UserError(f"unsupported hidden_act {act!r} for {model_type}")
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
        local_theta = raw.get("rope_local_base_freq") if model_type == "gemma3_text" else None
        if "full_attention" in rope:  # transformers 5, gemma3: one RoPE per kind of layer
            local = rope.get("sliding_attention") or {}
            if local.get("rope_type", "default") != "default":
                raise UserError(f"unsupported RoPE scaling {local.get('rope_type')!r} on sliding-window layers")
            local_theta = local.get("rope_theta", local_theta)
            rope = dict(rope["full_attention"])
        theta = float(rope.pop("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UserError(f"unsupported RoPE scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        partial = float(rope.pop("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
        if partial != 1.0 and model_type != "phi3":
            raise UserError(f"unsupported feature partial_rotary_factor={partial} for {model_type} (supported for phi3)")
        if rope_type == "longrope" and model_type != "phi3":
            raise UserError(f"unsupported RoPE scaling type 'longrope' for {model_type} (supported for phi3)")
        if rope_type == "yarn" and model_type != "gpt_oss":
            raise UserError(f"unsupported RoPE scaling type 'yarn' for {model_type} (supported for gpt_oss)")
        original_max = rope.get("original_max_position_embeddings", raw.get("original_max_position_embeddings"))
        rope = {"rope_type": rope_type, **{k: v for k, v in rope.items() if k not in ("type", "rope_type")}}
        if rope_type == "default":
            rope = {}

        if model_type == "phi3" and raw.get("attention_bias"):
            raise UserError("unsupported feature attention_bias=true for phi3")
        if model_type == "qwen2":
            qkv_bias, o_bias = True, False
        elif model_type == "qwen2_moe":
            qkv_bias, o_bias = bool(raw.get("qkv_bias", True)), False
        else:
            qkv_bias = o_bias = bool(raw.get("attention_bias", model_type == "gpt_oss"))
        windows = _layer_windows(raw, model_type, n_layers)
        moe = model_type in MOE_MODEL_TYPES
        n_experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0) if moe else 0
        top_k = int(raw.get("num_experts_per_tok") or 0) if moe else 0
        if moe and not 0 < top_k <= n_experts:
            raise UserError(f"num_experts_per_tok={top_k} must be between 1 and the {n_experts} experts")
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
            layer_windows=windows,
            qk_norm=model_type in ("qwen3", "gemma3_text", "qwen3_moe"),
            qk_norm_full=model_type == "olmoe",
            clip_qkv=float(raw["clip_qkv"]) if model_type == "olmoe" and raw.get("clip_qkv") is not None else None,
            n_experts=n_experts,
            n_experts_per_tok=top_k,
            expert_size=int(raw.get("moe_intermediate_size") or inter) if moe else 0,
            norm_topk_prob=model_type == "mixtral" or bool(raw.get("norm_topk_prob", False)),
            float_routing_weights=model_type == "mixtral",
            gpt_oss=model_type == "gpt_oss",
            swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
            shared_expert_size=int(raw.get("shared_expert_intermediate_size") or 0) if model_type == "qwen2_moe" else 0,
            sparse_layers=_sparse_layers(raw, model_type, n_layers),
            local_rope_theta=float(local_theta or 10000.0) if model_type == "gemma3_text" else None,
            gemma=gemma,
            attn_scale=float(raw.get("query_pre_attn_scalar") or head_dim) ** -0.5,
            attn_softcap=float(raw["attn_logit_softcapping"]) if gemma and raw.get("attn_logit_softcapping") else None,
            final_softcap=float(raw["final_logit_softcapping"]) if gemma and raw.get("final_logit_softcapping") else None,
            fused_projections=model_type == "phi3",
            rotary_dim=int(head_dim * partial),
            original_max_position_embeddings=int(original_max) if original_max else None,
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
        return min(x for x in (self.max_position_embeddings, cap) if x)

    def check_context(self, max_seq_len: int) -> None:
        """Refuse a context length the model cannot serve exactly."""
        if max_seq_len < 2:
            raise UserError(f"--max-seq-len must be at least 2, got {max_seq_len}")

    @property
    def long_rope_after(self) -> int | None:
        """longrope: the original context, past which a sequence is rotated with the long factors
        (from position 0, as transformers recomputes it); None for other RoPE types."""
        if self.rope_scaling.get("rope_type") != "longrope":
            return None
        return self.original_max_position_embeddings or self.max_position_embeddings

    @property
    def rope_attention_factor(self) -> float:
        """longrope's scale on cos and sin (1 for other RoPE types)."""
        s = self.rope_scaling
        if s.get("rope_type") == "yarn":
            return self._yarn()[1]
        if s.get("rope_type") != "longrope":
            return 1.0
        if s.get("attention_factor") is not None:
            return float(s["attention_factor"])
        original = self.original_max_position_embeddings or self.max_position_embeddings
        factor = self.max_position_embeddings / original if self.original_max_position_embeddings else float(s.get("factor", 1.0))
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))

    def inv_freq(self, local: bool = False, long: bool = False) -> torch.Tensor:
        """RoPE inverse frequencies [rotary_dim // 2] in float32, with linear, llama3 or longrope
        (short factors, or ``long`` ones past the original context) scaling applied; ``local``:
        gemma3's sliding-window layers (their own base, no scaling)."""
        dim = self.rotary_dim or self.head_dim
        base = self.local_rope_theta if local else self.rope_theta
        inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if local:
            return inv
        if self.rope_scaling.get("rope_type") == "longrope":
            factors = self.rope_scaling["long_factor" if long else "short_factor"]
            return inv / torch.tensor(factors, dtype=torch.float32)
        kind = self.rope_scaling.get("rope_type")
        if kind == "yarn":
            return self._yarn()[0]
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

    def _yarn(self) -> tuple[torch.Tensor, float]:
        """YaRN (gpt_oss): inverse frequencies blended between interpolated and extrapolated ones
        by a linear ramp over the dimensions, and the attention factor, as transformers computes them."""
        s, dim, base = self.rope_scaling, self.rotary_dim or self.head_dim, self.rope_theta
        original = float(s["original_max_position_embeddings"])
        factor = float(s.get("factor") or self.max_position_embeddings / original)

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention = s.get("attention_factor")
        if attention is None:
            m, m_all = s.get("mscale"), s.get("mscale_all_dim")
            attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

        def correction_dim(rotations: float) -> float:
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if s.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
        extrapolation = 1 - ramp
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv, float(attention)

    def is_sparse(self, layer: int) -> bool:
        """Whether decoder layer ``layer`` holds a mixture of experts (else a dense MLP)."""
        return bool(self.sparse_layers) and self.sparse_layers[layer]

    def layer_param_count(self, layer: int = 0, active: bool = False) -> int:
        """Parameters in decoder layer ``layer``: all of them, or with ``active`` those one token
        computes with (of a mixture of experts, only its top-k experts)."""
        d, q, kv = self.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.o_bias:
            attn += d
        if self.qk_norm:
            attn += 2 * self.head_dim
        if self.qk_norm_full:
            attn += q + kv
        norms = (4 if self.gemma else 2) * d
        if not self.is_sparse(layer):
            return attn + 3 * d * self.intermediate_size + norms
        experts = self.n_experts_per_tok if active else self.n_experts
        shared = 3 * d * self.shared_expert_size + d if self.shared_expert_size else 0
        per_expert = 3 * d * self.expert_size + (2 * self.expert_size + d if self.gpt_oss else 0)  # gpt_oss: biases
        router = (d + 1) * self.n_experts if self.gpt_oss else d * self.n_experts
        sinks = self.n_heads if self.gpt_oss else 0
        return attn + sinks + router + experts * per_expert + shared + norms

    def layers_param_count(self, layers: range, active: bool = False) -> int:
        """Parameters in decoder layers ``layers`` (see ``layer_param_count``)."""
        return sum(self.layer_param_count(i, active) for i in layers)

    def edge_param_count(self) -> int:
        """Parameters rank 0 holds besides its layers: embedding, final norm and LM head."""
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + self.hidden_size + head

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """KV cache bytes one position of one sequence takes in one layer."""
        return 2 * self.n_kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()
