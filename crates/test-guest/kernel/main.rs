// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! test-guest: a tiny x86-64 guest kernel that behaves like an OS where CPU hotplug tests need it.
//!
//! Built by `crates/test-guest/build.rs` with the host toolchain: `#![no_std]`, panic=abort,
//! no red zone, SSE disabled (this project's KVM emulates CPL0 code and cannot execute SSE
//! arithmetic), linked at 1 MiB by `linker.ld`. The serial line protocol is documented in
//! `crates/test-guest/README.md`.

#![no_std]
#![no_main]
#![allow(clippy::missing_safety_doc)]

mod acpi;
mod apic;
mod arch;
mod dirty;
mod hotplug;

use core::ptr::addr_of;
use core::ptr::addr_of_mut;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

core::arch::global_asm!(include_str!("boot.S"), options(att_syntax));

/// Largest number of CPUs the guest tracks (MADT entries beyond this are ignored).
pub const MAX_CPUS: usize = 512;
/// Bound on MADT entries walked.
pub const MAX_PRESENT_SCAN: usize = 4096;

const COM1: u16 = 0x3f8;
const AP_TRAMPOLINE_ADDR: u64 = 0x8000;
const STACK_SIZE: u64 = 16384;
/// BSP timer ticks to wait for an AP to come online or go offline (10 ms each). 10 s: on
/// nested KVM (kvm-amd inside QEMU TCG) an AP's thread can wait seconds for an L1 CPU, and
/// the host side gives up after 30 s anyway.
const WAIT_TICKS: u64 = 1000;

// CPU states as seen by the guest.
const ST_ABSENT: u32 = 0;
const ST_STOPPED: u32 = 1; // present, never started (waiting for INIT/SIPI)
const ST_BOOTING: u32 = 2;
const ST_ONLINE: u32 = 3;
const ST_OFFLINE: u32 = 4; // offlined: APIC SW-disabled, cli;hlt
const ST_FAILED: u32 = 5;

fn state_name(s: u32) -> &'static str {
    match s {
        ST_ABSENT => "absent",
        ST_STOPPED => "stopped",
        ST_BOOTING => "booting",
        ST_ONLINE => "online",
        ST_OFFLINE => "offline",
        _ => "failed",
    }
}

/// Per-CPU block; GS base points at it and its first word holds its own address.
#[repr(C, align(64))]
pub struct PerCpu {
    this: AtomicU64,
    index: AtomicU64,
    apic_id: AtomicU32,
    state: AtomicU32,
    ticks: AtomicU64,
    offline_req: AtomicBool,
    /// TSC at the last timer tick (0: not ticking yet since it came online).
    last_tsc: AtomicU64,
    /// Longest TSC interval between two ticks since the last `resetgaps`.
    max_gap: AtomicU64,
}

impl PerCpu {
    const fn new() -> Self {
        PerCpu {
            this: AtomicU64::new(0),
            index: AtomicU64::new(0),
            apic_id: AtomicU32::new(0),
            state: AtomicU32::new(ST_ABSENT),
            ticks: AtomicU64::new(0),
            offline_req: AtomicBool::new(false),
            last_tsc: AtomicU64::new(0),
            max_gap: AtomicU64::new(0),
        }
    }
}

static PERCPU: [PerCpu; MAX_CPUS] = [const { PerCpu::new() }; MAX_CPUS];
static NCPUS: AtomicU64 = AtomicU64::new(0);
static BSP_INDEX: AtomicU64 = AtomicU64::new(0);
static BSP_APIC_ID: AtomicU32 = AtomicU32::new(0);
/// TSC when the BSP's timer started (to convert TSC intervals into time).
static TSC0: AtomicU64 = AtomicU64::new(0);
static mut ACPI: acpi::AcpiInfo = acpi::AcpiInfo::empty();
static mut IDT: [u64; 512] = [0; 512];
static mut LINE: [u8; 128] = [0; 128];
static mut LINE_LEN: usize = 0;

extern "C" {
    static boot_params_ptr: u64;
    static pvh_start_info: u64;
    static mut ap_boot_stack: u64;
    static mut ap_boot_percpu: u64;
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static bsp_stack_top: u8;
    static exc_stubs: u8;
    fn isr_timer();
    fn isr_wakeup();
    fn isr_spurious();
    fn isr_sci();
}

// ---------------------------------------------------------------- console output

