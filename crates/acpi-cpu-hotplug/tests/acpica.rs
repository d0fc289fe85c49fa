// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The AML checked by ACPICA, tools nobody here wrote (Debian `acpica-tools`):
//! - `iasl -d` disassembles a DSDT holding the AML with no errors or warnings, and the
//!   disassembly recompiles with `iasl` without errors;
//! - `acpiexec` (the interpreter Linux uses) loads it and executes `\_GPE._E02` and every CPU's
//!   `_STA`, `_MAT`, `_EJ0` and `_OST` with no AML error; with seeded operation-region
//!   contents it prints exactly the Notify lines the scan must produce, and stops.
//!
//! Under CI (`CI` or `VMM_REQUIRE_TOOLS=1` set) a missing tool fails the test instead of skipping.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use acpi_cpu_hotplug::{aml::cpu_device_name, madt_cpu_entry, CpuEntry, CpuHotplugAml};
use acpi_tables::{sdt::Sdt, Aml};

fn tool(name: &str) -> bool {
    let ok = Command::new(name)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        let required =
            std::env::var_os("CI").is_some() || std::env::var("VMM_REQUIRE_TOOLS").as_deref() == Ok("1");
        assert!(
            !required,
            "{name} (Debian acpica-tools) is required here but not installed"
        );
        eprintln!("SKIP: {name} (Debian acpica-tools) is not installed");
    }
    ok
}

fn cpus(max: u32) -> Vec<CpuEntry> {
    (0..max).map(|i| CpuEntry { uid: i, apic_id: i }).collect()
}

