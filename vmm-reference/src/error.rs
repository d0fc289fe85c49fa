// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The VMM's two error types: [`VmmError`] for building a VM (each names what failed in one
//! line), [`ControlError`] for the control operations, shaped for the REST API.

use crate::{acpi, boot, config::ConfigError};

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

impl ControlError {
    /// A failed pause of every vCPU: a vCPU that did not stop in time is busy (429, the VM
    /// runs on and the caller may try again: a loaded host or a long exit delays it), anything
    /// else is ours (500).
    pub fn pausing(e: vcpu_manager::Error) -> Self {
        match e {
            vcpu_manager::Error::PauseTimeout(_) => Self::Busy(format!("{e}; the VM runs on, try again")),
            other => Self::Internal(format!("pausing: {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A vCPU that misses the pause bound (a loaded host) is a reason to try again, not a
    /// failure of the VMM: concurrent clients got 500 "vCPU 0 did not pause in time".
    #[test]
    fn a_late_pause_is_busy_and_other_failures_are_internal() {
        let late = ControlError::pausing(vcpu_manager::Error::PauseTimeout(3));
        assert!(
            matches!(&late, ControlError::Busy(m) if m.contains("vCPU 3")),
            "{late:?}"
        );
        let lost = ControlError::pausing(vcpu_manager::Error::ThreadPanicked(1));
        assert!(matches!(lost, ControlError::Internal(_)), "{lost:?}");
    }
}
