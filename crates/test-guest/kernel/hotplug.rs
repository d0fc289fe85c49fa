// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guest side of ACPI CPU hotplug, done directly on the registers (no AML interpreter):
//! the SCI through the IOAPIC, GPE0 bit 2, and the scan that the DSDT's CSCN performs, with
//! Linux-like reactions: inserted CPUs are onlined (INIT/SIPI/SIPI) when auto-online is on,
//! CPUs asked to go are offlined and then ejected, and every event is answered with `_OST`.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::arch::{inb, inl, outb, outl, read_volatile_u32, write_volatile_u32};

/// IDT vector of the SCI.
pub const VEC_SCI: u8 = 0x30;
const GPE_CPU_HOTPLUG: u8 = 1 << 2;

// ACPI _OST source events and status codes.
const OST_DEVICE_CHECK: u32 = 0x01;
const OST_EJECT_REQUEST: u32 = 0x03;
const OST_SUCCESS: u32 = 0x00;
const OST_FAILURE: u32 = 0x01;
/// What Linux reports when it cannot offline a CPU it is asked to eject (-EBUSY).
const OST_EJECT_DEVICE_BUSY: u32 = 0x82;

static BASE: AtomicU32 = AtomicU32::new(0);
static GPE0: AtomicU32 = AtomicU32::new(0);
static GPE0_HALF: AtomicU32 = AtomicU32::new(0);
pub static SCAN_PENDING: AtomicBool = AtomicBool::new(false);
pub static SCI_COUNT: AtomicU64 = AtomicU64::new(0);
pub static AUTO_ONLINE: AtomicBool = AtomicBool::new(true);
/// A CPU whose removal the guest refuses (`refuse N`; u32::MAX: none), as Linux does for a CPU
/// it cannot offline.
pub static REFUSE_REMOVE: AtomicU32 = AtomicU32::new(u32::MAX);
/// The CPU whose removal events are taken and then ignored (no eject, no `_OST`), as an OS
/// without eject support or one that lost the event would (`u32::MAX`: none).
pub static IGNORE_REMOVE: AtomicU32 = AtomicU32::new(u32::MAX);
pub static INSERTS: AtomicU64 = AtomicU64::new(0);
pub static EJECTS: AtomicU64 = AtomicU64::new(0);

pub fn base() -> u16 {
    BASE.load(Ordering::Relaxed) as u16
}

fn ioapic_write(ioapic: u64, reg: u32, val: u32) {
    write_volatile_u32(ioapic, reg);
    write_volatile_u32(ioapic + 0x10, val);
}

fn ioapic_read(ioapic: u64, reg: u32) -> u32 {
    write_volatile_u32(ioapic, reg);
    read_volatile_u32(ioapic + 0x10)
}

/// Route the SCI (level, active high) to `bsp_apic_id` and enable GPE0 bit 2, if the platform
/// has a CPU hotplug block. Returns whether hotplug is available.
pub fn init(base: u16, gpe0: u16, gpe0_len: u8, sci: u16, ioapic: u64, bsp_apic_id: u32) -> bool {
    if base == 0 || gpe0 == 0 || gpe0_len < 2 {
        return false;
    }
    BASE.store(u32::from(base), Ordering::Relaxed);
    // What the AML `_INI` of QEMU's DSDT does: write 0 to the selector. Before late 2025 QEMU
    // starts the block in a legacy layout (a present-CPU bitmap) and a zero written at offset
    // 0 switches it to the modern interface; QEMU before 8.0 takes only byte accesses there.
    // For any other implementation this only selects CPU 0.
    outb(base, 0);
    GPE0.store(u32::from(gpe0), Ordering::Relaxed);
    let half = u32::from(gpe0_len / 2);
    GPE0_HALF.store(half, Ordering::Relaxed);
    // Redirection entry for the SCI's GSI: vector, fixed, physical, active high, level.
    let gsi = u32::from(sci);
    let max = (ioapic_read(ioapic, 1) >> 16) & 0xff;
    if gsi <= max {
        ioapic_write(ioapic, 0x11 + 2 * gsi, (bsp_apic_id & 0xff) << 24);
        ioapic_write(ioapic, 0x10 + 2 * gsi, u32::from(VEC_SCI) | (1 << 15));
    }
    // Clear stale status, then enable the CPU hotplug GPE (Linux does this when it finds _E02).
    outb(gpe0, 0xff);
    outb(gpe0 + half as u16, GPE_CPU_HOTPLUG);
    // An event raised before the GPE was enabled is still pending: look at once.
    SCAN_PENDING.store(true, Ordering::SeqCst);
    true
}

