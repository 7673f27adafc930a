//! The JetStream spool: the spool conformance suite against a real `nats-server`, plus the
//! checks that only make sense for a distributed spool (partition ownership, take-over,
//! server restarts). Every test starts its own server on a free loopback port with a
//! temporary store, and skips (printing why) when no `nats-server` binary is installed,
//! unless `GATEWAY_REQUIRE_NATS=1`.

use std::sync::Arc;
use std::time::Duration;

use refiner_gateway::spool::conformance;
use refiner_gateway::spool::nats::testing::NatsServer;
use refiner_gateway::spool::{NatsSpool, NatsSpoolOptions, Spool};
use refiner_gateway::telemetry::Metrics;

fn options(server: &NatsServer) -> NatsSpoolOptions {
    let mut options = NatsSpoolOptions::new(server.url());
    options.partitions = 8;
    options.ownership_ttl = Duration::from_secs(2);
    options.node_name = "test".into();
    options
}

fn open_with(options: NatsSpoolOptions) -> Arc<NatsSpool> {
    match NatsSpool::open(options, Metrics::new()) {
        Ok(spool) => Arc::new(spool),
        Err(e) => panic!("opening the JetStream spool failed: {e}"),
    }
}

fn open(server: &NatsServer) -> Arc<dyn Spool> {
    open_with(options(server))
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $name() {
            let Some(server) = NatsServer::start(stringify!($name)) else { return };
            conformance::$name(open(&server)).await;
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
        async fn $name() {
            let Some(server) = NatsServer::start(stringify!($name)) else { return };
            let server = &server;
            conformance::$name(|| async move { open(server) }).await;
        }
    )*};
}

conformance_reopen!(
    dedup_survives_reopen,
    close_keeps_every_acknowledged_append,
    concurrent_appends_are_all_durable,
);
