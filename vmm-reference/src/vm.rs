// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Building and running a VM: KVM setup, memory, ACPI, kernel, devices, vCPU threads.

use std::collections::BTreeSet;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use acpi_cpu_hotplug::{AcpiHotplugDevice, HotplugLayout, HotplugSink, SleepSink, SLP_TYP_S5};
use kvm_bindings::{
    kvm_enable_cap, kvm_irq_routing_entry, kvm_pit_config, kvm_userspace_memory_region, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use lapic_state::{ApicBase, ApicMode, KvmConventions, LapicPage};
use serde::Serialize;
use vcpu_manager::{ExitHandler, Slot, Topology, VcpuExitReason, VcpuManager};
use vm_device::bus::{PioAddress, PioRange};
use vm_device::device_manager::{IoManager, PioManager};
use vm_device::DevicePio;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiConfig, COM1_IRQ, COM1_PORT};
use crate::boot::{self, GuestMemory};
use crate::config::{check_kernel_file, ConfigError, KernelSource, SerialMode, VmConfig};
use crate::devices::{serve_socket, ConsoleOut, LevelIrq, SerialDevice, SocketConsole};
use crate::ratelimit::RateLimit;
use crate::restore::{
    capture, check_compat, detect_conventions, restore_kvm_vm_state, restore_vcpus, Prepared,
};
use crate::snapshot::SavedVm;

/// KVM_CAP_X2APIC_API flags: 32-bit x2APIC ids in the LAPIC state, no 0xff broadcast quirk.
const X2APIC_API_FLAGS: u64 = (kvm_bindings::KVM_X2APIC_API_USE_32BIT_IDS
    | kvm_bindings::KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK) as u64;
/// TSS area KVM needs for real-mode emulation on Intel (3 pages inside the MMIO gap).
const TSS_ADDRESS: usize = 0xfffb_d000;
/// How long a request to a vCPU thread may take.
const VCPU_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an API operation waits for the vCPU manager another operation holds.
const CONTROL_WAIT: Duration = Duration::from_secs(10);

