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

// ---------------------------------------------------------------------------------------
// parse_batch
// ---------------------------------------------------------------------------------------

#[test]
fn batch_items_are_parsed_in_order() {
    let parsed = batch(
        r#"{"writeKey":"WK","batch":[
            {"type":"identify","userId":"u1","messageId":"m1"},
            {"type":"track","userId":"u2","event":"E","messageId":"m2"},
            {"type":"page","anonymousId":"a3","messageId":"m3"}
        ]}"#,
    )
    .expect("accepted");
    assert_eq!(parsed.write_key.as_deref(), Some("WK"));
    let events: Vec<(EventType, String, UserKey)> = parsed
        .items
        .into_iter()
        .map(|item| {
            let event = item.expect("accepted");
            (event.kind, event.message_id, event.user_key)
        })
        .collect();
    assert_eq!(
        events,
        [
            (EventType::Identify, "m1".into(), UserKey::user_id("u1")),
            (EventType::Track, "m2".into(), UserKey::user_id("u2")),
            (EventType::Page, "m3".into(), UserKey::anonymous("a3")),
        ]
    );
}

#[test]
fn batch_item_is_normalized_exactly() {
    let parsed = batch(
        r#"{"batch":[{"type":"track","userId":"u1","event":"E","messageId":"m1",
                     "writeKey":"ITEM","timestamp":"2025-01-02T03:00:00.000Z"}]}"#,
    )
    .expect("accepted");
    assert_eq!(
        parsed.write_key, None,
        "an item's writeKey is not the request's"
    );
    let event = only_event(parsed);
    assert_eq!(
        payload(&event),
        json!({
            "type": "track",
            "userId": "u1",
            "event": "E",
            "messageId": "m1",
            "timestamp": "2025-01-02T03:00:00.000Z",
            "originalTimestamp": "2025-01-02T03:00:00.000Z",
            "receivedAt": RECEIVED,
        })
    );
}

