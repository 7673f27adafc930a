//! Refiner outage: under steady load, the simulator answers every call 503, then drops every
//! connection without answering, then is stopped (connections refused), and finally comes
//! back on the same port. Ingest must keep answering 200 throughout; afterwards the backlog
//! must drain completely, with nothing dead-lettered (every failure was retryable and the
//! outage is far inside `delivery.max_age_secs`).

use std::time::{Duration, Instant};

use refiner_gateway::sim::Faults;

use crate::harness::{mib, scratch_dir, start_sim, wait_for, Gateway, Spec, SpoolFile};
use crate::load::{event_id, Load, LoadSpec};
use crate::report::{secs, Report};
use crate::witness::Witness;

#[derive(Debug, Clone)]
pub struct OutageParams {
    pub clients: usize,
    pub batch: usize,
    pub pace: Duration,
    /// Normal delivery before the outage.
    pub before: Duration,
    /// Every call answered 503.
    pub unavailable: Duration,
    /// Every connection dropped without an answer.
    pub dropped: Duration,
    /// The simulator stopped: connections refused.
    pub refused: Duration,
    pub drain_limit: Duration,
    /// Use the gateway's default `[delivery]` settings instead of test-sized timings.
    pub default_delivery: bool,
}

impl OutageParams {
    pub fn quick() -> OutageParams {
        OutageParams {
            clients: 3,
            batch: 10,
            pace: Duration::from_millis(50),
            before: Duration::from_secs(2),
            unavailable: Duration::from_secs(3),
            dropped: Duration::from_secs(5),
            refused: Duration::from_secs(3),
            drain_limit: Duration::from_secs(90),
            default_delivery: false,
        }
    }
}

