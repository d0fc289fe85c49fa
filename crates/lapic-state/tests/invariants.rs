// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Property tests for the invariants of `KVM_SET_LAPIC`/`KVM_GET_LAPIC` (reference notes §6),
//! on the predictor and the normalise/denormalise pair. No /dev/kvm needed; the same
//! predictor is checked against the real KVM in `differential.rs`.

use lapic_state::{
    predict_set, regs, x2apic_ldr, ApicBase, ApicMode, CanonicalPage, IcrLayout, KvmConventions, LapicError,
    LapicPage, LapicState, PriorApic, TmcctRead,
};
use proptest::prelude::*;

/// A page taken as canonical as it is.
fn canonical(p: &LapicPage) -> CanonicalPage {
    CanonicalPage::from_bytes(&p.to_bytes())
}

fn blob(bytes: &[u8]) -> LapicPage {
    let mut b = [0u8; 1024];
    b.copy_from_slice(bytes);
    LapicPage::from_bytes(&b)
}

fn conv_strategy() -> impl Strategy<Value = KvmConventions> {
    (
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(6u8), Just(7u8)],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(ids, merged, nr_lvt, tsc_deadline, directed_eoi, x2apic_id_readonly)| KvmConventions {
                x2apic_32bit_ids: ids,
                icr: if merged {
                    IcrLayout::Merged
                } else {
                    IcrLayout::Split
                },
                nr_lvt,
                tsc_deadline,
                directed_eoi,
                x2apic_id_readonly,
                apic_bus_cycle_ns: 1,
            },
        )
}

fn base_strategy() -> impl Strategy<Value = ApicBase> {
    (0u64..4, any::<bool>()).prop_map(|(m, bsp)| {
        let mode = [
            0,
            ApicBase::ENABLE,
            ApicBase::ENABLE | ApicBase::EXTD,
            ApicBase::EXTD,
        ][m as usize];
        ApicBase(ApicBase::DEFAULT_ADDRESS | mode | if bsp { ApicBase::BSP } else { 0 })
    })
}

fn prior_strategy() -> impl Strategy<Value = PriorApic> {
    (0u32..4, any::<bool>()).prop_map(|(m, i)| PriorApic {
        timer_mode: m << 17,
        isr_count_nonzero: i,
    })
}

/// A blob whose ID word is right for (mode, conventions) with high probability.
fn fitting_blob(
    bytes: &[u8],
    vcpu_id: u32,
    base: ApicBase,
    conv: &KvmConventions,
    keep_id: bool,
) -> LapicPage {
    let mut b = blob(bytes);
    if !keep_id && base.mode() == ApicMode::X2Apic {
        let w = if conv.x2apic_32bit_ids {
            vcpu_id
        } else {
            vcpu_id << 24
        };
        b.set_reg(regs::ID, w);
    }
    b
}

/// Offsets (4-byte words) KVM may change on the SET/GET path.
fn fixed_up(off: usize, x2: bool, merged: bool) -> bool {
    matches!(off, 0x30 | 0xa0 | 0x380 | 0x390)
        || (x2 && matches!(off, 0x20 | 0xd0))
        || (x2 && merged && matches!(off, 0x304 | 0x310))
}

