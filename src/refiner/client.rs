//! The HTTP client for Refiner's REST API, and the classification of its answers.
//!
//! One pooled `reqwest` client (keep-alive connections reused across calls) sends a
//! [`RefinerRequest`] with `Authorization: Bearer <key>` and turns whatever happened into
//! an [`Outcome`]:
//! - 2xx → [`Outcome::Delivered`];
//! - 408, 425, 429, 5xx except 501, timeouts and connection errors → [`Outcome::Retry`]
//!   (with the `Retry-After` the server asked for, in seconds or as an HTTP date);
//! - anything else (other 4xx, 501, 3xx that was not followed) → [`Outcome::Reject`]: the
//!   event goes to the dead letters with the status and the (truncated) response body.
//!
//! Sending never panics and never logs keys or bodies above debug level.

use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{StatusCode, Url};

use super::mapping::{HttpMethod, RefinerRequest};

/// Longest response body kept for a dead letter or a log line, in bytes.
pub const MAX_KEPT_BODY: usize = 2048;

/// What one call came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered {
        status: u16,
        /// Refiner's answer (its first bytes), for the delivery log.
        body: String,
    },
    /// A transient failure: try again later.
    Retry {
        /// What failed: an HTTP status, a timeout or the connection.
        kind: Failure,
        /// The HTTP status, or `None` for a timeout or connection error.
        status: Option<u16>,
        /// The server's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
        error: String,
    },
    /// A permanent failure: retrying would get the same answer.
    Reject { status: u16, body: String },
}

/// Why a call failed transiently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Refiner answered with a retryable status.
    Status(u16),
    /// No complete answer within the timeout.
    Timeout,
    /// The connection failed (refused, reset, cut while reading the answer).
    Connection,
}

impl Outcome {
    /// The status label for metrics: the code, or `timeout` / `connection`.
    pub fn status_label(&self) -> String {
        match self {
            Outcome::Delivered { status, .. } | Outcome::Reject { status, .. } => {
                status.to_string()
            }
            Outcome::Retry { kind, .. } => kind.label(),
        }
    }
}

impl Failure {
    /// The code, or `timeout` / `connection`.
    pub fn label(&self) -> String {
        match self {
            Failure::Status(status) => status.to_string(),
            Failure::Timeout => "timeout".into(),
            Failure::Connection => "connection".into(),
        }
    }
}

/// Whether a status is worth retrying (see the module header).
pub fn is_retryable(status: u16) -> bool {
    matches!(status, 408 | 425 | 429) || (500..=599).contains(&status) && status != 501
}

/// A segment as Refiner's `GET /segments` lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct SegmentInfo {
    pub uuid: String,
    pub name: String,
    /// Only manual segments take members through `/sync-segment`.
    #[serde(default)]
    pub is_manual: bool,
}

/// One page of `GET /segments`.
#[derive(Debug, serde::Deserialize)]
struct SegmentPage {
    #[serde(default)]
    items: Vec<SegmentInfo>,
    pagination: Option<Pagination>,
}

#[derive(Debug, serde::Deserialize)]
struct Pagination {
    current_page: u64,
    last_page: u64,
}

/// Segments asked for per page (Refiner's maximum).
const SEGMENT_PAGE_LENGTH: u32 = 1000;
/// Most pages of segments read: a million segments, far beyond any account.
const MAX_SEGMENT_PAGES: u64 = 1000;

/// Settings of the client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Refiner's base URL, e.g. `https://api.refiner.io/v1`.
    pub base_url: String,
    /// Whole-call timeout (connect, send, answer).
    pub timeout: Duration,
    /// Idle keep-alive connections kept per host.
    pub max_idle_per_host: usize,
}

/// The pooled client.
#[derive(Clone)]
pub struct RefinerClient {
    http: reqwest::Client,
    base: String,
}

