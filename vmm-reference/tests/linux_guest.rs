// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Debian's kernel + the busybox agent initramfs (built by ci/linux-guest.sh) on real KVM.
//!
//! A stock kernel needs hardware virtualization: on software KVM backends (PVM) it dies in
//! KVM's instruction emulator (int3 self-test, cmpxchg16b, xrstor). These tests therefore run
//! where `/proc/cpuinfo` shows vmx or svm and the backend is not PVM (ci/nested/kvm-tests.sh
//! runs them on kvm-amd in QEMU TCG); elsewhere they print SKIP. Under `VMM_REQUIRE_LINUX=1`
//! (set by the nested runner) a skip panics instead, and every test that ran is recorded in
//! `$KVM_TEST_LEDGER` like the KVM tests.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::linux_agent::*;
use common::*;
use serde_json::Value;

/// Whether a Linux guest can run here (hardware virtualization, /dev/kvm, the payload).
/// Skips with a reason otherwise; panics instead under `VMM_REQUIRE_LINUX=1`.
fn linux_or_skip(test: &str) -> bool {
    let (kernel, initrd) = payload();
    let why = if !hardware_virt() {
        Some("no vmx/svm, or a software KVM backend (PVM)")
    } else if std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        Some("/dev/kvm is not usable")
    } else if !kernel.exists() || !initrd.exists() {
        Some("no target/linux-guest payload (run ci/linux-guest.sh)")
    } else {
        None
    };
    match why {
        None => {
            if let Some(path) = std::env::var_os("KVM_TEST_LEDGER") {
                if let Ok(mut f) = std::fs::File::options().create(true).append(true).open(path) {
                    let _ = f.write_all(format!("{test}\n").as_bytes());
                }
            }
            true
        }
        Some(why) if std::env::var("VMM_REQUIRE_LINUX").as_deref() == Ok("1") => {
            panic!("{test}: VMM_REQUIRE_LINUX=1 but {why}")
        }
        Some(why) => {
            eprintln!("SKIP {test}: {why}");
            false
        }
    }
}

/// A Linux guest under the VMM, driven through its agent on the console.
struct Linux(Vmm);

impl Linux {
    fn boot(test: &str, cpus: &str) -> Linux {
        Linux::boot_with(test, cpus, "")
    }

    /// Boot with `extra` appended to the kernel command line.
    fn boot_with(test: &str, cpus: &str, extra: &str) -> Linux {
        let (kernel, initrd) = payload();
        let cmdline = format!("console=ttyS0 panic=-1 quiet {extra}");
        let dir = temp_dir(test);
        let mut vm = Vmm::spawn(
            &dir,
            "linux",
            &[
                "--kernel",
                kernel.to_str().expect("path"),
                "--initramfs",
                initrd.to_str().expect("path"),
                "--cmdline",
                &cmdline,
                "--cpus",
                cpus,
                "--memory",
                "512M",
            ],
        );
        vm.con
            .wait_for(READY, BOOT)
            .unwrap_or_else(|e| panic!("Linux reached its agent: {e}; {:?}", vm.con.transcript));
        Linux(vm)
    }

    /// One agent command; its final line must be OK.
    fn cmd(&mut self, cmd: &str) -> String {
        let lines = self
            .0
            .con
            .command(cmd, BOOT)
            .unwrap_or_else(|e| panic!("{cmd}: {e}; transcript {:?}", self.0.con.transcript));
        let last = lines.last().cloned().unwrap_or_default();
        assert!(last.starts_with("OK"), "{cmd}: {lines:?}");
        last
    }

    fn status(&mut self) -> Status {
        Status::parse(&self.cmd("status"))
    }

