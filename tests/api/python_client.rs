//! Segment's own Python library (`segment-analytics-python`, module `segment.analytics`)
//! pointed at the gateway with `host=`: every call type, sync and batched, plain and gzip,
//! lands in the spool; an unknown write key makes the library give up at once (401 with a
//! JSON `code`/`message`) instead of retrying.
//!
//! Needs `python3` with the package installed. Without them the test fails, naming the
//! install, unless `GATEWAY_SKIP_PYTHON=1` skips it (`tests/support/deps.rs`).

use std::collections::HashMap;
use std::time::Duration;

use refiner_gateway::segment::UserKey;
use serde_json::Value;

use crate::helpers::{payload, spawn_app, WRITE_KEY};

const SCRIPT: &str = r#"
import json, sys, time
from datetime import datetime, timezone
from decimal import Decimal

from segment.analytics import Client
from segment.analytics.request import APIError

host, write_key = sys.argv[1], sys.argv[2]
failures = []
report = {"failures": failures}


def on_error(error, items):
    failures.append({"error": repr(error), "ids": [i.get("messageId") for i in items]})


def calls(client, prefix):
    """One call of every type; sync clients raise on failure, batched ones report."""
    def attempt(name, call):
        try:
            call()
        except Exception as error:  # noqa: BLE001 - every failure is reported
            failures.append({"error": repr(error), "ids": [prefix + name]})

    user = prefix + "user"
    attempt("identify", lambda: client.identify(
        user_id=user,
        traits={"email": prefix + "ada@example.com", "name": "Ada",
                "createdAt": datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)},
        message_id=prefix + "identify"))
    attempt("track", lambda: client.track(
        user_id=user, event="Signed Up",
        properties={"plan": "pro", "amount": Decimal("9.99"), "tags": ["a", "b"]},
        message_id=prefix + "track"))
    attempt("page", lambda: client.page(
        user_id=user, category="Docs", name="Install",
        properties={"url": "https://example.com/docs"}, message_id=prefix + "page"))
    attempt("group", lambda: client.group(
        user_id=user, group_id=prefix + "acme", traits={"name": "Acme", "plan": "team"},
        message_id=prefix + "group"))
    attempt("screen", lambda: client.screen(
        user_id=user, category="App", name="Home", properties={"tab": 1},
        message_id=prefix + "screen"))
    attempt("alias", lambda: client.alias(
        previous_id=prefix + "anon", user_id=user, message_id=prefix + "alias"))
    attempt("anonymous", lambda: client.track(
        anonymous_id=prefix + "anon", event="Viewed", message_id=prefix + "anonymous"))


# Sync mode: one POST /v1/batch per call, exceptions on failure.
calls(Client(write_key, host=host, sync_mode=True, on_error=on_error, max_retries=0), "sync-")
calls(Client(write_key, host=host, sync_mode=True, gzip=True, on_error=on_error,
             max_retries=0), "syncgz-")

# Batched mode: a consumer thread uploads; flush() waits for it.
batched = Client(write_key, host=host, gzip=True, on_error=on_error, max_retries=1,
                 upload_interval=0.1)
calls(batched, "batch-")
for i in range(40):
    batched.track(user_id="batch-many-%d" % (i % 5), event="Bulk",
                  properties={"i": i}, message_id="batch-many-%d" % i)
batched.flush()
batched.join()

# An unknown write key: the library must give up at once, not retry.
started = time.monotonic()
bad_errors = []
try:
    Client("not-a-key", host=host, sync_mode=True, max_retries=0).track(
        user_id="nobody", event="Refused", message_id="refused-sync")
except APIError as error:
    bad_errors.append({"status": error.status, "code": error.code, "message": error.message})
bad = Client("not-a-key", host=host, max_retries=10, upload_interval=0.1,
             on_error=lambda e, items: bad_errors.append(
                 {"status": getattr(e, "status", None), "code": getattr(e, "code", None),
                  "message": getattr(e, "message", repr(e))}))
bad.track(user_id="nobody", event="Refused", message_id="refused-batched")
bad.flush()
bad.join()
report["bad_key_errors"] = bad_errors
report["bad_key_seconds"] = time.monotonic() - started

print(json.dumps(report))
sys.exit(1 if failures else 0)
"#;

