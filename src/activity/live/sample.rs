//! The live feed's sampling: how many messages a second it passes on, which events'
//! outcomes follow them, and whose events skip the sample.
//!
//! Invariants:
//! - Every decision is a few atomic operations or one short lock; nothing allocates for a
//!   message that is not shown.
//! - Per kind ([`Budget`]), at most `per_second` messages pass in a wall-clock second; the
//!   count of those that did not is handed, once, to whoever opens the next second (the feed
//!   then tells its watchers).
//! - [`Shown`] remembers the last [`SHOWN_IDS`] events shown, so their outcomes are shown
//!   too: a watcher sees what became of the events it saw, however busy delivery is.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::segment::{Identity, UserKey};

/// Message ids of shown events remembered for their outcomes.
pub const SHOWN_IDS: usize = 4096;

/// A per-second budget of messages of one kind.
#[derive(Debug)]
pub struct Budget {
    per_second: u64,
    /// The wall-clock second (ms / 1000) the counts are of.
    second: AtomicI64,
    used: AtomicU64,
    skipped: AtomicU64,
}

/// What a budget decided for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub pass: bool,
    /// Messages skipped in the second just closed: non-zero at most once per second.
    pub skipped_before: u64,
}

impl Budget {
    pub fn new(per_second: u64) -> Budget {
        Budget {
            per_second,
            second: AtomicI64::new(i64::MIN),
            used: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
        }
    }

    /// Whether one more message passes at `now_ms`.
    pub fn admit(&self, now_ms: i64) -> Decision {
        let skipped_before = self.roll(now_ms.div_euclid(1000));
        let pass = self.used.fetch_add(1, Ordering::Relaxed) < self.per_second;
        if !pass {
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
        Decision {
            pass,
            skipped_before,
        }
    }

    /// Counts a message skipped without asking (its kind's budget was not consulted).
    pub fn skip(&self, now_ms: i64) -> u64 {
        let before = self.roll(now_ms.div_euclid(1000));
        self.skipped.fetch_add(1, Ordering::Relaxed);
        before
    }

    /// Opens `second` when it is new: the skipped count of the one before, to report.
    fn roll(&self, second: i64) -> u64 {
        let current = self.second.load(Ordering::Relaxed);
        if current >= second {
            return 0;
        }
        if self
            .second
            .compare_exchange(current, second, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            // Another caller opened it.
            return 0;
        }
        self.used.store(0, Ordering::Relaxed);
        self.skipped.swap(0, Ordering::Relaxed)
    }
}

/// The message ids of the last [`SHOWN_IDS`] events shown.
#[derive(Debug, Default)]
pub struct Shown {
    ids: Mutex<(HashSet<String>, VecDeque<String>)>,
}

impl Shown {
    pub fn insert(&self, id: &str) {
        let Ok(mut guard) = self.ids.lock() else {
            return;
        };
        let (set, order) = &mut *guard;
        if set.insert(id.to_string()) {
            order.push_back(id.to_string());
            if order.len() > SHOWN_IDS {
                if let Some(old) = order.pop_front() {
                    set.remove(&old);
                }
            }
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids.lock().is_ok_and(|guard| guard.0.contains(id))
    }
}

/// The users watchers filter on (`GET /api/live?user=`): their events skip the sample,
/// within a budget of their own.
#[derive(Debug, Clone, Default)]
pub struct Followed {
    users: Arc<RwLock<Vec<String>>>,
}

impl Followed {
    /// Follows `user` until the returned guard is dropped.
    pub fn follow(&self, user: &str) -> Following {
        if let Ok(mut users) = self.users.write() {
            users.push(user.to_string());
        }
        Following {
            users: self.users.clone(),
            user: user.to_string(),
        }
    }

    /// Whether the user behind `user_key` (its user id, email or anonymous id) is followed.
    pub fn covers(&self, user_key: &UserKey) -> bool {
        let Ok(users) = self.users.read() else {
            return false;
        };
        if users.is_empty() {
            return false;
        }
        let Some(value) = user_key.identity().map(Identity::value) else {
            return false;
        };
        users.iter().any(|u| u == value)
    }
}

/// A followed user, unfollowed on drop.
#[derive(Debug)]
pub struct Following {
    users: Arc<RwLock<Vec<String>>>,
    user: String,
}

impl Drop for Following {
    fn drop(&mut self) {
        if let Ok(mut users) = self.users.write() {
            if let Some(i) = users.iter().position(|u| *u == self.user) {
                users.swap_remove(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_passes_its_rate_and_reports_the_rest_once() {
        let budget = Budget::new(3);
        let passed = (0..10).filter(|_| budget.admit(5_000).pass).count();
        assert_eq!(passed, 3);
        let next = budget.admit(6_001);
        assert_eq!(
            next,
            Decision {
                pass: true,
                skipped_before: 7
            }
        );
        assert_eq!(budget.admit(6_002).skipped_before, 0);
        assert_eq!(budget.skip(6_003), 0);
        assert_eq!(budget.admit(7_000).skipped_before, 1);
    }

    #[test]
    fn shown_ids_are_bounded() {
        let shown = Shown::default();
        for i in 0..SHOWN_IDS + 10 {
            shown.insert(&format!("m{i}"));
        }
        assert!(!shown.contains("m0"));
        assert!(!shown.contains("m9"));
        assert!(shown.contains("m10"));
        assert!(shown.contains(&format!("m{}", SHOWN_IDS + 9)));
    }

    #[test]
    fn followed_users_last_as_long_as_their_guard() {
        let followed = Followed::default();
        let (u1, email) = (UserKey::user_id("u1"), UserKey::email("a@b.c"));
        assert!(!followed.covers(&u1));
        let guard = followed.follow("u1");
        let other = followed.follow("a@b.c");
        assert!(followed.covers(&u1));
        assert!(followed.covers(&email));
        assert!(!followed.covers(&UserKey::user_id("u2")));
        drop(guard);
        assert!(!followed.covers(&u1));
        drop(other);
        assert!(!followed.covers(&email));
    }
}
