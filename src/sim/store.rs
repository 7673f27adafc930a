//! What the simulated Refiner project holds: contacts, accounts and tracked events.
//!
//! Identity rules (Refiner's, as far as its documentation states them; the rest is chosen
//! here and written down in `docs/refiner-sim.md`):
//! - A contact is found by `id` (Refiner's `remote_id`), else by `email`. With an `id` that no
//!   contact has yet, a contact that has the given `email` but no `id` is adopted (it gets the
//!   `id`); otherwise a new contact is created. Emails are compared exactly.
//! - Several contacts may share an email; a lookup by email finds the earliest created.
//! - A nested `account` object needs an `id`; it creates or updates that account and links
//!   the contact to it (re-linking moves the contact). Contacts without one have no account.
//! - Traits keep Refiner's types: strings (at most [`MAX_STRING_CHARS`] characters), numbers,
//!   booleans, and dates for keys ending `_at` whose string parses as a date (else they stay
//!   strings). `null` removes a trait; objects and arrays are refused. Last write wins,
//!   type included.
//!
//! Every hot-path operation (identify, track) is a few hash-map lookups: no scan over
//! contacts. Only listing and the rare email-sharing cases walk more than one entry.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use chrono::{DateTime, NaiveDate, NaiveDateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Number, Value};

use super::error::SimError;
use super::segments::{SegmentBook, SegmentSpec, SegmentView};

/// Refiner's documented limit for string traits.
pub const MAX_STRING_CHARS: usize = 255;
/// Default and largest `page_length` of `GET /contacts`.
pub const DEFAULT_PAGE_LENGTH: u64 = 50;
pub const MAX_PAGE_LENGTH: u64 = 1000;

/// What to do with a string trait longer than [`MAX_STRING_CHARS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LongStrings {
    /// Refuse the call with 400, so a client that sends them is caught.
    #[default]
    Reject,
    /// Keep the first 255 characters.
    Truncate,
}

/// A trait's type in Refiner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TraitType {
    String,
    Number,
    Boolean,
    Date,
}

#[derive(Debug, Clone, PartialEq)]
enum TraitValue {
    String(String),
    Number(Number),
    Boolean(bool),
    Date(DateTime<Utc>),
}

impl TraitValue {
    fn kind(&self) -> TraitType {
        match self {
            TraitValue::String(_) => TraitType::String,
            TraitValue::Number(_) => TraitType::Number,
            TraitValue::Boolean(_) => TraitType::Boolean,
            TraitValue::Date(_) => TraitType::Date,
        }
    }

    fn to_json(&self) -> Value {
        match self {
            TraitValue::String(s) => Value::String(s.clone()),
            TraitValue::Number(n) => Value::Number(n.clone()),
            TraitValue::Boolean(b) => Value::Bool(*b),
            TraitValue::Date(d) => Value::String(iso(d)),
        }
    }
}

