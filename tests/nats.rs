//! The JetStream spool: the spool conformance suite against a real `nats-server`, plus the
//! checks that only make sense for a distributed spool (partition ownership, take-over,
//! server restarts). Every test starts its own server on a free loopback port with a
//! temporary store, and fails without a `nats-server` binary (naming the install) unless
//! `GATEWAY_SKIP_NATS=1` skips it (`support/deps.rs`).

#[path = "support/deps.rs"]
mod deps;

use std::sync::Arc;
use std::time::Duration;

use refiner_gateway::spool::conformance;
use refiner_gateway::spool::nats::testing::NatsServer;
use refiner_gateway::spool::{Backend, NatsSpool, NatsSpoolOptions, Spool};
use refiner_gateway::telemetry::Metrics;

#[path = "nats/metering.rs"]
mod metering;

fn options(server: &NatsServer) -> NatsSpoolOptions {
    let mut options = NatsSpoolOptions::new(server.url());
    options.partitions = 8;
    options.ownership_ttl = Duration::from_secs(2);
    options.node_name = "test".into();
    options
}

async fn open_with(options: NatsSpoolOptions) -> Arc<NatsSpool> {
    match NatsSpool::open(options, Metrics::new()).await {
        Ok(spool) => Arc::new(spool),
        Err(e) => panic!("opening the JetStream spool failed: {e}"),
    }
}

async fn open(server: &NatsServer) -> Arc<dyn Spool> {
    open_with(options(server)).await
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        #[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
        async fn $name() {
            let Some(server) = deps::nats(stringify!($name), NatsServer::start) else { return };
            conformance::$name(open(&server).await).await;
        }
    )*};
}

conformance!(
    append_reports_queued_and_duplicates,
    dedup_within_one_request,
    dedup_across_requests,
    dedup_is_per_source,
    lease_returns_events_in_append_order,
    seq_is_never_reused,
    lease_honours_max,
    lease_holds_back_a_users_events_behind_a_leased_one,
    lease_takes_whole_user_queues_in_append_order,
    one_request_keeps_each_users_order,
    a_retry_holds_only_its_user_among_a_requests_events,
    queued_head_blocks_only_its_user,
    expired_lease_is_leased_again,
    ack_removes_events,
    stats_report_depth_and_oldest,
    check_writable_succeeds,
    close_makes_every_call_fail_with_closed,
);

macro_rules! conformance_reopen {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        #[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
        async fn $name() {
            let Some(server) = deps::nats(stringify!($name), NatsServer::start) else { return };
            let server = &server;
            conformance::$name(|| async move { open(server).await }).await;
        }
    )*};
}

conformance_reopen!(
    dedup_survives_reopen,
    close_keeps_every_acknowledged_append,
    concurrent_appends_are_all_durable,
);

mod dead_letters {
    use super::*;
    use refiner_gateway::spool::admin::{
        Cursor, DeadLetterFilter, DeadLetterQuery, PageAt, SortField, SortValue,
    };
    use refiner_gateway::spool::conformance::{event, request, LONG_LEASE_MS, SOURCE};
    use refiner_gateway::spool::{DeadLetterRequest, RetryAt, Settlement};

    fn all(source: &str) -> DeadLetterFilter {
        DeadLetterFilter {
            source: source.to_owned(),
            ..Default::default()
        }
    }

    fn query(at: PageAt, limit: u32) -> DeadLetterQuery {
        DeadLetterQuery {
            filter: all(SOURCE),
            sort: SortField::Id,
            descending: false,
            at,
            limit,
        }
    }

