//! Reading a subject's messages newest first, without a consumer.
//!
//! JetStream's direct get answers "the last message of a subject" and "the next one from a
//! sequence", which only walks forward. Its batched form (`multi_last` with `up_to_seq`,
//! nats-server 2.11 and later, on streams with `allow_direct`) also answers "the last one
//! at or below a sequence", which async-nats does not offer: [`last_up_to`] sends that
//! request itself. A reader that wants the newest few of a subject's many messages then
//! pays one round trip per message it reads, not a scan of all of them.
//!
//! Invariants: one request, one answer read (the message, or 404 when there is none); the
//! batch's end-of-batch marker that follows is left to the client, which drops replies
//! nobody waits for. Any other status is an error, so a caller can fall back to a
//! consumer on a server without the batched form.

use async_nats::jetstream;
use bytes::Bytes;
use serde::Serialize;

/// The last message of one subject at or below a sequence (ADR-31's `multi_last`).
#[derive(Serialize)]
struct LastUpTo<'a> {
    multi_last: [&'a str; 1],
    batch: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    up_to_seq: Option<u64>,
}

/// Why a direct get failed.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    #[error("the direct get request failed: {0}")]
    Request(#[from] async_nats::RequestError),
    #[error("the server answered the direct get with status {0}")]
    Status(u16),
    #[error("the direct get's answer carries no sequence")]
    NoSequence,
}

/// The last message on `subject` in `stream` whose sequence is at most `up_to` (the
/// subject's last without it): its stream sequence and payload; `None` when there is none.
pub async fn last_up_to(
    js: &jetstream::Context,
    stream: &str,
    subject: &str,
    up_to: Option<u64>,
) -> Result<Option<(u64, Bytes)>, DirectError> {
    let request = LastUpTo {
        multi_last: [subject],
        batch: 1,
        up_to_seq: up_to,
    };
    let body = serde_json::to_vec(&request).expect("a direct get request serializes");
    let answer = js
        .client()
        .request(format!("$JS.API.DIRECT.GET.{stream}"), body.into())
        .await?;
    match answer.status.map(|s| s.as_u16()) {
        None => {}
        Some(404) => return Ok(None),
        Some(status) => return Err(DirectError::Status(status)),
    }
    let sequence = answer
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_SEQUENCE))
        .and_then(|v| v.as_str().parse::<u64>().ok())
        .ok_or(DirectError::NoSequence)?;
    Ok(Some((sequence, answer.payload)))
}
