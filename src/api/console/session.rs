//! Console sessions: signing in with the admin token gives a browser a session cookie, which
//! then stands for the token on `/console` and `/api`.
//!
//! Invariants:
//! - A session id is 256 bits from the operating system's generator, sent only in the
//!   `refiner_gateway_session` cookie (`HttpOnly`, `SameSite=Strict`, `Path=/`, `Secure` when
//!   the request came over HTTPS, see [`crate::config::ConsoleSettings`]). The server keeps
//!   only the id's SHA-256, so the table holds nothing a reader could replay.
//! - A session lives [`SESSION_TTL`] and at most [`MAX_SESSIONS`] exist: a new one beyond that
//!   evicts the one closest to expiry. Sessions live in memory: a restart signs everyone out.
//! - With a session cookie, a request other than GET/HEAD must carry `X-CSRF-Token` equal to
//!   the session's token (compared in constant time) and be same-origin (`Sec-Fetch-Site:
//!   same-origin` and/or an `Origin` naming the `Host` it was sent to; at least one of them,
//!   none foreign). Otherwise it is refused with 403 before any work.
//! - Failed sign-ins are counted per peer address: [`MAX_FAILURES`] in [`FAILURE_WINDOW`]
//!   and that address gets 429 until the window ends. At most [`MAX_TRACKED_PEERS`]
//!   addresses are tracked; when the table is full of live windows, every address is
//!   limited (failing closed rather than forgetting an attacker).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::http::header::{HeaderMap, COOKIE, HOST, ORIGIN};
use actix_web::http::Method;
use actix_web::HttpRequest;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::api::management::error::ApiError;

/// The session cookie's name.
pub const COOKIE_NAME: &str = "refiner_gateway_session";
/// The header that carries a session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a session lives after sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most sessions at once.
pub const MAX_SESSIONS: usize = 256;
/// Failed sign-ins one address may make per [`FAILURE_WINDOW`].
pub const MAX_FAILURES: u32 = 10;
/// The window failed sign-ins are counted in.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Most peer addresses whose failures are counted at once.
pub const MAX_TRACKED_PEERS: usize = 4096;

/// One signed-in browser.
struct Session {
    csrf: String,
    expires_at: Instant,
}

/// A session just made: what the cookie and the answer carry.
pub struct NewSession {
    pub id: String,
    pub csrf: String,
    pub ttl: Duration,
}

/// Failed sign-ins of one address in the current window.
struct Failures {
    window_start: Instant,
    count: u32,
}

/// The sessions and the sign-in limiter.
pub struct SessionStore {
    /// SHA-256 of the admin token; `None`: the API (and so the console) is off.
    admin: Option<[u8; 32]>,
    /// Addresses whose `X-Forwarded-Proto` is believed.
    trusted_proxies: Vec<IpAddr>,
    sessions: Mutex<HashMap<[u8; 32], Session>>,
    failures: Mutex<HashMap<IpAddr, Failures>>,
}

fn digest(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

/// 256 random bits as 64 hex digits.
fn random_token() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| ApiError::Unavailable(format!("no random numbers for a session: {e}")))?;
    Ok(hex::encode(bytes))
}

