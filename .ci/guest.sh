#!/usr/bin/env bash
# Run a command inside a throw-away Linux guest that has SocketCAN (vcan0 up), because the
# kernel of CI machines has no AF_CAN. Debian's packages only: qemu-system-x86 (software
# emulation: KVM here cannot boot a stock kernel), Debian's stock kernel downloaded with
# `apt-get download` and unpacked (never installed), busybox-static for the initramfs, and
# can-utils as the peer inside the guest.
#
# The guest has no root filesystem of its own: it mounts the host's / read-only over 9p,
# puts an overlayfs with a tmpfs upper layer on it and chroots there, so the checkout, the
# venv, mosquitto, can-utils and valgrind are all the host's, at the same paths, and nothing
# the guest writes reaches the host except through its run folder (.ci/guest-cache/run.*):
# the command's exit status and the console log (.ci/guest-cache/run.*, removed after).
#
#   .ci/guest.sh [--mem MB] [--timeout S] -- COMMAND...   (runs COMMAND in the checkout)
#   .ci/guest.sh --prepare                                (only download and build the cache)
#
# Exit status: the command's, or 124 when the guest did not finish in time twice.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=$ROOT/.ci/guest-cache      # gitignored: the kernel package, vmlinux, initramfs
MEM=1536
TIMEOUT=${GUEST_TIMEOUT:-600}
BOOT_TIMEOUT=${GUEST_BOOT_TIMEOUT:-60}
PREPARE_ONLY=0
while [ $# -gt 0 ]; do
  case $1 in
    --mem) MEM=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --prepare) PREPARE_ONLY=1; shift ;;
    --) shift; break ;;
    *) echo "guest.sh: unknown option $1 (usage: guest.sh [--mem MB] [--timeout S] -- CMD...)" >&2
       exit 2 ;;
  esac
done

