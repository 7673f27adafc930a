//! Delivery: lease → map → coalesce → send → settle.
//!
//! `workers` loops each lease a batch from the spool, group it by (source, user), map every
//! event with `refiner::mapping`, merge each user's consecutive identify-user calls
//! (`mapping::coalesce`) and send each user's calls in order, users concurrently, within
//! the adaptive concurrency limit. Outcomes are settled as they come: after each answer,
//! before the user's next call, and when the user's run ends.
//!
//! Guarantees:
//! - Per-user order: a user's calls are sent one after the other; when one fails
//!   transiently, the user's later events in the batch are released unsent, and the spool
//!   does not lease them again before the failed one's retry time. A dead-lettered event
//!   does not hold its user.
//! - At least once: an event is acked only after Refiner answered 2xx (or it was not meant
//!   to be forwarded). A crash before settling redelivers what was not settled.
//! - Few duplicates: with a [`Journal`] (the SQLite spool), each 2xx answer is written to the
//!   delivered journal before its ack goes to the spool, so a process killed before the
//!   spool's commit does not make the next one send the event again; only calls in flight
//!   at the crash are. See `journal.rs` for why the journal cannot lose an event.
//! - Retries: full-jitter exponential backoff (`retry_base_ms` × 2^attempts, capped at
//!   `retry_cap_secs`), never sooner than `Retry-After`, and after a 429 never sooner than
//!   `retry_floor_429_secs`; a 429 with `Retry-After` also pauses that API key. Events older
//!   than `max_age_secs` are dead-lettered instead of retried.
//! - Outages: the circuit breaker stops leasing after repeated transient failures and
//!   probes with one event, so a long outage does not burn every event's attempts.
//! - Shutdown: workers stop leasing, in-flight calls finish and their batch is settled.

mod breaker;
mod journal;
mod limiter;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::watch;

use crate::config::{DeliverySettings, SourceSettings};
use crate::refiner::client::{Outcome, RefinerClient};
use crate::refiner::mapping::{self, Mapped, MappingOptions, RefinerCall};
use crate::spool::{DeadLetterRequest, Leased, RetryAt, Settlement, Skipped, Spool};
use crate::telemetry::Metrics;
use breaker::{Admit, Breaker};
use limiter::{Limiter, Signal};

pub use journal::Journal;
use journal::Ticket;

