//! One user's events of a batch: plan → send → apply.
//!
//! - **Plan** ([`Dispatcher::plan`]): each event becomes a Refiner call, a skip with its
//!   reason, or a dead letter; consecutive identify-user calls merge
//!   (`mapping::coalesce`); the calls are cut into [`steps`].
//! - **Send** ([`Dispatcher::send`]): a step's calls go out within the user's window, each
//!   after the source's gate (a refused key), the key's 429 pause and rate limit and the
//!   adaptive limit; a 2xx is journaled before anything else happens.
//! - **Apply** ([`apply`]): each answer becomes part of the settlement (acked, retried at a
//!   time, dead-lettered, postponed): a pure function of the answer, the events and the
//!   retry policy, so it is unit-tested without a network.
//!
//! Engage: a membership that syncs to a manual segment is two calls, the identify-user
//! call with the attribute (delivering no event by itself) and then the sync-segment call
//! (delivering the event), whose segment is resolved just before it is sent.
//!
//! Order: a step is either one identify-user, delete-contact or sync-segment call, or a run of
//! consecutive track-event calls. Steps go one after the other; the calls of a run are in
//! flight together up to `per_user_window`. After a transient failure no further call of
//! the user starts: the calls not yet sent are released, and the spool holds the user until
//! the retry time. So a state change (identify, group, delete) is never in flight beside
//! another call of its user, and only track events, which Refiner stamps on receipt, can
//! overtake one another, by less than the window.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;

use super::journal::Ticket;
use super::keys::Gate;
use super::limiter::Signal;
use super::routing::{Decision, Routing, SourceRoute};
use super::segments::Resolved;
use super::{now_ms, Dispatcher};
use crate::refiner::client::{Failure, Outcome};
use crate::refiner::filters::DEFAULT_ENVIRONMENT;
use crate::refiner::mapping::{self, Mapped, Membership, RefinerCall};
use crate::segment::HoldKey;
use crate::spool::{DeadLetterRequest, Leased, Postponed, RetryAt, Settlement, Skipped};

/// The skip reason of a membership whose audience has no Refiner manual segment.
pub(super) const SEGMENT_NOT_FOUND: &str = "segment_not_found";

/// Calls of one user: the events (seqs) each call delivers, and the call.
type Calls = Vec<(Vec<i64>, RefinerCall)>;

/// Calls before coalescing: the event each delivers (`None`: a call that delivers no event
/// by itself), and the call.
type Planned = Vec<(Option<i64>, RefinerCall)>;

/// Cuts a user's calls into steps: each identify-user or delete-contact call alone, each
/// run of consecutive track-event calls together (with a window of 1, every call alone).
pub(super) fn steps(calls: Calls, window: usize) -> Vec<Calls> {
    let mut steps: Vec<Calls> = Vec::new();
    let mut run_open = false;
    for (seqs, call) in calls {
        let track = window > 1 && matches!(call, RefinerCall::TrackEvent { .. });
        match steps.last_mut() {
            Some(run) if track && run_open => run.push((seqs, call)),
            _ => steps.push(vec![(seqs, call)]),
        }
        run_open = track;
    }
    steps
}

/// The retry policy `apply` follows.
#[derive(Debug, Clone, Copy)]
pub(super) struct Policy {
    pub retry_base_ms: u64,
    pub retry_cap_ms: u64,
    pub retry_floor_429_ms: u64,
    pub max_age_ms: i64,
}

/// What one answer means for the rest of the user's run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Delivered or given up on: the user goes on.
    Go,
    /// Failed transiently: nothing more of the user starts.
    Stop,
    /// Refiner refused the key: the source pauses.
    Refused,
}

