//! The SQL behind the management API: dead-letter listings, replay and deletion, usage and
//! hourly counters, and the retention of dead letters.
//!
//! Reads run on their own read-only connections (WAL readers never block the writer nor
//! wait for it); replay, delete and pruning run on the writer, inside its transactions.
//!
//! Every listing order has an index `(source, <field>, id)`, so a page is one index range
//! read: a keyset page starts at its cursor; an offset page skips index entries only (the
//! table rows of skipped entries are never read), from whichever end of the range is nearer.

use std::collections::HashMap;

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};

use crate::segment::UserKey;
use crate::spool::admin::{
    Attempt, CounterRow, Cursor, DeadLetter, DeadLetterFilter, DeadLetterPage, DeadLetterQuery,
    DeadLetterSummary, PageAt, SearchField, SortField, SortValue, SourceUsage,
    MAX_ATTEMPT_ERROR_BYTES,
};

/// What one writer transaction adds to the counters, written once before it commits, so a
/// group of many appends costs one statement per (source, hour, name) and not one per event.
#[derive(Debug, Default)]
pub(super) struct Tally {
    /// `(source, hour, name)` → increment.
    pub counters: HashMap<(String, i64, &'static str), i64>,
    /// `(source, hour, reason)` → skipped events.
    pub skipped: HashMap<(String, i64, String), i64>,
    /// `(source, month)` → usage increments.
    pub usage: HashMap<(String, String), UsageDelta>,
    /// `source` → change of the number of queued events.
    pub depth: HashMap<String, i64>,
}

#[derive(Debug, Default, Clone, Copy)]
pub(super) struct UsageDelta {
    pub mtu: i64,
    pub mte: i64,
    pub mpv: i64,
}

impl Tally {
    pub fn count(&mut self, source: &str, hour: i64, name: &'static str, n: i64) {
        if n != 0 {
            *self
                .counters
                .entry((source.to_string(), hour, name))
                .or_default() += n;
        }
    }

    pub fn depth(&mut self, source: &str, n: i64) {
        if n != 0 {
            *self.depth.entry(source.to_string()).or_default() += n;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.counters.is_empty()
            && self.skipped.is_empty()
            && self.usage.is_empty()
            && self.depth.is_empty()
    }

    /// Writes the increments (inside the caller's transaction).
    pub fn flush(self, conn: &Connection, now: i64) -> rusqlite::Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        let mut counter = conn.prepare_cached(
            "INSERT INTO event_counters (source, hour, name, value) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT(source, hour, name) DO UPDATE SET value = value + excluded.value",
        )?;
        for ((source, hour, name), n) in &self.counters {
            counter.execute(params![source, hour, name, n])?;
        }
        for ((source, hour, reason), n) in &self.skipped {
            counter.execute(params![source, hour, format!("skipped:{reason}"), n])?;
        }
        let mut usage = conn.prepare_cached(
            "INSERT INTO usage (source, month, mtu, mtu_at, mte, mte_at, mpv, mpv_at)
             VALUES (?1, ?2, ?3, CASE WHEN ?3 > 0 THEN ?6 END, ?4, CASE WHEN ?4 > 0 THEN ?6 END,
                     ?5, CASE WHEN ?5 > 0 THEN ?6 END)
             ON CONFLICT(source, month) DO UPDATE SET
                 mtu = mtu + excluded.mtu, mtu_at = coalesce(excluded.mtu_at, mtu_at),
                 mte = mte + excluded.mte, mte_at = coalesce(excluded.mte_at, mte_at),
                 mpv = mpv + excluded.mpv, mpv_at = coalesce(excluded.mpv_at, mpv_at)",
        )?;
        for ((source, month), delta) in &self.usage {
            usage.execute(params![source, month, delta.mtu, delta.mte, delta.mpv, now])?;
        }
        let mut depth = conn.prepare_cached(
            "INSERT INTO queue_depth (source, depth) VALUES (?1, ?2)
             ON CONFLICT(source) DO UPDATE SET depth = depth + excluded.depth",
        )?;
        for (source, n) in &self.depth {
            depth.execute(params![source, n])?;
        }
        Ok(())
    }
}

/// Cuts `text` to at most `max` bytes, on a character boundary.
pub(super) fn bounded(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Records one delivery attempt of the queued event `seq`.
pub(super) fn record_attempt(
    conn: &Connection,
    seq: i64,
    at: i64,
    status: Option<u16>,
    error: &str,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO event_attempts (queue_seq, at, status, error) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        seq,
        at,
        status,
        bounded(error, MAX_ATTEMPT_ERROR_BYTES)
    ])?;
    Ok(())
}

