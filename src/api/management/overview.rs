//! `GET /api/overview`: per source, the last hour minute by minute (received, forwarded,
//! skipped by reason, retried, dead-lettered), backlog and oldest event age, breaker
//! state, concurrency, Refiner latency percentiles and the month's usage (see
//! `docs/api.md`).
//!
//! The hour and the latencies are this process's, in memory (see
//! [`crate::activity::minutes`]); backlog and usage come from the spool. The breaker and
//! the concurrency limit are the dispatcher's, shared by all sources.

use actix_web::{web, HttpResponse};
use serde_json::{json, Value};

use super::activity::ActivityState;
use super::error::ApiError;
use super::extract::{Authorized, Refusal};
use super::params::iso;

/// `GET /api/overview`
pub(super) async fn overview(
    auth: Authorized,
    activity: web::Data<ActivityState>,
) -> Result<HttpResponse, Refusal> {
    let (params, state) = (&auth.params, &auth.state);
    let outcome = async {
        params.only(&[])?;
        let now = chrono::Utc::now().timestamp_millis();
        let mut sources = Vec::with_capacity(state.sources.len());
        for source in &state.sources {
            sources.push(source_overview(&activity, &source.slug, now, state.sources.len()).await?);
        }
        Ok(HttpResponse::Ok().json(json!({"generated_at": iso(now), "sources": sources})))
    }
    .await;
    auth.answer(outcome)
}

async fn source_overview(
    activity: &ActivityState,
    slug: &str,
    now: i64,
    source_count: usize,
) -> Result<Value, ApiError> {
    let minutes: Vec<Value> = activity
        .activity
        .minutes
        .last_hour(slug, now)
        .iter()
        .map(|m| {
            json!({
                "at": iso(m.minute * 60_000),
                "received": m.received,
                "forwarded": m.forwarded,
                "skipped": m.skipped,
                "retried": m.retried,
                "dead": m.dead,
            })
        })
        .collect();
    let (backlog, oldest, usage) = match &activity.metering {
        Some(metering) => {
            let u = metering.usage(slug, now).await?;
            let usage = json!({"month": u.month, "mtu": u.mtu, "mte": u.mte, "mpv": u.mpv});
            (Some(u.backlog), u.oldest_undelivered_ms, usage)
        }
        // Without per-source counters, the queue's totals stand for a lone source.
        None if source_count == 1 => {
            let stats = activity.queue.stats().await?;
            (Some(stats.depth), stats.oldest_received_at_ms, Value::Null)
        }
        None => (None, None, Value::Null),
    };
    let latency = activity
        .activity
        .minutes
        .percentiles(slug)
        .map(|p| json!({"p50": p.p50, "p90": p.p90, "p99": p.p99}));
    let (breaker, concurrency) = match &activity.dispatcher {
        Some(d) => (d.breaker_state(), d.concurrency()),
        None => ("closed", 0),
    };
    Ok(json!({
        "source": slug,
        "minutes": minutes,
        "backlog": backlog,
        "oldest_age_secs": oldest.map(|at| (now - at).max(0) / 1000),
        "breaker": breaker,
        "concurrency": concurrency,
        "latency_ms": latency,
        "usage": usage,
    }))
}
