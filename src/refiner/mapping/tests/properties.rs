//! Property tests of the mapping.

use super::*;

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
