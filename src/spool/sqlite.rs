//! The embedded spool: one SQLite file in WAL mode with `synchronous=FULL`.
//!
//! One writer thread owns the connection. Requests reach it through a bounded channel;
//! it takes every command waiting, runs them all in one transaction and answers each only
//! after `COMMIT` returned, so many requests share one fsync (group commit) and none is
//! answered before its events are durable. If the transaction fails (disk full, IO
//! error), every command of the group gets the error and nothing of it is kept.
//!
//! A full channel means the writer cannot keep up: appends fail fast with
//! [`SpoolError::Overloaded`] instead of queueing without bound.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use std::collections::{HashMap, HashSet};

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};

use super::{AppendReport, AppendRequest, Leased, Settlement, Spool, SpoolError, SpoolStats};
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
}

impl SqliteSpoolOptions {
    /// Defaults for a data directory: 24 h dedup window, 4,096 waiting requests, groups
    /// of up to 512 commands.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        SqliteSpoolOptions {
            data_dir: data_dir.into(),
            dedup_window: Duration::from_secs(24 * 3600),
            queue_capacity: 4096,
            max_group: 512,
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

enum Command {
    Append(AppendRequest, Reply<AppendReport>),
    Lease {
        max: usize,
        lease_ms: i64,
        reply: Reply<Vec<Leased>>,
    },
    Settle(Settlement, Reply<()>),
    Probe(Reply<()>),
    Stats(Reply<SpoolStats>),
    Shutdown(oneshot::Sender<()>),
}

/// The SQLite-backed [`Spool`].
pub struct SqliteSpool {
    sender: mpsc::Sender<Command>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

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
-- Users whose events are leased or waiting for a retry: per-user order is kept by holding
-- the user here instead of indexing every event by user, so an append touches only the
-- tail of `events` and `dedup`. Rows exist only while a user is held. A user is a source
-- and a user key: `hold_key` is `source || char(31) || user_key`.
CREATE TABLE IF NOT EXISTS holds (
    hold_key    TEXT    PRIMARY KEY,
    lease_until INTEGER NOT NULL DEFAULT 0,
    retry_at    INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dedup (
    source     TEXT    NOT NULL,
    message_id TEXT    NOT NULL,
    seen_at    INTEGER NOT NULL,
    PRIMARY KEY (source, message_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedup_seen ON dedup (seen_at);
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
    queue_seq   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_source ON dead_letters (source, id);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
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
        let conn = open_connection(&options.data_dir.join("spool.db")).map_err(storage)?;
        let (sender, receiver) = mpsc::channel(options.queue_capacity.max(1));
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || Writer::new(conn, options, metrics).run(receiver))
            .map_err(|e| SpoolError::Storage(format!("cannot start the spool writer: {e}")))?;
        Ok(SqliteSpool {
            sender,
            thread: Mutex::new(Some(thread)),
        })
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

fn open_connection(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "wal_autocheckpoint", 8192)?;
    // SQLite's default 2 MiB page cache: with reads memory-mapped, misses are cheap, and a
    // larger cache makes every commit slower (the page-cache hash is walked per commit).
    conn.pragma_update(None, "cache_size", -2000)?;
    conn.pragma_update(None, "mmap_size", 268_435_456)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    let has_tables: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'events'",
        [],
        |row| row.get(0),
    )?;
    if has_tables && version != SCHEMA_VERSION {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "{} has spool schema version {version}; this gateway reads version {SCHEMA_VERSION}",
            path.display()
        )));
    }
    conn.execute_batch(SCHEMA)?;
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    // One process owns the file: leases held by a process that is gone (a crash) are void,
    // so their events are delivered again at once rather than after the lease expires.
    conn.execute("UPDATE holds SET lease_until = 0 WHERE lease_until > 0", [])?;
    conn.execute(
        "DELETE FROM holds WHERE lease_until = 0 AND retry_at <= ?1",
        params![now_ms()],
    )?;
    Ok(conn)
}

fn storage(e: rusqlite::Error) -> SpoolError {
    SpoolError::Storage(e.to_string())
}

/// The key a user is held under: per source, like the dispatcher's per-user chains.
fn hold_key(source: &str, user_key: &str) -> String {
    format!("{source}\u{1f}{user_key}")
}

