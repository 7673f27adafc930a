//! Per-event validation and normalization (see the module header of `segment`).
//!
//! An event is read shallowly: [`scan`](super::scan) splits it into its top-level members
//! with their raw text, only the members the rules look at are decoded, and the payload is
//! written by copying every member the rules leave alone byte for byte, then writing the
//! members they set. Nothing is parsed into a tree and nothing is re-serialized.
//!
//! Invariants of a payload written here:
//! - it is one JSON object with each top-level key once; where the event repeated a key,
//!   the last one sent wins, as in a `serde_json::Map`;
//! - parsed as a `serde_json::Value`, it equals what the rules give when applied to the
//!   event parsed as a `Value` (the test-only `oracle` module applies them that way, and a
//!   differential property test compares the two); key order and the spelling of the
//!   untouched values (whitespace, escapes, number formats, duplicate keys inside nested
//!   objects) are the client's.
//!
//! The order of the checks is part of the contract: a bad `messageId` rejects the request
//! before an unknown `type` skips the event, which comes before the identity and
//! per-type checks.

use std::borrow::Cow;
use std::collections::HashMap;

use serde_json::{Map, Value};

use super::destinations::{Destinations, Flag};
use super::scan::{self, Member, Shape};
use super::time::{parse_timestamp, parse_timestamp_str, write_timestamp};
use super::{Arrival, Event, EventType, Item, Reject, Skip, UserKey};

/// A batch-level object (`context`, `integrations`), serialized once per request.
#[derive(Debug)]
pub(super) struct LevelObject {
    map: Map<String, Value>,
    /// The whole object as JSON.
    json: String,
    /// Each member: its key, and the member as JSON (`"key":value`).
    members: Vec<(String, String)>,
    /// Each member's merge size (see [`merge_size`]), by position in `members`.
    sizes: Vec<usize>,
    /// The sum of `sizes`: what the object adds to an event that has none of its keys.
    total: usize,
    /// The position in `members` of each key, so that an event's own keys are looked up
    /// once each (the cost of sizing a merge is the event's size, not a product).
    index: HashMap<String, usize>,
}

impl LevelObject {
    fn new(map: Map<String, Value>) -> LevelObject {
        let mut members = Vec::with_capacity(map.len());
        let mut sizes = Vec::with_capacity(map.len());
        for (key, value) in &map {
            let value = value_json(value);
            sizes.push(merge_size(key, &value));
            let mut member = Vec::new();
            write_json_string(&mut member, key);
            member.push(b':');
            member.extend_from_slice(value.as_bytes());
            members.push((key.clone(), bytes_to_string(member)));
        }
        let index = map
            .keys()
            .enumerate()
            .map(|(i, k)| (k.clone(), i))
            .collect();
        let json = value_json(&Value::Object(map.clone()));
        LevelObject {
            map,
            json,
            total: sizes.iter().sum(),
            members,
            sizes,
            index,
        }
    }
}

/// What one batch-level member adds to an event it is merged into, by definition: its key's
/// text (unescaped), its value as serde_json writes it, and 4 bytes (quotes, colon, comma).
/// A rule both parsers (and the test oracle) compute the same way, close to the bytes the
/// merge writes.
pub(super) fn merge_size(key: &str, value_json: &str) -> usize {
    key.len() + value_json.len() + 4
}

/// What a batch carries beside its items, merged into each of them.
#[derive(Debug, Default)]
pub(super) struct BatchLevel {
    /// A non-null batch `sentAt`: its JSON text, and its instant (ms) when it parses.
    sent_at: Option<(String, Option<i64>)>,
    context: Option<LevelObject>,
    integrations: Option<LevelObject>,
}

