//! Crash loop: under steady load from several concurrent clients, SIGKILL the real gateway
//! binary at random moments, restart it on the same data dir, and repeat. Afterwards every
//! event that was answered 200 must have reached the simulator at least once.
//!
//! The load keeps group commits in flight all the time and delivery runs concurrently, so a
//! random moment falls during both; every third kill also waits (up to 250 ms) until an
//! ingest request is in flight, so kills land during group commits however fast they are.
//! Each kill records the evidence (ingest requests waiting for their commit, Refiner calls
//! in flight at the simulator, a replay under way).
//!
//! Replay: before the first cycle, a second stream of events is sent to the `hooked` source
//! while Refiner refuses the calls (the simulator answers 400 to as many calls), so they are
//! dead-lettered. From the first restart on, a client replays the dead letters through the
//! management API in small chunks while the kills go on; after the last cycle every one of
//! them must have been delivered too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use refiner_gateway::sim::Faults;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize};
use std::sync::Arc;

use crate::harness::{
    metric_sum, metrics_text, mib, scratch_dir, start_sim, wait_for, Gateway, Spec, SpoolFile,
    ADMIN_TOKEN, OTHER_KEY,
};
use crate::load::Shared;
use crate::load::{event_id, Load, LoadSpec};
use crate::report::{percent, secs, Report};
use crate::witness::{CallTimes, Cause, Witness};

#[derive(Debug, Clone)]
pub struct CrashParams {
    pub cycles: usize,
    pub clients: usize,
    pub batch: usize,
    pub pace: Duration,
    /// Each cycle runs for a random time in this range before the SIGKILL.
    pub cycle_ms: (u64, u64),
    /// Latency the simulator adds to every call (keeps calls in flight).
    pub sim_latency_ms: u64,
    pub drain_limit: Duration,
    pub seed: u64,
    /// Events dead-lettered before the first cycle and replayed during the cycles (0: none).
    pub replay_events: u64,
    /// Dead letters per replay call, and the pause between calls.
    pub replay_chunk: u64,
    pub replay_pace: Duration,
}

impl CrashParams {
    pub fn quick() -> CrashParams {
        CrashParams {
            cycles: 10,
            clients: 4,
            batch: 10,
            pace: Duration::from_millis(25),
            cycle_ms: (800, 2500),
            sim_latency_ms: 2,
            drain_limit: Duration::from_secs(60),
            seed: 7,
            replay_events: 2000,
            replay_chunk: 25,
            replay_pace: Duration::from_millis(150),
        }
    }
}

