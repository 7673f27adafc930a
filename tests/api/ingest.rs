//! `/v1/*` over real HTTP: routes, auth, bodies, limits, skips, normalization, dedup, CORS
//! and the operational routes. Every test checks the answer and what the spool holds.

use std::io::Write;

use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use serde_json::{json, Value};

use crate::helpers::{basic, payload, spawn_app, spawn_app_in, TestApp, OTHER_KEY, WRITE_KEY};

// ---------------------------------------------------------------------------------------
// Shared assertions (also used by `webhook.rs`).
// ---------------------------------------------------------------------------------------

/// The answer is exactly `200 {"success":true}` as JSON.
pub async fn assert_success(response: reqwest::Response) {
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = response.text().await.expect("body");
    assert_eq!(status, 200, "body: {body}");
    assert!(
        content_type.starts_with("application/json"),
        "content-type {content_type}"
    );
    assert_eq!(body, r#"{"success":true}"#);
}

/// The answer has `status` and a JSON body `{"code": code, "message": <non-empty>}`.
pub async fn assert_error(response: reqwest::Response, status: u16, code: &str) -> Value {
    let actual = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let text = response.text().await.expect("body");
    assert_eq!(actual, status, "body: {text}");
    assert!(
        content_type.starts_with("application/json"),
        "content-type {content_type}, body {text}"
    );
    let body: Value = serde_json::from_str(&text).expect("error body is JSON");
    assert_eq!(body["code"], code, "body: {text}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "message missing in {text}"
    );
    body
}

/// The value of a counter in `GET /metrics` whose labels include `labels` (0 when the
/// series does not exist yet).
pub async fn metric(app: &TestApp, name: &str, labels: &[(&str, &str)]) -> f64 {
    let response = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("metrics body");
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((label_part, value)) = rest.split_once("} ") else {
            continue;
        };
        let present: Vec<&str> = label_part.split(',').collect();
        if wanted.iter().all(|w| present.contains(&w.as_str())) {
            return value.trim().parse().expect("metric value");
        }
    }
    0.0
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).expect("compress");
    encoder.finish().expect("compress")
}

pub fn parse_time(value: &Value) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(value.as_str().expect("timestamp is a string"))
        .expect("RFC 3339 timestamp")
        .with_timezone(&Utc)
}

fn basic_without_colon(key: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(key)
    )
}

async fn post_with(
    app: &TestApp,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    let mut request = app.client.post(app.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(body).send().await.expect("request")
}

// ---------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn full_paths_imply_the_type() {
    let app = spawn_app().await;
    let cases = [
        (
            "/v1/identify",
            json!({"userId": "u1", "messageId": "m-identify", "traits": {"email": "a@example.com"}}),
            "identify",
        ),
        (
            "/v1/track",
            json!({"userId": "u2", "messageId": "m-track", "event": "Signed Up"}),
            "track",
        ),
        (
            "/v1/page",
            json!({"userId": "u3", "messageId": "m-page", "name": "Home"}),
            "page",
        ),
        (
            "/v1/screen",
            json!({"anonymousId": "a4", "messageId": "m-screen", "name": "Home"}),
            "screen",
        ),
        (
            "/v1/group",
            json!({"userId": "u5", "messageId": "m-group", "groupId": "g1"}),
            "group",
        ),
        (
            "/v1/alias",
            json!({"userId": "u6", "messageId": "m-alias", "previousId": "a6"}),
            "alias",
        ),
    ];
    for (path, body, _) in &cases {
        assert_success(app.post_basic(path, &body.to_string()).await).await;
    }
    let events = app.spooled().await;
    assert_eq!(events.len(), cases.len());
    for ((_, body, kind), event) in cases.iter().zip(&events) {
        let stored = payload(event);
        assert_eq!(event.kind.as_str(), *kind);
        assert_eq!(event.source, "default");
        assert_eq!(stored["type"], *kind);
        assert_eq!(event.message_id, body["messageId"].as_str().expect("id"));
        assert_eq!(stored["messageId"], body["messageId"]);
        for field in [
            "userId",
            "anonymousId",
            "event",
            "groupId",
            "previousId",
            "traits",
        ] {
            assert_eq!(stored.get(field), body.get(field), "{kind}.{field}");
        }
    }
    assert_eq!(events[0].user_key, "u:u1");
    assert_eq!(events[3].user_key, "a:a4");
}

#[tokio::test]
async fn one_letter_paths_imply_the_type() {
    let app = spawn_app().await;
    let cases = [
        ("/v1/i", "identify", json!({})),
        ("/v1/t", "track", json!({"event": "Clicked"})),
        ("/v1/p", "page", json!({})),
        ("/v1/s", "screen", json!({})),
        ("/v1/g", "group", json!({"groupId": "g1"})),
        ("/v1/a", "alias", json!({"previousId": "old"})),
    ];
    for (index, (path, _, extra)) in cases.iter().enumerate() {
        let mut body = extra.clone();
        body["userId"] = json!(format!("u{index}"));
        body["messageId"] = json!(format!("short-{index}"));
        assert_success(app.post_basic(path, &body.to_string()).await).await;
    }
    let events = app.spooled().await;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    let expected: Vec<&str> = cases.iter().map(|(_, kind, _)| *kind).collect();
    assert_eq!(kinds, expected);
    for (index, event) in events.iter().enumerate() {
        let stored = payload(event);
        assert_eq!(stored["type"], expected[index]);
        assert_eq!(stored["userId"], format!("u{index}"));
        assert_eq!(event.message_id, format!("short-{index}"));
    }
}

