// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vmm-reference` command line: `run`, `acpi-tables`, `demo`.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use vmm_reference::acpi::{self, AcpiConfig};
use vmm_reference::config::{parse_cpus, parse_memory, parse_serial, KernelSource, VmConfig};
use vmm_reference::console::GuestConsole;
use vmm_reference::migration::IncomingOptions;
use vmm_reference::vm::{Vm, VmInner, VmOutcome, VmmError};

#[derive(Parser)]
#[command(
    name = "vmm-reference",
    version,
    about = "Reference VMM for KVM CPU hotplug, LAPIC state and migration"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a VM (the built-in test guest unless --kernel is given).
    Run {
        /// Kernel: Linux bzImage or ELF (vmlinux, test-guest). Default: the built-in test guest.
        #[arg(long)]
        kernel: Option<PathBuf>,
        /// Initramfs for a Linux kernel.
        #[arg(long)]
        initramfs: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long)]
        cmdline: Option<String>,
        /// vCPUs: boot=N,max=M.
        #[arg(long, default_value = "boot=1,max=1")]
        cpus: String,
        /// Guest memory, e.g. 256M or 1G.
        #[arg(long, default_value = "256M")]
        memory: String,
        /// REST API socket (Unix stream socket, JSON; see `vmm-reference ctl`).
        #[arg(long)]
        api_socket: Option<PathBuf>,
        /// Serial console: stdout | file=PATH | socket=PATH.
        #[arg(long, default_value = "stdout")]
        serial: String,
        /// Restore the VM saved in DIR (by `ctl snapshot`) instead of booting one.
        #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initramfs", "cmdline", "cpus", "memory", "incoming"])]
        restore: Option<PathBuf>,
        /// Wait for a live migration on unix:PATH or tcp:HOST:PORT and run the VM it brings.
        #[arg(long, value_name = "ADDR", conflicts_with_all = ["kernel", "initramfs", "cmdline", "cpus", "memory"])]
        incoming: Option<String>,
        /// Start without a VM; `PUT vm.restore` or `vm.receive-migration` on --api-socket
        /// creates it.
        #[arg(long, conflicts_with_all = ["kernel", "initramfs", "cmdline", "cpus", "memory", "restore", "incoming"])]
        standby: bool,
        /// File holding the pre-shared token a migration source must prove it has (required
        /// to receive on tcp:; 16 to 4096 bytes, a trailing newline is dropped).
        #[arg(long, value_name = "FILE")]
        migration_token_file: Option<PathBuf>,
        /// Most guest RAM an incoming migration may bring, e.g. 4G (default: this host's RAM).
        #[arg(long, value_name = "SIZE")]
        max_incoming_memory: Option<String>,
        /// Per-thread seccomp filters: on (a call off the list fails with EPERM), kill (it
        /// kills the VMM; for testing the lists), off. Default: $VMM_SECCOMP, else on.
        #[arg(long, value_name = "on|kill|log|off")]
        seccomp: Option<String>,
    },
    /// Write the ACPI tables a VM would get, one DIR/<SIG>.dat file per table.
    AcpiTables {
        /// vCPUs: boot=N,max=M.
        #[arg(long)]
        cpus: String,
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Boot the test guest with 2 of 8 CPUs; hot-add, offline, remove and re-add CPUs.
    Demo,
    /// Control a running VMM through its API socket.
    Ctl {
        /// The VMM's --api-socket.
        #[arg(long)]
        api_socket: PathBuf,
        #[command(subcommand)]
        op: CtlOp,
    },
}

