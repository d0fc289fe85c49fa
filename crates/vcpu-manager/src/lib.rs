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
mod runner;
mod topology;

pub use runner::{ExitHandler, VcpuExitReason, VcpuRunner};
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
    /// Registering the kick signal handler failed.
    #[error("registering the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;
