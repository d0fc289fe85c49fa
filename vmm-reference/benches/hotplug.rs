// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! CPU hotplug benchmark with the test guest (`cargo bench -p vmm-reference --bench hotplug`):
//! - API request -> CPU online in the guest (the guest's `EVENT insert cpu=N online=1` line),
//! - API request -> eject complete (vCPU thread joined, fd parked, removal no longer pending),
//! - per-vCPU state save and restore (pause, save, restore into a new KVM VM, resume),
//! - resize from 2 to 64 CPUs (until all 62 report online).
//!
//! With QEMU unpacked by `ci/qemu-peer.sh`, the same guest image runs under QEMU 7.2 and the
//! first two rows get a QEMU column: QMP `device_add` -> online in the guest, and QMP
//! `device_del` -> `DEVICE_DELETED` (QEMU's own ACPI CPU hotplug; the guest drives both
//! through the same register protocol).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmm_reference::api::request;
use vmm_reference::config::{CpuConfig, KernelSource, SerialMode, VmConfig};
use vmm_reference::console::GuestConsole;
use vmm_reference::vm::Vm;

mod common;
use common::qmp::Qmp;
use common::{backend, env_count, kvm_or_skip, pct, qemu_command, qemu_peer, record_row, report};

const T: Duration = Duration::from_secs(60);
/// Bound of a `status` reply: one UART exit per byte, slow with many ticking CPUs in L1.
const STATUS_T: Duration = Duration::from_secs(180);

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    (pct(v, 0.5), pct(v, 0.99), pct(v, 1.0))
}

fn info(api: &Path) -> serde_json::Value {
    let (_, body) = request(api, "GET", "vm.info", None).expect("info");
    serde_json::from_str(&body).expect("json")
}

