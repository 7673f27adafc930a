//! Segment event → Refiner call: the default mapping, and per-user coalescing of a batch.
//!
//! Pure: no IO, no clock, no panics on any input (property-tested). The input is a normalized
//! event payload as the `segment` module produces it (a JSON object with `type`, `userId`,
//! `anonymousId`, `traits`, `context`, `event`, `groupId`, ...); anything else is handled too,
//! by not forwarding it with a reason.
//!
//! Invariants of every [`Mapped::Call`] that [`map_event`] returns:
//! - the user is identified by a non-empty `userId` or a non-empty email (Refiner needs one
//!   of them); anonymous-only events are [`NotForwardedReason::Unidentifiable`];
//! - every string it sends is at most [`MappingOptions::max_string_len`] characters, except
//!   identities (`id`, `email`, the account's `id`), which are never cut because a cut
//!   identity would address a different contact or account. Each cut is counted in
//!   [`Notes::truncated`];
//! - trait values are only strings, numbers within ±[`MAX_NUMBER`] and booleans (Refiner's
//!   trait types); trait keys never collide with `id`, `email` or `account`.
//!
//! Failure semantics: nothing here fails. An event that cannot or must not be sent is
//! [`Mapped::NotForwarded`] with a [`NotForwardedReason`] whose [`as_str`] is the stable
//! label the dispatcher counts it under; the event is then done (acked), not retried.
//!
//! The user-facing reference of every rule below is `docs/mapping.md`.
//!
//! [`as_str`]: NotForwardedReason::as_str

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

use crate::segment::{EventType, UserKey};

mod coalesce;
mod engage;

pub use coalesce::coalesce;
pub use engage::{identify_membership, segment_name_matches, Membership};

/// Default longest string sent to Refiner, in characters: Refiner's limit for string traits.
pub const DEFAULT_MAX_STRING_LEN: usize = 255;

/// Largest magnitude a number trait is sent as a JSON number. Refiner stores integer traits
/// in −2,147,483,647…2,147,483,647; anything larger is sent as its decimal string so that
/// Refiner keeps it (as a string) instead of rejecting or overflowing it.
pub const MAX_NUMBER: i64 = 2_147_483_647;

/// Deepest nesting of trait objects that is flattened; values nested deeper are dropped.
/// Top-level traits are depth 1, so `a.b.c` is depth 3.
pub const MAX_TRAIT_DEPTH: usize = 16;

/// Separator between the scalar elements of an array trait, which is sent as one string.
pub const ARRAY_SEPARATOR: &str = ", ";

/// Segment's reserved traits written in camelCase, and the snake_case names Refiner gets.
/// Applied to keys at every nesting level (`address.postalCode` → `address_postal_code`).
const RENAMES: [(&str, &str); 4] = [
    ("createdAt", "created_at"),
    ("firstName", "first_name"),
    ("lastName", "last_name"),
    ("postalCode", "postal_code"),
];

/// Keys a contact's traits may not use: the body's own fields. `email` is read separately
/// as the user's email; `id` must not override the user id; `account` is the group object.
const CONTACT_RESERVED: [&str; 3] = ["id", "email", "account"];

/// Keys an account's traits may not use: `id` is the `groupId`.
const ACCOUNT_RESERVED: [&str; 1] = ["id"];

/// What to do with `page` and `screen` calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PageMode {
    /// A *ping*: an identify-user call without traits, which refreshes the contact's
    /// "last seen" (what Segment's Refiner destination does). The dispatcher throttles pings
    /// per user.
    #[default]
    Ping,
    /// A track-event named `Viewed {name} Page` / `Viewed {name} Screen` (`Viewed Page` /
    /// `Viewed Screen` when the call has no name).
    TrackEvent,
    /// Not forwarded; counted as [`NotForwardedReason::PageOff`].
    Off,
}

impl PageMode {
    /// The configuration name (`ping`, `track_event`, `off`).
    pub fn as_str(self) -> &'static str {
        match self {
            PageMode::Ping => "ping",
            PageMode::TrackEvent => "track_event",
            PageMode::Off => "off",
        }
    }
}

/// The mapping's settings. The defaults are the documented default mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MappingOptions {
    /// What `page` and `screen` calls become. Default: [`PageMode::Ping`].
    pub page_mode: PageMode,
    /// Longest string value sent, in characters (Unicode scalar values, not bytes).
    /// Default: [`DEFAULT_MAX_STRING_LEN`].
    pub max_string_len: usize,
}