impl BatchLevel {
    pub(super) fn new(
        sent_at: Option<Value>,
        context: Option<Map<String, Value>>,
        integrations: Option<Map<String, Value>>,
    ) -> BatchLevel {
        BatchLevel {
            sent_at: sent_at.filter(|v| !v.is_null()).map(|value| {
                let ms = parse_timestamp(&value).map(|t| t.timestamp_millis());
                (value_json(&value), ms)
            }),
            context: context.map(LevelObject::new),
            integrations: integrations.map(LevelObject::new),
        }
    }
}

/// The top-level keys the rules read or write; every other key is copied as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Type,
    MessageId,
    UserId,
    AnonymousId,
    Event,
    GroupId,
    PreviousId,
    Timestamp,
    OriginalTimestamp,
    SentAt,
    ReceivedAt,
    Context,
    Integrations,
    Traits,
    WriteKey,
    /// Not read, but common enough that telling it apart saves the duplicate check.
    Properties,
    /// As `Properties`.
    Name,
}

const FIELDS: usize = 17;

impl Field {
    fn of(key: &str) -> Option<Field> {
        Some(match key {
            "type" => Field::Type,
            "messageId" => Field::MessageId,
            "userId" => Field::UserId,
            "anonymousId" => Field::AnonymousId,
            "event" => Field::Event,
            "groupId" => Field::GroupId,
            "previousId" => Field::PreviousId,
            "timestamp" => Field::Timestamp,
            "originalTimestamp" => Field::OriginalTimestamp,
            "sentAt" => Field::SentAt,
            "receivedAt" => Field::ReceivedAt,
            "context" => Field::Context,
            "integrations" => Field::Integrations,
            "traits" => Field::Traits,
            "writeKey" => Field::WriteKey,
            "properties" => Field::Properties,
            "name" => Field::Name,
            _ => return None,
        })
    }

    /// Whether the payload's member is written by the rules rather than copied.
    fn is_written(self) -> bool {
        !matches!(
            self,
            Field::Event
                | Field::GroupId
                | Field::PreviousId
                | Field::Traits
                | Field::Properties
                | Field::Name
        )
    }
}

/// `class` of a member that is not a [`Field`].
const OTHER: u8 = FIELDS as u8;
/// `class` of a member whose key comes again later (the later one wins).
const REPLACED: u8 = OTHER + 1;

/// `userId` / `anonymousId` after coercion.
enum Id<'b> {
    Absent,
    /// A non-empty string, as sent.
    Raw(&'b str),
    /// A number, as a string.
    Coerced(String),
}

impl Id<'_> {
    fn present(&self) -> bool {
        !matches!(self, Id::Absent)
    }

    fn text(&self) -> Option<Cow<'_, str>> {
        match self {
            Id::Absent => None,
            Id::Raw(raw) => scan::string_value(raw),
            Id::Coerced(text) => Some(Cow::Borrowed(text)),
        }
    }
}

/// Normalizes the events of one request; holds what they share and scratch space.
pub(super) struct Normalizer<'l, 'b> {
    arrival: Arrival<'l>,
    level: &'l BatchLevel,
    allow_delete: bool,
    destinations: &'l Destinations,
    /// `receivedAt` as a JSON string.
    received: Vec<u8>,
    /// The members of the event being normalized.
    members: Vec<Member<'b>>,
    /// Per member: its [`Field`] as `u8`, [`OTHER`] or [`REPLACED`].
    class: Vec<u8>,
    /// Per [`Field`]: the index of its last member.
    slots: [Option<usize>; FIELDS],
    /// Scratch for the members of nested objects (`context`, `traits`).
    nested: Vec<Member<'b>>,
    /// Scratch for the duplicate check: the indices of members that are not [`Field`]s.
    others: Vec<usize>,
    /// Scratch for merges: which members of a batch-level object the event's own object
    /// has, by position.
    present: Vec<bool>,
}

