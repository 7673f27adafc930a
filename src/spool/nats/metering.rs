//! Usage (MTU, MTE, MPV) and the hourly counters of the JetStream spool, shared by every
//! node through one key-value bucket (`gateway_usage` by default).
//!
//! Each node counts what it does in memory ([`Tally`]: appends, settlements, replays) and
//! merges it into the bucket every [`FLUSH_INTERVAL`], at close, and before it answers a
//! usage or counters read. A merge reads a key, adds this node's increments and writes it
//! back with a compare-and-set on the key's revision, retried on a conflict: two nodes
//! never overwrite each other's counts. Keys:
//! - `u.<source>.<YYYY-MM>`: the month's MTE, MPV, their update times, and the MTU as a
//!   HyperLogLog sketch of the identified users ([`super::hll`]: 16 KiB per source and
//!   month, ~0.8 % standard error, exact for small counts; sketches merge by maximum, so a
//!   merge applied twice counts no user twice).
//! - `c.<source>.<day>`: the hourly counters of one UTC day (days since the epoch):
//!   `hour → name → value`, so a table of 1,000 days reads at most 1,000 keys.
//! - `d.<source>`: events queued and not yet settled (the backlog).
//! - `s.<source>`: when the spool first counted the source.
//!
//! Increments are signed: a repeat that JetStream's duplicate window did not recognise at
//! ingest (its first copy came in another request, or before the window) is counted as
//! received there, and taken back as a duplicate by the partition's owner when it drops it
//! (`Tally::withdrawn`).
//!
//! What it does not promise (documented in `docs/distributed.md`): a node that dies loses
//! the increments of its last interval (events are never lost, only counted less); an event
//! delivered again after a take-over is counted as forwarded again; the backlog is bounded
//! by the events stream's depth. Keys not written for [`COUNTER_RETENTION`] expire.

use std::collections::{BTreeMap, HashMap};

use super::hll::Hll;
use super::*;
use crate::segment::Identity;
use crate::spool::admin::{month_of, CounterRow, SourceUsage, HOUR_MS};
use crate::spool::Metering;

/// How often a node merges its counts into the bucket.
pub(super) const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// How long a counter key is kept after its last write (400 days, as the embedded spool).
pub(super) const COUNTER_RETENTION: Duration = Duration::from_secs(400 * 24 * 3600);
/// Compare-and-set attempts per key and merge before the increments wait for the next one.
const CAS_ATTEMPTS: usize = 16;
/// Keys read at once by a counters query.
const READ_CONCURRENCY: usize = 32;
const DAY_MS: i64 = 24 * HOUR_MS;

/// A month's usage as stored (before the sketch's registers).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct MonthMeta {
    /// Signed: a node's increments may take back events counted elsewhere (a repeat the
    /// partition's owner dropped after another node counted it).
    mte: i64,
    mpv: i64,
    mte_at: Option<i64>,
    mpv_at: Option<i64>,
    mtu_at: Option<i64>,
}

/// A month's increments of one node.
#[derive(Debug, Clone, Default)]
struct MonthDelta {
    meta: MonthMeta,
    users: Option<Hll>,
}

/// Hourly counters of one day: hour → name → value.
type Day = BTreeMap<i64, BTreeMap<String, i64>>;

/// What this node counted and has not merged into the bucket yet.
#[derive(Debug, Default)]
pub(super) struct Tally {
    months: HashMap<(String, String), MonthDelta>,
    days: HashMap<(String, i64), Day>,
    depth: HashMap<String, i64>,
}

impl Tally {
    fn is_empty(&self) -> bool {
        self.months.is_empty() && self.days.is_empty() && self.depth.is_empty()
    }

    /// Counts `n` under `name` for `source` in the hour of `at_ms`.
    pub(super) fn count(&mut self, source: &str, at_ms: i64, name: &str, n: i64) {
        if n == 0 {
            return;
        }
        let day = self
            .days
            .entry((source.to_owned(), at_ms.div_euclid(DAY_MS)))
            .or_default();
        *day.entry(at_ms.div_euclid(HOUR_MS))
            .or_default()
            .entry(name.to_owned())
            .or_default() += n;
    }

    pub(super) fn depth(&mut self, source: &str, n: i64) {
        if n != 0 {
            *self.depth.entry(source.to_owned()).or_default() += n;
        }
    }