#[test]
fn batch_write_key_that_is_not_a_string_is_absent() {
    let parsed = batch(r#"{"writeKey":["WK"],"batch":[]}"#).expect("accepted");
    assert_eq!(parsed.write_key, None);
    assert!(parsed.items.is_empty());
}

#[test]
fn empty_batch_is_accepted_with_no_items() {
    let parsed = batch(r#"{"batch":[],"writeKey":"WK"}"#).expect("accepted");
    assert_eq!(
        parsed,
        Parsed {
            write_key: Some("WK".into()),
            items: vec![],
            refused: vec![],
        }
    );
}

#[test]
fn batch_invalid_json_is_rejected() {
    for body in [
        "",
        "{",
        r#"{"batch":[{"type":"track"}"#,
        r#"{"batch":[]} x"#,
        "nope",
    ] {
        match batch(body) {
            Err(Reject::InvalidJson(_)) => {}
            other => panic!("body {body:?}: expected InvalidJson, got {other:?}"),
        }
    }
}

#[test]
fn batch_body_that_is_not_an_object_is_rejected() {
    for body in ["[]", r#"[{"type":"track"}]"#, r#""batch""#, "null", "1"] {
        assert_eq!(batch(body), Err(Reject::NotAnObject), "body {body:?}");
    }
}

#[test]
fn batch_without_a_batch_array_is_rejected() {
    for body in [
        "{}",
        r#"{"writeKey":"WK"}"#,
        r#"{"batch":null}"#,
        r#"{"batch":{}}"#,
        r#"{"batch":"x"}"#,
        r#"{"batch":1}"#,
    ] {
        assert_eq!(batch(body), Err(Reject::InvalidBatch), "body {body:?}");
    }
}

#[test]
fn batch_event_count_limit_is_inclusive() {
    let limits = Limits {
        max_batch_events: 2,
        ..Limits::default()
    };
    let two = r#"{"batch":[{"type":"page","anonymousId":"a"},{"type":"page","anonymousId":"b"}]}"#;
    let parsed = parse_batch(two.as_bytes(), arrival(&limits)).expect("accepted");
    assert_eq!(parsed.items.len(), 2);

    let three = r#"{"batch":[{},{},{}]}"#;
    assert_eq!(
        parse_batch(three.as_bytes(), arrival(&limits)),
        Err(Reject::TooManyEvents { count: 3, limit: 2 })
    );
}

#[test]
fn batch_of_2501_events_is_rejected_by_default() {
    let items = vec!["{}"; 2501].join(",");
    let body = format!(r#"{{"batch":[{items}]}}"#);
    assert_eq!(
        batch(&body),
        Err(Reject::TooManyEvents {
            count: 2501,
            limit: 2500,
        })
    );
}

#[test]
fn batch_item_over_the_event_limit_is_refused_alone() {
    let small = r#"{"type":"page","anonymousId":"a"}"#;
    let big = r#"{"type":"page","anonymousId":"a","name":"a long name"}"#;
    let limits = Limits {
        max_event_bytes: small.len(),
        ..Limits::default()
    };
    // Whitespace around an item does not count towards its size.
    let body = format!("{{\"batch\":[ {small} ,\n {big} , {small} ]}}");
    let parsed = parse_batch(body.as_bytes(), arrival(&limits)).expect("accepted");
    assert_eq!(parsed.items.len(), 2);
    assert!(parsed.items.iter().all(Result::is_ok));
    assert_eq!(
        parsed.refused,
        [Refused {
            index: 1,
            reason: Reject::EventTooLarge {
                index: 1,
                size: big.len(),
                limit: small.len(),
            },
            size: big.len(),
            raw: big.to_string(),
        }]
    );
    let body = format!("{{\"batch\":[ {small} ,\n {small} ]}}");
    let parsed = parse_batch(body.as_bytes(), arrival(&limits)).expect("accepted");
    assert_eq!(parsed.items.len(), 2);
    assert!(parsed.refused.is_empty());
}

#[test]
fn a_refused_event_keeps_a_bounded_prefix_cut_at_a_character() {
    let limits = Limits::default();
    // 3-byte characters, so the bound falls inside one.
    let name = "€".repeat(40_000);
    let big = format!(r#"{{"type":"page","anonymousId":"a","name":"{name}"}}"#);
    let body = format!(r#"{{"batch":[{big},{{"type":"page","anonymousId":"b"}}]}}"#);
    let parsed = parse_batch(body.as_bytes(), arrival(&limits)).expect("accepted");
    assert_eq!(parsed.items.len(), 1);
    let refused = &parsed.refused[0];
    assert_eq!(refused.size, big.len());
    assert!(refused.raw.len() <= REFUSED_RAW_BYTES);
    assert!(refused.raw.len() > REFUSED_RAW_BYTES - 3);
    assert!(big.starts_with(&refused.raw));
    assert_eq!(refused.reason.code(), "event_too_large");
}

#[test]
fn batch_message_id_problems_refuse_the_item_only() {
    let long = "m".repeat(101);
    let body = format!(
        r#"{{"batch":[{{"type":"page","anonymousId":"a","messageId":"ok"}},
                      {{"type":"page","anonymousId":"a","messageId":"also-ok"}},
                      {{"type":"page","anonymousId":"a","messageId":"{long}"}}]}}"#
    );
    let parsed = batch(&body).expect("accepted");
    let ids: Vec<String> = parsed
        .items
        .into_iter()
        .map(|item| item.expect("accepted").message_id)
        .collect();
    assert_eq!(ids, ["ok", "also-ok"]);
    assert_eq!(parsed.refused.len(), 1);
    assert_eq!(
        parsed.refused[0].reason,
        Reject::MessageIdTooLong {
            index: 2,
            limit: 100,
        }
    );
    let body = r#"{"batch":[{"type":"page","anonymousId":"a"},
                            {"type":"page","anonymousId":"a","messageId":7}]}"#;
    let parsed = batch(body).expect("accepted");
    assert_eq!(parsed.items.len(), 1);
    assert_eq!(
        parsed.refused[0].reason,
        Reject::InvalidMessageId { index: 1 }
    );
    assert!(parsed.refused[0].raw.contains(r#""messageId":7"#));
}

#[test]
fn batch_skips_bad_items_and_keeps_the_others() {
    let parsed = batch(
        r#"{"batch":[
            {"userId":"u1","event":"no type"},
            {"type":"foo","userId":"u1"},
            {"type":"delete","userId":"u1"},
            {"type":"TRACK","userId":"u1","event":"E"},
            {"type":5,"userId":"u1"},
            5, null, "x", [],
            {"type":"track","event":"E"},
            {"type":"track","userId":"u1"},
            {"type":"group","userId":"u1"},
            {"type":"alias","userId":"u1"},
            {"type":"track","userId":"u1","event":"E","messageId":"kept"}
        ]}"#,
    )
    .expect("accepted");
    let outcome: Vec<Result<String, Skip>> = parsed
        .items
        .into_iter()
        .map(|item| item.map(|event| event.message_id))
        .collect();
    assert_eq!(
        outcome,
        [
            Err(Skip::UnknownType),
            Err(Skip::UnknownType),
            Err(Skip::UnknownType),
            Err(Skip::UnknownType),
            Err(Skip::UnknownType),
            Err(Skip::NotAnObject),
            Err(Skip::NotAnObject),
            Err(Skip::NotAnObject),
            Err(Skip::NotAnObject),
            Err(Skip::NoUserOrAnonymousId),
            Err(Skip::MissingEvent),
            Err(Skip::MissingGroupId),
            Err(Skip::MissingPreviousId),
            Ok("kept".into()),
        ]
    );
}

