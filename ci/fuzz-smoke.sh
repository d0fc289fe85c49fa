#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
#
# Run every cargo-fuzz target briefly (FUZZ_SECONDS each, default 20). Installs cargo-fuzz
# from crates.io when missing. cargo-fuzz passes unstable sanitizer flags to rustc;
# RUSTC_BOOTSTRAP=1 lets the stable toolchain (the only one on these machines) accept them.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${FUZZ_SECONDS:-20}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --quiet
fi
export RUSTC_BOOTSTRAP=1
targets=$(cargo fuzz list)
for t in $targets; do
    mkdir -p "fuzz/corpus/$t"
    if [ -d "fuzz/seeds/$t" ]; then cp -n fuzz/seeds/"$t"/* "fuzz/corpus/$t/" 2>/dev/null || true; fi
    echo "==> fuzzing $t for ${secs}s"
    log=$(mktemp)
    if ! cargo fuzz run "$t" "fuzz/corpus/$t" -- -max_total_time="$secs" -print_final_stats=1 >"$log" 2>&1; then
        tail -40 "$log" >&2
        echo "error: fuzz target $t failed (reproducer in fuzz/artifacts/$t/)" >&2
        rm -f "$log"
        exit 1
    fi
    grep -E "^Done|stat::number_of_executed_units|stat::peak_rss_mb" "$log" || true
    echo "corpus: $(ls "fuzz/corpus/$t" | wc -l) inputs"
    rm -f "$log"
done
