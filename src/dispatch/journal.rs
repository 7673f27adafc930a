//! The delivered journal: Refiner's 2xx answers, recorded where a killed process cannot
//! forget them, in the moment between the answer and the spool committing its ack.
//!
//! Why it exists: an ack survives a crash only once the spool's transaction is committed,
//! and with `synchronous=FULL` every commit waits for an fsync (milliseconds), often behind
//! the group commit already under way. A process killed in that window has been told by
//! Refiner that the event arrived, but the next process does not know and sends it again.
//! Here each answer is appended with one `write(2)` and no fsync: the kernel keeps the bytes
//! when the process dies, so after a SIGKILL, an OOM kill or a panic the next process finds
//! the events that were delivered and acks them without calling Refiner again.
//!
//! Invariants and failure semantics:
//! - Only events Refiner answered 2xx are written. An entry names the event by its spool
//!   `seq`, source and `messageId`; a leased event is taken as delivered only when all three
//!   match (seqs are never reused, and the `messageId` guards against a journal left beside
//!   another spool file). The journal can therefore never make an undelivered event leave
//!   the queue: at-least-once delivery does not depend on it.
//! - Entries are not fsync'd: after a power loss or an OS crash the journal may lack its last
//!   entries or end in a torn line, which is ignored. Those events are sent again, as they
//!   would be without the journal. Failing to write the journal only costs that too: it is
//!   logged and delivery goes on.
//! - The journal is bounded: it is written in generations of [`ENTRIES_PER_FILE`] entries,
//!   and a generation's file is deleted once every ack written in it has been committed to
//!   the spool. An ack the spool kept refusing ([`Ticket::keep`]) keeps its file, so the
//!   next process acks the event instead of sending it again. On a clean stop with every
//!   ack committed, nothing is left.
//! - At start, the previous process's files are read into memory (the recovered entries),
//!   copied into the first new generation (so a second crash keeps them) and removed. An
//!   event of the recovered entries is acked without a call when it is leased.
//! - One process owns the directory (as it owns the spool file).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// Entries per journal file before the next generation starts. Small enough that the files
/// left by a crash are read in a moment, large enough that files are not created per call.
pub const ENTRIES_PER_FILE: usize = 4096;

/// A delivered event as the journal names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: i64,
    pub source: String,
    pub message_id: String,
}

/// The journal of one process.
pub struct Journal {
    dir: PathBuf,
    inner: Mutex<Inner>,
    /// Entries found at start: seq → (source, messageId).
    recovered: Mutex<HashMap<i64, (String, String)>>,
}

struct Inner {
    file: File,
    generation: u64,
    written: usize,
    /// Per generation, the acks written in it whose spool commit is still pending.
    pending: BTreeMap<u64, usize>,
    /// Past generations whose files still exist.
    past: Vec<u64>,
    /// A write failed and was logged; the next failures are not (a full disk would flood
    /// the log), until a write succeeds again.
    failing: bool,
}

/// Held while acks written to the journal wait for their spool commit; dropping it says the
/// commit is done (or given up), so their generation may be deleted.
pub struct Ticket {
    journal: Arc<Journal>,
    generation: u64,
    kept: bool,
}

impl Ticket {
    /// The spool would not commit these acks: keep their entries for the next process.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let mut inner = self.journal.lock();
        if let Some(count) = inner.pending.get_mut(&self.generation) {
            *count = count.saturating_sub(1);
        }
        self.journal.sweep(&mut inner);
    }
}

