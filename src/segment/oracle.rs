//! The gateway's earlier, tree-based parser, kept as the oracle of the differential
//! property tests (`differential.rs`): every event is parsed whole into a
//! `serde_json::Map`, normalized in place and re-serialized. Slow, but each rule is a
//! line of code on a `Value`, so it is easy to check by reading. The production parsers
//! must agree with it on every input: the same `Reject`, the same skips, and payloads
//! equal as `Value`s.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::time::{correct_clock_skew, format_timestamp};
use super::{
    user_key, Arrival, Destinations, Event, EventType, Item, Parsed, Refused, Reject, Skip,
};

/// Parses a single-event request (`/v1/track`, `/v1/t`, ...). The route implies the type;
/// a `type` in the body is overwritten.
pub fn parse_single(body: &[u8], kind: EventType, arrival: Arrival<'_>) -> Result<Parsed, Reject> {
    if body.len() > arrival.limits.max_event_bytes {
        return Err(Reject::EventTooLarge {
            index: 0,
            size: body.len(),
            limit: arrival.limits.max_event_bytes,
        });
    }
    let mut object = match parse_json(body)? {
        Value::Object(object) => object,
        _ => return Err(Reject::NotAnObject),
    };
    let write_key = take_write_key(&mut object);
    object.insert("type".into(), Value::String(kind.as_str().into()));
    let item = normalize(object, 0, &BatchLevel::default(), false, arrival)?;
    Ok(Parsed {
        write_key,
        items: vec![item],
        refused: Vec::new(),
    })
}

#[derive(Deserialize)]
struct RawBatch<'a> {
    #[serde(borrow)]
    batch: Option<Vec<&'a RawValue>>,
    #[serde(rename = "writeKey")]
    write_key: Option<Value>,
    #[serde(rename = "sentAt")]
    sent_at: Option<Value>,
    context: Option<Value>,
    integrations: Option<Value>,
}

/// Parses a batch request (`/v1/batch`, `/v1/b`, `/v1/import`).
pub fn parse_batch(body: &[u8], arrival: Arrival<'_>) -> Result<Parsed, Reject> {
    let raw: RawBatch<'_> = match serde_json::from_slice(body) {
        Ok(raw) => raw,
        Err(e) if e.is_data() => {
            // Valid JSON of the wrong shape.
            return Err(match parse_json(body)? {
                Value::Object(_) => Reject::InvalidBatch,
                _ => Reject::NotAnObject,
            });
        }
        Err(e) => return Err(Reject::InvalidJson(e.to_string())),
    };
    let items = raw.batch.ok_or(Reject::InvalidBatch)?;
    let limits = arrival.limits;
    if items.len() > limits.max_batch_events {
        return Err(Reject::TooManyEvents {
            count: items.len(),
            limit: limits.max_batch_events,
        });
    }
    let level = BatchLevel {
        sent_at: raw.sent_at.filter(|v| !v.is_null()),
        context: as_object(raw.context),
        integrations: as_object(raw.integrations),
    };
    let write_key = raw.write_key.and_then(|v| match v {
        Value::String(s) => Some(s),
        _ => None,
    });
    let max_total = Some(limits.max_batch_merged_bytes);
    parse_items(
        &items,
        &level,
        false,
        limits.max_event_bytes,
        max_total,
        arrival,
    )
    .map(|(items, refused)| Parsed {
        write_key,
        items,
        refused,
    })
}

/// Parses a `/webhook` body from Segment's Webhooks destination: one event object
/// (Classic, or Actions without batching) or a JSON array of events (Actions batching).
/// Every event must name its `type`; `delete` is accepted here.
pub fn parse_webhook(body: &[u8], arrival: Arrival<'_>) -> Result<Parsed, Reject> {
    let limits = arrival.limits;
    let trimmed = trim_json_start(body);
    if trimmed.first() == Some(&b'[') {
        let items: Vec<&RawValue> =
            serde_json::from_slice(body).map_err(|e| Reject::InvalidJson(e.to_string()))?;
        if items.len() > limits.max_webhook_events {
            return Err(Reject::TooManyEvents {
                count: items.len(),
                limit: limits.max_webhook_events,
            });
        }
        let level = BatchLevel::default();
        let (items, refused) =
            parse_items(&items, &level, true, limits.max_event_bytes, None, arrival)?;
        let write_key = None;
        return Ok(Parsed {
            write_key,
            items,
            refused,
        });
    }
    if body.len() > limits.max_event_bytes {
        return Err(Reject::EventTooLarge {
            index: 0,
            size: body.len(),
            limit: limits.max_event_bytes,
        });
    }
    let mut object = match parse_json(body)? {
        Value::Object(object) => object,
        _ => return Err(Reject::NotAnObject),
    };
    let write_key = take_write_key(&mut object);
    let level = BatchLevel::default();
    let item = normalize(object, 0, &level, true, arrival)?;
    Ok(Parsed {
        write_key,
        items: vec![item],
        refused: Vec::new(),
    })
}

