//! Connecting: the streams, the key-value bucket and the node's registration, created or
//! checked against the configuration; then the first balance of the partitions.

use super::*;

impl Inner {
    pub(super) async fn connect(
        options: NatsSpoolOptions,
        metrics: Metrics,
    ) -> Result<Arc<Inner>, SpoolError> {
        let node_id = node_id(&options.node_name);
        let client = client(&options, &node_id).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .ack_timeout(options.publish_timeout)
            // Above the appends' own bound, so the replays' and dead letters' publishes
            // never wait behind them.
            .max_ack_inflight(MAX_PUBLISH_IN_FLIGHT + 1024)
            .build(client.clone());
        let events = stream(&js, events_config(&options), "events").await?;
        let dead = stream(&js, dead_letters_config(&options), "dead-letter").await?;
        let kv = bucket(
            &js,
            &options.bucket,
            options.ownership_ttl,
            options.replicas,
        )
        .await?;
        let dedup = match &options.dedup_bucket {
            Some(name) => Some(bucket(&js, name, options.dedup_window, options.replicas).await?),
            None => None,
        };
        let dedup_index = match &options.dedup_stream {
            Some(name) => {
                Some(dedup::DedupStore::open(&js, &options, name, &node_id, &metrics).await?)
            }
            None => None,
        };
        // Retry records are removed with their event; the TTL only sweeps leftovers.
        let retries = match &options.retry_bucket {
            Some(name) => Some(bucket(&js, name, RETRY_RECORD_TTL, options.replicas).await?),
            None => None,
        };
        let usage = match &options.usage_bucket {
            Some(name) => {
                Some(bucket(&js, name, metering::COUNTER_RETENTION, options.replicas).await?)
            }
            None => None,
        };
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            options,
            node_id,
            client,
            js,
            events,
            dead,
            kv,
            dedup,
            dedup_index,
            retries,
            usage,
            tally: Mutex::new(metering::Tally::default()),
            usage_flush: tokio::sync::Mutex::new(()),
            publish_permits: tokio::sync::Semaphore::new(MAX_PUBLISH_IN_FLIGHT),
            known_sources: Mutex::new(std::collections::HashSet::new()),
            state: Mutex::new(QueueState::default()),
            owned: tokio::sync::Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            gate: RwLock::new(()),
            stop,
            gauges: NodeGauges::register(&metrics),
            tasks: Mutex::new(Vec::new()),
        });
        inner.balance().await;
        inner.spawn_task(inner.clone().ownership_loop());
        inner.spawn_task(inner.clone().usage_loop());
        Ok(inner)
    }

    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, QueueState> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn partition_key(partition: u32) -> String {
        format!("p.{partition}")
    }
}

/// The node's id in the ownership bucket: its name (made safe for a key) and a random
/// suffix, so a restarted node never takes over its former self's keys by name.
fn node_id(name: &str) -> String {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{safe}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// A client connected to the configured servers with the configured credentials; it
/// reconnects forever.
async fn client(
    options: &NatsSpoolOptions,
    node_id: &str,
) -> Result<async_nats::Client, SpoolError> {
    let mut connect = async_nats::ConnectOptions::new()
        .name(format!("refiner-gateway {node_id}"))
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)))
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                other => tracing::debug!(event = %other, "NATS client event"),
            }
        });
    if let Some(token) = &options.token {
        connect = connect.token(token.clone());
    }
    if let (Some(user), Some(password)) = (&options.user, &options.password) {
        connect = connect.user_and_password(user.clone(), password.clone());
    }
    if let Some(path) = &options.credentials_file {
        connect = connect
            .credentials_file(path)
            .await
            .map_err(|e| storage("cannot read the NATS credentials file", e))?;
    }
    let servers = options
        .url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| u.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| storage(&format!("bad NATS URL `{}`", options.url), e))?;
    connect
        .connect(servers)
        .await
        .map_err(|e| storage(&format!("cannot connect to NATS at {}", options.url), e))
}

/// The events stream: a work queue, two subjects per partition (single events and packs,
/// [`super::pack`]), JetStream's duplicate
/// window short when the owners' dedup index keeps the rest of the dedup window.
fn events_config(options: &NatsSpoolOptions) -> stream::Config {
    stream::Config {
        name: options.stream.clone(),
        subjects: vec![format!("{}.events.>", options.subject_prefix)],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        num_replicas: options.replicas,
        duplicate_window: options.jetstream_window(),
        allow_direct: true,
        ..Default::default()
    }
}

/// The dead-letter stream: kept for the retention, one subject per source.
fn dead_letters_config(options: &NatsSpoolOptions) -> stream::Config {
    stream::Config {
        name: options.dead_letter_stream.clone(),
        subjects: vec![format!("{}.dead.*", options.subject_prefix)],
        retention: stream::RetentionPolicy::Limits,
        max_age: options.dead_letter_retention.unwrap_or_default(),
        storage: stream::StorageType::File,
        num_replicas: options.replicas,
        allow_direct: true,
        ..Default::default()
    }
}

/// Creates the stream, or updates it to `config`, and opens it.
async fn stream(
    js: &jetstream::Context,
    config: stream::Config,
    what: &str,
) -> Result<stream::Stream, SpoolError> {
    let name = config.name.clone();
    let created = js
        .create_or_update_stream(config)
        .await
        .map_err(|e| storage(&format!("cannot set up stream {name}"), e))?;
    js.get_stream(&created.config.name)
        .await
        .map_err(|e| storage(&format!("cannot open the {what} stream"), e))
}

/// Creates the key-value bucket, or updates it, with one value per key kept for `max_age`.
async fn bucket(
    js: &jetstream::Context,
    name: &str,
    max_age: Duration,
    replicas: usize,
) -> Result<kv::Store, SpoolError> {
    js.create_or_update_key_value(kv::Config {
        bucket: name.to_string(),
        history: 1,
        max_age,
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| storage(&format!("cannot set up bucket {name}"), e))
}
