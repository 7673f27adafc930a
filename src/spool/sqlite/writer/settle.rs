//! Settling a batch's outcome in the writer's transaction.
//!
//! Invariants:
//! - Each event leaves the queue at most once: an acked, skipped or dead-lettered `seq`
//!   that is no longer queued (settled before, or replayed and settled again) changes
//!   nothing and counts nothing.
//! - An event's attempts history is forgotten when it leaves for good (delivered or
//!   skipped) and kept when it becomes a dead letter, which shares its `seq`.
//! - Unless the settlement keeps its holds, every user it touched ends its lease: at once,
//!   at the latest retry time of its retried events, or at its pause (whichever is later).

use std::collections::{HashMap, HashSet};

use rusqlite::{params, OptionalExtension};

use super::Writer;
use crate::spool::admin::HOUR_MS;
use crate::spool::sqlite::admin::{self as admin_sql};
use crate::spool::sqlite::lanes::{self, source_of, Until};
use crate::spool::{DeadLetterRequest, Postponed, RetryAt, Settlement};

/// Removes a queued event and says whose it was (`source ␟ user`) and how often it was
/// attempted.
const DELETE_EVENT: &str =
    "DELETE FROM events WHERE seq = ?1 RETURNING source || char(31) || user_key, attempts";

const RETRY_EVENT: &str =
    "UPDATE events SET attempts = attempts + 1, next_attempt_at = ?2, last_error = ?3
     WHERE seq = ?1 RETURNING source || char(31) || user_key";

const USER_OF: &str = "SELECT source || char(31) || user_key FROM events WHERE seq = ?1";

/// Copies a queued event into `dead_letters`, with the user id and event name read from
/// its payload for the management API's search.
const BURY_EVENT: &str =
    "INSERT INTO dead_letters (source, message_id, kind, user_key, received_at, payload,
                               attempts, last_status, last_error, created_at, queue_seq,
                               user_id, event_name)
     SELECT source, message_id, kind, user_key, received_at, payload,
            attempts + ?2, ?3, ?4, ?5, seq,
            CASE WHEN json_valid(CAST(payload AS TEXT))
                 THEN coalesce(json_extract(CAST(payload AS TEXT), '$.userId'), '')
                 ELSE '' END,
            CASE WHEN json_valid(CAST(payload AS TEXT))
                 THEN coalesce(json_extract(CAST(payload AS TEXT), '$.event'),
                               json_extract(CAST(payload AS TEXT), '$.name'), '')
                 ELSE '' END
     FROM events WHERE seq = ?1";

/// The users a settlement touched, and when each may be leased again.
#[derive(Default)]
struct Users {
    /// Users whose lease ends (at once unless a retry or pause says later).
    touched: HashSet<String>,
    /// The latest retry time of each user with a retried event.
    retry: HashMap<String, i64>,
    /// The latest pause of each user with a postponed event.
    paused: HashMap<String, i64>,
}

impl Users {
    fn later(map: &mut HashMap<String, i64>, user: String, at: i64) {
        let entry = map.entry(user).or_insert(at);
        *entry = (*entry).max(at);
    }

    fn until(&self, user: &str) -> Until {
        match (self.retry.get(user), self.paused.get(user)) {
            (Some(&retry), Some(&pause)) if pause > retry => Until::Paused(pause),
            (Some(&retry), _) => Until::Retry(retry),
            (None, Some(&pause)) => Until::Paused(pause),
            (None, None) => Until::Now,
        }
    }
}

