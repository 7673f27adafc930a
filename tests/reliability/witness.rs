//! The simulator as the witness of what reached Refiner: a background task folds its call
//! log (through [`Tap`]) into per-event delivery counts, so "every event answered 200
//! reached Refiner at least once" and "how many reached it twice" are answered from
//! Refiner's side, whatever the gateway believes.
//!
//! Every repeated delivery is kept with the times of the event's first successful call, and
//! a scenario that kills the gateway marks each kill ([`Witness::before_kill`],
//! [`Witness::after_kill`]), so [`Delivered::classify`] can say, per duplicate, whether the
//! first call was in flight at a kill, was answered before a kill whose process had not yet
//! committed its ack, or was sent again by the same process (no kill involved). Times are
//! on the simulator's clock; the kill's time on that clock is estimated from the polls to
//! within about a millisecond.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use refiner_gateway::sim::{CallFilter, CallRecord, SimState};

use crate::harness::{count_status, succeeded, Tap};

/// One call as the witness keeps it: its global position and its times on the simulator's
/// clock (ms).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallTimes {
    pub seq: u64,
    pub at_ms: u64,
    pub answered_ms: u64,
}

impl CallTimes {
    fn of(call: &CallRecord, offset: u64) -> CallTimes {
        CallTimes {
            seq: offset + call.seq,
            at_ms: call.at_ms,
            answered_ms: call.answered_ms.unwrap_or(call.at_ms),
        }
    }
}

/// A successful track-event call for an event that had been delivered already.
#[derive(Debug, Clone)]
pub struct Repeat {
    pub event: String,
    /// The event's first successful call.
    pub first: CallTimes,
    /// This one.
    pub again: CallTimes,
}

/// What the witness saw around one SIGKILL.
#[derive(Debug, Clone, Default)]
pub struct KillMark {
    /// Calls received before the last poll ahead of the kill.
    pub received_before: u64,
    /// Calls in flight at that poll (global positions).
    pub in_flight: HashSet<u64>,
    /// Calls received when the killed process was gone: every later call came from a
    /// later process.
    pub boundary: u64,
    /// The moment of the SIGKILL on the simulator's clock (ms, estimated).
    pub at_ms: u64,
    /// When the next process was spawned, on the simulator's clock (ms, estimated; 0 until
    /// [`Witness::restarting`]). A call logged before it came from the killed process, even
    /// when the simulator read it from its socket only after that process was gone.
    pub spawn_ms: u64,
}

/// Why an event was delivered again, as far as the simulator's log and the kills tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    /// The simulator answered the first call after the moment of the kill: the process
    /// that sent it never saw the answer.
    InFlightAtKill,
    /// The simulator answered the first call before the moment of the kill, and a later
    /// process sent it again: the killed process had not committed its ack.
    AnsweredBeforeKill,
    /// Sent again by the same process (no kill in between), later than a lease.
    LeaseExpired,
    /// Sent again by the same process, sooner than a lease: not explained by a kill.
    SameProcess,
    /// The first call's process was killed, but the event was sent again only by a process
    /// after the next one.
    LaterProcess,
}

impl Cause {
    pub fn label(self) -> &'static str {
        match self {
            Cause::InFlightAtKill => "first call in flight at a kill",
            Cause::AnsweredBeforeKill => "first call answered before a kill, ack not committed",
            Cause::LeaseExpired => "sent again after a lease expiry, no kill",
            Cause::SameProcess => "sent again by the same process, no kill",
            Cause::LaterProcess => "sent again only by a later process",
        }
    }
}

/// One duplicate, classified.
#[derive(Debug, Clone)]
pub struct Classified {
    pub repeat: Repeat,
    pub cause: Cause,
    /// The kill that ended the first call's process, if any (index into the marks).
    pub kill: Option<usize>,
    /// For [`Cause::AnsweredBeforeKill`]: ms from the answer to the kill (estimated).
    pub answer_to_kill_ms: Option<i64>,
    /// The simulator logged the first call only after the killed process was gone (it read
    /// the request from its socket late).
    pub logged_after_kill: bool,
}

/// Per event name: successful track-event calls, and the first of them.
#[derive(Debug, Default)]
pub struct Delivered {
    /// event name → (2xx track-event calls, the first of them: global position and times)
    pub tracks: HashMap<String, (u32, CallTimes)>,
    /// Every 2xx track-event call beyond an event's first.
    pub repeats: Vec<Repeat>,
    /// Completed calls by path and status (`POST /v1/track-event 200`).
    pub by_path: BTreeMap<String, u64>,
    /// The kills marked by the scenario, in order.
    pub kills: Vec<KillMark>,
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

