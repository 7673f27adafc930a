//! Settings of the ingest edge: request limits (`[limits]`), the webhook format of a
//! source, and the names in Segment's `integrations` object that select the gateway
//! (`[integrations]`).
//!
//! The defaults are Segment's limits, and memory bounds sized for the Helm chart's default
//! memory limit (512 MiB): `limits.body_budget_bytes` caps what request bodies hold at
//! once, whatever the traffic (see `docs/limits-and-errors.md`).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{error, ConfigError, Settings};
use crate::segment::{Destinations, DEFAULT_DESTINATION_NAMES};

/// Which events a source's traffic selects for the gateway, by Segment's `integrations`
/// object (see `segment::Destinations`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IntegrationSettings {
    /// The names in `integrations` that mean this gateway, for every source.
    pub destination_names: Vec<String>,
    /// Per source slug, names used instead of `destination_names`.
    pub source_destination_names: BTreeMap<String, Vec<String>>,
}

impl Default for IntegrationSettings {
    fn default() -> Self {
        IntegrationSettings {
            destination_names: DEFAULT_DESTINATION_NAMES.map(String::from).to_vec(),
            source_destination_names: BTreeMap::new(),
        }
    }
}

impl IntegrationSettings {
    /// The names that select the gateway for the source `slug`.
    pub fn destinations(&self, slug: &str) -> Destinations {
        let names = self
            .source_destination_names
            .get(slug)
            .unwrap_or(&self.destination_names);
        Destinations::new(names.iter().cloned())
    }
}

/// What a source's Segment Webhooks destination sends to `/webhook`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// Webhooks (Classic): one event object per request, signed over the whole body. A JSON
    /// array is refused, since an array's signature would cover only its first element.
    #[default]
    Classic,
    /// Webhooks (Actions): an object, or (with batching) a JSON array whose signature
    /// covers only the first element; a signature seen before with another body is refused.
    Actions,
}

/// Parses `GATEWAY_WEBHOOK_FORMAT`.
pub(super) fn parse_webhook_format(value: &str) -> Result<WebhookFormat, ConfigError> {
    match value.trim() {
        "classic" => Ok(WebhookFormat::Classic),
        "actions" => Ok(WebhookFormat::Actions),
        other => Err(error(
            "sources[default].webhook_format (GATEWAY_WEBHOOK_FORMAT)",
            format!("expected `classic` or `actions`, got `{other}`"),
        )),
    }
}

/// The largest body budget accepted: far beyond any memory, and within what the budget's
/// semaphore can count.
const MAX_BODY_BUDGET_BYTES: usize = 1 << 40;

impl Settings {
    /// The relations between limits that keep every valid request acceptable (the zero
    /// checks are with the other settings').
    pub(super) fn validate_ingest_limits(&self) -> Result<(), ConfigError> {
        let limits = &self.limits;
        if limits.max_batch_merged_bytes < limits.max_batch_bytes {
            return Err(error(
                "limits.max_batch_merged_bytes",
                "must be at least limits.max_batch_bytes",
            ));
        }
        let largest_body = limits.max_batch_bytes.max(limits.max_webhook_bytes);
        if limits.body_budget_bytes < largest_body {
            return Err(error(
                "limits.body_budget_bytes",
                "must be at least limits.max_batch_bytes and limits.max_webhook_bytes, so that a body of the largest size can be read",
            ));
        }
        if limits.body_budget_bytes > MAX_BODY_BUDGET_BYTES {
            return Err(error(
                "limits.body_budget_bytes",
                format!("must be at most {MAX_BODY_BUDGET_BYTES}"),
            ));
        }
        Ok(())
    }
}

