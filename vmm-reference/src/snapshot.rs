// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What a snapshot (and the final step of a live migration) carries, how it is written to a
//! directory, and how it is checked when it comes back from an untrusted file or peer.
//!
//! A snapshot directory holds `state.bin` (a `vm-live-migration` container: section `vm` with the
//! VM-wide state, one section `vcpu/<index>` per vCPU that existed, all JSON inside a
//! versioned, CRC-checked envelope) and the memory image it names (raw RAM, restored
//! copy-on-write); [`crate::snapdir`] writes and reads the directory.
//!
//! Only vCPUs that had a running thread are saved: present CPUs whatever the guest did with
//! them (online, offlined, never onlined, between INIT and SIPI) and CPUs with a removal
//! pending. Ejected CPUs (parked fds) are not: on restore they are absent, and a later
//! hot-add creates them afresh, which the guest cannot tell from a reused fd.

use acpi_cpu_hotplug::AcpiHotplugState;
use kvm_bindings::{kvm_irqchip, kvm_pit_state2, CpuId};
use lapic_state::KvmConventions;
use serde::{Deserialize, Serialize};
use vcpu_manager::{Topology, VcpuState};
use vm_live_migration::memory::MemoryLayout;
use vm_live_migration::{Limits, Snapshot};

/// Name of the state file in a snapshot directory.
pub const STATE_FILE: &str = "state.bin";
/// Largest guest RAM a snapshot may describe (checked before mapping anything).
pub const MAX_MEMORY: u64 = 1 << 40;
/// Most possible CPUs a snapshot may describe (KVM's own limit is lower; checked again
/// against it before restoring).
pub const MAX_VCPUS: u32 = 4096;
/// Largest state file accepted.
pub const MAX_STATE_FILE: u64 = 256 << 20;

