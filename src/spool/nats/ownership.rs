//! Partition ownership: each node renews the keys of the partitions it owns, balances
//! them against the live nodes, and starts or stops consuming a partition as it gains or
//! loses it.
//!
//! Invariants:
//! - A node stops leasing from a partition before its key can expire (each partition's
//!   `fresh_until`, checked by every lease), so two nodes never lease the same partition's
//!   events at once, however late an ownership round runs.
//! - A partition is consumed through a consumer created for its current owner: a new owner,
//!   or an owner whose consumer lost deliveries (see `pull.rs`), deletes the consumer and
//!   creates it again, and checks that what it got is new (nothing delivered yet); a
//!   consumer that survived the delete would continue from where the old one was, and the
//!   events it delivered before would come back only after the ack wait, behind later
//!   events of their users.

use super::*;

impl Inner {
    pub(super) async fn ownership_loop(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        let period = (self.options.ownership_ttl / 4).max(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            self.balance().await;
        }
    }

    /// One round: say this node is alive, renew what it owns, take or give up partitions
    /// towards an even share.
    /// One round of ownership: announce this node, renew the owned partitions, then hand
    /// over extras or take free ones until this node owns its share.
    pub(super) async fn balance(self: &Arc<Self>) {
        let connected = self.client.connection_state() == async_nats::connection::State::Connected;
        self.gauges.connected.set(i64::from(connected));
        if let Err(e) = self
            .kv
            .put(
                format!("node.{}", self.node_id),
                now_ms().to_string().into(),
            )
            .await
        {
            tracing::warn!(error = %e, "cannot announce this node in the ownership bucket");
        }
        let mut owned = self.owned.lock().await;
        self.renew(&mut owned).await;
        let Some((nodes, taken)) = self.survey().await else {
            return;
        };
        let share = (self.options.partitions as usize).div_ceil(nodes.max(1));
        self.gauges.buffered.set(self.state().len() as i64);
        self.hand_over(&mut owned, share).await;
        self.take_free(&mut owned, share, &taken).await;
        self.gauges.partitions.set(owned.len() as i64);
    }

    /// Renews each owned partition's key; a partition whose key another node holds now is
    /// dropped, and one that cannot be renewed stops leasing well before its key expires.
    async fn renew(&self, owned: &mut HashMap<u32, Owned>) {
        let ttl = self.options.ownership_ttl;
        let mut lost = Vec::new();
        for (partition, own) in owned.iter_mut() {
            let sent = now_ms();
            match self
                .kv
                .update(
                    Self::partition_key(*partition),
                    self.node_id.clone().into(),
                    own.revision,
                )
                .await
            {
                Ok(revision) => {
                    own.revision = revision;
                    own.renewed = Instant::now();
                    self.state()
                        .set_fresh_until(*partition, sent + self.fresh_for());
                    if own.draining_since.is_none() {
                        self.set_leasable(*partition, true);
                    }
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::warn!(partition, "lost ownership of a partition");
                    lost.push(*partition);
                }
                Err(e) => {
                    tracing::warn!(partition, error = %e, "cannot renew partition ownership");
                    // Stop leasing well before the key can expire and another node take it.
                    if own.renewed.elapsed() > ttl / 2 {
                        self.set_leasable(*partition, false);
                    }
                }
            }
        }
        for partition in lost {
            if let Some(own) = owned.remove(&partition) {
                let _ = own.stop.send(true);
            }
            self.state().drop_partition(partition);
        }
    }