impl Settings {
    /// Destination names are non-empty, and per-source names name configured sources.
    pub(super) fn validate_integrations(&self) -> Result<(), ConfigError> {
        let integrations = &self.integrations;
        let lists = std::iter::once(&integrations.destination_names)
            .chain(integrations.source_destination_names.values());
        if lists.flatten().any(|name| name.trim().is_empty()) {
            return Err(error(
                "integrations.destination_names",
                "destination names must not be empty",
            ));
        }
        for slug in integrations.source_destination_names.keys() {
            if !self.sources.iter().any(|source| &source.slug == slug) {
                return Err(error(
                    "integrations.source_destination_names",
                    format!("`{slug}` is not a configured source"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::Limits;

    fn settings(limits: Limits) -> Settings {
        let mut settings = Settings {
            limits,
            ..Settings::default()
        };
        settings.sources.push(crate::config::SourceSettings {
            slug: "s".into(),
            write_keys: vec![crate::config::Secret::new("k")],
            webhook_secret: None,
            refiner_api_key: None,
            webhook_format: WebhookFormat::Classic,
        });
        settings
    }

    #[test]
    fn the_defaults_are_valid_and_fit_the_largest_body() {
        let limits = Limits::default();
        assert!(limits.body_budget_bytes >= limits.max_webhook_bytes * 8);
        settings(limits).validate().expect("valid");
    }

    #[test]
    fn a_budget_below_the_largest_body_is_refused() {
        let limits = Limits {
            body_budget_bytes: 1024 * 1024,
            ..Limits::default()
        };
        let err = settings(limits).validate().expect_err("too small");
        assert!(
            err.to_string().contains("limits.body_budget_bytes"),
            "{err}"
        );
        let limits = Limits {
            max_batch_merged_bytes: 1000,
            ..Limits::default()
        };
        let err = settings(limits)
            .validate()
            .expect_err("below the batch limit");
        assert!(
            err.to_string().contains("limits.max_batch_merged_bytes"),
            "{err}"
        );
    }

    #[test]
    fn the_limits_table_is_read_into_segment_limits_from_the_file_and_the_environment() {
        let vars = |extra: &[(&str, &str)]| {
            let mut vars = vec![("GATEWAY_WRITE_KEYS".to_string(), "k".to_string())];
            vars.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            vars
        };
        let settings = Settings::load_from(
            None,
            vars(&[
                ("GATEWAY_LIMITS__MAX_EVENT_BYTES", "1000"),
                ("GATEWAY_LIMITS__BODY_TIMEOUT_SECS", "5"),
            ]),
        )
        .expect("valid");
        assert_eq!(
            settings.limits,
            Limits {
                max_event_bytes: 1000,
                body_timeout_secs: 5,
                ..Limits::default()
            }
        );
        let err = Settings::load_from(None, vars(&[("GATEWAY_LIMITS__MAX_EVENTS_BYTES", "1")]))
            .expect_err("unknown key");
        assert!(
            err.to_string().contains("GATEWAY_LIMITS__MAX_EVENTS_BYTES"),
            "{err}"
        );
        let err = Settings::load_from(None, vars(&[("GATEWAY_LIMITS__MAX_BATCH_EVENTS", "x")]))
            .expect_err("not a number");
        assert!(err.to_string().contains("limits.max_batch_events"), "{err}");
        let file: Settings = toml::from_str("[limits]\nmax_webhook_signatures = 7")
            .expect("the file's table parses");
        assert_eq!(file.limits.max_webhook_signatures, 7);
        assert_eq!(
            file.limits.max_event_bytes,
            Limits::default().max_event_bytes
        );
    }

    #[test]
    fn destination_names_default_per_source_and_are_checked() {
        let mut settings = settings(Limits::default());
        assert_eq!(
            settings.integrations.destinations("s").names(),
            ["Refiner", "Webhooks", "Webhooks (Actions)"]
        );
        settings.integrations = toml::from_str(
            "destination_names = [\"Refiner\"]\n[source_destination_names]\ns = [\"Gateway\"]",
        )
        .expect("parses");
        settings.validate().expect("valid");
        assert_eq!(settings.integrations.destinations("s").names(), ["Gateway"]);
        assert_eq!(
            settings.integrations.destinations("other").names(),
            ["Refiner"]
        );
        settings
            .integrations
            .source_destination_names
            .insert("nope".into(), vec!["Refiner".into()]);
        let err = settings.validate().expect_err("unknown source");
        assert!(err.to_string().contains("`nope`"), "{err}");
        settings.integrations.source_destination_names.clear();
        settings.integrations.destination_names = vec![" ".into()];
        let err = settings.validate().expect_err("blank name");
        assert!(
            err.to_string().contains("integrations.destination_names"),
            "{err}"
        );
    }

    #[test]
    fn the_webhook_format_comes_from_the_file_or_the_environment() {
        let source: crate::config::SourceSettings =
            toml::from_str("slug = \"s\"\nwrite_keys = [\"k\"]\nwebhook_format = \"actions\"")
                .expect("parses");
        assert_eq!(source.webhook_format, WebhookFormat::Actions);
        let source: crate::config::SourceSettings =
            toml::from_str("slug = \"s\"\nwrite_keys = [\"k\"]").expect("parses");
        assert_eq!(source.webhook_format, WebhookFormat::Classic);
        assert_eq!(
            parse_webhook_format(" actions "),
            Ok(WebhookFormat::Actions)
        );
        let err = parse_webhook_format("batch").expect_err("unknown");
        assert!(err.to_string().contains("GATEWAY_WEBHOOK_FORMAT"), "{err}");
        let settings = Settings::load_with(None, |name| match name {
            "GATEWAY_WRITE_KEYS" => Some("k".into()),
            "GATEWAY_WEBHOOK_FORMAT" => Some("actions".into()),
            _ => None,
        })
        .expect("valid");
        assert_eq!(settings.sources[0].webhook_format, WebhookFormat::Actions);
    }
}
