// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Building a VM, the one way for every origin: a boot configuration, a snapshot, a
//! migration's state, or the VM's own state when it is rebuilt on a new KVM VM
//! ([`VmInner::transplant`]). Each builds the KVM VM, the devices ([`Devices::new`] or
//! [`Devices::from_state`]), the vCPUs (booted, or restored by `restore::restore_machine`),
//! then connects the interrupt lines and starts the eject worker.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use acpi_cpu_hotplug::HotplugLayout;
use kvm_ioctls::{Kvm, VmFd};
use lapic_state::KvmConventions;
use vcpu_manager::{Topology, VcpuManager};
use vm_memory::{Bytes, GuestAddress};

use crate::acpi::{self, AcpiConfig};
use crate::boot::{self, GuestMemory};
use crate::config::{check_kernel_file, ConfigError, KernelSource, SerialMode, VmConfig};
use crate::devices::{DeviceContext, DeviceState, Devices};
use crate::error::{kvm_err, ControlError, VmmError};
use crate::exits::{Exits, PowerButton};
use crate::machine::{check_caps, create_kvm_vm, host_model, open_kvm};
use crate::pause::PauseGuard;
use crate::restore::{self, capture, check_compat, detect_conventions, Prepared};
use crate::snapshot::SavedVm;
use crate::vm::{Vm, VmInner};

/// Check the configuration against the host before building anything.
pub fn validate(config: &VmConfig, kvm: &Kvm) -> Result<(), VmmError> {
    if let KernelSource::Path(p) = &config.kernel {
        check_kernel_file(p)?;
    }
    if let Some(p) = &config.initramfs {
        if let Err(e) = std::fs::metadata(p) {
            return Err(ConfigError::Initramfs {
                path: p.display().to_string(),
                reason: e.to_string(),
            }
            .into());
        }
    }
    let limit = kvm.get_max_vcpus() as u32;
    if config.cpus.max > limit {
        return Err(ConfigError::Cpus(format!(
            "max={} exceeds KVM's limit of {limit} vCPUs",
            config.cpus.max
        ))
        .into());
    }
    // Without interrupt remapping Linux reaches CPUs through 8-bit I/O APIC and MSI
    // destinations and never onlines one whose APIC id is above 255 (x2apic_set_max_apicid).
    // KVM_FEATURE_MSI_EXT_DEST_ID lifts that only with a split irqchip, which this VMM lacks.
    if let KernelSource::Path(p) = &config.kernel {
        if Topology::new(config.cpus.max).max_apic_id() > 255 && boot::is_bzimage(p) {
            return Err(ConfigError::Cpus(format!(
                "max={}: a Linux guest cannot use CPUs with APIC ids above 255 on this VMM \
                 (in-kernel I/O APIC, no MSI extended destination ids); use max=256 or less",
                config.cpus.max
            ))
            .into());
        }
    }
    if config.kernel == KernelSource::Embedded && config.cpus.max as usize > test_guest::MAX_CPUS {
        return Err(ConfigError::Cpus(format!(
            "max={} exceeds the test guest's limit of {} CPUs",
            config.cpus.max,
            test_guest::MAX_CPUS
        ))
        .into());
    }
    Ok(())
}

/// How a VM comes to life: booted from a kernel, or restored from saved state.
enum Origin {
    /// Fresh boot: the BSP enters the kernel at `entry`.
    Boot(boot::EntryPoint),
    /// Restore: vCPUs, KVM VM state and devices from `SavedVm`; RAM is already in place.
    /// With conventions given (probed ahead of time), no probe runs on the restore path.
    Restore(Box<SavedVm>, Option<KvmConventions>),
}

/// The KVM VM a build starts from, with its RAM registered.
struct Machine {
    kvm: Kvm,
    vm: VmFd,
    topology: Topology,
    boot_vcpus: u32,
    mem: GuestMemory,
}

/// What the vCPU part of a build yields besides the vCPUs.
struct CpuSetup {
    msrs: Vec<u32>,
    pending_removals: BTreeSet<u32>,
    paused: bool,
}

