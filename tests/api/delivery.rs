//! Delivery end to end: the gateway with delivery on, sending to the in-process Refiner
//! simulator (`refiner_gateway::sim`) on 127.0.0.1, with the simulator's call log as the
//! witness of what reached Refiner, in which order, with which key and when.
//!
//! Every wait is a bounded polling loop that fails with the state it last saw; timings are
//! scaled down (tens of ms backoff, 1 s cooldowns) so the whole file runs in well under two
//! minutes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::TcpListener;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use refiner_gateway::config::{DeliverySettings, Secret, Settings, SourceSettings};
use refiner_gateway::sim::{self, AuthMethod, CallRecord, Faults, SimHandle, SimOptions};
use serde_json::{json, Map, Value};
use sha1::Sha1;
use tokio::process::{Child, Command};

use crate::helpers::{
    basic, send_batch, spawn_app_in, spawn_app_with, TestApp, OTHER_KEY, WEBHOOK_SECRET, WRITE_KEY,
};

/// The Refiner API keys of `test_settings`' two sources.
pub(crate) const DEFAULT_KEY: &str = "refiner-key";
const HOOKED_KEY: &str = "refiner-key-2";

const BINARY: &str = env!("CARGO_BIN_EXE_refiner-gateway");

// ---------------------------------------------------------------------------------------
// Helpers

pub(crate) async fn start_sim(keys: &[&str], faults: Faults) -> SimHandle {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let options = SimOptions {
        api_keys: keys.iter().map(|k| k.to_string()).collect(),
        faults,
        workers: Some(2),
        ..SimOptions::default()
    };
    sim::spawn(listener, options)
        .await
        .expect("the simulator starts")
}

/// Delivery on, pointed at `sim`, with test-sized timings.
pub(crate) fn deliver_to(settings: &mut Settings, sim: &SimHandle) {
    settings.refiner.base_url = sim.url();
    let delivery = &mut settings.delivery;
    delivery.enabled = true;
    delivery.retry_base_ms = 50;
    delivery.retry_cap_secs = 1;
    delivery.retry_floor_429_secs = 1;
    delivery.breaker_cooldown_secs = 1;
    delivery.poll_interval_ms = 10;
    delivery.timeout_secs = 5;
}

pub(crate) async fn spawn_delivering(
    sim: &SimHandle,
    customize: impl FnOnce(&mut Settings),
) -> TestApp {
    spawn_app_with(|settings| {
        deliver_to(settings, sim);
        customize(settings);
    })
    .await
}

/// Posts one event to `/webhook` as Segment's classic Webhooks destination does, signed for
/// the `hooked` source, and expects 200.
async fn send_webhook(app: &TestApp, event: &Value) {
    let body = event.to_string();
    let mut mac = Hmac::<Sha1>::new_from_slice(WEBHOOK_SECRET.as_bytes()).expect("hmac key");
    mac.update(body.as_bytes());
    let signature = hex::encode(mac.finalize().into_bytes());
    let response = app
        .client
        .post(app.url("/webhook"))
        .header("Content-Type", "application/json")
        .header("User-Agent", "Segment.io/1.0")
        .header("X-Signature", signature)
        .body(body)
        .send()
        .await
        .expect("POST /webhook");
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    assert_eq!(status, 200, "POST /webhook answered {status}: {text}");
}

pub(crate) use crate::common::wait_for;

/// Waits until the spool holds nothing (every accepted event acked or dead-lettered).
pub(crate) async fn wait_drained(app: &TestApp, limit: Duration) {
    wait_for(limit, "the spool drains", || async {
        let stats = app.spool.stats().await.expect("spool stats");
        if stats.depth == 0 {
            Ok(())
        } else {
            Err(format!("{stats:?}"))
        }
    })
    .await
}

async fn metrics_text(address: &str) -> String {
    let response = reqwest::get(format!("{address}/metrics"))
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200);
    response.text().await.expect("metrics body")
}

/// The value of the first series of `name` carrying all `labels` (0 if there is none).
fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (series_name, label_part) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let present: Vec<&str> = label_part.split(',').collect();
        if wanted.iter().all(|w| present.contains(&w.as_str())) {
            return value.trim().parse().expect("a metric value");
        }
    }
    0.0
}

pub(crate) async fn metric(app: &TestApp, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_in(&metrics_text(&app.address).await, name, labels)
}

pub(crate) fn succeeded(call: &CallRecord) -> bool {
    call.status.is_some_and(|s| (200..300).contains(&s))
}

/// The calls about `user`, in order of receipt.
pub(crate) fn calls_of(sim: &SimHandle, user: &str) -> Vec<CallRecord> {
    sim.state()
        .calls()
        .into_iter()
        .filter(|c| c.user.as_deref() == Some(user))
        .collect()
}

/// A short description of calls for failure messages.
pub(crate) fn describe(calls: &[CallRecord]) -> String {
    let parts: Vec<String> = calls
        .iter()
        .map(|c| {
            format!(
                "#{} {} {} {:?} at {} ms -> {:?}",
                c.seq, c.method, c.path, c.user, c.at_ms, c.status
            )
        })
        .collect();
    format!("[{}]", parts.join("; "))
}

/// Waits for a successful call about `user` to `path` and returns every call about `user`.
async fn wait_for_call(sim: &SimHandle, user: &str, path: &str) -> Vec<CallRecord> {
    wait_for(
        Duration::from_secs(15),
        &format!("a successful {path} call for {user}"),
        || async {
            let calls = calls_of(sim, user);
            if calls.iter().any(|c| c.path == path && succeeded(c)) {
                Ok(calls)
            } else {
                Err(describe(&calls))
            }
        },
    )
    .await
}

