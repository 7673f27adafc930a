//! The management API under `/api` (see `docs/api.md` and `docs/openapi.yaml`): dead
//! letters (list, show, replay, delete, purge), a source's profile with its usage for the
//! month, and hourly or daily event counters.
//!
//! Conventions:
//! - Every route needs the admin token or a console session cookie ([`auth`]); without a
//!   configured token the whole API answers 403. The check comes first, so an unauthenticated caller learns nothing about
//!   sources or routes: handlers take the `Authorized` (or `AuthorizedBody`) extractor,
//!   which checks before the handler runs (`extract`).
//! - Errors are `{"error": {"message", "code", "reason", "requestId"}}` ([`error`]),
//!   returned by handlers as a `Refusal`, which actix renders through `ResponseError`; every
//!   answer carries `X-Request-Id` (set by the request-id middleware).
//! - Lists answer `{"count", "next", "previous", "results"}`; `next` and `previous` are
//!   URLs whose `cursor` makes the following page a keyset read, as fast at page 1,000 as
//!   at page 1. A `page` without a cursor is an offset into an index, read from the nearer
//!   end. Links repeat the request's parameters except `api_key`: the token is never
//!   written into an answer.
//! - Handlers only parse, call the [`Spool`] trait and shape the answer: the API never
//!   touches storage directly.

pub mod activity;
pub(crate) mod auth;
pub mod error;
mod events;
mod extract;
mod filters;
mod live;
mod overview;
mod params;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use actix_web::http::header::CONTENT_TYPE;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::config::Settings;
use crate::request_id::RequestId;
use crate::spool::admin::{DeadLetterQuery, DeadLetterSummary, PageAt, HOUR_MS};
use crate::spool::{Backend, DeadLetters, Metering};
use error::ApiError;
use extract::{Authorized, AuthorizedBody, Refusal};
use params::{iso, PageCursor, Params, DEFAULT_PAGE_SIZE, MAX_BODY_BYTES, MAX_PAGE_SIZE};

/// A configured source as the API shows it (secrets masked).
struct SourceView {
    slug: String,
    write_keys: Vec<String>,
    webhook_signature: bool,
    refiner_api_key: Option<String>,
}

/// What the management routes share.
pub struct ManagementState {
    dead_letters: Arc<dyn DeadLetters>,
    /// `None` for a backend without usage counters: those routes answer 501.
    metering: Option<Arc<dyn Metering>>,
    /// SHA-256 of the admin token; `None` disables the API.
    admin: Option<[u8; 32]>,
    sources: Vec<SourceView>,
    refiner_base_url: String,
}

impl ManagementState {
    pub fn new(settings: &Settings, backend: &Backend) -> ManagementState {
        ManagementState {
            dead_letters: backend.dead_letters.clone(),
            metering: backend.metering.clone(),
            admin: settings
                .admin_token
                .as_ref()
                .map(|token| auth::digest(token.expose())),
            sources: settings
                .sources
                .iter()
                .map(|s| SourceView {
                    slug: s.slug.clone(),
                    write_keys: s.write_keys.iter().map(|k| k.masked()).collect(),
                    webhook_signature: s.webhook_secret.is_some(),
                    refiner_api_key: s.refiner_api_key.as_ref().map(|k| k.masked()),
                })
                .collect(),
            refiner_base_url: settings.refiner.base_url.clone(),
        }
    }

    /// The backend's usage counters, or 501 naming what is missing.
    fn metering(&self, what: &str) -> Result<&dyn Metering, ApiError> {
        self.metering.as_deref().ok_or_else(|| {
            ApiError::NotSupported(format!("this spool backend does not keep {what}"))
        })
    }

    fn source(&self, slug: &str) -> Result<&SourceView, ApiError> {
        self.sources
            .iter()
            .find(|s| s.slug == slug)
            .ok_or_else(|| ApiError::UnknownSource(slug.to_string()))
    }
}

/// Registers the routes. `ManagementState` must be in the app data.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::scope("/api")
            .service(resource("", "GET").route(web::get().to(version)))
            .service(
                resource("/events/{source}/dead-letters", "GET, DELETE")
                    .route(web::get().to(list))
                    .route(web::delete().to(purge)),
            )
            .service(
                resource("/events/{source}/dead-letters/replay", "POST")
                    .route(web::post().to(replay)),
            )
            .service(
                resource("/events/{source}/dead-letters/{id}", "GET, DELETE")
                    .route(web::get().to(show))
                    .route(web::delete().to(delete_one)),
            )
            .service(resource("/events/{source}", "GET").route(web::get().to(events::lookup)))
            .service(resource("/live", "GET").route(web::get().to(live::live)))
            .service(resource("/overview", "GET").route(web::get().to(overview::overview)))
            .service(resource("/profile/{source}", "GET").route(web::get().to(profile)))
            .service(resource("/metrics/{source}/events", "GET").route(web::get().to(metrics)))
            .configure(filters::configure)
            .default_service(web::to(not_found)),
    );
}