pub async fn run(params: CrashParams) -> Report {
    let started = Instant::now();
    let mut report = Report::new("Crash loop");
    report.ran = format!(
        "{} SIGKILL/restart cycles of the real binary, each after a random {}–{} ms (every \
         third then waits for an ingest request in flight); {} \
         clients sending {}-event batches every {} ms (retrying until 200); simulator \
         latency {} ms; {} dead letters replayed {} per call every {} ms during the cycles; \
         seed {}",
        params.cycles,
        params.cycle_ms.0,
        params.cycle_ms.1,
        params.clients,
        params.batch,
        params.pace.as_millis(),
        params.sim_latency_ms,
        params.replay_events,
        params.replay_chunk,
        params.replay_pace.as_millis(),
        params.seed
    );
    let sim = start_sim(
        0,
        Faults {
            latency_ms: params.sim_latency_ms,
            count_400: params.replay_events,
            ..Faults::none()
        },
        200_000,
    )
    .await;
    let witness = Witness::start(sim.state(), false);
    let scratch = scratch_dir("crash");
    let data_dir = scratch.path().join("data");
    // Strict per-user order: the first deliveries of every user are checked in order.
    let spec = Spec::new(&data_dir, &sim.url()).delivery("per_user_window", 1);
    let ready_limit = Duration::from_secs(30);
    let mut gateway = Gateway::start(&spec, scratch.path(), ready_limit).await;

    // The events to replay: refused by Refiner (400) and dead-lettered.
    let mut replay_spec = LoadSpec::new("replay", 2, 50, Duration::ZERO);
    replay_spec.write_key = OTHER_KEY;
    replay_spec.events_per_client = params.replay_events / 2;
    let mut dead_lettered = 0;
    let replay_shared = if params.replay_events > 0 {
        let shared = Load::start(replay_spec.clone(), &gateway.address)
            .finish()
            .await;
        let acked = shared.acked();
        let data_dir = data_dir.clone();
        let result = wait_for(
            Duration::from_secs(60),
            "the events to replay are dead letters",
            || {
                let data_dir = data_dir.clone();
                async move {
                    let dead = SpoolFile::read(&data_dir)
                        .map(|f| f.dead_letters)
                        .unwrap_or(0);
                    if dead >= acked {
                        Ok(dead)
                    } else {
                        Err(format!("{dead} of {acked} dead-lettered"))
                    }
                }
            },
        )
        .await;
        dead_lettered = result.unwrap_or_else(|e| panic!("{e}"));
        Some(shared)
    } else {
        None
    };

    let load_spec = LoadSpec::new("crash", params.clients, params.batch, params.pace);
    let load = Load::start(load_spec.clone(), &gateway.address);
    let replay = Arc::new(Replay::default());
    let mut replay_task = None;
    let mut rng = fastrand::Rng::with_seed(params.seed);

    let mut restarts = Vec::new();
    let mut with_ingest_in_flight = 0;
    let mut with_calls_in_flight = 0;
    let mut during_replay = 0;
    let mut replay_call_in_flight = 0;
    let mut peak_rss = 0;
    let mut cut_ingest: HashSet<String> = HashSet::new();
    let mut journaled: Vec<HashSet<String>> = Vec::new();
    let mut saved_by_journal = 0u64;
    let metrics_client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    let mut process_metrics = [0.0f64; PROCESS_METRICS.len()];
    for cycle in 0..params.cycles {
        let wait = rng.u64(params.cycle_ms.0..=params.cycle_ms.1);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        // What the dying process measured: commit and call times (each process starts
        // its counters at zero, so the sums over kills cover the whole run but the tail
        // of each process's life).
        if let Ok(text) = metrics_text(&metrics_client, &gateway.address).await {
            for (i, name) in PROCESS_METRICS.iter().enumerate() {
                process_metrics[i] += metric_sum(&text, name, &[]);
            }
        }
        // Every third kill waits (up to 250 ms) for an ingest request to be in flight, so
        // some kills land during a group commit however fast commits are; the others fall
        // wherever the random wait ends.
        if cycle % 3 == 0 {
            let deadline = Instant::now() + Duration::from_millis(250);
            while load.shared.in_flight.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        }
        let ingest_in_flight = load.shared.in_flight.load(Ordering::SeqCst);
        let replay_calls = replay.in_flight.load(Ordering::SeqCst);
        let replaying =
            replay.started.load(Ordering::SeqCst) && !replay.done.load(Ordering::SeqCst);
        peak_rss = peak_rss.max(gateway.memory().hwm);
        // Events of ingest requests the kill may cut: sent, not yet answered 200.
        for k in 0..params.clients {
            let acked = load.shared.acked_upto[k].load(Ordering::SeqCst);
            let sent = load.shared.sent_upto[k].load(Ordering::SeqCst);
            cut_ingest.extend((acked..sent).map(|n| event_id("crash", k, n)));
        }
        let calls_in_flight = witness.before_kill();
        gateway.kill().await;
        witness.after_kill();
        // What the killed process had written to its delivered journal (answers it had
        // received; absent with a gateway that keeps none).
        let names = journaled_events(&data_dir);
        // Events the killed process had been answered 2xx for and had not acked yet: without
        // the journal, the next process would send each of them again.
        if !names.is_empty() {
            if let Ok(queued) = SpoolFile::events(&data_dir) {
                saved_by_journal += queued
                    .iter()
                    .filter(|(message_id, _)| names.contains(message_id))
                    .count() as u64;
            }
        }
        journaled.push(names);
        if replaying || replay_calls > 0 {
            during_replay += 1;
        }
        if replay_calls > 0 {
            replay_call_in_flight += 1;
        }
        if ingest_in_flight > 0 {
            with_ingest_in_flight += 1;
        }
        if calls_in_flight > 0 {
            with_calls_in_flight += 1;
        }
        let acked = load.shared.acked();
        let delivered = witness.with(|d| d.tracks.len());
        eprintln!(
            "[crash] cycle {}/{}: SIGKILL after {wait} ms with {ingest_in_flight} ingest \
             requests, {calls_in_flight} Refiner calls and {replay_calls} replay calls in \
             flight (replay under way: {replaying}); {acked} acked, {delivered} delivered so far",
            cycle + 1,
            params.cycles
        );
        witness.restarting();
        gateway = Gateway::start(&spec, scratch.path(), ready_limit).await;
        restarts.push(gateway.ready_after);
        load.shared.set_address(&gateway.address);
        if replay_task.is_none() && params.replay_events > 0 {
            replay_task = Some(tokio::spawn(drive_replay(
                load.shared.clone(),
                replay.clone(),
                params.replay_chunk,
                params.replay_pace,
            )));
        }
    }
    // Let the last process take load for a moment, then stop the clients.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let shared = load.stop().await;
    let stopped = Instant::now();

    let acked: Vec<(usize, u64)> = (0..params.clients)
        .map(|k| (k, shared.acked_upto[k].load(Ordering::SeqCst)))
        .collect();
    let replay_acked: Vec<(usize, u64)> = replay_shared
        .as_ref()
        .map(|shared| {
            (0..replay_spec.clients)
                .map(|k| (k, shared.acked_upto[k].load(Ordering::SeqCst)))
                .collect()
        })
        .unwrap_or_default();
    let accepted: u64 = acked.iter().map(|(_, n)| n).sum();
    let replay_accepted: u64 = replay_acked.iter().map(|(_, n)| n).sum();
    let missing = |delivered: &crate::witness::Delivered| {
        let mut missing = 0u64;
        for (prefix, streams) in [("crash", &acked), ("replay", &replay_acked)] {
            for &(k, upto) in streams {
                for n in 0..upto {
                    if !delivered.contains(&event_id(prefix, k, n)) {
                        missing += 1;
                    }
                }
            }
        }
        missing
    };
    let drained = wait_for(
        params.drain_limit,
        "every acknowledged event delivered",
        || {
            let witness = witness.clone();
            let data_dir = data_dir.clone();
            async move {
                let missing = witness.with(missing);
                let queued = SpoolFile::read(&data_dir)
                    .map(|f| f.queued)
                    .unwrap_or(u64::MAX);
                if missing == 0 && queued == 0 {
                    Ok(())
                } else {
                    Err(format!(
                        "{missing} acknowledged events not delivered, {queued} queued"
                    ))
                }
            }
        },
    )
    .await;
    let drain_time = stopped.elapsed();
    replay.stop.store(true, Ordering::SeqCst);
    if let Some(task) = replay_task {
        let _ = task.await;
    }
    peak_rss = peak_rss.max(gateway.memory().hwm);
    let terminated = gateway.terminate().await;
    let file = SpoolFile::read(&data_dir);
    let integrity = SpoolFile::integrity(&data_dir);
    let delivered = witness.finish();
    sim.stop().await;

    let lost = missing(&delivered);
    let unique = delivered.tracks.len() as u64;
    let duplicates = delivered.duplicates();
    let sent_unacked: Vec<(usize, u64, u64)> = (0..params.clients)
        .map(|k| {
            (
                k,
                shared.acked_upto[k].load(Ordering::SeqCst),
                shared.sent_upto[k].load(Ordering::SeqCst),
            )
        })
        .collect();
    let unacked: u64 = sent_unacked.iter().map(|(_, a, s)| s - a).sum();
    let unacked_delivered: u64 = sent_unacked
        .iter()
        .map(|&(k, a, s)| {
            (a..s)
                .filter(|n| delivered.contains(&event_id("crash", k, *n)))
                .count() as u64
        })
        .sum();
    let order_violations = order_violations(&delivered, &acked, &load_spec);
    restarts.sort();
    let median_restart = restarts
        .get(restarts.len() / 2)
        .copied()
        .unwrap_or_default();
    let max_restart = restarts.last().copied().unwrap_or_default();

    report.figure("cycles", params.cycles);
    report.figure(
        "accepted (answered 200)",
        format!(
            "{} ({accepted} live, {replay_accepted} dead-lettered then replayed)",
            accepted + replay_accepted
        ),
    );
    report.figure("delivered (distinct events)", unique);
    report.figure("lost", lost);
    report.figure(
        "duplicates",
        format!(
            "{duplicates} ({} of delivered)",
            percent(duplicates, unique)
        ),
    );
    report.figure(
        "duplicates per kill",
        format!("{:.1}", duplicates as f64 / params.cycles.max(1) as f64),
    );
    let classified = delivered.classify(LEASE_MS);
    let mut by_cause: BTreeMap<Cause, u64> = BTreeMap::new();
    let mut per_kill = vec![0u64; delivered.kills.len()];
    let mut gaps: Vec<i64> = Vec::new();
    let mut replayed_dups = 0u64;
    let mut cut_dups = 0u64;
    let mut journaled_dups = 0u64;
    let mut logged_late = 0u64;
    for c in &classified {
        *by_cause.entry(c.cause).or_default() += 1;
        if let Some(i) = c
            .kill
            .filter(|_| matches!(c.cause, Cause::InFlightAtKill | Cause::AnsweredBeforeKill))
        {
            per_kill[i] += 1;
        }
        gaps.extend(c.answer_to_kill_ms);
        if c.repeat.event.starts_with("replay-") {
            replayed_dups += 1;
        }
        if c.logged_after_kill {
            logged_late += 1;
        }
        if cut_ingest.contains(&c.repeat.event) {
            cut_dups += 1;
        }
        if c.kill
            .and_then(|i| journaled.get(i))
            .is_some_and(|names| names.contains(&c.repeat.event))
        {
            journaled_dups += 1;
        }
    }
    gaps.sort_unstable();
    for (i, mark) in delivered.kills.iter().enumerate() {
        let in_flight_dups = classified
            .iter()
            .filter(|c| c.kill == Some(i) && c.cause == Cause::InFlightAtKill)
            .count();
        let answered: Vec<i64> = classified
            .iter()
            .filter(|c| c.kill == Some(i) && c.cause == Cause::AnsweredBeforeKill)
            .filter_map(|c| c.answer_to_kill_ms)
            .collect();
        if std::env::var_os("RELIABILITY_DUPLICATE_DETAIL").is_some() {
            for c in classified.iter().filter(|c| c.kill == Some(i)) {
                eprintln!(
                    "[crash]   {} {:?}: first {:?}, again {:?}; kill {:?}",
                    c.repeat.event,
                    c.cause,
                    c.repeat.first,
                    c.repeat.again,
                    (mark.received_before, mark.boundary, mark.at_ms)
                );
            }
        }
        eprintln!(
            "[crash] kill {}: {} calls in flight → {in_flight_dups} repeated; {} answered \
             before the kill repeated (answer → kill ms: {answered:?})",
            i + 1,
            mark.in_flight.len(),
            answered.len()
        );
    }
    report.figure(
        "duplicates by cause",
        by_cause
            .iter()
            .map(|(cause, n)| format!("{}: {n}", cause.label()))
            .collect::<Vec<_>>()
            .join(", "),
    );
    report.figure(
        "duplicates whose first call the simulator logged after the killed process was gone",
        format!("{logged_late} (counted as in flight at the kill)"),
    );
    report.figure(
        "duplicates answered before a kill: answer → kill",
        gap_summary(&gaps),
    );
    report.figure(
        "duplicates per kill (kill-caused)",
        format!(
            "max {}, median {}, kills with none {}",
            per_kill.iter().max().copied().unwrap_or(0),
            {
                let mut sorted = per_kill.clone();
                sorted.sort_unstable();
                sorted.get(sorted.len() / 2).copied().unwrap_or(0)
            },
            per_kill.iter().filter(|n| **n == 0).count()
        ),
    );
    report.figure(
        "duplicates among replayed dead letters",
        format!("{replayed_dups} (each counted under its cause above)"),
    );
    report.figure(
        "duplicates among events of ingest requests cut by a kill",
        format!("{cut_dups} (each counted under its cause above)"),
    );
    report.figure(
        "duplicates whose first answer was in the killed process's delivered journal",
        format!(
            "{journaled_dups} (of {} journal entries found at the kills; {saved_by_journal} of \
             them still queued at the kill, acked by the next process without a call)",
            journaled.iter().map(HashSet::len).sum::<usize>()
        ),
    );
    report.figure(
        "Refiner calls by endpoint",
        format!("{:?}", delivered.by_path),
    );
    let mean = |sum: usize, count: usize| {
        if process_metrics[count] > 0.0 {
            process_metrics[sum] / process_metrics[count]
        } else {
            0.0
        }
    };
    report.figure(
        "gateway-side means (killed processes)",
        format!(
            "spool commit {:.2} ms over {} transactions of {:.1} commands; Refiner call {:.2} ms",
            mean(0, 1) * 1000.0,
            process_metrics[1],
            mean(2, 3),
            mean(4, 5) * 1000.0
        ),
    );
    report.figure(
        "sent but unanswered when stopped",
        format!("{unacked} ({unacked_delivered} of them delivered anyway)"),
    );
    report.figure(
        "kills with ingest requests in flight",
        format!("{with_ingest_in_flight}/{}", params.cycles),
    );
    report.figure(
        "kills with Refiner calls in flight",
        format!("{with_calls_in_flight}/{}", params.cycles),
    );
    report.figure(
        "restart to /readyz 200",
        format!("median {}, max {}", secs(median_restart), secs(max_restart)),
    );
    report.figure(
        "kills during replay",
        format!(
            "{during_replay}/{} ({replay_call_in_flight} with a replay call in flight)",
            params.cycles
        ),
    );
    report.figure(
        "replay",
        format!(
            "{dead_lettered} dead letters; {} replay calls answered 200, reporting {} \
             replayed (a call killed before its answer may have replayed its chunk); \
             other answers {:?}",
            replay.calls.load(Ordering::SeqCst),
            replay.replayed.load(Ordering::SeqCst),
            replay.other.lock().expect("lock")
        ),
    );
    report.figure("drain after the last cycle", secs(drain_time));
    report.figure("ingest answers", format!("{:?}", shared.status_counts()));
    report.figure("Refiner calls", format!("{:?}", delivered.statuses));
    report.figure("peak RSS of a gateway process", mib(peak_rss));

    report.check(
        "no event answered 200 is lost",
        lost == 0 && drained.is_ok(),
        match &drained {
            Ok(()) => format!("{lost} lost of {}", accepted + replay_accepted),
            Err(e) => e.clone(),
        },
    );
    let unexpected = shared.unexpected.lock().expect("lock").clone();
    report.check(
        "only 200, 429 or 503 answers",
        unexpected.is_empty(),
        format!("{unexpected:?}"),
    );
    report.check(
        "kills landed during ingest and during delivery",
        with_ingest_in_flight > 0 && with_calls_in_flight > 0,
        format!(
            "{with_ingest_in_flight} kills with ingest requests in flight, \
             {with_calls_in_flight} with Refiner calls in flight"
        ),
    );
    if params.replay_events > 0 {
        report.check(
            "replay finished during the cycles",
            replay.done.load(Ordering::SeqCst),
            format!(
                "{} replayed of {dead_lettered}",
                replay.replayed.load(Ordering::SeqCst)
            ),
        );
    }
    report.check(
        "per-user order of first deliveries kept",
        order_violations.is_empty(),
        format!(
            "{} users out of order: {order_violations:?}",
            order_violations.len()
        ),
    );
    match file {
        Ok(file) => report.check(
            "spool empty, nothing dead-lettered",
            file.queued == 0 && file.dead_letters == 0,
            format!("{} queued, {} dead letters", file.queued, file.dead_letters),
        ),
        Err(e) => report.check("spool empty, nothing dead-lettered", false, e),
    }
    report.check(
        "spool file passes integrity_check",
        integrity.as_deref() == Ok("ok"),
        format!("{integrity:?}"),
    );
    report.check(
        "the last process stops cleanly on SIGTERM",
        terminated.is_ok(),
        format!("{terminated:?}"),
    );
    report.figure("duplicate target ≤ 0.1 %", {
        let rate = if unique == 0 {
            0.0
        } else {
            duplicates as f64 * 100.0 / unique as f64
        };
        if rate <= 0.1 {
            "met".to_string()
        } else {
            format!("not met ({rate:.3} %)")
        }
    });
    report.elapsed = started.elapsed();
    report
}

