//! The Segment spec: event types, limits, validation and normalization.
//!
//! This module is pure: it never does IO, never reads the clock (the arrival time is passed
//! in) and never panics on input. Everything the ingest edge receives goes through
//! [`parse_single`], [`parse_batch`] or [`parse_webhook`], which either reject the whole
//! request with a [`Reject`] (the client gets a 400 naming the problem) or return one
//! [`Item`] per event: an [`Event`] ready for the spool, or a [`Skip`] with the reason the
//! event is dropped while the request still answers 200, as Segment's own API does.
//!
//! One event of a batch or webhook array that breaks a per-event limit (its size, its
//! `messageId`) does not refuse the request: it is returned in [`Parsed::refused`] with the
//! [`Reject`] that names the problem and its first [`REFUSED_RAW_BYTES`] bytes as sent,
//! and the batch's other events are parsed as usual. Limits of the request as a whole (its
//! body, its event count, its merged total) and a single-event body still refuse it.
//!
//! Events the source's [`Destinations`] do not select (Segment's `integrations` object) are
//! a [`Skip`] like any other event dropped with a 200.
//!
//! Invariants of every [`Event`]:
//! - `payload` is a JSON object whose `type`, `messageId`, `receivedAt` and `timestamp`
//!   are set, in which each top-level key appears once, and which no longer carries the
//!   `writeKey`;
//! - `message_id` is non-empty and at most [`Limits::max_message_id_len`] characters;
//! - `user_key` is the identity the dispatcher orders by (see [`user_key`]).
//!
//! Bounds of a parse: each event, as sent and again with the batch's `sentAt`, `context`
//! and `integrations` merged into it, is at most [`Limits::max_event_bytes`], and the merged
//! events of a batch total at most [`Limits::max_batch_merged_bytes`]. Merged sizes are
//! computed before anything is written, so a batch-level object repeated into thousands of
//! events is refused, not copied; what one batch writes is bounded whatever its body
//! repeats (plus the few fields set on every event).
//! [`body_write_key`] reads the `writeKey` before any of this, for authentication.
//!
//! Events are not parsed into a tree: serde_json checks the syntax of the body, `scan`
//! splits each event into its top-level members as raw text (and refuses, as a
//! `serde_json::Value` parse would, numbers out of range, lone surrogates and nesting
//! beyond 127 levels), and `normalize` decodes only the members the rules read and writes
//! the payload from the raw text. The payload is therefore equal *as JSON* to the
//! normalized event, not byte-equal to any particular serialization: key order, spacing
//! and the spelling of untouched values are the client's. The test-only `oracle` module
//! keeps the earlier tree-based parser, and `differential` checks that both agree.

mod destinations;
mod identity;
mod normalize;
#[cfg(test)]
mod oracle;
mod scan;
mod time;

use serde::de::{Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

pub use destinations::{Destinations, Flag, DEFAULT_DESTINATION_NAMES};
pub use identity::{HoldKey, Identity, UserKey};
pub use normalize::user_key;
pub use time::{correct_clock_skew, format_timestamp};

/// The kinds of event the gateway accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Identify,
    Track,
    Page,
    Screen,
    Group,
    Alias,
    /// A user-deletion notification sent by Segment's Webhooks destination.
    Delete,
}

impl EventType {
    /// Every type, in a fixed order (for metrics and docs); `ALL[kind as usize] == kind`.
    pub const ALL: [EventType; 7] = [
        EventType::Identify,
        EventType::Track,
        EventType::Page,
        EventType::Screen,
        EventType::Group,
        EventType::Alias,
        EventType::Delete,
    ];