fn parse_items(
    raw_items: &[&RawValue],
    level: &BatchLevel,
    allow_delete: bool,
    max_event_bytes: usize,
    max_total: Option<usize>,
    arrival: Arrival<'_>,
) -> Result<(Vec<Item>, Vec<Refused>), Reject> {
    let mut items = Vec::with_capacity(raw_items.len());
    let mut refused = Vec::new();
    let mut total = 0usize;
    for (index, raw) in raw_items.iter().enumerate() {
        let text = raw.get();
        if text.len() > max_event_bytes {
            let reason = Reject::EventTooLarge {
                index,
                size: text.len(),
                limit: max_event_bytes,
            };
            refused.push(Refused::new(index, reason, text));
            continue;
        }
        // The outer parse already validated this span, so only its shape can be wrong.
        let object = match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(mut object)) => {
                object.remove("writeKey");
                Some(object)
            }
            _ => None,
        };
        let size = match &object {
            Some(object) => text.len() + merge_addition(object, level),
            None => text.len(),
        };
        if size > max_event_bytes {
            let reason = Reject::MergedEventTooLarge {
                index,
                size,
                limit: max_event_bytes,
            };
            refused.push(Refused::new(index, reason, text));
            continue;
        }
        total += size;
        if let Some(limit) = max_total.filter(|&limit| total > limit) {
            return Err(Reject::MergedBatchTooLarge { limit });
        }
        let Some(object) = object else {
            items.push(Err(Skip::NotAnObject));
            continue;
        };
        match normalize(object, index, level, allow_delete, arrival) {
            Ok(item) => items.push(item),
            Err(reason @ (Reject::MessageIdTooLong { .. } | Reject::InvalidMessageId { .. })) => {
                refused.push(Refused::new(index, reason, text))
            }
            Err(reject) => return Err(reject),
        }
    }
    Ok((items, refused))
}

/// What merging the batch level adds to `event`: the batch `sentAt`, and each member of the
/// batch's `context` and `integrations` that the event's own object lacks (all of them when
/// it has none), each counted as its key, its value as JSON, and 4 bytes.
fn merge_addition(event: &Map<String, Value>, level: &BatchLevel) -> usize {
    let size = |key: &str, value: &Value| key.len() + value.to_string().len() + 4;
    let mut added = level.sent_at.as_ref().map_or(0, |v| size("sentAt", v));
    for (field, batch) in [
        ("context", &level.context),
        ("integrations", &level.integrations),
    ] {
        let Some(batch) = batch else { continue };
        let own = match event.get(field) {
            Some(Value::Object(own)) => Some(own),
            _ => None,
        };
        added += batch
            .iter()
            .filter(|(key, _)| !own.is_some_and(|own| own.contains_key(*key)))
            .map(|(key, value)| size(key, value))
            .sum::<usize>();
    }
    added
}

fn parse_json(body: &[u8]) -> Result<Value, Reject> {
    serde_json::from_slice(body).map_err(|e| Reject::InvalidJson(e.to_string()))
}

fn take_write_key(object: &mut Map<String, Value>) -> Option<String> {
    match object.remove("writeKey") {
        Some(Value::String(key)) => Some(key),
        _ => None,
    }
}

fn as_object(value: Option<Value>) -> Option<Map<String, Value>> {
    match value {
        Some(Value::Object(map)) => Some(map),
        _ => None,
    }
}

fn trim_json_start(body: &[u8]) -> &[u8] {
    let start = body
        .iter()
        .position(|b| !matches!(b, b' ' | b'\n' | b'\r' | b'\t'))
        .unwrap_or(body.len());
    &body[start..]
}

/// What a batch carries beside its items, merged into each of them.
#[derive(Debug, Default)]
struct BatchLevel {
    sent_at: Option<Value>,
    context: Option<Map<String, Value>>,
    integrations: Option<Map<String, Value>>,
}

