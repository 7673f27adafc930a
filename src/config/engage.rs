//! Settings of Segment Engage (`[engage]`): which Refiner manual segment an audience syncs
//! to.
//!
//! An audience's membership always reaches Refiner as a contact attribute (see
//! `docs/mapping.md`); these settings add manual-segment membership (`/sync-segment`) for
//! the audiences that have a segment: named here, or looked up by name in Refiner's
//! `GET /segments` when `sync_segments` is on. Nothing is guessed: an audience without a
//! segment is reported, never synced to another one.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{error, ConfigError};

/// Default seconds a source's segment list (Refiner's `GET /segments`) is kept.
pub const DEFAULT_SEGMENTS_TTL_SECS: u64 = 300;

/// `[engage]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngageSettings {
    /// Audience key → uuid of the Refiner manual segment it syncs to.
    pub segments: BTreeMap<String, String>,
    /// Sync every audience (and journey step): those not in `segments` go to the manual
    /// segment whose name is the audience key (`GET /segments`).
    pub sync_segments: bool,
    /// Seconds a looked-up segment list is kept per Refiner API key.
    pub segments_ttl_secs: u64,
}

impl Default for EngageSettings {
    fn default() -> Self {
        EngageSettings {
            segments: BTreeMap::new(),
            sync_segments: false,
            segments_ttl_secs: DEFAULT_SEGMENTS_TTL_SECS,
        }
    }
}

impl EngageSettings {
    /// Keys and uuids must not be blank.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (audience, uuid) in &self.segments {
            if audience.trim().is_empty() || uuid.trim().is_empty() {
                return Err(error(
                    "engage.segments",
                    format!(
                        "audience `{audience}`: neither the key nor the segment uuid may be empty"
                    ),
                ));
            }
        }
        Ok(())
    }
}
