//! Packs: the events of one request that share a partition, in one JetStream message.
//!
//! JetStream's cost is per message: a publish and its ack, an entry in the duplicate
//! window, a delivery and an ack at the other end. An append therefore publishes one
//! message per partition its request touches, not one per event (a 100-event batch over
//! 16 partitions: about 16 messages).
//!
//! Invariants:
//! - A message holds events of one partition, in request order, and each `messageId` at
//!   most once (an append drops a request's repeats before it packs).
//! - Its subject says how many events it holds: `<prefix>.events.<p>` one (single events,
//!   and replayed dead letters: one event, meta line and payload, as before packs),
//!   `<prefix>.events.<p>.<k>` a pack of `k ≥ 2`, whose body is `k` frames, each a 4-byte
//!   big-endian length and a single event's body. The stream's per-subject counts so give
//!   the queue's depth in events without reading a message.
//! - An event's `seq` is its message's stream sequence shifted left by [`INDEX_BITS`], plus
//!   its index in the message: unique, and increasing with append order like the stream
//!   sequence. A pack never holds more than [`MAX_EVENTS`] events nor (but for one event
//!   larger by itself) more than [`MAX_BYTES`].

/// Bits of an event's `seq` that hold its index in its message.
pub const INDEX_BITS: u32 = 10;
/// Events one message holds at most.
pub const MAX_EVENTS: usize = 1 << INDEX_BITS;
/// Bytes of events one pack holds at most (NATS refuses messages above the server's
/// `max_payload`, 1 MiB by default).
pub const MAX_BYTES: usize = 512 * 1024;

/// The `seq` of the event at `index` of the message stored at `stream_seq`.
pub fn event_seq(stream_seq: u64, index: usize) -> u64 {
    (stream_seq << INDEX_BITS) | index as u64
}

/// The stream sequence of an event's message and its index in it.
pub fn message_of(seq: u64) -> (u64, usize) {
    (seq >> INDEX_BITS, (seq & (MAX_EVENTS as u64 - 1)) as usize)
}

/// The subject of a message of `events` events of `partition`.
pub fn subject(prefix: &str, partition: u32, events: usize) -> String {
    if events == 1 {
        format!("{prefix}.events.{partition}")
    } else {
        format!("{prefix}.events.{partition}.{events}")
    }
}

/// How many events a message on `subject` holds (one when the subject does not say).
pub fn events_in(subject: &str) -> usize {
    let mut tokens = subject.rsplit('.');
    let last = tokens.next().unwrap_or_default();
    let before = tokens.next().unwrap_or_default();
    let after_events = tokens.next() == Some("events");
    match (after_events, before.parse::<u32>(), last.parse::<usize>()) {
        (true, Ok(_), Ok(k)) if k >= 2 => k,
        _ => 1,
    }
}

/// A pack's body: each event body behind its length.
pub fn encode<B: AsRef<[u8]>>(bodies: &[B]) -> Vec<u8> {
    let size = bodies.iter().map(|b| 4 + b.as_ref().len()).sum();
    let mut out = Vec::with_capacity(size);
    for body in bodies {
        let body = body.as_ref();
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(body);
    }
    out
}

/// The event bodies of a message holding `events` events; `None` when the body does not
/// hold exactly that many frames.
pub fn decode(body: &[u8], events: usize) -> Option<Vec<&[u8]>> {
    if events == 1 {
        return Some(vec![body]);
    }
    let mut out = Vec::with_capacity(events);
    let mut rest = body;
    while !rest.is_empty() {
        let (len, tail) = rest.split_first_chunk::<4>()?;
        let len = u32::from_be_bytes(*len) as usize;
        if tail.len() < len {
            return None;
        }
        out.push(&tail[..len]);
        rest = &tail[len..];
    }
    (out.len() == events).then_some(out)
}

/// Splits events (their sizes in bytes, in order) into runs for one message each: at most
/// [`MAX_EVENTS`] events and [`MAX_BYTES`] bytes a run, an event larger by itself alone.
/// Returns the runs' lengths.
pub fn runs(sizes: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let mut runs = Vec::new();
    let (mut count, mut bytes) = (0, 0);
    for size in sizes {
        if count > 0 && (count == MAX_EVENTS || bytes + size > MAX_BYTES) {
            runs.push(count);
            (count, bytes) = (0, 0);
        }
        count += 1;
        bytes += size;
    }
    if count > 0 {
        runs.push(count);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seqs_keep_append_order_and_find_their_message() {
        let seqs = [
            event_seq(7, 0),
            event_seq(7, 1),
            event_seq(7, 1023),
            event_seq(8, 0),
        ];
        assert!(seqs.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(message_of(seqs[2]), (7, 1023));
        assert_eq!(message_of(seqs[3]), (8, 0));
    }

    #[test]
    fn the_subject_says_how_many_events() {
        assert_eq!(subject("gw.a", 3, 1), "gw.a.events.3");
        assert_eq!(events_in("gw.a.events.3"), 1);
        assert_eq!(subject("gw.a", 3, 17), "gw.a.events.3.17");
        assert_eq!(events_in("gw.a.events.3.17"), 17);
        assert_eq!(events_in("gw.events.x.5"), 1, "not a partition number");
    }

    #[test]
    fn frames_round_trip_and_a_torn_body_is_refused() {
        let body = encode(&[b"one".as_slice(), b"".as_slice(), b"three".as_slice()]);
        let events = decode(&body, 3).expect("three frames");
        assert_eq!(events, vec![b"one".as_slice(), b"", b"three"]);
        assert!(decode(&body, 2).is_none(), "a count that disagrees");
        assert!(decode(&body[..body.len() - 1], 3).is_none(), "a cut frame");
        assert_eq!(decode(b"plain", 1), Some(vec![b"plain".as_slice()]));
    }

    #[test]
    fn runs_respect_both_bounds() {
        assert_eq!(runs([10; 3]), vec![3]);
        assert_eq!(
            runs(std::iter::repeat_n(1, MAX_EVENTS + 5)),
            vec![MAX_EVENTS, 5]
        );
        let half = MAX_BYTES / 2;
        assert_eq!(runs([half, half, 1]), vec![2, 1]);
        assert_eq!(
            runs([1, MAX_BYTES * 2, 1]),
            vec![1, 1, 1],
            "a large event alone"
        );
        assert!(runs(std::iter::empty()).is_empty());
    }
}
