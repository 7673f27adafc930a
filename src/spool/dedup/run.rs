//! One immutable run of a dedup index: a file of `(key, seen_at)` entries sorted by key,
//! with a split-block Bloom filter and a fence index (the first key of every block).
//!
//! Invariants:
//! - A run file is complete before anyone reads it: [`RunWriter::finish`] writes the header
//!   last and syncs the file; the spool registers a run only after that, so a file that is
//!   not registered (a crash mid-write) is an orphan and is deleted at start-up.
//! - Entries are strictly increasing by key (a key appears once per run).
//! - The Bloom filter has no false negatives: every key of the run passes it.
//! - Reading never panics: a file whose lengths do not add up is [`io::ErrorKind::InvalidData`].
//!
//! Layout (integers little-endian, keys big-endian so byte order is key order):
//! a 64-byte header (`RGDEDUP1`, version, count, min/max `seen_at`, Bloom blocks, fence
//! length), then `count` entries of 24 bytes (key 16, `seen_at` 8), then the Bloom filter
//! (blocks of eight u32 words), then the fence (one 16-byte key per block of
//! [`BLOCK_ENTRIES`] entries).

use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};

use memmap2::{Advice, Mmap, MmapOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Entries read per lookup: 170 × 24 bytes fit one 4 KiB page.
pub const BLOCK_ENTRIES: usize = 170;
const ENTRY: usize = 24;
const HEADER: usize = 64;
const MAGIC: &[u8; 8] = b"RGDEDUP1";
const VERSION: u32 = 1;
/// Bloom filter bits per key: about 1 % false positives for a split-block filter.
const BLOOM_BITS_PER_KEY: usize = 10;

/// A split-block Bloom filter (256-bit blocks, eight bits set per key, as in Parquet).
/// Keys are SHA-256 prefixes, uniformly random already: their own bits pick the block and
/// the bits, with no further hashing. Held as written to a run file (blocks of 32 bytes,
/// each eight little-endian words), so [`Bloom::may_contain`] reads a built filter and a
/// mapped one alike.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bloom {
    bytes: Vec<u8>,
}

const SALT: [u32; 8] = [
    0x47b6_137b,
    0x4497_4d91,
    0x8824_ad5b,
    0xa2b7_289d,
    0x7054_95c7,
    0x2df1_424b,
    0x9efc_4947,
    0x5c6b_fb31,
];

impl Bloom {
    /// A filter sized for up to `keys` keys.
    pub fn with_capacity(keys: usize) -> Bloom {
        let blocks = (keys * BLOOM_BITS_PER_KEY).div_ceil(256).max(1);
        Bloom {
            bytes: vec![0; blocks * 32],
        }
    }

    /// The byte offset of `key`'s block in an encoded filter of `len` bytes.
    fn block_at(key: u128, len: usize) -> usize {
        let high = (key >> 64) as u64;
        ((u128::from(high) * (len / 32) as u128) >> 64) as usize * 32
    }

    fn mask(key: u128) -> [u32; 8] {
        let h = key as u32;
        SALT.map(|salt| 1u32 << (h.wrapping_mul(salt) >> 27))
    }

    pub fn insert(&mut self, key: u128) {
        let at = Self::block_at(key, self.bytes.len());
        for (word, bit) in self.bytes[at..at + 32]
            .chunks_exact_mut(4)
            .zip(Self::mask(key))
        {
            let set = u32::from_le_bytes([word[0], word[1], word[2], word[3]]) | bit;
            word.copy_from_slice(&set.to_le_bytes());
        }
    }

    /// False only when `key` was never inserted into the filter `encoded` (a [`Bloom`]'s
    /// bytes, or a run file's filter).
    fn may_contain(encoded: &[u8], key: u128) -> bool {
        let at = Self::block_at(key, encoded.len());
        encoded[at..at + 32]
            .chunks_exact(4)
            .zip(Self::mask(key))
            .all(|(word, bit)| {
                let word = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
                word & bit != 0
            })
    }

