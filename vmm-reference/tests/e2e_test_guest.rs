// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! End-to-end tests: the VMM boots the built-in test guest on the real /dev/kvm.

mod common;

use std::time::{Duration, Instant};

use common::*;
use vmm_reference::config::{CpuConfig, KernelSource, SerialMode, VmConfig};
use vmm_reference::console::GuestConsole;
use vmm_reference::vm::{Vm, VmOutcome};

const KVM_MP_STATE_HALTED: u32 = 3;

/// The built-in test guest with `boot` of `max` CPUs, 128 MiB, console on `sock`.
fn test_guest_config(boot: u32, max: u32, sock: &std::path::Path) -> VmConfig {
    VmConfig {
        kernel: KernelSource::Embedded,
        initramfs: None,
        cmdline: None,
        cpus: CpuConfig { boot, max },
        memory: 128 << 20,
        serial: SerialMode::Socket(sock.to_path_buf()),
    }
}

#[test]
fn boot_two_of_eight_reports_status_ticks_and_powers_off() {
    if !kvm_or_skip("boot_two_of_eight_reports_status_ticks_and_powers_off") {
        return;
    }
    let dir = temp_dir("boot28");
    let sock = dir.join("console.sock");
    let mut child = spawn_vmm(&[
        "--cpus",
        "boot=2,max=8",
        "--memory",
        "256M",
        "--serial",
        &format!("socket={}", sock.display()),
    ]);
    let mut con = GuestConsole::connect(&sock, T).expect("console");
    let ready = con.wait_for("READY", T).expect("READY");
    assert!(ready.contains("possible=8 present=2 online=2"), "{ready}");

    let s1 = con.status(STATUS_T).expect("status");
    assert_eq!((s1.possible, s1.present, s1.online), (8, 2, 2));
    assert_eq!(s1.cpus.len(), 8);
    assert!(s1.cpus[..2].iter().all(|c| c.state == "online"), "{s1:?}");
    assert!(s1.cpus[2..].iter().all(|c| c.state == "absent"), "{s1:?}");
    assert_eq!(
        s1.cpus.iter().map(|c| c.apic_id).collect::<Vec<_>>(),
        (0..8).collect::<Vec<_>>()
    );

    std::thread::sleep(Duration::from_millis(300));
    let s2 = con.status(STATUS_T).expect("status");
    for i in 0..2 {
        assert!(
            s2.cpus[i].ticks > s1.cpus[i].ticks,
            "CPU {i} timer not ticking: {s1:?} -> {s2:?}"
        );
    }
    let reply = con.command("poweroff", T).expect("poweroff");
    assert_eq!(reply.last().map(String::as_str), Some("OK poweroff"));
    let out = wait_child(&mut child, T);
    assert!(
        out.status.success(),
        "VMM exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn offline_and_online_cpu1_like_linux() {
    if !kvm_or_skip("offline_and_online_cpu1_like_linux") {
        return;
    }
    let dir = temp_dir("offon");
    let sock = dir.join("console.sock");
    let vm = Vm::start(&test_guest_config(2, 4, &sock)).expect("VM starts");
    let mut con = GuestConsole::connect(&sock, T).expect("console");
    con.wait_for("READY", T).expect("READY");
    assert!(
        answered(|| vm.lapic(1)).sw_enabled(),
        "online CPU has a SW-enabled APIC"
    );

    assert_eq!(con.command("offline 1", T).expect("offline"), vec!["OK"]);
    // KVM's view: the offlined CPU is halted (cli; hlt) with a SW-disabled APIC.
    let deadline = Instant::now() + T;
    while vm.mp_state(1) != Some(KVM_MP_STATE_HALTED) {
        assert!(
            Instant::now() < deadline,
            "vCPU 1 mp_state {:?}, expected HALTED",
            vm.mp_state(1)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let lapic = answered(|| vm.lapic(1));
    assert!(!lapic.sw_enabled(), "SPIV bit 8 must be clear on an offlined CPU");
    assert!(lapic.lvt(lapic_state::regs::LVT_TIMER).masked());
    let s1 = con.status(STATUS_T).expect("status");
    assert_eq!(s1.cpus[1].state, "offline");
    assert_eq!(s1.online, 1);
    std::thread::sleep(Duration::from_millis(200));
    let s2 = con.status(STATUS_T).expect("status");
    assert_eq!(s2.cpus[1].ticks, s1.cpus[1].ticks, "an offline CPU must not tick");
    assert!(s2.cpus[0].ticks > s1.cpus[0].ticks);

    // INIT/SIPI again brings it back with its timer running.
    assert_eq!(con.command("online 1", T).expect("online"), vec!["OK"]);
    std::thread::sleep(Duration::from_millis(200));
    let s3 = con.status(STATUS_T).expect("status");
    assert_eq!(s3.cpus[1].state, "online");
    assert_eq!(s3.online, 2);
    assert!(
        s3.cpus[1].ticks > s2.cpus[1].ticks,
        "CPU 1 not ticking after online: {s2:?} -> {s3:?}"
    );
    assert!(answered(|| vm.lapic(1)).sw_enabled());

    // The boot CPU and absent CPUs are refused.
    assert_eq!(
        con.command("offline 0", T).expect("offline 0"),
        vec!["ERR cannot offline the boot cpu"]
    );
    assert_eq!(
        con.command("online 3", T).expect("online 3"),
        vec!["ERR cpu not present"]
    );
    assert_eq!(
        con.command("online 9", T).expect("online 9"),
        vec!["ERR no such cpu"]
    );

    con.command("poweroff", T).expect("poweroff");
    assert_eq!(vm.wait(Some(T)), Some(VmOutcome::PowerOff));
    vm.shutdown();
}

#[test]
fn triple_fault_ends_the_vmm_with_an_error() {
    if !kvm_or_skip("triple_fault_ends_the_vmm_with_an_error") {
        return;
    }
    let dir = temp_dir("tf");
    let sock = dir.join("console.sock");
    let mut child = spawn_vmm(&[
        "--cpus",
        "boot=1,max=2",
        "--serial",
        &format!("socket={}", sock.display()),
    ]);
    let mut con = GuestConsole::connect(&sock, T).expect("console");
    con.wait_for("READY", T).expect("READY");
    con.command("triple-fault", T).expect("reply");
    let out = wait_child(&mut child, T);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("triple fault"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn x2apic_ids_above_255_boot() {
    if !kvm_or_skip("x2apic_ids_above_255_boot") {
        return;
    }
    // 300 possible CPUs: the MADT carries x2APIC entries and KVM needs 32-bit x2APIC ids.
    let dir = temp_dir("x2");
    let sock = dir.join("console.sock");
    let vm = Vm::start(&test_guest_config(2, 300, &sock)).expect("VM starts");
    let mut con = GuestConsole::connect(&sock, T).expect("console");
    let ready = con.wait_for("READY", T).expect("READY");
    assert!(
        ready.contains("apic_mode=x2apic possible=300 present=2 online=2"),
        "{ready}"
    );
    let s = con.status(STATUS_T).expect("status");
    assert_eq!(s.cpus[299].apic_id, 299);
    con.command("poweroff", T).expect("poweroff");
    assert_eq!(vm.wait(Some(T)), Some(VmOutcome::PowerOff));
}

/// Pause, save every vCPU, restore them into fresh vCPUs of a brand-new KVM VM sharing the
/// same memory, resume: online CPUs keep ticking, the offlined one stays offline (HALTED,
/// SW-disabled APIC) and can be onlined, the never-onlined one stays UNINITIALIZED and can be
/// started later.
#[test]
fn vcpus_restored_into_a_new_vm_keep_their_exact_state() {
    if !kvm_or_skip("vcpus_restored_into_a_new_vm_keep_their_exact_state") {
        return;
    }
    const UNINITIALIZED: u32 = 1;
    let dir = temp_dir("transplant");
    let sock = dir.join("console.sock");
    let vm = Vm::start(&test_guest_config(3, 6, &sock)).expect("VM starts");
    let ctl = vm.control();
    let mut con = GuestConsole::connect(&sock, T).expect("console");
    con.wait_for("READY", T).expect("READY");
    // CPU 3: hot-added but never onlined. CPU 2: offlined by the guest.
    assert_eq!(con.command("autoonline off", T).unwrap(), vec!["OK"]);
    ctl.add_cpu_index(3).expect("add CPU 3");
    assert_eq!(
        con.wait_for("EVENT insert", T).unwrap(),
        "EVENT insert cpu=3 online=0"
    );
    assert_eq!(con.command("offline 2", T).unwrap(), vec!["OK"]);
    let deadline = Instant::now() + T;
    while vm.mp_state(2) != Some(KVM_MP_STATE_HALTED) {
        assert!(Instant::now() < deadline, "CPU 2 never halted");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(answered(|| vm.mp_state(3)), UNINITIALIZED);
    let s1 = con.status(STATUS_T).unwrap();

    let (save_us, restore_us) = ctl.transplant().expect("rebuild on a new VM");
    assert_eq!(save_us.len(), 4);
    eprintln!("per-vCPU save {save_us:?} us, restore {restore_us:?} us");

    assert_eq!(
        answered(|| vm.mp_state(3)),
        UNINITIALIZED,
        "never-onlined CPU stays UNINITIALIZED"
    );
    assert_eq!(
        answered(|| vm.mp_state(2)),
        KVM_MP_STATE_HALTED,
        "offlined CPU stays HALTED"
    );
    assert!(
        !answered(|| vm.lapic(2)).sw_enabled(),
        "and keeps its SW-disabled APIC"
    );
    std::thread::sleep(Duration::from_millis(300));
    let s2 = con.status(STATUS_T).unwrap();
    for i in [0, 1] {
        assert!(
            s2.cpus[i].ticks > s1.cpus[i].ticks,
            "CPU {i} stopped ticking after the restore"
        );
    }
    assert_eq!(
        s2.cpus[2].ticks, s1.cpus[2].ticks,
        "the offline CPU stayed offline"
    );
    assert_eq!(
        (s2.cpus[2].state.as_str(), s2.cpus[3].state.as_str()),
        ("offline", "stopped")
    );
    // Both come up with INIT/SIPI on the new VM.
    assert_eq!(con.command("online 2", T).unwrap(), vec!["OK"]);
    assert_eq!(con.command("online 3", T).unwrap(), vec!["OK"]);
    std::thread::sleep(Duration::from_millis(200));
    let s3 = con.status(STATUS_T).unwrap();
    assert_eq!(s3.online, 4);
    assert!(s3.cpus[2].ticks > s2.cpus[2].ticks && s3.cpus[3].ticks > 0);
    // Hotplug still works on the new VM: remove CPU 3, the eject parks it.
    ctl.remove_cpu(3).unwrap();
    assert_eq!(
        con.wait_for("EVENT remove", T).unwrap(),
        "EVENT remove cpu=3 ejected=1"
    );
    con.command("poweroff", T).unwrap();
    assert_eq!(vm.wait(Some(T)), Some(VmOutcome::PowerOff));
}

#[test]
fn a_console_client_that_stops_reading_cannot_stall_the_vcpus() {
    if !kvm_or_skip("a_console_client_that_stops_reading_cannot_stall_the_vcpus") {
        return;
    }
    // The client sends 150 `status` commands (~100 KB of replies, several times the console
    // socket's 16 KiB send buffer) and reads nothing. COM1 output used to block the vCPU in
    // the socket write: pause then answered 500 and the guest stood still. (600 commands,
    // one UART exit per byte, took up to 577 s in a loaded nested run: the 600 s bound.)
    let mut vm = Vmm::start("stalled-console", "boot=2,max=8");
    for _ in 0..REPLIES {
        vm.con.send("status").expect("send");
    }
    std::thread::sleep(Duration::from_secs(2));
    let api = vm.api.clone();
    pause_despite_load(|| pty_api(&api, "PUT", "vm.pause"), "an unread console");
    assert_eq!(vm.api("PUT", "vm.resume", None).0, 204);
    // Reading again, every reply arrives (within the 1 MiB the VMM holds) and the guest
    // answers new commands.
    let mut replies = 0;
    while replies < REPLIES {
        let l = vm.con.read_line(T).expect("a reply");
        replies += usize::from(l.starts_with("OK") && !l.contains("poweroff"));
    }
    assert_eq!(vm.status().online, 2);
    vm.poweroff();
}

/// `status` commands the stalled-console test sends.
const REPLIES: usize = 150;

/// The vCPU manager's own bound for a vCPU to answer (a stalled vCPU hits it).
/// `vm.pause` succeeds while `what` holds output nobody reads. A vCPU blocked in a console
/// write never pauses (every try answers 429); a loaded host may make one try miss the
/// vCPU manager's bound, which the VMM answers with 429 too, so a few tries are allowed.
/// What a running vCPU's thread answers through `Vm::with_vcpu`, asked again while it does
/// not answer within the VMM's 5 s (a loaded host can delay one answer, not all of them).
fn answered<R>(ask: impl Fn() -> Option<R>) -> R {
    let deadline = Instant::now() + T;
    loop {
        if let Some(r) = ask() {
            return r;
        }
        assert!(Instant::now() < deadline, "the vCPU thread never answered");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn pause_despite_load(mut pause: impl FnMut() -> (u16, String), what: &str) {
    let mut busy = Vec::new();
    loop {
        let (s, v) = pause();
        if s == 204 {
            return;
        }
        assert_eq!(s, 429, "pause with {what}: {v}");
        busy.push(v);
        assert!(busy.len() < 6, "pause with {what} never succeeded: {busy:?}");
    }
}

#[test]
fn the_api_stays_bounded_under_idle_and_flooding_clients() {
    if !kvm_or_skip("the_api_stays_bounded_under_idle_and_flooding_clients") {
        return;
    }
    // 1000 clients that sent nothing held 1007 threads; a 256 MiB line grew the VMM to 266 MB.
    let mut vm = Vmm::start("api-bounds", "boot=2,max=4");
    let tasks = format!("/proc/{}/task", vm.pid());
    let base = count(&tasks);
    let idle: Vec<_> = (0..200)
        .map(|_| std::os::unix::net::UnixStream::connect(&vm.api).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        count(&tasks) <= base + 32,
        "{} threads for 200 idle clients",
        count(&tasks)
    );
    let (s, v) = vm.api("GET", "vm.info", None);
    assert_eq!(s, 503, "the connection cap answers at once: {v}");
    drop(idle);
    // Closed clients free their slots at once; an endless line is cut at 8 KiB.
    let deadline = Instant::now() + T;
    while vm.api("GET", "vm.info", None).0 != 200 {
        assert!(Instant::now() < deadline, "the API never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut flood = std::os::unix::net::UnixStream::connect(&vm.api).expect("connect");
    let line = vec![b'A'; 1 << 20];
    let _ = std::io::Write::write_all(&mut flood, &line);
    let mut reply = String::new();
    let _ = std::io::Read::read_to_string(&mut flood, &mut reply);
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");
    let rss_kib: u64 = std::fs::read_to_string(format!("/proc/{}/status", vm.pid()))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    assert!(rss_kib < 512 << 10, "peak RSS {rss_kib} KiB");
    assert_eq!(vm.status().online, 2);
    vm.poweroff();
}

#[test]
fn a_second_vmm_cannot_take_over_an_api_socket_in_use() {
    if !kvm_or_skip("a_second_vmm_cannot_take_over_an_api_socket_in_use") {
        return;
    }
    let vm = Vmm::start("api-owner", "boot=1,max=2");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&vm.api).expect("socket").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the API socket is the owner's only");
    let api = vm.api.to_str().expect("path").to_string();
    let mut second = spawn_vmm(&[
        "--cpus",
        "boot=1,max=1",
        "--memory",
        "64M",
        "--api-socket",
        &api,
        "--serial",
        "file=/dev/null",
    ]);
    let out = wait_child(&mut second, T);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another process"), "{err}");
    assert_eq!(
        vm.api("GET", "vm.info", None).0,
        200,
        "the first VMM keeps its API"
    );
    vm.poweroff();
}

#[test]
fn sigterm_and_sigint_end_the_vm_cleanly() {
    if !kvm_or_skip("sigterm_and_sigint_end_the_vm_cleanly") {
        return;
    }
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut vm = Vmm::start(&format!("signal-{sig}"), "boot=2,max=4");
        let (api, dir) = (vm.api.clone(), vm.dir.clone());
        // SAFETY: kill(2) on the VMM child's pid.
        assert_eq!(unsafe { libc::kill(vm.pid() as i32, sig) }, 0);
        let mut child = vm.child.take().expect("child");
        let out = wait_child(&mut child, T);
        assert!(out.status.success(), "signal {sig}: {out:?}");
        let left: Vec<_> = std::fs::read_dir(&dir)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(!api.exists() && left.is_empty(), "signal {sig} left {left:?}");
    }
}

/// Every thread of a running VMM is under a seccomp filter (`Seccomp: 2` in its
/// `/proc/PID/task/TID/status`), and one that a filtered thread creates inherits it: vCPUs,
/// devices, the API server and its connection threads, the main thread.
#[test]
fn every_vmm_thread_runs_under_a_seccomp_filter() {
    if !kvm_or_skip("every_vmm_thread_runs_under_a_seccomp_filter") {
        return;
    }
    let mut vm = Vmm::start("seccomp", "boot=2,max=4");
    // A hot-added vCPU thread and an API connection thread, created after the start.
    assert_eq!(vm.api("PUT", "vm.add-cpu", None).0, 200);
    let threads = |pid: u32| -> Vec<(String, String)> {
        let dir = format!("/proc/{pid}/task");
        std::fs::read_dir(&dir)
            .expect("task dir")
            .filter_map(|t| {
                let status = std::fs::read_to_string(t.ok()?.path().join("status")).ok()?;
                let field = |k: &str| {
                    status
                        .lines()
                        .find_map(|l| l.strip_prefix(k))
                        .map(|v| v.trim().to_string())
                };
                Some((field("Name:")?, field("Seccomp:")?))
            })
            .collect()
    };
    let wanted = [
        "vcpu0",
        "vcpu1",
        "vcpu2",
        "api-server",
        "console",
        "console-out",
        "eject-worker",
        "signals",
    ];
    let named = |all: &[(String, String)]| wanted.iter().all(|w| all.iter().any(|(n, _)| n == w));
    let deadline = Instant::now() + T;
    let all = loop {
        let all = threads(vm.pid());
        // The main thread installs its filter once the VM runs, and a new thread shows its
        // creator's name until it has named itself (a loaded host showed vcpu2 as "api").
        let filtered = all.iter().all(|(_, mode)| mode == "2");
        if (filtered && named(&all)) || Instant::now() > deadline {
            break all;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let unfiltered: Vec<_> = all.iter().filter(|(_, mode)| mode != "2").collect();
    assert!(
        unfiltered.is_empty(),
        "threads without a filter: {unfiltered:?} (all: {all:?})"
    );
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    for want in wanted {
        assert!(names.contains(&want), "no {want} thread among {names:?}");
    }
    vm.assert_ticking(&[0, 1]);
    vm.poweroff();
}

/// `--serial pty`: `vm.info` names the pty's slave; commands typed there are answered; a
/// pty nobody reads cannot stall the guest (its output waits in the VMM's bounded outbox,
/// and every reply arrives once someone reads again); detaching and attaching again works.
#[test]
fn a_pty_console_answers_and_an_unread_one_cannot_stall_the_guest() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if !kvm_or_skip("a_pty_console_answers_and_an_unread_one_cannot_stall_the_guest") {
        return;
    }
    let dir = temp_dir("pty");
    let api = dir.join("api.sock");
    let api_arg = api.display().to_string();
    let args = [
        "--cpus",
        "boot=2,max=8",
        "--memory",
        "128M",
        "--serial",
        "pty",
        "--api-socket",
        &api_arg,
    ];
    let mut child = KillOnDrop(spawn_vmm(&args));
    let info = wait_for_info(&api, &mut child.0);
    let serial = &info["config"]["serial"];
    assert_eq!(serial["mode"], "Pty", "{info}");
    let path = serial["file"].as_str().expect("the pty's slave").to_string();
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)
            .expect("open the pty's slave")
    };
    // Typed on the pty: 150 `status` commands whose replies nobody reads for a while.
    let mut tty = open();
    pty_replies(&mut tty, 1, |l| l.starts_with("READY"));
    for _ in 0..REPLIES {
        tty.write_all(b"status\n").expect("type on the pty");
    }
    std::thread::sleep(Duration::from_secs(2));
    pause_despite_load(|| pty_api(&api, "PUT", "vm.pause"), "an unread pty");
    assert_eq!(pty_api(&api, "PUT", "vm.resume").0, 204);
    pty_replies(&mut tty, REPLIES, is_ok);
    // Detached (every fd of the slave closed), then attached again: it still answers, and a
    // terminal's Enter (CR) ends a command as LF does.
    drop(tty);
    std::thread::sleep(Duration::from_millis(300));
    let mut again = open();
    again.write_all(b"status\r").expect("type again");
    pty_replies(&mut again, 1, is_ok);
    again.write_all(b"poweroff\r").expect("poweroff");
    let out = wait_child(&mut child.0, T);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("serial console on {path}")), "{stderr}");
}

/// A VMM process killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `--serial tty` with a stdout nobody reads (`vmm-reference run ... | less`, left alone):
/// COM1 output was written on the vCPU thread, which blocked on the full pipe, so pause
/// never succeeded and the guest stood still.
#[test]
fn a_stdout_nobody_reads_cannot_stall_the_guest() {
    if !kvm_or_skip("a_stdout_nobody_reads_cannot_stall_the_guest") {
        return;
    }
    use std::io::{BufRead, Write};
    let dir = temp_dir("stdout-unread");
    let api = dir.join("api.sock");
    let mut child = std::process::Command::new(vmm_bin())
        .args(["run", "--cpus", "boot=2,max=4", "--serial", "tty", "--api-socket"])
        .arg(&api)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn vmm-reference");
    let mut stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    // One page of pipe instead of 64 KiB: the replies below are several times that.
    // SAFETY: fcntl on the pipe's read end, which `stdout` owns.
    let sized = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&stdout), libc::F_SETPIPE_SZ, 4096) };
    assert!(sized >= 4096, "F_SETPIPE_SZ: {}", std::io::Error::last_os_error());
    let mut child = KillOnDrop(child);
    // Lines of stdout as they come, up to READY; then none until `go` (the pipe fills).
    let (tx, rx) = std::sync::mpsc::channel();
    let (go, wait) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let ready = l.starts_with("READY");
            if tx.send(l).is_err() || (ready && wait.recv().is_err()) {
                return;
            }
        }
    });
    while !rx.recv_timeout(T).expect("READY on stdout").starts_with("READY") {}
    // Replies several times the pipe's size, typed on stdin and not read.
    for _ in 0..REPLIES {
        stdin.write_all(b"status\n").expect("type on stdin");
    }
    std::thread::sleep(Duration::from_secs(2));
    pause_despite_load(|| pty_api(&api, "PUT", "vm.pause"), "an unread stdout");
    assert_eq!(pty_api(&api, "PUT", "vm.resume").0, 204);
    // Reading again, the replies arrive (within the 1 MiB the VMM holds).
    go.send(()).expect("reader");
    let mut replies = 0;
    while replies < REPLIES {
        let l = rx.recv_timeout(STATUS_T).expect("a reply on stdout");
        replies += usize::from(is_ok(l.trim_end()));
    }
    assert_eq!(pty_api(&api, "PUT", "vm.shutdown").0, 204);
    let out = wait_child(&mut child.0, T);
    assert!(out.status.success(), "{out:?}");
}

