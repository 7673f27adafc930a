//! Steady load from several concurrent clients, behaving as Segment's clients do: each
//! client posts `/v1/batch` requests (or single `/v1/track` events) at its own pace, and
//! sends a request again, with the same `messageId`s, until it is answered 200, whether
//! the gateway answered 429/503 or the connection failed (the gateway was killed). The
//! gateway's `messageId` dedup makes those resends harmless.
//!
//! Event `n` of client `k` has the `messageId` and the event name `{prefix}-{k}-{n}` and
//! belongs to user `{prefix}-u{k}-{n % users}`. A client only moves on once a request is
//! answered 200, so its acknowledged events are exactly `n < acked_upto[k]`, a compact
//! record even for millions of events.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{basic, WRITE_KEY};

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub prefix: String,
    /// The write key (and so the source) the clients send with.
    pub write_key: &'static str,
    pub clients: usize,
    /// Events per request; 1 posts `/v1/track`, more post `/v1/batch`.
    pub batch: usize,
    /// Time between two requests of one client (0: as fast as answers come).
    pub pace: Duration,
    /// Users per client (events go round-robin over them).
    pub users: usize,
    /// Extra bytes of properties per event (payload size).
    pub padding: usize,
    /// Longest wait after a 429/503 before sending again (the gateway asks for more).
    pub retry_cap: Duration,
    /// Stop each client after this many events (`u64::MAX`: until stopped).
    pub events_per_client: u64,
    /// Keep every request's latency (for percentiles).
    pub record_latency: bool,
}

impl LoadSpec {
    pub fn new(prefix: &str, clients: usize, batch: usize, pace: Duration) -> LoadSpec {
        LoadSpec {
            prefix: prefix.to_string(),
            write_key: WRITE_KEY,
            clients,
            batch,
            pace,
            users: 4,
            padding: 0,
            retry_cap: Duration::from_millis(200),
            events_per_client: u64::MAX,
            record_latency: false,
        }
    }
}

/// What the clients share with the scenario.
#[derive(Debug, Default)]
pub struct Shared {
    /// Where to send (a restarted gateway listens on a new port).
    pub address: RwLock<String>,
    /// Per client: events `n < acked_upto` were answered 200.
    pub acked_upto: Vec<AtomicU64>,
    /// Per client: events `n < sent_upto` were sent at least once.
    pub sent_upto: Vec<AtomicU64>,
    /// Requests sent and not yet answered.
    pub in_flight: AtomicUsize,
    /// Answers by status, and `error` for failed connections/timeouts.
    pub statuses: Mutex<BTreeMap<String, u64>>,
    /// Answers other than 200/429/503, with their bodies.
    pub unexpected: Mutex<Vec<String>>,
    /// 429/503 answers that lacked `Retry-After`.
    pub missing_retry_after: AtomicU64,
    /// Request latencies in microseconds, when recorded.
    pub latencies_us: Mutex<Vec<u32>>,
    /// While set, clients wait instead of sending.
    pub paused: AtomicBool,
}

impl Shared {
    pub fn acked(&self) -> u64 {
        self.acked_upto
            .iter()
            .map(|a| a.load(Ordering::SeqCst))
            .sum()
    }

    pub fn status_counts(&self) -> BTreeMap<String, u64> {
        self.statuses.lock().expect("lock").clone()
    }

    pub fn set_address(&self, address: &str) {
        *self.address.write().expect("lock") = address.to_string();
    }
}

