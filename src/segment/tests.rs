//! Unit tests of the Segment spec layer. Everything here is pure, so each test feeds bytes
//! in and asserts the exact events, skips or rejections that come out.

use std::cell::Cell;

use serde_json::{json, Map, Value};

use super::time::parse_timestamp;
use super::*;

/// Arrival time used by every test: 2025-01-02T03:04:05.123Z.
const RECEIVED_MS: i64 = 1_735_787_045_123;
const RECEIVED: &str = "2025-01-02T03:04:05.123Z";

thread_local! {
    static NEXT_ID: Cell<u32> = const { Cell::new(0) };
}

/// A deterministic `messageId` generator: `gen-1`, `gen-2`, ... per test thread.
fn sequential_id() -> String {
    NEXT_ID.with(|next| {
        next.set(next.get() + 1);
        format!("gen-{}", next.get())
    })
}

fn reset_ids() {
    NEXT_ID.with(|next| next.set(0));
}

pub(super) fn arrival(limits: &Limits) -> Arrival<'_> {
    reset_ids();
    Arrival {
        received_at_ms: RECEIVED_MS,
        limits,
        new_message_id: sequential_id,
    }
}

fn single(body: &str, kind: EventType) -> Result<Parsed, Reject> {
    parse_single(body.as_bytes(), kind, arrival(&Limits::default()))
}

fn batch(body: &str) -> Result<Parsed, Reject> {
    parse_batch(body.as_bytes(), arrival(&Limits::default()))
}

fn webhook(body: &str) -> Result<Parsed, Reject> {
    parse_webhook(body.as_bytes(), arrival(&Limits::default()))
}

fn payload(event: &Event) -> Value {
    serde_json::from_slice(&event.payload).expect("payload is JSON")
}

/// The only item of a parse result, which must be an accepted event.
fn only_event(parsed: Parsed) -> Event {
    assert_eq!(
        parsed.items.len(),
        1,
        "expected one item: {:?}",
        parsed.items
    );
    match parsed.items.into_iter().next() {
        Some(Ok(event)) => event,
        other => panic!("expected an accepted event, got {other:?}"),
    }
}

