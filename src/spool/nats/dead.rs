//! Dead letters on JetStream: the management API's list, show, replay and delete over the
//! dead-letter stream (`<prefix>.dead.<source>`, one message per dead letter, its id the
//! stream sequence).
//!
//! A listing reads the source's dead letters with a short-lived consumer and filters, sorts
//! and pages them in memory: one consistent read per call, whose cost grows with the
//! source's dead letters (fine for thousands, slow for millions; the retention keeps the
//! stream bounded). Keyset cursors behave as on the embedded spool.
//!
//! A replay publishes each dead letter back to the events stream, oldest queue position
//! first, waits for JetStream's ack, then deletes the dead letter: a crash in between
//! leaves a copy in both places, and the replay's own `Nats-Msg-Id` (the dead letter's id)
//! makes a repeated replay of it a duplicate rather than a second event.

use std::cmp::Ordering;
use std::time::Duration;

use async_nats::jetstream::consumer;
use async_nats::HeaderMap;
use futures_util::StreamExt;

use super::{decode, encode, partition_of, storage, DeadMeta, Inner, Meta};
use crate::segment::UserKey;
use crate::spool::admin::{
    Attempt, Cursor, DeadLetter, DeadLetterFilter, DeadLetterPage, DeadLetterQuery,
    DeadLetterSummary, PageAt, ReplayReport, SearchField, SortField, SortValue,
};
use crate::spool::SpoolError;

/// A dead letter as read from the stream.
struct Record {
    id: i64,
    meta: DeadMeta,
    payload: Vec<u8>,
    user_id: String,
    event: String,
}

impl Record {
    fn sort_value(&self, field: SortField) -> SortValue {
        match field {
            SortField::Id => SortValue::Int(self.id),
            SortField::CreatedAt => SortValue::Int(self.meta.created_at_ms),
            SortField::ReceivedAt => SortValue::Int(self.meta.received_at_ms),
            SortField::Attempts => SortValue::Int(i64::from(self.meta.attempts)),
            SortField::Type => SortValue::Text(self.meta.kind.clone()),
            SortField::Event => SortValue::Text(self.event.clone()),
            SortField::UserId => SortValue::Text(self.user_id.clone()),
            SortField::MessageId => SortValue::Text(self.meta.message_id.clone()),
        }
    }

    fn summary(&self, sort: SortField) -> DeadLetterSummary {
        DeadLetterSummary {
            id: self.id,
            source: self.meta.source.clone(),
            message_id: self.meta.message_id.clone(),
            kind: self.meta.kind.clone(),
            user_id: (!self.user_id.is_empty()).then(|| self.user_id.clone()),
            user_key: UserKey::from_stored(self.meta.user_key.as_str()),
            event: (!self.event.is_empty()).then(|| self.event.clone()),
            created_at_ms: self.meta.created_at_ms,
            received_at_ms: self.meta.received_at_ms,
            attempts: self.meta.attempts,
            last_status: self.meta.status,
            last_error: self.meta.error.clone(),
            cursor: Cursor {
                value: self.sort_value(sort),
                id: self.id,
            },
        }
    }

    fn matches(&self, filter: &DeadLetterFilter) -> bool {
        if self.meta.source != filter.source {
            return false;
        }
        if filter
            .ids
            .as_ref()
            .is_some_and(|ids| !ids.contains(&self.id))
        {
            return false;
        }
        if filter
            .start_at_ms
            .is_some_and(|s| self.meta.created_at_ms < s)
            || filter
                .ends_at_ms
                .is_some_and(|e| self.meta.created_at_ms >= e)
            || filter.max_id.is_some_and(|m| self.id > m)
            || filter.status.is_some_and(|s| self.meta.status != Some(s))
        {
            return false;
        }
        let Some(q) = filter.q.as_deref().filter(|q| !q.is_empty()) else {
            return true;
        };
        let q = q.to_ascii_lowercase();
        let fields: &[SearchField] = if filter.q_fields.is_empty() {
            &SearchField::ALL
        } else {
            &filter.q_fields
        };
        fields.iter().any(|field| {
            let text = match field {
                SearchField::MessageId => &self.meta.message_id,
                SearchField::User => &self.meta.user_key,
                SearchField::Event => &self.event,
                SearchField::Type => &self.meta.kind,
                SearchField::Error => &self.meta.error,
            };
            text.to_ascii_lowercase().contains(&q)
        })
    }
}

