"""Our model against transformers on the same random weights: logits and greedy generation."""

from __future__ import annotations

import pytest
import torch
from support.models import VARIANTS
from support.stages import full_stage, generate
from transformers import AutoModelForCausalLM

from mdi_mpi.kv_cache import Batch


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(models, name):
    path = models[name]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stage = full_stage(path)
    ids = torch.randint(3, stage.config.vocab_size, (20,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]  # [20, V]
    ours = stage(ids, Batch.make([0], [0], [20]), all_logits=True)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_generation_matches_transformers(models, name):
    path = models[name]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    stage = full_stage(path)
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(3, stage.config.vocab_size, (n,), generator=g).tolist() for n in (1, 7, 19)]
    ours = generate(stage, prompts, n_slots=3)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, pad_token_id=0)
        assert ours[str(i)] == out[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", ["llama-gqa-llama3", "mixtral-window", "qwen3-moe"])
def test_bf16_close_to_transformers(models, name):
    path = models[name]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    stage = full_stage(path, dtype=torch.bfloat16)
    ids = torch.arange(3, 23)
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    ours = stage(ids, Batch.make([0], [0], [20]), all_logits=True)
    assert (ours - ref).abs().max().item() < 0.05
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9
