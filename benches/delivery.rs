//! Delivery benchmark: the dispatcher against the Refiner simulator, in the same run as a
//! bare reqwest loop.
//!
//! `cargo bench --bench delivery [-- --events N --users U]`
//!
//! Three figures, each measured here and now:
//! 1. Delivery rate with 50 ms of simulated Refiner latency and 64 concurrent calls, against
//!    the ceiling 64 / 0.05 s = 1,280 calls/s.
//! 2. Delivery rate with no added latency, against a bare loop of 64 reqwest tasks posting
//!    `/track-event` to the same simulator as fast as they can (the ratio is the figure).
//! 3. Refiner calls per event for a mix of 50 % page, 20 % identify, 30 % track over 1,000
//!    users (pings throttled, identify-user calls coalesced).
//!
//! Events are first accepted with delivery off, then a gateway with delivery on is started
//! on the same spool and timed until the spool is empty.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use refiner_gateway::config::{DeliverySettings, Secret, Settings, SourceSettings};
use refiner_gateway::sim::{self, Faults, SimHandle, SimOptions};
use refiner_gateway::startup::Application;

const WRITE_KEY: &str = "bench-write-key";
const API_KEY: &str = "bench-refiner-key";

struct Options {
    events: usize,
    users: usize,
}

fn options() -> Options {
    let mut options = Options {
        events: 20_000,
        users: 1000,
    };
    let args: Vec<String> = std::env::args().collect();
    for pair in args.windows(2) {
        match (pair[0].as_str(), pair[1].parse::<usize>()) {
            ("--events", Ok(n)) => options.events = n,
            ("--users", Ok(n)) => options.users = n,
            _ => {}
        }
    }
    options
}

fn settings(data_dir: &std::path::Path, refiner: &str, deliver: bool) -> Settings {
    Settings {
        listen: "127.0.0.1:0".into(),
        data_dir: data_dir.to_path_buf(),
        refiner: refiner_gateway::config::RefinerSettings {
            base_url: refiner.to_string(),
        },
        delivery: DeliverySettings {
            enabled: deliver,
            max_concurrency: 64,
            initial_concurrency: 64,
            poll_interval_ms: 5,
            ..DeliverySettings::default()
        },
        sources: vec![SourceSettings {
            slug: "default".into(),
            write_keys: vec![Secret::new(WRITE_KEY)],
            webhook_secret: None,
            refiner_api_key: Some(Secret::new(API_KEY)),
            webhook_format: Default::default(),
        }],
        ..Settings::default()
    }
}

async fn start(settings: &Settings) -> (String, Application) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = Application::build_with_listener(settings, listener)
        .await
        .expect("gateway");
    (format!("http://127.0.0.1:{}", app.port()), app)
}

/// The kinds of event in a workload.
#[derive(Clone, Copy)]
enum Mix {
    /// Only tracks: every event is one call, so calls/s = events/s.
    Tracks,
    /// 50 % page, 20 % identify, 30 % track.
    Product,
}

fn event(n: usize, users: usize, mix: Mix) -> String {
    let user = n % users;
    let kind = match mix {
        Mix::Tracks => 9,
        Mix::Product => (n / users * 7 + user) % 10,
    };
    match kind {
        0..=4 => format!(
            r#"{{"type":"page","userId":"user-{user}","name":"Pricing","messageId":"m-{n}"}}"#
        ),
        5 | 6 => format!(
            r#"{{"type":"identify","userId":"user-{user}","messageId":"m-{n}","traits":{{"email":"user-{user}@example.com","plan":"pro","seats":{n}}}}}"#
        ),
        _ => format!(
            r#"{{"type":"track","userId":"user-{user}","event":"Report Exported","messageId":"m-{n}"}}"#
        ),
    }
}

