//! How the delivery log finds a source's records by message id, user id or email without
//! an index per key: the log's rows are grouped in chunks of [`CHUNK_ROWS`] consecutive
//! ids, and each sealed chunk keeps a Bloom filter of its keys (`delivery_log_chunks`).
//!
//! Why: message ids and user ids are random, so a B-tree index on them makes every
//! transaction rewrite a page per event it adds (and again when the row is pruned); the
//! log then cost ingest several times what the queue does. Rows appended in id order and
//! one filter written per chunk cost a sequential write.
//!
//! Invariants:
//! - Every row with an id up to the last sealed chunk's `last_id` is covered by a chunk
//!   whose filter holds its keys; rows after it (the open chunk, fewer than
//!   [`CHUNK_ROWS`]) are read directly by a lookup, and their filter is rebuilt from the
//!   rows when the writer opens the file.
//! - A filter never misses a key it was given (Bloom): a lookup reads the rows of every
//!   chunk that may hold the key, newest first, so it finds what a full scan would.
//! - Pruning the log removes the chunks wholly pruned; a partly pruned chunk's filter
//!   covers rows that are gone, which costs a lookup at most a few empty reads.

use rusqlite::{params, Connection, OptionalExtension};
use sha2::{Digest, Sha256};

use super::keys::first_128;
use crate::spool::dedup::run::Bloom;

/// Rows per chunk: a lookup reads at most this many rows per chunk its filter admits.
pub(super) const CHUNK_ROWS: i64 = 4096;
/// Keys per row: its message id, user id and email.
const KEYS_PER_ROW: usize = 3;

pub(super) const SCHEMA: &str = "
-- The delivery log's sealed chunks: the filter of the keys of rows first_id..=last_id.
CREATE TABLE IF NOT EXISTS delivery_log_chunks (
    first_id INTEGER PRIMARY KEY,
    last_id  INTEGER NOT NULL,
    bloom    BLOB    NOT NULL
);
";

/// Which field a key is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Field {
    MessageId,
    UserId,
    Email,
}

impl Field {
    fn tag(self) -> u8 {
        match self {
            Field::MessageId => b'm',
            Field::UserId => b'u',
            Field::Email => b'e',
        }
    }
}

/// The filter key of `value` of `field` in `source`'s records: the first 128 bits of
/// SHA-256(tag ‖ `len(source)` as u32 LE ‖ source ‖ value). Stored in the filters, so
/// stable across versions.
pub(super) fn key(source: &str, field: Field, value: &str) -> u128 {
    let mut hasher = Sha256::new();
    hasher.update([field.tag()]);
    hasher.update((source.len() as u32).to_le_bytes());
    hasher.update(source.as_bytes());
    hasher.update(value.as_bytes());
    first_128(hasher)
}

/// The keys of one row.
pub(super) struct RowKeys<'a> {
    pub source: &'a str,
    pub message_id: &'a str,
    pub user_id: Option<&'a str>,
    pub email: Option<&'a str>,
}

/// The chunk being filled by the writer.
#[derive(Debug)]
pub(super) struct OpenChunk {
    /// Its first row's id (`None` until a row is added).
    first_id: Option<i64>,
    last_id: i64,
    rows: i64,
    bloom: Bloom,
}

impl OpenChunk {
    fn empty() -> OpenChunk {
        OpenChunk {
            first_id: None,
            last_id: 0,
            rows: 0,
            bloom: Bloom::with_capacity(CHUNK_ROWS as usize * KEYS_PER_ROW),
        }
    }

