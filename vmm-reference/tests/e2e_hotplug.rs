// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end CPU hotplug with the test guest on the real /dev/kvm, driven through the REST
//! API: resize, offline/online, remove/re-add with fd reuse, refusals, x2APIC ids, churn.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn cpu(v: &Value, i: usize) -> &Value {
    &v["cpus"][i]
}

#[test]
fn resize_to_eight_onlines_every_cpu_and_info_agrees() {
    if !kvm_or_skip("resize_to_eight_onlines_every_cpu_and_info_agrees") {
        return;
    }
    let mut vm = Vmm::start("resize8", "boot=1,max=8");
    assert_eq!(vm.api("PUT", "vm.resize", Some(r#"{"desired_vcpus":8}"#)).0, 204);
    for _ in 1..8 {
        let e = vm.event("EVENT insert");
        assert!(e.ends_with("online=1"), "{e}");
    }
    let s1 = vm.status();
    assert_eq!((s1.present, s1.online), (8, 8), "{s1:?}");
    std::thread::sleep(Duration::from_millis(300));
    let s2 = vm.status();
    for c in 0..8 {
        assert!(s2.cpus[c].ticks > s1.cpus[c].ticks, "CPU {c} not ticking");
    }
    let info = vm.info();
    assert_eq!(info["present_vcpus"], 8);
    for (i, g) in s2.cpus.iter().enumerate() {
        let c = cpu(&info, i);
        assert_eq!(c["present"], true);
        assert_eq!(c["vcpu"], "running");
        assert_eq!(
            c["apic_id"], g.apic_id,
            "the VMM's and the guest's APIC ids agree"
        );
        assert_eq!(c["apic_mode"], s2.apic_mode.as_str());
        assert_eq!(c["apic_sw_enabled"], true);
        if i > 0 {
            assert_eq!(c["ost_event"], 1, "insert reported through _OST");
            assert_eq!(c["ost_status"], 0);
        }
    }
    vm.poweroff();
}

#[test]
fn offlined_cpus_are_halted_with_sw_disabled_apic_then_come_back() {
    if !kvm_or_skip("offlined_cpus_are_halted_with_sw_disabled_apic_then_come_back") {
        return;
    }
    let mut vm = Vmm::start("offline35", "boot=6,max=8");
    assert_eq!(vm.guest("offline 3"), vec!["OK"]);
    assert_eq!(vm.guest("offline 5"), vec!["OK"]);
    let info = vm.until("CPUs 3 and 5 halted", |v| {
        [3, 5]
            .iter()
            .all(|&i| cpu(v, i)["mp_state"] == "HALTED" && cpu(v, i)["apic_sw_enabled"] == false)
    });
    for i in [0, 1, 2, 4] {
        assert_eq!(cpu(&info, i)["apic_sw_enabled"], true, "CPU {i}");
    }
    let s = vm.status();
    assert_eq!(
        (s.cpus[3].state.as_str(), s.cpus[5].state.as_str()),
        ("offline", "offline")
    );
    assert_eq!(vm.guest("online 3"), vec!["OK"]);
    assert_eq!(vm.guest("online 5"), vec!["OK"]);
    let info = vm.info();
    assert!([3, 5].iter().all(|&i| cpu(&info, i)["apic_sw_enabled"] == true));
    let s1 = vm.status();
    std::thread::sleep(Duration::from_millis(200));
    let s2 = vm.status();
    assert_eq!(s2.online, 6);
    assert!(s2.cpus[3].ticks > s1.cpus[3].ticks && s2.cpus[5].ticks > s1.cpus[5].ticks);
    vm.poweroff();
}

#[test]
fn remove_and_readd_the_same_cpu_fifty_times_reuses_the_fd_without_leaks() {
    if !kvm_or_skip("remove_and_readd_the_same_cpu_fifty_times_reuses_the_fd_without_leaks") {
        return;
    }
    let mut vm = Vmm::start("readd", "boot=2,max=4");
    let pid = vm.pid();
    let cycle = |vm: &mut Vmm| {
        assert_eq!(vm.api("PUT", "vm.remove-cpu", Some(r#"{"id":1}"#)).0, 204);
        assert_eq!(vm.event("EVENT remove"), "EVENT remove cpu=1 ejected=1");
        vm.until("CPU 1 parked", |v| {
            cpu(v, 1)["vcpu"] == "parked" && v["pending_removals"].as_array().is_some_and(|a| a.is_empty())
        });
        let (s, v) = vm.api("PUT", "vm.add-cpu", Some(r#"{"id":1}"#));
        assert_eq!((s, v["id"].as_u64()), (200, Some(1)), "{v}");
        assert_eq!(vm.event("EVENT insert"), "EVENT insert cpu=1 online=1");
    };
    cycle(&mut vm);
    let (tasks, fdir) = (format!("/proc/{pid}/task"), format!("/proc/{pid}/fd"));
    let (threads, fds) = (settled(&tasks), settled(&fdir));
    for _ in 1..50 {
        cycle(&mut vm);
    }
    assert_eq!(settled(&tasks), threads, "leaked threads");
    assert_eq!(settled(&fdir), fds, "leaked fds");
    let info = vm.info();
    assert_eq!(info["reused_vcpu_fds"], 50);
    assert_eq!(cpu(&info, 1)["vcpu"], "running");
    let s1 = vm.status();
    std::thread::sleep(Duration::from_millis(200));
    let s2 = vm.status();
    assert_eq!(s2.cpus[1].state, "online");
    assert!(s2.cpus[1].ticks > s1.cpus[1].ticks);
    vm.poweroff();
}

#[test]
fn refusals_busy_answers_and_bad_requests_leave_the_vm_running() {
    if !kvm_or_skip("refusals_busy_answers_and_bad_requests_leave_the_vm_running") {
        return;
    }
    let mut vm = Vmm::start("refuse", "boot=2,max=4");
    // The boot CPU cannot be removed.
    let (s, v) = vm.api("PUT", "vm.remove-cpu", Some(r#"{"id":0}"#));
    assert_eq!(s, 400, "{v}");
    // A guest eject of a CPU the VMM did not ask to remove is refused and counted, and the
    // CPU is announced to the guest again, so both sides agree it is still there.
    assert_eq!(vm.guest("eject 1"), vec!["OK"]);
    assert_eq!(vm.event("EVENT insert"), "EVENT insert cpu=1 online=1");
    let info = vm.until("refusal counted", |v| v["refused_ejects"] == 1);
    assert_eq!(cpu(&info, 1)["vcpu"], "running");
    assert_eq!(cpu(&info, 1)["present"], true);
    assert_eq!(cpu(&info, 1)["inserting"], false, "the guest took the event");
    // Hold a removal pending: the guest disables the hotplug GPE first.
    assert_eq!(vm.guest("gpe off"), vec!["OK"]);
    assert_eq!(vm.api("PUT", "vm.remove-cpu", Some(r#"{"id":1}"#)).0, 204);
    let (s, v) = vm.api("PUT", "vm.resize", Some(r#"{"desired_vcpus":3}"#));
    assert_eq!(s, 429, "resize during a removal answers busy: {v}");
    assert_eq!(vm.api("PUT", "vm.remove-cpu", Some(r#"{"id":1}"#)).0, 429);
    assert_eq!(vm.info()["pending_removals"], serde_json::json!([1]));
    // The event waited in GPE0_STS; enabling the GPE raises the level SCI and the guest acts.
    assert_eq!(vm.guest("gpe on"), vec!["OK"]);
    assert_eq!(vm.event("EVENT remove"), "EVENT remove cpu=1 ejected=1");
    vm.until("removal finished", |v| {
        v["pending_removals"].as_array().is_some_and(|a| a.is_empty())
    });
    assert_eq!(vm.api("PUT", "vm.resize", Some(r#"{"desired_vcpus":3}"#)).0, 204);
    vm.event("EVENT insert");
    vm.event("EVENT insert");
    // Out of range and malformed requests: 4xx, and the VM keeps running.
    for (ep, body, want) in [
        ("vm.resize", Some(r#"{"desired_vcpus":5}"#), 400),
        ("vm.resize", Some(r#"{"desired_vcpus":0}"#), 400),
        ("vm.resize", Some("{not json"), 400),
        ("vm.resize", Some(r#"{"cpus":2}"#), 400),
        ("vm.add-cpu", Some(r#"{"id":9}"#), 400),
        ("vm.add-cpu", Some(r#"{"id":2}"#), 400),
        ("vm.remove-cpu", None, 400),
        ("vm.frobnicate", None, 404),
    ] {
        let (s, v) = vm.api("PUT", ep, body);
        assert_eq!(s, want, "{ep} {body:?}: {v}");
        assert!(v["error"].is_string(), "{v}");
    }
    assert_eq!(vm.api("GET", "vm.resize", None).0, 405);
    let s = vm.status();
    assert_eq!(s.present, 3);
    vm.poweroff();
}

#[test]
fn a_removal_the_guest_refuses_is_reported_retried_and_cancelled() {
    if !kvm_or_skip("a_removal_the_guest_refuses_is_reported_retried_and_cancelled") {
        return;
    }
    // Like Linux with a CPU it cannot offline: the guest answers _OST(3, 0x82). That used
    // to wedge hotplug: remove-cpu, add-cpu and resize answered busy forever.
    let mut vm = Vmm::start("refused", "boot=3,max=4");
    assert_eq!(vm.guest("refuse 2"), vec!["OK"]);
    assert_eq!(vm.api("PUT", "vm.remove-cpu", Some(r#"{"id":2}"#)).0, 204);
    assert_eq!(vm.event("EVENT remove"), "EVENT remove cpu=2 ejected=0");
    let info = vm.until("refusal reported", |v| cpu(v, 2)["remove_refused"] == true);
    assert_eq!(
        (
            cpu(&info, 2)["ost_event"].as_u64(),
            cpu(&info, 2)["ost_status"].as_u64()
        ),
        (Some(3), Some(0x82))
    );
    let (s, v) = vm.api("PUT", "vm.resize", Some(r#"{"desired_vcpus":4}"#));
    assert!(
        s == 429 && v["error"].as_str().is_some_and(|e| e.contains("cancel")),
        "{s} {v}"
    );
    // Other CPUs stay pluggable.
    assert_eq!(vm.api("PUT", "vm.add-cpu", Some(r#"{"id":3}"#)).0, 200);
    assert_eq!(vm.event("EVENT insert"), "EVENT insert cpu=3 online=1");
    // A retry raises the event again; refused again.
    assert_eq!(vm.api("PUT", "vm.remove-cpu", Some(r#"{"id":2}"#)).0, 204);
    assert_eq!(vm.event("EVENT remove"), "EVENT remove cpu=2 ejected=0");
    vm.until("refused again", |v| cpu(v, 2)["remove_refused"] == true);
    // Withdrawn: the CPU stays, online, and hotplug is free again.
    assert_eq!(vm.api("PUT", "vm.cancel-removal", Some(r#"{"id":2}"#)).0, 204);
    let info = vm.info();
    assert_eq!(info["pending_removals"], serde_json::json!([]));
    assert_eq!(
        (
            cpu(&info, 2)["present"].as_bool(),
            cpu(&info, 2)["remove_requested"].as_bool()
        ),
        (Some(true), Some(false))
    );
    assert_eq!(vm.api("PUT", "vm.cancel-removal", Some(r#"{"id":2}"#)).0, 400);
    vm.assert_ticking(&[0, 1, 2, 3]);
    // Once the guest lets it go, the same CPU is removed as usual.
    assert_eq!(vm.guest("refuse off"), vec!["OK"]);
    assert_eq!(vm.api("PUT", "vm.resize", Some(r#"{"desired_vcpus":2}"#)).0, 204);
    for _ in 0..2 {
        assert!(vm.event("EVENT remove").ends_with("ejected=1"));
    }
    vm.until("both parked", |v| {
        v["present_vcpus"] == 2 && v["pending_removals"].as_array().is_some_and(|a| a.is_empty())
    });
    vm.poweroff();
}

#[test]
fn a_removal_the_guest_takes_and_drops_can_be_asked_again_or_withdrawn() {
    if !kvm_or_skip("a_removal_the_guest_takes_and_drops_can_be_asked_again_or_withdrawn") {
        return;
    }
    // The guest takes CPU 2's removal event and does nothing (no eject, no _OST). That kept
    // remove-cpu, cancel-removal, add-cpu and resize at 429 for good (snapshots too).
    let mut vm = Vmm::start("dropped-removal", "boot=3,max=4");
    assert_eq!(vm.guest("ignore 2"), vec!["OK"]);
    assert_eq!(vm.api("PUT", "vm.remove-cpu", Some(r#"{"id":2}"#)).0, 204);
    assert_eq!(vm.event("EVENT remove"), "EVENT remove cpu=2 ignored");
    assert_eq!(vm.api("PUT", "vm.resize", Some(r#"{"desired_vcpus":4}"#)).0, 429);
    // Asked again: the event is raised again.
    assert_eq!(vm.api("PUT", "vm.remove-cpu", Some(r#"{"id":2}"#)).0, 204);
    assert_eq!(vm.event("EVENT remove"), "EVENT remove cpu=2 ignored");
    // Withdrawn: the CPU stays, online, and hotplug is free again.
    let (s, v) = vm.api("PUT", "vm.cancel-removal", Some(r#"{"id":2}"#));
    assert_eq!(s, 204, "{v}");
    let info = vm.info();
    assert_eq!(info["pending_removals"], serde_json::json!([]));
    assert_eq!(cpu(&info, 2)["present"], true);
    vm.assert_ticking(&[0, 1, 2]);
    assert_eq!(vm.api("PUT", "vm.add-cpu", Some(r#"{"id":3}"#)).0, 200);
    assert_eq!(vm.event("EVENT insert"), "EVENT insert cpu=3 online=1");
    // Once the guest acts on it, the same CPU is removed as usual.
    assert_eq!(vm.guest("ignore off"), vec!["OK"]);
    assert_eq!(vm.api("PUT", "vm.remove-cpu", Some(r#"{"id":2}"#)).0, 204);
    assert!(vm.event("EVENT remove").ends_with("ejected=1"));
    vm.until("CPU 2 parked", |v| {
        cpu(v, 2)["vcpu"] == "parked" && v["pending_removals"].as_array().is_some_and(|a| a.is_empty())
    });
    vm.poweroff();
}

#[test]
fn one_gpe_for_an_insert_and_a_removal_of_every_cpu_loses_none() {
    if !kvm_or_skip("one_gpe_for_an_insert_and_a_removal_of_every_cpu_loses_none") {
        return;
    }
    // Seven CPUs plugged and unplugged before the guest looks: fourteen events behind one
    // GPE. The test guest's scan took one event per round, eight rounds, and left the rest
    // waiting for a GPE that never came (CI, L1 6.12: a removal the concurrent-clients test
    // waited for forever).
    let mut vm = Vmm::start("burst", "boot=1,max=8");
    assert_eq!(vm.guest("gpe off"), vec!["OK"]);
    for id in 1..8 {
        let body = format!(r#"{{"id":{id}}}"#);
        assert_eq!(vm.api("PUT", "vm.add-cpu", Some(&body)).0, 200, "add {id}");
        assert_eq!(vm.api("PUT", "vm.remove-cpu", Some(&body)).0, 204, "remove {id}");
    }
    assert_eq!(vm.guest("gpe on"), vec!["OK"]);
    for _ in 1..8 {
        assert!(vm.event("EVENT remove").ends_with("ejected=1"));
    }
    let info = vm.until("every removal taken", |v| {
        v["present_vcpus"] == 1 && v["pending_removals"].as_array().is_some_and(|a| a.is_empty())
    });
    assert_eq!(info["refused_ejects"], 0, "{info}");
    vm.assert_ticking(&[0]);
    vm.poweroff();
}

#[test]
fn cpus_with_apic_ids_above_255_come_online_in_x2apic_mode() {
    if !kvm_or_skip("cpus_with_apic_ids_above_255_come_online_in_x2apic_mode") {
        return;
    }
    let mut vm = Vmm::start("x2hot", "boot=2,max=300");
    for id in [256u32, 299] {
        let (s, v) = vm.api("PUT", "vm.add-cpu", Some(&format!(r#"{{"id":{id}}}"#)));
        assert_eq!(s, 200, "{v}");
        assert_eq!(
            vm.event("EVENT insert"),
            format!("EVENT insert cpu={id} online=1")
        );
    }
    let st = vm.status();
    assert_eq!(st.apic_mode, "x2apic");
    assert_eq!(
        (st.cpus[256].state.as_str(), st.cpus[256].apic_id),
        ("online", 256)
    );
    assert_eq!(
        (st.cpus[299].state.as_str(), st.cpus[299].apic_id),
        ("online", 299)
    );
    let info = vm.info();
    assert_eq!(cpu(&info, 299)["apic_id"], 299);
    assert_eq!(cpu(&info, 299)["apic_mode"], "x2apic");
    vm.poweroff();
}

/// Deterministic xorshift for the churn sequence.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[test]
fn churn_of_200_operations_keeps_every_online_cpu_ticking() {
    if !kvm_or_skip("churn_of_200_operations_keeps_every_online_cpu_ticking") {
        return;
    }
    let max = 6u32;
    let mut vm = Vmm::start("churn", &format!("boot=2,max={max}"));
    let mut rng = Rng(0x5eed_1234_abcd);
    let start = Instant::now();
    vm.guest("resetgaps");
    let mut ops = [0u32; 4];
    // Every step waits with its helper's bound; the whole churn has none (a loaded nested L1
    // took over 180 s for it, the step bounds still catch a stuck one).
    for _ in 0..200 {
        let s = vm.status();
        let present: Vec<u32> = (0..max)
            .filter(|&i| s.cpus[i as usize].state != "absent")
            .collect();
        let absent: Vec<u32> = (0..max).filter(|i| !present.contains(i)).collect();
        let online: Vec<u32> = present
            .iter()
            .copied()
            .filter(|&i| i != 0 && s.cpus[i as usize].state == "online")
            .collect();
        let offline: Vec<u32> = present
            .iter()
            .copied()
            .filter(|&i| s.cpus[i as usize].state == "offline")
            .collect();
        match rng.below(4) {
            0 if !absent.is_empty() => {
                let id = absent[rng.below(absent.len() as u64) as usize];
                let (st, v) = vm.api("PUT", "vm.add-cpu", Some(&format!(r#"{{"id":{id}}}"#)));
                assert_eq!(st, 200, "{v}");
                assert_eq!(
                    vm.event("EVENT insert"),
                    format!("EVENT insert cpu={id} online=1")
                );
                ops[0] += 1;
            }
            1 if present.len() > 1 => {
                let id = present[1 + rng.below(present.len() as u64 - 1) as usize];
                assert_eq!(
                    vm.api("PUT", "vm.remove-cpu", Some(&format!(r#"{{"id":{id}}}"#)))
                        .0,
                    204
                );
                assert_eq!(
                    vm.event("EVENT remove"),
                    format!("EVENT remove cpu={id} ejected=1")
                );
                vm.until("removal done", |v| {
                    v["pending_removals"].as_array().is_some_and(|a| a.is_empty())
                });
                ops[1] += 1;
            }
            2 if !online.is_empty() => {
                let id = online[rng.below(online.len() as u64) as usize];
                assert_eq!(vm.guest(&format!("offline {id}")), vec!["OK"]);
                ops[2] += 1;
            }
            _ if !offline.is_empty() => {
                let id = offline[rng.below(offline.len() as u64) as usize];
                assert_eq!(vm.guest(&format!("online {id}")), vec!["OK"]);
                ops[3] += 1;
            }
            _ => {}
        }
    }
    let s1 = vm.status();
    std::thread::sleep(Duration::from_millis(200));
    let s2 = vm.status();
    let mut worst = 0;
    for (a, b) in s1.cpus.iter().zip(&s2.cpus) {
        if b.state == "online" {
            assert!(b.ticks > a.ticks, "CPU {} stopped ticking", b.index);
            worst = worst.max(b.maxgap_us);
        }
    }
    eprintln!(
        "churn: {ops:?} (add, remove, offline, online) in {:?}, worst tick gap {worst} us",
        start.elapsed()
    );
    // A timer that hotplug, offline or online left unarmed shows as a gap of the rest of the
    // churn; 2 s is far below that and far above what host load does to a 10 ms tick (PVM
    // under load: 25 ms; nested kvm-amd in QEMU TCG: 40 ms). The tight figure is a benchmark.
    assert!(worst <= 2_000_000, "a CPU missed ticks: worst gap {worst} us");
    assert!(ops.iter().all(|&n| n > 10), "each kind of operation ran: {ops:?}");
    vm.poweroff();
}

#[test]
fn resize_to_300_and_back_to_128_unplugs_every_cpu_above_255() {
    if !kvm_or_skip("resize_to_300_and_back_to_128_unplugs_every_cpu_above_255") {
        return;
    }
    // Cloud Hypervisor #7341: with more than 255 vCPUs, unplugging stopped after 172 CPUs.
    // The guest onlines only the CPUs around the 8-bit boundary: 300 CPUs each taking 100
    // timer ticks a second are more than one emulated L1 CPU can run in the nested suite,
    // and unplugging is the VMM's part (online CPUs are offlined by the guest first).
    let mut vm = Vmm::start("big", "boot=2,max=300");
    assert_eq!(vm.guest("autoonline off").last().unwrap(), "OK");
    assert_eq!(
        vm.api("PUT", "vm.resize", Some(r#"{"desired_vcpus":300}"#)).0,
        204
    );
    for _ in 2..300 {
        assert!(vm.event("EVENT insert").ends_with("online=0"));
    }
    let online = [127, 128, 254, 255, 256, 257, 299];
    for c in online {
        assert_eq!(
            vm.guest(&format!("online {c}")).last().unwrap(),
            "OK",
            "online {c}"
        );
    }
    let st = vm.status();
    assert_eq!((st.present, st.online), (300, 2 + online.len() as u32));
    assert_eq!(
        vm.api("PUT", "vm.resize", Some(r#"{"desired_vcpus":128}"#)).0,
        204
    );
    for _ in 128..300 {
        assert!(vm.event("EVENT remove").ends_with("ejected=1"));
    }
    let info = vm.until("all 172 ejects", |v| {
        v["pending_removals"].as_array().is_some_and(|a| a.is_empty()) && v["parked_vcpu_fds"] == 172
    });
    assert_eq!(info["present_vcpus"], 128);
    let st = vm.status();
    assert_eq!((st.present, st.online), (128, 3), "CPUs 0, 1 and 127 stay online");
    assert_eq!(st.cpus[299].state, "absent");
    vm.poweroff();
}

#[test]
fn concurrent_clients_never_get_a_500_and_the_guest_keeps_running() {
    if !kvm_or_skip("concurrent_clients_never_get_a_500_and_the_guest_keeps_running") {
        return;
    }
    // 8 clients x 25 random operations, all at once: pause answered "vCPU 0 did not pause in
    // time" (500) here. Every answer must be a success or a 4xx with a reason.
    let mut vm = Vmm::start("concurrent", "boot=2,max=8");
    let api = vm.api.clone();
    let clients: Vec<_> = (0..8u64)
        .map(|c| {
            let api = api.clone();
            std::thread::spawn(move || {
                let mut seed = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(c + 1);
                let mut next = move |n: u64| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed % n
                };
                let mut bad = Vec::new();
                for _ in 0..25 {
                    let id = next(8);
                    let (method, ep, body) = match next(6) {
                        0 => ("GET", "vm.info", None),
                        1 => (
                            "PUT",
                            "vm.resize",
                            Some(format!(r#"{{"desired_vcpus":{}}}"#, id + 1)),
                        ),
                        2 => ("PUT", "vm.add-cpu", Some(format!(r#"{{"id":{id}}}"#))),
                        3 => ("PUT", "vm.remove-cpu", Some(format!(r#"{{"id":{id}}}"#))),
                        4 => ("PUT", "vm.pause", None),
                        _ => ("PUT", "vm.resume", None),
                    };
                    let (status, reply) = vmm_reference::api::request(&api, method, ep, body.as_deref())
                        .unwrap_or_else(|e| panic!("{ep}: {e}"));
                    if status >= 500 || (status >= 400 && !reply.contains("error")) {
                        bad.push(format!("{method} {ep} {body:?}: {status} {reply}"));
                    }
                }
                bad
            })
        })
        .collect();
    let bad: Vec<String> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("client"))
        .collect();
    assert!(bad.is_empty(), "{} bad answers: {bad:#?}", bad.len());
    // The guest runs on: resumed, every present CPU online and ticking once removals settle.
    assert_eq!(vm.api("PUT", "vm.resume", None).0, 204);
    let info = vm.until("removals settled", |v| {
        v["pending_removals"].as_array().is_some_and(|a| a.is_empty())
    });
    let present: Vec<usize> = (0..8).filter(|&i| cpu(&info, i)["present"] == true).collect();
    vm.until("every present CPU running", |v| {
        present.iter().all(|&i| cpu(v, i)["vcpu"] == "running")
    });
    // The guest takes the last insert a moment after the VMM raised it (one run on 6.12 read
    // its status in between: 2 present against the VMM's 3): wait for its view to agree.
    let deadline = Instant::now() + T;
    let s = loop {
        let s = vm.status();
        let online = |c: &usize| s.cpus[*c].state == "online";
        if (s.present as usize == present.len() && present.iter().all(online)) || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        s.present as usize,
        present.len(),
        "guest {s:?}\nVMM {}",
        vm.info()
    );
    vm.assert_ticking(&present);
    vm.poweroff();
}

#[test]
fn concurrent_add_cpu_and_resize_calls_each_take_their_own_cpu() {
    if !kvm_or_skip("concurrent_add_cpu_and_resize_calls_each_take_their_own_cpu") {
        return;
    }
    // `vm.add-cpu` without an id means "any absent CPU": clients asking at once must each get
    // one (two that picked the same lowest absent CPU got 400 "already present"), and two
    // resizes to the same size at once must both succeed, adding each CPU once.
    let mut vm = Vmm::start("concurrent-add", "boot=1,max=8");
    let api = vm.api.clone();
    let at_once = |n: usize, ep: &'static str, body: Option<&'static str>| -> Vec<(u16, String)> {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(n));
        let threads: Vec<_> = (0..n)
            .map(|_| {
                let (api, barrier) = (api.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    vmm_reference::api::request(&api, "PUT", ep, body).unwrap_or_else(|e| panic!("{ep}: {e}"))
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("client")).collect()
    };
    let adds = at_once(5, "vm.add-cpu", None);
    let mut ids: Vec<u64> = adds
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 200, "add-cpu: {body}");
            let v: Value = serde_json::from_str(body).expect("JSON");
            v["id"].as_u64().expect("id")
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3, 4, 5], "each client got its own CPU");
    for _ in 0..5 {
        vm.event("EVENT insert");
    }
    let resizes = at_once(2, "vm.resize", Some(r#"{"desired_vcpus":8}"#));
    assert!(resizes.iter().all(|(s, _)| *s == 204), "{resizes:?}");
    for _ in 0..2 {
        vm.event("EVENT insert");
    }
    assert_eq!(vm.info()["present_vcpus"], 8);
    let s = vm.status();
    assert_eq!((s.present, s.online), (8, 8), "{s:?}");
    vm.poweroff();
}
