//! The distributed spool: NATS JetStream, shared by several gateway nodes.
//!
//! Layout (every name configurable):
//! - Stream `GATEWAY_EVENTS`, work-queue retention, subjects `gateway.events.<p>`: one
//!   subject per partition, `p = hash(source, user key) mod partitions`. The stream sequence
//!   is the event's `seq`. `Nats-Msg-Id` is the source and the `messageId`, so JetStream's
//!   duplicate window (the dedup window, 24 h by default) drops repeats.
//! - Stream `GATEWAY_DEAD_LETTERS`, subjects `gateway.dead.<source>`: copies of the events
//!   given up on (JetStream has no dead-letter queue: a message past `max_deliver` just
//!   stays in its stream).
//! - Key-value bucket `gateway_partitions` with a TTL: `p.<n>` names the node that owns
//!   partition n, `node.<id>` says a node is alive. Owners renew with a compare-and-set on
//!   the revision; a key that is not renewed expires and another node takes the partition.
//! - One durable pull consumer per partition (`gateway-p<n>`), recreated by each new owner.
//!
//! Guarantees, beyond the [`Spool`] trait's:
//! - [`Spool::append`] answers only after JetStream acknowledged every event (publish ack);
//!   a failure or a timeout is [`SpoolError::Storage`] (ingest answers 503), and a retry of
//!   the same request is deduplicated by `Nats-Msg-Id`.
//! - A partition is consumed by one node at a time. A new owner deletes and recreates the
//!   partition's consumer, so JetStream delivers it every unacked event from the start of
//!   the partition, in stream order: per-user order survives a crash of the previous owner
//!   (delivery is at least once; the old owner's in-flight events are delivered again).
//! - The owner keeps the holds in memory ([`state`]): a retried event is nakked with its
//!   delay (never a bare nak), and its user's later events wait in memory, or go back to
//!   JetStream with a delay that brings them back behind it.
//! - Events JetStream delivered more than `max_deliver` times go to the dead letters.
//! - A node that cannot renew its ownership stops leasing from the partition before the key
//!   can expire, so two nodes never lease the same partition's events at once.
//!
//! The spool runs on its own small Tokio runtime (one thread, its tasks), so it can be
//! opened from synchronous start-up code and outlives the caller's runtime flavour.

mod dead;
pub mod state;
#[doc(hidden)]
pub mod testing;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv, stream, AckKind};
use async_nats::{HeaderMap, Subject};
use async_trait::async_trait;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch, RwLock};

use super::{
    AppendReport, AppendRequest, DeadLetters, Leased, Settlement, Spool, SpoolError, SpoolStats,
};
use crate::telemetry::Metrics;
use state::{Entry, PartitionState, QueueState, RecordChange, Reply};

/// Settings of the JetStream spool.
#[derive(Debug, Clone)]
pub struct NatsSpoolOptions {
    /// Server URL(s), comma separated (`nats://127.0.0.1:4222`).
    pub url: String,
    /// Token, or user and password, or a credentials file; at most one of them.
    pub token: Option<String>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub credentials_file: Option<std::path::PathBuf>,
    /// The events stream.
    pub stream: String,
    /// The dead-letter stream.
    pub dead_letter_stream: String,
    /// Subjects are `<prefix>.events.<partition>` and `<prefix>.dead.<source>`.
    pub subject_prefix: String,
    /// Consumers are `<consumer>-p<partition>`.
    pub consumer: String,
    /// The key-value bucket of partition ownership.
    pub bucket: String,
    /// The key-value bucket that remembers accepted `(source, messageId)` pairs for the
    /// dedup window (JetStream's own duplicate window forgets delivered events when the
    /// server restarts); `None`: rely on the duplicate window alone.
    pub dedup_bucket: Option<String>,
    /// The key-value bucket of retried events' attempts and retry times, so that a new
    /// owner of a partition continues their backoff; `None`: a new owner starts over.
    pub retry_bucket: Option<String>,
    /// Replicas of the streams and the bucket (3 in production).
    pub replicas: usize,
    /// Partitions (fixed for the life of the stream: changing it moves users).
    pub partitions: u32,
    /// JetStream's duplicate window: how long a `(source, messageId)` suppresses repeats.
    pub dedup_window: Duration,
    /// How long an append waits for JetStream's acks before failing.
    pub publish_timeout: Duration,
    /// How long a partition stays owned without renewal (a dead node's partitions are
    /// taken over after this).
    pub ownership_ttl: Duration,
    /// JetStream's ack wait: an event pulled but not acked is redelivered after this.
    pub ack_wait: Duration,
    /// Deliveries after which an event goes to the dead letters; 0 = no limit.
    pub max_deliver: u64,
    /// How long dead letters are kept (the dead-letter stream's max age); none: forever.
    pub dead_letter_retention: Option<Duration>,
    /// Unacked events JetStream lets one partition's consumer have.
    pub max_ack_pending: i64,
    /// Events a node holds in memory before it stops pulling.
    pub max_buffered: usize,
    /// Events pulled per request.
    pub fetch_batch: usize,
    /// This node's name in the ownership bucket (unique per process: a suffix is added).
    pub node_name: String,
    /// How long a lease waits for events known to be in an owned partition to arrive.
    pub catch_up_wait: Duration,
}

