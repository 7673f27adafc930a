//! Differential tests: the production parsers against the tree-based oracle (`oracle.rs`).
//!
//! For every generated body, each parser must give what the oracle gives: the same
//! `Reject`, or the same `writeKey` and, item by item, the same `Skip` or an event with the
//! same kind, `messageId` and user key, and a payload equal to the oracle's as a
//! `serde_json::Value`. Payloads must also keep the module's invariants (one JSON object,
//! each top-level key once, `type`/`messageId`/`receivedAt`/`timestamp` set, no
//! `writeKey`).
//!
//! The bodies are rendered as text, not through serde_json, so that they can hold what a
//! `Value` cannot: duplicate keys, escaped keys and values, odd whitespace and number
//! spellings, lone surrogates, numbers out of range and nesting at serde_json's limit.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::TestCaseError;
use serde_json::Value;

use super::scan::{object_members, Shape};
use super::*;

/// The same arrival (time, fresh ids `gen-1`, `gen-2`, ...) as the rule tests.
use super::tests::arrival;

// ---------------------------------------------------------------------------------------
// Generated JSON text
// ---------------------------------------------------------------------------------------

const SPACES: &[&str] = &["", "", "", " ", "\n", "\t ", "\r\n  "];

/// JSON as text: literals are kept as written.
#[derive(Debug, Clone)]
enum Json {
    /// A literal (string, number, `true`, `false`, `null`) exactly as it will be written.
    Literal(String),
    Array(Vec<Json>, usize),
    /// Members as (key literal, value); keys may repeat.
    Object(Vec<(String, Json)>, usize),
}

impl Json {
    fn render(&self, out: &mut String) {
        match self {
            Json::Literal(text) => out.push_str(text),
            Json::Array(items, space) => {
                let space = SPACES[space % SPACES.len()];
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(space);
                    item.render(out);
                }
                out.push_str(space);
                out.push(']');
            }
            Json::Object(members, space) => {
                let space = SPACES[space % SPACES.len()];
                out.push('{');
                for (i, (key, value)) in members.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(space);
                    out.push_str(key);
                    out.push_str(space);
                    out.push(':');
                    out.push_str(space);
                    value.render(out);
                }
                out.push_str(space);
                out.push('}');
            }
        }
    }

    fn text(&self) -> String {
        let mut out = String::new();
        self.render(&mut out);
        out
    }
}

fn literal(text: impl Into<String>) -> Json {
    Json::Literal(text.into())
}

fn quoted(text: &str) -> String {
    serde_json::to_string(text).expect("a string serializes")
}

fn string_literal() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-zA-Z0-9 @._:-]{0,12}".prop_map(|s| quoted(&s)),
        2 => "\\PC{0,8}".prop_map(|s| quoted(&s)),
        2 => select(vec![
            r#""""#,
            r#""a\"b""#,
            r#""\u0041bc""#,
            r#""\ud83d\ude00 ok""#,
            r#""tab\there\n""#,
            r#""\/slash\\""#,
            "\"é ü 日本\"",
            r#""\u0000""#,
            r#""\u2028""#,
        ])
        .prop_map(String::from),
        1 => select(vec![r#""\ud800""#, r#""x\udc00""#, r#""\ud83dx""#]).prop_map(String::from),
    ]
}

fn number_literal() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (-1000i64..1000).prop_map(|n| n.to_string()),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        2 => (-1.0e6f64..1.0e6).prop_map(|f| f.to_string()),
        2 => select(vec![
            "1E2", "-0", "0.0", "-0.0", "2.5E+3", "1e-7", "1.5e300", "1.5e-400", "4e0",
            "12345678901234567890123", "1e400", "-1e400", "100.50",
        ])
        .prop_map(String::from),
    ]
}

fn leaf() -> impl Strategy<Value = Json> {
    prop_oneof![
        3 => string_literal().prop_map(Json::Literal),
        2 => number_literal().prop_map(Json::Literal),
        1 => select(vec!["null", "true", "false"]).prop_map(literal),
    ]
}

fn junk_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(vec!["a", "b", "email", "traits", "name", "id", "e\\u006dail", "a"])
            .prop_map(|k| format!("\"{k}\"")),
        1 => string_literal(),
    ]
}

/// Any JSON, a few levels deep, with repeated keys.
fn junk() -> impl Strategy<Value = Json> {
    leaf().prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            (vec(inner.clone(), 0..5), any::<usize>()).prop_map(|(items, s)| Json::Array(items, s)),
            (vec((junk_key(), inner), 0..5), any::<usize>())
                .prop_map(|(members, s)| Json::Object(members, s)),
        ]
    })
}