/// One byte to COM1; a line ends in CR LF, as a serial terminal (screen on a pty) expects.
fn putc(c: u8) {
    if c == b'\n' {
        arch::outb(COM1, b'\r');
    }
    arch::outb(COM1, c);
}

fn puts(s: &str) {
    for &b in s.as_bytes() {
        putc(b);
    }
}

fn putdec(mut v: u64) {
    // Largest power of ten not above v, then digits from the top (no buffer, no indexing).
    let mut div = 1u64;
    while v / div >= 10 {
        div *= 10;
    }
    loop {
        putc(b'0' + (v / div) as u8);
        v %= div;
        if div == 1 {
            break;
        }
        div /= 10;
    }
}

fn puthex(v: u64) {
    puts("0x");
    let mut started = false;
    let mut shift = 60i32;
    while shift >= 0 {
        let d = ((v >> shift) & 0xf) as u8;
        if d != 0 || started || shift == 0 {
            started = true;
            putc(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        }
        shift -= 4;
    }
}

// ---------------------------------------------------------------- interrupts

fn set_gate(vec: usize, handler: u64) {
    let lo = (handler & 0xffff) | (0x08u64 << 16) | (0x8e00u64 << 32) | (((handler >> 16) & 0xffff) << 48);
    let hi = handler >> 32;
    // SAFETY: only the BSP writes the IDT, before any AP starts.
    unsafe {
        let idt = &mut *addr_of_mut!(IDT);
        if let Some(e) = idt.get_mut(vec * 2..vec * 2 + 2) {
            e.copy_from_slice(&[lo, hi]);
        }
    }
}

fn load_idt() {
    #[repr(C, packed)]
    struct Idtr {
        limit: u16,
        base: u64,
    }
    let idtr = Idtr {
        limit: (256 * 16 - 1) as u16,
        base: addr_of!(IDT) as u64,
    };
    // SAFETY: the IDT is a static that lives forever.
    unsafe { core::arch::asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags)) }
}

fn setup_idt() {
    let stubs = addr_of!(exc_stubs) as u64;
    for v in 0..32 {
        set_gate(v, stubs + 16 * v as u64);
    }
    set_gate(apic::VEC_TIMER as usize, isr_timer as *const () as u64);
    set_gate(apic::VEC_WAKEUP as usize, isr_wakeup as *const () as u64);
    set_gate(apic::VEC_SPURIOUS as usize, isr_spurious as *const () as u64);
    set_gate(hotplug::VEC_SCI as usize, isr_sci as *const () as u64);
}

fn this_cpu() -> &'static PerCpu {
    // SAFETY: GS base always points at this CPU's entry of PERCPU once it runs Rust code.
    unsafe { &*(arch::gs_base() as *const PerCpu) }
}

#[no_mangle]
extern "C" fn timer_interrupt() {
    let c = this_cpu();
    // Only this CPU writes its own counter: a plain load/store pair suffices.
    c.ticks
        .store(c.ticks.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    let now = arch::rdtsc();
    let last = c.last_tsc.load(Ordering::Relaxed);
    if last != 0 && now > last && now - last > c.max_gap.load(Ordering::Relaxed) {
        c.max_gap.store(now - last, Ordering::Relaxed);
    }
    c.last_tsc.store(now, Ordering::Relaxed);
    dirty::tick();
    apic::eoi();
}

#[no_mangle]
extern "C" fn sci_interrupt() {
    hotplug::on_sci();
    apic::eoi();
}

#[no_mangle]
extern "C" fn wakeup_interrupt() {
    apic::eoi();
}

#[no_mangle]
extern "C" fn exception_handler(frame: *const u64) {
    // SAFETY: the stub passes a pointer to [vector, error, rip, cs, rflags, rsp, ss].
    let (vec, err, rip) = unsafe { (*frame, *frame.add(1), *frame.add(2)) };
    puts("EXCEPTION vector=");
    putdec(vec);
    puts(" error=");
    puthex(err);
    puts(" rip=");
    puthex(rip);
    puts(" apic_id=");
    putdec(u64::from(apic::id()));
    puts("\n");
    arch::hlt_forever_irqs_off();
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    puts("PANIC");
    if let Some(loc) = info.location() {
        puts(" at ");
        puts(loc.file());
        puts(":");
        putdec(u64::from(loc.line()));
    }
    puts("\n");
    arch::hlt_forever_irqs_off();
}

// ---------------------------------------------------------------- SMP

fn ncpus() -> usize {
    NCPUS.load(Ordering::Relaxed) as usize
}

/// CPU `i`'s block; out-of-range indices map to nothing (no panicking index operations in
/// the guest: core's panic formatting uses SSE, see the forbidden-instruction test).
fn cpu(i: usize) -> Option<&'static PerCpu> {
    PERCPU.get(i)
}