/// Sums and counts read from each process's `/metrics` before it is killed.
const PROCESS_METRICS: [&str; 6] = [
    "gateway_spool_commit_seconds_sum",
    "gateway_spool_commit_seconds_count",
    "gateway_spool_group_commands_sum",
    "gateway_spool_group_commands_count",
    "gateway_refiner_call_duration_seconds_sum",
    "gateway_refiner_call_duration_seconds_count",
];

/// The `messageId`s in the delivered journal of `data_dir` (`delivered/*.journal`, lines
/// `[seq, source, messageId]`).
fn journaled_events(data_dir: &std::path::Path) -> HashSet<String> {
    let Ok(entries) = std::fs::read_dir(data_dir.join("delivered")) else {
        return HashSet::new();
    };
    let mut names = HashSet::new();
    for entry in entries.flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines() {
            if let Ok((_, _, name)) = serde_json::from_str::<(i64, String, String)>(line) {
                names.insert(name);
            }
        }
    }
    names
}

/// The gateway's lease (`delivery.lease_secs`, left at its default by the scenario).
const LEASE_MS: u64 = 120_000;

/// Buckets of answer → kill times (ms, estimated to about 1 ms).
fn gap_summary(gaps: &[i64]) -> String {
    if gaps.is_empty() {
        return "none".into();
    }
    let buckets = [
        (i64::MIN, 2, "< 2 ms"),
        (2, 10, "2–10 ms"),
        (10, 50, "10–50 ms"),
        (50, 200, "50–200 ms"),
        (200, i64::MAX, "≥ 200 ms"),
    ];
    let counts: Vec<String> = buckets
        .iter()
        .map(|(lo, hi, name)| {
            let n = gaps.iter().filter(|g| **g >= *lo && **g < *hi).count();
            format!("{name}: {n}")
        })
        .collect();
    format!(
        "{}; median {} ms, max {} ms",
        counts.join(", "),
        gaps[gaps.len() / 2],
        gaps[gaps.len() - 1]
    )
}

