"""Slot-indexed KV cache and the batch descriptor that addresses it.

A cache is preallocated once for ``n_slots`` sequences of at most ``max_seq_len`` positions; every
forward writes keys and values at explicit positions of explicit slots, so nothing is allocated per
token and many sequences at different positions share one stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Batch:
    """Which tokens a forward call carries: segment i is ``lengths[i]`` tokens of slot ``slots[i]``
    starting at position ``starts[i]``. Tokens are packed in segment order, single-token (decode)
    segments first: the first ``n_single`` rows are decode rows, the rest prompt rows."""

    slots: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    positions: torch.Tensor  # [T] long: the position of every packed token
    last: torch.Tensor  # [B] long: index of each segment's last token in the packed tokens
    n_single: int  # rows that belong to single-token segments (they come first)
    long: tuple[bool, ...]  # per segment: rotated with longrope's long factors
    long_tokens: torch.Tensor | None  # [T] long: 1 for the tokens of long segments; None if there are none

    @classmethod
    def make(cls, slots: list[int], starts: list[int], lengths: list[int], long: Sequence[bool] = ()) -> Batch:
        """Describe segments (slot, start, length, and whether each uses longrope's long factors;
        default: none); positions are derived, never guessed."""
        if not (len(slots) == len(starts) == len(lengths)) or not slots:
            raise ValueError("a batch needs one start and one length per slot, and at least one slot")
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot appears twice in one batch: {slots}")
        if min(lengths) < 1 or min(starts) < 0:
            raise ValueError(f"bad segment starts {starts} or lengths {lengths}")
        n_single = next((i for i, n in enumerate(lengths) if n > 1), len(lengths))
        if any(n == 1 for n in lengths[n_single:]):
            raise ValueError(f"single-token segments must come first, got lengths {lengths}")
        if all(n == 1 for n in lengths):
            positions = torch.tensor(starts, dtype=torch.long)
        else:
            positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths)])
        last = torch.tensor(lengths, dtype=torch.long).cumsum(0) - 1
        long = tuple(bool(x) for x in long) or (False,) * len(slots)
        if len(long) != len(slots):
            raise ValueError("a batch needs one long flag per slot")
        long_tokens = None
        if any(long):
            long_tokens = torch.repeat_interleave(torch.tensor(long, dtype=torch.long), torch.tensor(lengths))
        return cls(tuple(slots), tuple(starts), tuple(lengths), positions, last, n_single, long, long_tokens)

    @property
    def n_tokens(self) -> int:
        return int(sum(self.lengths))


class KVCache(nn.Module):
    """Keys and values of one attention layer for ``n_slots`` sequences."""

    def __init__(self, n_slots: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (n_slots, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)  # [S, Hkv, L, hd]
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)  # [S, Hkv, L, hd]
        self.lengths = [0] * n_slots  # valid positions per slot

    def update(
        self, slot: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` [n, Hkv, hd] at positions start..start+n-1 of ``slot``; return views of the
        slot's keys and values so far, each [1, Hkv, start+n, hd]."""
        n = k.shape[0]
        end = start + n
        if start > self.lengths[slot]:
            raise RuntimeError(f"slot {slot}: write at position {start} leaves a gap after {self.lengths[slot]}")
        if end > self.k.shape[2]:
            raise RuntimeError(f"slot {slot}: position {end - 1} is beyond the cache ({self.k.shape[2]})")
        self.k[slot, :, start:end].copy_(k.transpose(0, 1))
        self.v[slot, :, start:end].copy_(v.transpose(0, 1))
        self.lengths[slot] = end
        return self.k[slot : slot + 1, :, :end], self.v[slot : slot + 1, :, :end]

    def copy(self, src: int, dst: int, length: int) -> None:
        """Copy positions 0..length-1 of slot ``src`` into slot ``dst``, which then holds exactly those."""
        if length > self.lengths[src]:
            raise RuntimeError(f"slot {src} holds {self.lengths[src]} positions, not the {length} to copy")
        self.k[dst, :, :length].copy_(self.k[src, :, :length])
        self.v[dst, :, :length].copy_(self.v[src, :, :length])
        self.lengths[dst] = length

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
