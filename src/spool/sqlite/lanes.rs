//! Leasing from the embedded spool in O(batch): per-user lanes and a scan cursor.
//!
//! `events` has no index but its `seq`, so appends only write at the table's tail. A lease
//! must still skip the events of users it may not lease now (their earlier events are in
//! flight or wait for a retry) without walking them again and again: a held user with a
//! backlog of a million events would otherwise cost every lease a million rows.
//!
//! So every queued event is in exactly one of three places:
//! - **ahead of the cursor** (`seq > lease_cursor.seq`): not looked at by any lease yet;
//! - **leased**: in its user's lane, `lanes.leased`, while a batch holds it;
//! - **waiting**: in `waiting (user, seq)`, ordered per user, behind the cursor.
//!
//! A lane (one row per user with leased or waiting events, or a retry pending) says when
//! the user may be leased again (`ready_at`: 0 now, else the lease's end or the retry time)
//! and its oldest waiting event (`head`). A lease
//! 1. ends the lanes whose time has come (a lease that ran out puts its events back to
//!    waiting; a retry time that passed frees the user): `O(lanes due)`;
//! 2. takes ready lanes in the order of their oldest waiting event, a prefix of each
//!    user's waiting events (an index range per lane): `O(batch)`;
//! 3. reads on from the cursor: an event of a user without a lane is leased, one of a
//!    user with a lane goes to `waiting`; at most [`scan_limit`] rows, so a backlog of
//!    held users costs each event one move, once, never a rescan.
//!
//! Per-user order: a user's waiting events are older than those ahead of the cursor, and
//! a lane is leased only when nothing of it is in flight, from its oldest waiting event
//! on; a user's events ahead of the cursor are leased in the same lease only right after
//! all of its waiting ones. Entries of `waiting` whose event left the queue meanwhile (an
//! expired lease's event acked by its slow worker) are dropped when met.
//!
//! Nothing here is kept in memory: after a restart [`recover`] voids every lease (its
//! events wait again), so a killed process's batches are delivered again at once.

use std::collections::{HashMap, HashSet};

use rusqlite::{params, Connection, OptionalExtension};

use super::Leased;
use crate::segment::{EventType, HoldKey, UserKey};

/// The tables of the lanes (part of the spool's schema).
pub(super) const SCHEMA: &str = "
-- Users with events leased or waiting, or a retry pending: `user` is
-- `source || char(31) || user_key`; `ready_at` 0 means the user may be leased now,
-- otherwise not before then (its lease's end or its retry time); `head` is its oldest
-- waiting event (NULL when none); `leased` the seqs of its batch in flight (8-byte
-- little-endian each, NULL when none); `paused` 1 when `ready_at` is a paused source's
-- recheck time rather than a retry time (a restart lifts it).
CREATE TABLE IF NOT EXISTS lanes (
    user     TEXT    PRIMARY KEY,
    ready_at INTEGER NOT NULL,
    head     INTEGER,
    leased   BLOB,
    paused   INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS lanes_ready ON lanes (ready_at, head);
-- Queued events behind the cursor that are not leased, per user in queue order.
CREATE TABLE IF NOT EXISTS waiting (
    user TEXT    NOT NULL,
    seq  INTEGER NOT NULL,
    PRIMARY KEY (user, seq)
) WITHOUT ROWID;
-- The last `seq` a lease has looked at (one row).
CREATE TABLE IF NOT EXISTS lease_cursor (
    id  INTEGER PRIMARY KEY CHECK (id = 0),
    seq INTEGER NOT NULL
);
INSERT OR IGNORE INTO lease_cursor (id, seq) VALUES (0, 0);
";

/// The key of a user's lane: per source, like the dispatcher's per-user chains (the text
/// form of a [`HoldKey`]).
pub(super) fn lane_key(source: &str, user_key: &UserKey) -> String {
    HoldKey::text(source, user_key)
}

/// The source of a lane key.
pub(super) fn source_of(lane: &str) -> &str {
    HoldKey::source_of_text(lane)
}

/// The event type in column `index`, as [`EventType::as_str`] stored it.
pub(super) fn stored_kind(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<EventType> {
    let text: String = row.get(index)?;
    EventType::from_stored(&text).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Text,
            format!("unknown event type {text:?}").into(),
        )
    })
}

/// Rows a lease reads ahead of the cursor at most: enough to fill a batch when most rows
/// are leasable, and a bound on the work one lease does when most belong to held users
/// (4,096 rows: a few milliseconds of the writer).
pub(super) fn scan_limit(max: usize) -> usize {
    max.saturating_mul(4).max(4096)
}

fn encode(seqs: &[i64]) -> Vec<u8> {
    seqs.iter().flat_map(|seq| seq.to_le_bytes()).collect()
}

