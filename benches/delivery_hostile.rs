//! Delivery under the workloads that hurt, each against a baseline measured in the same run.
//!
//! `cargo bench --bench delivery_hostile [-- --only outage|held|hot|rates|refusals]
//! [--held N] [--spool nats [--max-ack-pending N]]`
//!
//! The gateway and the Refiner stand-in (`refiner-sim`) run as processes of their own, as
//! in production; everything is on 127.0.0.1 and every loop is bounded. With `--spool
//! nats` the gateways queue in JetStream instead of the embedded spool: each scenario
//! starts a `nats-server` of its own (see `src/spool/nats/testing.rs`), and
//! `--max-ack-pending` sets the gateways' `nats.max_ack_pending`; 2a, which drives the
//! embedded spool alone, is skipped.
//!
//! 1. **outage**: Refiner refuses connections and one user has a 20,000-event backlog. The
//!    gateway's CPU over 10 s (a share of one core), and its ingest rate in that state
//!    against a gateway with delivery off (single events, alternating runs).
//! 2. **held**: the lease path with a backlog of events of held users. In the spool alone:
//!    for backlogs of 10k, 100k and 1M events of 1,000 held users, how long the leases
//!    take to move them aside once (per event), and then how long a lease takes to return
//!    one free user's event (the curve must be flat). Through the gateway: 1,000 users held
//!    for a retry (503 with Retry-After 600 s), `--held` (1,000,000) of their events
//!    accepted, then one free user's event: the time until Refiner gets it.
//! 3. **hot**: one user's 2,000 tracks against 2,000 users × 1 track, Refiner answering in
//!    5 ms: drain rates and their ratio.
//! 4. **rates**: 12,800 events over 1,280 users at 50 ms latency against the ceiling
//!    C / L = 64 / 0.05 s, and 30,000 events over 10,000 users at 0 ms against a raw
//!    client (64 reqwest tasks) driving the same `refiner-sim` process.
//! 5. **refusals**: Refiner answers every call 401 (the key refused; rechecked every 2 s),
//!    then every call 429 (Retry-After 1 s), while 20,000 events of 1,000 users (and, for
//!    401, of 10,000 users) wait: the gateway's CPU and the calls Refiner got over 10 s;
//!    then Refiner recovers and the backlog's drain rate is compared with the same backlog
//!    drained by a gateway that was never refused.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use refiner_gateway::spool::conformance::{event, request};
use refiner_gateway::spool::nats::testing::NatsServer;
use refiner_gateway::spool::{Spool, SqliteSpool, SqliteSpoolOptions};
use refiner_gateway::telemetry::Metrics;
use serde_json::{json, Value};

const WRITE_KEY: &str = "bench-write-key";
const API_KEY: &str = "bench-refiner-key";
const GATEWAY: &str = env!("CARGO_BIN_EXE_refiner-gateway");
const SIM: &str = env!("CARGO_BIN_EXE_refiner-sim");

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .find(|pair| pair[0] == name)
        .map(|pair| pair[1].clone())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A child process, killed when dropped.
struct Proc {
    child: Child,
    /// Base URL: the simulator's `/v1` API, or the gateway's root.
    url: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// CPU time (user + system) the process has used, in seconds.
    fn cpu_secs(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("/proc/<pid>/stat");
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // After the command: state is field 3, utime 14, stime 15 (1-based).
        let ticks: f64 =
            fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0);
        ticks / 100.0
    }

    /// The simulator's root (where `/_sim` lives).
    fn root(&self) -> String {
        self.url.trim_end_matches("/v1").to_string()
    }
}

/// Starts `refiner-sim` with `args` on a free port.
fn start_sim(args: &[&str]) -> Proc {
    let mut child = Command::new(SIM)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--api-key",
            API_KEY,
            "--log-capacity",
            "1000",
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn refiner-sim");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("the simulator's URL");
    Proc {
        child,
        url: line.trim().to_string(),
    }
}

/// Whether the gateways queue in JetStream (`--spool nats`) rather than the embedded spool.
fn on_nats() -> bool {
    arg("--spool").as_deref() == Some("nats")
}

