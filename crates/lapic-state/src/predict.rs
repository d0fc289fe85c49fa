// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What KVM will do with a blob: does `KVM_SET_LAPIC` fail, and what will `KVM_GET_LAPIC`
//! read back right after (before the vCPU runs again)?
//!
//! The model follows Linux's `kvm_apic_set_state` (v6.13+ order): SPIV applied first (even
//! if the set then fails), x2APIC fixups (ID check or override, LDR from the id, ICR merge on
//! Intel), memcpy, LVR recomputed, PPR recomputed (see [`PriorApic`] for why the prior state
//! matters), TMICT zeroed when the timer switches into or out of TSC-deadline mode, the timer
//! restarted from TMCCT and TMCCT zeroed; `KVM_GET_LAPIC` then fills TMCCT with the live
//! remaining count and applies the x2APIC get fixups. Everything else is copied verbatim:
//! KVM does not sanitise reserved bits on this path. Checked against the real KVM on this
//! project's machines by `tests/differential.rs`.

use crate::conventions::{IcrLayout, KvmConventions};
use crate::page::{regs, LapicPage};
use crate::state::{id_word, x2apic_ldr, LapicError};
use crate::{ApicBase, ApicMode};

/// Timer mode values as KVM keeps them (LVTT bits 17..18 under the timer mode mask).
const TIMER_TSC_DEADLINE: u32 = 2 << 17;
/// KVM's default `min_timer_period_us` for periodic timers.
pub const MIN_PERIODIC_NS: u64 = 200_000;

/// The parts of a vCPU's in-kernel APIC state that are not in the page but change what a
/// `KVM_SET_LAPIC` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PriorApic {
    /// The timer mode KVM last latched (`LVTT & timer_mode_mask`).
    pub timer_mode: u32,
    /// Whether KVM's cached in-service count was non-zero. KVM recomputes PPR *before* it
    /// rebuilds that count from the new ISR, so with a zero count (a fresh vCPU) the new
    /// ISR does not enter PPR until the vCPU runs. The count wraps at 256: an ISR with every
    /// vector set (impossible on hardware) counts as zero.
    ///
    /// With APICv (Intel) or AVIC (AMD) active KVM pins the count at 1, so it is `true` for
    /// every vCPU there ([`PriorApic::APICV`]). PPR is then also the processor's to update
    /// once the vCPU has run, so a PPR read back from a vCPU that ran on such a host is not
    /// a prediction to compare: the model is exact for the PPR `KVM_GET_LAPIC` reports right
    /// after `KVM_SET_LAPIC`, before the vCPU runs, which is what `tests/differential.rs`
    /// checks (on kvm-amd without AVIC, and on PVM).
    pub isr_count_nonzero: bool,
}

impl PriorApic {
    /// A vCPU that was just created or reset (LVT timer masked one-shot, ISR empty), on a
    /// host without APICv/AVIC.
    pub const FRESH: PriorApic = PriorApic {
        timer_mode: 0,
        isr_count_nonzero: false,
    };

    /// A vCPU just created or reset on a host with APICv or AVIC active (KVM keeps the
    /// in-service count at 1 there, so the new ISR enters PPR at once).
    pub const APICV: PriorApic = PriorApic {
        timer_mode: 0,
        isr_count_nonzero: true,
    };
}

/// What `KVM_GET_LAPIC` reports in TMCCT after the set (it is computed from the clock).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TmcctRead {
    /// Exactly 0 (no initial count, TSC-deadline mode, or nothing armed).
    Zero,
    /// Counting down: somewhere in `0..=max`.
    UpTo(u32),
    /// Reserved timer mode: KVM arms nothing new, the value depends on earlier state.
    Unknown,
}

impl TmcctRead {
    /// Whether an observed TMCCT is consistent with this prediction.
    pub fn admits(&self, tmcct: u32) -> bool {
        match self {
            TmcctRead::Zero => tmcct == 0,
            TmcctRead::UpTo(max) => tmcct <= *max,
            TmcctRead::Unknown => true,
        }
    }
}

