// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Snapshot, restore and live-migration benchmark with the test guest
//! (`cargo bench -p vmm-reference --bench migration`): a 1 GiB VM with 4 of 8 CPUs present,
//! one of them offlined by the guest (the partially offline case):
//! - snapshot: time the VM is paused to write `state.bin` + `memory.bin`;
//! - restore: process start -> first guest reply (RAM mapped copy-on-write);
//! - live migration over a Unix socket, idle guest and with the guest rewriting 16 MiB of
//!   pages on every tick: total time and downtime (pause -> destination acknowledgement).
//!
//! `MIGRATION_BENCH_SAMPLES` sets the samples per row (default 5). Cloud Hypervisor's numbers
//! for the same operations on a machine of this kind (1 GiB, from the project's reference
//! notes; no Linux guest or CH binary is available here to run side by side) are printed
//! beside ours for scale.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm_reference::api::request;
use vmm_reference::console::GuestConsole;

mod common;
use common::{backend, env_count, kvm_or_skip, pct, record_row, report};

const T: Duration = Duration::from_secs(60);

struct Proc {
    child: Child,
    api: PathBuf,
    con: GuestConsole,
}

fn spawn(dir: &Path, name: &str, args: &[&str]) -> (Child, PathBuf, PathBuf) {
    let (api, con) = (
        dir.join(format!("{name}-api.sock")),
        dir.join(format!("{name}-con.sock")),
    );
    let child = Command::new(env!("CARGO_BIN_EXE_vmm-reference"))
        .arg("run")
        .args(args)
        .arg("--api-socket")
        .arg(&api)
        .arg("--serial")
        .arg(format!("socket={}", con.display()))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    (child, api, con)
}

fn attach(child: Child, api: PathBuf, con: &Path) -> Proc {
    Proc {
        child,
        api,
        con: GuestConsole::connect(con, T).expect("console"),
    }
}

fn call(api: &Path, method: &str, ep: &str, body: Option<&str>) -> serde_json::Value {
    let (s, b) = request(api, method, ep, body).expect("API");
    assert!(s < 300, "{ep}: {s} {b}");
    serde_json::from_str(&b).unwrap_or(serde_json::Value::Null)
}

fn ok(p: &mut Proc, cmd: &str) {
    let r = p.con.command(cmd, T).expect(cmd);
    assert!(r.last().is_some_and(|l| l.starts_with("OK")), "{cmd}: {r:?}");
}

fn stats(v: &mut [f64]) -> (f64, f64) {
    (pct(v, 0.5), pct(v, 1.0))
}

/// Migrate `src` to a new process aiming at `downtime_ms` in at most `max_rounds` pre-copy
/// rounds; returns (the new process, total ms, downtime ms, the report's pre-copy rounds).
fn migrate(
    dir: &Path,
    src: Proc,
    n: usize,
    downtime_ms: u64,
    max_rounds: u32,
) -> (Proc, f64, f64, Vec<serde_json::Value>) {
    let mig = dir.join(format!("mig{n}.sock"));
    let incoming = format!("unix:{}", mig.display());
    let (child, api, con) = spawn(dir, &format!("dst{n}"), &["--incoming", &incoming]);
    let deadline = Instant::now() + T;
    while !mig.exists() {
        assert!(Instant::now() < deadline, "destination never listened");
        std::thread::sleep(Duration::from_millis(2));
    }
    let body = serde_json::json!({ "destination_url": incoming, "downtime_ms": downtime_ms,
        "max_rounds": max_rounds })
    .to_string();
    let r = call(&src.api, "PUT", "vm.send-migration", Some(&body));
    let mut old = src.child;
    let _ = old.wait();
    let total = r["total_ms"].as_f64().unwrap_or(f64::NAN);
    let down = r["downtime_ms"].as_f64().unwrap_or(f64::NAN);
    let rounds = r["rounds"].as_array().cloned().unwrap_or_default();
    let mut p = attach(child, api, &con);
    let check = p.con.command("dirty check", T).expect("dirty check");
    assert!(check.last().is_some_and(|l| l.contains(" bad=0 ")), "{check:?}");
    (p, total, down, rounds)
}

