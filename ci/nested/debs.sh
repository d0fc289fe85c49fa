#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Debian packages for the nested-KVM runner, through a side apt configuration: its own sources
# (bookworm, -updates, -security, -backports), lists and cache under target/nested/apt. /etc/apt
# and the host's installed packages are not touched; nothing is installed, .debs are unpacked.
#
#   ci/nested/debs.sh            download (once) and unpack into target/nested/:
#     qemu/      QEMU 10.0 from bookworm-backports (system-x86, -common for the TCG module, -data, seabios) and the
#                shared libraries it needs that the host lacks (run it with qemu/run-qemu)
#     k6.1/      bookworm linux-image-cloud-amd64 (vmlinuz, kvm modules)
#     k6.12/     bookworm-backports linux-image-cloud-amd64
#     busybox    busybox-static
#   ci/nested/debs.sh --qemu-peer   also:
#     qemu-peer/ bookworm's QEMU 7.2 (system-x86, -data, seabios) and its libraries, run with
#                qemu-peer/run-qemu: the QEMU that runs *in* L1 beside vmm-reference (-accel kvm)
# Exit 2 with one line on stderr when the archive cannot be reached (the caller decides
# whether that is a SKIP or a failure).
set -euo pipefail
peer=0
[ "${1:-}" = --qemu-peer ] && peer=1
cd "$(dirname "$0")/../.."
top="$PWD/target/nested"
apt="$top/apt"
mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/debs" "$apt/etc/preferences.d"

cat > "$apt/etc/sources.list" <<SRC
deb http://deb.debian.org/debian bookworm main
deb http://deb.debian.org/debian bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
deb http://deb.debian.org/debian bookworm-backports main
SRC
cat > "$apt/apt.conf" <<CONF
Dir::Etc::SourceList "$apt/etc/sources.list";
Dir::Etc::SourceParts "$apt/etc/sources.list.d";
Dir::Etc::Preferences "$apt/etc/preferences";
Dir::Etc::PreferencesParts "$apt/etc/preferences.d";
Dir::State::Lists "$apt/lists";
Dir::State::status "/var/lib/dpkg/status";
Dir::Cache "$apt/cache";
Debug::NoLocking "true";
APT::Sandbox::User "root";
Acquire::Retries "3";
Acquire::http::Timeout "30";
CONF
export APT_CONFIG="$apt/apt.conf"
mkdir -p "$apt/etc/sources.list.d"

fail() { echo "nested: $*" >&2; exit 2; }
command -v apt-get >/dev/null 2>&1 || fail "apt-get not found (a Debian host is needed)"

# Lists are refreshed once a day at most (a second run reuses them and the .debs).
if [ -z "$(find "$apt/lists" -maxdepth 1 -name '*backports*Packages*' -mtime -1 2>/dev/null)" ]; then
    apt-get update -qq >"$apt/update.log" 2>&1 || fail "apt-get update failed: $(tail -1 "$apt/update.log")"
fi

# The kernel linux-image-cloud-amd64 points at: bookworm's candidate (its point releases and
# security updates; backports stay at priority 100), or with "-t bookworm-backports" 6.12.
kernel_pkg() {
    apt-cache depends "$@" "linux-image-cloud-amd64" 2>/dev/null \
        | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'
}
k61=$(kernel_pkg)
k612=$(kernel_pkg -t bookworm-backports)
[ -n "$k61" ] && [ -n "$k612" ] || fail "linux-image-cloud-amd64 not found in bookworm/bookworm-backports"

