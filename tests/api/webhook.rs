//! `/webhook` over real HTTP: Segment's Webhooks destinations, Classic (one event, signed
//! body) and Actions (a JSON array, only the first element's raw bytes signed), and the
//! forgeries that the Actions signature would let through without the source's
//! `webhook_format` and the signature cache.

use hmac::{Hmac, Mac};
use refiner_gateway::config::WebhookFormat;
use serde_json::{json, Value};
use sha1::Sha1;

use crate::helpers::{
    basic, payload, spawn_app, spawn_app_with, unlabelled_metric, TestApp, OTHER_KEY,
    WEBHOOK_SECRET, WRITE_KEY,
};
use crate::ingest::{assert_error, assert_success, gzip, metric};

/// A gateway whose `hooked` source receives Webhooks (Actions): arrays allowed.
async fn spawn_actions_app() -> TestApp {
    spawn_app_with(|settings| {
        let hooked = settings
            .sources
            .iter_mut()
            .find(|s| s.slug == "hooked")
            .expect("the hooked source");
        hooked.webhook_format = WebhookFormat::Actions;
    })
    .await
}

/// Hex HMAC-SHA1, as Segment computes `X-Signature`.
fn sign(secret: &str, bytes: &[u8]) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).expect("hmac key");
    mac.update(bytes);
    hex::encode(mac.finalize().into_bytes())
}

async fn post_signed(
    app: &TestApp,
    path: &str,
    body: &str,
    signature: &str,
    user_agent: &str,
) -> reqwest::Response {
    app.client
        .post(app.url(path))
        .header("Content-Type", "application/json")
        .header("User-Agent", user_agent)
        .header("X-Signature", signature)
        .body(body.to_string())
        .send()
        .await
        .expect("request")
}

async fn post_unsigned(
    app: &TestApp,
    path: &str,
    body: &str,
    authorization: Option<&str>,
) -> reqwest::Response {
    let mut request = app
        .client
        .post(app.url(path))
        .header("Content-Type", "application/json")
        .header("User-Agent", "Segment.io/1.0");
    if let Some(value) = authorization {
        request = request.header("Authorization", value);
    }
    request
        .body(body.to_string())
        .send()
        .await
        .expect("request")
}

const CLASSIC: &str = "Segment.io/1.0";
const ACTIONS: &str = "Segment (Actions)";

#[tokio::test]
async fn classic_signed_event_is_queued_under_its_source() {
    let app = spawn_app().await;
    let body = json!({
        "version": 1,
        "type": "track",
        "userId": "u1",
        "event": "Signed Up",
        "messageId": "wh-classic-1",
        "properties": {"plan": "pro"},
        "timestamp": "2025-01-02T03:04:05.000Z"
    })
    .to_string();
    let signature = sign(WEBHOOK_SECRET, body.as_bytes());
    assert_success(post_signed(&app, "/webhook", &body, &signature, CLASSIC).await).await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 1);
    let event = &events[0];
    assert_eq!(event.source, "hooked");
    assert_eq!(event.kind.as_str(), "track");
    assert_eq!(event.message_id, "wh-classic-1");
    assert_eq!(event.user_key, "u:u1");
    let stored = payload(event);
    assert_eq!(stored["event"], "Signed Up");
    assert_eq!(stored["properties"], json!({"plan": "pro"}));
    assert_eq!(stored["timestamp"], "2025-01-02T03:04:05.000Z");
    assert!(stored["receivedAt"].is_string());
}

#[tokio::test]
async fn a_retried_webhook_is_queued_once() {
    let app = spawn_app().await;
    let body = json!({"type": "identify", "userId": "u1", "messageId": "wh-retry"}).to_string();
    let signature = sign(WEBHOOK_SECRET, body.as_bytes());
    assert_success(post_signed(&app, "/webhook", &body, &signature, CLASSIC).await).await;
    assert_success(post_signed(&app, "/webhook", &body, &signature, CLASSIC).await).await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].message_id, "wh-retry");
    let duplicates = metric(
        &app,
        "gateway_ingest_duplicates_total",
        &[("source", "hooked")],
    )
    .await;
    assert_eq!(duplicates, 1.0);
}

