//! The embedded spool: one SQLite file in WAL mode.
//!
//! One writer thread owns the connection. Requests reach it through a bounded channel;
//! it takes every command waiting and runs them all in one transaction. The commit returns
//! without an fsync (`synchronous=NORMAL`); [`WalSync`] fsyncs the WAL on its own thread
//! and only then answers the group, so many requests share one fsync (group commit), the
//! flush overlaps the next group's work, and none is answered before its events are
//! durable. If the transaction fails (disk full, IO error), every command of the group gets
//! the error and nothing of it is kept.
//!
//! A full channel means the writer cannot keep up: appends fail fast with
//! [`SpoolError::Overloaded`] instead of queueing without bound.
//!
//! An append looks each `messageId` up in the dedup index (see [`super::dedup`]: a map in
//! memory and Bloom-filtered run files, so a fresh id costs no read), inserts the new events
//! at the tail of `events` and remembers their ids. Invariants: a dedup decision is final at
//! append, and an accepted event's id is in the dedup index (its `dedup_log` row or a run)
//! from the same commit on; the queue is in arrival order, except for replayed dead letters.
//!
//! Besides the queue, the same transactions keep the management API's bookkeeping (see
//! [`super::admin`]): usage per source and month (one `INSERT OR IGNORE` per distinct
//! identified user of a request, one upsert per source for the whole group), hourly event
//! counters and queue depth per source (one upsert per key for the whole group), and the
//! attempts history of retried and dead events. Reads for the API run on separate read-only
//! connections and never wait for the writer. Expired dead letters are pruned by the writer
//! every minute, a bounded chunk per transaction.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use super::admin::{
    month_of, CounterRow, DeadLetter, DeadLetterFilter, DeadLetterPage, DeadLetterQuery,
    ReplayReport, SourceUsage, HOUR_MS,
};
use super::checkpointer::Checkpointer;
use super::dedup::{self, DedupIndex, Tuning};
use super::inbound::{decode_events, dedup_key, key_columns, PassThrough};
use super::lanes::{self, source_of, Until};
use super::sqlite_admin::{self as admin_sql, Tally};
use super::wal_sync::WalSync;
use super::{AppendReport, AppendRequest, Leased, Settlement, Spool, SpoolError, SpoolStats};
use crate::segment::EventType;
use crate::telemetry::Metrics;

/// Settings of the embedded spool.
#[derive(Debug, Clone)]
pub struct SqliteSpoolOptions {
    /// Directory that holds `spool.db` (created if missing).
    pub data_dir: PathBuf,
    /// How long a `(source, messageId)` pair suppresses repeats.
    pub dedup_window: Duration,
    /// Requests that may wait for the writer before appends are refused as overload.
    pub queue_capacity: usize,
    /// Most commands that share one transaction.
    pub max_group: usize,
    /// How long dead letters are kept before the writer removes them.
    pub dead_letter_retention: Duration,
    /// How often the writer prunes expired dedup ids and dead letters (while it has work).
    pub prune_interval: Duration,
    /// The configured sources' slugs: the spool records when it first saw each.
    pub sources: Vec<String>,
    /// Ids the dedup index keeps in memory before writing them out as a run (see
    /// `dedup/mod.rs`); appends are refused as overload at four times as many.
    pub dedup_flush_ids: usize,
}