/// Snapshot and restore errors.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        /// Which file or step.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The container is damaged, truncated, or from a newer format.
    #[error("snapshot container: {0}")]
    Container(#[from] vm_live_migration::Error),
    /// A section does not parse or is inconsistent.
    #[error("snapshot section {section}: {reason}")]
    Section {
        /// Section name.
        section: String,
        /// What is wrong.
        reason: String,
    },
    /// The memory image or layout is unusable.
    #[error("snapshot memory: {0}")]
    Memory(#[from] vm_live_migration::memory::MemoryError),
    /// A file of the snapshot directory is not what the state needs (not a regular file,
    /// wrong size, an image from another snapshot).
    #[error("snapshot files: {0}")]
    Image(String),
    /// This host cannot run the saved VM; every mismatch is listed.
    #[error("snapshot is not compatible with this host: {0}")]
    Incompatible(String),
}

fn section_err(section: &str, reason: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Section {
        section: section.into(),
        reason: reason.to_string(),
    }
}

/// COM1 registers and FIFO (vm-superio's `SerialState`, which has no serde).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLM.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Receive FIFO.
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialSnapshot {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialSnapshot> for vm_superio::serial::SerialState {
    fn from(s: &SerialSnapshot) -> Self {
        vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

/// One KVM structure of exactly its own size (see [`vcpu_manager::state::exact_len`]).
#[derive(Deserialize)]
#[serde(transparent, bound(deserialize = "T: serde::de::DeserializeOwned"))]
struct Exact<T>(#[serde(deserialize_with = "vcpu_manager::state::exact_len")] T);

/// A list of KVM structures, each of exactly its own size.
fn exact_len_each<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    Ok(Vec::<Exact<T>>::deserialize(d)?
        .into_iter()
        .map(|e| e.0)
        .collect())
}

/// The in-kernel irqchip (8259 master, slave, IOAPIC), PIT and kvmclock of a VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KvmVmState {
    /// `KVM_GET_IRQCHIP` for PIC master, PIC slave, IOAPIC (in that order).
    #[serde(deserialize_with = "exact_len_each")]
    pub irqchips: Vec<kvm_irqchip>,
    /// `KVM_GET_PIT2`.
    #[serde(deserialize_with = "vcpu_manager::state::exact_len")]
    pub pit: kvm_pit_state2,
    /// `KVM_GET_CLOCK` (ns).
    pub clock: u64,
}

/// VM-wide state: everything but the vCPUs and RAM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Possible CPUs (the topology; APIC ids follow from it).
    pub max_vcpus: u32,
    /// CPUs present at boot (the MADT the guest read).
    pub boot_vcpus: u32,
    /// RAM regions.
    pub memory: MemoryLayout,
    /// LAPIC conventions of the source: the LAPIC states are canonical, and a destination
    /// that would lose what they use (TSC-deadline timer, CMCI, directed EOI, bus cycle) refuses.
    pub conventions: KvmConventions,
    /// MSRs saved per vCPU.
    pub msrs: Vec<u32>,
    /// 8259s, IOAPIC, PIT, clock.
    pub kvm: KvmVmState,
    /// PM1/GPE0/SCI and the CPU hotplug controller (per-CPU flags, selector, `_OST`).
    pub acpi: AcpiHotplugState,
    /// COM1.
    pub serial: SerialSnapshot,
    /// Removals the VMM requested whose eject has not happened yet.
    pub pending_removals: Vec<u32>,
    /// The VM was paused through the API when saved.
    pub paused: bool,
    /// The memory image this state belongs to (snapshot files only; a migration carries RAM
    /// in the stream). Absent in directories written before images had ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRef>,
}

/// A whole saved VM (without RAM).
#[derive(Debug)]
pub struct SavedVm {
    /// VM-wide state.
    pub vm: VmState,
    /// `(CPU index, state)` of every vCPU that had a thread.
    pub vcpus: Vec<(u32, VcpuState)>,
}

/// The device state agrees with the saved vCPUs: the boot count is possible, every CPU the
/// guest sees present has a vCPU, and every pending removal is one the controller holds.
fn check_devices(vm: &VmState, vcpus: &[(u32, VcpuState)]) -> Result<(), SnapshotError> {
    if vm.boot_vcpus == 0 || vm.boot_vcpus > vm.max_vcpus {
        return Err(section_err(
            "vm",
            format!("boot_vcpus {} out of 1..={}", vm.boot_vcpus, vm.max_vcpus),
        ));
    }
    let saved = |i: u32| vcpus.iter().any(|(j, _)| *j == i);
    let slots = &vm.acpi.cpus.cpus;
    if let Some(i) = (0..vm.max_vcpus).find(|&i| slots[i as usize].present && !saved(i)) {
        return Err(section_err(
            "vm",
            format!("CPU {i} is present but has no saved vCPU"),
        ));
    }
    for &i in &vm.pending_removals {
        let slot = &slots[i as usize];
        if !slot.present || !slot.remove_requested {
            return Err(section_err(
                "vm",
                format!("CPU {i} is pending removal, but the hotplug controller has no removal for it"),
            ));
        }
    }
    Ok(())
}

/// The CPUID words whose feature bits a destination must offer (leaf, subleaf, register
/// index 0..4 = eax, ebx, ecx, edx, name).
const FEATURE_WORDS: [(u32, u32, usize, &str); 7] = [
    (1, 0, 2, "1.ECX"),
    (1, 0, 3, "1.EDX"),
    (7, 0, 1, "7.0.EBX"),
    (7, 0, 2, "7.0.ECX"),
    (7, 0, 3, "7.0.EDX"),
    (0x8000_0001, 0, 2, "80000001.ECX"),
    (0x8000_0001, 0, 3, "80000001.EDX"),
];

fn cpuid_word(c: &CpuId, leaf: u32, sub: u32, reg: usize) -> u32 {
    c.as_slice()
        .iter()
        .find(|e| {
            e.function == leaf
                && (e.index == sub || e.flags & kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX == 0)
        })
        .map_or(0, |e| [e.eax, e.ebx, e.ecx, e.edx][reg])
}

fn vendor(c: &CpuId) -> String {
    let w = [
        cpuid_word(c, 0, 0, 1),
        cpuid_word(c, 0, 0, 3),
        cpuid_word(c, 0, 0, 2),
    ];
    w.iter()
        .flat_map(|x| x.to_le_bytes())
        .map(|b| if b.is_ascii_graphic() { b as char } else { '?' })
        .collect()
}

/// What a destination needs to know before it accepts a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compat {
    /// Possible CPUs.
    pub max_vcpus: u32,
    /// RAM regions.
    pub memory: MemoryLayout,
    /// CPU vendor string of the guest CPUID.
    pub vendor: String,
    /// Feature words the guest was given: `(name, bits)`.
    pub features: Vec<(String, u32)>,
    /// Snapshot format version.
    pub format: u32,
    /// The guest TSC frequency (kHz), when known (descriptions from older VMMs lack it).
    #[serde(default)]
    pub tsc_khz: Option<u32>,
}

/// This host's TSC as a destination sees it: KVM's default guest rate and whether KVM can run
/// a guest TSC at another rate (`KVM_CAP_TSC_CONTROL`, TSC scaling).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostTsc {
    /// KVM's default guest TSC frequency here (kHz), if KVM reports it.
    pub khz: Option<u32>,
    /// Whether a vCPU's TSC rate can be set.
    pub scaling: bool,
}

