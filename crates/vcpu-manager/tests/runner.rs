// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The vCPU runner on the real /dev/kvm, with a few bytes of real-mode guest code: no exit is
//! lost when a pause lands in the middle of a `rep outsb`, a panicking exit handler hands the
//! fd back, and stopping a thread stuck in its handler returns within a bound.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VcpuExit;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vcpu_manager::{ExitAction, ExitHandler, VcpuExitReason, VcpuRunner};

mod common;
use common::kvm_or_skip;

const RAM: usize = 0x10000;
const CODE: u64 = 0x1000;
const DATA: usize = 0x2000;
const LEN: usize = 0x8000;

/// Guest RAM at 0 (anonymous, never freed: the VM outlives nothing here but the test).
fn vm_with_ram(kvm: &Kvm, code: &[u8]) -> (VmFd, VcpuFd) {
    let vm = kvm.create_vm().unwrap();
    // SAFETY: a fresh anonymous private mapping; KVM is given its address and length.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            RAM,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(mem, libc::MAP_FAILED);
    // SAFETY: `mem` is RAM bytes long and writable; code and data fit below it.
    let ram = unsafe { std::slice::from_raw_parts_mut(mem.cast::<u8>(), RAM) };
    ram[CODE as usize..CODE as usize + code.len()].copy_from_slice(code);
    for (i, b) in ram[DATA..DATA + LEN].iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: RAM as u64,
        userspace_addr: mem as u64,
        flags: 0,
    };
    // SAFETY: the region is a live mapping of RAM bytes that is never unmapped.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let fd = vm.create_vcpu(0).unwrap();
    let mut sregs = fd.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    fd.set_sregs(&sregs).unwrap();
    let mut regs = fd.get_regs().unwrap();
    regs.rip = CODE;
    regs.rflags = 2;
    fd.set_regs(&regs).unwrap();
    (vm, fd)
}

/// Collects what the guest writes to port 0x80 and to MMIO; port 0x81 says it is done.
#[derive(Default)]
struct Collect {
    bytes: Mutex<Vec<u8>>,
    mmio: Mutex<Vec<(u64, Vec<u8>)>>,
    done: AtomicBool,
    stopped: Mutex<Option<VcpuExitReason>>,
    panic_on: Option<u16>,
    block: Mutex<Option<mpsc::Receiver<()>>>,
    /// What `vcpu_thread_started` answers; the name of the thread it ran on.
    setup: Option<Result<(), String>>,
    setup_thread: Mutex<Option<String>>,
    /// What `pio_write` answers per port (default: continue).
    actions: Mutex<std::collections::HashMap<u16, ExitAction>>,
    /// Exits `other_exit` received.
    others: Mutex<Vec<String>>,
}

impl ExitHandler for Collect {
    fn pio_read(&self, _: u16, data: &mut [u8]) -> ExitAction {
        data.fill(0xff);
        ExitAction::Continue
    }
    fn pio_write(&self, port: u16, data: &[u8]) -> ExitAction {
        if Some(port) == self.panic_on {
            panic!("handler bug on port {port:#x}");
        }
        // Taken out first: the lock is not held while blocking (the test watches it).
        let block = self.block.lock().unwrap().take();
        if let Some(rx) = block {
            let _ = rx.recv_timeout(Duration::from_secs(30));
        }
        match port {
            0x80 => self.bytes.lock().unwrap().extend_from_slice(data),
            0x81 => self.done.store(true, Ordering::SeqCst),
            _ => {}
        }
        self.actions
            .lock()
            .unwrap()
            .get(&port)
            .cloned()
            .unwrap_or_default()
    }
    fn mmio_read(&self, _: u64, data: &mut [u8]) -> ExitAction {
        data.fill(0xff);
        ExitAction::Continue
    }
    fn mmio_write(&self, addr: u64, data: &[u8]) -> ExitAction {
        self.mmio.lock().unwrap().push((addr, data.to_vec()));
        ExitAction::Continue
    }
    fn other_exit(&self, _: u32, exit: VcpuExit<'_>) -> ExitAction {
        self.others.lock().unwrap().push(format!("{exit:?}"));
        ExitAction::Continue
    }
    fn vcpu_stopped(&self, _: u32, reason: &VcpuExitReason) {
        *self.stopped.lock().unwrap() = Some(reason.clone());
    }
    fn vcpu_thread_started(&self, _: u32) -> Result<(), vcpu_manager::ThreadSetupError> {
        *self.setup_thread.lock().unwrap() = std::thread::current().name().map(String::from);
        Ok(self.setup.clone().unwrap_or(Ok(()))?)
    }
}

