// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The CPU model: what a new VM gets on this host ([`host_model`]), and per-vCPU CPUID
//! ([`for_vcpu`]).

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

use crate::Topology;

/// CPUID.1:ECX bit 5, VMX. Cleared: nested state (`KVM_GET/SET_NESTED_STATE`) is not saved, so
/// a guest using it could not be snapshotted or migrated.
const CPUID1_ECX_VMX: u32 = 1 << 5;
/// CPUID.1:ECX bit 13, CMPXCHG16B. Cleared on PVM only: KVM's instruction emulator (which runs
/// all guest ring-0 code on that software backend) cannot execute it, the VM dies.
const CPUID1_ECX_CX16: u32 = 1 << 13;
/// CPUID.1:ECX bit 21, x2APIC. Always offered: KVM emulates it, and APIC ids > 254 need it.
const CPUID1_ECX_X2APIC: u32 = 1 << 21;
/// CPUID.1:ECX bit 24, TSC-deadline timer. KVM emulates it whenever it has
/// `KVM_CAP_TSC_DEADLINE_TIMER` but lists it in `KVM_GET_SUPPORTED_CPUID` only since Linux
/// 6.14, so VMMs (QEMU, Cloud Hypervisor, Firecracker) set it themselves. Without it Linux
/// calibrates and then verifies its LAPIC timer against the PIT.
const CPUID1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:ECX bit 31, running under a hypervisor.
const CPUID1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.80000001h:ECX bit 2, SVM: cleared for the same reason as VMX.
const CPUID_80000001_ECX_SVM: u32 = 1 << 2;
/// KVM paravirtual features that make a guest issue hypercalls: PV_UNHALT (7),
/// PV_SEND_IPI (11), PV_SCHED_YIELD (13). Cleared on PVM only: `vmcall` livelocks there.
const KVM_PV_HYPERCALL_FEATURES: u32 = (1 << 7) | (1 << 11) | (1 << 13);

/// The KVM implementation behind `/dev/kvm`, as far as the CPU model cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Hardware-assisted KVM (kvm-intel, kvm-amd).
    Hardware,
    /// PVM, the software backend (`kvm_pvm`): guest ring 0 runs in KVM's instruction emulator.
    Pvm,
}

impl Backend {
    /// `Pvm` when the `kvm_pvm` module is loaded, otherwise `Hardware`.
    pub fn detect() -> Backend {
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            Backend::Pvm
        } else {
            Backend::Hardware
        }
    }
}

/// The CPU model a new VM gets on this host: [`host_supported`] without SVM and VMX (nested
/// state is not saved, so a guest using them could not be snapshotted or migrated). CPU 0's
/// CPUID is `for_vcpu(&host_model(..)?, topology, 0)`.
pub fn host_model(kvm: &Kvm, backend: Backend) -> Result<CpuId, kvm_ioctls::Error> {
    Ok(hide_nested(&host_supported(kvm, backend)?))
}

/// What a VM may have on this host: `KVM_GET_SUPPORTED_CPUID` [`adjust`]ed. Compatibility
/// checks compare a saved VM with this (a VM saved with SVM by an older VMM still restores).
pub fn host_supported(kvm: &Kvm, backend: Backend) -> Result<CpuId, kvm_ioctls::Error> {
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    Ok(adjust(&supported, backend, tsc_deadline))
}

/// What a VMM adds to or removes from KVM's supported CPUID, each for the reason on its
/// constant: TSC deadline when KVM emulates it, and the PVM workarounds on PVM only.
pub fn adjust(supported: &CpuId, backend: Backend, tsc_deadline: bool) -> CpuId {
    let mut cpuid = supported.clone();
    let pvm = backend == Backend::Pvm;
    for e in find(&mut cpuid, |e| e.function == 1) {
        if pvm {
            e.ecx &= !CPUID1_ECX_CX16;
        }
        if tsc_deadline {
            e.ecx |= CPUID1_ECX_TSC_DEADLINE;
        }
    }
    if pvm {
        for e in find(&mut cpuid, |e| e.function == 0x4000_0001) {
            e.eax &= !KVM_PV_HYPERCALL_FEATURES;
        }
    }
    cpuid
}

