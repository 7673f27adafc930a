//! The web console: its security over real HTTP (sessions, CSRF, same-origin, headers), and
//! the whole console driven in real headless Chromium by `tests/console/console.test.mjs`
//! against a running gateway and the Refiner simulator.

use std::path::{Path, PathBuf};
use std::time::Duration;

use refiner_gateway::config::Secret;
use refiner_gateway::sim::Faults;
use reqwest::header::{HeaderMap, COOKIE, SET_COOKIE};
use reqwest::Method;
use serde_json::{json, Value};

use crate::delivery::{deliver_to, start_sim, DEFAULT_KEY};
use crate::deps;
use crate::helpers::{spawn_app_with, TestApp, WRITE_KEY};

const ADMIN: &str = "console-admin-token-0123456789";
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

async fn console_app() -> TestApp {
    spawn_app_with(|s| s.admin_token = Some(Secret::new(ADMIN))).await
}

/// Signs in; the session cookie's value and the CSRF token.
async fn sign_in(app: &TestApp) -> (String, String) {
    let response = app
        .client
        .post(app.url("/console/session"))
        .header("Origin", &app.address)
        .json(&json!({ "token": ADMIN }))
        .send()
        .await
        .expect("sign in");
    assert_eq!(response.status(), 200);
    let cookie = set_cookie(response.headers());
    let body: Value = response.json().await.expect("json");
    let id = cookie
        .split(';')
        .next()
        .and_then(|pair| pair.strip_prefix("refiner_gateway_session="))
        .expect("the session cookie")
        .to_string();
    let csrf = body["csrf_token"].as_str().expect("csrf_token").to_string();
    (id, csrf)
}

fn set_cookie(headers: &HeaderMap) -> String {
    headers
        .get(SET_COOKIE)
        .and_then(|v| v.to_str().ok())
        .expect("Set-Cookie")
        .to_string()
}

async fn reason(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    let reason = body["error"]["reason"].as_str().unwrap_or("").to_string();
    (status, reason)
}

/// Every console and API route, with the method it takes.
fn routes() -> Vec<(Method, &'static str)> {
    vec![
        (Method::GET, "/api"),
        (Method::GET, "/api/overview"),
        (Method::GET, "/api/live"),
        (Method::GET, "/api/events/default?message_id=x"),
        (Method::GET, "/api/events/default/dead-letters"),
        (Method::DELETE, "/api/events/default/dead-letters"),
        (Method::POST, "/api/events/default/dead-letters/replay"),
        (Method::GET, "/api/events/default/dead-letters/1"),
        (Method::DELETE, "/api/events/default/dead-letters/1"),
        (Method::GET, "/api/profile/default"),
        (Method::GET, "/api/metrics/default/events"),
        (Method::POST, "/api/sources/default/preview"),
        (Method::POST, "/api/reload"),
        (Method::GET, "/api/no-such-route"),
        (Method::DELETE, "/console/session"),
        (Method::POST, "/console/sign-out"),
        (Method::GET, "/console/overview"),
        (Method::GET, "/console/no-such-page"),
    ]
}

#[tokio::test]
async fn every_route_refuses_requests_without_a_session_or_token() {
    let app = console_app().await;
    for (method, path) in routes() {
        for cookie in [None, Some("refiner_gateway_session=forged")] {
            let mut request = app.client.request(method.clone(), app.url(path));
            if let Some(cookie) = cookie {
                request = request.header(COOKIE, cookie);
            }
            let (status, reason) = reason(request.send().await.expect("request")).await;
            assert_eq!(
                status, 401,
                "{method} {path} with cookie {cookie:?}: {reason}"
            );
            let expected = if cookie.is_some() {
                "invalid_session"
            } else {
                "missing_token"
            };
            if path.starts_with("/api") {
                assert_eq!(reason, expected, "{method} {path}");
            }
        }
    }
    // The sign-in page and its assets are open; the session probe says "not signed in".
    for path in ["/console", "/console/app.js", "/console/app.css"] {
        let response = app.client.get(app.url(path)).send().await.expect("get");
        assert_eq!(response.status(), 200, "{path}");
    }
    let probe: Value = app
        .client
        .get(app.url("/console/session"))
        .send()
        .await
        .expect("probe")
        .json()
        .await
        .expect("json");
    assert_eq!(probe, json!({"signed_in": false}));
}

