// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! REST API over a Unix socket, shaped like Cloud Hypervisor's (`curl --unix-socket` works):
//!
//! | request | body | answer |
//! |---|---|---|
//! | `GET /api/v1/vmm.ping` | | 200 `{"build_version", "version", "pid", "features"}` (also before a VM exists) |
//! | `GET /api/v1/vm.info` | | 200, [`crate::status::VmInfo`] as JSON (`state`, `config` in Cloud Hypervisor's names); 429 while a snapshot or migration holds the vCPUs |
//! | `PUT /api/v1/vm.resize` | `{"desired_vcpus": N}` (`desired_ram`, `desired_balloon`: 400 "not supported: FIELD") | 204; 429 while a removal is pending; 400 out of range |
//! | `PUT /api/v1/vm.add-cpu` | optional `{"id": N}` | 200 `{"id": N}` (lowest absent CPU without a body) |
//! | `PUT /api/v1/vm.remove-cpu` | `{"id": N}` | 204; 400 for CPU 0 or an absent CPU; 429 while the guest has not taken the event yet (a removal the guest refused, or took and never finished, is raised again) |
//! | `PUT /api/v1/vm.cancel-removal` | `{"id": N}` | 204 at any stage before the eject (a late eject from the guest is then refused and the CPU announced again); 400 if no removal of N is pending; 429 while an eject is completed |
//! | `PUT /api/v1/vm.pause`, `vm.resume`, `vm.shutdown` | | 204 (429 during a snapshot or migration; `vm.pause` also when a vCPU did not stop within `VCPU_TIMEOUT`, as do `vm.snapshot` and `vm.send-migration`: the VM runs on) |
//! | `PUT /api/v1/vm.snapshot` | `{"destination_url": "file:///DIR"}` (or a plain path) | 200 `{"state_bytes": N, "paused_ms": T}`; 400 for a destination that cannot be made or opened (missing, not a directory, no permission, read-only, exists as a file), 429 while another snapshot writes into it or when a vCPU did not stop in time, 500 otherwise (a full disk among it); the VM runs on in every case |
//! | `PUT /api/v1/vm.restore` | `{"source_url": "file:///DIR"}` (`prefault: true`, `net_fds`: 400 "not supported: FIELD") | 204 (standby VMM only: `run --standby`) |
//! | `PUT /api/v1/vm.receive-migration` | `{"receiver_url": "unix:PATH"\|"tcp:HOST:PORT", "token": "...", "timeout_ms": N}` (`token` required for `tcp:`; `timeout_ms`: how long to wait for the source to connect, default until cancelled) | 204 once the migrated VM runs (standby VMM only); 400 if it failed, timed out or was cancelled, and the standby can be used again; 500 if the VM arrived but the source's Complete never came (it waits paused: `vm.resume`) |
//! | `PUT /api/v1/vm.send-migration` | `{"destination_url": "unix:PATH"\|"tcp:HOST:PORT", "downtime_ms": 300, "max_rounds": 30, "timeout_ms": 600000` or Cloud Hypervisor's `"timeout_s": 600, "timeout_strategy": "ignore"\|"cancel"\|"throttle", "token": "..."}` (`token` required for `tcp:`; `local: true`: 400 "not supported: local") | 200, the migration report; this VMM then exits 0 |
//! | `PUT /api/v1/vm.cancel-migration` | | 204: the outgoing migration ends and the VM runs on here, or (standby VMM) the incoming one stops at its next step before the restore (waiting for the source, after its Hello, between memory frames); 400 if none is in progress, it is past the destination's Ack, or the received VM is being restored |
//! | `GET /api/v1/vm.migration-status` | | 200, the current or last migration ([`crate::status::MigrationStatus`], `wire_bytes` live); answers while the migration holds the vCPUs; 400 if none has run |
//!
//! Errors come back as `{"error": "..."}`. A malformed request gets a 4xx and the VM keeps
//! running. The server is small on purpose: httparse parses, one request per connection, the
//! head capped at 8 KiB and 64 headers, bodies at 64 KiB, one 10 s deadline per request, at
//! most 32 connections at once (more get 503).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;

use crate::config::SerialMode;
use crate::error::ControlError;
use crate::vm::{Vm, VmInner};

const MAX_BODY: usize = 64 * 1024;
const MAX_HEADER_LINES: usize = 64;

/// A parsed request.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Body.
    pub body: Vec<u8>,
}