    /// Counts accepted events: `(kind, user key)` of each one queued, at `at_ms`.
    pub(super) fn accepted<'e>(
        &mut self,
        source: &str,
        at_ms: i64,
        events: impl Iterator<Item = (&'e str, &'e str)>,
    ) {
        let month = self
            .months
            .entry((source.to_owned(), month_of(at_ms)))
            .or_default();
        let (mut queued, mut views) = (0i64, 0i64);
        for (kind, user) in events {
            queued += 1;
            if kind == "page" || kind == "screen" {
                views += 1;
            }
            if Identity::of_stored(user).is_some_and(Identity::is_identified) {
                let users = month.users.get_or_insert_with(Hll::default);
                if users.insert(user) {
                    month.meta.mtu_at = Some(at_ms);
                }
            }
        }
        month.meta.mte += queued;
        month.meta.mpv += views;
        if queued > 0 {
            month.meta.mte_at = Some(at_ms);
        }
        if views > 0 {
            month.meta.mpv_at = Some(at_ms);
        }
        self.count(source, at_ms, "received", queued);
        self.depth(source, queued);
    }

    /// Takes back an event counted as accepted at `at_ms` that the owner of its partition
    /// then dropped as a repeat (its first copy came in another request, so JetStream's
    /// duplicate window did not recognise it at ingest): counted as a duplicate instead.
    /// Its user, already counted by the first copy, stays in the month's sketch.
    pub(super) fn withdrawn(&mut self, source: &str, at_ms: i64, kind: &str) {
        let month = self
            .months
            .entry((source.to_owned(), month_of(at_ms)))
            .or_default();
        month.meta.mte -= 1;
        if kind == "page" || kind == "screen" {
            month.meta.mpv -= 1;
        }
        self.count(source, at_ms, "received", -1);
        self.count(source, at_ms, "duplicates", 1);
        self.depth(source, -1);
    }

    /// Puts back increments a merge could not write, for the next one.
    fn absorb(&mut self, other: Tally) {
        for (key, delta) in other.months {
            let mine = self.months.entry(key).or_default();
            add_month(&mut mine.meta, &delta.meta);
            match (&mut mine.users, delta.users) {
                (Some(users), Some(theirs)) => {
                    users.merge(&theirs);
                }
                (mine @ None, theirs) => *mine = theirs,
                _ => {}
            }
        }
        for (key, day) in other.days {
            add_day(self.days.entry(key).or_default(), &day);
        }
        for (source, n) in other.depth {
            self.depth(&source, n);
        }
    }
}

fn add_month(total: &mut MonthMeta, delta: &MonthMeta) {
    total.mte += delta.mte;
    total.mpv += delta.mpv;
    total.mte_at = total.mte_at.max(delta.mte_at);
    total.mpv_at = total.mpv_at.max(delta.mpv_at);
    total.mtu_at = total.mtu_at.max(delta.mtu_at);
}

fn add_day(total: &mut Day, delta: &Day) {
    for (hour, names) in delta {
        let row = total.entry(*hour).or_default();
        for (name, n) in names {
            *row.entry(name.clone()).or_default() += n;
        }
    }
}

fn month_key(source: &str, month: &str) -> String {
    format!("u.{source}.{month}")
}

fn day_key(source: &str, day: i64) -> String {
    format!("c.{source}.{day}")
}

fn depth_key(source: &str) -> String {
    format!("d.{source}")
}

fn created_key(source: &str) -> String {
    format!("s.{source}")
}

/// The stored month: its counts and its sketch (a missing or unreadable value is empty).
fn read_month(value: Option<&[u8]>) -> (MonthMeta, Hll) {
    value
        .and_then(decode::<MonthMeta>)
        .map(|(meta, registers)| (meta, Hll::from_bytes(&registers).unwrap_or_default()))
        .unwrap_or_default()
}

