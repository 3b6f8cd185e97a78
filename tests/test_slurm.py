"""A real Slurm on localhost: munge, slurmctld and three slurmd emulating three nodes.

Submits the real ``jobs/pi-cluster.sbatch`` on 3 nodes and checks the tokens against a
single-process run; then the ``srun --mpi=none`` case (what ``MpiDefault=none`` gives), which must
stop with a clear error. Every daemon started here is stopped by PID. Skipped, with the reason,
where Slurm is not installed or we are not root (``scripts/setup-system.sh slurm`` installs it in CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import REPO
from support.hosts import Hosts
from support.launch import run_cli

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo")
missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.mpi,
    pytest.mark.skipif(bool(missing), reason=f"Slurm is not installed ({', '.join(missing)} missing); "
                       "scripts/setup-system.sh slurm installs it as root"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the Slurm test starts daemons as root"),
]

SLURM_CONF = """\
{where}
AuthType=auth/munge
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={tmp}/state
SlurmdSpoolDir={tmp}/spool/%n
SlurmctldPidFile={tmp}/slurmctld.pid
SlurmdPidFile={tmp}/slurmd-%n.pid
SlurmctldLogFile={tmp}/slurmctld.log
SlurmdLogFile={tmp}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=pmi2
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
InactiveLimit=0
KillWait=5
MinJobAge=5
NodeName={nodes} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes={nodes_only} Default=YES MaxTime=INFINITE State=UP
"""
# Three nodes on localhost, told apart by their ports.
LOCAL = dict(where="ClusterName=mditest\nSlurmctldHost=localhost\nSlurmctldPort=16817",
             nodes="node[1-3] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17003]", nodes_only="node[1-3]")
# Three test hosts h1-h3 with their own addresses (scripts/testhosts.sh), the controller on h1.
HOSTS = dict(where="ClusterName=mdinet\nSlurmctldHost=h1\nSlurmctldPort=16818\nSlurmdPort=16819",
             nodes="h[1-3]", nodes_only="h[1-3]")


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class Cluster:
    """Slurm daemons started by this test, stopped by PID."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        (tmp / "state").mkdir()
        for i in (1, 2, 3):
            (tmp / "spool" / f"node{i}").mkdir(parents=True)
        self.conf = tmp / "slurm.conf"
        self.conf.write_text(SLURM_CONF.format(tmp=tmp, **LOCAL))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        self._munge()
        log = open(self.tmp / "daemons.out", "w")
        self.procs.append(subprocess.Popen([_exe("slurmctld"), "-D", "-i", "-f", str(self.conf)],
                                           env=self.env, stdout=log, stderr=subprocess.STDOUT))
        time.sleep(1)
        for i in (1, 2, 3):
            self.procs.append(subprocess.Popen([_exe("slurmd"), "-D", "-N", f"node{i}", "-f", str(self.conf)],
                                               env=self.env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run([_exe("sinfo"), "-h", "-o", "%T %D"], env=self.env, capture_output=True, text=True)
            if out.stdout.split() == ["idle", "3"]:
                return
            time.sleep(1)
        raise RuntimeError(f"the Slurm nodes did not come up: {out.stdout} {out.stderr}\n{self.logs()}")

    def _munge(self) -> None:
        """Start munged as the munge user unless one already answers."""
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create"], check=True, capture_output=True)
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        self.procs.append(subprocess.Popen(["runuser", "-u", "munge", "--", _exe("munged"), "-F"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for _ in range(50):
            if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("munged did not start")

    def sbatch(self, script: Path, nodes: int, export: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
        """Submit and wait for the job to end."""
        exports = ",".join(["ALL"] + [f"{k}={v}" for k, v in export.items()])
        cmd = [_exe("sbatch"), "--wait", f"--nodes={nodes}", "--cpus-per-task=1", "--time=5",
               f"--output={self.tmp}/job-%j.out", f"--export={exports}", str(script)]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.tmp)

    def job_output(self, submitted: subprocess.CompletedProcess) -> str:
        words = submitted.stdout.split()
        log = self.tmp / f"job-{words[-1]}.out" if words else None
        return log.read_text() if log is not None and log.exists() else ""

    def logs(self) -> str:
        return "\n".join(f.read_text()[-3000:] for f in self.tmp.glob("*.log")) + (self.tmp / "daemons.out").read_text()[-3000:]

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _tokens(path: Path) -> dict[str, list[int]]:
    return {r["id"]: r["tokens"] for r in map(json.loads, path.read_text().splitlines())}


def _reference(tmp_path: Path, flags: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Three prompts, and their 12 greedy tokens from one process at one thread (with ``flags``), as
    the jobs' ranks run."""
    prompts, single = tmp_path / "prompts.txt", tmp_path / "single.jsonl"
    prompts.write_text("Once upon a time\nThe cluster of Raspberry Pis\nHello, world!\n")
    res = run_cli(["--threads", "1", "--prompts-file", str(prompts), "--max-new-tokens", "12", "--output", str(single),
                   "--quiet", *flags])
    assert res.returncode == 0, res.stderr
    return prompts, single


@pytest.mark.timeout(600)
def test_pi_cluster_job_on_three_nodes_matches_single_process(cluster, demo_dir, tmp_path):
    prompts, single = _reference(tmp_path)
    out = tmp_path / "slurm.jsonl"
    job = cluster.sbatch(REPO / "jobs" / "pi-cluster.sbatch", 3, {
        "MDI_MPI_HOME": str(REPO), "VENV": str(Path(sys.executable).parent.parent), "PROMPTS": str(prompts),
        "OUTPUT": str(out), "MAX_NEW_TOKENS": "12", "MDI_MPI_CACHE": os.environ["MDI_MPI_CACHE"],
    })
    log = cluster.job_output(job)
    assert job.returncode == 0, f"{job.stdout}{job.stderr}\n{log}\n{cluster.logs()}"
    assert "3 ranks" in log and "rank 2: layers" in log, log
    assert _tokens(out) == _tokens(single)


@pytest.mark.timeout(600)
def test_a_stage_held_by_two_nodes_matches_single_process(cluster, demo_dir, tmp_path):
    prompts, single = _reference(tmp_path, ("--tp-parts", "2"))
    out = tmp_path / "slurm.jsonl"
    job = cluster.sbatch(REPO / "jobs" / "pi-cluster.sbatch", 2, {
        "MDI_MPI_HOME": str(REPO), "VENV": str(Path(sys.executable).parent.parent), "PROMPTS": str(prompts),
        "OUTPUT": str(out), "MAX_NEW_TOKENS": "12", "MDI_MPI_CACHE": os.environ["MDI_MPI_CACHE"], "EXTRA_ARGS": "--tp 2",
    })
    log = cluster.job_output(job)
    assert job.returncode == 0, f"{job.stdout}{job.stderr}\n{log}\n{cluster.logs()}"
    assert "2 ranks" in log and "rank 1: layers 0-3" in log, log  # both ranks hold every layer, half of each
    assert _tokens(out) == _tokens(single)


@pytest.mark.timeout(300)
def test_srun_without_mpi_plugin_gives_a_clear_error(cluster, demo_dir, tmp_path):
    job = cluster.sbatch(REPO / "jobs" / "pi-cluster.sbatch", 3, {
        "MDI_MPI_HOME": str(REPO), "VENV": str(Path(sys.executable).parent.parent), "SRUN_MPI": "none",
        "OUTPUT": str(tmp_path / "x.jsonl"), "MDI_MPI_CACHE": os.environ["MDI_MPI_CACHE"],
    })
    log = cluster.job_output(job)
    assert job.returncode != 0
    assert "the launcher started 3 separate jobs" in log and "srun --mpi=pmi2" in log, log
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.timeout(400)
def test_scaling_sweep_collects_one_summary_per_node_count(cluster, demo_dir, tmp_path):
    """The sweep script, with jobs launched by MPICH's mpiexec inside the allocation."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\n")
    results = tmp_path / "sweep.jsonl"
    env = {**cluster.env, "MAX_NODES": "3", "RESULTS": str(results), "PROMPTS": str(prompts),
           "MAX_NEW_TOKENS": "4", "VENV": str(Path(sys.executable).parent.parent), "MDI_MPI_CACHE": os.environ["MDI_MPI_CACHE"],
           "SBATCH_ARGS": "--cpus-per-task=1 --time=5", "LAUNCHER": "mpiexec"}  # the other launcher
    res = subprocess.run(["bash", str(REPO / "jobs" / "scaling-sweep.sh")], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=380)
    assert res.returncode == 0, res.stdout + res.stderr
    runs = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["ranks"] for r in runs] == [1, 2, 3]
    assert all(r["generated_tokens"] == 12 for r in runs)


@pytest.mark.timeout(300)
def test_serve_job_answers_then_scancel_drains_it(cluster, demo_dir, tmp_path):
    """The real ``jobs/serve.sbatch`` on 3 nodes: it answers as a single process would, and
    ``scancel`` drains it (rank 0 stops the ring and says so) instead of killing it."""
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    single = tmp_path / "single.jsonl"
    res = run_cli(["--threads", "1", "--prompt", "def main(", "--max-new-tokens", "12", "--output", str(single), "--quiet"])
    assert res.returncode == 0, res.stderr
    exports = ",".join(["ALL", f"MDI_MPI_HOME={REPO}", f"VENV={Path(sys.executable).parent.parent}", f"PORT={port}",
                        f"MDI_MPI_CACHE={os.environ['MDI_MPI_CACHE']}", "DRAIN_TIMEOUT=3"])
    sub = subprocess.run([_exe("sbatch"), "--parsable", "--nodes=3", "--cpus-per-task=1", "--time=5",
                          f"--output={cluster.tmp}/serve-%j.out", f"--export={exports}", str(REPO / "jobs" / "serve.sbatch")],
                         env=cluster.env, capture_output=True, text=True, cwd=cluster.tmp, timeout=30)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    log = cluster.tmp / f"serve-{job_id}.out"
    try:
        deadline = time.time() + 120
        while "ready" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
            time.sleep(0.5)
        assert "3 ranks" in log.read_text(), log.read_text() + cluster.logs()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"prompt": "def main(", "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == json.loads(single.read_text())["text"]
    finally:
        subprocess.run([_exe("scancel"), job_id], env=cluster.env, timeout=30)
    deadline = time.time() + 60
    while "stopped after" not in log.read_text() and time.time() < deadline:
        time.sleep(0.5)
    text = log.read_text()
    assert "draining" in text and "stopped after" in text and "rank 1:" not in text, text


class NetCluster(Cluster):
    """The same daemons on three test hosts (network and UTS namespaces, ``scripts/testhosts.sh``):
    slurmctld on h1, one slurmd per host, every rank on its own host and MPI over TCP between them."""

    def __init__(self, tmp: Path, hosts):
        tmp.mkdir()
        super().__init__(tmp)
        self.hosts = hosts
        self.conf.write_text(SLURM_CONF.format(tmp=tmp, **HOSTS))
        for i in (1, 2, 3):
            (tmp / "spool" / f"h{i}").mkdir(parents=True, exist_ok=True)

    def _on(self, i: int, cmd: list[str]) -> list[str]:
        return [self.hosts_harness, "exec", self.hosts.prefix, str(i), *cmd]

    @property
    def hosts_harness(self) -> str:
        return str(REPO / "scripts" / "testhosts.sh")

    def start(self) -> None:
        self._munge()
        log = open(self.tmp / "daemons.out", "w")
        self.procs.append(subprocess.Popen(self._on(1, [_exe("slurmctld"), "-D", "-i", "-f", str(self.conf)]),
                                           env=self.env, stdout=log, stderr=subprocess.STDOUT))
        time.sleep(1)
        for i in (1, 2, 3):
            self.procs.append(subprocess.Popen(self._on(i, [_exe("slurmd"), "-D", "-N", f"h{i}", "-f", str(self.conf)]),
                                               env=self.env, stdout=log, stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-o", "%T %D"])
            if out.stdout.split() == ["idle", "3"]:
                return
            time.sleep(1)
        raise RuntimeError(f"the Slurm nodes did not come up: {out.stdout} {out.stderr}\n{self.logs()}")

    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        """A Slurm command on h1, the login node."""
        return subprocess.run(self._on(1, [_exe(cmd[0]), *cmd[1:]]), env=self.env, capture_output=True, text=True,
                              cwd=self.tmp, **kw)


@pytest.fixture(scope="module")
def net_cluster(tmp_path_factory):
    if not Path("/usr/sbin/sshd").exists() or shutil.which("ip") is None:
        pytest.skip("the test hosts need iproute2 and openssh-server (scripts/setup-system.sh network installs them)")
    tmp = tmp_path_factory.mktemp("netslurm")
    hosts = Hosts(tmp / "hosts", "mdis")
    c = NetCluster(tmp / "slurm", hosts)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        hosts.close()


def _submit(cluster: NetCluster, export: dict[str, str]) -> str:
    exports = ",".join(["ALL", "FI_PROVIDER=tcp", f"MDI_MPI_HOME={REPO}", f"VENV={Path(sys.executable).parent.parent}",
                        f"MDI_MPI_CACHE={os.environ['MDI_MPI_CACHE']}"] + [f"{k}={v}" for k, v in export.items()])
    sub = cluster.run(["sbatch", "--parsable", "--nodes=3", "--cpus-per-task=1", "--time=5",
                       f"--output={cluster.tmp}/net-%j.out", f"--export={exports}", str(REPO / "jobs" / "pi-cluster.sbatch")])
    assert sub.returncode == 0, sub.stderr
    return sub.stdout.strip().split(";")[0]


def _wait_done(cluster: NetCluster, job_id: str, timeout: float) -> float:
    """Seconds until the job has left the queue."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if not cluster.run(["squeue", "-h", "-j", job_id]).stdout.strip():
            return time.time() - t0
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still queued after {timeout} s\n{cluster.logs()}")


@pytest.mark.timeout(400)
@pytest.mark.netns
def test_pi_cluster_job_on_three_hosts_over_tcp_matches_single_process(net_cluster, demo_dir, tmp_path):
    prompts, single = _reference(tmp_path)
    out, stats = tmp_path / "net.jsonl", tmp_path / "stats.json"
    before = net_cluster.hosts.tx_bytes(2)
    job_id = _submit(net_cluster, {"PROMPTS": str(prompts), "OUTPUT": str(out), "MAX_NEW_TOKENS": "12", "STATS": str(stats)})
    _wait_done(net_cluster, job_id, 300)
    log = (net_cluster.tmp / f"net-{job_id}.out").read_text()
    assert out.exists(), log + net_cluster.logs()
    assert _tokens(out) == _tokens(single), log
    per_rank = json.loads(stats.read_text())["per_rank"]
    assert [r["host"] for r in per_rank] == ["h1", "h2", "h3"]
    assert net_cluster.hosts.tx_bytes(2) - before >= per_rank[1]["bytes_sent"]  # over h2's cable, not shared memory


@pytest.mark.timeout(400)
@pytest.mark.netns
def test_scancel_ends_the_job_on_every_host_and_keeps_its_records(net_cluster, demo_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main(\nimport os\nclass Foo:\n" * 40)
    out = tmp_path / "net.jsonl"
    job_id = _submit(net_cluster, {"PROMPTS": str(prompts), "OUTPUT": str(out), "MAX_NEW_TOKENS": "16",
                                   "EXTRA_ARGS": "--slots 1"})
    deadline = time.time() + 200
    while not (out.is_file() and out.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.2)
    assert out.read_text().count("\n") >= 2, (net_cluster.tmp / f"net-{job_id}.out").read_text()
    assert net_cluster.run(["scancel", job_id]).returncode == 0
    took = _wait_done(net_cluster, job_id, 60)
    assert took < 10, took
    log = (net_cluster.tmp / f"net-{job_id}.out").read_text()
    assert re.search(r"rank \d on h\d: Terminated: the job was terminated by SIGTERM", log), log
    records = [json.loads(line) for line in out.read_text().splitlines()]  # every line a whole record
    assert 2 <= len(records) < 120
    for i in (1, 2, 3):  # no rank left on any host
        assert net_cluster.hosts.rank_pid(i) is None


@pytest.mark.timeout(300)
def test_plain_srun_with_pypi_mpich_works_on_the_first_try(cluster, demo_dir, tmp_path):
    """A user's own job script: exactly ``srun --mpi=pmi2 python -m mdi_mpi.generate`` with PyPI's
    MPICH and no netmod set. The program picks the OFI netmod itself (UCX's addresses can overflow
    Slurm's 1024-byte PMI reads and hang MPI_Init) and says so in one line."""
    prompts, single = _reference(tmp_path)
    out = tmp_path / "srun.jsonl"
    script = tmp_path / "own.sbatch"
    script.write_text(f"""#!/bin/bash
unset MPIR_CVAR_CH4_NETMOD
source {Path(sys.executable).parent}/activate
export OMP_NUM_THREADS=1
srun --mpi=pmi2 python -m mdi_mpi.generate --threads 1 --prompts-file {prompts} --max-new-tokens 12 --output {out} --quiet
""")
    job = cluster.sbatch(script, 3, {"MDI_MPI_CACHE": os.environ["MDI_MPI_CACHE"]})
    log = cluster.job_output(job)
    assert job.returncode == 0, f"{job.stdout}{job.stderr}\n{log}\n{cluster.logs()}"
    assert log.count("MPIR_CVAR_CH4_NETMOD=ofi") == 1, log  # one line, from rank 0
    assert "3 ranks" in log, log
    assert _tokens(out) == _tokens(single)