#[test]
fn batch_generates_one_message_id_per_item_that_lacks_one() {
    let parsed = batch(
        r#"{"batch":[{"type":"page","anonymousId":"a"},
                     {"type":"page","anonymousId":"a","messageId":"own"},
                     {"type":"page","anonymousId":"a","messageId":""}]}"#,
    )
    .expect("accepted");
    let ids: Vec<String> = parsed
        .items
        .into_iter()
        .map(|item| item.expect("accepted").message_id)
        .collect();
    assert_eq!(ids, ["gen-1", "own", "gen-2"]);
}

#[test]
fn batch_context_and_integrations_are_merged_into_items_item_wins() {
    let parsed = batch(
        r#"{"batch":[
                {"type":"page","anonymousId":"a","messageId":"m1"},
                {"type":"page","anonymousId":"a","messageId":"m2",
                 "context":{"library":{"name":"item"},"ip":"1.2.3.4"},
                 "integrations":{"Mixpanel":false,"All":true}}
            ],
            "context":{"device":{"id":"d1"},"library":{"name":"batch","version":"1"}},
            "integrations":{"All":false,"Refiner":true}}"#,
    )
    .expect("accepted");
    let payloads: Vec<Value> = parsed
        .items
        .iter()
        .map(|item| payload(item.as_ref().expect("accepted")))
        .collect();
    assert_eq!(
        payloads[0]["context"],
        json!({"device":{"id":"d1"},"library":{"name":"batch","version":"1"}})
    );
    assert_eq!(
        payloads[0]["integrations"],
        json!({"All":false,"Refiner":true})
    );
    // Merging is per top-level key: the item's `library` replaces the batch's whole.
    assert_eq!(
        payloads[1]["context"],
        json!({"device":{"id":"d1"},"library":{"name":"item"},"ip":"1.2.3.4"})
    );
    assert_eq!(
        payloads[1]["integrations"],
        json!({"All":true,"Refiner":true,"Mixpanel":false})
    );
}

