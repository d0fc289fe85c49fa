// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Command-line behaviour: bad input gets one line naming the problem and a non-zero exit;
//! `acpi-tables` output is accepted by ACPICA's disassembler.

mod common;

use std::process::Command;

use common::*;

fn run_bad(args: &[&str], expect: &str) {
    // Bounded: arguments that turn out valid would start a VM that runs until killed.
    let mut child = Command::new(vmm_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run vmm-reference");
    let out = wait_child(&mut child, T);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} must fail");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {stderr:?}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        lines[0].contains(expect),
        "{args:?}: {stderr:?} does not mention {expect:?}"
    );
}

#[test]
fn bad_input_gives_one_line_errors() {
    let dir = temp_dir("badcli");
    let not_kernel = dir.join("notes.txt");
    std::fs::write(&not_kernel, "this is not a kernel\n").unwrap();
    let nk = not_kernel.to_str().unwrap();
    run_bad(
        &["run", "--kernel", "/nonexistent/vmlinuz"],
        "--kernel /nonexistent/vmlinuz",
    );
    run_bad(&["run", "--kernel", nk], "not a kernel image");
    run_bad(
        &["run", "--cpus", "boot=0,max=8"],
        "--cpus: boot must be at least 1",
    );
    run_bad(&["run", "--cpus", "boot=4,max=2"], "boot=4 is larger than max=2");
    run_bad(&["run", "--standby"], "--standby needs --api-socket");
    run_bad(&["run", "--incoming", "ftp:somewhere"], "--incoming");
    // Anyone on the network could send a TCP destination a VM: it needs the token.
    run_bad(
        &["run", "--incoming", "tcp:127.0.0.1:1"],
        "needs the migration token",
    );
    let short = dir.join("short-token");
    std::fs::write(&short, "too short\n").unwrap();
    run_bad(
        &[
            "run",
            "--incoming",
            "tcp:127.0.0.1:1",
            "--migration-token-file",
            short.to_str().unwrap(),
        ],
        "16 to 4096 bytes",
    );
    run_bad(
        &[
            "run",
            "--incoming",
            "tcp:127.0.0.1:1",
            "--migration-token-file",
            "/dev/zero",
        ],
        "not a regular file",
    );
    run_bad(
        &[
            "run",
            "--incoming",
            "unix:/tmp/x",
            "--max-incoming-memory",
            "lots",
        ],
        "--max-incoming-memory",
    );
    run_bad(
        &["run", "--restore", "/nonexistent-snapshot"],
        "restoring /nonexistent-snapshot",
    );
    run_bad(&["run", "--restore", "/x", "--cpus", "boot=1,max=2"], "--cpus");
    run_bad(&["run", "--cpus", "boot=x"], "--cpus");
    run_bad(&["run", "--memory", "lots"], "--memory");
    run_bad(&["run", "--memory", "1M"], "below the minimum");
    run_bad(&["run", "--serial", "xterm"], "--serial");
    // A FIFO nobody reads: refused at once (opening it for writing used to hang the start).
    let fifo = temp_dir("serial-fifo").join("con.fifo");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mkfifo on a NUL-terminated path that lives across the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    run_bad(
        &["run", "--serial", &format!("file={}", fifo.display())],
        "--serial",
    );
    run_bad(&["run", "--frobnicate"], "--frobnicate");
    run_bad(
        &[
            "acpi-tables",
            "--cpus",
            "boot=3,max=1",
            "--out",
            dir.to_str().unwrap(),
        ],
        "--cpus",
    );
}

#[test]
fn max_above_kvm_limit_is_refused() {
    if !kvm_or_skip("max_above_kvm_limit_is_refused") {
        return;
    }
    let limit = kvm_ioctls::Kvm::new().unwrap().get_max_vcpus();
    let max = format!("boot=1,max={}", limit + 1);
    let out = Command::new(vmm_bin())
        .args(["run", "--cpus", &max])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("exceeds KVM's limit of {limit} vCPUs")),
        "{stderr}"
    );
}

