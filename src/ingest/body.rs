//! Reading request bodies within their limits.
//!
//! The wire body is refused once it passes the route's limit (announced `Content-Length`
//! first, then counted while reading). A gzip body is inflated into a buffer that never
//! grows past the same limit plus one byte, so a gzip bomb costs at most the limit in
//! memory and answers 400.

use std::io::Read;

use actix_web::http::header::{HeaderMap, CONTENT_ENCODING, CONTENT_LENGTH};
use actix_web::web::{self, Bytes, BytesMut};
use futures_util::StreamExt;

use super::error::IngestError;

/// Reads the whole body, inflating gzip, refusing anything over `limit` bytes.
pub async fn read_body(
    headers: &HeaderMap,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Bytes, IngestError> {
    let gzip = match headers.get(CONTENT_ENCODING).map(|v| v.to_str()) {
        None => false,
        Some(Ok(value)) => match value.trim().to_ascii_lowercase().as_str() {
            "" | "identity" => false,
            "gzip" | "x-gzip" => true,
            other => return Err(IngestError::UnsupportedEncoding(other.to_string())),
        },
        Some(Err(_)) => return Err(IngestError::UnsupportedEncoding("(not ASCII)".into())),
    };
    let announced = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if matches!(announced, Some(length) if length > limit) {
        return Err(IngestError::PayloadTooLarge { limit });
    }
    let mut body = BytesMut::with_capacity(announced.unwrap_or(1024).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| IngestError::UnreadableBody(e.to_string()))?;
        if body.len() + chunk.len() > limit {
            return Err(IngestError::PayloadTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    if gzip {
        inflate(&body, limit).map(Bytes::from)
    } else {
        Ok(body.freeze())
    }
}

/// Inflates gzip (one or more members) into at most `limit` bytes.
pub fn inflate(compressed: &[u8], limit: usize) -> Result<Vec<u8>, IngestError> {
    let mut inflated = Vec::with_capacity((compressed.len() * 4).min(limit + 1));
    flate2::read::MultiGzDecoder::new(compressed)
        .take(limit as u64 + 1)
        .read_to_end(&mut inflated)
        .map_err(|_| IngestError::InvalidGzip)?;
    if inflated.len() > limit {
        return Err(IngestError::PayloadTooLarge { limit });
    }
    Ok(inflated)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).expect("compress");
        encoder.finish().expect("compress")
    }

    #[test]
    fn inflates_within_the_limit() {
        let data = br#"{"batch":[]}"#;
        assert_eq!(inflate(&gzip(data), 100).expect("inflates"), data.to_vec());
    }

    #[test]
    fn refuses_a_bomb_without_inflating_it() {
        let bomb = gzip(&vec![b' '; 50 * 1024 * 1024]);
        assert!(bomb.len() < 100 * 1024, "bomb is {} bytes", bomb.len());
        assert!(matches!(
            inflate(&bomb, 500 * 1024),
            Err(IngestError::PayloadTooLarge { limit: 512_000 })
        ));
    }

    #[test]
    fn refuses_broken_gzip() {
        let mut broken = gzip(b"{\"a\":1}");
        broken.truncate(broken.len() - 6);
        assert!(matches!(
            inflate(&broken, 1000),
            Err(IngestError::InvalidGzip)
        ));
        assert!(matches!(
            inflate(b"not gzip", 1000),
            Err(IngestError::InvalidGzip)
        ));
    }
}
