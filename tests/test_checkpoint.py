"""Partial loading reads only a stage's tensors; broken checkpoints give errors naming the problem."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.models import TINY, build_hf_model

from mdi_mpi.checkpoint import Checkpoint, load_stage
from mdi_mpi.errors import UserError


@pytest.fixture
def names_read(monkeypatch) -> list[str]:
    """Every tensor name a Checkpoint reads, observed by wrapping its reader."""
    seen: list[str] = []
    real = Checkpoint.read_into

    def read_into(self, name, out, rows=None):
        seen.append(name)
        return real(self, name, out, rows)

    monkeypatch.setattr(Checkpoint, "read_into", read_into)
    return seen


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_stage_reads_only_its_tensors(twelve_layers, layout, names_read):
    path = twelve_layers[layout]
    if layout == "sharded":
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("model-*.safetensors"))) > 3
    ckpt = Checkpoint(path)
    stage = load_stage(ckpt, range(5, 10), edges=False, dtype=torch.float32)
    layers_read = {int(n.split(".")[2]) for n in names_read}
    assert layers_read == {5, 6, 7, 8, 9}
    assert not any("embed" in n or "lm_head" in n or n == "model.norm.weight" for n in names_read)
    assert len(names_read) == 5 * 9  # 9 tensors per llama layer
    assert set(stage.layers) == {"5", "6", "7", "8", "9"}
    # The stage holds exactly the bytes of the tensors it read, far less than the checkpoint.
    full = {}
    for f in path.glob("*.safetensors"):
        full.update(load_file(f))
    read_bytes = sum(full[n].nbytes for n in names_read)
    assert stage.weight_bytes() == read_bytes
    assert read_bytes < 0.4 * sum(t.nbytes for t in full.values())
    ref = full["model.layers.7.mlp.down_proj.weight"]
    assert torch.equal(stage.layers["7"].mlp.down_proj.weight, ref)


def test_edge_stage_has_embedding_and_head(twelve_layers, names_read):
    ckpt = Checkpoint(twelve_layers["sharded"])
    stage = load_stage(ckpt, range(0, 2), edges=True, dtype=torch.bfloat16)
    assert stage.embed_tokens.weight.dtype == torch.bfloat16
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(names_read)
    assert not any(n.startswith("model.layers.2.") for n in names_read)


RSS_SCRIPT = """
import sys, torch
from mdi_mpi.checkpoint import Checkpoint, load_stage
from mdi_mpi.probes import peak_rss
from mdi_mpi.quant import Quant
quant = Quant(sys.argv[2]) if sys.argv[2] != "none" else None
load_stage(Checkpoint(sys.argv[1]), range(0, 1), False, torch.float32, quant)  # pay torch's one-time set-up (~35 MB)
ckpt = Checkpoint(sys.argv[1])
before = peak_rss()
stage = load_stage(ckpt, range(5, 10), False, torch.float32, quant)
total = sum(float(t.float().sum()) for t in (*stage.parameters(), *stage.buffers()))  # touch every weight
print(peak_rss() - before, stage.weight_bytes())
"""


@pytest.mark.parametrize("quant", ["none", "int4"])
@pytest.mark.subprocess
def test_partial_load_memory_is_its_share(tmp_path, quant):
    """12 layers of ~13 MB each in float32: a 5-layer stage must not pay for the other 7, and a
    quantized one peaks at its quantized share plus one full-precision tensor."""
    path = build_hf_model(tmp_path / "m", "LlamaConfig", dict(num_hidden_layers=12, hidden_size=512,
                          intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4))
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), quant], capture_output=True, text=True, check=True)
    grown, weights = map(int, out.stdout.split())
    file_bytes = (path / "model.safetensors").stat().st_size
    one_tensor = 512 * 1536 * 4 if quant != "none" else 0
    assert weights < (0.45 if quant == "none" else 0.45 / 6) * file_bytes
    assert grown < weights + one_tensor + 16 * 2**20, f"peak RSS grew {grown} for {weights} bytes of weights"


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        Checkpoint(tmp_path / "empty")


def test_pickle_only_checkpoint_is_refused(models, tmp_path):
    d = _copy(models["mistral"], tmp_path / "bin")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(UserError, match="never unpickles.*save_pretrained"):
        Checkpoint(d)


def test_missing_tensor_is_named(models, tmp_path):
    d = _copy(models["mistral"], tmp_path / "missing")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    ckpt = Checkpoint(d)
    with pytest.raises(UserError, match="model.layers.1.mlp.up_proj.weight is missing"):
        load_stage(ckpt, range(0, 4), True, torch.float32)
    load_stage(Checkpoint(d), range(2, 4), False, torch.float32)  # a stage without layer 1 does not care


def test_shape_mismatch_is_named(models, tmp_path):
    d = _copy(models["mistral"], tmp_path / "shape")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"model.layers.0.mlp.gate_proj.weight has shape \[160, 64\]"):
        load_stage(Checkpoint(d), range(0, 1), False, torch.float32)


def test_config_with_fewer_layers_than_weights(models, tmp_path):
    d = _copy(models["mistral"], tmp_path / "layers")
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="says 3 layers but the checkpoint has tensors for layer 3"):
        Checkpoint(d)


def test_corrupt_safetensors(models, tmp_path):
    d = _copy(models["mistral"], tmp_path / "corrupt")
    (d / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        Checkpoint(d)


def test_missing_shard(twelve_layers, tmp_path):
    d = _copy(twelve_layers["sharded"], tmp_path / "shards")
    next(d.glob("model-*.safetensors")).unlink()
    with pytest.raises(UserError, match="names the shard .* which is missing"):
        Checkpoint(d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("sharded", [False, True])
def test_reader_equals_safetensors_for_each_dtype_on_disk(tmp_path, dtype, sharded):
    """Real checkpoints are bf16 on disk: every tensor we read equals safetensors' own reading."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).to(dtype)
    model.save_pretrained(tmp_path, **({"max_shard_size": "100KB"} if sharded else {}))
    files = sorted(tmp_path.glob("*.safetensors"))
    assert (len(files) > 1) == sharded
    want = {}
    for f in files:
        want.update(load_file(f))
    ckpt = Checkpoint(tmp_path)
    assert set(ckpt.files) == set(want)
    for name, ref in want.items():
        got = ckpt.read(name)
        assert got.dtype == ref.dtype == dtype and torch.equal(got, ref), name
    # and a stage loaded in another dtype holds the same values, cast once
    stage = load_stage(ckpt, range(0, 4), True, torch.float32)
    assert torch.equal(stage.layers["2"].mlp.up_proj.weight, want["model.layers.2.mlp.up_proj.weight"].float())


