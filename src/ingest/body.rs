//! Reading request bodies within their limits, their share of the body budget and their
//! time.
//!
//! The wire body is refused once it passes the route's limit (announced `Content-Length`
//! first, then counted while reading). Every byte is reserved from the
//! [body budget](super::budget) before it is stored, so a body costs what has arrived, not
//! what it announces. The whole body must arrive before `deadline`
//! (`limits.body_timeout_secs` after the handler started), else 503 `body_timeout`. A gzip
//! body is inflated into a buffer reserved the same way that never grows past the same
//! limit plus one byte, so a gzip bomb costs at most the limit and answers 400; the
//! compressed bytes are returned to the budget once inflated.
//!
//! Where the bytes live: a body that may be larger than [`MAPPED_BODY_BYTES`] is written
//! into its own anonymous memory mapping of its ceiling (the announced length, or the
//! limit), whose pages become resident only as they are written and go back to the system
//! when the body is dropped. Resident memory then follows the budget: the allocator's heap
//! never holds the large blocks that, freed and split, would keep it at about twice what
//! the bodies hold. Smaller bodies use the heap, growing by doubling.

use std::io::Read;
use std::ops::Deref;

use actix_web::http::header::{HeaderMap, CONTENT_ENCODING, CONTENT_LENGTH};
use actix_web::web;
use futures_util::StreamExt;
use memmap2::MmapMut;
use tokio::time::Instant;

use super::budget::Reservation;
use super::error::IngestError;

/// A body whose ceiling is above this lives in its own memory mapping.
pub const MAPPED_BODY_BYTES: usize = 64 * 1024;

/// The first heap buffer of a small body without a (smaller) `Content-Length`.
const FIRST_BUFFER_BYTES: usize = 4 * 1024;

/// The step by which a mapped body's reservation grows (a multiple of the page size).
const MAPPED_STEP_BYTES: usize = 64 * 1024;

/// Reads the whole body, inflating gzip, refusing anything over `limit` bytes or arriving
/// after `deadline`. The bytes returned stay reserved in `reservation`.
pub async fn read_body(
    headers: &HeaderMap,
    mut payload: web::Payload,
    limit: usize,
    reservation: &mut Reservation,
    deadline: Instant,
) -> Result<Body, IngestError> {
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
        if body.len + chunk.len() > limit {
            return Err(IngestError::PayloadTooLarge { limit });
        }
        body.extend(&chunk, reservation)?;
    }
    if !gzip {
        return Ok(body.into_body());
    }
    let inflated = inflate(&body.into_body(), limit, reservation)?;
    Ok(inflated)
}

/// A body read within its budget: the bytes, wherever they live.
pub struct Body {
    storage: Storage,
    len: usize,
    /// What the reservation holds for it.
    reserved: usize,
}

enum Storage {
    Heap(Vec<u8>),
    Mapped(MmapMut),
}

impl Deref for Body {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        let bytes = match &self.storage {
            Storage::Heap(bytes) => &bytes[..],
            Storage::Mapped(map) => &map[..],
        };
        bytes.get(..self.len).unwrap_or_default()
    }
}

/// A body being written, its bytes reserved before they are stored.
struct Buffer {
    storage: Storage,
    len: usize,
    /// The size it never needs to pass (the announced length, or the limit).
    ceiling: usize,
    reserved: usize,
}

impl Buffer {
    fn new(ceiling: usize) -> Buffer {
        Buffer {
            storage: Storage::Heap(Vec::new()),
            len: 0,
            ceiling,
            reserved: 0,
        }
    }

    /// Appends `data` (at most up to the ceiling), reserving what it needs first.
    fn extend(&mut self, data: &[u8], reservation: &mut Reservation) -> Result<(), IngestError> {
        let needed = self.len + data.len();
        if self.ceiling > MAPPED_BODY_BYTES {
            self.extend_mapped(data, needed, reservation)?;
        } else {
            self.extend_heap(data, needed, reservation)?;
        }
        self.len = needed;
        Ok(())
    }

    /// The heap: the capacity doubles from [`FIRST_BUFFER_BYTES`] up to the ceiling (unless
    /// the data goes past it), each step reserved before it is allocated.
    fn extend_heap(
        &mut self,
        data: &[u8],
        needed: usize,
        reservation: &mut Reservation,
    ) -> Result<(), IngestError> {
        let Storage::Heap(bytes) = &mut self.storage else {
            return Err(IngestError::BodyBudgetExhausted);
        };
        if needed > self.reserved {
            let target = (self.reserved * 2)
                .max(FIRST_BUFFER_BYTES)
                .min(self.ceiling)
                .max(needed);
            reservation.grow(target - self.reserved)?;
            self.reserved = target;
            bytes.reserve_exact(target - bytes.len());
        }
        bytes.extend_from_slice(data);
        Ok(())
    }

    /// A mapping of the ceiling, made when the first bytes arrive; the reservation covers
    /// the pages written, in steps of [`MAPPED_STEP_BYTES`].
    fn extend_mapped(
        &mut self,
        data: &[u8],
        needed: usize,
        reservation: &mut Reservation,
    ) -> Result<(), IngestError> {
        if needed > self.ceiling {
            return Err(IngestError::PayloadTooLarge {
                limit: self.ceiling,
            });
        }
        if needed > self.reserved {
            let target = needed
                .div_ceil(MAPPED_STEP_BYTES)
                .saturating_mul(MAPPED_STEP_BYTES)
                .min(self.ceiling.div_ceil(4096).saturating_mul(4096));
            reservation.grow(target - self.reserved)?;
            self.reserved = target;
        }
        if matches!(self.storage, Storage::Heap(_)) {
            // The mapping cannot be made: as good as no memory left for bodies.
            let map =
                MmapMut::map_anon(self.ceiling).map_err(|_| IngestError::BodyBudgetExhausted)?;
            self.storage = Storage::Mapped(map);
        }
        if let Storage::Mapped(map) = &mut self.storage {
            if let Some(target) = map.get_mut(self.len..needed) {
                target.copy_from_slice(data);
            }
        }
        Ok(())
    }