fn decode(blob: &[u8]) -> Vec<i64> {
    blob.chunks_exact(8)
        .map(|chunk| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(chunk);
            i64::from_le_bytes(bytes)
        })
        .collect()
}

const EVENT_COLUMNS: &str =
    "seq, source, message_id, kind, user_key, payload, attempts, received_at";

fn leased_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Leased> {
    Ok(Leased {
        seq: row.get(0)?,
        source: row.get(1)?,
        message_id: row.get(2)?,
        kind: stored_kind(row, 3)?,
        user_key: UserKey::from_stored(row.get::<_, String>(4)?),
        payload: row.get(5)?,
        attempts: row.get(6)?,
        received_at_ms: row.get(7)?,
    })
}

/// Leases up to `max` events for `lease_ms`; see the module header.
pub(super) fn lease(
    conn: &Connection,
    max: usize,
    lease_ms: i64,
    now: i64,
) -> rusqlite::Result<Vec<Leased>> {
    end_due_lanes(conn, now)?;
    let mut batch = Batch::default();
    take_ready_lanes(conn, max, &mut batch)?;
    scan_ahead(conn, max, &mut batch)?;
    let until = now + lease_ms;
    let mut hold = conn.prepare_cached(
        "INSERT INTO lanes (user, ready_at, head, leased) VALUES (?1, ?2, NULL, ?3)
         ON CONFLICT(user) DO UPDATE SET ready_at = excluded.ready_at, leased = excluded.leased",
    )?;
    for (user, seqs) in &batch.lanes {
        hold.execute(params![user, until, encode(seqs)])?;
    }
    let mut events = batch.events;
    events.sort_by_key(|event| event.seq);
    Ok(events)
}

/// What one lease has taken so far.
#[derive(Default)]
struct Batch {
    events: Vec<Leased>,
    /// Per user, the seqs leased, in order.
    lanes: HashMap<String, Vec<i64>>,
    /// Users of this lease with nothing left waiting: their events ahead of the cursor
    /// continue the prefix.
    open: HashSet<String>,
}

impl Batch {
    fn push(&mut self, user: &str, event: Leased) {
        self.lanes
            .entry(user.to_owned())
            .or_default()
            .push(event.seq);
        self.events.push(event);
    }
}

/// Lanes whose lease ran out or whose retry time passed: a lease's events wait again, and
/// the user may be leased now (or its lane goes, when nothing of it is queued).
fn end_due_lanes(conn: &Connection, now: i64) -> rusqlite::Result<()> {
    let due: Vec<String> = conn
        .prepare_cached("SELECT user FROM lanes WHERE ready_at > 0 AND ready_at <= ?1")?
        .query_map(params![now], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for user in due {
        end_lease(conn, &user, Until::Now)?;
    }
    Ok(())
}

/// When a user whose lease ends may be leased again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Until {
    /// Now.
    Now,
    /// At its failed event's retry time.
    Retry(i64),
    /// At its paused source's recheck time (lifted by a restart).
    Paused(i64),
}

/// Ends a user's lease: its leased events still queued wait again (oldest first, before
/// anything newer of the user), and the user may be leased from `until`. A lane with
/// nothing waiting and no wait is removed.
pub(super) fn end_lease(conn: &Connection, user: &str, until: Until) -> rusqlite::Result<()> {
    let lane: Option<Option<Vec<u8>>> = conn
        .prepare_cached("SELECT leased FROM lanes WHERE user = ?1")?
        .query_row(params![user], |row| row.get(0))
        .optional()?;
    if let Some(Some(blob)) = &lane {
        let mut back = conn.prepare_cached(
            "INSERT OR IGNORE INTO waiting (user, seq)
             SELECT ?1, seq FROM events WHERE seq = ?2",
        )?;
        for seq in decode(blob) {
            back.execute(params![user, seq])?;
        }
    }
    let head = head_of(conn, user)?;
    let (ready_at, paused) = match until {
        Until::Now => (0, false),
        Until::Retry(at) => (at, false),
        Until::Paused(at) => (at, true),
    };
    if head.is_none() && until == Until::Now {
        conn.prepare_cached("DELETE FROM lanes WHERE user = ?1")?
            .execute(params![user])?;
    } else {
        conn.prepare_cached(
            "INSERT INTO lanes (user, ready_at, head, leased, paused) VALUES (?1, ?2, ?3, NULL, ?4)
             ON CONFLICT(user) DO UPDATE SET ready_at = excluded.ready_at, head = excluded.head,
                                             leased = NULL, paused = excluded.paused",
        )?
        .execute(params![user, ready_at, head, paused])?;
    }
    Ok(())
}

fn head_of(conn: &Connection, user: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT min(seq) FROM waiting WHERE user = ?1")?
        .query_row(params![user], |row| row.get(0))
}

