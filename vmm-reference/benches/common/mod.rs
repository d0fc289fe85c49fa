// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers shared by the benchmarks.
#![allow(dead_code)]

/// Whether `/dev/kvm` can be opened; prints why `bench` is skipped when it cannot.
pub fn kvm_or_skip(bench: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        println!("{bench} benchmark skipped: /dev/kvm is not usable");
    }
    ok
}

/// A count from the environment variable `var`, or `default`.
pub fn env_count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile (0..=1) of `v` (sorted in place).
pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}
