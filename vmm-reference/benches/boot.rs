// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Boot benchmark: process start -> guest `READY`, `poweroff` -> process exit, and the VMM's
//! resident memory, over N runs of the built-in test guest (`cargo bench -p vmm-reference`).
//! `BOOT_BENCH_RUNS` sets N (default 10), `BOOT_BENCH_CPUS` the `--cpus` value. With QEMU
//! unpacked by `ci/qemu-peer.sh` (or `$QEMU_PEER` naming a qemu-system-x86_64), the same runs
//! boot the same guest image under QEMU (SeaBIOS + PVH) in a column beside ours.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmm_reference::console::GuestConsole;

mod common;
use common::{backend, env_count, kvm_or_skip, pct, qemu_command, qemu_peer, record_row, report};

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
    let qemu = qemu_peer().map(|q| qemu_runs(&q, runs, &cpus));
    let mut t =
        format!("boot benchmark: test guest, --cpus {cpus} --memory 256M, {runs} runs, median (p90)\n");
    let peer = match &qemu {
        Some(Ok(_)) => "QEMU 7.2 (SeaBIOS, PVH)",
        _ => "",
    };
    t += &format!("{:<34} {:>22} {:>24}\n", "metric", "vmm-reference", peer);
    let mut rows = [
        ("process start -> READY (ms)", ready),
        ("poweroff -> process exit (ms)", exit),
        ("VMM RSS after boot (MiB)", rss),
        ("VMM peak RSS (MiB)", hwm),
    ];
    let mut peer_rows: Vec<Vec<f64>> = match qemu {
        Some(Ok(q)) => q,
        Some(Err(e)) => {
            t += &format!("(QEMU peer failed: {e})\n");
            Vec::new()
        }
        None => {
            t += "(no QEMU column: `bash ci/qemu-peer.sh` unpacks Debian's qemu-system-x86 into target/qemu-peer)\n";
            Vec::new()
        }
    };
    for (i, (name, v)) in rows.iter_mut().enumerate() {
        record_row("boot", name, pct(v, 0.5), v.len());
        let ours = format!("{:.2} ({:.2})", pct(v, 0.5), pct(v, 0.9));
        let theirs = peer_rows
            .get_mut(i)
            .map(|q| format!("{:.2} ({:.2})", pct(q, 0.5), pct(q, 0.9)))
            .unwrap_or_default();
        t += &format!("{name:<34} {ours:>22} {theirs:>24}\n");
    }
    println!("\n{t}");
    report::save("boot", "txt", &t);
    let mut series = vec![report::Series {
        name: "vmm-reference",
        values: &rows[0].1,
    }];
    if let Some(q) = peer_rows.first() {
        series.push(report::Series {
            name: "QEMU 7.2 (SeaBIOS, PVH)",
            values: q,
        });
    }
    let title = format!(
        "boot: process start -> guest READY, --cpus {cpus} ({})",
        backend()
    );
    report::save(
        "boot-ready",
        "svg",
        &report::ecdf(&title, "latency (ms)", &series),
    );
}

/// The same runs under QEMU: `-kernel` boots the test guest through its PVH note (SeaBIOS),
/// serial on stdio. Returns the four metric series in the order of the table.
fn qemu_runs(qemu: &Path, runs: usize, cpus: &str) -> Result<Vec<Vec<f64>>, String> {
    let (boot, max) = {
        let num = |k: &str| {
            cpus.split(',')
                .find_map(|kv| kv.strip_prefix(k))
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(1)
        };
        (num("boot="), num("max="))
    };
    let (mut ready, mut exit, mut rss, mut hwm) = (vec![], vec![], vec![], vec![]);
    for _ in 0..runs {
        let t0 = Instant::now();
        let mut child = qemu_command(qemu, boot, max, 256)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?);
        let mut line = Vec::new();
        loop {
            line.clear();
            if out.read_until(b'\n', &mut line).map_err(|e| e.to_string())? == 0 {
                let _ = child.kill();
                return Err("QEMU exited before READY".into());
            }
            if String::from_utf8_lossy(&line).contains("READY") {
                break;
            }
        }
        ready.push(t0.elapsed().as_secs_f64() * 1e3);
        rss.push(status_kib(child.id(), "VmRSS:").unwrap_or(0) as f64 / 1024.0);
        hwm.push(status_kib(child.id(), "VmHWM:").unwrap_or(0) as f64 / 1024.0);
        let t1 = Instant::now();
        child
            .stdin
            .as_mut()
            .ok_or("no stdin")?
            .write_all(b"poweroff\n")
            .map_err(|e| e.to_string())?;
        // SeaBIOS' ACPI makes S5 a QEMU exit; -no-reboot covers a reset.
        let st = child.wait().map_err(|e| e.to_string())?;
        exit.push(t1.elapsed().as_secs_f64() * 1e3);
        if !st.success() {
            return Err(format!("QEMU exited with {st}"));
        }
    }
    Ok(vec![ready, exit, rss, hwm])
}