/// Refiner's timestamp format: `2020-09-02T20:44:24.000000Z`.
pub fn iso(time: &DateTime<Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// Parses the common date notations ("all standardized date strings ... should work").
fn parse_date(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Some(time.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f%:z", "%Y-%m-%d %H:%M:%S%.f%z"] {
        if let Ok(time) = DateTime::parse_from_str(text, format) {
            return Some(time.with_timezone(&Utc));
        }
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(time) = NaiveDateTime::parse_from_str(text, format) {
            return Some(time.and_utc());
        }
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return date.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
    }
    DateTime::parse_from_rfc2822(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Traits to set and traits to clear (sent as `null`).
#[derive(Debug, Clone, Default, PartialEq)]
struct Traits {
    set: Vec<(String, TraitValue)>,
    clear: Vec<String>,
}

impl Traits {
    fn from_map(
        map: &Map<String, Value>,
        reserved: &[&str],
        scope: &str,
        long: LongStrings,
    ) -> Result<Traits, SimError> {
        let mut traits = Traits::default();
        for (key, value) in map {
            if reserved.contains(&key.as_str()) {
                continue;
            }
            let typed = match value {
                Value::Null => {
                    traits.clear.push(key.clone());
                    continue;
                }
                Value::Bool(b) => TraitValue::Boolean(*b),
                Value::Number(n) => TraitValue::Number(n.clone()),
                Value::String(s) => match key.ends_with("_at").then(|| parse_date(s)).flatten() {
                    Some(date) => TraitValue::Date(date),
                    None if s.chars().count() > MAX_STRING_CHARS => match long {
                        LongStrings::Reject => {
                            return Err(SimError::bad_request(format!(
                                "the {scope}attribute `{key}` is longer than {MAX_STRING_CHARS} characters"
                            )))
                        }
                        LongStrings::Truncate => {
                            TraitValue::String(s.chars().take(MAX_STRING_CHARS).collect())
                        }
                    },
                    None => TraitValue::String(s.clone()),
                },
                Value::Array(_) | Value::Object(_) => {
                    return Err(SimError::bad_request(format!(
                        "the {scope}attribute `{key}` is an {}; attributes are strings, numbers, booleans or dates",
                        if value.is_array() { "array" } else { "object" }
                    )))
                }
            };
            traits.set.push((key.clone(), typed));
        }
        Ok(traits)
    }
}

mod input;

use input::{encode_cursor, AccountInput, Order};
pub use input::{IdentifyInput, ListQuery, Lookup, TrackInput};

#[derive(Debug, Clone)]
struct Contact {
    uuid: String,
    remote_id: Option<String>,
    email: Option<String>,
    first_seen: DateTime<Utc>,
    last_seen: DateTime<Utc>,
    attributes: BTreeMap<String, TraitValue>,
    account: Option<u64>,
    identify_count: u64,
    event_count: u64,
}

#[derive(Debug, Clone)]
struct Account {
    uuid: String,
    remote_id: String,
    first_seen: DateTime<Utc>,
    last_seen: DateTime<Utc>,
    attributes: BTreeMap<String, TraitValue>,
    contact_count: u64,
}

fn attributes_json(attributes: &BTreeMap<String, TraitValue>) -> Map<String, Value> {
    attributes
        .iter()
        .map(|(k, v)| (k.clone(), v.to_json()))
        .collect()
}

fn attribute_types(attributes: &BTreeMap<String, TraitValue>) -> BTreeMap<String, TraitType> {
    attributes
        .iter()
        .map(|(k, v)| (k.clone(), v.kind()))
        .collect()
}

fn string_attribute(attributes: &BTreeMap<String, TraitValue>, key: &str) -> Option<String> {
    match attributes.get(key) {
        Some(TraitValue::String(s)) => Some(s.clone()),
        _ => None,
    }
}

fn apply(attributes: &mut BTreeMap<String, TraitValue>, traits: Traits) {
    for key in traits.clear {
        attributes.remove(&key);
    }
    for (key, value) in traits.set {
        attributes.insert(key, value);
    }
}

/// A contact as tests inspect it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContactView {
    pub uuid: String,
    /// The `id` it was identified with.
    pub remote_id: Option<String>,
    pub email: Option<String>,
    /// The `name` trait, if it is a string.
    pub display_name: Option<String>,
    pub first_seen_at: String,
    pub last_seen_at: String,
    /// Trait values as Refiner returns them (dates as ISO 8601 strings).
    pub attributes: Map<String, Value>,
    /// The type each trait was stored with.
    pub attribute_types: BTreeMap<String, TraitType>,
    /// The linked account's `id`.
    pub account_id: Option<String>,
    /// `identify-user` calls that reached this contact.
    pub identify_count: u64,
    /// `track-event` calls that reached this contact.
    pub event_count: u64,
}

/// An account as tests inspect it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountView {
    pub uuid: String,
    pub remote_id: String,
    /// The `name` trait, if it is a string.
    pub display_name: Option<String>,
    /// The `domain` trait, if it is a string.
    pub domain: Option<String>,
    pub first_seen_at: String,
    pub last_seen_at: String,
    pub attributes: Map<String, Value>,
    pub attribute_types: BTreeMap<String, TraitType>,
    /// Contacts linked to it now.
    pub contact_count: u64,
}

/// One tracked event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Position among events since start or reset.
    pub seq: u64,
    /// The call (see the call log) that tracked it.
    pub call_seq: u64,
    /// When that call was received, ms since start or reset.
    pub at_ms: u64,
    /// Wall-clock time of receipt, ISO 8601.
    pub time: String,
    pub contact_uuid: String,
    /// The `id` and `email` the call named.
    pub user_id: Option<String>,
    pub email: Option<String>,
    pub event: String,
}

