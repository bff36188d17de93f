#!/usr/bin/env bash
# Does the int4 demo bundle decode to the same greedy tokens on linux-aarch64 onnxruntime
# (the arm64 MLAS/KleidiAI int4 kernels phones run) as on this x86 machine?
#
# Builds the bundle, decodes it on x86, then decodes the very same files with the very same
# script (greedy.py) in an arm64 Debian chroot under qemu-user, once per emulated CPU model
# (each exposes different features, so ORT picks different int4 kernels), and compares.
# Idempotent: the rootfs and the wheels are kept in $WORK and reused. Needs root.
#
#   bash mobile_app/arm_check/run.sh            # WORK=/tmp/armcheck by default
#   ARMCHECK_CPUS="max" bash mobile_app/arm_check/run.sh
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
WORK=${ARMCHECK_DIR:-/tmp/armcheck}
ROOTFS=$WORK/rootfs
SUITE=bookworm
# max = i8mm + dotprod + SVE + SME (a recent phone core); cortex-a76 = dotprod, no i8mm
# (2019-2021 phones); cortex-a53 = neither (old/cheap phones, little cores).
CPUS=${ARMCHECK_CPUS:-max cortex-a76 cortex-a53}
# Only these must match for the exit status; the others are reported (see README: a near tie
# can legitimately flip when the kernel's int8 rounding changes).
STRICT_CPUS=${ARMCHECK_STRICT_CPUS:-max cortex-a76}
NICE="nice -n 10"  # the machine is shared

# shellcheck disable=SC1091
[ -f "$REPO/.venv/bin/activate" ] && . "$REPO/.venv/bin/activate"
mkdir -p "$WORK"
cd "$WORK"

# --- host tools --------------------------------------------------------------------------
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null \
  || ! command -v update-binfmts >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $NICE apt-get install -y -qq qemu-user-static debootstrap binfmt-support
fi

# --- 1. bundle + x86 reference -----------------------------------------------------------
# Re-exported every run (about 15 s) so the check is always of the current exporter.
rm -rf "$WORK/bundle"
$NICE lfm-export --target android --out "$WORK/bundle" --quiet
$NICE python "$HERE/greedy.py" "$WORK/bundle" --margins >"$WORK/x86.json"

# --- 2. arm64 chroot ---------------------------------------------------------------------
# The second debootstrap stage and everything after it execute arm64 binaries inside a chroot,
# so the kernel must hand them to qemu: binfmt_misc with the qemu-aarch64 entry. Its F flag
# (fix binary) makes the interpreter work inside the chroot without copying it there; we copy
# it anyway for kernels/containers where the entry lacks F.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
    || { echo "binfmt_misc unavailable: cannot run arm64 binaries in a chroot here" >&2; exit 2; }
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64

if [ ! -x "$ROOTFS/usr/bin/python3" ] || [ -d "$ROOTFS/debootstrap" ]; then
  if [ ! -x "$ROOTFS/debootstrap/debootstrap" ]; then
    rm -rf "$ROOTFS"  # a half-done first stage: start over
    # python3-venv is all we need inside; ca-certificates is not (pip runs offline in there).
    $NICE debootstrap --arch=arm64 --foreign --include=python3,python3-venv "$SUITE" "$ROOTFS" \
      http://deb.debian.org/debian
  fi
  cp /usr/bin/qemu-aarch64-static "$ROOTFS/usr/bin/"
  $NICE chroot "$ROOTFS" /debootstrap/debootstrap --second-stage  # ~7 min under emulation
fi
cp /usr/bin/qemu-aarch64-static "$ROOTFS/usr/bin/"

# ORT refuses to load external data without /proc (it canonicalises paths via /proc/self/fd).
# /sys is deliberately NOT mounted: with the x86 host's /sys visible, ORT's cpuinfo library
# crashes (SIGSEGV at import) parsing it as arm; without it cpuinfo fails cleanly and ORT reads
# the CPU features from the ELF auxiliary vector (HWCAP/HWCAP2), which qemu sets per -cpu model.
mountpoint -q "$ROOTFS/proc" || mount -t proc proc "$ROOTFS/proc"
trap 'umount "$ROOTFS/proc" 2>/dev/null || true' EXIT

