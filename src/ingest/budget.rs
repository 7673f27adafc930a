//! The global budget of request bytes in memory.
//!
//! Every byte an ingest request holds is reserved here before it is allocated: the body's
//! buffer as it grows while the body arrives, the buffer gzip inflates into, and then the
//! events parsed from it until the spool has stored them. A request that cannot reserve
//! what it needs is answered 503 with `Retry-After` at once, so the bytes all requests
//! hold together never pass `limits.body_budget_bytes`, whatever arrives (slow bodies,
//! many large ones, gzip bombs, unauthenticated floods). Only what actually arrived is
//! reserved: a `Content-Length` that announces 4 MiB and then trickles costs what has
//! trickled.
//!
//! Invariants:
//! - one eighth of the budget (the *small-body reserve*) is only handed to requests that
//!   hold at most [`SMALL_BODY_BYTES`] in all, so ordinary requests of a few kilobytes are
//!   still admitted while large bodies hold the rest;
//! - a [`Reservation`] returns everything it holds when dropped (answered, refused or
//!   abandoned by a disconnected client alike).

use std::sync::Arc;

use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::IngestError;

/// A request holding at most this many bytes may use the small-body reserve.
pub const SMALL_BODY_BYTES: usize = 64 * 1024;

/// The budget shared by every ingest request of one gateway.
pub struct BodyBudget {
    /// The part any request may reserve from.
    shared: Arc<Semaphore>,
    /// The small-body reserve.
    reserve: Arc<Semaphore>,
    capacity: usize,
    gauge: IntGauge,
}

impl BodyBudget {
    /// A budget of `capacity` bytes; `gauge` shows the bytes held.
    pub fn new(capacity: usize, gauge: IntGauge) -> BodyBudget {
        let reserve = capacity / 8;
        BodyBudget {
            shared: Arc::new(Semaphore::new(capacity - reserve)),
            reserve: Arc::new(Semaphore::new(reserve)),
            capacity,
            gauge,
        }
    }

    /// An empty reservation for one request.
    pub fn reservation(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: self.clone(),
            shared: None,
            reserve: None,
        }
    }

    /// Bytes held by all reservations now.
    pub fn held(&self) -> usize {
        self.capacity - self.shared.available_permits() - self.reserve.available_permits()
    }

    fn show(&self) {
        self.gauge
            .set(i64::try_from(self.held()).unwrap_or(i64::MAX));
    }
}

/// The bytes one request holds of the budget.
pub struct Reservation {
    budget: Arc<BodyBudget>,
    shared: Option<OwnedSemaphorePermit>,
    reserve: Option<OwnedSemaphorePermit>,
}

fn held(permit: &Option<OwnedSemaphorePermit>) -> usize {
    permit.as_ref().map_or(0, OwnedSemaphorePermit::num_permits)
}

fn add(slot: &mut Option<OwnedSemaphorePermit>, permit: OwnedSemaphorePermit) {
    match slot {
        Some(held) => held.merge(permit),
        None => *slot = Some(permit),
    }
}

impl Reservation {
    /// Bytes this request holds.
    pub fn bytes(&self) -> usize {
        held(&self.shared) + held(&self.reserve)
    }

    /// Reserves `bytes` more, or answers [`IngestError::BodyBudgetExhausted`] without
    /// waiting (what was held before stays held).
    pub fn grow(&mut self, bytes: usize) -> Result<(), IngestError> {
        if bytes == 0 {
            return Ok(());
        }
        let count = u32::try_from(bytes).map_err(|_| IngestError::BodyBudgetExhausted)?;
        match self.budget.shared.clone().try_acquire_many_owned(count) {
            Ok(permit) => add(&mut self.shared, permit),
            Err(_) if self.bytes() + bytes <= SMALL_BODY_BYTES => {
                let permit = self
                    .budget
                    .reserve
                    .clone()
                    .try_acquire_many_owned(count)
                    .map_err(|_| IngestError::BodyBudgetExhausted)?;
                add(&mut self.reserve, permit);
            }
            Err(_) => return Err(IngestError::BodyBudgetExhausted),
        }
        self.budget.show();
        Ok(())
    }

    /// Returns `bytes` of what this request holds (the small-body reserve first, so that
    /// it is free again for others as early as possible).
    pub fn release(&mut self, bytes: usize) {
        let mut left = bytes.min(self.bytes());
        for slot in [&mut self.reserve, &mut self.shared] {
            let take = left.min(held(slot));
            if take == 0 {
                continue;
            }
            if take == held(slot) {
                *slot = None;
            } else if let Some(permit) = slot.as_mut() {
                drop(permit.split(take));
            }
            left -= take;
        }
        self.budget.show();
    }

    /// Holds exactly `bytes` from now on: grows, or returns the difference.
    pub fn resize(&mut self, bytes: usize) -> Result<(), IngestError> {
        let now = self.bytes();
        if bytes > now {
            self.grow(bytes - now)
        } else {
            self.release(now - bytes);
            Ok(())
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.shared = None;
        self.reserve = None;
        self.budget.show();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(capacity: usize) -> Arc<BodyBudget> {
        let gauge = IntGauge::new("test_budget_bytes", "test").expect("gauge");
        Arc::new(BodyBudget::new(capacity, gauge))
    }

    #[test]
    fn reservations_share_the_budget_and_return_it_when_dropped() {
        let budget = budget(8 * 1024 * 1024);
        let mut first = budget.reservation();
        first.grow(6 * 1024 * 1024).expect("fits");
        let mut second = budget.reservation();
        // 7 MiB are shared, 1 MiB is the small-body reserve.
        assert!(matches!(
            second.grow(2 * 1024 * 1024),
            Err(IngestError::BodyBudgetExhausted)
        ));
        assert_eq!(second.bytes(), 0);
        second.grow(1024 * 1024).expect("fits in the shared part");
        assert_eq!(budget.held(), 7 * 1024 * 1024);
        assert_eq!(budget.gauge.get(), 7 * 1024 * 1024);
        drop(first);
        assert_eq!(budget.held(), 1024 * 1024);
        second.resize(100).expect("shrinks");
        assert_eq!(second.bytes(), 100);
        drop(second);
        assert_eq!(budget.held(), 0);
        assert_eq!(budget.gauge.get(), 0);
    }

    #[test]
    fn the_small_body_reserve_admits_small_requests_only() {
        let budget = budget(8 * 1024 * 1024);
        let mut large = budget.reservation();
        large.grow(7 * 1024 * 1024).expect("the whole shared part");
        // A large body cannot dip into the reserve.
        let mut another = budget.reservation();
        assert!(another.grow(SMALL_BODY_BYTES + 1).is_err());
        // Small ones can, up to SMALL_BODY_BYTES each.
        let mut small = budget.reservation();
        small.grow(1000).expect("small");
        small.grow(SMALL_BODY_BYTES - 1000).expect("still small");
        assert!(small.grow(1).is_err());
        assert_eq!(small.bytes(), SMALL_BODY_BYTES);
        // Releasing returns the reserve first.
        large.release(1024);
        small.release(10);
        assert_eq!(
            budget.reserve.available_permits(),
            1024 * 1024 - SMALL_BODY_BYTES + 10
        );
    }
}
