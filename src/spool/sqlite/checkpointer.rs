//! Checkpoints the embedded spool's WAL on a thread of its own.
//!
//! A checkpoint copies committed WAL pages into the database file. Run by the writer's
//! commits (SQLite's automatic checkpoints), it took about a quarter of the writer's time
//! under sustained ingest; here it runs beside the writer on its own connection, in
//! `PASSIVE` mode, which never blocks the writer or readers. The writer keeps its automatic
//! checkpoint as a backstop (at a larger interval), so the WAL stays bounded even if this
//! thread falls behind or fails.
//!
//! Invariant: checkpointing moves data that is already durable in the WAL; it never decides
//! what is committed, so it cannot lose or expose an uncommitted write.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

/// How often the thread checkpoints while the spool is open.
const INTERVAL: Duration = Duration::from_millis(20);

/// The running checkpoint thread; stopped (and joined) by [`Checkpointer::stop`] or drop.
pub struct Checkpointer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts checkpointing the spool at `path` (already in WAL mode).
    pub fn start(path: &Path) -> rusqlite::Result<Checkpointer> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_millis(100))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("spool-checkpoint".into())
            .spawn(move || {
                let mut failing = false;
                while !stopped.load(Ordering::Relaxed) {
                    std::thread::sleep(INTERVAL);
                    let result = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
                    // A failure (a full disk) is retried; the writer's own checkpoints
                    // still bound the WAL. Logged once per spell, not every 20 ms.
                    match result {
                        Ok(()) => failing = false,
                        Err(e) if !failing => {
                            failing = true;
                            tracing::warn!(error = %e, "background checkpoint of the spool failed");
                        }
                        Err(_) => {}
                    }
                }
            })
            .map_err(|e| {
                crate::spool::sqlite::io_error(format!("cannot start the checkpoint thread: {e}"))
            })?;
        Ok(Checkpointer {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop();
    }
}
