// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The VM's devices as one unit: COM1 with its console back end, the ACPI PM/GPE/CPU-hotplug
//! block with its SCI, the port I/O bus that routes vCPU exits to them, and the wiring of
//! their interrupts into a KVM VM. A device change (a new device, another console back end,
//! other interrupt wiring) edits this directory alone.
//!
//! Life cycle: [`Devices::new`] (boot) or [`Devices::from_state`] (restore, migration) build
//! the unit without touching KVM; [`Devices::connect`] attaches the interrupt lines once the
//! vCPUs and the irqchip state exist; [`Devices::state`] captures it (console input stops
//! until [`Devices::resume_input`]); [`Devices::move_to`] re-wires a VM rebuilt on a new
//! KVM VM; [`Devices::close`] ends the console threads.

pub mod console;
pub mod irq;
mod pty;
pub mod serial;

use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use acpi_cpu_hotplug::{
    AcpiHotplugDevice, AcpiHotplugState, DeviceError, HotplugLayout, HotplugSink, SleepSink,
};
use kvm_ioctls::VmFd;
use vcpu_manager::Topology;
use vm_device::bus::{PioAddress, PioRange};
use vm_device::device_manager::{IoManager, PioManager};
use vm_device::DevicePio;
use vmm_sys_util::eventfd::EventFd;

pub use console::{serve_pty, serve_socket, Console, ConsoleOut};
pub use irq::LevelIrq;
pub use serial::{pump_input, EventFdTrigger, SerialDevice};

use crate::acpi::{COM1_IRQ, COM1_PORT};
use crate::config::SerialMode;
use crate::error::{kvm_err, VmmError};
use crate::snapshot::SerialSnapshot;

/// What the devices need from the rest of the VMM.
pub struct DeviceContext<'a> {
    /// CPU topology (the hotplug block's APIC ids).
    pub topology: Topology,
    /// Where COM1's output goes and its input comes from.
    pub serial: &'a SerialMode,
    /// Receives the guest's S5 request.
    pub power: Arc<dyn SleepSink>,
    /// Receives the guest's ejects and `_OST` reports.
    pub hotplug: Arc<dyn HotplugSink>,
}

/// The saved state of the devices.
pub struct DeviceState {
    /// PM1, GPE0 and the CPU hotplug controller.
    pub acpi: AcpiHotplugState,
    /// COM1's registers and FIFO.
    pub serial: SerialSnapshot,
}

/// COM1, the ACPI block, their interrupt lines and the I/O bus.
pub struct Devices {
    io: Arc<IoManager>,
    acpi: Arc<Mutex<AcpiHotplugDevice>>,
    serial: Arc<Mutex<SerialDevice>>,
    /// COM1's irqfd (GSI 4), edge-triggered: vm-superio writes it on every interrupt.
    serial_irq: EventFd,
    /// The SCI, level-triggered through irqfd + resamplefd.
    sci: Arc<LevelIrq>,
    console: Option<Arc<Console>>,
    /// What `--serial` asked for.
    serial_mode: SerialMode,
    /// Ends the console input threads.
    stop: Arc<AtomicBool>,
}

impl Devices {
    /// The devices of a VM that boots with `boot_vcpus` present CPUs.
    pub fn new(ctx: DeviceContext<'_>, boot_vcpus: u32) -> Result<Devices, VmmError> {
        Devices::build(ctx, None, boot_vcpus)
    }

    /// The devices with the registers, FIFO and pending hotplug events of `state`.
    pub fn from_state(ctx: DeviceContext<'_>, state: &DeviceState) -> Result<Devices, VmmError> {
        Devices::build(ctx, Some(state), 0)
    }

