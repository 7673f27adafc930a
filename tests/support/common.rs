//! What every integration-test binary needs: a bounded polling wait that fails with the
//! state it last saw, a free loopback port, and Basic authorization for a write key.
//!
//! Included with `#[path]` by each test binary that needs it; not every binary uses every
//! function.
#![allow(dead_code)]

use std::future::Future;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use base64::Engine;

/// Polls `check` every 25 ms until it returns `Ok`, or panics after `limit` with what it
/// last said: a wait never hangs and never fails without the state it saw.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(state) => assert!(
                Instant::now() < deadline,
                "{what}: not reached within {limit:?}; last seen: {state}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A port that was free a moment ago (a process started on it may still lose it to
/// someone else, so start-ups that bind it retry on `cannot listen`).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// `Authorization: Basic` for a write key, as Segment's libraries send it (key, empty
/// password).
pub fn basic(key: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
    )
}