impl<'l, 'b> Normalizer<'l, 'b> {
    pub(super) fn new(
        arrival: Arrival<'l>,
        level: &'l BatchLevel,
        allow_delete: bool,
        destinations: &'l Destinations,
    ) -> Self {
        let mut received = Vec::with_capacity(26);
        received.push(b'"');
        write_timestamp(&mut received, arrival.received_at_ms);
        received.push(b'"');
        Normalizer {
            arrival,
            level,
            allow_delete,
            destinations,
            received,
            members: Vec::with_capacity(24),
            class: Vec::with_capacity(24),
            slots: [None; FIELDS],
            nested: Vec::new(),
            others: Vec::new(),
            present: Vec::new(),
        }
    }

    /// The size of the scanned event (`text_len` bytes as sent) with the batch level merged
    /// into it: its text, plus the batch's `sentAt` and the [`merge_size`] of each member of
    /// the batch's `context` and `integrations` that the event's own object lacks (all of
    /// them when it has no such object). Computed without writing anything.
    pub(super) fn merged_size(&mut self, text_len: usize) -> usize {
        let level = self.level;
        let mut size = text_len;
        if let Some((json, _)) = &level.sent_at {
            size = size.saturating_add(merge_size("sentAt", json));
        }
        for (field, batch) in [
            (Field::Context, level.context.as_ref()),
            (Field::Integrations, level.integrations.as_ref()),
        ] {
            let Some(batch) = batch else { continue };
            let own = self.field(field);
            let added = match self.mark_present(own, batch) {
                Some(present_bytes) => batch.total - present_bytes,
                None => batch.total,
            };
            size = size.saturating_add(added);
        }
        size
    }

    /// Marks in `present` the members of `batch` that the event's own object `own` has,
    /// and answers their total [`merge_size`]; `None` when `own` is not an object with
    /// members (the batch's object then replaces it whole).
    fn mark_present(&mut self, own: Option<&'b str>, batch: &LevelObject) -> Option<usize> {
        let own = own.filter(|raw| scan::is_object(raw))?;
        if scan::object_members(own, 2, &mut self.nested) != Shape::Object || self.nested.is_empty()
        {
            return None;
        }
        self.present.clear();
        self.present.resize(batch.members.len(), false);
        let mut bytes = 0;
        for member in &self.nested {
            if let Some(&i) = batch.index.get(&*member.key) {
                if let Some(seen) = self.present.get_mut(i).filter(|seen| !**seen) {
                    *seen = true;
                    bytes += batch.sizes.get(i).copied().unwrap_or(0);
                }
            }
        }
        Some(bytes)
    }

    /// Reads the event `text` (one JSON value) for [`Normalizer::normalize`].
    pub(super) fn scan(&mut self, text: &'b str) -> Shape {
        let shape = scan::object_members(text, 1, &mut self.members);
        self.classify();
        shape
    }

    /// The event's `writeKey`, when it is a string.
    pub(super) fn write_key(&self) -> Option<String> {
        let raw = self.field(Field::WriteKey)?;
        scan::string_value(raw).map(Cow::into_owned)
    }

