#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Build the Linux guest payload from Debian packages into target/linux-guest/:
#   vmlinuz              Debian's cloud kernel (bzImage; needs an ACPI MADT, which we provide)
#   initramfs.cpio.gz    busybox-static + an /init that prints LINUX_GUEST_READY on ttyS0 and
#                        then answers the agent protocol there (status, online/offline N,
#                        gpe mask|unmask, dirty start MIB|check, clock start|check,
#                        klog TEXT, irq N, spin N, sleep S, poweroff); memclock is
#                        ci/linux-guest/memclock.c
# Only Debian's package archive is contacted (apt-get download; no root needed for that part).
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/linux-guest
work="$out/work"
mkdir -p "$work"

# LINUX_GUEST_TREE=DIR (an unpacked kernel package) and LINUX_GUEST_BUSYBOX=FILE take the two
# packages from there instead (ci/nested/kvm-tests.sh passes what ci/nested/debs.sh unpacked).
if [ -n "${LINUX_GUEST_TREE:-}" ] && [ -n "${LINUX_GUEST_BUSYBOX:-}" ]; then
    cp "$LINUX_GUEST_TREE"/boot/vmlinuz-* "$out/vmlinuz"
    busybox="$LINUX_GUEST_BUSYBOX"
else
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: apt-get is required (Debian/Ubuntu host)" >&2
        exit 1
    fi
    if [ "$(id -u)" -eq 0 ] && [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v lock || true)" ]; then
        apt-get update -qq
    fi
    flavour="${FLAVOUR:-cloud-amd64}"
    image=$(apt-cache depends "linux-image-$flavour" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    if [ -z "$image" ]; then
        [ "$(id -u)" -eq 0 ] && apt-get update -qq
        image=$(apt-cache depends "linux-image-$flavour" | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    fi
    echo "kernel package: $image"
    ( cd "$work" && apt-get download -q "$image" busybox-static >/dev/null )
    rm -rf "$work/kernel" "$work/busybox"
    dpkg-deb -x "$work"/"$image"_*.deb "$work/kernel"
    dpkg-deb -x "$work"/busybox-static_*.deb "$work/busybox"
    cp "$work"/kernel/boot/vmlinuz-* "$out/vmlinuz"
    busybox="$work/busybox/bin/busybox"
fi
# The memory workload and clock watcher (static: the initramfs has no libc).
command -v gcc >/dev/null 2>&1 || { echo "error: gcc is required to build memclock" >&2; exit 1; }
gcc -static -O2 -Wall -Werror -o "$work/memclock" ci/linux-guest/memclock.c

python3 - "$busybox" "$out/initramfs.cpio.gz" "$work/memclock" <<'PY'
# A reproducible newc initramfs without root, cpio or mknod: fixed inodes, mtime 0, uid/gid 0.
import gzip, io, sys
busybox = open(sys.argv[1], "rb").read()
memclock = open(sys.argv[3], "rb").read()
init = rb"""#!/bin/busybox sh
# The guest agent: one command per line on ttyS0, each answered by lines ending in one
# starting with OK or ERR (the same framing as the test guest's console protocol).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm
# Only emergencies on the console: a kernel warning must not land inside a reply line.
dmesg -n 1
stty -echo 2>/dev/null
cpu=/sys/devices/system/cpu
# Per-CPU local APIC timer interrupts ("LOC" in /proc/interrupts): "0:812,1:790".
loc() {
    awk 'NR == 1 { for (i = 1; i <= NF; i++) id[i] = substr($i, 4) }
         $1 == "LOC:" { s = ""; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s = s (s ? "," : "") id[i-1] ":" $i; print s }' /proc/interrupts
}
st() {
    echo "OK online=$(cat $cpu/online) present=$(cat $cpu/present) possible=$(cat $cpu/possible) uptime=$(cut -d' ' -f1 /proc/uptime) loc=$(loc)"
}
# set_online N 0|1: through sysfs, as a user or udev rule does.
set_online() {
    if [ ! -e "$cpu/cpu$1/online" ]; then echo "ERR no cpu$1"; return; fi
    if echo "$2" > "$cpu/cpu$1/online"; then echo OK; else echo "ERR cpu$1 online=$2 failed"; fi
}
# The hotplug GPE (GPE0 bit 2 in this VMM's FADT): mask holds events pending in GPE0_STS.
# Not disable/enable: ACPICA clears a GPE's status when it enables it, which loses the event.
gpe() {
    case "$1" in mask|unmask) v=$1 ;; *) echo "ERR gpe mask|unmask"; return ;; esac
    if echo "$v" > /sys/firmware/acpi/interrupts/gpe02; then echo OK; else echo "ERR gpe02 $v"; fi
}
# acpi_eject N: what an administrator does to unplug CPU N from inside the guest: write 1 to
# the eject attribute of its ACPI processor device (the one whose _UID is N).
acpi_eject() {
    for d in /sys/bus/acpi/devices/ACPI0007:*; do
        [ "$(cat "$d/uid" 2>/dev/null)" = "$1" ] || continue
        if echo 1 > "$d/eject"; then echo OK; else echo "ERR eject $d"; fi
        return
    done
    echo "ERR no ACPI processor device with _UID $1"
}
echo "LINUX_GUEST_READY online=$(cat $cpu/online) present=$(cat $cpu/present) possible=$(cat $cpu/possible)"
while read -r cmd arg; do
    case "$cmd" in
        status) st ;;
        online) set_online "$arg" 1 ;;
        offline) set_online "$arg" 0 ;;
        gpe) gpe "$arg" ;;
        acpi-eject) acpi_eject "$arg" ;;
        # dirty start MIB | dirty check | clock start | clock check (see memclock.c)
        dirty|clock) set -- $arg; memclock "$cmd-$1" $2; r=$?
            [ $r -gt 128 ] && echo "ERR memclock killed by signal $((r - 128))" ;;
        # spin N: keep CPU N busy for a moment (an idle NO_HZ CPU takes no timer interrupt)
        spin) if taskset -c "$arg" sh -c 'i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done'; then
                  echo OK; else echo "ERR spin $arg"; fi ;;
        klog) echo "OK klog count=$(dmesg | grep -c -- "$arg")" ;;
        # irq N: interrupts of IRQ N on all CPUs so far (/proc/interrupts)
        irq) echo "OK irq count=$(awk -v n="$arg:" '$1 == n { s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; print s }' /proc/interrupts)" ;;
        sleep) if sleep "$arg"; then echo OK; else echo "ERR sleep"; fi ;;
        poweroff) echo "OK poweroff"; poweroff -f ;;
        "") ;;
        *) echo "ERR unknown command: $cmd" ;;
    esac
done
"""
entries = []
ino = [1000]
def add(name, mode, data=b"", rdev=(0, 0)):
    ino[0] += 1
    entries.append((name, mode, data, rdev, ino[0]))
for d in ["bin", "dev", "proc", "sys", "tmp", "run", "sbin", "usr", "usr/bin", "usr/sbin", "etc"]:
    add(d, 0o040755)
add("dev/console", 0o020600, rdev=(5, 1))
add("dev/ttyS0", 0o020660, rdev=(4, 64))
add("bin/busybox", 0o100755, busybox)
add("bin/sh", 0o120777, b"busybox")
add("bin/memclock", 0o100755, memclock)
add("init", 0o100755, init)
buf = io.BytesIO()
def pad(n):
    buf.write(b"\0" * ((4 - n % 4) % 4))
def write(name, mode, data, rdev, inode):
    nb = name.encode() + b"\0"
    hdr = "070701" + "".join("%08X" % v for v in [inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0])
    buf.write(hdr.encode()); buf.write(nb); pad(110 + len(nb)); buf.write(data); pad(len(data))
for e in entries:
    write(*e)
write("TRAILER!!!", 0, b"", (0, 0), 0)
with open(sys.argv[2], "wb") as f:
    f.write(gzip.compress(buf.getvalue(), mtime=0))
PY
ls -l "$out/vmlinuz" "$out/initramfs.cpio.gz"
