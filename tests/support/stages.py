"""A whole-model stage in this process, and greedy generation with it through the real scheduler and pipeline."""

from __future__ import annotations

from pathlib import Path

import torch

from mdi_mpi.checkpoint import Checkpoint, load_stage
from mdi_mpi.kernels import default_cache
from mdi_mpi.partition import slot_groups
from mdi_mpi.pipeline import Recorder, run_first
from mdi_mpi.prefix_cache import PrefixCache
from mdi_mpi.requests import Request
from mdi_mpi.ring import LocalRing
from mdi_mpi.sampling import SamplingParams
from mdi_mpi.scheduler import Listener, Scheduler
from mdi_mpi.stage import Stage


def full_stage(path: Path, dtype: torch.dtype = torch.float32, n_slots: int = 4, max_seq_len: int = 128) -> Stage:
    ckpt = Checkpoint(path)
    stage = load_stage(ckpt, range(ckpt.config.n_layers), True, dtype)
    stage.setup_cache(n_slots, max_seq_len)
    stage.choose_kernels(cache=default_cache())
    return stage


def make_requests(prompts: list[list[int]], **params) -> list[Request]:
    p = SamplingParams(**{"max_new_tokens": 32, **params})
    return [Request(str(i), i, None, ids, p) for i, ids in enumerate(prompts)]


class Results(Listener):
    """Keeps every finished result, in the order they finish."""

    def __init__(self) -> None:
        self.results = []

    def finished(self, request, result) -> None:
        self.results.append(result)


def scheduler(requests: list[Request], n_slots: int, max_seq_len: int, prefill_chunk: int, eos_ids, tokenizer=None,
              long_rope_after: int | None = None, cache_slots: int | None = None):
    """A scheduler holding ``requests`` whose listener (``sched.listener.results``) keeps the results;
    with ``cache_slots`` (0 or more), a prefix cache with that many cache slots."""
    cache = None if cache_slots is None else PrefixCache(n_slots, cache_slots, prefill_chunk)
    sched = Scheduler(n_slots, max_seq_len, prefill_chunk, eos_ids, tokenizer, Results(), long_rope_after, cache)
    sched.add(requests)
    return sched


def generate(stage: Stage, prompts: list[list[int]], n_slots: int, prefill_chunk: int = 64, **params) -> dict[str, list[int]]:
    """Tokens generated for each prompt, keyed by request id."""
    sched = scheduler(make_requests(prompts, **params), n_slots, stage.max_seq_len, prefill_chunk, stage.config.eos_token_ids,
                      long_rope_after=stage.config.long_rope_after)
    return {r.id: r.tokens for r in run_one_process(stage, sched)}


def run_one_process(stage: Stage, sched: Scheduler, micro_batch: int | None = None) -> list:
    """The pipeline of one rank (what ``generate`` runs with -np 1), all slots in one group (or in
    groups of ``micro_batch``)."""
    n_slots = len(sched.active)
    run_first(stage, sched, LocalRing(), slot_groups(n_slots, micro_batch or n_slots), Recorder())
    return sched.listener.results