impl Journal {
    /// Opens the journal in `dir` (created if missing), reading what a previous process left.
    pub fn open(dir: &Path) -> io::Result<Journal> {
        fs::create_dir_all(dir)?;
        let mut old: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            if let Some(generation) = generation_of(&path) {
                old.push((generation, path));
            }
        }
        old.sort();
        let mut recovered = HashMap::new();
        for (_, path) in &old {
            let reader = BufReader::new(File::open(path)?);
            for line in reader.lines() {
                // A torn or unreadable line (a power loss mid-write) is skipped: its event
                // is sent again, which is what would happen without the journal.
                let Ok(line) = line else { break };
                if let Some(entry) = parse(&line) {
                    recovered.insert(entry.seq, (entry.source, entry.message_id));
                }
            }
        }
        let generation = old.last().map_or(0, |(g, _)| g + 1);
        let mut file = create(dir, generation)?;
        let mut text = String::new();
        for (seq, (source, message_id)) in &recovered {
            text.push_str(&line(*seq, source, message_id));
        }
        file.write_all(text.as_bytes())?;
        for (_, path) in &old {
            fs::remove_file(path)?;
        }
        if !recovered.is_empty() {
            tracing::info!(
                events = recovered.len(),
                "the delivered journal lists events a previous process delivered"
            );
        }
        Ok(Journal {
            dir: dir.to_path_buf(),
            inner: Mutex::new(Inner {
                file,
                generation,
                written: recovered.len(),
                pending: BTreeMap::new(),
                past: Vec::new(),
                failing: false,
            }),
            recovered: Mutex::new(recovered),
        })
    }

    /// Records events Refiner answered 2xx. Keep the ticket until their ack is committed to
    /// the spool. `None` when the journal could not be written (logged): the events are then
    /// protected by the spool's commit alone.
    pub fn record<'a>(
        self: &Arc<Self>,
        events: impl IntoIterator<Item = (i64, &'a str, &'a str)>,
    ) -> Option<Ticket> {
        let mut text = String::new();
        let mut count = 0;
        for (seq, source, message_id) in events {
            text.push_str(&line(seq, source, message_id));
            count += 1;
        }
        if count == 0 {
            return None;
        }
        let mut inner = self.lock();
        if inner.written >= ENTRIES_PER_FILE {
            match create(&self.dir, inner.generation + 1) {
                Ok(file) => {
                    inner.file = file;
                    let past = inner.generation;
                    inner.past.push(past);
                    inner.generation += 1;
                    inner.written = 0;
                    self.sweep(&mut inner);
                }
                Err(e) => tracing::warn!(error = %e, "cannot start a new delivered journal file"),
            }
        }
        // One write per answer: either it reached the kernel whole, or the process died
        // before it and the answer is forgotten as it would be without the journal.
        if let Err(e) = inner.file.write_all(text.as_bytes()) {
            if !inner.failing {
                tracing::warn!(error = %e, "writing the delivered journal failed");
                inner.failing = true;
            }
            return None;
        }
        inner.failing = false;
        inner.written += count;
        let generation = inner.generation;
        *inner.pending.entry(generation).or_default() += 1;
        Some(Ticket {
            journal: self.clone(),
            generation,
            kept: false,
        })
    }

    /// Whether a previous process delivered this event (and forgets it: it is acked now).
    pub fn take_recovered(&self, seq: i64, source: &str, message_id: &str) -> bool {
        let mut recovered = self.recovered.lock().unwrap_or_else(|e| e.into_inner());
        if recovered.is_empty() {
            return false;
        }
        let matches = recovered
            .get(&seq)
            .is_some_and(|(s, m)| s == source && m == message_id);
        if matches {
            recovered.remove(&seq);
        }
        matches
    }

    /// Removes every file when no ack is pending (a clean stop: every worker settled what
    /// it held), so the next start reads nothing. Recovered entries still unmatched are
    /// dropped too: their events were committed by the process that delivered them, or
    /// would have been leased and matched by now.
    pub fn clear_if_settled(&self) {
        let inner = self.lock();
        if inner.pending.values().all(|n| *n == 0) {
            for generation in inner.past.iter().chain([&inner.generation]) {
                let _ = fs::remove_file(path_of(&self.dir, *generation));
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Deletes the files of past generations whose acks are all committed.
    fn sweep(&self, inner: &mut Inner) {
        let Inner { past, pending, .. } = inner;
        past.retain(|generation| {
            if pending.get(generation).is_some_and(|n| *n > 0) {
                return true;
            }
            pending.remove(generation);
            if let Err(e) = fs::remove_file(path_of(&self.dir, *generation)) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(error = %e, "cannot remove a delivered journal file");
                }
            }
            false
        });
    }
}

fn path_of(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{generation:020}.journal"))
}

fn generation_of(path: &Path) -> Option<u64> {
    if path.extension()? != "journal" {
        return None;
    }
    path.file_stem()?.to_str()?.parse().ok()
}

fn create(dir: &Path, generation: u64) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path_of(dir, generation))
}

/// One entry: a JSON array `[seq, source, messageId]` and a newline (any text is safe in it).
fn line(seq: i64, source: &str, message_id: &str) -> String {
    let mut text = serde_json::json!([seq, source, message_id]).to_string();
    text.push('\n');
    text
}

