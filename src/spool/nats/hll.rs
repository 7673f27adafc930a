//! A HyperLogLog sketch of distinct users, for the monthly tracked users (MTU) of the
//! JetStream spool, where several nodes count the same month and no node sees every user.
//!
//! Invariants:
//! - 2^14 registers of one byte (16 KiB per source and month, whatever the number of
//!   users); the standard error of the estimate is 1.04 / sqrt(2^14) ≈ 0.81 %. Below
//!   ~40,000 users the estimate is linear counting, which is exact in practice for small
//!   counts (a few users: the exact number).
//! - Merging is a register-wise maximum: commutative, associative and idempotent, so a
//!   node's sketch merged twice (a retried write) counts nobody twice.
//! - The hash is SHA-256 of the user key (its first 8 bytes), the same on every node and
//!   build.

use sha2::Digest;

/// Index bits: 2^14 registers.
const P: u32 = 14;
/// Registers.
pub const REGISTERS: usize = 1 << P;

/// A sketch: one rank per register.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hll {
    registers: Vec<u8>,
}

impl Default for Hll {
    fn default() -> Hll {
        Hll {
            registers: vec![0; REGISTERS],
        }
    }
}

impl Hll {
    /// A sketch from stored registers; `None` when they are not a sketch of this size.
    pub fn from_bytes(bytes: &[u8]) -> Option<Hll> {
        (bytes.len() == REGISTERS).then(|| Hll {
            registers: bytes.to_vec(),
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.registers
    }

    /// Counts `item`; true when the sketch changed.
    pub fn insert(&mut self, item: &str) -> bool {
        let digest = sha2::Sha256::digest(item.as_bytes());
        let mut word = [0u8; 8];
        word.copy_from_slice(&digest[..8]);
        let hash = u64::from_be_bytes(word);
        let index = (hash >> (64 - P)) as usize;
        // The rank of the remaining bits: position of their first 1 (a sentinel bit
        // bounds it at 64 - P + 1).
        let rest = (hash << P) | (1 << (P - 1));
        let rank = rest.leading_zeros() as u8 + 1;
        if self.registers[index] < rank {
            self.registers[index] = rank;
            true
        } else {
            false
        }
    }

    /// Register-wise maximum with `other`; true when the sketch changed.
    pub fn merge(&mut self, other: &Hll) -> bool {
        let mut changed = false;
        for (mine, theirs) in self.registers.iter_mut().zip(&other.registers) {
            if *theirs > *mine {
                *mine = *theirs;
                changed = true;
            }
        }
        changed
    }

    /// The estimated number of distinct items.
    pub fn estimate(&self) -> u64 {
        let m = REGISTERS as f64;
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let mut sum = 0.0;
        let mut zeros = 0usize;
        for &rank in &self.registers {
            sum += 2f64.powi(-i32::from(rank));
            if rank == 0 {
                zeros += 1;
            }
        }
        let raw = alpha * m * m / sum;
        let estimate = if raw <= 2.5 * m && zeros > 0 {
            m * (m / zeros as f64).ln()
        } else {
            raw
        };
        estimate.round() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_counts_are_exact_and_repeats_count_once() {
        let mut hll = Hll::default();
        assert_eq!(hll.estimate(), 0);
        for _ in 0..3 {
            for user in ["u:1", "u:2", "e:a@example.com"] {
                hll.insert(user);
            }
        }
        assert_eq!(hll.estimate(), 3);
        for i in 0..100 {
            hll.insert(&format!("u:{i}"));
        }
        assert_eq!(hll.estimate(), 101);
    }

    #[test]
    fn large_counts_are_within_three_standard_errors() {
        for n in [10_000u64, 100_000, 1_000_000] {
            let mut hll = Hll::default();
            for i in 0..n {
                hll.insert(&format!("u:user-{i}"));
            }
            let error = (hll.estimate() as f64 - n as f64).abs() / n as f64;
            assert!(error < 3.0 * 0.0081, "{n}: estimate {}", hll.estimate());
        }
    }

    #[test]
    fn merging_is_a_union_and_idempotent() {
        let (mut a, mut b) = (Hll::default(), Hll::default());
        for i in 0..5_000 {
            a.insert(&format!("u:{i}"));
        }
        for i in 2_500..7_500 {
            b.insert(&format!("u:{i}"));
        }
        let mut union = a.clone();
        union.merge(&b);
        let once = union.clone();
        assert!(
            !union.merge(&b),
            "merging the same sketch again changes nothing"
        );
        assert_eq!(union, once);
        let error = (union.estimate() as f64 - 7_500.0).abs() / 7_500.0;
        assert!(error < 0.03, "estimate {}", union.estimate());
        assert_eq!(Hll::from_bytes(union.as_bytes()), Some(union));
        assert_eq!(Hll::from_bytes(&[0; 3]), None);
    }
}