/// A route whose other methods answer 405 with `Allow: allowed`, in the API's envelope.
fn resource(path: &str, allowed: &'static str) -> actix_web::Resource {
    web::resource(path).default_service(web::to(move |auth: Authorized| not_allowed(auth, allowed)))
}

fn request_id(request: &HttpRequest) -> String {
    request
        .extensions()
        .get::<RequestId>()
        .map(|id| id.0.clone())
        .unwrap_or_default()
}

/// The answer of a handler's outcome.
fn respond(request: &HttpRequest, outcome: Result<HttpResponse, ApiError>) -> HttpResponse {
    match outcome {
        Ok(response) => response,
        Err(e) => {
            tracing::debug!(reason = e.reason(), "management request refused");
            e.response(&request_id(request))
        }
    }
}

/// The query's parameters, after checking the credentials they and the headers carry.
fn authorized_query(request: &HttpRequest, state: &ManagementState) -> Result<Params, ApiError> {
    // A malformed query string must not hide a missing token: check the header first.
    let params = match Params::from_query(request.query_string()) {
        Ok(params) => params,
        Err(e) => {
            auth::authorize_request(request, state.admin.as_ref(), &[])?;
            return Err(e);
        }
    };
    auth::authorize_request(request, state.admin.as_ref(), &params.api_keys())?;
    Ok(params)
}

/// The query's and the body's parameters, after checking the credentials.
async fn authorized_body(
    request: &HttpRequest,
    state: &ManagementState,
    mut payload: web::Payload,
) -> Result<Params, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::parameter("body", format!("unreadable body: {e}")))?;
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            auth::authorize_request(request, state.admin.as_ref(), &[])?;
            return Err(ApiError::BodyTooLarge(MAX_BODY_BYTES));
        }
        body.extend_from_slice(&chunk);
    }
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut params = match Params::from_query(request.query_string()) {
        Ok(params) => params,
        Err(e) => {
            auth::authorize_request(request, state.admin.as_ref(), &[])?;
            return Err(e);
        }
    };
    if let Err(e) = params.add_body(&content_type, &body) {
        auth::authorize_request(request, state.admin.as_ref(), &params.api_keys())?;
        return Err(e);
    }
    auth::authorize_request(request, state.admin.as_ref(), &params.api_keys())?;
    Ok(params)
}

async fn not_found(request: HttpRequest, auth: Authorized) -> Result<HttpResponse, Refusal> {
    auth.answer(Err(ApiError::NotFound(format!(
        "no route {}",
        request.path()
    ))))
}

async fn not_allowed(auth: Authorized, allowed: &'static str) -> Result<HttpResponse, Refusal> {
    auth.answer(Err(ApiError::MethodNotAllowed(allowed)))
}

/// `GET /api`
async fn version(auth: Authorized) -> Result<HttpResponse, Refusal> {
    auth.answer(auth.params.only(&[]).map(|_| {
        HttpResponse::Ok().json(json!({
            "name": "refiner-gateway",
            "version": env!("CARGO_PKG_VERSION"),
        }))
    }))
}

/// Longest `last_error` shown in a listing row (the whole one is in the single item).
const LISTED_ERROR_CHARS: usize = 200;

fn printable_name(item: &DeadLetterSummary) -> String {
    let who = item.user_key.describe();
    match &item.event {
        Some(event) => format!("{} \"{event}\" of {who}", item.kind),
        None => format!("{} of {who}", item.kind),
    }
}

fn summary_json(item: &DeadLetterSummary, full_error: bool) -> Value {
    let last_error = if full_error || item.last_error.chars().count() <= LISTED_ERROR_CHARS {
        item.last_error.clone()
    } else {
        let cut: String = item.last_error.chars().take(LISTED_ERROR_CHARS).collect();
        format!("{cut}…")
    };
    json!({
        "id": item.id,
        "messageId": item.message_id,
        "type": item.kind,
        "userId": item.user_id,
        "event": item.event,
        "created_at": iso(item.created_at_ms),
        "received_at": iso(item.received_at_ms),
        "attempts": item.attempts,
        "last_status": item.last_status,
        "last_error": last_error,
        "printable_name": printable_name(item),
    })
}

