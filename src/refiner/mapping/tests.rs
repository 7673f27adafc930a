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

// ---------------------------------------------------------------------------------------
// Trait conversion.

#[test]
fn long_unicode_strings_are_cut_to_max_characters_not_bytes() {
    let long: String = "é🎉".repeat(200); // 400 characters, 1200 bytes
    let exact: String = "ü".repeat(255);
    let (request, notes) = request_with(
        EventType::Identify,
        json!({"userId": "u1", "traits": {"bio": long, "exact": exact}}),
        &defaults(),
    );
    let bio = request.body["bio"].as_str().unwrap_or_default();
    assert_eq!(bio.chars().count(), 255);
    assert_eq!(bio, "é🎉".repeat(128).chars().take(255).collect::<String>());
    assert_eq!(request.body["exact"], json!(exact));
    assert_eq!(notes.truncated, 1);
}

#[test]
fn max_string_len_is_configurable_and_cuts_are_counted_per_string() {
    let options = MappingOptions {
        max_string_len: 4,
        ..MappingOptions::default()
    };
    let (request, notes) = request_with(
        EventType::Identify,
        json!({"userId": "a-long-user-id", "traits": {
            "email": "long-email@example.com",
            "a": "abcdef",
            "b": "abcd",
            "tags": ["x", "y", "z"],
        }}),
        &options,
    );
    assert_eq!(
        request.body,
        json!({
            "id": "a-long-user-id",
            "email": "long-email@example.com",
            "a": "abcd",
            "b": "abcd",
            "tags": "x, y",
        })
    );
    assert_eq!(notes.truncated, 2);

    let (request, notes) = request_with(
        EventType::Track,
        json!({"userId": "u1", "event": "Signed Up"}),
        &options,
    );
    assert_eq!(request.body, json!({"id": "u1", "event": "Sign"}));
    assert_eq!(notes.truncated, 1);

    let (request, notes) = request_with(
        EventType::Group,
        json!({"userId": "u1", "groupId": "group-1", "traits": {"name": "Initech"}}),
        &options,
    );
    assert_eq!(
        request.body,
        json!({"id": "u1", "account": {"id": "group-1", "name": "Init"}})
    );
    assert_eq!(notes.truncated, 1);
}

#[test]
fn page_event_names_are_cut_too() {
    let options = MappingOptions {
        page_mode: PageMode::TrackEvent,
        max_string_len: 10,
    };
    let (request, notes) = request_with(
        EventType::Page,
        json!({"userId": "u1", "name": "Home"}),
        &options,
    );
    assert_eq!(request.body, json!({"id": "u1", "event": "Viewed Hom"}));
    assert_eq!(notes.truncated, 1);
}

#[test]
fn nested_objects_are_flattened_recursively() {
    assert_eq!(
        identify_body(json!({
            "address": {"city": "Paris", "geo": {"lat": 48, "lng": 2}, "street": null},
            "company": {"name": "Initech", "createdAt": "2020-01-01", "plan": {}},
        })),
        json!({
            "id": "u1",
            "address_city": "Paris",
            "address_geo_lat": 48,
            "address_geo_lng": 2,
            "company_name": "Initech",
            "company_created_at": "2020-01-01",
        })
    );
}

#[test]
fn nesting_deeper_than_the_limit_is_dropped() {
    let mut deep = json!("bottom");
    for _ in 0..MAX_TRAIT_DEPTH {
        deep = json!({"n": deep});
    }
    // `deep` nests the string MAX_TRAIT_DEPTH objects down: at depth MAX_TRAIT_DEPTH + 1.
    let mut shallow = json!("kept");
    for _ in 0..MAX_TRAIT_DEPTH - 1 {
        shallow = json!({"n": shallow});
    }
    let body = identify_body(json!({"deep": deep, "shallow": shallow}));
    let kept_key = format!("shallow{}", "_n".repeat(MAX_TRAIT_DEPTH - 1));
    assert_eq!(body, json!({"id": "u1", kept_key: "kept"}));
}

#[test]
fn nulls_and_empty_keys_are_dropped() {
    assert_eq!(
        identify_body(json!({"gone": null, "": "x", "nested": {"": 1, "a": null}, "kept": ""})),
        json!({"id": "u1", "kept": ""})
    );
}

