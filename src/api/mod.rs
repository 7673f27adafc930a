//! Operational routes: liveness, readiness and Prometheus metrics.
//!
//! `/healthz` answers 200 while the process serves HTTP. `/readyz` answers 200 only when
//! the spool has just accepted a durable write, and 503 with `Retry-After` otherwise, so
//! a load balancer stops sending traffic to a node that could not keep it.

use std::sync::Arc;

use actix_web::{http::header, web, HttpResponse};

use crate::spool::Spool;
use crate::telemetry::Metrics;

/// What the operational routes read.
pub struct OpsState {
    pub spool: Arc<dyn Spool>,
    pub metrics: Metrics,
}

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics));
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

async fn readyz(state: web::Data<OpsState>) -> HttpResponse {
    match state.spool.check_writable().await {
        Ok(()) => HttpResponse::Ok().json(serde_json::json!({"status": "ready"})),
        Err(e) => {
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
