//! Tests of `parse_batch`: items, limits, refusals and the batch-level merge.

use super::*;

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
