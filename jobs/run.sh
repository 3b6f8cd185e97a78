#!/bin/bash
# The body of the Slurm jobs (pi-cluster.sbatch, hpc.sbatch): starts one mdi-mpi rank per task.
# Variables come from the environment (sbatch --export=ALL,NAME=value) or the defaults here.
# ---- what to run (override any of these with sbatch --export=ALL,NAME=value) -------------------
COMMAND=${COMMAND:-generate}             # generate (prompts in, records out) or serve (an OpenAI-compatible server)
MODEL=${MODEL:-}                         # checkpoint dir, or shards from mdi_mpi.split; empty: demo model
PROMPTS=${PROMPTS:-}                     # prompts file (text lines or JSONL); empty: PROMPT below
PROMPT=${PROMPT:-Once upon a time}
OUTPUT=${OUTPUT:-mdi-mpi-${SLURM_JOB_ID:-local}.jsonl}   # JSONL records, appended as requests finish
RESUME=${RESUME:-1}                      # 1: skip requests already in OUTPUT (a requeued job carries on); 0: off
TRACE=${TRACE:-}                         # e.g. run.h5 for an event timeline (python -m mdi_mpi.trace)
STATS=${STATS:-}                         # e.g. stats.json for the run summary as JSON
DTYPE=${DTYPE:-auto}                     # auto: bfloat16 unless float32 is much faster on these CPUs
QUANT=${QUANT:-}                         # int8 or int4 to quantize the weights (empty: none)
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}
EXTRA_ARGS=${EXTRA_ARGS:-}               # any other flags, e.g. "--slots 6 --temperature 0.8"
PORT=${PORT:-8000}                       # serve: rank 0's port, on the first node of the job
HOST=${HOST:-127.0.0.1}                  # serve: 127.0.0.1 (reach it with ssh -L); another address needs MDI_MPI_API_KEY
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-20}       # serve: seconds to finish requests after scancel (below Slurm's KillWait, 30 s)
VENV=${VENV:-}                           # a virtualenv to activate (scripts/setup.sh makes .venv)
LAUNCHER=${LAUNCHER:-srun}               # srun (Slurm's PMI) or mpiexec (MPICH's hydra inside the allocation)
SRUN_MPI=${SRUN_MPI:-pmi2}               # Slurm MPI plugin for srun: pmi2 for MPICH, pmix for some builds
# ----------------------------------------------------------------------------------------------

set -euo pipefail
if [ -n "$VENV" ]; then source "$VENV/bin/activate"; fi
THREADS=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=$THREADS

args=(--dtype "$DTYPE" --threads "$THREADS")
[ -n "$MODEL" ] && args+=(--model "$MODEL")
[ -n "$QUANT" ] && args+=(--quant "$QUANT")
case "$COMMAND" in
  generate)
    args+=(--max-new-tokens "$MAX_NEW_TOKENS" --output "$OUTPUT" --quiet)
    [ "$RESUME" = 1 ] && args+=(--resume)
    if [ -n "$PROMPTS" ]; then args+=(--prompts-file "$PROMPTS"); else args+=(--prompt "$PROMPT"); fi
    [ -n "$TRACE" ] && args+=(--trace "$TRACE")
    [ -n "$STATS" ] && args+=(--stats-json "$STATS") ;;
  serve)
    args+=(--host "$HOST" --port "$PORT" --drain-timeout "$DRAIN_TIMEOUT") ;;
  *) echo "COMMAND must be generate or serve, got $COMMAND" >&2; exit 2 ;;
esac
# shellcheck disable=SC2206
extra=($EXTRA_ARGS)

echo "mdi-mpi: ${SLURM_NTASKS:-?} ranks on ${SLURM_JOB_NODELIST:-?}, $THREADS threads per rank, launcher $LAUNCHER"
case "$LAUNCHER" in
  # Under srun --mpi=pmi2 the program itself picks MPICH's OFI netmod (see process.choose_netmod).
  srun)    srun --kill-on-bad-exit=1 --mpi="$SRUN_MPI" python -m "mdi_mpi.$COMMAND" "${args[@]}" "${extra[@]}" ;;
  mpiexec) mpiexec -n "${SLURM_NTASKS:-1}" -ppn 1 python -m "mdi_mpi.$COMMAND" "${args[@]}" "${extra[@]}" ;;
  *)       echo "LAUNCHER must be srun or mpiexec, got $LAUNCHER" >&2; exit 2 ;;
esac
