//! `[filters.<source>]`: a source's Refiner environments and its rules.
//!
//! ```toml
//! [filters.web.environments]
//! testing = "refiner-api-key-of-the-testing-environment"
//!
//! [[filters.web.rules]]
//! name = "drop-heartbeats"
//! match = { field = "event", in = ["Heartbeat"] }
//! actions = [{ drop = true }]
//! ```
//!
//! Validation compiles every rule ([`crate::refiner::filters::compile`]), so a loaded
//! configuration's rules are known good; an error names the source, the rule and the field.
//! The reference is `docs/filters.md`.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{error, ConfigError, Secret, Settings};
use crate::refiner::filters::{self, RuleSet, RuleSpec, DEFAULT_ENVIRONMENT};

/// Most environments per source.
pub const MAX_ENVIRONMENTS: usize = 16;

/// One source's environments and rules.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct SourceFilters {
    /// Other Refiner environments (Testing, Staging, ...) by name, each with its API key;
    /// `default` is the source's own `refiner_api_key`.
    #[serde(default)]
    pub environments: BTreeMap<String, Secret>,
    /// Evaluated in order at delivery.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

impl SourceFilters {
    /// The compiled rules, or the first problem, with the configuration key that holds it.
    pub fn compile(&self, slug: &str) -> Result<RuleSet, ConfigError> {
        filters::compile(&self.rules, &self.environments).map_err(|e| {
            error(
                &format!("filters.{slug}.rules[{}].{}", e.rule, e.field),
                e.message,
            )
        })
    }
}

impl Settings {
    /// Every `[filters.<source>]` names a configured source, its environments are well
    /// named with a key each, and its rules compile.
    pub(super) fn validate_filters(&self) -> Result<(), ConfigError> {
        for (slug, filters) in &self.filters {
            if !self.sources.iter().any(|s| &s.slug == slug) {
                return Err(error(
                    &format!("filters.{slug}"),
                    "no source with this slug is configured",
                ));
            }
            if filters.environments.len() > MAX_ENVIRONMENTS {
                return Err(error(
                    &format!("filters.{slug}.environments"),
                    format!("at most {MAX_ENVIRONMENTS} environments"),
                ));
            }
            for (name, key) in &filters.environments {
                let at = format!("filters.{slug}.environments.{name}");
                let valid = !name.is_empty()
                    && name.len() <= 64
                    && name.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                    });
                if !valid || name == DEFAULT_ENVIRONMENT {
                    return Err(error(
                        &at,
                        "names are 1-64 characters of a-z, 0-9, - and _, and not `default` \
                         (the source's refiner_api_key)",
                    ));
                }
                if key.expose().trim().is_empty() {
                    return Err(error(&at, "the Refiner API key must not be empty"));
                }
            }
            filters.compile(slug)?;
        }
        Ok(())
    }
}
