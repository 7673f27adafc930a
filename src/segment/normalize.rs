//! Per-event validation and normalization (see the module header of `segment`).

use serde_json::{Map, Value};

use super::time::{correct_clock_skew, format_timestamp};
use super::{Arrival, Event, EventType, Item, Reject, Skip};

/// What a batch carries beside its items, merged into each of them.
#[derive(Debug, Default)]
pub(super) struct BatchLevel {
    pub sent_at: Option<Value>,
    pub context: Option<Map<String, Value>>,
    pub integrations: Option<Map<String, Value>>,
}

/// Validates and normalizes one event object. A `Reject` refuses the whole request; a
/// `Skip` drops this event only.
pub(super) fn normalize(
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

fn email_in(value: Option<&Value>) -> Option<&str> {
    value?
        .get("email")?
        .as_str()
        .map(str::trim)
        .filter(|email| !email.is_empty())
}

/// The identity the dispatcher orders a user's events by: `u:<userId>`, else
/// `e:<email>` (from `traits.email` of an identify, or `context.traits.email`), else
/// `a:<anonymousId>`. A group's `traits` describe the group, so its email does not count.
pub fn user_key(event: &Map<String, Value>, kind: EventType) -> Option<String> {
    if let Some(id) = event.get("userId").and_then(Value::as_str) {
        return Some(format!("u:{id}"));
    }
    let own_traits = match kind {
        EventType::Identify => email_in(event.get("traits")),
        _ => None,
    };
    let context_traits = event.get("context").and_then(|c| c.get("traits"));
    if let Some(email) = own_traits.or_else(|| email_in(context_traits)) {
        return Some(format!("e:{email}"));
    }
    event
        .get("anonymousId")
        .and_then(Value::as_str)
        .map(|id| format!("a:{id}"))
}