    /// The spec name, as it appears in `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Identify => "identify",
            EventType::Track => "track",
            EventType::Page => "page",
            EventType::Screen => "screen",
            EventType::Group => "group",
            EventType::Alias => "alias",
            EventType::Delete => "delete",
        }
    }

    /// Parses a spec name. `delete` is only valid where `allow_delete` is set (webhooks),
    /// because only Segment itself sends deletion notifications.
    pub fn parse(name: &str, allow_delete: bool) -> Option<EventType> {
        Some(match name {
            "identify" => EventType::Identify,
            "track" => EventType::Track,
            "page" => EventType::Page,
            "screen" => EventType::Screen,
            "group" => EventType::Group,
            "alias" => EventType::Alias,
            "delete" if allow_delete => EventType::Delete,
            _ => return None,
        })
    }

    /// The type of an event read back from a spool, which stored [`EventType::as_str`]
    /// (`delete` included); `None` for a text no version of the gateway wrote.
    pub fn from_stored(name: &str) -> Option<EventType> {
        EventType::parse(name, true)
    }

    /// The type implied by a `/v1/{path}` route: full names and analytics.js' one-letter
    /// paths (`/v1/t`, `/v1/i`, ...).
    pub fn from_path(path: &str) -> Option<EventType> {
        Some(match path {
            "identify" | "i" => EventType::Identify,
            "track" | "t" => EventType::Track,
            "page" | "p" => EventType::Page,
            "screen" | "s" => EventType::Screen,
            "group" | "g" => EventType::Group,
            "alias" | "a" => EventType::Alias,
            _ => return None,
        })
    }
}

/// Size and count limits: the configuration's `[limits]` table, read straight into this
/// type. Segment's documented values are the defaults, except the batch body: RudderStack's
/// SDKs send batches of up to 4 MB (its server takes 4,000 KB), so the gateway takes 4 MiB
/// where Segment documents 500 KB.
///
/// The parse applies the event, batch, webhook and `messageId` limits; the last three
/// (`body_budget_bytes`, `body_timeout_secs`, `max_webhook_signatures`) bound the ingest
/// edge's memory and time around it and are applied there.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest single event, in bytes of (inflated) JSON. Segment: 32 KB.
    pub max_event_bytes: usize,
    /// Largest `/v1/batch` body, in inflated bytes. Segment: 500 KB; RudderStack: 4,000 KB.
    pub max_batch_bytes: usize,
    /// Most events in one batch. Segment: 2,500.
    pub max_batch_events: usize,
    /// Largest `/webhook` body, in inflated bytes. Actions batches carry up to 4,000 events.
    pub max_webhook_bytes: usize,
    /// Most events in one webhook (Actions) batch.
    pub max_webhook_events: usize,
    /// Longest accepted `messageId`, in characters. Segment: 100.
    pub max_message_id_len: usize,
    /// Largest total of a batch's events with the batch-level `sentAt`, `context` and
    /// `integrations` merged into them (see [`Reject::MergedBatchTooLarge`]): what one
    /// batch request may store, whatever its body repeats into every event.
    pub max_batch_merged_bytes: usize,
    /// Request bytes all ingest requests together may hold in memory (bodies being read or
    /// inflated, and their events until they are stored).
    pub body_budget_bytes: usize,
    /// Wall time one request body may take to arrive, in seconds.
    pub body_timeout_secs: u64,
    /// Signatures of accepted `actions` webhooks remembered (for the dedup window).
    pub max_webhook_signatures: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_event_bytes: 32 * 1024,
            max_batch_bytes: 4 * 1024 * 1024,
            max_batch_events: 2500,
            max_webhook_bytes: 4 * 1024 * 1024,
            max_webhook_events: 4000,
            max_message_id_len: 100,
            max_batch_merged_bytes: 8 * 1024 * 1024,
            body_budget_bytes: 128 * 1024 * 1024,
            body_timeout_secs: 30,
            max_webhook_signatures: 100_000,
        }
    }
}