    /// Classifies every repeated delivery against the kills (see [`Cause`]); `lease_ms` is
    /// the gateway's lease, which separates a lease expiry from an unexplained resend.
    pub fn classify(&self, lease_ms: u64) -> Vec<Classified> {
        self.repeats
            .iter()
            .map(|repeat| {
                let first = repeat.first;
                // The kill that ended the process that made each call.
                let ended_by = |call: &CallTimes| {
                    self.kills
                        .iter()
                        .position(|k| call.seq < k.boundary || call.at_ms < k.spawn_ms)
                };
                let kill = ended_by(&first);
                let again_kill = ended_by(&repeat.again);
                let (cause, answer_to_kill_ms) = match kill {
                    Some(i) if again_kill != kill => {
                        let mark = &self.kills[i];
                        if again_kill.unwrap_or(self.kills.len()) > i + 1 {
                            (Cause::LaterProcess, None)
                        } else if first.answered_ms > mark.at_ms {
                            (Cause::InFlightAtKill, None)
                        } else {
                            (
                                Cause::AnsweredBeforeKill,
                                Some(mark.at_ms as i64 - first.answered_ms as i64),
                            )
                        }
                    }
                    _ => {
                        let waited = repeat.again.at_ms.saturating_sub(first.at_ms);
                        if waited >= lease_ms {
                            (Cause::LeaseExpired, None)
                        } else {
                            (Cause::SameProcess, None)
                        }
                    }
                };
                Classified {
                    repeat: repeat.clone(),
                    cause,
                    kill,
                    answer_to_kill_ms,
                    logged_after_kill: kill.is_some_and(|i| first.seq >= self.kills[i].boundary),
                }
            })
            .collect()
    }
}

struct Inner {
    state: Arc<SimState>,
    tap: Tap,
    /// Added to each simulator's `seq` so order stays global across simulators.
    offset: u64,
    delivered: Delivered,
    /// When the witness started; kill times are measured from here.
    started: Instant,
    /// How far the simulator's clock is ahead of `started` (a lower bound, raised by every
    /// poll: a call's time can never be later than the poll that reads it).
    sim_ahead_ms: i64,
    /// The kill under way: marked before the SIGKILL, completed after it.
    pending_kill: Option<(Instant, KillMark)>,
}

impl Inner {
    fn poll(&mut self) {
        let Inner {
            state,
            tap,
            offset,
            delivered,
            started,
            sim_ahead_ms,
            ..
        } = self;
        let offset = *offset;
        let mut latest_ms = 0;
        let in_flight = tap.poll(state, |call| {
            delivered.calls += 1;
            latest_ms = latest_ms.max(call.answered_ms.unwrap_or(call.at_ms));
            count_status(&mut delivered.statuses, call);
            let status = call
                .status
                .map_or_else(|| "dropped".to_string(), |s| s.to_string());
            *delivered
                .by_path
                .entry(format!("{} {} {status}", call.method, call.path))
                .or_default() += 1;
            if succeeded(call) && call.path == "/v1/track-event" {
                if let Some(event) = call.params["event"].as_str() {
                    let times = CallTimes::of(call, offset);
                    let entry = delivered
                        .tracks
                        .entry(event.to_string())
                        .or_insert((0, times));
                    entry.0 += 1;
                    if entry.0 > 1 {
                        delivered.repeats.push(Repeat {
                            event: event.to_string(),
                            first: entry.1,
                            again: times,
                        });
                    }
                }
            }
            if let Some(log) = delivered.log.as_mut() {
                let mut call = call.clone();
                call.seq += offset;
                log.push(call);
            }
        });
        delivered.in_flight = in_flight;
        let elapsed = started.elapsed().as_millis() as i64;
        *sim_ahead_ms = (*sim_ahead_ms).max(latest_ms as i64 - elapsed);
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
            started: Instant::now(),
            sim_ahead_ms: 0,
            pending_kill: None,
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

    /// Polls right before a SIGKILL and remembers which calls are in flight; returns how
    /// many. Call [`Witness::after_kill`] once the process is gone.
    pub fn before_kill(&self) -> usize {
        let mut inner = self.inner.lock().expect("lock");
        inner.poll();
        let offset = inner.offset;
        let received = inner.state.call_stats().total;
        // In-flight calls are recent (a few ms each); a short look back keeps this poll, and
        // so the moment of the kill, close to the poll.
        let since = received.saturating_sub(2_000);
        let in_flight: HashSet<u64> = inner
            .state
            .calls_matching(&CallFilter {
                since: Some(since),
                ..CallFilter::default()
            })
            .iter()
            .filter(|c| c.answered_ms.is_none() && c.seq < received)
            .map(|c| offset + c.seq)
            .collect();
        let count = in_flight.len();
        inner.pending_kill = Some((
            Instant::now(),
            KillMark {
                received_before: offset + received,
                in_flight,
                ..KillMark::default()
            },
        ));
        count
    }

    /// Completes the mark of [`Witness::before_kill`] once the killed process is gone.
    pub fn after_kill(&self) {
        let mut inner = self.inner.lock().expect("lock");
        inner.poll();
        let Some((killed, mut mark)) = inner.pending_kill.take() else {
            return;
        };
        mark.boundary = inner.offset + inner.state.call_stats().total;
        let since_start = killed.duration_since(inner.started).as_millis() as i64;
        mark.at_ms = (since_start + inner.sim_ahead_ms).max(0) as u64;
        inner.delivered.kills.push(mark);
    }

    /// Marks the moment the next process is spawned, after [`Witness::after_kill`].
    pub fn restarting(&self) {
        let mut inner = self.inner.lock().expect("lock");
        let since_start = inner.started.elapsed().as_millis() as i64;
        let spawn_ms = (since_start + inner.sim_ahead_ms).max(0) as u64;
        if let Some(mark) = inner.delivered.kills.last_mut() {
            mark.spawn_ms = spawn_ms;
        }
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
