//! Request parameters and authentication, the way Refiner reads them.
//!
//! Refiner takes parameters from the query string and from the body, JSON or form-encoded,
//! interchangeably. The simulator merges them into one JSON object: query string first, body
//! keys override. Form-encoded values (query string included) carry no types, so they are
//! inferred losslessly: `true`/`false` become booleans, and a value becomes a number only if
//! the number prints back to the very same text (`42`, `1.5`; not `007`, `1.50`, `1e3`).
//! Bracketed keys nest (`account[id]=a` → `{"account": {"id": "a"}}`, `tags[]=x` → an array),
//! as PHP-style servers read them.
//!
//! Authentication accepts any of Refiner's three ways: `Authorization: Bearer KEY`,
//! `Authorization: Basic base64(KEY:)` (the trailing colon is required and the password must
//! be empty), or an `api_key` parameter in the query string or body. A call is authenticated
//! if any key it presents is known. The `api_key` parameter is removed from the parameters
//! before they are stored or logged.

use std::collections::HashSet;

use actix_web::http::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE};
use actix_web::web;
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::SimError;

/// How a body was encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyFormat {
    None,
    Json,
    Form,
}

/// The merged parameters of one call.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub map: Map<String, Value>,
    pub format: BodyFormat,
}

/// Parses the query string and the body into one object (body keys win).
pub fn parse(query: &str, headers: &HeaderMap, body: &[u8]) -> Result<Params, SimError> {
    let mut map = parse_form(query)?;
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let trimmed = body.trim_ascii();
    if trimmed.is_empty() {
        return Ok(Params {
            map,
            format: BodyFormat::None,
        });
    }
    let format = match content_type.as_deref() {
        Some("application/json") => BodyFormat::Json,
        Some(t) if t.ends_with("+json") => BodyFormat::Json,
        Some("application/x-www-form-urlencoded") => BodyFormat::Form,
        None | Some("") | Some("text/plain") => {
            if trimmed.first() == Some(&b'{') {
                BodyFormat::Json
            } else {
                BodyFormat::Form
            }
        }
        Some(other) => {
            return Err(SimError::bad_request(format!(
                "unsupported content type `{other}`; send JSON or form-encoded data"
            )))
        }
    };
    let body_map = match format {
        BodyFormat::Json => match serde_json::from_slice::<Value>(trimmed) {
            Ok(Value::Object(object)) => object,
            Ok(_) => return Err(SimError::bad_request("the JSON body must be an object")),
            Err(e) => return Err(SimError::bad_request(format!("invalid JSON body: {e}"))),
        },
        BodyFormat::Form => {
            let text = std::str::from_utf8(trimmed)
                .map_err(|_| SimError::bad_request("the form body is not UTF-8"))?;
            parse_form(text)?
        }
        BodyFormat::None => Map::new(),
    };
    map.extend(body_map);
    Ok(Params { map, format })
}

/// Parses `a=1&account[id]=x` into a JSON object with inferred scalar types.
pub fn parse_form(text: &str) -> Result<Map<String, Value>, SimError> {
    let mut map = Map::new();
    if text.is_empty() {
        return Ok(map);
    }
    let pairs = web::Query::<Vec<(String, String)>>::from_query(text)
        .map_err(|e| SimError::bad_request(format!("invalid form data: {e}")))?
        .into_inner();
    for (key, value) in pairs {
        let (head, rest) = split_key(&key);
        insert_path(&mut map, head, &rest, infer(value));
    }
    Ok(map)
}

/// `account[id][x]` → (`account`, [`id`, `x`]); `tags[]` → (`tags`, [``]).
fn split_key(key: &str) -> (&str, Vec<&str>) {
    let Some(open) = key.find('[') else {
        return (key, Vec::new());
    };
    if !key.ends_with(']') || open == 0 {
        return (key, Vec::new());
    }
    let head = &key[..open];
    let inner = &key[open + 1..key.len() - 1];
    (head, inner.split("][").collect())
}

