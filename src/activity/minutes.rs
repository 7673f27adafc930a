//! Per-source counts of the last hour, minute by minute, and recent Refiner latencies, in
//! memory, for the console's overview (`GET /api/overview`).
//!
//! Invariants:
//! - Bounded: per source, [`MINUTES`] minutes of counters (a ring indexed by minute) and
//!   the last [`LATENCY_SAMPLES`] latencies. Skip reasons are the dispatcher's few fixed
//!   ones.
//! - Since the process started: a restart begins an empty hour (the hourly counters of
//!   the management API keep the long history).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

/// Minutes kept.
pub const MINUTES: usize = 60;
/// Latencies kept per source for the percentiles.
pub const LATENCY_SAMPLES: usize = 1024;
const MINUTE_MS: i64 = 60_000;

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Received,
    Forwarded,
    Retried,
    Dead,
}

/// One minute of a source.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Minute {
    /// Minutes since the epoch.
    pub minute: i64,
    pub received: u64,
    pub forwarded: u64,
    pub skipped: BTreeMap<String, u64>,
    pub retried: u64,
    pub dead: u64,
}

#[derive(Default)]
struct SourceActivity {
    /// Oldest first; at most [`MINUTES`], each a distinct minute.
    minutes: VecDeque<Minute>,
    latencies: VecDeque<u32>,
}

impl SourceActivity {
    fn minute(&mut self, minute: i64) -> &mut Minute {
        let current = self.minutes.back().map(|m| m.minute);
        if current.is_none_or(|m| m < minute) {
            self.minutes.push_back(Minute {
                minute,
                ..Minute::default()
            });
            while self.minutes.len() > MINUTES {
                self.minutes.pop_front();
            }
        }
        // A count for an earlier minute (a late settlement) goes to the newest one.
        let last = self.minutes.len() - 1;
        &mut self.minutes[last]
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

/// The counters of every source.
#[derive(Default)]
pub struct Minutes {
    sources: Mutex<HashMap<String, SourceActivity>>,
}

impl Minutes {
    fn with<T>(&self, source: &str, work: impl FnOnce(&mut SourceActivity) -> T) -> Option<T> {
        let mut sources = self.sources.lock().ok()?;
        if let Some(activity) = sources.get_mut(source) {
            return Some(work(activity));
        }
        Some(work(sources.entry(source.to_string()).or_default()))
    }

    pub fn count(&self, source: &str, at_ms: i64, counter: Counter, n: u64) {
        if n == 0 {
            return;
        }
        self.with(source, |a| {
            let m = a.minute(at_ms.div_euclid(MINUTE_MS));
            match counter {
                Counter::Received => m.received += n,
                Counter::Forwarded => m.forwarded += n,
                Counter::Retried => m.retried += n,
                Counter::Dead => m.dead += n,
            }
        });
    }

    pub fn skipped(&self, source: &str, at_ms: i64, reason: &str) {
        self.with(source, |a| {
            let m = a.minute(at_ms.div_euclid(MINUTE_MS));
            *m.skipped.entry(reason.to_string()).or_default() += 1;
        });
    }

    pub fn latency(&self, source: &str, ms: u64) {
        self.with(source, |a| {
            if a.latencies.len() == LATENCY_SAMPLES {
                a.latencies.pop_front();
            }
            a.latencies.push_back(ms.min(u64::from(u32::MAX)) as u32);
        });
    }

    /// The last hour of `source` up to `now_ms`, one entry per minute, oldest first
    /// (minutes without activity are zero).
    pub fn last_hour(&self, source: &str, now_ms: i64) -> Vec<Minute> {
        let now = now_ms.div_euclid(MINUTE_MS);
        let kept: HashMap<i64, Minute> = self
            .with(source, |a| {
                a.minutes.iter().map(|m| (m.minute, m.clone())).collect()
            })
            .unwrap_or_default();
        (now - MINUTES as i64 + 1..=now)
            .map(|minute| {
                kept.get(&minute).cloned().unwrap_or(Minute {
                    minute,
                    ..Minute::default()
                })
            })
            .collect()
    }

    /// Percentiles of the recent latencies of `source`, `None` before any call.
    pub fn percentiles(&self, source: &str) -> Option<Percentiles> {
        let mut samples: Vec<u32> = self
            .with(source, |a| a.latencies.iter().copied().collect())
            .unwrap_or_default();
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let at = |q: f64| {
            let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
            f64::from(samples[i])
        };
        Some(Percentiles {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_hour_is_sixty_minutes_oldest_first() {
        let m = Minutes::default();
        let t0 = 1_000 * MINUTE_MS;
        m.count("web", t0, Counter::Received, 3);
        m.count("web", t0 + MINUTE_MS, Counter::Forwarded, 2);
        m.skipped("web", t0 + MINUTE_MS, "alias");
        let hour = m.last_hour("web", t0 + MINUTE_MS);
        assert_eq!(hour.len(), MINUTES);
        assert_eq!(hour[58].received, 3);
        assert_eq!(hour[59].forwarded, 2);
        assert_eq!(hour[59].skipped["alias"], 1);
        // Two hours later the ring has rolled over.
        m.count("web", t0 + 120 * MINUTE_MS, Counter::Received, 1);
        let later = m.last_hour("web", t0 + 120 * MINUTE_MS);
        assert_eq!(later.iter().map(|x| x.received).sum::<u64>(), 1);
        assert!(m.last_hour("other", t0).iter().all(|x| x.received == 0));
    }

    #[test]
    fn percentiles_of_recent_latencies() {
        let m = Minutes::default();
        assert!(m.percentiles("web").is_none());
        for ms in 1..=100 {
            m.latency("web", ms);
        }
        let p = m.percentiles("web").expect("samples");
        assert_eq!((p.p50, p.p90, p.p99), (50.0, 90.0, 99.0));
    }
}
