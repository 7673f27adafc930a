//! Operator mistakes the gateway refuses or prevents: a second process on a data directory,
//! spool files other users can read, an open `/metrics` where it should not be, and short
//! secrets.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use refiner_gateway::config::Secret;
use refiner_gateway::datadir::DataDirError;
use refiner_gateway::sim::{self, SimOptions};
use refiner_gateway::startup::{Application, StartError};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use crate::helpers::{basic, spawn_app_in, spawn_app_with, WRITE_KEY};

const BINARY: &str = env!("CARGO_BIN_EXE_refiner-gateway");
const KEY: &str = "wk-operator-safety";

// ---------------------------------------------------------------------------------------
// One process per data directory

#[tokio::test]
async fn a_second_application_on_a_data_dir_is_refused_until_the_first_stops() {
    let app = spawn_app_with(|_| {}).await;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let second = Application::build_with_listener(&app.settings, listener).await;
    match second {
        Err(StartError::DataDir(DataDirError::Locked { dir, holder })) => {
            assert_eq!(dir, app.data_dir.path());
            assert_eq!(holder, Some(std::process::id()));
        }
        Err(other) => panic!("unexpected error: {other}"),
        Ok(_) => panic!("a second application started on a locked data dir"),
    }
    // The first one is untouched and still accepts events.
    let response = app
        .post_basic("/v1/track", r#"{"userId":"u1","event":"E"}"#)
        .await;
    assert_eq!(response.status(), 200);
    // Stopped, it releases the directory: a restart on it works.
    let (dir, settings) = app.stop().await;
    let app = spawn_app_in(dir, settings).await;
    assert_eq!(app.spooled().await.len(), 1);
    app.stop().await;
}

/// A `serve` process configured by the environment (and `config`, if given); its stdout
/// (JSON logs) goes to a file.
fn serve(data_dir: &Path, log: &Path, extra: &[(&str, &str)]) -> Child {
    serve_with(None, data_dir, log, extra)
}

fn serve_with(config: Option<&Path>, data_dir: &Path, log: &Path, extra: &[(&str, &str)]) -> Child {
    let mut command = Command::new(BINARY);
    command.arg("serve");
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GATEWAY_LOG_FORMAT", "json")
        .env("GATEWAY_LISTEN", "127.0.0.1:0")
        .env("GATEWAY_DATA_DIR", data_dir)
        .env("GATEWAY_WRITE_KEYS", KEY)
        .env("GATEWAY_DELIVERY_ENABLED", "false");
    for (name, value) in extra {
        command.env(name, value);
    }
    command
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(log).expect("log file"))
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the gateway")
}

/// The port of the `gateway listening` line, once the process logged it.
async fn listening_port(log: &Path) -> u16 {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let port = text
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .find(|line| line["message"] == "gateway listening")
            .and_then(|line| line["port"].as_u64());
        if let Some(port) = port {
            return port as u16;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the gateway did not start: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn track(port: u16, id: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/v1/track"))
        .header("Authorization", basic(KEY))
        .json(&json!({"userId": "u1", "event": "E", "messageId": id}))
        .send()
        .await
        .expect("POST /v1/track")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_a_locked_data_dir_exits_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let mut first = serve(&data_dir, &dir.path().join("first.log"), &[]);
    let port = listening_port(&dir.path().join("first.log")).await;
    let first_pid = first.id().expect("pid");

    let second = serve(&data_dir, &dir.path().join("second.log"), &[]);
    let output = tokio::time::timeout(Duration::from_secs(30), second.wait_with_output())
        .await
        .expect("the second process exits at once")
        .expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "the data directory {} is in use by another gateway process (pid {first_pid})",
            data_dir.display()
        )),
        "{stderr}"
    );
    let second_log = std::fs::read_to_string(dir.path().join("second.log")).unwrap_or_default();
    assert!(!second_log.contains("gateway listening"), "{second_log}");
    assert_eq!(track(port, "m-1").await, 200, "the first one still serves");

    // A killed holder leaves no stale lock: the kernel drops it with the process.
    first.start_kill().expect("SIGKILL");
    first.wait().await.expect("wait");
    let mut third = serve(&data_dir, &dir.path().join("third.log"), &[]);
    let port = listening_port(&dir.path().join("third.log")).await;
    assert_eq!(track(port, "m-2").await, 200);
    third.start_kill().expect("SIGKILL");
    third.wait().await.expect("wait");
}

