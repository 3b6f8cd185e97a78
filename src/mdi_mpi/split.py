"""Per-rank shards: ``python -m mdi_mpi.split --model DIR --ranks N --out SHARDS``.

Writes ``SHARDS/rank-R/`` for every rank: the rank's own tensors in one ``model.safetensors`` (rank 0
also gets the embedding, final norm and LM head), ``config.json``, and on rank 0 the tokenizer, plus
``SHARDS/mdi_split.json`` with the plan. Copy ``rank-R`` to node R, and each node stores and reads
only its part. With ``--tp T``, every rank of a stage gets its slices of the stage (heads, MLP
columns, and on stage 0 the vocabulary), and the job must run with the same ``--tp``. ``generate --model SHARDS`` recognises the split and checks that the job matches it.

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
import sys

from mdi_mpi.checkpoint import Checkpoint
from mdi_mpi.cli import add_layout_arguments, layout_of, positive_int
from mdi_mpi.config import parse_dtype
from mdi_mpi.errors import UserError, cli_main
from mdi_mpi.layout import Sizes, check_plan, plan_layout, print_plan
from mdi_mpi.shards import write_shards


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
        layout = layout_of(args)
        ckpt = Checkpoint(args.model)
        dtype = parse_dtype(args.dtype)
        plan = plan_layout(ckpt.config, args.ranks, dtype, layout, Sizes.of(layout, ckpt.config, args.ranks),
                           layout.quant, check=False)
        print_plan(plan, dtype, layout.quant)
        check_plan(plan, ckpt.config, dtype, Sizes.of(layout, ckpt.config, args.ranks), layout.quant)
        write_shards(args.model, args.out, plan.layers, args.dtype, layout.quant, layout.tp, layout.tp_parts)
        print(f"wrote {args.ranks} shards to {args.out}: copy {args.out}/rank-R to node R, "
              f"or share the directory; run generate with --model {args.out}")

    return cli_main(body)


if __name__ == "__main__":
    sys.exit(main())
