"""Perplexity through the same ring: ``[mpirun -np N] python -m mdi_mpi.perplexity --model DIR --text FILE``.

The text is tokenized on rank 0 and cut into windows of --max-seq-len tokens (default: min(model's
max, 512)); each window is fed through the pipeline like a prompt (teacher forcing, --prefill-chunk
tokens per step, --slots windows in flight), the last rank returns every row instead of only the last,
and rank 0 scores each position's next token. This is how a user checks what ``--quant int4`` costs on their model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mdi_mpi.cli import Parser, add_job_arguments
from mdi_mpi.errors import UserError
from mdi_mpi.job import JobSpec, Prepared, start
from mdi_mpi.process import run_command
from mdi_mpi.scheduler import Segment, Work, pack

if TYPE_CHECKING:
    from mdi_mpi.transport import Comm


def windows(ids: Sequence[int], length: int, max_tokens: int | None = None) -> list[list[int]]:
    """``ids`` (cut to ``max_tokens``) in consecutive windows of ``length`` tokens; a last window of
    fewer than 2 tokens is dropped (nothing to predict in it)."""
    ids = list(ids[:max_tokens] if max_tokens else ids)
    out = [ids[i : i + length] for i in range(0, len(ids), length)]
    return [w for w in out if len(w) >= 2]


class Scorer:
    """Rank 0's bookkeeping for teacher-forced scoring: the same ``plan``/``complete`` protocol as
    the generation ``Scheduler``, fed whole windows, summing the negative log-likelihood of every
    next token (the first token of a window is context only)."""

    def __init__(self, windows: list[list[int]], n_slots: int, prefill_chunk: int, long_rope_after: int | None = None):
        self.waiting = deque(windows)
        self.active: list[list[int] | None] = [None] * n_slots
        self.pos = [0] * n_slots  # tokens of the slot's window already fed
        self.prefill_chunk = prefill_chunk
        self.long_rope_after = long_rope_after  # a window longer than this uses longrope's long factors
        self.nll = 0.0  # summed in float64
        self.n_targets = 0
        self.n_fed = 0

    @property
    def done(self) -> bool:
        return not self.waiting and all(w is None for w in self.active)

    def next_work(self, slots: Sequence[int]) -> Work | None:
        """The next chunk of each slot's window (admitting waiting windows); None when all are done."""
        segments = []
        after = self.long_rope_after
        for slot in slots:
            if self.active[slot] is None and self.waiting:
                self.active[slot], self.pos[slot] = self.waiting.popleft(), 0
            window = self.active[slot]
            if window is None:
                continue
            n = min(self.prefill_chunk, len(window) - self.pos[slot])
            segments.append(Segment(slot, self.pos[slot], n, True, after is not None and len(window) > after))
            self.pos[slot] += n
        return pack(segments, lambda slot: self.active[slot])

    def complete(self, work: Work, logits: torch.Tensor) -> None:
        """Score ``logits`` [T, V] (every row of ``work``) against each position's next token."""
        logp = torch.log_softmax(logits.double(), dim=-1)  # [T, V]
        row = 0
        for slot, first, n in zip(work.batch.slots, work.batch.starts, work.batch.lengths):
            window = self.active[slot]
            targets = window[first + 1 : first + n + 1]  # the window's last token predicts nothing
            if targets:
                picked = logp[row : row + len(targets)].gather(1, torch.tensor(targets)[:, None])
                self.nll -= float(picked.sum())
                self.n_targets += len(targets)
            self.n_fed += n
            row += n
            if first + n == len(window):
                self.active[slot] = None

    def sent(self, work: Work) -> None:
        """Nothing to prepare while a step travels."""


def build_parser() -> Parser:
    p = Parser(prog="python -m mdi_mpi.perplexity", description=__doc__.split("\n\n")[0],
               epilog="\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_job_arguments(p, prefix_cache=False)
    t = p.add_argument_group("evaluation")
    t.add_argument("--text", metavar="FILE", required=True, help="UTF-8 text to score (rank 0 reads it)")
    t.add_argument("--max-tokens", type=int, metavar="N", help="score only the first N tokens of the text")
    t.add_argument("--json", metavar="FILE", help="write perplexity, token counts and tokens/s as JSON")
    return p


def run(args: argparse.Namespace, spec: JobSpec, comm: Comm) -> dict:
    """Score ``args.text`` on this rank's part of the model; rank 0 returns the result."""
    from mdi_mpi.requests import load_tokenizer

    def prepare(config, tokenizer_dir: str, max_seq_len: int) -> Prepared:
        tokenizer = load_tokenizer(tokenizer_dir)
        if tokenizer is None:
            raise UserError(f"{tokenizer_dir} has no tokenizer: perplexity needs one to read --text")
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --text {args.text}: {e}") from None
        if args.max_tokens is not None and args.max_tokens < 2:
            raise UserError(f"--max-tokens must be at least 2, got {args.max_tokens}")
        ws = windows(tokenizer.encode(text, add_special_tokens=False), max_seq_len, args.max_tokens)
        if not ws:
            raise UserError(f"{args.text} has fewer than 2 tokens: nothing to score")
        return Prepared(ws, len(ws), tokenizer)

    job = start(comm, spec, prepare, default_max_seq_len=512)
    if job.rank != 0:
        job.gather(job.rank_stats(job.run(all_rows=True)))
        return {}
    scorer = Scorer(job.prepared.items, job.sizes.n_slots, args.prefill_chunk, job.config.long_rope_after)
    t0 = time.perf_counter()
    rec = job.run(scorer, all_rows=True)
    wall = time.perf_counter() - t0
    ranks = job.gather(job.rank_stats(rec))
    result = {
        **job.describe(),
        "text": args.text,
        "windows": len(job.prepared.items),
        "tokens": scorer.n_fed,
        "scored_tokens": scorer.n_targets,
        "nll_per_token": scorer.nll / scorer.n_targets,
        "perplexity": math.exp(scorer.nll / scorer.n_targets),
        "tokens_per_s": round(scorer.n_fed / wall, 2) if wall else 0.0,
        "per_rank": ranks,
    }
    quant = result["quant"] or "none"
    print(f"perplexity {result['perplexity']:.4f} over {scorer.n_targets} tokens ({len(job.prepared.items)} windows of "
          f"up to {job.sizes.max_seq_len}; {result['dtype']}, quant {quant}); {result['tokens_per_s']:.1f} prompt tokens/s "
          f"on {job.size} ranks", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
