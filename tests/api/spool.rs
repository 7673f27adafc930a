//! The spool conformance suite against the embedded SQLite spool, plus the SQLite-only
//! dedup window setting. Each test gets its own temporary data directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use refiner_gateway::spool::conformance::{self, event, request, SOURCE};
use refiner_gateway::spool::{AppendReport, Spool, SqliteSpool, SqliteSpoolOptions};
use refiner_gateway::telemetry::Metrics;

fn open_in(dir: &Path) -> Arc<dyn Spool> {
    open_with(SqliteSpoolOptions::new(dir))
}

fn open_with(options: SqliteSpoolOptions) -> Arc<dyn Spool> {
    match SqliteSpool::open(options, Metrics::new()) {
        Ok(spool) => Arc::new(spool),
        Err(e) => panic!("opening the SQLite spool failed: {e}"),
    }
}

/// A fresh data directory; `open` gives a new spool handle on it each time.
struct Storage {
    dir: tempfile::TempDir,
}

impl Storage {
    fn new() -> Storage {
        Storage {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn open(&self) -> Arc<dyn Spool> {
        open_in(self.dir.path())
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }
}

#[tokio::test]
async fn sqlite_usage_and_counters_follow_appends_and_settlements() {
    let storage = Storage::new();
    let mut options = SqliteSpoolOptions::new(storage.path());
    options.sources = vec![SOURCE.to_owned()];
    let spool = SqliteSpool::open(options, Metrics::new()).expect("open");
    refiner_gateway::spool::metering_conformance::usage_and_counters_follow_appends_and_settlements(
        refiner_gateway::spool::Backend::sqlite(spool),
    )
    .await;
}

#[tokio::test]
async fn sqlite_append_reports_queued_and_duplicates() {
    let storage = Storage::new();
    conformance::append_reports_queued_and_duplicates(storage.open()).await;
}

#[tokio::test]
async fn sqlite_dedup_within_one_request() {
    let storage = Storage::new();
    conformance::dedup_within_one_request(storage.open()).await;
}

#[tokio::test]
async fn sqlite_dedup_across_requests() {
    let storage = Storage::new();
    conformance::dedup_across_requests(storage.open()).await;
}

#[tokio::test]
async fn sqlite_dedup_survives_reopen() {
    let storage = Storage::new();
    let dir = storage.path();
    conformance::dedup_survives_reopen(|| {
        let dir = dir.clone();
        async move { open_in(&dir) }
    })
    .await;
}

#[tokio::test]
async fn sqlite_dedup_is_per_source() {
    let storage = Storage::new();
    conformance::dedup_is_per_source(storage.open()).await;
}

#[tokio::test]
async fn sqlite_lease_returns_events_in_append_order() {
    let storage = Storage::new();
    conformance::lease_returns_events_in_append_order(storage.open()).await;
}

#[tokio::test]
async fn sqlite_seq_is_never_reused() {
    let storage = Storage::new();
    conformance::seq_is_never_reused(storage.open()).await;
}

#[tokio::test]
async fn sqlite_lease_honours_max() {
    let storage = Storage::new();
    conformance::lease_honours_max(storage.open()).await;
}

#[tokio::test]
async fn sqlite_lease_holds_back_a_users_events_behind_a_leased_one() {
    let storage = Storage::new();
    conformance::lease_holds_back_a_users_events_behind_a_leased_one(storage.open()).await;
}

#[tokio::test]
async fn sqlite_lease_takes_whole_user_queues_in_append_order() {
    let storage = Storage::new();
    conformance::lease_takes_whole_user_queues_in_append_order(storage.open()).await;
}

#[tokio::test]
async fn sqlite_one_request_keeps_each_users_order() {
    let storage = Storage::new();
    conformance::one_request_keeps_each_users_order(storage.open()).await;
}

#[tokio::test]
async fn sqlite_a_retry_holds_only_its_user_among_a_requests_events() {
    let storage = Storage::new();
    conformance::a_retry_holds_only_its_user_among_a_requests_events(storage.open()).await;
}

#[tokio::test]
async fn sqlite_queued_head_blocks_only_its_user() {
    let storage = Storage::new();
    conformance::queued_head_blocks_only_its_user(storage.open()).await;
}

#[tokio::test]
async fn sqlite_expired_lease_is_leased_again() {
    let storage = Storage::new();
    conformance::expired_lease_is_leased_again(storage.open()).await;
}

#[tokio::test]
async fn sqlite_ack_removes_events() {
    let storage = Storage::new();
    conformance::ack_removes_events(storage.open()).await;
}

#[tokio::test]
async fn sqlite_stats_report_depth_and_oldest() {
    let storage = Storage::new();
    conformance::stats_report_depth_and_oldest(storage.open()).await;
}

#[tokio::test]
async fn sqlite_check_writable_succeeds() {
    let storage = Storage::new();
    conformance::check_writable_succeeds(storage.open()).await;
}

#[tokio::test]
async fn sqlite_close_makes_every_call_fail_with_closed() {
    let storage = Storage::new();
    conformance::close_makes_every_call_fail_with_closed(storage.open()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_close_keeps_every_acknowledged_append() {
    let storage = Storage::new();
    let dir = storage.path();
    conformance::close_keeps_every_acknowledged_append(|| {
        let dir = dir.clone();
        async move { open_in(&dir) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_concurrent_appends_are_all_durable() {
    let storage = Storage::new();
    let dir = storage.path();
    conformance::concurrent_appends_are_all_durable(|| {
        let dir = dir.clone();
        async move { open_in(&dir) }
    })
    .await;
}

#[tokio::test]
async fn sqlite_dedup_window_shorter_than_the_gap_lets_a_message_id_through_again() {
    let storage = Storage::new();
    let mut options = SqliteSpoolOptions::new(storage.path());
    options.dedup_window = Duration::from_secs(1);
    let spool = open_with(options);
    let append = |received_at_ms: i64| {
        let spool = Arc::clone(&spool);
        async move {
            spool
                .append(request(SOURCE, received_at_ms, vec![event("m1", "1")]))
                .await
                .expect("append")
        }
    };

    assert_eq!(
        append(1_000).await,
        AppendReport {
            queued: 1,
            duplicates: 0
        }
    );
    assert_eq!(
        append(1_001).await,
        AppendReport {
            queued: 0,
            duplicates: 1
        },
        "within the window m1 is a duplicate"
    );
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    assert_eq!(
        append(2_300).await,
        AppendReport {
            queued: 1,
            duplicates: 0
        },
        "once the window has passed m1 is queued again"
    );
    assert_eq!(
        append(2_301).await,
        AppendReport {
            queued: 0,
            duplicates: 1
        },
        "and the window starts over"
    );
    let stats = spool.stats().await.expect("stats");
    assert_eq!(stats.depth, 2, "both copies of m1 are queued");
    spool.close().await;
}

/// Appends `count` single-event requests with ids `{prefix}-{i}`.
async fn append_many(spool: &Arc<dyn Spool>, prefix: &str, count: usize) -> AppendReport {
    let mut total = AppendReport::default();
    for i in 0..count {
        let id = format!("{prefix}-{i}");
        let report = spool
            .append(request(SOURCE, 1_000 + i as i64, vec![event(&id, "1")]))
            .await
            .expect("append");
        total.queued += report.queued;
        total.duplicates += report.duplicates;
    }
    total
}

/// Live dedup runs, as registered in the spool file.
fn dedup_runs(dir: &Path) -> i64 {
    let conn = rusqlite::Connection::open(dir.join("spool.db")).expect("open spool.db");
    conn.query_row("SELECT count(*) FROM dedup_runs", [], |row| row.get(0))
        .expect("count runs")
}

#[tokio::test]
async fn sqlite_ids_written_out_as_dedup_runs_stay_repeats_across_a_restart() {
    let storage = Storage::new();
    let options = || {
        let mut options = SqliteSpoolOptions::new(storage.path());
        // A run every 16 ids: 400 ids make 25 flushes and several merges.
        options.dedup_flush_ids = 16;
        options
    };
    let spool = open_with(options());
    assert_eq!(append_many(&spool, "a", 400).await.queued, 400);
    // Flushes land between transactions; a few more appends give them the chance.
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(append_many(&spool, "a", 1).await.duplicates, 1);
    }
    spool.close().await;
    let runs = dedup_runs(&storage.path());
    assert!(runs >= 1, "ids were written out as runs");
    assert!(runs < 20, "runs were merged: {runs} live");

    let spool = open_with(options());
    let again = append_many(&spool, "a", 400).await;
    assert_eq!((again.queued, again.duplicates), (0, 400));
    assert_eq!(append_many(&spool, "b", 10).await.queued, 10);
    assert_eq!(spool.stats().await.expect("stats").depth, 410);
    spool.close().await;
}

#[tokio::test]
async fn sqlite_a_file_of_another_schema_version_is_refused_by_name() {
    let storage = Storage::new();
    let spool = storage.open();
    assert_eq!(append_many(&spool, "kept", 2).await.queued, 2);
    spool.close().await;
    let path = storage.path().join("spool.db");
    let conn = rusqlite::Connection::open(&path).expect("open");
    conn.pragma_update(None, "user_version", 99)
        .expect("version");
    drop(conn);

    let mut options = SqliteSpoolOptions::new(storage.path());
    options.sources = vec![SOURCE.into()];
    let error = SqliteSpool::open(options, Metrics::new())
        .err()
        .expect("a file of version 99 is refused");
    let message = error.to_string();
    assert!(
        message.contains("schema version 99") && message.contains(&path.display().to_string()),
        "{message}"
    );

    // Nothing was changed: with its version back, the file opens with its events.
    let conn = rusqlite::Connection::open(&path).expect("open");
    conn.pragma_update(None, "user_version", 1)
        .expect("version");
    drop(conn);
    let spool = storage.open();
    assert_eq!(spool.stats().await.expect("stats").depth, 2);
    spool.close().await;
}
