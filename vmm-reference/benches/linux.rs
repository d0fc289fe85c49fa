// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A Linux guest under vmm-reference and under QEMU, side by side on the same KVM
//! (`cargo bench -p vmm-reference --bench linux`; `ci/bench-nested.sh` runs it in L1).
//!
//! The same payload (Debian's cloud kernel and the busybox agent from ci/linux-guest.sh,
//! `--cpus boot=2,max=8`, 512 MiB) goes through the same scenario in each VMM, run after run,
//! alternating: boot to the agent; hot-add CPU 2 and online it; make the guest partially
//! offline (CPU 3 onlined then offlined through sysfs, CPU 4 hot-added and never onlined);
//! snapshot it; restore the snapshot into a new process; live-migrate that one over TCP with
//! the memory workload and the clock watcher running; hot-remove CPU 2 (Linux offlines and
//! ejects it) and re-add it. After the restore and after the migration the guest must show the
//! same online and present CPUs, and after the migration its pages and clocks must be intact:
//! a run that fails a check counts in the "scenario checks" row, not in the timings.
//!
//! QEMU is Debian's 7.2 (`$QEMU_PEER`, or `ci/nested/debs.sh --qemu-peer`), driven through
//! QMP: `device_add`/`device_del`, `stop` + `migrate exec:` for the snapshot, `-incoming` for
//! the restore and the migration (its destinations are started with a `-device` for every
//! hot-added CPU, which QEMU needs and vmm-reference does not). Its bandwidth limit is lifted
//! (`max-bandwidth` 10 GiB/s); its downtime limit stays at the default 300 ms.
//!
//! A stock kernel needs hardware virtualization: on PVM this benchmark prints a skip.
//! `LINUX_BENCH_RUNS` sets the runs per VMM (default 5).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm_reference::api::request;
use vmm_reference::console::GuestConsole;

mod common;
#[path = "../tests/common/linux_agent.rs"]
mod linux_agent;

use common::qmp::Qmp;
use common::{env_count, pct, qemu_peer, record_row};
use linux_agent::{hardware_virt, payload, Status, BOOT, READY};

const CPUS: (u32, u32) = (2, 8);
const MEMORY_MIB: u32 = 512;
const CMDLINE: &str = "console=ttyS0 panic=-1 quiet";
/// Bound of one agent command or one VMM request.
const T: Duration = Duration::from_secs(120);

type R<T> = Result<T, String>;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// A VMM running the Linux guest, as the scenario drives it.
trait Machine: Sized {
    /// The agent's console.
    fn con(&mut self) -> &mut GuestConsole;
    /// Plug CPU `id` (returns once the VMM accepted it).
    fn add_cpu(&mut self, id: u32) -> R<()>;
    /// Unplug CPU `id` and return once the eject is done.
    fn remove_cpu(&mut self, id: u32) -> R<()>;
    /// A snapshot into `dir`; the VM is paused while it is taken and runs again after.
    fn snapshot(&mut self, dir: &Path) -> R<()>;
    /// Stop this process and start a new one from the snapshot in `dir`: the new machine and
    /// when its process was started.
    fn restore(self, dir: &Path) -> R<(Self, Instant)>;
    /// Live migration to a new process on this host: (the destination, total ms, downtime ms).
    fn migrate(self) -> R<(Self, f64, f64)>;
}

/// One agent command; its last line must start with OK.
fn agent(con: &mut GuestConsole, cmd: &str) -> R<String> {
    let lines = con.command(cmd, T).map_err(|e| format!("{cmd}: {e}"))?;
    let last = lines.last().cloned().unwrap_or_default();
    if last.starts_with("OK") {
        Ok(last)
    } else {
        Err(format!("{cmd}: {lines:?}"))
    }
}

fn status(con: &mut GuestConsole) -> R<Status> {
    let line = agent(con, "status")?;
    Status::try_parse(&line).ok_or_else(|| format!("status: {line:?}"))
}