fetch() { # fetch PKG[=VERSION]... into $apt/debs (skips ones already there)
    local p
    for p in "$@"; do
        local name=${p%%=*} ver=""
        [ "$name" != "$p" ] && ver=${p#*=} && ver=${ver//:/%3a}
        ls "$apt/debs/${name}_${ver}"*.deb >/dev/null 2>&1 && continue
        (cd "$apt/debs" && apt-get download -q "$p" >/dev/null 2>>"$apt/download.log") \
            || fail "apt-get download $p failed: $(tail -1 "$apt/download.log")"
    done
}
# The newest version of a package in a suite: bookworm (with -updates/-security) or
# bookworm-backports.
suite_version() {
    local re='bookworm(-updates|-security)?/main'
    [ "$2" = backports ] && re='bookworm-backports/main'
    apt-cache madison "$1" | awk -F'|' -v re="$re" '$3 ~ re {gsub(/ /,"",$2); print $2; exit}'
}
# L1's QEMU is bookworm-backports' 10.0: QEMU 7.2's TCG SVM loses L1 interrupts under nested
# load (L1 halts with IF=1 and its timer vector pending in IRR, for good).
qemu_suite=${NESTED_QEMU_SUITE:-backports}
qemu_pkgs=(qemu-system-x86 qemu-system-common qemu-system-data)
pinned=()
for p in "${qemu_pkgs[@]}"; do pinned+=("$p=$(suite_version "$p" "$qemu_suite")"); done
fetch "${pinned[@]}" seabios busybox-static "$k61" "$k612"

unpack() { # unpack DEST DEB... (once; a stamp records what was unpacked)
    local dest=$1; shift
    local stamp="$dest/.unpacked"
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$*" ] && return 0
    rm -rf "$dest"; mkdir -p "$dest"
    local d; for d in "$@"; do dpkg-deb -x "$d" "$dest"; done
    echo "$*" > "$stamp"
}
unpack "$top/k6.1" "$apt/debs/${k61}_"*.deb
unpack "$top/k6.12" "$apt/debs/${k612}_"*.deb
unpack "$top/busybox" "$apt/debs/busybox-static_"*.deb
qdebs=()
for p in "${pinned[@]}"; do
    name=${p%%=*}; ver=${p#*=}
    qdebs+=("$(ls "$apt/debs/${name}_${ver//:/%3a}_"*.deb)")
done
unpack "$top/qemu" "${qdebs[@]}" "$apt/debs/"seabios_*.deb

# QEMU's shared libraries the host lacks: download and unpack them into its tree too, and run
# QEMU with LD_LIBRARY_PATH (three rounds cover libraries that need further libraries).
complete_libs() { # complete_libs TREE SUITE: writes TREE/run-qemu
    local tree=$1 suite=$2
    local qbin="$tree/usr/bin/qemu-system-x86_64"
    local libdir="$tree/usr/lib/x86_64-linux-gnu:$tree/lib/x86_64-linux-gnu"
    local missing so base ver pkg v
    for _ in 1 2 3; do
        missing=$(LD_LIBRARY_PATH="$libdir" ldd "$qbin" | awk '/not found/ {print $1}')
        [ -z "$missing" ] && break
        for so in $(echo "$missing" | sort -u); do
            base=${so%%.so*}; ver=${so##*.so.}
            case "$base" in *[0-9]) pkg="${base}-${ver}" ;; *) pkg="${base}${ver}" ;; esac
            v=$(suite_version "$pkg" "$suite"); [ -n "$v" ] || v=$(suite_version "$pkg" bookworm)
            [ -n "$v" ] || fail "no Debian package $pkg for $so"
            fetch "$pkg=$v"
            dpkg-deb -x "$apt/debs/${pkg}_${v//:/%3a}_"*.deb "$tree"
        done
    done
    missing=$(LD_LIBRARY_PATH="$libdir" ldd "$qbin" | awk '/not found/ {print $1}')
    [ -z "$missing" ] || fail "QEMU in $tree still misses libraries: $missing"
    cat > "$tree/run-qemu" <<RUN
#!/bin/sh
# QEMU unpacked from Debian (ci/nested/debs.sh); TCG is a loadable module.
export LD_LIBRARY_PATH="$libdir" QEMU_MODULE_DIR="$tree/usr/lib/x86_64-linux-gnu/qemu"
exec "$qbin" -L "$tree/usr/share/qemu" -L "$tree/usr/share/seabios" "\$@"
RUN
    chmod +x "$tree/run-qemu"
}
complete_libs "$top/qemu" "$qemu_suite"
echo "nested: kernels $k61 $k612; QEMU $("$top/qemu/run-qemu" --version | head -1)"

# The peer QEMU in L1 is bookworm's own 7.2 (what Debian users run), with KVM, not TCG.
if [ "$peer" = 1 ]; then
    ppinned=()
    for p in qemu-system-x86 qemu-system-data; do ppinned+=("$p=$(suite_version "$p" bookworm)"); done
    fetch "${ppinned[@]}"
    pdebs=()
    for p in "${ppinned[@]}"; do
        name=${p%%=*}; ver=${p#*=}
        pdebs+=("$(ls "$apt/debs/${name}_${ver//:/%3a}_"*.deb)")
    done
    unpack "$top/qemu-peer" "${pdebs[@]}" "$apt/debs/"seabios_*.deb
    complete_libs "$top/qemu-peer" bookworm
    echo "nested: peer QEMU $("$top/qemu-peer/run-qemu" --version | head -1)"
fi
