//! The simulator's call parameters, validated: what `identify-user`, `track-event`,
//! `GET/DELETE /contact` and `GET /contacts` accept, with the list cursor's encoding.

use base64::Engine;
use serde_json::{Map, Value};

use super::{Traits, DEFAULT_PAGE_LENGTH, MAX_PAGE_LENGTH};
use crate::sim::error::SimError;
use crate::sim::params::text_param;
use crate::sim::store::LongStrings;

/// An `identify-user` call, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentifyInput {
    pub(super) id: Option<String>,
    pub(super) email: Option<String>,
    pub(super) traits: Traits,
    pub(super) account: Option<AccountInput>,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct AccountInput {
    pub(super) id: String,
    pub(super) traits: Traits,
}

impl IdentifyInput {
    pub fn from_params(map: &Map<String, Value>, long: LongStrings) -> Result<Self, SimError> {
        let id = text_param(map, "id");
        let email = text_param(map, "email");
        if id.is_none() && email.is_none() {
            return Err(SimError::bad_request(
                "an `id` or an `email` is required to identify a user",
            ));
        }
        let account = match map.get("account") {
            None | Some(Value::Null) => None,
            Some(Value::Object(account)) => {
                let Some(account_id) = text_param(account, "id") else {
                    return Err(SimError::bad_request("the `account` object needs an `id`"));
                };
                Some(AccountInput {
                    id: account_id,
                    traits: Traits::from_map(account, &["id"], "account ", long)?,
                })
            }
            Some(_) => return Err(SimError::bad_request("`account` must be an object")),
        };
        let traits = Traits::from_map(map, &["id", "email", "account"], "", long)?;
        Ok(IdentifyInput {
            id,
            email,
            traits,
            account,
        })
    }
}

/// A `track-event` call, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackInput {
    pub(super) id: Option<String>,
    pub(super) email: Option<String>,
    pub(super) event: String,
}

impl TrackInput {
    pub fn from_params(map: &Map<String, Value>) -> Result<Self, SimError> {
        let id = text_param(map, "id");
        let email = text_param(map, "email");
        if id.is_none() && email.is_none() {
            return Err(SimError::bad_request(
                "an `id` or an `email` is required to track an event",
            ));
        }
        let Some(event) = text_param(map, "event") else {
            return Err(SimError::bad_request("an `event` name is required"));
        };
        Ok(TrackInput { id, email, event })
    }
}

/// How `GET/DELETE /contact` name a contact.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lookup {
    pub id: Option<String>,
    pub email: Option<String>,
    pub uuid: Option<String>,
}

impl Lookup {
    pub fn from_params(map: &Map<String, Value>) -> Result<Self, SimError> {
        let lookup = Lookup {
            id: text_param(map, "id"),
            email: text_param(map, "email"),
            uuid: text_param(map, "uuid"),
        };
        if lookup.id.is_none() && lookup.email.is_none() && lookup.uuid.is_none() {
            return Err(SimError::bad_request(
                "an `id`, `email` or `uuid` is required",
            ));
        }
        Ok(lookup)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Order {
    FirstSeen,
    LastSeen,
}

/// `GET /contacts` parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ListQuery {
    pub(super) page: u64,
    pub(super) page_length: u64,
    pub(super) order: Order,
    pub(super) cursor: Option<u64>,
}

pub(super) fn positive(map: &Map<String, Value>, key: &str, default: u64) -> Result<u64, SimError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(value) => value
            .as_u64()
            .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
            .filter(|n| *n >= 1)
            .ok_or_else(|| SimError::bad_request(format!("`{key}` must be a positive integer"))),
    }
}

impl ListQuery {
    pub fn from_params(map: &Map<String, Value>) -> Result<Self, SimError> {
        let page = positive(map, "page", 1)?;
        let page_length = positive(map, "page_length", DEFAULT_PAGE_LENGTH)?.min(MAX_PAGE_LENGTH);
        let order = match map.get("order_by").and_then(Value::as_str) {
            None | Some("first_seen_at") | Some("last_form_submission_at") => Order::FirstSeen,
            Some("last_seen_at") => Order::LastSeen,
            Some(other) => {
                return Err(SimError::bad_request(format!(
                    "`order_by` must be first_seen_at, last_seen_at or last_form_submission_at, not `{other}`"
                )))
            }
        };
        let cursor = match text_param(map, "page_cursor") {
            None => None,
            Some(text) => Some(decode_cursor(&text, order)?),
        };
        Ok(ListQuery {
            page,
            page_length,
            order,
            cursor,
        })
    }
}

pub(super) fn encode_cursor(order: Order, position: u64) -> String {
    let tag = match order {
        Order::FirstSeen => 'f',
        Order::LastSeen => 'l',
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("sim:{tag}:{position}"))
}

pub(super) fn decode_cursor(text: &str, order: Order) -> Result<u64, SimError> {
    let invalid = || SimError::bad_request("invalid `page_cursor`");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let rest = text.strip_prefix("sim:").ok_or_else(invalid)?;
    let (tag, position) = rest.split_once(':').ok_or_else(invalid)?;
    let expected = match order {
        Order::FirstSeen => "f",
        Order::LastSeen => "l",
    };
    if tag != expected {
        return Err(SimError::bad_request(
            "`page_cursor` was made for another `order_by`",
        ));
    }
    position.parse().map_err(|_| invalid())
}
