//! The [`Spool`] trait's operations on the owned partitions: append (publish, acked by
//! JetStream), lease from memory, settle (acks, naks with delay, dead letters first), the
//! writability probe, statistics and close.

use super::*;
use futures_util::TryStreamExt;

impl Inner {
    /// Appends the request's events: the report, and the indexes (in the request) of the
    /// events newly queued (not duplicates).
    pub(super) async fn append(
        &self,
        request: AppendRequest,
    ) -> Result<(AppendReport, Vec<usize>), SpoolError> {
        let _gate = self.gate.read().await;
        if self.closed.load(Ordering::Acquire) {
            return Err(SpoolError::Closed);
        }
        if request.events.is_empty() {
            return Ok((AppendReport::default(), Vec::new()));
        }
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(SpoolError::Storage("not connected to NATS".into()));
        }
        let publish = async {
            let keys: Vec<String> = request
                .events
                .iter()
                .map(|e| dedup_key(&request.source, &e.message_id))
                .collect();
            let seen = self.seen_before(&keys).await?;
            let (report, appended, stored) = self.publish(&request, &seen).await?;
            self.remember(stored.iter().map(|i| keys[*i].as_str()))
                .await;
            Ok::<_, SpoolError>((report, appended))
        };
        let (report, appended) = tokio::time::timeout(self.options.publish_timeout, publish)
            .await
            .map_err(|_| SpoolError::Storage("JetStream did not acknowledge in time".into()))??;
        {
            let mut state = self.state();
            for (_, partition, seq) in &appended {
                // The message's first event: a pull takes a message in whole.
                let (stream_seq, _) = pack::message_of(*seq);
                state.appended(*partition, pack::event_seq(stream_seq, 0));
            }
        }
        let mut tally = self.tally();
        let queued = appended.iter().map(|(i, _, _)| {
            let event = &request.events[*i];
            (event.kind.as_str(), event.user_key.as_str())
        });
        if !appended.is_empty() {
            tally.accepted(&request.source, request.received_at_ms, queued);
        }
        let duplicates = report.duplicates as i64;
        tally.count(
            &request.source,
            request.received_at_ms,
            "duplicates",
            duplicates,
        );
        Ok((report, appended.iter().map(|(i, _, _)| *i).collect()))
    }

    /// Which of the ids were accepted before (within the window, across server restarts),
    /// from the dedup bucket if there is one.
    async fn seen_before(&self, keys: &[String]) -> Result<Vec<bool>, SpoolError> {
        let Some(dedup) = &self.dedup else {
            return Ok(vec![false; keys.len()]);
        };
        let lookups = keys.iter().map(|key| dedup.get(key.as_str()));
        futures_util::future::join_all(lookups)
            .await
            .into_iter()
            .map(|found| {
                found
                    .map(|v| v.is_some())
                    .map_err(|e| storage("cannot read the dedup bucket", e))
            })
            .collect()
    }

    /// Publishes the events not `seen` before, a request's repeats of a `messageId` dropped
    /// (the first copy wins), as pipelined asynchronous publishes of one message per
    /// partition ([`pack`]), in windows of at most [`PUBLISH_WINDOW`] events, each window's
    /// acks awaited together: the report, the `(index, partition, seq)` of each new event,
    /// and the indexes of the events now stored (new or in a message JetStream recognised).
    ///
    /// Order: the publishes go out one after the other on this node's one connection, so
    /// JetStream stores a partition's events of the request in request order.
    /// In flight: a window takes its permits (one per event) from
    /// [`Inner::publish_permits`] all at once before it publishes, so the node never has
    /// more than [`MAX_PUBLISH_IN_FLIGHT`] unacknowledged events and no request waits for
    /// permits while holding some.
    async fn publish(
        &self,
        request: &AppendRequest,
        seen: &[bool],
    ) -> Result<(AppendReport, Vec<(usize, u32, u64)>, Vec<usize>), SpoolError> {
        let mut report = AppendReport::default();
        let mut named = std::collections::HashSet::new();
        let fresh: Vec<usize> = (0..request.events.len())
            .filter(|i| !seen[*i] && named.insert(request.events[*i].message_id.as_str()))
            .collect();
        report.duplicates = request.events.len() - fresh.len();
        let mut appended = Vec::with_capacity(fresh.len());
        let mut stored = Vec::with_capacity(fresh.len());
        for window in fresh.chunks(PUBLISH_WINDOW) {
            let _permits = self
                .publish_permits
                .acquire_many(window.len() as u32)
                .await
                .map_err(|_| SpoolError::Closed)?;
            let mut pending = Vec::new();
            for (partition, events) in self.packs_of(request, window) {
                let ack = self.publish_pack(request, partition, &events).await?;
                pending.push((partition, events, ack));
            }
            for (partition, events, ack) in pending {
                let ack = ack
                    .await
                    .map_err(|e| storage("JetStream did not acknowledge an event", e))?;
                stored.extend(&events);
                if ack.duplicate {
                    report.duplicates += events.len();
                    continue;
                }
                report.queued += events.len();
                for (index, i) in events.into_iter().enumerate() {
                    appended.push((i, partition, pack::event_seq(ack.sequence, index)));
                }
            }
        }
        Ok((report, appended, stored))
    }

    /// The window's events grouped by partition, in request order within each, and cut
    /// into messages ([`pack::runs`]).
    fn packs_of(&self, request: &AppendRequest, window: &[usize]) -> Vec<(u32, Vec<usize>)> {
        let mut by_partition: Vec<(u32, Vec<usize>)> = Vec::new();
        for &i in window {
            let event = &request.events[i];
            let partition = partition_of(
                &request.source,
                event.user_key.as_str(),
                self.options.partitions,
            );
            match by_partition.iter_mut().find(|(p, _)| *p == partition) {
                Some((_, events)) => events.push(i),
                None => by_partition.push((partition, vec![i])),
            }
        }
        let mut packs = Vec::new();
        for (partition, events) in by_partition {
            let sizes = events
                .iter()
                .map(|i| request.events[*i].payload.len() + 256);
            let mut rest = events.as_slice();
            for run in pack::runs(sizes) {
                let (this, tail) = rest.split_at(run);
                packs.push((partition, this.to_vec()));
                rest = tail;
            }
        }
        packs
    }

    /// Sends the events (indexes in the request) of one partition as one message, without
    /// waiting for the ack. Its `Nats-Msg-Id` is the event's id for a single event, and
    /// names the ids of a pack's events otherwise, so the retry of a request repeats it.
    async fn publish_pack(
        &self,
        request: &AppendRequest,
        partition: u32,
        events: &[usize],
    ) -> Result<jetstream::context::PublishAckFuture, SpoolError> {
        let bodies: Vec<Vec<u8>> = events
            .iter()
            .map(|i| {
                let event = &request.events[*i];
                let meta = Meta {
                    s: request.source.clone(),
                    m: event.message_id.clone(),
                    k: event.kind.as_str().to_owned(),
                    u: event.user_key.as_str().to_owned(),
                    r: request.received_at_ms,
                    a: 0,
                    h: Vec::new(),
                };
                encode(&meta, &event.payload)
            })
            .collect();
        let ids = events
            .iter()
            .map(|i| request.events[*i].message_id.as_str());
        let (id, body) = match bodies.len() {
            1 => (
                msg_id(&request.source, &request.events[events[0]].message_id),
                bodies.into_iter().next().unwrap_or_default(),
            ),
            _ => (pack_msg_id(&request.source, ids), pack::encode(&bodies)),
        };
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.as_str());
        let subject = pack::subject(&self.options.subject_prefix, partition, events.len());
        self.js
            .publish_with_headers(subject, headers, body.into())
            .await
            .map_err(|e| storage("publishing an event failed", e))
    }

    /// Records stored ids in the dedup bucket. A failure here loses no event: the stream's
    /// duplicate window still covers a retry unless the server restarts meanwhile.
    async fn remember<'k>(&self, keys: impl Iterator<Item = &'k str>) {
        let Some(dedup) = &self.dedup else {
            return;
        };
        let records = keys.map(|key| dedup.put(key, Vec::new().into()));
        for record in futures_util::future::join_all(records).await {
            if let Err(e) = record {
                tracing::warn!(error = %e, "cannot record an accepted messageId");
            }
        }
    }

    pub(super) async fn lease(&self, max: usize, lease_ms: i64) -> Result<Vec<Leased>, SpoolError> {
        // Wait (briefly) until what is known to be in the owned partitions has arrived, so
        // an event appended before this call can be leased by it.
        // Only what was appended before this call: later appends do not hold it up.
        let deadline = Instant::now() + self.options.catch_up_wait;
        let targets = self.state().targets();
        loop {
            {
                let state = self.state();
                if state.caught_up(&targets) || state.len() >= self.options.max_buffered {
                    break;
                }
            }
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let leased = self.state().lease(max, lease_ms, now_ms());
        for event in &leased {
            tracing::trace!(seq = event.seq, message_id = %event.message_id, "leased an event");
        }
        Ok(leased)
    }

    pub(super) async fn settle(&self, settlement: Settlement) -> Result<(), SpoolError> {
        // Dead letters are copied first: if that fails nothing changes and the caller
        // retries the whole settlement.
        let mut burials = Vec::new();
        let counts = self.settlement_counts(&settlement);
        {
            let state = self.state();
            let now = now_ms();
            for dead in &settlement.dead {
                if let Some(entry) = state.get(dead.seq) {
                    let event = &entry.event;
                    let mut history = state.history(dead.seq);
                    if dead.attempted {
                        history.push((now, dead.status, dead.error.clone()));
                    }
                    burials.push((
                        DeadMeta {
                            source: event.source.clone(),
                            message_id: event.message_id.clone(),
                            kind: event.kind.as_str().to_owned(),
                            user_key: event.user_key.as_str().to_owned(),
                            received_at_ms: event.received_at_ms,
                            attempts: event.attempts + u32::from(dead.attempted),
                            status: dead.status,
                            error: dead.error.clone(),
                            created_at_ms: now,
                            queue_seq: event.seq,
                            history,
                        },
                        event.payload.clone(),
                    ));
                }
            }
        }
        for (dead, payload) in &burials {
            self.bury(dead, payload).await?;
        }
        let (replies, changes) = {
            let mut state = self.state();
            let now = now_ms();
            let replies = state.settle(&settlement, now);
            let replies = state.packs.answer(replies, now);
            (replies, state.take_record_changes())
        };
        // Retry records before the naks: a node that dies right after a nak has left the
        // event's attempts and retry time for the next owner.
        if let Some(retries) = &self.retries {
            let writes = changes.into_iter().map(|change| async move {
                let written = match change {
                    RecordChange::Put {
                        partition,
                        seq,
                        record,
                    } => retries
                        .put(
                            retry_key(partition, seq),
                            serde_json::to_vec(&record).unwrap_or_default().into(),
                        )
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    RecordChange::Remove { partition, seq } => retries
                        .delete(retry_key(partition, seq))
                        .await
                        .map_err(|e| e.to_string()),
                };
                if let Err(e) = written {
                    tracing::warn!(error = %e, "cannot update a retry record");
                }
            });
            futures_util::future::join_all(writes).await;
        }
        self.answer(replies).await;
        let now = now_ms();
        let mut tally = self.tally();
        for (source, name, removed) in counts {
            tally.count(&source, now, &name, 1);
            if removed {
                tally.depth(&source, -1);
            }
        }
        Ok(())
    }

    /// What a settlement counts, per event still held: its source, the counter's name, and
    /// whether the event leaves the queue.
    fn settlement_counts(&self, settlement: &Settlement) -> Vec<(String, String, bool)> {
        let state = self.state();
        let source = |seq: i64| state.get(seq).map(|e| e.event.source.clone());
        let mut counts = Vec::new();
        let named = settlement
            .acked
            .iter()
            .map(|seq| (*seq, "forwarded".to_owned(), true))
            .chain(
                settlement
                    .skipped
                    .iter()
                    .map(|s| (s.seq, format!("skipped:{}", s.reason), true)),
            )
            .chain(
                settlement
                    .dead
                    .iter()
                    .map(|d| (d.seq, "dead_lettered".to_owned(), true)),
            )
            .chain(
                settlement
                    .retried
                    .iter()
                    .map(|r| (r.seq, "retried".to_owned(), false)),
            );
        for (seq, name, removed) in named {
            if let Some(source) = source(seq) {
                counts.push((source, name, removed));
            }
        }
        counts
    }

    pub(super) async fn check_writable(&self) -> Result<(), SpoolError> {
        self.kv
            .put(
                format!("probe.{}", self.node_id),
                now_ms().to_string().into(),
            )
            .await
            .map_err(|e| storage("JetStream refused a write", e))?;
        Ok(())
    }

    pub(super) async fn stats(&self) -> Result<SpoolStats, SpoolError> {
        let mut oldest = None;
        let mut depth = 0;
        for _ in 0..3 {
            let (first, events) = self.depth().await?;
            depth = events;
            if depth == 0 {
                oldest = None;
                break;
            }
            match self.events.get_raw_message(first).await {
                Ok(message) => {
                    let events = pack::events_in(message.subject.as_str());
                    oldest = pack::decode(&message.payload, events)
                        .and_then(|bodies| decode::<Meta>(bodies.first()?))
                        .map(|(meta, _)| meta.r);
                    break;
                }
                // Acked between the two reads: look again.
                Err(_) => continue,
            }
        }
        let dead = self
            .dead
            .get_info()
            .await
            .map_err(|e| storage("cannot read the dead-letter stream", e))?;
        Ok(SpoolStats {
            depth,
            oldest_received_at_ms: oldest,
            dead_letters: dead.state.messages,
        })
    }

    /// The events stream's first sequence and the events it holds: its messages per
    /// subject, each subject saying how many events its messages hold ([`pack`]), less
    /// those this node settled in packs it has not acked yet (another node's are counted
    /// until their pack is acked).
    async fn depth(&self) -> Result<(u64, u64), SpoolError> {
        let read = |e| storage("cannot read the events stream", e);
        let mut subjects = self
            .events
            .info_with_subjects(format!("{}.events.>", self.options.subject_prefix))
            .await
            .map_err(read)?;
        let mut events = 0;
        while let Some((subject, messages)) = subjects.try_next().await.map_err(read)? {
            events += (messages * pack::events_in(&subject)) as u64;
        }
        // A pack stays in the stream until its last event is settled: the events of this
        // node's packs settled before then are not queued any more.
        let settled = self.state().packs.settled();
        Ok((
            subjects.info.state.first_sequence,
            events.saturating_sub(settled),
        ))
    }

    pub(super) async fn close(&self) {
        let _gate = self.gate.write().await;
        self.closed.store(true, Ordering::Release);
        if let Err(e) = self.flush_usage().await {
            tracing::warn!(error = %e, "the last usage counts could not be merged");
        }
        let _ = self.stop.send(true);
        let mut owned = self.owned.lock().await;
        for (partition, own) in owned.drain() {
            self.release(partition, own).await;
        }
        let _ = self.kv.delete(format!("node.{}", self.node_id)).await;
        let _ = self.client.flush().await;
    }
}
