//! Per-source rules end to end: a gateway loaded from a configuration file, delivering to
//! the Refiner simulator, whose call log (with the position of the key each call used)
//! witnesses what reached Refiner and in which environment. Reload (`POST /api/reload`,
//! SIGHUP) and the preview route are driven through HTTP and a real signal.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use refiner_gateway::sim::{CallRecord, Faults, SimHandle};
use serde_json::{json, Value};

use crate::delivery::{start_sim, wait_for, DEFAULT_KEY};
use crate::helpers::{send_batch, spawn_app_from_file, TestApp, WRITE_KEY};

const ADMIN: &str = "filters-admin-token-0123456789";
const TESTING_KEY: &str = "refiner-testing-key";

/// Rules used by most tests: drop heartbeats, redact phone and IP-derived traits, rename
/// `signup`, route `test-` users to the testing environment.
const RULES: &str = r#"
[filters.default.environments]
testing = "refiner-testing-key"

[[filters.default.rules]]
name = "drop-heartbeats"
match = { all = [{ field = "type", equals = "track" }, { field = "event", in = ["Heartbeat"] }] }
actions = [{ drop = true }]

[[filters.default.rules]]
name = "redact-pii"
actions = [{ remove_traits = ["phone", "ip", "city", "country"] }]

[[filters.default.rules]]
name = "rename-signup"
match = { field = "event", equals = "signup" }
actions = [{ rename_event = "Signed Up" }]

[[filters.default.rules]]
name = "test-traffic"
match = { field = "userId", starts_with = "test-" }
actions = [{ route = "testing" }]
"#;

/// The whole configuration file: one source delivering to `sim`, then `rules`.
fn config(dir: &Path, sim: &SimHandle, rules: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
data_dir = "{data}"
admin_token = "{ADMIN}"

[refiner]
base_url = "{url}"

[delivery]
poll_interval_ms = 10
retry_base_ms = 50
retry_cap_secs = 1
timeout_secs = 5

[[sources]]
slug = "default"
write_keys = ["{WRITE_KEY}"]
refiner_api_key = "{DEFAULT_KEY}"
{rules}
"#,
        data = dir.join("data").display(),
        url = sim.url(),
    )
}

async fn spawn(sim: &SimHandle, rules: &str) -> (TestApp, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, config(dir.path(), sim, rules)).expect("write config");
    let app = spawn_app_from_file(dir, &file).await;
    (app, file)
}