/// Takes ready lanes, oldest waiting event first, and from each a prefix of its waiting
/// events: an even share of `max` per lane, then what the others left.
fn take_ready_lanes(conn: &Connection, max: usize, batch: &mut Batch) -> rusqlite::Result<()> {
    let ready: Vec<String> = conn
        .prepare_cached(
            "SELECT user FROM lanes WHERE ready_at = 0 AND head IS NOT NULL
             ORDER BY head LIMIT ?1",
        )?
        .query_map(params![max as i64], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    if ready.is_empty() {
        return Ok(());
    }
    let share = max.div_ceil(ready.len()).max(1);
    let mut more = Vec::with_capacity(ready.len());
    for user in &ready {
        let room = share.min(max - batch.events.len());
        more.push(take_waiting(conn, user, room, batch)?);
    }
    for (user, more) in ready.iter().zip(more.iter_mut()) {
        let room = max - batch.events.len();
        if *more && room > 0 {
            *more = take_waiting(conn, user, room, batch)?;
        }
    }
    for (user, more) in ready.into_iter().zip(more) {
        match (more, batch.lanes.contains_key(&user)) {
            // Taken whole: its events ahead of the cursor continue the prefix.
            (false, true) => {
                batch.open.insert(user);
            }
            // Every waiting entry was stale: nothing of the user is queued.
            (false, false) => {
                conn.prepare_cached("DELETE FROM lanes WHERE user = ?1")?
                    .execute(params![user])?;
            }
            // Still waiting (held by this lease, or left for the next one).
            (true, _) => {}
        }
    }
    Ok(())
}

/// Moves up to `room` of `user`'s oldest waiting events into the batch; true if more wait.
fn take_waiting(
    conn: &Connection,
    user: &str,
    room: usize,
    batch: &mut Batch,
) -> rusqlite::Result<bool> {
    if room == 0 {
        return Ok(true);
    }
    let seqs: Vec<i64> = conn
        .prepare_cached("SELECT seq FROM waiting WHERE user = ?1 ORDER BY seq LIMIT ?2")?
        .query_map(params![user, room as i64 + 1], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let more = seqs.len() > room;
    let mut read = conn.prepare_cached(&format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE seq = ?1"
    ))?;
    let mut unwait = conn.prepare_cached("DELETE FROM waiting WHERE user = ?1 AND seq = ?2")?;
    for seq in seqs.into_iter().take(room) {
        unwait.execute(params![user, seq])?;
        // A waiting entry whose event left the queue meanwhile is simply dropped.
        if let Some(event) = read.query_row(params![seq], leased_row).optional()? {
            batch.push(user, event);
        }
    }
    Ok(more)
}

/// Reads on from the cursor: leases the events of users without a lane (and continues
/// the users this lease took whole), moves the others to `waiting`.
fn scan_ahead(conn: &Connection, max: usize, batch: &mut Batch) -> rusqlite::Result<()> {
    let cursor: i64 = conn
        .prepare_cached("SELECT seq FROM lease_cursor WHERE id = 0")?
        .query_row([], |row| row.get(0))?;
    let mut select = conn.prepare_cached(&format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
    ))?;
    let mut rows = select.query(params![cursor, scan_limit(max) as i64])?;
    let mut has_lane = conn.prepare_cached("SELECT 1 FROM lanes WHERE user = ?1")?;
    let mut defer =
        conn.prepare_cached("INSERT OR IGNORE INTO waiting (user, seq) VALUES (?1, ?2)")?;
    let mut last = cursor;
    while let Some(row) = rows.next()? {
        let event = leased_row(row)?;
        let user = lane_key(&event.source, &event.user_key);
        let full = batch.events.len() >= max;
        if batch.open.contains(&user) {
            if full {
                batch.open.remove(&user);
                defer.execute(params![user, event.seq])?;
            } else {
                last = event.seq;
                batch.push(&user, event);
                continue;
            }
        } else if batch.lanes.contains_key(&user) || has_lane.exists(params![user])? {
            defer.execute(params![user, event.seq])?;
        } else if full {
            break;
        } else {
            batch.open.insert(user.clone());
            last = event.seq;
            batch.push(&user, event);
            continue;
        }
        last = event.seq;
    }
    drop(rows);
    if last != cursor {
        conn.prepare_cached("UPDATE lease_cursor SET seq = ?1 WHERE id = 0")?
            .execute(params![last])?;
    }
    Ok(())
}

/// At start-up: the process that held the leases is gone, so every leased event waits
/// again at once instead of when its lease would have run out, and a pause (a refused
/// key, perhaps corrected since) is lifted; retry times stay.
pub(super) fn recover(conn: &Connection) -> rusqlite::Result<()> {
    let stale: Vec<String> = conn
        .prepare("SELECT user FROM lanes WHERE leased IS NOT NULL OR paused = 1")?
        .query_map([], |row| row.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    for user in stale {
        end_lease(conn, &user, Until::Now)?;
    }
    Ok(())
}
