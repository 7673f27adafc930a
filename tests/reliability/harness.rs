//! The pieces every scenario uses: the real `refiner-gateway serve` binary as a child process
//! (configured by a TOML file, on a free port, restartable on the same data dir), the
//! in-process Refiner simulator, a tap that folds the simulator's call log as it grows, and
//! small readers for `/proc/<pid>/status`, `/metrics` and the spool file.
//!
//! Everything listens on 127.0.0.1 only.

use std::collections::{BTreeMap, HashSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use base64::Engine;
use refiner_gateway::sim::{self, CallFilter, CallRecord, Faults, SimHandle, SimOptions, SimState};
use tokio::process::{Child, Command};

/// Write key of the `default` source.
pub const WRITE_KEY: &str = "reliability-write-key";
/// Write key of the `hooked` source (which also has a webhook secret).
pub const OTHER_KEY: &str = "reliability-other-key";
/// Webhook secret of the `hooked` source.
pub const WEBHOOK_SECRET: &str = "reliability-webhook-secret";
/// Refiner API key of the `default` source.
pub const REFINER_KEY: &str = "reliability-refiner-key";
/// Refiner API key of the `hooked` source.
pub const OTHER_REFINER_KEY: &str = "reliability-refiner-key-2";
/// Token of the management API (when the gateway has one).
pub const ADMIN_TOKEN: &str = "reliability-admin-token";

/// The gateway binary: Cargo names it for integration tests; the `reliability` example finds
/// it next to its own directory (`target/<profile>/refiner-gateway`).
pub fn gateway_binary() -> PathBuf {
    if let Some(path) = option_env!("CARGO_BIN_EXE_refiner-gateway") {
        return PathBuf::from(path);
    }
    if let Ok(path) = std::env::var("RELIABILITY_GATEWAY_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/examples/reliability → target/<profile>/refiner-gateway
    exe.parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("refiner-gateway"))
        .expect("the gateway binary's directory")
}

/// `Basic base64(key:)`.
pub fn basic(key: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
    )
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// Polls `check` every 25 ms until it returns `Ok`, or fails after `limit` with what it
/// last said.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(value) => return Ok(value),
            Err(state) if Instant::now() >= deadline => {
                return Err(format!(
                    "{what}: not reached within {limit:?}; last seen: {state}"
                ))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The gateway process

/// What a gateway process is started with. Values of `delivery` and `spool` are TOML
/// literals, written under `[delivery]` and `[spool]`.
#[derive(Debug, Clone)]
pub struct Spec {
    pub data_dir: PathBuf,
    pub refiner_url: String,
    pub delivery: Vec<(&'static str, String)>,
    pub spool: Vec<(&'static str, String)>,
    /// Top-level keys (TOML literals), e.g. `shutdown_timeout_secs`.
    pub top: Vec<(&'static str, String)>,
    /// The Refiner API key the `hooked` source delivers with.
    pub hooked_refiner_key: String,
}

impl Spec {
    /// Delivery on, to `refiner_url`, with test-sized retry timings.
    pub fn new(data_dir: &Path, refiner_url: &str) -> Spec {
        Spec {
            data_dir: data_dir.to_path_buf(),
            refiner_url: refiner_url.to_string(),
            delivery: vec![
                ("retry_base_ms", "100".into()),
                ("retry_cap_secs", "2".into()),
                ("retry_floor_429_secs", "1".into()),
                ("breaker_cooldown_secs", "1".into()),
                ("poll_interval_ms", "20".into()),
                ("timeout_secs", "5".into()),
            ],
            spool: Vec::new(),
            top: vec![
                ("shutdown_timeout_secs", "10".into()),
                ("admin_token", format!("\"{ADMIN_TOKEN}\"")),
            ],
            hooked_refiner_key: OTHER_REFINER_KEY.into(),
        }
    }

    /// The gateway's own defaults for `[delivery]`.
    pub fn with_default_delivery(mut self) -> Spec {
        self.delivery.clear();
        self
    }

    /// Sets (or replaces) one `[delivery]` key.
    pub fn delivery(mut self, key: &'static str, value: impl ToString) -> Spec {
        self.delivery.retain(|(k, _)| *k != key);
        self.delivery.push((key, value.to_string()));
        self
    }

    /// Sets (or replaces) one `[spool]` key.
    pub fn spool(mut self, key: &'static str, value: impl ToString) -> Spec {
        self.spool.retain(|(k, _)| *k != key);
        self.spool.push((key, value.to_string()));
        self
    }

    /// The TOML file for a process listening on `listen`.
    fn toml(&self, listen: &str) -> String {
        let quote = |s: &str| toml::Value::String(s.to_string()).to_string();
        let mut text = format!(
            "listen = {}\ndata_dir = {}\nlog_format = \"text\"\n",
            quote(listen),
            quote(self.data_dir.to_str().expect("utf-8 data dir")),
        );
        for (key, value) in &self.top {
            text.push_str(&format!("{key} = {value}\n"));
        }
        text.push_str(&format!(
            "\n[refiner]\nbase_url = {}\n",
            quote(&self.refiner_url)
        ));
        text.push_str("\n[spool]\n");
        for (key, value) in &self.spool {
            text.push_str(&format!("{key} = {value}\n"));
        }
        text.push_str("\n[delivery]\n");
        for (key, value) in &self.delivery {
            text.push_str(&format!("{key} = {value}\n"));
        }
        text.push_str(&format!(
            "\n[[sources]]\nslug = \"default\"\nwrite_keys = [{}]\nrefiner_api_key = {}\n",
            quote(WRITE_KEY),
            quote(REFINER_KEY)
        ));
        text.push_str(&format!(
            "\n[[sources]]\nslug = \"hooked\"\nwrite_keys = [{}]\nwebhook_secret = {}\nrefiner_api_key = {}\n",
            quote(OTHER_KEY),
            quote(WEBHOOK_SECRET),
            quote(&self.hooked_refiner_key)
        ));
        text
    }
}

/// A running `refiner-gateway serve`.
pub struct Gateway {
    pub child: Child,
    pub address: String,
    pub pid: u32,
    /// From spawn to the first `200` from `/readyz`.
    pub ready_after: Duration,
    stderr_path: PathBuf,
}

/// A fresh directory for logs and config files, kept when `RELIABILITY_KEEP` is set.
pub fn scratch_dir(name: &str) -> tempfile::TempDir {
    let keep = std::env::var_os("RELIABILITY_KEEP").is_some();
    let dir = tempfile::Builder::new()
        .prefix(&format!("reliability-{name}-"))
        .disable_cleanup(keep)
        .tempdir()
        .expect("temp dir");
    if keep {
        eprintln!("[{name}] scratch dir {} (kept)", dir.path().display());
    }
    dir
}

impl Gateway {
    /// Starts `serve` with `spec` on a free port and waits (at most `ready_limit`) until
    /// `/readyz` answers 200. `logs` receives the config file and stdout/stderr.
    pub async fn start(spec: &Spec, logs: &Path, ready_limit: Duration) -> Gateway {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        for attempt in 0..8 {
            let port = free_port();
            let listen = format!("127.0.0.1:{port}");
            let config_path = logs.join(format!("gateway-{port}-{attempt}.toml"));
            std::fs::write(&config_path, spec.toml(&listen)).expect("write the config file");
            let stdout_path = logs.join(format!("stdout-{port}-{attempt}.log"));
            let stderr_path = logs.join(format!("stderr-{port}-{attempt}.log"));
            let mut command = Command::new(gateway_binary());
            command
                .arg("serve")
                .arg("--config")
                .arg(&config_path)
                .current_dir(logs)
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(&stdout_path).expect("stdout log"))
                .stderr(std::fs::File::create(&stderr_path).expect("stderr log"))
                .kill_on_drop(true);
            for (name, _) in std::env::vars_os()
                .filter_map(|(k, v)| k.into_string().ok().map(|k| (k, v)))
                .filter(|(k, _)| k.starts_with("GATEWAY_") || k.starts_with("REFINER_"))
            {
                command.env_remove(name);
            }
            command.env(
                "RUST_LOG",
                std::env::var("RELIABILITY_NODE_LOG").unwrap_or_else(|_| "warn".into()),
            );
            let spawned = Instant::now();
            let mut child = command.spawn().expect("spawn the gateway binary");
            let pid = child.id().expect("a pid");
            let address = format!("http://{listen}");
            let deadline = spawned + ready_limit;
            loop {
                if let Some(status) = child.try_wait().expect("try_wait") {
                    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    if stderr.contains("cannot listen") {
                        break; // lost the port: try another one
                    }
                    panic!("the gateway exited during start-up ({status}): {stderr}");
                }
                if let Ok(response) = client.get(format!("{address}/readyz")).send().await {
                    if response.status() == 200 {
                        return Gateway {
                            child,
                            address,
                            pid,
                            ready_after: spawned.elapsed(),
                            stderr_path,
                        };
                    }
                }
                if Instant::now() >= deadline {
                    let _ = child.start_kill();
                    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    panic!("the gateway did not answer /readyz 200 within {ready_limit:?}; stderr: {stderr}");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        panic!("no free port for the gateway in 8 attempts");
    }

    /// SIGKILL, and waits for the process to be gone.
    pub async fn kill(mut self) {
        self.child.start_kill().expect("SIGKILL");
        let status = self.child.wait().await.expect("wait");
        assert!(!status.success(), "the gateway was killed, not stopped");
    }

    /// SIGTERM, and waits (at most 60 s) for a clean exit.
    pub async fn terminate(mut self) -> Result<(), String> {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .map_err(|e| format!("kill -TERM: {e}"))?;
        if !status.success() {
            return Err("kill -TERM failed".into());
        }
        let exit = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .map_err(|_| "the gateway did not stop within 60 s of SIGTERM".to_string())?
            .map_err(|e| e.to_string())?;
        if exit.success() {
            Ok(())
        } else {
            Err(format!(
                "exit {exit} after SIGTERM; stderr: {}",
                self.stderr_tail()
            ))
        }
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines of the process's stderr.
    pub fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub fn memory(&self) -> Memory {
        Memory::of(self.pid)
    }
}

// ---------------------------------------------------------------------------------------
// Memory

/// Resident memory of a process, from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Memory {
    /// VmRSS: resident now.
    pub rss: u64,
    /// VmHWM: the peak of VmRSS so far.
    pub hwm: u64,
    /// RssAnon: heap and stacks.
    pub anon: u64,
    /// RssFile: mapped files (the spool's memory-mapped reads, the binary).
    pub file: u64,
}

impl Memory {
    pub fn of(pid: u32) -> Memory {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Memory {
            rss: field("VmRSS:"),
            hwm: field("VmHWM:"),
            anon: field("RssAnon:"),
            file: field("RssFile:"),
        }
    }
}

/// KiB as MiB with one decimal.
pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

// ---------------------------------------------------------------------------------------
// Metrics and the spool file

/// The sum of every series of `name` carrying all `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, label_part) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let present: Vec<&str> = label_part.split(',').collect();
        if wanted.iter().all(|w| present.contains(&w.as_str())) {
            sum += value.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    sum
}

pub async fn metrics_text(client: &reqwest::Client, address: &str) -> Result<String, String> {
    let response = client
        .get(format!("{address}/metrics"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    response.text().await.map_err(|e| e.to_string())
}

/// What the spool file holds, read directly (the gateway may be stopped or running).
#[derive(Debug, Clone, Default)]
pub struct SpoolFile {
    pub queued: u64,
    pub dead_letters: u64,
}

impl SpoolFile {
    pub fn read(data_dir: &Path) -> Result<SpoolFile, String> {
        let connection = rusqlite::Connection::open_with_flags(
            data_dir.join("spool.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .map_err(|e| e.to_string())?;
        connection
            .busy_timeout(Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let (queued, dead_letters): (i64, i64) = connection
            .query_row(
                "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM dead_letters)",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .map_err(|e| e.to_string())?;
        Ok(SpoolFile {
            queued: queued as u64,
            dead_letters: dead_letters as u64,
        })
    }

    /// `PRAGMA integrity_check` of the spool file: `ok` when it is sound.
    pub fn integrity(data_dir: &Path) -> Result<String, String> {
        let connection = rusqlite::Connection::open_with_flags(
            data_dir.join("spool.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .map_err(|e| e.to_string())?;
        connection
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .map_err(|e| e.to_string())
    }

    /// `(message_id, payload)` of every queued event, in queue order.
    pub fn events(data_dir: &Path) -> Result<Vec<(String, Vec<u8>)>, String> {
        let connection = rusqlite::Connection::open_with_flags(
            data_dir.join("spool.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .map_err(|e| e.to_string())?;
        let mut select = connection
            .prepare("SELECT message_id, payload FROM events ORDER BY seq")
            .map_err(|e| e.to_string())?;
        let rows = select
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .map_err(|e| e.to_string())?
            .collect::<rusqlite::Result<Vec<(String, Vec<u8>)>>>()
            .map_err(|e| e.to_string())?;
        Ok(rows)
    }
}

// ---------------------------------------------------------------------------------------
// The simulator

/// An in-process simulator accepting both sources' keys, on `port` (0: any).
pub async fn start_sim(port: u16, faults: Faults, log_capacity: usize) -> SimHandle {
    let mut last_error = None;
    for _ in 0..50 {
        match TcpListener::bind(("127.0.0.1", port)) {
            Ok(listener) => {
                let options = SimOptions {
                    api_keys: vec![REFINER_KEY.into(), OTHER_REFINER_KEY.into()],
                    faults,
                    workers: Some(2),
                    log_capacity,
                    ..SimOptions::default()
                };
                return sim::spawn(listener, options)
                    .await
                    .expect("the simulator starts");
            }
            Err(e) => {
                last_error = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("cannot bind the simulator on port {port}: {last_error:?}");
}

/// Folds the simulator's call log as it grows: each completed call is handed to the
/// caller exactly once, in order of receipt, so a long run can keep aggregates only and
/// the log's capacity never loses a call (as long as it is polled often enough, which
/// [`Tap::poll`] checks).
#[derive(Debug, Default)]
pub struct Tap {
    next: u64,
    done_above: HashSet<u64>,
}

impl Tap {
    /// Starts over (a new simulator).
    pub fn reset(&mut self) {
        *self = Tap::default();
    }

    /// Hands every newly completed call to `fold`; returns how many calls are in flight.
    pub fn poll(&mut self, state: &SimState, mut fold: impl FnMut(&CallRecord)) -> usize {
        let calls = state.calls_matching(&CallFilter {
            since: Some(self.next),
            ..CallFilter::default()
        });
        if let Some(first) = calls.first() {
            assert!(
                first.seq <= self.next,
                "the simulator's call log evicted calls {}..{} before they were read: raise \
                 its capacity or poll more often",
                self.next,
                first.seq
            );
        }
        let mut watermark = None;
        let mut in_flight = 0;
        for call in &calls {
            if call.answered_ms.is_none() {
                in_flight += 1;
                watermark.get_or_insert(call.seq);
                continue;
            }
            if self.done_above.insert(call.seq) {
                fold(call);
            }
        }
        let next = watermark.unwrap_or_else(|| calls.last().map_or(self.next, |c| c.seq + 1));
        self.done_above.retain(|seq| *seq >= next);
        self.next = next;
        in_flight
    }
}

/// Whether a call was answered 2xx.
pub fn succeeded(call: &CallRecord) -> bool {
    call.status.is_some_and(|s| (200..300).contains(&s))
}

/// Counts of calls by status (`"200"`, `"503"`, `"dropped"`, …).
pub fn count_status(counts: &mut BTreeMap<String, u64>, call: &CallRecord) {
    let key = match call.status {
        Some(status) => status.to_string(),
        None => "dropped".into(),
    };
    *counts.entry(key).or_default() += 1;
}