fn bsp_ticks() -> u64 {
    cpu(BSP_INDEX.load(Ordering::Relaxed) as usize).map_or(0, |c| c.ticks.load(Ordering::Relaxed))
}

/// Halt the BSP until `done()` holds or `WAIT_TICKS` of its timer ticks passed.
fn wait_until(done: impl Fn() -> bool) -> bool {
    let start = bsp_ticks();
    loop {
        // Check with interrupts masked, then `sti; hlt`: a wake-up cannot slip in between.
        arch::cli();
        if done() {
            arch::sti();
            return true;
        }
        if bsp_ticks().wrapping_sub(start) > WAIT_TICKS {
            arch::sti();
            return false;
        }
        arch::sti_hlt();
    }
}

/// Start CPU `i` the way Linux does on x86: INIT assert, INIT deassert, SIPI, SIPI.
fn boot_cpu(i: usize) -> bool {
    let Some(c) = cpu(i) else { return false };
    let apic_id = c.apic_id.load(Ordering::Relaxed);
    c.offline_req.store(false, Ordering::SeqCst);
    c.state.store(ST_BOOTING, Ordering::SeqCst);
    // SAFETY: the mailbox is read by the one AP being started; the BSP starts one at a time.
    unsafe {
        let top = addr_of!(bsp_stack_top) as u64 + (i as u64 + 1) * STACK_SIZE;
        *addr_of_mut!(ap_boot_stack) = top;
        *addr_of_mut!(ap_boot_percpu) = c as *const PerCpu as u64;
    }
    let vector = (AP_TRAMPOLINE_ADDR >> 12) as u32;
    apic::send_ipi(
        apic_id,
        apic::ICR_INIT | apic::ICR_LEVEL_ASSERT | apic::ICR_TRIGGER_LEVEL,
    );
    apic::send_ipi(apic_id, apic::ICR_INIT | apic::ICR_TRIGGER_LEVEL);
    apic::send_ipi(apic_id, apic::ICR_STARTUP | vector);
    apic::send_ipi(apic_id, apic::ICR_STARTUP | vector);
    if wait_until(|| c.state.load(Ordering::SeqCst) == ST_ONLINE) {
        true
    } else {
        c.state.store(ST_FAILED, Ordering::SeqCst);
        false
    }
}

/// First Rust code of an application processor (from the trampoline).
#[no_mangle]
extern "C" fn ap_main(pc: *const PerCpu) -> ! {
    arch::set_gs_base(pc as u64);
    load_idt();
    let c = this_cpu();
    c.last_tsc.store(0, Ordering::Relaxed);
    apic::setup_online();
    c.state.store(ST_ONLINE, Ordering::SeqCst);
    apic::send_ipi(BSP_APIC_ID.load(Ordering::Relaxed), u32::from(apic::VEC_WAKEUP));
    loop {
        arch::cli();
        if c.offline_req.load(Ordering::SeqCst) {
            go_offline(c);
        }
        arch::sti_hlt();
    }
}

/// Offline this CPU as Linux does: no more work here, APIC SW-disabled, `cli; hlt` forever.
/// Only INIT (a later `online`) gets it out.
fn go_offline(c: &PerCpu) -> ! {
    apic::sw_disable();
    c.offline_req.store(false, Ordering::SeqCst);
    c.state.store(ST_OFFLINE, Ordering::SeqCst);
    apic::send_ipi(BSP_APIC_ID.load(Ordering::Relaxed), u32::from(apic::VEC_WAKEUP));
    arch::hlt_forever_irqs_off();
}

// ---------------------------------------------------------------- boot

