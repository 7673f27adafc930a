//! The JetStream spool's delivery log (see [`crate::spool::delivery_log`]): a stream
//! `<events stream>_LOG` with limits retention, `max_age` and `max_bytes` from
//! `[delivery_log]` (JetStream removes the oldest records itself: nothing here grows with
//! the log).
//!
//! Layout: every record of an event goes to `<prefix>.log.<source>.m.<h(messageId)>`
//! (`h`: the first 32 hex digits of SHA-256): the record written when it is accepted (with
//! its payload), then one per attempt and one for its outcome. Index records
//! `<prefix>.log.<source>.u.<h(userId)>` and `….e.<h(email)>` name the message ids of a user,
//! one per line: the index entries of every key are gathered for [`INDEX_FLUSH_EVERY`] (or
//! until [`INDEX_FLUSH_IDS`] wait) and written as one record per key, so a user's events cost
//! the server one index record per flush rather than one per event.
//! A lookup reads a user's or an email's index records newest first with direct gets
//! ([`direct`]), only until it has the ids it needs, then each event's records with direct
//! gets (several events at once), and folds them; no consumer is made.
//!
//! Invariants:
//! - [`LoggingSpool`] wraps the queue: it writes the log after the queue's own append or
//!   settle succeeded, in the background, so the log never fails ingest or delivery. It
//!   delays them only when far behind: past [`PACE_BACKLOG`] records waiting, an append or
//!   a settlement waits for the log's writes ([`PACE_WAIT`] at most) before it answers, so
//!   sustained load goes at the log's pace (as the embedded spool's log, written within
//!   each append) instead of losing its records. A failed log write is logged (debug) and
//!   counted nowhere else: the log is a view, never the truth about an event.
//! - The log's writes never take what the queue needs: they go through their own JetStream
//!   context (its own bound on unacknowledged publishes), so the queue's appends, the
//!   partition owners' dedup journal and the buckets never wait behind them. A write takes
//!   all its permits ([`LOG_IN_FLIGHT`]) at once before it publishes, so writes never hold
//!   some while waiting for more (no deadlock among them); at most [`MAX_LOG_BACKLOG`]
//!   records wait for permits, more are dropped (warned about, at most every 10 s, and
//!   counted in `gateway_delivery_log_dropped_total`).
//! - An append writes records only for the events the queue newly queued, not for those
//!   it recognised as duplicates, so a repeated append within JetStream's duplicate window
//!   writes no second accepted record; no record carries a `Nats-Msg-Id` (that would cost
//!   the server a second duplicate window). A message id named twice by the index is found
//!   once (lookups drop repeats).
//! - Index entries wait in memory at most [`INDEX_FLUSH_EVERY`] (and are written at close):
//!   a lookup by user may miss the newest events for that long, and a node that dies loses
//!   the index entries of its last flush interval (their events are still found by
//!   `messageId`).
//! - State: the log knows queued, retrying (until a time) and the outcomes; it does not see
//!   leases.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{direct, storage, NatsSpool};
use crate::spool::delivery_log::{
    AttemptView, CallView, DeliveryLog, DeliveryLogOptions, EventFacts, EventState, LogKey,
    LogQuery, LogSize, LoggedEvent, RefusedEntry, MAX_RESULTS,
};
use crate::spool::{
    AppendReport, AppendRequest, Leased, Settlement, Spool, SpoolError, SpoolStats,
};

