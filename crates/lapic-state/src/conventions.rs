// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The KVM conventions a LAPIC blob was taken under (or must be given in).

#[cfg(feature = "serde")]
use serde::{Deserialize, Serialize};

/// How KVM lays out the 64-bit x2APIC ICR in the blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub enum IcrLayout {
    /// ICR low word at 0x300, high word at 0x310 (ICR2), 0x304 kept verbatim: xAPIC always,
    /// x2APIC on AMD/SVM (Linux ≥ 6.12 and its backports) and on kernels before 5.18.
    Split,
    /// x2APIC on Intel/VMX since Linux 5.18: one 64-bit register at 0x300; on set KVM merges
    /// `ICR | ICR2 << 32`, on get it copies the high half to 0x310 (0x304 holds it too).
    Merged,
}

/// The KVM behaviour that decides how a LAPIC blob must be read and written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct KvmConventions {
    /// `KVM_CAP_X2APIC_API` with `KVM_X2APIC_API_USE_32BIT_IDS` enabled on the VM: in x2APIC
    /// mode the ID word is the full 32-bit id and must equal the vCPU id. Otherwise KVM reports
    /// `vcpu_id << 24` (ids ≥ 256 are lost) and ignores the ID on set.
    pub x2apic_32bit_ids: bool,
    /// x2APIC ICR layout.
    pub icr: IcrLayout,
    /// Number of LVT entries: 6, or 7 with CMCI (MCG_CMCI_P in the vCPU's MCE capabilities).
    pub nr_lvt: u8,
    /// The guest CPUID offers the TSC-deadline timer (LVT timer mode mask is 2 bits, not 1).
    pub tsc_deadline: bool,
    /// LVR bit 24 (directed EOI): KVM sets it with x2APIC in CPUID and a split irqchip.
    pub directed_eoi: bool,
    /// KVM treats the x2APIC id as read-only (Linux ≥ 6.11, backported to 6.10.y and 6.6.78;
    /// "KVM: x86: Make x2APIC ID 100% readonly"): with legacy ids a set ignores the blob's ID
    /// word and derives the LDR from the vCPU id. Before that (Debian's 6.1, measured), a set
    /// with legacy ids takes `ID >> 24` (8 bits) as the x2APIC id and derives the LDR from
    /// that truncated id, so vCPU 300 gets the LDR of id 44. With 32-bit ids both agree.
    #[cfg_attr(feature = "serde", serde(default = "readonly_default"))]
    pub x2apic_id_readonly: bool,
    /// Nanoseconds per APIC bus cycle, the tick of TMICT/TMCCT: 1 unless the VMM set
    /// another with `KVM_CAP_X86_APIC_BUS_CYCLES_NS` (Linux ≥ 6.11). A guest calibrates its
    /// APIC timer against it once, at boot.
    #[cfg_attr(feature = "serde", serde(default = "bus_cycle_default"))]
    pub apic_bus_cycle_ns: u32,
}

#[cfg(feature = "serde")]
fn readonly_default() -> bool {
    true
}

#[cfg(feature = "serde")]
fn bus_cycle_default() -> u32 {
    1
}

impl Default for KvmConventions {
    /// The canonical conventions: 32-bit ids, split ICR, 6 LVTs, TSC-deadline, no directed EOI,
    /// read-only x2APIC id, a 1 ns APIC bus cycle.
    fn default() -> Self {
        KvmConventions::CANONICAL
    }
}

impl KvmConventions {
    /// The layout the canonical [`crate::LapicState`] uses: 32-bit x2APIC ids and split ICR.
    pub const CANONICAL: KvmConventions = KvmConventions {
        x2apic_32bit_ids: true,
        icr: IcrLayout::Split,
        nr_lvt: 6,
        tsc_deadline: true,
        directed_eoi: false,
        x2apic_id_readonly: true,
        apic_bus_cycle_ns: 1,
    };

    /// The LVR value KVM computes for these conventions (it overwrites whatever a blob holds):
    /// version 0x14, max LVT entry in bits 16..23, directed EOI in bit 24.
    pub fn lvr(&self) -> u32 {
        0x14 | (u32::from(self.nr_lvt.saturating_sub(1)) << 16) | (u32::from(self.directed_eoi) << 24)
    }

    /// The LVT timer mode mask KVM applies (`3 << 17` with TSC-deadline, else `1 << 17`).
    pub fn timer_mode_mask(&self) -> u32 {
        if self.tsc_deadline {
            3 << 17
        } else {
            1 << 17
        }
    }

    /// The x2APIC id KVM takes from a set of a blob whose ID word is `id_word` on vCPU
    /// `vcpu_id` (x2APIC mode; with 32-bit ids a mismatch is refused before this matters).
    pub fn x2apic_id_on_set(&self, vcpu_id: u32, id_word: u32) -> u32 {
        if self.x2apic_32bit_ids || self.x2apic_id_readonly {
            vcpu_id
        } else {
            id_word >> 24
        }
    }

    /// Decode `nr_lvt` and `directed_eoi` from an LVR value as KVM reports it.
    pub fn with_lvr(mut self, lvr: u32) -> Self {
        self.nr_lvt = (((lvr >> 16) & 0xff) + 1) as u8;
        self.directed_eoi = lvr & (1 << 24) != 0;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvr_values() {
        let c = KvmConventions::CANONICAL;
        assert_eq!(c.lvr(), 0x0005_0014);
        let c7 = KvmConventions {
            nr_lvt: 7,
            directed_eoi: true,
            ..c
        };
        assert_eq!(c7.lvr(), 0x0106_0014);
        assert_eq!(c.with_lvr(0x0106_0014), c7);
        assert_eq!(c.timer_mode_mask(), 0x60000);
        assert_eq!(
            KvmConventions {
                tsc_deadline: false,
                ..c
            }
            .timer_mode_mask(),
            0x20000
        );
    }
}