/// Poll the agent until `pred` holds.
fn until(con: &mut GuestConsole, what: &str, pred: impl Fn(&Status) -> bool) -> R<Status> {
    let deadline = Instant::now() + T;
    loop {
        let s = status(con)?;
        if pred(&s) {
            return Ok(s);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}: {s:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The timings of one run (milliseconds); `None` where that step could not be done.
#[derive(Default)]
struct Sample {
    boot: Option<f64>,
    add_online: Option<f64>,
    remove: Option<f64>,
    readd_online: Option<f64>,
    snapshot: Option<f64>,
    restore: Option<f64>,
    mig_total: Option<f64>,
    mig_down: Option<f64>,
}

/// Hot-add `id` and online it in the guest: the time from the request to `online` done.
fn add_and_online<M: Machine>(m: &mut M, id: u32) -> R<f64> {
    let t = Instant::now();
    m.add_cpu(id)?;
    until(m.con(), &format!("CPU {id} present"), |s| s.present.contains(&id))?;
    agent(m.con(), &format!("online {id}"))?;
    Ok(ms(t))
}

/// The scenario of the module docs, on a machine `boot` starts. `notes` collects what one
/// VMM could not do (a step that failed but let the run go on). Removing and re-adding come
/// last: where re-adding fails, the VMM may not survive it.
fn scenario<M: Machine>(boot: impl FnOnce() -> R<M>, work: &Path, notes: &mut BTreeSet<String>) -> R<Sample> {
    let mut s = Sample::default();
    let t = Instant::now();
    let mut m = boot()?;
    m.con().wait_for(READY, BOOT).map_err(|e| format!("boot: {e}"))?;
    s.boot = Some(ms(t));
    s.add_online = Some(add_and_online(&mut m, 2)?);
    // Partially offline: CPU 3 offlined through sysfs, CPU 4 present and never onlined.
    add_and_online(&mut m, 3)?;
    agent(m.con(), "offline 3")?;
    m.add_cpu(4)?;
    let before = until(m.con(), "CPU 4 present", |st| st.present.contains(&4))?;
    let snap = work.join("snapshot");
    std::fs::create_dir_all(&snap).map_err(|e| e.to_string())?;
    let t = Instant::now();
    m.snapshot(&snap)?;
    s.snapshot = Some(ms(t));
    let (mut r, t) = m.restore(&snap)?;
    let after = status(r.con())?;
    s.restore = Some(ms(t));
    same_cpus("restore", &before, &after)?;
    agent(r.con(), "dirty start 32")?;
    agent(r.con(), "clock start")?;
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let (mut d, total, down) = r.migrate()?;
    let since = ms(t);
    (s.mig_total, s.mig_down) = (Some(total), Some(down));
    moved_intact(d.con(), &before, since)?;
    let t = Instant::now();
    d.remove_cpu(2)?;
    s.remove = Some(ms(t));
    until(d.con(), "CPU 2 gone", |st| !st.present.contains(&2))?;
    match add_and_online(&mut d, 2) {
        Ok(v) => s.readd_online = Some(v),
        Err(e) => {
            notes.insert(format!("re-adding a removed CPU failed: {e}"));
        }
    }
    let _ = d.con().send("poweroff");
    Ok(s)
}

fn same_cpus(after_what: &str, a: &Status, b: &Status) -> R<()> {
    if (&a.online, &a.present) == (&b.online, &b.present) {
        Ok(())
    } else {
        Err(format!(
            "CPU sets changed across the {after_what}: {a:?} then {b:?}"
        ))
    }
}

/// After a live migration: the same CPU sets, every page of the workload intact, and clocks
/// that neither went back nor jumped forward by more than the time that passed.
fn moved_intact(con: &mut GuestConsole, before: &Status, passed_ms: f64) -> R<()> {
    same_cpus("migration", before, &status(con)?)?;
    let dirty = agent(con, "dirty check")?;
    if !dirty.contains(" bad=0 ") {
        return Err(format!("memory damaged: {dirty}"));
    }
    let clock = agent(con, "clock check")?;
    let num = |k: &str| -> Option<f64> {
        clock
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    let limit = passed_ms + 1000.0;
    match (
        num("back_mono_us"),
        num("back_real_us"),
        num("gap_mono_ms"),
        num("gap_real_ms"),
    ) {
        (Some(b1), Some(b2), Some(g1), Some(g2)) if b1 == 0.0 && b2 == 0.0 && g1 <= limit && g2 <= limit => {
            Ok(())
        }
        _ => Err(format!("clocks: {clock} ({passed_ms:.0} ms passed)")),
    }
}

/// A fresh work directory for one run of one VMM.
fn work_dir(who: &str, run: usize) -> R<PathBuf> {
    let d = std::env::temp_dir().join(format!("vmmref-linuxbench-{}-{who}-{run}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    Ok(d)
}

/// A free TCP port on 127.0.0.1 (released again for the destination to bind).
fn free_port() -> R<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

/// A process that is killed when dropped (a failed run leaves nothing behind).
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// vmm-reference: its API socket and its socket console.
struct Ours {
    _proc: Proc,
    api: PathBuf,
    con: Option<GuestConsole>,
    dir: PathBuf,
    n: u32,
}

impl Ours {
    /// `vmm-reference run <args>` with an API socket and a console in `dir`, named `n`.
    fn spawn(dir: &Path, n: u32, args: &[String], attach: bool) -> R<Ours> {
        let (api, con) = (dir.join(format!("api{n}.sock")), dir.join(format!("con{n}.sock")));
        let child = Command::new(env!("CARGO_BIN_EXE_vmm-reference"))
            .arg("run")
            .args(args)
            .arg("--api-socket")
            .arg(&api)
            .arg("--serial")
            .arg(format!("socket={}", con.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn: {e}"))?;
        let mut o = Ours {
            _proc: Proc(child),
            api,
            con: None,
            dir: dir.to_path_buf(),
            n,
        };
        if attach {
            o.attach()?;
        }
        Ok(o)
    }

    fn boot(dir: &Path) -> R<Ours> {
        let (kernel, initrd) = payload();
        let args = [
            "--kernel".into(),
            kernel.display().to_string(),
            "--initramfs".into(),
            initrd.display().to_string(),
            "--cmdline".into(),
            CMDLINE.into(),
            "--cpus".into(),
            format!("boot={},max={}", CPUS.0, CPUS.1),
            "--memory".into(),
            format!("{MEMORY_MIB}M"),
        ];
        Ours::spawn(dir, 0, &args, true)
    }

    fn attach(&mut self) -> R<()> {
        let path = self.dir.join(format!("con{}.sock", self.n));
        self.con = Some(GuestConsole::connect(&path, T).map_err(|e| format!("console: {e}"))?);
        Ok(())
    }

    fn api(&self, method: &str, ep: &str, body: Value) -> R<(u16, Value)> {
        let (st, b) =
            request(&self.api, method, ep, Some(&body.to_string())).map_err(|e| format!("{ep}: {e}"))?;
        Ok((st, serde_json::from_str(&b).unwrap_or(Value::Null)))
    }

    fn expect(&self, ep: &str, body: Value, ok: &[u16]) -> R<Value> {
        let (st, v) = self.api("PUT", ep, body)?;
        if ok.contains(&st) {
            Ok(v)
        } else {
            Err(format!("{ep}: {st} {v}"))
        }
    }
}

impl Machine for Ours {
    fn con(&mut self) -> &mut GuestConsole {
        self.con.as_mut().expect("attached before use")
    }

    fn add_cpu(&mut self, id: u32) -> R<()> {
        self.expect("vm.add-cpu", json!({ "id": id }), &[200]).map(|_| ())
    }

    fn remove_cpu(&mut self, id: u32) -> R<()> {
        self.expect("vm.remove-cpu", json!({ "id": id }), &[204])?;
        // The eject is done when the VMM has joined the CPU's thread. Watched from outside:
        // vm.info asks every running vCPU for its state, and polling it would slow the very
        // eject it waits for (QEMU pushes an event instead).
        let (pid, name) = (self._proc.0.id(), format!("vcpu{id}"));
        let deadline = Instant::now() + T;
        while thread_named(pid, &name) {
            if Instant::now() > deadline {
                return Err(format!("CPU {id}'s thread never ended"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let deadline = Instant::now() + T;
        loop {
            let (_, v) = self.api("GET", "vm.info", Value::Null)?;
            let parked = v["cpus"][id as usize]["vcpu"] == "parked";
            if parked && v["pending_removals"].as_array().is_some_and(|a| a.is_empty()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("CPU {id} was never parked: {v}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn snapshot(&mut self, dir: &Path) -> R<()> {
        let url = format!("file://{}", dir.display());
        self.expect("vm.snapshot", json!({ "destination_url": url }), &[200, 204])
            .map(|_| ())
    }

    fn restore(self, dir: &Path) -> R<(Ours, Instant)> {
        let (wd, n) = (self.dir.clone(), self.n + 1);
        drop(self);
        let t = Instant::now();
        let r = Ours::spawn(&wd, n, &["--restore".into(), dir.display().to_string()], true)?;
        Ok((r, t))
    }

    fn migrate(self) -> R<(Ours, f64, f64)> {
        let port = free_port()?;
        let url = format!("tcp:127.0.0.1:{port}");
        let token_file = self.dir.join("token");
        std::fs::write(&token_file, BENCH_TOKEN).map_err(|e| format!("token file: {e}"))?;
        let args = [
            "--incoming".into(),
            url.clone(),
            "--migration-token-file".into(),
            token_file.display().to_string(),
        ];
        let mut dst = Ours::spawn(&self.dir, self.n + 1, &args, false)?;
        wait_listening(port)?;
        let body = json!({ "destination_url": url, "token": BENCH_TOKEN });
        let report = self.expect("vm.send-migration", body, &[200])?;
        dst.attach()?;
        let f = |k: &str| report[k].as_f64().ok_or_else(|| format!("no {k} in {report}"));
        Ok((dst, f("total_ms")?, f("downtime_ms")?))
    }
}

/// The pre-shared token of the benchmark's TCP migrations.
const BENCH_TOKEN: &str = "bench-token-0123456789";

/// Whether process `pid` has a thread called `name`.
fn thread_named(pid: u32, name: &str) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks
        .flatten()
        .any(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name))
}

/// Wait until something listens on TCP `port` (the destination accepts one connection only,
/// so this reads /proc/net/tcp instead of connecting).
fn wait_listening(port: u16) -> R<()> {
    let want = format!(":{port:04X}");
    let deadline = Instant::now() + T;
    loop {
        let t = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        if t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
        }) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("nothing listens on port {port}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// QEMU: its QMP socket, its socket console, and the CPUs plugged beyond the boot ones.
struct Qemu {
    _proc: Proc,
    qmp: Qmp,
    con: GuestConsole,
    qemu: PathBuf,
    dir: PathBuf,
    n: u32,
    plugged: BTreeSet<u32>,
}

impl Qemu {
    /// QEMU with the payload, KVM, one socket per possible CPU (so CPU N has APIC id N, as
    /// under vmm-reference), `-device` for each of `plugged`, and `extra` arguments.
    fn spawn(qemu: &Path, dir: &Path, n: u32, plugged: &BTreeSet<u32>, extra: &[String]) -> R<Qemu> {
        let (kernel, initrd) = payload();
        let (qmp, con) = (dir.join(format!("qmp{n}.sock")), dir.join(format!("con{n}.sock")));
        let mut c = Command::new(qemu);
        c.args([
            "-accel",
            "kvm",
            "-cpu",
            "host",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-m", &MEMORY_MIB.to_string()])
        .arg("-smp")
        .arg(format!(
            "{},sockets={},cores=1,threads=1,maxcpus={}",
            CPUS.0, CPUS.1, CPUS.1
        ))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", CMDLINE])
        .arg("-chardev")
        .arg(format!("socket,id=con,path={},server=on,wait=off", con.display()))
        .args(["-serial", "chardev:con"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        for id in plugged {
            c.arg("-device").arg(format!(
                "host-x86_64-cpu,id=cpu{id},socket-id={id},core-id=0,thread-id=0"
            ));
        }
        let child = c
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("spawn QEMU: {e}"))?;
        let proc = Proc(child);
        let qmp = Qmp::connect(&qmp, T)?;
        let con = GuestConsole::connect(&con, T).map_err(|e| format!("console: {e}"))?;
        Ok(Qemu {
            _proc: proc,
            qmp,
            con,
            qemu: qemu.to_path_buf(),
            dir: dir.to_path_buf(),
            n,
            plugged: plugged.clone(),
        })
    }

    /// Poll `query-migrate` until it completed: its report.
    fn migration_done(&mut self) -> R<Value> {
        let deadline = Instant::now() + T;
        loop {
            let v = self.qmp.execute("query-migrate", json!({}))?;
            match v["status"].as_str() {
                Some("completed") => return Ok(v),
                Some("failed") | Some("cancelled") => return Err(format!("QEMU migration: {v}")),
                _ if Instant::now() > deadline => return Err(format!("QEMU migration never completed: {v}")),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// An incoming VM runs once its state arrived: `cont` one that came in paused.
    fn run_when_in(&mut self) -> R<()> {
        let deadline = Instant::now() + T;
        loop {
            let v = self.qmp.execute("query-status", json!({}))?;
            match v["status"].as_str() {
                Some("running") => return Ok(()),
                Some("paused") | Some("postmigrate") | Some("prelaunch") => {
                    self.qmp.execute("cont", json!({}))?;
                    return Ok(());
                }
                _ if Instant::now() > deadline => return Err(format!("incoming QEMU never ran: {v}")),
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }
}

impl Machine for Qemu {
    fn con(&mut self) -> &mut GuestConsole {
        &mut self.con
    }

    fn add_cpu(&mut self, id: u32) -> R<()> {
        let dev = json!({ "driver": "host-x86_64-cpu", "id": format!("cpu{id}"),
            "socket-id": id, "core-id": 0, "thread-id": 0 });
        self.qmp.execute("device_add", dev)?;
        self.plugged.insert(id);
        Ok(())
    }

    fn remove_cpu(&mut self, id: u32) -> R<()> {
        self.qmp
            .execute("device_del", json!({ "id": format!("cpu{id}") }))?;
        self.qmp.event("DEVICE_DELETED", T)?;
        self.plugged.remove(&id);
        Ok(())
    }

    fn snapshot(&mut self, dir: &Path) -> R<()> {
        self.qmp.execute("stop", json!({}))?;
        let uri = format!("exec:cat > {}", dir.join("qemu.state").display());
        self.qmp.execute("migrate", json!({ "uri": uri }))?;
        self.migration_done()?;
        self.qmp.execute("cont", json!({})).map(|_| ())
    }

    fn restore(self, dir: &Path) -> R<(Qemu, Instant)> {
        let incoming = format!("exec:cat {}", dir.join("qemu.state").display());
        let (qemu, wd, n, plugged) = (
            self.qemu.clone(),
            self.dir.clone(),
            self.n + 1,
            self.plugged.clone(),
        );
        drop(self);
        let t = Instant::now();
        let mut r = Qemu::spawn(&qemu, &wd, n, &plugged, &["-incoming".into(), incoming])?;
        r.run_when_in()?;
        Ok((r, t))
    }

    fn migrate(mut self) -> R<(Qemu, f64, f64)> {
        let port = free_port()?;
        let uri = format!("tcp:127.0.0.1:{port}");
        let mut dst = Qemu::spawn(
            &self.qemu,
            &self.dir,
            self.n + 1,
            &self.plugged,
            &["-incoming".into(), uri.clone()],
        )?;
        self.qmp
            .execute("migrate-set-parameters", json!({ "max-bandwidth": 10u64 << 30 }))?;
        self.qmp.execute("migrate", json!({ "uri": uri }))?;
        let v = self.migration_done()?;
        dst.run_when_in()?;
        let _ = self.qmp.execute("quit", json!({}));
        let f = |k: &str| v[k].as_f64().ok_or_else(|| format!("no {k} in {v}"));
        Ok((dst, f("total-time")?, f("downtime")?))
    }
}

/// Per metric: (name, vmm-reference samples, QEMU samples).
type Table = Vec<(&'static str, Vec<f64>, Vec<f64>)>;

const METRICS: [&str; 8] = [
    "boot: process start -> agent ready (ms)",
    "hot-add -> online in the guest (ms)",
    "hot-remove -> eject done (ms)",
    "re-add the removed CPU -> online (ms)",
    "snapshot, VM paused (ms)",
    "restore: process start -> first agent reply (ms)",
    "live migration with workload: total (ms)",
    "live migration with workload: downtime (ms)",
];

fn columns(s: &Sample) -> [Option<f64>; 8] {
    [
        s.boot,
        s.add_online,
        s.remove,
        s.readd_online,
        s.snapshot,
        s.restore,
        s.mig_total,
        s.mig_down,
    ]
}

fn main() {
    let (kernel, _) = payload();
    if !hardware_virt() || !kernel.exists() {
        println!("linux benchmark skipped: needs hardware KVM (not PVM) and ci/linux-guest.sh's payload");
        return;
    }
    let runs = env_count("LINUX_BENCH_RUNS", 5);
    let qemu = qemu_peer();
    let mut table: Table = METRICS.iter().map(|m| (*m, Vec::new(), Vec::new())).collect();
    let (mut ok, mut failures) = ([0usize; 2], [Vec::new(), Vec::new()]);
    let mut notes = [BTreeSet::new(), BTreeSet::new()];
    for run in 0..runs {
        // Each run's snapshots are removed after it: in L1 /tmp is RAM.
        let in_dir = |who: &str, f: &mut dyn FnMut(&Path) -> R<Sample>| {
            let d = work_dir(who, run)?;
            let r = f(&d);
            let _ = std::fs::remove_dir_all(&d);
            r
        };
        let (n0, n1) = notes.split_at_mut(1);
        let results = [
            in_dir("ours", &mut |d| scenario(|| Ours::boot(d), d, &mut n0[0])),
            match &qemu {
                Some(q) => in_dir("qemu", &mut |d| {
                    scenario(|| Qemu::spawn(q, d, 0, &BTreeSet::new(), &[]), d, &mut n1[0])
                }),
                None => Err("no QEMU peer".into()),
            },
        ];
        for (col, r) in results.into_iter().enumerate() {
            match r {
                Ok(s) => {
                    ok[col] += 1;
                    for (row, v) in columns(&s).into_iter().enumerate() {
                        let cell = if col == 0 {
                            &mut table[row].1
                        } else {
                            &mut table[row].2
                        };
                        cell.extend(v);
                    }
                }
                Err(e) => failures[col].push(format!("run {run}: {e}")),
            }
        }
    }
    print_table(&mut table, runs, ok, &failures, &notes, qemu.is_some());
}

fn print_table(
    table: &mut Table,
    runs: usize,
    ok: [usize; 2],
    failures: &[Vec<String>; 2],
    notes: &[BTreeSet<String>; 2],
    have_qemu: bool,
) {
    println!(
        "\nLinux guest side by side ({}; Debian cloud kernel + agent, --cpus boot=2,max=8, {MEMORY_MIB} MiB), median of each column's runs (n)",
        common::backend()
    );
    println!(
        "{:<50} {:>20} {:>20} {:>12}",
        "metric", "vmm-reference", "QEMU 7.2", "QEMU / ours"
    );
    for (name, ours, theirs) in table.iter_mut() {
        let med = |v: &mut Vec<f64>| (!v.is_empty()).then(|| pct(v, 0.5));
        let (a, b) = (med(ours), med(theirs));
        let cell = |m: Option<f64>, n: usize| m.map_or("-".to_string(), |m| format!("{m:.1} (n={n})"));
        let ratio = match (a, b) {
            (Some(a), Some(b)) if a > 0.0 => format!("{:.2}x", b / a),
            _ => "-".into(),
        };
        if let Some(a) = a {
            record_row("linux vmm-reference", name, a, ours.len());
        }
        if let Some(b) = b {
            record_row("linux QEMU 7.2", name, b, theirs.len());
        }
        println!(
            "{name:<50} {:>20} {:>20} {ratio:>12}",
            cell(a, ours.len()),
            cell(b, theirs.len())
        );
    }
    let checks = |i: usize| format!("{}/{runs}", ok[i]);
    let q = if have_qemu { checks(1) } else { "no QEMU".into() };
    println!(
        "{:<50} {:>20} {:>20}",
        "scenario checks passed (runs)",
        checks(0),
        q
    );
    for (who, i) in [("vmm-reference", 0), ("QEMU", 1)] {
        for n in &notes[i] {
            println!("note, {who}: {n}");
        }
        for f in &failures[i] {
            println!("failed, {who}: {f}");
        }
    }
}
