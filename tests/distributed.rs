//! Distributed mode end to end: gateway nodes on one JetStream delivering to the Refiner
//! simulator.
//!
//! - Two real `refiner-gateway serve` processes share one JetStream (Refiner answering 5 % of
//!   calls with 503 and dropping 1 % after handling them); events for 500 users go
//!   to both; one node is SIGKILLed mid-stream and the other takes over its partitions. Every
//!   accepted event reaches the simulator, each user's events arrive in order, and the
//!   duplicates (the killed node's in-flight events, delivered again) are counted and
//!   printed.
//! - The JetStream server is stopped for a few seconds under load: ingest answers 503 (never
//!   200) while it is down, recovers by itself once it is back, and nothing accepted is lost.
//!
//! Both fail without a `nats-server` binary (naming the install), unless
//! `GATEWAY_SKIP_NATS=1` skips them (`support/deps.rs`).

#[path = "support/deps.rs"]
mod deps;

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::StreamExt;
use refiner_gateway::config::{Secret, Settings, SourceSettings, SpoolBackend};
use refiner_gateway::sim::{self, CallRecord, Faults, SimHandle, SimOptions};
use refiner_gateway::spool::nats::testing::NatsServer;
use refiner_gateway::startup::Application;
use serde_json::json;
use tokio::process::{Child, Command};

const BINARY: &str = env!("CARGO_BIN_EXE_refiner-gateway");
const WRITE_KEY: &str = "distributed-write-key";
const REFINER_KEY: &str = "distributed-refiner-key";

fn basic() -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{WRITE_KEY}:"))
    )
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

async fn start_sim() -> SimHandle {
    start_sim_with(Faults::default()).await
}

async fn start_sim_with(faults: Faults) -> SimHandle {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let options = SimOptions {
        log_capacity: 1_000_000,
        faults,
        ..SimOptions::with_key(REFINER_KEY)
    };
    sim::spawn(listener, options).await.expect("simulator")
}

/// A `serve` process with the given config file.
struct Node {
    child: Child,
    address: String,
    stderr: std::path::PathBuf,
}

