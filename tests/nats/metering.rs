//! Usage and hourly counters on the JetStream spool: the metering conformance suite, two
//! nodes counting one source, a restart, and every management API route over HTTP.

use std::net::TcpListener;
use std::sync::Arc;

use refiner_gateway::config::{DeliverySettings, Secret, Settings, SourceSettings, SpoolBackend};
use refiner_gateway::segment::EventType;
use refiner_gateway::spool::conformance::{event, request};
use refiner_gateway::spool::{metering_conformance, Backend, NatsSpool, Spool};
use refiner_gateway::startup::Application;
use refiner_gateway::telemetry::Metrics;
use serde_json::json;

use super::{deps, options, NatsServer};

async fn node(server: &NatsServer, name: &str) -> Backend {
    let mut options = options(server);
    options.node_name = name.into();
    Backend::nats(
        NatsSpool::open(options, Metrics::new())
            .await
            .expect("open the NATS spool"),
    )
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[tokio::test]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn usage_and_counters_follow_appends_and_settlements() {
    let Some(server) = deps::nats("usage_and_counters_follow_appends", NatsServer::start) else {
        return;
    };
    metering_conformance::usage_and_counters_follow_appends_and_settlements(
        node(&server, "one").await,
    )
    .await;
}

/// Appends `requests` requests of 10 events of users `first..first + users` (one page view
/// per request), with ids `<prefix>-<n>`, all at once.
async fn load(spool: &Arc<dyn Spool>, prefix: &str, requests: usize, first: usize, users: usize) {
    let now = now_ms();
    let appends = (0..requests).map(|r| {
        let events = (0..10)
            .map(|i| {
                let n = r * 10 + i;
                let mut e = event(
                    &format!("{prefix}-{n}"),
                    &format!("u:{}", first + n % users),
                );
                if i == 0 {
                    e.kind = EventType::Page;
                }
                e
            })
            .collect();
        let spool = spool.clone();
        async move { spool.append(request("shop", now, events)).await }
    });
    for report in futures_util::future::join_all(appends).await {
        assert_eq!(report.expect("append").queued, 10);
    }
}

/// Two nodes count one source at the same time: neither overwrites the other's counts
/// (compare-and-set merges), the users they share count once, and the totals survive both
/// nodes' restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn two_nodes_count_one_source_and_the_counts_survive_a_restart() {
    let Some(server) = deps::nats("two_nodes_count_one_source", NatsServer::start) else {
        return;
    };
    let (a, b) = (node(&server, "a").await, node(&server, "b").await);
    // Users 0..60 on a, 40..100 on b: 100 distinct, 20 shared.
    tokio::join!(
        load(&a.queue, "a", 30, 0, 60),
        load(&b.queue, "b", 30, 40, 60)
    );
    let now = now_ms();
    for backend in [&a, &b] {
        let usage = backend
            .metering
            .as_ref()
            .expect("metering")
            .usage("shop", now)
            .await
            .expect("usage");
        // The other node's last increments may still be in its memory (flushed every
        // second); reading on a node merges its own first.
        assert!(usage.mte >= 300 && usage.mte <= 600, "{usage:?}");
    }
    a.queue.close().await;
    b.queue.close().await;

    let c = node(&server, "c").await;
    let metering = c.metering.clone().expect("metering");
    let usage = metering.usage("shop", now).await.expect("usage");
    assert_eq!(
        (usage.mte, usage.mpv, usage.mtu),
        (600, 60, 100),
        "{usage:?}"
    );
    assert_eq!(usage.backlog, 600, "{usage:?}");
    let hour = now.div_euclid(3_600_000);
    let received: u64 = metering
        .counters("shop", hour - 1, hour + 2)
        .await
        .expect("counters")
        .iter()
        .filter(|r| r.name == "received")
        .map(|r| r.value)
        .sum();
    assert_eq!(received, 600);
    c.queue.close().await;
}

const ADMIN: &str = "nats-admin-token";
const WRITE_KEY: &str = "nats-write-key";

