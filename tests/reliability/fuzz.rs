//! Bad input against the real binary: seeded random requests over raw TCP, so that anything
//! a client can put on the wire can be sent (duplicate or invalid headers, broken framing),
//! against every route the gateway serves (ingest, webhooks, health, metrics, the management
//! API) and routes it does not.
//!
//! The inputs: arbitrary bytes; hostile JSON (huge and odd numbers, deep nesting up to
//! hundreds of thousands of levels, long and invalid strings, invalid UTF-8 spliced in);
//! Segment-shaped events with odd values; gzip that is truncated, corrupted, not gzip at all,
//! or a bomb; wrong, malformed and valid `X-Signature`s and credentials on every route;
//! header floods (thousands of headers, megabyte headers); malformed HTTP (bad request
//! lines, broken chunking, lying `Content-Length`, bare garbage).
//!
//! The oracle: no answer is a 5xx, every well-framed request gets an answer (a dropped
//! connection would be a panicking handler), the process stays up, still accepts a valid
//! event afterwards, and its memory stays bounded (RSS measured from `/proc/<pid>/status`
//! after a warm-up and at the end).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha1::Sha1;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{
    basic, mib, scratch_dir, Gateway, Memory, Spec, ADMIN_TOKEN, OTHER_KEY, WEBHOOK_SECRET,
    WRITE_KEY,
};
use crate::report::Report;

#[derive(Debug, Clone)]
pub struct FuzzParams {
    pub cases: u64,
    /// Requests in flight at once.
    pub concurrency: usize,
    pub seed: u64,
    /// Cases before the memory baseline is taken.
    pub warmup: u64,
    /// Allowed growth of anonymous memory (heap) from the baseline to the end, MiB.
    pub rss_growth_limit_mib: u64,
}

impl FuzzParams {
    pub fn quick() -> FuzzParams {
        FuzzParams {
            cases: 10_000,
            concurrency: 8,
            seed: 20_250_601,
            warmup: 1_000,
            rss_growth_limit_mib: 64,
        }
    }
}

const POST_ROUTES: &[&str] = &[
    "/v1/track",
    "/v1/identify",
    "/v1/page",
    "/v1/screen",
    "/v1/group",
    "/v1/alias",
    "/v1/t",
    "/v1/i",
    "/v1/p",
    "/v1/s",
    "/v1/g",
    "/v1/a",
    "/v1/batch",
    "/v1/b",
    "/v1/import",
    "/webhook",
    "/webhook/default",
    "/webhook/hooked",
    "/webhook/nope",
    "/api/events/default/dead-letters/replay",
    "/api/events/hooked/dead-letters/replay",
];

const OTHER_ROUTES: &[&str] = &[
    "/healthz",
    "/readyz",
    "/metrics",
    "/api",
    "/api/events/default/dead-letters",
    "/api/events/hooked/dead-letters/1",
    "/api/events/nope/dead-letters",
    "/api/profile/default",
    "/api/profile/nope",
    "/api/metrics/default/events",
    "/api/metrics/hooked/events",
    "/",
    "/v1",
    "/v1/",
    "//v1/track",
    "/v1/track/extra",
    "/v1/%00",
    "/..%2f..%2fetc/passwd",
    "/api/events/%ff/dead-letters",
];

const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "CONNECT", "FOO",
];

const SEGMENT_KEYS: &[&str] = &[
    "type",
    "userId",
    "anonymousId",
    "messageId",
    "event",
    "traits",
    "properties",
    "context",
    "integrations",
    "timestamp",
    "sentAt",
    "originalTimestamp",
    "groupId",
    "previousId",
    "name",
    "writeKey",
    "email",
    "batch",
    "created_at",
    "createdAt",
];

const TYPES: &[&str] = &[
    "track", "identify", "page", "screen", "group", "alias", "delete", "Track", "", "batch",
];

const QUERY_KEYS: &[&str] = &[
    "start_at",
    "ends_at",
    "q",
    "q_f",
    "o",
    "page",
    "page_size",
    "cursor",
    "limit",
    "ids",
    "until_id",
    "api_key",
    "granularity",
    "writeKey",
];