/// A response.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// JSON body (may be empty).
    pub body: String,
    /// The `Allow` header of a 405: the one method the endpoint answers.
    pub allow: Option<&'static str>,
}

impl Response {
    fn json(status: u16, v: &impl serde::Serialize) -> Response {
        Response {
            status,
            body: serde_json::to_string(v).unwrap_or_else(|_| "{}".into()),
            allow: None,
        }
    }
    fn error(status: u16, msg: impl std::fmt::Display) -> Response {
        Response::json(status, &serde_json::json!({ "error": msg.to_string() }))
    }
    fn empty() -> Response {
        Response {
            status: 204,
            body: String::new(),
            allow: None,
        }
    }
}

/// Every endpoint under `/api/v1/` and the one method it answers. The 405 answers' `Allow`
/// header comes from here, and a test checks that `api/openapi.yaml` describes exactly these.
pub const ENDPOINTS: &[(&str, &str)] = &[
    ("vmm.ping", "GET"),
    ("vm.info", "GET"),
    ("vm.resize", "PUT"),
    ("vm.add-cpu", "PUT"),
    ("vm.remove-cpu", "PUT"),
    ("vm.cancel-removal", "PUT"),
    ("vm.pause", "PUT"),
    ("vm.resume", "PUT"),
    ("vm.shutdown", "PUT"),
    ("vm.snapshot", "PUT"),
    ("vm.restore", "PUT"),
    ("vm.receive-migration", "PUT"),
    ("vm.send-migration", "PUT"),
    ("vm.cancel-migration", "PUT"),
    ("vm.migration-status", "GET"),
];

/// The endpoint `path` names, if `method` is the one it answers: 404 for no endpoint, 405
/// (with `Allow`) for another method.
fn endpoint<'a>(path: &'a str, method: &str) -> Result<&'a str, Response> {
    let op = path.strip_prefix("/api/v1/").unwrap_or("");
    match ENDPOINTS.iter().find(|(name, _)| *name == op) {
        None => Err(Response::error(404, format!("no such endpoint {path}"))),
        Some((_, m)) if method.eq_ignore_ascii_case(m) => Ok(op),
        Some((_, m)) => Err(Response {
            allow: Some(m),
            ..Response::error(405, format!("{method} not allowed on {op}: {m} only"))
        }),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// Largest request line plus headers accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its whole request.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Connections served at once; more are answered 503 at once.
const MAX_CONNECTIONS: usize = 32;

fn read_err(what: &str, e: std::io::Error) -> Response {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            Response::error(408, format!("{what}: the request did not arrive in time"))
        }
        _ => Response::error(400, format!("{what}: {e}")),
    }
}

/// The method, path and body length of a complete request head (parsed by httparse).
fn parse_head(head: &[u8]) -> Result<(String, String, usize), Response> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADER_LINES];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head)
        .map_err(|e| Response::error(400, format!("malformed request: {e}")))?;
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return Err(Response::error(400, "malformed request line"));
    };
    let mut len = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Response::error(400, "only Content-Length bodies are supported"));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| Response::error(400, "bad Content-Length"))?;
            if len > MAX_BODY {
                return Err(Response::error(413, "body too large"));
            }
        }
    }
    Ok((method.to_string(), path.to_string(), len))
}

/// Read one HTTP/1.1 request: a head of at most 8 KiB and 64 header lines (httparse, a
/// well-kept parser, rather than our own), a `Content-Length` body of at most 64 KiB.
/// Nothing is allocated beyond those bounds, whatever the client sends.
pub fn read_request(stream: &mut impl Read) -> Result<Request, Response> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_len = loop {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADER_LINES];
        match httparse::Request::new(&mut headers).parse(&buf) {
            Ok(httparse::Status::Complete(n)) => break n,
            Ok(httparse::Status::Partial) => {}
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Response::error(431, "more than 64 header lines"))
            }
            Err(e) => return Err(Response::error(400, format!("malformed request: {e}"))),
        }
        if buf.len() >= MAX_HEAD {
            return Err(Response::error(431, "request head larger than 8 KiB"));
        }
        let room = (MAX_HEAD - buf.len()).min(chunk.len());
        let n = stream
            .read(&mut chunk[..room])
            .map_err(|e| read_err("reading the request", e))?;
        if n == 0 {
            return Err(Response::error(400, "the connection closed mid-request"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let (method, path, len) = parse_head(&buf[..head_len])?;
    let mut body: Vec<u8> = buf[head_len..].iter().copied().take(len).collect();
    let have = body.len();
    body.resize(len, 0);
    stream
        .read_exact(&mut body[have..])
        .map_err(|e| read_err("reading the body", e))?;
    Ok(Request { method, path, body })
}

/// A stream whose reads share one deadline (a per-read timeout would let a client that
/// sends a byte at a time hold its connection forever).
struct Deadline<'a> {
    stream: &'a UnixStream,
    until: std::time::Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        (&mut &*self.stream).read(buf)
    }
}