impl NatsSpoolOptions {
    pub fn new(url: impl Into<String>) -> NatsSpoolOptions {
        NatsSpoolOptions {
            url: url.into(),
            token: None,
            user: None,
            password: None,
            credentials_file: None,
            stream: "GATEWAY_EVENTS".into(),
            dead_letter_stream: "GATEWAY_DEAD_LETTERS".into(),
            subject_prefix: "gateway".into(),
            consumer: "gateway".into(),
            bucket: "gateway_partitions".into(),
            dedup_bucket: Some("gateway_dedup".into()),
            retry_bucket: Some("gateway_retries".into()),
            replicas: 1,
            partitions: 16,
            dedup_window: Duration::from_secs(24 * 3600),
            publish_timeout: Duration::from_secs(3),
            ownership_ttl: Duration::from_secs(10),
            ack_wait: Duration::from_secs(60),
            max_deliver: 1000,
            dead_letter_retention: Some(Duration::from_secs(14 * 24 * 3600)),
            max_ack_pending: 20_000,
            max_buffered: 20_000,
            fetch_batch: 256,
            node_name: std::env::var("HOSTNAME").unwrap_or_else(|_| "gateway".into()),
            catch_up_wait: Duration::from_secs(1),
        }
    }

    fn event_subject(&self, partition: u32) -> String {
        format!("{}.events.{partition}", self.subject_prefix)
    }

    fn dead_subject(&self, source: &str) -> String {
        format!("{}.dead.{source}", self.subject_prefix)
    }

    fn consumer_name(&self, partition: u32) -> String {
        format!("{}-p{partition}", self.consumer)
    }
}

