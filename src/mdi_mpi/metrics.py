"""The server's figures: each rank's place and load (``Ranks``, for ``/v1/status`` and the dashboard)
and the Prometheus metrics of ``/metrics``.

Only rank 0 imports this module. The ranks' load is the stats row each rank carries round the ring
(``mdi_mpi.stats``), read by name; prometheus_client is thread-safe, so the HTTP thread reads what
rank 0's main thread writes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from mdi_mpi.stats import RankStats

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)  # seconds
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)  # seconds


class Ranks:
    """Each rank's place in the job (reported once at start-up) and its load (the stats the ranks
    carry round the ring in the headers of their messages, as rank 0 last saw them)."""

    def __init__(self, info: list[dict], stats: np.ndarray):
        self.info = by_stage(info)  # per ring rank: rank, host, layers, weight_bytes, kv_cache_bytes
        self.stats = stats  # the ring's [rank, stats.FIELDS] array, written by the main thread

    def view(self) -> list[dict]:
        """Per rank: its info, then busy_s, waiting_s, sending_s and peak_rss_bytes."""
        rows = self.stats.copy()
        return [{**info, **asdict(RankStats.from_row(row))} for info, row in zip(self.info, rows)]


class Metrics:
    """The Prometheus metrics of ``/metrics``."""

    def __init__(self, running: Callable[[], int], waiting: Callable[[], int], ranks: Ranks):
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("mdi_mpi_requests_running", "Sequences holding a slot (each choice counts)", registry=r).set_function(running)
        Gauge("mdi_mpi_requests_waiting", "Sequences waiting for a slot (each choice counts)", registry=r).set_function(waiting)
        self.prompt_tokens = Counter("mdi_mpi_prompt_tokens", "Prompt tokens of admitted sequences", registry=r)
        self.cached_tokens = Counter("mdi_mpi_prompt_tokens_cached", "Prompt tokens whose KV was found in the prefix cache",
                                     registry=r)
        self.computed_tokens = Counter("mdi_mpi_prompt_tokens_computed", "Prompt tokens computed (not found in the cache)",
                                       registry=r)
        self.generated_tokens = Counter("mdi_mpi_generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter("mdi_mpi_request_finished", "Finished sequences", ["finish_reason"], registry=r)
        self.ttft = Histogram("mdi_mpi_time_to_first_token_seconds", "From arrival (queueing included) to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mdi_mpi_inter_token_latency_seconds", "Between two tokens of a sequence",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("mdi_mpi_e2e_request_latency_seconds", "From arrival to the last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(_RankCollector(ranks))

    def text(self) -> bytes:
        """The exposition text of every metric."""
        return generate_latest(self.registry)


def by_stage(placements: list[dict]) -> list[dict]:
    """Every rank's ``Job.placement`` as one row per pipeline stage, the ring's ranks: with ``--tp``,
    a stage's ranks as ``"A-B"``, its hosts, and the bytes of all of them (its leader's stats
    stand for the stage)."""
    stages: dict[int, list[dict]] = {}
    for p in placements:
        stages.setdefault(p.get("stage", p["rank"]), []).append(p)
    rows = []
    for ranks in stages.values():
        if len(ranks) == 1:
            rows.append(ranks[0])
            continue
        rows.append({**ranks[0], "rank": f"{ranks[0]['rank']}-{ranks[-1]['rank']}",
                     "host": ", ".join(dict.fromkeys(r["host"] for r in ranks)),
                     "weight_bytes": sum(r["weight_bytes"] for r in ranks),
                     "kv_cache_bytes": sum(r["kv_cache_bytes"] for r in ranks)})
    return rows


class _RankCollector:
    """Each rank's busy, waiting and sending seconds, read when ``/metrics`` is."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks

    def collect(self) -> Iterator[CounterMetricFamily]:
        view = self.ranks.view()
        for what, doc in (("busy", "computing or sampling"), ("waiting", "waiting for a message"),
                          ("sending", "sending a message")):
            family = CounterMetricFamily(f"mdi_mpi_rank_{what}_seconds", f"Seconds each rank spent {doc}", labels=["rank"])
            for r in view:
                family.add_metric([str(r["rank"])], r[f"{what}_s"])
            yield family