/// Everything delivery needs.
pub struct Dispatcher {
    spool: Arc<dyn Spool>,
    client: RefinerClient,
    /// Refiner API key per source slug.
    keys: HashMap<String, String>,
    settings: DeliverySettings,
    mapping: MappingOptions,
    metrics: Metrics,
    limiter: Limiter,
    breaker: Breaker,
    /// Last delivered ping per (source, user), in ms.
    pings: DashMap<String, i64>,
    /// API keys paused by a 429 with Retry-After, until (ms).
    paused: DashMap<String, i64>,
    /// Static requests-per-second limit per API key, when configured.
    rate_limits: DashMap<String, Arc<DefaultDirectRateLimiter>>,
    /// Where 2xx answers are recorded before their ack is committed (SQLite spool only).
    journal: Option<Arc<Journal>>,
    /// Workers still running; the last one to stop clears the journal.
    running: AtomicUsize,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Dispatcher {
    pub fn new(
        spool: Arc<dyn Spool>,
        client: RefinerClient,
        sources: &[SourceSettings],
        settings: DeliverySettings,
        mapping: MappingOptions,
        metrics: Metrics,
    ) -> Dispatcher {
        let keys = sources
            .iter()
            .filter_map(|s| {
                s.refiner_api_key
                    .as_ref()
                    .map(|k| (s.slug.clone(), k.expose().to_string()))
            })
            .collect();
        let limiter = Limiter::new(
            settings.initial_concurrency,
            settings.max_concurrency,
            Duration::from_millis(settings.latency_threshold_ms),
        );
        let breaker = Breaker::new(
            settings.breaker_failures,
            Duration::from_secs(settings.breaker_cooldown_secs.max(1)),
        );
        metrics
            .dispatch_concurrency_limit
            .set(limiter.limit() as i64);
        Dispatcher {
            spool,
            client,
            keys,
            settings,
            mapping,
            metrics,
            limiter,
            breaker,
            pings: DashMap::new(),
            paused: DashMap::new(),
            rate_limits: DashMap::new(),
            journal: None,
            running: AtomicUsize::new(0),
        }
    }

    /// Records every 2xx answer in `journal` before its ack is committed, and acks without
    /// a call the events a killed predecessor had delivered. Only for a spool whose `seq`s
    /// are never reused and survive a restart (the SQLite spool).
    pub fn with_journal(mut self, journal: Journal) -> Dispatcher {
        self.journal = Some(Arc::new(journal));
        self
    }

    /// Starts the workers; they stop when `shutdown` turns true, after settling what they
    /// hold.
    pub fn start(
        self: Arc<Self>,
        shutdown: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let workers = self.settings.workers.max(1);
        self.running.store(workers, Ordering::SeqCst);
        (0..workers)
            .map(|_| tokio::spawn(self.clone().worker(shutdown.clone())))
            .collect()
    }

    async fn worker(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let poll = Duration::from_millis(self.settings.poll_interval_ms.max(1));
        let lease_ms = (self.settings.lease_secs * 1000) as i64;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let (max, probe) = match self.breaker.admit() {
                Admit::Go => (self.settings.batch_size, false),
                Admit::Probe => (1, true),
                Admit::Wait(wait) => {
                    self.metrics.dispatch_circuit_open.set(1);
                    sleep_or_shutdown(wait.min(Duration::from_secs(1)), &mut shutdown).await;
                    continue;
                }
            };
            let batch = match self.spool.lease(max, lease_ms).await {
                Ok(batch) => batch,
                Err(e) => {
                    if probe {
                        self.breaker.probe_abandoned();
                    }
                    tracing::warn!(error = %e, "leasing from the spool failed");
                    sleep_or_shutdown(Duration::from_secs(1), &mut shutdown).await;
                    continue;
                }
            };
            if batch.is_empty() {
                if probe {
                    self.breaker.probe_abandoned();
                }
                sleep_or_shutdown(poll, &mut shutdown).await;
                continue;
            }
            self.process(batch, probe).await;
            if probe {
                // A probe whose event made no call (an alias, a throttled ping, no key)
                // recorded no outcome and still holds the probe turn: give it back, or no
                // worker would ever probe again. After a call this is a no-op, since every
                // answer already ended the probe.
                self.breaker.probe_abandoned();
            }
        }
        // Every worker settled what it held: the journal's entries are all committed.
        if self.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            if let Some(journal) = &self.journal {
                journal.clear_if_settled();
            }
        }
    }

    /// Settles a user's outcome, retrying storage errors: what was delivered must be acked.
    /// Then releases the journal's `tickets` for its acks, or, if the spool never took the
    /// settlement, keeps their entries so the next process does not send them again.
    async fn settle(&self, settlement: Settlement, tickets: &mut Vec<Ticket>) {
        let committed = self.try_settle(settlement).await;
        for ticket in tickets.drain(..) {
            if !committed {
                ticket.keep();
            }
        }
    }

    /// Applies a settlement, retrying storage errors; false if it gave up.
    async fn try_settle(&self, settlement: Settlement) -> bool {
        let mut delay = Duration::from_millis(100);
        for attempt in 0..20 {
            match self.spool.settle(settlement.clone()).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "settling a batch failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        // The leases expire and the batch is delivered again: duplicates, never loss.
        tracing::error!("giving up settling a batch; it will be redelivered");
        false
    }

    /// Delivers one leased batch. Each user's outcome is settled as soon as that user's
    /// calls are done, so a crash redelivers only what was still in flight; settles that
    /// finish together share one spool transaction (group commit).
    async fn process(&self, batch: Vec<Leased>, probe: bool) {
        let mut chains: Vec<Vec<Leased>> = Vec::new();
        let mut index: HashMap<(String, String), usize> = HashMap::new();
        for event in batch {
            let key = (event.source.clone(), event.user_key.clone());
            match index.get(&key) {
                Some(&i) => chains[i].push(event),
                None => {
                    index.insert(key, chains.len());
                    chains.push(vec![event]);
                }
            }
        }
        futures_util::future::join_all(chains.into_iter().map(|chain| async move {
            let mut tickets = Vec::new();
            let settlement = self.deliver_chain(chain, probe, &mut tickets).await;
            if !settlement.is_empty() {
                self.settle(settlement, &mut tickets).await;
            }
        }))
        .await;
    }

    /// One user's events, in order. `tickets` receives the journal tickets of the acks in
    /// the returned settlement, for [`Dispatcher::settle`].
    async fn deliver_chain(
        &self,
        chain: Vec<Leased>,
        probe: bool,
        tickets: &mut Vec<Ticket>,
    ) -> Settlement {
        let mut out = Settlement::default();
        let now = now_ms();
        let Some(first) = chain.first() else {
            return out;
        };
        let source = first.source.clone();
        let Some(api_key) = self.keys.get(&source).cloned() else {
            for event in &chain {
                out.dead.push(DeadLetterRequest {
                    seq: event.seq,
                    status: None,
                    error: format!("no Refiner API key is configured for source `{source}`"),
                    attempted: false,
                });
            }
            self.count_events(&source, "dead_lettered", chain.len());
            return out;
        };
        let by_seq: HashMap<i64, &Leased> = chain.iter().map(|e| (e.seq, e)).collect();
        let mut calls: Vec<(i64, RefinerCall)> = Vec::with_capacity(chain.len());
        for event in &chain {
            if self.journal.as_ref().is_some_and(|journal| {
                journal.take_recovered(event.seq, &event.source, &event.message_id)
            }) {
                // Refiner answered 2xx to a process that was stopped before committing the
                // ack: acked now, not sent again.
                out.acked.push(event.seq);
                self.count_events(&source, "forwarded", 1);
                continue;
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
                    self.count_events(&source, "dead_lettered", 1);
                    continue;
                }
            };
            match mapping::map_named_event(&event.kind, &payload, &self.mapping) {
                Mapped::Call(call, notes) => {
                    if notes.truncated > 0 {
                        self.metrics
                            .dispatch_truncated_strings_total
                            .inc_by(notes.truncated as u64);
                    }
                    calls.push((event.seq, call));
                }
                Mapped::Ping(user) => {
                    let ping_key = format!("{source}\u{1f}{}", user.key());
                    let interval = (self.settings.ping_interval_secs * 1000) as i64;
                    let recent = self
                        .pings
                        .get(&ping_key)
                        .is_some_and(|last| now - *last < interval);
                    if recent {
                        out.skipped.push(Skipped {
                            seq: event.seq,
                            reason: "ping_throttled".into(),
                        });
                        self.skip(&source, "ping_throttled");
                    } else {
                        calls.push((event.seq, RefinerCall::ping(user)));
                    }
                }
                Mapped::NotForwarded(reason) => {
                    out.skipped.push(Skipped {
                        seq: event.seq,
                        reason: reason.as_str().into(),
                    });
                    self.skip(&source, reason.as_str());
                }
            }
        }
        let merged = mapping::coalesce(calls);
        let mut blocked = false;
        for (seqs, call) in merged {
            if blocked || (self.breaker.is_open() && !probe) {
                out.released.extend(seqs);
                continue;
            }
            // Ack what is done before the next call, keeping the user held: a crash then
            // redelivers at most the call in flight, not the user's whole run.
            if !out.acked.is_empty() || !out.skipped.is_empty() || !out.dead.is_empty() {
                self.settle(
                    Settlement {
                        acked: std::mem::take(&mut out.acked),
                        skipped: std::mem::take(&mut out.skipped),
                        dead: std::mem::take(&mut out.dead),
                        keep_holds: true,
                        ..Settlement::default()
                    },
                    tickets,
                )
                .await;
            }
            let request = call.to_request();
            let permit = loop {
                self.wait_for_key(&api_key).await;
                let permit = self.limiter.acquire().await;
                // A 429 may have paused the key while this call waited for a slot.
                if !self.key_paused(&api_key) {
                    break permit;
                }
                drop(permit);
            };
            let started = Instant::now();
            self.metrics.dispatch_in_flight_calls.inc();
            let outcome = self.client.send(&api_key, &request).await;
            // First of all: record that Refiner has these events, in case the process dies
            // before their ack is committed (see `journal.rs`).
            if let (Outcome::Delivered { .. }, Some(journal)) = (&outcome, &self.journal) {
                let events = seqs
                    .iter()
                    .filter_map(|seq| by_seq.get(seq))
                    .map(|e| (e.seq, e.source.as_str(), e.message_id.as_str()));
                tickets.extend(journal.record(events));
            }
            self.metrics.dispatch_in_flight_calls.dec();
            let latency = started.elapsed();
            let signal = match &outcome {
                Outcome::Delivered { .. } => Signal::Fine,
                Outcome::Retry {
                    status: Some(429), ..
                } => Signal::Congested,
                Outcome::Retry {
                    error,
                    status: None,
                    ..
                } if error.starts_with("timeout") => Signal::Congested,
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
            match outcome {
                Outcome::Delivered { .. } => {
                    self.breaker.success();
                    self.metrics.dispatch_circuit_open.set(0);
                    if matches!(&call, RefinerCall::IdentifyUser { traits, account: None, .. } if traits.is_empty())
                    {
                        self.pings
                            .insert(format!("{source}\u{1f}{}", call.user().key()), now_ms());
                    }
                    let done = now_ms();
                    for seq in &seqs {
                        if let Some(event) = by_seq.get(seq) {
                            self.metrics
                                .dispatch_delivery_latency_seconds
                                .observe((done - event.received_at_ms).max(0) as f64 / 1000.0);
                        }
                    }
                    if seqs.len() > 1 {
                        self.metrics
                            .dispatch_coalesced_total
                            .inc_by(seqs.len() as u64 - 1);
                    }
                    self.count_events(&source, "forwarded", seqs.len());
                    out.acked.extend(seqs);
                }
                Outcome::Retry {
                    status,
                    retry_after,
                    error,
                } => {
                    if status == Some(429) {
                        self.breaker.success();
                        if let Some(wait) = retry_after {
                            let until = now_ms() + wait.as_millis() as i64;
                            self.paused.insert(api_key.clone(), until);
                        }
                    } else if self.breaker.failure() {
                        self.metrics.dispatch_circuit_open.set(1);
                        tracing::warn!("Refiner keeps failing; delivery paused (circuit open)");
                    }
                    tracing::debug!(%error, endpoint, "Refiner call failed; will retry");
                    let now = now_ms();
                    for seq in seqs {
                        let Some(event) = by_seq.get(&seq) else {
                            continue;
                        };
                        let age_ms = now - event.received_at_ms;
                        if age_ms > (self.settings.max_age_secs * 1000) as i64 {
                            out.dead.push(DeadLetterRequest {
                                seq,
                                status,
                                error: format!(
                                    "gave up after {} attempts: {error}",
                                    event.attempts + 1
                                ),
                                attempted: true,
                            });
                            self.count_events(&source, "dead_lettered", 1);
                        } else {
                            let delay = self.retry_delay(event.attempts, status, retry_after);
                            out.retried.push(RetryAt {
                                seq,
                                next_attempt_at_ms: now + delay.as_millis() as i64,
                                status,
                                error: error.clone(),
                            });
                            self.count_events(&source, "retried", 1);
                            blocked = true;
                        }
                    }
                }
                Outcome::Reject { status, body } => {
                    self.breaker.success();
                    tracing::warn!(status, endpoint, "Refiner refused a call; dead-lettered");
                    self.count_events(&source, "dead_lettered", seqs.len());
                    for seq in seqs {
                        out.dead.push(DeadLetterRequest {
                            seq,
                            status: Some(status),
                            error: body.clone(),
                            attempted: true,
                        });
                    }
                }
            }
        }
        out
    }

    /// Full-jitter exponential backoff, bounded below by Retry-After (and the 429 floor).
    fn retry_delay(
        &self,
        attempts: u32,
        status: Option<u16>,
        retry_after: Option<Duration>,
    ) -> Duration {
        let base = self.settings.retry_base_ms.max(1) as f64;
        let cap = (self.settings.retry_cap_secs * 1000) as f64;
        let ceiling = (base * 2f64.powi(attempts.min(40) as i32)).min(cap);
        let mut delay = Duration::from_millis((fastrand::f64() * ceiling) as u64);
        if let Some(after) = retry_after {
            delay = delay.max(after);
        }
        if status == Some(429) {
            delay = delay.max(Duration::from_secs(self.settings.retry_floor_429_secs));
        }
        delay
    }

    /// Whether a 429's Retry-After still pauses this key.
    fn key_paused(&self, api_key: &str) -> bool {
        self.paused
            .get(api_key)
            .is_some_and(|until| *until > now_ms())
    }

    /// Honours a 429's pause of this key and the static rate limit.
    async fn wait_for_key(&self, api_key: &str) {
        let until = self.paused.get(api_key).map(|u| *u);
        if let Some(until) = until {
            let wait = until - now_ms();
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
            }
        }
        if let Some(per_sec) = std::num::NonZeroU32::new(self.settings.rate_limit_per_sec) {
            let limiter = self
                .rate_limits
                .entry(api_key.to_string())
                .or_insert_with(|| Arc::new(RateLimiter::direct(Quota::per_second(per_sec))))
                .clone();
            limiter.until_ready().await;
        }
    }

    fn count_events(&self, source: &str, outcome: &str, n: usize) {
        self.metrics
            .dispatch_events_total
            .with_label_values(&[source, outcome])
            .inc_by(n as u64);
    }

    fn skip(&self, source: &str, reason: &str) {
        self.metrics
            .dispatch_skipped_total
            .with_label_values(&[source, reason])
            .inc();
        self.count_events(source, "skipped", 1);
    }
}

