// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! VM configuration and the parsers behind the command line. Every error names the option and
//! the problem in one line.

use std::path::PathBuf;

/// Where the guest kernel comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelSource {
    /// The built-in `test-guest` image.
    Embedded,
    /// A Linux bzImage or an ELF kernel (vmlinux, test-guest) on disk.
    Path(PathBuf),
}

/// Boot and maximum vCPU counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuConfig {
    /// vCPUs present at boot.
    pub boot: u32,
    /// Possible vCPUs (present + hot-pluggable).
    pub max: u32,
}

/// Where the guest's COM1 goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialMode {
    /// Output to stdout, input from stdin.
    Stdout,
    /// Output appended to a file, no input.
    File(PathBuf),
    /// A Unix stream socket the VMM listens on; the connected client is the console.
    Socket(PathBuf),
    /// A new pseudo-terminal; people attach to its slave (`vm.info` `config.serial.file`).
    Pty,
    /// COM1 exists, its output is discarded and it gets no input (Cloud Hypervisor's `null`
    /// and `off`: a guest that probes for COM1 still finds it).
    Null,
}

/// Everything needed to build a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image.
    pub kernel: KernelSource,
    /// Optional initramfs (Linux only).
    pub initramfs: Option<PathBuf>,
    /// Kernel command line (Linux only; a default is used when absent).
    pub cmdline: Option<String>,
    /// vCPU counts.
    pub cpus: CpuConfig,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Serial console.
    pub serial: SerialMode,
}

/// Smallest guest RAM accepted (the test guest's image, stacks and tables need ~10 MiB).
pub const MIN_MEMORY: u64 = 32 << 20;
/// Largest guest RAM accepted.
pub const MAX_MEMORY: u64 = 64 << 30;

/// Configuration errors.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// `--cpus` did not parse or is inconsistent.
    #[error("--cpus: {0}")]
    Cpus(String),
    /// `--memory` did not parse or is out of range.
    #[error("--memory: {0}")]
    Memory(String),
    /// `--serial` did not parse.
    #[error("--serial: {0}")]
    Serial(String),
    /// `--kernel` cannot be used.
    #[error("--kernel {path}: {reason}")]
    Kernel {
        /// The path given.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `--initramfs` cannot be used.
    #[error("--initramfs {path}: {reason}")]
    Initramfs {
        /// The path given.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn parse_count(what: &str, v: &str) -> Result<u32, ConfigError> {
    v.trim()
        .parse::<u32>()
        .map_err(|_| ConfigError::Cpus(format!("{what}={v:?} is not a number")))
}

/// Parse `boot=N,max=M` (or `boot=N`, meaning max = N, or a bare `N`).
pub fn parse_cpus(s: &str) -> Result<CpuConfig, ConfigError> {
    let mut boot = None;
    let mut max = None;
    if !s.contains('=') {
        let n = parse_count("boot", s)?;
        boot = Some(n);
        max = Some(n);
    } else {
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("boot", v)) => boot = Some(parse_count("boot", v)?),
                Some(("max", v)) => max = Some(parse_count("max", v)?),
                _ => {
                    return Err(ConfigError::Cpus(format!(
                        "unknown item {part:?} (expected boot=N,max=M)"
                    )))
                }
            }
        }
    }
    let boot = boot.ok_or_else(|| ConfigError::Cpus("boot=N is required".into()))?;
    let max = max.unwrap_or(boot);
    if boot == 0 {
        return Err(ConfigError::Cpus("boot must be at least 1".into()));
    }
    if boot > max {
        return Err(ConfigError::Cpus(format!("boot={boot} is larger than max={max}")));
    }
    Ok(CpuConfig { boot, max })
}

/// Split Cloud Hypervisor's `key=value,key=value` form; `None` when `s` is the bare form
/// (no `=`, or a path: what comes before the first `=` has a `/`).
fn ch_pairs(s: &str) -> Option<Vec<(&str, &str)>> {
    match s.split_once('=') {
        Some((key, _)) if !key.contains('/') => {}
        _ => return None,
    }
    Some(
        s.split(',')
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
            .collect(),
    )
}

/// `--memory` as Cloud Hypervisor writes it (`size=256M`; other keys are refused by name)
/// or bare (`256M`).
pub fn parse_memory_option(s: &str) -> Result<u64, ConfigError> {
    let Some(pairs) = ch_pairs(s) else {
        return parse_memory(s);
    };
    let mut size = None;
    for (k, v) in pairs {
        match k {
            "size" => size = Some(parse_memory(v)?),
            other => return Err(ConfigError::Memory(format!("not supported: {other}"))),
        }
    }
    size.ok_or_else(|| ConfigError::Memory(format!("{s:?} has no size=")))
}