impl Vm {
    /// Build the VM described by `config` and start its boot vCPUs.
    pub fn start(config: &VmConfig) -> Result<Vm, VmmError> {
        let kvm = open_kvm()?;
        validate(config, &kvm)?;
        check_caps(&kvm)?;
        let topology = Topology::new(config.cpus.max);
        let mem = boot::create_memory(config.memory)?;
        let layout = HotplugLayout::default();
        let tables = acpi::build(&AcpiConfig {
            topology,
            boot_cpus: config.cpus.boot,
            hotplug: layout,
        })?;
        for t in &tables {
            mem.write_slice(&t.bytes, GuestAddress(t.addr))
                .map_err(|e| VmmError::Io {
                    what: format!("writing ACPI {}: {e}", t.name),
                    source: std::io::Error::from(std::io::ErrorKind::InvalidData),
                })?;
        }
        let entry = boot::load_kernel(
            &mem,
            config.memory,
            &config.kernel,
            config.initramfs.as_deref(),
            config.cmdline.as_deref(),
            acpi::RSDP_ADDR,
        )?;
        let vm = create_kvm_vm(&kvm, &topology, &mem)?;
        let machine = Machine {
            kvm,
            vm,
            topology,
            boot_vcpus: config.cpus.boot,
            mem,
        };
        Vm::assemble(machine, &config.serial, Origin::Boot(entry))
    }

    /// Restore a VM saved by [`VmInner::snapshot`] into this process: RAM is mapped
    /// copy-on-write from the snapshot's memory image, every saved vCPU comes back with its
    /// exact mp_state, LAPIC and registers, devices with their registers and pending events.
    /// The VM runs afterwards unless it was paused when saved.
    pub fn restore(dir: &std::path::Path, serial: &SerialMode) -> Result<Vm, VmmError> {
        let (saved, mem) = crate::snapdir::read_dir(dir).map_err(VmmError::Snapshot)?;
        Vm::from_saved(saved, mem, serial, false, None)
    }

    /// Restore from an already decoded state and RAM (restore and live migration). With
    /// `hold`, the vCPUs stay paused until [`VmInner::resume`] (a migration destination
    /// resumes only once the source has its acknowledgement). `prepared` is a KVM VM made
    /// ahead of time by [`Prepared::new`] for this RAM, which keeps VM creation, memory
    /// registration and the LAPIC conventions probe out of a migration's downtime.
    pub fn from_saved(
        saved: SavedVm,
        mem: GuestMemory,
        serial: &SerialMode,
        hold: bool,
        prepared: Option<Prepared>,
    ) -> Result<Vm, VmmError> {
        let topology = Topology::new(saved.vm.max_vcpus);
        let prepared = match prepared {
            Some(p) if p.topology == topology => p,
            _ => {
                let kvm = open_kvm()?;
                check_caps(&kvm)?;
                let vm = create_kvm_vm(&kvm, &topology, &mem)?;
                Prepared {
                    kvm,
                    vm,
                    conv: None,
                    topology,
                }
            }
        };
        check_compat(&prepared.kvm, &saved)?;
        if !saved.vm.memory.matches(&mem) {
            return Err(VmmError::Snapshot(crate::snapshot::SnapshotError::Incompatible(
                "guest RAM does not match the saved memory layout".into(),
            )));
        }
        let boot_vcpus = saved.vm.boot_vcpus;
        let mut saved = saved;
        saved.vm.paused |= hold;
        let Prepared { kvm, vm, conv, .. } = prepared;
        let machine = Machine {
            kvm,
            vm,
            topology,
            boot_vcpus,
            mem,
        };
        Vm::assemble(machine, serial, Origin::Restore(Box::new(saved), conv))
    }

