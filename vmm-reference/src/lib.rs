// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The reference VMM: boots the built-in test guest or a Linux kernel on KVM with full
//! (non-hardware-reduced) ACPI, and wires together the workspace crates:
//! `lapic-state` (LAPIC setup), `acpi-cpu-hotplug` (PM1/GPE0/SCI), `vcpu-manager` (topology,
//! CPUID, vCPU threads), `vm-migration` (snapshot container, memory images, live-migration
//! protocol).
//!
//! ```no_run
//! use vmm_reference::config::{CpuConfig, KernelSource, SerialMode, VmConfig};
//! use vmm_reference::vm::{Vm, VmOutcome};
//!
//! let cfg = VmConfig {
//!     kernel: KernelSource::Embedded,
//!     initramfs: None,
//!     cmdline: None,
//!     cpus: CpuConfig { boot: 2, max: 8 },
//!     memory: 256 << 20,
//!     serial: SerialMode::Stdout,
//! };
//! let vm = Vm::start(&cfg).expect("VM starts");
//! assert_eq!(vm.wait(None), Some(VmOutcome::PowerOff));
//! ```

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod acpi;
pub mod api;
pub mod boot;
pub mod config;
pub mod console;
pub mod devices;
pub mod migration;
pub mod ratelimit;
pub mod restore;
pub mod seccomp;
pub mod snapdir;
pub mod snapshot;
pub mod sock;
pub mod vm;
