#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
"""Run a payload on a real upstream KVM: Debian's kvm-amd inside a QEMU-TCG VM ("L1").

QEMU's TCG emulates AMD SVM with nested paging, so a stock Debian cloud kernel booted under
`-accel tcg -cpu EPYC,+svm` loads kvm-amd and offers a hardware-style /dev/kvm. This tool packs
an initramfs (busybox, the kernel's kvm modules, the host files the payload needs at their host
paths together with their shared libraries), boots it, streams L1's console to stdout, copies
files back and exits with the payload's exit status.

    run.py --kernel 6.1 [--file PATH]... [--collect L1PATH=HOSTPATH]... [--env K=V]...
           [--smp 1] [--memory-mib 6144] [--timeout-s 1800] [--log FILE] -- 'shell command'

Needs target/nested from ci/nested/debs.sh. Exit status: the payload's; 124 on timeout;
125 when L1 never reached the payload (QEMU failed, no /dev/kvm in L1, ...).
"""

import argparse
import base64
import os
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NESTED = ROOT / "target" / "nested"
BEGIN, END, EXIT = "@@NESTED-FILE-BEGIN", "@@NESTED-FILE-END", "@@NESTED-EXIT"
KERNEL_LOG = re.compile(r"^\s*\[\s*\d+\.\d+\] ")
# The module to load; what it needs is found from its .modinfo and loaded first.
WANTED_MODULES = ["kvm-amd"]


def kernel_tree(kernel):
    tree = NESTED / f"k{kernel}"
    vmlinuz = sorted(tree.glob("boot/vmlinuz-*"))
    moddirs = sorted(tree.glob("lib/modules/*"))
    if not vmlinuz or not moddirs:
        raise SystemExit(f"nested: no kernel {kernel} under {tree} (run ci/nested/debs.sh)")
    return vmlinuz[0], moddirs[0]


def ko_bytes(path):
    """A module's plain ELF bytes (Debian 6.12 ships .ko.xz; busybox insmod wants plain .ko)."""
    data = path.read_bytes()
    for suffix, tool in ((".xz", "xz"), (".zst", "zstd")):
        if path.name.endswith(suffix):
            return subprocess.run([tool, "-dc"], input=data, capture_output=True, check=True).stdout
    return data


def module_files(moddir):
    """[(name.ko, plain bytes)] for kvm-amd and what it depends on, dependencies first.

    The .deb carries no modules.dep (depmod runs at install), so the order comes from each
    module's own "depends=" entry in its .modinfo section.
    """
    index = {}
    for path in moddir.rglob("*.ko*"):
        index[path.name.split(".ko")[0].replace("_", "-")] = path
    order, seen = [], set()

    def visit(name):
        name = name.replace("_", "-")
        if name in seen:
            return
        seen.add(name)
        data = ko_bytes(index[name])
        m = re.search(rb"\0depends=([^\0]*)\0", data)
        for dep in filter(None, (m.group(1).decode().split(",") if m else [])):
            visit(dep)
        order.append((name + ".ko", data))

    for want in WANTED_MODULES:
        visit(want)
    return order


def shared_libs(path, lib_path=""):
    """Absolute paths of the shared libraries an ELF file loads (empty for static or scripts),
    looking in `lib_path` (LD_LIBRARY_PATH form) first, as the payload will at run time."""
    env = dict(os.environ, LD_LIBRARY_PATH=lib_path) if lib_path else None
    r = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=env)
    libs = []
    for line in r.stdout.splitlines():
        m = re.search(r"(/\S+) \(0x", line)
        if m:
            libs.append(m.group(1))
    return libs