// ---------------------------------------------------------------------------------------
// 1. The mapping, row by row

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mapping_row_reaches_refiner_as_documented() {
    let sim = start_sim(&[DEFAULT_KEY, HOOKED_KEY], Faults::none()).await;
    let app = spawn_delivering(&sim, |_| {}).await;

    let long = "é".repeat(300);
    send_batch(
        &app,
        &[
            json!({"type": "identify", "userId": "u-identify", "messageId": "map-identify",
                   "traits": {"email": "ada@example.com", "firstName": "Ada", "lastName": "Lovelace",
                              "createdAt": "2024-05-06T07:08:09Z",
                              "address": {"city": "London", "postalCode": "NW1"},
                              "bio": long, "age": 36, "vip": true, "nickname": null}}),
            json!({"type": "group", "userId": "u-group", "groupId": "acme", "messageId": "map-group",
                   "traits": {"name": "Acme", "employees": 42, "plan": {"tier": "gold"}}}),
            json!({"type": "track", "userId": "u-track", "event": "Signed Up", "messageId": "map-track",
                   "properties": {"plan": "pro", "seats": 3}}),
            json!({"type": "page", "userId": "u-ping", "name": "Home", "messageId": "map-page-1"}),
            json!({"type": "alias", "userId": "u-alias", "previousId": "anon-0", "messageId": "map-alias"}),
            json!({"type": "track", "anonymousId": "anon-only", "event": "Browsed",
                   "messageId": "map-anonymous"}),
        ],
    )
    .await;
    // A deletion comes from Segment's Webhooks destination (source `hooked`): identify the
    // contact first so that Refiner has something to delete.
    send_webhook(
        &app,
        &json!({"type": "identify", "userId": "u-delete", "messageId": "map-del-identify",
                "traits": {"email": "gone@example.com"}}),
    )
    .await;
    send_webhook(
        &app,
        &json!({"type": "delete", "userId": "u-delete", "messageId": "map-delete"}),
    )
    .await;

    // identify → identify-user with id, email and the traits converted.
    let calls = wait_for_call(&sim, "u-identify", "/v1/identify-user").await;
    assert_eq!(calls.len(), 1, "{}", describe(&calls));
    let expected = json!({
        "id": "u-identify", "email": "ada@example.com", "first_name": "Ada",
        "last_name": "Lovelace", "created_at": "2024-05-06T07:08:09Z",
        "address_city": "London", "address_postal_code": "NW1",
        "bio": "é".repeat(255), "age": 36, "vip": true,
    });
    assert_eq!(calls[0].params, expected, "identify-user body");
    let contact = sim
        .state()
        .contact("u-identify")
        .expect("the contact exists");
    assert_eq!(contact.email.as_deref(), Some("ada@example.com"));
    assert_eq!(
        contact.attribute_types.get("created_at"),
        Some(&sim::TraitType::Date),
        "{contact:?}"
    );

    // group → identify-user with the account and its converted traits, no contact traits.
    let calls = wait_for_call(&sim, "u-group", "/v1/identify-user").await;
    assert_eq!(calls.len(), 1, "{}", describe(&calls));
    assert_eq!(
        calls[0].params,
        json!({"id": "u-group",
               "account": {"id": "acme", "name": "Acme", "employees": 42, "plan_tier": "gold"}}),
        "group body"
    );
    let account = sim.state().account("acme").expect("the account exists");
    assert_eq!(account.contact_count, 1);

    // track → track-event {id, event}, properties dropped.
    let calls = wait_for_call(&sim, "u-track", "/v1/track-event").await;
    assert_eq!(calls.len(), 1, "{}", describe(&calls));
    assert_eq!(
        calls[0].params,
        json!({"id": "u-track", "event": "Signed Up"}),
        "track-event body"
    );

    // page → a ping: identify-user with the id only.
    let calls = wait_for_call(&sim, "u-ping", "/v1/identify-user").await;
    assert_eq!(calls.len(), 1, "{}", describe(&calls));
    assert_eq!(calls[0].params, json!({"id": "u-ping"}), "ping body");

    // delete on the webhook → DELETE /contact {id}, after the identify, with the hooked key.
    let calls = wait_for_call(&sim, "u-delete", "/v1/contact").await;
    let routes: Vec<(&str, &str, Option<u16>)> = calls
        .iter()
        .map(|c| (c.method.as_str(), c.path.as_str(), c.status))
        .collect();
    assert_eq!(
        routes,
        [
            ("POST", "/v1/identify-user", Some(200)),
            ("DELETE", "/v1/contact", Some(200))
        ],
        "{}",
        describe(&calls)
    );
    assert_eq!(calls[1].params, json!({"id": "u-delete"}), "delete body");
    assert!(sim.state().contact("u-delete").is_none(), "not deleted");

    // More pages and screens within the ping interval: no further call.
    send_batch(
        &app,
        &[
            json!({"type": "screen", "userId": "u-ping", "name": "Settings", "messageId": "map-screen"}),
            json!({"type": "page", "userId": "u-ping", "name": "Pricing", "messageId": "map-page-2"}),
        ],
    )
    .await;
    wait_drained(&app, Duration::from_secs(10)).await;
    let text = metrics_text(&app.address).await;
    let skipped = |reason: &str| {
        metric_in(
            &text,
            "gateway_dispatch_skipped_total",
            &[("source", "default"), ("reason", reason)],
        )
    };
    assert_eq!(skipped("ping_throttled"), 2.0, "{text}");
    assert_eq!(skipped("alias"), 1.0, "{text}");
    assert_eq!(skipped("unidentifiable"), 1.0, "{text}");
    assert_eq!(calls_of(&sim, "u-ping").len(), 1, "one ping per interval");

    // Alias and anonymous-only events made no call; everything else made exactly one, with
    // a Bearer key Refiner accepted.
    let all = sim.state().calls();
    assert!(
        all.iter()
            .all(|c| c.user.as_deref() != Some("u-alias") && c.user.as_deref() != Some("anon-0")),
        "an alias reached Refiner: {}",
        describe(&all)
    );
    assert!(
        all.iter().all(|c| c.user.as_deref() != Some("anon-only")),
        "an anonymous-only event reached Refiner: {}",
        describe(&all)
    );
    assert_eq!(all.len(), 6, "{}", describe(&all));
    for call in &all {
        assert_eq!(call.auth, AuthMethod::Bearer, "{}", describe(&all));
        assert!(call.auth_ok, "refused key: {}", describe(&all));
        assert_eq!(call.status, Some(200), "{}", describe(&all));
    }
    let forwarded = |text: &str, source: &str| {
        metric_in(
            text,
            "gateway_dispatch_events_total",
            &[("source", source), ("outcome", "forwarded")],
        )
    };
    assert_eq!(forwarded(&text, "default"), 4.0, "{text}");
    assert_eq!(forwarded(&text, "hooked"), 2.0, "{text}");
    assert_eq!(app.spool.stats().await.expect("stats").dead_letters, 0);
    app.stop().await;
    sim.stop().await;
}

