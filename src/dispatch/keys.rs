//! What delivery knows per Refiner API key and per source: pauses and warnings.
//!
//! - A 429 with `Retry-After` pauses the API key until then (every source sharing it).
//! - A 401 or 403 means Refiner refuses the key itself (rotated, revoked, mistyped): every
//!   call with it would fail the same way, and dead-lettering the traffic would lose it in
//!   all but name. So the source is paused instead: its events stay queued, untouched
//!   (no attempt counted), an error naming the source (never the key) is logged once, and
//!   `gateway_dispatch_key_paused{source}` is 1. Every `recheck` one call is let through:
//!   a 2xx resumes delivery (so a key fixed on Refiner's side resumes by itself); a restart
//!   with a corrected key starts unpaused.
//! - Failed calls are logged as warnings at most once per [`WARN_EVERY`] for each source,
//!   endpoint and kind of failure, with how many were not logged meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::telemetry::Metrics;

/// One warning per source, endpoint and failure kind per this long.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// Whether a source may send now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Deliver.
    Open,
    /// Paused: postpone until this time (ms since the epoch).
    Paused { until_ms: i64 },
    /// Paused, and this call is the recheck.
    Recheck,
}

#[derive(Debug, Clone, Copy)]
struct AuthPause {
    /// When the next recheck may go (ms).
    recheck_at: i64,
    /// A recheck call is in flight.
    checking: bool,
}

/// Per-key and per-source delivery state.
pub struct Keys {
    metrics: Metrics,
    recheck_ms: i64,
    rate_limit_per_sec: u32,
    /// API keys paused by a 429 with Retry-After, until (ms).
    throttled: DashMap<String, i64>,
    /// Sources whose key Refiner refused.
    refused: DashMap<String, AuthPause>,
    /// Static requests-per-second limit per API key, when configured.
    rate_limits: DashMap<String, Arc<DefaultDirectRateLimiter>>,
    /// Last warning per (source, endpoint, kind), and the failures not logged since.
    warned: DashMap<(String, &'static str, String), (Instant, u64)>,
}

impl Keys {
    pub fn new(metrics: Metrics, recheck: Duration, rate_limit_per_sec: u32) -> Keys {
        Keys {
            metrics,
            recheck_ms: recheck.as_millis().max(1) as i64,
            rate_limit_per_sec,
            throttled: DashMap::new(),
            refused: DashMap::new(),
            rate_limits: DashMap::new(),
            warned: DashMap::new(),
        }
    }

    /// Whether `source` may send a call now (see [`Gate`]).
    pub fn gate(&self, source: &str, now: i64) -> Gate {
        let Some(mut pause) = self.refused.get_mut(source) else {
            return Gate::Open;
        };
        if pause.checking || now < pause.recheck_at {
            return Gate::Paused {
                until_ms: pause.recheck_at.max(now + 1_000),
            };
        }
        pause.checking = true;
        Gate::Recheck
    }

    /// Refiner refused `source`'s key (401/403): pause the source.
    pub fn refused(&self, source: &str, status: u16, endpoint: &str, now: i64) {
        let recheck_at = now + self.recheck_ms;
        let first = self
            .refused
            .insert(
                source.to_owned(),
                AuthPause {
                    recheck_at,
                    checking: false,
                },
            )
            .is_none();
        self.metrics
            .dispatch_key_paused
            .with_label_values(&[source])
            .set(1);
        if first {
            tracing::error!(
                source,
                status,
                endpoint,
                recheck_secs = self.recheck_ms / 1000,
                "Refiner refused the API key of this source; its delivery is paused and its \
                 events are kept. Fix the key (refiner_api_key) and restart, or delivery \
                 resumes by itself once a recheck call succeeds"
            );
        }
    }

    /// A call of `source` went through (any answer but 401/403): the key works.
    pub fn accepted(&self, source: &str) {
        if self.refused.remove(source).is_some() {
            self.metrics
                .dispatch_key_paused
                .with_label_values(&[source])
                .set(0);
            tracing::info!(
                source,
                "Refiner accepts the API key again; delivery resumed"
            );
        }
    }