#[tokio::test]
async fn a_wrong_signature_is_refused() {
    let app = spawn_app().await;
    let body =
        json!({"type": "track", "userId": "u1", "event": "E", "messageId": "wh-bad"}).to_string();
    let wrong_secret = sign("not-the-secret", body.as_bytes());
    let other_body = sign(WEBHOOK_SECRET, b"{\"type\":\"track\"}");
    for signature in [wrong_secret.as_str(), other_body.as_str(), "zz-not-hex", ""] {
        let response = post_signed(&app, "/webhook", &body, signature, CLASSIC).await;
        assert_error(response, 401, "invalid_signature").await;
    }
    assert!(app.spooled().await.is_empty());
}

#[tokio::test]
async fn a_source_with_a_secret_requires_the_signature() {
    let app = spawn_app().await;
    let body = json!({"type": "track", "userId": "u1", "event": "E"}).to_string();
    let response = post_unsigned(&app, "/webhook", &body, Some(&basic(OTHER_KEY))).await;
    assert_error(response, 401, "missing_signature").await;
    let with_body_key =
        json!({"type": "track", "userId": "u1", "event": "E", "writeKey": OTHER_KEY}).to_string();
    let response = post_unsigned(&app, "/webhook", &with_body_key, None).await;
    assert_error(response, 401, "missing_signature").await;
    let response = post_unsigned(&app, "/webhook/hooked", &body, Some(&basic(OTHER_KEY))).await;
    assert_error(response, 401, "missing_signature").await;
    // Neither a signature nor a key.
    let response = post_unsigned(&app, "/webhook", &body, None).await;
    assert_error(response, 401, "unauthorized").await;
    // Neither, to a source that has a secret: what is missing is the signature.
    let response = post_unsigned(&app, "/webhook/hooked", &body, None).await;
    assert_error(response, 401, "missing_signature").await;
    assert!(app.spooled().await.is_empty());
}

/// An Actions batch whose raw text differs from what re-serializing it would produce.
const ACTIONS_FIRST: &str = r#"{ "userId" : "u1",
      "type":"track",   "event": "Order Completed", "messageId":"wh-batch-1",
      "properties": {"total": 10.50, "currency":"EUR"} }"#;

fn actions_batch(second: &str) -> String {
    format!(
        "[\n  {ACTIONS_FIRST} ,\n\t{second}\n , {{\"messageId\": \"wh-batch-3\", \"type\": \"page\", \"anonymousId\": \"a3\"}}  ]\n"
    )
}

const ACTIONS_SECOND: &str =
    r#"{"messageId":"wh-batch-2","traits":{"plan":"pro"},"type":"identify","userId":"u2"}"#;

#[tokio::test]
async fn actions_batch_signed_over_the_raw_first_element() {
    let app = spawn_actions_app().await;
    let reserialized =
        serde_json::to_string(&serde_json::from_str::<Value>(ACTIONS_FIRST).expect("json"))
            .expect("serialize");
    assert_ne!(
        reserialized, ACTIONS_FIRST,
        "the raw text must not be canonical"
    );
    let body = actions_batch(ACTIONS_SECOND);

    // A signature over the re-serialized element does not verify: the raw bytes count.
    let response = post_signed(
        &app,
        "/webhook",
        &body,
        &sign(WEBHOOK_SECRET, reserialized.as_bytes()),
        ACTIONS,
    )
    .await;
    assert_error(response, 401, "invalid_signature").await;
    assert!(app.spooled().await.is_empty());

    let signature = sign(WEBHOOK_SECRET, ACTIONS_FIRST.as_bytes());
    assert_success(post_signed(&app, "/webhook", &body, &signature, ACTIONS).await).await;
    let events = app.spooled().await;
    let got: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|e| (e.source.as_str(), e.kind.as_str(), e.message_id.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("hooked", "track", "wh-batch-1"),
            ("hooked", "identify", "wh-batch-2"),
            ("hooked", "page", "wh-batch-3"),
        ]
    );
    let first = payload(&events[0]);
    assert_eq!(first["event"], "Order Completed");
    assert_eq!(first["properties"]["currency"], "EUR");
    assert_eq!(payload(&events[1])["traits"], json!({"plan": "pro"}));
}

