// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A running VM: the state its owner, the API server and the eject worker share
//! ([`VmInner`]), its pause, resume, shutdown and snapshot, and the owner's handle ([`Vm`]).
//! Building one is the `builder` module's; CPU control is the `cpus` module's.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::time::Duration;

use acpi_cpu_hotplug::AcpiHotplugDevice;
use kvm_ioctls::{Kvm, VmFd};
use lapic_state::LapicPage;
use vcpu_manager::{Topology, VcpuManager};

use crate::boot::GuestMemory;
use crate::devices::Devices;
use crate::error::ControlError;
use crate::exits::{Exits, HotplugEvents, VmEvent};
use crate::pause::PauseGuard;
use crate::restore::capture;
use crate::snapshot::SavedVm;
use crate::status::MigrationStatus;

/// How long a request to a vCPU thread may take.
const VCPU_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an API operation waits for the vCPU manager another operation holds.
const CONTROL_WAIT: Duration = Duration::from_secs(10);

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

/// State shared by the VM's owner, the API server and the eject worker.
pub struct VmInner {
    // Field order is drop order: vCPU threads stop before the fds and memory go away.
    pub(crate) vcpus: Mutex<VcpuManager>,
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
    pub(crate) devices: Devices,
    /// A snapshot or migration is in progress (control operations answer busy).
    pub(crate) migrating: AtomicBool,
    /// The VM is ending (shutdown asked, or the guest powered off): `vm.info` says
    /// `Shutdown`.
    pub(crate) ending: AtomicBool,
    /// The outgoing migration: running, cancelled (`vm.cancel-migration`) or committed
    /// (the destination has the VM); see `migration::ctl`.
    pub(crate) migration_ctl: AtomicU8,
    /// Progress of the current or last migration.
    pub(crate) migration: Mutex<Option<MigrationStatus>>,
    /// Bytes the current or last outgoing migration wrote to its link (see
    /// [`MigrationStatus::wire_bytes`]).
    pub(crate) wire_bytes: AtomicU64,
    pub(crate) vm: Mutex<VmFd>,
    pub(crate) mem: GuestMemory,
    pub(crate) kvm: Kvm,
}

