// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A memory-dirtying workload with its own checksums, for migration tests: while it runs,
//! every timer tick of every online CPU rewrites one page of a region (round robin) with a
//! value derived from a global write counter and records that value; `check` stops the
//! writers, waits for writes in flight, and verifies every page against its record. A page
//! that a migration or restore lost or tore shows up as a bad page.
//!
//! Page fills and checks use `rep stosq` / `repe scasq`: one emulated string instruction per
//! page instead of hundreds of loop iterations (ring-0 code is emulated on software KVM).

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Guest-physical start of the region (above the image and its stacks; needs RAM up to
/// `BASE + pages * 4 KiB`).
pub const BASE: u64 = 32 << 20;
/// Largest region, in pages (16 MiB).
pub const MAX_PAGES: usize = 4096;

static RUNNING: AtomicBool = AtomicBool::new(false);
static PAGES: AtomicU64 = AtomicU64::new(0);
static WRITES: AtomicU64 = AtomicU64::new(0);
static IN_FLIGHT: AtomicU64 = AtomicU64::new(0);
/// Expected fill value of each page (0: never written).
static EXPECTED: [AtomicU64; MAX_PAGES] = [const { AtomicU64::new(0) }; MAX_PAGES];

fn fill(page: u64, v: u64) {
    // SAFETY: the region is identity-mapped RAM that nothing else uses; 512 qwords = one page.
    unsafe {
        core::arch::asm!("cld", "rep stosq", inout("rdi") BASE + page * 4096 => _, inout("rcx") 512u64 => _,
                         in("rax") v, options(nostack))
    }
}

fn page_ok(page: u64, v: u64) -> bool {
    let left: u64;
    // SAFETY: reads one page of the identity-mapped region. `repe scasq` stops at the first
    // qword that differs from RAX; RCX is then non-zero or the last compare failed (ZF=0).
    let zf: u8;
    unsafe {
        core::arch::asm!("cld", "repe scasq", "sete {zf}", zf = out(reg_byte) zf,
                         inout("rdi") BASE + page * 4096 => _, inout("rcx") 512u64 => left,
                         in("rax") v, options(nostack, readonly))
    }
    left == 0 && zf == 1
}

/// Timer tick hook (any CPU): rewrite the next page while the workload runs.
pub fn tick() {
    if !RUNNING.load(Ordering::Acquire) {
        return;
    }
    IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
    // Re-check after announcing ourselves, so `stop` cannot miss this write.
    if RUNNING.load(Ordering::Acquire) {
        let n = WRITES.fetch_add(1, Ordering::AcqRel) + 1;
        let pages = PAGES.load(Ordering::Relaxed).max(1);
        let page = n % pages;
        let v = (n << 16) | page | 0x8000_0000_0000_0000;
        fill(page, v);
        if let Some(e) = EXPECTED.get(page as usize) {
            e.store(v, Ordering::Release);
        }
    }
    IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
}

extern "C" {
    static __image_end: u8;
}

/// Start rewriting `pages` pages; every page is written once first, so all have a record.
pub fn start(pages: usize) -> bool {
    // SAFETY: only the address of the linker symbol is taken.
    let image_end = unsafe { core::ptr::addr_of!(__image_end) } as u64;
    if pages == 0 || pages > MAX_PAGES || image_end > BASE {
        return false;
    }
    stop();
    PAGES.store(pages as u64, Ordering::Relaxed);
    for p in 0..pages as u64 {
        let v = p | 0x4000_0000_0000_0000;
        fill(p, v);
        if let Some(e) = EXPECTED.get(p as usize) {
            e.store(v, Ordering::Release);
        }
    }
    RUNNING.store(true, Ordering::Release);
    true
}

/// Stop the writers and wait until none is in the middle of a page.
pub fn stop() -> bool {
    let was = RUNNING.swap(false, Ordering::AcqRel);
    while IN_FLIGHT.load(Ordering::Acquire) != 0 {
        core::hint::spin_loop();
    }
    was
}

/// Verify every page against its record: (pages, bad pages, writes so far). The workload is
/// paused during the check and resumed afterwards if it was running.
pub fn check() -> (u64, u64, u64) {
    let was = stop();
    let pages = PAGES.load(Ordering::Relaxed);
    let mut bad = 0;
    for p in 0..pages {
        let v = EXPECTED.get(p as usize).map_or(0, |e| e.load(Ordering::Acquire));
        if !page_ok(p, v) {
            bad += 1;
        }
    }
    if was {
        RUNNING.store(true, Ordering::Release);
    }
    (pages, bad, WRITES.load(Ordering::Relaxed))
}

/// Whether the workload runs.
pub fn running() -> bool {
    RUNNING.load(Ordering::Relaxed)
}