/// The partition of a user: FNV-1a of source and user key, stable across nodes and builds.
pub fn partition_of(source: &str, user_key: &str, partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in source
        .bytes()
        .chain(std::iter::once(0x1f))
        .chain(user_key.bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as u32
}

/// What travels with an event in the stream, before its payload (one JSON line).
#[derive(Debug, Serialize, Deserialize)]
struct Meta {
    s: String,
    m: String,
    k: String,
    u: String,
    r: i64,
    /// Attempts made before (a replayed dead letter keeps its own).
    #[serde(default, skip_serializing_if = "is_zero")]
    a: u32,
    /// Failed attempts before (a replayed dead letter keeps its history).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    h: Vec<(i64, Option<u16>, String)>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A dead letter's record, before the payload (one JSON line).
#[derive(Debug, Serialize, Deserialize)]
pub struct DeadMeta {
    pub source: String,
    pub message_id: String,
    pub kind: String,
    pub user_key: String,
    pub received_at_ms: i64,
    pub attempts: u32,
    pub status: Option<u16>,
    pub error: String,
    pub created_at_ms: i64,
    pub queue_seq: i64,
    /// The failed attempts the last owner saw: when (ms), the status, the error.
    #[serde(default)]
    pub history: Vec<(i64, Option<u16>, String)>,
}

fn encode(meta: &impl Serialize, payload: &[u8]) -> Vec<u8> {
    let mut body = serde_json::to_vec(meta).unwrap_or_default();
    body.push(b'\n');
    body.extend_from_slice(payload);
    body
}

fn decode<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Option<(T, Vec<u8>)> {
    let split = body.iter().position(|b| *b == b'\n')?;
    let meta = serde_json::from_slice(&body[..split]).ok()?;
    Some((meta, body[split + 1..].to_vec()))
}

/// `Nats-Msg-Id` of an event: source and `messageId`, hashed when the id is not plain
/// printable ASCII (header values must not carry control characters).
fn msg_id(source: &str, message_id: &str) -> String {
    if !message_id.is_empty() && message_id.bytes().all(|b| b.is_ascii_graphic()) {
        format!("{source}:{message_id}")
    } else {
        use sha2::Digest;
        format!(
            "{source}:sha256:{}",
            hex::encode(sha2::Sha256::digest(message_id.as_bytes()))
        )
    }
}

/// The dedup bucket's key of a `(source, messageId)`: KV keys allow few characters, so the
/// id is hashed (128 bits of SHA-256).
fn dedup_key(source: &str, message_id: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(message_id.as_bytes());
    format!("{source}.{}", hex::encode(&digest[..16]))
}

/// Idle heartbeat of a pull: two missed ones end it and a new pull starts (a stalled or
/// restarted server, a consumer leader that moved).
const PULL_HEARTBEAT: Duration = Duration::from_secs(2);
/// How long one pull request waits for events.
const PULL_EXPIRES: Duration = Duration::from_secs(10);

/// How long a retry record outlives its last write if nothing removes it.
const RETRY_RECORD_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

fn retry_key(partition: u32, seq: u64) -> String {
    format!("p{partition}.{seq}")
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn storage(what: &str, e: impl std::fmt::Display) -> SpoolError {
    SpoolError::Storage(format!("{what}: {e}"))
}

/// This node's view of the distributed spool, for Prometheus.
struct NodeGauges {
    partitions: prometheus::IntGauge,
    buffered: prometheus::IntGauge,
    connected: prometheus::IntGauge,
    takeovers: prometheus::IntCounter,
}

impl NodeGauges {
    fn register(metrics: &Metrics) -> NodeGauges {
        let gauge = |name: &str, help: &str| {
            let gauge = prometheus::IntGauge::new(name, help).expect("a valid metric");
            // Already there when a second spool shares the registry (tests): not exported.
            let _ = metrics.registry.register(Box::new(gauge.clone()));
            gauge
        };
        let takeovers = prometheus::IntCounter::new(
            "gateway_nats_partitions_taken_total",
            "Partitions this node took (at start, from a dead node, or handed over).",
        )
        .expect("a valid metric");
        let _ = metrics.registry.register(Box::new(takeovers.clone()));
        NodeGauges {
            partitions: gauge(
                "gateway_nats_partitions_owned",
                "Partitions of the events stream this node owns.",
            ),
            buffered: gauge(
                "gateway_nats_buffered_events",
                "Events this node pulled and has not settled yet.",
            ),
            connected: gauge(
                "gateway_nats_connected",
                "1 while this node is connected to NATS.",
            ),
            takeovers,
        }
    }
}

/// A partition this node owns.
struct Owned {
    revision: u64,
    renewed: Instant,
    stop: watch::Sender<bool>,
    draining_since: Option<Instant>,
}

struct Inner {
    options: NatsSpoolOptions,
    node_id: String,
    client: async_nats::Client,
    js: jetstream::Context,
    events: stream::Stream,
    dead: stream::Stream,
    kv: kv::Store,
    dedup: Option<kv::Store>,
    retries: Option<kv::Store>,
    state: Mutex<QueueState>,
    owned: tokio::sync::Mutex<HashMap<u32, Owned>>,
    closed: AtomicBool,
    /// Appends hold it shared; `close` takes it exclusively, so it waits for them.
    gate: RwLock<()>,
    stop: watch::Sender<bool>,
    gauges: NodeGauges,
}

/// The JetStream-backed [`Spool`].
pub struct NatsSpool {
    inner: Arc<Inner>,
    runtime: tokio::runtime::Handle,
    stop_runtime: Mutex<Option<oneshot::Sender<()>>>,
    closed: AtomicBool,
}

impl NatsSpool {
    /// Connects, creates (or updates) the streams and the bucket, takes this node's share
    /// of the partitions and starts pulling. Blocks the calling thread until then.
    pub fn open(options: NatsSpoolOptions, metrics: Metrics) -> Result<NatsSpool, SpoolError> {
        let (ready, answer) = std::sync::mpsc::channel();
        let (stop_runtime, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("nats-spool".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("nats-spool-io")
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready.send(Err(storage("cannot start the spool runtime", e)));
                        return;
                    }
                };
                let handle = runtime.handle().clone();
                runtime.block_on(async move {
                    match Inner::connect(options, metrics).await {
                        Ok(inner) => {
                            let _ = ready.send(Ok((inner, handle)));
                            let _ = stopped.await;
                        }
                        Err(e) => {
                            let _ = ready.send(Err(e));
                        }
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| storage("cannot start the spool thread", e))?;
        let (inner, runtime) = answer
            .recv()
            .map_err(|_| SpoolError::Storage("the spool thread stopped".into()))??;
        Ok(NatsSpool {
            inner,
            runtime,
            stop_runtime: Mutex::new(Some(stop_runtime)),
            closed: AtomicBool::new(false),
        })
    }

    /// Runs `work` on the spool's runtime.
    async fn run<T, F, Fut>(&self, work: F) -> Result<T, SpoolError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: std::future::Future<Output = Result<T, SpoolError>> + Send + 'static,
    {
        if self.closed.load(Ordering::Acquire) || self.inner.closed.load(Ordering::Acquire) {
            return Err(SpoolError::Closed);
        }
        let task = self.runtime.spawn(work(self.inner.clone()));
        task.await.map_err(|_| SpoolError::Closed)?
    }

    /// The name this node has in the ownership bucket.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// The partitions this node owns now (tests and the benchmark).
    pub async fn owned_partitions(&self) -> Vec<u32> {
        let inner = self.inner.clone();
        let task = self.runtime.spawn(async move {
            let mut owned: Vec<u32> = inner.owned.lock().await.keys().copied().collect();
            owned.sort_unstable();
            owned
        });
        task.await.unwrap_or_default()
    }
}

impl Drop for NatsSpool {
    fn drop(&mut self) {
        let _ = self.inner.stop.send(true);
        if let Ok(mut stop) = self.stop_runtime.lock() {
            if let Some(stop) = stop.take() {
                let _ = stop.send(());
            }
        }
    }
}

impl Inner {
    async fn connect(
        options: NatsSpoolOptions,
        metrics: Metrics,
    ) -> Result<Arc<Inner>, SpoolError> {
        let node_id = format!(
            "{}-{}",
            options
                .node_name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                })
                .collect::<String>(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let mut connect = async_nats::ConnectOptions::new()
            .name(format!("refiner-gateway {node_id}"))
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(5)))
            .max_reconnects(None)
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("connected to NATS"),
                    async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                    other => tracing::debug!(event = %other, "NATS client event"),
                }
            });
        if let Some(token) = &options.token {
            connect = connect.token(token.clone());
        }
        if let (Some(user), Some(password)) = (&options.user, &options.password) {
            connect = connect.user_and_password(user.clone(), password.clone());
        }
        if let Some(path) = &options.credentials_file {
            connect = connect
                .credentials_file(path)
                .await
                .map_err(|e| storage("cannot read the NATS credentials file", e))?;
        }
        let servers = options
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| u.parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| storage(&format!("bad NATS URL `{}`", options.url), e))?;
        let client = connect
            .connect(servers)
            .await
            .map_err(|e| storage(&format!("cannot connect to NATS at {}", options.url), e))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .ack_timeout(options.publish_timeout)
            .build(client.clone());

        let events = js
            .create_or_update_stream(stream::Config {
                name: options.stream.clone(),
                subjects: vec![format!("{}.events.*", options.subject_prefix)],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                num_replicas: options.replicas,
                duplicate_window: options.dedup_window,
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|e| storage(&format!("cannot set up stream {}", options.stream), e))?;
        let events = js
            .get_stream(&events.config.name)
            .await
            .map_err(|e| storage("cannot open the events stream", e))?;
        let dead = js
            .create_or_update_stream(stream::Config {
                name: options.dead_letter_stream.clone(),
                subjects: vec![format!("{}.dead.*", options.subject_prefix)],
                retention: stream::RetentionPolicy::Limits,
                max_age: options.dead_letter_retention.unwrap_or_default(),
                storage: stream::StorageType::File,
                num_replicas: options.replicas,
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                storage(
                    &format!("cannot set up stream {}", options.dead_letter_stream),
                    e,
                )
            })?;
        let dead = js
            .get_stream(&dead.config.name)
            .await
            .map_err(|e| storage("cannot open the dead-letter stream", e))?;
        let kv = js
            .create_or_update_key_value(kv::Config {
                bucket: options.bucket.clone(),
                history: 1,
                max_age: options.ownership_ttl,
                storage: stream::StorageType::File,
                num_replicas: options.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| storage(&format!("cannot set up bucket {}", options.bucket), e))?;

        let dedup = match &options.dedup_bucket {
            Some(bucket) => Some(
                js.create_or_update_key_value(kv::Config {
                    bucket: bucket.clone(),
                    history: 1,
                    max_age: options.dedup_window,
                    storage: stream::StorageType::File,
                    num_replicas: options.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| storage(&format!("cannot set up bucket {bucket}"), e))?,
            ),
            None => None,
        };
        let retries = match &options.retry_bucket {
            Some(bucket) => Some(
                js.create_or_update_key_value(kv::Config {
                    bucket: bucket.clone(),
                    history: 1,
                    // Records are removed with their event; the TTL only sweeps leftovers.
                    max_age: RETRY_RECORD_TTL,
                    storage: stream::StorageType::File,
                    num_replicas: options.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| storage(&format!("cannot set up bucket {bucket}"), e))?,
            ),
            None => None,
        };
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            options,
            node_id,
            client,
            js,
            events,
            dead,
            kv,
            dedup,
            retries,
            state: Mutex::new(QueueState::default()),
            owned: tokio::sync::Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            gate: RwLock::new(()),
            stop,
            gauges: NodeGauges::register(&metrics),
        });
        inner.balance().await;
        tokio::spawn(inner.clone().ownership_loop());
        Ok(inner)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn partition_key(partition: u32) -> String {
        format!("p.{partition}")
    }

    // -----------------------------------------------------------------------------------
    // Ownership
    // -----------------------------------------------------------------------------------

    async fn ownership_loop(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        let period = (self.options.ownership_ttl / 4).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            self.balance().await;
        }
    }

    /// One round: say this node is alive, renew what it owns, take or give up partitions
    /// towards an even share.
    async fn balance(self: &Arc<Self>) {
        let ttl = self.options.ownership_ttl;
        let connected = self.client.connection_state() == async_nats::connection::State::Connected;
        self.gauges.connected.set(i64::from(connected));
        if let Err(e) = self
            .kv
            .put(
                format!("node.{}", self.node_id),
                now_ms().to_string().into(),
            )
            .await
        {
            tracing::warn!(error = %e, "cannot announce this node in the ownership bucket");
        }
        let mut owned = self.owned.lock().await;
        let mut lost = Vec::new();
        for (partition, own) in owned.iter_mut() {
            match self
                .kv
                .update(
                    Self::partition_key(*partition),
                    self.node_id.clone().into(),
                    own.revision,
                )
                .await
            {
                Ok(revision) => {
                    own.revision = revision;
                    own.renewed = Instant::now();
                    if own.draining_since.is_none() {
                        self.set_leasable(*partition, true);
                    }
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::warn!(partition, "lost ownership of a partition");
                    lost.push(*partition);
                }
                Err(e) => {
                    tracing::warn!(partition, error = %e, "cannot renew partition ownership");
                    // Stop leasing well before the key can expire and another node take it.
                    if own.renewed.elapsed() > ttl / 2 {
                        self.set_leasable(*partition, false);
                    }
                }
            }
        }
        for partition in lost {
            if let Some(own) = owned.remove(&partition) {
                let _ = own.stop.send(true);
            }
            self.state().drop_partition(partition);
        }

        // Who is alive, and which partitions are taken.
        let mut nodes = 0usize;
        let mut taken = std::collections::HashSet::new();
        match self.kv.keys().await {
            Ok(mut keys) => {
                while let Some(key) = keys.next().await {
                    let Ok(key) = key else { break };
                    if key.starts_with("node.") {
                        nodes += 1;
                    } else if let Some(p) = key.strip_prefix("p.") {
                        if let Ok(p) = p.parse::<u32>() {
                            taken.insert(p);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the ownership bucket");
                return;
            }
        }
        let partitions = self.options.partitions;
        let share = (partitions as usize).div_ceil(nodes.max(1));
        self.gauges.buffered.set(self.state().len() as i64);

        // Give up extras gracefully: stop leasing, wait for leased events to settle.
        let active = owned
            .values()
            .filter(|o| o.draining_since.is_none())
            .count();
        if active > share {
            let mut extras: Vec<u32> = owned
                .iter()
                .filter(|(_, o)| o.draining_since.is_none())
                .map(|(p, _)| *p)
                .collect();
            extras.sort_unstable();
            for partition in extras.into_iter().rev().take(active - share) {
                if let Some(own) = owned.get_mut(&partition) {
                    tracing::info!(partition, "handing a partition over");
                    own.draining_since = Some(Instant::now());
                    self.set_leasable(partition, false);
                }
            }
        }
        let now = now_ms();
        let done: Vec<u32> = owned
            .iter()
            .filter(|(p, o)| {
                o.draining_since.is_some_and(|since| {
                    !self.state().has_leases(**p, now) || since.elapsed() > ttl * 3
                })
            })
            .map(|(p, _)| *p)
            .collect();
        for partition in done {
            if let Some(own) = owned.remove(&partition) {
                self.release(partition, own).await;
            }
        }

        // Take free partitions up to the share, starting at a random one.
        let active = owned
            .values()
            .filter(|o| o.draining_since.is_none())
            .count();
        if active < share {
            let start = fastrand::u32(0..partitions.max(1));
            let mut wanted = share - active;
            for i in 0..partitions {
                if wanted == 0 {
                    break;
                }
                let partition = (start + i) % partitions;
                if taken.contains(&partition) || owned.contains_key(&partition) {
                    continue;
                }
                if let Some(own) = self.acquire(partition).await {
                    owned.insert(partition, own);
                    self.gauges.takeovers.inc();
                    wanted -= 1;
                }
            }
        }
        self.gauges.partitions.set(owned.len() as i64);
    }

    fn set_leasable(&self, partition: u32, leasable: bool) {
        if let Some(p) = self.state().partitions.get_mut(&partition) {
            p.leasable = leasable;
        }
    }

    async fn acquire(self: &Arc<Self>, partition: u32) -> Option<Owned> {
        let key = Self::partition_key(partition);
        let revision = match self.kv.create(&key, self.node_id.clone().into()).await {
            Ok(revision) => revision,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => return None,
            Err(e) => {
                tracing::warn!(partition, error = %e, "cannot take a partition");
                return None;
            }
        };
        match self.start_partition(partition).await {
            Ok(stop) => {
                tracing::info!(partition, node = %self.node_id, "took a partition");
                Some(Owned {
                    revision,
                    renewed: Instant::now(),
                    stop,
                    draining_since: None,
                })
            }
            Err(e) => {
                tracing::warn!(partition, error = %e, "cannot start consuming a partition");
                let _ = self.kv.delete_expect_revision(&key, Some(revision)).await;
                self.state().drop_partition(partition);
                None
            }
        }
    }

    /// A fresh consumer for the partition (so JetStream delivers every unacked event from
    /// the start, in order), the sequence to catch up to, and the pull task.
    async fn start_partition(
        self: &Arc<Self>,
        partition: u32,
    ) -> Result<watch::Sender<bool>, SpoolError> {
        let consumer = self.fresh_consumer(partition).await?;
        self.restore_retries(partition).await?;
        let subject = self.options.event_subject(partition);
        let target = match self.events.get_last_raw_message_by_subject(&subject).await {
            Ok(message) => message.sequence,
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => 0,
            Err(e) => return Err(storage("cannot read the partition's last event", e)),
        };
        self.state().partitions.insert(
            partition,
            PartitionState {
                leasable: true,
                seen_high: 0,
                target_high: target,
            },
        );
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(self.clone().pull_loop(partition, consumer, stopped));
        Ok(stop)
    }

    /// Loads what previous owners recorded about the partition's retried events.
    async fn restore_retries(&self, partition: u32) -> Result<(), SpoolError> {
        let Some(retries) = &self.retries else {
            return Ok(());
        };
        let prefix = format!("p{partition}.");
        let mut keys = retries
            .keys()
            .await
            .map_err(|e| storage("cannot list the retry records", e))?;
        let mut found = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| storage("cannot list the retry records", e))?;
            if let Some(seq) = key
                .strip_prefix(&prefix)
                .and_then(|s| s.parse::<u64>().ok())
            {
                found.push((seq, key));
            }
        }
        for (seq, key) in found {
            let value = retries
                .get(&key)
                .await
                .map_err(|e| storage("cannot read a retry record", e))?;
            if let Some(record) = value.and_then(|v| serde_json::from_slice(&v).ok()) {
                self.state().restore(seq, record);
            }
        }
        Ok(())
    }

    async fn fresh_consumer(&self, partition: u32) -> Result<consumer::PullConsumer, SpoolError> {
        let name = self.options.consumer_name(partition);
        match self.events.delete_consumer(&name).await {
            Ok(_) => {}
            Err(e) if e.to_string().contains("not found") => {}
            Err(e) => return Err(storage("cannot reset the partition's consumer", e)),
        }
        self.events
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name),
                filter_subject: self.options.event_subject(partition),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: self.options.ack_wait,
                max_deliver: -1,
                max_ack_pending: self.options.max_ack_pending,
                deliver_policy: consumer::DeliverPolicy::All,
                num_replicas: self.options.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| storage("cannot create the partition's consumer", e))
    }

    async fn release(&self, partition: u32, own: Owned) {
        let _ = own.stop.send(true);
        self.state().drop_partition(partition);
        if let Err(e) = self
            .kv
            .delete_expect_revision(Self::partition_key(partition), Some(own.revision))
            .await
        {
            tracing::debug!(partition, error = %e, "releasing a partition");
        }
        tracing::info!(partition, "released a partition");
    }

    // -----------------------------------------------------------------------------------
    // Pulling
    // -----------------------------------------------------------------------------------

    /// Pulls the partition's events into memory until stopped; survives missed heartbeats,
    /// reconnects and server restarts by starting a new pull (and, if the consumer is gone
    /// while this node still owns the partition, a new consumer).
    async fn pull_loop(
        self: Arc<Self>,
        partition: u32,
        mut consumer: consumer::PullConsumer,
        mut stopped: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if *stopped.borrow() {
                return;
            }
            let messages = consumer
                .stream()
                .max_messages_per_batch(self.options.fetch_batch)
                .heartbeat(PULL_HEARTBEAT)
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let mut messages = match messages {
                Ok(messages) => messages,
                Err(e) => {
                    tracing::warn!(partition, error = %e, "cannot pull from a partition");
                    if self.sleep_or_stop(backoff, &mut stopped).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    if self.client.connection_state() == async_nats::connection::State::Connected {
                        if let Some(renewed) = self.recover_consumer(partition, &e).await {
                            consumer = renewed;
                        }
                    }
                    continue;
                }
            };
            loop {
                while self.state().len() >= self.options.max_buffered {
                    if self
                        .sleep_or_stop(Duration::from_millis(5), &mut stopped)
                        .await
                    {
                        return;
                    }
                }
                let next = tokio::select! {
                    next = messages.next() => next,
                    _ = stopped.changed() => return,
                };
                match next {
                    Some(Ok(message)) => {
                        backoff = Duration::from_millis(100);
                        self.receive(partition, message).await;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(partition, error = %e, "pulling from a partition failed; pulling again");
                        break;
                    }
                    None => break,
                }
            }
            if self.sleep_or_stop(backoff, &mut stopped).await {
                return;
            }
            // Until a message arrives again, each failed pull waits twice as long (a consumer
            // leader being elected answers "no responders" for seconds).
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    async fn recover_consumer(
        &self,
        partition: u32,
        error: &impl std::fmt::Display,
    ) -> Option<consumer::PullConsumer> {
        if !error.to_string().contains("not found") {
            return None;
        }
        let owned = self.owned.lock().await.contains_key(&partition);
        if !owned {
            return None;
        }
        tracing::warn!(partition, "the partition's consumer is gone; recreating it");
        self.events
            .get_consumer(&self.options.consumer_name(partition))
            .await
            .ok()
            .or(self.fresh_consumer(partition).await.ok())
    }

    async fn sleep_or_stop(&self, duration: Duration, stopped: &mut watch::Receiver<bool>) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(duration) => *stopped.borrow(),
            _ = stopped.changed() => true,
        }
    }

    async fn receive(&self, partition: u32, message: jetstream::Message) {
        let (seq, delivered) = match message.info() {
            Ok(info) => (info.stream_sequence, info.delivered.max(1) as u64),
            Err(e) => {
                tracing::warn!(error = %e, "a pulled message has no JetStream metadata");
                return;
            }
        };
        let reply = message
            .reply
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_default();
        let Some((meta, payload)) = decode::<Meta>(&message.payload) else {
            tracing::error!(
                seq,
                "an event in the stream cannot be read; dead-lettering it"
            );
            let dead = DeadMeta {
                source: "unknown".into(),
                message_id: String::new(),
                kind: String::new(),
                user_key: String::new(),
                received_at_ms: 0,
                attempts: 0,
                status: None,
                error: "the stored event cannot be read".into(),
                created_at_ms: now_ms(),
                queue_seq: seq as i64,
                history: Vec::new(),
            };
            if self.bury(&dead, &message.payload).await.is_ok() {
                self.answer(vec![Reply::Ack { seq, reply }]).await;
            }
            return;
        };
        // An event still in memory (redelivered after its ack wait) is being handled here:
        // only an event that comes back from JetStream counts against max_deliver.
        let in_memory = self.state().get(seq as i64).is_some();
        if !in_memory && self.options.max_deliver > 0 && delivered > self.options.max_deliver {
            let dead = DeadMeta {
                source: meta.s.clone(),
                message_id: meta.m.clone(),
                kind: meta.k.clone(),
                user_key: meta.u.clone(),
                received_at_ms: meta.r,
                attempts: (delivered - 1) as u32,
                status: None,
                error: format!("delivered {} times (max_deliver)", delivered - 1),
                created_at_ms: now_ms(),
                queue_seq: seq as i64,
                history: Vec::new(),
            };
            if self.bury(&dead, &payload).await.is_ok() {
                self.answer(vec![Reply::Ack { seq, reply }]).await;
            }
            return;
        }
        let entry = Entry {
            event: Leased {
                seq: seq as i64,
                source: meta.s,
                message_id: meta.m,
                kind: meta.k,
                user_key: meta.u,
                payload,
                attempts: meta.a,
                received_at_ms: meta.r,
            },
            partition,
            reply,
            delivered,
            history: meta.h,
        };
        let nak = self.state().insert(entry, now_ms());
        if let Some(nak) = nak {
            self.answer(vec![nak]).await;
        }
    }

    /// Copies a dead letter to its stream and waits for JetStream's ack.
    async fn bury(&self, dead: &DeadMeta, payload: &[u8]) -> Result<(), SpoolError> {
        let subject = self.options.dead_subject(&dead.source);
        let ack = self
            .js
            .publish(subject, encode(dead, payload).into())
            .await
            .map_err(|e| storage("cannot copy a dead letter", e))?;
        ack.await
            .map_err(|e| storage("cannot copy a dead letter", e))?;
        Ok(())
    }

    /// Tells JetStream the outcome of each event and waits for its confirmations.
    async fn answer(&self, replies: Vec<Reply>) {
        let answers = replies.into_iter().map(|reply| async move {
            let (subject, kind) = match reply {
                Reply::Ack { reply, .. } => (reply, AckKind::Ack),
                Reply::Nak {
                    reply, delay_ms, ..
                } => (
                    reply,
                    AckKind::Nak(Some(Duration::from_millis(delay_ms.max(1)))),
                ),
            };
            if subject.is_empty() {
                return;
            }
            let acker =
                jetstream::message::Acker::new(self.js.clone(), Some(Subject::from(subject)));
            if let Err(e) = acker.double_ack_with(kind).await {
                // The event stays pending and comes back after the ack wait: a duplicate at
                // worst, never a loss.
                tracing::warn!(error = %e, "JetStream did not confirm an ack or nak");
            }
        });
        futures_util::future::join_all(answers).await;
    }

    // -----------------------------------------------------------------------------------
    // The trait's operations
    // -----------------------------------------------------------------------------------

    async fn append(&self, request: AppendRequest) -> Result<AppendReport, SpoolError> {
        let _gate = self.gate.read().await;
        if self.closed.load(Ordering::Acquire) {
            return Err(SpoolError::Closed);
        }
        if request.events.is_empty() {
            return Ok(AppendReport::default());
        }
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(SpoolError::Storage("not connected to NATS".into()));
        }
        let partitions = self.options.partitions;
        let publish = async {
            // Ids accepted before (within the window, across server restarts): not again.
            let keys: Vec<String> = request
                .events
                .iter()
                .map(|e| dedup_key(&request.source, &e.message_id))
                .collect();
            let seen: Vec<bool> = match &self.dedup {
                Some(dedup) => {
                    let lookups = keys.iter().map(|key| dedup.get(key.as_str()));
                    futures_util::future::join_all(lookups)
                        .await
                        .into_iter()
                        .map(|found| {
                            found
                                .map(|v| v.is_some())
                                .map_err(|e| storage("cannot read the dedup bucket", e))
                        })
                        .collect::<Result<_, _>>()?
                }
                None => vec![false; keys.len()],
            };
            let mut report = AppendReport::default();
            let mut pending = Vec::with_capacity(request.events.len());
            for (i, event) in request.events.iter().enumerate() {
                if seen[i] {
                    report.duplicates += 1;
                    continue;
                }
                let partition = partition_of(&request.source, &event.user_key, partitions);
                let meta = Meta {
                    s: request.source.clone(),
                    m: event.message_id.clone(),
                    k: event.kind.as_str().to_owned(),
                    u: event.user_key.clone(),
                    r: request.received_at_ms,
                    a: 0,
                    h: Vec::new(),
                };
                let mut headers = HeaderMap::new();
                headers.insert(
                    "Nats-Msg-Id",
                    msg_id(&request.source, &event.message_id).as_str(),
                );
                let ack = self
                    .js
                    .publish_with_headers(
                        self.options.event_subject(partition),
                        headers,
                        encode(&meta, &event.payload).into(),
                    )
                    .await
                    .map_err(|e| storage("publishing an event failed", e))?;
                pending.push((i, partition, ack));
            }
            let mut appended = Vec::new();
            let mut stored = Vec::new();
            for (i, partition, ack) in pending {
                let ack = ack
                    .await
                    .map_err(|e| storage("JetStream did not acknowledge an event", e))?;
                stored.push(i);
                if ack.duplicate {
                    report.duplicates += 1;
                } else {
                    report.queued += 1;
                    appended.push((partition, ack.sequence));
                }
            }
            // Remember what is now stored. A failure here loses no event: the stream's
            // duplicate window still covers a retry unless the server restarts meanwhile.
            if let Some(dedup) = &self.dedup {
                let records = stored
                    .iter()
                    .map(|i| dedup.put(keys[*i].as_str(), Vec::new().into()));
                for record in futures_util::future::join_all(records).await {
                    if let Err(e) = record {
                        tracing::warn!(error = %e, "cannot record an accepted messageId");
                    }
                }
            }
            Ok::<_, SpoolError>((report, appended))
        };
        let (report, appended) = tokio::time::timeout(self.options.publish_timeout, publish)
            .await
            .map_err(|_| SpoolError::Storage("JetStream did not acknowledge in time".into()))??;
        let mut state = self.state();
        for (partition, seq) in appended {
            state.appended(partition, seq);
        }
        Ok(report)
    }

    async fn lease(&self, max: usize, lease_ms: i64) -> Result<Vec<Leased>, SpoolError> {
        // Wait (briefly) until what is known to be in the owned partitions has arrived, so
        // an event appended before this call can be leased by it.
        // Only what was appended before this call: later appends do not hold it up.
        let deadline = Instant::now() + self.options.catch_up_wait;
        let targets = self.state().targets();
        loop {
            {
                let state = self.state();
                if state.caught_up(&targets) || state.len() >= self.options.max_buffered {
                    break;
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(self.state().lease(max, lease_ms, now_ms()))
    }

    async fn settle(&self, settlement: Settlement) -> Result<(), SpoolError> {
        // Dead letters are copied first: if that fails nothing changes and the caller
        // retries the whole settlement.
        let mut burials = Vec::new();
        {
            let state = self.state();
            let now = now_ms();
            for dead in &settlement.dead {
                if let Some(entry) = state.get(dead.seq) {
                    let event = &entry.event;
                    let mut history = state.history(dead.seq);
                    if dead.attempted {
                        history.push((now, dead.status, dead.error.clone()));
                    }
                    burials.push((
                        DeadMeta {
                            source: event.source.clone(),
                            message_id: event.message_id.clone(),
                            kind: event.kind.clone(),
                            user_key: event.user_key.clone(),
                            received_at_ms: event.received_at_ms,
                            attempts: event.attempts + u32::from(dead.attempted),
                            status: dead.status,
                            error: dead.error.clone(),
                            created_at_ms: now,
                            queue_seq: event.seq,
                            history,
                        },
                        event.payload.clone(),
                    ));
                }
            }
        }
        for (dead, payload) in &burials {
            self.bury(dead, payload).await?;
        }
        let (replies, changes) = {
            let mut state = self.state();
            let replies = state.settle(&settlement, now_ms());
            (replies, state.take_record_changes())
        };
        // Retry records before the naks: a node that dies right after a nak has left the
        // event's attempts and retry time for the next owner.
        if let Some(retries) = &self.retries {
            let writes = changes.into_iter().map(|change| async move {
                let written = match change {
                    RecordChange::Put {
                        partition,
                        seq,
                        record,
                    } => retries
                        .put(
                            retry_key(partition, seq),
                            serde_json::to_vec(&record).unwrap_or_default().into(),
                        )
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    RecordChange::Remove { partition, seq } => retries
                        .delete(retry_key(partition, seq))
                        .await
                        .map_err(|e| e.to_string()),
                };
                if let Err(e) = written {
                    tracing::warn!(error = %e, "cannot update a retry record");
                }
            });
            futures_util::future::join_all(writes).await;
        }
        self.answer(replies).await;
        Ok(())
    }

    async fn check_writable(&self) -> Result<(), SpoolError> {
        self.kv
            .put(
                format!("probe.{}", self.node_id),
                now_ms().to_string().into(),
            )
            .await
            .map_err(|e| storage("JetStream refused a write", e))?;
        Ok(())
    }

    async fn stats(&self) -> Result<SpoolStats, SpoolError> {
        let mut oldest = None;
        let mut depth = 0;
        for _ in 0..3 {
            let info = self
                .events
                .get_info()
                .await
                .map_err(|e| storage("cannot read the events stream", e))?;
            depth = info.state.messages;
            if depth == 0 {
                oldest = None;
                break;
            }
            match self.events.get_raw_message(info.state.first_sequence).await {
                Ok(message) => {
                    oldest = decode::<Meta>(&message.payload).map(|(meta, _)| meta.r);
                    break;
                }
                // Acked between the two reads: look again.
                Err(_) => continue,
            }
        }
        let dead = self
            .dead
            .get_info()
            .await
            .map_err(|e| storage("cannot read the dead-letter stream", e))?;
        Ok(SpoolStats {
            depth,
            oldest_received_at_ms: oldest,
            dead_letters: dead.state.messages,
        })
    }

    async fn close(&self) {
        let _gate = self.gate.write().await;
        self.closed.store(true, Ordering::Release);
        let _ = self.stop.send(true);
        let mut owned = self.owned.lock().await;
        for (partition, own) in owned.drain() {
            self.release(partition, own).await;
        }
        let _ = self.kv.delete(format!("node.{}", self.node_id)).await;
        let _ = self.client.flush().await;
    }
}

#[async_trait]
impl Spool for NatsSpool {
    async fn append(&self, request: AppendRequest) -> Result<AppendReport, SpoolError> {
        self.run(|inner| async move { inner.append(request).await })
            .await
    }

    async fn lease(&self, max: usize, lease_ms: i64) -> Result<Vec<Leased>, SpoolError> {
        self.run(move |inner| async move { inner.lease(max, lease_ms).await })
            .await
    }

    async fn settle(&self, settlement: Settlement) -> Result<(), SpoolError> {
        self.run(|inner| async move { inner.settle(settlement).await })
            .await
    }

    async fn check_writable(&self) -> Result<(), SpoolError> {
        self.run(|inner| async move { inner.check_writable().await })
            .await
    }

    async fn stats(&self) -> Result<SpoolStats, SpoolError> {
        self.run(|inner| async move { inner.stats().await }).await
    }

    async fn close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.inner.clone();
        let _ = self
            .runtime
            .spawn(async move {
                inner.close().await;
            })
            .await;
        let stop = self.stop_runtime.lock().ok().and_then(|mut s| s.take());
        if let Some(stop) = stop {
            let _ = stop.send(());
        }
    }
}

#[async_trait]
impl DeadLetters for NatsSpool {
    async fn list_dead_letters(
        &self,
        query: crate::spool::admin::DeadLetterQuery,
    ) -> Result<crate::spool::admin::DeadLetterPage, SpoolError> {
        self.run(|inner| async move { inner.list_dead_letters(query).await })
            .await
    }

    async fn dead_letter(
        &self,
        source: &str,
        id: i64,
    ) -> Result<Option<crate::spool::admin::DeadLetter>, SpoolError> {
        let source = source.to_owned();
        self.run(move |inner| async move { inner.dead_letter(&source, id).await })
            .await
    }

    async fn replay_dead_letters(
        &self,
        filter: crate::spool::admin::DeadLetterFilter,
        limit: Option<u64>,
    ) -> Result<crate::spool::admin::ReplayReport, SpoolError> {
        self.run(move |inner| async move { inner.replay_dead_letters(filter, limit).await })
            .await
    }

    async fn delete_dead_letters(
        &self,
        filter: crate::spool::admin::DeadLetterFilter,
    ) -> Result<u64, SpoolError> {
        self.run(|inner| async move { inner.delete_dead_letters(filter).await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        assert_eq!(
            partition_of("default", "u:1", 16),
            partition_of("default", "u:1", 16)
        );
        let mut counts = [0u32; 16];
        for i in 0..1600 {
            counts[partition_of("default", &format!("user-{i}"), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|c| *c > 50), "{counts:?}");
    }

    #[test]
    fn message_ids_are_safe_header_values() {
        assert_eq!(msg_id("web", "abc-1"), "web:abc-1");
        let odd = msg_id("web", "a b\r\nc");
        assert!(odd.starts_with("web:sha256:"));
        assert!(odd.bytes().all(|b| b.is_ascii_graphic() || b == b':'));
    }

    #[test]
    fn envelopes_round_trip() {
        let meta = Meta {
            s: "web".into(),
            m: "m1".into(),
            k: "track".into(),
            u: "u:1".into(),
            r: 42,
            a: 0,
            h: Vec::new(),
        };
        let body = encode(&meta, b"{\"a\":\n1}");
        let (back, payload) = decode::<Meta>(&body).expect("decodes");
        assert_eq!(back.r, 42);
        assert_eq!(payload, b"{\"a\":\n1}");
    }
}