#[no_mangle]
extern "C" fn kmain() -> ! {
    // Mask both 8259s first: KVM resets them unmasked with vector base 0 and the BSP's LVT0
    // in ExtINT, so a PIT tick would otherwise arrive as "exception" 8.
    arch::outb(0x21, 0xff);
    arch::outb(0xa1, 0xff);
    arch::outb(COM1 + 1, 0); // UART: no interrupts, polled
    puts("test-guest: boot\n");

    // SAFETY: set by the entry code before kmain; read-only afterwards.
    let (bp, pvh) = unsafe { (boot_params_ptr, pvh_start_info) };
    let mut hint = 0u64;
    if pvh != 0 && pvh < 0x1_0000_0000 {
        // hvm_start_info: magic 0x336ec578 at 0, rsdp_paddr at 32.
        // SAFETY: identity-mapped RAM handed over by the PVH loader.
        unsafe {
            if core::ptr::read_volatile(pvh as *const u32) == 0x336e_c578 {
                hint = core::ptr::read_volatile((pvh + 32) as *const u64);
            }
        }
    } else if bp != 0 && bp < 0x1_0000_0000 {
        // Linux boot_params: acpi_rsdp_addr at 0x70, setup header magic "HdrS" at 0x202.
        // SAFETY: as above.
        unsafe {
            if core::ptr::read_unaligned((bp + 0x202) as *const u32) == 0x5372_6448 {
                hint = core::ptr::read_unaligned((bp + 0x70) as *const u64);
            }
        }
    }
    // SAFETY: single-threaded here (APs not started yet).
    let info = unsafe { &mut *addr_of_mut!(ACPI) };
    let rsdp = acpi::find_rsdp(hint);
    acpi::parse(info, rsdp);

    apic::choose_mode();
    apic::enable_mode();
    setup_idt();
    load_idt();

    let bsp_id = apic::id();
    BSP_APIC_ID.store(bsp_id, Ordering::Relaxed);
    let mut bsp_index = 0usize;
    if info.ncpus == 0 {
        // No MADT: a uniprocessor machine.
        if let Some(c0) = info.cpus.first_mut() {
            *c0 = acpi::MadtCpu {
                apic_id: bsp_id,
                enabled: true,
            };
            info.ncpus = 1;
        }
    }
    for (i, (c, m)) in PERCPU.iter().zip(info.cpus.iter()).take(info.ncpus).enumerate() {
        c.this.store(c as *const PerCpu as u64, Ordering::Relaxed);
        c.index.store(i as u64, Ordering::Relaxed);
        c.apic_id.store(m.apic_id, Ordering::Relaxed);
        let st = if m.enabled { ST_STOPPED } else { ST_ABSENT };
        c.state.store(st, Ordering::Relaxed);
        if m.apic_id == bsp_id {
            bsp_index = i;
        }
    }
    NCPUS.store(info.ncpus as u64, Ordering::Relaxed);
    BSP_INDEX.store(bsp_index as u64, Ordering::Relaxed);
    let Some(bsp) = cpu(bsp_index) else {
        arch::hlt_forever_irqs_off()
    };
    arch::set_gs_base(bsp as *const PerCpu as u64);
    apic::setup_online();
    TSC0.store(arch::rdtsc(), Ordering::Relaxed);
    bsp.state.store(ST_ONLINE, Ordering::SeqCst);

    // SAFETY: copies the trampoline (a few hundred bytes) to the SIPI page in low RAM.
    unsafe {
        let start = addr_of!(ap_tramp_start);
        let len = addr_of!(ap_tramp_end) as usize - start as usize;
        arch::memcpy(AP_TRAMPOLINE_ADDR as *mut u8, start, len);
    }

    for (i, c) in PERCPU.iter().enumerate().take(ncpus()) {
        if i != bsp_index && c.state.load(Ordering::Relaxed) == ST_STOPPED && !boot_cpu(i) {
            puts("WARN cpu ");
            putdec(i as u64);
            puts(" did not come online\n");
        }
    }

    // CPU hotplug: the register block from the DSDT, the SCI through the IOAPIC, GPE0 bit 2.
    let hp = acpi::find_hotplug_base(info.dsdt);
    hotplug::init(hp, info.gpe0_blk, info.gpe0_len, info.sci, info.ioapic, bsp_id);
    summary("READY");
    puts("\n");
    command_loop();
}

/// `<tag> apic_mode=... possible=N present=N online=N` (no newline).
fn summary(tag: &str) {
    let (present, online) = counts();
    puts(tag);
    puts(" apic_mode=");
    puts(if apic::x2apic() { "x2apic" } else { "xapic" });
    puts(" possible=");
    putdec(ncpus() as u64);
    puts(" present=");
    putdec(present);
    puts(" online=");
    putdec(online);
}