impl VmInner {
    pub(crate) fn lock_vcpus(&self) -> MutexGuard<'_, VcpuManager> {
        self.vcpus.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The vCPU manager for an API operation. While a snapshot or migration holds the vCPUs
    /// (seconds, for a large VM) the caller gets "busy" at once instead of waiting; other
    /// holders (a pause, an eject) are waited for up to [`CONTROL_WAIT`].
    pub(crate) fn lock_vcpus_or_busy(&self) -> Result<MutexGuard<'_, VcpuManager>, ControlError> {
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
    pub(crate) fn not_migrating(&self) -> Result<(), ControlError> {
        if self.migrating.load(Ordering::SeqCst) {
            return Err(ControlError::Busy(
                "a snapshot or migration is in progress, retry".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn lock_dev(&self) -> MutexGuard<'_, AcpiHotplugDevice> {
        self.devices.lock_acpi()
    }

    /// Pause every vCPU (none inside KVM_RUN, pending I/O completed).
    pub fn pause(&self) -> Result<(), ControlError> {
        let vcpus = self.lock_vcpus_or_busy()?;
        self.not_migrating()?;
        // Kept paused on success; a pause that half failed resumes the vCPUs it paused. The
        // flag is set while the guard still holds the lock, so no add-cpu or transplant
        // waiting for it sees a paused VM as running.
        let paused = PauseGuard::new(&self.vcpus, vcpus, false).map_err(ControlError::pausing)?;
        self.paused.store(true, Ordering::SeqCst);
        paused.keep();
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
        // The flag changes while the lock is held, as in every pause and resume.
        let vcpus = self.lock_vcpus();
        vcpus.resume_all();
        self.paused.store(false, Ordering::SeqCst);
    }

    /// `vm.shutdown`: refused while a snapshot or migration runs (ending the VM then could
    /// leave a half-written snapshot or a destination waiting for a source that is gone).
    pub fn shutdown_checked(&self) -> Result<(), ControlError> {
        self.not_migrating()?;
        self.request_shutdown();
        Ok(())
    }

    /// SIGTERM/SIGINT: end the VM as `vm.shutdown` would, without refusing. An outgoing
    /// migration not yet past the destination's Ack is cancelled (the VM stays here, then
    /// ends); one past it, and a snapshot, are let finish (within `grace`): killing them
    /// would leave a destination waiting paused for a Complete, or a half-written snapshot.
    pub fn end_on_signal(&self, grace: Duration) {
        let _ = self.cancel_migration();
        let deadline = std::time::Instant::now() + grace;
        while self.migrating.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.request_shutdown();
    }

    /// Ask the VMM to end the VM (the owner's `wait` returns `Shutdown`).
    pub fn request_shutdown(&self) {
        self.ending.store(true, Ordering::SeqCst);
        let _ = self
            .events_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(VmEvent::Shutdown);
    }

    /// Save every vCPU, the KVM VM state and the devices of the VM, whose vCPUs the caller has
    /// paused (`vcpus` is the held manager). The caller decides when to resume: a snapshot
    /// right after writing RAM, a migration only if it fails.
    pub(crate) fn save_paused(&self, vcpus: &VcpuManager) -> Result<SavedVm, ControlError> {
        let vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        let (states, kvm_state, _) = capture(vcpus, &vm, &self.msrs).map_err(ControlError::Internal)?;
        drop(vm);
        // Console input stops with the capture; the caller resumes it if this VM runs on.
        let devices = self.devices.state();
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
                memory: vm_live_migration::memory::MemoryLayout::of(&self.mem),
                conventions: vcpus.conventions(),
                msrs: self.msrs.clone(),
                kvm: kvm_state,
                acpi: devices.acpi,
                serial: devices.serial,
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

    /// Write a snapshot of the VM into `dir` (`state.bin` + `memory-<id>.bin`). The VM is paused
    /// meanwhile and runs on afterwards (unless it was paused before). Returns
    /// (state bytes, milliseconds the VM was paused).
    pub fn snapshot(&self, dir: &std::path::Path) -> Result<(u64, f64), ControlError> {
        if self.migrating.swap(true, Ordering::SeqCst) {
            return Err(ControlError::Busy(
                "a snapshot or migration is in progress".into(),
            ));
        }
        let t = std::time::Instant::now();
        // The user's pause flag as it is once the lock is ours: a pause or resume that held
        // the lock before us has settled it.
        let held = self.lock_vcpus();
        let user_paused = self.paused.load(Ordering::SeqCst);
        let result = PauseGuard::new(&self.vcpus, held, user_paused)
            .map_err(ControlError::pausing)
            .and_then(|mut paused| {
                let saved = self.save_paused(paused.manager())?;
                // RAM while the vCPUs are still paused (the guard drops after this): the
                // image must be the memory the saved state belongs to.
                crate::snapdir::write_dir(dir, &saved, &self.mem).map_err(snapshot_write_error)
            });
        self.resume_input();
        self.migrating.store(false, Ordering::SeqCst);
        result.map(|n| (n, t.elapsed().as_secs_f64() * 1e3))
    }

    /// Console input flows again after a capture (this VM runs on).
    pub(crate) fn resume_input(&self) {
        self.devices.resume_input();
    }

    /// Save every vCPU (the VM must be paused).
    pub fn save_vcpus(&self) -> Result<Vec<(u32, vcpu_manager::VcpuState)>, ControlError> {
        let vcpus = self.lock_vcpus();
        vcpus
            .save_all(&vcpus.save_options(self.msrs.clone()))
            .map_err(|e| ControlError::Internal(e.to_string()))
    }
}

/// A running VM.
pub struct Vm {
    pub(crate) inner: Arc<VmInner>,
    pub(crate) events: mpsc::Receiver<VmEvent>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("topology", &self.inner.topology)
            .finish()
    }
}

impl Vm {
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
        // Whatever the reason, the VM is ending now: `vm.info` says so until the VMM exits.
        self.inner.ending.store(true, Ordering::SeqCst);
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
        self.inner.devices.acpi()
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
        self.inner.lock_vcpus().stop_all();
        // The API server and other threads may still hold the VM's state: the console
        // goes now, not when the last of them lets go.
        self.inner.devices.close();
    }
}

/// A snapshot that could not be written: another writer holding the directory is busy
/// (429), a destination the caller named wrongly is theirs to fix (400), the rest is ours
/// (500). The VM runs on in every case.
fn snapshot_write_error(e: crate::snapshot::SnapshotError) -> ControlError {
    let msg = format!("writing the snapshot: {e}");
    // By errno, not ErrorKind: EPERM (a call the seccomp filter refused) is ours, EACCES
    // (the directory's permissions) the caller's, and std maps both to PermissionDenied.
    let errno = match &e {
        crate::snapshot::SnapshotError::Io { source, .. } => source.raw_os_error(),
        _ => None,
    };
    match errno {
        Some(libc::EWOULDBLOCK) => ControlError::Busy(msg),
        Some(
            libc::ENOENT
            | libc::EACCES
            | libc::ENOTDIR
            | libc::EISDIR
            | libc::EROFS
            | libc::EEXIST
            | libc::ENAMETOOLONG,
        ) => ControlError::BadRequest(msg),
        _ => ControlError::Internal(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_write_errors_say_whose_they_are() {
        let io = |errno: i32| crate::snapshot::SnapshotError::Io {
            what: "x".into(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        let busy = snapshot_write_error(io(libc::EWOULDBLOCK));
        assert!(matches!(busy, ControlError::Busy(_)), "{busy:?}");
        for errno in [libc::EACCES, libc::ENOTDIR] {
            let e = snapshot_write_error(io(errno));
            assert!(matches!(e, ControlError::BadRequest(_)), "{e:?}");
        }
        // A call the seccomp filter refused, a full disk: the VMM's.
        for errno in [libc::EPERM, libc::ENOSPC] {
            let e = snapshot_write_error(io(errno));
            assert!(matches!(e, ControlError::Internal(_)), "{e:?}");
        }
    }
}
