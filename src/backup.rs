//! `refiner-gateway backup`: a copy of a data directory (the embedded spool) that a gateway
//! can be started on, taken while the gateway runs and keeps accepting events.
//!
//! What the directory holds, and how each part is copied:
//! - `spool.db` (and its write-ahead log): SQLite's online backup API, every page in one
//!   step, so the copy is the snapshot of one read transaction: every event, dead letter
//!   and `dedup_log` row committed before it, nothing half-written. WAL readers do not
//!   block the gateway's writer.
//! - `dedup/run-<id>.dat`: the dedup runs the snapshot's `dedup_runs` table lists (the ids
//!   no longer in `dedup_log`). A registered run file is never written again, so a plain
//!   copy is exact. A merge (or the expiry of a whole run) may unlink a listed file after
//!   the snapshot; a newer snapshot then lists its replacement instead, so the backup takes
//!   the snapshot again (at most [`MAX_ATTEMPTS`] times).
//! - `delivered/*.journal`, the delivered journal: copied before the snapshot and again
//!   after it. The files are only appended to, so the later copy of a file holds the
//!   earlier one; a file deleted in between keeps its earlier copy. The copy may name
//!   events the snapshot no longer queues or end in a torn line: both are ignored by the
//!   next gateway (an entry only counts when a leased event matches it).
//! - `LOCK` is neither copied nor taken: the backup only reads.
//!
//! The copy is a new directory (mode 0700, files 0600), synced to disk, and checked with
//! `PRAGMA quick_check` before the backup reports success. Restoring it is starting a
//! gateway on it (see `docs/operations.md`).

use std::fs::{self, DirBuilder, File};
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

/// The spool's database file in a data directory.
pub const SPOOL_FILE: &str = "spool.db";
/// The directory of the dedup index's run files.
pub const DEDUP_DIR: &str = "dedup";
/// The directory of the delivered journal.
pub const JOURNAL_DIR: &str = "delivered";
/// Snapshots taken before the dedup runs hold still long enough to be copied.
pub const MAX_ATTEMPTS: u32 = 5;
/// How long the snapshot waits for a lock the gateway holds (a checkpoint) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a backup failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{} has no {SPOOL_FILE}: not the data directory of a gateway with the embedded spool", dir.display())]
    NoSpool { dir: PathBuf },
    #[error("{} already exists and is not empty; back up into a new directory", dir.display())]
    OutputNotEmpty { dir: PathBuf },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{what}: {source}")]
    Sqlite {
        what: String,
        source: rusqlite::Error,
    },
    #[error("the dedup run files kept changing during {attempts} snapshots; try again")]
    RunsKeptChanging { attempts: u32 },
    #[error("the copy of {SPOOL_FILE} fails SQLite's check: {0}")]
    Damaged(String),
}

/// What a backup copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReport {
    /// Size of the copied `spool.db`.
    pub spool_bytes: u64,
    /// Dedup run files copied.
    pub runs: usize,
    /// Journal files copied.
    pub journal_files: usize,
    /// Snapshots taken (more than one when a merge replaced runs meanwhile).
    pub attempts: u32,
}

/// A step of the backup, for progress display.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Copying `spool.db` (attempt n, from 1).
    Snapshot(u32),
    DedupRuns,
    Journal,
    Check,
}

/// Backs up `data_dir` into `output`, a new or empty directory.
pub fn backup(
    data_dir: &Path,
    output: &Path,
    mut progress: impl FnMut(Step),
) -> Result<BackupReport, BackupError> {
    let source_db = data_dir.join(SPOOL_FILE);
    if !source_db.is_file() {
        return Err(BackupError::NoSpool {
            dir: data_dir.to_path_buf(),
        });
    }
    create_output(output)?;
    let target_db = output.join(SPOOL_FILE);
    progress(Step::Journal);
    copy_journal(data_dir, output)?;
    let mut attempts = 0;
    let runs = loop {
        attempts += 1;
        progress(Step::Snapshot(attempts));
        snapshot(&source_db, &target_db)?;
        progress(Step::DedupRuns);
        if let Some(runs) = copy_runs(data_dir, output, &target_db)? {
            break runs;
        }
        if attempts >= MAX_ATTEMPTS {
            return Err(BackupError::RunsKeptChanging { attempts });
        }
    };
    progress(Step::Journal);
    let journal_files = copy_journal(data_dir, output)?;
    progress(Step::Check);
    check(&target_db)?;
    restrict(&target_db)?;
    for dir in [
        output.join(DEDUP_DIR),
        output.join(JOURNAL_DIR),
        output.into(),
    ] {
        sync_dir(&dir)?;
    }
    let spool_bytes = fs::metadata(&target_db)
        .map_err(io_error(&target_db, "cannot read"))?
        .len();
    Ok(BackupReport {
        spool_bytes,
        runs,
        journal_files,
        attempts,
    })
}