/// Arrays nested right at serde_json's recursion limit, seen from an event's member.
fn deep() -> impl Strategy<Value = Json> {
    (124usize..130).prop_map(|depth| {
        let mut value = literal("1");
        for _ in 0..depth {
            value = Json::Array(vec![value], 0);
        }
        value
    })
}

fn timestamp() -> impl Strategy<Value = Json> {
    prop_oneof![
        6 => select(vec![
            "2025-01-02T03:00:00.000Z",
            "2025-01-02T03:00:10.000Z",
            "2025-01-02T03:04:05.123456+00:00",
            "2025-01-02T05:04:05.123+02:00",
            "2025-01-01T22:04:05.123-05:00",
            "2025-01-02T03:04:05.123",
            " 2025-01-02T03:04:05.123Z ",
            "2015-2-02T00:30:08.276Z",
            "yesterday",
            "",
            "0001-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999Z",
            "1969-07-20T20:17:40Z",
            "1900-01-01T00:00:00.5Z",
        ])
        .prop_map(|t| literal(quoted(t))),
        1 => Just(literal(r#""2025-01-02T03:00:00.000\u005a""#)),
        1 => leaf(),
    ]
}

fn id_value() -> impl Strategy<Value = Json> {
    prop_oneof![
        6 => "[a-z0-9]{1,6}".prop_map(|s| literal(quoted(&s))),
        1 => Just(literal(r#""""#)),
        1 => Just(literal(r#""u\u0031""#)),
        2 => number_literal().prop_map(Json::Literal),
        1 => junk(),
    ]
}

fn email_value() -> impl Strategy<Value = Json> {
    prop_oneof![
        3 => "[a-z]{1,5}@x\\.io".prop_map(|s| literal(quoted(&s))),
        1 => Just(literal(r#""  padded@x.io ""#)),
        1 => Just(literal(r#""   ""#)),
        1 => Just(literal(r#""e\u0040x.io""#)),
        1 => leaf(),
    ]
}

fn traits() -> impl Strategy<Value = Json> {
    prop_oneof![
        4 => (vec(
            prop_oneof![
                3 => email_value().prop_map(|v| ("\"email\"".to_string(), v)),
                1 => email_value().prop_map(|v| ("\"\\u0065mail\"".to_string(), v)),
                2 => (junk_key(), junk()),
            ],
            0..4,
        ), any::<usize>())
            .prop_map(|(members, s)| Json::Object(members, s)),
        1 => junk(),
    ]
}

fn context() -> impl Strategy<Value = Json> {
    prop_oneof![
        5 => (vec(
            prop_oneof![
                3 => traits().prop_map(|v| ("\"traits\"".to_string(), v)),
                2 => junk().prop_map(|v| ("\"library\"".to_string(), v)),
                1 => junk().prop_map(|v| ("\"ip\"".to_string(), v)),
                2 => (junk_key(), junk()),
                1 => deep().prop_map(|v| ("\"deep\"".to_string(), v)),
            ],
            0..5,
        ), any::<usize>())
            .prop_map(|(members, s)| Json::Object(members, s)),
        1 => junk(),
    ]
}

fn type_value() -> impl Strategy<Value = Json> {
    prop_oneof![
        8 => select(vec![
            "identify", "track", "page", "screen", "group", "alias", "delete",
        ])
        .prop_map(|t| literal(quoted(t))),
        1 => Just(literal(r#""tr\u0061ck""#)),
        1 => select(vec!["Track", "", "batch"]).prop_map(|t| literal(quoted(t))),
        1 => leaf(),
    ]
}

fn message_id_value() -> impl Strategy<Value = Json> {
    prop_oneof![
        6 => "[0-9a-f]{1,40}".prop_map(|s| literal(quoted(&s))),
        1 => "[é日a]{1,30}".prop_map(|s| literal(quoted(&s))),
        1 => Just(literal(r#""m\u0031""#)),
        1 => select(vec!["null", r#""""#, "12", "{}"]).prop_map(literal),
    ]
}

/// One top-level member of an event: (key literal, value).
fn member() -> impl Strategy<Value = (String, Json)> {
    let keyed = |keys: Vec<&'static str>, value: BoxedStrategy<Json>| {
        (select(keys), value).prop_map(|(k, v)| (format!("\"{k}\""), v))
    };
    prop_oneof![
        2 => keyed(vec!["type"], type_value().boxed()),
        2 => keyed(vec!["messageId", "m\\u0065ssageId"], message_id_value().boxed()),
        4 => keyed(vec!["userId", "anonymousId", "user\\u0049d"], id_value().boxed()),
        2 => keyed(vec!["event", "groupId", "previousId"], id_value().boxed()),
        3 => keyed(
            vec!["timestamp", "sentAt", "originalTimestamp", "receivedAt"],
            timestamp().boxed()
        ),
        2 => keyed(vec!["context"], context().boxed()),
        2 => keyed(vec!["traits"], traits().boxed()),
        1 => keyed(vec!["integrations", "properties", "name", "writeKey"], junk().boxed()),
        1 => keyed(vec!["writeKey"], string_literal().prop_map(Json::Literal).boxed()),
        2 => (junk_key(), junk()),
        1 => keyed(vec!["properties", "x"], deep().boxed()),
    ]
}

/// An event object: usually a plausible one (a type, an id, an event name), plus extra
/// members, in any order, keys repeating.
fn event() -> impl Strategy<Value = Json> {
    let base = (
        proptest::option::weighted(0.9, keyed_member("type", type_value().boxed())),
        proptest::option::weighted(0.6, keyed_member("userId", id_value().boxed())),
        proptest::option::weighted(0.5, keyed_member("anonymousId", id_value().boxed())),
        proptest::option::weighted(0.5, keyed_member("messageId", message_id_value().boxed())),
        proptest::option::weighted(0.4, keyed_member("event", id_value().boxed())),
        proptest::option::weighted(0.5, keyed_member("timestamp", timestamp().boxed())),
    );
    (base, vec(member(), 0..6), any::<usize>())
        .prop_flat_map(|(base, extra, space)| {
            let (a, b, c, d, e, f) = base;
            let members: Vec<(String, Json)> = [a, b, c, d, e, f]
                .into_iter()
                .flatten()
                .chain(extra)
                .collect();
            (Just(members).prop_shuffle(), Just(space))
        })
        .prop_map(|(members, space)| Json::Object(members, space))
}

fn keyed_member(key: &'static str, value: BoxedStrategy<Json>) -> BoxedStrategy<(String, Json)> {
    value.prop_map(move |v| (format!("\"{key}\""), v)).boxed()
}

/// A batch item: nearly always an event object.
fn item() -> impl Strategy<Value = Json> {
    prop_oneof![12 => event(), 1 => leaf(), 1 => junk()]
}

/// A batch body: items plus batch-level members, in any order.
fn batch_body() -> impl Strategy<Value = String> {
    let batch = (vec(item(), 0..6), any::<usize>()).prop_map(|(items, s)| Json::Array(items, s));
    (
        batch,
        proptest::option::weighted(0.5, timestamp()),
        proptest::option::weighted(0.4, context()),
        proptest::option::weighted(0.3, junk()),
        proptest::option::weighted(0.3, leaf()),
        any::<usize>(),
    )
        .prop_flat_map(
            |(batch, sent_at, context, integrations, write_key, space)| {
                let mut members = vec![("\"batch\"".to_string(), batch)];
                members.extend(sent_at.map(|v| ("\"sentAt\"".to_string(), v)));
                members.extend(context.map(|v| ("\"context\"".to_string(), v)));
                members.extend(integrations.map(|v| ("\"integrations\"".to_string(), v)));
                members.extend(write_key.map(|v| ("\"writeKey\"".to_string(), v)));
                (Just(members).prop_shuffle(), Just(space))
            },
        )
        .prop_map(|(members, space)| Json::Object(members, space).text())
}

fn limits() -> impl Strategy<Value = Limits> {
    prop_oneof![
        3 => Just(Limits::default()),
        1 => (40usize..600, 0usize..8, 2usize..40, 40usize..3000).prop_map(
            |(bytes, events, id, merged)| Limits {
                max_event_bytes: bytes,
                max_batch_bytes: 500 * 1024,
                max_batch_events: events,
                max_webhook_bytes: 4 * 1024 * 1024,
                max_webhook_events: events,
                max_message_id_len: id,
                max_batch_merged_bytes: merged,
                ..Limits::default()
            }
        ),
    ]
}

fn kind() -> impl Strategy<Value = EventType> {
    select(EventType::ALL[..6].to_vec())
}

// ---------------------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------------------

fn payload_value(event: &Event) -> Result<Value, TestCaseError> {
    serde_json::from_slice(&event.payload)
        .map_err(|e| TestCaseError::fail(format!("payload is not JSON: {e}: {event:?}")))
}

/// The payload's invariants, checked on the bytes (a `Value` would hide repeated keys).
fn check_payload(event: &Event) -> Result<(), TestCaseError> {
    let text = std::str::from_utf8(&event.payload)
        .map_err(|_| TestCaseError::fail("payload is not UTF-8"))?;
    let mut members = Vec::new();
    prop_assert_eq!(
        object_members(text, 1, &mut members),
        Shape::Object,
        "{}",
        text
    );
    let mut keys: Vec<&str> = members.iter().map(|m| m.key.as_ref()).collect();
    keys.sort_unstable();
    let count = keys.len();
    keys.dedup();
    prop_assert_eq!(keys.len(), count, "a top-level key repeats: {}", text);
    for key in ["type", "messageId", "receivedAt", "timestamp"] {
        prop_assert!(keys.contains(&key), "{} is missing: {}", key, text);
    }
    prop_assert!(!keys.contains(&"writeKey"), "writeKey is kept: {}", text);
    Ok(())
}

fn same(
    body: &str,
    new: Result<Parsed, Reject>,
    old: Result<Parsed, Reject>,
) -> Result<(), TestCaseError> {
    let (new, old) = match (new, old) {
        (Err(new), Err(old)) => {
            prop_assert_eq!(new, old, "body {}", body);
            return Ok(());
        }
        (new, old) => match (new, old) {
            (Ok(new), Ok(old)) => (new, old),
            (new, old) => {
                return Err(TestCaseError::fail(format!(
                    "new {new:?}\nold {old:?}\nbody {body}"
                )))
            }
        },
    };
    prop_assert_eq!(&new.write_key, &old.write_key, "body {}", body);
    prop_assert_eq!(&new.refused, &old.refused, "body {}", body);
    prop_assert_eq!(new.items.len(), old.items.len(), "body {}", body);
    for (new, old) in new.items.iter().zip(&old.items) {
        match (new, old) {
            (Err(new), Err(old)) => prop_assert_eq!(new, old, "body {}", body),
            (Ok(new), Ok(old)) => {
                prop_assert_eq!(new.kind, old.kind, "body {}", body);
                prop_assert_eq!(&new.message_id, &old.message_id, "body {}", body);
                prop_assert_eq!(&new.user_key, &old.user_key, "body {}", body);
                check_payload(new)?;
                prop_assert_eq!(
                    payload_value(new)?,
                    payload_value(old)?,
                    "\nnew {}\nold {}\nbody {}",
                    String::from_utf8_lossy(&new.payload),
                    String::from_utf8_lossy(&old.payload),
                    body
                );
            }
            (new, old) => {
                return Err(TestCaseError::fail(format!(
                    "new {new:?}\nold {old:?}\nbody {body}"
                )))
            }
        }
    }
    Ok(())
}

fn check_single(body: &str, kind: EventType, limits: &Limits) -> Result<(), TestCaseError> {
    let new = parse_single(body.as_bytes(), kind, arrival(limits));
    let old = oracle::parse_single(body.as_bytes(), kind, arrival(limits));
    same(body, new, old)
}

fn check_batch(body: &str, limits: &Limits) -> Result<(), TestCaseError> {
    let new = parse_batch(body.as_bytes(), arrival(limits));
    let old = oracle::parse_batch(body.as_bytes(), arrival(limits));
    same(body, new, old)
}

fn check_webhook(body: &str, limits: &Limits) -> Result<(), TestCaseError> {
    let new = parse_webhook(body.as_bytes(), arrival(limits));
    let old = oracle::parse_webhook(body.as_bytes(), arrival(limits));
    same(body, new, old)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn single_events_agree_with_the_oracle(
        event in item(),
        kind in kind(),
        limits in limits(),
    ) {
        check_single(&event.text(), kind, &limits)?;
    }

    #[test]
    fn batches_agree_with_the_oracle(body in batch_body(), limits in limits()) {
        check_batch(&body, &limits)?;
    }

    #[test]
    fn webhooks_agree_with_the_oracle(
        items in vec(item(), 0..5),
        single in any::<bool>(),
        limits in limits(),
    ) {
        let body = match items.first() {
            Some(first) if single => first.text(),
            _ => Json::Array(items, 1).text(),
        };
        check_webhook(&body, &limits)?;
    }

    #[test]
    fn arbitrary_bytes_agree_with_the_oracle(
        body in prop_oneof![
            vec(any::<u8>(), 0..64),
            "[\\[\\]{}\":,0-9a-z \\\\]{0,40}".prop_map(String::into_bytes),
        ],
        kind in kind(),
    ) {
        let limits = Limits::default();
        let text = String::from_utf8_lossy(&body).into_owned();
        same(
            &text,
            parse_single(&body, kind, arrival(&limits)),
            oracle::parse_single(&body, kind, arrival(&limits)),
        )?;
        same(
            &text,
            parse_batch(&body, arrival(&limits)),
            oracle::parse_batch(&body, arrival(&limits)),
        )?;
        same(
            &text,
            parse_webhook(&body, arrival(&limits)),
            oracle::parse_webhook(&body, arrival(&limits)),
        )?;
    }
}

// ---------------------------------------------------------------------------------------
// Named cases (each also checked against the oracle)
// ---------------------------------------------------------------------------------------

fn agree(body: &str) {
    let limits = Limits::default();
    check_batch(&format!(r#"{{"batch":[{body}]}}"#), &limits).expect("batch agrees");
    check_single(body, EventType::Track, &limits).expect("single agrees");
    check_webhook(body, &limits).expect("webhook agrees");
    check_webhook(&format!("[{body}]"), &limits).expect("webhook array agrees");
}

#[test]
fn named_odd_shapes_agree_with_the_oracle() {
    let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    for body in [
        r#"{"type":"track","userId":"a","userId":"b","event":"E","event":""}"#.to_string(),
        r#"{"type":"track","us\u0065rId":"a","userId":7,"event":"E"}"#.to_string(),
        r#"{"type":"page","anonymousId":"a","x":1,"y":2,"x":3,"y":{"z":1,"z":2}}"#.to_string(),
        r#"{"type":"page","userId":-0,"anonymousId":1E2}"#.to_string(),
        r#"{"type":"page","userId":"","anonymousId":12345678901234567890123}"#.to_string(),
        r#"{"type":"page","userId":"u","p":1e400}"#.to_string(),
        r#"{"type":"page","userId":"u","p":"\ud800"}"#.to_string(),
        r#"{"type":"page","userId":"u","p":"\ud83d\ude00"}"#.to_string(),
        format!(r#"{{"type":"page","userId":"u","p":{}}}"#, deep(126)),
        format!(r#"{{"type":"page","userId":"u","p":{}}}"#, deep(127)),
        r#"{"type":"identify","anonymousId":"a","traits":{"email":"x@y","email":" "}}"#
            .to_string(),
        r#"{"type":"identify","anonymousId":"a","context":{"traits":null,"traits":{"email":"c@d"}}}"#
            .to_string(),
        r#"{"type":"page","anonymousId":"a","timestamp":"2025-01-02T03:00:00Z","sentAt":null}"#
            .to_string(),
        r#"{"type":"page","anonymousId":"a","timestamp":null,"originalTimestamp":5}"#.to_string(),
        r#"{"type":"page","anonymousId":"a","writeKey":"k","write\u004bey":"k2"}"#.to_string(),
        " \n{ \"type\" : \"page\" , \"anonymousId\" : \"a\" } \t".to_string(),
    ] {
        agree(&body);
    }
}

#[test]
fn batch_level_merges_agree_with_the_oracle() {
    let limits = Limits::default();
    for body in [
        r#"{"context":{"a":1,"traits":{"email":"b@x"}},"integrations":{"All":false},
            "sentAt":"2025-01-02T03:00:10.000Z","batch":[
            {"type":"page","anonymousId":"a","context":{}},
            {"type":"page","anonymousId":"a","context":{ }},
            {"type":"page","anonymousId":"a","context":null,"integrations":[1]},
            {"type":"page","anonymousId":"a","context":{"a":2,"a":3},"integrations":{"x":1}},
            {"type":"page","anonymousId":"a","context":{"traits":5}},
            {"type":"page","anonymousId":"a","sentAt":"2025-01-02T03:00:00Z",
             "timestamp":"2025-01-02T03:00:00Z"}
        ]}"#,
        r#"{"sentAt":"nonsense","batch":[
            {"type":"page","anonymousId":"a","timestamp":"2025-01-02T03:00:00Z",
             "sentAt":"2025-01-02T03:00:10Z"}]}"#,
        r#"{"sentAt":null,"context":[],"batch":[
            {"type":"page","anonymousId":"a","timestamp":"2025-01-02T03:00:00Z",
             "sentAt":"2025-01-02T03:00:10Z"}]}"#,
    ] {
        check_batch(body, &limits).expect("agrees");
    }
}

#[test]
fn fast_timestamps_match_chrono() {
    let mut ms: i64 = -5;
    let mut samples = vec![0, 1, -1, 253_402_300_799_999, 253_402_300_800_000, i64::MIN];
    for _ in 0..20_000 {
        samples.push(ms);
        ms = ms
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        samples.push(ms.rem_euclid(260_000_000_000_000));
    }
    for ms in samples {
        assert_eq!(
            time::format_timestamp(ms),
            time::chrono_timestamp(ms),
            "{ms}"
        );
    }
}
