// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What `vm.info` reports: per-CPU state, failed vCPUs, and the current or last migration.
//! Plain data (serialized as the API's JSON), so every part of the VMM can fill it in.

use serde::Serialize;

/// One possible CPU as `vm.info` reports it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CpuInfo {
    /// CPU index (ACPI UID).
    pub id: u32,
    /// APIC id.
    pub apic_id: u32,
    /// Present (the guest's `_STA` says so).
    pub present: bool,
    /// `running`, `unresponsive` (running, but its thread did not answer in time: KVM's
    /// fields are then null), `parked` (removed, fd kept) or `absent` (never created).
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
    /// Cloud Hypervisor's VM state: `Running`, `Paused`, or `Shutdown` once the VM is
    /// ending (after `vm.shutdown` or the guest's power-off, before the VMM exits).
    pub state: &'static str,
    /// The VM's configuration, in Cloud Hypervisor's shape (the parts this VMM has).
    pub config: VmInfoConfig,
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
    pub migration: Option<MigrationStatus>,
    /// vCPUs whose thread ended on its own (the VM ends with the first).
    pub failed_vcpus: Vec<FailedVcpu>,
}

/// `vm.info`'s `config`: Cloud Hypervisor's field names for what this VMM configures.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct VmInfoConfig {
    /// `{"boot_vcpus": N, "max_vcpus": M}`.
    pub cpus: CpusConfig,
    /// `{"size": BYTES}`.
    pub memory: MemoryConfig,
    /// COM1's console: `{"mode": "Pty", "file": "/dev/pts/3", "socket": null}`.
    pub serial: SerialConfig,
}

/// COM1's console in Cloud Hypervisor's names.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SerialConfig {
    /// `Tty`, `Null`, `File`, `Socket` or `Pty`.
    pub mode: &'static str,
    /// The file written (`File`), or the pty's slave to attach to (`Pty`).
    pub file: Option<String>,
    /// The socket listened on (`Socket`).
    pub socket: Option<String>,
}

/// CPU counts in Cloud Hypervisor's names.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct CpusConfig {
    /// vCPUs present at boot.
    pub boot_vcpus: u32,
    /// Possible vCPUs.
    pub max_vcpus: u32,
}

/// Guest RAM in Cloud Hypervisor's names.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Bytes.
    pub size: u64,
}

/// What `vm.info` shows about the current or last migration, on either side.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct MigrationStatus {
    /// Source: `connecting`, `precopy`, `stopping` (paused, last pages and state), `done`,
    /// `failed`. Destination: `awaiting-complete` (restored, paused, waiting for the
    /// source's Complete), `received`, `incomplete` (no Complete came).
    pub phase: &'static str,
    /// Pre-copy rounds finished.
    pub rounds: u32,
    /// Bytes of RAM sent in the finished rounds.
    pub bytes_sent: u64,
    /// Source: bytes written to the destination so far, frames and state included, counted
    /// as they go out (live within a round; `vm.migration-status` reads it without waiting
    /// for the vCPUs). 0 on the destination.
    pub wire_bytes: u64,
    /// Dirty rate of the last round (pages/s).
    pub dirty_rate: f64,
    /// Expected downtime after the last round (ms).
    pub expected_downtime_ms: f64,
    /// Share of the time the guest is held paused to converge (`throttle` strategy).
    pub throttle_percent: u32,
    /// Why it failed, when it did.
    pub error: Option<String>,
}
