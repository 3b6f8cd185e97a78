#!/usr/bin/env bash
# Install Debian's Chromium for the browser tests of the chat page and dashboard (root with apt-get
# only). Elsewhere it does nothing and those tests are skipped with their reason.
set -uo pipefail
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "Chromium is not installed and cannot be here (needs root and apt-get): the browser tests will be skipped"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; }; then
  echo "warning: apt-get could not install Chromium: the browser tests will be skipped"
fi
exit 0
