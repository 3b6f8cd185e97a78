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
from support.hosts import HARNESS, Hosts
from support.launch import run_cli

PREFIX = "mdit"
pytestmark = [
    pytest.mark.netns,
    pytest.mark.mpi,
    pytest.mark.skipif(os.geteuid() != 0, reason="test hosts need root (network and UTS namespaces)"),
    pytest.mark.skipif(not (shutil.which("ip") and Path("/usr/sbin/sshd").exists() and shutil.which("ssh")),
                       reason="test hosts need iproute2, openssh-server and openssh-client "
                       "(scripts/setup-system.sh network installs them as root)"),
]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    h = Hosts(tmp_path_factory.mktemp("hosts"), PREFIX)
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
    res = run_cli(["--threads", "1", "--prompts-file", str(prompts), "--max-new-tokens", "12", "--output", str(single), "--quiet"])
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


def _start_long_job(hosts, tmp_path, extra: list[str], env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """A job with many requests, once two records are written."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("def main(\nimport os\nclass Foo:\n" * 30)
    out = tmp_path / "out.jsonl"
    job = hosts.launch(["--prompts-file", str(prompts), "--max-new-tokens", "16", "--slots", "1", "--output", str(out),
                        "--quiet", *extra], env)
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
    stderr = _ended(hosts, job, out, within=10)
    assert "rank 2 on h3: killed by SIGKILL (sent by the kernel's out-of-memory killer" in stderr, stderr


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


def _two_hosts(tmp_path) -> dict:
    """The launcher's environment for a job on h1 and h2 only."""
    hostfile = tmp_path / "two.txt"
    hostfile.write_text("h1\nh2\n")
    return {"HOSTS": str(hostfile)}


@pytest.mark.timeout(300)
def test_a_stage_held_by_two_hosts_equals_single_process(hosts, demo_dir, tmp_path):
    """--tp 2 across h1 and h2: the tokens of one process with the same --tp-parts, and the partial
    products crossed h2's cable."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("def main(\nimport os\nclass Foo:\n")
    flags = ["--prompts-file", str(prompts), "--max-new-tokens", "12", "--tp-parts", "2", "--dtype", "bfloat16", "--quiet"]
    single = tmp_path / "single.jsonl"
    res = run_cli(["--threads", "1", *flags, "--output", str(single)])
    assert res.returncode == 0, res.stderr
    out, stats = tmp_path / "hosts.jsonl", tmp_path / "stats.json"
    before = hosts.tx_bytes(2)
    job = hosts.launch([*flags, "--tp", "2", "--output", str(out), "--stats-json", str(stats)], _two_hosts(tmp_path))
    _, stderr = job.communicate(timeout=200)
    assert job.returncode == 0, stderr
    assert _records(out) == _records(single)
    per_rank = json.loads(stats.read_text())["per_rank"]
    assert [(r["host"], r["tensor"]) for r in per_rank] == [("h1", [0, 2]), ("h2", [1, 2])]
    assert hosts.tx_bytes(2) - before >= per_rank[1]["bytes_sent"] > 0


@pytest.mark.timeout(300)
def test_a_pulled_cable_to_a_tensor_rank_ends_the_job(hosts, demo_dir, tmp_path):
    job, out = _start_long_job(hosts, tmp_path, ["--tp", "2", "--timeout", "3"], _two_hosts(tmp_path))
    subprocess.run([HARNESS, "link", PREFIX, "2", "down"], check=True)  # h2 holds rank 1, half of the only stage
    try:
        stderr = _ended(hosts, job, out, within=3 + 10)
    finally:
        subprocess.run([HARNESS, "link", PREFIX, "2", "up"], check=True)
    assert re.search(r"rank 0 on h1: TimeoutError: .* among the stage's ranks 0-1 on h1, h2", stderr), stderr


@pytest.mark.timeout(300)
def test_emulated_gigabit_links_give_the_same_tokens(demo_dir, tmp_path):
    """The link emulator (scripts/linkemu.py: netem in user space, for kernels without it) at the
    gigabit profile, 2 hosts: the tokens of a single process, and the link's delay measurable."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("def main(\nimport os\n")
    single = tmp_path / "single.jsonl"
    assert run_cli(["--threads", "1", "--prompts-file", str(prompts), "--max-new-tokens", "12", "--output", str(single), "--quiet"]).returncode == 0
    h = Hosts(tmp_path / "hosts", "mdig", n=2, profile="gigabit")
    try:
        rtt = h.exec(1, [sys.executable, "-c", RTT, "10.77.0.2"])
        out = tmp_path / "emu.jsonl"
        job = h.launch(["--prompts-file", str(prompts), "--max-new-tokens", "12", "--output", str(out), "--quiet"])
        _, stderr = job.communicate(timeout=200)
    finally:
        h.close()
    assert job.returncode == 0, stderr
    assert _records(out) == _records(single)
    assert 0.4e-3 <= float(rtt.stdout) < 5e-3, rtt  # two crossings of a 0.2 ms link, and the emulator's own time


RTT = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
t0 = time.perf_counter()
try:
    s.connect((sys.argv[1], 9))  # nothing listens: the refusal comes back after one round trip
except ConnectionRefusedError:
    pass
print(time.perf_counter() - t0)
"""
