// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Shared input format of the LAPIC fuzz targets.
//!
//! `[vcpu_id: u32 LE][apic_base: u64 LE][conventions: u8][prior: u8][page: 1024 bytes]`;
//! short inputs are zero-padded. Conventions bits: 0 = 32-bit x2APIC ids, 1 = merged ICR,
//! 2 = 7 LVTs, 3 = TSC-deadline, 4 = directed EOI. Prior bits: 0..1 = timer mode, 2 = ISR
//! count non-zero.

use lapic_state::{ApicBase, IcrLayout, KvmConventions, LapicPage, PriorApic};

/// Length of a full input.
pub const INPUT_LEN: usize = 4 + 8 + 1 + 1 + 1024;

/// A decoded fuzz input.
#[derive(Clone, Copy, Debug)]
pub struct LapicInput {
    /// vCPU id.
    pub vcpu_id: u32,
    /// IA32_APIC_BASE.
    pub apic_base: ApicBase,
    /// Conventions.
    pub conv: KvmConventions,
    /// Prior in-kernel state.
    pub prior: PriorApic,
    /// The blob.
    pub page: LapicPage,
}

impl LapicInput {
    /// Decode (never fails; pads with zeros).
    pub fn parse(data: &[u8]) -> LapicInput {
        let mut b = [0u8; INPUT_LEN];
        let n = data.len().min(INPUT_LEN);
        b[..n].copy_from_slice(&data[..n]);
        let c = b[12];
        let p = b[13];
        let mut page = [0u8; 1024];
        page.copy_from_slice(&b[14..]);
        LapicInput {
            vcpu_id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            apic_base: ApicBase(u64::from_le_bytes([
                b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11],
            ])),
            conv: KvmConventions {
                x2apic_32bit_ids: c & 1 != 0,
                icr: if c & 2 != 0 {
                    IcrLayout::Merged
                } else {
                    IcrLayout::Split
                },
                nr_lvt: if c & 4 != 0 { 7 } else { 6 },
                tsc_deadline: c & 8 != 0,
                directed_eoi: c & 16 != 0,
                x2apic_id_readonly: c & 32 == 0,
                // KVM's default; the predictor does not depend on it.
                apic_bus_cycle_ns: 1,
            },
            prior: PriorApic {
                timer_mode: u32::from(p & 3) << 17,
                isr_count_nonzero: p & 4 != 0,
            },
            page: LapicPage::from_bytes(&page),
        }
    }

    /// Encode (inverse of `parse` for full inputs).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(INPUT_LEN);
        v.extend_from_slice(&self.vcpu_id.to_le_bytes());
        v.extend_from_slice(&self.apic_base.0.to_le_bytes());
        let c = u8::from(self.conv.x2apic_32bit_ids)
            | (u8::from(self.conv.icr == IcrLayout::Merged) << 1)
            | (u8::from(self.conv.nr_lvt >= 7) << 2)
            | (u8::from(self.conv.tsc_deadline) << 3)
            | (u8::from(self.conv.directed_eoi) << 4)
            | (u8::from(!self.conv.x2apic_id_readonly) << 5);
        v.push(c);
        v.push(((self.prior.timer_mode >> 17) & 3) as u8 | (u8::from(self.prior.isr_count_nonzero) << 2));
        v.extend_from_slice(&self.page.to_bytes());
        v
    }
}

/// A KVM VM with an in-kernel irqchip, with 32-bit x2APIC ids (`KVM_CAP_X2APIC_API`) when
/// `ids32`: the setup both KVM-backed LAPIC targets start from.
pub fn irqchip_vm(kvm: &kvm_ioctls::Kvm, ids32: bool) -> Option<kvm_ioctls::VmFd> {
    let vm = kvm.create_vm().ok()?;
    vm.create_irq_chip().ok()?;
    if ids32 {
        let cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X2APIC_API,
            args: [u64::from(kvm_bindings::KVM_X2APIC_API_USE_32BIT_IDS), 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap).ok()?;
    }
    Some(vm)
}

/// The host's supported CPUID with x2APIC offered, so an x2APIC base can be installed.
pub fn x2apic_cpuid(kvm: &kvm_ioctls::Kvm) -> Option<kvm_bindings::CpuId> {
    let mut c = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .ok()?;
    for e in c.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
        e.ecx |= 1 << 21;
    }
    Some(c)
}
