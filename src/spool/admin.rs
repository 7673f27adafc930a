//! What the management API reads and changes in the spool: dead letters (list, show,
//! replay, delete), per-source usage for the month, and hourly event counters.
//!
//! These types are backend-neutral: the API builds them from query parameters and hands them
//! to the [`Spool`](super::Spool) trait, which is its only way into the storage.
//!
//! Invariants a backend keeps:
//! - A listing is one consistent snapshot: `count` and the rows come from the same read.
//! - Keyset paging ([`PageAt::After`], [`PageAt::Before`]) costs the same at any depth: it
//!   starts from the cursor's position in an index, never counts rows before it.
//! - A replay moves dead letters back to the tail of the queue in their original queue
//!   order, so per user the replayed events keep the order they were first accepted in.
//! - Attempts follow an event: a replayed event keeps the attempts it had, and the history
//!   is removed with the event (delivered, deleted or expired).

use crate::segment::UserKey;

/// Fields a dead-letter listing can be sorted by (`o`), each with an index behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortField {
    Id,
    CreatedAt,
    ReceivedAt,
    Attempts,
    Type,
    Event,
    UserId,
    MessageId,
}

impl SortField {
    pub const ALL: [SortField; 8] = [
        SortField::Id,
        SortField::CreatedAt,
        SortField::ReceivedAt,
        SortField::Attempts,
        SortField::Type,
        SortField::Event,
        SortField::UserId,
        SortField::MessageId,
    ];

    /// The name the API uses (`o=created_at`, `o=-userId`).
    pub fn name(self) -> &'static str {
        match self {
            SortField::Id => "id",
            SortField::CreatedAt => "created_at",
            SortField::ReceivedAt => "received_at",
            SortField::Attempts => "attempts",
            SortField::Type => "type",
            SortField::Event => "event",
            SortField::UserId => "userId",
            SortField::MessageId => "messageId",
        }
    }

    pub fn parse(name: &str) -> Option<SortField> {
        SortField::ALL.into_iter().find(|f| f.name() == name)
    }

    /// Whether the field's values are text (else whole numbers).
    pub fn is_text(self) -> bool {
        matches!(
            self,
            SortField::Type | SortField::Event | SortField::UserId | SortField::MessageId
        )
    }
}

/// Fields `q` searches (`q_f`); all of them when none is named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchField {
    MessageId,
    /// The user's identity: userId, else email, else anonymousId.
    User,
    Event,
    Type,
    Error,
}

impl SearchField {
    pub const ALL: [SearchField; 5] = [
        SearchField::MessageId,
        SearchField::User,
        SearchField::Event,
        SearchField::Type,
        SearchField::Error,
    ];

    pub fn name(self) -> &'static str {
        match self {
            SearchField::MessageId => "messageId",
            SearchField::User => "user",
            SearchField::Event => "event",
            SearchField::Type => "type",
            SearchField::Error => "last_error",
        }
    }

    pub fn parse(name: &str) -> Option<SearchField> {
        SearchField::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// Which dead letters of one source an operation applies to. Every condition narrows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterFilter {
    pub source: String,
    /// Only these ids (replay or delete by id).
    pub ids: Option<Vec<i64>>,
    /// Dead-lettered at or after (ms since the epoch).
    pub start_at_ms: Option<i64>,
    /// Dead-lettered before (ms since the epoch).
    pub ends_at_ms: Option<i64>,
    /// Case-insensitive substring searched in `q_fields`.
    pub q: Option<String>,
    /// Fields `q` searches; empty means all of [`SearchField::ALL`].
    pub q_fields: Vec<SearchField>,
    /// Only dead letters whose last answer from Refiner had this HTTP status.
    pub status: Option<u16>,
    /// Only ids up to this one: bounds a replay to what existed when it started, so events
    /// that fail again while it runs are not replayed again.
    pub max_id: Option<i64>,
}

/// A sort key value, for keyset cursors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SortValue {
    Int(i64),
    Text(String),
}

/// A row's position in a sort order: its sort key and its id (the tie-breaker).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub value: SortValue,
    pub id: i64,
}

/// Where a page starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageAt {
    /// Skip this many rows (a jump to a page by number).
    Offset(u64),
    /// The rows right after this position.
    After(Cursor),
    /// The rows right before this position (a `previous` link).
    Before(Cursor),
}

/// A page of a dead-letter listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterQuery {
    pub filter: DeadLetterFilter,
    pub sort: SortField,
    pub descending: bool,
    pub at: PageAt,
    pub limit: u32,
}

/// One row of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterSummary {
    pub id: i64,
    pub source: String,
    pub message_id: String,
    /// The Segment type (`track`, `identify`, ...).
    pub kind: String,
    pub user_id: Option<String>,
    /// The identity delivery orders by.
    pub user_key: UserKey,
    /// A track event's name.
    pub event: Option<String>,
    pub created_at_ms: i64,
    pub received_at_ms: i64,
    pub attempts: u32,
    pub last_status: Option<u16>,
    pub last_error: String,
    /// Its position in the listing's sort order.
    pub cursor: Cursor,
}

/// A listing's page, with the total of rows matching the filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterPage {
    pub count: u64,
    pub items: Vec<DeadLetterSummary>,
    /// For keyset pages: whether rows exist past this page in the direction it was read
    /// (after it for `After`, before it for `Before`). For offset pages: rows after it.
    pub more: bool,
}

/// One delivery attempt of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub at_ms: i64,
    /// The HTTP status, or none for a timeout or connection error.
    pub status: Option<u16>,
    /// The error, with Refiner's answer body (bounded by [`MAX_ATTEMPT_ERROR_BYTES`]).
    pub error: String,
}

/// Longest error text kept per attempt, in bytes.
pub const MAX_ATTEMPT_ERROR_BYTES: usize = 4096;

/// A whole dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub summary: DeadLetterSummary,
    /// The normalized event as stored (JSON).
    pub payload: Vec<u8>,
    /// Every recorded attempt, oldest first.
    pub attempts: Vec<Attempt>,
}

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Dead letters moved back to the queue.
    pub replayed: u64,
    /// Dead letters still matching the filter afterwards (left by a `limit`).
    pub remaining: u64,
}

/// A source's usage in one calendar month (UTC) and its backlog now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceUsage {
    /// `YYYY-MM`.
    pub month: String,
    /// Distinct identified users (by userId, else email) with an event accepted this month.
    pub mtu: u64,
    pub mtu_updated_at_ms: Option<i64>,
    /// Events accepted this month (duplicates not counted).
    pub mte: u64,
    pub mte_updated_at_ms: Option<i64>,
    /// `page` and `screen` events accepted this month.
    pub mpv: u64,
    pub mpv_updated_at_ms: Option<i64>,
    /// When the spool first knew the source.
    pub created_at_ms: Option<i64>,
    /// Events queued and not yet delivered.
    pub backlog: u64,
    /// Arrival time of the oldest of them.
    pub oldest_undelivered_ms: Option<i64>,
    /// Dead letters kept for the source.
    pub dead_letters: u64,
}

/// One hourly counter value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterRow {
    /// Hours since the Unix epoch (UTC).
    pub hour: i64,
    /// `received`, `duplicates`, `forwarded`, `retried`, `dead_lettered`, `replayed`, or
    /// `skipped:<reason>`.
    pub name: String,
    pub value: u64,
}

/// Milliseconds in an hour, the counters' granularity.
pub const HOUR_MS: i64 = 3_600_000;

/// `YYYY-MM` of a time in ms since the epoch (UTC).
pub fn month_of(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m")
        .to_string()
}
