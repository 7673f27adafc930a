//! The live feed: events as they are accepted and outcomes as delivery settles them, to
//! the console's live view (`GET /api/live`, server-sent events).
//!
//! Invariants:
//! - One bounded broadcast channel ([`CAPACITY`] messages). Publishing never waits: with
//!   no subscriber it is a counter check and nothing is built; a subscriber that falls
//!   more than [`CAPACITY`] messages behind loses the oldest and is told how many
//!   (`sampled`), so a slow client never slows ingest or delivery.
//! - At most `max_clients` subscribers at once (each holds a permit); more are refused.

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{broadcast, OwnedSemaphorePermit, Semaphore};

use crate::segment;
use crate::spool::delivery_log::RefusedEntry;

/// Messages kept for the slowest subscriber.
pub const CAPACITY: usize = 1024;
/// Live clients at once, by default.
pub const MAX_CLIENTS: usize = 16;

/// An accepted event.
#[derive(Debug, Clone, Serialize)]
pub struct LiveEvent {
    #[serde(rename = "messageId")]
    pub message_id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub event: Option<String>,
    #[serde(rename = "userId")]
    pub user_id: Option<String>,
    #[serde(rename = "anonymousId")]
    pub anonymous_id: Option<String>,
    pub email: Option<String>,
    pub at: String,
    pub payload: Value,
}

fn text(value: Option<&Value>) -> Option<String> {
    match value {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    }
}

