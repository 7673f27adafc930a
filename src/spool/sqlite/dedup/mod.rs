//! The embedded spool's dedup index, log-structured so that remembering an id is a
//! sequential write, never a random B-tree insert.
//!
//! Ids accepted into the queue are remembered in three places, newest first:
//! - the **memtable**: a hash map in memory, made durable by `dedup_log` rows (one per
//!   transaction that accepted events, written in that transaction);
//! - a **frozen** memtable while a background thread writes it out as a run;
//! - **runs**: immutable files of sorted `(key, seen_at)` entries in `<data_dir>/dedup/`,
//!   each with a Bloom filter (mapped read-only from the file), so that a fresh id (nearly
//!   every id) touches one filter block and reads no entries.
//!   `dedup_runs` lists the live runs.
//!
//! Runs of similar size are merged in the background ([`MERGE_FAN_IN`] at a time), which
//! drops expired entries; a run whose newest entry has expired is deleted whole.
//!
//! Invariants:
//! - A key is a repeat exactly when some place holds it with `seen_at >= cutoff`.
//! - A run becomes live (registered in `dedup_runs`) only after its file is synced, in the
//!   same transaction that deletes what it replaces (the `dedup_log` rows of a flush, the
//!   inputs of a merge); files are unlinked only after that commits. Files not registered
//!   are orphans of a crash and are deleted at start-up.
//! - Memory is bounded: the memtable holds at most `max_memtable` ids (appends are
//!   refused as overload beyond, see [`DedupIndex::is_full`]) and a frozen one as many. Runs
//!   cost no heap: their filters and fences (about 1.3 bytes per id) are mapped pages of
//!   their files, page cache that the kernel can reclaim under memory pressure and read
//!   back; their entries are read on demand, not mapped.
//! - Only one background job (a flush or a merge) runs at a time; the writer thread owns
//!   everything else and never waits for the job.

use crate::spool::dedup::run;

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};

use super::keys::PassThrough;
use run::{Run, RunInfo};

/// Runs merged at once, and how many runs of one size class wait before they are.
pub const MERGE_FAN_IN: usize = 4;
/// The longest wait before a failed flush or merge is tried again.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The index's tables in `spool.db`.
pub const SCHEMA: &str = "
-- Ids accepted into the queue since the last flush: packed (key, seen_at) entries, one row per
-- transaction that accepted events (see dedup/mod.rs). Rebuilt into the memtable at start-up.
CREATE TABLE IF NOT EXISTS dedup_log (
    id      INTEGER PRIMARY KEY,
    entries BLOB NOT NULL
);
-- Live dedup runs: `dedup/run-<id>.dat`, with what the writer needs before opening it.
CREATE TABLE IF NOT EXISTS dedup_runs (
    id       INTEGER PRIMARY KEY,
    count    INTEGER NOT NULL,
    min_seen INTEGER NOT NULL,
    max_seen INTEGER NOT NULL
);
";

/// Sizes of the index.
#[derive(Debug, Clone, Copy)]
pub struct Tuning {
    /// Memtable ids that start a flush.
    pub flush_ids: usize,
    /// Memtable ids beyond which appends are refused until a flush lands.
    pub max_memtable: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            flush_ids: 131_072,
            max_memtable: 524_288,
        }
    }
}

type Entries = HashMap<u128, i64, PassThrough>;

/// A memtable being written out: still consulted until its run is live.
struct Frozen {
    entries: Entries,
    /// The newest `dedup_log` row it holds.
    log_upto: i64,
}

/// A job for the background thread: the new run's id and the file to write it to.
enum Job {
    Flush {
        frozen: Arc<Frozen>,
        id: i64,
        path: PathBuf,
    },
    Merge {
        inputs: Vec<Arc<Run>>,
        id: i64,
        path: PathBuf,
        cutoff: i64,
    },
}

enum Done {
    Flushed {
        id: i64,
        result: io::Result<RunInfo>,
    },
    Merged {
        id: i64,
        inputs: Vec<i64>,
        result: io::Result<Option<RunInfo>>,
    },
}

