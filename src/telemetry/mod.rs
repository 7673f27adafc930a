//! Logging and metrics.
//!
//! Logs go through `tracing` to stdout: JSON lines or human-readable text (see
//! [`LogFormat`]; by default JSON unless stdout is a terminal, so a container logs JSON and
//! a developer's shell gets readable, coloured lines); the level comes from `RUST_LOG`
//! (default `info`). Every request's lines carry its request id (`request_id` span field).
//! Nothing at info level carries a write key, an API key or an event payload.
//!
//! Metrics live in one Prometheus [`Registry`] per application (so tests running several
//! gateways in one process do not share counters), named
//! `gateway_<subsystem>_<name>_<unit>`. Counters and histograms are updated where things
//! happen; the gauges that describe the spool as a whole (depth, oldest event's age, dead
//! letters) are refreshed by [`crate::telemetry::sampler`] every `spool.stats_interval_ms`, never
//! computed per scrape. The process collector adds the standard `process_*` metrics (CPU,
//! resident memory, open file descriptors) on Linux.

pub mod sampler;

use std::io::IsTerminal;
use std::sync::Arc;

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Whether `format` means JSON lines for a process whose stdout is (or is not) a terminal:
/// `auto` is JSON except in a terminal.
pub fn is_json(format: LogFormat, stdout_is_terminal: bool) -> bool {
    match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !stdout_is_terminal,
    }
}

/// Installs the global tracing subscriber, writing to stdout. Safe to call more than once
/// (later calls are no-ops), so tests may call it too. Colours only in a terminal.
pub fn init_logging(format: LogFormat) {
    init_logging_with(format, "info");
}

/// [`init_logging`] with another filter than `info` when `RUST_LOG` is unset.
pub fn init_logging_with(format: LogFormat, default_filter: &str) {
    let terminal = std::io::stdout().is_terminal();
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = if is_json(format, terminal) {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init()
    } else {
        builder.with_ansi(terminal).try_init()
    };
}

/// The gateway's metrics. Cheap to clone.
#[derive(Clone)]
pub struct Metrics(Arc<MetricsInner>);

