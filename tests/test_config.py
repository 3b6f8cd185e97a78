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


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="gpt2"), "unsupported model_type 'gpt2'"),
        (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
        (dict(num_key_value_heads=3), "does not divide"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "unsupported RoPE scaling type 'yarn'"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(model_type="qwen3_moe"), "unsupported model_type 'qwen3_moe'"),
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


def test_bad_layer_types_are_named():
    with pytest.raises(UserError, match="unsupported layer_types"):
        ModelConfig.from_dict({**BASE, "num_hidden_layers": 2, "layer_types": ["full_attention", "chunked_attention"]})
    with pytest.raises(UserError, match="sliding_window is not set"):
        ModelConfig.from_dict({**BASE, "num_hidden_layers": 1, "layer_types": ["sliding_attention"]})


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    with pytest.raises(UserError, match="unknown dtype"):
        parse_dtype("int4")
