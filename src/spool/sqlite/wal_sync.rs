//! Makes the embedded spool's commits durable on a thread of its own.
//!
//! The writer commits with `synchronous=NORMAL`: a commit appends its pages to the WAL and
//! returns without an fsync. It then hands the commit's answers to this thread, which
//! fsyncs the WAL file and only then releases them. Meanwhile the writer already runs the
//! next group, so the disk's flush overlaps the next group's work instead of stalling it;
//! one fsync covers every commit handed over before it started.
//!
//! Invariants:
//! - An item is released with `Ok` only after an fsync that began after its commit
//!   returned: every write of that commit (and of all earlier ones) is on disk, which is
//!   what `synchronous=FULL` would have guaranteed at the commit.
//! - Items are released in the order they were submitted.
//! - After a failed fsync the kernel may have dropped the unwritten pages, so nothing
//!   committed since the last good fsync can be vouched for: that batch is released with
//!   the error and [`WalSync::failed`] stays true for the life of the process (the spool then
//!   refuses every command, `/readyz` fails, and a restart recovers from what is on disk).
//! - The queue of waiting items is bounded: [`WalSync::submit`] blocks while `capacity`
//!   wait, so a slow disk slows the writer instead of growing memory.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

/// The WAL fsync thread; items are whatever the caller releases after the fsync.
pub struct WalSync<T> {
    sender: Option<mpsc::SyncSender<T>>,
    thread: Option<JoinHandle<()>>,
    failed: Arc<AtomicBool>,
}

/// The open WAL file, reopened if SQLite ever replaced it (a new inode at the same path).
struct Wal {
    path: PathBuf,
    file: Option<File>,
}

impl Wal {
    fn sync(&mut self) -> io::Result<()> {
        let current = std::fs::metadata(&self.path)?.ino();
        let stale = match &self.file {
            Some(file) => file.metadata()?.ino() != current,
            None => true,
        };
        if stale {
            self.file = Some(File::options().read(true).write(true).open(&self.path)?);
        }
        match &self.file {
            Some(file) => file.sync_data(),
            None => Err(io::Error::other("the WAL file is not open")),
        }
    }
}

impl<T: Send + 'static> WalSync<T> {
    /// Starts the thread for the database at `db_path` (its WAL is `<db_path>-wal`).
    /// `release` gets each fsync's outcome with the items it covered, in order.
    pub fn start(
        db_path: &Path,
        capacity: usize,
        mut release: impl FnMut(io::Result<()>, Vec<T>) + Send + 'static,
    ) -> io::Result<WalSync<T>> {
        let mut wal_path = db_path.as_os_str().to_owned();
        wal_path.push("-wal");
        let mut wal = Wal {
            path: PathBuf::from(wal_path),
            file: None,
        };
        let (sender, receiver) = mpsc::sync_channel::<T>(capacity.max(1));
        let failed = Arc::new(AtomicBool::new(false));
        let failing = failed.clone();
        let thread = std::thread::Builder::new()
            .name("spool-sync".into())
            .spawn(move || {
                while let Ok(first) = receiver.recv() {
                    let mut items = vec![first];
                    items.extend(receiver.try_iter());
                    let result = if failing.load(Ordering::Acquire) {
                        Err(io::Error::other(
                            "an earlier fsync of the spool's WAL failed; restart the gateway",
                        ))
                    } else {
                        wal.sync()
                    };
                    if let Err(e) = &result {
                        if !failing.swap(true, Ordering::AcqRel) {
                            tracing::error!(error = %e,
                                "fsync of the spool's WAL failed; refusing writes until restart");
                        }
                    }
                    release(result, items);
                }
            })?;
        Ok(WalSync {
            sender: Some(sender),
            thread: Some(thread),
            failed,
        })
    }

    /// Hands over a committed transaction's item; blocks while `capacity` items wait.
    /// Gives the item back if the thread has stopped.
    pub fn submit(&self, item: T) -> Result<(), T> {
        match &self.sender {
            Some(sender) => sender.send(item).map_err(|e| e.0),
            None => Err(item),
        }
    }

    /// Whether an fsync has failed: nothing may be committed from now on.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}

impl<T> WalSync<T> {
    /// Releases everything submitted (after a last fsync) and stops the thread.
    pub fn stop(&mut self) {
        self.sender = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl<T> Drop for WalSync<T> {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn items_are_released_in_order_after_an_fsync() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("spool.db");
        std::fs::write(dir.path().join("spool.db-wal"), b"frames").unwrap();
        let released = Arc::new(Mutex::new(Vec::new()));
        let seen = released.clone();
        let mut sync = WalSync::start(&db, 4, move |result, items: Vec<u32>| {
            assert!(result.is_ok());
            seen.lock().unwrap().extend(items);
        })
        .unwrap();
        for i in 0..100 {
            sync.submit(i).unwrap();
        }
        sync.stop();
        assert_eq!(*released.lock().unwrap(), (0..100).collect::<Vec<_>>());
        assert!(!sync.failed());
        assert_eq!(sync.submit(7), Err(7), "a stopped thread takes nothing");
    }

    #[test]
    fn a_failed_fsync_fails_its_items_and_every_later_one() {
        let dir = tempfile::tempdir().unwrap();
        // No WAL file: the fsync cannot happen.
        let db = dir.path().join("spool.db");
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let seen = outcomes.clone();
        let mut sync = WalSync::start(&db, 4, move |result, items: Vec<u32>| {
            seen.lock()
                .unwrap()
                .extend(items.into_iter().map(|i| (i, result.is_ok())));
        })
        .unwrap();
        sync.submit(1).unwrap();
        while !sync.failed() {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Even once the file is there, nothing is vouched for again.
        std::fs::write(dir.path().join("spool.db-wal"), b"frames").unwrap();
        sync.submit(2).unwrap();
        sync.stop();
        assert_eq!(*outcomes.lock().unwrap(), [(1, false), (2, false)]);
    }
}
