// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The subcommands of the `vmm-reference` binary.

pub mod ctl;
pub mod demo;
pub mod progress;
pub mod run;

use std::process::ExitCode;

/// Print `msg` as the one error line and fail.
pub fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::FAILURE
}
