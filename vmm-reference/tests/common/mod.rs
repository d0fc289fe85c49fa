// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod linux_agent;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_reference::console::{GuestConsole, GuestStatus};

/// Whether `/dev/kvm` can be opened and a VM created. When it cannot, the test is skipped with
/// a printed reason, except under `VMM_REQUIRE_KVM=1` (set by ci/test.sh when /dev/kvm is
/// usable), where a skip would hide a failure and so panics instead. Every KVM test that runs
/// is recorded in `$KVM_TEST_LEDGER`, which ci/test.sh counts.
pub fn kvm_or_skip(test: &str) -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
        && kvm_ioctls::Kvm::new().and_then(|k| k.create_vm()).is_ok();
    if usable {
        if let Some(path) = std::env::var_os("KVM_TEST_LEDGER") {
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
                // One write(2) per line: with O_APPEND it cannot interleave with another test
                // thread's (writeln! issues the name and the newline as separate writes).
                let _ = f.write_all(format!("{test}\n").as_bytes());
            }
        }
        return true;
    }
    if std::env::var("VMM_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("{test}: VMM_REQUIRE_KVM=1 but /dev/kvm is not usable");
    }
    eprintln!("SKIP {test}: /dev/kvm is not usable on this machine");
    false
}

/// A fresh temporary directory for one test.
pub fn temp_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmmref-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// The VMM binary built by Cargo for these tests.
pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmm-reference")
}

/// Spawn `vmm-reference run <args>` with stdout/stderr captured.
pub fn spawn_vmm(args: &[&str]) -> Child {
    Command::new(vmm_bin())
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm-reference")
}

/// Wait for a child with a deadline; kill it when the deadline passes.
pub fn wait_child(child: &mut Child, timeout: Duration) -> std::process::Output {
    let start = Instant::now();
    while child.try_wait().expect("try_wait").is_none() {
        if start.elapsed() > timeout {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut out = Vec::new();
    let mut err = Vec::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = std::io::Read::read_to_end(&mut s, &mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = std::io::Read::read_to_end(&mut s, &mut err);
    }
    let status = child.wait().expect("wait");
    std::process::Output {
        status,
        stdout: out,
        stderr: err,
    }
}

/// Whether something listens on TCP `port` (from /proc/net/tcp: local address, state 0A).
pub fn tcp_listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
        })
    })
}

/// The pre-shared token the TCP destinations of the tests demand.
pub const TOKEN: &str = "test-token-0123456789";

/// A free TCP port on 127.0.0.1 and a VMM waiting there for an incoming migration whose
/// source proves it holds [`TOKEN`].
pub fn incoming_tcp(dir: &Path) -> (String, Unattached) {
    incoming_tcp_with(dir, &[])
}

/// [`incoming_tcp`] with more `run` arguments.
pub fn incoming_tcp_with(dir: &Path, extra: &[&str]) -> (String, Unattached) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let incoming = format!("tcp:127.0.0.1:{port}");
    let token = dir.join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).expect("token file");
    let token = token.display().to_string();
    let mut args = vec!["--incoming", &incoming, "--migration-token-file", &token];
    args.extend_from_slice(extra);
    let dst = Vmm::spawn_unattached(dir, "dst", &args);
    let deadline = Instant::now() + T;
    // (Not by connecting: an unauthenticated connection counts as a failed peer.)
    while !tcp_listening(port) {
        assert!(
            Instant::now() < deadline,
            "the destination never listened on {incoming}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    (incoming, dst)
}

pub fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Entries in `dir` once transient ones are gone: the API serves each request on a thread of
/// its own with its own socket fd, which may outlive the answer by a moment on a loaded host.
/// The lowest of 10 samples over half a second.
pub fn settled(dir: &str) -> usize {
    (0..10)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(50));
            count(dir)
        })
        .min()
        .unwrap_or(0)
}

/// Per-CPU fields of `vm.info` that a snapshot or a migration must carry exactly.
pub const KEPT: [&str; 10] = [
    "present",
    "apic_id",
    "vcpu",
    "apic_mode",
    "apic_sw_enabled",
    "inserting",
    "removing",
    "remove_requested",
    "ost_event",
    "ost_status",
];

/// Bound of a `status` reply (see [`Vmm::status`]).
pub const STATUS_T: Duration = Duration::from_secs(180);

/// Default timeout of the end-to-end helpers.
pub const T: Duration = Duration::from_secs(30);

/// A VMM process whose console is not connected yet.
pub struct Unattached {
    pub child: Option<Child>,
    pub api: PathBuf,
    sock: PathBuf,
    dir: PathBuf,
}

impl Unattached {
    /// Connect the console (retrying until the VMM creates it).
    pub fn attach(mut self) -> Vmm {
        let con = GuestConsole::connect(&self.sock, T).expect("console");
        Vmm {
            child: self.child.take(),
            con,
            api: self.api.clone(),
            dir: self.dir.clone(),
        }
    }
}

/// A test that fails before attaching must not leave a VMM running (with a migrated guest
/// spinning in it) for the rest of the run.
impl Drop for Unattached {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            reap(c, &self.api);
        }
    }
}