    fn into_body(self) -> Body {
        Body {
            storage: self.storage,
            len: self.len,
            reserved: self.reserved,
        }
    }
}

/// Inflates gzip (one or more members) into at most `limit` bytes, reserving the output
/// as it grows; the compressed body's reservation is returned once it is inflated.
pub fn inflate(
    compressed: &Body,
    limit: usize,
    reservation: &mut Reservation,
) -> Result<Body, IngestError> {
    let inflated = inflate_bytes(compressed, limit, reservation)?;
    reservation.release(compressed.reserved);
    Ok(inflated)
}

fn inflate_bytes(
    compressed: &[u8],
    limit: usize,
    reservation: &mut Reservation,
) -> Result<Body, IngestError> {
    let mut decoder = flate2::read::MultiGzDecoder::new(compressed);
    let mut inflated = Buffer::new(limit);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let read = decoder
            .read(&mut chunk)
            .map_err(|_| IngestError::InvalidGzip)?;
        if read == 0 {
            break;
        }
        if inflated.len + read > limit {
            return Err(IngestError::PayloadTooLarge { limit });
        }
        inflated.extend(&chunk[..read], reservation)?;
    }
    Ok(inflated.into_body())
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
        let inflated = inflate_bytes(&gzip(data), 100, &mut reservation).expect("inflates");
        assert_eq!(&*inflated, &data[..]);
        assert!(reservation.bytes() >= inflated.len());
        assert!(reservation.bytes() <= 100);
        // A large limit: the output lives in a mapping, reserved as it is written.
        let data = vec![b'x'; 200_000];
        let inflated = inflate_bytes(&gzip(&data), 4 << 20, &mut reservation).expect("inflates");
        assert_eq!(&*inflated, &data[..]);
        assert!(matches!(inflated.storage, Storage::Mapped(_)));
        assert_eq!(inflated.reserved, 4 * MAPPED_STEP_BYTES);
    }

    #[test]
    fn refuses_a_bomb_without_inflating_it() {
        let budget = budget(1 << 30);
        let mut reservation = budget.reservation();
        let bomb = gzip(&vec![b' '; 50 * 1024 * 1024]);
        assert!(bomb.len() < 100 * 1024, "bomb is {} bytes", bomb.len());
        assert!(matches!(
            inflate_bytes(&bomb, 500 * 1024, &mut reservation),
            Err(IngestError::PayloadTooLarge { limit: 512_000 })
        ));
        assert!(reservation.bytes() <= 512 * 1024, "{}", reservation.bytes());
    }

    #[test]
    fn inflating_stops_when_the_budget_is_spent() {
        let budget = budget(1 << 20);
        let mut reservation = budget.reservation();
        let bomb = gzip(&vec![b' '; 4 * 1024 * 1024]);
        assert!(matches!(
            inflate_bytes(&bomb, 4 * 1024 * 1024, &mut reservation),
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
            inflate_bytes(&broken, 1000, &mut reservation),
            Err(IngestError::InvalidGzip)
        ));
        assert!(matches!(
            inflate_bytes(b"not gzip", 1000, &mut reservation),
            Err(IngestError::InvalidGzip)
        ));
    }

    #[test]
    fn small_buffers_double_on_the_heap_within_their_reservation() {
        let budget = budget(1 << 20);
        let mut reservation = budget.reservation();
        let mut buffer = Buffer::new(10_000);
        buffer.extend(b"abc", &mut reservation).expect("fits");
        assert_eq!(reservation.bytes(), FIRST_BUFFER_BYTES);
        buffer
            .extend(&[b'x'; 5000], &mut reservation)
            .expect("doubles");
        assert_eq!(reservation.bytes(), 8 * 1024);
        buffer
            .extend(&[b'y'; 4000], &mut reservation)
            .expect("up to the ceiling");
        assert_eq!(reservation.bytes(), 10_000);
        let body = buffer.into_body();
        assert!(matches!(&body.storage, Storage::Heap(bytes) if bytes.capacity() == 10_000));
        assert_eq!(body.len(), 9003);
        assert_eq!(&body[..3], b"abc");
    }

    #[test]
    fn large_buffers_reserve_what_is_written_in_steps() {
        let budget = budget(8 << 20);
        let mut reservation = budget.reservation();
        let mut buffer = Buffer::new(4 << 20);
        buffer.extend(b"{", &mut reservation).expect("fits");
        assert_eq!(reservation.bytes(), MAPPED_STEP_BYTES);
        buffer
            .extend(&vec![b' '; 100_000], &mut reservation)
            .expect("fits");
        assert_eq!(reservation.bytes(), 2 * MAPPED_STEP_BYTES);
        let body = buffer.into_body();
        assert_eq!(body.len(), 100_001);
        assert_eq!(body[0], b'{');
        assert!(body[1..].iter().all(|&b| b == b' '));
        // Past the ceiling is refused.
        let mut small = Buffer::new(MAPPED_BODY_BYTES + 1);
        assert!(small
            .extend(&vec![0; MAPPED_BODY_BYTES + 2], &mut reservation)
            .is_err());
    }
}