@pytest.mark.parametrize("prefix", ["model.language_model.", "language_model.model."])  # transformers 5 and 4
def test_a_multimodal_gemma3_loads_only_its_text_tower(models, tmp_path, names_read, prefix):
    from mdi_mpi.kv_cache import Batch

    text = models["gemma3"]
    tensors = {prefix + n.removeprefix("model."): t for n, t in load_file(text / "model.safetensors").items()}
    vision = {"model.vision_tower.vision_model.embeddings.patch_embedding.weight": torch.randn(32, 3, 4, 4),
              "model.multi_modal_projector.mm_input_projection_weight": torch.randn(32, 64)}
    mm = tmp_path / "gemma3-mm"
    mm.mkdir()
    save_file({**tensors, **vision}, mm / "model.safetensors")
    text_cfg = json.loads((text / "config.json").read_text())
    (mm / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text_cfg,
                                                "vision_config": {"model_type": "siglip_vision_model"},
                                                "tie_word_embeddings": True}))
    ckpt = Checkpoint(mm)
    assert ckpt.prefix == prefix and ckpt.config.model_type == "gemma3_text"
    stage = load_stage(ckpt, range(ckpt.config.n_layers), True, torch.float32)
    assert names_read and all(n.startswith(prefix) for n in names_read)  # the vision tower is never read
    assert len(names_read) == len(tensors)
    ref = load_stage(Checkpoint(text), range(ckpt.config.n_layers), True, torch.float32)
    for s in (stage, ref):
        s.setup_cache(1, 32)
        s.choose_kernels("row")  # one kernel for both: each stage measuring its own could pick another family
    ids = torch.arange(3, 23)
    assert torch.equal(stage(ids, Batch.make([0], [0], [20])), ref(ids, Batch.make([0], [0], [20])))