/// A URL of this listing for `page`, optionally at a cursor; the other parameters stay.
fn page_url(request: &HttpRequest, params: &Params, page: u64, cursor: Option<String>) -> String {
    let mut url = request.full_url();
    let mut pairs: Vec<(String, String)> = params
        .pairs
        .iter()
        // The admin token never travels in a link: links end up in logs, browser histories
        // and terminals, and a client that authenticated by `api_key` adds it again.
        .filter(|(name, _)| name != "page" && name != "cursor" && name != "api_key")
        .cloned()
        .collect();
    pairs.push(("page".into(), page.to_string()));
    if let Some(cursor) = cursor {
        pairs.push(("cursor".into(), cursor));
    }
    url.query_pairs_mut().clear().extend_pairs(pairs);
    url.to_string()
}

/// `GET /api/events/{source}/dead-letters`
async fn list(
    auth: Authorized,
    request: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, Refusal> {
    let (params, state) = (&auth.params, &auth.state);
    let outcome = async {
        let source = state.source(&path)?;
        params.only(&[
            "start_at",
            "ends_at",
            "q",
            "q_f",
            "status",
            "o",
            "page",
            "page_size",
            "cursor",
        ])?;
        let filter = params.filter(&source.slug, false)?;
        let (sort, descending) = params.order()?;
        let order = format!("{}{}", if descending { "-" } else { "" }, sort.name());
        let page_size = params
            .number("page_size", 1, MAX_PAGE_SIZE)?
            .unwrap_or(DEFAULT_PAGE_SIZE);
        let requested_page = params.number("page", 1, 1_000_000_000)?.unwrap_or(1);
        let cursor = params
            .one("cursor")?
            .map(|text| PageCursor::decode(text, &order, sort))
            .transpose()?;
        let (page, at) = match &cursor {
            Some(c) if c.after => (c.page, PageAt::After(c.cursor.clone())),
            Some(c) => (c.page, PageAt::Before(c.cursor.clone())),
            None => (
                requested_page,
                PageAt::Offset((requested_page - 1) * page_size),
            ),
        };
        let result = state
            .dead_letters
            .list_dead_letters(DeadLetterQuery {
                filter,
                sort,
                descending,
                at: at.clone(),
                limit: page_size as u32,
            })
            .await?;
        let last_page = result.count.div_ceil(page_size).max(1);
        let link = |page: u64, after: bool, item: Option<&DeadLetterSummary>| {
            let cursor = item.map(|item| {
                PageCursor {
                    order: order.clone(),
                    after,
                    cursor: item.cursor.clone(),
                    page,
                }
                .encode()
            });
            page_url(&request, params, page, cursor)
        };
        let (first, last) = (result.items.first(), result.items.last());
        let rows_after = match at {
            PageAt::Before(_) => last.is_some(),
            _ => result.more,
        };
        let rows_before = match at {
            PageAt::Before(_) => result.more,
            _ => page > 1,
        };
        let next = (rows_after && last.is_some()).then(|| link(page + 1, true, last));
        let previous = if !rows_before || page <= 1 {
            None
        } else if page == 2 {
            Some(link(1, false, None))
        } else if first.is_some() {
            Some(link(page - 1, false, first))
        } else {
            // Past the last page: back to the last one.
            Some(link(last_page.min(page - 1), false, None))
        };
        let results: Vec<Value> = result
            .items
            .iter()
            .map(|item| summary_json(item, false))
            .collect();
        Ok(HttpResponse::Ok().json(json!({
            "count": result.count,
            "next": next,
            "previous": previous,
            "results": results,
        })))
    }
    .await;
    auth.answer(outcome)
}

fn dead_letter_id(text: &str) -> Result<i64, ApiError> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| ApiError::NotFound(format!("no dead letter `{text}`")))
}

