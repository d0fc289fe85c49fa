// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The TSC-deadline rules a VMM must follow around `KVM_SET_LAPIC`.
//!
//! 1. KVM ignores a write of IA32_TSC_DEADLINE unless the LVT timer is already in
//!    TSC-deadline mode, so the MSR must be written **after** `KVM_SET_LAPIC`.
//! 2. KVM compares the deadline with the guest TSC, so IA32_TSC must be written **before**
//!    IA32_TSC_DEADLINE ([`MSRS_AFTER_LAPIC`] is that order).
//! 3. Save the deadline KVM reports, as it is. KVM clears IA32_TSC_DEADLINE when it injects
//!    the timer interrupt (the vector is then in IRR, or the guest has handled it); an expiry
//!    that fired while the vCPU was not running keeps its past deadline until injected, so the
//!    restored deadline fires at once. A 0 means disarmed or already delivered, and restores
//!    as that: nothing is lost and no tick is invented.
//!
//! The one-shot timer is the other case to know: a one-shot with TMICT set and TMCCT 0 has
//! expired, and KVM arms it again (it fires once more) when the page is restored;
//! [`crate::LapicState::validate`] reports it.

use crate::page::{regs, LapicPage, Lvt};
use crate::KvmConventions;

/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSRs that must be written after `KVM_SET_LAPIC`, in this order.
pub const MSRS_AFTER_LAPIC: [u32; 2] = [MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE];

/// Whether the page's LVT timer is in TSC-deadline mode (given the conventions' mode mask).
pub fn in_tsc_deadline_mode(page: &LapicPage, conv: &KvmConventions) -> bool {
    page.reg(regs::LVT_TIMER) & conv.timer_mode_mask() == 2 << 17
}

impl LapicPage {
    /// The register page KVM gives a vCPU at power-on (`kvm_lapic_reset`, not INIT): xAPIC
    /// id `vcpu_id << 24`, LVR from `conv`, every LVT masked (except LINT0 = ExtINT on the
    /// boot CPU, KVM's LINT0_REENABLED quirk), DFR all ones, SPIV 0xff (software-disabled).
    pub fn power_on(vcpu_id: u32, bsp: bool, conv: &KvmConventions) -> LapicPage {
        let mut p = LapicPage::default();
        p.set_reg(regs::ID, vcpu_id.wrapping_shl(24));
        p.set_reg(regs::LVR, conv.lvr());
        let mut lvts = vec![
            regs::LVT_TIMER,
            regs::LVT_THERMAL,
            regs::LVT_PERF,
            regs::LVT_LINT0,
            regs::LVT_LINT1,
            regs::LVT_ERROR,
        ];
        if conv.nr_lvt >= 7 {
            lvts.push(regs::LVT_CMCI);
        }
        for r in lvts {
            p.set_reg(r, Lvt::MASKED);
        }
        if bsp {
            p.set_reg(regs::LVT_LINT0, 7 << 8);
        }
        p.set_reg(regs::DFR, 0xffff_ffff);
        p.set_reg(regs::SPIV, 0xff);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_mode_and_msr_order() {
        let conv = KvmConventions::CANONICAL;
        let mut p = LapicPage::default();
        p.set_reg(regs::LVT_TIMER, (2 << 17) | 0xec);
        assert!(in_tsc_deadline_mode(&p, &conv));
        p.set_reg(regs::LVT_TIMER, (1 << 17) | 0xec);
        assert!(!in_tsc_deadline_mode(&p, &conv), "periodic");
        assert_eq!(MSRS_AFTER_LAPIC, [0x10, 0x6e0]);
    }

    #[test]
    fn power_on_page() {
        let p = LapicPage::power_on(3, false, &KvmConventions::CANONICAL);
        assert_eq!(p.reg(regs::ID), 3 << 24);
        assert!(!p.sw_enabled());
        assert!(p.lvt(regs::LVT_LINT0).masked());
        let b = LapicPage::power_on(0, true, &KvmConventions::CANONICAL);
        assert_eq!(b.reg(regs::LVT_LINT0), 0x700);
    }
}