    /// Poll the agent until `pred` holds (hot-plug events reach Linux asynchronously).
    fn until(&mut self, what: &str, pred: impl Fn(&Status) -> bool) -> Status {
        let deadline = Instant::now() + BOOT;
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {s:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `sleep` returns (the guest's timers fire) and every online CPU takes timer interrupts.
    /// Linux stops the tick of an idle CPU (NO_HZ), so each CPU is kept busy a moment, and
    /// the counts are polled until each went up (bounded by `BOOT`).
    fn assert_ticking(&mut self) {
        let a = self.status();
        self.cmd("sleep 0.5");
        let deadline = Instant::now() + BOOT;
        loop {
            let b = self.status();
            assert!(b.uptime > a.uptime, "uptime stands still: {a:?} {b:?}");
            let still: Vec<u32> = b
                .online
                .iter()
                .copied()
                .filter(|&c| b.loc_of(c) <= a.loc_of(c))
                .collect();
            if still.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "CPUs {still:?} take no LAPIC timer interrupt: {a:?} {b:?}"
            );
            for c in still {
                self.cmd(&format!("spin {c}"));
            }
        }
    }
}

fn cpu(v: &Value, i: usize) -> &Value {
    &v["cpus"][i]
}

#[test]
fn linux_keeps_its_timer_and_onlines_hot_added_cpus() {
    if !linux_or_skip("linux_keeps_its_timer_and_onlines_hot_added_cpus") {
        return;
    }
    let mut g = Linux::boot("linux-timer", "boot=2,max=8");
    let s = g.status();
    assert_eq!(
        (s.online.clone(), s.present.clone()),
        (vec![0, 1], vec![0, 1]),
        "{s:?}"
    );
    g.assert_ticking();

    // ACPI hot-add reaches Linux (present), and sysfs onlines the new CPUs.
    assert_eq!(g.0.api("PUT", "vm.resize", Some(r#"{"desired_vcpus":4}"#)).0, 204);
    g.until("CPUs 2-3 present", |s| s.present == [0, 1, 2, 3]);
    g.cmd("online 2");
    g.cmd("online 3");
    let s = g.status();
    assert_eq!(s.online, [0, 1, 2, 3], "{s:?}");
    g.assert_ticking();

    // Offline through sysfs: KVM reports the CPU halted with its APIC software-disabled.
    g.cmd("offline 3");
    let v = g.0.until("CPU 3 halted", |v| cpu(v, 3)["mp_state"] == "HALTED");
    assert_eq!(cpu(&v, 3)["apic_sw_enabled"], false, "{v}");
    assert_eq!(g.status().online, [0, 1, 2]);
    g.assert_ticking();
    g.cmd("online 3");
    assert_eq!(g.status().online, [0, 1, 2, 3]);

    // Removing an online CPU: Linux offlines and ejects it, the VMM parks its fd; re-added,
    // it comes online again on that fd. 20 cycles leak no thread and no fd.
    let pid = g.0.pid();
    let (tasks, fdir) = (format!("/proc/{pid}/task"), format!("/proc/{pid}/fd"));
    let mut before = None;
    for round in 0..21 {
        let (st, body) = g.0.api("PUT", "vm.remove-cpu", Some(r#"{"id":2}"#));
        assert_eq!(st, 204, "round {round}: {body}");
        g.0.until_within("CPU 2 parked", BOOT, |v| {
            cpu(v, 2)["vcpu"] == "parked" && v["pending_removals"].as_array().is_some_and(|a| a.is_empty())
        });
        g.until("CPU 2 gone", |s| s.present == [0, 1, 3] && s.online == [0, 1, 3]);
        assert_eq!(g.0.api("PUT", "vm.add-cpu", Some(r#"{"id":2}"#)).0, 200);
        g.until("CPU 2 present again", |s| s.present == [0, 1, 2, 3]);
        g.cmd("online 2");
        assert_eq!(cpu(&g.0.info(), 2)["vcpu"], "running");
        // Counted after the first cycle: its parked fd is the one every later cycle reuses.
        if round == 0 {
            before = Some((settled(&tasks), settled(&fdir)));
        }
    }
    assert_eq!(
        before,
        Some((settled(&tasks), settled(&fdir))),
        "leaked threads or fds"
    );
    assert_eq!(g.0.info()["reused_vcpu_fds"], 21);
    g.assert_ticking();
    g.0.con.send("poweroff").expect("send poweroff");
    g.0.exits_cleanly();
}

#[test]
fn linux_without_tsc_deadline_takes_pit_ticks_on_the_madt_pin() {
    if !linux_or_skip("linux_without_tsc_deadline_takes_pit_ticks_on_the_madt_pin") {
        return;
    }
    // Without the TSC-deadline timer Linux runs on the PIT until it has calibrated its LAPIC
    // timer against PIT-driven jiffies: that needs the PIT on the I/O APIC pin the MADT names
    // (ISA IRQ 0 -> GSI 2). KVM's default routing put it on pin 0, where no tick ever came.
    let mut g = Linux::boot_with("linux-pit", "boot=2,max=2", "lapic=notscdeadline");
    // With the PIT lost, no timer at all drives the guest and `sleep` never returns. (Whether
    // the LAPIC timer passed Linux's check is not asserted: under host load the check compares
    // two late TCG timers and can fail, and Linux then keeps ticking from the PIT.)
    let a = g.status();
    let slept = g.0.con.command("sleep 0.5", BOOT);
    assert!(
        slept.as_ref().is_ok_and(|l| l.last().is_some_and(|l| l == "OK")),
        "no timer fires: {slept:?}; {:?}",
        g.0.con.transcript
    );
    assert!(g.status().uptime > a.uptime);
    let (irq0, klog) = (g.cmd("irq 0"), g.cmd("klog APIC timer disabled"));
    eprintln!("PIT: {irq0}; APIC timer disabled: {klog}");
    g.0.con.send("poweroff").expect("send poweroff");
    g.0.exits_cleanly();
}

#[test]
fn linux_ejecting_a_cpu_on_its_own_gets_it_back() {
    if !linux_or_skip("linux_ejecting_a_cpu_on_its_own_gets_it_back") {
        return;
    }
    // The guest unplugs CPU 2 itself (sysfs eject of its ACPI device): Linux offlines it and
    // calls _EJ0, which the VMM refuses (only the VMM removes CPUs). The VMM announces the CPU
    // again, so the guest and the VMM end up agreeing that it is present.
    let mut g = Linux::boot("linux-eject", "boot=2,max=4");
    assert_eq!(g.0.api("PUT", "vm.add-cpu", Some(r#"{"id":2}"#)).0, 200);
    g.until("CPU 2 present", |s| s.present == [0, 1, 2]);
    g.cmd("online 2");
    g.cmd("acpi-eject 2");
    g.0.until("eject refused", |v| v["refused_ejects"] == 1);
    let s = g.until("CPU 2 back and offline", |s| {
        s.present == [0, 1, 2] && s.online == [0, 1]
    });
    eprintln!(
        "after a guest-initiated eject: {s:?}; {}",
        g.cmd("klog Eject incomplete")
    );
    let info = g.0.info();
    assert_eq!(
        (cpu(&info, 2)["present"].as_bool(), cpu(&info, 2)["vcpu"].as_str()),
        (Some(true), Some("running"))
    );
    // The CPU is usable again, and the VMM can still remove it the normal way.
    g.cmd("online 2");
    g.assert_ticking();
    assert_eq!(g.0.api("PUT", "vm.remove-cpu", Some(r#"{"id":2}"#)).0, 204);
    g.0.until_within("CPU 2 parked", BOOT, |v| cpu(v, 2)["vcpu"] == "parked");
    g.until("CPU 2 gone", |s| s.present == [0, 1]);
    g.0.con.send("poweroff").expect("send poweroff");
    g.0.exits_cleanly();
}

/// The VMM's and the guest's view of a partially offline Linux guest.
struct Before {
    info: Value,
    status: Status,
}

/// boot=2,max=8: CPUs 2-4 hot-added and onlined through sysfs, CPU 3 then offlined through
/// sysfs, CPU 5 hot-added and never onlined, CPU 6 inserted and CPU 4 asked to go while the
/// hotplug GPE is masked (both events wait in GPE0_STS); the memory workload and the clock
/// watcher run. The clock interval starts anew when this returns.
fn partially_offline(g: &mut Linux) -> Before {
    g.cmd("dirty start 32");
    g.cmd("clock start");
    assert_eq!(g.0.api("PUT", "vm.resize", Some(r#"{"desired_vcpus":5}"#)).0, 204);
    g.until("CPUs 2-4 present", |s| s.present == [0, 1, 2, 3, 4]);
    for c in 2..5 {
        g.cmd(&format!("online {c}"));
    }
    g.cmd("offline 3");
    assert_eq!(g.0.api("PUT", "vm.add-cpu", Some(r#"{"id":5}"#)).0, 200);
    g.until("CPU 5 present", |s| s.present == [0, 1, 2, 3, 4, 5]);
    g.cmd("gpe mask");
    assert_eq!(g.0.api("PUT", "vm.add-cpu", Some(r#"{"id":6}"#)).0, 200);
    assert_eq!(g.0.api("PUT", "vm.remove-cpu", Some(r#"{"id":4}"#)).0, 204);
    let info = g.0.until("CPU 3 halted", |v| cpu(v, 3)["mp_state"] == "HALTED");
    let c = |i: usize| cpu(&info, i);
    assert_eq!(c(3)["apic_sw_enabled"], false, "sysfs offline: {info}");
    assert_eq!(c(5)["mp_state"], "UNINITIALIZED", "never onlined: {info}");
    assert_eq!(
        (c(6)["inserting"].as_bool(), c(6)["mp_state"].as_str()),
        (Some(true), Some("UNINITIALIZED"))
    );
    assert_eq!(
        (c(4)["removing"].as_bool(), c(4)["remove_requested"].as_bool()),
        (Some(true), Some(true))
    );
    let status = g.status();
    assert_eq!(
        (&status.online[..], &status.present[..]),
        (&[0, 1, 2, 4][..], &[0, 1, 2, 3, 4, 5][..])
    );
    g.cmd("clock check");
    Before { info, status }
}

/// The restored or migrated guest has the same CPU sets, ticks, lost no page of its workload,
/// and its clocks never went back nor forward by more than the time that passed.
fn same_linux(g: &mut Linux, b: &Before, since: Instant) {
    let info = g.0.info();
    for i in 0..8 {
        for k in KEPT {
            assert_eq!(info["cpus"][i][k], b.info["cpus"][i][k], "CPU {i} {k}: {info}");
        }
        if ![0, 1, 2, 4].contains(&i) {
            let (m0, m) = (&b.info["cpus"][i]["mp_state"], &info["cpus"][i]["mp_state"]);
            assert_eq!(m, m0, "CPU {i}: offline and never-onlined CPUs come back exactly");
        }
    }
    assert_eq!(info["pending_removals"], serde_json::json!([4]));
    let s = g.status();
    assert_eq!(
        (&s.online, &s.present),
        (&b.status.online, &b.status.present),
        "{s:?}"
    );
    g.assert_ticking();
    let dirty = g.cmd("dirty check");
    assert!(
        dirty.contains(" bad=0 ") && dirty.ends_with("running=1"),
        "{dirty}"
    );
    let clock = g.cmd("clock check");
    let num = |k: &str| -> u64 {
        let w = clock
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")));
        w.and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} in {clock}"))
    };
    assert_eq!(
        (num("back_mono_us"), num("back_real_us")),
        (0, 0),
        "a clock went back: {clock}"
    );
    let passed = since.elapsed().as_millis() as u64 + 1000;
    assert!(
        num("gap_mono_ms") <= passed && num("gap_real_ms") <= passed,
        "{clock}, {passed} ms passed"
    );
    eprintln!("clocks across the move: {clock} ({passed} ms passed)");
}

/// The two events that waited behind the masked GPE arrive once each; then every CPU can be
/// onlined and an online CPU can be hot-removed.
fn pending_events_once_then_everything_works(g: &mut Linux) {
    assert_eq!(g.cmd("klog CPU6 has been hot-added"), "OK klog count=0");
    g.cmd("gpe unmask");
    g.until("CPU 6 inserted, CPU 4 ejected", |s| {
        s.present == [0, 1, 2, 3, 5, 6]
    });
    g.0.until("CPU 4 parked", |v| {
        cpu(v, 4)["vcpu"] == "parked" && v["pending_removals"].as_array().is_some_and(|a| a.is_empty())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        g.cmd("klog CPU6 has been hot-added"),
        "OK klog count=1",
        "the insert came once"
    );
    for c in [3, 5, 6] {
        g.cmd(&format!("online {c}"));
    }
    assert_eq!(g.status().online, [0, 1, 2, 3, 5, 6]);
    g.assert_ticking();
    assert_eq!(g.0.api("PUT", "vm.remove-cpu", Some(r#"{"id":2}"#)).0, 204);
    g.until("CPU 2 removed", |s| s.present == [0, 1, 3, 5, 6]);
    g.0.until_within("CPU 2 parked", BOOT, |v| cpu(v, 2)["vcpu"] == "parked");
    g.0.con.send("poweroff").expect("send poweroff");
}

/// Live-migrate `g` over TCP into a new VMM process; the source must hand over and exit.
fn migrate(g: Linux, test: &str) -> Linux {
    let (incoming, dst) = incoming_tcp(&temp_dir(test));
    let body =
        serde_json::json!({ "destination_url": incoming, "max_rounds": 8, "token": TOKEN }).to_string();
    let (s, report) = g.0.api("PUT", "vm.send-migration", Some(&body));
    assert_eq!(s, 200, "{report}");
    eprintln!(
        "Linux live migration: {} rounds, downtime {:.1} ms, total {:.1} ms",
        report["rounds"].as_array().map_or(0, |r| r.len()),
        report["downtime_ms"].as_f64().unwrap_or(0.0),
        report["total_ms"].as_f64().unwrap_or(0.0)
    );
    g.0.exits_cleanly();
    Linux(dst.attach())
}

#[test]
fn linux_snapshot_restore_of_a_partially_offline_guest_loses_nothing() {
    if !linux_or_skip("linux_snapshot_restore_of_a_partially_offline_guest_loses_nothing") {
        return;
    }
    let mut g = Linux::boot("linux-snap", "boot=2,max=8");
    let before = partially_offline(&mut g);
    let since = Instant::now();
    let dir = temp_dir("linux-snap-dir");
    let url = serde_json::json!({ "destination_url": format!("file://{}", dir.display()) }).to_string();
    let (s, v) = g.0.api("PUT", "vm.snapshot", Some(&url));
    assert_eq!(s, 200, "{v}");
    drop(g);
    let mut r = Linux(Vmm::spawn(
        &dir,
        "restored",
        &["--restore", dir.to_str().expect("path")],
    ));
    same_linux(&mut r, &before, since);
    pending_events_once_then_everything_works(&mut r);
    r.0.exits_cleanly();
}

#[test]
fn linux_live_migration_there_and_back_loses_nothing() {
    if !linux_or_skip("linux_live_migration_there_and_back_loses_nothing") {
        return;
    }
    let mut a = Linux::boot("linux-mig", "boot=2,max=8");
    let before = partially_offline(&mut a);
    let since = Instant::now();
    let mut b = migrate(a, "linux-mig-b");
    same_linux(&mut b, &before, since);
    let since = Instant::now();
    let mut a2 = migrate(b, "linux-mig-a");
    same_linux(&mut a2, &before, since);
    pending_events_once_then_everything_works(&mut a2);
    a2.0.exits_cleanly();
}
