"""``transport.wait`` with a fake MPI request and a fake clock: it naps instead of spinning, and
gives up at its deadline."""

from __future__ import annotations

import pytest

from mdi_mpi import transport


class FakeRequest:
    """Completes on its ``ready_after``-th test."""

    def __init__(self, ready_after: int):
        self.ready_after = ready_after
        self.tests = 0

    def Test(self) -> bool:  # noqa: N802 - mpi4py's name
        self.tests += 1
        return self.tests >= self.ready_after


@pytest.fixture
def clock(monkeypatch):
    """A fake clock that only moves when ``wait`` sleeps; returns the list of naps."""
    naps: list[float] = []
    now = [0.0]

    def sleep(s: float) -> None:
        naps.append(s)
        now[0] += s

    monkeypatch.setattr(transport.time, "sleep", sleep)
    monkeypatch.setattr(transport.time, "monotonic", lambda: now[0])
    return naps


def test_a_ready_request_costs_one_test_and_no_nap(clock):
    req = FakeRequest(1)
    assert transport.wait(req) and req.tests == 1 and clock == []


def test_naps_grow_from_10_us_to_the_cap_between_tests(clock):
    req = FakeRequest(40)
    assert transport.wait(req)
    assert req.tests == 40 and len(clock) == 39  # one nap between two tests: never a busy loop
    assert clock[0] == pytest.approx(1e-5)
    assert all(b == pytest.approx(min(2 * a, transport.MAX_NAP_S)) for a, b in zip(clock, clock[1:]))
    assert max(clock) == transport.MAX_NAP_S


def test_a_spinning_wait_checks_without_napping(clock):
    req = FakeRequest(1000)  # a stage's ranks meeting within a layer: each nap would cost more than the layer
    assert transport.wait(req, timeout_s=5, spin_s=1.0) and req.tests == 1000 and clock == []


def test_it_gives_up_at_the_deadline(clock):
    req = FakeRequest(10**9)
    assert transport.wait(req, timeout_s=0.3) is False
    assert 0.3 < sum(clock) <= 0.3 + 2 * transport.MAX_NAP_S
