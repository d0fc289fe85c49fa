// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Building and running a VM: KVM setup, memory, ACPI, kernel, devices, vCPU threads.

use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use acpi_cpu_hotplug::{AcpiHotplugDevice, HotplugLayout, HotplugSink, SleepSink, SLP_TYP_S5};
use kvm_bindings::{kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use lapic_state::LapicPage;
use vcpu_manager::{cpuid, ExitHandler, Topology, VcpuExitReason, VcpuRunner};
use vm_device::bus::{PioAddress, PioRange};
use vm_device::device_manager::{IoManager, PioManager};
use vm_device::DevicePio;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi::{self, AcpiConfig, COM1_IRQ, COM1_PORT};
use crate::boot::{self, GuestMemory};
use crate::config::{check_kernel_file, ConfigError, KernelSource, SerialMode, VmConfig};
use crate::devices::{serve_socket, ConsoleOut, LevelIrq, SerialDevice, SocketConsole};

/// KVM_CAP_X2APIC_API flags: 32-bit x2APIC ids in the LAPIC state, no 0xff broadcast quirk.
const X2APIC_API_FLAGS: u64 = (kvm_bindings::KVM_X2APIC_API_USE_32BIT_IDS
    | kvm_bindings::KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK) as u64;
/// TSS area KVM needs for real-mode emulation on Intel (3 pages inside the MMIO gap).
const TSS_ADDRESS: usize = 0xfffb_d000;
/// How long a request to a vCPU thread may take.
const VCPU_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

/// How the VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest powered off through ACPI S5.
    PowerOff,
    /// The guest failed (triple fault, emulation failure, ...).
    GuestError(String),
}

enum VmEvent {
    PowerOff,
    VcpuFailed(u32, VcpuExitReason),
}

struct PowerButton(Mutex<mpsc::Sender<VmEvent>>);

impl SleepSink for PowerButton {
    fn sleep(&self, slp_typ: u8) {
        if slp_typ == SLP_TYP_S5 {
            let _ = self
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(VmEvent::PowerOff);
        } else {
            log::warn!("guest requested unsupported sleep type {slp_typ}; ignored");
        }
    }
}

/// Receives the guest's ejects and `_OST` reports. It only records them (it runs with the
/// device lock held); acting on an eject (joining the vCPU thread, parking its fd) belongs to
/// the VM's control path.
#[derive(Default)]
pub struct HotplugEvents {
    ejected: Mutex<Vec<u32>>,
}

impl HotplugEvents {
    /// CPUs the guest ejected since the last call.
    pub fn take_ejected(&self) -> Vec<u32> {
        std::mem::take(&mut *self.ejected.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl HotplugSink for HotplugEvents {
    fn cpu_ejected(&self, cpu: u32) {
        log::info!("guest ejected CPU {cpu}");
        self.ejected.lock().unwrap_or_else(|e| e.into_inner()).push(cpu);
    }
    fn ost(&self, cpu: u32, event: u32, status: u32) {
        log::info!("guest _OST for CPU {cpu}: event {event:#x} status {status:#x}");
    }
}

struct Exits {
    io: IoManager,
    events: Mutex<mpsc::Sender<VmEvent>>,
}

impl ExitHandler for Exits {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        if self.io.pio_read(PioAddress(port), data).is_err() {
            // Nothing there: the bus floats high.
            data.fill(0xff);
        }
    }
    fn pio_write(&self, port: u16, data: &[u8]) {
        let _ = self.io.pio_write(PioAddress(port), data);
    }
    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        log::debug!("unhandled MMIO read at {addr:#x}");
        data.fill(0xff);
    }
    fn mmio_write(&self, addr: u64, _data: &[u8]) {
        log::debug!("unhandled MMIO write at {addr:#x}");
    }
    fn vcpu_stopped(&self, index: u32, reason: &VcpuExitReason) {
        if *reason != VcpuExitReason::Stopped {
            let _ = self
                .events
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(VmEvent::VcpuFailed(index, reason.clone()));
        }
    }
}

/// A running VM.
pub struct Vm {
    // Field order is drop order: vCPU threads stop before the fds and memory go away.
    runners: Vec<VcpuRunner>,
    events: mpsc::Receiver<VmEvent>,
    stop: Arc<AtomicBool>,
    topology: Topology,
    acpi_dev: Arc<Mutex<AcpiHotplugDevice>>,
    hotplug_events: Arc<HotplugEvents>,
    mem: GuestMemory,
    _console: Option<Arc<SocketConsole>>,
    _vm: VmFd,
    _kvm: Kvm,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm").field("vcpus", &self.runners.len()).finish()
    }
}

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