#[test]
fn arrays_become_one_string_of_their_scalars() {
    assert_eq!(
        identify_body(json!({
            "tags": ["a", "b"],
            "mixed": ["x", 1, 2.5, true, null, {"k": "v"}, ["nested"]],
            "empty": [],
            "nothing_scalar": [null, {}, []],
        })),
        json!({"id": "u1", "tags": "a, b", "mixed": "x, 1, 2.5, true"})
    );
}

#[test]
fn numbers_within_refiners_range_stay_numbers_and_larger_ones_become_strings() {
    assert_eq!(
        identify_body(json!({
            "zero": 0,
            "max": 2_147_483_647,
            "min": -2_147_483_647,
            "above": 2_147_483_648_i64,
            "below": -2_147_483_648_i64,
            "i64_min": i64::MIN,
            "u64_max": u64::MAX,
            "float": 4.5,
            "negative_float": -0.25,
            "huge_float": 1e30,
        })),
        json!({
            "id": "u1",
            "zero": 0,
            "max": 2_147_483_647,
            "min": -2_147_483_647,
            "above": "2147483648",
            "below": "-2147483648",
            "i64_min": "-9223372036854775808",
            "u64_max": "18446744073709551615",
            "float": 4.5,
            "negative_float": -0.25,
            "huge_float": "1e+30",
        })
    );
}

#[test]
fn booleans_are_kept() {
    assert_eq!(
        identify_body(json!({"ok": true, "no": false})),
        json!({"id": "u1", "ok": true, "no": false})
    );
}

#[test]
fn at_keys_are_sent_as_given_for_refiner_to_parse_as_dates() {
    assert_eq!(
        identify_body(json!({
            "upgraded_at": "2022-07-09 10:01:01",
            "trial_ends_at": "2024-06-01T00:00:00.000Z",
            "createdAt": "2020-08-20T14:48:00.000Z",
            "signup_at": 1_700_000_000,
            "upgradedAt": "2022-07-09",
        })),
        json!({
            "id": "u1",
            "upgraded_at": "2022-07-09 10:01:01",
            "trial_ends_at": "2024-06-01T00:00:00.000Z",
            "created_at": "2020-08-20T14:48:00.000Z",
            "signup_at": 1_700_000_000,
            // Only Segment's reserved traits are renamed.
            "upgradedAt": "2022-07-09",
        })
    );
}

#[test]
fn reserved_traits_are_renamed_and_the_rest_kept() {
    assert_eq!(
        identify_body(json!({
            "address": {"street": "1 Main St", "postalCode": "12345"},
            "age": 30,
            "avatar": "https://example.com/a.png",
            "birthday": "1990-01-01",
            "company": {"name": "Initech"},
            "createdAt": "2020-01-01",
            "description": "d",
            "firstName": "Jane",
            "gender": "f",
            "lastName": "Doe",
            "name": "Jane Doe",
            "phone": "+1 555",
            "title": "CTO",
            "username": "jdoe",
            "website": "https://example.com",
        })),
        json!({
            "id": "u1",
            "address_street": "1 Main St",
            "address_postal_code": "12345",
            "age": 30,
            "avatar": "https://example.com/a.png",
            "birthday": "1990-01-01",
            "company_name": "Initech",
            "created_at": "2020-01-01",
            "description": "d",
            "first_name": "Jane",
            "gender": "f",
            "last_name": "Doe",
            "name": "Jane Doe",
            "phone": "+1 555",
            "title": "CTO",
            "username": "jdoe",
            "website": "https://example.com",
        })
    );
}

#[test]
fn a_literal_key_wins_over_a_renamed_or_flattened_one() {
    assert_eq!(
        identify_body(json!({
            "createdAt": "renamed",
            "created_at": "literal",
            "address": {"city": "flattened"},
            "address_city": "literal city",
            "a": {"b_c": "first derived"},
            "a_b": {"c": "second derived"},
        })),
        json!({
            "id": "u1",
            "created_at": "literal",
            "address_city": "literal city",
            "a_b_c": "first derived",
        })
    );
}