/// The only item of a parse result, which must be skipped.
fn only_skip(parsed: Parsed) -> Skip {
    assert_eq!(
        parsed.items.len(),
        1,
        "expected one item: {:?}",
        parsed.items
    );
    match parsed.items.into_iter().next() {
        Some(Err(skip)) => skip,
        other => panic!("expected a skipped item, got {other:?}"),
    }
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

// ---------------------------------------------------------------------------------------
// EventType, Skip, Reject
// ---------------------------------------------------------------------------------------

#[test]
fn every_route_path_maps_to_its_type() {
    let cases = [
        ("identify", EventType::Identify),
        ("i", EventType::Identify),
        ("track", EventType::Track),
        ("t", EventType::Track),
        ("page", EventType::Page),
        ("p", EventType::Page),
        ("screen", EventType::Screen),
        ("s", EventType::Screen),
        ("group", EventType::Group),
        ("g", EventType::Group),
        ("alias", EventType::Alias),
        ("a", EventType::Alias),
    ];
    for (path, kind) in cases {
        assert_eq!(EventType::from_path(path), Some(kind), "path {path:?}");
    }
}

#[test]
fn paths_that_are_not_single_event_routes_map_to_nothing() {
    for path in [
        "batch",
        "b",
        "import",
        "delete",
        "d",
        "",
        "Track",
        "T",
        "tr",
        "x",
        "identify ",
    ] {
        assert_eq!(EventType::from_path(path), None, "path {path:?}");
    }
}

#[test]
fn type_names_round_trip_and_delete_needs_permission() {
    let names: Vec<&str> = EventType::ALL.iter().map(|kind| kind.as_str()).collect();
    assert_eq!(
        names,
        ["identify", "track", "page", "screen", "group", "alias", "delete"]
    );
    for kind in EventType::ALL {
        assert_eq!(EventType::parse(kind.as_str(), true), Some(kind));
    }
    for kind in &EventType::ALL[..6] {
        assert_eq!(EventType::parse(kind.as_str(), false), Some(*kind));
    }
    assert_eq!(EventType::parse("delete", false), None);
    assert_eq!(EventType::parse("Track", true), None);
    assert_eq!(EventType::parse("", true), None);
    assert_eq!(EventType::parse("t", true), None);
}

#[test]
fn skip_labels_are_stable() {
    let labels: Vec<&str> = Skip::ALL.iter().map(|skip| skip.as_str()).collect();
    assert_eq!(
        labels,
        [
            "no_user_anon_id",
            "missing_event",
            "missing_group_id",
            "missing_previous_id",
            "unknown_type",
            "not_an_object",
            "integrations_disabled",
            "integrations_all_disabled",
        ]
    );
}

#[test]
fn reject_codes_are_stable() {
    let cases = [
        (Reject::InvalidJson("x".into()), "invalid_json"),
        (Reject::NotAnObject, "invalid_body"),
        (Reject::InvalidBatch, "invalid_batch"),
        (
            Reject::TooManyEvents { count: 3, limit: 2 },
            "too_many_events",
        ),
        (
            Reject::EventTooLarge {
                index: 1,
                size: 10,
                limit: 5,
            },
            "event_too_large",
        ),
        (
            Reject::MessageIdTooLong {
                index: 0,
                limit: 100,
            },
            "message_id_too_long",
        ),
        (Reject::InvalidMessageId { index: 2 }, "invalid_message_id"),
    ];
    for (reject, code) in cases {
        assert_eq!(reject.code(), code, "{reject:?}");
    }
    assert_eq!(
        Reject::EventTooLarge {
            index: 1,
            size: 10,
            limit: 5
        }
        .to_string(),
        "event 1 is 10 bytes; the limit is 5 bytes per event"
    );
}

#[test]
fn default_limits_are_segments_with_rudderstacks_batch_size() {
    assert_eq!(
        Limits::default(),
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
    );
}

// ---------------------------------------------------------------------------------------
// parse_single
// ---------------------------------------------------------------------------------------

#[test]
fn single_track_is_normalized_exactly() {
    let parsed = single(
        r#"{"userId":"u1","event":"E","messageId":"m1","timestamp":"2025-01-02T03:04:00.000Z"}"#,
        EventType::Track,
    )
    .expect("accepted");
    assert_eq!(parsed.write_key, None);
    let event = only_event(parsed);
    assert_eq!(event.kind, EventType::Track);
    assert_eq!(event.message_id, "m1");
    assert_eq!(event.user_key, UserKey::user_id("u1"));
    assert_eq!(
        payload(&event),
        json!({
            "userId": "u1",
            "event": "E",
            "type": "track",
            "messageId": "m1",
            "timestamp": "2025-01-02T03:04:00.000Z",
            "originalTimestamp": "2025-01-02T03:04:00.000Z",
            "receivedAt": RECEIVED,
        })
    );
}

#[test]
fn single_route_type_overrides_the_body_type() {
    let event = only_event(
        single(
            r#"{"type":"identify","userId":"u1","event":"E","messageId":"m1"}"#,
            EventType::Track,
        )
        .expect("accepted"),
    );
    assert_eq!(event.kind, EventType::Track);
    assert_eq!(payload(&event)["type"], "track");
}

#[test]
fn single_write_key_is_removed_and_returned() {
    let parsed = single(
        r#"{"writeKey":"WK","userId":"u1","event":"E","messageId":"m1"}"#,
        EventType::Track,
    )
    .expect("accepted");
    assert_eq!(parsed.write_key.as_deref(), Some("WK"));
    let event = only_event(parsed);
    assert_eq!(payload(&event).get("writeKey"), None);

    // A writeKey that is not a string is dropped too, and reported as absent.
    let parsed = single(
        r#"{"writeKey":5,"userId":"u1","event":"E","messageId":"m1"}"#,
        EventType::Track,
    )
    .expect("accepted");
    assert_eq!(parsed.write_key, None);
    assert_eq!(payload(&only_event(parsed)).get("writeKey"), None);
}

#[test]
fn single_invalid_json_is_rejected() {
    for body in [
        "",
        "{",
        r#"{"userId":"u1",}"#,
        "nope",
        r#"{"a":1} trailing"#,
    ] {
        match single(body, EventType::Track) {
            Err(Reject::InvalidJson(_)) => {}
            other => panic!("body {body:?}: expected InvalidJson, got {other:?}"),
        }
    }
}

#[test]
fn single_non_object_is_rejected() {
    for body in [
        "[]",
        r#"[{"userId":"u1","event":"E"}]"#,
        r#""x""#,
        "null",
        "42",
        "true",
    ] {
        assert_eq!(
            single(body, EventType::Track),
            Err(Reject::NotAnObject),
            "body {body:?}"
        );
    }
}

#[test]
fn single_size_limit_is_inclusive() {
    let body = r#"{"userId":"u1","event":"E","messageId":"m1"}"#;
    let exact = Limits {
        max_event_bytes: body.len(),
        ..Limits::default()
    };
    let parsed = parse_single(body.as_bytes(), EventType::Track, arrival(&exact));
    assert_eq!(only_event(parsed.expect("accepted")).message_id, "m1");

    let smaller = Limits {
        max_event_bytes: body.len() - 1,
        ..Limits::default()
    };
    assert_eq!(
        parse_single(body.as_bytes(), EventType::Track, arrival(&smaller)),
        Err(Reject::EventTooLarge {
            index: 0,
            size: body.len(),
            limit: body.len() - 1,
        })
    );
}

#[test]
fn single_default_size_limit_is_32_kib() {
    let filler = "x".repeat(32 * 1024);
    let body = format!(r#"{{"userId":"u1","event":"E","properties":{{"f":"{filler}"}}}}"#);
    assert_eq!(
        single(&body, EventType::Track),
        Err(Reject::EventTooLarge {
            index: 0,
            size: body.len(),
            limit: 32 * 1024,
        })
    );
}

#[test]
fn message_id_of_exactly_100_characters_is_kept() {
    let id = "m".repeat(100);
    let body = format!(r#"{{"userId":"u1","event":"E","messageId":"{id}"}}"#);
    let event = only_event(single(&body, EventType::Track).expect("accepted"));
    assert_eq!(event.message_id, id);
    assert_eq!(payload(&event)["messageId"], json!(id));
}

#[test]
fn message_id_limit_counts_characters_not_bytes() {
    let id = "é".repeat(100);
    assert_eq!(id.len(), 200);
    let body = format!(r#"{{"userId":"u1","event":"E","messageId":"{id}"}}"#);
    let event = only_event(single(&body, EventType::Track).expect("accepted"));
    assert_eq!(event.message_id, id);
}

#[test]
fn message_id_of_101_characters_is_rejected() {
    let id = "m".repeat(101);
    let body = format!(r#"{{"userId":"u1","event":"E","messageId":"{id}"}}"#);
    assert_eq!(
        single(&body, EventType::Track),
        Err(Reject::MessageIdTooLong {
            index: 0,
            limit: 100,
        })
    );
}

#[test]
fn message_id_that_is_not_a_string_is_rejected() {
    for id in ["42", "1.5", "true", "{}", r#"["m1"]"#] {
        let body = format!(r#"{{"userId":"u1","event":"E","messageId":{id}}}"#);
        assert_eq!(
            single(&body, EventType::Track),
            Err(Reject::InvalidMessageId { index: 0 }),
            "messageId {id}"
        );
    }
}

#[test]
fn missing_null_or_empty_message_id_is_generated() {
    for body in [
        r#"{"userId":"u1","event":"E"}"#,
        r#"{"userId":"u1","event":"E","messageId":null}"#,
        r#"{"userId":"u1","event":"E","messageId":""}"#,
    ] {
        let event = only_event(single(body, EventType::Track).expect("accepted"));
        assert_eq!(event.message_id, "gen-1", "body {body}");
        assert_eq!(payload(&event)["messageId"], "gen-1", "body {body}");
    }
}

#[test]
fn numeric_ids_are_coerced_to_strings() {
    let event = only_event(
        single(
            r#"{"userId":42,"anonymousId":7.5,"event":"E","messageId":"m1"}"#,
            EventType::Track,
        )
        .expect("accepted"),
    );
    assert_eq!(event.user_key, UserKey::user_id("42"));
    let payload = payload(&event);
    assert_eq!(payload["userId"], json!("42"));
    assert_eq!(payload["anonymousId"], json!("7.5"));
}

#[test]
fn ids_of_other_shapes_or_empty_are_removed() {
    let event = only_event(
        single(
            r#"{"userId":true,"anonymousId":"anon","event":"E","messageId":"m1"}"#,
            EventType::Track,
        )
        .expect("accepted"),
    );
    assert_eq!(event.user_key, UserKey::anonymous("anon"));
    assert_eq!(payload(&event).get("userId"), None);

    let event = only_event(
        single(
            r#"{"userId":"","anonymousId":"anon","event":"E","messageId":"m1"}"#,
            EventType::Track,
        )
        .expect("accepted"),
    );
    assert_eq!(event.user_key, UserKey::anonymous("anon"));
    assert_eq!(payload(&event).get("userId"), None);

    let event = only_event(
        single(
            r#"{"userId":"u1","anonymousId":{"x":1},"event":"E","messageId":"m1"}"#,
            EventType::Track,
        )
        .expect("accepted"),
    );
    assert_eq!(payload(&event).get("anonymousId"), None);
}

#[test]
fn every_skip_reason_of_a_single_event() {
    let cases = [
        (
            r#"{"traits":{"email":"a@b.c"}}"#,
            EventType::Identify,
            Skip::NoUserOrAnonymousId,
        ),
        (
            r#"{"userId":"","anonymousId":""}"#,
            EventType::Page,
            Skip::NoUserOrAnonymousId,
        ),
        (
            r#"{"userId":null,"anonymousId":false}"#,
            EventType::Screen,
            Skip::NoUserOrAnonymousId,
        ),
        (r#"{"userId":"u1"}"#, EventType::Track, Skip::MissingEvent),
        (
            r#"{"userId":"u1","event":""}"#,
            EventType::Track,
            Skip::MissingEvent,
        ),
        (
            r#"{"userId":"u1","event":5}"#,
            EventType::Track,
            Skip::MissingEvent,
        ),
        (r#"{"userId":"u1"}"#, EventType::Group, Skip::MissingGroupId),
        (
            r#"{"userId":"u1","groupId":""}"#,
            EventType::Group,
            Skip::MissingGroupId,
        ),
        (
            r#"{"userId":"u1","groupId":null}"#,
            EventType::Group,
            Skip::MissingGroupId,
        ),
        (
            r#"{"userId":"u1"}"#,
            EventType::Alias,
            Skip::MissingPreviousId,
        ),
        (
            r#"{"userId":"u1","previousId":""}"#,
            EventType::Alias,
            Skip::MissingPreviousId,
        ),
    ];
    for (body, kind, skip) in cases {
        let parsed = single(body, kind).expect("not rejected");
        assert_eq!(only_skip(parsed), skip, "{kind:?} {body}");
    }
}

#[test]
fn every_single_type_is_accepted_with_its_required_fields() {
    let cases = [
        (
            r#"{"userId":"u1","traits":{"plan":"pro"}}"#,
            EventType::Identify,
        ),
        (r#"{"anonymousId":"x","event":"E"}"#, EventType::Track),
        (r#"{"anonymousId":"x","name":"Home"}"#, EventType::Page),
        (r#"{"anonymousId":"x","name":"Home"}"#, EventType::Screen),
        (r#"{"userId":"u1","groupId":"g1"}"#, EventType::Group),
        (r#"{"userId":"u1","groupId":12}"#, EventType::Group),
        (r#"{"userId":"u1","previousId":"old"}"#, EventType::Alias),
        (r#"{"userId":"u1","previousId":3}"#, EventType::Alias),
    ];
    for (body, kind) in cases {
        let event = only_event(single(body, kind).expect("accepted"));
        assert_eq!(event.kind, kind, "{body}");
        assert_eq!(payload(&event)["type"], kind.as_str(), "{body}");
    }
}

#[test]
fn per_event_sent_at_corrects_a_single_event() {
    // analytics.js on /v1/t: the event's own sentAt, 10 s ahead of its timestamp.
    let event = only_event(
        single(
            r#"{"userId":"u1","event":"E","messageId":"m1",
                "timestamp":"2025-01-02T03:00:00.000Z","sentAt":"2025-01-02T03:00:10.000Z"}"#,
            EventType::Track,
        )
        .expect("accepted"),
    );
    let payload = payload(&event);
    assert_eq!(payload["timestamp"], "2025-01-02T03:03:55.123Z");
    assert_eq!(payload["originalTimestamp"], "2025-01-02T03:00:00.000Z");
    assert_eq!(payload["sentAt"], "2025-01-02T03:00:10.000Z");
    assert_eq!(payload["receivedAt"], RECEIVED);
}

mod batch;
mod clock_skew;
mod user_key;
mod webhook;
