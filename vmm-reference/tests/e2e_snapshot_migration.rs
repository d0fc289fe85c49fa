// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The hard case, end to end on the real /dev/kvm with the test guest: snapshot/restore and
//! live migration of a VM whose CPU set is partially offline — a CPU the guest offlined, one
//! hot-added but never onlined, a pending insert and a pending removal the guest has not seen
//! yet — with nothing lost and nothing doubled. Plus the failure paths: a migration that
//! fails or is refused leaves the source running; a damaged snapshot is refused.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use vm_live_migration::protocol::{recv, send, FrameLimits, Message};
use vmm_reference::console::GuestStatus;

/// boot=2,max=8; CPUs 2..4 hot-added and online; CPU 3 offlined by the guest; CPU 5 hot-added
/// and never onlined; CPU 6 inserted and CPU 4 asked to go while the guest's GPE is off, so
/// both events wait in GPE0_STS. Returns the VMM's and the guest's view.
fn partially_offline(vm: &mut Vmm) -> (Value, GuestStatus) {
    // The guest rewrites pages of a 8 MiB region on every tick of every online CPU.
    assert_eq!(vm.guest("dirty start 2048").last().unwrap(), "OK");
    assert_eq!(vm.api("PUT", "vm.resize", Some(r#"{"desired_vcpus":5}"#)).0, 204);
    for _ in 0..3 {
        let e = vm.event("EVENT insert");
        assert!(e.ends_with("online=1"), "{e}");
    }
    assert_eq!(vm.guest("offline 3").last().unwrap(), "OK");
    assert_eq!(vm.guest("autoonline off").last().unwrap(), "OK");
    assert_eq!(vm.api("PUT", "vm.add-cpu", Some(r#"{"id":5}"#)).0, 200);
    assert_eq!(vm.event("EVENT insert"), "EVENT insert cpu=5 online=0");
    assert_eq!(vm.guest("gpe off").last().unwrap(), "OK");
    assert_eq!(vm.api("PUT", "vm.add-cpu", Some(r#"{"id":6}"#)).0, 200);
    assert_eq!(vm.api("PUT", "vm.remove-cpu", Some(r#"{"id":4}"#)).0, 204);
    std::thread::sleep(Duration::from_millis(100));
    let info = vm.info();
    let status = vm.status();
    let c = |i: usize| &info["cpus"][i];
    assert_eq!(
        (c(3)["mp_state"].as_str(), c(3)["apic_sw_enabled"].as_bool()),
        (Some("HALTED"), Some(false))
    );
    assert_eq!(c(5)["mp_state"], "UNINITIALIZED", "CPU 5: {}", c(5));
    assert_eq!(
        (c(6)["mp_state"].as_str(), c(6)["inserting"].as_bool()),
        (Some("UNINITIALIZED"), Some(true))
    );
    assert_eq!(
        (c(4)["removing"].as_bool(), c(4)["remove_requested"].as_bool()),
        (Some(true), Some(true))
    );
    let states: Vec<&str> = status.cpus.iter().map(|c| c.state.as_str()).collect();
    assert_eq!(
        states,
        ["online", "online", "online", "offline", "online", "stopped", "absent", "absent"],
        "{status:?}"
    );
    (info, status)
}

/// The restored/migrated VM shows exactly the saved CPU set, keeps ticking, and then delivers
/// each pending event exactly once; every CPU can be brought online; it powers off cleanly.
fn same_vm_and_nothing_lost(mut vm: Vmm, before: &(Value, GuestStatus)) {
    let (info0, status0) = before;
    let info = vm.info();
    for i in 0..8 {
        for k in KEPT {
            assert_eq!(info["cpus"][i][k], info0["cpus"][i][k], "CPU {i} {k}: {info}");
        }
        let (m0, m) = (&info0["cpus"][i]["mp_state"], &info["cpus"][i]["mp_state"]);
        if status0.cpus[i].state == "online" {
            assert!(matches!(m.as_str(), Some("HALTED" | "RUNNABLE")), "CPU {i}: {m}");
        } else {
            assert_eq!(
                m, m0,
                "CPU {i} mp_state (offline/never-onlined CPUs come back exactly)"
            );
        }
    }
    assert_eq!(info["pending_removals"], serde_json::json!([4]));
    assert_eq!(info["paused"], false);
    let s1 = vm.status();
    let states = |s: &GuestStatus| s.cpus.iter().map(|c| c.state.clone()).collect::<Vec<_>>();
    assert_eq!(
        states(&s1),
        states(status0),
        "the guest's view of its CPUs changed"
    );
    assert_eq!(
        (s1.sci, s1.inserts, s1.ejects),
        (status0.sci, status0.inserts, status0.ejects)
    );
    std::thread::sleep(Duration::from_millis(300));
    let s2 = vm.status();
    for c in [0, 1, 2, 4] {
        assert!(
            s2.cpus[c].ticks > s1.cpus[c].ticks,
            "online CPU {c} stopped ticking"
        );
        assert!(
            s2.cpus[c].ticks >= status0.cpus[c].ticks,
            "CPU {c} tick count went back"
        );
    }
    // Every page of the dirtying workload holds what the guest last wrote there.
    let check = vm.guest("dirty check");
    let line = check.last().unwrap();
    assert!(
        line.starts_with("OK dirty pages=2048 bad=0 ") && line.ends_with("running=1"),
        "{check:?}"
    );
    // The two events that waited in GPE0_STS fire now, once each: wait (however loaded the
    // host) until both came, then half a second more for a duplicate that must not come.
    let mut lines = vm.guest("gpe on");
    let events_in = |lines: &[String]| lines.iter().filter(|l| l.starts_with("EVENT")).count();
    let deadline = Instant::now() + T;
    while events_in(&lines) < 2 && Instant::now() < deadline {
        if let Ok(l) = vm
            .con
            .read_line(deadline.saturating_duration_since(Instant::now()))
        {
            lines.push(l);
        }
    }
    let grace = Instant::now() + Duration::from_millis(500);
    while let Ok(l) = vm.con.read_line(grace.saturating_duration_since(Instant::now())) {
        lines.push(l);
    }
    let mut events: Vec<&String> = lines.iter().filter(|l| l.starts_with("EVENT")).collect();
    events.sort();
    assert_eq!(
        events,
        ["EVENT insert cpu=6 online=0", "EVENT remove cpu=4 ejected=1"],
        "pending hotplug events must be delivered exactly once: {lines:?}"
    );
    vm.until("CPU 4's eject", |v| {
        v["cpus"][4]["vcpu"] == "parked" && v["pending_removals"] == serde_json::json!([])
    });
    for c in [3, 5, 6] {
        assert_eq!(
            vm.guest(&format!("online {c}")).last().unwrap(),
            "OK",
            "online {c}"
        );
    }
    let s3 = vm.status();
    std::thread::sleep(Duration::from_millis(300));
    let s4 = vm.status();
    for c in [0, 1, 2, 3, 5, 6] {
        assert_eq!(s4.cpus[c].state, "online", "CPU {c}");
        assert!(
            s4.cpus[c].ticks > s3.cpus[c].ticks,
            "CPU {c} is online but not ticking"
        );
    }
    assert_eq!(s4.cpus[4].state, "absent");
    vm.poweroff();
}

#[test]
fn snapshot_restore_of_a_partially_offline_vm_loses_nothing() {
    if !kvm_or_skip("snapshot_restore_of_a_partially_offline_vm_loses_nothing") {
        return;
    }
    let mut src = Vmm::start("snaprestore", "boot=2,max=8");
    let before = partially_offline(&mut src);
    let dir = temp_dir("snaprestore-snap");
    let url = serde_json::json!({ "destination_url": format!("file://{}", dir.display()) }).to_string();
    let (s, v) = src.api("PUT", "vm.snapshot", Some(&url));
    assert_eq!(s, 200, "{v}");
    assert!(v["state_bytes"].as_u64().unwrap() > 0);
    // The source runs on after the snapshot; then it goes away for good.
    let after = src.status();
    assert_eq!(after.online, before.1.online);
    drop(src);
    let restored = Vmm::spawn(&dir, "restored", &["--restore", dir.to_str().unwrap()]);
    same_vm_and_nothing_lost(restored, &before);
}

#[test]
fn live_migration_of_a_partially_offline_vm_loses_nothing() {
    if !kvm_or_skip("live_migration_of_a_partially_offline_vm_loses_nothing") {
        return;
    }
    let mut src = Vmm::start("livemig", "boot=2,max=8");
    let before = partially_offline(&mut src);
    // Over TCP (the failure tests and the demo use Unix sockets).
    let (incoming, dst) = incoming_tcp(&temp_dir("livemig-dst"));
    // A 1 ms downtime target is never met while the guest dirties pages: the source iterates
    // up to max_rounds, re-sending what the dirty log reports, then pauses.
    let body =
        serde_json::json!({ "destination_url": incoming, "downtime_ms": 1, "max_rounds": 4, "token": TOKEN })
            .to_string();
    let (s, report) = src.api("PUT", "vm.send-migration", Some(&body));
    assert_eq!(s, 200, "{report}");
    let rounds = report["rounds"].as_array().expect("rounds");
    assert!(!rounds.is_empty());
    // Round 0 copies all non-zero RAM: at least the workload's 8 MiB region.
    assert!(
        rounds[0]["bytes"].as_u64().unwrap() >= 8 << 20,
        "round 0: {report}"
    );
    eprintln!(
        "live migration: {} rounds, downtime {:.1} ms, total {:.1} ms",
        rounds.len(),
        report["downtime_ms"].as_f64().unwrap_or(0.0),
        report["total_ms"].as_f64().unwrap_or(0.0)
    );
    // The source hands over and exits cleanly; the destination has the VM.
    src.exits_cleanly();
    same_vm_and_nothing_lost(dst.attach(), &before);
}

fn wait_for_path(p: &Path) {
    let deadline = Instant::now() + T;
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A fake destination: answers Hello with `answer`, then reads `frames` frames and hangs up.
fn fake_destination(path: &Path, answer: Message, frames: usize) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(path).expect("bind fake destination");
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let limits = FrameLimits::default();
        assert!(matches!(recv(&mut s, &limits), Ok(Message::Hello { .. })));
        send(&mut s, &answer).expect("answer");
        for _ in 0..frames {
            if recv(&mut s, &limits).is_err() {
                return;
            }
        }
    })
}

#[test]
fn failed_or_refused_migrations_leave_the_source_running() {
    if !kvm_or_skip("failed_or_refused_migrations_leave_the_source_running") {
        return;
    }
    let mut vm = Vmm::start("migfail", "boot=2,max=4");
    let dir = temp_dir("migfail-peers");
    let ticking = |vm: &mut Vmm| {
        vm.assert_ticking(&[0, 1]);
        assert_eq!(vm.info()["paused"], false);
    };
    // Nobody listening.
    let body =
        |p: &Path| serde_json::json!({ "destination_url": format!("unix:{}", p.display()) }).to_string();
    let (s, v) = vm.api("PUT", "vm.send-migration", Some(&body(&dir.join("nobody.sock"))));
    assert_eq!(s, 400, "{v}");
    ticking(&mut vm);
    // Refused before anything is paused.
    let p = dir.join("refuse.sock");
    let t = fake_destination(&p, Message::Refuse("test refusal".into()), 0);
    let (s, v) = vm.api("PUT", "vm.send-migration", Some(&body(&p)));
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("test refusal"), "{v}");
    t.join().unwrap();
    ticking(&mut vm);
    // Accepted, then the destination dies after the first memory frame.
    let p = dir.join("die.sock");
    let t = fake_destination(&p, Message::Accept, 1);
    let (s, v) = vm.api("PUT", "vm.send-migration", Some(&body(&p)));
    assert_eq!(s, 500, "{v}");
    t.join().unwrap();
    ticking(&mut vm);
    let m = &vm.info()["migration"];
    assert_eq!(m["phase"], "failed", "{m}");
    assert!(m["error"].as_str().is_some_and(|e| !e.is_empty()), "{m}");
    // A destination that listens but never accepts, its backlog full: connecting is bounded
    // by timeout_ms (a Unix connect used to wait forever, every control call answering 429).
    let full = dir.join("full.sock");
    let backlog = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
    backlog.bind(&socket2::SockAddr::unix(&full).unwrap()).unwrap();
    backlog.listen(0).unwrap();
    let _queued = std::os::unix::net::UnixStream::connect(&full).unwrap();
    let b = serde_json::json!({ "destination_url": format!("unix:{}", full.display()), "timeout_ms": 1000 });
    let (s, v) = vm.api("PUT", "vm.send-migration", Some(&b.to_string()));
    assert!(
        s == 400 && v["error"].as_str().unwrap().contains("accepts no connection"),
        "{s} {v}"
    );
    ticking(&mut vm);
    // A destination that takes everything and never answers: the source gives up after its
    // timeout and resumes; meanwhile control operations answer 429, never hang. The deadline
    // leaves pre-copy room on a loaded L1: a deadline that strikes before the stop phase would
    // leave nothing to observe (4 s did under two busy loops).
    const SILENT_TIMEOUT_MS: u64 = 20_000;
    let p = dir.join("silent.sock");
    let t = fake_destination(&p, Message::Accept, usize::MAX);
    let api = vm.api.clone();
    let b = serde_json::json!({ "destination_url": format!("unix:{}", p.display()), "timeout_ms": SILENT_TIMEOUT_MS })
        .to_string();
    let mig =
        std::thread::spawn(move || vmm_reference::api::request(&api, "PUT", "vm.send-migration", Some(&b)));
    let deadline = Instant::now() + T;
    // (vm.info answers 429 for the moment the migration holds the vCPUs to capture them.)
    while vm.api("GET", "vm.info", None).1["migration"]["phase"] != "stopping" {
        assert!(
            Instant::now() < deadline,
            "the migration never reached its stop phase"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (s, v) = vm.api("PUT", "vm.add-cpu", None);
    assert_eq!(s, 429, "{v}");
    // Ending the VM now would leave the destination waiting for a source that is gone.
    let (s, v) = vm.api("PUT", "vm.shutdown", None);
    assert_eq!(s, 429, "{v}");
    let (s, v) = mig.join().unwrap().unwrap();
    assert_eq!(s, 500, "{v}");
    // Normally the deadline strikes while waiting for the Ack; on a loaded host it can strike
    // while the state is still being sent.
    assert!(
        v.contains("acknowledgement") || v.contains("deadline (timeout_ms) passed"),
        "{v}"
    );
    t.join().unwrap();
    ticking(&mut vm);
    // Control operations work again (the migration released the VM).
    assert_eq!(vm.api("PUT", "vm.add-cpu", None).0, 200);
    assert!(vm.event("EVENT insert").ends_with("online=1"));
    // Malformed requests are 4xx.
    assert_eq!(
        vm.api("PUT", "vm.send-migration", Some(r#"{"destination_url":"ftp:x"}"#))
            .0,
        400
    );
    assert_eq!(vm.api("PUT", "vm.snapshot", Some(r#"{"nope":1}"#)).0, 400);
    // A destination the caller named wrongly is theirs to fix (400), not the VMM's (500).
    let file = dir.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let url = serde_json::json!({ "destination_url": file.join("snap").display().to_string() });
    let (s, v) = vm.api("PUT", "vm.snapshot", Some(&url.to_string()));
    assert_eq!(s, 400, "{v}");
    vm.poweroff();
}

/// A fake destination that accepts, then reads what the source sends 4 KiB every 20 ms:
/// every write makes progress, the link is just far too slow for the guest's RAM.
fn trickling_destination(path: &Path) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(path).expect("bind fake destination");
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        assert!(matches!(
            recv(&mut s, &FrameLimits::default()),
            Ok(Message::Hello { .. })
        ));
        send(&mut s, &Message::Accept).expect("accept");
        let mut buf = [0u8; 4096];
        while s.read(&mut buf).is_ok_and(|n| n > 0) {
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

/// Start `vm.send-migration` with `body` in a thread.
/// SIGTERM during a migration cancels it and answers its client before the VMM ends. The
/// signal used to end the process under the running migration: its client got no answer,
/// and a signal just after the Ack left the destination paused, waiting for Complete.
#[test]
fn a_signal_during_a_migration_cancels_it_and_answers_its_client() {
    if !kvm_or_skip("a_signal_during_a_migration_cancels_it_and_answers_its_client") {
        return;
    }
    let mut vm = Vmm::start("migsignal", "boot=2,max=4");
    let p = temp_dir("migsignal-net").join("slow.sock");
    let t = trickling_destination(&p);
    let mig = send_migration(
        &vm,
        serde_json::json!({ "destination_url": format!("unix:{}", p.display()) }),
    );
    // Before the Ack, in whichever phase the trickle holds it (vm.migration-status answers
    // while a capture holds the vCPUs; vm.info says 429 then).
    let deadline = Instant::now() + T;
    loop {
        let (s, v) = vm.api("GET", "vm.migration-status", None);
        if s == 200 && (v["phase"] == "precopy" || v["phase"] == "stopping") {
            break;
        }
        assert!(Instant::now() < deadline, "the migration never ran: {s} {v}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let api = vm.api.clone();
    // SAFETY: kill(2) on the VMM child's pid.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) }, 0);
    let (s, v) = mig.join().unwrap();
    assert_eq!(s, 500, "{v}");
    assert!(v.contains("cancelled"), "{v}");
    t.join().unwrap();
    let mut child = vm.child.take().expect("child");
    let out = wait_child(&mut child, T);
    assert!(out.status.success(), "{out:?}");
    assert!(!api.exists(), "the API socket goes with the VMM");
}

fn send_migration(vm: &Vmm, body: Value) -> std::thread::JoinHandle<(u16, String)> {
    let api = vm.api.clone();
    std::thread::spawn(move || {
        vmm_reference::api::request(&api, "PUT", "vm.send-migration", Some(&body.to_string())).expect("API")
    })
}

/// `timeout_ms` bounds the whole migration (before, it bounded each write, and a trickling
/// link kept a migration with `timeout_ms: 3000` going for as long as the RAM took), and
/// `vm.cancel-migration` ends one; either way the VM runs on at the source.
#[test]
fn a_migration_ends_at_its_deadline_or_when_cancelled() {
    if !kvm_or_skip("a_migration_ends_at_its_deadline_or_when_cancelled") {
        return;
    }
    let mut vm = Vmm::start("deadline", "boot=2,max=4");
    assert_eq!(vm.guest("dirty start 1024").last().unwrap(), "OK");
    let dir = temp_dir("deadline-net");
    let p = dir.join("slow-a.sock");
    let t = trickling_destination(&p);
    let mig = send_migration(
        &vm,
        serde_json::json!({ "destination_url": format!("unix:{}", p.display()), "timeout_ms": 2000 }),
    );
    let deadline = Instant::now() + T;
    while !mig.is_finished() {
        assert!(
            Instant::now() < deadline,
            "timeout_ms 2000 did not end the migration within {T:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (s, v) = mig.join().unwrap();
    assert_eq!(s, 500, "{v}");
    assert!(v.contains("deadline"), "{v}");
    t.join().unwrap();
    vm.assert_ticking(&[0, 1]);
    assert_eq!(vm.info()["migration"]["phase"], "failed");

    // Cancelled in the middle of pre-copy.
    let p = dir.join("slow-b.sock");
    let t = trickling_destination(&p);
    let mig = send_migration(
        &vm,
        serde_json::json!({ "destination_url": format!("unix:{}", p.display()) }),
    );
    vm.until("pre-copy", |v| v["migration"]["phase"] == "precopy");
    let (s, v) = vm.api("PUT", "vm.cancel-migration", None);
    assert_eq!(s, 204, "{v}");
    let (s, v) = mig.join().unwrap();
    assert_eq!(s, 500, "{v}");
    assert!(v.contains("cancelled"), "{v}");
    t.join().unwrap();
    vm.assert_ticking(&[0, 1]);
    assert!(vm.guest("dirty check").last().unwrap().contains(" bad=0 "));
    let (s, v) = vm.api("PUT", "vm.cancel-migration", None);
    assert_eq!(s, 400, "nothing to cancel: {v}");
    vm.poweroff();
}

/// A guest that dirties memory faster than pre-copy drains it: with `timeout_strategy`
/// "cancel" the migration gives up and the VM runs on here; with "throttle" the guest is
/// slowed down step by step and the migration completes with every page.
#[test]
fn a_migration_that_does_not_converge_follows_its_timeout_strategy() {
    if !kvm_or_skip("a_migration_that_does_not_converge_follows_its_timeout_strategy") {
        return;
    }
    let mut vm = Vmm::start("strategy", "boot=2,max=4");
    assert_eq!(vm.guest("dirty start 4096").last().unwrap(), "OK");
    let dir = temp_dir("strategy-net");
    let migrate = |vm: &Vmm, name: &str, strategy: &str| {
        let (sock, slow) = (
            dir.join(format!("{name}.sock")),
            dir.join(format!("{name}-slow.sock")),
        );
        let dst = Vmm::spawn_unattached(&dir, name, &["--incoming", &format!("unix:{}", sock.display())]);
        wait_for_path(&sock);
        // Every memory frame 100 ms late: round 0 (all 16 MiB of the workload, 4 MiB frames)
        // lasts long enough for the guest's timer ticks, each of which rewrites a page, to
        // dirty some: a 0 ms downtime target is not met after that one round.
        let late = |m: &Message| {
            if matches!(m, Message::Memory(_)) {
                Act::Hold(Duration::from_millis(100))
            } else {
                Act::Pass
            }
        };
        let proxy = cutting_proxy(&slow, sock, late);
        let body = serde_json::json!({ "destination_url": format!("unix:{}", slow.display()),
            "downtime_ms": 0, "max_rounds": 1, "timeout_strategy": strategy });
        let (s, v) = vm.api("PUT", "vm.send-migration", Some(&body.to_string()));
        let _ = proxy.join();
        (s, v, dst)
    };
    let (s, v, mut dst) = migrate(&vm, "dst-cancel", "cancel");
    assert_eq!(s, 500, "{v}");
    assert!(v["error"].as_str().unwrap().contains("did not converge"), "{v}");
    let out = wait_child(dst.child.as_mut().unwrap(), T);
    dst.child = None;
    assert!(!out.status.success(), "the destination ran a VM the source kept");
    vm.assert_ticking(&[0, 1]);
    assert!(vm.guest("dirty check").last().unwrap().contains(" bad=0 "));

    let (s, report, dst) = migrate(&vm, "dst-throttle", "throttle");
    assert_eq!(s, 200, "{report}");
    let percents: Vec<u64> = report["rounds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["throttle_percent"].as_u64().unwrap())
        .collect();
    assert!(percents.len() > 1, "no throttled round: {percents:?}");
    assert_eq!(&percents[..2], &[0, 20], "{percents:?}");
    assert!(
        percents.windows(2).all(|w| w[0] <= w[1]) && percents.iter().all(|p| *p <= 95),
        "{percents:?}"
    );
    vm.exits_cleanly();
    let mut dst = dst.attach();
    assert!(dst.guest("dirty check").last().unwrap().contains(" bad=0 "));
    dst.assert_ticking(&[0, 1]);
    dst.poweroff();
}

/// `ctl migrate` shows the migration as it goes (a plain line per round when stderr is not a
/// terminal) and prints the report on stdout; `vm.migration-status` answers all along, also
/// while throttling holds the vCPUs (when `vm.info` may answer 429), with `wire_bytes` that
/// only grow.
#[test]
fn ctl_migrate_shows_progress_and_the_status_answers_throughout() {
    if !kvm_or_skip("ctl_migrate_shows_progress_and_the_status_answers_throughout") {
        return;
    }
    let mut vm = Vmm::start("progress", "boot=2,max=4");
    let (s, v) = vm.api("GET", "vm.migration-status", None);
    assert_eq!(s, 400, "no migration has run: {v}");
    assert_eq!(vm.guest("dirty start 4096").last().unwrap(), "OK");
    let dir = temp_dir("progress-net");
    let (sock, slow) = (dir.join("dst.sock"), dir.join("dst-slow.sock"));
    let dst = Vmm::spawn_unattached(&dir, "dst", &["--incoming", &format!("unix:{}", sock.display())]);
    wait_for_path(&sock);
    // Memory frames 100 ms late: round 0 does not converge to 0 ms, so throttled rounds follow.
    let late = |m: &Message| match m {
        Message::Memory(_) => Act::Hold(Duration::from_millis(100)),
        _ => Act::Pass,
    };
    let proxy = cutting_proxy(&slow, sock, late);
    let api = vm.api.to_str().unwrap().to_string();
    let to = format!("unix:{}", slow.display());
    let mut ctl = std::process::Command::new(vmm_bin())
        .args(["ctl", "--api-socket", &api, "migrate", &to, "--downtime-ms", "0"])
        .args(["--max-rounds", "1", "--timeout-strategy", "throttle"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ctl");
    let (mut seen, mut info_busy) = (Vec::<Value>::new(), 0);
    // A hang guard, not a speed bound: throttled rounds of held frames took over 30 s in L1
    // with two busy loops on the host (CI).
    let bound = Duration::from_secs(300);
    let deadline = Instant::now() + bound;
    while ctl.try_wait().expect("ctl").is_none() {
        assert!(
            Instant::now() < deadline,
            "the migration did not end in {bound:?}"
        );
        // The source exits once the destination has the VM: a refused connect ends the watch.
        let Ok((s, body)) = vmm_reference::api::request(&vm.api, "GET", "vm.migration-status", None) else {
            break;
        };
        match s {
            200 => seen.push(serde_json::from_str(&body).expect("JSON")),
            400 if seen.is_empty() => {}
            _ => panic!("vm.migration-status answered {s} during the migration: {body}"),
        }
        if let Ok((429, _)) = vmm_reference::api::request(&vm.api, "GET", "vm.info", None) {
            info_busy += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = wait_child(&mut ctl, T);
    let _ = proxy.join();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ctl migrate failed: {stderr}");
    eprintln!(
        "{} status answers, vm.info busy {info_busy} times; ctl's stderr:\n{stderr}",
        seen.len()
    );
    let wire: Vec<u64> = seen.iter().map(|v| v["wire_bytes"].as_u64().unwrap()).collect();
    assert!(
        wire.windows(2).all(|w| w[0] <= w[1]),
        "wire_bytes went back: {wire:?}"
    );
    assert!(
        seen.iter()
            .any(|v| v["phase"] == "precopy" && v["wire_bytes"].as_u64() > Some(0)),
        "no live pre-copy status: {seen:?}"
    );
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("migration: ")).collect();
    // Round 0 alone takes 400 ms of held frames: the 200 ms poll sees pre-copy at least once.
    assert!(
        lines
            .iter()
            .any(|l| l.contains(" precopy ") && l.contains("(max 1)  sent ")),
        "{stderr}"
    );
    assert!(!stderr.contains('\r'), "a redrawn line on a pipe: {stderr:?}");
    assert!(stderr.contains("\nmigrated: "), "no closing summary: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("the report on stdout");
    assert!(report["rounds"].as_array().unwrap().len() > 1, "{report}");
    vm.exits_cleanly();
    let mut dst = dst.attach();
    assert!(dst.guest("dirty check").last().unwrap().contains(" bad=0 "));
    dst.poweroff();
}

/// A TCP destination runs a VM only from a peer that proves it holds the pre-shared token
/// (a wrong one is refused and the destination listens on), refuses frames it has not
/// authenticated before reading them, and refuses a VM larger than its memory cap before
/// allocating anything.
#[test]
fn a_tcp_destination_takes_only_a_peer_with_the_token_and_a_vm_that_fits() {
    if !kvm_or_skip("a_tcp_destination_takes_only_a_peer_with_the_token_and_a_vm_that_fits") {
        return;
    }
    let mut vm = Vmm::start("token", "boot=2,max=4");
    let send = |vm: &Vmm, url: &str, token: Option<&str>| {
        let mut b = serde_json::json!({ "destination_url": url });
        if let Some(t) = token {
            b["token"] = t.into();
        }
        vm.api("PUT", "vm.send-migration", Some(&b.to_string()))
    };
    // A 128 MiB VM to a destination that takes 64 MiB.
    let (small, mut small_dst) =
        incoming_tcp_with(&temp_dir("token-small"), &["--max-incoming-memory", "64M"]);
    let (s, v) = send(&vm, &small, Some(TOKEN));
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("limit of 64 MiB"), "{v}");
    let out = wait_child(small_dst.child.as_mut().unwrap(), T);
    small_dst.child = None;
    assert!(!out.status.success());

    let (incoming, dst) = incoming_tcp(&temp_dir("token-dst"));
    let (s, v) = send(&vm, &incoming, None);
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("token"), "{v}");
    let (s, v) = send(&vm, &incoming, Some("not-the-token-0123456789"));
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("wrong migration token"),
        "{v}"
    );
    vm.assert_ticking(&[0, 1]);
    // A stranger announces a 1 TiB frame where the proof belongs: dropped on the header.
    let addr = incoming.strip_prefix("tcp:").unwrap();
    let mut c = std::net::TcpStream::connect(addr).expect("connect");
    assert!(matches!(
        recv(&mut c, &FrameLimits::default()),
        Ok(Message::Challenge(_))
    ));
    let mut hdr = vec![11u8];
    hdr.extend_from_slice(&(1u64 << 40).to_le_bytes());
    c.write_all(&hdr).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    assert_eq!(
        c.read(&mut [0u8; 16]).unwrap_or(0),
        0,
        "the connection stays open"
    );
    // The right token: the VM moves.
    let (s, v) = send(&vm, &incoming, Some(TOKEN));
    assert_eq!(s, 200, "{v}");
    vm.exits_cleanly();
    let mut dst = dst.attach();
    dst.assert_ticking(&[0, 1]);
    dst.poweroff();
}

#[test]
fn incompatible_or_damaged_input_is_refused_with_a_reason() {
    if !kvm_or_skip("incompatible_or_damaged_input_is_refused_with_a_reason") {
        return;
    }
    let dir = temp_dir("refusals");
    // A destination refuses a VM it cannot run, and says why, before the source pauses.
    let mig = dir.join("mig.sock");
    let mut dst = spawn_vmm(&[
        "--incoming",
        &format!("unix:{}", mig.display()),
        "--serial",
        "file=/dev/null",
    ]);
    wait_for_path(&mig);
    let mut s = std::os::unix::net::UnixStream::connect(&mig).unwrap();
    let compat = serde_json::json!({
        "max_vcpus": 100000,
        "memory": { "regions": [{ "guest_addr": 0, "len": 4096, "file_offset": 0 }] },
        "vendor": "NoSuchVendor",
        "features": [["1.ECX", 0], ["1.EDX", 0], ["7.0.EBX", 0], ["7.0.ECX", 0], ["7.0.EDX", 0],
                     ["80000001.ECX", 0], ["80000001.EDX", 0]],
        "format": 1
    });
    send(
        &mut s,
        &Message::Hello {
            version: 1,
            compat: compat.to_string().into_bytes(),
        },
    )
    .unwrap();
    match recv(&mut s, &FrameLimits::default()).unwrap() {
        Message::Refuse(why) => {
            assert!(why.contains("100000 possible CPUs"), "{why}");
            assert!(why.contains("NoSuchVendor"), "{why}");
        }
        m => panic!("expected Refuse, got {m:?}"),
    }
    let out = wait_child(&mut dst, T);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");

    // A snapshot with one flipped byte is refused with a clear error, nothing runs.
    let mut vm = Vmm::start("refusals-src", "boot=1,max=2");
    assert_eq!(vm.guest("dirty start 16").last().unwrap(), "OK");
    // Stopped: a running workload rewrites page 0 every 16 ticks, and a loaded host let it
    // overwrite the flipped bytes below before the check (bad=0).
    assert_eq!(vm.guest("dirty stop").last().unwrap(), "OK");
    let snap = dir.join("snap");
    let url = serde_json::json!({ "destination_url": snap.display().to_string() }).to_string();
    assert_eq!(vm.api("PUT", "vm.snapshot", Some(&url)).0, 200);
    vm.poweroff();
    // The memory image is mapped lazily and carries no checksum: a changed page reaches the
    // guest, whose own checksums catch it (this is what proves the migration tests' `bad=0`).
    let image = memory_image(&snap);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&image)
        .unwrap();
    let page = 32u64 << 20; // the workload's first page (guest-physical = file offset here)
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x55; 8], page + 8).unwrap();
    drop(f);
    let mut bad = Vmm::spawn(&dir, "bad-mem", &["--restore", snap.to_str().unwrap()]);
    let reply = bad.guest("dirty check");
    assert!(
        reply.last().unwrap().starts_with("ERR dirty pages=16 bad=1 "),
        "{reply:?}"
    );
    bad.poweroff();
    let state = snap.join("state.bin");
    let mut bytes = Vec::new();
    std::fs::File::open(&state)
        .unwrap()
        .read_to_end(&mut bytes)
        .unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::File::create(&state).unwrap().write_all(&bytes).unwrap();
    let mut child = spawn_vmm(&["--restore", snap.to_str().unwrap(), "--serial", "file=/dev/null"]);
    let out = wait_child(&mut child, T);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("checksum"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
}

/// The memory image of the snapshot in `dir` (`memory-<id>.bin`, named by its state).
fn memory_image(dir: &Path) -> PathBuf {
    let images: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("memory-"))
        .collect();
    assert_eq!(images.len(), 1, "one image in {}: {images:?}", dir.display());
    images[0].clone()
}

/// Snapshot `vm` into a fresh directory and restore it in a new process.
fn snapshot_and_restore(vm: &Vmm, test: &str) -> Vmm {
    let dir = temp_dir(test);
    let url = serde_json::json!({ "destination_url": dir.display().to_string() }).to_string();
    let (s, v) = vm.api("PUT", "vm.snapshot", Some(&url));
    assert_eq!(s, 200, "{v}");
    Vmm::spawn(&dir, "restored", &["--restore", dir.to_str().unwrap()])
}

/// While a snapshot holds the vCPUs, `vm.info`, `vm.remove-cpu` and `vm.pause` answer 429 at
/// once instead of waiting for it to finish (before, each blocked until the snapshot was
/// written). The window is the capture plus the write of ~16 MiB, so the test takes a few
/// snapshots until each operation has landed in one; one that lands outside is undone.
#[test]
fn control_answers_busy_while_a_snapshot_holds_the_vcpus() {
    if !kvm_or_skip("control_answers_busy_while_a_snapshot_holds_the_vcpus") {
        return;
    }
    let mut vm = Vmm::start("busy_snapshot", "boot=2,max=4");
    // Populated RAM makes the image (and the time the snapshot holds the vCPUs) larger.
    assert_eq!(vm.guest("dirty start 4096").last().unwrap(), "OK");
    let url = serde_json::json!({ "destination_url": temp_dir("busy_snapshot_dir").display().to_string() })
        .to_string();
    let ops: [(&str, &str, Option<&str>); 3] = [
        ("GET", "vm.info", None),
        ("PUT", "vm.remove-cpu", Some(r#"{"id": 3}"#)),
        ("PUT", "vm.pause", None),
    ];
    let mut busy = [false; 3];
    for _ in 0..40 {
        let (api, url) = (vm.api.clone(), url.clone());
        let snap = std::thread::spawn(move || {
            vmm_reference::api::request(&api, "PUT", "vm.snapshot", Some(&url)).expect("snapshot")
        });
        // vm.info answering 429 says the snapshot holds the vCPUs now; then the others.
        while !snap.is_finished() {
            if vm.api("GET", "vm.info", None).0 == 429 {
                busy[0] = true;
                for (i, (m, ep, b)) in ops.iter().enumerate().skip(1) {
                    let (s, v) = vm.api(m, ep, *b);
                    match s {
                        429 => busy[i] = true,
                        // Landed after the snapshot: CPU 3 is absent, a pause is undone.
                        400 if *ep == "vm.remove-cpu" => {}
                        204 if *ep == "vm.pause" => assert_eq!(vm.api("PUT", "vm.resume", None).0, 204),
                        _ => panic!("{ep}: {s} {v}"),
                    }
                }
                break;
            }
        }
        let (s, body) = snap.join().unwrap();
        assert_eq!(s, 200, "{body}");
        if busy.iter().all(|b| *b) {
            break;
        }
    }
    assert_eq!(
        busy, [true; 3],
        "(info, remove-cpu, pause) answered 429 during a snapshot"
    );
    // The VM runs on, unpaused, and its console input still arrives.
    assert_eq!(vm.info()["paused"], false);
    vm.assert_ticking(&[0, 1]);
    assert!(vm.guest("dirty check").last().unwrap().contains(" bad=0 "));
    vm.poweroff();
}

#[test]
fn x2apic_ids_above_255_survive_snapshot_and_restore() {
    if !kvm_or_skip("x2apic_ids_above_255_survive_snapshot_and_restore") {
        return;
    }
    // 32-bit x2APIC ids (KVM_CAP_X2APIC_API) on both sides: CPU 280 online, CPU 290 offlined.
    let mut vm = Vmm::start("x2snap", "boot=2,max=300");
    for id in [280u32, 290] {
        assert_eq!(
            vm.api("PUT", "vm.add-cpu", Some(&format!(r#"{{"id":{id}}}"#))).0,
            200
        );
        assert_eq!(
            vm.event("EVENT insert"),
            format!("EVENT insert cpu={id} online=1")
        );
    }
    assert_eq!(vm.guest("offline 290").last().unwrap(), "OK");
    let mut r = snapshot_and_restore(&vm, "x2snap-dir");
    vm.poweroff();
    let info = r.info();
    assert_eq!(
        (
            info["cpus"][280]["apic_mode"].as_str(),
            info["cpus"][280]["apic_sw_enabled"].as_bool()
        ),
        (Some("x2apic"), Some(true))
    );
    assert_eq!(
        (
            info["cpus"][290]["mp_state"].as_str(),
            info["cpus"][290]["apic_sw_enabled"].as_bool()
        ),
        (Some("HALTED"), Some(false))
    );
    r.assert_ticking(&[0, 1, 280]);
    assert_eq!(r.guest("online 290").last().unwrap(), "OK");
    assert_eq!(r.status().cpus[290].state, "online");
    // A CPU hot-added after the restore (CPU 0's saved CPUID with its own APIC id).
    assert_eq!(r.api("PUT", "vm.add-cpu", Some(r#"{"id":299}"#)).0, 200);
    assert_eq!(r.event("EVENT insert"), "EVENT insert cpu=299 online=1");
    r.poweroff();
}

#[test]
fn a_paused_vm_comes_back_paused() {
    if !kvm_or_skip("a_paused_vm_comes_back_paused") {
        return;
    }
    let vm = Vmm::start("pausedsnap", "boot=2,max=4");
    assert_eq!(vm.api("PUT", "vm.pause", None).0, 204);
    let mut r = snapshot_and_restore(&vm, "pausedsnap-dir");
    drop(vm);
    assert_eq!(r.info()["paused"], true);
    // Paused: the guest does not answer until resumed, and then it does.
    r.con.send("status").unwrap();
    assert!(
        r.con.read_line(Duration::from_millis(300)).is_err(),
        "a paused guest answered"
    );
    assert_eq!(r.api("PUT", "vm.resume", None).0, 204);
    let line = r.con.wait_for("STATUS", T).expect("reply after resume");
    assert!(line.contains("online=2"), "{line}");
    r.con.wait_for("OK", T).unwrap();
    r.poweroff();
}

#[test]
fn a_restored_vm_snapshots_and_migrates_again() {
    if !kvm_or_skip("a_restored_vm_snapshots_and_migrates_again") {
        return;
    }
    // RAM of a restored VM is file-backed (copy-on-write over memory.bin): its snapshot and
    // its migration read every page instead of only the populated ones. Chain both.
    let mut vm = Vmm::start("chain", "boot=2,max=4");
    assert_eq!(vm.guest("dirty start 512").last().unwrap(), "OK");
    let mut r1 = snapshot_and_restore(&vm, "chain-1");
    vm.poweroff();
    assert!(r1.guest("dirty check").last().unwrap().contains(" bad=0 "));
    let r2 = snapshot_and_restore(&r1, "chain-2");
    r1.poweroff();
    let dir = temp_dir("chain-3");
    let mig = dir.join("mig.sock");
    let incoming = format!("unix:{}", mig.display());
    let dst = Vmm::spawn_unattached(&dir, "dst", &["--incoming", &incoming]);
    wait_for_path(&mig);
    let body = serde_json::json!({ "destination_url": incoming }).to_string();
    let (s, v) = r2.api("PUT", "vm.send-migration", Some(&body));
    assert_eq!(s, 200, "{v}");
    r2.exits_cleanly();
    let mut r3 = dst.attach();
    let check = r3.guest("dirty check");
    assert!(
        check.last().unwrap().starts_with("OK dirty pages=512 bad=0 "),
        "{check:?}"
    );
    r3.assert_ticking(&[0, 1]);
    r3.poweroff();
}

#[test]
fn a_restored_vm_snapshots_into_the_directory_it_was_restored_from() {
    if !kvm_or_skip("a_restored_vm_snapshots_into_the_directory_it_was_restored_from") {
        return;
    }
    // Its RAM is a private mapping of that directory's image: the new snapshot must not
    // truncate or rewrite it (the guest triple-faulted at once when it did).
    let mut vm = Vmm::start("resnap", "boot=2,max=4");
    assert_eq!(vm.guest("dirty start 64").last().unwrap(), "OK");
    let mut r = snapshot_and_restore(&vm, "resnap-dir");
    vm.poweroff();
    let dir = r.dir.clone();
    let old = memory_image(&dir);
    let url = serde_json::json!({ "destination_url": dir.display().to_string() }).to_string();
    let (s, v) = r.api("PUT", "vm.snapshot", Some(&url));
    assert_eq!(s, 200, "{v}");
    assert_ne!(memory_image(&dir), old, "a new image, the old one unlinked");
    let check = r.guest("dirty check");
    assert!(
        check.last().unwrap().contains(" bad=0 "),
        "the VM lives on: {check:?}"
    );
    r.assert_ticking(&[0, 1]);
    r.poweroff();
    let mut again = Vmm::spawn(&dir, "again", &["--restore", dir.to_str().unwrap()]);
    let check = again.guest("dirty check");
    assert!(
        check.last().unwrap().starts_with("OK dirty pages=64 bad=0 "),
        "{check:?}"
    );
    again.poweroff();
}

/// What [`cutting_proxy`] does with a frame.
#[derive(PartialEq)]
enum Act {
    Pass,
    /// Close both connections without forwarding it: the network dies right there.
    Cut,
    /// Forward it this late.
    Hold(Duration),
}

/// A frame-level proxy between a migration source (connecting to `listen`) and a destination
/// (at `dest`), doing `act` to each frame in either direction.
fn cutting_proxy(listen: &Path, dest: PathBuf, act: fn(&Message) -> Act) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(listen).expect("bind proxy");
    std::thread::spawn(move || {
        let (src, _) = l.accept().expect("accept");
        let dst = std::os::unix::net::UnixStream::connect(&dest).expect("connect destination");
        let pump = move |mut from: std::os::unix::net::UnixStream, mut to: std::os::unix::net::UnixStream| {
            let limits = FrameLimits { max_frame: 1 << 30 };
            while let Ok(m) = recv(&mut from, &limits) {
                match act(&m) {
                    Act::Cut => {
                        let _ = from.shutdown(std::net::Shutdown::Both);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    Act::Hold(d) => std::thread::sleep(d),
                    Act::Pass => {}
                }
                if send(&mut to, &m).is_err() {
                    return;
                }
            }
            let _ = to.shutdown(std::net::Shutdown::Both);
        };
        let (s2, d2) = (src.try_clone().unwrap(), dst.try_clone().unwrap());
        let back = std::thread::spawn(move || pump(d2, s2));
        pump(src, dst);
        let _ = back.join();
    })
}

#[test]
fn a_vm_never_runs_in_two_places_when_the_link_dies_at_the_end() {
    if !kvm_or_skip("a_vm_never_runs_in_two_places_when_the_link_dies_at_the_end") {
        return;
    }
    let through = |vm: &Vmm, dir: &Path, act: fn(&Message) -> Act| {
        let (dst_sock, proxy_sock) = (dir.join("dst.sock"), dir.join("proxy.sock"));
        let dst = Vmm::spawn_unattached(
            dir,
            "dst",
            &["--incoming", &format!("unix:{}", dst_sock.display())],
        );
        wait_for_path(&dst_sock);
        let p = cutting_proxy(&proxy_sock, dst_sock, act);
        let body = serde_json::json!({ "destination_url": format!("unix:{}", proxy_sock.display()), "timeout_ms": 30000 });
        let api = vm.api.clone();
        let mig = std::thread::spawn(move || {
            let r = vmm_reference::api::request(&api, "PUT", "vm.send-migration", Some(&body.to_string()));
            let _ = p.join();
            r.expect("send-migration").0
        });
        (mig, dst)
    };
    let migrate_through = |vm: &Vmm, dir: &Path, act: fn(&Message) -> Act| -> (u16, Unattached) {
        let (mig, dst) = through(vm, dir, act);
        (mig.join().unwrap(), dst)
    };

    // 1. The Ack is lost: the source keeps and resumes its VM; the destination's restored
    //    copy never runs (without Complete it waits paused).
    let mut vm = Vmm::start("twoplaces-a", "boot=2,max=4");
    assert_eq!(vm.guest("dirty start 64").last().unwrap(), "OK");
    let cut_ack = |m: &Message| if *m == Message::Ack { Act::Cut } else { Act::Pass };
    let (s, dst) = migrate_through(&vm, &temp_dir("twoplaces-a-net"), cut_ack);
    assert_eq!(s, 500);
    assert_eq!(vm.info()["paused"], false);
    assert!(vm.guest("dirty check").last().unwrap().contains(" bad=0 "));
    let (st, info) = vmm_reference::api::request(&dst.api, "GET", "vm.info", None).expect("destination API");
    assert_eq!(st, 200);
    assert!(
        info.contains("\"paused\":true"),
        "the destination must not run its copy: {info}"
    );
    drop(dst); // kills the destination VMM with its paused copy
    vm.poweroff();

    // 2. Complete is lost: the source has stopped for good (exit 0); the destination keeps
    //    the VM paused and intact, says so in vm.info, and `vm.resume` brings it back with
    //    every page.
    let vm = Vmm::start("twoplaces-b", "boot=2,max=4");
    let cut_complete = |m: &Message| {
        if *m == Message::Complete {
            Act::Cut
        } else {
            Act::Pass
        }
    };
    let (s, dst) = migrate_through(&vm, &temp_dir("twoplaces-b-net"), cut_complete);
    assert_eq!(s, 200);
    vm.exits_cleanly();
    let mut dst = dst.attach();
    let info = dst.until("the destination to give up on Complete", |v| {
        v["migration"]["phase"] == "incomplete"
    });
    assert_eq!(info["paused"], true, "{info}");
    assert!(
        info["migration"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("Complete")),
        "{info}"
    );
    assert_eq!(dst.api("PUT", "vm.resume", None).0, 204);
    dst.assert_ticking(&[0, 1]);
    dst.poweroff();

    // 2b. The same on a standby: vm.receive-migration does not answer 204 "the VM runs
    //     here" for a copy that waits paused (it did).
    let vm = Vmm::start("twoplaces-b2", "boot=2,max=4");
    let dir = temp_dir("twoplaces-b2-net");
    let dst = Vmm::spawn_unattached(&dir, "dst", &["--standby"]);
    wait_for_path(&dst.api);
    let (dst_sock, proxy_sock) = (dir.join("dst.sock"), dir.join("proxy.sock"));
    let (api, body) = (
        dst.api.clone(),
        serde_json::json!({ "receiver_url": format!("unix:{}", dst_sock.display()) }).to_string(),
    );
    let receiving = std::thread::spawn(move || {
        vmm_reference::api::request(&api, "PUT", "vm.receive-migration", Some(&body))
    });
    wait_for_path(&dst_sock);
    let p = cutting_proxy(&proxy_sock, dst_sock, cut_complete);
    let body = serde_json::json!({ "destination_url": format!("unix:{}", proxy_sock.display()) });
    assert_eq!(vm.api("PUT", "vm.send-migration", Some(&body.to_string())).0, 200);
    p.join().unwrap();
    vm.exits_cleanly();
    let (s, v) = receiving.join().unwrap().expect("receive-migration answers");
    assert!(s == 500 && v.contains("paused"), "{s} {v}");
    let mut dst = dst.attach();
    assert_eq!(dst.info()["migration"]["phase"], "incomplete");
    assert_eq!(dst.api("PUT", "vm.resume", None).0, 204);
    dst.assert_ticking(&[0, 1]);
    dst.poweroff();

    // 3. Complete is late: meanwhile the destination's vm.info says it waits for it and
    //    vm.resume answers 429; then the VM runs there.
    let vm = Vmm::start("twoplaces-c", "boot=2,max=4");
    let hold_complete = |m: &Message| {
        if *m == Message::Complete {
            // Long enough for the polls below on a loaded L1; well below the destination's
            // 60 s bound on a silent peer.
            Act::Hold(Duration::from_secs(10))
        } else {
            Act::Pass
        }
    };
    let (mig, dst) = through(&vm, &temp_dir("twoplaces-c-net"), hold_complete);
    let deadline = Instant::now() + T;
    loop {
        let (s, v) = vmm_reference::api::request(&dst.api, "GET", "vm.info", None).expect("destination API");
        let v: Value = serde_json::from_str(&v).unwrap_or(Value::Null);
        if s == 200 && v["migration"]["phase"] == "awaiting-complete" {
            assert_eq!(v["paused"], true, "{v}");
            let (s, r) = vmm_reference::api::request(&dst.api, "PUT", "vm.resume", None).unwrap();
            assert_eq!(s, 429, "vm.resume while the source may still run the VM: {r}");
            break;
        }
        assert!(Instant::now() < deadline, "never saw awaiting-complete: {s} {v}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(mig.join().unwrap(), 200);
    vm.exits_cleanly();
    let mut dst = dst.attach();
    dst.until("the VM to run at the destination", |v| {
        v["migration"]["phase"] == "received" && v["paused"] == false
    });
    dst.assert_ticking(&[0, 1]);
    dst.poweroff();
}

/// Receives that cannot succeed leave the standby at `api` ready for the next one: a
/// receiver path naming a file (refused, the file kept: it used to be replaced by the
/// socket, then deleted), no source within `timeout_ms`, and a cancelled wait (which used
/// to last forever, the standby answering 429 to every retry).
fn a_standby_receive_fails_cleanly(api: &Path, dir: &Path) {
    let receive = |body: serde_json::Value| {
        let api = api.to_path_buf();
        std::thread::spawn(move || {
            vmm_reference::api::request(&api, "PUT", "vm.receive-migration", Some(&body.to_string())).unwrap()
        })
    };
    let file = dir.join("state.bin");
    std::fs::write(&file, b"a snapshot").unwrap();
    let (s, body) = receive(serde_json::json!({ "receiver_url": format!("unix:{}", file.display()) }))
        .join()
        .unwrap();
    assert!(s == 400 && body.contains("not a socket"), "{s} {body}");
    assert_eq!(std::fs::read(&file).unwrap(), b"a snapshot");
    let nobody = dir.join("nobody.sock");
    let url = format!("unix:{}", nobody.display());
    let (s, body) = receive(serde_json::json!({ "receiver_url": url, "timeout_ms": 300 }))
        .join()
        .unwrap();
    assert!(s == 400 && body.contains("no source connected"), "{s} {body}");
    assert!(!nobody.exists(), "the socket goes with the receive");
    let waiting = receive(serde_json::json!({ "receiver_url": url }));
    wait_for_path(&nobody);
    let (s, body) = vmm_reference::api::request(
        api,
        "PUT",
        "vm.receive-migration",
        Some(r#"{"receiver_url":"unix:/x"}"#),
    )
    .unwrap();
    assert!(s == 429 && body.contains("in progress"), "{s} {body}");
    let (s, body) = vmm_reference::api::request(api, "PUT", "vm.cancel-migration", None).unwrap();
    assert_eq!(s, 204, "{body}");
    let (s, body) = waiting.join().unwrap();
    assert!(s == 400 && body.contains("cancelled"), "{s} {body}");
    let (s, body) = vmm_reference::api::request(api, "PUT", "vm.cancel-migration", None).unwrap();
    assert!(s == 400 && body.contains("no incoming migration"), "{s} {body}");
}

#[test]
fn a_standby_vmm_restores_and_receives_through_the_api() {
    if !kvm_or_skip("a_standby_vmm_restores_and_receives_through_the_api") {
        return;
    }
    let mut vm = Vmm::start("standby-src", "boot=2,max=4");
    assert_eq!(vm.guest("dirty start 64").last().unwrap(), "OK");
    let snap = temp_dir("standby-snap");
    let url = serde_json::json!({ "destination_url": snap.display().to_string() }).to_string();
    assert_eq!(vm.api("PUT", "vm.snapshot", Some(&url)).0, 200);
    vm.poweroff();
    let req =
        |api: &Path, m: &str, ep: &str, b: Option<&str>| vmm_reference::api::request(api, m, ep, b).unwrap();

    // A standby VMM: the API answers, there is no VM until vm.restore makes one.
    let dir = temp_dir("standby-b");
    let b = Vmm::spawn_unattached(&dir, "b", &["--standby"]);
    wait_for_path(&b.api);
    let (s, body) = req(&b.api, "GET", "vm.info", None);
    assert!(s == 400 && body.contains("no VM yet"), "{s} {body}");
    assert_eq!(req(&b.api, "GET", "vm.restore", None).0, 405);
    let (s, body) = req(
        &b.api,
        "PUT",
        "vm.restore",
        Some(r#"{"source_url":"file:///nonexistent"}"#),
    );
    assert!(s == 400 && body.contains("nonexistent"), "{s} {body}");
    let restore = serde_json::json!({ "source_url": format!("file://{}", snap.display()) }).to_string();
    assert_eq!(req(&b.api, "PUT", "vm.restore", Some(&restore)).0, 204);
    let (s, body) = req(&b.api, "PUT", "vm.restore", Some(&restore));
    assert!(s == 400 && body.contains("already running"), "{s} {body}");
    let mut b = b.attach();
    assert!(b.guest("dirty check").last().unwrap().contains(" bad=0 "));

    // Another standby VMM receives it by live migration, through its API.
    let dir = temp_dir("standby-c");
    let c = Vmm::spawn_unattached(&dir, "c", &["--standby"]);
    wait_for_path(&c.api);
    a_standby_receive_fails_cleanly(&c.api, &dir);
    let mig = dir.join("mig.sock");
    let receiver = format!("unix:{}", mig.display());
    let (capi, body) = (
        c.api.clone(),
        serde_json::json!({ "receiver_url": receiver }).to_string(),
    );
    let receiving = std::thread::spawn(move || req(&capi, "PUT", "vm.receive-migration", Some(&body)));
    wait_for_path(&mig);
    let send = serde_json::json!({ "destination_url": receiver }).to_string();
    let (s, v) = b.api("PUT", "vm.send-migration", Some(&send));
    assert_eq!(s, 200, "{v}");
    assert_eq!(receiving.join().unwrap().0, 204);
    b.exits_cleanly();
    let mut c = c.attach();
    assert!(c.guest("dirty check").last().unwrap().contains(" bad=0 "));
    c.poweroff();
}
