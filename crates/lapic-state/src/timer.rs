// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The TSC-deadline rules a VMM must follow around `KVM_SET_LAPIC`.
//!
//! 1. KVM ignores a write of IA32_TSC_DEADLINE unless the LVT timer is already in
//!    TSC-deadline mode, so the MSR must be written **after** `KVM_SET_LAPIC`.
//! 2. KVM compares the deadline with the guest TSC, so IA32_TSC must be written **before**
//!    IA32_TSC_DEADLINE ([`MSRS_AFTER_LAPIC`] is that order).
//! 3. The zero-deadline hazard: when the deadline timer fired but its interrupt was not yet
//!    injected at save time, KVM reports a deadline of 0 and the pending expiry lives in no
//!    saved register. Restored as 0, the timer stays disarmed and a guest waiting for its tick
//!    never wakes. [`deadline_to_save`] replaces such a 0 with "now": one early, spurious tick
//!    (which guests tolerate) instead of a lost one.

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

/// The TSC-deadline value to put in a snapshot, given the value KVM reported and the guest
/// TSC at save time (see the module docs for the hazard this handles).
pub fn deadline_to_save(page: &LapicPage, conv: &KvmConventions, reported: u64, guest_tsc: u64) -> u64 {
    if reported != 0 || !in_tsc_deadline_mode(page, conv) || !page.sw_enabled() {
        return reported;
    }
    let lvtt = Lvt(page.reg(regs::LVT_TIMER));
    let v = lvtt.vector();
    if lvtt.masked() || page.irr().contains(v) || page.isr().contains(v) {
        return reported;
    }
    // The timer is armed in the guest's view but KVM lost the expiry: fire at once.
    guest_tsc.max(1)
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
    fn zero_deadline_hazard() {
        let conv = KvmConventions::CANONICAL;
        let mut p = LapicPage::default();
        p.set_reg(regs::SPIV, 0x1ff);
        p.set_reg(regs::LVT_TIMER, (2 << 17) | 0xec);
        assert_eq!(
            deadline_to_save(&p, &conv, 0, 5000),
            5000,
            "armed but lost: fire now"
        );
        assert_eq!(
            deadline_to_save(&p, &conv, 7000, 5000),
            7000,
            "a real deadline is kept"
        );
        let mut irr = p.irr();
        irr.set(0xec, true);
        let mut pending = p;
        pending.set_vectors(regs::IRR, &irr);
        assert_eq!(
            deadline_to_save(&pending, &conv, 0, 5000),
            0,
            "tick already pending"
        );
        let mut masked = p;
        masked.set_reg(regs::LVT_TIMER, (2 << 17) | Lvt::MASKED | 0xec);
        assert_eq!(deadline_to_save(&masked, &conv, 0, 5000), 0);
        let mut periodic = p;
        periodic.set_reg(regs::LVT_TIMER, (1 << 17) | 0xec);
        assert_eq!(deadline_to_save(&periodic, &conv, 0, 5000), 0);
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