#[test]
fn a_linux_guest_with_apic_ids_above_255_is_refused() {
    if !kvm_or_skip("a_linux_guest_with_apic_ids_above_255_is_refused") {
        return;
    }
    // A bzImage header is all the check reads; max=256 (APIC ids 0-255) stays allowed.
    let dir = temp_dir("bzimage300");
    let kernel = dir.join("bzImage");
    let mut image = vec![0u8; 0x1000];
    image[0x202..0x206].copy_from_slice(b"HdrS");
    std::fs::write(&kernel, &image).unwrap();
    let run = |cpus: &str| {
        Command::new(vmm_bin())
            .args(["run", "--kernel", kernel.to_str().unwrap(), "--cpus", cpus])
            .output()
            .unwrap()
    };
    let out = run("boot=1,max=257");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("APIC ids above 255"), "{stderr}");
    let stderr = String::from_utf8_lossy(&run("boot=1,max=256").stderr).to_string();
    assert!(!stderr.contains("APIC ids above 255"), "{stderr}");
}

fn iasl_available() -> bool {
    let ok = Command::new("iasl")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("VMM_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "VMM_REQUIRE_TOOLS=1 but iasl (acpica-tools) is not installed"
        );
        eprintln!("SKIP: iasl (Debian acpica-tools) is not installed");
    }
    ok
}

#[test]
fn acpi_tables_disassemble_cleanly_with_iasl() {
    if !iasl_available() {
        return;
    }
    for cpus in ["boot=2,max=8", "boot=1,max=8", "boot=1,max=300"] {
        let dir = temp_dir(&format!("iasl-{}", cpus.replace(['=', ','], "_")));
        let out = Command::new(vmm_bin())
            .args(["acpi-tables", "--cpus", cpus, "--out"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        for sig in ["DSDT", "FACP", "APIC", "XSDT", "FACS"] {
            let dat = dir.join(format!("{sig}.dat"));
            assert!(dat.exists(), "{sig}.dat missing");
            let r = Command::new("iasl")
                .current_dir(&dir)
                .arg("-d")
                .arg(&dat)
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&r.stdout),
                String::from_utf8_lossy(&r.stderr)
            );
            assert!(r.status.success(), "iasl -d {sig}.dat failed ({cpus}):\n{text}");
            let dsl = std::fs::read_to_string(dir.join(format!("{sig}.dsl"))).expect("dsl written");
            assert!(
                !text.contains("Error") && !dsl.contains("**** ACPI"),
                "{sig} ({cpus}):\n{text}"
            );
            if sig == "APIC" {
                let n = dsl.matches("Processor Enabled : 1").count();
                let boot: usize = cpus[5..6].parse().unwrap();
                assert_eq!(n, boot, "enabled CPUs in the MADT ({cpus})");
            }
        }
        // The CPU hotplug AML is in the DSDT: one ACPI0007 device per possible CPU, the GPE.
        let dsdt = std::fs::read_to_string(dir.join("DSDT.dsl")).unwrap();
        let max: usize = cpus.rsplit('=').next().unwrap().parse().unwrap();
        assert_eq!(dsdt.matches("\"ACPI0007\"").count(), max, "{cpus}");
        assert!(dsdt.contains("Method (_E02, 0, NotSerialized)") && dsdt.contains("Device (CPUS)"));
        // The DSDT must recompile too.
        let r = Command::new("iasl")
            .current_dir(&dir)
            .arg("DSDT.dsl")
            .output()
            .unwrap();
        assert!(
            r.status.success(),
            "iasl DSDT.dsl: {}",
            String::from_utf8_lossy(&r.stdout)
        );
    }
}