/// VMM errors. Each names what failed in one line.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A KVM call failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Booting failed.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// ACPI table construction failed.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    /// vCPU management failed.
    #[error(transparent)]
    Vcpu(#[from] vcpu_manager::Error),
    /// Snapshot or restore failed.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// An I/O or device setup step failed.
    #[error("{what}: {source}")]
    Io {
        /// Which step.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// How the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest powered off through ACPI S5.
    PowerOff,
    /// The VMM was asked to shut the VM down (API).
    Shutdown,
    /// The VM was live-migrated away; the destination runs it now.
    Migrated,
    /// The guest failed (triple fault, emulation failure, ...).
    GuestError(String),
}

pub(crate) enum VmEvent {
    PowerOff,
    Shutdown,
    /// The VM now runs on a migration destination.
    Migrated,
    VcpuFailed(u32, VcpuExitReason),
}

struct PowerButton(Mutex<mpsc::Sender<VmEvent>>);

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

/// Receives the guest's ejects and `_OST` reports. It runs with the device lock held on a
/// vCPU thread, so it only records and queues: the eject worker joins the vCPU thread.
pub struct HotplugEvents {
    ejected: Mutex<Vec<u32>>,
    worker: Mutex<mpsc::Sender<u32>>,
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

pub(crate) struct Exits {
    io: IoManager,
    events: Mutex<mpsc::Sender<VmEvent>>,
    /// vCPUs whose thread ended other than by a stop request, and why (for `vm.info`).
    failed: Mutex<Vec<FailedVcpu>>,
}

impl ExitHandler for Exits {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if self.io.pio_read(PioAddress(port), data).is_err() {
            // Nothing there: the bus floats high.
            data.fill(0xff);
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        let _ = self.io.pio_write(PioAddress(port), data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        log::debug!("unhandled MMIO read at {addr:#x}");
        data.fill(0xff);
    }
    fn mmio_write(&self, addr: u64, _data: &[u8]) {
        log::debug!("unhandled MMIO write at {addr:#x}");
    }
    fn vcpu_thread_started(&self, _index: u32) -> Result<(), String> {
        crate::seccomp::apply(crate::seccomp::ThreadKind::Vcpu)
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

/// Errors of the control operations, shaped for the REST API.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The request cannot be honoured as asked (HTTP 400).
    #[error("{0}")]
    BadRequest(String),
    /// Try again later, e.g. while a CPU removal is in progress (HTTP 429).
    #[error("{0}")]
    Busy(String),
    /// Something failed inside the VMM (HTTP 500); the VM keeps running.
    #[error("{0}")]
    Internal(String),
}

/// One possible CPU as `vm.info` reports it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CpuInfo {
    /// CPU index (ACPI UID).
    pub id: u32,
    /// APIC id.
    pub apic_id: u32,
    /// Present (the guest's `_STA` says so).
    pub present: bool,
    /// `running`, `parked` (removed, fd kept) or `absent` (never created).
    pub vcpu: &'static str,
    /// KVM mp_state of a running vCPU (`RUNNABLE`, `HALTED`, `UNINITIALIZED`, ...).
    pub mp_state: Option<&'static str>,
    /// APIC mode from IA32_APIC_BASE (`xapic`, `x2apic`, `disabled`).
    pub apic_mode: Option<&'static str>,
    /// SPIV bit 8: the APIC is software-enabled (a CPU the guest offlined has it clear).
    pub apic_sw_enabled: Option<bool>,
    /// Insert event pending for the guest.
    pub inserting: bool,
    /// Remove event pending for the guest.
    pub removing: bool,
    /// The VMM asked to remove it and the guest has not ejected it yet.
    pub remove_requested: bool,
    /// The guest refused the removal (a failing `_OST`, `ost_status` says why): retry with
    /// `vm.remove-cpu` or withdraw it with `vm.cancel-removal`.
    pub remove_refused: bool,
    /// Last `_OST` event.
    pub ost_event: u32,
    /// Last `_OST` status.
    pub ost_status: u32,
}

/// A vCPU whose thread ended on its own (the guest failed, or the VMM's thread panicked).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct FailedVcpu {
    /// CPU index.
    pub id: u32,
    /// Why its thread ended.
    pub reason: String,
}

/// `vm.info`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct VmInfo {
    /// Possible CPUs.
    pub max_vcpus: u32,
    /// Present CPUs.
    pub present_vcpus: u32,
    /// vCPUs paused by the API.
    pub paused: bool,
    /// Removals requested and not finished (resize answers "busy" meanwhile).
    pub pending_removals: Vec<u32>,
    /// Ejects the device's guard refused.
    pub refused_ejects: u64,
    /// Hot-adds that reused a parked vCPU fd.
    pub reused_vcpu_fds: u64,
    /// Parked vCPU fds.
    pub parked_vcpu_fds: u32,
    /// Per possible CPU.
    pub cpus: Vec<CpuInfo>,
    /// The current or last live migration, outgoing or incoming.
    pub migration: Option<crate::migration::MigrationStatus>,
    /// vCPUs whose thread ended on its own (the VM ends with the first).
    pub failed_vcpus: Vec<FailedVcpu>,
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

/// State shared by the VM's owner, the API server and the eject worker.
pub struct VmInner {
    // Field order is drop order: vCPU threads stop before the fds and memory go away.
    pub(crate) vcpus: Mutex<VcpuManager>,
    pub(crate) acpi_dev: Arc<Mutex<AcpiHotplugDevice>>,
    pub(crate) hotplug_events: Arc<HotplugEvents>,
    pub(crate) pending_removals: Mutex<BTreeSet<u32>>,
    pub(crate) paused: AtomicBool,
    pub(crate) events_tx: Mutex<mpsc::Sender<VmEvent>>,
    pub(crate) topology: Topology,
    pub(crate) boot_vcpus: u32,
    pub(crate) msrs: Vec<u32>,
    /// The VM's CPU model: the host's supported CPUID at boot, CPU 0's saved CPUID after a
    /// restore. Every vCPU's CPUID is this with its own APIC id (`cpuid::for_vcpu`).
    pub(crate) supported_cpuid: kvm_bindings::CpuId,
    pub(crate) exits: Arc<Exits>,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) serial_irq: EventFd,
    pub(crate) sci: Arc<LevelIrq>,
    /// A snapshot or migration is in progress (control operations answer busy).
    pub(crate) migrating: AtomicBool,
    /// The outgoing migration: running, cancelled (`vm.cancel-migration`) or committed
    /// (the destination has the VM); see `migration::ctl`.
    pub(crate) migration_ctl: std::sync::atomic::AtomicU8,
    /// Progress of the current or last migration.
    pub(crate) migration: Mutex<Option<crate::migration::MigrationStatus>>,
    pub(crate) vm: Mutex<VmFd>,
    pub(crate) mem: GuestMemory,
    pub(crate) kvm: Kvm,
}

impl VmInner {
    pub(crate) fn lock_vcpus(&self) -> std::sync::MutexGuard<'_, VcpuManager> {
        self.vcpus.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The vCPU manager for an API operation. While a snapshot or migration holds the vCPUs
    /// (seconds, for a large VM) the caller gets "busy" at once instead of waiting; other
    /// holders (a pause, an eject) are waited for up to [`CONTROL_WAIT`].
    fn lock_vcpus_or_busy(&self) -> Result<std::sync::MutexGuard<'_, VcpuManager>, ControlError> {
        let deadline = std::time::Instant::now() + CONTROL_WAIT;
        loop {
            match self.vcpus.try_lock() {
                Ok(g) => return Ok(g),
                Err(std::sync::TryLockError::Poisoned(e)) => return Ok(e.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            self.not_migrating()?;
            if std::time::Instant::now() >= deadline {
                return Err(ControlError::Busy(
                    "the vCPUs are busy with another operation, retry".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Control operations answer "busy" while a snapshot or migration owns the VM.
    fn not_migrating(&self) -> Result<(), ControlError> {
        if self.migrating.load(Ordering::SeqCst) {
            return Err(ControlError::Busy(
                "a snapshot or migration is in progress, retry".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn lock_dev(&self) -> std::sync::MutexGuard<'_, AcpiHotplugDevice> {
        self.acpi_dev.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn present(&self) -> Vec<u32> {
        let dev = self.lock_dev();
        (0..self.topology.max_vcpus())
            .filter(|i| dev.controller().slot(*i).is_some_and(|s| s.present))
            .collect()
    }

    /// Hot-add CPU `index`: create (or reuse) its vCPU, start it, then tell the guest.
    pub fn add_cpu_index(&self, index: u32) -> Result<(), ControlError> {
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
        let mut vcpus = self.lock_vcpus_or_busy()?;
        // Again under the vCPU lock, which a snapshot or migration takes to capture the VM: a
        // change that lands after the capture would be lost on the other side.
        self.not_migrating()?;
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
        self.lock_dev()
            .request_insert(index)
            .map_err(|e| ControlError::Internal(e.to_string()))
    }

    /// Hot-add the lowest absent CPU; returns its index.
    pub fn add_cpu(&self) -> Result<u32, ControlError> {
        let present = self.present();
        let index = (0..self.topology.max_vcpus())
            .find(|i| !present.contains(i))
            .ok_or_else(|| ControlError::BadRequest("all possible CPUs are present".into()))?;
        self.add_cpu_index(index)?;
        Ok(index)
    }

    /// Ask the guest to remove CPU `index`; the vCPU goes away when the guest ejects it.
    pub fn remove_cpu(&self, index: u32) -> Result<(), ControlError> {
        // Under the vCPU lock, like add: the request must land before a capture or not at all.
        let _vcpus = self.lock_vcpus_or_busy()?;
        self.not_migrating()?;
        if index == 0 {
            return Err(ControlError::BadRequest(
                "CPU 0 is the boot CPU and cannot be removed".into(),
            ));
        }
        let mut pending = self.pending_removals.lock().unwrap_or_else(|e| e.into_inner());
        let mut dev = self.lock_dev();
        let refused = dev.controller().slot(index).is_some_and(|s| s.remove_refused);
        if pending.contains(&index) && !refused {
            return Err(ControlError::Busy(format!(
                "removal of CPU {index} is already in progress"
            )));
        }
        // A new removal, or a retry of one the guest refused (the event is raised again).
        dev.request_remove(index)
            .map_err(|e| ControlError::BadRequest(e.to_string()))?;
        pending.insert(index);
        Ok(())
    }

    /// Withdraw the removal of CPU `index`: one the guest refused, or one whose event the
    /// guest has not taken yet. The CPU stays present, as the guest left it.
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
            .map_err(|e| ControlError::Busy(format!("{e}: the guest is carrying it out, retry")))?;
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
    pub fn resize(&self, desired: u32) -> Result<(), ControlError> {
        self.not_migrating()?;
        let max = self.topology.max_vcpus();
        if desired == 0 || desired > max {
            return Err(ControlError::BadRequest(format!(
                "desired_vcpus must be between 1 and {max}, got {desired}"
            )));
        }
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
                self.add_cpu()?;
            }
        } else {
            for index in present.iter().rev().take((n - desired) as usize) {
                self.remove_cpu(*index)?;
            }
        }
        Ok(())
    }

    /// Pause every vCPU (none inside KVM_RUN, pending I/O completed).
    pub fn pause(&self) -> Result<(), ControlError> {
        let vcpus = self.lock_vcpus_or_busy()?;
        self.not_migrating()?;
        vcpus
            .pause_all()
            .map_err(|e| ControlError::Internal(e.to_string()))?;
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Resume every vCPU, unless a snapshot or migration owns the pause.
    pub fn resume_checked(&self) -> Result<(), ControlError> {
        let vcpus = self.lock_vcpus_or_busy()?;
        self.not_migrating()?;
        vcpus.resume_all();
        self.paused.store(false, Ordering::SeqCst);
        Ok(())
    }

    /// Resume every vCPU.
    pub fn resume(&self) {
        self.lock_vcpus().resume_all();
        self.paused.store(false, Ordering::SeqCst);
    }

    /// `vm.shutdown`: refused while a snapshot or migration runs (ending the VM then could
    /// leave a half-written snapshot or a destination waiting for a source that is gone).
    pub fn shutdown_checked(&self) -> Result<(), ControlError> {
        self.not_migrating()?;
        self.request_shutdown();
        Ok(())
    }

    /// Ask the VMM to end the VM (the owner's `wait` returns `Shutdown`).
    pub fn request_shutdown(&self) {
        let _ = self
            .events_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(VmEvent::Shutdown);
    }

    /// Per-CPU view: device flags plus what KVM says about each running vCPU.
    pub fn info(&self) -> Result<VmInfo, ControlError> {
        let vcpus = self.lock_vcpus_or_busy()?;
        let (slots, refused) = {
            let dev = self.lock_dev();
            let st = dev.controller().state();
            (st.cpus, st.refused_ejects)
        };
        let mut cpus = Vec::new();
        for (i, s) in slots.iter().enumerate() {
            let i = i as u32;
            let (vcpu, kvm_view) = match vcpus.slot(i) {
                Some(Slot::Running(r)) => (
                    "running",
                    r.with_vcpu(vcpu_manager::VCPU_TIMEOUT, |fd| {
                        let mp = fd.get_mp_state().ok()?.mp_state;
                        let base = ApicBase(fd.get_sregs().ok()?.apic_base);
                        let lapic = LapicPage::from(fd.get_lapic().ok()?);
                        Some((mp, base.mode(), lapic.sw_enabled()))
                    })
                    .flatten(),
                ),
                Some(Slot::Parked(_)) => ("parked", None),
                _ => ("absent", None),
            };
            cpus.push(CpuInfo {
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
            });
        }
        Ok(VmInfo {
            max_vcpus: self.topology.max_vcpus(),
            present_vcpus: slots.iter().filter(|s| s.present).count() as u32,
            paused: self.paused.load(Ordering::SeqCst),
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
            migration: self.migration.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            failed_vcpus: self
                .exits
                .failed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        })
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

    /// Rebuild the VM on a brand-new KVM VM sharing the same memory and devices: pause, save
    /// every vCPU and the irqchip/PIT/clock, create the new VM, restore in order, resume.
    /// mp_states come back exactly (halted offlined CPUs stay halted with their SW-disabled
    /// APIC, never-onlined ones stay UNINITIALIZED). Returns the per-vCPU save and restore
    /// times in microseconds.
    pub fn transplant(&self) -> Result<(Vec<f64>, Vec<f64>), ControlError> {
        self.not_migrating()?;
        let mut vcpus = self.lock_vcpus_or_busy()?;
        vcpus
            .pause_all()
            .map_err(|e| ControlError::Internal(e.to_string()))?;
        let mut vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        match self.build_replacement(&vcpus, &vm) {
            Ok((fresh, new_vm, times)) => {
                // Old vCPUs go before the old VM fd; then the new set runs.
                let mut old = std::mem::replace(&mut *vcpus, fresh);
                old.stop_all();
                drop(old);
                drop(std::mem::replace(&mut *vm, new_vm));
                drop(vm);
                vcpus.resume_all();
                self.paused.store(false, Ordering::SeqCst);
                Ok(times)
            }
            Err(e) => {
                // Nothing was switched: the old VM runs on as before.
                drop(vm);
                vcpus.resume_all();
                self.paused.store(false, Ordering::SeqCst);
                Err(e)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn build_replacement(
        &self,
        vcpus: &VcpuManager,
        vm: &VmFd,
    ) -> Result<(VcpuManager, VmFd, (Vec<f64>, Vec<f64>)), ControlError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| ControlError::Internal(format!("{what}: {e}"));
        let (states, kvm_state, save_us) = capture(vcpus, vm, &self.msrs).map_err(ControlError::Internal)?;
        let new_vm = create_kvm_vm(&self.kvm, &self.topology, &self.mem).map_err(|e| fail("new VM", &e))?;
        restore_kvm_vm_state(&new_vm, &kvm_state).map_err(ControlError::Internal)?;
        let mut fresh = VcpuManager::new(
            self.topology,
            self.supported_cpuid.clone(),
            self.exits.clone(),
            vcpus.conventions(),
        );
        let restore_us = restore_vcpus(&self.kvm, &new_vm, &mut fresh, &states, Some(vcpus.conventions()))
            .map_err(ControlError::Internal)?;
        // Move the interrupt lines last: an eventfd can feed only one VM's irqfd at a time.
        let _ = vm.unregister_irqfd(&self.serial_irq, COM1_IRQ);
        let _ = self.sci.unregister(vm);
        let moved = new_vm
            .register_irqfd(&self.serial_irq, COM1_IRQ)
            .map_err(|e| fail("KVM_IRQFD(serial)", &e))
            .and_then(|_| self.sci.register(&new_vm).map_err(|e| fail("KVM_IRQFD(SCI)", &e)));
        if let Err(e) = moved {
            let _ = new_vm.unregister_irqfd(&self.serial_irq, COM1_IRQ);
            let _ = vm.register_irqfd(&self.serial_irq, COM1_IRQ);
            let _ = self.sci.register(vm);
            return Err(e);
        }
        Ok((fresh, new_vm, (save_us, restore_us)))
    }

    /// Save every vCPU, the KVM VM state and the devices of the VM, whose vCPUs the caller has
    /// paused (`vcpus` is the held manager). The caller decides when to resume: a snapshot
    /// right after writing RAM, a migration only if it fails.
    pub(crate) fn save_paused(&self, vcpus: &VcpuManager) -> Result<SavedVm, ControlError> {
        let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        let (states, kvm_state, _) = capture(vcpus, &vm, &self.msrs).map_err(ControlError::Internal)?;
        drop(vm);
        let acpi = self.lock_dev().state();
        let serial = {
            // Console input stops with the capture: a byte taken after it would be lost with
            // a VM that migrates away. The caller resumes it if this VM runs on.
            let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
            serial.quiesce_input();
            serial.state()
        };
        let pending_removals = self
            .pending_removals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        let mut saved = SavedVm {
            vm: crate::snapshot::VmState {
                max_vcpus: self.topology.max_vcpus(),
                boot_vcpus: self.boot_vcpus,
                memory: vm_migration::memory::MemoryLayout::of(&self.mem),
                conventions: vcpus.conventions(),
                msrs: self.msrs.clone(),
                kvm: kvm_state,
                acpi,
                serial,
                pending_removals,
                paused: self.paused.load(Ordering::SeqCst),
                image: None,
            },
            vcpus: states,
        };
        // An eject the worker has not finished yet is saved as done.
        saved.reconcile_ejects();
        Ok(saved)
    }

    /// Write a snapshot of the VM into `dir` (`state.bin` + `memory.bin`). The VM is paused
    /// meanwhile and runs on afterwards (unless it was paused before). Returns
    /// (state bytes, milliseconds the VM was paused).
    pub fn snapshot(&self, dir: &std::path::Path) -> Result<(u64, f64), ControlError> {
        if self.migrating.swap(true, Ordering::SeqCst) {
            return Err(ControlError::Busy(
                "a snapshot or migration is in progress".into(),
            ));
        }
        let t = std::time::Instant::now();
        let vcpus = self.lock_vcpus();
        let result = vcpus
            .pause_all()
            .map_err(|e| ControlError::Internal(e.to_string()))
            .and_then(|_| self.save_paused(&vcpus))
            .and_then(|saved| {
                crate::snapdir::write_dir(dir, &saved, &self.mem)
                    .map_err(|e| ControlError::Internal(format!("writing the snapshot: {e}")))
            });
        if !self.paused.load(Ordering::SeqCst) {
            vcpus.resume_all();
        }
        drop(vcpus);
        self.resume_input();
        self.migrating.store(false, Ordering::SeqCst);
        result.map(|n| (n, t.elapsed().as_secs_f64() * 1e3))
    }

    /// Console input flows again after a capture (this VM runs on).
    pub(crate) fn resume_input(&self) {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resume_input();
    }

    /// Save every vCPU (the VM must be paused).
    pub fn save_vcpus(&self) -> Result<Vec<(u32, vcpu_manager::VcpuState)>, ControlError> {
        self.lock_vcpus()
            .save_all(&self.msrs)
            .map_err(|e| ControlError::Internal(e.to_string()))
    }
}

/// A running VM.
pub struct Vm {
    inner: Arc<VmInner>,
    events: mpsc::Receiver<VmEvent>,
    stop: Arc<AtomicBool>,
    _console: Option<Arc<SocketConsole>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("topology", &self.inner.topology)
            .finish()
    }
}

/// Check the configuration against the host before building anything.
pub fn validate(config: &VmConfig, kvm: &Kvm) -> Result<(), VmmError> {
    if let KernelSource::Path(p) = &config.kernel {
        check_kernel_file(p)?;
    }
    if let Some(p) = &config.initramfs {
        if let Err(e) = std::fs::metadata(p) {
            return Err(ConfigError::Initramfs {
                path: p.display().to_string(),
                reason: e.to_string(),
            }
            .into());
        }
    }
    let limit = kvm.get_max_vcpus() as u32;
    if config.cpus.max > limit {
        return Err(ConfigError::Cpus(format!(
            "max={} exceeds KVM's limit of {limit} vCPUs",
            config.cpus.max
        ))
        .into());
    }
    // Without interrupt remapping Linux reaches CPUs through 8-bit I/O APIC and MSI
    // destinations and never onlines one whose APIC id is above 255 (x2apic_set_max_apicid).
    // KVM_FEATURE_MSI_EXT_DEST_ID lifts that only with a split irqchip, which this VMM lacks.
    if let KernelSource::Path(p) = &config.kernel {
        if Topology::new(config.cpus.max).max_apic_id() > 255 && boot::is_bzimage(p) {
            return Err(ConfigError::Cpus(format!(
                "max={}: a Linux guest cannot use CPUs with APIC ids above 255 on this VMM \
                 (in-kernel I/O APIC, no MSI extended destination ids); use max=256 or less",
                config.cpus.max
            ))
            .into());
        }
    }
    if config.kernel == KernelSource::Embedded && config.cpus.max as usize > test_guest::MAX_CPUS {
        return Err(ConfigError::Cpus(format!(
            "max={} exceeds the test guest's limit of {} CPUs",
            config.cpus.max,
            test_guest::MAX_CPUS
        ))
        .into());
    }
    Ok(())
}

/// Open `/dev/kvm`.
pub fn open_kvm() -> Result<Kvm, VmmError> {
    Kvm::new().map_err(kvm_err("opening /dev/kvm"))
}

/// How a VM comes to life: booted from a kernel, or restored from saved state.
enum Origin {
    /// Fresh boot: the BSP enters the kernel at `entry`.
    Boot(boot::EntryPoint),
    /// Restore: vCPUs, KVM VM state and devices from `SavedVm`; RAM is already in place.
    /// With conventions given (probed ahead of time), no probe runs on the restore path.
    Restore(Box<SavedVm>, Option<KvmConventions>),
}

pub(crate) fn check_caps(kvm: &Kvm) -> Result<(), VmmError> {
    for cap in [
        Cap::Irqchip,
        Cap::IrqRouting,
        Cap::Irqfd,
        Cap::ImmediateExit,
        Cap::UserMemory,
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmmError::Io {
                what: format!("KVM lacks {cap:?}"),
                source: std::io::Error::from(std::io::ErrorKind::Unsupported),
            });
        }
    }
    // Any XSAVE area size is fine: vcpu-manager saves it whole with KVM_GET_XSAVE2 (the
    // part beyond 4 KiB only exists for features such as AMX, which this VMM never requests).
    Ok(())
}

impl Vm {
    /// Build the VM described by `config` and start its boot vCPUs.
    pub fn start(config: &VmConfig) -> Result<Vm, VmmError> {
        let kvm = open_kvm()?;
        validate(config, &kvm)?;
        check_caps(&kvm)?;
        let topology = Topology::new(config.cpus.max);
        let mem = boot::create_memory(config.memory)?;
        let layout = HotplugLayout::default();
        let tables = acpi::build(&AcpiConfig {
            topology,
            boot_cpus: config.cpus.boot,
            hotplug: layout,
        })?;
        for t in &tables {
            mem.write_slice(&t.bytes, GuestAddress(t.addr))
                .map_err(|e| VmmError::Io {
                    what: format!("writing ACPI {}: {e}", t.name),
                    source: std::io::Error::from(std::io::ErrorKind::InvalidData),
                })?;
        }
        let entry = boot::load_kernel(
            &mem,
            config.memory,
            &config.kernel,
            config.initramfs.as_deref(),
            config.cmdline.as_deref(),
            acpi::RSDP_ADDR,
        )?;
        let vm = create_kvm_vm(&kvm, &topology, &mem)?;
        Vm::assemble(
            kvm,
            vm,
            topology,
            config.cpus.boot,
            mem,
            &config.serial,
            Origin::Boot(entry),
        )
    }

    /// Restore a VM saved by [`VmInner::snapshot`] into this process: RAM is mapped
    /// copy-on-write from the snapshot's memory image, every saved vCPU comes back with its
    /// exact mp_state, LAPIC and registers, devices with their registers and pending events.
    /// The VM runs afterwards unless it was paused when saved.
    pub fn restore(dir: &std::path::Path, serial: &SerialMode) -> Result<Vm, VmmError> {
        let (saved, mem) = crate::snapdir::read_dir(dir).map_err(VmmError::Snapshot)?;
        Vm::from_saved(saved, mem, serial, false, None)
    }

    /// Restore from an already decoded state and RAM (restore and live migration). With
    /// `hold`, the vCPUs stay paused until [`VmInner::resume`] (a migration destination
    /// resumes only once the source has its acknowledgement). `prepared` is a KVM VM made
    /// ahead of time by [`Prepared::new`] for this RAM, which keeps VM creation, memory
    /// registration and the LAPIC conventions probe out of a migration's downtime.
    pub fn from_saved(
        saved: SavedVm,
        mem: GuestMemory,
        serial: &SerialMode,
        hold: bool,
        prepared: Option<Prepared>,
    ) -> Result<Vm, VmmError> {
        let topology = Topology::new(saved.vm.max_vcpus);
        let prepared = match prepared {
            Some(p) if p.topology == topology => p,
            _ => {
                let kvm = open_kvm()?;
                check_caps(&kvm)?;
                let vm = create_kvm_vm(&kvm, &topology, &mem)?;
                Prepared {
                    kvm,
                    vm,
                    conv: None,
                    topology,
                }
            }
        };
        check_compat(&prepared.kvm, &saved)?;
        if !saved.vm.memory.matches(&mem) {
            return Err(VmmError::Snapshot(crate::snapshot::SnapshotError::Incompatible(
                "guest RAM does not match the saved memory layout".into(),
            )));
        }
        let boot_vcpus = saved.vm.boot_vcpus;
        let mut saved = saved;
        saved.vm.paused |= hold;
        let Prepared { kvm, vm, conv, .. } = prepared;
        Vm::assemble(
            kvm,
            vm,
            topology,
            boot_vcpus,
            mem,
            serial,
            Origin::Restore(Box::new(saved), conv),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        kvm: Kvm,
        vm: VmFd,
        topology: Topology,
        boot_vcpus: u32,
        mem: GuestMemory,
        serial_mode: &SerialMode,
        origin: Origin,
    ) -> Result<Vm, VmmError> {
        if let Origin::Restore(saved, _) = &origin {
            // The irqchip, PIT and clock before any vCPU or interrupt line exists.
            restore_kvm_vm_state(&vm, &saved.vm.kvm).map_err(|e| VmmError::Io {
                what: e,
                source: std::io::Error::other("restoring KVM VM state"),
            })?;
        }
        let layout = HotplugLayout::default();
        let (ev_tx, events) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut io = IoManager::new();

        // COM1 on GSI 4 through an irqfd (attached to the VM once the vCPUs exist).
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmmError::Io {
            what: "eventfd".into(),
            source,
        })?;
        let serial_irq_clone = serial_irq.try_clone().map_err(|source| VmmError::Io {
            what: "eventfd".into(),
            source,
        })?;
        let mut console = None;
        let mut listener: Option<UnixListener> = None;
        let out = match serial_mode {
            SerialMode::Stdout => ConsoleOut::Stdout(std::io::stdout()),
            SerialMode::File(p) => ConsoleOut::File(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| VmmError::Io {
                        what: format!("--serial file={}", p.display()),
                        source,
                    })?,
            ),
            SerialMode::Socket(p) => {
                let (c, l) = SocketConsole::bind(p).map_err(|source| VmmError::Io {
                    what: format!("--serial socket={}", p.display()),
                    source,
                })?;
                console = Some(c.clone());
                listener = Some(l);
                ConsoleOut::Socket(c)
            }
        };
        let serial_dev = match &origin {
            Origin::Boot(_) => SerialDevice::new(serial_irq, out),
            Origin::Restore(saved, _) => SerialDevice::from_state(&saved.vm.serial, serial_irq, out)
                .map_err(|source| VmmError::Io {
                    what: "restoring COM1".into(),
                    source,
                })?,
        };
        let serial = Arc::new(Mutex::new(serial_dev));
        register(&mut io, COM1_PORT, 8, serial.clone())?;
        if let (Some(c), Some(l)) = (console.clone(), listener) {
            let (s, st) = (serial.clone(), stop.clone());
            std::thread::Builder::new()
                .name("console".into())
                .spawn(move || {
                    crate::seccomp::apply_or_warn(crate::seccomp::ThreadKind::Device);
                    serve_socket(c, l, s, st)
                })
                .map_err(|source| VmmError::Io {
                    what: "console thread".into(),
                    source,
                })?;
        } else if *serial_mode == SerialMode::Stdout {
            let (s, st) = (serial.clone(), stop.clone());
            std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || {
                    crate::seccomp::apply_or_warn(crate::seccomp::ThreadKind::Device);
                    crate::devices::pump_input(&s, std::io::stdin(), &st)
                })
                .map_err(|source| VmmError::Io {
                    what: "stdin thread".into(),
                    source,
                })?;
        }

        // ACPI PM1/GPE0 and the CPU hotplug block, with the SCI as a level line.
        let sci = Arc::new(
            LevelIrq::unregistered(u32::from(layout.pm.sci_irq)).map_err(|source| VmmError::Io {
                what: "SCI irqfd".into(),
                source,
            })?,
        );
        let apic_ids: Vec<u32> = (0..topology.max_vcpus()).map(|i| topology.apic_id(i)).collect();
        let (eject_tx, eject_rx) = mpsc::channel();
        let hotplug_events = Arc::new(HotplugEvents {
            ejected: Mutex::default(),
            worker: Mutex::new(eject_tx),
        });
        let power = Arc::new(PowerButton(Mutex::new(ev_tx.clone())));
        let acpi_dev = match &origin {
            Origin::Boot(_) => AcpiHotplugDevice::new(
                layout,
                &apic_ids,
                boot_vcpus,
                sci.clone(),
                power,
                hotplug_events.clone(),
            ),
            Origin::Restore(saved, _) => AcpiHotplugDevice::from_state(
                layout,
                &apic_ids,
                &saved.vm.acpi,
                sci.clone(),
                power,
                hotplug_events.clone(),
            )
            .map_err(|e| VmmError::Io {
                what: format!("restoring the ACPI hotplug device: {e}"),
                source: std::io::Error::from(std::io::ErrorKind::InvalidData),
            })?,
        };
        let acpi_dev = Arc::new(Mutex::new(acpi_dev));
        for (base, len) in layout.pio_ranges() {
            register(&mut io, base, len, acpi_dev.clone())?;
        }

        let exits = Arc::new(Exits {
            io,
            events: Mutex::new(ev_tx.clone()),
            failed: Mutex::default(),
        });
        let supported = match &origin {
            Origin::Boot(_) => host_model(&kvm)?,
            // The VM keeps its CPU model: CPUs hot-added later get CPU 0's CPUID (with their
            // own APIC ids), not whatever this host would offer a new VM.
            Origin::Restore(saved, _) => match saved.vcpus.first() {
                Some((_, st)) => st.cpuid.clone(),
                None => host_model(&kvm)?,
            },
        };
        let mut vcpus = VcpuManager::new(
            topology,
            supported.clone(),
            exits.clone(),
            KvmConventions::CANONICAL,
        );
        let (msrs, pending, paused) = match &origin {
            Origin::Boot(entry) => {
                let mut fds = Vec::new();
                for i in 0..boot_vcpus {
                    let fd = vcpus.prepare(&vm, i)?;
                    if i == 0 {
                        // The BSP enters the kernel directly in 64-bit mode.
                        let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                        fd.set_sregs(&boot::bsp_sregs(sregs))
                            .map_err(kvm_err("KVM_SET_SREGS"))?;
                        fd.set_regs(&boot::bsp_regs(*entry))
                            .map_err(kvm_err("KVM_SET_REGS"))?;
                        fd.set_fpu(&boot::boot_fpu()).map_err(kvm_err("KVM_SET_FPU"))?;
                        vcpus.set_conventions(detect_conventions(&kvm, &fd, &topology)?);
                        // The VM's TSC rate is this host's now; it travels with the VM.
                        vcpus.set_tsc_khz(fd.get_tsc_khz().ok());
                    }
                    fds.push(fd);
                }
                let msrs = match fds.first() {
                    Some(fd) => vcpu_manager::msr_list(&kvm, fd)?,
                    None => Vec::new(),
                };
                for (i, fd) in fds.into_iter().enumerate() {
                    vcpus.start_paused(i as u32, fd)?;
                }
                (msrs, BTreeSet::new(), false)
            }
            Origin::Restore(saved, conv) => {
                // The saved TSC rate, for the restored vCPUs and any hot-added later.
                vcpus.set_tsc_khz(saved.vcpus.first().and_then(|(_, st)| st.tsc_khz));
                restore_vcpus(&kvm, &vm, &mut vcpus, &saved.vcpus, *conv).map_err(|e| VmmError::Io {
                    what: e,
                    source: std::io::Error::other("restoring vCPUs"),
                })?;
                (
                    saved.vm.msrs.clone(),
                    saved.vm.pending_removals.iter().copied().collect(),
                    saved.vm.paused,
                )
            }
        };
        // Interrupt lines last: the IOAPIC state and every LAPIC exist, so a line that is
        // high in the saved state is delivered, not dropped.
        vm.register_irqfd(&serial_irq_clone, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD(serial)"))?;
        sci.register(&vm).map_err(|source| VmmError::Io {
            what: "KVM_IRQFD(SCI)".into(),
            source,
        })?;
        let inner = Arc::new(VmInner {
            vcpus: Mutex::new(vcpus),
            acpi_dev,
            hotplug_events,
            pending_removals: Mutex::new(pending),
            paused: AtomicBool::new(paused),
            events_tx: Mutex::new(ev_tx),
            topology,
            boot_vcpus,
            msrs,
            supported_cpuid: supported,
            exits,
            serial,
            serial_irq: serial_irq_clone,
            sci,
            migrating: AtomicBool::new(false),
            migration_ctl: std::sync::atomic::AtomicU8::new(0),
            migration: Mutex::new(None),
            vm: Mutex::new(vm),
            mem,
            kvm,
        });
        // Eject worker: joins ejected vCPUs off the vCPU threads (they hold the device lock).
        let weak: Weak<VmInner> = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("eject-worker".into())
            .spawn(move || {
                crate::seccomp::apply_or_warn(crate::seccomp::ThreadKind::Device);
                for cpu in eject_rx {
                    match weak.upgrade() {
                        Some(inner) => inner.finish_removal(cpu),
                        None => return,
                    }
                }
            })
            .map_err(|source| VmmError::Io {
                what: "eject worker thread".into(),
                source,
            })?;
        if !paused {
            inner.lock_vcpus().resume_all();
        }
        Ok(Vm {
            inner,
            events,
            stop,
            _console: console,
        })
    }

    /// The control interface (shared with the API server).
    pub fn control(&self) -> Arc<VmInner> {
        self.inner.clone()
    }

    /// Wait for the VM to end (power-off, shutdown request, guest failure), up to `timeout`.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<VmOutcome> {
        let ev = match timeout {
            Some(t) => self.events.recv_timeout(t).ok()?,
            None => self.events.recv().ok()?,
        };
        Some(match ev {
            VmEvent::PowerOff => VmOutcome::PowerOff,
            VmEvent::Shutdown => VmOutcome::Shutdown,
            VmEvent::Migrated => VmOutcome::Migrated,
            VmEvent::VcpuFailed(i, r) => VmOutcome::GuestError(format!("vCPU {i}: {r}")),
        })
    }

    fn with_vcpu<R: Send + 'static>(
        &self,
        index: u32,
        f: impl FnOnce(&mut kvm_ioctls::VcpuFd) -> Option<R> + Send + 'static,
    ) -> Option<R> {
        let vcpus = self.inner.lock_vcpus();
        vcpus.runner(index)?.with_vcpu(VCPU_REQUEST_TIMEOUT, f).flatten()
    }

    /// KVM's mp_state of running vCPU `index` (`KVM_MP_STATE_*`).
    pub fn mp_state(&self, index: u32) -> Option<u32> {
        self.with_vcpu(index, |fd| fd.get_mp_state().ok().map(|m| m.mp_state))
    }

    /// The LAPIC register page of running vCPU `index`.
    pub fn lapic(&self, index: u32) -> Option<LapicPage> {
        self.with_vcpu(index, |fd| fd.get_lapic().ok().map(LapicPage::from))
    }

    /// IA32_APIC_BASE of running vCPU `index` (from its SREGS).
    pub fn apic_base(&self, index: u32) -> Option<u64> {
        self.with_vcpu(index, |fd| fd.get_sregs().ok().map(|s| s.apic_base))
    }

    /// The ACPI PM/GPE/CPU hotplug device.
    pub fn acpi_device(&self) -> &Arc<Mutex<AcpiHotplugDevice>> {
        &self.inner.acpi_dev
    }

    /// Ejects and `_OST` reports from the guest.
    pub fn hotplug_events(&self) -> &Arc<HotplugEvents> {
        &self.inner.hotplug_events
    }

    /// The topology.
    pub fn topology(&self) -> Topology {
        self.inner.topology
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.inner.mem
    }

    /// The KVM system fd.
    pub fn kvm(&self) -> &Kvm {
        &self.inner.kvm
    }

    /// Stop every vCPU and join the threads.
    pub fn shutdown(self) {
        drop(self);
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.inner.lock_vcpus().stop_all();
        // The API server and other threads may still hold the VM's state: the console
        // socket goes now, not when the last of them lets go.
        if let Some(c) = &self._console {
            c.close();
        }
    }
}

/// The CPU model of a new VM on this host (see `vcpu_manager::cpuid::host_model`).
pub(crate) fn host_model(kvm: &Kvm) -> Result<kvm_bindings::CpuId, VmmError> {
    vcpu_manager::cpuid::host_model(kvm, vcpu_manager::cpuid::Backend::detect())
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
}

/// What a VM may have to run on this host (see `vcpu_manager::cpuid::host_supported`).
pub(crate) fn host_supported(kvm: &Kvm) -> Result<kvm_bindings::CpuId, VmmError> {
    vcpu_manager::cpuid::host_supported(kvm, vcpu_manager::cpuid::Backend::detect())
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
}

/// The PC's interrupt wiring, as the MADT describes it: ISA IRQ 0 (the PIT) on I/O APIC pin 2
/// (our MADT's interrupt source override, as on every PC), the other ISA IRQs and GSIs 16-23
/// on the pin of their number, IRQs 0-15 also on the 8259s (except 2, the cascade).
/// KVM's default table wires GSI 0 to I/O APIC pin 0, where Linux never looks: its PIT ticks
/// would be lost, its LAPIC timer then fails verification against jiffies, and its clock
/// stops. QEMU installs the same table (`kvm_pc_setup_irq_routing`).
fn pc_gsi_routing() -> Result<KvmIrqRouting, VmmError> {
    let chip = |gsi: u32, irqchip: u32, pin: u32| {
        let mut e = kvm_irq_routing_entry {
            gsi,
            type_: KVM_IRQ_ROUTING_IRQCHIP,
            ..Default::default()
        };
        e.u.irqchip.irqchip = irqchip;
        e.u.irqchip.pin = pin;
        e
    };
    let mut entries = Vec::with_capacity(40);
    for irq in (0..16).filter(|&i| i != 2) {
        let (pic, pin) = if irq < 8 {
            (KVM_IRQCHIP_PIC_MASTER, irq)
        } else {
            (KVM_IRQCHIP_PIC_SLAVE, irq - 8)
        };
        entries.push(chip(irq, pic, pin));
    }
    entries.push(chip(0, KVM_IRQCHIP_IOAPIC, 2));
    for gsi in (1..IOAPIC_PINS).filter(|&g| g != 2) {
        entries.push(chip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    KvmIrqRouting::from_entries(&entries).map_err(|_| VmmError::Io {
        what: "the GSI routing table".into(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

/// Pins of KVM's in-kernel I/O APIC.
const IOAPIC_PINS: u32 = 24;

/// A KVM VM with the in-kernel irqchip and PIT, the x2APIC API when APIC ids need it, and
/// `mem` registered. Used at boot and when the VM is rebuilt from saved state.
pub(crate) fn create_kvm_vm(kvm: &Kvm, topology: &Topology, mem: &GuestMemory) -> Result<VmFd, VmmError> {
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
    vm.set_gsi_routing(&pc_gsi_routing()?)
        .map_err(kvm_err("KVM_SET_GSI_ROUTING"))?;
    if topology.needs_x2apic() {
        // APIC ids above 254 only exist with 32-bit x2APIC ids; must precede vCPU creation.
        let cap = kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_X2APIC_API,
            args: [X2APIC_API_FLAGS, 0, 0, 0],
            ..Default::default()
        };
        vm.enable_cap(&cap)
            .map_err(kvm_err("KVM_ENABLE_CAP(X2APIC_API)"))?;
    }
    register_memory(&vm, mem, 0)?;
    Ok(vm)
}

/// Register (or re-register with other `flags`, e.g. `KVM_MEM_LOG_DIRTY_PAGES`) every RAM
/// region of `mem` as KVM memory slots 0.. in order.
pub(crate) fn register_memory(vm: &VmFd, mem: &GuestMemory, flags: u32) -> Result<(), VmmError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| VmmError::Io {
                what: format!("guest memory host address: {e}"),
                source: std::io::Error::from(std::io::ErrorKind::InvalidData),
            })?;
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which VmInner keeps for as long
        // as any VM fd it created exists (field order in `VmInner`).
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

fn register<D>(io: &mut IoManager, base: u16, len: u16, dev: Arc<D>) -> Result<(), VmmError>
where
    D: DevicePio + Send + Sync + 'static,
{
    let range = PioRange::new(PioAddress(base), len).map_err(|e| VmmError::Io {
        what: format!("I/O range {base:#x}+{len}: {e}"),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    io.register_pio(range, dev).map_err(|e| VmmError::Io {
        what: format!("registering ports {base:#x}+{len}: {e}"),
        source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pit_is_on_ioapic_pin_2_like_the_madt_says() {
        let table = pc_gsi_routing().expect("routing");
        let entries = table.as_slice();
        let routes: Vec<(u32, u32, u32)> = entries
            .iter()
            .map(|e| {
                assert_eq!(e.type_, KVM_IRQ_ROUTING_IRQCHIP);
                // SAFETY: the type is KVM_IRQ_ROUTING_IRQCHIP, so `irqchip` is the union's variant.
                unsafe { (e.gsi, e.u.irqchip.irqchip, e.u.irqchip.pin) }
            })
            .collect();
        let ioapic = |gsi: u32| {
            routes
                .iter()
                .find(|r| r.0 == gsi && r.1 == KVM_IRQCHIP_IOAPIC)
                .map(|r| r.2)
        };
        assert_eq!(ioapic(0), Some(2), "ISA IRQ 0 -> GSI 2 (MADT override)");
        assert!(
            routes.iter().all(|r| r.0 != 2),
            "GSI 2 (the cascade) is not routed"
        );
        assert_eq!(
            (ioapic(4), ioapic(9), ioapic(23)),
            (Some(4), Some(9), Some(23)),
            "COM1, SCI"
        );
        assert!(
            routes.contains(&(0, KVM_IRQCHIP_PIC_MASTER, 0)),
            "PIT on the 8259 too"
        );
        assert_eq!(entries.len(), 15 + 23);
    }
}
