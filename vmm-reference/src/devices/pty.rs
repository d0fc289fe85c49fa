// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A pseudo-terminal for `--serial pty`: the VMM holds the master, people attach to the
//! slave (`screen /dev/pts/N`). Opened with `/dev/ptmx` and two ioctls rather than glibc's
//! `posix_openpt`/`grantpt`/`ptsname`, which also stat the slave: the VM may be created on
//! an API thread, whose seccomp list is the one to keep small.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

/// Open a new pseudo-terminal: its master, non-blocking and in raw mode (bytes pass both
/// ways unchanged, as a serial line), and the path of its slave.
pub fn open() -> std::io::Result<(File, PathBuf)> {
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
        .open("/dev/ptmx")?;
    let fd = master.as_raw_fd();
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one c_int from the pointer, which lives through the call.
    if unsafe { libc::ioctl(fd, libc::TIOCSPTLCK, &unlock) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one c_uint through the pointer, which lives through the call.
    if unsafe { libc::ioctl(fd, libc::TIOCGPTN, &mut n) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    make_raw(fd)?;
    Ok((master, PathBuf::from(format!("/dev/pts/{n}"))))
}

/// Raw mode on the pair (set through the master, it applies to the slave's line discipline):
/// no echo, no line editing, no CR/LF translation.
fn make_raw(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: an all-zero termios is a valid value for tcgetattr to overwrite.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `t` is a valid termios for the call to fill.
    if unsafe { libc::tcgetattr(fd, &mut t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: cfmakeraw only changes flags in the termios it is given.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: `t` is a valid termios; tcsetattr only reads it.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn bytes_cross_the_pair_unchanged_both_ways() {
        let (mut master, path) = open().expect("a pseudo-terminal");
        assert!(path.starts_with("/dev/pts/"), "{}", path.display());
        let mut slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&path)
            .expect("the slave");
        master.write_all(b"a\r\nb\x03").unwrap();
        let mut got = [0u8; 5];
        slave.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"a\r\nb\x03", "raw: no translation, no signals");
        slave.write_all(b"status\n").unwrap();
        let mut back = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while back.len() < 7 && std::time::Instant::now() < deadline {
            let mut b = [0u8; 16];
            match master.read(&mut b) {
                Ok(n) => back.extend_from_slice(&b[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(back, b"status\n", "no echo, no CR");
    }
}