async fn sleep_or_shutdown(duration: Duration, shutdown: &mut watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(duration) => {}
        _ = shutdown.changed() => {}
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;
    use crate::config::Secret;
    use crate::refiner::client::ClientOptions;
    use crate::sim::{self, SimHandle, SimOptions};
    use crate::spool::{AppendReport, AppendRequest, SpoolError, SpoolStats};

    /// A queue of one event whose settlements either commit or never finish (a process
    /// killed while waiting for the spool's commit).
    struct OneEvent {
        event: Leased,
        leased: AtomicBool,
        commits: bool,
        acked: Mutex<Vec<i64>>,
    }

    #[async_trait]
    impl Spool for OneEvent {
        async fn append(&self, _: AppendRequest) -> Result<AppendReport, SpoolError> {
            Ok(AppendReport::default())
        }
        async fn lease(&self, _: usize, _: i64) -> Result<Vec<Leased>, SpoolError> {
            Ok(if self.leased.swap(true, Ordering::SeqCst) {
                Vec::new()
            } else {
                vec![self.event.clone()]
            })
        }
        async fn settle(&self, settlement: Settlement) -> Result<(), SpoolError> {
            if !self.commits {
                std::future::pending::<()>().await;
            }
            self.acked.lock().expect("lock").extend(settlement.acked);
            Ok(())
        }
        async fn check_writable(&self) -> Result<(), SpoolError> {
            Ok(())
        }
        async fn stats(&self) -> Result<SpoolStats, SpoolError> {
            Ok(SpoolStats::default())
        }
        async fn close(&self) {}
    }

    fn queue(commits: bool) -> Arc<OneEvent> {
        Arc::new(OneEvent {
            event: Leased {
                seq: 42,
                source: "web".into(),
                message_id: "m-42".into(),
                kind: "track".into(),
                user_key: "u:u1".into(),
                payload: br#"{"type":"track","event":"Signed Up","userId":"u1"}"#.to_vec(),
                attempts: 0,
                received_at_ms: now_ms(),
            },
            leased: AtomicBool::new(false),
            commits,
            acked: Mutex::new(Vec::new()),
        })
    }

    fn dispatcher(spool: Arc<OneEvent>, sim: &SimHandle, journal: &std::path::Path) -> Dispatcher {
        let client = RefinerClient::new(&ClientOptions {
            base_url: sim.url(),
            timeout: Duration::from_secs(5),
            max_idle_per_host: 4,
        })
        .expect("client");
        let sources = [SourceSettings {
            slug: "web".into(),
            write_keys: Vec::new(),
            webhook_secret: None,
            refiner_api_key: Some(Secret::new("refiner-key")),
            webhook_format: Default::default(),
        }];
        let settings = DeliverySettings {
            workers: 1,
            poll_interval_ms: 5,
            ..DeliverySettings::default()
        };
        Dispatcher::new(
            spool,
            client,
            &sources,
            settings,
            MappingOptions::default(),
            Metrics::new(),
        )
        .with_journal(Journal::open(journal).expect("journal"))
    }

    async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not within 5 s: {what}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_answer_not_yet_committed_is_not_sent_again_after_a_kill() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let sim = sim::spawn(listener, SimOptions::with_key("refiner-key"))
            .await
            .expect("simulator");
        let dir = tempfile::tempdir().expect("tempdir");
        let answered = || {
            sim.state()
                .calls()
                .iter()
                .filter(|c| c.status == Some(200))
                .count()
        };

        // Refiner answers 2xx; the spool never commits the ack; the process is killed.
        let (_stop, stopped) = watch::channel(false);
        let killed = Arc::new(dispatcher(queue(false), &sim, dir.path()));
        let workers = killed.clone().start(stopped.clone());
        eventually("Refiner answered the call", || answered() == 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        for worker in workers {
            worker.abort();
        }

        // The next process leases the same event: acked without a call.
        let spool = queue(true);
        let next = Arc::new(dispatcher(spool.clone(), &sim, dir.path()));
        let _workers = next.start(stopped);
        eventually("the event acked", || {
            spool.acked.lock().expect("lock").contains(&42)
        })
        .await;
        assert_eq!(answered(), 1, "the event was sent again");
        assert_eq!(sim.state().calls().len(), 1);
    }
}
