// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Typed view of the 1 KiB KVM LAPIC register page.

use kvm_bindings::kvm_lapic_state;

/// Register offsets in the APIC page (16-byte stride, 32-bit registers).
pub mod regs {
    /// Local APIC ID.
    pub const ID: usize = 0x20;
    /// Local APIC version.
    pub const LVR: usize = 0x30;
    /// Task priority.
    pub const TPR: usize = 0x80;
    /// Arbitration priority.
    pub const APR: usize = 0x90;
    /// Processor priority.
    pub const PPR: usize = 0xa0;
    /// Logical destination.
    pub const LDR: usize = 0xd0;
    /// Destination format.
    pub const DFR: usize = 0xe0;
    /// Spurious interrupt vector (bit 8: APIC software enable).
    pub const SPIV: usize = 0xf0;
    /// In-service register, 8 words.
    pub const ISR: usize = 0x100;
    /// Trigger-mode register, 8 words.
    pub const TMR: usize = 0x180;
    /// Interrupt-request register, 8 words.
    pub const IRR: usize = 0x200;
    /// Error status.
    pub const ESR: usize = 0x280;
    /// LVT corrected machine-check interrupt.
    pub const LVT_CMCI: usize = 0x2f0;
    /// Interrupt command, low half.
    pub const ICR: usize = 0x300;
    /// Interrupt command, high half.
    pub const ICR2: usize = 0x310;
    /// LVT timer.
    pub const LVT_TIMER: usize = 0x320;
    /// LVT thermal sensor.
    pub const LVT_THERMAL: usize = 0x330;
    /// LVT performance counter.
    pub const LVT_PERF: usize = 0x340;
    /// LVT LINT0.
    pub const LVT_LINT0: usize = 0x350;
    /// LVT LINT1.
    pub const LVT_LINT1: usize = 0x360;
    /// LVT error.
    pub const LVT_ERROR: usize = 0x370;
    /// Timer initial count.
    pub const TMICT: usize = 0x380;
    /// Timer current count.
    pub const TMCCT: usize = 0x390;
    /// Timer divide configuration.
    pub const TDCR: usize = 0x3e0;
}

/// LVT delivery mode (bits 8..10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryMode {
    /// 000: fixed vector.
    Fixed,
    /// 010: SMI.
    Smi,
    /// 100: NMI.
    Nmi,
    /// 101: INIT.
    Init,
    /// 111: external interrupt (8259-style, vector from the PIC).
    ExtInt,
    /// Any other (reserved) encoding, with its raw value.
    Reserved(u8),
}

impl DeliveryMode {
    fn from_bits(v: u32) -> Self {
        match ((v >> 8) & 7) as u8 {
            0 => DeliveryMode::Fixed,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            7 => DeliveryMode::ExtInt,
            r => DeliveryMode::Reserved(r),
        }
    }

    fn bits(self) -> u32 {
        (match self {
            DeliveryMode::Fixed => 0,
            DeliveryMode::Smi => 2,
            DeliveryMode::Nmi => 4,
            DeliveryMode::Init => 5,
            DeliveryMode::ExtInt => 7,
            DeliveryMode::Reserved(r) => u32::from(r & 7),
        }) << 8
    }
}

/// LVT timer mode (bits 17..18).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerMode {
    /// One-shot countdown from TMICT.
    OneShot,
    /// Periodic reload from TMICT.
    Periodic,
    /// TSC-deadline (IA32_TSC_DEADLINE MSR).
    TscDeadline,
    /// The reserved encoding 11b.
    Reserved,
}

/// One decoded local vector table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lvt(pub u32);

impl Lvt {
    /// Bit 16: masked.
    pub const MASKED: u32 = 1 << 16;

