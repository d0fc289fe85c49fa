// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-vCPU CPUID.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use crate::Topology;

/// CPUID.1:ECX bit 13, CMPXCHG16B. Cleared: KVM's instruction emulator (which runs all guest
/// ring-0 code on software KVM backends such as PVM) cannot execute it, the VM dies.
const CPUID1_ECX_CX16: u32 = 1 << 13;
/// CPUID.1:ECX bit 21, x2APIC. Always offered: KVM emulates it, and APIC ids > 254 need it.
const CPUID1_ECX_X2APIC: u32 = 1 << 21;
/// CPUID.1:ECX bit 31, running under a hypervisor.
const CPUID1_ECX_HYPERVISOR: u32 = 1 << 31;
/// KVM paravirtual features that make a guest issue hypercalls: PV_UNHALT (7),
/// PV_SEND_IPI (11), PV_SCHED_YIELD (13). `vmcall` livelocks on software KVM backends.
const KVM_PV_HYPERCALL_FEATURES: u32 = (1 << 7) | (1 << 11) | (1 << 13);

fn find(cpuid: &mut CpuId, f: impl Fn(&kvm_cpuid_entry2) -> bool) -> Vec<&mut kvm_cpuid_entry2> {
    cpuid.as_mut_slice().iter_mut().filter(|e| f(e)).collect()
}

/// CPUID for CPU `index` from the host-supported set: APIC ids in leaves 0x1, 0xB, 0x1F and
/// 0x8000001E, topology sized for `max_vcpus`, and the fixes documented on the constants.
pub fn for_vcpu(supported: &CpuId, topo: &Topology, index: u32) -> CpuId {
    let mut cpuid = supported.clone();
    let apic_id = topo.apic_id(index);
    let core_bits = topo.core_bits();
    let max = topo.max_vcpus();
    for e in find(&mut cpuid, |e| e.function == 1) {
        e.ebx = (e.ebx & 0x0000_ffff) | ((apic_id & 0xff) << 24) | ((max.min(255) & 0xff) << 16);
        e.ecx = (e.ecx & !CPUID1_ECX_CX16) | CPUID1_ECX_X2APIC | CPUID1_ECX_HYPERVISOR;
        // HTT: more than one logical processor per package.
        if max > 1 {
            e.edx |= 1 << 28;
        }
    }
    for e in find(&mut cpuid, |e| e.function == 0xb || e.function == 0x1f) {
        // Level 0: SMT (1 thread/core); level 1: core (all CPUs in one package).
        let (shift, count, level_type) = match e.index {
            0 => (0, 1, 1),
            1 => (core_bits, max, 2),
            _ => (0, 0, 0),
        };
        e.eax = shift;
        e.ebx = count & 0xffff;
        e.ecx = (e.index & 0xff) | (level_type << 8);
        e.edx = apic_id;
    }
    for e in find(&mut cpuid, |e| e.function == 0x8000_001e) {
        e.eax = apic_id;
        e.ebx &= !0xff;
        e.ebx |= index & 0xff;
    }
    for e in find(&mut cpuid, |e| e.function == 0x4000_0001) {
        e.eax &= !KVM_PV_HYPERCALL_FEATURES;
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ecx: CPUID1_ECX_CX16 | 1,
                ebx: 0xffff_1234,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0x4000_0001,
                eax: 0x0100_7efb,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).expect("cpuid")
    }

    #[test]
    fn apic_ids_and_fixes() {
        let topo = Topology::new(300);
        let c = for_vcpu(&sample(), &topo, 257);
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 257 & 0xff);
        assert_eq!(s[0].ebx & 0xffff, 0x1234);
        assert_eq!(s[0].ecx & CPUID1_ECX_CX16, 0);
        assert_ne!(s[0].ecx & CPUID1_ECX_X2APIC, 0);
        assert_eq!(s[1].edx, 257);
        assert_eq!(s[2].edx, 257);
        assert_eq!(s[2].eax, 9);
        assert_eq!(s[2].ebx, 300);
        assert_eq!(s[2].ecx, 0x201);
        assert_eq!(s[3].eax & KVM_PV_HYPERCALL_FEATURES, 0);
        assert_eq!(s[3].eax, 0x0100_7efb & !KVM_PV_HYPERCALL_FEATURES);
    }
}
