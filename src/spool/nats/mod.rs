//! The distributed spool: NATS JetStream, shared by several gateway nodes.
//!
//! Layout (every name configurable):
//! - Stream `GATEWAY_EVENTS`, work-queue retention, subjects `gateway.events.<p>` (one
//!   event a message) and `gateway.events.<p>.<k>` (a pack of `k` events of one request,
//!   [`pack`]), `p = hash(source, user key) mod partitions`. An event's `seq` is its
//!   message's stream sequence and its place in it ([`pack::event_seq`]). `Nats-Msg-Id` is
//!   the source and the `messageId` (a hash of the pack's ids for a pack), so JetStream's
//!   short duplicate window drops the retry of a request; the partition owners' index
//!   ([`dedup`]) drops every other repeat within the dedup window (24 h by default).
//! - Stream `GATEWAY_DEAD_LETTERS`, subjects `gateway.dead.<source>`: copies of the events
//!   given up on (JetStream has no dead-letter queue: a message past `max_deliver` just
//!   stays in its stream).
//! - Key-value bucket `gateway_partitions` with a TTL: `p.<n>` names the node that owns
//!   partition n, `node.<id>` says a node is alive. Owners renew with a compare-and-set on
//!   the revision; a key that is not renewed expires and another node takes the partition.
//! - One durable pull consumer per partition (`gateway-p<n>`), recreated by each new owner.
//!
//! Guarantees, beyond the [`Spool`] trait's:
//! - [`Spool::append`] answers only after JetStream acknowledged every message of the
//!   request (publish ack); a failure or a timeout is [`SpoolError::Storage`] (ingest answers
//!   503), and a retry of the same request is deduplicated by `Nats-Msg-Id`.
//! - A pack is acked once all its events are settled, and nakked (with the earliest delay)
//!   once none of its unsettled events is in memory ([`state::Packs`]).
//! - A partition is consumed by one node at a time. A new owner deletes and recreates the
//!   partition's consumer, so JetStream delivers it every unacked event from the start of
//!   the partition, in stream order: per-user order survives a crash of the previous owner
//!   (delivery is at least once; the old owner's in-flight events are delivered again).
//! - Only a gap-free run of a consumer's deliveries is taken in: when a delivery is missing
//!   (lost on its way when a server dies, or on a dropped pull), the owner replaces the
//!   consumer and gets every unacked event again, in order ([`pull`]).
//! - The owner keeps the holds in memory ([`state`]): a retried event is nakked with its
//!   delay (never a bare nak), and its user's later events wait in memory, or go back to
//!   JetStream with a delay that brings them back behind it.
//! - Events JetStream delivered more than `max_deliver` times go to the dead letters.
//! - A node that cannot renew its ownership stops leasing from the partition before the key
//!   can expire, so two nodes never lease the same partition's events at once.
//!
//! The spool runs on the runtime that opens it: its tasks (ownership, one pull per owned
//! partition) are spawned there and end when the spool is closed, or are aborted when it
//! is dropped without closing (a node that dies).