fn io_error(path: &Path, what: &str) -> impl FnOnce(io::Error) -> BackupError {
    let what = format!("{what} {}", path.display());
    move |source| BackupError::Io { what, source }
}

fn sqlite_error(path: &Path, what: &str) -> impl FnOnce(rusqlite::Error) -> BackupError {
    let what = format!("{what} {}", path.display());
    move |source| BackupError::Sqlite { what, source }
}

/// Creates `dir` (mode 0700), or accepts it if it exists and is empty.
fn create_output(dir: &Path) -> Result<(), BackupError> {
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BackupError::OutputNotEmpty {
                    dir: dir.to_path_buf(),
                });
            }
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(io_error(dir, "cannot restrict"))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error(dir, "cannot create")),
        Err(e) => Err(io_error(dir, "cannot read")(e)),
    }
}

/// Copies the live database into `target` (replacing an earlier attempt) in one step.
fn snapshot(source: &Path, target: &Path) -> Result<(), BackupError> {
    let from = Connection::open_with_flags(
        source,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite_error(source, "cannot open"))?;
    from.busy_timeout(BUSY_TIMEOUT)
        .map_err(sqlite_error(source, "cannot configure"))?;
    for stale in [target.to_path_buf(), sidecar(target, "-journal")] {
        match fs::remove_file(&stale) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(&stale, "cannot remove")(e)),
        }
    }
    let mut to = Connection::open(target).map_err(sqlite_error(target, "cannot create"))?;
    let backup = Backup::new(&from, &mut to).map_err(sqlite_error(source, "cannot back up"))?;
    let started = Instant::now();
    // All pages in one step: stepping in parts would restart whenever the gateway commits.
    loop {
        match backup
            .step(-1)
            .map_err(sqlite_error(source, "cannot back up"))?
        {
            StepResult::Done => return Ok(()),
            StepResult::Busy | StepResult::Locked if started.elapsed() < BUSY_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(50));
            }
            StepResult::Busy | StepResult::Locked => {
                return Err(BackupError::Sqlite {
                    what: format!("cannot back up {}", source.display()),
                    source: rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
                        Some("the database stayed locked".into()),
                    ),
                })
            }
            _ => {}
        }
    }
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The file name of dedup run `id`, as the spool's dedup index names it
/// (`spool::dedup::run::file_name`; the restore test fails if the two differ).
fn run_file_name(id: i64) -> String {
    format!("run-{id:016}.dat")
}

/// Copies the runs the snapshot lists; `None` when one of them is gone (replaced by a
/// merge after the snapshot).
fn copy_runs(
    data_dir: &Path,
    output: &Path,
    snapshot: &Path,
) -> Result<Option<usize>, BackupError> {
    let conn = Connection::open_with_flags(snapshot, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(sqlite_error(snapshot, "cannot open"))?;
    let read = sqlite_error(snapshot, "cannot read the dedup runs of");
    let has_runs: bool = conn
        .query_row(
            "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'dedup_runs'",
            [],
            |row| row.get(0),
        )
        .map_err(sqlite_error(snapshot, "cannot read"))?;
    let ids: Vec<i64> = if has_runs {
        conn.prepare("SELECT id FROM dedup_runs ORDER BY id")
            .and_then(|mut select| {
                select
                    .query_map([], |row| row.get(0))?
                    .collect::<rusqlite::Result<_>>()
            })
            .map_err(read)?
    } else {
        Vec::new()
    };
    drop(conn);
    let target_dir = output.join(DEDUP_DIR);
    reset_dir(&target_dir)?;
    for id in &ids {
        let name = run_file_name(*id);
        match copy_file(
            &data_dir.join(DEDUP_DIR).join(&name),
            &target_dir.join(&name),
        ) {
            Ok(()) => {}
            Err(CopyError::Gone) => return Ok(None),
            Err(CopyError::Failed(e)) => return Err(e),
        }
    }
    Ok(Some(ids.len()))
}

/// Copies every journal file present now; files deleted meanwhile are skipped.
fn copy_journal(data_dir: &Path, output: &Path) -> Result<usize, BackupError> {
    let source_dir = data_dir.join(JOURNAL_DIR);
    let entries = match fs::read_dir(&source_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io_error(&source_dir, "cannot read")(e)),
    };
    let target_dir = output.join(JOURNAL_DIR);
    make_dir(&target_dir)?;
    for entry in entries {
        let path = entry.map_err(io_error(&source_dir, "cannot read"))?.path();
        let Some(name) = path
            .file_name()
            .filter(|_| path.extension() == Some("journal".as_ref()))
        else {
            continue;
        };
        match copy_file(&path, &target_dir.join(name)) {
            Ok(()) | Err(CopyError::Gone) => {}
            Err(CopyError::Failed(e)) => return Err(e),
        }
    }
    // Counted in the output: files of the first pass deleted since are still there.
    Ok(fs::read_dir(&target_dir)
        .map_err(io_error(&target_dir, "cannot read"))?
        .count())
}

