// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Whether a LAPIC state saved on one KVM keeps its meaning on another.
//!
//! [`LapicState`] is free of KVM's layout conventions, so it can always be *written* to
//! another KVM. Whether the guest then behaves as before depends on what the destination
//! offers: a timer in TSC-deadline mode on a vCPU whose CPUID lacks the TSC-deadline timer
//! never fires again, a CMCI LVT on a 6-entry APIC is dropped, EOI-broadcast suppression
//! without directed EOI is ignored, and a different APIC bus cycle changes the speed of a
//! timer the guest calibrated at boot. [`SavedLapic`] carries what is needed to tell (the
//! source's conventions and the TSC-deadline MSR), and [`check_compatible`] refuses such a
//! restore unless the caller explicitly accepts the loss.

#[cfg(feature = "serde")]
use serde::{Deserialize, Serialize};

use crate::conventions::KvmConventions;
use crate::page::{regs, Lvt};
use crate::state::LapicState;

/// A LAPIC state that describes itself: the canonical state, the conventions of the KVM it
/// was saved on, and the value of its IA32_TSC_DEADLINE MSR (0 when disarmed).
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct SavedLapic {
    state: LapicState,
    source: KvmConventions,
    tsc_deadline: u64,
}

impl SavedLapic {
    /// `state` as saved under `source`, with the TSC-deadline MSR value read at the save.
    pub fn new(state: LapicState, source: KvmConventions, tsc_deadline: u64) -> SavedLapic {
        SavedLapic {
            state,
            source,
            tsc_deadline,
        }
    }

    /// The canonical state.
    pub fn state(&self) -> &LapicState {
        &self.state
    }

    /// The conventions of the KVM the state was saved on.
    pub fn source(&self) -> &KvmConventions {
        &self.source
    }

    /// IA32_TSC_DEADLINE at the save (write it after `KVM_SET_LAPIC` and IA32_TSC; see
    /// [`crate::timer`]).
    pub fn tsc_deadline(&self) -> u64 {
        self.tsc_deadline
    }

    /// [`check_compatible`] against the destination's conventions.
    pub fn check_compatible(&self, dst: &KvmConventions) -> Result<(), Incompatible> {
        check_compatible(self, dst)
    }
}

/// Whether a restore may go ahead when [`check_compatible`] finds a loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Loss {
    /// Refuse it (the default): the guest keeps running where it is.
    #[default]
    Refuse,
    /// Restore anyway; the caller has decided the guest can do without it.
    Accept,
}

/// What a restore onto other conventions would lose.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Incompatible {
    /// The LVT timer is in TSC-deadline mode and the destination does not offer it.
    #[error(
        "the guest's timer is in TSC-deadline mode (deadline {deadline:#x}) but the destination \
         vCPU's CPUID has no TSC-deadline timer: the timer would never fire again"
    )]
    TscDeadlineUnavailable {
        /// The saved deadline.
        deadline: u64,
    },
    /// The guest uses the CMCI LVT and the destination has only 6 LVT entries.
    #[error(
        "the guest uses the CMCI LVT ({lvt:#x}) but the destination APIC has 6 LVT entries: \
         corrected machine-check interrupts would be lost"
    )]
    CmciLost {
        /// The saved CMCI LVT.
        lvt: u32,
    },
    /// The guest turned on EOI-broadcast suppression and the destination has no directed EOI.
    #[error(
        "the guest enabled EOI-broadcast suppression (SPIV bit 12) but the destination offers \
         no directed EOI: KVM would clear the bit and broadcast EOIs the guest sends itself"
    )]
    DirectedEoiLost,
    /// The APIC bus cycle differs.
    #[error(
        "the APIC bus cycle is {src} ns on the source and {dst} ns on the destination: the APIC \
         timer the guest calibrated at boot would run at another speed"
    )]
    BusCycleChanged {
        /// Source bus cycle (ns).
        src: u32,
        /// Destination bus cycle (ns).
        dst: u32,
    },
}

