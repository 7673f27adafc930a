//! The management API under `/api`, over real HTTP: auth in Refiner's three ways and the
//! refused ones, the error envelope and request ids, every dead-letter route with each
//! filter, sort and pagination (including past the last page), replay ending in delivery at
//! the Refiner simulator, usage counted against a known stream, the metrics table, retention,
//! and the OpenAPI document checked against the running app.
//!
//! Dead letters are made through the spool handle (lease, then settle as dead) while
//! delivery is off, so their contents and times are known; the replay tests deliver to the
//! simulator for real.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use refiner_gateway::config::{Secret, Settings};
use refiner_gateway::sim::{Faults, SimHandle};
use refiner_gateway::spool::admin::DeadLetterFilter;
use refiner_gateway::spool::{
    DeadLetterRequest, DeadLetters, RetryAt, Settlement, Spool, SqliteSpool, SqliteSpoolOptions,
};
use refiner_gateway::telemetry::Metrics;
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::wait_for;
use crate::delivery;
use crate::helpers::{basic, send_batch, spawn_app_with, TestApp, OTHER_KEY, WRITE_KEY};

const ADMIN: &str = "test-admin-token";
const REFINER_KEY: &str = "refiner-key";

// ---------------------------------------------------------------------------------------
// Helpers

async fn spawn_admin(customize: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_with(|settings| {
        settings.admin_token = Some(Secret::new(ADMIN));
        customize(settings);
    })
    .await
}

/// How a request presents (or does not present) a token.
#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    Bearer(&'a str),
    Basic(&'a str),
    Query(&'a str),
}

struct Answer {
    status: u16,
    request_id: Option<String>,
    body: Value,
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.body)
    }
}

async fn call(
    app: &TestApp,
    method: Method,
    path_or_url: &str,
    auth: Auth<'_>,
    body: Option<Value>,
) -> Answer {
    let mut url = if path_or_url.starts_with("http") {
        path_or_url.to_string()
    } else {
        app.url(path_or_url)
    };
    let mut request = app.client.request(method, "http://placeholder");
    match auth {
        Auth::None => {}
        Auth::Bearer(token) => request = request.bearer_auth(token),
        Auth::Basic(token) => request = request.header("Authorization", basic(token)),
        Auth::Query(token) => {
            url.push(if url.contains('?') { '&' } else { '?' });
            url.push_str(&format!("api_key={token}"));
        }
    }
    let mut request = request.build().expect("request");
    *request.url_mut() = reqwest::Url::parse(&url).expect("url");
    let mut builder = reqwest::RequestBuilder::from_parts(app.client.clone(), request);
    if let Some(body) = body {
        builder = builder.json(&body);
    }
    let response = builder.send().await.expect("management request");
    let status = response.status().as_u16();
    let request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let text = response.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| json!(text))
    };
    Answer {
        status,
        request_id,
        body,
    }
}

async fn get(app: &TestApp, path: &str) -> Answer {
    call(app, Method::GET, path, Auth::Bearer(ADMIN), None).await
}

async fn get_ok(app: &TestApp, path: &str) -> Value {
    let answer = get(app, path).await;
    assert_eq!(answer.status, 200, "GET {path}: {answer:?}");
    answer.body
}

/// Checks an error answer: status, envelope, reason, and the parameter it names.
fn assert_error(answer: &Answer, status: u16, reason: &str, parameter: Option<&str>) {
    assert_eq!(answer.status, status, "{answer:?}");
    let error = &answer.body["error"];
    assert_eq!(error["code"], json!(status), "{answer:?}");
    assert_eq!(error["reason"], json!(reason), "{answer:?}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{answer:?}"
    );
    let request_id = answer.request_id.as_deref().expect("X-Request-Id");
    assert_eq!(error["requestId"], json!(request_id), "{answer:?}");
    if let Some(parameter) = parameter {
        assert_eq!(error["parameter"], json!(parameter), "{answer:?}");
    }
}

/// Sends `events`, then moves them all to the dead letters: `retries` failed attempts with
/// 503 first, then a final refusal with `status` and `error`.
async fn bury(app: &TestApp, events: &[Value], retries: usize, status: u16, error: &str) {
    send_batch(app, events).await;
    bury_queued(&app.spool, events.len(), retries, status, error).await;
}

async fn bury_queued(
    spool: &Arc<dyn Spool>,
    expected: usize,
    retries: usize,
    status: u16,
    error: &str,
) {
    for _ in 0..retries {
        let leased = spool.lease(10_000, 60_000).await.expect("lease");
        assert_eq!(leased.len(), expected);
        let now = chrono::Utc::now().timestamp_millis();
        spool
            .settle(Settlement {
                retried: leased
                    .iter()
                    .map(|e| RetryAt {
                        seq: e.seq,
                        next_attempt_at_ms: now,
                        status: Some(503),
                        error: "HTTP 503: {\"error\":\"busy\"}".into(),
                    })
                    .collect(),
                ..Settlement::default()
            })
            .await
            .expect("settle retried");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let leased = spool.lease(10_000, 60_000).await.expect("lease");
    assert_eq!(leased.len(), expected);
    spool
        .settle(Settlement {
            dead: leased
                .iter()
                .map(|e| DeadLetterRequest {
                    seq: e.seq,
                    status: Some(status),
                    error: error.into(),
                    attempted: true,
                })
                .collect(),
            ..Settlement::default()
        })
        .await
        .expect("settle dead");
}

const LIST: &str = "/api/events/default/dead-letters";

/// Every row of a listing (one big page).
async fn all_rows(app: &TestApp, query: &str) -> Vec<Value> {
    let separator = if query.is_empty() { "" } else { "&" };
    let body = get_ok(app, &format!("{LIST}?page_size=1000{separator}{query}")).await;
    body["results"].as_array().expect("results").clone()
}

fn ids(rows: &[Value]) -> Vec<i64> {
    rows.iter().map(|r| r["id"].as_i64().expect("id")).collect()
}

/// Six dead letters in two groups dead-lettered at different times; returns the two
/// groups' `created_at`.
async fn six_dead_letters(app: &TestApp) -> (String, String) {
    bury(
        app,
        &[
            json!({"type": "track", "userId": "u1", "event": "Signed Up", "messageId": "m-a1"}),
            json!({"type": "track", "userId": "u2", "event": "Order Completed", "messageId": "m-a2"}),
            json!({"type": "identify", "userId": "u3", "messageId": "m-a3"}),
        ],
        0,
        400,
        "{\"error\":\"trait bio is too long\"}",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    bury(
        app,
        &[
            json!({"type": "page", "userId": "u1", "name": "Pricing", "messageId": "m-b1"}),
            json!({"type": "identify", "traits": {"email": "x@y.io"}, "anonymousId": "an-1",
                   "messageId": "m-b2"}),
            json!({"type": "track", "userId": "u4", "event": "Order Completed", "messageId": "m-b3"}),
        ],
        2,
        401,
        "{\"error\":\"invalid api key 100%\"}",
    )
    .await;
    let rows = all_rows(app, "o=created_at").await;
    assert_eq!(rows.len(), 6);
    let first = rows[0]["created_at"]
        .as_str()
        .expect("created_at")
        .to_string();
    let second = rows[5]["created_at"]
        .as_str()
        .expect("created_at")
        .to_string();
    assert!(first < second, "{first} {second}");
    (first, second)
}

// ---------------------------------------------------------------------------------------
// Auth, envelope, request ids

#[tokio::test]
async fn the_admin_token_works_in_refiners_three_ways() {
    let app = spawn_admin(|_| {}).await;
    for auth in [Auth::Bearer(ADMIN), Auth::Basic(ADMIN), Auth::Query(ADMIN)] {
        let answer = call(&app, Method::GET, "/api", auth, None).await;
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.body["version"], json!(env!("CARGO_PKG_VERSION")));
        assert!(answer.request_id.is_some());
    }
    // HTTP Basic with `token:` as curl -u sends it, and with a password (ignored).
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("{ADMIN}:whatever"));
    let response = app
        .client
        .get(app.url("/api"))
        .header("Authorization", format!("Basic {encoded}"))
        .send()
        .await
        .expect("GET /api");
    assert_eq!(response.status(), 200);
    // `api_key` in a JSON body, and in a form body, for routes that take one.
    let answer = call(
        &app,
        Method::POST,
        "/api/events/default/dead-letters/replay",
        Auth::None,
        Some(json!({"api_key": ADMIN})),
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body, json!({"replayed": 0, "remaining": 0}));
    let response = app
        .client
        .delete(app.url(LIST))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("api_key={ADMIN}&q=nothing"))
        .send()
        .await
        .expect("DELETE");
    assert_eq!(response.status(), 200);
    app.stop().await;
}