/// Declares every metric once: its field (with why it exists), its type and how it is
/// made (name, help, labels or buckets). [`MetricsInner`] and its registration are
/// generated from the one list.
macro_rules! metrics {
    ($( $(#[$doc:meta])* $field:ident: $ty:ty = $make:expr; )*) => {
        #[doc(hidden)]
        pub struct MetricsInner {
            pub registry: Registry,
            $( $(#[$doc])* pub $field: $ty, )*
        }

        impl MetricsInner {
            /// Makes every metric and registers it in `registry`.
            fn registered_in(registry: Registry) -> MetricsInner {
                $(
                    let $field: $ty = $make;
                    register(&registry, &$field);
                )*
                MetricsInner { registry, $( $field, )* }
            }
        }
    };
}

metrics! {
    /// Requests by route and status code.
    ingest_requests_total: IntCounterVec = counter_vec(
        "gateway_ingest_requests_total",
        "Ingest requests by route and status code.",
        &["route", "status"],
    );
    /// Valid events received, by source, type and outcome (`accepted`: durable and answered
    /// 200, duplicates included; `refused`: the request was answered 429/503).
    ingest_events_total: IntCounterVec = counter_vec(
        "gateway_ingest_events_total",
        "Valid events received, by source, type and outcome (accepted, refused).",
        &["source", "type", "outcome"],
    );
    /// Events not queued again because their `messageId` was seen, by source.
    ingest_duplicates_total: IntCounterVec = counter_vec(
        "gateway_ingest_duplicates_total",
        "Events not queued again because their messageId was seen within the dedup window.",
        &["source"],
    );
    /// Events answered 200 but dropped, by source and reason.
    ingest_events_skipped_total: IntCounterVec = counter_vec(
        "gateway_ingest_events_skipped_total",
        "Events answered 200 but not queued, by source and reason.",
        &["source", "reason"],
    );
    /// Events of a batch refused one by one (the rest of the batch accepted), by source and
    /// error code.
    ingest_events_refused_total: IntCounterVec = counter_vec(
        "gateway_ingest_events_refused_total",
        "Events of a batch or webhook array refused on their own (the others accepted), by source and error code.",
        &["source", "code"],
    );
    /// Inflated request body sizes.
    ingest_request_size_bytes: Histogram = histogram(
        "gateway_ingest_request_size_bytes",
        "Inflated ingest request body sizes.",
        prometheus::exponential_buckets(256.0, 4.0, 8).expect("valid buckets"),
    );
    /// Time from the first byte read to the answer, by route.
    ingest_request_duration_seconds: HistogramVec = histogram_vec(
        "gateway_ingest_request_duration_seconds",
        "Ingest request latency by route, including the durable commit.",
        &["route"],
    );
    /// Request bodies parsed into events, by route: only authenticated requests get there.
    ingest_bodies_parsed_total: IntCounterVec = counter_vec(
        "gateway_ingest_bodies_parsed_total",
        "Request bodies parsed into events (authenticated requests only), by route.",
        &["route"],
    );
    /// Bytes of the ingest body budget held now (bodies being read or inflated, events
    /// waiting to be stored).
    ingest_body_budget_bytes: IntGauge = gauge(
        "gateway_ingest_body_budget_bytes",
        "Bytes of the ingest body budget held now (bodies being read or inflated, events waiting to be stored).",
    );
    /// Requests answered 503 because the body budget was spent, by route.
    ingest_body_budget_exhausted_total: IntCounterVec = counter_vec(
        "gateway_ingest_body_budget_exhausted_total",
        "Requests answered 503 because the ingest body budget was spent, by route.",
        &["route"],
    );
    /// Requests answered 503 because their body did not arrive in time, by route.
    ingest_body_timeouts_total: IntCounterVec = counter_vec(
        "gateway_ingest_body_timeouts_total",
        "Requests answered 503 because their body did not arrive within limits.body_timeout_secs, by route.",
        &["route"],
    );
    /// Signatures of accepted `actions` webhooks remembered now.
    ingest_webhook_signatures: IntGauge = gauge(
        "gateway_ingest_webhook_signatures",
        "Signatures of accepted actions-format webhooks remembered now.",
    );
    /// Time one group commit took.
    spool_commit_seconds: Histogram = histogram(
        "gateway_spool_commit_seconds",
        "Duration of one spool group-commit transaction.",
        prometheus::exponential_buckets(0.0001, 2.0, 16).expect("valid buckets"),
    );
    /// Commands that shared one transaction.
    spool_group_commands: Histogram = histogram(
        "gateway_spool_group_commands",
        "Commands sharing one spool transaction.",
        prometheus::exponential_buckets(1.0, 2.0, 10).expect("valid buckets"),
    );
    /// Failed spool transactions.
    spool_errors_total: IntCounter = counter(
        "gateway_spool_errors_total",
        "Spool transactions that failed.",
    );
    /// Events queued and not yet acked (leased and waiting ones included), sampled.
    spool_depth_events: IntGauge = gauge(
        "gateway_spool_depth_events",
        "Events queued and not yet acked, leased and waiting ones included (sampled).",
    );
    /// Age of the oldest queued event, 0 when the queue is empty, sampled.
    spool_oldest_event_age_seconds: Gauge = float_gauge(
        "gateway_spool_oldest_event_age_seconds",
        "Age of the oldest queued event, 0 when the queue is empty (sampled).",
    );
    /// Events in the dead letters, sampled.
    spool_dead_letters_events: IntGauge = gauge(
        "gateway_spool_dead_letters_events",
        "Events in the dead letters (sampled).",
    );
    /// Message ids the embedded spool's dedup index remembers (in memory and in runs).
    spool_dedup_ids: IntGauge = gauge(
        "gateway_spool_dedup_ids",
        "Message ids the embedded spool's dedup index remembers.",
    );
    /// Memory the dedup index keeps warm: ids not yet in a run (heap), and the runs' filters
    /// and fences (mapped from their files: page cache, reclaimable).
    spool_dedup_memory_bytes: IntGauge = gauge(
        "gateway_spool_dedup_memory_bytes",
        "Memory the embedded spool's dedup index keeps warm (ids not yet in a run on the heap, run filters and fences mapped).",
    );
    /// Time one sampling of the spool's statistics took.
    spool_stats_seconds: Histogram = histogram(
        "gateway_spool_stats_seconds",
        "Duration of one sampling of the spool's statistics.",
        prometheus::exponential_buckets(0.0001, 2.0, 16).expect("valid buckets"),
    );
    /// Delivery outcomes by source: forwarded, skipped, retried, dead_lettered.
    dispatch_events_total: IntCounterVec = counter_vec(
        "gateway_dispatch_events_total",
        "Delivery outcomes by source: forwarded, skipped, retried, dead_lettered.",
        &["source", "outcome"],
    );
    /// Events not forwarded to Refiner, by source and reason.
    dispatch_skipped_total: IntCounterVec = counter_vec(
        "gateway_dispatch_skipped_total",
        "Events not forwarded to Refiner, by source and reason.",
        &["source", "reason"],
    );
    /// Engage memberships not synced because the audience has no Refiner manual segment,
    /// by source and audience key.
    engage_segment_missing_total: IntCounterVec = counter_vec(
        "gateway_engage_segment_missing_total",
        "Engage memberships not synced: the audience has no Refiner manual segment.",
        &["source", "audience"],
    );
    /// Events merged into another event's identify-user call.
    dispatch_coalesced_total: IntCounter = counter(
        "gateway_dispatch_coalesced_total",
        "Events merged into another event's identify-user call.",
    );
    /// Strings cut to Refiner's length limit.
    dispatch_truncated_strings_total: IntCounter = counter(
        "gateway_dispatch_truncated_strings_total",
        "Strings cut to Refiner's length limit.",
    );
    /// Time from acceptance to Refiner's 2xx.
    dispatch_delivery_latency_seconds: Histogram = histogram(
        "gateway_dispatch_delivery_latency_seconds",
        "Time from acceptance to Refiner's 2xx answer.",
        prometheus::exponential_buckets(0.01, 2.0, 20).expect("valid buckets"),
    );
    /// The adaptive limit of concurrent Refiner calls.
    dispatch_concurrency_limit: IntGauge = gauge(
        "gateway_dispatch_concurrency_limit",
        "Current adaptive limit of concurrent Refiner calls.",
    );
    /// Refiner calls in flight now.
    dispatch_in_flight_calls: IntGauge = gauge(
        "gateway_dispatch_in_flight_calls",
        "Refiner calls in flight now.",
    );
    /// 1 while the circuit breaker holds delivery back.
    dispatch_circuit_open: IntGauge = gauge(
        "gateway_dispatch_circuit_open",
        "1 while the circuit breaker holds delivery back.",
    );
    /// 1 while a source's Refiner API key is paused after Refiner refused it (401/403).
    dispatch_key_paused: IntGaugeVec = gauge_vec(
        "gateway_dispatch_key_paused",
        "1 while a source's Refiner API key is paused because Refiner refused it (401/403).",
        &["source"],
    );
    /// Refiner calls by endpoint and status (code, `timeout` or `connection`).
    refiner_calls_total: IntCounterVec = counter_vec(
        "gateway_refiner_calls_total",
        "Refiner calls by endpoint and status (code, timeout or connection).",
        &["endpoint", "status"],
    );
    /// Refiner call latency by endpoint.
    refiner_call_duration_seconds: HistogramVec = histogram_vec(
        "gateway_refiner_call_duration_seconds",
        "Refiner call latency by endpoint.",
        &["endpoint"],
    );
    /// Distinct identified users with an event accepted this month, by source (sampled).
    usage_monthly_users: IntGaugeVec = gauge_vec(
        "gateway_usage_monthly_users",
        "Distinct identified users with an event accepted this month, by source (sampled).",
        &["source"],
    );
    /// Events accepted this month (duplicates not counted), by source (sampled).
    usage_monthly_events: IntGaugeVec = gauge_vec(
        "gateway_usage_monthly_events",
        "Events accepted this month, duplicates not counted, by source (sampled).",
        &["source"],
    );
    /// `page` and `screen` events accepted this month, by source (sampled).
    usage_monthly_page_views: IntGaugeVec = gauge_vec(
        "gateway_usage_monthly_page_views",
        "Page and screen events accepted this month, by source (sampled).",
        &["source"],
    );
    /// 1 when the last readiness check passed, 0 when it failed.
    ready: IntGauge = gauge(
        "gateway_ready",
        "1 when the last readiness check passed, 0 when it failed.",
    );
    /// Always 1, labelled with the gateway's version.
    build_info: IntGaugeVec = gauge_vec(
        "gateway_build_info",
        "Always 1, labelled with the gateway's version.",
        &["version"],
    );
}

/// Registers a fresh, uniquely named metric. Registration in a fresh registry cannot fail,
/// so a failure is a programming error (a start-up invariant).
fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: &M) {
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("valid metric")
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("valid metric")
}

fn float_gauge(name: &str, help: &str) -> Gauge {
    Gauge::new(name, help).expect("valid metric")
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric")
}

/// A latency histogram by `labels`, 0.5 ms to 16 s.
fn histogram_vec(name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let buckets = prometheus::exponential_buckets(0.0005, 2.0, 16).expect("valid buckets");
    HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric")
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
    /// Creates and registers every metric (the `metrics!` list).
    pub fn new() -> Metrics {
        let inner = MetricsInner::registered_in(Registry::new());
        inner
            .build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        register_process_collector(&inner.registry);
        Metrics(Arc::new(inner))
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

/// The standard `process_*` metrics (CPU seconds, resident memory, open and maximum file
/// descriptors, start time), on Linux.
#[cfg(target_os = "linux")]
fn register_process_collector(registry: &Registry) {
    let collector = prometheus::process_collector::ProcessCollector::for_self();
    if let Err(e) = registry.register(Box::new(collector)) {
        tracing::warn!(error = %e, "cannot export process metrics");
    }
}

#[cfg(not(target_os = "linux"))]
fn register_process_collector(_registry: &Registry) {}
