"""Config parsing: transformers 4 and 5 keys, derived fields, unsupported models."""

from __future__ import annotations

import json

import pytest
import torch

from mdi_mpi.config import ModelConfig, parse_dtype
from mdi_mpi.errors import UserError

BASE = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4)


def test_transformers4_and_5_keys_agree():
    v4 = ModelConfig.from_dict({**BASE, "torch_dtype": "bfloat16", "rope_theta": 5e5,
                                "rope_scaling": {"type": "linear", "factor": 4.0}})
    v5 = ModelConfig.from_dict({**BASE, "dtype": "bfloat16",
                                "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}})
    assert v4 == v5
    assert v4.rope_theta == 5e5 and v4.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert v4.torch_dtype == "bfloat16"


def test_defaults_and_derived_fields():
    c = ModelConfig.from_dict({**BASE, "eos_token_id": [2, 7]})
    assert c.n_kv_heads == 4 and c.head_dim == 16 and c.eos_token_ids == (2, 7)
    assert c.rope_scaling == {} and c.rope_theta == 10000.0
    c = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert c.rope_scaling == {} and c.rope_theta == 1e6
    assert ModelConfig.from_dict({**BASE, "head_dim": 32}).head_dim == 32


def test_qwen2_has_qkv_bias_and_llama_attention_bias():
    q = ModelConfig.from_dict({**BASE, "model_type": "qwen2"})
    assert q.qkv_bias and not q.o_bias
    ll = ModelConfig.from_dict({**BASE, "attention_bias": True})
    assert ll.qkv_bias and ll.o_bias


def test_llama3_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    hf = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_scaling=scaling, rope_theta=5e5)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = ModelConfig.from_dict({**hf.to_dict(), "model_type": "llama"}).inv_freq()
    assert torch.allclose(ours, ref)


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_matches_transformers(truncate):
    from transformers import GptOssConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "rope_theta": 150000.0,
            "original_max_position_embeddings": 4096, "truncate": truncate}
    hf = GptOssConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=131072, rope_parameters=rope)
    ref, factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    ours = ModelConfig.from_dict(hf.to_dict())
    assert torch.allclose(ours.inv_freq(), ref) and ours.rope_attention_factor == pytest.approx(factor)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="gpt2"), "unsupported model_type 'gpt2'"),
        (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
        (dict(num_key_value_heads=3), "does not divide"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "unsupported RoPE scaling type 'yarn'"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(model_type="deepseek_v3"), "unsupported model_type 'deepseek_v3': .*multi-head latent attention \\(MLA\\)"),
        (dict(model_type="qwen3_next"), "unsupported model_type 'qwen3_next': .*linear attention"),
        (dict(model_type="qwen3_moe", num_experts=4, num_experts_per_tok=5), "num_experts_per_tok=5"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5 for llama"),
        (dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}), "'longrope' for llama"),
        (dict(model_type="phi3", attention_bias=True), "attention_bias=true for phi3"),
        (dict(quantization_config={"quant_method": "awq"}), "already quantized \\(awq\\)"),
    ],
)
def test_unsupported_configs_are_named(change, message):
    with pytest.raises(UserError, match=message):
        ModelConfig.from_dict({**BASE, **change})


