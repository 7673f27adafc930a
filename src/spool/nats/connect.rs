//! Connecting: the streams, the key-value bucket and the node's registration, created or
//! checked against the configuration; then the first balance of the partitions.

use super::*;

impl Inner {
    pub(super) async fn connect(
        options: NatsSpoolOptions,
        metrics: Metrics,
    ) -> Result<Arc<Inner>, SpoolError> {
        let node_id = format!(
            "{}-{}",
            options
                .node_name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                })
                .collect::<String>(),
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
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
        let client = connect
            .connect(servers)
            .await
            .map_err(|e| storage(&format!("cannot connect to NATS at {}", options.url), e))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .ack_timeout(options.publish_timeout)
            .build(client.clone());

        let events = js
            .create_or_update_stream(stream::Config {
                name: options.stream.clone(),
                subjects: vec![format!("{}.events.*", options.subject_prefix)],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                num_replicas: options.replicas,
                duplicate_window: options.dedup_window,
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|e| storage(&format!("cannot set up stream {}", options.stream), e))?;
        let events = js
            .get_stream(&events.config.name)
            .await
            .map_err(|e| storage("cannot open the events stream", e))?;
        let dead = js
            .create_or_update_stream(stream::Config {
                name: options.dead_letter_stream.clone(),
                subjects: vec![format!("{}.dead.*", options.subject_prefix)],
                retention: stream::RetentionPolicy::Limits,
                max_age: options.dead_letter_retention.unwrap_or_default(),
                storage: stream::StorageType::File,
                num_replicas: options.replicas,
                allow_direct: true,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                storage(
                    &format!("cannot set up stream {}", options.dead_letter_stream),
                    e,
                )
            })?;
        let dead = js
            .get_stream(&dead.config.name)
            .await
            .map_err(|e| storage("cannot open the dead-letter stream", e))?;
        let kv = js
            .create_or_update_key_value(kv::Config {
                bucket: options.bucket.clone(),
                history: 1,
                max_age: options.ownership_ttl,
                storage: stream::StorageType::File,
                num_replicas: options.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| storage(&format!("cannot set up bucket {}", options.bucket), e))?;

        let dedup = match &options.dedup_bucket {
            Some(bucket) => Some(
                js.create_or_update_key_value(kv::Config {
                    bucket: bucket.clone(),
                    history: 1,
                    max_age: options.dedup_window,
                    storage: stream::StorageType::File,
                    num_replicas: options.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| storage(&format!("cannot set up bucket {bucket}"), e))?,
            ),
            None => None,
        };
        let retries = match &options.retry_bucket {
            Some(bucket) => Some(
                js.create_or_update_key_value(kv::Config {
                    bucket: bucket.clone(),
                    history: 1,
                    // Records are removed with their event; the TTL only sweeps leftovers.
                    max_age: RETRY_RECORD_TTL,
                    storage: stream::StorageType::File,
                    num_replicas: options.replicas,
                    ..Default::default()
                })
                .await
                .map_err(|e| storage(&format!("cannot set up bucket {bucket}"), e))?,
            ),
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
            retries,
            state: Mutex::new(QueueState::default()),
            owned: tokio::sync::Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            gate: RwLock::new(()),
            stop,
            gauges: NodeGauges::register(&metrics),
        });
        inner.balance().await;
        tokio::spawn(inner.clone().ownership_loop());
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
