// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Per-thread seccomp filters (seccompiler): each thread of the VMM may make only the system
//! calls its kind of work needs.
//!
//! | kind | threads | what they do |
//! |---|---|---|
//! | [`ThreadKind::Vcpu`] | `vcpuN` | `KVM_RUN` and state ioctls, device emulation, kicks |
//! | [`ThreadKind::Device`] | `console`, `console-out`, `stdin`, `irqN-resample`, `eject-worker`, `signals` | sockets and eventfds of the devices, joining ejected vCPUs |
//! | [`ThreadKind::Api`] | `api-server` and its connection threads (snapshots and migrations run there, `mig-throttle` too); the main thread once the VM runs | files, sockets, KVM, memory |
//!
//! What a filter does with any other call is the [`Mode`]: `on` (the default) makes it fail
//! with `EPERM`, so a call the list misses turns into an error the VMM reports rather than a
//! dead VM (a killed migration source loses the VM it was moving); `kill` ends the process,
//! which the test suite uses so that a missing entry cannot go unnoticed; `log` allows it and
//! writes it to the kernel log (how the lists were checked); `off` installs nothing. Threads inherit the filter of the thread that creates them.
//!
//! The lists were taken from `strace -f` of the whole end-to-end suite (boot, hotplug,
//! snapshot, restore, migration over Unix and TCP, throttling, cancelling, console input),
//! on glibc 2.36 (Debian 12) and Rust's std.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};

/// What a filter does with a call that is not on its list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The call fails with `EPERM`.
    On,
    /// The process is killed (`SIGSYS`).
    Kill,
    /// The call is allowed and logged in the kernel log (`audit: type=1326 ... comm=...
    /// syscall=N`): for finding what a list misses.
    Log,
    /// No filters.
    Off,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "on" | "true" => Ok(Mode::On),
            "kill" => Ok(Mode::Kill),
            "log" => Ok(Mode::Log),
            "off" | "false" => Ok(Mode::Off),
            _ => Err(format!("--seccomp {s:?}: on, kill, log or off")),
        }
    }
}

/// The kinds of VMM threads, each with its own list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread.
    Vcpu,
    /// A device thread (console, interrupt resampling, ejects, signals).
    Device,
    /// The API server, its connections, snapshots and migrations, and the main thread.
    Api,
}

static MODE: OnceLock<Mode> = OnceLock::new();

/// Choose the mode, once, before any thread applies a filter. A library user that never
/// calls this gets no filters.
pub fn set_mode(mode: Mode) -> Result<(), String> {
    MODE.set(mode)
        .map_err(|_| "the seccomp mode was already chosen".to_string())
}

/// Calls of every kind of thread: memory, locks, time, signals, thread exit, logging.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_read,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_prctl,
    libc::SYS_ioctl,
    // A thread created by a filtered one installs its own filter on top.
    libc::SYS_seccomp,
];

/// vCPU threads: KVM ioctls, eventfd writes (interrupts), the console's queue.
const VCPU: &[i64] = &[];

/// Device threads: their sockets, eventfds and polls; joining a vCPU thread.
const DEVICE: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_fcntl,
    libc::SYS_clone3,
    libc::SYS_clone,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_shutdown,
    // A console's socket is removed only if its path is still that socket (lstat).
    libc::SYS_statx,
    libc::SYS_newfstatat,
];

/// API threads: everything a snapshot, a restore and a migration need besides KVM.
const API: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_getsockname,
    libc::SYS_shutdown,
    libc::SYS_fcntl,
    libc::SYS_clone3,
    libc::SYS_clone,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_flock,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_getdents64,
    libc::SYS_fchmod,
    libc::SYS_chmod,
    libc::SYS_fchmodat,
    libc::SYS_getcwd,
    libc::SYS_readlink,
    libc::SYS_eventfd2,
    libc::SYS_mincore,
    libc::SYS_sysinfo,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigtimedwait,
];

fn list(kind: ThreadKind) -> &'static [i64] {
    match kind {
        ThreadKind::Vcpu => VCPU,
        ThreadKind::Device => DEVICE,
        ThreadKind::Api => API,
    }
}

