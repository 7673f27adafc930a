//! Hostile-traffic benchmark: the memory and answers of the real release binary
//! (`refiner-gateway serve --config <file>`) under the requests of the ingest hardening
//! report, measured from `/proc/<pid>/status`.
//!
//! `cargo bench --bench hostile [-- --baseline <binary> --slow N --large N --flood-seconds S
//! --slow-seconds S]`
//!
//! For each binary (this build's, and `--baseline`, an earlier build, in the same run):
//! 1. idle: started with delivery off (ingest only), warmed with 20 ordinary requests; VmRSS;
//! 2. the amplification request, unauthenticated: `POST /v1/batch` with 2,500 tiny events and
//!    a 380 KB batch-level `context` (about 507 KB) and no write key; the answer, and the
//!    peak resident memory above idle (VmHWM, reset before through `/proc/<pid>/clear_refs`);
//! 3. the same request with the (public) write key in the body: the answer, the peak, and
//!    what the spool directory grew by;
//! 4. the flood: `--slow` connections (500) that send a `/v1/batch` body one byte every 2 s,
//!    and meanwhile waves of `--large` (200) concurrent 4 MiB webhook bodies with a wrong
//!    signature for `--flood-seconds`, while an ordinary signed-in `/v1/track` request is
//!    sent every 100 ms; the peak resident memory, the answers of each kind, the latency of
//!    the ordinary requests, and whether the process survived. The slow connections are
//!    watched for `--slow-seconds` (40), past the 30 s body timeout.
//!
//! Everything is on 127.0.0.1 and bounded in count and time. The gateway is not put in a
//! memory cgroup: the peak resident memory is compared with the Helm chart's 512 MiB limit.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const WRITE_KEY: &str = "hostile-write-key";
const OTHER_KEY: &str = "hostile-other-key";
const WEBHOOK_SECRET: &str = "hostile-webhook-secret";
const MIB: f64 = 1024.0 * 1024.0;

struct Options {
    gateway: PathBuf,
    baseline: Option<PathBuf>,
    slow: usize,
    large: usize,
    flood_seconds: u64,
    slow_seconds: u64,
    /// `limits.body_budget_bytes` for this build, in MiB (its default when not given).
    budget_mib: Option<u64>,
}

fn options() -> Options {
    let mut options = Options {
        gateway: PathBuf::from(env!("CARGO_BIN_EXE_refiner-gateway")),
        baseline: None,
        slow: 500,
        large: 200,
        flood_seconds: 10,
        slow_seconds: 40,
        budget_mib: None,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1);
        let number = value.and_then(|v| v.parse::<u64>().ok());
        match (args[i].as_str(), value, number) {
            ("--baseline", Some(path), _) => options.baseline = Some(PathBuf::from(path)),
            ("--gateway", Some(path), _) => options.gateway = PathBuf::from(path),
            ("--slow", _, Some(n)) => options.slow = n as usize,
            ("--large", _, Some(n)) => options.large = n as usize,
            ("--flood-seconds", _, Some(n)) => options.flood_seconds = n,
            ("--slow-seconds", _, Some(n)) => options.slow_seconds = n,
            ("--budget-mib", _, Some(n)) => options.budget_mib = Some(n),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    options
}

fn basic(key: &str) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
    format!("Basic {encoded}")
}

// ---------------------------------------------------------------------------------------
// The gateway process and its memory

struct Gateway {
    child: Child,
    pid: u32,
    address: String,
    port: u16,
    data_dir: PathBuf,
}