impl RefinerClient {
    pub fn new(options: &ClientOptions) -> Result<RefinerClient, String> {
        Url::parse(&options.base_url).map_err(|e| format!("invalid Refiner base URL: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(options.max_idle_per_host)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .user_agent(concat!("refiner-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(RefinerClient {
            http,
            base: options.base_url.trim_end_matches('/').to_string(),
        })
    }

    /// Sends one call with the given API key.
    pub async fn send(&self, api_key: &str, request: &RefinerRequest) -> Outcome {
        let url = format!("{}{}", self.base, request.path);
        let builder = match request.method {
            HttpMethod::Post => self.http.post(&url),
            HttpMethod::Delete => self.http.delete(&url),
        };
        let result = builder
            .bearer_auth(api_key)
            .json(&request.body)
            .send()
            .await;
        let response = match result {
            Ok(response) => response,
            Err(e) => {
                let (kind, label) = if e.is_timeout() {
                    (Failure::Timeout, "timeout")
                } else {
                    (Failure::Connection, "connection error")
                };
                return Outcome::Retry {
                    kind,
                    status: None,
                    retry_after: None,
                    error: format!("{label}: {}", error_chain(&e)),
                };
            }
        };
        let status = response.status();
        let retry_after = retry_after(response.headers());
        // The body is read to completion so the connection can be reused.
        let body = match response.bytes().await {
            Ok(bytes) => truncate(&bytes),
            Err(e) => {
                if status.is_success() {
                    // The answer was cut; Refiner may or may not have applied the call.
                    return Outcome::Retry {
                        kind: Failure::Connection,
                        status: None,
                        retry_after: None,
                        error: format!("connection error: reading the answer: {}", error_chain(&e)),
                    };
                }
                String::new()
            }
        };
        classify(status, retry_after, body)
    }
}

impl RefinerClient {
    /// Every segment of the account (`GET /segments`, all pages). An answer that is not a
    /// 2xx is classified like any call's; a 2xx that is not a segment list is a
    /// [`Outcome::Reject`] (retrying would read the same).
    pub async fn list_segments(&self, api_key: &str) -> Result<Vec<SegmentInfo>, Outcome> {
        let mut segments = Vec::new();
        for page in 1..=MAX_SEGMENT_PAGES {
            let url = format!("{}/segments", self.base);
            let result = self
                .http
                .get(&url)
                .query(&[
                    ("page", page),
                    ("page_length", u64::from(SEGMENT_PAGE_LENGTH)),
                ])
                .bearer_auth(api_key)
                .send()
                .await;
            let response = result.map_err(|e| transport_failure(&e))?;
            let status = response.status();
            let retry_after = retry_after(response.headers());
            let bytes = response.bytes().await.map_err(|e| transport_failure(&e))?;
            if !status.is_success() {
                return Err(classify(status, retry_after, truncate(&bytes)));
            }
            let page: SegmentPage =
                serde_json::from_slice(&bytes).map_err(|e| Outcome::Reject {
                    status: status.as_u16(),
                    body: format!("GET /segments: not a segment list: {e}"),
                })?;
            segments.extend(page.items);
            match page.pagination {
                Some(p) if p.current_page < p.last_page => continue,
                _ => break,
            }
        }
        Ok(segments)
    }
}

/// A call that got no complete answer: a timeout or a connection failure, retried.
fn transport_failure(e: &reqwest::Error) -> Outcome {
    let (kind, label) = if e.is_timeout() {
        (Failure::Timeout, "timeout")
    } else {
        (Failure::Connection, "connection error")
    };
    Outcome::Retry {
        kind,
        status: None,
        retry_after: None,
        error: format!("{label}: {}", error_chain(e)),
    }
}

fn classify(status: StatusCode, retry_after: Option<Duration>, body: String) -> Outcome {
    let code = status.as_u16();
    if status.is_success() {
        Outcome::Delivered { status: code, body }
    } else if is_retryable(code) {
        Outcome::Retry {
            kind: Failure::Status(code),
            status: Some(code),
            retry_after,
            error: format!("HTTP {code}: {body}"),
        }
    } else {
        Outcome::Reject { status: code, body }
    }
}

/// `Retry-After` as delta-seconds or an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds.min(24 * 3600)));
    }
    let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    let delta = date.timestamp_millis() - chrono::Utc::now().timestamp_millis();
    Some(Duration::from_millis(
        delta.clamp(0, 24 * 3600 * 1000) as u64
    ))
}

fn truncate(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(MAX_KEPT_BODY)];
    String::from_utf8_lossy(cut).into_owned()
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_statuses() {
        for code in [408, 425, 429, 500, 502, 503, 504, 599] {
            assert!(is_retryable(code), "{code}");
        }
        for code in [400, 401, 403, 404, 409, 422, 501, 301] {
            assert!(!is_retryable(code), "{code}");
        }
        let ok = classify(StatusCode::OK, None, "{}".into());
        assert_eq!(
            ok,
            Outcome::Delivered {
                status: 200,
                body: "{}".into()
            }
        );
        let rejected = classify(StatusCode::BAD_REQUEST, None, "{\"error\":\"x\"}".into());
        assert_eq!(
            rejected,
            Outcome::Reject {
                status: 400,
                body: "{\"error\":\"x\"}".into()
            }
        );
        let retry = classify(
            StatusCode::TOO_MANY_REQUESTS,
            Some(Duration::from_secs(3)),
            String::new(),
        );
        assert!(
            matches!(retry, Outcome::Retry { status: Some(429), retry_after: Some(d), .. } if d == Duration::from_secs(3))
        );
    }

    #[test]
    fn reads_retry_after_in_both_forms() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "7".parse().expect("header"));
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
        let later = chrono::Utc::now() + chrono::Duration::seconds(30);
        headers.insert(RETRY_AFTER, later.to_rfc2822().parse().expect("header"));
        let parsed = retry_after(&headers).expect("date");
        assert!(
            parsed > Duration::from_secs(25) && parsed <= Duration::from_secs(30),
            "{parsed:?}"
        );
        headers.insert(RETRY_AFTER, "soon".parse().expect("header"));
        assert_eq!(retry_after(&headers), None);
    }

    #[test]
    fn keeps_bounded_bodies() {
        assert_eq!(truncate(&vec![b'a'; 10_000]).len(), MAX_KEPT_BODY);
    }
}