    fn field(&self, field: Field) -> Option<&'b str> {
        self.slots[field as usize].and_then(|i| self.members.get(i).map(|m| m.value))
    }

    /// Marks each member with its field, and every member a later one of the same key
    /// replaces.
    fn classify(&mut self) {
        self.slots = [None; FIELDS];
        self.class.clear();
        self.others.clear();
        for (i, member) in self.members.iter().enumerate() {
            match Field::of(&member.key) {
                Some(field) => {
                    if let Some(earlier) = self.slots[field as usize].replace(i) {
                        self.class[earlier] = REPLACED;
                    }
                    self.class.push(field as u8);
                }
                None => {
                    self.others.push(i);
                    self.class.push(OTHER);
                }
            }
        }
        if self.others.len() > 1 {
            let members = &self.members;
            self.others
                .sort_unstable_by(|&a, &b| members[a].key.cmp(&members[b].key).then(a.cmp(&b)));
            for pair in self.others.windows(2) {
                if members[pair[0]].key == members[pair[1]].key {
                    self.class[pair[0]] = REPLACED;
                }
            }
        }
    }

    /// Validates and normalizes the scanned event (an object). `kind` is the type the
    /// route implies, if any; it overrides the event's `type`. A `Reject` refuses the
    /// whole request; a `Skip` drops this event only.
    pub(super) fn normalize(
        &mut self,
        index: usize,
        kind: Option<EventType>,
    ) -> Result<Item, Reject> {
        let (message_id, message_id_raw) = self.message_id(index)?;
        let kind = match kind {
            Some(kind) => kind,
            None => {
                let name = self.field(Field::Type).and_then(scan::string_value);
                match name.and_then(|name| EventType::parse(&name, self.allow_delete)) {
                    Some(kind) => kind,
                    None => return Ok(Err(Skip::UnknownType)),
                }
            }
        };

        let user_id = coerce_id(self.field(Field::UserId));
        let anonymous_id = coerce_id(self.field(Field::AnonymousId));
        if let Err(skip) = self.validate(kind, &user_id, &anonymous_id) {
            return Ok(Err(skip));
        }
        let Some(user_key) = self.user_key(kind, &user_id, &anonymous_id) else {
            return Ok(Err(Skip::NoUserOrAnonymousId));
        };
        if let Err(skip) = self.selected() {
            return Ok(Err(skip));
        }
        let payload = self.payload(kind, &user_id, &anonymous_id, message_id_raw, &message_id);
        Ok(Ok(Event {
            kind,
            message_id,
            user_key,
            payload,
        }))
    }

    /// The event's `messageId` (and its literal, to copy), or a fresh one when it has none
    /// (null and "" count as none).
    fn message_id(&self, index: usize) -> Result<(String, Option<&'b str>), Reject> {
        let limit = self.arrival.limits.max_message_id_len;
        match self.field(Field::MessageId) {
            None => Ok(((self.arrival.new_message_id)(), None)),
            Some(raw) if scan::is_null(raw) || raw == "\"\"" => {
                Ok(((self.arrival.new_message_id)(), None))
            }
            Some(raw) if scan::is_string(raw) => {
                let id = scan::string_value(raw).ok_or(Reject::InvalidMessageId { index })?;
                // A literal is never shorter than the text it stands for.
                if raw.len().saturating_sub(2) > limit && id.chars().count() > limit {
                    return Err(Reject::MessageIdTooLong { index, limit });
                }
                Ok((id.into_owned(), Some(raw)))
            }
            Some(_) => Err(Reject::InvalidMessageId { index }),
        }
    }

    fn validate(&self, kind: EventType, user_id: &Id, anonymous_id: &Id) -> Result<(), Skip> {
        let has_user = user_id.present();
        match kind {
            EventType::Delete if !has_user => return Err(Skip::NoUserOrAnonymousId),
            _ if !has_user && !anonymous_id.present() => return Err(Skip::NoUserOrAnonymousId),
            _ => {}
        }
        let non_empty = |field| {
            self.field(field)
                .is_some_and(|raw| scan::is_non_empty_string(raw) || scan::is_number(raw))
        };
        match kind {
            EventType::Track
                if !self
                    .field(Field::Event)
                    .is_some_and(scan::is_non_empty_string) =>
            {
                Err(Skip::MissingEvent)
            }
            EventType::Group if !non_empty(Field::GroupId) => Err(Skip::MissingGroupId),
            EventType::Alias if !non_empty(Field::PreviousId) => Err(Skip::MissingPreviousId),
            _ => Ok(()),
        }
    }

    /// [`user_key`] of the normalized event, read from the raw members and the batch level.
    fn user_key(&mut self, kind: EventType, user_id: &Id, anonymous_id: &Id) -> Option<UserKey> {
        if let Some(id) = user_id.text() {
            return Some(UserKey::user_id(&id));
        }
        let own_traits = match kind {
            EventType::Identify => self
                .field(Field::Traits)
                .and_then(|raw| email_in_raw(raw, &mut self.nested)),
            _ => None,
        };
        if let Some(email) = own_traits.or_else(|| self.context_email()) {
            return Some(UserKey::email(&email));
        }
        anonymous_id.text().map(|id| UserKey::anonymous(&id))
    }

    /// Whether the source's destinations select the event, by its `integrations` after the
    /// batch-level merge (the event's own members win, per key; an own value that is not
    /// an object with members is replaced by the batch's object).
    fn selected(&mut self) -> Result<(), Skip> {
        let batch = self.level.integrations.as_ref().map(|batch| &batch.map);
        let own = self
            .field(Field::Integrations)
            .filter(|raw| scan::is_object(raw));
        let own_members = match own {
            Some(raw) => {
                scan::object_members(raw, 2, &mut self.nested) == Shape::Object
                    && !self.nested.is_empty()
            }
            None => false,
        };
        if !own_members && batch.is_none() {
            return Ok(());
        }
        let nested = &self.nested;
        self.destinations.decide(|key| {
            if own_members {
                if let Some(member) = nested.iter().rev().find(|m| m.key == key) {
                    return Flag::of_raw(member.value);
                }
            }
            batch?.get(key).and_then(Flag::of_value)
        })
    }

    /// `context.traits.email` of the event's context after the batch-level merge.
    fn context_email(&mut self) -> Option<String> {
        let level = self.level;
        let batch_traits = || email_in_value(level.context.as_ref()?.map.get("traits")?);
        match self.field(Field::Context) {
            Some(raw) if scan::is_object(raw) => {
                scan::object_members(raw, 2, &mut self.nested);
                match self.nested.iter().rev().find(|m| m.key == "traits") {
                    Some(traits) => {
                        let traits = traits.value;
                        email_in_raw(traits, &mut self.nested)
                    }
                    None => batch_traits(),
                }
            }
            // A context that is missing or not an object is replaced by the batch's.
            _ => batch_traits(),
        }
    }

    fn payload(
        &mut self,
        kind: EventType,
        user_id: &Id,
        anonymous_id: &Id,
        message_id_raw: Option<&str>,
        message_id: &str,
    ) -> Vec<u8> {
        let text_len: usize = self
            .members
            .iter()
            .map(|m| m.key_raw.len() + m.value.len() + 2)
            .sum();
        let mut out = Vec::with_capacity(text_len + 192);
        out.push(b'{');
        for (member, &class) in self.members.iter().zip(&self.class) {
            let copied = match class {
                OTHER => true,
                REPLACED => false,
                _ => FIELD_LIST
                    .get(usize::from(class))
                    .is_some_and(|field| !field.is_written()),
            };
            if copied {
                member_raw(&mut out, member.key_raw, member.value);
            }
        }

        out.extend_from_slice(b"\"type\":\"");
        out.extend_from_slice(kind.as_str().as_bytes());
        out.extend_from_slice(b"\",");
        for (key, id) in [("\"userId\"", user_id), ("\"anonymousId\"", anonymous_id)] {
            match id {
                Id::Absent => {}
                Id::Raw(raw) => member_raw(&mut out, key, raw),
                Id::Coerced(text) => {
                    out.extend_from_slice(key.as_bytes());
                    out.push(b':');
                    write_json_string(&mut out, text);
                    out.push(b',');
                }
            }
        }
        let level = self.level;
        let context = self.field(Field::Context);
        self.merged(&mut out, "\"context\"", context, level.context.as_ref());
        let integrations = self.field(Field::Integrations);
        let batch_integrations = level.integrations.as_ref();
        self.merged(
            &mut out,
            "\"integrations\"",
            integrations,
            batch_integrations,
        );

        let own_sent_at = self.field(Field::SentAt);
        let batch_sent_ms = match &level.sent_at {
            Some((json, ms)) => {
                member_raw(&mut out, "\"sentAt\"", json);
                *ms
            }
            None => {
                if let Some(raw) = own_sent_at {
                    member_raw(&mut out, "\"sentAt\"", raw);
                }
                None
            }
        };
        let sent_at_ms = || match &level.sent_at {
            Some(_) => batch_sent_ms,
            None => own_sent_at
                .filter(|raw| !scan::is_null(raw))
                .and_then(scan::string_value)
                .and_then(|text| parse_timestamp_str(&text))
                .map(|t| t.timestamp_millis()),
        };
        self.timestamps(&mut out, sent_at_ms);

        out.extend_from_slice(b"\"receivedAt\":");
        out.extend_from_slice(&self.received);
        out.extend_from_slice(b",\"messageId\":");
        match message_id_raw {
            Some(raw) => out.extend_from_slice(raw.as_bytes()),
            None => write_json_string(&mut out, message_id),
        }
        out.push(b'}');
        out
    }

    /// Writes `timestamp` and `originalTimestamp` by Segment's clock-skew rule (see
    /// [`correct_clock_skew`](super::correct_clock_skew)); `sent_at_ms` is only asked for
    /// when the timestamp parses.
    fn timestamps(&self, out: &mut Vec<u8>, sent_at_ms: impl FnOnce() -> Option<i64>) {
        let own_original = self.field(Field::OriginalTimestamp);
        let Some(raw) = self
            .field(Field::Timestamp)
            .filter(|raw| !scan::is_null(raw))
        else {
            if let Some(original) = own_original {
                member_raw(out, "\"originalTimestamp\"", original);
            }
            out.extend_from_slice(b"\"timestamp\":");
            out.extend_from_slice(&self.received);
            out.push(b',');
            return;
        };
        member_raw(out, "\"originalTimestamp\"", raw);
        let original = scan::string_value(raw).and_then(|text| parse_timestamp_str(&text));
        out.extend_from_slice(b"\"timestamp\":");
        match original {
            None => out.extend_from_slice(&self.received),
            Some(original) => match sent_at_ms() {
                Some(sent) => {
                    let skew_ms = sent.saturating_sub(original.timestamp_millis());
                    let corrected = self.arrival.received_at_ms.saturating_sub(skew_ms);
                    out.push(b'"');
                    write_timestamp(out, corrected);
                    out.push(b'"');
                }
                None => out.extend_from_slice(raw.as_bytes()),
            },
        }
        out.push(b',');
    }

    /// Writes `key` with the event's own object merged with the batch's: the batch's keys
    /// that the event's object lacks are added (the event wins on conflict); an own value
    /// that is missing or not an object is replaced by the batch's object.
    fn merged(
        &mut self,
        out: &mut Vec<u8>,
        key: &str,
        own: Option<&'b str>,
        batch: Option<&LevelObject>,
    ) {
        let Some(batch) = batch else {
            if let Some(own) = own {
                member_raw(out, key, own);
            }
            return;
        };
        let body = own.and_then(|raw| raw.strip_suffix('}'));
        let (Some(body), Some(_)) = (body, self.mark_present(own, batch)) else {
            member_raw(out, key, &batch.json);
            return;
        };
        out.extend_from_slice(key.as_bytes());
        out.push(b':');
        out.extend_from_slice(body.as_bytes());
        for ((_, member), present) in batch.members.iter().zip(&self.present) {
            if !present {
                out.push(b',');
                out.extend_from_slice(member.as_bytes());
            }
        }
        out.extend_from_slice(b"},");
    }
}