/// Resident memory from `/proc/<pid>/status`, in bytes: (VmRSS, VmHWM).
fn memory(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .map_or(0, |kib: u64| kib * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets VmHWM to the current VmRSS, so that the next reading is the peak of one phase.
fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

fn directory_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The settings file: only keys every version of the gateway knows, so that an earlier
/// build runs with the same file (its own defaults for everything else), and `extra`.
fn config(port: u16, data_dir: &Path, extra: &str) -> String {
    let mut text = format!(
        r#"listen = "127.0.0.1:{port}"
data_dir = "{data_dir}"
log_format = "json"

[delivery]
enabled = false

[[sources]]
slug = "default"
write_keys = ["{WRITE_KEY}"]

[[sources]]
slug = "hooked"
write_keys = ["{OTHER_KEY}"]
webhook_secret = "{WEBHOOK_SECRET}"
"#,
        data_dir = data_dir.display()
    );
    text.push_str(extra);
    text
}

async fn start(binary: &Path, scratch: &Path, extra: &str) -> Gateway {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let data_dir = scratch.join("data");
    let config_path = scratch.join("gateway.toml");
    std::fs::write(&config_path, config(port, &data_dir, extra)).expect("config");
    let mut command = Command::new(binary);
    command
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(scratch.join("stdout.log")).expect("log"))
        .stderr(std::fs::File::create(scratch.join("stderr.log")).expect("log"))
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    for (name, _) in std::env::vars() {
        if name.starts_with("GATEWAY_") || name.starts_with("REFINER_") {
            command.env_remove(name);
        }
    }
    let child = command.spawn().expect("spawn the gateway");
    let pid = child.id().expect("pid");
    let address = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("{address}/readyz")).send().await {
            if r.status() == 200 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the gateway did not get ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Gateway {
        child,
        pid,
        address,
        port,
        data_dir,
    }
}

// ---------------------------------------------------------------------------------------
// Requests

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// An ordinary request: one track event, Basic auth. Its answer's status and latency.
async fn ordinary(client: &reqwest::Client, address: &str) -> (Option<u16>, Duration) {
    let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let body = json!({"userId": format!("u{}", n % 100), "event": "Ordinary", "messageId": format!("ordinary-{n}")});
    let started = Instant::now();
    let status = client
        .post(format!("{address}/v1/track"))
        .header("Authorization", basic(WRITE_KEY))
        .body(body.to_string())
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16());
    (status, started.elapsed())
}

/// 2,500 tiny events and a 380 KB batch-level context: about 507 KB.
fn amplifying_batch(write_key: Option<&str>) -> String {
    let items: Vec<serde_json::Value> = (0..2500)
        .map(|i| json!({"type": "track", "userId": format!("u{i:04}"), "event": "e"}))
        .collect();
    let mut body = json!({"batch": items, "context": {"blob": "x".repeat(380 * 1024)}});
    if let Some(key) = write_key {
        body["writeKey"] = json!(key);
    }
    body.to_string()
}

/// A webhook array just under 4 MiB.
fn large_webhook() -> actix_web::web::Bytes {
    let pad = "p".repeat(900);
    let event = json!({"type": "track", "userId": "u", "event": "e", "properties": {"pad": pad}})
        .to_string();
    let count = (4 * 1024 * 1024 - 2) / (event.len() + 1);
    let mut body = String::with_capacity(4 * 1024 * 1024);
    body.push('[');
    for i in 0..count {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&event);
    }
    body.push(']');
    assert!(body.len() <= 4 * 1024 * 1024);
    actix_web::web::Bytes::from(body)
}

/// What one slow connection saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Slow {
    /// The gateway answered with this status.
    Answered(u16),
    /// The gateway closed the connection without an answer.
    Closed,
    /// Still open when the watch ended.
    Open,
    NotConnected,
}

