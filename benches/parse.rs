//! Parsing benchmark: `segment::parse_batch` against a bare `serde_json::Value` parse of the
//! same bodies, in the same run.
//!
//! `cargo bench --bench parse [-- --rounds R --bodies B --batch-size N]`
//!
//! The bodies are realistic 100-event `/v1/batch` requests as analytics.js and
//! analytics-python send them: track, page and identify calls of 1,000 users with random
//! 32-hex-digit `messageId`s, a `context` with library, page, userAgent, ip and locale,
//! 5–10 properties or traits, a `timestamp` per event and a batch-level `sentAt` (so every
//! event gets the clock-skew correction). Each round times one pass of each parser over
//! every body, alternating; the medians over the rounds are printed in µs per event, with
//! the ratio gateway / baseline (the figure to compare across machines). No IO, one thread.

use std::hint::black_box;
use std::time::Instant;

use refiner_gateway::segment::{parse_batch, Arrival, Limits};

struct Options {
    rounds: usize,
    bodies: usize,
    batch_size: usize,
}

fn options() -> Options {
    let mut options = Options {
        rounds: 31,
        bodies: 50,
        batch_size: 100,
    };
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let value = args.get(i + 1).and_then(|v| v.parse::<usize>().ok());
        match (args[i].as_str(), value) {
            ("--rounds", Some(v)) => options.rounds = v.max(1),
            ("--bodies", Some(v)) => options.bodies = v.max(1),
            ("--batch-size", Some(v)) => options.batch_size = v.max(1),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    options
}

fn hex_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

const PAGES: &[(&str, &str)] = &[
    ("/", "Home"),
    ("/pricing", "Pricing"),
    ("/docs/getting-started", "Getting started"),
    ("/blog/2026/release-notes", "Release notes"),
    ("/account/settings", "Settings"),
];

const EVENTS: &[&str] = &[
    "Order Completed",
    "Product Viewed",
    "Signed Up",
    "Checkout Started",
    "Survey Answered",
];

const USER_AGENT: &str = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 \
                          (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";

/// One event as a client library sends it inside a batch.
fn event(n: usize) -> String {
    let user = fastrand::usize(..1000);
    let (path, title) = PAGES[fastrand::usize(..PAGES.len())];
    let second = fastrand::u32(..60);
    let milli = fastrand::u32(..1000);
    let timestamp = format!("2026-11-23T10:00:{second:02}.{milli:03}Z");
    let context = format!(
        r#"{{"library":{{"name":"analytics.js","version":"next-1.72.0"}},"page":{{"path":"{path}","referrer":"https://www.google.com/","search":"","title":"{title}","url":"https://example.com{path}"}},"userAgent":"{USER_AGENT}","locale":"en-US","ip":"203.0.113.{}"}}"#,
        fastrand::u8(1..255)
    );
    let anonymous = format!("{:08x}-4b1e-4c2a-9f3d-{:012x}", user, user * 7919);
    match n % 10 {
        0..=5 => format!(
            r#"{{"type":"track","event":"{}","userId":"user-{user}","anonymousId":"{anonymous}","messageId":"{}","timestamp":"{timestamp}","properties":{{"revenue":{}.{:02},"currency":"EUR","order_id":"o-{}","items":{},"coupon":null,"discount":0,"shipping":4.99,"tax":2.5}},"context":{context},"integrations":{{}}}}"#,
            EVENTS[fastrand::usize(..EVENTS.len())],
            hex_id(),
            fastrand::u32(1..500),
            fastrand::u32(..100),
            fastrand::u32(..1_000_000),
            fastrand::u32(1..9),
        ),
        6..=8 => format!(
            r#"{{"type":"page","name":"{title}","userId":"user-{user}","anonymousId":"{anonymous}","messageId":"{}","timestamp":"{timestamp}","properties":{{"path":"{path}","referrer":"https://www.google.com/","search":"","title":"{title}","url":"https://example.com{path}"}},"context":{context},"integrations":{{}}}}"#,
            hex_id(),
        ),
        _ => format!(
            r#"{{"type":"identify","userId":"user-{user}","anonymousId":"{anonymous}","messageId":"{}","timestamp":"{timestamp}","traits":{{"email":"user-{user}@example.com","name":"User {user}","plan":"pro","createdAt":"2025-06-01T12:00:00.000Z","company":{{"name":"Example {}","employees":{}}},"logins":{}}},"context":{context},"integrations":{{}}}}"#,
            hex_id(),
            user % 50,
            fastrand::u32(1..5000),
            fastrand::u32(..300),
        ),
    }
}

fn body(batch_size: usize) -> Vec<u8> {
    let events: Vec<String> = (0..batch_size).map(event).collect();
    format!(
        r#"{{"batch":[{}],"sentAt":"2026-11-23T10:01:00.000Z","writeKey":"bench-write-key"}}"#,
        events.join(",")
    )
    .into_bytes()
}

fn new_message_id() -> String {
    hex_id()
}

/// The baseline: what a bare handler does with the body. Not inlined, so that profilers
/// (`valgrind --tool=callgrind`) can attribute each side's cost to one function.
#[inline(never)]
fn bare_parse(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body).is_ok()
}

/// The gateway's parse of the same body (see [`bare_parse`]).
#[inline(never)]
fn gateway_parse(body: &[u8], arrival: Arrival<'_>) -> bool {
    parse_batch(body, arrival).is_ok()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let options = options();
    let bodies: Vec<Vec<u8>> = (0..options.bodies)
        .map(|_| body(options.batch_size))
        .collect();
    let events = (options.bodies * options.batch_size) as f64;
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    let limits = Limits::default();
    let arrival = Arrival {
        received_at_ms: 1_795_428_065_123,
        limits: &limits,
        new_message_id,
    };

    // Every body must parse into accepted events, or the benchmark measures the wrong path.
    for body in &bodies {
        let parsed = parse_batch(body, arrival).expect("the benchmark's bodies are valid");
        assert!(
            parsed.items.iter().all(Result::is_ok),
            "every event is accepted"
        );
    }

    println!(
        "{} bodies × {} events, {:.0} bytes per event on average, {} rounds",
        options.bodies,
        options.batch_size,
        bytes as f64 / events,
        options.rounds
    );
    let mut bare = Vec::with_capacity(options.rounds);
    let mut gateway = Vec::with_capacity(options.rounds);
    for _ in 0..options.rounds {
        let start = Instant::now();
        for body in &bodies {
            black_box(bare_parse(black_box(body)));
        }
        bare.push(start.elapsed().as_secs_f64() * 1e6 / events);

        let start = Instant::now();
        for body in &bodies {
            black_box(gateway_parse(black_box(body), arrival));
        }
        gateway.push(start.elapsed().as_secs_f64() * 1e6 / events);
    }
    let bare = median(&mut bare);
    let gateway = median(&mut gateway);
    println!("bare serde_json::Value parse   {bare:>7.3} µs/event");
    println!("segment::parse_batch           {gateway:>7.3} µs/event");
    println!("ratio parse_batch / bare       {:>7.3}", gateway / bare);
}