/// Cloud Hypervisor's flag forms boot the test guest, and its API calls get CH's answers or
/// a refusal by name; its forms this VMM cannot honour are refused by name on the command line.
#[test]
fn cloud_hypervisor_flags_and_requests_work_or_are_refused_by_name() {
    if !kvm_or_skip("cloud_hypervisor_flags_and_requests_work_or_are_refused_by_name") {
        return;
    }
    run_bad(
        &["run", "--memory", "size=128M,hugepages=on"],
        "not supported: hugepages",
    );
    run_bad(&["run", "--api-socket", "fd=3"], "not supported: fd");
    run_bad(
        &["run", "--restore", "source_url=file:///x,prefault=on"],
        "not supported: prefault",
    );
    let dir = temp_dir("chflags");
    let (api, log) = (dir.join("api.sock"), dir.join("vmm.log"));
    let api_arg = format!("path={}", api.display());
    let log_arg = log.display().to_string();
    let args = [
        "--cpus",
        "boot=1,max=2",
        "--memory",
        "size=128M",
        "--serial",
        "null",
    ];
    let mut child = spawn_vmm(
        &[
            &args[..],
            &["--api-socket", &api_arg, "-v", "--log-file", &log_arg],
        ]
        .concat(),
    );
    let req = |m: &str, ep: &str, b: Option<&str>| {
        let (s, body) = vmm_reference::api::request(&api, m, ep, b).expect("API request");
        (
            s,
            serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default(),
        )
    };
    let deadline = std::time::Instant::now() + T;
    while vmm_reference::api::request(&api, "GET", "vmm.ping", None).is_err() {
        assert!(std::time::Instant::now() < deadline, "no API socket");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (s, ping) = req("GET", "vmm.ping", None);
    assert_eq!(
        (s, ping["pid"].as_u64()),
        (200, Some(u64::from(child.id()))),
        "{ping}"
    );
    assert!(
        ping["version"].is_string() && ping["features"].is_array(),
        "{ping}"
    );
    let (s, info) = req("GET", "vm.info", None);
    assert_eq!(s, 200);
    assert_eq!(info["state"], "Running");
    assert_eq!(
        info["config"]["cpus"],
        serde_json::json!({"boot_vcpus": 1, "max_vcpus": 2})
    );
    assert_eq!(info["config"]["memory"]["size"], 128u64 << 20);
    assert_eq!(req("PUT", "vm.pause", None).0, 204);
    assert_eq!(req("GET", "vm.info", None).1["state"], "Paused");
    assert_eq!(req("PUT", "vm.resume", None).0, 204);
    for (ep, body, says) in [
        (
            "vm.resize",
            r#"{"desired_ram": 268435456}"#,
            "not supported: desired_ram",
        ),
        (
            "vm.resize",
            r#"{"desired_balloon": 0}"#,
            "not supported: desired_balloon",
        ),
        ("vm.resize", "{}", "desired_vcpus is required"),
        (
            "vm.send-migration",
            r#"{"destination_url": "unix:/x", "local": true}"#,
            "not supported: local",
        ),
        (
            "vm.send-migration",
            r#"{"destination_url": "unix:/x", "timeout_s": 1, "timeout_ms": 1}"#,
            "not both",
        ),
    ] {
        let (s, v) = req("PUT", ep, Some(body));
        assert_eq!(s, 400, "{ep} {body}: {v}");
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains(says)),
            "{ep} {body}: {v}"
        );
    }
    assert_eq!(req("PUT", "vm.resize", Some(r#"{"desired_vcpus": 2}"#)).0, 204);
    // ch-remote's verbs and forms through `ctl`.
    let ctl = |args: &[&str]| {
        let out = Command::new(vmm_bin())
            .args([&["ctl", "--api-socket", api.to_str().unwrap()][..], args].concat())
            .output()
            .expect("ctl");
        assert!(
            out.status.success(),
            "ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(ctl(&["ping"]).contains("\"features\""));
    ctl(&["resize", "--cpus", "2"]);
    assert!(ctl(&["info"]).starts_with("Running  max 2  present 2"));
    let snap2 = dir.join("snap-ctl");
    ctl(&["snapshot", &format!("file://{}", snap2.display())]);
    assert!(
        snap2.join("state.bin").is_file(),
        "ctl snapshot file://DIR writes DIR"
    );
    let snap = dir.join("snap");
    let url = serde_json::json!({ "destination_url": format!("file://{}", snap.display()) }).to_string();
    assert_eq!(req("PUT", "vm.snapshot", Some(&url)).0, 200);
    assert_eq!(req("PUT", "vm.shutdown", None).0, 204);
    assert!(wait_child(&mut child, T).status.success());
    let text = std::fs::read_to_string(&log).expect("--log-file written");
    assert!(text.contains("the VM runs"), "-v logs at info level: {text:?}");
    // Restored the way CH users write it.
    let api2 = dir.join("api2.sock");
    let restore = format!("source_url=file://{}", snap.display());
    let mut child = spawn_vmm(&[
        "--restore",
        &restore,
        "--serial",
        "off",
        "--api-socket",
        api2.to_str().unwrap(),
    ]);
    let deadline = std::time::Instant::now() + T;
    while vmm_reference::api::request(&api2, "GET", "vm.info", None).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "no API socket after restore"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (_, body) = vmm_reference::api::request(&api2, "GET", "vm.info", None).unwrap();
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (info["state"].as_str(), info["present_vcpus"].as_u64()),
        (Some("Running"), Some(2)),
        "{info}"
    );
    assert_eq!(
        vmm_reference::api::request(&api2, "PUT", "vm.shutdown", None)
            .unwrap()
            .0,
        204
    );
    assert!(wait_child(&mut child, T).status.success());
}
