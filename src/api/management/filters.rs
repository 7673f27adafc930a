//! `POST /api/reload` and `POST /api/sources/{source}/preview` (see `docs/filters.md`).
//!
//! - Reload reads the configuration again and applies it as a whole, or refuses it as a
//!   whole with the error naming the key ([`crate::reload`]).
//! - Preview answers what Refiner would receive for events of a source under the routing in
//!   force: each event is parsed and normalized by ingest's own parser, then decided and
//!   mapped by the code delivery runs ([`crate::dispatch::routing::Routing::preview`]).
//!   Nothing is stored or sent. The body is bounded ([`MAX_PREVIEW_BYTES`],
//!   [`MAX_PREVIEW_EVENTS`]); the credentials are checked before it is read.

use actix_web::{web, HttpResponse};
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{Authorized, Refusal};
use super::resource;
use crate::reload::Reloader;
use crate::segment::{self, Arrival};

/// Largest preview body, in bytes.
pub const MAX_PREVIEW_BYTES: usize = 512 * 1024;
/// Most events one preview takes.
pub const MAX_PREVIEW_EVENTS: usize = 100;

/// Registers the routes inside the `/api` scope.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(resource("/reload", "POST").route(web::post().to(reload)))
        .service(resource("/sources/{source}/preview", "POST").route(web::post().to(preview)));
}

async fn reload(auth: Authorized, reloader: web::Data<Reloader>) -> Result<HttpResponse, Refusal> {
    let outcome = async {
        let reloader = reloader.into_inner();
        let result = web::block(move || reloader.reload())
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        match result {
            Ok(reloaded) => Ok(HttpResponse::Ok().json(reloaded)),
            Err(e) => {
                tracing::warn!(error = %e, "reload refused; the running configuration stays");
                Err(ApiError::parameter("configuration", e.to_string()))
            }
        }
    }
    .await;
    auth.answer(outcome)
}

async fn preview(
    auth: Authorized,
    reloader: web::Data<Reloader>,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, Refusal> {
    let outcome = async {
        let (limits, destinations) = reloader
            .ingest_view(&path)
            .ok_or_else(|| ApiError::UnknownSource(path.to_string()))?;
        let body = read_bounded(payload).await?;
        let batch = is_batch(&body)?;
        let arrival = Arrival {
            received_at_ms: chrono::Utc::now().timestamp_millis(),
            limits: &limits,
            new_message_id: || uuid::Uuid::new_v4().to_string(),
        };
        let parsed = if batch {
            segment::parse_batch_for(&body, arrival, &destinations)
        } else {
            segment::parse_webhook_for(&body, arrival, &destinations)
        }
        .map_err(|e| ApiError::parameter("body", format!("{}: {e}", e.code())))?;
        if let Some(refused) = parsed.refused.first() {
            return Err(ApiError::parameter(
                &format!("batch[{}]", refused.index),
                refused.reason.to_string(),
            ));
        }
        if parsed.items.len() > MAX_PREVIEW_EVENTS {
            return Err(ApiError::parameter(
                "batch",
                format!("at most {MAX_PREVIEW_EVENTS} events per preview"),
            ));
        }
        let routing = reloader.routing().load();
        let results: Vec<Value> = parsed
            .items
            .iter()
            .enumerate()
            .map(|(index, item)| result(&routing, &path, index, item))
            .collect();
        Ok(HttpResponse::Ok().json(json!({ "results": results })))
    }
    .await;
    auth.answer(outcome)
}

/// One event's answer.
fn result(
    routing: &crate::dispatch::routing::Routing,
    source: &str,
    index: usize,
    item: &segment::Item,
) -> Value {
    match item {
        Ok(event) => {
            let payload: Value = serde_json::from_slice(&event.payload).unwrap_or(Value::Null);
            let preview = routing.preview(source, event.kind.as_str(), &payload);
            let mut value = json!({
                "index": index,
                "messageId": event.message_id,
                "type": event.kind.as_str(),
            });
            if let (Value::Object(out), Ok(Value::Object(fields))) =
                (&mut value, serde_json::to_value(&preview))
            {
                out.extend(fields);
            }
            value
        }
        Err(skip) => json!({
            "index": index,
            "messageId": Value::Null,
            "type": Value::Null,
            "outcome": "skipped",
            "reason": skip.as_str(),
            "matched_rules": [],
            "environment": crate::refiner::filters::DEFAULT_ENVIRONMENT,
            "calls": [],
        }),
    }
}

/// Whether the body is `{"batch": [...]}` (else one event object, or an array of them).
fn is_batch(body: &[u8]) -> Result<bool, ApiError> {
    #[derive(serde::Deserialize)]
    struct Probe {
        batch: Option<serde::de::IgnoredAny>,
    }
    match serde_json::from_slice::<Probe>(body) {
        Ok(probe) => Ok(probe.batch.is_some()),
        Err(e) if e.is_data() => Ok(false),
        Err(e) => Err(ApiError::parameter(
            "body",
            format!("invalid_json: the body is not JSON: {e}"),
        )),
    }
}

/// The body, at most [`MAX_PREVIEW_BYTES`] (413 beyond).
async fn read_bounded(mut payload: web::Payload) -> Result<web::BytesMut, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::parameter("body", format!("unreadable body: {e}")))?;
        if body.len() + chunk.len() > MAX_PREVIEW_BYTES {
            return Err(ApiError::BodyTooLarge(MAX_PREVIEW_BYTES));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