/// One request: bytes to write, and whether its framing is valid HTTP (then it must be
/// answered).
struct Case {
    kind: &'static str,
    bytes: Vec<u8>,
    well_framed: bool,
    /// Half-close after writing (for bodies shorter than announced).
    shutdown: bool,
}

/// Inputs that are expensive to make, made once.
struct Corpus {
    bombs: Vec<Vec<u8>>,
}

impl Corpus {
    fn new() -> Corpus {
        let bomb = |size: usize, byte: u8| gzip(&vec![byte; size]);
        Corpus {
            bombs: vec![
                bomb(8 * 1024 * 1024, b' '),
                bomb(600 * 1024, b'['),
                bomb(16 * 1024 * 1024, b'0'),
            ],
        }
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("compress");
    encoder.finish().expect("compress")
}

fn pick<'a, T>(rng: &mut fastrand::Rng, items: &'a [T]) -> &'a T {
    &items[rng.usize(..items.len())]
}

fn quote(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default()
}

fn random_string(rng: &mut fastrand::Rng) -> String {
    match rng.u8(..10) {
        0..=3 => (0..rng.usize(0..24)).map(|_| rng.alphanumeric()).collect(),
        4 => (0..rng.usize(0..16))
            .map(|_| char::from_u32(rng.u32(0..0x11_0000)).unwrap_or('\u{fffd}'))
            .collect(),
        5 if rng.u8(..20) == 0 => "x".repeat(rng.usize(200..40_000)),
        5 => "x".repeat(rng.usize(200..300)),
        6 => pick(
            rng,
            &[
                "2024-02-30T00:00:00Z",
                "+275760-09-13T00:00:00Z",
                "-271821-04-20T00:00:00Z",
                "9999-12-31T23:59:59.999999999Z",
                "2024-01-01T24:00:00Z",
                "1970-01-01",
                "",
                "null",
                "\u{0}",
                "\u{feff}",
                "\u{202e}",
            ],
        )
        .to_string(),
        7 => format!("{}", rng.i64(..)),
        _ => (0..rng.usize(1..8)).map(|_| rng.lowercase()).collect(),
    }
}

/// A JSON string literal, sometimes with escapes no `String` holds.
fn string_literal(rng: &mut fastrand::Rng) -> String {
    match rng.u8(..12) {
        0 => pick(
            rng,
            &[
                r#""\ud800""#,
                r#""\udc00\ud800""#,
                r#""\u0000""#,
                r#""\uDBFF\uDFFF""#,
                r#""\x""#,
                r#""\u12""#,
                r#""unterminated"#,
            ],
        )
        .to_string(),
        _ => quote(&random_string(rng)),
    }
}

fn number_literal(rng: &mut fastrand::Rng) -> String {
    match rng.u8(..10) {
        0 if rng.u8(..20) == 0 => "9".repeat(rng.usize(20..20_000)),
        0 => "9".repeat(rng.usize(20..400)),
        1 => format!("-{}", "1".repeat(rng.usize(20..400))),
        2 => format!("1e{}", rng.i64(..)),
        3 => format!("{}.{}e{}", rng.u8(..10), rng.u64(..), rng.i32(..)),
        4 => pick(
            rng,
            &[
                "-0", "0.0", "1e400", "-1e400", "1e-400", "01", "1.", ".5", "+1", "NaN",
                "Infinity", "0x10", "1_000",
            ],
        )
        .to_string(),
        5 => format!("{}", rng.f64() * f64::MAX),
        6 => format!("{}", u64::MAX),
        7 => format!("{}", i64::MIN),
        _ => format!("{}", rng.i64(-1000..1000)),
    }
}

fn json_value(rng: &mut fastrand::Rng, depth: u32) -> String {
    let leaf = depth >= 5 || rng.u8(..3) == 0;
    if leaf {
        return match rng.u8(..6) {
            0 => pick(rng, &["null", "true", "false"]).to_string(),
            1 | 2 => number_literal(rng),
            _ => string_literal(rng),
        };
    }
    if rng.bool() {
        let items: Vec<String> = (0..rng.usize(0..6))
            .map(|_| json_value(rng, depth + 1))
            .collect();
        format!("[{}]", items.join(","))
    } else {
        let fields: Vec<String> = (0..rng.usize(0..6))
            .map(|_| {
                let key = if rng.bool() {
                    quote(pick::<&str>(rng, SEGMENT_KEYS))
                } else {
                    string_literal(rng)
                };
                format!("{key}:{}", json_value(rng, depth + 1))
            })
            .collect();
        format!("{{{}}}", fields.join(","))
    }
}

