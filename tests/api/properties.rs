//! Property tests: whatever arrives (arbitrary bytes, arbitrary or hostile JSON, Segment-shaped
//! events with odd values; any route, with or without auth, gzip or a signature), the gateway
//! answers below 500 with Segment's body shapes, never panics, and keeps serving. The pure
//! parsers get many more cases, and every event they accept keeps the documented invariants.

use std::fmt;
use std::io::Write;
use std::time::Duration;

use hmac::{Hmac, Mac};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use refiner_gateway::segment::{
    first_array_element, parse_batch, parse_single, parse_webhook, Arrival, EventType, Limits,
    Parsed, Reject,
};
use serde_json::Value;
use sha1::Sha1;

use crate::helpers::{basic, spawn_app, TestApp, OTHER_KEY, WEBHOOK_SECRET, WRITE_KEY};

// ---------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------

const ROUTES: &[&str] = &[
    "/v1/track",
    "/v1/t",
    "/v1/identify",
    "/v1/batch",
    "/v1/b",
    "/v1/import",
    "/webhook",
    "/webhook/hooked",
    "/webhook/default",
];

const SEGMENT_KEYS: &[&str] = &[
    "type",
    "userId",
    "anonymousId",
    "messageId",
    "event",
    "traits",
    "properties",
    "context",
    "integrations",
    "timestamp",
    "sentAt",
    "originalTimestamp",
    "receivedAt",
    "groupId",
    "previousId",
    "name",
    "writeKey",
    "email",
    "batch",
];

const TYPES: &[&str] = &[
    "track", "identify", "page", "screen", "group", "alias", "delete", "Track", "", "bogus",
];

/// JSON string literals, odd ones included: lone surrogates, NUL, long strings around the
/// 32 KB event limit, timestamps chrono may or may not accept.
fn string_literal() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<String>().prop_map(|s| quote(&s)),
        3 => "[a-zA-Z0-9@._ -]{0,24}".prop_map(|s| quote(&s)),
        2 => timestamp().prop_map(|s| quote(&s)),
        1 => select(vec![
            r#""\ud800""#,
            r#""\udc00\ud800""#,
            r#""\u0000""#,
            r#""\uDBFF\uDFFF""#,
            r#""\"\\\/\b\f\n\r\t""#,
            r#""\x""#,
            "\"\u{feff}\"",
            "\"\u{10ffff}\"",
        ])
        .prop_map(str::to_string),
        1 => (1usize..40_000).prop_map(|n| quote(&"x".repeat(n))),
    ]
}

fn timestamp() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,12})?(Z|[+-][0-9]{2}:[0-9]{2})?",
        "[+-]?[0-9]{1,7}-[0-9]{1,2}-[0-9]{1,2}T[0-9]{1,2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{3})?Z",
        select(vec![
            "2015-2-02T00:30:08.276Z",
            "+275760-09-13T00:00:00Z",
            "-271821-04-20T00:00:00Z",
            "9999-12-31T23:59:59.999Z",
            "0000-01-01T00:00:00Z",
            "2024-02-30T00:00:00Z",
            "2024-01-01T00:00:00+23:59",
            "2024-01-01T00:00:00-23:59",
            "2024-01-01T24:00:00Z",
            "2024-01-01T23:59:60Z",
            "2024-01-01T00:00:00.123456789",
            "2024-01-01 00:00:00",
            "",
        ])
        .prop_map(str::to_string),
    ]
}

/// Number literals, including ones no `f64` or `i64` holds.
fn number_literal() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| serde_json::to_string(&f).unwrap_or_default()),
        "-?[1-9][0-9]{19,400}",
        "-?[0-9]\\.[0-9]{1,5}[eE][+-]?[0-9]{1,6}",
        select(vec![
            "-0", "0.0", "1e400", "-1e400", "1e-400", "01", "1.", ".5", "+1"
        ])
        .prop_map(str::to_string),
    ]
}

/// Arbitrary JSON-ish text: mostly valid JSON, sometimes invalid in the odd places.
fn json_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        select(vec!["null", "true", "false"]).prop_map(str::to_string),
        number_literal(),
        string_literal(),
    ];
    leaf.prop_recursive(6, 96, 8, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..8).prop_map(|items| format!("[{}]", items.join(","))),
            vec((key_literal(), inner), 0..8).prop_map(object),
        ]
    })
}

fn key_literal() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => select(SEGMENT_KEYS).prop_map(quote),
        1 => string_literal(),
    ]
}