/// The BPF program of `kind` in `mode` (`None` when off).
pub fn program(kind: ThreadKind, mode: Mode) -> Result<Option<BpfProgram>, String> {
    let mismatch = match mode {
        Mode::Off => return Ok(None),
        Mode::On => SeccompAction::Errno(libc::EPERM as u32),
        Mode::Kill => SeccompAction::KillProcess,
        Mode::Log => SeccompAction::Log,
    };
    let read_only = |e: seccompiler::BackendError| format!("seccomp rule: {e}");
    // glibc's malloc reads /sys/devices/system/cpu/online the first time a thread needs an
    // arena of its own (seen on console-out): every thread may open files read-only. Only
    // the API threads' list (later in the map, so it wins) opens them for writing.
    let open_read_only = SeccompRule::new(vec![SeccompCondition::new(
        2,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::O_ACCMODE as u64),
        libc::O_RDONLY as u64,
    )
    .map_err(read_only)?])
    .map_err(read_only)?;
    let rules: BTreeMap<i64, Vec<SeccompRule>> = std::iter::once((libc::SYS_openat, vec![open_read_only]))
        .chain(COMMON.iter().chain(list(kind)).map(|nr| (*nr, Vec::new())))
        .collect();
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(|e| format!("seccomp filter for {kind:?} threads: {e}"))?;
    BpfProgram::try_from(filter)
        .map(Some)
        .map_err(|e| format!("seccomp filter for {kind:?} threads: {e}"))
}

/// Install the filter of `kind` on the calling thread (nothing when the mode is off or was
/// never chosen).
pub fn apply(kind: ThreadKind) -> Result<(), String> {
    let mode = MODE.get().copied().unwrap_or(Mode::Off);
    let Some(prog) = program(kind, mode)? else {
        return Ok(());
    };
    seccompiler::apply_filter(&prog).map_err(|e| format!("installing the {kind:?} seccomp filter: {e}"))
}

/// Install the filter of `kind` on the calling thread; a failure is logged (the thread runs
/// on unfiltered rather than taking the VM down with it).
pub fn apply_or_warn(kind: ThreadKind) {
    if let Err(e) = apply(kind) {
        log::error!("{e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A filtered thread cannot start a program or trace one; what the list holds works.
    #[test]
    fn a_filtered_thread_cannot_exec_and_still_does_its_work() {
        for kind in [ThreadKind::Vcpu, ThreadKind::Device, ThreadKind::Api] {
            let t = std::thread::spawn(move || {
                let prog = program(kind, Mode::On).unwrap().unwrap();
                seccompiler::apply_filter(&prog).unwrap();
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                // SAFETY: valid NUL-terminated path and argv; on success the call does not
                // return (the test would then fail by exiting).
                let r = unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
                let exec = (r, std::io::Error::last_os_error().raw_os_error());
                // SAFETY: ptrace(PTRACE_TRACEME) with no pointers.
                let r = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
                let trace = (r, std::io::Error::last_os_error().raw_os_error());
                let v: Vec<u8> = (0..1 << 20).map(|i| i as u8).collect();
                let read = std::fs::File::open("/proc/self/status").is_ok();
                let write = std::fs::OpenOptions::new().write(true).open("/dev/null");
                (exec, trace, v.len(), read, write.map_err(|e| e.raw_os_error()))
            });
            let (exec, trace, len, read, write) = t.join().unwrap();
            assert_eq!(exec, (-1, Some(libc::EPERM)), "{kind:?}: execv");
            assert_eq!(trace, (-1, Some(libc::EPERM)), "{kind:?}: ptrace");
            assert_eq!(len, 1 << 20);
            assert!(read, "{kind:?}: a read-only open");
            match kind {
                ThreadKind::Api => assert!(write.is_ok(), "{write:?}"),
                _ => assert_eq!(
                    write.err(),
                    Some(Some(libc::EPERM)),
                    "{kind:?}: an open for writing"
                ),
            }
        }
    }

    #[test]
    fn modes_parse() {
        assert_eq!("on".parse::<Mode>(), Ok(Mode::On));
        assert_eq!("kill".parse::<Mode>(), Ok(Mode::Kill));
        assert_eq!("off".parse::<Mode>(), Ok(Mode::Off));
        assert!("maybe".parse::<Mode>().is_err());
        assert!(program(ThreadKind::Api, Mode::Off).unwrap().is_none());
    }
}
