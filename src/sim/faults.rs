//! Fault injection for the simulator's `/v1` routes.
//!
//! Each call's fate is decided once, when it is received (after its body is read), so "the
//! next N calls" means the next N received, whatever their latency:
//! 1. **Latency** (`latency_ms`) is added to every `/v1` call, faulted or not, before it is
//!    answered (or dropped).
//! 2. **Counted faults** come first, in the fixed order drop, drop-after, 503, 500, 429: the
//!    first kind with a remaining count fires and uses up one of its count. One fault per call.
//! 3. Otherwise **rate faults**: one draw `u` in `[0, 1)` from a seeded xorshift64* generator is
//!    compared against the cumulative rates in the same order. The rates are disjoint slices of
//!    the draw, so each kind fires with its own probability while their sum is at most 1; past
//!    1, the kinds late in the order get whatever is left.
//! 4. Otherwise the call is handled normally.
//!
//! A faulted call is refused before authentication and changes no state, except
//! **drop-after**, which handles the call fully (state changes, status logged) and then drops
//! the connection instead of answering: the lost-acknowledgement case that makes a client
//! retry something that already happened.
//!
//! The draw sequence is a function of `seed` and of the calls that reached step 3, so a
//! single-connection client sees the same faults on every run.

use serde::{Deserialize, Serialize};

/// The fault configuration (and, while running, the remaining counts).
///
/// Field names are the CLI flags' names with `_` for `-`; `POST /_sim/faults` takes this
/// object (missing fields take the defaults below, unknown fields are refused).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every `/v1` call, in milliseconds.
    pub latency_ms: u64,
    /// Probability of answering 429 with `Retry-After: retry_after_secs`.
    pub rate_429: f64,
    /// The next N calls answer 429.
    pub count_429: u64,
    /// The `Retry-After` header of injected 429s (and 503s with `retry_after_on_503`), seconds.
    pub retry_after_secs: u64,
    /// Also put `Retry-After` on injected 503s.
    pub retry_after_on_503: bool,
    /// Probability of answering 500.
    pub rate_500: f64,
    /// The next N calls answer 500.
    pub count_500: u64,
    /// Probability of answering 503.
    pub rate_503: f64,
    /// The next N calls answer 503.
    pub count_503: u64,
    /// Probability of closing the connection without an answer (call not handled).
    pub rate_drop: f64,
    /// The next N calls are dropped without being handled.
    pub count_drop: u64,
    /// Probability of handling the call, then closing the connection without an answer.
    pub rate_drop_after: f64,
    /// The next N calls are handled, then dropped.
    pub count_drop_after: u64,
    /// The next N calls answer 401, as if the API key were refused (rotated or revoked).
    pub count_401: u64,
    /// The next N calls answer 400, as Refiner does for a call it refuses.
    pub count_400: u64,
    /// Seed of the rate faults' generator (0 is replaced by a fixed non-zero constant).
    pub seed: u64,
}

const DEFAULT_SEED: u64 = 0x9E37_79B9_7F4A_7C15;

impl Default for Faults {
    fn default() -> Self {
        Faults {
            latency_ms: 0,
            rate_429: 0.0,
            count_429: 0,
            retry_after_secs: 1,
            retry_after_on_503: false,
            rate_500: 0.0,
            count_500: 0,
            rate_503: 0.0,
            count_503: 0,
            rate_drop: 0.0,
            count_drop: 0,
            rate_drop_after: 0.0,
            count_drop_after: 0,
            count_401: 0,
            count_400: 0,
            seed: DEFAULT_SEED,
        }
    }
}

/// Why a fault configuration was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("`{field}` must be a probability between 0 and 1, got {value}")]
pub struct FaultsError {
    pub field: &'static str,
    pub value: f64,
}

impl Faults {
    /// No faults at all.
    pub fn none() -> Faults {
        Faults::default()
    }

    /// Checks that every rate is a probability.
    pub fn validate(&self) -> Result<(), FaultsError> {
        for (field, value) in [
            ("rate_429", self.rate_429),
            ("rate_500", self.rate_500),
            ("rate_503", self.rate_503),
            ("rate_drop", self.rate_drop),
            ("rate_drop_after", self.rate_drop_after),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(FaultsError { field, value });
            }
        }
        Ok(())
    }

    fn any_rate(&self) -> bool {
        self.rate_drop > 0.0
            || self.rate_drop_after > 0.0
            || self.rate_503 > 0.0
            || self.rate_500 > 0.0
            || self.rate_429 > 0.0
    }
}

/// A fault that fired on a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Fault {
    /// Closed without an answer; not handled.
    #[serde(rename = "drop")]
    Drop,
    /// Handled, then closed without an answer.
    #[serde(rename = "drop_after")]
    DropAfter,
    /// Answered 503.
    #[serde(rename = "503")]
    Unavailable,
    /// Answered 500.
    #[serde(rename = "500")]
    ServerError,
    /// Answered 429 with `Retry-After`.
    #[serde(rename = "429")]
    TooManyRequests,
    /// Answered 401: the key refused.
    #[serde(rename = "401")]
    Unauthorized,
    /// Answered 400: the call refused.
    #[serde(rename = "400")]
    BadRequest,
}

/// The order in which faults take precedence (see the module header).
const ORDER: [Fault; 5] = [
    Fault::Drop,
    Fault::DropAfter,
    Fault::Unavailable,
    Fault::ServerError,
    Fault::TooManyRequests,
];