@pytest.mark.parametrize("name", ["qwen3-moe", "mixtral-window"])
def test_per_expert_and_fused_expert_layouts_load_the_same_stage(models, tmp_path, names_read, name):
    """The hub's one tensor per expert (mixtral: block_sparse_moe.experts.E.w1) and transformers'
    fused 3-D experts give the same weights; a stage reads only its own layers' experts."""
    from transformers import AutoModelForCausalLM

    hub = models[name]
    fused = tmp_path / "fused"
    AutoModelForCausalLM.from_pretrained(hub, dtype=torch.float32).save_pretrained(fused, save_original_format=False)
    assert "model.layers.2.mlp.experts.gate_up_proj" in Checkpoint(fused).files
    assert "model.layers.2.mlp.experts.gate_up_proj" not in Checkpoint(hub).files
    stages = []
    for path in (hub, fused):
        names_read.clear()
        stages.append(load_stage(Checkpoint(path), range(2, 4), edges=False, dtype=torch.bfloat16))
        assert {int(n.split(".")[2]) for n in names_read} == {2, 3}
    a, b = (dict(s.named_parameters()) for s in stages)
    assert a.keys() == b.keys() and "layers.3.mlp.experts.down_proj" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    expert = load_file(hub / "model.safetensors")
    up = "block_sparse_moe.experts.1.w3" if name == "mixtral-window" else "mlp.experts.1.up_proj"
    inner = a["layers.2.mlp.experts.down_proj"].shape[2]
    assert torch.equal(a["layers.2.mlp.experts.gate_up_proj"][1, inner:], expert[f"model.layers.2.{up}.weight"].bfloat16())


def test_mxfp4_experts_decode_exactly_and_load_as_the_decoded_model(models, tmp_path):
    """gpt-oss's MXFP4 experts (``*_blocks`` + ``*_scales``) decode to transformers' values bit for
    bit, and a checkpoint storing them loads as the same model stored with the decoded weights."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from mdi_mpi.checkpoint import decode_mxfp4

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 48, 2, 16), dtype=torch.uint8, generator=g)  # [E, out, in/32, 16]
    scales = torch.randint(118, 132, (3, 48, 2), dtype=torch.uint8, generator=g)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)  # [E, out, in]
    assert torch.equal(torch.stack([decode_mxfp4(b, s, torch.float32) for b, s in zip(blocks, scales)]), ref)
    every = torch.arange(256, dtype=torch.uint8).view(256, 1).expand(256, 2).contiguous()  # every scale, extremes too
    wide = torch.randint(0, 256, (256, 2, 16), dtype=torch.uint8, generator=g)
    for dtype in (torch.float32, torch.bfloat16):
        ref = convert_moe_packed_tensors(wide[None], every[None], dtype=dtype)[0].t()
        assert torch.equal(decode_mxfp4(wide, every, dtype), ref), dtype
    byte = torch.tensor([[[0x71] + [0] * 15]], dtype=torch.uint8)  # low nibble 1 (0.5), high nibble 7 (6.0)
    assert decode_mxfp4(byte, torch.tensor([[128]], dtype=torch.uint8), torch.float32)[0, :3].tolist() == [1.0, 12.0, 0.0]

    src = models["gpt-oss"]
    tensors = load_file(src / "model.safetensors")
    stored = {"mxfp4": dict(tensors), "decoded": dict(tensors)}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, n_in, n_out = t.shape  # transformers' [E, in, out]
            b = torch.randint(0, 256, (e, n_out, n_in // 32, 16), dtype=torch.uint8, generator=g)
            s = torch.randint(120, 127, (e, n_out, n_in // 32), dtype=torch.uint8, generator=g)
            del stored["mxfp4"][name]
            stored["mxfp4"].update({f"{name}_blocks": b, f"{name}_scales": s})
            stored["decoded"][name] = convert_moe_packed_tensors(b, s, dtype=torch.float32)
    config = json.loads((src / "config.json").read_text())
    params = []
    for kind, ts in stored.items():
        path = tmp_path / kind
        path.mkdir()
        save_file(ts, path / "model.safetensors")
        (path / "config.json").write_text(json.dumps({**config, **({"quantization_config": {"quant_method": "mxfp4"}} if kind == "mxfp4" else {})}))
        params.append(dict(load_stage(Checkpoint(path), range(1, 3), edges=False, dtype=torch.bfloat16).named_parameters()))
    assert params[0].keys() == params[1].keys()
    assert all(torch.equal(params[0][k], params[1][k]) for k in params[0])