impl SqliteSpoolOptions {
    /// Defaults for a data directory: 24 h dedup window, 4,096 waiting requests, groups
    /// of up to 512 commands, dead letters kept 14 days, pruning every minute, dedup runs
    /// written every 131,072 ids.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        SqliteSpoolOptions {
            data_dir: data_dir.into(),
            dedup_window: Duration::from_secs(24 * 3600),
            queue_capacity: 4096,
            max_group: 512,
            dead_letter_retention: Duration::from_secs(14 * 24 * 3600),
            prune_interval: Duration::from_secs(60),
            sources: Vec::new(),
            dedup_flush_ids: 131_072,
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

enum Command {
    /// A request and its events' dedup keys (hashed by the caller, off the writer thread).
    Append(AppendRequest, Vec<u128>, Reply<AppendReport>),
    Lease {
        max: usize,
        lease_ms: i64,
        reply: Reply<Vec<Leased>>,
    },
    Settle(Settlement, Reply<()>),
    Probe(Reply<()>),
    Stats(Reply<SpoolStats>),
    /// Replay up to `limit` dead letters (one chunk).
    Replay {
        filter: DeadLetterFilter,
        limit: u64,
        reply: Reply<u64>,
    },
    /// Delete up to `limit` dead letters (one chunk).
    Delete {
        filter: DeadLetterFilter,
        limit: u64,
        reply: Reply<u64>,
    },
    Shutdown(oneshot::Sender<()>),
}

/// The SQLite-backed [`Spool`].
pub struct SqliteSpool {
    sender: mpsc::Sender<Command>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// `spool.db`, for the read connections.
    path: PathBuf,
    /// Idle read-only connections (the management API's reads).
    readers: Arc<Mutex<Vec<Connection>>>,
    closed: AtomicBool,
}

/// Idle read connections kept for reuse.
const MAX_IDLE_READERS: usize = 4;
/// Dead letters replayed per writer transaction: a large replay never stalls ingest long.
const REPLAY_CHUNK: u64 = 1_000;
/// Dead letters deleted per writer transaction.
const DELETE_CHUNK: u64 = 5_000;

const SCHEMA: &str = "
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
-- Requests accepted by a version 3 process but not yet sorted into `events` (layout in
-- `inbound.rs`); moved into `events` at start-up, so empty while the gateway runs.
CREATE TABLE IF NOT EXISTS inbound (
    id          INTEGER PRIMARY KEY,
    source      TEXT    NOT NULL,
    received_at INTEGER NOT NULL,
    -- When the spool accepted the request: the ids' `seen_at` in `dedup`.
    accepted_at INTEGER NOT NULL,
    count       INTEGER NOT NULL,
    ids         BLOB    NOT NULL,
    body        BLOB    NOT NULL
);
-- Inbound rows that could not be decoded (a damaged file), kept for inspection.
CREATE TABLE IF NOT EXISTS inbound_damaged (
    id          INTEGER PRIMARY KEY,
    source      TEXT    NOT NULL,
    received_at INTEGER NOT NULL,
    accepted_at INTEGER NOT NULL,
    count       INTEGER NOT NULL,
    ids         BLOB    NOT NULL,
    body        BLOB    NOT NULL
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

/// From version 1: dead letters gain `user_id` and `event_name`, filled from their payload.
const MIGRATE_FROM_1: &str = "
ALTER TABLE dead_letters ADD COLUMN user_id TEXT NOT NULL DEFAULT '';
ALTER TABLE dead_letters ADD COLUMN event_name TEXT NOT NULL DEFAULT '';
UPDATE dead_letters SET
    user_id = CASE WHEN json_valid(CAST(payload AS TEXT))
                   THEN coalesce(json_extract(CAST(payload AS TEXT), '$.userId'), '') ELSE '' END,
    event_name = CASE WHEN json_valid(CAST(payload AS TEXT))
                      THEN coalesce(json_extract(CAST(payload AS TEXT), '$.event'),
                                    json_extract(CAST(payload AS TEXT), '$.name'), '')
                      ELSE '' END;
";

impl SqliteSpool {
    /// Opens (or creates) the spool in `options.data_dir` and starts its writer thread.
    pub fn open(options: SqliteSpoolOptions, metrics: Metrics) -> Result<SqliteSpool, SpoolError> {
        std::fs::create_dir_all(&options.data_dir).map_err(|e| {
            SpoolError::Storage(format!(
                "cannot create data dir {}: {e}",
                options.data_dir.display()
            ))
        })?;
        let path = options.data_dir.join("spool.db");
        let conn = open_connection(&path, &options.sources).map_err(storage)?;
        let tuning = Tuning {
            flush_ids: options.dedup_flush_ids.max(1),
            max_memtable: options.dedup_flush_ids.max(1) * 4,
        };
        let dedup =
            DedupIndex::open(&conn, options.data_dir.join("dedup"), tuning).map_err(storage)?;
        let mut dedup = dedup;
        drain_inbound(&conn, &mut dedup, &metrics).map_err(storage)?;
        let checkpointer = Checkpointer::start(&path).map_err(storage)?;
        // From here on commits return without an fsync; `WalSync` makes them durable
        // before anyone is answered.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(storage)?;
        let release_metrics = metrics.clone();
        let sync = WalSync::start(&path, SYNC_QUEUE, move |result, batches: Vec<Committed>| {
            let error = result.err().map(|e| {
                release_metrics.spool_errors_total.inc();
                SpoolError::Storage(format!("the spool could not make a commit durable: {e}"))
            });
            for batch in batches {
                release_metrics
                    .spool_commit_seconds
                    .observe(batch.started.elapsed().as_secs_f64());
                match &error {
                    None => batch.pending.into_iter().for_each(Pending::succeed),
                    Some(e) => batch.pending.into_iter().for_each(|p| p.fail(e.clone())),
                }
            }
        })
        .map_err(|e| SpoolError::Storage(format!("cannot start the spool's sync thread: {e}")))?;
        let (sender, receiver) = mpsc::channel(options.queue_capacity.max(1));
        let writer = Writer::new(conn, options, metrics, dedup, checkpointer, sync);
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| SpoolError::Storage(format!("cannot start the spool writer: {e}")))?;
        Ok(SqliteSpool {
            sender,
            thread: Mutex::new(Some(thread)),
            path,
            readers: Arc::new(Mutex::new(Vec::new())),
            closed: AtomicBool::new(false),
        })
    }

    /// Runs `read` on a read-only connection on a blocking thread.
    async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, SpoolError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(SpoolError::Closed);
        }
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let idle = readers.lock().ok().and_then(|mut idle| idle.pop());
            let conn = match idle {
                Some(conn) => conn,
                None => open_reader(&path)?,
            };
            let result = read(&conn);
            if let Ok(mut idle) = readers.lock() {
                if idle.len() < MAX_IDLE_READERS {
                    idle.push(conn);
                }
            }
            result
        })
        .await
        .map_err(|e| SpoolError::Storage(format!("spool read task failed: {e}")))?
        .map_err(storage)
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .send(make(reply))
            .await
            .map_err(|_| SpoolError::Closed)?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }
}

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
/// backstop, since [`Checkpointer`] checkpoints every 20 ms beside the writer. The WAL only
/// shrinks at a checkpoint, and a checkpoint needs room to grow the database file: an
/// interval of 8,192 pages let the WAL fill a small disk before any checkpoint, after which
/// nothing could be written, not even the checkpoint.
const WAL_CHECKPOINT_PAGES: i64 = 8000;

fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
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