fn dsdt(max: u32) -> Vec<u8> {
    let aml = CpuHotplugAml {
        io_base: 0x0cd8,
        cpus: cpus(max),
        boot_cpu: 0,
    };
    let mut body = Vec::new();
    aml.to_aml_bytes(&mut body);
    let mut t = Sdt::new(*b"DSDT", 36, 6, *b"RVMMRF", *b"RVMMDSDT", 1);
    t.append_slice(&body);
    t.as_slice().to_vec()
}

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("acpica-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(dir: &Path, cmd: &mut Command) -> (bool, String) {
    let out = cmd.current_dir(dir).output().expect("run tool");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn acpiexec(dir: &Path, args: &[&str], script: &str) -> String {
    let mut child = Command::new("acpiexec")
        .current_dir(dir)
        .args(args)
        .arg("DSDT.aml")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("acpiexec");
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        format!("{script}quit\n").as_bytes(),
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "acpiexec failed");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn assert_no_aml_errors(out: &str) {
    // acpiexec dispatches Notify on a thread of its own; a `quit` that comes before the
    // last one ran reports the queued notify as a leak ("ACPI Error: 1 (0x1) Outstanding
    // cache allocations", seen under load). That is acpiexec's teardown, not our AML.
    let out: String = out
        .lines()
        .filter(|l| !l.contains("Outstanding cache allocations"))
        .collect::<Vec<_>>()
        .join("\n");
    for bad in ["Exception", "Error", "Warning", "AE_"] {
        assert!(!out.contains(bad), "acpiexec reported {bad:?}:\n{out}");
    }
}

#[test]
fn iasl_disassembles_and_recompiles() {
    if !tool("iasl") {
        return;
    }
    for max in [1u32, 8, 300] {
        let dir = workdir(&format!("iasl{max}"));
        std::fs::write(dir.join("DSDT.aml"), dsdt(max)).unwrap();
        let (ok, out) = run(&dir, Command::new("iasl").arg("-d").arg("DSDT.aml"));
        assert!(ok, "iasl -d failed (max {max}):\n{out}");
        assert!(
            !out.contains("Error") && !out.contains("Warning"),
            "iasl -d (max {max}):\n{out}"
        );
        let dsl = std::fs::read_to_string(dir.join("DSDT.dsl")).unwrap();
        for must in [
            "Device (CPUS)",
            "Method (CSCN, 0, Serialized)",
            "Method (_E02, 0, NotSerialized)",
        ] {
            assert!(dsl.contains(must), "{must} missing (max {max})");
        }
        // CSCN starts its search at CPU 0 before the first command.
        let cscn = dsl.split("Method (CSCN").nth(1).unwrap_or_default();
        let head = cscn.split("While").next().unwrap_or_default();
        assert!(
            head.contains("CSEL = Zero"),
            "CSCN does not reset the selector (max {max}):\n{head}"
        );
        assert_eq!(dsl.matches("\"ACPI0007\"").count(), max as usize);
        assert_eq!(
            dsl.matches("Method (_EJ0, 1").count(),
            max as usize - 1,
            "no _EJ0 on the boot CPU"
        );
        let (ok, out) = run(&dir, Command::new("iasl").arg("DSDT.dsl"));
        assert!(
            ok && out.contains("0 Errors"),
            "recompiling the disassembly (max {max}):\n{out}"
        );
    }
}

#[test]
fn acpiexec_runs_every_method_without_aml_errors() {
    if !tool("acpiexec") {
        return;
    }
    for max in [8u32, 300] {
        let dir = workdir(&format!("exec{max}"));
        std::fs::write(dir.join("DSDT.aml"), dsdt(max)).unwrap();
        let mut script = String::from("execute \\_GPE._E02\n");
        for c in cpus(max) {
            let n = format!("\\_SB.CPUS.{}", cpu_device_name(c.uid));
            script.push_str(&format!(
                "execute {n}._STA\nexecute {n}._MAT\nexecute {n}._OST 0x103 0 (00)\n"
            ));
            if c.uid != 0 {
                script.push_str(&format!("execute {n}._EJ0 1\n"));
            }
        }
        let out = acpiexec(&dir, &[], &script);
        assert_no_aml_errors(&out);
        assert_eq!(
            out.matches("Evaluating \\_SB.CPUS.C").count() as u32,
            4 * max - 1,
            "every method ran"
        );
        // The simulated region reads 0: no CPU present, no event pending.
        assert_eq!(out.matches("[Integer] = 0000000000000000").count() as u32, max);
        for c in [0, max / 2, max - 1] {
            let mat = madt_cpu_entry(CpuEntry { uid: c, apic_id: c }, 1);
            let hex: Vec<String> = mat.iter().map(|b| format!("{b:02X}")).collect();
            assert!(
                out.contains(&hex.join(" ")),
                "_MAT of CPU {c} ({}) not found",
                hex.join(" ")
            );
        }
    }
}

#[test]
fn acpiexec_scan_notifies_seeded_events_and_terminates() {
    if !tool("acpiexec") {
        return;
    }
    let max = 8u32;
    let dir = workdir("seed");
    std::fs::write(dir.join("DSDT.aml"), dsdt(max)).unwrap();
    // Insert pending on the CPU the (simulated) device selects: Device Check on C002. The
    // simulated region does not clear the bit like the device does, so the scan repeats it,
    // and must stop after max_cpus rounds.
    std::fs::write(dir.join("ins.txt"), "\\_SB.PRES.CDAT 0x2\n\\_SB.PRES.CINS 0x1\n").unwrap();
    let out = acpiexec(&dir, &["-fi", "ins.txt"], "execute \\_GPE._E02\n");
    assert_no_aml_errors(&out);
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("Notify")).collect();
    assert_eq!(lines.len(), max as usize, "{out}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("[C002]") && l.contains("Value 0x01 (Device Check)")),
        "{lines:?}"
    );
    // Remove pending on C005: Eject Request.
    std::fs::write(dir.join("rmv.txt"), "\\_SB.PRES.CDAT 0x5\n\\_SB.PRES.CRMV 0x1\n").unwrap();
    let out = acpiexec(&dir, &["-fi", "rmv.txt"], "execute \\_GPE._E02\n");
    let lines: Vec<&str> = out.lines().filter(|l| l.contains("Notify")).collect();
    assert_eq!(lines.len(), max as usize, "{out}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("[C005]") && l.contains("Value 0x03 (Eject Request)")),
        "{lines:?}"
    );
    // All ones everywhere (a hostile device): the selected UID matches no CPU, nothing is
    // notified, and the scan still terminates.
    let out = acpiexec(&dir, &["-fv", "0xff"], "execute \\_GPE._E02\n");
    assert_no_aml_errors(&out);
    assert!(out.contains("Evaluating \\_GPE._E02"));
    assert!(!out.contains("Notify"), "{out}");
}