#[tokio::test]
async fn the_path_overrides_a_type_in_the_body() {
    let app = spawn_app().await;
    let body = json!({"type": "track", "userId": "u1", "messageId": "m1"});
    assert_success(app.post_basic("/v1/identify", &body.to_string()).await).await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind.as_str(), "identify");
    assert_eq!(payload(&events[0])["type"], "identify");
}

#[tokio::test]
async fn batch_routes_queue_every_item() {
    let app = spawn_app().await;
    for path in ["/v1/batch", "/v1/b", "/v1/import"] {
        let body = json!({"batch": [
            {"type": "identify", "userId": "u1", "messageId": format!("{path}-1"), "traits": {"plan": "pro"}},
            {"type": "track", "userId": "u1", "messageId": format!("{path}-2"), "event": "Paid"},
            {"type": "page", "anonymousId": "a1", "messageId": format!("{path}-3")},
            {"type": "screen", "userId": "u2", "messageId": format!("{path}-4")},
            {"type": "group", "userId": "u2", "groupId": "g", "messageId": format!("{path}-5")},
            {"type": "alias", "userId": "u3", "previousId": "a1", "messageId": format!("{path}-6")},
        ]});
        assert_success(app.post_basic(path, &body.to_string()).await).await;
        let events = app.spooled().await;
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["identify", "track", "page", "screen", "group", "alias"],
            "{path}"
        );
        let ids: Vec<String> = events.iter().map(|e| e.message_id.clone()).collect();
        let expected: Vec<String> = (1..=6).map(|i| format!("{path}-{i}")).collect();
        assert_eq!(ids, expected);
        assert_eq!(payload(&events[0])["traits"], json!({"plan": "pro"}));
        assert_eq!(payload(&events[1])["event"], "Paid");
        assert!(events.iter().all(|e| e.source == "default"));
    }
}

#[tokio::test]
async fn unknown_v1_path_is_a_json_404() {
    let app = spawn_app().await;
    let body = json!({"userId": "u1", "event": "E"}).to_string();
    assert_error(app.post_basic("/v1/trak", &body).await, 404, "not_found").await;
    assert!(app.spooled().await.is_empty());
}

#[tokio::test]
async fn unknown_route_is_a_json_404() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(app.url("/nope"))
        .send()
        .await
        .expect("request");
    assert_error(response, 404, "not_found").await;
    let response = app.post_basic("/v2/track", "{}").await;
    assert_error(response, 404, "not_found").await;
}

#[tokio::test]
async fn wrong_method_on_an_ingest_route_answers_json() {
    let app = spawn_app().await;
    // The POST-only routes do not match other methods, so the JSON 404 answers.
    for path in [
        "/v1/track",
        "/v1/t",
        "/v1/batch",
        "/webhook",
        "/webhook/hooked",
    ] {
        let response = app.client.get(app.url(path)).send().await.expect("request");
        assert_error(response, 404, "not_found").await;
        let response = app.client.put(app.url(path)).send().await.expect("request");
        assert_error(response, 404, "not_found").await;
    }
    assert!(app.spooled().await.is_empty());
}

// ---------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn basic_auth_with_and_without_the_trailing_colon() {
    let app = spawn_app().await;
    let with_colon = json!({"userId": "u1", "event": "E", "messageId": "colon"}).to_string();
    let response = post_with(
        &app,
        "/v1/track",
        &[("Authorization", &basic(WRITE_KEY))],
        with_colon,
    )
    .await;
    assert_success(response).await;
    let without = json!({"userId": "u1", "event": "E", "messageId": "no-colon"}).to_string();
    let auth = basic_without_colon(WRITE_KEY);
    let response = post_with(&app, "/v1/track", &[("Authorization", &auth)], without).await;
    assert_success(response).await;
    let events = app.spooled().await;
    let ids: Vec<&str> = events.iter().map(|e| e.message_id.as_str()).collect();
    assert_eq!(ids, ["colon", "no-colon"]);
    assert!(events.iter().all(|e| e.source == "default"));
}

#[tokio::test]
async fn body_write_key_alone_authenticates() {
    let app = spawn_app().await;
    // analytics-python >= 2.3 / analytics-node 3.0: no Authorization header at all.
    let batch = json!({
        "batch": [{"type": "track", "userId": "u1", "event": "E", "messageId": "py-1"}],
        "writeKey": WRITE_KEY,
        "sentAt": "2025-01-02T03:04:05.123456+00:00",
        "context": {"library": {"name": "analytics-python", "version": "2.3.4"}}
    });
    let response = post_with(
        &app,
        "/v1/batch",
        &[("Content-Type", "application/json")],
        batch.to_string(),
    )
    .await;
    assert_success(response).await;
    let single =
        json!({"userId": "u2", "event": "E", "messageId": "single-1", "writeKey": OTHER_KEY});
    assert_success(app.post_raw("/v1/track", single.to_string()).await).await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].message_id, "py-1");
    assert_eq!(events[0].source, "default");
    assert_eq!(events[1].message_id, "single-1");
    assert_eq!(events[1].source, "hooked");
}

#[tokio::test]
async fn basic_and_body_key_that_agree_are_accepted() {
    let app = spawn_app().await;
    let body = json!({"batch": [{"type": "identify", "userId": "u1", "messageId": "both"}], "writeKey": WRITE_KEY});
    assert_success(app.post_basic("/v1/batch", &body.to_string()).await).await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].source, "default");
}

#[tokio::test]
async fn basic_and_body_key_that_disagree_are_refused() {
    let app = spawn_app().await;
    let body = json!({"batch": [{"type": "identify", "userId": "u1"}], "writeKey": OTHER_KEY});
    let response = app.post_basic("/v1/batch", &body.to_string()).await;
    assert_error(response, 401, "write_key_mismatch").await;
    let single = json!({"userId": "u1", "event": "E", "writeKey": OTHER_KEY});
    let response = app.post_basic("/v1/track", &single.to_string()).await;
    assert_error(response, 401, "write_key_mismatch").await;
    assert!(app.spooled().await.is_empty());
}