impl Writer {
    /// Applies a batch's outcome; see the module header.
    pub(super) fn settle(&mut self, settlement: &Settlement, now: i64) -> rusqlite::Result<()> {
        let hour = now.div_euclid(HOUR_MS);
        let mut users = Users::default();
        for seq in &settlement.acked {
            if let Some(source) = self.remove(*seq, &mut users)? {
                self.tally.count(&source, hour, "forwarded", 1);
            }
        }
        for skipped in &settlement.skipped {
            if let Some(source) = self.remove(skipped.seq, &mut users)? {
                *self
                    .tally
                    .skipped
                    .entry((source, hour, skipped.reason.clone()))
                    .or_default() += 1;
            }
        }
        self.retry(&settlement.retried, now, &mut users)?;
        for seq in &settlement.released {
            if let Some(user) = self.user_of(*seq)? {
                users.touched.insert(user);
            }
        }
        self.postpone(&settlement.postponed, &mut users)?;
        self.bury(&settlement.dead, now, &mut users)?;
        self.log.settled(&self.conn, settlement)?;
        if !settlement.keep_holds {
            let all: HashSet<&String> = users
                .touched
                .iter()
                .chain(users.retry.keys())
                .chain(users.paused.keys())
                .collect();
            for user in all {
                lanes::end_lease(&self.conn, user, users.until(user))?;
            }
        }
        Ok(())
    }

    /// Removes a queued event for good: its source's depth drops and its attempts are
    /// forgotten. Returns its source, or `None` if it was not queued.
    fn remove(&mut self, seq: i64, users: &mut Users) -> rusqlite::Result<Option<String>> {
        let removed = self
            .conn
            .prepare_cached(DELETE_EVENT)?
            .query_row(params![seq], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })
            .optional()?;
        let Some((user, attempts)) = removed else {
            return Ok(None);
        };
        if attempts > 0 {
            admin_sql::forget_attempts(&self.conn, seq)?;
        }
        let source = source_of(&user).to_string();
        self.tally.depth(&source, -1);
        users.touched.insert(user);
        Ok(Some(source))
    }

    /// Counts an attempt on each retried event and records it; its user waits until the
    /// latest retry time of its events.
    fn retry(&mut self, retried: &[RetryAt], now: i64, users: &mut Users) -> rusqlite::Result<()> {
        let hour = now.div_euclid(HOUR_MS);
        for r in retried {
            let error = match r.status {
                Some(status) => format!("{status}: {}", r.error),
                None => r.error.clone(),
            };
            let user = self
                .conn
                .prepare_cached(RETRY_EVENT)?
                .query_row(params![r.seq, r.next_attempt_at_ms, error], |row| {
                    row.get::<_, String>(0)
                })
                .optional()?;
            if let Some(user) = user {
                admin_sql::record_attempt(&self.conn, r.seq, now, r.status, &r.error)?;
                self.tally.count(source_of(&user), hour, "retried", 1);
                Users::later(&mut users.retry, user, r.next_attempt_at_ms);
            }
        }
        Ok(())
    }

    /// Postponed events stay as they are; their user waits for the source's recheck.
    fn postpone(&mut self, postponed: &[Postponed], users: &mut Users) -> rusqlite::Result<()> {
        for p in postponed {
            if let Some(user) = self.user_of(p.seq)? {
                Users::later(&mut users.paused, user, p.until_ms);
            }
        }
        Ok(())
    }

    /// Moves events to the dead letters, with their attempts history (recorded before the
    /// removal, which forgets attempts only of events that leave for good).
    fn bury(
        &mut self,
        dead: &[DeadLetterRequest],
        now: i64,
        users: &mut Users,
    ) -> rusqlite::Result<()> {
        let hour = now.div_euclid(HOUR_MS);
        for d in dead {
            let buried = self.conn.prepare_cached(BURY_EVENT)?.execute(params![
                d.seq,
                i64::from(d.attempted),
                d.status,
                d.error,
                now
            ])?;
            if buried == 0 {
                continue;
            }
            if d.attempted {
                admin_sql::record_attempt(&self.conn, d.seq, now, d.status, &d.error)?;
            }
            let user = self
                .conn
                .prepare_cached(DELETE_EVENT)?
                .query_row(params![d.seq], |row| row.get::<_, String>(0))
                .optional()?;
            if let Some(user) = user {
                let source = source_of(&user);
                self.tally.depth(source, -1);
                self.tally.count(source, hour, "dead_lettered", 1);
                users.touched.insert(user);
            }
        }
        Ok(())
    }

    fn user_of(&self, seq: i64) -> rusqlite::Result<Option<String>> {
        self.conn
            .prepare_cached(USER_OF)?
            .query_row(params![seq], |row| row.get::<_, String>(0))
            .optional()
    }
}