fn insert_path(map: &mut Map<String, Value>, head: &str, rest: &[&str], value: Value) {
    let Some((next, tail)) = rest.split_first() else {
        map.insert(head.to_owned(), value);
        return;
    };
    if next.is_empty() {
        // `tags[]=x`: append to an array (deeper nesting below `[]` is not supported).
        let slot = map
            .entry(head.to_owned())
            .or_insert_with(|| Value::Array(Vec::new()));
        if !slot.is_array() {
            *slot = Value::Array(Vec::new());
        }
        if let Value::Array(items) = slot {
            items.push(value);
        }
        return;
    }
    let slot = map
        .entry(head.to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    if let Value::Object(inner) = slot {
        insert_path(inner, next, tail, value);
    }
}

/// Lossless type inference for a form value.
fn infer(text: String) -> Value {
    match text.as_str() {
        "true" => return Value::Bool(true),
        "false" => return Value::Bool(false),
        _ => {}
    }
    let looks_numeric = text
        .bytes()
        .next()
        .is_some_and(|b| b == b'-' || b.is_ascii_digit())
        && text
            .bytes()
            .all(|b| b == b'-' || b == b'.' || b.is_ascii_digit());
    if looks_numeric {
        if let Ok(n) = text.parse::<i64>() {
            if n.to_string() == text {
                return Value::from(n);
            }
        } else if let Ok(f) = text.parse::<f64>() {
            if f.is_finite() && f.to_string() == text {
                if let Some(n) = serde_json::Number::from_f64(f) {
                    return Value::Number(n);
                }
            }
        }
    }
    Value::String(text)
}

/// A parameter as a non-empty string (numbers are accepted and printed), if present.
pub fn text_param(map: &Map<String, Value>, key: &str) -> Option<String> {
    match map.get(key)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Which of Refiner's authentication methods a call used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    /// No key was presented.
    None,
    /// `Authorization: Bearer KEY`.
    Bearer,
    /// `Authorization: Basic base64(KEY:)`.
    Basic,
    /// `api_key` in the query string or body.
    Param,
}

/// The keys the simulator accepts. An empty set accepts any non-empty key, so a benchmark
/// need not configure one; a key must still be presented.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: HashSet<String>,
    /// The configured keys in order, to report which one a call used.
    order: Vec<String>,
}

impl KeySet {
    pub fn new(keys: &[String]) -> KeySet {
        KeySet {
            keys: keys.iter().filter(|k| !k.is_empty()).cloned().collect(),
            order: keys.to_vec(),
        }
    }

    fn accepts(&self, key: &str) -> bool {
        !key.is_empty() && (self.keys.is_empty() || self.keys.contains(key))
    }

    /// The position of `key` in the configured keys (never the key itself).
    fn position(&self, key: &str) -> Option<usize> {
        self.order.iter().position(|k| k == key)
    }
}

/// The verdict on a call's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthOutcome {
    /// The method that succeeded, else the first one presented, else `None`.
    pub method: AuthMethod,
    pub ok: bool,
    /// Which configured key authenticated the call (its position in `api_keys`).
    pub key_index: Option<usize>,
}

/// Checks every key the call presents; removes `api_key` from the parameters.
pub fn authenticate(headers: &HeaderMap, params: &mut Params, keys: &KeySet) -> AuthOutcome {
    let mut presented: Vec<(AuthMethod, Option<String>)> = Vec::with_capacity(2);
    if let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let value = value.trim();
        if let Some(token) = strip_scheme(value, "bearer") {
            presented.push((AuthMethod::Bearer, Some(token.trim().to_owned())));
        } else if let Some(encoded) = strip_scheme(value, "basic") {
            presented.push((AuthMethod::Basic, basic_user(encoded.trim())));
        }
    }
    if let Some(key) = params.map.remove("api_key") {
        let key = match key {
            Value::String(s) => Some(s),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        presented.push((AuthMethod::Param, key));
    }
    for (method, key) in &presented {
        if key.as_deref().is_some_and(|k| keys.accepts(k)) {
            return AuthOutcome {
                method: *method,
                ok: true,
                key_index: key.as_deref().and_then(|k| keys.position(k)),
            };
        }
    }
    AuthOutcome {
        method: presented
            .first()
            .map(|(method, _)| *method)
            .unwrap_or(AuthMethod::None),
        ok: false,
        key_index: None,
    }
}

fn strip_scheme<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let (head, rest) = value.split_once(' ')?;
    head.eq_ignore_ascii_case(scheme).then_some(rest)
}

/// The user name of `base64(user:)`; `None` without the colon or with a password.
fn basic_user(encoded: &str) -> Option<String> {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    password.is_empty().then(|| user.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn form_values_are_typed_losslessly_and_brackets_nest() {
        let map = parse_form(
            "id=007&n=42&f=1.5&g=1.50&ok=true&s=x&account%5Bid%5D=acme&account[name]=A+B&t[]=a&t[]=b",
        )
        .expect("parses");
        assert_eq!(
            Value::Object(map),
            json!({"id": "007", "n": 42, "f": 1.5, "g": "1.50", "ok": true, "s": "x",
                   "account": {"id": "acme", "name": "A B"}, "t": ["a", "b"]})
        );
    }

    #[test]
    fn basic_needs_the_trailing_colon_and_no_password() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(basic_user(&b64("key:")), Some("key".into()));
        assert_eq!(basic_user(&b64("key")), None);
        assert_eq!(basic_user(&b64("key:pw")), None);
    }
}