#[test]
fn integrations_select_the_destination_after_the_batch_merge() {
    let parsed = batch(
        r#"{"batch":[
                {"type":"page","anonymousId":"a","messageId":"batch-level-only"},
                {"type":"page","anonymousId":"a","messageId":"own-off",
                 "integrations":{"Refiner":false}},
                {"type":"page","anonymousId":"a","messageId":"own-on",
                 "integrations":{"All":false,"Webhooks":{"x":1}}},
                {"type":"page","anonymousId":"a","messageId":"not-an-object",
                 "integrations":[1]},
                {"type":"page","anonymousId":"a","messageId":"empty","integrations":{}},
                {"type":"page","anonymousId":"a","messageId":"repeated",
                 "integrations":{"Refiner":true,"Refiner":false}}
            ],
            "integrations":{"All":false}}"#,
    )
    .expect("accepted");
    let outcome: Vec<Result<String, Skip>> = parsed
        .items
        .into_iter()
        .map(|item| item.map(|event| event.message_id))
        .collect();
    assert_eq!(
        outcome,
        [
            Err(Skip::AllDisabled),
            Err(Skip::DestinationDisabled),
            Ok("own-on".into()),
            Err(Skip::AllDisabled),
            Err(Skip::AllDisabled),
            Err(Skip::DestinationDisabled),
        ]
    );
    // Without a batch-level object, an event's own decides; other names do not count.
    let names = Destinations::new(["Refiner".to_string()]);
    let body = r#"{"batch":[
            {"type":"track","userId":"u","event":"E","integrations":{"All":false,"Webhooks":true}},
            {"type":"track","userId":"u","event":"E","integrations":{"All":false,"Refiner":true}},
            {"type":"track","userId":"u","event":"E","integrations":{"Mixpanel":false}}]}"#;
    let parsed =
        parse_batch_for(body.as_bytes(), arrival(&Limits::default()), &names).expect("accepted");
    let skips: Vec<Option<Skip>> = parsed
        .items
        .iter()
        .map(|i| i.as_ref().err().copied())
        .collect();
    assert_eq!(skips, [Some(Skip::AllDisabled), None, None]);
    // Single events and webhooks are selected the same way.
    let single = br#"{"userId":"u","event":"E","integrations":{"Refiner":false}}"#;
    let parsed = parse_single(single, EventType::Track, arrival(&Limits::default())).expect("ok");
    assert_eq!(parsed.items, [Err(Skip::DestinationDisabled)]);
    let parsed = parse_webhook(
        br#"{"type":"identify","userId":"u","integrations":{"All":false,"Webhooks (Actions)":true}}"#,
        arrival(&Limits::default()),
    )
    .expect("ok");
    assert!(parsed.items[0].is_ok());
}

#[test]
fn batch_context_that_is_not_an_object_is_ignored() {
    let event = only_event(
        batch(
            r#"{"batch":[{"type":"page","anonymousId":"a","messageId":"m1"}],
                "context":"nope","integrations":[1]}"#,
        )
        .expect("accepted"),
    );
    let payload = payload(&event);
    assert_eq!(payload.get("context"), None);
    assert_eq!(payload.get("integrations"), None);
}

#[test]
fn batch_sent_at_wins_over_item_sent_at_and_is_propagated() {
    let parsed = batch(
        r#"{"sentAt":"2025-01-02T03:00:10.000Z","batch":[
                {"type":"track","userId":"u1","event":"E","messageId":"m1",
                 "timestamp":"2025-01-02T03:00:00.000Z","sentAt":"2025-01-02T03:00:00.000Z"},
                {"type":"track","userId":"u1","event":"E","messageId":"m2",
                 "timestamp":"2025-01-02T03:00:05.000Z"}
            ]}"#,
    )
    .expect("accepted");
    let payloads: Vec<Value> = parsed
        .items
        .iter()
        .map(|item| payload(item.as_ref().expect("accepted")))
        .collect();
    for payload in &payloads {
        assert_eq!(payload["sentAt"], "2025-01-02T03:00:10.000Z");
    }
    // Skew is measured against the batch's sentAt (10 s and 5 s before it).
    assert_eq!(payloads[0]["timestamp"], "2025-01-02T03:03:55.123Z");
    assert_eq!(payloads[1]["timestamp"], "2025-01-02T03:04:00.123Z");
}

#[test]
fn batch_sent_at_null_leaves_item_sent_at_in_charge() {
    let event = only_event(
        batch(
            r#"{"sentAt":null,"batch":[
                {"type":"track","userId":"u1","event":"E","messageId":"m1",
                 "timestamp":"2025-01-02T03:00:00.000Z","sentAt":"2025-01-02T03:00:01.000Z"}]}"#,
        )
        .expect("accepted"),
    );
    let payload = payload(&event);
    assert_eq!(payload["sentAt"], "2025-01-02T03:00:01.000Z");
    assert_eq!(payload["timestamp"], "2025-01-02T03:04:04.123Z");
}

#[test]
fn batch_context_traits_email_identifies_items() {
    let event = only_event(
        batch(
            r#"{"context":{"traits":{"email":"b@x.io"}},
                "batch":[{"type":"page","anonymousId":"a","messageId":"m1"}]}"#,
        )
        .expect("accepted"),
    );
    assert_eq!(event.user_key, UserKey::email("b@x.io"));
}

