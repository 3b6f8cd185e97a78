#!/bin/bash
# mdi-mpi on machines without Slurm: MPICH's mpiexec starts one rank per host over SSH.
#   HOSTS=hosts.txt MODEL=/nfs/TinyLlama bash jobs/hostfile-run.sh --prompt "Hello"
# Requirements (see jobs/README.md): passwordless SSH from this host to every host in $HOSTS,
# the same Python environment at the same path everywhere (VENV), the checkpoint (or its shards)
# at the same path on every host, and open TCP ports between the hosts.
set -euo pipefail
HOSTS=${HOSTS:-hosts.txt}                # one host name per line; ":1" after a name = one rank there
MODEL=${MODEL:-}
VENV=${VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}
THREADS=${THREADS:-$(nproc)}
[ -f "$HOSTS" ] || { echo "no hostfile $HOSTS (one host per line)" >&2; exit 2; }
n=$(grep -cv '^\s*\(#\|$\)' "$HOSTS")
args=(--threads "$THREADS")
[ -n "$MODEL" ] && args+=(--model "$MODEL")
exec "$VENV/bin/mpiexec" -f "$HOSTS" -n "$n" -ppn 1 -genv OMP_NUM_THREADS "$THREADS" \
  "$VENV/bin/python" -m mdi_mpi.generate "${args[@]}" "$@"
