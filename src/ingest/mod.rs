//! The HTTP edge for Segment traffic: `/v1/*` (HTTP API, client libraries, analytics.js)
//! and `/webhook` (Segment's Webhooks destinations).
//!
//! Each handler only extracts → authenticates → validates → appends → answers:
//! authenticate what the headers carry (a Basic write key; a webhook without a signature
//! for a source that needs one), read the body within its limit, its time and its share of
//! the body budget (inflating gzip), authenticate what the body carries (the `writeKey`,
//! found by a shallow scan; the webhook signature), and only then parse and normalize it
//! with `segment`, append the accepted events to the spool and answer
//! `200 {"success":true}` once they are durable. It never maps to Refiner nor waits on it.
//!
//! Invariants:
//! - nothing of a request is normalized, merged or stored before it is authenticated, so an
//!   unauthenticated request costs at most its body, which the budget bounds;
//! - every byte a request holds in memory (body, inflated body, events until stored) is
//!   reserved from the [`budget`] first; when it is spent the answer is 503 with
//!   `Retry-After`, as for a body that does not arrive within `limits.body_timeout_secs`;
//! - a 2xx always means "on disk"; overload answers 429 and storage trouble 503, both with
//!   `Retry-After`, so the client keeps the events and retries.

pub mod auth;
pub mod body;
pub mod budget;
pub mod error;
pub mod signatures;
mod webhook;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_cors::Cors;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use crate::activity::Activity;
use crate::config::Settings;
use crate::segment::{self, Arrival, Destinations, EventType, Limits, Parsed};
use crate::spool::{AppendRequest, Spool};
use crate::telemetry::Metrics;
use auth::{basic_write_key, SourceAuth, Sources};
use budget::{BodyBudget, Reservation};
use error::IngestError;
use signatures::SignatureCache;

/// What the ingest handlers share.
pub struct IngestState {
    pub spool: Arc<dyn Spool>,
    pub sources: Sources,
    pub limits: Limits,
    pub metrics: Metrics,
    /// What request bodies may hold in memory, all together.
    pub budget: Arc<BodyBudget>,
    /// How long one body may take to arrive.
    pub body_timeout: Duration,
    /// Signatures of accepted `actions` webhooks.
    pub signatures: SignatureCache,
    /// Per source (by [`SourceAuth::index`]): the names in `integrations` that select the
    /// gateway.
    pub destinations: Vec<Destinations>,
    /// The console's live feed and counts, and the delivery log of refused events.
    pub activity: Arc<Activity>,
}

impl IngestState {
    /// The ingest state `settings` describe, appending to `spool`.
    pub fn new(settings: &Settings, spool: Arc<dyn Spool>, metrics: Metrics) -> IngestState {
        let limits = &settings.limits;
        IngestState {
            spool,
            sources: Sources::new(&settings.sources),
            limits: limits.clone(),
            budget: Arc::new(BodyBudget::new(
                limits.body_budget_bytes,
                metrics.ingest_body_budget_bytes.clone(),
            )),
            body_timeout: Duration::from_secs(limits.body_timeout_secs),
            signatures: SignatureCache::new(
                limits.max_webhook_signatures,
                Duration::from_secs(settings.spool.dedup_window_secs),
                metrics.ingest_webhook_signatures.clone(),
            ),
            destinations: settings
                .sources
                .iter()
                .map(|source| settings.integrations.destinations(&source.slug))
                .collect(),
            metrics,
            activity: Arc::new(Activity::default()),
        }
    }

    /// Reports accepted and refused events to `activity` (the console's).
    pub fn with_activity(mut self, activity: Arc<Activity>) -> IngestState {
        self.activity = activity;
        self
    }

    /// The destination names of `source`.
    pub fn destinations_of(&self, source: &SourceAuth) -> &Destinations {
        static DEFAULT: std::sync::OnceLock<Destinations> = std::sync::OnceLock::new();
        self.destinations
            .get(source.index)
            .unwrap_or_else(|| DEFAULT.get_or_init(Destinations::default))
    }
}

/// Registers the ingest routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/v1")
            .wrap(cors())
            .route("/batch", web::post().to(batch))
            .route("/b", web::post().to(batch))
            .route("/import", web::post().to(batch))
            .route("/{kind}", web::post().to(single)),
    )
    .route("/webhook", web::post().to(webhook::webhook))
    .route("/webhook/{source}", web::post().to(webhook::webhook));
}

/// Browsers post from any origin (analytics.js sends `text/plain`, and since 2026 also
/// `Authorization` and `X-Retry-Count`, which makes the request preflighted).
fn cors() -> Cors {
    Cors::default()
        .allow_any_origin()
        .allowed_methods(["POST", "OPTIONS"])
        .allowed_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::CONTENT_ENCODING,
            header::HeaderName::from_static("x-retry-count"),
        ])
        .max_age(900)
}

