#!/usr/bin/env bash
# Install what the system tests need from Debian (root with apt-get only):
#
#   setup-system.sh NAME...   slurm: Slurm and munge (the Slurm tests)
#                             browser: Chromium (the browser tests of the chat page and dashboard)
#                             network: iproute2 and OpenSSH (the test hosts of the network tests)
#
# What is already there is left alone. Elsewhere, or when apt-get fails, it installs nothing and says
# which tests will be skipped (each says why); it never fails the run.
set -uo pipefail
USAGE="usage: setup-system.sh slurm|browser|network..."
[ $# -gt 0 ] || { echo "$USAGE" >&2; exit 2; }
export DEBIAN_FRONTEND=noninteractive

# found WORD: WORD is "a|b": any of its alternatives, a command on PATH or an executable path
found() {
  local alt
  for alt in ${1//|/ }; do
    if [[ $alt == /* ]]; then [ -x "$alt" ] && return 0; else command -v "$alt" >/dev/null && return 0; fi
  done
  return 1
}

for name in "$@"; do
  case "$name" in
    slurm) needs="slurmctld slurmd sbatch munged"; packages="munge slurmctld slurmd slurm-client"
      what="Slurm"; skipped="the Slurm tests" ;;
    browser) needs="chromium|chromium-browser"; packages="chromium fonts-dejavu-core"
      what="Chromium"; skipped="the browser tests" ;;
    network) needs="ip /usr/sbin/sshd ssh"; packages="iproute2 openssh-server openssh-client"
      what="iproute2 and OpenSSH"; skipped="the network tests" ;;
    *) echo "$USAGE" >&2; exit 2 ;;
  esac
  missing=0
  for word in $needs; do found "$word" || missing=1; done
  [ "$missing" = 1 ] || continue
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "$what not installed and cannot be installed here (needs root and apt-get): $skipped will be skipped"
    continue
  fi
  # shellcheck disable=SC2086 - $packages is a list of words
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends $packages >/dev/null; }; then
    echo "warning: apt-get could not install $what: $skipped will be skipped"
  fi
done
exit 0