/// mov si, DATA; mov cx, LEN; mov dx, 0x80; cld; rep outsb; mov dx, 0x81; out dx, al; jmp $
const REP_OUTSB: [u8; 17] = [
    0xbe, 0x00, 0x20, 0xb9, 0x00, 0x80, 0xba, 0x80, 0x00, 0xfc, 0xf3, 0x6e, 0xba, 0x81, 0x00, 0xee, 0xeb,
];

fn rep_outsb_code() -> Vec<u8> {
    let mut c = REP_OUTSB.to_vec();
    c.push(0xfe);
    c
}

#[test]
fn pauses_in_the_middle_of_a_rep_outsb_lose_no_byte() {
    let Some(kvm) = kvm_or_skip("pauses_in_the_middle_of_a_rep_outsb_lose_no_byte") else {
        return;
    };
    let (_vm, fd) = vm_with_ram(&kvm, &rep_outsb_code());
    let h = Arc::new(Collect::default());
    let r = VcpuRunner::spawn(0, fd, h.clone()).unwrap();
    // Pause and resume as fast as possible while the guest streams 32 KiB, one exit per page:
    // a pause that lands on one of those exits must deliver the exits its completion makes.
    // Bounded by progress, not by total time: under nested TCG with a loaded host the stream
    // took over 60 s (CI, 6.1), yet a minute without a single new byte means it is wedged.
    let mut pauses = 0;
    let mut progress = (0usize, Instant::now());
    while !h.done.load(Ordering::SeqCst) {
        let so_far = h.bytes.lock().unwrap().len();
        if so_far != progress.0 {
            progress = (so_far, Instant::now());
        }
        assert!(
            progress.1.elapsed() < Duration::from_secs(60),
            "no byte for 60 s: {so_far} bytes, {pauses} pauses"
        );
        r.request_pause();
        assert!(r.wait_paused(Duration::from_secs(5)));
        pauses += 1;
        r.resume();
        // Let the guest run a moment between pauses.
        std::thread::sleep(Duration::from_micros(100));
    }
    let got = h.bytes.lock().unwrap().clone();
    let want: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    assert_eq!(got.len(), LEN, "bytes after {pauses} pauses");
    assert!(got == want, "the bytes arrived out of order or changed");
    assert!(r.stop_and_join().is_some());
}

/// mov ax, 0x1000; mov ds, ax; mov eax, 0x00000001; l: mov [0x0ffe], eax; inc eax; jmp l
/// A 4-byte write at 0x10ffe (no RAM there: MMIO) straddles a page: KVM splits it into two
/// fragments, and the second one is an exit of the first one's completion.
const SPLIT_MMIO: [u8; 22] = [
    0xb8, 0x00, 0x10, 0x8e, 0xd8, 0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x66, 0xa3, 0xfe, 0x0f, 0x66, 0x40,
    0xeb, 0xf8, 0x90, 0x90, 0x90,
];

