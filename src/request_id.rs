//! A request id on every request: taken from a well-formed incoming `X-Request-Id`, else
//! generated, recorded on the request's tracing span and returned as `X-Request-Id`.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::HttpMessage;
use tracing::Instrument;

pub const HEADER: &str = "x-request-id";

/// The request's id, in the request's extensions for handlers that put it in a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

fn incoming(request: &ServiceRequest) -> Option<String> {
    let value = request.headers().get(HEADER)?.to_str().ok()?;
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    ok.then(|| value.to_string())
}

/// The middleware function (`actix_web::middleware::from_fn(request_id)`).
pub async fn request_id(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = incoming(&request).unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    request.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!(
        "request",
        request_id = %id,
        method = %request.method(),
        path = %request.path()
    );
    let mut response = next.call(request).instrument(span).await?;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(HEADER), value);
    }
    Ok(response)
}
