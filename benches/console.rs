//! Console benchmark: what watching and the delivery log cost ingest, in the same run.
//!
//! `cargo bench --bench console [-- --seconds N --connections C --soak SECS]`
//!
//! Three gateways in this process (delivery off, as in `benches/ingest.rs`), each driven by
//! the same closed-loop load of `/v1/batch` requests of 100 events, in turns:
//! - **log**: the delivery log on (the default), nobody watching;
//! - **log + 10 live**: the same gateway with 10 clients reading `GET /api/live`;
//! - **no log**: `delivery_log.enabled = false`.
//!
//! Printed: events/s of each and the ratios (live / log, which must stay ≥ 0.95; log /
//! no log, the log's cost in throughput), the process CPU time per event of each, and the
//! spool file's bytes per event with and without the log. `--soak SECS` then drives the log
//! gateway (budget 8 MiB) for SECS seconds and prints the log's accounted size and the
//! spool file's size every 10 s.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use refiner_gateway::config::{DeliverySettings, Secret, Settings, SourceSettings};
use refiner_gateway::spool::delivery_log::DeliveryLog;
use refiner_gateway::startup::Application;

const WRITE_KEY: &str = "bench-write-key";
const ADMIN: &str = "bench-admin-token-0123456789";
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Gateway {
    url: String,
    dir: tempfile::TempDir,
    log: Option<Arc<dyn DeliveryLog>>,
}

async fn spawn_gateway(log: bool, max_bytes: Option<u64>) -> Gateway {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = Settings {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.path().to_path_buf(),
        admin_token: Some(Secret::new(ADMIN)),
        sources: vec![SourceSettings {
            slug: "default".into(),
            write_keys: vec![Secret::new(WRITE_KEY)],
            webhook_secret: None,
            refiner_api_key: Some(Secret::new("bench")),
            webhook_format: Default::default(),
        }],
        delivery: DeliverySettings {
            enabled: false,
            ..DeliverySettings::default()
        },
        ..Settings::default()
    };
    settings.delivery_log.enabled = log;
    if let Some(max_bytes) = max_bytes {
        settings.delivery_log.max_bytes = max_bytes;
    }
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = Application::build_with_listener(&settings, listener)
        .await
        .expect("gateway");
    let url = format!("http://127.0.0.1:{}", app.port());
    let log = app.backend().delivery_log;
    tokio::spawn(app.run_until_stopped());
    Gateway { url, dir, log }
}

fn batch_body(size: usize) -> String {
    let events: Vec<String> = (0..size)
        .map(|_| {
            let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
            format!(
                r#"{{"type":"track","messageId":"{:032x}","userId":"user-{}","event":"Order Completed","properties":{{"revenue":{},"currency":"USD","sku":"SKU-{}"}},"context":{{"library":{{"name":"analytics-node","version":"1.0"}},"ip":"10.0.0.1"}},"timestamp":"2026-11-23T10:00:00.000Z"}}"#,
                fastrand::u128(..),
                n % 5000,
                n % 997,
                n % 101
            )
        })
        .collect();
    format!(
        r#"{{"writeKey":"{WRITE_KEY}","batch":[{}]}}"#,
        events.join(",")
    )
}

/// Events accepted per second by `connections` closed-loop clients over `seconds`.
async fn drive(url: &str, connections: usize, seconds: u64) -> (f64, u64) {
    let stop = Arc::new(AtomicBool::new(false));
    let events = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (stop, events) = (stop.clone(), events.clone());
            let url = format!("{url}/v1/batch");
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                while !stop.load(Ordering::Relaxed) {
                    let response = client.post(&url).body(batch_body(100)).send().await;
                    if let Ok(r) = response {
                        if r.status().is_success() {
                            let _ = r.bytes().await;
                            events.fetch_add(100, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let n = events.load(Ordering::Relaxed);
    (n as f64 / started.elapsed().as_secs_f64(), n)
}

/// 10 clients reading `/api/live` until `stop`; returns the bytes they read.
fn watch(url: &str, clients: usize, stop: Arc<AtomicBool>) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..clients)
        .map(|_| {
            let (url, stop) = (format!("{url}/api/live"), stop.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut response = client
                    .get(&url)
                    .bearer_auth(ADMIN)
                    .send()
                    .await
                    .expect("live");
                let mut read = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    match tokio::time::timeout(Duration::from_millis(200), response.chunk()).await {
                        Ok(Ok(Some(chunk))) => read += chunk.len() as u64,
                        Ok(_) => break,
                        Err(_) => {}
                    }
                }
                read
            })
        })
        .collect()
}

