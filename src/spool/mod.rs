//! The durable queue between ingest and delivery, behind one trait.
//!
//! Guarantees every backend gives:
//! - [`Spool::append`] returns `Ok` only once every event of the request is durable (on
//!   disk and fsync'd, or acknowledged by the distributed engine). Ingest answers 200 only
//!   after that.
//! - Deduplication: an event whose `(source, messageId)` was appended within the dedup
//!   window is not queued again; it is counted in [`AppendReport::duplicates`].
//! - Per-user order: [`Spool::lease`] hands out a user's events in the order they were
//!   appended, and never hands out a user's event while an earlier one of the same user is
//!   leased or waiting for a retry: a lease holds, per user, a prefix of what is deliverable.
//!   A user is a source and a user key.
//! - [`Spool::settle`] applies a batch's outcome (acked, retried, released, dead-lettered)
//!   in one transaction. A dead-lettered event leaves the queue, which releases its user.
//! - Leased events that are not acked before their lease expires are leased again (after a
//!   crash too): delivery is at least once.
//! - Overload is reported as [`SpoolError::Overloaded`] (ingest answers 429) and storage
//!   trouble as [`SpoolError::Storage`] (ingest answers 503); neither loses accepted data.

pub mod admin;
#[doc(hidden)]
pub mod conformance;
pub mod dedup;
pub mod delivery_log;
#[doc(hidden)]
pub mod log_conformance;
#[doc(hidden)]
pub mod metering_conformance;
pub mod nats;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

use crate::segment::{Event, EventType, UserKey};
use admin::{
    CounterRow, DeadLetter, DeadLetterFilter, DeadLetterPage, DeadLetterQuery, ReplayReport,
    SourceUsage,
};

pub use nats::{NatsSpool, NatsSpoolOptions};
pub use sqlite::{SqliteSpool, SqliteSpoolOptions};

/// The events of one request, all from one source.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    /// The source's slug.
    pub source: String,
    /// Arrival time in milliseconds since the epoch.
    pub received_at_ms: i64,
    pub events: Vec<Event>,
}

/// What an append did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppendReport {
    pub queued: usize,
    pub duplicates: usize,
}

/// An event handed to the dispatcher, to be acked once delivered.
#[derive(Debug, Clone, PartialEq)]
pub struct Leased {
    /// Position in the queue: increases with append order across requests, and within a
    /// request for each user's events (events of different users of one request may be
    /// ordered otherwise between them: the JetStream spool stores them partition by
    /// partition).
    pub seq: i64,
    pub source: String,
    pub message_id: String,
    pub kind: EventType,
    pub user_key: UserKey,
    pub payload: Vec<u8>,
    /// Delivery attempts made before this lease.
    pub attempts: u32,
    pub received_at_ms: i64,
}

/// A delivery attempt that failed transiently: the event waits until `next_attempt_at_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryAt {
    pub seq: i64,
    pub next_attempt_at_ms: i64,
    pub status: Option<u16>,
    pub error: String,
}

/// An event given up on: it moves to the dead letters with the last answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRequest {
    pub seq: i64,
    pub status: Option<u16>,
    pub error: String,
    /// Whether this attempt counts (false when the event was never sent, e.g. too old).
    pub attempted: bool,
}

/// An event deliberately not forwarded (an alias, an unidentifiable event, a throttled
/// ping): removed from the queue like an ack, and counted under its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub seq: i64,
    pub reason: String,
}

/// An event not sent because delivery for its source is paused (Refiner refused the API
/// key): it stays queued, no attempt is counted, and its user waits until `until_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Postponed {
    pub seq: i64,
    pub until_ms: i64,
}

/// The outcome of a leased batch, applied in one transaction by [`Spool::settle`].
///
/// Besides the queue, settling keeps the hourly counters (`forwarded` per acked event,
/// `skipped:<reason>`, `retried`, `dead_lettered`) and the attempts history (one row per
/// retried event and per dead event that was attempted) in the same transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Delivered: removed from the queue.
    pub acked: Vec<i64>,
    /// Deliberately not forwarded: removed from the queue.
    pub skipped: Vec<Skipped>,
    /// Failed transiently: attempts + 1, wait until the given time.
    pub retried: Vec<RetryAt>,
    /// Not attempted (an earlier event of the user failed): the lease is dropped.
    pub released: Vec<i64>,
    /// Failed for good: moved to the dead letters.
    pub dead: Vec<DeadLetterRequest>,
    /// Not sent, delivery paused: wait until the given time without counting an attempt.
    pub postponed: Vec<Postponed>,
    /// A partial outcome of a batch still in progress: the users stay held (their later
    /// events are still being delivered). The final settlement of a batch leaves it false.
    pub keep_holds: bool,
    /// The attempts behind this outcome, for the delivery log (see [`delivery_log`]).
    pub notes: Vec<delivery_log::AttemptNote>,
}

impl Settlement {
    pub fn is_empty(&self) -> bool {
        self.acked.is_empty()
            && self.skipped.is_empty()
            && self.retried.is_empty()
            && self.released.is_empty()
            && self.dead.is_empty()
            && self.postponed.is_empty()
    }
}

/// A point-in-time view of the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Events queued and not yet acked (leased ones included).
    pub depth: u64,
    /// Arrival time of the oldest queued event, if any.
    pub oldest_received_at_ms: Option<i64>,
    /// Events in the dead letters.
    pub dead_letters: u64,
}

