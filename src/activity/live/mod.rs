//! The live feed: events as they are accepted and outcomes as delivery settles them, to
//! the console's live view (`GET /api/live`, server-sent events).
//!
//! Invariants:
//! - One bounded broadcast channel ([`CAPACITY`] messages). Publishing never waits: with
//!   no subscriber it is a counter check and nothing is built; a subscriber that falls
//!   more than [`CAPACITY`] messages behind loses the oldest and is told how many
//!   (`sampled`, `dropped`), so a slow client never slows ingest or delivery.
//! - The feed is a sample ([`sample`]): at most `per_second` events and as many outcomes
//!   of other events a second are built and sent, whatever the load; the outcomes of shown
//!   events always follow them, and the events of a user a watcher filters on skip the
//!   sample (within a budget of their own). What was left out is counted and told
//!   (`sampled`, `skipped`). So watching costs ingest a bounded amount of work a second,
//!   not work per event.
//! - A message is serialized once, when published, not once per watcher.
//! - At most `max_clients` subscribers at once (each holds a permit); more are refused.

pub mod sample;

use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{broadcast, OwnedSemaphorePermit, Semaphore};

use crate::segment;
use crate::segment::UserKey;
use crate::spool::delivery_log::RefusedEntry;
use sample::{Budget, Followed, Following, Shown};

/// Messages kept for the slowest subscriber.
pub const CAPACITY: usize = 1024;
/// Live clients at once, by default.
pub const MAX_CLIENTS: usize = 16;
/// Events (and outcomes of events not shown) sent a second at most, by default: more
/// than a page can show.
pub const PER_SECOND: u64 = 200;

/// How many may watch and how much the feed sends.
#[derive(Debug, Clone, Copy)]
pub struct LiveOptions {
    pub max_clients: usize,
    pub per_second: u64,
}

impl Default for LiveOptions {
    fn default() -> Self {
        LiveOptions {
            max_clients: MAX_CLIENTS,
            per_second: PER_SECOND,
        }
    }
}

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
    /// `skipped` events (or outcomes) of the second before were left out of the sample.
    Sampled {
        what: &'static str,
        skipped: u64,
        per_second: u64,
    },
}

impl LiveMessage {
    /// The message as a server-sent event.
    fn frame(&self) -> Bytes {
        let (name, data) = match self {
            LiveMessage::Event(e) => ("event", serde_json::to_string(e)),
            LiveMessage::Outcome(o) => ("outcome", serde_json::to_string(o)),
            LiveMessage::Sampled {
                what,
                skipped,
                per_second,
            } => (
                "sampled",
                Ok(json!({"skipped": skipped, "of": what, "per_second": per_second}).to_string()),
            ),
        };
        Bytes::from(format!(
            "event: {name}\ndata: {}\n\n",
            data.unwrap_or_default()
        ))
    }
}

/// A message and its server-sent-event form, built once for every watcher.
#[derive(Debug)]
pub struct Published {
    pub message: LiveMessage,
    pub frame: Bytes,
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
            // Every watcher is told what the sample left out.
            LiveMessage::Sampled { .. } => return true,
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
    sender: broadcast::Sender<Arc<Published>>,
    clients: Arc<Semaphore>,
    per_second: u64,
    events: Budget,
    outcomes: Budget,
    /// Events and outcomes of followed users beyond the sample.
    followed_budget: Budget,
    shown: Shown,
    followed: Followed,
}

/// A watcher's end of the feed; its permit and followed user go when it is dropped.
pub struct Subscription {
    pub receiver: broadcast::Receiver<Arc<Published>>,
    _permit: OwnedSemaphorePermit,
    _following: Option<Following>,
}

impl LiveFeed {
    pub fn new(options: LiveOptions) -> LiveFeed {
        let (sender, _) = broadcast::channel(CAPACITY);
        LiveFeed {
            sender,
            clients: Arc::new(Semaphore::new(options.max_clients)),
            per_second: options.per_second,
            events: Budget::new(options.per_second),
            outcomes: Budget::new(options.per_second),
            followed_budget: Budget::new(options.per_second),
            shown: Shown::default(),
            followed: Followed::default(),
        }
    }

