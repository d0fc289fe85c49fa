// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Differential tests: the predictor against the real `/dev/kvm`.
//!
//! For thousands of generated blobs, across xAPIC / x2APIC / disabled modes, both x2APIC id
//! formats, the BSP and APs with vCPU ids below and above 255: install the APIC base with
//! `KVM_SET_SREGS`, `KVM_SET_LAPIC`, read back with `KVM_GET_LAPIC`, and compare success or
//! failure and every byte (TMCCT, which the clock drives, against its predicted range).
//! Skips with a printed reason when /dev/kvm is unusable, except under `VMM_REQUIRE_KVM=1`.

use std::io::Write;

use kvm_bindings::{kvm_enable_cap, kvm_lapic_state, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use lapic_state::{
    predict_set, regs, ApicBase, ApicMode, CanonicalPage, KvmConventions, LapicPage, LapicState, PriorApic,
};

fn kvm_or_skip(test: &str) -> Option<Kvm> {
    match Kvm::new().and_then(|k| k.create_vm().map(|_| k)) {
        Ok(k) => {
            if let Some(path) = std::env::var_os("KVM_TEST_LEDGER") {
                if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                    // One write(2) per line: with O_APPEND it cannot interleave with another test
                    // thread's (writeln! issues the name and the newline as separate writes).
                    let _ = f.write_all(format!("{test}\n").as_bytes());
                }
            }
            Some(k)
        }
        Err(e) => {
            assert!(
                std::env::var("VMM_REQUIRE_KVM").as_deref() != Ok("1"),
                "{test}: /dev/kvm unusable: {e}"
            );
            eprintln!("SKIP {test}: /dev/kvm is not usable ({e})");
            None
        }
    }
}

/// Deterministic generator (xorshift64*), so a failure names a reproducible case.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

struct Vcpu {
    id: u32,
    fd: VcpuFd,
    prior: PriorApic,
}

struct Harness {
    _vm: VmFd,
    vcpus: Vec<Vcpu>,
    conv: KvmConventions,
}

const VCPU_IDS: [u32; 5] = [0, 1, 7, 254, 300];

fn harness(kvm: &Kvm, x2apic_32bit_ids: bool) -> Harness {
    let vm = kvm.create_vm().expect("create_vm");
    vm.create_irq_chip().expect("irqchip");
    if x2apic_32bit_ids {
        let cap = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X2APIC_API,
            args: [
                u64::from(
                    kvm_bindings::KVM_X2APIC_API_USE_32BIT_IDS
                        | kvm_bindings::KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK,
                ),
                0,
                0,
                0,
            ],
            ..Default::default()
        };
        vm.enable_cap(&cap).expect("X2APIC_API");
    }
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).expect("cpuid");
    for e in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
        e.ecx |= 1 << 21; // x2APIC must be in CPUID for the mode switch to be legal
    }
    let mut vcpus = Vec::new();
    for id in VCPU_IDS {
        let fd = vm.create_vcpu(u64::from(id)).expect("create_vcpu");
        fd.set_cpuid2(&cpuid).expect("set_cpuid2");
        vcpus.push(Vcpu {
            id,
            fd,
            prior: PriorApic::FRESH,
        });
    }
    let conv = KvmConventions::detect(kvm, &vcpus[0].fd, x2apic_32bit_ids).expect("detect");
    Harness { _vm: vm, vcpus, conv }
}

fn set_base(fd: &VcpuFd, base: ApicBase) {
    let mut s = fd.get_sregs().expect("get_sregs");
    s.apic_base = base.0;
    fd.set_sregs(&s).expect("set_sregs");
}