async fn admin_post(app: &TestApp, path: &str, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let response = app
        .client
        .post(app.url(path))
        .bearer_auth(ADMIN)
        .header("Content-Type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(Value::Null);
    (status, body)
}

/// The successful calls the simulator saw, as (key position, path, params).
fn delivered(sim: &SimHandle) -> Vec<(Option<usize>, String, Value)> {
    sim.state()
        .calls()
        .into_iter()
        .filter(|c: &CallRecord| c.status == Some(200))
        .map(|c| (c.key_index, c.path, c.params))
        .collect()
}

#[tokio::test]
async fn rules_drop_redact_rename_and_route_to_a_second_key() {
    let sim = start_sim(&[DEFAULT_KEY, TESTING_KEY], Faults::default()).await;
    let (app, _file) = spawn(&sim, RULES).await;
    let traits = json!({"phone": "+33 1 23", "ip": "203.0.113.9", "city": "Lyon",
                        "country": "FR", "plan": "pro", "email": "ada@example.com"});
    send_batch(
        &app,
        &[
            json!({"type": "track", "event": "Heartbeat", "userId": "u1", "messageId": "m1"}),
            json!({"type": "identify", "userId": "u1", "traits": traits, "messageId": "m2",
                   "context": {"ip": "203.0.113.9"}}),
            json!({"type": "track", "event": "signup", "userId": "u1", "messageId": "m3"}),
            json!({"type": "identify", "userId": "test-7", "traits": {"plan": "free"}, "messageId": "m4"}),
            json!({"type": "track", "event": "Checkout", "userId": "test-7", "messageId": "m5"}),
        ],
    )
    .await;
    let calls = wait_for(Duration::from_secs(20), "four calls delivered", || async {
        let calls = delivered(&sim);
        if calls.len() >= 4 {
            Ok(calls)
        } else {
            Err(format!("{calls:?}"))
        }
    })
    .await;
    let find = |user: &str, path: &str| {
        calls
            .iter()
            .find(|(_, p, params)| p.ends_with(path) && params["id"] == user)
            .cloned()
            .unwrap_or_else(|| panic!("no {path} for {user} in {calls:?}"))
    };
    let (key, _, identify) = find("u1", "/identify-user");
    assert_eq!(key, Some(0), "u1 goes to the source's own key");
    assert_eq!(identify["plan"], "pro");
    assert_eq!(identify["email"], "ada@example.com");
    for redacted in ["phone", "ip", "city", "country"] {
        assert!(
            identify.get(redacted).is_none(),
            "{redacted} reached Refiner: {identify}"
        );
    }
    let (key, _, track) = find("u1", "/track-event");
    assert_eq!((key, track["event"].as_str()), (Some(0), Some("Signed Up")));
    let (key, _, _) = find("test-7", "/identify-user");
    assert_eq!(key, Some(1), "test traffic goes to the testing key");
    let (key, _, track) = find("test-7", "/track-event");
    assert_eq!((key, track["event"].as_str()), (Some(1), Some("Checkout")));
    assert!(
        !calls.iter().any(|(_, _, p)| p["event"] == "Heartbeat"),
        "a dropped event reached Refiner"
    );
    // Everything settled: the dropped event is acked and counted under its rule.
    wait_for(Duration::from_secs(10), "the queue empties", || async {
        let depth = app.spool.stats().await.expect("stats").depth;
        if depth == 0 {
            Ok(())
        } else {
            Err(format!("depth {depth}"))
        }
    })
    .await;
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("gateway_dispatch_skipped_total")
                && l.contains("filtered:drop-heartbeats")
        })
        .unwrap_or_else(|| panic!("no filtered skip metric in\n{metrics}"));
    assert!(line.ends_with(" 1"), "{line}");
    let table = wait_for(
        Duration::from_secs(15),
        "the usage table counts the skip",
        || async {
            let response = app
                .client
                .get(app.url("/api/metrics/default/events"))
                .bearer_auth(ADMIN)
                .send()
                .await
                .expect("metrics table");
            let text = response.text().await.expect("text");
            if text.contains("skipped:filtered:drop-heartbeats") {
                Ok(text)
            } else {
                Err(text)
            }
        },
    )
    .await;
    assert!(table.contains("\"skipped\""), "{table}");
    app.stop().await;
}

