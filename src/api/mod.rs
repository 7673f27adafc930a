//! Operational routes: liveness, readiness and Prometheus metrics.
//!
//! `/healthz` answers 200 while the process serves HTTP. `/readyz` answers 200 only once
//! start-up has finished (the spool opened and recovered, delivery started) and while the
//! spool accepts a durable write, and 503 with `Retry-After` otherwise, so a load balancer
//! stops sending traffic to a node that could not keep it. Each check also sets the
//! `gateway_ready` gauge.

pub mod management;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use actix_web::{http::header, web, HttpResponse};

use crate::spool::Spool;
use crate::telemetry::Metrics;

/// What the operational routes read.
pub struct OpsState {
    pub spool: Arc<dyn Spool>,
    pub metrics: Metrics,
    /// False until start-up has finished; see [`crate::startup::Application`].
    pub started: Arc<AtomicBool>,
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics));
    management::configure(cfg);
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

async fn metrics(state: web::Data<OpsState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render())
}