/// Everything the simulated project holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateSnapshot {
    /// In order of creation.
    pub contacts: Vec<ContactView>,
    /// In order of creation.
    pub accounts: Vec<AccountView>,
    /// The retained events, oldest first.
    pub events: Vec<EventRecord>,
    /// Events tracked since start or reset (exact, including evicted ones).
    pub events_total: u64,
    /// Contacts created since start or reset (including deleted ones).
    pub contacts_created: u64,
    /// Every segment, with the members of manual ones.
    #[serde(default)]
    pub segments: Vec<SegmentView>,
}

/// The simulated project's data.
#[derive(Debug)]
pub struct Store {
    event_capacity: usize,
    next_contact: u64,
    contacts: BTreeMap<u64, Contact>,
    by_remote_id: HashMap<String, u64>,
    by_email: HashMap<String, BTreeSet<u64>>,
    by_uuid: HashMap<String, u64>,
    next_account: u64,
    accounts: BTreeMap<u64, Account>,
    accounts_by_remote_id: HashMap<String, u64>,
    events: VecDeque<EventRecord>,
    events_total: u64,
    segments: SegmentBook,
}

impl Store {
    /// An empty project keeping at most `event_capacity` events (older ones are evicted).
    pub fn new(event_capacity: usize) -> Store {
        Store {
            event_capacity: event_capacity.max(1),
            next_contact: 0,
            contacts: BTreeMap::new(),
            by_remote_id: HashMap::new(),
            by_email: HashMap::new(),
            by_uuid: HashMap::new(),
            next_account: 0,
            accounts: BTreeMap::new(),
            accounts_by_remote_id: HashMap::new(),
            events: VecDeque::new(),
            events_total: 0,
            segments: SegmentBook::default(),
        }
    }

    /// Defines a segment (see `segments.rs`); returns its uuid.
    pub fn define_segment(&mut self, spec: SegmentSpec) -> String {
        self.segments.define(spec)
    }

    /// `POST` (`member`) or `DELETE /sync-segment`: the contact the lookup names (created
    /// when none matches, as Refiner does) joins or leaves the manual segment `uuid`.
    /// Returns the contact's uuid.
    pub fn sync_segment(
        &mut self,
        lookup: &Lookup,
        uuid: &str,
        member: bool,
        now: DateTime<Utc>,
    ) -> Result<String, SimError> {
        self.segments.check_manual(uuid)?;
        let seq = match self.find(lookup) {
            Some(seq) => seq,
            None if lookup.id.is_some() || lookup.email.is_some() => {
                self.upsert_contact(lookup.id.as_deref(), lookup.email.as_deref(), now)
            }
            None => return Err(SimError::NotFound("contact not found")),
        };
        self.segments.set_member(uuid, seq, member);
        Ok(self
            .contacts
            .get(&seq)
            .map(|c| c.uuid.clone())
            .unwrap_or_default())
    }

    /// One page of `GET /segments`.
    pub fn segments_page(&self, page: u64, page_length: u64) -> Value {
        self.segments.page(page, page_length)
    }

    /// Every segment with its members (their `id`, else their email, else their uuid).
    pub fn segment_views(&self) -> Vec<SegmentView> {
        self.segments.views(|seq| {
            let contact = self.contacts.get(&seq)?;
            Some(
                contact
                    .remote_id
                    .clone()
                    .or_else(|| contact.email.clone())
                    .unwrap_or_else(|| contact.uuid.clone()),
            )
        })
    }

    /// Forgets everything.
    pub fn reset(&mut self) {
        *self = Store::new(self.event_capacity);
    }

    /// Creates or merges a contact (and account); returns the contact's uuid.
    pub fn identify(&mut self, input: IdentifyInput, now: DateTime<Utc>) -> String {
        let seq = self.upsert_contact(input.id.as_deref(), input.email.as_deref(), now);
        let account = input.account.map(|a| self.upsert_account(a, now));
        if let Some(account) = account {
            self.link(seq, account);
        }
        match self.contacts.get_mut(&seq) {
            Some(contact) => {
                apply(&mut contact.attributes, input.traits);
                contact.identify_count += 1;
                contact.uuid.clone()
            }
            None => String::new(),
        }
    }

