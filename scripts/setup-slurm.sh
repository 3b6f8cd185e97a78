#!/usr/bin/env bash
# Install Debian's Slurm and munge for the Slurm integration test (root with apt-get only).
# Elsewhere it does nothing and that test is skipped with its reason.
set -uo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null && command -v munged >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "Slurm is not installed and cannot be here (needs root and apt-get): the Slurm test will be skipped"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null; }; then
  echo "warning: apt-get could not install Slurm: the Slurm test will be skipped"
fi
exit 0