/// Sends a `/v1/batch` body that announces 500,000 bytes, one byte every 2 s, until the
/// gateway answers or `until`.
async fn slow_body(port: u16, until: Instant) -> (Slow, Duration) {
    let opened = Instant::now();
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return (Slow::NotConnected, Duration::ZERO);
    };
    let head = "POST /v1/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 500000\r\n\r\n{";
    if stream.write_all(head.as_bytes()).await.is_err() {
        return (Slow::Closed, opened.elapsed());
    }
    let (mut reader, mut writer) = stream.split();
    let mut buffer = [0u8; 512];
    loop {
        tokio::select! {
            read = reader.read(&mut buffer) => {
                let seen = match read {
                    Ok(n) if n >= 12 => std::str::from_utf8(&buffer[9..12])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .map_or(Slow::Closed, Slow::Answered),
                    _ => Slow::Closed,
                };
                return (seen, opened.elapsed());
            }
            _ = tokio::time::sleep(Duration::from_secs(2)) => {
                if Instant::now() >= until {
                    return (Slow::Open, opened.elapsed());
                }
                if writer.write_all(b" ").await.is_err() {
                    return (Slow::Closed, opened.elapsed());
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Phases

#[derive(Default)]
struct Report {
    idle_rss: u64,
    unauth_status: Option<u16>,
    unauth_time: Duration,
    unauth_peak: u64,
    auth_status: Option<u16>,
    auth_time: Duration,
    auth_peak: u64,
    auth_spool_growth: u64,
    flood_peak: u64,
    flood_max_rss: u64,
    large: BTreeMap<String, usize>,
    slow: BTreeMap<String, (usize, Duration)>,
    ordinary: Vec<(Option<u16>, Duration)>,
    survived: bool,
}

async fn amplification(
    gateway: &Gateway,
    client: &reqwest::Client,
    auth: bool,
) -> (Option<u16>, Duration, u64, u64) {
    let body = amplifying_batch(auth.then_some(WRITE_KEY));
    let before = directory_bytes(&gateway.data_dir);
    reset_peak(gateway.pid);
    let started = Instant::now();
    let status = client
        .post(format!("{}/v1/batch", gateway.address))
        .header("Content-Type", "application/json")
        .body(body)
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16());
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, peak) = memory(gateway.pid);
    let growth = directory_bytes(&gateway.data_dir).saturating_sub(before);
    (status, took, peak, growth)
}

async fn flood(gateway: &Gateway, options: &Options, report: &mut Report) {
    reset_peak(gateway.pid);
    let stop = Arc::new(AtomicBool::new(false));
    let pid = gateway.pid;
    let sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut max = 0;
            while !stop.load(Ordering::Relaxed) {
                max = max.max(memory(pid).0);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            max
        })
    };
    let ordinary_task = {
        let stop = stop.clone();
        let address = gateway.address.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                seen.push(ordinary(&client, &address).await);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        })
    };
    let until = Instant::now() + Duration::from_secs(options.slow_seconds);
    let slow: Vec<_> = (0..options.slow)
        .map(|_| tokio::spawn(slow_body(gateway.port, until)))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;

    let body = large_webhook();
    let large_client = reqwest::Client::builder()
        .pool_max_idle_per_host(options.large)
        .build()
        .expect("client");
    let flood_until = Instant::now() + Duration::from_secs(options.flood_seconds);
    let outcomes = Arc::new(Mutex::new(BTreeMap::<String, usize>::new()));
    while Instant::now() < flood_until {
        let wave: Vec<_> = (0..options.large)
            .map(|_| {
                let client = large_client.clone();
                let url = format!("{}/webhook", gateway.address);
                let body = body.clone();
                let outcomes = outcomes.clone();
                tokio::spawn(async move {
                    let answer = client
                        .post(url)
                        .header("X-Signature", "0".repeat(40))
                        .body(body)
                        .timeout(Duration::from_secs(60))
                        .send()
                        .await;
                    let key = match answer {
                        Ok(response) => response.status().as_u16().to_string(),
                        Err(_) => "connection error".to_string(),
                    };
                    *outcomes.lock().expect("lock").entry(key).or_default() += 1;
                })
            })
            .collect();
        for task in wave {
            let _ = task.await;
        }
    }
    for task in slow {
        if let Ok((seen, after)) = task.await {
            let key = match seen {
                Slow::Answered(status) => format!("answered {status}"),
                Slow::Closed => "closed without an answer".into(),
                Slow::Open => format!("still open after {} s", options.slow_seconds),
                Slow::NotConnected => "not connected".into(),
            };
            let entry = report.slow.entry(key).or_default();
            entry.0 += 1;
            entry.1 = entry.1.max(after);
        }
    }
    stop.store(true, Ordering::Relaxed);
    report.flood_max_rss = sampler.await.unwrap_or(0);
    report.ordinary = ordinary_task.await.unwrap_or_default();
    report.flood_peak = memory(gateway.pid).1;
    report.large = outcomes.lock().expect("lock").clone();
}