#[test]
fn an_id_trait_never_overrides_the_user_id() {
    assert_eq!(
        identify_body(json!({"id": "other", "account": "acme", "plan": "pro"})),
        json!({"id": "u1", "plan": "pro"})
    );
    // Not for an email-only user either: `id` is not invented from traits.
    assert_eq!(
        request(
            EventType::Identify,
            json!({"anonymousId": "a1", "traits": {"email": "j@example.com", "id": "other"}})
        )
        .body,
        json!({"email": "j@example.com"})
    );
    // An `account` object in identify traits is flattened, not taken for a group.
    assert_eq!(
        identify_body(json!({"account": {"id": "acme"}})),
        json!({"id": "u1", "account_id": "acme"})
    );
}

#[test]
fn hand_built_calls_cannot_override_identity_fields() {
    let traits =
        object(json!({"id": "x", "email": "x@example.com", "account": "x", "plan": "pro"}));
    let by_id = RefinerCall::IdentifyUser {
        user: UserRef::id("u1"),
        traits: traits.clone(),
        account: None,
    };
    assert_eq!(by_id.to_request().body, json!({"id": "u1", "plan": "pro"}));
    let by_email = RefinerCall::IdentifyUser {
        user: UserRef::Email("j@example.com".into()),
        traits,
        account: Some(object(json!({"id": "g1"}))),
    };
    assert_eq!(
        by_email.to_request().body,
        json!({"email": "j@example.com", "plan": "pro", "account": {"id": "g1"}})
    );
}

#[test]
fn email_only_users_are_sent_by_email_in_every_call() {
    let user = UserRef::Email("j@example.com".into());
    let track = RefinerCall::TrackEvent {
        user: user.clone(),
        event: "E".into(),
    };
    assert_eq!(
        track.to_request().body,
        json!({"email": "j@example.com", "event": "E"})
    );
    let delete = RefinerCall::DeleteContact { user: user.clone() };
    assert_eq!(delete.to_request().body, json!({"email": "j@example.com"}));
    assert_eq!(
        RefinerCall::ping(user).to_request().body,
        json!({"email": "j@example.com"})
    );
}

#[test]
fn the_email_beside_an_id_goes_with_identify_user_only() {
    let user = UserRef::Id {
        id: "u1".into(),
        email: Some("j@example.com".into()),
    };
    assert_eq!(
        RefinerCall::ping(user.clone()).to_request().body,
        json!({"id": "u1", "email": "j@example.com"})
    );
    let track = RefinerCall::TrackEvent {
        user: user.clone(),
        event: "E".into(),
    };
    assert_eq!(track.to_request().body, json!({"id": "u1", "event": "E"}));
    let delete = RefinerCall::DeleteContact { user };
    assert_eq!(delete.to_request().body, json!({"id": "u1"}));
}

#[test]
fn labels_are_stable() {
    let labels: Vec<&str> = NotForwardedReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        labels,
        [
            "alias",
            "unidentifiable",
            "page_off",
            "missing_event",
            "missing_group_id",
            "unknown_type",
            "invalid_payload",
        ]
    );
    assert_eq!(
        [PageMode::Ping, PageMode::TrackEvent, PageMode::Off].map(PageMode::as_str),
        ["ping", "track_event", "off"]
    );
    assert_eq!(HttpMethod::Post.as_str(), "POST");
    assert_eq!(HttpMethod::Delete.as_str(), "DELETE");
    let user = UserRef::id("u1");
    assert_eq!(RefinerCall::ping(user.clone()).name(), "identify_user");
    let track = RefinerCall::TrackEvent {
        user: user.clone(),
        event: "E".into(),
    };
    assert_eq!(track.name(), "track_event");
    assert_eq!(RefinerCall::DeleteContact { user }.name(), "delete_contact");
}

#[test]
fn user_keys_match_the_spool_scheme() {
    let payload = json!({"userId": "u1", "traits": {"email": "j@example.com"}});
    let segment_key = crate::segment::user_key(&object(payload.clone()), EventType::Identify);
    let Mapped::Call(call, _) = map_event(EventType::Identify, &payload, &defaults()) else {
        panic!("expected a call");
    };
    assert_eq!(Some(call.user().key()), segment_key);
    assert_eq!(
        UserRef::Email("j@example.com".into()).key(),
        UserKey::email("j@example.com")
    );
}