#[derive(Subcommand)]
enum CtlOp {
    /// Per-CPU state (table, or the API's JSON with --json).
    Info {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make N CPUs present.
    Resize {
        /// Desired number of present CPUs.
        n: u32,
    },
    /// Hot-add a CPU (the lowest absent one unless --id is given).
    AddCpu {
        /// CPU index to add.
        #[arg(long)]
        id: Option<u32>,
    },
    /// Ask the guest to remove CPU ID (again, if it refused).
    RemoveCpu {
        /// CPU index.
        id: u32,
    },
    /// Withdraw the removal of CPU ID (one the guest refused or has not taken yet).
    CancelRemoval {
        /// CPU index.
        id: u32,
    },
    /// Pause all vCPUs.
    Pause,
    /// Resume all vCPUs.
    Resume,
    /// End the VM.
    Shutdown,
    /// Save the VM into DIR (state.bin + memory.bin); it runs on afterwards.
    Snapshot {
        /// Snapshot directory (created if missing).
        dir: PathBuf,
    },
    /// Standby VMM (`run --standby`): restore the VM saved in DIR.
    Restore {
        /// Snapshot directory.
        dir: PathBuf,
    },
    /// Standby VMM: wait for a live migration on ADDR (returns once the VM runs here).
    ReceiveMigration {
        /// unix:PATH or tcp:HOST:PORT to listen on.
        receiver: String,
        /// File with the token the source must prove it has (tcp:).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// Live-migrate the VM to a VMM started with `run --incoming ADDR` (or a standby VMM
    /// doing `ctl receive-migration ADDR`).
    Migrate {
        /// unix:PATH or tcp:HOST:PORT.
        destination: String,
        /// Target downtime in milliseconds.
        #[arg(long, default_value_t = 300)]
        downtime_ms: u64,
        /// Pre-copy rounds before the timeout strategy applies.
        #[arg(long)]
        max_rounds: Option<u32>,
        /// The whole migration's deadline in milliseconds.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// ignore | cancel | throttle: what to do when pre-copy does not converge.
        #[arg(long)]
        timeout_strategy: Option<String>,
        /// File with the destination's token (tcp:).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
    },
    /// End the outgoing migration; the VM runs on here.
    CancelMigration,
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's first line without its "error: " prefix.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            return fail(first.trim_start_matches("error: "));
        }
    };
    match cli.cmd {
        Cmd::Run {
            kernel,
            initramfs,
            cmdline,
            cpus,
            memory,
            api_socket,
            serial,
            restore,
            incoming,
            standby,
            migration_token_file,
            max_incoming_memory,
            seccomp,
        } => {
            let mode = seccomp
                .or_else(|| std::env::var("VMM_SECCOMP").ok())
                .unwrap_or_else(|| "on".into())
                .parse::<vmm_reference::seccomp::Mode>()
                .and_then(vmm_reference::seccomp::set_mode);
            if let Err(e) = mode {
                return fail(e);
            }
            let incoming_opts =
                match incoming_options(migration_token_file.as_deref(), max_incoming_memory.as_deref()) {
                    Ok(o) => o,
                    Err(e) => return fail(e),
                };
            let start = match (restore, incoming) {
                _ if standby => match parse_serial(&serial) {
                    Ok(s) => Start::Standby(s, incoming_opts),
                    Err(e) => return fail(e),
                },
                (Some(dir), _) => match parse_serial(&serial) {
                    Ok(s) => Start::Restore(dir, s),
                    Err(e) => return fail(e),
                },
                (None, Some(addr)) => match (
                    vmm_reference::migration::Address::parse(&addr),
                    parse_serial(&serial),
                ) {
                    (Ok(a), Ok(s)) => match incoming_opts.check(&a) {
                        Ok(()) => Start::Incoming(a, s, incoming_opts),
                        Err(e) => return fail(format!("--incoming: {e}")),
                    },
                    (Err(e), _) => return fail(format!("--incoming: {e}")),
                    (_, Err(e)) => return fail(e),
                },
                (None, None) => match build_config(kernel, initramfs, cmdline, &cpus, &memory, &serial) {
                    Ok(c) => Start::Boot(Box::new(c)),
                    Err(e) => return fail(e),
                },
            };
            run(start, api_socket.as_deref())
        }
        Cmd::Ctl { api_socket, op } => ctl(&api_socket, op),
        Cmd::AcpiTables { cpus, out } => acpi_tables(&cpus, &out),
        Cmd::Demo => demo(),
    }
}

fn build_config(
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
    cmdline: Option<String>,
    cpus: &str,
    memory: &str,
    serial: &str,
) -> Result<VmConfig, VmmError> {
    Ok(VmConfig {
        kernel: kernel.map_or(KernelSource::Embedded, KernelSource::Path),
        initramfs,
        cmdline,
        cpus: parse_cpus(cpus)?,
        memory: parse_memory(memory)?,
        serial: parse_serial(serial)?,
    })
}

/// How `run` gets its VM.
enum Start {
    Boot(Box<VmConfig>),
    Restore(PathBuf, vmm_reference::config::SerialMode),
    Incoming(
        vmm_reference::migration::Address,
        vmm_reference::config::SerialMode,
        IncomingOptions,
    ),
    /// No VM until the API creates one (`vm.restore`, `vm.receive-migration`).
    Standby(vmm_reference::config::SerialMode, IncomingOptions),
}

