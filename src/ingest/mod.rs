//! The HTTP edge for Segment traffic: `/v1/*` (HTTP API, client libraries, analytics.js)
//! and `/webhook` (Segment's Webhooks destinations).
//!
//! Each handler only extracts → validates → appends → answers:
//! read the body within its limit (inflating gzip), parse and normalize it with `segment`,
//! authenticate, append the accepted events to the spool and answer
//! `200 {"success":true}` once they are durable. It never maps to Refiner nor waits on it.
//! A 2xx therefore always means "on disk"; overload answers 429 and storage trouble 503,
//! both with `Retry-After`, so the client keeps the events and retries.

pub mod auth;
pub mod body;
pub mod error;

use std::sync::Arc;
use std::time::Instant;

use actix_cors::Cors;
use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};

use crate::segment::{self, Arrival, EventType, Item, Limits};
use crate::spool::{AppendRequest, Spool};
use crate::telemetry::Metrics;
use auth::{basic_write_key, SourceAuth, Sources};
use error::IngestError;

/// What the ingest handlers share.
pub struct IngestState {
    pub spool: Arc<dyn Spool>,
    pub sources: Sources,
    pub limits: Limits,
    pub metrics: Metrics,
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
    .route("/webhook", web::post().to(webhook))
    .route("/webhook/{source}", web::post().to(webhook));
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
    write_key_route(request, payload, state, "single", limit, |body, arrival| {
        segment::parse_single(body, kind, arrival)
    })
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
        segment::parse_batch,
    )
    .await
}

/// The `/v1/*` flow: read the body within `limit`, parse, authenticate by write key
/// (Basic user name and/or the body's `writeKey`), append, answer.
async fn write_key_route(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<IngestState>,
    route: &str,
    limit: usize,
    parse: impl FnOnce(&[u8], Arrival<'_>) -> Result<segment::Parsed, segment::Reject>,
) -> Result<HttpResponse, IngestError> {
    let started = Instant::now();
    let result = async {
        let body = body::read_body(request.headers(), payload, limit).await?;
        state
            .metrics
            .ingest_request_size_bytes
            .observe(body.len() as f64);
        let received_at_ms = now_ms();
        let parsed = parse(&body, arrival(&state.limits, received_at_ms))?;
        let basic = basic_write_key(request.headers());
        let source = state
            .sources
            .authenticate(basic.as_deref(), parsed.write_key.as_deref())?;
        accept(&state, source, parsed.items, received_at_ms).await
    }
    .await;
    observe(&state, route, started, result)
}

/// `POST /webhook[/{source}]`: Segment's Webhooks destination (Classic or Actions).
///
/// With an `X-Signature` header, the signature must verify against the webhook secret of
/// a source (the one the path names, if any): over the raw body, or over the raw bytes of
/// the first element when the body is a JSON array (Actions batching). Without it, the
/// request authenticates by write key like `/v1/*`, but only for sources that have no
/// webhook secret.
async fn webhook(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<IngestState>,
) -> Result<HttpResponse, IngestError> {
    let started = Instant::now();
    let result = async {
        let named =
            match request.match_info().get("source") {
                Some(slug) => Some(state.sources.by_slug(slug).ok_or(
                    IngestError::Unauthorized {
                        code: "unauthorized",
                        message: "unknown source",
                    },
                )?),
                None => None,
            };
        let body =
            body::read_body(request.headers(), payload, state.limits.max_webhook_bytes).await?;
        state
            .metrics
            .ingest_request_size_bytes
            .observe(body.len() as f64);
        let signature = request
            .headers()
            .get("x-signature")
            .and_then(|v| v.to_str().ok());
        let received_at_ms = now_ms();
        let (source, parsed) = match signature {
            Some(signature) => {
                let signed = segment::first_array_element(&body).unwrap_or(&body);
                let source = state
                    .sources
                    .verify_signature(named, signed, signature)
                    .ok_or(IngestError::Unauthorized {
                        code: "invalid_signature",
                        message: "X-Signature does not match any webhook secret",
                    })?;
                let parsed = segment::parse_webhook(&body, arrival(&state.limits, received_at_ms))?;
                (source, parsed)
            }
            None => {
                let parsed = segment::parse_webhook(&body, arrival(&state.limits, received_at_ms))?;
                let basic = basic_write_key(request.headers());
                let source = state
                    .sources
                    .authenticate(basic.as_deref(), parsed.write_key.as_deref())?;
                if source.has_webhook_secret() || named.is_some_and(|n| !std::ptr::eq(n, source)) {
                    return Err(IngestError::Unauthorized {
                        code: "missing_signature",
                        message: "this source requires an X-Signature header",
                    });
                }
                (source, parsed)
            }
        };
        accept(&state, source, parsed.items, received_at_ms).await
    }
    .await;
    observe(&state, "webhook", started, result)
}

fn arrival(limits: &Limits, received_at_ms: i64) -> Arrival<'_> {
    Arrival {
        received_at_ms,
        limits,
        new_message_id,
    }
}

/// Counts skipped events, appends the accepted ones and answers once they are durable.
async fn accept(
    state: &IngestState,
    source: &SourceAuth,
    items: Vec<Item>,
    received_at_ms: i64,
) -> Result<HttpResponse, IngestError> {
    let mut events = Vec::with_capacity(items.len());
    for item in items {
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
    if events.is_empty() {
        return Ok(success());
    }
    let mut per_type = [0u64; EventType::ALL.len()];
    for event in &events {
        per_type[event.kind as usize] += 1;
    }
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
    if report.duplicates > 0 {
        state
            .metrics
            .ingest_duplicates_total
            .with_label_values(&[&*source.slug])
            .inc_by(report.duplicates as u64);
    }
    Ok(success())
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
    }
    result
}

/// Unmatched routes and methods answer JSON too.
pub async fn not_found() -> Result<HttpResponse, IngestError> {
    Err(IngestError::NotFound)
}
