//! 429 storm: the simulator answers a fraction of calls 429 with `Retry-After`. The
//! dispatcher honours it twice over: the event (and so its user) waits at least
//! `Retry-After` (and `delivery.retry_floor_429_secs`) before its retry, and the API key the
//! 429 came back on is paused for `Retry-After`, holding every call with that key. Both are
//! checked against the simulator's call log:
//!
//! - per user: no call about a user is received before the `Retry-After` of that user's
//!   last 429 has elapsed (measured from when the simulator answered it), but for calls
//!   received within `slack` of that answer: tracks of the user in flight beside the 429'd
//!   one (the per-user window), sent before the 429 reached the gateway (counted);
//! - per key: no call with the key is received between `slack` after a 429's answer and the
//!   end of its `Retry-After`. The slack covers calls the gateway had already sent when the
//!   429 reached it; the largest such lateness is reported.
//!
//! Two sources with two keys load the gateway at once, so a pause of one key is also seen
//! not to hold the other. Nothing may be dead-lettered and everything must arrive.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use refiner_gateway::sim::{CallRecord, Faults};

use crate::harness::{
    scratch_dir, start_sim, succeeded, wait_for, Gateway, Spec, SpoolFile, OTHER_KEY,
};
use crate::load::{event_id, Load, LoadSpec};
use crate::report::{percent, secs, Report};
use crate::witness::Witness;

#[derive(Debug, Clone)]
pub struct StormParams {
    /// Events per client; two clients per source.
    pub events_per_client: u64,
    pub batch: usize,
    pub rate_429: f64,
    pub retry_after_secs: u64,
    /// Calls received this soon after a 429's answer count as already sent (ms).
    pub slack_ms: u64,
    pub drain_limit: Duration,
}

impl StormParams {
    pub fn quick() -> StormParams {
        StormParams {
            events_per_client: 60,
            batch: 10,
            rate_429: 0.1,
            retry_after_secs: 1,
            slack_ms: 250,
            drain_limit: Duration::from_secs(120),
        }
    }
}

/// Which source (and so which key) a call's user belongs to.
fn key_of(call: &CallRecord) -> &'static str {
    match call.user.as_deref() {
        Some(user) if user.starts_with("storm-b-") => "hooked",
        _ => "default",
    }
}

