use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{json, Map, Number, Value};

use super::*;

/// Rules from TOML, as the configuration file writes them.
fn rules(text: &str) -> Result<RuleSet, RuleError> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        rules: Vec<RuleSpec>,
    }
    let file: File = toml::from_str(text).expect("toml");
    let environments = BTreeMap::from([("testing".to_string(), ())]);
    compile(&file.rules, &environments)
}

fn ok(text: &str) -> RuleSet {
    rules(text).expect("valid rules")
}

fn refused(text: &str) -> RuleError {
    rules(text).expect_err("refused")
}

fn forwarded(evaluation: &Evaluation<'_>) -> (Value, Option<String>) {
    match &evaluation.outcome {
        Outcome::Forward {
            payload,
            environment,
        } => (
            payload.clone().into_owned(),
            environment.as_deref().map(str::to_string),
        ),
        Outcome::Drop(rule) => panic!("dropped by {rule}"),
    }
}

#[test]
fn drops_by_event_name_and_reports_the_rule() {
    let set = ok(r#"
        [[rules]]
        name = "no-heartbeats"
        match = { all = [{ field = "type", equals = "track" }, { field = "event", in = ["Heartbeat", "Debug"] }] }
        actions = [{ drop = true }]
    "#);
    let event = json!({"type": "track", "event": "Heartbeat", "userId": "u"});
    let evaluation = set.evaluate("track", &event);
    assert_eq!(evaluation.outcome, Outcome::Drop("no-heartbeats".into()));
    assert_eq!(evaluation.matched, vec![Arc::from("no-heartbeats")]);
    let other = json!({"type": "track", "event": "Signed Up", "userId": "u"});
    let evaluation = set.evaluate("track", &other);
    assert!(evaluation.matched.is_empty());
    assert!(matches!(
        evaluation.outcome,
        Outcome::Forward {
            payload: Cow::Borrowed(_),
            environment: None
        }
    ));
}

#[test]
fn every_operator() {
    let event = json!({
        "type": "identify", "userId": "u-1",
        "traits": {"plan": "pro", "seats": 12, "ratio": 0.5, "nothing": null, "email": "a@corp.example"},
        "context": {"ip": "10.1.2.3", "library": {"name": "analytics.js"}},
        "items": [{"sku": "x"}]
    });
    let cases = [
        (r#"{ field = "traits.plan", equals = "pro" }"#, true),
        (r#"{ field = "traits.seats", equals = 12.0 }"#, true),
        (r#"{ field = "traits.plan", not_equals = "pro" }"#, false),
        (r#"{ field = "traits.missing", not_equals = "pro" }"#, true),
        (r#"{ field = "traits.plan", in = ["free", "pro"] }"#, true),
        (r#"{ field = "traits.plan", in = ["free"] }"#, false),
        (r#"{ field = "traits.nothing", exists = true }"#, false),
        (r#"{ field = "traits.nothing", exists = false }"#, true),
        (r#"{ field = "context.ip", exists = true }"#, true),
        (r#"{ field = "context.ip", starts_with = "10." }"#, true),
        (r#"{ field = "traits.seats", starts_with = "1" }"#, false),
        (r#"{ field = "traits.seats", gt = 10 }"#, true),
        (r#"{ field = "traits.seats", lt = 10 }"#, false),
        (r#"{ field = "traits.plan", gt = 0 }"#, false),
        (
            r#"{ field = "traits.email", matches = "@corp\\.example$" }"#,
            true,
        ),
        (r#"{ field = "traits.email", matches = "^b" }"#, false),
        (r#"{ field = "items.0.sku", equals = "x" }"#, true),
        (r#"{ field = "type", equals = "identify" }"#, true),
        (
            r#"{ not = { field = "type", equals = "identify" } }"#,
            false,
        ),
        (
            r#"{ any = [{ field = "type", equals = "track" }, { field = "userId", exists = true }] }"#,
            true,
        ),
        (
            r#"{ all = [{ field = "type", equals = "track" }, { field = "userId", exists = true }] }"#,
            false,
        ),
    ];
    for (condition, expected) in cases {
        let set = ok(&format!(
            "[[rules]]\nname = \"r\"\nmatch = {condition}\nactions = [{{ route = \"testing\" }}]\n"
        ));
        let matched = !set.evaluate("identify", &event).matched.is_empty();
        assert_eq!(matched, expected, "{condition}");
    }
}

#[test]
fn redacts_contact_and_account_traits() {
    let set = ok(r#"
        [[rules]]
        name = "redact"
        actions = [{ remove_traits = ["phone", "ip", "city"] }, { remove_account_traits = ["revenue"] }]
    "#);
    let identify = json!({
        "type": "identify", "userId": "u",
        "traits": {"phone": "+1", "ip": "10.0.0.1", "city": "Paris", "plan": "pro"},
        "context": {"traits": {"phone": "+2", "email": "a@b.example"}}
    });
    let (payload, _) = forwarded(&set.evaluate("identify", &identify));
    assert_eq!(payload["traits"], json!({"plan": "pro"}));
    assert_eq!(
        payload["context"]["traits"],
        json!({"email": "a@b.example"})
    );
    assert_eq!(identify["traits"]["phone"], "+1", "the input is untouched");
    let group = json!({"type": "group", "userId": "u", "groupId": "g", "traits": {"revenue": 9, "phone": "+1"}});
    let (payload, _) = forwarded(&set.evaluate("group", &group));
    assert_eq!(
        payload["traits"],
        json!({"phone": "+1"}),
        "a group's traits are the account's"
    );
}

#[test]
fn keep_traits_keeps_the_email() {
    let set = ok(r#"
        [[rules]]
        name = "allow"
        actions = [{ keep_traits = ["plan"] }, { keep_account_traits = ["name"] }]
    "#);
    let identify = json!({"type": "identify", "userId": "u", "traits": {"plan": "p", "phone": "+1", "email": "e@x.example"}});
    let (payload, _) = forwarded(&set.evaluate("identify", &identify));
    assert_eq!(
        payload["traits"],
        json!({"plan": "p", "email": "e@x.example"})
    );
    let group = json!({"type": "group", "userId": "u", "groupId": "g", "traits": {"name": "Acme", "mrr": 1}});
    let (payload, _) = forwarded(&set.evaluate("group", &group));
    assert_eq!(payload["traits"], json!({"name": "Acme"}));
}

#[test]
fn renames_sets_removes_and_routes_in_order() {
    let set = ok(r#"
        [[rules]]
        name = "rename"
        match = { field = "event", equals = "signup" }
        actions = [{ rename_event = "Signed Up" }]
        [[rules]]
        name = "sees-the-new-name"
        match = { field = "event", equals = "Signed Up" }
        actions = [{ route = "testing" }]
        [[rules]]
        name = "tag"
        match = { field = "type", equals = "identify" }
        actions = [{ set_trait = "source", value = "web" }, { remove_trait = "phone" }]
        [[rules]]
        name = "internal"
        match = { field = "userId", starts_with = "test-" }
        actions = [{ route = "testing" }]
    "#);
    let track = json!({"type": "track", "event": "signup", "userId": "u"});
    let evaluation = set.evaluate("track", &track);
    let (payload, environment) = forwarded(&evaluation);
    assert_eq!(payload["event"], "Signed Up");
    assert_eq!(environment.as_deref(), Some("testing"));
    assert_eq!(
        evaluation.matched,
        vec![Arc::from("rename"), Arc::from("sees-the-new-name")]
    );
    let identify = json!({"type": "identify", "userId": "test-1", "traits": {"phone": "+1"}});
    let (payload, environment) = forwarded(&set.evaluate("identify", &identify));
    assert_eq!(payload["traits"], json!({"source": "web"}));
    assert_eq!(environment.as_deref(), Some("testing"));
    let page = json!({"type": "page", "event": "signup", "userId": "u"});
    let (payload, _) = forwarded(&set.evaluate("page", &page));
    assert_eq!(payload, page, "rename_event renames track events only");
}

#[test]
fn routing_back_to_default_clears_the_environment() {
    let set = ok(r#"
        [[rules]]
        name = "a"
        actions = [{ route = "testing" }]
        [[rules]]
        name = "b"
        match = { field = "userId", equals = "vip" }
        actions = [{ route = "default" }]
    "#);
    let event = json!({"userId": "vip"});
    assert_eq!(forwarded(&set.evaluate("track", &event)).1, None);
}

#[test]
fn errors_name_the_rule_and_the_field() {
    let cases = [
        (
            "[[rules]]\nname = \"r\"\nmatch = { field = \"x\", equals = 1, gt = 2 }\nactions = [{ drop = true }]",
            "match",
            "equals and gt",
        ),
        (
            "[[rules]]\nname = \"r\"\nmatch = { any = [] }\nactions = [{ drop = true }]",
            "match",
            "never match",
        ),
        (
            "[[rules]]\nname = \"r\"\nmatch = { field = \"e\", in = [] }\nactions = [{ drop = true }]",
            "match",
            "never match",
        ),
        (
            "[[rules]]\nname = \"r\"\nmatch = { field = \"type\", equals = \"trak\" }\nactions = [{ drop = true }]",
            "match.equals",
            "not a Segment type",
        ),
        (
            "[[rules]]\nname = \"r\"\nmatch = { all = [{ field = \"n\", gt = 5 }, { field = \"n\", lt = 5 }] }\nactions = [{ drop = true }]",
            "match",
            "never match",
        ),
        (
            "[[rules]]\nname = \"r\"\nmatch = { not = { all = [] } }\nactions = [{ drop = true }]",
            "match",
            "never match",
        ),
        (
            "[[rules]]\nname = \"r\"\nmatch = { all = [{ field = \"a\", matches = \"(\" }] }\nactions = [{ drop = true }]",
            "match.all[0].matches",
            "not a valid regular expression",
        ),
        (
            "[[rules]]\nname = \"r\"\nmatch = { field = \"a\", matches = \"(a)\\\\1\" }\nactions = [{ drop = true }]",
            "match.matches",
            "backreferences",
        ),
        (
            "[[rules]]\nname = \"r\"\nmatch = { field = \"a\", matches = \"\\\\w{1000}\\\\w{1000}\" }\nactions = [{ drop = true }]",
            "match.matches",
            "too costly",
        ),
        (
            "[[rules]]\nname = \"r\"\nactions = [{ route = \"staging\" }]",
            "actions[0].route",
            "no environment `staging`",
        ),
        (
            "[[rules]]\nname = \"r\"\nactions = []",
            "actions",
            "at least one",
        ),
        (
            "[[rules]]\nname = \"r\"\nactions = [{ drop = false }]",
            "actions[0].drop",
            "must be true",
        ),
        (
            "[[rules]]\nname = \"r\"\nactions = [{ set_trait = \"a\" }]",
            "actions[0].value",
            "needs a value",
        ),
        (
            "[[rules]]\nname = \"r\"\nmatch = { field = \"a..b\", exists = true }\nactions = [{ drop = true }]",
            "match.field",
            "dotted path",
        ),
        (
            "[[rules]]\nname = \"all\"\nactions = [{ drop = true }]\n[[rules]]\nname = \"late\"\nactions = [{ route = \"testing\" }]",
            "match",
            "rule `all` before it drops every event",
        ),
        (
            "[[rules]]\nname = \"r\"\nactions = [{ route = \"testing\" }]\n[[rules]]\nname = \"r\"\nactions = [{ route = \"testing\" }]",
            "name",
            "twice",
        ),
    ];
    for (text, field, message) in cases {
        let error = refused(text);
        assert_eq!(error.field, field, "{text}: {error}");
        assert!(error.message.contains(message), "{text}: {error}");
        assert!(error.to_string().starts_with("rule `"), "{error}");
    }
    let error = refused("[[rules]]\nname = \"bad name\"\nactions = [{ drop = true }]");
    assert_eq!((error.rule.as_str(), error.field.as_str()), ("#1", "name"));
}

#[test]
fn deep_nesting_is_refused() {
    let mut condition = r#"{ field = "a", exists = true }"#.to_string();
    for _ in 0..MAX_DEPTH_FOR_TEST {
        condition = format!("{{ not = {condition} }}");
    }
    let error = refused(&format!(
        "[[rules]]\nname = \"deep\"\nmatch = {condition}\nactions = [{{ drop = true }}]"
    ));
    assert!(error.message.contains("nested deeper"), "{error}");
}

const MAX_DEPTH_FOR_TEST: usize = spec::MAX_DEPTH + 1;

// ---------------------------------------------------------------------------------------
// Properties.

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        ".{0,20}".prop_map(Value::String),
        prop::sample::select(vec!["pro", "Heartbeat", "test-1", "identify", "+1"])
            .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((arb_field(), inner), 0..5)
                .prop_map(|fields| Value::Object(fields.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn arb_field() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "traits", "context", "event", "userId", "type", "phone", "plan", "email", "0", "n",
        ])
        .prop_map(str::to_string),
        "[a-z0-9]{0,4}",
    ]
}

/// Condition specs over a small vocabulary of paths and values (some invalid; those are
/// refused by `compile` and not evaluated).
fn arb_condition() -> impl Strategy<Value = String> {
    let path = prop::sample::select(vec![
        "event",
        "type",
        "userId",
        "traits.plan",
        "traits.n",
        "context.traits.email",
        "items.0",
    ]);
    let leaf = (path, 0..8usize, arb_value_text()).prop_map(|(path, op, value)| {
        let op = match op {
            0 => format!("equals = {value}"),
            1 => format!("not_equals = {value}"),
            2 => format!("in = [{value}, \"pro\"]"),
            3 => "exists = true".to_string(),
            4 => "starts_with = \"te\"".to_string(),
            5 => "gt = 3".to_string(),
            6 => "lt = 3.5".to_string(),
            _ => "matches = \"^[a-z]+$\"".to_string(),
        };
        format!("{{ field = \"{path}\", {op} }}")
    });
    leaf.prop_recursive(3, 16, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 1..3)
                .prop_map(|items| format!("{{ all = [{}] }}", items.join(", "))),
            prop::collection::vec(inner.clone(), 1..3)
                .prop_map(|items| format!("{{ any = [{}] }}", items.join(", "))),
            inner.prop_map(|item| format!("{{ not = {item} }}")),
        ]
    })
}

fn arb_value_text() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["\"pro\"", "3", "true", "\"track\"", "\"Heartbeat\""])
        .prop_map(str::to_string)
}

fn arb_action() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "{ drop = true }",
        "{ keep_traits = [\"plan\"] }",
        "{ remove_traits = [\"phone\", \"email\"] }",
        "{ keep_account_traits = [\"name\"] }",
        "{ remove_account_traits = [\"plan\"] }",
        "{ rename_event = \"Renamed\" }",
        "{ set_trait = \"plan\", value = \"free\" }",
        "{ remove_trait = \"plan\" }",
        "{ route = \"testing\" }",
        "{ route = \"default\" }",
    ])
    .prop_map(str::to_string)
}

fn arb_rules() -> impl Strategy<Value = String> {
    let rule = (
        prop::option::of(arb_condition()),
        prop::collection::vec(arb_action(), 1..3),
    );
    prop::collection::vec(rule, 0..6).prop_map(|rules| {
        rules
            .iter()
            .enumerate()
            .map(|(i, (condition, actions))| {
                let when = condition
                    .as_ref()
                    .map(|c| format!("match = {c}\n"))
                    .unwrap_or_default();
                format!(
                    "[[rules]]\nname = \"r{i}\"\n{when}actions = [{}]\n",
                    actions.join(", ")
                )
            })
            .collect()
    })
}

fn arb_kind() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "identify", "track", "page", "screen", "group", "alias", "delete", "bogus",
    ])
    .prop_map(str::to_string)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any rule set (that validates) on any event: no panic, the same answer twice, the
    /// input untouched, and a drop names a rule that matched last.
    #[test]
    fn evaluation_never_panics_and_is_deterministic(
        text in arb_rules(),
        kind in arb_kind(),
        event in arb_json(),
    ) {
        let Ok(set) = rules(&text) else { return Ok(()); };
        let before = event.clone();
        let first = set.evaluate(&kind, &event);
        let second = set.evaluate(&kind, &event);
        prop_assert_eq!(&first, &second);
        prop_assert_eq!(&event, &before);
        if let Outcome::Drop(rule) = &first.outcome {
            prop_assert_eq!(first.matched.last(), Some(rule));
        }
    }

    /// Removed traits are gone from every contact-trait object.
    #[test]
    fn removed_traits_never_survive(event in arb_json(), kind in arb_kind()) {
        let set = ok("[[rules]]\nname = \"r\"\nactions = [{ remove_traits = [\"phone\"] }]\n");
        let (payload, _) = forwarded(&set.evaluate(&kind, &event));
        if kind != "group" {
            prop_assert!(payload.get("traits").and_then(|t| t.get("phone")).is_none()
                || !payload["traits"].is_object());
        }
        let context = payload.get("context").and_then(|c| c.get("traits"));
        prop_assert!(context.and_then(|t| t.get("phone")).is_none() || !context.is_some_and(Value::is_object));
    }
}
