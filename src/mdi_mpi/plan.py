"""Memory-aware planning: ``python -m mdi_mpi.plan --model DIR --ranks 3 --mem-per-rank 4GiB --slots 6 --dtype bf16``

prints each rank's layer range, weight, KV cache and buffer bytes and its predicted peak memory, and
refuses (exit 2) a plan that does not fit, suggesting the smallest rank count or dtype that does.
``generate`` runs the same check at start-up, before loading anything (both through
``layout.plan_layout``).

Balancing (``--balance``): ``cost`` (default) evens out per-token compute, counting rank 0's LM
head; ``memory`` splits layers in proportion to each rank's memory (use it when nodes differ in RAM,
e.g. a Pi 5 8GB with two Pi 4 4GB); ``speed`` splits in proportion to each rank's measured speed on
one decoder layer (use it when nodes differ in speed, e.g. a laptop with Pis), within memory limits.
An explicit ``--layers`` always wins.
"""

from __future__ import annotations

import argparse
import sys

from mdi_mpi.cli import add_layout_arguments, layout_of, positive_int
from mdi_mpi.config import ModelConfig, parse_dtype
from mdi_mpi.errors import UserError, cli_main
from mdi_mpi.layout import Sizes, check_plan, plan_layout, print_plan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mdi_mpi.plan", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the demo model)")
    p.add_argument("--ranks", type=positive_int, required=True, metavar="N")
    p.add_argument("--dtype", default="bfloat16", help="weights and activations dtype (default: bfloat16)")
    add_layout_arguments(p)
    args = p.parse_args(argv)

    def body() -> None:
        from mdi_mpi import demo

        if args.balance == "speed":
            raise UserError("--balance speed needs the ranks themselves: use it with generate or split")
        layout = layout_of(args)
        config = ModelConfig.from_dir(args.model or str(demo.demo_model()))
        dtype = parse_dtype(args.dtype)
        sizes = Sizes.of(layout, config, args.ranks)
        plan = plan_layout(config, args.ranks, dtype, layout, sizes, layout.quant, check=False)
        print_plan(plan, dtype, layout.quant)
        check_plan(plan, config, dtype, sizes, layout.quant)

    return cli_main(body)


if __name__ == "__main__":
    sys.exit(main())