    /// Interrupt vector (bits 0..7).
    pub fn vector(self) -> u8 {
        self.0 as u8
    }
    /// Delivery mode.
    pub fn delivery_mode(self) -> DeliveryMode {
        DeliveryMode::from_bits(self.0)
    }
    /// Whether the entry is masked.
    pub fn masked(self) -> bool {
        self.0 & Self::MASKED != 0
    }
    /// Level-triggered (bit 15; LINT0/LINT1 only).
    pub fn level_triggered(self) -> bool {
        self.0 & (1 << 15) != 0
    }
    /// Timer mode (meaningful for the LVT timer entry only).
    pub fn timer_mode(self) -> TimerMode {
        match (self.0 >> 17) & 3 {
            0 => TimerMode::OneShot,
            1 => TimerMode::Periodic,
            2 => TimerMode::TscDeadline,
            _ => TimerMode::Reserved,
        }
    }
    /// This entry with another delivery mode (other bits kept).
    pub fn with_delivery_mode(self, m: DeliveryMode) -> Lvt {
        Lvt((self.0 & !(7 << 8)) | m.bits())
    }
    /// This entry masked or unmasked.
    pub fn with_masked(self, masked: bool) -> Lvt {
        Lvt(if masked {
            self.0 | Self::MASKED
        } else {
            self.0 & !Self::MASKED
        })
    }
}

/// A typed view of a KVM LAPIC register page.
///
/// Wraps `kvm_lapic_state` by value (1 KiB, `Copy`); `as_kvm()` borrows it back for
/// `VcpuFd::set_lapic` without copying.
#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(transparent)]
pub struct LapicPage(kvm_lapic_state);

impl Default for LapicPage {
    fn default() -> Self {
        LapicPage(kvm_lapic_state { regs: [0; 1024] })
    }
}

impl From<kvm_lapic_state> for LapicPage {
    fn from(s: kvm_lapic_state) -> Self {
        LapicPage(s)
    }
}

impl From<LapicPage> for kvm_lapic_state {
    fn from(p: LapicPage) -> Self {
        p.0
    }
}

/// A 256-bit vector register (IRR, ISR or TMR): eight 32-bit words at a 16-byte stride.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VectorSet(pub [u32; 8]);

impl VectorSet {
    /// Whether `vector` is set.
    pub fn contains(&self, vector: u8) -> bool {
        self.0[usize::from(vector >> 5)] & (1 << (vector & 31)) != 0
    }
    /// Set or clear `vector`.
    pub fn set(&mut self, vector: u8, on: bool) {
        let w = &mut self.0[usize::from(vector >> 5)];
        if on {
            *w |= 1 << (vector & 31);
        } else {
            *w &= !(1 << (vector & 31));
        }
    }
    /// Highest set vector, if any.
    pub fn highest(&self) -> Option<u8> {
        self.0
            .iter()
            .enumerate()
            .rev()
            .find(|(_, w)| **w != 0)
            .map(|(i, w)| (i as u32 * 32 + 31 - w.leading_zeros()) as u8)
    }
    /// Number of vectors set.
    pub fn count(&self) -> u32 {
        self.0.iter().map(|w| w.count_ones()).sum()
    }
    /// Whether no vector is set.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }
}

impl LapicPage {
    /// Borrow a `kvm_lapic_state` as a typed page without copying it.
    pub fn view(state: &kvm_lapic_state) -> &LapicPage {
        // SAFETY: LapicPage is repr(transparent) over kvm_lapic_state, so the layouts are
        // identical and the lifetime is carried over.
        unsafe { &*(state as *const kvm_lapic_state as *const LapicPage) }
    }

    /// Mutable typed view of a `kvm_lapic_state` without copying it.
    pub fn view_mut(state: &mut kvm_lapic_state) -> &mut LapicPage {
        // SAFETY: as in `view`.
        unsafe { &mut *(state as *mut kvm_lapic_state as *mut LapicPage) }
    }

    /// Build from raw bytes (must be exactly 1024).
    pub fn from_bytes(bytes: &[u8; 1024]) -> Self {
        let mut p = LapicPage::default();
        for (d, s) in p.0.regs.iter_mut().zip(bytes.iter()) {
            *d = *s as _;
        }
        p
    }

    /// The raw bytes.
    pub fn to_bytes(&self) -> [u8; 1024] {
        let mut out = [0u8; 1024];
        for (d, s) in out.iter_mut().zip(self.0.regs.iter()) {
            *d = *s as u8;
        }
        out
    }

