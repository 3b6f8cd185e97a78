"""A real ``mdi_mpi.serve`` job for tests, on a free port, stopped by PID."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import httpx
import openai

from support.launch import mpiexec, ranks_of

READY = re.compile(r"serving (\S+) at (http://\S+)/v1 ")


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
        self.model = ""  # the served model's name
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(120):
            self.kill()
            raise AssertionError("the server did not become ready:\n" + "".join(self.stderr))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            m = READY.search(line)
            if m:
                self.model, self.url = m.group(1), m.group(2)
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