#[test]
fn options_deserialize_with_defaults() {
    let options: MappingOptions = serde_json::from_value(json!({"page_mode": "track_event"}))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        options,
        MappingOptions {
            page_mode: PageMode::TrackEvent,
            max_string_len: 255,
        }
    );
    let empty: MappingOptions = serde_json::from_value(json!({})).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(empty, MappingOptions::default());
    assert_eq!(empty.page_mode, PageMode::Ping);
    assert!(serde_json::from_value::<MappingOptions>(json!({"page_mod": "off"})).is_err());
}

// ---------------------------------------------------------------------------------------
// Coalescing.

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

#[test]
fn coalesce_merges_a_users_consecutive_identify_group_and_ping() {
    let out = coalesce(keyed(vec![
        identify("u1", json!({"plan": "free", "seats": 1})),
        group("u1", json!({"id": "g1", "name": "Initech"})),
        RefinerCall::ping(UserRef::id("u1")),
        identify("u1", json!({"plan": "pro"})),
    ]));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, vec![1, 2, 3, 4]);
    assert_eq!(
        out[0].1.to_request().body,
        json!({
            "id": "u1",
            "plan": "pro",
            "seats": 1,
            "account": {"id": "g1", "name": "Initech"},
        })
    );
}

#[test]
fn coalesce_never_merges_tracks_and_a_track_ends_the_run() {
    let out = coalesce(keyed(vec![
        identify("u1", json!({"a": 1})),
        track("u1", "E"),
        track("u1", "E"),
        identify("u1", json!({"b": 2})),
        identify("u1", json!({"c": 3})),
    ]));
    let keys: Vec<Vec<u32>> = out.iter().map(|(keys, _)| keys.clone()).collect();
    assert_eq!(keys, vec![vec![1], vec![2], vec![3], vec![4, 5]]);
    assert_eq!(out[0].1, identify("u1", json!({"a": 1})));
    assert_eq!(out[1].1, track("u1", "E"));
    assert_eq!(out[2].1, track("u1", "E"));
    assert_eq!(out[3].1, identify("u1", json!({"b": 2, "c": 3})));
}

#[test]
fn coalesce_a_delete_ends_the_run() {
    let out = coalesce(keyed(vec![
        identify("u1", json!({"a": 1})),
        delete("u1"),
        identify("u1", json!({"b": 2})),
    ]));
    assert_eq!(
        out,
        vec![
            (vec![1], identify("u1", json!({"a": 1}))),
            (vec![2], delete("u1")),
            (vec![3], identify("u1", json!({"b": 2}))),
        ]
    );
}

#[test]
fn coalesce_places_a_merged_call_at_its_last_event_across_other_users() {
    let out = coalesce(keyed(vec![
        identify("u1", json!({"a": 1})), // 1
        track("u2", "E"),                // 2
        identify("u2", json!({"x": 1})), // 3
        identify("u1", json!({"b": 2})), // 4
        track("u1", "F"),                // 5
        identify("u2", json!({"y": 2})), // 6
        identify("u1", json!({"c": 3})), // 7
    ]));
    assert_eq!(
        out,
        vec![
            (vec![2], track("u2", "E")),
            (vec![1, 4], identify("u1", json!({"a": 1, "b": 2}))),
            (vec![5], track("u1", "F")),
            (vec![3, 6], identify("u2", json!({"x": 1, "y": 2}))),
            (vec![7], identify("u1", json!({"c": 3}))),
        ]
    );
}

#[test]
fn coalesce_merges_accounts_with_the_same_id_and_splits_on_a_different_one() {
    let out = coalesce(keyed(vec![
        group("u1", json!({"id": "g1", "name": "Old", "plan": "free"})),
        identify("u1", json!({"a": 1})),
        group("u1", json!({"id": "g1", "name": "New"})),
        group("u1", json!({"id": "g2", "name": "Other"})),
        identify("u1", json!({"b": 2})),
    ]));
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].0, vec![1, 2, 3]);
    assert_eq!(
        out[0].1.to_request().body,
        json!({"id": "u1", "a": 1, "account": {"id": "g1", "name": "New", "plan": "free"}})
    );
    assert_eq!(out[1].0, vec![4, 5]);
    assert_eq!(
        out[1].1.to_request().body,
        json!({"id": "u1", "b": 2, "account": {"id": "g2", "name": "Other"}})
    );
}

