#!/usr/bin/env bash
# Set up, then run the shipped demo model (trained on Python's standard library) on 3 MPI ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
mpirun -np 3 python -m mdi_mpi.generate \
  --prompt "import os" --prompt "def main(" --prompt "class Cluster:" \
  --n-samples 2 --temperature 0.8 --max-new-tokens 32 --output demo-output.jsonl "$@"
echo "records written to demo-output.jsonl"
