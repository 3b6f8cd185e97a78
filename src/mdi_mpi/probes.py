"""What a process can learn of itself and its node: peak memory, available memory, the cache
directory, the CPU's vector flags. No MPI, no torch: any module may use these."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path


def peak_rss() -> int:
    """This process's peak resident memory in bytes since it started (exec), from the kernel's
    high-water mark; ``ru_maxrss`` is the fallback off Linux (it also counts a forking parent's RSS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def available_memory(local_ranks: int) -> int:
    """This rank's share of the node's available memory (MemAvailable / ranks on the node)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // max(1, local_ranks)
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, local_ranks)


def cache_dir() -> Path:
    """Where built checkpoints and kernel choices live: ``$MDI_MPI_CACHE``, else
    ``$XDG_CACHE_HOME/mdi-mpi``, else ``~/.cache/mdi-mpi``."""
    if os.environ.get("MDI_MPI_CACHE"):
        return Path(os.environ["MDI_MPI_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mdi-mpi"


def cpu_features() -> tuple[str, set[str]]:
    """The CPU's name and its feature flags (``/proc/cpuinfo``; empty off Linux)."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model") and not name.strip():
                    name = value.strip()
                if key.strip() in ("flags", "Features"):
                    flags = set(value.split())
    except OSError:
        pass
    return name or platform.machine(), flags


def cpu_flags() -> str:
    """The CPU's name and the flags that decide matmul kernels (what BENCHMARKS.md records)."""
    name, flags = cpu_features()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "asimd", "asimddp", "bf16", "i8mm", "sve")
    return f"{name}: {' '.join(f for f in wanted if f in flags) or 'no vector flags found'}"