#[test]
fn coalesce_keeps_the_latest_known_email_and_separates_id_from_email_users() {
    let with_email = |email: Option<&str>| RefinerCall::IdentifyUser {
        user: UserRef::Id {
            id: "u1".into(),
            email: email.map(str::to_string),
        },
        traits: Map::new(),
        account: None,
    };
    let out = coalesce(keyed(vec![
        with_email(Some("old@example.com")),
        with_email(Some("new@example.com")),
        with_email(None),
        RefinerCall::ping(UserRef::Email("new@example.com".into())),
    ]));
    assert_eq!(
        out,
        vec![
            (vec![1, 2, 3], with_email(Some("new@example.com"))),
            (
                vec![4],
                RefinerCall::ping(UserRef::Email("new@example.com".into()))
            ),
        ]
    );
}

#[test]
fn coalesce_of_nothing_is_nothing() {
    assert!(coalesce::<u32>(Vec::new()).is_empty());
}

// ---------------------------------------------------------------------------------------
// Properties.

fn arb_key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("email".to_string()),
        Just("id".to_string()),
        Just("account".to_string()),
        Just("createdAt".to_string()),
        Just("created_at".to_string()),
        Just("address".to_string()),
        Just("name".to_string()),
        Just(String::new()),
        "[a-zA-Z_]{1,10}",
        ".{0,6}",
    ]
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        ".{0,300}".prop_map(Value::String),
        "[a-z@.]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((arb_key(), inner), 0..6)
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

/// Event-shaped payloads: the fields the mapping reads, each absent or arbitrary.
fn arb_payload() -> impl Strategy<Value = Value> {
    let field = |name: &'static str| {
        prop::option::of(prop_oneof![
            arb_json(),
            "[a-z0-9@.]{0,8}".prop_map(Value::String),
        ])
        .prop_map(move |value| (name, value))
    };
    prop_oneof![
        arb_json(),
        (
            field("userId"),
            field("anonymousId"),
            field("traits"),
            field("context"),
            field("event"),
            field("groupId"),
            field("name"),
            field("properties"),
        )
            .prop_map(|(a, b, c, d, e, f, g, h)| {
                let mut event = Map::new();
                for (name, value) in [a, b, c, d, e, f, g, h] {
                    if let Some(value) = value {
                        event.insert(name.to_string(), value);
                    }
                }
                Value::Object(event)
            }),
    ]
}

fn arb_kind() -> impl Strategy<Value = EventType> {
    prop::sample::select(EventType::ALL.to_vec())
}

fn arb_page_mode() -> impl Strategy<Value = PageMode> {
    prop::sample::select(vec![PageMode::Ping, PageMode::TrackEvent, PageMode::Off])
}

