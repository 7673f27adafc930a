//! What 24 h of dedup costs in distributed mode: the resident memory of `nats-server` and
//! of a gateway node, sampled over a run at the highest rate this machine sustains, and
//! extrapolated to 24 h at 1,000 events/s (86.4 million ids).
//!
//! Two ways, in the same run:
//! - **owners' index** (the default): JetStream's duplicate window short
//!   (`nats.duplicate_window_secs`, `BENCH_WINDOW_SECS` here, 30 s by default so the run
//!   reaches its steady state), the 24 h promise kept by the partition owners' index
//!   (journal and Bloom-filtered runs in the `GATEWAY_DEDUP` stream, run files on the node);
//! - **server memory** (the former default): JetStream's duplicate window 24 h and the
//!   `gateway_dedup` key-value bucket.
//!
//! One `refiner-gateway serve` node (release build) against one `nats-server`, delivering to
//! the Refiner simulator in this process; `SENDERS` requests of `BATCH` distinct events in
//! flight for `BENCH_SECS` (600 by default; `BENCH_BASELINE_SECS`, 300, for the former
//! way), at most `BENCH_RATE` events/s (0, the default: as fast as answered; set it to what
//! delivery keeps up with, or the backlog's own memory shows in the figures), then until
//! everything accepted was delivered. Each sample prints the seconds, the
//! ids accepted, and both processes' RSS (the node's also split into heap and stacks, and
//! mapped files: the runs' Bloom filters and fences). Memory per id is the growth of RSS per accepted
//! id after the warm-up: least squares over the samples past `BENCH_WINDOW_SECS` plus 60 s
//! and, for the owners' index, also past its first compaction (`nats.dedup_flush`, 300 s,
//! plus 60 s: until then the index's heaps, runs and the delivery log are still filling
//! up, a step the steady state does not repeat). Each row names where its fit starts.
//! Run with `cargo bench --bench nats_dedup`; needs `nats-server` (see
//! `src/spool/nats/testing.rs`).

use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use refiner_gateway::sim::{self, SimOptions};
use refiner_gateway::spool::nats::testing::NatsServer;
use serde_json::json;
use tokio::process::{Child, Command};

const BINARY: &str = env!("CARGO_BIN_EXE_refiner-gateway");
const WRITE_KEY: &str = "bench-write-key";
const REFINER_KEY: &str = "bench-refiner-key";
const USERS: usize = 2_000;
const BATCH: usize = 100;
const SENDERS: usize = 8;
const DAY_IDS: f64 = 86_400.0 * 1_000.0;