// ---------------------------------------------------------------------------------------
// Private files

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn files_in(dir: &Path, extension: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == extension))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_and_every_file_in_it_are_private() {
    let sim = sim::spawn(
        TcpListener::bind("127.0.0.1:0").expect("bind"),
        SimOptions::with_key("refiner-key"),
    )
    .await
    .expect("simulator");
    let dir = tempfile::tempdir().expect("temp dir");
    // The parent is open to everyone, as /var/lib or a volume's root may be.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let data_dir = dir.path().join("data");
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, "[spool]\ndedup_flush_ids = 4\n").expect("config");
    let log = dir.path().join("gateway.log");
    let mut child = serve_with(
        Some(&config),
        &data_dir,
        &log,
        &[
            ("GATEWAY_DELIVERY_ENABLED", "true"),
            ("REFINER_BASE_URL", &sim.url()),
            ("REFINER_API_KEY", "refiner-key"),
        ],
    );
    let port = listening_port(&log).await;
    for i in 0..12 {
        assert_eq!(track(port, &format!("m-{i}")).await, 200);
    }
    // Runs are written in the background; the journal holds Refiner's answers.
    let started = Instant::now();
    while files_in(&data_dir.join("dedup"), "dat").is_empty() || sim.state().call_stats().total < 12
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no run file, or no delivery"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(mode(&data_dir), 0o700);
    for sub in ["dedup", "delivered"] {
        assert_eq!(mode(&data_dir.join(sub)), 0o700, "{sub}/");
    }
    let mut files: Vec<PathBuf> = ["LOCK", "spool.db", "spool.db-wal", "spool.db-shm"]
        .iter()
        .map(|name| data_dir.join(name))
        .collect();
    files.extend(files_in(&data_dir.join("dedup"), "dat"));
    files.extend(files_in(&data_dir.join("delivered"), "journal"));
    assert!(files.len() >= 6, "{files:?}");
    for file in &files {
        assert_eq!(mode(file), 0o600, "{}", file.display());
    }
    child.start_kill().expect("SIGKILL");
    child.wait().await.expect("wait");
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------
// /metrics behind a token

#[tokio::test]
async fn metrics_requires_the_token_once_one_is_set() {
    const TOKEN: &str = "metrics-token-0123456789";
    let app = spawn_app_with(|s| s.metrics_token = Some(Secret::new(TOKEN))).await;
    let get = |auth: Option<String>| {
        let mut request = app.client.get(app.url("/metrics"));
        if let Some(auth) = auth {
            request = request.header("Authorization", auth);
        }
        request.send()
    };
    for refused in [
        None,
        Some("Bearer wrong-token-0123456789".to_string()),
        Some(format!("Bearer {TOKEN}x")),
        Some(basic(TOKEN)),
        Some(TOKEN.to_string()),
    ] {
        let response = get(refused.clone()).await.expect("GET /metrics");
        assert_eq!(response.status(), 401, "{refused:?}");
        assert_eq!(
            response
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok()),
            Some("Bearer realm=\"metrics\"")
        );
        let body: Value = response.json().await.expect("JSON");
        assert_eq!(body["code"], json!("unauthorized"), "{body}");
        assert!(!body.to_string().contains("gateway_"), "{body}");
    }
    let response = get(Some(format!("Bearer {TOKEN}")))
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("body");
    assert!(text.contains("gateway_build_info"), "{text}");
    // The probes stay open.
    for probe in ["/healthz", "/readyz"] {
        let response = app.client.get(app.url(probe)).send().await.expect(probe);
        assert_eq!(response.status(), 200, "{probe}");
    }
    app.stop().await;

    let open = spawn_app_with(|_| {}).await;
    let response = open
        .client
        .get(open.url("/metrics"))
        .send()
        .await
        .expect("GET /metrics");
    assert_eq!(response.status(), 200, "without a token /metrics is open");
    open.stop().await;
}

// ---------------------------------------------------------------------------------------
// Short secrets

async fn check_config(vars: &[(&str, &str)]) -> (i32, String) {
    let mut command = Command::new(BINARY);
    command
        .arg("check-config")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GATEWAY_WRITE_KEYS", WRITE_KEY)
        .env("REFINER_API_KEY", "refiner-key");
    for (name, value) in vars {
        command.env(name, value);
    }
    let output = command.output().await.expect("run check-config");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_and_serve_refuse_short_secrets_by_name() {
    for (variable, key) in [
        ("GATEWAY_ADMIN_TOKEN", "admin_token (GATEWAY_ADMIN_TOKEN)"),
        (
            "GATEWAY_METRICS_TOKEN",
            "metrics_token (GATEWAY_METRICS_TOKEN)",
        ),
        (
            "GATEWAY_WEBHOOK_SECRET",
            "sources[default].webhook_secret (GATEWAY_WEBHOOK_SECRET)",
        ),
    ] {
        let (code, stderr) = check_config(&[(variable, "fifteen-chars-x")]).await;
        assert_eq!(code, 2, "{variable}: {stderr}");
        assert!(stderr.contains(key), "{stderr}");
        assert!(stderr.contains("at least 16"), "{stderr}");
        let (code, stderr) = check_config(&[(variable, "sixteen-chars-xy")]).await;
        assert_eq!(code, 0, "{variable}: {stderr}");
    }
    // `serve` loads the same way and stops before touching the data directory.
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let child = serve(
        &data_dir,
        &dir.path().join("gateway.log"),
        &[("GATEWAY_ADMIN_TOKEN", "short")],
    );
    let output = child.wait_with_output().await.expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("admin_token (GATEWAY_ADMIN_TOKEN)"),
        "{stderr}"
    );
    assert!(!data_dir.exists());
}
