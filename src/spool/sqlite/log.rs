//! The embedded spool's delivery log (see [`crate::spool::delivery_log`]): one table
//! written by the writer in the queue's own transactions, read by the readers.
//!
//! Invariants:
//! - A record is written in the transaction that appends its event, updated in the one
//!   that settles it, so the log adds rows to the writer's groups but never a commit or an
//!   fsync of its own.
//! - `bytes` of a record is what it accounts for the budget; the sum over the table is kept
//!   in `meta` (`delivery_log_bytes`) in the same transactions, so the budget is checked
//!   without a scan.
//! - Retention removes a prefix of the table (oldest `id`s) per transaction, at most
//!   [`prune_chunk`] rows, and only while the head is too old or the total is over budget:
//!   `O(rows removed)`, never a scan of what is kept.
//! - The table has no index on a random key: rows go in `id` order, and lookups by message
//!   id, user id or email read the chunks whose filters admit the key ([`log_chunks`]).

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension};

use super::log_chunks::{self, Field, OpenChunk, RowKeys};
use crate::spool::delivery_log::{
    AttemptView, CallView, DeliveryLogOptions, EventFacts, EventState, LogKey, LogQuery, LogSize,
    LoggedEvent, RefusedEntry, RECORD_OVERHEAD,
};
use crate::spool::Settlement;

/// The log's table (part of the spool's schema; see `schema.rs`'s migrations).
pub(super) const SCHEMA: &str = "
-- One row per accepted or refused event; `seq` is the queue's (NULL when refused).
-- `attempts` and `calls` are JSON arrays; `bytes` is what the row counts for the budget.
CREATE TABLE IF NOT EXISTS delivery_log (
    id          INTEGER PRIMARY KEY,
    seq         INTEGER,
    source      TEXT    NOT NULL,
    message_id  TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    event_name  TEXT,
    user_id     TEXT,
    email       TEXT,
    received_at INTEGER NOT NULL,
    state       TEXT    NOT NULL,
    reason      TEXT,
    payload     TEXT    NOT NULL,
    calls       TEXT    NOT NULL DEFAULT '[]',
    attempts    TEXT    NOT NULL DEFAULT '[]',
    bytes       INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS delivery_log_seq ON delivery_log (seq) WHERE seq IS NOT NULL;
";

const INSERT: &str = "INSERT INTO delivery_log
    (seq, source, message_id, kind, event_name, user_id, email, received_at, state, reason,
     payload, bytes)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)";

/// Adds an attempt (JSON, or NULL for none), sets the calls (when given), the state and
/// reason (when given) of a queued event's record.
const UPDATE: &str = "UPDATE delivery_log SET
    state = coalesce(?2, state),
    reason = coalesce(?3, reason),
    attempts = CASE WHEN ?4 IS NULL THEN attempts ELSE json_insert(attempts, '$[#]', json(?4)) END,
    calls = coalesce(?5, calls),
    bytes = bytes + ?6
    WHERE seq = ?1";

/// Rows removed per transaction at most: more than a group adds, so the log keeps up.
fn prune_chunk(added: usize) -> i64 {
    (added as i64 * 2).max(256)
}

/// The writer's side of the log.
pub(super) struct LogBook {
    options: DeliveryLogOptions,
    /// Accounted bytes of the table (as in `meta`, plus this transaction's changes).
    bytes: i64,
    /// Rows added in this transaction.
    added: usize,
    changed: bool,
    /// `received_at` of the oldest row, `None` when the table is empty.
    head_at: Option<i64>,
    /// The lookup filter of the rows since the last sealed chunk.
    chunk: OpenChunk,
}

