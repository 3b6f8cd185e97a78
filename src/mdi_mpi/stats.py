"""The per-rank stats schema: what each rank reports of its time and memory, defined once.

Every rank keeps running totals of where its time goes (one event kind each) and its peak RSS. The
ring carries them in the header of every message as one int64 row per rank (``FIELDS``), so rank 0
knows every rank's load at most one trip round the ring late; the server reads them by name
(``RankStats.from_row``), never by column index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

EVENT_KINDS = ("recv-wait", "compute", "prefill", "send", "sample")  # what a rank's time is spent on
BUSY_KINDS = ("compute", "prefill", "sample")
RECV, COMPUTE, PREFILL, SEND, SAMPLE = range(len(EVENT_KINDS))  # event kind codes, as traces store them
FIELDS = (*(f"{k.replace('-', '_')}_us" for k in EVENT_KINDS), "peak_rss_kib")  # one int64 each, per rank


def to_row(totals_s: Sequence[float], peak_rss_kib: int) -> list[int]:
    """A rank's running stats as the ring carries them: microseconds per event kind, then peak RSS in KiB."""
    return [*(int(1e6 * t) for t in totals_s), int(peak_rss_kib)]


@dataclass(frozen=True)
class RankStats:
    """One rank's stats, read by name from the row the ring carries."""

    busy_s: float  # computing or sampling
    waiting_s: float  # waiting for a message
    sending_s: float  # handing a message to MPI
    peak_rss_bytes: int

    @classmethod
    def from_row(cls, row: Sequence[int]) -> RankStats:
        us = dict(zip(FIELDS, (int(x) for x in row)))
        return cls(
            busy_s=1e-6 * sum(us[f"{k}_us"] for k in BUSY_KINDS),
            waiting_s=1e-6 * us["recv_wait_us"],
            sending_s=1e-6 * us["send_us"],
            peak_rss_bytes=1024 * us["peak_rss_kib"],
        )