#[tokio::test]
async fn unknown_or_missing_write_keys_are_refused() {
    let app = spawn_app().await;
    let event = json!({"userId": "u1", "event": "E"}).to_string();
    let response = post_with(
        &app,
        "/v1/track",
        &[("Authorization", &basic("nope"))],
        event.clone(),
    )
    .await;
    assert_error(response, 401, "unauthorized").await;
    let in_body = json!({"userId": "u1", "event": "E", "writeKey": "nope"}).to_string();
    assert_error(
        app.post_raw("/v1/track", in_body).await,
        401,
        "unauthorized",
    )
    .await;
    assert_error(
        app.post_raw("/v1/track", event.clone()).await,
        401,
        "unauthorized",
    )
    .await;
    let batch = json!({"batch": [{"type": "track", "userId": "u1", "event": "E"}]}).to_string();
    assert_error(app.post_raw("/v1/batch", batch).await, 401, "unauthorized").await;
    // A known key in the body does not excuse an unknown one in the header.
    let mixed = json!({"userId": "u1", "event": "E", "writeKey": WRITE_KEY}).to_string();
    let response = post_with(
        &app,
        "/v1/track",
        &[("Authorization", &basic("nope"))],
        mixed,
    )
    .await;
    assert_error(response, 401, "unauthorized").await;
    assert!(app.spooled().await.is_empty());
}

#[tokio::test]
async fn bearer_token_with_body_write_key_authenticates_by_the_body() {
    let app = spawn_app().await;
    let body = json!({"userId": "u1", "event": "E", "messageId": "oauth", "writeKey": WRITE_KEY});
    let response = post_with(
        &app,
        "/v1/track",
        &[("Authorization", "Bearer some.oauth.token")],
        body.to_string(),
    )
    .await;
    assert_success(response).await;
    let without_key = json!({"userId": "u1", "event": "E"}).to_string();
    let response = post_with(
        &app,
        "/v1/track",
        &[("Authorization", "Bearer some.oauth.token")],
        without_key,
    )
    .await;
    assert_error(response, 401, "unauthorized").await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].message_id, "oauth");
    assert_eq!(events[0].source, "default");
}

// ---------------------------------------------------------------------------------------
// Bodies: Content-Type and Content-Encoding
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn text_plain_is_parsed_as_json() {
    let app = spawn_app().await;
    let body =
        json!({"userId": "u1", "event": "Clicked", "messageId": "ajs-1", "properties": {"x": 1}});
    let response = post_with(
        &app,
        "/v1/t",
        &[
            ("Authorization", &basic(WRITE_KEY)),
            ("Content-Type", "text/plain"),
        ],
        body.to_string(),
    )
    .await;
    assert_success(response).await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 1);
    let stored = payload(&events[0]);
    assert_eq!(stored["event"], "Clicked");
    assert_eq!(stored["properties"], json!({"x": 1}));
}

#[tokio::test]
async fn gzip_bodies_are_inflated() {
    let app = spawn_app().await;
    let batch = json!({
        "batch": [
            {"type": "track", "userId": "u1", "event": "A", "messageId": "gz-1"},
            {"type": "identify", "userId": "u2", "messageId": "gz-2"}
        ]
    });
    let headers = [
        ("Authorization", basic(WRITE_KEY)),
        ("Content-Encoding", "gzip".to_string()),
        ("Content-Type", "application/json".to_string()),
    ];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let response = post_with(
        &app,
        "/v1/batch",
        &headers,
        gzip(batch.to_string().as_bytes()),
    )
    .await;
    assert_success(response).await;
    let single = json!({"userId": "u3", "event": "B", "messageId": "gz-3"});
    let response = post_with(
        &app,
        "/v1/track",
        &headers,
        gzip(single.to_string().as_bytes()),
    )
    .await;
    assert_success(response).await;
    let events = app.spooled().await;
    let ids: Vec<&str> = events.iter().map(|e| e.message_id.as_str()).collect();
    assert_eq!(ids, ["gz-1", "gz-2", "gz-3"]);
    assert_eq!(payload(&events[2])["event"], "B");
}

#[tokio::test]
async fn a_gzip_bomb_is_refused_without_inflating_it() {
    let app = spawn_app().await;
    let mut json_bomb = br#"{"batch":["#.to_vec();
    json_bomb.resize(50 * 1024 * 1024, b' ');
    let bomb = gzip(&json_bomb);
    assert!(bomb.len() < 100 * 1024, "bomb is {} bytes", bomb.len());
    let auth = basic(WRITE_KEY);
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Encoding", "gzip"),
    ];
    let response = post_with(&app, "/v1/batch", &headers, bomb.clone()).await;
    assert_error(response, 400, "payload_too_large").await;
    // On a single-event route the compressed bomb alone is over the 32 KB wire limit.
    let response = post_with(&app, "/v1/track", &headers, bomb).await;
    assert_error(response, 400, "payload_too_large").await;
    assert!(app.spooled().await.is_empty());
}

#[tokio::test]
async fn broken_gzip_is_refused() {
    let app = spawn_app().await;
    let auth = basic(WRITE_KEY);
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Encoding", "gzip"),
    ];
    let mut truncated = gzip(json!({"userId": "u1", "event": "E"}).to_string().as_bytes());
    truncated.truncate(truncated.len() - 6);
    let response = post_with(&app, "/v1/track", &headers, truncated).await;
    assert_error(response, 400, "invalid_gzip").await;
    let plain = json!({"userId": "u1", "event": "E"}).to_string();
    let response = post_with(&app, "/v1/track", &headers, plain).await;
    assert_error(response, 400, "invalid_gzip").await;
    assert!(app.spooled().await.is_empty());
}