fn new_message_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `POST /v1/{identify|track|page|screen|group|alias}` and the one-letter forms.
async fn single(
    request: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<IngestState>,
) -> Result<HttpResponse, IngestError> {
    let Some(kind) = EventType::from_path(&path) else {
        return observe(
            &state,
            "unknown",
            Instant::now(),
            Err(IngestError::NotFound),
        );
    };
    let limit = state.limits.max_event_bytes;
    write_key_route(
        request,
        payload,
        state,
        "single",
        limit,
        |body, arrival, destinations| segment::parse_single_for(body, kind, arrival, destinations),
    )
    .await
}

/// `POST /v1/batch`, `/v1/b`, `/v1/import`.
async fn batch(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<IngestState>,
) -> Result<HttpResponse, IngestError> {
    let limit = state.limits.max_batch_bytes;
    write_key_route(
        request,
        payload,
        state,
        "batch",
        limit,
        segment::parse_batch_for,
    )
    .await
}

/// The `/v1/*` flow: authenticate a Basic write key, read the body within `limit`,
/// authenticate by the body's `writeKey` when there is no Basic key, parse, check that a
/// Basic key and the body's agree, append, answer.
async fn write_key_route(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<IngestState>,
    route: &'static str,
    limit: usize,
    parse: impl FnOnce(&[u8], Arrival<'_>, &Destinations) -> Result<Parsed, segment::Reject>,
) -> Result<HttpResponse, IngestError> {
    let started = Instant::now();
    let result = async {
        let basic = basic_write_key(request.headers());
        let by_header = match basic.as_deref() {
            Some(key) => Some(state.sources.authenticate(Some(key), None)?),
            None => None,
        };
        let mut reservation = state.budget.reservation();
        let body = read_body(&state, &request, payload, limit, &mut reservation, started).await?;
        let authenticated = match by_header {
            Some(source) => source,
            None => authenticate_body_key(&state, &body)?,
        };
        let received_at_ms = now_ms();
        let destinations = state.destinations_of(authenticated);
        let parsed = parse_body(&state, route, || {
            parse(&body, arrival(&state.limits, received_at_ms), destinations)
        })?;
        drop(body);
        // The header and the body's key must agree (the request is authenticated already).
        let source = state
            .sources
            .authenticate(basic.as_deref(), parsed.write_key.as_deref())?;
        accept(&state, source, parsed, received_at_ms, reservation).await
    }
    .await;
    observe(&state, route, started, result)
}

/// Authenticates a request without a Basic write key by its body's top-level `writeKey`,
/// found without parsing the body (see [`segment::body_write_key`]).
fn authenticate_body_key<'s>(
    state: &'s IngestState,
    body: &[u8],
) -> Result<&'s SourceAuth, IngestError> {
    let key = segment::body_write_key(body)?;
    state.sources.authenticate(None, key.as_deref())
}

/// Reads the body within `limit`, the request's share of the budget, and the body timeout
/// counted from `started`.
async fn read_body(
    state: &IngestState,
    request: &HttpRequest,
    payload: web::Payload,
    limit: usize,
    reservation: &mut Reservation,
    started: Instant,
) -> Result<body::Body, IngestError> {
    let deadline = tokio::time::Instant::from_std(started) + state.body_timeout;
    let body = body::read_body(request.headers(), payload, limit, reservation, deadline).await?;
    state
        .metrics
        .ingest_request_size_bytes
        .observe(body.len() as f64);
    Ok(body)
}

/// Parses an authenticated body (and counts it: nothing unauthenticated gets here).
fn parse_body(
    state: &IngestState,
    route: &str,
    parse: impl FnOnce() -> Result<segment::Parsed, segment::Reject>,
) -> Result<segment::Parsed, IngestError> {
    state
        .metrics
        .ingest_bodies_parsed_total
        .with_label_values(&[route])
        .inc();
    Ok(parse()?)
}

fn arrival(limits: &Limits, received_at_ms: i64) -> Arrival<'_> {
    Arrival {
        received_at_ms,
        limits,
        new_message_id,
    }
}

/// Refused events of one request logged one by one (with their first bytes); the rest
/// are counted, and listed in the answer.
const LOGGED_REFUSALS: usize = 10;

