// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! CPU control: hot-add, remove, withdraw a removal, resize, the eject worker that joins the
//! vCPU of a CPU the guest ejected, and the per-CPU view `vm.info` gives. A change to how
//! CPUs come and go edits this file alone; the VM's setup only starts the eject worker.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex, Weak};

use acpi_cpu_hotplug::{CpuSlot, DeviceError, HotplugError};
use lapic_state::{ApicBase, ApicMode, LapicPage};
use vcpu_manager::{Slot, VcpuManager};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::error::{ControlError, VmmError};
use crate::exits::HotplugEvents;
use crate::status::{CpuInfo, CpusConfig, MemoryConfig, VmInfo, VmInfoConfig};
use crate::vm::VmInner;

impl VmInner {
    fn present(&self) -> Vec<u32> {
        let dev = self.lock_dev();
        (0..self.topology.max_vcpus())
            .filter(|i| dev.controller().slot(*i).is_some_and(|s| s.present))
            .collect()
    }

    /// Hot-add CPU `index`: create (or reuse) its vCPU, start it, then tell the guest.
    pub fn add_cpu_index(&self, index: u32) -> Result<(), ControlError> {
        self.not_migrating()?;
        let mut vcpus = self.lock_vcpus_or_busy()?;
        self.add_locked(&mut vcpus, index)
    }

    /// Hot-add the lowest absent CPU; returns its index. The choice and the add happen under
    /// one hold of the vCPU lock, so clients asking at once each get their own CPU.
    pub fn add_cpu(&self) -> Result<u32, ControlError> {
        self.not_migrating()?;
        let mut vcpus = self.lock_vcpus_or_busy()?;
        self.add_lowest(&mut vcpus)
    }

    /// The lowest absent CPU that can be added now (not one still on its way out), added.
    fn add_lowest(&self, vcpus: &mut VcpuManager) -> Result<u32, ControlError> {
        let present = self.present();
        let absent: Vec<u32> = (0..self.topology.max_vcpus())
            .filter(|i| !present.contains(i))
            .collect();
        if absent.is_empty() {
            return Err(ControlError::BadRequest("all possible CPUs are present".into()));
        }
        let leaving = |i: &u32| {
            matches!(vcpus.slot(*i), Some(Slot::Running(_)))
                || self
                    .pending_removals
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(i)
        };
        let Some(index) = absent.iter().copied().find(|i| !leaving(i)) else {
            return Err(ControlError::Busy(format!(
                "CPU(s) {absent:?} are still being removed, retry"
            )));
        };
        self.add_locked(vcpus, index)?;
        Ok(index)
    }