/// Applies one answer to the settlement: pure, given the events' attempts and arrival times
/// (`events`), `now` and `jitter` in `[0, 1)` (the random part of the backoff).
pub(super) fn apply(
    outcome: &Outcome,
    seqs: &[i64],
    events: &HashMap<i64, &Leased>,
    policy: &Policy,
    now: i64,
    jitter: f64,
    out: &mut Settlement,
) -> Verdict {
    match outcome {
        Outcome::Delivered { .. } => {
            out.acked.extend_from_slice(seqs);
            Verdict::Go
        }
        Outcome::Reject {
            status: 401 | 403, ..
        } => Verdict::Refused,
        Outcome::Reject { status, body } => {
            out.dead.extend(seqs.iter().map(|&seq| DeadLetterRequest {
                seq,
                status: Some(*status),
                error: body.clone(),
                attempted: true,
            }));
            Verdict::Go
        }
        Outcome::Retry {
            status,
            retry_after,
            error,
            ..
        } => {
            let mut verdict = Verdict::Go;
            for (&seq, event) in seqs.iter().filter_map(|s| events.get_key_value(s)) {
                if now - event.received_at_ms > policy.max_age_ms {
                    out.dead.push(DeadLetterRequest {
                        seq,
                        status: *status,
                        error: format!("gave up after {} attempts: {error}", event.attempts + 1),
                        attempted: true,
                    });
                } else {
                    let delay = retry_delay(policy, event.attempts, *status, *retry_after, jitter);
                    out.retried.push(RetryAt {
                        seq,
                        next_attempt_at_ms: now + delay.as_millis() as i64,
                        status: *status,
                        error: error.clone(),
                    });
                    verdict = Verdict::Stop;
                }
            }
            verdict
        }
    }
}

/// Full-jitter exponential backoff, bounded below by Retry-After (and the 429 floor).
pub(super) fn retry_delay(
    policy: &Policy,
    attempts: u32,
    status: Option<u16>,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let base = policy.retry_base_ms.max(1) as f64;
    let ceiling = (base * 2f64.powi(attempts.min(40) as i32)).min(policy.retry_cap_ms as f64);
    let mut delay = Duration::from_millis((jitter * ceiling) as u64);
    if let Some(after) = retry_after {
        delay = delay.max(after);
    }
    if status == Some(429) {
        delay = delay.max(Duration::from_millis(policy.retry_floor_429_ms));
    }
    delay
}

/// What became of one call of a step.
enum Sent {
    /// Not sent: an earlier call of the user failed, or the breaker opened.
    Released(Vec<i64>),
    /// Not sent: the source is paused.
    Postponed(Vec<i64>, i64),
    /// Not sent, and done: counted under the reason.
    Skipped(Vec<i64>, &'static str),
    /// Refiner answered (or the call failed).
    Answered {
        seqs: Vec<i64>,
        call: RefinerCall,
        outcome: Outcome,
        tickets: Vec<Ticket>,
        /// How long the call took (zero when it was not sent).
        latency: Duration,
    },
}

/// A user's run in progress.
struct Run<'a> {
    source: &'a str,
    api_key: &'a str,
    probe: bool,
    events: HashMap<i64, &'a Leased>,
    /// Set once a call of the user failed transiently (or its key was refused).
    stop: AtomicBool,
    /// This run holds the source's recheck turn.
    recheck: AtomicBool,
}