#[tokio::test]
async fn unsupported_content_encoding_is_refused() {
    let app = spawn_app().await;
    let auth = basic(WRITE_KEY);
    let body = json!({"userId": "u1", "event": "E"}).to_string();
    for encoding in ["br", "deflate", "zstd"] {
        let headers = [
            ("Authorization", auth.as_str()),
            ("Content-Encoding", encoding),
        ];
        let response = post_with(&app, "/v1/track", &headers, body.clone()).await;
        assert_error(response, 400, "unsupported_content_encoding").await;
    }
    // identity is no encoding at all.
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Encoding", "identity"),
    ];
    assert_success(post_with(&app, "/v1/track", &headers, body).await).await;
    assert_eq!(app.spooled().await.len(), 1);
}

// ---------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------

/// A track event of about `size` bytes of JSON.
fn event_of_size(size: usize, message_id: &str) -> Value {
    let mut event = json!({"type": "track", "userId": "u1", "event": "Big", "messageId": message_id, "properties": {"blob": ""}});
    let overhead = event.to_string().len();
    event["properties"]["blob"] = json!("x".repeat(size.saturating_sub(overhead)));
    event
}

#[tokio::test]
async fn a_single_event_over_32_kb_is_refused() {
    let app = spawn_app().await;
    let big = event_of_size(32 * 1024 + 1, "big");
    assert_eq!(big.to_string().len(), 32 * 1024 + 1);
    // The wire body itself is over the single-event limit, so the body reader refuses it
    // before parsing: `payload_too_large`, a 400 like every limit.
    let response = app.post_basic("/v1/track", &big.to_string()).await;
    assert_error(response, 400, "payload_too_large").await;
    // Same when the body is gzip and only its inflated size is over the limit.
    let auth = basic(WRITE_KEY);
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Encoding", "gzip"),
    ];
    let response = post_with(&app, "/v1/t", &headers, gzip(big.to_string().as_bytes())).await;
    assert_error(response, 400, "payload_too_large").await;
    // Exactly at the limit is fine.
    let fits = event_of_size(32 * 1024, "fits");
    assert_eq!(fits.to_string().len(), 32 * 1024);
    assert_success(app.post_basic("/v1/track", &fits.to_string()).await).await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].message_id, "fits");
}

#[tokio::test]
async fn a_batch_up_to_4_mib_is_accepted_and_over_it_is_a_400_not_a_413() {
    let app = spawn_app().await;
    // RudderStack's SDKs send batches of up to 4 MB (Segment documents 500 KB).
    let batch = |count: usize, prefix: &str| {
        let items: Vec<Value> = (0..count)
            .map(|i| event_of_size(26 * 1024, &format!("{prefix}{i}")))
            .collect();
        json!({"batch": items}).to_string()
    };
    let fits = batch(150, "fits-");
    assert!(
        fits.len() > 3_900_000 && fits.len() <= 4 * 1024 * 1024,
        "{}",
        fits.len()
    );
    assert_success(app.post_basic("/v1/batch", &fits).await).await;
    assert_eq!(app.spooled().await.len(), 150);
    let over = batch(170, "over-");
    assert!(over.len() > 4 * 1024 * 1024, "{}", over.len());
    let response = app.post_basic("/v1/batch", &over).await;
    assert_error(response, 400, "payload_too_large").await;
    assert!(app.spooled().await.is_empty());
}

#[tokio::test]
async fn too_many_events_in_a_batch_are_refused() {
    let app = spawn_app().await;
    let items = |count: usize| -> Value {
        let items: Vec<Value> = (0..count)
            .map(|i| json!({"type": "track", "userId": format!("u{i}"), "event": "E", "messageId": format!("n{count}-{i}")}))
            .collect();
        json!({"batch": items})
    };
    let response = app.post_basic("/v1/batch", &items(2501).to_string()).await;
    let body = assert_error(response, 400, "too_many_events").await;
    assert!(body["message"].as_str().expect("message").contains("2501"));
    assert!(app.spooled().await.is_empty());
    assert_success(app.post_basic("/v1/batch", &items(2500).to_string()).await).await;
    assert_eq!(app.spooled().await.len(), 2500);
}

/// A 200 answer's body, checked to be JSON that says `success`.
async fn success_body(response: reqwest::Response) -> Value {
    let status = response.status();
    let text = response.text().await.expect("body");
    assert_eq!(status, 200, "body: {text}");
    let body: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(body["success"], true, "{text}");
    body
}

#[tokio::test]
async fn one_batch_item_over_32_kb_is_refused_and_the_others_are_accepted() {
    let app = spawn_app().await;
    let body = json!({"batch": [
        {"type": "track", "userId": "u1", "event": "small", "messageId": "small"},
        event_of_size(32 * 1024 + 1, "big"),
        {"type": "track", "userId": "u1", "event": "after", "messageId": "after"},
    ]});
    let answer = success_body(app.post_basic("/v1/batch", &body.to_string()).await).await;
    let refused = answer["refused"]
        .as_array()
        .expect("refused events are listed");
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["index"], 1);
    assert_eq!(refused[0]["code"], "event_too_large");
    assert!(refused[0]["message"]
        .as_str()
        .expect("message")
        .contains("event 1"));
    let ids = app.spooled_ids().await;
    assert_eq!(ids, ["small", "after"]);
    assert_eq!(
        metric(
            &app,
            "gateway_ingest_events_refused_total",
            &[("source", "default"), ("code", "event_too_large")]
        )
        .await,
        1.0
    );
    // Without refusals the answer is exactly Segment's.
    let clean = json!({"batch": [{"type": "track", "userId": "u1", "event": "E"}]});
    assert_success(app.post_basic("/v1/batch", &clean.to_string()).await).await;
}