/// Open `/dev/kvm`.
pub fn open_kvm() -> Result<Kvm, VmmError> {
    Kvm::new().map_err(kvm_err("opening /dev/kvm"))
}

impl Vm {
    /// Build the VM described by `config` and start its boot vCPUs.
    pub fn start(config: &VmConfig) -> Result<Vm, VmmError> {
        let kvm = open_kvm()?;
        validate(config, &kvm)?;
        for cap in [Cap::Irqchip, Cap::Irqfd, Cap::ImmediateExit, Cap::UserMemory] {
            if !kvm.check_extension(cap) {
                return Err(VmmError::Io {
                    what: format!("KVM lacks {cap:?}"),
                    source: std::io::Error::from(std::io::ErrorKind::Unsupported),
                });
            }
        }
        let topology = Topology::new(config.cpus.max);
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        if topology.needs_x2apic() {
            // APIC ids above 254 only exist with 32-bit x2APIC ids; must precede vCPU creation.
            let cap = kvm_enable_cap {
                cap: kvm_bindings::KVM_CAP_X2APIC_API,
                args: [X2APIC_API_FLAGS, 0, 0, 0],
                ..Default::default()
            };
            vm.enable_cap(&cap)
                .map_err(kvm_err("KVM_ENABLE_CAP(X2APIC_API)"))?;
        }

        let mem = boot::create_memory(config.memory)?;
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| VmmError::Io {
                    what: format!("guest memory host address: {e}"),
                    source: std::io::Error::from(std::io::ErrorKind::InvalidData),
                })?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the Vm keeps for as
            // long as the VM fd exists (field order in `Vm`).
            unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

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

        let (ev_tx, events) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut io = IoManager::new();

