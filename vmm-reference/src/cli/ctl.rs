// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vmm-reference ctl`: the API's operations from the command line, and `vm.info` as a table.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Subcommand;

use vm_live_migration::protocol::PrecopyOptions;

use super::fail;

#[derive(Subcommand)]
pub enum CtlOp {
    /// Per-CPU state (table, or the API's JSON with --json).
    Info {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make N CPUs present (`resize N`, or ch-remote's `resize --cpus N`).
    Resize {
        /// Desired number of present CPUs.
        #[arg(required_unless_present = "cpus", conflicts_with = "cpus")]
        n: Option<u32>,
        /// Desired number of present CPUs (ch-remote's spelling).
        #[arg(long)]
        cpus: Option<u32>,
    },
    /// The VMM's version, pid and features (ch-remote's `ping`).
    Ping,
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
    /// Save the VM into DIR (state.bin + the memory image it names, memory-<id>.bin); it runs on afterwards.
    Snapshot {
        /// Snapshot directory (created if missing): DIR or file://DIR.
        dir: String,
    },
    /// Standby VMM (`run --standby`): restore the VM saved in DIR.
    Restore {
        /// Snapshot directory: DIR, file://DIR, or source_url=file://DIR.
        dir: String,
    },
    /// Standby VMM: wait for a live migration on ADDR (returns once the VM runs here).
    ReceiveMigration {
        /// unix:PATH or tcp:HOST:PORT to listen on.
        receiver: String,
        /// File with the token the source must prove it has (tcp:).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Give up if no source connects within this many milliseconds (default: wait
        /// until `ctl cancel-migration`).
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
    /// Live-migrate the VM to a VMM started with `run --incoming ADDR` (or a standby VMM
    /// doing `ctl receive-migration ADDR`). Also ch-remote's `send-migration URL`. Shows
    /// rounds, bytes, dirty rate and expected downtime on stderr as it goes (a bar on a
    /// terminal, a line per round otherwise); the report comes on stdout.
    #[command(alias = "send-migration")]
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

/// Put the token of `file` into a request body as `"token"`.
fn add_token(body: &mut serde_json::Value, file: Option<&std::path::Path>) -> Result<(), String> {
    if let Some(f) = file {
        body["token"] = vmm_reference::migration::token_from_file(f)?.into();
    }
    Ok(())
}

/// A request: method, endpoint, body.
type Call = (&'static str, &'static str, Option<String>);

/// The API call `op` stands for.
fn call_of(op: &CtlOp) -> Result<Call, String> {
    Ok(match op {
        CtlOp::Info { .. } => ("GET", "vm.info", None),
        CtlOp::Resize { n, cpus } => {
            let n = n.or(*cpus).unwrap_or_default();
            ("PUT", "vm.resize", Some(format!("{{\"desired_vcpus\":{n}}}")))
        }
        CtlOp::Ping => ("GET", "vmm.ping", None),
        CtlOp::AddCpu { id } => ("PUT", "vm.add-cpu", id.map(|i| format!("{{\"id\":{i}}}"))),
        CtlOp::RemoveCpu { id } => ("PUT", "vm.remove-cpu", Some(format!("{{\"id\":{id}}}"))),
        CtlOp::CancelRemoval { id } => ("PUT", "vm.cancel-removal", Some(format!("{{\"id\":{id}}}"))),
        CtlOp::Pause => ("PUT", "vm.pause", None),
        CtlOp::Resume => ("PUT", "vm.resume", None),
        CtlOp::Shutdown => ("PUT", "vm.shutdown", None),
        CtlOp::Snapshot { dir } | CtlOp::Restore { dir } => {
            // The VMM resolves paths against its own working directory: send an absolute one.
            let dir = vmm_reference::config::parse_restore_option(dir)?;
            let url = match std::path::absolute(&dir) {
                Ok(d) => format!("file://{}", d.display()),
                Err(e) => return Err(format!("{}: {e}", dir.display())),
            };
            let (endpoint, key) = match op {
                CtlOp::Snapshot { .. } => ("vm.snapshot", "destination_url"),
                _ => ("vm.restore", "source_url"),
            };
            ("PUT", endpoint, Some(serde_json::json!({ key: url }).to_string()))
        }
        CtlOp::ReceiveMigration {
            receiver,
            token_file,
            timeout_ms,
        } => {
            let mut b = serde_json::json!({ "receiver_url": receiver, "timeout_ms": timeout_ms });
            add_token(&mut b, token_file.as_deref())?;
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
            add_token(&mut b, token_file.as_deref())?;
            ("PUT", "vm.send-migration", Some(b.to_string()))
        }
        CtlOp::CancelMigration => ("PUT", "vm.cancel-migration", None),
    })
}

pub fn ctl(sock: &std::path::Path, op: CtlOp) -> ExitCode {
    let (method, endpoint, body) = match call_of(&op) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let progress = match &op {
        CtlOp::Migrate { max_rounds, .. } => {
            let done = Arc::new(AtomicBool::new(false));
            let max = max_rounds.unwrap_or_else(|| PrecopyOptions::default().max_rounds);
            Some((
                super::progress::watch(sock.to_path_buf(), max, done.clone()),
                done,
            ))
        }
        _ => None,
    };
    // A migration answers when it ends: within its deadline (timeout_ms, default 600 s),
    // plus a margin for the VMM to say so. A receive first waits for its source (at most a
    // day unless told), then 660 s: a source's default 600 s deadline and a margin.
    let wait = match &op {
        CtlOp::Migrate { timeout_ms, .. } => {
            Duration::from_millis(timeout_ms.unwrap_or(600_000).min(u64::from(u32::MAX) * 1000))
                + Duration::from_secs(60)
        }
        CtlOp::ReceiveMigration { timeout_ms, .. } => {
            let most = vmm_reference::api::MAX_RECEIVE_WAIT_MS;
            Duration::from_millis(timeout_ms.unwrap_or(most).min(most)) + Duration::from_secs(660)
        }
        _ => Duration::from_secs(300),
    };
    let answer = vmm_reference::api::request_within(sock, method, endpoint, body.as_deref(), wait);
    if let Some((watcher, done)) = progress {
        done.store(true, Ordering::SeqCst);
        let _ = watcher.join();
    }
    let (status, body) = match answer {
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
        CtlOp::Migrate { .. } => {
            if let Ok(report) = serde_json::from_str::<serde_json::Value>(&body) {
                eprintln!("{}", super::progress::summary(&report));
            }
            println!("{body}");
        }
        _ if !body.is_empty() => println!("{body}"),
        _ => {}
    }
    ExitCode::SUCCESS
}

/// `vm.info` as a table for people.
pub fn info_table(v: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let mut out = format!(
        "{}  max {}  present {}  paused {}  pending removals {}  refused ejects {}  parked fds {}  reused fds {}\n",
        s(&v["state"]),
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
        "{:>9} {:>9} {:>7} {:>8} {:>13} {:>6} {:>6} {:>9} {:>8}\n",
        "cpu", "apic_id", "present", "vcpu", "mp_state", "apic", "apicSW", "pending", "ost"
    ));
    // Consecutive CPUs in the same state share a line ("3-299 ... absent"), so the table
    // stays readable with hundreds of possible CPUs.
    let rows: Vec<(String, String, String)> = v["cpus"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| (s(&c["id"]), s(&c["apic_id"]), cpu_row(c, &s)))
        .collect();
    let mut i = 0;
    while i < rows.len() {
        let mut j = i;
        while j + 1 < rows.len() && rows[j + 1].2 == rows[i].2 {
            j += 1;
        }
        let span = |a: &str, b: &str| if a == b { a.to_string() } else { format!("{a}-{b}") };
        out.push_str(&format!(
            "{:>9} {:>9} {}\n",
            span(&rows[i].0, &rows[j].0),
            span(&rows[i].1, &rows[j].1),
            rows[i].2
        ));
        i = j + 1;
    }
    out
}

/// One CPU's columns after its id and APIC id.
fn cpu_row(c: &serde_json::Value, s: &dyn Fn(&serde_json::Value) -> String) -> String {
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
    format!(
        "{:>7} {:>8} {:>13} {:>6} {:>6} {:>9} {:>8}",
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
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At 300 possible CPUs the table shows state runs, not 300 lines.
    #[test]
    fn the_info_table_groups_cpus_in_the_same_state() {
        let cpu = |id: u32, present: bool| {
            serde_json::json!({"id": id, "apic_id": id, "present": present,
                "vcpu": if present { "running" } else { "absent" },
                "mp_state": if present { "HALTED" } else { "" }, "apic_mode": null,
                "apic_sw_enabled": null, "inserting": false, "removing": false,
                "remove_requested": false, "ost_event": 0, "ost_status": 0})
        };
        let cpus: Vec<_> = (0..300).map(|i| cpu(i, i < 2 || i == 150)).collect();
        let t = info_table(&serde_json::json!({"state": "Running", "max_vcpus": 300, "cpus": cpus}));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2 + 4, "{t}");
        assert!(lines[2].trim_start().starts_with("0-1 "), "{t}");
        assert!(lines[3].trim_start().starts_with("2-149 "), "{t}");
        assert!(lines[4].trim_start().starts_with("150 "), "{t}");
        assert!(lines[5].trim_start().starts_with("151-299 "), "{t}");
    }
}