    /// Records an event, creating the contact if needed; returns the contact's uuid.
    pub fn track(
        &mut self,
        input: TrackInput,
        now: DateTime<Utc>,
        at_ms: u64,
        call_seq: u64,
    ) -> String {
        let seq = self.upsert_contact(input.id.as_deref(), input.email.as_deref(), now);
        let Some(contact) = self.contacts.get_mut(&seq) else {
            return String::new();
        };
        contact.event_count += 1;
        let uuid = contact.uuid.clone();
        if self.events.len() == self.event_capacity {
            self.events.pop_front();
        }
        self.events.push_back(EventRecord {
            seq: self.events_total,
            call_seq,
            at_ms,
            time: iso(&now),
            contact_uuid: uuid.clone(),
            user_id: input.id,
            email: input.email,
            event: input.event,
        });
        self.events_total += 1;
        uuid
    }

    /// The contact a lookup names: by uuid, else `id` (falling back to reading the `id`
    /// value as an email, as Refiner's own example does), else `email`.
    pub fn find(&self, lookup: &Lookup) -> Option<u64> {
        if let Some(uuid) = &lookup.uuid {
            if let Some(&seq) = self.by_uuid.get(uuid) {
                return Some(seq);
            }
        }
        if let Some(id) = &lookup.id {
            if let Some(&seq) = self.by_remote_id.get(id) {
                return Some(seq);
            }
            if let Some(seq) = self.first_with_email(id) {
                return Some(seq);
            }
        }
        lookup
            .email
            .as_deref()
            .and_then(|e| self.first_with_email(e))
    }

    /// A contact by `id`, else by email: for in-process inspection.
    pub fn find_user(&self, id_or_email: &str) -> Option<u64> {
        self.by_remote_id
            .get(id_or_email)
            .copied()
            .or_else(|| self.first_with_email(id_or_email))
    }

    fn first_with_email(&self, email: &str) -> Option<u64> {
        self.by_email
            .get(email)
            .and_then(|set| set.first().copied())
    }

    /// Deletes a contact (its events stay in the event log).
    pub fn delete(&mut self, seq: u64) -> bool {
        let Some(contact) = self.contacts.remove(&seq) else {
            return false;
        };
        if let Some(id) = &contact.remote_id {
            self.by_remote_id.remove(id);
        }
        if let Some(email) = &contact.email {
            self.unindex_email(email, seq);
        }
        self.by_uuid.remove(&contact.uuid);
        self.segments.forget(seq);
        if let Some(account) = contact.account.and_then(|a| self.accounts.get_mut(&a)) {
            account.contact_count = account.contact_count.saturating_sub(1);
        }
        true
    }

    fn upsert_contact(&mut self, id: Option<&str>, email: Option<&str>, now: DateTime<Utc>) -> u64 {
        let found = match (id, email) {
            (Some(id), email) => self.by_remote_id.get(id).copied().or_else(|| {
                let adopted = email.and_then(|e| self.anonymous_with_email(e))?;
                self.by_remote_id.insert(id.to_owned(), adopted);
                if let Some(contact) = self.contacts.get_mut(&adopted) {
                    contact.remote_id = Some(id.to_owned());
                }
                Some(adopted)
            }),
            (None, Some(email)) => self.first_with_email(email),
            (None, None) => None,
        };
        let seq = match found {
            Some(seq) => seq,
            None => self.create_contact(id, now),
        };
        if let Some(email) = email {
            self.set_email(seq, email);
        }
        if let Some(contact) = self.contacts.get_mut(&seq) {
            contact.last_seen = now;
        }
        seq
    }

    fn anonymous_with_email(&self, email: &str) -> Option<u64> {
        self.by_email.get(email)?.iter().copied().find(|seq| {
            self.contacts
                .get(seq)
                .is_some_and(|c| c.remote_id.is_none())
        })
    }

