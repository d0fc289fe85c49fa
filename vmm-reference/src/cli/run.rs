// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vmm-reference run`: boot, restore, receive or stand by; serve the API; end on power-off,
//! shutdown, migration or a signal.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a signal lets a snapshot, or a migration past the destination's Ack, finish
/// before the VM ends (under systemd's default 90 s stop timeout).
const SIGNAL_GRACE: Duration = Duration::from_secs(60);

use clap::Args;
use vmm_reference::config::{
    parse_cpus, parse_memory, parse_memory_option, parse_path_option, parse_restore_option, parse_serial,
    KernelSource, VmConfig,
};
use vmm_reference::error::VmmError;
use vmm_reference::migration::IncomingOptions;
use vmm_reference::vm::{Vm, VmInner, VmOutcome};

use super::fail;

/// `vmm-reference run`'s arguments.
#[derive(Args)]
pub struct RunArgs {
    /// Kernel: Linux bzImage or ELF (vmlinux, test-guest). Default: the built-in test guest.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs for a Linux kernel.
    #[arg(long)]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// vCPUs: boot=N,max=M.
    #[arg(long, default_value = "boot=1,max=1")]
    pub cpus: String,
    /// Guest memory: 256M, 1G, or Cloud Hypervisor's size=256M.
    #[arg(long, default_value = "256M")]
    pub memory: String,
    /// REST API socket (Unix stream socket, JSON; see `vmm-reference ctl`): PATH or
    /// path=PATH.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<String>,
    /// Serial console: tty (or stdout) | null | off | file=PATH | socket=PATH.
    #[arg(long, default_value = "tty")]
    pub serial: String,
    /// Restore the VM saved in DIR (by `ctl snapshot`) instead of booting one: DIR,
    /// file:///DIR, or source_url=file:///DIR.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initramfs", "cmdline", "cpus", "memory", "incoming"])]
    pub restore: Option<String>,
    /// More log output: -v info, -vv debug, -vvv trace (default: warnings; RUST_LOG wins).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Write the log to FILE (appended) instead of stderr.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Wait for a live migration on unix:PATH or tcp:HOST:PORT and run the VM it brings.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["kernel", "initramfs", "cmdline", "cpus", "memory"])]
    pub incoming: Option<String>,
    /// Start without a VM; `PUT vm.restore` or `vm.receive-migration` on --api-socket
    /// creates it.
    #[arg(long, conflicts_with_all = ["kernel", "initramfs", "cmdline", "cpus", "memory", "restore", "incoming"])]
    pub standby: bool,
    /// File holding the pre-shared token a migration source must prove it has (required
    /// to receive on tcp:; 16 to 4096 bytes, a trailing newline is dropped).
    #[arg(long, value_name = "FILE")]
    pub migration_token_file: Option<PathBuf>,
    /// Most guest RAM an incoming migration may bring, e.g. 4G (default: this host's RAM).
    #[arg(long, value_name = "SIZE")]
    pub max_incoming_memory: Option<String>,
    /// Per-thread seccomp filters: on (a call off the list fails with EPERM), kill (it
    /// kills the VMM; for testing the lists), off. Default: $VMM_SECCOMP, else on.
    #[arg(long, value_name = "on|kill|log|off")]
    pub seccomp: Option<String>,
}

/// `vmm-reference run`: choose how the VM starts from the arguments, then [`run`] it.
pub fn run_command(a: RunArgs) -> ExitCode {
    let mode = a
        .seccomp
        .clone()
        .or_else(|| std::env::var("VMM_SECCOMP").ok())
        .unwrap_or_else(|| "on".into())
        .parse::<vmm_reference::seccomp::Mode>()
        .and_then(vmm_reference::seccomp::set_mode);
    if let Err(e) = mode {
        return fail(e);
    }
    let api_socket = match a
        .api_socket
        .as_deref()
        .map(|s| parse_path_option("--api-socket", "path", s))
    {
        Some(Err(e)) => return fail(e),
        Some(Ok(p)) => Some(p),
        None => None,
    };
    if let Err(e) = init_log(a.verbose, a.log_file.as_deref()) {
        return fail(e);
    }
    match start_of(a) {
        Ok(start) => run(start, api_socket.as_deref()),
        Err(e) => fail(e),
    }
}

/// How the arguments say the VM starts.
fn start_of(a: RunArgs) -> Result<Start, String> {
    let incoming_opts = incoming_options(
        a.migration_token_file.as_deref(),
        a.max_incoming_memory.as_deref(),
    )?;
    let serial = || parse_serial(&a.serial).map_err(|e| e.to_string());
    Ok(match (&a.restore, &a.incoming) {
        _ if a.standby => Start::Standby(serial()?, incoming_opts),
        (Some(dir), _) => Start::Restore(parse_restore_option(dir)?, serial()?),
        (None, Some(addr)) => {
            let addr =
                vmm_reference::migration::Address::parse(addr).map_err(|e| format!("--incoming: {e}"))?;
            let serial = serial()?;
            incoming_opts
                .check(&addr)
                .map_err(|e| format!("--incoming: {e}"))?;
            Start::Incoming(addr, serial, incoming_opts)
        }
        (None, None) => Start::Boot(Box::new(
            build_config(a.kernel, a.initramfs, a.cmdline, &a.cpus, &a.memory, &a.serial)
                .map_err(|e| e.to_string())?,
        )),
    })
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
        memory: parse_memory_option(memory)?,
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

/// The log: `RUST_LOG` if set, else warnings and `-v`'s levels; to `--log-file` if given.
fn init_log(verbose: u8, file: Option<&std::path::Path>) -> Result<(), String> {
    let level = ["warn", "info", "debug", "trace"][usize::from(verbose.min(3))];
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level));
    if let Some(f) = file {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(f)
            .map_err(|e| format!("--log-file {}: {e}", f.display()))?;
        b.target(env_logger::Target::Pipe(Box::new(out)));
    }
    b.try_init().map_err(|e| format!("setting up the log: {e}"))
}