/// Records a lookup reads per subject at most.
const MAX_RECORDS: usize = 1000;
/// Log records published and not yet acknowledged, at most.
pub const LOG_IN_FLIGHT: usize = 4096;
/// Log records waiting to be published, at most: past it the log drops records (it is a
/// view; ingest and delivery never wait for it).
pub const MAX_LOG_BACKLOG: usize = 200_000;
/// Log records waiting past which an append or a settlement waits for the log's writes
/// before it answers ([`PACE_WAIT`] at most): close enough to [`MAX_LOG_BACKLOG`] that a
/// burst (an outage's failed attempts, a spike of ingest) is absorbed without slowing
/// anything, far enough that sustained load is paced before records are dropped.
pub const PACE_BACKLOG: usize = 150_000;
/// How long an append or a settlement waits at most for the log to catch up: a log that
/// cannot keep up (JetStream slow or away) slows them by that much, never fails them.
const PACE_WAIT: Duration = Duration::from_secs(1);
/// How often, at most, dropped log records are warned about.
const DROP_WARN_EVERY_MS: i64 = 10_000;
/// How long index entries are gathered before they are written, one record per key.
pub const INDEX_FLUSH_EVERY: Duration = Duration::from_millis(250);
/// Index entries waiting that make the gathering end early.
pub const INDEX_FLUSH_IDS: usize = 16_384;
/// Events a lookup reads at once.
const EVENT_READS_AT_ONCE: usize = 8;

/// One record of an event (every field optional: records are folded in order).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Record {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    facts: Option<EventFacts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    received_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<EventState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next_attempt_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    attempt: Option<AttemptView>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    calls: Vec<CallView>,
}

fn hash(value: &str) -> String {
    hex::encode(&Sha256::digest(value.as_bytes())[..16])
}

/// The log's stream and where its records go.
pub struct NatsDeliveryLog {
    /// The log's own context: its unacknowledged publishes are bounded apart from the
    /// queue's.
    js: jetstream::Context,
    stream: stream::Stream,
    prefix: String,
    runtime: tokio::runtime::Handle,
    writes: Arc<LogWrites>,
    /// Index entries gathered since the last flush.
    index: Arc<Mutex<PendingIndex>>,
}

/// Index entries not written yet: each key's subject and the message ids it names, in
/// the order they were accepted.
#[derive(Default)]
struct PendingIndex {
    by_subject: HashMap<String, Vec<String>>,
    ids: usize,
}

impl PendingIndex {
    /// Adds an entry; true when enough wait to write them now.
    fn add(&mut self, subject: String, message_id: String) -> bool {
        self.by_subject.entry(subject).or_default().push(message_id);
        self.ids += 1;
        self.ids >= INDEX_FLUSH_IDS
    }

    /// The gathered entries as records (one per key: its ids, one per line), emptied.
    fn take(&mut self) -> Vec<LogRecord> {
        self.ids = 0;
        std::mem::take(&mut self.by_subject)
            .into_iter()
            .map(|(subject, ids)| (subject, ids.join("\n").into_bytes()))
            .collect()
    }
}

/// Message ids gathered from index records read newest first: each record's ids from its
/// last line, repeats dropped, at most `limit`.
struct NamedIds {
    ids: Vec<String>,
    limit: usize,
}

impl NamedIds {
    fn new(limit: usize) -> NamedIds {
        NamedIds {
            ids: Vec::new(),
            limit,
        }
    }

    /// Adds the ids of one index record (older than those added before); true once
    /// `limit` were found.
    fn add_newest_first(&mut self, record: &[u8]) -> bool {
        for id in String::from_utf8_lossy(record).lines().rev() {
            if self.ids.len() >= self.limit {
                break;
            }
            if !self.ids.iter().any(|known| known == id) {
                self.ids.push(id.to_owned());
            }
        }
        self.ids.len() >= self.limit
    }
}

/// A record to publish: its subject and its body.
type LogRecord = (String, Vec<u8>);

/// The bounds on the log's background writes.
struct LogWrites {
    /// [`LOG_IN_FLIGHT`] permits, one per unacknowledged record.
    permits: tokio::sync::Semaphore,
    /// Records waiting for permits or in flight.
    backlog: AtomicUsize,
    /// Records dropped since the last warning, and when that was.
    dropped: AtomicUsize,
    warned_at_ms: AtomicI64,
    /// Every record dropped (`gateway_delivery_log_dropped_total`).
    dropped_total: prometheus::IntCounter,
}

