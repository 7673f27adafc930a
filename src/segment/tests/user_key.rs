//! Tests of `user_key`, on a normalized event and through parsing.

use super::*;

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
