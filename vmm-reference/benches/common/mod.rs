// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers shared by the benchmarks.
#![allow(dead_code)]

pub mod qmp;
pub mod report;

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

/// The QEMU to compare with, if there is one: `$QEMU_PEER` (a qemu-system-x86_64, or a
/// wrapper that runs one), else Debian's QEMU 7.2 unpacked by `ci/qemu-peer.sh` or by
/// `ci/nested/debs.sh --qemu-peer`.
pub fn qemu_peer() -> Option<std::path::PathBuf> {
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    match std::env::var_os("QEMU_PEER") {
        Some(p) => Some(std::path::PathBuf::from(p)),
        None => [
            target.join("qemu-peer/root/usr/bin/qemu-system-x86_64"),
            target.join("nested/qemu-peer/run-qemu"),
        ]
        .into_iter()
        .find(|p| p.exists()),
    }
    .filter(|p| p.exists())
}

/// QEMU booting the test guest like our VMM does: KVM, `boot` of `max` CPUs, `mem_mib` of RAM,
/// `-kernel` through the image's PVH note (SeaBIOS), the serial port on stdio.
pub fn qemu_command(qemu: &std::path::Path, boot: u32, max: u32, mem_mib: u32) -> std::process::Command {
    let share = qemu.join("../../share");
    let mut c = std::process::Command::new(qemu);
    // Firmware next to an unpacked binary (a wrapper script passes its own -L).
    for d in ["qemu", "seabios"]
        .map(|d| share.join(d))
        .iter()
        .filter(|d| d.is_dir())
    {
        c.arg("-L").arg(d);
    }
    // PVM only: it refuses the IA32_ARCH_CAPABILITIES value (MSR 0x10a) QEMU writes for
    // `-cpu host`, and QEMU aborts; with the feature off QEMU writes 0, which PVM takes.
    let cpu = match std::path::Path::new("/sys/module/kvm_pvm").exists() {
        true => "host,arch-capabilities=off",
        false => "host",
    };
    c.args([
        "-accel",
        "kvm",
        "-cpu",
        cpu,
        "-nographic",
        "-nodefaults",
        "-no-reboot",
    ])
    .args(["-serial", "stdio", "-m"])
    .arg(mem_mib.to_string())
    .arg("-smp")
    .arg(format!("{boot},maxcpus={max}"))
    .arg("-kernel")
    .arg(test_guest::elf_path());
    c
}

/// Record one result row for `ci/bench-nested.sh`, which runs the same benchmark binaries on
/// the host and in nested L1 VMs and prints them side by side: with `$BENCH_ROWS` naming a
/// file, appends `bench<TAB>metric<TAB>median<TAB>n`. Without it, does nothing.
pub fn record_row(bench: &str, metric: &str, median: f64, n: usize) {
    use std::io::Write;
    let Some(path) = std::env::var_os("BENCH_ROWS") else {
        return;
    };
    let line = format!("{bench}\t{metric}\t{median:.3}\t{n}\n");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = f.write_all(line.as_bytes());
    }
}

/// The KVM backend this benchmark runs on, for its table title.
pub fn backend() -> &'static str {
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "PVM software KVM"
    } else if std::path::Path::new("/sys/module/kvm_amd").exists() {
        "kvm-amd"
    } else if std::path::Path::new("/sys/module/kvm_intel").exists() {
        "kvm-intel"
    } else {
        "KVM"
    }
}