    fn create_contact(&mut self, id: Option<&str>, now: DateTime<Utc>) -> u64 {
        let seq = self.next_contact;
        self.next_contact += 1;
        let uuid = uuid::Uuid::new_v4().to_string();
        if let Some(id) = id {
            self.by_remote_id.insert(id.to_owned(), seq);
        }
        self.by_uuid.insert(uuid.clone(), seq);
        self.contacts.insert(
            seq,
            Contact {
                uuid,
                remote_id: id.map(str::to_owned),
                email: None,
                first_seen: now,
                last_seen: now,
                attributes: BTreeMap::new(),
                account: None,
                identify_count: 0,
                event_count: 0,
            },
        );
        seq
    }

    fn set_email(&mut self, seq: u64, email: &str) {
        let Some(contact) = self.contacts.get_mut(&seq) else {
            return;
        };
        if contact.email.as_deref() == Some(email) {
            return;
        }
        let old = contact.email.replace(email.to_owned());
        if let Some(old) = old {
            self.unindex_email(&old, seq);
        }
        self.by_email
            .entry(email.to_owned())
            .or_default()
            .insert(seq);
    }

    fn unindex_email(&mut self, email: &str, seq: u64) {
        if let Some(set) = self.by_email.get_mut(email) {
            set.remove(&seq);
            if set.is_empty() {
                self.by_email.remove(email);
            }
        }
    }

    fn upsert_account(&mut self, input: AccountInput, now: DateTime<Utc>) -> u64 {
        let seq = match self.accounts_by_remote_id.get(&input.id) {
            Some(&seq) => seq,
            None => {
                let seq = self.next_account;
                self.next_account += 1;
                self.accounts_by_remote_id.insert(input.id.clone(), seq);
                self.accounts.insert(
                    seq,
                    Account {
                        uuid: uuid::Uuid::new_v4().to_string(),
                        remote_id: input.id,
                        first_seen: now,
                        last_seen: now,
                        attributes: BTreeMap::new(),
                        contact_count: 0,
                    },
                );
                seq
            }
        };
        if let Some(account) = self.accounts.get_mut(&seq) {
            account.last_seen = now;
            apply(&mut account.attributes, input.traits);
        }
        seq
    }

    fn link(&mut self, contact_seq: u64, account_seq: u64) {
        let Some(contact) = self.contacts.get_mut(&contact_seq) else {
            return;
        };
        let previous = contact.account.replace(account_seq);
        if previous == Some(account_seq) {
            return;
        }
        if let Some(old) = previous.and_then(|a| self.accounts.get_mut(&a)) {
            old.contact_count = old.contact_count.saturating_sub(1);
        }
        if let Some(new) = self.accounts.get_mut(&account_seq) {
            new.contact_count += 1;
        }
    }

    /// A contact in the shape of Refiner's `GET /contact`.
    pub fn contact_json(&self, seq: u64) -> Option<Value> {
        let contact = self.contacts.get(&seq)?;
        let account = contact
            .account
            .and_then(|a| self.accounts.get(&a))
            .map(|a| {
                json!({
                    "uuid": a.uuid,
                    "remote_id": a.remote_id,
                    "domain": string_attribute(&a.attributes, "domain"),
                    "display_name": string_attribute(&a.attributes, "name"),
                    "first_seen_at": iso(&a.first_seen),
                    "last_seen_at": iso(&a.last_seen),
                    "attributes": attributes_json(&a.attributes),
                })
            });
        Some(json!({
            "uuid": contact.uuid,
            "remote_id": contact.remote_id,
            "email": contact.email,
            "display_name": string_attribute(&contact.attributes, "name"),
            "first_seen_at": iso(&contact.first_seen),
            "last_seen_at": iso(&contact.last_seen),
            "attributes": attributes_json(&contact.attributes),
            "segments": [],
            "account": account,
        }))
    }

    pub fn contact_view(&self, seq: u64) -> Option<ContactView> {
        let contact = self.contacts.get(&seq)?;
        Some(ContactView {
            uuid: contact.uuid.clone(),
            remote_id: contact.remote_id.clone(),
            email: contact.email.clone(),
            display_name: string_attribute(&contact.attributes, "name"),
            first_seen_at: iso(&contact.first_seen),
            last_seen_at: iso(&contact.last_seen),
            attributes: attributes_json(&contact.attributes),
            attribute_types: attribute_types(&contact.attributes),
            account_id: contact
                .account
                .and_then(|a| self.accounts.get(&a))
                .map(|a| a.remote_id.clone()),
            identify_count: contact.identify_count,
            event_count: contact.event_count,
        })
    }

