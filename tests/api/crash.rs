//! The real `refiner-gateway serve` binary as a child process: a 200 means the event is on
//! disk even if the process is killed right after (SIGKILL), SIGTERM stops it cleanly, and
//! a bad setting stops start-up with one line naming the key.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use refiner_gateway::spool::{Spool, SqliteSpool, SqliteSpoolOptions};
use refiner_gateway::telemetry::Metrics;
use serde_json::json;
use tokio::process::{Child, Command};

use crate::common::free_port;
use crate::helpers::{basic, WRITE_KEY};

const BINARY: &str = env!("CARGO_BIN_EXE_refiner-gateway");

/// A command for the gateway binary with a controlled environment: every variable the
/// gateway reads is removed from the inherited environment before ours are set.
fn gateway_command(args: &[&str], env: &[(&str, &str)], cwd: &Path) -> Command {
    let mut command = Command::new(BINARY);
    command.args(args).current_dir(cwd).stdin(Stdio::null());
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

/// A gateway process serving `data_dir`.
struct Gateway {
    child: Child,
    address: String,
    stderr_path: PathBuf,
}

impl Gateway {
    /// Starts `serve` on a free port and waits until `/healthz` answers.
    async fn start(data_dir: &Path, logs: &Path) -> Gateway {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("client");
        for attempt in 0..5 {
            let port = free_port();
            let listen = format!("127.0.0.1:{port}");
            let stdout_path = logs.join(format!("stdout-{port}-{attempt}.log"));
            let stderr_path = logs.join(format!("stderr-{port}-{attempt}.log"));
            let mut command = gateway_command(
                &["serve"],
                &[
                    ("GATEWAY_WRITE_KEYS", WRITE_KEY),
                    ("REFINER_API_KEY", "test-refiner-key"),
                    ("GATEWAY_DATA_DIR", data_dir.to_str().expect("utf-8 path")),
                    ("GATEWAY_LISTEN", &listen),
                    // Nothing listens there: whatever delivers events leaves them queued.
                    ("REFINER_BASE_URL", "http://127.0.0.1:9/v1"),
                ],
                logs,
            );
            command
                .stdout(std::fs::File::create(&stdout_path).expect("stdout log"))
                .stderr(std::fs::File::create(&stderr_path).expect("stderr log"));
            let mut child = command.spawn().expect("spawn the gateway binary");
            let address = format!("http://{listen}");
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = child.try_wait().expect("try_wait") {
                    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                    if stderr.contains("cannot listen") {
                        break; // lost the port to someone else: try another one
                    }
                    panic!("the gateway exited during start-up ({status}): {stderr}");
                }
                if let Ok(response) = client.get(format!("{address}/healthz")).send().await {
                    if response.status() == 200 {
                        return Gateway {
                            child,
                            address,
                            stderr_path,
                        };
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "the gateway did not answer /healthz within 30 s"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        panic!("could not find a free port for the gateway in 5 attempts");
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("the gateway is running")
    }

    /// Sends SIGTERM and waits (at most 30 s) for the process to end.
    async fn terminate(mut self) -> std::process::ExitStatus {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        let exit = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the gateway did not stop within 30 s of SIGTERM")
            .expect("wait");
        if !exit.success() {
            let stderr = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
            panic!("the gateway exited with {exit} after SIGTERM; stderr: {stderr}");
        }
        exit
    }
}

/// Posts `ids` as one `/v1/track` (one id) or one `/v1/batch` request.
async fn send(
    client: &reqwest::Client,
    address: &str,
    ids: &[String],
    single: bool,
) -> reqwest::Result<reqwest::Response> {
    let event = |id: &String| {
        json!({
            "type": "track",
            "event": "Crash Tested",
            // One user per sender task: `crash-3-17` belongs to `crash-3`.
            "userId": id.rsplit_once('-').map_or(id.as_str(), |(user, _)| user),
            "messageId": id,
            "properties": {"id": id},
        })
    };
    let (path, body) = if single {
        let mut body = event(&ids[0]);
        body["writeKey"] = json!(WRITE_KEY);
        ("/v1/track", body)
    } else {
        let batch: Vec<_> = ids.iter().map(event).collect();
        ("/v1/batch", json!({"batch": batch}))
    };
    client
        .post(format!("{address}{path}"))
        .header("Authorization", basic(WRITE_KEY))
        .json(&body)
        .send()
        .await
}

/// Every queued `(messageId → payload)` in the spool file, read directly from disk.
fn events_on_disk(data_dir: &Path) -> Vec<(String, Vec<u8>)> {
    let connection = rusqlite::Connection::open_with_flags(
        data_dir.join("spool.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open spool.db read-only");
    let mut select = connection
        .prepare("SELECT message_id, payload FROM events ORDER BY seq")
        .expect("prepare");
    let rows = select
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .expect("query")
        .collect::<rusqlite::Result<Vec<(String, Vec<u8>)>>>()
        .expect("rows");
    rows
}

/// Checks the spool file after the gateway stopped: every acked id is there exactly once
/// with an intact payload, nothing else is, and the library opens the file and counts the
/// same queue depth.
async fn verify_spool(data_dir: &Path, acked: &HashSet<String>, sent: &HashSet<String>) {
    let rows = events_on_disk(data_dir);
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (id, payload) in &rows {
        *seen.entry(id.as_str()).or_default() += 1;
        let payload: serde_json::Value =
            serde_json::from_slice(payload).expect("a spooled payload is JSON");
        assert_eq!(payload["messageId"], json!(id), "payload of {id}");
        assert_eq!(payload["properties"]["id"], json!(id), "payload of {id}");
    }
    let duplicated: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicated.is_empty(), "queued twice: {duplicated:?}");
    let mut lost: Vec<_> = acked
        .iter()
        .filter(|id| !seen.contains_key(id.as_str()))
        .collect();
    lost.sort();
    assert!(
        lost.is_empty(),
        "{} of {} events answered 200 are not in the spool: {lost:?}",
        lost.len(),
        acked.len()
    );
    let unknown: Vec<_> = seen.keys().filter(|id| !sent.contains(**id)).collect();
    assert!(unknown.is_empty(), "never sent: {unknown:?}");

    let spool = SqliteSpool::open(SqliteSpoolOptions::new(data_dir), Metrics::new())
        .expect("the spool opens after the gateway stopped");
    let stats = spool.stats().await.expect("stats");
    assert_eq!(stats.depth, rows.len() as u64);
    spool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_event_answered_200_survives_a_sigkill() {
    const TASKS: usize = 6;
    const EVENTS_PER_TASK: usize = 50;
    const KILL_AFTER_ACKED: usize = TASKS * EVENTS_PER_TASK / 3;

    let data_dir = tempfile::tempdir().expect("data dir");
    let logs = tempfile::tempdir().expect("log dir");
    let mut gateway = Gateway::start(data_dir.path(), logs.path()).await;

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let acked = Arc::new(Mutex::new(HashSet::new()));
    let acked_count = Arc::new(AtomicUsize::new(0));
    let threshold = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (client, address) = (client.clone(), gateway.address.clone());
        let (acked, acked_count, threshold) =
            (acked.clone(), acked_count.clone(), threshold.clone());
        tasks.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            let mut unexpected = Vec::new();
            let mut next = 0;
            let mut request = 0;
            while next < EVENTS_PER_TASK {
                // Singles, small batches and bigger batches, interleaved.
                let size = [1, 3, 1, 8][request % 4].min(EVENTS_PER_TASK - next);
                let ids: Vec<String> = (next..next + size)
                    .map(|i| format!("crash-{task}-{i}"))
                    .collect();
                sent.extend(ids.iter().cloned());
                match send(&client, &address, &ids, size == 1).await {
                    Ok(response) if response.status() == 200 => {
                        acked.lock().expect("lock").extend(ids);
                        let before = acked_count.fetch_add(size, Ordering::SeqCst);
                        if before < KILL_AFTER_ACKED && before + size >= KILL_AFTER_ACKED {
                            threshold.notify_one();
                        }
                    }
                    Ok(response) => unexpected.push(response.status().as_u16()),
                    // The process is gone: this request's fate is unknown to the client.
                    Err(_) => {}
                }
                next += size;
                request += 1;
            }
            (sent, unexpected)
        }));
    }

    tokio::time::timeout(Duration::from_secs(60), threshold.notified())
        .await
        .expect("a third of the events were not acknowledged within 60 s");
    gateway.child.start_kill().expect("SIGKILL");
    let status = gateway.child.wait().await.expect("wait");
    assert!(!status.success(), "the gateway was killed, not stopped");

    let mut sent = HashSet::new();
    for task in tasks {
        let (ids, unexpected) = task.await.expect("sender task");
        assert!(unexpected.is_empty(), "non-200 answers: {unexpected:?}");
        sent.extend(ids);
    }
    let acked = std::mem::take(&mut *acked.lock().expect("lock"));
    eprintln!(
        "{} of {} events were answered 200 before SIGKILL",
        acked.len(),
        sent.len()
    );
    assert_eq!(sent.len(), TASKS * EVENTS_PER_TASK);
    assert!(acked.len() >= KILL_AFTER_ACKED);
    assert!(
        acked.len() < sent.len(),
        "every request finished before the kill; nothing was in flight"
    );

    // A new process recovers the file and keeps accepting.
    let gateway = Gateway::start(data_dir.path(), logs.path()).await;
    let after: Vec<String> = (0..5).map(|i| format!("after-restart-{i}")).collect();
    let response = send(&client, &gateway.address, &after, false)
        .await
        .expect("request after restart");
    assert_eq!(response.status(), 200);
    gateway.terminate().await;

    let mut expected = acked;
    expected.extend(after.iter().cloned());
    sent.extend(after);
    verify_spool(data_dir.path(), &expected, &sent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_stops_gracefully_and_keeps_accepted_events() {
    let data_dir = tempfile::tempdir().expect("data dir");
    let logs = tempfile::tempdir().expect("log dir");
    let gateway = Gateway::start(data_dir.path(), logs.path()).await;
    let client = reqwest::Client::new();

    let mut acked = HashSet::new();
    let mut sent = HashSet::new();
    for i in 0..10 {
        let ids = vec![format!("term-{i}")];
        sent.extend(ids.iter().cloned());
        let response = send(&client, &gateway.address, &ids, i % 2 == 0)
            .await
            .expect("request");
        assert_eq!(response.status(), 200);
        acked.extend(ids);
    }
    // More requests race the signal; whichever are answered 200 must be kept too.
    let racing: Vec<_> = (0..4)
        .map(|task| {
            let (client, address) = (client.clone(), gateway.address.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut sent = Vec::new();
                for i in 0..20 {
                    let ids = vec![format!("race-{task}-{i}"), format!("race-{task}-{i}b")];
                    sent.extend(ids.iter().cloned());
                    match send(&client, &address, &ids, false).await {
                        Ok(response) if response.status() == 200 => acked.extend(ids),
                        _ => break,
                    }
                }
                (acked, sent)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let exit = gateway.terminate().await;
    assert_eq!(exit.code(), Some(0));
    for task in racing {
        let (task_acked, task_sent) = task.await.expect("racing task");
        acked.extend(task_acked);
        sent.extend(task_sent);
    }

    // A clean stop checkpoints the write-ahead log into the database file.
    let wal = data_dir.path().join("spool.db-wal");
    let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    assert_eq!(
        wal_len, 0,
        "the WAL still holds {wal_len} bytes after SIGTERM"
    );
    verify_spool(data_dir.path(), &acked, &sent).await;
}

/// Runs the binary to completion (30 s at most) and returns its exit code and stderr.
async fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let mut env = env.to_vec();
    let data_dir_text = data_dir.to_str().expect("utf-8 path").to_string();
    env.push(("GATEWAY_DATA_DIR", &data_dir_text));
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        gateway_command(args, &env, dir.path()).output(),
    )
    .await
    .expect("the binary did not exit within 30 s")
    .expect("run the binary");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn assert_one_line_naming(stderr: &str, key: &str) {
    let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "stderr should be one line: {stderr:?}");
    assert!(
        lines[0].contains(key),
        "stderr should name {key}: {stderr:?}"
    );
}

#[tokio::test]
async fn an_invalid_listen_address_stops_start_up_with_one_line() {
    let (code, _, stderr) = run_to_exit(
        &["serve"],
        &[
            ("GATEWAY_WRITE_KEYS", WRITE_KEY),
            ("GATEWAY_LISTEN", "nonsense"),
        ],
    )
    .await;
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert_one_line_naming(&stderr, "GATEWAY_LISTEN");
    assert!(stderr.contains("nonsense"), "{stderr}");
}

#[tokio::test]
async fn missing_write_keys_stop_start_up_with_one_line() {
    let (code, _, stderr) = run_to_exit(&["serve"], &[("GATEWAY_LISTEN", "127.0.0.1:0")]).await;
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert_one_line_naming(&stderr, "GATEWAY_WRITE_KEYS");
}

#[tokio::test]
async fn serve_refuses_to_start_without_a_refiner_api_key() {
    let (code, _, stderr) = run_to_exit(
        &["serve"],
        &[
            ("GATEWAY_WRITE_KEYS", WRITE_KEY),
            ("GATEWAY_LISTEN", "127.0.0.1:0"),
        ],
    )
    .await;
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert_one_line_naming(&stderr, "REFINER_API_KEY");
}

#[tokio::test]
async fn a_taken_port_stops_start_up_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let listen = taken.local_addr().expect("address").to_string();
    let (code, _, stderr) = run_to_exit(
        &["serve"],
        &[
            ("GATEWAY_WRITE_KEYS", WRITE_KEY),
            ("REFINER_API_KEY", "test-refiner-key"),
            ("GATEWAY_LISTEN", &listen),
        ],
    )
    .await;
    drop(taken);
    assert_eq!(code, Some(1), "stderr: {stderr}");
    assert_one_line_naming(&stderr, &listen);
    assert!(
        !stderr.contains(WRITE_KEY),
        "the write key leaked: {stderr}"
    );
}

#[tokio::test]
async fn serve_help_describes_the_command() {
    let (code, stdout, stderr) = run_to_exit(&["serve", "--help"], &[]).await;
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(stdout.contains("--config"), "{stdout}");
    assert!(stdout.to_lowercase().contains("usage"), "{stdout}");
}