impl SessionStore {
    pub fn new(admin: Option<[u8; 32]>, trusted_proxies: Vec<IpAddr>) -> SessionStore {
        SessionStore {
            admin,
            trusted_proxies,
            sessions: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Checks `token` against the admin token and makes a session; failures count against
    /// `peer`.
    pub fn sign_in(&self, peer: Option<IpAddr>, token: &str) -> Result<NewSession, ApiError> {
        let Some(expected) = &self.admin else {
            return Err(ApiError::Disabled);
        };
        let now = Instant::now();
        if self.limited(peer, now) {
            return Err(ApiError::TooManyAttempts);
        }
        let matches: bool = digest(token).ct_eq(expected).into();
        if !matches {
            self.record_failure(peer, now);
            return Err(if token.is_empty() {
                ApiError::MissingToken
            } else {
                ApiError::InvalidToken
            });
        }
        let session = NewSession {
            id: random_token()?,
            csrf: random_token()?,
            ttl: SESSION_TTL,
        };
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, s| s.expires_at > now);
        if sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires_at)
                .map(|(key, _)| *key);
            if let Some(key) = oldest {
                sessions.remove(&key);
            }
        }
        sessions.insert(
            digest(&session.id),
            Session {
                csrf: session.csrf.clone(),
                expires_at: now + SESSION_TTL,
            },
        );
        Ok(session)
    }

    /// Whether `peer` has used up its failed sign-ins.
    fn limited(&self, peer: Option<IpAddr>, now: Instant) -> bool {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.retain(|_, f| now.duration_since(f.window_start) < FAILURE_WINDOW);
        match peer.and_then(|peer| failures.get(&peer)) {
            Some(f) => f.count >= MAX_FAILURES,
            None => failures.len() >= MAX_TRACKED_PEERS,
        }
    }

    fn record_failure(&self, peer: Option<IpAddr>, now: Instant) {
        let Some(peer) = peer else { return };
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() >= MAX_TRACKED_PEERS && !failures.contains_key(&peer) {
            return;
        }
        let entry = failures.entry(peer).or_insert(Failures {
            window_start: now,
            count: 0,
        });
        entry.count += 1;
    }

    /// The CSRF token of the live session `id`.
    fn csrf_of(&self, id: &str) -> Option<String> {
        let now = Instant::now();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let key = digest(id);
        match sessions.get(&key) {
            Some(s) if s.expires_at > now => Some(s.csrf.clone()),
            Some(_) => {
                sessions.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Ends the session `id` (nothing when there is none).
    pub fn sign_out(&self, id: &str) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.remove(&digest(id));
    }

    /// Checks a request that presents the session cookie `id`: the session must be live,
    /// and an unsafe method needs the CSRF token and a same-origin request. Answers the
    /// session's CSRF token.
    pub fn authorize(&self, request: &HttpRequest, id: &str) -> Result<String, ApiError> {
        let csrf = self.csrf_of(id).ok_or(ApiError::InvalidSession)?;
        let safe = matches!(*request.method(), Method::GET | Method::HEAD);
        if safe {
            return Ok(csrf);
        }
        let presented = request
            .headers()
            .get(CSRF_HEADER)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        let token_ok: bool = presented.ct_eq(csrf.as_bytes()).into();
        if !token_ok {
            return Err(ApiError::CrossSite(
                "the X-CSRF-Token header is missing or wrong",
            ));
        }
        if !same_origin(request.headers()) {
            return Err(ApiError::CrossSite("the request is not same-origin"));
        }
        Ok(csrf)
    }

    /// Whether the session cookie should be `Secure`: the request came through a trusted
    /// proxy that says it arrived over HTTPS.
    pub fn secure(&self, request: &HttpRequest) -> bool {
        let trusted = request
            .peer_addr()
            .is_some_and(|peer| self.trusted_proxies.contains(&peer.ip()));
        trusted
            && request
                .headers()
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|proto| proto.trim().eq_ignore_ascii_case("https"))
    }
}

/// The session cookie's value, if the request has one.
pub fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(COOKIE)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.trim().to_string())
}

/// Whether the request is same-origin: `Sec-Fetch-Site` (when sent) is `same-origin`, an
/// `Origin` (when sent) names the `Host` the request was sent to, and at least one is sent.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let site = text(actix_web::http::header::HeaderName::from_static(
        "sec-fetch-site",
    ));
    let origin = text(ORIGIN);
    if site.is_none() && origin.is_none() {
        return false;
    }
    if site.is_some_and(|site| site != "same-origin") {
        return false;
    }
    match origin {
        None => true,
        Some(origin) => {
            let host = text(HOST).unwrap_or_default();
            let named = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            !host.is_empty() && named.is_some_and(|named| named.eq_ignore_ascii_case(host))
        }
    }
}