/// What happens to one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub latency_ms: u64,
    pub fault: Option<Fault>,
    /// `Retry-After` seconds for an injected 429 (or 503 when configured).
    pub retry_after: Option<u64>,
}

/// Live fault state: the configuration with its remaining counts, and the generator.
#[derive(Debug, Clone)]
pub struct FaultPlan {
    faults: Faults,
    rng: XorShift64Star,
}

impl FaultPlan {
    pub fn new(faults: Faults) -> FaultPlan {
        FaultPlan {
            rng: XorShift64Star::new(faults.seed),
            faults,
        }
    }

    /// The configuration with the counts still to fire.
    pub fn current(&self) -> &Faults {
        &self.faults
    }

    /// Decides the fate of the call just received.
    pub fn decide(&mut self) -> Decision {
        let fault = self.take_count().or_else(|| self.draw_rate());
        let retry_after = match fault {
            Some(Fault::TooManyRequests) => Some(self.faults.retry_after_secs),
            Some(Fault::Unavailable) if self.faults.retry_after_on_503 => {
                Some(self.faults.retry_after_secs)
            }
            _ => None,
        };
        Decision {
            latency_ms: self.faults.latency_ms,
            fault,
            retry_after,
        }
    }

    fn take_count(&mut self) -> Option<Fault> {
        if self.faults.count_401 > 0 {
            self.faults.count_401 -= 1;
            return Some(Fault::Unauthorized);
        }
        if self.faults.count_400 > 0 {
            self.faults.count_400 -= 1;
            return Some(Fault::BadRequest);
        }
        for fault in ORDER {
            let count = match fault {
                Fault::Drop => &mut self.faults.count_drop,
                Fault::DropAfter => &mut self.faults.count_drop_after,
                Fault::Unavailable => &mut self.faults.count_503,
                Fault::ServerError => &mut self.faults.count_500,
                Fault::TooManyRequests => &mut self.faults.count_429,
                Fault::Unauthorized => &mut self.faults.count_401,
                Fault::BadRequest => &mut self.faults.count_400,
            };
            if *count > 0 {
                *count -= 1;
                return Some(fault);
            }
        }
        None
    }

    fn draw_rate(&mut self) -> Option<Fault> {
        if !self.faults.any_rate() {
            return None;
        }
        let u = self.rng.next_f64();
        let mut cumulative = 0.0;
        for fault in ORDER {
            cumulative += match fault {
                Fault::Drop => self.faults.rate_drop,
                Fault::DropAfter => self.faults.rate_drop_after,
                Fault::Unavailable => self.faults.rate_503,
                Fault::ServerError => self.faults.rate_500,
                Fault::TooManyRequests => self.faults.rate_429,
                Fault::Unauthorized | Fault::BadRequest => 0.0,
            };
            if u < cumulative {
                return Some(fault);
            }
        }
        None
    }
}

/// xorshift64* (Vigna): tiny, fast, and good enough to pick which calls fail.
#[derive(Debug, Clone)]
struct XorShift64Star(u64);

impl XorShift64Star {
    fn new(seed: u64) -> Self {
        XorShift64Star(if seed == 0 { DEFAULT_SEED } else { seed })
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)` from the top 53 bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_fire_in_precedence_order_then_stop() {
        let mut plan = FaultPlan::new(Faults {
            count_429: 1,
            count_500: 1,
            count_503: 1,
            count_drop: 1,
            count_drop_after: 1,
            ..Faults::none()
        });
        let fired: Vec<_> = (0..6).map(|_| plan.decide().fault).collect();
        assert_eq!(
            fired,
            vec![
                Some(Fault::Drop),
                Some(Fault::DropAfter),
                Some(Fault::Unavailable),
                Some(Fault::ServerError),
                Some(Fault::TooManyRequests),
                None
            ]
        );
    }

    #[test]
    fn rates_are_disjoint_slices_of_one_draw() {
        let mut plan = FaultPlan::new(Faults {
            rate_500: 0.25,
            rate_429: 0.25,
            seed: 42,
            ..Faults::none()
        });
        let n = 20_000;
        let (mut e500, mut e429) = (0, 0);
        for _ in 0..n {
            match plan.decide().fault {
                Some(Fault::ServerError) => e500 += 1,
                Some(Fault::TooManyRequests) => e429 += 1,
                None => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        for count in [e500, e429] {
            let share = count as f64 / n as f64;
            assert!((0.23..0.27).contains(&share), "share {share}");
        }
    }

    #[test]
    fn same_seed_same_sequence() {
        let faults = Faults {
            rate_503: 0.5,
            seed: 7,
            ..Faults::none()
        };
        let run =
            |mut plan: FaultPlan| -> Vec<_> { (0..64).map(|_| plan.decide().fault).collect() };
        assert_eq!(
            run(FaultPlan::new(faults.clone())),
            run(FaultPlan::new(faults))
        );
    }

    #[test]
    fn rates_outside_zero_one_are_refused() {
        let bad = Faults {
            rate_drop: 1.5,
            ..Faults::none()
        };
        assert_eq!(
            bad.validate(),
            Err(FaultsError {
                field: "rate_drop",
                value: 1.5
            })
        );
        assert!(Faults {
            rate_500: f64::NAN,
            ..Faults::none()
        }
        .validate()
        .is_err());
    }
}
