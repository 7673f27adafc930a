//! `refiner-gateway backup` against a running, delivering gateway, and a gateway started on
//! the restored copy: the dedup promise survives (ids remembered both in `dedup_log` rows and
//! in run files are still refused), which a copy of `spool.db` alone does not keep.

use std::path::Path;
use std::time::{Duration, Instant};

use refiner_gateway::config::Settings;
use refiner_gateway::sim::{Faults, SimHandle};
use rusqlite::{Connection, OpenFlags};
use serde_json::{json, Value};

use crate::delivery;
use crate::helpers::{send_batch, spawn_app_in, spawn_app_with, TestApp};
use crate::ingest::metric;

const BINARY: &str = env!("CARGO_BIN_EXE_refiner-gateway");
const REFINER_KEY: &str = "refiner-key";
/// Ids the dedup index keeps in memory before it writes a run file: small, so the first
/// batch becomes a run and the second stays in `dedup_log`.
const FLUSH_IDS: usize = 16;

async fn start_sim() -> SimHandle {
    delivery::start_sim(&[REFINER_KEY], Faults::none()).await
}

fn delivering(settings: &mut Settings, sim: &SimHandle) {
    settings.refiner.base_url = sim.url();
    settings.delivery.enabled = true;
    settings.delivery.poll_interval_ms = 10;
    settings.spool.dedup_flush_ids = FLUSH_IDS;
}

/// A track event whose name is its messageId, so the simulator's calls say which was sent.
fn event(id: &str) -> Value {
    json!({"type": "track", "userId": format!("user-{id}"), "event": id, "messageId": id})
}

async fn send(app: &TestApp, ids: &[String]) {
    let batch: Vec<Value> = ids.iter().map(|id| event(id)).collect();
    send_batch(app, &batch).await;
}

/// How many track-event calls the simulator answered 2xx for `id`.
fn deliveries(sim: &SimHandle, id: &str) -> usize {
    sim.state()
        .calls()
        .iter()
        .filter(|call| call.params["event"] == json!(id) && call.status == Some(200))
        .count()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for_empty_queue(app: &TestApp) {
    let started = Instant::now();
    while app.spool.stats().await.expect("stats").depth > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the queue never emptied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rows of `table` in the spool file of `dir` (read-only, beside a running gateway).
fn rows(dir: &Path, table: &str) -> i64 {
    let conn = Connection::open_with_flags(dir.join("spool.db"), OpenFlags::SQLITE_OPEN_READ_ONLY)
        .expect("open spool.db");
    conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
        row.get(0)
    })
    .expect("count")
}

/// Copies a directory tree (a restore is copying the backup into place).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy");
        }
    }
}

async fn run_backup(data_dir: &Path, output: &Path) -> (i32, String, String) {
    let out = tokio::process::Command::new(BINARY)
        .arg("backup")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--output")
        .arg(output)
        .env_remove("GATEWAY_DATA_DIR")
        .output()
        .await
        .expect("run refiner-gateway backup");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Starts a gateway on a copy of `backup` (only `spool.db` of it with `spool_only`).
async fn restore(backup: &Path, sim: &SimHandle, spool_only: bool) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    if spool_only {
        std::fs::copy(backup.join("spool.db"), dir.path().join("spool.db")).expect("copy");
    } else {
        copy_tree(backup, dir.path());
    }
    let mut settings = crate::helpers::test_settings(dir.path());
    delivering(&mut settings, sim);
    spawn_app_in(dir, settings).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_backup_still_refuses_delivered_message_ids() {
    let sim = start_sim().await;
    let app = spawn_app_with(|settings| delivering(settings, &sim)).await;
    // 40 ids in one request: a run file. Then 3 more: below the flush size, in `dedup_log`.
    let in_run: Vec<String> = (0..40).map(|i| format!("run-{i}")).collect();
    let in_log: Vec<String> = (0..3).map(|i| format!("log-{i}")).collect();
    send(&app, &in_run).await;
    let data_dir = app.data_dir.path().to_path_buf();
    wait_until("a dedup run is registered", || {
        rows(&data_dir, "dedup_runs") > 0
    })
    .await;
    send(&app, &in_log).await;
    let all: Vec<&String> = in_run.iter().chain(&in_log).collect();
    wait_until("every event is delivered", || {
        all.iter().all(|id| deliveries(&sim, id) == 1)
    })
    .await;
    wait_for_empty_queue(&app).await;

    // Backed up while the gateway runs.
    let backups = tempfile::tempdir().expect("temp dir");
    let backup = backups.path().join("backup-1");
    let (code, out, err) = run_backup(&data_dir, &backup).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("backed up "), "{out}");
    assert!(rows(&backup, "dedup_runs") > 0, "the backup has runs");
    assert!(
        rows(&backup, "dedup_log") > 0,
        "the backup has dedup_log rows"
    );
    let runs = std::fs::read_dir(backup.join("dedup"))
        .expect("dedup/")
        .count() as i64;
    assert_eq!(
        runs,
        rows(&backup, "dedup_runs"),
        "every listed run is copied"
    );
    for private in [backup.clone(), backup.join("spool.db")] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&private).expect("metadata").permissions(),
        ) & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", private.display());
    }
    // A second backup into the same place is refused, and so is a directory without a spool.
    let (code, _, err) = run_backup(&data_dir, &backup).await;
    assert_eq!(code, 2);
    assert!(err.contains("not empty"), "{err}");
    let (code, _, err) = run_backup(backups.path(), &backups.path().join("x")).await;
    assert_eq!(code, 2);
    assert!(err.contains("no spool.db"), "{err}");
    app.stop().await;

    // Restored: a delivered id of a run and one of `dedup_log` are duplicates, a new one is
    // delivered, and nothing is sent to Refiner twice.
    let restored = restore(&backup, &sim, false).await;
    let resent = [in_run[0].clone(), in_log[0].clone()];
    send(&restored, &resent).await;
    send(&restored, &["after-restore".to_string()]).await;
    wait_until("the new event is delivered", || {
        deliveries(&sim, "after-restore") == 1
    })
    .await;
    wait_for_empty_queue(&restored).await;
    let duplicates = metric(
        &restored,
        "gateway_ingest_duplicates_total",
        &[("source", "default")],
    )
    .await;
    assert_eq!(duplicates, 2.0);
    for id in &all {
        assert_eq!(deliveries(&sim, id), 1, "{id} was delivered again");
    }
    restored.stop().await;

    // What the old advice (copy spool.db) kept: the ids of the run are forgotten.
    let spool_only = restore(&backup, &sim, true).await;
    send(&spool_only, &resent).await;
    let duplicates = metric(
        &spool_only,
        "gateway_ingest_duplicates_total",
        &[("source", "default")],
    )
    .await;
    assert_eq!(duplicates, 1.0, "only the dedup_log id is remembered");
    wait_until("the forgotten id is delivered again", || {
        deliveries(&sim, &in_run[0]) == 2
    })
    .await;
    spool_only.stop().await;
    sim.stop().await;
}
