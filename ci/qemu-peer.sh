#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# QEMU as a side-by-side peer for the benchmarks, from Debian's packages: qemu-system-x86,
# qemu-system-data and seabios are downloaded and unpacked into target/qemu-peer/root (not
# installed: on these machines Debian bookworm's qemu-system-x86 7.2 conflicts with the
# installed qemu-utils 10.0 from backports), and the shared libraries they need are installed
# with apt-get. Prints the path of qemu-system-x86_64. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
dest="$PWD/target/qemu-peer"
bin="$dest/root/usr/bin/qemu-system-x86_64"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
if [ ! -x "$bin" ]; then
    mkdir -p "$dest/debs"
    (cd "$dest/debs" && apt-get download qemu-system-x86 qemu-system-data seabios >/dev/null 2>&1) || {
        $sudo apt-get update -qq
        (cd "$dest/debs" && apt-get download qemu-system-x86 qemu-system-data seabios >/dev/null)
    }
    for d in "$dest"/debs/*.deb; do dpkg -x "$d" "$dest/root"; done
fi
missing=$(ldd "$bin" | awk '/not found/ {print $1}')
if [ -n "$missing" ]; then
    # Map each missing soname to its Debian package (libfoo.so.N -> libfooN, the usual rule).
    pkgs=$(for so in $missing; do
        base=${so%%.so*}; ver=${so##*.so.}
        case "$base" in
            *[0-9]) echo "${base}-${ver}" ;;
            *) echo "${base}${ver}" ;;
        esac
    done | sort -u)
    $sudo apt-get install -y -qq --no-install-recommends $pkgs >/dev/null
fi
if ldd "$bin" | grep -q 'not found'; then
    echo "error: $bin still misses: $(ldd "$bin" | awk '/not found/ {print $1}' | tr '\n' ' ')" >&2
    exit 1
fi
echo "$bin"
