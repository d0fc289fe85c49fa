// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The SCI as a level-triggered interrupt line through irqfd + resamplefd.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use acpi_cpu_hotplug::InterruptLine;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// A level-triggered interrupt line on a KVM GSI via irqfd + resamplefd: asserting writes
/// the irqfd; KVM keeps the line high until the guest's EOI, then signals the resamplefd and
/// the resample thread re-asserts it if the level is still high. (Deasserting with
/// KVM_IRQ_LINE inside the guest's handler duplicates interrupts on some KVM backends.)
pub struct LevelIrq {
    irqfd: EventFd,
    resample: EventFd,
    gsi: u32,
    level: Arc<AtomicBool>,
    /// Ends the resample thread (set when the line is dropped).
    closed: Arc<AtomicBool>,
}

impl LevelIrq {
    /// Register the line on `gsi` and start its resample thread.
    pub fn new(vm: &VmFd, gsi: u32) -> std::io::Result<Self> {
        let line = LevelIrq::unregistered(gsi)?;
        line.register(vm)?;
        Ok(line)
    }

    /// The line for `gsi` with its resample thread, not yet attached to a VM: a restore
    /// attaches it (with [`LevelIrq::register`]) only after the vCPUs and the IOAPIC state
    /// exist, so a level that is high in the saved state cannot be delivered to nobody.
    pub fn unregistered(gsi: u32) -> std::io::Result<Self> {
        let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
        let resample = EventFd::new(0)?;
        let level = Arc::new(AtomicBool::new(false));
        let line = LevelIrq {
            irqfd,
            resample: resample.try_clone()?,
            gsi,
            level,
            closed: Arc::new(AtomicBool::new(false)),
        };
        let (l2, fd2, closed) = (line.level.clone(), line.irqfd.try_clone()?, line.closed.clone());
        std::thread::Builder::new()
            .name(format!("irq{gsi}-resample"))
            .spawn(move || {
                crate::seccomp::apply_or_warn(crate::seccomp::ThreadKind::Device);
                loop {
                    if resample.read().is_err() || closed.load(Ordering::SeqCst) {
                        return;
                    }
                    if l2.load(Ordering::SeqCst) {
                        let _ = fd2.write(1);
                    }
                }
            })?;
        Ok(line)
    }

    /// Register the same line on another VM (a VM rebuilt from saved state); re-asserts it if
    /// it is high, since the new VM's IOAPIC starts from the saved pin state.
    pub fn register(&self, vm: &VmFd) -> std::io::Result<()> {
        vm.register_irqfd_with_resample(&self.irqfd, &self.resample, self.gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        if self.level.load(Ordering::SeqCst) {
            self.irqfd.write(1)?;
        }
        Ok(())
    }

    /// Detach the line from `vm`.
    pub fn unregister(&self, vm: &VmFd) -> std::io::Result<()> {
        vm.unregister_irqfd(&self.irqfd, self.gsi)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

impl Drop for LevelIrq {
    fn drop(&mut self) {
        // Wake the resample thread so that it sees `closed` and ends with the line.
        self.closed.store(true, Ordering::SeqCst);
        if let Err(e) = self.resample.write(1) {
            log::warn!("ending the irq{} resample thread: {e}", self.gsi);
        }
    }
}

impl InterruptLine for LevelIrq {
    fn set_level(&self, high: bool) -> std::io::Result<()> {
        // The level first: a guest EOI between the irqfd write and a later store would make
        // the resample thread see the old (low) level and drop an assertion KVM had merged
        // into one already pending, leaving the line low while the device believes it high.
        let was = self.level.swap(high, Ordering::SeqCst);
        if high {
            if let Err(e) = self.irqfd.write(1) {
                // Not asserted: the device keeps its old idea of the level and asks again.
                self.level.store(was, Ordering::SeqCst);
                return Err(e);
            }
        }
        // Going low needs no action: KVM drops the line at the next EOI (resample) and the
        // resample thread does not re-assert it.
        Ok(())
    }
}