    fn assemble(m: Machine, serial: &SerialMode, origin: Origin) -> Result<Vm, VmmError> {
        let (ev_tx, events) = mpsc::channel();
        let (hotplug_events, ejects) = crate::cpus::hotplug_events();
        let ctx = DeviceContext {
            topology: m.topology,
            serial,
            power: Arc::new(PowerButton(Mutex::new(ev_tx.clone()))),
            hotplug: hotplug_events.clone(),
        };
        let devices = match &origin {
            Origin::Boot(_) => Devices::new(ctx, m.boot_vcpus)?,
            Origin::Restore(saved, _) => Devices::from_state(
                ctx,
                &DeviceState {
                    acpi: saved.vm.acpi.clone(),
                    serial: saved.vm.serial.clone(),
                },
            )?,
        };
        let exits = Arc::new(Exits {
            io: devices.io(),
            events: Mutex::new(ev_tx.clone()),
            failed: Mutex::default(),
        });
        let cpuid = cpu_model(&m.kvm, &origin)?;
        let mut vcpus = VcpuManager::new(
            m.topology,
            cpuid.clone(),
            exits.clone(),
            KvmConventions::CANONICAL,
        );
        let setup = match &origin {
            Origin::Boot(entry) => boot_vcpus(&m, &mut vcpus, *entry)?,
            Origin::Restore(saved, conv) => restore_vcpus(&m, &mut vcpus, saved, *conv)?,
        };
        // Interrupt lines last: the IOAPIC state and every LAPIC exist, so a line that is
        // high in the saved state is delivered, not dropped.
        devices.connect(&m.vm)?;
        let inner = Arc::new(VmInner {
            vcpus: Mutex::new(vcpus),
            hotplug_events,
            pending_removals: Mutex::new(setup.pending_removals),
            paused: AtomicBool::new(setup.paused),
            events_tx: Mutex::new(ev_tx),
            topology: m.topology,
            boot_vcpus: m.boot_vcpus,
            msrs: setup.msrs,
            supported_cpuid: cpuid,
            exits,
            devices,
            migrating: AtomicBool::new(false),
            ending: AtomicBool::new(false),
            migration_ctl: AtomicU8::new(0),
            migration: Mutex::new(None),
            wire_bytes: AtomicU64::new(0),
            vm: Mutex::new(m.vm),
            mem: m.mem,
            kvm: m.kvm,
        });
        crate::cpus::start_eject_worker(&inner, ejects)?;
        if !setup.paused {
            inner.lock_vcpus().resume_all();
        }
        Ok(Vm { inner, events })
    }
}

/// The VM's CPU model. A restored VM keeps its own: CPUs hot-added later get CPU 0's CPUID
/// (with their own APIC ids), not whatever this host would offer a new VM.
fn cpu_model(kvm: &Kvm, origin: &Origin) -> Result<kvm_bindings::CpuId, VmmError> {
    match origin {
        Origin::Restore(saved, _) => match saved.vcpus.first() {
            Some((_, st)) => Ok(st.cpuid.clone()),
            None => host_model(kvm),
        },
        Origin::Boot(_) => host_model(kvm),
    }
}

/// Create the boot vCPUs, the BSP set up to enter the kernel at `entry`; all start paused.
fn boot_vcpus(m: &Machine, vcpus: &mut VcpuManager, entry: boot::EntryPoint) -> Result<CpuSetup, VmmError> {
    let mut fds = Vec::new();
    for i in 0..m.boot_vcpus {
        let fd = vcpus.prepare(&m.vm, i)?;
        if i == 0 {
            // The BSP enters the kernel directly in 64-bit mode.
            let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            fd.set_sregs(&boot::bsp_sregs(sregs))
                .map_err(kvm_err("KVM_SET_SREGS"))?;
            fd.set_regs(&boot::bsp_regs(entry))
                .map_err(kvm_err("KVM_SET_REGS"))?;
            fd.set_fpu(&boot::boot_fpu()).map_err(kvm_err("KVM_SET_FPU"))?;
            vcpus.set_conventions(detect_conventions(&m.kvm, &fd, &m.topology)?);
            // The VM's TSC rate is this host's now; it travels with the VM.
            vcpus.set_tsc_khz(fd.get_tsc_khz().ok());
        }
        fds.push(fd);
    }
    let msrs = match fds.first() {
        Some(fd) => vcpu_manager::msr_list(&m.kvm, fd)?,
        None => Vec::new(),
    };
    for (i, fd) in fds.into_iter().enumerate() {
        vcpus.start_paused(i as u32, fd)?;
    }
    Ok(CpuSetup {
        msrs,
        pending_removals: BTreeSet::new(),
        paused: false,
    })
}