/// Forgets the attempts of a queued event that left the queue for good.
pub(super) fn forget_attempts(conn: &Connection, seq: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM event_attempts WHERE queue_seq = ?1")?
        .execute(params![seq])?;
    Ok(())
}

fn sort_column(field: SortField) -> &'static str {
    match field {
        SortField::Id => "id",
        SortField::CreatedAt => "created_at",
        SortField::ReceivedAt => "received_at",
        SortField::Attempts => "attempts",
        SortField::Type => "kind",
        SortField::Event => "event_name",
        SortField::UserId => "user_id",
        SortField::MessageId => "message_id",
    }
}

fn search_column(field: SearchField) -> &'static str {
    match field {
        SearchField::MessageId => "message_id",
        SearchField::User => "user_key",
        SearchField::Event => "event_name",
        SearchField::Type => "kind",
        SearchField::Error => "last_error",
    }
}

/// A LIKE pattern matching `q` anywhere, with `%`, `_` and `\` taken literally.
fn like_pattern(q: &str) -> String {
    let mut pattern = String::with_capacity(q.len() + 2);
    pattern.push('%');
    for c in q.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// The WHERE clause of a filter, its parameters appended to `values`.
pub(super) fn filter_sql(filter: &DeadLetterFilter, values: &mut Vec<Value>) -> String {
    let mut clauses = vec!["source = ?".to_string()];
    values.push(Value::Text(filter.source.clone()));
    if let Some(ids) = &filter.ids {
        if ids.is_empty() {
            clauses.push("0".into());
        } else {
            clauses.push(format!("id IN ({})", vec!["?"; ids.len()].join(", ")));
            values.extend(ids.iter().map(|id| Value::Integer(*id)));
        }
    }
    if let Some(start) = filter.start_at_ms {
        clauses.push("created_at >= ?".into());
        values.push(Value::Integer(start));
    }
    if let Some(end) = filter.ends_at_ms {
        clauses.push("created_at < ?".into());
        values.push(Value::Integer(end));
    }
    if let Some(max_id) = filter.max_id {
        clauses.push("id <= ?".into());
        values.push(Value::Integer(max_id));
    }
    if let Some(status) = filter.status {
        clauses.push("last_status = ?".into());
        values.push(Value::Integer(i64::from(status)));
    }
    if let Some(q) = filter.q.as_deref().filter(|q| !q.is_empty()) {
        let fields: &[SearchField] = if filter.q_fields.is_empty() {
            &SearchField::ALL
        } else {
            &filter.q_fields
        };
        let pattern = like_pattern(q);
        let parts: Vec<String> = fields
            .iter()
            .map(|field| {
                values.push(Value::Text(pattern.clone()));
                format!("{} LIKE ? ESCAPE '\\'", search_column(*field))
            })
            .collect();
        clauses.push(format!("({})", parts.join(" OR ")));
    }
    clauses.join(" AND ")
}

const SUMMARY_COLUMNS: &str = "id, source, message_id, kind, user_id, user_key, event_name,
    created_at, received_at, attempts, last_status, last_error";

fn summary(row: &Row<'_>, sort: SortField) -> rusqlite::Result<DeadLetterSummary> {
    let id: i64 = row.get(0)?;
    let kind: String = row.get(3)?;
    let user_id: String = row.get(4)?;
    let event: String = row.get(6)?;
    let message_id: String = row.get(2)?;
    let created_at_ms: i64 = row.get(7)?;
    let received_at_ms: i64 = row.get(8)?;
    let attempts: i64 = row.get(9)?;
    let value = match sort {
        SortField::Id => SortValue::Int(id),
        SortField::CreatedAt => SortValue::Int(created_at_ms),
        SortField::ReceivedAt => SortValue::Int(received_at_ms),
        SortField::Attempts => SortValue::Int(attempts),
        SortField::Type => SortValue::Text(kind.clone()),
        SortField::Event => SortValue::Text(event.clone()),
        SortField::UserId => SortValue::Text(user_id.clone()),
        SortField::MessageId => SortValue::Text(message_id.clone()),
    };
    let last_status: Option<i64> = row.get(10)?;
    Ok(DeadLetterSummary {
        id,
        source: row.get(1)?,
        message_id,
        kind,
        user_id: (!user_id.is_empty()).then_some(user_id),
        user_key: UserKey::from_stored(row.get::<_, String>(5)?),
        event: (!event.is_empty()).then_some(event),
        created_at_ms,
        received_at_ms,
        attempts: u32::try_from(attempts).unwrap_or(0),
        last_status: last_status.and_then(|s| u16::try_from(s).ok()),
        last_error: row.get(11)?,
        cursor: Cursor { value, id },
    })
}

fn sql_value(value: &SortValue) -> Value {
    match value {
        SortValue::Int(n) => Value::Integer(*n),
        SortValue::Text(s) => Value::Text(s.clone()),
    }
}

/// One page of a listing, and the count of matching rows, from one snapshot.
pub(super) fn list(conn: &Connection, query: &DeadLetterQuery) -> rusqlite::Result<DeadLetterPage> {
    let tx = conn.unchecked_transaction()?;
    let mut values = Vec::new();
    let filter = filter_sql(&query.filter, &mut values);
    let count: i64 = tx
        .prepare_cached(&format!("SELECT count(*) FROM dead_letters WHERE {filter}"))?
        .query_row(params_from_iter(values.iter()), |row| row.get(0))?;
    let listing = Listing {
        conn: &tx,
        query,
        filter,
        values,
        count: count.max(0) as u64,
        limit: i64::from(query.limit.max(1)),
    };
    let (items, more) = match &query.at {
        PageAt::Offset(offset) => listing.at_offset(*offset)?,
        PageAt::After(cursor) => listing.beside(cursor, true)?,
        PageAt::Before(cursor) => listing.beside(cursor, false)?,
    };
    let count = listing.count;
    drop(tx);
    Ok(DeadLetterPage { count, items, more })
}

/// One listing's query, read in one transaction: a page is its filtered rows in the
/// listing's order, from an offset or from beside a keyset cursor.
struct Listing<'a> {
    conn: &'a Connection,
    query: &'a DeadLetterQuery,
    /// The WHERE clause and its parameters.
    filter: String,
    values: Vec<Value>,
    count: u64,
    limit: i64,
}