/// Nesting far beyond any parser's recursion limit, closed or not.
fn deep_nesting() -> impl Strategy<Value = String> {
    (1usize..5000, any::<bool>(), any::<bool>(), json_text()).prop_map(
        |(depth, arrays, closed, inner)| {
            let (open, close) = if arrays {
                ("[", "]")
            } else {
                (r#"{"properties":"#, "}")
            };
            let mut text = String::from(r#"{"type":"track","userId":"u","event":"e","p":"#);
            text.push_str(&open.repeat(depth));
            text.push_str(&inner);
            if closed {
                text.push_str(&close.repeat(depth));
            }
            text.push('}');
            text
        },
    )
}

/// A Segment event, mostly well formed, with random fields layered over it (later keys win).
fn event_text() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        3 => json_text(),
        2 => "[a-z0-9-]{1,12}".prop_map(|s| quote(&s)),
        1 => select(TYPES).prop_map(quote),
        1 => (90usize..110).prop_map(|n| quote(&"m".repeat(n))),
        1 => Just(quote(WRITE_KEY)),
    ];
    (
        select(TYPES),
        "[a-z0-9]{0,8}",
        proptest::option::of("[a-z0-9]{1,12}"),
        vec((select(SEGMENT_KEYS), value), 0..4),
        select(vec![None, Some(WRITE_KEY), Some(OTHER_KEY), Some("nope")]),
    )
        .prop_map(|(kind, user, message_id, extra, write_key)| {
            let mut pairs = vec![
                (quote("type"), quote(kind)),
                (quote("userId"), quote(&user)),
                (quote("event"), quote("Clicked")),
                (quote("groupId"), quote("g")),
                (quote("previousId"), quote("p")),
            ];
            if let Some(id) = message_id {
                pairs.push((quote("messageId"), quote(&id)));
            }
            if let Some(key) = write_key {
                pairs.push((quote("writeKey"), quote(key)));
            }
            pairs.extend(extra.into_iter().map(|(k, v)| (quote(k), v)));
            object(pairs)
        })
}

/// A `/v1/batch` body: events and odd items, with batch-level fields.
fn batch_text() -> impl Strategy<Value = String> {
    let item = prop_oneof![4 => event_text(), 1 => json_text()];
    (
        vec(item, 0..12),
        select(vec![None, Some(WRITE_KEY), Some(OTHER_KEY), Some("nope")]),
        proptest::option::of(json_text()),
        proptest::option::of(json_text()),
        proptest::option::of(prop_oneof![
            timestamp().prop_map(|t| quote(&t)),
            json_text()
        ]),
    )
        .prop_map(|(items, write_key, context, integrations, sent_at)| {
            let mut pairs = vec![(quote("batch"), format!("[{}]", items.join(",")))];
            if let Some(key) = write_key {
                pairs.push((quote("writeKey"), quote(key)));
            }
            for (name, value) in [
                ("context", context),
                ("integrations", integrations),
                ("sentAt", sent_at),
            ] {
                if let Some(value) = value {
                    pairs.push((quote(name), value));
                }
            }
            object(pairs)
        })
}

/// Segment-shaped bodies of every kind the routes take.
fn segment_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => event_text().prop_map(String::into_bytes),
        3 => batch_text().prop_map(String::into_bytes),
        2 => vec(event_text(), 0..8).prop_map(|items| format!("[{}]", items.join(",")).into_bytes()),
        1 => (event_text(), any::<prop::sample::Index>(), select(vec![
            &[0xff_u8][..],
            &[0xc3, 0x28],
            &[0xed, 0xa0, 0x80],
            &[0xf4, 0x90, 0x80, 0x80],
            &[0xe2, 0x82],
        ]))
            .prop_map(|(text, at, bad)| {
                // Invalid UTF-8 spliced in, often inside a string.
                let mut bytes = text.into_bytes();
                let at = at.index(bytes.len() + 1);
                bytes.splice(at..at, bad.iter().copied());
                bytes
            }),
    ]
}

fn arbitrary_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => vec(any::<u8>(), 0..2048),
        1 => vec(select(b"{}[]\",:0123456789.eE+-truefalsnl \\u".to_vec()), 0..512),
        1 => (vec(any::<u8>(), 0..256), select(vec![&b"\x1f\x8b\x08\x00"[..], &b"["[..], &b"{\"batch\":"[..]]))
            .prop_map(|(tail, head)| [head, &tail[..]].concat()),
    ]
}

fn any_json_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => json_text().prop_map(String::into_bytes),
        1 => deep_nesting().prop_map(String::into_bytes),
    ]
}

fn quote(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default()
}

fn object(pairs: Vec<(String, String)>) -> String {
    let fields: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    format!("{{{}}}", fields.join(","))
}

