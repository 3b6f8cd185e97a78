"""Test hosts for the network and Slurm tests and ``bench_links``: ``scripts/testhosts.sh``
namespaces, an sshd on each, a key made for them, and ``jobs/hostfile-run.sh`` launched on h1 over
SSH with TCP forced (``UCX_TLS=tcp,self``: PyPI MPICH's UCX would use shared memory between
namespaces of one kernel)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from support import REPO

HARNESS = str(REPO / "scripts" / "testhosts.sh")
# PyPI MPICH's netmods, each forced onto TCP (see jobs/README.md); UCX is hydra's default.
NETMODS = {"ucx": {"UCX_TLS": "tcp,self"}, "ofi": {"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp"}}


class Hosts:
    """``n`` test hosts h1..hn (10.77.0.1..n), each running sshd; with ``profile``, their links are
    emulated by ``scripts/linkemu.py`` (none, gigabit, fast-ethernet, wifi) instead of a bridge."""

    def __init__(self, tmp: Path, prefix: str, n: int = 3, profile: str | None = None):
        self.tmp, self.prefix, self.n = tmp, prefix, n
        tmp.mkdir(parents=True, exist_ok=True)
        self.sshd: list[subprocess.Popen] = []
        self.emulator: subprocess.Popen | None = None
        subprocess.run([HARNESS, "up", str(n), prefix, *(["tap"] if profile else [])], check=True, capture_output=True)
        if profile:
            self.emulator = subprocess.Popen([sys.executable, str(REPO / "scripts" / "linkemu.py"), prefix, str(n), profile],
                                             stdout=subprocess.PIPE, text=True)
            assert self.emulator.stdout.readline().strip() == "ready"
        for name in ("hostkey", "id"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / name)], check=True)
        shutil.copy(tmp / "id.pub", tmp / "authorized_keys")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        for i in range(1, self.n + 1):
            conf = tmp / f"sshd-{i}.conf"
            conf.write_text(f"ListenAddress 10.77.0.{i}\nHostKey {tmp}/hostkey\nAuthorizedKeysFile {tmp}/authorized_keys\n"
                            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                            "StrictModes no\nUsePAM no\nPidFile none\n")
            log = open(tmp / f"sshd-{i}.log", "w")
            self.sshd.append(subprocess.Popen([HARNESS, "exec", self.prefix, str(i), "/usr/sbin/sshd", "-D", "-e", "-f", str(conf)],
                                              stdout=log, stderr=subprocess.STDOUT))
        self.ssh = tmp / "ssh"  # what hydra launches its proxies with: the test key, no host-key prompts
        self.ssh.write_text(f"#!/bin/sh\nexec ssh -i {tmp}/id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                            "-o BatchMode=yes -o LogLevel=ERROR -o ConnectTimeout=5 -o ServerAliveInterval=2 -o ServerAliveCountMax=2 \"$@\"\n")
        self.ssh.chmod(0o755)
        self.hostfile = tmp / "hosts.txt"
        self.hostfile.write_text("".join(f"h{i}\n" for i in range(1, n + 1)))
        deadline = time.time() + 20
        while self.exec(1, [str(self.ssh), f"h{n}", "true"]).returncode and time.time() < deadline:
            time.sleep(0.2)

    def exec(self, i: int, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run([HARNESS, "exec", self.prefix, str(i), *cmd], capture_output=True, text=True, **kw)

    def launch(self, args: list[str], env: dict | None = None) -> subprocess.Popen:
        """``jobs/hostfile-run.sh ARGS`` started on h1, one rank per host."""
        env = {**os.environ, **NETMODS["ucx"], "HYDRA_LAUNCHER_EXEC": str(self.ssh), "HOSTS": str(self.hostfile), "THREADS": "1",
               **(env or {})}
        return subprocess.Popen([HARNESS, "exec", self.prefix, "1", "bash", str(REPO / "jobs" / "hostfile-run.sh"), *args],
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def tx_bytes(self, i: int) -> int:
        """Bytes host i has sent on its cable (from its /proc/net/dev)."""
        line = next(x for x in self.exec(i, ["cat", "/proc/net/dev"]).stdout.splitlines() if x.strip().startswith("eth0:"))
        return int(line.split(":")[1].split()[8])

    def pids(self, i: int) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", f"{self.prefix}-h{i}"], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def rank_pid(self, i: int) -> int | None:
        """The mdi-mpi rank running on host i."""
        for pid in self.pids(i):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if b"python" in argv[0] and b"-m" in argv and any(a.startswith(b"mdi_mpi.") for a in argv):
                    return pid
            except OSError:
                continue
        return None

    def left(self) -> list[int]:
        """What still runs on the hosts but their sshd: ranks, hydra's proxies, ssh sessions."""
        out = []
        for i in range(1, self.n + 1):
            for pid in self.pids(i):
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() != "sshd":
                        out.append(pid)
                except OSError:
                    continue
        return out

    def close(self) -> None:
        for p in self.sshd + ([self.emulator] if self.emulator else []):
            p.kill()
        subprocess.run([HARNESS, "down", self.prefix], capture_output=True)
