//! Delivery: lease → map → coalesce → send → settle.
//!
//! `workers` loops each lease a batch from the spool, group it by (source, user) and deliver
//! each user's events (`chain.rs`: plan → send → apply), users concurrently, within the
//! adaptive concurrency limit. Outcomes are settled as they come: before each of a user's
//! steps, and when the user's run ends.
//!
//! Guarantees:
//! - Per-user order: a user's identify-user and delete-contact calls are never in flight
//!   beside another call of the user, so they never overtake each other or what came
//!   before them; a user's consecutive track-event calls may be in flight together, up to
//!   `per_user_window` (1: strictly one call at a time). When one fails transiently, no
//!   later call of the user starts: the rest of the batch is released unsent, and the
//!   spool does not lease the user again before the failed one's retry time. A
//!   dead-lettered event does not hold its user.
//! - Refused keys: a 401/403 pauses the source (`keys.rs`) and keeps its events queued;
//!   it never dead-letters them.
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
mod chain;
mod journal;
mod keys;
mod limiter;
mod observe;
pub mod routing;
mod segments;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::watch;

use crate::activity::Activity;
use crate::config::{DeliverySettings, EngageSettings, SourceSettings};
use crate::refiner::client::RefinerClient;
use crate::refiner::mapping::MappingOptions;
use crate::segment::HoldKey;
use crate::spool::{Leased, Settlement, Spool};
use crate::telemetry::Metrics;
use breaker::{Admit, Breaker};
use keys::Keys;
use limiter::Limiter;
use routing::{Routing, SharedRouting};

pub use journal::Journal;
use journal::Ticket;

/// Everything delivery needs.
pub struct Dispatcher {
    spool: Arc<dyn Spool>,
    client: RefinerClient,
    /// API keys, environments, rules and mapping options, swapped whole on reload.
    routing: Arc<SharedRouting>,
    settings: DeliverySettings,
    metrics: Metrics,
    limiter: Limiter,
    breaker: Breaker,
    /// Last delivered ping per (source, user), in ms.
    pings: DashMap<HoldKey, i64>,
    /// Pauses (a 429's Retry-After per key, a refused key per source), rate limits and
    /// rate-limited warnings.
    gates: Keys,
    /// Where 2xx answers are recorded before their ack is committed (SQLite spool only).
    journal: Option<Arc<Journal>>,
    /// Workers still running; the last one to stop clears the journal.
    running: AtomicUsize,
    /// The Refiner manual segment of each Engage audience that syncs to one.
    segments: segments::Segments,
    /// The console's live feed and per-minute counts.
    activity: Arc<Activity>,
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
        let routing = Arc::new(SharedRouting::new(Routing::without_rules(sources, mapping)));
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
        let gates = Keys::new(
            metrics.clone(),
            Duration::from_secs(settings.auth_recheck_secs.max(1)),
            settings.rate_limit_per_sec,
        );
        Dispatcher {
            spool,
            client,
            routing,
            settings,
            metrics,
            limiter,
            breaker,
            pings: DashMap::new(),
            gates,
            journal: None,
            running: AtomicUsize::new(0),
            segments: segments::Segments::new(&EngageSettings::default()),
            activity: Arc::new(Activity::default()),
        }
    }

    /// Syncs Engage audiences to Refiner manual segments as `engage` says (by default none
    /// does: memberships reach Refiner as contact attributes only).
    pub fn with_engage(mut self, engage: &EngageSettings) -> Dispatcher {
        self.segments = segments::Segments::new(engage);
        self
    }

    /// Delivers under `routing` (shared with the reload and preview routes) instead of the
    /// sources' keys alone.
    pub fn with_routing(mut self, routing: Arc<SharedRouting>) -> Dispatcher {
        self.routing = routing;
        self
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
                    // Lease nothing, but let the spool move the events that arrived for
                    // held users aside meanwhile, so the probe finds a free user's event
                    // at once instead of reading through them first.
                    if let Err(e) = self.spool.lease(0, lease_ms).await {
                        tracing::debug!(error = %e, "advancing the spool's lease cursor failed");
                    }
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
        let mut index: HashMap<HoldKey, usize> = HashMap::new();
        for event in batch {
            let key = HoldKey::new(&event.source, &event.user_key);
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

    fn count_events(&self, source: &str, outcome: &str, n: usize) {
        self.metrics
            .dispatch_events_total
            .with_label_values(&[source, outcome])
            .inc_by(n as u64);
        self.count_activity(source, outcome, n);
    }

    fn skip(&self, source: &str, reason: &str) {
        self.count_skip(source, reason);
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
    use crate::segment::{EventType, UserKey};
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
                kind: EventType::Track,
                user_key: UserKey::user_id("u1"),
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