/// `--migration-token-file` and `--max-incoming-memory`.
fn incoming_options(
    token_file: Option<&std::path::Path>,
    max_memory: Option<&str>,
) -> Result<IncomingOptions, String> {
    let mut o = IncomingOptions::new();
    if let Some(f) = token_file {
        let t = vmm_reference::migration::token_from_file(f)?;
        o.token = Some(vm_migration::auth::Token::new(t.into_bytes()).map_err(|e| e.to_string())?);
    }
    if let Some(m) = max_memory {
        o.max_memory = parse_memory(m).map_err(|e| format!("--max-incoming-memory: {e}"))?;
    }
    Ok(o)
}

/// SIGTERM and SIGINT end the VM like `vm.shutdown`: blocked in every thread (set before any
/// is spawned) and taken by one thread with sigwait, which is not limited to what a signal
/// handler may do. Before a VM exists (standby) the VMM just ends.
fn end_on_signals(api_socket: Option<std::path::PathBuf>) -> Arc<Mutex<Option<Arc<VmInner>>>> {
    let target: Arc<Mutex<Option<Arc<VmInner>>>> = Arc::default();
    // SAFETY: sigset_t is plain data initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the calls only modify it and this thread's mask.
    let blocked = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if blocked != 0 {
        log::warn!("cannot block SIGTERM/SIGINT; they end the VMM without a clean shutdown");
        return target;
    }
    let t = target.clone();
    let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
        vmm_reference::seccomp::apply_or_warn(vmm_reference::seccomp::ThreadKind::Device);
        loop {
            let mut sig = 0;
            // SAFETY: `set` lives in this closure; sigwait writes the signal number into `sig`.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            log::info!("signal {sig}: shutting down");
            match t.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                Some(vm) => vm.request_shutdown(),
                None => {
                    if let Some(p) = &api_socket {
                        let _ = std::fs::remove_file(p);
                    }
                    std::process::exit(0);
                }
            }
        }
    });
    if spawned.is_err() {
        log::warn!("no signal thread; SIGTERM/SIGINT stay blocked");
    }
    target
}

fn run(start: Start, api_socket: Option<&std::path::Path>) -> ExitCode {
    let on_signal = end_on_signals(api_socket.map(|p| p.to_path_buf()));
    // Bind the API socket first, so a bad path fails before the guest starts.
    // The socket's lock lives until the VMM ends: no second VMM can take the path over.
    let (mut listener, _api_lock) = match api_socket {
        Some(p) => match vmm_reference::sock::bind_listening(p) {
            Ok((l, lock)) => (Some(l), Some(lock)),
            Err(e) => return fail(format!("--api-socket {}: {e}", p.display())),
        },
        None => (None, None),
    };
    let spawn_api = |l: std::os::unix::net::UnixListener, target| {
        std::thread::Builder::new()
            .name("api-server".into())
            .spawn(move || vmm_reference::api::serve(l, target))
            .map(|_| ())
            .map_err(|e| format!("API server thread: {e}"))
    };
    let vm = match &start {
        Start::Boot(config) => Vm::start(config).map_err(|e| e.to_string()),
        Start::Restore(dir, serial) => {
            Vm::restore(dir, serial).map_err(|e| format!("restoring {}: {e}", dir.display()))
        }
        Start::Incoming(addr, serial, opts) => {
            // The API answers during the migration and shows the VM while it waits for the
            // source's Complete.
            let target = vmm_reference::api::ApiTarget::pending();
            if let Some(l) = listener.take() {
                if let Err(e) = spawn_api(l, target.clone()) {
                    return fail(e);
                }
            }
            vmm_reference::migration::receive(addr, serial, opts, &|vm| target.publish(vm))
                .map_err(|e| format!("incoming migration: {e}"))
        }
        Start::Standby(serial, opts) => {
            let Some(l) = listener.take() else {
                return fail("--standby needs --api-socket (the VM is created through the API)");
            };
            let (target, created) = vmm_reference::api::ApiTarget::standby(serial.clone(), opts.clone());
            if let Err(e) = spawn_api(l, target) {
                return fail(e);
            }
            created
                .recv()
                .map_err(|_| "the API server ended before a VM was created".to_string())
        }
    };
    let vm = match vm {
        Ok(vm) => vm,
        Err(e) => return fail(e),
    };
    *on_signal.lock().unwrap_or_else(|e| e.into_inner()) = Some(vm.control());
    if let Some(l) = listener {
        if let Err(e) = spawn_api(l, vmm_reference::api::ApiTarget::running(vm.control())) {
            return fail(e);
        }
    }
    // From here the main thread only waits, then tears the VM down.
    vmm_reference::seccomp::apply_or_warn(vmm_reference::seccomp::ThreadKind::Api);
    let outcome = vm.wait(None);
    vmm_reference::api::wait_idle(Duration::from_secs(5));
    if let Some(p) = api_socket {
        let _ = std::fs::remove_file(p);
    }
    vm.shutdown();
    match outcome {
        Some(VmOutcome::PowerOff) => {
            log::info!("guest powered off");
            ExitCode::SUCCESS
        }
        Some(VmOutcome::Migrated) => {
            log::info!("the VM was migrated away");
            ExitCode::SUCCESS
        }
        Some(VmOutcome::Shutdown) => {
            log::info!("shut down through the API");
            ExitCode::SUCCESS
        }
        Some(VmOutcome::GuestError(e)) => fail(format!("guest failed: {e}")),
        None => fail("VM event channel closed"),
    }
}

