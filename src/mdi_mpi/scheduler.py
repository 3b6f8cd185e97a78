"""Rank 0's bookkeeping: which request holds which slot, what each slot feeds next, when it ends.

Prefill and decode are one operation: a slot feeds the tokens it has not yet put in its cache (at
most ``prefill_chunk`` at a time), and once the cache has them all its last token's logits are
sampled. A finished slot is refilled with the next waiting request at once (continuous batching);
its first segment starts at position 0, which is all the other stages need to know to reuse it.
Requests may arrive at any time (``add``) and be cancelled at any time (``cancel``); a cancelled
sequence whose step is in the ring keeps its slot until that step comes back. With a
``PrefixCache``, a request skips the prompt tokens whose KV a slot already holds (``prefix_cache``
says which, and why the result is the same bit for bit), and waits while a running request is
still computing a longer prefix of its prompt, which it then copies. With longrope, a
sequence longer than the original context is rotated with the long factors from position 0: one whose
prompt is longer from the start, and one that grows past it, which is fed again from position 0 (as
transformers recomputes it at that point).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from mdi_mpi.chat import ChatFormat, Delta, ToolCall
from mdi_mpi.kv_cache import Batch
from mdi_mpi.prefix_cache import Copy, Placement, PrefixCache
from mdi_mpi.requests import Request, Result
from mdi_mpi.sampling import request_generator, sample
from mdi_mpi.text import TextStream

if TYPE_CHECKING:
    from mdi_mpi.grammar import Grammars


@dataclass
class Work:
    """One forward pass for a group of slots."""

    batch: Batch
    ids: torch.Tensor  # [T] long: the packed input tokens
    sampled_segs: list[int]  # indices of the segments whose last token is sampled
    copies: tuple[Copy, ...] = ()  # KV copies every rank makes, in order, before this step


@dataclass(frozen=True)
class Segment:
    """The tokens ``start .. start + length - 1`` of the sequence in ``slot``, fed in one step."""

    slot: int
    start: int
    length: int
    sampled: bool  # its last token's logits are sampled (or scored)
    long: bool = False  # rotated with longrope's long factors


def pack(segments: list[Segment], tokens: Callable[[int], Sequence[int]], copies: tuple[Copy, ...] = ()) -> Work | None:
    """One step's ``Work`` from its segments (None if there are none): decode segments first (a
    stable sort), as ``Batch`` requires, each segment's tokens taken from ``tokens(slot)``, after
    ``copies``."""
    if not segments:
        return None
    segments = sorted(segments, key=lambda seg: seg.length > 1)
    ids = [t for seg in segments for t in tokens(seg.slot)[seg.start : seg.start + seg.length]]
    batch = Batch.make([s.slot for s in segments], [s.start for s in segments], [s.length for s in segments],
                       [s.long for s in segments])
    return Work(batch, torch.tensor(ids, dtype=torch.long), [i for i, s in enumerate(segments) if s.sampled], copies)


class Planner(Protocol):
    """What rank 0's loop asks of its bookkeeping (a ``Scheduler``, or perplexity's ``Scorer``)."""

    @property
    def done(self) -> bool: ...

    def next_work(self, slots: Sequence[int]) -> Work | None: ...

    def complete(self, work: Work, logits: torch.Tensor) -> None: ...

    def sent(self, work: Work) -> None: ...


@dataclass
class Step:
    """One sampled token of a request."""

    request: Request
    token: int
    text: str  # the text it lets a stream show: '' while held back (or without a tokenizer); the last step adds the rest
    reasoning: str = ""  # a chat answer's reasoning it shows
    calls: tuple[ToolCall, ...] = ()  # the tool calls it completes
    logprob: float | None = None  # its log-probability (raw logits), when the request asks for logprobs
    top: list[tuple[int, float]] = field(default_factory=list)  # the top tokens and their log-probabilities


class Listener:
    """What a scheduler tells its owner as requests move on; each method does nothing here."""

    def admitted(self, request: Request, cached: int) -> None:
        """``request`` took a slot, with the KV of its first ``cached`` prompt tokens already there."""

    def token(self, step: Step) -> None:
        """A token was sampled."""

    def finished(self, request: Request, result: Result) -> None:
        """``request`` ended (finish reason stop, length, context or cancelled) and left its slot."""


class _Occupant:
    """A request while it occupies a slot."""

    def __init__(self, request: Request, tokenizer, fmt: ChatFormat | None, grammars: Grammars | None, cached: int,
                 long: bool):
        self.request = request
        self.ids = list(request.input_ids)  # prompt, then generated tokens
        self.pos = cached  # tokens already in the cache
        self.cached = cached  # prompt tokens it found in the cache
        self.generator = request_generator(request.params.seed, request.index)
        answer = None
        if request.chat and fmt is not None and (fmt.tools or fmt.think):
            answer = fmt.answer(request.tools, request.thinking)
        self.text = None if tokenizer is None else TextStream(tokenizer, request.params.stop, answer)
        self.matcher = None if request.grammar is None else grammars.matcher(request.grammar)
        self.t_first: float | None = None
        self.cancelled = False
        self.long = long  # rotated with longrope's long factors

    @property
    def generated(self) -> list[int]:
        return self.ids[len(self.request.input_ids) :]


class Scheduler:
    """Admits requests into ``n_slots`` slots and turns logits into tokens and results."""

    def __init__(
        self,
        n_slots: int,
        max_seq_len: int,
        prefill_chunk: int,
        eos_ids: Sequence[int],
        tokenizer=None,
        listener: Listener | None = None,
        long_rope_after: int | None = None,
        prefix_cache: PrefixCache | None = None,
        grammars: Grammars | None = None,
    ):
        if n_slots < 1 or prefill_chunk < 1:
            raise ValueError("n_slots and prefill_chunk must be at least 1")
        if prefix_cache is not None and prefix_cache.block != prefill_chunk:
            raise ValueError("the prefix cache's block must be the prefill chunk")
        self.cache = prefix_cache
        self.long_rope_after = long_rope_after  # ModelConfig.long_rope_after
        self.waiting: deque[Request] = deque()
        self.active: list[_Occupant | None] = [None] * n_slots
        self.max_seq_len = max_seq_len
        self.prefill_chunk = prefill_chunk
        self.eos_ids = frozenset(eos_ids)
        self.tokenizer = tokenizer
        self.format = None if tokenizer is None else ChatFormat.of(tokenizer)  # how chat answers mark reasoning, calls
        self.grammars = grammars  # the matchers of requests with a grammar
        self.listener = listener or Listener()

    @property
    def done(self) -> bool:
        return not self.waiting and all(s is None for s in self.active)

    @property
    def running(self) -> int:
        """Sequences holding a slot."""
        return sum(s is not None for s in self.active)

    def add(self, requests: Iterable[Request]) -> None:
        """Queue requests; each one's time to first token counts from here unless it has an arrival time."""
        now = time.perf_counter()
        for r in requests:
            if r.arrival is None:
                r.arrival = now
            self.waiting.append(r)

    def cancel(self, request: Request) -> None:
        """End ``request`` early (finish reason ``cancelled``): at once if it waits, else when its slot
        is next planned or its step in flight comes back."""
        if request in self.waiting:
            self.waiting.remove(request)
            self.listener.finished(request, self._result(request, [], None, "cancelled", None))
            return
        for seq in self.active:
            if seq is not None and seq.request is request:
                seq.cancelled = True

    def cancel_all(self) -> None:
        """Cancel every request, waiting or running."""
        for r in list(self.waiting) + [s.request for s in self.active if s is not None]:
            self.cancel(r)

    def next_work(self, slots: Sequence[int]) -> Work | None:
        """The next forward pass for ``slots``, admitting waiting requests into free ones;
        None when none of them has anything left to do."""
        for slot in slots:
            seq = self.active[slot]
            if seq is not None and seq.cancelled:
                self._finish(slot, seq, "cancelled")
        copies = self._admit([s for s in slots if self.active[s] is None])
        segments = []
        for slot in slots:
            seq = self.active[slot]
            if seq is None:
                continue
            if self.long_rope_after is not None and not seq.long and len(seq.ids) > self.long_rope_after:
                seq.long, seq.pos = True, 0  # past the original context: everything again, with the long factors
                if self.cache is not None:
                    self.cache.restart(slot, True)
            n = min(self.prefill_chunk, len(seq.ids) - seq.pos)
            segments.append(Segment(slot, seq.pos, n, seq.pos + n == len(seq.ids), seq.long))
            if self.cache is not None:
                self.cache.computed(slot, seq.pos, n)
            seq.pos += n
        return pack(segments, lambda slot: self.active[slot].ids, copies)

    def _long(self, ids: Sequence[int]) -> bool:
        """Whether a prompt is rotated with longrope's long factors from the start."""
        return self.long_rope_after is not None and len(ids) > self.long_rope_after

    def _admit(self, free: list[int]) -> tuple[Copy, ...]:
        """Admit waiting requests into the ``free`` slots; the KV copies their first step needs."""
        copies: list[Copy] = []
        while free and self.waiting:
            if self.cache is None:
                request, long = self.waiting.popleft(), False
                place = Placement(free[0], 0, ())
            else:
                pick = self._next_placeable()
                if pick is None:
                    break
                request = self.waiting[pick]
                del self.waiting[pick]
                long = self._long(request.input_ids)
                place = self.cache.place(list(request.input_ids), long, free)
                self.cache.apply(place.copies)
                copies.extend(place.copies)
            free.remove(place.slot)
            seq = self.active[place.slot] = _Occupant(request, self.tokenizer, self.format, self.grammars,
                                                      place.cached, long)
            if self.cache is not None:
                self.cache.occupy(place.slot, seq.ids, place.cached, long)
            self.listener.admitted(request, place.cached)
        return tuple(copies)

    def _next_placeable(self) -> int | None:
        """The first waiting request that no running request is still computing a longer prefix of
        (by a block or more); None if every one waits for such a prefix."""
        c = self.prefill_chunk
        for i, request in enumerate(self.waiting):
            ids, long = list(request.input_ids), self._long(request.input_ids)
            now = self.cache.best(ids, long)[1]
            coming = 0
            for slot, seq in enumerate(self.active):
                if seq is not None and not seq.cancelled and seq.pos < len(seq.request.input_ids):
                    coming = max(coming, self.cache.shared(slot, ids, long, upto=len(seq.request.input_ids) // c * c))
            if coming < now + c:
                return i
        return None

    def complete(self, work: Work, logits: torch.Tensor) -> None:
        """Sample a token for every sampled segment of ``work`` from ``logits`` [len(sampled_segs), V]."""
        for row, seg in enumerate(work.sampled_segs):
            slot = work.batch.slots[seg]
            seq = self.active[slot]
            if seq.cancelled:
                self._finish(slot, seq, "cancelled")
                continue
            params = seq.request.params
            allowed = None if seq.matcher is None else seq.matcher.allowed()
            if allowed is not None and not allowed.any():  # the grammar allows nothing more: end, never crash
                self._finish(slot, seq, "stop")
                continue
            token = sample(logits[row], params, seq.generator, seq.generated, allowed)
            seq.ids.append(token)
            if seq.t_first is None:
                seq.t_first = time.perf_counter()
            complete = seq.matcher is not None and seq.matcher.consume(token)
            delta = Delta() if seq.text is None else seq.text.push(token)
            reason = self._finish_reason(seq, token) or ("stop" if complete else None)
            if reason is not None and seq.text is not None:
                delta += seq.text.rest()
            logprob, top = None, []
            if params.logprobs is not None:
                lp = logits[row].float().log_softmax(-1)  # [V]
                logprob = float(lp[token])
                if params.logprobs:
                    values, ids = torch.topk(lp, params.logprobs)
                    top = list(zip(ids.tolist(), values.tolist()))
            self.listener.token(Step(seq.request, token, delta.content, delta.reasoning, tuple(delta.calls), logprob, top))
            if reason is not None:
                self._finish(slot, seq, "tool_calls" if reason == "stop" and seq.text and seq.text.calls else reason)

    def sent(self, work: Work) -> None:
        """``work`` has left for the ring: compute the grammar masks its sampled rows will need."""
        for seg in work.sampled_segs:
            seq = self.active[work.batch.slots[seg]]
            if seq is not None and seq.matcher is not None:
                seq.matcher.prepare()

    def _finish_reason(self, seq: _Occupant, token: int) -> str | None:
        """Why ``seq`` ends after ``token``, or None if it goes on."""
        params = seq.request.params
        if seq.text is not None and seq.text.stopped:
            return "stop"
        if token in self.eos_ids and not params.ignore_eos:
            return "stop"
        if len(seq.generated) >= params.max_new_tokens:
            return "length"
        if len(seq.ids) > self.max_seq_len:
            return "context"
        return None

    def _finish(self, slot: int, seq: _Occupant, reason: str) -> None:
        self.active[slot] = None
        result = self._result(seq.request, seq.generated, None if seq.text is None else seq.text.text, reason,
                              seq.t_first, seq.cached)
        if seq.text is not None and seq.request.chat:
            result.reasoning = seq.text.reasoning or None
            result.tool_calls = [c.to_openai() for c in seq.text.calls] or None
        self.listener.finished(seq.request, result)

    @staticmethod
    def _result(r: Request, tokens: list[int], text: str | None, reason: str, t_first: float | None,
                cached: int = 0) -> Result:
        now = time.perf_counter()
        return Result(
            id=r.id,
            prompt=r.prompt,
            input_ids=list(r.input_ids),
            tokens=tokens,
            text=text,
            finish_reason=reason,
            ttft_s=None if t_first is None else round(t_first - r.arrival, 6),
            duration_s=round(now - r.arrival, 6),
            cached_tokens=cached,
        )


class Inbox:
    """Requests and cancellations handed from other threads (a server's) to rank 0's loop, which
    alone touches the scheduler. At most ``max_waiting`` sequences wait for a slot; ``submit``
    refuses more. The loop calls ``deliver``; the owner's listener calls ``left_queue`` when a
    submitted request takes a slot or is cancelled before it does."""

    def __init__(self, max_waiting: int, heartbeat_s: float):
        self.max_waiting = max_waiting
        self.heartbeat_s = heartbeat_s
        self.items: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.waiting = 0  # sequences submitted that hold no slot yet
        self.accepting = True  # submit's view, set off by close
        self.closed = False  # the loop's view: the close has been delivered

    def submit(self, requests: list[Request]) -> bool:
        """Queue requests for slots; False (and nothing queued) when that would exceed
        ``max_waiting`` or the inbox is closed."""
        with self.lock:
            if not self.accepting or self.waiting + len(requests) > self.max_waiting:
                return False
            self.waiting += len(requests)
        self.items.put(("add", requests))
        return True

    def cancel(self, requests: list[Request]) -> None:
        """End these requests early, wherever they are."""
        self.items.put(("cancel", requests))

    def stop_accepting(self) -> None:
        """Refuse new requests from now on (the start of a drain)."""
        with self.lock:
            self.accepting = False

    def close(self) -> None:
        """Refuse new requests and cancel those left (nobody waits for them any more); the loop then ends."""
        self.stop_accepting()
        self.items.put(("close", None))

    def abort(self) -> None:
        """Cancel every request now (the end of a drain)."""
        self.items.put(("abort", None))

    def left_queue(self) -> None:
        with self.lock:
            self.waiting -= 1

    def deliver(self, sched: Scheduler, timeout: float) -> bool:
        """Hand everything that has arrived to ``sched``, first waiting up to ``timeout`` seconds
        (without holding the GIL) for something to arrive; False if nothing did."""
        try:
            item = self.items.get(timeout=timeout) if timeout > 0 else self.items.get_nowait()
        except queue.Empty:
            return False
        while True:
            kind, requests = item
            if kind == "add":
                sched.add(requests)
            elif kind == "cancel":
                for r in requests:
                    sched.cancel(r)
            else:  # close, or abort: nobody waits for what is left any more
                sched.cancel_all()
                self.closed = self.closed or kind == "close"
            try:
                item = self.items.get_nowait()
            except queue.Empty:
                return True