fn control(e: ControlError) -> Response {
    match e {
        ControlError::BadRequest(m) => Response::error(400, m),
        ControlError::Busy(m) => Response::error(429, m),
        ControlError::Internal(m) => Response::error(500, m),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    desired_vcpus: Option<u32>,
    /// Cloud Hypervisor's memory and balloon resize: no memory hotplug here.
    desired_ram: Option<u64>,
    desired_balloon: Option<u64>,
}

impl Resize {
    /// The CPU count asked for; Cloud Hypervisor's fields this VMM has no meaning for are
    /// refused by name.
    fn vcpus(&self) -> Result<u32, Response> {
        not_supported("desired_ram", self.desired_ram.is_some())?;
        not_supported("desired_balloon", self.desired_balloon.is_some())?;
        self.desired_vcpus
            .ok_or_else(|| Response::error(400, "desired_vcpus is required"))
    }
}

/// 400 "not supported: FIELD" when a Cloud Hypervisor field this VMM cannot honour is used.
fn not_supported(field: &str, used: bool) -> Result<(), Response> {
    match used {
        true => Err(Response::error(400, format!("not supported: {field}"))),
        false => Ok(()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CpuId {
    id: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotReq {
    destination_url: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendMigration {
    destination_url: String,
    #[serde(default)]
    downtime_ms: Option<u64>,
    #[serde(default)]
    max_rounds: Option<u32>,
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// Cloud Hypervisor's overall deadline, in seconds.
    #[serde(default)]
    timeout_s: Option<u64>,
    /// Cloud Hypervisor's local (same host, memory passed as fds) migration: not here.
    #[serde(default)]
    local: Option<bool>,
    #[serde(default)]
    timeout_strategy: Option<crate::migration::TimeoutStrategy>,
    /// The pre-shared token a `tcp:` destination demands.
    #[serde(default)]
    token: Option<String>,
}

fn token(t: Option<String>) -> Result<Option<vm_live_migration::auth::Token>, Response> {
    t.map(|t| {
        vm_live_migration::auth::Token::new(t.into_bytes()).map_err(|e| Response::error(400, e.to_string()))
    })
    .transpose()
}

/// The options of a `vm.send-migration` body.
fn send_options(b: SendMigration) -> Result<crate::migration::SendOptions, Response> {
    not_supported("local", b.local == Some(true))?;
    if b.timeout_ms.is_some() && b.timeout_s.is_some() {
        return Err(Response::error(400, "give timeout_ms or timeout_s, not both"));
    }
    let mut opts = crate::migration::SendOptions::default();
    if let Some(s) = b.timeout_s {
        // Bounded: a deadline of u64::MAX seconds cannot be added to an Instant.
        opts.deadline = Duration::from_secs(s.clamp(1, u64::from(u32::MAX)));
    }
    if let Some(ms) = b.downtime_ms {
        opts.precopy.downtime = Duration::from_millis(ms);
    }
    if let Some(n) = b.max_rounds {
        opts.precopy.max_rounds = n.max(1);
    }
    if let Some(ms) = b.timeout_ms {
        opts.deadline = Duration::from_millis(ms.clamp(1, u64::from(u32::MAX) * 1000));
    }
    if let Some(s) = b.timeout_strategy {
        opts.strategy = s;
    }
    opts.token = token(b.token)?;
    Ok(opts)
}

fn body<'a, T: Deserialize<'a>>(req: &'a Request) -> Result<T, Response> {
    serde_json::from_slice(&req.body).map_err(|e| Response::error(400, format!("bad JSON body: {e}")))
}

/// Route one request to the VM.
pub fn handle(vm: &VmInner, req: &Request) -> Response {
    let op = match endpoint(&req.path, &req.method) {
        Ok(op) => op,
        Err(resp) => return resp,
    };
    let r = match op {
        "vm.info" => vm.info().map(|i| Response::json(200, &i)),
        "vm.resize" => match body::<Resize>(req).and_then(|b| b.vcpus()) {
            Ok(n) => vm.resize(n).map(|_| Response::empty()),
            Err(resp) => return resp,
        },
        "vm.add-cpu" => {
            // Optional {"id": N} selects the CPU; without a body the lowest absent one.
            let chosen = if req.body.iter().all(|b| b.is_ascii_whitespace()) {
                vm.add_cpu()
            } else {
                match body::<CpuId>(req) {
                    Ok(b) => vm.add_cpu_index(b.id).map(|_| b.id),
                    Err(resp) => return resp,
                }
            };
            chosen.map(|id| Response::json(200, &serde_json::json!({ "id": id })))
        }
        "vm.remove-cpu" => match body::<CpuId>(req) {
            Ok(b) => vm.remove_cpu(b.id).map(|_| Response::empty()),
            Err(resp) => return resp,
        },
        "vm.cancel-removal" => match body::<CpuId>(req) {
            Ok(b) => vm.cancel_removal(b.id).map(|_| Response::empty()),
            Err(resp) => return resp,
        },
        "vm.pause" => vm.pause().map(|_| Response::empty()),
        "vm.resume" => vm.resume_checked().map(|_| Response::empty()),
        "vm.shutdown" => vm.shutdown_checked().map(|_| Response::empty()),
        "vm.snapshot" => match body::<SnapshotReq>(req) {
            Ok(b) => {
                let dir = b
                    .destination_url
                    .strip_prefix("file://")
                    .unwrap_or(&b.destination_url);
                if dir.is_empty() {
                    return Response::error(400, "destination_url names no directory");
                }
                vm.snapshot(std::path::Path::new(dir)).map(|(n, ms)| {
                    Response::json(200, &serde_json::json!({ "state_bytes": n, "paused_ms": ms }))
                })
            }
            Err(resp) => return resp,
        },
        "vm.send-migration" => match body::<SendMigration>(req) {
            Ok(b) => {
                let url = b.destination_url.clone();
                match send_options(b) {
                    Ok(opts) => vm.send_migration(&url, &opts).map(|r| Response::json(200, &r)),
                    Err(resp) => return resp,
                }
            }
            Err(resp) => return resp,
        },
        "vm.cancel-migration" => vm.cancel_migration().map(|_| Response::empty()),
        // Lock-free (no vCPU lock, unlike vm.info): answers while a migration holds the vCPUs.
        "vm.migration-status" => match vm.migration_status() {
            Some(st) => Ok(Response::json(200, &st)),
            None => Err(ControlError::BadRequest("no migration has run on this VM".into())),
        },
        _ => return Response::error(400, format!("{op}: not an operation on a running VM")),
    };
    r.unwrap_or_else(control)
}

fn write_response(stream: &mut impl Write, resp: &Response) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nConnection: close\r\n",
        resp.status,
        reason(resp.status)
    );
    if !resp.body.is_empty() {
        out.push_str("Content-Type: application/json\r\n");
    }
    if let Some(m) = resp.allow {
        out.push_str(&format!("Allow: {m}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\n\r\n{}",
        resp.body.len(),
        resp.body
    ));
    stream.write_all(out.as_bytes())
}

/// Requests being served right now.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// What the API serves: the running VM, or, for a VMM started in standby, none yet and how
/// to make one (`vm.restore`, `vm.receive-migration`).
pub struct ApiTarget {
    vm: Mutex<Option<Arc<VmInner>>>,
    standby: Option<Standby>,
}

struct Standby {
    serial: SerialMode,
    /// What `vm.receive-migration` accepts (its body may add the token).
    incoming: crate::migration::IncomingOptions,
    created: Mutex<mpsc::Sender<Vm>>,
    busy: AtomicBool,
}

impl Standby {
    /// Run `receive` as the standby's cancellable receive.
    fn receiving<T>(&self, receive: impl FnOnce() -> T) -> T {
        /// Ends the receive's state however `receive` ends (a panic too).
        struct End<'a>(&'a crate::migration::ReceiveControl);
        impl Drop for End<'_> {
            fn drop(&mut self) {
                self.0.end();
            }
        }
        self.incoming.cancel.begin();
        let _end = End(&self.incoming.cancel);
        receive()
    }

    /// Ask a running receive to end; whether it will (not once its VM is being restored).
    fn cancel_receive(&self) -> bool {
        self.incoming.cancel.cancel()
    }
}

/// The body of `vm.receive-migration` with its wait for a source, checked.
fn receive_wait(b: ReceiveReq) -> Result<(ReceiveReq, Option<Duration>), Response> {
    match b.timeout_ms {
        Some(ms) if ms == 0 || ms > MAX_RECEIVE_WAIT_MS => Err(Response::error(
            400,
            format!("timeout_ms must be 1 to {MAX_RECEIVE_WAIT_MS}"),
        )),
        ms => Ok((b, ms.map(Duration::from_millis))),
    }
}

impl ApiTarget {
    /// Serve `vm`.
    pub fn running(vm: Arc<VmInner>) -> Arc<ApiTarget> {
        Arc::new(ApiTarget {
            vm: Mutex::new(Some(vm)),
            standby: None,
        })
    }

    /// No VM yet: `vm.restore` or `vm.receive-migration` creates one (with its console on
    /// `serial`) and hands it to the receiver, which owns it from then on.
    pub fn standby(
        serial: SerialMode,
        incoming: crate::migration::IncomingOptions,
    ) -> (Arc<ApiTarget>, mpsc::Receiver<Vm>) {
        let (tx, rx) = mpsc::channel();
        let t = ApiTarget {
            vm: Mutex::new(None),
            standby: Some(Standby {
                serial,
                incoming,
                created: Mutex::new(tx),
                busy: AtomicBool::new(false),
            }),
        };
        (Arc::new(t), rx)
    }

    /// No VM until the VMM's owner [`ApiTarget::publish`]es one (`run --incoming`): the API
    /// answers meanwhile, and shows the VM while it waits for the source's Complete.
    pub fn pending() -> Arc<ApiTarget> {
        Arc::new(ApiTarget {
            vm: Mutex::new(None),
            standby: None,
        })
    }

    /// Serve `vm` from now on (`None`: no VM again).
    pub fn publish(&self, vm: Option<Arc<VmInner>>) {
        *self.vm.lock().unwrap_or_else(|e| e.into_inner()) = vm;
    }

    fn vm(&self) -> Option<Arc<VmInner>> {
        self.vm.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Create the VM of a standby VMM with `make`, once.
    fn create(&self, make: impl FnOnce(&Standby) -> Result<Vm, String>) -> Response {
        let Some(sb) = &self.standby else {
            return Response::error(
                400,
                "only a standby VMM (run --standby) creates its VM through the API",
            );
        };
        if self.vm().is_some() {
            return Response::error(400, "a VM is already running in this VMM");
        }
        if sb.busy.swap(true, Ordering::SeqCst) {
            return Response::error(429, "a restore or incoming migration is already in progress");
        }
        // A panic on this path (a VMM bug) must not leave the standby busy for good.
        let resp = match std::panic::catch_unwind(AssertUnwindSafe(|| make(sb))) {
            Ok(Ok(vm)) => {
                *self.vm.lock().unwrap_or_else(|e| e.into_inner()) = Some(vm.control());
                match sb.created.lock().unwrap_or_else(|e| e.into_inner()).send(vm) {
                    Ok(()) => return Response::empty(),
                    Err(_) => Response::error(500, "the VMM is shutting down"),
                }
            }
            Ok(Err(e)) => Response::error(400, e),
            Err(_) => {
                // A VM published before the panic is gone with it.
                *self.vm.lock().unwrap_or_else(|e| e.into_inner()) = None;
                Response::error(500, PANICKED)
            }
        };
        sb.busy.store(false, Ordering::SeqCst);
        resp
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreReq {
    source_url: String,
    /// Cloud Hypervisor's: populate all guest RAM before running (here RAM is mapped
    /// copy-on-write and read on first touch).
    #[serde(default)]
    prefault: Option<bool>,
    /// Cloud Hypervisor's network fds for the restored VM: no network devices here.
    #[serde(default)]
    net_fds: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiveReq {
    receiver_url: String,
    #[serde(default)]
    token: Option<String>,
    /// How long to wait for a source to connect (default: until `vm.cancel-migration`).
    #[serde(default)]
    timeout_ms: Option<u64>,
}

/// Longest `timeout_ms` a receive waits for its source (a day).
pub const MAX_RECEIVE_WAIT_MS: u64 = 24 * 3600 * 1000;

/// `GET /api/v1/vmm.ping`: Cloud Hypervisor's answer, this VMM's values.
#[derive(serde::Serialize)]
struct Ping {
    build_version: &'static str,
    version: &'static str,
    pid: u32,
    features: &'static [&'static str],
}

impl Ping {
    fn now() -> Ping {
        Ping {
            build_version: env!("CARGO_PKG_VERSION"),
            version: env!("CARGO_PKG_VERSION"),
            pid: std::process::id(),
            features: &["kvm", "cpu-hotplug", "snapshot", "live-migration", "seccomp"],
        }
    }
}

/// Route one request: VM creation for a standby VMM, everything else to the VM.
pub fn route(target: &ApiTarget, req: &Request) -> Response {
    let op = match endpoint(&req.path, &req.method) {
        Ok(op) => op,
        Err(resp) => return resp,
    };
    match op {
        "vmm.ping" => Response::json(200, &Ping::now()),
        "vm.restore" => match body::<RestoreReq>(req).and_then(|b| {
            not_supported("prefault", b.prefault == Some(true))?;
            not_supported("net_fds", b.net_fds.is_some())?;
            Ok(b)
        }) {
            Ok(b) => {
                let dir = b
                    .source_url
                    .strip_prefix("file://")
                    .unwrap_or(&b.source_url)
                    .to_string();
                target.create(|sb| {
                    Vm::restore(std::path::Path::new(&dir), &sb.serial)
                        .map_err(|e| format!("restoring {dir}: {e}"))
                })
            }
            Err(resp) => resp,
        },
        "vm.receive-migration" => match body::<ReceiveReq>(req).and_then(receive_wait) {
            Ok((b, wait)) => match (crate::migration::Address::parse(&b.receiver_url), token(b.token)) {
                (Ok(addr), Ok(t)) => target
                    .create(|sb| {
                        let mut opts = sb.incoming.clone();
                        opts.token = t.or(opts.token);
                        opts.wait = wait;
                        let publish = |vm| target.publish(vm);
                        sb.receiving(|| crate::migration::receive(&addr, &sb.serial, &opts, &publish))
                            .map_err(|e| format!("incoming migration: {e}"))
                    })
                    .and_incomplete(target.vm().and_then(|vm| vm.migration_status())),
                (Err(e), _) => Response::error(400, e),
                (_, Err(resp)) => resp,
            },
            Err(resp) => resp,
        },
        "vm.cancel-migration" if target.vm().is_none() => match &target.standby {
            Some(sb) if sb.cancel_receive() => Response::empty(),
            Some(_) => Response::error(
                400,
                "no incoming migration can be cancelled (none runs, or its VM is being restored)",
            ),
            None => Response::error(400, "no VM yet: waiting for the incoming migration"),
        },
        _ => match (target.vm(), &target.standby) {
            (Some(vm), _) => handle(&vm, req),
            (None, Some(_)) => Response::error(
                400,
                "no VM yet: PUT /api/v1/vm.restore or /api/v1/vm.receive-migration first",
            ),
            (None, None) => Response::error(400, "no VM yet: waiting for the incoming migration"),
        },
    }
}

impl Response {
    /// A receive's 204 says the VM runs here: not when the source's Complete never came
    /// (`status` of the received VM) and the VM waits paused.
    fn and_incomplete(self, status: Option<crate::status::MigrationStatus>) -> Response {
        match status {
            Some(st) if self.status == 204 && st.phase == "incomplete" => Response::error(
                500,
                format!(
                    "the VM arrived but waits here paused: {}; resume it (vm.resume) once the source is known to have stopped",
                    st.error.unwrap_or_default()
                ),
            ),
            _ => self,
        }
    }
}

/// What a request whose handling panicked gets: the VMM and its VM run on.
const PANICKED: &str = "the request failed inside the VMM (a bug: its stderr says where)";

/// One connection counted in [`IN_FLIGHT`] until this drops, however serving it ends.
struct InFlight;

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve_one(target: &ApiTarget, mut stream: UnixStream) {
    let _slot = InFlight;
    let _ = stream.set_write_timeout(Some(REQUEST_DEADLINE));
    let mut timed = Deadline {
        stream: &stream,
        until: std::time::Instant::now() + REQUEST_DEADLINE,
    };
    let resp = match read_request(&mut timed) {
        // A bug reached by a request answers 500 instead of ending this thread silently.
        Ok(req) => std::panic::catch_unwind(AssertUnwindSafe(|| route(target, &req)))
            .unwrap_or_else(|_| Response::error(500, PANICKED)),
        Err(resp) => resp,
    };
    let _ = write_response(&mut stream, &resp);
}

/// Wait (up to `timeout`) until no request is being served, so that the answer to the
/// request that ended the VM (`vm.shutdown`, `vm.send-migration`) reaches its client before
/// the process exits.
pub fn wait_idle(timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while IN_FLIGHT.load(Ordering::SeqCst) != 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Answer 503 on a connection beyond the cap. What the client sends within 50 ms is read
/// first: closing on unread data would reset the connection before it reads the answer.
fn answer_busy(mut stream: UnixStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(50)));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(50)));
    let _ = stream.read(&mut [0u8; 8192]);
    let busy = Response::error(503, format!("more than {MAX_CONNECTIONS} connections, retry"));
    let _ = write_response(&mut stream, &busy);
}

/// Serve the API on `listener` until the VMM ends (one thread per connection, at most 32 at
/// once; more are answered 503 at once).
pub fn serve(listener: UnixListener, target: Arc<ApiTarget>) {
    // Its connection threads (snapshots and migrations run there) inherit the filter.
    crate::seccomp::apply_or_warn(crate::seccomp::ThreadKind::Api);
    let (reject, refused) = mpsc::sync_channel::<UnixStream>(64);
    let _ = std::thread::Builder::new()
        .name("api-busy".into())
        .spawn(move || refused.into_iter().for_each(answer_busy));
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors or memory: wait instead of spinning on the error.
                static LOG: crate::ratelimit::RateLimit = crate::ratelimit::RateLimit::new();
                crate::rate_limited!(LOG, warn, "API accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if IN_FLIGHT.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
            // One thread answers the refused ones, so the accept loop never waits; beyond
            // its queue a connection is just closed.
            let _ = reject.try_send(stream);
            continue;
        }
        let target = target.clone();
        IN_FLIGHT.fetch_add(1, Ordering::SeqCst);
        if std::thread::Builder::new()
            .name("api".into())
            .spawn(move || serve_one(&target, stream))
            .is_err()
        {
            IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Client side: send one request over the socket at `path`, awaiting the answer up to 300 s;
/// returns (status, body).
pub fn request(
    path: &std::path::Path,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    request_within(path, method, endpoint, body, Duration::from_secs(300))
}

/// [`request`] with the answer awaited up to `wait` (a migration's answer comes when it
/// ends, which its `timeout_ms` bounds).
pub fn request_within(
    path: &std::path::Path,
    method: &str,
    endpoint: &str,
    body: Option<&str>,
    wait: Duration,
) -> std::io::Result<(u16, String)> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(wait))?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // A server that answers before reading (503 at the connection cap) may have closed
    // already: the write then fails with EPIPE, yet its answer is there to read.
    let sent = s.write_all(req.as_bytes());
    let mut resp = String::new();
    match (s.read_to_string(&mut resp), sent) {
        (Ok(_), _) if !resp.is_empty() => {}
        (_, Err(e)) | (Err(e), Ok(())) => return Err(e),
        (Ok(_), Ok(())) => {}
    }
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "bad HTTP response"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A restore that panicked (a peer's Hello overflowed a sum in debug builds) left the
    /// standby answering 429 "already in progress" for good.
    #[test]
    fn a_panicking_restore_answers_500_and_leaves_the_standby_usable() {
        let (target, _rx) = ApiTarget::standby(SerialMode::Null, crate::migration::IncomingOptions::new());
        let r = target.create(|_| panic!("a bug on the restore path"));
        assert_eq!(r.status, 500, "{r:?}");
        let r = target.create(|_| Err("no such snapshot".into()));
        assert_eq!(r.status, 400, "the standby is not stuck busy: {r:?}");
    }

    /// The client reads an answer the server gave before it read the request (and closed):
    /// at the connection cap the VMM answers 503 at once, and a client whose write then met
    /// EPIPE reported "Broken pipe" instead (CI, L1 6.12).
    #[test]
    fn an_answer_sent_before_the_request_is_read() {
        let dir = std::env::temp_dir().join(format!("api-early-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let r = Response::error(503, "too many connections");
            write_response(&mut c, &r).unwrap();
        });
        // A request larger than the socket holds: the write is still going on when the
        // server has answered and closed, so it ends in EPIPE.
        let body = "x".repeat(1 << 20);
        let (status, reply) = request(&path, "PUT", "vm.resize", Some(&body)).unwrap();
        t.join().unwrap();
        assert_eq!(status, 503, "{reply}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parses_requests() {
        let raw =
            b"PUT /api/v1/vm.resize HTTP/1.1\r\nHost: x\r\nContent-Length: 19\r\n\r\n{\"desired_vcpus\":3}";
        let r = read_request(&mut &raw[..]).unwrap();
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/api/v1/vm.resize");
        assert_eq!(r.body, b"{\"desired_vcpus\":3}");
        assert!(read_request(&mut &b"\r\n"[..]).is_err());
        let huge = b"PUT / HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n";
        assert_eq!(read_request(&mut &huge[..]).unwrap_err().status, 413);
        let bad = b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n";
        assert_eq!(read_request(&mut &bad[..]).unwrap_err().status, 400);
        let short = b"PUT / HTTP/1.1\r\nContent-Length: 10\r\n\r\nab";
        assert_eq!(read_request(&mut &short[..]).unwrap_err().status, 400);
        let chunked = b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(read_request(&mut &chunked[..]).unwrap_err().status, 400);
    }

    #[test]
    fn an_endless_line_or_header_flood_is_cut_at_8_kib() {
        // A line without end (it grew the VMM to 266 MB): refused after reading 8 KiB.
        let mut endless = std::io::repeat(b'A').take(256 << 20);
        assert_eq!(read_request(&mut endless).unwrap_err().status, 431);
        assert!(
            endless.limit() > (256 << 20) - 16 * 1024,
            "read no more than the bound"
        );
        let mut many = b"GET /api/v1/vm.info HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(read_request(&mut &many[..]).unwrap_err().status, 431);
    }

    #[test]
    fn a_client_that_trickles_meets_one_deadline() {
        let (a, mut b) = UnixStream::pair().unwrap();
        std::io::Write::write_all(&mut b, b"GET /api/v1/vm.info HT").unwrap();
        let t = std::time::Instant::now();
        let mut timed = Deadline {
            stream: &a,
            until: t + Duration::from_millis(300),
        };
        assert_eq!(read_request(&mut timed).unwrap_err().status, 408);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    /// `api/openapi.yaml` describes exactly the endpoints and methods served (its paths are
    /// the lines `  /NAME:`, each followed by its method line `    get:` or `    put:`).
    #[test]
    fn the_openapi_spec_names_every_endpoint_and_no_other() {
        let spec = include_str!("../api/openapi.yaml");
        let mut described = Vec::new();
        let mut lines = spec.lines().skip_while(|l| *l != "paths:");
        while let Some(l) = lines.next() {
            if l == "components:" {
                break;
            }
            if let Some(name) = l.strip_prefix("  /").and_then(|n| n.strip_suffix(':')) {
                let method = lines.next().unwrap_or("").trim().trim_end_matches(':');
                described.push((name.to_string(), method.to_ascii_uppercase()));
            }
        }
        let served: Vec<(String, String)> = ENDPOINTS
            .iter()
            .map(|(n, m)| (n.to_string(), m.to_string()))
            .collect();
        assert_eq!(described, served, "openapi.yaml paths (in order) vs ENDPOINTS");
    }

    /// A method an endpoint does not answer gets 405 and `Allow`; an unknown path 404.
    #[test]
    fn another_method_gets_405_with_allow() {
        let (target, _rx) =
            ApiTarget::standby(SerialMode::Null, crate::migration::IncomingOptions::default());
        let req = |method: &str, path: &str| Request {
            method: method.into(),
            path: path.into(),
            body: Vec::new(),
        };
        for (name, method) in ENDPOINTS {
            let other = if *method == "GET" { "PUT" } else { "GET" };
            let r = route(&target, &req(other, &format!("/api/v1/{name}")));
            assert_eq!((r.status, r.allow), (405, Some(*method)), "{other} {name}");
            let mut out = Vec::new();
            write_response(&mut out, &r).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains(&format!("\r\nAllow: {method}\r\n")), "{text}");
        }
        assert_eq!(route(&target, &req("GET", "/api/v1/vm.nope")).status, 404);
        assert_eq!(route(&target, &req("GET", "/vm.info")).status, 404);
        assert_eq!(route(&target, &req("GET", "/api/v1/vmm.ping")).status, 200);
    }
}
