"""One job set-up for every command that runs the model over MPI (generate, serve, perplexity).

A command parses its flags into a ``JobSpec`` (``cli.job_spec``) and calls ``start``; every rank
then runs the same steps, in this order, each a function below:

1. ``_check``: the launcher, and the command's own checks;
2. ``_threads``: torch threads per rank;
3. ``_model_dir``: the checkpoint, or the demo model (built once per node);
4. ``_open``: the checkpoint or this rank's shard, its config, the context and the quantization;
5. ``_prepare``: rank 0 prepares the command's work (prompts, texts), and so the slot count;
6. ``_dtype``: the dtype (``--dtype auto`` measures both on every rank);
7. ``_plan``: every rank's layers, checked against every rank's memory;
8. load this rank's layers (quantized with ``--quant``) and allocate its KV cache;
9. choose the matmul kernels on this machine;
10. open the ring (of the stages' leaders) and, with ``--tp``, each stage's peers.

Input errors are agreed with one collective per step (``Comm.agree``), so every rank raises
``AgreedError`` and the command exits 2 with one message. Every collective is a typed call of
``transport.Comm``; the commands themselves only call ``Job``'s methods.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mdi_mpi.checkpoint import Checkpoint, load_stage
from mdi_mpi.config import DEFAULT_CONTEXT, ModelConfig
from mdi_mpi.errors import UserError
from mdi_mpi.kernels import Selection, decode_row_ms, default_cache
from mdi_mpi.layout import Layout, Plan, Sizes, fits, pick_dtype, plan_layout
from mdi_mpi.model import TensorSplit
from mdi_mpi.partition import default_micro_batch, slot_groups, split_layers
from mdi_mpi.pipeline import Recorder, run_first, run_member, run_worker
from mdi_mpi.prefix_cache import PrefixCache
from mdi_mpi.probes import available_memory, peak_rss
from mdi_mpi.quant import Quant
from mdi_mpi.scheduler import Inbox, Listener, Planner, Scheduler
from mdi_mpi.shards import read_split, shard_dir, shards_quant
from mdi_mpi.stage import Stage, layer_speed

if TYPE_CHECKING:  # MPI starts when transport is imported: after the watcher's fork and the netmod choice
    from mdi_mpi.grammar import Grammars
    from mdi_mpi.ring import Link
    from mdi_mpi.transport import Comm, Peers


@dataclass(frozen=True)
class JobSpec:
    """A job's model, ranks and scheduling, as typed values (``cli.job_spec`` parses the flags)."""

    model: str | None  # checkpoint or shards directory; None: the demo model
    dtype: torch.dtype | None = None  # None: auto
    kernel: str | None = None  # one kernel forced everywhere; None: measured (auto)
    quant_kernel: str | None = None  # the kernel of int8 weights (w8 or w8a8); None: measured (auto)
    threads: int | None = None  # None: the node's cores divided by its ranks
    layout: Layout = Layout()
    timeout_s: float | None = 600.0  # None: never
    trace: bool = False


@dataclass
class Prepared:
    """What rank 0 prepared in step 5: the command's own items, and how many requests they make."""

    items: Any
    n_requests: int | None  # None: requests arrive over time (a server)
    tokenizer: Any = None


@dataclass
class _Opened:
    """Step 4's outcome on one rank."""

    ckpt: Checkpoint
    tokenizer_dir: str
    split: tuple[int, ...] | None
    max_seq_len: int
    quant: Quant | None
    tp: int = 1  # ranks per stage: --tp, or what split shards were written for
    tp_parts: int | None = None
    sliced: bool = False  # the checkpoint is this rank's --tp shard: it holds its slices already