    fn blocks(&self) -> usize {
        self.bytes.len() / 32
    }

    /// False only when `key` was never inserted.
    pub fn contains(&self, key: u128) -> bool {
        Self::may_contain(&self.bytes, key)
    }

    /// The filter as stored (see [`Bloom::from_stored`]).
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// A filter from [`Bloom::as_bytes`]; `None` when `bytes` is not a whole number of
    /// blocks (not a filter).
    pub fn from_stored(bytes: Vec<u8>) -> Option<Bloom> {
        (!bytes.is_empty() && bytes.len().is_multiple_of(32)).then_some(Bloom { bytes })
    }
}

/// The header of a run file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    count: u64,
    min_seen: i64,
    max_seen: i64,
    bloom_blocks: u64,
    fence_len: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER] {
        let mut out = [0u8; HEADER];
        out[..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&VERSION.to_le_bytes());
        out[16..24].copy_from_slice(&self.count.to_le_bytes());
        out[24..32].copy_from_slice(&self.min_seen.to_le_bytes());
        out[32..40].copy_from_slice(&self.max_seen.to_le_bytes());
        out[40..48].copy_from_slice(&self.bloom_blocks.to_le_bytes());
        out[48..56].copy_from_slice(&self.fence_len.to_le_bytes());
        out
    }

    fn decode(bytes: &[u8; HEADER]) -> io::Result<Header> {
        let u64_at = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(word)
        };
        if &bytes[..8] != MAGIC || bytes[8..12] != VERSION.to_le_bytes() {
            return Err(invalid("not a dedup run file of version 1"));
        }
        Ok(Header {
            count: u64_at(16),
            min_seen: u64_at(24) as i64,
            max_seen: u64_at(32) as i64,
            bloom_blocks: u64_at(40),
            fence_len: u64_at(48),
        })
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}

fn encode_entry(key: u128, seen_at: i64) -> [u8; ENTRY] {
    let mut out = [0u8; ENTRY];
    out[..16].copy_from_slice(&key.to_be_bytes());
    out[16..].copy_from_slice(&seen_at.to_le_bytes());
    out
}

fn decode_entry(bytes: &[u8]) -> (u128, i64) {
    let mut key = [0u8; 16];
    key.copy_from_slice(&bytes[..16]);
    let mut seen = [0u8; 8];
    seen.copy_from_slice(&bytes[16..ENTRY]);
    (u128::from_be_bytes(key), i64::from_le_bytes(seen))
}

/// The file name of run `id` in the index's directory.
pub fn file_name(id: i64) -> String {
    format!("run-{id:016}.dat")
}

/// The id of a run file's name, if it is one.
pub fn id_of(name: &str) -> Option<i64> {
    name.strip_prefix("run-")?
        .strip_suffix(".dat")?
        .parse()
        .ok()
}

/// Writes one run file from entries given in increasing key order.
pub struct RunWriter {
    path: PathBuf,
    out: BufWriter<File>,
    bloom: Bloom,
    fence: Vec<u128>,
    count: u64,
    min_seen: i64,
    max_seen: i64,
    last: Option<u128>,
}

impl RunWriter {
    /// Creates `path` (which must not exist) for at most `capacity` entries.
    pub fn create(path: &Path, capacity: usize) -> io::Result<RunWriter> {
        let file = File::options().write(true).create_new(true).open(path)?;
        let mut out = BufWriter::with_capacity(1 << 16, file);
        out.write_all(&[0u8; HEADER])?;
        Ok(RunWriter {
            path: path.to_path_buf(),
            out,
            bloom: Bloom::with_capacity(capacity),
            fence: Vec::with_capacity(capacity / BLOCK_ENTRIES + 1),
            count: 0,
            min_seen: i64::MAX,
            max_seen: i64::MIN,
            last: None,
        })
    }

