//! Settings: defaults, then a TOML file (`--config`), then the environment (layered in
//! [`load`]: every key as `GATEWAY_<TABLE>__<KEY>`, then the short names of [`ENV_VARS`]).
//!
//! The only IO here is reading the file. Loading either yields settings that passed
//! [`Settings::validate`] or one [`ConfigError`] naming the offending key (and the
//! environment variable that sets it), so start-up fails with one clear line, never a
//! panic. Secrets are wrapped in [`Secret`], whose `Debug` never shows them.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use crate::refiner::mapping::MappingOptions;
use crate::segment::Limits;

mod console;
mod delivery_log;
mod engage;
mod filters;
mod ingest;
mod load;
mod nats;
mod secrets;
pub use console::ConsoleSettings;
pub use delivery_log::DeliveryLogSettings;
pub use engage::{EngageSettings, DEFAULT_SEGMENTS_TTL_SECS};
pub use filters::{SourceFilters, MAX_ENVIRONMENTS};
pub use ingest::{IntegrationSettings, WebhookFormat};
pub use nats::{NatsSettings, SpoolBackend};
pub use secrets::MIN_SECRET_CHARS;

/// The slug of the source the environment variables define.
pub const DEFAULT_SOURCE: &str = "default";

/// A secret string: write key, webhook secret, API key or admin token.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    /// The secret itself, for comparing and sending; never for logging.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// The first and last two characters, for display in listings (`ab…yz`).
    pub fn masked(&self) -> String {
        let chars: Vec<char> = self.0.chars().collect();
        if chars.len() <= 6 {
            return "…".into();
        }
        let head: String = chars[..2].iter().collect();
        let tail: String = chars[chars.len() - 2..].iter().collect();
        format!("{head}…{tail}")
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON lines, except when stdout is a terminal (then text): containers and service
    /// managers get JSON, a developer's shell gets readable lines.
    #[default]
    Auto,
    /// Human-readable lines (coloured in a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// One Segment source: who may send, and where its events go.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceSettings {
    /// Short name used in the management API and metrics (`[a-z0-9_-]`, 1–64 chars).
    pub slug: String,
    /// Write keys accepted for this source.
    #[serde(default)]
    pub write_keys: Vec<Secret>,
    /// Shared secret of Segment's Webhooks destination (`X-Signature`).
    #[serde(default)]
    pub webhook_secret: Option<Secret>,
    /// Refiner API key this source's events are delivered with.
    #[serde(default)]
    pub refiner_api_key: Option<Secret>,
    /// What Segment's Webhooks destination sends: `classic` (one object per request) or
    /// `actions` (arrays allowed, whose signature covers only the first element).
    #[serde(default)]
    pub webhook_format: WebhookFormat,
}

/// Refiner's API.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RefinerSettings {
    pub base_url: String,
}

impl Default for RefinerSettings {
    fn default() -> Self {
        RefinerSettings {
            base_url: "https://api.refiner.io/v1".into(),
        }
    }
}

/// The embedded spool.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolSettings {
    /// Which spool holds accepted events: `sqlite` (embedded) or `nats` (distributed).
    pub backend: SpoolBackend,
    /// Seconds a `messageId` suppresses repeats from the same source.
    pub dedup_window_secs: u64,
    /// Requests that may wait for the spool writer before ingest answers 429.
    pub queue_capacity: usize,
    /// Most requests sharing one transaction (one fsync).
    pub max_group: usize,
    /// How often the spool's depth, oldest event and dead letters are sampled for the
    /// metrics, in ms (each sample counts the queue: keep it in seconds).
    pub stats_interval_ms: u64,
    /// Accepted ids the dedup index keeps in memory before writing them to a run file
    /// (appends are refused as overload at four times as many).
    pub dedup_flush_ids: usize,
}

impl Default for SpoolSettings {
    fn default() -> Self {
        SpoolSettings {
            backend: SpoolBackend::Sqlite,
            dedup_window_secs: 24 * 3600,
            queue_capacity: 4096,
            max_group: 512,
            stats_interval_ms: 5000,
            dedup_flush_ids: 131_072,
        }
    }
}

