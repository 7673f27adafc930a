//! A Refiner REST API simulator, to test the gateway's delivery against.
//!
//! It serves Refiner's `/v1` routes that the gateway uses or may use (`identify-user`,
//! `track-event`, `contacts`, `contact` GET/DELETE, `account`, and the root), with Refiner's
//! three ways of authenticating and its `{"error": "..."}` refusals, and keeps the contacts,
//! accounts and events those calls create in memory. See `docs/refiner-sim.md`.
//!
//! Invariants:
//! - Every request outside `/_sim` is in the call log, in order of receipt, with the status
//!   it was answered (or `dropped`); the counters in [`CallStats`] are exact even when old
//!   entries have been evicted.
//! - Faults ([`Faults`]) apply only to `/v1` calls and are decided when a call is received;
//!   a faulted call changes no state, except drop-after, which is handled and then dropped.
//! - The `/_sim` control routes are never faulted, never logged, and need no key.
//! - Handlers take each lock once, briefly, never two at a time (only [`SimState::reset`]
//!   and the logging step nest them, always in the order calls → faults → store), and do
//!   no scan over contacts on the identify/track path.

pub mod calls;
mod error;
pub mod faults;
pub mod params;
mod routes;
mod segments;
pub mod store;

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use actix_web::dev::ServerHandle;
use actix_web::{web, App, HttpServer};
use serde::{Deserialize, Serialize};

pub use calls::{CallFilter, CallRecord, CallStats};
pub use error::SimError;
pub use faults::{Fault, Faults, FaultsError};
pub use params::AuthMethod;
pub use segments::{SegmentSpec, SegmentView};
pub use store::{AccountView, ContactView, EventRecord, LongStrings, StateSnapshot, TraitType};

use calls::CallLog;
use faults::FaultPlan;
use params::KeySet;
use store::Store;

/// Default number of calls (and of events) the simulator keeps for inspection.
pub const DEFAULT_LOG_CAPACITY: usize = 100_000;

/// How to run a simulator.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Accepted API keys. Empty: any non-empty key is accepted (a key is still required).
    pub api_keys: Vec<String>,
    /// Faults at start, and again after each reset.
    pub faults: Faults,
    /// What to do with string traits over 255 characters (default: refuse with 400).
    pub long_strings: LongStrings,
    /// How many calls, and how many events, to keep for inspection (oldest evicted first).
    pub log_capacity: usize,
    /// HTTP worker threads; `None` is actix-web's default (one per physical core).
    pub workers: Option<usize>,
    /// Segments at start, and again after each reset (`GET /segments`, `/sync-segment`).
    pub segments: Vec<SegmentSpec>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            api_keys: Vec::new(),
            faults: Faults::none(),
            long_strings: LongStrings::Reject,
            log_capacity: DEFAULT_LOG_CAPACITY,
            workers: None,
            segments: Vec::new(),
        }
    }
}

impl SimOptions {
    /// Defaults, accepting exactly `key`.
    pub fn with_key(key: impl Into<String>) -> SimOptions {
        SimOptions {
            api_keys: vec![key.into()],
            ..SimOptions::default()
        }
    }
}

/// Counters for a quick look (`GET /_sim/stats`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimStats {
    pub calls: CallStats,
    pub contacts: u64,
    pub accounts: u64,
    pub events_total: u64,
}

/// The simulator's shared state, for in-process inspection and control.
#[derive(Debug)]
pub struct SimState {
    options: SimOptions,
    keys: KeySet,
    environment_uuid: String,
    store: Mutex<Store>,
    calls: Mutex<CallLog>,
    faults: Mutex<FaultPlan>,
}

/// A store holding the given segments.
fn seeded(mut store: Store, segments: &[SegmentSpec]) -> Store {
    for spec in segments {
        store.define_segment(spec.clone());
    }
    store
}

