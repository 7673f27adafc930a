//! The dedup index's key of a source's message id, as stored in the spool.
//!
//! Invariants:
//! - [`dedup_key`] is stable across processes and versions: it is stored in `dedup/` run
//!   files and the `dedup_recent` table, so changing it would let repeats through.
//! - The keys are uniformly random 128-bit values, so [`PassThrough`] uses them as their
//!   own hash.

use std::hash::{BuildHasher, Hasher};

use sha2::{Digest, Sha256};

/// The dedup index's key of a source's message id: the first 128 bits of
/// SHA-256(`len(source)` as u32 LE ‖ source ‖ message id).
///
/// Stable across processes and versions (it is stored in the spool), the same length
/// for every id (a compact index with integer comparisons), and a collision between two
/// ids, which would drop the second as a repeat, is as likely as guessing a 128-bit value.
pub fn dedup_key(source: &str, message_id: &str) -> u128 {
    let mut hasher = Sha256::new();
    hasher.update((source.len() as u32).to_le_bytes());
    hasher.update(source.as_bytes());
    hasher.update(message_id.as_bytes());
    first_128(hasher)
}

/// The first 128 bits of a SHA-256 digest, big-endian: a stable, uniformly random key.
pub(super) fn first_128(hasher: Sha256) -> u128 {
    let digest = hasher.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(first)
}

/// A key as the two signed integers SQLite stores (`hi`, `lo`).
pub fn key_columns(key: u128) -> (i64, i64) {
    ((key >> 64) as u64 as i64, key as u64 as i64)
}

/// The keys are already uniformly random: the set uses them as their own hash.
#[derive(Debug, Clone, Copy, Default)]
pub struct PassThrough;

impl BuildHasher for PassThrough {
    type Hasher = PassThroughHasher;
    fn build_hasher(&self) -> PassThroughHasher {
        PassThroughHasher(0)
    }
}

#[derive(Debug, Default)]
pub struct PassThroughHasher(u64);

impl Hasher for PassThroughHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `u128` keys are hashed; fold anything else so the hasher stays total.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = (n as u64) ^ ((n >> 64) as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_keys_are_stable_and_unambiguous() {
        // Stored in the spool: a change here would let repeats through after an upgrade.
        assert_eq!(
            dedup_key("default", "m-1"),
            0xb600_e022_56da_adaa_569e_a39c_6608_c8d3,
            "{:x}",
            dedup_key("default", "m-1")
        );
        assert_ne!(dedup_key("ab", "c"), dedup_key("a", "bc"));
        let key = dedup_key("s", "m");
        let (hi, lo) = key_columns(key);
        assert_eq!((u128::from(hi as u64) << 64) | u128::from(lo as u64), key);
    }
}