impl LogWrites {
    fn new(dropped_total: prometheus::IntCounter) -> LogWrites {
        LogWrites {
            permits: tokio::sync::Semaphore::new(LOG_IN_FLIGHT),
            backlog: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
            warned_at_ms: AtomicI64::new(0),
            dropped_total,
        }
    }

    /// Counts `n` records into the backlog, or false (and counts them dropped) when that
    /// would pass [`MAX_LOG_BACKLOG`].
    fn admit(&self, n: usize) -> bool {
        let before = self.backlog.fetch_add(n, Ordering::AcqRel);
        if before + n <= MAX_LOG_BACKLOG {
            return true;
        }
        self.backlog.fetch_sub(n, Ordering::AcqRel);
        self.dropped_total.inc_by(n as u64);
        let dropped = self.dropped.fetch_add(n, Ordering::AcqRel) + n;
        let now = super::now_ms();
        let last = self.warned_at_ms.load(Ordering::Acquire);
        if now - last >= DROP_WARN_EVERY_MS
            && self
                .warned_at_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.dropped.fetch_sub(dropped, Ordering::AcqRel);
            tracing::warn!(
                dropped,
                backlog = before,
                "the delivery log is behind; records dropped (the events themselves are queued)"
            );
        }
        false
    }
}

impl NatsSpool {
    /// Opens (creates or updates) the delivery log's stream beside this spool's.
    pub async fn delivery_log(
        &self,
        options: &DeliveryLogOptions,
    ) -> Result<NatsDeliveryLog, SpoolError> {
        let inner = self.inner.clone();
        let config = stream::Config {
            name: format!("{}_LOG", inner.options.stream),
            subjects: vec![format!("{}.log.>", inner.options.subject_prefix)],
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            max_age: options.max_age,
            max_bytes: options.max_bytes.min(i64::MAX as u64) as i64,
            duplicate_window: Duration::from_secs(120),
            // Lookups read an event's records with direct gets.
            allow_direct: true,
            storage: stream::StorageType::File,
            num_replicas: inner.options.replicas,
            ..Default::default()
        };
        let js = inner.js.clone();
        js.create_or_update_stream(config)
            .await
            .map_err(|e| storage("cannot set up the delivery log stream", e))?;
        let opened = js
            .get_stream(format!("{}_LOG", inner.options.stream))
            .await
            .map_err(|e| storage("cannot open the delivery log stream", e))?;
        // Twice the log's own bound: publishes whose acks were given up on still hold a
        // permit in the client until their ack wait ends.
        let own = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .ack_timeout(inner.options.publish_timeout)
            .max_ack_inflight(2 * LOG_IN_FLIGHT)
            .build(inner.client.clone());
        let log = NatsDeliveryLog {
            js: own,
            stream: opened,
            prefix: inner.options.subject_prefix.clone(),
            runtime: tokio::runtime::Handle::current(),
            writes: Arc::new(LogWrites::new(inner.gauges.log_dropped.clone())),
            index: Arc::default(),
        };
        log.flush_index_periodically();
        Ok(log)
    }
}

impl NatsDeliveryLog {
    fn subject(&self, source: &str, key: &LogKey) -> String {
        let (kind, value) = match key {
            LogKey::MessageId(v) => ("m", v),
            LogKey::UserId(v) => ("u", v),
            LogKey::Email(v) => ("e", v),
        };
        // Source slugs are `[a-z0-9_-]`: safe as a subject token.
        format!("{}.log.{source}.{kind}.{}", self.prefix, hash(value))
    }

    /// Publishes records in the background; the log never holds up the caller.
    fn publish(&self, records: Vec<LogRecord>) {
        publish_in_background(&self.runtime, &self.js, &self.writes, records);
    }

