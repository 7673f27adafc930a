//! Settings of the distributed spool (NATS JetStream), and the choice of spool backend.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{error, parse_number, ConfigError, Secret, Settings};
use crate::spool::NatsSpoolOptions;

/// Which spool holds accepted events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SpoolBackend {
    /// One SQLite file in `data_dir` (one gateway process).
    #[default]
    Sqlite,
    /// NATS JetStream, shared by several gateway nodes (see `docs/distributed.md`).
    Nats,
}

/// The JetStream spool (`spool.backend = "nats"`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSettings {
    /// Server URL(s), comma separated.
    pub url: String,
    /// Authentication: a token, or user and password, or a credentials file (empty: unset).
    pub token: Secret,
    pub user: String,
    pub password: Secret,
    pub credentials_file: String,
    /// The events stream.
    pub stream: String,
    /// The dead-letter stream.
    pub dead_letter_stream: String,
    /// Subjects: `<prefix>.events.<partition>`, `<prefix>.dead.<source>`.
    pub subject_prefix: String,
    /// Consumer names: `<consumer>-p<partition>`.
    pub consumer: String,
    /// Key-value bucket of partition ownership.
    pub bucket: String,
    /// Key-value bucket of accepted message ids (TTL: the dedup window); empty: none.
    pub dedup_bucket: String,
    /// Key-value bucket of retried events' attempts and retry times; empty: none.
    pub retry_bucket: String,
    /// Stream of the partition owners' dedup indexes; empty: none (JetStream's duplicate
    /// window is then the whole dedup window).
    pub dedup_stream: String,
    /// JetStream's duplicate window while the owners' index is on, in seconds.
    pub duplicate_window_secs: u64,
    /// Scratch directory of the owners' dedup run files; empty: the system's temp directory.
    pub dedup_dir: String,
    /// Replicas of the streams and the bucket.
    pub replicas: usize,
    /// Partitions of the events stream; per-user order is kept within one.
    pub partitions: u32,
    /// How long an append waits for JetStream's acks, in ms.
    pub publish_timeout_ms: u64,
    /// How long an unrenewed partition stays owned, in seconds.
    pub ownership_ttl_secs: u64,
    /// JetStream's ack wait for a pulled event, in seconds.
    pub ack_wait_secs: u64,
    /// Deliveries after which an event is dead-lettered; 0 = no limit.
    pub max_deliver: u64,
    /// Unacked messages (events, or packs of them) per partition consumer.
    pub max_ack_pending: i64,
    /// Events a node holds in memory before it stops pulling.
    pub max_buffered: usize,
    /// Messages (events, or packs of them) pulled per request.
    pub fetch_batch: usize,
    /// This node's name in the ownership bucket (a random suffix is added); empty: the
    /// host name.
    pub node_name: String,
}

impl Default for NatsSettings {
    fn default() -> Self {
        let defaults = NatsSpoolOptions::new("nats://127.0.0.1:4222");
        NatsSettings {
            url: defaults.url,
            token: Secret::new(""),
            user: String::new(),
            password: Secret::new(""),
            credentials_file: String::new(),
            stream: defaults.stream,
            dead_letter_stream: defaults.dead_letter_stream,
            subject_prefix: defaults.subject_prefix,
            consumer: defaults.consumer,
            bucket: defaults.bucket,
            dedup_bucket: defaults.dedup_bucket.unwrap_or_default(),
            retry_bucket: defaults.retry_bucket.unwrap_or_default(),
            dedup_stream: defaults.dedup_stream.unwrap_or_default(),
            duplicate_window_secs: defaults.duplicate_window.as_secs(),
            dedup_dir: String::new(),
            replicas: defaults.replicas,
            partitions: defaults.partitions,
            publish_timeout_ms: defaults.publish_timeout.as_millis() as u64,
            ownership_ttl_secs: defaults.ownership_ttl.as_secs(),
            ack_wait_secs: defaults.ack_wait.as_secs(),
            max_deliver: defaults.max_deliver,
            max_ack_pending: defaults.max_ack_pending,
            max_buffered: defaults.max_buffered,
            fetch_batch: defaults.fetch_batch,
            node_name: String::new(),
        }
    }
}