/// [`Field`]s by discriminant.
const FIELD_LIST: [Field; FIELDS] = [
    Field::Type,
    Field::MessageId,
    Field::UserId,
    Field::AnonymousId,
    Field::Event,
    Field::GroupId,
    Field::PreviousId,
    Field::Timestamp,
    Field::OriginalTimestamp,
    Field::SentAt,
    Field::ReceivedAt,
    Field::Context,
    Field::Integrations,
    Field::Traits,
    Field::WriteKey,
    Field::Properties,
    Field::Name,
];

/// Numeric ids become strings (some clients send numbers); empty strings and other
/// shapes are removed, so that "has an id" means "has a non-empty string".
fn coerce_id(raw: Option<&str>) -> Id<'_> {
    match raw {
        Some(raw) if scan::is_non_empty_string(raw) => Id::Raw(raw),
        // serde_json's own spelling of the number (`1E2` → `100.0`), as a `Value` gives.
        Some(raw) if scan::is_number(raw) => match serde_json::from_str::<Value>(raw) {
            Ok(Value::Number(number)) => Id::Coerced(number.to_string()),
            _ => Id::Absent,
        },
        _ => Id::Absent,
    }
}

/// `prefix` + `text` (cheaper than `format!`, which runs for every event).
/// Appends `key:value,` (both as JSON text).
fn member_raw(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(key.as_bytes());
    out.push(b':');
    out.extend_from_slice(value.as_bytes());
    out.push(b',');
}