#[tokio::test]
async fn a_session_cookie_stands_for_the_token_and_actions_need_csrf_and_same_origin() {
    let app = console_app().await;
    let (id, csrf) = sign_in(&app).await;
    let cookie = format!("refiner_gateway_session={id}");
    let get = app
        .client
        .get(app.url("/api/events/default/dead-letters"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("get");
    assert_eq!(get.status(), 200);
    let replay = app.url("/api/events/default/dead-letters/replay");
    let cases: [(&str, Vec<(&str, String)>); 5] = [
        ("no CSRF header", vec![("Origin", app.address.clone())]),
        (
            "wrong CSRF token",
            vec![
                ("Origin", app.address.clone()),
                ("X-CSRF-Token", "0".repeat(64)),
            ],
        ),
        (
            "foreign Origin",
            vec![
                ("Origin", "https://evil.example".into()),
                ("X-CSRF-Token", csrf.clone()),
            ],
        ),
        (
            "cross-site fetch",
            vec![
                ("Sec-Fetch-Site", "cross-site".into()),
                ("X-CSRF-Token", csrf.clone()),
            ],
        ),
        ("no Origin at all", vec![("X-CSRF-Token", csrf.clone())]),
    ];
    for (case, headers) in cases {
        let mut request = app.client.post(&replay).header(COOKIE, &cookie);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        let (status, reason) = reason(request.send().await.expect("post")).await;
        assert_eq!((status, reason.as_str()), (403, "cross_site"), "{case}");
    }
    let allowed = app
        .client
        .post(&replay)
        .header(COOKIE, &cookie)
        .header("Origin", &app.address)
        .header("Sec-Fetch-Site", "same-origin")
        .header("X-CSRF-Token", &csrf)
        .send()
        .await
        .expect("post");
    assert_eq!(allowed.status(), 200);
    // Signing out needs the same; afterwards the cookie is refused everywhere.
    let refused = app
        .client
        .delete(app.url("/console/session"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("delete");
    assert_eq!(refused.status(), 403);
    let out = app
        .client
        .delete(app.url("/console/session"))
        .header(COOKIE, &cookie)
        .header("Origin", &app.address)
        .header("X-CSRF-Token", &csrf)
        .send()
        .await
        .expect("delete");
    assert_eq!(out.status(), 200);
    assert!(set_cookie(out.headers()).contains("Max-Age=0"));
    let after = app
        .client
        .get(app.url("/api"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .expect("get");
    assert_eq!(reason(after).await, (401, "invalid_session".to_string()));
}

#[tokio::test]
async fn console_answers_carry_a_strict_csp_and_the_cookie_is_locked_down() {
    let app = console_app().await;
    for path in [
        "/console",
        "/console/app.js",
        "/console/app.css",
        "/console/nope",
    ] {
        let response = app.client.get(app.url(path)).send().await.expect("get");
        let headers = response.headers();
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        assert_eq!(header("content-security-policy"), Some(CSP), "{path}");
        assert_eq!(header("x-content-type-options"), Some("nosniff"), "{path}");
        assert_eq!(header("referrer-policy"), Some("no-referrer"), "{path}");
    }
    let html = app
        .client
        .get(app.url("/console"))
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("html");
    assert!(!html.contains(" style="), "no inline style");
    assert_eq!(
        html.matches("<script").count(),
        html.matches("<script src=").count(),
        "no inline script"
    );
    let response = app
        .client
        .post(app.url("/console/session"))
        .header("Origin", &app.address)
        .header("X-Forwarded-Proto", "https")
        .json(&json!({ "token": ADMIN }))
        .send()
        .await
        .expect("sign in");
    let cookie = set_cookie(response.headers());
    for part in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    assert!(
        !cookie.contains("Secure"),
        "an untrusted peer's X-Forwarded-Proto is ignored: {cookie}"
    );
    let behind_proxy = spawn_app_with(|s| {
        s.admin_token = Some(Secret::new(ADMIN));
        s.console.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    let response = behind_proxy
        .client
        .post(behind_proxy.url("/console/session"))
        .header("Origin", &behind_proxy.address)
        .header("X-Forwarded-Proto", "https")
        .json(&json!({ "token": ADMIN }))
        .send()
        .await
        .expect("sign in");
    assert!(set_cookie(response.headers()).contains("; Secure"));
}

#[tokio::test]
async fn sign_in_refuses_wrong_tokens_cross_site_requests_and_guessing() {
    let app = console_app().await;
    let attempt = |token: &str, origin: &str| {
        app.client
            .post(app.url("/console/session"))
            .header("Origin", origin)
            .json(&json!({ "token": token }))
            .send()
    };
    let (status, why) = reason(attempt(ADMIN, "https://evil.example").await.expect("post")).await;
    assert_eq!((status, why.as_str()), (403, "cross_site"));
    for _ in 0..10 {
        let (status, why) = reason(attempt("wrong", &app.address).await.expect("post")).await;
        assert_eq!((status, why.as_str()), (401, "invalid_token"));
    }
    let limited = attempt(ADMIN, &app.address).await.expect("post");
    assert_eq!(limited.status(), 429);
    assert_eq!(
        limited
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("60")
    );
    let disabled = spawn_app_with(|s| s.admin_token = None).await;
    let response = disabled
        .client
        .post(disabled.url("/console/session"))
        .header("Origin", &disabled.address)
        .json(&json!({ "token": ADMIN }))
        .send()
        .await
        .expect("post");
    assert_eq!(reason(response).await, (403, "api_disabled".to_string()));
}

/// Why the browser test cannot run here, if it cannot.
fn browser_available(chromium: &Path, package: &Path) -> Result<(), String> {
    if !chromium.is_file() {
        return Err(format!("{} is missing", chromium.display()));
    }
    let node = std::process::Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        return Err("node is missing".into());
    }
    if !package
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        return Err(format!(
            "{} has no node_modules/playwright-core",
            package.display()
        ));
    }
    Ok(())
}

#[tokio::test]
async fn the_console_works_in_headless_chromium() {
    let test = "the_console_works_in_headless_chromium";
    let chromium =
        PathBuf::from(std::env::var("CHROMIUM_BIN").unwrap_or("/usr/bin/chromium".into()));
    let package = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console");
    if !deps::console(test, browser_available(&chromium, &package)) {
        return;
    }
    let sim = start_sim(&[DEFAULT_KEY], Faults::default()).await;
    let app = spawn_app_with(|s| {
        s.admin_token = Some(Secret::new(ADMIN));
        deliver_to(s, &sim);
    })
    .await;
    let mut command = tokio::process::Command::new("node");
    command
        .arg("console.test.mjs")
        .current_dir(&package)
        .env("GATEWAY_URL", &app.address)
        .env("SIM_URL", sim.base_url())
        .env("ADMIN_TOKEN", ADMIN)
        .env("WRITE_KEY", WRITE_KEY)
        .env("CHROMIUM_BIN", &chromium)
        .kill_on_drop(true);
    if std::env::var("UPDATE_CONSOLE_SCREENSHOTS").is_ok_and(|v| v == "1") {
        let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/console");
        command.env("SCREENSHOT_DIR", shots);
    }
    let output = tokio::time::timeout(Duration::from_secs(180), command.output())
        .await
        .expect("the browser test finishes within 180 s")
        .expect("run node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{stdout}");
    assert!(
        output.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("\nok {"), "{stdout}");
    app.stop().await;
    sim.stop().await;
}
