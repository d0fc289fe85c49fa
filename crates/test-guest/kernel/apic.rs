// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Local APIC access in xAPIC (MMIO at 0xfee00000) or x2APIC (MSR 0x800 + reg/16) mode.

use crate::arch::{rdmsr, read_volatile_u32, write_volatile_u32, wrmsr};
use core::sync::atomic::{AtomicBool, Ordering};

const XAPIC_BASE: u64 = 0xfee0_0000;
const MSR_APIC_BASE: u32 = 0x1b;

pub const REG_ID: u32 = 0x20;
pub const REG_TPR: u32 = 0x80;
pub const REG_EOI: u32 = 0xb0;
pub const REG_SPIV: u32 = 0xf0;
pub const REG_ICR: u32 = 0x300;
pub const REG_ICR2: u32 = 0x310;
pub const REG_LVT_TIMER: u32 = 0x320;
pub const REG_LVT_LINT0: u32 = 0x350;
pub const REG_LVT_LINT1: u32 = 0x360;
pub const REG_LVT_ERROR: u32 = 0x370;
pub const REG_TMICT: u32 = 0x380;
pub const REG_TDCR: u32 = 0x3e0;

pub const LVT_MASKED: u32 = 1 << 16;
pub const LVT_PERIODIC: u32 = 1 << 17;
pub const SPIV_ENABLE: u32 = 1 << 8;

pub const VEC_TIMER: u8 = 0x20;
pub const VEC_WAKEUP: u8 = 0xf0;
pub const VEC_SPURIOUS: u8 = 0xff;

/// 10 ms at KVM's 1 GHz APIC bus with divide-by-16.
pub const TIMER_COUNT: u32 = 625_000;

static X2APIC: AtomicBool = AtomicBool::new(false);

pub fn x2apic() -> bool {
    X2APIC.load(Ordering::Relaxed)
}

/// Decide the mode once on the BSP: x2APIC when CPUID.1:ECX[21] offers it.
pub fn choose_mode() {
    let (_, _, ecx, _) = crate::arch::cpuid(1, 0);
    X2APIC.store(ecx & (1 << 21) != 0, Ordering::Relaxed);
}

/// Hardware-enable this CPU's APIC in the chosen mode (xAPIC must be enabled before x2APIC).
pub fn enable_mode() {
    let base = rdmsr(MSR_APIC_BASE);
    if base & (1 << 11) == 0 {
        wrmsr(MSR_APIC_BASE, base | (1 << 11));
    }
    if x2apic() && base & (1 << 10) == 0 {
        wrmsr(MSR_APIC_BASE, base | (1 << 11) | (1 << 10));
    }
}

#[inline(always)]
pub fn read(reg: u32) -> u32 {
    if x2apic() {
        rdmsr(0x800 + (reg >> 4)) as u32
    } else {
        read_volatile_u32(XAPIC_BASE + u64::from(reg))
    }
}

#[inline(always)]
pub fn write(reg: u32, val: u32) {
    if x2apic() {
        wrmsr(0x800 + (reg >> 4), u64::from(val));
    } else {
        write_volatile_u32(XAPIC_BASE + u64::from(reg), val);
    }
}

#[inline(always)]
pub fn eoi() {
    write(REG_EOI, 0);
}

/// This CPU's APIC id in the current mode's format.
pub fn id() -> u32 {
    let v = read(REG_ID);
    if x2apic() {
        v
    } else {
        v >> 24
    }
}

/// Send an IPI: `cmd` is the low ICR word (vector, delivery mode, level, trigger).
pub fn send_ipi(dest: u32, cmd: u32) {
    if x2apic() {
        wrmsr(0x830, (u64::from(dest) << 32) | u64::from(cmd));
    } else {
        write(REG_ICR2, dest << 24);
        write(REG_ICR, cmd);
        // Wait for the delivery-status bit (KVM clears it at once); bounded.
        let mut n = 0;
        while read(REG_ICR) & (1 << 12) != 0 && n < 1000 {
            n += 1;
        }
    }
}

pub const ICR_INIT: u32 = 5 << 8;
pub const ICR_STARTUP: u32 = 6 << 8;
pub const ICR_LEVEL_ASSERT: u32 = 1 << 14;
pub const ICR_TRIGGER_LEVEL: u32 = 1 << 15;

/// Bring this CPU's APIC into the state an online CPU uses: SW-enabled, LINTs masked (the
/// IOAPIC, not the 8259 via LINT0, delivers external interrupts), periodic 10 ms timer.
pub fn setup_online() {
    enable_mode();
    write(REG_TPR, 0);
    write(REG_LVT_LINT0, LVT_MASKED);
    write(REG_LVT_LINT1, LVT_MASKED | (4 << 8)); // NMI delivery, masked
    write(REG_LVT_ERROR, LVT_MASKED);
    write(REG_SPIV, SPIV_ENABLE | u32::from(VEC_SPURIOUS));
    write(REG_TDCR, 0x3); // divide by 16
    write(REG_LVT_TIMER, LVT_PERIODIC | u32::from(VEC_TIMER));
    write(REG_TMICT, TIMER_COUNT);
}

/// What Linux does to a CPU going offline: stop the timer, mask LVTs, clear SPIV bit 8.
pub fn sw_disable() {
    write(REG_LVT_TIMER, LVT_MASKED | u32::from(VEC_TIMER));
    write(REG_TMICT, 0);
    write(REG_LVT_LINT0, LVT_MASKED);
    write(REG_LVT_LINT1, LVT_MASKED | (4 << 8));
    write(REG_LVT_ERROR, LVT_MASKED);
    let spiv = read(REG_SPIV);
    write(REG_SPIV, spiv & !SPIV_ENABLE);
}