/// Whether `python3` can import the library; `Err` says why not.
async fn python_with_library() -> Result<(), String> {
    let output = tokio::process::Command::new("python3")
        .args([
            "-c",
            "import segment.analytics as a; print(a.__version__ if hasattr(a, '__version__') else '?')",
        ])
        .output()
        .await
        .map_err(|e| format!("python3 cannot be run: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "python3 cannot import segment.analytics (pip install segment-analytics-python): {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    eprintln!(
        "segment-analytics-python {}",
        String::from_utf8_lossy(&output.stdout).trim()
    );
    Ok(())
}

#[tokio::test]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn segment_python_library_events_are_spooled() {
    let test = "segment_python_library_events_are_spooled";
    if !crate::deps::python(test, python_with_library().await) {
        return;
    }
    let app = spawn_app().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let script = dir.path().join("send.py");
    std::fs::write(&script, SCRIPT).expect("write the script");

    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("python3")
            .arg(&script)
            .arg(&app.address)
            .arg(WRITE_KEY)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Python script did not finish within 120 s")
    .expect("run python3");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Python client reported failures ({}):\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
    let report: Value =
        serde_json::from_str(stdout.lines().last().expect("the script prints its report"))
            .expect("the report is JSON");
    assert_eq!(report["failures"], serde_json::json!([]));

    // The unknown key: refused with Segment's error shape, and the library stopped at once.
    let bad = report["bad_key_errors"].as_array().expect("bad key errors");
    assert_eq!(bad.len(), 2, "{report}");
    for error in bad {
        assert_eq!(error["status"], 401, "{report}");
        assert_eq!(error["code"], "unauthorized", "{report}");
    }
    let seconds = report["bad_key_seconds"].as_f64().expect("seconds");
    assert!(seconds < 5.0, "the library retried a 401 for {seconds} s");

    let spooled = app.spooled().await;
    let by_id: HashMap<&str, &refiner_gateway::spool::Leased> =
        spooled.iter().map(|e| (e.message_id.as_str(), e)).collect();
    assert_eq!(by_id.len(), spooled.len(), "a messageId was queued twice");
    assert!(!by_id.contains_key("refused-sync") && !by_id.contains_key("refused-batched"));
    for prefix in ["sync-", "syncgz-", "batch-"] {
        let user = format!("{prefix}user");
        for (name, kind) in [
            ("identify", "identify"),
            ("track", "track"),
            ("page", "page"),
            ("group", "group"),
            ("screen", "screen"),
            ("alias", "alias"),
            ("anonymous", "track"),
        ] {
            let id = format!("{prefix}{name}");
            let event = by_id
                .get(id.as_str())
                .unwrap_or_else(|| panic!("{id} is not in the spool"));
            assert_eq!(event.kind.as_str(), kind, "{id}");
            assert_eq!(event.source, "default", "{id}");
            let body = payload(event);
            assert_eq!(body["type"], kind, "{id}");
            assert_eq!(body["messageId"], id.as_str(), "{id}");
            assert_eq!(
                body["context"]["library"]["name"], "analytics-python",
                "{id}"
            );
            assert!(body.get("writeKey").is_none(), "{id} kept the writeKey");
            assert!(body["receivedAt"].is_string(), "{id}");
            assert!(body["timestamp"].is_string(), "{id}");
            if name == "anonymous" {
                assert_eq!(
                    event.user_key,
                    UserKey::anonymous(&format!("{prefix}anon")),
                    "{id}"
                );
                assert_eq!(body["anonymousId"], format!("{prefix}anon").as_str());
            } else {
                assert_eq!(event.user_key, UserKey::user_id(&user), "{id}");
                assert_eq!(body["userId"], user.as_str(), "{id}");
            }
        }
        let identify = payload(by_id[format!("{prefix}identify").as_str()]);
        assert_eq!(
            identify["traits"]["email"],
            format!("{prefix}ada@example.com")
        );
        assert_eq!(identify["traits"]["createdAt"], "2024-01-02T03:04:05+00:00");
        let track = payload(by_id[format!("{prefix}track").as_str()]);
        assert_eq!(track["event"], "Signed Up");
        assert_eq!(track["properties"]["amount"], 9.99);
        let page = payload(by_id[format!("{prefix}page").as_str()]);
        assert_eq!(page["name"], "Install");
        let group = payload(by_id[format!("{prefix}group").as_str()]);
        assert_eq!(group["groupId"], format!("{prefix}acme"));
        let alias = payload(by_id[format!("{prefix}alias").as_str()]);
        assert_eq!(alias["previousId"], format!("{prefix}anon"));
    }
    for i in 0..40 {
        let id = format!("batch-many-{i}");
        let event = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("{id} is not in the spool"));
        assert_eq!(payload(event)["properties"]["i"], i);
    }
    assert_eq!(spooled.len(), 3 * 7 + 40);
}