impl Dispatcher {
    /// One user's events, in order. `tickets` receives the journal tickets of the acks in
    /// the returned settlement, for [`Dispatcher::settle`].
    pub(super) async fn deliver_chain(
        &self,
        chain: Vec<Leased>,
        probe: bool,
        tickets: &mut Vec<Ticket>,
    ) -> Settlement {
        let mut out = Settlement::default();
        let Some(source) = chain.first().map(|e| e.source.clone()) else {
            return out;
        };
        // One snapshot for the whole run: every event sees the same rules and keys.
        let routing = self.routing.load();
        let route = routing.sources.get(&source).cloned().unwrap_or_default();
        if route.api_key.is_none() && route.environments.is_empty() {
            self.dead_without_key(&source, "default", chain.iter().map(|e| e.seq), &mut out);
            self.publish_outcomes(&chain.iter().map(|e| (e.seq, e)).collect(), &out);
            return out;
        }
        let (keys, groups): (Vec<Arc<str>>, Vec<Calls>) = self
            .plan(&chain, &source, &routing, &route, &mut out)
            .into_iter()
            .unzip();
        let mut run = Run {
            source: &source,
            api_key: "",
            probe,
            events: chain.iter().map(|e| (e.seq, e)).collect(),
            stop: AtomicBool::new(false),
            recheck: AtomicBool::new(false),
        };
        let window = self.settings.per_user_window.max(1);
        for (api_key, calls) in keys.iter().zip(groups) {
            run.api_key = &**api_key;
            for step in steps(calls, window) {
                // Ack what is done before the next step, keeping the user held: a crash then
                // redelivers at most the step in flight, not the user's whole run.
                if !out.acked.is_empty() || !out.skipped.is_empty() || !out.dead.is_empty() {
                    let done = Settlement {
                        acked: std::mem::take(&mut out.acked),
                        skipped: std::mem::take(&mut out.skipped),
                        dead: std::mem::take(&mut out.dead),
                        notes: std::mem::take(&mut out.notes),
                        keep_holds: true,
                        ..Settlement::default()
                    };
                    self.publish_outcomes(&run.events, &done);
                    self.settle(done, tickets).await;
                }
                let mut answers = futures_util::stream::iter(step)
                    .map(|(seqs, call)| self.send(&run, seqs, call))
                    .buffer_unordered(window);
                while let Some(sent) = answers.next().await {
                    self.record(&run, sent, &mut out, tickets);
                }
            }
        }
        if run.recheck.load(Ordering::SeqCst) {
            // Nothing answered the recheck (all released): the next run may try.
            self.gates.recheck_abandoned(&source);
        }
        self.publish_outcomes(&run.events, &out);
        out
    }

    /// Dead-letters events that have no Refiner API key to go with.
    fn dead_without_key(
        &self,
        source: &str,
        environment: &str,
        seqs: impl Iterator<Item = i64>,
        out: &mut Settlement,
    ) {
        let before = out.dead.len();
        out.dead.extend(seqs.map(|seq| DeadLetterRequest {
            seq,
            status: None,
            error: format!(
                "no Refiner API key is configured for source `{source}` (environment `{environment}`)"
            ),
            attempted: false,
        }));
        self.count_events(source, "dead_lettered", out.dead.len() - before);
    }

    /// Maps a user's events to calls, grouped by API key in delivery order (consecutive
    /// events for one key form a group, coalesced within it); skips and dead letters go
    /// straight to `out`.
    fn plan(
        &self,
        chain: &[Leased],
        source: &str,
        routing: &Routing,
        route: &SourceRoute,
        out: &mut Settlement,
    ) -> Vec<(Arc<str>, Calls)> {
        // `None`: a call that delivers no event by itself (the attribute of a membership
        // whose event the sync-segment call after it delivers).
        let mut groups: Vec<(Arc<str>, Planned)> = Vec::new();
        for event in chain {
            let Some((environment, mapped)) = self.decide(event, source, routing, out) else {
                continue;
            };
            let Some(key) = route.key_of(environment.as_deref()) else {
                let environment = environment.as_deref().unwrap_or(DEFAULT_ENVIRONMENT);
                self.dead_without_key(source, environment, std::iter::once(event.seq), out);
                continue;
            };
            if groups.last().is_none_or(|(last, _)| *last != key) {
                groups.push((key, Vec::new()));
            }
            if let Some((_, calls)) = groups.last_mut() {
                self.plan_one(calls, event.seq, source, mapped, out);
            }
        }
        groups
            .into_iter()
            .map(|(key, calls)| {
                let calls = mapping::coalesce(calls)
                    .into_iter()
                    .map(|(keys, call)| (keys.into_iter().flatten().collect(), call))
                    .collect();
                (key, calls)
            })
            .collect()
    }