    /// Borrow as the KVM structure.
    pub fn as_kvm(&self) -> &kvm_lapic_state {
        &self.0
    }

    /// Read the 32-bit register at `offset` (0..=0x3f0, 16-byte aligned); other offsets read 0.
    pub fn reg(&self, offset: usize) -> u32 {
        if offset % 16 != 0 || offset + 4 > 1024 {
            return 0;
        }
        let b = &self.0.regs[offset..offset + 4];
        u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
    }

    /// Write the 32-bit register at `offset`; misaligned or out-of-page offsets are ignored.
    pub fn set_reg(&mut self, offset: usize, val: u32) {
        if offset % 16 != 0 || offset + 4 > 1024 {
            return;
        }
        for (d, s) in self.0.regs[offset..offset + 4].iter_mut().zip(val.to_le_bytes()) {
            *d = s as _;
        }
    }

    /// Read a 256-bit vector register at `base` (`regs::IRR`, `regs::ISR` or `regs::TMR`).
    pub fn vectors(&self, base: usize) -> VectorSet {
        let mut v = VectorSet::default();
        for (i, w) in v.0.iter_mut().enumerate() {
            *w = self.reg(base + 16 * i);
        }
        v
    }

    /// Write a 256-bit vector register at `base`.
    pub fn set_vectors(&mut self, base: usize, v: &VectorSet) {
        for (i, w) in v.0.iter().enumerate() {
            self.set_reg(base + 16 * i, *w);
        }
    }

    /// Interrupt-request register.
    pub fn irr(&self) -> VectorSet {
        self.vectors(regs::IRR)
    }
    /// In-service register.
    pub fn isr(&self) -> VectorSet {
        self.vectors(regs::ISR)
    }
    /// Trigger-mode register.
    pub fn tmr(&self) -> VectorSet {
        self.vectors(regs::TMR)
    }

    /// The interrupt command register as one 64-bit value from the ICR (low) and ICR2 (high)
    /// words, i.e. the split layout (xAPIC, and x2APIC on AMD). See
    /// [`crate::KvmConventions`] for the merged Intel x2APIC layout.
    pub fn icr(&self) -> u64 {
        u64::from(self.reg(regs::ICR)) | (u64::from(self.reg(regs::ICR2)) << 32)
    }

    /// Set ICR (low word) and ICR2 (high word) from one 64-bit value.
    pub fn set_icr(&mut self, icr: u64) {
        self.set_reg(regs::ICR, icr as u32);
        self.set_reg(regs::ICR2, (icr >> 32) as u32);
    }

    /// Timer divisor selected by TDCR bits 0, 1 and 3 (1, 2, 4, ... 128).
    pub fn timer_divisor(&self) -> u32 {
        let t = self.reg(regs::TDCR);
        let v = (t & 3) | ((t & 8) >> 1);
        1 << ((v + 1) & 7)
    }

    /// Read 4 bytes at any 4-byte aligned `offset` (e.g. 0x304, the upper half of KVM's merged
    /// x2APIC ICR); out-of-page or misaligned offsets read 0.
    pub fn raw_u32(&self, offset: usize) -> u32 {
        if offset % 4 != 0 || offset + 4 > 1024 {
            return 0;
        }
        let b = &self.0.regs[offset..offset + 4];
        u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
    }

    /// Write 4 bytes at any 4-byte aligned `offset`; others are ignored.
    pub fn set_raw_u32(&mut self, offset: usize, val: u32) {
        if offset % 4 != 0 || offset + 4 > 1024 {
            return;
        }
        for (d, s) in self.0.regs[offset..offset + 4].iter_mut().zip(val.to_le_bytes()) {
            *d = s as _;
        }
    }

    /// SPIV bit 8: the APIC is software-enabled.
    pub fn sw_enabled(&self) -> bool {
        self.reg(regs::SPIV) & (1 << 8) != 0
    }

    /// Decoded LVT entry at `offset` (one of the `regs::LVT_*` offsets).
    pub fn lvt(&self, offset: usize) -> Lvt {
        Lvt(self.reg(offset))
    }

