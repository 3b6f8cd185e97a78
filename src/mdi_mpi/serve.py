"""Command line: ``mpirun -np N python -m mdi_mpi.serve [options]``: an OpenAI-compatible server.

Every rank sets the job up as ``generate`` does (``job.py``). Rank 0's main thread then runs the
pipeline loop, taking requests as they arrive from the HTTP server, which runs in a second thread
(``api.py``); the other ranks run the same worker loop as for ``generate``. SIGINT or SIGTERM (to the
launcher, which forwards it, or from ``scancel``) drains: no new requests, the ones in flight finish
(up to ``--drain-timeout``, then they are cancelled), the ring stops and every rank exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING

from mdi_mpi.cli import Parser, add_job_arguments
from mdi_mpi.errors import UserError
from mdi_mpi.job import Job, JobSpec, Prepared, start
from mdi_mpi.process import run_command

if TYPE_CHECKING:
    from mdi_mpi.transport import Comm

HEARTBEAT_S = 5.0  # a quiet ring carries a heartbeat this often (or 4 per --timeout, if that is shorter)
LOOPBACK = ("localhost",)

EXAMPLES = """\
examples:
  python -m mdi_mpi.serve                                  # demo model, one process, http://127.0.0.1:8000/v1
  mpirun -np 3 python -m mdi_mpi.serve --model ~/Qwen3-1.7B --quant int8 --host 0.0.0.0 --api-key SECRET
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'

endpoints: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health (503 until
every rank has loaded), GET /metrics (Prometheus).
"""


def build_parser() -> Parser:
    p = Parser(
        prog="python -m mdi_mpi.serve",
        description="Serve a model split across MPI ranks over an OpenAI-compatible HTTP API: many clients share "
        "the pipeline's slots (continuous batching). Run under mpirun/srun for several ranks.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_job_arguments(p)
    s = p.add_argument_group("server (on rank 0)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only); "
                   "any other address needs --api-key or --no-auth")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0: any free port, printed at start)")
    s.add_argument("--api-key", metavar="KEY", default=os.environ.get("MDI_MPI_API_KEY") or None,
                   help="clients must send 'Authorization: Bearer KEY' (default: $MDI_MPI_API_KEY; unset: no key)")
    s.add_argument("--no-auth", action="store_true", help="allow a non-loopback --host without an API key")
    s.add_argument("--served-model-name", metavar="NAME", help="the model's name in the API (default: the model "
                   "directory's name, or mdi-mpi-demo)")
    s.add_argument("--max-waiting", type=int, default=64, metavar="W", help="sequences that may wait for a slot "
                   "(each choice of a request counts); past that, requests get 503 with Retry-After (default: 64)")
    s.add_argument("--drain-timeout", type=float, default=30.0, metavar="S", help="on SIGINT or SIGTERM, let requests "
                   "in flight finish for up to S seconds, then cancel them (default: 30)")
    return p


def check_server_flags(host: str, port: int, api_key: str | None, no_auth: bool, max_waiting: int,
                       drain_timeout: float) -> None:
    """Raise ``UserError`` for server flags that are out of range or unsafe."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be from 0 to 65535, got {port}")
    if max_waiting < 0:
        raise UserError(f"--max-waiting must be 0 or more, got {max_waiting}")
    if not drain_timeout >= 0:
        raise UserError(f"--drain-timeout must be 0 or more seconds, got {drain_timeout}")
    if api_key is not None and not api_key:
        raise UserError("--api-key is empty")
    if not (_is_loopback(host) or api_key or no_auth):
        raise UserError(f"--host {host} lets other machines in: give --api-key KEY (or set MDI_MPI_API_KEY), "
                        "or --no-auth to serve without a key")


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def run(args: argparse.Namespace, spec: JobSpec, comm: Comm) -> None:
    """Serve on this rank until drained."""
    def check() -> _HTTPThread | None:
        """Every rank checks the server flags; rank 0 binds and answers ``/health`` with 503 while
        the model loads."""
        check_server_flags(args.host, args.port, args.api_key, args.no_auth, args.max_waiting, args.drain_timeout)
        if comm.rank != 0:
            return None
        http = _HTTPThread(_bind(args.host, args.port), args.api_key, args.drain_timeout)
        http.start()
        return http

    if comm.rank != 0:  # the launcher forwards SIGINT/SIGTERM to every rank; only rank 0 drains, then stops the ring
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    job = start(comm, spec, _prepare, check=check)
    placements = job.gather(job.placement())
    if job.rank == 0:
        _serve(job, job.checked, args, spec.timeout_s, placements)
    else:
        job.run()


