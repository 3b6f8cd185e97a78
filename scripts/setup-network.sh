#!/usr/bin/env bash
# Install what the network tests' test hosts need (root with apt-get only): iproute2 for network
# namespaces, openssh-server and -client for the hostfile launcher over SSH. Elsewhere it does
# nothing and those tests are skipped with their reason.
set -uo pipefail
if command -v ip >/dev/null && [ -x /usr/sbin/sshd ] && command -v ssh >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "iproute2 or OpenSSH is missing and cannot be installed here (needs root and apt-get): the network tests will be skipped"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends iproute2 openssh-server openssh-client >/dev/null; }; then
  echo "warning: apt-get could not install iproute2 and OpenSSH: the network tests will be skipped"
fi
exit 0