fn env_secs(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The `[nats]` lines of each way.
fn nats_settings(index: bool, window: u64, dir: &Path) -> String {
    if index {
        format!(
            "dedup_bucket = \"\"\ndedup_stream = \"GATEWAY_DEDUP\"\nduplicate_window_secs = {window}\ndedup_dir = \"{}\"\n",
            dir.join("dedup").display()
        )
    } else {
        "dedup_bucket = \"gateway_dedup\"\ndedup_stream = \"\"\n".into()
    }
}

async fn start_node(nats_url: &str, sim_url: &str, dir: &Path, nats: &str) -> (Child, String) {
    let port = free_port();
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            r#"
listen = "127.0.0.1:{port}"
data_dir = "{data}"
log_format = "text"

[refiner]
base_url = "{sim_url}"

[spool]
backend = "nats"

[nats]
url = "{nats_url}"
node_name = "bench"
{nats}
[[sources]]
slug = "default"
write_keys = ["{WRITE_KEY}"]
refiner_api_key = "{REFINER_KEY}"
"#,
            data = dir.join("data").display(),
        ),
    )
    .expect("config");
    let mut command = Command::new(BINARY);
    command
        .args(["serve", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env("RUST_LOG", "error")
        .kill_on_drop(true);
    for (variable, _) in refiner_gateway::config::ENV_VARS {
        command.env_remove(variable);
    }
    let child = command.spawn().expect("spawn the gateway");
    let address = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !matches!(
        client.get(format!("{address}/readyz")).send().await,
        Ok(r) if r.status() == 200
    ) {
        assert!(Instant::now() < deadline, "the node did not get ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (child, address)
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

/// One memory line of `/proc/<pid>/status` (`VmRSS:`, `RssAnon:`, `RssFile:`), in bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// One sample: seconds, ids accepted, server RSS, node RSS.
type Sample = (f64, f64, f64, f64);

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return f64::NAN;
    }
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    num / den
}

/// Sends batches of distinct events until `stop`: as fast as they are answered, or at most
/// `rate` events per second (`BENCH_RATE`; 0: no limit).
fn senders(
    address: &str,
    accepted: &Arc<AtomicUsize>,
    stop: &Arc<AtomicBool>,
    rate: u64,
) -> Vec<tokio::task::JoinHandle<()>> {
    let started = Instant::now();
    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:"))
    );
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    (0..SENDERS)
        .map(|_| {
            let (client, next, address, auth, accepted, stop) = (
                client.clone(),
                next.clone(),
                address.to_string(),
                auth.clone(),
                accepted.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let b = next.fetch_add(1, Ordering::Relaxed);
                    if rate > 0 {
                        let due = Duration::from_secs_f64((b * BATCH) as f64 / rate as f64);
                        tokio::time::sleep_until((started + due).into()).await;
                    }
                    let batch: Vec<serde_json::Value> = (0..BATCH)
                        .map(|i| {
                            let n = b * BATCH + i;
                            json!({
                                "type": "track",
                                "userId": format!("user-{}", n % USERS),
                                "event": "e",
                                "messageId": format!("{}", uuid::Uuid::from_u128(n as u128 + 1)),
                            })
                        })
                        .collect();
                    loop {
                        let status = client
                            .post(format!("{address}/v1/batch"))
                            .header("Authorization", &auth)
                            .json(&json!({ "batch": batch }))
                            .send()
                            .await
                            .map(|r| r.status().as_u16());
                        if matches!(status, Ok(200)) {
                            accepted.fetch_add(BATCH, Ordering::Relaxed);
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect()
}

async fn run(index: bool, secs: u64, window: u64, rate: u64) -> Option<Vec<Sample>> {
    let server = NatsServer::start("nats dedup benchmark")?;
    let server_pid = server.pid()?;
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let sim = sim::spawn(
        listener,
        SimOptions {
            log_capacity: 1_000,
            ..SimOptions::with_key(REFINER_KEY)
        },
    )
    .await
    .expect("simulator");
    let (child, address) = start_node(
        &server.url(),
        &sim.url(),
        dir.path(),
        &nats_settings(index, window, dir.path()),
    )
    .await;
    let node_pid = child.id()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = senders(&address, &accepted, &stop, rate);
    let started = Instant::now();
    let mut samples = Vec::new();
    let sample = |samples: &mut Vec<Sample>| {
        let s = (
            started.elapsed().as_secs_f64(),
            accepted.load(Ordering::Relaxed) as f64,
            rss(server_pid) as f64,
            rss(node_pid) as f64,
        );
        println!(
            "  {:>5.0} s  {:>9.0} ids  nats-server {:>7.1} MiB  node {:>6.1} MiB (heap and stacks {:>6.1}, mapped files {:>5.1})",
            s.0,
            s.1,
            s.2 / 1048576.0,
            s.3 / 1048576.0,
            status_bytes(node_pid, "RssAnon:") as f64 / 1048576.0,
            status_bytes(node_pid, "RssFile:") as f64 / 1048576.0,
        );
        samples.push(s);
    };
    sample(&mut samples);
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        sample(&mut samples);
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let total = accepted.load(Ordering::Relaxed) as u64;
    let state = sim.state();
    let deadline = Instant::now() + Duration::from_secs(900);
    while state.call_stats().total < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    println!("  delivered {} of {total}", state.call_stats().total);
    sample(&mut samples);
    let mut child = child;
    let _ = child.kill().await;
    sim.stop().await;
    Some(samples)
}

fn report(name: &str, samples: &[Sample], warm_up: f64) {
    if samples.iter().filter(|s| s.0 >= warm_up).count() < 3 {
        return;
    }
    let Some(last) = samples.last() else { return };
    let steady: Vec<&Sample> = samples.iter().filter(|s| s.0 >= warm_up).collect();
    let server: Vec<(f64, f64)> = steady.iter().map(|s| (s.1, s.2)).collect();
    let node: Vec<(f64, f64)> = steady.iter().map(|s| (s.1, s.3)).collect();
    let (server_per_id, node_per_id) = (slope(&server).max(0.0), slope(&node).max(0.0));
    let rate = samples
        .iter()
        .rev()
        .nth(1)
        .map_or(0.0, |s| s.1 / s.0.max(1.0));
    println!(
        "| {name} | {rate:.0} | {:.2} M | {:.0} / {:.0} MiB | {warm_up:.0} s | {server_per_id:.1} | {node_per_id:.1} | {:.1} GiB | {:.1} GiB |",
        last.1 / 1e6,
        last.2 / 1048576.0,
        last.3 / 1048576.0,
        (last.2 + server_per_id * (DAY_IDS - last.1).max(0.0)) / 1073741824.0,
        (last.3 + node_per_id * (DAY_IDS - last.1).max(0.0)) / 1073741824.0,
    );
}

fn main() {
    let secs = env_secs("BENCH_SECS", 600);
    let baseline_secs = env_secs("BENCH_BASELINE_SECS", 300);
    let window = env_secs("BENCH_WINDOW_SECS", 30);
    let rate = env_secs("BENCH_RATE", 0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "nats dedup: distinct ids in batches of {BATCH}, {SENDERS} requests in flight, at most {rate} events/s (0: no limit), one node, one nats-server, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut results = Vec::new();
    for (name, index, secs) in [
        ("owners' index", true, secs),
        (
            "server memory (24 h window + KV bucket)",
            false,
            baseline_secs,
        ),
    ] {
        println!("{name}, {secs} s:");
        let Some(samples) = runtime.block_on(run(index, secs, window, rate)) else {
            return;
        };
        results.push((name, samples));
    }
    println!();
    println!("| way | events/s | ids | RSS at the end, nats-server / node | fit from | server bytes per id | node bytes per id | 24 h at 1,000/s, server | 24 h at 1,000/s, node |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (i, (name, samples)) in results.iter().enumerate() {
        report(name, samples, window as f64 + 60.0);
        if i == 0 {
            // After the owners' first compaction (`nats.dedup_flush`, 300 s).
            report(name, samples, (window as f64 + 60.0).max(360.0));
        }
    }
}