    /// Adds the next entry; keys must increase strictly.
    pub fn push(&mut self, key: u128, seen_at: i64) -> io::Result<()> {
        if self.last.is_some_and(|last| key <= last) {
            return Err(invalid("dedup run entries out of order"));
        }
        if (self.count as usize).is_multiple_of(BLOCK_ENTRIES) {
            self.fence.push(key);
        }
        self.out.write_all(&encode_entry(key, seen_at))?;
        self.bloom.insert(key);
        self.count += 1;
        self.min_seen = self.min_seen.min(seen_at);
        self.max_seen = self.max_seen.max(seen_at);
        self.last = Some(key);
        Ok(())
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// Writes the filter, the fence and the header, and syncs the file: once this returns,
    /// the run survives a crash.
    pub fn finish(mut self) -> io::Result<RunInfo> {
        self.out.write_all(&self.bloom.bytes)?;
        for key in &self.fence {
            self.out.write_all(&key.to_be_bytes())?;
        }
        let header = Header {
            count: self.count,
            min_seen: self.min_seen,
            max_seen: self.max_seen,
            bloom_blocks: self.bloom.blocks() as u64,
            fence_len: self.fence.len() as u64,
        };
        self.out.seek(SeekFrom::Start(0))?;
        self.out.write_all(&header.encode())?;
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(RunInfo {
            count: self.count,
            min_seen: self.min_seen,
            max_seen: self.max_seen,
        })
    }
}

/// What the spool records of a run besides its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunInfo {
    pub count: u64,
    pub min_seen: i64,
    pub max_seen: i64,
}

/// An open run. The filter and the fence are mapped read-only from the file and read in
/// place: their pages are the kernel's page cache, which it can reclaim under memory
/// pressure (and read again on the next lookup), so the index's size over its window costs
/// the process no heap. The entries are not mapped: a lookup reads one block with `pread`
/// only when the filter says yes (about 1 % of fresh ids), so they stay out of the
/// process's resident memory. Only the header's figures live on the heap.
#[derive(Debug)]
pub struct Run {
    pub id: i64,
    pub info: RunInfo,
    file: File,
    /// The filter, then the fence: the file from the filter's offset to its end.
    map: Mmap,
    /// Length in `map` of the filter (the fence follows it), and the fence's length.
    bloom_len: usize,
    fence_len: usize,
}