    fn build(
        ctx: DeviceContext<'_>,
        saved: Option<&DeviceState>,
        boot_vcpus: u32,
    ) -> Result<Devices, VmmError> {
        let io_err = |what: &str| {
            let what = what.to_string();
            move |source| VmmError::Io { what, source }
        };
        let stop = Arc::new(AtomicBool::new(false));
        // COM1 on GSI 4 through an irqfd (attached to the VM by `connect`).
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        let trigger = serial_irq.try_clone().map_err(io_err("eventfd"))?;
        let (out, console) = console_out(ctx.serial)?;
        let serial = match saved {
            None => SerialDevice::new(trigger, out),
            Some(s) => SerialDevice::from_state(&s.serial, trigger, out).map_err(io_err("restoring COM1"))?,
        };
        let serial = Arc::new(Mutex::new(serial));
        let sci = Arc::new(
            LevelIrq::unregistered(u32::from(HotplugLayout::default().pm.sci_irq))
                .map_err(io_err("SCI irqfd"))?,
        );
        let acpi = Arc::new(Mutex::new(acpi_device(&ctx, saved, boot_vcpus, sci.clone())?));
        let mut io = IoManager::new();
        register(&mut io, COM1_PORT, 8, serial.clone())?;
        for (base, len) in HotplugLayout::default().pio_ranges() {
            register(&mut io, base, len, acpi.clone())?;
        }
        let devices = Devices {
            io: Arc::new(io),
            acpi,
            serial,
            serial_irq,
            sci,
            console: console.as_ref().map(|(c, _)| c.clone()),
            serial_mode: ctx.serial.clone(),
            stop,
        };
        devices.start_input(console.map(|(_, input)| input))?;
        Ok(devices)
    }

    /// The thread that feeds console input into COM1: a socket's clients, a pty, or stdin.
    fn start_input(&self, input: Option<ConsoleInput>) -> Result<(), VmmError> {
        let (s, st) = (self.serial.clone(), self.stop.clone());
        let spawned = match (&self.console, input) {
            (Some(c), Some(ConsoleInput::Socket(l))) => {
                let c = c.clone();
                std::thread::Builder::new().name("console".into()).spawn(move || {
                    crate::seccomp::apply_or_warn(crate::seccomp::ThreadKind::Device);
                    serve_socket(c, l, s, st)
                })
            }
            (Some(_), Some(ConsoleInput::Pty(master))) => {
                std::thread::Builder::new().name("console".into()).spawn(move || {
                    crate::seccomp::apply_or_warn(crate::seccomp::ThreadKind::Device);
                    serve_pty(&master, &s, &st)
                })
            }
            (Some(_), Some(ConsoleInput::Stdin)) => {
                std::thread::Builder::new().name("stdin".into()).spawn(move || {
                    crate::seccomp::apply_or_warn(crate::seccomp::ThreadKind::Device);
                    pump_input(&s, std::io::stdin(), &st)
                })
            }
            _ => return Ok(()),
        };
        spawned.map(drop).map_err(|source| VmmError::Io {
            what: "console input thread".into(),
            source,
        })
    }

    /// COM1's console as `vm.info` reports it (a pty's slave path among it).
    pub fn serial_config(&self) -> crate::status::SerialConfig {
        let path = |p: &std::path::Path| Some(p.display().to_string());
        let (mode, file, socket) = match &self.serial_mode {
            SerialMode::Stdout => ("Tty", None, None),
            SerialMode::Null => ("Null", None, None),
            SerialMode::File(p) => ("File", path(p), None),
            SerialMode::Socket(p) => ("Socket", None, path(p)),
            SerialMode::Pty => ("Pty", self.console.as_ref().and_then(|c| path(c.path())), None),
        };
        crate::status::SerialConfig { mode, file, socket }
    }