fn is_ok(l: &str) -> bool {
    l == "OK" || l.starts_with("OK ")
}

/// Read the pty's slave until `n` lines `want` came, each within `STATUS_T` of the one before
/// (a `status` reply takes about a second in a loaded nested run).
fn pty_replies(f: &mut std::fs::File, n: usize, want: fn(&str) -> bool) {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let mut deadline = Instant::now() + STATUS_T;
    let (mut ok, mut line) = (0, Vec::new());
    while ok < n {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{ok} of {n} lines came");
        let mut pfd = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        if unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(1000) as i32) } <= 0 {
            continue;
        }
        let mut buf = [0u8; 4096];
        let got = f.read(&mut buf).expect("read the pty");
        for &b in &buf[..got] {
            if b != b'\n' {
                line.push(b);
                continue;
            }
            let l = String::from_utf8_lossy(&line).trim_end().to_string();
            if want(&l) {
                ok += 1;
                deadline = Instant::now() + STATUS_T;
            }
            line.clear();
        }
    }
}

/// `vm.info` of the VMM at `api`, once it answers (the VMM's stderr if it ended first).
fn wait_for_info(api: &std::path::Path, child: &mut std::process::Child) -> serde_json::Value {
    let deadline = Instant::now() + T;
    loop {
        if let Ok((200, body)) = vmm_reference::api::request(api, "GET", "vm.info", None) {
            return serde_json::from_str(&body).expect("vm.info JSON");
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(e) = child.stderr.as_mut() {
                let _ = std::io::Read::read_to_string(e, &mut err);
            }
            panic!("the VMM ended ({status}) before its API answered: {err}");
        }
        assert!(Instant::now() < deadline, "no API at {}", api.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn pty_api(api: &std::path::Path, method: &str, ep: &str) -> (u16, String) {
    vmm_reference::api::request(api, method, ep, None).expect("API request")
}