impl Run {
    /// Opens run `id` at `path`, checking that its lengths add up and its fence is sorted.
    pub fn open(path: &Path, id: i64) -> io::Result<Run> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut head = [0u8; HEADER];
        file.read_exact_at(&mut head, 0)
            .map_err(|_| invalid("dedup run file shorter than its header"))?;
        let header = Header::decode(&head)?;
        let entries = header.count.checked_mul(ENTRY as u64);
        let bloom = header.bloom_blocks.checked_mul(32);
        let fence = header.fence_len.checked_mul(16);
        let expected = match (entries, bloom, fence) {
            (Some(e), Some(b), Some(f)) => (HEADER as u64)
                .checked_add(e)
                .and_then(|n| n.checked_add(b))
                .and_then(|n| n.checked_add(f)),
            _ => None,
        };
        let fence_expected = header.count.div_ceil(BLOCK_ENTRIES as u64);
        if expected != Some(len) || header.fence_len != fence_expected || header.bloom_blocks == 0 {
            return Err(invalid("dedup run file has inconsistent lengths"));
        }
        let bloom_at = HEADER as u64 + header.count * ENTRY as u64;
        let bloom_len = header.bloom_blocks as usize * 32;
        let mapped = bloom_len + header.fence_len as usize * 16;
        // SAFETY: a mapping is undefined behaviour if the file changes underneath it. Run
        // files are written once, synced and only then registered (module invariants); the
        // spool never writes to or truncates a registered file, and unlinking it (after a
        // merge or expiry) leaves existing mappings intact. The data directory belongs to
        // the gateway: another process truncating a run file would end it with SIGBUS, as
        // it would corrupt `spool.db`.
        #[allow(unsafe_code)]
        let map = unsafe { MmapOptions::new().offset(bloom_at).len(mapped).map(&file)? };
        // Lookups touch one filter block at random: no read-ahead.
        let _ = map.advise(Advice::Random);
        let run = Run {
            id,
            info: RunInfo {
                count: header.count,
                min_seen: header.min_seen,
                max_seen: header.max_seen,
            },
            file,
            map,
            bloom_len,
            fence_len: header.fence_len as usize,
        };
        if (1..run.fence_len).any(|i| run.fence_key(i - 1) >= run.fence_key(i)) {
            return Err(invalid("dedup run file's fence is not sorted"));
        }
        Ok(run)
    }

    /// The first key of entry block `i` (`i < fence_len`).
    fn fence_key(&self, i: usize) -> u128 {
        let at = self.bloom_len + i * 16;
        let mut key = [0u8; 16];
        key.copy_from_slice(&self.map[at..at + 16]);
        u128::from_be_bytes(key)
    }

    /// The `seen_at` of `key` in this run, if it has it.
    pub fn find(&self, key: u128) -> io::Result<Option<i64>> {
        if !Bloom::may_contain(&self.map[..self.bloom_len], key) {
            return Ok(None);
        }
        // The last block whose first key is at most `key`.
        let (mut low, mut high) = (0, self.fence_len);
        while low < high {
            let mid = (low + high) / 2;
            if self.fence_key(mid) <= key {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        let Some(block) = low.checked_sub(1) else {
            return Ok(None);
        };
        let start = block * BLOCK_ENTRIES;
        let end = (start + BLOCK_ENTRIES).min(self.info.count as usize);
        let mut buf = [0u8; BLOCK_ENTRIES * ENTRY];
        let buf = &mut buf[..(end - start) * ENTRY];
        self.file
            .read_exact_at(buf, (HEADER + start * ENTRY) as u64)?;
        let (mut low, mut high) = (0, end - start);
        while low < high {
            let mid = (low + high) / 2;
            let (k, seen) = decode_entry(&buf[mid * ENTRY..]);
            match k.cmp(&key) {
                std::cmp::Ordering::Less => low = mid + 1,
                std::cmp::Ordering::Greater => high = mid,
                std::cmp::Ordering::Equal => return Ok(Some(seen)),
            }
        }
        Ok(None)
    }

    /// Bytes that lookups keep warm (filter and fence): mapped, not heap.
    pub fn filter_bytes(&self) -> usize {
        self.map.len()
    }

    /// Its entries in key order, read sequentially in large chunks.
    pub fn cursor(&self) -> Cursor<'_> {
        Cursor {
            run: self,
            buf: Vec::new(),
            at: 0,
            next: 0,
        }
    }
}

/// Entries read per chunk by a [`Cursor`].
const CURSOR_ENTRIES: usize = 4096;

/// A sequential reader over a run's entries.
pub struct Cursor<'a> {
    run: &'a Run,
    buf: Vec<u8>,
    /// Position of `buf`'s next entry within `buf`.
    at: usize,
    /// Index of the first entry not yet read into `buf`.
    next: usize,
}

impl Cursor<'_> {
    pub fn next_entry(&mut self) -> io::Result<Option<(u128, i64)>> {
        if self.at >= self.buf.len() {
            let count = self.run.info.count as usize;
            if self.next >= count {
                return Ok(None);
            }
            let take = CURSOR_ENTRIES.min(count - self.next);
            self.buf.resize(take * ENTRY, 0);
            self.run
                .file
                .read_exact_at(&mut self.buf, (HEADER + self.next * ENTRY) as u64)?;
            self.next += take;
            self.at = 0;
        }
        let entry = decode_entry(&self.buf[self.at..]);
        self.at += ENTRY;
        Ok(Some(entry))
    }
}