#[tokio::test]
async fn preview_answers_what_refiner_would_receive() {
    let sim = start_sim(&[DEFAULT_KEY, TESTING_KEY], Faults::default()).await;
    let (app, _file) = spawn(&sim, RULES).await;
    let identify = json!({"type": "identify", "userId": "test-1", "messageId": "p1",
                          "traits": {"phone": "1", "plan": "pro", "createdAt": "2024-01-01T00:00:00Z"}});
    let (status, body) =
        admin_post(&app, "/api/sources/default/preview", identify.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let result = &body["results"][0];
    assert_eq!(result["index"], 0);
    assert_eq!(result["messageId"], "p1");
    assert_eq!(result["type"], "identify");
    assert_eq!(result["outcome"], "forward");
    assert_eq!(result["reason"], Value::Null);
    assert_eq!(
        result["matched_rules"],
        json!(["redact-pii", "test-traffic"])
    );
    assert_eq!(result["environment"], "testing");
    assert_eq!(
        result["calls"],
        json!([{"method": "POST", "path": "/identify-user",
                "body": {"id": "test-1", "plan": "pro", "created_at": "2024-01-01T00:00:00Z"}}])
    );

    let batch = json!({"batch": [
        {"type": "track", "event": "Heartbeat", "userId": "u"},
        {"type": "track", "event": "signup", "userId": "u"},
        {"type": "alias", "userId": "u", "previousId": "a"},
        {"type": "track", "event": "x", "anonymousId": "anon"},
    ]});
    let (status, body) = admin_post(&app, "/api/sources/default/preview", batch.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let results = body["results"].as_array().expect("results");
    assert_eq!(results.len(), 4);
    assert_eq!(results[0]["outcome"], "skipped");
    assert_eq!(results[0]["reason"], "filtered:drop-heartbeats");
    assert_eq!(results[0]["matched_rules"], json!(["drop-heartbeats"]));
    assert_eq!(results[0]["calls"], json!([]));
    assert!(results[0]["messageId"].is_string(), "a generated messageId");
    assert_eq!(
        results[1]["calls"][0]["body"],
        json!({"id": "u", "event": "Signed Up"})
    );
    assert_eq!(results[1]["environment"], "default");
    assert_eq!(
        (
            results[2]["outcome"].as_str(),
            results[2]["reason"].as_str()
        ),
        (Some("skipped"), Some("alias"))
    );
    assert_eq!(results[3]["reason"], "unidentifiable");

    // Limits and errors, in the API's envelope.
    let big = json!({"type": "track", "event": "e", "userId": "u", "properties": {"pad": "x".repeat(600 * 1024)}});
    let (status, body) = admin_post(&app, "/api/sources/default/preview", big.to_string()).await;
    assert_eq!(
        (status, body["error"]["reason"].as_str()),
        (413, Some("body_too_large")),
        "{body}"
    );
    let (status, body) = admin_post(&app, "/api/sources/default/preview", "{not json").await;
    assert_eq!(
        (status, body["error"]["reason"].as_str()),
        (400, Some("invalid_parameter")),
        "{body}"
    );
    let (status, body) = admin_post(&app, "/api/sources/nope/preview", identify.to_string()).await;
    assert_eq!(
        (status, body["error"]["reason"].as_str()),
        (404, Some("unknown_source")),
        "{body}"
    );
    let response = app
        .client
        .post(app.url("/api/sources/default/preview"))
        .body(identify.to_string())
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 401);
    assert!(
        delivered(&sim).is_empty(),
        "a preview sent something to Refiner"
    );
    assert_eq!(
        app.spool.stats().await.expect("stats").depth,
        0,
        "a preview stored something"
    );
    app.stop().await;
}

/// Sends `events` track events `E-<i>` of 10 users, from `start`, in batches of 25.
async fn send_tracks(app: &TestApp, start: usize, events: usize) {
    for chunk in (start..start + events).collect::<Vec<_>>().chunks(25) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|i| json!({"type": "track", "event": format!("E-{i}"), "userId": format!("user-{}", i % 10), "messageId": format!("m-{i}")}))
            .collect();
        send_batch(app, &batch).await;
    }
}