/// Each source's calls carry that source's own key: against a Refiner that only knows the
/// `hooked` source's key, `hooked` events are delivered and `default` ones are refused
/// (401). A refused key pauses its source: the event is kept (no dead letter, no retry
/// burning attempts), the pause shows in `gateway_dispatch_key_paused`, and a restart with
/// the corrected key delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_source_calls_with_its_own_key() {
    let sim = start_sim(&[HOOKED_KEY], Faults::none()).await;
    let app = spawn_delivering(&sim, |_| {}).await;
    send_webhook(
        &app,
        &json!({"type": "track", "userId": "u-hooked", "event": "Hooked", "messageId": "key-1"}),
    )
    .await;
    send_batch(
        &app,
        &[json!({"type": "track", "userId": "u-default", "event": "Default", "messageId": "key-2"})],
    )
    .await;
    wait_for(
        Duration::from_secs(10),
        "the refused source pauses",
        || async {
            let paused = metric(
                &app,
                "gateway_dispatch_key_paused",
                &[("source", "default")],
            )
            .await;
            let hooked = calls_of(&sim, "u-hooked").len();
            if paused == 1.0 && hooked == 1 {
                Ok(())
            } else {
                Err(format!("paused {paused}, hooked calls {hooked}"))
            }
        },
    )
    .await;
    let hooked = calls_of(&sim, "u-hooked");
    assert_eq!(hooked.len(), 1, "{}", describe(&hooked));
    assert!(hooked[0].auth_ok && hooked[0].auth == AuthMethod::Bearer);
    assert_eq!(hooked[0].status, Some(200));
    // The paused source is not called again before its recheck.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let default = calls_of(&sim, "u-default");
    assert_eq!(
        default.len(),
        1,
        "a 401 is not retried: {}",
        describe(&default)
    );
    assert_eq!(default[0].auth, AuthMethod::Bearer);
    assert!(
        !default[0].auth_ok,
        "the default source used the hooked key"
    );
    assert_eq!(default[0].status, Some(401));
    let stats = app.spool.stats().await.expect("stats");
    assert_eq!(stats.dead_letters, 0, "a refused key dead-letters nothing");
    assert_eq!(stats.depth, 1, "the refused event is kept");

    // The operator fixes the key and restarts: the kept event goes out.
    let (data_dir, mut settings) = app.stop().await;
    settings.sources[0].refiner_api_key = Some(Secret::new(HOOKED_KEY));
    let app = spawn_app_in(data_dir, settings).await;
    wait_drained(&app, Duration::from_secs(10)).await;
    let default = calls_of(&sim, "u-default");
    assert_eq!(default.len(), 2, "{}", describe(&default));
    assert_eq!(default[1].status, Some(200));
    assert_eq!(
        metric(
            &app,
            "gateway_dispatch_key_paused",
            &[("source", "default")]
        )
        .await,
        0.0
    );
    assert_eq!(app.spool.stats().await.expect("stats").dead_letters, 0);
    app.stop().await;
    sim.stop().await;
}

/// While a source is paused, a recheck call goes every `auth_recheck_secs`; once Refiner
/// accepts the key again, delivery resumes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_is_rechecked_and_resumes_by_itself() {
    let sim = start_sim(
        &[],
        Faults {
            count_401: 1,
            ..Faults::none()
        },
    )
    .await;
    let app = spawn_delivering(&sim, |settings| settings.delivery.auth_recheck_secs = 1).await;
    send_batch(
        &app,
        &[
            json!({"type": "track", "userId": "u-a", "event": "One", "messageId": "re-1"}),
            json!({"type": "identify", "userId": "u-b", "traits": {"plan": "pro"}, "messageId": "re-2"}),
        ],
    )
    .await;
    wait_drained(&app, Duration::from_secs(10)).await;
    let calls = sim.state().calls();
    assert!(
        calls.iter().any(|c| c.status == Some(401)),
        "{}",
        describe(&calls)
    );
    assert_eq!(
        calls_of(&sim, "u-a").last().and_then(|c| c.status),
        Some(200)
    );
    assert_eq!(
        calls_of(&sim, "u-b").last().and_then(|c| c.status),
        Some(200)
    );
    assert_eq!(app.spool.stats().await.expect("stats").dead_letters, 0);
    assert_eq!(
        metric(
            &app,
            "gateway_dispatch_key_paused",
            &[("source", "default")]
        )
        .await,
        0.0
    );
    app.stop().await;
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------
// 2. Per-user order under transient failures

/// What an event of the ordering test is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Identify,
    Track,
    Page,
    Group,
}

/// The events one user sends, in order: a deterministic mix; every identify, group and
/// track carries its position `n` (a trait `step_n`, an account trait `step_n`, the event
/// name `step n`), so each successful call tells which events it delivered.
fn user_events(user: usize, count: usize) -> Vec<(Kind, Value)> {
    let id = format!("ord-{user}");
    let mut state = (user as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (0..count)
        .map(|n| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let kind = match state % 10 {
                0..=2 => Kind::Identify,
                3..=5 => Kind::Track,
                6..=7 => Kind::Page,
                _ => Kind::Group,
            };
            let message_id = format!("ord-{user}-{n}");
            let step = format!("step_{n}");
            let event = match kind {
                Kind::Identify => json!({"type": "identify", "userId": id, "messageId": message_id,
                                         "traits": {step: n}}),
                Kind::Track => json!({"type": "track", "userId": id, "messageId": message_id,
                                      "event": format!("step {n}"), "properties": {"n": n}}),
                Kind::Page => json!({"type": "page", "userId": id, "messageId": message_id,
                                     "name": format!("step {n}")}),
                Kind::Group => json!({"type": "group", "userId": id, "messageId": message_id,
                                      "groupId": format!("g-{user}"), "traits": {step: n}}),
            };
            (kind, event)
        })
        .collect()
}