/// Counts skipped and refused events, appends the accepted ones and answers once they are
/// durable. While they wait for the spool, the events hold their bytes of the budget in
/// `reservation` (instead of the body they came from).
async fn accept(
    state: &IngestState,
    source: &SourceAuth,
    parsed: Parsed,
    received_at_ms: i64,
    mut reservation: Reservation,
) -> Result<HttpResponse, IngestError> {
    let mut events = Vec::with_capacity(parsed.items.len());
    for item in parsed.items {
        match item {
            Ok(event) => events.push(event),
            Err(skip) => {
                tracing::debug!(source = %source.slug, reason = skip.as_str(), "event skipped");
                state
                    .metrics
                    .ingest_events_skipped_total
                    .with_label_values(&[&*source.slug, skip.as_str()])
                    .inc();
            }
        }
    }
    report_refused(state, source, &parsed.refused);
    state
        .activity
        .refused(&source.slug, received_at_ms, &parsed.refused);
    let answer = || success_with(&parsed.refused);
    if events.is_empty() {
        return Ok(answer());
    }
    let held: usize = events
        .iter()
        .map(|e| e.payload.len() + e.message_id.len() + e.user_key.as_str().len())
        .sum();
    reservation.resize(held)?;
    let mut per_type = [0u64; EventType::ALL.len()];
    for event in &events {
        per_type[event.kind as usize] += 1;
    }
    // Copies of the few events shown live (none when nobody watches).
    let shown = state.activity.live.sample(received_at_ms, &events);
    let appended = state
        .spool
        .append(AppendRequest {
            source: source.slug.to_string(),
            received_at_ms,
            events,
        })
        .await;
    // `accepted`: durable and answered 200; `refused`: answered 429/503, the client keeps
    // the events and sends them again.
    let outcome = if appended.is_ok() {
        "accepted"
    } else {
        "refused"
    };
    for (kind, count) in EventType::ALL.iter().zip(per_type) {
        if count > 0 {
            state
                .metrics
                .ingest_events_total
                .with_label_values(&[&*source.slug, kind.as_str(), outcome])
                .inc_by(count);
        }
    }
    let report = appended?;
    state
        .activity
        .accepted(&source.slug, received_at_ms, &shown, report.queued);
    if report.duplicates > 0 {
        state
            .metrics
            .ingest_duplicates_total
            .with_label_values(&[&*source.slug])
            .inc_by(report.duplicates as u64);
    }
    Ok(answer())
}

/// Counts the events refused one by one, and logs the first [`LOGGED_REFUSALS`] of them
/// with their reason (their first bytes at debug: payloads never reach info or above).
fn report_refused(state: &IngestState, source: &SourceAuth, refused: &[segment::Refused]) {
    for (n, event) in refused.iter().enumerate() {
        let code = event.reason.code();
        state
            .metrics
            .ingest_events_refused_total
            .with_label_values(&[&*source.slug, code])
            .inc();
        if n < LOGGED_REFUSALS {
            // The bytes are a payload: at debug only (the delivery log keeps them too).
            tracing::warn!(
                source = %source.slug,
                index = event.index,
                code,
                reason = %event.reason,
                size = event.size,
                "event refused at ingest; the rest of its batch is accepted"
            );
            tracing::debug!(
                source = %source.slug,
                index = event.index,
                raw = %event.raw,
                "refused event's first bytes"
            );
        }
    }
    if refused.len() > LOGGED_REFUSALS {
        tracing::warn!(
            source = %source.slug,
            refused = refused.len(),
            logged = LOGGED_REFUSALS,
            "more events of this request were refused than are logged one by one"
        );
    }
}

/// The 200 answer: [`success`], and when events were refused one by one, which ones.
fn success_with(refused: &[segment::Refused]) -> HttpResponse {
    if refused.is_empty() {
        return success();
    }
    #[derive(serde::Serialize)]
    struct RefusedEvent<'a> {
        index: usize,
        code: &'a str,
        message: String,
    }
    #[derive(serde::Serialize)]
    struct Answer<'a> {
        success: bool,
        refused: Vec<RefusedEvent<'a>>,
    }
    HttpResponse::Ok().json(Answer {
        success: true,
        refused: refused
            .iter()
            .map(|event| RefusedEvent {
                index: event.index,
                code: event.reason.code(),
                message: event.reason.to_string(),
            })
            .collect(),
    })
}

/// Exactly what Segment's API answers: analytics-python accepts nothing but a 200.
pub fn success() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(r#"{"success":true}"#)
}

fn observe(
    state: &IngestState,
    route: &str,
    started: Instant,
    result: Result<HttpResponse, IngestError>,
) -> Result<HttpResponse, IngestError> {
    let status = match &result {
        Ok(response) => response.status().as_u16(),
        Err(e) => actix_web::ResponseError::status_code(e).as_u16(),
    };
    state
        .metrics
        .ingest_requests_total
        .with_label_values(&[route, &status.to_string()])
        .inc();
    state
        .metrics
        .ingest_request_duration_seconds
        .with_label_values(&[route])
        .observe(started.elapsed().as_secs_f64());
    if let Err(e) = &result {
        tracing::debug!(route, code = e.code(), "ingest request refused");
        let refusals = match e {
            IngestError::BodyBudgetExhausted => {
                Some(&state.metrics.ingest_body_budget_exhausted_total)
            }
            IngestError::BodyTimeout => Some(&state.metrics.ingest_body_timeouts_total),
            _ => None,
        };
        if let Some(counter) = refusals {
            counter.with_label_values(&[route]).inc();
        }
    }
    result
}

/// Unmatched routes and methods answer JSON too.
pub async fn not_found() -> Result<HttpResponse, IngestError> {
    Err(IngestError::NotFound)
}