/// KVM accepts a TSC rate within 250 ppm of the host's without scaling.
fn tsc_rate_differs(vm: u32, host: u32) -> bool {
    u64::from(vm.abs_diff(host)) * 4000 > u64::from(host)
}

impl Compat {
    /// The description of a VM whose first vCPU has `cpuid`.
    pub fn of(max_vcpus: u32, memory: MemoryLayout, cpuid: &CpuId) -> Compat {
        Compat {
            max_vcpus,
            memory,
            vendor: vendor(cpuid),
            features: FEATURE_WORDS
                .iter()
                .map(|(l, s, r, n)| (n.to_string(), cpuid_word(cpuid, *l, *s, *r)))
                .collect(),
            format: vm_live_migration::FORMAT_VERSION,
            tsc_khz: None,
        }
    }

    /// The same description with the VM's TSC frequency.
    pub fn with_tsc_khz(self, tsc_khz: Option<u32>) -> Compat {
        Compat { tsc_khz, ..self }
    }

    /// Check this VM against a host with `kvm_max_vcpus` and `host_cpuid` (the CPUID this VMM
    /// would give CPU 0 there). Returns every mismatch, or Ok.
    pub fn check(
        &self,
        kvm_max_vcpus: u32,
        host_cpuid: &CpuId,
        host_tsc: HostTsc,
    ) -> Result<(), SnapshotError> {
        let mut why = Vec::new();
        if let (Some(vm), Some(host)) = (self.tsc_khz, host_tsc.khz) {
            if !host_tsc.scaling && tsc_rate_differs(vm, host) {
                why.push(format!(
                    "the VM's TSC runs at {vm} kHz, this host's at {host} kHz and KVM here cannot scale it"
                ));
            }
        }
        if self.format > vm_live_migration::FORMAT_VERSION {
            why.push(format!(
                "state format {} is newer than this VMM's {}",
                self.format,
                vm_live_migration::FORMAT_VERSION
            ));
        }
        if self.max_vcpus == 0 || self.max_vcpus > kvm_max_vcpus {
            why.push(format!(
                "the VM has {} possible CPUs, KVM here allows {kvm_max_vcpus}",
                self.max_vcpus
            ));
        }
        if let Err(e) = self.memory.validate(MAX_MEMORY) {
            why.push(e.to_string());
        }
        let host_vendor = vendor(host_cpuid);
        if host_vendor != self.vendor {
            why.push(format!(
                "CPU vendor {} here, {} in the VM",
                host_vendor, self.vendor
            ));
        }
        for ((name, bits), (l, s, r, _)) in self.features.iter().zip(FEATURE_WORDS.iter()) {
            let have = cpuid_word(host_cpuid, *l, *s, *r);
            let missing = bits & !have;
            if missing != 0 {
                why.push(format!("CPUID {name} bits {missing:#x} are not available here"));
            }
        }
        if self.features.len() != FEATURE_WORDS.len() {
            why.push("malformed feature list".into());
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(SnapshotError::Incompatible(why.join("; ")))
        }
    }
}

