//! The reliability suite, quick forms (CI): crash loop, Refiner outage, 429 storm, disk
//! full, bad input and a short soak, each against the real `refiner-gateway serve` binary
//! and the in-process Refiner simulator on 127.0.0.1. Each scenario prints its figures
//! (`cargo test --test reliability -- --nocapture`) and asserts its checks.
//!
//! The long forms (100 crash cycles, ≥ 1,000,000 bad inputs, a 10-minute soak, a
//! 10-million-event backlog) run the same code with bigger parameters:
//! `cargo run --release --example reliability -- --long`, which also regenerates the results
//! table of `docs/reliability.md`.

// Shared with the `reliability` example (the long forms), which uses every function.
#[allow(dead_code)]
#[path = "reliability/crash.rs"]
mod crash;
#[allow(dead_code)]
#[path = "reliability/disk.rs"]
mod disk;
#[allow(dead_code)]
#[path = "reliability/fuzz.rs"]
mod fuzz;
#[allow(dead_code)]
#[path = "reliability/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "reliability/load.rs"]
mod load;
#[allow(dead_code)]
#[path = "reliability/outage.rs"]
mod outage;
#[allow(dead_code)]
#[path = "reliability/report.rs"]
mod report;
#[allow(dead_code)]
#[path = "reliability/soak.rs"]
mod soak;
#[allow(dead_code)]
#[path = "reliability/storm.rs"]
mod storm;
#[allow(dead_code)]
#[path = "reliability/witness.rs"]
mod witness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn crash_loop_loses_nothing_answered_200() {
    crash::run(crash::CrashParams::quick())
        .await
        .assert_passed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn a_refiner_outage_drains_fully_without_dead_letters() {
    outage::run(outage::OutageParams::quick())
        .await
        .assert_passed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn a_429_storm_is_honoured_per_user_and_key() {
    storm::run(storm::StormParams::quick())
        .await
        .assert_passed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn a_full_disk_answers_503_and_loses_nothing_answered_200() {
    disk::run(disk::DiskParams::quick()).await.assert_passed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn bad_input_never_gets_a_5xx_and_memory_stays_bounded() {
    fuzz::run(fuzz::FuzzParams::quick()).await.assert_passed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn a_soak_keeps_memory_flat() {
    soak::soak(soak::SoakParams::quick()).await.assert_passed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn a_backlog_with_refiner_down_keeps_memory_bounded_and_restarts_ready() {
    soak::backlog(soak::BacklogParams::quick())
        .await
        .assert_passed();
}
