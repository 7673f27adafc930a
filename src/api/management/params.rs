//! Parameters of management requests: the query string and, for `POST` and `DELETE`, a
//! JSON or form-encoded body, read into one list of name/value pairs. Every parameter is
//! checked, and a bad one is a 400 that names it; an unknown parameter is refused too, so a
//! misspelled filter never silently selects everything.

use actix_web::web;
use base64::Engine;
use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use super::error::ApiError;
use crate::spool::admin::{Cursor, DeadLetterFilter, SearchField, SortField, SortValue};

/// The name/value pairs of a request, in order (a name may repeat).
#[derive(Debug, Clone, Default)]
pub struct Params {
    pub pairs: Vec<(String, String)>,
}

/// Largest body of a management request.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Default and largest `page_size`.
pub const DEFAULT_PAGE_SIZE: u64 = 25;
pub const MAX_PAGE_SIZE: u64 = 1000;
/// Most ids one replay or purge may name.
pub const MAX_IDS: usize = 10_000;
/// Longest `q`.
pub const MAX_Q_CHARS: usize = 200;

impl Params {
    /// The query string's pairs.
    pub fn from_query(query: &str) -> Result<Params, ApiError> {
        let pairs = web::Query::<Vec<(String, String)>>::from_query(query)
            .map_err(|e| ApiError::parameter("query", format!("malformed query string: {e}")))?
            .into_inner();
        Ok(Params { pairs })
    }

    /// Adds a body's pairs: a JSON object (arrays give one pair per element) or a
    /// form-encoded body.
    pub fn add_body(&mut self, content_type: &str, body: &[u8]) -> Result<(), ApiError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let json_body = content_type.contains("json")
            || (!content_type.contains("form")
                && body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{'));
        if !json_body {
            let text = std::str::from_utf8(body)
                .map_err(|_| ApiError::parameter("body", "the body is not UTF-8"))?;
            let more = Params::from_query(text)
                .map_err(|_| ApiError::parameter("body", "the body is not form-encoded"))?;
            self.pairs.extend(more.pairs);
            return Ok(());
        }
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::parameter("body", format!("the body is not JSON: {e}")))?;
        let Value::Object(object) = value else {
            return Err(ApiError::parameter(
                "body",
                "the body must be a JSON object",
            ));
        };
        for (name, value) in object {
            let items = match value {
                Value::Array(items) => items,
                other => vec![other],
            };
            for item in items {
                let text = match item {
                    Value::Null => continue,
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    _ => {
                        return Err(ApiError::parameter(
                            &name,
                            format!("`{name}` must be a string, a number or a list of them"),
                        ))
                    }
                };
                self.pairs.push((name.clone(), text));
            }
        }
        Ok(())
    }

    /// The `api_key` values (credentials, checked by the caller).
    pub fn api_keys(&self) -> Vec<&str> {
        self.all("api_key")
    }