/// Parse a size such as `256M`, `1G`, `512MiB`, `1048576` (bytes) into bytes.
pub fn parse_memory(s: &str) -> Result<u64, ConfigError> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| ConfigError::Memory(format!("{s:?} is not a size (e.g. 256M, 1G)")))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(ConfigError::Memory(format!("unknown unit {unit:?} in {s:?}"))),
    };
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| ConfigError::Memory(format!("{s:?} is too large")))?;
    if bytes < MIN_MEMORY {
        return Err(ConfigError::Memory(format!("{s:?} is below the minimum of 32M")));
    }
    if bytes > MAX_MEMORY {
        return Err(ConfigError::Memory(format!("{s:?} is above the maximum of 64G")));
    }
    if bytes % 4096 != 0 {
        return Err(ConfigError::Memory(format!("{s:?} is not a multiple of 4 KiB")));
    }
    Ok(bytes)
}

/// Parse `--serial`: `stdout` or Cloud Hypervisor's `tty` (this terminal), `null` or `off`
/// (discarded), `file=PATH`, `socket=PATH`, `pty`.
pub fn parse_serial(s: &str) -> Result<SerialMode, ConfigError> {
    match s.split_once('=') {
        None if s == "stdout" || s == "tty" => Ok(SerialMode::Stdout),
        None if s == "null" || s == "off" => Ok(SerialMode::Null),
        None if s == "pty" => Ok(SerialMode::Pty),
        Some(("file", p)) if !p.is_empty() => Ok(SerialMode::File(p.into())),
        Some(("socket", p)) if !p.is_empty() => Ok(SerialMode::Socket(p.into())),
        _ => Err(ConfigError::Serial(format!(
            "{s:?} is not one of tty, stdout, null, off, pty, file=PATH, socket=PATH"
        ))),
    }
}

/// A path option in Cloud Hypervisor's form (`path=PATH`, for `--api-socket`) or bare.
/// `fd=N` and other keys are refused by name.
pub fn parse_path_option(option: &str, key: &str, s: &str) -> Result<PathBuf, String> {
    match s.split_once('=').filter(|(k, _)| !k.contains('/')) {
        None if !s.is_empty() => Ok(s.into()),
        Some((k, p)) if k == key && !p.is_empty() && !p.contains(',') => Ok(p.into()),
        Some((k, _)) if k != key => Err(format!("{option}: not supported: {k}")),
        _ => Err(format!("{option}: {s:?} is not PATH or {key}=PATH")),
    }
}

/// `--restore` as Cloud Hypervisor writes it (`source_url=file:///DIR`) or bare (`DIR`, or
/// `file:///DIR`). `prefault=off` is accepted; `prefault=on` and other keys are refused.
pub fn parse_restore_option(s: &str) -> Result<PathBuf, String> {
    let strip = |u: &str| PathBuf::from(u.strip_prefix("file://").unwrap_or(u));
    let Some(pairs) = ch_pairs(s).filter(|_| !s.starts_with('/') && !s.starts_with("file:")) else {
        return Ok(strip(s));
    };
    let mut dir = None;
    for (k, v) in pairs {
        match (k, v) {
            ("source_url", "") => return Err("--restore: source_url= is empty".into()),
            ("source_url", u) => dir = Some(strip(u)),
            ("prefault", "off" | "false") => {}
            (other, _) => return Err(format!("--restore: not supported: {other}")),
        }
    }
    dir.ok_or_else(|| format!("--restore: {s:?} has no source_url="))
}

