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
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
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
    /// Delivery outcomes by source: forwarded, skipped, retried, dead_lettered.
    pub dispatch_events_total: IntCounterVec,
    /// Events not forwarded to Refiner, by source and reason.
    pub dispatch_skipped_total: IntCounterVec,
    /// Events merged into another event's identify-user call.
    pub dispatch_coalesced_total: IntCounter,
    /// Strings cut to Refiner's length limit.
    pub dispatch_truncated_strings_total: IntCounter,
    /// Time from acceptance to Refiner's 2xx.
    pub dispatch_delivery_latency_seconds: Histogram,
    /// The adaptive limit of concurrent Refiner calls.
    pub dispatch_concurrency_limit: IntGauge,
    /// 1 while the circuit breaker holds delivery back.
    pub dispatch_circuit_open: IntGauge,
    /// Refiner calls by endpoint and status (code, `timeout` or `connection`).
    pub refiner_calls_total: IntCounterVec,
    /// Refiner call latency by endpoint.
    pub refiner_call_duration_seconds: HistogramVec,
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
        let histogram_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(
                    prometheus::exponential_buckets(0.0005, 2.0, 16).expect("valid buckets"),
                ),
                labels,
            )
            .expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let counter = |name: &str, help: &str| {
            let metric = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let gauge = |name: &str, help: &str| {
            let metric = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let ingest_request_duration_seconds = histogram_vec(
            "gateway_ingest_request_duration_seconds",
            "Ingest request latency by route, including the durable commit.",
            &["route"],
        );
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
        let spool_errors_total = counter(
            "gateway_spool_errors_total",
            "Spool transactions that failed.",
        );
        let dispatch_events_total = counter_vec(
            "gateway_dispatch_events_total",
            "Delivery outcomes by source: forwarded, skipped, retried, dead_lettered.",
            &["source", "outcome"],
        );
        let dispatch_skipped_total = counter_vec(
            "gateway_dispatch_skipped_total",
            "Events not forwarded to Refiner, by source and reason.",
            &["source", "reason"],
        );
        let dispatch_coalesced_total = counter(
            "gateway_dispatch_coalesced_total",
            "Events merged into another event's identify-user call.",
        );
        let dispatch_truncated_strings_total = counter(
            "gateway_dispatch_truncated_strings_total",
            "Strings cut to Refiner's length limit.",
        );
        let dispatch_delivery_latency_seconds = histogram(
            "gateway_dispatch_delivery_latency_seconds",
            "Time from acceptance to Refiner's 2xx answer.",
            prometheus::exponential_buckets(0.01, 2.0, 20).expect("valid buckets"),
        );
        let dispatch_concurrency_limit = gauge(
            "gateway_dispatch_concurrency_limit",
            "Current adaptive limit of concurrent Refiner calls.",
        );
        let dispatch_circuit_open = gauge(
            "gateway_dispatch_circuit_open",
            "1 while the circuit breaker holds delivery back.",
        );
        let refiner_calls_total = counter_vec(
            "gateway_refiner_calls_total",
            "Refiner calls by endpoint and status (code, timeout or connection).",
            &["endpoint", "status"],
        );
        let refiner_call_duration_seconds = histogram_vec(
            "gateway_refiner_call_duration_seconds",
            "Refiner call latency by endpoint.",
            &["endpoint"],
        );
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
            dispatch_events_total,
            dispatch_skipped_total,
            dispatch_coalesced_total,
            dispatch_truncated_strings_total,
            dispatch_delivery_latency_seconds,
            dispatch_concurrency_limit,
            dispatch_circuit_open,
            refiner_calls_total,
            refiner_call_duration_seconds,
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