/// Users whose events were first delivered out of the order they were accepted in.
fn order_violations(
    delivered: &crate::witness::Delivered,
    acked: &[(usize, u64)],
    spec: &LoadSpec,
) -> Vec<String> {
    let mut last: HashMap<(usize, u64), u64> = HashMap::new();
    let mut violations = Vec::new();
    for &(k, upto) in acked {
        for n in 0..upto {
            let user = n % spec.users as u64;
            let Some(&(_, CallTimes { seq: first, .. })) =
                delivered.tracks.get(&event_id("crash", k, n))
            else {
                continue;
            };
            if let Some(previous) = last.insert((k, user), first) {
                if previous > first {
                    violations.push(format!("{}-u{k}-{user} at event {n}", spec.prefix));
                }
            }
        }
    }
    violations.sort();
    violations.dedup();
    violations
}

/// The replay client's state.
#[derive(Debug, Default)]
struct Replay {
    started: AtomicBool,
    done: AtomicBool,
    stop: AtomicBool,
    in_flight: AtomicUsize,
    calls: AtomicU64,
    replayed: AtomicU64,
    other: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

/// Replays the `hooked` source's dead letters, `chunk` per call every `pace`, following the
/// gateway across restarts, until a call finds none left.
async fn drive_replay(shared: Arc<Shared>, replay: Arc<Replay>, chunk: u64, pace: Duration) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()
        .expect("client");
    replay.started.store(true, Ordering::SeqCst);
    while !replay.stop.load(Ordering::SeqCst) {
        let address = shared.address.read().expect("lock").clone();
        replay.in_flight.fetch_add(1, Ordering::SeqCst);
        let result = client
            .post(format!(
                "{address}/api/events/hooked/dead-letters/replay?limit={chunk}"
            ))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await;
        let answer = match result {
            Ok(response) => {
                let status = response.status().as_u16();
                let body = response.json::<serde_json::Value>().await;
                body.map(|body| (status, body)).map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        replay.in_flight.fetch_sub(1, Ordering::SeqCst);
        match answer {
            Ok((200, body)) => {
                replay.calls.fetch_add(1, Ordering::SeqCst);
                let replayed = body["replayed"].as_u64().unwrap_or(0);
                replay.replayed.fetch_add(replayed, Ordering::SeqCst);
                if body["remaining"].as_u64() == Some(0) {
                    replay.done.store(true, Ordering::SeqCst);
                    return;
                }
            }
            Ok((status, _)) => {
                *replay
                    .other
                    .lock()
                    .expect("lock")
                    .entry(status.to_string())
                    .or_default() += 1;
            }
            Err(_) => {
                *replay
                    .other
                    .lock()
                    .expect("lock")
                    .entry("error".into())
                    .or_default() += 1;
            }
        }
        tokio::time::sleep(pace).await;
    }
}