    /// Refuses parameters other than `allowed` and `api_key`.
    pub fn only(&self, allowed: &[&str]) -> Result<(), ApiError> {
        for (name, _) in &self.pairs {
            if name != "api_key" && !allowed.contains(&name.as_str()) {
                return Err(ApiError::parameter(
                    name,
                    format!(
                        "unknown parameter `{name}`; this route takes {}",
                        allowed.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    pub fn all(&self, name: &str) -> Vec<&str> {
        self.pairs
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The one value of `name`, if given; given twice is an error.
    pub fn one(&self, name: &str) -> Result<Option<&str>, ApiError> {
        match self.all(name).as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one)),
            _ => Err(ApiError::parameter(
                name,
                format!("`{name}` is given more than once"),
            )),
        }
    }

    pub fn number(&self, name: &str, min: u64, max: u64) -> Result<Option<u64>, ApiError> {
        let Some(text) = self.one(name)? else {
            return Ok(None);
        };
        match text.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(ApiError::parameter(
                name,
                format!("`{name}` must be a whole number from {min} to {max}, got `{text}`"),
            )),
        }
    }

    pub fn date(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.one(name)?
            .map(|text| {
                parse_date(text).ok_or_else(|| {
                    ApiError::parameter(
                        name,
                        format!(
                            "`{name}` must be an ISO 8601 date or date-time \
                             (2026-05-01, 2026-05-01T10:00:00Z), got `{text}`"
                        ),
                    )
                })
            })
            .transpose()
    }

    /// The filter parameters shared by listing, replay and purge: `start_at`, `ends_at`,
    /// `q`, `q_f`, `status` and (`with_ids`) `ids`.
    pub fn filter(&self, source: &str, with_ids: bool) -> Result<DeadLetterFilter, ApiError> {
        let start_at_ms = self.date("start_at")?;
        let ends_at_ms = self.date("ends_at")?;
        if let (Some(start), Some(end)) = (start_at_ms, ends_at_ms) {
            if start >= end {
                return Err(ApiError::parameter(
                    "ends_at",
                    "`ends_at` must be after `start_at`",
                ));
            }
        }
        let q = self.one("q")?.map(str::to_string);
        if q.as_ref().is_some_and(|q| q.chars().count() > MAX_Q_CHARS) {
            return Err(ApiError::parameter(
                "q",
                format!("`q` is longer than {MAX_Q_CHARS} characters"),
            ));
        }
        let mut q_fields = Vec::new();
        for list in self.all("q_f") {
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                let field = SearchField::parse(name).ok_or_else(|| {
                    let names: Vec<&str> = SearchField::ALL.iter().map(|f| f.name()).collect();
                    ApiError::parameter(
                        "q_f",
                        format!(
                            "`q_f` names `{name}`; searchable fields are {}",
                            names.join(", ")
                        ),
                    )
                })?;
                if !q_fields.contains(&field) {
                    q_fields.push(field);
                }
            }
        }
        let status = self.number("status", 100, 599)?.map(|s| s as u16);
        let mut ids = None;
        if with_ids {
            let given = self.all("ids");
            if !given.is_empty() {
                let mut list = Vec::new();
                for text in given {
                    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                        let id =
                            part.parse::<i64>()
                                .ok()
                                .filter(|id| *id > 0)
                                .ok_or_else(|| {
                                    ApiError::parameter(
                                        "ids",
                                        format!("`ids` holds `{part}`, not an id"),
                                    )
                                })?;
                        list.push(id);
                    }
                }
                if list.len() > MAX_IDS {
                    return Err(ApiError::parameter(
                        "ids",
                        format!("`ids` names more than {MAX_IDS} ids"),
                    ));
                }
                ids = Some(list);
            }
        }
        Ok(DeadLetterFilter {
            source: source.to_string(),
            ids,
            start_at_ms,
            ends_at_ms,
            q,
            q_fields,
            status,
            max_id: None,
        })
    }

    /// `o`: a sort field, `-` first for descending; `-created_at` by default.
    pub fn order(&self) -> Result<(SortField, bool), ApiError> {
        let text = self.one("o")?.unwrap_or("-created_at").trim();
        let (descending, name) = match text.strip_prefix('-') {
            Some(name) => (true, name),
            None => (false, text.strip_prefix('+').unwrap_or(text)),
        };
        let field = SortField::parse(name).ok_or_else(|| {
            let names: Vec<&str> = SortField::ALL.iter().map(|f| f.name()).collect();
            ApiError::parameter(
                "o",
                format!(
                    "`o` names `{name}`; sortable fields are {}",
                    names.join(", ")
                ),
            )
        })?;
        Ok((field, descending))
    }
}

/// ISO 8601: an RFC 3339 date-time (offset or `Z`), a date-time without offset (UTC), or
/// a date (midnight UTC). A `+` of an offset that arrived as a space (an unencoded query
/// string) is restored.
pub fn parse_date(text: &str) -> Option<i64> {
    let text = text.trim();
    let restored;
    let text = if text.len() > 19 && text.as_bytes().get(text.len() - 6) == Some(&b' ') {
        restored = format!("{}+{}", &text[..text.len() - 6], &text[text.len() - 5..]);
        restored.as_str()
    } else {
        text
    };
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_millis());
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Some(t.and_utc().timestamp_millis());
        }
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc().timestamp_millis())
}

/// A time as the API writes it: RFC 3339 in UTC with milliseconds.
pub fn iso(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A keyset cursor as it travels in `next`/`previous` links: which side of which row, for
/// which order, and the page number it leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageCursor {
    pub order: String,
    pub after: bool,
    pub cursor: Cursor,
    pub page: u64,
}