#[tokio::test]
async fn tampering_a_later_batch_element_still_verifies() {
    // Documented limitation: Segment signs only the first element of an Actions batch, so
    // the gateway cannot detect changes to the others of a batch it has not seen before.
    let app = spawn_actions_app().await;
    let signature = sign(WEBHOOK_SECRET, ACTIONS_FIRST.as_bytes());
    let tampered = r#"{"messageId":"wh-batch-2","traits":{"plan":"free","admin":true},"type":"identify","userId":"u2"}"#;
    let body = actions_batch(tampered);
    assert_success(post_signed(&app, "/webhook", &body, &signature, ACTIONS).await).await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 3);
    assert_eq!(events[1].message_id, "wh-batch-2");
    assert_eq!(
        payload(&events[1])["traits"],
        json!({"plan": "free", "admin": true})
    );
    // Tampering with the first element does not.
    let app = spawn_actions_app().await;
    let body = actions_batch(ACTIONS_SECOND).replace("10.50", "0.01");
    let response = post_signed(&app, "/webhook", &body, &signature, ACTIONS).await;
    assert_error(response, 401, "invalid_signature").await;
    assert!(app.spooled().await.is_empty());
}

#[tokio::test]
async fn the_path_names_the_source() {
    let app = spawn_app().await;
    let body = json!({"type": "group", "userId": "u1", "groupId": "g1", "messageId": "wh-path"})
        .to_string();
    let signature = sign(WEBHOOK_SECRET, body.as_bytes());
    assert_success(post_signed(&app, "/webhook/hooked", &body, &signature, CLASSIC).await).await;
    // The `default` source has no secret: a signature cannot verify against it.
    let response = post_signed(&app, "/webhook/default", &body, &signature, CLASSIC).await;
    assert_error(response, 401, "invalid_signature").await;
    // A source that does not exist.
    let response = post_signed(&app, "/webhook/nope", &body, &signature, CLASSIC).await;
    assert_error(response, 401, "unauthorized").await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].source, "hooked");
    assert_eq!(events[0].kind.as_str(), "group");
    assert_eq!(payload(&events[0])["groupId"], "g1");
}

#[tokio::test]
async fn a_source_without_a_secret_authenticates_by_write_key() {
    let app = spawn_app().await;
    let body = json!({"type": "page", "userId": "u1", "name": "Home", "messageId": "wh-key-1"})
        .to_string();
    assert_success(post_unsigned(&app, "/webhook", &body, Some(&basic(WRITE_KEY))).await).await;
    let named = json!({"type": "screen", "userId": "u1", "messageId": "wh-key-2"}).to_string();
    assert_success(post_unsigned(&app, "/webhook/default", &named, Some(&basic(WRITE_KEY))).await)
        .await;
    // The key of `default` does not open `/webhook/hooked`.
    let other = json!({"type": "screen", "userId": "u1", "messageId": "wh-key-3"}).to_string();
    let response = post_unsigned(&app, "/webhook/hooked", &other, Some(&basic(WRITE_KEY))).await;
    assert_error(response, 401, "missing_signature").await;
    let events = app.spooled().await;
    let got: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|e| (e.source.as_str(), e.kind.as_str(), e.message_id.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            ("default", "page", "wh-key-1"),
            ("default", "screen", "wh-key-2")
        ]
    );
}

#[tokio::test]
async fn delete_is_accepted_on_the_webhook_only() {
    let app = spawn_app().await;
    let body = r#"{"type":"delete","userId":"u1"}"#;
    let signature = sign(WEBHOOK_SECRET, body.as_bytes());
    assert_success(post_signed(&app, "/webhook", body, &signature, CLASSIC).await).await;
    let unsigned = r#"{"type":"delete","userId":"u2","messageId":"del-2","timestamp":"2025-01-02T03:04:05.000Z"}"#;
    assert_success(post_unsigned(&app, "/webhook", unsigned, Some(&basic(WRITE_KEY))).await).await;
    // A deletion needs a userId; an anonymousId is not enough.
    let anonymous = r#"{"type":"delete","anonymousId":"a1"}"#;
    let signature = sign(WEBHOOK_SECRET, anonymous.as_bytes());
    assert_success(post_signed(&app, "/webhook", anonymous, &signature, CLASSIC).await).await;
    let events = app.spooled().await;
    let got: Vec<(&str, &str, &str)> = events
        .iter()
        .map(|e| (e.source.as_str(), e.kind.as_str(), e.user_key.as_str()))
        .collect();
    assert_eq!(
        got,
        [("hooked", "delete", "u:u1"), ("default", "delete", "u:u2")]
    );
    assert_eq!(payload(&events[0])["type"], "delete");
    assert!(!events[0].message_id.is_empty());
    assert_eq!(events[1].message_id, "del-2");
    let skipped = metric(
        &app,
        "gateway_ingest_events_skipped_total",
        &[("source", "hooked"), ("reason", "no_user_anon_id")],
    )
    .await;
    assert_eq!(skipped, 1.0);

    // On /v1/batch, `delete` is not a Segment event type.
    let batch = json!({"batch": [
        {"type": "delete", "userId": "u1", "messageId": "v1-del"},
        {"type": "identify", "userId": "u1", "messageId": "v1-ok"},
    ]});
    assert_success(app.post_basic("/v1/batch", &batch.to_string()).await).await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].kind.as_str(), "identify");
    let unknown = metric(
        &app,
        "gateway_ingest_events_skipped_total",
        &[("source", "default"), ("reason", "unknown_type")],
    )
    .await;
    assert_eq!(unknown, 1.0);
}