/// Check that a kernel file exists and looks like a kernel (ELF or bzImage) before building
/// anything, so the error names the file and the problem.
pub fn check_kernel_file(path: &std::path::Path) -> Result<(), ConfigError> {
    use std::io::Read;
    let err = |reason: String| ConfigError::Kernel {
        path: path.display().to_string(),
        reason,
    };
    let mut f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut head = vec![0u8; 0x210];
    let n = f.read(&mut head).map_err(|e| err(e.to_string()))?;
    head.truncate(n);
    let is_elf = head.starts_with(b"\x7fELF");
    let is_bzimage = head.get(0x202..0x206) == Some(b"HdrS");
    if !is_elf && !is_bzimage {
        return Err(err("not a kernel image (neither ELF nor bzImage)".into()));
    }
    if is_elf && head.get(4) != Some(&2) {
        return Err(err("ELF kernel is not 64-bit".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("boot=2,max=8"), Ok(CpuConfig { boot: 2, max: 8 }));
        assert_eq!(parse_cpus("4"), Ok(CpuConfig { boot: 4, max: 4 }));
        assert_eq!(parse_cpus("boot=3"), Ok(CpuConfig { boot: 3, max: 3 }));
        assert!(matches!(parse_cpus("boot=0,max=8"), Err(ConfigError::Cpus(m)) if m.contains("at least 1")));
        assert!(matches!(parse_cpus("boot=9,max=8"), Err(ConfigError::Cpus(m)) if m.contains("larger")));
        assert!(parse_cpus("boot=x").is_err());
        assert!(parse_cpus("cores=2").is_err());
        assert!(parse_cpus("max=2").is_err());
    }

    #[test]
    fn memory() {
        assert_eq!(parse_memory("256M"), Ok(256 << 20));
        assert_eq!(parse_memory("1G"), Ok(1 << 30));
        assert_eq!(parse_memory("512MiB"), Ok(512 << 20));
        assert_eq!(parse_memory("33554432"), Ok(32 << 20));
        for bad in [
            "",
            "abc",
            "12X",
            "1M",
            "100T",
            "99999999999999999999G",
            "33554433",
        ] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cloud_hypervisor_forms() {
        assert_eq!(parse_memory_option("size=256M"), Ok(256 << 20));
        assert_eq!(parse_memory_option("256M"), Ok(256 << 20));
        assert_eq!(
            parse_memory_option("size=256M,hugepages=on"),
            Err(ConfigError::Memory("not supported: hugepages".into()))
        );
        assert!(parse_memory_option("shared=on").is_err());
        assert_eq!(
            parse_path_option("--api-socket", "path", "path=/tmp/a"),
            Ok("/tmp/a".into())
        );
        assert_eq!(
            parse_path_option("--api-socket", "path", "/tmp/a"),
            Ok("/tmp/a".into())
        );
        assert_eq!(
            parse_path_option("--api-socket", "path", "fd=3"),
            Err("--api-socket: not supported: fd".into())
        );
        assert!(parse_path_option("--api-socket", "path", "path=").is_err());
        assert_eq!(parse_restore_option("source_url=file:///s/d"), Ok("/s/d".into()));
        assert_eq!(
            parse_restore_option("source_url=file:///s/d,prefault=off"),
            Ok("/s/d".into())
        );
        assert_eq!(parse_restore_option("/s/d"), Ok("/s/d".into()));
        assert_eq!(parse_restore_option("file:///s/d"), Ok("/s/d".into()));
        assert_eq!(parse_restore_option("rel/dir"), Ok("rel/dir".into()));
        assert_eq!(parse_restore_option("snaps/vm=1"), Ok("snaps/vm=1".into()));
        assert_eq!(
            parse_path_option("--api-socket", "path", "/run/vm=1/api.sock"),
            Ok("/run/vm=1/api.sock".into())
        );
        assert_eq!(
            parse_restore_option("source_url="),
            Err("--restore: source_url= is empty".into())
        );
        assert_eq!(
            parse_restore_option("source_url=file:///s,prefault=on"),
            Err("--restore: not supported: prefault".into())
        );
        assert_eq!(parse_serial("tty"), Ok(SerialMode::Stdout));
        assert_eq!(parse_serial("off"), Ok(SerialMode::Null));
        assert_eq!(parse_serial("null"), Ok(SerialMode::Null));
        assert_eq!(parse_serial("pty"), Ok(SerialMode::Pty));
    }

    #[test]
    fn serial() {
        assert_eq!(parse_serial("stdout"), Ok(SerialMode::Stdout));
        assert_eq!(parse_serial("file=/tmp/x"), Ok(SerialMode::File("/tmp/x".into())));
        assert_eq!(
            parse_serial("socket=/tmp/s"),
            Ok(SerialMode::Socket("/tmp/s".into()))
        );
        assert!(parse_serial("xterm").is_err());
        assert!(parse_serial("file=").is_err());
    }

    #[test]
    fn messages_are_one_line() {
        let e = parse_cpus("boot=0").unwrap_err().to_string();
        assert!(!e.contains('\n') && e.starts_with("--cpus"));
    }
}