// ---------------------------------------------------------------------------------------
// HTTP properties
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Auth {
    None,
    Basic(&'static str),
    Raw(&'static str),
}

#[derive(Clone, Copy, Debug)]
enum Encoding {
    Identity,
    /// The body gzipped, with `Content-Encoding: gzip`.
    Gzip,
    /// The header claims gzip; the body is not.
    ClaimsGzip,
    Header(&'static str),
}

#[derive(Clone, Copy, Debug)]
enum Signature {
    None,
    /// A valid `X-Signature` with the `hooked` source's secret.
    Valid,
    Header(&'static str),
}

#[derive(Clone)]
struct Case {
    route: &'static str,
    body: Vec<u8>,
    auth: Auth,
    encoding: Encoding,
    content_type: Option<&'static str>,
    signature: Signature,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<u8> = self.body.iter().take(2000).copied().collect();
        f.debug_struct("Case")
            .field("route", &self.route)
            .field("auth", &self.auth)
            .field("encoding", &self.encoding)
            .field("content_type", &self.content_type)
            .field("signature", &self.signature)
            .field("body_len", &self.body.len())
            .field("body", &shown.escape_ascii().to_string())
            .finish()
    }
}

/// Any body on any route.
fn anywhere(
    body: impl Strategy<Value = Vec<u8>>,
) -> impl Strategy<Value = (&'static str, Vec<u8>)> {
    (select(ROUTES), body)
}

/// Segment-shaped bodies, mostly on the routes made for them.
fn segment_targets() -> impl Strategy<Value = (&'static str, Vec<u8>)> {
    let single = select(vec![
        "/v1/track",
        "/v1/t",
        "/v1/identify",
        "/v1/i",
        "/v1/page",
        "/v1/g",
    ]);
    let batch = select(vec!["/v1/batch", "/v1/b", "/v1/import"]);
    let webhook = select(vec!["/webhook", "/webhook/hooked"]);
    let event = || event_text().prop_map(String::into_bytes);
    prop_oneof![
        3 => (single, event()),
        3 => (batch, batch_text().prop_map(String::into_bytes)),
        2 => (webhook.clone(), event()),
        2 => (webhook, vec(event_text(), 0..8)
            .prop_map(|items| format!("[{}]", items.join(",")).into_bytes())),
        2 => anywhere(segment_body()),
    ]
}

fn case(targets: impl Strategy<Value = (&'static str, Vec<u8>)>) -> impl Strategy<Value = Case> {
    (
        targets,
        prop_oneof![
            3 => Just(Auth::Basic(WRITE_KEY)),
            2 => Just(Auth::None),
            1 => Just(Auth::Basic(OTHER_KEY)),
            1 => Just(Auth::Basic("nope")),
            1 => select(vec![
                "Basic !!!not-base64",
                "Basic",
                "Basic Og==",
                "Basic //79",
                "Bearer token",
                "basic dGVzdC13cml0ZS1rZXk6",
                "",
            ])
            .prop_map(Auth::Raw),
        ],
        prop_oneof![
            3 => Just(Encoding::Identity),
            2 => Just(Encoding::Gzip),
            1 => Just(Encoding::ClaimsGzip),
            1 => select(vec!["br", "gzip, deflate", "identity", "GZIP", " x-gzip ", ""])
                .prop_map(Encoding::Header),
        ],
        select(vec![
            None,
            Some("application/json"),
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
        ]),
        prop_oneof![
            2 => Just(Signature::None),
            2 => Just(Signature::Valid),
            1 => select(vec!["", "zz", "sha1=00", "0000000000000000000000000000000000000000"])
                .prop_map(Signature::Header),
        ],
    )
        .prop_map(
            |((route, body), auth, encoding, content_type, signature)| Case {
                route,
                body,
                auth,
                encoding,
                content_type,
                signature,
            },
        )
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("compress");
    encoder.finish().expect("compress")
}

fn sign(body: &[u8]) -> String {
    let signed = first_array_element(body).unwrap_or(body);
    let mut mac = Hmac::<Sha1>::new_from_slice(WEBHOOK_SECRET.as_bytes()).expect("hmac key");
    mac.update(signed);
    hex::encode(mac.finalize().into_bytes())
}

/// Sends one case; the answer must be below 500 and shaped as Segment's clients expect.
async fn exchange(app: &TestApp, case: &Case) -> Result<u16, TestCaseError> {
    let mut request = app
        .client
        .post(app.url(case.route))
        .timeout(Duration::from_secs(20));
    match case.auth {
        Auth::None => {}
        Auth::Basic(key) => request = request.header("Authorization", basic(key)),
        Auth::Raw(value) => request = request.header("Authorization", value),
    }
    if let Some(content_type) = case.content_type {
        request = request.header("Content-Type", content_type);
    }
    match case.signature {
        Signature::None => {}
        Signature::Valid => request = request.header("X-Signature", sign(&case.body)),
        Signature::Header(value) => request = request.header("X-Signature", value),
    }
    let body = match case.encoding {
        Encoding::Identity => case.body.clone(),
        Encoding::Gzip => {
            request = request.header("Content-Encoding", "gzip");
            gzip(&case.body)
        }
        Encoding::ClaimsGzip => {
            request = request.header("Content-Encoding", "gzip");
            case.body.clone()
        }
        Encoding::Header(value) => {
            request = request.header("Content-Encoding", value);
            case.body.clone()
        }
    };
    let response = request
        .body(body)
        .send()
        .await
        .map_err(|e| TestCaseError::fail(format!("no answer (did a handler panic?): {e}")))?;
    let status = response.status().as_u16();
    let answer = response
        .bytes()
        .await
        .map_err(|e| TestCaseError::fail(format!("answer body cut off: {e}")))?;
    let shown = String::from_utf8_lossy(&answer);
    prop_assert!(status < 500, "answered {} {}", status, shown);
    if status == 200 && &answer[..] != br#"{"success":true}"# {
        // Events of a batch refused one by one are listed; nothing else is ever added.
        let body: Value = serde_json::from_slice(&answer)
            .map_err(|_| TestCaseError::fail(format!("200 body is not JSON: {shown}")))?;
        let object = body.as_object().cloned().unwrap_or_default();
        prop_assert_eq!(object.len(), 2, "200 body: {}", shown);
        prop_assert_eq!(&body["success"], &Value::Bool(true), "200 body: {}", shown);
        let refused = body["refused"].as_array().cloned().unwrap_or_default();
        prop_assert!(!refused.is_empty(), "200 body: {}", shown);
        for event in refused {
            let code = event["code"].as_str().unwrap_or_default();
            prop_assert!(
                event["index"].is_u64()
                    && event["message"].is_string()
                    && [
                        "event_too_large",
                        "message_id_too_long",
                        "invalid_message_id"
                    ]
                    .contains(&code),
                "200 body: {}",
                shown
            );
        }
    } else if status != 200 {
        let error: Value = serde_json::from_slice(&answer)
            .map_err(|_| TestCaseError::fail(format!("{status} body is not JSON: {shown}")))?;
        prop_assert!(
            error["code"].is_string() && error["message"].is_string(),
            "{} body lacks code/message: {}",
            status,
            shown
        );
    }
    Ok(status)
}

/// Runs `cases` requests against one gateway, then checks it still serves. With
/// `expect_queued`, some generated events must have reached the spool (the run exercised
/// the accept path, not only refusals).
fn check_http(name: &str, cases: u32, expect_queued: bool, strategy: impl Strategy<Value = Case>) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let app = runtime.block_on(spawn_app());
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 512,
        ..Config::default()
    });
    let statuses = std::sync::Mutex::new(std::collections::BTreeMap::<u16, usize>::new());
    let result = runner.run(&strategy, |case| {
        let status = runtime.block_on(exchange(&app, &case))?;
        *statuses.lock().expect("lock").entry(status).or_default() += 1;
        Ok(())
    });
    let statuses = statuses.into_inner().expect("lock");
    eprintln!("{name}: answers by status {statuses:?}");

    // Still alive and still accepting afterwards.
    let queued = runtime.block_on(async {
        let health = app
            .client
            .get(app.url("/healthz"))
            .send()
            .await
            .expect("/healthz answers after the run");
        assert_eq!(health.status(), 200, "{name}: /healthz after the run");
        let id = format!("after-{name}");
        let response = app
            .post_basic(
                "/v1/track",
                &format!(r#"{{"userId":"u-after","event":"Still Here","messageId":"{id}"}}"#),
            )
            .await;
        assert_eq!(
            response.status(),
            200,
            "{name}: a valid event after the run"
        );
        let spooled = app.spooled().await;
        assert!(
            spooled.iter().any(|e| e.message_id == id),
            "{name}: the valid event after the run is not in the spool"
        );
        spooled.len() - 1
    });
    eprintln!("{name}: {queued} generated events queued");
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    assert!(
        !expect_queued || queued > 0,
        "{name}: no generated event was accepted; the strategy misses the accept path"
    );
    runtime.block_on(app.stop());
}

#[test]
fn arbitrary_bytes_on_every_route_never_get_a_5xx() {
    check_http("bytes", 128, false, case(anywhere(arbitrary_bytes())));
}

#[test]
fn arbitrary_json_on_every_route_never_gets_a_5xx() {
    check_http("json", 128, false, case(anywhere(any_json_body())));
}

#[test]
fn segment_shaped_requests_on_every_route_never_get_a_5xx() {
    check_http("segment", 128, true, case(segment_targets()));
}

// ---------------------------------------------------------------------------------------
// Pure properties of the parsers
// ---------------------------------------------------------------------------------------

fn fresh_id() -> String {
    "generated-message-id".into()
}

fn limits() -> impl Strategy<Value = Limits> {
    prop_oneof![
        3 => Just(Limits::default()),
        1 => (1usize..4096, 1usize..8192, 1usize..16, 1usize..8192, 1usize..16, 1usize..120)
            .prop_map(|(event, batch, events, webhook, webhook_events, id)| Limits {
                max_event_bytes: event,
                max_batch_bytes: batch,
                max_batch_events: events,
                max_webhook_bytes: webhook,
                max_webhook_events: webhook_events,
                max_message_id_len: id,
                max_batch_merged_bytes: batch * 2,
                ..Limits::default()
            }),
    ]
}

fn received_at() -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => 0i64..4_102_444_800_000,
        1 => any::<i64>(),
    ]
}