/// The layout this code reads and writes (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[async_trait]
impl Spool for SqliteSpool {
    async fn append(&self, request: AppendRequest) -> Result<AppendReport, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.sender
            .try_send(Command::Append(request, reply))
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
        let (done, finished) = oneshot::channel();
        if self.sender.send(Command::Shutdown(done)).await.is_ok() {
            let _ = finished.await;
        }
        let handle = self.thread.lock().ok().and_then(|mut slot| slot.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    options: SqliteSpoolOptions,
    metrics: Metrics,
    last_prune: Instant,
}

/// A command's result, held until the transaction commits.
enum Pending {
    Append(Reply<AppendReport>, AppendReport),
    Lease(Reply<Vec<Leased>>, Vec<Leased>),
    Unit(Reply<()>),
    Stats(Reply<SpoolStats>, SpoolStats),
}

impl Pending {
    fn fail(self, error: SpoolError) {
        // A dropped receiver means the caller gave up; there is nobody left to tell.
        match self {
            Pending::Append(reply, _) => drop(reply.send(Err(error))),
            Pending::Lease(reply, _) => drop(reply.send(Err(error))),
            Pending::Unit(reply) => drop(reply.send(Err(error))),
            Pending::Stats(reply, _) => drop(reply.send(Err(error))),
        }
    }

    fn succeed(self) {
        match self {
            Pending::Append(reply, report) => drop(reply.send(Ok(report))),
            Pending::Lease(reply, leased) => drop(reply.send(Ok(leased))),
            Pending::Unit(reply) => drop(reply.send(Ok(()))),
            Pending::Stats(reply, stats) => drop(reply.send(Ok(stats))),
        }
    }
}

/// How often the dedup table is pruned of expired ids (only while there is traffic).
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Rows removed per pruning statement, so one pass never stalls the writer for long.
const PRUNE_CHUNK: i64 = 20_000;

impl Writer {
    fn new(conn: Connection, options: SqliteSpoolOptions, metrics: Metrics) -> Writer {
        Writer {
            conn,
            options,
            metrics,
            last_prune: Instant::now(),
        }
    }

