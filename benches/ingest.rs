//! Ingest benchmark: the gateway against a bare actix-web handler, in the same run.
//!
//! `cargo bench --bench ingest [-- --seconds N --connections C]`
//!
//! Both servers run in this process on 127.0.0.1 with the same number of workers; one load
//! generator (keep-alive HTTP/1.1 connections, each sending the next request when the
//! previous answer arrived) drives each for the same time. The baseline handler reads the
//! body and parses it as JSON, then answers `{"success":true}`; the gateway does everything
//! it does in production (auth, validation, normalization, dedup, durable group commit to
//! SQLite, the WAL fsync'd before the answer). Delivery is off, as in an ingest-only
//! deployment (`delivery.enabled = false`): this measures accepting events, and a dispatcher
//! here would only retry against an unreachable Refiner (`cargo bench --bench delivery`
//! measures forwarding). Printed: requests/s and events/s of each, and the ratio
//! gateway / baseline. Because both share the machine with the load generator, the ratio is
//! the figure to compare across machines, not the absolute rates.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpResponse, HttpServer};
use refiner_gateway::config::{DeliverySettings, Secret, Settings, SourceSettings};
use refiner_gateway::startup::Application;

/// The allocator the gateway's binary runs with (`src/main.rs`), so the benchmark measures
/// the gateway as shipped.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WRITE_KEY: &str = "bench-write-key";
const ADMIN: &str = "bench-admin-token-0123456789";

struct Options {
    /// Run only this scenario against only the gateway (`single` or `batch`), for profiling.
    only: Option<String>,
    seconds: u64,
    connections: usize,
    batch_size: usize,
    /// `--pin`: this process (load generator and gateways) on CPU 0, `nats-server` on CPU 1,
    /// so a gateway node has the same one core on either backend and the server a core of
    /// its own, as on separate machines.
    pin: bool,
}