/// Put the token of `file` into a request body as `"token"`.
fn add_token(body: &mut serde_json::Value, file: Option<&std::path::Path>) -> Result<(), String> {
    if let Some(f) = file {
        body["token"] = vmm_reference::migration::token_from_file(f)?.into();
    }
    Ok(())
}

fn ctl(sock: &std::path::Path, op: CtlOp) -> ExitCode {
    let (method, endpoint, body) = match &op {
        CtlOp::Info { .. } => ("GET", "vm.info", None),
        CtlOp::Resize { n } => ("PUT", "vm.resize", Some(format!("{{\"desired_vcpus\":{n}}}"))),
        CtlOp::AddCpu { id } => ("PUT", "vm.add-cpu", id.map(|i| format!("{{\"id\":{i}}}"))),
        CtlOp::RemoveCpu { id } => ("PUT", "vm.remove-cpu", Some(format!("{{\"id\":{id}}}"))),
        CtlOp::CancelRemoval { id } => ("PUT", "vm.cancel-removal", Some(format!("{{\"id\":{id}}}"))),
        CtlOp::Pause => ("PUT", "vm.pause", None),
        CtlOp::Resume => ("PUT", "vm.resume", None),
        CtlOp::Shutdown => ("PUT", "vm.shutdown", None),
        CtlOp::Snapshot { dir } | CtlOp::Restore { dir } => {
            // The VMM resolves paths against its own working directory: send an absolute one.
            let url = match std::path::absolute(dir) {
                Ok(d) => format!("file://{}", d.display()),
                Err(e) => return fail(format!("{}: {e}", dir.display())),
            };
            let (endpoint, key) = match &op {
                CtlOp::Snapshot { .. } => ("vm.snapshot", "destination_url"),
                _ => ("vm.restore", "source_url"),
            };
            ("PUT", endpoint, Some(serde_json::json!({ key: url }).to_string()))
        }
        CtlOp::ReceiveMigration { receiver, token_file } => {
            let mut b = serde_json::json!({ "receiver_url": receiver });
            if let Err(e) = add_token(&mut b, token_file.as_deref()) {
                return fail(e);
            }
            ("PUT", "vm.receive-migration", Some(b.to_string()))
        }
        CtlOp::Migrate {
            destination,
            downtime_ms,
            max_rounds,
            timeout_ms,
            timeout_strategy,
            token_file,
        } => {
            let mut b = serde_json::json!({ "destination_url": destination, "downtime_ms": downtime_ms });
            for (k, v) in [
                ("max_rounds", max_rounds.map(serde_json::Value::from)),
                ("timeout_ms", timeout_ms.map(serde_json::Value::from)),
                (
                    "timeout_strategy",
                    timeout_strategy.clone().map(serde_json::Value::from),
                ),
            ] {
                if let Some(v) = v {
                    b[k] = v;
                }
            }
            if let Err(e) = add_token(&mut b, token_file.as_deref()) {
                return fail(e);
            }
            ("PUT", "vm.send-migration", Some(b.to_string()))
        }
        CtlOp::CancelMigration => ("PUT", "vm.cancel-migration", None),
    };
    let (status, body) = match vmm_reference::api::request(sock, method, endpoint, body.as_deref()) {
        Ok(r) => r,
        Err(e) => return fail(format!("--api-socket {}: {e}", sock.display())),
    };
    if status >= 300 {
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
            .unwrap_or(body);
        eprintln!("error: {endpoint}: HTTP {status}: {msg}");
        return ExitCode::from(if status == 429 { 75 } else { 1 });
    }
    match op {
        CtlOp::Info { json: false } => match serde_json::from_str::<serde_json::Value>(&body) {
            Ok(v) => print!("{}", info_table(&v)),
            Err(e) => return fail(format!("bad vm.info reply: {e}")),
        },
        _ if !body.is_empty() => println!("{body}"),
        _ => {}
    }
    ExitCode::SUCCESS
}