/// `GET /api/events/{source}/dead-letters/{id}`
async fn show(
    auth: Authorized,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, Refusal> {
    let (params, state) = (&auth.params, &auth.state);
    let outcome = async {
        let (slug, id) = path.into_inner();
        let source = state.source(&slug)?;
        params.only(&[])?;
        let id = dead_letter_id(&id)?;
        let letter = state
            .dead_letters
            .dead_letter(&source.slug, id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no dead letter {id} in `{slug}`")))?;
        let mut body = summary_json(&letter.summary, true);
        body["source"] = json!(letter.summary.source);
        body["user_key"] = json!(letter.summary.user_key.as_str());
        body["payload"] = serde_json::from_slice::<Value>(&letter.payload)
            .unwrap_or_else(|_| json!(String::from_utf8_lossy(&letter.payload)));
        body["history"] = letter
            .attempts
            .iter()
            .map(|a| json!({"at": iso(a.at_ms), "status": a.status, "error": a.error}))
            .collect();
        Ok(HttpResponse::Ok().json(body))
    }
    .await;
    auth.answer(outcome)
}

/// `DELETE /api/events/{source}/dead-letters/{id}`
async fn delete_one(
    AuthorizedBody(auth): AuthorizedBody,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, Refusal> {
    let (params, state) = (&auth.params, &auth.state);
    let outcome = async {
        let (slug, id) = path.into_inner();
        let source = state.source(&slug)?;
        params.only(&[])?;
        let id = dead_letter_id(&id)?;
        let deleted = state
            .dead_letters
            .delete_dead_letters(crate::spool::admin::DeadLetterFilter {
                source: source.slug.clone(),
                ids: Some(vec![id]),
                ..Default::default()
            })
            .await?;
        if deleted == 0 {
            return Err(ApiError::NotFound(format!(
                "no dead letter {id} in `{slug}`"
            )));
        }
        Ok(HttpResponse::Ok().json(json!({ "deleted": deleted })))
    }
    .await;
    auth.answer(outcome)
}

/// `DELETE /api/events/{source}/dead-letters`: deletes what the filters select (all of
/// the source's dead letters without any).
async fn purge(
    AuthorizedBody(auth): AuthorizedBody,
    path: web::Path<String>,
) -> Result<HttpResponse, Refusal> {
    let (params, state) = (&auth.params, &auth.state);
    let outcome = async {
        let source = state.source(&path)?;
        params.only(&["ids", "start_at", "ends_at", "q", "q_f", "status"])?;
        let filter = params.filter(&source.slug, true)?;
        let deleted = state.dead_letters.delete_dead_letters(filter).await?;
        Ok(HttpResponse::Ok().json(json!({ "deleted": deleted })))
    }
    .await;
    auth.answer(outcome)
}

/// `POST /api/events/{source}/dead-letters/replay`
async fn replay(
    AuthorizedBody(auth): AuthorizedBody,
    path: web::Path<String>,
) -> Result<HttpResponse, Refusal> {
    let (params, state) = (&auth.params, &auth.state);
    let outcome = async {
        let source = state.source(&path)?;
        params.only(&[
            "ids", "start_at", "ends_at", "q", "q_f", "status", "limit", "until_id",
        ])?;
        let mut filter = params.filter(&source.slug, true)?;
        filter.max_id = params
            .number("until_id", 1, i64::MAX as u64)?
            .map(|id| id as i64);
        let limit = params.number("limit", 1, u64::MAX)?;
        let report = state
            .dead_letters
            .replay_dead_letters(filter, limit)
            .await?;
        Ok(HttpResponse::Ok().json(json!({
            "replayed": report.replayed,
            "remaining": report.remaining,
        })))
    }
    .await;
    auth.answer(outcome)
}

/// `GET /api/profile/{source}`
async fn profile(auth: Authorized, path: web::Path<String>) -> Result<HttpResponse, Refusal> {
    let (params, state) = (&auth.params, &auth.state);
    let outcome = async {
        let source = state.source(&path)?;
        params.only(&[])?;
        let now = chrono::Utc::now().timestamp_millis();
        let usage = state
            .metering("usage counters")?
            .usage(&source.slug, now)
            .await?;
        let at = |ms: Option<i64>| ms.map(iso);
        Ok(HttpResponse::Ok().json(json!({
            "slug": source.slug,
            "printable_name": source.slug,
            "created_at": at(usage.created_at_ms),
            "write_keys": source.write_keys,
            "webhook_signature": source.webhook_signature,
            "destination": {
                "type": "refiner",
                "base_url": state.refiner_base_url,
                "api_key": source.refiner_api_key,
            },
            "usage": {
                "month": usage.month,
                "mtu_count": usage.mtu,
                "mtu_count_updated_at": at(usage.mtu_updated_at_ms),
                "mte_count": usage.mte,
                "mte_count_updated_at": at(usage.mte_updated_at_ms),
                "mpv_count": usage.mpv,
                "mpv_count_updated_at": at(usage.mpv_updated_at_ms),
            },
            "backlog": {
                "events": usage.backlog,
                "oldest_received_at": at(usage.oldest_undelivered_ms),
                "oldest_age_seconds": usage
                    .oldest_undelivered_ms
                    .map(|ms| ((now - ms).max(0) as f64) / 1000.0),
            },
            "dead_letters": usage.dead_letters,
        })))
    }
    .await;
    auth.answer(outcome)
}

/// The rows every metrics table has, in order; `skipped:<reason>` rows follow.
const METRIC_KEYS: [&str; 7] = [
    "received",
    "duplicates",
    "forwarded",
    "skipped",
    "retried",
    "dead_lettered",
    "replayed",
];
/// Most periods one metrics table may span.
const MAX_PERIODS: i64 = 1000;

/// `GET /api/metrics/{source}/events`
async fn metrics(auth: Authorized, path: web::Path<String>) -> Result<HttpResponse, Refusal> {
    let (params, state) = (&auth.params, &auth.state);
    let outcome = async {
        let source = state.source(&path)?;
        params.only(&["start_at", "ends_at", "period"])?;
        let span = Span::of(params)?;
        let rows = state
            .metering("event counters")?
            .counters(&source.slug, span.start / HOUR_MS, span.end / HOUR_MS)
            .await?;
        Ok(HttpResponse::Ok().json(json!({
            "title": format!("Events of {} by {}", source.slug, span.period),
            "scale": 1,
            "unit": "events",
            "period": span.period,
            "start_at": iso(span.start),
            "ends_at": iso(span.end),
            "table": span.table(rows),
        })))
    }
    .await;
    auth.answer(outcome)
}

/// The periods a metrics table covers: whole hours or days from `start` to `end`.
struct Span {
    period: &'static str,
    period_ms: i64,
    start: i64,
    end: i64,
    periods: i64,
}

impl Span {
    /// From `period`, `start_at` and `ends_at` (the last 24 hours or 30 days by default),
    /// rounded out to whole periods and bounded to [`MAX_PERIODS`].
    fn of(params: &Params) -> Result<Span, ApiError> {
        let (period, period_ms, default_periods) = match params.one("period")? {
            None | Some("hour") => ("hour", HOUR_MS, 24),
            Some("day") => ("day", 24 * HOUR_MS, 30),
            Some(other) => {
                return Err(ApiError::parameter(
                    "period",
                    format!("`period` must be `hour` or `day`, got `{other}`"),
                ))
            }
        };
        let now = chrono::Utc::now().timestamp_millis();
        let end = params
            .date("ends_at")?
            .unwrap_or(now.div_euclid(period_ms) * period_ms + period_ms);
        let end = end.div_euclid(period_ms) * period_ms
            + if end.rem_euclid(period_ms) > 0 {
                period_ms
            } else {
                0
            };
        let start = params
            .date("start_at")?
            .unwrap_or(end - default_periods * period_ms);
        let start = start.div_euclid(period_ms) * period_ms;
        if start >= end {
            return Err(ApiError::parameter(
                "ends_at",
                "`ends_at` must be after `start_at`",
            ));
        }
        let periods = (end - start) / period_ms;
        if periods > MAX_PERIODS {
            return Err(ApiError::parameter(
                "start_at",
                format!(
                    "the table would have {periods} periods; at most {MAX_PERIODS} by {period}"
                ),
            ));
        }
        Ok(Span {
            period,
            period_ms,
            start,
            end,
            periods,
        })
    }

    /// The table: one row per counter key (the fixed keys, then each skip reason seen),
    /// one value per period, hourly counters summed into their period.
    fn table(&self, rows: Vec<crate::spool::admin::CounterRow>) -> Vec<Value> {
        let mut table: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        let mut reasons = BTreeSet::new();
        for row in rows {
            let index = ((row.hour * HOUR_MS - self.start) / self.period_ms) as usize;
            let mut add = |key: &str| {
                let values = table
                    .entry(key.to_string())
                    .or_insert_with(|| vec![0; self.periods as usize]);
                if let Some(slot) = values.get_mut(index) {
                    *slot += row.value;
                }
            };
            if let Some(reason) = row.name.strip_prefix("skipped:") {
                reasons.insert(reason.to_string());
                add("skipped");
            }
            add(&row.name);
        }
        let labels: Vec<String> = (0..self.periods)
            .map(|i| iso(self.start + i * self.period_ms))
            .collect();
        let keys = METRIC_KEYS
            .iter()
            .map(|k| k.to_string())
            .chain(reasons.iter().map(|r| format!("skipped:{r}")));
        keys.map(|key| {
            let values = table
                .remove(&key)
                .unwrap_or_else(|| vec![0; self.periods as usize]);
            let values: Vec<Value> = labels
                .iter()
                .zip(values)
                .map(|(label, value)| json!([label, value]))
                .collect();
            json!({ "key": key, "values": values })
        })
        .collect()
    }
}
