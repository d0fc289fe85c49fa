// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vmm-reference demo`: boot the test guest, hot-add, offline, remove and re-add CPUs, take a
//! snapshot, restore it in a new process and live-migrate that one, narrating each step.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use vmm_reference::console::GuestConsole;

use super::ctl::info_table;
use super::fail;

pub fn demo() -> ExitCode {
    match demo_inner() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("demo: {e}")),
    }
}

type DemoResult<T> = Result<T, Box<dyn std::error::Error>>;

/// One VMM process of the demo: its console and API socket.
struct DemoVmm {
    name: &'static str,
    child: std::process::Child,
    con: Option<GuestConsole>,
    con_path: PathBuf,
    api: PathBuf,
}

const DEMO_T: Duration = Duration::from_secs(30);

impl DemoVmm {
    fn spawn(name: &'static str, dir: &std::path::Path, args: &[&str]) -> DemoResult<DemoVmm> {
        let (con_path, api) = (
            dir.join(format!("{name}-con.sock")),
            dir.join(format!("{name}-api.sock")),
        );
        let child = Command::new(std::env::current_exe()?)
            .arg("run")
            .args(args)
            .arg("--serial")
            .arg(format!("socket={}", con_path.display()))
            .arg("--api-socket")
            .arg(&api)
            .stdin(Stdio::null())
            .spawn()?;
        Ok(DemoVmm {
            name,
            child,
            con: None,
            con_path,
            api,
        })
    }

    fn con(&mut self) -> DemoResult<&mut GuestConsole> {
        if self.con.is_none() {
            self.con = Some(GuestConsole::connect(&self.con_path, DEMO_T)?);
        }
        self.con.as_mut().ok_or_else(|| "no console".into())
    }

    fn api(&self, method: &str, ep: &str, body: Option<&str>) -> DemoResult<String> {
        let (status, body) = vmm_reference::api::request(&self.api, method, ep, body)?;
        if status >= 300 {
            return Err(format!("{ep}: HTTP {status} {body}").into());
        }
        Ok(body)
    }