    /// The rules' and the mapping's verdict on one event, or `None` when the event is
    /// already settled in `out` (recovered from the journal, unreadable, dropped by a rule).
    fn decide(
        &self,
        event: &Leased,
        source: &str,
        routing: &Routing,
        out: &mut Settlement,
    ) -> Option<(Option<Arc<str>>, Mapped)> {
        if self.journal.as_ref().is_some_and(|journal| {
            journal.take_recovered(event.seq, &event.source, &event.message_id)
        }) {
            // Refiner answered 2xx to a process that was stopped before committing the
            // ack: acked now, not sent again.
            out.acked.push(event.seq);
            self.count_events(source, "forwarded", 1);
            return None;
        }
        let payload = match serde_json::from_slice::<serde_json::Value>(&event.payload) {
            Ok(payload) => payload,
            Err(e) => {
                out.dead.push(DeadLetterRequest {
                    seq: event.seq,
                    status: None,
                    error: format!("stored payload is not JSON: {e}"),
                    attempted: false,
                });
                self.count_events(source, "dead_lettered", 1);
                return None;
            }
        };
        match routing
            .decide(source, event.kind.as_str(), &payload)
            .decision
        {
            Decision::Dropped(reason) => {
                self.skip(source, &reason);
                out.skipped.push(Skipped {
                    seq: event.seq,
                    reason,
                });
                None
            }
            Decision::Mapped {
                environment,
                mapped,
            } => Some((environment, mapped)),
        }
    }

    /// Adds one mapped event to its group's calls (or settles it as skipped).
    fn plan_one(
        &self,
        calls: &mut Planned,
        seq: i64,
        source: &str,
        mapped: Mapped,
        out: &mut Settlement,
    ) {
        let now = now_ms();
        let interval = (self.settings.ping_interval_secs * 1000) as i64;
        match mapped {
            Mapped::Call(call, notes) => {
                if notes.truncated > 0 {
                    self.metrics
                        .dispatch_truncated_strings_total
                        .inc_by(notes.truncated as u64);
                }
                self.push_call(calls, seq, call, notes.membership);
            }
            Mapped::Ping(user) => {
                let recent = self
                    .pings
                    .get(&HoldKey::new(source, &user.key()))
                    .is_some_and(|last| now - *last < interval);
                if recent {
                    out.skipped.push(Skipped {
                        seq,
                        reason: "ping_throttled".into(),
                    });
                    self.skip(source, "ping_throttled");
                } else {
                    calls.push((Some(seq), RefinerCall::ping(user)));
                }
            }
            Mapped::NotForwarded(reason) => {
                out.skipped.push(Skipped {
                    seq,
                    reason: reason.as_str().into(),
                });
                self.skip(source, reason.as_str());
            }
        }
    }

    /// Adds an event's call; an Engage membership that syncs to a manual segment adds the
    /// attribute first, then the sync-segment call, which delivers the event. Both are
    /// state changes of the user, so they keep the user's order like any identify.
    fn push_call(
        &self,
        calls: &mut Vec<(Option<i64>, RefinerCall)>,
        seq: i64,
        call: RefinerCall,
        membership: Option<Membership>,
    ) {
        match membership {
            Some(Membership { audience, member }) if self.segments.syncs(&audience) => {
                let user = call.user().clone();
                calls.push((None, call));
                let sync = RefinerCall::SyncSegment {
                    user,
                    audience,
                    member,
                    segment: None,
                };
                calls.push((Some(seq), sync));
            }
            _ => calls.push((Some(seq), call)),
        }
    }

    /// A sync-segment call with its segment, or what became of it instead: skipped when the
    /// audience has no manual segment (reported: a rate-limited warning, a metric, the skip
    /// reason `segment_not_found`), or the failure of the segment lookup.
    async fn with_segment(
        &self,
        run: &Run<'_>,
        seqs: Vec<i64>,
        call: RefinerCall,
    ) -> Result<(Vec<i64>, RefinerCall), Sent> {
        let RefinerCall::SyncSegment {
            user,
            audience,
            member,
            segment: None,
        } = call
        else {
            return Ok((seqs, call));
        };
        match self
            .segments
            .resolve(&self.client, run.api_key, &audience)
            .await
        {
            Resolved::Segment(uuid) => {
                let call = RefinerCall::SyncSegment {
                    user,
                    audience,
                    member,
                    segment: Some(uuid),
                };
                Ok((seqs, call))
            }
            Resolved::Missing => {
                self.metrics
                    .engage_segment_missing_total
                    .with_label_values(&[run.source, &audience])
                    .inc();
                self.segments.warn_missing(run.source, &audience);
                Err(Sent::Skipped(seqs, SEGMENT_NOT_FOUND))
            }
            Resolved::Failed(outcome) => {
                if matches!(outcome, Outcome::Retry { .. }) {
                    run.stop.store(true, Ordering::SeqCst);
                }
                let call = RefinerCall::SyncSegment {
                    user,
                    audience,
                    member,
                    segment: None,
                };
                Err(Sent::Answered {
                    seqs,
                    call,
                    outcome,
                    tickets: Vec::new(),
                    latency: Duration::ZERO,
                })
            }
        }
    }