// ---------------------------------------------------------------------------------------
// Clock skew (conformance cases 23-26)
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// user_key
// ---------------------------------------------------------------------------------------

#[test]
fn user_key_prefers_user_id() {
    let event = object(json!({
        "userId": "u1",
        "anonymousId": "a1",
        "traits": {"email": "t@x.io"},
        "context": {"traits": {"email": "c@x.io"}},
    }));
    for kind in EventType::ALL {
        assert_eq!(
            user_key(&event, kind),
            Some(UserKey::user_id("u1")),
            "{kind:?}"
        );
    }
}

#[test]
fn user_key_takes_email_from_identify_traits_then_context_traits() {
    let both = object(json!({
        "anonymousId": "a1",
        "traits": {"email": "t@x.io"},
        "context": {"traits": {"email": "c@x.io"}},
    }));
    assert_eq!(
        user_key(&both, EventType::Identify),
        Some(UserKey::email("t@x.io"))
    );
    let context_only = object(json!({
        "anonymousId": "a1",
        "context": {"traits": {"email": "c@x.io"}},
    }));
    assert_eq!(
        user_key(&context_only, EventType::Identify),
        Some(UserKey::email("c@x.io"))
    );
    // A blank traits.email does not hide the context's.
    let blank = object(json!({
        "anonymousId": "a1",
        "traits": {"email": "  "},
        "context": {"traits": {"email": "c@x.io"}},
    }));
    assert_eq!(
        user_key(&blank, EventType::Identify),
        Some(UserKey::email("c@x.io"))
    );
    let padded = object(json!({"traits": {"email": " t@x.io\n"}}));
    assert_eq!(
        user_key(&padded, EventType::Identify),
        Some(UserKey::email("t@x.io"))
    );
}

#[test]
fn user_key_ignores_traits_email_outside_identify() {
    let event = object(json!({"anonymousId": "a1", "traits": {"email": "group@x.io"}}));
    for kind in [
        EventType::Group,
        EventType::Track,
        EventType::Page,
        EventType::Screen,
        EventType::Alias,
    ] {
        assert_eq!(
            user_key(&event, kind),
            Some(UserKey::anonymous("a1")),
            "{kind:?}"
        );
    }
    let with_context = object(json!({
        "anonymousId": "a1",
        "traits": {"email": "group@x.io"},
        "context": {"traits": {"email": "member@x.io"}},
    }));
    assert_eq!(
        user_key(&with_context, EventType::Group),
        Some(UserKey::email("member@x.io"))
    );
    assert_eq!(
        user_key(&with_context, EventType::Track),
        Some(UserKey::email("member@x.io"))
    );
}

#[test]
fn user_key_falls_back_to_anonymous_id_or_nothing() {
    let anonymous = object(json!({"anonymousId": "a1", "traits": {"email": 5}}));
    assert_eq!(
        user_key(&anonymous, EventType::Identify),
        Some(UserKey::anonymous("a1"))
    );
    assert_eq!(user_key(&Map::new(), EventType::Identify), None);
    let traits_not_object = object(json!({"traits": "t@x.io", "context": {"traits": []}}));
    assert_eq!(user_key(&traits_not_object, EventType::Identify), None);
}

#[test]
fn user_key_through_parsing() {
    let identify = only_event(
        single(
            r#"{"anonymousId":"a1","traits":{"email":"t@x.io"}}"#,
            EventType::Identify,
        )
        .expect("accepted"),
    );
    assert_eq!(identify.user_key, UserKey::email("t@x.io"));
    let group = only_event(
        single(
            r#"{"anonymousId":"a1","groupId":"g1","traits":{"email":"g@x.io"}}"#,
            EventType::Group,
        )
        .expect("accepted"),
    );
    assert_eq!(group.user_key, UserKey::anonymous("a1"));
    let track = only_event(
        single(
            r#"{"anonymousId":"a1","event":"E","context":{"traits":{"email":"c@x.io"}}}"#,
            EventType::Track,
        )
        .expect("accepted"),
    );
    assert_eq!(track.user_key, UserKey::email("c@x.io"));
}

