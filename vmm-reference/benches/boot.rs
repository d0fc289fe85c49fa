// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Boot benchmark: process start -> guest `READY`, `poweroff` -> process exit, and the VMM's
//! resident memory, over N runs of the built-in test guest (`cargo bench -p vmm-reference`).
//! `BOOT_BENCH_RUNS` sets N (default 10), `BOOT_BENCH_CPUS` the `--cpus` value.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmm_reference::console::GuestConsole;

mod common;
use common::{env_count, kvm_or_skip, pct};

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn main() {
    if !kvm_or_skip("boot") {
        return;
    }
    let runs = env_count("BOOT_BENCH_RUNS", 10);
    let cpus = std::env::var("BOOT_BENCH_CPUS").unwrap_or_else(|_| "boot=2,max=8".into());
    let dir = std::env::temp_dir().join(format!("vmmref-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (mut ready, mut exit, mut rss, mut hwm) = (vec![], vec![], vec![], vec![]);
    for i in 0..runs {
        let sock = dir.join(format!("c{i}.sock"));
        let t0 = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_vmm-reference"))
            .args(["run", "--cpus", &cpus, "--memory", "256M", "--serial"])
            .arg(format!("socket={}", sock.display()))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn");
        let mut con = GuestConsole::connect(Path::new(&sock), Duration::from_secs(10)).expect("console");
        con.wait_for("READY", Duration::from_secs(30)).expect("READY");
        ready.push(t0.elapsed().as_secs_f64() * 1e3);
        con.status(Duration::from_secs(10)).expect("status");
        rss.push(status_kib(child.id(), "VmRSS:").unwrap_or(0) as f64 / 1024.0);
        hwm.push(status_kib(child.id(), "VmHWM:").unwrap_or(0) as f64 / 1024.0);
        let t1 = Instant::now();
        con.command("poweroff", Duration::from_secs(10))
            .expect("poweroff");
        let st = child.wait().expect("wait");
        exit.push(t1.elapsed().as_secs_f64() * 1e3);
        assert!(st.success());
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("\nvmm-reference boot benchmark: test guest, --cpus {cpus} --memory 256M, {runs} runs");
    println!(
        "{:<38} {:>9} {:>9} {:>9} {:>9}",
        "metric", "median", "p90", "min", "max"
    );
    for (name, v) in [
        ("process start -> READY (ms)", &mut ready),
        ("poweroff -> process exit (ms)", &mut exit),
        ("VMM RSS after boot (MiB)", &mut rss),
        ("VMM peak RSS (MiB)", &mut hwm),
    ] {
        let (med, p90) = (pct(v, 0.5), pct(v, 0.9));
        let (min, max) = (v[0], v[v.len() - 1]);
        println!("{name:<38} {med:>9.2} {p90:>9.2} {min:>9.2} {max:>9.2}");
    }
    println!("(no QEMU peer column yet: Debian bookworm's qemu-system-x86 7.2 conflicts with the installed qemu-utils 10.0)");
}