    /// Sends one call of a step, unless the user's run stopped, the breaker opened or the
    /// source is paused.
    async fn send(&self, run: &Run<'_>, seqs: Vec<i64>, call: RefinerCall) -> Sent {
        if run.stop.load(Ordering::SeqCst) || (self.breaker.is_open() && !run.probe) {
            return Sent::Released(seqs);
        }
        match self.gates.gate(run.source, now_ms()) {
            Gate::Open => {}
            Gate::Recheck => run.recheck.store(true, Ordering::SeqCst),
            Gate::Paused { until_ms } => return Sent::Postponed(seqs, until_ms),
        }
        let (seqs, call) = match self.with_segment(run, seqs, call).await {
            Ok(resolved) => resolved,
            Err(sent) => return sent,
        };
        let request = call.to_request();
        let permit = loop {
            self.gates.wait_for(run.api_key, now_ms()).await;
            let permit = self.limiter.acquire().await;
            // A 429 may have paused the key while this call waited for a slot.
            if !self.gates.throttled(run.api_key, now_ms()) {
                break permit;
            }
            drop(permit);
        };
        let started = Instant::now();
        self.metrics.dispatch_in_flight_calls.inc();
        let outcome = self.client.send(run.api_key, &request).await;
        // First of all: record that Refiner has these events, in case the process dies
        // before their ack is committed (see `journal.rs`).
        let mut tickets = Vec::new();
        if let (Outcome::Delivered { .. }, Some(journal)) = (&outcome, &self.journal) {
            let events = seqs
                .iter()
                .filter_map(|seq| run.events.get(seq))
                .map(|e| (e.seq, e.source.as_str(), e.message_id.as_str()));
            tickets.extend(journal.record(events));
        }
        self.metrics.dispatch_in_flight_calls.dec();
        let latency = started.elapsed();
        let signal = match &outcome {
            Outcome::Delivered { .. } => Signal::Fine,
            Outcome::Retry {
                kind: Failure::Status(429) | Failure::Timeout,
                ..
            } => Signal::Congested,
            _ => Signal::Neutral,
        };
        self.limiter.finish(permit, signal, latency);
        self.metrics
            .dispatch_concurrency_limit
            .set(self.limiter.limit() as i64);
        let endpoint = call.name();
        self.metrics
            .refiner_calls_total
            .with_label_values(&[endpoint, &outcome.status_label()])
            .inc();
        self.metrics
            .refiner_call_duration_seconds
            .with_label_values(&[endpoint])
            .observe(latency.as_secs_f64());
        if matches!(outcome, Outcome::Retry { .. }) {
            run.stop.store(true, Ordering::SeqCst);
        }
        self.observe_latency(run.source, latency);
        Sent::Answered {
            seqs,
            call,
            outcome,
            tickets,
            latency,
        }
    }

