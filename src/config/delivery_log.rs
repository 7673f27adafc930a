//! Settings of the delivery log and the live view (`[delivery_log]`, `[console]`): how
//! long and how much the log keeps, and how many clients may watch live.

use std::time::Duration;

use serde::Deserialize;

use super::{error, ConfigError};
use crate::activity::live::LiveOptions;
use crate::spool::delivery_log::DeliveryLogOptions;

/// `[delivery_log]`: what became of each event, kept for lookups (see
/// `docs/operations.md`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryLogSettings {
    /// Whether the log is kept (off: lookups find only queued events' absence).
    pub enabled: bool,
    /// Seconds a record is kept.
    pub max_age_secs: u64,
    /// Bytes the records may take, oldest removed first.
    pub max_bytes: u64,
    /// Live-view clients at once (`GET /api/live`); more are answered 503.
    pub max_live_clients: usize,
    /// Events the live view shows a second at most (and as many outcomes of other events);
    /// above it the view is a sample and says so.
    pub live_events_per_sec: u64,
}

impl Default for DeliveryLogSettings {
    fn default() -> Self {
        let options = DeliveryLogOptions::default();
        DeliveryLogSettings {
            enabled: options.enabled,
            max_age_secs: options.max_age.as_secs(),
            max_bytes: options.max_bytes,
            max_live_clients: crate::activity::live::MAX_CLIENTS,
            live_events_per_sec: crate::activity::live::PER_SECOND,
        }
    }
}

impl DeliveryLogSettings {
    pub fn options(&self) -> DeliveryLogOptions {
        DeliveryLogOptions {
            enabled: self.enabled,
            max_age: Duration::from_secs(self.max_age_secs),
            max_bytes: self.max_bytes,
        }
    }

    pub fn live_options(&self) -> LiveOptions {
        LiveOptions {
            max_clients: self.max_live_clients,
            per_second: self.live_events_per_sec,
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !(60..=30 * 24 * 3600).contains(&self.max_age_secs) {
            return Err(error(
                "delivery_log.max_age_secs",
                "must be between 60 (a minute) and 2592000 (30 days)",
            ));
        }
        if !(64 * 1024..=1 << 40).contains(&self.max_bytes) {
            return Err(error(
                "delivery_log.max_bytes",
                "must be between 65536 (64 KiB) and 1099511627776 (1 TiB)",
            ));
        }
        if !(1..=1024).contains(&self.max_live_clients) {
            return Err(error(
                "delivery_log.max_live_clients",
                "must be between 1 and 1024",
            ));
        }
        if !(1..=100_000).contains(&self.live_events_per_sec) {
            return Err(error(
                "delivery_log.live_events_per_sec",
                "must be between 1 and 100000",
            ));
        }
        Ok(())
    }
}
