//! docs/openapi.yaml and the routes the gateway registers agree, both ways.
//!
//! The registered paths come from the actix application itself: the resource map of an app
//! built with [`refiner_gateway::startup::routes`] (the function the server uses), read
//! from its `Debug` form and each confirmed by the map's own matcher. The methods come
//! from the live gateway: a method is served on a path unless it answers 405 (the
//! management API) or the application's catch-all 404 `{"code":"not_found"}`.

use std::collections::{BTreeMap, BTreeSet};

use actix_web::{test, web, App, HttpRequest, HttpResponse};
use refiner_gateway::config::Secret;
use refiner_gateway::segment::EventType;
use reqwest::Method;
use serde_json::Value;

use crate::helpers::{spawn_app_with, TestApp};

const ADMIN: &str = "openapi-admin-token";
const METRICS: &str = "openapi-metrics-token";
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// The document's operations: path → methods.
fn documented() -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml"))
        .expect("docs/openapi.yaml");
    let document: Value = serde_norway::from_str(&text).expect("the OpenAPI document parses");
    let paths = document["paths"].as_object().expect("paths");
    paths
        .iter()
        .map(|(path, item)| {
            let item = item.as_object().expect("path item");
            let methods = item
                .keys()
                .filter(|key| METHODS.contains(&key.as_str()) || *key == "head")
                .cloned()
                .collect();
            (path.clone(), methods)
        })
        .collect()
}

/// A request path for a path template: each `{parameter}` filled with something that
/// exists in the test app.
fn concrete(template: &str) -> String {
    template
        .replace("{source}", "default")
        .replace("{id}", "1")
        .replace("{kind}", "track")
}

/// The full patterns of the leaves of a resource map's `{:#?}` form: each `ResourceMap`
/// node's own pattern, prefixed by its ancestors' (scopes).
fn leaf_patterns(debug: &str) -> Vec<String> {
    let lines: Vec<&str> = debug.lines().collect();
    // (indentation, pattern) of the nodes enclosing the current line.
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut leaves = Vec::new();
    let mut current: Option<usize> = None;
    for (n, line) in lines.iter().enumerate() {
        let indent = line.len() - line.trim_start().len();
        let text = line.trim();
        if text.ends_with("ResourceMap {") {
            while stack.last().is_some_and(|(i, _)| *i >= indent) {
                stack.pop();
            }
            current = Some(indent);
        } else if text.starts_with("patterns: Single(") {
            let pattern = lines
                .get(n + 1)
                .map(|next| next.trim().trim_end_matches(',').trim_matches('"'))
                .expect("a pattern");
            // The node's own pattern (the first `patterns` after its `ResourceMap {`).
            if let Some(indent) = current.take() {
                stack.push((indent, pattern.to_string()));
            }
        } else if text.starts_with("patterns: List(") {
            panic!("a resource with several patterns: extend this reader");
        } else if text == "nodes: None," {
            let full: String = stack.iter().map(|(_, p)| p.as_str()).collect();
            leaves.push(full);
        }
    }
    leaves
}

/// The registered route patterns, each confirmed by the resource map's matcher, and a
/// request of the app whose resource map matches paths as the server does.
async fn registered() -> (BTreeSet<String>, HttpRequest) {
    let app = test::init_service(
        App::new()
            .configure(refiner_gateway::startup::routes)
            .default_service(web::to(HttpResponse::NoContent)),
    )
    .await;
    let request = test::TestRequest::get()
        .uri("/nothing-is-registered-here/")
        .to_request();
    let response = test::call_service(&app, request).await;
    let request = response.request().clone();
    let map = request.resource_map();
    let patterns: BTreeSet<String> = leaf_patterns(&format!("{map:#?}")).into_iter().collect();
    for pattern in &patterns {
        assert_eq!(
            map.match_pattern(&concrete(pattern)).as_deref(),
            Some(pattern.as_str()),
            "the resource map's reader found {pattern}, which its matcher does not confirm"
        );
    }
    (patterns, request)
}

/// The methods the live gateway serves on `path`.
async fn served_methods(app: &TestApp, path: &str) -> BTreeSet<String> {
    let mut served = BTreeSet::new();
    for method in METHODS {
        let mut request = app.client.request(
            Method::from_bytes(method.to_uppercase().as_bytes()).expect("method"),
            app.url(path),
        );
        if path.starts_with("/api") {
            request = request.bearer_auth(ADMIN);
        } else if path == "/metrics" {
            request = request.bearer_auth(METRICS);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        // Only a 404's body is read: a served `GET /api/live` is an endless stream.
        let catch_all = status == 404 && {
            let body: Value = response.json().await.unwrap_or(Value::Null);
            body["code"] == "not_found"
        };
        if status != 405 && !catch_all {
            served.insert(method.to_string());
        }
    }
    served
}

#[tokio::test]
#[ignore = "slow: run by .ci/run (cargo test --tests -- --ignored)"]
async fn the_openapi_document_and_the_registered_routes_agree() {
    let documented = documented();
    let (registered, router) = registered().await;
    assert!(
        registered.contains("/v1/{kind}") && registered.contains("/api"),
        "the resource map's reader found too little: {registered:?}"
    );
    let app = spawn_app_with(|settings| {
        settings.admin_token = Some(Secret::new(ADMIN));
        settings.metrics_token = Some(Secret::new(METRICS));
    })
    .await;

    // Every documented path is registered, with exactly the documented methods served.
    let mut covered: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, methods) in &documented {
        let served = served_methods(&app, &concrete(path)).await;
        assert_eq!(
            &served, methods,
            "{path}: the gateway serves {served:?}, docs/openapi.yaml documents {methods:?}"
        );
        let pattern = router
            .resource_map()
            .match_pattern(&concrete(path))
            .unwrap_or_else(|| panic!("{path} is documented but no registered route serves it"));
        covered
            .entry(pattern)
            .or_default()
            .extend(methods.iter().cloned());
    }

    // Every event type `/v1/{kind}` takes is documented under each of its names (the spec
    // name and analytics.js' one letter).
    for kind in EventType::ALL {
        let name = kind.as_str();
        for alias in [name, &name[..1]] {
            if EventType::from_path(alias) == Some(kind) {
                let path = format!("/v1/{alias}");
                assert!(
                    documented.get(&path).is_some_and(|m| m.contains("post")),
                    "POST {path} is served but not in docs/openapi.yaml"
                );
            }
        }
    }

    // Every registered route is documented, with every method it serves.
    for pattern in &registered {
        if pattern.starts_with("/console") {
            // The console's pages and session routes are described under
            // `x-console-session` (docs/console.md), not as API operations.
            assert!(
                document_text().contains("x-console-session"),
                "docs/openapi.yaml lost its console section"
            );
            continue;
        }
        let methods = covered
            .get(pattern)
            .unwrap_or_else(|| panic!("{pattern} is registered but not in docs/openapi.yaml"));
        let served = served_methods(&app, &concrete(pattern)).await;
        assert!(
            served.is_subset(methods),
            "{pattern} serves {served:?}, docs/openapi.yaml documents {methods:?}"
        );
    }
    app.stop().await;
}

/// The document as text.
fn document_text() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml"))
        .expect("read docs/openapi.yaml")
}
