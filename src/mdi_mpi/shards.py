"""Per-rank shards on disk: ``SHARDS/rank-R/`` holds rank R's tensors (rank 0 also the embedding,
final norm, LM head and tokenizer; with ``--tp``, its slices of them) as an ordinary checkpoint
directory, and ``SHARDS/mdi_split.json`` the layers of every stage, the ranks per stage, the dtype
and the quantization. ``split`` writes them (``write_shards``);
the job set-up recognises them (``read_split``) and checks that the job matches.

Shards are safetensors, the format of the source checkpoints: a node reads its tensors lazily (by
byte range, one at a time), bf16 is stored natively, and the shard is an ordinary checkpoint
directory for the same loader, so there is one loading path. (HDF5 has no bf16 type and would need
a second loader.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from mdi_mpi.checkpoint import Checkpoint, hf_name, layer_quant, load_stage
from mdi_mpi.config import parse_dtype
from mdi_mpi.errors import UserError
from mdi_mpi.model import TensorSplit
from mdi_mpi.quant import Quant, quantize
from mdi_mpi.requests import TOKENIZER_FILES

SPLIT_FILE = "mdi_split.json"
EXTRA_FILES = ("generation_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenizer.model")


def read_split(path: str | Path) -> dict | None:
    """The split description of a shards directory, or None for an ordinary checkpoint."""
    file = Path(path) / SPLIT_FILE
    if not file.is_file():
        return None
    try:
        split = json.loads(file.read_text())
        split["layers"] = [range(a, b) for a, b in split["layers"]]
        return split
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{file} is broken: {e}") from None


def shard_dir(path: str | Path, rank: int) -> Path:
    return Path(path) / f"rank-{rank}"


def write_shards(model: str, out: str, layers: list[range], dtype_name: str, quant: Quant | None = None,
                 tp: int = 1, tp_parts: int | None = None) -> None:
    """Write one shard per rank into ``out`` (which must not exist yet); ``layers``: each stage's,
    held by ``tp`` ranks whose shards hold their slices of it (``TensorSplit``: blocks of
    ``tp_parts``, default ``tp``, under the names the split stage gives them). With ``quant``, the
    weights that ``generate --quant`` quantizes are stored quantized, as portable unpacked integers
    with their scales (and zeros) beside them: ``NAME.q``, ``NAME.scale``, ``NAME.zero``."""
    dtype = parse_dtype(dtype_name)
    dest = Path(out)
    if dest.exists():
        raise UserError(f"{out} already exists; choose a new --out directory")
    ckpt = Checkpoint(model)
    parts = tp_parts or tp
    TensorSplit(0, tp, parts).check(ckpt.config)
    if ckpt.config.gpt_oss:  # its experts are stored transposed and interleaved under the names of ours
        raise UserError("split does not write gpt_oss shards yet; run generate on the checkpoint itself")
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for rank in range(len(layers) * tp):
        stage = load_stage(ckpt, layers[rank // tp], rank < tp, dtype, split=TensorSplit(rank % tp, tp, parts))
        shard = shard_dir(tmp, rank)
        shard.mkdir(parents=True)
        quantized = stage.quantizable() if quant is not None else set()
        tensors = {}
        for n, p in stage.named_parameters():
            if n in quantized:
                stored = quantize(p, layer_quant(n, quant))
                scale_dtype = {"scale": dtype, "zero": dtype}
                tensors.update({f"{hf_name(n)}.{k}": t.to(scale_dtype.get(k, t.dtype)).contiguous() for k, t in stored.items()})
            else:
                tensors[hf_name(n)] = p.contiguous()
        save_file(tensors, shard / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(Path(model) / "config.json", shard / "config.json")
        if rank == 0:
            for name in TOKENIZER_FILES + EXTRA_FILES:
                if (Path(model) / name).is_file():
                    shutil.copy(Path(model) / name, shard / name)
        del stage, tensors
    (tmp / SPLIT_FILE).write_text(json.dumps({
        "format": 1,
        "ranks": len(layers) * tp,
        "tp": tp,
        "tp_parts": parts,
        "layers": [[r.start, r.stop] for r in layers],  # per stage
        "dtype": str(dtype).removeprefix("torch."),
        "quant": None if quant is None else {"kind": quant.kind, "group": quant.group},
        "source": str(Path(model).resolve()),
    }, indent=1))
    tmp.rename(dest)


def shards_quant(shards: dict, quant: Quant | None, group_given: int | None, model_dir: str) -> Quant | None:
    """The quantization ``split --quant`` stored in shards (None if none); a ``--quant`` that
    contradicts it is an error."""
    stored = shards.get("quant")
    if stored is None:
        return None
    q = Quant(stored["kind"], stored["group"])
    if quant and (quant.kind != q.kind or group_given not in (None, q.group)):
        held = f"{q.kind} weights" + (f" (group {q.group})" if q.kind == "int4" else "")
        asked = f"--quant {quant.kind}" + (f" --quant-group {group_given}" if group_given else "")
        raise UserError(f"{model_dir} holds {held}, which {asked} contradicts; leave --quant out to use them")
    return q
