//! Observability: the metrics add up after a known stream, `/readyz` follows the spool, the
//! `healthcheck` command probes a gateway, and the real binary logs JSON lines that carry
//! request ids and no secrets or payloads.
//!
//! The stream goes through the whole pipeline (ingest, spool, delivery to the in-process
//! Refiner simulator on 127.0.0.1), so the accounting identity of `docs/architecture.md`
//! is checked on real counters: received = forwarded + skipped + pending + dead.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use refiner_gateway::config::{Secret, Settings, SourceSettings};
use refiner_gateway::sim::{Faults, SimHandle};
use serde_json::{json, Value};

use crate::common::wait_for;
use crate::delivery;
use crate::helpers::{basic, spawn_app, spawn_app_with, TestApp, WRITE_KEY};

const BINARY: &str = env!("CARGO_BIN_EXE_refiner-gateway");
/// The Refiner API keys of `test_settings`' two sources.
const DEFAULT_KEY: &str = "refiner-key";
const HOOKED_KEY: &str = "refiner-key-2";
/// A source without a Refiner API key: everything it sends is dead-lettered.
const NOKEY_WRITE_KEY: &str = "nokey-write-key";

// ---------------------------------------------------------------------------------------
// Helpers

/// One scrape of `/metrics`, parsed into series.
struct Scrape {
    text: String,
}

impl Scrape {
    async fn take(app: &TestApp) -> Scrape {
        let response = app
            .client
            .get(app.url("/metrics"))
            .send()
            .await
            .expect("GET /metrics");
        assert_eq!(response.status(), 200);
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        assert!(
            content_type.starts_with("text/plain"),
            "content type {content_type}"
        );
        Scrape {
            text: response.text().await.expect("metrics body"),
        }
    }

    /// Every sample of `name` whose labels include `labels`, as (labels, value).
    fn samples(&self, name: &str, labels: &[(&str, &str)]) -> Vec<(String, f64)> {
        let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        let mut out = Vec::new();
        for line in self.text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (series_name, label_part) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if series_name != name {
                continue;
            }
            let present: Vec<&str> = label_part.split(',').collect();
            if wanted.iter().all(|w| present.contains(&w.as_str())) {
                out.push((
                    label_part.to_string(),
                    value.trim().parse().expect("a metric value"),
                ));
            }
        }
        out
    }

    /// The sum of every sample of `name` carrying `labels` (0 when there is none).
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples(name, labels).iter().map(|(_, v)| v).sum()
    }

    fn has_family(&self, name: &str) -> bool {
        self.text.lines().any(|line| {
            line == format!("# TYPE {name} counter")
                || line == format!("# TYPE {name} gauge")
                || line == format!("# TYPE {name} histogram")
        })
    }
}

/// The four terms of the accounting identity and its left-hand side.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Accounts {
    received: f64,
    forwarded: f64,
    skipped: f64,
    pending: f64,
    dead: f64,
}

impl Accounts {
    fn of(scrape: &Scrape) -> Accounts {
        let skipped_at_ingest = scrape.sum("gateway_ingest_events_skipped_total", &[]);
        Accounts {
            received: scrape.sum("gateway_ingest_events_total", &[("outcome", "accepted")])
                + skipped_at_ingest,
            forwarded: scrape.sum("gateway_dispatch_events_total", &[("outcome", "forwarded")]),
            skipped: skipped_at_ingest
                + scrape.sum("gateway_ingest_duplicates_total", &[])
                + scrape.sum("gateway_dispatch_events_total", &[("outcome", "skipped")]),
            pending: scrape.sum("gateway_spool_depth_events", &[]),
            dead: scrape.sum(
                "gateway_dispatch_events_total",
                &[("outcome", "dead_lettered")],
            ),
        }
    }

    fn balanced(&self) -> bool {
        self.received == self.forwarded + self.skipped + self.pending + self.dead
    }
}

async fn start_sim() -> SimHandle {
    delivery::start_sim(&[DEFAULT_KEY, HOOKED_KEY], Faults::none()).await
}