impl LogBook {
    /// Reads the log's total from `meta` (kept by earlier transactions).
    pub(super) fn open(conn: &Connection, options: DeliveryLogOptions) -> rusqlite::Result<Self> {
        let bytes: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'delivery_log_bytes'",
                [],
                |row| row.get(0),
            )
            .optional()?;
        let head_at = conn
            .query_row(
                "SELECT received_at FROM delivery_log ORDER BY id LIMIT 1",
                [],
                |row| row.get(0),
            )
            .optional()?;
        Ok(LogBook {
            options,
            bytes: bytes.and_then(|b| b.parse().ok()).unwrap_or(0),
            added: 0,
            changed: false,
            head_at,
            chunk: OpenChunk::open(conn)?,
        })
    }

    pub(super) fn enabled(&self) -> bool {
        self.options.enabled
    }

    /// Records an appended event.
    pub(super) fn received(
        &mut self,
        conn: &Connection,
        seq: i64,
        source: &str,
        (message_id, kind): (&str, &str),
        facts: &EventFacts,
        received_at: i64,
    ) -> rusqlite::Result<()> {
        let bytes = RECORD_OVERHEAD as usize
            + facts.payload.len()
            + message_id.len()
            + facts.user_id.as_ref().map_or(0, String::len)
            + facts.email.as_ref().map_or(0, String::len)
            + facts.event.as_ref().map_or(0, String::len);
        conn.prepare_cached(INSERT)?.execute(params![
            seq,
            source,
            message_id,
            kind,
            facts.event,
            facts.user_id,
            facts.email,
            received_at,
            EventState::Queued.as_str(),
            Option::<String>::None,
            facts.payload,
            bytes as i64,
        ])?;
        let keys = RowKeys {
            source,
            message_id,
            user_id: facts.user_id.as_deref(),
            email: facts.email.as_deref(),
        };
        self.chunk.add(conn, conn.last_insert_rowid(), &keys)?;
        self.grew(bytes as i64, received_at);
        Ok(())
    }

    /// Records events refused at ingest.
    pub(super) fn refused(
        &mut self,
        conn: &Connection,
        entries: &[RefusedEntry],
    ) -> rusqlite::Result<()> {
        if !self.options.enabled {
            return Ok(());
        }
        for e in entries {
            let bytes =
                RECORD_OVERHEAD as usize + e.raw.len() + e.reason.len() + e.message_id.len();
            conn.prepare_cached(INSERT)?.execute(params![
                Option::<i64>::None,
                e.source,
                e.message_id,
                e.kind,
                Option::<String>::None,
                e.user_id,
                e.email,
                e.at_ms,
                EventState::Refused.as_str(),
                e.reason,
                e.raw,
                bytes as i64,
            ])?;
            let keys = RowKeys {
                source: &e.source,
                message_id: &e.message_id,
                user_id: e.user_id.as_deref(),
                email: e.email.as_deref(),
            };
            self.chunk.add(conn, conn.last_insert_rowid(), &keys)?;
            self.grew(bytes as i64, e.at_ms);
        }
        Ok(())
    }

    fn grew(&mut self, bytes: i64, at: i64) {
        self.bytes += bytes;
        self.added += 1;
        self.changed = true;
        self.head_at.get_or_insert(at);
    }

    /// Records a settlement's attempts and final states.
    pub(super) fn settled(&mut self, conn: &Connection, s: &Settlement) -> rusqlite::Result<()> {
        if !self.options.enabled {
            return Ok(());
        }
        let mut finals: HashMap<i64, (EventState, Option<&str>)> = HashMap::new();
        finals.extend(
            s.acked
                .iter()
                .map(|&seq| (seq, (EventState::Delivered, None))),
        );
        for k in &s.skipped {
            finals.insert(k.seq, (EventState::Skipped, Some(k.reason.as_str())));
        }
        for d in &s.dead {
            finals.insert(d.seq, (EventState::Dead, Some(d.error.as_str())));
        }
        let mut update = conn.prepare_cached(UPDATE)?;
        for note in &s.notes {
            let attempt = serde_json::to_string(&AttemptView::from(note)).unwrap_or_default();
            let calls = (!note.calls.is_empty())
                .then(|| serde_json::to_string(&note.calls).unwrap_or_default());
            let (state, reason) = match finals.remove(&note.seq) {
                Some((state, reason)) => (Some(state.as_str()), reason),
                None => (None, None),
            };
            let delta = attempt.len() + calls.as_ref().map_or(0, String::len);
            if update.execute(params![
                note.seq,
                state,
                reason,
                attempt,
                calls,
                delta as i64
            ])? > 0
            {
                self.bytes += delta as i64;
                self.changed = true;
            }
        }
        for (seq, (state, reason)) in finals {
            let delta = reason.map_or(0, str::len) as i64;
            let none: Option<String> = None;
            if update.execute(params![seq, state.as_str(), reason, none, none, delta])? > 0 {
                self.bytes += delta;
                self.changed = true;
            }
        }
        Ok(())
    }

    /// Ends the transaction's part of the log: removes what is past the retention (a
    /// bounded prefix) and stores the total.
    pub(super) fn finish(&mut self, conn: &Connection, now: i64) -> rusqlite::Result<()> {
        let cutoff = now - self.options.max_age.as_millis() as i64;
        let over = self.bytes - self.options.max_bytes as i64;
        let old = self.head_at.is_some_and(|at| at < cutoff);
        if over > 0 || old || !self.options.enabled && self.head_at.is_some() {
            self.prune(conn, cutoff, over)?;
        }
        if self.changed {
            conn.prepare_cached(
                "INSERT INTO meta (key, value) VALUES ('delivery_log_bytes', ?1)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![self.bytes.to_string()])?;
        }
        self.added = 0;
        self.changed = false;
        Ok(())
    }

    /// Removes the oldest rows while they are older than `cutoff` or the total is `over`
    /// budget (or all, in chunks, when the log is off).
    fn prune(&mut self, conn: &Connection, cutoff: i64, mut over: i64) -> rusqlite::Result<()> {
        let chunk = prune_chunk(self.added);
        let mut last = None;
        let mut freed = 0;
        {
            let mut head = conn.prepare_cached(
                "SELECT id, received_at, bytes FROM delivery_log ORDER BY id LIMIT ?1",
            )?;
            let mut rows = head.query(params![chunk])?;
            while let Some(row) = rows.next()? {
                let (id, at, bytes): (i64, i64, i64) = (row.get(0)?, row.get(1)?, row.get(2)?);
                if at >= cutoff && over <= 0 && self.options.enabled {
                    break;
                }
                over -= bytes;
                freed += bytes;
                last = Some(id);
            }
        }
        if let Some(last) = last {
            conn.prepare_cached("DELETE FROM delivery_log WHERE id <= ?1")?
                .execute(params![last])?;
            log_chunks::pruned(conn, last)?;
            self.bytes = (self.bytes - freed).max(0);
            self.changed = true;
        }
        self.head_at = conn
            .prepare_cached("SELECT received_at FROM delivery_log ORDER BY id LIMIT 1")?
            .query_row([], |row| row.get(0))
            .optional()?;
        if self.head_at.is_none() {
            self.bytes = 0;
        }
        Ok(())
    }
}