#[test]
fn pauses_between_the_halves_of_a_split_mmio_write_lose_neither() {
    let Some(kvm) = kvm_or_skip("pauses_between_the_halves_of_a_split_mmio_write_lose_neither") else {
        return;
    };
    let (_vm, fd) = vm_with_ram(&kvm, &SPLIT_MMIO);
    let h = Arc::new(Collect::default());
    let r = VcpuRunner::spawn(0, fd, h.clone()).unwrap();
    // Bounded by progress, like the rep outsb test: a minute without a new exit is a wedge.
    let mut pauses = 0;
    let mut progress = (0usize, Instant::now());
    while h.mmio.lock().unwrap().len() < 2000 {
        let so_far = h.mmio.lock().unwrap().len();
        if so_far != progress.0 {
            progress = (so_far, Instant::now());
        }
        assert!(
            progress.1.elapsed() < Duration::from_secs(60),
            "no MMIO exit for 60 s: {so_far} after {pauses} pauses"
        );
        r.request_pause();
        assert!(r.wait_paused(Duration::from_secs(5)));
        pauses += 1;
        r.resume();
        std::thread::sleep(Duration::from_micros(100));
    }
    r.request_pause();
    assert!(r.wait_paused(Duration::from_secs(5)));
    let got = h.mmio.lock().unwrap().clone();
    // Each value arrives as its two halves in order, and the values count up without a gap.
    for (want, pair) in (1u32..).zip(got.chunks_exact(2)) {
        let v = want.to_le_bytes();
        assert_eq!(
            (pair[0].0, &pair[0].1[..], pair[1].0, &pair[1].1[..]),
            (0x10ffe, &v[..2], 0x11000, &v[2..]),
            "value {want} after {pauses} pauses"
        );
    }
    assert!(r.stop_and_join().is_some());
}