impl Default for MappingOptions {
    fn default() -> Self {
        MappingOptions {
            page_mode: PageMode::default(),
            max_string_len: DEFAULT_MAX_STRING_LEN,
        }
    }
}

/// Who a call is about. Refiner addresses a contact by its user id, or else by email.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UserRef {
    /// Known by Segment's `userId`; `email` is the user's email when the event carried one.
    Id { id: String, email: Option<String> },
    /// Known only by email (`traits.email` of an identify, or `context.traits.email`).
    Email(String),
}

impl UserRef {
    /// A user known by id, without an email.
    pub fn id(id: impl Into<String>) -> UserRef {
        UserRef::Id {
            id: id.into(),
            email: None,
        }
    }

    /// The identity calls are ordered and coalesced by: the spool's user key
    /// (`segment::user_key`) of the same user.
    pub fn key(&self) -> UserKey {
        match self {
            UserRef::Id { id, .. } => UserKey::user_id(id),
            UserRef::Email(email) => UserKey::email(email),
        }
    }

    /// The user's email, when known.
    pub fn email(&self) -> Option<&str> {
        match self {
            UserRef::Id { email, .. } => email.as_deref(),
            UserRef::Email(email) => Some(email),
        }
    }

    /// The identity fields of a body: `{"id": ..}` or `{"email": ..}`, plus `email` beside
    /// the id when `with_email` is set and the email is known.
    fn identity(&self, with_email: bool) -> Map<String, Value> {
        let mut body = Map::new();
        match self {
            UserRef::Id { id, email } => {
                body.insert("id".into(), Value::String(id.clone()));
                if let (true, Some(email)) = (with_email, email) {
                    body.insert("email".into(), Value::String(email.clone()));
                }
            }
            UserRef::Email(email) => {
                body.insert("email".into(), Value::String(email.clone()));
            }
        }
        body
    }
}

/// One call to Refiner's REST API.
#[derive(Debug, Clone, PartialEq)]
pub enum RefinerCall {
    /// `POST /identify-user`: creates or updates the contact. `traits` are contact traits
    /// (never `id`, `email` or `account`); `account`, when set, holds the account's `id`
    /// (the Segment `groupId`) and its traits.
    IdentifyUser {
        user: UserRef,
        traits: Map<String, Value>,
        account: Option<Map<String, Value>>,
    },
    /// `POST /track-event`: one occurrence of a named event.
    TrackEvent { user: UserRef, event: String },
    /// `DELETE /contact`: deletes the contact (and its survey responses).
    DeleteContact { user: UserRef },
    /// `POST /sync-segment` (`member`) or `DELETE /sync-segment`: adds the contact to, or
    /// removes it from, the manual segment of an Engage audience. `segment` is the segment's
    /// uuid once known (from configuration, or looked up by name by the dispatcher, which
    /// resolves it before sending); the mapping never produces this call by itself.
    SyncSegment {
        user: UserRef,
        audience: String,
        member: bool,
        segment: Option<String>,
    },
}

impl RefinerCall {
    /// A ping: an identify-user call without traits, which refreshes the contact's "last
    /// seen".
    pub fn ping(user: UserRef) -> RefinerCall {
        RefinerCall::IdentifyUser {
            user,
            traits: Map::new(),
            account: None,
        }
    }

    /// The user the call is about.
    pub fn user(&self) -> &UserRef {
        match self {
            RefinerCall::IdentifyUser { user, .. }
            | RefinerCall::TrackEvent { user, .. }
            | RefinerCall::DeleteContact { user }
            | RefinerCall::SyncSegment { user, .. } => user,
        }
    }

