//! Errors of the ingest edge and the HTTP answers they become.
//!
//! Every error body is JSON with `code` and `message`: Segment's Python client only stops
//! retrying a 400 when both are present. 5xx bodies are opaque; the cause is logged once,
//! here, at the boundary.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

use crate::segment::Reject;
use crate::spool::SpoolError;

/// Seconds a client is asked to wait after a 429 (overload).
pub const OVERLOAD_RETRY_AFTER_SECS: u64 = 1;
/// Seconds a client is asked to wait after a 503 (storage trouble, or a body that did not
/// arrive in time).
pub const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 5;
/// Seconds a client is asked to wait after a 503 because the body budget was spent: the
/// bytes it waits for are returned as soon as the requests holding them are answered.
pub const BUDGET_RETRY_AFTER_SECS: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Rejected(#[from] Reject),
    #[error("the body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the body is not valid gzip")]
    InvalidGzip,
    #[error("Content-Encoding `{0}` is not supported; send identity or gzip")]
    UnsupportedEncoding(String),
    #[error("the body could not be read: {0}")]
    UnreadableBody(String),
    #[error("{message}")]
    Unauthorized {
        code: &'static str,
        message: &'static str,
    },
    #[error("the gateway is overloaded; retry after {OVERLOAD_RETRY_AFTER_SECS} s")]
    Overloaded,
    #[error("the gateway cannot store events right now; retry later")]
    Unavailable(String),
    #[error(
        "the gateway holds as many request bodies as it may; retry after \
         {BUDGET_RETRY_AFTER_SECS} s"
    )]
    BodyBudgetExhausted,
    #[error("the body did not arrive in time; retry after {UNAVAILABLE_RETRY_AFTER_SECS} s")]
    BodyTimeout,
    #[error("no such route")]
    NotFound,
}

impl From<SpoolError> for IngestError {
    fn from(e: SpoolError) -> Self {
        match e {
            SpoolError::Overloaded => IngestError::Overloaded,
            other => IngestError::Unavailable(other.to_string()),
        }
    }
}

impl IngestError {
    /// The stable machine-readable code (documented in `docs/limits-and-errors.md`).
    pub fn code(&self) -> &'static str {
        match self {
            IngestError::Rejected(reject) => reject.code(),
            IngestError::PayloadTooLarge { .. } => "payload_too_large",
            IngestError::InvalidGzip => "invalid_gzip",
            IngestError::UnsupportedEncoding(_) => "unsupported_content_encoding",
            IngestError::UnreadableBody(_) => "invalid_body",
            IngestError::Unauthorized { code, .. } => code,
            IngestError::Overloaded => "overloaded",
            IngestError::Unavailable(_) => "unavailable",
            IngestError::BodyBudgetExhausted => "body_budget_exhausted",
            IngestError::BodyTimeout => "body_timeout",
            IngestError::NotFound => "not_found",
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: String,
}

impl ResponseError for IngestError {
    fn status_code(&self) -> StatusCode {
        match self {
            IngestError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            IngestError::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            IngestError::Unavailable(_)
            | IngestError::BodyBudgetExhausted
            | IngestError::BodyTimeout => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::NotFound => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        match self {
            IngestError::Overloaded => {
                let reset_ms = chrono::Utc::now().timestamp_millis()
                    + (OVERLOAD_RETRY_AFTER_SECS * 1000) as i64;
                response
                    .insert_header((header::RETRY_AFTER, OVERLOAD_RETRY_AFTER_SECS.to_string()))
                    .insert_header(("X-RateLimit-Reset", reset_ms.to_string()));
            }
            IngestError::Unavailable(cause) => {
                tracing::error!(%cause, "ingest answered 503");
                response.insert_header((
                    header::RETRY_AFTER,
                    UNAVAILABLE_RETRY_AFTER_SECS.to_string(),
                ));
            }
            // Counted in metrics, not logged one by one: under a flood of slow or large
            // bodies these are many, and each says the same.
            IngestError::BodyBudgetExhausted => {
                response.insert_header((header::RETRY_AFTER, BUDGET_RETRY_AFTER_SECS.to_string()));
            }
            IngestError::BodyTimeout => {
                response.insert_header((
                    header::RETRY_AFTER,
                    UNAVAILABLE_RETRY_AFTER_SECS.to_string(),
                ));
            }
            _ => {}
        }
        response.json(ErrorBody {
            code: self.code(),
            message: self.to_string(),
        })
    }
}