/// Validates and normalizes one event object. A `Reject` refuses the whole request; a
/// `Skip` drops this event only.
fn normalize(
    mut event: Map<String, Value>,
    index: usize,
    level: &BatchLevel,
    allow_delete: bool,
    arrival: Arrival<'_>,
) -> Result<Item, Reject> {
    let message_id = message_id(&event, index, arrival)?;
    let kind = match event.get("type").and_then(Value::as_str) {
        Some(name) => match EventType::parse(name, allow_delete) {
            Some(kind) => kind,
            None => return Ok(Err(Skip::UnknownType)),
        },
        None => return Ok(Err(Skip::UnknownType)),
    };

    for field in ["userId", "anonymousId"] {
        coerce_id(&mut event, field);
    }
    if let Err(skip) = validate(&event, kind) {
        return Ok(Err(skip));
    }

    merge_missing(&mut event, "context", level.context.as_ref());
    merge_missing(&mut event, "integrations", level.integrations.as_ref());
    if let Some(sent_at) = &level.sent_at {
        event.insert("sentAt".into(), sent_at.clone());
    }
    let sent_at = event.get("sentAt").filter(|v| !v.is_null()).cloned();
    correct_clock_skew(&mut event, arrival.received_at_ms, sent_at.as_ref());
    event.insert(
        "receivedAt".into(),
        Value::String(format_timestamp(arrival.received_at_ms)),
    );
    event.insert("messageId".into(), Value::String(message_id.clone()));

    let Some(user_key) = user_key(&event, kind) else {
        return Ok(Err(Skip::NoUserOrAnonymousId));
    };
    if let Err(skip) = Destinations::default().select(event.get("integrations")) {
        return Ok(Err(skip));
    }
    // Serializing a `Map` of `Value`s cannot fail (string keys, no custom serializers).
    let payload = serde_json::to_vec(&event).unwrap_or_default();
    Ok(Ok(Event {
        kind,
        message_id,
        user_key,
        payload,
    }))
}

/// The event's `messageId`, or a fresh one when it has none (null and "" count as none).
fn message_id(
    event: &Map<String, Value>,
    index: usize,
    arrival: Arrival<'_>,
) -> Result<String, Reject> {
    let limit = arrival.limits.max_message_id_len;
    match event.get("messageId") {
        None | Some(Value::Null) => Ok((arrival.new_message_id)()),
        Some(Value::String(id)) if id.is_empty() => Ok((arrival.new_message_id)()),
        Some(Value::String(id)) if id.chars().count() > limit => {
            Err(Reject::MessageIdTooLong { index, limit })
        }
        Some(Value::String(id)) => Ok(id.clone()),
        Some(_) => Err(Reject::InvalidMessageId { index }),
    }
}

/// Numeric ids become strings (some clients send numbers); empty strings and other
/// shapes are removed, so that "has an id" means "has a non-empty string".
fn coerce_id(event: &mut Map<String, Value>, field: &str) {
    let replacement = match event.get(field) {
        None => return,
        Some(Value::String(s)) if !s.is_empty() => return,
        Some(Value::Number(n)) => Some(Value::String(n.to_string())),
        Some(_) => None,
    };
    match replacement {
        Some(value) => {
            event.insert(field.into(), value);
        }
        None => {
            event.remove(field);
        }
    }
}

fn non_empty(event: &Map<String, Value>, field: &str) -> bool {
    match event.get(field) {
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Number(_)) => true,
        _ => false,
    }
}

fn validate(event: &Map<String, Value>, kind: EventType) -> Result<(), Skip> {
    let has_user = non_empty(event, "userId");
    let has_anon = non_empty(event, "anonymousId");
    match kind {
        EventType::Delete if !has_user => return Err(Skip::NoUserOrAnonymousId),
        _ if !has_user && !has_anon => return Err(Skip::NoUserOrAnonymousId),
        _ => {}
    }
    match kind {
        EventType::Track if !matches!(event.get("event"), Some(Value::String(s)) if !s.is_empty()) => {
            Err(Skip::MissingEvent)
        }
        EventType::Group if !non_empty(event, "groupId") => Err(Skip::MissingGroupId),
        EventType::Alias if !non_empty(event, "previousId") => Err(Skip::MissingPreviousId),
        _ => Ok(()),
    }
}

/// Copies the batch-level object's keys that the event's own object lacks (the event
/// wins on conflict).
fn merge_missing(event: &mut Map<String, Value>, field: &str, batch: Option<&Map<String, Value>>) {
    let Some(batch) = batch else { return };
    match event.get_mut(field) {
        Some(Value::Object(own)) => {
            for (key, value) in batch {
                if !own.contains_key(key) {
                    own.insert(key.clone(), value.clone());
                }
            }
        }
        _ => {
            event.insert(field.into(), Value::Object(batch.clone()));
        }
    }
}
