use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::*;

fn defaults() -> MappingOptions {
    MappingOptions::default()
}

fn with_page_mode(page_mode: PageMode) -> MappingOptions {
    MappingOptions {
        page_mode,
        ..MappingOptions::default()
    }
}

/// Maps with the given options and renders the call; panics (fails the test) when the event
/// is not a call.
fn request_with(
    kind: EventType,
    payload: Value,
    options: &MappingOptions,
) -> (RefinerRequest, Notes) {
    match map_event(kind, &payload, options) {
        Mapped::Call(call, notes) => (call.to_request(), notes),
        other => panic!("expected a call, got {other:?}"),
    }
}

fn request(kind: EventType, payload: Value) -> RefinerRequest {
    request_with(kind, payload, &defaults()).0
}

/// The body of an identify with these traits for user `u1`.
fn identify_body(traits: Value) -> Value {
    request(
        EventType::Identify,
        json!({"userId": "u1", "traits": traits}),
    )
    .body
}

fn not_forwarded(kind: EventType, payload: Value, options: &MappingOptions) -> NotForwardedReason {
    match map_event(kind, &payload, options) {
        Mapped::NotForwarded(reason) => reason,
        other => panic!("expected not forwarded, got {other:?}"),
    }
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

// ---------------------------------------------------------------------------------------
// Mapping rows: exact requests.

#[test]
fn identify_becomes_identify_user_with_id_email_and_traits() {
    let payload = json!({
        "type": "identify",
        "messageId": "m1",
        "userId": "u1",
        "anonymousId": "a1",
        "traits": {
            "email": "jane@example.com",
            "plan": "pro",
            "createdAt": "2024-05-01T10:00:00.000Z",
            "firstName": "Jane",
            "lastName": "Doe",
            "logins": 42,
            "verified": true,
            "address": {"city": "Paris", "postalCode": "75001"},
        },
        "context": {"ip": "203.0.113.9"},
        "timestamp": "2024-05-01T10:00:00.000Z",
    });
    let (request, notes) = request_with(EventType::Identify, payload, &defaults());
    assert_eq!(request.method, HttpMethod::Post);
    assert_eq!(request.path, "/identify-user");
    assert_eq!(
        request.body,
        json!({
            "id": "u1",
            "email": "jane@example.com",
            "plan": "pro",
            "created_at": "2024-05-01T10:00:00.000Z",
            "first_name": "Jane",
            "last_name": "Doe",
            "logins": 42,
            "verified": true,
            "address_city": "Paris",
            "address_postal_code": "75001",
        })
    );
    assert_eq!(notes, Notes::default());
}

#[test]
fn identify_without_traits_sends_the_id_only() {
    assert_eq!(
        request(EventType::Identify, json!({"userId": "u1"})).body,
        json!({"id": "u1"})
    );
    assert_eq!(
        request(
            EventType::Identify,
            json!({"userId": "u1", "traits": "nope"})
        )
        .body,
        json!({"id": "u1"})
    );
}

#[test]
fn identify_of_an_email_only_user_is_sent_by_email() {
    let body = request(
        EventType::Identify,
        json!({"anonymousId": "a1", "traits": {"email": " jane@example.com ", "plan": "pro"}}),
    )
    .body;
    assert_eq!(body, json!({"email": "jane@example.com", "plan": "pro"}));
}

#[test]
fn identify_takes_the_email_from_context_traits_when_traits_lack_it() {
    let body = request(
        EventType::Identify,
        json!({
            "userId": "u1",
            "traits": {"plan": "pro"},
            "context": {"traits": {"email": "ctx@example.com", "plan": "overridden"}},
        }),
    )
    .body;
    assert_eq!(
        body,
        json!({"id": "u1", "email": "ctx@example.com", "plan": "pro"})
    );
}

#[test]
fn identify_traits_only_in_context_traits_are_sent() {
    // rudder-sdk-python's identify: traits in context.traits, none at the root.
    for root in [json!({}), json!(null), json!("nope")] {
        let body = request(
            EventType::Identify,
            json!({
                "userId": "u1",
                "traits": root,
                "context": {"traits": {"email": "r@example.com", "plan": "pro",
                                        "createdAt": "2024-05-01T10:00:00Z"}},
            }),
        )
        .body;
        assert_eq!(
            body,
            json!({"id": "u1", "email": "r@example.com", "plan": "pro",
                   "created_at": "2024-05-01T10:00:00Z"})
        );
    }
    let body = request(
        EventType::Identify,
        json!({"userId": "u1", "context": {"traits": {"plan": "pro"}}}),
    )
    .body;
    assert_eq!(body, json!({"id": "u1", "plan": "pro"}));
}

#[test]
fn identify_root_traits_win_per_key_over_context_traits_even_with_null() {
    let body = request(
        EventType::Identify,
        json!({
            "userId": "u1",
            "traits": {"plan": "pro", "seats": null},
            "context": {"traits": {"plan": "free", "seats": 3, "company": {"name": "Initech"}}},
        }),
    )
    .body;
    assert_eq!(
        body,
        json!({"id": "u1", "plan": "pro", "company_name": "Initech"})
    );
}

#[test]
fn context_traits_are_not_sent_on_group_track_or_ping() {
    let context = json!({"traits": {"email": "u@example.com", "plan": "pro"}});
    let body = request(
        EventType::Group,
        json!({"userId": "u1", "groupId": "g1", "traits": {"name": "I"}, "context": context}),
    )
    .body;
    assert_eq!(
        body,
        json!({"id": "u1", "email": "u@example.com", "account": {"id": "g1", "name": "I"}})
    );
    let body = request(
        EventType::Track,
        json!({"userId": "u1", "event": "E", "context": context}),
    )
    .body;
    assert_eq!(body, json!({"id": "u1", "event": "E"}));
}

#[test]
fn identify_traits_email_wins_over_context_traits_email() {
    let body = request(
        EventType::Identify,
        json!({
            "userId": "u1",
            "traits": {"email": "own@example.com"},
            "context": {"traits": {"email": "ctx@example.com"}},
        }),
    )
    .body;
    assert_eq!(body, json!({"id": "u1", "email": "own@example.com"}));
}

#[test]
fn a_non_string_or_blank_traits_email_is_neither_identity_nor_trait() {
    assert_eq!(identify_body(json!({"email": 42})), json!({"id": "u1"}));
    assert_eq!(identify_body(json!({"email": "  "})), json!({"id": "u1"}));
    assert_eq!(
        not_forwarded(
            EventType::Identify,
            json!({"anonymousId": "a1", "traits": {"email": ""}}),
            &defaults()
        ),
        NotForwardedReason::Unidentifiable
    );
}

#[test]
fn anonymous_only_events_are_unidentifiable() {
    let anonymous = json!({
        "anonymousId": "a1",
        "event": "Signed Up",
        "groupId": "g1",
        "name": "Home",
        "traits": {"plan": "pro"},
    });
    for kind in [
        EventType::Identify,
        EventType::Group,
        EventType::Track,
        EventType::Page,
        EventType::Screen,
        EventType::Delete,
    ] {
        assert_eq!(
            not_forwarded(kind, anonymous.clone(), &defaults()),
            NotForwardedReason::Unidentifiable,
            "{kind:?}"
        );
    }
}

#[test]
fn numeric_user_id_is_sent_as_a_string() {
    assert_eq!(
        request(EventType::Identify, json!({"userId": 123})).body,
        json!({"id": "123"})
    );
}

#[test]
fn group_becomes_identify_user_with_an_account() {
    let payload = json!({
        "type": "group",
        "userId": "u1",
        "groupId": "g1",
        "traits": {
            "name": "Initech",
            "industry": "Technology",
            "employees": 329,
            "email": "billing@initech.example",
            "createdAt": "2020-01-01",
            "id": "not-the-group-id",
            "total billed": 830,
        },
    });
    let request = request(EventType::Group, payload);
    assert_eq!(request.method, HttpMethod::Post);
    assert_eq!(request.path, "/identify-user");
    assert_eq!(
        request.body,
        json!({
            "id": "u1",
            "account": {
                "id": "g1",
                "name": "Initech",
                "industry": "Technology",
                "employees": 329,
                "email": "billing@initech.example",
                "created_at": "2020-01-01",
                "total billed": 830,
            },
        })
    );
}

#[test]
fn group_traits_email_is_not_the_users_email() {
    // A group's traits describe the group: its email identifies nobody.
    assert_eq!(
        not_forwarded(
            EventType::Group,
            json!({"anonymousId": "a1", "groupId": "g1", "traits": {"email": "g@example.com"}}),
            &defaults()
        ),
        NotForwardedReason::Unidentifiable
    );
    // context.traits.email is the user's.
    let body = request(
        EventType::Group,
        json!({
            "anonymousId": "a1",
            "groupId": "g1",
            "traits": {"email": "g@example.com"},
            "context": {"traits": {"email": "jane@example.com"}},
        }),
    )
    .body;
    assert_eq!(
        body,
        json!({"email": "jane@example.com", "account": {"id": "g1", "email": "g@example.com"}})
    );
}

#[test]
fn group_without_a_group_id_is_not_forwarded_and_a_numeric_one_is_a_string() {
    for payload in [
        json!({"userId": "u1"}),
        json!({"userId": "u1", "groupId": ""}),
        json!({"userId": "u1", "groupId": null}),
    ] {
        assert_eq!(
            not_forwarded(EventType::Group, payload, &defaults()),
            NotForwardedReason::MissingGroupId
        );
    }
    assert_eq!(
        request(EventType::Group, json!({"userId": "u1", "groupId": 7})).body,
        json!({"id": "u1", "account": {"id": "7"}})
    );
}

#[test]
fn track_becomes_track_event_and_drops_properties() {
    let request = request(
        EventType::Track,
        json!({
            "userId": "u1",
            "event": "Signed Up",
            "properties": {"plan": "pro", "revenue": 10},
            "context": {"traits": {"email": "jane@example.com"}},
        }),
    );
    assert_eq!(request.method, HttpMethod::Post);
    assert_eq!(request.path, "/track-event");
    assert_eq!(request.body, json!({"id": "u1", "event": "Signed Up"}));
}

#[test]
fn track_of_an_email_only_user_uses_context_traits_email() {
    let body = request(
        EventType::Track,
        json!({
            "anonymousId": "a1",
            "event": "Signed Up",
            "context": {"traits": {"email": "jane@example.com"}},
        }),
    )
    .body;
    assert_eq!(
        body,
        json!({"email": "jane@example.com", "event": "Signed Up"})
    );
}

#[test]
fn track_email_in_traits_does_not_identify() {
    // Only an identify's own traits describe the user.
    assert_eq!(
        not_forwarded(
            EventType::Track,
            json!({"anonymousId": "a1", "event": "E", "traits": {"email": "x@example.com"}}),
            &defaults()
        ),
        NotForwardedReason::Unidentifiable
    );
}

#[test]
fn track_without_an_event_name_is_not_forwarded() {
    for payload in [
        json!({"userId": "u1"}),
        json!({"userId": "u1", "event": ""}),
        json!({"userId": "u1", "event": 5}),
    ] {
        assert_eq!(
            not_forwarded(EventType::Track, payload, &defaults()),
            NotForwardedReason::MissingEvent
        );
    }
}

#[test]
fn page_and_screen_are_pings_by_default() {
    let payload = json!({
        "userId": "u1",
        "name": "Home",
        "context": {"traits": {"email": "jane@example.com"}},
    });
    for kind in [EventType::Page, EventType::Screen] {
        assert_eq!(
            map_event(kind, &payload, &defaults()),
            Mapped::Ping(UserRef::Id {
                id: "u1".into(),
                email: Some("jane@example.com".into()),
            })
        );
    }
    let ping = RefinerCall::ping(UserRef::id("u1")).to_request();
    assert_eq!(ping.method, HttpMethod::Post);
    assert_eq!(ping.path, "/identify-user");
    assert_eq!(ping.body, json!({"id": "u1"}));
}

#[test]
fn page_and_screen_as_track_events_are_named_after_the_view() {
    let options = with_page_mode(PageMode::TrackEvent);
    let cases = [
        (EventType::Page, json!({"name": "Home"}), "Viewed Home Page"),
        (
            EventType::Page,
            json!({"name": "  Home "}),
            "Viewed Home Page",
        ),
        (EventType::Page, json!({}), "Viewed Page"),
        (EventType::Page, json!({"name": ""}), "Viewed Page"),
        (EventType::Page, json!({"name": 3}), "Viewed Page"),
        (
            EventType::Page,
            json!({"properties": {"name": "Pricing"}}),
            "Viewed Pricing Page",
        ),
        (
            EventType::Page,
            json!({"name": "Docs", "category": "Help", "properties": {"name": "Other"}}),
            "Viewed Docs Page",
        ),
        (
            EventType::Screen,
            json!({"name": "Settings"}),
            "Viewed Settings Screen",
        ),
        (EventType::Screen, json!({}), "Viewed Screen"),
    ];
    for (kind, mut payload, expected) in cases {
        payload["userId"] = json!("u1");
        let (request, _) = request_with(kind, payload, &options);
        assert_eq!(request.path, "/track-event");
        assert_eq!(request.body, json!({"id": "u1", "event": expected}));
    }
}

#[test]
fn page_and_screen_are_dropped_when_page_mode_is_off() {
    let options = with_page_mode(PageMode::Off);
    for kind in [EventType::Page, EventType::Screen] {
        assert_eq!(
            not_forwarded(kind, json!({"userId": "u1", "name": "Home"}), &options),
            NotForwardedReason::PageOff
        );
    }
}

#[test]
fn alias_is_not_forwarded() {
    assert_eq!(
        not_forwarded(
            EventType::Alias,
            json!({"userId": "u1", "previousId": "a1"}),
            &defaults()
        ),
        NotForwardedReason::Alias
    );
}

#[test]
fn delete_becomes_delete_contact_by_user_id() {
    let request = request(
        EventType::Delete,
        json!({
            "type": "delete",
            "userId": "u1",
            "context": {"traits": {"email": "jane@example.com"}},
        }),
    );
    assert_eq!(request.method, HttpMethod::Delete);
    assert_eq!(request.path, "/contact");
    assert_eq!(request.body, json!({"id": "u1"}));
}

#[test]
fn delete_never_deletes_by_email() {
    assert_eq!(
        not_forwarded(
            EventType::Delete,
            json!({"context": {"traits": {"email": "jane@example.com"}}}),
            &defaults()
        ),
        NotForwardedReason::Unidentifiable
    );
}

#[test]
fn named_events_parse_the_type_and_unknown_names_are_not_forwarded() {
    let payload = json!({"userId": "u1", "event": "E"});
    assert_eq!(
        map_named_event("track", &payload, &defaults()),
        map_event(EventType::Track, &payload, &defaults())
    );
    assert!(matches!(
        map_named_event("delete", &payload, &defaults()),
        Mapped::Call(RefinerCall::DeleteContact { .. }, _)
    ));
    assert_eq!(
        map_named_event("purchase", &payload, &defaults()),
        Mapped::NotForwarded(NotForwardedReason::UnknownType)
    );
}

#[test]
fn the_kind_argument_decides_not_the_payload_type() {
    let payload = json!({"type": "identify", "userId": "u1", "event": "E"});
    assert_eq!(
        request(EventType::Track, payload).body,
        json!({"id": "u1", "event": "E"})
    );
}

#[test]
fn a_payload_that_is_not_an_object_is_not_forwarded() {
    for payload in [json!(null), json!([1, 2]), json!("identify"), json!(3)] {
        assert_eq!(
            not_forwarded(EventType::Identify, payload, &defaults()),
            NotForwardedReason::InvalidPayload
        );
    }
}

// Calls for the coalescing tests and properties.

fn identify(user: &str, traits: Value) -> RefinerCall {
    RefinerCall::IdentifyUser {
        user: UserRef::id(user),
        traits: object(traits),
        account: None,
    }
}

fn group(user: &str, account: Value) -> RefinerCall {
    RefinerCall::IdentifyUser {
        user: UserRef::id(user),
        traits: Map::new(),
        account: Some(object(account)),
    }
}

fn track(user: &str, event: &str) -> RefinerCall {
    RefinerCall::TrackEvent {
        user: UserRef::id(user),
        event: event.into(),
    }
}

fn delete(user: &str) -> RefinerCall {
    RefinerCall::DeleteContact {
        user: UserRef::id(user),
    }
}

fn keyed(calls: Vec<RefinerCall>) -> Vec<(u32, RefinerCall)> {
    (1..).zip(calls).collect()
}

mod coalescing;
mod properties;
mod traits;