/// Why a whole request is refused with 400. The `code` is stable and documented.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("the body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("the body must be a JSON object")]
    NotAnObject,
    #[error("the body must be an object with a `batch` array")]
    InvalidBatch,
    #[error("the batch holds {count} events; the limit is {limit}")]
    TooManyEvents { count: usize, limit: usize },
    #[error("event {index} is {size} bytes; the limit is {limit} bytes per event")]
    EventTooLarge {
        index: usize,
        size: usize,
        limit: usize,
    },
    #[error(
        "event {index} is {size} bytes with the batch's sentAt, context and integrations \
         merged into it; the limit is {limit} bytes per event"
    )]
    MergedEventTooLarge {
        index: usize,
        size: usize,
        limit: usize,
    },
    #[error(
        "the batch's events total more than {limit} bytes with the batch's sentAt, context \
         and integrations merged into them"
    )]
    MergedBatchTooLarge { limit: usize },
    #[error("event {index} has a messageId longer than {limit} characters")]
    MessageIdTooLong { index: usize, limit: usize },
    #[error("event {index} has a messageId that is not a string")]
    InvalidMessageId { index: usize },
}

impl Reject {
    /// The machine-readable code sent as `code` in the 400 body.
    pub fn code(&self) -> &'static str {
        match self {
            Reject::InvalidJson(_) => "invalid_json",
            Reject::NotAnObject => "invalid_body",
            Reject::InvalidBatch => "invalid_batch",
            Reject::TooManyEvents { .. } => "too_many_events",
            Reject::EventTooLarge { .. } | Reject::MergedEventTooLarge { .. } => "event_too_large",
            Reject::MergedBatchTooLarge { .. } => "payload_too_large",
            Reject::MessageIdTooLong { .. } => "message_id_too_long",
            Reject::InvalidMessageId { .. } => "invalid_message_id",
        }
    }
}

/// Why a well-formed event is dropped (the request still answers 200, as Segment does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Skip {
    /// Neither `userId` nor `anonymousId` (Segment's `no_user_anon_id`).
    NoUserOrAnonymousId,
    /// A `track` without an `event` name.
    MissingEvent,
    /// A `group` without a `groupId`.
    MissingGroupId,
    /// An `alias` without a `previousId`.
    MissingPreviousId,
    /// A batch item whose `type` is missing or unknown.
    UnknownType,
    /// A batch item that is not a JSON object.
    NotAnObject,
    /// The event's `integrations` disable one of the gateway's destination names and
    /// enable none (see [`Destinations`]).
    DestinationDisabled,
    /// The event's `integrations` say `All: false` and enable none of the gateway's names.
    AllDisabled,
}

impl Skip {
    /// Every reason, in a fixed order (for metrics and docs).
    pub const ALL: [Skip; 8] = [
        Skip::NoUserOrAnonymousId,
        Skip::MissingEvent,
        Skip::MissingGroupId,
        Skip::MissingPreviousId,
        Skip::UnknownType,
        Skip::NotAnObject,
        Skip::DestinationDisabled,
        Skip::AllDisabled,
    ];

    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::NoUserOrAnonymousId => "no_user_anon_id",
            Skip::MissingEvent => "missing_event",
            Skip::MissingGroupId => "missing_group_id",
            Skip::MissingPreviousId => "missing_previous_id",
            Skip::UnknownType => "unknown_type",
            Skip::NotAnObject => "not_an_object",
            Skip::DestinationDisabled => "integrations_disabled",
            Skip::AllDisabled => "integrations_all_disabled",
        }
    }
}

/// A validated, normalized event, ready to be spooled.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventType,
    pub message_id: String,
    /// The identity the dispatcher keeps order by.
    pub user_key: UserKey,
    /// The normalized event as JSON bytes.
    pub payload: Vec<u8>,
}

/// One event of a request: accepted, or skipped with a reason.
pub type Item = Result<Event, Skip>;

/// The most bytes of a refused event kept (as sent) for the operator to see.
pub const REFUSED_RAW_BYTES: usize = 2048;

/// An event of a batch or webhook array refused on its own: the request's other events
/// are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Its position in the batch (or array).
    pub index: usize,
    /// Why: [`Reject::EventTooLarge`], [`Reject::MergedEventTooLarge`],
    /// [`Reject::MessageIdTooLong`] or [`Reject::InvalidMessageId`].
    pub reason: Reject,
    /// Its size as sent, in bytes.
    pub size: usize,
    /// Its first [`REFUSED_RAW_BYTES`] bytes as sent (cut at a character boundary).
    pub raw: String,
}