/// ISO 8601 (UTC, milliseconds) of a time in ms since the epoch.
pub fn iso(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl LiveEvent {
    pub fn of(source: &str, at_ms: i64, event: &segment::Event, payload: Value) -> LiveEvent {
        let email = text(payload.pointer("/traits/email"))
            .or_else(|| text(payload.pointer("/context/traits/email")));
        LiveEvent {
            message_id: event.message_id.clone(),
            source: source.to_string(),
            kind: event.kind.as_str().to_string(),
            event: text(payload.get("event")).or_else(|| text(payload.get("name"))),
            user_id: text(payload.get("userId")),
            anonymous_id: text(payload.get("anonymousId")),
            email,
            at: iso(at_ms),
            payload,
        }
    }
}

/// What became of an event (or of a delivery attempt of it).
#[derive(Debug, Clone, Serialize)]
pub struct LiveOutcome {
    #[serde(rename = "messageId")]
    pub message_id: String,
    pub source: String,
    /// `delivered`, `retrying`, `skipped`, `dead` or `refused`.
    pub outcome: &'static str,
    pub status: Option<u16>,
    pub latency_ms: Option<u64>,
    pub next_attempt_at: Option<String>,
    pub reason: Option<String>,
    /// `{"method", "path", "body"}` each (see [`crate::spool::delivery_log::CallView::to_json`]).
    pub calls: Vec<Value>,
    /// For the filters, not shown.
    #[serde(skip)]
    pub who: Who,
}

/// The event an outcome is about, for the live view's filters.
#[derive(Debug, Clone, Default)]
pub struct Who {
    pub kind: String,
    pub event: Option<String>,
    /// Its userId, anonymousId and email, as known.
    pub users: Vec<String>,
}

impl LiveOutcome {
    pub fn refused(entry: &RefusedEntry) -> LiveOutcome {
        LiveOutcome {
            message_id: entry.message_id.clone(),
            source: entry.source.clone(),
            outcome: "refused",
            status: None,
            latency_ms: None,
            next_attempt_at: None,
            reason: Some(entry.reason.clone()),
            calls: Vec::new(),
            who: Who {
                kind: entry.kind.clone(),
                event: None,
                users: entry.user_id.iter().chain(&entry.email).cloned().collect(),
            },
        }
    }
}

/// One message of the feed.
#[derive(Debug, Clone)]
pub enum LiveMessage {
    Event(LiveEvent),
    Outcome(LiveOutcome),
}

/// Which messages a client wants (all of them by default).
#[derive(Debug, Clone, Default)]
pub struct LiveFilter {
    pub source: Option<String>,
    pub kind: Option<String>,
    pub event: Option<String>,
    /// Matches the userId, anonymousId or email.
    pub user: Option<String>,
}

impl LiveFilter {
    pub fn matches(&self, message: &LiveMessage) -> bool {
        let (source, kind, event, mut users): (&str, &str, Option<&str>, Vec<&str>) = match message
        {
            LiveMessage::Event(e) => (
                &e.source,
                &e.kind,
                e.event.as_deref(),
                [&e.user_id, &e.anonymous_id, &e.email]
                    .into_iter()
                    .flatten()
                    .map(String::as_str)
                    .collect(),
            ),
            LiveMessage::Outcome(o) => (
                &o.source,
                &o.who.kind,
                o.who.event.as_deref(),
                o.who.users.iter().map(String::as_str).collect(),
            ),
        };
        self.source.as_deref().is_none_or(|s| s == source)
            && self.kind.as_deref().is_none_or(|k| k == kind)
            && self.event.as_deref().is_none_or(|e| Some(e) == event)
            && self.user.as_deref().is_none_or(|u| {
                users.retain(|x| *x == u);
                !users.is_empty()
            })
    }
}

/// The feed (see the module header).
pub struct LiveFeed {
    sender: broadcast::Sender<Arc<LiveMessage>>,
    clients: Arc<Semaphore>,
}

impl LiveFeed {
    pub fn new(max_clients: usize) -> LiveFeed {
        let (sender, _) = broadcast::channel(CAPACITY);
        LiveFeed {
            sender,
            clients: Arc::new(Semaphore::new(max_clients)),
        }
    }

    /// Whether anybody watches: when not, callers build nothing to publish.
    pub fn watched(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    /// Sends to every subscriber without waiting.
    pub fn publish(&self, message: LiveMessage) {
        if self.watched() {
            // Err only when the last subscriber left meanwhile: nobody to tell.
            let _ = self.sender.send(Arc::new(message));
        }
    }

    /// A new subscriber and its permit, or `None` when `max_clients` already watch.
    pub fn subscribe(
        &self,
    ) -> Option<(broadcast::Receiver<Arc<LiveMessage>>, OwnedSemaphorePermit)> {
        let permit = self.clients.clone().try_acquire_owned().ok()?;
        Some((self.sender.subscribe(), permit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(source: &str, kind: &str, user: &str) -> LiveMessage {
        LiveMessage::Outcome(LiveOutcome {
            message_id: "m".into(),
            source: source.into(),
            outcome: "delivered",
            status: Some(200),
            latency_ms: Some(3),
            next_attempt_at: None,
            reason: None,
            calls: Vec::new(),
            who: Who {
                kind: kind.into(),
                event: Some("Signed Up".into()),
                users: vec![user.into()],
            },
        })
    }

    #[test]
    fn filters_match_source_type_event_and_user() {
        let all = LiveFilter::default();
        assert!(all.matches(&outcome("web", "track", "u1")));
        let web_u1 = LiveFilter {
            source: Some("web".into()),
            kind: Some("track".into()),
            event: Some("Signed Up".into()),
            user: Some("u1".into()),
        };
        assert!(web_u1.matches(&outcome("web", "track", "u1")));
        assert!(!web_u1.matches(&outcome("app", "track", "u1")));
        assert!(!web_u1.matches(&outcome("web", "identify", "u1")));
        assert!(!web_u1.matches(&outcome("web", "track", "u2")));
    }

    #[tokio::test]
    async fn nobody_watching_costs_nothing_and_clients_are_bounded() {
        let feed = LiveFeed::new(2);
        assert!(!feed.watched());
        feed.publish(outcome("web", "track", "u1"));
        let (mut a, _pa) = feed.subscribe().expect("first");
        let (_b, _pb) = feed.subscribe().expect("second");
        assert!(feed.subscribe().is_none());
        feed.publish(outcome("web", "track", "u1"));
        assert!(matches!(
            &*a.recv().await.expect("message"),
            LiveMessage::Outcome(_)
        ));
        for _ in 0..CAPACITY + 10 {
            feed.publish(outcome("web", "track", "u1"));
        }
        assert!(matches!(
            a.recv().await,
            Err(broadcast::error::RecvError::Lagged(10))
        ));
    }
}