/// Accepts `events` events into a spool in `data_dir` (delivery off).
async fn fill(data_dir: &std::path::Path, events: usize, users: usize, mix: Mix) {
    let (url, app) = start(&settings(data_dir, "http://127.0.0.1:9/v1", false)).await;
    let handle = app.handle();
    let task = tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::new();
    for chunk in (0..events).collect::<Vec<_>>().chunks(500) {
        let items: Vec<String> = chunk.iter().map(|&n| event(n, users, mix)).collect();
        let body = format!(
            r#"{{"writeKey":"{WRITE_KEY}","batch":[{}]}}"#,
            items.join(",")
        );
        let response = client
            .post(format!("{url}/v1/batch"))
            .body(body)
            .send()
            .await
            .expect("ingest");
        assert!(
            response.status().is_success(),
            "ingest failed: {}",
            response.status()
        );
    }
    handle.stop(true).await;
    let _ = task.await;
}

/// Starts delivery on a filled spool and times it until the spool is empty.
async fn drain(data_dir: &std::path::Path, simulator: &SimHandle) -> (Duration, u64) {
    let before = simulator.state().call_stats().total;
    let (_, app) = start(&settings(data_dir, &simulator.url(), true)).await;
    let spool = app.spool();
    let handle = app.handle();
    let started = Instant::now();
    let task = tokio::spawn(app.run_until_stopped());
    loop {
        let stats = spool.stats().await.expect("stats");
        if stats.depth == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            panic!(
                "delivery did not drain within 10 minutes ({} left)",
                stats.depth
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    handle.stop(true).await;
    let _ = task.await;
    (elapsed, simulator.state().call_stats().total - before)
}

/// A bare loop: 64 reqwest tasks posting /track-event for `seconds`.
async fn bare_loop(simulator: &SimHandle, seconds: u64) -> f64 {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .expect("client");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let url = format!("{}/track-event", simulator.url());
    let started = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let (client, stop, done, url) = (client.clone(), stop.clone(), done.clone(), url.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let body = serde_json::json!({"id": format!("bare-{i}-{}", n % 16), "event": "Report Exported"});
                    let ok = client
                        .post(&url)
                        .bearer_auth(API_KEY)
                        .json(&body)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if ok {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let options = options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut sim_options = SimOptions::with_key(API_KEY);
        sim_options.log_capacity = 1000;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let simulator = sim::spawn(listener, sim_options).await.expect("simulator");
        println!(
            "delivery benchmark: {} events over {} users, {} cores",
            options.events,
            options.users,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );

        // 1. 50 ms latency, 64 concurrent calls.
        let latency_events = options.events.min(12_000);
        simulator
            .state()
            .set_faults(Faults {
                latency_ms: 50,
                ..Faults::default()
            })
            .expect("faults");
        let dir = tempfile::tempdir().expect("temp dir");
        fill(dir.path(), latency_events, options.users, Mix::Tracks).await;
        let (elapsed, calls) = drain(dir.path(), &simulator).await;
        let rate = calls as f64 / elapsed.as_secs_f64();
        println!(
            "50 ms latency:  {calls} calls in {:.2} s = {rate:.0} calls/s; ceiling 64/0.05 s = 1280; ratio {:.2} (target >= 0.9)",
            elapsed.as_secs_f64(),
            rate / 1280.0
        );

        // 2. No latency, against a bare reqwest loop.
        simulator.state().set_faults(Faults::default()).expect("faults");
        let bare = bare_loop(&simulator, 5).await;
        let dir = tempfile::tempdir().expect("temp dir");
        fill(dir.path(), options.events, options.users, Mix::Tracks).await;
        let (elapsed, calls) = drain(dir.path(), &simulator).await;
        let rate = calls as f64 / elapsed.as_secs_f64();
        println!(
            "0 ms latency:   gateway {rate:.0} calls/s ({calls} calls in {:.2} s), bare reqwest loop {bare:.0} calls/s; ratio {:.2} (target >= 0.4)",
            elapsed.as_secs_f64(),
            rate / bare
        );

        // 3. Calls per event on a product mix.
        let dir = tempfile::tempdir().expect("temp dir");
        fill(dir.path(), options.events, options.users, Mix::Product).await;
        let (elapsed, calls) = drain(dir.path(), &simulator).await;
        println!(
            "product mix:    {calls} calls for {} events = {:.3} calls/event (target <= 0.6), drained in {:.2} s",
            options.events,
            calls as f64 / options.events as f64,
            elapsed.as_secs_f64()
        );
        simulator.stop().await;
    });
}
