//! Segment Engage end to end: audience, journey-step and computed-trait payloads as Segment
//! sends them, through the gateway, into the Refiner simulator on 127.0.0.1: contact and
//! account attributes, manual-segment membership through `/sync-segment`, in each user's
//! order, and a missing segment visible in the metrics and the management API.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::Duration;

use refiner_gateway::config::Secret;
use refiner_gateway::sim::{self, SegmentSpec, SimHandle, SimOptions, StateSnapshot};
use serde_json::{json, Value};

use crate::delivery::{metric, spawn_delivering, wait_drained, wait_for, DEFAULT_KEY};
use crate::helpers::{basic, TestApp, WRITE_KEY};

const ADMIN: &str = "engage-admin-token-0123456789";
const LIMIT: Duration = Duration::from_secs(20);

async fn start_sim(segments: Vec<SegmentSpec>) -> SimHandle {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    let options = SimOptions {
        api_keys: vec![DEFAULT_KEY.to_string()],
        workers: Some(2),
        segments,
        ..SimOptions::default()
    };
    sim::spawn(listener, options)
        .await
        .expect("the simulator starts")
}

fn personas(class: &str, key: &str) -> Value {
    json!({
        "computation_class": class,
        "computation_key": key,
        "computation_id": format!("id_{key}"),
        "space_id": "spa_test",
        "namespace": "spa_test"
    })
}

/// An identify-shaped Engage call: `traits: {<key>: value}`.
fn identify(user: &str, class: &str, key: &str, value: Value) -> Value {
    json!({
        "type": "identify",
        "userId": user,
        "traits": { key: value },
        "context": { "personas": personas(class, key) }
    })
}

/// A track-shaped audience call: `Audience Entered` / `Audience Exited`.
fn audience_track(user: &str, key: &str, member: bool) -> Value {
    let event = if member {
        "Audience Entered"
    } else {
        "Audience Exited"
    };
    json!({
        "type": "track",
        "userId": user,
        "event": event,
        "properties": { "audience_key": key, key: member },
        "context": { "personas": personas("audience", key) }
    })
}

/// Sends events one request each, in order, and expects 200 for each.
async fn send(app: &TestApp, events: &[Value]) {
    for event in events {
        let response = app
            .client
            .post(app.url("/v1/batch"))
            .header("Authorization", basic(WRITE_KEY))
            .json(&json!({ "batch": [event] }))
            .send()
            .await
            .expect("POST /v1/batch");
        assert_eq!(response.status(), 200, "{event}");
    }
}

fn contact_attributes(state: &StateSnapshot, id: &str) -> serde_json::Map<String, Value> {
    state
        .contacts
        .iter()
        .find(|c| c.remote_id.as_deref() == Some(id))
        .map(|c| c.attributes.clone())
        .unwrap_or_else(|| panic!("no contact {id}: {state:?}"))
}

fn members(state: &StateSnapshot, uuid: &str) -> Vec<String> {
    state
        .segments
        .iter()
        .find(|s| s.uuid == uuid)
        .map(|s| s.members.clone())
        .unwrap_or_else(|| panic!("no segment {uuid}: {:?}", state.segments))
}

/// `(method, user)` of every sync-segment call of the simulator, in order of receipt.
fn sync_calls(sim: &SimHandle, segment: &str) -> Vec<(String, String)> {
    sim.state()
        .calls()
        .into_iter()
        .filter(|c| c.path == "/v1/sync-segment" && c.params["segment_uuid"] == json!(segment))
        .map(|c| (c.method, c.user.unwrap_or_default()))
        .collect()
}