impl Refused {
    pub(crate) fn new(index: usize, reason: Reject, text: &str) -> Refused {
        let mut end = text.len().min(REFUSED_RAW_BYTES);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Refused {
            index,
            reason,
            size: text.len(),
            raw: text.get(..end).unwrap_or_default().to_owned(),
        }
    }
}

/// Whether a refusal concerns one event only (and so refuses that event, not its batch).
fn refuses_one_event(reject: &Reject) -> bool {
    matches!(
        reject,
        Reject::EventTooLarge { .. }
            | Reject::MergedEventTooLarge { .. }
            | Reject::MessageIdTooLong { .. }
            | Reject::InvalidMessageId { .. }
    )
}

/// What a request carried: the body's `writeKey` (if any), its events, and the events of a
/// batch refused one by one (in `items`, the accepted and skipped events, in order).
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub write_key: Option<String>,
    pub items: Vec<Item>,
    pub refused: Vec<Refused>,
}

/// What one call of the parse functions needs to know besides the body.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    /// Server time on arrival, in milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    pub limits: &'a Limits,
    /// A fresh `messageId` for events that lack one; called once per such event.
    pub new_message_id: fn() -> String,
}

/// Parses a single-event request (`/v1/track`, `/v1/t`, ...). The route implies the type;
/// a `type` in the body is overwritten.
pub fn parse_single(body: &[u8], kind: EventType, arrival: Arrival<'_>) -> Result<Parsed, Reject> {
    parse_single_for(body, kind, arrival, &Destinations::default())
}

/// [`parse_single`] for a source known by `destinations` in `integrations`.
pub fn parse_single_for(
    body: &[u8],
    kind: EventType,
    arrival: Arrival<'_>,
    destinations: &Destinations,
) -> Result<Parsed, Reject> {
    if body.len() > arrival.limits.max_event_bytes {
        return Err(Reject::EventTooLarge {
            index: 0,
            size: body.len(),
            limit: arrival.limits.max_event_bytes,
        });
    }
    let level = normalize::BatchLevel::default();
    parse_one(body, Some(kind), &level, false, arrival, destinations)
}

/// Parses one event object that is the whole body (a single-event route, or a webhook
/// without batching): its `writeKey` is returned, and JSON that is not an object rejects
/// the request.
fn parse_one(
    body: &[u8],
    kind: Option<EventType>,
    level: &normalize::BatchLevel,
    allow_delete: bool,
    arrival: Arrival<'_>,
    destinations: &Destinations,
) -> Result<Parsed, Reject> {
    // serde_json checks the syntax (and words the error); the scan checks the rest of what
    // a `Value` parse would refuse.
    let text = match serde_json::from_slice::<&RawValue>(body) {
        Ok(raw) => raw.get(),
        Err(e) => return Err(json_error(body, e)),
    };
    let mut normalizer = normalize::Normalizer::new(arrival, level, allow_delete, destinations);
    match normalizer.scan(text) {
        scan::Shape::Object => {}
        scan::Shape::NotObject => {
            return Err(match parse_json(body) {
                Ok(_) => Reject::NotAnObject,
                Err(reject) => reject,
            })
        }
        scan::Shape::Invalid => {
            return Err(match parse_json(body) {
                Err(reject) => reject,
                // Not reached: the scan refuses only what a `Value` parse refuses.
                Ok(_) => Reject::InvalidJson("the body could not be read".into()),
            });
        }
    }
    let write_key = normalizer.write_key();
    let item = normalizer.normalize(0, kind)?;
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
    parse_batch_for(body, arrival, &Destinations::default())
}

/// [`parse_batch`] for a source known by `destinations` in `integrations`.
pub fn parse_batch_for(
    body: &[u8],
    arrival: Arrival<'_>,
    destinations: &Destinations,
) -> Result<Parsed, Reject> {
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
    let level = normalize::BatchLevel::new(
        raw.sent_at,
        as_object(raw.context),
        as_object(raw.integrations),
    );
    let write_key = raw.write_key.and_then(|v| match v {
        Value::String(s) => Some(s),
        _ => None,
    });
    let bounds = ItemBounds {
        max_event_bytes: limits.max_event_bytes,
        max_total_bytes: Some(limits.max_batch_merged_bytes),
    };
    let route = ItemRoute {
        level: &level,
        allow_delete: false,
        bounds,
        destinations,
    };
    let (items, refused) = parse_items(&items, route, arrival)?;
    Ok(Parsed {
        write_key,
        items,
        refused,
    })
}

