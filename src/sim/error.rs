//! The simulator's `/v1` refusals and the answers they become.
//!
//! Every refusal is `{"error": "..."}` with one of the codes Refiner documents (400, 401, 404;
//! 405 for a known path called with the wrong method). 429/500/503 come from fault injection,
//! never from here, so a test that sees them knows it asked for them.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

/// Why a `/v1` call was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SimError {
    /// 400: the request is invalid (missing identifier, bad body, over-long string, ...).
    #[error("{0}")]
    BadRequest(String),
    /// 401: no API key, or one the simulator does not know.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 404: no such contact, or no such route.
    #[error("{0}")]
    NotFound(&'static str),
    /// 405: a known path with a method it does not serve.
    #[error("method not allowed")]
    MethodNotAllowed,
}

impl SimError {
    pub(crate) fn bad_request(message: impl Into<String>) -> SimError {
        SimError::BadRequest(message.into())
    }
}

impl ResponseError for SimError {
    fn status_code(&self) -> StatusCode {
        match self {
            SimError::BadRequest(_) => StatusCode::BAD_REQUEST,
            SimError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            SimError::NotFound(_) => StatusCode::NOT_FOUND,
            SimError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code())
            .json(serde_json::json!({ "error": self.to_string() }))
    }
}
