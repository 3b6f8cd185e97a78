#!/usr/bin/env bash
# The whole test suite: set-up, the single-process tests (which launch mpiexec runs themselves),
# then the tests that run inside an MPI job of 2 ranks.
# The quick tests alone (no processes, servers or daemons started): pytest -m "not system" tests
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup-system.sh slurm browser network
. .venv/bin/activate
export OMP_NUM_THREADS=1
python -m pytest -q tests "$@"
timeout 600 mpirun -np 2 python -m pytest -q -p no:cacheprovider tests/mpi
