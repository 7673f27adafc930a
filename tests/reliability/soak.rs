//! Soak and memory.
//!
//! [`soak`]: steady load at a fixed rate with Refiner (the simulator) delivering normally;
//! the gateway's resident memory is sampled every second from `/proc/<pid>/status`. Start
//! is the sample at the end of the warm-up, end the last sample, peak the kernel's high
//! water mark (VmHWM). Flat means the end is within a tolerance of the start.
//!
//! [`max_ingest_rate`]: how many single-event requests per second the gateway accepts with
//! many clients and delivery off: the long soak runs at half of it.
//!
//! [`backlog`]: a large backlog on disk with Refiner down (nothing listens at its URL): the
//! resident memory while filling and holding it, and how fast a restarted process answers
//! `/readyz` with that backlog (after SIGTERM and after SIGKILL); finally the spool file
//! must hold every event answered 200.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use refiner_gateway::sim::Faults;

use crate::harness::{mib, scratch_dir, start_sim, wait_for, Gateway, Memory, Spec, SpoolFile};
use crate::load::{event_id, percentile_ms, Load, LoadSpec};
use crate::report::{secs, Report};
use crate::witness::Witness;

#[derive(Debug, Clone)]
pub struct SoakParams {
    pub duration: Duration,
    pub warmup: Duration,
    /// Target events per second (the clients' pace is derived from it).
    pub rate: f64,
    pub clients: usize,
    /// Events per request (1: single `/v1/track` requests).
    pub batch: usize,
    /// End may exceed start by this fraction plus `growth_mib` and still be flat.
    pub growth_fraction: f64,
    pub growth_mib: u64,
    pub drain_limit: Duration,
    /// Where the rate came from, for the report.
    pub rate_note: String,
    /// Resident memory the gateway must stay under (VmHWM).
    pub rss_limit_mib: u64,
}

impl SoakParams {
    pub fn quick() -> SoakParams {
        SoakParams {
            duration: Duration::from_secs(60),
            warmup: Duration::from_secs(15),
            rate: 400.0,
            clients: 4,
            batch: 5,
            growth_fraction: 0.10,
            growth_mib: 8,
            drain_limit: Duration::from_secs(60),
            rate_note: "a moderate fixed rate".into(),
            rss_limit_mib: 200,
        }
    }
}

/// A memory sample at a moment of the run.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    memory: Memory,
}

/// Least-squares slope of `y` over `x` (per unit of x).
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let num: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    let den: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