    /// Buries `ids` (one user each) after one failed attempt each.
    async fn bury(spool: &Arc<dyn Spool>, ids: &[&str]) {
        let events = ids.iter().map(|id| event(id, id)).collect();
        spool
            .append(request(SOURCE, 1_000, events))
            .await
            .expect("append");
        let leased = spool.lease(100, LONG_LEASE_MS).await.expect("lease");
        assert_eq!(leased.len(), ids.len());
        // One retry first, so the history has two attempts.
        spool
            .settle(Settlement {
                retried: leased
                    .iter()
                    .map(|l| RetryAt {
                        seq: l.seq,
                        next_attempt_at_ms: 0,
                        status: Some(503),
                        error: "unavailable".into(),
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .expect("retry");
        let mut again = Vec::new();
        for _ in 0..200 {
            again.extend(spool.lease(100, LONG_LEASE_MS).await.expect("lease"));
            if again.len() == ids.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(again.len(), ids.len(), "the retried events came back");
        assert!(again.iter().all(|l| l.attempts == 1), "{again:?}");
        // Redeliveries of different users come back in any order; dead letters are
        // numbered in the order they are buried, which the listings below rely on.
        again.sort_by_key(|l| l.seq);
        spool
            .settle(Settlement {
                dead: again
                    .iter()
                    .map(|l| DeadLetterRequest {
                        seq: l.seq,
                        status: Some(400),
                        error: format!("refused {}", l.message_id),
                        attempted: true,
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .expect("bury");
    }

    #[tokio::test]
    #[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
    async fn dead_letters_are_listed_shown_replayed_and_deleted() {
        let Some(server) = deps::nats("dead_letters_are_listed", NatsServer::start) else {
            return;
        };
        let backend = Backend::nats(
            NatsSpool::open(options(&server), Metrics::new())
                .await
                .expect("open the NATS spool"),
        );
        let (spool, dead) = (backend.queue.clone(), backend.dead_letters.clone());
        bury(&spool, &["d1", "d2", "d3"]).await;
        let stats = spool.stats().await.expect("stats");
        assert_eq!((stats.depth, stats.dead_letters), (0, 3));

        let page = dead
            .list_dead_letters(query(PageAt::Offset(0), 2))
            .await
            .expect("list");
        assert_eq!(page.count, 3);
        assert!(page.more);
        let ids: Vec<&str> = page.items.iter().map(|i| i.message_id.as_str()).collect();
        assert_eq!(ids, ["d1", "d2"]);
        assert_eq!(page.items[0].attempts, 2);
        assert_eq!(page.items[0].last_status, Some(400));
        let next = dead
            .list_dead_letters(query(PageAt::After(page.items[1].cursor.clone()), 2))
            .await
            .expect("list after");
        assert_eq!(next.items.len(), 1);
        assert_eq!(next.items[0].message_id, "d3");
        assert!(!next.more);
        let back = dead
            .list_dead_letters(query(PageAt::Before(next.items[0].cursor.clone()), 1))
            .await
            .expect("list before");
        assert_eq!(back.items[0].message_id, "d2");
        assert!(back.more);
        let searched = dead
            .list_dead_letters(DeadLetterQuery {
                filter: DeadLetterFilter {
                    q: Some("REFUSED D3".into()),
                    ..all(SOURCE)
                },
                ..query(PageAt::Offset(0), 10)
            })
            .await
            .expect("search");
        assert_eq!(searched.count, 1);
        for (status, expected) in [(400, 3), (503, 0)] {
            let selected = dead
                .list_dead_letters(DeadLetterQuery {
                    filter: DeadLetterFilter {
                        status: Some(status),
                        ..all(SOURCE)
                    },
                    ..query(PageAt::Offset(0), 10)
                })
                .await
                .expect("by status");
            assert_eq!(selected.count, expected, "status {status}");
        }
        let descending = dead
            .list_dead_letters(DeadLetterQuery {
                sort: SortField::MessageId,
                descending: true,
                ..query(PageAt::Offset(0), 10)
            })
            .await
            .expect("sorted");
        let ids: Vec<&str> = descending
            .items
            .iter()
            .map(|i| i.message_id.as_str())
            .collect();
        assert_eq!(ids, ["d3", "d2", "d1"]);
        assert_eq!(
            descending.items[0].cursor,
            Cursor {
                value: SortValue::Text("d3".into()),
                id: descending.items[0].id
            }
        );

        let d1 = page.items[0].id;
        let shown = dead
            .dead_letter(SOURCE, d1)
            .await
            .expect("show")
            .expect("exists");
        assert_eq!(shown.summary.message_id, "d1");
        assert_eq!(shown.attempts.len(), 2, "{:?}", shown.attempts);
        assert_eq!(shown.attempts[0].status, Some(503));
        assert!(dead
            .dead_letter("other-source", d1)
            .await
            .expect("show")
            .is_none());

        let report = dead
            .replay_dead_letters(
                DeadLetterFilter {
                    ids: Some(vec![d1]),
                    ..all(SOURCE)
                },
                None,
            )
            .await
            .expect("replay");
        assert_eq!((report.replayed, report.remaining), (1, 0));
        let back = spool.lease(100, LONG_LEASE_MS).await.expect("lease");
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].message_id, "d1");
        assert_eq!(back[0].attempts, 2, "a replayed event keeps its attempts");
        // It fails for good again: the new dead letter has its whole history.
        spool
            .settle(Settlement {
                dead: vec![DeadLetterRequest {
                    seq: back[0].seq,
                    status: Some(400),
                    error: "refused again".into(),
                    attempted: true,
                }],
                ..Default::default()
            })
            .await
            .expect("bury again");
        let again = dead
            .list_dead_letters(DeadLetterQuery {
                filter: DeadLetterFilter {
                    q: Some("refused again".into()),
                    ..all(SOURCE)
                },
                ..query(PageAt::Offset(0), 10)
            })
            .await
            .expect("list");
        assert_eq!(again.count, 1);
        assert_eq!(again.items[0].attempts, 3);
        let shown = dead
            .dead_letter(SOURCE, again.items[0].id)
            .await
            .expect("show")
            .expect("exists");
        assert_eq!(shown.attempts.len(), 3, "{:?}", shown.attempts);

        let deleted = dead.delete_dead_letters(all(SOURCE)).await.expect("delete");
        assert_eq!(deleted, 3);
        assert_eq!(spool.stats().await.expect("stats").dead_letters, 0);
        spool.close().await;
    }
}

/// Options with JetStream's duplicate window cut to a second, so that a repeat sent after
/// it can only be caught by the partition owner's index, and the index's scratch files in
/// `dir`.
fn short_window(server: &NatsServer, dir: &tempfile::TempDir) -> NatsSpoolOptions {
    let mut options = options(server);
    options.duplicate_window = Duration::from_secs(1);
    options.dedup_dir = dir.path().to_path_buf();
    options
}

/// Closes `spool`, restarts the server, opens the spool again and appends `events` (the
/// repeats a dedup test expects to be dropped): the reopened spool.
async fn reopen_after_restart(
    spool: Arc<dyn Spool>,
    server: &mut NatsServer,
    options: NatsSpoolOptions,
    events: Vec<refiner_gateway::segment::Event>,
) -> Arc<dyn Spool> {
    use refiner_gateway::spool::conformance::{request, SOURCE};
    spool.close().await;
    server.restart();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let spool: Arc<dyn Spool> = open_with(options).await;
    spool
        .append(request(SOURCE, 2_000, events))
        .await
        .expect("append after restart");
    spool
}

/// Leases until an event with message id `last` arrives, acking everything; the message
/// ids leased, in order.
async fn lease_until(spool: &Arc<dyn Spool>, last: &str) -> Vec<String> {
    use refiner_gateway::spool::conformance::LONG_LEASE_MS;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut ids = Vec::new();
    while !ids.iter().any(|id| id == last) {
        assert!(
            std::time::Instant::now() < deadline,
            "{last} never came: {ids:?}"
        );
        let leased = spool.lease(100, LONG_LEASE_MS).await.expect("lease");
        let seqs: Vec<i64> = leased.iter().map(|l| l.seq).collect();
        ids.extend(leased.into_iter().map(|l| l.message_id));
        spool.ack(seqs).await.expect("ack");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ids
}

/// Past JetStream's (short) duplicate window, a repeated messageId is accepted at ingest
/// but its partition's owner drops it: it is not delivered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn a_repeat_after_the_duplicate_window_is_not_delivered_twice() {
    use refiner_gateway::spool::conformance::{event, request, SOURCE};
    let Some(server) = deps::nats("a_repeat_after_the_duplicate_window", NatsServer::start) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let spool: Arc<dyn Spool> = open_with(short_window(&server, &dir)).await;
    spool
        .append(request(SOURCE, 1_000, vec![event("m1", "1")]))
        .await
        .expect("append");
    assert_eq!(lease_until(&spool, "m1").await, ["m1"]);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let report = spool
        .append(request(
            SOURCE,
            2_000,
            vec![event("m1", "1"), event("m2", "1")],
        ))
        .await
        .expect("append again");
    assert_eq!(
        report.queued, 2,
        "JetStream's window has passed: both are accepted at ingest"
    );
    assert_eq!(
        lease_until(&spool, "m2").await,
        ["m2"],
        "m1 is not delivered again"
    );
    spool.close().await;
}

/// The owners' index lives in JetStream (journal and runs): a repeat is still dropped after
/// the server restarts, whether the ids were still in the journal or written out as runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn dedup_survives_a_server_restart() {
    for flush in [Duration::from_secs(300), Duration::ZERO] {
        dedup_survives_a_server_restart_with(flush).await;
    }
}

async fn dedup_survives_a_server_restart_with(flush: Duration) {
    use refiner_gateway::spool::conformance::{event, request, SOURCE};
    let Some(mut server) = deps::nats("dedup_survives_a_server_restart", NatsServer::start) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut options = short_window(&server, &dir);
    options.dedup_flush = flush;
    let spool: Arc<dyn Spool> = open_with(options.clone()).await;
    spool
        .append(request(
            SOURCE,
            1_000,
            vec![event("m1", "1"), event("m2", "2")],
        ))
        .await
        .expect("append");
    let leased = lease_until(&spool, "m2").await;
    assert!(leased.contains(&"m1".to_string()), "{leased:?}");
    let events = vec![event("m1", "1"), event("m2", "2"), event("m3", "1")];
    let spool = reopen_after_restart(spool, &mut server, options, events).await;
    assert_eq!(
        lease_until(&spool, "m3").await,
        ["m3"],
        "m1 and m2 (delivered before the restart) are not delivered again (flush every {flush:?})"
    );
    spool.close().await;
}

/// A run of the owners' index larger than one chunk message (512 KiB: four runs of 16,384
/// ids merged into one of 65,536) is uploaded and loaded chunk by chunk: after a server
/// restart, repeats of its ids are still dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn a_run_of_many_chunks_survives_a_server_restart() {
    use refiner_gateway::spool::conformance::{event, request, LONG_LEASE_MS, SOURCE};
    let Some(mut server) = deps::nats("a_run_of_many_chunks", NatsServer::start) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut options = short_window(&server, &dir);
    options.partitions = 1;
    let spool: Arc<dyn Spool> = open_with(options.clone()).await;
    const IDS: usize = 70_000;
    for from in (0..IDS).step_by(1_000) {
        let events = (from..from + 1_000)
            .map(|i| event(&format!("m{i}"), &format!("u{}", i % 100)))
            .collect();
        spool
            .append(request(SOURCE, 1_000, events))
            .await
            .expect("append");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let mut delivered = 0;
    while delivered < IDS {
        assert!(
            std::time::Instant::now() < deadline,
            "{delivered} of {IDS} delivered"
        );
        let leased = spool.lease(5_000, LONG_LEASE_MS).await.expect("lease");
        delivered += leased.len();
        spool
            .ack(leased.into_iter().map(|l| l.seq).collect())
            .await
            .expect("ack");
    }
    let events = vec![event("m0", "u0"), event("m50000", "u0"), event("new", "u0")];
    let spool = reopen_after_restart(spool, &mut server, options, events).await;
    // Acks still on their way at close come back as the same events (at least once);
    // the repeats, appended anew, are dropped.
    let leased = lease_until(&spool, "new").await;
    assert!(
        !leased.iter().any(|id| id == "m0" || id == "m50000"),
        "repeats of the merged run's ids are not delivered: {:?}",
        &leased[leased.len().saturating_sub(5)..]
    );
    spool.close().await;
}

/// A node that takes a partition over (its owner died) loads the partition's index from
/// JetStream: a repeat of an id the dead owner delivered is dropped by the new owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn dedup_survives_a_change_of_owner() {
    use refiner_gateway::spool::conformance::{event, request, SOURCE};
    let Some(server) = deps::nats("dedup_survives_a_change_of_owner", NatsServer::start) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let first: Arc<dyn Spool> = open_with(short_window(&server, &dir)).await;
    first
        .append(request(
            SOURCE,
            1_000,
            vec![event("m1", "1"), event("m2", "2")],
        ))
        .await
        .expect("append");
    assert_eq!(lease_until(&first, "m2").await.len(), 2);
    // The owner dies: no close, its ownership keys expire.
    drop(first);
    let second = open_with(short_window(&server, &dir)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while second.owned_partitions().await.len() < 8 {
        assert!(std::time::Instant::now() < deadline, "no take-over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second: Arc<dyn Spool> = second;
    second
        .append(request(
            SOURCE,
            2_000,
            vec![event("m1", "1"), event("m2", "2"), event("m3", "1")],
        ))
        .await
        .expect("append to the new owner");
    assert_eq!(lease_until(&second, "m3").await, ["m3"]);
    second.close().await;
}

/// A node that dies leaves its retried events' attempts and retry times behind: the next
/// owner retries them on schedule (not at once) with their attempts, and holds their users'
/// later events until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn a_take_over_keeps_the_retry_schedule_and_the_attempts() {
    use refiner_gateway::spool::conformance::{event, request, LONG_LEASE_MS, SOURCE};
    use refiner_gateway::spool::{RetryAt, Settlement};
    let Some(server) = deps::nats("a_take_over_keeps_the_retry_schedule", NatsServer::start) else {
        return;
    };
    let first = open(&server).await;
    first
        .append(request(
            SOURCE,
            1_000,
            vec![event("a1", "a"), event("a2", "a"), event("b1", "b")],
        ))
        .await
        .expect("append");
    let leased = first.lease(10, LONG_LEASE_MS).await.expect("lease");
    let seq = |id: &str| {
        leased
            .iter()
            .find(|l| l.message_id == id)
            .map(|l| l.seq)
            .expect("leased")
    };
    let retry_at = chrono::Utc::now().timestamp_millis() + 6_000;
    first
        .settle(Settlement {
            acked: vec![seq("b1")],
            retried: vec![RetryAt {
                seq: seq("a1"),
                next_attempt_at_ms: retry_at,
                status: Some(503),
                error: "unavailable".into(),
            }],
            released: vec![seq("a2")],
            ..Default::default()
        })
        .await
        .expect("settle");
    // The node dies: no close, its ownership keys expire.
    drop(first);

    let second = open(&server).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let a1 = loop {
        let leased = second.lease(10, LONG_LEASE_MS).await.expect("lease");
        let now = chrono::Utc::now().timestamp_millis();
        let ids: Vec<&str> = leased.iter().map(|l| l.message_id.as_str()).collect();
        assert!(
            !ids.contains(&"a2") || ids.starts_with(&["a1", "a2"]),
            "a2 was leased before a1: {ids:?}"
        );
        if let Some(a1) = leased.into_iter().find(|l| l.message_id == "a1") {
            // A retry due within a second may be handed out that much early.
            assert!(
                now >= retry_at - 1_100,
                "a1 was retried {} ms before its retry time",
                retry_at - now
            );
            break a1;
        }
        assert!(std::time::Instant::now() < deadline, "a1 never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(a1.attempts, 1, "the attempt made by the dead node counts");
    second.close().await;
}

/// JetStream has no dead-letter queue: an event it delivered more than `max_deliver` times
/// is copied to the dead-letter stream by the node that receives it once more.
#[tokio::test]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn an_event_past_max_deliver_is_dead_lettered() {
    use refiner_gateway::spool::conformance::{event, request, LONG_LEASE_MS, SOURCE};
    use refiner_gateway::spool::{RetryAt, Settlement};
    let Some(server) = deps::nats(
        "an_event_past_max_deliver_is_dead_lettered",
        NatsServer::start,
    ) else {
        return;
    };
    let mut options = options(&server);
    options.max_deliver = 3;
    let spool: Arc<dyn Spool> = open_with(options).await;
    spool
        .append(request(SOURCE, 1_000, vec![event("p1", "1")]))
        .await
        .expect("append");
    let mut deliveries = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while spool.stats().await.expect("stats").dead_letters == 0 {
        assert!(std::time::Instant::now() < deadline, "never dead-lettered");
        for leased in spool.lease(10, LONG_LEASE_MS).await.expect("lease") {
            deliveries += 1;
            spool
                .settle(Settlement {
                    retried: vec![RetryAt {
                        seq: leased.seq,
                        next_attempt_at_ms: 0,
                        status: Some(500),
                        error: "boom".into(),
                    }],
                    ..Default::default()
                })
                .await
                .expect("retry");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        deliveries, 3,
        "delivered max_deliver times, then dead-lettered"
    );
    let stats = spool.stats().await.expect("stats");
    assert_eq!((stats.depth, stats.dead_letters), (0, 1));
    spool.close().await;
}

/// The production layout: three servers, streams, consumers and buckets with three
/// replicas. Losing one server (SIGKILL) loses nothing acknowledged: appends fail (503)
/// at most while a new leader is elected, then go on; every accepted event is leased, in
/// order per user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn three_replicas_survive_losing_a_server() {
    use refiner_gateway::spool::conformance::{event, request, LONG_LEASE_MS, SOURCE};
    use refiner_gateway::spool::nats::testing::NatsCluster;
    use std::collections::HashMap;
    let Some(mut cluster) = deps::nats("three_replicas_survive_losing_a_server", |test| {
        NatsCluster::start(test, 3)
    }) else {
        return;
    };
    let mut options = NatsSpoolOptions::new(cluster.urls());
    options.replicas = 3;
    options.partitions = 4;
    options.ownership_ttl = Duration::from_secs(2);
    options.publish_timeout = Duration::from_secs(2);
    // The cluster elects its leaders in its first seconds: opening may fail meanwhile.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let spool: Arc<dyn Spool> = loop {
        match NatsSpool::open(options.clone(), Metrics::new()).await {
            Ok(spool) => break Arc::new(spool),
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the replicated spool did not open: {e}"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    let started = std::time::Instant::now();
    let mut accepted: HashMap<String, Vec<String>> = HashMap::new();
    let mut refused = 0;
    for round in 0..40 {
        if round == 20 {
            cluster.servers[0].stop();
        }
        let events: Vec<_> = (0..10)
            .map(|u| event(&format!("r{round}-u{u}"), &u.to_string()))
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match spool.append(request(SOURCE, 1_000, events.clone())).await {
                Ok(_) => break,
                Err(e) => {
                    refused += 1;
                    assert!(
                        std::time::Instant::now() < deadline,
                        "appends did not recover after losing a server: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        for u in 0..10 {
            accepted
                .entry(format!("u:{u}"))
                .or_default()
                .push(format!("r{round}-u{u}"));
        }
    }
    let mut leased: HashMap<String, Vec<String>> = HashMap::new();
    let expected: usize = accepted.values().map(Vec::len).sum();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while leased.values().map(Vec::len).sum::<usize>() < expected {
        assert!(
            std::time::Instant::now() < deadline,
            "only {} of {expected} events were leased",
            leased.values().map(Vec::len).sum::<usize>()
        );
        let batch = spool.lease(1_000, LONG_LEASE_MS).await.unwrap_or_default();
        if batch.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        for l in &batch {
            let seen = leased.entry(l.user_key.to_string()).or_default();
            if !seen.contains(&l.message_id) {
                seen.push(l.message_id.clone());
            }
        }
        let seqs = batch.iter().map(|l| l.seq).collect();
        spool.ack(seqs).await.expect("ack");
    }
    assert_eq!(leased, accepted, "every accepted event, in order per user");
    eprintln!(
        "three replicas, one server killed: {expected} events accepted, {refused} appends refused \
         while a leader was elected, all leased in order after {:?}",
        started.elapsed()
    );
    spool.close().await;
}

/// The JetStream spool's delivery log (a stream beside the queue's) through the shared
/// conformance checks.
mod delivery_log {
    use super::*;
    use refiner_gateway::spool::delivery_log::DeliveryLogOptions;
    use refiner_gateway::spool::log_conformance;

    async fn backend(server: &NatsServer, max_bytes: u64) -> Backend {
        let spool = NatsSpool::open(options(server), Metrics::new())
            .await
            .expect("open the NATS spool");
        let log = DeliveryLogOptions {
            max_bytes,
            ..DeliveryLogOptions::default()
        };
        Backend::nats_with_log(spool, &log)
            .await
            .expect("open the delivery log")
    }

    #[tokio::test]
    #[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
    async fn nats_log_records_events_attempts_and_outcomes() {
        let Some(server) = deps::nats("nats_log_records", NatsServer::start) else {
            return;
        };
        let b = backend(&server, 16 << 20).await;
        let log = b.delivery_log.expect("a log");
        log_conformance::records_events_attempts_and_outcomes(b.queue, log).await;
    }

    #[tokio::test]
    #[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
    async fn nats_log_finds_records_among_many() {
        let Some(server) = deps::nats("nats_log_many", NatsServer::start) else {
            return;
        };
        let b = backend(&server, 64 << 20).await;
        let log = b.delivery_log.expect("a log");
        log_conformance::finds_records_among_many(b.queue, log, 5_000).await;
    }

    /// The batched direct get lookups walk a user's index with: the last message of a
    /// subject at or below a sequence, answered by the nats-server the tests run (a server
    /// without it would make lookups fall back to a consumer, which the conformance checks
    /// above would not notice).
    #[tokio::test]
    #[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
    async fn direct_gets_walk_a_subject_back() {
        use async_nats::jetstream::{self, stream};
        use refiner_gateway::spool::nats::direct::last_up_to;
        let Some(server) = deps::nats("direct_gets", NatsServer::start) else {
            return;
        };
        let client = async_nats::connect(server.url()).await.expect("connect");
        let js = jetstream::new(client);
        js.create_stream(stream::Config {
            name: "WALK".into(),
            subjects: vec!["walk.>".into()],
            allow_direct: true,
            ..Default::default()
        })
        .await
        .expect("stream");
        for (subject, body) in [("a", "1"), ("b", "x"), ("a", "2"), ("b", "y"), ("a", "3")] {
            let ack = js
                .publish(format!("walk.{subject}"), body.into())
                .await
                .expect("publish");
            ack.await.expect("ack");
        }
        let get = |up_to: Option<u64>| {
            let js = js.clone();
            async move {
                last_up_to(&js, "WALK", "walk.a", up_to)
                    .await
                    .expect("a direct get")
                    .map(|(seq, body)| (seq, String::from_utf8_lossy(&body).into_owned()))
            }
        };
        assert_eq!(get(None).await, Some((5, "3".into())));
        assert_eq!(get(Some(4)).await, Some((3, "2".into())));
        assert_eq!(get(Some(2)).await, Some((1, "1".into())));
        let none = last_up_to(&js, "WALK", "walk.c", None).await;
        assert!(matches!(none, Ok(None)), "{none:?}");
    }

    #[tokio::test]
    #[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
    async fn nats_log_stays_within_its_byte_budget() {
        let Some(server) = deps::nats("nats_log_budget", NatsServer::start) else {
            return;
        };
        let b = backend(&server, 64 * 1024).await;
        let log = b.delivery_log.expect("a log");
        log_conformance::stays_within_its_byte_budget(b.queue, log, 64 * 1024).await;
    }
}

#[path = "nats/backlog.rs"]
mod backlog;