/// The `Set-Cookie` value that starts a session.
pub fn set_cookie(session: &NewSession, secure: bool) -> String {
    format!(
        "{COOKIE_NAME}={}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{}",
        session.id,
        session.ttl.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// The `Set-Cookie` value that ends a session.
pub fn clear_cookie(secure: bool) -> String {
    format!(
        "{COOKIE_NAME}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{}",
        if secure { "; Secure" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;
    use actix_web::test::TestRequest;

    fn store() -> SessionStore {
        SessionStore::new(Some(digest("admin-token-0123")), vec![])
    }

    #[test]
    fn a_session_needs_the_token_and_failures_are_limited() {
        let store = store();
        let peer: IpAddr = "10.0.0.1".parse().expect("ip");
        let session = store
            .sign_in(Some(peer), "admin-token-0123")
            .expect("signed in");
        assert_eq!(session.id.len(), 64);
        assert_ne!(session.id, session.csrf);
        for _ in 0..MAX_FAILURES {
            assert_eq!(
                store.sign_in(Some(peer), "wrong").err(),
                Some(ApiError::InvalidToken)
            );
        }
        assert_eq!(
            store.sign_in(Some(peer), "admin-token-0123").err(),
            Some(ApiError::TooManyAttempts)
        );
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        assert!(store.sign_in(Some(other), "admin-token-0123").is_ok());
    }

    #[test]
    fn sessions_are_bounded_and_end_on_sign_out() {
        let store = store();
        let first = store.sign_in(None, "admin-token-0123").expect("first");
        for _ in 0..MAX_SESSIONS {
            store.sign_in(None, "admin-token-0123").expect("more");
        }
        assert!(store.csrf_of(&first.id).is_none(), "the oldest was evicted");
        let last = store.sign_in(None, "admin-token-0123").expect("last");
        assert_eq!(store.csrf_of(&last.id), Some(last.csrf.clone()));
        store.sign_out(&last.id);
        assert!(store.csrf_of(&last.id).is_none());
    }

    #[test]
    fn unsafe_methods_need_the_csrf_token_and_the_same_origin() {
        let store = store();
        let s = store.sign_in(None, "admin-token-0123").expect("session");
        let get = TestRequest::get().to_http_request();
        assert!(store.authorize(&get, &s.id).is_ok());
        assert_eq!(
            store.authorize(&get, "nope").err(),
            Some(ApiError::InvalidSession)
        );
        let post = |csrf: &str, origin: &str| {
            TestRequest::post()
                .insert_header((HOST, "127.0.0.1:8080"))
                .insert_header((CSRF_HEADER, csrf))
                .insert_header((ORIGIN, origin))
                .to_http_request()
        };
        assert!(store
            .authorize(&post(&s.csrf, "http://127.0.0.1:8080"), &s.id)
            .is_ok());
        for (csrf, origin) in [
            ("wrong", "http://127.0.0.1:8080"),
            (s.csrf.as_str(), "https://evil.example"),
            (s.csrf.as_str(), "null"),
        ] {
            assert!(matches!(
                store.authorize(&post(csrf, origin), &s.id),
                Err(ApiError::CrossSite(_))
            ));
        }
        let no_origin = TestRequest::post()
            .insert_header((CSRF_HEADER, s.csrf.as_str()))
            .to_http_request();
        assert!(store.authorize(&no_origin, &s.id).is_err());
        let cross = TestRequest::post()
            .insert_header((CSRF_HEADER, s.csrf.as_str()))
            .insert_header(("sec-fetch-site", "cross-site"))
            .to_http_request();
        assert!(store.authorize(&cross, &s.id).is_err());
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.insert(
            COOKIE,
            HeaderValue::from_static("a=1; refiner_gateway_session=abc; b=2"),
        );
        assert_eq!(cookie(&headers).as_deref(), Some("abc"));
        let s = NewSession {
            id: "abc".into(),
            csrf: "x".into(),
            ttl: SESSION_TTL,
        };
        let text = set_cookie(&s, true);
        for part in [
            "HttpOnly",
            "SameSite=Strict",
            "Path=/",
            "Secure",
            "Max-Age=43200",
        ] {
            assert!(text.contains(part), "{text}");
        }
        assert!(!set_cookie(&s, false).contains("Secure"));
    }
}