/// Refuse a restore of `saved` onto a vCPU with conventions `dst` that would change what the
/// guest sees: the first loss found, or `Ok` when the guest keeps everything it uses. Layout
/// differences (id format, ICR layout) are not losses: the canonical state absorbs them.
pub fn check_compatible(saved: &SavedLapic, dst: &KvmConventions) -> Result<(), Incompatible> {
    let page = saved.state.page();
    let (src, lvtt) = (&saved.source, page.reg(regs::LVT_TIMER));
    if src.tsc_deadline && !dst.tsc_deadline && lvtt & (3 << 17) == 2 << 17 {
        return Err(Incompatible::TscDeadlineUnavailable {
            deadline: saved.tsc_deadline,
        });
    }
    let cmci = page.reg(regs::LVT_CMCI);
    if src.nr_lvt >= 7 && dst.nr_lvt < 7 && !Lvt(cmci).masked() {
        return Err(Incompatible::CmciLost { lvt: cmci });
    }
    if src.directed_eoi && !dst.directed_eoi && page.reg(regs::SPIV) & (1 << 12) != 0 {
        return Err(Incompatible::DirectedEoiLost);
    }
    if src.apic_bus_cycle_ns != dst.apic_bus_cycle_ns {
        return Err(Incompatible::BusCycleChanged {
            src: src.apic_bus_cycle_ns,
            dst: dst.apic_bus_cycle_ns,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ApicBase, CanonicalPage, IcrLayout, LapicPage};

    fn saved(page: LapicPage, source: KvmConventions) -> SavedLapic {
        let state = LapicState::new(
            2,
            ApicBase(0xfee0_0c00),
            CanonicalPage::from_bytes(&page.to_bytes()),
        );
        SavedLapic::new(state, source, 0x1234)
    }

    #[test]
    fn what_is_lost_is_refused_and_what_is_layout_is_not() {
        let c = KvmConventions::CANONICAL;
        let mut p = LapicPage::default();
        p.set_reg(regs::SPIV, 0x1ff);
        p.set_reg(regs::LVT_TIMER, (2 << 17) | 0xec);
        let no_deadline = KvmConventions {
            tsc_deadline: false,
            ..c
        };
        assert_eq!(
            saved(p, c).check_compatible(&no_deadline),
            Err(Incompatible::TscDeadlineUnavailable { deadline: 0x1234 })
        );
        let mut oneshot = p;
        oneshot.set_reg(regs::LVT_TIMER, 0xec);
        assert_eq!(saved(oneshot, c).check_compatible(&no_deadline), Ok(()));

        let seven = KvmConventions { nr_lvt: 7, ..c };
        let mut cmci = oneshot;
        cmci.set_reg(regs::LVT_CMCI, 0xf1);
        assert_eq!(
            saved(cmci, seven).check_compatible(&c),
            Err(Incompatible::CmciLost { lvt: 0xf1 })
        );
        cmci.set_reg(regs::LVT_CMCI, Lvt::MASKED | 0xf1);
        assert_eq!(saved(cmci, seven).check_compatible(&c), Ok(()));

        let eoi = KvmConventions {
            directed_eoi: true,
            ..c
        };
        let mut suppress = oneshot;
        suppress.set_reg(regs::SPIV, 0x11ff);
        assert_eq!(
            saved(suppress, eoi).check_compatible(&c),
            Err(Incompatible::DirectedEoiLost)
        );
        assert_eq!(saved(oneshot, eoi).check_compatible(&c), Ok(()));

        let slow = KvmConventions {
            apic_bus_cycle_ns: 40,
            ..c
        };
        assert_eq!(
            saved(oneshot, c).check_compatible(&slow),
            Err(Incompatible::BusCycleChanged { src: 1, dst: 40 })
        );

        let other_layout = KvmConventions {
            x2apic_32bit_ids: false,
            icr: IcrLayout::Merged,
            ..c
        };
        assert_eq!(saved(p, c).check_compatible(&other_layout), Ok(()));
    }

    #[cfg(feature = "serde")]
    #[test]
    fn a_saved_lapic_round_trips_through_serde() {
        let c = KvmConventions::CANONICAL;
        let mut p = LapicPage::default();
        p.set_reg(regs::LVT_TIMER, (2 << 17) | 0xec);
        let seven = KvmConventions { nr_lvt: 7, ..c };
        let json = serde_json::to_string(&saved(p, seven)).expect("serialize");
        assert_eq!(
            serde_json::from_str::<SavedLapic>(&json).expect("deserialize"),
            saved(p, seven)
        );
    }
}