/// Every string value in a body that is not an identity (`id`, `email`, `account.id`).
fn non_identity_strings(body: &Value) -> Vec<String> {
    fn walk(value: &Value, top: bool, out: &mut Vec<String>) {
        if let Value::Object(fields) = value {
            for (key, value) in fields {
                let identity = key == "id" || (top && key == "email");
                match value {
                    Value::String(s) if !identity => out.push(s.clone()),
                    Value::Object(_) if top && key == "account" => walk(value, false, out),
                    _ => {}
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(body, true, &mut out);
    out
}

fn count_strings(value: &Value) -> usize {
    match value {
        Value::String(_) => 1,
        Value::Object(fields) => fields.values().map(count_strings).sum(),
        _ => 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn map_event_never_panics_and_respects_max_string_len(
        kind in arb_kind(),
        payload in arb_payload(),
        page_mode in arb_page_mode(),
        max_string_len in 0usize..300,
    ) {
        let options = MappingOptions { page_mode, max_string_len };
        match map_event(kind, &payload, &options) {
            Mapped::Call(call, notes) => {
                let request = call.to_request();
                let strings = non_identity_strings(&request.body);
                for s in &strings {
                    prop_assert!(s.chars().count() <= max_string_len, "{s:?} is too long");
                }
                prop_assert!(notes.truncated <= count_strings(&request.body));
                match call.user() {
                    UserRef::Id { id, .. } => prop_assert!(!id.is_empty()),
                    UserRef::Email(email) => prop_assert!(!email.is_empty()),
                }
                if let RefinerCall::IdentifyUser { traits, account, .. } = &call {
                    for value in traits.values().chain(account.iter().flat_map(|a| a.values())) {
                        let valid = match value {
                            Value::String(_) | Value::Bool(_) => true,
                            Value::Number(n) => n.as_f64().is_some_and(|f| f.abs() <= MAX_NUMBER as f64),
                            _ => false,
                        };
                        prop_assert!(valid, "not a Refiner trait value: {value}");
                    }
                    for key in ["id", "email", "account"] {
                        prop_assert!(!traits.contains_key(key));
                    }
                }
            }
            Mapped::Ping(user) => prop_assert!(!user.key().as_str().is_empty()),
            Mapped::NotForwarded(reason) => prop_assert!(!reason.as_str().is_empty()),
        }
        let name = kind.as_str();
        prop_assert_eq!(map_named_event(name, &payload, &options), map_event(kind, &payload, &options));
    }

    #[test]
    fn map_event_never_panics_on_traits_of_any_shape(traits in arb_json(), kind in arb_kind()) {
        let payload = json!({"userId": "u1", "groupId": "g1", "event": "E", "traits": traits});
        let mapped = map_event(kind, &payload, &defaults());
        prop_assert!(!matches!(mapped, Mapped::NotForwarded(NotForwardedReason::Unidentifiable)));
    }

    #[test]
    fn coalesce_covers_every_key_once_and_keeps_per_user_order(
        ops in prop::collection::vec((0u8..4, 0u8..3, 0u8..3), 0..40)
    ) {
        let users = ["u1", "u2", "u3"];
        let calls: Vec<(usize, RefinerCall)> = ops
            .iter()
            .enumerate()
            .map(|(seq, &(op, user, account))| {
                let user = users[usize::from(user)];
                let call = match op {
                    0 => identify(user, json!({format!("k{}", seq % 3): seq})),
                    1 => group(user, json!({"id": format!("g{account}"), "n": seq})),
                    2 => track(user, &format!("e{seq}")),
                    _ => delete(user),
                };
                (seq, call)
            })
            .collect();
        let input = calls.clone();
        let out = coalesce(calls);

        // Every key exactly once.
        let mut covered: Vec<usize> = out.iter().flat_map(|(keys, _)| keys.clone()).collect();
        covered.sort_unstable();
        prop_assert_eq!(covered, (0..input.len()).collect::<Vec<_>>());

        // Each entry sits at the position of its last event: output ordered by last key.
        let lasts: Vec<usize> = out.iter().filter_map(|(keys, _)| keys.last().copied()).collect();
        prop_assert!(lasts.windows(2).all(|w| w[0] < w[1]));

        for (keys, call) in &out {
            prop_assert!(keys.windows(2).all(|w| w[0] < w[1]));
            let user = call.user().key();
            if keys.len() > 1 {
                // Only identify-user calls of one user merge, with no track or delete of
                // that user in between.
                prop_assert!(matches!(call, RefinerCall::IdentifyUser { .. }), "a merged track or delete");
                let (first, last) = (keys[0], keys[keys.len() - 1]);
                for (seq, original) in &input[first..=last] {
                    if original.user().key() == user {
                        prop_assert!(keys.contains(seq), "a call of the user inside a merged run");
                        prop_assert!(matches!(original, RefinerCall::IdentifyUser { .. }), "a track or delete inside a run");
                    }
                }
            } else {
                // An unmerged entry is its input call unchanged.
                prop_assert_eq!(&input[keys[0]].1, call);
            }
        }

        // Per user, tracks and deletes come out in input order.
        for user in users {
            let user = UserRef::id(user).key();
            let not_merged = |call: &RefinerCall| {
                call.user().key() == user && !matches!(call, RefinerCall::IdentifyUser { .. })
            };
            let expected: Vec<&RefinerCall> =
                input.iter().map(|(_, c)| c).filter(|c| not_merged(c)).collect();
            let actual: Vec<&RefinerCall> =
                out.iter().map(|(_, c)| c).filter(|c| not_merged(c)).collect();
            prop_assert_eq!(expected, actual);
        }
    }
}
