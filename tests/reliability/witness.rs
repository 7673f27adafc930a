//! The simulator as the witness of what reached Refiner: a background task folds its call
//! log (through [`Tap`]) into per-event delivery counts, so "every event answered 200
//! reached Refiner at least once" and "how many reached it twice" are answered from
//! Refiner's side, whatever the gateway believes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use refiner_gateway::sim::{CallRecord, SimState};

use crate::harness::{count_status, succeeded, Tap};

/// Per event name: successful track-event calls, and the (global) position of the first.
#[derive(Debug, Default)]
pub struct Delivered {
    /// event name → (2xx track-event calls, order of the first of them)
    pub tracks: HashMap<String, (u32, u64)>,
    /// Every completed call by status (`dropped` for dropped connections).
    pub statuses: BTreeMap<String, u64>,
    /// Completed calls.
    pub calls: u64,
    /// Calls in flight at the last poll.
    pub in_flight: usize,
    /// Every completed call, when asked for (small runs only).
    pub log: Option<Vec<CallRecord>>,
}

impl Delivered {
    /// Successful calls beyond the first, over all events.
    pub fn duplicates(&self) -> u64 {
        self.tracks
            .values()
            .map(|(count, _)| u64::from(count.saturating_sub(1)))
            .sum()
    }

    pub fn contains(&self, event: &str) -> bool {
        self.tracks.contains_key(event)
    }
}

struct Inner {
    state: Arc<SimState>,
    tap: Tap,
    /// Added to each simulator's `seq` so order stays global across simulators.
    offset: u64,
    delivered: Delivered,
}

impl Inner {
    fn poll(&mut self) {
        let Inner {
            state,
            tap,
            offset,
            delivered,
        } = self;
        let offset = *offset;
        let in_flight = tap.poll(state, |call| {
            delivered.calls += 1;
            count_status(&mut delivered.statuses, call);
            if succeeded(call) && call.path == "/v1/track-event" {
                if let Some(event) = call.params["event"].as_str() {
                    let entry = delivered
                        .tracks
                        .entry(event.to_string())
                        .or_insert((0, offset + call.seq));
                    entry.0 += 1;
                }
            }
            if let Some(log) = delivered.log.as_mut() {
                let mut call = call.clone();
                call.seq += offset;
                log.push(call);
            }
        });
        delivered.in_flight = in_flight;
    }
}

/// A running witness; polls every 100 ms until dropped.
#[derive(Clone)]
pub struct Witness {
    inner: Arc<Mutex<Inner>>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl Drop for Witness {
    fn drop(&mut self) {
        if Arc::strong_count(&self.task) == 1 {
            self.task.abort();
        }
    }
}

impl Witness {
    /// Watches `state`; with `keep_log`, also keeps every call (for timing checks).
    pub fn start(state: Arc<SimState>, keep_log: bool) -> Witness {
        let inner = Arc::new(Mutex::new(Inner {
            state,
            tap: Tap::default(),
            offset: 0,
            delivered: Delivered {
                log: keep_log.then(Vec::new),
                ..Delivered::default()
            },
        }));
        let polled = inner.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                polled.lock().expect("lock").poll();
            }
        });
        Witness {
            inner,
            task: Arc::new(task),
        }
    }

    /// Polls now; returns the calls in flight at the simulator.
    pub fn poll(&self) -> usize {
        let mut inner = self.inner.lock().expect("lock");
        inner.poll();
        inner.delivered.in_flight
    }

    /// Reads what was delivered so far (polling first).
    pub fn with<T>(&self, read: impl FnOnce(&Delivered) -> T) -> T {
        let mut inner = self.inner.lock().expect("lock");
        inner.poll();
        read(&inner.delivered)
    }

    /// Switches to a new simulator (the old one's calls are read first).
    pub fn replace(&self, state: Arc<SimState>) {
        let mut inner = self.inner.lock().expect("lock");
        inner.poll();
        let total = inner.state.call_stats().total;
        inner.offset += total;
        inner.tap.reset();
        inner.state = state;
    }

    /// Stops polling and hands over what was delivered.
    pub fn finish(self) -> Delivered {
        self.task.abort();
        let mut inner = self.inner.lock().expect("lock");
        inner.poll();
        std::mem::take(&mut inner.delivered)
    }
}
