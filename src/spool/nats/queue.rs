//! The [`Spool`] trait's operations on the owned partitions: append (publish, acked by
//! JetStream), lease from memory, settle (acks, naks with delay, dead letters first), the
//! writability probe, statistics and close.

use super::*;

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
                state.appended(*partition, *seq);
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
        let duplicates = report.duplicates as u64;
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

    /// Publishes the events not `seen` before as pipelined asynchronous publishes, in
    /// windows of at most [`PUBLISH_WINDOW`], each window's acks awaited together: the
    /// report, the `(index, partition, seq)` of each new event, and the indexes of the
    /// events now stored (new or a duplicate JetStream recognised).
    ///
    /// Order: the publishes go out one after the other on this node's one connection, so
    /// JetStream stores a partition's events of the request in request order.
    /// In flight: a window takes its permits from [`Inner::publish_permits`] all at once
    /// before it publishes, so the node never has more than [`MAX_PUBLISH_IN_FLIGHT`]
    /// unacknowledged events and no request waits for permits while holding some.
    async fn publish(
        &self,
        request: &AppendRequest,
        seen: &[bool],
    ) -> Result<(AppendReport, Vec<(usize, u32, u64)>, Vec<usize>), SpoolError> {
        let mut report = AppendReport::default();
        let fresh: Vec<usize> = (0..request.events.len()).filter(|i| !seen[*i]).collect();
        report.duplicates = request.events.len() - fresh.len();
        let mut appended = Vec::with_capacity(fresh.len());
        let mut stored = Vec::with_capacity(fresh.len());
        for window in fresh.chunks(PUBLISH_WINDOW) {
            let _permits = self
                .publish_permits
                .acquire_many(window.len() as u32)
                .await
                .map_err(|_| SpoolError::Closed)?;
            let mut pending = Vec::with_capacity(window.len());
            for &i in window {
                let (partition, ack) = self.publish_one(request, &request.events[i]).await?;
                pending.push((i, partition, ack));
            }
            for (i, partition, ack) in pending {
                let ack = ack
                    .await
                    .map_err(|e| storage("JetStream did not acknowledge an event", e))?;
                stored.push(i);
                if ack.duplicate {
                    report.duplicates += 1;
                } else {
                    report.queued += 1;
                    appended.push((i, partition, ack.sequence));
                }
            }
        }
        Ok((report, appended, stored))
    }

    /// Sends one event to its partition's subject without waiting for the ack.
    async fn publish_one(
        &self,
        request: &AppendRequest,
        event: &crate::segment::Event,
    ) -> Result<(u32, jetstream::context::PublishAckFuture), SpoolError> {
        let partition = partition_of(
            &request.source,
            event.user_key.as_str(),
            self.options.partitions,
        );
        let meta = Meta {
            s: request.source.clone(),
            m: event.message_id.clone(),
            k: event.kind.as_str().to_owned(),
            u: event.user_key.as_str().to_owned(),
            r: request.received_at_ms,
            a: 0,
            h: Vec::new(),
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Msg-Id",
            msg_id(&request.source, &event.message_id).as_str(),
        );
        let ack = self
            .js
            .publish_with_headers(
                self.options.event_subject(partition),
                headers,
                encode(&meta, &event.payload).into(),
            )
            .await
            .map_err(|e| storage("publishing an event failed", e))?;
        Ok((partition, ack))
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
            let replies = state.settle(&settlement, now_ms());
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
            let info = self
                .events
                .get_info()
                .await
                .map_err(|e| storage("cannot read the events stream", e))?;
            depth = info.state.messages;
            if depth == 0 {
                oldest = None;
                break;
            }
            match self.events.get_raw_message(info.state.first_sequence).await {
                Ok(message) => {
                    oldest = decode::<Meta>(&message.payload).map(|(meta, _)| meta.r);
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