fn segment_event(rng: &mut fastrand::Rng) -> String {
    let mut fields = vec![
        format!("\"type\":{}", quote(pick::<&str>(rng, TYPES))),
        format!("\"userId\":{}", quote(&format!("fuzz-{}", rng.u8(..50)))),
        format!("\"event\":{}", quote(&random_string(rng))),
    ];
    if rng.bool() {
        fields.push(format!(
            "\"messageId\":{}",
            quote(&format!("fuzz-{}", rng.u64(..)))
        ));
    }
    for _ in 0..rng.usize(0..4) {
        let key = pick(rng, SEGMENT_KEYS);
        fields.push(format!("{}:{}", quote(key), json_value(rng, 1)));
    }
    if rng.u8(..4) == 0 {
        fields.push(format!(
            "\"writeKey\":{}",
            quote(pick::<&str>(rng, &[WRITE_KEY, OTHER_KEY, "nope"]))
        ));
    }
    format!("{{{}}}", fields.join(","))
}

fn deep_nesting(rng: &mut fastrand::Rng) -> String {
    let depth = match rng.u8(..20) {
        0 => rng.usize(10_000..240_000),
        1..=9 => rng.usize(100..200),
        _ => rng.usize(200..5_000),
    };
    let (open, close) = if rng.bool() {
        ("[", "]")
    } else {
        ("{\"a\":", "}")
    };
    let mut text = String::from(r#"{"type":"track","userId":"u","event":"e","properties":"#);
    text.push_str(&open.repeat(depth));
    text.push('1');
    if rng.bool() {
        text.push_str(&close.repeat(depth));
    }
    text.push('}');
    text
}

fn body(rng: &mut fastrand::Rng) -> Vec<u8> {
    // Weights out of 1000: small inputs are the bulk, big ones rare (they cost the most).
    let mut bytes = match rng.u32(..1000) {
        0..=119 => (0..rng.usize(0..4096)).map(|_| rng.u8(..)).collect(),
        120..=179 => (0..rng.usize(0..512))
            .map(|_| *pick(rng, b"{}[]\",:0123456789.eE+-truefalsnl \\u"))
            .collect(),
        180..=329 => json_value(rng, 0).into_bytes(),
        330..=579 => segment_event(rng).into_bytes(),
        580..=729 => {
            let events: Vec<String> = (0..rng.usize(0..20)).map(|_| segment_event(rng)).collect();
            format!("{{\"batch\":[{}]}}", events.join(",")).into_bytes()
        }
        730..=809 => {
            let events: Vec<String> = (0..rng.usize(0..10)).map(|_| segment_event(rng)).collect();
            format!("[{}]", events.join(",")).into_bytes()
        }
        810..=889 => deep_nesting(rng).into_bytes(),
        890..=959 => format!(
            r#"{{"type":"identify","userId":"u","traits":{{"n":{},"m":{}}}}}"#,
            number_literal(rng),
            number_literal(rng)
        )
        .into_bytes(),
        960..=989 => Vec::new(),
        990..=994 => format!(
            r#"{{"batch":[{}]}}"#,
            vec![r#"{"type":"track","userId":"u","event":"e"}"#; rng.usize(2400..2700)].join(",")
        )
        .into_bytes(),
        _ => {
            // Big, near and over the limits.
            let size = *pick(
                rng,
                &[
                    32 * 1024,
                    500 * 1024,
                    512_000,
                    600 * 1024,
                    4 * 1024 * 1024 + 1,
                ],
            );
            let mut text =
                br#"{"type":"track","userId":"u","event":"e","properties":{"p":""#.to_vec();
            text.resize(text.len() + size, b'p');
            text.extend_from_slice(b"\"}}");
            text
        }
    };
    if rng.u8(..8) == 0 {
        // Invalid UTF-8, often inside a string.
        let bad: &[u8] = pick::<&[u8]>(
            rng,
            &[
                &[0xff_u8][..],
                &[0xc3, 0x28],
                &[0xed, 0xa0, 0x80],
                &[0xf4, 0x90, 0x80, 0x80],
                &[0xe2, 0x82],
            ],
        );
        let at = rng.usize(..=bytes.len());
        bytes.splice(at..at, bad.iter().copied());
    }
    bytes
}

/// Applies an encoding; returns the `Content-Encoding` header (if any) and the wire body.
fn encode(rng: &mut fastrand::Rng, corpus: &Corpus, body: Vec<u8>) -> (Option<String>, Vec<u8>) {
    match rng.u8(..14) {
        0..=6 => (None, body),
        7 | 8 => (Some("gzip".into()), gzip(&body)),
        9 => {
            let mut gz = gzip(&body);
            let cut = rng.usize(..=gz.len());
            gz.truncate(cut);
            (Some("gzip".into()), gz)
        }
        10 => {
            let mut gz = gzip(&body);
            if !gz.is_empty() {
                let at = rng.usize(..gz.len());
                gz[at] ^= 1 << rng.u8(..8);
            }
            (Some(pick(rng, &["gzip", "x-gzip", "GZIP"]).to_string()), gz)
        }
        11 => (Some("gzip".into()), pick(rng, &corpus.bombs).clone()),
        12 => {
            let mut gz = vec![0x1f, 0x8b, 0x08, 0x00];
            gz.extend((0..rng.usize(0..64)).map(|_| rng.u8(..)));
            (Some("gzip".into()), gz)
        }
        _ => (
            Some(
                pick(
                    rng,
                    &[
                        "br",
                        "deflate",
                        "gzip, gzip",
                        "identity",
                        "",
                        "gzip;q=1",
                        "compress",
                        "\u{00e9}",
                    ],
                )
                .to_string(),
            ),
            body,
        ),
    }
}

fn signature(rng: &mut fastrand::Rng, body: &[u8]) -> Option<String> {
    match rng.u8(..8) {
        0..=2 => None,
        3 => {
            let signed = refiner_gateway::segment::first_array_element(body).unwrap_or(body);
            let mut mac =
                Hmac::<Sha1>::new_from_slice(WEBHOOK_SECRET.as_bytes()).expect("hmac key");
            mac.update(signed);
            Some(hex::encode(mac.finalize().into_bytes()))
        }
        4 => Some(
            (0..40)
                .map(|_| *pick(rng, b"0123456789abcdef") as char)
                .collect(),
        ),
        5 => Some(format!("sha1={}", "0".repeat(40))),
        6 => Some("z".repeat(rng.usize(0..5000))),
        _ => Some(String::new()),
    }
}

fn authorization(rng: &mut fastrand::Rng) -> Option<String> {
    match rng.u8(..12) {
        0..=3 => Some(basic(WRITE_KEY)),
        4 => Some(basic(OTHER_KEY)),
        5 => None,
        6 => Some(format!("Bearer {ADMIN_TOKEN}")),
        7 => Some(format!("Bearer {}", random_string(rng))),
        8 => Some(basic(ADMIN_TOKEN)),
        9 => Some(basic(&random_string(rng))),
        _ => Some(
            pick(
                rng,
                &[
                    "Basic !!!not-base64",
                    "Basic",
                    "Basic Og==",
                    "Basic //79",
                    "basic dGVzdA==",
                    "",
                    "Bearer",
                    "Digest x",
                ],
            )
            .to_string(),
        ),
    }
}

fn query(rng: &mut fastrand::Rng) -> String {
    if rng.u8(..3) != 0 {
        return String::new();
    }
    let pairs: Vec<String> = (0..rng.usize(1..6))
        .map(|_| {
            let key = pick(rng, QUERY_KEYS);
            let value: String = match rng.u8(..6) {
                0 => "-1".into(),
                1 => "99999999999999999999999".into(),
                2 => "%ff%fe".into(),
                3 => ADMIN_TOKEN.into(),
                4 => "2024-13-45T99:99:99Z".into(),
                _ => random_string(rng)
                    .bytes()
                    .map(|b| {
                        if b.is_ascii_alphanumeric() {
                            (b as char).to_string()
                        } else {
                            format!("%{b:02X}")
                        }
                    })
                    .collect(),
            };
            format!("{key}={value}")
        })
        .collect();
    format!("?{}", pairs.join("&"))
}

/// Header names and values for a flood (names valid, values mostly printable).
fn flood(rng: &mut fastrand::Rng) -> Vec<(String, Vec<u8>)> {
    match rng.u8(..20) {
        0 => (0..rng.usize(50..1000))
            .map(|i| (format!("x-flood-{i}"), b"y".to_vec()))
            .collect(),
        1 => vec![(
            "x-huge".into(),
            vec![b'h'; rng.usize(8 * 1024..1024 * 1024)],
        )],
        2 => (0..rng.usize(10..100))
            .map(|_| ("cookie".into(), vec![b'c'; rng.usize(1..200)]))
            .collect(),
        3 => vec![(
            "x-bytes".into(),
            (0..rng.usize(1..64)).map(|_| rng.u8(128..)).collect(),
        )],
        _ => Vec::new(),
    }
}

fn http_case(rng: &mut fastrand::Rng, corpus: &Corpus) -> Case {
    let (method, path) = if rng.u8(..4) != 0 {
        ("POST", *pick(rng, POST_ROUTES))
    } else {
        (*pick(rng, METHODS), *pick(rng, OTHER_ROUTES))
    };
    let path = if rng.u8(..200) == 0 {
        format!("/v1/{}", "a".repeat(rng.usize(1000..70_000)))
    } else {
        format!("{path}{}", query(rng))
    };
    let raw_body = body(rng);
    let sig = signature(rng, &raw_body);
    let (encoding, wire) = encode(rng, corpus, raw_body);
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    if let Some(auth) = authorization(rng) {
        head.push_str(&format!("Authorization: {auth}\r\n"));
    }
    if let Some(sig) = sig {
        head.push_str(&format!("X-Signature: {sig}\r\n"));
    }
    if let Some(encoding) = encoding {
        head.push_str(&format!("Content-Encoding: {encoding}\r\n"));
    }
    match rng.u8(..6) {
        0 => head.push_str("Content-Type: text/plain\r\n"),
        1 => head.push_str("Content-Type: application/x-www-form-urlencoded\r\n"),
        2 => {}
        _ => head.push_str("Content-Type: application/json\r\n"),
    }
    if rng.u8(..10) == 0 {
        head.push_str("Origin: https://example.com\r\nAccess-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: authorization, x-retry-count\r\n");
    }
    let flood = flood(rng);
    let kind = if !flood.is_empty() {
        "header flood"
    } else {
        "http"
    };
    let mut bytes = head.into_bytes();
    for (name, value) in flood {
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(b": ");
        bytes.extend_from_slice(&value);
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(format!("Content-Length: {}\r\n\r\n", wire.len()).as_bytes());
    bytes.extend_from_slice(&wire);
    Case {
        kind,
        bytes,
        well_framed: true,
        shutdown: false,
    }
}

fn malformed_case(rng: &mut fastrand::Rng) -> Case {
    let route = *pick(rng, POST_ROUTES);
    let auth = basic(WRITE_KEY);
    let (bytes, shutdown): (Vec<u8>, bool) = match rng.u8(..12) {
        0 => ((0..rng.usize(1..2048)).map(|_| rng.u8(..)).collect(), true),
        1 => (format!("POST {route}\r\n\r\n").into_bytes(), true),
        2 => (format!("POST {route} HTTP/9.9\r\nContent-Length: 2\r\n\r\n{{}}").into_bytes(), true),
        3 => (
            format!("POST {route} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 100\r\n\r\n{{\"type\":").into_bytes(),
            true,
        ),
        4 => (
            format!("POST {route} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n").into_bytes(),
            true,
        ),
        5 => (
            format!("POST {route} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFF\r\nab\r\n").into_bytes(),
            true,
        ),
        6 => (
            format!("POST {route} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{{}}").into_bytes(),
            true,
        ),
        7 => (
            format!("POST {route} HTTP/1.1\r\nHost: x\r\nBad Header Without Colon\r\n\r\n").into_bytes(),
            true,
        ),
        8 => {
            let mut bytes = format!("POST {route} HTTP/1.1\r\nHost: x\r\nX-Nul: a").into_bytes();
            bytes.extend_from_slice(b"\x00\x01\x7f\r\nContent-Length: 0\r\n\r\n");
            (bytes, true)
        }
        9 => (
            format!("POST {route} HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n").into_bytes(),
            true,
        ),
        10 => (
            format!(
                "POST {route} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 2\r\n\r\n{{}}POST {route} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n[1,2"
            )
            .into_bytes(),
            true,
        ),
        _ => (
            format!("{} {route} HTTP/1.1\r\nHost: x\r\n\r\n", "G".repeat(rng.usize(1..10_000))).into_bytes(),
            true,
        ),
    };
    Case {
        kind: "malformed HTTP",
        bytes,
        well_framed: false,
        shutdown,
    }
}

fn make_case(rng: &mut fastrand::Rng, corpus: &Corpus) -> Case {
    if rng.u8(..20) == 0 {
        malformed_case(rng)
    } else {
        http_case(rng, corpus)
    }
}

/// What one exchange came to.
enum Outcome {
    Status(u16),
    /// The connection closed without a status line.
    Closed,
}

async fn exchange(port: u16, case: &Case) -> std::io::Result<Outcome> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    // The server may answer (and close) before reading everything: a failed write is not
    // a failure of the server.
    let _ = stream.write_all(&case.bytes).await;
    if case.shutdown {
        let _ = stream.shutdown().await;
    }
    let mut response = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) => break,
                Ok(n) => {
                    response.extend_from_slice(&buffer[..n]);
                    if response.len() > 64 * 1024 {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    })
    .await;
    if read.is_err() && response.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer within 20 s",
        ));
    }
    let text = String::from_utf8_lossy(&response[..response.len().min(64)]).to_string();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| text.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    Ok(status.map_or(Outcome::Closed, Outcome::Status))
}