/// Predicted outcome of a successful `KVM_SET_LAPIC`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    /// What `KVM_GET_LAPIC` returns right after, with TMCCT set to 0 (see `tmcct`).
    pub get: LapicPage,
    /// What TMCCT will read.
    pub tmcct: TmcctRead,
    /// KVM's SW-enable state afterwards (SPIV bit 8).
    pub sw_enabled: bool,
    /// The prior state for the next set on the same vCPU.
    pub next: PriorApic,
}

/// Predicted failure of `KVM_SET_LAPIC`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PredictedFailure {
    /// Why KVM refuses (it returns EINVAL).
    pub error: LapicError,
    /// KVM has already applied this SPIV value before failing (its set is not atomic): the
    /// page's SPIV and the SW-enable state change anyway.
    pub spiv_applied: u32,
}

fn ppr(tpr: u32, isrv: u32) -> u32 {
    if (tpr & 0xf0) >= (isrv & 0xf0) {
        tpr & 0xff
    } else {
        isrv & 0xf0
    }
}

/// Predict `KVM_SET_LAPIC(raw)` on vCPU `vcpu_id` whose IA32_APIC_BASE is `apic_base`,
/// followed by `KVM_GET_LAPIC`.
pub fn predict_set(
    vcpu_id: u32,
    apic_base: ApicBase,
    raw: &LapicPage,
    conv: &KvmConventions,
    prior: &PriorApic,
) -> Result<Prediction, Box<PredictedFailure>> {
    let mut page = *raw;
    let spiv = page.reg(regs::SPIV);
    let mode = apic_base.mode();
    let fail = |error| {
        Box::new(PredictedFailure {
            error,
            spiv_applied: spiv,
        })
    };
    if mode == ApicMode::Invalid {
        // Such a base cannot be installed (KVM_SET_SREGS refuses it); report it as invalid.
        return Err(fail(LapicError::InvalidApicMode(apic_base.0)));
    }
    let x2 = mode == ApicMode::X2Apic;
    if x2 {
        let found = page.reg(regs::ID);
        if conv.x2apic_32bit_ids && found != vcpu_id {
            return Err(fail(LapicError::X2ApicIdMismatch {
                vcpu_id,
                found,
                expected: vcpu_id,
            }));
        }
        // Set fixups: the x2APIC id is the vCPU id (or, on kernels before 6.11 with legacy
        // ids, the blob's 8-bit id), the LDR follows from it.
        let id = conv.x2apic_id_on_set(vcpu_id, found);
        page.set_reg(regs::ID, id);
        page.set_reg(regs::LDR, x2apic_ldr(id));
        if conv.icr == IcrLayout::Merged {
            // One 64-bit ICR at 0x300: the high half (from ICR2) lands at 0x304.
            let hi = page.reg(regs::ICR2);
            page.set_icr_high_merged(hi);
        }
    }
    page.set_reg(regs::LVR, conv.lvr());
    let isrv = if prior.isr_count_nonzero {
        page.isr().highest().map_or(0, u32::from)
    } else {
        0
    };
    page.set_reg(regs::PPR, ppr(page.reg(regs::TPR), isrv));

    let lvtt = page.reg(regs::LVT_TIMER);
    let timer_mode = lvtt & conv.timer_mode_mask();
    if timer_mode != prior.timer_mode
        && ((prior.timer_mode == TIMER_TSC_DEADLINE) != (timer_mode == TIMER_TSC_DEADLINE))
    {
        // Switching into or out of TSC-deadline mode discards the initial count.
        page.set_reg(regs::TMICT, 0);
    }
    let tmict = page.reg(regs::TMICT);
    let div = u64::from(page.timer_divisor());
    let tmcct = match timer_mode >> 17 {
        _ if tmict == 0 && timer_mode != 3 << 17 => TmcctRead::Zero,
        0 => TmcctRead::UpTo(tmict),
        1 => {
            let min_count = MIN_PERIODIC_NS.div_ceil(div);
            TmcctRead::UpTo(u64::from(tmict).max(min_count).min(u64::from(u32::MAX)) as u32)
        }
        2 => TmcctRead::Zero,
        _ => TmcctRead::Unknown,
    };
    // TMCCT was consumed as the starting count and is zeroed in the page.
    page.set_reg(regs::TMCCT, 0);

    if x2 {
        // Get fixups: the id in the VM's format; the merged ICR's high half copied to ICR2.
        let id = page.reg(regs::ID);
        page.set_reg(regs::ID, id_word(id, conv));
    }
    Ok(Prediction {
        get: page,
        tmcct,
        sw_enabled: spiv & (1 << 8) != 0,
        next: PriorApic {
            timer_mode,
            // KVM's cached in-service count behaves as an 8-bit counter on the kernels measured
            // here: an ISR with all 256 vectors set counts as empty (tests/differential.rs).
            isr_count_nonzero: page.isr().count() % 256 != 0,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv() -> KvmConventions {
        KvmConventions::CANONICAL
    }

    #[test]
    fn x2apic_id_rules() {
        let mut p = LapicPage::default();
        p.set_reg(regs::ID, 7);
        let base = ApicBase(0xfee0_0c00);
        let e = predict_set(300, base, &p, &conv(), &PriorApic::FRESH).unwrap_err();
        assert!(matches!(
            e.error,
            LapicError::X2ApicIdMismatch {
                vcpu_id: 300,
                found: 7,
                ..
            }
        ));
        let legacy = KvmConventions {
            x2apic_32bit_ids: false,
            ..conv()
        };
        let ok = predict_set(300, base, &p, &legacy, &PriorApic::FRESH).unwrap();
        assert_eq!(ok.get.reg(regs::ID), 300u32 << 24);
        assert_eq!(ok.get.reg(regs::LDR), (300 >> 4) << 16 | 1 << (300 & 15));
    }

    #[test]
    fn merged_icr() {
        let mut p = LapicPage::default();
        p.set_reg(regs::ID, 1);
        p.set_icr(0x0000_0002_0000_00f0);
        let c = KvmConventions {
            icr: IcrLayout::Merged,
            ..conv()
        };
        let g = predict_set(1, ApicBase(0xfee0_0c00), &p, &c, &PriorApic::FRESH)
            .unwrap()
            .get;
        let b = g.to_bytes();
        assert_eq!(u32::from_le_bytes(b[0x304..0x308].try_into().unwrap()), 2);
        assert_eq!(g.reg(regs::ICR2), 2);
    }

    #[test]
    fn ppr_and_timer() {
        let mut p = LapicPage::default();
        p.set_reg(regs::TPR, 0x25);
        let mut isr = p.isr();
        isr.set(0x51, true);
        p.set_vectors(regs::ISR, &isr);
        p.set_reg(regs::LVT_TIMER, 2 << 17);
        p.set_reg(regs::TMICT, 1000);
        let base = ApicBase(0xfee0_0900);
        let fresh = predict_set(0, base, &p, &conv(), &PriorApic::FRESH).unwrap();
        assert_eq!(
            fresh.get.reg(regs::PPR),
            0x25,
            "a fresh vCPU ignores the new ISR for PPR"
        );
        assert_eq!(
            fresh.get.reg(regs::TMICT),
            0,
            "entering TSC-deadline mode zeroes TMICT"
        );
        assert_eq!(fresh.tmcct, TmcctRead::Zero);
        let again = predict_set(0, base, &p, &conv(), &fresh.next).unwrap();
        assert_eq!(again.get.reg(regs::PPR), 0x50);
        assert_eq!(again.get.reg(regs::TMICT), 1000, "no mode change: TMICT kept");
    }
}
