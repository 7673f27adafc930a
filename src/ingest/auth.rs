//! Who is sending: write keys and webhook signatures.
//!
//! Write keys are compared as SHA-256 digests with a constant-time equality, against every
//! configured key without early exit, so neither the position of a match nor the length of
//! a key leaks through timing. Webhook signatures (hex HMAC-SHA1) are checked with the
//! `hmac` crate's constant-time verification: over the whole body, or over the raw bytes
//! of the first element when the body is a JSON array (what Segment's Actions batching
//! signs). Whether a source takes arrays at all is its `webhook_format`, decided by the
//! handler once the signature has named the source.

use std::sync::Arc;

use actix_web::http::header::{HeaderMap, AUTHORIZATION};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::IngestError;
use super::signatures::SIGNATURE_BYTES;
use crate::config::{Secret, SourceSettings, WebhookFormat};
use crate::segment;

/// One source as ingest sees it.
#[derive(Debug)]
pub struct SourceAuth {
    pub slug: Arc<str>,
    /// The source's position in the configuration.
    pub index: usize,
    pub webhook_format: WebhookFormat,
    key_digests: Vec<[u8; 32]>,
    webhook_secret: Option<Secret>,
}

impl SourceAuth {
    pub fn has_webhook_secret(&self) -> bool {
        self.webhook_secret.is_some()
    }
}

/// A webhook signature that verified: the source whose secret made it, and the MAC.
#[derive(Debug, Clone, Copy)]
pub struct Verified<'a> {
    pub source: &'a SourceAuth,
    pub signature: [u8; SIGNATURE_BYTES],
}

/// Every configured source.
#[derive(Debug)]
pub struct Sources {
    list: Vec<SourceAuth>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

const UNKNOWN_KEY: IngestError = IngestError::Unauthorized {
    code: "unauthorized",
    message: "missing or unknown write key",
};

impl Sources {
    pub fn new(settings: &[SourceSettings]) -> Sources {
        Sources {
            list: settings
                .iter()
                .enumerate()
                .map(|(index, source)| SourceAuth {
                    slug: Arc::from(source.slug.as_str()),
                    index,
                    webhook_format: source.webhook_format,
                    key_digests: source
                        .write_keys
                        .iter()
                        .map(|k| digest(k.expose()))
                        .collect(),
                    webhook_secret: source.webhook_secret.clone(),
                })
                .collect(),
        }
    }

    /// The source a slug names.
    pub fn by_slug(&self, slug: &str) -> Option<&SourceAuth> {
        self.list.iter().find(|s| &*s.slug == slug)
    }

    /// The source a write key belongs to (constant time in the key and the key set).
    pub fn by_write_key(&self, key: &str) -> Option<&SourceAuth> {
        let presented = digest(key);
        let mut found = None;
        for (index, source) in self.list.iter().enumerate() {
            for known in &source.key_digests {
                if bool::from(known.ct_eq(&presented)) {
                    found = Some(index);
                }
            }
        }
        found.map(|index| &self.list[index])
    }

    /// Authenticates a `/v1/*` request by its write key: the HTTP Basic user name, the
    /// body's `writeKey`, or both (which must then name the same source).
    pub fn authenticate(
        &self,
        basic_key: Option<&str>,
        body_key: Option<&str>,
    ) -> Result<&SourceAuth, IngestError> {
        let from_header = basic_key
            .map(|k| self.by_write_key(k).ok_or(UNKNOWN_KEY))
            .transpose()?;
        let from_body = body_key
            .map(|k| self.by_write_key(k).ok_or(UNKNOWN_KEY))
            .transpose()?;
        match (from_header, from_body) {
            (Some(a), Some(b)) if !std::ptr::eq(a, b) => Err(IngestError::Unauthorized {
                code: "write_key_mismatch",
                message: "the Authorization header and the body name different write keys",
            }),
            (Some(source), _) | (None, Some(source)) => Ok(source),
            (None, None) => Err(UNKNOWN_KEY),
        }
    }

    /// Whether any source has a webhook secret (a signature can verify at all).
    pub fn any_webhook_secret(&self) -> bool {
        self.list.iter().any(SourceAuth::has_webhook_secret)
    }