impl Inner {
    pub(super) fn tally(&self) -> std::sync::MutexGuard<'_, Tally> {
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Merges the counts every [`FLUSH_INTERVAL`] until the spool stops.
    pub(super) async fn usage_loop(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(FLUSH_INTERVAL) => {}
                _ = stop.changed() => return,
            }
            if let Err(e) = self.flush_usage().await {
                tracing::warn!(error = %e, "cannot merge the usage counters (kept for the next try)");
            }
        }
    }

    /// Merges this node's counts into the bucket; what cannot be written stays in memory.
    pub(super) async fn flush_usage(&self) -> Result<(), SpoolError> {
        let Some(bucket) = &self.usage else {
            return Ok(());
        };
        let _one_at_a_time = self.usage_flush.lock().await;
        let pending = std::mem::take(&mut *self.tally());
        if pending.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let mut failed = Tally::default();
        let mut error = None;
        for ((source, month), delta) in pending.months {
            let merged = merge(bucket, &month_key(&source, &month), |value| {
                let (mut meta, mut users) = read_month(value);
                add_month(&mut meta, &delta.meta);
                if let Some(theirs) = &delta.users {
                    users.merge(theirs);
                }
                encode(&meta, users.as_bytes())
            })
            .await;
            if let Err(e) = merged {
                error = Some(e);
                failed.months.insert((source.clone(), month), delta);
            }
            self.remember_source(bucket, &source, now).await;
        }
        for ((source, day), delta) in pending.days {
            let merged = merge(bucket, &day_key(&source, day), |value| {
                let mut total: Day = value
                    .and_then(|v| serde_json::from_slice(v).ok())
                    .unwrap_or_default();
                add_day(&mut total, &delta);
                serde_json::to_vec(&total).unwrap_or_default()
            })
            .await;
            if let Err(e) = merged {
                error = Some(e);
                failed.days.insert((source, day), delta);
            }
        }
        for (source, n) in pending.depth {
            let merged = merge(bucket, &depth_key(&source), |value| {
                let total: i64 = value
                    .and_then(|v| serde_json::from_slice(v).ok())
                    .unwrap_or_default();
                serde_json::to_vec(&(total + n).max(0)).unwrap_or_default()
            })
            .await;
            if let Err(e) = merged {
                error = Some(e);
                failed.depth.insert(source, n);
            }
        }
        self.tally().absorb(failed);
        error.map_or(Ok(()), Err)
    }

    /// Records when the source was first counted (once per source and process).
    async fn remember_source(&self, bucket: &kv::Store, source: &str, now: i64) {
        if !self.known_sources().insert(source.to_owned()) {
            return;
        }
        let key = created_key(source);
        let created = match bucket.entry(key.as_str()).await {
            Ok(Some(entry)) => serde_json::from_slice::<i64>(&entry.value).ok(),
            _ => None,
        };
        // Written again at each start, so the key does not expire while the source lives.
        let at = created.unwrap_or(now);
        if let Err(e) = bucket.put(key, at.to_string().into()).await {
            tracing::warn!(error = %e, "cannot record a source's creation time");
            self.known_sources().remove(source);
        }
    }

    fn known_sources(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.known_sources.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn read_usage(&self, source: &str, now: i64) -> Result<SourceUsage, SpoolError> {
        let bucket = self.usage_bucket()?;
        self.flush_usage().await?;
        let month = month_of(now);
        let mut usage = SourceUsage {
            month: month.clone(),
            ..SourceUsage::default()
        };
        let read = |key: String| async move {
            bucket
                .get(key)
                .await
                .map_err(|e| storage("cannot read the usage bucket", e))
        };
        let stored = read(month_key(source, &month)).await?;
        if stored.is_some() {
            let (meta, users) = read_month(stored.as_deref());
            usage.mtu = users.estimate();
            usage.mtu_updated_at_ms = meta.mtu_at;
            usage.mte = meta.mte.max(0) as u64;
            usage.mte_updated_at_ms = meta.mte_at;
            usage.mpv = meta.mpv.max(0) as u64;
            usage.mpv_updated_at_ms = meta.mpv_at;
        }
        usage.created_at_ms = read(created_key(source))
            .await?
            .and_then(|v| serde_json::from_slice(&v).ok());
        let depth: i64 = read(depth_key(source))
            .await?
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default();
        let stats = self.stats().await?;
        usage.backlog = (depth.max(0) as u64).min(stats.depth);
        if usage.backlog > 0 {
            usage.oldest_undelivered_ms = stats.oldest_received_at_ms;
        }
        usage.dead_letters = self.dead_letters_of(source).await?;
        Ok(usage)
    }

    /// The dead letters of one source: the count of its subject in the dead-letter stream.
    async fn dead_letters_of(&self, source: &str) -> Result<u64, SpoolError> {
        let subject = self.options.dead_subject(source);
        let mut info = self
            .dead
            .info_with_subjects(subject.as_str())
            .await
            .map_err(|e| storage("cannot read the dead-letter stream", e))?;
        let mut count = 0;
        while let Some(entry) = info.next().await {
            let (name, n) = entry.map_err(|e| storage("cannot read the dead-letter stream", e))?;
            if name == subject {
                count += n as u64;
            }
        }
        Ok(count)
    }

    async fn read_counters(
        &self,
        source: &str,
        from_hour: i64,
        to_hour: i64,
    ) -> Result<Vec<CounterRow>, SpoolError> {
        let bucket = self.usage_bucket()?;
        self.flush_usage().await?;
        if to_hour <= from_hour {
            return Ok(Vec::new());
        }
        let first = (from_hour * HOUR_MS).div_euclid(DAY_MS);
        let last = ((to_hour * HOUR_MS) - 1).div_euclid(DAY_MS);
        let days: Vec<Option<_>> = futures_util::stream::iter(first..=last)
            .map(|day| bucket.get(day_key(source, day)))
            .buffered(READ_CONCURRENCY)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()
            .map_err(|e| storage("cannot read the usage bucket", e))?;
        let mut rows = Vec::new();
        for value in days.into_iter().flatten() {
            let day: Day = serde_json::from_slice(&value).unwrap_or_default();
            for (hour, names) in day.range(from_hour..to_hour) {
                for (name, value) in names {
                    rows.push(CounterRow {
                        hour: *hour,
                        name: name.clone(),
                        value: (*value).max(0) as u64,
                    });
                }
            }
        }
        Ok(rows)
    }

    fn usage_bucket(&self) -> Result<&kv::Store, SpoolError> {
        self.usage
            .as_ref()
            .ok_or_else(|| SpoolError::Storage("no usage bucket is configured".into()))
    }
}

