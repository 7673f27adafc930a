//! The console's API: the live stream (`/api/live`), the event lookup
//! (`/api/events/{source}`), the overview (`/api/overview`) and the delivery log behind
//! them, against a real gateway delivering to the Refiner simulator.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use refiner_gateway::config::{Secret, Settings};
use refiner_gateway::sim::Faults;
use refiner_gateway::spool::delivery_log::{LogKey, LogQuery};
use refiner_gateway::startup::Application;
use serde_json::{json, Value};

use crate::delivery::{spawn_delivering, start_sim, DEFAULT_KEY};
use crate::helpers::{basic, send_batch, spawn_app_with, test_settings, TestApp, WRITE_KEY};

const ADMIN: &str = "console-admin-token";

fn with_admin(settings: &mut Settings) {
    settings.admin_token = Some(Secret::new(ADMIN));
}

async fn get(app: &TestApp, path: &str) -> (u16, Value) {
    let response = app
        .client
        .get(app.url(path))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("GET");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Polls the lookup until `done` holds for its answer; fails with the last answer.
async fn lookup_until(app: &TestApp, query: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(app, &format!("/api/events/default?{query}")).await;
        assert_eq!(status, 200, "lookup {query}: {body}");
        if done(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "lookup {query} never matched: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn track(id: &str, user: &str, event: &str) -> Value {
    json!({"type": "track", "messageId": id, "userId": user, "event": event})
}

/// Server-sent events read from `/api/live`, one `(event name, data)` per message.
struct Live {
    response: reqwest::Response,
    buffer: String,
}

impl Live {
    async fn open(app: &TestApp, query: &str) -> Live {
        let response = app
            .client
            .get(app.url(&format!("/api/live{query}")))
            .bearer_auth(ADMIN)
            .send()
            .await
            .expect("GET /api/live");
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()["content-type"].to_str().ok(),
            Some("text/event-stream")
        );
        let mut live = Live {
            response,
            buffer: String::new(),
        };
        // The stream opens with a comment: from then on the client is subscribed.
        live.read_until(|_, _| true, true).await;
        live
    }

    /// The next message (comments included when `comments`) that `wanted` accepts.
    async fn read_until(
        &mut self,
        wanted: impl Fn(&str, &Value) -> bool,
        comments: bool,
    ) -> (String, Value) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let frame: String = self.buffer.drain(..end + 2).collect();
                if frame.starts_with(':') {
                    if comments {
                        return (frame.trim().to_string(), Value::Null);
                    }
                    continue;
                }
                let mut name = String::new();
                let mut data = Value::Null;
                for line in frame.lines() {
                    if let Some(n) = line.strip_prefix("event: ") {
                        name = n.to_string();
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data = serde_json::from_str(d).expect("data is JSON");
                    }
                }
                if wanted(&name, &data) {
                    return (name, data);
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.response.chunk())
                .await
                .expect("a live message in time")
                .expect("a chunk")
                .expect("the stream stays open");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

#[tokio::test]
async fn a_sent_event_appears_live_with_its_outcome_and_refiner_call_within_a_second() {
    let sim = start_sim(&[DEFAULT_KEY], Faults::none()).await;
    let app = spawn_delivering(&sim, with_admin).await;
    let mut live = Live::open(&app, "?source=default").await;
    let mut filtered = Live::open(&app, "?user=somebody-else").await;

    let sent = Instant::now();
    send_batch(&app, &[track("live-1", "u-live", "Signed Up")]).await;
    let (_, event) = live
        .read_until(
            |name, data| name == "event" && data["messageId"] == "live-1",
            false,
        )
        .await;
    assert_eq!(event["type"], "track");
    assert_eq!(event["event"], "Signed Up");
    assert_eq!(event["userId"], "u-live");
    assert_eq!(event["payload"]["event"], "Signed Up");
    let (_, outcome) = live
        .read_until(
            |name, data| name == "outcome" && data["messageId"] == "live-1",
            false,
        )
        .await;
    let elapsed = sent.elapsed();
    assert!(
        elapsed < Duration::from_secs(1),
        "outcome after {elapsed:?}"
    );
    assert_eq!(outcome["outcome"], "delivered", "{outcome}");
    assert_eq!(outcome["status"], 200);
    assert!(outcome["latency_ms"].is_u64());
    assert_eq!(outcome["calls"][0]["method"], "POST");
    assert_eq!(outcome["calls"][0]["path"], "/track-event");
    assert_eq!(outcome["calls"][0]["body"]["event"], "Signed Up");

    // The other client's filter lets nothing of this user through: its next message is
    // the one of the user it asked for.
    send_batch(&app, &[track("live-2", "somebody-else", "Other")]).await;
    let (name, data) = filtered.read_until(|_, _| true, false).await;
    assert_eq!(
        (name.as_str(), &data["messageId"]),
        ("event", &json!("live-2"))
    );
}

#[tokio::test]
async fn lookups_by_message_id_user_and_email_show_delivery_with_attempts_and_answers() {
    let sim = start_sim(&[DEFAULT_KEY], Faults::none()).await;
    let app = spawn_delivering(&sim, with_admin).await;
    send_batch(
        &app,
        &[
            json!({"type": "identify", "messageId": "find-1", "userId": "u-find",
                   "traits": {"email": "find@example.com", "plan": "pro"}}),
            track("find-2", "u-find", "Upgraded"),
        ],
    )
    .await;
    let by_id = lookup_until(&app, "message_id=find-2", |b| {
        b["results"][0]["state"] == "delivered"
    })
    .await;
    assert_eq!(by_id["count"], 1);
    let found = &by_id["results"][0];
    assert_eq!(found["messageId"], "find-2");
    assert_eq!(found["type"], "track");
    assert_eq!(found["event"], "Upgraded");
    assert_eq!(found["userId"], "u-find");
    assert_eq!(found["payload"]["event"], "Upgraded");
    assert_eq!(found["calls"][0]["path"], "/track-event");
    let attempt = &found["attempts"][0];
    assert_eq!(attempt["status"], 200, "{found}");
    assert!(attempt["latency_ms"].is_u64());
    assert!(
        attempt["response_body"]
            .as_str()
            .is_some_and(|b| !b.is_empty()),
        "{found}"
    );

    let by_user = lookup_until(&app, "user_id=u-find", |b| {
        b["count"] == 2
            && b["results"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|r| r["state"] == "delivered")
    })
    .await;
    // Newest first.
    assert_eq!(by_user["results"][0]["messageId"], "find-2");
    assert_eq!(by_user["results"][1]["messageId"], "find-1");
    let by_email = lookup_until(&app, "email=find%40example.com", |b| b["count"] == 1).await;
    assert_eq!(by_email["results"][0]["messageId"], "find-1");
    assert_eq!(by_email["results"][0]["calls"][0]["path"], "/identify-user");
    assert_eq!(by_email["results"][0]["calls"][0]["body"]["plan"], "pro");

    // Exactly one key.
    for query in ["", "?message_id=a&user_id=b", "?message_id=", "?other=1"] {
        let (status, body) = get(&app, &format!("/api/events/default{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["error"]["reason"], "invalid_parameter");
    }
    let (status, _) = get(&app, "/api/events/nope?message_id=x").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn dead_lettered_and_refused_events_are_found_with_their_reason() {
    let sim = start_sim(
        &[DEFAULT_KEY],
        Faults {
            count_400: 1,
            ..Faults::none()
        },
    )
    .await;
    let app = spawn_delivering(&sim, with_admin).await;
    let mut live = Live::open(&app, "").await;
    let big = "x".repeat(40 * 1024);
    let response = app
        .client
        .post(app.url("/v1/batch"))
        .header("Authorization", basic(WRITE_KEY))
        .json(&json!({"batch": [
            track("dead-1", "u-dead", "Refused By Refiner"),
            {"type": "track", "messageId": "big-1", "userId": "u-big", "event": "Big",
             "properties": {"pad": big}},
        ]}))
        .send()
        .await
        .expect("POST /v1/batch");
    assert_eq!(response.status(), 200);
    // Refused at ingest first, then dead-lettered by delivery.
    let (_, outcome) = live
        .read_until(
            |name, data| name == "outcome" && data["messageId"] == "big-1",
            false,
        )
        .await;
    assert_eq!(outcome["outcome"], "refused");
    assert!(outcome["reason"]
        .as_str()
        .is_some_and(|r| r.contains("event_too_large")));
    let (_, outcome) = live
        .read_until(
            |name, data| name == "outcome" && data["messageId"] == "dead-1",
            false,
        )
        .await;
    assert_eq!(outcome["outcome"], "dead");
    assert_eq!(outcome["status"], 400);

    let dead = lookup_until(&app, "message_id=dead-1", |b| {
        b["results"][0]["state"] == "dead"
    })
    .await;
    let dead = &dead["results"][0];
    assert!(
        dead["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{dead}"
    );
    assert_eq!(dead["attempts"][0]["status"], 400, "{dead}");

    let refused = lookup_until(&app, "message_id=big-1", |b| b["count"] == 1).await;
    let refused = &refused["results"][0];
    assert_eq!(refused["state"], "refused");
    assert!(
        refused["reason"]
            .as_str()
            .is_some_and(|r| r.contains("event_too_large")),
        "{refused}"
    );
    assert!(refused["payload"]
        .as_str()
        .is_some_and(|raw| raw.starts_with('{')));
}

#[tokio::test]
async fn the_log_stays_within_a_tiny_budget_and_drops_the_oldest_first() {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut settings = test_settings(data_dir.path());
    with_admin(&mut settings);
    settings.delivery_log.max_bytes = 64 * 1024;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let built = Application::build_with_listener(&settings, listener)
        .await
        .expect("build");
    let log = built
        .backend()
        .delivery_log
        .expect("the embedded spool keeps a log");
    let app_port = built.port();
    let handle = built.handle();
    let task = tokio::spawn(built.run_until_stopped());
    let client = reqwest::Client::new();
    let pad = "p".repeat(900);
    for batch in 0..20 {
        let events: Vec<Value> = (0..10)
            .map(|i| {
                json!({"type": "track", "messageId": format!("b{batch}-{i}"),
                            "userId": "u", "event": "E", "properties": {"pad": pad}})
            })
            .collect();
        let response = client
            .post(format!("http://127.0.0.1:{app_port}/v1/batch"))
            .header("Authorization", basic(WRITE_KEY))
            .json(&json!({"batch": events}))
            .send()
            .await
            .expect("batch");
        assert_eq!(response.status(), 200);
        let size = log.log_size().await.expect("size");
        assert!(size.bytes <= 64 * 1024, "after batch {batch}: {size:?}");
    }
    let size = log.log_size().await.expect("size");
    assert!(size.bytes > 32 * 1024, "the budget is used: {size:?}");
    let find = |id: &str| LogQuery {
        source: "default".into(),
        key: LogKey::MessageId(id.into()),
        limit: 50,
    };
    assert!(log
        .find_events(find("b0-0"))
        .await
        .expect("find")
        .is_empty());
    let newest = log.find_events(find("b19-9")).await.expect("find");
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0].state.as_str(), "queued");
    handle.stop(true).await;
    let _ = task.await;
}

#[tokio::test]
async fn the_overview_shows_the_last_hour_backlog_breaker_latency_and_usage() {
    let sim = start_sim(&[DEFAULT_KEY], Faults::none()).await;
    let app = spawn_delivering(&sim, with_admin).await;
    send_batch(
        &app,
        &[
            track("ov-1", "u-ov", "E"),
            json!({"type": "alias", "messageId": "ov-2",
                                                          "userId": "u-ov", "previousId": "x"}),
        ],
    )
    .await;
    lookup_until(&app, "message_id=ov-1", |b| {
        b["results"][0]["state"] == "delivered"
    })
    .await;
    lookup_until(&app, "message_id=ov-2", |b| {
        b["results"][0]["state"] == "skipped"
    })
    .await;
    let (status, body) = get(&app, "/api/overview").await;
    assert_eq!(status, 200, "{body}");
    assert!(body["generated_at"].is_string());
    let sources = body["sources"].as_array().expect("sources");
    let default = sources
        .iter()
        .find(|s| s["source"] == "default")
        .expect("default");
    let minutes = default["minutes"].as_array().expect("minutes");
    assert_eq!(minutes.len(), 60);
    let sum = |field: &str| {
        minutes
            .iter()
            .map(|m| m[field].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    assert_eq!(sum("received"), 2, "{default}");
    assert_eq!(sum("forwarded"), 1, "{default}");
    let skipped: u64 = minutes
        .iter()
        .filter_map(|m| m["skipped"]["alias"].as_u64())
        .sum();
    assert_eq!(skipped, 1, "{default}");
    assert!(minutes[0]["at"].as_str() < minutes[59]["at"].as_str());
    assert_eq!(default["backlog"], 0);
    assert_eq!(default["breaker"], "closed");
    assert!(default["concurrency"].as_u64().is_some_and(|c| c > 0));
    assert!(default["latency_ms"]["p50"].is_number(), "{default}");
    assert_eq!(default["usage"]["mte"], 2);
    assert!(default["usage"]["month"]
        .as_str()
        .is_some_and(|m| m.len() == 7));
}

#[tokio::test]
async fn console_routes_refuse_requests_without_the_token_and_bound_live_clients() {
    let app = spawn_app_with(|settings| {
        with_admin(settings);
        settings.delivery_log.max_live_clients = 1;
    })
    .await;
    for path in [
        "/api/events/default?message_id=x",
        "/api/live",
        "/api/overview",
    ] {
        let anonymous = app.client.get(app.url(path)).send().await.expect("GET");
        assert_eq!(anonymous.status(), 401, "{path}");
        let wrong = app
            .client
            .get(app.url(path))
            .bearer_auth("not-the-token")
            .send()
            .await
            .expect("GET");
        assert_eq!(wrong.status(), 401, "{path}");
    }
    let _first = Live::open(&app, "").await;
    let (status, body) = get(&app, "/api/live").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["reason"], "too_many_clients");
}

/// The embedded spool's delivery log through the shared conformance checks.
mod sqlite_log {
    use refiner_gateway::spool::delivery_log::{LogKey, LogQuery};
    use refiner_gateway::spool::{log_conformance, Backend, SqliteSpool, SqliteSpoolOptions};
    use refiner_gateway::telemetry::Metrics;

    fn backend(dir: &std::path::Path, max_bytes: Option<u64>) -> Backend {
        let mut options = SqliteSpoolOptions::new(dir);
        if let Some(max_bytes) = max_bytes {
            options.delivery_log.max_bytes = max_bytes;
        }
        Backend::sqlite(SqliteSpool::open(options, Metrics::new()).expect("open the spool"))
    }

    #[tokio::test]
    async fn sqlite_log_records_events_attempts_and_outcomes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let b = backend(dir.path(), None);
        let log = b.delivery_log.expect("a log");
        log_conformance::records_events_attempts_and_outcomes(b.queue, log).await;
    }

    #[tokio::test]
    async fn sqlite_log_finds_records_among_many() {
        let dir = tempfile::tempdir().expect("temp dir");
        let b = backend(dir.path(), None);
        let log = b.delivery_log.expect("a log");
        log_conformance::finds_records_among_many(b.queue, log, 10_000).await;
    }

    /// The lookup filters of the rows after the last sealed chunk are rebuilt when the file
    /// is opened again, and sealing goes on from there.
    #[tokio::test]
    async fn sqlite_log_finds_records_after_a_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        let b = backend(dir.path(), None);
        log_conformance::append_many(&b.queue, "pre", 0..6_000).await;
        b.queue.close().await;
        drop(b);
        let b = backend(dir.path(), None);
        log_conformance::append_many(&b.queue, "pre", 6_000..9_000).await;
        let log = b.delivery_log.expect("a log");
        // Sealed before the restart, rebuilt at the restart and sealed after it, open.
        for i in [0, 4_500, 5_999, 8_999] {
            let found = log
                .find_events(LogQuery {
                    source: "web".into(),
                    key: LogKey::MessageId(format!("pre-{i}")),
                    limit: 10,
                })
                .await
                .expect("find");
            assert_eq!(found.len(), 1, "pre-{i}: {found:?}");
        }
        b.queue.close().await;
    }

    #[tokio::test]
    async fn sqlite_log_stays_within_its_byte_budget() {
        let dir = tempfile::tempdir().expect("temp dir");
        let b = backend(dir.path(), Some(64 * 1024));
        let log = b.delivery_log.expect("a log");
        log_conformance::stays_within_its_byte_budget(b.queue, log, 64 * 1024).await;
    }
}
