"""One job set-up for every command that runs the model over MPI (generate, perplexity, bench's runs).

A command parses its flags into a ``JobSpec`` and calls ``start``; every rank then runs the same
steps, in this order:

1. check the flags;
2. open the checkpoint (or this rank's shard) and read its config;
3. rank 0 prepares the command's work (prompts, texts) and so the slot count;
4. pick the dtype (``--dtype auto``), plan the layers and check that every rank fits its memory;
5. load this rank's layers (quantized with ``--quant``) and allocate its KV cache;
6. choose the matmul kernels on this machine;
7. open the ring.

Input errors are agreed with one collective per step, so every rank raises ``AgreedError`` and the
command exits 2 with one message; ``run_command`` turns any other failure on any rank, of any kind,
into ``rank R: ...`` and an abort of the whole job.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mdi_mpi.config import DEFAULT_CONTEXT
from mdi_mpi.errors import UserError
from mdi_mpi.kernels import ROWS
from mdi_mpi.plan import add_layout_arguments, positive_int

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so that all ranks leave together."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)


class AgreedError(UserError):
    """A user error that every rank knows about, so each can exit on its own."""


def agree(comm, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank and return its local value; if it raises ``UserError`` on any rank,
    raise ``AgreedError`` on all (naming the rank if not 0)."""
    try:
        value, err = fn(), None
    except UserError as e:
        value, err = None, str(e)
    errors = comm.allgather(err) if comm.Get_size() > 1 else [err]
    for r, e in enumerate(errors):
        if e:
            raise AgreedError(e if r == 0 else f"rank {r}: {e}")
    return value


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The model, rank and scheduling flags every MPI command shares (parsed by ``JobSpec.from_args``)."""
    m = p.add_argument_group("model, ranks and scheduling")
    m.add_argument("--model", metavar="DIR", help="Hugging Face checkpoint directory (safetensors) or split shards; "
                   "default: the built-in demo model (trained on Python's standard library)")
    m.add_argument("--dtype", default="auto", help="weights and activations dtype: auto (default: bfloat16, or float32 "
                   "where this CPU decodes float32 at least 1.25x faster and it fits in memory), bfloat16, float32, float16")
    m.add_argument("--kernel", default="auto", choices=("auto", *ROWS), help="matmul kernel for every linear layer: "
                   "auto (default: measured per weight shape on each rank's CPU, cached), or one of mv, row, tile2..tile256")
    m.add_argument("--threads", type=positive_int, metavar="T", help="torch threads per rank; default: the node's cores divided by its ranks")
    add_layout_arguments(m)
    m.add_argument("--timeout", type=float, default=600.0, metavar="S", help="end the job when a rank waits more than S "
                   "seconds for a message, as when a node hangs or drops off the network (default: 600; 0: never)")


@dataclass(frozen=True)
class JobSpec:
    """A job's model, ranks and scheduling, as the shared flags give them."""

    model: str | None  # checkpoint or shards directory; None: the demo model
    dtype: str = "auto"  # auto, or a dtype name
    quant: str | None = None  # int8, int4 or None
    quant_group: int | None = None  # int4 group; None: the shards' or 128
    kernel: str = "auto"  # auto, or one kernel forced everywhere
    max_seq_len: int | None = None
    threads: int | None = None
    layers: str | None = None  # explicit split "A,B,..."
    mem_per_rank: str | None = None
    mem: str | None = None
    balance: str = "cost"
    slots: int | None = None
    micro_batch: int | None = None
    prefill_chunk: int = 128
    timeout: float = 600.0  # seconds; 0: never
    trace: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> JobSpec:
        return cls(args.model, args.dtype, args.quant, args.quant_group, args.kernel, args.max_seq_len, args.threads,
                   args.layers, args.mem_per_rank, args.mem, args.balance, args.slots, args.micro_batch,
                   args.prefill_chunk, args.timeout, bool(getattr(args, "trace", None)))

    def check(self) -> None:
        """Raise ``UserError`` for a flag out of range."""
        from mdi_mpi.config import parse_dtype
        from mdi_mpi.plan import quant_of

        for name in ("max_seq_len", "threads", "slots", "micro_batch", "prefill_chunk"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if not self.timeout >= 0:
            raise UserError(f"--timeout must be 0 (never) or a number of seconds, got {self.timeout}")
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        quant_of(self.quant, self.quant_group or 128)


@dataclass
class Prepared:
    """What rank 0 prepared in step 3: the command's own items, and how many requests they make."""

    items: Any
    n_requests: int | None  # None: requests arrive over time (a server)
    tokenizer: Any = None


@dataclass
class Job:
    """A started job on one rank: everything the command's loop needs."""

    comm: Any
    rank: int
    size: int
    model_dir: str
    is_demo: bool
    config: Any  # ModelConfig
    max_seq_len: int
    dtype: Any  # torch.dtype
    dtype_reason: str
    quant: Any  # Quant | None
    n_slots: int
    micro_batch: int
    groups: list[list[int]]
    plan: Any  # Plan
    stage: Any  # Stage
    ring: Any  # Ring or LocalRing
    kernels: Any  # kernels.Selection
    threads: int
    startup_s: float
    load_s: float
    prepared: Prepared | None  # rank 0 only

    def rank_stats(self, rec) -> dict:
        """This rank's share of the run summary."""
        from mdi_mpi.plan import peak_rss

        layers = self.plan.layers[self.rank]
        return {
            "rank": self.rank,
            "host": socket.gethostname(),
            "layers": [layers.start, layers.stop],
            "weight_bytes": self.stage.weight_bytes(),
            "kv_cache_bytes": self.stage.cache_bytes(),
            "predicted_peak_bytes": self.plan.memory[self.rank]["peak_bytes"],
            "buffer_bytes": self.ring.buffer_bytes(),
            "peak_rss_bytes": peak_rss(),
            "load_s": round(self.load_s, 3),
            "kernels": self.kernels.describe(),
            "quantized_linears": self.stage.quant_summary(),
            "threads": self.threads,
            "bytes_sent": self.ring.bytes_sent,
            **rec.summary(),
        }

    def describe(self) -> dict:
        """The job's shape, for the run summary."""
        return {
            "model": self.model_dir,
            "demo": self.is_demo,
            "dtype": str(self.dtype).removeprefix("torch."),
            "dtype_reason": self.dtype_reason,
            "quant": self.quant.kind if self.quant else None,
            "quant_group": self.quant.group if self.quant and self.quant.kind == "int4" else None,
            "ranks": self.size,
            "slots": self.n_slots,
            "micro_batch": self.micro_batch,
            "max_seq_len": self.max_seq_len,
            "startup_s": round(self.startup_s, 3),
        }


def start(comm, spec: JobSpec, prepare: Callable[[Any, str, int], Prepared], default_max_seq_len: int = DEFAULT_CONTEXT) -> Job:
    """Set the job up on this rank (the steps in the module docstring). ``prepare(config,
    tokenizer_dir, max_seq_len)`` runs on rank 0 only and returns its ``Prepared``."""
    import torch

    from mdi_mpi import demo
    from mdi_mpi.checkpoint import Checkpoint, load_stage
    from mdi_mpi.config import parse_dtype
    from mdi_mpi.kernels import decode_row_ms, default_cache
    from mdi_mpi.partition import default_micro_batch, parse_split, split_layers
    from mdi_mpi.pipeline import slot_groups
    from mdi_mpi.plan import (
        available_memory,
        check_fit,
        fits,
        layer_speed,
        make_plan,
        memory_flags,
        pick_dtype,
        quant_of,
        suggestion,
    )
    from mdi_mpi.split import read_split, shard_dir
    from mdi_mpi.transport import LocalRing, Ring, local_ranks

    rank, size = comm.Get_rank(), comm.Get_size()
    t0 = time.perf_counter()

    def check() -> None:
        spec.check()
        check_launcher(size)

    agree(comm, check)
    threads = spec.threads or max(1, (len(os.sched_getaffinity(0)) // local_ranks(comm)))
    torch.set_num_threads(threads)

    # The demo model: rank 0 builds it first; on a cluster without a shared cache each node builds its own.
    is_demo = spec.model is None
    if is_demo:
        if rank == 0:
            demo.demo_model()
        comm.Barrier()
        model_dir = str(demo.demo_model())
    else:
        model_dir = os.path.expanduser(spec.model)

    def open_checkpoint():
        # Every rank opens its checkpoint itself (each node may have its own copy or its own shard).
        split = parse_split(spec.layers) if spec.layers else None
        quant = quant_of(spec.quant, spec.quant_group or 128)
        shards = read_split(model_dir)
        if shards is not None:
            if shards["ranks"] != size:
                raise UserError(f"{model_dir} is split for {shards['ranks']} ranks, but the job has {size}")
            counts = [len(r) for r in shards["layers"]]
            if split is not None and split != counts:
                raise UserError(f"--layers {spec.layers} does not match the split's layers {','.join(map(str, counts))}")
            ckpt, tokenizer_dir = Checkpoint(shard_dir(model_dir, rank)), shard_dir(model_dir, 0)
            split = counts
            quant = _shards_quant(shards, spec, model_dir) or quant
        else:
            ckpt, tokenizer_dir = Checkpoint(model_dir), model_dir
        max_seq_len = spec.max_seq_len or ckpt.config.default_context(default_max_seq_len)
        ckpt.config.check_context(max_seq_len)
        split_layers(ckpt.config.n_layers, size, split=split)  # fail early on too many ranks or a bad split
        memory_flags(spec.mem_per_rank, spec.mem, size)
        return ckpt, split, tokenizer_dir, max_seq_len, quant

    ckpt, split, tokenizer_dir, max_seq_len, quant = agree(comm, open_checkpoint)
    cfg = ckpt.config

    def prepare_on_first() -> tuple[Prepared | None, tuple[int, int] | None]:
        if rank != 0:
            return None, None
        work = prepare(cfg, str(tokenizer_dir), max_seq_len)
        n_slots = spec.slots or (4 * size if work.n_requests is None else max(size, min(work.n_requests, 4 * size)))
        micro = spec.micro_batch or default_micro_batch(n_slots, size)
        if micro > n_slots:
            raise UserError(f"--micro-batch {micro} is larger than --slots {n_slots}")
        return work, (n_slots, micro)

    work, shape = agree(comm, prepare_on_first)
    n_slots, micro = comm.bcast(shape, root=0)
    groups = slot_groups(n_slots, micro)

    # Plan with every rank's memory (and speed, for --balance speed), and check that it fits.
    mems = memory_flags(spec.mem_per_rank, spec.mem, size) or comm.allgather(available_memory(local_ranks(comm)))
    kw = dict(n_slots=n_slots, max_seq_len=max_seq_len, micro_batch=micro, prefill_chunk=spec.prefill_chunk, quant=quant)
    kernel_cache = default_cache()
    if spec.dtype == "auto" and quant is not None:
        dtype, dtype_reason = torch.bfloat16, "bfloat16 (the int8 and int4 kernels are vectorized for bfloat16 activations)"
    elif spec.dtype == "auto":
        shape_ = (cfg.intermediate_size, cfg.hidden_size)
        ms = comm.allgather({d: decode_row_ms(shape_, parse_dtype(d), kernel_cache) for d in ("bfloat16", "float32")})
        float32_fits = fits(make_plan(cfg, size, torch.float32, split=split, available=mems, **kw).memory, mems)
        dtype, dtype_reason = pick_dtype({d: sum(m[d] for m in ms) for d in ms[0]}, float32_fits)
    else:
        dtype, dtype_reason = parse_dtype(spec.dtype), "given by --dtype"
    speeds = comm.allgather(layer_speed(cfg, dtype)) if spec.balance == "speed" and split is None else None

    def plan_and_check():
        plan = make_plan(cfg, size, dtype, split=split, available=mems, balance=spec.balance, speeds=speeds, **kw)
        check_fit(plan, lambda: suggestion(cfg, dtype, min(mems), **kw))
        return plan

    plan = agree(comm, plan_and_check)
    t_load = time.perf_counter()
    stage = agree(comm, lambda: load_stage(ckpt, plan.layers[rank], rank == 0, dtype, quant))
    stage.setup_cache(n_slots, max_seq_len)
    load_s = time.perf_counter() - t_load
    kernels = agree(comm, lambda: stage.choose_kernels(None if spec.kernel == "auto" else spec.kernel, kernel_cache))
    ring = (
        LocalRing()
        if size == 1
        else Ring(comm, max(2, len(groups)), micro, micro * spec.prefill_chunk, cfg.hidden_size, dtype,
                  timeout_s=spec.timeout or None, hosts=comm.allgather(socket.gethostname()))
    )
    return Job(comm, rank, size, model_dir, is_demo, cfg, max_seq_len, dtype, dtype_reason, quant, n_slots, micro,
               groups, plan, stage, ring, kernels, threads, t_load - t0, load_s, work)


def _shards_quant(shards: dict, spec: JobSpec, model_dir: str):
    """The quantization ``split --quant`` stored in shards (None if none); a ``--quant`` that
    contradicts it is an error."""
    from mdi_mpi.quant import Quant

    stored = shards.get("quant")
    if stored is None:
        return None
    q = Quant(stored["kind"], stored["group"])
    if spec.quant and (spec.quant != q.kind or spec.quant_group not in (None, q.group)):
        held = f"{q.kind} weights" + (f" (group {q.group})" if q.kind == "int4" else "")
        asked = f"--quant {spec.quant}" + (f" --quant-group {spec.quant_group}" if spec.quant_group else "")
        raise UserError(f"{model_dir} holds {held}, which {asked} contradicts; leave --quant out to use them")
    return q


def check_launcher(size: int) -> None:
    """Refuse to run as one of several independent one-rank jobs: that is what a plain ``srun``
    does when Slurm has no MPI plugin (``MpiDefault=none``), or an ``mpirun`` of another MPI."""
    if size > 1:
        return
    for var in ("SLURM_NTASKS", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE"):
        n = os.environ.get(var, "1")
        if n.isdigit() and int(n) > 1:
            raise UserError(
                f"this process is a 1-rank MPI job, but {var}={n}: the launcher started {n} separate jobs. "
                "Under Slurm use 'srun --mpi=pmi2' (or pmix, per 'srun --mpi=list'), or mpiexec from the "
                "same MPI that mpi4py was built with"
            )


def _who(rank: int | str) -> str:
    """How a failure line names this rank: ``rank R on HOST``."""
    return f"rank {rank} on {socket.gethostname()}"


_reported_fd: int | None = None  # where this rank tells its watcher that it has printed why it failed


def watch_rank() -> None:
    """In a job of several ranks (on Linux), fork before MPI starts: the child returns and runs this
    rank; this process, the one the launcher started and signals, becomes ``watch.py``, which says
    when the child is killed by a signal it could not report itself (the out-of-memory killer's
    SIGKILL, a crash in native code). The child dies with it (``PR_SET_PDEATHSIG``)."""
    global _reported_fd
    rank = os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK")
    size = os.environ.get("PMI_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or "1"
    if sys.platform != "linux" or rank is None or not size.isdigit() or int(size) < 2:
        return
    import ctypes

    read_end, write_end = os.pipe()
    parent = os.getpid()
    child = os.fork()
    if child:
        os.close(write_end)
        os.set_inheritable(read_end, True)
        watcher = str(Path(__file__).with_name("watch.py"))
        os.execv(sys.executable, [sys.executable, "-S", "-E", watcher, str(child), str(read_end), _who(rank)])
    os.close(read_end)
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the watcher
    if os.getppid() != parent:  # the watcher died before that took effect
        os._exit(1)
    _reported_fd = write_end


def _reported() -> None:
    """Tell the watcher (if any) that this rank has printed why it failed."""
    if _reported_fd is not None:
        os.write(_reported_fd, b"x")


def run_command(parser: Parser, body: Callable[[argparse.Namespace, Any], Any], argv: list[str] | None = None) -> int:
    """Entry point of an MPI command: parse on every rank, run ``body(args, comm)``; returns the
    exit code. Bad input: one ``error:`` line from rank 0 and code 2 on every rank. Any other failure
    on any rank, of any kind (an exception, KeyboardInterrupt, SystemExit), prints ``rank R on HOST: ...``
    and aborts the whole job, so that no rank is left waiting."""
    watch_rank()
    from mdi_mpi.transport import abort, world

    comm = world()
    rank = comm.Get_rank()
    signal.signal(signal.SIGTERM, _terminated)  # the launcher forwards it; scancel and time limits send it
    signal.signal(signal.SIGINT, _interrupted)
    try:
        if any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv)):
            if rank == 0:
                parser.print_help()
            return 0
        args = agree(comm, lambda: parser.parse_args(argv))
        body(args, comm)
        return 0
    except AgreedError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except UserError as e:  # found by this rank alone, mid-run: the others must be stopped
        print(f"{'error' if comm.Get_size() == 1 else _who(rank)}: {e}", file=sys.stderr, flush=True)
        _reported()
        if comm.Get_size() > 1:
            abort(comm, EXIT_USAGE)
        return EXIT_USAGE
    except BaseException as e:  # noqa: BLE001 - any failure must end every rank, not hang them
        name = type(e).__name__
        print(f"{_who(rank)}: {name}: {e}" if str(e) else f"{_who(rank)}: {name}", file=sys.stderr, flush=True)
        _reported()
        if os.environ.get("MDI_MPI_DEBUG"):
            import traceback

            traceback.print_exc()
        code = 130 if isinstance(e, KeyboardInterrupt) else 143 if isinstance(e, Terminated) else 1
        if comm.Get_size() > 1:
            abort(comm, code)
        return code


class Terminated(BaseException):
    """SIGTERM arrived: the job was cancelled (``scancel``, a time limit, ``kill``)."""


def _terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: Slurm signals the watcher and this rank alike
    raise Terminated("the job was terminated by SIGTERM; records already written are kept")


def _interrupted(signum, frame) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # once, as for SIGTERM
    raise KeyboardInterrupt