#[derive(Default)]
struct Tally {
    by_status: BTreeMap<String, u64>,
    failures: Vec<String>,
    closed_well_framed: u64,
}

pub async fn run(params: FuzzParams) -> Report {
    let started = Instant::now();
    let mut report = Report::new("Bad input");
    report.ran = format!(
        "{} seeded random requests (seed {}) over raw TCP, {} at a time, against every route \
         of the real binary",
        params.cases, params.seed, params.concurrency
    );
    let scratch = scratch_dir("fuzz");
    let data_dir = scratch.path().join("data");
    // Nothing listens at the Refiner URL: what is accepted stays queued.
    let spec = Spec::new(&data_dir, "http://127.0.0.1:9/v1").delivery("enabled", "false");
    let mut gateway = Gateway::start(&spec, scratch.path(), Duration::from_secs(30)).await;
    let port: u16 = gateway
        .address
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let corpus = Arc::new(Corpus::new());
    let tally = Arc::new(Mutex::new(Tally::default()));
    let next = Arc::new(AtomicU64::new(0));
    let baseline: Arc<Mutex<Option<Memory>>> = Arc::new(Mutex::new(None));
    let peak_anon = Arc::new(AtomicU64::new(0));
    let start_memory = gateway.memory();
    let pid = gateway.pid;
    let workers: Vec<_> = (0..params.concurrency)
        .map(|_| {
            let (corpus, tally, next, baseline, peak_anon) = (
                corpus.clone(),
                tally.clone(),
                next.clone(),
                baseline.clone(),
                peak_anon.clone(),
            );
            let params = params.clone();
            tokio::spawn(async move {
                loop {
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    if index >= params.cases {
                        break;
                    }
                    if index == params.warmup {
                        *baseline.lock().expect("lock") = Some(Memory::of(pid));
                    }
                    if index % 500 == 0 {
                        peak_anon.fetch_max(Memory::of(pid).anon, Ordering::SeqCst);
                    }
                    if index > 0 && index % 100_000 == 0 {
                        eprintln!("[fuzz] {index} of {} cases", params.cases);
                    }
                    // Each case has its own generator: a failure names the seed that remakes it.
                    let case_seed = params.seed.wrapping_mul(1_000_003).wrapping_add(index);
                    let case = make_case(&mut fastrand::Rng::with_seed(case_seed), &corpus);
                    let outcome = exchange(port, &case).await;
                    let mut tally = tally.lock().expect("lock");
                    let key = match &outcome {
                        Ok(Outcome::Status(status)) => status.to_string(),
                        Ok(Outcome::Closed) => "closed".into(),
                        Err(_) => "no connection".into(),
                    };
                    *tally.by_status.entry(key).or_default() += 1;
                    let failure = match outcome {
                        Ok(Outcome::Status(status)) if status >= 500 => {
                            Some(format!("answered {status}"))
                        }
                        Ok(Outcome::Closed) if case.well_framed => {
                            tally.closed_well_framed += 1;
                            Some("closed without an answer".to_string())
                        }
                        Err(e) => Some(format!("{e}")),
                        _ => None,
                    };
                    if let Some(failure) = failure {
                        if tally.failures.len() < 20 {
                            let shown =
                                String::from_utf8_lossy(&case.bytes[..case.bytes.len().min(300)])
                                    .to_string();
                            tally.failures.push(format!(
                                "case {index} (seed {case_seed}, {}): {failure}: {shown:?}",
                                case.kind
                            ));
                        } else {
                            tally.failures.push(String::new());
                        }
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    let fuzz_time = started.elapsed();
    let end_memory = gateway.memory();
    let alive = gateway.alive();

    // Still serving, and still accepting a valid event.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let health = client
        .get(format!("{}/healthz", gateway.address))
        .send()
        .await
        .map(|r| r.status().as_u16());
    let valid = client
        .post(format!("{}/v1/track", gateway.address))
        .header("Authorization", basic(WRITE_KEY))
        .header("Content-Type", "application/json")
        .body(r#"{"userId":"after-fuzz","event":"Still Here","messageId":"after-fuzz"}"#)
        .send()
        .await
        .map(|r| r.status().as_u16());
    let terminated = gateway.terminate().await;

    let tally = std::mem::take(&mut *tally.lock().expect("lock"));
    let baseline = baseline.lock().expect("lock").unwrap_or(start_memory);
    let growth_kib = end_memory.anon.saturating_sub(baseline.anon);
    let failures: Vec<&String> = tally.failures.iter().filter(|f| !f.is_empty()).collect();
    report.figure("cases", params.cases);
    report.figure(
        "rate",
        format!(
            "{:.0} cases/s",
            params.cases as f64 / fuzz_time.as_secs_f64()
        ),
    );
    report.figure("answers by status", format!("{:?}", tally.by_status));
    report.figure(
        "RSS (heap) at start / after warm-up / end / peak",
        format!(
            "{} ({}) / {} ({}) / {} ({}) / {} (VmHWM, anon peak {})",
            mib(start_memory.rss),
            mib(start_memory.anon),
            mib(baseline.rss),
            mib(baseline.anon),
            mib(end_memory.rss),
            mib(end_memory.anon),
            mib(end_memory.hwm),
            mib(peak_anon.load(Ordering::SeqCst).max(end_memory.anon))
        ),
    );
    report.check(
        "no 5xx, every well-framed request answered",
        tally.failures.is_empty(),
        format!("{} failures: {failures:#?}", tally.failures.len()),
    );
    report.check(
        "the process stayed up and still serves",
        alive && health.as_ref().ok() == Some(&200),
        format!("alive {alive}, /healthz {health:?}"),
    );
    report.check(
        "a valid event is accepted afterwards",
        valid.as_ref().ok() == Some(&200),
        format!("{valid:?}"),
    );
    report.check(
        "heap memory bounded",
        growth_kib <= params.rss_growth_limit_mib * 1024,
        format!(
            "anonymous RSS grew {} after warm-up (limit {} MiB)",
            mib(growth_kib),
            params.rss_growth_limit_mib
        ),
    );
    report.check(
        "stops cleanly on SIGTERM",
        terminated.is_ok(),
        format!("{terminated:?}"),
    );
    report.elapsed = started.elapsed();
    report
}
