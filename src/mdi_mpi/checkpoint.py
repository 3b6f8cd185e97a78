"""Read a stage's tensors, and only those, from a Hugging Face safetensors checkpoint directory.

Supports ``model.safetensors`` and sharded ``model-0000i-of-0000n.safetensors`` with
``model.safetensors.index.json``. Nothing is ever unpickled: a checkpoint with only
``pytorch_model.bin`` is refused with instructions to convert it.

A safetensors file is an 8-byte header length, a JSON header (dtype, shape and byte range of every
tensor) and the raw tensor bytes. We parse the header and read each tensor's bytes straight into the
parameter that will hold it, so a stage's peak memory is its own weights (plus one tensor in the
file's dtype when casting): no memory map of the whole file, no second copy.
"""

from __future__ import annotations

import functools
import json
import re
import struct
from pathlib import Path

import torch
from torch import nn

from mdi_mpi.config import ModelConfig
from mdi_mpi.errors import UserError
from mdi_mpi.model import WHOLE, RowParallel, TensorSplit
from mdi_mpi.quant import Quant, QuantWeight, quantize_int8
from mdi_mpi.stage import Stage

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONVERT_HINT = (
    "convert it once on a trusted machine: "
    "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)"
)
_LAYER = re.compile(r"layers\.(\d+)\.")  # after the checkpoint's prefix
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I8": torch.int8, "U8": torch.uint8}  # integers: split --quant shards
_MAX_HEADER = 100 * 2**20


def hf_name(name: str, prefix: str = "model.") -> str:
    """Our parameter name -> the checkpoint's tensor name (HF nests all but the head under
    ``prefix``: ``model.``, or the text tower's of a multimodal checkpoint)."""
    if name.startswith("lm_head."):
        return "language_model." + name if prefix == "language_model.model." else name
    return prefix + name


# Where a checkpoint keeps the decoder: plain causal LMs, then multimodal ones' text towers
# (transformers 5 and 4 layouts of Gemma 3's Gemma3ForConditionalGeneration). Nothing else is read.
_PREFIXES = ("model.", "model.language_model.", "language_model.model.")


class SafetensorsFile:
    """The header of one safetensors file; reads single tensors into caller-owned memory."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                raw = f.read(8)
                n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
                if not 0 < n <= _MAX_HEADER:
                    raise ValueError("bad header length")
                header = json.loads(f.read(n))
            size = path.stat().st_size
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not a readable safetensors file: {e}") from None
        self.data_start = 8 + n
        self.tensors: dict[str, dict] = {k: v for k, v in header.items() if k != "__metadata__"}
        for name, info in self.tensors.items():
            begin, end = info.get("data_offsets", (0, -1))
            if not 0 <= begin <= end <= size - self.data_start:
                raise UserError(f"{path} is truncated or corrupt: tensor {name} lies outside the file")

    def read_into(self, name: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Read tensor ``name`` into ``out`` (same shape), casting if the file's dtype differs; with
        ``rows=(a, b)``, only its rows a..b-1 (``out`` is then [b - a, ...])."""
        info = self.tensors[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise UserError(f"tensor {name} has dtype {info['dtype']}; supported: {', '.join(_DTYPES)}")
        shape = tuple(info["shape"])
        want = tuple(out.shape) if rows is None else (shape[0], *out.shape[1:])
        if shape != want:
            raise UserError(f"tensor {name} has shape {list(shape)}, the config implies {list(want)}")
        begin, end = info["data_offsets"]
        buf = out if out.dtype == dtype else torch.empty(out.shape, dtype=dtype)
        if rows is None and end - begin != buf.nbytes:
            raise UserError(f"tensor {name} in {self.path.name} has {end - begin} bytes, its shape needs {buf.nbytes}")
        if rows is not None and not 0 <= rows[0] <= rows[1] <= shape[0]:
            raise UserError(f"tensor {name} has {shape[0]} rows, rows {rows[0]}..{rows[1] - 1} were asked for")
        if rows is not None:  # rows are contiguous in the file
            row_bytes = buf[0].nbytes if buf.shape[0] else 0
            begin += rows[0] * row_bytes
        view = memoryview(buf.view(-1).view(torch.uint8).numpy())
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.data_start + begin)
            done = 0
            while done < len(view):
                n = f.readinto(view[done:])
                if not n:
                    raise UserError(f"{self.path} ended while reading tensor {name}")
                done += n
        if buf is not out:
            out.copy_(buf)


