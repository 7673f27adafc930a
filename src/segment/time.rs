//! Timestamps: parsing the formats Segment's clients send, and Segment's clock-skew
//! correction `timestamp = receivedAt − (sentAt − originalTimestamp)`.
//!
//! Nothing here fails: a timestamp that does not parse is kept verbatim in
//! `originalTimestamp` and `timestamp` falls back to the arrival time.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, TimeZone, Utc};
use serde_json::{Map, Value};

/// Formats milliseconds since the epoch as ISO 8601 UTC with milliseconds
/// (`2025-01-02T03:04:05.123Z`), the shape Segment's own API produces.
pub fn format_timestamp(ms: i64) -> String {
    match Utc.timestamp_millis_opt(ms).single() {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::Millis, true),
        None => Utc
            .timestamp_millis_opt(0)
            .single()
            .map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
            .unwrap_or_default(),
    }
}

/// Parses an RFC 3339 timestamp (`Z` or `±hh:mm`, any fraction), or one without an
/// offset, which is read as UTC.
pub fn parse_timestamp(value: &Value) -> Option<DateTime<Utc>> {
    let text = value.as_str()?.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Some(t.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|naive| naive.and_utc())
}

/// Applies Segment's timestamp rules to one event, in place.
///
/// - No `timestamp`: `timestamp = receivedAt`.
/// - `timestamp` that does not parse: kept as `originalTimestamp`, `timestamp = receivedAt`.
/// - `timestamp` T and a parseable `sentAt` S: `originalTimestamp = T`,
///   `timestamp = receivedAt − (S − T)`.
/// - `timestamp` without a usable `sentAt`: kept as given (and copied to
///   `originalTimestamp`).
pub fn correct_clock_skew(
    event: &mut Map<String, Value>,
    received_at_ms: i64,
    sent_at: Option<&Value>,
) {
    let received = format_timestamp(received_at_ms);
    let raw = event.get("timestamp").filter(|v| !v.is_null()).cloned();
    match raw {
        None => {
            event.insert("timestamp".into(), Value::String(received));
        }
        Some(raw) => match parse_timestamp(&raw) {
            None => {
                event.insert("originalTimestamp".into(), raw);
                event.insert("timestamp".into(), Value::String(received));
            }
            Some(original) => {
                event.insert("originalTimestamp".into(), raw);
                if let Some(sent) = sent_at.and_then(parse_timestamp) {
                    let skew_ms = sent
                        .timestamp_millis()
                        .saturating_sub(original.timestamp_millis());
                    let corrected = received_at_ms.saturating_sub(skew_ms);
                    event.insert(
                        "timestamp".into(),
                        Value::String(format_timestamp(corrected)),
                    );
                }
            }
        },
    }
}
