"""Partition planner: table tests."""

from __future__ import annotations

import pytest

from mdi_mpi.config import ModelConfig
from mdi_mpi.demo import TINYLLAMA_CONFIG
from mdi_mpi.errors import UserError
from mdi_mpi.partition import edge_cost, parse_split, split_layers


def counts(ranges):
    return [len(r) for r in ranges]


@pytest.mark.parametrize(
    "n_layers, n_ranks, extra, weights, expected",
    [
        (22, 1, 1.49, None, [22]),
        (22, 2, 0.0, None, [11, 11]),
        (22, 2, 1.49, None, [10, 12]),
        (22, 3, 1.49, None, [6, 8, 8]),
        (22, 4, 1.49, None, [4, 6, 6, 6]),
        (12, 3, 0.0, None, [4, 4, 4]),
        (10, 3, 0.0, None, [3, 3, 4]),  # ties: the later ranks take the remainder
        (12, 3, 0.0, [1.0, 2.0, 1.0], [3, 6, 3]),
        (12, 2, 0.0, [3.0, 1.0], [9, 3]),
        (4, 4, 5.0, None, [1, 1, 1, 1]),  # every rank keeps at least one layer
        (8, 2, 20.0, None, [1, 7]),
    ],
)
def test_balanced_split(n_layers, n_ranks, extra, weights, expected):
    ranges = split_layers(n_layers, n_ranks, extra, weights)
    assert counts(ranges) == expected
    assert ranges[0].start == 0 and ranges[-1].stop == n_layers
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))


def test_explicit_split_wins():
    assert split_layers(22, 3, 1.49, split=[2, 10, 10]) == [range(0, 2), range(2, 12), range(12, 22)]
    assert parse_split("6, 8,8") == [6, 8, 8]


@pytest.mark.parametrize(
    "args, message",
    [
        ((4, 5), "5 ranks but the model has only 4 layers"),
        ((4, 0), "at least one rank"),
        ((22, 3, 0.0, None, [6, 8]), "2 counts for 3 ranks"),
        ((22, 3, 0.0, None, [6, 8, 9]), "sums to 23"),
        ((22, 3, 0.0, None, [0, 11, 11]), "at least one layer"),
        ((22, 2, 0.0, [1.0]), "1 rank weights for 2 ranks"),
        ((22, 2, 0.0, [1.0, -2.0]), "positive"),
    ],
)
def test_bad_plans(args, message):
    with pytest.raises(UserError, match=message):
        split_layers(*args)


def test_bad_split_text():
    with pytest.raises(UserError, match="comma-separated"):
        parse_split("6;8")


def test_tinyllama_head_costs_more_than_a_layer():
    cost = edge_cost(ModelConfig.from_dict({**TINYLLAMA_CONFIG, "model_type": "llama"}))
    assert 1.4 < cost < 1.6


@pytest.mark.parametrize("n_slots, micro, groups", [
    (1, 1, [[0]]),
    (4, 2, [[0, 1], [2, 3]]),
    (5, 2, [[0, 1], [2, 3], [4]]),
    (3, 8, [[0, 1, 2]]),
])
def test_slot_groups(n_slots, micro, groups):
    from mdi_mpi.partition import slot_groups

    assert slot_groups(n_slots, micro) == groups


@pytest.mark.subprocess
def test_importing_a_command_does_not_start_mpi():
    """MPI must start only after the watcher's fork and the netmod choice (``process.run_command``):
    a command module, the job set-up and the flags import no mpi4py."""
    import subprocess
    import sys

    code = ("import sys, mdi_mpi.generate, mdi_mpi.serve, mdi_mpi.perplexity, mdi_mpi.process, mdi_mpi.job, "
            "mdi_mpi.cli; assert 'mpi4py.MPI' not in sys.modules, 'MPI started at import'")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