#[test]
fn a_panicking_exit_handler_hands_the_fd_back() {
    let Some(kvm) = kvm_or_skip("a_panicking_exit_handler_hands_the_fd_back") else {
        return;
    };
    let (_vm, fd) = vm_with_ram(&kvm, &rep_outsb_code());
    let h = Arc::new(Collect {
        panic_on: Some(0x80),
        ..Default::default()
    });
    let r = VcpuRunner::spawn(0, fd, h.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !r.is_finished() {
        assert!(Instant::now() < deadline, "the thread never ended");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Joined first: the thread reports to the handler after it marks itself ended.
    let fd = r.stop_and_join().expect("the fd comes back for reuse");
    assert!(fd.get_regs().is_ok());
    let reason = h.stopped.lock().unwrap().clone();
    assert!(
        matches!(&reason, Some(VcpuExitReason::Panicked(m)) if m.contains("handler bug on port 0x80")),
        "{reason:?}"
    );
}

/// The per-thread setup hook runs on the vCPU's own thread before the vCPU does; when it
/// fails, the vCPU never runs and the fd comes back.
#[test]
fn the_thread_setup_hook_runs_first_and_its_failure_stops_the_vcpu() {
    let Some(kvm) = kvm_or_skip("the_thread_setup_hook_runs_first_and_its_failure_stops_the_vcpu") else {
        return;
    };
    let (_vm, fd) = vm_with_ram(&kvm, &rep_outsb_code());
    let h = Arc::new(Collect {
        setup: Some(Err("no seccomp here".into())),
        ..Default::default()
    });
    let r = VcpuRunner::spawn(3, fd, h.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !r.is_finished() {
        assert!(Instant::now() < deadline, "the thread never ended");
        std::thread::sleep(Duration::from_millis(5));
    }
    let fd = r.stop_and_join().expect("the fd comes back");
    assert_eq!(h.setup_thread.lock().unwrap().as_deref(), Some("vcpu3"));
    assert_eq!(
        *h.stopped.lock().unwrap(),
        Some(VcpuExitReason::SetupFailed("no seccomp here".into()))
    );
    assert!(h.bytes.lock().unwrap().is_empty(), "the vCPU ran");
    assert_eq!(fd.get_regs().unwrap().rip, CODE, "the vCPU ran");
    // With a hook that succeeds, the same code runs to its end.
    let (_vm, fd) = vm_with_ram(&kvm, &rep_outsb_code());
    let h = Arc::new(Collect::default());
    let r = VcpuRunner::spawn(0, fd, h.clone()).unwrap();
    while !h.done.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the guest never finished");
        std::thread::sleep(Duration::from_millis(5));
    }
    r.stop_and_join().expect("fd");
    assert_eq!(h.bytes.lock().unwrap().len(), LEN);
}

#[test]
fn stopping_a_vcpu_stuck_in_its_handler_returns_within_a_bound() {
    let Some(kvm) = kvm_or_skip("stopping_a_vcpu_stuck_in_its_handler_returns_within_a_bound") else {
        return;
    };
    let (_vm, fd) = vm_with_ram(&kvm, &rep_outsb_code());
    let (_hold, rx) = mpsc::channel::<()>();
    let h = Arc::new(Collect {
        block: Mutex::new(Some(rx)),
        ..Default::default()
    });
    let r = VcpuRunner::spawn(0, fd, h.clone()).unwrap();
    // The handler takes the receiver just before it blocks on it: wait for that rather than a
    // fixed sleep, which a loaded host can outlast before the first exit.
    let entered = Instant::now() + Duration::from_secs(60);
    while h.block.lock().unwrap().is_some() {
        assert!(Instant::now() < entered, "the vCPU never reached its handler");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = Instant::now();
    assert!(
        r.stop_and_join().is_none(),
        "a thread stuck in its handler is left behind"
    );
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

/// mov dx, 0x82; out dx, al; mov dx, 0x81; out dx, al; jmp $
const PAUSE_THEN_STOP: [u8; 10] = [0xba, 0x82, 0x00, 0xee, 0xba, 0x81, 0x00, 0xee, 0xeb, 0xfe];

/// The handler decides what the vCPU does next: a write to port 0x82 answered `Pause` pauses
/// it (the guest goes no further until resumed), and one to 0x81 answered `Stop` ends the
/// thread with the handler's reason, the `out` completed.
#[test]
fn the_exit_handler_pauses_and_stops_its_vcpu() {
    let Some(kvm) = kvm_or_skip("the_exit_handler_pauses_and_stops_its_vcpu") else {
        return;
    };
    let (_vm, fd) = vm_with_ram(&kvm, &PAUSE_THEN_STOP);
    let h = Arc::new(Collect::default());
    h.actions.lock().unwrap().insert(0x82, ExitAction::Pause);
    h.actions
        .lock()
        .unwrap()
        .insert(0x81, ExitAction::Stop(VcpuExitReason::SystemEvent(99)));
    let r = VcpuRunner::spawn(0, fd, h.clone()).unwrap();
    assert!(
        r.wait_paused(Duration::from_secs(10)),
        "the handler's pause took effect"
    );
    std::thread::sleep(Duration::from_millis(50));
    assert!(!h.done.load(Ordering::SeqCst), "the guest went on while paused");
    r.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !r.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(h.done.load(Ordering::SeqCst));
    assert_eq!(*h.stopped.lock().unwrap(), Some(VcpuExitReason::SystemEvent(99)));
    let fd = r.stop_and_join().expect("the fd comes back");
    assert_eq!(
        fd.get_regs().unwrap().rip,
        CODE + 8,
        "the stopping out was completed"
    );
}

/// hlt; hlt; mov dx, 0x81; out dx, al; jmp $
const TWO_HLTS: [u8; 8] = [0xf4, 0xf4, 0xba, 0x81, 0x00, 0xee, 0xeb, 0xfe];

/// An exit the runner does not handle (`KVM_EXIT_HLT`, no in-kernel LAPIC here) goes to the
/// handler, which lets the guest go on, instead of ending the thread.
#[test]
fn exits_the_runner_does_not_handle_go_to_the_handler() {
    let Some(kvm) = kvm_or_skip("exits_the_runner_does_not_handle_go_to_the_handler") else {
        return;
    };
    let (_vm, fd) = vm_with_ram(&kvm, &TWO_HLTS);
    let h = Arc::new(Collect::default());
    let r = VcpuRunner::spawn(0, fd, h.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !h.done.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        h.done.load(Ordering::SeqCst),
        "the guest got past its hlts: {:?}",
        h.others.lock().unwrap()
    );
    assert_eq!(*h.others.lock().unwrap(), vec!["Hlt", "Hlt"]);
    assert!(!r.is_finished());
    let _ = r.stop_and_join();
    assert_eq!(*h.stopped.lock().unwrap(), Some(VcpuExitReason::Stopped));
}
