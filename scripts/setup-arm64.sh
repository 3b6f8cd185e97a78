#!/usr/bin/env bash
# The arm64 test lane's set-up (root): a Debian arm64 root run under qemu-user emulation, with an
# arm64 Python, torch's aarch64 wheel (pinned) and the test dependencies. Idempotent.
#   ARM64_ROOT  where the root goes (default /opt/mdi-arm64)
#   TORCH_SPEC  the torch to install (default torch==2.9.1: PyPI's aarch64 wheels of 2.13 are CUDA
#               builds, 4.9 GB with their nvidia packages; 2.9.1's is a CPU build of 0.7 GB, the one a
#               Pi should install, jobs/README.md)
# Then: bash scripts/test-arm64.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${ARM64_ROOT:-/opt/mdi-arm64}
TORCH_SPEC=${TORCH_SPEC:-torch==2.9.1}
if [ "$(id -u)" != 0 ]; then echo "setup-arm64.sh: run as root (debootstrap, chroot, binfmt)" >&2; exit 1; fi
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null || ! command -v update-binfmts >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static debootstrap binfmt-support >/dev/null
fi
# arm64 binaries run through qemu (binfmt_misc; flag F keeps the interpreter usable inside a chroot)
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
if [ ! -x "$ROOT/usr/bin/python3" ]; then
  rm -rf "$ROOT"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$(. /etc/os-release && echo "$VERSION_CODENAME")" "$ROOT" http://deb.debian.org/debian >/dev/null
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/host-ca-certificates.crt"  # pip trusts what the host does
in_root() { chroot "$ROOT" env -i PATH=/usr/bin:/bin HOME=/root PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt \
  PIP_DEFAULT_TIMEOUT=180 "$@"; }
if ! in_root /venv/bin/python -c "import torch, transformers, pytest" 2>/dev/null; then
  in_root python3 -m venv /venv
  in_root /venv/bin/pip install -q --disable-pip-version-check "$TORCH_SPEC"
  in_root sh -c '/venv/bin/python -c "from importlib.metadata import version; print(\"torch==\" + version(\"torch\"))" > /constraints.txt'
  # what the lane's tests import (no MPI: the lane runs no job of several ranks)
  in_root /venv/bin/pip install -q --disable-pip-version-check -c /constraints.txt \
    "transformers>=4.45" "tokenizers>=0.20" "safetensors>=0.4" "numpy>=1.24" "h5py>=3.8" "pytest>=8" "pytest-timeout>=2.3"
fi
in_root /venv/bin/python -c "import platform, torch; print('arm64 lane ready:', platform.machine(), 'torch', torch.__version__)"