/// Delivery to Refiner: batching, concurrency, retries, circuit breaker.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeliverySettings {
    /// Whether this process delivers at all (off: it only accepts and spools).
    pub enabled: bool,
    /// Events leased from the spool per batch.
    pub batch_size: usize,
    /// Batches in flight at once (each holds its users until it settles).
    pub workers: usize,
    /// Seconds a leased batch is reserved before it may be leased again.
    pub lease_secs: u64,
    /// Upper bound of concurrent Refiner calls (the adaptive limit moves below it).
    pub max_concurrency: usize,
    /// Concurrent calls the adaptive limit starts at.
    pub initial_concurrency: usize,
    /// Calls slower than this count as congestion for the adaptive limit, in ms.
    pub latency_threshold_ms: u64,
    /// Static cap of requests per second per Refiner API key; 0 = none.
    pub rate_limit_per_sec: u32,
    /// Timeout of one Refiner call, in seconds.
    pub timeout_secs: u64,
    /// First retry delay bound, in ms (full jitter: a random delay up to base × 2^attempts).
    pub retry_base_ms: u64,
    /// Largest retry delay, in seconds.
    pub retry_cap_secs: u64,
    /// Least wait after a 429, in seconds, whatever Retry-After says.
    pub retry_floor_429_secs: u64,
    /// Events older than this are dead-lettered instead of retried, in seconds.
    pub max_age_secs: u64,
    /// Consecutive transient failures that open the circuit breaker.
    pub breaker_failures: u32,
    /// First pause of an open breaker before a probe, in seconds (doubles up to 60 s).
    pub breaker_cooldown_secs: u64,
    /// Idle wait between empty leases, in ms.
    pub poll_interval_ms: u64,
    /// At most one ping (page/screen) per user per this many seconds.
    pub ping_interval_secs: u64,
    /// A user's track-event calls in flight at once (identify-user and delete-contact calls
    /// always go alone); 1 keeps every user to one call in flight.
    pub per_user_window: usize,
    /// Seconds between recheck calls of a source whose Refiner key was refused (401/403).
    pub auth_recheck_secs: u64,
}

impl Default for DeliverySettings {
    fn default() -> Self {
        DeliverySettings {
            enabled: true,
            batch_size: 256,
            workers: 4,
            lease_secs: 120,
            max_concurrency: 64,
            initial_concurrency: 16,
            latency_threshold_ms: 2000,
            rate_limit_per_sec: 0,
            timeout_secs: 10,
            retry_base_ms: 1000,
            retry_cap_secs: 600,
            retry_floor_429_secs: 2,
            max_age_secs: 24 * 3600,
            breaker_failures: 20,
            breaker_cooldown_secs: 5,
            poll_interval_ms: 50,
            ping_interval_secs: 60,
            per_user_window: 32,
            auth_recheck_secs: 300,
        }
    }
}

/// Dead letters (events delivery gave up on), kept for the management API.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterSettings {
    /// Days a dead letter is kept; the spool removes older ones every minute.
    pub retention_days: u64,
}

impl Default for DeadLetterSettings {
    fn default() -> Self {
        DeadLetterSettings { retention_days: 14 }
    }
}

/// Everything the gateway is configured with.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Address the HTTP server binds.
    pub listen: String,
    /// Directory of the embedded spool.
    pub data_dir: PathBuf,
    /// Token of the management API.
    pub admin_token: Option<Secret>,
    /// Bearer token `/metrics` requires (none: `/metrics` is open).
    pub metrics_token: Option<Secret>,
    pub log_format: LogFormat,
    /// Seconds in-flight requests get to finish after SIGTERM.
    pub shutdown_timeout_secs: u64,
    pub refiner: RefinerSettings,
    /// Request limits (`segment::Limits`, read as it is).
    pub limits: Limits,
    pub spool: SpoolSettings,
    pub delivery: DeliverySettings,
    pub mapping: MappingOptions,
    pub nats: NatsSettings,
    pub dead_letters: DeadLetterSettings,
    /// The delivery log and the live view.
    pub delivery_log: DeliveryLogSettings,
    /// Segment's `integrations` object: the names that select this gateway.
    pub integrations: IntegrationSettings,
    /// Segment Engage audiences and Refiner manual segments.
    pub engage: EngageSettings,
    /// The web console (`[console]`).
    pub console: ConsoleSettings,
    pub sources: Vec<SourceSettings>,
    /// Per source slug: Refiner environments and filter/transform rules
    /// (`docs/filters.md`).
    pub filters: std::collections::BTreeMap<String, SourceFilters>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("./data"),
            admin_token: None,
            metrics_token: None,
            log_format: LogFormat::Auto,
            shutdown_timeout_secs: 30,
            refiner: RefinerSettings::default(),
            limits: Limits::default(),
            spool: SpoolSettings::default(),
            delivery: DeliverySettings::default(),
            mapping: MappingOptions::default(),
            nats: NatsSettings::default(),
            dead_letters: DeadLetterSettings::default(),
            delivery_log: DeliveryLogSettings::default(),
            integrations: IntegrationSettings::default(),
            engage: EngageSettings::default(),
            console: ConsoleSettings::default(),
            sources: Vec::new(),
            filters: Default::default(),
        }
    }
}