fn open_connection(path: &Path, sources: &[String]) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.set_prepared_statement_cache_capacity(WRITER_STATEMENTS);
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)?;
    conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
    conn.pragma_update(None, "mmap_size", MMAP_BYTES)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let has_tables: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'events'",
        [],
        |row| row.get(0),
    )?;
    let upgrade = has_tables && (1..SCHEMA_VERSION).contains(&version);
    if has_tables && version != SCHEMA_VERSION && !upgrade {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "{} has spool schema version {version}; this gateway reads version {SCHEMA_VERSION}",
            path.display()
        )));
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let setup = (|| {
        if has_tables && version == 1 {
            conn.execute_batch(MIGRATE_FROM_1)?;
        }
        let by_text = has_tables && (version == 1 || version == 2);
        if by_text {
            conn.execute_batch(
                "ALTER TABLE dedup RENAME TO dedup_by_text;
                 DROP INDEX IF EXISTS dedup_seen;
                 CREATE TABLE dedup (hi INTEGER NOT NULL, lo INTEGER NOT NULL,
                                     seen_at INTEGER NOT NULL,
                                     PRIMARY KEY (hi, lo)) WITHOUT ROWID;",
            )?;
        }
        conn.execute_batch(SCHEMA)?;
        conn.execute_batch(dedup::SCHEMA)?;
        conn.execute_batch(lanes::SCHEMA)?;
        if has_tables && version < 5 {
            migrate_holds_to_lanes(&conn)?;
        }
        if by_text {
            rekey_dedup(&conn)?;
        }
        if has_tables && version == 1 {
            conn.execute_batch(
                "INSERT INTO queue_depth (source, depth)
                 SELECT source, count(*) FROM events GROUP BY source",
            )?;
        }
        let mut known =
            conn.prepare("INSERT OR IGNORE INTO sources (slug, created_at) VALUES (?1, ?2)")?;
        for slug in sources {
            known.execute(params![slug, now_ms()])?;
        }
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)
    })();
    match setup {
        Ok(()) => conn.execute_batch("COMMIT")?,
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
    }
    // One process owns the file: leases held by a process that is gone (a crash) are void,
    // so their events are delivered again at once rather than after the lease expires.
    conn.execute_batch("BEGIN IMMEDIATE")?;
    match lanes::recover(&conn) {
        Ok(()) => conn.execute_batch("COMMIT")?,
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            return Err(e);
        }
    }
    Ok(conn)
}

/// Upgrading from version 4 or older: users held for a retry keep their retry time as a
/// lane; every queued event is ahead of the new lease cursor, so the first leases sort
/// them into lanes again.
fn migrate_holds_to_lanes(conn: &Connection) -> rusqlite::Result<()> {
    let has_holds: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'holds'",
        [],
        |row| row.get(0),
    )?;
    if !has_holds {
        return Ok(());
    }
    conn.execute(
        "INSERT INTO lanes (user, ready_at, head, leased)
         SELECT hold_key, retry_at, NULL, NULL FROM holds WHERE retry_at > ?1",
        params![now_ms()],
    )?;
    conn.execute_batch("DROP TABLE holds")
}

/// Upgrading from version 1 or 2: the dedup ids kept by text move to their 128-bit keys,
/// in version 3's `dedup` table (which [`DedupIndex::open`] then turns into a run).
fn rekey_dedup(conn: &Connection) -> rusqlite::Result<()> {
    let mut insert = conn.prepare(
        "INSERT INTO dedup (hi, lo, seen_at) VALUES (?1, ?2, ?3)
         ON CONFLICT(hi, lo) DO UPDATE SET seen_at = max(seen_at, excluded.seen_at)",
    )?;
    let mut select = conn.prepare("SELECT source, message_id, seen_at FROM dedup_by_text")?;
    let mut rows = select.query([])?;
    while let Some(row) = rows.next()? {
        let source: String = row.get(0)?;
        let message_id: String = row.get(1)?;
        let (hi, lo) = key_columns(dedup_key(&source, &message_id));
        insert.execute(params![hi, lo, row.get::<_, i64>(2)?])?;
    }
    drop(rows);
    drop((select, insert));
    conn.execute_batch("DROP TABLE dedup_by_text")
}

/// Queues one event (its `seq` is the next; `attempts` and `next_attempt_at` start at 0).
const INSERT_EVENT: &str =
    "INSERT INTO events (source, message_id, kind, user_key, received_at, payload)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// Rows of `inbound` per transaction when a version 3 file's leftovers are drained.
const DRAIN_CHUNK: i64 = 64;

/// Spool files of version 3 could hold accepted requests not yet sorted into the queue
/// (`inbound`, see `inbound.rs`): they are moved into `events` before the writer starts,
/// oldest first, their ids into the dedup index. A row that does not decode (a damaged
/// file) is moved to `inbound_damaged` for inspection.
fn drain_inbound(
    conn: &Connection,
    dedup: &mut DedupIndex,
    metrics: &Metrics,
) -> rusqlite::Result<()> {
    loop {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let moved = drain_chunk(conn, dedup, metrics).and_then(|moved| {
            dedup.write_log(conn)?;
            conn.execute_batch("COMMIT")?;
            Ok(moved)
        });
        match moved {
            Ok(moved) => {
                dedup.commit();
                if moved < DRAIN_CHUNK {
                    return Ok(());
                }
            }
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                dedup.rollback();
                return Err(e);
            }
        }
    }
}