pub async fn soak(params: SoakParams) -> Report {
    let started = Instant::now();
    let mut report = Report::new("Soak and memory");
    let pace = Duration::from_secs_f64(params.clients as f64 * params.batch as f64 / params.rate);
    report.ran = format!(
        "{} s at {:.0} events/s ({}; {} clients, {} per request every {} ms), Refiner \
         simulator delivering normally, default delivery settings; RSS sampled every second, \
         start taken after a {} s warm-up",
        params.duration.as_secs(),
        params.rate,
        params.rate_note,
        params.clients,
        if params.batch == 1 {
            "1 event".to_string()
        } else {
            format!("{} events", params.batch)
        },
        pace.as_millis(),
        params.warmup.as_secs()
    );
    let sim = start_sim(0, Faults::none(), 200_000).await;
    let witness = Witness::start(sim.state(), false);
    let scratch = scratch_dir("soak");
    let data_dir = scratch.path().join("data");
    let spec = Spec::new(&data_dir, &sim.url()).with_default_delivery();
    let gateway = Gateway::start(&spec, scratch.path(), Duration::from_secs(30)).await;
    let mut load_spec = LoadSpec::new("soak", params.clients, params.batch, pace);
    load_spec.users = 50;
    load_spec.record_latency = true;
    let load = Load::start(load_spec, &gateway.address);

    let mut samples = Vec::new();
    let mut max_lag = 0u64;
    let run_started = Instant::now();
    let mut next_report = Duration::from_secs(60);
    while run_started.elapsed() < params.duration {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let at = run_started.elapsed();
        samples.push(Sample {
            at,
            memory: gateway.memory(),
        });
        let acked = load.shared.acked();
        let delivered = witness.with(|d| d.tracks.len() as u64);
        max_lag = max_lag.max(acked.saturating_sub(delivered));
        if at >= next_report {
            next_report += Duration::from_secs(60);
            eprintln!(
                "[soak] {} s: {acked} acked, {delivered} delivered, RSS {}",
                at.as_secs(),
                mib(gateway.memory().rss)
            );
        }
    }
    let shared = load.stop().await;
    let stopped = Instant::now();
    let acked: Vec<(usize, u64)> = (0..params.clients)
        .map(|k| (k, shared.acked_upto[k].load(Ordering::SeqCst)))
        .collect();
    let accepted: u64 = acked.iter().map(|(_, n)| n).sum();
    let missing = |delivered: &crate::witness::Delivered| {
        acked
            .iter()
            .map(|&(k, upto)| {
                (0..upto)
                    .filter(|n| !delivered.contains(&event_id("soak", k, *n)))
                    .count() as u64
            })
            .sum::<u64>()
    };
    let lag_at_end = witness.with(missing);
    let drained = wait_for(params.drain_limit, "everything delivered", || {
        let witness = witness.clone();
        async move {
            let missing = witness.with(missing);
            if missing == 0 {
                Ok(())
            } else {
                Err(format!("{missing} not delivered"))
            }
        }
    })
    .await;
    let drain_time = stopped.elapsed();
    let final_memory = gateway.memory();
    let terminated = gateway.terminate().await;
    let delivered = witness.finish();
    sim.stop().await;

    let after_warmup: Vec<&Sample> = samples.iter().filter(|s| s.at >= params.warmup).collect();
    let start = after_warmup.first().map(|s| s.memory).unwrap_or_default();
    let end = after_warmup.last().map(|s| s.memory).unwrap_or_default();
    let peak_rss = samples.iter().map(|s| s.memory.rss).max().unwrap_or(0);
    let min_rss = after_warmup.iter().map(|s| s.memory.rss).min().unwrap_or(0);
    let points: Vec<(f64, f64)> = after_warmup
        .iter()
        .map(|s| (s.at.as_secs_f64() / 60.0, s.memory.rss as f64 / 1024.0))
        .collect();
    let trend = slope(&points);
    let allowed = (start.rss as f64 * params.growth_fraction) as u64 + params.growth_mib * 1024;
    let flat = end.rss <= start.rss + allowed;
    let latencies = shared.latencies_us.lock().expect("lock").clone();
    let achieved = accepted as f64 / params.duration.as_secs_f64();

    report.figure(
        "accepted",
        format!("{accepted} ({achieved:.0} events/s achieved)"),
    );
    report.figure(
        "ingest latency p50 / p99 / max",
        format!(
            "{:.1} / {:.1} / {:.1} ms",
            percentile_ms(&latencies, 0.5),
            percentile_ms(&latencies, 0.99),
            percentile_ms(&latencies, 1.0)
        ),
    );
    report.figure(
        "RSS start / end / peak",
        format!(
            "{} / {} / {} (VmHWM {})",
            mib(start.rss),
            mib(end.rss),
            mib(peak_rss),
            mib(final_memory.hwm)
        ),
    );
    report.figure(
        "heap (RssAnon) start / end",
        format!("{} / {}", mib(start.anon), mib(end.anon)),
    );
    report.figure(
        "mapped files (RssFile) start / end",
        format!("{} / {}", mib(start.file), mib(end.file)),
    );
    report.figure(
        "RSS trend after warm-up",
        format!(
            "{trend:+.2} MiB/min (least squares; lowest {})",
            mib(min_rss)
        ),
    );
    report.figure(
        "delivery lag",
        format!(
            "at most {max_lag} events behind; {lag_at_end} at the end, drained {} later",
            secs(drain_time)
        ),
    );
    report.figure(
        "Refiner calls",
        format!(
            "{:?}, {} duplicates",
            delivered.statuses,
            delivered.duplicates()
        ),
    );
    report.check(
        "RSS flat",
        flat,
        format!(
            "end {} vs start {} (allowed +{} = {:.0} % + {} MiB)",
            mib(end.rss),
            mib(start.rss),
            mib(allowed),
            params.growth_fraction * 100.0,
            params.growth_mib
        ),
    );
    let allowed_anon =
        (start.anon as f64 * params.growth_fraction) as u64 + params.growth_mib * 1024;
    report.check(
        "heap (RssAnon) flat",
        end.anon <= start.anon + allowed_anon,
        format!(
            "end {} vs start {} (allowed +{})",
            mib(end.anon),
            mib(start.anon),
            mib(allowed_anon)
        ),
    );
    report.check(
        &format!("RSS < {} MiB", params.rss_limit_mib),
        final_memory.hwm < params.rss_limit_mib * 1024,
        format!("VmHWM {}", mib(final_memory.hwm)),
    );
    report.check(
        "everything accepted was delivered",
        drained.is_ok(),
        drained
            .as_ref()
            .map_or_else(|e| e.clone(), |_| format!("{accepted} delivered")),
    );
    let unexpected = shared.unexpected.lock().expect("lock").clone();
    report.check(
        "ingest answered 200",
        unexpected.is_empty(),
        format!("{:?} {unexpected:?}", shared.status_counts()),
    );
    report.check(
        "stops cleanly on SIGTERM",
        terminated.is_ok(),
        format!("{terminated:?}"),
    );
    report.elapsed = started.elapsed();
    report
}

