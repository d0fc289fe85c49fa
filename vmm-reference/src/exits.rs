// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What comes out of a running guest: vCPU exits (routed to the devices' I/O bus), vCPU
//! threads that end on their own, the power-off request (events for the VM's owner), and the
//! guest's ejects and `_OST` reports (for CPU control's eject worker).

use std::sync::{mpsc, Arc, Mutex};

use acpi_cpu_hotplug::{HotplugSink, SleepSink, SLP_TYP_S5};
use vcpu_manager::{ExitAction, ExitHandler, VcpuExitReason};
use vm_device::bus::PioAddress;
use vm_device::device_manager::{IoManager, PioManager};

use crate::ratelimit::RateLimit;
use crate::status::FailedVcpu;

/// What ends a VM, sent to its owner (`Vm::wait`).
pub(crate) enum VmEvent {
    /// The guest entered S5.
    PowerOff,
    /// The VMM was asked to end the VM.
    Shutdown,
    /// The VM now runs on a migration destination.
    Migrated,
    /// A vCPU thread ended on its own.
    VcpuFailed(u32, VcpuExitReason),
}

/// The guest's S5 request ends the VM.
pub(crate) struct PowerButton(pub(crate) Mutex<mpsc::Sender<VmEvent>>);

impl SleepSink for PowerButton {
    fn sleep(&self, slp_typ: u8) {
        if slp_typ == SLP_TYP_S5 {
            let _ = self
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(VmEvent::PowerOff);
        } else {
            static LOG: RateLimit = RateLimit::new();
            crate::rate_limited!(
                LOG,
                warn,
                "guest requested unsupported sleep type {slp_typ}; ignored"
            );
        }
    }
}

/// Where the vCPU threads send their exits: port I/O to the devices' bus, MMIO nowhere (no
/// MMIO device), and a thread that ends on its own to the VM's owner.
pub(crate) struct Exits {
    pub(crate) io: Arc<IoManager>,
    pub(crate) events: Mutex<mpsc::Sender<VmEvent>>,
    /// vCPUs whose thread ended other than by a stop request, and why (for `vm.info`).
    pub(crate) failed: Mutex<Vec<FailedVcpu>>,
}

impl ExitHandler for Exits {
    fn pio_read(&self, port: u16, data: &mut [u8]) -> ExitAction {
        if self.io.pio_read(PioAddress(port), data).is_err() {
            // Nothing there: the bus floats high.
            data.fill(0xff);
        }
        ExitAction::Continue
    }
    fn pio_write(&self, port: u16, data: &[u8]) -> ExitAction {
        let _ = self.io.pio_write(PioAddress(port), data);
        ExitAction::Continue
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> ExitAction {
        log::debug!("unhandled MMIO read at {addr:#x}");
        data.fill(0xff);
        ExitAction::Continue
    }
    fn mmio_write(&self, addr: u64, _data: &[u8]) -> ExitAction {
        log::debug!("unhandled MMIO write at {addr:#x}");
        ExitAction::Continue
    }
    fn vcpu_thread_started(&self, _index: u32) -> Result<(), vcpu_manager::ThreadSetupError> {
        Ok(crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu)?)
    }

    fn vcpu_stopped(&self, index: u32, reason: &VcpuExitReason) {
        if *reason != VcpuExitReason::Stopped {
            self.failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(FailedVcpu {
                    id: index,
                    reason: reason.to_string(),
                });
            let _ = self
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(VmEvent::VcpuFailed(index, reason.clone()));
        }
    }
}

/// Receives the guest's ejects and `_OST` reports. It runs with the device lock held on a
/// vCPU thread, so it only records and queues: the eject worker joins the vCPU thread.
pub struct HotplugEvents {
    pub(crate) ejected: Mutex<Vec<u32>>,
    pub(crate) worker: Mutex<mpsc::Sender<u32>>,
}

impl HotplugEvents {
    /// CPUs the guest ejected since the last call.
    pub fn take_ejected(&self) -> Vec<u32> {
        std::mem::take(&mut *self.ejected.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl HotplugSink for HotplugEvents {
    fn cpu_ejected(&self, cpu: u32) {
        static LOG: RateLimit = RateLimit::new();
        crate::rate_limited!(LOG, info, "guest ejected CPU {cpu}");
        self.ejected.lock().unwrap_or_else(|e| e.into_inner()).push(cpu);
        let _ = self.worker.lock().unwrap_or_else(|e| e.into_inner()).send(cpu);
    }
    fn ost(&self, cpu: u32, event: u32, status: u32) {
        static LOG: RateLimit = RateLimit::new();
        crate::rate_limited!(
            LOG,
            info,
            "guest _OST for CPU {cpu}: event {event:#x} status {status:#x}"
        );
    }
}
