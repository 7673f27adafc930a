//! Logging and metrics.
//!
//! Logs go through `tracing`: JSON lines when `GATEWAY_LOG_FORMAT=json` (production),
//! human-readable otherwise; the level comes from `RUST_LOG` (default `info`). Nothing at
//! info level carries a write key, an API key or an event payload.
//!
//! Metrics live in one Prometheus [`Registry`] per application (so tests running several
//! gateways in one process do not share counters), named
//! `gateway_<subsystem>_<name>_<unit>`.

use std::sync::Arc;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};
use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber. Safe to call more than once (later calls are
/// no-ops), so tests may call it too.
pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}

/// The gateway's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics(Arc<MetricsInner>);

#[doc(hidden)]
pub struct MetricsInner {
    pub registry: Registry,
    /// Requests by route and status code.
    pub ingest_requests_total: IntCounterVec,
    /// Valid events received, by source and type (duplicates included).
    pub ingest_events_total: IntCounterVec,
    /// Events not queued again because their `messageId` was seen, by source.
    pub ingest_duplicates_total: IntCounterVec,
    /// Events answered 200 but dropped, by source and reason.
    pub ingest_events_skipped_total: IntCounterVec,
    /// Inflated request body sizes.
    pub ingest_request_size_bytes: Histogram,
    /// Time from the first byte read to the answer, by route.
    pub ingest_request_duration_seconds: HistogramVec,
    /// Time one group commit took.
    pub spool_commit_seconds: Histogram,
    /// Commands that shared one transaction.
    pub spool_group_commands: Histogram,
    /// Failed spool transactions.
    pub spool_errors_total: IntCounter,
}

impl std::ops::Deref for Metrics {
    type Target = MetricsInner;
    fn deref(&self) -> &MetricsInner {
        &self.0
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric. Registration of fresh, uniquely named metrics in a
    /// fresh registry cannot fail, so failures here are programming errors (start-up
    /// invariants).
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let metric = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let ingest_requests_total = counter_vec(
            "gateway_ingest_requests_total",
            "Ingest requests by route and status code.",
            &["route", "status"],
        );
        let ingest_events_total = counter_vec(
            "gateway_ingest_events_total",
            "Valid events received, by source and type (duplicates included).",
            &["source", "type"],
        );
        let ingest_duplicates_total = counter_vec(
            "gateway_ingest_duplicates_total",
            "Events not queued again because their messageId was seen within the dedup window.",
            &["source"],
        );
        let ingest_events_skipped_total = counter_vec(
            "gateway_ingest_events_skipped_total",
            "Events answered 200 but not queued, by source and reason.",
            &["source", "reason"],
        );
        let ingest_request_size_bytes = histogram(
            "gateway_ingest_request_size_bytes",
            "Inflated ingest request body sizes.",
            prometheus::exponential_buckets(256.0, 4.0, 8).expect("valid buckets"),
        );
        let ingest_request_duration_seconds = {
            let metric = HistogramVec::new(
                HistogramOpts::new(
                    "gateway_ingest_request_duration_seconds",
                    "Ingest request latency by route, including the durable commit.",
                )
                .buckets(prometheus::exponential_buckets(0.0005, 2.0, 14).expect("valid buckets")),
                &["route"],
            )
            .expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let spool_commit_seconds = histogram(
            "gateway_spool_commit_seconds",
            "Duration of one spool group-commit transaction.",
            prometheus::exponential_buckets(0.0001, 2.0, 16).expect("valid buckets"),
        );
        let spool_group_commands = histogram(
            "gateway_spool_group_commands",
            "Commands sharing one spool transaction.",
            prometheus::exponential_buckets(1.0, 2.0, 10).expect("valid buckets"),
        );
        let spool_errors_total = IntCounter::new(
            "gateway_spool_errors_total",
            "Spool transactions that failed.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(spool_errors_total.clone()))
            .expect("unique metric");
        Metrics(Arc::new(MetricsInner {
            registry,
            ingest_requests_total,
            ingest_events_total,
            ingest_duplicates_total,
            ingest_events_skipped_total,
            ingest_request_size_bytes,
            ingest_request_duration_seconds,
            spool_commit_seconds,
            spool_group_commands,
            spool_errors_total,
        }))
    }

    /// The registry in Prometheus' text exposition format.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut buffer = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if encoder
            .encode(&self.registry.gather(), &mut buffer)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}
