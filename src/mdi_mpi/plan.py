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

Layouts (``--layouts``): for every ``--tp`` that the rank count and the model allow, whether it fits
and the predicted tokens/s of one stream alone and of ``--streams K`` together, from one decoder
layer's speed measured here (with ``--quant`` weights, ``--threads`` threads) and the link (``--link-latency-ms``, ``--link-mbit``); then the layout to use for K streams. Measure the
layer on the nodes themselves (``plan`` runs where you start it) and the link with ``ping``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import torch

from mdi_mpi.cli import add_layout_arguments, layout_of, positive_int
from mdi_mpi.config import ModelConfig, parse_dtype
from mdi_mpi.errors import UserError, cli_main
from mdi_mpi.layout import Layout, Link, Sizes, check_plan, fits, plan_layout, predict, print_plan
from mdi_mpi.model import TensorSplit
from mdi_mpi.partition import edge_cost, split_layers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mdi_mpi.plan", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR", help="checkpoint directory (default: the demo model)")
    p.add_argument("--ranks", type=positive_int, required=True, metavar="N")
    p.add_argument("--dtype", default="bfloat16", help="weights and activations dtype (default: bfloat16)")
    add_layout_arguments(p)
    lay = p.add_argument_group("choosing a layout")
    lay.add_argument("--layouts", action="store_true", help="predict the speed of every layout (--tp) of --ranks "
                     "ranks and recommend one for --streams")
    lay.add_argument("--streams", type=positive_int, default=1, metavar="K", help="conversations at once (default: 1)")
    lay.add_argument("--link-latency-ms", type=float, default=0.1, metavar="MS", help="one message's latency "
                     "between nodes (default: 0.1, gigabit Ethernet; Wi-Fi: 2 or more; one machine: 0.01)")
    lay.add_argument("--link-mbit", type=float, default=1000.0, metavar="MBIT", help="link bandwidth (default: 1000)")
    lay.add_argument("--threads", type=positive_int, metavar="T", help="torch threads of the measured layer: a rank's "
                     "threads (default: this machine's cores, one rank per node)")
    args = p.parse_args(argv)

    def body() -> None:
        from mdi_mpi import demo

        if args.balance == "speed":
            raise UserError("--balance speed needs the ranks themselves: use it with generate or split")
        layout = layout_of(args)
        config = ModelConfig.from_dir(args.model or str(demo.demo_model()))
        dtype = parse_dtype(args.dtype)
        sizes = Sizes.of(layout, config, args.ranks)
        if args.layouts:
            if args.threads:
                torch.set_num_threads(args.threads)
            link = Link(args.link_latency_ms / 1e3, args.link_mbit * 1e6 / 8)
            print_layouts(config, args.ranks, dtype, layout, args.streams, link)
            return
        plan = plan_layout(config, args.ranks, dtype, layout, sizes, layout.quant, check=False)
        print_plan(plan, dtype, layout.quant)
        check_plan(plan, config, dtype, sizes, layout.quant)

    return cli_main(body)


def print_layouts(config: ModelConfig, n_ranks: int, dtype: torch.dtype, layout: Layout, streams: int, link: Link) -> None:
    """Each layout of ``n_ranks`` ranks that the model allows: whether it fits, its predicted speed
    for one stream and for ``streams``, and the fastest that fits for ``streams``."""
    from mdi_mpi.stage import layer_speed

    layer_s = 1.0 / layer_speed(config, dtype, steps=16, quant=layout.quant)
    head_s = edge_cost(config) * layer_s  # the head reads as many weights as edge_cost layers...
    if layout.quant is not None:  # ...as int8, against the layers' int8 or int4
        head_s *= 1 / layout.quant.bytes_per_weight(torch.empty((), dtype=dtype).element_size())
    print(f"one decoder layer: {layer_s * 1e3:.2f} ms per token on this machine ({str(dtype).removeprefix('torch.')}"
          f"{', ' + layout.quant.kind if layout.quant else ''}, {torch.get_num_threads()} threads); "
          f"link {link.latency_s * 1e3:g} ms, {link.bytes_per_s * 8 / 1e6:g} Mbit/s")
    print(f"{'stages x T':>10}  {'fits':>4}  {'1 stream tok/s':>14}  {f'{streams} streams tok/s':>16}")
    best = None
    for tp in (t for t in range(1, n_ranks + 1) if n_ranks % t == 0):
        try:
            TensorSplit(0, tp, tp).check(config)
            split_layers(config.n_layers, n_ranks // tp)
        except UserError:
            continue
        lay = replace(layout, tp=tp, tp_parts=None)
        sizes = Sizes.of(lay, config, n_ranks)
        plan = plan_layout(config, n_ranks, dtype, lay, sizes, lay.quant, check=False)
        ok = plan.available is None or fits(plan.memory, plan.available)
        one, many = predict(config, n_ranks, tp, layer_s, streams, link, head_s=head_s)
        print(f"{f'{n_ranks // tp} x {tp}':>10}  {'yes' if ok else 'no':>4}  {one:>14.2f}  {many:>16.2f}")
        if ok and (best is None or many > best[1] * 1.02):  # a faster layout wins only by more than the noise
            best = (tp, many)
    if best is None:
        raise UserError(f"no layout of {n_ranks} ranks fits: see plan without --layouts for what would")
    print(f"recommended for {streams} stream{'s' if streams > 1 else ''}: --tp {best[0]}")


if __name__ == "__main__":
    sys.exit(main())