@dataclass
class Job:
    """A started job on one rank: everything the command's loop needs."""

    comm: Comm
    model_dir: str
    is_demo: bool
    config: ModelConfig
    sizes: Sizes
    dtype: torch.dtype
    dtype_reason: str
    quant: Quant | None
    groups: list[list[int]]
    plan: Plan
    stage: Stage
    ring: Link | None  # None on a stage's ranks other than its leader (--tp)
    peers: Peers | None  # the stage's ranks, with --tp
    kernels: Selection
    threads: int
    startup_s: float
    load_s: float
    checked: Any  # what the command's own check returned on this rank
    prepared: Prepared | None  # rank 0 only
    prefix_cache: bool = True  # requests reuse the KV of prompt prefixes that slots hold

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    @property
    def tp(self) -> int:
        return self.stage.split.size

    @property
    def stage_index(self) -> int:
        """Which pipeline stage this rank holds (a share of, with ``--tp``)."""
        return self.rank // self.tp

    @property
    def leads(self) -> bool:
        """Whether this rank is its stage's rank in the ring (with ``--tp 1``, every rank)."""
        return self.rank % self.tp == 0

    def scheduler(self, eos_ids: list[int], tokenizer, listener: Listener, grammars: Grammars | None = None) -> Scheduler:
        """Rank 0's scheduler for this job's slots, context and prompt chunks, with the prefix
        cache unless it is off (and ``grammars``, for requests with a grammar)."""
        s = self.sizes
        cache = PrefixCache(s.n_slots, s.cache_slots, s.prefill_chunk) if self.prefix_cache else None
        return Scheduler(s.n_slots, s.max_seq_len, s.prefill_chunk, eos_ids, tokenizer, listener,
                         self.config.long_rope_after, cache, grammars)

    def run(self, planner: Planner | None = None, trace: bool = False, all_rows: bool = False,
            inbox: Inbox | None = None) -> Recorder:
        """Run the pipeline on this rank until rank 0 stops the ring, and return where the time went:
        rank 0 feeds ``planner`` (and takes requests from ``inbox``, a server's), the others pass every
        message on. ``all_rows``: every token's logits come back (scoring). Every rank starts its clock
        at the same moment, when all have started."""
        self.comm.barrier()
        rec = Recorder(trace=trace)
        if self.rank == 0:
            run_first(self.stage, planner, self.ring, self.groups, rec, all_rows=all_rows, inbox=inbox, peers=self.peers)
        elif self.leads:
            run_worker(self.stage, self.ring, rec, all_rows=all_rows, peers=self.peers)
        else:
            run_member(self.stage, self.peers, rec)
        return rec

    def gather(self, value: Any) -> list | None:
        """Every rank's ``value`` on rank 0 (None elsewhere): the end-of-job figures."""
        return self.comm.gather(value)

    def placement(self) -> dict:
        """Where this rank sits in the job: host, stage, place in the stage, layers and their bytes."""
        layers = self.plan.layers[self.stage_index]
        return {"rank": self.rank, "host": socket.gethostname(), "stage": self.stage_index,
                "tensor": [self.stage.split.index, self.tp], "layers": [layers.start, layers.stop],
                "weight_bytes": self.stage.weight_bytes(), "kv_cache_bytes": self.stage.cache_bytes()}

    def rank_stats(self, rec: Recorder) -> dict:
        """This rank's share of the run summary (``rec``: the loop's ``pipeline.Recorder``)."""
        return {
            **self.placement(),
            "predicted_peak_bytes": self.plan.memory[self.stage_index]["peak_bytes"],
            "buffer_bytes": (self.ring.buffer_bytes() if self.ring else 0) + (self.peers.buffer_bytes() if self.peers else 0),
            "peak_rss_bytes": peak_rss(),
            "load_s": round(self.load_s, 3),
            "kernels": self.kernels.describe(),
            "quantized_linears": self.stage.quant_summary(),
            "threads": self.threads,
            "combine_s": round(self.peers.combine_s, 4) if self.peers else 0.0,  # in the stage's exchanges (--tp)
            "bytes_sent": (self.ring.bytes_sent if self.ring else 0) + (self.peers.bytes_sent if self.peers else 0),
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
            "tp": self.tp,
            "tp_parts": self.stage.split.parts,
            "slots": self.sizes.n_slots,
            "prefix_cache": self.prefix_cache,
            "cache_slots": self.sizes.cache_slots,
            "micro_batch": self.sizes.micro_batch,
            "max_seq_len": self.sizes.max_seq_len,
            "startup_s": round(self.startup_s, 3),
        }


