"""Read a stage's tensors, and only those, from a Hugging Face safetensors checkpoint directory.

Supports ``model.safetensors`` and sharded ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``. Nothing is ever unpickled: a checkpoint with only
``pytorch_model.bin`` is refused with instructions to convert it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mdi_mpi.config import ModelConfig
from mdi_mpi.errors import UserError
from mdi_mpi.stage import Stage

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONVERT_HINT = (
    "convert it once on a trusted machine: "
    "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)"
)
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def hf_name(name: str) -> str:
    """Our parameter name -> the checkpoint's tensor name (HF nests all but the head under ``model.``)."""
    return name if name.startswith("lm_head.") else f"model.{name}"


class Checkpoint:
    """A checkpoint directory's tensor index; reads tensors one at a time and records which."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"checkpoint directory {self.path} does not exist")
        self.config = ModelConfig.from_dir(self.path)
        self.files = self._index()  # tensor name -> file
        self.names_read: list[str] = []
        self._check_layers()

    def _index(self) -> dict[str, Path]:
        index, single = self.path / INDEX, self.path / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{index} is not a valid safetensors index: {e}") from None
            files = {name: self.path / f for name, f in weight_map.items()}
            for f in set(files.values()):
                if not f.is_file():
                    raise UserError(f"{index} names the shard {f.name}, which is missing")
            return files
        if single.is_file():
            try:
                with safe_open(single, framework="pt") as f:
                    return {name: single for name in f.keys()}
            except (SafetensorError, OSError) as e:
                raise UserError(f"{single} is not a readable safetensors file: {e}") from None
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")) or any(self.path.glob("*.pth")):
            raise UserError(
                f"{self.path} holds only pickled weights (*.bin/*.pt); mdi-mpi loads safetensors only, "
                f"never unpickles: {CONVERT_HINT}"
            )
        raise UserError(f"no {SINGLE} or {INDEX} in {self.path}")

    def _check_layers(self) -> None:
        found = {int(m.group(1)) for name in self.files if (m := _LAYER.match(name))}
        extra = sorted(i for i in found if i >= self.config.n_layers)
        if extra:
            raise UserError(
                f"config/weights mismatch: config.json says {self.config.n_layers} layers "
                f"but the checkpoint has tensors for layer {extra[0]}"
            )

    def read(self, name: str, shape: torch.Size) -> torch.Tensor:
        """Read one tensor by checkpoint name, checking it exists and has ``shape``."""
        file = self.files.get(name)
        if file is None:
            raise UserError(f"tensor {name} is missing from the checkpoint {self.path}")
        try:
            with safe_open(file, framework="pt") as f:
                if name not in f.keys():
                    raise UserError(f"tensor {name} is missing from {file.name} (the index says it is there)")
                found = tuple(f.get_slice(name).get_shape())
                if found != tuple(shape):
                    raise UserError(f"tensor {name} has shape {list(found)}, the config implies {list(shape)}")
                tensor = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise UserError(f"cannot read tensor {name} from {file}: {e}") from None
        self.names_read.append(name)
        return tensor


def load_stage(ckpt: Checkpoint, layers: range, edges: bool, dtype: torch.dtype) -> Stage:
    """Build the stage for ``layers`` (plus the edges if ``edges``) and fill it from ``ckpt``,
    reading only its own tensors and casting them to ``dtype``."""
    with torch.device("meta"):
        stage = Stage(ckpt.config, layers, edges)
    # Each tensor is copied out of the file's memory map into private memory (streaming weights from
    # there is ~10% faster than from file pages), one at a time, so the peak stays near the share.
    tensors = {}
    for name, p in stage.named_parameters():
        t = ckpt.read(hf_name(name), p.shape)
        tensors[name] = t.clone() if t.dtype == dtype else t.to(dtype)
        del t
    stage.load_state_dict(tensors, assign=True, strict=True)
    return stage.requires_grad_(False)