enum CopyError {
    /// The source does not exist (any more).
    Gone,
    Failed(BackupError),
}

/// Copies a file, syncs the copy and makes it 0600.
fn copy_file(from: &Path, to: &Path) -> Result<(), CopyError> {
    match fs::copy(from, to) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound && !from.exists() => {
            return Err(CopyError::Gone)
        }
        Err(e) => return Err(CopyError::Failed(io_error(from, "cannot copy")(e))),
    }
    restrict(to).map_err(CopyError::Failed)?;
    File::open(to)
        .and_then(|file| file.sync_all())
        .map_err(|e| CopyError::Failed(io_error(to, "cannot sync")(e)))
}

fn restrict(path: &Path) -> Result<(), BackupError> {
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(io_error(path, "cannot restrict"))
}

fn make_dir(dir: &Path) -> Result<(), BackupError> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(io_error(dir, "cannot create")(e)),
    }
}

/// An empty `dir` (the runs of an earlier attempt removed).
fn reset_dir(dir: &Path) -> Result<(), BackupError> {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(dir, "cannot remove")(e)),
    }
    make_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), BackupError> {
    match File::open(dir) {
        Ok(file) => file.sync_all().map_err(io_error(dir, "cannot sync")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(dir, "cannot open")(e)),
    }
}

/// `PRAGMA quick_check` on the copy.
fn check(db: &Path) -> Result<(), BackupError> {
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(sqlite_error(db, "cannot open"))?;
    let result: String = conn
        .query_row("PRAGMA quick_check", [], |row| row.get(0))
        .map_err(sqlite_error(db, "cannot check"))?;
    if result == "ok" {
        Ok(())
    } else {
        Err(BackupError::Damaged(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_directory_without_a_spool_and_a_used_output() {
        let root = tempfile::tempdir().expect("tempdir");
        let err = backup(root.path(), &root.path().join("out"), |_| {}).expect_err("no spool");
        assert!(matches!(err, BackupError::NoSpool { .. }), "{err}");

        let data = root.path().join("data");
        fs::create_dir(&data).expect("mkdir");
        Connection::open(data.join(SPOOL_FILE))
            .and_then(|c| c.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);"))
            .expect("db");
        let used = root.path().join("used");
        fs::create_dir(&used).expect("mkdir");
        fs::write(used.join("something"), b"x").expect("write");
        let err = backup(&data, &used, |_| {}).expect_err("not empty");
        assert!(matches!(err, BackupError::OutputNotEmpty { .. }), "{err}");
    }

    #[test]
    fn a_missing_run_is_retried_then_reported() {
        let root = tempfile::tempdir().expect("tempdir");
        let data = root.path().join("data");
        fs::create_dir(&data).expect("mkdir");
        Connection::open(data.join(SPOOL_FILE))
            .and_then(|c| {
                c.execute_batch(
                    "CREATE TABLE dedup_runs (id INTEGER PRIMARY KEY, count INTEGER NOT NULL,
                        min_seen INTEGER NOT NULL, max_seen INTEGER NOT NULL);
                     INSERT INTO dedup_runs VALUES (7, 1, 0, 0);",
                )
            })
            .expect("db");
        let mut snapshots = 0;
        let err = backup(&data, &root.path().join("out"), |step| {
            if matches!(step, Step::Snapshot(_)) {
                snapshots += 1;
            }
        })
        .expect_err("the run file is missing");
        assert!(
            matches!(
                err,
                BackupError::RunsKeptChanging {
                    attempts: MAX_ATTEMPTS
                }
            ),
            "{err}"
        );
        assert_eq!(snapshots, MAX_ATTEMPTS);

        fs::create_dir(data.join(DEDUP_DIR)).expect("mkdir");
        fs::write(data.join(DEDUP_DIR).join(run_file_name(7)), b"run").expect("run");
        let out = root.path().join("out2");
        let report = backup(&data, &out, |_| {}).expect("backup");
        assert_eq!(report.runs, 1);
        assert_eq!(report.attempts, 1);
        assert_eq!(
            fs::read(out.join(DEDUP_DIR).join(run_file_name(7))).expect("copied"),
            b"run"
        );
    }
}