fn counts() -> (u64, u64) {
    let (mut present, mut online) = (0, 0);
    for c in PERCPU.iter().take(ncpus()) {
        let s = c.state.load(Ordering::SeqCst);
        if s != ST_ABSENT {
            present += 1;
        }
        if s == ST_ONLINE {
            online += 1;
        }
    }
    (present, online)
}

// ---------------------------------------------------------------- line protocol

fn command_loop() -> ! {
    loop {
        // Work runs with interrupts enabled (like an OS), so this CPU keeps its own timer
        // ticks while it prints or boots other CPUs.
        arch::sti();
        if hotplug::SCAN_PENDING.swap(false, Ordering::SeqCst) {
            scan();
        }
        // Drain the UART receive buffer (LSR bit 0 = data ready).
        while arch::inb(COM1 + 5) & 1 != 0 {
            let ch = arch::inb(COM1);
            // SAFETY: only the BSP touches the line buffer.
            unsafe {
                let line = &mut *addr_of_mut!(LINE);
                let len = &mut *addr_of_mut!(LINE_LEN);
                match ch {
                    // A terminal's Enter sends CR, a program LF: either ends the line (the
                    // empty line between CR and LF is ignored).
                    b'\n' | b'\r' => {
                        let n = *len;
                        *len = 0;
                        execute(line.get(..n).unwrap_or(&[]));
                    }
                    _ => {
                        if let Some(slot) = line.get_mut(*len) {
                            *slot = ch;
                            *len += 1;
                        }
                    }
                }
            }
        }
        // Sleep until the next tick or interrupt, unless an SCI came in meanwhile.
        arch::cli();
        if !hotplug::SCAN_PENDING.load(Ordering::SeqCst) {
            arch::sti_hlt();
        }
    }
}

fn trim(s: &[u8]) -> &[u8] {
    let mut s = s;
    while let [b' ', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' '] = s {
        s = rest;
    }
    s
}

fn parse_num(s: &[u8]) -> Option<usize> {
    if s.is_empty() || s.len() > 6 {
        return None;
    }
    let mut v = 0usize;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + usize::from(c - b'0');
    }
    Some(v)
}

fn err(msg: &str) {
    puts("ERR ");
    puts(msg);
    puts("\n");
}

fn execute(line: &[u8]) {
    let line = trim(line);
    if line.is_empty() {
        return;
    }
    let mut parts = line.splitn(2, |&c| c == b' ');
    let cmd = parts.next().unwrap_or(&[]);
    let arg = trim(parts.next().unwrap_or(&[]));
    match cmd {
        b"status" => status(),
        b"online" | b"offline" => match parse_num(arg) {
            Some(n) if n < ncpus() => {
                if cmd == b"online" {
                    cmd_online(n)
                } else {
                    cmd_offline(n)
                }
            }
            Some(_) => err("no such cpu"),
            None => err("usage: online|offline <cpu index>"),
        },
        b"poweroff" => poweroff(),
        b"autoonline" => match arg {
            b"on" | b"off" => {
                hotplug::AUTO_ONLINE.store(arg == b"on", Ordering::SeqCst);
                puts("OK\n");
            }
            _ => err("usage: autoonline on|off"),
        },
        b"refuse" => cpu_or_off(arg, &hotplug::REFUSE_REMOVE, "usage: refuse <cpu index>|off"),
        b"ignore" => cpu_or_off(arg, &hotplug::IGNORE_REMOVE, "usage: ignore <cpu index>|off"),
        b"eject" => match parse_num(arg) {
            Some(n) if n < ncpus() => {
                hotplug::eject(n as u32);
                puts("OK\n");
            }
            _ => err("usage: eject <cpu index>"),
        },
        b"gpe" => match arg {
            b"on" | b"off" => {
                hotplug::set_gpe_enabled(arg == b"on");
                puts("OK\n");
            }
            _ => err("usage: gpe on|off"),
        },
        b"scan" => {
            scan();
            puts("OK\n");
        }
        b"resetgaps" => {
            for c in PERCPU.iter().take(ncpus()) {
                c.max_gap.store(0, Ordering::Relaxed);
            }
            puts("OK\n");
        }
        b"dirty" => cmd_dirty(arg),
        b"triple-fault" => triple_fault(),
        b"help" => {
            puts("commands: status | online N | offline N | eject N | refuse N|off | ignore N|off | autoonline on|off | gpe on|off | scan | resetgaps | dirty start N|stop|check | poweroff | triple-fault | help\nOK\n");
        }
        _ => err("unknown command"),
    }
}

