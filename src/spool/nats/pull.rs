//! Pulling a partition's events from its consumer into the in-memory queue state,
//! recovering the consumer after a stall, and moving events past `max_deliver` to the dead
//! letters.
//!
//! Invariant: only deliveries without a gap are taken in. JetStream numbers a consumer's
//! deliveries (first ones and redeliveries alike, `consumer_sequence`); one it sent that
//! never arrived (the server the node was connected to was killed, a pull was dropped
//! while messages were on their way, another process pulled from the consumer) counts as
//! delivered and pending, and would come back only after the ack wait, behind later events
//! of the same user that arrived meanwhile. So a delivery numbered beyond the next one is
//! not taken in: the consumer is replaced ([`Inner::replace_consumer`]), which delivers
//! every unacked event again from the start of the partition, in stream order.

use super::*;
use crate::segment::{EventType, UserKey};

/// Bytes of messages taken in at once, at most (but for one larger message): packs make a
/// fetch batch of messages hundreds of times as many events.
const READY_BYTES: usize = 4 * 1024 * 1024;
/// Bytes one pull request asks for at most, so the client does not buffer many full
/// fetch batches of packs.
const PULL_BYTES: usize = 16 * 1024 * 1024;

/// What a partition's pull loop does after a pull.
enum Next {
    /// Start a new pull.
    PullAgain,
    /// The partition was given up or the spool stopped.
    Stop,
}

