// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A VM with two possible CPUs, run by a `VcpuManager`: CPU 0 executes a few bytes of
//! real-mode code that counts down on port 0x80, then writes port 0x81, which the exit handler
//! answers with `ExitAction::Pause`. CPU 1 is hot-added and waits for INIT/SIPI, as an AP does.
//! Both vCPUs are then saved (their exact mp_state and registers) and stopped.
//!
//! `cargo run -p vcpu-manager --example two_vcpus` (needs `/dev/kvm`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};
use lapic_state::KvmConventions;
use vcpu_manager::{cpuid, ExitAction, ExitHandler, Topology, VcpuExitReason, VcpuManager};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const RAM: usize = 0x10000;
const CODE: u64 = 0x1000;
/// mov cx, 5; l: mov al, cl; out 0x80, al; loop l; mov dx, 0x81; out dx, al; hlt; jmp $
const GUEST: [u8; 16] = [
    0xb9, 0x05, 0x00, 0x88, 0xc8, 0xe6, 0x80, 0xe2, 0xfa, 0xba, 0x81, 0x00, 0xee, 0xf4, 0xeb, 0xfe,
];

/// The VMM's side of the exits: what the guest wrote to port 0x80, and whether it is done.
#[derive(Default)]
struct Ports {
    written: Mutex<Vec<u8>>,
    done: AtomicBool,
}

impl ExitHandler for Ports {
    fn pio_read(&self, _port: u16, data: &mut [u8]) -> ExitAction {
        data.fill(0xff);
        ExitAction::Continue
    }
    fn pio_write(&self, port: u16, data: &[u8]) -> ExitAction {
        match port {
            0x80 => self
                .written
                .lock()
                .map(|mut w| w.extend_from_slice(data))
                .unwrap_or(()),
            0x81 => {
                self.done.store(true, Ordering::SeqCst);
                return ExitAction::Pause;
            }
            _ => {}
        }
        ExitAction::Continue
    }
    fn mmio_read(&self, _addr: u64, data: &mut [u8]) -> ExitAction {
        data.fill(0xff);
        ExitAction::Continue
    }
    fn mmio_write(&self, _addr: u64, _data: &[u8]) -> ExitAction {
        ExitAction::Continue
    }
    fn vcpu_stopped(&self, index: u32, reason: &VcpuExitReason) {
        println!("vCPU {index} ended: {reason}");
    }
}

/// A VM with an in-kernel irqchip and `RAM` bytes at guest address 0 holding the guest code.
/// The mapping is left to the process (it must outlive the VM, which lives until exit).
fn vm_with_code(kvm: &Kvm) -> Result<VmFd> {
    let vm = kvm.create_vm()?;
    vm.create_irq_chip()?;
    // SAFETY: a fresh anonymous private mapping of RAM bytes, checked below.
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
    if mem == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: `mem` is RAM writable bytes; the code fits at CODE.
    let ram = unsafe { std::slice::from_raw_parts_mut(mem.cast::<u8>(), RAM) };
    ram[CODE as usize..CODE as usize + GUEST.len()].copy_from_slice(&GUEST);
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: RAM as u64,
        userspace_addr: mem as u64,
        flags: 0,
    };
    // SAFETY: the region is a live mapping of RAM bytes that is never unmapped.
    unsafe { vm.set_user_memory_region(region) }?;
    Ok(vm)
}

fn main() -> Result<()> {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            println!("SKIP: /dev/kvm is not usable ({e})");
            return Ok(());
        }
    };
    let vm = vm_with_code(&kvm)?;
    let ports = Arc::new(Ports::default());
    let model = cpuid::host_model(&kvm, cpuid::Backend::detect())?;
    let mut cpus = VcpuManager::new(Topology::new(2), model, ports.clone(), KvmConventions::CANONICAL);

    // CPU 0: CPUID, LINT wiring and MTRRs from the manager; real mode at CODE from us.
    let fd = cpus.prepare(&vm, 0)?;
    let mut sregs = fd.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    fd.set_sregs(&sregs)?;
    let mut regs = fd.get_regs()?;
    regs.rip = CODE;
    regs.rflags = 2;
    fd.set_regs(&regs)?;
    cpus.start_paused(0, fd)?;
    // CPU 1, hot-added: it waits for INIT/SIPI like any AP.
    cpus.hot_add(&vm, 1)?;
    cpus.resume_all();

    // The handler sees port 0x81 first; the thread then pauses (resume_all only asked CPU 0
    // to run: until its thread has, it still reads as paused).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ports.done.load(Ordering::SeqCst) {
        if Instant::now() > deadline {
            return Err("the guest did not reach port 0x81".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let runner = cpus.runner(0).ok_or("CPU 0 is not running")?;
    if !runner.wait_paused(Duration::from_secs(10)) {
        return Err("CPU 0 did not pause after port 0x81".into());
    }
    println!(
        "guest wrote {:?} to port 0x80, then paused itself through port 0x81",
        ports.written.lock().map(|w| w.clone()).unwrap_or_default()
    );
    cpus.pause_all()?;
    for (index, state) in cpus.save_all(&cpus.save_options(Vec::new()))? {
        println!(
            "vCPU {index}: mp_state {}, rip {:#x}",
            state.mp_state.mp_state, state.regs.rip
        );
    }
    cpus.stop_all();
    Ok(())
}
