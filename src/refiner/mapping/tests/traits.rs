//! Tests of trait conversion: cuts, flattening, numbers, renames and identity fields.

use super::*;

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
