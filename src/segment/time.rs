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
    match four_digit_year_timestamp(ms) {
        Some(text) => text.iter().map(|&byte| char::from(byte)).collect(),
        None => chrono_timestamp(ms),
    }
}

/// Appends [`format_timestamp`]`(ms)` to `out`.
pub(super) fn write_timestamp(out: &mut Vec<u8>, ms: i64) {
    match four_digit_year_timestamp(ms) {
        Some(text) => out.extend_from_slice(&text),
        None => out.extend_from_slice(chrono_timestamp(ms).as_bytes()),
    }
}

/// Last millisecond of 9999-12-31.
const LAST_FOUR_DIGIT_MS: i64 = 253_402_300_799_999;

/// [`format_timestamp`] for 1970 to 9999, written digit by digit: every event gets one
/// or two timestamps, and chrono's formatting machinery costs more than the rest of the
/// rule. `None` outside that range, where chrono writes it (a unit test compares the two).
fn four_digit_year_timestamp(ms: i64) -> Option<[u8; 24]> {
    if !(0..=LAST_FOUR_DIGIT_MS).contains(&ms) {
        return None;
    }
    let (year, month, day) = civil_from_days(ms.div_euclid(86_400_000));
    let in_day = ms.rem_euclid(86_400_000);
    let mut text = *b"0000-00-00T00:00:00.000Z";
    for (at, width, value) in [
        (0, 4, year),
        (5, 2, month),
        (8, 2, day),
        (11, 2, in_day / 3_600_000),
        (14, 2, in_day / 60_000 % 60),
        (17, 2, in_day / 1000 % 60),
        (20, 3, in_day % 1000),
    ] {
        let mut value = value;
        for slot in text[at..at + width].iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    Some(text)
}

/// Year, month (1–12) and day (1–31) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// [`format_timestamp`] through chrono: the reference, and the writer outside 1970–9999.
pub(super) fn chrono_timestamp(ms: i64) -> String {
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
    parse_timestamp_str(value.as_str()?)
}

/// [`parse_timestamp`] of a string value (surrounding whitespace is ignored).
pub(super) fn parse_timestamp_str(text: &str) -> Option<DateTime<Utc>> {
    let text = text.trim();
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