fn word(b: &[u8; 1024], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// 1. Totality: any input gives Ok or a typed error, and errors happen exactly for an
    ///    invalid mode or an x2APIC id mismatch with 32-bit ids.
    #[test]
    fn totality(bytes in prop::collection::vec(any::<u8>(), 1024), vcpu_id: u32, base in base_strategy(),
                conv in conv_strategy(), prior in prior_strategy()) {
        let b = blob(&bytes);
        let id = b.reg(regs::ID);
        let should_fail = base.mode() == ApicMode::Invalid
            || (base.mode() == ApicMode::X2Apic && conv.x2apic_32bit_ids && id != vcpu_id);
        match predict_set(vcpu_id, base, &b, &conv, &prior) {
            Ok(_) => prop_assert!(!should_fail),
            Err(f) => {
                prop_assert!(should_fail);
                prop_assert_eq!(f.spiv_applied, b.reg(regs::SPIV));
                let expected_kind = matches!(f.error, LapicError::InvalidApicMode(_) | LapicError::X2ApicIdMismatch { .. });
                prop_assert!(expected_kind, "unexpected error {:?}", f.error);
            }
        }
    }

    /// 2/3. Idempotence and round trip: from the steady state (second set on the same vCPU),
    ///      setting what GET returned reads back the same page.
    #[test]
    fn round_trip_is_stable(bytes in prop::collection::vec(any::<u8>(), 1024), vcpu_id in 0u32..4096,
                            base in base_strategy(), conv in conv_strategy()) {
        prop_assume!(base.mode() != ApicMode::Invalid);
        let b = fitting_blob(&bytes, vcpu_id, base, &conv, false);
        let g1 = predict_set(vcpu_id, base, &b, &conv, &PriorApic::FRESH).unwrap();
        let g2 = predict_set(vcpu_id, base, &g1.get, &conv, &g1.next).unwrap();
        let g3 = predict_set(vcpu_id, base, &g2.get, &conv, &g2.next).unwrap();
        prop_assert_eq!(g3.get, g2.get);
        // Only PPR may move between the first and second read (KVM's stale ISR count).
        let mut a = g1.get;
        a.set_reg(regs::PPR, g2.get.reg(regs::PPR));
        prop_assert_eq!(a, g2.get);
    }

    /// 4. Verbatim copy: every byte outside the fixed-up registers comes back unchanged
    ///    (KVM does not sanitise reserved bits on this path, nor does the model).
    #[test]
    fn verbatim_copy(bytes in prop::collection::vec(any::<u8>(), 1024), vcpu_id in 0u32..4096,
                     base in base_strategy(), conv in conv_strategy(), prior in prior_strategy()) {
        prop_assume!(base.mode() != ApicMode::Invalid);
        let b = fitting_blob(&bytes, vcpu_id, base, &conv, false);
        let p = predict_set(vcpu_id, base, &b, &conv, &prior).unwrap();
        let (inb, out) = (b.to_bytes(), p.get.to_bytes());
        let x2 = base.mode() == ApicMode::X2Apic;
        for off in (0..1024).step_by(4) {
            if !fixed_up(off, x2, conv.icr == IcrLayout::Merged) {
                prop_assert_eq!(word(&inb, off), word(&out, off), "offset {:#x}", off);
            }
        }
    }

    /// 5/6. x2APIC id/LDR formulas and ICR symmetry.
    #[test]
    fn x2apic_fixups(bytes in prop::collection::vec(any::<u8>(), 1024), vcpu_id in 0u32..100_000,
                     conv in conv_strategy()) {
        let base = ApicBase(0xfee0_0c00);
        let b = fitting_blob(&bytes, vcpu_id, base, &conv, false);
        let p = predict_set(vcpu_id, base, &b, &conv, &PriorApic::FRESH).unwrap();
        let expect_id = if conv.x2apic_32bit_ids { vcpu_id } else { vcpu_id.wrapping_shl(24) };
        prop_assert_eq!(p.get.reg(regs::ID), expect_id);
        // The LDR follows the id KVM keeps: the vCPU id, or before Linux 6.11 with legacy
        // ids the 8 bits of it the ID word holds.
        let kept = if conv.x2apic_32bit_ids || conv.x2apic_id_readonly { vcpu_id } else { vcpu_id & 0xff };
        prop_assert_eq!(conv.x2apic_id_on_set(vcpu_id, expect_id), kept);
        let ldr = p.get.reg(regs::LDR);
        prop_assert_eq!(ldr, x2apic_ldr(kept));
        prop_assert_eq!((ldr & 0xffff).count_ones(), 1);
        prop_assert_eq!(ldr >> 16, kept >> 4);
        let (inb, out) = (b.to_bytes(), p.get.to_bytes());
        prop_assert_eq!(word(&out, 0x300), word(&inb, 0x300));
        prop_assert_eq!(word(&out, 0x310), word(&inb, 0x310));
        match conv.icr {
            IcrLayout::Merged => prop_assert_eq!(word(&out, 0x304), word(&inb, 0x310)),
            IcrLayout::Split => prop_assert_eq!(word(&out, 0x304), word(&inb, 0x304)),
        }
    }

    /// 7/8. Derived registers and timer rules.
    #[test]
    fn derived_and_timer(bytes in prop::collection::vec(any::<u8>(), 1024), base in base_strategy(),
                         conv in conv_strategy(), prior in prior_strategy()) {
        prop_assume!(base.mode() != ApicMode::Invalid);
        let b = fitting_blob(&bytes, 5, base, &conv, false);
        let p = predict_set(5, base, &b, &conv, &prior).unwrap();
        let inp = &b;
        prop_assert_eq!(p.get.reg(regs::LVR), conv.lvr());
        prop_assert_eq!(p.get.reg(regs::TMCCT), 0);
        let tpr = inp.reg(regs::TPR);
        let isrv = if prior.isr_count_nonzero { inp.isr().highest().map_or(0, u32::from) } else { 0 };
        let ppr = p.get.reg(regs::PPR);
        prop_assert!(ppr == (tpr & 0xff) || ppr == (isrv & 0xf0));
        prop_assert!(ppr & 0xf0 >= isrv & 0xf0 || ppr == (tpr & 0xff));
        let mode = inp.reg(regs::LVT_TIMER) & conv.timer_mode_mask();
        let dl = 2 << 17;
        if (mode == dl) != (prior.timer_mode == dl) {
            prop_assert_eq!(p.get.reg(regs::TMICT), 0);
        } else {
            prop_assert_eq!(p.get.reg(regs::TMICT), inp.reg(regs::TMICT));
        }
        if mode == dl || p.get.reg(regs::TMICT) == 0 && mode != 3 << 17 {
            prop_assert_eq!(p.tmcct, TmcctRead::Zero);
        }
        prop_assert_eq!(p.sw_enabled, inp.reg(regs::SPIV) & 0x100 != 0);
    }

    /// 10. Mode dependence: the same blob under xAPIC and x2APIC differs only at the
    ///     registers x2APIC fixes up.
    #[test]
    fn mode_dependence(bytes in prop::collection::vec(any::<u8>(), 1024), vcpu_id in 0u32..256, conv in conv_strategy()) {
        let x2 = ApicBase(0xfee0_0c00);
        let b = fitting_blob(&bytes, vcpu_id, x2, &conv, false);
        let a = predict_set(vcpu_id, ApicBase(0xfee0_0800), &b, &conv, &PriorApic::FRESH).unwrap().get.to_bytes();
        let c = predict_set(vcpu_id, x2, &b, &conv, &PriorApic::FRESH).unwrap().get.to_bytes();
        for off in (0..1024).step_by(4) {
            if word(&a, off) != word(&c, off) {
                prop_assert!(fixed_up(off, true, conv.icr == IcrLayout::Merged), "offset {:#x}", off);
            }
        }
    }

    /// Normalise/denormalise: lossless across conventions for everything KVM keeps.
    #[test]
    fn conventions_are_lossless(bytes in prop::collection::vec(any::<u8>(), 1024), vcpu_id in 0u32..4096,
                                base in base_strategy(), a in conv_strategy(), b in conv_strategy()) {
        prop_assume!(base.mode() != ApicMode::Invalid);
        // A blob as KVM would report it under `a`.
        let got = predict_set(vcpu_id, base, &fitting_blob(&bytes, vcpu_id, base, &a, false), &a, &PriorApic::FRESH)
            .unwrap().get;
        let s = LapicState::normalise(&got, vcpu_id, base, &a).unwrap();
        prop_assert!(s.validate(&a).iter().all(|f| f.kvm_accepts));
        prop_assert_eq!(s.denormalise(&a), got, "identity under the same conventions");
        let there = s.denormalise(&b);
        let back = LapicState::normalise(&there, vcpu_id, base, &b).unwrap();
        let mut expect = s;
        if base.mode() == ApicMode::X2Apic && a.icr == IcrLayout::Split && b.icr == IcrLayout::Merged {
            // 0x304 is a reserved hole on split hosts; a merged host uses it for ICR2.
            let mut bytes = s.page().to_bytes();
            bytes[0x304..0x308].fill(0);
            expect = LapicState::new(s.vcpu_id(), s.apic_base(), CanonicalPage::from_bytes(&bytes));
        }
        prop_assert_eq!(back, expect);
        // And KVM at the destination accepts it and keeps it.
        let p = predict_set(vcpu_id, base, &there, &b, &PriorApic { timer_mode: got.reg(regs::LVT_TIMER) & b.timer_mode_mask(), isr_count_nonzero: true });
        prop_assert!(p.is_ok());
    }

    /// Encoding round trips; decoding arbitrary bytes never panics.
    #[test]
    fn encoding(bytes in prop::collection::vec(any::<u8>(), 1024), vcpu_id: u32, base: u64, junk in prop::collection::vec(any::<u8>(), 0..1100)) {
        let s = LapicState::new(vcpu_id, ApicBase(base), canonical(&blob(&bytes)));
        prop_assert_eq!(LapicState::decode(&s.encode()).unwrap(), s);
        let json = serde_json::to_string(&s).unwrap();
        prop_assert_eq!(serde_json::from_str::<LapicState>(&json).unwrap(), s);
        // A format that does not describe itself (postcard): the page goes as bytes.
        let bin = postcard::to_stdvec(&s).unwrap();
        prop_assert!(bin.len() < 1024 + 32, "page encoded as bytes, {} bytes", bin.len());
        prop_assert_eq!(postcard::from_bytes::<LapicState>(&bin).unwrap(), s);
        let _ = LapicState::decode(&junk);
        let _ = postcard::from_bytes::<LapicState>(&junk);
    }
}