impl Inner {
    /// Pulls the partition's events into memory until stopped; survives missed heartbeats,
    /// reconnects and server restarts by starting a new pull (and, if the consumer is gone
    /// while this node still owns the partition, a new consumer).
    pub(super) async fn pull_loop(
        self: Arc<Self>,
        partition: u32,
        epoch: u64,
        consumer: consumer::PullConsumer,
        mut stopped: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_millis(100);
        let Some(mut index) = self.load_dedup(partition, &mut stopped).await else {
            return;
        };
        let mut cursor = Cursor::new(consumer);
        loop {
            if !self.wait_until_fresh(partition, &mut stopped).await {
                return;
            }
            let messages = cursor
                .consumer
                .stream()
                .max_messages_per_batch(self.options.fetch_batch)
                .max_bytes_per_batch(PULL_BYTES)
                .heartbeat(PULL_HEARTBEAT)
                .expires(PULL_EXPIRES)
                .messages()
                .await;
            let mut messages = match messages {
                Ok(messages) => messages,
                Err(e) => {
                    tracing::warn!(partition, error = %e, "cannot pull from a partition");
                    if self.sleep_or_stop(backoff, &mut stopped).await {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    if self.client.connection_state() == async_nats::connection::State::Connected
                        && e.to_string().contains("not found")
                    {
                        tracing::warn!(
                            partition,
                            "the partition's consumer is gone; recreating it"
                        );
                        if !self
                            .renew_cursor(partition, &mut cursor, &mut stopped)
                            .await
                        {
                            return;
                        }
                    }
                    continue;
                }
            };
            let pulled = (&mut cursor, &mut messages, index.as_mut());
            if let Next::Stop = self
                .take_pulled((partition, epoch), pulled, &mut stopped, &mut backoff)
                .await
            {
                return;
            }
            if self.sleep_or_stop(backoff, &mut stopped).await {
                return;
            }
            // Until a message arrives again, each failed pull waits twice as long (a consumer
            // leader being elected answers "no responders" for seconds).
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Takes in what one pull delivers, batch by batch, while there is room, until the pull
    /// ends, fails, outlives this node's ownership or skips a delivery (the consumer is then
    /// replaced): [`Next::PullAgain`] then, [`Next::Stop`] once the partition is given up.
    async fn take_pulled(
        &self,
        (partition, epoch): (u32, u64),
        (cursor, messages, mut index): (
            &mut Cursor,
            &mut consumer::pull::Stream,
            Option<&mut dedup::PartitionIndex>,
        ),
        stopped: &mut watch::Receiver<bool>,
        backoff: &mut Duration,
    ) -> Next {
        // The idle check's own deadline: the other branches' wake-ups (the ownership's
        // freshness, renewed more often than the check) must not put it off forever.
        let mut idle_at = tokio::time::Instant::now() + IDLE_CHECK;
        loop {
            if !self.wait_for_room(stopped).await {
                return Next::Stop;
            }
            let gap = tokio::select! {
                next = messages.next() => match next {
                    Some(Ok(message)) => {
                        *backoff = Duration::from_millis(100);
                        cursor.idle_seen = None;
                        idle_at = tokio::time::Instant::now() + IDLE_CHECK;
                        let (batch, ended) = self.ready(message, messages);
                        let (batch, gap) = cut_at_gap(batch, &mut cursor.taken_upto);
                        if !batch.is_empty()
                            && !self
                                .receive_batch((partition, epoch), batch, index.as_deref_mut(), stopped)
                                .await
                        {
                            return Next::Stop;
                        }
                        if gap.is_none() && ended {
                            break;
                        }
                        gap
                    }
                    Some(Err(e)) => {
                        tracing::warn!(partition, error = %e, "pulling from a partition failed; pulling again");
                        break;
                    }
                    None => break,
                },
                _ = stopped.changed() => return Next::Stop,
                _ = tokio::time::sleep_until(idle_at) => {
                    idle_at = tokio::time::Instant::now() + IDLE_CHECK;
                    self.idle_gap(partition, cursor).await
                }
                _ = tokio::time::sleep(self.fresh_left(partition)) => {
                    if self.fresh_left(partition).is_zero() {
                        // Not renewed in time: stop pulling before another node takes
                        // the partition, or this pull would take its deliveries.
                        break;
                    }
                    None
                }
            };
            if let Some((expected, got)) = gap {
                tracing::warn!(
                    partition,
                    expected,
                    got,
                    "deliveries of the partition's consumer went missing; replacing the consumer"
                );
                if !self.renew_cursor(partition, cursor, stopped).await {
                    return Next::Stop;
                }
                *backoff = Duration::from_millis(100);
                break;
            }
        }
        Next::PullAgain
    }

    /// The partition's dedup index, loaded from the stream (retried until it loads or the
    /// partition is given up: `None` then); `Some(None)` without an index.
    async fn load_dedup(
        &self,
        partition: u32,
        stopped: &mut watch::Receiver<bool>,
    ) -> Option<Option<dedup::PartitionIndex>> {
        let store = match &self.dedup_index {
            Some(store) => store,
            None => return Some(None),
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            match store.load(partition).await {
                Ok(index) => {
                    tracing::info!(
                        partition,
                        ids = index.ids(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "loaded the partition's dedup index"
                    );
                    return Some(Some(index));
                }
                Err(e) => {
                    tracing::warn!(partition, error = %e, "cannot load the partition's dedup index")
                }
            }
            if self.sleep_or_stop(backoff, stopped).await {
                return None;
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// `first` and the messages already received behind it (up to a fetch batch or
    /// [`READY_BYTES`]), and whether the pull ended meanwhile.
    fn ready(
        &self,
        first: jetstream::Message,
        messages: &mut consumer::pull::Stream,
    ) -> (Vec<jetstream::Message>, bool) {
        use futures_util::FutureExt;
        let mut bytes = first.payload.len();
        let mut batch = vec![first];
        while batch.len() < self.options.fetch_batch && bytes < READY_BYTES {
            match messages.next().now_or_never() {
                Some(Some(Ok(message))) => {
                    bytes += message.payload.len();
                    batch.push(message);
                }
                Some(Some(Err(e))) => {
                    tracing::warn!(error = %e, "pulling from a partition failed; pulling again");
                    return (batch, true);
                }
                Some(None) => return (batch, true),
                None => break,
            }
        }
        (batch, false)
    }

    /// Judges a batch's events against the partition's dedup index, persists the new ids
    /// in its journal, then drops the repeats (settled) and takes in the rest. False when
    /// the partition was given up before the journal could be written (nothing taken in).
    async fn receive_batch(
        &self,
        (partition, epoch): (u32, u64),
        batch: Vec<jetstream::Message>,
        mut index: Option<&mut dedup::PartitionIndex>,
        stopped: &watch::Receiver<bool>,
    ) -> bool {
        let arrivals: Vec<Arrival> = batch.into_iter().filter_map(Arrival::of).collect();
        // Which events of each message to take in: a pack's settled events stay out, and
        // nothing of a pull that outlived its ownership.
        let takes: Vec<Vec<usize>> = {
            let mut state = self.state();
            let owned = state.partitions.get(&partition).map(|p| p.epoch) == Some(epoch);
            arrivals
                .iter()
                .map(|a| match a.events.as_ref().map_or(0, Vec::len) {
                    n if n > 0 && owned => {
                        state.packs.arrived(partition, a.stream_seq, n, &a.reply)
                    }
                    _ => Vec::new(),
                })
                .collect()
        };
        let repeats = match (&self.dedup_index, index.as_deref_mut()) {
            (Some(store), Some(index)) => {
                let repeats = judge(store, index, &arrivals, &takes);
                // Given up meanwhile (the journal write can take long while JetStream is
                // away): the next owner, or this node's next consumer, delivers these
                // events, so nothing of this pull may reach the queue state any more.
                if !store.log(index, stopped).await || *stopped.borrow() {
                    return false;
                }
                repeats
            }
            _ => takes.iter().map(|take| vec![false; take.len()]).collect(),
        };
        for ((arrival, take), repeats) in arrivals.into_iter().zip(takes).zip(repeats) {
            self.receive(partition, epoch, arrival, take.into_iter().zip(repeats))
                .await;
        }
        if let (Some(store), Some(index)) = (&self.dedup_index, index) {
            if let Err(e) = store.maintain(index).await {
                tracing::warn!(partition, error = %e, "cannot write the partition's dedup index out");
            }
        }
        true
    }

    /// Deliveries that went missing at the end of what the consumer sent, which no later
    /// delivery reveals: when nothing arrived for two idle checks in a row and the
    /// consumer's count of deliveries stayed the same, above what was taken in, those never
    /// arrive (`(expected, got)`: the first missing number and the consumer's last). When
    /// everything was delivered and taken in, stale events left are forgotten.
    async fn idle_gap(&self, partition: u32, cursor: &mut Cursor) -> Option<(u64, u64)> {
        let (delivered, undelivered) = match cursor.consumer.get_info().await {
            Ok(info) => (info.delivered.consumer_sequence, info.num_pending),
            Err(e) => {
                tracing::debug!(partition, error = %e, "cannot read the partition's consumer");
                return None;
            }
        };
        if delivered > cursor.taken_upto && cursor.idle_seen == Some(delivered) {
            return Some((cursor.taken_upto + 1, delivered));
        }
        if delivered == cursor.taken_upto && undelivered == 0 {
            // Every event still in the partition was delivered and taken in: the stale
            // events left were acked elsewhere.
            self.state().forget_stale(partition, None);
        }
        cursor.idle_seen = Some(delivered);
        None
    }

    /// How long the partition's ownership stays fresh without another renewal (zero: not
    /// fresh; a long time when it has no limit).
    fn fresh_left(&self, partition: u32) -> Duration {
        let until = self
            .state()
            .partitions
            .get(&partition)
            .map(|p| p.fresh_until.unwrap_or(i64::MAX));
        match until {
            Some(until) => Duration::from_millis(until.saturating_sub(now_ms()).max(0) as u64)
                .min(Duration::from_secs(3600)),
            None => Duration::ZERO,
        }
    }

    /// Waits until the partition's ownership is fresh (renewed in time), so that a node
    /// whose renewals fail does not pull (and take deliveries another owner's consumer
    /// sends) while its key expires; false when stopped meanwhile.
    async fn wait_until_fresh(&self, partition: u32, stopped: &mut watch::Receiver<bool>) -> bool {
        loop {
            if *stopped.borrow() {
                return false;
            }
            if !self.fresh_left(partition).is_zero() {
                return true;
            }
            if self.sleep_or_stop(Duration::from_millis(50), stopped).await {
                return false;
            }
        }
    }

    /// Waits while the node holds `max_buffered` events; false when stopped meanwhile.
    /// Events waiting for their redelivery after a consumer was replaced do not count:
    /// only reading on lets them be delivered again and leased.
    async fn wait_for_room(&self, stopped: &mut watch::Receiver<bool>) -> bool {
        while self.state().live_len() >= self.options.max_buffered {
            if self.sleep_or_stop(Duration::from_millis(5), stopped).await {
                return false;
            }
        }
        true
    }

    /// Puts a new consumer under `cursor` ([`Inner::replace_consumer`]); false when the
    /// partition was given up meanwhile.
    async fn renew_cursor(
        &self,
        partition: u32,
        cursor: &mut Cursor,
        stopped: &mut watch::Receiver<bool>,
    ) -> bool {
        match self.replace_consumer(partition, stopped).await {
            Some(consumer) => {
                *cursor = Cursor::new(consumer);
                true
            }
            None => false,
        }
    }

    /// Replaces the partition's consumer after deliveries went missing or it was gone:
    /// the events in memory wait for their redelivery (see [`QueueState::reset_partition`]),
    /// and the new consumer is created only while the partition's key in the ownership
    /// bucket names this node; retried until it is created, or the partition is given up
    /// (`None`).
    pub(super) async fn replace_consumer(
        &self,
        partition: u32,
        stopped: &mut watch::Receiver<bool>,
    ) -> Option<consumer::PullConsumer> {
        self.state().reset_partition(partition);
        self.gauges.consumer_resets.inc();
        let mut backoff = Duration::from_millis(100);
        loop {
            if *stopped.borrow() {
                return None;
            }
            match self.kv.get(Self::partition_key(partition)).await {
                Ok(Some(owner)) if owner.as_ref() == self.node_id.as_bytes() => {
                    match self.fresh_consumer(partition).await {
                        Ok(consumer) => return Some(consumer),
                        Err(e) => {
                            tracing::warn!(partition, error = %e, "cannot replace the partition's consumer")
                        }
                    }
                }
                // Another node's, or none: this node's next ownership round drops the
                // partition and stops this task (a replica's answer may lag behind, so
                // this is no reason to stop pulling by itself).
                Ok(_) => {
                    tracing::warn!(
                        partition,
                        "the partition's key does not name this node; not replacing its consumer"
                    )
                }
                Err(e) => {
                    tracing::warn!(partition, error = %e, "cannot check the partition's owner")
                }
            }
            if self.sleep_or_stop(backoff, stopped).await {
                return None;
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    pub(super) async fn sleep_or_stop(
        &self,
        duration: Duration,
        stopped: &mut watch::Receiver<bool>,
    ) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(duration) => *stopped.borrow(),
            _ = stopped.changed() => true,
        }
    }

    /// Takes in one delivery of the partition this pull's ownership (`epoch`) is about; a
    /// pull that outlived its ownership (given up while it was taking in a batch) takes in
    /// nothing: the partition's next consumer delivers it again.
    /// Takes in the events `take` (index, whether a repeat) of a delivered message, then
    /// tells JetStream what the message's events allow ([`state::Packs`]).
    async fn receive(
        &self,
        partition: u32,
        epoch: u64,
        arrival: Arrival,
        take: impl Iterator<Item = (usize, bool)>,
    ) {
        let Some(events) = arrival.events else {
            let (seq, reply) = (arrival.stream_seq, arrival.reply);
            self.bury_unreadable(seq, reply, &arrival.body).await;
            return;
        };
        let (stream_seq, reply) = (arrival.stream_seq, arrival.reply);
        let mut events: Vec<Option<(Meta, Vec<u8>)>> = events.into_iter().map(Some).collect();
        let mut entries = Vec::new();
        let mut settled = Vec::new();
        for (i, repeat) in take {
            let Some((meta, payload)) = events.get_mut(i).and_then(Option::take) else {
                continue;
            };
            let seq = pack::event_seq(stream_seq, i);
            let at = Delivered {
                partition,
                seq,
                delivered: arrival.delivered,
                reply: &reply,
            };
            match self.sort(at, repeat, meta, payload).await {
                Sorted::Settled => settled.push(seq),
                Sorted::Entry(entry) => entries.push(*entry),
                Sorted::Left => {}
            }
        }
        let settled = settled.into_iter().map(|seq| Reply::Ack {
            seq,
            reply: reply.clone(),
        });
        let replies = self.take_in((partition, epoch), stream_seq, entries, settled);
        let (acks, naks): (Vec<Reply>, Vec<Reply>) = replies
            .into_iter()
            .partition(|r| matches!(r, Reply::Ack { .. }));
        for nak in naks {
            self.hold_later(nak).await;
        }
        self.answer(acks).await;
    }

    /// Puts a message's events into the queue state (if the partition's ownership is still
    /// `epoch`), with the answers of those it `settled` on arrival: what to tell JetStream
    /// about the message.
    fn take_in(
        &self,
        (partition, epoch): (u32, u64),
        stream_seq: u64,
        entries: Vec<Entry>,
        settled: impl Iterator<Item = Reply>,
    ) -> Vec<Reply> {
        let mut state = self.state();
        let now = now_ms();
        if let Some(p) = state.partitions.get_mut(&partition) {
            p.seen_high = p.seen_high.max(pack::event_seq(stream_seq, 0));
        }
        let mut replies: Vec<Reply> = entries
            .into_iter()
            .filter_map(|entry| state.insert_owned(epoch, entry, now))
            .collect();
        replies.extend(settled);
        state.packs.answer(replies, now)
    }

    /// What becomes of one event of a delivery: a repeat is settled (its first copy is in
    /// the index's journal); one delivered more than `max_deliver` times, or of a kind this
    /// build does not know, goes to the dead letters (settled once it is there); the rest
    /// goes to the queue state.
    async fn sort(&self, at: Delivered<'_>, repeat: bool, meta: Meta, payload: Vec<u8>) -> Sorted {
        let Delivered {
            partition,
            seq,
            delivered,
            reply,
        } = at;
        if repeat {
            if let Some(store) = &self.dedup_index {
                store.repeats.inc();
            }
            // Counted as accepted at ingest (JetStream did not recognise it there):
            // counted as a duplicate now.
            self.tally().withdrawn(&meta.s, meta.r, &meta.k);
            tracing::debug!(partition, seq, "dropped a repeated messageId");
            return Sorted::Settled;
        }
        // Only an event that comes back from JetStream counts against max_deliver, not one
        // still in memory (redelivered after its ack wait, being handled here): the state
        // is looked at only for an event past the bound.
        let past_max = self.options.max_deliver > 0
            && delivered > self.options.max_deliver
            && self.state().get(seq as i64).is_none();
        let kind = match EventType::from_stored(&meta.k) {
            Some(kind) if !past_max => kind,
            kind => {
                let buried = self.bury_event(seq, &meta, &payload, delivered, kind.is_none());
                return match buried.await {
                    true => Sorted::Settled,
                    false => Sorted::Left,
                };
            }
        };
        Sorted::Entry(Box::new(Entry {
            event: Leased {
                seq: seq as i64,
                source: meta.s,
                message_id: meta.m,
                kind,
                user_key: UserKey::from_stored(meta.u),
                payload,
                attempts: meta.a,
                received_at_ms: meta.r,
            },
            partition,
            reply: reply.to_owned(),
            delivered,
            history: meta.h,
        }))
    }

    /// Moves an event that cannot be delivered any more (past `max_deliver`, or of a kind
    /// this build does not know) to the dead letters; true once it is there.
    async fn bury_event(
        &self,
        seq: u64,
        meta: &Meta,
        payload: &[u8],
        delivered: u64,
        unknown_kind: bool,
    ) -> bool {
        let error = if unknown_kind {
            format!("the stored event's kind `{}` is unknown", meta.k)
        } else {
            format!("delivered {} times (max_deliver)", delivered - 1)
        };
        let dead = DeadMeta {
            source: meta.s.clone(),
            message_id: meta.m.clone(),
            kind: meta.k.clone(),
            user_key: meta.u.clone(),
            received_at_ms: meta.r,
            attempts: (delivered - 1) as u32,
            status: None,
            error,
            created_at_ms: now_ms(),
            queue_seq: seq as i64,
            history: Vec::new(),
        };
        self.bury(&dead, payload).await.is_ok()
    }

    /// Moves a message that cannot be read to the dead letters, whole, and acks it.
    async fn bury_unreadable(&self, stream_seq: u64, reply: String, body: &[u8]) {
        tracing::error!(
            seq = stream_seq,
            "an event in the stream cannot be read; dead-lettering it"
        );
        let dead = DeadMeta {
            source: "unknown".into(),
            message_id: String::new(),
            kind: String::new(),
            user_key: String::new(),
            received_at_ms: 0,
            attempts: 0,
            status: None,
            error: "the stored event cannot be read".into(),
            created_at_ms: now_ms(),
            queue_seq: pack::event_seq(stream_seq, 0) as i64,
            history: Vec::new(),
        };
        if self.bury(&dead, body).await.is_ok() {
            let seq = stream_seq;
            self.answer(vec![Reply::Ack { seq, reply }]).await;
        }
    }

    /// Sends a held event back to JetStream for later without waiting for the server's
    /// confirmation, so the pull goes straight on to the next delivery: a held user's
    /// events come in runs, and a round trip for each kept every other user of the
    /// partition waiting behind them. A nak that is lost costs an early return, no more:
    /// the event comes back after its ack wait, its user still held (it is outstanding
    /// until then), and is held back again.
    async fn hold_later(&self, nak: Reply) {
        let Some((acker, kind)) = self.acker(nak) else {
            return;
        };
        if let Err(e) = acker.ack_with(kind).await {
            tracing::warn!(error = %e, "a held event could not be sent back to JetStream");
        }
    }

    /// What to tell JetStream for `reply`, and on which subject; `None` for a delivery
    /// that has no reply subject.
    fn acker(&self, reply: Reply) -> Option<(jetstream::message::Acker, AckKind)> {
        let (subject, kind) = match reply {
            Reply::Ack { reply, .. } => (reply, AckKind::Ack),
            Reply::Nak {
                reply, delay_ms, ..
            } => (
                reply,
                AckKind::Nak(Some(Duration::from_millis(delay_ms.max(1)))),
            ),
        };
        if subject.is_empty() {
            return None;
        }
        let acker = jetstream::message::Acker::new(self.js.clone(), Some(Subject::from(subject)));
        Some((acker, kind))
    }

    /// Copies a dead letter to its stream and waits for JetStream's ack.
    pub(super) async fn bury(&self, dead: &DeadMeta, payload: &[u8]) -> Result<(), SpoolError> {
        let subject = self.options.dead_subject(&dead.source);
        let ack = self
            .js
            .publish(subject, encode(dead, payload).into())
            .await
            .map_err(|e| storage("cannot copy a dead letter", e))?;
        ack.await
            .map_err(|e| storage("cannot copy a dead letter", e))?;
        Ok(())
    }

    /// Tells JetStream the outcome of each event and waits for its confirmations.
    pub(super) async fn answer(&self, replies: Vec<Reply>) {
        let answers = replies.into_iter().map(|reply| async move {
            let Some((acker, kind)) = self.acker(reply) else {
                return;
            };
            if let Err(e) = acker.double_ack_with(kind).await {
                // The event stays pending and comes back after the ack wait: a duplicate at
                // worst, never a loss.
                tracing::warn!(error = %e, "JetStream did not confirm an ack or nak");
            }
        });
        futures_util::future::join_all(answers).await;
    }
}

/// The consumer a partition is pulled through, and how far its deliveries were taken in.
struct Cursor {
    consumer: consumer::PullConsumer,
    /// The consumer sequence of the last delivery taken in (a new consumer starts at 1).
    taken_upto: u64,
    /// What the consumer had delivered at the last idle check ([`Inner::idle_gap`]).
    idle_seen: Option<u64>,
}

impl Cursor {
    fn new(consumer: consumer::PullConsumer) -> Cursor {
        Cursor {
            consumer,
            taken_upto: 0,
            idle_seen: None,
        }
    }
}

/// Whether each event to take in (`takes`, per arrival) repeats an id accepted earlier in
/// the window; the new ids are recorded in the index (for its journal).
fn judge(
    store: &dedup::DedupStore,
    index: &mut dedup::PartitionIndex,
    arrivals: &[Arrival],
    takes: &[Vec<usize>],
) -> Vec<Vec<bool>> {
    let now_secs = now_ms() / 1000;
    arrivals
        .iter()
        .zip(takes)
        .map(|(arrival, take)| {
            take.iter()
                .map(|i| match arrival.dedup_key(*i) {
                    Some(key) => {
                        let verdict =
                            index.check(key, arrival.stream_seq, now_secs, store.window());
                        verdict == dedup::Verdict::Repeat
                    }
                    // Without an id nothing can repeat it: taken in as it is.
                    None => false,
                })
                .collect()
        })
        .collect()
}

/// Where an event of a delivery stands: its partition, its `seq`, its message's delivery
/// count and reply subject.
#[derive(Clone, Copy)]
struct Delivered<'a> {
    partition: u32,
    seq: u64,
    delivered: u64,
    reply: &'a str,
}

/// What becomes of one event of a delivery ([`Inner::sort`]).
enum Sorted {
    /// Settled on arrival: a repeat, or copied to the dead letters.
    Settled,
    /// To the queue state.
    Entry(Box<Entry>),
    /// Neither (its dead letter could not be written): it comes back with its message.
    Left,
}

/// A delivered message taken apart.
struct Arrival {
    stream_seq: u64,
    /// JetStream's delivery count of the message.
    delivered: u64,
    reply: String,
    /// The message's `Nats-Msg-Id` (a single event's key in the dedup index).
    msg_id: Option<String>,
    /// Its events ([`pack`]); `None` when the message cannot be read.
    events: Option<Vec<(Meta, Vec<u8>)>>,
    body: bytes::Bytes,
}

impl Arrival {
    fn of(message: jetstream::Message) -> Option<Arrival> {
        let info = match message.info() {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!(error = %e, "a pulled message has no JetStream metadata");
                return None;
            }
        };
        tracing::trace!(
            seq = info.stream_sequence,
            delivery = info.consumer_sequence,
            delivered = info.delivered,
            "pulled a message"
        );
        let (stream_seq, delivered) = (info.stream_sequence, info.delivered.max(1) as u64);
        let count = pack::events_in(message.subject.as_str());
        let events = pack::decode(&message.payload, count).and_then(|bodies| {
            bodies
                .into_iter()
                .map(decode::<Meta>)
                .collect::<Option<Vec<_>>>()
        });
        let msg_id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|v| v.as_str().to_owned());
        Some(Arrival {
            stream_seq,
            delivered,
            reply: message
                .reply
                .as_ref()
                .map(|r| r.to_string())
                .unwrap_or_default(),
            msg_id,
            events,
            body: message.payload.clone(),
        })
    }

    /// The dedup index's key of event `i`: a single event's message id, a pack's event's
    /// own (its source and `messageId`).
    fn dedup_key(&self, i: usize) -> Option<u128> {
        let events = self.events.as_ref()?;
        if events.len() == 1 {
            return self.msg_id.as_deref().map(dedup::DedupStore::key);
        }
        let (meta, _) = events.get(i)?;
        Some(dedup::DedupStore::key(&msg_id(&meta.s, &meta.m)))
    }
}

/// The deliveries of `batch` up to the first that is not numbered right after the one
/// before (`taken_upto`, advanced), and the `(expected, got)` consumer sequences of that
/// gap.
fn cut_at_gap(
    mut batch: Vec<jetstream::Message>,
    taken_upto: &mut u64,
) -> (Vec<jetstream::Message>, Option<(u64, u64)>) {
    let numbers = batch
        .iter()
        .map(|message| message.info().ok().map(|info| info.consumer_sequence));
    match first_gap(numbers, taken_upto) {
        Some((i, expected, got)) => {
            batch.truncate(i);
            (batch, Some((expected, got)))
        }
        None => (batch, None),
    }
}

/// Where the deliveries numbered `numbers` (consumer sequences; `None`: no metadata, no
/// number) first skip one after `taken_upto`: the index, the number expected and the one
/// got. `taken_upto` ends at the last number before the gap. A number at or below the last
/// one (a consumer leader that lost its last deliveries and sends them again) is no gap.
fn first_gap(
    numbers: impl Iterator<Item = Option<u64>>,
    taken_upto: &mut u64,
) -> Option<(usize, u64, u64)> {
    for (i, number) in numbers.enumerate() {
        let Some(number) = number else {
            continue;
        };
        if number > *taken_upto + 1 {
            return Some((i, *taken_upto + 1, number));
        }
        *taken_upto = number;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::first_gap;

    #[test]
    fn a_skipped_delivery_is_a_gap() {
        let mut upto = 0;
        assert_eq!(first_gap([1, 2, 3].map(Some).into_iter(), &mut upto), None);
        assert_eq!(upto, 3);
        let found = first_gap([Some(4), None, Some(7), Some(8)].into_iter(), &mut upto);
        assert_eq!(found, Some((2, 5, 7)), "5 and 6 went missing");
        assert_eq!(upto, 4);
    }

    #[test]
    fn a_new_consumer_starts_at_one() {
        let mut upto = 0;
        assert_eq!(
            first_gap([Some(2)].into_iter(), &mut upto),
            Some((0, 1, 2)),
            "the first delivery of a new consumer went missing"
        );
    }

    #[test]
    fn deliveries_sent_again_are_no_gap() {
        let mut upto = 10;
        assert_eq!(
            first_gap([8, 9, 10, 11].map(Some).into_iter(), &mut upto),
            None
        );
        assert_eq!(upto, 11);
    }
}