/// Parses a `/webhook` body from Segment's Webhooks destination: one event object
/// (Classic, or Actions without batching) or a JSON array of events (Actions batching).
/// Every event must name its `type`; `delete` is accepted here.
pub fn parse_webhook(body: &[u8], arrival: Arrival<'_>) -> Result<Parsed, Reject> {
    parse_webhook_for(body, arrival, &Destinations::default())
}

/// [`parse_webhook`] for a source known by `destinations` in `integrations`.
pub fn parse_webhook_for(
    body: &[u8],
    arrival: Arrival<'_>,
    destinations: &Destinations,
) -> Result<Parsed, Reject> {
    let limits = arrival.limits;
    let level = normalize::BatchLevel::default();
    let trimmed = trim_json_start(body);
    if trimmed.first() == Some(&b'[') {
        // Counted before the elements are collected: a body of 4 MiB of `1,` would
        // otherwise cost a vector of two million elements before the count is refused.
        if let Some(outline) = array_outline(body) {
            if outline.count > limits.max_webhook_events {
                return Err(Reject::TooManyEvents {
                    count: outline.count,
                    limit: limits.max_webhook_events,
                });
            }
        }
        let items: Vec<&RawValue> =
            serde_json::from_slice(body).map_err(|e| Reject::InvalidJson(e.to_string()))?;
        if items.len() > limits.max_webhook_events {
            return Err(Reject::TooManyEvents {
                count: items.len(),
                limit: limits.max_webhook_events,
            });
        }
        let bounds = ItemBounds {
            max_event_bytes: limits.max_event_bytes,
            max_total_bytes: None,
        };
        let route = ItemRoute {
            level: &level,
            allow_delete: true,
            bounds,
            destinations,
        };
        let (items, refused) = parse_items(&items, route, arrival)?;
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
    parse_one(body, None, &level, true, arrival, destinations)
}

/// The raw bytes of the first element of a JSON array body, exactly as sent: Segment's
/// Actions webhooks sign those bytes when they batch. `None` when the body is not a
/// non-empty array.
pub fn first_array_element(body: &[u8]) -> Option<&[u8]> {
    array_outline(body)?.first.map(|raw| raw.get().as_bytes())
}

/// Whether `body` is a JSON array (leading whitespace aside); says nothing of its validity.
pub fn is_json_array(body: &[u8]) -> bool {
    trim_json_start(body).first() == Some(&b'[')
}

/// The top-level `writeKey` of a body, read before the body is parsed: the request is
/// authenticated with it before any event is normalized. One pass checks the body's
/// syntax (the one refusal here, [`Reject::InvalidJson`]) and picks out the key, skipping
/// every other member's value without allocating; the rare bodies that repeat `writeKey`
/// take a second pass, which finds the last one (as a `Value` parse keeps it). A body that
/// is not an object, or that has no string `writeKey`, has none.
pub fn body_write_key(body: &[u8]) -> Result<Option<String>, Reject> {
    #[derive(Deserialize)]
    struct KeyOnly<'a> {
        #[serde(rename = "writeKey", borrow)]
        write_key: Option<&'a RawValue>,
    }
    let key = |raw: &str| scan::string_value(raw).map(std::borrow::Cow::into_owned);
    if trim_json_start(body).first() == Some(&b'{') {
        match serde_json::from_slice::<KeyOnly<'_>>(body) {
            Ok(only) => return Ok(only.write_key.and_then(|raw| key(raw.get()))),
            Err(e) if !e.is_data() => return Err(Reject::InvalidJson(e.to_string())),
            Err(_) => {}
        }
    }
    let text = match serde_json::from_slice::<&RawValue>(body) {
        Ok(raw) => raw.get(),
        Err(e) => return Err(Reject::InvalidJson(e.to_string())),
    };
    let (_, raw) = scan::last_member(text, "writeKey");
    Ok(raw.and_then(key))
}