def start(comm: Comm, spec: JobSpec, prepare: Callable[[ModelConfig, str, int], Prepared],
          check: Callable[[], Any] | None = None, default_max_seq_len: int = DEFAULT_CONTEXT) -> Job:
    """Set the job up on this rank (the steps in the module docstring). ``check()`` runs on every
    rank in step 1 (its value is ``Job.checked``); ``prepare(config, tokenizer_dir, max_seq_len)``
    runs on rank 0 only and returns its ``Prepared``."""
    t0 = time.perf_counter()
    checked = comm.agree(lambda: _check(comm, check))
    threads = _threads(comm, spec)
    model_dir, is_demo = _model_dir(comm, spec)
    opened = comm.agree(lambda: _open(comm, spec, model_dir, default_max_seq_len))
    cfg = opened.ckpt.config
    layout = replace(spec.layout, split=opened.split, tp=opened.tp, tp_parts=opened.tp_parts)  # split shards' own
    tp = layout.tp
    split = TensorSplit(comm.rank % tp, tp, layout.parts)
    work, shape = comm.agree(lambda: _prepare(comm, layout, prepare, opened))
    n_slots, micro = comm.bcast(shape)
    sizes = Sizes(n_slots, opened.max_seq_len, micro, spec.layout.prefill_chunk, spec.layout.cache_slots, tp)
    memory = layout.memory(comm.size) or comm.allgather(available_memory(comm.local_ranks()))
    kernel_cache = default_cache()
    dtype, dtype_reason = _dtype(comm, spec, layout, opened, sizes, memory, kernel_cache)
    speeds = comm.allgather(layer_speed(cfg, dtype)) if layout.balance == "speed" and opened.split is None else None
    plan = comm.agree(lambda: plan_layout(cfg, comm.size, dtype, layout, sizes, opened.quant, memory, speeds))
    t_load = time.perf_counter()
    stage_index = comm.rank // tp
    stage = comm.agree(lambda: load_stage(opened.ckpt, plan.layers[stage_index], stage_index == 0, dtype, opened.quant, split,
                                          opened.sliced))
    stage.setup_cache(n_slots + sizes.cache_slots, sizes.max_seq_len)
    load_s = time.perf_counter() - t_load
    kernels = comm.agree(lambda: stage.choose_kernels(spec.kernel, kernel_cache, spec.quant_kernel))
    groups = slot_groups(n_slots, micro)
    ring_comm = comm.split(split.index) if tp > 1 else comm  # the leaders (index 0) make the ring
    ring = ring_comm.ring(max(2, len(groups)), micro, micro * sizes.prefill_chunk, cfg.hidden_size, dtype,
                          spec.timeout_s) if split.index == 0 else None
    peers = None
    if tp > 1:
        peers = comm.split(stage_index).peers(micro, micro * sizes.prefill_chunk, cfg.hidden_size, dtype, spec.timeout_s,
                                              stage_index * tp)
        stage.set_combine(peers.combine)
    return Job(comm, model_dir, is_demo, cfg, sizes, dtype, dtype_reason, opened.quant, groups, plan, stage, ring, peers,
               kernels, threads, t_load - t0, load_s, checked, work, spec.layout.prefix_cache)


def _check(comm: Comm, check: Callable[[], Any] | None) -> Any:
    check_launcher(comm.size)
    return check() if check is not None else None


