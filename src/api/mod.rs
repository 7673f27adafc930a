//! Operational routes: liveness, readiness and Prometheus metrics.
//!
//! `/healthz` answers 200 while the process serves HTTP. `/readyz` answers 200 only once
//! start-up has finished (the spool opened and recovered, delivery started) and while the
//! spool accepts a durable write, and 503 with `Retry-After` otherwise, so a load balancer
//! stops sending traffic to a node that could not keep it. Each check also sets the
//! `gateway_ready` gauge.
//!
//! `/metrics` is open unless `metrics_token` is set; then it answers 401 to a request
//! without `Authorization: Bearer <metrics_token>`. The token is compared as a SHA-256
//! digest in constant time, like the admin token (see `management::auth`). The probes stay
//! open: the kubelet calls them without credentials and they reveal nothing.

pub mod console;
pub mod management;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix_web::http::header::{self, HeaderMap};
use actix_web::{web, HttpRequest, HttpResponse};
use subtle::ConstantTimeEq;

use crate::spool::Spool;
use crate::telemetry::Metrics;

/// What the operational routes read.
pub struct OpsState {
    pub spool: Arc<dyn Spool>,
    pub metrics: Metrics,
    /// False until start-up has finished; see [`crate::startup::Application`].
    pub started: Arc<AtomicBool>,
    /// Digest of the token `/metrics` requires; `None`: open.
    pub metrics_token: Option<[u8; 32]>,
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics));
    management::configure(cfg);
    console::configure(cfg);
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn readyz(state: web::Data<OpsState>) -> HttpResponse {
    if !state.started.load(Ordering::Acquire) {
        state.metrics.ready.set(0);
        return HttpResponse::ServiceUnavailable()
            .insert_header((header::RETRY_AFTER, "5"))
            .json(serde_json::json!({"code": "not_ready", "message": "the gateway is starting"}));
    }
    match state.spool.check_writable().await {
        Ok(()) => {
            state.metrics.ready.set(1);
            HttpResponse::Ok().json(serde_json::json!({"status": "ready"}))
        }
        Err(e) => {
            state.metrics.ready.set(0);
            tracing::warn!(error = %e, "readiness probe failed");
            HttpResponse::ServiceUnavailable()
                .insert_header((header::RETRY_AFTER, "5"))
                .json(serde_json::json!({"code": "not_ready", "message": "the spool is not writable"}))
        }
    }
}

async fn metrics(request: HttpRequest, state: web::Data<OpsState>) -> HttpResponse {
    if let Some(expected) = &state.metrics_token {
        if !bearer_matches(request.headers(), expected) {
            return HttpResponse::Unauthorized()
                .insert_header((header::WWW_AUTHENTICATE, "Bearer realm=\"metrics\""))
                .json(serde_json::json!({
                    "code": "unauthorized",
                    "message": "/metrics requires `Authorization: Bearer <metrics_token>`",
                }));
        }
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}

/// Whether the request carries `Authorization: Bearer <token>` with the expected token.
fn bearer_matches(headers: &HeaderMap, expected: &[u8; 32]) -> bool {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, token) = value.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_string())
        })
        .unwrap_or_default();
    management::auth::digest(&presented).ct_eq(expected).into()
}