/// Running clients.
pub struct Load {
    pub spec: LoadSpec,
    pub shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The id (= messageId = event name) of event `n` of client `k`.
pub fn event_id(prefix: &str, k: usize, n: u64) -> String {
    format!("{prefix}-{k}-{n}")
}

/// The user of event `n` of client `k`.
pub fn user_id(spec: &LoadSpec, k: usize, n: u64) -> String {
    format!("{}-u{k}-{}", spec.prefix, n % spec.users.max(1) as u64)
}

/// `(k, n)` of an id made by [`event_id`] with `prefix`.
pub fn parse_id(prefix: &str, id: &str) -> Option<(usize, u64)> {
    let rest = id.strip_prefix(prefix)?.strip_prefix('-')?;
    let (k, n) = rest.split_once('-')?;
    Some((k.parse().ok()?, n.parse().ok()?))
}

fn event(spec: &LoadSpec, k: usize, n: u64) -> Value {
    let id = event_id(&spec.prefix, k, n);
    let mut properties = json!({"n": n, "client": k});
    if spec.padding > 0 {
        properties["padding"] = json!("p".repeat(spec.padding));
    }
    json!({
        "type": "track",
        "event": id,
        "userId": user_id(spec, k, n),
        "messageId": id,
        "properties": properties,
    })
}

impl Load {
    /// Starts the clients against `address`.
    pub fn start(spec: LoadSpec, address: &str) -> Load {
        let shared = Arc::new(Shared {
            address: RwLock::new(address.to_string()),
            acked_upto: (0..spec.clients).map(|_| AtomicU64::new(0)).collect(),
            sent_upto: (0..spec.clients).map(|_| AtomicU64::new(0)).collect(),
            ..Shared::default()
        });
        let stop = Arc::new(AtomicBool::new(false));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .pool_max_idle_per_host(spec.clients)
            .build()
            .expect("client");
        let tasks = (0..spec.clients)
            .map(|k| {
                tokio::spawn(run_client(
                    k,
                    spec.clone(),
                    client.clone(),
                    shared.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        Load {
            spec,
            shared,
            stop,
            tasks,
        }
    }

    /// Stops the clients (each finishes or abandons its current request) and waits.
    pub async fn stop(self) -> Arc<Shared> {
        self.stop.store(true, Ordering::SeqCst);
        for task in self.tasks {
            let _ = task.await;
        }
        self.shared
    }

    /// Waits until every client has sent `events_per_client` events and got its 200s.
    pub async fn finish(self) -> Arc<Shared> {
        for task in self.tasks {
            let _ = task.await;
        }
        self.shared
    }
}

async fn run_client(
    k: usize,
    spec: LoadSpec,
    client: reqwest::Client,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
) {
    let mut next_send = Instant::now();
    let mut n: u64 = 0;
    while !stop.load(Ordering::SeqCst) && n < spec.events_per_client {
        if shared.paused.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
            next_send = Instant::now();
            continue;
        }
        let now = Instant::now();
        if next_send > now {
            tokio::time::sleep(next_send - now).await;
        }
        // A client that fell behind does not burst to catch up.
        next_send = next_send.max(Instant::now() - spec.pace) + spec.pace;
        let size = (spec.batch as u64).min(spec.events_per_client - n);
        let (path, body) = if spec.batch == 1 {
            let mut body = event(&spec, k, n);
            body["writeKey"] = json!(spec.write_key);
            ("/v1/track", body)
        } else {
            let batch: Vec<Value> = (n..n + size).map(|i| event(&spec, k, i)).collect();
            ("/v1/batch", json!({ "batch": batch }))
        };
        let body = serde_json::to_vec(&body).expect("json");
        shared.sent_upto[k].fetch_max(n + size, Ordering::SeqCst);
        // Send until answered 200 (or stopped, or refused for good).
        loop {
            let address = shared.address.read().expect("lock").clone();
            shared.in_flight.fetch_add(1, Ordering::SeqCst);
            let started = Instant::now();
            let result = client
                .post(format!("{address}{path}"))
                .header("Authorization", basic(spec.write_key))
                .header("Content-Type", "application/json")
                .body(body.clone())
                .send()
                .await;
            let result = match result {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let retry_after = response
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<u64>().ok());
                    let text = response.text().await;
                    text.map(|text| (status, retry_after, text))
                }
                Err(e) => Err(e),
            };
            shared.in_flight.fetch_sub(1, Ordering::SeqCst);
            let elapsed = started.elapsed();
            let key = match &result {
                Ok((status, _, _)) => status.to_string(),
                Err(_) => "error".to_string(),
            };
            *shared
                .statuses
                .lock()
                .expect("lock")
                .entry(key)
                .or_default() += 1;
            match result {
                Ok((200, _, _)) => {
                    if spec.record_latency {
                        shared
                            .latencies_us
                            .lock()
                            .expect("lock")
                            .push(elapsed.as_micros().min(u32::MAX as u128) as u32);
                    }
                    shared.acked_upto[k].store(n + size, Ordering::SeqCst);
                    break;
                }
                Ok((429 | 503, retry_after, _)) => {
                    if retry_after.is_none() {
                        shared.missing_retry_after.fetch_add(1, Ordering::SeqCst);
                    }
                    let wait = Duration::from_secs(retry_after.unwrap_or(1)).min(spec.retry_cap);
                    tokio::time::sleep(wait).await;
                }
                Ok((status, _, text)) => {
                    shared.unexpected.lock().expect("lock").push(format!(
                        "{status}: {}",
                        text.chars().take(300).collect::<String>()
                    ));
                    // Not retried and not acknowledged: this client stops here, so that
                    // `acked_upto` stays exact.
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
        }
        n += size;
    }
}

/// The `q`-quantile of latencies (µs), as ms.
pub fn percentile_ms(latencies_us: &[u32], q: f64) -> f64 {
    if latencies_us.is_empty() {
        return 0.0;
    }
    let mut sorted = latencies_us.to_vec();
    sorted.sort_unstable();
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index.min(sorted.len() - 1)] as f64 / 1000.0
}
