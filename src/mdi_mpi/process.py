"""Process policy of an MPI command: the watcher fork, the MPI netmod under ``srun``, signals, and
how a failure becomes an exit code (or an abort of the whole job).

``run_command`` is every MPI command's entry point. Bad input: one ``error:`` line from rank 0 and
exit code 2 on every rank. Any other failure on any rank, of any kind (an exception,
KeyboardInterrupt, SystemExit, SIGTERM), prints ``rank R on HOST: ...`` and aborts the whole job, so
that no rank is left waiting.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mdi_mpi.cli import job_spec
from mdi_mpi.errors import EXIT_USAGE, AgreedError, UserError

if TYPE_CHECKING:
    from mdi_mpi.job import JobSpec
    from mdi_mpi.transport import Comm

NETMOD_VAR = "MPIR_CVAR_CH4_NETMOD"


class Terminated(BaseException):
    """SIGTERM arrived: the job was cancelled (``scancel``, a time limit, ``kill``)."""


def who(rank: int | str) -> str:
    """How a failure line names this rank: ``rank R on HOST``."""
    return f"rank {rank} on {socket.gethostname()}"


def _env_rank() -> tuple[str | None, int]:
    """This process's rank and the job's size as the launcher's environment gives them."""
    rank = os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK")
    size = os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or "1"
    return rank, int(size) if size.isdigit() else 1


def choose_netmod() -> str | None:
    """Under ``srun --mpi=pmi2``, choose MPICH's OFI netmod unless the user chose one, and return the
    line that says so (None when nothing was chosen).

    PyPI's MPICH talks PMI-1 to Slurm's pmi2 plugin, which reads each request with one 1024-byte
    ``read``. MPICH's default netmod, UCX, publishes a 4.5 KB address in ~1 KB requests, and one a
    little longer than 1024 bytes is cut in two: MPI_Init fails or hangs. OFI's address is 25 bytes,
    one short request. Other MPIs ignore the variable; hydra's ``mpiexec`` has its own PMI server
    (``SLURM_MPI_TYPE`` is not pmi2 under it) and keeps UCX."""
    if os.environ.get("SLURM_MPI_TYPE") != "pmi2" or NETMOD_VAR in os.environ:
        return None
    os.environ[NETMOD_VAR] = "ofi"
    return (f"note: under srun --mpi=pmi2, MPICH's OFI netmod ({NETMOD_VAR}=ofi): UCX's addresses overflow "
            f"Slurm's 1024-byte PMI reads; set {NETMOD_VAR} to choose another")


_reported_fd: int | None = None  # where this rank tells its watcher that it has printed why it failed


def watch_rank() -> None:
    """In a job of several ranks (on Linux), fork before MPI starts: the child returns and runs this
    rank; this process, the one the launcher started and signals, becomes ``watch.py``, which says
    when the child is killed by a signal it could not report itself (the out-of-memory killer's
    SIGKILL, a crash in native code). The child dies with it (``PR_SET_PDEATHSIG``)."""
    global _reported_fd
    rank, size = _env_rank()
    if sys.platform != "linux" or rank is None or size < 2:
        return
    import ctypes

    read_end, write_end = os.pipe()
    parent = os.getpid()
    child = os.fork()
    if child:
        os.close(write_end)
        os.set_inheritable(read_end, True)
        watcher = str(Path(__file__).with_name("watch.py"))
        os.execv(sys.executable, [sys.executable, "-S", "-E", watcher, str(child), str(read_end), who(rank)])
    os.close(read_end)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the watcher
    if os.getppid() != parent:  # the watcher died before that took effect
        os._exit(1)
    _reported_fd = write_end


def _reported() -> None:
    """Tell the watcher (if any) that this rank has printed why it failed."""
    if _reported_fd is not None:
        os.write(_reported_fd, b"x")


def _terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: Slurm signals the watcher and this rank alike
    raise Terminated("the job was terminated by SIGTERM; records already written are kept")


def _interrupted(signum, frame) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # once, as for SIGTERM
    raise KeyboardInterrupt


MMAP_THRESHOLD = 4 * 2**20  # bytes: freed blocks this large go straight back to the system


def return_freed_memory() -> None:
    """Have glibc's malloc give every freed block of ``MMAP_THRESHOLD`` bytes or more straight back
    to the system. Left to itself, it raises that threshold to the largest block freed so far, and
    the load's temporaries (each tensor in the file's dtype, its float32 blocks, a weight's first
    layout before it is repacked) stay in the heap: measured, 0.4-0.9 GiB more resident memory for a
    1.1B model in int8. Nothing where malloc is not glibc's, or where ``MALLOC_MMAP_THRESHOLD_`` is set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD; an explicit value also ends the raising


def exit_code(e: BaseException) -> int:
    """The exit code of a rank that failed with ``e``."""
    if isinstance(e, UserError):
        return EXIT_USAGE
    return 130 if isinstance(e, KeyboardInterrupt) else 143 if isinstance(e, Terminated) else 1


def run_command(parser: argparse.ArgumentParser, body: Callable[[argparse.Namespace, JobSpec, Comm], Any],
                argv: list[str] | None = None) -> int:
    """Entry point of an MPI command: start MPI, parse the flags on every rank (the shared job flags
    into a ``JobSpec``), run ``body(args, spec, comm)``; returns the exit code (see the module
    docstring)."""
    watch_rank()
    return_freed_memory()
    note = choose_netmod()
    from mdi_mpi.transport import world

    comm = world()
    if note and comm.rank == 0:
        print(note, file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, _terminated)  # the launcher forwards it; scancel and time limits send it
    signal.signal(signal.SIGINT, _interrupted)
    try:
        if any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv)):
            if comm.rank == 0:
                parser.print_help()
            return 0
        args = comm.agree(lambda: parser.parse_args(argv))
        spec = comm.agree(lambda: job_spec(args))
        body(args, spec, comm)
        return 0
    except AgreedError as e:
        if comm.rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except BaseException as e:  # noqa: BLE001 - any failure must end every rank, not hang them
        if isinstance(e, UserError):  # found by this rank alone, mid-run: the others must be stopped
            line = f"{'error' if comm.size == 1 else who(comm.rank)}: {e}"
        else:
            name = type(e).__name__
            line = f"{who(comm.rank)}: {name}: {e}" if str(e) else f"{who(comm.rank)}: {name}"
        print(line, file=sys.stderr, flush=True)
        _reported()
        if os.environ.get("MDI_MPI_DEBUG") and not isinstance(e, UserError):
            import traceback

            traceback.print_exc()
        code = exit_code(e)
        if comm.size > 1:
            comm.abort(code)
        return code
