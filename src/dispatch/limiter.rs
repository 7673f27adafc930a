//! Adaptive concurrency (AIMD) for Refiner calls.
//!
//! The limit starts at `initial` and stays within `[1, max]`. Every `limit` calls that
//! succeed without congestion raise it by one (additive increase); a 429, a timeout or a
//! call slower than the latency threshold halves it (multiplicative decrease), at most once
//! per `limit` calls so one burst of congestion does not collapse it to 1. Shrinking never
//! interrupts calls in flight: permits are retired as they come back.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

/// What a finished call tells the limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Answered in time and not throttled.
    Fine,
    /// Throttled (429), timed out or slow.
    Congested,
    /// Anything else (errors that say nothing about load).
    Neutral,
}

struct State {
    limit: usize,
    /// Permits to retire when they come back (after a decrease).
    debt: usize,
    fine_streak: usize,
    calls_since_decrease: usize,
}

pub struct Limiter {
    semaphore: Semaphore,
    state: Mutex<State>,
    max: usize,
    latency_threshold: Duration,
}

/// A slot for one call; give it back with [`Limiter::finish`].
pub struct Permit<'a> {
    permit: Option<SemaphorePermit<'a>>,
}

impl Limiter {
    pub fn new(initial: usize, max: usize, latency_threshold: Duration) -> Limiter {
        let max = max.max(1);
        let initial = initial.clamp(1, max);
        Limiter {
            semaphore: Semaphore::new(initial),
            state: Mutex::new(State {
                limit: initial,
                debt: 0,
                fine_streak: 0,
                calls_since_decrease: 0,
            }),
            max,
            latency_threshold,
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.state.lock().map(|s| s.limit).unwrap_or(1)
    }

    /// Waits for a free slot.
    pub async fn acquire(&self) -> Permit<'_> {
        // The semaphore is never closed, so acquiring cannot fail.
        Permit {
            permit: self.semaphore.acquire().await.ok(),
        }
    }

    /// Returns the slot and adapts the limit to how the call went.
    pub fn finish(&self, mut permit: Permit<'_>, signal: Signal, latency: Duration) {
        let signal = if signal == Signal::Fine && latency > self.latency_threshold {
            Signal::Congested
        } else {
            signal
        };
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        state.calls_since_decrease += 1;
        match signal {
            Signal::Congested if state.calls_since_decrease >= state.limit && state.limit > 1 => {
                let new_limit = (state.limit / 2).max(1);
                // Idle permits go at once; those in use are retired as they come back.
                let idle = self.semaphore.forget_permits(state.limit - new_limit);
                state.debt += state.limit - new_limit - idle;
                state.limit = new_limit;
                state.fine_streak = 0;
                state.calls_since_decrease = 0;
            }
            Signal::Fine => {
                state.fine_streak += 1;
                if state.fine_streak >= state.limit && state.limit < self.max {
                    state.fine_streak = 0;
                    state.limit += 1;
                    if state.debt > 0 {
                        state.debt -= 1;
                    } else {
                        self.semaphore.add_permits(1);
                    }
                }
            }
            _ => {}
        }
        if let Some(inner) = permit.permit.take() {
            if state.debt > 0 {
                state.debt -= 1;
                inner.forget();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn increases_additively_and_halves_on_congestion() {
        let limiter = Limiter::new(4, 8, Duration::from_secs(1));
        for _ in 0..4 {
            let p = limiter.acquire().await;
            limiter.finish(p, Signal::Fine, Duration::from_millis(1));
        }
        assert_eq!(limiter.limit(), 5);
        let p = limiter.acquire().await;
        limiter.finish(p, Signal::Congested, Duration::from_millis(1));
        assert_eq!(limiter.limit(), 2, "halved");
        let p = limiter.acquire().await;
        limiter.finish(p, Signal::Congested, Duration::from_millis(1));
        assert_eq!(limiter.limit(), 2, "at most one decrease per `limit` calls");
        // Slow calls count as congestion.
        let p = limiter.acquire().await;
        limiter.finish(p, Signal::Fine, Duration::from_secs(5));
        assert_eq!(limiter.limit(), 1);
        assert_eq!(limiter.semaphore.available_permits(), 1);
    }

    #[tokio::test]
    async fn never_exceeds_max() {
        let limiter = Limiter::new(2, 3, Duration::from_secs(1));
        for _ in 0..100 {
            let p = limiter.acquire().await;
            limiter.finish(p, Signal::Fine, Duration::from_millis(1));
        }
        assert_eq!(limiter.limit(), 3);
        assert_eq!(limiter.semaphore.available_permits(), 3);
    }
}