    /// Add CPU `index` with the vCPU lock held (`vcpus`).
    fn add_locked(&self, vcpus: &mut VcpuManager, index: u32) -> Result<(), ControlError> {
        // Under the vCPU lock, which a snapshot or migration takes to capture the VM: a
        // change that lands after the capture would be lost on the other side.
        self.not_migrating()?;
        if index >= self.topology.max_vcpus() {
            return Err(ControlError::BadRequest(format!(
                "CPU {index} is beyond the maximum of {} CPUs",
                self.topology.max_vcpus()
            )));
        }
        if self.paused.load(Ordering::SeqCst) {
            return Err(ControlError::Busy("the VM is paused".into()));
        }
        if self
            .pending_removals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&index)
        {
            return Err(ControlError::Busy(format!(
                "removal of CPU {index} is in progress, retry"
            )));
        }
        if self
            .lock_dev()
            .controller()
            .slot(index)
            .is_some_and(|s| s.present)
        {
            return Err(ControlError::BadRequest(format!(
                "CPU {index} is already present"
            )));
        }
        // The guest ejected it but the eject worker has not joined its thread yet: the CPU is
        // on its way out, not pluggable for a moment.
        if matches!(vcpus.slot(index), Some(Slot::Running(_))) {
            return Err(ControlError::Busy(format!(
                "CPU {index} is still being removed, retry"
            )));
        }
        let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        vcpus
            .hot_add(&vm, index)
            .map_err(|e| ControlError::Internal(e.to_string()))?;
        drop(vm);
        // The vCPU exists and waits for INIT/SIPI before the guest hears about it.
        let told = self.lock_dev().request_insert(index);
        if let Err(e) = told {
            // The guest never heard of it (the device withdrew the request): park it again.
            if let Err(park) = vcpus.hot_remove(index) {
                log::error!("parking CPU {index} after a failed insert: {park}");
            }
            return Err(ControlError::Internal(e.to_string()));
        }
        Ok(())
    }

    /// Ask the guest to remove CPU `index`; the vCPU goes away when the guest ejects it.
    pub fn remove_cpu(&self, index: u32) -> Result<(), ControlError> {
        let vcpus = self.lock_vcpus_or_busy()?;
        self.remove_locked(&vcpus, index)
    }

    /// Request the removal of CPU `index` with the vCPU lock held (`_held`): like an add, the
    /// request must land before a capture or not at all.
    fn remove_locked(&self, _held: &VcpuManager, index: u32) -> Result<(), ControlError> {
        self.not_migrating()?;
        if index == 0 {
            return Err(ControlError::BadRequest(
                "CPU 0 is the boot CPU and cannot be removed".into(),
            ));
        }
        let mut pending = self.pending_removals.lock().unwrap_or_else(|e| e.into_inner());
        let mut dev = self.lock_dev();
        let present = dev.controller().slot(index).is_some_and(|s| s.present);
        if pending.contains(&index) && !present {
            return Err(ControlError::Busy(format!("CPU {index} is being ejected, retry")));
        }
        // A new removal, or a retry of one the guest refused or took and dropped (the event
        // is raised again); busy while the guest has not taken the event yet.
        dev.request_remove(index).map_err(|e| match e {
            DeviceError::Hotplug(e @ HotplugError::RemovalPending(_)) => ControlError::Busy(e.to_string()),
            DeviceError::Hotplug(e) => ControlError::BadRequest(e.to_string()),
            sci @ DeviceError::Sci(_) => ControlError::Internal(sci.to_string()),
        })?;
        pending.insert(index);
        Ok(())
    }

    /// Withdraw the removal of CPU `index` at any stage before its eject. The CPU stays
    /// present; a guest that ejects it later after all is refused and told it is back.
    pub fn cancel_removal(&self, index: u32) -> Result<(), ControlError> {
        let _vcpus = self.lock_vcpus_or_busy()?;
        self.not_migrating()?;
        let mut pending = self.pending_removals.lock().unwrap_or_else(|e| e.into_inner());
        if !pending.contains(&index) {
            return Err(ControlError::BadRequest(format!(
                "no removal of CPU {index} is pending"
            )));
        }
        self.lock_dev()
            .cancel_remove(index)
            .map_err(|e| ControlError::Busy(format!("{e}: the eject is being completed, retry")))?;
        pending.remove(&index);
        Ok(())
    }

    /// CPUs whose removal the guest refused (they keep `resize` busy until retried or
    /// cancelled).
    fn refused_removals(&self) -> Vec<u32> {
        let dev = self.lock_dev();
        let st = dev.controller().state();
        (0..st.cpus.len() as u32)
            .filter(|&i| st.cpus[i as usize].remove_refused)
            .collect()
    }

    /// Make `desired` CPUs present: add the lowest absent ones or remove the highest present.
    /// One hold of the vCPU lock for the whole change: a concurrent resize or add sees its
    /// result, not half of it.
    pub fn resize(&self, desired: u32) -> Result<(), ControlError> {
        self.not_migrating()?;
        let max = self.topology.max_vcpus();
        if desired == 0 || desired > max {
            return Err(ControlError::BadRequest(format!(
                "desired_vcpus must be between 1 and {max}, got {desired}"
            )));
        }
        let mut vcpus = self.lock_vcpus_or_busy()?;
        if !self
            .pending_removals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            let refused = self.refused_removals();
            if !refused.is_empty() {
                return Err(ControlError::Busy(format!(
                    "the guest refused to remove CPU(s) {refused:?}: retry with vm.remove-cpu or withdraw with vm.cancel-removal"
                )));
            }
            return Err(ControlError::Busy("a CPU removal is in progress, retry".into()));
        }
        let present = self.present();
        let n = present.len() as u32;
        if desired > n {
            for _ in n..desired {
                self.add_lowest(&mut vcpus)?;
            }
        } else {
            for index in present.iter().rev().take((n - desired) as usize) {
                self.remove_locked(&vcpus, *index)?;
            }
        }
        Ok(())
    }

    /// Per-CPU view: device flags plus what KVM says about each running vCPU.
    pub fn info(&self) -> Result<VmInfo, ControlError> {
        let vcpus = self.lock_vcpus_or_busy()?;
        let (slots, refused) = {
            let dev = self.lock_dev();
            let st = dev.controller().state();
            (st.cpus, st.refused_ejects)
        };
        let cpus = slots
            .iter()
            .enumerate()
            .map(|(i, s)| self.cpu_info(&vcpus, i as u32, s))
            .collect();
        let paused = self.paused.load(Ordering::SeqCst);
        Ok(VmInfo {
            state: match (self.ending.load(Ordering::SeqCst), paused) {
                (true, _) => "Shutdown",
                (false, true) => "Paused",
                (false, false) => "Running",
            },
            config: VmInfoConfig {
                cpus: CpusConfig {
                    boot_vcpus: self.boot_vcpus,
                    max_vcpus: self.topology.max_vcpus(),
                },
                memory: MemoryConfig {
                    size: self.mem.iter().map(|r| r.len()).sum(),
                },
                serial: self.devices.serial_config(),
            },
            max_vcpus: self.topology.max_vcpus(),
            present_vcpus: slots.iter().filter(|s| s.present).count() as u32,
            paused,
            pending_removals: self
                .pending_removals
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .copied()
                .collect(),
            refused_ejects: refused,
            reused_vcpu_fds: vcpus.reused(),
            parked_vcpu_fds: vcpus.parked() as u32,
            cpus,
            migration: self.migration_status(),
            failed_vcpus: self
                .exits
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        })
    }

    /// One CPU's line of `vm.info`: the device's flags, and KVM's view of a running vCPU.
    fn cpu_info(&self, vcpus: &VcpuManager, i: u32, s: &CpuSlot) -> CpuInfo {
        let (vcpu, kvm_view) = match vcpus.slot(i) {
            Some(Slot::Running(r)) => {
                let view = r
                    .with_vcpu(vcpu_manager::VCPU_TIMEOUT, |fd| {
                        let mp = fd.get_mp_state().ok()?.mp_state;
                        let base = ApicBase(fd.get_sregs().ok()?.apic_base);
                        let lapic = LapicPage::from(fd.get_lapic().ok()?);
                        Some((mp, base.mode(), lapic.sw_enabled()))
                    })
                    .flatten();
                // A thread that did not answer in time says so, not a blank "running".
                (if view.is_some() { "running" } else { "unresponsive" }, view)
            }
            Some(Slot::Parked(_)) => ("parked", None),
            _ => ("absent", None),
        };
        CpuInfo {
            id: i,
            apic_id: self.topology.apic_id(i),
            present: s.present,
            vcpu,
            mp_state: kvm_view.map(|(m, _, _)| mp_state_name(m)),
            apic_mode: kvm_view.map(|(_, m, _)| match m {
                ApicMode::XApic => "xapic",
                ApicMode::X2Apic => "x2apic",
                ApicMode::Disabled => "disabled",
                ApicMode::Invalid => "invalid",
            }),
            apic_sw_enabled: kvm_view.map(|(_, _, e)| e),
            inserting: s.inserting,
            removing: s.removing,
            remove_requested: s.remove_requested,
            remove_refused: s.remove_refused,
            ost_event: s.ost_event,
            ost_status: s.ost_status,
        }
    }

    /// The guest ejected CPU `index`: stop and join its vCPU thread, park the fd.
    fn finish_removal(&self, index: u32) {
        if let Err(e) = self.lock_vcpus().hot_remove(index) {
            log::error!("removing vCPU {index} after its eject: {e}");
        }
        self.pending_removals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&index);
    }
}