#[tokio::test]
async fn a_reload_under_load_loses_and_duplicates_nothing() {
    let sim = start_sim(&[DEFAULT_KEY, TESTING_KEY], Faults::default()).await;
    let before = "[filters.default.environments]\ntesting = \"refiner-testing-key\"\n";
    let (app, file) = spawn(&sim, before).await;
    let dir = file.parent().expect("dir").to_path_buf();

    // An invalid rule set is refused as a whole, naming the rule and the field.
    let bad = format!(
        "{before}\n[[filters.default.rules]]\nname = \"to-staging\"\nactions = [{{ route = \"staging\" }}]\n"
    );
    std::fs::write(&file, config(&dir, &sim, &bad)).expect("write");
    let (status, body) = admin_post(&app, "/api/reload", "").await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("filters.default.rules[to-staging].actions[0].route"),
        "{message}"
    );

    // Load: 600 events in two halves; the rules change between them, while the first
    // half is still being delivered.
    let total = 600;
    let sender = {
        let address = app.address.clone();
        let client = app.client.clone();
        tokio::spawn(async move {
            let mut ok = 0;
            for chunk in (0..total / 2).collect::<Vec<_>>().chunks(25) {
                let batch: Vec<Value> = chunk.iter().map(|i| json!({"type": "track", "event": format!("E-{i}"), "userId": format!("user-{}", i % 10), "messageId": format!("m-{i}")})).collect();
                let response = client
                    .post(format!("{address}/v1/batch"))
                    .header("Authorization", crate::helpers::basic(WRITE_KEY))
                    .json(&json!({"batch": batch}))
                    .send()
                    .await
                    .expect("batch");
                assert_eq!(response.status(), 200);
                ok += chunk.len();
            }
            ok
        })
    };
    wait_for(Duration::from_secs(20), "delivery under way", || async {
        let n = delivered(&sim).len();
        if n >= 20 {
            Ok(())
        } else {
            Err(format!("{n} delivered"))
        }
    })
    .await;
    let after = format!(
        "{before}\n[[filters.default.rules]]\nname = \"all-to-testing\"\nactions = [{{ route = \"testing\" }}]\n"
    );
    std::fs::write(&file, config(&dir, &sim, &after)).expect("write");
    let (status, body) = admin_post(&app, "/api/reload", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["reloaded"], true);
    assert_eq!(body["sources"][0]["rules"], 1);
    assert_eq!(body["restart_required"], json!([]));
    assert_eq!(sender.await.expect("sender"), total / 2);
    send_tracks(&app, total / 2, total / 2).await;

    let calls = wait_for(Duration::from_secs(60), "every event delivered", || async {
        let calls = delivered(&sim);
        if calls.len() >= total {
            Ok(calls)
        } else {
            Err(format!("{} of {total}", calls.len()))
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let calls = if delivered(&sim).len() > calls.len() {
        delivered(&sim)
    } else {
        calls
    };
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_key = [0usize; 2];
    for (key, path, params) in &calls {
        assert!(path.ends_with("/track-event"), "{path}");
        *seen
            .entry(params["event"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
        by_key[key.expect("a configured key")] += 1;
    }
    assert_eq!(seen.len(), total, "every event reached Refiner");
    assert!(
        seen.values().all(|&n| n == 1),
        "an event was delivered twice"
    );
    assert!(
        by_key[0] >= 20 && by_key[1] >= total / 2,
        "keys used: {by_key:?}"
    );
    for i in total / 2..total {
        let call = calls
            .iter()
            .find(|(_, _, p)| p["event"] == format!("E-{i}"))
            .expect("call");
        assert_eq!(
            call.0,
            Some(1),
            "E-{i}, accepted after the reload, used the old rules"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn sighup_reloads_the_rules() {
    let sim = start_sim(&[DEFAULT_KEY, TESTING_KEY], Faults::default()).await;
    let (app, file) = spawn(&sim, RULES).await;
    let dir = file.parent().expect("dir").to_path_buf();
    let event = json!({"type": "track", "event": "Heartbeat", "userId": "u"}).to_string();
    let (_, body) = admin_post(&app, "/api/sources/default/preview", event.clone()).await;
    assert_eq!(body["results"][0]["outcome"], "skipped");
    let changed = RULES.replace("in = [\"Heartbeat\"]", "in = [\"Ping\"]");
    std::fs::write(&file, config(&dir, &sim, &changed)).expect("write");
    // SAFETY: sends SIGHUP to this process, whose running gateway listens for it.
    #[allow(unsafe_code)]
    let sent = unsafe { libc::kill(libc::getpid(), libc::SIGHUP) };
    assert_eq!(sent, 0);
    wait_for(
        Duration::from_secs(10),
        "the new rules in force",
        || async {
            let (_, body) = admin_post(&app, "/api/sources/default/preview", event.clone()).await;
            match body["results"][0]["outcome"].as_str() {
                Some("forward") => Ok(()),
                _ => Err(body.to_string()),
            }
        },
    )
    .await;
    app.stop().await;
}
