//! Tests of clock-skew correction (conformance cases 23-26) and timestamp parsing.

use super::*;

fn corrected(timestamp: Option<Value>, sent_at: Option<Value>) -> Map<String, Value> {
    let mut event = Map::new();
    if let Some(timestamp) = timestamp {
        event.insert("timestamp".into(), timestamp);
    }
    correct_clock_skew(&mut event, RECEIVED_MS, sent_at.as_ref());
    event
}

#[test]
fn skew_is_corrected_against_sent_at() {
    // Case 23: timestamp = R − (S − T).
    let event = corrected(
        Some(json!("2025-01-02T03:00:00.000Z")),
        Some(json!("2025-01-02T03:00:10.000Z")),
    );
    assert_eq!(
        Value::Object(event),
        json!({
            "timestamp": "2025-01-02T03:03:55.123Z",
            "originalTimestamp": "2025-01-02T03:00:00.000Z",
        })
    );
}

#[test]
fn skew_with_sent_at_before_timestamp_moves_forward() {
    let event = corrected(
        Some(json!("2025-01-02T03:00:10.000Z")),
        Some(json!("2025-01-02T03:00:00.000Z")),
    );
    assert_eq!(event["timestamp"], "2025-01-02T03:04:15.123Z");
}

#[test]
fn python_microsecond_offsets_and_millisecond_z_parse() {
    // Case 26: analytics-python's sentAt, analytics.js' timestamp.
    let event = corrected(
        Some(json!("2025-01-02T03:04:04.123Z")),
        Some(json!("2025-01-02T03:04:05.123456+00:00")),
    );
    assert_eq!(event["timestamp"], "2025-01-02T03:04:04.123Z");
    assert_eq!(event["originalTimestamp"], "2025-01-02T03:04:04.123Z");

    let event = corrected(
        Some(json!("2025-01-02T03:04:04.123456+00:00")),
        Some(json!("2025-01-02T03:04:06.123Z")),
    );
    assert_eq!(event["timestamp"], "2025-01-02T03:04:03.123Z");
    assert_eq!(
        event["originalTimestamp"],
        "2025-01-02T03:04:04.123456+00:00"
    );
}

#[test]
fn unparseable_timestamp_falls_back_to_received_at_and_is_kept() {
    let event = corrected(
        Some(json!("2015-2-02T00:30:08.276Z")),
        Some(json!("2025-01-02T03:00:10.000Z")),
    );
    assert_eq!(
        Value::Object(event),
        json!({
            "timestamp": RECEIVED,
            "originalTimestamp": "2015-2-02T00:30:08.276Z",
        })
    );
    // A number is not a timestamp either; it is kept verbatim.
    let event = corrected(Some(json!(1_735_787_045_123_i64)), None);
    assert_eq!(event["timestamp"], RECEIVED);
    assert_eq!(event["originalTimestamp"], json!(1_735_787_045_123_i64));
}

#[test]
fn without_sent_at_the_timestamp_is_kept() {
    let event = corrected(Some(json!("2020-05-06T07:08:09.010Z")), None);
    assert_eq!(
        Value::Object(event),
        json!({
            "timestamp": "2020-05-06T07:08:09.010Z",
            "originalTimestamp": "2020-05-06T07:08:09.010Z",
        })
    );
}

#[test]
fn unparseable_sent_at_applies_no_correction() {
    let event = corrected(
        Some(json!("2020-05-06T07:08:09.010Z")),
        Some(json!("2015-2-02T00:30:08.276Z")),
    );
    assert_eq!(event["timestamp"], "2020-05-06T07:08:09.010Z");
    let event = corrected(Some(json!("2020-05-06T07:08:09.010Z")), Some(json!(12)));
    assert_eq!(event["timestamp"], "2020-05-06T07:08:09.010Z");
}

#[test]
fn missing_or_null_timestamp_becomes_received_at() {
    for timestamp in [None, Some(Value::Null)] {
        let event = corrected(timestamp, Some(json!("2025-01-02T03:00:10.000Z")));
        assert_eq!(
            Value::Object(event),
            json!({ "timestamp": RECEIVED }),
            "no originalTimestamp is invented"
        );
    }
}

#[test]
fn skew_rules_apply_through_parsing() {
    // Cases 24 and 26 end to end: no timestamp; unparseable timestamp.
    let parsed = batch(
        r#"{"sentAt":"2025-01-02T03:00:10.000Z","batch":[
            {"type":"page","anonymousId":"a","messageId":"m1"},
            {"type":"page","anonymousId":"a","messageId":"m2","timestamp":"2015-2-02T00:30:08.276Z"}
        ]}"#,
    )
    .expect("accepted");
    let payloads: Vec<Value> = parsed
        .items
        .iter()
        .map(|item| payload(item.as_ref().expect("accepted")))
        .collect();
    assert_eq!(payloads[0]["timestamp"], RECEIVED);
    assert_eq!(payloads[0].get("originalTimestamp"), None);
    assert_eq!(payloads[1]["timestamp"], RECEIVED);
    assert_eq!(payloads[1]["originalTimestamp"], "2015-2-02T00:30:08.276Z");
    for payload in &payloads {
        assert_eq!(payload["receivedAt"], RECEIVED);
    }
}

#[test]
fn timestamps_parse_in_the_shapes_clients_send() {
    let expected = parse_timestamp(&json!("2025-01-02T03:04:05.123Z")).expect("parses");
    assert_eq!(expected.timestamp_millis(), RECEIVED_MS);
    for text in [
        "2025-01-02T03:04:05.123Z",
        "2025-01-02T03:04:05.123+00:00",
        "2025-01-02T05:04:05.123+02:00",
        "2025-01-01T22:04:05.123-05:00",
        "2025-01-02T03:04:05.123",
        " 2025-01-02T03:04:05.123Z ",
    ] {
        let parsed = parse_timestamp(&json!(text)).unwrap_or_else(|| panic!("{text:?}"));
        assert_eq!(parsed, expected, "{text:?}");
    }
    let micros = parse_timestamp(&json!("2025-01-02T03:04:05.123456+00:00")).expect("parses");
    assert_eq!(micros.timestamp_micros(), RECEIVED_MS * 1000 + 456);
    for bad in [
        json!("2015-2-02T00:30:08.276Z"),
        json!("yesterday"),
        json!(""),
        json!(RECEIVED_MS),
        Value::Null,
    ] {
        assert_eq!(parse_timestamp(&bad), None, "{bad}");
    }
}

#[test]
fn timestamps_are_formatted_as_utc_milliseconds() {
    assert_eq!(format_timestamp(RECEIVED_MS), RECEIVED);
    assert_eq!(format_timestamp(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(format_timestamp(-1), "1969-12-31T23:59:59.999Z");
    // Out of chrono's range: falls back to the epoch instead of failing.
    assert_eq!(format_timestamp(i64::MAX), "1970-01-01T00:00:00.000Z");
}