#[tokio::test]
async fn malformed_json_is_refused() {
    let app = spawn_app().await;
    for (path, body) in [
        ("/v1/track", r#"{"userId": "u1", "event": "E""#),
        ("/v1/t", "not json"),
        ("/v1/batch", r#"{"batch": [{"type": "track",]}"#),
        ("/v1/b", ""),
    ] {
        let response = app.post_basic(path, body).await;
        assert_error(response, 400, "invalid_json").await;
    }
    assert!(app.spooled().await.is_empty());
}

#[tokio::test]
async fn a_message_id_over_100_characters_is_refused() {
    let app = spawn_app().await;
    let long = "m".repeat(101);
    let single = json!({"userId": "u1", "event": "E", "messageId": long});
    let response = app.post_basic("/v1/track", &single.to_string()).await;
    assert_error(response, 400, "message_id_too_long").await;
    assert!(app.spooled().await.is_empty());
    // In a batch, only that event is refused.
    let batch = json!({"batch": [
        {"type": "track", "userId": "u1", "event": "E", "messageId": "fine"},
        {"type": "track", "userId": "u1", "event": "E", "messageId": long},
    ]});
    let answer = success_body(app.post_basic("/v1/batch", &batch.to_string()).await).await;
    assert_eq!(
        answer["refused"],
        json!([{"index": 1, "code": "message_id_too_long",
                "message": "event 1 has a messageId longer than 100 characters"}])
    );
    let events = app.spooled().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].message_id, "fine");
    let exactly = "x".repeat(100);
    let single = json!({"userId": "u1", "event": "E", "messageId": exactly});
    assert_success(app.post_basic("/v1/track", &single.to_string()).await).await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].message_id, exactly);
}

// ---------------------------------------------------------------------------------------
// Semantic skips: 200, not queued, counted
// ---------------------------------------------------------------------------------------

const SKIPPED: &str = "gateway_ingest_events_skipped_total";

#[tokio::test]
async fn events_segment_would_drop_answer_200_and_are_counted() {
    let app = spawn_app().await;
    let cases = [
        (
            "/v1/identify",
            json!({"traits": {"plan": "pro"}}),
            "no_user_anon_id",
        ),
        (
            "/v1/track",
            json!({"event": "E", "userId": ""}),
            "no_user_anon_id",
        ),
        ("/v1/track", json!({"userId": "u1"}), "missing_event"),
        (
            "/v1/t",
            json!({"userId": "u1", "event": ""}),
            "missing_event",
        ),
        (
            "/v1/group",
            json!({"userId": "u1", "traits": {"name": "Acme"}}),
            "missing_group_id",
        ),
        ("/v1/alias", json!({"userId": "u1"}), "missing_previous_id"),
    ];
    for (path, body, reason) in &cases {
        let labels = [("source", "default"), ("reason", *reason)];
        let before = metric(&app, SKIPPED, &labels).await;
        assert_success(app.post_basic(path, &body.to_string()).await).await;
        assert!(app.spooled().await.is_empty(), "{path} {body} was queued");
        let after = metric(&app, SKIPPED, &labels).await;
        assert_eq!(after, before + 1.0, "{path} {body} counted as {reason}");
    }
    for (reason, count) in [
        ("no_user_anon_id", 2.0),
        ("missing_event", 2.0),
        ("missing_group_id", 1.0),
        ("missing_previous_id", 1.0),
    ] {
        let value = metric(&app, SKIPPED, &[("source", "default"), ("reason", reason)]).await;
        assert_eq!(value, count, "{reason}");
    }
    assert_eq!(
        metric(
            &app,
            "gateway_ingest_events_total",
            &[("source", "default")]
        )
        .await,
        0.0
    );
}

#[tokio::test]
async fn batch_items_of_unknown_or_missing_type_are_skipped_alone() {
    let app = spawn_app().await;
    let body = json!({"batch": [
        {"type": "track", "userId": "u1", "event": "E", "messageId": "keep-1"},
        {"type": "foo", "userId": "u1", "messageId": "drop-1"},
        {"userId": "u1", "event": "E", "messageId": "drop-2"},
        {"type": "delete", "userId": "u1", "messageId": "drop-3"},
        {"type": "track", "userId": "u1", "messageId": "drop-4"},
        {"type": "identify", "userId": "u2", "messageId": "keep-2"},
    ]});
    let response = post_with(
        &app,
        "/v1/batch",
        &[("Authorization", &basic(OTHER_KEY))],
        body.to_string(),
    )
    .await;
    assert_success(response).await;
    let events = app.spooled().await;
    let ids: Vec<&str> = events.iter().map(|e| e.message_id.as_str()).collect();
    assert_eq!(ids, ["keep-1", "keep-2"]);
    assert!(events.iter().all(|e| e.source == "hooked"));
    let unknown = metric(
        &app,
        SKIPPED,
        &[("source", "hooked"), ("reason", "unknown_type")],
    )
    .await;
    assert_eq!(unknown, 3.0);
    let missing = metric(
        &app,
        SKIPPED,
        &[("source", "hooked"), ("reason", "missing_event")],
    )
    .await;
    assert_eq!(missing, 1.0);
}