/// The guest's eject reports, and the receiving end the eject worker takes.
pub(crate) fn hotplug_events() -> (Arc<HotplugEvents>, mpsc::Receiver<u32>) {
    let (worker, rx) = mpsc::channel();
    let events = Arc::new(HotplugEvents {
        ejected: Mutex::default(),
        worker: Mutex::new(worker),
    });
    (events, rx)
}

/// The eject worker: joins ejected vCPUs off the vCPU threads (they hold the device lock
/// when they report an eject). It ends with the VM.
pub(crate) fn start_eject_worker(inner: &Arc<VmInner>, ejects: mpsc::Receiver<u32>) -> Result<(), VmmError> {
    let weak: Weak<VmInner> = Arc::downgrade(inner);
    std::thread::Builder::new()
        .name("eject-worker".into())
        .spawn(move || {
            crate::seccomp::apply_or_warn(crate::seccomp::ThreadKind::Device);
            for cpu in ejects {
                match weak.upgrade() {
                    Some(inner) => inner.finish_removal(cpu),
                    None => return,
                }
            }
        })
        .map(drop)
        .map_err(|source| VmmError::Io {
            what: "eject worker thread".into(),
            source,
        })
}

fn mp_state_name(s: u32) -> &'static str {
    match s {
        0 => "RUNNABLE",
        1 => "UNINITIALIZED",
        2 => "INIT_RECEIVED",
        3 => "HALTED",
        4 => "SIPI_RECEIVED",
        5 => "STOPPED",
        _ => "OTHER",
    }
}
