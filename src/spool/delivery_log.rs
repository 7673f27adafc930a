//! The delivery log: what became of each event, kept for a while after it left the queue,
//! so an operator can answer "did my event reach Refiner?".
//!
//! Each backend keeps it beside its queue:
//! - an accepted event gets its record when it is appended (message id, source, type,
//!   event name, user id, email, arrival time, the first [`PAYLOAD_BYTES`] of its payload);
//! - each settlement adds the dispatcher's [`AttemptNote`]s (time, status or error,
//!   latency, Refiner's answer up to [`RESPONSE_BYTES`], the Refiner calls the event became)
//!   and the final state (delivered, skipped with its reason, dead with its error);
//! - an event refused at ingest (too large, bad message id) is recorded with its reason and
//!   its first bytes as sent.
//!
//! Invariants:
//! - The log is bounded: records older than `max_age` and, oldest first, records past
//!   `max_bytes` are removed incrementally (a bounded chunk per write), so its cost does not
//!   grow with the backlog.
//! - The log is never the truth about the queue: an event still queued takes its state
//!   (queued, leased, retrying until T) from the queue when it is looked up.
//! - Losing a log record never loses an event: the embedded spool writes the log in the
//!   queue's own transactions; the JetStream spool writes it beside them, and a failed log
//!   write is reported in the log and the metrics, never to the client.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::SpoolError;

/// Most bytes of an event's payload the log keeps.
pub const PAYLOAD_BYTES: usize = 8 * 1024;
/// Most bytes of Refiner's answer the log keeps per attempt.
pub const RESPONSE_BYTES: usize = 2 * 1024;
/// Most records one lookup returns.
pub const MAX_RESULTS: usize = 50;

/// Retention of the delivery log (`[delivery_log]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryLogOptions {
    /// Whether the log is kept at all.
    pub enabled: bool,
    /// Records older than this are removed.
    pub max_age: Duration,
    /// Records past this many bytes are removed, oldest first.
    pub max_bytes: u64,
}

impl Default for DeliveryLogOptions {
    /// On, 24 hours, 256 MiB.
    fn default() -> Self {
        DeliveryLogOptions {
            enabled: true,
            max_age: Duration::from_secs(24 * 3600),
            max_bytes: 256 * 1024 * 1024,
        }
    }
}

/// A Refiner call as the log shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallView {
    pub method: String,
    pub path: String,
    /// The JSON body, as text.
    pub body: String,
}

impl CallView {
    /// `{"method", "path", "body"}` with the body as JSON (as text if it is not).
    pub fn to_json(&self) -> serde_json::Value {
        let body = serde_json::from_str(&self.body)
            .unwrap_or_else(|_| serde_json::Value::String(self.body.clone()));
        serde_json::json!({"method": self.method, "path": self.path, "body": body})
    }
}

/// One delivery attempt of a queued event, from the dispatcher, carried by a
/// [`Settlement`](super::Settlement) into the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptNote {
    pub seq: i64,
    pub at_ms: i64,
    /// Refiner's HTTP status, `None` when no answer came.
    pub status: Option<u16>,
    pub latency_ms: Option<u64>,
    /// Refiner's answer, at most [`RESPONSE_BYTES`].
    pub response_body: Option<String>,
    /// What failed (a timeout, a connection error, a refusal), if anything.
    pub error: Option<String>,
    /// The Refiner call(s) the event became (after coalescing).
    pub calls: Vec<CallView>,
}

/// One attempt as stored (the note without its seq and calls).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptView {
    pub at_ms: i64,
    pub status: Option<u16>,
    pub latency_ms: Option<u64>,
    pub response_body: Option<String>,
    pub error: Option<String>,
}

impl From<&AttemptNote> for AttemptView {
    fn from(note: &AttemptNote) -> Self {
        AttemptView {
            at_ms: note.at_ms,
            status: note.status,
            latency_ms: note.latency_ms,
            response_body: note.response_body.clone(),
            error: note.error.clone(),
        }
    }
}

/// What the log knows of an accepted event when it is appended, read from its payload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventFacts {
    pub event: Option<String>,
    pub user_id: Option<String>,
    pub email: Option<String>,
    /// The payload, or a JSON stand-in when it is larger than [`PAYLOAD_BYTES`].
    pub payload: String,
}