async fn run(binary: &Path, options: &Options, extra: &str) -> Report {
    let scratch = tempfile::tempdir().expect("scratch dir");
    let mut gateway = start(binary, scratch.path(), extra).await;
    let client = reqwest::Client::new();
    let mut report = Report::default();
    for _ in 0..20 {
        ordinary(&client, &gateway.address).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    report.idle_rss = memory(gateway.pid).0;
    (
        report.unauth_status,
        report.unauth_time,
        report.unauth_peak,
        _,
    ) = amplification(&gateway, &client, false).await;
    (
        report.auth_status,
        report.auth_time,
        report.auth_peak,
        report.auth_spool_growth,
    ) = amplification(&gateway, &client, true).await;
    flood(&gateway, options, &mut report).await;
    let healthy = client
        .get(format!("{}/healthz", gateway.address))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200);
    report.survived = healthy && matches!(gateway.child.try_wait(), Ok(None));
    let _ = gateway.child.start_kill();
    let _ = gateway.child.wait().await;
    report
}

// ---------------------------------------------------------------------------------------
// Output

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB)
}

fn above(peak: u64, idle: u64) -> String {
    mib(peak.saturating_sub(idle))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn print(name: &str, report: &Report) {
    println!("== {name}");
    println!("idle VmRSS: {}", mib(report.idle_rss));
    println!(
        "amplification, unauthenticated: {:?} in {:.2} s, peak {} above idle",
        report.unauth_status,
        report.unauth_time.as_secs_f64(),
        above(report.unauth_peak, report.idle_rss)
    );
    println!(
        "amplification, with the write key: {:?} in {:.2} s, peak {} above idle, spool grew {}",
        report.auth_status,
        report.auth_time.as_secs_f64(),
        above(report.auth_peak, report.idle_rss),
        mib(report.auth_spool_growth)
    );
    println!(
        "flood: peak VmHWM {} (sampled VmRSS max {}), {} above idle; survived: {}",
        mib(report.flood_peak),
        mib(report.flood_max_rss),
        above(report.flood_peak, report.idle_rss),
        report.survived
    );
    println!("  4 MiB webhooks: {:?}", report.large);
    for (outcome, (count, after)) in &report.slow {
        println!(
            "  slow bodies: {count} {outcome} (the last after {:.1} s)",
            after.as_secs_f64()
        );
    }
    let mut latencies: Vec<Duration> = report.ordinary.iter().map(|(_, t)| *t).collect();
    latencies.sort();
    let mut statuses = BTreeMap::<String, usize>::new();
    for (status, _) in &report.ordinary {
        let key = status.map_or("no answer".into(), |s| s.to_string());
        *statuses.entry(key).or_default() += 1;
    }
    println!(
        "  ordinary requests: {} sent, answers {:?}, latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        report.ordinary.len(),
        statuses,
        percentile(&latencies, 0.5).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
    );
}

fn main() {
    let options = options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let extra = options.budget_mib.map_or(String::new(), |mib| {
        format!("\n[limits]\nbody_budget_bytes = {}\n", mib * 1024 * 1024)
    });
    let mut runs = vec![("this build", options.gateway.clone(), extra)];
    if let Some(baseline) = &options.baseline {
        runs.push(("baseline", baseline.clone(), String::new()));
    }
    let mut reports = Vec::new();
    for (name, binary, extra) in runs {
        eprintln!("[hostile] {name}: {}", binary.display());
        let report = runtime.block_on(run(&binary, &options, &extra));
        print(name, &report);
        reports.push((name, report));
    }
    if let [(_, new), (_, old)] = &reports[..] {
        let ratio = |a: u64, b: u64| a.max(1) as f64 / b.max(1) as f64;
        println!("== this build / baseline");
        println!(
            "unauthenticated amplification peak above idle: {:.3}",
            ratio(
                new.unauth_peak.saturating_sub(new.idle_rss),
                old.unauth_peak.saturating_sub(old.idle_rss)
            )
        );
        println!(
            "authenticated amplification spool growth: {:.3}",
            ratio(new.auth_spool_growth, old.auth_spool_growth)
        );
        println!(
            "flood peak VmHWM: {:.3}",
            ratio(new.flood_peak, old.flood_peak)
        );
    }
}
