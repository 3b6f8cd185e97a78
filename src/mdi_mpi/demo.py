"""The demo model, and the random-weight checkpoints of the benchmark.

The demo model is a small Llama (4 layers, hidden 256, 2048-token BPE vocabulary, 3.7M parameters)
trained on the Python standard library's own source by ``scripts/train_demo.py`` and shipped in the
package (bfloat16, 7 MB), so every node has the same weights with no download: it writes
Python-like text, and quantization error shows in its perplexity. The benchmark's checkpoints are
ordinary Hugging Face directories with random weights, built once from a fixed seed into a cache
directory: their text is meaningless, their speed and memory are those of the real models.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from mdi_mpi.probes import cache_dir

DEMO_NOTE = ("note: the demo model is a 3.7M-parameter Llama trained for a few minutes on Python's standard "
             "library source: expect Python-like text, not answers")
DEMO_DIR = Path(__file__).parent / "demo_model"  # written by scripts/train_demo.py
HELD_OUT = 40  # the last files of the corpus, never trained on: the perplexity text

# The trained demo model: int4 group 128 takes every linear (in-features 256 and 768).
TRAINED_CONFIG = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)

# A small random Llama with GQA and 10 layers, so that up to 10 ranks can share it (tests).
RANDOM_CONFIG = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=10,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

# The shape of TinyLlama-1.1B: same speed and memory as the real model.
TINYLLAMA_CONFIG = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

_CORPUS = """\
Model-distributed inference splits a language model into blocks of layers, one block per machine.
Activations travel around a ring of machines, and while one sequence is on the second machine,
others are on the first and the third, so no machine sits idle. The quick brown fox jumps over the
lazy dog. A Raspberry Pi has little memory, but a handful of them together can hold a model that
none of them could hold alone. Once upon a time there was a cluster of small computers that
wanted to tell stories. Hello, world! What is the capital of France? Paris is the capital of France.
"""

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on a fixed paragraph, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", chat_template=CHAT_TEMPLATE
    )


def build_checkpoint(
    path: Path, config: dict, seed: int = 0, dtype: torch.dtype = torch.float32, tokenizer: bool = True,
    kind: str = "LlamaConfig",
) -> Path:
    """Write a random-init causal LM (transformers config class ``kind``) with ``config`` to ``path``,
    atomically: a finished directory is never half-written, and concurrent builders (ranks) agree."""
    import transformers

    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, kind)(**config), dtype=dtype)
        model.save_pretrained(tmp)
        del model
        if tokenizer:
            build_tokenizer(config["vocab_size"]).save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def demo_model() -> Path:
    """The shipped, trained demo checkpoint."""
    if not (DEMO_DIR / "model.safetensors").is_file():
        from mdi_mpi.errors import UserError

        raise UserError(f"the demo model is missing from {DEMO_DIR}: reinstall mdi-mpi, or run scripts/train_demo.py --out {DEMO_DIR}")
    return DEMO_DIR


def random_model() -> Path:
    """A 10-layer random-weight checkpoint with a tokenizer, built on first use (for tests)."""
    return build_checkpoint(cache_dir() / "random-llama-v1", RANDOM_CONFIG, seed=0)


def corpus_files() -> tuple[list[Path], list[Path]]:
    """The demo model's corpus: the standard library's ``.py`` files (top level, sorted), split
    into training files and the ``HELD_OUT`` last ones."""
    import sysconfig

    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size < 400_000)
    return files[:-HELD_OUT], files[-HELD_OUT:]


def held_out_text(max_chars: int = 200_000) -> str:
    """Standard-library source the demo model never saw in training, for perplexity."""
    return "".join(f.read_text(encoding="utf-8", errors="replace") for f in corpus_files()[1])[:max_chars]


# Benchmark shapes of the small models people run in 2026 (random weights: same speed and memory).
FAMILY_SHAPES = {
    "qwen3-0.6b": ("Qwen3Config", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=True)),
    "gemma3-1b": ("Gemma3TextConfig", dict(
        vocab_size=262144, hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=32768,
        tie_word_embeddings=True)),
    "phi4-mini": ("Phi3Config", dict(
        vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=24,
        num_key_value_heads=8, max_position_embeddings=131072, original_max_position_embeddings=4096,
        partial_rotary_factor=0.75, tie_word_embeddings=True, pad_token_id=199999, bos_token_id=199999, eos_token_id=199999,
        rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0 + i / 8 for i in range(48)]})),
    # Mixtures of experts: far too big for one machine whole, so built with ``layers`` of their layers.
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, max_position_embeddings=40960, rope_theta=1e6, tie_word_embeddings=False)),
    "gpt-oss-20b": ("GptOssConfig", dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
        num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * 12, max_position_embeddings=131072, rope_theta=150000.0,
        rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                      "original_max_position_embeddings": 4096}, swiglu_limit=7.0, tie_word_embeddings=False,
        pad_token_id=199999, eos_token_id=200002)),
}


def family_model(name: str, dtype: torch.dtype = torch.bfloat16, layers: int | None = None) -> Path:
    """The random checkpoint of benchmark shape ``name`` (``FAMILY_SHAPES``), built on first use; with
    ``layers``, only the first ``layers`` decoder layers of that shape."""
    kind, config = FAMILY_SHAPES[name]
    suffix = ""
    if layers is not None and layers < config["num_hidden_layers"]:
        config = {**config, "num_hidden_layers": layers}
        if "layer_types" in config:
            config["layer_types"] = config["layer_types"][:layers]
        suffix = f"-{layers}l"
    return build_checkpoint(cache_dir() / f"{name}{suffix}-shape-{str(dtype).removeprefix('torch.')}", config, seed=0,
                            dtype=dtype, tokenizer=False, kind=kind)


def tinyllama_model(dtype: torch.dtype = torch.bfloat16) -> Path:
    """The TinyLlama-1.1B-shaped random checkpoint of the benchmark, built on first use."""
    name = "tinyllama-shape-" + str(dtype).removeprefix("torch.")
    return build_checkpoint(cache_dir() / name, TINYLLAMA_CONFIG, seed=0, dtype=dtype, tokenizer=False)