/// A stream, consumer or bucket name JetStream accepts.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Settings {
    pub(super) fn apply_nats_env(
        &mut self,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        if let Some(v) = env("GATEWAY_SPOOL") {
            self.spool.backend = match v.trim() {
                "sqlite" => SpoolBackend::Sqlite,
                "nats" => SpoolBackend::Nats,
                other => {
                    return Err(error(
                        "spool.backend (GATEWAY_SPOOL)",
                        format!("expected `sqlite` or `nats`, got `{other}`"),
                    ))
                }
            };
        }
        let nats = &mut self.nats;
        if let Some(v) = env("GATEWAY_NATS_URL") {
            nats.url = v;
        }
        if let Some(v) = env("GATEWAY_NATS_TOKEN") {
            nats.token = Secret::new(v);
        }
        if let Some(v) = env("GATEWAY_NATS_USER") {
            nats.user = v;
        }
        if let Some(v) = env("GATEWAY_NATS_PASSWORD") {
            nats.password = Secret::new(v);
        }
        if let Some(v) = env("GATEWAY_NATS_CREDS") {
            nats.credentials_file = v;
        }
        if let Some(v) = env("GATEWAY_NATS_STREAM") {
            nats.stream = v;
        }
        if let Some(v) = env("GATEWAY_NATS_CONSUMER") {
            nats.consumer = v;
        }
        if let Some(v) = env("GATEWAY_NATS_REPLICAS") {
            nats.replicas = parse_number(&v, "nats.replicas (GATEWAY_NATS_REPLICAS)")?;
        }
        if let Some(v) = env("GATEWAY_NATS_PARTITIONS") {
            nats.partitions = parse_number(&v, "nats.partitions (GATEWAY_NATS_PARTITIONS)")?;
        }
        if let Some(v) = env("GATEWAY_NODE_NAME") {
            nats.node_name = v;
        }
        Ok(())
    }

    pub(super) fn validate_nats(&self) -> Result<(), ConfigError> {
        let nats = &self.nats;
        if nats.url.trim().is_empty() {
            return Err(error("nats.url (GATEWAY_NATS_URL)", "must not be empty"));
        }
        nats.validate_names()?;
        nats.validate_sizes()?;
        nats.validate_credentials()
    }

    /// The JetStream spool's options from these settings.
    pub fn nats_spool_options(&self) -> NatsSpoolOptions {
        let nats = &self.nats;
        let mut options = NatsSpoolOptions::new(nats.url.clone());
        let set = |value: &str| (!value.is_empty()).then(|| value.to_owned());
        options.token = set(nats.token.expose());
        options.user = set(&nats.user);
        options.password = set(nats.password.expose());
        options.credentials_file = set(&nats.credentials_file).map(PathBuf::from);
        options.stream = nats.stream.clone();
        options.dead_letter_stream = nats.dead_letter_stream.clone();
        options.subject_prefix = nats.subject_prefix.clone();
        options.consumer = nats.consumer.clone();
        options.bucket = nats.bucket.clone();
        options.dedup_bucket = set(&nats.dedup_bucket);
        options.retry_bucket = set(&nats.retry_bucket);
        options.dedup_stream = set(&nats.dedup_stream);
        options.duplicate_window = Duration::from_secs(nats.duplicate_window_secs);
        if !nats.dedup_dir.trim().is_empty() {
            options.dedup_dir = PathBuf::from(nats.dedup_dir.trim());
        }
        options.replicas = nats.replicas;
        options.partitions = nats.partitions;
        options.dedup_window = Duration::from_secs(self.spool.dedup_window_secs);
        options.publish_timeout = Duration::from_millis(nats.publish_timeout_ms);
        options.ownership_ttl = Duration::from_secs(nats.ownership_ttl_secs);
        options.ack_wait = Duration::from_secs(nats.ack_wait_secs);
        options.max_deliver = nats.max_deliver;
        options.dead_letter_retention = Some(Duration::from_secs(
            self.dead_letters.retention_days.saturating_mul(24 * 3600),
        ));
        options.max_ack_pending = nats.max_ack_pending;
        options.max_buffered = nats.max_buffered;
        options.fetch_batch = nats.fetch_batch;
        if !nats.node_name.trim().is_empty() {
            options.node_name = nats.node_name.trim().to_owned();
        }
        options
    }
}