    /// A stable label for metrics and logs: `identify_user`, `track_event`, `delete_contact`,
    /// `sync_segment`.
    pub fn name(&self) -> &'static str {
        match self {
            RefinerCall::IdentifyUser { .. } => "identify_user",
            RefinerCall::TrackEvent { .. } => "track_event",
            RefinerCall::DeleteContact { .. } => "delete_contact",
            RefinerCall::SyncSegment { .. } => "sync_segment",
        }
    }

    /// The HTTP request Refiner expects for this call. Bodies:
    /// - identify-user: `{"id", "email"?, ...traits, "account"?: {"id", ...account traits}}`;
    /// - track-event: `{"id", "event"}`;
    /// - delete contact: `{"id"}`;
    /// - sync-segment: `{"id", "segment_uuid"}` (`POST` to add, `DELETE` to remove; without a
    ///   resolved segment, `segment_uuid` is absent and Refiner refuses the call).
    ///
    /// A user known only by email is sent as `{"email": ..}` in place of `id`. The email
    /// beside an id is sent with identify-user only. The identity fields are written last,
    /// so a trait named `id`, `email` or `account` in a hand-built call cannot override them.
    pub fn to_request(&self) -> RefinerRequest {
        match self {
            RefinerCall::IdentifyUser {
                user,
                traits,
                account,
            } => {
                let mut body = traits.clone();
                for key in CONTACT_RESERVED {
                    body.remove(key);
                }
                body.extend(user.identity(true));
                if let Some(account) = account {
                    body.insert("account".into(), Value::Object(account.clone()));
                }
                RefinerRequest {
                    method: HttpMethod::Post,
                    path: "/identify-user",
                    body: Value::Object(body),
                }
            }
            RefinerCall::TrackEvent { user, event } => {
                let mut body = user.identity(false);
                body.insert("event".into(), Value::String(event.clone()));
                RefinerRequest {
                    method: HttpMethod::Post,
                    path: "/track-event",
                    body: Value::Object(body),
                }
            }
            RefinerCall::DeleteContact { user } => RefinerRequest {
                method: HttpMethod::Delete,
                path: "/contact",
                body: Value::Object(user.identity(false)),
            },
            RefinerCall::SyncSegment {
                user,
                member,
                segment,
                ..
            } => {
                let mut body = user.identity(false);
                if let Some(uuid) = segment {
                    body.insert("segment_uuid".into(), Value::String(uuid.clone()));
                }
                RefinerRequest {
                    method: if *member {
                        HttpMethod::Post
                    } else {
                        HttpMethod::Delete
                    },
                    path: "/sync-segment",
                    body: Value::Object(body),
                }
            }
        }
    }
}

/// The HTTP methods the gateway uses with Refiner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpMethod {
    Post,
    Delete,
}

impl HttpMethod {
    /// The method's name (`POST`, `DELETE`).
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Post => "POST",
            HttpMethod::Delete => "DELETE",
        }
    }
}

/// A rendered call: what goes on the wire, minus base URL and authentication.
#[derive(Debug, Clone, PartialEq)]
pub struct RefinerRequest {
    pub method: HttpMethod,
    /// Relative to the configured base URL (`https://api.refiner.io/v1`), e.g.
    /// `/identify-user`.
    pub path: &'static str,
    /// The JSON body.
    pub body: Value,
}

/// What the mapping changed or found on the way, for the dispatcher.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Notes {
    /// How many string values were cut to [`MappingOptions::max_string_len`] characters.
    pub truncated: usize,
    /// The Engage audience (or journey step) membership the event states, if any: the
    /// call already sets the attribute; the dispatcher may also sync a manual segment.
    pub membership: Option<Membership>,
}

/// The outcome of mapping one event.
#[derive(Debug, Clone, PartialEq)]
pub enum Mapped {
    /// Send this call.
    Call(RefinerCall, Notes),
    /// A `page`/`screen` in [`PageMode::Ping`]: send [`RefinerCall::ping`] for this user
    /// unless the user was pinged within the ping interval (the dispatcher decides).
    Ping(UserRef),
    /// Do not send anything; count the event under the reason.
    NotForwarded(NotForwardedReason),
}

/// Why an event is not sent to Refiner. Such an event is done: it is acked and counted,
/// never retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotForwardedReason {
    /// `alias`: Refiner has no alias.
    Alias,
    /// No `userId` and no email (anonymous-only): Refiner needs one of them. For `delete`,
    /// no `userId`.
    Unidentifiable,
    /// A `page` or `screen` while [`PageMode::Off`].
    PageOff,
    /// A `track` without a non-empty `event` name.
    MissingEvent,
    /// A `group` without a non-empty `groupId`.
    MissingGroupId,
    /// A `type` the mapping does not know ([`map_named_event`] only).
    UnknownType,
    /// The payload is not a JSON object.
    InvalidPayload,
}

