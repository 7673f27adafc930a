//! `GET /api/live?source=&type=&event=&user=`: the live feed as server-sent events (see
//! `docs/api.md`).
//!
//! Messages: `event: event` (an accepted event), `event: outcome` (what delivery made of
//! it), `event: sampled` with `{"skipped": n, "of", "per_second"}` when the feed's sample
//! left `n` messages of the last second out, or with `{"dropped": n}` when this client fell
//! behind and lost `n` messages, and a `: ping` comment every [`PING`]. Filters are applied here, before
//! anything is written. At most `delivery_log.max_live_clients` clients at once: the next
//! is answered 503 with `Retry-After`.

use std::time::Duration;

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use super::activity::ActivityState;
use super::error::ApiError;
use super::{authorized_query, request_id, respond, ManagementState};
use crate::activity::live::{LiveFilter, Subscription};

/// How often an idle stream sends a comment (keeps proxies from closing it).
pub const PING: Duration = Duration::from_secs(15);
/// Longest filter value accepted.
const MAX_FILTER_CHARS: usize = 1024;

/// `GET /api/live`
pub(super) async fn live(
    request: HttpRequest,
    state: web::Data<ManagementState>,
    activity: web::Data<ActivityState>,
) -> HttpResponse {
    let filter = authorized_query(&request, &state).and_then(|params| {
        params.only(&["source", "type", "event", "user"])?;
        let get = |name: &str| -> Result<Option<String>, ApiError> {
            match params.one(name)? {
                Some(v) if v.is_empty() || v.chars().count() > MAX_FILTER_CHARS => {
                    Err(ApiError::parameter(
                        name,
                        format!("`{name}` must be 1 to {MAX_FILTER_CHARS} characters"),
                    ))
                }
                other => Ok(other.map(str::to_string)),
            }
        };
        let filter = LiveFilter {
            source: get("source")?,
            kind: get("type")?,
            event: get("event")?,
            user: get("user")?,
        };
        if let Some(source) = &filter.source {
            state.source(source)?;
        }
        Ok(filter)
    });
    let filter = match filter {
        Ok(filter) => filter,
        Err(e) => return respond(&request, Err(e)),
    };
    let Some(subscription) = activity.activity.live.subscribe(&filter) else {
        return too_many_clients(&request_id(&request));
    };
    let stream = futures_util::stream::unfold(
        Client {
            subscription,
            filter,
            ping: tokio::time::interval_at(tokio::time::Instant::now() + PING, PING),
            started: false,
        },
        |mut client| async move {
            let chunk = client.next_chunk().await?;
            Some((Ok::<_, actix_web::Error>(chunk), client))
        },
    );
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(stream)
}

/// One watching client.
struct Client {
    /// Released when the client goes (the stream is dropped).
    subscription: Subscription,
    filter: LiveFilter,
    ping: tokio::time::Interval,
    started: bool,
}

impl Client {
    /// The next bytes to send, `None` when the feed is gone.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if !self.started {
            // Sent at once, so the client sees the stream open before any event.
            self.started = true;
            return Some(Bytes::from_static(b": live\n\n"));
        }
        loop {
            tokio::select! {
                message = self.subscription.receiver.recv() => match message {
                    Ok(published) if self.filter.matches(&published.message) => {
                        return Some(published.frame.clone())
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(dropped)) => {
                        let data = json!({"dropped": dropped});
                        return Some(Bytes::from(format!("event: sampled\ndata: {data}\n\n")));
                    }
                    Err(RecvError::Closed) => return None,
                },
                _ = self.ping.tick() => return Some(Bytes::from_static(b": ping\n\n")),
            }
        }
    }
}

fn too_many_clients(request_id: &str) -> HttpResponse {
    HttpResponse::ServiceUnavailable()
        .insert_header((header::RETRY_AFTER, "5"))
        .json(json!({"error": {
            "message": "too many live clients are connected; retry later",
            "code": 503,
            "reason": "too_many_clients",
            "requestId": request_id,
        }}))
}