/// A setting that stops start-up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration error: {key}: {message}")]
pub struct ConfigError {
    /// The setting, as `file key (ENV_VAR)` where an environment variable sets it.
    pub key: String,
    pub message: String,
}

fn error(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

/// Every environment variable the gateway reads, with the setting it overrides. Kept in
/// one table so `docs/configuration.md` can be checked against it.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("GATEWAY_LISTEN", "listen"),
    ("GATEWAY_DATA_DIR", "data_dir"),
    ("GATEWAY_ADMIN_TOKEN", "admin_token"),
    ("GATEWAY_METRICS_TOKEN", "metrics_token"),
    ("GATEWAY_LOG_FORMAT", "log_format"),
    ("GATEWAY_SHUTDOWN_TIMEOUT_SECS", "shutdown_timeout_secs"),
    ("GATEWAY_DEDUP_WINDOW_SECS", "spool.dedup_window_secs"),
    ("GATEWAY_DELIVERY_ENABLED", "delivery.enabled"),
    ("REFINER_BASE_URL", "refiner.base_url"),
    ("GATEWAY_WRITE_KEYS", "sources[default].write_keys"),
    ("GATEWAY_WEBHOOK_SECRET", "sources[default].webhook_secret"),
    ("REFINER_API_KEY", "sources[default].refiner_api_key"),
    ("GATEWAY_WEBHOOK_FORMAT", "sources[default].webhook_format"),
    ("GATEWAY_SPOOL", "spool.backend"),
    ("GATEWAY_NATS_URL", "nats.url"),
    ("GATEWAY_NATS_TOKEN", "nats.token"),
    ("GATEWAY_NATS_USER", "nats.user"),
    ("GATEWAY_NATS_PASSWORD", "nats.password"),
    ("GATEWAY_NATS_CREDS", "nats.credentials_file"),
    ("GATEWAY_NATS_STREAM", "nats.stream"),
    ("GATEWAY_NATS_CONSUMER", "nats.consumer"),
    ("GATEWAY_NATS_REPLICAS", "nats.replicas"),
    ("GATEWAY_NATS_PARTITIONS", "nats.partitions"),
    ("GATEWAY_NODE_NAME", "nats.node_name"),
];