// ---------------------------------------------------------------------------------------
// Normalization
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_missing_message_id_is_generated_and_received_at_is_set() {
    let app = spawn_app().await;
    let before = Utc::now() - Duration::seconds(1);
    let body = json!({"batch": [
        {"type": "track", "userId": "u1", "event": "A"},
        {"type": "track", "userId": "u1", "event": "B", "messageId": null},
        {"type": "track", "userId": "u1", "event": "C", "messageId": ""},
    ]});
    assert_success(app.post_basic("/v1/batch", &body.to_string()).await).await;
    let after = Utc::now() + Duration::seconds(1);
    let events = app.spooled().await;
    assert_eq!(events.len(), 3);
    let mut ids = Vec::new();
    for event in &events {
        let stored = payload(event);
        let id = stored["messageId"].as_str().expect("messageId set");
        assert!(!id.is_empty() && id.chars().count() <= 100, "{id}");
        assert_eq!(event.message_id, id);
        ids.push(id.to_string());
        let received = parse_time(&stored["receivedAt"]);
        assert!(received >= before && received <= after, "{received}");
        assert_eq!(received.timestamp_millis(), event.received_at_ms);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "generated ids must differ");
}

#[tokio::test]
async fn clock_skew_is_corrected_with_batch_sent_at() {
    let app = spawn_app().await;
    let body = json!({
        "sentAt": "2025-01-02T03:04:10.500Z",
        "batch": [
            {"type": "track", "userId": "u1", "event": "A", "messageId": "skew-1", "timestamp": "2025-01-02T03:04:05.000Z"},
            {"type": "track", "userId": "u2", "event": "B", "messageId": "skew-2", "timestamp": "2025-01-02T03:04:05.123456+00:00"},
        ]
    });
    assert_success(app.post_basic("/v1/batch", &body.to_string()).await).await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 2);
    for (event, original, skew_ms) in [
        (&events[0], "2025-01-02T03:04:05.000Z", 5_500),
        (&events[1], "2025-01-02T03:04:05.123456+00:00", 5_377),
    ] {
        let stored = payload(event);
        let received = parse_time(&stored["receivedAt"]);
        assert_eq!(stored["originalTimestamp"], original);
        assert_eq!(stored["sentAt"], "2025-01-02T03:04:10.500Z");
        let timestamp = parse_time(&stored["timestamp"]);
        let expected = received - Duration::milliseconds(skew_ms);
        // Millisecond precision on the wire; the correction is computed from the same
        // arrival time the gateway stored as receivedAt.
        let off = (timestamp - expected).num_milliseconds().abs();
        assert!(off <= 1, "timestamp {timestamp}, expected {expected}");
    }
}

#[tokio::test]
async fn per_event_sent_at_is_used_and_batch_sent_at_wins() {
    let app = spawn_app().await;
    // analytics.js /v1/t: sentAt on the event itself.
    let single = json!({"userId": "u1", "event": "A", "messageId": "ajs", "timestamp": "2025-06-01T00:00:00.000Z", "sentAt": "2025-06-01T00:00:02.000Z"});
    let auth = basic(WRITE_KEY);
    let response = post_with(
        &app,
        "/v1/t",
        &[("Authorization", &auth), ("Content-Type", "text/plain")],
        single.to_string(),
    )
    .await;
    assert_success(response).await;
    // /v1/b: the batch-level sentAt overrides an item's own.
    let batch = json!({
        "sentAt": "2025-06-01T00:00:10.000Z",
        "batch": [{"type": "track", "userId": "u2", "event": "B", "messageId": "ajs-b", "timestamp": "2025-06-01T00:00:00.000Z", "sentAt": "2025-06-01T00:00:01.000Z"}]
    });
    assert_success(app.post_basic("/v1/b", &batch.to_string()).await).await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 2);
    for (event, skew_ms) in [(&events[0], 2_000), (&events[1], 10_000)] {
        let stored = payload(event);
        let received = parse_time(&stored["receivedAt"]);
        let timestamp = parse_time(&stored["timestamp"]);
        assert_eq!(
            timestamp,
            received - Duration::milliseconds(skew_ms),
            "{}",
            event.message_id
        );
        assert_eq!(stored["originalTimestamp"], "2025-06-01T00:00:00.000Z");
    }
}

#[tokio::test]
async fn timestamps_without_sent_at_or_at_all() {
    let app = spawn_app().await;
    let body = json!({"batch": [
        {"type": "track", "userId": "u1", "event": "none", "messageId": "t-none"},
        {"type": "track", "userId": "u2", "event": "kept", "messageId": "t-kept", "timestamp": "2020-05-06T07:08:09.010Z"},
        {"type": "track", "userId": "u3", "event": "bad", "messageId": "t-bad", "timestamp": "2015-2-02T00:30:08.276Z"},
    ]});
    assert_success(app.post_basic("/v1/batch", &body.to_string()).await).await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 3);
    let none = payload(&events[0]);
    assert_eq!(none["timestamp"], none["receivedAt"]);
    assert!(none.get("originalTimestamp").is_none());
    let kept = payload(&events[1]);
    assert_eq!(kept["timestamp"], "2020-05-06T07:08:09.010Z");
    assert_eq!(kept["originalTimestamp"], "2020-05-06T07:08:09.010Z");
    let bad = payload(&events[2]);
    assert_eq!(bad["originalTimestamp"], "2015-2-02T00:30:08.276Z");
    assert_eq!(bad["timestamp"], bad["receivedAt"]);
    parse_time(&bad["timestamp"]);
}

#[tokio::test]
async fn batch_context_and_integrations_merge_into_items_and_items_win() {
    let app = spawn_app().await;
    let body = json!({
        "context": {"device": {"type": "ios"}, "library": {"name": "batch-lib"}},
        "integrations": {"All": false, "Refiner": true},
        "batch": [
            {"type": "track", "userId": "u1", "event": "A", "messageId": "ctx-1"},
            {"type": "track", "userId": "u2", "event": "B", "messageId": "ctx-2",
             "context": {"library": {"name": "item-lib"}, "ip": "10.0.0.1"},
             "integrations": {"All": true}},
        ]
    });
    assert_success(app.post_basic("/v1/batch", &body.to_string()).await).await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 2);
    let first = payload(&events[0]);
    assert_eq!(
        first["context"],
        json!({"device": {"type": "ios"}, "library": {"name": "batch-lib"}})
    );
    assert_eq!(
        first["integrations"],
        json!({"All": false, "Refiner": true})
    );
    let second = payload(&events[1]);
    assert_eq!(
        second["context"],
        json!({"device": {"type": "ios"}, "library": {"name": "item-lib"}, "ip": "10.0.0.1"})
    );
    assert_eq!(
        second["integrations"],
        json!({"All": true, "Refiner": true})
    );
}

