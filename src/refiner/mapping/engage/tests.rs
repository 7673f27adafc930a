//! Engage payloads as Segment sends them (shapes from Segment's Engage destination docs),
//! through the whole mapping.

use serde_json::{json, Value};

use super::super::{map_event, Mapped, MappingOptions, Membership, Notes, RefinerCall, UserRef};
use super::segment_name_matches;
use crate::segment::EventType;

fn personas(class: &str, key: &str) -> Value {
    json!({
        "computation_class": class,
        "computation_key": key,
        "computation_id": "aud_1",
        "space_id": "spa_1",
        "namespace": "spa_1"
    })
}

fn mapped(kind: EventType, payload: Value) -> (RefinerCall, Notes) {
    match map_event(kind, &payload, &MappingOptions::default()) {
        Mapped::Call(call, notes) => (call, notes),
        other => panic!("expected a call, got {other:?}"),
    }
}

fn audience_track(event: &str, key: &str, member: Option<bool>) -> Value {
    let mut properties = json!({"audience_key": key});
    if let Some(member) = member {
        properties[key] = json!(member);
    }
    json!({
        "userId": "u1",
        "event": event,
        "properties": properties,
        "context": {"personas": personas("audience", key)}
    })
}

fn identify_user(traits: Value) -> RefinerCall {
    RefinerCall::IdentifyUser {
        user: UserRef::id("u1"),
        traits: traits.as_object().cloned().unwrap_or_default(),
        account: None,
    }
}

fn membership(audience: &str, member: bool) -> Option<Membership> {
    Some(Membership {
        audience: audience.into(),
        member,
    })
}

#[test]
fn audience_entered_and_exited_become_the_attribute_and_a_membership() {
    for (event, member) in [("Audience Entered", true), ("Audience Exited", false)] {
        let payload = audience_track(event, "power_users", Some(member));
        let (call, notes) = mapped(EventType::Track, payload);
        assert_eq!(
            call,
            identify_user(json!({"power_users": member})),
            "{event}"
        );
        assert_eq!(
            notes.membership,
            membership("power_users", member),
            "{event}"
        );
        assert_eq!(
            call.to_request().body,
            json!({"id": "u1", "power_users": member})
        );
    }
}

#[test]
fn the_boolean_property_wins_over_the_event_name_and_is_implied_without_it() {
    let (call, _) = mapped(
        EventType::Track,
        audience_track("Audience Entered", "churn_risk", Some(false)),
    );
    assert_eq!(call, identify_user(json!({"churn_risk": false})));
    let (call, notes) = mapped(
        EventType::Track,
        audience_track("Audience Exited", "churn_risk", None),
    );
    assert_eq!(call, identify_user(json!({"churn_risk": false})));
    assert_eq!(notes.membership, membership("churn_risk", false));
}

#[test]
fn the_audience_key_falls_back_to_the_computation_key() {
    let payload = json!({
        "userId": "u1",
        "event": "Audience Entered",
        "properties": {},
        "context": {"personas": personas("journey_step", "onboarding__step_2")}
    });
    let (call, notes) = mapped(EventType::Track, payload);
    assert_eq!(call, identify_user(json!({"onboarding__step_2": true})));
    assert_eq!(notes.membership, membership("onboarding__step_2", true));
}

#[test]
fn an_audience_track_without_any_key_stays_a_track_event() {
    let payload = json!({"userId": "u1", "event": "Audience Entered", "properties": {}});
    let (call, notes) = mapped(EventType::Track, payload);
    assert!(
        matches!(call, RefinerCall::TrackEvent { ref event, .. } if event == "Audience Entered")
    );
    assert_eq!(notes.membership, None);
}

