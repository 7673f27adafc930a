//! The spool sampler: a background task that refreshes the gauges describing the queue as a
//! whole (`gateway_spool_depth_events`, `gateway_spool_oldest_event_age_seconds`,
//! `gateway_spool_dead_letters_events`) from [`Spool::stats`].
//!
//! Why a sampler rather than a query per scrape: a sample runs on the spool's single writer
//! (SQLite reads the per-source queue depth it keeps in its transactions, not a count of
//! the queue), so scrapes (several Prometheus replicas, a curious operator) must not decide
//! how often it happens. One sample every `spool.stats_interval_ms` (5 s by default) bounds
//! the cost; the gauges are at most that old. `gateway_spool_stats_seconds` shows what a
//! sample costs. When a sample takes
//! long, the next one waits at least [`BUSY_FACTOR`] times as long, so sampling never takes
//! more than about 2 % of the writer's time, whatever the backlog.
//!
//! Each sample also reads every source's usage for the current month ([`Spool::usage`]:
//! distinct users, events, page views) into the `gateway_usage_monthly_*` gauges; those are
//! kept counters read on a read-only connection, not counts, and a backend without usage
//! leaves the gauges out.
//!
//! A failed sample leaves the gauges as they were and is logged once per streak of
//! failures; the task ends when `shutdown` turns true, before the spool closes.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::spool::admin::SourceUsage;
use crate::spool::{Backend, SpoolStats};
use crate::telemetry::Metrics;

/// The least wait after a sample, as a multiple of the time the sample took.
pub const BUSY_FACTOR: u32 = 50;

/// How long to wait before the next sample, after one that took `took`.
pub fn next_wait(interval: Duration, took: Duration) -> Duration {
    interval.max(took * BUSY_FACTOR)
}

/// Writes one sample to the gauges; `now_ms` is the current time in ms since the epoch.
pub fn record(metrics: &Metrics, stats: &SpoolStats, now_ms: i64) {
    metrics
        .spool_depth_events
        .set(i64::try_from(stats.depth).unwrap_or(i64::MAX));
    metrics
        .spool_dead_letters_events
        .set(i64::try_from(stats.dead_letters).unwrap_or(i64::MAX));
    let age = stats
        .oldest_received_at_ms
        .map_or(0.0, |at| (now_ms - at).max(0) as f64 / 1000.0);
    metrics.spool_oldest_event_age_seconds.set(age);
}

/// Writes one source's usage for the month to the gauges.
pub fn record_usage(metrics: &Metrics, source: &str, usage: &SourceUsage) {
    let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    metrics
        .usage_monthly_users
        .with_label_values(&[source])
        .set(as_i64(usage.mtu));
    metrics
        .usage_monthly_events
        .with_label_values(&[source])
        .set(as_i64(usage.mte));
    metrics
        .usage_monthly_page_views
        .with_label_values(&[source])
        .set(as_i64(usage.mpv));
}

/// Takes one sample now and records it: the queue's statistics, then each source's usage.
/// A backend without usage counters exports none (the queue's statistics are what matter).
pub async fn sample(
    backend: &Backend,
    metrics: &Metrics,
    sources: &[String],
) -> Result<SpoolStats, String> {
    let started = Instant::now();
    let stats = backend.queue.stats().await.map_err(|e| e.to_string())?;
    metrics
        .spool_stats_seconds
        .observe(started.elapsed().as_secs_f64());
    let now_ms = chrono::Utc::now().timestamp_millis();
    record(metrics, &stats, now_ms);
    let Some(metering) = &backend.metering else {
        return Ok(stats);
    };
    for source in sources {
        match metering.usage(source, now_ms).await {
            Ok(usage) => record_usage(metrics, source, &usage),
            Err(e) => tracing::debug!(source = %source, error = %e, "no usage for the metrics"),
        }
    }
    Ok(stats)
}

/// Starts the sampler: a sample at once, then one every `interval`, until `shutdown` is
/// true. `sources` are the slugs whose usage is exported.
pub fn spawn(
    backend: Backend,
    metrics: Metrics,
    interval: Duration,
    sources: Vec<String>,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let interval = interval.max(Duration::from_millis(10));
    tokio::spawn(async move {
        let mut failing = false;
        loop {
            if *shutdown.borrow() {
                break;
            }
            let started = Instant::now();
            match sample(&backend, &metrics, &sources).await {
                Ok(_) => {
                    if failing {
                        tracing::info!("sampling the spool works again");
                    }
                    failing = false;
                }
                Err(e) => {
                    // Once per failure streak: a broken disk must not flood the log.
                    if !failing {
                        tracing::warn!(error = %e, "sampling the spool failed; gauges keep their last values");
                    }
                    failing = true;
                }
            }
            let wait = next_wait(interval, started.elapsed());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => {}
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_sample_stretches_the_interval() {
        let interval = Duration::from_secs(5);
        assert_eq!(next_wait(interval, Duration::from_millis(2)), interval);
        assert_eq!(
            next_wait(interval, Duration::from_millis(300)),
            Duration::from_secs(15)
        );
    }

    #[test]
    fn records_depth_age_and_dead_letters() {
        let metrics = Metrics::new();
        let stats = SpoolStats {
            depth: 7,
            oldest_received_at_ms: Some(1_000),
            dead_letters: 3,
        };
        record(&metrics, &stats, 3_500);
        assert_eq!(metrics.spool_depth_events.get(), 7);
        assert_eq!(metrics.spool_dead_letters_events.get(), 3);
        assert!((metrics.spool_oldest_event_age_seconds.get() - 2.5).abs() < 1e-9);
        // An empty queue has no age; a clock behind the event's arrival gives 0, not < 0.
        record(&metrics, &SpoolStats::default(), 3_500);
        assert_eq!(metrics.spool_oldest_event_age_seconds.get(), 0.0);
        let stats = SpoolStats {
            oldest_received_at_ms: Some(9_000),
            ..SpoolStats::default()
        };
        record(&metrics, &stats, 3_500);
        assert_eq!(metrics.spool_oldest_event_age_seconds.get(), 0.0);
    }
}