/// Why a spool operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpoolError {
    /// Too many requests are waiting for the writer; the caller should retry shortly.
    #[error("the spool is overloaded")]
    Overloaded,
    /// The storage refused the write (disk full, IO error, corruption).
    #[error("spool storage error: {0}")]
    Storage(String),
    /// The spool is shutting down.
    #[error("the spool is closed")]
    Closed,
}

/// The durable queue. See the module header for the guarantees.
#[async_trait]
pub trait Spool: Send + Sync + 'static {
    /// Appends a request's events durably; see [`AppendReport`].
    async fn append(&self, request: AppendRequest) -> Result<AppendReport, SpoolError>;

    /// Leases up to `max` deliverable events for `lease_ms` milliseconds, in queue order.
    /// Per user, the events form a prefix of that user's queue that starts right after the
    /// last event that is leased or waiting for a retry (so none if there is one).
    async fn lease(&self, max: usize, lease_ms: i64) -> Result<Vec<Leased>, SpoolError>;

    /// Removes delivered events from the queue.
    async fn ack(&self, seqs: Vec<i64>) -> Result<(), SpoolError> {
        self.settle(Settlement {
            acked: seqs,
            ..Settlement::default()
        })
        .await
    }

    /// Applies a batch's outcome in one transaction.
    async fn settle(&self, settlement: Settlement) -> Result<(), SpoolError>;

    /// Proves the storage accepts a durable write now (readiness).
    async fn check_writable(&self) -> Result<(), SpoolError>;

    /// Queue depth and age.
    async fn stats(&self) -> Result<SpoolStats, SpoolError>;

    /// Finishes queued work and releases the storage. Later calls fail with `Closed`.
    async fn close(&self);
}

/// A backend's dead letters, for the management API (see [`admin`]).
#[async_trait]
pub trait DeadLetters: Send + Sync + 'static {
    /// A page of a source's dead letters.
    async fn list_dead_letters(&self, query: DeadLetterQuery)
        -> Result<DeadLetterPage, SpoolError>;

    /// One dead letter with its payload and attempts, if it exists in that source.
    async fn dead_letter(&self, source: &str, id: i64) -> Result<Option<DeadLetter>, SpoolError>;

    /// Moves up to `limit` matching dead letters (all when `None`) back to the tail of the
    /// queue, oldest first; see [`admin`] for the order guarantee.
    async fn replay_dead_letters(
        &self,
        filter: DeadLetterFilter,
        limit: Option<u64>,
    ) -> Result<ReplayReport, SpoolError>;

    /// Deletes the matching dead letters and their attempts; returns how many.
    async fn delete_dead_letters(&self, filter: DeadLetterFilter) -> Result<u64, SpoolError>;
}

/// A backend's usage counters (monthly tracked users, events, page views, hourly counts).
/// Only backends that count usage implement it; the management API answers 501 without.
#[async_trait]
pub trait Metering: Send + Sync + 'static {
    /// A source's usage for the month of `now_ms`, and its backlog.
    async fn usage(&self, source: &str, now_ms: i64) -> Result<SourceUsage, SpoolError>;

    /// A source's hourly counters for hours `from_hour..to_hour` (hours since the epoch).
    async fn counters(
        &self,
        source: &str,
        from_hour: i64,
        to_hour: i64,
    ) -> Result<Vec<CounterRow>, SpoolError>;
}

/// An open backend seen through the traits it implements: the queue always, dead letters
/// always, usage counters where the backend keeps them.
#[derive(Clone)]
pub struct Backend {
    pub queue: Arc<dyn Spool>,
    pub dead_letters: Arc<dyn DeadLetters>,
    pub metering: Option<Arc<dyn Metering>>,
    /// What became of each event, where the backend keeps it (see [`delivery_log`]).
    pub delivery_log: Option<Arc<dyn delivery_log::DeliveryLog>>,
}

impl Backend {
    /// The embedded spool: every capability.
    pub fn sqlite(spool: SqliteSpool) -> Backend {
        let spool = Arc::new(spool);
        Backend {
            queue: spool.clone(),
            dead_letters: spool.clone(),
            metering: Some(spool.clone()),
            delivery_log: Some(spool),
        }
    }

    /// The JetStream spool with its delivery log (a stream beside the queue's), unless
    /// `log` is off.
    pub async fn nats_with_log(
        spool: NatsSpool,
        log: &delivery_log::DeliveryLogOptions,
    ) -> Result<Backend, SpoolError> {
        if !log.enabled {
            return Ok(Backend::nats(spool));
        }
        let delivery_log = Arc::new(spool.delivery_log(log).await?);
        let spool = Arc::new(spool);
        Ok(Backend {
            queue: Arc::new(nats::delivery_log::LoggingSpool::new(
                spool.clone(),
                delivery_log.clone(),
            )),
            dead_letters: spool.clone(),
            metering: Some(spool),
            delivery_log: Some(delivery_log),
        })
    }

    /// The JetStream spool: every capability (usage counted in a shared bucket).
    pub fn nats(spool: NatsSpool) -> Backend {
        let spool = Arc::new(spool);
        Backend {
            queue: spool.clone(),
            dead_letters: spool.clone(),
            metering: Some(spool),
            delivery_log: None,
        }
    }
}
