//! The reliability suite against the distributed mode: a 3-server JetStream cluster
//! (replicas 3) and two `refiner-gateway serve` nodes on loopback, delivering to the Refiner
//! simulator under load from several clients with many users. Scenarios
//! (`distributed_reliability/scenarios.rs`): a kill loop of nodes and servers, a JetStream
//! outage, a full JetStream store, a rolling restart. Each checks that no event answered 200
//! is lost, counts duplicates and checks per-user order.
//!
//! `cargo test --test distributed_reliability -- --nocapture` runs the quick forms (CI) and
//! prints each report; `RELIABILITY_LONG=1` runs the long forms and prints the rows of the
//! distributed results table of `docs/reliability.md`. The scenarios run one at a time
//! (each starts five processes on a small machine).
//!
//! They fail without a `nats-server` binary (naming the install), unless
//! `GATEWAY_SKIP_NATS=1` skips them (`support/deps.rs`).

#[allow(dead_code)]
#[path = "distributed_reliability/cluster.rs"]
mod cluster;
#[path = "support/deps.rs"]
mod deps;
#[allow(dead_code)]
#[path = "distributed_reliability/fleet.rs"]
mod fleet;
// The single-node suite's pieces: the gateway process, the clients, the witness.
#[allow(dead_code)]
#[path = "reliability/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "reliability/load.rs"]
mod load;
#[allow(dead_code)]
#[path = "reliability/report.rs"]
mod report;
#[allow(dead_code)]
#[path = "distributed_reliability/scenarios.rs"]
mod scenarios;
#[allow(dead_code)]
#[path = "reliability/witness.rs"]
mod witness;

use scenarios::long;

/// One scenario at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn finish(report: Option<report::Report>) {
    let Some(report) = report else {
        return;
    };
    eprintln!("{}", scenarios::table_row(&report));
    report.assert_passed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kill_loop_of_nodes_and_servers_loses_nothing_accepted() {
    let _serial = SERIAL.lock().await;
    let params = if long() {
        scenarios::KillParams::long()
    } else {
        scenarios::KillParams::quick()
    };
    finish(scenarios::kill_loop("distributed kill loop", params).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_outage_answers_503_and_loses_nothing_accepted() {
    let _serial = SERIAL.lock().await;
    let params = if long() {
        scenarios::OutageParams::long()
    } else {
        scenarios::OutageParams::quick()
    };
    finish(scenarios::outage("distributed JetStream outage", params).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_jetstream_store_answers_503_and_recovers_when_space_is_freed() {
    let _serial = SERIAL.lock().await;
    let params = if long() {
        scenarios::DiskParams::long_server()
    } else {
        scenarios::DiskParams::quick_server()
    };
    finish(scenarios::disk_full("distributed JetStream disk full (server)", params).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_events_stream_answers_503_and_recovers_when_drained() {
    let _serial = SERIAL.lock().await;
    let params = if long() {
        scenarios::DiskParams::long_stream()
    } else {
        scenarios::DiskParams::quick_stream()
    };
    finish(scenarios::disk_full("distributed JetStream disk full (stream)", params).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_keeps_per_user_order() {
    let _serial = SERIAL.lock().await;
    let params = if long() {
        scenarios::RollingParams::long()
    } else {
        scenarios::RollingParams::quick()
    };
    finish(scenarios::rolling_restart("distributed rolling restart", params).await);
}
