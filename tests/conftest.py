"""Shared fixtures: small random-init checkpoints written with transformers ``save_pretrained``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# One cache (demo model, kernel choices) for the whole session and every rank of tests/mpi, never the
# user's: kernel choices must not change mid-session, or bf16 runs compared with each other would differ.
os.environ.setdefault("MDI_MPI_CACHE", str(Path(tempfile.gettempdir()) / f"mdi-mpi-tests-{os.getuid()}"))
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
}


def build_hf_model(path: Path, kind: str, overrides: dict, seed: int = 0, **save_kwargs) -> Path:
    """Random-init a transformers causal LM and save it as a normal HF checkpoint directory."""
    import transformers

    torch.manual_seed(seed)
    config = getattr(transformers, kind)(**{**TINY, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(path, **save_kwargs)
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: build_hf_model(root / name, kind, ov) for name, (kind, ov) in VARIANTS.items()}


@pytest.fixture(scope="session")
def twelve_layers(tmp_path_factory) -> dict[str, Path]:
    """A 12-layer llama saved as one file and as shards."""
    root = tmp_path_factory.mktemp("twelve")
    single = build_hf_model(root / "single", "LlamaConfig", dict(num_hidden_layers=12), seed=1)
    sharded = root / "sharded"
    shutil.copytree(single, sharded)
    (sharded / "model.safetensors").unlink()
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="200KB")
    return {"single": single, "sharded": sharded}


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The shipped, trained demo model (the default ``--model``)."""
    from mdi_mpi.demo import demo_model

    return demo_model()


@pytest.fixture(scope="session")
def random_dir() -> Path:
    """A 10-layer random-weight llama with a tokenizer, built in the tests' own cache."""
    from mdi_mpi.demo import random_model

    return random_model()


def mpiexec() -> str:
    """The launcher of the MPI that mpi4py uses (the venv's MPICH first)."""
    return shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")


def run_cli(args: list[str], ranks: int = 1, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m mdi_mpi.generate`` (under mpiexec when ``ranks`` > 1) and capture its output."""
    cmd = [sys.executable, "-m", "mdi_mpi.generate", *args]
    if ranks > 1:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)


def ranks_of(tag: str) -> dict[int, int]:
    """PID of each rank whose environment holds ``MDI_TEST_TAG=tag`` (Hydra sets ``PMI_RANK``): the
    process running the ``mdi_mpi`` module, not its watcher (``watch.py``, which ends with it)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            env = dict(v.split("=", 1) for v in (proc / "environ").read_text().split("\0") if "=" in v)
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if env.get("MDI_TEST_TAG") == tag and "PMI_RANK" in env and b"-m" in argv:
            found[int(env["PMI_RANK"])] = int(proc.name)
    return found


def pytest_ignore_collect(collection_path, config):
    """tests/mpi needs several ranks: it runs under ``mpirun -np 2`` and is skipped otherwise."""
    if collection_path.name == "mpi" and collection_path.parent == Path(__file__).parent:
        from mpi4py import MPI

        return MPI.COMM_WORLD.Get_size() < 2
    return None