    /// Waits, [`PACE_WAIT`] at most, while more than [`PACE_BACKLOG`] records wait to be
    /// written: sustained ingest or delivery then goes at the log's pace instead of
    /// outrunning it until its records are dropped.
    async fn keep_pace(&self) {
        let deadline = tokio::time::Instant::now() + PACE_WAIT;
        while self.writes.backlog.load(Ordering::Acquire) > PACE_BACKLOG
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Gathers index entries (each: `key` names the message id), written with the others
    /// of their key at the next flush, at once when enough wait.
    fn index_later(&self, source: &str, entries: impl IntoIterator<Item = (LogKey, String)>) {
        let ready = match self.index.lock() {
            Ok(mut index) => {
                let mut full = false;
                for (key, message_id) in entries {
                    full |= index.add(self.subject(source, &key), message_id);
                }
                full.then(|| index.take())
            }
            Err(_) => None,
        };
        if let Some(records) = ready {
            self.publish(records);
        }
    }

    /// Writes the gathered index entries every [`INDEX_FLUSH_EVERY`], until the log is
    /// dropped.
    fn flush_index_periodically(&self) {
        let index = Arc::downgrade(&self.index);
        let (runtime, js, writes) = (self.runtime.clone(), self.js.clone(), self.writes.clone());
        self.runtime.spawn(async move {
            let mut every = tokio::time::interval(INDEX_FLUSH_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(index) = index.upgrade() else { break };
                let records = index.lock().map(|mut i| i.take()).unwrap_or_default();
                publish_in_background(&runtime, &js, &writes, records);
            }
        });
    }

    /// Writes the gathered index entries and waits for their acks (at close).
    async fn flush_index(&self) {
        let records = self.index.lock().map(|mut i| i.take()).unwrap_or_default();
        for window in records.chunks(LOG_IN_FLIGHT) {
            write_window(&self.js, window.to_vec()).await;
        }
    }

    /// The records of an append, one per event in request order, and the index entries
    /// (the position of their event, the key, the message id it names); built before the
    /// request moves into the queue.
    fn accepted(&self, request: &AppendRequest) -> (Vec<LogRecord>, Vec<(usize, LogKey, String)>) {
        let mut records = Vec::with_capacity(request.events.len());
        let mut index = Vec::new();
        for (i, event) in request.events.iter().enumerate() {
            let facts = EventFacts::of(&event.payload);
            let keys = [
                facts.user_id.clone().map(LogKey::UserId),
                facts.email.clone().map(LogKey::Email),
            ];
            let named = keys.into_iter().flatten();
            index.extend(named.map(|key| (i, key, event.message_id.clone())));
            let record = Record {
                message_id: Some(event.message_id.clone()),
                kind: Some(event.kind.as_str().to_string()),
                facts: Some(facts),
                received_at_ms: Some(request.received_at_ms),
                state: Some(EventState::Queued),
                ..Record::default()
            };
            let mid = LogKey::MessageId(event.message_id.clone());
            records.push((
                self.subject(&request.source, &mid),
                serde_json::to_vec(&record).unwrap_or_default(),
            ));
        }
        (records, index)
    }

    fn settled(&self, s: &Settlement, events: &HashMap<i64, (String, String)>) {
        let mut by_seq: HashMap<i64, Record> = HashMap::new();
        for note in &s.notes {
            let r = by_seq.entry(note.seq).or_default();
            r.attempt = Some(AttemptView::from(note));
            r.calls = note.calls.clone();
        }
        for &seq in &s.acked {
            by_seq.entry(seq).or_default().state = Some(EventState::Delivered);
        }
        for k in &s.skipped {
            let r = by_seq.entry(k.seq).or_default();
            r.state = Some(EventState::Skipped);
            r.reason = Some(k.reason.clone());
        }
        for d in &s.dead {
            let r = by_seq.entry(d.seq).or_default();
            r.state = Some(EventState::Dead);
            r.reason = Some(d.error.clone());
        }
        for t in &s.retried {
            let r = by_seq.entry(t.seq).or_default();
            r.state = Some(EventState::Retrying);
            r.next_attempt_at_ms = Some(t.next_attempt_at_ms);
            r.reason = Some(t.error.clone());
        }
        let records = by_seq
            .into_iter()
            .filter_map(|(seq, record)| {
                let (source, message_id) = events.get(&seq)?;
                let subject = self.subject(source, &LogKey::MessageId(message_id.clone()));
                Some((subject, serde_json::to_vec(&record).ok()?))
            })
            .collect();
        self.publish(records);
    }

    /// The message ids a user's or an email's index records name, newest first, at most
    /// `limit` (repeats dropped): the records are read from the last one back, one direct
    /// get each, until enough ids were found; with a consumer (all of them) where the
    /// server lacks the batched direct get.
    async fn index_ids(&self, subject: String, limit: usize) -> Result<Vec<String>, SpoolError> {
        let js = self.js.clone();
        let stream = self.stream.cached_info().config.name.clone();
        let by_subject = subject.clone();
        let newest_first = self.runtime.spawn(async move {
            let mut ids = NamedIds::new(limit);
            let mut up_to = None;
            for _ in 0..MAX_RECORDS {
                let Some((seq, body)) =
                    direct::last_up_to(&js, &stream, &by_subject, up_to).await?
                else {
                    break;
                };
                if ids.add_newest_first(&body) || seq <= 1 {
                    break;
                }
                up_to = Some(seq - 1);
            }
            Ok::<_, direct::DirectError>(ids.ids)
        });
        match newest_first.await {
            Ok(Ok(ids)) => Ok(ids),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "direct gets on the delivery log's index failed; reading with a consumer");
                let mut ids = NamedIds::new(limit);
                for body in self.read(subject).await?.iter().rev() {
                    if ids.add_newest_first(body) {
                        break;
                    }
                }
                Ok(ids.ids)
            }
            Err(e) => Err(storage("the delivery log read failed", e)),
        }
    }

    /// The records of one event (`subject`: its `messageId`'s), in order: read one by one
    /// with direct gets, which need no consumer (an event has a few records: accepted,
    /// attempts, outcome). Falls back to [`Self::read`] when the stream answers direct
    /// gets with anything but "not found" (a log stream created without them).
    async fn read_event(&self, subject: String) -> Result<Vec<Vec<u8>>, SpoolError> {
        let stream = self.stream.clone();
        let by_subject = subject.clone();
        let task = self.runtime.spawn(async move {
            let not_found =
                |e: &stream::DirectGetError| e.kind() == stream::DirectGetErrorKind::NotFound;
            // The last record first: the reads after it stop there, where looking for a
            // next one that does not exist would make the server search the rest of the
            // stream.
            let last = match stream
                .direct_get_last_for_subject(by_subject.as_str())
                .await
            {
                Ok(last) => last,
                Err(e) if not_found(&e) => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            let mut bodies = Vec::new();
            let mut next = 1;
            while next < last.sequence && bodies.len() < MAX_RECORDS {
                match stream
                    .direct_get_next_for_subject(by_subject.as_str(), Some(next))
                    .await
                {
                    Ok(message) if message.sequence < last.sequence => {
                        next = message.sequence + 1;
                        bodies.push(message.payload.to_vec());
                    }
                    Ok(_) => break,
                    Err(e) if not_found(&e) => break,
                    Err(e) => return Err(e),
                }
            }
            bodies.push(last.payload.to_vec());
            Ok(bodies)
        });
        match task.await {
            Ok(Ok(bodies)) => Ok(bodies),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "direct gets on the delivery log failed; reading with a consumer");
                self.read(subject).await
            }
            Err(e) => Err(storage("the delivery log read failed", e)),
        }
    }

    /// Every record on `subject`, in order (at most [`MAX_RECORDS`], the newest).
    async fn read(&self, subject: String) -> Result<Vec<Vec<u8>>, SpoolError> {
        let stream = self.stream.clone();
        let task = self.runtime.spawn(async move {
            let fail = |e: &dyn std::fmt::Display| storage("cannot read the delivery log", e);
            let mut consumer: consumer::PullConsumer = stream
                .create_consumer(consumer::pull::Config {
                    filter_subject: subject,
                    ack_policy: consumer::AckPolicy::None,
                    deliver_policy: consumer::DeliverPolicy::All,
                    inactive_threshold: Duration::from_secs(30),
                    memory_storage: true,
                    num_replicas: 1,
                    ..Default::default()
                })
                .await
                .map_err(|e| fail(&e))?;
            let pending = consumer.info().await.map_err(|e| fail(&e))?.num_pending as usize;
            let mut bodies = Vec::with_capacity(pending.min(MAX_RECORDS));
            let mut read = 0;
            while read < pending {
                let mut batch = consumer
                    .fetch()
                    .max_messages((pending - read).min(1000))
                    .messages()
                    .await
                    .map_err(|e| fail(&e))?;
                let before = read;
                while let Some(message) = batch.next().await {
                    let message = message.map_err(|e| fail(&e))?;
                    read += 1;
                    bodies.push(message.payload.to_vec());
                    if bodies.len() > MAX_RECORDS {
                        bodies.remove(0);
                    }
                }
                if read == before {
                    break;
                }
            }
            let name = consumer.cached_info().name.clone();
            let _ = stream.delete_consumer(&name).await;
            Ok(bodies)
        });
        task.await
            .map_err(|e| storage("the delivery log read failed", e))?
    }

    /// Folds an event's records; `None` without its accepted (or refused) record.
    fn fold(source: &str, bodies: &[Vec<u8>]) -> Option<LoggedEvent> {
        let mut event: Option<LoggedEvent> = None;
        let mut later: Vec<Record> = Vec::new();
        for body in bodies {
            let Ok(record) = serde_json::from_slice::<Record>(body) else {
                continue;
            };
            match (&record.facts, record.received_at_ms) {
                (Some(facts), Some(at)) if event.is_none() => {
                    event = Some(LoggedEvent {
                        source: source.to_string(),
                        message_id: record.message_id.clone().unwrap_or_default(),
                        kind: record.kind.clone().unwrap_or_default(),
                        event: facts.event.clone(),
                        user_id: facts.user_id.clone(),
                        email: facts.email.clone(),
                        received_at_ms: at,
                        state: record.state.unwrap_or(EventState::Queued),
                        next_attempt_at_ms: None,
                        reason: record.reason.clone(),
                        payload: facts.payload.clone(),
                        calls: Vec::new(),
                        attempts: Vec::new(),
                    })
                }
                _ => later.push(record),
            }
        }
        let mut event = event?;
        for record in later {
            if let Some(attempt) = record.attempt {
                event.attempts.push(attempt);
            }
            if !record.calls.is_empty() {
                event.calls = record.calls;
            }
            // A final state is never undone by a late retry record.
            let final_now = matches!(
                event.state,
                EventState::Delivered | EventState::Skipped | EventState::Dead
            );
            if let (Some(state), false) = (record.state, final_now) {
                event.state = state;
                event.next_attempt_at_ms = record.next_attempt_at_ms;
                event.reason = record.reason.or(event.reason);
            }
        }
        event.attempts.sort_by_key(|a| a.at_ms);
        if event.state != EventState::Retrying {
            event.next_attempt_at_ms = None;
        }
        Some(event)
    }
}

