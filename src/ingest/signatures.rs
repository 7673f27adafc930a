//! The signatures of accepted `actions` webhooks, remembered for the dedup window.
//!
//! Segment's Webhooks (Actions) destination signs only the first element of a batched
//! (array) body, and an unbatched body is that element alone. A signed request seen once
//! therefore signs any array that starts with the same bytes: `[captured, forged…]` would
//! carry a valid signature. The gateway remembers, per source, each accepted signature with
//! a digest of the body it came with, and refuses the signature with any other body (401
//! `signature_reused`). Segment's own retries send the same body and pass.
//!
//! Invariants:
//! - at most `capacity` signatures are remembered (about 100 bytes each); when full, the
//!   oldest is forgotten first, so under heavy webhook traffic a signature may be forgotten
//!   before its window ends;
//! - an entry expires `window` after it was first accepted (a repeat does not extend it),
//!   like the dedup window of `messageId`s;
//! - digests are compared in constant time; the lookup key is the signature, which the
//!   sender has shown to be valid, so its timing reveals nothing secret.
//!
//! The cache is per process: gateway nodes sharing a NATS spool each keep their own.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus::IntGauge;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The length of an HMAC-SHA1 signature.
pub const SIGNATURE_BYTES: usize = 20;

/// A signature as remembered: the source's position in the configuration and the MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    source: u32,
    signature: [u8; SIGNATURE_BYTES],
}

/// The first 16 bytes of the body's SHA-256: finding another body with the same prefix is
/// a 128-bit second preimage.
type BodyDigest = [u8; 16];

struct Seen {
    body: BodyDigest,
}

#[derive(Default)]
struct Entries {
    seen: HashMap<Key, Seen>,
    /// Keys in the order they were first accepted, with that time.
    order: VecDeque<(Instant, Key)>,
}

/// A known signature arrived with another body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reused;

/// The remembered signatures of one gateway.
pub struct SignatureCache {
    entries: Mutex<Entries>,
    window: Duration,
    capacity: usize,
    gauge: IntGauge,
}

fn digest(body: &[u8]) -> BodyDigest {
    let full = Sha256::digest(body);
    let mut prefix = [0u8; 16];
    prefix.copy_from_slice(&full[..16]);
    prefix
}

impl SignatureCache {
    /// Remembers up to `capacity` signatures for `window` each; `gauge` shows how many.
    pub fn new(capacity: usize, window: Duration, gauge: IntGauge) -> SignatureCache {
        SignatureCache {
            entries: Mutex::new(Entries::default()),
            window,
            capacity: capacity.max(1),
            gauge,
        }
    }

    /// Accepts `signature` of `source` with `body` when it is new (and remembers it) or was
    /// accepted with the same body; refuses it when it was accepted with another body.
    pub fn check(
        &self,
        source: usize,
        signature: &[u8; SIGNATURE_BYTES],
        body: &[u8],
        now: Instant,
    ) -> Result<(), Reused> {
        let key = Key {
            source: u32::try_from(source).unwrap_or(u32::MAX),
            signature: *signature,
        };
        let body = digest(body);
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        self.expire(&mut entries, now);
        let result = match entries.seen.get(&key) {
            Some(seen) if bool::from(seen.body.ct_eq(&body)) => Ok(()),
            Some(_) => Err(Reused),
            None => {
                if entries.seen.len() >= self.capacity {
                    if let Some((_, oldest)) = entries.order.pop_front() {
                        entries.seen.remove(&oldest);
                    }
                }
                entries.seen.insert(key, Seen { body });
                entries.order.push_back((now, key));
                Ok(())
            }
        };
        self.gauge
            .set(i64::try_from(entries.seen.len()).unwrap_or(i64::MAX));
        result
    }

    /// How many signatures are remembered.
    pub fn len(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .seen
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn expire(&self, entries: &mut Entries, now: Instant) {
        while let Some(&(at, key)) = entries.order.front() {
            if now.saturating_duration_since(at) < self.window {
                break;
            }
            entries.order.pop_front();
            entries.seen.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(capacity: usize, window_secs: u64) -> SignatureCache {
        let gauge = IntGauge::new("test_signatures", "test").expect("gauge");
        SignatureCache::new(capacity, Duration::from_secs(window_secs), gauge)
    }

    const A: [u8; 20] = [1; 20];
    const B: [u8; 20] = [2; 20];

    #[test]
    fn a_known_signature_passes_with_its_body_only() {
        let cache = cache(10, 60);
        let now = Instant::now();
        assert_eq!(cache.check(0, &A, b"{\"a\":1}", now), Ok(()));
        assert_eq!(cache.check(0, &A, b"{\"a\":1}", now), Ok(()));
        assert_eq!(
            cache.check(0, &A, b"[{\"a\":1},{\"b\":2}]", now),
            Err(Reused)
        );
        // Another source with the same MAC (the same secret) is another signature.
        assert_eq!(cache.check(1, &A, b"[{\"a\":1},{\"b\":2}]", now), Ok(()));
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.gauge.get(), 2);
    }

    #[test]
    fn entries_expire_with_the_window_and_repeats_do_not_extend_it() {
        let cache = cache(10, 60);
        let start = Instant::now();
        cache.check(0, &A, b"one", start).expect("new");
        cache
            .check(0, &A, b"one", start + Duration::from_secs(59))
            .expect("same body");
        assert_eq!(
            cache.check(0, &A, b"two", start + Duration::from_secs(59)),
            Err(Reused)
        );
        assert_eq!(
            cache.check(0, &A, b"two", start + Duration::from_secs(60)),
            Ok(())
        );
    }

    #[test]
    fn the_oldest_signature_is_forgotten_when_full() {
        let cache = cache(2, 3600);
        let now = Instant::now();
        cache.check(0, &A, b"a", now).expect("new");
        cache.check(0, &B, b"b", now).expect("new");
        let c = [3u8; 20];
        cache.check(0, &c, b"c", now).expect("new");
        assert_eq!(cache.len(), 2);
        // A was forgotten; B and C are still known.
        assert_eq!(cache.check(0, &B, b"x", now), Err(Reused));
        assert_eq!(cache.check(0, &c, b"x", now), Err(Reused));
        assert_eq!(cache.check(0, &A, b"x", now), Ok(()));
    }
}
