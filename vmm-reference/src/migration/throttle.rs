// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Slowing a guest down so that pre-copy converges (the `throttle` timeout strategy): a
//! thread pauses every vCPU for a share of each 100 ms, raised one step per extra round.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::thread::Scope;
use std::time::Duration;

use crate::pause::PauseGuard;
use crate::vm::VmInner;

/// Throttle per extra round (percent of the time the vCPUs are held paused).
pub(super) const STEPS: [u32; 8] = [20, 35, 50, 65, 80, 95, 95, 95];
/// One throttle period.
const PERIOD: Duration = Duration::from_millis(100);

/// The throttle of one migration.
#[derive(Debug, Default)]
pub(super) struct Throttle {
    percent: AtomicU32,
    step: AtomicUsize,
    running: AtomicBool,
    stop: AtomicBool,
}

/// Stops the throttle thread when dropped.
pub(super) struct StopOnDrop<'a>(&'a Throttle);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.stop.store(true, Ordering::SeqCst);
    }
}

impl Throttle {
    /// Current throttle (percent).
    pub(super) fn percent(&self) -> u32 {
        self.percent.load(Ordering::SeqCst)
    }

    /// A guard that stops the thread (which then leaves every vCPU running) when dropped.
    pub(super) fn stop_on_drop(&self) -> StopOnDrop<'_> {
        StopOnDrop(self)
    }

    /// Go to the next step, starting the thread on the first one in `scope`. False once
    /// every step was taken.
    pub(super) fn step_up<'scope, 'env>(
        &'env self,
        scope: &'scope Scope<'scope, 'env>,
        vm: &'env VmInner,
    ) -> bool {
        let Some(p) = STEPS.get(self.step.fetch_add(1, Ordering::SeqCst)) else {
            return false;
        };
        self.percent.store(*p, Ordering::SeqCst);
        log::info!("migration: throttling the guest to {}% of its time", 100 - p);
        if !self.running.swap(true, Ordering::SeqCst) {
            let spawned = std::thread::Builder::new()
                .name("mig-throttle".into())
                .spawn_scoped(scope, move || self.run(vm));
            if let Err(e) = spawned {
                log::warn!("no throttle thread ({e}): the migration goes on unthrottled");
            }
        }
        true
    }

    fn run(&self, vm: &VmInner) {
        while !self.stop.load(Ordering::SeqCst) {
            let held = PERIOD * self.percent() / 100;
            // A VM the user paused stays as it is (resuming it here would undo that).
            if !vm.paused.load(Ordering::SeqCst) {
                // The guard resumes them after `held` (a pause that half failed at once).
                if let Ok(mut paused) = PauseGuard::new(&vm.vcpus, vm.lock_vcpus(), false) {
                    paused.unlock();
                    std::thread::sleep(held);
                }
            }
            std::thread::sleep(PERIOD.saturating_sub(held));
        }
    }
}