mod connect;
mod dead;
pub mod dedup;
pub mod delivery_log;
pub mod direct;
mod hll;
mod metering;
mod ownership;
pub mod pack;
mod pull;
mod queue;
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
use tokio::sync::{watch, RwLock};

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
    /// dedup window, looked up at ingest (about 350 bytes of server memory per id);
    /// `None` (the default): the partition owners' index ([`dedup`]) keeps the promise.
    pub dedup_bucket: Option<String>,
    /// The stream of the partition owners' dedup indexes ([`dedup`]); `None`: no index,
    /// JetStream's duplicate window is then the whole dedup window.
    pub dedup_stream: Option<String>,
    /// JetStream's duplicate window when the owners' index is on: a repeat within it is
    /// dropped at ingest, a later one by the partition's owner.
    pub duplicate_window: Duration,
    /// How often a partition's owner writes its recent ids out as a run (also when
    /// [`dedup::FLUSH_IDS`] are waiting).
    pub dedup_flush: Duration,
    /// Scratch directory of the owners' run files (a cache of the dedup stream, cleared at
    /// start).
    pub dedup_dir: std::path::PathBuf,
    /// The key-value bucket of retried events' attempts and retry times, so that a new
    /// owner of a partition continues their backoff; `None`: a new owner starts over.
    pub retry_bucket: Option<String>,
    /// The key-value bucket of usage (MTU, MTE, MPV) and hourly counters, merged into by
    /// every node ([`metering`]); `None`: the management API's usage routes fail with 503.
    pub usage_bucket: Option<String>,
    /// Replicas of the streams and the bucket (3 in production).
    pub replicas: usize,
    /// Partitions (fixed for the life of the stream: changing it moves users).
    pub partitions: u32,
    /// How long a `(source, messageId)` suppresses repeats (24 h by default).
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
    /// Unacked messages (events, or packs of them) JetStream lets one partition's consumer
    /// have.
    pub max_ack_pending: i64,
    /// Events a node holds in memory before it stops pulling.
    pub max_buffered: usize,
    /// Messages (events, or packs of them) pulled per request.
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
            dedup_bucket: None,
            dedup_stream: Some("GATEWAY_DEDUP".into()),
            duplicate_window: Duration::from_secs(300),
            dedup_flush: Duration::from_secs(300),
            dedup_dir: std::env::temp_dir().join("refiner-gateway-dedup"),
            retry_bucket: Some("gateway_retries".into()),
            usage_bucket: Some("gateway_usage".into()),
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

    /// The subject of the partition's single events ([`pack::subject`]).
    fn event_subject(&self, partition: u32) -> String {
        pack::subject(&self.subject_prefix, partition, 1)
    }

    /// The subjects of the partition's messages: single events and packs.
    fn partition_subjects(&self, partition: u32) -> [String; 2] {
        let single = self.event_subject(partition);
        let packs = format!("{single}.*");
        [single, packs]
    }

    fn dead_subject(&self, source: &str) -> String {
        format!("{}.dead.{source}", self.subject_prefix)
    }

    /// The events stream's duplicate window: short when the owners' index keeps the rest.
    fn jetstream_window(&self) -> Duration {
        match self.dedup_stream {
            Some(_) => self.duplicate_window.min(self.dedup_window),
            None => self.dedup_window,
        }
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

/// `Nats-Msg-Id` of a pack: the source and a hash of its events' `messageId`s, in order, so
/// a request sent again is recognised in JetStream's duplicate window.
fn pack_msg_id<'a>(source: &str, message_ids: impl Iterator<Item = &'a str>) -> String {
    use sha2::Digest;
    let mut digest = sha2::Sha256::new();
    for id in message_ids {
        digest.update((id.len() as u64).to_be_bytes());
        digest.update(id.as_bytes());
    }
    format!("{source}:pack:{}", hex::encode(&digest.finalize()[..16]))
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
/// How long a pull waits for a delivery before it asks the consumer how many it sent (two
/// such checks in a row without a delivery find the last ones lost on their way).
const IDLE_CHECK: Duration = Duration::from_secs(3);

/// Events one append publishes before it waits for their acks (a larger request is
/// published in windows of this size, one wait per window).
const PUBLISH_WINDOW: usize = 1024;
/// Events a node has published and not seen acknowledged, at most (all requests together).
const MAX_PUBLISH_IN_FLIGHT: usize = 8192;

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
    consumer_resets: prometheus::IntCounter,
    log_dropped: prometheus::IntCounter,
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
        let consumer_resets = prometheus::IntCounter::new(
            "gateway_nats_consumer_resets_total",
            "Partition consumers this node replaced because deliveries went missing or the \
             consumer was gone.",
        )
        .expect("a valid metric");
        let _ = metrics.registry.register(Box::new(consumer_resets.clone()));
        let log_dropped = prometheus::IntCounter::new(
            "gateway_delivery_log_dropped_total",
            "Delivery-log records this node dropped because the log's writes fell behind \
             (the events themselves are queued; only their view in the log is incomplete).",
        )
        .expect("a valid metric");
        let _ = metrics.registry.register(Box::new(log_dropped.clone()));
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
            consumer_resets,
            log_dropped,
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
    dedup_index: Option<dedup::DedupStore>,
    retries: Option<kv::Store>,
    /// The usage bucket and this node's counts not merged into it yet.
    usage: Option<kv::Store>,
    tally: Mutex<metering::Tally>,
    usage_flush: tokio::sync::Mutex<()>,
    /// Permits for unacknowledged publishes ([`MAX_PUBLISH_IN_FLIGHT`]).
    publish_permits: tokio::sync::Semaphore,
    known_sources: Mutex<std::collections::HashSet<String>>,
    state: Mutex<QueueState>,
    owned: tokio::sync::Mutex<HashMap<u32, Owned>>,
    closed: AtomicBool,
    /// Appends hold it shared; `close` takes it exclusively, so it waits for them.
    gate: RwLock<()>,
    stop: watch::Sender<bool>,
    gauges: NodeGauges,
    /// The spool's background tasks, aborted when the spool is dropped without closing.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

impl Inner {
    /// Spawns a background task of the spool on the current runtime and keeps its handle.
    fn spawn_task(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task).abort_handle();
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.retain(|t| !t.is_finished());
        tasks.push(handle);
    }

    fn abort_tasks(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            task.abort();
        }
    }
}