/// Process CPU time (user + system), in ns.
fn cpu_ns() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    ticks * 10_000_000
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

async fn measured(name: &str, url: &str, connections: usize, seconds: u64) -> (f64, f64) {
    let cpu = cpu_ns();
    let (rate, events) = drive(url, connections, seconds).await;
    let per_event = (cpu_ns() - cpu) as f64 / events.max(1) as f64;
    println!(
        "{name:<16} {rate:>10.0} ev/s   {:>8.1} µs CPU/event (whole process)",
        per_event / 1000.0
    );
    (rate, per_event)
}

fn main() {
    let seconds = arg("--seconds", 10);
    let connections = arg("--connections", 16) as usize;
    let soak = arg("--soak", 0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let logged = spawn_gateway(true, None).await;
        let bare = spawn_gateway(false, None).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        println!("console benchmark: {seconds} s per run, {connections} connections, batches of 100");
        drive(&logged.url, connections, 1).await;
        drive(&bare.url, connections, 1).await;
        let (mut log, mut live, mut none) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..2 {
            log.push(measured("log", &logged.url, connections, seconds).await);
            let stop = Arc::new(AtomicBool::new(false));
            let watchers = watch(&logged.url, 10, stop.clone());
            tokio::time::sleep(Duration::from_millis(200)).await;
            live.push(measured("log + 10 live", &logged.url, connections, seconds).await);
            stop.store(true, Ordering::Relaxed);
            let mut read = 0;
            for w in watchers {
                read += w.await.unwrap_or(0);
            }
            println!("    the 10 live clients read {} MiB", read >> 20);
            none.push(measured("no log", &bare.url, connections, seconds).await);
        }
        let mean = |runs: &[(f64, f64)], i: usize| {
            runs.iter().map(|r| if i == 0 { r.0 } else { r.1 }).sum::<f64>() / runs.len() as f64
        };
        println!(
            "ratio live/log {:.3}   log/no-log {:.3}   CPU per event: log {:.1} µs, no log {:.1} µs (+{:.1} µs)",
            mean(&live, 0) / mean(&log, 0),
            mean(&log, 0) / mean(&none, 0),
            mean(&log, 1) / 1000.0,
            mean(&none, 1) / 1000.0,
            (mean(&log, 1) - mean(&none, 1)) / 1000.0,
        );
        let n = SEQUENCE.load(Ordering::Relaxed).max(1);
        if let Some(log) = &logged.log {
            let size = log.log_size().await.expect("log size");
            println!(
                "log: {} records, {} accounted bytes ({:.0} B/record); spool files: log gateway {} MiB, no-log gateway {} MiB ({} events sent in all)",
                size.records,
                size.bytes,
                size.bytes as f64 / size.records.max(1) as f64,
                dir_bytes(logged.dir.path()) >> 20,
                dir_bytes(bare.dir.path()) >> 20,
                n
            );
        }
        if soak > 0 {
            soak_run(soak, connections).await;
        }
    });
}

/// Drives a gateway with an 8 MiB log budget for `seconds`, printing its size every 10 s.
async fn soak_run(seconds: u64, connections: usize) {
    const BUDGET: u64 = 8 << 20;
    let g = spawn_gateway(true, Some(BUDGET)).await;
    let log = g.log.clone().expect("log");
    println!(
        "soak: {seconds} s, budget {} MiB; t, log records, log bytes, spool files MiB",
        BUDGET >> 20
    );
    let url = g.url.clone();
    let load = tokio::spawn(async move { drive(&url, connections / 2, seconds).await });
    let started = Instant::now();
    let mut max = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let size = log.log_size().await.expect("size");
        max = max.max(size.bytes);
        println!(
            "soak {:>4} s {:>8} {:>10} {:>6}",
            started.elapsed().as_secs(),
            size.records,
            size.bytes,
            dir_bytes(g.dir.path()) >> 20
        );
    }
    let (rate, _) = load.await.unwrap_or((0.0, 0));
    println!("soak: {rate:.0} ev/s; largest log {max} bytes of a {BUDGET} budget");
}
