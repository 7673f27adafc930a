//! The rules for the secrets the gateway checks requests against: the admin token, the
//! metrics token and the sources' webhook secrets.
//!
//! Each must be at least [`MIN_SECRET_CHARS`] characters: they are shared secrets an
//! attacker can try against the network (the webhook secret keys an HMAC anyone can probe
//! with signed requests), and a short one falls to guessing. Write keys are not held to it:
//! Segment's own write keys are public in every browser that loads analytics.js, so their
//! length protects nothing. A token must also differ from every write key (a write key is
//! public) and the metrics token from the admin token (a scraper's copy of it must not open
//! the management API).

use super::{error, ConfigError, Secret, Settings, DEFAULT_SOURCE};

/// Fewest characters of an admin token, a metrics token or a webhook secret.
pub const MIN_SECRET_CHARS: usize = 16;

impl Settings {
    /// Checks the admin token, the metrics token and every webhook secret.
    pub(super) fn validate_secrets(&self) -> Result<(), ConfigError> {
        let write_keys: Vec<&str> = self
            .sources
            .iter()
            .flat_map(|s| &s.write_keys)
            .map(Secret::expose)
            .collect();
        if let Some(token) = &self.admin_token {
            let key = "admin_token (GATEWAY_ADMIN_TOKEN)";
            long_enough(key, token)?;
            if write_keys.contains(&token.expose()) {
                return Err(error(key, "must differ from every write key"));
            }
        }
        if let Some(token) = &self.metrics_token {
            let key = "metrics_token (GATEWAY_METRICS_TOKEN)";
            long_enough(key, token)?;
            if write_keys.contains(&token.expose()) {
                return Err(error(key, "must differ from every write key"));
            }
            if self.admin_token.as_ref() == Some(token) {
                return Err(error(key, "must differ from admin_token"));
            }
        }
        for source in &self.sources {
            if let Some(secret) = &source.webhook_secret {
                let key = if source.slug == DEFAULT_SOURCE {
                    "sources[default].webhook_secret (GATEWAY_WEBHOOK_SECRET)".to_string()
                } else {
                    format!("sources[{}].webhook_secret", source.slug)
                };
                long_enough(&key, secret)?;
            }
        }
        Ok(())
    }
}

fn long_enough(key: &str, secret: &Secret) -> Result<(), ConfigError> {
    let chars = secret.expose().trim().chars().count();
    if chars == 0 {
        return Err(error(key, "must not be empty"));
    }
    if chars < MIN_SECRET_CHARS {
        return Err(error(
            key,
            format!(
                "is {chars} characters long; use at least {MIN_SECRET_CHARS} (for example `openssl rand -hex 24`)"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SourceSettings;

    const LONG: &str = "0123456789abcdef";

    fn settings() -> Settings {
        Settings {
            sources: vec![
                SourceSettings {
                    slug: "default".into(),
                    write_keys: vec![Secret::new("wk")],
                    webhook_secret: None,
                    refiner_api_key: None,
                    webhook_format: Default::default(),
                },
                SourceSettings {
                    slug: "web".into(),
                    write_keys: vec![Secret::new("wk-web-0123456789")],
                    webhook_secret: None,
                    refiner_api_key: None,
                    webhook_format: Default::default(),
                },
            ],
            ..Settings::default()
        }
    }

    fn refused(settings: &Settings) -> String {
        settings.validate().expect_err("refused").to_string()
    }

    #[test]
    fn secrets_of_sixteen_characters_pass() {
        let mut s = settings();
        s.admin_token = Some(Secret::new(LONG));
        s.metrics_token = Some(Secret::new("fedcba9876543210"));
        s.sources[0].webhook_secret = Some(Secret::new(LONG));
        s.sources[1].webhook_secret = Some(Secret::new("ééééééééééééééé✓"));
        s.validate().expect("valid");
    }

    #[test]
    fn short_secrets_are_refused_by_name() {
        let mut s = settings();
        s.admin_token = Some(Secret::new("short-token"));
        let message = refused(&s);
        assert!(
            message.contains("admin_token (GATEWAY_ADMIN_TOKEN)"),
            "{message}"
        );
        assert!(message.contains("11 characters"), "{message}");

        let mut s = settings();
        s.metrics_token = Some(Secret::new(&LONG[..15]));
        let message = refused(&s);
        assert!(
            message.contains("metrics_token (GATEWAY_METRICS_TOKEN)"),
            "{message}"
        );

        let mut s = settings();
        s.sources[0].webhook_secret = Some(Secret::new("hook"));
        let message = refused(&s);
        assert!(
            message.contains("sources[default].webhook_secret (GATEWAY_WEBHOOK_SECRET)"),
            "{message}"
        );

        let mut s = settings();
        s.sources[1].webhook_secret = Some(Secret::new("   "));
        let message = refused(&s);
        assert!(message.contains("sources[web].webhook_secret"), "{message}");
        assert!(message.contains("must not be empty"), "{message}");
    }

    #[test]
    fn tokens_must_differ_from_write_keys_and_each_other() {
        let mut s = settings();
        s.admin_token = Some(Secret::new("wk-web-0123456789"));
        assert!(refused(&s).contains("must differ from every write key"));

        let mut s = settings();
        s.metrics_token = Some(Secret::new("wk-web-0123456789"));
        assert!(refused(&s).contains("metrics_token"));

        let mut s = settings();
        s.admin_token = Some(Secret::new(LONG));
        s.metrics_token = Some(Secret::new(LONG));
        let message = refused(&s);
        assert!(
            message.contains("must differ from admin_token"),
            "{message}"
        );
    }
}