fn gen_blob(rng: &mut Rng, vcpu_id: u32, mode: ApicMode, conv: &KvmConventions) -> kvm_lapic_state {
    let mut bytes = [0u8; 1024];
    let dense = rng.chance(40);
    for b in bytes.iter_mut() {
        if dense || rng.chance(5) {
            *b = rng.next() as u8;
        }
    }
    let mut p = LapicPage::from_bytes(&bytes);
    // The ID: usually the right one for the mode and format, sometimes not (EINVAL cases).
    let good_id = match mode {
        ApicMode::X2Apic if conv.x2apic_32bit_ids => vcpu_id,
        _ => vcpu_id.wrapping_shl(24),
    };
    if rng.chance(85) {
        p.set_reg(regs::ID, good_id);
    }
    // Timer: a mode (incl. the reserved one), mostly masked, sane or extreme counts.
    let tmode = (rng.below(4) as u32) << 17;
    let masked = if rng.chance(70) { 1 << 16 } else { 0 };
    p.set_reg(
        regs::LVT_TIMER,
        tmode | masked | (rng.next() as u32 & 0xff) | (rng.next() as u32 & 0xfff8_ef00),
    );
    let tmict = match rng.below(4) {
        0 => 0,
        1 => rng.below(1000) as u32 + 1,
        2 => rng.below(1 << 24) as u32,
        _ => rng.next() as u32,
    };
    p.set_reg(regs::TMICT, tmict);
    let tmcct = if rng.chance(70) {
        (rng.next() as u32) % (tmict.saturating_add(1)).max(1)
    } else {
        rng.next() as u32
    };
    p.set_reg(regs::TMCCT, tmcct);
    // ISR sparse or empty; TPR any value.
    if rng.chance(50) {
        let mut isr = lapic_state::VectorSet::default();
        for _ in 0..rng.below(3) {
            isr.set(rng.next() as u8, true);
        }
        p.set_vectors(regs::ISR, &isr);
    }
    p.into()
}

/// A canonical page's bytes as a page, to compare and print.
fn raw(p: &CanonicalPage) -> LapicPage {
    LapicPage::from_bytes(&p.to_bytes())
}

fn tmcct_mask(p: &LapicPage) -> LapicPage {
    let mut q = *p;
    q.set_reg(regs::TMCCT, 0);
    q
}

fn diff(a: &LapicPage, b: &LapicPage) -> String {
    let (a, b) = (a.to_bytes(), b.to_bytes());
    (0..1024)
        .step_by(4)
        .filter(|o| a[*o..o + 4] != b[*o..o + 4])
        .map(|o| {
            format!(
                "  {o:#05x}: kvm {:#010x} predicted {:#010x}\n",
                u32::from_le_bytes(a[o..o + 4].try_into().unwrap()),
                u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
            )
        })
        .collect()
}

fn run_differential(x2apic_32bit_ids: bool, iterations: u32, seed: u64) -> (u32, u32) {
    let Some(kvm) = kvm_or_skip(if x2apic_32bit_ids {
        "differential_32bit_ids"
    } else {
        "differential_legacy_ids"
    }) else {
        return (0, 0);
    };
    let mut h = harness(&kvm, x2apic_32bit_ids);
    let conv = h.conv;
    let mut rng = Rng(seed);
    let (mut ok, mut einval) = (0, 0);
    for i in 0..iterations {
        let vi = rng.below(h.vcpus.len() as u64) as usize;
        let v = &mut h.vcpus[vi];
        let mode = match rng.below(10) {
            0 => ApicMode::Disabled,
            1..=4 => ApicMode::XApic,
            _ => ApicMode::X2Apic,
        };
        let bsp = if v.id == 0 { ApicBase::BSP } else { 0 };
        let base = ApicBase(
            ApicBase::DEFAULT_ADDRESS
                | bsp
                | match mode {
                    ApicMode::Disabled => 0,
                    ApicMode::XApic => ApicBase::ENABLE,
                    _ => ApicBase::ENABLE | ApicBase::EXTD,
                },
        );
        // APIC base first (KVM_SET_SREGS), then the blob: KVM reads the mode from the base.
        set_base(&v.fd, base);
        let before = LapicPage::from(v.fd.get_lapic().expect("get_lapic"));
        let blob = gen_blob(&mut rng, v.id, mode, &conv);
        let predicted = predict_set(v.id, base, LapicPage::view(&blob), &conv, &v.prior);
        let actual = v.fd.set_lapic(&blob);
        let after = LapicPage::from(v.fd.get_lapic().expect("get_lapic"));
        let ctx = format!(
            "case {i} (seed {seed:#x}) vcpu {} mode {mode:?} base {:#x} conv {conv:?}",
            v.id, base.0
        );
        match (predicted, actual) {
            (Ok(p), Ok(())) => {
                let tmcct = after.reg(regs::TMCCT);
                assert!(
                    p.tmcct.admits(tmcct),
                    "{ctx}: TMCCT {tmcct} outside predicted {:?}",
                    p.tmcct
                );
                let (a, e) = (tmcct_mask(&after), tmcct_mask(&p.get));
                assert!(
                    a == e,
                    "{ctx}: KVM_GET_LAPIC differs from the prediction:\n{}",
                    diff(&a, &e)
                );
                assert_eq!(after.sw_enabled(), p.sw_enabled, "{ctx}");
                // Normalising what KVM returned and denormalising it again is the identity,
                // unless KVM kept a foreign x2APIC id (kernels before 6.11 with legacy ids
                // take the blob's): such a state is refused as not this vCPU's.
                let foreign_id = mode == ApicMode::X2Apic
                    && !conv.x2apic_32bit_ids
                    && after.reg(regs::ID) != v.id.wrapping_shl(24);
                match LapicState::normalise(&after, v.id, base, &conv) {
                    Ok(st) => {
                        assert!(!foreign_id, "{ctx}: a foreign x2APIC id was accepted");
                        assert_eq!(st.denormalise(&conv), after, "{ctx}: normalise round trip");
                    }
                    Err(e) => assert!(foreign_id, "{ctx}: normalise: {e}"),
                }
                v.prior = p.next;
                ok += 1;
            }
            (Err(f), Err(e)) => {
                assert_eq!(e.errno(), libc_einval(), "{ctx}: expected EINVAL, got {e}");
                // KVM applied SPIV before refusing; nothing else changed.
                let mut expect = before;
                expect.set_reg(regs::SPIV, f.spiv_applied);
                let (a, e) = (tmcct_mask(&after), tmcct_mask(&expect));
                assert!(a == e, "{ctx}: state after a failed set:\n{}", diff(&a, &e));
                einval += 1;
            }
            (p, a) => panic!("{ctx}: predicted {:?}, KVM said {:?}", p.map(|_| "Ok"), a),
        }
    }
    (ok, einval)
}