def _prepare(config, tokenizer_dir: str, max_seq_len: int) -> Prepared:
    """Rank 0: one tokenizer for the scheduler (main thread) and one for the HTTP thread, since a fast
    tokenizer must not be shared between threads; and the stop tokens."""
    from mdi_mpi.requests import load_tokenizer, stop_token_ids

    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer is None:
        raise UserError(f"{tokenizer_dir} has no tokenizer, which the server needs")
    if not getattr(tokenizer, "chat_template", None):
        print("note: this tokenizer has no chat template, so /v1/chat/completions answers 400", file=sys.stderr)
    eos = stop_token_ids(config.eos_token_ids, tokenizer_dir, tokenizer)
    return Prepared((load_tokenizer(tokenizer_dir), eos), None, tokenizer)


class _HTTPThread:
    """uvicorn serving the API in its own thread, on a socket bound before the model loads (so that
    ``/health`` answers 503 meanwhile)."""

    def __init__(self, sock: socket.socket, api_key: str | None, drain_timeout: float):
        import uvicorn

        from mdi_mpi.api import API

        self.sock = sock
        self.api = API(api_key)
        config = uvicorn.Config(self.api.app(), log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=drain_timeout + 10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._run, name="http", daemon=True)
        self.on_exit = None  # called once uvicorn has stopped

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        self.server.run(sockets=[self.sock])
        if self.on_exit is not None:
            self.on_exit()

    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _serve(job: Job, http: _HTTPThread, args: argparse.Namespace, timeout: float | None, info: list[dict]) -> None:
    """Rank 0: answer requests until a signal drains the server."""
    from mdi_mpi import demo
    from mdi_mpi.api import Bridge, Settings
    from mdi_mpi.grammar import Grammars
    from mdi_mpi.metrics import Metrics, Ranks
    from mdi_mpi.scheduler import Inbox, Scheduler

    http_tokenizer, eos = job.prepared.items
    heartbeat = min(HEARTBEAT_S, timeout / 4) if timeout else HEARTBEAT_S
    inbox = Inbox(args.max_waiting, heartbeat)
    ranks = Ranks(info, job.ring.stats)
    sched: Scheduler | None = None
    metrics = Metrics(lambda: sched.running if sched else 0, lambda: inbox.waiting, ranks)
    bridge = Bridge(inbox, metrics)
    grammars = Grammars(http_tokenizer, job.config.vocab_size, eos)  # first used by the HTTP thread (every grammar is checked there first)
    sched = job.scheduler(eos, job.prepared.tokenizer, bridge, grammars)
    name = args.served_model_name or ("mdi-mpi-demo" if job.is_demo else os.path.basename(os.path.normpath(job.model_dir)))
    settings = Settings(name, job.sizes.max_seq_len, job.config.vocab_size, job.sizes.n_slots, len(job.groups))
    http.on_exit = inbox.close
    draining = threading.Event()

    def drain(signum, frame) -> None:
        if draining.is_set():
            return
        draining.set()
        print(f"draining: no new requests; those in flight have {args.drain_timeout:g} s to finish", file=sys.stderr,
              flush=True)
        inbox.stop_accepting()
        http.server.should_exit = True
        timer = threading.Timer(args.drain_timeout, inbox.abort)
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGINT, drain)
    signal.signal(signal.SIGTERM, drain)
    http.api.open(settings, http_tokenizer, grammars, inbox, bridge, metrics, ranks, lambda: sched.running)
    if job.is_demo:
        print(demo.DEMO_NOTE, file=sys.stderr)
    print(f"serving {name} at {http.address()}/v1 on {socket.gethostname()} ({job.size} ranks, {job.sizes.n_slots} slots, micro-batch "
          f"{job.sizes.micro_batch}, {str(job.dtype).removeprefix('torch.')}); ready", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        job.run(sched, inbox=inbox)
    except BaseException as e:  # noqa: BLE001 - clients in flight get an error, then the job is aborted
        bridge.fail_all(f"the server failed: {type(e).__name__}: {e}")
        raise
    http.thread.join(timeout=5)
    print(f"stopped after {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (aborts the whole job on an unexpected failure)."""
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