fn drain_chunk(
    conn: &Connection,
    dedup: &mut DedupIndex,
    metrics: &Metrics,
) -> rusqlite::Result<i64> {
    let rows: Vec<(i64, String, i64, i64, i64, Vec<u8>)> = conn
        .prepare_cached(
            "SELECT id, source, received_at, accepted_at, count, body
             FROM inbound ORDER BY id LIMIT ?1",
        )?
        .query_map(params![DRAIN_CHUNK], |row| {
            Ok((
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut insert = conn.prepare_cached(INSERT_EVENT)?;
    for (id, source, received_at, accepted_at, count, body) in &rows {
        match decode_events(body) {
            Ok(events) => {
                for event in &events {
                    insert.execute(params![
                        source,
                        event.message_id,
                        event.kind.as_str(),
                        event.user_key,
                        received_at,
                        event.payload,
                    ])?;
                    dedup.remember(dedup_key(source, event.message_id), *accepted_at);
                }
            }
            Err(e) => {
                tracing::error!(inbound_id = id, error = %e, "moving an undecodable inbound row aside");
                metrics.spool_errors_total.inc();
                conn.execute(
                    "INSERT INTO inbound_damaged SELECT * FROM inbound WHERE id = ?1",
                    params![id],
                )?;
                conn.execute(
                    "UPDATE queue_depth SET depth = depth - ?2 WHERE source = ?1",
                    params![source, count],
                )?;
            }
        }
        conn.execute("DELETE FROM inbound WHERE id = ?1", params![id])?;
    }
    Ok(rows.len() as i64)
}

fn storage(e: rusqlite::Error) -> SpoolError {
    SpoolError::Storage(e.to_string())
}

/// The layout this code reads and writes (`PRAGMA user_version`); older files are upgraded
/// in place (version 3 added `inbound`, version 4 moved the dedup index from the `dedup`
/// table to `dedup_log`, `dedup_runs` and run files, version 5 replaced `holds` by the
/// lanes of [`lanes`]).
const SCHEMA_VERSION: i64 = 5;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[async_trait]
impl Spool for SqliteSpool {
    async fn append(&self, request: AppendRequest) -> Result<AppendReport, SpoolError> {
        let keys = request
            .events
            .iter()
            .map(|event| dedup_key(&request.source, &event.message_id))
            .collect();
        let (reply, answer) = oneshot::channel();
        self.sender
            .try_send(Command::Append(request, keys, reply))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SpoolError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => SpoolError::Closed,
            })?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }

    async fn lease(&self, max: usize, lease_ms: i64) -> Result<Vec<Leased>, SpoolError> {
        self.call(|reply| Command::Lease {
            max,
            lease_ms,
            reply,
        })
        .await
    }

    async fn settle(&self, settlement: Settlement) -> Result<(), SpoolError> {
        self.call(|reply| Command::Settle(settlement, reply)).await
    }

    async fn check_writable(&self) -> Result<(), SpoolError> {
        self.call(Command::Probe).await
    }

    async fn stats(&self) -> Result<SpoolStats, SpoolError> {
        self.call(Command::Stats).await
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Ok(mut idle) = self.readers.lock() {
            idle.clear();
        }
        let (done, finished) = oneshot::channel();
        if self.sender.send(Command::Shutdown(done)).await.is_ok() {
            let _ = finished.await;
        }
        let handle = self.thread.lock().ok().and_then(|mut slot| slot.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }

    async fn list_dead_letters(
        &self,
        query: DeadLetterQuery,
    ) -> Result<DeadLetterPage, SpoolError> {
        self.read(move |conn| admin_sql::list(conn, &query)).await
    }

    async fn dead_letter(&self, source: &str, id: i64) -> Result<Option<DeadLetter>, SpoolError> {
        let source = source.to_string();
        self.read(move |conn| admin_sql::get(conn, &source, id))
            .await
    }

    async fn replay_dead_letters(
        &self,
        mut filter: DeadLetterFilter,
        limit: Option<u64>,
    ) -> Result<ReplayReport, SpoolError> {
        // Bound the replay to the dead letters that exist now: events that fail again while
        // it runs get new ids and are not replayed again.
        if filter.max_id.is_none() {
            let bound = filter.clone();
            let (_, max_id) = self
                .read(move |conn| admin_sql::count_and_max_id(conn, &bound))
                .await?;
            match max_id {
                Some(max_id) => filter.max_id = Some(max_id),
                None => return Ok(ReplayReport::default()),
            }
        }
        let mut left = limit.unwrap_or(u64::MAX);
        let mut replayed = 0;
        while left > 0 {
            let chunk = left.min(REPLAY_CHUNK);
            let filter = filter.clone();
            let n = self
                .call(|reply| Command::Replay {
                    filter,
                    limit: chunk,
                    reply,
                })
                .await?;
            replayed += n;
            left -= n;
            if n < chunk {
                break;
            }
        }
        let (remaining, _) = self
            .read(move |conn| admin_sql::count_and_max_id(conn, &filter))
            .await?;
        Ok(ReplayReport {
            replayed,
            remaining,
        })
    }

    async fn delete_dead_letters(&self, filter: DeadLetterFilter) -> Result<u64, SpoolError> {
        let mut deleted = 0;
        loop {
            let filter = filter.clone();
            let n = self
                .call(|reply| Command::Delete {
                    filter,
                    limit: DELETE_CHUNK,
                    reply,
                })
                .await?;
            deleted += n;
            if n < DELETE_CHUNK {
                return Ok(deleted);
            }
        }
    }

    async fn usage(&self, source: &str, now_ms: i64) -> Result<SourceUsage, SpoolError> {
        let source = source.to_string();
        let month = month_of(now_ms);
        self.read(move |conn| admin_sql::usage(conn, &source, &month))
            .await
    }

    async fn counters(
        &self,
        source: &str,
        from_hour: i64,
        to_hour: i64,
    ) -> Result<Vec<CounterRow>, SpoolError> {
        let source = source.to_string();
        self.read(move |conn| admin_sql::counters(conn, &source, from_hour, to_hour))
            .await
    }
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    options: SqliteSpoolOptions,
    metrics: Metrics,
    last_prune: Instant,
    /// Counter increments of the transaction in progress.
    tally: Tally,
    /// The month of the last append, and the range of times it covers.
    month: (i64, i64, String),
    /// The ids accepted, for deduplication (this transaction's staged).
    dedup: DedupIndex,
    /// Checkpoints the WAL beside the writer.
    checkpointer: Checkpointer,
    /// Makes each commit durable (fsync of the WAL) before its commands are answered.
    sync: WalSync<Committed>,
    /// Users known to be in `usage_users` (this transaction's additions staged).
    counted: CountedUsers,
}

/// Users already in `usage_users` for a (source, month), so an append skips their
/// `INSERT OR IGNORE` (an index lookup per distinct user of every request otherwise).
/// Additions are staged until their transaction commits, so a rolled-back insert is never
/// taken for a counted user; a user not remembered only costs the lookup. Keys are 128-bit
/// hashes (random keys per process); the set is cleared when it reaches [`Self::MAX`].
#[derive(Default)]
struct CountedUsers {
    hashers: (RandomState, RandomState),
    known: HashSet<u128, PassThrough>,
    staged: Vec<u128>,
}

impl CountedUsers {
    const MAX: usize = 500_000;

    fn key(&self, source: &str, month: &str, user: &str) -> u128 {
        let high = self.hashers.0.hash_one((source, month, user));
        let low = self.hashers.1.hash_one((source, month, user));
        (u128::from(high) << 64) | u128::from(low)
    }

    fn contains(&self, key: u128) -> bool {
        self.known.contains(&key)
    }

    fn stage(&mut self, key: u128) {
        self.staged.push(key);
    }

    fn commit(&mut self) {
        if self.known.len() + self.staged.len() > Self::MAX {
            self.known = HashSet::default();
        }
        self.known.extend(self.staged.drain(..));
    }

    fn rollback(&mut self) {
        self.staged.clear();
    }
}

/// How often the writer looks for commands while the dedup index's background job runs
/// (it lands the job's result between transactions).
const IDLE_POLL: Duration = Duration::from_millis(2);

/// Committed groups waiting for their fsync; beyond this the writer waits for the disk.
const SYNC_QUEUE: usize = 4;

/// A committed group's answers, released by [`WalSync`] once the commit is durable.
struct Committed {
    pending: Vec<Pending>,
    started: Instant,
}

/// A command's result, held until the transaction commits.
enum Pending {
    Append(Reply<AppendReport>, AppendReport),
    /// An append refused as overload whatever the transaction's outcome.
    Refused(Reply<AppendReport>),
    Lease(Reply<Vec<Leased>>, Vec<Leased>),
    Unit(Reply<()>),
    Stats(Reply<SpoolStats>, SpoolStats),
    Count(Reply<u64>, u64),
}

impl Pending {
    fn fail(self, error: SpoolError) {
        // A dropped receiver means the caller gave up; there is nobody left to tell.
        match self {
            Pending::Append(reply, _) | Pending::Refused(reply) => drop(reply.send(Err(error))),
            Pending::Lease(reply, _) => drop(reply.send(Err(error))),
            Pending::Unit(reply) => drop(reply.send(Err(error))),
            Pending::Stats(reply, _) => drop(reply.send(Err(error))),
            Pending::Count(reply, _) => drop(reply.send(Err(error))),
        }
    }

    fn succeed(self) {
        match self {
            Pending::Append(reply, report) => drop(reply.send(Ok(report))),
            Pending::Refused(reply) => drop(reply.send(Err(SpoolError::Overloaded))),
            Pending::Lease(reply, leased) => drop(reply.send(Ok(leased))),
            Pending::Unit(reply) => drop(reply.send(Ok(()))),
            Pending::Stats(reply, stats) => drop(reply.send(Ok(stats))),
            Pending::Count(reply, n) => drop(reply.send(Ok(n))),
        }
    }
}

/// Rows removed per pruning statement, so one pass never stalls the writer for long.
const PRUNE_CHUNK: i64 = 20_000;
/// Expired dead letters removed per pruning transaction (each has index entries and
/// attempts to remove too).
const PRUNE_DEAD_CHUNK: i64 = 2_000;
/// Hourly counters are kept this many hours (400 days), then pruned.
const COUNTER_RETENTION_HOURS: i64 = 400 * 24;

impl Writer {
    fn new(
        conn: Connection,
        options: SqliteSpoolOptions,
        metrics: Metrics,
        dedup: DedupIndex,
        checkpointer: Checkpointer,
        sync: WalSync<Committed>,
    ) -> Writer {
        Writer {
            conn,
            options,
            metrics,
            last_prune: Instant::now(),
            tally: Tally::default(),
            month: (0, 0, String::new()),
            dedup,
            checkpointer,
            sync,
            counted: CountedUsers::default(),
        }
    }

    /// Keeps the staged changes of a committed transaction.
    fn committed(&mut self) {
        self.counted.commit();
        self.dedup.commit();
        self.metrics.spool_dedup_ids.set(self.dedup.ids() as i64);
        self.metrics
            .spool_dedup_memory_bytes
            .set(self.dedup.memory() as i64);
    }

    /// Forgets the staged changes of a transaction that rolled back.
    fn rolled_back(&mut self) {
        self.counted.rollback();
        self.dedup.rollback();
    }

    /// The next command, `None` once every sender is gone. While the dedup index's
    /// background job runs, the wait is cut into [`IDLE_POLL`] slices so its result
    /// lands without waiting for a command.
    fn next_command(&mut self, receiver: &mut mpsc::Receiver<Command>) -> Option<Command> {
        loop {
            if !self.dedup.busy() {
                return receiver.blocking_recv();
            }
            match receiver.try_recv() {
                Ok(command) => return Some(command),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            self.dedup.maintain(&self.conn, self.dedup_cutoff());
            if self.dedup.busy() {
                std::thread::sleep(IDLE_POLL);
            }
        }
    }

    /// `YYYY-MM` of `ms`, recomputed only when the month changes.
    fn month_of(&mut self, ms: i64) -> String {
        let (start, end, name) = &self.month;
        if ms >= *start && ms < *end {
            return name.clone();
        }
        let name = month_of(ms);
        let start = chrono::NaiveDate::parse_from_str(&format!("{name}-01"), "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc().timestamp_millis());
        let end = start.and_then(|start| {
            chrono::DateTime::from_timestamp_millis(start)
                .and_then(|t| t.checked_add_months(chrono::Months::new(1)))
                .map(|t| t.timestamp_millis())
        });
        if let (Some(start), Some(end)) = (start, end) {
            self.month = (start, end, name.clone());
        }
        name
    }

    /// Ids seen before this are no longer repeats.
    fn dedup_cutoff(&self) -> i64 {
        now_ms() - self.options.dedup_window.as_millis() as i64
    }

    fn run(mut self, mut receiver: mpsc::Receiver<Command>) {
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        while shutdown.is_none() {
            self.dedup.maintain(&self.conn, self.dedup_cutoff());
            let Some(first) = self.next_command(&mut receiver) else {
                break;
            };
            let mut group = vec![first];
            while group.len() < self.options.max_group {
                match receiver.try_recv() {
                    Ok(command) => group.push(command),
                    Err(_) => break,
                }
            }
            let mut commands = Vec::with_capacity(group.len());
            for command in group {
                match command {
                    Command::Shutdown(done) => shutdown = Some(done),
                    other => commands.push(other),
                }
            }
            if !commands.is_empty() {
                self.run_group(commands);
            }
            if self.last_prune.elapsed() >= self.options.prune_interval {
                self.prune_dedup();
                self.prune_bookkeeping();
            }
        }
        // Refuse whatever arrives from now on, answer what is already queued.
        receiver.close();
        let mut rest = Vec::new();
        while let Ok(command) = receiver.try_recv() {
            match command {
                Command::Shutdown(done) => {
                    let _ = done.send(());
                }
                other => rest.push(other),
            }
        }
        if !rest.is_empty() {
            self.run_group(rest);
        }
        // Every answer is released (durable) before the spool reports itself closed.
        self.sync.stop();
        self.dedup.close();
        self.checkpointer.stop();
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
            tracing::warn!(error = %e, "spool checkpoint on close failed");
        }
        if let Some(done) = shutdown {
            let _ = done.send(());
        }
    }

    /// Runs commands in one transaction and answers them after it commits.
    fn run_group(&mut self, commands: Vec<Command>) {
        let started = Instant::now();
        let count = commands.len();
        let mut pending = Vec::with_capacity(count);
        let result = self.execute_group(commands, &mut pending);
        match result {
            Ok(()) => {
                self.committed();
                self.metrics.spool_group_commands.observe(count as f64);
                if let Err(batch) = self.sync.submit(Committed { pending, started }) {
                    let error = SpoolError::Storage("the spool's sync thread stopped".into());
                    batch
                        .pending
                        .into_iter()
                        .for_each(|p| p.fail(error.clone()));
                }
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.rolled_back();
                tracing::error!(error = %e, commands = count, "spool transaction failed");
                self.metrics.spool_errors_total.inc();
                let error = storage(e);
                pending.into_iter().for_each(|p| p.fail(error.clone()));
            }
        }
    }

    fn execute_group(
        &mut self,
        commands: Vec<Command>,
        pending: &mut Vec<Pending>,
    ) -> rusqlite::Result<()> {
        // Commands that fail before the transaction's outcome is known still need an answer:
        // each one is pushed to `pending` before its work, and failed with the group.
        if self.sync.failed() {
            return Err(super::sqlite_io_error(
                "an fsync of the spool's WAL failed: restart the gateway".into(),
            ));
        }
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let now = now_ms();
        self.tally = Tally::default();
        let mut failure = None;
        for command in commands {
            let outcome = match command {
                Command::Append(_, _, reply) if self.dedup.is_full() => {
                    // The dedup index's memory is full until its background flush lands.
                    pending.push(Pending::Refused(reply));
                    Ok(())
                }
                Command::Append(request, keys, reply) => {
                    pending.push(Pending::Append(reply, AppendReport::default()));
                    self.append(&request, &keys, now).map(|report| {
                        if let Some(Pending::Append(_, slot)) = pending.last_mut() {
                            *slot = report;
                        }
                    })
                }
                Command::Lease {
                    max,
                    lease_ms,
                    reply,
                } => {
                    pending.push(Pending::Lease(reply, Vec::new()));
                    self.lease(max, lease_ms, now).map(|leased| {
                        if let Some(Pending::Lease(_, slot)) = pending.last_mut() {
                            *slot = leased;
                        }
                    })
                }
                Command::Settle(settlement, reply) => {
                    pending.push(Pending::Unit(reply));
                    self.settle(&settlement, now)
                }
                Command::Probe(reply) => {
                    pending.push(Pending::Unit(reply));
                    self.conn
                        .prepare_cached(
                            "INSERT INTO meta (key, value) VALUES ('probe', ?1)
                             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        )
                        .and_then(|mut stmt| stmt.execute(params![now.to_string()]))
                        .map(|_| ())
                }
                Command::Stats(reply) => {
                    pending.push(Pending::Stats(reply, SpoolStats::default()));
                    self.stats().map(|stats| {
                        if let Some(Pending::Stats(_, slot)) = pending.last_mut() {
                            *slot = stats;
                        }
                    })
                }
                Command::Replay {
                    filter,
                    limit,
                    reply,
                } => {
                    pending.push(Pending::Count(reply, 0));
                    admin_sql::replay_chunk(&self.conn, &filter, limit, now, &mut self.tally).map(
                        |n| {
                            if let Some(Pending::Count(_, slot)) = pending.last_mut() {
                                *slot = n;
                            }
                        },
                    )
                }
                Command::Delete {
                    filter,
                    limit,
                    reply,
                } => {
                    pending.push(Pending::Count(reply, 0));
                    admin_sql::delete_chunk(&self.conn, &filter, limit).map(|n| {
                        if let Some(Pending::Count(_, slot)) = pending.last_mut() {
                            *slot = n;
                        }
                    })
                }
                Command::Shutdown(done) => {
                    let _ = done.send(());
                    Ok(())
                }
            };
            if let Err(e) = outcome {
                failure = Some(e);
                break;
            }
        }
        if failure.is_none() {
            failure = self.dedup.write_log(&self.conn).err();
        }
        if failure.is_none() {
            let tally = std::mem::take(&mut self.tally);
            failure = tally.flush(&self.conn, now).err();
        }
        match failure {
            Some(e) => Err(e),
            None => self.conn.execute_batch("COMMIT"),
        }
    }

    /// Queues a request's new events; repeats (in the dedup index within the window,
    /// earlier in this transaction included) are counted, not kept.
    /// `keys[i]` is the [`dedup_key`] of event `i`.
    fn append(
        &mut self,
        request: &AppendRequest,
        keys: &[u128],
        now: i64,
    ) -> rusqlite::Result<AppendReport> {
        let cutoff = now - self.options.dedup_window.as_millis() as i64;
        let mut insert = self.conn.prepare_cached(INSERT_EVENT)?;
        let mut report = AppendReport::default();
        let mut views = 0;
        // Identified users of the request (`u:` and `e:` keys), for the month's MTU.
        let mut users: HashSet<&str> = HashSet::new();
        for (event, &key) in request.events.iter().zip(keys) {
            if self.dedup.is_repeat(key, cutoff)? {
                report.duplicates += 1;
                continue;
            }
            insert.execute(params![
                request.source,
                event.message_id,
                event.kind.as_str(),
                event.user_key,
                request.received_at_ms,
                event.payload,
            ])?;
            self.dedup.remember(key, now);
            report.queued += 1;
            if matches!(event.kind, EventType::Page | EventType::Screen) {
                views += 1;
            }
            let key = event.user_key.as_str();
            if key.starts_with("u:") || key.starts_with("e:") {
                users.insert(key);
            }
        }
        drop(insert);
        self.count_append(request, &report, views, &users)?;
        Ok(report)
    }

    /// Usage and counters of an append: one `INSERT OR IGNORE` per distinct identified user,
    /// the rest added to the transaction's tally.
    fn count_append(
        &mut self,
        request: &AppendRequest,
        report: &AppendReport,
        views: i64,
        users: &HashSet<&str>,
    ) -> rusqlite::Result<()> {
        let source = request.source.as_str();
        let hour = request.received_at_ms.div_euclid(HOUR_MS);
        self.tally
            .count(source, hour, "duplicates", report.duplicates as i64);
        if report.queued == 0 {
            return Ok(());
        }
        let month = self.month_of(request.received_at_ms);
        let mut new_users = 0;
        {
            let mut seen = self.conn.prepare_cached(
                "INSERT OR IGNORE INTO usage_users (month, source, user_key) VALUES (?1, ?2, ?3)",
            )?;
            for user in users {
                let key = self.counted.key(source, &month, user);
                if self.counted.contains(key) {
                    continue;
                }
                new_users += seen.execute(params![month, source, user])? as i64;
                self.counted.stage(key);
            }
        }
        let queued = report.queued as i64;
        self.tally.count(source, hour, "received", queued);
        self.tally.depth(source, queued);
        let delta = self
            .tally
            .usage
            .entry((source.to_string(), month))
            .or_default();
        delta.mtu += new_users;
        delta.mte += queued;
        delta.mpv += views;
        Ok(())
    }

    fn lease(&mut self, max: usize, lease_ms: i64, now: i64) -> rusqlite::Result<Vec<Leased>> {
        lanes::lease(&self.conn, max, lease_ms, now)
    }

    fn settle(&mut self, settlement: &Settlement, now: i64) -> rusqlite::Result<()> {
        let hour = now.div_euclid(HOUR_MS);
        // Users touched by this batch, and the retry time of those that must wait.
        let mut touched: HashSet<String> = HashSet::new();
        let mut waiting: HashMap<String, i64> = HashMap::new();
        let mut delete = self.conn.prepare_cached(
            "DELETE FROM events WHERE seq = ?1 RETURNING source || char(31) || user_key, attempts",
        )?;
        // Removes a queued event: its user is touched, its source's depth drops, and its
        // attempts (if it had any) are forgotten. Returns its source.
        let mut remove = |seq: i64,
                          touched: &mut HashSet<String>,
                          tally: &mut Tally|
         -> rusqlite::Result<Option<String>> {
            let Some((user, attempts)) = delete
                .query_row(params![seq], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                })
                .optional()?
            else {
                return Ok(None);
            };
            if attempts > 0 {
                admin_sql::forget_attempts(&self.conn, seq)?;
            }
            let source = source_of(&user).to_string();
            tally.depth(&source, -1);
            touched.insert(user);
            Ok(Some(source))
        };
        for seq in &settlement.acked {
            if let Some(source) = remove(*seq, &mut touched, &mut self.tally)? {
                self.tally.count(&source, hour, "forwarded", 1);
            }
        }
        for skipped in &settlement.skipped {
            if let Some(source) = remove(skipped.seq, &mut touched, &mut self.tally)? {
                *self
                    .tally
                    .skipped
                    .entry((source, hour, skipped.reason.clone()))
                    .or_default() += 1;
            }
        }
        let mut retry = self.conn.prepare_cached(
            "UPDATE events SET attempts = attempts + 1, next_attempt_at = ?2, last_error = ?3
             WHERE seq = ?1 RETURNING source || char(31) || user_key",
        )?;
        for r in &settlement.retried {
            let error = match r.status {
                Some(status) => format!("{status}: {}", r.error),
                None => r.error.clone(),
            };
            if let Some(user) = retry
                .query_row(params![r.seq, r.next_attempt_at_ms, error], |row| {
                    row.get::<_, String>(0)
                })
                .optional()?
            {
                admin_sql::record_attempt(&self.conn, r.seq, now, r.status, &r.error)?;
                self.tally.count(source_of(&user), hour, "retried", 1);
                let at = waiting.entry(user).or_insert(r.next_attempt_at_ms);
                *at = (*at).max(r.next_attempt_at_ms);
            }
        }
        let mut user_of = self
            .conn
            .prepare_cached("SELECT source || char(31) || user_key FROM events WHERE seq = ?1")?;
        for seq in &settlement.released {
            if let Some(user) = user_of
                .query_row(params![seq], |row| row.get::<_, String>(0))
                .optional()?
            {
                touched.insert(user);
            }
        }
        // Postponed events stay as they are; their user waits for the source's recheck.
        let mut paused: HashMap<String, i64> = HashMap::new();
        for postponed in &settlement.postponed {
            if let Some(user) = user_of
                .query_row(params![postponed.seq], |row| row.get::<_, String>(0))
                .optional()?
            {
                let at = paused.entry(user).or_insert(postponed.until_ms);
                *at = (*at).max(postponed.until_ms);
            }
        }
        let mut bury = self.conn.prepare_cached(
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
             FROM events WHERE seq = ?1",
        )?;
        for dead in &settlement.dead {
            let buried = bury.execute(params![
                dead.seq,
                i64::from(dead.attempted),
                dead.status,
                dead.error,
                now
            ])?;
            if buried == 0 {
                continue;
            }
            // The history goes with the dead letter (same `seq`): recorded before the
            // removal, which forgets attempts only of events that leave for good.
            if dead.attempted {
                admin_sql::record_attempt(&self.conn, dead.seq, now, dead.status, &dead.error)?;
            }
            if let Some(user) = delete
                .query_row(params![dead.seq], |row| row.get::<_, String>(0))
                .optional()?
            {
                let source = source_of(&user);
                self.tally.depth(source, -1);
                self.tally.count(source, hour, "dead_lettered", 1);
                touched.insert(user);
            }
        }
        if !settlement.keep_holds {
            let users: HashSet<&String> = touched
                .iter()
                .chain(waiting.keys())
                .chain(paused.keys())
                .collect();
            for user in users {
                let until = match (waiting.get(user), paused.get(user)) {
                    (Some(&retry), Some(&pause)) if pause > retry => Until::Paused(pause),
                    (Some(&retry), _) => Until::Retry(retry),
                    (None, Some(&pause)) => Until::Paused(pause),
                    (None, None) => Until::Now,
                };
                lanes::end_lease(&self.conn, user, until)?;
            }
        }
        Ok(())
    }

    fn stats(&mut self) -> rusqlite::Result<SpoolStats> {
        // The depth is kept per source in the queue's own transactions: reading it is
        // O(sources). Counting `events` scans the queue (2 s at 10 million events) on the
        // writer, which stalled ingest and `/readyz` behind every sample.
        let depth: i64 = self
            .conn
            .prepare_cached("SELECT coalesce(sum(depth), 0) FROM queue_depth")?
            .query_row([], |row| row.get(0))?;
        let oldest = admin_sql::oldest_received_at(&self.conn, None)?;
        let dead_letters: i64 = self
            .conn
            .prepare_cached("SELECT count(*) FROM dead_letters")?
            .query_row([], |row| row.get(0))?;
        Ok(SpoolStats {
            depth: depth.max(0) as u64,
            oldest_received_at_ms: oldest,
            dead_letters: dead_letters.max(0) as u64,
        })
    }

    /// Removes expired dead letters (with their attempts), the users of past months'
    /// usage, and hourly counters past their retention.
    fn prune_bookkeeping(&mut self) {
        let now = now_ms();
        let cutoff = now - self.options.dead_letter_retention.as_millis() as i64;
        loop {
            match admin_sql::prune_dead_letters(&self.conn, cutoff, PRUNE_DEAD_CHUNK) {
                Ok(n) if (n as i64) < PRUNE_DEAD_CHUNK => break,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "pruning expired dead letters failed");
                    break;
                }
            }
        }
        let month = self.month_of(now);
        let oldest_hour = now.div_euclid(HOUR_MS) - COUNTER_RETENTION_HOURS;
        for (sql, value) in [
            (
                "DELETE FROM usage_users WHERE (month, source, user_key) IN
                   (SELECT month, source, user_key FROM usage_users WHERE month < ?1 LIMIT ?2)",
                rusqlite::types::Value::Text(month),
            ),
            (
                "DELETE FROM event_counters WHERE (source, hour, name) IN
                   (SELECT source, hour, name FROM event_counters WHERE hour < ?1 LIMIT ?2)",
                rusqlite::types::Value::Integer(oldest_hour),
            ),
        ] {
            loop {
                match self.conn.execute(sql, params![value, PRUNE_CHUNK]) {
                    Ok(n) if (n as i64) < PRUNE_CHUNK => break,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "pruning usage and counters failed");
                        break;
                    }
                }
            }
        }
    }

    /// Deletes the dedup runs whose every id is older than the window (merges drop expired
    /// ids from the others).
    fn prune_dedup(&mut self) {
        self.last_prune = Instant::now();
        if let Err(e) = self.dedup.prune(&self.conn, self.dedup_cutoff()) {
            tracing::warn!(error = %e, "pruning expired dedup runs failed");
        }
    }
}
