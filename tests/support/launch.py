"""The package's commands in fresh processes, as a user runs them: one rank, or several under mpiexec."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def mpiexec() -> str:
    """The launcher of the MPI that mpi4py uses (the venv's MPICH first)."""
    return shutil.which("mpiexec", path=str(Path(sys.executable).parent)) or shutil.which("mpiexec")


def run_cli(args: list[str], ranks: int = 1, timeout: float = 120, env: dict | None = None,
            module: str = "mdi_mpi.generate") -> subprocess.CompletedProcess:
    """Run ``python -m mdi_mpi.generate`` (or another ``module``; under mpiexec when ``ranks`` > 1)
    and capture its output."""
    cmd = [sys.executable, "-m", module, *args]
    if ranks > 1:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)


def ranks_of(tag: str) -> dict[int, int]:
    """PID of each rank whose environment holds ``MDI_TEST_TAG=tag`` (Hydra sets ``PMI_RANK``): the
    process running the ``mdi_mpi`` module, not its watcher (``watch.py``, which ends with it)."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            env = dict(v.split("=", 1) for v in (proc / "environ").read_text().split("\0") if "=" in v)
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if env.get("MDI_TEST_TAG") == tag and "PMI_RANK" in env and b"-m" in argv:
            found[int(env["PMI_RANK"])] = int(proc.name)
    return found
