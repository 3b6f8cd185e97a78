#!/usr/bin/env bash
# Create .venv with mdi-mpi, a pinned torch and a pip-installed MPI (MPICH). Idempotent.
# TORCH_SPEC picks the torch to install (default torch==2.13.0); it is pinned for every later step,
# so pip never resolves another torch (an unpinned torch pulls a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
if ! python -c "from importlib.metadata import version; version(\"torch\")" 2>/dev/null; then
  pip install -q --disable-pip-version-check "$TORCH_SPEC"
fi
constraints=$(mktemp)
log=$(mktemp)
trap 'rm -f "$constraints" "$log"' EXIT
python -c "from importlib.metadata import version; print('torch==' + version('torch'))" > "$constraints"
if ! pip install -q --disable-pip-version-check -c "$constraints" -e ".[test]" mpich > "$log" 2>&1; then
  grep -v "^WARNING: Location" "$log" >&2
  echo "setup failed: pip could not install mdi-mpi's dependencies (see above)" >&2
  exit 1
fi
python -c "import mdi_mpi, mpi4py, torch, transformers; print('mdi-mpi ready: torch', torch.__version__, '| transformers', transformers.__version__)"