impl SavedVm {
    /// The compatibility description of this VM.
    pub fn compat(&self) -> Compat {
        match self.vcpus.first() {
            Some((_, st)) => {
                Compat::of(self.vm.max_vcpus, self.vm.memory.clone(), &st.cpuid).with_tsc_khz(st.tsc_khz)
            }
            // No CPU model to offer (decode refuses such a state anyway): no host matches it.
            None => Compat {
                max_vcpus: self.vm.max_vcpus,
                memory: self.vm.memory.clone(),
                vendor: String::new(),
                features: Vec::new(),
                format: vm_live_migration::FORMAT_VERSION,
                tsc_khz: None,
            },
        }
    }

    /// The container bytes.
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        self.encode_with(&self.vm)
    }

    /// The container bytes with `vm` in place of this VM-wide state (the vCPUs as they are).
    pub fn encode_with(&self, vm: &VmState) -> Result<Vec<u8>, SnapshotError> {
        let mut s = Snapshot::default();
        let vm = serde_json::to_vec(vm).map_err(|e| section_err("vm", e))?;
        s.add("vm", vm)?;
        for (index, st) in &self.vcpus {
            let name = format!("vcpu/{index}");
            let b = serde_json::to_vec(st).map_err(|e| section_err(&name, e))?;
            s.add(&name, b)?;
        }
        Ok(s.encode())
    }

    /// Parse and check container bytes from an untrusted file or peer: sizes, CPU indices,
    /// vCPU ids against the topology, device state against the CPU count, memory layout.
    pub fn decode(bytes: &[u8]) -> Result<SavedVm, SnapshotError> {
        let snap = Snapshot::decode(bytes, &Limits::default())?;
        let vm_bytes = snap.section("vm").ok_or_else(|| section_err("vm", "missing"))?;
        let vm: VmState = serde_json::from_slice(vm_bytes).map_err(|e| section_err("vm", e))?;
        if vm.max_vcpus == 0 || vm.max_vcpus > MAX_VCPUS {
            return Err(section_err(
                "vm",
                format!("max_vcpus {} out of range", vm.max_vcpus),
            ));
        }
        if vm.acpi.cpus.cpus.len() != vm.max_vcpus as usize {
            return Err(section_err(
                "vm",
                "the hotplug controller state does not match the CPU count",
            ));
        }
        vm.memory.validate(MAX_MEMORY)?;
        if let Some(image) = &vm.image {
            image.validate(vm.memory.image_len())?;
        }
        if vm.kvm.irqchips.len() != 3 {
            return Err(section_err("vm", "expected 3 irqchip states"));
        }
        if vm.serial.in_buffer.len() > 64 {
            return Err(section_err("vm", "serial FIFO longer than 64 bytes"));
        }
        if vm.pending_removals.iter().any(|i| *i >= vm.max_vcpus) {
            return Err(section_err("vm", "pending removal of a CPU beyond max_vcpus"));
        }
        let topology = Topology::new(vm.max_vcpus);
        let mut vcpus = Vec::new();
        for name in snap.names() {
            let Some(index) = name.strip_prefix("vcpu/") else {
                continue;
            };
            let index: u32 = index
                .parse()
                .ok()
                .filter(|i| *i < vm.max_vcpus)
                .ok_or_else(|| section_err(name, "not a possible CPU"))?;
            let bytes = snap.section(name).unwrap_or_default();
            let st: VcpuState = serde_json::from_slice(bytes).map_err(|e| section_err(name, e))?;
            if st.vcpu_id != topology.apic_id(index) {
                return Err(section_err(
                    name,
                    format!(
                        "vCPU id {} is not CPU {index}'s APIC id {}",
                        st.vcpu_id,
                        topology.apic_id(index)
                    ),
                ));
            }
            vcpus.push((index, st));
        }
        vcpus.sort_by_key(|(i, _)| *i);
        if vcpus.first().map(|(i, _)| *i) != Some(0) {
            return Err(section_err("vcpu/0", "the boot CPU is missing"));
        }
        let mut saved = SavedVm { vm, vcpus };
        saved.reconcile_ejects();
        check_devices(&saved.vm, &saved.vcpus)?;
        Ok(saved)
    }

    /// Finish, in the saved state, removals the guest already ejected: a capture that raced
    /// the eject worker saw the CPU gone from the controller while its vCPU still ran. Kept,
    /// such a CPU would restore as a running vCPU with a removal pending forever (every later
    /// resize busy). Called on capture and again on decode, for states saved before.
    pub fn reconcile_ejects(&mut self) {
        let slots = &self.vm.acpi.cpus.cpus;
        let ejected = |i: u32| slots.get(i as usize).is_some_and(|s| !s.present);
        let before = self.vcpus.len();
        self.vcpus.retain(|(i, _)| !ejected(*i));
        self.vm.pending_removals.retain(|i| !ejected(*i));
        if self.vcpus.len() != before {
            log::info!(
                "saved state: {} vCPU(s) the guest had ejected left out",
                before - self.vcpus.len()
            );
        }
    }
}