/// The highest rate of single-event requests the gateway accepts (events/s), measured for
/// `duration` with `clients` clients sending as fast as answers come, delivery off.
pub async fn max_ingest_rate(duration: Duration, clients: usize, batch: usize) -> Report {
    let started = Instant::now();
    let mut report = Report::new("Maximum ingest rate");
    report.ran = format!(
        "{clients} clients sending {} per request as fast as answered, for {} s, delivery \
         off",
        if batch == 1 {
            "1 event".to_string()
        } else {
            format!("{batch} events")
        },
        duration.as_secs()
    );
    let scratch = scratch_dir("maxrate");
    let data_dir = scratch.path().join("data");
    let spec = Spec::new(&data_dir, "http://127.0.0.1:9/v1").delivery("enabled", "false");
    let gateway = Gateway::start(&spec, scratch.path(), Duration::from_secs(30)).await;
    let mut load_spec = LoadSpec::new("max", clients, batch, Duration::ZERO);
    load_spec.record_latency = true;
    // Two seconds to warm up, then the measured window.
    let load = Load::start(load_spec, &gateway.address);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = load.shared.acked();
    let window = Instant::now();
    tokio::time::sleep(duration).await;
    let after = load.shared.acked();
    let measured = window.elapsed();
    let shared = load.stop().await;
    let memory = gateway.memory();
    let _ = gateway.terminate().await;
    let rate = (after - before) as f64 / measured.as_secs_f64();
    let latencies = shared.latencies_us.lock().expect("lock").clone();
    report.figure("events/s", format!("{rate:.0}"));
    report.figure(
        "latency p50 / p99",
        format!(
            "{:.1} / {:.1} ms",
            percentile_ms(&latencies, 0.5),
            percentile_ms(&latencies, 0.99)
        ),
    );
    report.figure("answers", format!("{:?}", shared.status_counts()));
    report.figure("RSS at the end", mib(memory.rss));
    report.check("measured", rate > 0.0, format!("{rate:.0} events/s"));
    report.elapsed = started.elapsed();
    report
}

#[derive(Debug, Clone)]
pub struct BacklogParams {
    pub events: u64,
    pub clients: usize,
    pub batch: usize,
    /// Bytes of padding per event.
    pub padding: usize,
    pub rss_limit_mib: u64,
    pub ready_limit: Duration,
    /// How long to watch memory once the backlog is in place (and after each restart).
    pub hold: Duration,
}

impl BacklogParams {
    pub fn quick() -> BacklogParams {
        BacklogParams {
            events: 100_000,
            clients: 4,
            batch: 250,
            padding: 100,
            rss_limit_mib: 200,
            ready_limit: Duration::from_secs(2),
            hold: Duration::from_secs(6),
        }
    }
}

