//! Test-only crate; see tests/interpreter.rs.
