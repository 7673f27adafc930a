//! The embedded spool's dedup key, and the encoding of the `inbound` rows of spool files of
//! schema version 3.
//!
//! Version 3 made a request durable as one `inbound` row: its events' message ids in one
//! column and the events themselves in another, each a sequence of length-prefixed fields,
//! sorted into the queue later. Version 4 appends straight to the queue; rows a version 3
//! process left behind are decoded here and moved into the queue at start-up.
//!
//! Invariants:
//! - [`decode_events`] returns exactly the events [`Encoder::push`] was given, in order;
//!   [`decode_ids`] their message ids, in the same order.
//! - Decoding never panics: bytes that are not a valid encoding (a damaged file) give
//!   [`Corrupt`], and the caller decides what to do with the row.
//!
//! Layout (lengths are little-endian u32): the ids column is `len id` per event; the body
//! column is `kind(u8) len message_id len user_key len payload` per event, where `kind` is
//! the index of the type in [`EventType::ALL`].

use std::hash::{BuildHasher, Hasher};

use sha2::{Digest, Sha256};

use crate::segment::{Event, EventType};

/// Bytes that are not a valid encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an inbound row of the spool is not a valid encoding")]
pub struct Corrupt;

/// Builds the two columns of one inbound row.
#[derive(Debug, Default)]
pub struct Encoder {
    ids: Vec<u8>,
    body: Vec<u8>,
    count: usize,
}

impl Encoder {
    /// An encoder sized for a request of `events` events of about `bytes` payload bytes.
    pub fn with_capacity(events: usize, bytes: usize) -> Encoder {
        Encoder {
            ids: Vec::with_capacity(events * 40),
            body: Vec::with_capacity(bytes + events * 64),
            count: 0,
        }
    }

    pub fn push(&mut self, event: &Event) {
        put(&mut self.ids, event.message_id.as_bytes());
        let kind = EventType::ALL
            .iter()
            .position(|k| *k == event.kind)
            .unwrap_or(0) as u8;
        self.body.push(kind);
        put(&mut self.body, event.message_id.as_bytes());
        put(&mut self.body, event.user_key.as_bytes());
        put(&mut self.body, &event.payload);
        self.count += 1;
    }

    /// Events pushed so far.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The ids column and the body column.
    pub fn finish(self) -> (Vec<u8>, Vec<u8>) {
        (self.ids, self.body)
    }
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// Reads length-prefixed fields off a byte slice.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn field(&mut self) -> Result<&'a [u8], Corrupt> {
        let (len, rest) = self.rest.split_first_chunk::<4>().ok_or(Corrupt)?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(Corrupt);
        }
        let (field, rest) = rest.split_at(len);
        self.rest = rest;
        Ok(field)
    }

    fn text(&mut self) -> Result<&'a str, Corrupt> {
        std::str::from_utf8(self.field()?).map_err(|_| Corrupt)
    }

    fn byte(&mut self) -> Result<u8, Corrupt> {
        let (first, rest) = self.rest.split_first().ok_or(Corrupt)?;
        self.rest = rest;
        Ok(*first)
    }
}

/// The message ids of an ids column, in order.
pub fn decode_ids(ids: &[u8]) -> Result<Vec<&str>, Corrupt> {
    let mut reader = Reader { rest: ids };
    let mut out = Vec::new();
    while !reader.rest.is_empty() {
        out.push(reader.text()?);
    }
    Ok(out)
}

/// One event of a body column, borrowing from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodedEvent<'a> {
    pub kind: EventType,
    pub message_id: &'a str,
    pub user_key: &'a str,
    pub payload: &'a [u8],
}

/// The events of a body column, in order.
pub fn decode_events(body: &[u8]) -> Result<Vec<EncodedEvent<'_>>, Corrupt> {
    let mut reader = Reader { rest: body };
    let mut out = Vec::new();
    while !reader.rest.is_empty() {
        let kind = *EventType::ALL.get(reader.byte()? as usize).ok_or(Corrupt)?;
        out.push(EncodedEvent {
            kind,
            message_id: reader.text()?,
            user_key: reader.text()?,
            payload: reader.field()?,
        });
    }
    Ok(out)
}

