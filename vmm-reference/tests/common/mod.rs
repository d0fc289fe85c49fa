// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
                let _ = writeln!(f, "{test}");
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