#[tokio::test]
async fn webhook_bodies_are_bounded_after_inflating() {
    let app = spawn_app().await;
    let mut inflated = b"[".to_vec();
    inflated.resize(50 * 1024 * 1024, b' ');
    let bomb = gzip(&inflated);
    assert!(bomb.len() < 100 * 1024, "bomb is {} bytes", bomb.len());
    let response = app
        .client
        .post(app.url("/webhook"))
        .header("Content-Encoding", "gzip")
        .header("X-Signature", sign(WEBHOOK_SECRET, &bomb))
        .body(bomb)
        .send()
        .await
        .expect("request");
    assert_error(response, 400, "payload_too_large").await;
    // A gzip body within the limit is inflated before the signature is checked.
    let body =
        json!({"type": "track", "userId": "u1", "event": "E", "messageId": "wh-gz"}).to_string();
    let response = app
        .client
        .post(app.url("/webhook"))
        .header("Content-Encoding", "gzip")
        .header("X-Signature", sign(WEBHOOK_SECRET, body.as_bytes()))
        .body(gzip(body.as_bytes()))
        .send()
        .await
        .expect("request");
    assert_success(response).await;
    let events = app.spooled().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].message_id, "wh-gz");
}

// ---------------------------------------------------------------------------------------
// Forgery: a captured signature on another body
// ---------------------------------------------------------------------------------------

/// A classic body as Segment signs it, and another event an attacker wants in.
const CAPTURED: &str = r#"{"type":"track","userId":"u1","event":"Paid","messageId":"wh-captured"}"#;
const FORGED: &str = r#"{"type":"identify","userId":"u1","messageId":"wh-forged","traits":{"plan":"enterprise","admin":true}}"#;

#[tokio::test]
async fn classic_sources_refuse_arrays() {
    let app = spawn_app().await;
    let first = r#"{"type":"track","userId":"u1","event":"E","messageId":"wh-arr-1"}"#;
    let body = format!("[{first}]");
    let signature = sign(WEBHOOK_SECRET, first.as_bytes());
    for path in ["/webhook", "/webhook/hooked"] {
        let response = post_signed(&app, path, &body, &signature, ACTIONS).await;
        assert_error(response, 401, "array_not_allowed").await;
    }
    // Signed over the whole body, an array is still not what classic sends.
    let whole = sign(WEBHOOK_SECRET, body.as_bytes());
    let response = post_signed(&app, "/webhook/hooked", &body, &whole, ACTIONS).await;
    assert_error(response, 401, "invalid_signature").await;
    assert!(app.spooled().await.is_empty());
}

#[tokio::test]
async fn a_captured_classic_body_wrapped_in_an_array_is_refused() {
    // Classic: the array is refused whatever its signature covers.
    let app = spawn_app().await;
    let signature = sign(WEBHOOK_SECRET, CAPTURED.as_bytes());
    assert_success(post_signed(&app, "/webhook/hooked", CAPTURED, &signature, CLASSIC).await).await;
    let forged = format!("[{CAPTURED},{FORGED}]");
    let response = post_signed(&app, "/webhook/hooked", &forged, &signature, CLASSIC).await;
    assert_error(response, 401, "array_not_allowed").await;
    let ids = app.spooled_ids().await;
    assert_eq!(ids, ["wh-captured"]);

    // Actions: arrays are allowed, but this signature was accepted with another body.
    let app = spawn_actions_app().await;
    assert_success(post_signed(&app, "/webhook", CAPTURED, &signature, ACTIONS).await).await;
    let response = post_signed(&app, "/webhook", &forged, &signature, ACTIONS).await;
    assert_error(response, 401, "signature_reused").await;
    let ids = app.spooled_ids().await;
    assert_eq!(ids, ["wh-captured"]);
    let remembered = unlabelled_metric(&app, "gateway_ingest_webhook_signatures").await;
    assert_eq!(remembered, 1.0);
}