#[tokio::test]
async fn numeric_ids_become_strings() {
    let app = spawn_app().await;
    let body = json!({"userId": 42, "anonymousId": 7, "event": "E", "messageId": "num"});
    assert_success(app.post_basic("/v1/track", &body.to_string()).await).await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 1);
    let stored = payload(&events[0]);
    assert_eq!(stored["userId"], "42");
    assert_eq!(stored["anonymousId"], "7");
    assert_eq!(events[0].user_key, "u:42");
}

#[tokio::test]
async fn the_write_key_is_never_stored() {
    let app = spawn_app().await;
    let single = json!({"userId": "u1", "event": "A", "messageId": "wk-1", "writeKey": WRITE_KEY});
    assert_success(app.post_raw("/v1/track", single.to_string()).await).await;
    let batch = json!({
        "writeKey": WRITE_KEY,
        "batch": [{"type": "identify", "userId": "u2", "messageId": "wk-2", "writeKey": WRITE_KEY}]
    });
    assert_success(app.post_raw("/v1/batch", batch.to_string()).await).await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 2);
    for event in &events {
        assert!(payload(event).get("writeKey").is_none());
        let raw = String::from_utf8_lossy(&event.payload);
        assert!(!raw.contains(WRITE_KEY), "{raw}");
    }
}

// ---------------------------------------------------------------------------------------
// Deduplication
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn the_same_message_id_is_queued_once() {
    let app = spawn_app().await;
    let event = json!({"userId": "u1", "event": "E", "messageId": "dup-1"}).to_string();
    assert_success(app.post_basic("/v1/track", &event).await).await;
    assert_success(app.post_basic("/v1/track", &event).await).await;
    let batch = json!({"batch": [
        {"type": "track", "userId": "u1", "event": "E", "messageId": "dup-1"},
        {"type": "track", "userId": "u1", "event": "E", "messageId": "dup-2"},
        {"type": "track", "userId": "u1", "event": "E", "messageId": "dup-2"},
    ]});
    assert_success(app.post_basic("/v1/batch", &batch.to_string()).await).await;
    let events = app.spooled().await;
    let ids: Vec<&str> = events.iter().map(|e| e.message_id.as_str()).collect();
    assert_eq!(ids, ["dup-1", "dup-2"]);
    let duplicates = metric(
        &app,
        "gateway_ingest_duplicates_total",
        &[("source", "default")],
    )
    .await;
    assert_eq!(duplicates, 3.0);
}

#[tokio::test]
async fn dedup_is_per_source() {
    let app = spawn_app().await;
    let event = json!({"userId": "u1", "event": "E", "messageId": "shared-id"}).to_string();
    assert_success(app.post_basic("/v1/track", &event).await).await;
    let response = post_with(
        &app,
        "/v1/track",
        &[("Authorization", &basic(OTHER_KEY))],
        event.clone(),
    )
    .await;
    assert_success(response).await;
    let events = app.spooled().await;
    let sources: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.source.as_str(), e.message_id.as_str()))
        .collect();
    assert_eq!(sources, [("default", "shared-id"), ("hooked", "shared-id")]);
}

#[tokio::test]
async fn dedup_survives_a_restart() {
    let app = spawn_app().await;
    let event = json!({"userId": "u1", "event": "E", "messageId": "restart-1"}).to_string();
    assert_success(app.post_basic("/v1/track", &event).await).await;
    let (data_dir, settings) = app.stop().await;

    let app = spawn_app_in(data_dir, settings).await;
    let queued = app.spooled().await;
    assert_eq!(queued.len(), 1, "the accepted event survived the restart");
    assert_eq!(queued[0].message_id, "restart-1");
    assert_success(app.post_basic("/v1/track", &event).await).await;
    let batch = json!({"batch": [{"type": "track", "userId": "u1", "event": "E", "messageId": "restart-1"}]});
    assert_success(app.post_basic("/v1/batch", &batch.to_string()).await).await;
    assert!(
        app.spooled().await.is_empty(),
        "re-sent after restart: not queued again"
    );
    // A new id still goes through.
    let fresh = json!({"userId": "u1", "event": "E", "messageId": "restart-2"}).to_string();
    assert_success(app.post_basic("/v1/track", &fresh).await).await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].message_id, "restart-2");
}

// ---------------------------------------------------------------------------------------
// CORS
// ---------------------------------------------------------------------------------------

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

