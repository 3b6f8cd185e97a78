"""Tiny random-init checkpoints of each supported architecture, written by transformers'
``save_pretrained``."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(
    vocab_size=384,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
)

# name -> (transformers config class name, overrides)
VARIANTS = {
    "llama-gqa-llama3": ("LlamaConfig", dict(
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
        rope_theta=50000.0,
    )),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama-linear-headdim": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, head_dim=24)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "mistral-window": ("MistralConfig", dict(sliding_window=6)),  # far shorter than the prompts + tokens
    "qwen2-window": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=5, max_window_layers=2)),
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=6, pad_token_id=0,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=5, pad_token_id=0,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
                                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                         "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                            "rope_theta": 1000000.0}})),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=False)),
    "qwen3": ("Qwen3Config", dict(head_dim=24, tie_word_embeddings=True)),
    "phi3-longrope": ("Phi3Config", dict(  # Phi-4-mini's features: partial rotary, longrope, fused projections
        partial_rotary_factor=0.75, original_max_position_embeddings=128, pad_token_id=0,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0 + 0.2 * i for i in range(6)], "long_factor": [4.0] * 6},
    )),
    # Mixtures of experts: a dense layer among sparse ones, renormalised top-k or not, a shared expert,
    # a sliding window, whole-projection q/k norms.
    "qwen3-moe": ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                                         mlp_only_layers=[1], head_dim=24)),
    "mixtral-window": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48, sliding_window=6)),
    "qwen2-moe": ("Qwen2MoeConfig", dict(num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, norm_topk_prob=False, decoder_sparse_step=2)),
    "olmoe": ("OlmoeConfig", dict(num_experts=8, num_experts_per_tok=2, intermediate_size=32, clip_qkv=3.0)),
    # gpt-oss: sinks, sliding and full layers, YaRN, a router with a bias, clamped SwiGLU experts with biases
    "gpt-oss": ("GptOssConfig", dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, head_dim=16,
                                     sliding_window=6, swiglu_limit=1.0,
                                     rope_parameters={"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                                      "original_max_position_embeddings": 32, "rope_theta": 150000.0,
                                                      "truncate": False})),
}
MOE_VARIANTS = ("qwen3-moe", "mixtral-window", "qwen2-moe", "olmoe", "gpt-oss")


def build_hf_model(path: Path, kind: str, overrides: dict, seed: int = 0, **save_kwargs) -> Path:
    """Random-init a transformers causal LM and save it as a normal HF checkpoint directory."""
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, kind)(**{**TINY, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # transformers starts gpt-oss's expert biases at zero: make them count
        for name, p in model.named_parameters():
            if name.endswith(("gate_up_proj_bias", "down_proj_bias")):
                p.normal_(0.0, 0.1)
    model.save_pretrained(path, **save_kwargs)
    return path