#[tokio::test]
async fn engage_audiences_journeys_and_computed_traits_reach_refiner() {
    let sim = start_sim(vec![
        SegmentSpec::parse("Power Users=seg-power").expect("spec"),
        SegmentSpec::parse("VIP customers=seg-vip").expect("spec"),
    ])
    .await;
    // A segment created while the simulator runs, as an operator would in Refiner.
    let created: Value = reqwest::Client::new()
        .post(format!("{}/_sim/segments", sim.base_url()))
        .json(&json!({"name": "onboarding__step_2"}))
        .send()
        .await
        .expect("POST /_sim/segments")
        .json()
        .await
        .expect("JSON");
    let journey_segment = created["uuid"].as_str().expect("uuid").to_string();
    let app = spawn_delivering(&sim, |settings| {
        settings.admin_token = Some(Secret::new(ADMIN));
        settings.engage.sync_segments = true;
        // Named in the configuration: no lookup by name (the names differ).
        settings.engage.segments = BTreeMap::from([("vip".into(), "seg-vip".into())]);
    })
    .await;

    send(
        &app,
        &[
            // u1: identify-shaped enter, track-shaped exit, track-shaped re-enter.
            identify("u1", "audience", "power_users", json!(true)),
            audience_track("u1", "power_users", false),
            audience_track("u1", "power_users", true),
            // u2: enter then exit a configured segment.
            audience_track("u2", "vip", true),
            audience_track("u2", "vip", false),
            // u3: a journey step and computed traits, both shapes.
            identify("u3", "journey_step", "onboarding__step_2", json!(true)),
            json!({
                "type": "track", "userId": "u3", "event": "Trait Computed",
                "properties": {"trait_key": "orders_90d", "orders_90d": 7},
                "context": {"personas": personas("trait", "orders_90d")}
            }),
            identify("u3", "trait", "ltv", json!(120)),
            // u4: an account audience, and an audience without a Refiner segment.
            json!({
                "type": "group", "userId": "u4", "groupId": "acme",
                "traits": {"enterprise_accounts": true},
                "context": {"personas": personas("audience", "enterprise_accounts")}
            }),
            audience_track("u4", "trial_users", true),
        ],
    )
    .await;
    wait_drained(&app, LIMIT).await;
    let state = sim.state().snapshot();

    // Attributes: what Refiner keeps of every shape.
    let u1 = contact_attributes(&state, "u1");
    assert_eq!(u1.get("power_users"), Some(&json!(true)), "{u1:?}");
    let u2 = contact_attributes(&state, "u2");
    assert_eq!(u2.get("vip"), Some(&json!(false)), "{u2:?}");
    let u3 = contact_attributes(&state, "u3");
    assert_eq!(u3.get("onboarding__step_2"), Some(&json!(true)), "{u3:?}");
    assert_eq!(u3.get("orders_90d"), Some(&json!(7)), "{u3:?}");
    assert_eq!(u3.get("ltv"), Some(&json!(120)), "{u3:?}");
    let u4 = contact_attributes(&state, "u4");
    assert_eq!(u4.get("trial_users"), Some(&json!(true)), "{u4:?}");
    assert!(
        !u4.contains_key("enterprise_accounts"),
        "account audience on the contact"
    );
    let acme = state
        .accounts
        .iter()
        .find(|a| a.remote_id == "acme")
        .expect("account acme");
    assert_eq!(
        acme.attributes.get("enterprise_accounts"),
        Some(&json!(true))
    );
    // Track-shaped Engage calls are not stored as events (Refiner would drop which
    // audience or trait they were about).
    assert!(state.events.is_empty(), "{:?}", state.events);

    // Manual segments: membership as last stated, reached in each user's order.
    assert_eq!(members(&state, "seg-power"), vec!["u1"]);
    assert_eq!(
        sync_calls(&sim, "seg-power"),
        [("POST", "u1"), ("DELETE", "u1"), ("POST", "u1")]
            .map(|(m, u)| (m.to_string(), u.to_string()))
    );
    assert!(members(&state, "seg-vip").is_empty());
    assert_eq!(
        sync_calls(&sim, "seg-vip"),
        [("POST", "u2"), ("DELETE", "u2")].map(|(m, u)| (m.to_string(), u.to_string()))
    );
    assert_eq!(members(&state, &journey_segment), vec!["u3"]);
    let segment_lookups = sim
        .state()
        .calls()
        .iter()
        .filter(|c| c.path == "/v1/segments")
        .count();
    assert_eq!(segment_lookups, 1, "the segment list is cached");
    // Each attribute reached Refiner before its membership: the identify-user call of u1's
    // exit precedes its DELETE.
    let u1_calls: Vec<String> = sim
        .state()
        .calls()
        .into_iter()
        .filter(|c| c.user.as_deref() == Some("u1"))
        .map(|c| format!("{} {}", c.method, c.path))
        .collect();
    assert_eq!(
        u1_calls,
        [
            "POST /v1/identify-user",
            "POST /v1/sync-segment",
            "POST /v1/identify-user",
            "DELETE /v1/sync-segment",
            "POST /v1/identify-user",
            "POST /v1/sync-segment",
        ]
    );

    // The audience without a segment: never guessed, and visible.
    assert!(
        sync_calls(&sim, "seg-power")
            .iter()
            .chain(sync_calls(&sim, "seg-vip").iter())
            .all(|(_, user)| user != "u4"),
        "u4 synced to a segment that is not trial_users'"
    );
    let missing = metric(
        &app,
        "gateway_engage_segment_missing_total",
        &[("source", "default"), ("audience", "trial_users")],
    )
    .await;
    assert_eq!(missing, 1.0);
    let skipped = metric(
        &app,
        "gateway_dispatch_skipped_total",
        &[("source", "default"), ("reason", "segment_not_found")],
    )
    .await;
    assert_eq!(skipped, 1.0);
    let table: Value = app
        .client
        .get(app.url("/api/metrics/default/events"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .expect("GET /api/metrics")
        .json()
        .await
        .expect("JSON");
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
                    .filter_map(|v| v[1].as_u64())
                    .sum()
            })
            .unwrap_or(0)
    };
    assert_eq!(total("skipped:segment_not_found"), 1, "{table}");
    sim.stop().await;
}