/// The background thread that writes and merges runs.
struct Worker {
    jobs: mpsc::Sender<Job>,
    done: mpsc::Receiver<Done>,
    cancel: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// See the module header.
pub struct DedupIndex {
    dir: PathBuf,
    tuning: Tuning,
    memtable: Entries,
    /// Changes of the open transaction: the key and what it replaced.
    staged: Vec<(u128, Option<i64>)>,
    /// Ids remembered in the open transaction, not yet in a `dedup_log` row.
    unlogged: Vec<(u128, i64)>,
    /// The newest `dedup_log` row in the memtable (committed), and in the open transaction.
    log_upto: i64,
    staged_log: Option<i64>,
    frozen: Option<Arc<Frozen>>,
    /// Live runs, oldest first.
    runs: Vec<Arc<Run>>,
    next_id: i64,
    worker: Worker,
    in_flight: bool,
    retry_at: Instant,
    backoff: Duration,
}

/// A run file's I/O error, reported like SQLite's own (the writer's errors are SQLite's).
fn storage(e: io::Error) -> rusqlite::Error {
    crate::spool::sqlite::io_error(format!("dedup index: {e}"))
}

/// Packs entries for a `dedup_log` row: key (16 bytes, big-endian) then `seen_at` (8, LE).
fn pack(entries: &[(u128, i64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * 24);
    for (key, seen) in entries {
        out.extend_from_slice(&key.to_be_bytes());
        out.extend_from_slice(&seen.to_le_bytes());
    }
    out
}

fn unpack(bytes: &[u8]) -> impl Iterator<Item = (u128, i64)> + '_ {
    bytes.chunks_exact(24).map(|entry| {
        let mut key = [0u8; 16];
        key.copy_from_slice(&entry[..16]);
        let mut seen = [0u8; 8];
        seen.copy_from_slice(&entry[16..]);
        (u128::from_be_bytes(key), i64::from_le_bytes(seen))
    })
}

fn size_class(count: u64, flush_ids: usize) -> u32 {
    let ratio = (count / flush_ids.max(1) as u64).max(1);
    ratio.ilog2() / MERGE_FAN_IN.ilog2()
}

impl DedupIndex {
    /// Opens the index of the spool at `conn` (inside no transaction): deletes orphan run
    /// files, opens the live runs and rebuilds
    /// the memtable from `dedup_log`.
    pub fn open(conn: &Connection, dir: PathBuf, tuning: Tuning) -> rusqlite::Result<DedupIndex> {
        std::fs::create_dir_all(&dir).map_err(storage)?;
        conn.execute_batch(SCHEMA)?;
        let live: Vec<(i64, RunInfo)> = conn
            .prepare("SELECT id, count, min_seen, max_seen FROM dedup_runs ORDER BY id")?
            .query_map([], |row| {
                Ok((
                    row.get(0)?,
                    RunInfo {
                        count: row.get::<_, i64>(1)? as u64,
                        min_seen: row.get(2)?,
                        max_seen: row.get(3)?,
                    },
                ))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut next_id = live.iter().map(|(id, _)| id + 1).max().unwrap_or(1);
        for entry in std::fs::read_dir(&dir).map_err(storage)? {
            let entry = entry.map_err(storage)?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(run::id_of) else {
                continue;
            };
            next_id = next_id.max(id + 1);
            if !live.iter().any(|(live_id, _)| *live_id == id) {
                std::fs::remove_file(entry.path()).map_err(storage)?;
            }
        }
        let mut runs = Vec::with_capacity(live.len());
        for (id, info) in live {
            let path = dir.join(run::file_name(id));
            match Run::open(&path, id) {
                Ok(run) if run.info == info => runs.push(Arc::new(run)),
                outcome => {
                    // Losing a run forgets ids (a repeat may be delivered twice); refusing
                    // to start would stop delivery altogether.
                    let error = outcome.err().map(|e| e.to_string());
                    tracing::error!(run = id, error = ?error,
                        "a dedup run file is missing or damaged; its ids are forgotten");
                    conn.execute("DELETE FROM dedup_runs WHERE id = ?1", params![id])?;
                }
            }
        }
        let mut memtable = Entries::default();
        let mut log_upto = 0;
        {
            let mut select = conn.prepare("SELECT id, entries FROM dedup_log ORDER BY id")?;
            let mut rows = select.query([])?;
            while let Some(row) = rows.next()? {
                log_upto = row.get(0)?;
                let bytes: Vec<u8> = row.get(1)?;
                for (key, seen) in unpack(&bytes) {
                    let slot = memtable.entry(key).or_insert(seen);
                    *slot = (*slot).max(seen);
                }
            }
        }
        Ok(DedupIndex {
            dir,
            tuning,
            memtable,
            staged: Vec::new(),
            unlogged: Vec::new(),
            log_upto,
            staged_log: None,
            frozen: None,
            runs,
            next_id,
            worker: Worker::start()?,
            in_flight: false,
            retry_at: Instant::now(),
            backoff: Duration::ZERO,
        })
    }

    /// Whether `key` was seen at or after `cutoff`.
    pub fn is_repeat(&self, key: u128, cutoff: i64) -> rusqlite::Result<bool> {
        if self.memtable.get(&key).is_some_and(|seen| *seen >= cutoff) {
            return Ok(true);
        }
        if let Some(frozen) = &self.frozen {
            if frozen.entries.get(&key).is_some_and(|seen| *seen >= cutoff) {
                return Ok(true);
            }
        }
        for run in self.runs.iter().rev() {
            if run.info.max_seen < cutoff {
                continue;
            }
            if run
                .find(key)
                .map_err(storage)?
                .is_some_and(|seen| seen >= cutoff)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Remembers an accepted id in the open transaction: in the memtable at once (a repeat
    /// later in the transaction is recognised), staged until [`commit`](Self::commit), and
    /// in the `dedup_log` row that [`write_log`](Self::write_log) writes before the commit.
    pub fn remember(&mut self, key: u128, seen_at: i64) {
        let before = self.memtable.insert(key, seen_at);
        self.staged.push((key, before));
        self.unlogged.push((key, seen_at));
    }

    /// Writes the ids remembered in the open transaction as one `dedup_log` row (none if
    /// there are none): must run in that transaction, before it commits.
    pub fn write_log(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        if self.unlogged.is_empty() {
            return Ok(());
        }
        conn.prepare_cached("INSERT INTO dedup_log (entries) VALUES (?1)")?
            .execute(params![pack(&self.unlogged)])?;
        self.unlogged.clear();
        self.staged_log = Some(conn.last_insert_rowid());
        Ok(())
    }

    /// The transaction committed: its changes stay.
    pub fn commit(&mut self) {
        debug_assert!(
            self.unlogged.is_empty(),
            "write_log runs before every commit"
        );
        self.staged.clear();
        if let Some(id) = self.staged_log.take() {
            self.log_upto = id;
        }
    }

    /// The transaction rolled back: its changes are undone.
    pub fn rollback(&mut self) {
        for (key, before) in self.staged.drain(..).rev() {
            match before {
                Some(seen) => self.memtable.insert(key, seen),
                None => self.memtable.remove(&key),
            };
        }
        self.staged_log = None;
        self.unlogged.clear();
    }

    /// Whether the memtable is full: appends are refused until a flush lands.
    pub fn is_full(&self) -> bool {
        self.memtable.len() >= self.tuning.max_memtable
    }

    /// Whether a background job is running (its result is picked up by [`maintain`]).
    ///
    /// [`maintain`]: Self::maintain
    pub fn busy(&self) -> bool {
        self.in_flight
    }

    /// Ids remembered in memory and in runs.
    pub fn ids(&self) -> u64 {
        let frozen = self.frozen.as_ref().map_or(0, |f| f.entries.len());
        (self.memtable.len() + frozen) as u64 + self.runs.iter().map(|r| r.info.count).sum::<u64>()
    }

    /// Memory the index keeps warm, in bytes: the memtables on the heap (about 32 bytes a
    /// slot) and the runs' filters and fences, mapped from their files.
    pub fn memory(&self) -> u64 {
        let slots =
            self.memtable.capacity() + self.frozen.as_ref().map_or(0, |f| f.entries.capacity());
        (slots * 32 + self.runs.iter().map(|r| r.filter_bytes()).sum::<usize>()) as u64
    }

    /// Live runs.
    #[cfg(test)]
    pub fn runs(&self) -> usize {
        self.runs.len()
    }

    /// Between transactions: lands a finished job (its own small transaction) and starts
    /// the next one: a flush when the memtable is big enough, else a merge when
    /// [`MERGE_FAN_IN`] runs share a size class.
    pub fn maintain(&mut self, conn: &Connection, cutoff: i64) {
        if self.in_flight {
            match self.worker.done.try_recv() {
                Ok(done) => {
                    self.in_flight = false;
                    self.land(conn, done);
                }
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.in_flight = false;
                    self.failed("the dedup worker stopped");
                    return;
                }
            }
        }
        if Instant::now() < self.retry_at {
            return;
        }
        if self.frozen.is_none() && self.memtable.len() >= self.tuning.flush_ids {
            let frozen = Arc::new(Frozen {
                entries: std::mem::take(&mut self.memtable),
                log_upto: self.log_upto,
            });
            self.frozen = Some(frozen.clone());
            self.start(|id, path| Job::Flush { frozen, id, path });
        } else if let Some(frozen) = self.frozen.clone() {
            // A flush that failed is tried again.
            self.start(|id, path| Job::Flush { frozen, id, path });
        } else if let Some(inputs) = self.merge_candidates() {
            self.start(|id, path| Job::Merge {
                inputs,
                id,
                path,
                cutoff,
            });
        }
    }

    fn merge_candidates(&self) -> Option<Vec<Arc<Run>>> {
        let mut classes: HashMap<u32, Vec<Arc<Run>>> = HashMap::new();
        for run in &self.runs {
            let class = size_class(run.info.count, self.tuning.flush_ids);
            let members = classes.entry(class).or_default();
            members.push(run.clone());
            if members.len() == MERGE_FAN_IN {
                return Some(members.clone());
            }
        }
        None
    }

    fn start(&mut self, job: impl FnOnce(i64, PathBuf) -> Job) {
        let id = self.next_id;
        self.next_id += 1;
        if self.worker.jobs.send(job(id, self.path(id))).is_ok() {
            self.in_flight = true;
        } else {
            self.failed("the dedup worker stopped");
        }
    }

    fn failed(&mut self, error: &str) {
        self.backoff = (self.backoff * 2)
            .max(Duration::from_millis(100))
            .min(MAX_BACKOFF);
        self.retry_at = Instant::now() + self.backoff;
        tracing::warn!(
            error,
            retry_in_ms = self.backoff.as_millis() as u64,
            "writing the dedup index failed"
        );
    }

    fn land(&mut self, conn: &Connection, done: Done) {
        let outcome = match done {
            Done::Flushed { id, result } => result
                .map_err(|e| e.to_string())
                .and_then(|info| self.land_flush(conn, id, info).map_err(|e| e.to_string())),
            Done::Merged { id, inputs, result } => {
                result.map_err(|e| e.to_string()).and_then(|info| {
                    self.land_merge(conn, id, &inputs, info)
                        .map_err(|e| e.to_string())
                })
            }
        };
        match outcome {
            Ok(()) => self.backoff = Duration::ZERO,
            Err(e) => self.failed(&e),
        }
    }

    fn path(&self, id: i64) -> PathBuf {
        self.dir.join(run::file_name(id))
    }

    /// Registers a flushed run and drops the log rows it holds, in one transaction.
    fn land_flush(&mut self, conn: &Connection, id: i64, info: RunInfo) -> rusqlite::Result<()> {
        let path = self.path(id);
        let Some(frozen) = self.frozen.clone() else {
            let _ = std::fs::remove_file(&path);
            return Ok(());
        };
        let opened = Run::open(&path, id).map_err(storage);
        let result = opened.and_then(|run| {
            transaction(conn, |conn| {
                register(conn, id, &info)?;
                conn.execute(
                    "DELETE FROM dedup_log WHERE id <= ?1",
                    params![frozen.log_upto],
                )?;
                Ok(())
            })?;
            Ok(run)
        });
        match result {
            Ok(run) => {
                self.runs.push(Arc::new(run));
                self.frozen = None;
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Replaces merged runs by their output, in one transaction; unlinks the inputs after.
    fn land_merge(
        &mut self,
        conn: &Connection,
        id: i64,
        inputs: &[i64],
        info: Option<RunInfo>,
    ) -> rusqlite::Result<()> {
        let path = self.path(id);
        let opened = match info {
            Some(_) => Run::open(&path, id).map(Some).map_err(storage),
            None => Ok(None),
        };
        let result = opened.and_then(|run| {
            transaction(conn, |conn| {
                if let Some(info) = &info {
                    register(conn, id, info)?;
                }
                let mut forget = conn.prepare_cached("DELETE FROM dedup_runs WHERE id = ?1")?;
                for input in inputs {
                    forget.execute(params![input])?;
                }
                Ok(())
            })?;
            Ok(run)
        });
        match result {
            Ok(run) => {
                let at = self
                    .runs
                    .iter()
                    .position(|r| inputs.contains(&r.id))
                    .unwrap_or(self.runs.len());
                self.runs.retain(|r| !inputs.contains(&r.id));
                if let Some(run) = run {
                    self.runs.insert(at.min(self.runs.len()), Arc::new(run));
                }
                for input in inputs {
                    let _ = std::fs::remove_file(self.path(*input));
                }
                Ok(())
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Deletes runs whose newest entry is older than `cutoff` (outside any transaction).
    pub fn prune(&mut self, conn: &Connection, cutoff: i64) -> rusqlite::Result<()> {
        let expired: Vec<i64> = self
            .runs
            .iter()
            .filter(|r| r.info.max_seen < cutoff)
            .map(|r| r.id)
            .collect();
        if expired.is_empty() {
            return Ok(());
        }
        transaction(conn, |conn| {
            let mut forget = conn.prepare_cached("DELETE FROM dedup_runs WHERE id = ?1")?;
            for id in &expired {
                forget.execute(params![id])?;
            }
            Ok(())
        })?;
        // A merge still reading one of them keeps its file open; its result then names an
        // input that is no longer live, which landing tolerates.
        self.runs.retain(|r| !expired.contains(&r.id));
        for id in expired {
            let _ = std::fs::remove_file(self.path(id));
        }
        Ok(())
    }

    /// Stops the background job (a merge is cancelled; its partial file is removed) and
    /// waits for the thread.
    pub fn close(&mut self) {
        self.worker.stop();
    }
}

impl Drop for DedupIndex {
    fn drop(&mut self) {
        self.worker.stop();
    }
}

/// Runs `work` in its own transaction, durable when it returns (`synchronous=FULL` for
/// this commit, whatever the connection's setting): files are unlinked only after it.
fn transaction(
    conn: &Connection,
    work: impl FnOnce(&Connection) -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    let setting: i64 = conn.query_row("PRAGMA synchronous", [], |row| row.get(0))?;
    conn.execute_batch("PRAGMA synchronous = FULL; BEGIN IMMEDIATE")?;
    let result = match work(conn).and_then(|()| conn.execute_batch("COMMIT")) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    };
    // Back to the connection's own setting (FULL is only ever stricter, so a failure to
    // restore it costs speed, not safety).
    let _ = conn.pragma_update(None, "synchronous", setting);
    result
}

fn register(conn: &Connection, id: i64, info: &RunInfo) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO dedup_runs (id, count, min_seen, max_seen) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![id, info.count as i64, info.min_seen, info.max_seen])?;
    Ok(())
}

impl Worker {
    fn start() -> rusqlite::Result<Worker> {
        let (jobs, inbox) = mpsc::channel::<Job>();
        let (outbox, done) = mpsc::channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = cancel.clone();
        let thread = std::thread::Builder::new()
            .name("spool-dedup".into())
            .spawn(move || {
                while let Ok(job) = inbox.recv() {
                    let done = match job {
                        Job::Flush { frozen, id, path } => Done::Flushed {
                            id,
                            result: run::write_sorted(
                                &path,
                                frozen.entries.iter().map(|(k, s)| (*k, *s)).collect(),
                            ),
                        },
                        Job::Merge {
                            inputs,
                            id,
                            path,
                            cutoff,
                        } => {
                            let refs: Vec<&Run> = inputs.iter().map(|r| r.as_ref()).collect();
                            Done::Merged {
                                id,
                                inputs: inputs.iter().map(|r| r.id).collect(),
                                result: run::merge(&refs, &path, cutoff, &stop),
                            }
                        }
                    };
                    if outbox.send(done).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| storage(io::Error::other(e)))?;
        Ok(Worker {
            jobs,
            done,
            cancel,
            thread: Some(thread),
        })
    }

    fn stop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        // Closing the job channel ends the thread's loop.
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(&mut self.jobs, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests;