// ---------------------------------------------------------------------------------------
// parse_webhook and first_array_element
// ---------------------------------------------------------------------------------------

#[test]
fn webhook_single_event_is_accepted_with_its_type() {
    let parsed = webhook(
        r#"{"type":"identify","userId":"u1","messageId":"m1","writeKey":"WK",
            "traits":{"plan":"pro"}}"#,
    )
    .expect("accepted");
    assert_eq!(parsed.write_key.as_deref(), Some("WK"));
    let event = only_event(parsed);
    assert_eq!(event.kind, EventType::Identify);
    assert_eq!(event.user_key, UserKey::user_id("u1"));
    assert_eq!(
        payload(&event),
        json!({
            "type": "identify",
            "userId": "u1",
            "messageId": "m1",
            "traits": {"plan": "pro"},
            "timestamp": RECEIVED,
            "receivedAt": RECEIVED,
        })
    );
}

#[test]
fn delete_is_accepted_only_on_webhooks() {
    let event = only_event(
        webhook(r#"{"type":"delete","userId":"u1","messageId":"d1"}"#).expect("accepted"),
    );
    assert_eq!(event.kind, EventType::Delete);
    assert_eq!(event.user_key, UserKey::user_id("u1"));
    assert_eq!(payload(&event)["type"], "delete");

    let parsed =
        webhook(r#"[{"type":"delete","userId":"u1","messageId":"d1"}]"#).expect("accepted");
    assert_eq!(only_event(parsed).kind, EventType::Delete);

    let parsed =
        batch(r#"{"batch":[{"type":"delete","userId":"u1","messageId":"d1"}]}"#).expect("accepted");
    assert_eq!(only_skip(parsed), Skip::UnknownType);

    assert_eq!(EventType::from_path("delete"), None);
}

#[test]
fn delete_needs_a_user_id() {
    let parsed = webhook(r#"{"type":"delete","anonymousId":"a1"}"#).expect("accepted");
    assert_eq!(only_skip(parsed), Skip::NoUserOrAnonymousId);
}

#[test]
fn webhook_single_event_needs_a_known_type() {
    for body in [
        r#"{"userId":"u1","event":"E"}"#,
        r#"{"type":"foo","userId":"u1"}"#,
        r#"{"type":null,"userId":"u1"}"#,
    ] {
        assert_eq!(
            only_skip(webhook(body).expect("accepted")),
            Skip::UnknownType,
            "{body}"
        );
    }
}

#[test]
fn webhook_array_is_parsed_item_by_item() {
    let parsed = webhook(
        " \n[{\"type\":\"track\",\"userId\":\"u1\",\"event\":\"E\",\"messageId\":\"m1\",\"writeKey\":\"WK\"},
           {\"type\":\"page\",\"anonymousId\":\"a2\",\"messageId\":\"m2\"},
           7,
           {\"type\":\"group\",\"userId\":\"u1\"}]",
    )
    .expect("accepted");
    assert_eq!(parsed.write_key, None, "arrays carry no request writeKey");
    let mut items = parsed.items.into_iter();
    let first = items.next().expect("item 0").expect("accepted");
    assert_eq!(
        (
            first.kind,
            first.message_id.as_str(),
            first.user_key.clone()
        ),
        (EventType::Track, "m1", UserKey::user_id("u1"))
    );
    assert_eq!(payload(&first).get("writeKey"), None);
    let second = items.next().expect("item 1").expect("accepted");
    assert_eq!(
        (
            second.kind,
            second.message_id.as_str(),
            second.user_key.clone()
        ),
        (EventType::Page, "m2", UserKey::anonymous("a2"))
    );
    assert_eq!(items.next(), Some(Err(Skip::NotAnObject)));
    assert_eq!(items.next(), Some(Err(Skip::MissingGroupId)));
    assert_eq!(items.next(), None);
}

#[test]
fn webhook_array_items_use_their_own_sent_at() {
    let parsed = webhook(
        r#"[{"type":"track","userId":"u1","event":"E","messageId":"m1",
             "timestamp":"2025-01-02T03:00:00.000Z","sentAt":"2025-01-02T03:00:02.000Z"},
            {"type":"track","userId":"u1","event":"E","messageId":"m2",
             "timestamp":"2025-01-02T03:00:00.000Z"}]"#,
    )
    .expect("accepted");
    let payloads: Vec<Value> = parsed
        .items
        .iter()
        .map(|item| payload(item.as_ref().expect("accepted")))
        .collect();
    assert_eq!(payloads[0]["timestamp"], "2025-01-02T03:04:03.123Z");
    assert_eq!(payloads[1]["timestamp"], "2025-01-02T03:00:00.000Z");
    assert_eq!(payloads[1].get("sentAt"), None);
}

#[test]
fn webhook_rejections() {
    for body in ["", "{", "[", r#"[{"type":"track"},"#, r#"[{"a":1}] x"#] {
        match webhook(body) {
            Err(Reject::InvalidJson(_)) => {}
            other => panic!("body {body:?}: expected InvalidJson, got {other:?}"),
        }
    }
    for body in [r#""x""#, "5", "null"] {
        assert_eq!(webhook(body), Err(Reject::NotAnObject), "body {body:?}");
    }
    let long = "m".repeat(101);
    let body = format!(
        r#"[{{"type":"page","anonymousId":"a"}},{{"type":"page","anonymousId":"a","messageId":"{long}"}}]"#
    );
    let parsed = webhook(&body).expect("the valid event is accepted");
    assert_eq!(parsed.items.len(), 1);
    assert_eq!(
        parsed.refused[0].reason,
        Reject::MessageIdTooLong {
            index: 1,
            limit: 100,
        }
    );
    assert_eq!(
        webhook(r#"{"type":"page","anonymousId":"a","messageId":false}"#),
        Err(Reject::InvalidMessageId { index: 0 })
    );
}

#[test]
fn webhook_array_limits() {
    let item = r#"{"type":"page","anonymousId":"a"}"#;
    let limits = Limits {
        max_webhook_events: 2,
        max_event_bytes: item.len(),
        ..Limits::default()
    };
    let three = format!("[{item},{item},{item}]");
    assert_eq!(
        parse_webhook(three.as_bytes(), arrival(&limits)),
        Err(Reject::TooManyEvents { count: 3, limit: 2 })
    );
    let two = format!("[{item},{item}]");
    let parsed = parse_webhook(two.as_bytes(), arrival(&limits)).expect("accepted");
    assert_eq!(parsed.items.len(), 2);

    let big = r#"{"type":"page","anonymousId":"ab"}"#;
    let oversized = format!("[{item},{big}]");
    let parsed = parse_webhook(oversized.as_bytes(), arrival(&limits)).expect("accepted");
    assert_eq!(parsed.items.len(), 1);
    assert_eq!(
        parsed.refused[0].reason,
        Reject::EventTooLarge {
            index: 1,
            size: big.len(),
            limit: item.len(),
        }
    );
    assert_eq!(
        parse_webhook(big.as_bytes(), arrival(&limits)),
        Err(Reject::EventTooLarge {
            index: 0,
            size: big.len(),
            limit: item.len(),
        })
    );
}

#[test]
fn first_array_element_is_the_exact_raw_bytes() {
    let body = b" \r\n[ \n {\"b\": 2 ,  \"a\":1, \"s\":\"x\\\"]y\"}\t, {\"c\":3}]";
    assert_eq!(
        first_array_element(body),
        Some(&b"{\"b\": 2 ,  \"a\":1, \"s\":\"x\\\"]y\"}"[..])
    );
    assert_eq!(first_array_element(b"[1, 2]"), Some(&b"1"[..]));
    assert_eq!(
        first_array_element("[\"é\"]".as_bytes()),
        Some("\"é\"".as_bytes())
    );
}

#[test]
fn first_array_element_is_none_unless_a_non_empty_array() {
    for body in [
        &b""[..],
        b"[]",
        b" [ ] ",
        b"{\"a\":[1]}",
        b"\"[1]\"",
        b"[{\"a\":1},",
        b"[1] x",
    ] {
        assert_eq!(
            first_array_element(body),
            None,
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn all_types_are_indexed_by_their_discriminant() {
    for (index, kind) in EventType::ALL.iter().enumerate() {
        assert_eq!(*kind as usize, index, "{kind:?}");
    }
}
