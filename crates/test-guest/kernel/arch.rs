// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Port I/O, MSRs, CPUID, memory primitives. All tiny inline-asm wrappers.

use core::arch::asm;

#[inline(always)]
pub fn outb(port: u16, val: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust.
    unsafe { asm!("out dx, al", in("dx") port, in("al") val, options(nomem, nostack, preserves_flags)) }
}

#[inline(always)]
pub fn outw(port: u16, val: u16) {
    // SAFETY: as above.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") val, options(nomem, nostack, preserves_flags)) }
}

#[inline(always)]
pub fn outl(port: u16, val: u32) {
    // SAFETY: as above.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") val, options(nomem, nostack, preserves_flags)) }
}

#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as above.
    unsafe { asm!("in eax, dx", out("eax") v, in("dx") port, options(nomem, nostack, preserves_flags)) }
    v
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads the time-stamp counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as above.
    unsafe { asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags)) }
    v
}

#[inline(always)]
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller only reads MSRs the CPU advertises.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

#[inline(always)]
pub fn wrmsr(msr: u32, val: u64) {
    // SAFETY: the caller only writes MSRs the CPU advertises, with architecturally valid values.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") val as u32, in("edx") (val >> 32) as u32,
             options(nostack, preserves_flags))
    }
}

/// CPUID leaf/subleaf -> (eax, ebx, ecx, edx).
#[inline(always)]
pub fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    (r.eax, r.ebx, r.ecx, r.edx)
}

#[inline(always)]
pub fn cli() {
    // SAFETY: masks interrupts on this CPU only.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

#[inline(always)]
pub fn sti() {
    // SAFETY: unmasks interrupts on this CPU; handlers preserve all registers and the kernel
    // is compiled without a red zone.
    unsafe { asm!("sti", options(nomem, nostack)) }
}

/// Enable interrupts and halt until the next one, atomically (the STI shadow covers HLT).
#[inline(always)]
pub fn sti_hlt() {
    // SAFETY: waits for an interrupt; handlers preserve all registers.
    unsafe { asm!("sti; hlt", options(nomem, nostack)) }
}

#[inline(always)]
pub fn hlt_forever_irqs_off() -> ! {
    loop {
        // SAFETY: stops this CPU with interrupts masked; only INIT/NMI/SMI wake it.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) }
    }
}

#[inline(always)]
pub fn read_volatile_u32(addr: u64) -> u32 {
    // SAFETY: callers pass identity-mapped device or RAM addresses.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

#[inline(always)]
pub fn write_volatile_u32(addr: u64, val: u32) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile(addr as *mut u32, val) }
}

/// Per-CPU data pointer kept in GS base.
#[inline(always)]
pub fn set_gs_base(val: u64) {
    wrmsr(0xC000_0101, val);
}

#[inline(always)]
pub fn gs_base() -> u64 {
    let v: u64;
    // SAFETY: the first word of every per-CPU block holds its own address (see PerCpu::this).
    unsafe { asm!("mov {}, gs:[0]", out(reg) v, options(nostack, preserves_flags, readonly)) }
    v
}

// The compiler may emit calls to these; the hosted sysroot does not export them for a
// freestanding link. `rep movsb`/`rep stosb` keep them short for the CPL0 emulator.

/// # Safety
/// Standard C `memcpy` contract.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: caller guarantees non-overlapping valid ranges.
    unsafe {
        asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _,
             options(nostack, preserves_flags))
    }
    dst
}

/// # Safety
/// Standard C `memmove` contract.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is safe when dst does not start inside src.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backward copy with the direction flag set, restored afterwards.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             inout("rcx") n => _, options(nostack))
    }
    dst
}

/// # Safety
/// Standard C `memset` contract.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: caller guarantees a valid destination range.
    unsafe {
        asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") c as u8,
             options(nostack, preserves_flags))
    }
    dst
}

/// # Safety
/// Standard C `memcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: caller guarantees both ranges are readable for n bytes.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
        i += 1;
    }
    0
}

/// # Safety
/// Standard C `bcmp` contract.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