/// `N` (a CPU index) or `off` into `flag` (`u32::MAX`: off).
fn cpu_or_off(arg: &[u8], flag: &AtomicU32, usage: &str) {
    match (arg, parse_num(arg)) {
        (b"off", _) => flag.store(u32::MAX, Ordering::SeqCst),
        (_, Some(n)) if n < ncpus() => flag.store(n as u32, Ordering::SeqCst),
        _ => return err(usage),
    }
    puts("OK\n");
}

fn cmd_dirty(arg: &[u8]) {
    let mut parts = arg.splitn(2, |&c| c == b' ');
    let sub = parts.next().unwrap_or(&[]);
    match sub {
        b"start" => match parse_num(trim(parts.next().unwrap_or(&[]))) {
            Some(n) if dirty::start(n) => puts("OK\n"),
            _ => err("usage: dirty start <pages 1..4096>"),
        },
        b"stop" => {
            dirty::stop();
            puts("OK\n");
        }
        b"check" => {
            let (pages, bad, writes) = dirty::check();
            puts(if bad == 0 { "OK dirty" } else { "ERR dirty" });
            puts(" pages=");
            putdec(pages);
            puts(" bad=");
            putdec(bad);
            puts(" writes=");
            putdec(writes);
            puts(" running=");
            putdec(u64::from(dirty::running()));
            puts("\n");
        }
        _ => err("usage: dirty start N | stop | check"),
    }
}

fn status() {
    summary("STATUS");
    puts(" bsp=");
    putdec(BSP_INDEX.load(Ordering::Relaxed));
    puts(" hotplug_port=");
    puthex(u64::from(hotplug::base()));
    puts(" sci=");
    putdec(hotplug::SCI_COUNT.load(Ordering::Relaxed));
    puts(" inserts=");
    putdec(hotplug::INSERTS.load(Ordering::Relaxed));
    puts(" ejects=");
    putdec(hotplug::EJECTS.load(Ordering::Relaxed));
    puts(" autoonline=");
    putdec(u64::from(hotplug::AUTO_ONLINE.load(Ordering::Relaxed)));
    puts("\n");
    for (i, c) in PERCPU.iter().enumerate().take(ncpus()) {
        let s = c.state.load(Ordering::SeqCst);
        puts("CPU ");
        putdec(i as u64);
        puts(" apic_id=");
        putdec(u64::from(c.apic_id.load(Ordering::Relaxed)));
        puts(" state=");
        puts(state_name(s));
        puts(" ticks=");
        putdec(c.ticks.load(Ordering::Relaxed));
        puts(" maxgap_us=");
        putdec(gap_us(c.max_gap.load(Ordering::Relaxed)));
        puts("\n");
    }
    puts("OK\n");
}

fn cmd_online(n: usize) {
    let Some(c) = cpu(n) else {
        return err("no such cpu");
    };
    match c.state.load(Ordering::SeqCst) {
        ST_ONLINE => err("cpu already online"),
        ST_ABSENT => err("cpu not present"),
        _ => {
            if boot_cpu(n) {
                puts("OK\n");
            } else {
                err("cpu did not come online");
            }
        }
    }
}

fn offline_cpu(n: usize) -> Result<(), &'static str> {
    if n == BSP_INDEX.load(Ordering::Relaxed) as usize {
        return Err("cannot offline the boot cpu");
    }
    let Some(c) = cpu(n) else {
        return Err("no such cpu");
    };
    if c.state.load(Ordering::SeqCst) != ST_ONLINE {
        return Err("cpu not online");
    }
    c.offline_req.store(true, Ordering::SeqCst);
    // Kick it out of HLT so it notices at once rather than at its next tick.
    apic::send_ipi(c.apic_id.load(Ordering::Relaxed), u32::from(apic::VEC_WAKEUP));
    if wait_until(|| c.state.load(Ordering::SeqCst) == ST_OFFLINE) {
        Ok(())
    } else {
        Err("cpu did not go offline")
    }
}

fn cmd_offline(n: usize) {
    match offline_cpu(n) {
        Ok(()) => puts("OK\n"),
        Err(e) => err(e),
    }
}