    /// Wait for the VMM's side of an eject (thread joined, fd parked): the guest reports the
    /// removal before the eject worker is done, and an add-cpu meanwhile is answered 429.
    fn parked(&self, id: usize) -> DemoResult<()> {
        let deadline = Instant::now() + DEMO_T;
        while Instant::now() < deadline {
            let info: serde_json::Value = serde_json::from_str(&self.api("GET", "vm.info", None)?)?;
            let idle = info["pending_removals"].as_array().is_some_and(|a| a.is_empty());
            if idle && info["cpus"][id]["vcpu"] == "parked" {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(format!("CPU {id} was not parked within {DEMO_T:?}").into())
    }

    fn guest(&mut self, cmd: &str) -> DemoResult<String> {
        let reply = self.con()?.command(cmd, DEMO_T)?;
        let line = reply.last().cloned().unwrap_or_default();
        println!("{} guest> {cmd}: {line}", self.name);
        Ok(line)
    }

    fn event(&mut self, prefix: &str) -> DemoResult<()> {
        let l = self.con()?.wait_for(prefix, DEMO_T)?;
        println!("{} guest: {l}", self.name);
        Ok(())
    }

    fn show(&mut self, what: &str) -> DemoResult<()> {
        let s = self.con()?.status(DEMO_T)?;
        println!("== [{}] {what}\n-- guest `status`:\n{}", self.name, s.table());
        let v: serde_json::Value = serde_json::from_str(&self.api("GET", "vm.info", None)?)?;
        println!("-- VMM `vm.info`:\n{}", info_table(&v));
        Ok(())
    }
}

fn demo_inner() -> DemoResult<()> {
    let dir = std::env::temp_dir().join(format!("vmm-reference-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut vmms: Vec<DemoVmm> = Vec::new();
    let result = demo_steps(&dir, &mut vmms);
    for mut v in vmms {
        let status = wait_child(&mut v.child, Duration::from_secs(10))?;
        if result.is_ok() && !status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("the {} VMM exited with {status}", v.name).into());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn demo_steps(dir: &std::path::Path, vmms: &mut Vec<DemoVmm>) -> DemoResult<()> {
    boot_and_change_cpus(dir, vmms)?;
    snapshot_and_restore(dir, vmms)?;
    migrate_and_online(dir, vmms)
}

/// Boot with 1 of 8 CPUs; hot-add, offline, remove and re-add; leave a partially offline set.
fn boot_and_change_cpus(dir: &std::path::Path, vmms: &mut Vec<DemoVmm>) -> DemoResult<()> {
    println!("== booting the built-in test guest: --cpus boot=1,max=8 --memory 256M");
    let start = Instant::now();
    vmms.push(DemoVmm::spawn(
        "first",
        dir,
        &["--cpus", "boot=1,max=8", "--memory", "256M"],
    )?);
    let vm = &mut vmms[0];
    let ready = vm.con()?.wait_for("READY", DEMO_T)?;
    println!(
        "guest: {ready}   ({} ms after process start)",
        start.elapsed().as_millis()
    );
    vm.show("after boot: 1 of 8 CPUs online")?;
    println!("== PUT /api/v1/vm.resize {{\"desired_vcpus\":4}}: hot-add CPUs 1-3 (GPE 2 -> SCI -> guest scan -> INIT/SIPI)");
    vm.api("PUT", "vm.resize", Some(r#"{"desired_vcpus":4}"#))?;
    for _ in 0..3 {
        vm.event("EVENT insert")?;
    }
    vm.guest("offline 3")?;
    std::thread::sleep(Duration::from_millis(100));
    vm.show("CPU 3 offlined by the guest: KVM reports it HALTED with its APIC SW-disabled")?;
    println!("== PUT /api/v1/vm.remove-cpu {{\"id\":2}}: the guest offlines and ejects it, the VMM parks the vCPU fd");
    vm.api("PUT", "vm.remove-cpu", Some(r#"{"id":2}"#))?;
    vm.event("EVENT remove")?;
    vm.parked(2)?;
    println!("== PUT /api/v1/vm.add-cpu {{\"id\":2}}: CPU 2 comes back on its parked fd");
    vm.api("PUT", "vm.add-cpu", Some(r#"{"id":2}"#))?;
    vm.event("EVENT insert")?;
    println!("== a partially offline CPU set: CPU 3 stays offline, CPU 4 is hot-added but never onlined");
    vm.guest("autoonline off")?;
    vm.api("PUT", "vm.add-cpu", Some(r#"{"id":4}"#))?;
    vm.event("EVENT insert")?;
    vm.guest("dirty start 2048")?;
    std::thread::sleep(Duration::from_millis(300));
    vm.show("before the snapshot (the guest rewrites 8 MiB of pages on every tick)")
}

/// Snapshot the first VM, power it off, restore the snapshot in a new process.
fn snapshot_and_restore(dir: &std::path::Path, vmms: &mut Vec<DemoVmm>) -> DemoResult<()> {
    let vm = &mut vmms[0];
    let snap = dir.join("snapshot");
    println!("== PUT /api/v1/vm.snapshot -> {}", snap.display());
    let body = serde_json::json!({ "destination_url": format!("file://{}", snap.display()) }).to_string();
    let t = Instant::now();
    println!(
        "vmm: {}   ({} ms)",
        vm.api("PUT", "vm.snapshot", Some(&body))?,
        t.elapsed().as_millis()
    );
    vm.guest("poweroff")?;
    println!(
        "== vmm-reference run --restore {} (a new process; RAM mapped copy-on-write)",
        snap.display()
    );
    let t = Instant::now();
    vmms.push(DemoVmm::spawn(
        "restored",
        dir,
        &["--restore", snap.to_str().unwrap_or_default()],
    )?);
    let vm = &mut vmms[1];
    vm.guest("resetgaps")?;
    println!(
        "(process start -> first guest reply after restore: {} ms)",
        t.elapsed().as_millis()
    );
    vm.guest("dirty check")?;
    vm.show("restored: CPU 3 still offline (HALTED, APIC SW-disabled), CPU 4 still UNINITIALIZED")
}

/// Live-migrate the restored VM to a third process; the offline CPUs come online there.
fn migrate_and_online(dir: &std::path::Path, vmms: &mut Vec<DemoVmm>) -> DemoResult<()> {
    let mig = dir.join("migration.sock");
    let incoming = format!("unix:{}", mig.display());
    println!("== vmm-reference run --incoming {incoming}; PUT /api/v1/vm.send-migration");
    vmms.push(DemoVmm::spawn("migrated", dir, &["--incoming", &incoming])?);
    let deadline = Instant::now() + DEMO_T;
    while !mig.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let body = serde_json::json!({ "destination_url": incoming, "downtime_ms": 20 }).to_string();
    let report: serde_json::Value =
        serde_json::from_str(&vmms[1].api("PUT", "vm.send-migration", Some(&body))?)?;
    for r in report["rounds"].as_array().into_iter().flatten() {
        println!(
            "round {}: {:>10} bytes in {:.3} s, {} pages dirtied meanwhile, expected downtime {:.2} ms",
            r["round"],
            r["bytes"],
            r["secs"].as_f64().unwrap_or(0.0),
            r["dirtied_pages"],
            r["expected_downtime_ms"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "migrated: downtime {:.1} ms, total {:.1} ms, state {} bytes; the source VMM exits",
        report["downtime_ms"].as_f64().unwrap_or(0.0),
        report["total_ms"].as_f64().unwrap_or(0.0),
        report["state_bytes"]
    );
    let vm = &mut vmms[2];
    vm.guest("dirty check")?;
    vm.show("after live migration: the same CPU set, nothing lost")?;
    println!("== the offline CPUs come online on the destination");
    vm.guest("online 3")?;
    vm.guest("online 4")?;
    std::thread::sleep(Duration::from_millis(300));
    vm.show("every present CPU online and ticking")?;
    println!("== guest `poweroff` (ACPI S5 through PM1a_CNT)");
    vm.guest("poweroff")?;
    Ok(())
}

fn wait_child(
    child: &mut std::process::Child,
    timeout: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if start.elapsed() > timeout {
            child.kill()?;
            return child.wait();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
