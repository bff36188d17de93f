#!/usr/bin/env bash
# Does the phone default bundle (lfm-export --target android) decode to the same greedy tokens on
# linux-aarch64 onnxruntime (the arm64 MLAS/KleidiAI kernels phones run) as on this x86 machine?
#
# Builds the bundle with this checkout's exporter, decodes it on x86, then decodes the very same files
# with the very same script (greedy.py) in an arm64 Debian rootfs under qemu-user, once per emulated
# CPU model (each exposes different features, so ORT picks different kernels), and compares
# (compare.py). Exit 0: every CPU in $ARMCHECK_STRICT_CPUS gave the x86 tokens; 1: one differed;
# 2: the check could not run here (never a silent skip). Needs root (chroot, mount, binfmt_misc).
# The rootfs and the wheels are kept in $WORK and reused.
#
#   bash mobile_app/arm_check/run.sh                      # or: make arm-check
#   ARMCHECK_CPUS="max" bash mobile_app/arm_check/run.sh
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
WORK=${ARMCHECK_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/lfm-edge/arm_check}
ROOTFS=$WORK/rootfs
SITE=/opt/armcheck-site  # inside the rootfs: the arm64 wheels, installed by the host's pip
SUITE=bookworm
MIRROR=${ARMCHECK_MIRROR:-http://deb.debian.org/debian}
PY=${ARMCHECK_PYTHON:-$REPO/.venv/bin/python}
case $PY in /*) ;; *) PY=$PWD/$PY ;; esac  # used after cd "$WORK"
# max = i8mm + dotprod + SVE + SME (a recent phone core); cortex-a76 = dotprod, no i8mm
# (2019-2021 phones); cortex-a53 = neither (old/cheap phones, little cores).
CPUS=${ARMCHECK_CPUS:-max cortex-a76 cortex-a53}
# Only these must match for the exit status; the others are reported (see README: a near tie
# can legitimately flip when the kernel's int8 rounding changes).
STRICT_CPUS=${ARMCHECK_STRICT_CPUS:-max cortex-a76}
NICE="nice -n 10"  # the machine is shared

log() { echo "arm_check [$(date -u +%T), ${SECONDS}s]: $*" >&2; }
cannot() { echo "arm_check: CANNOT RUN: $*" >&2; exit 2; }

[ "$(id -u)" = 0 ] || cannot "needs root (debootstrap, chroot, mount, binfmt_misc)"
[ -x "$PY" ] || cannot "no python at $PY (run 'make install', or set ARMCHECK_PYTHON)"
# The bundle must come from this checkout's exporter, not from whatever lfm_edge the python imports.
src=$("$PY" -c 'import lfm_edge.export, os; print(os.path.realpath(lfm_edge.export.__path__[0]))')
[ "$src" = "$(realpath "$REPO/export")" ] \
  || cannot "$PY imports lfm_edge.export from $src, not from this checkout ($REPO); set ARMCHECK_PYTHON"
mkdir -p "$WORK"
cd "$WORK"

# --- host tools --------------------------------------------------------------------------
# debian-archive-keyring: debootstrap verifies the bookworm Release file with it (not installed on
# Ubuntu by default); debootstrap's recommends bring gpgv and arch-test.
if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null \
  || ! command -v update-binfmts >/dev/null || [ ! -e /usr/share/keyrings/debian-archive-keyring.gpg ]; then
  tools="qemu-user-static debootstrap binfmt-support debian-archive-keyring"
  command -v apt-get >/dev/null || cannot "needs $tools (no apt-get here)"
  log "installing $tools"
  apt-get update -qq -o Acquire::Retries=3
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $NICE apt-get install -y -qq -o Acquire::Retries=3 $tools >/dev/null
fi

# The kernel must hand arm64 binaries to qemu: binfmt_misc with the qemu-aarch64 entry. A fresh VM
# may not have binfmt_misc mounted. The entry's F flag (fix binary) makes the interpreter work inside
# the chroot; the static binary is copied into the rootfs too, for entries without F.
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
    || cannot "binfmt_misc cannot be mounted here (a container without the privilege?)"
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64 \
  || cannot "update-binfmts could not register qemu-aarch64"
grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || cannot "binfmt entry qemu-aarch64 is not enabled"

# --- 1. bundle + x86 reference -----------------------------------------------------------
# Re-exported every run (about 20 s) so the check is always of the current exporter.
log "exporting the --target android bundle and decoding it on x86"
rm -rf "$WORK/bundle"
$NICE "$PY" -c 'import sys; from lfm_edge.export.cli import main; sys.argv[0] = "lfm-export"; sys.exit(main())' \
  --target android --out "$WORK/bundle" --quiet
$NICE "$PY" "$HERE/greedy.py" "$WORK/bundle" --margins >"$WORK/x86.json"

# --- 2. arm64 rootfs ---------------------------------------------------------------------
# debootstrap's first stage (native, ~1 min) downloads every package and unpacks the essential ones.
# Its second stage would run dpkg's maintainer scripts under emulation (~7 min of a cold run) to
# configure a system we never boot; python3 and its libraries need none of that, so the remaining
# packages are unpacked natively here too and only ldconfig runs under qemu. The marker records
# what was built; anything else in $ROOTFS is a half-done build and is started over.
marker="$SUITE arm64 minbase+python3 unpacked"
# Unmounts whatever is mounted inside the rootfs (our /proc; a debootstrap second stage's /proc and
# /sys), deepest first, so that rm -rf never walks into the host's /proc or /sys.
unmount_all() {
  local m
  for m in $(awk -v r="$ROOTFS/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r); do
    umount "$m" || umount -l "$m"
  done
}
# .pyc files for the rootfs's python, natively when the host's python has the same minor version (the
# files are then identical; under emulation this takes minutes), else by the rootfs's python. Only an
# optimisation: a file that does not compile (a test fixture) is compiled again at import, or never.
# Arguments: folders as the host sees them ($ROOTFS/...).
byte_compile() {
  local v='import sys; print(sys.version_info[:2])'
  if [ "$("$PY" -c "$v")" = "$(chroot "$ROOTFS" /usr/bin/python3 -c "$v")" ]; then
    $NICE "$PY" -m compileall -q -j 0 -s "$ROOTFS" -p / "$@" >/dev/null || true
  else
    $NICE chroot "$ROOTFS" /usr/bin/python3 -m compileall -q "${@#"$ROOTFS"}" >/dev/null || true
  fi
}
if [ "$(cat "$ROOTFS/.armcheck" 2>/dev/null)" != "$marker" ]; then
  log "building the arm64 $SUITE rootfs in $ROOTFS"
  unmount_all
  rm -rf --one-file-system "$ROOTFS"
  for attempt in 1 2; do  # a second try for a network hiccup on the mirror
    $NICE debootstrap --arch=arm64 --foreign --variant=minbase --include=python3 "$SUITE" "$ROOTFS" "$MIRROR" \
      >"$WORK/debootstrap.out" 2>&1 && break
    tail -20 "$WORK/debootstrap.out" >&2
    [ "$attempt" = 2 ] && cannot "debootstrap failed twice"
    rm -rf --one-file-system "$ROOTFS"
  done
  # debpaths: "package path-of-deb" for every downloaded package. --keep-directory-symlink keeps the
  # merged-/usr links (/lib -> usr/lib) that the first stage made, as debootstrap itself does.
  while read -r _ deb; do
    dpkg-deb --fsys-tarfile "$ROOTFS/$deb" | tar -C "$ROOTFS" --keep-directory-symlink -xf -
  done <"$ROOTFS/debootstrap/debpaths"
  rm -rf "$ROOTFS/var/cache/apt/archives/"*.deb "$ROOTFS/debootstrap"
  # In a container the first stage leaves proc as a symlink to /proc (the second stage would replace
  # it); inside the chroot that link points at itself, so it becomes the empty folder it mounts on.
  if [ -L "$ROOTFS/proc" ]; then rm "$ROOTFS/proc"; mkdir "$ROOTFS/proc"; fi
  cp /usr/bin/qemu-aarch64-static "$ROOTFS/usr/bin/"
  chroot "$ROOTFS" /sbin/ldconfig
  # Debian byte-compiles the standard library in a maintainer script; without the .pyc files every
  # emulated python start would compile what it imports, again and again.
  byte_compile "$ROOTFS"/usr/lib/python3*
  echo "$marker" >"$ROOTFS/.armcheck"
fi
cp /usr/bin/qemu-aarch64-static "$ROOTFS/usr/bin/"
[ "$(chroot "$ROOTFS" /usr/bin/python3 -c 'import platform; print(platform.machine())')" = aarch64 ] \
  || cannot "the rootfs's python3 does not run as aarch64"

# ORT refuses to load external data without /proc (it canonicalises paths via /proc/self/fd).
# /sys is deliberately NOT mounted: with the x86 host's /sys visible, ORT's cpuinfo library
# crashes (SIGSEGV at import) parsing it as arm; without it cpuinfo fails cleanly and ORT reads
# the CPU features from the ELF auxiliary vector (HWCAP/HWCAP2), which qemu sets per -cpu model.
[ -d "$ROOTFS/proc" ] && [ ! -L "$ROOTFS/proc" ] || cannot "$ROOTFS/proc is not a folder"
mountpoint -q "$ROOTFS/proc" || mount -t proc proc "$ROOTFS/proc"
trap unmount_all EXIT

# --- 3. arm64 wheels ---------------------------------------------------------------------
# The same versions as the host's venv, so only the architecture differs. Installed by the host's
# pip straight into the rootfs (--target with --platform): no pip under emulation, and no TLS from
# inside the chroot (it could not verify certificates through an intercepting proxy).
pins=$("$PY" -c 'import numpy, onnxruntime, tokenizers as t; print(f"onnxruntime=={onnxruntime.__version__} numpy=={numpy.__version__} tokenizers=={t.__version__}")')
pyver=$(chroot "$ROOTFS" /usr/bin/python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
if [ "$(cat "$ROOTFS$SITE/.pins" 2>/dev/null)" != "$pins" ]; then
  log "installing arm64 wheels: $pins"
  rm -rf "$ROOTFS$SITE"
  # shellcheck disable=SC2086
  $NICE "$PY" -m pip install -q --disable-pip-version-check --no-warn-script-location --no-compile \
    --target "$ROOTFS$SITE" --only-binary=:all: --implementation cp --python-version "$pyver" \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    $pins
  byte_compile "$ROOTFS$SITE"
  echo "$pins" >"$ROOTFS$SITE/.pins"
fi

# --- 4. arm64 decode, once per emulated CPU ----------------------------------------------
rm -rf "$ROOTFS/root/check" && mkdir -p "$ROOTFS/root/check"
cp -r "$WORK/bundle" "$HERE/greedy.py" "$ROOTFS/root/check/"
# qemu sets HWCAP/HWCAP2 in the auxiliary vector per -cpu; recorded to show which features ORT saw.
hwcap='import struct; a = open("/proc/self/auxv", "rb").read(); v = dict(struct.iter_unpack("<QQ", a))
print(f"HWCAP {v.get(16, 0):#x} HWCAP2 {v.get(26, 0):#x}")'
for cpu in $CPUS; do
  log "decoding on arm64, qemu cpu $cpu"
  # QEMU_CPU is read by qemu-user itself; ORT's harmless cpuinfo warnings go to the .err file.
  QEMU_CPU=$cpu PYTHONPATH=$SITE chroot "$ROOTFS" /usr/bin/python3 -c "$hwcap" >"$WORK/arm64-$cpu.hwcap"
  QEMU_CPU=$cpu PYTHONPATH=$SITE $NICE chroot "$ROOTFS" /usr/bin/python3 /root/check/greedy.py /root/check/bundle \
    --margins >"$WORK/arm64-$cpu.json" 2>"$WORK/arm64-$cpu.err" \
    || { tail -20 "$WORK/arm64-$cpu.err" >&2; echo "arm_check: arm64 decode failed on qemu cpu $cpu" >&2; exit 1; }
done

# --- 5. compare --------------------------------------------------------------------------
{
  echo "date: $(date -u +%F)"
  echo "x86 onnxruntime: $("$PY" -c 'import onnxruntime; print(onnxruntime.__version__)')"
  echo "arm64: $(PYTHONPATH=$SITE chroot "$ROOTFS" /usr/bin/python3 -c 'import onnxruntime, numpy, tokenizers, sys; print("onnxruntime", onnxruntime.__version__, "numpy", numpy.__version__, "tokenizers", tokenizers.__version__, "python", sys.version.split()[0])' 2>/dev/null)"
  echo "debian: $SUITE $(cat "$ROOTFS/etc/debian_version")"
  echo "qemu: $(qemu-aarch64-static --version | head -1)"
  for cpu in $CPUS; do echo "qemu cpu $cpu: $(cat "$WORK/arm64-$cpu.hwcap")"; done
} | tee "$WORK/versions.txt"
log "comparing"
"$PY" "$HERE/compare.py" "$WORK" "$CPUS" "$STRICT_CPUS"