/// The JetStream-backed [`Spool`].
pub struct NatsSpool {
    inner: Arc<Inner>,
    closed: AtomicBool,
}

impl NatsSpool {
    /// Connects, creates (or updates) the streams and the bucket, takes this node's share
    /// of the partitions and starts pulling, on the caller's Tokio runtime: the spool's
    /// tasks live on it until the spool is closed or dropped.
    pub async fn open(
        options: NatsSpoolOptions,
        metrics: Metrics,
    ) -> Result<NatsSpool, SpoolError> {
        let inner = Inner::connect(options, metrics).await?;
        Ok(NatsSpool {
            inner,
            closed: AtomicBool::new(false),
        })
    }

    /// Runs `work` as its own task, so a caller that gives up (a client that hangs up)
    /// never cuts an append or a settlement short between two of its steps.
    async fn run<T, F, Fut>(&self, work: F) -> Result<T, SpoolError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: std::future::Future<Output = Result<T, SpoolError>> + Send + 'static,
    {
        if self.closed.load(Ordering::Acquire) || self.inner.closed.load(Ordering::Acquire) {
            return Err(SpoolError::Closed);
        }
        let task = tokio::spawn(work(self.inner.clone()));
        task.await.map_err(|_| SpoolError::Closed)?
    }

    /// [`Spool::append`], also telling which events were newly queued: their indexes in the
    /// request (the others were duplicates). The delivery log writes records for those only.
    pub async fn append_telling_new(
        &self,
        request: AppendRequest,
    ) -> Result<(AppendReport, Vec<usize>), SpoolError> {
        self.run(|inner| async move { inner.append(request).await })
            .await
    }

    /// The name this node has in the ownership bucket.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    /// The partitions this node owns now (tests and the benchmark).
    pub async fn owned_partitions(&self) -> Vec<u32> {
        let mut owned: Vec<u32> = self.inner.owned.lock().await.keys().copied().collect();
        owned.sort_unstable();
        owned
    }
}

impl Drop for NatsSpool {
    /// A spool dropped without `close` stops at once, like a node that dies: its
    /// background tasks are aborted, nothing is released, its keys expire.
    fn drop(&mut self) {
        let _ = self.inner.stop.send(true);
        self.inner.abort_tasks();
    }
}

#[async_trait]
impl Spool for NatsSpool {
    async fn append(&self, request: AppendRequest) -> Result<AppendReport, SpoolError> {
        Ok(self.append_telling_new(request).await?.0)
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
        let _ = tokio::spawn(async move { inner.close().await }).await;
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
