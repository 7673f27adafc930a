//! The circuit breaker: when Refiner keeps failing, stop sending and probe.
//!
//! Closed: every call goes. After `threshold` consecutive transient failures (5xx,
//! timeouts, connection errors — not 429, which the limiter handles, and not 4xx, which
//! prove Refiner is up) it opens for a cooldown that doubles with each failed probe (up to
//! 60 s). Open: no batch is leased, so events keep their attempts and their place. When the
//! cooldown is over, one worker leases a single event as a probe; its success closes the
//! breaker, its failure reopens it.
//!
//! Time is tokio's clock (outside a runtime it is the system's monotonic clock), so tests
//! run the cooldowns on a paused clock instead of sleeping.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// What a worker may do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Deliver normally.
    Go,
    /// Deliver one event as a probe.
    Probe,
    /// Wait this long and ask again.
    Wait(Duration),
}

struct State {
    failures: u32,
    open_until: Option<Instant>,
    cooldown: Duration,
    probing: bool,
}

pub struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    base: Duration,
}

const MAX_COOLDOWN: Duration = Duration::from_secs(60);

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            state: Mutex::new(State {
                failures: 0,
                open_until: None,
                cooldown,
                probing: false,
            }),
            threshold: threshold.max(1),
            base: cooldown,
        }
    }

    pub fn admit(&self) -> Admit {
        let Ok(mut state) = self.state.lock() else {
            return Admit::Go;
        };
        match state.open_until {
            None => Admit::Go,
            Some(until) => {
                let now = Instant::now();
                if now < until {
                    Admit::Wait(until - now)
                } else if state.probing {
                    Admit::Wait(Duration::from_millis(100))
                } else {
                    state.probing = true;
                    Admit::Probe
                }
            }
        }
    }

    /// Whether calls should be held back now (open and not probing).
    pub fn is_open(&self) -> bool {
        self.state
            .lock()
            .map(|s| s.open_until.is_some())
            .unwrap_or(false)
    }

    /// `closed`, `open` (cooling down) or `half_open` (its cooldown over: a probe may go).
    pub fn state_name(&self) -> &'static str {
        let Ok(state) = self.state.lock() else {
            return "closed";
        };
        match state.open_until {
            None => "closed",
            Some(until) if Instant::now() < until && !state.probing => "open",
            Some(_) => "half_open",
        }
    }

    /// A probe that found nothing to send, or whose event made no call, gives its turn
    /// back.
    pub fn probe_abandoned(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.probing = false;
        }
    }

    /// Records a call that reached Refiner and got an answer other than 5xx/429.
    pub fn success(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.failures = 0;
            state.open_until = None;
            state.probing = false;
            state.cooldown = self.base;
        }
    }

    /// Records a transient failure; returns true when it opened the breaker.
    pub fn failure(&self) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        state.failures = state.failures.saturating_add(1);
        if state.probing {
            state.probing = false;
            state.cooldown = (state.cooldown * 2).min(MAX_COOLDOWN);
            state.open_until = Some(Instant::now() + state.cooldown);
            return true;
        }
        if state.open_until.is_none() && state.failures >= self.threshold {
            state.open_until = Some(Instant::now() + state.cooldown);
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::time::advance;

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_and_closes_after_a_good_probe() {
        let breaker = Breaker::new(3, Duration::from_secs(20));
        assert_eq!(breaker.admit(), Admit::Go);
        assert!(!breaker.failure());
        assert!(!breaker.failure());
        assert!(breaker.failure());
        assert_eq!(breaker.admit(), Admit::Wait(Duration::from_secs(20)));
        advance(Duration::from_secs(19)).await;
        assert_eq!(breaker.admit(), Admit::Wait(Duration::from_secs(1)));
        advance(Duration::from_secs(1)).await;
        assert_eq!(breaker.admit(), Admit::Probe);
        assert!(
            matches!(breaker.admit(), Admit::Wait(_)),
            "only one probe at a time"
        );
        breaker.success();
        assert_eq!(breaker.admit(), Admit::Go);
        assert!(!breaker.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_doubles_the_cooldown_up_to_a_minute() {
        let breaker = Breaker::new(1, Duration::from_secs(10));
        assert!(breaker.failure());
        let mut cooldown = Duration::from_secs(10);
        for _ in 0..4 {
            advance(cooldown).await;
            assert_eq!(breaker.admit(), Admit::Probe);
            assert!(breaker.failure(), "a failed probe reopens");
            cooldown = (cooldown * 2).min(MAX_COOLDOWN);
            assert_eq!(breaker.admit(), Admit::Wait(cooldown));
        }
        assert_eq!(cooldown, MAX_COOLDOWN, "20 s, 40 s, then capped at 60 s");
        advance(cooldown).await;
        assert_eq!(breaker.admit(), Admit::Probe);
        breaker.success();
        assert!(
            breaker.failure(),
            "threshold 1: the next failure opens again"
        );
        assert_eq!(
            breaker.admit(),
            Admit::Wait(Duration::from_secs(10)),
            "a success resets the cooldown"
        );
    }
}