/// Appends `text` as a JSON string.
fn write_json_string(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = text.as_bytes();
    out.push(b'"');
    let mut start = 0;
    for (i, &byte) in bytes.iter().enumerate() {
        if byte != b'"' && byte != b'\\' && byte >= 0x20 {
            continue;
        }
        out.extend_from_slice(bytes.get(start..i).unwrap_or_default());
        match byte {
            b'"' | b'\\' => out.extend_from_slice(&[b'\\', byte]),
            _ => out.extend_from_slice(&[
                b'\\',
                b'u',
                b'0',
                b'0',
                HEX[usize::from(byte >> 4)],
                HEX[usize::from(byte & 0xf)],
            ]),
        }
        start = i + 1;
    }
    out.extend_from_slice(bytes.get(start..).unwrap_or_default());
    out.push(b'"');
}

/// A `Value` as JSON text (cannot fail: string keys, no custom serializers).
fn value_json(value: &Value) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

fn bytes_to_string(bytes: Vec<u8>) -> String {
    String::from_utf8(bytes).unwrap_or_default()
}

/// `email` of a raw `traits` value: a non-blank string, trimmed.
fn email_in_raw<'b>(raw: &'b str, scratch: &mut Vec<Member<'b>>) -> Option<String> {
    if !scan::is_object(raw) || scan::object_members(raw, 2, scratch) != Shape::Object {
        return None;
    }
    let email = scratch.iter().rev().find(|m| m.key == "email")?;
    let email = scan::string_value(email.value)?;
    let email = email.trim();
    (!email.is_empty()).then(|| email.to_owned())
}

fn email_in_value(value: &Value) -> Option<String> {
    value
        .get("email")?
        .as_str()
        .map(str::trim)
        .filter(|email| !email.is_empty())
        .map(str::to_owned)
}

/// The identity the dispatcher orders a user's events by: `u:<userId>`, else
/// `e:<email>` (from `traits.email` of an identify, or `context.traits.email`), else
/// `a:<anonymousId>`. A group's `traits` describe the group, so its email does not count.
///
/// This is the rule on a normalized event as a `Value`; the parsers apply the same rule to
/// the raw event (see `Normalizer`).
pub fn user_key(event: &Map<String, Value>, kind: EventType) -> Option<UserKey> {
    if let Some(id) = event.get("userId").and_then(Value::as_str) {
        return Some(UserKey::user_id(id));
    }
    let own_traits = match kind {
        EventType::Identify => event.get("traits").and_then(email_in_value),
        _ => None,
    };
    let context_traits = event.get("context").and_then(|c| c.get("traits"));
    if let Some(email) = own_traits.or_else(|| context_traits.and_then(email_in_value)) {
        return Some(UserKey::email(&email));
    }
    event
        .get("anonymousId")
        .and_then(Value::as_str)
        .map(UserKey::anonymous)
}