/// `cpuid` without SVM and VMX.
pub fn hide_nested(cpuid: &CpuId) -> CpuId {
    let mut cpuid = cpuid.clone();
    for e in find(&mut cpuid, |e| e.function == 1) {
        e.ecx &= !CPUID1_ECX_VMX;
    }
    for e in find(&mut cpuid, |e| e.function == 0x8000_0001) {
        e.ecx &= !CPUID_80000001_ECX_SVM;
    }
    for e in find(&mut cpuid, |e| e.function == 0x8000_000a) {
        // SVM revision and features: meaningless without SVM.
        (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
    }
    cpuid
}

fn find(cpuid: &mut CpuId, f: impl Fn(&kvm_cpuid_entry2) -> bool) -> Vec<&mut kvm_cpuid_entry2> {
    cpuid.as_mut_slice().iter_mut().filter(|e| f(e)).collect()
}

/// CPUID for CPU `index` from the VM's CPU model (a [`host_model`], or CPU 0's saved CPUID):
/// APIC ids in leaves 0x1, 0xB, 0x1F and 0x8000001E, topology sized for `max_vcpus`, x2APIC
/// and the hypervisor bit.
pub fn for_vcpu(supported: &CpuId, topo: &Topology, index: u32) -> CpuId {
    let mut cpuid = supported.clone();
    let apic_id = topo.apic_id(index);
    let core_bits = topo.core_bits();
    let max = topo.max_vcpus();
    for e in find(&mut cpuid, |e| e.function == 1) {
        e.ebx = (e.ebx & 0x0000_ffff) | ((apic_id & 0xff) << 24) | ((max.min(255) & 0xff) << 16);
        e.ecx |= CPUID1_ECX_X2APIC | CPUID1_ECX_HYPERVISOR;
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
        assert_ne!(s[0].ecx & CPUID1_ECX_X2APIC, 0);
        assert_eq!(s[1].edx, 257);
        assert_eq!(s[2].edx, 257);
        assert_eq!(s[2].eax, 9);
        assert_eq!(s[2].ebx, 300);
        assert_eq!(s[2].ecx, 0x201);
        assert_eq!(s[3].eax, 0x0100_7efb, "for_vcpu leaves features alone");
    }

    #[test]
    fn pvm_workarounds_apply_on_pvm_only() {
        let pvm = adjust(&sample(), Backend::Pvm, false);
        assert_eq!(pvm.as_slice()[0].ecx & CPUID1_ECX_CX16, 0);
        assert_eq!(pvm.as_slice()[3].eax, 0x0100_7efb & !KVM_PV_HYPERCALL_FEATURES);
        let hw = adjust(&sample(), Backend::Hardware, false);
        assert_ne!(hw.as_slice()[0].ecx & CPUID1_ECX_CX16, 0);
        assert_eq!(
            hw.as_slice()[3].eax,
            0x0100_7efb,
            "PV unhalt, send-IPI, sched-yield kept"
        );
    }

    #[test]
    fn tsc_deadline_when_kvm_emulates_it_and_never_svm_or_vmx() {
        let mut entries = sample().as_slice().to_vec();
        entries[0].ecx |= CPUID1_ECX_VMX;
        entries.push(kvm_cpuid_entry2 {
            function: 0x8000_0001,
            ecx: CPUID_80000001_ECX_SVM | 1,
            ..Default::default()
        });
        let with_nested = CpuId::from_entries(&entries).expect("cpuid");
        let supported = adjust(&with_nested, Backend::Hardware, true);
        let s = supported.as_slice();
        assert_ne!(s[0].ecx & CPUID1_ECX_TSC_DEADLINE, 0);
        assert_ne!(
            s[0].ecx & CPUID1_ECX_VMX,
            0,
            "a saved VM with VMX may still come here"
        );
        let model = hide_nested(&supported);
        let s = model.as_slice();
        assert_eq!(s[0].ecx & CPUID1_ECX_VMX, 0);
        assert_eq!(s[4].ecx, 1, "SVM cleared, the rest kept");
        let c = adjust(&sample(), Backend::Hardware, false);
        assert_eq!(c.as_slice()[0].ecx & CPUID1_ECX_TSC_DEADLINE, 0);
    }
}
