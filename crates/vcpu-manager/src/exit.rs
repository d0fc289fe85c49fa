// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a VMM supplies to the vCPU threads ([`ExitHandler`]), what it answers for each exit
//! ([`ExitAction`]), and why a vCPU's thread ended ([`VcpuExitReason`]).

use kvm_ioctls::VcpuExit;

/// What the vCPU thread does once its handler has dealt with an exit.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ExitAction {
    /// Run the guest on.
    #[default]
    Continue,
    /// Pause the vCPU, as [`crate::VcpuRunner::request_pause`] would (pending I/O completed,
    /// requests still served), until [`crate::VcpuRunner::resume`].
    Pause,
    /// End the vCPU's thread with this reason (given to [`ExitHandler::vcpu_stopped`]).
    Stop(VcpuExitReason),
}

/// Receives a vCPU's exits. Implementations lock only what the access needs (no global
/// lock), since every vCPU thread calls in concurrently. Each exit method says what the
/// thread does next.
pub trait ExitHandler: Send + Sync {
    /// Guest `in` from `port`; fill `data`.
    fn pio_read(&self, port: u16, data: &mut [u8]) -> ExitAction;
    /// Guest `out` to `port`.
    fn pio_write(&self, port: u16, data: &[u8]) -> ExitAction;
    /// Guest MMIO read at `addr`; fill `data`.
    fn mmio_read(&self, addr: u64, data: &mut [u8]) -> ExitAction;
    /// Guest MMIO write at `addr`.
    fn mmio_write(&self, addr: u64, data: &[u8]) -> ExitAction;
    /// Any other exit the runner does not deal with itself (`KVM_EXIT_HLT` without an
    /// in-kernel LAPIC, `KVM_EXIT_SYSTEM_EVENT`, `KVM_EXIT_DEBUG`, Hyper-V, MSR exits, ...).
    /// The default ends the thread with [`VcpuExitReason::from_exit`]. The runner itself ends
    /// the thread only on `KVM_EXIT_SHUTDOWN`, `KVM_EXIT_FAIL_ENTRY`, `KVM_EXIT_INTERNAL_ERROR`
    /// and a failing `KVM_RUN`.
    fn other_exit(&self, index: u32, exit: VcpuExit<'_>) -> ExitAction {
        let _ = index;
        ExitAction::Stop(VcpuExitReason::from_exit(&exit))
    }
    /// The vCPU's run loop ended for the given reason (called from the vCPU thread).
    fn vcpu_stopped(&self, index: u32, reason: &VcpuExitReason);
    /// First thing on a new vCPU thread, before the vCPU runs: the place for per-thread
    /// setup such as a seccomp filter or CPU affinity. An error ends the thread with
    /// [`VcpuExitReason::SetupFailed`] before the vCPU ever runs. The default does nothing.
    fn vcpu_thread_started(&self, index: u32) -> std::result::Result<(), ThreadSetupError> {
        let _ = index;
        Ok(())
    }
}

/// What [`ExitHandler::vcpu_thread_started`] fails with: any error (its text ends up in
/// [`VcpuExitReason::SetupFailed`]).
pub type ThreadSetupError = Box<dyn std::error::Error + Send + Sync>;

/// Why a vCPU's run loop ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuExitReason {
    /// The VMM asked it to stop.
    Stopped,
    /// `KVM_EXIT_SHUTDOWN`: the guest triple-faulted (or otherwise reset the CPU).
    Shutdown,
    /// `KVM_EXIT_INTERNAL_ERROR`, e.g. an instruction KVM's emulator cannot handle.
    InternalError {
        /// KVM suberror (1 = emulation failure).
        suberror: u32,
        /// Guest RIP at the failure, if it could be read.
        rip: Option<u64>,
    },
    /// `KVM_EXIT_FAIL_ENTRY` with the hardware reason.
    FailEntry(u64),
    /// `KVM_EXIT_SYSTEM_EVENT` of the given type (shutdown, reset, crash).
    SystemEvent(u32),
    /// `KVM_EXIT_HLT` (only without an in-kernel LAPIC).
    Hlt,
    /// An exit this runner does not handle, with its KVM exit reason.
    Unsupported(u32),
    /// An exit KVM names that neither the runner nor the handler dealt with.
    Unhandled(String),
    /// `KVM_RUN` failed with this errno.
    RunError(i32),
    /// The exit handler panicked on this vCPU's thread (the message, if it was text). The
    /// thread ends normally and hands its fd back, so the slot can be parked and reused.
    Panicked(String),
    /// [`ExitHandler::vcpu_thread_started`] failed (the error and its sources, as text: the
    /// reason is kept and compared); the vCPU never ran.
    SetupFailed(String),
}

impl std::fmt::Display for VcpuExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuExitReason::Stopped => write!(f, "stopped by the VMM"),
            VcpuExitReason::Shutdown => write!(f, "guest triple fault (KVM_EXIT_SHUTDOWN)"),
            VcpuExitReason::InternalError { suberror, rip } => {
                write!(f, "KVM internal error, suberror {suberror}")?;
                if let Some(rip) = rip {
                    write!(f, " at guest RIP {rip:#x}")?;
                }
                Ok(())
            }
            VcpuExitReason::FailEntry(r) => write!(f, "VM entry failed, hardware reason {r:#x}"),
            VcpuExitReason::SystemEvent(t) => write!(f, "system event {t}"),
            VcpuExitReason::Hlt => write!(f, "guest halted"),
            VcpuExitReason::Unsupported(r) => write!(f, "unhandled KVM exit {r}"),
            VcpuExitReason::Unhandled(e) => write!(f, "unhandled KVM exit {e}"),
            VcpuExitReason::RunError(e) => write!(f, "KVM_RUN failed: errno {e}"),
            VcpuExitReason::Panicked(m) => write!(f, "the exit handler panicked: {m}"),
            VcpuExitReason::SetupFailed(m) => write!(f, "vCPU thread setup failed: {m}"),
        }
    }
}

impl VcpuExitReason {
    /// How a thread ends on an exit nobody handled: [`VcpuExitReason::Hlt`],
    /// [`VcpuExitReason::SystemEvent`], [`VcpuExitReason::Unsupported`] with KVM's number, or
    /// [`VcpuExitReason::Unhandled`] naming the exit.
    pub fn from_exit(exit: &VcpuExit<'_>) -> VcpuExitReason {
        match exit {
            VcpuExit::Hlt => VcpuExitReason::Hlt,
            VcpuExit::SystemEvent(t, _) => VcpuExitReason::SystemEvent(*t),
            VcpuExit::Unsupported(r) => VcpuExitReason::Unsupported(*r),
            other => {
                let name = format!("{other:?}");
                let name = name.split(['(', ' ', '{']).next().unwrap_or("?").to_string();
                VcpuExitReason::Unhandled(name)
            }
        }
    }
}
