// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A QMP client for the QEMU columns of the benchmarks: one command at a time; events that
//! arrive while a command waits for its reply are kept for [`Qmp::event`].

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A QMP connection in command mode.
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
    events: VecDeque<Value>,
}

impl Qmp {
    /// Connect (retrying until the socket exists or `timeout` passes), read the greeting and
    /// enter command mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let s = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(format!("QMP: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        let mut q = Qmp {
            r: BufReader::new(s.try_clone().map_err(|e| e.to_string())?),
            w: s,
            events: VecDeque::new(),
        };
        q.line()?; // greeting
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn line(&mut self) -> Result<Value, String> {
        let mut l = String::new();
        match self.r.read_line(&mut l) {
            Ok(0) => Err("QMP closed".into()),
            Ok(_) => serde_json::from_str(&l).map_err(|e| format!("QMP {l:?}: {e}")),
            Err(e) => Err(format!("QMP: {e}")),
        }
    }

    /// Run `command` with `arguments`; its `return` value, or its error as text.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let c = json!({ "execute": command, "arguments": arguments });
        writeln!(self.w, "{c}").map_err(|e| format!("QMP {command}: {e}"))?;
        loop {
            let v = self.line()?;
            if let Some(e) = v.get("error") {
                return Err(format!("QMP {command}: {}", e["desc"]));
            }
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if v.get("event").is_some() {
                self.events.push_back(v);
            }
        }
    }

    /// Wait for event `name` (one that already arrived counts), at most `timeout`.
    pub fn event(&mut self, name: &str, timeout: Duration) -> Result<Value, String> {
        if let Some(i) = self.events.iter().position(|e| e["event"] == name) {
            return self.events.remove(i).ok_or_else(|| "QMP event queue".into());
        }
        let deadline = Instant::now() + timeout;
        loop {
            if Instant::now() > deadline {
                return Err(format!("QMP: no {name} event in {timeout:?}"));
            }
            let v = self.line()?;
            if v["event"] == name {
                return Ok(v);
            }
            if v.get("event").is_some() {
                self.events.push_back(v);
            }
        }
    }
}
