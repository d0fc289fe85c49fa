// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Untrusted VM state inside a *valid* snapshot envelope (the CRC is recomputed, so the
//! fuzzer reaches the sections): `SavedVm::decode` never panics, and whatever it accepts is
//! consistent (vCPU ids match the topology, the boot CPU is there, indices are possible CPUs)
//! and re-encodes to a state that decodes again.
#![no_main]
use libfuzzer_sys::fuzz_target;
use vm_live_migration::Snapshot;
use vmm_reference::snapshot::SavedVm;

fuzz_target!(|data: &[u8]| {
    // Input: sections separated by 0xff bytes; the first is "vm", the others "vcpu/<i>".
    let mut snap = Snapshot::default();
    for (i, part) in data.split(|b| *b == 0xff).enumerate().take(16) {
        let name = if i == 0 {
            "vm".to_string()
        } else {
            format!("vcpu/{}", i - 1)
        };
        let _ = snap.add(&name, part.to_vec());
    }
    if let Ok(saved) = SavedVm::decode(&snap.encode()) {
        let topo = vcpu_manager::Topology::new(saved.vm.max_vcpus);
        assert_eq!(saved.vcpus.first().map(|(i, _)| *i), Some(0));
        for (i, st) in &saved.vcpus {
            assert!(*i < saved.vm.max_vcpus);
            assert_eq!(st.vcpu_id, topo.apic_id(*i));
        }
        let again = saved.encode().expect("re-encode");
        assert!(SavedVm::decode(&again).is_ok());
    }
});