# --- 3. arm64 wheels ---------------------------------------------------------------------
# The same versions as the host's venv, so only the architecture differs. Downloaded by the
# host's pip (--platform) and installed offline in the chroot: the chroot's own pip cannot
# verify TLS on networks with an intercepting proxy, and this also avoids slow emulated pip.
pins=$(python -c 'import numpy, onnxruntime, tokenizers as t; print(f"onnxruntime=={onnxruntime.__version__} numpy=={numpy.__version__} tokenizers=={t.__version__}")')
if [ "$(cat "$ROOTFS/opt/venv/pins" 2>/dev/null)" != "$pins" ]; then
  # shellcheck disable=SC2086
  $NICE pip download -q -d "$WORK/wheels" --only-binary=:all: --implementation cp \
    --python-version "$(chroot "$ROOTFS" python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    $pins
  rm -rf "$ROOTFS/root/wheels" && cp -r "$WORK/wheels" "$ROOTFS/root/wheels"
  [ -x "$ROOTFS/opt/venv/bin/python" ] || chroot "$ROOTFS" python3 -m venv /opt/venv
  # shellcheck disable=SC2086
  $NICE chroot "$ROOTFS" /opt/venv/bin/pip install -q --no-index --find-links /root/wheels $pins
  echo "$pins" >"$ROOTFS/opt/venv/pins"
fi

# --- 4. arm64 decode, once per emulated CPU ----------------------------------------------
rm -rf "$ROOTFS/root/check" && mkdir -p "$ROOTFS/root/check"
cp -r "$WORK/bundle" "$HERE/greedy.py" "$ROOTFS/root/check/"
for cpu in $CPUS; do
  # QEMU_CPU is read by qemu-user itself; 2>/dev/null hides ORT's harmless cpuinfo warnings.
  QEMU_CPU=$cpu $NICE chroot "$ROOTFS" /opt/venv/bin/python /root/check/greedy.py /root/check/bundle --margins \
    >"$WORK/arm64-$cpu.json" 2>"$WORK/arm64-$cpu.err"
done

# --- 5. compare --------------------------------------------------------------------------
{
  echo "date: $(date -u +%F)"
  echo "x86 onnxruntime: $(python -c 'import onnxruntime; print(onnxruntime.__version__)')"
  echo "arm64 onnxruntime: $(chroot "$ROOTFS" /opt/venv/bin/python -c 'import onnxruntime; print(onnxruntime.__version__)' 2>/dev/null)"
  echo "debian: $SUITE $(cat "$ROOTFS/etc/debian_version")"
  echo "qemu: $(qemu-aarch64-static --version | head -1)"
} | tee "$WORK/versions.txt"
python - "$WORK" "$CPUS" "$STRICT_CPUS" <<'EOF'
import json
import sys
from pathlib import Path

work, cpus, strict = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()
x86 = json.loads((work / "x86.json").read_text())
failed = False
for cpu in cpus:
    arm = json.loads((work / f"arm64-{cpu}.json").read_text())
    for prompt, ref in x86.items():
        got = arm[prompt]["tokens"]
        step = next((i for i, (a, b) in enumerate(zip(ref["tokens"], got)) if a != b), None)
        if step is None:
            print(f"{cpu:11} {prompt!r:11} MATCH ({len(got)} tokens)")
            continue
        failed |= cpu in strict
        print(f"{cpu:11} {prompt!r:11} DIFFER at step {step}: x86 {ref['tokens'][step]} vs arm64 {got[step]}; "
              f"x86 top1-top2 logit margin there {ref['margins'][step]}")
sys.exit(1 if failed else 0)
EOF