/// `vm.info` as a table for people.
fn info_table(v: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut out = format!(
        "max {}  present {}  paused {}  pending removals {}  refused ejects {}  parked fds {}  reused fds {}\n",
        s(&v["max_vcpus"]),
        s(&v["present_vcpus"]),
        s(&v["paused"]),
        s(&v["pending_removals"]),
        s(&v["refused_ejects"]),
        s(&v["parked_vcpu_fds"]),
        s(&v["reused_vcpu_fds"])
    );
    let m = &v["migration"];
    if !m.is_null() {
        out.push_str(&format!(
            "migration: {}  rounds {}  sent {} bytes  dirty rate {:.0} pages/s  expected downtime {:.1} ms{}\n",
            s(&m["phase"]),
            s(&m["rounds"]),
            s(&m["bytes_sent"]),
            m["dirty_rate"].as_f64().unwrap_or(0.0),
            m["expected_downtime_ms"].as_f64().unwrap_or(0.0),
            m["error"].as_str().map(|e| format!("  error: {e}")).unwrap_or_default()
        ));
    }
    out.push_str(&format!(
        "{:>4} {:>7} {:>7} {:>8} {:>13} {:>6} {:>6} {:>9} {:>8}\n",
        "cpu", "apic_id", "present", "vcpu", "mp_state", "apic", "apicSW", "pending", "ost"
    ));
    for c in v["cpus"].as_array().into_iter().flatten() {
        let pending = match (
            c["inserting"].as_bool(),
            c["removing"].as_bool(),
            c["remove_requested"].as_bool(),
        ) {
            (Some(true), _, _) => "insert",
            (_, Some(true), _) => "remove",
            (_, _, Some(true)) => "eject",
            _ => "-",
        };
        out.push_str(&format!(
            "{:>4} {:>7} {:>7} {:>8} {:>13} {:>6} {:>6} {:>9} {:>8}\n",
            s(&c["id"]),
            s(&c["apic_id"]),
            s(&c["present"]),
            s(&c["vcpu"]),
            s(&c["mp_state"]),
            s(&c["apic_mode"]),
            s(&c["apic_sw_enabled"]),
            pending,
            format!(
                "{:#x}/{:#x}",
                c["ost_event"].as_u64().unwrap_or(0),
                c["ost_status"].as_u64().unwrap_or(0)
            )
        ));
    }
    out
}

fn acpi_tables(cpus: &str, out: &std::path::Path) -> ExitCode {
    let cpus = match parse_cpus(cpus) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let cfg = AcpiConfig {
        topology: vcpu_manager::Topology::new(cpus.max),
        boot_cpus: cpus.boot,
        hotplug: acpi_cpu_hotplug::HotplugLayout::default(),
    };
    let tables = match acpi::build(&cfg) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    if let Err(e) = std::fs::create_dir_all(out) {
        return fail(format!("--out {}: {e}", out.display()));
    }
    for t in tables {
        let path = out.join(format!("{}.dat", t.name));
        if let Err(e) = std::fs::write(&path, &t.bytes) {
            return fail(format!("writing {}: {e}", path.display()));
        }
        println!(
            "{} {:#07x} {:>6} bytes  {}",
            t.name,
            t.addr,
            t.bytes.len(),
            path.display()
        );
    }
    ExitCode::SUCCESS
}

fn demo() -> ExitCode {
    match demo_inner() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("demo: {e}")),
    }
}

type DemoResult<T> = Result<T, Box<dyn std::error::Error>>;

/// One VMM process of the demo: its console and API socket.
struct DemoVmm {
    name: &'static str,
    child: std::process::Child,
    con: Option<GuestConsole>,
    con_path: PathBuf,
    api: PathBuf,
}