impl NotForwardedReason {
    /// Every reason, in a fixed order (for metrics and docs).
    pub const ALL: [NotForwardedReason; 7] = [
        NotForwardedReason::Alias,
        NotForwardedReason::Unidentifiable,
        NotForwardedReason::PageOff,
        NotForwardedReason::MissingEvent,
        NotForwardedReason::MissingGroupId,
        NotForwardedReason::UnknownType,
        NotForwardedReason::InvalidPayload,
    ];

    /// The stable label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            NotForwardedReason::Alias => "alias",
            NotForwardedReason::Unidentifiable => "unidentifiable",
            NotForwardedReason::PageOff => "page_off",
            NotForwardedReason::MissingEvent => "missing_event",
            NotForwardedReason::MissingGroupId => "missing_group_id",
            NotForwardedReason::UnknownType => "unknown_type",
            NotForwardedReason::InvalidPayload => "invalid_payload",
        }
    }
}

/// Maps an event whose type is given by name (as the spool stores it). `delete` is
/// accepted; an unknown name is [`NotForwardedReason::UnknownType`].
pub fn map_named_event(kind: &str, payload: &Value, options: &MappingOptions) -> Mapped {
    match EventType::parse(kind, true) {
        Some(kind) => map_event(kind, payload, options),
        None => Mapped::NotForwarded(NotForwardedReason::UnknownType),
    }
}

/// Maps one normalized event to what the gateway sends to Refiner.
///
/// `kind` decides the mapping; the payload's own `type` is not read. The user is `userId`
/// (a non-empty string, or a number sent as its decimal string), with the email beside it
/// when known; else the email alone. The email is `traits.email` of an identify, else
/// `context.traits.email` (trimmed, non-empty strings only; a group's `traits.email`
/// describes the group and is never the user's).
///
/// | kind | result |
/// | --- | --- |
/// | identify | identify-user with the converted `traits` over `context.traits` ([`identify_traits`]) |
/// | group | identify-user with `account: {id: groupId, ...converted traits}`, no contact traits |
/// | track | track-event `{id, event}`; properties dropped |
/// | page, screen | per [`MappingOptions::page_mode`] |
/// | delete | delete contact `{id}`; needs a `userId` |
/// | alias | not forwarded |
///
/// Traits are converted as `docs/mapping.md` describes: nulls dropped; strings cut to
/// `max_string_len` characters; booleans kept; numbers kept within ±[`MAX_NUMBER`], else
/// sent as strings; Segment's camelCase reserved traits renamed to snake_case; nested
/// objects flattened with `_`; arrays joined into one string.
pub fn map_event(kind: EventType, payload: &Value, options: &MappingOptions) -> Mapped {
    let Some(event) = payload.as_object() else {
        return Mapped::NotForwarded(NotForwardedReason::InvalidPayload);
    };
    let mut notes = Notes::default();
    let max = options.max_string_len;
    let call = match kind {
        EventType::Alias => return Mapped::NotForwarded(NotForwardedReason::Alias),
        EventType::Identify => {
            let Some(user) = user_ref(event, true) else {
                return Mapped::NotForwarded(NotForwardedReason::Unidentifiable);
            };
            let traits = identify_traits(event);
            notes.membership = identify_membership(event, &traits);
            let traits = convert_traits(&traits, &CONTACT_RESERVED, max, &mut notes.truncated);
            RefinerCall::IdentifyUser {
                user,
                traits,
                account: None,
            }
        }
        EventType::Group => {
            let Some(group_id) = id_field(event, "groupId") else {
                return Mapped::NotForwarded(NotForwardedReason::MissingGroupId);
            };
            let Some(user) = user_ref(event, false) else {
                return Mapped::NotForwarded(NotForwardedReason::Unidentifiable);
            };
            let mut account = match event.get("traits") {
                Some(Value::Object(traits)) => {
                    convert_traits(traits, &ACCOUNT_RESERVED, max, &mut notes.truncated)
                }
                _ => Map::new(),
            };
            account.insert("id".into(), Value::String(group_id));
            RefinerCall::IdentifyUser {
                user,
                traits: Map::new(),
                account: Some(account),
            }
        }
        EventType::Track => {
            let event_name = match event.get("event") {
                Some(Value::String(name)) if !name.is_empty() => name,
                _ => return Mapped::NotForwarded(NotForwardedReason::MissingEvent),
            };
            let Some(user) = user_ref(event, false) else {
                return Mapped::NotForwarded(NotForwardedReason::Unidentifiable);
            };
            if let Some(engage) = engage::track(event, event_name) {
                return engage_track(user, engage, max);
            }
            RefinerCall::TrackEvent {
                user,
                event: cut(event_name.clone(), max, &mut notes.truncated),
            }
        }
        EventType::Page | EventType::Screen => {
            if options.page_mode == PageMode::Off {
                return Mapped::NotForwarded(NotForwardedReason::PageOff);
            }
            let Some(user) = user_ref(event, false) else {
                return Mapped::NotForwarded(NotForwardedReason::Unidentifiable);
            };
            if options.page_mode == PageMode::Ping {
                return Mapped::Ping(user);
            }
            let noun = if kind == EventType::Screen {
                "Screen"
            } else {
                "Page"
            };
            let name = match page_name(event) {
                Some(name) => format!("Viewed {name} {noun}"),
                None => format!("Viewed {noun}"),
            };
            RefinerCall::TrackEvent {
                user,
                event: cut(name, max, &mut notes.truncated),
            }
        }
        EventType::Delete => match id_field(event, "userId") {
            Some(id) => RefinerCall::DeleteContact {
                user: UserRef::id(id),
            },
            None => return Mapped::NotForwarded(NotForwardedReason::Unidentifiable),
        },
    };
    Mapped::Call(call, notes)
}