fn options() -> Options {
    let mut options = Options {
        only: None,
        seconds: 10,
        connections: 64,
        batch_size: 100,
        pin: false,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        if args[i] == "--pin" {
            options.pin = true;
            i += 1;
            continue;
        }
        if args[i] == "--only" {
            options.only = args.get(i + 1).cloned();
            i += 2;
            continue;
        }
        let value = args.get(i + 1).and_then(|v| v.parse::<u64>().ok());
        match (args[i].as_str(), value) {
            ("--seconds", Some(v)) => options.seconds = v,
            ("--connections", Some(v)) => options.connections = v as usize,
            ("--batch-size", Some(v)) => options.batch_size = v as usize,
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    options
}

async fn bare(body: web::Bytes) -> HttpResponse {
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(_) => HttpResponse::Ok()
            .content_type("application/json")
            .body(r#"{"success":true}"#),
        Err(_) => HttpResponse::BadRequest().finish(),
    }
}

fn spawn_bare() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let server = HttpServer::new(|| {
        App::new()
            .app_data(web::PayloadConfig::new(1024 * 1024))
            .route("/v1/{any}", web::post().to(bare))
    })
    .listen(listener)
    .expect("listen")
    .run();
    tokio::spawn(server);
    format!("http://127.0.0.1:{port}")
}

async fn spawn_gateway(data_dir: &std::path::Path) -> String {
    spawn_gateway_with(data_dir, |_| {}).await
}

/// A gateway with delivery off, its settings changed by `customize` (the spool backend).
async fn spawn_gateway_with(
    data_dir: &std::path::Path,
    customize: impl FnOnce(&mut Settings),
) -> String {
    let mut settings = Settings {
        listen: "127.0.0.1:0".into(),
        data_dir: data_dir.to_path_buf(),
        sources: vec![SourceSettings {
            slug: "default".into(),
            write_keys: vec![Secret::new(WRITE_KEY)],
            webhook_secret: None,
            refiner_api_key: Some(Secret::new("bench")),
            webhook_format: Default::default(),
        }],
        delivery: DeliverySettings {
            enabled: false,
            ..DeliverySettings::default()
        },
        admin_token: Some(Secret::new(ADMIN)),
        ..Settings::default()
    };
    customize(&mut settings);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let app = Application::build_with_listener(&settings, listener)
        .await
        .expect("gateway");
    let port = app.port();
    tokio::spawn(app.run_until_stopped());
    format!("http://127.0.0.1:{port}")
}

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// A uuid4-like id: real clients send random ids, which land at random places in the dedup
/// index (sequential ids would flatter it).
fn message_id(n: u64) -> String {
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    x ^= x >> 31;
    let y = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    format!("{x:016x}-{y:016x}")
}

fn track(n: u64) -> String {
    format!(
        r#"{{"type":"track","userId":"user-{user}","event":"Order Completed","messageId":"{id}","timestamp":"2026-11-23T10:00:00.000Z","properties":{{"revenue":42.5,"currency":"EUR","items":3}},"context":{{"library":{{"name":"analytics-node","version":"3.1.0"}},"ip":"127.0.0.1"}}}}"#,
        user = n % 1000,
        id = message_id(n)
    )
}

fn single_body() -> String {
    let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    let mut body = track(n);
    body.insert_str(1, &format!(r#""writeKey":"{WRITE_KEY}","#));
    body
}

fn batch_body(size: usize) -> String {
    let mut body = String::from(r#"{"writeKey":""#);
    body.push_str(WRITE_KEY);
    body.push_str(r#"","sentAt":"2026-11-23T10:00:01.000Z","batch":["#);
    for i in 0..size {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&track(SEQUENCE.fetch_add(1, Ordering::Relaxed)));
    }
    body.push_str("]}");
    body
}

struct Run {
    requests: u64,
    events: u64,
    errors: u64,
    elapsed: Duration,
    /// Events answered in each second of the run: a burst absorbed at the append rate
    /// shows as a faster start than the rate that can be sustained.
    per_second: Vec<u64>,
}

impl Run {
    fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

/// Drives `url` from `connections` keep-alive clients for `seconds`. Bodies are built
/// before timing starts is not possible for unique messageIds, so body building is part of
/// the client's cost for both servers alike.
async fn drive(url: String, connections: usize, seconds: u64, batch: Option<usize>) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .build()
            .expect("client");
        let (stop, requests, errors, url) =
            (stop.clone(), requests.clone(), errors.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let body = match batch {
                    Some(size) => batch_body(size),
                    None => single_body(),
                };
                let response = client
                    .post(&url)
                    .header("Content-Type", "application/json")
                    .body(body)
                    .send()
                    .await;
                match response {
                    Ok(r) if r.status().is_success() => {
                        let _ = r.bytes().await;
                        requests.fetch_add(1, Ordering::Relaxed);
                    }
                    failed => {
                        // The first failure is shown: a benchmark of errors measures nothing.
                        if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            match failed {
                                Ok(r) => eprintln!(
                                    "first error: {} {}",
                                    r.status(),
                                    r.text().await.unwrap_or_default()
                                ),
                                Err(e) => eprintln!("first error: {e}"),
                            }
                        }
                    }
                }
            }
        }));
    }
    let mut per_second = Vec::new();
    let mut last = 0;
    for _ in 0..seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = requests.load(Ordering::Relaxed);
        per_second.push((now - last) * batch.unwrap_or(1) as u64);
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = started.elapsed();
    let requests = requests.load(Ordering::Relaxed);
    Run {
        requests,
        events: requests * batch.unwrap_or(1) as u64,
        errors: errors.load(Ordering::Relaxed),
        elapsed,
        per_second,
    }
}

fn report(name: &str, baseline: &Run, gateway: &Run) {
    println!(
        "{name:<22} baseline {:>10.0} req/s {:>10.0} ev/s | gateway {:>10.0} req/s {:>10.0} ev/s | ratio {:.2} | errors {}/{}",
        baseline.requests_per_sec(),
        baseline.events_per_sec(),
        gateway.requests_per_sec(),
        gateway.events_per_sec(),
        gateway.events_per_sec() / baseline.events_per_sec().max(1e-9),
        baseline.errors,
        gateway.errors,
    );
    let seconds = |run: &Run| {
        run.per_second
            .iter()
            .map(|n| format!("{}k", n / 1000))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("    events per second, baseline: {}", seconds(baseline));
    println!("    events per second, gateway:  {}", seconds(gateway));
}

/// CPU time the spool's writer thread has used, in ns (Linux `schedstat`): a per-event
/// cost that the machine's other load disturbs much less than wall-clock rates.
/// Summed over every spool writer of the process (the idle gateway's adds nothing).
fn writer_cpu_ns() -> Option<u64> {
    let mut total = None;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == "spool-writer" {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
            total = Some(total.unwrap_or(0) + ns);
        }
    }
    total
}