#[async_trait]
impl DeliveryLog for NatsDeliveryLog {
    async fn record_refused(&self, entries: Vec<RefusedEntry>) -> Result<(), SpoolError> {
        let records = entries
            .iter()
            .map(|e| {
                let record = Record {
                    message_id: Some(e.message_id.clone()),
                    kind: Some(e.kind.clone()),
                    facts: Some(EventFacts {
                        event: None,
                        user_id: e.user_id.clone(),
                        email: e.email.clone(),
                        payload: e.raw.clone(),
                    }),
                    received_at_ms: Some(e.at_ms),
                    state: Some(EventState::Refused),
                    reason: Some(e.reason.clone()),
                    ..Record::default()
                };
                let keys = [
                    e.user_id.clone().map(LogKey::UserId),
                    e.email.clone().map(LogKey::Email),
                ];
                let entries = keys
                    .into_iter()
                    .flatten()
                    .map(|k| (k, e.message_id.clone()));
                self.index_later(&e.source, entries);
                (
                    self.subject(&e.source, &LogKey::MessageId(e.message_id.clone())),
                    serde_json::to_vec(&record).unwrap_or_default(),
                )
            })
            .collect();
        self.publish(records);
        Ok(())
    }

    async fn find_events(&self, query: LogQuery) -> Result<Vec<LoggedEvent>, SpoolError> {
        let limit = query.limit.min(MAX_RESULTS);
        let ids: Vec<String> = match &query.key {
            LogKey::MessageId(id) => vec![id.clone()],
            key => {
                self.index_ids(self.subject(&query.source, key), limit)
                    .await?
            }
        };
        let reads = ids.into_iter().map(|id| {
            let subject = self.subject(&query.source, &LogKey::MessageId(id));
            async move { self.read_event(subject).await }
        });
        let events: Vec<Result<Vec<Vec<u8>>, SpoolError>> = futures_util::stream::iter(reads)
            .buffered(EVENT_READS_AT_ONCE)
            .collect()
            .await;
        let mut found = Vec::new();
        for bodies in events {
            found.extend(Self::fold(&query.source, &bodies?));
        }
        found.sort_by_key(|e| std::cmp::Reverse(e.received_at_ms));
        found.truncate(limit);
        Ok(found)
    }