    /// A recheck call made no call after all (nothing to send): let the next one go.
    pub fn recheck_abandoned(&self, source: &str) {
        if let Some(mut pause) = self.refused.get_mut(source) {
            pause.checking = false;
        }
    }

    /// Pauses `api_key` after a 429 with `Retry-After`.
    pub fn throttle(&self, api_key: &str, until_ms: i64) {
        self.throttled.insert(api_key.to_owned(), until_ms);
    }

    /// Whether a 429's Retry-After still pauses this key.
    pub fn throttled(&self, api_key: &str, now: i64) -> bool {
        self.throttled
            .get(api_key)
            .is_some_and(|until| *until > now)
    }

    /// Honours a 429's pause of this key and the static rate limit.
    pub async fn wait_for(&self, api_key: &str, now: i64) {
        let until = self.throttled.get(api_key).map(|u| *u);
        if let Some(until) = until {
            let wait = until - now;
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait as u64)).await;
            }
        }
        if let Some(per_sec) = std::num::NonZeroU32::new(self.rate_limit_per_sec) {
            let limiter = self
                .rate_limits
                .entry(api_key.to_owned())
                .or_insert_with(|| Arc::new(RateLimiter::direct(Quota::per_second(per_sec))))
                .clone();
            limiter.until_ready().await;
        }
    }

    /// Logs a failed call as a warning, at most once per [`WARN_EVERY`] per source,
    /// endpoint and kind (`kind` is the status or `timeout` / `connection`).
    pub fn warn_failure(&self, source: &str, endpoint: &'static str, kind: &str, detail: &str) {
        let key = (source.to_owned(), endpoint, kind.to_owned());
        let now = Instant::now();
        let suppressed = {
            let mut entry = self.warned.entry(key).or_insert((now - WARN_EVERY * 2, 0));
            let (last, skipped) = *entry;
            if now.duration_since(last) < WARN_EVERY {
                entry.1 += 1;
                return;
            }
            *entry = (now, 0);
            skipped
        };
        tracing::warn!(
            source,
            endpoint,
            kind,
            suppressed,
            detail = %truncate(detail, 200),
            "a Refiner call failed"
        );
    }
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((at, _)) => &text[..at],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new(Metrics::new(), Duration::from_secs(60), 0)
    }

    #[test]
    fn a_refused_key_pauses_its_source_until_a_recheck_succeeds() {
        let keys = keys();
        assert_eq!(keys.gate("web", 0), Gate::Open);
        keys.refused("web", 401, "track_event", 1_000);
        assert_eq!(keys.gate("web", 2_000), Gate::Paused { until_ms: 61_000 });
        assert_eq!(keys.gate("app", 2_000), Gate::Open, "other sources go on");
        assert_eq!(keys.gate("web", 61_000), Gate::Recheck);
        assert!(
            matches!(keys.gate("web", 61_000), Gate::Paused { .. }),
            "one recheck at a time"
        );
        keys.accepted("web");
        assert_eq!(keys.gate("web", 61_001), Gate::Open);
    }

    #[test]
    fn a_failed_recheck_pauses_again() {
        let keys = keys();
        keys.refused("web", 403, "identify_user", 0);
        assert_eq!(keys.gate("web", 60_000), Gate::Recheck);
        keys.refused("web", 403, "identify_user", 60_000);
        assert_eq!(keys.gate("web", 60_001), Gate::Paused { until_ms: 120_000 });
        keys.recheck_abandoned("web");
        assert_eq!(keys.gate("web", 120_000), Gate::Recheck);
    }

    #[test]
    fn the_pause_shows_in_the_gauge() {
        let keys = keys();
        keys.refused("web", 401, "track_event", 0);
        let gauge = || {
            keys.metrics
                .dispatch_key_paused
                .with_label_values(&["web"])
                .get()
        };
        assert_eq!(gauge(), 1);
        keys.accepted("web");
        assert_eq!(gauge(), 0);
    }
}
