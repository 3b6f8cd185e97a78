"""Which prompt prefix each slot's KV cache holds, and where a new request should go (rank 0's
bookkeeping; pure Python, no torch, no MPI).

When a request ends, its slot's keys and values stay where they are. A new request whose prompt
begins with tokens some slot holds skips them: it takes that slot, or another slot into which every
rank first copies those positions (``Copy``, carried by the request's first step round the ring).

Only *whole prompt chunks* are held: positions ``k*C .. (k+1)*C - 1`` (``C``, the prefill chunk)
that were computed as one chunk of prompt rows. A fresh request computes its prompt in exactly
those chunks, so what it reuses is bit for bit what it would have computed, and its tokens are the
same with the cache as without it (and so, as before, for any rank, slot and micro-batch count).
A prompt's last, partial chunk has attention over another number of queries (one token: the decode
kernels), and generated tokens go through the decode kernels; a fresh prefill computes those
positions inside a whole chunk, so they are not held. That makes the block ``C`` tokens long, and a match a whole number of blocks.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Copy:
    """Every rank copies positions ``0 .. length - 1`` of slot ``src`` into slot ``dst``."""

    src: int
    dst: int
    length: int


@dataclass
class Entry:
    """What one slot holds: the KV of ``tokens[:n]``, rotated with longrope's long factors or not."""

    tokens: list[int]
    n: int = 0
    long: bool = False
    used: int = 0  # when it was last matched or written (a counter): the least recently used goes first


@dataclass(frozen=True)
class Placement:
    """Where a request goes: into ``slot``, skipping its first ``cached`` tokens, after ``copies``."""

    slot: int
    cached: int
    copies: tuple[Copy, ...]


class PrefixCache:
    """The held prefixes of ``n_slots`` slots that run requests and ``cache_slots`` more that only
    hold prefixes (saved there when a running slot is taken for another prompt)."""

    def __init__(self, n_slots: int, cache_slots: int, block: int):
        if block < 1 or cache_slots < 0:
            raise ValueError("the block must be at least 1 token and cache_slots at least 0")
        self.block = block
        self.n_slots = n_slots
        self.entries = [Entry([]) for _ in range(n_slots + cache_slots)]
        self.clock = 0

    def shared(self, slot: int, ids: list[int], long: bool, upto: int | None = None) -> int:
        """How many of ``ids``' first tokens ``slot`` holds (of its first ``upto``; default: what it
        holds now), in whole blocks, leaving at least one token of ``ids`` to compute."""
        e = self.entries[slot]
        if e.long != long:
            return 0
        limit = min(e.n if upto is None else upto, len(ids) - 1)
        c, n = self.block, 0
        while n + c <= limit and e.tokens[n : n + c] == ids[n : n + c]:
            n += c
        return n

    def best(self, ids: list[int], long: bool) -> tuple[int, int]:
        """The slot holding the longest prefix of ``ids`` and its length (0 if none holds a block);
        among equals, the most recently used."""
        found, length = -1, 0
        for slot in range(len(self.entries)):
            n = self.shared(slot, ids, long)
            if n > length or (n == length and n and self.entries[slot].used > self.entries[found].used):
                found, length = slot, n
        return found, length

    def place(self, ids: list[int], long: bool, free: list[int]) -> Placement:
        """Where a request with prompt ``ids`` goes among the ``free`` running slots: the slot that
        holds its longest prefix if that slot is free; else the least recently used free slot, into
        which that prefix is copied. The taken slot's own prefix is first saved in the least
        recently used cache slot, when there are cache slots and it is not held elsewhere."""
        src, n = self.best(ids, long)
        if n and src in free:
            return Placement(src, n, ())
        slot = min(free, key=lambda s: self.entries[s].used)
        copies = []
        save = self._save_target(slot, exclude=src)
        if save is not None:
            copies.append(Copy(slot, save, self.entries[slot].n))
        if n:
            copies.append(Copy(src, slot, n))
        return Placement(slot, n, tuple(copies))

    def _save_target(self, slot: int, exclude: int) -> int | None:
        """The cache slot to save ``slot``'s prefix in before it is overwritten, or None."""
        e = self.entries[slot]
        spare = [s for s in range(self.n_slots, len(self.entries)) if s != exclude]
        if e.n < self.block or not spare:
            return None
        for s in range(len(self.entries)):  # already held whole elsewhere: nothing to save
            o = self.entries[s]
            if s != slot and o.long == e.long and o.n >= e.n and o.tokens[: e.n] == e.tokens[: e.n]:
                return None
        return min(spare, key=lambda s: self.entries[s].used)

    def apply(self, copies: tuple[Copy, ...]) -> None:
        """Record ``copies`` as done (they are, on every rank, before the step that carries them)."""
        for cp in copies:
            e = self.entries[cp.src]
            self.entries[cp.dst] = Entry(e.tokens[: cp.length], cp.length, e.long, self._tick())

    def occupy(self, slot: int, ids: list[int], cached: int, long: bool) -> None:
        """``slot`` now runs the prompt ``ids`` and holds its first ``cached`` tokens; ``ids`` is the
        request's own list, which grows as it generates."""
        self.entries[slot] = Entry(ids, cached, long, self._tick())

    def computed(self, slot: int, start: int, length: int) -> None:
        """Positions ``start .. start + length - 1`` of ``slot`` are computed in one step: a whole
        aligned chunk after what the slot holds extends it; anything else ends it at ``start``."""
        e = self.entries[slot]
        if start == e.n and start % self.block == 0 and length == self.block:
            e.n = start + length
        else:
            e.n = min(e.n, start - start % self.block)
        e.used = self._tick()

    def restart(self, slot: int, long: bool) -> None:
        """``slot`` is fed again from position 0 (longrope's switch to the long factors)."""
        e = self.entries[slot]
        e.n, e.long = 0, long

    def _tick(self) -> int:
        self.clock += 1
        return self.clock
