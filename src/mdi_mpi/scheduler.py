"""Rank 0's bookkeeping: which request holds which slot, what each slot feeds next, when it ends.

Prefill and decode are one operation: a slot feeds the tokens it has not yet put in its cache (at
most ``prefill_chunk`` at a time), and once the cache has them all its last token's logits are
sampled. A finished slot is refilled with the next waiting request at once (continuous batching);
its first segment starts at position 0, which is all the other stages need to know to reuse it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mdi_mpi.kv_cache import Batch
from mdi_mpi.requests import Request, Result
from mdi_mpi.sampling import request_generator, sample


@dataclass
class Work:
    """One forward pass for a group of slots."""

    batch: Batch
    ids: torch.Tensor  # [T] long: the packed input tokens
    sampled: list[int]  # indices of the segments whose last token's logits are sampled


class _Sequence:
    """A request while it occupies a slot."""

    def __init__(self, request: Request):
        self.request = request
        self.ids = list(request.input_ids)  # prompt, then generated tokens
        self.pos = 0  # tokens already in the cache
        self.generator = request_generator(request.params.seed, request.index)
        self.t_admit = time.perf_counter()
        self.t_first: float | None = None

    @property
    def generated(self) -> list[int]:
        return self.ids[len(self.request.input_ids) :]


class Scheduler:
    """Admits requests into ``n_slots`` slots and turns logits into tokens and results."""

    def __init__(
        self,
        requests: Sequence[Request],
        n_slots: int,
        max_seq_len: int,
        prefill_chunk: int,
        eos_ids: Sequence[int],
        tokenizer=None,
        on_finish: Callable[[Result], None] | None = None,
        on_token: Callable[[Request, int], None] | None = None,
    ):
        if n_slots < 1 or prefill_chunk < 1:
            raise ValueError("n_slots and prefill_chunk must be at least 1")
        self.waiting = deque(requests)
        self.active: list[_Sequence | None] = [None] * n_slots
        self.max_seq_len = max_seq_len
        self.prefill_chunk = prefill_chunk
        self.eos_ids = frozenset(eos_ids)
        self.tokenizer = tokenizer
        self.on_finish = on_finish
        self.on_token = on_token
        self.results: list[Result] = []

    @property
    def done(self) -> bool:
        return not self.waiting and all(s is None for s in self.active)

    def plan(self, slots: Sequence[int]) -> Work | None:
        """The next forward pass for ``slots``, admitting waiting requests into free ones;
        None when none of them has anything left to do."""
        segments = []  # (slot, start, length, needs sampling)
        for slot in slots:
            seq = self.active[slot]
            if seq is None and self.waiting:
                seq = self.active[slot] = _Sequence(self.waiting.popleft())
            if seq is None:
                continue
            n = min(self.prefill_chunk, len(seq.ids) - seq.pos)
            segments.append((slot, seq.pos, n, seq.pos + n == len(seq.ids)))
            seq.pos += n
        if not segments:
            return None
        segments.sort(key=lambda seg: seg[2] > 1)  # decode segments first (stable), as Batch requires
        seg_slots = [seg[0] for seg in segments]
        starts = [seg[1] for seg in segments]
        lengths = [seg[2] for seg in segments]
        sampled = [i for i, seg in enumerate(segments) if seg[3]]
        chunks = [t for slot, start, n, _ in segments for t in self.active[slot].ids[start : start + n]]
        batch = Batch.make(seg_slots, starts, lengths)
        return Work(batch, torch.tensor(chunks, dtype=torch.long), sampled)

    def complete(self, work: Work, logits: torch.Tensor) -> None:
        """Sample a token for every sampled segment of ``work`` from ``logits`` [len(sampled), V]."""
        for row, seg in enumerate(work.sampled):
            slot = work.batch.slots[seg]
            seq = self.active[slot]
            token = sample(logits[row], seq.request.params, seq.generator)
            seq.ids.append(token)
            if seq.t_first is None:
                seq.t_first = time.perf_counter()
            if self.on_token is not None:
                self.on_token(seq.request, token)
            reason, text = self._finish_reason(seq, token)
            if reason is not None:
                self._finish(slot, seq, reason, text)

    def _finish_reason(self, seq: _Sequence, token: int) -> tuple[str | None, str | None]:
        """Why ``seq`` ends after ``token`` (None if it goes on) and its text, cut at a stop string."""
        params = seq.request.params
        if params.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
            hits = [text.index(s) for s in params.stop if s in text]
            if hits:
                return "stop", text[: min(hits)]
        if token in self.eos_ids:
            reason = "stop"
        elif len(seq.generated) >= params.max_new_tokens:
            reason = "length"
        elif len(seq.ids) > self.max_seq_len:
            reason = "context"
        else:
            return None, None
        text = None if self.tokenizer is None else self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        return reason, text

    def _finish(self, slot: int, seq: _Sequence, reason: str, text: str | None) -> None:
        now = time.perf_counter()
        r = seq.request
        result = Result(
            id=r.id,
            prompt=r.prompt,
            input_ids=list(r.input_ids),
            tokens=seq.generated,
            text=text,
            finish_reason=reason,
            ttft_s=round(seq.t_first - seq.t_admit, 6),
            duration_s=round(now - seq.t_admit, 6),
        )
        self.active[slot] = None
        self.results.append(result)
        if self.on_finish is not None:
            self.on_finish(result)