/// The saved VM's KVM state and vCPUs, through the one restore path.
fn restore_vcpus(
    m: &Machine,
    vcpus: &mut VcpuManager,
    saved: &SavedVm,
    conv: Option<KvmConventions>,
) -> Result<CpuSetup, VmmError> {
    let conv = restore::Conventions {
        source: saved.vm.conventions,
        destination: conv,
    };
    restore::restore_machine(&m.kvm, &m.vm, vcpus, &saved.vcpus, &saved.vm.kvm, conv).map_err(|e| {
        VmmError::Io {
            what: e,
            source: std::io::Error::other("restoring the VM"),
        }
    })?;
    Ok(CpuSetup {
        msrs: saved.vm.msrs.clone(),
        pending_removals: saved.vm.pending_removals.iter().copied().collect(),
        paused: saved.vm.paused,
    })
}

impl VmInner {
    /// Rebuild the VM on a brand-new KVM VM sharing the same memory and devices: pause, save
    /// every vCPU and the irqchip/PIT/clock, create the new VM, restore in order (the same
    /// restore a snapshot takes), move the interrupt lines, resume. mp_states come back
    /// exactly (halted offlined CPUs stay halted with their SW-disabled APIC, never-onlined
    /// ones stay UNINITIALIZED); a VM its user paused stays paused. Returns the per-vCPU save
    /// and restore times in microseconds.
    pub fn transplant(&self) -> Result<(Vec<f64>, Vec<f64>), ControlError> {
        self.not_migrating()?;
        let held = self.lock_vcpus_or_busy()?;
        let mut paused = PauseGuard::new(&self.vcpus, held, self.paused.load(Ordering::SeqCst))
            .map_err(ControlError::pausing)?;
        let mut vm = self.vm.lock().unwrap_or_else(|e| e.into_inner());
        // On failure nothing was switched: the old VM runs on as before.
        let (fresh, new_vm, times) = self.build_replacement(paused.manager(), &vm)?;
        // Old vCPUs go before the old VM fd; the guard then resumes the new set.
        let mut old = std::mem::replace(paused.manager(), fresh);
        old.stop_all();
        drop(old);
        drop(std::mem::replace(&mut *vm, new_vm));
        Ok(times)
    }

    #[allow(clippy::type_complexity)]
    fn build_replacement(
        &self,
        vcpus: &VcpuManager,
        vm: &VmFd,
    ) -> Result<(VcpuManager, VmFd, (Vec<f64>, Vec<f64>)), ControlError> {
        let fail = |what: &str, e: &dyn std::fmt::Display| ControlError::Internal(format!("{what}: {e}"));
        let (states, kvm_state, save_us) = capture(vcpus, vm, &self.msrs).map_err(ControlError::Internal)?;
        let new_vm = create_kvm_vm(&self.kvm, &self.topology, &self.mem).map_err(|e| fail("new VM", &e))?;
        let mut fresh = VcpuManager::new(
            self.topology,
            self.supported_cpuid.clone(),
            self.exits.clone(),
            vcpus.conventions(),
        );
        // Same KVM, same conventions: the rebuilt VM is this one.
        let conv = restore::Conventions {
            source: vcpus.conventions(),
            destination: Some(vcpus.conventions()),
        };
        let restore_us = restore::restore_machine(&self.kvm, &new_vm, &mut fresh, &states, &kvm_state, conv)
            .map_err(ControlError::Internal)?;
        // The interrupt lines last, as in every build.
        self.devices
            .move_to(vm, &new_vm)
            .map_err(|e| fail("moving the interrupt lines", &e))?;
        Ok((fresh, new_vm, (save_us, restore_us)))
    }
}
