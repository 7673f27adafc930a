//! The partition owner's dedup index: the 24 h promise kept on disk and in a JetStream
//! stream, not in the server's memory.
//!
//! A retried event keeps its user, so it lands in the same partition: each partition has
//! its own index, held by the partition's owner while it consumes. JetStream's duplicate
//! window is short (`nats.duplicate_window_secs`, minutes: client libraries' fast retries);
//! everything older is caught here, when the owner consumes, so ingest stays answerable by
//! any node without a lookup.
//!
//! Layout in the stream `nats.dedup_stream` (limits retention, max age twice the window):
//! - `<prefix>.dedup.<p>.log`: the journal, one message per pulled batch, carrying the new
//!   ids of the batch as 24-byte entries (key, value);
//! - `<prefix>.dedup.<p>.run.<id>`: the chunks of one run file, in the embedded spool's run
//!   format ([`crate::spool::dedup::run`]: sorted entries, Bloom filter, fence);
//! - `<prefix>.dedup.<p>.manifest`: the live runs and the last journal message they cover.
//!
//! An entry's value packs the second it was first seen (high 32 bits) and the low 32 bits of
//! its event's stream sequence, so values order by time (expiry and merges compare values
//! with `cutoff_secs << 32`) and an event JetStream delivers again (a retry, a take-over)
//! is recognised as itself rather than as a repeat.
//!
//! Invariants:
//! - An id is in the journal (acknowledged by JetStream) before its event is handed to
//!   delivery or dropped as a repeat: whatever was acked from the events stream has its id
//!   persisted. A crash before the journal write leaves the batch unacked; the next owner
//!   sees those events again, in stream order, so the first copy of an id is always
//!   recorded before a later repeat is judged.
//! - A new owner deletes the partition's consumer before it loads the index, so no ack of
//!   the old owner can land after the load (its acks go to a consumer that is gone).
//! - The manifest is written with `Nats-Expected-Last-Subject-Sequence`: an owner whose view
//!   is stale (another node wrote a manifest since it loaded) fails and reloads.
//! - A run is listed in a manifest only after all its chunks were acknowledged; the journal
//!   and replaced runs are purged only after the manifest that supersedes them.
//! - Memory: at most [`FLUSH_IDS`] ids (or [`NatsSpoolOptions::dedup_flush`] worth) per
//!   partition on the heap; runs cost their mapped filter and fence (about 1.3 bytes per id).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use async_nats::jetstream::stream::DirectGetErrorKind;

use super::*;
use crate::spool::dedup::run::{self, Run};
use crate::spool::sqlite::keys::{dedup_key, PassThrough};

/// Ids a partition keeps on the heap before it writes them out as a run.
pub const FLUSH_IDS: usize = 16_384;
/// Runs of one size class merged at once.
const MERGE_FAN_IN: usize = 4;
/// Entries in the smallest size class.
const TIER_BASE: u64 = 16_384;
/// Bytes of a run file per chunk message (below the server's default 1 MiB payload).
const CHUNK: usize = 512 * 1024;
const ENTRY: usize = 24;
/// Entries one journal message holds at most (a pull of packs can bring hundreds of
/// thousands of new ids; NATS refuses messages above the server's `max_payload`).
const JOURNAL_ENTRIES: usize = CHUNK / ENTRY;

/// What the index says about an event pulled from its partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// First seen now: recorded.
    New,
    /// The same event seen before (delivered again by JetStream): deliver.
    Again,
    /// Another event with this id was accepted within the window: drop.
    Repeat,
}

/// The packed value of an entry: second first seen, and the event's sequence (low bits).
pub fn pack(seen_secs: i64, seq: u64) -> i64 {
    (seen_secs << 32) | (seq & 0xffff_ffff) as i64
}

/// The smallest value still within the window at `now_secs`.
pub fn cutoff(now_secs: i64, window: Duration) -> i64 {
    (now_secs - window.as_secs() as i64) << 32
}

/// The live runs of a partition, as published.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Manifest {
    runs: Vec<RunRef>,
    /// Journal messages up to this stream sequence are in the runs.
    log_upto: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunRef {
    id: i64,
    chunks: u32,
    count: u64,
    max_seen: i64,
}