impl Node {
    async fn start(name: &str, nats_url: &str, sim_url: &str, dir: &Path) -> Node {
        let port = free_port();
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"
listen = "127.0.0.1:{port}"
data_dir = "{data}"
log_format = "text"
shutdown_timeout_secs = 5

[refiner]
base_url = "{sim_url}"

[spool]
backend = "nats"

[nats]
url = "{nats_url}"
partitions = 16
ownership_ttl_secs = 2
node_name = "{name}"

[delivery]
per_user_window = 1
poll_interval_ms = 20
retry_base_ms = 200
retry_cap_secs = 2

[[sources]]
slug = "default"
write_keys = ["{WRITE_KEY}"]
refiner_api_key = "{REFINER_KEY}"
"#,
                data = dir.join(name).display(),
            ),
        )
        .expect("write config");
        let stderr = dir.join(format!("{name}.stderr.log"));
        let mut command = Command::new(BINARY);
        command
            .args(["serve", "--config"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("log"))
            .env("RUST_LOG", "warn")
            .kill_on_drop(true);
        for (variable, _) in refiner_gateway::config::ENV_VARS {
            command.env_remove(variable);
        }
        let mut child = command.spawn().expect("spawn the gateway");
        let address = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!(
                    "gateway {name} exited during start-up ({status}): {}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
            if let Ok(response) = client.get(format!("{address}/readyz")).send().await {
                if response.status() == 200 {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "gateway {name} did not get ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Node {
            child,
            address,
            stderr,
        }
    }

    fn kill(&mut self) {
        let pid = self.child.id().expect("running");
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

/// Partition owners as the ownership bucket has them: node name → partitions.
async fn owners(nats_url: &str) -> HashMap<String, usize> {
    let client = async_nats::connect(nats_url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let kv = js
        .get_key_value("gateway_partitions")
        .await
        .expect("bucket");
    let mut keys = kv.keys().await.expect("keys");
    let mut out: HashMap<String, usize> = HashMap::new();
    while let Some(Ok(key)) = keys.next().await {
        if key.starts_with("p.") {
            if let Ok(Some(value)) = kv.get(&key).await {
                *out.entry(String::from_utf8_lossy(&value).to_string())
                    .or_default() += 1;
            }
        }
    }
    out
}

/// Tracks as the simulator received them: user → event names in order of receipt.
fn delivered(calls: &[CallRecord]) -> HashMap<String, Vec<String>> {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for call in calls {
        if call.path != "/v1/track-event" || call.status != Some(200) {
            continue;
        }
        let (Some(user), Some(event)) = (&call.user, call.params.get("event")) else {
            continue;
        };
        out.entry(user.clone())
            .or_default()
            .push(event.as_str().unwrap_or_default().to_owned());
    }
    out
}

/// Checks what the simulator got against what was accepted: every accepted event arrived,
/// in order per user (an event's first arrival comes after the first arrival of each of
/// the user's earlier events). Returns (deliveries, duplicates).
fn check_delivery(
    accepted: &HashMap<String, Vec<String>>,
    got: &HashMap<String, Vec<String>>,
) -> Result<(usize, usize), String> {
    let mut total = 0;
    let mut duplicates = 0;
    for (user, events) in accepted {
        let received = got.get(user).cloned().unwrap_or_default();
        total += received.len();
        let mut first: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        for event in &received {
            if seen.insert(event.clone()) {
                first.push(event.clone());
            } else {
                duplicates += 1;
            }
        }
        let expected: Vec<String> = events.clone();
        let delivered_accepted: Vec<String> = first
            .iter()
            .filter(|e| expected.contains(e))
            .cloned()
            .collect();
        if delivered_accepted != expected {
            return Err(format!(
                "user {user}: accepted {expected:?}, first deliveries {first:?}"
            ));
        }
    }
    Ok((total, duplicates))
}

fn track(user: &str, event: &str) -> serde_json::Value {
    json!({
        "type": "track",
        "userId": user,
        "event": event,
        "messageId": format!("{user}-{event}"),
    })
}

async fn post_batch(
    client: &reqwest::Client,
    address: &str,
    batch: &[serde_json::Value],
) -> Result<u16, String> {
    client
        .post(format!("{address}/v1/batch"))
        .header("Authorization", basic())
        .json(&json!({ "batch": batch }))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn two_nodes_share_the_stream_and_one_takes_over_from_a_killed_one() {
    const USERS: usize = 500;
    const ROUNDS: usize = 6;
    const KILL_AFTER_ROUND: usize = 2;
    let Some(server) = deps::nats("two_nodes_share_the_stream", NatsServer::start) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    // Refiner fails now and then, so retries (naks with a delay) and held-back events are
    // part of the run, on both nodes and across the take-over.
    let sim = start_sim_with(Faults {
        rate_503: 0.05,
        rate_drop_after: 0.01,
        ..Faults::default()
    })
    .await;
    let mut a = Node::start("node-a", &server.url(), &sim.url(), dir.path()).await;
    let mut b = Node::start("node-b", &server.url(), &sim.url(), dir.path()).await;

    // Both nodes own partitions before the load starts.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let owners = owners(&server.url()).await;
        if owners.len() == 2 && owners.values().sum::<usize>() == 16 {
            eprintln!("partition owners: {owners:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the two nodes did not share the partitions: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let mut accepted: HashMap<String, Vec<String>> = HashMap::new();
    let mut killed = false;
    for round in 0..ROUNDS {
        if round == KILL_AFTER_ROUND {
            b.kill();
            killed = true;
            eprintln!("node-b killed after {round} rounds");
        }
        let users: Vec<String> = (0..USERS).map(|u| format!("user-{u}")).collect();
        for (i, chunk) in users.chunks(25).enumerate() {
            let batch: Vec<serde_json::Value> = chunk
                .iter()
                .map(|u| track(u, &format!("e{round}")))
                .collect();
            // Alternate nodes; a batch the killed node does not take goes to the other one,
            // as a client retries.
            let first = if i % 2 == 0 || killed { &a } else { &b };
            let mut status = post_batch(&client, &first.address, &batch).await;
            if status != Ok(200) {
                status = post_batch(&client, &a.address, &batch).await;
            }
            assert_eq!(status, Ok(200), "round {round} batch {i} was not accepted");
            for user in chunk {
                accepted
                    .entry(user.clone())
                    .or_default()
                    .push(format!("e{round}"));
            }
        }
    }
    let expected: usize = accepted.values().map(Vec::len).sum();

    let deadline = Instant::now() + Duration::from_secs(90);
    let (total, duplicates) = loop {
        let got = delivered(&sim.state().calls());
        let distinct: usize = got
            .values()
            .map(|events| events.iter().collect::<HashSet<_>>().len())
            .sum();
        if distinct >= expected {
            match check_delivery(&accepted, &got) {
                Ok(counts) => break counts,
                Err(e) => panic!("{e}"),
            }
        }
        if Instant::now() > deadline {
            let stderr = std::fs::read_to_string(&a.stderr).unwrap_or_default();
            panic!(
                "only {distinct} of {expected} accepted events reached the simulator; node-a: {}",
                &stderr[stderr.len().saturating_sub(3000)..]
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let refused = sim
        .state()
        .call_stats()
        .by_status
        .get("503")
        .copied()
        .unwrap_or(0);
    assert!(
        refused > 0,
        "no call was refused: the retry path was not exercised"
    );
    eprintln!(
        "two nodes, one killed: {expected} events accepted for {USERS} users, {total} \
         deliveries, {duplicates} duplicates, {refused} calls answered 503 and retried, \
         per-user order kept"
    );
    // Every event is delivered once node-a owns the partitions that held events; a
    // partition that held none may be taken over a moment later (its claim expires on its
    // own clock), so ownership is polled for a while.
    let deadline = Instant::now() + Duration::from_secs(10);
    let owners = loop {
        let owners = owners(&server.url()).await;
        if owners.values().sum::<usize>() == 16 || Instant::now() >= deadline {
            break owners;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        owners.values().sum::<usize>(),
        16,
        "node-a owns every partition after the take-over: {owners:?}"
    );
    // The node says so in its metrics (updated every quarter of the TTL).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = client
            .get(format!("{}/metrics", a.address))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        if metrics.contains("gateway_nats_partitions_owned 16")
            && metrics.contains("gateway_nats_connected 1")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node-a's metrics do not show the 16 partitions: {}",
            metrics
                .lines()
                .filter(|l| l.starts_with("gateway_nats"))
                .collect::<Vec<_>>()
                .join("; ")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.kill();
    sim.stop().await;
}

fn settings(nats_url: &str, sim_url: &str, data_dir: &Path) -> Settings {
    let mut settings = Settings {
        listen: "127.0.0.1:0".into(),
        data_dir: data_dir.to_path_buf(),
        sources: vec![SourceSettings {
            slug: "default".into(),
            write_keys: vec![Secret::new(WRITE_KEY)],
            webhook_secret: None,
            refiner_api_key: Some(Secret::new(REFINER_KEY)),
            webhook_format: Default::default(),
        }],
        ..Settings::default()
    };
    settings.refiner.base_url = sim_url.to_owned();
    settings.spool.backend = SpoolBackend::Nats;
    settings.nats.url = nats_url.to_owned();
    settings.nats.partitions = 8;
    settings.nats.ownership_ttl_secs = 2;
    settings.nats.publish_timeout_ms = 1000;
    settings.delivery.poll_interval_ms = 20;
    // The checks below hold every event of a user to its place (strict mode).
    settings.delivery.per_user_window = 1;
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn ingest_answers_503_while_jetstream_is_down_and_recovers() {
    outage(
        "ingest_answers_503_while_jetstream_is_down",
        Outage::Restart,
    )
    .await;
}

/// A frozen server (SIGSTOP for longer than the pull heartbeats and the ownership TTL):
/// no disconnect, just silence. Pulls notice the missed heartbeats and start over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn consumers_survive_a_heartbeat_stall() {
    outage("consumers_survive_a_heartbeat_stall", Outage::Stall).await;
}

#[derive(Clone, Copy, PartialEq)]
enum Outage {
    /// Killed for 4 s, then started again on the same store.
    Restart,
    /// Frozen for 12 s, then resumed.
    Stall,
}

async fn outage(test: &str, kind: Outage) {
    const SENDERS: usize = 4;
    let Some(mut server) = deps::nats(test, NatsServer::start) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let sim = start_sim().await;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = Application::build_with_listener(
        &settings(&server.url(), &sim.url(), dir.path()),
        listener,
    )
    .await
    .expect("build the gateway");
    let address = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    let task = tokio::spawn(app.run_until_stopped());

    let down = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let accepted: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let refused = Arc::new(AtomicUsize::new(0));
    let accepted_while_down = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for sender in 0..SENDERS {
        let (address, down, stop, accepted, refused, accepted_while_down) = (
            address.clone(),
            down.clone(),
            stop.clone(),
            accepted.clone(),
            refused.clone(),
            accepted_while_down.clone(),
        );
        senders.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client");
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                // One user per sender, so order is checked too; an event is resent until
                // accepted before the next one, as a client with retries does.
                let user = format!("sender-{sender}");
                let event = format!("e{n}");
                let was_down = down.load(Ordering::SeqCst);
                let status = post_batch(&client, &address, &[track(&user, &event)])
                    .await
                    .expect("the gateway answers");
                let still_down = down.load(Ordering::SeqCst);
                match status {
                    200 => {
                        if was_down && still_down {
                            accepted_while_down.fetch_add(1, Ordering::SeqCst);
                        }
                        accepted
                            .lock()
                            .expect("lock")
                            .entry(user)
                            .or_default()
                            .push(event);
                        n += 1;
                    }
                    503 => {
                        refused.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    other => panic!("ingest answered {other} (expected 200 or 503)"),
                }
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = accepted
        .lock()
        .expect("lock")
        .values()
        .map(Vec::len)
        .sum::<usize>();
    // Marked down once the signal has been delivered (`kill` is a process of its own): a
    // request answered before that may still have been acknowledged by the server.
    match kind {
        Outage::Restart => server.stop(),
        Outage::Stall => server.pause(),
    }
    down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(match kind {
        Outage::Restart => 4,
        Outage::Stall => 12,
    }))
    .await;
    let during = accepted
        .lock()
        .expect("lock")
        .values()
        .map(Vec::len)
        .sum::<usize>();
    // Cleared before the server is back: a request sent while it was down may be answered
    // 200 once it is back, and only what was sent and answered while down counts below.
    down.store(false, Ordering::SeqCst);
    match kind {
        Outage::Restart => server.restart(),
        Outage::Stall => server.resume(),
    }
    // Recovers by itself: events are accepted again within a while.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = accepted
            .lock()
            .expect("lock")
            .values()
            .map(Vec::len)
            .sum::<usize>();
        if now > during + 50 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ingest did not recover after JetStream came back ({now} accepted, {during} before)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    for sender in senders {
        sender.await.expect("sender");
    }
    let accepted = accepted.lock().expect("lock").clone();
    let expected: usize = accepted.values().map(Vec::len).sum();
    assert!(before > 0, "nothing was accepted before the outage");
    assert!(
        refused.load(Ordering::SeqCst) > 0,
        "no request was refused while JetStream was down"
    );
    assert_eq!(
        accepted_while_down.load(Ordering::SeqCst),
        0,
        "requests sent and answered while JetStream was down were accepted"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    let (total, duplicates) = loop {
        let got = delivered(&sim.state().calls());
        let distinct: usize = got
            .values()
            .map(|events| events.iter().collect::<HashSet<_>>().len())
            .sum();
        if distinct >= expected {
            match check_delivery(&accepted, &got) {
                Ok(counts) => break counts,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(
            Instant::now() < deadline,
            "only {distinct} of {expected} accepted events were delivered after the restart"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!(
        "{test}: {expected} accepted ({before} before the outage), {} answered 503, \
         {total} deliveries, {duplicates} duplicates, nothing lost",
        refused.load(Ordering::SeqCst)
    );
    handle.stop(true).await;
    let _ = task.await;
    sim.stop().await;
}

/// The management API over the JetStream spool: dead letters made by Refiner refusing the
/// calls (400: a trait longer than Refiner takes) are listed, shown, replayed (and refused
/// again) and purged over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn the_management_api_works_on_the_jetstream_spool() {
    const ADMIN: &str = "distributed-admin-token";
    let Some(server) = deps::nats(
        "the_management_api_works_on_the_jetstream_spool",
        NatsServer::start,
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let sim = start_sim().await;
    let mut settings = settings(&server.url(), &sim.url(), dir.path());
    settings.admin_token = Some(Secret::new(ADMIN));
    settings.mapping.max_string_len = 1000;
    let app = Application::build_with_listener(
        &settings,
        TcpListener::bind("127.0.0.1:0").expect("bind"),
    )
    .await
    .expect("build the gateway");
    let address = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    let task = tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::new();
    let too_long = "x".repeat(300);
    let batch: Vec<serde_json::Value> = (0..5)
        .map(|i| {
            json!({"type": "identify", "userId": format!("u{i}"), "messageId": format!("refused-{i}"),
                   "traits": {"note": too_long}})
        })
        .collect();
    assert_eq!(post_batch(&client, &address, &batch).await, Ok(200));

    let api = |path: &str| format!("{address}/api/events/default/dead-letters{path}");
    let get = |url: String| {
        let client = client.clone();
        async move {
            let response = client
                .get(url)
                .bearer_auth(ADMIN)
                .send()
                .await
                .expect("request");
            assert_eq!(response.status(), 200);
            response.json::<serde_json::Value>().await.expect("JSON")
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let listing = loop {
        let listing = get(api("?o=id")).await;
        if listing["count"] == 5 {
            break listing;
        }
        assert!(Instant::now() < deadline, "no dead letters: {listing}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let first = listing["results"][0].clone();
    assert_eq!(first["last_status"], 400, "{first}");
    assert_eq!(first["type"], "identify", "{first}");
    let one = get(api(&format!("/{}", first["id"]))).await;
    assert_eq!(one["messageId"], first["messageId"], "{one}");

    let replayed: serde_json::Value = client
        .post(api("/replay"))
        .bearer_auth(ADMIN)
        .json(&json!({ "ids": [first["id"]] }))
        .send()
        .await
        .expect("replay")
        .json()
        .await
        .expect("JSON");
    assert_eq!(replayed["replayed"], 1, "{replayed}");
    // Refused again: back among the dead letters, with two attempts.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listing = get(api("?o=-id")).await;
        if listing["count"] == 5 && listing["results"][0]["attempts"] == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replay did not come back: {listing}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let purged: serde_json::Value = client
        .delete(api(""))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("purge")
        .json()
        .await
        .expect("JSON");
    assert_eq!(purged["deleted"], 5, "{purged}");
    let profile = client
        .get(format!("{address}/api/profile/default"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("profile");
    assert_eq!(profile.status(), 200);
    let profile: serde_json::Value = profile.json().await.expect("JSON");
    assert_eq!(profile["usage"]["mte_count"], 5, "{profile}");
    assert_eq!(profile["usage"]["mtu_count"], 5, "{profile}");
    assert_eq!(profile["dead_letters"], 0, "{profile}");
    handle.stop(true).await;
    let _ = task.await;
    sim.stop().await;
}
