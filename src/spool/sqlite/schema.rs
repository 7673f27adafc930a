//! The embedded spool's file: its tables, its version and migrations, and the pragmas of
//! the writer's and the readers' connections.
//!
//! Invariants:
//! - A file is at [`SCHEMA_VERSION`] once the writer's connection is open: a new file is
//!   created at it, an older one is brought to it by [`MIGRATIONS`] in one transaction with
//!   the rest of the set-up, so a failed migration leaves the file as it was.
//! - A file of a version this code does not know (newer, or not a spool) is refused with
//!   an error naming the file and both versions, before anything is written to it.
//! - Table and index creation is idempotent (`IF NOT EXISTS`), so opening is safe to
//!   repeat after a crash at any point.

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags};

use super::{dedup, lanes, log, log_chunks, now_ms};

/// The layout this code reads and writes (`PRAGMA user_version`).
pub(super) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64 + 1;

/// A step from one schema version to the next, run inside the set-up transaction.
type Migration = fn(&Connection) -> rusqlite::Result<()>;

/// `MIGRATIONS[i]` brings a file of version `i + 1` to version `i + 2`. To change the
/// schema: change [`SCHEMA`] for new files and append the step that brings existing files
/// to the same layout (a test opens a file of the previous version).
const MIGRATIONS: [Migration; 2] = [add_delivery_log, chunk_delivery_log];

/// Version 2: the delivery log's table and indexes.
fn add_delivery_log(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(log::SCHEMA)
}

/// Version 3: the delivery log's lookups by chunk filters instead of an index per key
/// (the existing rows are chunked when the writer opens the file).
fn chunk_delivery_log(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "DROP INDEX IF EXISTS delivery_log_message;
         DROP INDEX IF EXISTS delivery_log_user;
         DROP INDEX IF EXISTS delivery_log_email;",
    )?;
    conn.execute_batch(log_chunks::SCHEMA)
}

pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    -- AUTOINCREMENT: a seq is never reused, even once the queue is empty, so a late or
    -- repeated ack of a delivered event can never remove a newer one.
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    source          TEXT    NOT NULL,
    message_id      TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    user_key        TEXT    NOT NULL,
    received_at     INTEGER NOT NULL,
    payload         BLOB    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY,
    source      TEXT    NOT NULL,
    message_id  TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    user_key    TEXT    NOT NULL,
    received_at INTEGER NOT NULL,
    payload     BLOB    NOT NULL,
    attempts    INTEGER NOT NULL,
    last_status INTEGER,
    last_error  TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    queue_seq   INTEGER NOT NULL,
    -- From the payload, for listing, sorting and searching ('' when absent).
    user_id     TEXT    NOT NULL DEFAULT '',
    event_name  TEXT    NOT NULL DEFAULT ''
);
-- One index per listing order, so any page is an index range read.
CREATE INDEX IF NOT EXISTS dead_letters_source ON dead_letters (source, id);
CREATE INDEX IF NOT EXISTS dead_letters_created ON dead_letters (source, created_at, id);
CREATE INDEX IF NOT EXISTS dead_letters_received ON dead_letters (source, received_at, id);
CREATE INDEX IF NOT EXISTS dead_letters_attempts ON dead_letters (source, attempts, id);
CREATE INDEX IF NOT EXISTS dead_letters_kind ON dead_letters (source, kind, id);
CREATE INDEX IF NOT EXISTS dead_letters_event ON dead_letters (source, event_name, id);
CREATE INDEX IF NOT EXISTS dead_letters_user ON dead_letters (source, user_id, id);
CREATE INDEX IF NOT EXISTS dead_letters_message ON dead_letters (source, message_id, id);
-- Retention: expired dead letters are found by age across sources.
CREATE INDEX IF NOT EXISTS dead_letters_age ON dead_letters (created_at);
-- Delivery attempts of queued and dead events, by the event's queue seq.
CREATE TABLE IF NOT EXISTS event_attempts (
    id        INTEGER PRIMARY KEY,
    queue_seq INTEGER NOT NULL,
    at        INTEGER NOT NULL,
    status    INTEGER,
    error     TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS event_attempts_seq ON event_attempts (queue_seq);
-- Usage per source and calendar month (UTC): counts and when each last grew.
CREATE TABLE IF NOT EXISTS usage (
    source TEXT    NOT NULL,
    month  TEXT    NOT NULL,
    mtu    INTEGER NOT NULL DEFAULT 0,
    mtu_at INTEGER,
    mte    INTEGER NOT NULL DEFAULT 0,
    mte_at INTEGER,
    mpv    INTEGER NOT NULL DEFAULT 0,
    mpv_at INTEGER,
    PRIMARY KEY (source, month)
) WITHOUT ROWID;
-- The users counted in a month's `mtu` (only the current month's are kept).
CREATE TABLE IF NOT EXISTS usage_users (
    month    TEXT NOT NULL,
    source   TEXT NOT NULL,
    user_key TEXT NOT NULL,
    PRIMARY KEY (month, source, user_key)
) WITHOUT ROWID;
-- Hourly counters: received, duplicates, forwarded, skipped:<reason>, retried,
-- dead_lettered, replayed. `hour` is hours since the epoch.
CREATE TABLE IF NOT EXISTS event_counters (
    source TEXT    NOT NULL,
    hour   INTEGER NOT NULL,
    name   TEXT    NOT NULL,
    value  INTEGER NOT NULL,
    PRIMARY KEY (source, hour, name)
) WITHOUT ROWID;
-- Retention: old hours are found across sources. Only a new (source, hour, name) row
-- writes to it, a few per hour; counting into an existing row does not.
CREATE INDEX IF NOT EXISTS event_counters_hour ON event_counters (hour);
-- Queued (undelivered) events per source, kept with the queue in the same transactions.
CREATE TABLE IF NOT EXISTS queue_depth (
    source TEXT    PRIMARY KEY,
    depth  INTEGER NOT NULL
) WITHOUT ROWID;
-- When the spool first saw each configured source.
CREATE TABLE IF NOT EXISTS sources (
    slug       TEXT    PRIMARY KEY,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
";

/// No memory-mapped reads: mapped pages a connection has touched count in the process's
/// resident memory, and lookups in the dedup index touch more of it as the file grows, so
/// RSS crept up for as long as the gateway ran. Reads go through SQLite's bounded page cache
/// and the kernel's page cache (not resident in the process) instead; measured no slower.
const MMAP_BYTES: i64 = 0;
/// The writer's page cache, in KiB (SQLite's negative `cache_size`; its default 2 MiB):
/// bounded, and filled within seconds of traffic, so resident memory stays flat after it.
/// 16 MiB measured no faster.
const WRITER_CACHE_KIB: i64 = -2_000;
/// WAL pages after which a commit checkpoints them into the database file itself: a
/// backstop, since [`Checkpointer`](super::checkpointer::Checkpointer) checkpoints every 20 ms beside the writer. The WAL only
/// shrinks at a checkpoint, and a checkpoint needs room to grow the database file: an
/// interval of 8,192 pages let the WAL fill a small disk before any checkpoint, after which
/// nothing could be written, not even the checkpoint.
const WAL_CHECKPOINT_PAGES: i64 = 8000;

pub(super) fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.pragma_update(None, "mmap_size", MMAP_BYTES)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// Prepared statements the writer keeps: every statement of its append, lease, settle and
/// bookkeeping paths (about 40). rusqlite keeps 16 by default, which made the settle and
/// lease paths parse their SQL again on most calls.
const WRITER_STATEMENTS: usize = 64;

/// Opens the writer's connection: pragmas, the schema (created, or checked and migrated),
/// the configured sources, and the recovery of a previous process's leases.
pub(super) fn open_connection(path: &Path, sources: &[String]) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.set_prepared_statement_cache_capacity(WRITER_STATEMENTS);
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)?;
    conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
    conn.pragma_update(None, "mmap_size", MMAP_BYTES)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    in_transaction(&conn, |conn| set_up(conn, path, sources))?;
    // One process owns the file: leases held by a process that is gone (a crash) are void,
    // so their events are delivered again at once rather than after the lease expires.
    in_transaction(&conn, lanes::recover)?;
    Ok(conn)
}

/// Creates the tables of a new file, or checks an existing file's version and runs the
/// migrations from it; then registers the configured sources.
fn set_up(conn: &Connection, path: &Path, sources: &[String]) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let has_tables: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'events'",
        [],
        |row| row.get(0),
    )?;
    if has_tables {
        if !(1..=SCHEMA_VERSION).contains(&version) {
            return Err(rusqlite::Error::InvalidParameterName(format!(
                "{} has spool schema version {version}; this gateway reads versions 1 to \
                 {SCHEMA_VERSION}",
                path.display()
            )));
        }
        for migrate in &MIGRATIONS[(version - 1) as usize..] {
            migrate(conn)?;
        }
    }
    conn.execute_batch(SCHEMA)?;
    conn.execute_batch(dedup::SCHEMA)?;
    conn.execute_batch(lanes::SCHEMA)?;
    conn.execute_batch(log::SCHEMA)?;
    conn.execute_batch(log_chunks::SCHEMA)?;
    let mut known =
        conn.prepare("INSERT OR IGNORE INTO sources (slug, created_at) VALUES (?1, ?2)")?;
    for slug in sources {
        known.execute(params![slug, now_ms()])?;
    }
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)
}

fn in_transaction(
    conn: &Connection,
    work: impl FnOnce(&Connection) -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    match work(conn) {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}
