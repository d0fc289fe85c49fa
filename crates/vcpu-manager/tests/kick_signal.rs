// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The kick signal is the VMM's choice: in its own process (this test binary), vCPU threads
//! are kicked with SIGRTMIN + 2, and SIGRTMIN is left alone for the rest of the program.

use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VcpuExit;
use vcpu_manager::{
    kick_signal, set_kick_signal, Error, ExitAction, ExitHandler, VcpuExitReason, VcpuRunner,
};
use vmm_sys_util::signal::{SIGRTMAX, SIGRTMIN};

mod common;
use common::kvm_or_skip;

struct Spin;
impl ExitHandler for Spin {
    fn pio_read(&self, _: u16, _: &mut [u8]) -> ExitAction {
        ExitAction::Continue
    }
    fn pio_write(&self, _: u16, _: &[u8]) -> ExitAction {
        ExitAction::Continue
    }
    fn mmio_read(&self, _: u64, _: &mut [u8]) -> ExitAction {
        ExitAction::Continue
    }
    fn mmio_write(&self, _: u64, _: &[u8]) -> ExitAction {
        ExitAction::Continue
    }
    fn other_exit(&self, _: u32, _: VcpuExit<'_>) -> ExitAction {
        ExitAction::Continue
    }
    fn vcpu_stopped(&self, _: u32, _: &VcpuExitReason) {}
}

/// The handler installed for `signum` (SIG_DFL is 0).
fn handler_of(signum: i32) -> usize {
    // SAFETY: a zeroed sigaction is a valid out-parameter; a null new action only queries.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        assert_eq!(libc::sigaction(signum, std::ptr::null(), &mut old), 0);
        old.sa_sigaction
    }
}

#[test]
fn vcpus_are_kicked_with_the_signal_the_vmm_chose() {
    let Some(kvm) = kvm_or_skip("vcpus_are_kicked_with_the_signal_the_vmm_chose") else {
        return;
    };
    let chosen = SIGRTMIN() + 2;
    assert!(matches!(
        set_kick_signal(libc::SIGUSR1),
        Err(Error::BadKickSignal(_))
    ));
    assert!(matches!(
        set_kick_signal(SIGRTMAX() + 1),
        Err(Error::BadKickSignal(_))
    ));
    // Changeable until the first vCPU thread starts.
    set_kick_signal(chosen + 1).unwrap();
    set_kick_signal(chosen).unwrap();
    assert_eq!(kick_signal(), chosen);
    // A guest spinning in `jmp $`: only a kick gets its thread out of KVM_RUN.
    let vm = kvm.create_vm().unwrap();
    // SAFETY: a fresh anonymous private mapping of one page, handed to KVM and never unmapped.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            0x1000,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(mem, libc::MAP_FAILED);
    // SAFETY: `mem` is one writable page.
    unsafe { mem.cast::<[u8; 2]>().write([0xeb, 0xfe]) };
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: 0x1000,
        userspace_addr: mem as u64,
        flags: 0,
    };
    // SAFETY: the region is a live mapping that is never unmapped.
    unsafe { vm.set_user_memory_region(region) }.unwrap();
    let fd = vm.create_vcpu(0).unwrap();
    let mut sregs = fd.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    fd.set_sregs(&sregs).unwrap();
    let mut regs = fd.get_regs().unwrap();
    regs.rip = 0;
    regs.rflags = 2;
    fd.set_regs(&regs).unwrap();
    let r = VcpuRunner::spawn(0, fd, Arc::new(Spin)).unwrap();
    assert_ne!(
        handler_of(chosen),
        libc::SIG_DFL,
        "the handler is on the chosen signal"
    );
    assert_eq!(handler_of(SIGRTMIN()), libc::SIG_DFL, "SIGRTMIN is left alone");
    assert!(matches!(set_kick_signal(chosen + 1), Err(Error::KickSignalInUse(s)) if s == chosen));
    set_kick_signal(chosen).unwrap();
    // Kicked out of the spin with the chosen signal (SIGRTMIN's default action would have
    // ended the process).
    r.request_pause();
    assert!(
        r.wait_paused(vcpu_manager::VCPU_TIMEOUT),
        "the kick reached the vCPU thread"
    );
    r.resume();
    assert!(r.stop_and_join().is_some());
}
