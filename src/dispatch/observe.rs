//! What delivery tells the console: the attempts behind each settlement (for the delivery
//! log, carried in [`Settlement::notes`]), the outcomes shown live, the per-minute counts
//! and latencies of the overview, and the breaker's and the limiter's state.
//!
//! Invariant: nothing here changes what is delivered or when; live outcomes are built only
//! while someone watches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{now_ms, Dispatcher};
use crate::activity::live::{iso, LiveOutcome, Who};
use crate::activity::minutes::Counter;
use crate::activity::Activity;
use crate::refiner::client::Outcome;
use crate::refiner::mapping::RefinerCall;
use crate::spool::delivery_log::{cut, AttemptNote, CallView, EventFacts, RESPONSE_BYTES};
use crate::spool::{Leased, Settlement};

impl Dispatcher {
    /// Reports outcomes, counts and latencies to `activity` (the console's).
    pub fn with_activity(mut self, activity: Arc<Activity>) -> Dispatcher {
        self.activity = activity;
        self
    }

    /// The circuit breaker: `closed`, `open` or `half_open`.
    pub fn breaker_state(&self) -> &'static str {
        self.breaker.state_name()
    }

    /// The adaptive concurrency limit now.
    pub fn concurrency(&self) -> usize {
        self.limiter.limit()
    }

    /// Counts `n` events of `source` under the dispatcher's outcome names.
    pub(super) fn count_activity(&self, source: &str, outcome: &str, n: usize) {
        let counter = match outcome {
            "forwarded" => Counter::Forwarded,
            "retried" => Counter::Retried,
            "dead_lettered" => Counter::Dead,
            _ => return,
        };
        self.activity
            .minutes
            .count(source, now_ms(), counter, n as u64);
    }

    pub(super) fn count_skip(&self, source: &str, reason: &str) {
        self.activity.minutes.skipped(source, now_ms(), reason);
    }

    pub(super) fn observe_latency(&self, source: &str, latency: Duration) {
        self.activity
            .minutes
            .latency(source, latency.as_millis() as u64);
    }

    /// The attempt notes of one answered call, one per event it delivered.
    pub(super) fn notes(
        seqs: &[i64],
        call: &RefinerCall,
        outcome: &Outcome,
        latency: Duration,
        now: i64,
    ) -> Vec<AttemptNote> {
        let request = call.to_request();
        let calls = vec![CallView {
            method: request.method.as_str().to_string(),
            path: request.path.to_string(),
            body: request.body.to_string(),
        }];
        let (status, response_body, error) = match outcome {
            Outcome::Delivered { status, body } => (Some(*status), Some(body.clone()), None),
            Outcome::Retry { status, error, .. } => (*status, None, Some(error.clone())),
            Outcome::Reject { status, body } => (Some(*status), Some(body.clone()), None),
        };
        seqs.iter()
            .map(|&seq| AttemptNote {
                seq,
                at_ms: now,
                status,
                latency_ms: Some(latency.as_millis() as u64),
                response_body: response_body.as_deref().map(|b| cut(b, RESPONSE_BYTES)),
                error: error.as_deref().map(|e| cut(e, RESPONSE_BYTES)),
                calls: calls.clone(),
            })
            .collect()
    }

    /// Shows a settlement's outcomes live (nothing when nobody watches; see
    /// [`crate::activity::live::LiveFeed::offer_outcome`] for which are shown).
    pub(super) fn publish_outcomes(&self, events: &HashMap<i64, &Leased>, s: &Settlement) {
        if !self.activity.live.watched() {
            return;
        }
        let notes: HashMap<i64, &AttemptNote> = s.notes.iter().map(|n| (n.seq, n)).collect();
        let now = now_ms();
        let publish = |seq: i64, outcome: &'static str, next: Option<i64>, reason: Option<&str>| {
            let Some(event) = events.get(&seq) else {
                return;
            };
            let id = (event.message_id.as_str(), Some(&event.user_key));
            self.activity.live.offer_outcome(now, id, || {
                let note = notes.get(&seq);
                let facts = EventFacts::of(&event.payload);
                let anonymous = event.user_key.anonymous_id().map(str::to_string);
                LiveOutcome {
                    message_id: event.message_id.clone(),
                    source: event.source.clone(),
                    outcome,
                    status: note.and_then(|n| n.status),
                    latency_ms: note.and_then(|n| n.latency_ms),
                    next_attempt_at: next.map(iso),
                    reason: reason.map(str::to_string),
                    calls: note
                        .map(|n| n.calls.iter().map(CallView::to_json).collect())
                        .unwrap_or_default(),
                    who: Who {
                        kind: event.kind.as_str().to_string(),
                        event: facts.event,
                        users: [facts.user_id, anonymous, facts.email]
                            .into_iter()
                            .flatten()
                            .collect(),
                    },
                }
            });
        };
        for &seq in &s.acked {
            publish(seq, "delivered", None, None);
        }
        for k in &s.skipped {
            publish(k.seq, "skipped", None, Some(&k.reason));
        }
        for r in &s.retried {
            publish(
                r.seq,
                "retrying",
                Some(r.next_attempt_at_ms),
                Some(&r.error),
            );
        }
        for d in &s.dead {
            publish(d.seq, "dead", None, Some(&d.error));
        }
    }
}
