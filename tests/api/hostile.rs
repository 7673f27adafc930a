//! Hostile traffic at the ingest edge over real HTTP: requests that would amplify into
//! memory or disk, bodies that trickle, and more body bytes than the budget holds.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{basic, spawn_app, spawn_app_with, unlabelled_metric, TestApp, WRITE_KEY};
use crate::ingest::{assert_error, assert_success, metric};

/// The request of the report: 2,500 tiny events and a 380 KB batch-level `context`, about
/// 507 KB, within the 500 KB batch limit.
fn amplifying_batch(write_key: Option<&str>) -> String {
    let items: Vec<Value> = (0..2500)
        .map(|i| json!({"type": "track", "userId": format!("u{i:04}"), "event": "e"}))
        .collect();
    let mut body = json!({
        "batch": items,
        "context": {"blob": "x".repeat(380 * 1024)},
    });
    if let Some(key) = write_key {
        body["writeKey"] = json!(key);
    }
    let text = body.to_string();
    assert!(
        text.len() > 500_000 && text.len() <= 512_000,
        "{}",
        text.len()
    );
    text
}

async fn parsed(app: &TestApp, route: &str) -> f64 {
    metric(
        app,
        "gateway_ingest_bodies_parsed_total",
        &[("route", route)],
    )
    .await
}

#[tokio::test]
async fn unauthenticated_amplification_is_refused_before_parsing() {
    let app = spawn_app().await;
    let started = Instant::now();
    let response = app.post_raw("/v1/batch", amplifying_batch(None)).await;
    assert_error(response, 401, "unauthorized").await;
    let response = app
        .post_raw("/v1/batch", amplifying_batch(Some("not-a-key")))
        .await;
    assert_error(response, 401, "unauthorized").await;
    // Normalizing would have written 2,500 copies of the context: about a gigabyte.
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(parsed(&app, "batch").await, 0.0);
    assert!(app.spooled().await.is_empty());
}

#[tokio::test]
async fn authenticated_amplification_refuses_every_event_and_stores_nothing() {
    let app = spawn_app().await;
    let started = Instant::now();
    let response = app
        .post_raw("/v1/batch", amplifying_batch(Some(WRITE_KEY)))
        .await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.expect("JSON");
    let refused = answer["refused"].as_array().expect("refused");
    assert_eq!(refused.len(), 2500);
    assert_eq!(refused[0]["code"], "event_too_large");
    let message = refused[0]["message"].as_str().expect("message");
    assert!(
        message.contains("event 0") && message.contains("32768"),
        "{message}"
    );
    // Refused by its merged size, without writing 2,500 copies of the context.
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(parsed(&app, "batch").await, 1.0);
    assert!(app.spooled().await.is_empty());
}

#[tokio::test]
async fn the_merged_total_of_a_batch_is_bounded() {
    let app = spawn_app().await;
    let batch = |context_bytes: usize, prefix: &str| {
        let items: Vec<Value> = (0..2500)
            .map(|i| json!({"type": "track", "userId": "u1", "event": "e", "messageId": format!("{prefix}{i}")}))
            .collect();
        json!({"batch": items, "context": {"pad": "p".repeat(context_bytes)}}).to_string()
    };
    // 2,500 × 4 KB of context: about 10.5 MB merged, over the 8 MiB bound.
    let response = app.post_basic("/v1/batch", &batch(4096, "big-")).await;
    let error = assert_error(response, 400, "payload_too_large").await;
    assert!(error["message"]
        .as_str()
        .expect("message")
        .contains("8388608"));
    assert!(app.spooled().await.is_empty());
    // 2,500 × 100 bytes fits.
    assert_success(app.post_basic("/v1/batch", &batch(100, "small-")).await).await;
    assert_eq!(app.spooled().await.len(), 2500);
}

#[tokio::test]
async fn a_basic_write_key_is_checked_before_the_body_is_read() {
    let app = spawn_app().await;
    let oversized = format!(
        r#"{{"batch":[],"pad":"{}"}}"#,
        "x".repeat(4 * 1024 * 1024 + 1)
    );
    let response = app
        .client
        .post(app.url("/v1/batch"))
        .header("Authorization", basic("not-a-key"))
        .body(oversized.clone())
        .send()
        .await
        .expect("request");
    assert_error(response, 401, "unauthorized").await;
    let response = app.post_basic("/v1/batch", &oversized).await;
    assert_error(response, 400, "payload_too_large").await;
}

