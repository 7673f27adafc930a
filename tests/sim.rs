//! The Refiner simulator, end to end over HTTP on 127.0.0.1: every `/v1` route, each way of
//! authenticating and each refusal, trait typing and merging, accounts, the call log, the
//! `/_sim` control routes, every fault mode, and the `refiner-sim` binary.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use base64::Engine;
use refiner_gateway::sim::{
    self, AuthMethod, CallFilter, CallRecord, Fault, Faults, LongStrings, SimHandle, SimOptions,
    StateSnapshot, TraitType,
};
use serde_json::{json, Value};

const KEY: &str = "sim-test-key";

async fn spawn_sim() -> SimHandle {
    spawn_sim_with(|_| {}).await
}

async fn spawn_sim_with(customize: impl FnOnce(&mut SimOptions)) -> SimHandle {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let mut options = SimOptions::with_key(KEY);
    options.workers = Some(2);
    customize(&mut options);
    sim::spawn(listener, options)
        .await
        .expect("simulator starts")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

/// POSTs JSON with a Bearer key; returns status and body.
async fn post(sim: &SimHandle, route: &str, body: Value) -> (u16, Value) {
    let response = client()
        .post(format!("{}/{route}", sim.url()))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .expect("request");
    answer(response).await
}

async fn get(sim: &SimHandle, route_and_query: &str) -> (u16, Value) {
    let response = client()
        .get(format!("{}/{route_and_query}", sim.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("request");
    answer(response).await
}

async fn answer(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

async fn control(sim: &SimHandle, path: &str) -> Value {
    client()
        .get(format!("{}/_sim/{path}", sim.base_url()))
        .send()
        .await
        .expect("control request")
        .json()
        .await
        .expect("control JSON")
}

async fn set_faults(sim: &SimHandle, faults: Value) -> (u16, Value) {
    let response = client()
        .post(format!("{}/_sim/faults", sim.base_url()))
        .json(&faults)
        .send()
        .await
        .expect("control request");
    answer(response).await
}

// ---------------------------------------------------------------------------------------
// Routes and authentication

#[tokio::test]
async fn root_answers_ok_with_and_without_trailing_slash() {
    let sim = spawn_sim().await;
    assert_eq!(get(&sim, "").await, (200, json!({"message": "ok"})));
    let response = client()
        .get(sim.url())
        .bearer_auth(KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(answer(response).await, (200, json!({"message": "ok"})));
    assert_eq!(sim.url(), format!("http://127.0.0.1:{}/v1", sim.port()));
    sim.stop().await;
}

#[tokio::test]
async fn each_of_the_three_auth_methods_is_accepted() {
    let sim = spawn_sim().await;
    let url = format!("{}/", sim.url());
    let c = client();
    let bearer = c.get(&url).bearer_auth(KEY).send().await.expect("bearer");
    let basic = c
        .get(&url)
        .basic_auth(KEY, None::<&str>)
        .send()
        .await
        .expect("basic");
    let query = c
        .get(format!("{url}?api_key={KEY}"))
        .send()
        .await
        .expect("query");
    let form = c
        .post(&url)
        .form(&[("api_key", KEY)])
        .send()
        .await
        .expect("form");
    let json_body = c
        .post(&url)
        .json(&json!({"api_key": KEY}))
        .send()
        .await
        .expect("json");
    for response in [bearer, basic, query, form, json_body] {
        assert_eq!(response.status().as_u16(), 200);
    }
    let calls = sim.state().calls();
    let methods: Vec<_> = calls.iter().map(|c| (c.auth, c.auth_ok)).collect();
    assert_eq!(
        methods,
        vec![
            (AuthMethod::Bearer, true),
            (AuthMethod::Basic, true),
            (AuthMethod::Param, true),
            (AuthMethod::Param, true),
            (AuthMethod::Param, true),
        ]
    );
    assert!(
        calls.iter().all(|c| c.params.get("api_key").is_none()),
        "the key never reaches the log: {calls:?}"
    );
    sim.stop().await;
}

#[tokio::test]
async fn missing_or_wrong_keys_are_refused_with_401_and_an_error() {
    let sim = spawn_sim().await;
    let url = format!("{}/identify-user", sim.url());
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let c = client();
    let attempts = vec![
        ("none", c.post(&url).json(&json!({"id": "u"}))),
        (
            "wrong bearer",
            c.post(&url).bearer_auth("nope").json(&json!({"id": "u"})),
        ),
        (
            "basic without colon",
            c.post(&url)
                .header("Authorization", format!("Basic {}", b64(KEY)))
                .json(&json!({"id": "u"})),
        ),
        (
            "basic with password",
            c.post(&url)
                .basic_auth(KEY, Some("secret"))
                .json(&json!({"id": "u"})),
        ),
        (
            "wrong param",
            c.post(&url).json(&json!({"id": "u", "api_key": "nope"})),
        ),
        (
            "empty bearer",
            c.post(&url)
                .header("Authorization", "Bearer ")
                .json(&json!({"id": "u"})),
        ),
    ];
    for (what, request) in attempts {
        let (status, body) = answer(request.send().await.expect("request")).await;
        assert_eq!(status, 401, "{what}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {body}"
        );
    }
    assert!(
        sim.state().snapshot().contacts.is_empty(),
        "nothing was stored"
    );
    let calls = sim.state().calls();
    assert!(calls.iter().all(|c| !c.auth_ok && c.status == Some(401)));
    assert_eq!(calls[0].auth, AuthMethod::None);
    assert_eq!(calls[1].auth, AuthMethod::Bearer);
    assert_eq!(calls[2].auth, AuthMethod::Basic);
    assert_eq!(calls[4].auth, AuthMethod::Param);
    sim.stop().await;
}

#[tokio::test]
async fn an_empty_key_list_accepts_any_key_but_still_needs_one() {
    let sim = spawn_sim_with(|o| o.api_keys.clear()).await;
    let c = client();
    let with_key = c
        .get(sim.url())
        .bearer_auth("anything")
        .send()
        .await
        .expect("request");
    let without = c.get(sim.url()).send().await.expect("request");
    assert_eq!(with_key.status().as_u16(), 200);
    assert_eq!(without.status().as_u16(), 401);
    sim.stop().await;
}

#[tokio::test]
async fn unknown_routes_are_404_and_wrong_methods_405() {
    let sim = spawn_sim().await;
    let (status, body) = get(&sim, "forms").await;
    assert_eq!(status, 404);
    assert!(body["error"].is_string());
    let (status, body) = get(&sim, "identify-user").await;
    assert_eq!(status, 405);
    assert!(body["error"].is_string());
    let outside = client()
        .get(format!("{}/elsewhere", sim.base_url()))
        .send()
        .await
        .expect("request");
    assert_eq!(outside.status().as_u16(), 404);
    let paths: Vec<_> = sim.state().calls().into_iter().map(|c| c.path).collect();
    assert_eq!(paths, vec!["/v1/forms", "/v1/identify-user", "/elsewhere"]);
    sim.stop().await;
}

#[tokio::test]
async fn malformed_bodies_are_400() {
    let sim = spawn_sim().await;
    let c = client();
    let url = format!("{}/identify-user", sim.url());
    let bad_json = c
        .post(&url)
        .bearer_auth(KEY)
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("request");
    let (status, body) = answer(bad_json).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().is_some_and(|e| e.contains("JSON")));
    let array = c
        .post(&url)
        .bearer_auth(KEY)
        .json(&json!([{"id": "u"}]))
        .send()
        .await
        .expect("request");
    assert_eq!(array.status().as_u16(), 400);
    let calls = sim.state().calls();
    assert_eq!(
        calls[0].params,
        Value::Null,
        "unparseable params are logged as null"
    );
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------
// identify-user: contacts, trait types, merging

#[tokio::test]
async fn identify_creates_then_merges_a_contact_by_id() {
    let sim = spawn_sim().await;
    let (status, first) = post(
        &sim,
        "identify-user",
        json!({"id": "u1", "email": "jane@awesome.com", "name": "Jane", "plan": "free"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(first["message"], "ok");
    let uuid = first["contact_uuid"]
        .as_str()
        .expect("contact_uuid")
        .to_owned();
    let (_, second) = post(
        &sim,
        "identify-user",
        json!({"id": "u1", "plan": "pro", "seats": 3}),
    )
    .await;
    assert_eq!(second["contact_uuid"], uuid.as_str());

    let contact = sim.state().contact("u1").expect("contact");
    assert_eq!(contact.uuid, uuid);
    assert_eq!(contact.email.as_deref(), Some("jane@awesome.com"));
    assert_eq!(contact.display_name.as_deref(), Some("Jane"));
    assert_eq!(
        Value::Object(contact.attributes),
        json!({"name": "Jane", "plan": "pro", "seats": 3})
    );
    assert_eq!(contact.identify_count, 2);
    assert_eq!(sim.state().snapshot().contacts.len(), 1);
    sim.stop().await;
}

#[tokio::test]
async fn traits_keep_refiners_types() {
    let sim = spawn_sim().await;
    let (status, _) = post(
        &sim,
        "identify-user",
        json!({
            "id": "u1",
            "role": "Manager",
            "seats": 42,
            "ratio": 0.5,
            "active": true,
            "created_at": "2020-08-20T14:48:00.000Z",
            "upgraded_at": "2022-07-09 10:01:01",
            "renewed_at": "2022-07-09",
            "churned_at": "not a date",
            "birthday": "2020-01-01",
        }),
    )
    .await;
    assert_eq!(status, 200);
    let contact = sim.state().contact("u1").expect("contact");
    let types = &contact.attribute_types;
    assert_eq!(types["role"], TraitType::String);
    assert_eq!(types["seats"], TraitType::Number);
    assert_eq!(types["ratio"], TraitType::Number);
    assert_eq!(types["active"], TraitType::Boolean);
    assert_eq!(types["created_at"], TraitType::Date);
    assert_eq!(types["upgraded_at"], TraitType::Date);
    assert_eq!(types["renewed_at"], TraitType::Date);
    assert_eq!(
        types["churned_at"],
        TraitType::String,
        "unparseable dates stay strings"
    );
    assert_eq!(
        types["birthday"],
        TraitType::String,
        "only `_at` keys are dates"
    );
    assert_eq!(
        contact.attributes["created_at"],
        "2020-08-20T14:48:00.000000Z"
    );
    assert_eq!(
        contact.attributes["upgraded_at"],
        "2022-07-09T10:01:01.000000Z"
    );
    assert_eq!(
        contact.attributes["renewed_at"],
        "2022-07-09T00:00:00.000000Z"
    );
    assert_eq!(contact.attributes["seats"], 42);
    assert_eq!(contact.attributes["active"], true);
    sim.stop().await;
}

#[tokio::test]
async fn form_bodies_are_typed_like_refiners_curl_examples() {
    let sim = spawn_sim().await;
    let response = client()
        .post(format!("{}/identify-user", sim.url()))
        .bearer_auth(KEY)
        .form(&[
            ("id", "Your-User-Id"),
            ("email", "user@email.com"),
            ("some_attribute", "Manager"),
            ("another_attribute", "true"),
            ("a_number", "42"),
            ("zip", "007"),
            ("created_at", "2020-08-20T14:48:00.000Z"),
            ("account[id]", "Your-Account-Id"),
            ("account[name]", "Awesome Inc."),
        ])
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 200);
    let contact = sim.state().contact("Your-User-Id").expect("contact");
    assert_eq!(contact.attribute_types["some_attribute"], TraitType::String);
    assert_eq!(
        contact.attribute_types["another_attribute"],
        TraitType::Boolean
    );
    assert_eq!(contact.attribute_types["a_number"], TraitType::Number);
    assert_eq!(
        contact.attributes["zip"], "007",
        "no lossy number inference"
    );
    assert_eq!(contact.attribute_types["created_at"], TraitType::Date);
    assert_eq!(contact.account_id.as_deref(), Some("Your-Account-Id"));
    let account = sim.state().account("Your-Account-Id").expect("account");
    assert_eq!(account.display_name.as_deref(), Some("Awesome Inc."));
    assert_eq!(
        sim.state().calls()[0].params["account"]["name"],
        "Awesome Inc."
    );
    sim.stop().await;
}

#[tokio::test]
async fn query_string_parameters_count_and_the_body_wins() {
    let sim = spawn_sim().await;
    let response = client()
        .post(format!(
            "{}/identify-user?id=u1&plan=free&seats=2",
            sim.url()
        ))
        .bearer_auth(KEY)
        .json(&json!({"plan": "pro"}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 200);
    let contact = sim.state().contact("u1").expect("contact");
    assert_eq!(contact.attributes["plan"], "pro");
    assert_eq!(contact.attributes["seats"], 2);
    sim.stop().await;
}

#[tokio::test]
async fn over_long_strings_are_refused_by_default_and_truncated_on_request() {
    let long = "x".repeat(256);
    let sim = spawn_sim().await;
    let (status, body) = post(&sim, "identify-user", json!({"id": "u1", "bio": long})).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("bio")),
        "{body}"
    );
    let (status, _) = post(
        &sim,
        "identify-user",
        json!({"id": "u1", "bio": "x".repeat(255)}),
    )
    .await;
    assert_eq!(status, 200, "255 characters are fine");
    sim.stop().await;

    let sim = spawn_sim_with(|o| o.long_strings = LongStrings::Truncate).await;
    let (status, _) = post(
        &sim,
        "identify-user",
        json!({"id": "u1", "bio": "é".repeat(300)}),
    )
    .await;
    assert_eq!(status, 200);
    let contact = sim.state().contact("u1").expect("contact");
    assert_eq!(
        contact.attributes["bio"]
            .as_str()
            .map(|s| s.chars().count()),
        Some(255)
    );
    sim.stop().await;
}

#[tokio::test]
async fn null_clears_a_trait_and_objects_or_arrays_are_refused() {
    let sim = spawn_sim().await;
    post(
        &sim,
        "identify-user",
        json!({"id": "u1", "phone": "123", "plan": "pro"}),
    )
    .await;
    let (status, _) = post(&sim, "identify-user", json!({"id": "u1", "phone": null})).await;
    assert_eq!(status, 200);
    let contact = sim.state().contact("u1").expect("contact");
    assert_eq!(Value::Object(contact.attributes), json!({"plan": "pro"}));

    let (status, body) = post(
        &sim,
        "identify-user",
        json!({"id": "u1", "address": {"city": "Paris"}}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["error"]
        .as_str()
        .is_some_and(|e| e.contains("address")));
    let (status, _) = post(&sim, "identify-user", json!({"id": "u1", "tags": ["a"]})).await;
    assert_eq!(status, 400);
    sim.stop().await;
}

#[tokio::test]
async fn identify_needs_an_id_or_an_email() {
    let sim = spawn_sim().await;
    let (status, body) = post(&sim, "identify-user", json!({"name": "Nobody"})).await;
    assert_eq!(status, 400);
    assert!(body["error"].is_string());
    let (status, _) = post(&sim, "identify-user", json!({"id": "", "email": "  "})).await;
    assert_eq!(status, 400, "blank identifiers do not count");
    let (status, _) = post(&sim, "identify-user", json!({"id": 12345})).await;
    assert_eq!(status, 200, "numeric ids are accepted");
    assert!(sim.state().contact("12345").is_some());
    sim.stop().await;
}

#[tokio::test]
async fn email_only_contacts_merge_by_email_and_are_adopted_by_an_id() {
    let sim = spawn_sim().await;
    let (_, a) = post(
        &sim,
        "identify-user",
        json!({"email": "a@x.io", "plan": "free"}),
    )
    .await;
    let (_, b) = post(
        &sim,
        "identify-user",
        json!({"email": "a@x.io", "seats": 1}),
    )
    .await;
    assert_eq!(a["contact_uuid"], b["contact_uuid"]);
    let (_, c) = post(
        &sim,
        "identify-user",
        json!({"id": "u1", "email": "a@x.io"}),
    )
    .await;
    assert_eq!(
        a["contact_uuid"], c["contact_uuid"],
        "the id adopts the email contact"
    );
    let contact = sim.state().contact("u1").expect("contact");
    assert_eq!(contact.remote_id.as_deref(), Some("u1"));
    assert_eq!(
        Value::Object(contact.attributes),
        json!({"plan": "free", "seats": 1})
    );

    let (_, d) = post(
        &sim,
        "identify-user",
        json!({"id": "u2", "email": "a@x.io"}),
    )
    .await;
    assert_ne!(
        a["contact_uuid"], d["contact_uuid"],
        "a contact with an id is not taken over"
    );
    assert_eq!(sim.state().snapshot().contacts.len(), 2);
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------
// Accounts

#[tokio::test]
async fn a_nested_account_creates_merges_and_links() {
    let sim = spawn_sim().await;
    post(
        &sim,
        "identify-user",
        json!({"id": "u1", "account": {"id": "acme", "name": "Acme", "domain": "acme.io", "founded_at": "2001-02-03"}}),
    )
    .await;
    post(
        &sim,
        "identify-user",
        json!({"id": "u2", "account": {"id": "acme", "employees": 50}}),
    )
    .await;
    let account = sim.state().account("acme").expect("account");
    assert_eq!(account.display_name.as_deref(), Some("Acme"));
    assert_eq!(account.domain.as_deref(), Some("acme.io"));
    assert_eq!(account.attribute_types["founded_at"], TraitType::Date);
    assert_eq!(account.attributes["employees"], 50);
    assert_eq!(account.contact_count, 2);

    post(
        &sim,
        "identify-user",
        json!({"id": "u2", "account": {"id": "globex"}}),
    )
    .await;
    assert_eq!(sim.state().account("acme").expect("acme").contact_count, 1);
    assert_eq!(
        sim.state().account("globex").expect("globex").contact_count,
        1
    );
    assert_eq!(
        sim.state()
            .contact("u2")
            .and_then(|c| c.account_id)
            .as_deref(),
        Some("globex")
    );

    let (status, body) = get(&sim, "contact?id=u1").await;
    assert_eq!(status, 200);
    assert_eq!(body["account"]["remote_id"], "acme");
    assert_eq!(body["account"]["display_name"], "Acme");
    assert_eq!(body["account"]["domain"], "acme.io");
    assert!(body["account"]["uuid"].is_string());

    let (status, body) = post(
        &sim,
        "identify-user",
        json!({"id": "u3", "account": {"name": "No id"}}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body["error"]
        .as_str()
        .is_some_and(|e| e.contains("account")));
    let (status, _) = post(
        &sim,
        "identify-user",
        json!({"id": "u3", "account": "acme"}),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        sim.state().contact("u3").is_none(),
        "refused calls store nothing"
    );
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------
// track-event

#[tokio::test]
async fn track_event_records_events_in_order_and_creates_contacts() {
    let sim = spawn_sim().await;
    for event in ["Signed Up", "Upgraded", "Invited"] {
        let (status, body) = post(&sim, "track-event", json!({"id": "u1", "event": event})).await;
        assert_eq!((status, body), (200, json!({"message": "ok"})));
    }
    let (status, _) = post(
        &sim,
        "track-event",
        json!({"email": "b@x.io", "event": "Visited", "properties": {"x": 1}}),
    )
    .await;
    assert_eq!(status, 200);

    let snapshot = sim.state().snapshot();
    let names: Vec<_> = snapshot.events.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, vec!["Signed Up", "Upgraded", "Invited", "Visited"]);
    assert_eq!(snapshot.events_total, 4);
    assert_eq!(snapshot.contacts.len(), 2, "both users were created");
    let u1 = sim.state().contact("u1").expect("u1");
    assert_eq!(u1.event_count, 3);
    assert!(snapshot
        .events
        .iter()
        .take(3)
        .all(|e| e.contact_uuid == u1.uuid));
    assert!(snapshot.events.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    let calls = sim.state().calls();
    for event in &snapshot.events {
        assert_eq!(calls[event.call_seq as usize].path, "/v1/track-event");
        assert_eq!(calls[event.call_seq as usize].at_ms, event.at_ms);
        assert!(event.time.ends_with('Z'));
    }
    assert_eq!(
        sim.state().contact("b@x.io").map(|c| c.event_count),
        Some(1)
    );
    sim.stop().await;
}

#[tokio::test]
async fn track_event_needs_a_user_and_an_event() {
    let sim = spawn_sim().await;
    let (status, body) = post(&sim, "track-event", json!({"event": "X"})).await;
    assert_eq!(status, 400);
    assert!(body["error"].is_string());
    let (status, body) = post(&sim, "track-event", json!({"id": "u1"})).await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().is_some_and(|e| e.contains("event")));
    assert!(sim.state().snapshot().contacts.is_empty());
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------
// contacts, contact, account

#[tokio::test]
async fn contacts_are_listed_with_pagination_and_cursors() {
    let sim = spawn_sim().await;
    for i in 0..5 {
        post(&sim, "identify-user", json!({"id": format!("u{i}")})).await;
    }
    let (status, page1) = get(&sim, "contacts?page_length=2").await;
    assert_eq!(status, 200);
    let ids = |page: &Value| -> Vec<String> {
        page["items"]
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .filter_map(|i| i["remote_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(ids(&page1), vec!["u0", "u1"]);
    assert_eq!(page1["pagination"]["items_count"], 5);
    assert_eq!(page1["pagination"]["current_page"], 1);
    assert_eq!(page1["pagination"]["last_page"], 3);
    assert_eq!(page1["pagination"]["page_length"], 2);
    let item = &page1["items"][0];
    for field in [
        "uuid",
        "remote_id",
        "email",
        "display_name",
        "first_seen_at",
        "last_seen_at",
        "attributes",
        "segments",
        "account",
    ] {
        assert!(item.get(field).is_some(), "contact has `{field}`");
    }

    let (_, page3) = get(&sim, "contacts?page_length=2&page=3").await;
    assert_eq!(ids(&page3), vec!["u4"]);
    assert_eq!(page3["pagination"]["next_page_cursor"], Value::Null);

    let cursor = page1["pagination"]["next_page_cursor"]
        .as_str()
        .expect("cursor");
    let (_, page2) = get(
        &sim,
        &format!("contacts?page_length=2&page_cursor={cursor}"),
    )
    .await;
    assert_eq!(ids(&page2), vec!["u2", "u3"]);
    assert_eq!(page2["pagination"]["current_page"], 2);

    let (_, beyond) = get(&sim, "contacts?page_length=2&page=9").await;
    assert_eq!(ids(&beyond), Vec::<String>::new());
    let (_, default) = get(&sim, "contacts").await;
    assert_eq!(default["pagination"]["page_length"], 50);

    post(&sim, "identify-user", json!({"id": "u0"})).await;
    let (_, by_last_seen) = get(&sim, "contacts?order_by=last_seen_at").await;
    assert_eq!(ids(&by_last_seen).last().map(String::as_str), Some("u0"));

    assert_eq!(get(&sim, "contacts?page_length=0").await.0, 400);
    assert_eq!(get(&sim, "contacts?order_by=name").await.0, 400);
    assert_eq!(get(&sim, "contacts?page_cursor=garbage").await.0, 400);
    sim.stop().await;
}

#[tokio::test]
async fn a_contact_is_found_by_id_email_or_uuid_and_404_otherwise() {
    let sim = spawn_sim().await;
    let (_, created) = post(
        &sim,
        "identify-user",
        json!({"id": "u1", "email": "jane@awesome.com", "plan": "pro"}),
    )
    .await;
    let uuid = created["contact_uuid"].as_str().expect("uuid");
    for query in [
        "contact?id=u1".to_owned(),
        "contact?email=jane@awesome.com".to_owned(),
        format!("contact?uuid={uuid}"),
        "contact?id=jane@awesome.com".to_owned(),
    ] {
        let (status, body) = get(&sim, &query).await;
        assert_eq!(status, 200, "{query}");
        assert_eq!(body["uuid"], uuid, "{query}");
        assert_eq!(body["attributes"]["plan"], "pro");
        assert_eq!(body["segments"], json!([]));
    }
    // Refiner's example sends the parameters of a GET as a form body.
    let response = client()
        .get(format!("{}/contact", sim.url()))
        .bearer_auth(KEY)
        .form(&[("id", "u1")])
        .send()
        .await
        .expect("request");
    assert_eq!(answer(response).await.1["remote_id"], "u1");

    let (status, body) = get(&sim, "contact?id=nobody").await;
    assert_eq!(status, 404);
    assert!(body["error"].is_string());
    assert_eq!(get(&sim, "contact").await.0, 400);
    sim.stop().await;
}

#[tokio::test]
async fn delete_contact_removes_it() {
    let sim = spawn_sim().await;
    post(
        &sim,
        "identify-user",
        json!({"id": "u1", "email": "a@x.io", "account": {"id": "acme"}}),
    )
    .await;
    post(&sim, "track-event", json!({"id": "u1", "event": "E"})).await;
    let c = client();
    let deleted = c
        .delete(format!("{}/contact", sim.url()))
        .bearer_auth(KEY)
        .json(&json!({"id": "u1"}))
        .send()
        .await
        .expect("request");
    assert_eq!(answer(deleted).await, (200, json!({"message": "ok"})));
    assert_eq!(get(&sim, "contact?id=u1").await.0, 404);
    assert_eq!(get(&sim, "contact?email=a@x.io").await.0, 404);
    assert!(sim.state().contact("u1").is_none());
    assert_eq!(
        sim.state().account("acme").map(|a| a.contact_count),
        Some(0)
    );
    assert_eq!(
        sim.state().snapshot().events.len(),
        1,
        "the event log keeps history"
    );

    let again = c
        .delete(format!("{}/contact?email=a@x.io", sim.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(again.status().as_u16(), 404);

    let (_, fresh) = post(&sim, "identify-user", json!({"id": "u1"})).await;
    assert!(
        fresh["contact_uuid"].is_string(),
        "the id can be identified again"
    );
    sim.stop().await;
}

#[tokio::test]
async fn account_reports_usage_shaped_like_refiners() {
    let sim = spawn_sim().await;
    post(&sim, "identify-user", json!({"id": "u1"})).await;
    post(&sim, "track-event", json!({"id": "u1", "event": "A"})).await;
    post(&sim, "track-event", json!({"id": "u2", "event": "B"})).await;
    let (status, body) = get(&sim, "account").await;
    assert_eq!(status, 200);
    assert_eq!(body["subscription"]["mtu_count"], 2);
    assert_eq!(body["subscription"]["mte_count"], 2);
    assert!(body["subscription"]["mtu_limit"].is_number());
    assert!(body["subscription"]["mtu_count_updated_at"].is_string());
    assert_eq!(body["environments"][0]["name"], "Production");
    assert_eq!(body["environments"][0]["mtu"], 2);
    assert_eq!(body["environments"][0]["mte"], 2);
    assert!(body["environments"][0]["uuid"].is_string());
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------
// Call log and control routes

#[tokio::test]
async fn the_call_log_keeps_order_per_user_timing_and_counts() {
    let sim = spawn_sim().await;
    post(&sim, "identify-user", json!({"id": "a", "plan": "x"})).await;
    post(&sim, "track-event", json!({"id": "b", "event": "1"})).await;
    post(&sim, "track-event", json!({"id": "a", "event": "2"})).await;
    post(
        &sim,
        "track-event",
        json!({"email": "c@x.io", "event": "3"}),
    )
    .await;
    get(&sim, "contact?id=nobody").await;

    let state = sim.state();
    let all = state.calls();
    assert_eq!(all.len(), 5);
    assert_eq!(
        all.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4]
    );
    assert!(all.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    assert!(all
        .iter()
        .all(|c| c.answered_ms.is_some_and(|t| t >= c.at_ms)));
    assert_eq!(all[0].params, json!({"id": "a", "plan": "x"}));
    assert_eq!(all[0].method, "POST");
    assert_eq!(all[4].status, Some(404));

    let for_a = state.calls_matching(&CallFilter {
        user: Some("a".into()),
        ..CallFilter::default()
    });
    assert_eq!(
        for_a.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(),
        vec!["/v1/identify-user", "/v1/track-event"]
    );
    assert_eq!(
        state
            .calls_matching(&CallFilter {
                user: Some("c@x.io".into()),
                ..CallFilter::default()
            })
            .len(),
        1
    );

    let stats = state.call_stats();
    assert_eq!(stats.total, 5);
    assert_eq!(stats.by_status.get("200"), Some(&4));
    assert_eq!(stats.by_status.get("404"), Some(&1));

    // The same log over HTTP, filtered; control routes are not logged.
    let over_http = control(&sim, "calls?path=/v1/track-event&since=2&limit=1").await;
    let calls: Vec<CallRecord> =
        serde_json::from_value(over_http["calls"].clone()).expect("call records");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].seq, 2);
    assert_eq!(calls[0].user.as_deref(), Some("a"));
    assert_eq!(over_http["stats"]["total"], 5);
    let stats = control(&sim, "stats").await;
    assert_eq!(stats["calls"]["total"], 5);
    assert_eq!(stats["contacts"], 3);
    assert_eq!(stats["events_total"], 3);
    assert_eq!(state.call_stats().total, 5, "control routes are not logged");
    sim.stop().await;
}

#[tokio::test]
async fn the_log_evicts_old_calls_but_counts_stay_exact() {
    let sim = spawn_sim_with(|o| o.log_capacity = 3).await;
    for i in 0..5 {
        post(
            &sim,
            "track-event",
            json!({"id": "u", "event": format!("e{i}")}),
        )
        .await;
    }
    let state = sim.state();
    let calls = state.calls();
    assert_eq!(
        calls.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![2, 3, 4]
    );
    let stats = state.call_stats();
    assert_eq!((stats.total, stats.evicted), (5, 2));
    let snapshot = state.snapshot();
    assert_eq!(snapshot.events.len(), 3);
    assert_eq!(snapshot.events_total, 5);
    assert_eq!(state.contact("u").map(|c| c.event_count), Some(5));
    sim.stop().await;
}

#[tokio::test]
async fn state_over_http_matches_in_process_and_reset_clears_it() {
    let sim = spawn_sim_with(|o| o.faults.count_503 = 1).await;
    assert_eq!(
        post(&sim, "identify-user", json!({"id": "u1"})).await.0,
        503
    );
    post(
        &sim,
        "identify-user",
        json!({"id": "u1", "account": {"id": "acme"}}),
    )
    .await;
    post(&sim, "track-event", json!({"id": "u1", "event": "E"})).await;
    let over_http: StateSnapshot =
        serde_json::from_value(control(&sim, "state").await).expect("snapshot");
    assert_eq!(over_http, sim.state().snapshot());
    assert_eq!(over_http.contacts.len(), 1);
    assert_eq!(over_http.accounts.len(), 1);
    assert_eq!(over_http.events.len(), 1);

    let reset = client()
        .post(format!("{}/_sim/reset", sim.base_url()))
        .send()
        .await
        .expect("reset");
    assert_eq!(reset.status().as_u16(), 200);
    let state = sim.state();
    let snapshot = state.snapshot();
    assert!(
        snapshot.contacts.is_empty() && snapshot.accounts.is_empty() && snapshot.events.is_empty()
    );
    assert!(state.calls().is_empty());
    assert_eq!(state.call_stats().total, 0);
    assert_eq!(
        state.faults().count_503,
        1,
        "reset restores the start-up faults"
    );
    assert_eq!(
        post(&sim, "identify-user", json!({"id": "u1"})).await.0,
        503
    );
    assert_eq!(state.calls()[0].seq, 0, "sequence numbers restart");
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------
// Faults

#[tokio::test]
async fn latency_delays_every_v1_answer_but_not_control_routes() {
    let sim = spawn_sim_with(|o| o.faults.latency_ms = 200).await;
    let started = Instant::now();
    let (status, _) = post(&sim, "identify-user", json!({"id": "u1"})).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(200));
    let call = &sim.state().calls()[0];
    assert!(
        call.answered_ms.is_some_and(|t| t >= call.at_ms + 200),
        "{call:?}"
    );

    let started = Instant::now();
    control(&sim, "stats").await;
    assert!(started.elapsed() < Duration::from_millis(200));
    sim.stop().await;
}

#[tokio::test]
async fn a_429_carries_retry_after_and_changes_nothing() {
    let sim = spawn_sim_with(|o| {
        o.faults.count_429 = 1;
        o.faults.retry_after_secs = 7;
    })
    .await;
    let response = client()
        .post(format!("{}/identify-user", sim.url()))
        .bearer_auth(KEY)
        .json(&json!({"id": "u1"}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("7")
    );
    assert!(answer(response).await.1["error"].is_string());
    assert!(
        sim.state().contact("u1").is_none(),
        "a refused call stores nothing"
    );
    let call = &sim.state().calls()[0];
    assert_eq!(
        (call.fault, call.status),
        (Some(Fault::TooManyRequests), Some(429))
    );

    assert_eq!(
        post(&sim, "identify-user", json!({"id": "u1"})).await.0,
        200
    );
    sim.stop().await;
}

#[tokio::test]
async fn the_log_shows_whether_a_client_waited_for_retry_after() {
    let sim = spawn_sim_with(|o| {
        o.faults.count_429 = 1;
        o.faults.retry_after_secs = 1;
    })
    .await;
    // A well-behaved client: on 429, wait Retry-After, then retry.
    let c = client();
    let send = || {
        c.post(format!("{}/track-event", sim.url()))
            .bearer_auth(KEY)
            .json(&json!({"id": "u1", "event": "E"}))
            .send()
    };
    let first = send().await.expect("request");
    let wait: u64 = first
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(send().await.expect("retry").status().as_u16(), 200);

    let calls = sim.state().calls_matching(&CallFilter {
        user: Some("u1".into()),
        ..CallFilter::default()
    });
    assert_eq!(calls.len(), 2);
    let refused_at = calls[0].answered_ms.expect("answered");
    assert!(
        calls[1].at_ms >= refused_at + 1000,
        "retry at {} ms, 429 answered at {refused_at} ms",
        calls[1].at_ms
    );
    sim.stop().await;
}

#[tokio::test]
async fn counted_500_and_503_fire_then_stop_and_503_can_carry_retry_after() {
    let sim = spawn_sim_with(|o| {
        o.faults.count_500 = 2;
        o.faults.count_503 = 1;
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(
            post(&sim, "track-event", json!({"id": "u1", "event": "E"}))
                .await
                .0,
        );
    }
    assert_eq!(
        statuses,
        vec![503, 500, 500, 200],
        "503 takes precedence over 500"
    );
    assert_eq!(sim.state().snapshot().events_total, 1);

    let (status, _) = set_faults(
        &sim,
        json!({"count_503": 1, "retry_after_on_503": true, "retry_after_secs": 4}),
    )
    .await;
    assert_eq!(status, 200);
    let response = client()
        .get(format!("{}/account", sim.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 503);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("4")
    );
    sim.stop().await;
}

#[tokio::test]
async fn rate_faults_follow_their_probability_and_the_seed() {
    let faults = json!({"rate_500": 0.3, "rate_429": 0.2, "seed": 12345});
    let sim = spawn_sim().await;
    let mut runs = Vec::new();
    for _ in 0..2 {
        assert_eq!(set_faults(&sim, faults.clone()).await.0, 200);
        let mut statuses = Vec::new();
        for _ in 0..200 {
            statuses.push(get(&sim, "").await.0);
        }
        runs.push(statuses);
    }
    assert_eq!(runs[0], runs[1], "same seed, same faults");
    let count = |code: u16| runs[0].iter().filter(|s| **s == code).count();
    assert!((40..=80).contains(&count(500)), "500s: {}", count(500));
    assert!((20..=60).contains(&count(429)), "429s: {}", count(429));
    assert_eq!(count(500) + count(429) + count(200), 200);

    set_faults(&sim, json!({"rate_503": 1.0})).await;
    for _ in 0..5 {
        assert_eq!(get(&sim, "").await.0, 503);
    }
    sim.stop().await;
}

#[tokio::test]
async fn a_dropped_connection_is_a_client_error_and_changes_nothing() {
    let sim = spawn_sim_with(|o| o.faults.count_drop = 1).await;
    let result = client()
        .post(format!("{}/identify-user", sim.url()))
        .bearer_auth(KEY)
        .json(&json!({"id": "u1"}))
        .send()
        .await;
    let error = result.expect_err("the connection is dropped");
    assert!(error.status().is_none(), "no HTTP status: {error:?}");
    // hyper's IncompleteMessage: the connection closed before a response. reqwest files it
    // under `is_request`; `is_connect` is only for failing to establish the connection.
    assert!(error.is_request(), "a request-level error: {error:?}");
    assert!(!error.is_connect());
    assert!(!error.is_timeout());
    assert!(sim.state().contact("u1").is_none());
    let call = &sim.state().calls()[0];
    assert!(call.dropped);
    assert_eq!((call.fault, call.status), (Some(Fault::Drop), None));
    assert_eq!(sim.state().call_stats().by_status.get("dropped"), Some(&1));

    assert_eq!(
        post(&sim, "identify-user", json!({"id": "u1"})).await.0,
        200
    );
    sim.stop().await;
}

#[tokio::test]
async fn drop_after_handles_the_call_then_loses_the_answer() {
    let sim = spawn_sim_with(|o| o.faults.rate_drop_after = 1.0).await;
    let result = client()
        .post(format!("{}/track-event", sim.url()))
        .bearer_auth(KEY)
        .json(&json!({"id": "u1", "event": "Paid"}))
        .send()
        .await;
    assert!(result.is_err(), "no answer: {result:?}");
    assert_eq!(
        sim.state().snapshot().events_total,
        1,
        "but the event happened"
    );
    let call = &sim.state().calls()[0];
    assert_eq!((call.fault, call.dropped), (Some(Fault::DropAfter), true));
    sim.stop().await;
}

#[tokio::test]
async fn faults_combine_in_documented_precedence_and_come_before_auth() {
    let sim = spawn_sim_with(|o| {
        o.faults.count_429 = 1;
        o.faults.count_500 = 1;
        o.faults.count_503 = 1;
        o.faults.count_drop = 1;
        o.faults.count_drop_after = 1;
    })
    .await;
    let url = format!("{}/identify-user", sim.url());
    let c = client();
    let mut outcomes = Vec::new();
    for _ in 0..6 {
        // No key at all: faults are decided before authentication.
        match c.post(&url).json(&json!({"id": "u1"})).send().await {
            Ok(response) => outcomes.push(response.status().as_u16().to_string()),
            Err(_) => outcomes.push("dropped".to_owned()),
        }
    }
    assert_eq!(
        outcomes,
        vec!["dropped", "dropped", "503", "500", "429", "401"]
    );
    let faults: Vec<_> = sim.state().calls().iter().map(|c| c.fault).collect();
    assert_eq!(
        faults,
        vec![
            Some(Fault::Drop),
            Some(Fault::DropAfter),
            Some(Fault::Unavailable),
            Some(Fault::ServerError),
            Some(Fault::TooManyRequests),
            None
        ]
    );
    sim.stop().await;
}

#[tokio::test]
async fn faults_are_controlled_over_http() {
    let sim = spawn_sim().await;
    let (status, body) = set_faults(&sim, json!({"count_500": 2, "latency_ms": 5})).await;
    assert_eq!(status, 200);
    assert_eq!(body["count_500"], 2);
    assert_eq!(body["rate_429"], 0.0, "missing fields take their defaults");
    get(&sim, "").await;
    let current = control(&sim, "faults").await;
    assert_eq!(current["count_500"], 1, "remaining count");
    assert_eq!(current["latency_ms"], 5);
    let parsed: Faults = serde_json::from_value(current).expect("faults");
    assert_eq!(parsed, sim.state().faults());

    assert_eq!(set_faults(&sim, json!({"rate_500": 2.0})).await.0, 400);
    let (status, body) = set_faults(&sim, json!({"rate_five_hundred": 0.5})).await;
    assert_eq!(status, 400, "unknown fields are refused");
    assert!(body["error"].is_string());
    assert_eq!(
        sim.state().faults().count_500,
        1,
        "refused updates change nothing"
    );

    let cleared = client()
        .post(format!("{}/_sim/faults", sim.base_url()))
        .send()
        .await
        .expect("request");
    assert_eq!(cleared.status().as_u16(), 200);
    assert_eq!(sim.state().faults(), Faults::none());
    assert_eq!(get(&sim, "").await.0, 200);

    assert!(sim
        .state()
        .set_faults(Faults {
            rate_drop: -0.1,
            ..Faults::none()
        })
        .is_err());
    sim.stop().await;
}

#[tokio::test]
async fn spawn_refuses_invalid_faults() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut options = SimOptions::with_key(KEY);
    options.faults.rate_503 = 1.5;
    let error = sim::spawn(listener, options).await.expect_err("refused");
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
}

// ---------------------------------------------------------------------------------------
// The binary

#[tokio::test]
async fn the_binary_serves_faults_from_flags_and_stops_on_sigterm() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let mut child = Command::new(env!("CARGO_BIN_EXE_refiner-sim"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--api-key",
            KEY,
            "--count-503",
            "1",
            "--workers",
            "1",
            "--segment",
            "Power Users=seg-flag",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("refiner-sim starts");
    let stdout = child.stdout.take().expect("stdout");
    let url = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .map(|_| line)
    })
    .await
    .expect("join")
    .expect("first line");
    let url = url.trim().to_owned();
    assert!(
        url.starts_with("http://127.0.0.1:") && url.ends_with("/v1"),
        "{url}"
    );

    let c = client();
    let first = c.get(&url).bearer_auth(KEY).send().await.expect("request");
    let second = c.get(&url).bearer_auth(KEY).send().await.expect("request");
    let wrong = c
        .get(&url)
        .bearer_auth("nope")
        .send()
        .await
        .expect("request");
    assert_eq!(
        [
            first.status().as_u16(),
            second.status().as_u16(),
            wrong.status().as_u16()
        ],
        [503, 200, 401]
    );
    let segments: Value = c
        .get(format!("{url}/segments"))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("request")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        segments["items"],
        json!([{"uuid": "seg-flag", "name": "Power Users", "is_manual": true}])
    );

    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "refiner-sim did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_binary_documents_its_flags_and_refuses_bad_rates() {
    use std::process::Command;
    let help = Command::new(env!("CARGO_BIN_EXE_refiner-sim"))
        .arg("--help")
        .output()
        .expect("refiner-sim --help");
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--listen",
        "--api-key",
        "--latency-ms",
        "--rate-429",
        "--retry-after",
        "--rate-500",
        "--rate-503",
        "--rate-drop",
        "--count-503",
        "--seed",
        "--segment",
    ] {
        assert!(text.contains(flag), "--help mentions {flag}");
    }
    let bad = Command::new(env!("CARGO_BIN_EXE_refiner-sim"))
        .args(["--rate-500", "1.5"])
        .output()
        .expect("refiner-sim --rate-500 1.5");
    assert_eq!(bad.status.code(), Some(2));
}

// ---------------------------------------------------------------------------------------
// Segments and sync-segment

#[tokio::test]
async fn segments_are_listed_by_name_and_manual_ones_take_members() {
    let sim = spawn_sim_with(|options| {
        options.segments = vec![
            sim::SegmentSpec::parse("Power Users=seg-power").expect("spec"),
            sim::SegmentSpec {
                name: "Signed Up 30 Days Ago".into(),
                uuid: Some("seg-auto".into()),
                is_manual: false,
            },
        ];
    })
    .await;
    // Defined over the control route, as an operator would in Refiner's dashboard.
    let response = client()
        .post(format!("{}/_sim/segments", sim.base_url()))
        .json(&json!({"name": "Beta", "uuid": "seg-beta"}))
        .send()
        .await
        .expect("control request");
    assert_eq!(answer(response).await.0, 200);
    let (status, page) = get(&sim, "segments?page_length=2").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|s| s["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["Beta", "Power Users"]);
    assert_eq!(page["pagination"]["last_page"], json!(2));
    let (_, second) = get(&sim, "segments?page=2&page_length=2").await;
    assert_eq!(second["items"][0]["is_manual"], json!(false));

    // Joining creates the contact; joining twice is one membership; leaving removes it.
    let (status, body) = post(
        &sim,
        "sync-segment",
        json!({"id": "u1", "segment_uuid": "seg-power"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["segment_uid"], json!("seg-power"));
    assert!(sim.state().contact("u1").is_some(), "a new user is created");
    post(
        &sim,
        "sync-segment",
        json!({"id": "u1", "segment_uuid": "seg-power"}),
    )
    .await;
    post(
        &sim,
        "sync-segment",
        json!({"email": "b@example.com", "segment_uuid": "seg-power"}),
    )
    .await;
    let members = |state: &StateSnapshot, uuid: &str| {
        state
            .segments
            .iter()
            .find(|s| s.uuid == uuid)
            .map(|s| s.members.clone())
            .expect("segment")
    };
    assert_eq!(
        members(&sim.state().snapshot(), "seg-power"),
        ["u1", "b@example.com"]
    );
    let response = client()
        .delete(format!("{}/sync-segment", sim.url()))
        .bearer_auth(KEY)
        .json(&json!({"id": "u1", "segment_uuid": "seg-power"}))
        .send()
        .await
        .expect("request");
    assert_eq!(answer(response).await.0, 200);
    assert_eq!(
        members(&sim.state().snapshot(), "seg-power"),
        ["b@example.com"]
    );

    // Refusals change nothing.
    let (status, _) = post(
        &sim,
        "sync-segment",
        json!({"id": "u2", "segment_uuid": "nope"}),
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = post(
        &sim,
        "sync-segment",
        json!({"id": "u2", "segment_uuid": "seg-auto"}),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = post(&sim, "sync-segment", json!({"id": "u2"})).await;
    assert_eq!(status, 400);
    assert!(
        sim.state().contact("u2").is_none(),
        "a refused call creates no contact"
    );

    // A deleted contact leaves its segments; a reset keeps the segments given at start only.
    let response = client()
        .delete(format!("{}/contact?email=b@example.com", sim.url()))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("request");
    assert_eq!(answer(response).await.0, 200);
    assert!(members(&sim.state().snapshot(), "seg-power").is_empty());
    sim.state().reset();
    let uuids: Vec<String> = sim
        .state()
        .snapshot()
        .segments
        .into_iter()
        .map(|s| s.uuid)
        .collect();
    assert_eq!(uuids, ["seg-auto", "seg-power"]);
    sim.stop().await;
}