fn main() {
    if !kvm_or_skip("migration") {
        return;
    }
    let n = env_count("MIGRATION_BENCH_SAMPLES", 5).max(1);
    let dir = std::env::temp_dir().join(format!("vmmref-migbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    let (child, api, con) = spawn(&dir, "src", &["--cpus", "boot=2,max=8", "--memory", "1G"]);
    let mut vm = attach(child, api, &con);
    vm.con.wait_for("READY", T).expect("READY");
    call(&vm.api, "PUT", "vm.resize", Some(r#"{"desired_vcpus":4}"#));
    for _ in 0..2 {
        vm.con.wait_for("EVENT insert", T).expect("insert");
    }
    ok(&mut vm, "offline 3");

    // Snapshot n times (the VM runs on), restore each into a new process.
    let (mut snap_ms, mut restore_ms, mut state_kib) = (Vec::new(), Vec::new(), 0.0);
    for i in 0..n {
        let d = dir.join(format!("snap{i}"));
        let body = serde_json::json!({ "destination_url": d.display().to_string() }).to_string();
        let r = call(&vm.api, "PUT", "vm.snapshot", Some(&body));
        snap_ms.push(r["paused_ms"].as_f64().unwrap_or(f64::NAN));
        state_kib = r["state_bytes"].as_f64().unwrap_or(0.0) / 1024.0;
        let t = Instant::now();
        let (child, api, con) = spawn(&dir, &format!("restored{i}"), &["--restore", d.to_str().unwrap()]);
        let mut p = attach(child, api, &con);
        ok(&mut p, "resetgaps");
        restore_ms.push(t.elapsed().as_secs_f64() * 1e3);
        ok(&mut p, "poweroff");
        let _ = p.child.wait();
        let _ = std::fs::remove_dir_all(&d);
    }

    // Live migration, idle guest, then with the dirtying workload.
    let (mut idle_total, mut idle_down) = (Vec::new(), Vec::new());
    for i in 0..n {
        let (p, t, d, _) = migrate(&dir, vm, i, 50, 30);
        vm = p;
        idle_total.push(t);
        idle_down.push(d);
    }
    ok(&mut vm, "dirty start 4096");
    let (mut busy_total, mut busy_down, mut busy_rounds) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n {
        let (p, t, d, r) = migrate(&dir, vm, n + i, 50, 30);
        vm = p;
        busy_total.push(t);
        busy_down.push(d);
        busy_rounds.push(r.len() as f64);
    }
    // For the per-round plot: with a 0 ms target pre-copy goes on until a round in which the
    // guest dirtied nothing, or for 8 rounds: what each round sends and what is dirtied meanwhile.
    let (p, _, _, r) = migrate(&dir, vm, 2 * n, 0, 8);
    vm = p;
    let last_rounds = r;
    ok(&mut vm, "poweroff");
    let _ = vm.child.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let mut t = format!(
        "vmm-reference snapshot / restore / live migration (test guest, 1 GiB, 4 of 8 CPUs present, 1 offline;\n\
         {}; Unix socket). CH = Cloud Hypervisor on this machine kind, reference notes.\n\
         {:<46} {:>4} {:>10} {:>10} {:>16}\n",
        backend(),
        "metric",
        "n",
        "median",
        "max",
        "CH (notes)"
    );
    let rows: [(&str, &mut Vec<f64>, &str); 7] = [
        ("snapshot: VM paused (ms)", &mut snap_ms, "1150 (total)"),
        (
            "restore: process start -> guest reply (ms)",
            &mut restore_ms,
            "32 (ondemand)",
        ),
        ("migration, idle: total (ms)", &mut idle_total, "740"),
        ("migration, idle: downtime (ms)", &mut idle_down, "8"),
        ("migration, dirtying: total (ms)", &mut busy_total, "2780"),
        ("migration, dirtying: downtime (ms)", &mut busy_down, "42"),
        ("migration, dirtying: pre-copy rounds", &mut busy_rounds, "-"),
    ];
    for (name, v, ch) in rows {
        let (med, max) = stats(v);
        record_row("migration", name, med, v.len());
        t += &format!("{name:<46} {:>4} {med:>10.1} {max:>10.1} {ch:>16}\n", v.len());
    }
    t += &format!("{:<46} {:>4} {state_kib:>10.1}\n", "state.bin (KiB)", 1);
    println!("\n{t}");
    report::save("migration", "txt", &t);
    plot_rounds(&last_rounds);
}

/// The last dirtying migration's pre-copy rounds: bytes sent and pages dirtied per round.
fn plot_rounds(rounds: &[serde_json::Value]) {
    let labels: Vec<String> = (0..rounds.len()).map(|i| i.to_string()).collect();
    let field = |k: &str, scale: f64| -> Vec<f64> {
        rounds
            .iter()
            .map(|r| r[k].as_f64().unwrap_or(0.0) / scale)
            .collect()
    };
    let (mib, pages) = (field("bytes", (1 << 20) as f64), field("dirtied_pages", 1.0));
    let title = |what: &str| {
        format!(
            "live migration, dirtying guest, 0 ms target: {what} per round ({})",
            backend()
        )
    };
    let bytes = report::bars(
        &title("RAM sent"),
        ("round", "MiB"),
        &labels,
        &[report::Series {
            name: "sent (MiB)",
            values: &mib,
        }],
    );
    report::save("migration-rounds-bytes", "svg", &bytes);
    let dirty = report::bars(
        &title("pages dirtied"),
        ("round", "pages"),
        &labels,
        &[report::Series {
            name: "dirtied while the round was sent",
            values: &pages,
        }],
    );
    report::save("migration-rounds-dirty", "svg", &dirty);
}