    async fn log_size(&self) -> Result<LogSize, SpoolError> {
        let mut stream = self.stream.clone();
        let task = self
            .runtime
            .spawn(async move { stream.info().await.map(|i| i.state.clone()) });
        let state = task
            .await
            .map_err(|e| storage("the delivery log read failed", e))?
            .map_err(|e| storage("cannot read the delivery log's size", e))?;
        Ok(LogSize {
            records: state.messages,
            bytes: state.bytes,
        })
    }
}

/// Publishes records in the background. Each window of at most [`LOG_IN_FLIGHT`] records
/// takes its permits at once, then publishes and awaits its acks; records past
/// [`MAX_LOG_BACKLOG`] are dropped.
fn publish_in_background(
    runtime: &tokio::runtime::Handle,
    js: &jetstream::Context,
    writes: &Arc<LogWrites>,
    records: Vec<LogRecord>,
) {
    let total = records.len();
    if total == 0 || !writes.admit(total) {
        return;
    }
    let (js, writes) = (js.clone(), writes.clone());
    runtime.spawn(async move {
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            let window: Vec<_> = records.by_ref().take(LOG_IN_FLIGHT).collect();
            let Ok(_permits) = writes.permits.acquire_many(window.len() as u32).await else {
                break;
            };
            write_window(&js, window).await;
        }
        writes.backlog.fetch_sub(total, Ordering::AcqRel);
    });
}

