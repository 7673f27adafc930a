//! The in-memory side of the JetStream spool: the events a node has pulled from the
//! partitions it owns, and the holds that keep each user's events in order.
//!
//! Pure bookkeeping, no IO: every method takes the current time and returns what must be
//! said to JetStream (ack, nak with delay), so the rules are unit-tested without a server.
//!
//! Invariants:
//! - A partition is consumed by one node at a time, so this node sees every pending event of
//!   the users it holds: holding them here is enough to keep their order.
//! - `entries` is ordered by stream sequence, which increases with append order, so a scan
//!   in key order is the queue order, whatever order JetStream redelivered them in.
//! - A user is held while one of its events is leased (until the lease runs out or the batch
//!   settles), or while an earlier event of the user is out with a delayed nak (`outstanding`):
//!   none of its later events is handed out before that one came back and was settled.
//! - Events pulled through a consumer that was since replaced ([`QueueState::reset_partition`])
//!   are `stale`: they are not leased, and they hold their user, until the new consumer
//!   delivers them again (with a reply subject that works); one settled meanwhile is acked
//!   or nakked on that redelivery instead.
//! - A partition is leased from only while its ownership is fresh (`fresh_until`), however
//!   late the ownership round that would notice a lost renewal runs.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use crate::segment::{HoldKey, UserKey};
use crate::spool::{Leased, Settlement};

mod packs;
pub use packs::Packs;

/// Where an event came from and how to answer JetStream about it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub event: Leased,
    pub partition: u32,
    /// The reply subject of the delivery (`$JS.ACK...`): acks, naks and progress go there.
    pub reply: String,
    /// JetStream's delivery count of this event (includes held-back redeliveries).
    pub delivered: u64,
    /// Failed attempts recorded with the event (a replayed dead letter's history).
    pub history: Vec<(i64, Option<u16>, String)>,
}

/// What a node must tell JetStream about an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Remove it from the stream (delivered, skipped, or copied to the dead letters).
    Ack { seq: u64, reply: String },
    /// Deliver it again after `delay_ms` (a retry, or a held-back later event of a user
    /// who waits for a retry). Never a bare nak: that redelivers at once.
    Nak {
        seq: u64,
        reply: String,
        delay_ms: u64,
    },
}

impl Reply {
    /// The event (or message) it is about.
    pub fn seq(&self) -> u64 {
        match self {
            Reply::Ack { seq, .. } | Reply::Nak { seq, .. } => *seq,
        }
    }

    /// The same answer about the message at `stream_seq`.
    fn for_message(self, stream_seq: u64) -> Reply {
        match self {
            Reply::Ack { reply, .. } => Reply::Ack {
                seq: stream_seq,
                reply,
            },
            Reply::Nak {
                reply, delay_ms, ..
            } => Reply::Nak {
                seq: stream_seq,
                reply,
                delay_ms,
            },
        }
    }
}

/// What the owner of a partition remembers of a retried event, kept in JetStream so that
/// the next owner continues its backoff instead of starting over.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RetryRecord {
    /// Attempts made so far.
    #[serde(rename = "a")]
    pub attempts: u32,
    /// When the event is due again (ms).
    #[serde(rename = "t")]
    pub retry_at_ms: i64,
    /// The failed attempts: when, status, error.
    #[serde(rename = "h", default)]
    pub history: Vec<(i64, Option<u16>, String)>,
}

/// A change to the retry records that settling made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordChange {
    Put {
        partition: u32,
        seq: u64,
        record: RetryRecord,
    },
    Remove {
        partition: u32,
        seq: u64,
    },
}

#[derive(Debug, Default, Clone)]
struct Hold {
    partition: u32,
    /// The user's leased events may not be leased again before this (ms).
    lease_until: i64,
    /// When the user's last retried event is due back (ms); informs held-back naks.
    retry_at: i64,
    /// Events of this user that are out with a delayed nak and not back yet.
    outstanding: BTreeSet<u64>,
}

impl Hold {
    fn blocks(&self, seq: u64, now: i64) -> bool {
        self.lease_until > now || self.outstanding.range(..seq).next().is_some()
    }

    fn is_idle(&self) -> bool {
        self.lease_until == 0 && self.outstanding.is_empty()
    }
}