/// A track-shaped Engage event as the identify-user call that sets its attribute (Refiner
/// would drop the track's properties, and with them which audience or trait it was about).
/// The attribute is converted like any trait (a key named `id`, `email` or `account` is
/// dropped, leaving a ping).
fn engage_track(user: UserRef, engage: engage::EngageTrack, max: usize) -> Mapped {
    let mut notes = Notes::default();
    let (key, value) = match engage {
        engage::EngageTrack::Membership(membership) => {
            let pair = (membership.audience.clone(), Value::Bool(membership.member));
            notes.membership = Some(membership);
            pair
        }
        engage::EngageTrack::Computed { key, value } => (key, value),
    };
    let attribute = Map::from_iter([(key, value)]);
    let traits = convert_traits(&attribute, &CONTACT_RESERVED, max, &mut notes.truncated);
    let call = RefinerCall::IdentifyUser {
        user,
        traits,
        account: None,
    };
    Mapped::Call(call, notes)
}

/// The contact traits of an identify: the members of `traits`, and the members of
/// `context.traits` that `traits` lacks (a key present in `traits` wins, even with `null`).
/// RudderStack's SDKs send identify traits only in `context.traits`, Segment's mobile
/// libraries repeat the user's known traits there, and Segment's spec puts them in `traits`:
/// the call's own traits are the newest word, the context fills in what they leave out.
/// Either value is ignored unless it is an object.
pub fn identify_traits(event: &Map<String, Value>) -> std::borrow::Cow<'_, Map<String, Value>> {
    use std::borrow::Cow;
    fn object(value: Option<&Value>) -> Option<&Map<String, Value>> {
        match value {
            Some(Value::Object(map)) if !map.is_empty() => Some(map),
            _ => None,
        }
    }
    let own = object(event.get("traits"));
    let context = object(event.get("context").and_then(|c| c.get("traits")));
    match (own, context) {
        (Some(own), None) => Cow::Borrowed(own),
        (None, Some(context)) => Cow::Borrowed(context),
        (None, None) => Cow::Owned(Map::new()),
        (Some(own), Some(context)) => {
            let mut merged = context.clone();
            for (key, value) in own {
                merged.insert(key.clone(), value.clone());
            }
            Cow::Owned(merged)
        }
    }
}