    /// Program LINT0 as ExtINT and LINT1 as NMI, both unmasked: the PC-compatible boot wiring
    /// the BIOS would leave for a Linux kernel (the 8259 on LINT0, NMI on LINT1).
    pub fn set_lint_boot_defaults(&mut self) {
        let l0 = self
            .lvt(regs::LVT_LINT0)
            .with_delivery_mode(DeliveryMode::ExtInt)
            .with_masked(false);
        let l1 = self
            .lvt(regs::LVT_LINT1)
            .with_delivery_mode(DeliveryMode::Nmi)
            .with_masked(false);
        self.set_reg(regs::LVT_LINT0, l0.0);
        self.set_reg(regs::LVT_LINT1, l1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lint_defaults_keep_other_bits() {
        let mut p = LapicPage::default();
        p.set_reg(regs::LVT_LINT0, Lvt::MASKED | 0x30);
        p.set_lint_boot_defaults();
        assert_eq!(p.reg(regs::LVT_LINT0), 0x730);
        assert_eq!(p.reg(regs::LVT_LINT1), 0x400);
    }

    #[test]
    fn misaligned_access_is_ignored() {
        let mut p = LapicPage::default();
        p.set_reg(0x21, 0xffff_ffff);
        p.set_reg(0x400, 0xffff_ffff);
        assert_eq!(p, LapicPage::default());
        assert_eq!(p.reg(0x3f4), 0);
    }

    #[test]
    fn timer_modes() {
        assert_eq!(Lvt(0x20).timer_mode(), TimerMode::OneShot);
        assert_eq!(Lvt(0x20020).timer_mode(), TimerMode::Periodic);
        assert_eq!(Lvt(0x40020).timer_mode(), TimerMode::TscDeadline);
        assert_eq!(Lvt(0x60020).timer_mode(), TimerMode::Reserved);
        assert_eq!(Lvt(0x10000).delivery_mode(), DeliveryMode::Fixed);
        assert_eq!(Lvt(0x300).delivery_mode(), DeliveryMode::Reserved(3));
    }

    #[test]
    fn vector_sets_and_divisor() {
        let mut p = LapicPage::default();
        let mut v = VectorSet::default();
        assert_eq!(v.highest(), None);
        v.set(0x31, true);
        v.set(0xef, true);
        p.set_vectors(regs::ISR, &v);
        assert_eq!(p.isr().highest(), Some(0xef));
        assert_eq!(p.isr().count(), 2);
        assert_eq!(p.reg(regs::ISR + 16 * 7), 1 << 15);
        for (tdcr, div) in [
            (0u32, 2u32),
            (1, 4),
            (2, 8),
            (3, 16),
            (8, 32),
            (9, 64),
            (10, 128),
            (11, 1),
        ] {
            p.set_reg(regs::TDCR, tdcr);
            assert_eq!(p.timer_divisor(), div, "tdcr {tdcr}");
        }
        p.set_icr(0x0000_0003_0000_4500);
        assert_eq!(p.reg(regs::ICR2), 3);
        assert_eq!(p.icr(), 0x0000_0003_0000_4500);
        let k: kvm_lapic_state = p.into();
        assert_eq!(LapicPage::view(&k).icr(), p.icr());
    }

    proptest! {
        #[test]
        fn highest_matches_scan(words: [u32; 8]) {
            let v = VectorSet(words);
            let scan = (0..=255u8).rev().find(|x| v.contains(*x));
            prop_assert_eq!(v.highest(), scan);
        }

        #[test]
        fn reg_round_trip(off in 0usize..64, v: u32) {
            let mut p = LapicPage::default();
            p.set_reg(off * 16, v);
            prop_assert_eq!(p.reg(off * 16), v);
            let bytes = p.to_bytes();
            prop_assert_eq!(LapicPage::from_bytes(&bytes), p);
        }

        #[test]
        fn delivery_mode_round_trip(v: u32, m in 0u8..8) {
            let l = Lvt(v).with_delivery_mode(DeliveryMode::Reserved(m));
            let back = l.delivery_mode();
            prop_assert_eq!(Lvt(v).with_delivery_mode(back), l);
            prop_assert_eq!(l.0 & !(7 << 8), v & !(7 << 8));
        }
    }
}