def _threads(comm: Comm, spec: JobSpec) -> int:
    threads = spec.threads or max(1, len(os.sched_getaffinity(0)) // comm.local_ranks())
    torch.set_num_threads(threads)
    return threads


def _model_dir(comm: Comm, spec: JobSpec) -> tuple[str, bool]:
    """The checkpoint directory, and whether it is the demo model: rank 0 builds that first; on a
    cluster without a shared cache each node builds its own."""
    if spec.model is not None:
        return os.path.expanduser(spec.model), False
    from mdi_mpi import demo

    if comm.rank == 0:
        demo.demo_model()
    comm.barrier()
    return str(demo.demo_model()), True


def _open(comm: Comm, spec: JobSpec, model_dir: str, default_max_seq_len: int) -> _Opened:
    """Every rank opens its checkpoint itself (each node may have its own copy or its own shard)."""
    layout, split, quant = spec.layout, spec.layout.split, spec.layout.quant
    shards = read_split(model_dir)
    tp, parts = layout.tp, layout.tp_parts
    if shards is not None:
        tp, parts = shards.get("tp", 1), shards.get("tp_parts", 1)
        if layout.tp not in (1, tp) or layout.tp_parts not in (None, parts):
            raise UserError(f"{model_dir} is split for --tp {tp} --tp-parts {parts}: leave --tp and --tp-parts out, "
                            "or split again")
        layout = replace(layout, tp=tp, tp_parts=parts)
    stages = layout.stages(comm.size)
    if shards is not None:
        if shards["ranks"] != comm.size:
            raise UserError(f"{model_dir} is split for {shards['ranks']} ranks, but the job has {comm.size}")
        counts = tuple(len(r) for r in shards["layers"])
        if split is not None and split != counts:
            raise UserError(f"--layers {','.join(map(str, split))} does not match the split's layers "
                            f"{','.join(map(str, counts))}")
        ckpt, tokenizer_dir = Checkpoint(shard_dir(model_dir, comm.rank)), str(shard_dir(model_dir, 0))
        split = counts
        quant = shards_quant(shards, quant, layout.quant_group, model_dir) or quant
    else:
        ckpt, tokenizer_dir = Checkpoint(model_dir), model_dir
    max_seq_len = layout.max_seq_len or ckpt.config.default_context(default_max_seq_len)
    ckpt.config.check_context(max_seq_len)
    TensorSplit(0, layout.tp, layout.parts).check(ckpt.config)
    split_layers(ckpt.config.n_layers, stages, split=list(split) if split else None)  # too many stages, a bad split
    layout.memory(comm.size)  # a --mem list of the wrong length
    return _Opened(ckpt, tokenizer_dir, split, max_seq_len, quant, tp, parts, shards is not None and tp > 1)


def _prepare(comm: Comm, layout: Layout, prepare: Callable[[ModelConfig, str, int], Prepared],
             opened: _Opened) -> tuple[Prepared | None, tuple[int, int] | None]:
    """Rank 0: the command's work, and from it the slot count and micro-batch."""
    if comm.rank != 0:
        return None, None
    work = prepare(opened.ckpt.config, opened.tokenizer_dir, opened.max_seq_len)
    n, size = work.n_requests, layout.stages(comm.size)
    n_slots = layout.slots or (4 * size if n is None else max(size, min(n, 4 * size)))
    micro = layout.micro_batch or default_micro_batch(n_slots, size)
    if micro > n_slots:
        raise UserError(f"--micro-batch {micro} is larger than --slots {n_slots}")
    return work, (n_slots, micro)


def _dtype(comm: Comm, spec: JobSpec, layout: Layout, opened: _Opened, sizes: Sizes, memory: list[int],
           kernel_cache: Path) -> tuple[torch.dtype, str]:
    """The dtype, and why: given by ``--dtype``; bfloat16 with ``--quant``; else measured on every rank."""
    if spec.dtype is not None:
        return spec.dtype, "given by --dtype"
    if opened.quant is not None:
        return torch.bfloat16, "bfloat16 (the int8 and int4 kernels are vectorized for bfloat16 activations)"
    cfg = opened.ckpt.config
    shape = (cfg.intermediate_size, cfg.hidden_size)
    dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32}
    ms = comm.allgather({name: decode_row_ms(shape, d, kernel_cache) for name, d in dtypes.items()})
    float32_plan = plan_layout(cfg, comm.size, torch.float32, layout, sizes, None, memory, check=False)
    return pick_dtype({d: sum(m[d] for m in ms) for d in dtypes}, fits(float32_plan.memory, float32_plan.available))


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