fn compare_values(a: &SortValue, b: &SortValue) -> Ordering {
    match (a, b) {
        (SortValue::Int(a), SortValue::Int(b)) => a.cmp(b),
        (SortValue::Text(a), SortValue::Text(b)) => a.cmp(b),
        (SortValue::Int(_), SortValue::Text(_)) => Ordering::Less,
        (SortValue::Text(_), SortValue::Int(_)) => Ordering::Greater,
    }
}

/// Order of two positions `(value, id)` in a listing sorted by `sort` (ascending).
fn compare(sort: SortField, a: (&SortValue, i64), b: (&SortValue, i64)) -> Ordering {
    if sort == SortField::Id {
        return a.1.cmp(&b.1);
    }
    compare_values(a.0, b.0).then(a.1.cmp(&b.1))
}

/// A track's event name, else a page's or screen's name.
fn event_name(payload: &serde_json::Value) -> String {
    match field(payload, "event") {
        "" => field(payload, "name").to_owned(),
        event => event.to_owned(),
    }
}

fn field<'a>(payload: &'a serde_json::Value, name: &str) -> &'a str {
    payload.get(name).and_then(|v| v.as_str()).unwrap_or("")
}

impl Inner {
    /// Every dead letter of a source, in id order.
    async fn scan(&self, source: &str) -> Result<Vec<Record>, SpoolError> {
        let subject = self.options.dead_subject(source);
        let mut consumer: consumer::PullConsumer = self
            .dead
            .create_consumer(consumer::pull::Config {
                filter_subject: subject,
                ack_policy: consumer::AckPolicy::None,
                deliver_policy: consumer::DeliverPolicy::All,
                inactive_threshold: Duration::from_secs(30),
                memory_storage: true,
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| storage("cannot read the dead letters", e))?;
        let pending = consumer
            .info()
            .await
            .map_err(|e| storage("cannot read the dead letters", e))?
            .num_pending as usize;
        let mut records = Vec::with_capacity(pending);
        while records.len() < pending {
            let mut batch = consumer
                .fetch()
                .max_messages((pending - records.len()).min(1000))
                .messages()
                .await
                .map_err(|e| storage("cannot read the dead letters", e))?;
            let before = records.len();
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| storage("cannot read the dead letters", e))?;
                let Ok(info) = message.info() else { continue };
                let id = info.stream_sequence as i64;
                let Some((meta, payload)) = decode::<DeadMeta>(&message.payload) else {
                    continue;
                };
                let parsed: serde_json::Value =
                    serde_json::from_slice(&payload).unwrap_or_default();
                records.push(Record {
                    id,
                    user_id: field(&parsed, "userId").to_owned(),
                    event: event_name(&parsed),
                    meta,
                    payload,
                });
            }
            if records.len() == before {
                break;
            }
        }
        let name = consumer.cached_info().name.clone();
        let _ = self.dead.delete_consumer(&name).await;
        records.sort_by_key(|r| r.id);
        Ok(records)
    }

    pub(super) async fn list_dead_letters(
        &self,
        query: DeadLetterQuery,
    ) -> Result<DeadLetterPage, SpoolError> {
        let sort = query.sort;
        let mut rows: Vec<(SortValue, Record)> = self
            .scan(&query.filter.source)
            .await?
            .into_iter()
            .filter(|r| r.matches(&query.filter))
            .map(|r| (r.sort_value(sort), r))
            .collect();
        rows.sort_by(|a, b| {
            let order = compare(sort, (&a.0, a.1.id), (&b.0, b.1.id));
            if query.descending {
                order.reverse()
            } else {
                order
            }
        });
        let count = rows.len() as u64;
        let limit = query.limit.max(1) as usize;
        // Where a row is relative to the cursor, in the listing's order.
        let position = |row: &(SortValue, Record), cursor: &Cursor| {
            let order = compare(sort, (&row.0, row.1.id), (&cursor.value, cursor.id));
            if query.descending {
                order.reverse()
            } else {
                order
            }
        };
        let (slice, more): (Vec<&(SortValue, Record)>, bool) = match &query.at {
            PageAt::Offset(offset) => {
                let offset = (*offset).min(count) as usize;
                let page: Vec<_> = rows.iter().skip(offset).take(limit).collect();
                (page, offset + limit < rows.len())
            }
            PageAt::After(cursor) => {
                let rest: Vec<_> = rows
                    .iter()
                    .filter(|row| position(row, cursor) == Ordering::Greater)
                    .collect();
                let more = rest.len() > limit;
                (rest.into_iter().take(limit).collect(), more)
            }
            PageAt::Before(cursor) => {
                let before: Vec<_> = rows
                    .iter()
                    .filter(|row| position(row, cursor) == Ordering::Less)
                    .collect();
                let more = before.len() > limit;
                let start = before.len().saturating_sub(limit);
                (before[start..].to_vec(), more)
            }
        };
        Ok(DeadLetterPage {
            count,
            items: slice.iter().map(|(_, r)| r.summary(sort)).collect(),
            more,
        })
    }

    pub(super) async fn dead_letter(
        &self,
        source: &str,
        id: i64,
    ) -> Result<Option<DeadLetter>, SpoolError> {
        let Ok(seq) = u64::try_from(id) else {
            return Ok(None);
        };
        let message = match self.dead.get_raw_message(seq).await {
            Ok(message) => message,
            Err(e)
                if matches!(
                    e.kind(),
                    async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound
                ) =>
            {
                return Ok(None)
            }
            Err(e) => return Err(storage("cannot read a dead letter", e)),
        };
        if message.subject.as_str() != self.options.dead_subject(source) {
            return Ok(None);
        }
        let Some((meta, payload)) = decode::<DeadMeta>(&message.payload) else {
            return Ok(None);
        };
        let parsed: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
        let attempts = meta
            .history
            .iter()
            .map(|a| Attempt {
                at_ms: a.0,
                status: a.1,
                error: a.2.clone(),
            })
            .collect();
        let record = Record {
            id,
            user_id: field(&parsed, "userId").to_owned(),
            event: event_name(&parsed),
            meta,
            payload,
        };
        Ok(Some(DeadLetter {
            summary: record.summary(SortField::Id),
            payload: record.payload.clone(),
            attempts,
        }))
    }

    pub(super) async fn replay_dead_letters(
        &self,
        filter: DeadLetterFilter,
        limit: Option<u64>,
    ) -> Result<ReplayReport, SpoolError> {
        let mut chosen: Vec<Record> = self
            .scan(&filter.source)
            .await?
            .into_iter()
            .filter(|r| r.matches(&filter))
            .collect();
        chosen.sort_by_key(|r| (r.meta.queue_seq, r.id));
        let total = chosen.len() as u64;
        let take = limit.unwrap_or(total).min(total) as usize;
        let now = super::now_ms();
        let mut replayed = 0u64;
        for record in chosen.into_iter().take(take) {
            let partition = partition_of(
                &record.meta.source,
                &record.meta.user_key,
                self.options.partitions,
            );
            let meta = Meta {
                s: record.meta.source.clone(),
                m: record.meta.message_id.clone(),
                k: record.meta.kind.clone(),
                u: record.meta.user_key.clone(),
                r: now,
                a: record.meta.attempts,
                h: record.meta.history.clone(),
            };
            let mut headers = HeaderMap::new();
            let id = format!(
                "{}:replay:{}:{}",
                record.meta.source, self.options.dead_letter_stream, record.id
            );
            headers.insert("Nats-Msg-Id", id.as_str());
            let ack = self
                .js
                .publish_with_headers(
                    self.options.event_subject(partition),
                    headers,
                    encode(&meta, &record.payload).into(),
                )
                .await
                .map_err(|e| storage("replaying a dead letter failed", e))?;
            let ack = ack
                .await
                .map_err(|e| storage("JetStream did not acknowledge a replay", e))?;
            if !ack.duplicate {
                self.state().appended(partition, ack.sequence);
                let mut tally = self.tally();
                tally.count(&record.meta.source, now, "replayed", 1);
                tally.depth(&record.meta.source, 1);
            }
            self.dead
                .delete_message(record.id as u64)
                .await
                .map_err(|e| storage("cannot remove a replayed dead letter", e))?;
            replayed += 1;
        }
        Ok(ReplayReport {
            replayed,
            remaining: total - replayed,
        })
    }

    pub(super) async fn delete_dead_letters(
        &self,
        filter: DeadLetterFilter,
    ) -> Result<u64, SpoolError> {
        let chosen: Vec<i64> = self
            .scan(&filter.source)
            .await?
            .into_iter()
            .filter(|r| r.matches(&filter))
            .map(|r| r.id)
            .collect();
        let mut deleted = 0;
        for id in chosen {
            match self.dead.delete_message(id as u64).await {
                Ok(_) => deleted += 1,
                Err(e) if e.to_string().contains("not found") => {}
                Err(e) => return Err(storage("cannot delete a dead letter", e)),
            }
        }
        Ok(deleted)
    }
}
