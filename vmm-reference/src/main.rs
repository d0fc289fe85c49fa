// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vmm-reference` command line: `run`, `ctl`, `acpi-tables`, `demo` (the subcommands live
//! in `cli/`).

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vmm_reference::acpi::{self, AcpiConfig};
use vmm_reference::config::parse_cpus;

use cli::fail;

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
    Run(cli::run::RunArgs),
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
        op: cli::ctl::CtlOp,
    },
}

fn main() -> ExitCode {
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
    // `run` sets up its own log (-v, --log-file); the other commands log warnings.
    if !matches!(cli.cmd, Cmd::Run(_)) {
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    }
    match cli.cmd {
        Cmd::Run(args) => cli::run::run_command(args),
        Cmd::Ctl { api_socket, op } => cli::ctl::ctl(&api_socket, op),
        Cmd::AcpiTables { cpus, out } => acpi_tables(&cpus, &out),
        Cmd::Demo => cli::demo::demo(),
    }
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