fn libc_einval() -> i32 {
    22
}

#[test]
fn differential_32bit_ids() {
    let (ok, einval) = run_differential(true, 4000, 0x1234_5678_9abc_def1);
    if ok + einval > 0 {
        assert!(
            ok > 1000 && einval > 50,
            "too few cases of each kind: ok {ok}, einval {einval}"
        );
        eprintln!("32-bit ids: {ok} accepted, {einval} refused, all as predicted");
    }
}

#[test]
fn differential_legacy_ids() {
    let (ok, einval) = run_differential(false, 4000, 0x0fed_cba9_8765_4321);
    if ok + einval > 0 {
        assert_eq!(einval, 0, "legacy id format never refuses");
        eprintln!("legacy ids: {ok} accepted, all as predicted");
    }
}

/// Found by the `lapic_differential` fuzz target: an ISR with all 256 vectors set makes
/// KVM's cached in-service count wrap to zero, so PPR ignores the ISR on the next set.
#[test]
fn full_isr_wraps_the_in_service_count() {
    let Some(kvm) = kvm_or_skip("full_isr_wraps_the_in_service_count") else {
        return;
    };
    let mut h = harness(&kvm, true);
    let conv = h.conv;
    let v = &mut h.vcpus[3];
    let base = ApicBase(0xfee0_0c00);
    set_base(&v.fd, base);
    let all = lapic_state::VectorSet([u32::MAX; 8]);
    let mut most = all;
    most.set(0, false);
    let mut one = lapic_state::VectorSet::default();
    one.set(0x51, true);
    for isr in [most, most, all, all, one, one, most, one] {
        let mut p = LapicPage::default();
        p.set_reg(regs::ID, v.id);
        p.set_vectors(regs::ISR, &isr);
        let pred = predict_set(v.id, base, &p, &conv, &v.prior).unwrap();
        v.fd.set_lapic(p.as_kvm()).unwrap();
        let got = LapicPage::from(v.fd.get_lapic().unwrap());
        assert_eq!(
            got.reg(regs::PPR),
            pred.get.reg(regs::PPR),
            "ISR of {} vectors, prior {:?}",
            isr.count(),
            v.prior
        );
        v.prior = pred.next;
    }
}