pub async fn run(params: StormParams) -> Report {
    let started = Instant::now();
    let mut report = Report::new("429 storm");
    report.ran = format!(
        "{} events over 2 sources (2 clients each, {}-event batches); the simulator answers \
         {:.0} % of calls 429 with Retry-After: {} s; delivery.retry_floor_429_secs = 1",
        params.events_per_client * 4,
        params.batch,
        params.rate_429 * 100.0,
        params.retry_after_secs
    );
    let sim = start_sim(
        0,
        Faults {
            rate_429: params.rate_429,
            retry_after_secs: params.retry_after_secs,
            seed: 429,
            ..Faults::none()
        },
        200_000,
    )
    .await;
    let witness = Witness::start(sim.state(), true);
    let scratch = scratch_dir("storm");
    let data_dir = scratch.path().join("data");
    let spec = Spec::new(&data_dir, &sim.url());
    let gateway = Gateway::start(&spec, scratch.path(), Duration::from_secs(30)).await;

    let mut spec_a = LoadSpec::new("storm-a", 2, params.batch, Duration::from_millis(20));
    spec_a.events_per_client = params.events_per_client;
    let mut spec_b = LoadSpec::new("storm-b", 2, params.batch, Duration::from_millis(20));
    spec_b.events_per_client = params.events_per_client;
    spec_b.write_key = OTHER_KEY;
    let load_a = Load::start(spec_a, &gateway.address);
    let load_b = Load::start(spec_b, &gateway.address);
    let shared_a = load_a.finish().await;
    let shared_b = load_b.finish().await;
    let accepted = shared_a.acked() + shared_b.acked();
    let ids: Vec<String> = ["storm-a", "storm-b"]
        .iter()
        .flat_map(|prefix| {
            (0..2).flat_map(move |k| {
                (0..params.events_per_client).map(move |n| event_id(prefix, k, n))
            })
        })
        .collect();
    let delivery_started = Instant::now();
    let drained = wait_for(params.drain_limit, "every event delivered", || {
        let witness = witness.clone();
        let ids = &ids;
        let data_dir = data_dir.clone();
        async move {
            let missing = witness.with(|d| ids.iter().filter(|id| !d.contains(id)).count());
            let queued = SpoolFile::read(&data_dir)
                .map(|f| f.queued)
                .unwrap_or(u64::MAX);
            if missing == 0 && queued == 0 {
                Ok(())
            } else {
                Err(format!("{missing} not delivered, {queued} queued"))
            }
        }
    })
    .await;
    let took = delivery_started.elapsed();
    let terminated = gateway.terminate().await;
    let file = SpoolFile::read(&data_dir);
    let delivered = witness.finish();
    sim.stop().await;
    let log = delivered.log.clone().unwrap_or_default();

    // Per user: the call after a 429 comes no sooner than its Retry-After.
    let retry_after_ms = params.retry_after_secs * 1000;
    let mut last_429: HashMap<&str, u64> = HashMap::new();
    let mut user_violations = Vec::new();
    let mut tightest_user_gap: Option<u64> = None;
    let mut in_flight_beside = 0u64;
    for call in &log {
        let Some(user) = call.user.as_deref() else {
            continue;
        };
        if let Some(&answered) = last_429.get(user) {
            if call.at_ms <= answered + params.slack_ms {
                // A track of the same user sent beside the 429'd one (the per-user window),
                // before the 429 reached the gateway.
                in_flight_beside += 1;
            } else {
                last_429.remove(user);
                let gap = call.at_ms.saturating_sub(answered);
                tightest_user_gap = Some(tightest_user_gap.map_or(gap, |g: u64| g.min(gap)));
                if call.at_ms < answered + retry_after_ms {
                    user_violations.push(format!(
                        "{user}: call #{} {} ms after its 429 was answered",
                        call.seq, gap
                    ));
                }
            }
        }
        if call.status == Some(429) {
            last_429.insert(user, call.answered_ms.unwrap_or(call.at_ms));
        }
    }

    // Per key: no call inside (answer + slack, answer + Retry-After).
    let mut key_violations = Vec::new();
    let mut late_in_flight = 0u64;
    let mut latest_in_flight_ms = 0u64;
    let mut by_key: HashMap<&str, Vec<&CallRecord>> = HashMap::new();
    for call in &log {
        by_key.entry(key_of(call)).or_default().push(call);
    }
    for calls in by_key.values_mut() {
        calls.sort_by_key(|c| c.at_ms);
        for throttled in calls.iter().filter(|c| c.status == Some(429)) {
            let answered = throttled.answered_ms.unwrap_or(throttled.at_ms);
            let start = calls.partition_point(|c| c.at_ms <= answered);
            for call in &calls[start..] {
                if call.at_ms >= answered + retry_after_ms {
                    break;
                }
                let lateness = call.at_ms - answered;
                if lateness <= params.slack_ms {
                    late_in_flight += 1;
                    latest_in_flight_ms = latest_in_flight_ms.max(lateness);
                } else {
                    key_violations.push(format!(
                        "call #{} {} ms after 429 #{} was answered",
                        call.seq, lateness, throttled.seq
                    ));
                }
            }
        }
    }
    // A pause of one key does not hold the other: calls of the other key inside a pause.
    let mut other_key_calls = 0u64;
    for (key, calls) in &by_key {
        for throttled in calls.iter().filter(|c| c.status == Some(429)) {
            let answered = throttled.answered_ms.unwrap_or(throttled.at_ms);
            for (other, other_calls) in &by_key {
                if other == key {
                    continue;
                }
                other_key_calls += other_calls
                    .iter()
                    .filter(|c| {
                        c.at_ms > answered + params.slack_ms && c.at_ms < answered + retry_after_ms
                    })
                    .count() as u64;
            }
        }
    }
    let throttled_total = log.iter().filter(|c| c.status == Some(429)).count() as u64;
    let successes = log.iter().filter(|c| succeeded(c)).count() as u64;
    let lost = ids.iter().filter(|id| !delivered.contains(id)).count();
    let unexpected_a = shared_a.unexpected.lock().expect("lock").clone();
    let unexpected_b = shared_b.unexpected.lock().expect("lock").clone();

    report.figure("accepted (answered 200)", accepted);
    report.figure("Refiner calls", log.len());
    report.figure(
        "answered 429",
        format!(
            "{throttled_total} ({})",
            percent(throttled_total, log.len() as u64)
        ),
    );
    report.figure("answered 2xx", successes);
    report.figure("delivered in", secs(took));
    report.figure(
        "per-user gap after a 429 (least)",
        format!(
            "{} ms (Retry-After {} ms)",
            tightest_user_gap.unwrap_or(0),
            retry_after_ms
        ),
    );
    report.figure(
        "tracks of the same user in flight beside a 429'd call",
        in_flight_beside,
    );
    report.figure(
        "calls already in flight when a 429 was answered",
        format!(
            "{late_in_flight}, received at most {latest_in_flight_ms} ms after the 429's answer \
             (slack {} ms)",
            params.slack_ms
        ),
    );
    report.figure(
        "calls of the other key during a key's pause",
        format!("{other_key_calls} (pauses are per key)"),
    );
    report.figure("duplicates", delivered.duplicates());
    report.check(
        "no call about a user before its Retry-After",
        user_violations.is_empty(),
        format!(
            "{} violations {:?}",
            user_violations.len(),
            user_violations.iter().take(5).collect::<Vec<_>>()
        ),
    );
    report.check(
        "no call with a paused key before its Retry-After",
        key_violations.is_empty(),
        format!(
            "{} violations {:?}",
            key_violations.len(),
            key_violations.iter().take(5).collect::<Vec<_>>()
        ),
    );
    report.check(
        "a fraction of calls was throttled",
        throttled_total > 0,
        format!("{throttled_total} calls answered 429"),
    );
    report.check(
        "everything delivered",
        drained.is_ok() && lost == 0,
        match &drained {
            Ok(()) => format!("{lost} of {accepted} missing"),
            Err(e) => e.clone(),
        },
    );
    match file {
        Ok(file) => report.check(
            "nothing dead-lettered",
            file.dead_letters == 0 && file.queued == 0,
            format!("{} dead letters, {} queued", file.dead_letters, file.queued),
        ),
        Err(e) => report.check("nothing dead-lettered", false, e),
    }
    report.check(
        "ingest answered 200",
        unexpected_a.is_empty()
            && unexpected_b.is_empty()
            && shared_a
                .acked_upto
                .iter()
                .all(|a| a.load(Ordering::SeqCst) == params.events_per_client)
            && shared_b
                .acked_upto
                .iter()
                .all(|a| a.load(Ordering::SeqCst) == params.events_per_client),
        format!(
            "{:?} {:?}",
            shared_a.status_counts(),
            shared_b.status_counts()
        ),
    );
    report.check(
        "stops cleanly on SIGTERM",
        terminated.is_ok(),
        format!("{terminated:?}"),
    );
    report.elapsed = started.elapsed();
    report
}
