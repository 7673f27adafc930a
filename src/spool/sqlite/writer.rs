//! The spool's writer thread: it owns the connection and runs every command waiting in
//! one transaction (group commit), then hands the group's answers to [`WalSync`], which
//! releases them once the WAL is fsync'd.
//!
//! Invariants:
//! - No command is answered before its transaction is durable; a failed transaction fails
//!   every command of its group and keeps nothing of it (the dedup index and the counted
//!   users roll back with it).
//! - Bookkeeping (usage, counters, queue depth, attempts) changes in the same transaction
//!   as the queue it describes.
//! - Pruning runs between groups in bounded chunks, so it never stalls appends for long.

use std::collections::hash_map::RandomState;
use std::collections::HashSet;
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};
use tokio::sync::{mpsc, oneshot};

use super::admin::{self as admin_sql, Tally};
use super::checkpointer::Checkpointer;
use super::dedup::DedupIndex;
use super::keys::PassThrough;
use super::lanes;
use super::log::LogBook;
use super::wal_sync::WalSync;
use super::{now_ms, storage, Command, Reply, SqliteSpoolOptions};
use crate::segment::EventType;
use crate::spool::admin::{month_of, HOUR_MS};
use crate::spool::delivery_log::EventFacts;
use crate::spool::{AppendReport, AppendRequest, Leased, SpoolError, SpoolStats};
use crate::telemetry::Metrics;

mod settle;

/// Queues one event (its `seq` is the next; `attempts` and `next_attempt_at` start at 0).
const INSERT_EVENT: &str =
    "INSERT INTO events (source, message_id, kind, user_key, received_at, payload)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";

/// The writer thread's state.
pub(super) struct Writer {
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
    /// The delivery log's writer side.
    log: LogBook,
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
pub(super) const SYNC_QUEUE: usize = 4;

/// A committed group's answers, released by [`WalSync`] once the commit is durable.
pub(super) struct Committed {
    pub(super) pending: Vec<Pending>,
    pub(super) started: Instant,
}

/// A command's result, held until the transaction commits.
pub(super) enum Pending {
    Append(Reply<AppendReport>, AppendReport),
    /// An append refused as overload whatever the transaction's outcome.
    Refused(Reply<AppendReport>),
    Lease(Reply<Vec<Leased>>, Vec<Leased>),
    Unit(Reply<()>),
    Stats(Reply<SpoolStats>, SpoolStats),
    Count(Reply<u64>, u64),
}

impl Pending {
    pub(super) fn fail(self, error: SpoolError) {
        // A dropped receiver means the caller gave up; there is nobody left to tell.
        match self {
            Pending::Append(reply, _) | Pending::Refused(reply) => drop(reply.send(Err(error))),
            Pending::Lease(reply, _) => drop(reply.send(Err(error))),
            Pending::Unit(reply) => drop(reply.send(Err(error))),
            Pending::Stats(reply, _) => drop(reply.send(Err(error))),
            Pending::Count(reply, _) => drop(reply.send(Err(error))),
        }
    }

    pub(super) fn succeed(self) {
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
    pub(super) fn new(
        conn: Connection,
        options: SqliteSpoolOptions,
        metrics: Metrics,
        dedup: DedupIndex,
        checkpointer: Checkpointer,
        sync: WalSync<Committed>,
        log: LogBook,
    ) -> Writer {
        Writer {
            log,
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

    pub(super) fn run(mut self, mut receiver: mpsc::Receiver<Command>) {
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
            return Err(crate::spool::sqlite::io_error(
                "an fsync of the spool's WAL failed: restart the gateway".into(),
            ));
        }
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let now = now_ms();
        self.tally = Tally::default();
        let mut failure = None;
        for command in commands {
            if let Err(e) = self.execute(command, now, pending) {
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
        if failure.is_none() {
            failure = self.log.finish(&self.conn, now).err();
        }
        match failure {
            Some(e) => Err(e),
            None => self.conn.execute_batch("COMMIT"),
        }
    }

    /// Runs one command of the group inside its transaction. Its answer is pushed to
    /// `pending` before its work, so a command that fails is failed with the group.
    fn execute(
        &mut self,
        command: Command,
        now: i64,
        pending: &mut Vec<Pending>,
    ) -> rusqlite::Result<()> {
        match command {
            Command::Append(_, _, _, reply) if self.dedup.is_full() => {
                // The dedup index's memory is full until its background flush lands.
                pending.push(Pending::Refused(reply));
                Ok(())
            }
            Command::Append(request, keys, facts, reply) => {
                pending.push(Pending::Append(reply, AppendReport::default()));
                self.append(&request, &keys, &facts, now).map(|report| {
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
            Command::LogRefused(entries, reply) => {
                pending.push(Pending::Unit(reply));
                self.log.refused(&self.conn, &entries)
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
                admin_sql::replay_chunk(&self.conn, &filter, limit, now, &mut self.tally).map(|n| {
                    if let Some(Pending::Count(_, slot)) = pending.last_mut() {
                        *slot = n;
                    }
                })
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
        }
    }

    /// Queues a request's new events; repeats (in the dedup index within the window,
    /// earlier in this transaction included) are counted, not kept.
    /// `keys[i]` is the [`dedup_key`] of event `i`, `facts[i]` its delivery log facts (none
    /// when the log is off).
    fn append(
        &mut self,
        request: &AppendRequest,
        keys: &[u128],
        facts: &[EventFacts],
        now: i64,
    ) -> rusqlite::Result<AppendReport> {
        let cutoff = now - self.options.dedup_window.as_millis() as i64;
        let mut insert = self.conn.prepare_cached(INSERT_EVENT)?;
        let mut report = AppendReport::default();
        let mut views = 0;
        // Identified users of the request (`u:` and `e:` keys), for the month's MTU.
        let mut users: HashSet<&str> = HashSet::new();
        let mut logged = Vec::new();
        for (i, (event, &key)) in request.events.iter().zip(keys).enumerate() {
            if self.dedup.is_repeat(key, cutoff)? {
                report.duplicates += 1;
                continue;
            }
            insert.execute(params![
                request.source,
                event.message_id,
                event.kind.as_str(),
                event.user_key.as_str(),
                request.received_at_ms,
                event.payload,
            ])?;
            self.dedup.remember(key, now);
            if facts.len() > i {
                logged.push((self.conn.last_insert_rowid(), i));
            }
            report.queued += 1;
            if matches!(event.kind, EventType::Page | EventType::Screen) {
                views += 1;
            }
            if event.user_key.is_identified() {
                users.insert(event.user_key.as_str());
            }
        }
        drop(insert);
        if self.log.enabled() {
            for (seq, i) in logged {
                let event = &request.events[i];
                self.log.received(
                    &self.conn,
                    seq,
                    &request.source,
                    (&event.message_id, event.kind.as_str()),
                    &facts[i],
                    request.received_at_ms,
                )?;
            }
        }
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