impl PageCursor {
    pub fn encode(&self) -> String {
        let value = match &self.cursor.value {
            SortValue::Int(n) => json!(n),
            SortValue::Text(s) => json!(s),
        };
        let token = json!({
            "o": self.order,
            "d": if self.after { "a" } else { "b" },
            "v": value,
            "i": self.cursor.id,
            "p": self.page,
        });
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string())
    }

    /// Decodes a `cursor` made for the order `order` of `field`.
    pub fn decode(text: &str, order: &str, field: SortField) -> Result<PageCursor, ApiError> {
        let bad = || ApiError::parameter("cursor", "`cursor` is not a cursor of this listing");
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim())
            .map_err(|_| bad())?;
        let token: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
        if token["o"].as_str() != Some(order) {
            return Err(ApiError::parameter(
                "cursor",
                "`cursor` was made for another order `o`; follow the links of this listing",
            ));
        }
        let value = if field.is_text() {
            SortValue::Text(token["v"].as_str().ok_or_else(bad)?.to_string())
        } else {
            SortValue::Int(token["v"].as_i64().ok_or_else(bad)?)
        };
        let after = match token["d"].as_str() {
            Some("a") => true,
            Some("b") => false,
            _ => return Err(bad()),
        };
        Ok(PageCursor {
            order: order.to_string(),
            after,
            cursor: Cursor {
                value,
                id: token["i"].as_i64().ok_or_else(bad)?,
            },
            page: token["p"].as_u64().filter(|p| *p >= 1).ok_or_else(bad)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_in_iso_8601_forms() {
        let noon = 1_777_636_800_000; // 2026-05-01T12:00:00Z
        assert_eq!(parse_date("2026-05-01T12:00:00Z"), Some(noon));
        assert_eq!(parse_date("2026-05-01T12:00:00.000Z"), Some(noon));
        assert_eq!(parse_date("2026-05-01T14:00:00+02:00"), Some(noon));
        assert_eq!(parse_date("2026-05-01T14:00:00 02:00"), Some(noon));
        assert_eq!(parse_date("2026-05-01T12:00:00"), Some(noon));
        assert_eq!(parse_date("2026-05-01T12:00"), Some(noon));
        assert_eq!(parse_date("2026-05-01"), Some(noon - 12 * 3_600_000));
        assert_eq!(parse_date("yesterday"), None);
        assert_eq!(parse_date("2026-13-01"), None);
        assert_eq!(iso(noon), "2026-05-01T12:00:00.000Z");
    }

    #[test]
    fn cursors_round_trip_and_are_bound_to_their_order() {
        let cursor = PageCursor {
            order: "-userId".into(),
            after: true,
            cursor: Cursor {
                value: SortValue::Text("u é".into()),
                id: 42,
            },
            page: 7,
        };
        let text = cursor.encode();
        assert_eq!(
            PageCursor::decode(&text, "-userId", SortField::UserId),
            Ok(cursor)
        );
        assert!(PageCursor::decode(&text, "userId", SortField::UserId).is_err());
        assert!(PageCursor::decode("garbage", "-userId", SortField::UserId).is_err());
    }

    #[test]
    fn bodies_as_json_or_form() {
        let mut params = Params::from_query("api_key=t&q=x").expect("query");
        params
            .add_body(
                "application/json",
                br#"{"ids": [1, 2], "q_f": "event", "n": null}"#,
            )
            .expect("json");
        assert_eq!(params.all("ids"), vec!["1", "2"]);
        assert_eq!(params.api_keys(), vec!["t"]);
        let mut form = Params::default();
        form.add_body("application/x-www-form-urlencoded", b"api_key=k&ids=3,4")
            .expect("form");
        assert_eq!(form.all("ids"), vec!["3,4"]);
        let filter = form.filter("s", true).expect("filter");
        assert_eq!(filter.ids, Some(vec![3, 4]));
        assert!(Params::default()
            .add_body("application/json", b"[1]")
            .is_err());
        let err = form.only(&["q"]).expect_err("ids is not allowed");
        assert!(matches!(err, ApiError::InvalidParameter { parameter, .. } if parameter == "ids"));
    }
}
