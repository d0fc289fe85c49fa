// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Arbitrary bytes through everything a VMM does with a LAPIC blob from an untrusted
//! snapshot: decode, normalise, validate, encode, denormalise, predict. Nothing may panic, and
//! every round trip must hold.
#![no_main]
use lapic_state::{predict_set, regs, ApicMode, LapicState};
use libfuzzer_sys::fuzz_target;
use vmm_fuzz::LapicInput;

fuzz_target!(|data: &[u8]| {
    // The raw bytes as an encoded state.
    if let Ok(s) = LapicState::decode(data) {
        assert_eq!(LapicState::decode(&s.encode()).unwrap(), s);
    }
    let inp = LapicInput::parse(data);
    let blob = &inp.page;
    // The blob as a snapshot's LAPIC section.
    if let Ok(s) = LapicState::normalise(blob, inp.vcpu_id, inp.apic_base, &inp.conv) {
        let _ = s.validate(&inp.conv);
        assert_eq!(LapicState::decode(&s.encode()).unwrap(), s);
        let again =
            LapicState::normalise(&s.denormalise(&inp.conv), inp.vcpu_id, inp.apic_base, &inp.conv).unwrap();
        assert_eq!(again, s);
    }
    // The predictor: total; errors only where KVM refuses; steady state is a fixed point.
    match predict_set(inp.vcpu_id, inp.apic_base, blob, &inp.conv, &inp.prior) {
        Ok(p) => {
            let p2 = predict_set(inp.vcpu_id, inp.apic_base, &p.get, &inp.conv, &p.next).unwrap();
            let p3 = predict_set(inp.vcpu_id, inp.apic_base, &p2.get, &inp.conv, &p2.next).unwrap();
            assert_eq!(p3.get, p2.get);
            // What KVM reports normalises and denormalises back to itself, unless KVM kept a
            // foreign x2APIC id (before Linux 6.11 with legacy ids): that state is refused.
            let foreign = inp.apic_base.mode() == ApicMode::X2Apic
                && !inp.conv.x2apic_32bit_ids
                && p.get.reg(regs::ID) != inp.vcpu_id.wrapping_shl(24);
            match LapicState::normalise(&p.get, inp.vcpu_id, inp.apic_base, &inp.conv) {
                Ok(s) => {
                    assert!(!foreign, "a foreign x2APIC id was accepted");
                    assert_eq!(s.denormalise(&inp.conv), p.get);
                }
                Err(e) => assert!(foreign, "normalise refused KVM's own report: {e}"),
            }
        }
        Err(_) => {
            assert!(inp.apic_base.mode() == ApicMode::Invalid || inp.apic_base.mode() == ApicMode::X2Apic)
        }
    }
});