/// Where one scenario's gateways keep their queue: their data directory, or (`--spool
/// nats`) a `nats-server` of the scenario's own, stopped when this is dropped.
struct Queue(Option<NatsServer>);

impl Queue {
    fn new() -> Queue {
        if !on_nats() {
            return Queue(None);
        }
        let server = NatsServer::start("delivery_hostile")
            .expect("--spool nats needs nats-server (see src/spool/nats/testing.rs)");
        Queue(Some(server))
    }

    /// The configuration lines that put a gateway on this queue; every gateway is a node
    /// of its own name.
    fn settings(&self) -> String {
        static NODES: AtomicUsize = AtomicUsize::new(0);
        match &self.0 {
            None => String::new(),
            Some(server) => format!(
                "[spool]\nbackend = \"nats\"\n[nats]\nurl = \"{}\"\nnode_name = \"bench-{}\"\n{}",
                server.url(),
                NODES.fetch_add(1, Ordering::Relaxed),
                arg("--max-ack-pending")
                    .map(|n| format!("max_ack_pending = {n}\n"))
                    .unwrap_or_default(),
            ),
        }
    }
}

/// The gateway's configuration: one source, delivery as given, queued in `queue`.
fn config(dir: &Path, refiner: &str, delivery: &str, queue: &Queue) -> String {
    format!(
        r#"listen = "127.0.0.1:{port}"
data_dir = "{dir}"
log_format = "json"
[refiner]
base_url = "{refiner}"
[delivery]
{delivery}
{queue}
[[sources]]
slug = "default"
write_keys = ["{WRITE_KEY}"]
refiner_api_key = "{API_KEY}"
"#,
        port = free_port(),
        dir = dir.join("data").display(),
        queue = queue.settings(),
    )
}