impl NatsSettings {
    /// Stream, bucket and subject names: valid for JetStream and distinct where they must be.
    fn validate_names(&self) -> Result<(), ConfigError> {
        let nats = self;
        for (key, name) in [
            ("nats.stream (GATEWAY_NATS_STREAM)", &nats.stream),
            ("nats.dead_letter_stream", &nats.dead_letter_stream),
            ("nats.consumer (GATEWAY_NATS_CONSUMER)", &nats.consumer),
            ("nats.bucket", &nats.bucket),
        ] {
            if !valid_name(name) {
                return Err(error(
                    key,
                    format!("`{name}` must be 1-64 characters of A-Z, a-z, 0-9, - and _"),
                ));
            }
        }
        if !nats.dedup_bucket.is_empty() && !valid_name(&nats.dedup_bucket) {
            return Err(error(
                "nats.dedup_bucket",
                format!(
                    "`{}` must be empty or 1-64 characters of A-Z, a-z, 0-9, - and _",
                    nats.dedup_bucket
                ),
            ));
        }
        if !nats.dedup_bucket.is_empty() && nats.dedup_bucket == nats.bucket {
            return Err(error("nats.dedup_bucket", "must differ from nats.bucket"));
        }
        if !nats.retry_bucket.is_empty() && !valid_name(&nats.retry_bucket) {
            return Err(error(
                "nats.retry_bucket",
                format!(
                    "`{}` must be empty or 1-64 characters of A-Z, a-z, 0-9, - and _",
                    nats.retry_bucket
                ),
            ));
        }
        if !nats.retry_bucket.is_empty()
            && (nats.retry_bucket == nats.bucket || nats.retry_bucket == nats.dedup_bucket)
        {
            return Err(error(
                "nats.retry_bucket",
                "must differ from nats.bucket and nats.dedup_bucket",
            ));
        }
        if !nats.dedup_stream.is_empty()
            && (!valid_name(&nats.dedup_stream)
                || nats.dedup_stream == nats.stream
                || nats.dedup_stream == nats.dead_letter_stream)
        {
            return Err(error(
                "nats.dedup_stream",
                "must be empty, or 1-64 characters of A-Z, a-z, 0-9, - and _ and differ from the other streams",
            ));
        }
        if nats.stream == nats.dead_letter_stream {
            return Err(error(
                "nats.dead_letter_stream",
                "must differ from nats.stream",
            ));
        }
        let prefix_ok = !nats.subject_prefix.is_empty()
            && nats.subject_prefix.split('.').all(|token| {
                !token.is_empty()
                    && token
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            });
        if !prefix_ok {
            return Err(error(
                "nats.subject_prefix",
                "must be dot-separated tokens of A-Z, a-z, 0-9, - and _",
            ));
        }
        Ok(())
    }

    /// Replicas, partitions, timeouts and buffer sizes within their ranges.
    fn validate_sizes(&self) -> Result<(), ConfigError> {
        let nats = self;
        if !(1..=5).contains(&nats.replicas) {
            return Err(error(
                "nats.replicas (GATEWAY_NATS_REPLICAS)",
                "must be between 1 and 5",
            ));
        }
        if !(1..=4096).contains(&nats.partitions) {
            return Err(error(
                "nats.partitions (GATEWAY_NATS_PARTITIONS)",
                "must be between 1 and 4096",
            ));
        }
        for (key, value) in [
            ("nats.publish_timeout_ms", nats.publish_timeout_ms),
            ("nats.ownership_ttl_secs", nats.ownership_ttl_secs),
            ("nats.ack_wait_secs", nats.ack_wait_secs),
            ("nats.max_ack_pending", nats.max_ack_pending.max(0) as u64),
            ("nats.fetch_batch", nats.fetch_batch as u64),
            ("nats.duplicate_window_secs", nats.duplicate_window_secs),
        ] {
            if value == 0 {
                return Err(error(key, "must be greater than 0"));
            }
        }
        if nats.max_buffered < nats.fetch_batch {
            return Err(error(
                "nats.max_buffered",
                "must be at least nats.fetch_batch",
            ));
        }
        Ok(())
    }