#[test]
fn newer_versions_are_refused() {
    let s = LapicState::new(1, ApicBase(0xfee0_0900), canonical(&LapicPage::default()));
    let mut e = s.encode();
    e[4] = 2;
    let err = LapicState::decode(&e).unwrap_err();
    assert_eq!(
        err.to_string(),
        "LAPIC state format version 2 is newer than the supported version 1"
    );
    let json = serde_json::to_string(&s)
        .unwrap()
        .replace("\"version\":1", "\"version\":9");
    let err = serde_json::from_str::<LapicState>(&json).unwrap_err().to_string();
    assert!(err.contains("version 9 is newer"), "{err}");
    assert!(LapicState::decode(&e[..100]).is_err());
}

/// Version 0 was never written, and the reserved field must be zero: both mean damage.
#[test]
fn version_zero_and_reserved_bits_are_refused() {
    let s = LapicState::new(1, ApicBase(0xfee0_0900), canonical(&LapicPage::default()));
    let mut e = s.encode();
    e[4] = 0;
    assert_eq!(LapicState::decode(&e), Err(lapic_state::DecodeError::VersionZero));
    let mut e = s.encode();
    e[7] = 0x80;
    assert_eq!(
        LapicState::decode(&e),
        Err(lapic_state::DecodeError::Reserved(0x8000))
    );
    let json = serde_json::to_string(&s)
        .unwrap()
        .replace("\"version\":1", "\"version\":0");
    let err = serde_json::from_str::<LapicState>(&json).unwrap_err().to_string();
    assert!(err.contains("version 0 does not exist"), "{err}");
    let e = s.encode();
    assert!(matches!(
        LapicState::decode(&e[..6]),
        Err(lapic_state::DecodeError::Length { found: 6, .. })
    ));
}