/// `--migration-token-file` and `--max-incoming-memory`.
fn incoming_options(
    token_file: Option<&std::path::Path>,
    max_memory: Option<&str>,
) -> Result<IncomingOptions, String> {
    let mut o = IncomingOptions::new();
    if let Some(f) = token_file {
        let t = vmm_reference::migration::token_from_file(f)?;
        o.token = Some(vm_live_migration::auth::Token::new(t.into_bytes()).map_err(|e| e.to_string())?);
    }
    if let Some(m) = max_memory {
        o.max_memory = parse_memory(m).map_err(|e| format!("--max-incoming-memory: {e}"))?;
    }
    Ok(o)
}

/// SIGTERM and SIGINT end the VM like `vm.shutdown`: blocked in every thread (set before any
/// is spawned) and taken by one thread with sigwait, which is not limited to what a signal
/// handler may do. A migration before its Ack is cancelled first, and a snapshot or a
/// committed migration finishes first ([`VmInner::end_on_signal`]). Before a VM exists
/// (standby) the VMM just ends.
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
            let vm = t.lock().unwrap_or_else(|e| e.into_inner()).clone();
            match vm {
                Some(vm) => vm.end_on_signal(SIGNAL_GRACE),
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
    let (mut listener, api_lock) = match api_socket {
        Some(p) => match vmm_reference::sock::bind_listening(p) {
            Ok((l, lock)) => (Some(l), Some(lock)),
            Err(e) => return fail(format!("--api-socket {}: {e}", p.display())),
        },
        None => (None, None),
    };
    let vm = match obtain_vm(&start, &mut listener) {
        Ok(vm) => vm,
        Err(e) => return fail(e),
    };
    *on_signal.lock().unwrap_or_else(|e| e.into_inner()) = Some(vm.control());
    log::info!(
        "vmm-reference {}: the VM runs (pid {})",
        env!("CARGO_PKG_VERSION"),
        std::process::id()
    );
    if let Some(l) = listener {
        if let Err(e) = spawn_api(l, vmm_reference::api::ApiTarget::running(vm.control())) {
            return fail(e);
        }
    }
    // From here the main thread only waits, then tears the VM down.
    vmm_reference::seccomp::apply_or_warn(vmm_reference::seccomp::ThreadKind::Api);
    let outcome = vm.wait(None);
    vmm_reference::api::wait_idle(Duration::from_secs(5));
    // Removes the socket (if the path is still ours) and its lock.
    drop(api_lock);
    vm.shutdown();
    exit_code(outcome)
}

fn spawn_api(
    l: std::os::unix::net::UnixListener,
    target: Arc<vmm_reference::api::ApiTarget>,
) -> Result<(), String> {
    std::thread::Builder::new()
        .name("api-server".into())
        .spawn(move || vmm_reference::api::serve(l, target))
        .map(|_| ())
        .map_err(|e| format!("API server thread: {e}"))
}

/// The VM `start` says, built, restored or received. An incoming or standby VMM serves the
/// API on `listener` meanwhile (and takes it); a booted or restored one serves it afterwards.
fn obtain_vm(start: &Start, listener: &mut Option<std::os::unix::net::UnixListener>) -> Result<Vm, String> {
    match start {
        Start::Boot(config) => Vm::start(config).map_err(|e| e.to_string()),
        Start::Restore(dir, serial) => {
            Vm::restore(dir, serial).map_err(|e| format!("restoring {}: {e}", dir.display()))
        }
        Start::Incoming(addr, serial, opts) => {
            // The API answers during the migration and shows the VM while it waits for the
            // source's Complete.
            let target = vmm_reference::api::ApiTarget::pending();
            if let Some(l) = listener.take() {
                spawn_api(l, target.clone())?;
            }
            vmm_reference::migration::receive(addr, serial, opts, &|vm| target.publish(vm))
                .map_err(|e| format!("incoming migration: {e}"))
        }
        Start::Standby(serial, opts) => {
            let Some(l) = listener.take() else {
                return Err("--standby needs --api-socket (the VM is created through the API)".into());
            };
            let (target, created) = vmm_reference::api::ApiTarget::standby(serial.clone(), opts.clone());
            spawn_api(l, target)?;
            created
                .recv()
                .map_err(|_| "the API server ended before a VM was created".to_string())
        }
    }
}

/// The process's exit status for how the VM ended.
fn exit_code(outcome: Option<VmOutcome>) -> ExitCode {
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