/// Kill a VMM; in a failing test, print the end of what it wrote to stderr first (its own
/// account of the failure, which would otherwise be lost with the pipe).
fn reap(child: &mut Child, api: &Path) {
    // Whether it had already ended on its own, and how: SIGSYS (31) is a seccomp kill,
    // SIGKILL (9) the OOM killer.
    let ended = child.try_wait().ok().flatten();
    let _ = child.kill();
    let _ = child.wait();
    if !std::thread::panicking() {
        return;
    }
    match ended {
        Some(status) => eprintln!("--- the VMM with API {} had ended: {status}", api.display()),
        None => eprintln!("--- the VMM with API {} was still running", api.display()),
    }
    let mut err = String::new();
    if let Some(e) = child.stderr.as_mut() {
        let _ = std::io::Read::read_to_string(e, &mut err);
    }
    let lines: Vec<&str> = err.lines().collect();
    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
    eprintln!(
        "--- stderr of the VMM with API {} (last 40 lines) ---\n{tail}",
        api.display()
    );
}

/// A running VMM process driven through its API socket and guest console.
pub struct Vmm {
    pub child: Option<Child>,
    pub con: GuestConsole,
    pub api: PathBuf,
    /// The folder it was spawned in (its sockets; a restored VMM's snapshot).
    pub dir: PathBuf,
}

impl Vmm {
    /// Boot the test guest with `cpus` and 128 MiB; returns once the guest is READY.
    pub fn start(test: &str, cpus: &str) -> Vmm {
        let mut vm = Vmm::spawn(&temp_dir(test), "vm", &["--cpus", cpus, "--memory", "128M"]);
        vm.con.wait_for("READY", T).expect("READY");
        vm
    }

    /// Start `vmm-reference run <args>` with an API socket and a socket console named after
    /// `name` in `dir`, and connect the console (no READY wait: a restored guest is past it).
    pub fn spawn(dir: &Path, name: &str, args: &[&str]) -> Vmm {
        Vmm::spawn_unattached(dir, name, args).attach()
    }

    /// Like [`Vmm::spawn`] without connecting the console yet (a migration destination has
    /// none until the VM arrives).
    pub fn spawn_unattached(dir: &Path, name: &str, args: &[&str]) -> Unattached {
        let (api, sock) = (
            dir.join(format!("{name}-api.sock")),
            dir.join(format!("{name}-con.sock")),
        );
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend([
            "--api-socket".into(),
            api.display().to_string(),
            "--serial".into(),
            format!("socket={}", sock.display()),
        ]);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        Unattached {
            child: Some(spawn_vmm(&refs)),
            api,
            sock,
            dir: dir.to_path_buf(),
        }
    }

    pub fn api(&self, method: &str, ep: &str, body: Option<&str>) -> (u16, Value) {
        let (status, body) = vmm_reference::api::request(&self.api, method, ep, body).expect("API request");
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    /// `vm.info` once every running vCPU's thread has answered: under heavy load one may not
    /// within its 5 s and shows as `unresponsive`, with KVM's fields null, so ask again.
    pub fn info(&self) -> Value {
        let deadline = Instant::now() + T;
        loop {
            let (s, v) = self.api("GET", "vm.info", None);
            assert_eq!(s, 200, "{v}");
            let cpus = v["cpus"].as_array();
            if cpus.is_none_or(|c| c.iter().all(|c| c["vcpu"] != "unresponsive")) {
                return v;
            }
            assert!(Instant::now() < deadline, "a vCPU thread never answered: {v}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn guest(&mut self, cmd: &str) -> Vec<String> {
        self.con
            .command(cmd, T)
            .unwrap_or_else(|e| panic!("{cmd}: {e}; transcript {:?}", self.con.transcript))
    }

    /// The guest's `status`: one line per possible CPU through the emulated UART, an exit per
    /// byte. With 300 possible CPUs in a nested L1 under load that took over 30 s (CI, 6.1 and
    /// 6.12), so the bound is `STATUS_T`.
    pub fn status(&mut self) -> GuestStatus {
        self.con.status(STATUS_T).expect("status")
    }

    pub fn event(&mut self, prefix: &str) -> String {
        self.con
            .wait_for(prefix, T)
            .unwrap_or_else(|e| panic!("waiting for {prefix}: {e}"))
    }

    /// Poll vm.info until `pred` holds.
    pub fn until(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.until_within(what, T, pred)
    }

    /// Poll vm.info until `pred` holds, for at most `bound` (a Linux guest's work takes
    /// longer than the test guest's under nested KVM).
    pub fn until_within(&self, what: &str, bound: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + bound;
        loop {
            let v = self.info();
            if pred(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {v}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn poweroff(self) {
        let mut vm = self;
        vm.guest("poweroff");
        vm.exits_cleanly();
    }

    /// The VMM ends by itself (guest power-off, migrated away) with exit code 0.
    pub fn exits_cleanly(mut self) {
        let out = wait_child(self.child.as_mut().unwrap(), T);
        self.child = None;
        assert!(
            out.status.success(),
            "VMM exit: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Every CPU in `cpus` takes timer ticks over the next 200 ms.
    pub fn assert_ticking(&mut self, cpus: &[usize]) {
        let a = self.status();
        std::thread::sleep(Duration::from_millis(200));
        let b = self.status();
        for &c in cpus {
            assert!(b.cpus[c].ticks > a.cpus[c].ticks, "CPU {c} is not ticking");
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            reap(c, &self.api);
        }
    }
}