#[test]
fn trait_computed_sets_the_attribute_converted_like_any_trait() {
    let payload = json!({
        "userId": "u1",
        "event": "Trait Computed",
        "properties": {"trait_key": "orders_90d", "orders_90d": 7},
        "context": {"personas": personas("trait", "orders_90d")}
    });
    let (call, notes) = mapped(EventType::Track, payload);
    assert_eq!(call, identify_user(json!({"orders_90d": 7})));
    assert_eq!(notes.membership, None, "a computed trait is no membership");
    let payload = json!({
        "userId": "u1",
        "event": "Trait Computed",
        "properties": {"favourite": {"category": "shoes"}},
        "context": {"personas": personas("trait", "favourite")}
    });
    let (call, _) = mapped(EventType::Track, payload);
    assert_eq!(call, identify_user(json!({"favourite_category": "shoes"})));
}

#[test]
fn trait_computed_without_its_value_stays_a_track_event() {
    let payload = json!({
        "userId": "u1",
        "event": "Trait Computed",
        "properties": {"trait_key": "orders_90d"}
    });
    let (call, _) = mapped(EventType::Track, payload);
    assert!(matches!(call, RefinerCall::TrackEvent { .. }));
}

#[test]
fn identify_shaped_audiences_and_journey_steps_state_a_membership() {
    for class in ["audience", "journey_step"] {
        for member in [true, false] {
            let payload = json!({
                "userId": "u1",
                "traits": {"email": "a@example.com", "power_users": member},
                "context": {"personas": personas(class, "power_users")}
            });
            let (call, notes) = mapped(EventType::Identify, payload);
            assert_eq!(
                call.to_request().body,
                json!({"id": "u1", "email": "a@example.com", "power_users": member})
            );
            assert_eq!(
                notes.membership,
                membership("power_users", member),
                "{class}"
            );
        }
    }
}

#[test]
fn computed_traits_and_odd_identifies_state_no_membership() {
    let cases = [
        json!({"userId": "u1", "traits": {"ltv": 120},
               "context": {"personas": personas("trait", "ltv")}}),
        json!({"userId": "u1", "traits": {"power_users": "yes"},
               "context": {"personas": personas("audience", "power_users")}}),
        json!({"userId": "u1", "traits": {"other": true},
               "context": {"personas": personas("audience", "power_users")}}),
        json!({"userId": "u1", "traits": {"power_users": true}}),
    ];
    for payload in cases {
        let (call, notes) = mapped(EventType::Identify, payload.clone());
        assert!(
            matches!(call, RefinerCall::IdentifyUser { .. }),
            "{payload}"
        );
        assert_eq!(notes.membership, None, "{payload}");
    }
}

#[test]
fn account_audiences_stay_on_the_account_without_a_membership() {
    let payload = json!({
        "userId": "u1",
        "groupId": "acme",
        "traits": {"enterprise_accounts": true},
        "context": {"personas": personas("audience", "enterprise_accounts")}
    });
    let (call, notes) = mapped(EventType::Group, payload);
    assert_eq!(
        call.to_request().body,
        json!({"id": "u1", "account": {"id": "acme", "enterprise_accounts": true}})
    );
    assert_eq!(notes.membership, None, "manual segments hold contacts");
}

#[test]
fn sync_segment_calls_add_with_post_and_remove_with_delete() {
    for (member, method) in [(true, "POST"), (false, "DELETE")] {
        let call = RefinerCall::SyncSegment {
            user: UserRef::Id {
                id: "u1".into(),
                email: Some("a@example.com".into()),
            },
            audience: "power_users".into(),
            member,
            segment: Some("seg-1".into()),
        };
        let request = call.to_request();
        assert_eq!(request.method.as_str(), method);
        assert_eq!(request.path, "/sync-segment");
        assert_eq!(request.body, json!({"id": "u1", "segment_uuid": "seg-1"}));
        assert_eq!(call.name(), "sync_segment");
    }
}

#[test]
fn segment_names_match_audience_keys_by_words() {
    assert!(segment_name_matches("power_users", "power_users"));
    assert!(segment_name_matches("Power Users", "power_users"));
    assert!(segment_name_matches(" power-users ", "power_users"));
    assert!(!segment_name_matches("Power Users 2", "power_users"));
    assert!(!segment_name_matches("", ""));
}
