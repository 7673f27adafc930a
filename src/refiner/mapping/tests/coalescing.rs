//! Tests of per-user coalescing.

use super::*;

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