#[tokio::test]
async fn refused_ways_answer_401_in_the_error_envelope() {
    let app = spawn_admin(|_| {}).await;
    let routes = [
        (Method::GET, "/api".to_string()),
        (Method::GET, LIST.to_string()),
        (Method::GET, format!("{LIST}/1")),
        (Method::DELETE, format!("{LIST}/1")),
        (Method::DELETE, LIST.to_string()),
        (Method::POST, format!("{LIST}/replay")),
        (Method::GET, "/api/profile/default".to_string()),
        (Method::GET, "/api/metrics/default/events".to_string()),
        (Method::GET, "/api/no-such-route".to_string()),
        (Method::GET, "/api/profile/unknown-source".to_string()),
    ];
    for (method, path) in &routes {
        let answer = call(&app, method.clone(), path, Auth::None, None).await;
        assert_error(&answer, 401, "missing_token", None);
        for auth in [
            Auth::Bearer("wrong-token"),
            Auth::Basic("wrong-token"),
            Auth::Query("wrong-token"),
            // A write key is not an admin token, whichever way it comes.
            Auth::Bearer(WRITE_KEY),
            Auth::Basic(WRITE_KEY),
            Auth::Query(WRITE_KEY),
            Auth::Basic(OTHER_KEY),
        ] {
            let answer = call(&app, method.clone(), path, auth, None).await;
            assert_error(&answer, 401, "invalid_token", None);
        }
    }
    // A right token does not excuse a wrong one elsewhere in the same request.
    let answer = call(
        &app,
        Method::GET,
        "/api?api_key=wrong-token",
        Auth::Bearer(ADMIN),
        None,
    )
    .await;
    assert_error(&answer, 401, "invalid_token", None);
    let answer = call(
        &app,
        Method::POST,
        &format!("{LIST}/replay"),
        Auth::Bearer(ADMIN),
        Some(json!({"api_key": WRITE_KEY})),
    )
    .await;
    assert_error(&answer, 401, "invalid_token", None);
    // Another scheme carries no token.
    let response = app
        .client
        .get(app.url("/api"))
        .header("Authorization", format!("Token {ADMIN}"))
        .send()
        .await
        .expect("GET /api");
    assert_eq!(response.status(), 401);
    assert!(response.headers().contains_key("www-authenticate"));
    app.stop().await;
}

#[tokio::test]
async fn without_an_admin_token_the_api_answers_403_to_everything() {
    let app = spawn_app_with(|settings| settings.admin_token = None).await;
    for path in ["/api", LIST, "/api/profile/default", "/api/nothing"] {
        for auth in [Auth::None, Auth::Bearer(ADMIN), Auth::Bearer(WRITE_KEY)] {
            let answer = call(&app, Method::GET, path, auth, None).await;
            assert_error(&answer, 403, "api_disabled", None);
        }
    }
    let answer = call(
        &app,
        Method::POST,
        &format!("{LIST}/replay"),
        Auth::None,
        None,
    )
    .await;
    assert_error(&answer, 403, "api_disabled", None);
    app.stop().await;
}

#[tokio::test]
async fn every_answer_carries_the_request_id() {
    let app = spawn_admin(|_| {}).await;
    let response = app
        .client
        .get(app.url("/api/profile/nope"))
        .bearer_auth(ADMIN)
        .header("X-Request-Id", "my-request-42")
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), 404);
    assert_eq!(response.headers()["x-request-id"], "my-request-42");
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["error"]["requestId"], json!("my-request-42"));
    assert_eq!(body["error"]["reason"], json!("unknown_source"));
    for path in [
        "/api",
        LIST,
        "/api/profile/default",
        "/api/metrics/default/events",
    ] {
        let answer = get(&app, path).await;
        assert_eq!(answer.status, 200, "{path}: {answer:?}");
        assert!(answer.request_id.is_some(), "{path}");
    }
    let answer = get(&app, "/api/nothing/here").await;
    assert_error(&answer, 404, "not_found", None);
    let answer = call(&app, Method::PUT, LIST, Auth::Bearer(ADMIN), None).await;
    assert_error(&answer, 405, "method_not_allowed", None);
    let answer = get(&app, &format!("{LIST}/replay")).await;
    assert_error(&answer, 405, "method_not_allowed", None);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Listing: fields, filters, sort, pagination, bad parameters

#[tokio::test]
async fn the_listing_shows_each_dead_letter_with_its_fields() {
    let app = spawn_admin(|_| {}).await;
    six_dead_letters(&app).await;
    let body = get_ok(&app, LIST).await;
    assert_eq!(body["count"], json!(6));
    assert_eq!(body["next"], Value::Null);
    assert_eq!(body["previous"], Value::Null);
    let rows = body["results"].as_array().expect("results");
    // Newest first by default.
    let message_ids: Vec<&str> = rows
        .iter()
        .map(|r| r["messageId"].as_str().expect("id"))
        .collect();
    assert_eq!(
        message_ids,
        ["m-b3", "m-b2", "m-b1", "m-a3", "m-a2", "m-a1"]
    );
    let b3 = &rows[0];
    assert_eq!(b3["type"], json!("track"));
    assert_eq!(b3["userId"], json!("u4"));
    assert_eq!(b3["event"], json!("Order Completed"));
    assert_eq!(b3["attempts"], json!(3));
    assert_eq!(b3["last_status"], json!(401));
    assert_eq!(
        b3["last_error"],
        json!("{\"error\":\"invalid api key 100%\"}")
    );
    assert_eq!(
        b3["printable_name"],
        json!("track \"Order Completed\" of user u4")
    );
    for field in ["created_at", "received_at"] {
        let text = b3[field].as_str().expect(field);
        assert!(chrono::DateTime::parse_from_rfc3339(text).is_ok(), "{text}");
    }
    let b2 = &rows[1];
    assert_eq!(b2["userId"], Value::Null);
    assert_eq!(b2["event"], Value::Null);
    assert_eq!(b2["printable_name"], json!("identify of email x@y.io"));
    let b1 = &rows[2];
    assert_eq!(b1["event"], json!("Pricing"));
    let a1 = &rows[5];
    assert_eq!(a1["attempts"], json!(1));
    assert_eq!(a1["last_status"], json!(400));
    // The other source has none; an unknown source is a 404.
    let other = get_ok(&app, "/api/events/hooked/dead-letters").await;
    assert_eq!(other["count"], json!(0));
    assert_error(
        &get(&app, "/api/events/nope/dead-letters").await,
        404,
        "unknown_source",
        None,
    );
    app.stop().await;
}