impl Settings {
    /// Applies the documented short names ([`ENV_VARS`]), the last layer.
    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        self.apply_nats_env(&env)?;
        if let Some(v) = env("GATEWAY_LISTEN") {
            self.listen = v;
        }
        if let Some(v) = env("GATEWAY_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = env("GATEWAY_ADMIN_TOKEN") {
            self.admin_token = Some(Secret::new(v));
        }
        if let Some(v) = env("GATEWAY_METRICS_TOKEN") {
            self.metrics_token = Some(Secret::new(v));
        }
        if let Some(v) = env("GATEWAY_LOG_FORMAT") {
            self.log_format = match v.trim() {
                "json" => LogFormat::Json,
                "text" => LogFormat::Text,
                "auto" => LogFormat::Auto,
                other => {
                    return Err(error(
                        "log_format (GATEWAY_LOG_FORMAT)",
                        format!("expected `auto`, `text` or `json`, got `{other}`"),
                    ))
                }
            };
        }
        if let Some(v) = env("GATEWAY_SHUTDOWN_TIMEOUT_SECS") {
            self.shutdown_timeout_secs =
                parse_number(&v, "shutdown_timeout_secs (GATEWAY_SHUTDOWN_TIMEOUT_SECS)")?;
        }
        if let Some(v) = env("GATEWAY_DEDUP_WINDOW_SECS") {
            self.spool.dedup_window_secs =
                parse_number(&v, "spool.dedup_window_secs (GATEWAY_DEDUP_WINDOW_SECS)")?;
        }
        if let Some(v) = env("GATEWAY_DELIVERY_ENABLED") {
            self.delivery.enabled = match v.trim() {
                "true" | "1" => true,
                "false" | "0" => false,
                other => {
                    return Err(error(
                        "delivery.enabled (GATEWAY_DELIVERY_ENABLED)",
                        format!("expected `true` or `false`, got `{other}`"),
                    ))
                }
            };
        }
        if let Some(v) = env("REFINER_BASE_URL") {
            self.refiner.base_url = v;
        }
        let write_keys = env("GATEWAY_WRITE_KEYS");
        let webhook_secret = env("GATEWAY_WEBHOOK_SECRET");
        let api_key = env("REFINER_API_KEY");
        let webhook_format = env("GATEWAY_WEBHOOK_FORMAT")
            .map(|v| ingest::parse_webhook_format(&v))
            .transpose()?;
        if write_keys.is_none()
            && webhook_secret.is_none()
            && api_key.is_none()
            && webhook_format.is_none()
        {
            return Ok(());
        }
        let index = match self.sources.iter().position(|s| s.slug == DEFAULT_SOURCE) {
            Some(index) => index,
            None => {
                self.sources.push(SourceSettings {
                    slug: DEFAULT_SOURCE.into(),
                    write_keys: Vec::new(),
                    webhook_secret: None,
                    refiner_api_key: None,
                    webhook_format: WebhookFormat::default(),
                });
                self.sources.len() - 1
            }
        };
        let source = &mut self.sources[index];
        if let Some(keys) = write_keys {
            source.write_keys = keys
                .split(',')
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .map(Secret::new)
                .collect();
        }
        if let Some(secret) = webhook_secret {
            source.webhook_secret = Some(Secret::new(secret));
        }
        if let Some(key) = api_key {
            source.refiner_api_key = Some(Secret::new(key));
        }
        if let Some(format) = webhook_format {
            source.webhook_format = format;
        }
        Ok(())
    }

    /// Checks every setting; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        self.validate_refiner_url()?;
        self.engage.validate()?;
        self.console.validate()?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(error("data_dir (GATEWAY_DATA_DIR)", "must not be empty"));
        }
        self.validate_sources()?;
        self.validate_counts()?;
        self.validate_relations()?;
        self.validate_secrets()?;
        self.validate_ingest_limits()?;
        self.validate_integrations()?;
        self.validate_nats()?;
        self.validate_filters()?;
        if self.spool.dedup_window_secs == 0 {
            return Err(error(
                "spool.dedup_window_secs (GATEWAY_DEDUP_WINDOW_SECS)",
                "must be greater than 0",
            ));
        }
        Ok(())
    }

    /// Refiner's base URL is an http or https URL.
    fn validate_refiner_url(&self) -> Result<(), ConfigError> {
        let url = reqwest::Url::parse(&self.refiner.base_url).map_err(|e| {
            error(
                "refiner.base_url (REFINER_BASE_URL)",
                format!("not a URL: {e}"),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(error(
                "refiner.base_url (REFINER_BASE_URL)",
                "must be an http or https URL",
            ));
        }
        Ok(())
    }

    /// At least one source; slugs valid and unique; write keys present, usable in Basic
    /// authentication and never shared between sources.
    fn validate_sources(&self) -> Result<(), ConfigError> {
        if self.sources.is_empty() {
            return Err(error(
                "sources (GATEWAY_WRITE_KEYS)",
                "no source is configured: set GATEWAY_WRITE_KEYS or add [[sources]] to the config file",
            ));
        }
        let mut slugs = HashSet::new();
        let mut keys = HashSet::new();
        for source in &self.sources {
            let valid_slug = !source.slug.is_empty()
                && source.slug.len() <= 64
                && source.slug.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                });
            if !valid_slug {
                return Err(error(
                    "sources.slug",
                    format!(
                        "`{}` must be 1-64 characters of a-z, 0-9, - and _",
                        source.slug
                    ),
                ));
            }
            if !slugs.insert(source.slug.as_str()) {
                return Err(error(
                    "sources.slug",
                    format!("`{}` appears twice", source.slug),
                ));
            }
            let key_name = if source.slug == DEFAULT_SOURCE {
                "sources[default].write_keys (GATEWAY_WRITE_KEYS)".to_string()
            } else {
                format!("sources[{}].write_keys", source.slug)
            };
            if source.write_keys.is_empty() {
                return Err(error(&key_name, "at least one write key is required"));
            }
            for key in &source.write_keys {
                if key.expose().is_empty() || key.expose().contains(':') {
                    return Err(error(
                        &key_name,
                        "write keys must be non-empty and contain no `:`",
                    ));
                }
                if !keys.insert(key.expose()) {
                    return Err(error(&key_name, "a write key is used twice"));
                }
            }
        }
        Ok(())
    }

    /// Every count, size and interval that must be positive.
    fn validate_counts(&self) -> Result<(), ConfigError> {
        let limits = &self.limits;
        for (name, value) in [
            ("limits.max_event_bytes", limits.max_event_bytes),
            ("limits.max_batch_bytes", limits.max_batch_bytes),
            ("limits.max_batch_events", limits.max_batch_events),
            ("limits.max_webhook_bytes", limits.max_webhook_bytes),
            ("limits.max_webhook_events", limits.max_webhook_events),
            ("limits.max_message_id_len", limits.max_message_id_len),
            (
                "limits.max_batch_merged_bytes",
                limits.max_batch_merged_bytes,
            ),
            ("limits.body_budget_bytes", limits.body_budget_bytes),
            (
                "limits.body_timeout_secs",
                limits.body_timeout_secs as usize,
            ),
            (
                "limits.max_webhook_signatures",
                limits.max_webhook_signatures,
            ),
            ("spool.queue_capacity", self.spool.queue_capacity),
            ("spool.max_group", self.spool.max_group),
            ("spool.dedup_flush_ids", self.spool.dedup_flush_ids),
            (
                "spool.stats_interval_ms",
                self.spool.stats_interval_ms as usize,
            ),
            ("delivery.batch_size", self.delivery.batch_size),
            ("delivery.workers", self.delivery.workers),
            ("delivery.max_concurrency", self.delivery.max_concurrency),
            (
                "delivery.initial_concurrency",
                self.delivery.initial_concurrency,
            ),
            ("delivery.lease_secs", self.delivery.lease_secs as usize),
            ("delivery.timeout_secs", self.delivery.timeout_secs as usize),
            (
                "delivery.retry_base_ms",
                self.delivery.retry_base_ms as usize,
            ),
            (
                "delivery.breaker_failures",
                self.delivery.breaker_failures as usize,
            ),
            ("delivery.per_user_window", self.delivery.per_user_window),
            (
                "delivery.auth_recheck_secs",
                self.delivery.auth_recheck_secs as usize,
            ),
            ("mapping.max_string_len", self.mapping.max_string_len),
        ] {
            if value == 0 {
                return Err(error(name, "must be greater than 0"));
            }
        }
        Ok(())
    }

    /// Settings bounded by a constant or by each other.
    fn validate_relations(&self) -> Result<(), ConfigError> {
        if self.limits.max_message_id_len < 36 {
            return Err(error(
                "limits.max_message_id_len",
                "must be at least 36, the length of the ids the gateway generates",
            ));
        }
        if self.delivery.initial_concurrency > self.delivery.max_concurrency {
            return Err(error(
                "delivery.initial_concurrency",
                "must not exceed delivery.max_concurrency",
            ));
        }
        if !(1..=36_500).contains(&self.dead_letters.retention_days) {
            return Err(error(
                "dead_letters.retention_days",
                "must be between 1 and 36500",
            ));
        }
        self.delivery_log.validate()?;
        Ok(())
    }

    /// What `serve` needs beyond [`Settings::validate`]: a Refiner API key for every source
    /// while delivery is on (the demo and the tests run with their own).
    pub fn require_refiner_keys(&self) -> Result<(), ConfigError> {
        if !self.delivery.enabled {
            return Ok(());
        }
        for source in &self.sources {
            if source.refiner_api_key.is_none() {
                let key = if source.slug == DEFAULT_SOURCE {
                    "sources[default].refiner_api_key (REFINER_API_KEY)".to_string()
                } else {
                    format!("sources[{}].refiner_api_key", source.slug)
                };
                return Err(error(
                    &key,
                    "a Refiner API key is required to deliver events (try `refiner-gateway demo` to run without a Refiner account)",
                ));
            }
        }
        Ok(())
    }

    /// The parsed `listen` address.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.listen.parse().map_err(|_| {
            error(
                "listen (GATEWAY_LISTEN)",
                format!("`{}` is not an address like 127.0.0.1:8080", self.listen),
            )
        })
    }
}

fn parse_number<T: std::str::FromStr>(value: &str, key: &str) -> Result<T, ConfigError> {
    value
        .trim()
        .parse()
        .map_err(|_| error(key, format!("`{value}` is not a whole number")))
}

#[cfg(test)]
mod tests;