fn kind() -> impl Strategy<Value = EventType> {
    select(EventType::ALL.to_vec())
}

/// Every accepted event keeps the invariants the `segment` module documents.
fn check_parsed(
    parsed: &Result<Parsed, Reject>,
    limits: &Limits,
    forced: Option<EventType>,
) -> Result<(), TestCaseError> {
    let Ok(parsed) = parsed else { return Ok(()) };
    for event in parsed.items.iter().flatten() {
        prop_assert!(!event.message_id.is_empty());
        // The limit binds the ids clients send; a generated id is whatever length it is.
        prop_assert!(
            event.message_id == fresh_id()
                || event.message_id.chars().count() <= limits.max_message_id_len
        );
        prop_assert!(
            event.user_key.identity().is_some(),
            "user_key {:?}",
            event.user_key
        );
        if let Some(kind) = forced {
            prop_assert_eq!(event.kind, kind);
        }
        let payload: Value = serde_json::from_slice(&event.payload)
            .map_err(|e| TestCaseError::fail(format!("payload is not JSON: {e}")))?;
        let object = payload
            .as_object()
            .ok_or_else(|| TestCaseError::fail("payload is not an object"))?;
        prop_assert_eq!(&object["type"], &Value::from(event.kind.as_str()));
        prop_assert_eq!(
            &object["messageId"],
            &Value::from(event.message_id.as_str())
        );
        prop_assert!(object["receivedAt"].is_string());
        prop_assert!(object["timestamp"].is_string());
        prop_assert!(!object.contains_key("writeKey"));
    }
    Ok(())
}