class Cpio:
    """A newc archive written without root or cpio(1): fixed inodes, mtime 0, uid/gid 0."""

    def __init__(self):
        self.parts, self.ino, self.dirs = [], 1000, set()

    def _entry(self, name, mode, data=b"", rdev=(0, 0)):
        self.ino += 1
        nb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nb), 0]
        hdr = ("070701" + "".join("%08X" % v for v in fields)).encode() + nb
        self.parts += [hdr, b"\0" * ((4 - len(hdr) % 4) % 4), data, b"\0" * ((4 - len(data) % 4) % 4)]

    def mkdir(self, name):
        name = name.strip("/")
        if not name or name in self.dirs:
            return
        self.mkdir(str(Path(name).parent)) if str(Path(name).parent) != "." else None
        self.dirs.add(name)
        self._entry(name, 0o040755)

    def file(self, name, data, mode=0o100755):
        name = name.strip("/")
        self.mkdir(str(Path(name).parent))
        self._entry(name, mode, data)

    def symlink(self, name, target):
        name = name.strip("/")
        self.mkdir(str(Path(name).parent))
        self._entry(name, 0o120777, target.encode())

    def node(self, name, mode, rdev):
        self._entry(name.strip("/"), mode, rdev=rdev)

    def bytes(self):
        self._entry("TRAILER!!!", 0)
        return b"".join(self.parts)


def add_host_file(cpio, path, added, lib_path=""):
    """Copy a host file (and, for ELF files, its libraries) to the same path in L1; a
    directory with everything under it."""
    path = os.path.abspath(path)
    if path in added:
        return
    added.add(path)
    real = os.path.realpath(path)
    if real != path:
        cpio.symlink(path, real)
        add_host_file(cpio, real, added, lib_path)
        return
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            add_host_file(cpio, os.path.join(path, name), added, lib_path)
        return
    data = Path(path).read_bytes()
    cpio.file(path, data, 0o100755 if os.access(path, os.X_OK) else 0o100644)
    if data[:4] == b"\x7fELF":
        for lib in shared_libs(path, lib_path):
            add_host_file(cpio, lib, added, lib_path)


INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
# /tmp stays on the initramfs root (writable): a tmpfs mounted there would hide host files
# packed under /tmp (a checkout in /tmp puts the test binaries there).
chmod 1777 /tmp
mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm
# Pseudo-terminals (/dev/ptmx needs a devpts on /dev/pts): `--serial pty` opens one.
mkdir -p /dev/pts && mount -t devpts -o ptmxmode=0666 devpts /dev/pts
ulimit -n 65536
for m in $(cat /modules/order); do insmod /modules/$m || echo "nested: insmod $m failed"; done
if [ ! -c /dev/kvm ]; then echo "nested: no /dev/kvm in L1"; echo "@@NESTED-EXIT 125"; poweroff -f; fi
echo "nested: L1 $(uname -r), $(nproc) CPUs, kvm-amd loaded, /dev/kvm ready"
cd /tmp
. /payload.env
sh /payload.sh
rc=$?
for spec in $(cat /collect.list); do
    f=${spec%%=*}
    [ -f "$f" ] || continue
    echo "@@NESTED-FILE-BEGIN $spec"; base64 "$f"; echo "@@NESTED-FILE-END"