// ---------------------------------------------------------------------------------------
// Bodies held open: a raw connection that sends part of a body and waits
// ---------------------------------------------------------------------------------------

/// Opens a connection and sends a `POST` whose `Content-Length` is `length`, with only
/// `sent` bytes of the body.
async fn partial_post(app: &TestApp, path: &str, length: usize, sent: usize) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", app.port))
        .await
        .expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n",
        basic(WRITE_KEY)
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(&vec![b' '; sent]).await.expect("body");
    stream.flush().await.expect("flush");
    stream
}

/// The answer on `stream` (status line, headers and body; lower-cased), read within 10 s.
async fn answer(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    let read = async {
        loop {
            let text = String::from_utf8_lossy(&received).to_lowercase();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if received.len() >= end + 4 + length {
                    return;
                }
            }
            let n = stream.read(&mut buffer).await.expect("read");
            if n == 0 {
                return;
            }
            received.extend_from_slice(&buffer[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("an answer within 10 s");
    String::from_utf8_lossy(&received).to_lowercase()
}

/// Waits until the body budget holds at least `bytes`.
async fn wait_for_budget(app: &TestApp, bytes: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let held = unlabelled_metric(app, "gateway_ingest_body_budget_bytes").await;
        if held >= bytes {
            return;
        }
        assert!(Instant::now() < deadline, "the budget holds {held} bytes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_spent_body_budget_answers_503_and_small_requests_still_pass() {
    let app = spawn_app_with(|settings| {
        settings.limits.body_budget_bytes = 1024 * 1024;
        settings.limits.max_webhook_bytes = 256 * 1024;
    })
    .await;
    // 480,000 of 500,000 bytes arrived and are held (the buffer has reserved at least
    // that; of 1 MiB, one eighth is the small-body reserve).
    let mut holder = partial_post(&app, "/v1/batch", 500_000, 480_000).await;
    wait_for_budget(&app, 480_000.0).await;

    // Another 500 KB body does not fit in what is left.
    let big = format!(r#"{{"batch":[],"pad":"{}"}}"#, "x".repeat(499_000 - 20));
    let response = app.post_basic("/v1/batch", &big).await;
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    assert_error(response, 503, "body_budget_exhausted").await;
    assert_eq!(retry_after.as_deref(), Some("1"));
    let refused = metric(
        &app,
        "gateway_ingest_body_budget_exhausted_total",
        &[("route", "batch")],
    )
    .await;
    assert_eq!(refused, 1.0);

    // An ordinary request is admitted meanwhile.
    let event = json!({"userId": "u1", "event": "E", "messageId": "still-ok"});
    assert_success(app.post_basic("/v1/track", &event.to_string()).await).await;

    // The held bytes come back when the holder goes away.
    holder.shutdown().await.expect("shutdown");
    drop(holder);
    let deadline = Instant::now() + Duration::from_secs(10);
    while unlabelled_metric(&app, "gateway_ingest_body_budget_bytes").await > 0.0 {
        assert!(Instant::now() < deadline, "the budget was not returned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(app.spooled().await.len(), 1);
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_answers_503() {
    let app = spawn_app_with(|settings| settings.limits.body_timeout_secs = 1).await;
    let started = Instant::now();
    let mut slow = partial_post(&app, "/v1/track", 100, 10).await;
    let answer = answer(&mut slow).await;
    let waited = started.elapsed();
    assert!(answer.starts_with("http/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 5"), "{answer}");
    assert!(answer.contains(r#""code":"body_timeout""#), "{answer}");
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let timeouts = metric(
        &app,
        "gateway_ingest_body_timeouts_total",
        &[("route", "single")],
    )
    .await;
    assert_eq!(timeouts, 1.0);
    // A body that arrives in time is unaffected.
    let event = json!({"userId": "u1", "event": "E", "messageId": "in-time"});
    assert_success(app.post_basic("/v1/track", &event.to_string()).await).await;
}