/// Enable or disable the CPU hotplug GPE. Events raised while it is off stay pending in
/// GPE0_STS; enabling it then asserts the (level) SCI at once. Off also drops a scan an SCI
/// asked for: a scan polls the device, so it can take an event before that event's SCI is
/// handled, and the late SCI leaves a scan pending that would take events raised after
/// `gpe off` (seen under load); [`on_sci`] ignores SCIs while the GPE is off. No event is
/// seen while the GPE is off; on looks at once.
pub fn set_gpe_enabled(on: bool) {
    let gpe0 = GPE0.load(Ordering::Relaxed) as u16;
    if gpe0 != 0 {
        outb(
            gpe0 + GPE0_HALF.load(Ordering::Relaxed) as u16,
            if on { GPE_CPU_HOTPLUG } else { 0 },
        );
        SCAN_PENDING.store(on, Ordering::SeqCst);
    }
}

/// SCI handler body (BSP): acknowledge GPE 2 and leave the scan to the main loop. An SCI
/// while GPE 2 is disabled (one KVM injected late, after `gpe off`) leaves its status set
/// for `gpe on`, as an OS handles only the GPEs it enabled.
pub fn on_sci() {
    SCI_COUNT.fetch_add(1, Ordering::Relaxed);
    let gpe0 = GPE0.load(Ordering::Relaxed) as u16;
    let half = GPE0_HALF.load(Ordering::Relaxed) as u16;
    if gpe0 != 0 && inb(gpe0 + half) & GPE_CPU_HOTPLUG == 0 {
        return;
    }
    if gpe0 != 0 && inb(gpe0) & GPE_CPU_HOTPLUG != 0 {
        outb(gpe0, GPE_CPU_HOTPLUG); // write 1 to clear
        SCAN_PENDING.store(true, Ordering::SeqCst);
    }
}

fn select(uid: u32) {
    outl(base(), uid);
}

/// `_OST(event, status)` for CPU `uid`.
fn ost(uid: u32, event: u32, status: u32) {
    let b = base();
    select(uid);
    outb(b + 5, 1);
    outl(b + 8, event);
    outb(b + 5, 2);
    outl(b + 8, status);
}

/// Ask the device to eject CPU `uid` (the VMM's guard decides).
pub fn eject(uid: u32) {
    select(uid);
    outb(base() + 4, 1 << 3);
}

/// What the scan found for one CPU.
pub enum Event {
    Insert(u32),
    Remove(u32),
}

/// One step of CSCN: select the next CPU with an event and acknowledge it.
pub fn next_event() -> Option<Event> {
    let b = base();
    if b == 0 {
        return None;
    }
    outb(b + 5, 0); // command 0: next CPU with an event
    let sel = inl(b + 8);
    let flags = inb(b + 4);
    if flags & 2 != 0 {
        outb(b + 4, 2);
        Some(Event::Insert(sel))
    } else if flags & 4 != 0 {
        outb(b + 4, 4);
        Some(Event::Remove(sel))
    } else {
        None
    }
}

/// Report the outcome of an insert.
pub fn insert_done(uid: u32, ok: bool) {
    INSERTS.fetch_add(1, Ordering::Relaxed);
    ost(uid, OST_DEVICE_CHECK, if ok { OST_SUCCESS } else { OST_FAILURE });
}

/// Eject `uid` after it went offline, and report it; or report that it cannot go.
pub fn remove_done(uid: u32, offlined: bool) {
    if offlined {
        eject(uid);
        EJECTS.fetch_add(1, Ordering::Relaxed);
        ost(uid, OST_EJECT_REQUEST, OST_SUCCESS);
    } else {
        ost(uid, OST_EJECT_REQUEST, OST_EJECT_DEVICE_BUSY);
    }
}