done
echo "@@NESTED-EXIT $rc"
poweroff -f
"""


def build_initramfs(kernel, args, out):
    vmlinuz, moddir = kernel_tree(kernel)
    cpio = Cpio()
    for d in ["bin", "sbin", "dev", "proc", "sys", "tmp", "run", "usr/bin", "usr/sbin", "etc", "root"]:
        cpio.mkdir(d)
    cpio.node("dev/console", 0o020600, (5, 1))
    cpio.file("bin/busybox", (NESTED / "busybox/bin/busybox").read_bytes())
    cpio.symlink("bin/sh", "busybox")
    mods = module_files(moddir)
    for name, data in mods:
        cpio.file(f"modules/{name}", data, 0o100644)
    cpio.file("modules/order", " ".join(n for n, _ in mods).encode(), 0o100644)
    added = set()
    for f in args.file:
        add_host_file(cpio, f, added, args.lib_path)
    env = "".join(f"export {k}='{v}'\n" for k, v in (e.split("=", 1) for e in args.env))
    cpio.file("payload.env", env.encode(), 0o100644)
    cpio.file("payload.sh", args.command.encode(), 0o100755)
    cpio.file("collect.list", "\n".join(args.collect).encode(), 0o100644)
    cpio.file("init", INIT.encode())
    out.write_bytes(cpio.bytes())
    return vmlinuz


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernel", required=True, choices=["6.1", "6.12"])
    p.add_argument("--file", action="append", default=[], help="a host file or directory, packed at its path")
    p.add_argument("--lib-path", default="",
                   help="LD_LIBRARY_PATH-style folders where packed programs find their libraries")
    p.add_argument("--collect", action="append", default=[], help="L1PATH=HOSTPATH")
    p.add_argument("--env", action="append", default=[], help="K=V for the payload")
    p.add_argument("--smp", type=int, default=1,
                   help="L1 CPUs (default 1: multi-threaded TCG loses L1 wake-ups with 2)")
    p.add_argument("--memory-mib", type=int, default=6144)
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument("--idle-timeout-s", type=float, default=0,
                   help="kill L1 after this long without console output (a wedged L1; 0: never)")
    p.add_argument("--log", help="also write L1's console here")
    p.add_argument("--monitor", help="a Unix socket for QEMU's human monitor (debugging a wedged L1)")
    p.add_argument("--append", default="", help="more L1 kernel command line")
    p.add_argument("command")
    args = p.parse_args()
    work = NESTED / "work" / f"k{args.kernel}-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    try:
        initrd = work / "l1.cpio"
        vmlinuz = build_initramfs(args.kernel, args, initrd)
        return boot(args, vmlinuz, initrd)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def boot(args, vmlinuz, initrd):
    qemu = NESTED / "qemu" / "run-qemu"
    cmd = [str(qemu), "-accel", "tcg,thread=multi", "-cpu", "EPYC,+svm", "-smp", str(args.smp),
           "-m", str(args.memory_mib), "-kernel", str(vmlinuz), "-initrd", str(initrd),
           "-append", f"console=ttyS0 panic=-1 quiet mitigations=off {args.append}",
           "-nographic", "-no-reboot", "-nic", "none", "-serial", "stdio",
           "-monitor", f"unix:{args.monitor},server=on,wait=off" if args.monitor else "none"]
    log = open(args.log, "w", buffering=1) if args.log else None
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.timeout_s
    last_output = time.monotonic()
    rc, collecting, buf, pending = None, None, [], b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            print(f"nested: timed out after {args.timeout_s:.0f} s", flush=True)
            return 124
        idle = time.monotonic() - last_output
        if args.idle_timeout_s and idle > args.idle_timeout_s:
            # QEMU's TCG can lose L1 interrupts for good (both L1 CPUs stay in VMRUN, or one
            # halts with its timer pending); L1's own per-test timeouts then never print.
            proc.kill()
            print(f"nested: L1 wedged: no output for {idle:.0f} s", flush=True)
            return 124
        ready, _, _ = select.select([proc.stdout], [], [], min(left, 5))
        if not ready:
            continue
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").rstrip("\r")
            # Only the payload's output is progress: a wedged L1 can go on printing kernel
            # warnings (hung tasks every 120 s) while nothing else moves.
            if not KERNEL_LOG.match(line):
                last_output = time.monotonic()
            if collecting is not None:
                if line.startswith(END):
                    host = collecting.split("=", 1)[1]
                    Path(host).write_bytes(base64.b64decode("".join(buf)))
                    collecting, buf = None, []
                else:
                    buf.append(line)
                continue
            if line.startswith(BEGIN):
                collecting = line.split(" ", 1)[1]
                continue
            if line.startswith(EXIT):
                rc = int(line.split()[1])
            if log:
                log.write(line + "\n")
            print(line, flush=True)
    proc.wait()
    if rc is None:
        print(f"nested: L1 ended without a payload exit status (QEMU exit {proc.returncode})", flush=True)
        return 125
    return rc


if __name__ == "__main__":
    sys.exit(main())