/// Locks a mutex, ignoring poisoning: a panicking handler leaves plain data behind, and
/// a test tool should keep answering rather than cascade the panic.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SimState {
    /// A fresh state; fails if the faults are invalid.
    pub fn new(options: SimOptions) -> Result<SimState, FaultsError> {
        options.faults.validate()?;
        Ok(SimState {
            keys: KeySet::new(&options.api_keys),
            environment_uuid: uuid::Uuid::new_v4().to_string(),
            store: Mutex::new(seeded(Store::new(options.log_capacity), &options.segments)),
            calls: Mutex::new(CallLog::new(options.log_capacity)),
            faults: Mutex::new(FaultPlan::new(options.faults.clone())),
            options,
        })
    }

    /// Every retained call, in order of receipt.
    pub fn calls(&self) -> Vec<CallRecord> {
        self.calls_matching(&CallFilter::default())
    }

    /// The retained calls that match `filter`, in order of receipt.
    pub fn calls_matching(&self, filter: &CallFilter) -> Vec<CallRecord> {
        lock(&self.calls).select(filter)
    }

    /// Exact call counters.
    pub fn call_stats(&self) -> CallStats {
        lock(&self.calls).stats()
    }

    /// Call counters and the sizes of the store.
    pub fn stats(&self) -> SimStats {
        let calls = self.call_stats();
        let (contacts, accounts, usage) = {
            let store = lock(&self.store);
            let (contacts, accounts) = store.counts();
            (contacts, accounts, store.usage())
        };
        SimStats {
            calls,
            contacts,
            accounts,
            events_total: usage.events_total,
        }
    }

    /// Contacts, accounts and retained events.
    pub fn snapshot(&self) -> StateSnapshot {
        lock(&self.store).snapshot()
    }

    /// A contact by `id`, else by email.
    pub fn contact(&self, id_or_email: &str) -> Option<ContactView> {
        let store = lock(&self.store);
        store
            .find_user(id_or_email)
            .and_then(|seq| store.contact_view(seq))
    }

    /// An account by its `id`.
    pub fn account(&self, id: &str) -> Option<AccountView> {
        lock(&self.store).account(id)
    }

    /// The fault configuration, with the counts still to fire.
    pub fn faults(&self) -> Faults {
        lock(&self.faults).current().clone()
    }

    /// Replaces the fault configuration (counts and generator start afresh).
    pub fn set_faults(&self, faults: Faults) -> Result<(), FaultsError> {
        faults.validate()?;
        *lock(&self.faults) = FaultPlan::new(faults);
        Ok(())
    }

    /// Forgets calls, contacts, accounts and events, restarts the clock, and restores the
    /// faults the simulator was started with.
    pub fn reset(&self) {
        let mut calls = lock(&self.calls);
        let mut faults = lock(&self.faults);
        let mut store = lock(&self.store);
        calls.reset();
        *faults = FaultPlan::new(self.options.faults.clone());
        store.reset();
        for spec in &self.options.segments {
            store.define_segment(spec.clone());
        }
    }

    /// Defines a segment (as Refiner's dashboard would); returns its uuid. Forgotten at
    /// reset, unlike [`SimOptions::segments`].
    pub fn define_segment(&self, spec: SegmentSpec) -> String {
        lock(&self.store).define_segment(spec)
    }
}

/// A running simulator.
#[derive(Debug)]
pub struct SimHandle {
    port: u16,
    host: IpAddr,
    state: Arc<SimState>,
    server: ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl SimHandle {
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The API base URL to configure a client with: `http://127.0.0.1:PORT/v1`.
    pub fn url(&self) -> String {
        format!("{}/v1", self.base_url())
    }

    /// The server root, where `/_sim` lives: `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        match self.host {
            IpAddr::V4(ip) => format!("http://{ip}:{}", self.port),
            IpAddr::V6(ip) => format!("http://[{ip}]:{}", self.port),
        }
    }

    /// The shared state, for in-process inspection and control.
    pub fn state(&self) -> Arc<SimState> {
        self.state.clone()
    }

    /// Stops accepting, lets in-flight calls finish (up to 1 s), and waits for the server.
    pub async fn stop(self) {
        self.server.stop(true).await;
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "refiner simulator ended with an error"),
            Err(e) => tracing::warn!(error = %e, "refiner simulator task failed"),
        }
    }
}

/// Starts a simulator on `listener`, served by a task on the current tokio runtime.
///
/// The server does not handle signals itself; stop it with [`SimHandle::stop`].
pub async fn spawn(listener: TcpListener, options: SimOptions) -> std::io::Result<SimHandle> {
    let address = listener.local_addr()?;
    let host = match address.ip() {
        ip if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        ip => ip,
    };
    let workers = options.workers;
    let state = Arc::new(
        SimState::new(options)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
    );
    let data = web::Data::from(state.clone());
    let mut server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .configure(routes::configure)
    })
    .disable_signals()
    .shutdown_timeout(1);
    if let Some(workers) = workers {
        server = server.workers(workers.max(1));
    }
    let server = server.listen(listener)?.run();
    let handle = server.handle();
    let task = tokio::spawn(server);
    Ok(SimHandle {
        port: address.port(),
        host,
        state,
        server: handle,
        task,
    })
}