#[tokio::test]
async fn cors_preflight_allows_analytics_js() {
    let app = spawn_app().await;
    let response = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/v1/t"))
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type,x-retry-count",
        )
        .send()
        .await
        .expect("preflight");
    assert!(response.status().is_success(), "{}", response.status());
    assert_eq!(
        header(&response, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    let methods = header(&response, "access-control-allow-methods").expect("methods");
    assert!(methods.to_ascii_uppercase().contains("POST"), "{methods}");
    let allowed = header(&response, "access-control-allow-headers")
        .expect("headers")
        .to_ascii_lowercase();
    let allowed: Vec<&str> = allowed.split(',').map(str::trim).collect();
    for wanted in ["authorization", "content-type", "x-retry-count"] {
        assert!(allowed.contains(&wanted), "{wanted} not in {allowed:?}");
    }
    assert!(header(&response, "x-request-id").is_some());
    assert!(app.spooled().await.is_empty());
}

#[tokio::test]
async fn cross_origin_posts_carry_the_allow_origin_header() {
    let app = spawn_app().await;
    let body = json!({"userId": "u1", "event": "E", "messageId": "cors-1"}).to_string();
    let auth = basic(WRITE_KEY);
    let headers = [
        ("Origin", "https://app.example"),
        ("Authorization", auth.as_str()),
        ("Content-Type", "text/plain"),
    ];
    let response = post_with(&app, "/v1/t", &headers, body).await;
    assert_eq!(
        header(&response, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert_success(response).await;
    // Errors too, so the browser can read them instead of reporting a network failure.
    let headers = [
        ("Origin", "https://app.example"),
        ("Content-Type", "text/plain"),
    ];
    let response = post_with(&app, "/v1/t", &headers, "{").await;
    assert_eq!(
        header(&response, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert_error(response, 400, "invalid_json").await;
    assert_eq!(app.spooled().await.len(), 1);
}

// ---------------------------------------------------------------------------------------
// Request ids and operational routes
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn every_response_carries_a_request_id() {
    let app = spawn_app().await;
    let ok = json!({"userId": "u1", "event": "E"}).to_string();
    let responses = vec![
        app.post_basic("/v1/track", &ok).await,
        app.post_basic("/v1/track", "{").await,
        app.post_raw("/v1/track", ok.clone()).await,
        app.post_basic("/v1/nope", &ok).await,
        app.client
            .get(app.url("/nope"))
            .send()
            .await
            .expect("request"),
        app.client
            .get(app.url("/v1/track"))
            .send()
            .await
            .expect("request"),
        app.client
            .get(app.url("/healthz"))
            .send()
            .await
            .expect("request"),
        app.client
            .get(app.url("/readyz"))
            .send()
            .await
            .expect("request"),
        app.client
            .get(app.url("/metrics"))
            .send()
            .await
            .expect("request"),
    ];
    let mut ids = Vec::new();
    for response in &responses {
        let id = header(response, "x-request-id")
            .unwrap_or_else(|| panic!("{} has no X-Request-Id", response.url()));
        assert!(!id.is_empty());
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), responses.len(), "request ids are unique");
    // A well-formed incoming id is kept.
    let response = app
        .client
        .get(app.url("/healthz"))
        .header("X-Request-Id", "caller-id-123")
        .send()
        .await
        .expect("request");
    assert_eq!(
        header(&response, "x-request-id").as_deref(),
        Some("caller-id-123")
    );
}

#[tokio::test]
async fn health_and_readiness() {
    let app = spawn_app().await;
    let response = app
        .client
        .get(app.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["status"], "ok");
    let response = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["status"], "ready");
}

// ---------------------------------------------------------------------------------------
// Destination selection: Segment's `integrations` object
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn integrations_that_do_not_select_the_gateway_are_answered_200_and_not_stored() {
    let app = spawn_app().await;
    let body = json!({
        "integrations": {"All": false},
        "batch": [
            {"type": "track", "userId": "u1", "event": "E", "messageId": "batch-all-off"},
            {"type": "track", "userId": "u1", "event": "E", "messageId": "own-refiner-on",
             "integrations": {"Refiner": true}},
            {"type": "track", "userId": "u1", "event": "E", "messageId": "own-refiner-off",
             "integrations": {"Refiner": false, "All": true}},
            {"type": "track", "userId": "u1", "event": "E", "messageId": "webhooks-on",
             "integrations": {"Webhooks": true}},
        ],
    });
    assert_success(app.post_basic("/v1/batch", &body.to_string()).await).await;
    let single = json!({"userId": "u1", "event": "E", "messageId": "single-off",
                        "integrations": {"Refiner": false}});
    assert_success(app.post_basic("/v1/track", &single.to_string()).await).await;
    let ids = app.spooled_ids().await;
    assert_eq!(ids, ["own-refiner-on", "webhooks-on"]);
    let skipped = |reason: &'static str| {
        let app = &app;
        async move { metric(app, SKIPPED, &[("source", "default"), ("reason", reason)]).await }
    };
    assert_eq!(skipped("integrations_all_disabled").await, 1.0);
    assert_eq!(skipped("integrations_disabled").await, 2.0);
}

#[tokio::test]
async fn destination_names_are_configurable_per_source() {
    let app = crate::helpers::spawn_app_with(|settings| {
        settings.integrations.destination_names = vec!["Refiner".into()];
        settings
            .integrations
            .source_destination_names
            .insert("default".into(), vec!["Internal Gateway".into()]);
    })
    .await;
    let body = json!({"batch": [
        {"type": "identify", "userId": "u1", "messageId": "own-name",
         "integrations": {"All": false, "Internal Gateway": true}},
        {"type": "identify", "userId": "u1", "messageId": "refiner-name",
         "integrations": {"All": false, "Refiner": true}},
    ]});
    assert_success(app.post_basic("/v1/batch", &body.to_string()).await).await;
    // The other source goes by the shared names.
    let response = app
        .client
        .post(app.url("/v1/batch"))
        .header("Authorization", basic(OTHER_KEY))
        .body(body.to_string())
        .send()
        .await
        .expect("request");
    assert_success(response).await;
    let spooled: Vec<(String, String)> = app
        .spooled()
        .await
        .into_iter()
        .map(|e| (e.source, e.message_id))
        .collect();
    assert_eq!(
        spooled,
        [
            ("default".to_string(), "own-name".to_string()),
            ("hooked".to_string(), "refiner-name".to_string()),
        ]
    );
}
