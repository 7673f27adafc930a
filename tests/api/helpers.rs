//! `spawn_app` and friends: a real gateway on port 0 with its own temporary data dir.

#![allow(dead_code)]

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::ServerHandle;
use refiner_gateway::config::{Secret, Settings, SourceSettings};
use refiner_gateway::spool::{Leased, Spool};
use refiner_gateway::startup::Application;
use serde_json::{json, Value};

pub const WRITE_KEY: &str = "test-write-key";
pub const OTHER_KEY: &str = "other-write-key";
pub const WEBHOOK_SECRET: &str = "test-webhook-secret";

/// A running gateway.
pub struct TestApp {
    pub address: String,
    pub port: u16,
    pub client: reqwest::Client,
    pub spool: Arc<dyn Spool>,
    pub handle: ServerHandle,
    pub data_dir: tempfile::TempDir,
    pub settings: Settings,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Settings for tests: sources `default` (write key [`WRITE_KEY`]), `hooked` (write key
/// [`OTHER_KEY`], webhook secret [`WEBHOOK_SECRET`]). Delivery is off, so what ingest
/// queued stays in the spool for the test to inspect; delivery tests turn it on.
pub fn test_settings(data_dir: &std::path::Path) -> Settings {
    Settings {
        delivery: refiner_gateway::config::DeliverySettings {
            enabled: false,
            ..Default::default()
        },
        listen: "127.0.0.1:0".into(),
        data_dir: data_dir.to_path_buf(),
        sources: vec![
            SourceSettings {
                slug: "default".into(),
                write_keys: vec![Secret::new(WRITE_KEY)],
                webhook_secret: None,
                refiner_api_key: Some(Secret::new("refiner-key")),
                webhook_format: Default::default(),
            },
            SourceSettings {
                slug: "hooked".into(),
                write_keys: vec![Secret::new(OTHER_KEY)],
                webhook_secret: Some(Secret::new(WEBHOOK_SECRET)),
                refiner_api_key: Some(Secret::new("refiner-key-2")),
                webhook_format: Default::default(),
            },
        ],
        ..Settings::default()
    }
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Spawns a gateway whose settings `customize` may change (its data dir is fresh).
pub async fn spawn_app_with(customize: impl FnOnce(&mut Settings)) -> TestApp {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut settings = test_settings(data_dir.path());
    customize(&mut settings);
    spawn_app_in(data_dir, settings).await
}

/// Spawns a gateway on an existing data dir with the given settings.
pub async fn spawn_app_in(data_dir: tempfile::TempDir, settings: Settings) -> TestApp {
    spawn_with_config_file(data_dir, settings, None).await
}

/// Spawns a gateway; a reload reads `file` again.
async fn spawn_with_config_file(
    data_dir: tempfile::TempDir,
    settings: Settings,
    file: Option<std::path::PathBuf>,
) -> TestApp {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = Application::build_with_listener(&settings, listener)
        .await
        .expect("build app")
        .with_config_file(file);
    let port = app.port();
    let spool = app.spool();
    let handle = app.handle();
    let task = tokio::spawn(app.run_until_stopped());
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        port,
        client: reqwest::Client::new(),
        spool,
        handle,
        data_dir,
        settings,
        task,
    }
}

impl TestApp {
    /// Stops the server gracefully, closes the spool and hands back the data dir.
    pub async fn stop(self) -> (tempfile::TempDir, Settings) {
        self.handle.stop(true).await;
        let _ = self.task.await;
        (self.data_dir, self.settings)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// POST with `Authorization: Basic base64(WRITE_KEY:)`.
    pub async fn post_basic(&self, path: &str, body: &str) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("Authorization", basic(WRITE_KEY))
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("request")
    }

    /// POST without any auth header.
    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .body(body)
            .send()
            .await
            .expect("request")
    }

    /// Every queued event, in queue order (leases them; fine for inspection).
    pub async fn spooled(&self) -> Vec<Leased> {
        spooled_events(&self.spool).await
    }

    /// The `messageId`s of every queued event, in queue order (see [`TestApp::spooled`]).
    pub async fn spooled_ids(&self) -> Vec<String> {
        self.spooled()
            .await
            .into_iter()
            .map(|e| e.message_id)
            .collect()
    }
}

/// Posts events as one `/v1/batch` of the `default` source and expects 200 (the body is
/// shown otherwise).
pub async fn send_batch(app: &TestApp, events: &[Value]) {
    let response = app
        .client
        .post(app.url("/v1/batch"))
        .header("Authorization", basic(WRITE_KEY))
        .json(&json!({ "batch": events }))
        .send()
        .await
        .expect("POST /v1/batch");
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, 200, "POST /v1/batch answered {status}: {body}");
}

/// Every event queued in a spool, by leasing all of them (a user's later events are leased
/// once the earlier ones are acked, so this acks as it goes).
pub async fn spooled_events(spool: &Arc<dyn Spool>) -> Vec<Leased> {
    let mut all = Vec::new();
    loop {
        let batch = spool.lease(10_000, 60_000).await.expect("lease");
        if batch.is_empty() {
            break;
        }
        spool
            .ack(batch.iter().map(|e| e.seq).collect())
            .await
            .expect("ack");
        all.extend(batch);
    }
    all.sort_by_key(|e| e.seq);
    all
}

pub use crate::common::basic;

pub fn payload(event: &Leased) -> serde_json::Value {
    serde_json::from_slice(&event.payload).expect("payload is JSON")
}

/// The value of an unlabelled metric in `GET /metrics` (0 when it is not there).
pub async fn unlabelled_metric(app: &TestApp, name: &str) -> f64 {
    let text = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .filter_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map(|value| value.trim().parse().expect("metric value"))
        .next()
        .unwrap_or(0.0)
}

/// Spawns a gateway whose settings were loaded from `file`, which a reload (SIGHUP,
/// `POST /api/reload`) reads again.
pub async fn spawn_app_from_file(data_dir: tempfile::TempDir, file: &std::path::Path) -> TestApp {
    let settings = Settings::load_with(Some(file), |_| None).expect("the test configuration");
    spawn_with_config_file(data_dir, settings, Some(file.to_path_buf())).await
}
