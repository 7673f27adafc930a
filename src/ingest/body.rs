//! Reading request bodies within their limits, their share of the body budget and their
//! time.
//!
//! The wire body is refused once it passes the route's limit (announced `Content-Length`
//! first, then counted while reading). Every byte of the buffer is reserved from the
//! [body budget](super::budget) before the buffer grows, doubling from a few kilobytes
//! up to the announced length or the limit, so a body costs what has arrived, not what it
//! announces. The whole body must arrive before `deadline` (`limits.body_timeout_secs`
//! after the handler started), else 503 `body_timeout`. A gzip body is inflated into a
//! buffer reserved the same way that never grows past the same limit plus one byte, so a
//! gzip bomb costs at most the limit in memory and answers 400; the compressed bytes are
//! returned to the budget once inflated.

use std::io::Read;

use actix_web::http::header::{HeaderMap, CONTENT_ENCODING, CONTENT_LENGTH};
use actix_web::web::{self, Bytes};
use futures_util::StreamExt;
use tokio::time::Instant;

use super::budget::Reservation;
use super::error::IngestError;

/// The first buffer of a body without a (smaller) `Content-Length`.
const FIRST_BUFFER_BYTES: usize = 4 * 1024;

/// Reads the whole body, inflating gzip, refusing anything over `limit` bytes or arriving
/// after `deadline`. The bytes returned stay reserved in `reservation`.
pub async fn read_body(
    headers: &HeaderMap,
    mut payload: web::Payload,
    limit: usize,
    reservation: &mut Reservation,
    deadline: Instant,
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
    let mut body = Buffer::new(announced.unwrap_or(limit).min(limit));
    loop {
        let chunk = match tokio::time::timeout_at(deadline, payload.next()).await {
            Err(_) => return Err(IngestError::BodyTimeout),
            Ok(None) => break,
            Ok(Some(chunk)) => chunk.map_err(|e| IngestError::UnreadableBody(e.to_string()))?,
        };
        if body.bytes.len() + chunk.len() > limit {
            return Err(IngestError::PayloadTooLarge { limit });
        }
        body.extend(&chunk, reservation)?;
    }
    if !gzip {
        return Ok(Bytes::from(body.bytes));
    }
    let inflated = inflate(&body.bytes, limit, reservation)?;
    let compressed = body.bytes.capacity();
    drop(body);
    reservation.release(compressed);
    Ok(Bytes::from(inflated))
}

/// A byte buffer whose capacity is reserved before it is allocated.
struct Buffer {
    bytes: Vec<u8>,
    /// The capacity it never needs to pass (the announced length, or the limit).
    ceiling: usize,
}

impl Buffer {
    fn new(ceiling: usize) -> Buffer {
        Buffer {
            bytes: Vec::new(),
            ceiling,
        }
    }

    /// Appends `data`, reserving the capacity it needs first (doubling, up to the ceiling
    /// unless the data goes past it).
    fn extend(&mut self, data: &[u8], reservation: &mut Reservation) -> Result<(), IngestError> {
        let needed = self.bytes.len() + data.len();
        let capacity = self.bytes.capacity();
        if needed > capacity {
            let target = (capacity * 2)
                .max(FIRST_BUFFER_BYTES)
                .min(self.ceiling)
                .max(needed);
            reservation.grow(target - capacity)?;
            self.bytes.reserve_exact(target - self.bytes.len());
        }
        self.bytes.extend_from_slice(data);
        Ok(())
    }
}

/// Inflates gzip (one or more members) into at most `limit` bytes, reserving the output
/// as it grows.
pub fn inflate(
    compressed: &[u8],
    limit: usize,
    reservation: &mut Reservation,
) -> Result<Vec<u8>, IngestError> {
    let mut decoder = flate2::read::MultiGzDecoder::new(compressed);
    let mut inflated = Buffer::new(limit);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let read = decoder
            .read(&mut chunk)
            .map_err(|_| IngestError::InvalidGzip)?;
        if read == 0 {
            break;
        }
        if inflated.bytes.len() + read > limit {
            return Err(IngestError::PayloadTooLarge { limit });
        }
        inflated.extend(&chunk[..read], reservation)?;
    }
    Ok(inflated.bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::budget::BodyBudget;
    use std::io::Write;
    use std::sync::Arc;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(data).expect("compress");
        encoder.finish().expect("compress")
    }

    fn budget(capacity: usize) -> Arc<BodyBudget> {
        let gauge = prometheus::IntGauge::new("test_budget_bytes", "test").expect("gauge");
        Arc::new(BodyBudget::new(capacity, gauge))
    }

    #[test]
    fn inflates_within_the_limit() {
        let budget = budget(1 << 20);
        let mut reservation = budget.reservation();
        let data = br#"{"batch":[]}"#;
        let inflated = inflate(&gzip(data), 100, &mut reservation).expect("inflates");
        assert_eq!(inflated, data.to_vec());
        assert!(reservation.bytes() >= inflated.len());
        assert!(reservation.bytes() <= 100);
    }

    #[test]
    fn refuses_a_bomb_without_inflating_it() {
        let budget = budget(1 << 30);
        let mut reservation = budget.reservation();
        let bomb = gzip(&vec![b' '; 50 * 1024 * 1024]);
        assert!(bomb.len() < 100 * 1024, "bomb is {} bytes", bomb.len());
        assert!(matches!(
            inflate(&bomb, 500 * 1024, &mut reservation),
            Err(IngestError::PayloadTooLarge { limit: 512_000 })
        ));
        assert!(reservation.bytes() <= 500 * 1024, "{}", reservation.bytes());
    }

    #[test]
    fn inflating_stops_when_the_budget_is_spent() {
        let budget = budget(1 << 20);
        let mut reservation = budget.reservation();
        let bomb = gzip(&vec![b' '; 4 * 1024 * 1024]);
        assert!(matches!(
            inflate(&bomb, 4 * 1024 * 1024, &mut reservation),
            Err(IngestError::BodyBudgetExhausted)
        ));
        assert!(budget.held() <= 1 << 20);
    }

    #[test]
    fn refuses_broken_gzip() {
        let budget = budget(1 << 20);
        let mut reservation = budget.reservation();
        let mut broken = gzip(b"{\"a\":1}");
        broken.truncate(broken.len() - 6);
        assert!(matches!(
            inflate(&broken, 1000, &mut reservation),
            Err(IngestError::InvalidGzip)
        ));
        assert!(matches!(
            inflate(b"not gzip", 1000, &mut reservation),
            Err(IngestError::InvalidGzip)
        ));
    }

    #[test]
    fn buffers_reserve_their_capacity_before_growing() {
        let budget = budget(1 << 20);
        let mut reservation = budget.reservation();
        let mut buffer = Buffer::new(10_000);
        buffer.extend(b"abc", &mut reservation).expect("fits");
        assert_eq!(reservation.bytes(), FIRST_BUFFER_BYTES);
        assert_eq!(buffer.bytes.capacity(), FIRST_BUFFER_BYTES);
        buffer
            .extend(&[b'x'; 5000], &mut reservation)
            .expect("doubles");
        assert_eq!(reservation.bytes(), 8 * 1024);
        buffer
            .extend(&[b'y'; 4000], &mut reservation)
            .expect("up to the ceiling");
        assert_eq!(reservation.bytes(), 10_000);
        assert_eq!(buffer.bytes.capacity(), 10_000);
        assert_eq!(buffer.bytes.len(), 9003);
    }
}
