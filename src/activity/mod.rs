//! What the operator console watches, fed by ingest and delivery: the live feed of events
//! and outcomes ([`live`]), per-minute counts of the last hour and recent Refiner
//! latencies per source ([`minutes`]), and the delivery log's record of events refused at
//! ingest.
//!
//! Invariants:
//! - Watching never slows ingest or delivery: publishing to the live feed is a check of the
//!   subscriber count when nobody watches; otherwise the feed samples (a bounded number of
//!   messages a second is built) and sends without blocking into a bounded broadcast
//!   channel (a slow client loses messages, and is told so).
//! - Counting is a short critical section per request or settlement, in memory; nothing
//!   here does IO on the hot paths.

pub mod live;
pub mod minutes;

use std::sync::Arc;

use crate::segment;
use crate::segment::UserKey;
use crate::spool::delivery_log::{cut, DeliveryLog, EventFacts, RefusedEntry};
use live::{LiveEvent, LiveFeed, LiveOptions, LiveOutcome};
use minutes::Minutes;

/// The console's view of the gateway's activity, shared by ingest, delivery and the API.
pub struct Activity {
    pub live: LiveFeed,
    pub minutes: Minutes,
    /// Where refused events are recorded, when the backend keeps a delivery log.
    log: Option<Arc<dyn DeliveryLog>>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new(None, LiveOptions::default())
    }
}

impl Activity {
    /// An activity recorder; refused events go to `log`; `live` bounds the live feed.
    pub fn new(log: Option<Arc<dyn DeliveryLog>>, live: LiveOptions) -> Activity {
        Activity {
            live: LiveFeed::new(live),
            minutes: Minutes::default(),
            log,
        }
    }

    /// Events of `source` accepted (durable) at `at_ms`: `queued` counted, and `shown`
    /// (what [`LiveFeed::sample`] chose of them) shown to watchers.
    pub fn accepted(&self, source: &str, at_ms: i64, shown: &[segment::Event], queued: usize) {
        self.minutes
            .count(source, at_ms, minutes::Counter::Received, queued as u64);
        for event in shown {
            let payload = serde_json::from_slice(&event.payload).unwrap_or_default();
            self.live
                .publish_event(LiveEvent::of(source, at_ms, event, payload));
        }
    }

    /// Events of `source` refused at ingest: recorded in the delivery log (in the
    /// background: a refusal never delays the answer) and shown to watchers.
    pub fn refused(&self, source: &str, at_ms: i64, refused: &[segment::Refused]) {
        if refused.is_empty() {
            return;
        }
        let entries: Vec<RefusedEntry> = refused
            .iter()
            .map(|r| refused_entry(source, at_ms, r))
            .collect();
        for e in &entries {
            let user_key = e.user_id.as_deref().map(UserKey::user_id);
            self.live
                .offer_outcome(at_ms, (&e.message_id, user_key.as_ref()), || {
                    LiveOutcome::refused(e)
                });
        }
        if let Some(log) = self.log.clone() {
            tokio::spawn(async move {
                if let Err(e) = log.record_refused(entries).await {
                    tracing::warn!(error = %e, "recording refused events in the delivery log failed");
                }
            });
        }
    }
}

/// A refused event as the log keeps it: its message id, type and user when its first
/// bytes still parse, and its reason.
fn refused_entry(source: &str, at_ms: i64, r: &segment::Refused) -> RefusedEntry {
    #[derive(serde::Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct Head {
        message_id: Option<serde_json::Value>,
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    // A refused event's first bytes are often cut JSON: its fields are then looked for in
    // the text.
    let head: Head = serde_json::from_str(&r.raw).unwrap_or_default();
    let facts = EventFacts::of(r.raw.as_bytes());
    let message_id = match head.message_id {
        Some(serde_json::Value::String(id)) => Some(id),
        _ => string_field(&r.raw, "messageId"),
    };
    let kind = head.kind.or_else(|| string_field(&r.raw, "type"));
    let user_id = facts.user_id.or_else(|| string_field(&r.raw, "userId"));
    let email = facts.email.or_else(|| string_field(&r.raw, "email"));
    RefusedEntry {
        source: source.to_string(),
        at_ms,
        message_id: message_id.map(|m| cut(&m, 200)).unwrap_or_default(),
        kind: kind.map(|k| cut(&k, 32)).unwrap_or_default(),
        user_id: user_id.map(|u| cut(&u, 200)),
        email: email.map(|e| cut(&e, 200)),
        reason: format!("{}: {}", r.reason.code(), r.reason),
        raw: r.raw.clone(),
    }
}

/// The first `"name": "value"` string in `text` (possibly cut JSON), without escapes.
fn string_field(text: &str, name: &str) -> Option<String> {
    let key = format!("\"{name}\"");
    let after = &text[text.find(&key)? + key.len()..];
    let after = after.trim_start().strip_prefix(':')?.trim_start();
    let value = after.strip_prefix('"')?;
    let end = value.find(['"', '\\'])?;
    (end > 0).then(|| value[..end].to_string())
}

#[cfg(test)]
mod tests {
    use super::string_field;

    #[test]
    fn fields_are_found_in_cut_json() {
        let raw = r#"{"type":"track","messageId": "m-1","userId":"u\"x","properties":{"pad":"xxx"#;
        assert_eq!(string_field(raw, "messageId").as_deref(), Some("m-1"));
        assert_eq!(string_field(raw, "type").as_deref(), Some("track"));
        assert_eq!(string_field(raw, "userId").as_deref(), Some("u"));
        assert_eq!(string_field(raw, "email"), None);
    }
}