#[tokio::test]
async fn without_engage_settings_memberships_are_attributes_only() {
    let sim = start_sim(vec![
        SegmentSpec::parse("power_users=seg-power").expect("spec")
    ])
    .await;
    let app = spawn_delivering(&sim, |_| {}).await;
    send(
        &app,
        &[
            audience_track("u1", "power_users", true),
            identify("u1", "audience", "churn_risk", json!(false)),
        ],
    )
    .await;
    wait_drained(&app, LIMIT).await;
    let state = sim.state().snapshot();
    let u1 = contact_attributes(&state, "u1");
    assert_eq!(u1.get("power_users"), Some(&json!(true)));
    assert_eq!(u1.get("churn_risk"), Some(&json!(false)));
    let paths: Vec<String> = sim.state().calls().into_iter().map(|c| c.path).collect();
    assert!(
        paths.iter().all(|p| p == "/v1/identify-user"),
        "no segment call without [engage]: {paths:?}"
    );
    assert!(members(&state, "seg-power").is_empty());
    sim.stop().await;
}

#[tokio::test]
async fn a_segment_created_later_is_found_once_the_list_expires() {
    let sim = start_sim(vec![]).await;
    let app = spawn_delivering(&sim, |settings| {
        settings.engage.sync_segments = true;
        settings.engage.segments_ttl_secs = 0;
    })
    .await;
    // The segment does not exist yet: the first membership is skipped as not found.
    send(&app, &[audience_track("u1", "beta", true)]).await;
    wait_drained(&app, LIMIT).await;
    assert!(sync_calls(&sim, "seg-beta").is_empty());
    // Created in Refiner: the next membership finds it (the list is not kept, TTL 0).
    sim.state()
        .define_segment(SegmentSpec::parse("beta=seg-beta").expect("spec"));
    send(&app, &[audience_track("u1", "beta", true)]).await;
    wait_for(LIMIT, "u1 joins beta", || async {
        let state = sim.state().snapshot();
        let members = members(&state, "seg-beta");
        if members == ["u1"] {
            Ok(())
        } else {
            Err(format!("{members:?}"))
        }
    })
    .await;
    sim.stop().await;
}