/// A non-empty string field, or a number as its decimal string (clients send numeric ids).
fn id_field(event: &Map<String, Value>, field: &str) -> Option<String> {
    match event.get(field)? {
        Value::String(id) if !id.is_empty() => Some(id.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The trimmed, non-empty `email` string of a traits object.
fn email_in(traits: Option<&Value>) -> Option<String> {
    let email = traits?.get("email")?.as_str()?.trim();
    (!email.is_empty()).then(|| email.to_string())
}

/// Who the event is about: `userId` (with the email when known), else the email alone.
/// `own_traits` says whether the event's `traits` describe the user (identify) and so may
/// hold the email.
fn user_ref(event: &Map<String, Value>, own_traits: bool) -> Option<UserRef> {
    let own = own_traits.then(|| email_in(event.get("traits"))).flatten();
    let email = own.or_else(|| email_in(event.get("context").and_then(|c| c.get("traits"))));
    match (id_field(event, "userId"), email) {
        (Some(id), email) => Some(UserRef::Id { id, email }),
        (None, Some(email)) => Some(UserRef::Email(email)),
        (None, None) => None,
    }
}

/// A page's or screen's name: the trimmed, non-empty `name`, else `properties.name`.
fn page_name(event: &Map<String, Value>) -> Option<&str> {
    non_empty_str(event.get("name"))
        .or_else(|| non_empty_str(event.get("properties").and_then(|p| p.get("name"))))
}

/// A string value, trimmed, when non-empty.
fn non_empty_str(value: Option<&Value>) -> Option<&str> {
    value
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Cuts a string to `max` characters, counting the cut.
fn cut(mut s: String, max: usize, truncated: &mut usize) -> String {
    if let Some((index, _)) = s.char_indices().nth(max) {
        s.truncate(index);
        *truncated += 1;
    }
    s
}

/// The Refiner name of a trait key: Segment's camelCase reserved traits in snake_case.
fn rename(key: &str) -> &str {
    RENAMES
        .iter()
        .find(|(from, _)| *from == key)
        .map_or(key, |(_, to)| to)
}

/// One flattened trait before collisions are resolved.
struct Candidate {
    key: String,
    value: Value,
    /// The key is exactly a top-level key of the source (not renamed, not flattened).
    literal: bool,
}

/// Converts Segment traits to Refiner traits (see [`map_event`] and `docs/mapping.md`).
///
/// When two source keys produce the same Refiner key (`created_at` and `createdAt`, or
/// `address_city` and `address.city`), the literal top-level key wins; between derived keys,
/// the first in the source's key order wins. Cuts are counted for the values actually sent.
fn convert_traits(
    source: &Map<String, Value>,
    reserved: &[&str],
    max: usize,
    truncated: &mut usize,
) -> Map<String, Value> {
    let mut candidates = Vec::new();
    for (key, value) in source {
        if key.is_empty() {
            continue;
        }
        let name = rename(key);
        let literal = name == key;
        flatten(name.to_string(), value, 1, literal, &mut candidates);
    }
    let mut out = Map::new();
    for Candidate {
        key,
        value,
        literal,
    } in candidates
    {
        if reserved.contains(&key.as_str()) {
            continue;
        }
        if literal || !out.contains_key(&key) {
            out.insert(key, value);
        }
    }
    for value in out.values_mut() {
        if let Value::String(s) = value {
            *s = cut(std::mem::take(s), max, truncated);
        }
    }
    out
}

fn flatten(key: String, value: &Value, depth: usize, literal: bool, out: &mut Vec<Candidate>) {
    let value = match value {
        Value::Null => return,
        Value::Bool(b) => Value::Bool(*b),
        Value::Number(n) => number(n),
        Value::String(s) => Value::String(s.clone()),
        Value::Array(items) => match join(items) {
            Some(joined) => Value::String(joined),
            None => return,
        },
        Value::Object(fields) => {
            if depth >= MAX_TRAIT_DEPTH {
                return;
            }
            for (child, value) in fields {
                if child.is_empty() {
                    continue;
                }
                let child_key = format!("{key}_{}", rename(child));
                flatten(child_key, value, depth + 1, false, out);
            }
            return;
        }
    };
    out.push(Candidate {
        key,
        value,
        literal,
    });
}

/// A number within ±[`MAX_NUMBER`] as is, a larger one as its decimal string.
fn number(n: &Number) -> Value {
    let fits = if let Some(i) = n.as_i64() {
        (-MAX_NUMBER..=MAX_NUMBER).contains(&i)
    } else if n.is_u64() {
        false
    } else {
        n.as_f64().is_some_and(|f| f.abs() <= MAX_NUMBER as f64)
    };
    if fits {
        Value::Number(n.clone())
    } else {
        Value::String(n.to_string())
    }
}

/// An array's scalar elements joined with [`ARRAY_SEPARATOR`]; nulls, objects and arrays
/// inside are skipped. `None` when nothing is left.
fn join(items: &[Value]) -> Option<String> {
    let parts: Vec<String> = items
        .iter()
        .filter_map(|item| match item {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        })
        .collect();
    (!parts.is_empty()).then(|| parts.join(ARRAY_SEPARATOR))
}

#[cfg(test)]
mod tests;
