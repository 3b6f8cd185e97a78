"""Small helpers shared by tests: load a whole-model stage and generate greedily with it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import torch
from conftest import mpiexec, ranks_of

from mdi_mpi.checkpoint import Checkpoint, load_stage
from mdi_mpi.kernels import default_cache
from mdi_mpi.pipeline import Recorder, run_first, slot_groups
from mdi_mpi.requests import Request
from mdi_mpi.sampling import SamplingParams
from mdi_mpi.scheduler import Listener, Scheduler
from mdi_mpi.stage import Stage
from mdi_mpi.transport import LocalRing


def full_stage(path: Path, dtype: torch.dtype = torch.float32, n_slots: int = 4, max_seq_len: int = 128) -> Stage:
    ckpt = Checkpoint(path)
    stage = load_stage(ckpt, range(ckpt.config.n_layers), True, dtype)
    stage.setup_cache(n_slots, max_seq_len)
    stage.choose_kernels(cache=default_cache())
    return stage


def make_requests(prompts: list[list[int]], **params) -> list[Request]:
    p = SamplingParams(**{"max_new_tokens": 32, **params})
    return [Request(str(i), i, None, ids, p) for i, ids in enumerate(prompts)]


class Results(Listener):
    """Keeps every finished result, in the order they finish."""

    def __init__(self) -> None:
        self.results = []

    def finished(self, request, result) -> None:
        self.results.append(result)


def scheduler(requests: list[Request], n_slots: int, max_seq_len: int, prefill_chunk: int, eos_ids, tokenizer=None):
    """A scheduler holding ``requests`` whose listener (``sched.listener.results``) keeps the results."""
    sched = Scheduler(n_slots, max_seq_len, prefill_chunk, eos_ids, tokenizer, Results())
    sched.add(requests)
    return sched


def generate(stage: Stage, prompts: list[list[int]], n_slots: int, prefill_chunk: int = 64, **params) -> dict[str, list[int]]:
    """Tokens generated for each prompt, keyed by request id."""
    sched = scheduler(make_requests(prompts, **params), n_slots, stage.max_seq_len, prefill_chunk, stage.config.eos_token_ids)
    return {r.id: r.tokens for r in run_one_process(stage, sched)}


def run_one_process(stage: Stage, sched: Scheduler) -> list:
    """The pipeline of one rank (what ``generate`` runs with -np 1), all slots in one group."""
    n_slots = len(sched.active)
    run_first(stage, sched, LocalRing(), slot_groups(n_slots, n_slots), Recorder())
    return sched.listener.results


READY = re.compile(r"serving \S+ at (http://\S+)/v1 ")


class Server:
    """A server job on a free port; ``url`` once every rank has loaded."""

    def __init__(self, ranks: int, *flags: str, tag: str, env: dict | None = None):
        cmd = [sys.executable, "-m", "mdi_mpi.serve", "--port", "0", *flags]
        if ranks > 1:
            cmd = [mpiexec(), "-n", str(ranks), *cmd]
        self.tag = tag
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "MDI_TEST_TAG": tag, **(env or {})})
        self.stderr: list[str] = []
        self.ready = threading.Event()
        self.url = ""
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(120):
            self.kill()
            raise AssertionError("the server did not become ready:\n" + "".join(self.stderr))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            m = READY.search(line)
            if m:
                self.url = m.group(1)
                self.ready.set()
        self.ready.set()

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)

    def metric(self, name: str, **kw) -> float:
        text = httpx.get(self.url + "/metrics", **kw).text
        m = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(m.group(1))

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to the launcher, as ``kill`` or ``scancel`` does; returns its exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        for pid in ranks_of(self.tag).values():
            os.kill(pid, signal.SIGKILL)
