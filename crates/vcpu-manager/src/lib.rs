// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! KVM vCPU lifecycle for VMMs.
//!
//! - [`Topology`]: the one function that maps a CPU index to its APIC id. It feeds the KVM
//!   vCPU id, the MADT/`_MAT` entries and the CPUID topology leaves, and is sized for
//!   `max_vcpus`, not the boot count.
//! - [`cpuid`]: per-vCPU CPUID from `KVM_GET_SUPPORTED_CPUID` with the fixes a guest needs.
//! - [`VcpuRunner`]: one thread per vCPU running `KVM_RUN`, exits handed to the VMM's
//!   [`ExitHandler`], and a kick (`immediate_exit` then a signal) that cannot be lost.
//!
//! The crate knows nothing about devices: port and MMIO exits go to the handler you supply.

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cpuid;
mod exit;
mod manager;
mod options;
mod runner;
pub mod state;
mod topology;

pub use exit::{ExitAction, ExitHandler, ThreadSetupError, VcpuExitReason};
pub use manager::{Slot, VcpuManager, VCPU_TIMEOUT};
pub use options::{NestedState, RestoreOptions, SaveOptions, TscPolicy};
pub use runner::{kick_signal, set_kick_signal, VcpuRunner};
pub use state::{msr_list, restore_vcpu, save_vcpu, xsave_size, VcpuState};
pub use topology::Topology;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// Which operation.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU thread could not be spawned.
    #[error("spawning vCPU thread {index}: {source}")]
    Spawn {
        /// CPU index.
        index: u32,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A kick signal outside SIGRTMIN..=SIGRTMAX.
    #[error("signal {0} cannot kick vCPUs: choose one of SIGRTMIN..=SIGRTMAX")]
    BadKickSignal(i32),
    /// The kick handler is already installed on another signal.
    #[error(
        "vCPU threads are already kicked with signal {0}; choose the signal before the first vCPU starts"
    )]
    KickSignalInUse(i32),
    /// Registering the kick signal handler failed.
    #[error("registering the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    /// No such possible CPU.
    #[error("CPU {0} is not a possible CPU")]
    NoSuchCpu(u32),
    /// The CPU already runs.
    #[error("CPU {0} is already running")]
    AlreadyRunning(u32),
    /// The CPU does not run.
    #[error("CPU {0} is not running")]
    NotRunning(u32),
    /// The vCPU thread panicked.
    #[error("the thread of vCPU {0} panicked")]
    ThreadPanicked(u32),
    /// A vCPU did not acknowledge a pause in time.
    #[error("vCPU {0} did not pause in time")]
    PauseTimeout(u32),
    /// A vCPU did not answer a request in time.
    #[error("vCPU {0} did not answer in time")]
    Unresponsive(u32),
    /// MSR list problem.
    #[error("MSRs: {0}")]
    Msrs(&'static str),
    /// KVM read or wrote fewer MSRs than asked.
    #[error("{what}: {done} of {wanted} MSRs")]
    MsrCount {
        /// Which ioctl.
        what: &'static str,
        /// How many were done.
        done: usize,
        /// How many were asked.
        wanted: usize,
    },
    /// An XSAVE area does not fit: saved state beyond the destination's area, or a size KVM
    /// reported that no buffer can have.
    #[error("an XSAVE area of {bytes} bytes does not fit in {room}")]
    Xsave {
        /// Bytes that must be kept.
        bytes: usize,
        /// Bytes there is room for.
        room: usize,
    },
    /// Saved nested state claims more bytes than the state buffer holds.
    #[error("nested state of {size} bytes does not fit in {room}")]
    NestedState {
        /// The size the state claims.
        size: u32,
        /// The buffer's size.
        room: usize,
    },
    /// The LAPIC state could not be read.
    #[error("LAPIC state: {0}")]
    Lapic(lapic_state::LapicError),
    /// The LAPIC state could not be restored.
    #[error("LAPIC restore: {0}")]
    LapicRestore(lapic_state::kvm::KvmLapicError),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;

// The README's examples are compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
