"""Per-rank shards: ``python -m mdi_mpi.split --model DIR --ranks N --out SHARDS``.

Writes ``SHARDS/rank-R/`` for every rank: the rank's own tensors in one ``model.safetensors`` (rank 0
also gets the embedding, final norm and LM head), ``config.json``, and on rank 0 the tokenizer, plus
``SHARDS/mdi_split.json`` with the plan. Copy ``rank-R`` to node R, and each node stores and reads
only its part. ``generate --model SHARDS`` recognises the split and checks that the job matches it.

With ``--quant int8|int4`` the shards hold the weights quantized (portable unpacked integers with
their scales; int4 is packed for the CPU at load), so a node stores and reads only its quantized part,
and ``generate`` uses the scheme it finds.

Writing builds one rank's stage at a time (that rank's share of the weights in memory). Shards are
safetensors, the format of the source checkpoints: a node reads its tensors lazily (by byte range,
one at a time), bf16 is stored natively, and the shard is an ordinary checkpoint directory for the
same loader, so there is one loading path. (HDF5 has no bf16 type and would need a second loader.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import save_file

from mdi_mpi.checkpoint import Checkpoint, hf_name, layer_quant, load_stage
from mdi_mpi.config import parse_dtype
from mdi_mpi.errors import UserError, cli_main
from mdi_mpi.partition import default_micro_batch, parse_split
from mdi_mpi.plan import add_layout_arguments, check_fit, make_plan, memory_flags, positive_int, print_plan, quant_of
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


def write_shards(model: str, out: str, layers: list[range], dtype_name: str, quant: Quant | None = None) -> None:
    """Write one shard per rank into ``out`` (which must not exist yet); with ``quant``, the weights
    that ``generate --quant`` quantizes are stored quantized, as portable unpacked integers with their
    scales (and zeros) beside them: ``NAME.q``, ``NAME.scale``, ``NAME.zero``."""
    dtype = parse_dtype(dtype_name)
    dest = Path(out)
    if dest.exists():
        raise UserError(f"{out} already exists; choose a new --out directory")
    ckpt = Checkpoint(model)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for rank, r in enumerate(layers):
        stage = load_stage(ckpt, r, rank == 0, dtype)
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
        "ranks": len(layers),
        "layers": [[r.start, r.stop] for r in layers],
        "dtype": str(dtype).removeprefix("torch."),
        "quant": None if quant is None else {"kind": quant.kind, "group": quant.group},
        "source": str(Path(model).resolve()),
    }, indent=1))
    tmp.rename(dest)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mdi_mpi.split", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", required=True, help="the full checkpoint")
    p.add_argument("--ranks", type=positive_int, required=True, metavar="N")
    p.add_argument("--out", metavar="DIR", required=True, help="new directory for the shards")
    p.add_argument("--dtype", default="bfloat16", help="dtype the shards store (default: bfloat16)")
    add_layout_arguments(p)
    args = p.parse_args(argv)

    def body() -> None:
        if args.balance == "speed":
            raise UserError("--balance speed measures the ranks themselves: split with --layers from a generate run")
        ckpt = Checkpoint(args.model)
        dtype = parse_dtype(args.dtype)
        slots = args.slots or args.ranks
        quant = quant_of(args.quant, args.quant_group or 128)
        plan = make_plan(ckpt.config, args.ranks, dtype, slots, args.max_seq_len or ckpt.config.default_context(),
                         args.micro_batch or default_micro_batch(slots, args.ranks), args.prefill_chunk,
                         split=parse_split(args.layers) if args.layers else None,
                         available=memory_flags(args.mem_per_rank, args.mem, args.ranks), balance=args.balance, quant=quant)
        print_plan(plan, dtype, quant)
        check_fit(plan)
        write_shards(args.model, args.out, plan.layers, args.dtype, quant)
        print(f"wrote {args.ranks} shards to {args.out}: copy {args.out}/rank-R to node R, "
              f"or share the directory; run generate with --model {args.out}")

    return cli_main(body)


if __name__ == "__main__":
    sys.exit(main())