/// Every route of the management API answers on this backend (none with 501), the event
/// lookup too with the delivery log turned off, and usage and the metrics table count what
/// was ingested over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn no_management_route_answers_501() {
    let Some(server) = deps::nats("no_management_route_answers_501", NatsServer::start) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = Settings {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.path().to_path_buf(),
        admin_token: Some(Secret::new(ADMIN)),
        sources: vec![SourceSettings {
            slug: "default".into(),
            write_keys: vec![Secret::new(WRITE_KEY)],
            webhook_secret: None,
            refiner_api_key: Some(Secret::new("k")),
            webhook_format: Default::default(),
        }],
        delivery: DeliverySettings {
            enabled: false,
            ..DeliverySettings::default()
        },
        ..Settings::default()
    };
    settings.spool.backend = SpoolBackend::Nats;
    settings.nats.url = server.url();
    settings.nats.partitions = 8;
    settings.delivery_log.enabled = false;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = Application::build_with_listener(&settings, listener)
        .await
        .expect("build the gateway");
    let address = format!("http://127.0.0.1:{}", app.port());
    let handle = app.handle();
    let task = tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::new();
    let batch: Vec<serde_json::Value> = (0..7)
        .map(|i| {
            json!({"type": if i < 2 { "page" } else { "track" }, "event": "e", "name": "p",
                   "userId": format!("user-{}", i % 3), "messageId": format!("http-{i}")})
        })
        .collect();
    let ingest = client
        .post(format!("{address}/v1/batch"))
        .basic_auth(WRITE_KEY, Some(""))
        .json(&json!({ "batch": batch }))
        .send()
        .await
        .expect("ingest");
    assert_eq!(ingest.status(), 200);

    let dead = "/api/events/default/dead-letters";
    let routes = [
        ("GET", "/api".to_owned(), None),
        ("GET", dead.to_owned(), None),
        ("GET", format!("{dead}/1"), None),
        ("DELETE", format!("{dead}/1"), None),
        (
            "POST",
            format!("{dead}/replay"),
            Some(json!({ "ids": [1] })),
        ),
        ("DELETE", dead.to_owned(), None),
        ("GET", "/api/profile/default".to_owned(), None),
        ("GET", "/api/metrics/default/events".to_owned(), None),
        (
            "GET",
            "/api/events/default?message_id=http-1".to_owned(),
            None,
        ),
        ("GET", "/api/overview".to_owned(), None),
    ];
    for (method, path, body) in routes {
        let mut call = client
            .request(method.parse().expect("method"), format!("{address}{path}"))
            .bearer_auth(ADMIN);
        if let Some(body) = body {
            call = call.json(&body);
        }
        let status = call.send().await.expect("request").status().as_u16();
        assert!(
            status != 501 && status < 500,
            "{method} {path} answered {status}"
        );
    }
    let get = |path: &str| {
        let request = client.get(format!("{address}{path}")).bearer_auth(ADMIN);
        async move {
            let response = request.send().await.expect("request");
            assert_eq!(response.status(), 200);
            response.json::<serde_json::Value>().await.expect("JSON")
        }
    };
    let profile = get("/api/profile/default").await;
    let usage = &profile["usage"];
    assert_eq!(
        (
            &usage["mte_count"],
            &usage["mpv_count"],
            &usage["mtu_count"]
        ),
        (&json!(7), &json!(2), &json!(3)),
        "{profile}"
    );
    assert_eq!(profile["backlog"]["events"], 7, "{profile}");
    assert!(profile["created_at"].is_string(), "{profile}");
    let table = get("/api/metrics/default/events?period=hour").await;
    let received: u64 = table["table"]
        .as_array()
        .expect("table")
        .iter()
        .filter(|row| row["key"] == "received")
        .flat_map(|row| row["values"].as_array().cloned().unwrap_or_default())
        .map(|value| value[1].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(received, 7, "{table}");
    handle.stop(true).await;
    let _ = task.await;
}
