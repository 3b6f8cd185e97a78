"""The ring as the pipeline sees it, with no MPI: the messages (``Packet``), what a link does
(``Link``), and the ring of one rank (``LocalRing``). ``transport.Ring`` is the link over MPI."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from mdi_mpi.kv_cache import Batch
from mdi_mpi.prefix_cache import Copy
from mdi_mpi.stats import FIELDS

# What a packet is: a step of a group, the end of the job, a sign of life; and within a stage (--tp),
# the rows whose logits its ranks compute together.
WORK, STOP, HEARTBEAT, HEAD = 1, 2, 3, 4


@dataclass
class Packet:
    """One message round the ring. Received, ``rows`` views the receive buffer and is valid until
    the packet is released."""

    kind: int
    group: int
    batch: Batch | None = None  # None for a message with no work (a stop or a heartbeat)
    sampled_segs: list[int] = field(default_factory=list)  # segments whose last token rank 0 samples
    rows: torch.Tensor | None = None  # [n_rows, D]
    buffer: int = 0  # which receive buffer holds it
    copies: tuple[Copy, ...] = ()  # KV copies each rank makes, in order, before the step
    ids: torch.Tensor | None = None  # [T] token ids in place of rows: stage 0's ranks embed them together (--tp)


def signal_packet(kind: int) -> Packet:
    """A message with no work: a stop or a heartbeat."""
    return Packet(kind, 0)


class Link(Protocol):
    """One rank's place in the ring, as the pipeline loops use it."""

    rank: int
    size: int
    stats: np.ndarray  # [rank, len(stats.FIELDS)] int64: every rank's stats, as last reported
    bytes_sent: int

    def send(self, packet: Packet) -> None: ...

    def recv(self) -> Packet: ...

    def release(self, packet: Packet) -> None: ...

    def close(self) -> None: ...

    def buffer_bytes(self) -> int: ...


class LocalRing:
    """The ring of one rank: what rank 0 sends comes straight back to it."""

    def __init__(self) -> None:
        self.rank, self.size = 0, 1
        self.queue: deque[Packet] = deque()
        self.bytes_sent = 0
        self.stats = np.zeros((1, len(FIELDS)), dtype=np.int64)

    def send(self, packet: Packet) -> None:
        self.queue.append(packet)

    def recv(self) -> Packet:
        return self.queue.popleft()

    def release(self, packet: Packet) -> None:
        pass

    def close(self) -> None:
        pass

    def buffer_bytes(self) -> int:
        return 0