/// Delivery on, pointed at `sim`, with test-sized timings, a fast sampler, strings long
/// enough for the simulator to refuse (400), and a source without a Refiner API key.
fn observed_settings(settings: &mut Settings, sim: &SimHandle) {
    delivery::deliver_to(settings, sim);
    settings.spool.stats_interval_ms = 50;
    settings.mapping.max_string_len = 1000;
    // Strict per-user order, so a user's events behind a failed one wait (and count as
    // pending) instead of overtaking it within the window.
    settings.delivery.per_user_window = 1;
    settings.sources.push(SourceSettings {
        slug: "nokey".into(),
        write_keys: vec![Secret::new(NOKEY_WRITE_KEY)],
        webhook_secret: None,
        refiner_api_key: None,
        webhook_format: Default::default(),
    });
}

async fn post_batch(app: &TestApp, write_key: &str, events: &[Value]) {
    let response = app
        .client
        .post(app.url("/v1/batch"))
        .header("Authorization", basic(write_key))
        .json(&json!({ "batch": events }))
        .send()
        .await
        .expect("POST /v1/batch");
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    assert_eq!(status, 200, "POST /v1/batch answered {status}: {body}");
}

/// Waits until the spool is empty of everything but `pending` events, nothing is in
/// flight, and the sampled gauges show that state.
async fn wait_settled(app: &TestApp, pending: u64, dead_letters: u64) -> Scrape {
    wait_for(Duration::from_secs(20), "the stream settles", || async {
        let stats = app.spool.stats().await.expect("spool stats");
        let scrape = Scrape::take(app).await;
        let in_flight = scrape.sum("gateway_dispatch_in_flight_calls", &[]);
        let depth = scrape.sum("gateway_spool_depth_events", &[]);
        let dead = scrape.sum("gateway_spool_dead_letters_events", &[]);
        let accounts = Accounts::of(&scrape);
        if stats.depth == pending
            && depth == pending as f64
            && dead == dead_letters as f64
            && in_flight == 0.0
            && accounts.balanced()
        {
            Ok(scrape)
        } else {
            Err(format!(
                "{stats:?}, gauges depth {depth} dead {dead}, in flight {in_flight}, {accounts:?}"
            ))
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------
// The accounting identity

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn the_metrics_add_up_after_a_known_stream() {
    let sim = start_sim().await;
    let app = spawn_app_with(|settings| observed_settings(settings, &sim)).await;
    let long = "x".repeat(300);

    // Forwarded: identifies, tracks, a group and a page of five users.
    let mut forwarded = Vec::new();
    for n in 1..=5 {
        forwarded.push(json!({"type": "identify", "userId": format!("u{n}"),
                              "messageId": format!("obs-identify-{n}"),
                              "traits": {"email": format!("u{n}@example.com")}}));
        forwarded.push(
            json!({"type": "track", "userId": format!("u{n}"), "event": "Signed Up",
                              "messageId": format!("obs-track-{n}")}),
        );
    }
    forwarded.push(json!({"type": "group", "userId": "u1", "groupId": "acme",
                          "messageId": "obs-group"}));
    forwarded.push(json!({"type": "page", "userId": "u2", "name": "Home",
                          "messageId": "obs-page"}));
    // Skipped at ingest (3), not forwarded by delivery (2: an alias and an anonymous-only
    // event), and one whose string trait Refiner refuses (400 → dead letter).
    let mut mixed = vec![
        json!({"type": "track", "userId": "u1", "messageId": "obs-no-event"}),
        json!({"type": "identify", "traits": {"plan": "pro"}, "messageId": "obs-no-user"}),
        json!({"type": "bogus", "userId": "u1", "messageId": "obs-bogus"}),
        json!({"type": "alias", "userId": "u3", "previousId": "anon-3", "messageId": "obs-alias"}),
        json!({"type": "track", "anonymousId": "anon-only", "event": "Browsed",
               "messageId": "obs-anonymous"}),
        json!({"type": "identify", "userId": "u-refused", "messageId": "obs-refused",
               "traits": {"bio": long}}),
    ];
    mixed.extend(forwarded.iter().take(4).cloned()); // duplicates: 4
    post_batch(&app, WRITE_KEY, &forwarded).await;
    post_batch(&app, WRITE_KEY, &mixed).await;
    // Dead-lettered without a call: the `nokey` source has no Refiner API key.
    post_batch(
        &app,
        NOKEY_WRITE_KEY,
        &[
            json!({"type": "track", "userId": "n1", "event": "E", "messageId": "obs-nokey-1"}),
            json!({"type": "identify", "userId": "n2", "messageId": "obs-nokey-2"}),
        ],
    )
    .await;
    let first = wait_settled(&app, 0, 3).await;
    let accounts = Accounts::of(&first);
    assert_eq!(
        accounts,
        Accounts {
            received: 12.0 + 10.0 + 2.0,
            forwarded: 12.0,
            skipped: 3.0 + 4.0 + 2.0,
            pending: 0.0,
            dead: 3.0,
        }
    );

    // Pending: the next call answers 503 with Retry-After: 600, so its event waits ten
    // minutes for a retry and the user's two later events wait behind it.
    sim.state()
        .set_faults(Faults {
            count_503: 1,
            retry_after_on_503: true,
            retry_after_secs: 600,
            ..Faults::none()
        })
        .expect("set faults");
    post_batch(
        &app,
        WRITE_KEY,
        &(1..=3)
            .map(|n| {
                json!({"type": "track", "userId": "p1", "event": format!("Step {n}"),
                       "messageId": format!("obs-pending-{n}")})
            })
            .collect::<Vec<_>>(),
    )
    .await;
    let scrape = wait_settled(&app, 3, 3).await;
    let accounts = Accounts::of(&scrape);
    assert_eq!(
        accounts,
        Accounts {
            received: 27.0,
            forwarded: 12.0,
            skipped: 9.0,
            pending: 3.0,
            dead: 3.0,
        }
    );
    assert!(accounts.balanced(), "{accounts:?}");

    // The parts, by label.
    assert_eq!(
        scrape.sum(
            "gateway_ingest_events_total",
            &[
                ("source", "default"),
                ("type", "track"),
                ("outcome", "accepted")
            ]
        ),
        11.0,
        "accepted tracks: 5 forwarded, 1 anonymous, 2 duplicates, 3 pending"
    );
    for reason in ["missing_event", "no_user_anon_id", "unknown_type"] {
        assert_eq!(
            scrape.sum(
                "gateway_ingest_events_skipped_total",
                &[("source", "default"), ("reason", reason)]
            ),
            1.0,
            "{reason}"
        );
    }
    assert_eq!(
        scrape.sum("gateway_ingest_duplicates_total", &[("source", "default")]),
        4.0
    );
    for reason in ["alias", "unidentifiable"] {
        assert_eq!(
            scrape.sum(
                "gateway_dispatch_skipped_total",
                &[("source", "default"), ("reason", reason)]
            ),
            1.0,
            "{reason}"
        );
    }
    assert_eq!(
        scrape.sum(
            "gateway_dispatch_events_total",
            &[("source", "nokey"), ("outcome", "dead_lettered")]
        ),
        2.0
    );
    assert_eq!(
        scrape.sum("gateway_refiner_calls_total", &[("status", "400")]),
        1.0
    );
    assert_eq!(
        scrape.sum("gateway_refiner_calls_total", &[("status", "503")]),
        1.0
    );
    assert!(scrape.sum("gateway_refiner_calls_total", &[("status", "200")]) >= 10.0);
    assert_eq!(
        scrape.sum("gateway_dispatch_events_total", &[("outcome", "retried")]),
        1.0
    );
    assert_eq!(scrape.sum("gateway_spool_dead_letters_events", &[]), 3.0);
    assert!(scrape.sum("gateway_spool_oldest_event_age_seconds", &[]) > 0.0);
    assert_eq!(scrape.sum("gateway_dispatch_circuit_open", &[]), 0.0);
    assert!(scrape.sum("gateway_dispatch_concurrency_limit", &[]) >= 1.0);
    assert_eq!(
        scrape.sum("gateway_ingest_request_size_bytes_count", &[]),
        4.0
    );
    assert_eq!(
        scrape.sum(
            "gateway_ingest_request_duration_seconds_count",
            &[("route", "batch")]
        ),
        4.0
    );
    assert_eq!(
        scrape.sum("gateway_ingest_requests_total", &[("status", "200")]),
        4.0
    );
    // One histogram sample per forwarded event.
    assert_eq!(
        scrape.sum("gateway_dispatch_delivery_latency_seconds_count", &[]),
        12.0
    );
    assert!(scrape.sum("gateway_spool_stats_seconds_count", &[]) >= 2.0);
    assert_eq!(
        scrape.sum(
            "gateway_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // Usage for the month, per source: distinct identified users, events (duplicates not
    // counted, skipped ones never accepted), page views. The sampler reads usage on its own
    // tick, which may come after the queue gauges settled.
    let expected = [("default", 7.0, 18.0, 1.0), ("nokey", 2.0, 2.0, 0.0)];
    wait_for(Duration::from_secs(10), "the usage gauges", || async {
        let scrape = Scrape::take(&app).await;
        let seen: Vec<(&str, f64, f64, f64)> = expected
            .iter()
            .map(|(source, ..)| {
                let labels = [("source", *source)];
                (
                    *source,
                    scrape.sum("gateway_usage_monthly_users", &labels),
                    scrape.sum("gateway_usage_monthly_events", &labels),
                    scrape.sum("gateway_usage_monthly_page_views", &labels),
                )
            })
            .collect();
        if seen == expected {
            Ok(())
        } else {
            Err(format!("(source, users, events, page views): {seen:?}"))
        }
    })
    .await;

    // Every metric the operations guide and the dashboard rely on is exported.
    for family in [
        "gateway_ingest_requests_total",
        "gateway_ingest_events_total",
        "gateway_ingest_events_skipped_total",
        "gateway_ingest_duplicates_total",
        "gateway_ingest_request_size_bytes",
        "gateway_ingest_request_duration_seconds",
        "gateway_spool_commit_seconds",
        "gateway_spool_depth_events",
        "gateway_spool_oldest_event_age_seconds",
        "gateway_spool_dead_letters_events",
        "gateway_dispatch_events_total",
        "gateway_dispatch_skipped_total",
        "gateway_dispatch_delivery_latency_seconds",
        "gateway_dispatch_concurrency_limit",
        "gateway_dispatch_in_flight_calls",
        "gateway_dispatch_circuit_open",
        "gateway_refiner_calls_total",
        "gateway_refiner_call_duration_seconds",
        "gateway_build_info",
        "gateway_usage_monthly_users",
        "gateway_usage_monthly_events",
        "gateway_usage_monthly_page_views",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(scrape.has_family(family), "{family} is not exported");
    }
    sim.stop().await;
}

// ---------------------------------------------------------------------------------------
// Readiness and the healthcheck command

async fn get(app: &TestApp, path: &str) -> (u16, Value) {
    let response = app
        .client
        .get(app.url(path))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").cloned();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status == 503 {
        assert_eq!(
            retry_after.as_ref().and_then(|v| v.to_str().ok()),
            Some("5"),
            "{path}: 503 without Retry-After"
        );
    }
    (status, body)
}

#[tokio::test]
async fn readiness_follows_the_spool() {
    let app = spawn_app().await;
    assert_eq!(get(&app, "/readyz").await.0, 200);
    assert_eq!(Scrape::take(&app).await.sum("gateway_ready", &[]), 1.0);

    // A spool that cannot take a write (here: closed) makes the gateway not ready, while it
    // stays alive.
    app.spool.close().await;
    let (status, body) = get(&app, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "not_ready");
    assert_eq!(get(&app, "/healthz").await.0, 200);
    assert_eq!(Scrape::take(&app).await.sum("gateway_ready", &[]), 0.0);
}

async fn run_healthcheck(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let mut command = tokio::process::Command::new(BINARY);
    command
        .arg("healthcheck")
        .args(args)
        .env_remove("GATEWAY_LISTEN")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("healthcheck ends within 30 s")
        .expect("run healthcheck");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_healthcheck_command_probes_a_gateway() {
    let app = spawn_app().await;
    let healthz = app.url("/healthz");
    let readyz = app.url("/readyz");
    assert_eq!(run_healthcheck(&["--url", &healthz], &[]).await.0, Some(0));
    assert_eq!(run_healthcheck(&["--url", &readyz], &[]).await.0, Some(0));
    // Without --url it probes /healthz at GATEWAY_LISTEN's port on 127.0.0.1.
    let listen = format!("0.0.0.0:{}", app.port);
    assert_eq!(
        run_healthcheck(&[], &[("GATEWAY_LISTEN", &listen)]).await.0,
        Some(0)
    );
    // A non-2xx answer, and no answer at all, fail with one line on stderr.
    app.spool.close().await;
    let (code, stderr) = run_healthcheck(&["--url", &readyz], &[]).await;
    assert_eq!(code, Some(1));
    assert!(stderr.contains("503"), "{stderr}");
    let unused = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = unused.local_addr().expect("addr").port();
    drop(unused);
    let url = format!("http://127.0.0.1:{port}/healthz");
    let (code, stderr) = run_healthcheck(&["--url", &url, "--timeout-secs", "2"], &[]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

// ---------------------------------------------------------------------------------------
// Logs of the real binary

/// Reads the JSON log lines written so far.
fn log_lines(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .collect()
}

#[tokio::test]
async fn the_binary_logs_json_lines_with_request_ids_and_no_secrets() {
    const SECRET_WRITE_KEY: &str = "wk-do-not-log-7f3a";
    const SECRET_API_KEY: &str = "rk-do-not-log-91c2";
    const SECRET_WEBHOOK: &str = "hook-do-not-log-55e1";
    const PAYLOAD_MARKER: &str = "payload-do-not-log-0b7d";
    let dir = tempfile::tempdir().expect("temp dir");
    let stdout_path = dir.path().join("stdout.log");
    // No GATEWAY_LOG_FORMAT: stdout is a file, not a terminal, so `auto` means JSON.
    let mut child = tokio::process::Command::new(BINARY)
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info,refiner_gateway::ingest=debug")
        .env("GATEWAY_LISTEN", "127.0.0.1:0")
        .env("GATEWAY_DATA_DIR", dir.path().join("data"))
        .env("GATEWAY_WRITE_KEYS", SECRET_WRITE_KEY)
        .env("GATEWAY_WEBHOOK_SECRET", SECRET_WEBHOOK)
        .env("REFINER_API_KEY", SECRET_API_KEY)
        .env("REFINER_BASE_URL", "http://127.0.0.1:9/v1")
        .env("GATEWAY_DELIVERY_ENABLED", "false")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the gateway");
    let pid = child.id().expect("pid");

    // The start-up line names the port it listens on.
    let port = wait_for(Duration::from_secs(30), "the start-up log line", || async {
        log_lines(&stdout_path)
            .iter()
            .find(|line| line["message"] == "gateway listening")
            .and_then(|line| line["port"].as_u64())
            .ok_or_else(|| std::fs::read_to_string(&stdout_path).unwrap_or_default())
    })
    .await;
    let address = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let accepted = client
        .post(format!("{address}/v1/track"))
        .header("Authorization", basic(SECRET_WRITE_KEY))
        .json(&json!({"userId": "u1", "event": PAYLOAD_MARKER,
                      "properties": {"note": PAYLOAD_MARKER}}))
        .send()
        .await
        .expect("POST /v1/track");
    assert_eq!(accepted.status(), 200);
    // A refused request logs (at debug, inside its request span) why it was refused.
    let refused = client
        .post(format!("{address}/v1/track"))
        .header("Authorization", basic("not-a-key"))
        .header("X-Request-Id", "obs-log-request-1")
        .json(&json!({"userId": "u1", "event": PAYLOAD_MARKER}))
        .send()
        .await
        .expect("POST /v1/track");
    assert_eq!(refused.status(), 401);
    assert_eq!(
        refused
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok()),
        Some("obs-log-request-1")
    );
    let line = wait_for(
        Duration::from_secs(10),
        "the refusal's log line",
        || async {
            log_lines(&stdout_path)
                .into_iter()
                .find(|line| line["message"] == "ingest request refused")
                .ok_or_else(|| std::fs::read_to_string(&stdout_path).unwrap_or_default())
        },
    )
    .await;
    assert_eq!(line["span"]["request_id"], "obs-log-request-1", "{line}");
    assert_eq!(line["span"]["path"], "/v1/track", "{line}");
    assert_eq!(line["level"], "DEBUG", "{line}");
    assert_eq!(line["code"], "unauthorized", "{line}");

    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let exit = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the gateway stops within 30 s after SIGTERM")
        .expect("wait");
    assert!(exit.success(), "{exit}");

    let text = std::fs::read_to_string(&stdout_path).expect("stdout");
    let lines = log_lines(&stdout_path);
    assert!(lines.len() >= 3, "{text}");
    for line in &lines {
        for field in ["timestamp", "level", "message"] {
            assert!(line.get(field).is_some(), "no {field} in {line}");
        }
    }
    assert!(
        lines
            .iter()
            .any(|line| line["message"] == "gateway stopped"),
        "{text}"
    );
    for secret in [
        SECRET_WRITE_KEY,
        SECRET_API_KEY,
        SECRET_WEBHOOK,
        PAYLOAD_MARKER,
    ] {
        assert!(!text.contains(secret), "the log contains {secret}: {text}");
    }
}

// ---------------------------------------------------------------------------------------
// check-config

#[tokio::test]
async fn check_config_accepts_what_serve_accepts_and_names_what_it_refuses() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        "log_format = \"json\"\n[spool]\nstats_interval_ms = 2000\n[delivery]\nmax_concurrency = 32\n",
    )
    .expect("write config");
    let run = |env: &'static [(&'static str, &'static str)], file: PathBuf| async move {
        let output = tokio::process::Command::new(BINARY)
            .args(["check-config", "--config"])
            .arg(&file)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run check-config");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run(
        &[("GATEWAY_WRITE_KEYS", "wk"), ("REFINER_API_KEY", "rk")],
        file.clone(),
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with("configuration OK"), "{stdout}");
    assert!(stdout.contains("spool sqlite in ./data"), "{stdout}");
    assert!(!stdout.contains("wk") && !stdout.contains("rk"), "{stdout}");
    // Delivery on and no Refiner API key: refused as `serve` refuses it.
    let (code, _, stderr) = run(&[("GATEWAY_WRITE_KEYS", "wk")], file.clone()).await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("REFINER_API_KEY"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    // An unknown key is named.
    std::fs::write(&file, "[spool]\nstats_interval = 1\n").expect("write config");
    let (code, _, stderr) = run(
        &[("GATEWAY_WRITE_KEYS", "wk"), ("REFINER_API_KEY", "rk")],
        file.clone(),
    )
    .await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("stats_interval"), "{stderr}");
    // A value of the wrong type is named by its key and line.
    std::fs::write(&file, "[spool]\n\nstats_interval_ms = \"soon\"\n").expect("write config");
    let (code, _, stderr) = run(
        &[("GATEWAY_WRITE_KEYS", "wk"), ("REFINER_API_KEY", "rk")],
        file.clone(),
    )
    .await;
    assert_eq!(code, Some(2));
    assert!(
        stderr.contains("key `spool.stats_interval_ms` (line 3)"),
        "{stderr}"
    );

    // What serve could not start with: a data directory that is a file, a NATS
    // credentials file that cannot be read. The summary names the backend.
    let not_a_dir = dir.path().join("not-a-dir");
    std::fs::write(&not_a_dir, "").expect("write file");
    std::fs::write(&file, format!("data_dir = {:?}\n", not_a_dir.join("data"))).expect("write");
    let (code, _, stderr) = run(
        &[("GATEWAY_WRITE_KEYS", "wk"), ("REFINER_API_KEY", "rk")],
        file.clone(),
    )
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("data_dir") && stderr.contains("not a directory"),
        "{stderr}"
    );
    let creds = dir.path().join("missing.creds");
    std::fs::write(
        &file,
        format!("[spool]\nbackend = \"nats\"\n[nats]\nurl = \"nats://127.0.0.1:4222\"\ncredentials_file = {:?}\n", creds),
    )
    .expect("write config");
    let (code, _, stderr) = run(
        &[("GATEWAY_WRITE_KEYS", "wk"), ("REFINER_API_KEY", "rk")],
        file.clone(),
    )
    .await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("nats.credentials_file") && stderr.contains("missing.creds"),
        "{stderr}"
    );
    // --settings-only: a configuration for another machine (the Helm chart's check).
    let output = tokio::process::Command::new(BINARY)
        .args(["check-config", "--settings-only", "--config"])
        .arg(&file)
        .env_clear()
        .envs([("GATEWAY_WRITE_KEYS", "wk"), ("REFINER_API_KEY", "rk")])
        .output()
        .await
        .expect("run check-config");
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    std::fs::write(&creds, "-----BEGIN NATS USER JWT-----\n").expect("write creds");
    let (code, stdout, stderr) = run(
        &[("GATEWAY_WRITE_KEYS", "wk"), ("REFINER_API_KEY", "rk")],
        file,
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("spool nats at nats://127.0.0.1:4222"),
        "{stdout}"
    );
}