    /// Whether anybody watches: when not, callers build nothing to publish.
    pub fn watched(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    /// The events of a request to show (copies of at most the sample's share), in order.
    pub fn sample(&self, now_ms: i64, events: &[segment::Event]) -> Vec<segment::Event> {
        if !self.watched() {
            return Vec::new();
        }
        let mut shown = Vec::new();
        for event in events {
            let decision = self.events.admit(now_ms);
            self.report("events", decision.skipped_before);
            if decision.pass || self.follows(now_ms, &event.user_key) {
                self.shown.insert(&event.message_id);
                shown.push(event.clone());
            }
        }
        shown
    }

    /// Sends an event [`LiveFeed::sample`] chose.
    pub fn publish_event(&self, event: LiveEvent) {
        self.send(LiveMessage::Event(event));
    }

    /// Sends an outcome of the event `message_id` of `user_key` (when known) when its
    /// event was shown, its user is followed, or the sample has room; `build` runs only
    /// then.
    pub fn offer_outcome(
        &self,
        now_ms: i64,
        (message_id, user_key): (&str, Option<&UserKey>),
        build: impl FnOnce() -> LiveOutcome,
    ) {
        if !self.watched() {
            return;
        }
        let followed = user_key.is_some_and(|key| self.follows(now_ms, key));
        let pass = self.shown.contains(message_id) || followed || {
            let decision = self.outcomes.admit(now_ms);
            self.report("outcomes", decision.skipped_before);
            decision.pass
        };
        if pass {
            self.send(LiveMessage::Outcome(build()));
        }
    }

    /// Whether a watcher follows the user of `user_key` and their budget has room.
    fn follows(&self, now_ms: i64, user_key: &UserKey) -> bool {
        self.followed.covers(user_key) && self.followed_budget.admit(now_ms).pass
    }

    /// Tells watchers what the second before left out.
    fn report(&self, what: &'static str, skipped: u64) {
        if skipped > 0 {
            self.send(LiveMessage::Sampled {
                what,
                skipped,
                per_second: self.per_second,
            });
        }
    }

    fn send(&self, message: LiveMessage) {
        if self.watched() {
            let frame = message.frame();
            // Err only when the last subscriber left meanwhile: nobody to tell.
            let _ = self.sender.send(Arc::new(Published { message, frame }));
        }
    }

    /// A new subscriber, or `None` when `max_clients` already watch. A filter on a user
    /// follows that user for as long as the subscription lives.
    pub fn subscribe(&self, filter: &LiveFilter) -> Option<Subscription> {
        let permit = self.clients.clone().try_acquire_owned().ok()?;
        Some(Subscription {
            receiver: self.sender.subscribe(),
            _permit: permit,
            _following: filter.user.as_deref().map(|u| self.followed.follow(u)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn outcome_of(source: &str, kind: &str, user: &str) -> LiveOutcome {
        LiveOutcome {
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
        }
    }

    fn outcome(source: &str, kind: &str, user: &str) -> LiveMessage {
        LiveMessage::Outcome(outcome_of(source, kind, user))
    }

    fn event(i: usize, user_key: &str) -> segment::Event {
        segment::Event {
            kind: segment::EventType::Track,
            message_id: format!("m{i}"),
            user_key: UserKey::from_stored(user_key),
            payload: b"{}".to_vec(),
        }
    }

    /// Every message waiting for `subscription`.
    fn drain(subscription: &mut Subscription) -> Vec<Arc<Published>> {
        std::iter::from_fn(|| subscription.receiver.try_recv().ok()).collect()
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
        let feed = LiveFeed::new(LiveOptions {
            max_clients: 2,
            per_second: 100_000,
        });
        let built = AtomicUsize::new(0);
        let u1 = UserKey::user_id("u1");
        let build = || {
            built.fetch_add(1, Ordering::Relaxed);
            outcome_of("web", "track", "u1")
        };
        assert!(!feed.watched());
        feed.offer_outcome(0, ("m", Some(&u1)), build);
        assert!(feed.sample(0, &[event(0, "u:u1")]).is_empty());
        assert_eq!(built.load(Ordering::Relaxed), 0);
        let mut a = feed.subscribe(&LiveFilter::default()).expect("first");
        let _b = feed.subscribe(&LiveFilter::default()).expect("second");
        assert!(feed.subscribe(&LiveFilter::default()).is_none());
        feed.offer_outcome(0, ("m", Some(&u1)), build);
        let message = a.receiver.recv().await.expect("message");
        assert!(matches!(message.message, LiveMessage::Outcome(_)));
        assert!(message.frame.starts_with(b"event: outcome\ndata: {"));
        for _ in 0..CAPACITY + 10 {
            feed.offer_outcome(0, ("m", Some(&u1)), build);
        }
        assert!(matches!(
            a.receiver.recv().await,
            Err(broadcast::error::RecvError::Lagged(10))
        ));
    }

    #[test]
    fn the_sample_is_bounded_and_shown_events_keep_their_outcomes() {
        let feed = LiveFeed::new(LiveOptions {
            max_clients: 4,
            per_second: 5,
        });
        let mut watcher = feed.subscribe(&LiveFilter::default()).expect("watcher");
        let events: Vec<_> = (0..20).map(|i| event(i, &format!("u:u{i}"))).collect();
        let shown = feed.sample(1_000, &events);
        assert_eq!(shown.len(), 5, "the sample's share of a second");
        let outcome = |e: &segment::Event| {
            feed.offer_outcome(1_000, (&e.message_id, Some(&e.user_key)), || {
                outcome_of("web", "track", e.user_key.as_str())
            })
        };
        // The outcomes of 15 unshown events spend the outcome budget (5 pass) ...
        events[5..].iter().for_each(outcome);
        // ... and those of the shown events pass all the same.
        shown.iter().for_each(outcome);
        assert_eq!(drain(&mut watcher).len(), 10);
        // The next second tells what the last one left out.
        feed.sample(2_000, &events[..1]);
        feed.offer_outcome(2_000, ("m19", Some(&UserKey::user_id("u19"))), || {
            outcome_of("web", "track", "u19")
        });
        let told: Vec<_> = drain(&mut watcher)
            .iter()
            .filter_map(|p| match p.message {
                LiveMessage::Sampled { what, skipped, .. } => Some((what, skipped)),
                _ => None,
            })
            .collect();
        assert_eq!(told, vec![("events", 15), ("outcomes", 10)]);
    }

    #[test]
    fn a_followed_user_skips_the_sample_while_watched() {
        let feed = LiveFeed::new(LiveOptions {
            max_clients: 4,
            per_second: 5,
        });
        let hot = LiveFilter {
            user: Some("hot".into()),
            ..LiveFilter::default()
        };
        let watcher = feed.subscribe(&hot).expect("watcher");
        let cold: Vec<_> = (0..10).map(|i| event(i, "u:cold")).collect();
        let hots: Vec<_> = (10..13).map(|i| event(i, "u:hot")).collect();
        assert_eq!(feed.sample(1_000, &cold).len(), 5);
        assert_eq!(
            feed.sample(1_000, &hots).len(),
            3,
            "followed: past the sample"
        );
        drop(watcher);
        let _other = feed.subscribe(&LiveFilter::default()).expect("other");
        assert!(feed.sample(1_000, &hots).is_empty(), "no longer followed");
    }
}