/// A JSON array's element count and first element.
struct ArrayOutline<'a> {
    first: Option<&'a RawValue>,
    count: usize,
}

/// Reads a JSON array as `Vec<&RawValue>` would (the same checks, the same refusals),
/// keeping only the first element and the count. `None` when the body is not a JSON array.
fn array_outline(body: &[u8]) -> Option<ArrayOutline<'_>> {
    struct Outline;
    impl<'de> Visitor<'de> for Outline {
        type Value = ArrayOutline<'de>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON array")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let first: Option<&'de RawValue> = seq.next_element()?;
            let mut count = usize::from(first.is_some());
            while seq.next_element::<&'de RawValue>()?.is_some() {
                count += 1;
            }
            Ok(ArrayOutline { first, count })
        }
    }
    if !is_json_array(body) {
        return None;
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let outline = deserializer.deserialize_seq(Outline).ok()?;
    deserializer.end().ok()?;
    Some(outline)
}

/// The size bounds of the events of one request.
#[derive(Debug, Clone, Copy)]
struct ItemBounds {
    /// Each event, as sent and again with the batch level merged into it.
    max_event_bytes: usize,
    /// All events together, batch level merged (batches only).
    max_total_bytes: Option<usize>,
}

/// What the events of one request share besides the arrival.
#[derive(Clone, Copy)]
struct ItemRoute<'a> {
    level: &'a normalize::BatchLevel,
    allow_delete: bool,
    bounds: ItemBounds,
    destinations: &'a Destinations,
}

/// The events of a batch or webhook array: the accepted and skipped ones, and those refused
/// one by one (see [`Refused`]). Only limits of the request as a whole refuse it.
fn parse_items(
    raw_items: &[&RawValue],
    route: ItemRoute<'_>,
    arrival: Arrival<'_>,
) -> Result<(Vec<Item>, Vec<Refused>), Reject> {
    let ItemRoute {
        level,
        allow_delete,
        bounds,
        destinations,
    } = route;
    let max_event_bytes = bounds.max_event_bytes;
    let mut items = Vec::with_capacity(raw_items.len());
    let mut refused = Vec::new();
    let mut normalizer = normalize::Normalizer::new(arrival, level, allow_delete, destinations);
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
        // The outer parse already checked this span's syntax; an item that is not an
        // object, or that a `Value` parse would refuse, is skipped.
        let object = normalizer.scan(text) == scan::Shape::Object;
        // Sized before anything is written: the batch level is counted into each event,
        // never copied into one that would then be refused.
        let size = if object {
            normalizer.merged_size(text.len())
        } else {
            text.len()
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
        total = total.saturating_add(size);
        if let Some(limit) = bounds.max_total_bytes.filter(|&limit| total > limit) {
            return Err(Reject::MergedBatchTooLarge { limit });
        }
        if !object {
            items.push(Err(Skip::NotAnObject));
            continue;
        }
        match normalizer.normalize(index, None) {
            Ok(item) => items.push(item),
            Err(reason) if refuses_one_event(&reason) => {
                refused.push(Refused::new(index, reason, text));
            }
            Err(reject) => return Err(reject),
        }
    }
    Ok((items, refused))
}

fn parse_json(body: &[u8]) -> Result<Value, Reject> {
    serde_json::from_slice(body).map_err(|e| Reject::InvalidJson(e.to_string()))
}

/// The rejection of a body that is not JSON, worded by the same `Value` parse as always
/// (`error` is the syntax check's own error, used only if that parse would succeed).
fn json_error(body: &[u8], error: serde_json::Error) -> Reject {
    match parse_json(body) {
        Err(reject) => reject,
        Ok(_) => Reject::InvalidJson(error.to_string()),
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

#[cfg(test)]
mod bounds_tests;
#[cfg(test)]
mod differential;
#[cfg(test)]
mod tests;