/// Merges `inputs` into a new run at `path`: one entry per key (the latest `seen_at`),
/// entries seen before `cutoff` dropped. Returns `None` (and leaves no file) when nothing
/// is left. `cancel` stops the merge between chunks; the partial file is removed.
pub fn merge(
    inputs: &[&Run],
    path: &Path,
    cutoff: i64,
    cancel: &AtomicBool,
) -> io::Result<Option<RunInfo>> {
    let capacity: u64 = inputs.iter().map(|r| r.info.count).sum();
    let mut writer = RunWriter::create(path, capacity as usize)?;
    let result = (|| {
        let mut cursors: Vec<Cursor<'_>> = inputs.iter().map(|r| r.cursor()).collect();
        let mut heads = Vec::with_capacity(cursors.len());
        for cursor in &mut cursors {
            heads.push(cursor.next_entry()?);
        }
        let mut merged = 0u64;
        while let Some(key) = heads.iter().flatten().map(|(k, _)| *k).min() {
            let mut seen = i64::MIN;
            for (head, cursor) in heads.iter_mut().zip(&mut cursors) {
                if let Some((k, s)) = *head {
                    if k == key {
                        seen = seen.max(s);
                        *head = cursor.next_entry()?;
                    }
                }
            }
            if seen >= cutoff {
                writer.push(key, seen)?;
            }
            merged += 1;
            if merged.is_multiple_of(CURSOR_ENTRIES as u64) && cancel.load(Ordering::Relaxed) {
                return Err(io::Error::new(
                    io::ErrorKind::Interrupted,
                    "dedup merge cancelled",
                ));
            }
        }
        Ok(())
    })();
    let finished = match result {
        Ok(()) if writer.count() == 0 => Ok(None),
        Ok(()) => writer.finish().map(Some),
        Err(e) => Err(e),
    };
    if !matches!(finished, Ok(Some(_))) {
        let _ = std::fs::remove_file(path);
    }
    finished
}