/// The positions of the events a call delivered (see [`user_events`]).
fn steps_in(call: &CallRecord) -> Vec<usize> {
    let mut steps = Vec::new();
    let step_keys = |map: &Map<String, Value>, steps: &mut Vec<usize>| {
        for key in map.keys() {
            if let Some(n) = key.strip_prefix("step_").and_then(|n| n.parse().ok()) {
                steps.push(n);
            }
        }
    };
    match call.path.as_str() {
        "/v1/track-event" => {
            if let Some(n) = call.params["event"]
                .as_str()
                .and_then(|e| e.strip_prefix("step "))
                .and_then(|n| n.parse().ok())
            {
                steps.push(n);
            }
        }
        "/v1/identify-user" => {
            if let Some(params) = call.params.as_object() {
                step_keys(params, &mut steps);
            }
            if let Some(account) = call.params["account"].as_object() {
                step_keys(account, &mut steps);
            }
        }
        _ => {}
    }
    steps.sort_unstable();
    steps
}

/// Strict mode (`per_user_window = 1`): every event of a user arrives in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn each_users_events_arrive_in_order_despite_503s_and_429s() {
    order_under_faults(1).await;
}

/// The default window: a user's identify and group calls never overtake anything accepted
/// before them nor are overtaken by anything after them; only tracks overtake tracks, each
/// by fewer than the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn state_changes_keep_their_place_while_tracks_overlap() {
    order_under_faults(DeliverySettings::default().per_user_window).await;
}

/// Where each event of `plan` first succeeded among `user_calls` (by call position), and
/// how often it succeeded.
fn first_successes(user_calls: &[&CallRecord]) -> (HashMap<usize, usize>, HashMap<usize, usize>) {
    let mut first: HashMap<usize, usize> = HashMap::new();
    let mut times: HashMap<usize, usize> = HashMap::new();
    for (position, call) in user_calls.iter().enumerate() {
        if !succeeded(call) {
            continue;
        }
        for n in steps_in(call) {
            first.entry(n).or_insert(position);
            *times.entry(n).or_default() += 1;
        }
    }
    (first, times)
}

/// Order violations of one user's events under a per-user window: with a window of 1,
/// any event first delivered after a later one; otherwise, an identify or group delivered
/// out of place relative to any other event, or a track overtaken by `window` or more.
fn disorder_of(
    id: &str,
    plan: &[(Kind, Value)],
    first: &HashMap<usize, usize>,
    window: usize,
) -> Vec<String> {
    let delivered: Vec<(usize, Kind, usize)> = plan
        .iter()
        .enumerate()
        .filter(|(_, (kind, _))| *kind != Kind::Page)
        .filter_map(|(n, (kind, _))| first.get(&n).map(|&p| (n, *kind, p)))
        .collect();
    let mut disorder = Vec::new();
    for &(n, kind, position) in &delivered {
        let overtaken_by: Vec<&(usize, Kind, usize)> = delivered
            .iter()
            .filter(|(m, _, p)| *m > n && *p < position)
            .collect();
        let state_change = |k: Kind| matches!(k, Kind::Identify | Kind::Group);
        let broken = if window == 1 {
            !overtaken_by.is_empty()
        } else {
            state_change(kind)
                || overtaken_by.iter().any(|(_, k, _)| state_change(*k))
                || overtaken_by.len() >= window
        };
        if broken && !overtaken_by.is_empty() {
            let (m, _, p) = overtaken_by[0];
            disorder.push(format!(
                "{id}: #{n} ({kind:?}) first succeeded in call {position}, after #{m} in call {p}"
            ));
        }
    }
    disorder
}