const DEMO_T: Duration = Duration::from_secs(30);

impl DemoVmm {
    fn spawn(name: &'static str, dir: &std::path::Path, args: &[&str]) -> DemoResult<DemoVmm> {
        let (con_path, api) = (
            dir.join(format!("{name}-con.sock")),
            dir.join(format!("{name}-api.sock")),
        );
        let child = Command::new(std::env::current_exe()?)
            .arg("run")
            .args(args)
            .arg("--serial")
            .arg(format!("socket={}", con_path.display()))
            .arg("--api-socket")
            .arg(&api)
            .stdin(Stdio::null())
            .spawn()?;
        Ok(DemoVmm {
            name,
            child,
            con: None,
            con_path,
            api,
        })
    }

    fn con(&mut self) -> DemoResult<&mut GuestConsole> {
        if self.con.is_none() {
            self.con = Some(GuestConsole::connect(&self.con_path, DEMO_T)?);
        }
        self.con.as_mut().ok_or_else(|| "no console".into())
    }

    fn api(&self, method: &str, ep: &str, body: Option<&str>) -> DemoResult<String> {
        let (status, body) = vmm_reference::api::request(&self.api, method, ep, body)?;
        if status >= 300 {
            return Err(format!("{ep}: HTTP {status} {body}").into());
        }
        Ok(body)
    }