/// Read, change, compare-and-set, retried while another node wrote the key meanwhile.
async fn merge(
    bucket: &kv::Store,
    key: &str,
    change: impl Fn(Option<&[u8]>) -> Vec<u8>,
) -> Result<(), SpoolError> {
    let mut last_error = String::new();
    for attempt in 0..CAS_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(2 << attempt.min(6))).await;
        }
        let entry = bucket
            .entry(key)
            .await
            .map_err(|e| storage("cannot read the usage bucket", e))?;
        let written = match entry.filter(|e| matches!(e.operation, kv::Operation::Put)) {
            Some(entry) => bucket
                .update(key, change(Some(&entry.value)).into(), entry.revision)
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
            None => bucket
                .create(key, change(None).into())
                .await
                .map(drop)
                .map_err(|e| e.to_string()),
        };
        match written {
            Ok(()) => return Ok(()),
            Err(e) => last_error = e,
        }
    }
    Err(SpoolError::Storage(format!(
        "cannot update the usage key {key}: {last_error}"
    )))
}

#[async_trait]
impl Metering for NatsSpool {
    async fn usage(&self, source: &str, now_ms: i64) -> Result<SourceUsage, SpoolError> {
        let source = source.to_owned();
        self.run(move |inner| async move { inner.read_usage(&source, now_ms).await })
            .await
    }

    async fn counters(
        &self,
        source: &str,
        from_hour: i64,
        to_hour: i64,
    ) -> Result<Vec<CounterRow>, SpoolError> {
        let source = source.to_owned();
        self.run(move |inner| async move { inner.read_counters(&source, from_hour, to_hour).await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_counts_events_views_users_and_hours() {
        let mut tally = Tally::default();
        let at = 1_700_000_000_000;
        tally.accepted(
            "web",
            at,
            [
                ("track", "u:1"),
                ("page", "u:1"),
                ("screen", "a:x"),
                ("track", "e:a@b"),
            ]
            .into_iter(),
        );
        let month = &tally.months[&("web".to_string(), month_of(at))];
        assert_eq!((month.meta.mte, month.meta.mpv), (4, 2));
        assert_eq!(month.users.as_ref().map(Hll::estimate), Some(2));
        let day = &tally.days[&("web".to_string(), at.div_euclid(DAY_MS))];
        assert_eq!(day[&at.div_euclid(HOUR_MS)]["received"], 4);
        assert_eq!(tally.depth["web"], 4);
    }

    #[test]
    fn absorbing_adds_counts_and_unites_users() {
        let at = 1_700_000_000_000;
        let mut a = Tally::default();
        a.accepted("web", at, [("track", "u:1")].into_iter());
        let mut b = Tally::default();
        b.accepted("web", at, [("track", "u:1"), ("track", "u:2")].into_iter());
        b.count("web", at, "forwarded", 1);
        a.absorb(b);
        let month = &a.months[&("web".to_string(), month_of(at))];
        assert_eq!(month.meta.mte, 3);
        assert_eq!(month.users.as_ref().map(Hll::estimate), Some(2));
        let day = &a.days[&("web".to_string(), at.div_euclid(DAY_MS))];
        assert_eq!(day[&at.div_euclid(HOUR_MS)]["received"], 3);
        assert_eq!(day[&at.div_euclid(HOUR_MS)]["forwarded"], 1);
        assert_eq!(a.depth["web"], 3);
    }

    #[test]
    fn a_stored_month_round_trips() {
        let mut users = Hll::default();
        users.insert("u:1");
        let meta = MonthMeta {
            mte: 5,
            mpv: 1,
            ..MonthMeta::default()
        };
        let (back, sketch) = read_month(Some(&encode(&meta, users.as_bytes())));
        assert_eq!((back.mte, back.mpv, sketch.estimate()), (5, 1, 1));
        let (empty, none) = read_month(None);
        assert_eq!((empty.mte, none.estimate()), (0, 0));
    }
}
