"""Pipeline traces: written by ``generate --trace run.h5``, read by ``python -m mdi_mpi.trace``.

One HDF5 file (h5py; rank 0 writes what every rank gathered to it, so no parallel HDF5 is needed):

- attribute ``summary``: the run summary as JSON (configuration, throughput, per-rank figures);
- attribute ``groups``: JSON list of the slots in each group (micro-batch);
- attribute ``kinds``: the event kind names, indexed by an event's ``kind``;
- dataset ``ranks/R/events``: rank R's events (kind, group, start, end), seconds on a clock that all
  ranks set together at a barrier just before the run.

    python -m mdi_mpi.trace summary run.h5
    python -m mdi_mpi.trace plot run.h5 -o pipeline.png     (needs matplotlib)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import numpy as np

from mdi_mpi.errors import UserError, cli_main
from mdi_mpi.stats import BUSY_KINDS, EVENT_KINDS


def write_trace(path: str, summary: dict, groups: list[list[int]], events: list[np.ndarray]) -> None:
    """Write a run's summary and every rank's events to ``path``."""
    import h5py

    with h5py.File(path, "w") as f:
        f.attrs["summary"] = json.dumps(summary)
        f.attrs["groups"] = json.dumps(groups)
        f.attrs["kinds"] = json.dumps(list(EVENT_KINDS))
        for rank, ev in enumerate(events):
            f.create_dataset(f"ranks/{rank}/events", data=ev)


@dataclass
class Trace:
    summary: dict
    groups: list[list[int]]
    kinds: list[str]
    events: list[np.ndarray]  # per rank: structured (kind, group, start, end)


def read_trace(path: str) -> Trace:
    """Read a trace file written by ``write_trace``."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            n = len(f["ranks"])
            return Trace(
                json.loads(f.attrs["summary"]),
                json.loads(f.attrs["groups"]),
                json.loads(f.attrs["kinds"]),
                [f[f"ranks/{r}/events"][()] for r in range(n)],
            )
    except (OSError, KeyError) as e:
        raise UserError(f"{path} is not an mdi-mpi trace: {e}") from None


def utilization(trace: Trace) -> list[dict]:
    """Per rank: wall span of its events and the fraction spent in each kind."""
    rows = []
    for rank, ev in enumerate(trace.events):
        span = float(ev["end"].max() - ev["start"].min()) if len(ev) else 0.0
        row = {"rank": rank, "span_s": span}
        for k, name in enumerate(trace.kinds):
            sel = ev[ev["kind"] == k]
            row[name] = float((sel["end"] - sel["start"]).sum()) / span if span else 0.0
        row["busy"] = sum(row[k] for k in BUSY_KINDS)
        rows.append(row)
    return rows


def print_summary(trace: Trace) -> None:
    s = trace.summary
    print(
        f"{s['ranks']} ranks, {s['slots']} slots in {len(trace.groups)} groups, {s['dtype']}: "
        f"{s['generated_tokens']} tokens in {s['generate_s']:.2f} s = {s['tokens_per_s']:.2f} tokens/s"
    )
    rows = utilization(trace)
    header = ["rank", "layers", "busy"] + list(trace.kinds)
    print("  ".join(f"{h:>9}" for h in header))
    for row, info in zip(rows, s["per_rank"]):
        layers = f"{info['layers'][0]}-{info['layers'][1] - 1}"
        cells = [str(row["rank"]), layers, f"{100 * row['busy']:.1f}%"] + [f"{100 * row[k]:.1f}%" for k in trace.kinds]
        print("  ".join(f"{c:>9}" for c in cells))
    bubble = 1 - sum(r["busy"] for r in rows) / len(rows)
    print(f"bubble fraction (mean idle share of the ranks): {100 * bubble:.1f}%")


def plot(trace: Trace, out: str, window: float | None = None) -> None:
    """Draw the pipeline as a Gantt chart: a row per rank, busy spans coloured by group; with
    ``window``, only its first ``window`` seconds."""
    if window is not None and not window > 0:
        raise UserError(f"--window must be a positive number of seconds, got {window}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("trace plot needs matplotlib: pip install 'mdi-mpi[plot]'") from None
    n = len(trace.events)
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.7 * n))
    busy = [trace.kinds.index(k) for k in BUSY_KINDS]
    t_end = max(float(ev["end"].max()) for ev in trace.events if len(ev))
    t_start = min(float(ev["start"].min()) for ev in trace.events if len(ev))
    if window is not None:
        t_end = min(t_end, t_start + window)
    for rank, ev in enumerate(trace.events):
        for g in np.unique(ev["group"]):
            sel = ev[np.isin(ev["kind"], busy) & (ev["group"] == g) & (ev["start"] < t_end)]
            spans = [(float(a), float(b - a)) for a, b in zip(sel["start"], sel["end"])]
            ax.broken_barh(spans, (rank - 0.4, 0.8), facecolors=colours(int(g) % 10), linewidth=0)
    for g, slots in enumerate(trace.groups[:10]):
        ax.bar(0, 0, color=colours(g % 10), label=f"group {g}: slots {','.join(map(str, slots))}")
    ax.set_xlim(t_start, t_end)
    ax.set_yticks(range(n), [f"rank {r}" for r in range(n)])
    ax.invert_yaxis()
    ax.set_xlabel("time (s); white = idle (waiting for a message)")
    s = trace.summary
    ax.set_title(
        f"recurrent pipeline: {s['ranks']} ranks, {s['slots']} slots, micro-batch {s['micro_batch']}, "
        f"{s['tokens_per_s']:.1f} tokens/s"
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), fontsize=8, ncol=min(5, len(trace.groups)), frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mdi_mpi.trace", description="Read an mdi-mpi trace (generate --trace).")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summary", help="per-rank utilization and the bubble fraction")
    s.add_argument("trace")
    g = sub.add_parser("plot", help="draw the pipeline as a Gantt chart (PNG)")
    g.add_argument("trace")
    g.add_argument("-o", "--output", default="pipeline.png")
    g.add_argument("--window", type=float, metavar="S", help="draw only the first S seconds")
    args = p.parse_args(argv)

    def body() -> None:
        trace = read_trace(args.trace)
        if args.cmd == "summary":
            print_summary(trace)
        else:
            plot(trace, args.output, args.window)
            print(f"wrote {args.output}")

    return cli_main(body)


if __name__ == "__main__":
    sys.exit(main())
