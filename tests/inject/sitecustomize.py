"""Failure injection for tests, from outside the product: a test puts this folder on PYTHONPATH and
sets ``MDI_TEST_FAIL=R:S[:KIND]``, and rank R (``PMI_RANK``; 0 in a one-process job) fails at its S-th
call of ``Stage.forward_layers``, raising ``RuntimeError`` (KIND ``error``, the default) or
``KeyboardInterrupt`` (``interrupt``), as a bug or a Ctrl-C on that node would, or crashing with
SIGSEGV (``segfault``), as a bug in native code would."""

import os
import sys
import time

_spec = os.environ.get("MDI_TEST_FAIL")
if _spec:
    _rank, _step, *_kind = _spec.split(":")
    if int(_rank) == int(os.environ.get("PMI_RANK", "0")):
        from mdi_mpi.stage import Stage

        _forward = Stage.forward_layers
        _calls = [0]

        def _failing(self, h, batch):
            _calls[0] += 1
            if _calls[0] == int(_step):
                kind = _kind[0] if _kind else "error"
                print(f"injected {kind} at {time.time():.3f}", file=sys.stderr, flush=True)  # when, for the tests' timing
                if kind == "interrupt":
                    raise KeyboardInterrupt
                if kind == "segfault":
                    import signal

                    signal.signal(signal.SIGSEGV, signal.SIG_DFL)
                    os.kill(os.getpid(), signal.SIGSEGV)
                raise RuntimeError(f"injected failure at call {_step}")
            return _forward(self, h, batch)

        Stage.forward_layers = _failing

# MDI_TEST_SPEED=S0,S1,...: rank R measures its layer speed (for --balance speed) as S_R.
_speeds = os.environ.get("MDI_TEST_SPEED")
if _speeds:
    import mdi_mpi.job

    _mine = float(_speeds.split(",")[int(os.environ.get("PMI_RANK", "0"))])
    mdi_mpi.job.layer_speed = lambda config, dtype, steps=8: _mine