/// Publishes the records of one window, then awaits their acks (failures logged at debug:
/// the log is a view).
async fn write_window(js: &jetstream::Context, window: Vec<LogRecord>) {
    let mut acks = Vec::with_capacity(window.len());
    for (subject, body) in window {
        match js.publish(subject, body.into()).await {
            Ok(ack) => acks.push(ack),
            Err(e) => tracing::debug!(error = %e, "writing the delivery log failed"),
        }
    }
    for ack in acks {
        if let Err(e) = ack.await {
            tracing::debug!(error = %e, "writing the delivery log failed");
        }
    }
}

/// The JetStream queue with its delivery log: the queue's answers unchanged, the log
/// written behind them (see the module header).
pub struct LoggingSpool {
    queue: Arc<NatsSpool>,
    log: Arc<NatsDeliveryLog>,
    /// `(source, messageId)` of leased events by seq, until their final outcome.
    leased: Mutex<HashMap<i64, (String, String)>>,
}

/// Leased events remembered at most (a bound for events whose lease moved to another node).
const MAX_REMEMBERED: usize = 1_000_000;

impl LoggingSpool {
    pub fn new(queue: Arc<NatsSpool>, log: Arc<NatsDeliveryLog>) -> LoggingSpool {
        LoggingSpool {
            queue,
            log,
            leased: Mutex::new(HashMap::new()),
        }
    }
}

