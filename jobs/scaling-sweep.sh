#!/bin/bash
# Scaling sweep: one job each on 1..MAX_NODES nodes, same workload, results into one JSONL.
#   MODEL=/nfs/TinyLlama PROMPTS=$HOME/p.jsonl bash jobs/scaling-sweep.sh
# Each job appends its run summary (tokens/s, per-rank memory and time) to $RESULTS as one line.
# SBATCH_ARGS adds sbatch options (e.g. "--partition=pis --cpus-per-task=4"); JOB picks the script.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
MAX_NODES=${MAX_NODES:-4}
RESULTS=${RESULTS:-scaling-$(date +%Y%m%d-%H%M%S).jsonl}
export MDI_MPI_HOME=$(dirname "$here")
export EXTRA_ARGS=${EXTRA_ARGS:-"--ignore-eos"}
export RESUME=${RESUME:-0}  # a benchmark: every run does all its requests
mkdir -p sweep
for n in $(seq 1 "$MAX_NODES"); do
  export STATS="sweep/stats-$n.json" OUTPUT="sweep/out-$n.jsonl"
  rm -f "$STATS"
  # shellcheck disable=SC2086
  sbatch --wait ${SBATCH_ARGS:-} --nodes="$n" --job-name="mdi-sweep-$n" --output="sweep/job-$n.out" --export=ALL "$here/${JOB:-pi-cluster.sbatch}"
  python3 -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))" "$STATS" >> "$RESULTS"
  echo "N=$n: $(python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print(s['tokens_per_s'], 'tokens/s')" "$STATS")"
done
echo "results in $RESULTS"