#[tokio::test]
async fn each_filter_narrows_the_listing() {
    let app = spawn_admin(|_| {}).await;
    let (first, second) = six_dead_letters(&app).await;
    let count = |query: String| {
        let app = &app;
        async move {
            let body = get_ok(app, &format!("{LIST}?{query}")).await;
            body["count"].as_u64().expect("count")
        }
    };
    let encode = |text: &str| text.replace('+', "%2B").replace(':', "%3A");
    // start_at is inclusive, ends_at exclusive, both on the dead-letter time.
    assert_eq!(count(format!("start_at={}", encode(&second))).await, 3);
    assert_eq!(count(format!("ends_at={}", encode(&second))).await, 3);
    assert_eq!(
        count(format!(
            "start_at={}&ends_at={}",
            encode(&first),
            encode(&second)
        ))
        .await,
        3
    );
    assert_eq!(count("start_at=2000-01-01".into()).await, 6);
    assert_eq!(count("ends_at=2000-01-01T00:00:00Z".into()).await, 0);
    // An offset in another zone: the same instant.
    let t = chrono::DateTime::parse_from_rfc3339(&second).expect("time");
    let shifted = t
        .with_timezone(&chrono::FixedOffset::east_opt(2 * 3600).expect("offset"))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, false);
    assert_eq!(count(format!("start_at={}", encode(&shifted))).await, 3);
    // q searches every field by default, case-insensitively, as a literal substring.
    assert_eq!(count("q=order".into()).await, 2);
    assert_eq!(count("q=ORDER%20completed".into()).await, 2);
    assert_eq!(count("q=x%40y.io".into()).await, 1);
    assert_eq!(count("q=100%25".into()).await, 3);
    assert_eq!(count("q=%25%25".into()).await, 0);
    assert_eq!(count("q=_".into()).await, 0);
    // q_f restricts the fields.
    assert_eq!(count("q=m-a&q_f=messageId".into()).await, 3);
    assert_eq!(count("q=m-a&q_f=event".into()).await, 0);
    assert_eq!(count("q=u1&q_f=user".into()).await, 2);
    assert_eq!(count("q=identify&q_f=type".into()).await, 2);
    assert_eq!(count("q=invalid&q_f=last_error".into()).await, 3);
    assert_eq!(count("q=invalid&q_f=event,messageId".into()).await, 0);
    assert_eq!(count("q=invalid&q_f=event&q_f=last_error".into()).await, 3);
    // status selects by Refiner's last answer, not by the text of the error; the retries'
    // 503s before the 401s are not the last answer.
    assert_eq!(count("status=400".into()).await, 3);
    assert_eq!(count("status=401".into()).await, 3);
    assert_eq!(count("status=503".into()).await, 0);
    assert_eq!(count("status=401&q=order".into()).await, 1);
    // Filters combine.
    assert_eq!(
        count(format!("q=order&start_at={}", encode(&second))).await,
        1
    );
    app.stop().await;
}

/// The value a row sorts by, as the listing compares it.
fn sort_key(row: &Value, field: &str) -> (Value, i64) {
    let value = match &row[field] {
        Value::Null => json!(""),
        other => other.clone(),
    };
    (value, row["id"].as_i64().expect("id"))
}

fn compare(a: &(Value, i64), b: &(Value, i64)) -> std::cmp::Ordering {
    let first = match (&a.0, &b.0) {
        (Value::Number(x), Value::Number(y)) => {
            x.as_i64().expect("int").cmp(&y.as_i64().expect("int"))
        }
        (Value::String(x), Value::String(y)) => x.cmp(y),
        _ => panic!("mixed sort values {a:?} {b:?}"),
    };
    first.then(a.1.cmp(&b.1))
}

#[tokio::test]
async fn every_sort_field_orders_both_ways() {
    let app = spawn_admin(|_| {}).await;
    six_dead_letters(&app).await;
    let unsorted = all_rows(&app, "o=id").await;
    for field in [
        "id",
        "created_at",
        "received_at",
        "attempts",
        "type",
        "event",
        "userId",
        "messageId",
    ] {
        let mut expected = unsorted.clone();
        expected.sort_by(|a, b| compare(&sort_key(a, field), &sort_key(b, field)));
        let ascending = all_rows(&app, &format!("o={field}")).await;
        assert_eq!(ids(&ascending), ids(&expected), "o={field}");
        let ascending = all_rows(&app, &format!("o=%2B{field}")).await;
        assert_eq!(ids(&ascending), ids(&expected), "o=+{field}");
        expected.reverse();
        let descending = all_rows(&app, &format!("o=-{field}")).await;
        assert_eq!(ids(&descending), ids(&expected), "o=-{field}");
    }
    app.stop().await;
}

/// Follows `next` links from `first`, returning every page's rows.
async fn walk_next(app: &TestApp, first: &str) -> Vec<Vec<Value>> {
    let mut pages = Vec::new();
    let mut url = Some(first.to_string());
    while let Some(current) = url {
        let body = get_ok(app, &current).await;
        pages.push(body["results"].as_array().expect("results").clone());
        url = body["next"].as_str().map(str::to_string);
        assert!(pages.len() < 100, "too many pages");
    }
    pages
}