impl Listing<'_> {
    /// The ORDER BY of the listing (`descending`) or of its reverse; ties by id.
    fn order(&self, descending: bool) -> String {
        let dir = if descending { "DESC" } else { "ASC" };
        if self.query.sort == SortField::Id {
            format!("id {dir}")
        } else {
            format!("{} {dir}, id {dir}", sort_column(self.query.sort))
        }
    }

    /// The position condition of a keyset page: rows after (`forward`) or before the
    /// cursor in the listing's order; its parameters are appended to `values`.
    fn position(&self, cursor: &Cursor, forward: bool, values: &mut Vec<Value>) -> String {
        let op = if forward != self.query.descending {
            ">"
        } else {
            "<"
        };
        if self.query.sort == SortField::Id {
            values.push(Value::Integer(cursor.id));
            format!("id {op} ?")
        } else {
            values.push(sql_value(&cursor.value));
            values.push(Value::Integer(cursor.id));
            format!("({}, id) {op} (?, ?)", sort_column(self.query.sort))
        }
    }

    /// Up to `take` rows matching the filter and `condition`, in the listing's order
    /// (`reversed`: its reverse), after skipping `skip`.
    fn rows(
        &self,
        condition: Option<(String, Vec<Value>)>,
        reversed: bool,
        take: i64,
        skip: i64,
    ) -> rusqlite::Result<Vec<DeadLetterSummary>> {
        let mut values = self.values.clone();
        let mut sql = format!(
            "SELECT {SUMMARY_COLUMNS} FROM dead_letters WHERE {}",
            self.filter
        );
        if let Some((condition, extra)) = condition {
            sql.push_str(&format!(" AND {condition}"));
            values.extend(extra);
        }
        let descending = self.query.descending != reversed;
        sql.push_str(&format!(
            " ORDER BY {} LIMIT ? OFFSET ?",
            self.order(descending)
        ));
        values.push(Value::Integer(take));
        values.push(Value::Integer(skip));
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt
            .query_map(params_from_iter(values.iter()), |row| {
                summary(row, self.query.sort)
            })?
            .collect::<rusqlite::Result<Vec<_>>>();
        rows
    }

    /// A page at `offset`; nearer the end than the start, read backwards from the end, so
    /// the last pages cost what the first do.
    fn at_offset(&self, offset: u64) -> rusqlite::Result<(Vec<DeadLetterSummary>, bool)> {
        if offset >= self.count {
            return Ok((Vec::new(), false));
        }
        if offset <= self.count / 2 {
            let mut rows = self.rows(None, false, self.limit + 1, offset as i64)?;
            let more = rows.len() as i64 > self.limit;
            rows.truncate(self.limit as usize);
            return Ok((rows, more));
        }
        let take = (self.limit as u64).min(self.count - offset);
        let from_end = self.count - offset - take;
        let mut rows = self.rows(None, true, take as i64, from_end as i64)?;
        rows.reverse();
        Ok((rows, offset + take < self.count))
    }

    /// The page after (`forward`) or before a cursor.
    fn beside(
        &self,
        cursor: &Cursor,
        forward: bool,
    ) -> rusqlite::Result<(Vec<DeadLetterSummary>, bool)> {
        let mut extra = Vec::new();
        let condition = self.position(cursor, forward, &mut extra);
        let mut rows = self.rows(Some((condition, extra)), !forward, self.limit + 1, 0)?;
        let more = rows.len() as i64 > self.limit;
        rows.truncate(self.limit as usize);
        if !forward {
            rows.reverse();
        }
        Ok((rows, more))
    }
}