    fn run(mut self, mut receiver: mpsc::Receiver<Command>) {
        let mut shutdown: Option<oneshot::Sender<()>> = None;
        while shutdown.is_none() {
            let Some(first) = receiver.blocking_recv() else {
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
            if self.last_prune.elapsed() >= PRUNE_EVERY {
                self.prune_dedup();
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
                self.metrics
                    .spool_commit_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.metrics.spool_group_commands.observe(count as f64);
                pending.into_iter().for_each(Pending::succeed);
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
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
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let now = now_ms();
        let mut failure = None;
        for command in commands {
            let outcome = match command {
                Command::Append(request, reply) => {
                    pending.push(Pending::Append(reply, AppendReport::default()));
                    self.append(&request, now).map(|report| {
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
        match failure {
            Some(e) => Err(e),
            None => self.conn.execute_batch("COMMIT"),
        }
    }

    fn append(&mut self, request: &AppendRequest, now: i64) -> rusqlite::Result<AppendReport> {
        let cutoff = now - self.options.dedup_window.as_millis() as i64;
        let mut dedup = self.conn.prepare_cached(
            "INSERT INTO dedup (source, message_id, seen_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(source, message_id) DO UPDATE SET seen_at = excluded.seen_at
             WHERE dedup.seen_at < ?4",
        )?;
        let mut insert = self.conn.prepare_cached(
            "INSERT INTO events (source, message_id, kind, user_key, received_at, payload)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?;
        let mut report = AppendReport::default();
        for event in &request.events {
            let fresh = dedup.execute(params![request.source, event.message_id, now, cutoff])?;
            if fresh == 0 {
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
            report.queued += 1;
        }
        Ok(report)
    }

    fn lease(&mut self, max: usize, lease_ms: i64, now: i64) -> rusqlite::Result<Vec<Leased>> {
        let mut select = self.conn.prepare_cached(
            "SELECT seq, source, message_id, kind, user_key, payload, attempts, received_at
             FROM events e
             WHERE NOT EXISTS (SELECT 1 FROM holds h
                               WHERE h.hold_key = e.source || char(31) || e.user_key
                                 AND (h.lease_until > ?1 OR h.retry_at > ?1))
             ORDER BY seq LIMIT ?2",
        )?;
        let leased = select
            .query_map(params![now, max as i64], |row| {
                Ok(Leased {
                    seq: row.get(0)?,
                    source: row.get(1)?,
                    message_id: row.get(2)?,
                    kind: row.get(3)?,
                    user_key: row.get(4)?,
                    payload: row.get(5)?,
                    attempts: row.get(6)?,
                    received_at_ms: row.get(7)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        // Every user is eligible as a whole, so the rows are each user's oldest events; hold
        // the users until the batch settles (or the lease expires).
        let mut hold = self.conn.prepare_cached(
            "INSERT INTO holds (hold_key, lease_until, retry_at) VALUES (?1, ?2, 0)
             ON CONFLICT(hold_key) DO UPDATE SET lease_until = excluded.lease_until",
        )?;
        let mut held = HashSet::new();
        for event in &leased {
            let key = hold_key(&event.source, &event.user_key);
            if !held.contains(&key) {
                hold.execute(params![key, now + lease_ms])?;
                held.insert(key);
            }
        }
        Ok(leased)
    }

    fn settle(&mut self, settlement: &Settlement, now: i64) -> rusqlite::Result<()> {
        // Users touched by this batch, and the retry time of those that must wait.
        let mut touched: HashSet<String> = HashSet::new();
        let mut waiting: HashMap<String, i64> = HashMap::new();
        let mut delete = self.conn.prepare_cached(
            "DELETE FROM events WHERE seq = ?1 RETURNING source || char(31) || user_key",
        )?;
        for seq in &settlement.acked {
            if let Some(user) = delete
                .query_row(params![seq], |row| row.get::<_, String>(0))
                .optional()?
            {
                touched.insert(user);
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
        let mut bury = self.conn.prepare_cached(
            "INSERT INTO dead_letters (source, message_id, kind, user_key, received_at, payload,
                                       attempts, last_status, last_error, created_at, queue_seq)
             SELECT source, message_id, kind, user_key, received_at, payload,
                    attempts + ?2, ?3, ?4, ?5, seq
             FROM events WHERE seq = ?1",
        )?;
        for dead in &settlement.dead {
            bury.execute(params![
                dead.seq,
                i64::from(dead.attempted),
                dead.status,
                dead.error,
                now
            ])?;
            if let Some(user) = delete
                .query_row(params![dead.seq], |row| row.get::<_, String>(0))
                .optional()?
            {
                touched.insert(user);
            }
        }
        let mut wait = self.conn.prepare_cached(
            "INSERT INTO holds (hold_key, lease_until, retry_at) VALUES (?1, 0, ?2)
             ON CONFLICT(hold_key) DO UPDATE SET lease_until = 0, retry_at = excluded.retry_at",
        )?;
        for (user, at) in &waiting {
            wait.execute(params![user, at])?;
        }
        let mut free = self
            .conn
            .prepare_cached("DELETE FROM holds WHERE hold_key = ?1")?;
        if !settlement.keep_holds {
            for user in touched.iter().filter(|u| !waiting.contains_key(*u)) {
                free.execute(params![user])?;
            }
        }
        Ok(())
    }

    fn stats(&mut self) -> rusqlite::Result<SpoolStats> {
        let depth: i64 = self
            .conn
            .prepare_cached("SELECT count(*) FROM events")?
            .query_row([], |row| row.get(0))?;
        let oldest: Option<i64> = self
            .conn
            .prepare_cached("SELECT received_at FROM events ORDER BY seq LIMIT 1")?
            .query_row([], |row| row.get(0))
            .optional()?;
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

    /// Removes dedup ids older than the window, a chunk per statement.
    fn prune_dedup(&mut self) {
        self.last_prune = Instant::now();
        let cutoff = now_ms() - self.options.dedup_window.as_millis() as i64;
        loop {
            let removed = self.conn.execute(
                "DELETE FROM dedup WHERE (source, message_id) IN
                   (SELECT source, message_id FROM dedup WHERE seen_at < ?1 LIMIT ?2)",
                params![cutoff, PRUNE_CHUNK],
            );
            match removed {
                Ok(n) if (n as i64) < PRUNE_CHUNK => break,
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "pruning expired dedup ids failed");
                    break;
                }
            }
        }
    }
}