need() {
  local missing=()
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "guest.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}
need qemu-system-x86 busybox-static can-utils xz-utils

mkdir -p "$CACHE"
# --- the kernel: whatever linux-image-amd64 points at today, unpacked into the cache
KPKG=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$KPKG" ]; then
  apt-get update -qq
  KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
KVER=${KPKG#linux-image-}
KDIR=$CACHE/$KVER
if [ ! -s "$KDIR/initrd.cpio.gz" ]; then
  echo "guest.sh: preparing kernel $KVER in $KDIR"
  rm -rf "$KDIR" && mkdir -p "$KDIR"
  deb=$(ls "$CACHE"/"${KPKG}"_*.deb 2>/dev/null | head -1 || true)
  if [ -z "$deb" ]; then
    (cd "$CACHE" && apt-get download "$KPKG" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    deb=$(ls "$CACHE"/"${KPKG}"_*.deb | head -1)
  fi
  mods="lib/modules/$KVER/kernel"
  dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$KDIR" --wildcards \
    "./boot/vmlinuz-$KVER" "./lib/modules/$KVER/modules.*" \
    "./$mods/net/can" "./$mods/drivers/net/can/vcan.ko" "./$mods/drivers/net/can/dev" \
    "./$mods/drivers/virtio" "./$mods/net/9p" "./$mods/fs/9p" "./$mods/fs/netfs" \
    "./$mods/fs/fscache" "./$mods/fs/overlayfs"
  # The uncompressed ELF inside the bzImage boots by PVH in about half the time.
  off=$(LC_ALL=C grep -obUaP '\xfd\x37\x7a\x58\x5a\x00' "$KDIR/boot/vmlinuz-$KVER" | head -1 | cut -d: -f1 || true)
  if [ -n "$off" ]; then
    tail -c +$((off + 1)) "$KDIR/boot/vmlinuz-$KVER" | xz -dc >"$KDIR/vmlinux" 2>/dev/null || true
  fi
  # xz complains about the bytes after the stream; only the ELF magic says it worked
  if [ "$(head -c 4 "$KDIR/vmlinux" 2>/dev/null | od -An -tx1 | tr -d ' ')" != "7f454c46" ]; then
    rm -f "$KDIR/vmlinux"
  fi
  # initramfs: static busybox, the modules, our init
  ird=$KDIR/initrd
  mkdir -p "$ird/bin" "$ird/lib/modules"
  cp /bin/busybox "$ird/bin/busybox"
  mv "$KDIR/lib/modules/$KVER" "$ird/lib/modules/"
  busybox depmod -b "$ird" "$KVER"
  cp "$ROOT/.ci/guest-init" "$ird/init"
  chmod +x "$ird/init"
  (cd "$ird" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 >"$KDIR/initrd.cpio.gz")
fi
# the init script may change without the kernel changing
if [ "$ROOT/.ci/guest-init" -nt "$KDIR/initrd.cpio.gz" ]; then
  cp "$ROOT/.ci/guest-init" "$KDIR/initrd/init"
  (cd "$KDIR/initrd" && find . | busybox cpio -o -H newc 2>/dev/null | gzip -1 >"$KDIR/initrd.cpio.gz")
fi
[ "$PREPARE_ONLY" = 1 ] && { echo "guest.sh: cache ready ($KVER)"; exit 0; }
[ $# -gt 0 ] || { echo "guest.sh: no command given (guest.sh -- CMD...)" >&2; exit 2; }

KERNEL=$KDIR/vmlinux
[ -s "$KERNEL" ] || KERNEL=$KDIR/boot/vmlinuz-$KVER

# one folder per run (several guests may run at once): cmd.sh in, status and console out
RUN=$(mktemp -d "$CACHE/run.XXXXXX")
trap 'rm -rf "$RUN"' EXIT
{
  echo "cd $(printf %q "$ROOT")"
  printf '%q ' "$@"
  echo
} >"$RUN/cmd.sh"

boot() {
  local serial=$RUN/console.log
  rm -f "$RUN/status" "$serial"
  : >"$serial"
  qemu-system-x86_64 -accel tcg,thread=multi -cpu max -smp "$(nproc)" -m "$MEM" \
    -nographic -monitor none -no-reboot -nic none \
    -serial "file:$serial" \
    -kernel "$KERNEL" -initrd "$KDIR/initrd.cpio.gz" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 GUEST_RUN=$RUN" \
    -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap \
    -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot \
    -fsdev local,id=run,path="$RUN",security_model=none \
    -device virtio-9p-pci,fsdev=run,mount_tag=run \
    </dev/null >"$RUN/qemu.log" 2>&1 &
  local qpid=$! shown=0 deadline=$((SECONDS + TIMEOUT)) booted=$((SECONDS + BOOT_TIMEOUT))
  # follow the console (CI has no stdin, so -serial stdio would hang)
  while kill -0 "$qpid" 2>/dev/null; do
    shown=$(follow "$serial" "$shown")
    if [ $SECONDS -ge $booted ] && ! grep -q 'guest-init: running' "$serial"; then
      echo "guest.sh: guest did not boot within ${BOOT_TIMEOUT}s; stopping it" >&2
      kill "$qpid" 2>/dev/null || true
      wait "$qpid" 2>/dev/null || true
      return 126
    fi
    if [ $SECONDS -ge $deadline ]; then
      echo "guest.sh: guest did not finish within ${TIMEOUT}s; stopping it" >&2
      kill "$qpid" 2>/dev/null || true
      wait "$qpid" 2>/dev/null || true
      return 124
    fi
    sleep 0.5
  done
  wait "$qpid" 2>/dev/null || true
  follow "$serial" "$shown" >/dev/null
  if [ ! -s "$RUN/status" ]; then
    echo "guest.sh: guest stopped without a status (qemu: $(tail -3 "$RUN/qemu.log" | tr '\n' ' '))" >&2
    return 125
  fi
  return "$(cat "$RUN/status")"
}

follow() {  # print what the file gained since byte $2; echo the new size on stdout's last line
  local size
  size=$(stat -c %s "$1" 2>/dev/null || echo 0)
  if [ "$size" -gt "$2" ]; then
    tail -c +$(($2 + 1)) "$1" | head -c $((size - $2)) >&2
  fi
  echo "$size"
}

# A boot hangs about once in 30 under emulation: one retry, only for a boot that never
# reached the command (a command that hangs is the command's failure, not the boot's).
rc=0
boot || rc=$?
if [ $rc -eq 126 ]; then
  echo "guest.sh: retrying the boot once" >&2
  rc=0
  boot || rc=$?
fi
exit $rc
