#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# The lapic_differential fuzz target (the LAPIC predictor against the real KVM) on kvm-amd,
# Linux 6.1 and 6.12, each in a QEMU-TCG VM: RUNS executions per kernel (default 1,000,000)
# from the committed seeds; prints libFuzzer's summary and exec/s. A crash fails the run and
# its input is printed (base64) in target/nested/results/fuzz-<kernel>.log.
#
#   bash ci/nested/fuzz-lapic.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/../.."
runs=${1:-1000000}
out="$PWD/target/nested/results"
mkdir -p "$out"
bash ci/nested/debs.sh || exit 2
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
RUSTC_BOOTSTRAP=1 cargo fuzz build lapic_differential >"$out/fuzz-build.log" 2>&1 \
    || { tail -20 "$out/fuzz-build.log" >&2; exit 1; }
bin="$PWD/fuzz/target/x86_64-unknown-linux-gnu/release/lapic_differential"
files=(--file "$bin")
for s in fuzz/seeds/lapic_differential/*; do files+=(--file "$PWD/$s"); done
# Both kernels side by side, one emulated CPU each (see ci/nested/kvm-tests.sh).
one_kernel() { # one_kernel KERNEL
    local k=$1 start rc
    start=$(date +%s)
    rm -f "$out/fuzz-$k.log"
    set +e
    python3 ci/nested/run.py --kernel "$k" --memory-mib 4096 "${files[@]}" --timeout-s 3600 --log "$out/fuzz-$k.log" \
        "set -o pipefail; mkdir -p /tmp/corpus && cp $PWD/fuzz/seeds/lapic_differential/* /tmp/corpus/ &&
         '$bin' /tmp/corpus -runs=$runs -print_final_stats=1 2>&1 | grep -E '^Done|stat::|panicked|ERROR|crash-'" \
        | grep --line-buffered -E '^(Done|stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb))|panicked|ERROR|crash-|nested:'
    rc=${PIPESTATUS[0]}
    set -e
    echo "fuzz lapic_differential on kvm-amd $k: $(( $(date +%s) - start )) s wall"
    [ "$rc" = 0 ] || { echo "fuzz lapic_differential on kvm-amd $k: FAILED" >&2; return 1; }
}
pids=()
for k in 6.1 6.12; do
    ( one_kernel "$k" ) 2>&1 | sed -u "s/^/[$k] /" &
    pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
for k in 6.1 6.12; do grep -q '^Done' "$out/fuzz-$k.log" 2>/dev/null || status=1; done
exit $status