/// A source's records by one key, newest first, with the queue's state of those still
/// queued.
pub(super) fn find(
    conn: &Connection,
    query: &LogQuery,
    now: i64,
) -> rusqlite::Result<Vec<LoggedEvent>> {
    let (column, field, value) = match &query.key {
        LogKey::MessageId(v) => ("message_id", Field::MessageId, v),
        LogKey::UserId(v) => ("user_id", Field::UserId, v),
        LogKey::Email(v) => ("email", Field::Email, v),
    };
    let mut found = Vec::new();
    for (first, last) in log_chunks::candidates(conn, &query.source, field, value)? {
        let room = query.limit.saturating_sub(found.len());
        if room == 0 {
            break;
        }
        found.extend(read_range(
            conn,
            query,
            (column, value),
            (first, last),
            room,
            now,
        )?);
    }
    Ok(found)
}

/// The records of ids `first..=last` whose `column` is `value`, newest first, at most
/// `limit`.
fn read_range(
    conn: &Connection,
    query: &LogQuery,
    (column, value): (&str, &str),
    (first, last): (i64, i64),
    limit: usize,
    now: i64,
) -> rusqlite::Result<Vec<LoggedEvent>> {
    let sql = format!(
        "SELECT seq, source, message_id, kind, event_name, user_id, email, received_at, state,
                reason, payload, calls, attempts
         FROM delivery_log WHERE id BETWEEN ?1 AND ?2 AND source = ?3 AND {column} = ?4
         ORDER BY id DESC LIMIT ?5"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(
        params![first, last, query.source, value, limit as i64],
        |row| {
            let seq: Option<i64> = row.get(0)?;
            let state: String = row.get(8)?;
            let calls: String = row.get(11)?;
            let attempts: String = row.get(12)?;
            Ok((
                seq,
                LoggedEvent {
                    source: row.get(1)?,
                    message_id: row.get(2)?,
                    kind: row.get(3)?,
                    event: row.get(4)?,
                    user_id: row.get(5)?,
                    email: row.get(6)?,
                    received_at_ms: row.get(7)?,
                    state: EventState::parse(&state).unwrap_or(EventState::Queued),
                    next_attempt_at_ms: None,
                    reason: row.get(9)?,
                    payload: row.get(10)?,
                    calls: serde_json::from_str::<Vec<CallView>>(&calls).unwrap_or_default(),
                    attempts: serde_json::from_str::<Vec<AttemptView>>(&attempts)
                        .unwrap_or_default(),
                },
            ))
        },
    )?;
    let mut found = Vec::new();
    for row in rows {
        let (seq, mut event) = row?;
        if let (EventState::Queued, Some(seq)) = (event.state, seq) {
            queue_state(conn, seq, now, &mut event)?;
        }
        found.push(event);
    }
    Ok(found)
}

