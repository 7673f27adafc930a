//! Rules benchmark: delivery throughput at 0 ms Refiner latency with 20 rules per event
//! against the same workload without rules, in the same run.
//!
//! `cargo bench --bench filters [-- --events N --users U --rounds R]` (default 20,000 events,
//! 1,000 users, 5 rounds)
//!
//! Each round fills a fresh spool (delivery off) with the same events (60 % track, 40 %
//! identify with six traits), then starts a gateway with delivery on against the Refiner
//! simulator and times it until the spool is empty: once without rules, once with 20. The
//! rules are chosen so that every one is evaluated on every event and none drops anything
//! (18 conditions that never hold, one redaction that applies to every identify, one rename
//! that applies to a tenth of the tracks), so both runs make the same calls. Rounds
//! alternate which runs first, and the medians are compared: cost = 1 − rules / none (target < 10 %).
//! Last, the engine alone: nanoseconds per event of evaluating the 20 rules, beside the
//! mapping's, and their share of the time a delivered event takes.

use std::net::TcpListener;
use std::time::{Duration, Instant};

use refiner_gateway::config::{DeliverySettings, Secret, Settings, SourceFilters, SourceSettings};
use refiner_gateway::sim::{self, SimHandle, SimOptions};
use refiner_gateway::startup::Application;

const WRITE_KEY: &str = "bench-write-key";
const API_KEY: &str = "bench-refiner-key";

/// Twenty rules, every one evaluated on every event.
const RULES: &str = r#"
[environments]
testing = "bench-testing-key"

[[rules]]
name = "heartbeats"
match = { field = "event", in = ["Heartbeat", "Debug", "Ping", "Keepalive"] }
actions = [{ drop = true }]
[[rules]]
name = "internal-users"
match = { field = "userId", starts_with = "internal-" }
actions = [{ drop = true }]
[[rules]]
name = "test-traffic"
match = { field = "context.traits.email", matches = "@(test|qa)\\.example\\.org$" }
actions = [{ route = "testing" }]
[[rules]]
name = "bots"
match = { field = "context.userAgent", matches = "(?i)bot|crawler|spider" }
actions = [{ drop = true }]
[[rules]]
name = "huge-seats"
match = { field = "traits.seats", gt = 1000000000 }
actions = [{ drop = true }]
[[rules]]
name = "negative-seats"
match = { field = "traits.seats", lt = 0 }
actions = [{ drop = true }]
[[rules]]
name = "legacy-plan"
match = { all = [{ field = "type", equals = "identify" }, { field = "traits.plan", in = ["legacy", "trial-2019"] }] }
actions = [{ set_trait = "plan", value = "free" }]
[[rules]]
name = "no-library"
match = { not = { field = "type", in = ["identify", "track", "page", "screen", "group", "alias"] } }
actions = [{ drop = true }]
[[rules]]
name = "staging-app"
match = { field = "context.app.namespace", equals = "com.example.staging" }
actions = [{ route = "testing" }]
[[rules]]
name = "old-library"
match = { field = "context.library.version", starts_with = "0." }
actions = [{ drop = true }]
[[rules]]
name = "group-cleanup"
match = { field = "type", equals = "group" }
actions = [{ remove_account_traits = ["internal_id"] }]
[[rules]]
name = "any-debug"
match = { any = [{ field = "properties.debug", equals = true }, { field = "context.debug", equals = true }] }
actions = [{ drop = true }]
[[rules]]
name = "qa-ids"
match = { field = "userId", matches = "^qa-[0-9]+$" }
actions = [{ route = "testing" }]
[[rules]]
name = "exists-flag"
match = { field = "properties.synthetic", exists = true }
actions = [{ drop = true }]
[[rules]]
name = "not-equals"
match = { all = [{ field = "type", equals = "track" }, { field = "event", not_equals = "Report Exported" }, { field = "event", starts_with = "Zz" }] }
actions = [{ drop = true }]
[[rules]]
name = "page-names"
match = { all = [{ field = "type", equals = "page" }, { field = "name", in = ["Admin", "Debug"] }] }
actions = [{ drop = true }]
[[rules]]
name = "ip-range"
match = { field = "context.ip", starts_with = "10.99." }
actions = [{ drop = true }]
[[rules]]
name = "big-revenue"
match = { field = "properties.revenue", gt = 1e12 }
actions = [{ drop = true }]
[[rules]]
name = "redact"
actions = [{ remove_traits = ["phone", "ip", "city"] }]
[[rules]]
name = "rename"
match = { field = "userId", matches = "^user-[0-9]*0$" }
actions = [{ rename_event = "Report Downloaded" }]
"#;

struct Options {
    events: usize,
    users: usize,
    rounds: usize,
}

fn options() -> Options {
    let mut options = Options {
        events: 20_000,
        users: 1000,
        rounds: 5,
    };
    let args: Vec<String> = std::env::args().collect();
    for pair in args.windows(2) {
        match (pair[0].as_str(), pair[1].parse::<usize>()) {
            ("--events", Ok(n)) => options.events = n,
            ("--users", Ok(n)) => options.users = n,
            ("--rounds", Ok(n)) => options.rounds = n.max(1),
            _ => {}
        }
    }
    options
}

fn settings(data_dir: &std::path::Path, refiner: &str, deliver: bool, rules: bool) -> Settings {
    let mut settings = Settings {
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
    };
    if rules {
        let filters: SourceFilters = toml::from_str(RULES).expect("the benchmark's rules");
        settings.filters.insert("default".into(), filters);
    }
    settings.validate().expect("valid settings");
    settings
}

