//! Segment's and RudderStack's client libraries, unmodified and as CI installs them, sending
//! to a delivering gateway, with the Refiner simulator as the witness of what reached
//! Refiner:
//! - Python: `segment-analytics-python` 2.4 and `rudder-sdk-python` 2.1
//!   (`tests/clients/sdk_e2e.py`);
//! - Node.js: `@segment/analytics-node` 3.1 and `@rudderstack/rudder-sdk-node` 3.0
//!   (`tests/clients/node`, installed with `npm ci`).
//!
//! Cases: `integrations` `{Refiner: false}`, `{All: false}` and `{All: false, Refiner: true}`;
//! a RudderStack identify whose traits are only in `context.traits`; a ~4 MB gzip batch;
//! a batch with one 40 KB event (the others delivered, the refused one counted and listed).
//!
//! Without the interpreters or the libraries a test fails naming the install, unless
//! `GATEWAY_SKIP_PYTHON=1` or `GATEWAY_SKIP_NODE=1` skips it out loud
//! (`tests/support/deps.rs`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use refiner_gateway::sim::{CallRecord, Faults, SimHandle};
use serde_json::{json, Value};

use crate::delivery::{
    calls_of, describe, metric, spawn_delivering, start_sim, succeeded, wait_drained, wait_for,
    DEFAULT_KEY,
};
use crate::helpers::{TestApp, WRITE_KEY};

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// Whether `program args` runs successfully: the libraries' versions, or why not.
async fn available(test: &str, program: &str, args: &[&str], cwd: &Path) -> Result<(), String> {
    let output = tokio::process::Command::new(program)
        .args(args)
        .current_dir(cwd)
        .output()
        .await;
    let reason = match output {
        Ok(output) if output.status.success() => {
            eprintln!("{test}: {}", String::from_utf8_lossy(&output.stdout).trim());
            return Ok(());
        }
        Ok(output) => String::from_utf8_lossy(&output.stderr).trim().to_string(),
        Err(e) => format!("{program} cannot be run: {e}"),
    };
    Err(reason)
}

/// Runs a client script against the gateway and returns its JSON report.
async fn run_script(program: &str, script: &Path, cwd: &Path, app: &TestApp) -> Value {
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(program)
            .arg(script)
            .arg(&app.address)
            .arg(WRITE_KEY)
            .current_dir(cwd)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("{} did not finish within 120 s", script.display()))
    .unwrap_or_else(|e| panic!("run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} reported failures ({}):\nstdout: {stdout}\nstderr: {stderr}",
        script.display(),
        output.status
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("the report is not JSON ({e}): {stdout}"));
    assert_eq!(report["failures"], json!([]), "{report}");
    report
}

/// The successful calls about `user` to `path` (after the base URL's `/v1`) once there are
/// `count` of them.
async fn wait_for_calls(sim: &SimHandle, user: &str, path: &str, count: usize) -> Vec<CallRecord> {
    wait_for(
        Duration::from_secs(30),
        &format!("{count} successful {path} calls for {user}"),
        || async {
            let calls: Vec<CallRecord> = calls_of(sim, user)
                .into_iter()
                .filter(|c| c.path.ends_with(path) && succeeded(c))
                .collect();
            if calls.len() >= count {
                Ok(calls)
            } else {
                Err(describe(&calls_of(sim, user)))
            }
        },
    )
    .await
}