impl EventFacts {
    /// Reads the facts of a normalized event's JSON payload. Never fails: what cannot be
    /// read is left out.
    pub fn of(payload: &[u8]) -> EventFacts {
        #[derive(Deserialize)]
        struct Traits {
            email: Option<serde_json::Value>,
        }
        #[derive(Deserialize)]
        struct Context {
            traits: Option<Traits>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Head {
            event: Option<serde_json::Value>,
            name: Option<serde_json::Value>,
            user_id: Option<serde_json::Value>,
            traits: Option<Traits>,
            context: Option<Context>,
        }
        let text = |v: Option<serde_json::Value>| match v {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let head = serde_json::from_slice::<Head>(payload).ok();
        let (event, user_id, email) = match head {
            Some(head) => {
                let email = head.traits.and_then(|t| text(t.email)).or_else(|| {
                    head.context
                        .and_then(|c| c.traits)
                        .and_then(|t| text(t.email))
                });
                (
                    text(head.event).or_else(|| text(head.name)),
                    text(head.user_id),
                    email,
                )
            }
            None => (None, None, None),
        };
        EventFacts {
            event,
            user_id,
            email,
            payload: bounded_payload(payload),
        }
    }
}

/// The payload as kept: itself up to [`PAYLOAD_BYTES`], else an object saying it was cut,
/// with its first bytes as text.
pub fn bounded_payload(payload: &[u8]) -> String {
    if payload.len() <= PAYLOAD_BYTES {
        return String::from_utf8_lossy(payload).into_owned();
    }
    let head = String::from_utf8_lossy(&payload[..PAYLOAD_BYTES]);
    serde_json::json!({"truncated": true, "bytes": payload.len(), "head": head}).to_string()
}

/// Cuts `text` to at most `max` bytes at a character boundary.
pub fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// An event refused at ingest, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedEntry {
    pub source: String,
    pub at_ms: i64,
    /// Its message id when it could be read, else empty.
    pub message_id: String,
    pub kind: String,
    pub user_id: Option<String>,
    pub email: Option<String>,
    /// The refusal's code and message.
    pub reason: String,
    /// Its first bytes as sent.
    pub raw: String,
}

/// Where a logged event is (see [`LoggedEvent::state`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventState {
    Queued,
    Leased,
    Retrying,
    Delivered,
    Skipped,
    Dead,
    Refused,
}

impl EventState {
    pub fn as_str(self) -> &'static str {
        match self {
            EventState::Queued => "queued",
            EventState::Leased => "leased",
            EventState::Retrying => "retrying",
            EventState::Delivered => "delivered",
            EventState::Skipped => "skipped",
            EventState::Dead => "dead",
            EventState::Refused => "refused",
        }
    }

    pub fn parse(text: &str) -> Option<EventState> {
        Some(match text {
            "queued" => EventState::Queued,
            "leased" => EventState::Leased,
            "retrying" => EventState::Retrying,
            "delivered" => EventState::Delivered,
            "skipped" => EventState::Skipped,
            "dead" => EventState::Dead,
            "refused" => EventState::Refused,
            _ => return None,
        })
    }
}

/// An event as the log and the queue know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    pub source: String,
    pub message_id: String,
    pub kind: String,
    pub event: Option<String>,
    pub user_id: Option<String>,
    pub email: Option<String>,
    pub received_at_ms: i64,
    pub state: EventState,
    /// When a retrying event is due.
    pub next_attempt_at_ms: Option<i64>,
    /// Why it was skipped, dead-lettered or refused.
    pub reason: Option<String>,
    /// Its payload as kept (JSON text), or the raw bytes of a refused event.
    pub payload: String,
    pub calls: Vec<CallView>,
    pub attempts: Vec<AttemptView>,
}

/// Which events a lookup wants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogKey {
    MessageId(String),
    UserId(String),
    Email(String),
}

/// A lookup: a source's events by one key, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogQuery {
    pub source: String,
    pub key: LogKey,
    /// At most [`MAX_RESULTS`].
    pub limit: usize,
}

/// How large the log is now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogSize {
    pub records: u64,
    /// The records' accounted bytes (payloads, answers, calls and a fixed overhead each).
    pub bytes: u64,
}

/// Fixed bytes accounted per record besides its text (keys, times, index entries).
pub const RECORD_OVERHEAD: u64 = 128;

/// A backend's delivery log (see the module header). Accepted events and their attempts
/// reach it through the queue's own `append` and `settle`.
#[async_trait]
pub trait DeliveryLog: Send + Sync + 'static {
    /// Records events refused at ingest.
    async fn record_refused(&self, entries: Vec<RefusedEntry>) -> Result<(), SpoolError>;

    /// A source's events by message id, user id or email, newest first.
    async fn find_events(&self, query: LogQuery) -> Result<Vec<LoggedEvent>, SpoolError>;

    /// The log's size now.
    async fn log_size(&self) -> Result<LogSize, SpoolError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_are_read_from_the_payload_and_large_payloads_are_cut() {
        let facts = EventFacts::of(
            br#"{"type":"identify","userId":"u1","traits":{"email":"a@b.c"},"event":null}"#,
        );
        assert_eq!(facts.user_id.as_deref(), Some("u1"));
        assert_eq!(facts.email.as_deref(), Some("a@b.c"));
        assert_eq!(facts.event, None);
        let track =
            EventFacts::of(br#"{"event":"Signed Up","context":{"traits":{"email":"x@y.z"}}}"#);
        assert_eq!(track.event.as_deref(), Some("Signed Up"));
        assert_eq!(track.email.as_deref(), Some("x@y.z"));
        let big = format!(r#"{{"event":"e","pad":"{}"}}"#, "x".repeat(20_000));
        let facts = EventFacts::of(big.as_bytes());
        let kept: serde_json::Value = serde_json::from_str(&facts.payload).expect("json");
        assert_eq!(kept["truncated"], true);
        assert_eq!(kept["bytes"], big.len());
        assert!(facts.payload.len() < PAYLOAD_BYTES + 200);
        assert_eq!(EventFacts::of(b"not json").payload, "not json");
    }

    #[test]
    fn cut_keeps_characters_whole() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("abc", 10), "abc");
    }
}
