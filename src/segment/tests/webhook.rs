//! Tests of `parse_webhook` and `first_array_element`.

use super::*;

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