/// One partition's index, owned by the node that owns the partition.
pub struct PartitionIndex {
    partition: u32,
    dir: PathBuf,
    memtable: HashMap<u128, i64, PassThrough>,
    /// Entries recorded and not yet written to the journal.
    unlogged: Vec<(u128, i64)>,
    runs: Vec<(RunRef, Run)>,
    /// Subject sequence of the manifest this index was loaded from or last wrote (0: none).
    manifest_seq: u64,
    /// The last journal message reflected in the memtable.
    log_high: u64,
    /// The journal message the runs cover (the manifest's `log_upto`).
    log_upto: u64,
    last_flush: Instant,
}

impl PartitionIndex {
    /// Judges the event `seq` with key `key` at `now_secs`, recording it when new.
    pub fn check(&mut self, key: u128, seq: u64, now_secs: i64, window: Duration) -> Verdict {
        let floor = cutoff(now_secs, window);
        let found = self.memtable.get(&key).copied().or_else(|| {
            self.runs
                .iter()
                .rev()
                .find_map(|(_, r)| r.find(key).ok().flatten())
        });
        match found {
            Some(value) if value >= floor => {
                if value & 0xffff_ffff == (seq & 0xffff_ffff) as i64 {
                    Verdict::Again
                } else {
                    Verdict::Repeat
                }
            }
            _ => {
                let value = pack(now_secs, seq);
                self.memtable.insert(key, value);
                self.unlogged.push((key, value));
                Verdict::New
            }
        }
    }

    /// Ids this index remembers (heap and runs).
    pub fn ids(&self) -> u64 {
        self.memtable.len() as u64 + self.runs.iter().map(|(r, _)| r.count).sum::<u64>()
    }

    fn due(&self, every: Duration) -> bool {
        self.memtable.len() >= FLUSH_IDS
            || (!self.memtable.is_empty() && self.last_flush.elapsed() >= every)
    }
}

impl Drop for PartitionIndex {
    /// The run files are a cache of the stream: gone with the index (mappings stay valid).
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The dedup stream and this node's partition indexes.
pub struct DedupStore {
    js: jetstream::Context,
    stream: stream::Stream,
    prefix: String,
    window: Duration,
    flush_every: Duration,
    dir: PathBuf,
    pub repeats: prometheus::IntCounter,
}

impl DedupStore {
    pub(super) async fn open(
        js: &jetstream::Context,
        options: &NatsSpoolOptions,
        name: &str,
        node_id: &str,
        metrics: &Metrics,
    ) -> Result<DedupStore, SpoolError> {
        let config = stream::Config {
            name: name.to_string(),
            subjects: vec![format!("{}.dedup.>", options.subject_prefix)],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: options.replicas,
            max_age: options.dedup_window * 2,
            duplicate_window: Duration::from_secs(60),
            allow_direct: true,
            ..Default::default()
        };
        js.create_or_update_stream(config)
            .await
            .map_err(|e| storage(&format!("cannot set up stream {name}"), e))?;
        let stream = js
            .get_stream(name)
            .await
            .map_err(|e| storage("cannot open the dedup stream", e))?;
        let dir = options.dedup_dir.join(node_id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| storage("cannot create the dedup index directory", e))?;
        let repeats = prometheus::IntCounter::new(
            "gateway_nats_dedup_dropped_total",
            "Events the partition owner dropped because their messageId was accepted before.",
        )
        .expect("a valid metric");
        let _ = metrics.registry.register(Box::new(repeats.clone()));
        Ok(DedupStore {
            js: js.clone(),
            stream,
            prefix: options.subject_prefix.clone(),
            window: options.dedup_window,
            flush_every: options.dedup_flush,
            dir,
            repeats,
        })
    }

    fn subject(&self, partition: u32, what: &str) -> String {
        format!("{}.dedup.{partition}.{what}", self.prefix)
    }