fn parse_all(
    body: &[u8],
    kind: EventType,
    limits: &Limits,
    received_at_ms: i64,
) -> Result<(), TestCaseError> {
    let arrival = Arrival {
        received_at_ms,
        limits,
        new_message_id: fresh_id,
    };
    if kind != EventType::Delete {
        check_parsed(&parse_single(body, kind, arrival), limits, Some(kind))?;
    }
    check_parsed(&parse_batch(body, arrival), limits, None)?;
    check_parsed(&parse_webhook(body, arrival), limits, None)?;
    if let Some(first) = first_array_element(body) {
        prop_assert!(serde_json::from_slice::<&serde_json::value::RawValue>(first).is_ok());
    }
    Ok(())
}

proptest! {
    #![proptest_config(Config {
        cases: 2000,
        failure_persistence: None,
        ..Config::default()
    })]

    #[test]
    fn parsers_never_panic_on_arbitrary_bytes(
        body in arbitrary_bytes(),
        kind in kind(),
        limits in limits(),
        received_at_ms in received_at(),
    ) {
        parse_all(&body, kind, &limits, received_at_ms)?;
    }

    #[test]
    #[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
    fn parsers_never_panic_on_arbitrary_json(
        body in any_json_body(),
        kind in kind(),
        limits in limits(),
        received_at_ms in received_at(),
    ) {
        parse_all(&body, kind, &limits, received_at_ms)?;
    }

    #[test]
    #[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
    fn parsers_keep_event_invariants_on_segment_shaped_input(
        body in segment_body(),
        kind in kind(),
        limits in limits(),
        received_at_ms in received_at(),
    ) {
        parse_all(&body, kind, &limits, received_at_ms)?;
    }
}
