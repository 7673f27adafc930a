//! Settings of the web console (`[console]`).
//!
//! The session cookie is marked `Secure` when the request reached the gateway over HTTPS.
//! The gateway itself serves plain HTTP, so that is only ever known from a TLS-terminating
//! proxy's `X-Forwarded-Proto: https`, and that header is believed only when the request's
//! peer address is one of `trusted_proxies`: anyone else could send it.

use std::net::IpAddr;

use serde::Deserialize;

use super::{error, ConfigError};

/// `[console]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSettings {
    /// Peer addresses whose `X-Forwarded-Proto` is believed (e.g. `["127.0.0.1"]` behind a
    /// local reverse proxy). Empty: the header is ignored.
    pub trusted_proxies: Vec<String>,
}

impl ConsoleSettings {
    /// The trusted proxies as addresses.
    pub fn proxies(&self) -> Result<Vec<IpAddr>, ConfigError> {
        self.trusted_proxies
            .iter()
            .map(|text| {
                text.trim().parse::<IpAddr>().map_err(|_| {
                    error(
                        "console.trusted_proxies",
                        format!("`{text}` is not an IP address"),
                    )
                })
            })
            .collect()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        self.proxies().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_must_be_addresses() {
        let ok = ConsoleSettings {
            trusted_proxies: vec!["127.0.0.1".into(), "::1".into()],
        };
        assert_eq!(ok.proxies().expect("addresses").len(), 2);
        let bad = ConsoleSettings {
            trusted_proxies: vec!["proxy.local".into()],
        };
        assert!(bad.validate().is_err());
    }
}