fn main() {
    if !kvm_or_skip("hotplug") {
        return;
    }
    let samples = env_count("HOTPLUG_BENCH_SAMPLES", 20);
    let dir = std::env::temp_dir().join(format!("vmmref-hpbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (api, con_path) = (dir.join("api.sock"), dir.join("con.sock"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_vmm-reference"))
        .args([
            "run",
            "--cpus",
            "boot=2,max=64",
            "--memory",
            "256M",
            "--api-socket",
        ])
        .arg(&api)
        .arg("--serial")
        .arg(format!("socket={}", con_path.display()))
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut con = GuestConsole::connect(&con_path, T).expect("console");
    con.wait_for("READY", T).expect("READY");

    let (mut online, mut eject) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        let t = Instant::now();
        let (s, _) = request(&api, "PUT", "vm.add-cpu", Some(r#"{"id":2}"#)).unwrap();
        assert_eq!(s, 200);
        con.wait_for("EVENT insert cpu=2 online=1", T).expect("online");
        online.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let (s, _) = request(&api, "PUT", "vm.remove-cpu", Some(r#"{"id":2}"#)).unwrap();
        assert_eq!(s, 204);
        let deadline = Instant::now() + T;
        loop {
            assert!(
                Instant::now() < deadline,
                "CPU 2's eject did not complete in {T:?}"
            );
            let v = info(&api);
            if v["cpus"][2]["vcpu"] == "parked"
                && v["pending_removals"].as_array().is_some_and(|a| a.is_empty())
            {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        eject.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let t = Instant::now();
    let (s, _) = request(&api, "PUT", "vm.resize", Some(r#"{"desired_vcpus":64}"#)).unwrap();
    assert_eq!(s, 204);
    for _ in 0..62 {
        con.wait_for("EVENT insert", T).expect("insert");
    }
    let grow = t.elapsed().as_secs_f64() * 1e3;
    // 64 ticking CPUs leave the BSP little time to print in a one-CPU nested L1.
    let st = con.status(STATUS_T).expect("status");
    assert_eq!(st.online, 64);
    con.command("poweroff", T).expect("poweroff");
    let _ = child.wait();

    // Save/restore per vCPU: in process, 8 vCPUs, rebuilt on a new KVM VM a few times.
    let sock = dir.join("con2.sock");
    let cfg = VmConfig {
        kernel: KernelSource::Embedded,
        initramfs: None,
        cmdline: None,
        cpus: CpuConfig { boot: 8, max: 8 },
        memory: 128 << 20,
        serial: SerialMode::Socket(sock.clone()),
    };
    let vm = Vm::start(&cfg).expect("vm");
    let mut con2 = GuestConsole::connect(&sock, T).expect("console");
    con2.wait_for("READY", T).expect("READY");
    let (mut save, mut restore) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        let (s, r) = vm.control().transplant().expect("transplant");
        save.extend(s);
        restore.extend(r);
    }
    assert_eq!(con2.status(STATUS_T).expect("status").online, 8);
    con2.command("poweroff", T).expect("poweroff");
    vm.wait(Some(T));
    let _ = std::fs::remove_dir_all(&dir);

    let mut t = format!(
        "vmm-reference CPU hotplug benchmark (test guest, {})\n{:<48} {:>5} {:>10} {:>10} {:>10}\n",
        backend(),
        "metric",
        "n",
        "median",
        "p99",
        "max"
    );
    for (name, v) in [
        ("API add-cpu -> online in guest (ms)", &mut online),
        ("API remove-cpu -> eject complete (ms)", &mut eject),
        ("vCPU state save, per vCPU (us)", &mut save),
        ("vCPU state restore, per vCPU (us)", &mut restore),
    ] {
        let (med, p99, max) = stats(v);
        record_row("hotplug", name, med, v.len());
        t += &format!("{name:<48} {:>5} {med:>10.2} {p99:>10.2} {max:>10.2}\n", v.len());
    }
    record_row("hotplug", "resize 2 -> 64, all online (ms)", grow, 1);
    t += &format!(
        "{:<48} {:>5} {grow:>10.1}\n",
        "resize 2 -> 64, all online (ms)", 1
    );
    let (mut q_on, mut q_off) = (Vec::new(), Vec::new());
    match qemu_peer().map(|q| qemu_hotplug(&q, samples)) {
        Some(Ok((mut on, mut off))) => {
            t += "QEMU 7.2 (Debian), same guest image, QMP (a new CPU each sample: re-adding a removed one fails there):\n";
            for (name, v) in [
                ("QMP device_add -> online in guest (ms)", &mut on),
                ("QMP device_del -> DEVICE_DELETED (ms)", &mut off),
            ] {
                let (med, p99, max) = stats(v);
                t += &format!("{name:<48} {:>5} {med:>10.2} {p99:>10.2} {max:>10.2}\n", v.len());
            }
            (q_on, q_off) = (on, off);
        }
        Some(Err(e)) => t += &format!("(QEMU peer failed: {e})\n"),
        None => t +=
            "(no QEMU rows: `bash ci/qemu-peer.sh` unpacks Debian's qemu-system-x86 into target/qemu-peer)\n",
    }
    println!("\n{t}");
    report::save("hotplug", "txt", &t);
    for (name, title, ours, ours_what, theirs, theirs_what) in [
        (
            "hotplug-add",
            "CPU hot-add: request -> CPU online in the guest",
            &online,
            "API add-cpu",
            &q_on,
            "QMP device_add",
        ),
        (
            "hotplug-remove",
            "CPU hot-remove: request -> eject complete",
            &eject,
            "API remove-cpu",
            &q_off,
            "QMP device_del",
        ),
    ] {
        let (a, b) = (
            format!("vmm-reference, {ours_what}"),
            format!("QEMU 7.2, {theirs_what}"),
        );
        let mut series = vec![report::Series {
            name: &a,
            values: ours,
        }];
        if !theirs.is_empty() {
            series.push(report::Series {
                name: &b,
                values: theirs,
            });
        }
        let title = format!("{title} ({})", backend());
        report::save(name, "svg", &report::ecdf(&title, "latency (ms)", &series));
    }
}

/// QEMU hot-add and hot-remove of CPU 2, `samples` times each: (online ms, eject ms).
fn qemu_hotplug(qemu: &Path, samples: usize) -> Result<(Vec<f64>, Vec<f64>), String> {
    let dir = std::env::temp_dir().join(format!("vmmref-hpbench-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let qmp_path = dir.join("qmp.sock");
    let mut child = qemu_command(qemu, 2, 64, 256)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines() {
            let Ok(l) = l else { return };
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    let wait = |prefix: &str| -> Result<(), String> {
        let deadline = Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) if l.contains(prefix) => return Ok(()),
                Ok(_) => {}
                Err(_) => return Err(format!("QEMU guest never printed {prefix:?}")),
            }
        }
    };
    let result = (|| {
        wait("READY")?;
        let mut qmp = Qmp::connect(&qmp_path, T)?;
        let (mut on, mut off) = (Vec::new(), Vec::new());
        // A new CPU each time: re-adding a removed one fails on this host's KVM (QEMU 7.2
        // re-runs KVM_SET_CPUID2 on its parked vCPU and gets EINVAL).
        for k in 2..2 + samples.min(60) {
            let t = Instant::now();
            qmp.execute("device_add", serde_json::json!({
                "driver": "host-x86_64-cpu", "id": format!("cpu{k}"), "socket-id": 0, "core-id": k, "thread-id": 0 }))?;
            wait(&format!("EVENT insert cpu={k} online=1"))?;
            on.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            qmp.execute("device_del", serde_json::json!({ "id": format!("cpu{k}") }))?;
            qmp.event("DEVICE_DELETED", T)?;
            off.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok((on, off))
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