/// A partition this node owns.
#[derive(Debug, Default, Clone)]
pub struct PartitionState {
    /// Whether leases may hand out its events (owned, ownership fresh, not draining).
    pub leasable: bool,
    /// The highest stream sequence pulled from it.
    pub seen_high: u64,
    /// The highest stream sequence known to be in it (from this node's own appends and
    /// from the stream when the partition was taken): a lease waits until it was pulled.
    pub target_high: u64,
    /// Leases stop handing out its events at this time (ms) unless the ownership was renewed
    /// meanwhile: half the ownership TTL after the last renewal was sent, so a node whose
    /// renewals fail stops before its key can expire and another node take over. `None`: no
    /// limit.
    pub fresh_until: Option<i64>,
    /// Which taking of the partition this is (the ownership key's revision when taken):
    /// deliveries pulled for an earlier one are not taken in.
    pub epoch: u64,
}

/// Held-back events of a waiting user come back this long after the retried one, one step
/// per event, so they are redelivered behind it.
const HELD_BACK_STEP_MS: u64 = 5;
/// A later event of a user whose retry is due within this long stays in memory instead of
/// being nakked with a delay.
const KEEP_IN_MEMORY_MS: i64 = 1_000;

/// Events pulled and not yet settled, and the holds that keep per-user order.
#[derive(Debug, Default)]
pub struct QueueState {
    entries: BTreeMap<u64, Entry>,
    holds: HashMap<HoldKey, Hold>,
    /// Delivery attempts per event (retries settled on this node).
    attempts: HashMap<u64, u32>,
    /// The failed attempts per event: when, the status, the error.
    history: HashMap<u64, Vec<(i64, Option<u16>, String)>>,
    /// Retry times of events a previous owner retried, or this node retried through a
    /// consumer since replaced, until they arrive.
    restored: HashMap<u64, i64>,
    /// Events whose reply subject belongs to a replaced consumer: waiting for redelivery.
    stale: HashSet<u64>,
    /// Events settled (acked, skipped, dead-lettered) while stale: acked on redelivery.
    ack_on_arrival: HashMap<u64, u32>,
    /// Retry records to write or remove, drained by [`QueueState::take_record_changes`].
    record_changes: Vec<RecordChange>,
    pub partitions: HashMap<u32, PartitionState>,
    /// The messages of several events taken in and not acked: their answers to JetStream.
    pub packs: Packs,
}

fn hold_key(source: &str, user_key: &UserKey) -> HoldKey {
    HoldKey::new(source, user_key)
}

impl QueueState {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Events held that are not waiting for a redelivery from a replaced consumer.
    pub fn live_len(&self) -> usize {
        self.entries.len() - self.stale.len()
    }

    /// Takes in an event pulled for the partition's ownership `epoch`, if that is still the
    /// current one: a pull that outlived its ownership must not leave events behind (they
    /// would be leased when the partition is taken again, before the new consumer's
    /// earlier events).
    pub fn insert_owned(&mut self, epoch: u64, entry: Entry, now: i64) -> Option<Reply> {
        let current = self.partitions.get(&entry.partition).map(|p| p.epoch);
        if current != Some(epoch) {
            return None;
        }
        self.insert(entry, now)
    }

    /// Takes in an event pulled from JetStream. Returns a nak when the event belongs behind
    /// an event of its user that is out with a delayed nak for a while yet.
    pub fn insert(&mut self, mut entry: Entry, now: i64) -> Option<Reply> {
        let seq = entry.event.seq as u64;
        let partition = self.partitions.entry(entry.partition).or_default();
        partition.seen_high = partition.seen_high.max(seq);
        let key = hold_key(&entry.event.source, &entry.event.user_key);
        if entry.delivered == 1 {
            // A consumer's first deliveries come in stream order: a stale event before this
            // one that it did not deliver is no longer in the stream (another node acked it).
            self.forget_stale(entry.partition, Some(seq));
        }
        if self.ack_on_arrival.remove(&seq).is_some() {
            // Settled while its reply subject was stale: the ack goes to the new one.
            return Some(Reply::Ack {
                seq,
                reply: entry.reply,
            });
        }
        if let Some(existing) = self.entries.get_mut(&seq) {
            // Redelivered while still here (its ack wait ran out, or its consumer was
            // replaced): answer on the new reply.
            existing.reply = entry.reply;
            existing.delivered = entry.delivered;
            self.stale.remove(&seq);
            return None;
        }
        if let Some(retry_at) = self.restored.remove(&seq) {
            // A previous owner retried it: keep its schedule, and hold its user meanwhile.
            if retry_at - now > KEEP_IN_MEMORY_MS {
                let hold = self.holds.entry(key).or_default();
                hold.partition = entry.partition;
                hold.retry_at = hold.retry_at.max(retry_at);
                hold.outstanding.insert(seq);
                return Some(Reply::Nak {
                    seq,
                    reply: entry.reply,
                    delay_ms: (retry_at - now) as u64,
                });
            }
        }
        if let Some(hold) = self.holds.get_mut(&key) {
            hold.outstanding.remove(&seq);
            let wait = hold.retry_at - now;
            if wait > KEEP_IN_MEMORY_MS && hold.outstanding.range(..seq).next().is_some() {
                hold.outstanding.insert(seq);
                return Some(Reply::Nak {
                    seq,
                    reply: entry.reply,
                    delay_ms: wait as u64 + HELD_BACK_STEP_MS,
                });
            }
            if hold.is_idle() {
                self.holds.remove(&key);
            }
        }
        if !entry.history.is_empty() {
            self.history
                .entry(seq)
                .or_insert_with(|| std::mem::take(&mut entry.history));
        }
        // A replayed dead letter arrives with the attempts it had.
        entry.event.attempts = self
            .attempts
            .get(&seq)
            .copied()
            .unwrap_or(0)
            .max(entry.event.attempts);
        self.entries.insert(seq, entry);
        None
    }