class Checkpoint:
    """A checkpoint directory's tensor index; reads tensors one at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"checkpoint directory {self.path} does not exist")
        self.config = ModelConfig.from_dir(self.path)
        self.files = self._index()  # tensor name -> file
        self.prefix = next((p for p in _PREFIXES if f"{p}embed_tokens.weight" in self.files or f"{p}layers.0.input_layernorm.weight" in self.files), "model.")
        self._check_layers()

    def _index(self) -> dict[str, SafetensorsFile]:
        index, single = self.path / INDEX, self.path / SINGLE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{index} is not a valid safetensors index: {e}") from None
            shards = {}
            for f in sorted(set(weight_map.values())):
                if not (self.path / f).is_file():
                    raise UserError(f"{index} names the shard {f}, which is missing")
                shards[f] = SafetensorsFile(self.path / f)
            files = {}
            for name, f in weight_map.items():
                if name not in shards[f].tensors:
                    raise UserError(f"tensor {name} is missing from {f} (the index says it is there)")
                files[name] = shards[f]
            return files
        if single.is_file():
            st = SafetensorsFile(single)
            return {name: st for name in st.tensors}
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")) or any(self.path.glob("*.pth")):
            raise UserError(
                f"{self.path} holds only pickled weights (*.bin/*.pt); mdi-mpi loads safetensors only, "
                f"never unpickles: {CONVERT_HINT}"
            )
        raise UserError(f"no {SINGLE} or {INDEX} in {self.path}")

    def _check_layers(self) -> None:
        found = {int(m.group(1)) for name in self.files if name.startswith(self.prefix) and (m := _LAYER.match(name[len(self.prefix):]))}
        extra = sorted(i for i in found if i >= self.config.n_layers)
        if extra:
            raise UserError(
                f"config/weights mismatch: config.json says {self.config.n_layers} layers "
                f"but the checkpoint has tensors for layer {extra[0]}"
            )

    def key(self, name: str) -> str:
        """The tensor name of our parameter ``name`` in this checkpoint."""
        return hf_name(name, self.prefix)

    def has(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor by checkpoint name, in the file's own dtype and shape."""
        file = self.files.get(name)
        if file is None:
            raise UserError(f"tensor {name} is missing from the checkpoint {self.path}")
        info = file.tensors[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise UserError(f"tensor {name} has dtype {info['dtype']}; supported: {', '.join(_DTYPES)}")
        out = torch.empty(tuple(info["shape"]), dtype=dtype)
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Read one tensor by checkpoint name into ``out`` (or only its ``rows``), checking that it
        exists and fits."""
        file = self.files.get(name)
        if file is None:
            raise UserError(f"tensor {name} is missing from the checkpoint {self.path}")
        file.read_into(name, out, rows)


def load_stage(ckpt: Checkpoint, layers: range, edges: bool, dtype: torch.dtype, quant: Quant | None = None,
               split: TensorSplit = WHOLE, sliced: bool = False) -> Stage:
    """Build the stage for ``layers`` (plus the edges if ``edges``) and fill it from ``ckpt``,
    reading only its own tensors, one at a time, casting them to ``dtype``. With ``quant``, each
    linear weight (and the embedding and LM head, as int8) is quantized as soon as it is read, so that
    at most one full-precision tensor exists at a time; weights that ``ckpt`` stores quantized
    (``split --quant`` shards: ``NAME.q``, ``NAME.scale``, ``NAME.zero``) are read as they are. With
    ``split`` (``--tp``), only this rank's blocks of each split weight are read; ``sliced``: ``ckpt``
    holds them already, under the split stage's names (``split --tp`` shards)."""
    with torch.device("meta"):
        stage = Stage(ckpt.config, layers, edges, split).to(dtype)
    quantized = stage.quantizable() if quant is not None else set()
    with torch.no_grad():
        for name, param in list(stage.named_parameters()):
            owner, _, attr = name.rpartition(".")
            name_in_ckpt, rows, cols = (name, None, None) if sliced else block_of(stage, name, param.shape)
            key = ckpt.key(name_in_ckpt)
            if _EXPERTS.match(name):
                _load_experts(ckpt, stage, name, param.shape, dtype, quant if name in quantized else None)
                continue
            if name in quantized and ckpt.has(f"{key}.q"):
                zero = ckpt.read(f"{key}.zero") if ckpt.has(f"{key}.zero") else None
                stage.set_quantized(owner, QuantWeight(ckpt.read(f"{key}.q"), ckpt.read(f"{key}.scale"), zero, dtype))
                continue
            src, row0 = source(ckpt, name_in_ckpt)
            if rows is not None:
                row0 = (row0 or 0) + rows.start
            if name in quantized and layer_quant(name, quant).kind == "int8":  # read and quantized in row blocks
                read = functools.partial(_read_rows, ckpt, src, row0, shape=param.shape, dtype=dtype, cols=cols)
                q, scale = quantize_int8(param.shape, read)
                stage.set_quantized(owner, QuantWeight(q, scale, None, dtype))
                continue
            tensor = _read_rows(ckpt, src, row0, 0, param.shape[0], param.shape, dtype, cols)
            if ckpt.config.gpt_oss and name.endswith(".mlp.experts.gate_up_proj_bias"):
                tensor = _deinterleave(tensor.t()).t().contiguous()  # [E, 2I]: gate, then up
            if name in quantized:
                stage.set_quantized(owner, QuantWeight.of(tensor, layer_quant(name, quant), dtype))
            else:
                stage.get_submodule(owner)._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    return stage


def _load_experts(ckpt: Checkpoint, stage: Stage, name: str, shape: torch.Size, dtype: torch.dtype,
                  quant: Quant | None) -> None:
    """Fill the 3-D expert parameter ``name`` [E, out, in] one expert at a time (so that casting or
    quantizing holds at most one expert in full precision), or, with ``quant``, store one
    ``QuantWeight`` per expert; ``split --quant`` shards hold them quantized already."""
    owner, _, attr = name.rpartition(".")
    key = ckpt.key(name)
    if quant is not None and ckpt.has(f"{key}.q"):
        q, scale = ckpt.read(f"{key}.q"), ckpt.read(f"{key}.scale")
        zero = ckpt.read(f"{key}.zero") if ckpt.has(f"{key}.zero") else None
        qws = [QuantWeight(q[e], scale[e], None if zero is None else zero[e], dtype) for e in range(shape[0])]
        stage.set_quantized_experts(owner, attr, qws)
        return
    if quant is not None:
        qws = []
        for e in range(shape[0]):
            w = torch.empty(shape[1:], dtype=dtype)
            read_expert(ckpt, name, e, w)
            qws.append(QuantWeight.of(w, quant, dtype))
        stage.set_quantized_experts(owner, attr, qws)
        return
    tensor = torch.empty(shape, dtype=dtype)
    for e in range(shape[0]):
        read_expert(ckpt, name, e, tensor[e])
    stage.get_submodule(owner)._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


_EXPERTS = re.compile(r"layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
# Per-expert tensors of the hub checkpoints, in the rows of our fused gate_up_proj (gate, then up)
_PER_EXPERT = {"mlp.experts": {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)},
               "block_sparse_moe.experts": {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}}  # mixtral


def read_expert(ckpt: Checkpoint, name: str, e: int, out: torch.Tensor) -> None:
    """Read expert ``e`` of our 3-D parameter ``name`` (``layers.L.mlp.experts.gate_up_proj`` or
    ``down_proj``) into ``out`` [out, in], from whichever layout ``ckpt`` has: fused 3-D tensors
    (transformers' own, ``[E, 2I, D]`` and ``[E, D, I]``, or our shards), one tensor per expert and
    projection (the hub's ``mlp.experts.E.gate_proj.weight``, mixtral's
    ``block_sparse_moe.experts.E.w1.weight``), or gpt_oss's (``[E, D, 2I]`` with gate and up
    interleaved, and ``[E, I, D]``; or MXFP4 ``*_blocks`` and ``*_scales``, decoded here)."""
    key = ckpt.key(name)
    layer, kind = _EXPERTS.match(name).groups()
    if ckpt.has(f"{key}_blocks"):  # gpt_oss's MXFP4 experts, [E, out, in] with gate and up rows interleaved
        blocks = torch.empty((1, *ckpt.files[f"{key}_blocks"].tensors[f"{key}_blocks"]["shape"][1:]), dtype=torch.uint8)
        scales = torch.empty(blocks.shape[:-1], dtype=torch.uint8)
        ckpt.read_into(f"{key}_blocks", blocks, (e, e + 1))
        ckpt.read_into(f"{key}_scales", scales, (e, e + 1))
        blocks, scales = blocks[0], scales[0]
        if (blocks.shape[0], blocks.shape[1] * 32) != tuple(out.shape):
            raise UserError(f"tensor {key}_blocks decodes to {[blocks.shape[0], blocks.shape[1] * 32]} per expert, "
                            f"the config implies {list(out.shape)}")
        if kind == "gate_up_proj":  # rows in our order before decoding: a quarter of the bytes to move
            blocks, scales = _deinterleave(blocks), _deinterleave(scales)
        decode_mxfp4(blocks, scales, out.dtype, out=out)
        return
    if ckpt.config.gpt_oss:  # [E, D, 2I] with gate and up interleaved, and [E, I, D]: transposed here
        stored = torch.empty(out.shape[::-1], dtype=out.dtype)
        ckpt.read_into(key, stored[None], (e, e + 1))
        out.copy_(_deinterleave(stored.t()) if kind == "gate_up_proj" else stored.t())
        return
    if ckpt.has(key):
        ckpt.read_into(key, out[None], (e, e + 1))
        return
    for base, parts in _PER_EXPERT.items():
        names = [ckpt.key(f"layers.{layer}.{base}.{e}.{part}.weight") for part in parts[kind]]
        if ckpt.has(names[0]):
            step = out.shape[0] // len(names)
            for j, n in enumerate(names):
                ckpt.read_into(n, out[j * step : (j + 1) * step])
            return
    per_expert = ckpt.key(f"layers.{layer}.mlp.experts.{e}.{_PER_EXPERT['mlp.experts'][kind][0]}.weight")
    raise UserError(f"the experts of layer {layer} are missing from the checkpoint {ckpt.path}: "
                    f"neither {key} nor {per_expert} is there")


FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # e2m1


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """MXFP4 (OCP microscaling) -> [out, in] in ``dtype``: ``blocks`` [out, in/32, 16] uint8 hold two
    e2m1 values per byte (the low nibble first), ``scales`` [out, in/32] uint8 one power of two per
    block of 32, biased by 127. Every value (at most 3 significant bits times a power of two) is
    exact in bfloat16 and float32. Each (scale, byte) pair is looked up, as one machine word holding
    its two scaled values, in a table of 256 x 256 words (``_mxfp4_table``: 256 KB in bf16, within the
    L2 cache), so that decoding is one gather with no arithmetic on the values (docs/internals.md).
    With ``out`` (contiguous, [out, in], ``dtype``), the values are written there."""
    index = blocks.to(torch.int32)  # [out, in/32, 16]: (scale << 8) | byte
    index.view(-1, 16).add_((scales.to(torch.int32) << 8).view(-1, 1))
    table = _mxfp4_table(dtype)
    if out is None:
        out = torch.empty((blocks.shape[0], blocks.shape[1] * 32), dtype=dtype)
    torch.index_select(table, 0, index.view(-1), out=out.view(table.dtype).view(-1))  # two values per word
    return out


@functools.cache
def _mxfp4_table(dtype: torch.dtype) -> torch.Tensor:
    """[256 * 256] words (int32 for 2-byte dtypes, int64 for float32): entry (scale << 8) | byte holds
    the byte's low and high e2m1 values times 2^(scale - 127), in ``dtype``."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float64)
    byte = torch.arange(256)
    pairs = torch.stack([lut[byte & 15], lut[byte >> 4]], dim=-1)  # [256 bytes, 2]
    scaled = pairs[None] * torch.exp2(torch.arange(256, dtype=torch.float64) - 127)[:, None, None]  # [scale, byte, 2]
    table = scaled.to(dtype).contiguous()
    return table.view({2: torch.int32, 4: torch.int64}[table.element_size()]).view(-1)


def _deinterleave(w: torch.Tensor) -> torch.Tensor:
    """gpt_oss's gate and up rows, interleaved (gate, up, gate, ...), as our gate rows then up rows."""
    return torch.cat([w[0::2], w[1::2]])


def _read_rows(ckpt: Checkpoint, name: str, row0: int | None, a: int, b: int, shape: tuple[int, ...],
               dtype: torch.dtype, cols: range | None = None) -> torch.Tensor:
    """Rows a..b-1 of our tensor, which starts at row ``row0`` of tensor ``name`` (and is its
    columns ``cols``, when given), cast to ``dtype``."""
    if cols is None and row0 is None and (a, b) == (0, shape[0]):
        out = torch.empty(shape, dtype=dtype)
        ckpt.read_into(name, out)
        return out
    if cols is None:
        out = torch.empty((b - a, *shape[1:]), dtype=dtype)
        ckpt.read_into(name, out, ((row0 or 0) + a, (row0 or 0) + b))
        return out
    if name not in ckpt.files:
        raise UserError(f"tensor {name} is missing from the checkpoint {ckpt.path}")
    whole = torch.empty((b - a, ckpt.files[name].tensors[name]["shape"][-1]), dtype=dtype)
    ckpt.read_into(name, whole, ((row0 or 0) + a, (row0 or 0) + b))
    return whole[:, cols.start : cols.stop].contiguous()


_BLOCK = re.compile(r"(.*)\.parts\.(\d+)\.(weight|bias)$")


def block_of(stage: Stage, name: str, shape: torch.Size) -> tuple[str, range | None, range | None]:
    """Where parameter ``name`` of a split stage (``--tp``) lies in the whole model's tensor: that
    tensor's name, and the rows (a column-parallel block, or a share of the vocabulary) or columns
    (a row-parallel block) it holds; (``name``, None, None) for a parameter held whole."""
    if name in ("embed_tokens.weight", "lm_head.weight"):  # split by vocabulary, or whole
        whole = len(stage.vocab) == stage.config.vocab_size
        return name, None if whole else stage.vocab, None
    m = _BLOCK.match(name)
    if m is None:
        return name, None, None
    owner, i, attr = m.group(1), int(m.group(2)), m.group(3)
    block = stage.split.blocks[i]
    if isinstance(stage.get_submodule(owner), RowParallel):
        return f"{owner}.{attr}", None, range(block * shape[1], (block + 1) * shape[1])
    return f"{owner}.{attr}", range(block * shape[0], (block + 1) * shape[0]), None


_FUSED = re.compile(r"layers\.(\d+)\.(self_attn\.[qkv]_proj|mlp\.gate_proj|mlp\.up_proj)\.weight$")


def source(ckpt: Checkpoint, name: str) -> tuple[str, int | None]:
    """Where our parameter ``name`` lies in ``ckpt``: its tensor name, and the first row when it is
    part of a fused tensor (phi3's ``qkv_proj`` = q, k, v and ``gate_up_proj`` = gate, up, split
    at load), else None."""
    key = ckpt.key(name)
    if ".mlp.gate." in name and not ckpt.has(key):  # the router: mixtral's hub name, gpt_oss's name
        router = {"mixtral": ".block_sparse_moe.gate.", "gpt_oss": ".mlp.router."}.get(ckpt.config.model_type)
        if router is not None:
            return key.replace(".mlp.gate.", router), None
    m = _FUSED.match(name)
    if not ckpt.config.fused_projections or m is None or ckpt.has(key):
        return key, None
    c = ckpt.config
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    fused, row0 = {
        "self_attn.q_proj": ("self_attn.qkv_proj", 0),
        "self_attn.k_proj": ("self_attn.qkv_proj", q),
        "self_attn.v_proj": ("self_attn.qkv_proj", q + kv),
        "mlp.gate_proj": ("mlp.gate_up_proj", 0),
        "mlp.up_proj": ("mlp.gate_up_proj", c.intermediate_size),
    }[m.group(2)]
    fused_key = ckpt.key(f"layers.{m.group(1)}.{fused}.weight")
    rows = {"self_attn.qkv_proj": q + 2 * kv, "mlp.gate_up_proj": 2 * c.intermediate_size}[fused]
    file = ckpt.files.get(fused_key)
    if file is None:
        raise UserError(f"tensor {key} (or the fused {fused_key}) is missing from the checkpoint {ckpt.path}")
    if file.tensors[fused_key]["shape"][0] != rows:
        raise UserError(f"tensor {fused_key} has {file.tensors[fused_key]['shape'][0]} rows, the config implies {rows}")
    return fused_key, row0


def layer_quant(name: str, quant: Quant) -> Quant:
    """The scheme for parameter ``name``: ``quant`` in the decoder layers, int8 for the embedding and
    LM head (their error lands straight in the logits)."""
    return quant if name.startswith("layers.") else Quant("int8")
