"""Tiny random-weight chat models with the real chat templates of Qwen3, Llama 3.1, gpt-oss and
Mistral (Nemo), for
the tool-call and reasoning tests.

The templates are the model authors' own, as llama.cpp keeps them (``models/templates``); they are
read from the llama-cpp-python source distribution on PyPI, downloaded once into the tests' cache,
so that this repository holds none of them. Each model's tokenizer is the demo's byte-level BPE
with the family's marks added as tokens, as the real tokenizer has them (special or not).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

from support.models import build_hf_model

SDIST = "llama-cpp-python==0.3.36"  # vendors llama.cpp, whose models/templates holds the real templates
TEMPLATES = "vendor/llama.cpp/models/templates/"

# family -> (template file, transformers config class, config overrides, special marks, plain added marks, eos)
FAMILIES = {
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", "Qwen3Config", dict(head_dim=16),
              ["<|im_start|>", "<|im_end|>", "<|endoftext|>"],
              ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"],
              "<|im_end|>"),
    "llama3": ("meta-llama-Llama-3.1-8B-Instruct.jinja", "LlamaConfig", dict(),
               ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
                "<|python_tag|>"], [], "<|eot_id|>"),
    "gpt-oss": ("openai-gpt-oss-120b.jinja", "GptOssConfig",
                dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, head_dim=16, sliding_window=8),
                ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>", "<|constrain|>",
                 "<|endoftext|>"], [], "<|return|>"),
    "mistral": ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "MistralConfig", dict(sliding_window=None),
                ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
                 "[/TOOL_RESULTS]"], [], "</s>"),
}

# Two tools the tests offer: a call's arguments are short, so that random weights under a grammar end soon
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}

def cache_dir() -> Path:
    return Path(os.environ["MDI_MPI_CACHE"])


def real_template(name: str) -> str:
    """The text of llama.cpp's ``models/templates/<name>``, from the sdist (downloaded on first use)."""
    folder = cache_dir() / "templates"
    file = folder / name
    if not file.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "--disable-pip-version-check", SDIST, "-d", str(folder)], check=True, timeout=600)
        (archive,) = folder.glob("llama_cpp_python-*.tar.gz")
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if TEMPLATES in member.name and member.name.endswith(".jinja"):
                    target = folder / Path(member.name).name
                    target.write_bytes(tar.extractfile(member).read())
        archive.unlink()
    return file.read_text()


def chat_tokenizer(family: str):
    """The demo tokenizer with ``family``'s marks and real chat template."""
    from mdi_mpi.demo import build_tokenizer

    template, _, _, special, plain, eos = FAMILIES[family]
    tok = build_tokenizer(320)
    tok.add_special_tokens({"additional_special_tokens": special})
    tok.add_tokens(plain)
    tok.chat_template = real_template(template)
    tok.eos_token = eos
    if family == "llama3":
        tok.bos_token = "<|begin_of_text|>"
    return tok


def chat_model(family: str, path: Path) -> Path:
    """A random-weight ``family`` checkpoint at ``path`` whose tokenizer has the real chat template."""
    if (path / "config.json").is_file():
        return path
    _, kind, overrides, *_ = FAMILIES[family]
    tok = chat_tokenizer(family)
    vocab = (len(tok) + 63) // 64 * 64
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    bos = tok.convert_tokens_to_ids(tok.bos_token)
    build_hf_model(path, kind, dict(overrides, vocab_size=vocab, eos_token_id=eos, bos_token_id=bos,
                                    max_position_embeddings=8192), dtype=torch.float32)
    tok.save_pretrained(path)
    return path