    /// Attach the interrupt lines to `vm`. Last in a build: the IOAPIC state and every LAPIC
    /// exist, so a line that is high in the saved state is delivered, not dropped.
    pub fn connect(&self, vm: &VmFd) -> Result<(), VmmError> {
        vm.register_irqfd(&self.serial_irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD(serial)"))?;
        self.sci.register(vm).map_err(|source| VmmError::Io {
            what: "KVM_IRQFD(SCI)".into(),
            source,
        })
    }

    /// Move the interrupt lines from `old` to `new` (a VM rebuilt on a new KVM VM): an eventfd
    /// feeds one VM's irqfd at a time. On failure they are back on `old`.
    pub fn move_to(&self, old: &VmFd, new: &VmFd) -> Result<(), VmmError> {
        let _ = old.unregister_irqfd(&self.serial_irq, COM1_IRQ);
        let _ = self.sci.unregister(old);
        let moved = self.connect(new);
        if moved.is_err() {
            let _ = new.unregister_irqfd(&self.serial_irq, COM1_IRQ);
            let _ = self.sci.unregister(new);
            let _ = self.connect(old);
        }
        moved
    }

    /// The devices' state. Console input stops with it (a byte taken after the capture would
    /// be lost with a VM that migrates away) until [`Devices::resume_input`].
    pub fn state(&self) -> DeviceState {
        let acpi = self.lock_acpi().state();
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        serial.quiesce_input();
        DeviceState {
            acpi,
            serial: serial.state(),
        }
    }

    /// Console input flows again after a capture (this VM runs on).
    pub fn resume_input(&self) {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resume_input();
    }

    /// The port I/O bus the vCPU exits go to.
    pub fn io(&self) -> Arc<IoManager> {
        self.io.clone()
    }

    /// The ACPI PM/GPE/CPU hotplug device.
    pub fn acpi(&self) -> &Arc<Mutex<AcpiHotplugDevice>> {
        &self.acpi
    }

    /// The ACPI device, locked.
    pub fn lock_acpi(&self) -> MutexGuard<'_, AcpiHotplugDevice> {
        self.acpi.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// End the console input threads and remove the console socket now, not when the last
    /// holder of the VM's state (an API thread) lets go.
    pub fn close(&self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(c) = &self.console {
            c.close();
        }
    }
}

impl Drop for Devices {
    /// A build that fails after the devices exist must not leave their input threads behind
    /// (holding the console socket's path): they end with the unit.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The ACPI block, fresh or from saved state.
fn acpi_device(
    ctx: &DeviceContext<'_>,
    saved: Option<&DeviceState>,
    boot_vcpus: u32,
    sci: Arc<LevelIrq>,
) -> Result<AcpiHotplugDevice, VmmError> {
    let layout = HotplugLayout::default();
    let t = ctx.topology;
    let apic_ids: Vec<u32> = (0..t.max_vcpus()).map(|i| t.apic_id(i)).collect();
    let (power, hotplug) = (ctx.power.clone(), ctx.hotplug.clone());
    match saved {
        None => Ok(AcpiHotplugDevice::new(
            layout, &apic_ids, boot_vcpus, sci, power, hotplug,
        )),
        Some(s) => AcpiHotplugDevice::from_state(layout, &apic_ids, &s.acpi, sci, power, hotplug).map_err(
            |e| match e {
                DeviceError::Sci(source) => VmmError::Io {
                    what: "raising the restored SCI".into(),
                    source,
                },
                DeviceError::Hotplug(e) => VmmError::Io {
                    what: format!("restoring the ACPI hotplug device: {e}"),
                    source: std::io::Error::from(std::io::ErrorKind::InvalidData),
                },
            },
        ),
    }
}

/// Where a console's input comes from.
enum ConsoleInput {
    /// The socket's clients, accepted on it.
    Socket(UnixListener),
    /// The pty's master.
    Pty(std::fs::File),
    /// The VMM's stdin.
    Stdin,
    /// Nowhere (a file).
    Nothing,
}

/// A console and where its input comes from.
type BoundedConsole = (Arc<Console>, ConsoleInput);

/// COM1's output sink, and (but for `null`) its bounded console and that console's input.
fn console_out(mode: &SerialMode) -> Result<(ConsoleOut, Option<BoundedConsole>), VmmError> {
    let sink = |file: std::io::Result<std::fs::File>, name: &std::path::Path, arg: String, input| {
        let c = file
            .and_then(|f| Console::sink(f, name.to_path_buf()))
            .map_err(|source| VmmError::Io {
                what: format!("--serial {arg}"),
                source,
            })?;
        Ok::<_, VmmError>((ConsoleOut::Socket(c.clone()), Some((c, input))))
    };
    Ok(match mode {
        // Through the outbox: `vmm-reference run ... | less` left unread must not stall a vCPU.
        // (A stdout closed at exec is /dev/null by then: Rust's runtime reopens fds 0-2.)
        SerialMode::Stdout => sink(
            std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map(std::fs::File::from),
            std::path::Path::new("stdout"),
            "tty".into(),
            ConsoleInput::Stdin,
        )?,
        SerialMode::Null => (ConsoleOut::Null, None),
        SerialMode::File(p) => sink(
            // Non-blocking: a FIFO with no reader fails at once (ENXIO) instead of hanging
            // the start; the writer thread takes EAGAIN in its stride.
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
                .open(p),
            p,
            format!("file={}", p.display()),
            ConsoleInput::Nothing,
        )?,
        SerialMode::Socket(p) => {
            let (c, l) = Console::bind(p).map_err(|source| VmmError::Io {
                what: format!("--serial socket={}", p.display()),
                source,
            })?;
            (ConsoleOut::Socket(c.clone()), Some((c, ConsoleInput::Socket(l))))
        }
        SerialMode::Pty => {
            let (c, master) = Console::pty().map_err(|source| VmmError::Io {
                what: "--serial pty".into(),
                source,
            })?;
            // People need the slave's path to attach: say it whatever the log level.
            eprintln!("vmm-reference: serial console on {}", c.path().display());
            log::info!("serial console on {}", c.path().display());
            (
                ConsoleOut::Socket(c.clone()),
                Some((c, ConsoleInput::Pty(master))),
            )
        }
    })
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

/// Held by the unit tests that start device threads: one of them counts this process's
/// threads by name, which another test's console writer would throw off.
#[cfg(test)]
pub(crate) static DEVICE_THREADS: Mutex<()> = Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    struct Nobody;
    impl SleepSink for Nobody {
        fn sleep(&self, _slp_typ: u8) {}
    }
    impl HotplugSink for Nobody {
        fn cpu_ejected(&self, _cpu: u32) {}
    }

    /// Threads of this process with one of `names`.
    fn threads(names: &[&str]) -> usize {
        std::fs::read_dir("/proc/self/task")
            .expect("task dir")
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
            .filter(|c| names.contains(&c.trim()))
            .count()
    }

    /// A VMM that runs VMs one after another in one process (a library user, the tests)
    /// must not keep a console accept thread, its writer and a resample thread per VM that
    /// ended: they held COM1 and the SCI until the process exited.
    #[test]
    fn closed_devices_leave_no_thread_behind() {
        let _alone = DEVICE_THREADS.lock().unwrap_or_else(|e| e.into_inner());
        let names = ["console", "console-out", "irq9-resample"];
        let dir = std::env::temp_dir().join(format!("devices-close-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mode = SerialMode::Socket(dir.join("con.sock"));
        let wait_for = |want: &dyn Fn(usize) -> bool| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !want(threads(&names)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            threads(&names)
        };
        // A console another test closed may still be ending its writer thread.
        let before = wait_for(&|n| n == 0);
        let ctx = DeviceContext {
            topology: Topology::new(2),
            serial: &mode,
            power: Arc::new(Nobody),
            hotplug: Arc::new(Nobody),
        };
        let devices = Devices::new(ctx, 1).expect("devices");
        assert_eq!(
            wait_for(&|n| n >= before + 3),
            before + 3,
            "the devices' threads run"
        );
        devices.close();
        drop(devices);
        assert_eq!(wait_for(&|n| n == before), before, "threads left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