#[test]
fn power_on_state_matches_a_fresh_vcpu() {
    let Some(kvm) = kvm_or_skip("power_on_state_matches_a_fresh_vcpu") else {
        return;
    };
    let h = harness(&kvm, true);
    for v in &h.vcpus {
        let got = LapicPage::from(v.fd.get_lapic().unwrap());
        let want = LapicPage::power_on(v.id, v.id == 0, &h.conv);
        assert!(got == want, "vCPU {}:\n{}", v.id, diff(&got, &want));
    }
}

/// Migrate one vCPU's LAPIC between two VMs with different x2APIC id formats, through the
/// atomic restore path (the crate README's example, against real KVM).
#[test]
fn migrate_between_id_formats() {
    let Some(kvm) = kvm_or_skip("migrate_between_id_formats") else {
        return;
    };
    let src = harness(&kvm, false);
    let dst = harness(&kvm, true);
    let base = ApicBase(ApicBase::DEFAULT_ADDRESS | ApicBase::ENABLE | ApicBase::EXTD);
    let (s, d) = (&src.vcpus[4], &dst.vcpus[4]);
    assert_eq!(s.id, 300);
    set_base(&s.fd, base);
    let mut blob = s.fd.get_lapic().unwrap();
    {
        let p = LapicPage::view_mut(&mut blob);
        p.set_reg(regs::SPIV, 0x1ff);
        p.set_reg(regs::TPR, 0x20);
        p.set_reg(regs::LVT_TIMER, 0x10000 | 0xec);
        p.set_icr(0x0000_0007_0000_40f0);
    }
    s.fd.set_lapic(&blob).unwrap();
    // Source: legacy format, id 300 reads back truncated as 300 << 24.
    let saved = lapic_state::kvm::save(&s.fd, s.id, &src.conv).unwrap();
    assert_eq!(saved.apic_id(), 300);
    let bytes = saved.encode();
    let state = LapicState::decode(&bytes).unwrap();

    // Destination: a refused restore must not touch the vCPU (base not restored yet).
    let before = d.fd.get_lapic().unwrap();
    let err = lapic_state::kvm::restore(&d.fd, d.id, &state, &dst.conv).unwrap_err();
    assert!(err.to_string().contains("restore SREGS first"), "{err}");
    assert_eq!(d.fd.get_lapic().unwrap(), before, "nothing written on refusal");
    set_base(&d.fd, base);
    lapic_state::kvm::restore(&d.fd, d.id, &state, &dst.conv).unwrap();
    let got = LapicPage::from(d.fd.get_lapic().unwrap());
    assert_eq!(got.reg(regs::ID), 300, "32-bit x2APIC id on the destination");
    assert_eq!(got.reg(regs::SPIV), 0x1ff);
    assert_eq!(got.reg(regs::TPR), 0x20);
    assert_eq!(got.icr(), 0x0000_0007_0000_40f0);
    let back = lapic_state::kvm::save(&d.fd, d.id, &dst.conv).unwrap();
    assert_eq!(
        tmcct_mask(&raw(back.page())),
        tmcct_mask(&raw(state.page())),
        "lossless across conventions"
    );

    // A state for another vCPU id is refused before any ioctl.
    let other = LapicState::new(7, state.apic_base(), *state.page());
    assert!(lapic_state::kvm::restore(&d.fd, d.id, &other, &dst.conv).is_err());
}