/// The dedup index's key of a source's message id: the first 128 bits of
/// SHA-256(`len(source)` as u32 LE ‖ source ‖ message id).
///
/// Stable across processes and versions (it is stored in the spool), the same length
/// for every id (a compact index with integer comparisons), and a collision between two
/// ids, which would drop the second as a repeat, is as likely as guessing a 128-bit value.
pub fn dedup_key(source: &str, message_id: &str) -> u128 {
    let mut hasher = Sha256::new();
    hasher.update((source.len() as u32).to_le_bytes());
    hasher.update(source.as_bytes());
    hasher.update(message_id.as_bytes());
    let digest = hasher.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(first)
}

/// A key as the two signed integers SQLite stores (`hi`, `lo`).
pub fn key_columns(key: u128) -> (i64, i64) {
    ((key >> 64) as u64 as i64, key as u64 as i64)
}

/// The keys are already uniformly random: the set uses them as their own hash.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassThrough;

impl BuildHasher for PassThrough {
    type Hasher = PassThroughHasher;
    fn build_hasher(&self) -> PassThroughHasher {
        PassThroughHasher(0)
    }
}

#[derive(Debug, Default)]
pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `u128` keys are hashed; fold anything else so the hasher stays total.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = (n as u64) ^ ((n >> 64) as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(kind: EventType, id: &str, user: &str, payload: &[u8]) -> Event {
        Event {
            kind,
            message_id: id.into(),
            user_key: user.into(),
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn round_trips_events_in_order() {
        let events = vec![
            event(EventType::Track, "m1", "u:1", br#"{"type":"track"}"#),
            event(EventType::Delete, "m\u{e9}2", "e:a@b.c", b""),
            event(EventType::Identify, "", "a:x", br#"{"a":1}"#),
        ];
        let mut encoder = Encoder::with_capacity(events.len(), 64);
        events.iter().for_each(|e| encoder.push(e));
        assert_eq!(encoder.len(), 3);
        let (ids, body) = encoder.finish();
        assert_eq!(decode_ids(&ids).unwrap(), vec!["m1", "m\u{e9}2", ""]);
        let decoded = decode_events(&body).unwrap();
        assert_eq!(decoded.len(), 3);
        for (d, e) in decoded.iter().zip(&events) {
            assert_eq!(d.kind, e.kind);
            assert_eq!(d.message_id, e.message_id);
            assert_eq!(d.user_key, e.user_key);
            assert_eq!(d.payload, &e.payload[..]);
        }
    }

    #[test]
    fn empty_columns_hold_no_events() {
        assert!(decode_ids(&[]).unwrap().is_empty());
        assert!(decode_events(&[]).unwrap().is_empty());
    }

    #[test]
    fn truncated_or_damaged_columns_are_corrupt() {
        let mut encoder = Encoder::default();
        encoder.push(&event(EventType::Page, "m1", "u:1", b"{}"));
        let (ids, body) = encoder.finish();
        for cut in 1..body.len() {
            assert_eq!(decode_events(&body[..cut]), Err(Corrupt), "cut at {cut}");
        }
        for cut in 1..ids.len() {
            assert_eq!(decode_ids(&ids[..cut]), Err(Corrupt), "cut at {cut}");
        }
        let mut bad_kind = body.clone();
        bad_kind[0] = 200;
        assert_eq!(decode_events(&bad_kind), Err(Corrupt));
    }

    #[test]
    fn dedup_keys_are_stable_and_unambiguous() {
        // Stored in the spool: a change here would let repeats through after an upgrade.
        assert_eq!(
            dedup_key("default", "m-1"),
            0xb600_e022_56da_adaa_569e_a39c_6608_c8d3,
            "{:x}",
            dedup_key("default", "m-1")
        );
        assert_ne!(dedup_key("ab", "c"), dedup_key("a", "bc"));
        let key = dedup_key("s", "m");
        let (hi, lo) = key_columns(key);
        assert_eq!((u128::from(hi as u64) << 64) | u128::from(lo as u64), key);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_ids(&bytes);
            let _ = decode_events(&bytes);
        }
    }
}