    /// What each leasable partition is known to hold now (its highest sequence).
    pub fn targets(&self) -> Vec<(u32, u64)> {
        self.partitions
            .iter()
            .filter(|(_, p)| p.leasable)
            .map(|(n, p)| (*n, p.target_high))
            .collect()
    }

    /// Whether every partition of `targets` (still leasable) has pulled up to its target.
    pub fn caught_up(&self, targets: &[(u32, u64)]) -> bool {
        targets
            .iter()
            .all(|(n, target)| match self.partitions.get(n) {
                Some(p) => !p.leasable || p.seen_high >= *target,
                None => true,
            })
    }

    /// Records that `seq` is in `partition` (an append of this node).
    pub fn appended(&mut self, partition: u32, seq: u64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.target_high = p.target_high.max(seq);
        }
    }

    /// Up to `max` deliverable events in queue order; their users are held for `lease_ms`.
    pub fn lease(&mut self, max: usize, lease_ms: i64, now: i64) -> Vec<Leased> {
        let mut out = Vec::new();
        let mut taken: HashMap<HoldKey, u32> = HashMap::new();
        let mut blocked: HashSet<HoldKey> = HashSet::new();
        // The user of the last event passed over: its later events right behind it are
        // passed over without a look (a user's events of one pack are in a row).
        let mut passed: Option<(&str, &UserKey)> = None;
        for (seq, entry) in &self.entries {
            if out.len() >= max {
                break;
            }
            let who = (entry.event.source.as_str(), &entry.event.user_key);
            if passed == Some(who) {
                continue;
            }
            if !self.may_lease(*seq, entry, &blocked, now) {
                if self.stale.contains(seq) {
                    // Its user waits until the new consumer delivered it again.
                    blocked.insert(hold_key(who.0, who.1));
                }
                passed = Some(who);
                continue;
            }
            passed = None;
            taken.insert(hold_key(who.0, who.1), entry.partition);
            out.push(entry.event.clone());
        }
        for (key, partition) in taken {
            let hold = self.holds.entry(key).or_default();
            hold.partition = partition;
            hold.lease_until = now + lease_ms;
        }
        out
    }

    /// Whether the event may be leased now: its partition leasable and fresh, the event not
    /// stale, its user neither `blocked` in this lease nor held.
    fn may_lease(&self, seq: u64, entry: &Entry, blocked: &HashSet<HoldKey>, now: i64) -> bool {
        let fresh = self
            .partitions
            .get(&entry.partition)
            .is_some_and(|p| p.leasable && p.fresh_until.is_none_or(|until| now < until));
        if !fresh || self.stale.contains(&seq) {
            return false;
        }
        let key = hold_key(&entry.event.source, &entry.event.user_key);
        !blocked.contains(&key) && !self.holds.get(&key).is_some_and(|h| h.blocks(seq, now))
    }

    /// The entry behind a leased sequence, if this node still has it.
    pub fn get(&self, seq: i64) -> Option<&Entry> {
        u64::try_from(seq).ok().and_then(|s| self.entries.get(&s))
    }

    /// Applies a settlement to memory; returns what to tell JetStream. Dead letters must
    /// already be copied to their stream: they are acked here like delivered events.
    pub fn settle(&mut self, settlement: &Settlement, now: i64) -> Vec<Reply> {
        let mut replies = Vec::new();
        let mut touched: HashSet<HoldKey> = HashSet::new();
        let mut waiting: HashSet<HoldKey> = HashSet::new();
        self.settle_removed(settlement, &mut touched, &mut replies);
        self.settle_retries(settlement, now, &mut waiting, &mut replies);
        for seq in &settlement.released {
            if let Some(entry) = self.get(*seq) {
                touched.insert(hold_key(&entry.event.source, &entry.event.user_key));
            }
        }
        if !waiting.is_empty() {
            replies.extend(self.hold_back(&waiting, now));
        }
        if !settlement.keep_holds {
            for key in touched.difference(&waiting) {
                if let Some(hold) = self.holds.get_mut(key) {
                    hold.lease_until = 0;
                    if hold.is_idle() {
                        self.holds.remove(key);
                    }
                }
            }
        }
        replies
    }

    /// The settlement's acked, skipped and dead events leave the state: acked to JetStream
    /// (or on arrival, when their consumer was replaced), their users `touched`.
    fn settle_removed(
        &mut self,
        settlement: &Settlement,
        touched: &mut HashSet<HoldKey>,
        replies: &mut Vec<Reply>,
    ) {
        let removed = settlement
            .acked
            .iter()
            .chain(settlement.skipped.iter().map(|s| &s.seq))
            .chain(settlement.dead.iter().map(|d| &d.seq));
        for seq in removed {
            let Ok(seq) = u64::try_from(*seq) else {
                continue;
            };
            if let Some(entry) = self.entries.remove(&seq) {
                if self.attempts.remove(&seq).is_some() {
                    self.record_changes.push(RecordChange::Remove {
                        partition: entry.partition,
                        seq,
                    });
                }
                self.history.remove(&seq);
                touched.insert(hold_key(&entry.event.source, &entry.event.user_key));
                if self.stale.remove(&seq) {
                    self.ack_on_arrival.insert(seq, entry.partition);
                } else {
                    replies.push(Reply::Ack {
                        seq,
                        reply: entry.reply,
                    });
                }
            }
        }
    }

    /// The settlement's retried and postponed events are nakked with their delay, their
    /// users held until then (`waiting`). Retried events count an attempt; postponed ones
    /// (delivery paused) do not.
    fn settle_retries(
        &mut self,
        settlement: &Settlement,
        now: i64,
        waiting: &mut HashSet<HoldKey>,
        replies: &mut Vec<Reply>,
    ) {
        let retries = settlement
            .retried
            .iter()
            .map(|r| {
                (
                    r.seq,
                    r.next_attempt_at_ms,
                    Some((r.status, r.error.clone())),
                )
            })
            .chain(
                settlement
                    .postponed
                    .iter()
                    .map(|p| (p.seq, p.until_ms, None)),
            );
        for (seq, retry_at_ms, failure) in retries {
            let Ok(seq) = u64::try_from(seq) else {
                continue;
            };
            let Some(entry) = self.entries.remove(&seq) else {
                continue;
            };
            let attempts = entry.event.attempts + u32::from(failure.is_some());
            self.attempts.insert(seq, attempts);
            let history = self.history.entry(seq).or_default();
            if let Some((status, error)) = failure {
                history.push((now, status, error));
            }
            self.record_changes.push(RecordChange::Put {
                partition: entry.partition,
                seq,
                record: RetryRecord {
                    attempts,
                    retry_at_ms,
                    history: history.clone(),
                },
            });
            let key = hold_key(&entry.event.source, &entry.event.user_key);
            let hold = self.holds.entry(key.clone()).or_default();
            hold.partition = entry.partition;
            hold.lease_until = 0;
            hold.retry_at = hold.retry_at.max(retry_at_ms);
            hold.outstanding.insert(seq);
            waiting.insert(key);
            // Should it come back early (a new consumer delivers it again at once, or it
            // shares a message with an event due sooner), it is nakked with what is left.
            self.restored.insert(seq, retry_at_ms);
            if self.stale.remove(&seq) {
                continue;
            }
            replies.push(Reply::Nak {
                seq,
                reply: entry.reply,
                delay_ms: (retry_at_ms - now).max(1) as u64,
            });
        }
    }

    /// Sends the in-memory later events of users who wait for a retry back to JetStream
    /// with a delay that brings them back right behind the retried event, so memory does
    /// not fill with events that cannot be delivered for minutes.
    fn hold_back(&mut self, waiting: &HashSet<HoldKey>, now: i64) -> Vec<Reply> {
        let mut replies = Vec::new();
        let mut step: HashMap<HoldKey, u64> = HashMap::new();
        let behind: Vec<u64> = self
            .entries
            .iter()
            .filter_map(|(seq, entry)| {
                let key = hold_key(&entry.event.source, &entry.event.user_key);
                let hold = self.holds.get(&key)?;
                let wait = hold.retry_at - now;
                (waiting.contains(&key)
                    && wait > KEEP_IN_MEMORY_MS
                    && hold.outstanding.range(..*seq).next().is_some())
                .then_some(*seq)
            })
            .collect();
        for seq in behind {
            let Some(entry) = self.entries.remove(&seq) else {
                continue;
            };
            let key = hold_key(&entry.event.source, &entry.event.user_key);
            let Some(hold) = self.holds.get_mut(&key) else {
                continue;
            };
            hold.outstanding.insert(seq);
            if self.stale.remove(&seq) {
                self.restored.insert(seq, hold.retry_at);
                continue;
            }
            let n = step.entry(key).or_insert(0);
            *n += 1;
            replies.push(Reply::Nak {
                seq,
                reply: entry.reply,
                delay_ms: (hold.retry_at - now).max(1) as u64 + *n * HELD_BACK_STEP_MS,
            });
        }
        replies
    }

    /// Forgets a partition this node no longer owns: its events will be delivered by the
    /// next owner, from the stream.
    pub fn drop_partition(&mut self, partition: u32) {
        self.partitions.remove(&partition);
        let gone: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.partition == partition)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in gone {
            self.entries.remove(&seq);
            self.attempts.remove(&seq);
            self.history.remove(&seq);
            self.stale.remove(&seq);
        }
        self.holds.retain(|_, hold| hold.partition != partition);
        self.ack_on_arrival.retain(|_, p| *p != partition);
        self.packs.drop_partition(partition);
    }

    /// The partition's consumer was replaced (deliveries went missing on the way, or the
    /// consumer was gone): the new one delivers every unacked event again from the start.
    /// Events in memory wait for that redelivery (`stale`); events out with a delayed nak
    /// keep their retry time, so their early redelivery is nakked again with what is left;
    /// holds stay, so nothing later of a held user is leased meanwhile.
    pub fn reset_partition(&mut self, partition: u32) {
        for (seq, entry) in &self.entries {
            if entry.partition == partition {
                self.stale.insert(*seq);
            }
        }
        for hold in self.holds.values().filter(|h| h.partition == partition) {
            for seq in &hold.outstanding {
                self.restored.entry(*seq).or_insert(hold.retry_at);
            }
        }
    }

    /// Forgets the partition's stale events (below `below`, if given): they are no longer
    /// in the stream, so no consumer will deliver them again, and they must not hold their
    /// users.
    pub fn forget_stale(&mut self, partition: u32, below: Option<u64>) {
        if self.stale.is_empty() {
            return;
        }
        let gone: Vec<u64> = self
            .stale
            .iter()
            .copied()
            .filter(|seq| below.is_none_or(|b| *seq < b))
            .filter(|seq| {
                self.entries
                    .get(seq)
                    .is_some_and(|e| e.partition == partition)
            })
            .collect();
        for seq in gone {
            self.stale.remove(&seq);
            self.entries.remove(&seq);
            self.attempts.remove(&seq);
            self.history.remove(&seq);
        }
    }

    /// Sets when leasing from a partition stops unless its ownership is renewed again.
    pub fn set_fresh_until(&mut self, partition: u32, until: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.fresh_until = Some(until);
        }
    }

    /// Takes in what a previous owner recorded about an event it retried.
    pub fn restore(&mut self, seq: u64, record: RetryRecord) {
        self.attempts.insert(seq, record.attempts);
        self.history.insert(seq, record.history);
        self.restored.insert(seq, record.retry_at_ms);
    }

    /// The retry records settling changed since the last call.
    pub fn take_record_changes(&mut self) -> Vec<RecordChange> {
        std::mem::take(&mut self.record_changes)
    }

    /// The failed attempts of an event this node retried.
    pub fn history(&self, seq: i64) -> Vec<(i64, Option<u16>, String)> {
        u64::try_from(seq)
            .ok()
            .and_then(|s| self.history.get(&s))
            .cloned()
            .unwrap_or_default()
    }

    /// Whether a partition has events leased right now (a graceful hand-over waits).
    pub fn has_leases(&self, partition: u32, now: i64) -> bool {
        self.holds
            .values()
            .any(|h| h.partition == partition && h.lease_until > now)
    }

    /// Entries held in memory per partition that are leased or waiting, for progress acks.
    pub fn replies(&self) -> Vec<String> {
        self.entries.values().map(|e| e.reply.clone()).collect()
    }
}

#[cfg(test)]
mod tests;