/// Which memory image a state belongs to (recorded in the state).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    /// 32 lowercase hex digits, random per snapshot; also the image's file name.
    pub id: String,
    /// Bytes of RAM image before the trailer.
    pub len: u64,
}

impl ImageRef {
    /// The image's file name in the snapshot directory.
    pub fn file_name(&self) -> String {
        format!("memory-{}.bin", self.id)
    }

    /// An id that can only name a file in the directory, and the length the layout needs.
    pub fn validate(&self, image_len: u64) -> Result<(), SnapshotError> {
        let hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
        if self.id.len() != 32 || !self.id.chars().all(hex) {
            return Err(SnapshotError::Image(format!("malformed image id {:?}", self.id)));
        }
        if self.len != image_len {
            return Err(SnapshotError::Image(format!(
                "the state names an image of {} bytes; its memory layout needs {image_len}",
                self.len
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use acpi_cpu_hotplug::CpuHotplugController;
    use lapic_state::{ApicBase, LapicPage, LapicState};
    use proptest::prelude::*;

    fn vcpu(index: u32) -> VcpuState {
        let conv = KvmConventions::CANONICAL;
        VcpuState {
            vcpu_id: index,
            cpuid: CpuId::new(2).unwrap(),
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            tsc_khz: Some(2_000_000),
            xcrs: Default::default(),
            xsave: Default::default(),
            xsave_ext: Vec::new(),
            lapic: LapicState::normalise(
                &LapicPage::power_on(index, index == 0, &conv),
                index,
                ApicBase::power_on(index == 0),
                &conv,
            )
            .unwrap(),
            msrs: kvm_bindings::Msrs::new(0).unwrap(),
            tsc_deadline: 0,
            vcpu_events: Default::default(),
            debugregs: Default::default(),
            nested_state: None,
        }
    }

    /// A consistent saved VM of 4 possible CPUs with 1 MiB of RAM at 0.
    pub(crate) fn sample() -> SavedVm {
        let mut ctl = CpuHotplugController::new((0..4).collect(), 2, 0);
        ctl.request_remove(1).unwrap();
        SavedVm {
            vm: VmState {
                max_vcpus: 4,
                boot_vcpus: 2,
                memory: MemoryLayout {
                    regions: vec![vm_live_migration::memory::RegionDesc {
                        guest_addr: 0,
                        len: 1 << 20,
                        file_offset: 0,
                    }],
                },
                conventions: KvmConventions::CANONICAL,
                msrs: vec![0x10],
                kvm: KvmVmState {
                    irqchips: vec![kvm_irqchip::default(); 3],
                    pit: Default::default(),
                    clock: 42,
                },
                acpi: AcpiHotplugState {
                    pm: Default::default(),
                    cpus: ctl.state(),
                },
                serial: SerialSnapshot::default(),
                pending_removals: vec![1],
                paused: false,
                image: None,
            },
            vcpus: vec![(0, vcpu(0)), (1, vcpu(1))],
        }
    }

    #[test]
    fn round_trip_and_consistency_checks() {
        let s = sample();
        let back = SavedVm::decode(&s.encode().unwrap()).unwrap();
        assert_eq!(back.vcpus.len(), 2);
        assert_eq!(back.vm.pending_removals, vec![1]);
        assert_eq!(back.vm.kvm.clock, 42);
        let refuse = |f: &dyn Fn(&mut SavedVm)| {
            let mut s = sample();
            f(&mut s);
            SavedVm::decode(&s.encode().unwrap()).unwrap_err()
        };
        // A vCPU whose id is not its CPU's APIC id, a CPU beyond max, no boot CPU, a
        // hotplug state for another CPU count, an oversized FIFO, a bad memory layout.
        assert!(refuse(&|s| s.vcpus[1].1.vcpu_id = 3)
            .to_string()
            .contains("APIC id"));
        assert!(refuse(&|s| s.vcpus[1].0 = 9)
            .to_string()
            .contains("not a possible CPU"));
        assert!(refuse(&|s| drop(s.vcpus.remove(0)))
            .to_string()
            .contains("boot CPU"));
        assert!(refuse(&|s| s.vm.max_vcpus = 8)
            .to_string()
            .contains("hotplug controller"));
        assert!(refuse(&|s| s.vm.serial.in_buffer = vec![0; 65])
            .to_string()
            .contains("FIFO"));
        assert!(refuse(&|s| s.vm.memory.regions[0].len = 100)
            .to_string()
            .contains("memory"));
        assert!(refuse(&|s| s.vm.pending_removals = vec![4])
            .to_string()
            .contains("removal"));
        assert!(refuse(&|s| s.vm.kvm.irqchips.truncate(1))
            .to_string()
            .contains("irqchip"));
        // Device state that disagrees with the vCPUs.
        assert!(refuse(&|s| s.vm.boot_vcpus = 0)
            .to_string()
            .contains("boot_vcpus"));
        assert!(refuse(&|s| s.vm.boot_vcpus = 5)
            .to_string()
            .contains("boot_vcpus"));
        assert!(refuse(&|s| s.vm.acpi.cpus.cpus[3].present = true)
            .to_string()
            .contains("CPU 3 is present but has no saved vCPU"));
        assert!(refuse(&|s| s.vm.pending_removals = vec![0])
            .to_string()
            .contains("no removal for it"));
    }

    #[test]
    fn a_cpu_ejected_during_the_capture_is_saved_as_gone() {
        // CPU 1's removal is pending; the guest ejected it (slot no longer present) while its
        // vCPU was still being joined, and the capture saw both.
        let mut s = sample();
        s.vm.acpi.cpus.cpus[1].present = false;
        s.vm.acpi.cpus.cpus[1].remove_requested = false;
        let back = SavedVm::decode(&s.encode().unwrap()).unwrap();
        assert_eq!(back.vcpus.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0]);
        assert!(back.vm.pending_removals.is_empty());
    }

    /// The sample with its `vm` section and vCPU 0's section edited as JSON, decoded.
    fn decode_edited(
        vm_edit: &dyn Fn(&mut serde_json::Value),
        vcpu0_edit: &dyn Fn(&mut serde_json::Value),
    ) -> Result<SavedVm, SnapshotError> {
        let s = sample();
        let mut snap = Snapshot::default();
        let mut vm = serde_json::to_value(&s.vm).unwrap();
        vm_edit(&mut vm);
        snap.add("vm", serde_json::to_vec(&vm).unwrap()).unwrap();
        for (i, st) in &s.vcpus {
            let mut v = serde_json::to_value(st).unwrap();
            if *i == 0 {
                vcpu0_edit(&mut v);
            }
            snap.add(&format!("vcpu/{i}"), serde_json::to_vec(&v).unwrap())
                .unwrap();
        }
        SavedVm::decode(&snap.encode())
    }

    #[test]
    fn kvm_structures_of_the_wrong_length_are_refused() {
        let none = |_: &mut serde_json::Value| {};
        assert!(decode_edited(&none, &none).is_ok());
        let pop = |v: &mut serde_json::Value| drop(v.as_array_mut().unwrap().pop());
        let push = |v: &mut serde_json::Value| v.as_array_mut().unwrap().push(0.into());
        for field in [
            "regs",
            "sregs",
            "xsave",
            "xcrs",
            "vcpu_events",
            "debugregs",
            "mp_state",
        ] {
            for edit in [&pop as &dyn Fn(&mut serde_json::Value), &push] {
                let e = decode_edited(&none, &|v| edit(&mut v[field])).err();
                let e = e.map(|e| e.to_string()).unwrap_or_default();
                assert!(e.contains("bytes of"), "{field}: {e}");
            }
        }
        for path in [&["kvm", "pit"][..], &["kvm", "irqchips", "2"][..]] {
            let at = |v: &mut serde_json::Value| {
                let mut x = v;
                for k in path {
                    x = match k.parse::<usize>() {
                        Ok(i) => &mut x[i],
                        Err(_) => &mut x[*k],
                    };
                }
                pop(x)
            };
            let e = decode_edited(&at, &none)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(e.contains("bytes of"), "{path:?}: {e}");
        }
    }

    /// A host that can run any TSC rate.
    const ANY_TSC: HostTsc = HostTsc {
        khz: Some(2_000_000),
        scaling: true,
    };

    #[test]
    fn a_tsc_rate_without_scaling_is_refused_within_250_ppm_allowed() {
        let host = CpuId::new(1).unwrap();
        let c = |khz| Compat::of(4, sample().vm.memory, &host).with_tsc_khz(Some(khz));
        let fixed = HostTsc {
            khz: Some(2_000_000),
            scaling: false,
        };
        let e = c(2_600_000).check(4, &host, fixed).unwrap_err().to_string();
        assert!(e.contains("2600000 kHz") && e.contains("cannot scale"), "{e}");
        assert!(c(2_000_400).check(4, &host, fixed).is_ok(), "within 250 ppm");
        assert!(c(2_600_000).check(4, &host, ANY_TSC).is_ok(), "TSC scaling");
        let old = Compat::of(4, sample().vm.memory, &host);
        assert!(old.check(4, &host, fixed).is_ok(), "a description without a rate");
    }

    #[test]
    fn compatibility_lists_every_mismatch() {
        let mut host = CpuId::new(3).unwrap();
        {
            let e = host.as_mut_slice();
            e[0].function = 0;
            (e[0].ebx, e[0].edx, e[0].ecx) = (0x6874_7541, 0x6974_6e65, 0x444d_4163); // AuthenticAMD
            e[1].function = 1;
            e[1].ecx = 0x1;
            e[2].function = 7;
            e[2].flags = kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
        }
        let mut vm = host.clone();
        vm.as_mut_slice()[1].ecx = 0x3; // a feature the host lacks
        let c = Compat::of(4, sample().vm.memory, &vm);
        let e = c.check(2, &host, ANY_TSC).unwrap_err().to_string();
        assert!(
            e.contains("4 possible CPUs") && e.contains("1.ECX bits 0x2"),
            "{e}"
        );
        assert!(Compat::of(4, sample().vm.memory, &host)
            .check(4, &host, ANY_TSC)
            .is_ok());
    }

    proptest! {
        // State files come from outside the trust boundary: no input panics the decoder,
        // whether the envelope is damaged or the sections inside a valid envelope are.
        #[test]
        fn damaged_state_never_panics(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
                                      cut in any::<usize>()) {
            let good = sample().encode().unwrap();
            let mut bad = good.clone();
            for (i, x) in &flips {
                let i = i % bad.len();
                bad[i] ^= x | 1;
            }
            prop_assert!(SavedVm::decode(&bad).is_err() || bad == good);
            let _ = SavedVm::decode(&good[..cut % good.len()]);
            // Damage inside the sections, behind a valid checksum.
            let snap = Snapshot::decode(&good, &Limits::default()).unwrap();
            let mut resealed = Snapshot::default();
            for name in snap.names() {
                let mut p = snap.section(name).unwrap().to_vec();
                for (i, x) in &flips {
                    if !p.is_empty() {
                        let i = i % p.len();
                        p[i] ^= x;
                    }
                }
                resealed.add(name, p).unwrap();
            }
            let _ = SavedVm::decode(&resealed.encode());
        }
    }
}
