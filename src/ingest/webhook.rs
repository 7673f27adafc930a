//! `POST /webhook[/{source}]`: Segment's Webhooks destinations (Classic and Actions).
//!
//! With an `X-Signature` header, the signature must verify against the webhook secret of a
//! source (the one the path names, if any): over the raw body, or over the raw bytes of the
//! first element when the body is a JSON array (Actions batching). What the source then
//! accepts depends on its `webhook_format`:
//! - `classic` refuses arrays (401 `array_not_allowed`): Segment's classic destination never
//!   sends one, and an array's signature covers only its first element, so a captured
//!   signed body could otherwise carry forged events behind it;
//! - `actions` accepts them, and remembers each accepted signature with its body for the
//!   dedup window: the same signature with another body is refused (401
//!   `signature_reused`), which closes the replay of a captured body as the first element of
//!   a forged array.
//!
//! Without `X-Signature`, the request authenticates by write key like `/v1/*`, and only for
//! sources without a webhook secret; a source with one answers 401 `missing_signature`
//! before its body is read.
//!
//! Nothing is parsed before the request is authenticated.

use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse};

use super::auth::{basic_write_key, SourceAuth};
use super::body::Body;
use super::budget::Reservation;
use super::error::IngestError;
use super::{
    accept, arrival, authenticate_body_key, now_ms, observe, parse_body, read_body, IngestState,
};
use crate::config::WebhookFormat;
use crate::segment;

const UNKNOWN_SOURCE: IngestError = IngestError::Unauthorized {
    code: "unauthorized",
    message: "unknown source",
};

const INVALID_SIGNATURE: IngestError = IngestError::Unauthorized {
    code: "invalid_signature",
    message: "X-Signature does not match any webhook secret",
};

const MISSING_SIGNATURE: IngestError = IngestError::Unauthorized {
    code: "missing_signature",
    message: "this source requires an X-Signature header",
};

const ARRAY_NOT_ALLOWED: IngestError = IngestError::Unauthorized {
    code: "array_not_allowed",
    message: "this source's webhook_format is classic: its webhooks are one JSON object each, \
              and an array's signature would cover only its first element",
};

const SIGNATURE_REUSED: IngestError = IngestError::Unauthorized {
    code: "signature_reused",
    message: "this X-Signature was accepted before with another body",
};

/// The webhook handler.
pub(super) async fn webhook(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<IngestState>,
) -> Result<HttpResponse, IngestError> {
    let started = Instant::now();
    let result = async {
        let named = match request.match_info().get("source") {
            Some(slug) => Some(state.sources.by_slug(slug).ok_or(UNKNOWN_SOURCE)?),
            None => None,
        };
        let signature = request
            .headers()
            .get("x-signature")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let mut reservation = state.budget.reservation();
        let read = Read {
            state: &state,
            request: &request,
            started,
        };
        let (by, body) = match signature {
            Some(signature) => signed(read, payload, &mut reservation, named, &signature).await?,
            None => unsigned(read, payload, &mut reservation, named).await?,
        };
        let received_at_ms = now_ms();
        let authenticated = match &by {
            By::Signature(source) | By::WriteKey { source, .. } => *source,
        };
        let destinations = state.destinations_of(authenticated);
        let parsed = parse_body(&state, "webhook", || {
            segment::parse_webhook_for(&body, arrival(&state.limits, received_at_ms), destinations)
        })?;
        drop(body);
        let source = match by {
            By::Signature(source) => source,
            // Authenticated already; a Basic key and the body's must agree.
            By::WriteKey { basic, .. } => {
                let source = state
                    .sources
                    .authenticate(basic.as_deref(), parsed.write_key.as_deref())?;
                needs_signature(named, source)?;
                source
            }
        };
        accept(&state, source, parsed, received_at_ms, reservation).await
    }
    .await;
    observe(&state, "webhook", started, result)
}

/// How a webhook was authenticated before it is parsed.
enum By<'s> {
    /// Its signature, made with this source's secret.
    Signature(&'s SourceAuth),
    /// A write key: the Basic header's, or else the body's (`source` is whose it is).
    WriteKey {
        basic: Option<String>,
        source: &'s SourceAuth,
    },
}

/// Refuses a source that must send signed webhooks: one with a webhook secret, or another
/// than the path names.
fn needs_signature(named: Option<&SourceAuth>, source: &SourceAuth) -> Result<(), IngestError> {
    if source.has_webhook_secret() || named.is_some_and(|n| !std::ptr::eq(n, source)) {
        return Err(MISSING_SIGNATURE);
    }
    Ok(())
}

/// What reading a body needs besides the payload.
struct Read<'a> {
    state: &'a IngestState,
    request: &'a HttpRequest,
    started: Instant,
}

impl Read<'_> {
    async fn body(
        &self,
        payload: web::Payload,
        reservation: &mut Reservation,
    ) -> Result<Body, IngestError> {
        let limit = self.state.limits.max_webhook_bytes;
        read_body(
            self.state,
            self.request,
            payload,
            limit,
            reservation,
            self.started,
        )
        .await
    }
}

/// Authenticates a signed webhook: the source whose secret made the signature, if its
/// format takes this body.
async fn signed<'s>(
    read: Read<'s>,
    payload: web::Payload,
    reservation: &mut Reservation,
    named: Option<&'s SourceAuth>,
    signature: &str,
) -> Result<(By<'s>, Body), IngestError> {
    let state = read.state;
    // No secret that could have made it: refused before the body is read.
    let can_verify = match named {
        Some(source) => source.has_webhook_secret(),
        None => state.sources.any_webhook_secret(),
    };
    if !can_verify {
        return Err(INVALID_SIGNATURE);
    }
    let body = read.body(payload, reservation).await?;
    let verified = state
        .sources
        .verify_signature(named, &body, signature)
        .ok_or(INVALID_SIGNATURE)?;
    let source = verified.source;
    match source.webhook_format {
        WebhookFormat::Classic if segment::is_json_array(&body) => return Err(ARRAY_NOT_ALLOWED),
        WebhookFormat::Classic => {}
        WebhookFormat::Actions => state
            .signatures
            .check(source.index, &verified.signature, &body, Instant::now())
            .map_err(|_| SIGNATURE_REUSED)?,
    }
    Ok((By::Signature(source), body))
}

/// Authenticates an unsigned webhook by write key, for sources without a webhook secret
/// (and, with a source in the path, for that source only): the Basic key before the body
/// is read, else the body's `writeKey` before it is parsed.
async fn unsigned<'s>(
    read: Read<'s>,
    payload: web::Payload,
    reservation: &mut Reservation,
    named: Option<&'s SourceAuth>,
) -> Result<(By<'s>, Body), IngestError> {
    let state = read.state;
    if named.is_some_and(SourceAuth::has_webhook_secret) {
        return Err(MISSING_SIGNATURE);
    }
    let basic = basic_write_key(read.request.headers());
    let by_header = match basic.as_deref() {
        Some(key) => {
            let source = state.sources.authenticate(Some(key), None)?;
            needs_signature(named, source)?;
            Some(source)
        }
        None => None,
    };
    let body = read.body(payload, reservation).await?;
    let source = match by_header {
        Some(source) => source,
        None => {
            let source = authenticate_body_key(state, &body)?;
            needs_signature(named, source)?;
            source
        }
    };
    Ok((By::WriteKey { basic, source }, body))
}