#[tokio::test]
async fn a_known_signature_with_another_body_is_refused_and_a_retry_passes() {
    let app = spawn_actions_app().await;
    let signature = sign(WEBHOOK_SECRET, ACTIONS_FIRST.as_bytes());
    let batch = actions_batch(ACTIONS_SECOND);
    assert_success(post_signed(&app, "/webhook", &batch, &signature, ACTIONS).await).await;
    // The same first element with other events behind it.
    let other = actions_batch(FORGED);
    let response = post_signed(&app, "/webhook", &other, &signature, ACTIONS).await;
    assert_error(response, 401, "signature_reused").await;
    // The same request again (Segment's retry) passes, and is deduplicated.
    assert_success(post_signed(&app, "/webhook", &batch, &signature, ACTIONS).await).await;
    let ids = app.spooled_ids().await;
    assert_eq!(ids, ["wh-batch-1", "wh-batch-2", "wh-batch-3"]);
    // The same bytes gzip-compressed are the same body.
    let response = app
        .client
        .post(app.url("/webhook/hooked"))
        .header("Content-Encoding", "gzip")
        .header("X-Signature", &signature)
        .body(gzip(batch.as_bytes()))
        .send()
        .await
        .expect("request");
    assert_success(response).await;
}

#[tokio::test]
async fn unauthenticated_webhooks_are_refused_without_being_parsed() {
    let app = spawn_app().await;
    let events: Vec<Value> = (0..4000)
        .map(|i| json!({"type": "track", "userId": format!("u{i}"), "event": "E"}))
        .collect();
    let body = serde_json::to_string(&events).expect("json");
    let response = post_signed(&app, "/webhook", &body, &"0".repeat(40), ACTIONS).await;
    assert_error(response, 401, "invalid_signature").await;
    let response = post_unsigned(&app, "/webhook", &body, None).await;
    assert_error(response, 401, "unauthorized").await;
    let parsed = metric(
        &app,
        "gateway_ingest_bodies_parsed_total",
        &[("route", "webhook")],
    )
    .await;
    assert_eq!(parsed, 0.0);
    assert!(app.spooled().await.is_empty());
}

#[tokio::test]
async fn webhook_events_are_selected_by_integrations_and_refused_one_by_one() {
    let app = spawn_actions_app().await;
    // Segment → Webhooks (Actions) → gateway: the event selected the webhook only.
    let selected = r#"{"type":"track","userId":"u1","event":"E","messageId":"wh-selected","integrations":{"All":false,"Webhooks (Actions)":true}}"#;
    let not_for_refiner = r#"{"type":"track","userId":"u1","event":"E","messageId":"wh-not-refiner","integrations":{"Refiner":false}}"#;
    let oversized = json!({"type": "track", "userId": "u1", "event": "E", "messageId": "wh-big",
                           "properties": {"blob": "b".repeat(33 * 1024)}})
    .to_string();
    let body = format!("[{selected},{not_for_refiner},{oversized}]");
    let signature = sign(WEBHOOK_SECRET, selected.as_bytes());
    let response = post_signed(&app, "/webhook", &body, &signature, ACTIONS).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.expect("JSON");
    assert_eq!(answer["success"], true);
    assert_eq!(answer["refused"][0]["index"], 2, "{answer}");
    assert_eq!(answer["refused"][0]["code"], "event_too_large", "{answer}");
    let ids = app.spooled_ids().await;
    assert_eq!(ids, ["wh-selected"]);
    let labels = [("source", "hooked"), ("reason", "integrations_disabled")];
    assert_eq!(
        metric(&app, "gateway_ingest_events_skipped_total", &labels).await,
        1.0
    );
    let labels = [("source", "hooked"), ("code", "event_too_large")];
    assert_eq!(
        metric(&app, "gateway_ingest_events_refused_total", &labels).await,
        1.0
    );
}