pub async fn run(params: OutageParams) -> Report {
    let started = Instant::now();
    let mut report = Report::new("Refiner outage");
    report.ran = format!(
        "{} clients × {}-event batches every {} ms; {} s normal, then {} s of 503s, {} s of \
         dropped connections, {} s refused (simulator stopped), then back; {} delivery settings",
        params.clients,
        params.batch,
        params.pace.as_millis(),
        params.before.as_secs(),
        params.unavailable.as_secs(),
        params.dropped.as_secs(),
        params.refused.as_secs(),
        if params.default_delivery {
            "default"
        } else {
            "test-sized (retry base 100 ms, cap 2 s, breaker cooldown 1 s)"
        }
    );
    let sim = start_sim(0, Faults::none(), 200_000).await;
    let port = sim.port();
    let witness = Witness::start(sim.state(), false);
    let scratch = scratch_dir("outage");
    let data_dir = scratch.path().join("data");
    let mut spec = Spec::new(&data_dir, &sim.url());
    if params.default_delivery {
        spec = spec.with_default_delivery();
    }
    let gateway = Gateway::start(&spec, scratch.path(), Duration::from_secs(30)).await;
    let load_spec = LoadSpec::new("outage", params.clients, params.batch, params.pace);
    let load = Load::start(load_spec, &gateway.address);

    tokio::time::sleep(params.before).await;
    let calls_before = witness.with(|d| d.calls);
    sim.state()
        .set_faults(Faults {
            rate_503: 1.0,
            ..Faults::none()
        })
        .expect("faults");
    tokio::time::sleep(params.unavailable).await;
    let calls_after_503 = witness.with(|d| d.calls);
    sim.state()
        .set_faults(Faults {
            rate_drop: 1.0,
            ..Faults::none()
        })
        .expect("faults");
    tokio::time::sleep(params.dropped).await;
    let calls_after_drop = witness.with(|d| d.calls);
    witness.poll();
    sim.stop().await;
    tokio::time::sleep(params.refused).await;
    let sim = start_sim(port, Faults::none(), 200_000).await;
    witness.replace(sim.state());
    let recovered = Instant::now();
    let shared = load.stop().await;
    let acked: Vec<(usize, u64)> = (0..params.clients)
        .map(|k| {
            (
                k,
                shared.acked_upto[k].load(std::sync::atomic::Ordering::SeqCst),
            )
        })
        .collect();
    let accepted: u64 = acked.iter().map(|(_, n)| n).sum();
    let missing = |delivered: &crate::witness::Delivered| {
        acked
            .iter()
            .map(|&(k, upto)| {
                (0..upto)
                    .filter(|n| !delivered.contains(&event_id("outage", k, *n)))
                    .count() as u64
            })
            .sum::<u64>()
    };
    let backlog_at_recovery = witness.with(missing);
    let memory_at_recovery = gateway.memory();
    let first_delivery: std::sync::Mutex<Option<Duration>> = std::sync::Mutex::new(None);
    let drained = wait_for(params.drain_limit, "the backlog drains", || {
        let witness = witness.clone();
        let data_dir = data_dir.clone();
        let first_delivery = &first_delivery;
        async move {
            let missing = witness.with(missing);
            if missing < backlog_at_recovery {
                first_delivery
                    .lock()
                    .expect("lock")
                    .get_or_insert_with(|| recovered.elapsed());
            }
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
    let drain_time = recovered.elapsed();
    let first_delivery = first_delivery.into_inner().expect("lock");
    let client = reqwest::Client::new();
    let metrics = crate::harness::metrics_text(&client, &gateway.address)
        .await
        .unwrap_or_default();
    let gateway_calls: std::collections::BTreeMap<String, u64> = metrics
        .lines()
        .filter(|l| l.starts_with("gateway_refiner_calls_total{"))
        .filter_map(|l| {
            let status = l.split("status=\"").nth(1)?.split('"').next()?.to_string();
            let value = l.rsplit(' ').next()?.parse::<f64>().ok()? as u64;
            Some((status, value))
        })
        .fold(
            std::collections::BTreeMap::new(),
            |mut map, (status, value)| {
                *map.entry(status).or_default() += value;
                map
            },
        );
    let terminated = gateway.terminate().await;
    let file = SpoolFile::read(&data_dir);
    let delivered = witness.finish();
    sim.stop().await;

    let statuses = shared.status_counts();
    let non_200: u64 = statuses
        .iter()
        .filter(|(status, _)| status.as_str() != "200")
        .map(|(_, n)| n)
        .sum();
    let lost = missing(&delivered);
    report.figure("accepted (answered 200)", accepted);
    report.figure("backlog when Refiner came back", backlog_at_recovery);
    report.figure(
        "drain time after recovery",
        format!(
            "{} (first delivery after {}: the breaker's cooldown)",
            secs(drain_time),
            first_delivery.map_or("—".into(), secs)
        ),
    );
    report.figure(
        "Refiner calls during 503 / drop phases",
        format!(
            "{} / {} (the circuit breaker holds the rest back)",
            calls_after_503 - calls_before,
            calls_after_drop - calls_after_503
        ),
    );
    report.figure(
        "Refiner calls by status, seen by the simulator",
        format!("{:?}", delivered.statuses),
    );
    report.figure(
        "Refiner calls by status, seen by the gateway",
        format!("{gateway_calls:?} (`connection`: dropped or refused)"),
    );
    report.figure(
        "duplicates",
        format!(
            "{} (dropped connections are retried: the simulator did not handle them)",
            delivered.duplicates()
        ),
    );
    report.figure("ingest answers", format!("{statuses:?}"));
    report.figure("RSS at recovery", mib(memory_at_recovery.rss));
    report.check(
        "ingest answered 200 throughout the outage",
        non_200 == 0,
        format!("{statuses:?}"),
    );
    report.check(
        "backlog drained fully",
        drained.is_ok() && lost == 0,
        match &drained {
            Ok(()) => format!("{lost} of {accepted} not delivered"),
            Err(e) => e.clone(),
        },
    );
    match file {
        Ok(file) => report.check(
            "nothing dead-lettered, nothing left queued",
            file.dead_letters == 0 && file.queued == 0,
            format!("{} dead letters, {} queued", file.dead_letters, file.queued),
        ),
        Err(e) => report.check("nothing dead-lettered, nothing left queued", false, e),
    }
    report.check(
        "stops cleanly on SIGTERM",
        terminated.is_ok(),
        format!("{terminated:?}"),
    );
    report.elapsed = started.elapsed();
    report
}