        // COM1 on GSI 4 through an irqfd.
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmmError::Io {
            what: "eventfd".into(),
            source,
        })?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD(serial)"))?;
        let mut console = None;
        let mut listener: Option<UnixListener> = None;
        let out = match &config.serial {
            SerialMode::Stdout => ConsoleOut::Stdout(std::io::stdout()),
            SerialMode::File(p) => ConsoleOut::File(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|source| VmmError::Io {
                        what: format!("--serial file={}", p.display()),
                        source,
                    })?,
            ),
            SerialMode::Socket(p) => {
                let (c, l) = SocketConsole::bind(p).map_err(|source| VmmError::Io {
                    what: format!("--serial socket={}", p.display()),
                    source,
                })?;
                console = Some(c.clone());
                listener = Some(l);
                ConsoleOut::Socket(c)
            }
        };
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, out)));
        register(&mut io, COM1_PORT, 8, serial.clone())?;
        if let (Some(c), Some(l)) = (console.clone(), listener) {
            let (s, st) = (serial.clone(), stop.clone());
            std::thread::Builder::new()
                .name("console".into())
                .spawn(move || serve_socket(c, l, s, st))
                .map_err(|source| VmmError::Io {
                    what: "console thread".into(),
                    source,
                })?;
        } else if config.serial == SerialMode::Stdout {
            let (s, st) = (serial.clone(), stop.clone());
            std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || crate::devices::pump_input(&s, std::io::stdin(), &st))
                .map_err(|source| VmmError::Io {
                    what: "stdin thread".into(),
                    source,
                })?;
        }

        // ACPI PM1/GPE0 and the CPU hotplug block, with the SCI as a level line.
        let sci = LevelIrq::new(&vm, u32::from(layout.pm.sci_irq)).map_err(|source| VmmError::Io {
            what: "SCI irqfd".into(),
            source,
        })?;
        let apic_ids: Vec<u32> = (0..topology.max_vcpus()).map(|i| topology.apic_id(i)).collect();
        let hotplug_events = Arc::new(HotplugEvents::default());
        let acpi_dev = Arc::new(Mutex::new(AcpiHotplugDevice::new(
            layout,
            &apic_ids,
            config.cpus.boot,
            Arc::new(sci),
            Arc::new(PowerButton(Mutex::new(ev_tx.clone()))),
            hotplug_events.clone(),
        )));
        for (base, len) in layout.pio_ranges() {
            register(&mut io, base, len, acpi_dev.clone())?;
        }

        let exits = Arc::new(Exits {
            io,
            events: Mutex::new(ev_tx),
        });
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut fds = Vec::new();
        for i in 0..config.cpus.boot {
            let fd = vm
                .create_vcpu(u64::from(topology.apic_id(i)))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            configure_vcpu(&fd, &supported, &topology, i)?;
            if i == 0 {
                // The BSP enters the kernel directly in 64-bit mode.
                let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                fd.set_sregs(&boot::bsp_sregs(sregs))
                    .map_err(kvm_err("KVM_SET_SREGS"))?;
                fd.set_regs(&boot::bsp_regs(entry))
                    .map_err(kvm_err("KVM_SET_REGS"))?;
                fd.set_fpu(&boot::boot_fpu()).map_err(kvm_err("KVM_SET_FPU"))?;
            }
            fds.push(fd);
        }
        let mut runners = Vec::new();
        for (i, fd) in fds.into_iter().enumerate() {
            runners.push(VcpuRunner::spawn(i as u32, fd, exits.clone())?);
        }
        Ok(Vm {
            runners,
            events,
            stop,
            topology,
            acpi_dev,
            hotplug_events,
            mem,
            _console: console,
            _vm: vm,
            _kvm: kvm,
        })
    }

    /// Wait for the VM to end (power-off or a guest failure), up to `timeout` if given.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<VmOutcome> {
        let ev = match timeout {
            Some(t) => self.events.recv_timeout(t).ok()?,
            None => self.events.recv().ok()?,
        };
        Some(match ev {
            VmEvent::PowerOff => VmOutcome::PowerOff,
            VmEvent::VcpuFailed(i, r) => VmOutcome::GuestError(format!("vCPU {i}: {r}")),
        })
    }

    /// KVM's mp_state of present vCPU `index` (`KVM_MP_STATE_*`).
    pub fn mp_state(&self, index: u32) -> Option<u32> {
        let r = self.runners.get(index as usize)?;
        r.with_vcpu(VCPU_REQUEST_TIMEOUT, |fd| {
            fd.get_mp_state().ok().map(|m| m.mp_state)
        })
        .flatten()
    }

    /// The LAPIC register page of present vCPU `index`.
    pub fn lapic(&self, index: u32) -> Option<LapicPage> {
        let r = self.runners.get(index as usize)?;
        r.with_vcpu(VCPU_REQUEST_TIMEOUT, |fd| {
            fd.get_lapic().ok().map(LapicPage::from)
        })
        .flatten()
    }

    /// IA32_APIC_BASE of present vCPU `index` (from its SREGS).
    pub fn apic_base(&self, index: u32) -> Option<u64> {
        let r = self.runners.get(index as usize)?;
        r.with_vcpu(VCPU_REQUEST_TIMEOUT, |fd| {
            fd.get_sregs().ok().map(|s| s.apic_base)
        })
        .flatten()
    }

    /// The ACPI PM/GPE/CPU hotplug device.
    pub fn acpi_device(&self) -> &Arc<Mutex<AcpiHotplugDevice>> {
        &self.acpi_dev
    }

    /// Ejects and `_OST` reports from the guest.
    pub fn hotplug_events(&self) -> &Arc<HotplugEvents> {
        &self.hotplug_events
    }

    /// The topology.
    pub fn topology(&self) -> Topology {
        self.topology
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Stop every vCPU and join the threads.
    pub fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for r in self.runners.drain(..) {
            let _ = r.stop_and_join();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn register<D>(io: &mut IoManager, base: u16, len: u16, dev: Arc<D>) -> Result<(), VmmError>
where
    D: DevicePio + Send + Sync + 'static,
{
    let range = PioRange::new(PioAddress(base), len).map_err(|e| VmmError::Io {
        what: format!("I/O range {base:#x}+{len}: {e}"),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    io.register_pio(range, dev).map_err(|e| VmmError::Io {
        what: format!("registering ports {base:#x}+{len}: {e}"),
        source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
    })
}

/// Per-vCPU setup shared by boot and (later) hot-added vCPUs: CPUID and the LINT wiring.
fn configure_vcpu(
    fd: &VcpuFd,
    supported: &kvm_bindings::CpuId,
    topo: &Topology,
    index: u32,
) -> Result<(), VmmError> {
    fd.set_cpuid2(&cpuid::for_vcpu(supported, topo, index))
        .map_err(kvm_err("KVM_SET_CPUID2"))?;
    let mut lapic = LapicPage::from(fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?);
    // LINT0 = ExtINT (the 8259), LINT1 = NMI: the wiring firmware leaves for the OS.
    lapic.set_lint_boot_defaults();
    fd.set_lapic(lapic.as_kvm()).map_err(kvm_err("KVM_SET_LAPIC"))?;
    Ok(())
}
