// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers shared by the KVM tests of this crate.
#![allow(dead_code)]

use std::io::Write;

use kvm_ioctls::Kvm;

/// KVM if a VM can be created; otherwise SKIP (or a failure under `VMM_REQUIRE_KVM=1`). Every
/// test that runs is recorded in `$KVM_TEST_LEDGER`.
pub fn kvm_or_skip(test: &str) -> Option<Kvm> {
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

/// An exit handler that lets every port and MMIO access pass and leaves other exits to the
/// runner's default (they end the thread): for tests whose vCPUs never run guest code.
pub struct NoExits;

impl vcpu_manager::ExitHandler for NoExits {
    fn pio_read(&self, _: u16, _: &mut [u8]) -> vcpu_manager::ExitAction {
        vcpu_manager::ExitAction::Continue
    }
    fn pio_write(&self, _: u16, _: &[u8]) -> vcpu_manager::ExitAction {
        vcpu_manager::ExitAction::Continue
    }
    fn mmio_read(&self, _: u64, _: &mut [u8]) -> vcpu_manager::ExitAction {
        vcpu_manager::ExitAction::Continue
    }
    fn mmio_write(&self, _: u64, _: &[u8]) -> vcpu_manager::ExitAction {
        vcpu_manager::ExitAction::Continue
    }
    fn vcpu_stopped(&self, _: u32, _: &vcpu_manager::VcpuExitReason) {}
}