/// Starts `refiner-gateway serve` with `config` and waits until it is ready.
async fn start_gateway(dir: &Path, config: String) -> Proc {
    let file = dir.join("gateway.toml");
    std::fs::write(&file, &config).expect("config file");
    let listen = config
        .lines()
        .find_map(|l| l.strip_prefix("listen = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("listen")
        .to_string();
    let log = std::fs::File::create(dir.join("gateway.log")).expect("log file");
    let child = Command::new(GATEWAY)
        .args(["serve", "--config"])
        .arg(&file)
        .env("RUST_LOG", "warn")
        .stdout(log)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn refiner-gateway");
    let gateway = Proc {
        child,
        url: format!("http://{listen}"),
    };
    let client = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(response) = client.get(format!("{}/readyz", gateway.url)).send().await {
            if response.status().is_success() {
                return gateway;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway was not ready within 30 s");
}

fn track(user: &str, n: usize) -> Value {
    json!({"type": "track", "userId": user, "event": "Report Exported",
           "messageId": format!("{user}-{n}-{}", fastrand::u64(..))})
}

/// Posts `events` as batches of `per_request`, `concurrency` requests at a time.
async fn post_batches(gateway: &str, events: Vec<Value>, per_request: usize, concurrency: usize) {
    let client = reqwest::Client::new();
    let url = format!("{gateway}/v1/batch");
    let bodies: Vec<String> = events
        .chunks(per_request)
        .map(|chunk| json!({"writeKey": WRITE_KEY, "batch": chunk}).to_string())
        .collect();
    let queue = Arc::new(std::sync::Mutex::new(bodies));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, url, queue) = (client.clone(), url.clone(), queue.clone());
            tokio::spawn(async move {
                loop {
                    let Some(body) = queue.lock().expect("queue").pop() else {
                        break;
                    };
                    let status = client
                        .post(&url)
                        .body(body)
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                        .unwrap_or(0);
                    assert_eq!(status, 200, "ingest failed");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("sender");
    }
}

/// Single-event requests from `connections` clients for `seconds`: requests answered 200
/// per second.
async fn ingest_rate(gateway: &str, connections: usize, seconds: u64) -> f64 {
    let url = format!("{gateway}/v1/track");
    closed_loop(reqwest::Client::new(), connections, seconds, move |client, c, n| {
        let body = json!({"writeKey": WRITE_KEY, "userId": format!("user-{}", (c as u64 * 7919 + n) % 1000),
                          "event": "Report Exported", "messageId": format!("i-{c}-{n}-{}", fastrand::u64(..))});
        client.post(&url).json(&body)
    })
    .await
}

/// `tasks` clients each sending the request `make(client, task, n)` as soon as the previous
/// one is answered, for `seconds`: requests answered 2xx per second.
async fn closed_loop<F>(client: reqwest::Client, tasks: usize, seconds: u64, make: F) -> f64
where
    F: Fn(&reqwest::Client, usize, u64) -> reqwest::RequestBuilder + Send + Sync + 'static,
{
    let make = Arc::new(make);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let (client, make, stop, done) =
                (client.clone(), make.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let ok = make(&client, task, n)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if ok {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for handle in handles {
        let _ = handle.await;
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

async fn sim_stats(sim: &Proc) -> Value {
    reqwest::get(format!("{}/_sim/stats", sim.root()))
        .await
        .expect("/_sim/stats")
        .json()
        .await
        .expect("stats JSON")
}

/// Track events stored by the simulator.
async fn sim_events(sim: &Proc) -> u64 {
    sim_stats(sim).await["events_total"].as_u64().unwrap_or(0)
}

async fn sim_reset(sim: &Proc) {
    reqwest::Client::new()
        .post(format!("{}/_sim/reset", sim.root()))
        .send()
        .await
        .expect("/_sim/reset");
}

/// Waits until the simulator has stored `target` track events; the rate from the first
/// one to the last, in events per second.
async fn drain_rate(sim: &Proc, target: u64, limit: Duration) -> f64 {
    let started = Instant::now();
    let mut first: Option<(Instant, u64)> = None;
    loop {
        let events = sim_events(sim).await;
        if first.is_none() && events > 0 {
            first = Some((Instant::now(), events));
        }
        if events >= target {
            let (at, n0) = first.expect("first event seen");
            let elapsed = at.elapsed().as_secs_f64().max(1e-3);
            return (target - n0) as f64 / elapsed;
        }
        assert!(
            started.elapsed() < limit,
            "not drained within {limit:?}: {events}/{target}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

// ---------------------------------------------------------------------------------------

async fn outage() {
    println!("\n## 1. Refiner refusing connections, one user's 20,000-event backlog");
    let refused = format!("http://127.0.0.1:{}/v1", free_port());
    let dir = tempdir();
    let queue = Queue::new();
    let gateway = start_gateway(
        dir.path(),
        config(dir.path(), &refused, "enabled = true", &queue),
    )
    .await;
    let hot: Vec<Value> = (0..20_000).map(|n| track("hot-user", n)).collect();
    post_batches(&gateway.url, hot, 100, 4).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (cpu0, t0) = (gateway.cpu_secs(), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let share = (gateway.cpu_secs() - cpu0) / t0.elapsed().as_secs_f64();
    println!(
        "gateway CPU over 10 s: {:.1} % of a core (target < 10 %)",
        share * 100.0
    );

    let off_dir = tempdir();
    let off_queue = Queue::new();
    let off = start_gateway(
        off_dir.path(),
        config(off_dir.path(), &refused, "enabled = false", &off_queue),
    )
    .await;
    let (mut outage_rates, mut off_rates) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        off_rates.push(ingest_rate(&off.url, 32, 5).await);
        outage_rates.push(ingest_rate(&gateway.url, 32, 5).await);
    }
    let (a, b) = (mean(&outage_rates), mean(&off_rates));
    println!(
        "ingest, single events, 32 connections: in the outage {a:.0} req/s {outage_rates:.0?}, \
         delivery off {b:.0} req/s {off_rates:.0?}: ratio {:.2} (target >= 0.9)",
        a / b
    );
    let share_after = {
        let (cpu0, t0) = (gateway.cpu_secs(), Instant::now());
        tokio::time::sleep(Duration::from_secs(10)).await;
        (gateway.cpu_secs() - cpu0) / t0.elapsed().as_secs_f64()
    };
    println!(
        "gateway CPU over the next 10 s, after the ingest runs added to the backlog: {:.1} % of a core",
        share_after * 100.0
    );
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// The spool alone: moving a held backlog aside, then leasing a free user's event.
async fn lease_curve() {
    println!("\n## 2a. Leasing with a backlog of held users (spool alone, 1,000 held users)");
    println!("| held events | moved aside in | per event | lease of a free event (median of 50) |");
    println!("| --- | --- | --- | --- |");
    for held in [10_000usize, 100_000, 1_000_000] {
        let dir = tempdir();
        let spool: Arc<dyn Spool> = Arc::new(
            SqliteSpool::open(SqliteSpoolOptions::new(dir.path()), Metrics::new()).expect("spool"),
        );
        let users: Vec<String> = (0..1000).map(|u| format!("u:held-{u}")).collect();
        let firsts = users
            .iter()
            .map(|u| event(&format!("{u}-first"), u))
            .collect();
        spool
            .append(request("bench", 0, firsts))
            .await
            .expect("append");
        let leased = spool.lease(1000, 3_600_000).await.expect("lease");
        assert_eq!(leased.len(), 1000, "every user held");
        for chunk in (0..held).collect::<Vec<_>>().chunks(1000) {
            let events = chunk
                .iter()
                .map(|n| event(&format!("h-{n}"), &users[n % users.len()]))
                .collect();
            spool
                .append(request("bench", 0, events))
                .await
                .expect("append");
        }
        // Cold: the leases read through the backlog once, moving it aside, until the free
        // user's event comes out.
        spool
            .append(request("bench", 0, vec![event("free-0", "free-0")]))
            .await
            .expect("append");
        let started = Instant::now();
        loop {
            let out = spool.lease(256, 3_600_000).await.expect("lease");
            if !out.is_empty() {
                assert_eq!(out[0].message_id, "free-0");
                spool.ack(vec![out[0].seq]).await.expect("ack");
                break;
            }
        }
        let cold = started.elapsed();
        // Warm: a free user's event with the backlog moved aside.
        let mut warm = Vec::new();
        for i in 1..=50 {
            let id = format!("free-{i}");
            spool
                .append(request("bench", 0, vec![event(&id, &id.to_string())]))
                .await
                .expect("append");
            let started = Instant::now();
            let out = spool.lease(256, 3_600_000).await.expect("lease");
            warm.push(started.elapsed());
            assert_eq!(out.len(), 1, "the free event alone");
            spool.ack(vec![out[0].seq]).await.expect("ack");
        }
        warm.sort();
        println!(
            "| {held} | {:.0} ms | {:.2} µs | {:.2} ms |",
            cold.as_secs_f64() * 1e3,
            cold.as_secs_f64() * 1e6 / held as f64,
            warm[warm.len() / 2].as_secs_f64() * 1e3
        );
        spool.close().await;
    }
}

/// Through the gateway: a free user's event behind a large backlog of held users.
async fn held(backlog: usize) {
    println!(
        "\n## 2b. {backlog} events of 1,000 users held for a retry, then one free user's event"
    );
    let sim = start_sim(&[
        "--count-503",
        "1000",
        "--retry-after-on-503",
        "--retry-after",
        "600",
    ]);
    let dir = tempdir();
    let delivery = "enabled = true\nbreaker_failures = 1000000\nmax_concurrency = 64\ninitial_concurrency = 64";
    let queue = Queue::new();
    let gateway = start_gateway(dir.path(), config(dir.path(), &sim.url, delivery, &queue)).await;
    let firsts: Vec<Value> = (0..1000).map(|u| track(&format!("held-{u}"), 0)).collect();
    post_batches(&gateway.url, firsts, 100, 4).await;
    let started = Instant::now();
    while sim_stats(&sim).await["calls"]["total"]
        .as_u64()
        .unwrap_or(0)
        < 1000
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the first calls"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let backlog_events: Vec<Value> = (0..backlog)
        .map(|n| track(&format!("held-{}", n % 1000), n + 1))
        .collect();
    post_batches(&gateway.url, backlog_events, 500, 8).await;
    println!(
        "accepted the backlog in {:.1} s ({:.0} events/s)",
        started.elapsed().as_secs_f64(),
        backlog as f64 / started.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = sim_events(&sim).await;
    let started = Instant::now();
    post_batches(&gateway.url, vec![track("free-user", 0)], 1, 1).await;
    while sim_events(&sim).await <= before {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the free event"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    println!(
        "the free user's event reached Refiner {:.0} ms after it was accepted (target < 1 s)",
        started.elapsed().as_secs_f64() * 1e3
    );
}

/// Fills a queue with `events` through a gateway with delivery off, then starts one with
/// `delivery` on the same queue: its drain rate.
async fn fill_and_drain(sim: &Proc, events: Vec<Value>, delivery: &str) -> f64 {
    let (dir, queue) = (tempdir(), Queue::new());
    let count = events.len() as u64;
    let refused = format!("http://127.0.0.1:{}/v1", free_port());
    {
        let off = config(dir.path(), &refused, "enabled = false", &queue);
        let filler = start_gateway(dir.path(), off).await;
        post_batches(&filler.url, events, 500, 4).await;
    }
    sim_reset(sim).await;
    let on = config(dir.path(), &sim.url, delivery, &queue);
    let _gateway = start_gateway(dir.path(), on).await;
    drain_rate(sim, count, Duration::from_secs(600)).await
}

const FAST: &str =
    "enabled = true\nmax_concurrency = 64\ninitial_concurrency = 64\npoll_interval_ms = 5";

async fn hot() {
    println!("\n## 3. One hot user against many users, Refiner answering in 5 ms");
    let sim = start_sim(&["--latency-ms", "5"]);
    let one = fill_and_drain(
        &sim,
        (0..2000).map(|n| track("hot-user", n)).collect(),
        FAST,
    )
    .await;
    let many = fill_and_drain(
        &sim,
        (0..2000).map(|n| track(&format!("user-{n}"), n)).collect(),
        FAST,
    )
    .await;
    println!(
        "one user x 2,000 tracks: {one:.0} calls/s; 2,000 users x 1 track: {many:.0} calls/s; \
         ratio {:.2} (target >= 0.25)",
        one / many
    );
}

/// 64 reqwest tasks posting `/track-event` to the simulator for `seconds`.
async fn raw_client(sim: &Proc, seconds: u64) -> f64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .expect("client");
    let url = format!("{}/track-event", sim.url);
    closed_loop(client, 64, seconds, move |client, i, n| {
        let body = json!({"id": format!("raw-{i}-{}", n % 16), "event": "Report Exported"});
        client.post(&url).bearer_auth(API_KEY).json(&body)
    })
    .await
}

async fn rates() {
    println!("\n## 4. Delivery rates against refiner-sim in its own process");
    let slow = start_sim(&["--latency-ms", "50"]);
    let events = (0..12_800)
        .map(|n| track(&format!("user-{}", n % 1280), n))
        .collect();
    let rate = fill_and_drain(&slow, events, FAST).await;
    println!(
        "12,800 events over 1,280 users at 50 ms: {rate:.0} calls/s against C/L = 1,280: {:.3} (target >= 0.9)",
        rate / 1280.0
    );
    drop(slow);
    let fast = start_sim(&[]);
    let raw = raw_client(&fast, 5).await;
    let events = (0..30_000)
        .map(|n| track(&format!("user-{}", n % 10_000), n))
        .collect();
    let rate = fill_and_drain(&fast, events, FAST).await;
    let raw_after = raw_client(&fast, 5).await;
    println!(
        "30,000 events over 10,000 users at 0 ms: {rate:.0} calls/s; raw client {raw:.0} and \
         {raw_after:.0} calls/s (before, after): ratio {:.2} (target >= 0.4)",
        rate / mean(&[raw, raw_after])
    );
}

/// Replaces the simulator's faults (`{}`: none).
async fn sim_faults(sim: &Proc, faults: Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/_sim/faults", sim.root()))
        .json(&faults)
        .send()
        .await
        .expect("/_sim/faults");
    assert!(response.status().is_success(), "the faults were refused");
}

/// Calls the simulator received, answered or faulted.
async fn sim_calls(sim: &Proc) -> u64 {
    sim_stats(sim).await["calls"]["total"].as_u64().unwrap_or(0)
}

/// 20,000 tracks of `users` users.
fn backlog_of(users: usize) -> Vec<Value> {
    (0..20_000)
        .map(|n| track(&format!("user-{}", n % users), n))
        .collect()
}

/// The delivery settings of scenario 5: [`FAST`], and a refused key rechecked every 2 s
/// (300 s by default) so recovery shows within the run.
fn refusal_delivery() -> String {
    format!("{FAST}\nauth_recheck_secs = 2")
}

/// Refiner answering with `faults` while 20,000 events of `users` users wait: the gateway's
/// CPU and the calls Refiner got over 10 s, then the faults cleared: the time until the
/// first event lands and the backlog's drain rate (answered).
async fn refused_then_recovered(name: &str, faults: Value, users: usize) -> f64 {
    let sim = start_sim(&[]);
    sim_faults(&sim, faults).await;
    let (dir, queue) = (tempdir(), Queue::new());
    let settings = config(dir.path(), &sim.url, &refusal_delivery(), &queue);
    let gateway = start_gateway(dir.path(), settings).await;
    post_batches(&gateway.url, backlog_of(users), 500, 4).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (cpu0, calls0, t0) = (gateway.cpu_secs(), sim_calls(&sim).await, Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let secs = t0.elapsed().as_secs_f64();
    let share = (gateway.cpu_secs() - cpu0) / secs;
    let calls = (sim_calls(&sim).await - calls0) as f64 / secs;
    sim_faults(&sim, json!({})).await;
    let cleared = Instant::now();
    while sim_events(&sim).await == 0 {
        assert!(
            cleared.elapsed() < Duration::from_secs(60),
            "nothing delivered within 60 s of the recovery"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = cleared.elapsed().as_secs_f64();
    let rate = drain_rate(&sim, 20_000, Duration::from_secs(600)).await;
    println!(
        "{name}: gateway CPU {:.1} % of a core and {calls:.1} calls/s to Refiner over 10 s \
         (20,000 events of {users} users waiting); recovered: first event after {:.0} ms, drained at {rate:.0} events/s",
        share * 100.0,
        first * 1e3
    );
    rate
}

async fn refusals() {
    println!("\n## 5. Refiner refusing the key (401), then throttling (429), 20,000 events of 1,000 users waiting");
    let baseline = {
        let sim = start_sim(&[]);
        fill_and_drain(&sim, backlog_of(1000), &refusal_delivery()).await
    };
    println!("never refused: the same backlog drained at {baseline:.0} events/s");
    let refused = json!({"count_401": 1_000_000_000u64});
    let after_401 = refused_then_recovered("401 to every call", refused.clone(), 1000).await;
    refused_then_recovered("401 to every call", refused, 10_000).await;
    let after_429 = refused_then_recovered(
        "429 to every call, Retry-After 1 s",
        json!({"rate_429": 1.0, "retry_after_secs": 1}),
        1000,
    )
    .await;
    println!(
        "drain after the refusals against never refused: 401 {:.2} (target >= 0.9), 429 {:.2} \
         (the 429s halved the concurrency, which grows back by one per window of calls)",
        after_401 / baseline,
        after_429 / baseline
    );
}

fn main() {
    let only = arg("--only");
    let backlog = arg("--held")
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    runtime.block_on(async {
        if run("outage") {
            outage().await;
        }
        if run("held") {
            if on_nats() {
                println!("\n## 2a. skipped: it drives the embedded spool alone");
            } else {
                lease_curve().await;
            }
            held(backlog).await;
        }
        if run("hot") {
            hot().await;
        }
        if run("rates") {
            rates().await;
        }
        if run("refusals") {
            refusals().await;
        }
    });
    let _ = std::io::stdout().flush();
}