pub async fn backlog(params: BacklogParams) -> Report {
    let started = Instant::now();
    let mut report = Report::new("Backlog with Refiner down");
    report.ran = format!(
        "{} events ({} clients × {}-event batches, ≈{} B each) accepted while nothing listens \
         at Refiner's URL; RSS sampled every second; then SIGTERM + restart and SIGKILL + \
         restart, each timed to /readyz 200 and watched for {} s",
        params.events,
        params.clients,
        params.batch,
        params.padding + 250,
        params.hold.as_secs()
    );
    let scratch = scratch_dir("backlog");
    let data_dir = scratch.path().join("data");
    // Delivery on, Refiner down: the dispatcher and its circuit breaker run against it.
    let spec = Spec::new(&data_dir, "http://127.0.0.1:9/v1").with_default_delivery();
    let gateway = Gateway::start(&spec, scratch.path(), Duration::from_secs(60)).await;
    let mut load_spec = LoadSpec::new("backlog", params.clients, params.batch, Duration::ZERO);
    load_spec.padding = params.padding;
    load_spec.users = 1000;
    load_spec.events_per_client = params.events.div_ceil(params.clients as u64);
    let load = Load::start(load_spec, &gateway.address);
    let fill_started = Instant::now();
    let mut peak_rss = 0u64;
    let mut next_report = Duration::from_secs(30);
    let target = load.spec.events_per_client * params.clients as u64;
    while load.shared.acked() < target && load.shared.unexpected.lock().expect("lock").is_empty() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let memory = gateway.memory();
        peak_rss = peak_rss.max(memory.rss);
        if fill_started.elapsed() >= next_report {
            next_report += Duration::from_secs(30);
            let acked = load.shared.acked();
            eprintln!(
                "[backlog] {} s: {acked} of {target} accepted ({:.0}/s), RSS {} (anon {}, \
                 file {}), spool {} MiB",
                fill_started.elapsed().as_secs(),
                acked as f64 / fill_started.elapsed().as_secs_f64(),
                mib(memory.rss),
                mib(memory.anon),
                mib(memory.file),
                spool_size(&data_dir) / (1024 * 1024)
            );
        }
    }
    let shared = load.finish().await;
    let fill_time = fill_started.elapsed();
    let accepted = shared.acked();
    let memory_filled = gateway.memory();
    let mut hold_peak = 0;
    for _ in 0..params.hold.as_secs() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        hold_peak = hold_peak.max(gateway.memory().rss);
    }
    let hwm_first = gateway.memory().hwm;
    let size = spool_size(&data_dir);

    // Restart after a clean stop.
    let terminated = gateway.terminate().await;
    let gateway = Gateway::start(&spec, scratch.path(), Duration::from_secs(120)).await;
    let ready_after_term = gateway.ready_after;
    let mut peak_after_term = 0;
    for _ in 0..params.hold.as_secs() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak_after_term = peak_after_term.max(gateway.memory().rss);
    }
    let hwm_term = gateway.memory().hwm;
    // Restart after a crash.
    gateway.kill().await;
    let gateway = Gateway::start(&spec, scratch.path(), Duration::from_secs(120)).await;
    let ready_after_kill = gateway.ready_after;
    let mut peak_after_kill = 0;
    for _ in 0..params.hold.as_secs() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak_after_kill = peak_after_kill.max(gateway.memory().rss);
    }
    let hwm_kill = gateway.memory().hwm;
    let terminated_last = gateway.terminate().await;
    let file = SpoolFile::read(&data_dir);

    let unexpected = shared.unexpected.lock().expect("lock").clone();
    let limit_kib = params.rss_limit_mib * 1024;
    let worst = [hwm_first, hwm_term, hwm_kill]
        .into_iter()
        .max()
        .unwrap_or(0);
    report.figure(
        "accepted",
        format!(
            "{accepted} in {} ({:.0} events/s)",
            secs(fill_time),
            accepted as f64 / fill_time.as_secs_f64()
        ),
    );
    report.figure("spool on disk", format!("{} MiB", size / (1024 * 1024)));
    report.figure(
        "RSS while filling / holding (peak)",
        format!("{} / {}", mib(peak_rss), mib(hold_peak)),
    );
    report.figure(
        "RSS with the backlog in place",
        format!(
            "{} (anon {}, mapped files {})",
            mib(memory_filled.rss),
            mib(memory_filled.anon),
            mib(memory_filled.file)
        ),
    );
    report.figure(
        "VmHWM: first process / after SIGTERM restart / after SIGKILL restart",
        format!("{} / {} / {}", mib(hwm_first), mib(hwm_term), mib(hwm_kill)),
    );
    report.figure(
        "restart to /readyz 200",
        format!(
            "{} after SIGTERM, {} after SIGKILL",
            secs(ready_after_term),
            secs(ready_after_kill)
        ),
    );
    report.check(
        &format!("RSS < {} MiB", params.rss_limit_mib),
        worst < limit_kib,
        format!("highest VmHWM {}", mib(worst)),
    );
    report.check(
        &format!(
            "restart answers /readyz within {}",
            secs(params.ready_limit)
        ),
        ready_after_term <= params.ready_limit && ready_after_kill <= params.ready_limit,
        format!(
            "{} after SIGTERM, {} after SIGKILL",
            secs(ready_after_term),
            secs(ready_after_kill)
        ),
    );
    match file {
        Ok(file) => report.check(
            "the spool holds every event answered 200",
            file.queued == accepted && file.dead_letters == 0,
            format!(
                "{} queued for {accepted} accepted, {} dead letters",
                file.queued, file.dead_letters
            ),
        ),
        Err(e) => report.check("the spool holds every event answered 200", false, e),
    }
    report.check(
        "ingest answered 200",
        unexpected.is_empty(),
        format!("{:?} {unexpected:?}", shared.status_counts()),
    );
    report.check(
        "stops cleanly on SIGTERM",
        terminated.is_ok() && terminated_last.is_ok(),
        format!("{terminated:?} {terminated_last:?}"),
    );
    report.elapsed = started.elapsed();
    report
}

/// Bytes of `spool.db` and its write-ahead log.
fn spool_size(data_dir: &std::path::Path) -> u64 {
    ["spool.db", "spool.db-wal"]
        .iter()
        .filter_map(|name| std::fs::metadata(data_dir.join(name)).ok())
        .map(|m| m.len())
        .sum()
}