    /// The open chunk of a file: the rows after the last sealed chunk, sealing whole
    /// chunks on the way (a file whose log was kept with per-key indexes is chunked here
    /// once).
    pub(super) fn open(conn: &Connection) -> rusqlite::Result<OpenChunk> {
        let sealed: i64 = conn.query_row(
            "SELECT coalesce(max(last_id), 0) FROM delivery_log_chunks",
            [],
            |row| row.get(0),
        )?;
        let mut chunk = OpenChunk::empty();
        let mut stmt = conn.prepare(
            "SELECT id, source, message_id, user_id, email FROM delivery_log
             WHERE id > ?1 ORDER BY id",
        )?;
        let mut rows = stmt.query(params![sealed])?;
        while let Some(row) = rows.next()? {
            let (id, source, message_id): (i64, String, String) =
                (row.get(0)?, row.get(1)?, row.get(2)?);
            let (user_id, email): (Option<String>, Option<String>) = (row.get(3)?, row.get(4)?);
            let keys = RowKeys {
                source: &source,
                message_id: &message_id,
                user_id: user_id.as_deref(),
                email: email.as_deref(),
            };
            chunk.add(conn, id, &keys)?;
        }
        Ok(chunk)
    }

    /// Adds row `id`'s keys; seals the chunk when it is full.
    pub(super) fn add(
        &mut self,
        conn: &Connection,
        id: i64,
        keys: &RowKeys,
    ) -> rusqlite::Result<()> {
        self.first_id.get_or_insert(id);
        self.last_id = id;
        self.rows += 1;
        self.bloom
            .insert(key(keys.source, Field::MessageId, keys.message_id));
        if let Some(user) = keys.user_id {
            self.bloom.insert(key(keys.source, Field::UserId, user));
        }
        if let Some(email) = keys.email {
            self.bloom.insert(key(keys.source, Field::Email, email));
        }
        if self.rows >= CHUNK_ROWS {
            self.seal(conn)?;
        }
        Ok(())
    }

    fn seal(&mut self, conn: &Connection) -> rusqlite::Result<()> {
        if let Some(first) = self.first_id {
            conn.prepare_cached(
                "INSERT OR REPLACE INTO delivery_log_chunks (first_id, last_id, bloom)
                 VALUES (?1, ?2, ?3)",
            )?
            .execute(params![first, self.last_id, self.bloom.as_bytes()])?;
        }
        *self = OpenChunk::empty();
        Ok(())
    }
}

/// Removes the chunks whose rows are all gone (ids up to `last_pruned`).
pub(super) fn pruned(conn: &Connection, last_pruned: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM delivery_log_chunks WHERE last_id <= ?1")?
        .execute(params![last_pruned])?;
    Ok(())
}

/// The id ranges that may hold `value` of `field` in `source`'s records, newest first:
/// the open chunk's rows (after every sealed chunk), then each sealed chunk whose filter
/// admits the key.
pub(super) fn candidates(
    conn: &Connection,
    source: &str,
    field: Field,
    value: &str,
) -> rusqlite::Result<Vec<(i64, i64)>> {
    let key = key(source, field, value);
    let sealed: Option<i64> = conn
        .query_row("SELECT max(last_id) FROM delivery_log_chunks", [], |row| {
            row.get(0)
        })
        .optional()?
        .flatten();
    let mut ranges = vec![(sealed.unwrap_or(0) + 1, i64::MAX)];
    let mut stmt = conn.prepare_cached(
        "SELECT first_id, last_id, bloom FROM delivery_log_chunks ORDER BY first_id DESC",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let (first, last, bloom): (i64, i64, Vec<u8>) = (row.get(0)?, row.get(1)?, row.get(2)?);
        // A filter that does not decode is read as admitting everything: never a miss.
        if Bloom::from_stored(bloom).is_none_or(|b| b.contains(key)) {
            ranges.push((first, last));
        }
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_differ_by_field_and_source() {
        let m = key("web", Field::MessageId, "x");
        assert_eq!(m, key("web", Field::MessageId, "x"));
        assert_ne!(m, key("web", Field::UserId, "x"));
        assert_ne!(m, key("app", Field::MessageId, "x"));
        assert_ne!(key("ab", Field::Email, "c"), key("a", Field::Email, "bc"));
    }
}