    /// Who is alive (the number of nodes), and which partitions are taken; `None` when the
    /// bucket cannot be listed.
    async fn survey(&self) -> Option<(usize, std::collections::HashSet<u32>)> {
        let mut nodes = 0usize;
        let mut taken = std::collections::HashSet::new();
        let mut keys = match self.kv.keys().await {
            Ok(keys) => keys,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the ownership bucket");
                return None;
            }
        };
        while let Some(key) = keys.next().await {
            let Ok(key) = key else { break };
            if key.starts_with("node.") {
                nodes += 1;
            } else if let Some(p) = key.strip_prefix("p.") {
                if let Ok(p) = p.parse::<u32>() {
                    taken.insert(p);
                }
            }
        }
        Some((nodes, taken))
    }

    /// Gives up partitions beyond `share` gracefully: stop leasing, wait for the leased
    /// events to settle (or three TTLs), then release.
    async fn hand_over(&self, owned: &mut HashMap<u32, Owned>, share: usize) {
        let ttl = self.options.ownership_ttl;
        let active = owned
            .values()
            .filter(|o| o.draining_since.is_none())
            .count();
        if active > share {
            let mut extras: Vec<u32> = owned
                .iter()
                .filter(|(_, o)| o.draining_since.is_none())
                .map(|(p, _)| *p)
                .collect();
            extras.sort_unstable();
            for partition in extras.into_iter().rev().take(active - share) {
                if let Some(own) = owned.get_mut(&partition) {
                    tracing::info!(partition, "handing a partition over");
                    own.draining_since = Some(Instant::now());
                    self.set_leasable(partition, false);
                }
            }
        }
        let now = now_ms();
        let done: Vec<u32> = owned
            .iter()
            .filter(|(p, o)| {
                o.draining_since.is_some_and(|since| {
                    !self.state().has_leases(**p, now) || since.elapsed() > ttl * 3
                })
            })
            .map(|(p, _)| *p)
            .collect();
        for partition in done {
            if let Some(own) = owned.remove(&partition) {
                self.release(partition, own).await;
            }
        }
    }

    /// Takes free partitions up to `share`, starting at a random one.
    async fn take_free(
        self: &Arc<Self>,
        owned: &mut HashMap<u32, Owned>,
        share: usize,
        taken: &std::collections::HashSet<u32>,
    ) {
        let partitions = self.options.partitions;
        let active = owned
            .values()
            .filter(|o| o.draining_since.is_none())
            .count();
        if active >= share {
            return;
        }
        let start = fastrand::u32(0..partitions.max(1));
        let mut wanted = share - active;
        for i in 0..partitions {
            if wanted == 0 {
                break;
            }
            let partition = (start + i) % partitions;
            if taken.contains(&partition) || owned.contains_key(&partition) {
                continue;
            }
            if let Some(own) = self.acquire(partition).await {
                owned.insert(partition, own);
                self.gauges.takeovers.inc();
                wanted -= 1;
            }
        }
    }

    pub(super) fn set_leasable(&self, partition: u32, leasable: bool) {
        if let Some(p) = self.state().partitions.get_mut(&partition) {
            p.leasable = leasable;
        }
    }

    /// How long after a renewal was sent the partition may be leased from without another.
    fn fresh_for(&self) -> i64 {
        (self.options.ownership_ttl / 2).as_millis() as i64
    }

    pub(super) async fn acquire(self: &Arc<Self>, partition: u32) -> Option<Owned> {
        let key = Self::partition_key(partition);
        let sent = now_ms();
        let revision = match self.kv.create(&key, self.node_id.clone().into()).await {
            Ok(revision) => revision,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => return None,
            Err(e) => {
                tracing::warn!(partition, error = %e, "cannot take a partition");
                return None;
            }
        };
        match self
            .start_partition(partition, revision, sent + self.fresh_for())
            .await
        {
            Ok(stop) => {
                tracing::info!(partition, node = %self.node_id, "took a partition");
                Some(Owned {
                    revision,
                    renewed: Instant::now(),
                    stop,
                    draining_since: None,
                })
            }
            Err(e) => {
                tracing::warn!(partition, error = %e, "cannot start consuming a partition");
                let _ = self.kv.delete_expect_revision(&key, Some(revision)).await;
                self.state().drop_partition(partition);
                None
            }
        }
    }

    /// A fresh consumer for the partition (so JetStream delivers every unacked event from
    /// the start, in order), the sequence to catch up to, and the pull task.
    pub(super) async fn start_partition(
        self: &Arc<Self>,
        partition: u32,
        epoch: u64,
        fresh_until: i64,
    ) -> Result<watch::Sender<bool>, SpoolError> {
        let consumer = self.fresh_consumer(partition).await?;
        self.restore_retries(partition).await?;
        let mut target = 0;
        for subject in self.options.partition_subjects(partition) {
            match self.events.get_last_raw_message_by_subject(&subject).await {
                Ok(message) => target = target.max(pack::event_seq(message.sequence, 0)),
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(storage("cannot read the partition's last event", e)),
            }
        }
        self.state().partitions.insert(
            partition,
            PartitionState {
                leasable: true,
                seen_high: 0,
                target_high: target,
                fresh_until: Some(fresh_until),
                epoch,
            },
        );
        let (stop, stopped) = watch::channel(false);
        self.spawn_task(self.clone().pull_loop(partition, epoch, consumer, stopped));
        Ok(stop)
    }

    /// Loads what previous owners recorded about the partition's retried events.
    pub(super) async fn restore_retries(&self, partition: u32) -> Result<(), SpoolError> {
        let Some(retries) = &self.retries else {
            return Ok(());
        };
        let prefix = format!("p{partition}.");
        let mut keys = retries
            .keys()
            .await
            .map_err(|e| storage("cannot list the retry records", e))?;
        let mut found = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| storage("cannot list the retry records", e))?;
            if let Some(seq) = key
                .strip_prefix(&prefix)
                .and_then(|s| s.parse::<u64>().ok())
            {
                found.push((seq, key));
            }
        }
        for (seq, key) in found {
            let value = retries
                .get(&key)
                .await
                .map_err(|e| storage("cannot read a retry record", e))?;
            if let Some(record) = value.and_then(|v| serde_json::from_slice(&v).ok()) {
                self.state().restore(seq, record);
            }
        }
        Ok(())
    }

    pub(super) async fn fresh_consumer(
        &self,
        partition: u32,
    ) -> Result<consumer::PullConsumer, SpoolError> {
        let name = self.options.consumer_name(partition);
        match self.events.delete_consumer(&name).await {
            Ok(_) => {}
            Err(e) if consumer_not_found(&e) => {}
            Err(e) => return Err(storage("cannot reset the partition's consumer", e)),
        }
        let consumer = self
            .events
            .create_consumer(consumer::pull::Config {
                durable_name: Some(name),
                filter_subjects: self.options.partition_subjects(partition).to_vec(),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: self.options.ack_wait,
                max_deliver: -1,
                max_ack_pending: self.options.max_ack_pending,
                deliver_policy: consumer::DeliverPolicy::All,
                num_replicas: self.options.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| storage("cannot create the partition's consumer", e))?;
        // Creating a durable that exists answers the existing one (a delete that was not
        // applied, or another node's consumer created meanwhile).
        let info = consumer.cached_info();
        if info.delivered.consumer_sequence != 0 || info.num_ack_pending != 0 {
            return Err(SpoolError::Storage(format!(
                "the partition's consumer was not replaced ({} delivered, {} pending)",
                info.delivered.consumer_sequence, info.num_ack_pending
            )));
        }
        Ok(consumer)
    }

    pub(super) async fn release(&self, partition: u32, own: Owned) {
        let _ = own.stop.send(true);
        self.state().drop_partition(partition);
        if let Err(e) = self
            .kv
            .delete_expect_revision(Self::partition_key(partition), Some(own.revision))
            .await
        {
            tracing::debug!(partition, error = %e, "releasing a partition");
        }
        tracing::info!(partition, "released a partition");
    }
}

/// Whether deleting a consumer failed because there is none (JetStream's error 10014), not
/// because the stream or its leader could not be reached.
fn consumer_not_found(error: &stream::ConsumerError) -> bool {
    matches!(
        error.kind(),
        stream::ConsumerErrorKind::JetStream(e)
            if e.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
    )
}
