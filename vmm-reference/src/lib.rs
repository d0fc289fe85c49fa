// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The reference VMM: boots the built-in test guest or a Linux kernel on KVM with full
//! (non-hardware-reduced) ACPI, and wires together the workspace crates:
//! `lapic-state` (LAPIC setup), `acpi-cpu-hotplug` (PM1/GPE0/SCI), `vcpu-manager` (topology,
//! CPUID, vCPU threads), `vm-live-migration` (snapshot container, memory images, live-migration
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
//!
//! # Module map
//!
//! Read from the top: each module uses only those below it (`tests/layout.rs` checks that no
//! two import each other, and that no function runs over 80 lines without saying why).
//!
//! | part | modules | what |
//! |---|---|---|
//! | entry points | [`api`], `main.rs` + `cli/` (binary) | REST API over a Unix socket; `run`, `ctl`, `demo` |
//! | live migration | [`migration`] | send (pre-copy, hand-over, throttle), receive, the link |
//! | building a VM | [`builder`] | the one build for boot, snapshot, migration and rebuild |
//! | CPU control | [`cpus`] | add, remove, resize, the eject worker, `vm.info`'s CPU view |
//! | the running VM | [`vm`], [`pause`] | shared state, pause/resume/snapshot; the pause guard |
//! | devices | [`devices`] | COM1 + console, ACPI PM/GPE/hotplug + SCI, I/O bus, IRQ wiring |
//! | guest events | [`exits`] | vCPU exits, vCPU ends, power-off, ejects |
//! | KVM VM state | [`restore`], [`machine`] | capture and ordered restore; VM creation, memory slots |
//! | saved state | [`snapshot`], [`snapdir`] | the state format and checks; the snapshot directory |
//! | foundations | [`acpi`], [`boot`], [`config`], [`error`], [`status`], [`seccomp`], [`sock`], [`ratelimit`], [`console`] | tables, kernel loading, config, errors, `vm.info` types, filters, sockets, log limits, the test guest's console client |

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod acpi;
pub mod api;
pub mod boot;
pub mod builder;
pub mod config;
pub mod console;
pub mod cpus;
pub mod devices;
pub mod error;
pub mod exits;
pub mod machine;
pub mod migration;
pub mod pause;
pub mod ratelimit;
pub mod restore;
pub mod seccomp;
pub mod snapdir;
pub mod snapshot;
pub mod sock;
pub mod status;
pub mod vm;