fn event(n: usize, users: usize) -> String {
    let user = n % users;
    if n % 5 < 2 {
        format!(
            r#"{{"type":"identify","userId":"user-{user}","messageId":"m-{n}","context":{{"ip":"203.0.113.{}"}},"traits":{{"email":"user-{user}@example.com","plan":"pro","seats":{n},"phone":"+1 555 {user}","ip":"203.0.113.7","city":"Lyon"}}}}"#,
            n % 250
        )
    } else {
        format!(
            r#"{{"type":"track","userId":"user-{user}","event":"Report Exported","messageId":"m-{n}","properties":{{"format":"csv"}}}}"#
        )
    }
}

async fn start(settings: &Settings) -> (String, Application) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = Application::build_with_listener(settings, listener)
        .await
        .expect("gateway");
    (format!("http://127.0.0.1:{}", app.port()), app)
}

/// Accepts the workload into a spool in `data_dir` (delivery off).
async fn fill(data_dir: &std::path::Path, options: &Options) {
    let (url, app) = start(&settings(data_dir, "http://127.0.0.1:9/v1", false, false)).await;
    let handle = app.handle();
    let task = tokio::spawn(app.run_until_stopped());
    let client = reqwest::Client::new();
    for chunk in (0..options.events).collect::<Vec<_>>().chunks(500) {
        let items: Vec<String> = chunk.iter().map(|&n| event(n, options.users)).collect();
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
        assert!(response.status().is_success(), "{}", response.status());
    }
    handle.stop(true).await;
    let _ = task.await;
}

/// Delivers a filled spool, timed until it is empty: (seconds, calls).
async fn drain(data_dir: &std::path::Path, simulator: &SimHandle, rules: bool) -> (f64, u64) {
    let before = simulator.state().call_stats().total;
    let (_, app) = start(&settings(data_dir, &simulator.url(), true, rules)).await;
    let spool = app.spool();
    let handle = app.handle();
    let started = Instant::now();
    let task = tokio::spawn(app.run_until_stopped());
    while spool.stats().await.expect("stats").depth > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no drain in 10 min"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    handle.stop(true).await;
    let _ = task.await;
    (elapsed, simulator.state().call_stats().total - before)
}

/// The engine alone: ns per event of the 20 rules, and of the mapping, on the workload's
/// events (best of 5 passes, so a busy machine's pauses do not count).
fn engine_cost(options: &Options) -> (f64, f64) {
    use refiner_gateway::refiner::filters::compile;
    use refiner_gateway::refiner::mapping::{map_named_event, MappingOptions};
    let filters: SourceFilters = toml::from_str(RULES).expect("rules");
    let rules = compile(&filters.rules, &filters.environments).expect("compile");
    let events: Vec<(String, serde_json::Value)> = (0..options.events)
        .map(|n| {
            let value: serde_json::Value =
                serde_json::from_str(&event(n, options.users)).expect("event");
            (value["type"].as_str().unwrap_or("track").to_string(), value)
        })
        .collect();
    let mapping = MappingOptions::default();
    let best = |f: &dyn Fn() -> usize| {
        (0..5)
            .map(|_| {
                let started = Instant::now();
                std::hint::black_box(f());
                started.elapsed().as_nanos() as f64 / events.len() as f64
            })
            .fold(f64::INFINITY, f64::min)
    };
    let evaluate = best(&|| {
        events
            .iter()
            .map(|(kind, event)| rules.evaluate(kind, event).matched.len())
            .sum()
    });
    let map = best(&|| {
        events
            .iter()
            .filter(|(kind, event)| {
                !matches!(
                    map_named_event(kind, event, &mapping),
                    refiner_gateway::refiner::mapping::Mapped::NotForwarded(_)
                )
            })
            .count()
    });
    (evaluate, map)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let options = options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let sim_options = SimOptions {
            log_capacity: 1000,
            ..SimOptions::default()
        };
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let simulator = sim::spawn(listener, sim_options).await.expect("simulator");
        println!(
            "rules benchmark: {} events over {} users, {} rounds, 0 ms latency, {} cores",
            options.events,
            options.users,
            options.rounds,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let (mut none, mut ruled) = (Vec::new(), Vec::new());
        for round in 0..options.rounds {
            // Odd rounds run the rules first: whatever the second run of a round gains or
            // loses (a warmer cache, a simulator with more history) falls on both alike.
            let order = if round % 2 == 0 { [false, true] } else { [true, false] };
            for rules in order {
                let dir = tempfile::tempdir().expect("temp dir");
                fill(dir.path(), &options).await;
                let (seconds, calls) = drain(dir.path(), &simulator, rules).await;
                let rate = options.events as f64 / seconds;
                println!(
                    "round {}: {:<8} {:>7.0} events/s ({calls} calls in {seconds:.2} s)",
                    round + 1,
                    if rules { "20 rules" } else { "no rules" },
                    rate
                );
                if rules { &mut ruled } else { &mut none }.push(rate);
            }
        }
        let paired: Vec<f64> = ruled.iter().zip(&none).map(|(r, n)| r / n).collect();
        println!(
            "per-round ratio rules / none: median {:.3} of {:?}",
            median(paired.clone()),
            paired.iter().map(|r| (r * 1000.0).round() / 1000.0).collect::<Vec<_>>()
        );
        let (none, ruled) = (median(none), median(ruled));
        println!(
            "median: no rules {none:.0} events/s, 20 rules {ruled:.0} events/s; ratio {:.3}, cost {:.1} % (target < 10 %)",
            ruled / none,
            (1.0 - ruled / none) * 100.0
        );
        let (evaluate, map) = engine_cost(&options);
        println!(
            "engine: 20 rules {evaluate:.0} ns/event, mapping {map:.0} ns/event; rules = {:.2} % of the time per delivered event without rules ({:.0} ns)",
            evaluate / (1e9 / none) * 100.0,
            1e9 / none
        );
        simulator.stop().await;
    });
}
