#!/usr/bin/env bash
# The arm64 test lane (root): the tests that decide correctness on a Raspberry Pi (kernel choice,
# int8/int4 packing and kernels, --dtype auto, batch invariance on tiny models, the model families)
# in the arm64 root of scripts/setup-arm64.sh, under qemu-user emulating a Cortex-A76 (Pi 5: NEON,
# dotprod, no bf16 arithmetic) and a Cortex-A72 (Pi 4: NEON only). Emulated timings mean nothing:
# the tests check choices and bits, never speed. Extra arguments go to pytest.
#   ARM64_ROOT  the root (default /opt/mdi-arm64);  ARM64_CPUS  the CPU models (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${ARM64_ROOT:-/opt/mdi-arm64}
CPUS=${ARM64_CPUS:-cortex-a76 cortex-a72}
TESTS="tests/test_quant.py tests/test_batch_invariance.py"
# emulation runs these ~40x slower than the host: the lane keeps the tests that decide a Pi's bits in
# about 2.5 minutes per CPU model (a shape of every residue mod 64 for int8 and int4, the quantized
# kernels against their reference and across row counts, which int8 kernel is chosen and whether
# oneDNN's int8 products are exact there, the chosen kernels' and the probe's families,
# the stage logits of dense and MoE tiny models whatever their batch companions); a -k among the extra
# arguments replaces this selection (e.g. -k "forced_kernel or probe_forms": the tiles one by one, 6 minutes more)
SELECT="residue or kernel_matches or bitwise or falls_back or chosen_kernels or families_group or w8a8 or quant_kernels or rank_kernels or use_moves"
if [ ! -x "$ROOT/venv/bin/python" ]; then echo "test-arm64.sh: run scripts/setup-arm64.sh first" >&2; exit 1; fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || bash scripts/setup-arm64.sh
mkdir -p "$ROOT/src/mdi-mpi"
cat > "$ROOT/lane.sh" <<LANE
cd /src/mdi-mpi
/venv/bin/python -c "import platform, torch; print('arm64 lane:', platform.machine(), 'torch', torch.__version__, '| ATen CPU capability:', torch.backends.cpu.get_cpu_capability())"
exec /venv/bin/python -m pytest -q -p no:cacheprovider -p no:warnings -m "not system" -k "$SELECT" $TESTS "\$@"
LANE
status=0
for cpu in $CPUS; do
  echo "== arm64 lane on an emulated $cpu"
  # a mount namespace of its own: the bind mounts vanish with it. No /sys: the host's describes x86
  # CPUs, and oneDNN's arm64 CPU probe crashes on it (torch falls back to /proc/cpuinfo without it)
  unshare -m bash -c 'mount --bind "$1" "$2/src/mdi-mpi" && mount --bind /dev "$2/dev" && mount -t proc proc "$2/proc" &&
    exec chroot "$2" env -i PATH=/usr/bin:/bin HOME=/root QEMU_CPU="$3" OMP_NUM_THREADS=1 PYTHONPATH=/src/mdi-mpi/src \
      MDI_MPI_CACHE="/tmp/mdi-mpi-arm64-$3" sh /lane.sh "${@:4}"' lane "$PWD" "$ROOT" "$cpu" "$@" || status=1
done
exit $status