/// The state of a queued event from the queue: leased (in its user's lease), retrying
/// (an attempt failed and its retry time is ahead), else queued.
fn queue_state(
    conn: &Connection,
    seq: i64,
    now: i64,
    event: &mut LoggedEvent,
) -> rusqlite::Result<()> {
    let row = conn
        .prepare_cached(
            "SELECT e.attempts, e.next_attempt_at, l.leased FROM events e
             LEFT JOIN lanes l ON l.user = e.source || char(31) || e.user_key
             WHERE e.seq = ?1",
        )?
        .query_row(params![seq], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, Option<Vec<u8>>>(2)?,
            ))
        })
        .optional()?;
    let Some((attempts, next_attempt_at, leased)) = row else {
        return Ok(());
    };
    let in_lease = leased.is_some_and(|blob| {
        blob.chunks_exact(8)
            .any(|c| c.try_into().map(i64::from_le_bytes).ok() == Some(seq))
    });
    if in_lease {
        event.state = EventState::Leased;
    } else if attempts > 0 && next_attempt_at > now {
        event.state = EventState::Retrying;
        event.next_attempt_at_ms = Some(next_attempt_at);
    }
    Ok(())
}

/// Rows and accounted bytes.
pub(super) fn size(conn: &Connection) -> rusqlite::Result<LogSize> {
    let records: i64 = conn.query_row(
        "SELECT coalesce(max(id) - min(id) + 1, 0) FROM delivery_log",
        [],
        |row| row.get(0),
    )?;
    let bytes: Option<String> = conn
        .query_row(
            "SELECT value FROM meta WHERE key = 'delivery_log_bytes'",
            [],
            |row| row.get(0),
        )
        .optional()?;
    Ok(LogSize {
        records: records.max(0) as u64,
        bytes: bytes.and_then(|b| b.parse().ok()).unwrap_or(0),
    })
}
