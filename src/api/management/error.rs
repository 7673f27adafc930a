//! The management API's error answers: `{"error": {"message", "code", "reason",
//! "requestId"}}` (and `parameter` for a bad parameter), with `code` the HTTP status.
//!
//! 5xx bodies are opaque; the cause is logged once, here.

use actix_web::http::{header, StatusCode};
use actix_web::HttpResponse;
use serde_json::json;

use crate::spool::SpoolError;

/// Seconds a client is asked to wait after a 429 or 503.
const RETRY_AFTER_SECS: u64 = 1;
/// Seconds a client is asked to wait after too many failed console sign-ins.
const SIGN_IN_RETRY_AFTER_SECS: u64 = 60;

/// Why a management request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// No admin token is configured: the API is off.
    #[error("the management API is disabled: set GATEWAY_ADMIN_TOKEN (admin_token) to enable it")]
    Disabled,
    #[error("an admin token is required (Authorization: Bearer, the api_key parameter, or HTTP Basic with the token as user name)")]
    MissingToken,
    #[error("the admin token is not valid")]
    InvalidToken,
    #[error("{message}")]
    InvalidParameter { parameter: String, message: String },
    #[error("no source `{0}` is configured")]
    UnknownSource(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed; this route accepts {0}")]
    MethodNotAllowed(&'static str),
    #[error("the request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("the spool is overloaded; retry shortly")]
    Overloaded,
    #[error("the spool is unavailable; retry later")]
    Unavailable(String),
    /// The configured spool backend does not offer the operation.
    #[error("{0}")]
    NotSupported(String),
    /// A console session cookie that names no live session (expired, signed out, unknown).
    #[error("the console session has expired or was signed out; sign in again")]
    InvalidSession,
    /// A cookie-authenticated action without the session's CSRF token or from another site.
    #[error("cross-site request refused: {0}")]
    CrossSite(&'static str),
    /// Too many failed console sign-ins from one address.
    #[error("too many failed sign-ins; retry in a minute")]
    TooManyAttempts,
}

impl ApiError {
    pub fn parameter(parameter: &str, message: impl Into<String>) -> ApiError {
        ApiError::InvalidParameter {
            parameter: parameter.to_string(),
            message: message.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Disabled => StatusCode::FORBIDDEN,
            ApiError::MissingToken | ApiError::InvalidToken => StatusCode::UNAUTHORIZED,
            ApiError::InvalidParameter { .. } => StatusCode::BAD_REQUEST,
            ApiError::UnknownSource(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NotSupported(_) => StatusCode::NOT_IMPLEMENTED,
            ApiError::InvalidSession => StatusCode::UNAUTHORIZED,
            ApiError::CrossSite(_) => StatusCode::FORBIDDEN,
            ApiError::TooManyAttempts => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// The stable machine-readable reason (documented in `docs/api.md`).
    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::Disabled => "api_disabled",
            ApiError::MissingToken => "missing_token",
            ApiError::InvalidToken => "invalid_token",
            ApiError::InvalidParameter { .. } => "invalid_parameter",
            ApiError::UnknownSource(_) => "unknown_source",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::BodyTooLarge(_) => "body_too_large",
            ApiError::Overloaded => "overloaded",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::NotSupported(_) => "not_supported",
            ApiError::InvalidSession => "invalid_session",
            ApiError::CrossSite(_) => "cross_site",
            ApiError::TooManyAttempts => "too_many_attempts",
        }
    }

    /// Every reason, for the documentation check.
    pub const REASONS: [&'static str; 14] = [
        "api_disabled",
        "missing_token",
        "invalid_token",
        "invalid_parameter",
        "unknown_source",
        "not_found",
        "method_not_allowed",
        "body_too_large",
        "overloaded",
        "unavailable",
        "not_supported",
        "invalid_session",
        "cross_site",
        "too_many_attempts",
    ];

    /// The answer, carrying the request's id.
    pub fn response(&self, request_id: &str) -> HttpResponse {
        let status = self.status();
        let mut response = HttpResponse::build(status);
        match self {
            ApiError::MissingToken | ApiError::InvalidToken => {
                response.insert_header((header::WWW_AUTHENTICATE, "Bearer realm=\"gateway\""));
            }
            ApiError::MethodNotAllowed(allowed) => {
                response.insert_header((header::ALLOW, *allowed));
            }
            ApiError::Overloaded => {
                response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS.to_string()));
            }
            ApiError::TooManyAttempts => {
                response.insert_header((header::RETRY_AFTER, SIGN_IN_RETRY_AFTER_SECS.to_string()));
            }
            ApiError::Unavailable(cause) => {
                tracing::error!(%cause, "management API answered 503");
                response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECS.to_string()));
            }
            _ => {}
        }
        let mut error = json!({
            "message": self.to_string(),
            "code": status.as_u16(),
            "reason": self.reason(),
            "requestId": request_id,
        });
        if let ApiError::InvalidParameter { parameter, .. } = self {
            error["parameter"] = json!(parameter);
        }
        response.json(json!({ "error": error }))
    }
}

impl From<SpoolError> for ApiError {
    fn from(e: SpoolError) -> Self {
        match e {
            SpoolError::Overloaded => ApiError::Overloaded,
            other => ApiError::Unavailable(other.to_string()),
        }
    }
}