#[tokio::test]
async fn links_never_carry_the_admin_token() {
    let app = spawn_admin(|_| {}).await;
    six_dead_letters(&app).await;
    // Page 2 of 3, asked for with the token as `api_key`: both links exist.
    let answer = call(
        &app,
        Method::GET,
        &format!("{LIST}?page_size=2&o=id&page=2"),
        Auth::Query(ADMIN),
        None,
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    for link in ["next", "previous"] {
        let url = answer.body[link].as_str().expect(link);
        assert!(!url.contains(ADMIN), "{link}: {url}");
        let url = reqwest::Url::parse(url).expect("absolute URL");
        let names: Vec<String> = url
            .query_pairs()
            .map(|(name, _)| name.into_owned())
            .collect();
        assert!(!names.contains(&"api_key".to_string()), "{link}: {url}");
        // The other parameters stay.
        assert!(
            url.query_pairs().any(|(n, v)| n == "page_size" && v == "2"),
            "{url}"
        );
        assert!(
            url.query_pairs().any(|(n, v)| n == "o" && v == "id"),
            "{url}"
        );
        // The link needs the token again, presented as the caller chooses.
        assert_eq!(
            call(&app, Method::GET, url.as_str(), Auth::None, None)
                .await
                .status,
            401
        );
        let page = call(&app, Method::GET, url.as_str(), Auth::Query(ADMIN), None).await;
        assert_eq!(page.status, 200, "{page:?}");
        assert_eq!(page.body["results"].as_array().map(Vec::len), Some(2));
    }
    app.stop().await;
}

#[tokio::test]
async fn pagination_by_links_by_number_and_past_the_last_page() {
    let app = spawn_admin(|_| {}).await;
    // 30 dead letters of varied users, types and attempts.
    for round in 0..3 {
        let events: Vec<Value> = (0..10)
            .map(|i| {
                let n = round * 10 + i;
                if n % 3 == 0 {
                    json!({"type": "identify", "userId": format!("p{}", n % 7), "messageId": format!("p-{n}")})
                } else {
                    json!({"type": "track", "userId": format!("p{}", n % 7),
                           "event": format!("E{}", n % 4), "messageId": format!("p-{n}")})
                }
            })
            .collect();
        bury(&app, &events, round, 400, "refused").await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for order in [
        "-created_at",
        "id",
        "-attempts",
        "event",
        "-userId",
        "messageId",
    ] {
        let everything = ids(&all_rows(&app, &format!("o={order}")).await);
        assert_eq!(everything.len(), 30);
        // Following `next` (keyset after page 1) yields each row once, in order.
        let pages = walk_next(&app, &format!("{LIST}?o={order}&page_size=4")).await;
        assert_eq!(pages.len(), 8, "o={order}");
        let walked: Vec<i64> = pages.iter().flat_map(|p| ids(p)).collect();
        assert_eq!(walked, everything, "o={order}");
        // A page by number (an offset, from either end) is the same page.
        for page in 1..=8u64 {
            let body = get_ok(&app, &format!("{LIST}?o={order}&page_size=4&page={page}")).await;
            let rows = body["results"].as_array().expect("results");
            assert_eq!(
                ids(rows),
                ids(&pages[page as usize - 1]),
                "o={order} page={page}"
            );
            assert_eq!(body["count"], json!(30));
            assert_eq!(body["next"].is_null(), page == 8, "o={order} page={page}");
            assert_eq!(
                body["previous"].is_null(),
                page == 1,
                "o={order} page={page}"
            );
        }
        // Following `previous` from the last page walks back through the same pages.
        let mut url = get_ok(&app, &format!("{LIST}?o={order}&page_size=4&page=8")).await
            ["previous"]
            .as_str()
            .map(str::to_string);
        let mut page = 7;
        while let Some(current) = url {
            let body = get_ok(&app, &current).await;
            let rows = body["results"].as_array().expect("results");
            assert_eq!(
                ids(rows),
                ids(&pages[page - 1]),
                "o={order} back to page {page}"
            );
            url = body["previous"].as_str().map(str::to_string);
            page -= 1;
        }
        assert_eq!(page, 0, "o={order}: previous links stop at page 1");
    }
    // Past the last page: no rows, no next, previous leads to the last page.
    let body = get_ok(&app, &format!("{LIST}?page_size=4&page=9")).await;
    assert_eq!(body["count"], json!(30));
    assert_eq!(body["results"], json!([]));
    assert_eq!(body["next"], Value::Null);
    let previous = body["previous"].as_str().expect("previous");
    assert!(previous.contains("page=8"), "{previous}");
    let last = get_ok(&app, previous).await;
    assert_eq!(last["results"].as_array().expect("rows").len(), 2);
    let far = get_ok(&app, &format!("{LIST}?page_size=4&page=1000")).await;
    assert_eq!(far["results"], json!([]));
    assert!(far["previous"]
        .as_str()
        .expect("previous")
        .contains("page=8"));
    // Links keep the other parameters (and are absolute URLs of this gateway).
    let body = get_ok(&app, &format!("{LIST}?page_size=4&q=E1&o=id")).await;
    let next = body["next"].as_str().expect("next");
    assert!(next.starts_with(&app.address), "{next}");
    assert!(next.contains("q=E1") && next.contains("o=id") && next.contains("page_size=4"));
    app.stop().await;
}

#[tokio::test]
async fn bad_parameters_are_400_naming_the_parameter() {
    let app = spawn_admin(|_| {}).await;
    six_dead_letters(&app).await;
    let other_order_cursor = {
        let body = get_ok(&app, &format!("{LIST}?page_size=2&o=id")).await;
        let next = body["next"].as_str().expect("next").to_string();
        let url = reqwest::Url::parse(&next).expect("url");
        let cursor = url
            .query_pairs()
            .find(|(k, _)| k == "cursor")
            .map(|(_, v)| v.to_string())
            .expect("cursor");
        cursor
    };
    for (query, parameter) in [
        ("page=0", "page"),
        ("page=abc", "page"),
        ("page=1&page=2", "page"),
        ("page_size=0", "page_size"),
        ("page_size=1001", "page_size"),
        ("o=bogus", "o"),
        ("o=-", "o"),
        ("start_at=yesterday", "start_at"),
        ("ends_at=2026-02-30", "ends_at"),
        ("start_at=2026-05-02&ends_at=2026-05-01", "ends_at"),
        ("q_f=bogus", "q_f"),
        ("q_f=event,nope", "q_f"),
        ("status=99", "status"),
        ("status=600", "status"),
        ("status=4xx", "status"),
        ("unknown=1", "unknown"),
        ("cursor=garbage", "cursor"),
        (&format!("o=-id&cursor={other_order_cursor}"), "cursor"),
        (&format!("q={}", "x".repeat(201)), "q"),
    ] {
        let answer = get(&app, &format!("{LIST}?{query}")).await;
        assert_error(&answer, 400, "invalid_parameter", Some(parameter));
    }
    for (query, parameter) in [
        ("period=week", "period"),
        (
            "start_at=2020-01-01T00:00:00Z&ends_at=2026-01-01T00:00:00Z",
            "start_at",
        ),
        ("start_at=2026-01-02&ends_at=2026-01-01", "ends_at"),
        ("bogus=1", "bogus"),
    ] {
        let answer = get(&app, &format!("/api/metrics/default/events?{query}")).await;
        assert_error(&answer, 400, "invalid_parameter", Some(parameter));
    }
    for (body, parameter) in [
        (json!({"ids": ["x"]}), "ids"),
        (json!({"ids": [0]}), "ids"),
        (json!({"limit": 0}), "limit"),
        (json!({"start_at": "soon"}), "start_at"),
        (json!({"o": "id"}), "o"),
        (json!({"ids": {"a": 1}}), "ids"),
        (json!([1, 2]), "body"),
    ] {
        let answer = call(
            &app,
            Method::POST,
            &format!("{LIST}/replay"),
            Auth::Bearer(ADMIN),
            Some(body.clone()),
        )
        .await;
        assert_error(&answer, 400, "invalid_parameter", Some(parameter));
    }
    // Nothing was replayed by the refused requests.
    assert_eq!(get_ok(&app, LIST).await["count"], json!(6));
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// One dead letter, delete, purge

#[tokio::test]
async fn a_dead_letter_shows_the_whole_event_and_every_attempt() {
    let app = spawn_admin(|_| {}).await;
    six_dead_letters(&app).await;
    let rows = all_rows(&app, "q=m-b3&q_f=messageId").await;
    let id = rows[0]["id"].as_i64().expect("id");
    let body = get_ok(&app, &format!("{LIST}/{id}")).await;
    assert_eq!(body["id"], json!(id));
    assert_eq!(body["source"], json!("default"));
    assert_eq!(body["user_key"], json!("u:u4"));
    assert_eq!(body["messageId"], json!("m-b3"));
    assert_eq!(body["payload"]["event"], json!("Order Completed"));
    assert_eq!(body["payload"]["userId"], json!("u4"));
    assert_eq!(body["payload"]["messageId"], json!("m-b3"));
    let history = body["history"].as_array().expect("history");
    let statuses: Vec<&Value> = history.iter().map(|a| &a["status"]).collect();
    assert_eq!(statuses, [&json!(503), &json!(503), &json!(401)]);
    assert_eq!(history[0]["error"], json!("HTTP 503: {\"error\":\"busy\"}"));
    assert_eq!(
        history[2]["error"],
        json!("{\"error\":\"invalid api key 100%\"}")
    );
    let times: Vec<&str> = history
        .iter()
        .map(|a| a["at"].as_str().expect("at"))
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert_error(
        &get(&app, &format!("{LIST}/999999")).await,
        404,
        "not_found",
        None,
    );
    assert_error(
        &get(&app, &format!("{LIST}/abc")).await,
        404,
        "not_found",
        None,
    );
    assert_error(
        &get(&app, &format!("/api/events/hooked/dead-letters/{id}")).await,
        404,
        "not_found",
        None,
    );
    app.stop().await;
}

#[tokio::test]
async fn an_attempt_keeps_a_bounded_answer_body() {
    let app = spawn_admin(|_| {}).await;
    bury(
        &app,
        &[json!({"type": "track", "userId": "big", "event": "E", "messageId": "big-1"})],
        0,
        400,
        &"é".repeat(5000),
    )
    .await;
    let id = all_rows(&app, "").await[0]["id"].as_i64().expect("id");
    let body = get_ok(&app, &format!("{LIST}/{id}")).await;
    let kept = body["history"][0]["error"].as_str().expect("error");
    assert!(kept.len() <= 4096 && kept.len() >= 4094, "{}", kept.len());
    let listed = all_rows(&app, "").await[0]["last_error"]
        .as_str()
        .expect("error")
        .to_string();
    assert_eq!(
        listed.chars().count(),
        201,
        "200 characters and an ellipsis"
    );
    app.stop().await;
}

#[tokio::test]
async fn delete_one_and_purge_by_filter_or_ids() {
    let app = spawn_admin(|_| {}).await;
    six_dead_letters(&app).await;
    let rows = all_rows(&app, "o=id").await;
    let first = rows[0]["id"].as_i64().expect("id");
    let answer = call(
        &app,
        Method::DELETE,
        &format!("{LIST}/{first}"),
        Auth::Bearer(ADMIN),
        None,
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body, json!({"deleted": 1}));
    let again = call(
        &app,
        Method::DELETE,
        &format!("{LIST}/{first}"),
        Auth::Bearer(ADMIN),
        None,
    )
    .await;
    assert_error(&again, 404, "not_found", None);
    assert_error(
        &get(&app, &format!("{LIST}/{first}")).await,
        404,
        "not_found",
        None,
    );
    // Purge by filter (query string).
    let answer = call(
        &app,
        Method::DELETE,
        &format!("{LIST}?q=order&q_f=event"),
        Auth::Bearer(ADMIN),
        None,
    )
    .await;
    assert_eq!(answer.body, json!({"deleted": 2}), "{answer:?}");
    // Purge by ids (JSON body); unknown ids are ignored.
    let left = ids(&all_rows(&app, "o=id").await);
    assert_eq!(left.len(), 3);
    let answer = call(
        &app,
        Method::DELETE,
        LIST,
        Auth::Bearer(ADMIN),
        Some(json!({"ids": [left[0], left[1], 999_999]})),
    )
    .await;
    assert_eq!(answer.body, json!({"deleted": 2}), "{answer:?}");
    // Purge of everything left.
    let answer = call(&app, Method::DELETE, LIST, Auth::Bearer(ADMIN), None).await;
    assert_eq!(answer.body, json!({"deleted": 1}), "{answer:?}");
    assert_eq!(get_ok(&app, LIST).await["count"], json!(0));
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Replay, delivered at the simulator

async fn start_sim(faults: Faults) -> SimHandle {
    delivery::start_sim(&[REFINER_KEY, "refiner-key-2"], faults).await
}

fn deliver_to(settings: &mut Settings, sim: &SimHandle) {
    delivery::deliver_to(settings, sim);
    let delivery = &mut settings.delivery;
    delivery.retry_base_ms = 20;
    delivery.breaker_failures = 1000;
    // Every transient failure dead-letters at once: the outage below makes dead letters.
    delivery.max_age_secs = 0;
}

/// Successful calls about `user`, as (path, event name) in the order the simulator got them.
fn delivered(sim: &SimHandle, user: &str) -> Vec<(String, Option<String>)> {
    sim.state()
        .calls()
        .into_iter()
        .filter(|c| c.user.as_deref() == Some(user))
        .filter(|c| c.status.is_some_and(|s| (200..300).contains(&s)))
        .map(|c| {
            let event = c
                .params
                .get("event")
                .and_then(Value::as_str)
                .map(str::to_string);
            (c.path, event)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_by_id_and_by_filter_ends_in_delivery_in_order() {
    // An outage: every call answers 503, and with max_age 0 each event is dead-lettered.
    let sim = start_sim(Faults {
        count_503: 1_000_000,
        ..Faults::none()
    })
    .await;
    // Strict per-user order: the replayed tracks reach Refiner one after the other.
    let app = spawn_admin(|settings| {
        deliver_to(settings, &sim);
        settings.delivery.per_user_window = 1;
    })
    .await;
    send_batch(
        &app,
        &[
            json!({"type": "identify", "userId": "r1", "traits": {"plan": "pro"}, "messageId": "r1-1"}),
            json!({"type": "track", "userId": "r1", "event": "First", "messageId": "r1-2"}),
            json!({"type": "track", "userId": "r1", "event": "Second", "messageId": "r1-3"}),
            json!({"type": "track", "userId": "r1", "event": "Third", "messageId": "r1-4"}),
            json!({"type": "track", "userId": "r2", "event": "Alone", "messageId": "r2-1"}),
        ],
    )
    .await;
    wait_for(Duration::from_secs(20), "five dead letters", || async {
        let body = get_ok(&app, LIST).await;
        let profile = get_ok(&app, "/api/profile/default").await;
        if body["count"] == json!(5) && profile["backlog"]["events"] == json!(0) {
            Ok(())
        } else {
            Err(format!("{} {}", body["count"], profile["backlog"]))
        }
    })
    .await;
    let r2 = all_rows(&app, "q=r2&q_f=user").await;
    let r2_id = r2[0]["id"].as_i64().expect("id");
    let detail = get_ok(&app, &format!("{LIST}/{r2_id}")).await;
    let history = detail["history"].as_array().expect("history");
    assert!(!history.is_empty());
    assert!(
        history.iter().all(|a| a["status"] == json!(503)),
        "{history:?}"
    );
    assert!(delivered(&sim, "r1").is_empty() && delivered(&sim, "r2").is_empty());

    // Refiner is back.
    sim.state().set_faults(Faults::none()).expect("faults");
    let answer = call(
        &app,
        Method::POST,
        &format!("{LIST}/replay"),
        Auth::Bearer(ADMIN),
        Some(json!({"ids": [r2_id]})),
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.body, json!({"replayed": 1, "remaining": 0}));
    wait_for(Duration::from_secs(10), "r2 delivered", || async {
        let calls = delivered(&sim, "r2");
        if calls.len() == 1 {
            Ok(())
        } else {
            Err(format!("{calls:?}"))
        }
    })
    .await;
    assert_eq!(get_ok(&app, LIST).await["count"], json!(4));

    // By filter: r1's four events, re-queued at the tail in their original order.
    let answer = call(
        &app,
        Method::POST,
        &format!("{LIST}/replay?q=r1&q_f=user"),
        Auth::Bearer(ADMIN),
        None,
    )
    .await;
    assert_eq!(
        answer.body,
        json!({"replayed": 4, "remaining": 0}),
        "{answer:?}"
    );
    let calls = wait_for(Duration::from_secs(10), "r1 delivered", || async {
        let calls = delivered(&sim, "r1");
        if calls.len() == 4 {
            Ok(calls)
        } else {
            Err(format!("{calls:?}"))
        }
    })
    .await;
    let paths: Vec<&str> = calls.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/v1/identify-user",
            "/v1/track-event",
            "/v1/track-event",
            "/v1/track-event"
        ]
    );
    let events: Vec<Option<&str>> = calls.iter().map(|(_, e)| e.as_deref()).collect();
    assert_eq!(events, [None, Some("First"), Some("Second"), Some("Third")]);
    assert_eq!(get_ok(&app, LIST).await["count"], json!(0));

    // The metrics table counted it all.
    let table = get_ok(&app, "/api/metrics/default/events").await;
    let total = |key: &str| -> u64 {
        table["table"]
            .as_array()
            .expect("table")
            .iter()
            .find(|row| row["key"] == json!(key))
            .map(|row| {
                row["values"]
                    .as_array()
                    .expect("values")
                    .iter()
                    .map(|v| v[1].as_u64().expect("value"))
                    .sum()
            })
            .unwrap_or_else(|| panic!("no row {key}"))
    };
    assert_eq!(total("received"), 5);
    assert_eq!(total("dead_lettered"), 5);
    assert_eq!(total("replayed"), 5);
    assert_eq!(total("forwarded"), 5);
    app.stop().await;
    sim.stop().await;
}

#[tokio::test]
async fn a_limited_replay_takes_the_oldest_first_and_reports_what_remains() {
    let app = spawn_admin(|_| {}).await;
    six_dead_letters(&app).await;
    let answer = call(
        &app,
        Method::POST,
        &format!("{LIST}/replay"),
        Auth::Bearer(ADMIN),
        Some(json!({"limit": 4})),
    )
    .await;
    assert_eq!(
        answer.body,
        json!({"replayed": 4, "remaining": 2}),
        "{answer:?}"
    );
    let left: BTreeSet<String> = all_rows(&app, "")
        .await
        .iter()
        .map(|r| r["messageId"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(
        left,
        BTreeSet::from(["m-b2".to_string(), "m-b3".to_string()])
    );
    // The replayed events are queued again, at the tail, in their first order; with their
    // attempts.
    let queued = app.spool.lease(100, 60_000).await.expect("lease");
    let replayed: Vec<(&str, u32)> = queued
        .iter()
        .map(|e| (e.message_id.as_str(), e.attempts))
        .collect();
    assert_eq!(
        replayed,
        [("m-a1", 1), ("m-a2", 1), ("m-a3", 1), ("m-b1", 3)]
    );
    // `until_id` bounds a replay to ids up to it.
    let left = ids(&all_rows(&app, "o=id").await);
    let answer = call(
        &app,
        Method::POST,
        &format!("{LIST}/replay"),
        Auth::Bearer(ADMIN),
        Some(json!({"until_id": left[0]})),
    )
    .await;
    assert_eq!(
        answer.body,
        json!({"replayed": 1, "remaining": 0}),
        "{answer:?}"
    );
    assert_eq!(ids(&all_rows(&app, "").await), [left[1]]);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// Profile and usage, metrics table

#[tokio::test]
async fn usage_counts_distinct_users_events_and_page_views_of_a_known_stream() {
    let app = spawn_admin(|_| {}).await;
    let before = chrono::Utc::now();
    send_batch(
        &app,
        &[
            json!({"type": "identify", "userId": "u1", "messageId": "s-1"}),
            json!({"type": "track", "userId": "u1", "event": "E", "messageId": "s-2"}),
            json!({"type": "page", "userId": "u1", "name": "Home", "messageId": "s-3"}),
            json!({"type": "track", "userId": "u2", "event": "E", "messageId": "s-4"}),
            json!({"type": "screen", "userId": "u2", "name": "Main", "messageId": "s-5"}),
            json!({"type": "identify", "traits": {"email": "x@y.io"}, "anonymousId": "a9",
                   "messageId": "s-6"}),
            json!({"type": "page", "anonymousId": "a1", "messageId": "s-7"}),
        ],
    )
    .await;
    // A duplicate is not counted; a known user's new event is an event, not a user.
    send_batch(
        &app,
        &[
            json!({"type": "track", "userId": "u1", "event": "E", "messageId": "s-2"}),
            json!({"type": "track", "userId": "u1", "event": "F", "messageId": "s-8"}),
            json!({"type": "alias", "userId": "u3", "previousId": "a1", "messageId": "s-9"}),
        ],
    )
    .await;
    let profile = get_ok(&app, "/api/profile/default").await;
    assert_eq!(profile["slug"], json!("default"));
    assert_eq!(profile["write_keys"], json!(["te…ey"]));
    assert_eq!(profile["webhook_signature"], json!(false));
    assert_eq!(profile["destination"]["type"], json!("refiner"));
    assert_eq!(profile["destination"]["api_key"], json!("re…ey"));
    assert_eq!(
        profile["destination"]["base_url"],
        json!(app.settings.refiner.base_url)
    );
    assert!(profile["created_at"].as_str().is_some(), "{profile}");
    let usage = &profile["usage"];
    assert_eq!(usage["month"], json!(before.format("%Y-%m").to_string()));
    assert_eq!(usage["mtu_count"], json!(4), "u1, u2, x@y.io, u3: {usage}");
    assert_eq!(usage["mte_count"], json!(9), "{usage}");
    assert_eq!(
        usage["mpv_count"],
        json!(3),
        "two pages and a screen: {usage}"
    );
    for key in ["mtu", "mte", "mpv"] {
        let at = usage[format!("{key}_count_updated_at")]
            .as_str()
            .unwrap_or_else(|| panic!("{key}: {usage}"));
        let at = chrono::DateTime::parse_from_rfc3339(at).expect("time");
        assert!(
            at.timestamp_millis() >= before.timestamp_millis() - 1,
            "{key}"
        );
    }
    // Nothing is delivered here: all nine events wait.
    assert_eq!(profile["backlog"]["events"], json!(9));
    let oldest = profile["backlog"]["oldest_received_at"]
        .as_str()
        .expect("oldest");
    assert!(chrono::DateTime::parse_from_rfc3339(oldest).is_ok());
    assert!(
        profile["backlog"]["oldest_age_seconds"]
            .as_f64()
            .expect("age")
            >= 0.0
    );
    assert_eq!(profile["dead_letters"], json!(0));
    // The other source is untouched.
    let hooked = get_ok(&app, "/api/profile/hooked").await;
    assert_eq!(hooked["usage"]["mte_count"], json!(0));
    assert_eq!(hooked["usage"]["mtu_count_updated_at"], Value::Null);
    assert_eq!(hooked["webhook_signature"], json!(true));
    assert_eq!(hooked["backlog"]["events"], json!(0));
    assert_eq!(hooked["backlog"]["oldest_received_at"], Value::Null);
    // Received and duplicates in this hour's row of the metrics table.
    let table = get_ok(&app, "/api/metrics/default/events?period=hour").await;
    let row = |key: &str| -> Vec<u64> {
        table["table"]
            .as_array()
            .expect("table")
            .iter()
            .find(|r| r["key"] == json!(key))
            .unwrap_or_else(|| panic!("no {key}"))["values"]
            .as_array()
            .expect("values")
            .iter()
            .map(|v| v[1].as_u64().expect("n"))
            .collect()
    };
    let received = row("received");
    assert_eq!(received.len(), 24);
    assert_eq!(received.iter().sum::<u64>(), 9);
    assert_eq!(*received.last().expect("current hour"), 9);
    assert_eq!(row("duplicates").iter().sum::<u64>(), 1);
    assert_eq!(row("forwarded").iter().sum::<u64>(), 0);
    // The backlog goes down as events are delivered (acked here by hand).
    let leased = app.spool.lease(100, 60_000).await.expect("lease");
    app.spool
        .ack(leased.iter().map(|e| e.seq).collect())
        .await
        .expect("ack");
    let profile = get_ok(&app, "/api/profile/default").await;
    assert_eq!(profile["backlog"]["events"], json!(0));
    assert_eq!(profile["backlog"]["oldest_received_at"], Value::Null);
    assert_eq!(profile["usage"]["mte_count"], json!(9));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_table_counts_each_outcome_by_hour_and_day() {
    let sim = start_sim(Faults {
        count_503: 1,
        ..Faults::none()
    })
    .await;
    let app = spawn_admin(|settings| {
        deliver_to(settings, &sim);
        settings.delivery.max_age_secs = 3600;
    })
    .await;
    send_batch(
        &app,
        &[
            json!({"type": "track", "userId": "m1", "event": "A", "messageId": "t-1"}),
            json!({"type": "track", "anonymousId": "anon", "event": "B", "messageId": "t-2"}),
            json!({"type": "alias", "userId": "m2", "previousId": "anon", "messageId": "t-3"}),
        ],
    )
    .await;
    wait_for(Duration::from_secs(10), "drained", || async {
        let profile = get_ok(&app, "/api/profile/default").await;
        let forwarded = delivered(&sim, "m1").len();
        if profile["backlog"]["events"] == json!(0) && forwarded == 1 {
            Ok(())
        } else {
            Err(format!("{} {forwarded}", profile["backlog"]))
        }
    })
    .await;
    let values = |table: &Value, key: &str| -> Vec<u64> {
        table["table"]
            .as_array()
            .expect("table")
            .iter()
            .find(|r| r["key"] == json!(key))
            .unwrap_or_else(|| panic!("no {key} in {table}"))["values"]
            .as_array()
            .expect("values")
            .iter()
            .map(|v| v[1].as_u64().expect("n"))
            .collect()
    };
    let hourly = get_ok(&app, "/api/metrics/default/events").await;
    assert_eq!(hourly["period"], json!("hour"));
    assert_eq!(hourly["unit"], json!("events"));
    let keys: Vec<&str> = hourly["table"]
        .as_array()
        .expect("table")
        .iter()
        .map(|r| r["key"].as_str().expect("key"))
        .collect();
    assert_eq!(
        keys,
        [
            "received",
            "duplicates",
            "forwarded",
            "skipped",
            "retried",
            "dead_lettered",
            "replayed",
            "skipped:alias",
            "skipped:unidentifiable"
        ]
    );
    let sum = |key: &str| values(&hourly, key).iter().sum::<u64>();
    assert_eq!(sum("received"), 3);
    assert_eq!(sum("forwarded"), 1);
    assert_eq!(sum("retried"), 1, "the one 503");
    assert_eq!(sum("skipped"), 2);
    assert_eq!(sum("skipped:alias"), 1);
    assert_eq!(sum("skipped:unidentifiable"), 1);
    assert_eq!(sum("dead_lettered"), 0);
    // Labels are period starts, one per hour, ending with the current hour.
    let labels: Vec<String> = hourly["table"][0]["values"]
        .as_array()
        .expect("values")
        .iter()
        .map(|v| v[0].as_str().expect("label").to_string())
        .collect();
    assert_eq!(labels.len(), 24);
    let now = chrono::Utc::now();
    let this_hour = now.format("%Y-%m-%dT%H:00:00.000Z").to_string();
    assert_eq!(labels.last().expect("last"), &this_hour);
    // By day, over an explicit range.
    let today = now.format("%Y-%m-%d").to_string();
    let daily = get_ok(
        &app,
        &format!(
            "/api/metrics/default/events?period=day&start_at=2026-01-01&ends_at={today}T23:00:00Z"
        ),
    )
    .await;
    assert_eq!(daily["period"], json!("day"));
    assert_eq!(daily["start_at"], json!("2026-01-01T00:00:00.000Z"));
    let received = values(&daily, "received");
    assert_eq!(*received.last().expect("today"), 3);
    assert_eq!(received.iter().sum::<u64>(), 3);
    assert_eq!(
        daily["table"][0]["values"]
            .as_array()
            .expect("values")
            .last()
            .expect("today")[0],
        json!(format!("{today}T00:00:00.000Z"))
    );
    app.stop().await;
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------
// Retention

#[tokio::test]
async fn expired_dead_letters_are_removed_by_the_writer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut options = SqliteSpoolOptions::new(dir.path());
    options.dead_letter_retention = Duration::from_millis(300);
    options.prune_interval = Duration::from_millis(20);
    options.sources = vec!["s".into()];
    let spool = Arc::new(SqliteSpool::open(options, Metrics::new()).expect("spool"));
    let queue: Arc<dyn Spool> = spool.clone();
    let events = (0..5)
        .map(|i| refiner_gateway::spool::conformance::event(&format!("r-{i}"), &i.to_string()))
        .collect();
    spool
        .append(refiner_gateway::spool::conformance::request(
            "s",
            chrono::Utc::now().timestamp_millis(),
            events,
        ))
        .await
        .expect("append");
    bury_queued(&queue, 5, 1, 400, "no").await;
    let all = DeadLetterFilter {
        source: "s".into(),
        ..Default::default()
    };
    let list = |spool: Arc<SqliteSpool>, filter: DeadLetterFilter| async move {
        spool
            .list_dead_letters(refiner_gateway::spool::admin::DeadLetterQuery {
                filter,
                sort: refiner_gateway::spool::admin::SortField::Id,
                descending: false,
                at: refiner_gateway::spool::admin::PageAt::Offset(0),
                limit: 100,
            })
            .await
            .expect("list")
    };
    let page = list(spool.clone(), all.clone()).await;
    assert_eq!(page.count, 5);
    let id = page.items[0].id;
    assert_eq!(
        spool
            .dead_letter("s", id)
            .await
            .expect("get")
            .expect("exists")
            .attempts
            .len(),
        2
    );
    wait_for(
        Duration::from_secs(10),
        "expired dead letters pruned",
        || {
            let spool = spool.clone();
            let all = all.clone();
            async move {
                // The writer prunes between its transactions: give it some.
                spool.check_writable().await.expect("probe");
                let count = list(spool, all).await.count;
                if count == 0 {
                    Ok(())
                } else {
                    Err(format!("{count} left"))
                }
            }
        },
    )
    .await;
    assert_eq!(spool.dead_letter("s", id).await.expect("get"), None);
    spool.close().await;
}

// ---------------------------------------------------------------------------------------
// The OpenAPI document matches the routes

#[tokio::test]
async fn every_route_of_the_openapi_document_exists() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml"))
        .expect("docs/openapi.yaml");
    let document: Value = serde_norway::from_str(&text).expect("the OpenAPI document parses");
    assert!(document["openapi"]
        .as_str()
        .is_some_and(|v| v.starts_with("3.")));
    let paths = document["paths"].as_object().expect("paths");
    let app = spawn_admin(|_| {}).await;
    let mut checked = 0;
    let mut documented = BTreeSet::new();
    // The management routes (tests/api/openapi.rs checks the whole surface).
    for (path, operations) in paths.iter().filter(|(path, _)| path.starts_with("/api")) {
        let operations = operations.as_object().expect("operations");
        for method in ["get", "post", "put", "patch", "delete"] {
            let Some(operation) = operations.get(method) else {
                continue;
            };
            assert!(
                operation["responses"]["200"].is_object(),
                "{method} {path} documents no 200 answer"
            );
            assert!(
                operation["responses"]["401"].is_object() || operations.get("$ref").is_some(),
                "{method} {path} documents no 401 answer"
            );
            // A dead letter to act on, fresh for every request (after emptying the queue
            // of what an earlier replay put back).
            crate::helpers::spooled_events(&app.spool).await;
            bury(
                &app,
                &[json!({"type": "track", "userId": "doc", "event": "E",
                         "messageId": format!("doc-{checked}")})],
                0,
                400,
                "refused",
            )
            .await;
            let id = ids(&all_rows(&app, "o=-id").await)[0];
            if path == "/api/live" {
                // A stream that does not end: covered by tests/api/console_api.rs.
                documented.insert(format!("{} {path}", method.to_uppercase()));
                checked += 1;
                continue;
            }
            let mut concrete = path
                .replace("{source}", "default")
                .replace("{id}", &id.to_string());
            if path == "/api/events/{source}" {
                concrete.push_str("?message_id=doc");
            }
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
            let answer = call(&app, method.clone(), &concrete, Auth::Bearer(ADMIN), None).await;
            assert!(
                answer.status != 404 && answer.status != 405,
                "{method} {concrete}: {answer:?}"
            );
            // Reload needs a configuration file and preview an event: their answers are
            // tested in tests/api/filters.rs.
            let needs_setup = path == "/api/reload" || path.ends_with("/preview");
            assert!(
                answer.status < 300 || needs_setup && answer.status == 400,
                "{method} {concrete}: {answer:?}"
            );
            let unauthenticated = call(&app, method.clone(), &concrete, Auth::None, None).await;
            assert_eq!(unauthenticated.status, 401, "{method} {concrete}");
            documented.insert(format!("{method} {path}"));
            checked += 1;
        }
    }
    // And the routes the gateway serves are all in the document.
    for route in [
        "GET /api",
        "GET /api/events/{source}/dead-letters",
        "DELETE /api/events/{source}/dead-letters",
        "POST /api/events/{source}/dead-letters/replay",
        "GET /api/events/{source}/dead-letters/{id}",
        "DELETE /api/events/{source}/dead-letters/{id}",
        "GET /api/profile/{source}",
        "GET /api/metrics/{source}/events",
        "POST /api/reload",
        "POST /api/sources/{source}/preview",
        "GET /api/events/{source}",
        "GET /api/live",
        "GET /api/overview",
    ] {
        assert!(
            documented.contains(route),
            "{route} is not in docs/openapi.yaml: {documented:?}"
        );
    }
    assert_eq!(checked, 13);
    app.stop().await;
}

// ---------------------------------------------------------------------------------------
// The command line

const BINARY: &str = env!("CARGO_BIN_EXE_refiner-gateway");

/// Runs `refiner-gateway dead-letters <args>` against `app`; (exit code, stdout, stderr).
async fn cli(app: &TestApp, token: Option<&str>, args: &[&str]) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(BINARY);
    command
        .arg("dead-letters")
        .args(args)
        .args(["--url", &app.address])
        .env_remove("GATEWAY_URL")
        .env_remove("GATEWAY_ADMIN_TOKEN");
    if let Some(token) = token {
        command.env("GATEWAY_ADMIN_TOKEN", token);
    }
    let output = command.output().await.expect("run refiner-gateway");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_lists_shows_replays_and_purges() {
    let app = spawn_admin(|_| {}).await;
    six_dead_letters(&app).await;
    for sub in [
        vec![],
        vec!["list"],
        vec!["show"],
        vec!["replay"],
        vec!["purge"],
    ] {
        let mut args = sub.clone();
        args.push("--help");
        let (code, out, _) = cli(&app, None, &args).await;
        assert_eq!(code, 0, "{args:?}");
        assert!(out.contains("Usage: refiner-gateway dead-letters"), "{out}");
    }

    let (code, out, err) = cli(&app, Some(ADMIN), &["list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("page 1 of 1 (6 dead letters)"), "{out}");
    assert!(
        out.contains("Order Completed") && out.contains("email x@y.io"),
        "{out}"
    );
    let (code, out, _) = cli(
        &app,
        Some(ADMIN),
        &["list", "--all", "--page-size", "2", "--sort", "-id"],
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 1 + 6 + 1, "{out}");
    assert!(out.ends_with("6 dead letters\n"), "{out}");
    let (code, out, _) = cli(
        &app,
        Some(ADMIN),
        &[
            "list",
            "--json",
            "--query",
            "order",
            "--query-fields",
            "event",
        ],
    )
    .await;
    assert_eq!(code, 0);
    let body: Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(body["count"], json!(2));

    let id = ids(&all_rows(&app, "q=m-a1&q_f=messageId").await)[0];
    let (code, out, _) = cli(
        &app,
        Some(ADMIN),
        &["show", &id.to_string(), "--token", ADMIN],
    )
    .await;
    assert_eq!(code, 0);
    let body: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(body["messageId"], json!("m-a1"));

    let (code, out, err) = cli(&app, Some(ADMIN), &["replay", "--id", &id.to_string()]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "replayed 1 dead letters\n");
    let (code, out, _) = cli(
        &app,
        Some(ADMIN),
        &["replay", "--q", "order", "--q-f", "event", "--chunk", "1"],
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(out, "replayed 2 dead letters\n");
    assert_eq!(get_ok(&app, LIST).await["count"], json!(3));

    let (code, _, err) = cli(&app, Some(ADMIN), &["purge"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("--yes"), "{err}");
    let left = ids(&all_rows(&app, "o=id").await);
    let (code, out, _) = cli(&app, Some(ADMIN), &["purge", "--id", &left[0].to_string()]).await;
    assert_eq!(code, 0);
    assert_eq!(out, "deleted 1 dead letters\n");
    let (code, out, _) = cli(&app, Some(ADMIN), &["purge", "--yes"]).await;
    assert_eq!(code, 0);
    assert_eq!(out, "deleted 2 dead letters\n");
    let (code, out, _) = cli(&app, Some(ADMIN), &["replay"]).await;
    assert_eq!(code, 0);
    assert_eq!(out, "no dead letters to replay\n");

    // Refusals: no token, a wrong one, an unknown source, an unreachable gateway.
    let (code, _, err) = cli(&app, None, &["list"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("GATEWAY_ADMIN_TOKEN"), "{err}");
    let (code, _, err) = cli(&app, Some(WRITE_KEY), &["list"]).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("401") && err.contains("invalid_token"),
        "{err}"
    );
    let (code, _, err) = cli(&app, Some(ADMIN), &["list", "--source", "nope"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("unknown_source"), "{err}");
    app.stop().await;
}