def test_missing_key_and_bad_json(tmp_path):
    with pytest.raises(UserError, match="lacks the required key 'hidden_size'"):
        ModelConfig.from_dict({k: v for k, v in BASE.items() if k != "hidden_size"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    assert ModelConfig.from_dir(tmp_path).n_layers == 2


@pytest.mark.parametrize(
    "change, windows",
    [
        (dict(model_type="mistral", sliding_window=64), (64, 64, 64, 64)),
        (dict(model_type="mistral", sliding_window=None), (None,) * 4),
        (dict(model_type="qwen2", sliding_window=64), (None,) * 4),  # qwen2 slides only with use_sliding_window
        (dict(model_type="qwen2", sliding_window=64, use_sliding_window=True, max_window_layers=3), (None, None, None, 64)),
        (dict(model_type="llama", sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2), (8, None, 8, None)),
    ],
)
def test_sliding_windows_per_layer(change, windows):
    c = ModelConfig.from_dict({**BASE, "num_hidden_layers": 4, **change})
    assert c.layer_windows == windows
    c.check_context(4096)  # a window shorter than the context is served, not refused


MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)


@pytest.mark.parametrize(
    "change, sparse",
    [
        (dict(model_type="qwen3_moe"), (True,) * 4),
        (dict(model_type="qwen3_moe", mlp_only_layers=[0, 3]), (False, True, True, False)),
        (dict(model_type="qwen2_moe", decoder_sparse_step=2), (False, True, False, True)),
        (dict(model_type="qwen2_moe", decoder_sparse_step=2, mlp_only_layers=[1]), (False, False, False, True)),
        (dict(model_type="mixtral", num_local_experts=8, num_experts=None, mlp_only_layers=[1]), (True,) * 4),
        (dict(model_type="llama"), (False,) * 4),
    ],
)
def test_sparse_and_dense_layers(change, sparse):
    c = ModelConfig.from_dict({**BASE, **MOE, "num_hidden_layers": 4, **change})
    assert c.sparse_layers == sparse
    assert c.n_experts == (8 if any(sparse) else 0)


def test_moe_fields_per_family():
    q3 = ModelConfig.from_dict({**BASE, **MOE, "model_type": "qwen3_moe", "norm_topk_prob": True})
    assert (q3.expert_size, q3.n_experts_per_tok, q3.norm_topk_prob, q3.qk_norm, q3.shared_expert_size) == (32, 2, True, True, 0)
    mx = ModelConfig.from_dict({**BASE, "model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2})
    assert (mx.n_experts, mx.expert_size, mx.norm_topk_prob) == (8, 128, True)  # experts of intermediate_size, always renormalised
    q2 = ModelConfig.from_dict({**BASE, **MOE, "model_type": "qwen2_moe", "shared_expert_intermediate_size": 48})
    assert (q2.shared_expert_size, q2.norm_topk_prob, q2.qkv_bias, q2.o_bias) == (48, False, True, False)
    ol = ModelConfig.from_dict({**BASE, **MOE, "model_type": "olmoe", "clip_qkv": 8})
    assert ol.qk_norm_full and not ol.qk_norm and ol.clip_qkv == 8.0 and not ol.norm_topk_prob
    # All experts count for memory, the top-k for compute; a dense layer among sparse ones counts as dense.
    assert q3.layer_param_count() - q3.layer_param_count(active=True) == 6 * 3 * 64 * 32
    dense = ModelConfig.from_dict({**BASE, **MOE, "model_type": "qwen3_moe", "mlp_only_layers": [0]})
    assert dense.layer_param_count(0) == dense.layer_param_count(0, active=True) < dense.layer_param_count(1)


@pytest.mark.parametrize(
    "change, windows",
    [
        (dict(model_type="qwen3_moe", sliding_window=64), (None,) * 4),
        (dict(model_type="qwen3_moe", sliding_window=64, use_sliding_window=True, max_window_layers=2), (64,) * 4),
        (dict(model_type="qwen2_moe", sliding_window=64, use_sliding_window=True, max_window_layers=3), (64, None, 64, None)),
        (dict(model_type="mixtral", num_local_experts=8, num_experts=None, sliding_window=64), (64,) * 4),
        (dict(model_type="olmoe", sliding_window=64), (None,) * 4),
    ],
)
def test_moe_sliding_windows(change, windows):
    assert ModelConfig.from_dict({**BASE, **MOE, "num_hidden_layers": 4, **change}).layer_windows == windows


def test_bad_layer_types_are_named():
    with pytest.raises(UserError, match="unsupported layer_types"):
        ModelConfig.from_dict({**BASE, "num_hidden_layers": 2, "layer_types": ["full_attention", "chunked_attention"]})
    with pytest.raises(UserError, match="sliding_window is not set"):
        ModelConfig.from_dict({**BASE, "num_hidden_layers": 1, "layer_types": ["sliding_attention"]})


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    with pytest.raises(UserError, match="unknown dtype"):
        parse_dtype("int4")
