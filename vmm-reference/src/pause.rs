// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Pausing every vCPU for an operation (a snapshot, a migration's hand-over, a rebuild on a
//! new KVM VM, a throttle period) and resuming them however the operation ends.

use std::sync::{Mutex, MutexGuard};

use vcpu_manager::VcpuManager;

/// Every vCPU paused (none inside `KVM_RUN`, pending I/O completed) while this lives.
/// Dropping it resumes them, unless the VM's user had paused it before (that pause is theirs
/// to end) or [`PauseGuard::keep`] said the VM stays paused (it now runs elsewhere).
pub struct PauseGuard<'a> {
    vcpus: &'a Mutex<VcpuManager>,
    /// The manager, locked; `None` after [`PauseGuard::unlock`].
    held: Option<MutexGuard<'a, VcpuManager>>,
    resume: bool,
}

impl<'a> PauseGuard<'a> {
    /// Pause the vCPUs of `vcpus`, whose lock the caller holds as `held` (taken in whatever
    /// way suits it: waiting, or answering busy). `user_paused`: the VM is paused by its
    /// user, so it stays paused afterwards. If pausing fails, the vCPUs that did pause run
    /// again before the error returns.
    pub fn new(
        vcpus: &'a Mutex<VcpuManager>,
        held: MutexGuard<'a, VcpuManager>,
        user_paused: bool,
    ) -> Result<Self, vcpu_manager::Error> {
        let paused = held.pause_all();
        let guard = PauseGuard {
            vcpus,
            held: Some(held),
            resume: !user_paused,
        };
        // On error the guard drops here: a pause that half failed leaves no vCPU held.
        paused.map(|()| guard)
    }

    /// The vCPU manager, locked again if [`PauseGuard::unlock`] let it go.
    pub fn manager(&mut self) -> &mut VcpuManager {
        let vcpus = self.vcpus;
        self.held
            .get_or_insert_with(|| vcpus.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Let the manager's lock go while the vCPUs stay paused (others may look at it, e.g.
    /// the eject worker, while a migration sends its last pages).
    pub fn unlock(&mut self) {
        self.held = None;
    }

    /// The VM stays paused when this is dropped.
    pub fn keep(mut self) {
        self.resume = false;
    }
}

impl Drop for PauseGuard<'_> {
    fn drop(&mut self) {
        if self.resume {
            self.manager().resume_all();
        }
    }
}
