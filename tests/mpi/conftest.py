"""Run with ``mpirun -np 2 python -m pytest tests/mpi``: every rank runs every test in the same order.

A test that fails on one rank would leave the other waiting in a collective, so any failure aborts
the whole job at once (MPI_Abort) instead of hanging it.
"""

from __future__ import annotations

import pytest
from mpi4py import MPI


def pytest_itemcollected(item: pytest.Item) -> None:
    """Every test here runs inside an MPI job."""
    item.add_marker("mpi")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        import sys

        rank = MPI.COMM_WORLD.Get_rank()
        print(f"\nrank {rank}: {item.nodeid} failed:\n{report.longreprtext}", file=sys.stderr, flush=True)
        MPI.COMM_WORLD.Abort(1)


@pytest.fixture
def comm():
    from mdi_mpi.transport import Comm

    c = Comm(MPI.COMM_WORLD.Dup())
    yield c
    c.mpi.Barrier()
    c.mpi.Free()