#[test]
fn validation_reports_and_says_what_kvm_accepts() {
    let conv = KvmConventions::CANONICAL;
    let mut p = LapicPage::default();
    p.set_reg(regs::ID, 9);
    p.set_reg(regs::LDR, 0);
    p.set_reg(regs::TMICT, 10);
    p.set_reg(regs::TMCCT, 20);
    p.set_reg(regs::LVT_LINT0, 3 << 8);
    p.set_reg(regs::LVT_TIMER, 3 << 17);
    let s = LapicState::new(4, ApicBase(0xfee0_0c00), canonical(&p));
    let f = s.validate(&conv);
    let kinds: Vec<_> = f
        .iter()
        .map(|f| (std::mem::discriminant(&f.error), f.kvm_accepts))
        .collect();
    assert_eq!(f.len(), 5, "{f:?}");
    assert!(f
        .iter()
        .any(|f| matches!(f.error, LapicError::X2ApicIdMismatch { .. }) && !f.kvm_accepts));
    assert!(f
        .iter()
        .any(|f| matches!(f.error, LapicError::LdrInconsistent { .. }) && f.kvm_accepts));
    assert!(f.iter().any(|f| matches!(
        f.error,
        LapicError::TimerCountBeyondInitial { tmcct: 20, tmict: 10 }
    )));
    assert!(f.iter().any(|f| matches!(
        f.error,
        LapicError::ReservedLvtDeliveryMode {
            lvt: "LINT0",
            mode: 3
        }
    )));
    assert!(f
        .iter()
        .any(|f| matches!(f.error, LapicError::ReservedTimerMode(_))));
    assert_eq!(kinds.len(), 5);
    let bad_mode = LapicState::new(s.vcpu_id(), ApicBase(0xfee0_0400), *s.page());
    assert!(bad_mode
        .validate(&conv)
        .iter()
        .any(|f| matches!(f.error, LapicError::InvalidApicMode(_))));
    let legacy = KvmConventions {
        x2apic_32bit_ids: false,
        ..conv
    };
    assert!(
        s.validate(&legacy).iter().all(|f| f.kvm_accepts),
        "legacy ids: KVM overrides the id"
    );
}

/// An expired one-shot timer (TMICT set, TMCCT 0, not masked) is reported: KVM arms it again
/// on restore. A running one, a masked one and a periodic one are not.
#[test]
fn an_expired_one_shot_timer_is_a_finding() {
    let conv = KvmConventions::CANONICAL;
    let mut s = LapicState::new(1, ApicBase(0xfee0_0900), canonical(&LapicPage::default()));
    s.page_mut().set_reg(regs::SPIV, 0x1ff);
    s.page_mut().set_reg(regs::LVT_TIMER, 0xec);
    s.page_mut().set_reg(regs::TMICT, 0x1000);
    let expired = |s: &LapicState| {
        s.validate(&conv).iter().any(|f| {
            matches!(f.error, LapicError::ExpiredOneShotFiresAgain { tmict: 0x1000 }) && f.kvm_accepts
        })
    };
    assert!(expired(&s), "{:?}", s.validate(&conv));
    let mut running = s;
    running.page_mut().set_reg(regs::TMCCT, 0x10);
    assert!(!expired(&running));
    let mut masked = s;
    masked.page_mut().set_reg(regs::LVT_TIMER, 0x1_00ec);
    assert!(!expired(&masked));
    let mut periodic = s;
    periodic.page_mut().set_reg(regs::LVT_TIMER, (1 << 17) | 0xec);
    assert!(!expired(&periodic));
}