#[async_trait]
impl Spool for LoggingSpool {
    async fn append(&self, request: AppendRequest) -> Result<AppendReport, SpoolError> {
        let (records, index) = self.log.accepted(&request);
        let source = request.source.clone();
        let (report, new) = self.queue.append_telling_new(request).await?;
        let mut is_new = vec![false; records.len()];
        for i in new {
            is_new[i] = true;
        }
        let records = records
            .into_iter()
            .zip(&is_new)
            .filter_map(|(record, new)| new.then_some(record))
            .collect();
        self.log.publish(records);
        let entries = index
            .into_iter()
            .filter(|(i, _, _)| is_new[*i])
            .map(|(_, key, message_id)| (key, message_id));
        self.log.index_later(&source, entries);
        self.log.keep_pace().await;
        Ok(report)
    }

    async fn lease(&self, max: usize, lease_ms: i64) -> Result<Vec<Leased>, SpoolError> {
        let leased = self.queue.lease(max, lease_ms).await?;
        if let Ok(mut known) = self.leased.lock() {
            if known.len() + leased.len() > MAX_REMEMBERED {
                known.clear();
            }
            for e in &leased {
                known.insert(e.seq, (e.source.clone(), e.message_id.clone()));
            }
        }
        Ok(leased)
    }

    async fn settle(&self, settlement: Settlement) -> Result<(), SpoolError> {
        self.queue.settle(settlement.clone()).await?;
        if let Ok(mut known) = self.leased.lock() {
            self.log.settled(&settlement, &known);
            let done = settlement
                .acked
                .iter()
                .chain(settlement.skipped.iter().map(|k| &k.seq))
                .chain(settlement.dead.iter().map(|d| &d.seq));
            for seq in done {
                known.remove(seq);
            }
        }
        self.log.keep_pace().await;
        Ok(())
    }

    async fn check_writable(&self) -> Result<(), SpoolError> {
        self.queue.check_writable().await
    }

    async fn stats(&self) -> Result<SpoolStats, SpoolError> {
        self.queue.stats().await
    }

    async fn close(&self) {
        self.log.flush_index().await;
        self.queue.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backlog_admits_up_to_its_bound_and_counts_what_it_drops() {
        let total = prometheus::IntCounter::new("dropped", "test").expect("a counter");
        let writes = LogWrites::new(total.clone());
        assert!(writes.admit(MAX_LOG_BACKLOG - 10));
        assert!(writes.admit(10), "exactly the bound is admitted");
        assert!(!writes.admit(1), "one more is dropped");
        assert_eq!(writes.backlog.load(Ordering::Acquire), MAX_LOG_BACKLOG);
        // The first drop is warned about at once (the count reset), the next within 10 s
        // only counted.
        assert!(!writes.admit(5));
        assert_eq!(writes.dropped.load(Ordering::Acquire), 5);
        assert_eq!(total.get(), 6, "every dropped record counted");
        writes.backlog.fetch_sub(100, Ordering::AcqRel);
        assert!(writes.admit(100), "room again once writes finished");
    }
}
