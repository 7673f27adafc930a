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
                .append(request(SOURCE, received_at_ms, vec![event("m1", "u:1")]))
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