fn parse(line: &str) -> Option<Entry> {
    let (seq, source, message_id): (i64, String, String) = serde_json::from_str(line).ok()?;
    Some(Entry {
        seq,
        source,
        message_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path) -> Vec<u64> {
        let mut found: Vec<u64> = fs::read_dir(dir)
            .expect("read_dir")
            .filter_map(|e| generation_of(&e.expect("entry").path()))
            .collect();
        found.sort();
        found
    }

    #[test]
    fn a_killed_process_leaves_its_answers_for_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Arc::new(Journal::open(dir.path()).expect("open"));
        let ticket = journal.record([(7, "web", "m-7"), (8, "web", "m-8")]);
        assert!(ticket.is_some());
        // Killed: nothing settles, nothing is dropped in order.
        std::mem::forget(ticket);
        drop(journal);

        let next = Journal::open(dir.path()).expect("reopen");
        assert!(
            !next.take_recovered(7, "web", "other-message"),
            "messageId must match"
        );
        assert!(!next.take_recovered(7, "app", "m-7"), "source must match");
        assert!(next.take_recovered(7, "web", "m-7"));
        assert!(!next.take_recovered(7, "web", "m-7"), "taken once");
        assert!(next.take_recovered(8, "web", "m-8"));
        assert!(!next.take_recovered(9, "web", "m-9"));
    }

    #[test]
    fn recovered_entries_survive_a_second_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Arc::new(Journal::open(dir.path()).expect("open"));
        std::mem::forget(journal.record([(1, "web", "m-1")]));
        drop(journal);
        // The second process dies before leasing the event.
        drop(Journal::open(dir.path()).expect("second"));
        let third = Journal::open(dir.path()).expect("third");
        assert!(third.take_recovered(1, "web", "m-1"));
        assert_eq!(
            files(dir.path()).len(),
            1,
            "old generations are removed at start"
        );
    }

    #[test]
    fn a_torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Arc::new(Journal::open(dir.path()).expect("open"));
        std::mem::forget(journal.record([(1, "web", "m-1")]));
        drop(journal);
        let path = path_of(dir.path(), 0);
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(b"[2,\"web\",\"m-").expect("write");
        let next = Journal::open(dir.path()).expect("reopen");
        assert!(next.take_recovered(1, "web", "m-1"));
        assert!(!next.take_recovered(2, "web", "m-2"));
    }

    #[test]
    fn committed_generations_are_deleted_and_kept_ones_stay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Arc::new(Journal::open(dir.path()).expect("open"));
        let mut first = None;
        let mut kept = None;
        for seq in 0..(2 * ENTRIES_PER_FILE as i64 + 1) {
            let ticket = journal.record([(seq, "web", "m")]);
            if seq == 0 {
                first = ticket;
            } else if seq == ENTRIES_PER_FILE as i64 {
                kept = ticket;
            }
        }
        assert_eq!(
            files(dir.path()),
            vec![0, 1, 2],
            "generations 0 and 1 have pending acks"
        );
        drop(first);
        assert_eq!(
            files(dir.path()),
            vec![1, 2],
            "generation 0 is committed: deleted"
        );
        kept.expect("ticket").keep();
        assert_eq!(
            files(dir.path()),
            vec![1, 2],
            "a kept ack keeps its generation"
        );
        journal.clear_if_settled();
        assert_eq!(
            files(dir.path()),
            vec![1, 2],
            "not cleared while an ack is kept"
        );
    }

    #[test]
    fn a_clean_stop_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Arc::new(Journal::open(dir.path()).expect("open"));
        let ticket = journal.record([(1, "web", "m-1")]);
        drop(ticket);
        journal.clear_if_settled();
        assert!(files(dir.path()).is_empty());
        drop(journal);
        let next = Journal::open(dir.path()).expect("reopen");
        assert!(!next.take_recovered(1, "web", "m-1"));
    }

    #[test]
    fn any_message_id_round_trips() {
        let entry = parse(line(5, "web", "tab\tnew\nline \"quoted\"").trim_end()).expect("parse");
        assert_eq!(entry.message_id, "tab\tnew\nline \"quoted\"");
        assert_eq!(entry.seq, 5);
    }
}