/// One dead letter with its payload and attempts.
pub(super) fn get(
    conn: &Connection,
    source: &str,
    id: i64,
) -> rusqlite::Result<Option<DeadLetter>> {
    let tx = conn.unchecked_transaction()?;
    let found = tx
        .prepare_cached(&format!(
            "SELECT {SUMMARY_COLUMNS}, payload, queue_seq FROM dead_letters
             WHERE source = ?1 AND id = ?2"
        ))?
        .query_row(params![source, id], |row| {
            Ok((
                summary(row, SortField::Id)?,
                row.get::<_, Vec<u8>>(12)?,
                row.get::<_, i64>(13)?,
            ))
        })
        .optional()?;
    let Some((summary, payload, queue_seq)) = found else {
        return Ok(None);
    };
    let attempts = tx
        .prepare_cached(
            "SELECT at, status, error FROM event_attempts WHERE queue_seq = ?1 ORDER BY at, id",
        )?
        .query_map(params![queue_seq], |row| {
            let status: Option<i64> = row.get(1)?;
            Ok(Attempt {
                at_ms: row.get(0)?,
                status: status.and_then(|s| u16::try_from(s).ok()),
                error: row.get(2)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    drop(tx);
    Ok(Some(DeadLetter {
        summary,
        payload,
        attempts,
    }))
}

/// The number of dead letters matching a filter, and the highest id among them.
pub(super) fn count_and_max_id(
    conn: &Connection,
    filter: &DeadLetterFilter,
) -> rusqlite::Result<(u64, Option<i64>)> {
    let mut values = Vec::new();
    let sql = filter_sql(filter, &mut values);
    conn.prepare_cached(&format!(
        "SELECT count(*), max(id) FROM dead_letters WHERE {sql}"
    ))?
    .query_row(params_from_iter(values.iter()), |row| {
        Ok((row.get::<_, i64>(0)?.max(0) as u64, row.get(1)?))
    })
}

/// Moves up to `limit` matching dead letters, oldest queue position first, to the tail of
/// the queue (writer side). Their attempts follow them to their new `seq`.
pub(super) fn replay_chunk(
    conn: &Connection,
    filter: &DeadLetterFilter,
    limit: u64,
    now: i64,
    tally: &mut Tally,
) -> rusqlite::Result<u64> {
    let mut values = Vec::new();
    let sql = filter_sql(filter, &mut values);
    values.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
    let chosen: Vec<(i64, i64, String)> = conn
        .prepare_cached(&format!(
            "SELECT id, queue_seq, source FROM dead_letters WHERE {sql}
             ORDER BY queue_seq, id LIMIT ?"
        ))?
        .query_map(params_from_iter(values.iter()), |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut requeue = conn.prepare_cached(
        "INSERT INTO events (source, message_id, kind, user_key, received_at, payload, attempts)
         SELECT source, message_id, kind, user_key, ?2, payload, attempts
         FROM dead_letters WHERE id = ?1",
    )?;
    let mut move_attempts =
        conn.prepare_cached("UPDATE event_attempts SET queue_seq = ?2 WHERE queue_seq = ?1")?;
    let mut remove = conn.prepare_cached("DELETE FROM dead_letters WHERE id = ?1")?;
    let hour = now.div_euclid(crate::spool::admin::HOUR_MS);
    for (id, old_seq, source) in &chosen {
        requeue.execute(params![id, now])?;
        let seq = conn.last_insert_rowid();
        move_attempts.execute(params![old_seq, seq])?;
        remove.execute(params![id])?;
        tally.depth(source, 1);
        tally.count(source, hour, "replayed", 1);
    }
    Ok(chosen.len() as u64)
}

/// Deletes up to `limit` matching dead letters and their attempts (writer side).
pub(super) fn delete_chunk(
    conn: &Connection,
    filter: &DeadLetterFilter,
    limit: u64,
) -> rusqlite::Result<u64> {
    let mut values = Vec::new();
    let sql = filter_sql(filter, &mut values);
    values.push(Value::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
    let chosen: Vec<(i64, i64)> = conn
        .prepare_cached(&format!(
            "SELECT id, queue_seq FROM dead_letters WHERE {sql} LIMIT ?"
        ))?
        .query_map(params_from_iter(values.iter()), |row| {
            Ok((row.get(0)?, row.get(1)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut remove = conn.prepare_cached("DELETE FROM dead_letters WHERE id = ?1")?;
    for (id, seq) in &chosen {
        forget_attempts(conn, *seq)?;
        remove.execute(params![id])?;
    }
    Ok(chosen.len() as u64)
}

/// Removes up to `limit` dead letters created before `cutoff`, oldest first, with their
/// attempts; returns how many.
pub(super) fn prune_dead_letters(
    conn: &Connection,
    cutoff: i64,
    limit: i64,
) -> rusqlite::Result<usize> {
    let tx = conn.unchecked_transaction()?;
    let chosen: Vec<(i64, i64)> = tx
        .prepare_cached(
            "SELECT id, queue_seq FROM dead_letters WHERE created_at < ?1
             ORDER BY created_at LIMIT ?2",
        )?
        .query_map(params![cutoff, limit], |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    {
        let mut remove = tx.prepare_cached("DELETE FROM dead_letters WHERE id = ?1")?;
        for (id, seq) in &chosen {
            forget_attempts(&tx, *seq)?;
            remove.execute(params![id])?;
        }
    }
    tx.commit()?;
    Ok(chosen.len())
}

/// A source's usage for `month` and its backlog, from one snapshot.
pub(super) fn usage(conn: &Connection, source: &str, month: &str) -> rusqlite::Result<SourceUsage> {
    let tx = conn.unchecked_transaction()?;
    let mut usage = SourceUsage {
        month: month.to_string(),
        ..SourceUsage::default()
    };
    let row = tx
        .prepare_cached(
            "SELECT mtu, mtu_at, mte, mte_at, mpv, mpv_at FROM usage
             WHERE source = ?1 AND month = ?2",
        )?
        .query_row(params![source, month], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, Option<i64>>(1)?,
                row.get::<_, i64>(2)?,
                row.get::<_, Option<i64>>(3)?,
                row.get::<_, i64>(4)?,
                row.get::<_, Option<i64>>(5)?,
            ))
        })
        .optional()?;
    if let Some((mtu, mtu_at, mte, mte_at, mpv, mpv_at)) = row {
        usage.mtu = mtu.max(0) as u64;
        usage.mtu_updated_at_ms = mtu_at;
        usage.mte = mte.max(0) as u64;
        usage.mte_updated_at_ms = mte_at;
        usage.mpv = mpv.max(0) as u64;
        usage.mpv_updated_at_ms = mpv_at;
    }
    usage.created_at_ms = tx
        .prepare_cached("SELECT created_at FROM sources WHERE slug = ?1")?
        .query_row(params![source], |row| row.get(0))
        .optional()?;
    let depth: Option<i64> = tx
        .prepare_cached("SELECT depth FROM queue_depth WHERE source = ?1")?
        .query_row(params![source], |row| row.get(0))
        .optional()?;
    usage.backlog = depth.unwrap_or(0).max(0) as u64;
    if usage.backlog > 0 {
        usage.oldest_undelivered_ms = oldest_received_at(&tx, Some(source))?;
    }
    let dead: i64 = tx
        .prepare_cached("SELECT count(*) FROM dead_letters WHERE source = ?1")?
        .query_row(params![source], |row| row.get(0))?;
    usage.dead_letters = dead.max(0) as u64;
    drop(tx);
    Ok(usage)
}

/// Arrival time of the oldest queued event, of one source or of all: the queue's head
/// (a replayed dead letter keeps its arrival time, so the head is the oldest but for those).
pub(super) fn oldest_received_at(
    conn: &Connection,
    source: Option<&str>,
) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached(
        "SELECT received_at FROM events WHERE ?1 IS NULL OR source = ?1 ORDER BY seq LIMIT 1",
    )?
    .query_row(params![source], |row| row.get(0))
    .optional()
}

/// A source's hourly counters in `[from_hour, to_hour)`.
pub(super) fn counters(
    conn: &Connection,
    source: &str,
    from_hour: i64,
    to_hour: i64,
) -> rusqlite::Result<Vec<CounterRow>> {
    conn.prepare_cached(
        "SELECT hour, name, value FROM event_counters
         WHERE source = ?1 AND hour >= ?2 AND hour < ?3 ORDER BY hour, name",
    )?
    .query_map(params![source, from_hour, to_hour], |row| {
        Ok(CounterRow {
            hour: row.get(0)?,
            name: row.get(1)?,
            value: row.get::<_, i64>(2)?.max(0) as u64,
        })
    })?
    .collect()
}
