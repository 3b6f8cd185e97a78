#!/usr/bin/env bash
# The whole test suite: set-up, the single-process tests (which launch mpiexec runs themselves),
# the tests that run inside an MPI job of 2 ranks, then (as root) the arm64 lane: the kernel and
# quantization tests in a Debian arm64 root under qemu-user, as a Cortex-A76 and a Cortex-A72.
# The quick tests alone (no processes, servers or daemons started): pytest -m "not system" tests
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-system.sh slurm browser network
. .venv/bin/activate
export OMP_NUM_THREADS=1
python -m pytest -q tests "$@"
timeout 600 mpirun -np 2 python -m pytest -q -p no:cacheprovider tests/mpi
if [ "$(id -u)" = 0 ]; then
  bash scripts/setup-arm64.sh
  bash scripts/test-arm64.sh
else
  echo "arm64 lane skipped: it needs root (debootstrap, chroot, binfmt_misc); see scripts/test-arm64.sh"
fi
