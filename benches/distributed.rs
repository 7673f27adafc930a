//! Distributed mode throughput: one and two `refiner-gateway serve` processes against one
//! JetStream (a `nats-server` this benchmark starts on loopback), delivering to the Refiner
//! simulator in this process.
//!
//! For each node count it sends `EVENTS` track events for `USERS` users in batches of
//! `BATCH`, `SENDERS` requests at a time spread over the nodes, and reports
//!   - ingest: events per second answered 200 (every event acknowledged by JetStream), and
//!   - end to end: events per second from the first request until the simulator has
//!     received every event (one Refiner call per event, per-user order kept).
//!
//! Everything shares one machine: the load generator, the simulator, the nodes and the
//! server. Run with `cargo bench --bench distributed` (release build); `BENCH_EVENTS`
//! changes the event count. Needs `nats-server` (see `src/spool/nats/testing.rs`).

use std::collections::HashSet;
use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

async fn start_node(
    name: &str,
    nats_url: &str,
    sim_url: &str,
    dir: &Path,
    dedup_bucket: bool,
) -> (Child, String) {
    let port = free_port();
    let config = dir.join(format!("{name}.toml"));
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
ownership_ttl_secs = 2
node_name = "{name}"
dedup_bucket = "{dedup}"

[[sources]]
slug = "default"
write_keys = ["{WRITE_KEY}"]
refiner_api_key = "{REFINER_KEY}"
"#,
            data = dir.join(name).display(),
            dedup = if dedup_bucket { "gateway_dedup" } else { "" },
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
        assert!(Instant::now() < deadline, "{name} did not get ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (child, address)
}

struct Run {
    ingest_per_sec: f64,
    end_to_end_per_sec: f64,
    duplicates: usize,
}

async fn run(nodes: usize, events: usize, dedup_bucket: bool) -> Option<Run> {
    let server = NatsServer::start("distributed benchmark")?;
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let sim = sim::spawn(
        listener,
        SimOptions {
            log_capacity: events * 2,
            ..SimOptions::with_key(REFINER_KEY)
        },
    )
    .await
    .expect("simulator");
    let mut children = Vec::new();
    let mut addresses = Vec::new();
    for n in 0..nodes {
        let (child, address) = start_node(
            &format!("node-{n}"),
            &server.url(),
            &sim.url(),
            dir.path(),
            dedup_bucket,
        )
        .await;
        children.push(child);
        addresses.push(address);
    }
    // Let the nodes share the partitions out.
    tokio::time::sleep(Duration::from_secs(if nodes > 1 { 3 } else { 1 })).await;

    let auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:"))
    );
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let batches = events / BATCH;
    let started = Instant::now();
    let mut senders = Vec::new();
    for _ in 0..SENDERS {
        let (client, next, addresses, auth) = (
            client.clone(),
            next.clone(),
            addresses.clone(),
            auth.clone(),
        );
        senders.push(tokio::spawn(async move {
            loop {
                let b = next.fetch_add(1, Ordering::Relaxed);
                if b >= batches {
                    break;
                }
                let batch: Vec<serde_json::Value> = (0..BATCH)
                    .map(|i| {
                        let n = b * BATCH + i;
                        json!({
                            "type": "track",
                            "userId": format!("user-{}", n % USERS),
                            "event": format!("e{n}"),
                            "messageId": format!("m{n}"),
                        })
                    })
                    .collect();
                let address = &addresses[b % addresses.len()];
                loop {
                    let status = client
                        .post(format!("{address}/v1/batch"))
                        .header("Authorization", &auth)
                        .json(&json!({ "batch": batch }))
                        .send()
                        .await
                        .map(|r| r.status().as_u16());
                    if matches!(status, Ok(200)) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    for sender in senders {
        sender.await.expect("sender");
    }
    let ingest = started.elapsed();
    let state = sim.state();
    let deadline = Instant::now() + Duration::from_secs(600);
    let duplicates = loop {
        let calls = state.call_stats();
        if calls.total as usize >= batches * BATCH {
            let all = state.calls();
            let distinct: HashSet<String> = all
                .iter()
                .filter(|c| c.path == "/v1/track-event" && c.status == Some(200))
                .filter_map(|c| c.params.get("event").and_then(|e| e.as_str()))
                .map(str::to_owned)
                .collect();
            if distinct.len() >= batches * BATCH {
                break all.len() - distinct.len();
            }
        }
        assert!(Instant::now() < deadline, "delivery did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let end_to_end = started.elapsed();
    for mut child in children {
        let _ = child.kill().await;
    }
    sim.stop().await;
    let total = (batches * BATCH) as f64;
    Some(Run {
        ingest_per_sec: total / ingest.as_secs_f64(),
        end_to_end_per_sec: total / end_to_end.as_secs_f64(),
        duplicates,
    })
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn dir_size(path: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            let p = entry.path();
            total += if p.is_dir() {
                dir_size(&p)
            } else {
                entry.metadata().map_or(0, |m| m.len())
            };
        }
    }
    total
}

/// The 24 h dedup promise two ways, for `ids` distinct message ids: JetStream's duplicate
/// window on the events stream (ids kept in the server's memory for the window), or a
/// key-value bucket with a 24 h TTL (one key per id, created before each publish).
/// Returns (µs per event, server memory growth in bytes per id, store growth per id).
async fn dedup_cost(kv_bucket: bool, ids: usize) -> Option<(f64, f64, f64)> {
    use async_nats::jetstream::{self, kv, stream};
    let server = NatsServer::start("dedup cost")?;
    let client = async_nats::connect(server.url()).await.expect("connect");
    let js = jetstream::new(client);
    let day = Duration::from_secs(24 * 3600);
    js.create_stream(stream::Config {
        name: "DEDUP".into(),
        subjects: vec!["dedup.*".into()],
        retention: stream::RetentionPolicy::WorkQueue,
        duplicate_window: if kv_bucket {
            Duration::from_secs(1)
        } else {
            day
        },
        ..Default::default()
    })
    .await
    .expect("stream");
    let bucket = if kv_bucket {
        Some(
            js.create_key_value(kv::Config {
                bucket: "dedup_ids".into(),
                history: 1,
                max_age: day,
                ..Default::default()
            })
            .await
            .expect("bucket"),
        )
    } else {
        None
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = server.pid()?;
    let (rss_before, disk_before) = (rss(pid), dir_size(server.store()));
    let started = Instant::now();
    let payload = vec![b'x'; 300];
    for chunk in 0..ids / 1000 {
        let mut acks = Vec::with_capacity(1000);
        for i in 0..1000 {
            let id = format!(
                "default:{}",
                uuid::Uuid::from_u128((chunk * 1000 + i) as u128 + 1)
            );
            let subject = format!("dedup.{}", i % 16);
            match &bucket {
                Some(bucket) => {
                    bucket
                        .create(id.replace(':', "_"), "".into())
                        .await
                        .expect("create");
                    acks.push(
                        js.publish(subject, payload.clone().into())
                            .await
                            .expect("publish"),
                    );
                }
                None => {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", id.as_str());
                    acks.push(
                        js.publish_with_headers(subject, headers, payload.clone().into())
                            .await
                            .expect("publish"),
                    );
                }
            }
        }
        for ack in acks {
            ack.await.expect("ack");
        }
    }
    let elapsed = started.elapsed();
    // Acked events leave a work queue; what stays is the dedup state.
    let purge = js.get_stream("DEDUP").await.expect("stream");
    purge.purge().await.expect("purge");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss_after, disk_after) = (rss(pid), dir_size(server.store()));
    Some((
        elapsed.as_secs_f64() * 1e6 / ids as f64,
        rss_after.saturating_sub(rss_before) as f64 / ids as f64,
        disk_after.saturating_sub(disk_before) as f64 / ids as f64,
    ))
}

fn main() {
    let events: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "distributed: {events} track events, {USERS} users, batches of {BATCH}, {SENDERS} requests in flight, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| nodes | dedup bucket | ingest (events/s, 200 = JetStream ack) | end to end (events/s) | duplicates |");
    println!("| --- | --- | --- | --- | --- |");
    for dedup_bucket in [true, false] {
        for nodes in [1, 2] {
            let Some(result) = runtime.block_on(run(nodes, events, dedup_bucket)) else {
                return;
            };
            println!(
                "| {nodes} | {} | {:.0} | {:.0} | {} |",
                if dedup_bucket { "on" } else { "off" },
                result.ingest_per_sec,
                result.end_to_end_per_sec,
                result.duplicates
            );
        }
    }
    let ids: usize = std::env::var("BENCH_DEDUP_IDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    println!();
    println!("dedup for 24 h, {ids} distinct message ids (300-byte events, 16 subjects):");
    println!("| way | µs per event (sequential chunks of 1000) | server memory per id (bytes) | store per id (bytes) |");
    println!("| --- | --- | --- | --- |");
    for (name, kv) in [
        ("stream duplicate window 24 h", false),
        ("KV bucket, TTL 24 h", true),
    ] {
        if let Some((us, mem, disk)) = runtime.block_on(dedup_cost(kv, ids)) {
            println!("| {name} | {us:.1} | {mem:.0} | {disk:.0} |");
        }
    }
}
