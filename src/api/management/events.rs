//! `GET /api/events/{source}?message_id=|user_id=|email=`: where an event is and what
//! became of it, from the delivery log and the queue (see `docs/api.md`).
//!
//! Exactly one key; at most [`MAX_RESULTS`] events, newest first. Events still queued take
//! their state from the queue (queued, leased, retrying until a time); delivered, skipped,
//! dead and refused ones from the log, within its retention.

use actix_web::{web, HttpResponse};
use serde_json::{json, Value};

use super::activity::ActivityState;
use super::error::ApiError;
use super::extract::{Authorized, Refusal};
use super::params::iso;
use crate::spool::delivery_log::{CallView, LogKey, LogQuery, LoggedEvent, MAX_RESULTS};

/// Longest key accepted.
const MAX_KEY_CHARS: usize = 1024;

/// `GET /api/events/{source}`
pub(super) async fn lookup(
    auth: Authorized,
    path: web::Path<String>,
    activity: web::Data<ActivityState>,
) -> Result<HttpResponse, Refusal> {
    let (params, state) = (&auth.params, &auth.state);
    let outcome = async {
        let source = state.source(&path)?.slug.clone();
        params.only(&["message_id", "user_id", "email"])?;
        let mut keys = Vec::new();
        for (name, make) in [
            ("message_id", LogKey::MessageId as fn(String) -> LogKey),
            ("user_id", LogKey::UserId),
            ("email", LogKey::Email),
        ] {
            if let Some(value) = params.one(name)? {
                if value.is_empty() || value.chars().count() > MAX_KEY_CHARS {
                    return Err(ApiError::parameter(
                        name,
                        format!("`{name}` must be 1 to {MAX_KEY_CHARS} characters"),
                    ));
                }
                keys.push(make(value.to_string()));
            }
        }
        let [key] = <[LogKey; 1]>::try_from(keys).map_err(|_| {
            ApiError::parameter(
                "message_id",
                "give exactly one of `message_id`, `user_id` and `email`",
            )
        })?;
        // Without a log (`delivery_log.enabled = false`) there is nothing to find, as on
        // the embedded spool, whose log is then empty.
        let found = match activity.log.as_ref() {
            Some(log) => {
                log.find_events(LogQuery {
                    source,
                    key,
                    limit: MAX_RESULTS,
                })
                .await?
            }
            None => Vec::new(),
        };
        let results: Vec<Value> = found.iter().map(event_json).collect();
        Ok(HttpResponse::Ok().json(json!({"count": results.len(), "results": results})))
    }
    .await;
    auth.answer(outcome)
}

/// One event as the lookup answers it.
pub(crate) fn event_json(e: &LoggedEvent) -> Value {
    let payload: Value =
        serde_json::from_str(&e.payload).unwrap_or_else(|_| Value::String(e.payload.clone()));
    let calls: Vec<Value> = e.calls.iter().map(CallView::to_json).collect();
    let attempts: Vec<Value> = e
        .attempts
        .iter()
        .map(|a| {
            json!({
                "at": iso(a.at_ms),
                "status": a.status,
                "latency_ms": a.latency_ms,
                "response_body": a.response_body,
                "error": a.error,
            })
        })
        .collect();
    json!({
        "messageId": e.message_id,
        "source": e.source,
        "type": e.kind,
        "event": e.event,
        "userId": e.user_id,
        "email": e.email,
        "received_at": iso(e.received_at_ms),
        "state": e.state.as_str(),
        "next_attempt_at": e.next_attempt_at_ms.map(iso),
        "reason": e.reason,
        "payload": payload,
        "calls": calls,
        "attempts": attempts,
    })
}
