//! The call log: every request the simulator received outside `/_sim`, in order of receipt.
//!
//! A call is logged when its body has been read and parsed (that is its `at_ms`, measured
//! from start or the last reset) and completed when it is answered or dropped. Order in the
//! log is order of receipt, which is what per-user ordering checks need. The log keeps the
//! most recent `capacity` calls; older ones are evicted and counted, while the totals in
//! [`CallStats`] stay exact, so a long benchmark does not grow memory without bound.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::faults::Fault;
use super::params::AuthMethod;

/// One request as the simulator saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRecord {
    /// Position in order of receipt, from 0 (reset restarts it).
    pub seq: u64,
    /// When the call was received, ms since start or the last reset.
    pub at_ms: u64,
    /// When it was answered or dropped; `None` while in flight.
    pub answered_ms: Option<u64>,
    pub method: String,
    pub path: String,
    /// Query string and body merged (body wins), `api_key` removed; `null` if unparseable.
    pub params: Value,
    /// The `id` parameter, else `email`: the user the call is about.
    pub user: Option<String>,
    pub auth: AuthMethod,
    pub auth_ok: bool,
    /// The position in the simulator's `api_keys` of the key that authenticated the call
    /// (`None` when refused, or when any key is accepted): which Refiner environment the
    /// call was made for, without recording the key.
    #[serde(default)]
    pub key_index: Option<usize>,
    /// The fault injected into this call, if any.
    pub fault: Option<Fault>,
    /// The status answered; `None` if dropped or still in flight.
    pub status: Option<u16>,
    /// The connection was closed without an answer.
    pub dropped: bool,
}

/// Which calls to return.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct CallFilter {
    /// Only calls with `seq >= since`.
    pub since: Option<u64>,
    /// Only calls about this user (`id`, else `email`).
    pub user: Option<String>,
    /// Only calls to this path (e.g. `/v1/track-event`).
    pub path: Option<String>,
    /// At most this many (the earliest that match).
    pub limit: Option<usize>,
}

/// Exact counters, unaffected by eviction.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CallStats {
    /// Calls received.
    pub total: u64,
    /// Calls evicted from the log.
    pub evicted: u64,
    /// Completed calls by status (`"200"`, `"429"`, ...) and `"dropped"`.
    pub by_status: BTreeMap<String, u64>,
    /// Calls that were received with a valid key.
    pub authenticated: u64,
}

#[derive(Debug)]
pub struct CallLog {
    epoch: Instant,
    capacity: usize,
    entries: VecDeque<CallRecord>,
    /// `seq` of `entries[0]`.
    first_seq: u64,
    stats: CallStats,
}

impl CallLog {
    pub fn new(capacity: usize) -> CallLog {
        CallLog {
            epoch: Instant::now(),
            capacity: capacity.max(1),
            entries: VecDeque::new(),
            first_seq: 0,
            stats: CallStats::default(),
        }
    }

    /// Milliseconds since start or the last reset.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Logs a received call; its `seq` and `at_ms` are assigned here. Returns `(seq, at_ms)`.
    pub fn begin(&mut self, mut record: CallRecord) -> (u64, u64) {
        let seq = self.stats.total;
        let at_ms = self.now_ms();
        record.seq = seq;
        record.at_ms = at_ms;
        self.stats.total += 1;
        if record.auth_ok {
            self.stats.authenticated += 1;
        }
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
            self.first_seq += 1;
            self.stats.evicted += 1;
        }
        self.entries.push_back(record);
        (seq, at_ms)
    }

    /// Completes a call: `status` answered, or `None` when the connection was dropped.
    pub fn finish(&mut self, seq: u64, status: Option<u16>) {
        let answered_ms = self.now_ms();
        let key = match status {
            Some(code) => code.to_string(),
            None => "dropped".to_owned(),
        };
        *self.stats.by_status.entry(key).or_insert(0) += 1;
        let Some(index) = seq.checked_sub(self.first_seq) else {
            return;
        };
        let Some(record) = usize::try_from(index)
            .ok()
            .and_then(|i| self.entries.get_mut(i))
        else {
            return;
        };
        record.answered_ms = Some(answered_ms);
        record.status = status;
        record.dropped = status.is_none();
    }

    /// The retained calls that match, in order of receipt.
    pub fn select(&self, filter: &CallFilter) -> Vec<CallRecord> {
        let skip = filter
            .since
            .map(|since| since.saturating_sub(self.first_seq))
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0);
        self.entries
            .iter()
            .skip(skip)
            .filter(|c| filter.user.is_none() || c.user == filter.user)
            .filter(|c| filter.path.as_deref().is_none_or(|p| c.path == p))
            .take(filter.limit.unwrap_or(usize::MAX))
            .cloned()
            .collect()
    }

    pub fn stats(&self) -> CallStats {
        self.stats.clone()
    }

    /// Forgets everything and restarts the clock.
    pub fn reset(&mut self) {
        *self = CallLog::new(self.capacity);
    }
}