    /// Wait for the VMM's side of an eject (thread joined, fd parked): the guest reports the
    /// removal before the eject worker is done, and an add-cpu meanwhile is answered 429.
    fn parked(&self, id: usize) -> DemoResult<()> {
        let deadline = Instant::now() + DEMO_T;
        while Instant::now() < deadline {
            let info: serde_json::Value = serde_json::from_str(&self.api("GET", "vm.info", None)?)?;
            let idle = info["pending_removals"].as_array().is_some_and(|a| a.is_empty());
            if idle && info["cpus"][id]["vcpu"] == "parked" {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(format!("CPU {id} was not parked within {DEMO_T:?}").into())
    }

    fn guest(&mut self, cmd: &str) -> DemoResult<String> {
        let reply = self.con()?.command(cmd, DEMO_T)?;
        let line = reply.last().cloned().unwrap_or_default();
        println!("{} guest> {cmd}: {line}", self.name);
        Ok(line)
    }

    fn event(&mut self, prefix: &str) -> DemoResult<()> {
        let l = self.con()?.wait_for(prefix, DEMO_T)?;
        println!("{} guest: {l}", self.name);
        Ok(())
    }

    fn show(&mut self, what: &str) -> DemoResult<()> {
        let s = self.con()?.status(DEMO_T)?;
        println!("== [{}] {what}\n-- guest `status`:\n{}", self.name, s.table());
        let v: serde_json::Value = serde_json::from_str(&self.api("GET", "vm.info", None)?)?;
        println!("-- VMM `vm.info`:\n{}", info_table(&v));
        Ok(())
    }
}

fn demo_inner() -> DemoResult<()> {
    let dir = std::env::temp_dir().join(format!("vmm-reference-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut vmms: Vec<DemoVmm> = Vec::new();
    let result = demo_steps(&dir, &mut vmms);
    for mut v in vmms {
        let status = wait_child(&mut v.child, Duration::from_secs(10))?;
        if result.is_ok() && !status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("the {} VMM exited with {status}", v.name).into());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn demo_steps(dir: &std::path::Path, vmms: &mut Vec<DemoVmm>) -> DemoResult<()> {
    println!("== booting the built-in test guest: --cpus boot=1,max=8 --memory 256M");
    let start = Instant::now();
    vmms.push(DemoVmm::spawn(
        "first",
        dir,
        &["--cpus", "boot=1,max=8", "--memory", "256M"],
    )?);
    let vm = &mut vmms[0];
    let ready = vm.con()?.wait_for("READY", DEMO_T)?;
    println!(
        "guest: {ready}   ({} ms after process start)",
        start.elapsed().as_millis()
    );
    vm.show("after boot: 1 of 8 CPUs online")?;
    println!("== PUT /api/v1/vm.resize {{\"desired_vcpus\":4}}: hot-add CPUs 1-3 (GPE 2 -> SCI -> guest scan -> INIT/SIPI)");
    vm.api("PUT", "vm.resize", Some(r#"{"desired_vcpus":4}"#))?;
    for _ in 0..3 {
        vm.event("EVENT insert")?;
    }
    vm.guest("offline 3")?;
    std::thread::sleep(Duration::from_millis(100));
    vm.show("CPU 3 offlined by the guest: KVM reports it HALTED with its APIC SW-disabled")?;
    println!("== PUT /api/v1/vm.remove-cpu {{\"id\":2}}: the guest offlines and ejects it, the VMM parks the vCPU fd");
    vm.api("PUT", "vm.remove-cpu", Some(r#"{"id":2}"#))?;
    vm.event("EVENT remove")?;
    vm.parked(2)?;
    println!("== PUT /api/v1/vm.add-cpu {{\"id\":2}}: CPU 2 comes back on its parked fd");
    vm.api("PUT", "vm.add-cpu", Some(r#"{"id":2}"#))?;
    vm.event("EVENT insert")?;
    println!("== a partially offline CPU set: CPU 3 stays offline, CPU 4 is hot-added but never onlined");
    vm.guest("autoonline off")?;
    vm.api("PUT", "vm.add-cpu", Some(r#"{"id":4}"#))?;
    vm.event("EVENT insert")?;
    vm.guest("dirty start 2048")?;
    std::thread::sleep(Duration::from_millis(300));
    vm.show("before the snapshot (the guest rewrites 8 MiB of pages on every tick)")?;

    let snap = dir.join("snapshot");
    println!("== PUT /api/v1/vm.snapshot -> {}", snap.display());
    let body = serde_json::json!({ "destination_url": format!("file://{}", snap.display()) }).to_string();
    let t = Instant::now();
    println!(
        "vmm: {}   ({} ms)",
        vm.api("PUT", "vm.snapshot", Some(&body))?,
        t.elapsed().as_millis()
    );
    vm.guest("poweroff")?;
    println!(
        "== vmm-reference run --restore {} (a new process; RAM mapped copy-on-write)",
        snap.display()
    );
    let t = Instant::now();
    vmms.push(DemoVmm::spawn(
        "restored",
        dir,
        &["--restore", snap.to_str().unwrap_or_default()],
    )?);
    let vm = &mut vmms[1];
    vm.guest("resetgaps")?;
    println!(
        "(process start -> first guest reply after restore: {} ms)",
        t.elapsed().as_millis()
    );
    vm.guest("dirty check")?;
    vm.show("restored: CPU 3 still offline (HALTED, APIC SW-disabled), CPU 4 still UNINITIALIZED")?;

    let mig = dir.join("migration.sock");
    let incoming = format!("unix:{}", mig.display());
    println!("== vmm-reference run --incoming {incoming}; PUT /api/v1/vm.send-migration");
    vmms.push(DemoVmm::spawn("migrated", dir, &["--incoming", &incoming])?);
    let deadline = Instant::now() + DEMO_T;
    while !mig.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let body = serde_json::json!({ "destination_url": incoming, "downtime_ms": 20 }).to_string();
    let report: serde_json::Value =
        serde_json::from_str(&vmms[1].api("PUT", "vm.send-migration", Some(&body))?)?;
    for r in report["rounds"].as_array().into_iter().flatten() {
        println!(
            "round {}: {:>10} bytes in {:.3} s, {} pages dirtied meanwhile, expected downtime {:.2} ms",
            r["round"],
            r["bytes"],
            r["secs"].as_f64().unwrap_or(0.0),
            r["dirtied_pages"],
            r["expected_downtime_ms"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "migrated: downtime {:.1} ms, total {:.1} ms, state {} bytes; the source VMM exits",
        report["downtime_ms"].as_f64().unwrap_or(0.0),
        report["total_ms"].as_f64().unwrap_or(0.0),
        report["state_bytes"]
    );
    let vm = &mut vmms[2];
    vm.guest("dirty check")?;
    vm.show("after live migration: the same CPU set, nothing lost")?;
    println!("== the offline CPUs come online on the destination");
    vm.guest("online 3")?;
    vm.guest("online 4")?;
    std::thread::sleep(Duration::from_millis(300));
    vm.show("every present CPU online and ticking")?;
    println!("== guest `poweroff` (ACPI S5 through PM1a_CNT)");
    vm.guest("poweroff")?;
    Ok(())
}

fn wait_child(
    child: &mut std::process::Child,
    timeout: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if start.elapsed() > timeout {
            child.kill()?;
            return child.wait();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
