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
//!   still queued or leased.
//! - Leased events that are not acked before their lease expires are leased again (after a
//!   crash too): delivery is at least once.
//! - Overload is reported as [`SpoolError::Overloaded`] (ingest answers 429) and storage
//!   trouble as [`SpoolError::Storage`] (ingest answers 503); neither loses accepted data.

#[doc(hidden)]
pub mod conformance;
mod sqlite;

use async_trait::async_trait;

use crate::segment::Event;

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
    /// Position in the queue; increases with append order.
    pub seq: i64,
    pub source: String,
    pub message_id: String,
    pub kind: String,
    pub user_key: String,
    pub payload: Vec<u8>,
    /// Delivery attempts made before this lease.
    pub attempts: u32,
    pub received_at_ms: i64,
}

/// A point-in-time view of the queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    /// Events queued and not yet acked (leased ones included).
    pub depth: u64,
    /// Arrival time of the oldest queued event, if any.
    pub oldest_received_at_ms: Option<i64>,
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

    /// Leases up to `max` deliverable events for `lease_ms` milliseconds, in queue order,
    /// at most the head event of each user.
    async fn lease(&self, max: usize, lease_ms: i64) -> Result<Vec<Leased>, SpoolError>;

    /// Removes delivered events from the queue.
    async fn ack(&self, seqs: Vec<i64>) -> Result<(), SpoolError>;

    /// Proves the storage accepts a durable write now (readiness).
    async fn check_writable(&self) -> Result<(), SpoolError>;

    /// Queue depth and age.
    async fn stats(&self) -> Result<SpoolStats, SpoolError>;

    /// Finishes queued work and releases the storage. Later calls fail with `Closed`.
    async fn close(&self);
}
