"""Ranks on separate hosts that talk over TCP: three test hosts on this machine (network and UTS
namespaces on a private bridge, ``scripts/testhosts.sh``), each with its own sshd, and the real
``jobs/hostfile-run.sh`` launching over SSH with a key made for the test. Then the faults a real
network has: a cable pulled, a rank killed on a remote host, the launcher terminated.

MPICH from PyPI talks through UCX, which would use shared memory between processes of one kernel
even across namespaces; ``UCX_TLS=tcp,self`` makes it use TCP, as between real machines (the veth
counters below prove it)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_cli

HARNESS = str(REPO / "scripts" / "testhosts.sh")
PREFIX = "mdit"
TCP = {"UCX_TLS": "tcp,self"}  # PyPI MPICH's UCX netmod: TCP only (see jobs/README.md)
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="test hosts need root (network and UTS namespaces)"),
    pytest.mark.skipif(not (shutil.which("ip") and Path("/usr/sbin/sshd").exists() and shutil.which("ssh")),
                       reason="test hosts need iproute2, openssh-server and openssh-client "
                       "(scripts/setup-network.sh installs them as root)"),
]


class Hosts:
    """Three test hosts h1, h2, h3 (10.77.0.1-3), each running sshd."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.sshd: list[subprocess.Popen] = []
        subprocess.run([HARNESS, "up", "3", PREFIX], check=True, capture_output=True)
        for name in ("hostkey", "id"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)], check=True)
        shutil.copy(tmp / "id.pub", tmp / "authorized_keys")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        for i in (1, 2, 3):
            conf = tmp / f"sshd-{i}.conf"
            conf.write_text(f"ListenAddress 10.77.0.{i}\nHostKey {tmp}/hostkey\nAuthorizedKeysFile {tmp}/authorized_keys\n"
                            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                            "StrictModes no\nUsePAM no\nPidFile none\n")
            log = open(tmp / f"sshd-{i}.log", "w")
            self.sshd.append(subprocess.Popen([HARNESS, "exec", PREFIX, str(i), "/usr/sbin/sshd", "-D", "-e", "-f", str(conf)],
                                              stdout=log, stderr=subprocess.STDOUT))
        self.ssh = tmp / "ssh"  # what hydra launches its proxies with: the test key, no host-key prompts
        self.ssh.write_text(f"#!/bin/sh\nexec ssh -i {tmp}/id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                            "-o BatchMode=yes -o LogLevel=ERROR -o ConnectTimeout=5 -o ServerAliveInterval=2 -o ServerAliveCountMax=2 \"$@\"\n")
        self.ssh.chmod(0o755)
        self.hostfile = tmp / "hosts.txt"
        self.hostfile.write_text("h1\nh2\nh3\n")
        deadline = time.time() + 20
        while self.exec(1, [str(self.ssh), "h3", "true"]).returncode and time.time() < deadline:
            time.sleep(0.2)

    def exec(self, i: int, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run([HARNESS, "exec", PREFIX, str(i), *cmd], capture_output=True, text=True, **kw)

    def launch(self, args: list[str], env: dict | None = None) -> subprocess.Popen:
        """``jobs/hostfile-run.sh ARGS`` started on h1, one rank per host."""
        env = {**os.environ, **TCP, "HYDRA_LAUNCHER_EXEC": str(self.ssh), "HOSTS": str(self.hostfile), "THREADS": "1",
               **(env or {})}
        return subprocess.Popen([HARNESS, "exec", PREFIX, "1", "bash", str(REPO / "jobs" / "hostfile-run.sh"), *args],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def tx_bytes(self, i: int) -> int:
        return int(self.exec(i, ["cat", "/sys/class/net/eth0/statistics/tx_bytes"]).stdout)

    def pids(self, i: int) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", f"{PREFIX}-h{i}"], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def rank_pid(self, i: int) -> int | None:
        """The mdi-mpi rank running on host i."""
        for pid in self.pids(i):
            try:
                if b"mdi_mpi." in Path(f"/proc/{pid}/cmdline").read_bytes() and b"PMI_RANK" in Path(f"/proc/{pid}/environ").read_bytes():
                    return pid
            except OSError:
                continue
        return None

    def left(self) -> list[int]:
        """What still runs on the hosts but their sshd: ranks, hydra's proxies, ssh sessions."""
        out = []
        for i in (1, 2, 3):
            for pid in self.pids(i):
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() != "sshd":
                        out.append(pid)
                except OSError:
                    continue
        return out

    def close(self) -> None:
        for p in self.sshd:
            p.kill()
        subprocess.run([HARNESS, "down", PREFIX], capture_output=True)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    h = Hosts(tmp_path_factory.mktemp("hosts"))
    try:
        yield h
    finally:
        h.close()


def _records(path: Path) -> dict[str, list[int]]:
    return {r["id"]: r["tokens"] for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.timeout(300)
def test_hostfile_over_ssh_on_three_hosts_equals_single_process(hosts, demo_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("def main(\nimport os\nclass Foo:\n")
    single = tmp_path / "single.jsonl"
    res = run_cli(["--prompts-file", str(prompts), "--max-new-tokens", "12", "--output", str(single), "--quiet"])
    assert res.returncode == 0, res.stderr
    out, stats = tmp_path / "hosts.jsonl", tmp_path / "stats.json"
    before = hosts.tx_bytes(2)
    job = hosts.launch(["--prompts-file", str(prompts), "--max-new-tokens", "12", "--output", str(out), "--quiet",
                        "--stats-json", str(stats)])
    _, stderr = job.communicate(timeout=200)
    assert job.returncode == 0, stderr
    assert _records(out) == _records(single)
    per_rank = json.loads(stats.read_text())["per_rank"]
    assert [r["host"] for r in per_rank] == ["h1", "h2", "h3"]
    assert hosts.tx_bytes(2) - before >= per_rank[1]["bytes_sent"]  # rank 1's activations left h2 over its cable


def _start_long_job(hosts, tmp_path, extra: list[str]) -> tuple[subprocess.Popen, Path]:
    """A job with many requests, once two records are written."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("def main(\nimport os\nclass Foo:\n" * 30)
    out = tmp_path / "out.jsonl"
    job = hosts.launch(["--prompts-file", str(prompts), "--max-new-tokens", "16", "--slots", "1", "--output", str(out),
                        "--quiet", *extra])
    deadline = time.time() + 120
    while not (out.is_file() and out.read_text().count("\n") >= 2) and time.time() < deadline and job.poll() is None:
        time.sleep(0.1)
    assert job.poll() is None and out.read_text().count("\n") >= 2, job.stderr.read() if job.poll() is not None else ""
    return job, out


def _ended(hosts, job: subprocess.Popen, out: Path, within: float) -> str:
    """The job ends within ``within`` seconds, non-zero, its records whole, no rank left anywhere."""
    t0 = time.time()
    try:
        _, stderr = job.communicate(timeout=within + 30)
    finally:
        job.kill()
    took = time.time() - t0
    deadline = time.time() + 10
    while hosts.left() and time.time() < deadline:
        time.sleep(0.2)
    left = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in hosts.left()}
    for pid in left:
        os.kill(pid, 9)
    assert not left, f"processes left on the hosts: {left}\n{stderr}"
    assert job.returncode != 0 and took < within, (job.returncode, took, stderr)
    records = [json.loads(line) for line in out.read_text().splitlines()]  # every line is a whole record
    assert 2 <= len(records) < 90
    return stderr


@pytest.mark.timeout(300)
def test_a_rank_killed_on_a_remote_host_ends_the_job(hosts, demo_dir, tmp_path):
    job, out = _start_long_job(hosts, tmp_path, [])
    os.kill(hosts.rank_pid(3), 9)  # the OOM killer on h3
    _ended(hosts, job, out, within=10)


@pytest.mark.timeout(300)
def test_sigterm_to_the_launcher_ends_every_host(hosts, demo_dir, tmp_path):
    job, out = _start_long_job(hosts, tmp_path, [])
    launcher = [p for p in hosts.pids(1) if Path(f"/proc/{p}/comm").read_text().strip() == "mpiexec"]
    assert launcher
    os.kill(launcher[0], 15)
    stderr = _ended(hosts, job, out, within=10)
    assert re.search(r"rank \d on h\d: Terminated: the job was terminated by SIGTERM", stderr), stderr


@pytest.mark.timeout(300)
def test_a_pulled_cable_ends_the_job_after_the_timeout(hosts, demo_dir, tmp_path):
    job, out = _start_long_job(hosts, tmp_path, ["--timeout", "3"])
    subprocess.run([HARNESS, "link", PREFIX, "2", "down"], check=True)
    try:
        stderr = _ended(hosts, job, out, within=3 + 10)
    finally:
        subprocess.run([HARNESS, "link", PREFIX, "2", "up"], check=True)
    assert re.search(r"rank \d on h\d: TimeoutError: (no message from rank \d on h\d|rank \d on h\d has not taken)", stderr), stderr