async fn order_under_faults(window: usize) {
    const USERS: usize = 200;
    const EVENTS: usize = 50;
    const PER_REQUEST: usize = 5;
    let faults = Faults {
        rate_503: 0.10,
        rate_429: 0.02,
        retry_after_secs: 1,
        seed: 2024,
        ..Faults::none()
    };
    // Users are spread over eight sources, each with its own Refiner key. A 429 pauses its
    // key for the Retry-After, so one key does at most ~50 calls/s under 2 % of 429s with
    // Retry-After 1 s; eight keys keep the ~6,500 calls within the time budget.
    let sources: Vec<(String, String, String)> = (0..8)
        .map(|i| match i {
            0 => ("default".into(), WRITE_KEY.into(), DEFAULT_KEY.into()),
            1 => ("hooked".into(), OTHER_KEY.into(), HOOKED_KEY.into()),
            i => (
                format!("order-{i}"),
                format!("order-write-key-{i}"),
                format!("refiner-key-{}", i + 1),
            ),
        })
        .collect();
    let keys: Vec<&str> = sources.iter().map(|(_, _, key)| key.as_str()).collect();
    let sim = start_sim(&keys, faults).await;
    let app = spawn_delivering(&sim, |settings| {
        settings.delivery.retry_base_ms = 20;
        settings.delivery.retry_cap_secs = 1;
        settings.delivery.per_user_window = window;
        for (slug, write_key, refiner_key) in &sources[2..] {
            settings.sources.push(SourceSettings {
                slug: slug.clone(),
                write_keys: vec![Secret::new(write_key.as_str())],
                webhook_secret: None,
                refiner_api_key: Some(Secret::new(refiner_key.as_str())),
                webhook_format: Default::default(),
            });
        }
    })
    .await;
    let started = Instant::now();

    let plans: Vec<Vec<(Kind, Value)>> = (0..USERS).map(|u| user_events(u, EVENTS)).collect();
    let mut senders = Vec::new();
    for (user, plan) in plans.iter().enumerate() {
        let events: Vec<Value> = plan.iter().map(|(_, e)| e.clone()).collect();
        let (client, url) = (app.client.clone(), app.url("/v1/batch"));
        let write_key = sources[user % sources.len()].1.clone();
        senders.push(tokio::spawn(async move {
            // One request at a time per user: acceptance order is the order sent.
            for chunk in events.chunks(PER_REQUEST) {
                let response = client
                    .post(&url)
                    .header("Authorization", basic(&write_key))
                    .json(&json!({ "batch": chunk }))
                    .send()
                    .await
                    .expect("POST /v1/batch");
                assert_eq!(response.status(), 200, "user {user}");
            }
        }));
    }
    for sender in senders {
        sender.await.expect("sender task");
    }
    let accepted_in = started.elapsed();
    wait_drained(&app, Duration::from_secs(60)).await;
    let drained_in = started.elapsed();

    let calls = sim.state().calls();
    let mut by_user: HashMap<String, Vec<&CallRecord>> = HashMap::new();
    for call in &calls {
        if let Some(user) = call.user.as_deref().filter(|u| u.starts_with("ord-")) {
            by_user.entry(user.to_string()).or_default().push(call);
        }
    }
    let mut missing = Vec::new();
    let mut disorder = Vec::new();
    let mut duplicates = Vec::new();
    let mut retry_after_broken = Vec::new();
    for (user, plan) in plans.iter().enumerate() {
        let id = format!("ord-{user}");
        let user_calls = by_user.get(&id).cloned().unwrap_or_default();
        let (first, times) = first_successes(&user_calls);
        for (n, (kind, _)) in plan.iter().enumerate() {
            if *kind != Kind::Page && !first.contains_key(&n) {
                missing.push(format!("{id} #{n} ({kind:?})"));
            }
            if let Some(&count) = times.get(&n).filter(|&&c| c > 1) {
                duplicates.push(format!("{id} #{n} x{count}"));
            }
        }
        disorder.extend(disorder_of(&id, plan, &first, window));
        // A user's call after a 429 never comes before its Retry-After (1 s) elapsed; with
        // a window, a track already in flight beside the 429 (sent before the gateway read
        // the 429, so reaching the simulator within 50 ms of its answer on a loaded
        // machine) is not "after" it.
        for pair in user_calls.windows(2) {
            if pair[0].status == Some(429) {
                let answered = pair[0].answered_ms.unwrap_or(pair[0].at_ms);
                if window > 1 && pair[1].at_ms <= answered + 50 {
                    continue;
                }
                if pair[1].at_ms + 5 < answered + 1000 {
                    retry_after_broken.push(format!(
                        "{id}: call at {} ms, 429 answered at {answered} ms",
                        pair[1].at_ms
                    ));
                }
            }
        }
    }
    // For information: calls of other users with the same key that started while a 429's
    // Retry-After was running (the key is paused, but calls already waiting for a
    // concurrency slot still go).
    let key_of = |user: &str| {
        user.strip_prefix("ord-")
            .and_then(|u| u.parse::<usize>().ok())
            .map(|u| u % sources.len())
    };
    let mut during_pause = 0;
    for limited in calls.iter().filter(|c| c.status == Some(429)) {
        let Some(answered) = limited.answered_ms else {
            continue;
        };
        let key = limited.user.as_deref().and_then(key_of);
        during_pause += calls
            .iter()
            .filter(|c| c.at_ms > answered + 5 && c.at_ms + 5 < answered + 1000)
            .filter(|c| c.user != limited.user && c.user.as_deref().and_then(key_of) == key)
            .count();
    }
    let stats = sim.state().call_stats();
    let text = metrics_text(&app.address).await;
    let outcome = |outcome: &str| {
        sources
            .iter()
            .map(|(source, _, _)| {
                metric_in(
                    &text,
                    "gateway_dispatch_events_total",
                    &[("source", source), ("outcome", outcome)],
                )
            })
            .sum::<f64>()
    };
    eprintln!(
        "ordering: {} events accepted in {accepted_in:?}, drained in {drained_in:?}; {} calls \
         ({:?}); forwarded {}, skipped {}, retried {}, coalesced {}; {during_pause} calls \
         started on a key within a 429's Retry-After; {} duplicates: {duplicates:?}",
        USERS * EVENTS,
        stats.total,
        stats.by_status,
        outcome("forwarded"),
        outcome("skipped"),
        outcome("retried"),
        metric_in(&text, "gateway_dispatch_coalesced_total", &[]),
        duplicates.len(),
    );
    assert!(
        missing.is_empty(),
        "{} events never arrived (duplicates {duplicates:?}): {missing:?}",
        missing.len()
    );
    assert!(
        disorder.is_empty(),
        "{} out-of-order deliveries (duplicates {duplicates:?}): {disorder:?}",
        disorder.len()
    );
    assert!(
        retry_after_broken.is_empty(),
        "calls before Retry-After elapsed: {retry_after_broken:?}"
    );
    assert!(
        stats.by_status.get("503").copied().unwrap_or(0) > 100
            && stats.by_status.get("429").copied().unwrap_or(0) > 10,
        "the faults did not fire: {:?}",
        stats.by_status
    );
    assert_eq!(outcome("dead_lettered"), 0.0);
    assert_eq!(
        outcome("forwarded") + outcome("skipped"),
        (USERS * EVENTS) as f64,
        "every event is forwarded or deliberately skipped (throttled pings)"
    );
    assert_eq!(app.spool.stats().await.expect("stats").dead_letters, 0);
    app.stop().await;
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------
// 3. Retry-After

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_call_for_a_user_comes_before_retry_after_elapsed() {
    const RETRY_AFTER_MS: u64 = 2000;
    let faults = Faults {
        count_429: 2,
        retry_after_secs: RETRY_AFTER_MS / 1000,
        ..Faults::none()
    };
    let sim = start_sim(&[DEFAULT_KEY, HOOKED_KEY], faults).await;
    // The 429 floor (1 s) is below Retry-After (2 s): Retry-After decides.
    let app = spawn_delivering(&sim, |_| {}).await;
    send_batch(
        &app,
        &[
            json!({"type": "identify", "userId": "u-ra", "messageId": "ra-1",
                   "traits": {"plan": "pro"}}),
            json!({"type": "track", "userId": "u-ra", "event": "Upgraded", "messageId": "ra-2"}),
        ],
    )
    .await;
    let calls = wait_for(Duration::from_secs(20), "u-ra's track-event", || async {
        let calls = calls_of(&sim, "u-ra");
        if calls
            .iter()
            .any(|c| c.path == "/v1/track-event" && succeeded(c))
        {
            Ok(calls)
        } else {
            Err(describe(&calls))
        }
    })
    .await;
    let statuses: Vec<Option<u16>> = calls.iter().map(|c| c.status).collect();
    assert_eq!(
        statuses,
        [Some(429), Some(429), Some(200), Some(200)],
        "{}",
        describe(&calls)
    );
    assert_eq!(calls[2].path, "/v1/identify-user");
    assert_eq!(
        calls[3].path, "/v1/track-event",
        "the track waited its turn"
    );
    let mut gaps = Vec::new();
    for pair in calls.windows(2).filter(|p| p[0].status == Some(429)) {
        let answered = pair[0].answered_ms.expect("the 429 was answered");
        let gap = pair[1].at_ms as i64 - answered as i64;
        gaps.push(gap);
        // Both times are whole ms on the simulator's clock: allow for rounding only.
        assert!(
            gap + 2 >= RETRY_AFTER_MS as i64,
            "a call came {gap} ms after a 429 with Retry-After {RETRY_AFTER_MS} ms: {}",
            describe(&calls)
        );
    }
    eprintln!("retry-after: gaps after each 429: {gaps:?} ms");
    app.stop().await;
    sim.stop().await;
}

/// A 429's Retry-After pauses the whole API key: calls of other users that were already
/// waiting for a concurrency slot wait for it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_pauses_the_whole_api_key() {
    const RETRY_AFTER_MS: u64 = 2000;
    let faults = Faults {
        count_429: 1,
        retry_after_secs: RETRY_AFTER_MS / 1000,
        ..Faults::none()
    };
    let sim = start_sim(&[DEFAULT_KEY, HOOKED_KEY], faults).await;
    // One call at a time: the other users' calls queue for the slot while the first is out.
    let app = spawn_delivering(&sim, |settings| {
        settings.delivery.max_concurrency = 1;
        settings.delivery.initial_concurrency = 1;
    })
    .await;
    let users = ["u-key-a", "u-key-b", "u-key-c", "u-key-d"];
    let events: Vec<Value> = users
        .iter()
        .map(|u| json!({"type": "track", "userId": u, "event": "Queued", "messageId": u}))
        .collect();
    send_batch(&app, &events).await;
    wait_drained(&app, Duration::from_secs(20)).await;
    let calls = sim.state().calls();
    let limited: Vec<&CallRecord> = calls.iter().filter(|c| c.status == Some(429)).collect();
    assert_eq!(limited.len(), 1, "{}", describe(&calls));
    let answered = limited[0].answered_ms.expect("answered");
    for call in calls.iter().filter(|c| c.seq > limited[0].seq) {
        let gap = call.at_ms as i64 - answered as i64;
        assert!(
            gap + 2 >= RETRY_AFTER_MS as i64,
            "a call with the paused key came {gap} ms after the 429: {}",
            describe(&calls)
        );
    }
    for user in users {
        assert!(
            calls_of(&sim, user).iter().any(succeeded),
            "{user} not delivered: {}",
            describe(&calls)
        );
    }
    app.stop().await;
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------
// 4. A refusal dead-letters that event only

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_dead_letters_that_event_only() {
    let sim = start_sim(&[DEFAULT_KEY, HOOKED_KEY], Faults::none()).await;
    // Strings up to 300 characters leave the gateway; Refiner refuses traits over 255 with
    // a 400 naming the key (the simulator's default), a real refusal.
    let app = spawn_delivering(&sim, |settings| settings.mapping.max_string_len = 300).await;
    send_batch(
        &app,
        &[
            json!({"type": "identify", "userId": "u-400", "messageId": "bad-1",
                   "traits": {"bio": "b".repeat(280)}}),
            json!({"type": "track", "userId": "u-400", "event": "After Refusal",
                   "messageId": "bad-2"}),
        ],
    )
    .await;
    let calls = wait_for_call(&sim, "u-400", "/v1/track-event").await;
    wait_drained(&app, Duration::from_secs(10)).await;
    let identify: Vec<&CallRecord> = calls
        .iter()
        .filter(|c| c.path == "/v1/identify-user")
        .collect();
    assert_eq!(
        identify.len(),
        1,
        "a 400 is not retried: {}",
        describe(&calls)
    );
    assert_eq!(identify[0].status, Some(400));
    assert!(
        identify[0].seq
            < calls
                .iter()
                .find(|c| c.path == "/v1/track-event")
                .expect("track")
                .seq
    );

    // The user's next event is not held back either.
    send_batch(
        &app,
        &[
            json!({"type": "identify", "userId": "u-400", "messageId": "bad-3",
                 "traits": {"bio": "short"}}),
        ],
    )
    .await;
    let calls = wait_for(Duration::from_secs(10), "u-400's next identify", || async {
        let calls = calls_of(&sim, "u-400");
        if calls
            .iter()
            .any(|c| c.path == "/v1/identify-user" && c.status == Some(200))
        {
            Ok(calls)
        } else {
            Err(describe(&calls))
        }
    })
    .await;
    assert_eq!(calls.len(), 3, "{}", describe(&calls));
    assert_eq!(
        sim.state()
            .contact("u-400")
            .expect("contact")
            .attributes
            .get("bio"),
        Some(&json!("short"))
    );
    wait_drained(&app, Duration::from_secs(10)).await;
    let stats = app.spool.stats().await.expect("stats");
    assert_eq!(stats.dead_letters, 1, "{stats:?}");
    let text = metrics_text(&app.address).await;
    let outcome = |outcome: &str| {
        metric_in(
            &text,
            "gateway_dispatch_events_total",
            &[("source", "default"), ("outcome", outcome)],
        )
    };
    assert_eq!(outcome("dead_lettered"), 1.0, "{text}");
    assert_eq!(outcome("forwarded"), 2.0, "{text}");
    assert_eq!(outcome("retried"), 0.0, "{text}");
    app.stop().await;
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------
// 5. Outage, circuit breaker, drain

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_opens_the_breaker_and_the_backlog_drains() {
    const USERS: usize = 20;
    let sim = start_sim(&[DEFAULT_KEY, HOOKED_KEY], Faults::none()).await;
    let app = spawn_delivering(&sim, |_| {}).await;
    let breaker_failures = app.settings.delivery.breaker_failures as u64;
    let max_concurrency = app.settings.delivery.max_concurrency as u64;
    let track = |user: usize, n: usize| {
        json!({"type": "track", "userId": format!("out-{user}"), "event": format!("out {n}"),
               "messageId": format!("out-{user}-{n}")})
    };

    // Before: delivery works.
    let warm: Vec<Value> = (0..USERS).map(|u| track(u, 0)).collect();
    send_batch(&app, &warm).await;
    wait_drained(&app, Duration::from_secs(10)).await;

    // The outage: every call answers 503 for ~3 s, while events keep coming.
    let outage_from = sim.state().call_stats().total;
    sim.state()
        .set_faults(Faults {
            rate_503: 1.0,
            ..Faults::none()
        })
        .expect("faults");
    let outage_started = Instant::now();
    let mut sent = USERS;
    let mut circuit_seen_open = false;
    let mut n = 1;
    while outage_started.elapsed() < Duration::from_secs(3) {
        let events: Vec<Value> = (0..USERS).map(|u| track(u, n)).collect();
        send_batch(&app, &events).await;
        sent += events.len();
        n += 1;
        let open = metric(&app, "gateway_dispatch_circuit_open", &[]).await;
        circuit_seen_open |= open == 1.0;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sim.state().set_faults(Faults::none()).expect("faults");
    let recovered = Instant::now();
    let outage_calls: Vec<CallRecord> = sim
        .state()
        .calls()
        .into_iter()
        .filter(|c| c.seq >= outage_from)
        .collect();
    let failed_during_outage = outage_calls
        .iter()
        .filter(|c| c.status == Some(503))
        .count() as u64;
    let outage_events = (sent - USERS) as u64;

    wait_drained(&app, Duration::from_secs(30)).await;
    let drain_time = recovered.elapsed();

    let calls = sim.state().calls();
    let delivered: HashSet<(String, String)> = calls
        .iter()
        .filter(|c| c.path == "/v1/track-event" && succeeded(c))
        .map(|c| {
            (
                c.user.clone().unwrap_or_default(),
                c.params["event"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    let mut missing = Vec::new();
    for i in 0..n {
        for user in 0..USERS {
            let key = (format!("out-{user}"), format!("out {i}"));
            if !delivered.contains(&key) {
                missing.push(key);
            }
        }
    }
    let failed_total = calls.iter().filter(|c| c.status == Some(503)).count();
    let stats = app.spool.stats().await.expect("stats");
    eprintln!(
        "outage: {outage_events} events during a 3 s outage; {failed_during_outage} calls failed \
         during it ({failed_total} in all); breaker seen open: {circuit_seen_open}; backlog \
         drained {drain_time:?} after recovery"
    );
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    assert_eq!(stats.dead_letters, 0, "{stats:?}");
    assert!(
        circuit_seen_open,
        "gateway_dispatch_circuit_open never read 1 during the outage"
    );
    // Without a breaker every queued event would be tried again every ≤1 s; with it, the
    // failures stop at the threshold plus the calls already in flight and a few probes.
    let bound = breaker_failures + max_concurrency + 10;
    assert!(
        failed_during_outage <= bound && failed_during_outage < outage_events / 2,
        "{failed_during_outage} failed calls for {outage_events} events (bound {bound})"
    );
    let text = metrics_text(&app.address).await;
    assert_eq!(metric_in(&text, "gateway_dispatch_circuit_open", &[]), 0.0);
    app.stop().await;
    sim.stop().await;
}

/// While the breaker is open, the probe may lease an event that makes no call (an alias, a
/// throttled ping): it must give its turn back, or delivery never resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_that_makes_no_call_does_not_stall_delivery() {
    let faults = Faults {
        count_503: 1,
        retry_after_on_503: true,
        retry_after_secs: 3,
        ..Faults::none()
    };
    let sim = start_sim(&[DEFAULT_KEY, HOOKED_KEY], faults).await;
    let app = spawn_delivering(&sim, |settings| settings.delivery.breaker_failures = 1).await;
    send_batch(
        &app,
        &[json!({"type": "track", "userId": "u-probe", "event": "First", "messageId": "probe-1"})],
    )
    .await;
    // One 503 opens the breaker for 1 s; the track waits 3 s (Retry-After).
    wait_for(Duration::from_secs(10), "the breaker opens", || async {
        let open = metric(&app, "gateway_dispatch_circuit_open", &[]).await;
        if open == 1.0 {
            Ok(())
        } else {
            Err(describe(&calls_of(&sim, "u-probe")))
        }
    })
    .await;
    // The first event deliverable when the cooldown ends makes no call.
    send_batch(
        &app,
        &[
            json!({"type": "alias", "userId": "u-probe-alias", "previousId": "anon-probe",
                 "messageId": "probe-alias"}),
        ],
    )
    .await;
    let calls = wait_for_call(&sim, "u-probe", "/v1/track-event").await;
    let statuses: Vec<Option<u16>> = calls.iter().map(|c| c.status).collect();
    assert_eq!(statuses, [Some(503), Some(200)], "{}", describe(&calls));
    wait_drained(&app, Duration::from_secs(10)).await;
    let text = metrics_text(&app.address).await;
    assert_eq!(
        metric_in(
            &text,
            "gateway_dispatch_skipped_total",
            &[("source", "default"), ("reason", "alias")]
        ),
        1.0
    );
    assert_eq!(metric_in(&text, "gateway_dispatch_circuit_open", &[]), 0.0);
    app.stop().await;
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------
// 6. SIGKILL of the real binary during delivery

/// The gateway binary with only the environment given: every inherited `GATEWAY_*` and
/// `REFINER_*` variable is removed.
fn gateway_command(env: &[(&str, &str)], cwd: &Path) -> Command {
    let mut command = Command::new(BINARY);
    command.arg("serve").current_dir(cwd).stdin(Stdio::null());
    for (name, _) in std::env::vars_os()
        .filter_map(|(k, v)| k.into_string().ok().map(|k| (k, v)))
        .filter(|(k, _)| k.starts_with("GATEWAY_") || k.starts_with("REFINER_"))
    {
        command.env_remove(name);
    }
    for (name, _) in refiner_gateway::config::ENV_VARS {
        command.env_remove(name);
    }
    command.env("RUST_LOG", "warn");
    for (name, value) in env {
        command.env(name, value);
    }
    command.kill_on_drop(true);
    command
}

/// A gateway process.
struct Gateway {
    child: Child,
    address: String,
}

impl Gateway {
    /// Starts `serve` on a free port against `refiner_url` and waits for `/healthz`.
    async fn start(data_dir: &Path, logs: &Path, refiner_url: &str) -> Gateway {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        for attempt in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let listen = format!("127.0.0.1:{port}");
            let stderr_path = logs.join(format!("stderr-{port}-{attempt}.log"));
            let mut command = gateway_command(
                &[
                    ("GATEWAY_WRITE_KEYS", WRITE_KEY),
                    ("REFINER_API_KEY", DEFAULT_KEY),
                    ("REFINER_BASE_URL", refiner_url),
                    ("GATEWAY_DATA_DIR", data_dir.to_str().expect("utf-8 path")),
                    ("GATEWAY_LISTEN", &listen),
                ],
                logs,
            );
            command
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&stderr_path).expect("stderr log"));
            let mut child = command.spawn().expect("spawn the gateway binary");
            let address = format!("http://{listen}");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = child.try_wait().expect("try_wait") {
                    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    if stderr.contains("cannot listen") {
                        break;
                    }
                    panic!("the gateway exited during start-up ({status}): {stderr}");
                }
                if let Ok(response) = client.get(format!("{address}/healthz")).send().await {
                    if response.status() == 200 {
                        return Gateway { child, address };
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "the gateway did not answer /healthz within 30 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("no free port for the gateway in 5 attempts");
    }

    async fn terminate(mut self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let exit = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the gateway did not stop within 30 s of SIGTERM")
            .expect("wait");
        assert!(
            exit.success(),
            "the gateway exited with {exit} after SIGTERM"
        );
    }
}

/// Per event name (`crash-U-N`), how many successful track-event calls it got.
fn delivered_tracks(sim: &SimHandle) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for call in sim.state().calls() {
        if call.path == "/v1/track-event" && succeeded(&call) {
            if let Some(event) = call.params["event"].as_str() {
                *seen.entry(event.to_string()).or_default() += 1;
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkill_during_delivery_loses_nothing() {
    const USERS: usize = 5;
    const EVENTS: usize = 200;
    let faults = Faults {
        latency_ms: 20,
        ..Faults::none()
    };
    let sim = start_sim(&[DEFAULT_KEY], faults).await;
    let data_dir = tempfile::tempdir().expect("data dir");
    let logs = tempfile::tempdir().expect("log dir");
    let mut gateway = Gateway::start(data_dir.path(), logs.path(), &sim.url()).await;

    let client = reqwest::Client::new();
    let mut senders = Vec::new();
    for user in 0..USERS {
        let (client, url) = (client.clone(), format!("{}/v1/batch", gateway.address));
        senders.push(tokio::spawn(async move {
            for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(50) {
                let batch: Vec<Value> = chunk
                    .iter()
                    .map(|n| {
                        json!({"type": "track", "userId": format!("crash-{user}"),
                               "event": format!("crash-{user}-{n}"),
                               "messageId": format!("crash-{user}-{n}")})
                    })
                    .collect();
                let response = client
                    .post(&url)
                    .header("Authorization", basic(WRITE_KEY))
                    .json(&json!({ "batch": batch }))
                    .send()
                    .await
                    .expect("POST /v1/batch");
                assert_eq!(response.status(), 200);
            }
        }));
    }
    for sender in senders {
        sender.await.expect("sender");
    }
    let expected: HashSet<String> = (0..USERS)
        .flat_map(|u| (0..EVENTS).map(move |n| format!("crash-{u}-{n}")))
        .collect();

    // Kill it with about a quarter delivered.
    wait_for(Duration::from_secs(30), "a quarter delivered", || async {
        let delivered = delivered_tracks(&sim).len();
        if delivered >= expected.len() / 4 {
            Ok(())
        } else {
            Err(format!("{delivered} delivered"))
        }
    })
    .await;
    gateway.child.start_kill().expect("SIGKILL");
    let status = gateway.child.wait().await.expect("wait");
    assert!(!status.success(), "killed, not stopped");
    let at_kill = delivered_tracks(&sim);
    let delivered_at_kill = at_kill.len();
    assert!(
        delivered_at_kill < expected.len(),
        "everything was delivered before the kill"
    );

    let restarted = Instant::now();
    let gateway = Gateway::start(data_dir.path(), logs.path(), &sim.url()).await;
    let seen = wait_for(Duration::from_secs(45), "every event delivered", || async {
        let seen = delivered_tracks(&sim);
        let missing = expected.iter().filter(|e| !seen.contains_key(*e)).count();
        if missing == 0 {
            Ok(seen)
        } else {
            Err(format!("{missing} of {} missing", expected.len()))
        }
    })
    .await;
    let drain_time = restarted.elapsed();
    gateway.terminate().await;

    // Nothing is left queued in the spool file.
    let connection = rusqlite::Connection::open_with_flags(
        data_dir.path().join("spool.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open spool.db");
    let (queued, dead): (i64, i64) = connection
        .query_row(
            "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM dead_letters)",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .expect("count");

    // Per user, the first success of each event is in the order sent.
    let mut disorder = Vec::new();
    for user in 0..USERS {
        let mut first_seen: HashMap<usize, u64> = HashMap::new();
        for call in calls_of(&sim, &format!("crash-{user}")) {
            if !succeeded(&call) {
                continue;
            }
            if let Some(n) = call.params["event"]
                .as_str()
                .and_then(|e| e.rsplit_once('-'))
                .and_then(|(_, n)| n.parse().ok())
            {
                first_seen.entry(n).or_insert(call.seq);
            }
        }
        let order: Vec<u64> = (0..EVENTS)
            .filter_map(|n| first_seen.get(&n).copied())
            .collect();
        // Tracks only: each may be overtaken by fewer than the default per-user window.
        let window = DeliverySettings::default().per_user_window;
        let overtaken = |i: usize| order[i + 1..].iter().filter(|&&s| s < order[i]).count();
        if (0..order.len()).any(|i| overtaken(i) >= window) {
            disorder.push(user);
        }
    }
    let duplicates: BTreeMap<&String, usize> = seen
        .iter()
        .filter(|(_, count)| **count > 1)
        .map(|(event, count)| (event, *count))
        .collect();
    let extra: usize = duplicates.values().map(|c| c - 1).sum();
    let stats = sim.state().call_stats();
    eprintln!(
        "crash: {delivered_at_kill} of {} delivered at SIGKILL; after restart all delivered in \
         {drain_time:?}; {} calls ({:?}); {} events delivered twice or more ({extra} extra \
         calls): {duplicates:?}",
        expected.len(),
        stats.total,
        stats.by_status,
        duplicates.len(),
    );
    assert_eq!(queued, 0, "events left in the spool");
    assert_eq!(dead, 0, "events dead-lettered");
    assert!(
        disorder.is_empty(),
        "users delivered out of order: {disorder:?}"
    );
    sim.stop().await;
}
