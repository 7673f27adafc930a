//! The encoding of one accepted request in the embedded spool's `inbound` table.
//!
//! Ingest makes a request durable as one row: its events' message ids in one column and
//! the events themselves in another, each a sequence of length-prefixed fields. Writing a
//! request whole is a few sequential page writes; sorting its events into the queue and the
//! dedup index (random index pages) happens later, off the path that answers the client.
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

use std::collections::HashSet;
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

/// The message ids of the requests in `inbound`: accepted, not yet sorted into the dedup
/// index. A repeat must be recognised in that window too, so the spool checks here and
/// then the index.
///
/// Invariants: an id is in the set exactly while its event is in `inbound`, counting only
/// committed transactions. Changes made during a transaction are staged: [`commit`]
/// applies them and [`rollback`] forgets them, so a request whose transaction failed is
/// not taken for a repeat when the client sends it again.
///
/// Ids are kept as their [`dedup_key`] (16 bytes each, rebuilt from `inbound` at
/// start-up), so the set's memory is bounded by the limit on inbound events, not by the
/// ids' lengths.
///
/// [`commit`]: PendingIds::commit
/// [`rollback`]: PendingIds::rollback
#[derive(Debug, Default)]
pub struct PendingIds {
    committed: HashSet<u128, PassThrough>,
    events: u64,
    added: HashSet<u128, PassThrough>,
    removed: Vec<u128>,
    delta: i64,
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

impl PendingIds {
    /// Whether the id is pending (committed or added in this transaction).
    pub fn contains(&self, key: u128) -> bool {
        self.committed.contains(&key) || self.added.contains(&key)
    }

    /// Stages an accepted event's id.
    pub fn add(&mut self, key: u128) {
        self.added.insert(key);
        self.delta += 1;
    }

    /// Stages the removal of a sorted event's id.
    pub fn remove(&mut self, key: u128) {
        self.removed.push(key);
        self.delta -= 1;
    }

    /// Events pending, staged changes included.
    pub fn events(&self) -> u64 {
        (self.events as i64 + self.delta).max(0) as u64
    }

    /// Keeps the staged changes: their transaction committed.
    pub fn commit(&mut self) {
        // Added first: an event accepted and sorted in one transaction leaves no trace.
        self.committed.extend(self.added.drain());
        for key in self.removed.drain(..) {
            self.committed.remove(&key);
        }
        self.events = self.events();
        self.delta = 0;
        if self.committed.is_empty() && self.committed.capacity() > 1 << 16 {
            // A drained backlog gives its memory back.
            self.committed = HashSet::default();
        }
    }

    /// Forgets the staged changes: their transaction rolled back.
    pub fn rollback(&mut self) {
        self.added.clear();
        self.removed.clear();
        self.delta = 0;
    }
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

    #[test]
    fn pending_ids_keep_only_committed_changes() {
        let mut pending = PendingIds::default();
        let a = dedup_key("s", "m1");
        let b = dedup_key("s", "m2");
        assert_ne!(a, b);
        assert_ne!(a, dedup_key("t", "m1"), "ids are per source");
        assert_ne!(dedup_key("ab", "c"), dedup_key("a", "bc"));
        pending.add(a);
        assert!(
            pending.contains(a),
            "a staged id is a repeat within its transaction"
        );
        assert_eq!(pending.events(), 1);
        pending.rollback();
        assert!(!pending.contains(a), "a rolled-back id is not a repeat");
        assert_eq!(pending.events(), 0);
        pending.add(a);
        pending.add(b);
        pending.commit();
        assert!(pending.contains(a) && pending.contains(b));
        pending.remove(a);
        pending.rollback();
        assert!(
            pending.contains(a),
            "a rolled-back sort keeps the id pending"
        );
        pending.remove(a);
        pending.commit();
        assert!(!pending.contains(a));
        assert_eq!(pending.events(), 1);
        let c = dedup_key("s", "m3");
        pending.add(c);
        pending.remove(c);
        pending.commit();
        assert!(
            !pending.contains(c),
            "accepted and sorted in one transaction"
        );
        assert_eq!(pending.events(), 1);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_ids(&bytes);
            let _ = decode_events(&bytes);
        }
    }
}
