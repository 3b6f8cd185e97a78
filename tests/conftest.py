"""Fixtures (tiny checkpoints, the demo and random models) and hooks: the tests' own cache, the
``system`` marker, tests/mpi only under mpirun. Shared helpers live in ``support``."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from support.models import VARIANTS, build_hf_model

# What launches real processes or services; each of these marks a test ``system`` too.
SYSTEM = ("subprocess", "mpi", "server", "browser", "slurm", "netns")


def pytest_configure() -> None:
    """One cache (demo model, kernel choices) for the whole session and every rank of tests/mpi, never
    the user's: kernel choices must not change mid-session, or bf16 runs compared with each other would differ."""
    os.environ.setdefault("MDI_MPI_CACHE", str(Path(tempfile.gettempdir()) / f"mdi-mpi-tests-{os.getuid()}"))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``system`` every test marked with one of ``SYSTEM`` (before ``-m`` selects)."""
    for item in items:
        if any(item.get_closest_marker(name) for name in SYSTEM):
            item.add_marker("system")


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/mpi needs several ranks: it runs under ``mpirun -np 2`` and is skipped otherwise."""
    if collection_path.name == "mpi" and collection_path.parent == Path(__file__).parent:
        try:
            from mpi4py import MPI
        except ImportError:  # no MPI here (the arm64 lane): nothing runs them
            return True
        return MPI.COMM_WORLD.Get_size() < 2
    return None


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Each of ``VARIANTS``, saved once per session."""
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