    /// The key of an event in the index: of its `Nats-Msg-Id` (source and `messageId`;
    /// a replayed dead letter has its own, so a replay is not a repeat of its original).
    pub fn key(msg_id: &str) -> u128 {
        dedup_key("nats", msg_id)
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// Loads partition `partition`'s index from the stream: the manifest's runs into local
    /// files, then the journal after them into the heap.
    pub async fn load(&self, partition: u32) -> Result<PartitionIndex, SpoolError> {
        // A directory per load: a reload replaces an index whose drop removes its own.
        let dir = self.dir.join(format!("p{partition}-{}", new_run_id()));
        std::fs::create_dir_all(&dir).map_err(|e| storage("cannot create a dedup directory", e))?;
        let (manifest, manifest_seq) = self.manifest(partition).await?;
        let mut index = PartitionIndex {
            partition,
            dir,
            memtable: HashMap::with_hasher(PassThrough),
            unlogged: Vec::new(),
            runs: Vec::new(),
            manifest_seq,
            log_high: manifest.log_upto,
            log_upto: manifest.log_upto,
            last_flush: Instant::now(),
        };
        for reference in manifest.runs {
            let run = self.download(&index, &reference).await?;
            index.runs.push((reference, run));
        }
        self.replay(&mut index).await?;
        Ok(index)
    }

    async fn manifest(&self, partition: u32) -> Result<(Manifest, u64), SpoolError> {
        match self
            .stream
            .direct_get_last_for_subject(self.subject(partition, "manifest"))
            .await
        {
            Ok(message) => serde_json::from_slice(&message.payload)
                .map(|m| (m, message.sequence))
                .map_err(|e| storage("the dedup manifest cannot be read", e)),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok((Manifest::default(), 0)),
            Err(e) => Err(storage("cannot read the dedup manifest", e)),
        }
    }

    /// The messages of `subject` after sequence `after`, one at a time.
    async fn next(&self, subject: &str, after: u64) -> Result<Option<(u64, Vec<u8>)>, SpoolError> {
        match self
            .stream
            .direct_get_next_for_subject(subject, Some(after + 1))
            .await
        {
            Ok(message) => Ok(Some((message.sequence, message.payload.to_vec()))),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(storage("cannot read the dedup stream", e)),
        }
    }

    async fn download(
        &self,
        index: &PartitionIndex,
        reference: &RunRef,
    ) -> Result<Run, SpoolError> {
        let subject = self.subject(index.partition, &format!("run.{}", reference.id));
        let path = index.dir.join(run::file_name(reference.id));
        let failed = |e: std::io::Error| storage("cannot write a dedup run", e);
        // Chunk by chunk into the file: a run of any size takes one chunk of memory.
        let mut file = std::fs::File::create(&path).map_err(failed)?;
        let (mut at, mut chunks) = (0u64, 0u32);
        while chunks < reference.chunks {
            let Some((seq, chunk)) = self.next(&subject, at).await? else {
                return Err(SpoolError::Storage(format!(
                    "dedup run {} of partition {} is incomplete",
                    reference.id, index.partition
                )));
            };
            file.write_all(&chunk).map_err(failed)?;
            at = seq;
            chunks += 1;
        }
        drop(file);
        let run =
            Run::open(&path, reference.id).map_err(|e| storage("a dedup run is invalid", e))?;
        if run.info.count != reference.count {
            return Err(SpoolError::Storage(
                "a dedup run does not match its manifest".into(),
            ));
        }
        Ok(run)
    }

    async fn replay(&self, index: &mut PartitionIndex) -> Result<(), SpoolError> {
        let subject = self.subject(index.partition, "log");
        let floor = cutoff(now_ms() / 1000, self.window);
        while let Some((seq, body)) = self.next(&subject, index.log_high).await? {
            for entry in body.chunks_exact(ENTRY) {
                let (key, value) = decode_entry(entry);
                if value >= floor {
                    index.memtable.entry(key).or_insert(value);
                }
            }
            index.log_high = seq;
        }
        Ok(())
    }

    /// Writes the entries recorded since the last call to the journal, in messages of at
    /// most [`JOURNAL_ENTRIES`] entries, and waits for JetStream's acks, retrying until it
    /// succeeds or `stopped` is set (false then).
    pub async fn log(&self, index: &mut PartitionIndex, stopped: &watch::Receiver<bool>) -> bool {
        let subject = self.subject(index.partition, "log");
        let mut backoff = Duration::from_millis(50);
        while !index.unlogged.is_empty() {
            let chunk = index.unlogged.len().min(JOURNAL_ENTRIES);
            let mut body = Vec::with_capacity(chunk * ENTRY);
            for (key, value) in &index.unlogged[..chunk] {
                body.extend_from_slice(&encode_entry(*key, *value));
            }
            match self.publish(&subject, body, None).await {
                Ok(seq) => {
                    index.unlogged.drain(..chunk);
                    index.log_high = index.log_high.max(seq);
                    backoff = Duration::from_millis(50);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(partition = index.partition, error = %e, "cannot write the dedup journal")
                }
            }
            if *stopped.borrow() {
                return false;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        true
    }

    async fn publish(
        &self,
        subject: &str,
        body: Vec<u8>,
        expect_last: Option<u64>,
    ) -> Result<u64, SpoolError> {
        let mut headers = HeaderMap::new();
        if let Some(seq) = expect_last {
            headers.insert(
                "Nats-Expected-Last-Subject-Sequence",
                seq.to_string().as_str(),
            );
        }
        let ack = self
            .js
            .publish_with_headers(subject.to_string(), headers, body.into())
            .await
            .map_err(|e| storage("publishing to the dedup stream failed", e))?;
        let ack = ack
            .await
            .map_err(|e| storage("JetStream did not acknowledge a dedup write", e))?;
        Ok(ack.sequence)
    }

    /// Writes the heap out as a run, merges one size class of runs, drops expired runs and
    /// publishes the new manifest, when due. A stale manifest (another owner wrote one since
    /// this index was loaded) reloads the index from the stream.
    pub async fn maintain(&self, index: &mut PartitionIndex) -> Result<(), SpoolError> {
        if !index.due(self.flush_every) || !index.unlogged.is_empty() {
            return Ok(());
        }
        match self.compact(index).await {
            Err(e) if e.to_string().contains("wrong last sequence") => {
                tracing::warn!(
                    partition = index.partition,
                    "the dedup manifest changed under this owner; reloading"
                );
                *index = self.load(index.partition).await?;
                Ok(())
            }
            other => {
                index.last_flush = Instant::now();
                other
            }
        }
    }

    async fn compact(&self, index: &mut PartitionIndex) -> Result<(), SpoolError> {
        let floor = cutoff(now_ms() / 1000, self.window);
        let mut fresh: Vec<(RunRef, Run)> = Vec::new();
        let entries: Vec<(u128, i64)> = index
            .memtable
            .iter()
            .filter(|(_, v)| **v >= floor)
            .map(|(k, v)| (*k, *v))
            .collect();
        if !entries.is_empty() {
            let id = new_run_id();
            let path = index.dir.join(run::file_name(id));
            let info = tokio::task::block_in_place(|| run::write_sorted(&path, entries))
                .map_err(|e| storage("cannot write a dedup run", e))?;
            fresh.push((reference(id, info), open(&path, id)?));
        }
        let mut removed: Vec<i64> = index
            .runs
            .iter()
            .filter(|(r, _)| r.max_seen < floor)
            .map(|(r, _)| r.id)
            .collect();
        let result = self
            .merge_and_publish(index, &mut fresh, &mut removed, floor)
            .await;
        if result.is_err() {
            for (r, _) in &fresh {
                let _ = std::fs::remove_file(index.dir.join(run::file_name(r.id)));
            }
            return result;
        }
        for (r, _) in index.runs.iter().filter(|(r, _)| removed.contains(&r.id)) {
            let _ = std::fs::remove_file(index.dir.join(run::file_name(r.id)));
        }
        index.runs.retain(|(r, _)| !removed.contains(&r.id));
        index.runs.extend(fresh);
        index.memtable = HashMap::with_hasher(PassThrough);
        index.log_upto = index.log_high;
        self.purge(index.partition, index.log_upto, &removed).await;
        Ok(())
    }

    /// Merges the oldest [`MERGE_FAN_IN`] runs of a size class that has as many (dropping
    /// expired entries), uploads the new runs and publishes the manifest.
    async fn merge_and_publish(
        &self,
        index: &mut PartitionIndex,
        fresh: &mut Vec<(RunRef, Run)>,
        removed: &mut Vec<i64>,
        floor: i64,
    ) -> Result<(), SpoolError> {
        let sizes: Vec<(i64, u64)> = index
            .runs
            .iter()
            .chain(fresh.iter())
            .filter(|(r, _)| !removed.contains(&r.id))
            .map(|(r, _)| (r.id, r.count))
            .collect();
        if let Some(group) = merge_group(&sizes) {
            let id = new_run_id();
            let path = index.dir.join(run::file_name(id));
            let merged = {
                let inputs: Vec<&Run> = index
                    .runs
                    .iter()
                    .chain(fresh.iter())
                    .filter(|(r, _)| group.contains(&r.id))
                    .map(|(_, run)| run)
                    .collect();
                let cancel = AtomicBool::new(false);
                tokio::task::block_in_place(|| run::merge(&inputs, &path, floor, &cancel))
                    .map_err(|e| storage("cannot merge dedup runs", e))?
            };
            let dir = index.dir.clone();
            fresh.retain(|(r, _)| {
                let gone = group.contains(&r.id);
                if gone {
                    let _ = std::fs::remove_file(dir.join(run::file_name(r.id)));
                }
                !gone
            });
            let old: Vec<i64> = group
                .iter()
                .copied()
                .filter(|id| index.runs.iter().any(|(r, _)| r.id == *id))
                .collect();
            removed.extend(old);
            if let Some(info) = merged {
                fresh.push((reference(id, info), open(&path, id)?));
            }
        }
        for (r, _) in fresh.iter_mut() {
            r.chunks = self.upload(index, r.id).await?;
        }
        let manifest = Manifest {
            runs: index
                .runs
                .iter()
                .filter(|(r, _)| !removed.contains(&r.id))
                .chain(fresh.iter())
                .map(|(r, _)| r.clone())
                .collect(),
            log_upto: index.log_high,
        };
        let body = serde_json::to_vec(&manifest).unwrap_or_default();
        let subject = self.subject(index.partition, "manifest");
        index.manifest_seq = self
            .publish(&subject, body, Some(index.manifest_seq))
            .await?;
        Ok(())
    }

    /// Publishes a run file's chunks, read one at a time (a run of any size takes one chunk
    /// of memory); the number of chunks.
    async fn upload(&self, index: &PartitionIndex, id: i64) -> Result<u32, SpoolError> {
        let failed = |e: std::io::Error| storage("cannot read a dedup run", e);
        let mut file = std::fs::File::open(index.dir.join(run::file_name(id))).map_err(failed)?;
        let subject = self.subject(index.partition, &format!("run.{id}"));
        let mut chunks = 0u32;
        loop {
            let mut chunk = Vec::with_capacity(CHUNK);
            (&mut file)
                .take(CHUNK as u64)
                .read_to_end(&mut chunk)
                .map_err(failed)?;
            if chunk.is_empty() {
                break;
            }
            self.publish(&subject, chunk, None).await?;
            chunks += 1;
        }
        Ok(chunks)
    }

    /// Removes what the last manifest superseded: the journal it covers, the runs it
    /// dropped, older manifests. Best effort: leftovers expire with the stream's max age.
    async fn purge(&self, partition: u32, log_upto: u64, removed: &[i64]) {
        let log = self.subject(partition, "log");
        let mut purges = vec![self.stream.purge().filter(log).sequence(log_upto + 1).await];
        for id in removed {
            let subject = self.subject(partition, &format!("run.{id}"));
            purges.push(self.stream.purge().filter(subject).await);
        }
        let manifest = self.subject(partition, "manifest");
        purges.push(self.stream.purge().filter(manifest).keep(1).await);
        for purge in purges {
            if let Err(e) = purge {
                tracing::debug!(partition, error = %e, "cannot purge the dedup stream");
            }
        }
    }
}

fn reference(id: i64, info: run::RunInfo) -> RunRef {
    RunRef {
        id,
        chunks: 0,
        count: info.count,
        max_seen: info.max_seen,
    }
}

fn open(path: &Path, id: i64) -> Result<Run, SpoolError> {
    Run::open(path, id).map_err(|e| storage("cannot open a dedup run", e))
}

/// The oldest [`MERGE_FAN_IN`] runs of the smallest size class that has that many.
fn merge_group(sizes: &[(i64, u64)]) -> Option<Vec<i64>> {
    let mut classes: std::collections::BTreeMap<u32, Vec<i64>> = Default::default();
    for (id, count) in sizes {
        classes.entry(tier(*count)).or_default().push(*id);
    }
    classes
        .into_values()
        .find(|ids| ids.len() >= MERGE_FAN_IN)
        .map(|mut ids| {
            ids.sort_unstable();
            ids.truncate(MERGE_FAN_IN);
            ids
        })
}

fn new_run_id() -> i64 {
    ((now_ms() & 0x7fff_ffff_ffff) << 16) | i64::from(fastrand::u16(..))
}

fn encode_entry(key: u128, value: i64) -> [u8; ENTRY] {
    let mut out = [0u8; ENTRY];
    out[..16].copy_from_slice(&key.to_be_bytes());
    out[16..].copy_from_slice(&value.to_le_bytes());
    out
}

fn decode_entry(bytes: &[u8]) -> (u128, i64) {
    let mut key = [0u8; 16];
    key.copy_from_slice(&bytes[..16]);
    let mut value = [0u8; 8];
    value.copy_from_slice(&bytes[16..ENTRY]);
    (u128::from_be_bytes(key), i64::from_le_bytes(value))
}

fn tier(count: u64) -> u32 {
    let mut tier = 0;
    let mut size = TIER_BASE;
    while count > size {
        size *= MERGE_FAN_IN as u64;
        tier += 1;
    }
    tier
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index(dir: &Path) -> PartitionIndex {
        PartitionIndex {
            partition: 0,
            dir: dir.to_path_buf(),
            memtable: HashMap::with_hasher(PassThrough),
            unlogged: Vec::new(),
            runs: Vec::new(),
            manifest_seq: 0,
            log_high: 0,
            log_upto: 0,
            last_flush: Instant::now(),
        }
    }

    #[test]
    fn values_order_by_time_whatever_the_sequence() {
        assert!(pack(100, u64::MAX) < pack(101, 0));
        assert!(pack(100, 7) >= cutoff(100 + 60, Duration::from_secs(60)));
        assert!(pack(99, 7) < cutoff(100 + 60, Duration::from_secs(60)));
    }

    #[test]
    fn a_repeat_is_another_sequence_and_the_same_event_is_not() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut index = index(&dir.path().join("p0"));
        let day = Duration::from_secs(86_400);
        let key = DedupStore::key("web:m1");
        assert_eq!(index.check(key, 10, 1_000, day), Verdict::New);
        assert_eq!(index.check(key, 10, 1_001, day), Verdict::Again);
        assert_eq!(index.check(key, 11, 1_002, day), Verdict::Repeat);
        assert_eq!(index.unlogged.len(), 1, "only the first copy is recorded");
        // Past the window the id is new again.
        assert_eq!(index.check(key, 12, 1_000 + 86_401, day), Verdict::New);
    }

    #[test]
    fn runs_are_found_with_their_values() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut index = index(dir.path());
        let entries: Vec<(u128, i64)> = (0..1_000u64)
            .map(|i| (DedupStore::key(&format!("web:m{i}")), pack(1_000, i)))
            .collect();
        let path = dir.path().join(run::file_name(1));
        let info = run::write_sorted(&path, entries).expect("run");
        index
            .runs
            .push((reference(1, info), open(&path, 1).expect("open")));
        let day = Duration::from_secs(86_400);
        let key = DedupStore::key("web:m500");
        assert_eq!(index.check(key, 500, 2_000, day), Verdict::Again);
        assert_eq!(index.check(key, 5_000, 2_000, day), Verdict::Repeat);
        let fresh = DedupStore::key("web:m5000");
        assert_eq!(index.check(fresh, 5_000, 2_000, day), Verdict::New);
        assert_eq!(index.ids(), 1_001);
    }

    #[test]
    fn merges_take_four_runs_of_one_size_class_oldest_first() {
        let small = [(5, 10), (1, 10), (3, 10), (2, 20_000), (4, 10)];
        assert_eq!(merge_group(&small), Some(vec![1, 3, 4, 5]));
        assert_eq!(merge_group(&small[..3]), None);
        assert!(tier(FLUSH_IDS as u64) < tier(FLUSH_IDS as u64 * 4 + 1));
    }

    #[test]
    fn journal_entries_round_trip() {
        let key = DedupStore::key("web:m1");
        assert_eq!(
            decode_entry(&encode_entry(key, pack(5, 9))),
            (key, pack(5, 9))
        );
    }
}