    fn account_view(account: &Account) -> AccountView {
        AccountView {
            uuid: account.uuid.clone(),
            remote_id: account.remote_id.clone(),
            display_name: string_attribute(&account.attributes, "name"),
            domain: string_attribute(&account.attributes, "domain"),
            first_seen_at: iso(&account.first_seen),
            last_seen_at: iso(&account.last_seen),
            attributes: attributes_json(&account.attributes),
            attribute_types: attribute_types(&account.attributes),
            contact_count: account.contact_count,
        }
    }

    /// An account by its `id`: for in-process inspection.
    pub fn account(&self, id: &str) -> Option<AccountView> {
        let seq = self.accounts_by_remote_id.get(id)?;
        self.accounts.get(seq).map(Store::account_view)
    }

    /// `GET /contacts`: one page and its pagination object.
    pub fn list(&self, query: &ListQuery) -> Value {
        let total = self.contacts.len() as u64;
        let length = query.page_length;
        let last_page = total.div_ceil(length).max(1);
        let take = usize::try_from(length).unwrap_or(usize::MAX);
        let (seqs, current_page, next_cursor): (Vec<u64>, u64, Option<String>) = match query.order {
            Order::FirstSeen => {
                let start = match query.cursor {
                    Some(from) => from,
                    None => {
                        let skip = usize::try_from((query.page - 1).saturating_mul(length))
                            .unwrap_or(usize::MAX);
                        self.contacts.keys().nth(skip).copied().unwrap_or(u64::MAX)
                    }
                };
                let current_page = match query.cursor {
                    // Counting what precedes a cursor walks the keys; listing is not a hot path.
                    Some(_) => self.contacts.range(..start).count() as u64 / length + 1,
                    None => query.page,
                };
                let mut page = self.contacts.range(start..).map(|(seq, _)| *seq);
                let seqs: Vec<u64> = page.by_ref().take(take).collect();
                let next = page.next().map(|seq| encode_cursor(Order::FirstSeen, seq));
                (seqs, current_page, next)
            }
            Order::LastSeen => {
                let mut all: Vec<(DateTime<Utc>, u64)> = self
                    .contacts
                    .iter()
                    .map(|(seq, c)| (c.last_seen, *seq))
                    .collect();
                all.sort_unstable();
                let offset = query
                    .cursor
                    .unwrap_or_else(|| (query.page - 1).saturating_mul(length));
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                let seqs: Vec<u64> = all.iter().skip(start).take(take).map(|(_, s)| *s).collect();
                let end = offset.saturating_add(seqs.len() as u64);
                let next = (end < total).then(|| encode_cursor(Order::LastSeen, end));
                (seqs, offset / length + 1, next)
            }
        };
        let items: Vec<Value> = seqs.iter().filter_map(|s| self.contact_json(*s)).collect();
        json!({
            "items": items,
            "pagination": {
                "items_count": total,
                "current_page": current_page,
                "last_page": last_page,
                "page_length": length,
                "next_page_cursor": next_cursor,
            }
        })
    }

    /// Live contacts and accounts.
    pub fn counts(&self) -> (u64, u64) {
        (self.contacts.len() as u64, self.accounts.len() as u64)
    }

    /// Usage counters for `GET /account`.
    pub fn usage(&self) -> Usage {
        Usage {
            contacts_created: self.next_contact,
            events_total: self.events_total,
        }
    }

    pub fn snapshot(&self) -> StateSnapshot {
        StateSnapshot {
            contacts: self
                .contacts
                .keys()
                .filter_map(|seq| self.contact_view(*seq))
                .collect(),
            accounts: self.accounts.values().map(Store::account_view).collect(),
            events: self.events.iter().cloned().collect(),
            events_total: self.events_total,
            contacts_created: self.next_contact,
            segments: self.segment_views(),
        }
    }
}

/// The counters behind `GET /account`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Monthly tracked users: contacts created since start or reset.
    pub contacts_created: u64,
    /// Monthly tracked events: events since start or reset.
    pub events_total: u64,
}

#[cfg(test)]
mod tests;
