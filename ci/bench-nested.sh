#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# The benchmarks on this host's KVM and on real upstream KVM (kvm-amd on Linux 6.1 and 6.12 in
# QEMU TCG, ci/nested/run.py), printed as one table with a column per KVM. The same release
# binaries run everywhere; each L1 boots once and runs all of them: boot, hotplug, migration
# (the test guest) and linux (a Debian Linux guest under vmm-reference and under Debian's
# QEMU 7.2 side by side; it needs hardware KVM, so only L1 runs it). TCG makes L1 slower per
# operation: compare L1 columns with each other and read the host column as the same code on
# a different backend, not as a speed-up factor.
#
#   bash ci/bench-nested.sh [6.1] [6.12]
# Env: sample counts as for the benchmarks (BOOT_BENCH_RUNS, HOTPLUG_BENCH_SAMPLES,
# MIGRATION_BENCH_SAMPLES, LINUX_BENCH_RUNS); L1 runs use 5/10/3/5 unless set.
# BENCH_ONLY: a regex on benchmark names (e.g. "linux") runs only those.
set -euo pipefail
cd "$(dirname "$0")/.."
kernels=("$@")
[ ${#kernels[@]} -gt 0 ] || kernels=(6.1 6.12)
out="$PWD/target/nested/bench"
mkdir -p "$out"
bash ci/nested/debs.sh --qemu-peer || exit 2
LINUX_GUEST_TREE="$PWD/target/nested/k6.1" LINUX_GUEST_BUSYBOX="$PWD/target/nested/busybox/bin/busybox" \
    bash ci/linux-guest.sh >"$out/linux-guest.log" 2>&1 || { tail -5 "$out/linux-guest.log" >&2; exit 1; }
peer="$PWD/target/nested/qemu-peer"

cargo bench -p vmm-reference --locked --no-run --message-format=json 2>"$out/build.log" >"$out/build.json" \
    || { tail -20 "$out/build.log" >&2; exit 1; }
mapfile -t benches < <(python3 - "$out/build.json" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["target"]["name"] + " " + m["executable"])
PY
)
if [ -n "${BENCH_ONLY:-}" ]; then
    mapfile -t benches < <(printf '%s\n' "${benches[@]}" | grep -E "^(${BENCH_ONLY}) ")
fi
[ ${#benches[@]} -gt 0 ] || { echo "bench-nested: no benchmark binaries" >&2; exit 1; }
# The Linux payload and the peer QEMU (binary, libraries, firmware) go into L1 too.
files=(--file "$PWD/target/release/vmm-reference" --file "$PWD/target/linux-guest/vmlinuz" --file "$PWD/target/linux-guest/initramfs.cpio.gz"
    --file "$peer/run-qemu" --file "$peer/usr/bin/qemu-system-x86_64"
    --file "$peer/usr/share/qemu" --file "$peer/usr/share/seabios"
    --lib-path "$peer/usr/lib/x86_64-linux-gnu:$peer/lib/x86_64-linux-gnu")
run_all="set -e; mkdir -p '$PWD/vmm-reference'; cd '$PWD/vmm-reference'
"
for b in "${benches[@]}"; do
    exe=${b#* }
    files+=(--file "$exe")
    run_all+="'$exe' --bench
"
done

columns=()
if [ -c /dev/kvm ]; then
    host="host $(uname -r | cut -d- -f1)"
    [ -d /sys/module/kvm_pvm ] && host="PVM $(uname -r | cut -d- -f1)"
    rm -f "$out/host.tsv"
    (cd vmm-reference && BENCH_ROWS="$out/host.tsv" bash -c "$run_all") | tee "$out/host.log"
    columns+=("$host=$out/host.tsv")
fi
for k in "${kernels[@]}"; do
    rm -f "$out/l1-$k.tsv"
    python3 ci/nested/run.py --kernel "$k" "${files[@]}" --timeout-s 3000 \
        --env BENCH_ROWS=/tmp/rows.tsv --env BOOT_BENCH_RUNS="${BOOT_BENCH_RUNS:-5}" \
        --env HOTPLUG_BENCH_SAMPLES="${HOTPLUG_BENCH_SAMPLES:-10}" \
        --env MIGRATION_BENCH_SAMPLES="${MIGRATION_BENCH_SAMPLES:-3}" \
        --env LINUX_BENCH_RUNS="${LINUX_BENCH_RUNS:-5}" --env QEMU_PEER="$peer/run-qemu" \
        --collect "/tmp/rows.tsv=$out/l1-$k.tsv" --log "$out/l1-$k.log" "$run_all" \
        | grep --line-buffered -v "TCG doesn't support requested feature" \
        || { echo "bench-nested: L1 $k failed (log $out/l1-$k.log)" >&2; exit 1; }
    columns+=("L1 kvm-amd $k=$out/l1-$k.tsv")
done

python3 - "${columns[@]}" <<'PY' | tee "$out/table.txt"
import sys
cols, rows, order = [], {}, []
for spec in sys.argv[1:]:
    name, path = spec.split("=", 1)
    cols.append(name)
    try:
        lines = open(path).read().splitlines()
    except FileNotFoundError:
        lines = []
    for line in lines:
        bench, metric, med, n = line.split("\t")
        key = (bench, metric)
        if key not in rows:
            rows[key] = {}
            order.append(key)
        rows[key][name] = f"{float(med):.2f} (n={n})"
print("\nbenchmarks side by side: median per KVM (same binaries, same test guest)")
print(f"{'benchmark / metric':<58}" + "".join(f"{c:>22}" for c in cols))
for bench, metric in order:
    print(f"{bench + ': ' + metric:<58}" + "".join(f"{rows[(bench, metric)].get(c, '-'):>22}" for c in cols))
PY
