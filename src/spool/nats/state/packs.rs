//! What the owner tells JetStream about a message that holds several events ([`pack`]).
//!
//! [`QueueState`](super::QueueState) settles events; JetStream settles messages. For a
//! single event the two are one. For a pack, this ledger turns the events' answers into
//! the message's:
//! - the message is acked once every event of it is settled (acked, skipped, dead);
//! - it is nakked once every event not settled is out waiting (a retry, or held behind
//!   one), with the earliest of their delays, and none is in memory or leased;
//! - when it comes back, only the events not settled yet are taken in again.
//!
//! Invariant: an open pack's events that are neither settled nor out are in the queue
//! state (in memory, leased, or stale waiting for their redelivery), so the pack is
//! answered when the last of them is. What is settled is remembered here only: a node
//! that takes a partition over delivers a pack's settled events again with the ones that
//! were waiting (at least once, as for an ack lost on its way).
//!
//! [`pack`]: crate::spool::nats::pack

use std::collections::{BTreeMap, HashMap, HashSet};

use super::Reply;
use crate::spool::nats::pack;

/// A message of several events this node took in and has not acked.
#[derive(Debug)]
struct Open {
    partition: u32,
    /// Events it holds.
    size: usize,
    /// The reply subject of its latest delivery.
    reply: String,
    /// Its events not settled yet, by index: `None` in this node's memory, `Some(due)`
    /// out with a delayed nak until `due` (ms).
    left: BTreeMap<usize, Option<i64>>,
}

/// The open packs, by stream sequence.
#[derive(Debug, Default)]
pub struct Packs {
    open: HashMap<u64, Open>,
}

impl Packs {
    /// A delivery of the message at `stream_seq` holding `events` events arrived on
    /// `reply`: the indexes of its events to take in (all of a message seen first; those
    /// not settled yet of an open pack).
    pub fn arrived(
        &mut self,
        partition: u32,
        stream_seq: u64,
        events: usize,
        reply: &str,
    ) -> Vec<usize> {
        if events < 2 {
            return vec![0];
        }
        let open = self.open.entry(stream_seq).or_insert_with(|| Open {
            partition,
            size: events,
            reply: String::new(),
            left: (0..events).map(|i| (i, None)).collect(),
        });
        reply.clone_into(&mut open.reply);
        for due in open.left.values_mut() {
            *due = None;
        }
        open.left.keys().copied().collect()
    }

    /// Turns the queue state's answers about events into answers about their messages.
    pub fn answer(&mut self, replies: Vec<Reply>, now: i64) -> Vec<Reply> {
        let mut out = Vec::new();
        let mut touched = HashSet::new();
        for reply in replies {
            let (stream_seq, index) = pack::message_of(reply.seq());
            let Some(open) = self.open.get_mut(&stream_seq) else {
                out.push(reply.for_message(stream_seq));
                continue;
            };
            match reply {
                Reply::Ack { .. } => {
                    open.left.remove(&index);
                }
                Reply::Nak { delay_ms, .. } => {
                    if let Some(due) = open.left.get_mut(&index) {
                        *due = Some(now + delay_ms as i64);
                    }
                }
            }
            touched.insert(stream_seq);
        }
        for stream_seq in touched {
            out.extend(self.answer_message(stream_seq, now));
        }
        out
    }

    /// The message's answer once its events allow one.
    fn answer_message(&mut self, stream_seq: u64, now: i64) -> Option<Reply> {
        let open = self.open.get(&stream_seq)?;
        if open.left.is_empty() {
            let open = self.open.remove(&stream_seq)?;
            return Some(Reply::Ack {
                seq: stream_seq,
                reply: open.reply,
            });
        }
        // The earliest due time, if every event left is out (`None` while one is here).
        let first = open
            .left
            .values()
            .try_fold(i64::MAX, |first, due| Some(first.min((*due)?)))?;
        Some(Reply::Nak {
            seq: stream_seq,
            reply: open.reply.clone(),
            delay_ms: (first - now).max(1) as u64,
        })
    }

    /// Forgets the packs of a partition this node no longer owns.
    pub fn drop_partition(&mut self, partition: u32) {
        self.open.retain(|_, open| open.partition != partition);
    }

    /// Events of open packs that are settled: still in the stream inside their message.
    pub fn settled(&self) -> u64 {
        self.open
            .values()
            .map(|open| (open.size - open.left.len()) as u64)
            .sum()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ack(seq: u64) -> Reply {
        Reply::Ack {
            seq,
            reply: "old".into(),
        }
    }

    /// The ack of message `seq` on `reply`.
    fn acked(seq: u64, reply: &str) -> Vec<Reply> {
        vec![Reply::Ack {
            seq,
            reply: reply.into(),
        }]
    }

    fn nak(seq: u64, delay_ms: u64) -> Reply {
        Reply::Nak {
            seq,
            reply: "old".into(),
            delay_ms,
        }
    }

    #[test]
    fn a_single_event_is_answered_as_it_is() {
        let mut packs = Packs::default();
        assert_eq!(packs.arrived(0, 9, 1, "r9"), vec![0]);
        let seq = pack::event_seq(9, 0);
        assert_eq!(packs.answer(vec![ack(seq)], 0), vec![ack(9)]);
        assert_eq!(packs.answer(vec![nak(seq, 30)], 0), vec![nak(9, 30)]);
        assert_eq!(packs.len(), 0);
    }

    #[test]
    fn a_pack_is_acked_when_its_last_event_is() {
        let mut packs = Packs::default();
        assert_eq!(packs.arrived(0, 5, 3, "r5"), vec![0, 1, 2]);
        let seqs: Vec<u64> = (0..3).map(|i| pack::event_seq(5, i)).collect();
        assert!(packs.answer(vec![ack(seqs[0]), ack(seqs[2])], 0).is_empty());
        assert_eq!(packs.answer(vec![ack(seqs[1])], 0), acked(5, "r5"));
        assert_eq!(packs.len(), 0);
    }

    #[test]
    fn a_pack_goes_back_once_nothing_of_it_is_in_memory_and_returns_without_the_settled() {
        let mut packs = Packs::default();
        packs.arrived(2, 5, 3, "r5");
        let seqs: Vec<u64> = (0..3).map(|i| pack::event_seq(5, i)).collect();
        // A held event goes out while another is still leased: nothing to say yet.
        assert!(packs.answer(vec![nak(seqs[1], 5_000)], 1_000).is_empty());
        // The leased one is retried, the third delivered: back at the earliest due time.
        let answered = packs.answer(vec![nak(seqs[0], 2_000), ack(seqs[2])], 2_000);
        assert_eq!(
            answered,
            vec![Reply::Nak {
                seq: 5,
                reply: "r5".into(),
                delay_ms: 2_000
            }]
        );
        assert_eq!(packs.settled(), 1);
        assert_eq!(
            packs.arrived(2, 5, 3, "r5b"),
            vec![0, 1],
            "the delivered one stays out"
        );
        assert!(
            packs.answer(vec![ack(seqs[0])], 4_000).is_empty(),
            "one still in memory"
        );
        assert_eq!(packs.answer(vec![ack(seqs[1])], 4_000), acked(5, "r5b"));
    }

    #[test]
    fn a_dropped_partition_forgets_its_packs() {
        let mut packs = Packs::default();
        packs.arrived(1, 5, 2, "r5");
        packs.arrived(2, 6, 2, "r6");
        packs.drop_partition(1);
        assert_eq!(packs.len(), 1);
    }
}