    /// Takes one call's fate into the settlement, the breaker, the gates and the metrics.
    fn record(&self, run: &Run<'_>, sent: Sent, out: &mut Settlement, tickets: &mut Vec<Ticket>) {
        let (seqs, call, outcome, new_tickets) = match sent {
            Sent::Released(seqs) => {
                out.released.extend(seqs);
                return;
            }
            Sent::Postponed(seqs, until_ms) => {
                out.postponed
                    .extend(seqs.into_iter().map(|seq| Postponed { seq, until_ms }));
                return;
            }
            Sent::Skipped(seqs, reason) => {
                for seq in seqs {
                    out.skipped.push(Skipped {
                        seq,
                        reason: reason.into(),
                    });
                    self.skip(run.source, reason);
                }
                return;
            }
            Sent::Answered {
                seqs,
                call,
                outcome,
                tickets,
                latency,
            } => {
                out.notes
                    .extend(Self::notes(&seqs, &call, &outcome, latency, now_ms()));
                (seqs, call, outcome, tickets)
            }
        };
        tickets.extend(new_tickets);
        let source = run.source;
        let now = now_ms();
        let endpoint = call.name();
        let before = (out.acked.len(), out.retried.len(), out.dead.len());
        let verdict = apply(
            &outcome,
            &seqs,
            &run.events,
            &self.policy(),
            now,
            fastrand::f64(),
            out,
        );
        self.observe_answer(run, &call, &outcome, &seqs, now);
        match verdict {
            Verdict::Refused => {
                let status = match outcome {
                    Outcome::Reject { status, .. } => status,
                    _ => 0,
                };
                run.stop.store(true, Ordering::SeqCst);
                run.recheck.store(false, Ordering::SeqCst);
                self.gates.refused(source, status, endpoint, now);
                let until_ms = match self.gates.gate(source, now) {
                    Gate::Paused { until_ms } => until_ms,
                    _ => now + 1_000,
                };
                out.postponed
                    .extend(seqs.into_iter().map(|seq| Postponed { seq, until_ms }));
            }
            Verdict::Go | Verdict::Stop => {
                self.count_events(source, "forwarded", out.acked.len() - before.0);
                self.count_events(source, "retried", out.retried.len() - before.1);
                self.count_events(source, "dead_lettered", out.dead.len() - before.2);
            }
        }
    }

    /// The breaker, the gates, pings, latency metrics and warnings of one answer.
    fn observe_answer(
        &self,
        run: &Run<'_>,
        call: &RefinerCall,
        outcome: &Outcome,
        seqs: &[i64],
        now: i64,
    ) {
        let source = run.source;
        let endpoint = call.name();
        match outcome {
            Outcome::Delivered { .. } => {
                self.breaker.success();
                self.metrics.dispatch_circuit_open.set(0);
                self.gates.accepted(source);
                run.recheck.store(false, Ordering::SeqCst);
                if matches!(call, RefinerCall::IdentifyUser { traits, account: None, .. } if traits.is_empty())
                {
                    self.pings
                        .insert(HoldKey::new(source, &call.user().key()), now);
                }
                for event in seqs.iter().filter_map(|seq| run.events.get(seq)) {
                    self.metrics
                        .dispatch_delivery_latency_seconds
                        .observe((now - event.received_at_ms).max(0) as f64 / 1000.0);
                }
                if seqs.len() > 1 {
                    self.metrics
                        .dispatch_coalesced_total
                        .inc_by(seqs.len() as u64 - 1);
                }
            }
            Outcome::Retry {
                kind,
                retry_after,
                error,
                ..
            } => {
                if *kind == Failure::Status(429) {
                    self.breaker.success();
                    if let Some(wait) = retry_after {
                        self.gates
                            .throttle(run.api_key, now + wait.as_millis() as i64);
                    }
                } else if self.breaker.failure() {
                    self.metrics.dispatch_circuit_open.set(1);
                    tracing::warn!("Refiner keeps failing; delivery paused (circuit open)");
                }
                self.gates
                    .warn_failure(source, endpoint, &kind.label(), error);
            }
            Outcome::Reject {
                status: 401 | 403, ..
            } => {}
            Outcome::Reject { status, body } => {
                self.breaker.success();
                self.gates.accepted(source);
                run.recheck.store(false, Ordering::SeqCst);
                self.gates
                    .warn_failure(source, endpoint, &status.to_string(), body);
            }
        }
    }

    fn policy(&self) -> Policy {
        Policy {
            retry_base_ms: self.settings.retry_base_ms,
            retry_cap_ms: self.settings.retry_cap_secs * 1000,
            retry_floor_429_ms: self.settings.retry_floor_429_secs * 1000,
            max_age_ms: (self.settings.max_age_secs * 1000) as i64,
        }
    }
}

#[cfg(test)]
mod tests;
