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
//! An append looks each `messageId` up in the dedup index (see [`dedup`]: a map in
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

mod admin;
mod checkpointer;
mod dedup;
pub mod keys;
mod lanes;
mod log;
mod log_chunks;
mod schema;
mod wal_sync;
mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use self::admin as admin_sql;
use crate::spool::admin::{
    month_of, CounterRow, DeadLetter, DeadLetterFilter, DeadLetterPage, DeadLetterQuery,
    ReplayReport, SourceUsage,
};
use crate::spool::delivery_log::{
    DeliveryLog, DeliveryLogOptions, EventFacts, LogQuery, LogSize, LoggedEvent, RefusedEntry,
    MAX_RESULTS,
};
use crate::spool::{
    AppendReport, AppendRequest, DeadLetters, Leased, Metering, Settlement, Spool, SpoolError,
    SpoolStats,
};
use crate::telemetry::Metrics;
use checkpointer::Checkpointer;
use dedup::{DedupIndex, Tuning};
use keys::dedup_key;
use schema::{open_connection, open_reader};
use wal_sync::WalSync;
use writer::{Committed, Pending, Writer, SYNC_QUEUE};

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
    /// The delivery log's retention (see [`crate::spool::delivery_log`]).
    pub delivery_log: DeliveryLogOptions,
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
            delivery_log: DeliveryLogOptions::default(),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

enum Command {
    /// A request, its events' dedup keys and their facts for the delivery log (read by the
    /// caller, off the writer thread; empty when the log is off).
    Append(
        AppendRequest,
        Vec<u128>,
        Vec<EventFacts>,
        Reply<AppendReport>,
    ),
    /// Events refused at ingest, for the delivery log.
    LogRefused(Vec<RefusedEntry>, Reply<()>),
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
    /// Whether appends carry facts for the delivery log.
    log_enabled: bool,
}

/// Idle read connections kept for reuse.
const MAX_IDLE_READERS: usize = 4;
/// Dead letters replayed per writer transaction: a large replay never stalls ingest long.
const REPLAY_CHUNK: u64 = 1_000;
/// Dead letters deleted per writer transaction.
const DELETE_CHUNK: u64 = 5_000;

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
        let log_enabled = options.delivery_log.enabled;
        let conn = open_connection(&path, &options.sources).map_err(storage)?;
        let log = log::LogBook::open(&conn, options.delivery_log.clone()).map_err(storage)?;
        let tuning = Tuning {
            flush_ids: options.dedup_flush_ids.max(1),
            max_memtable: options.dedup_flush_ids.max(1) * 4,
        };
        let dedup =
            DedupIndex::open(&conn, options.data_dir.join("dedup"), tuning).map_err(storage)?;
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
        let writer = Writer::new(conn, options, metrics, dedup, checkpointer, sync, log);
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
            log_enabled,
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

fn storage(e: rusqlite::Error) -> SpoolError {
    SpoolError::Storage(e.to_string())
}

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
        let facts = if self.log_enabled {
            request
                .events
                .iter()
                .map(|event| EventFacts::of(&event.payload))
                .collect()
        } else {
            Vec::new()
        };
        let (reply, answer) = oneshot::channel();
        self.sender
            .try_send(Command::Append(request, keys, facts, reply))
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
}

#[async_trait]
impl DeadLetters for SqliteSpool {
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
}

#[async_trait]
impl Metering for SqliteSpool {
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

#[async_trait]
impl DeliveryLog for SqliteSpool {
    async fn record_refused(&self, entries: Vec<RefusedEntry>) -> Result<(), SpoolError> {
        if !self.log_enabled || entries.is_empty() {
            return Ok(());
        }
        // Like an append: refused rather than queued without bound when the writer lags.
        let (reply, answer) = oneshot::channel();
        self.sender
            .try_send(Command::LogRefused(entries, reply))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SpoolError::Overloaded,
                mpsc::error::TrySendError::Closed(_) => SpoolError::Closed,
            })?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }

    async fn find_events(&self, mut query: LogQuery) -> Result<Vec<LoggedEvent>, SpoolError> {
        query.limit = query.limit.min(MAX_RESULTS);
        self.read(move |conn| log::find(conn, &query, now_ms()))
            .await
    }

    async fn log_size(&self) -> Result<LogSize, SpoolError> {
        self.read(log::size).await
    }
}

/// A failure outside SQLite (a run file, a thread, an fsync) reported as SQLite's own I/O
/// error, so the embedded spool's writer handles every failure one way.
pub(crate) fn io_error(message: String) -> rusqlite::Error {
    rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
        Some(message),
    )
}