/// TSC interval -> microseconds, from the BSP's own tick rate (10 ms per tick).
fn gap_us(tsc: u64) -> u64 {
    let ticks = bsp_ticks().max(1);
    let per_tick = (arch::rdtsc().saturating_sub(TSC0.load(Ordering::Relaxed)) / ticks).max(1);
    tsc.saturating_mul(10_000) / per_tick
}

/// What CSCN does, done on the registers: take every pending event, react like Linux, `_OST`.
/// A CPU can hold an insert and a removal at once, so one GPE can stand for two events per
/// CPU; the scan runs until the device reports none. Its bound only guards against a device
/// that never stops reporting: on reaching it the main loop scans again, nothing is dropped.
fn scan() {
    for _ in 0..2 * ncpus() + 1 {
        match hotplug::next_event() {
            Some(hotplug::Event::Insert(uid)) => {
                let Some(c) = cpu(uid as usize) else {
                    hotplug::insert_done(uid, false);
                    continue;
                };
                let _ = c
                    .state
                    .compare_exchange(ST_ABSENT, ST_STOPPED, Ordering::SeqCst, Ordering::SeqCst);
                let auto = hotplug::AUTO_ONLINE.load(Ordering::SeqCst);
                let ok = if auto && c.state.load(Ordering::SeqCst) != ST_ONLINE {
                    boot_cpu(uid as usize)
                } else {
                    true
                };
                hotplug::insert_done(uid, ok);
                puts("EVENT insert cpu=");
                putdec(u64::from(uid));
                puts(" online=");
                putdec(u64::from(c.state.load(Ordering::SeqCst) == ST_ONLINE));
                puts("\n");
            }
            Some(hotplug::Event::Remove(uid)) if hotplug::IGNORE_REMOVE.load(Ordering::SeqCst) == uid => {
                puts("EVENT remove cpu=");
                putdec(u64::from(uid));
                puts(" ignored\n");
            }
            Some(hotplug::Event::Remove(uid)) => {
                let idx = uid as usize;
                let refused = hotplug::REFUSE_REMOVE.load(Ordering::SeqCst) == uid;
                let gone = match cpu(idx) {
                    Some(_) if refused => false,
                    Some(c) if idx != BSP_INDEX.load(Ordering::Relaxed) as usize => {
                        c.state.load(Ordering::SeqCst) != ST_ONLINE || offline_cpu(idx).is_ok()
                    }
                    _ => false,
                };
                hotplug::remove_done(uid, gone);
                if gone {
                    if let Some(c) = cpu(idx) {
                        c.state.store(ST_ABSENT, Ordering::SeqCst);
                    }
                }
                puts("EVENT remove cpu=");
                putdec(u64::from(uid));
                puts(" ejected=");
                putdec(u64::from(gone));
                puts("\n");
            }
            None => return,
        }
    }
    hotplug::SCAN_PENDING.store(true, Ordering::SeqCst);
}

fn poweroff() {
    // SAFETY: ACPI info is written once at boot.
    let info = unsafe { &*addr_of!(ACPI) };
    if !info.found_fadt || info.pm1a_cnt == 0 {
        return err("no FADT PM1a control block");
    }
    let typ = if info.dsdt != 0 {
        acpi::find_s5(info.dsdt)
    } else {
        0
    };
    puts("OK poweroff\n");
    // SLP_TYP in bits 10..12, SLP_EN bit 13.
    arch::outw(info.pm1a_cnt, ((typ & 7) << 10) | (1 << 13));
    // The VMM tears the VM down asynchronously; report only if we are still here after ~1 s.
    wait_until(|| false);
    err("poweroff did not happen");
}

/// The precompiled `core` references the unwinding personality even with panic=abort; it is
/// never called because nothing unwinds.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// Test hook: load an empty IDT and raise #UD. #UD cannot be delivered (#GP), nor can #GP
/// (#DF), nor #DF: the CPU shuts down (a triple fault), which the VMM must report.
fn triple_fault() {
    puts("OK triple-fault\n");
    #[repr(C, packed)]
    struct Idtr {
        limit: u16,
        base: u64,
    }
    let idtr = Idtr { limit: 0, base: 0 };
    // SAFETY: deliberately makes this CPU unusable; that is the point of the command.
    unsafe { core::arch::asm!("cli", "lidt [{}]", "ud2", in(reg) &idtr, options(noreturn)) }
}
