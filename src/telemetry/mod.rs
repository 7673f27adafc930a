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

#[doc(hidden)]
pub struct MetricsInner {
    pub registry: Registry,
    /// Requests by route and status code.
    pub ingest_requests_total: IntCounterVec,
    /// Valid events received, by source, type and outcome (`accepted`: durable and answered
    /// 200, duplicates included; `refused`: the request was answered 429/503).
    pub ingest_events_total: IntCounterVec,
    /// Events not queued again because their `messageId` was seen, by source.
    pub ingest_duplicates_total: IntCounterVec,
    /// Events answered 200 but dropped, by source and reason.
    pub ingest_events_skipped_total: IntCounterVec,
    /// Events of a batch refused one by one (the rest of the batch accepted), by source and
    /// error code.
    pub ingest_events_refused_total: IntCounterVec,
    /// Inflated request body sizes.
    pub ingest_request_size_bytes: Histogram,
    /// Time from the first byte read to the answer, by route.
    pub ingest_request_duration_seconds: HistogramVec,
    /// Request bodies parsed into events, by route: only authenticated requests get there.
    pub ingest_bodies_parsed_total: IntCounterVec,
    /// Bytes of the ingest body budget held now (bodies being read or inflated, events
    /// waiting to be stored).
    pub ingest_body_budget_bytes: IntGauge,
    /// Requests answered 503 because the body budget was spent, by route.
    pub ingest_body_budget_exhausted_total: IntCounterVec,
    /// Requests answered 503 because their body did not arrive in time, by route.
    pub ingest_body_timeouts_total: IntCounterVec,
    /// Signatures of accepted `actions` webhooks remembered now.
    pub ingest_webhook_signatures: IntGauge,
    /// Time one group commit took.
    pub spool_commit_seconds: Histogram,
    /// Commands that shared one transaction.
    pub spool_group_commands: Histogram,
    /// Failed spool transactions.
    pub spool_errors_total: IntCounter,
    /// Events queued and not yet acked (leased and waiting ones included), sampled.
    pub spool_depth_events: IntGauge,
    /// Age of the oldest queued event, 0 when the queue is empty, sampled.
    pub spool_oldest_event_age_seconds: Gauge,
    /// Events in the dead letters, sampled.
    pub spool_dead_letters_events: IntGauge,
    /// Message ids the embedded spool's dedup index remembers (in memory and in runs).
    pub spool_dedup_ids: IntGauge,
    /// Memory the dedup index keeps warm: ids not yet in a run (heap), and the runs' filters
    /// and fences (mapped from their files: page cache, reclaimable).
    pub spool_dedup_memory_bytes: IntGauge,
    /// Time one sampling of the spool's statistics took.
    pub spool_stats_seconds: Histogram,
    /// Delivery outcomes by source: forwarded, skipped, retried, dead_lettered.
    pub dispatch_events_total: IntCounterVec,
    /// Events not forwarded to Refiner, by source and reason.
    pub dispatch_skipped_total: IntCounterVec,
    /// Engage memberships not synced because the audience has no Refiner manual segment,
    /// by source and audience key.
    pub engage_segment_missing_total: IntCounterVec,
    /// Events merged into another event's identify-user call.
    pub dispatch_coalesced_total: IntCounter,
    /// Strings cut to Refiner's length limit.
    pub dispatch_truncated_strings_total: IntCounter,
    /// Time from acceptance to Refiner's 2xx.
    pub dispatch_delivery_latency_seconds: Histogram,
    /// The adaptive limit of concurrent Refiner calls.
    pub dispatch_concurrency_limit: IntGauge,
    /// Refiner calls in flight now.
    pub dispatch_in_flight_calls: IntGauge,
    /// 1 while the circuit breaker holds delivery back.
    pub dispatch_circuit_open: IntGauge,
    /// 1 while a source's Refiner API key is paused after Refiner refused it (401/403).
    pub dispatch_key_paused: IntGaugeVec,
    /// Refiner calls by endpoint and status (code, `timeout` or `connection`).
    pub refiner_calls_total: IntCounterVec,
    /// Refiner call latency by endpoint.
    pub refiner_call_duration_seconds: HistogramVec,
    /// Distinct identified users with an event accepted this month, by source (sampled).
    pub usage_monthly_users: IntGaugeVec,
    /// Events accepted this month (duplicates not counted), by source (sampled).
    pub usage_monthly_events: IntGaugeVec,
    /// `page` and `screen` events accepted this month, by source (sampled).
    pub usage_monthly_page_views: IntGaugeVec,
    /// 1 when the last readiness check passed, 0 when it failed.
    pub ready: IntGauge,
    /// Always 1, labelled with the gateway's version.
    pub build_info: IntGaugeVec,
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
            "Valid events received, by source, type and outcome (accepted, refused).",
            &["source", "type", "outcome"],
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
        let ingest_events_refused_total = counter_vec(
            "gateway_ingest_events_refused_total",
            "Events of a batch or webhook array refused on their own (the others accepted), by source and error code.",
            &["source", "code"],
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
        let ingest_bodies_parsed_total = counter_vec(
            "gateway_ingest_bodies_parsed_total",
            "Request bodies parsed into events (authenticated requests only), by route.",
            &["route"],
        );
        let ingest_body_budget_bytes = gauge(
            "gateway_ingest_body_budget_bytes",
            "Bytes of the ingest body budget held now (bodies being read or inflated, events waiting to be stored).",
        );
        let ingest_body_budget_exhausted_total = counter_vec(
            "gateway_ingest_body_budget_exhausted_total",
            "Requests answered 503 because the ingest body budget was spent, by route.",
            &["route"],
        );
        let ingest_body_timeouts_total = counter_vec(
            "gateway_ingest_body_timeouts_total",
            "Requests answered 503 because their body did not arrive within limits.body_timeout_secs, by route.",
            &["route"],
        );
        let ingest_webhook_signatures = gauge(
            "gateway_ingest_webhook_signatures",
            "Signatures of accepted actions-format webhooks remembered now.",
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
        let spool_depth_events = gauge(
            "gateway_spool_depth_events",
            "Events queued and not yet acked, leased and waiting ones included (sampled).",
        );
        let spool_oldest_event_age_seconds = Gauge::new(
            "gateway_spool_oldest_event_age_seconds",
            "Age of the oldest queued event, 0 when the queue is empty (sampled).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(spool_oldest_event_age_seconds.clone()))
            .expect("unique metric");
        let spool_dedup_ids = gauge(
            "gateway_spool_dedup_ids",
            "Message ids the embedded spool's dedup index remembers.",
        );
        let spool_dedup_memory_bytes = gauge(
            "gateway_spool_dedup_memory_bytes",
            "Memory the embedded spool's dedup index keeps warm (ids not yet in a run on the heap, run filters and fences mapped).",
        );
        let spool_dead_letters_events = gauge(
            "gateway_spool_dead_letters_events",
            "Events in the dead letters (sampled).",
        );
        let spool_stats_seconds = histogram(
            "gateway_spool_stats_seconds",
            "Duration of one sampling of the spool's statistics.",
            prometheus::exponential_buckets(0.0001, 2.0, 16).expect("valid buckets"),
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
        let engage_segment_missing_total = counter_vec(
            "gateway_engage_segment_missing_total",
            "Engage memberships not synced: the audience has no Refiner manual segment.",
            &["source", "audience"],
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
        let dispatch_in_flight_calls = gauge(
            "gateway_dispatch_in_flight_calls",
            "Refiner calls in flight now.",
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
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("unique metric");
            metric
        };
        let dispatch_key_paused = gauge_vec(
            "gateway_dispatch_key_paused",
            "1 while a source's Refiner API key is paused because Refiner refused it (401/403).",
            &["source"],
        );
        let usage_monthly_users = gauge_vec(
            "gateway_usage_monthly_users",
            "Distinct identified users with an event accepted this month, by source (sampled).",
            &["source"],
        );
        let usage_monthly_events = gauge_vec(
            "gateway_usage_monthly_events",
            "Events accepted this month, duplicates not counted, by source (sampled).",
            &["source"],
        );
        let usage_monthly_page_views = gauge_vec(
            "gateway_usage_monthly_page_views",
            "Page and screen events accepted this month, by source (sampled).",
            &["source"],
        );
        let ready = gauge(
            "gateway_ready",
            "1 when the last readiness check passed, 0 when it failed.",
        );
        let build_info = IntGaugeVec::new(
            Opts::new(
                "gateway_build_info",
                "Always 1, labelled with the gateway's version.",
            ),
            &["version"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(build_info.clone()))
            .expect("unique metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        register_process_collector(&registry);
        Metrics(Arc::new(MetricsInner {
            registry,
            ingest_requests_total,
            ingest_events_total,
            ingest_duplicates_total,
            ingest_events_skipped_total,
            ingest_events_refused_total,
            ingest_request_size_bytes,
            ingest_request_duration_seconds,
            ingest_bodies_parsed_total,
            ingest_body_budget_bytes,
            ingest_body_budget_exhausted_total,
            ingest_body_timeouts_total,
            ingest_webhook_signatures,
            spool_commit_seconds,
            spool_group_commands,
            spool_errors_total,
            spool_depth_events,
            spool_oldest_event_age_seconds,
            spool_dead_letters_events,
            spool_dedup_ids,
            spool_dedup_memory_bytes,
            spool_stats_seconds,
            dispatch_events_total,
            dispatch_skipped_total,
            engage_segment_missing_total,
            dispatch_coalesced_total,
            dispatch_truncated_strings_total,
            dispatch_delivery_latency_seconds,
            dispatch_concurrency_limit,
            dispatch_in_flight_calls,
            dispatch_circuit_open,
            dispatch_key_paused,
            refiner_calls_total,
            refiner_call_duration_seconds,
            usage_monthly_users,
            usage_monthly_events,
            usage_monthly_page_views,
            ready,
            build_info,
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