/// The spool alone: one task appending requests of `batch` events back to back, then 64
/// tasks appending single events, no HTTP. Shows the writer's ceiling on this machine.
async fn spool_ceiling(seconds: u64, batch: usize) {
    use refiner_gateway::segment::{Event, EventType, UserKey};
    use refiner_gateway::spool::{AppendRequest, Spool, SqliteSpool, SqliteSpoolOptions};
    let dir = tempfile::tempdir().expect("temp dir");
    let spool: Arc<dyn Spool> = Arc::new(
        SqliteSpool::open(
            SqliteSpoolOptions::new(dir.path()),
            refiner_gateway::telemetry::Metrics::new(),
        )
        .expect("spool"),
    );
    let only_singles = std::env::var("SPOOL_ONLY_SINGLES").is_ok();
    for (label, size, tasks) in [("batches", batch, 8usize), ("single events", 1, 64)] {
        if only_singles && size != 1 {
            continue;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let events = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let cpu_before = writer_cpu_ns();
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let (spool, stop, events) = (spool.clone(), stop.clone(), events.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let batch: Vec<Event> = (0..size)
                            .map(|_| {
                                let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
                                Event {
                                    kind: EventType::Track,
                                    message_id: message_id(n),
                                    user_key: UserKey::user_id(&format!("user-{}", n % 1000)),
                                    payload: track(n).into_bytes(),
                                }
                            })
                            .collect();
                        let request = AppendRequest {
                            source: "default".into(),
                            received_at_ms: 0,
                            events: batch,
                        };
                        if spool.append(request).await.is_ok() {
                            events.fetch_add(size as u64, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        for handle in handles {
            let _ = handle.await;
        }
        let appended = events.load(Ordering::Relaxed);
        let rate = appended as f64 / started.elapsed().as_secs_f64();
        // The writer also sorts what was appended, when appends leave it time: its CPU per
        // appended event counts both.
        let cpu = match (cpu_before, writer_cpu_ns()) {
            (Some(before), Some(after)) if appended > 0 => format!(
                ", writer CPU {:.1} µs per event",
                (after - before) as f64 / 1e3 / appended as f64
            ),
            _ => String::new(),
        };
        println!("spool alone, {label}: {rate:.0} events/s{cpu}");
    }
    spool.close().await;
}

fn main() {
    let options = options();
    if options.pin {
        // Before any thread starts: every thread of this process inherits the mask.
        pin(std::process::id(), "0");
    }
    // RUST_LOG=warn shows why the gateways refused requests.
    if let Ok(filter) = std::env::var("RUST_LOG") {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let bare_url = spawn_bare();
        let gateway_url = spawn_gateway(data_dir.path()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        println!(
            "ingest benchmark: {} s per run, {} connections, batches of {} events, {} cores",
            options.seconds,
            options.connections,
            options.batch_size,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        if options.only.as_deref() == Some("backends") {
            backends(&gateway_url, &options).await;
            return;
        }
        if options.only.as_deref() == Some("spool") {
            spool_ceiling(options.seconds, options.batch_size).await;
            return;
        }
        if let Some(only) = &options.only {
            let (path, size) = match only.as_str() {
                "single" => ("/v1/track", None),
                _ => ("/v1/batch", Some(options.batch_size)),
            };
            let run = drive(
                format!("{gateway_url}{path}"),
                options.connections,
                options.seconds,
                size,
            )
            .await;
            println!(
                "gateway {only}: {:.0} req/s {:.0} ev/s, errors {}; events per second: {:?}",
                run.requests_per_sec(),
                run.events_per_sec(),
                run.errors,
                run.per_second
            );
            return;
        }
        // Warm-up, then alternate so drift on a shared machine hits both alike.
        let _ = drive(
            format!("{gateway_url}/v1/track"),
            options.connections,
            1,
            None,
        )
        .await;
        let _ = drive(format!("{bare_url}/v1/track"), options.connections, 1, None).await;

        let baseline = drive(
            format!("{bare_url}/v1/track"),
            options.connections,
            options.seconds,
            None,
        )
        .await;
        let gateway = drive(
            format!("{gateway_url}/v1/track"),
            options.connections,
            options.seconds,
            None,
        )
        .await;
        report("single event", &baseline, &gateway);

        let size = Some(options.batch_size);
        let baseline = drive(
            format!("{bare_url}/v1/batch"),
            options.connections,
            options.seconds,
            size,
        )
        .await;
        let gateway = drive(
            format!("{gateway_url}/v1/batch"),
            options.connections,
            options.seconds,
            size,
        )
        .await;
        report(
            &format!("batch of {}", options.batch_size),
            &baseline,
            &gateway,
        );
    });
}

/// The two spool backends behind the same HTTP ingest, each with the delivery log on (the
/// default) and off: the SQLite gateways against gateways on JetStream (one node, one
/// `nats-server` on loopback this benchmark starts) with their default settings (JetStream's
/// short duplicate window and the partition owners' dedup index), and with the optional
/// dedup bucket on as well; batches, alternated twice so drift hits all alike. Printed: each
/// run, the ratios JetStream / SQLite of the summed rates (log on against log on, off
/// against off), then the lookups' times on each gateway the log was on for.
async fn backends(sqlite_url: &str, options: &Options) {
    use refiner_gateway::config::SpoolBackend;
    use refiner_gateway::spool::nats::testing::NatsServer;
    let Some(server) = NatsServer::start("ingest benchmark") else {
        println!("backends: no nats-server (set NATS_SERVER_BIN)");
        return;
    };
    if options.pin {
        pin(server.pid().expect("the server's pid"), "1");
        println!("pinned: this process on CPU 0, nats-server on CPU 1");
    }
    let nats_dir = tempfile::tempdir().expect("temp dir");
    let no_log_dir = tempfile::tempdir().expect("temp dir");
    let sqlite_no_log = spawn_gateway_with(no_log_dir.path(), |settings| {
        settings.delivery_log.enabled = false;
    })
    .await;
    // (name, url, whether the delivery log is on)
    let mut urls = vec![
        ("sqlite", sqlite_url.to_owned(), true),
        ("sqlite, no log", sqlite_no_log, false),
    ];
    for (name, dedup_bucket, log, prefix) in [
        ("jetstream", "", true, "gw1"),
        ("jetstream, no log", "", false, "gw2"),
        ("jetstream + dedup bucket", "gateway_dedup", true, "gw3"),
    ] {
        let url = spawn_gateway_with(&nats_dir.path().join(prefix), |settings| {
            settings.spool.backend = SpoolBackend::Nats;
            settings.delivery_log.enabled = log;
            settings.nats.url = server.url();
            settings.nats.dedup_bucket = dedup_bucket.into();
            settings.nats.stream = format!("{}_EVENTS", prefix.to_uppercase());
            settings.nats.dead_letter_stream = format!("{}_DEAD", prefix.to_uppercase());
            settings.nats.subject_prefix = prefix.into();
            settings.nats.consumer = prefix.into();
            settings.nats.bucket = format!("{prefix}_partitions");
            settings.nats.retry_bucket = format!("{prefix}_retries");
            settings.nats.dedup_stream = format!("{}_DEDUP", prefix.to_uppercase());
        })
        .await;
        urls.push((name, url, log));
    }
    let size = Some(options.batch_size);
    let (c, s) = (options.connections, options.seconds);
    for (_, url, _) in &urls {
        let _ = drive(format!("{url}/v1/batch"), c, 1, size).await;
    }
    let mut sums = vec![0.0; urls.len()];
    // nats-server's CPU seconds, the events accepted and the seconds of the runs and their
    // drains, per gateway, over the rounds.
    let mut server_cpu = vec![(0.0, 0.0, 0.0); urls.len()];
    // The last event each gateway was sent (every connection's last request is answered
    // before `drive` returns): found by its messageId.
    let mut last_sent = vec![0; urls.len()];
    for round in 1..=2 {
        let mut line = format!("round {round}:");
        for (i, (name, url, _)) in urls.iter().enumerate() {
            let cpu_before = server.pid().map_or(0.0, cpu_seconds);
            let run = drive(format!("{url}/v1/batch"), c, s, size).await;
            last_sent[i] = SEQUENCE.load(Ordering::Relaxed) - 1;
            sums[i] += run.events_per_sec();
            // What the gateway left the server to do (its delivery log's backlog) is done
            // before the next run, and counted as this gateway's.
            let drained = drain(server.pid()).await;
            server_cpu[i].0 += server.pid().map_or(0.0, cpu_seconds) - cpu_before;
            server_cpu[i].1 += run.events as f64;
            server_cpu[i].2 += s as f64 + drained.as_secs_f64();
            line += &format!(
                " | {name} {:.0} ev/s (errors {}, server busy {:.1} s after)",
                run.events_per_sec(),
                run.errors,
                drained.as_secs_f64()
            );
        }
        println!("{line}");
    }
    for (i, (name, _, log)) in urls.iter().enumerate().skip(2) {
        // The SQLite gateway with the same log setting.
        let base = if *log { 0 } else { 1 };
        let (baseline, base_name) = (sums[base], urls[base].0);
        println!(
            "batches of {}, {c} connections: {name} / {base_name} = {:.2}",
            options.batch_size,
            sums[i] / baseline.max(1e-9)
        );
    }
    for (i, (name, _, _)) in urls.iter().enumerate().skip(2) {
        let (cpu, events, seconds) = server_cpu[i];
        println!(
            "nats-server CPU, {name}: {:.1} µs per accepted event ({:.0} % of a core over the runs and drains)",
            cpu / events.max(1.0) * 1e6,
            cpu / seconds.max(1e-9) * 100.0
        );
    }
    println!(
        "the delivery log's cost: sqlite {:.2}, jetstream {:.2} of the rate without it",
        sums[0] / sums[1].max(1e-9),
        sums[2] / sums[3].max(1e-9)
    );
    for (i, (name, url, log)) in urls.iter().enumerate() {
        if *log {
            lookups(name, url, last_sent[i]).await;
        }
    }
}

/// Pins process `pid` (every thread of it) to `cpus` with `taskset`; panics when that
/// fails (`--pin` asked for it).
fn pin(pid: u32, cpus: &str) {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("--pin needs taskset (util-linux)");
    assert!(
        status.success(),
        "taskset could not pin {pid} to CPU {cpus}"
    );
}

/// Waits until `nats-server` is idle (under 5 % of a core over 250 ms; at most 60 s):
/// how long it stayed busy.
async fn drain(pid: Option<u32>) -> Duration {
    let Some(pid) = pid else {
        return Duration::ZERO;
    };
    let started = Instant::now();
    let mut before = cpu_seconds(pid);
    while started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = cpu_seconds(pid);
        if now - before < 0.0125 {
            break;
        }
        before = now;
    }
    started.elapsed()
}

/// The CPU time (user and system) process `pid` has used so far, in seconds (0 when
/// unknown).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11..13]
        .iter()
        .filter_map(|f| f.parse::<f64>().ok())
        .sum();
    // Linux reports these in clock ticks of 1/100 s (USER_HZ).
    ticks / 100.0
}

/// Times the delivery log's lookups on a gateway the rounds filled: event `known` by
/// `messageId`, the newest events of a user (every thousandth event is theirs), and an
/// unknown user. Printed: each lookup's time and result count.
async fn lookups(name: &str, url: &str, known: u64) {
    let client = reqwest::Client::new();
    let get = |query: String| {
        let request = client
            .get(format!("{url}/api/events/default?{query}"))
            .bearer_auth(ADMIN);
        async move {
            let started = Instant::now();
            let answer = request.send().await.expect("lookup");
            let status = answer.status();
            let body: serde_json::Value = answer.json().await.unwrap_or_default();
            let found = body["results"].as_array().map_or(0, Vec::len);
            (started.elapsed(), status, found)
        }
    };
    let sent = SEQUENCE.load(Ordering::Relaxed);
    let mut line = format!("lookups, {name} ({sent} events sent in all):");
    for (what, query) in [
        ("messageId", format!("message_id={}", message_id(known))),
        ("user", "user_id=user-7".to_string()),
        ("unknown user", "user_id=nobody".to_string()),
    ] {
        let (took, status, found) = get(query).await;
        line += &format!(
            " | {what}: {:.0} ms ({status}, {found} found)",
            took.as_secs_f64() * 1e3
        );
    }
    println!("{line}");
    let metrics = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("metrics");
    let text = metrics.text().await.unwrap_or_default();
    let dropped = text
        .lines()
        .find_map(|l| l.strip_prefix("gateway_delivery_log_dropped_total "))
        .unwrap_or("0");
    println!("    delivery-log records dropped because its writes fell behind, {name}: {dropped}");
}