/// Writes entries (any order, distinct keys) as a new run at `path`.
pub fn write_sorted(path: &Path, mut entries: Vec<(u128, i64)>) -> io::Result<RunInfo> {
    entries.sort_unstable_by_key(|(key, _)| *key);
    let mut writer = RunWriter::create(path, entries.len())?;
    let result = entries
        .iter()
        .try_for_each(|(key, seen)| writer.push(*key, *seen))
        .and_then(|()| writer.finish());
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn random_keys(n: usize, seed: u64) -> Vec<u128> {
        use sha2::{Digest, Sha256};
        (0..n)
            .map(|i| {
                let digest = Sha256::digest(format!("{seed}-{i}"));
                let mut b = [0u8; 16];
                b.copy_from_slice(&digest[..16]);
                u128::from_be_bytes(b)
            })
            .collect()
    }

    #[test]
    fn bloom_has_no_false_negatives_and_few_false_positives() {
        let keys = random_keys(100_000, 1);
        let mut bloom = Bloom::with_capacity(keys.len());
        keys.iter().for_each(|k| bloom.insert(*k));
        assert!(keys.iter().all(|k| Bloom::may_contain(&bloom.bytes, *k)));
        let others = random_keys(100_000, 2);
        let false_positives = others
            .iter()
            .filter(|k| Bloom::may_contain(&bloom.bytes, **k))
            .count();
        assert!(
            false_positives < 2_000,
            "{false_positives} false positives in 100,000"
        );
    }

    #[test]
    fn a_written_run_finds_its_keys_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let keys = random_keys(1_000, 3);
        let entries: Vec<(u128, i64)> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| (*k, i as i64))
            .collect();
        let path = dir.path().join(file_name(7));
        let info = write_sorted(&path, entries.clone()).unwrap();
        assert_eq!(
            info,
            RunInfo {
                count: 1_000,
                min_seen: 0,
                max_seen: 999
            }
        );
        let run = Run::open(&path, 7).unwrap();
        for (key, seen) in &entries {
            assert_eq!(run.find(*key).unwrap(), Some(*seen));
        }
        for key in random_keys(1_000, 4) {
            assert_eq!(run.find(key).unwrap(), None);
        }
        assert_eq!(run.find(0).unwrap(), None);
        assert_eq!(run.find(u128::MAX).unwrap(), None);
        let mut cursor = run.cursor();
        let mut read = Vec::new();
        while let Some(entry) = cursor.next_entry().unwrap() {
            read.push(entry);
        }
        let mut sorted = entries;
        sorted.sort_unstable();
        assert_eq!(read, sorted);
    }

    #[test]
    fn a_run_file_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(1));
        write_sorted(&path, vec![(1, 1)]).unwrap();
        assert!(write_sorted(&path, vec![(2, 2)]).is_err());
        assert_eq!(Run::open(&path, 1).unwrap().find(1).unwrap(), Some(1));
    }

    #[test]
    fn merging_keeps_the_latest_sighting_and_drops_expired_entries() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join(file_name(1));
        let b = dir.path().join(file_name(2));
        write_sorted(&a, vec![(10, 100), (20, 5), (30, 100)]).unwrap();
        write_sorted(&b, vec![(10, 200), (25, 100), (40, 1)]).unwrap();
        let (a, b) = (Run::open(&a, 1).unwrap(), Run::open(&b, 2).unwrap());
        let out = dir.path().join(file_name(3));
        let info = merge(&[&a, &b], &out, 50, &AtomicBool::new(false))
            .unwrap()
            .unwrap();
        assert_eq!(
            info,
            RunInfo {
                count: 3,
                min_seen: 100,
                max_seen: 200
            }
        );
        let merged = Run::open(&out, 3).unwrap();
        assert_eq!(merged.find(10).unwrap(), Some(200));
        assert_eq!(merged.find(20).unwrap(), None);
        assert_eq!(merged.find(25).unwrap(), Some(100));
        assert_eq!(merged.find(40).unwrap(), None);
        let gone = dir.path().join(file_name(4));
        assert_eq!(
            merge(&[&a, &b], &gone, 1_000, &AtomicBool::new(false)).unwrap(),
            None
        );
        assert!(!gone.exists());
    }

    #[test]
    fn a_cancelled_merge_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join(file_name(1));
        let entries = random_keys(20_000, 5).into_iter().map(|k| (k, 1)).collect();
        write_sorted(&a, entries).unwrap();
        let a = Run::open(&a, 1).unwrap();
        let out = dir.path().join(file_name(2));
        let error = merge(&[&a], &out, 0, &AtomicBool::new(true)).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::Interrupted);
        assert!(!out.exists());
    }

    #[test]
    fn damaged_files_are_refused_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(file_name(1));
        write_sorted(
            &path,
            random_keys(500, 6).into_iter().map(|k| (k, 1)).collect(),
        )
        .unwrap();
        let bytes = std::fs::read(&path).unwrap();
        for cut in [0, 10, HEADER, bytes.len() - 1] {
            std::fs::write(&path, &bytes[..cut]).unwrap();
            assert!(Run::open(&path, 1).is_err(), "truncated at {cut}");
        }
        let mut bad = bytes.clone();
        bad[0] = b'X';
        std::fs::write(&path, &bad).unwrap();
        assert!(Run::open(&path, 1).is_err());
    }

    #[test]
    fn file_names_round_trip() {
        assert_eq!(id_of(&file_name(42)), Some(42));
        assert_eq!(id_of("run-x.dat"), None);
        assert_eq!(id_of("spool.db"), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn arbitrary_bytes_never_panic_the_reader(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(file_name(1));
            std::fs::write(&path, &bytes).unwrap();
            if let Ok(run) = Run::open(&path, 1) {
                let _ = run.find(1);
                let mut cursor = run.cursor();
                while let Ok(Some(_)) = cursor.next_entry() {}
            }
        }
    }
}