    /// At most one authentication method, and a user and password only together.
    fn validate_credentials(&self) -> Result<(), ConfigError> {
        let nats = self;
        let methods = [
            !nats.token.expose().is_empty(),
            !nats.user.is_empty() || !nats.password.expose().is_empty(),
            !nats.credentials_file.is_empty(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(error(
                "nats.token (GATEWAY_NATS_TOKEN)",
                "set one of a token, a user and password, or a credentials file",
            ));
        }
        if nats.user.is_empty() != nats.password.expose().is_empty() {
            return Err(error(
                "nats.user (GATEWAY_NATS_USER)",
                "a user needs a password and a password a user",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::load_with(None, |name| env.get(name).cloned())
    }

    #[test]
    fn the_environment_chooses_and_configures_the_nats_spool() {
        let settings = load(&[
            ("GATEWAY_WRITE_KEYS", "k"),
            ("GATEWAY_SPOOL", "nats"),
            ("GATEWAY_NATS_URL", "nats://10.0.0.1:4222"),
            ("GATEWAY_NATS_REPLICAS", "3"),
            ("GATEWAY_NATS_PARTITIONS", "32"),
            ("GATEWAY_NATS_STREAM", "EVENTS"),
            ("GATEWAY_NODE_NAME", "pod-1"),
        ])
        .expect("valid");
        assert_eq!(settings.spool.backend, SpoolBackend::Nats);
        let options = settings.nats_spool_options();
        assert_eq!(options.url, "nats://10.0.0.1:4222");
        assert_eq!(options.replicas, 3);
        assert_eq!(options.partitions, 32);
        assert_eq!(options.stream, "EVENTS");
        assert_eq!(options.node_name, "pod-1");
        assert_eq!(options.dedup_window, Duration::from_secs(86_400));
    }

    #[test]
    fn bad_nats_settings_name_their_key() {
        let err =
            load(&[("GATEWAY_WRITE_KEYS", "k"), ("GATEWAY_SPOOL", "kafka")]).expect_err("backend");
        assert!(err.to_string().contains("GATEWAY_SPOOL"), "{err}");
        let err = load(&[("GATEWAY_WRITE_KEYS", "k"), ("GATEWAY_NATS_REPLICAS", "7")])
            .expect_err("replicas");
        assert!(err.to_string().contains("GATEWAY_NATS_REPLICAS"), "{err}");
        let err = load(&[("GATEWAY_WRITE_KEYS", "k"), ("GATEWAY_NATS_STREAM", "a.b")])
            .expect_err("stream");
        assert!(err.to_string().contains("GATEWAY_NATS_STREAM"), "{err}");
        let err = load(&[
            ("GATEWAY_WRITE_KEYS", "k"),
            ("GATEWAY_NATS_TOKEN", "t"),
            ("GATEWAY_NATS_USER", "u"),
            ("GATEWAY_NATS_PASSWORD", "p"),
        ])
        .expect_err("two auth methods");
        assert!(err.to_string().contains("nats.token"), "{err}");
    }

    #[test]
    fn nats_secrets_do_not_show_in_debug() {
        let settings = load(&[
            ("GATEWAY_WRITE_KEYS", "k"),
            ("GATEWAY_NATS_TOKEN", "very-secret-token"),
        ])
        .expect("valid");
        assert!(!format!("{settings:?}").contains("very-secret-token"));
    }
}