    /// The source whose webhook secret produced `signature_hex` over `body` (over its
    /// first element's raw bytes when it is a non-empty JSON array), among `candidates`
    /// (all sources, or the one a `/webhook/{source}` path names); the first in
    /// configuration order when several do.
    pub fn verify_signature<'a>(
        &'a self,
        candidates: Option<&'a SourceAuth>,
        body: &[u8],
        signature_hex: &str,
    ) -> Option<Verified<'a>> {
        let hex_part = signature_hex.trim();
        let hex_part = hex_part.strip_prefix("sha1=").unwrap_or(hex_part);
        let signature: [u8; SIGNATURE_BYTES] = hex::decode(hex_part).ok()?.try_into().ok()?;
        let signed = segment::first_array_element(body).unwrap_or(body);
        let mut found = None;
        let all: Vec<&SourceAuth> = match candidates {
            Some(one) => vec![one],
            None => self.list.iter().collect(),
        };
        for source in all {
            let Some(secret) = &source.webhook_secret else {
                continue;
            };
            let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(secret.expose().as_bytes()) else {
                continue;
            };
            mac.update(signed);
            if mac.verify_slice(&signature).is_ok() && found.is_none() {
                found = Some(source);
            }
        }
        found.map(|source| Verified { source, signature })
    }
}

/// The write key in an `Authorization: Basic` header: the user name, with or without the
/// trailing colon. Other schemes (Segment's OAuth `Bearer`) carry no write key.
pub fn basic_write_key(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let user = text.split_once(':').map_or(text.as_str(), |(user, _)| user);
    (!user.is_empty()).then(|| user.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    fn sources() -> Sources {
        Sources::new(&[
            SourceSettings {
                slug: "a".into(),
                write_keys: vec![Secret::new("key-a")],
                webhook_secret: Some(Secret::new("secret-a")),
                refiner_api_key: None,
                webhook_format: WebhookFormat::Classic,
            },
            SourceSettings {
                slug: "b".into(),
                write_keys: vec![Secret::new("key-b"), Secret::new("key-b2")],
                webhook_secret: None,
                refiner_api_key: None,
                webhook_format: WebhookFormat::Actions,
            },
        ])
    }

    fn basic(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let encoded = base64::engine::general_purpose::STANDARD.encode(value);
        headers.insert(
            AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}")).expect("header"),
        );
        headers
    }

    #[test]
    fn basic_user_name_with_or_without_colon() {
        assert_eq!(basic_write_key(&basic("key-a:")), Some("key-a".into()));
        assert_eq!(basic_write_key(&basic("key-a")), Some("key-a".into()));
        assert_eq!(basic_write_key(&basic(":pw")), None);
        assert_eq!(basic_write_key(&HeaderMap::new()), None);
    }

    #[test]
    fn resolves_keys_and_refuses_mismatches() {
        let sources = sources();
        assert_eq!(
            &*sources.authenticate(Some("key-b2"), None).expect("ok").slug,
            "b"
        );
        assert_eq!(
            &*sources.authenticate(None, Some("key-a")).expect("ok").slug,
            "a"
        );
        assert_eq!(
            &*sources
                .authenticate(Some("key-b"), Some("key-b2"))
                .expect("ok")
                .slug,
            "b"
        );
        assert_eq!(
            sources
                .authenticate(Some("key-a"), Some("key-b"))
                .expect_err("mismatch")
                .code(),
            "write_key_mismatch"
        );
        assert_eq!(
            sources
                .authenticate(Some("nope"), Some("key-a"))
                .expect_err("unknown")
                .code(),
            "unauthorized"
        );
        assert_eq!(
            sources.authenticate(None, None).expect_err("none").code(),
            "unauthorized"
        );
    }

    #[test]
    fn verifies_hmac_sha1_hex() {
        let sources = sources();
        let body = br#"{"type":"track"}"#;
        let mut mac = Hmac::<Sha1>::new_from_slice(b"secret-a").expect("mac");
        mac.update(body);
        let signature = hex::encode(mac.finalize().into_bytes());
        let verified = sources
            .verify_signature(None, body, &signature)
            .expect("valid");
        assert_eq!(&*verified.source.slug, "a");
        assert_eq!(hex::encode(verified.signature), signature);
        let upper = format!("sha1={}", signature.to_uppercase());
        assert!(sources.verify_signature(None, body, &upper).is_some());
        assert!(sources
            .verify_signature(None, b"tampered", &signature)
            .is_none());
        assert!(sources.verify_signature(None, body, "zz").is_none());
        assert!(sources
            .verify_signature(None, body, &signature[..38])
            .is_none());
        assert!(sources
            .verify_signature(sources.by_slug("b"), body, &signature)
            .is_none());
        // An array is verified over its first element's raw bytes.
        let array = format!(
            "[ {} ,{{\"type\":\"forged\"}}]",
            std::str::from_utf8(body).expect("utf-8")
        );
        let verified = sources
            .verify_signature(None, array.as_bytes(), &signature)
            .expect("first element");
        assert_eq!(&*verified.source.slug, "a");
    }
}