fn event_names(calls: &[CallRecord]) -> Vec<String> {
    calls
        .iter()
        .map(|c| c.params["event"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The integrations cases: only the selected event reached Refiner; the others were counted
/// as skipped at ingest and never stored, so they cannot arrive later.
async fn assert_integrations(app: &TestApp, sim: &SimHandle, prefix: &str) {
    let on = wait_for_calls(sim, &format!("{prefix}-on"), "/track-event", 1).await;
    assert_eq!(event_names(&on), ["Selected"]);
    for user in [format!("{prefix}-off"), format!("{prefix}-alloff")] {
        let calls = calls_of(sim, &user);
        assert!(
            calls.is_empty(),
            "{user} reached Refiner: {}",
            describe(&calls)
        );
    }
    for reason in ["integrations_disabled", "integrations_all_disabled"] {
        let skipped = metric(
            app,
            "gateway_ingest_events_skipped_total",
            &[("source", "default"), ("reason", reason)],
        )
        .await;
        assert_eq!(skipped, 1.0, "{reason}");
    }
}

/// The batch with one oversized event: the events around it delivered (track events may
/// overlap in flight, so in any order); it was refused and counted.
async fn assert_mixed(app: &TestApp, sim: &SimHandle, user: &str) {
    wait_for_calls(sim, user, "/track-event", 2).await;
    wait_drained(app, Duration::from_secs(30)).await;
    let calls: Vec<CallRecord> = calls_of(sim, user)
        .into_iter()
        .filter(|c| c.path.ends_with("/track-event"))
        .collect();
    let mut names = event_names(&calls);
    names.sort();
    assert_eq!(names, ["After", "Before"], "{}", describe(&calls));
    let refused = metric(
        app,
        "gateway_ingest_events_refused_total",
        &[("source", "default"), ("code", "event_too_large")],
    )
    .await;
    assert_eq!(refused, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn python_libraries_of_segment_and_rudderstack_reach_refiner() {
    let test = "python_libraries_of_segment_and_rudderstack_reach_refiner";
    let clients = clients_dir();
    let import = "import segment.analytics as s, rudderstack.analytics as r; \
                  print('segment-analytics-python', s.VERSION, 'rudder-sdk-python', r.VERSION)";
    let found = available(test, "python3", &["-c", import], &clients).await;
    if !crate::deps::clients(test, "Python", found) {
        return;
    }
    let sim = start_sim(&[DEFAULT_KEY], Faults::none()).await;
    let app = spawn_delivering(&sim, |_| {}).await;
    let report = run_script("python3", &clients.join("sdk_e2e.py"), &clients, &app).await;

    assert_integrations(&app, &sim, "seg").await;

    // rudder-sdk-python's identify: traits only in context.traits, all of them reach Refiner.
    let identify = wait_for_calls(&sim, "rud-ctx", "/identify-user", 1).await;
    assert_eq!(identify[0].params["plan"], "pro", "{}", identify[0].params);
    assert_eq!(identify[0].params["created_at"], "2024-05-01T10:00:00Z");
    let contact = sim.state().contact("rud-ctx").expect("the contact exists");
    assert_eq!(contact.email.as_deref(), Some("rud@example.com"));
    assert_eq!(contact.attributes["plan"], "pro");
    assert!(contact.attributes.contains_key("created_at"), "{contact:?}");

    // The ~4 MB batch: one gzip request of 130 events, all delivered in order.
    let requests = report["rudder_requests"].as_array().expect("requests");
    let big = requests
        .iter()
        .find(|r| r["events"] == 130)
        .unwrap_or_else(|| panic!("no request carried the 130 events: {requests:?}"));
    let bytes = big["bytes"].as_u64().expect("bytes");
    assert!(
        bytes > 3_900_000 && bytes <= 4 * 1024 * 1024,
        "the batch is {bytes} bytes inflated"
    );
    assert_eq!(big["status"], 200);
    assert_eq!(big["answer"], json!({"success": true}));
    // Track events of one user may overlap in flight (`delivery.per_user_window`), so they
    // are compared as a set.
    let bulk = wait_for_calls(&sim, "rud-big", "/track-event", 130).await;
    let mut names = event_names(&bulk);
    names.sort();
    let expected: Vec<String> = (0..130).map(|i| format!("Bulk {i:03}")).collect();
    assert_eq!(names, expected);

    // The batch with a 40 KB event: answered 200, the refused event listed by index.
    let mixed = requests
        .iter()
        .find(|r| r["events"] == 3)
        .unwrap_or_else(|| panic!("no request carried the mixed batch: {requests:?}"));
    assert_eq!(mixed["status"], 200);
    let refused = &mixed["answer"]["refused"];
    assert_eq!(refused[0]["index"], 1, "{mixed}");
    assert_eq!(refused[0]["code"], "event_too_large", "{mixed}");
    assert_mixed(&app, &sim, "rud-mixed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_libraries_of_segment_and_rudderstack_reach_refiner() {
    let test = "node_libraries_of_segment_and_rudderstack_reach_refiner";
    let dir = clients_dir().join("node");
    let versions = "const v = (p) => require(p + '/package.json').version; \
                    console.log('@segment/analytics-node', v('@segment/analytics-node'), \
                    '@rudderstack/rudder-sdk-node', v('@rudderstack/rudder-sdk-node'))";
    let found = available(test, "node", &["-e", versions], &dir).await;
    if !crate::deps::clients(test, "Node.js", found) {
        return;
    }
    let sim = start_sim(&[DEFAULT_KEY], Faults::none()).await;
    let app = spawn_delivering(&sim, |_| {}).await;
    let report = run_script("node", &dir.join("sdk_e2e.js"), &dir, &app).await;
    assert!(
        report["versions"]["segment"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1.")),
        "{report}"
    );
    assert!(
        report["versions"]["rudder"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.0.")),
        "{report}"
    );

    assert_integrations(&app, &sim, "node-seg").await;

    let identify = wait_for_calls(&sim, "node-rud", "/identify-user", 1).await;
    assert_eq!(identify[0].params["plan"], "team", "{}", identify[0].params);
    let contact = sim.state().contact("node-rud").expect("the contact exists");
    assert_eq!(contact.email.as_deref(), Some("node-rud@example.com"));
    assert_eq!(contact.attributes["plan"], "team");

    assert_mixed(&app, &sim, "node-rud-mixed").await;
}