/// `kvm::restore` with a caller's conventions that name the wrong x2APIC id format: for each
/// format and vCPU id, a restore either leaves the vCPU exactly as the state says or fails
/// having written nothing. (Trusting the caller's bool, a 32-bit-id VM given "legacy" got an
/// ID word KVM refuses after it has applied SPIV: a failed restore that changed the vCPU.)
#[test]
fn restore_with_the_wrong_id_format_is_atomic() {
    let Some(kvm) = kvm_or_skip("restore_with_the_wrong_id_format_is_atomic") else {
        return;
    };
    let base = ApicBase(ApicBase::DEFAULT_ADDRESS | ApicBase::ENABLE | ApicBase::EXTD);
    for ids_32bit in [true, false] {
        let h = harness(&kvm, ids_32bit);
        let wrong = KvmConventions {
            x2apic_32bit_ids: !ids_32bit,
            ..h.conv
        };
        for v in h.vcpus.iter().filter(|v| v.id != 0) {
            set_base(&v.fd, base);
            // The state: SPIV enabled, a TPR, a timer vector; the vCPU: SPIV disabled.
            let mut blob = v.fd.get_lapic().unwrap();
            {
                let p = LapicPage::view_mut(&mut blob);
                p.set_reg(regs::SPIV, 0x1ff);
                p.set_reg(regs::TPR, 0x30);
                p.set_reg(regs::LVT_TIMER, 0x10000 | 0xee);
            }
            v.fd.set_lapic(&blob).unwrap();
            let state = lapic_state::kvm::save(&v.fd, v.id, &h.conv).unwrap();
            let mut off = v.fd.get_lapic().unwrap();
            LapicPage::view_mut(&mut off).set_reg(regs::SPIV, 0xff);
            LapicPage::view_mut(&mut off).set_reg(regs::TPR, 0);
            v.fd.set_lapic(&off).unwrap();
            let before = v.fd.get_lapic().unwrap();
            let case = format!("32-bit ids {ids_32bit}, vCPU {}", v.id);
            match lapic_state::kvm::restore(&v.fd, v.id, &state, &wrong) {
                Ok(()) => {
                    let back = lapic_state::kvm::save(&v.fd, v.id, &h.conv).unwrap();
                    assert_eq!(
                        tmcct_mask(&raw(back.page())),
                        tmcct_mask(&raw(state.page())),
                        "{case}: restored, but not as saved: {}",
                        diff(&raw(back.page()), &raw(state.page()))
                    );
                }
                Err(e) => {
                    let now = LapicPage::from(v.fd.get_lapic().unwrap());
                    let was = LapicPage::from(before);
                    assert!(
                        tmcct_mask(&now) == tmcct_mask(&was),
                        "{case}: the restore failed ({e}) and changed the vCPU: {}",
                        diff(&now, &was)
                    );
                }
            }
        }
    }
}

/// What a saved TSC deadline of 0 means. KVM clears IA32_TSC_DEADLINE only when it injects
/// the timer interrupt; a deadline that expired while the vCPU was not running (the interrupt
/// pending, not yet injected) is still reported, so a restore re-arms it and it fires at once.
/// A 0 is therefore "disarmed or already delivered", and is saved and restored as it is.
#[test]
fn an_expired_deadline_not_yet_injected_is_still_reported() {
    use lapic_state::timer::{MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE};
    let Some(kvm) = kvm_or_skip("an_expired_deadline_not_yet_injected_is_still_reported") else {
        return;
    };
    let h = harness(&kvm, true);
    if !h.conv.tsc_deadline {
        eprintln!("SKIP part: this KVM offers no TSC-deadline timer");
        return;
    }
    let v = &h.vcpus[1];
    set_base(&v.fd, ApicBase(ApicBase::DEFAULT_ADDRESS | ApicBase::ENABLE));
    let mut blob = v.fd.get_lapic().unwrap();
    {
        let p = LapicPage::view_mut(&mut blob);
        p.set_reg(regs::SPIV, 0x1ff);
        p.set_reg(regs::LVT_TIMER, (2 << 17) | 0xec);
    }
    v.fd.set_lapic(&blob).unwrap();
    let msr = |index: u32, data: u64| kvm_bindings::kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let read = |index: u32| {
        let mut m = kvm_bindings::Msrs::from_entries(&[msr(index, 0)]).unwrap();
        assert_eq!(v.fd.get_msrs(&mut m).unwrap(), 1);
        m.as_slice()[0].data
    };
    let tsc = read(MSR_IA32_TSC);
    // A deadline 1000 TSC cycles ahead: expired well before the read below.
    let deadline = tsc + 1000;
    let m = kvm_bindings::Msrs::from_entries(&[msr(MSR_IA32_TSC_DEADLINE, deadline)]).unwrap();
    assert_eq!(v.fd.set_msrs(&m).unwrap(), 1);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(
        read(MSR_IA32_TSC_DEADLINE),
        deadline,
        "an expired, not yet injected deadline is reported as it was set"
    );
    let page = LapicPage::from(v.fd.get_lapic().unwrap());
    assert!(
        !page.irr().contains(0xec),
        "not injected while the vCPU did not run"
    );
}
