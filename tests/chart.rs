//! The packaging (Helm chart, Grafana dashboard, Dockerfile) is checked against the code, so
//! that a renamed metric, a new setting or a new version cannot leave them behind. Rendering
//! and validating the chart needs Helm and Kubernetes schemas: `.ci/chart-check` does that.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde_json::Value;

const CHART: &str = "helm/refiner-gateway";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The metric names the gateway exports: the `gateway_*` literals of `src/telemetry/mod.rs`,
/// the process collector's, and Prometheus' own `up`.
fn exported_metrics() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = read("src/telemetry/mod.rs")
        .split('"')
        .filter(|piece| {
            piece.starts_with("gateway_")
                && piece
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .map(str::to_string)
        .collect();
    for process in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "process_threads",
        "up",
    ] {
        names.insert(process.to_string());
    }
    names
}

/// The metric names used in PromQL text: identifiers starting with `gateway_` or
/// `process_`, and `up{`.
fn metrics_in(promql: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let bytes = promql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts_word
            && (promql[i..].starts_with("gateway_") || promql[i..].starts_with("process_"))
        {
            let end = promql[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(promql.len(), |n| i + n);
            found.insert(promql[i..end].to_string());
            i = end;
        } else {
            i += 1;
        }
    }
    if promql.contains("up{") {
        found.insert("up".to_string());
    }
    found
}

/// A histogram's series carry `_bucket`, `_sum` and `_count` after the family's name.
fn family(series: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| series.strip_suffix(suffix))
        .unwrap_or(series)
}

fn assert_exported(used: &BTreeSet<String>, exported: &BTreeSet<String>, what: &str) {
    let unknown: Vec<&String> = used
        .iter()
        .filter(|name| !exported.contains(family(name)) && !exported.contains(name.as_str()))
        .collect();
    assert!(
        unknown.is_empty(),
        "{what} uses metrics the gateway does not export: {unknown:?}"
    );
}

#[test]
fn the_dashboard_queries_exported_metrics_only() {
    let text = read(&format!("{CHART}/dashboards/refiner-gateway.json"));
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "refiner-gateway");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(exprs.len() > 20, "too few queries: {}", exprs.len());
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metrics_in(e)).collect();
    assert_exported(&used, &exported_metrics(), "the dashboard");
    // The gauges an operator looks at first are all on it.
    for needed in [
        "gateway_spool_depth_events",
        "gateway_spool_oldest_event_age_seconds",
        "gateway_spool_dead_letters_events",
        "gateway_dispatch_circuit_open",
        "gateway_dispatch_in_flight_calls",
        "gateway_refiner_calls_total",
        "gateway_ingest_events_total",
        "gateway_dispatch_delivery_latency_seconds_bucket",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard does not show {needed}"
        );
    }
    // Every panel has a unique id and queries through the data source variable.
    let panels = dashboard["panels"].as_array().expect("panels");
    let ids: BTreeSet<i64> = panels.iter().filter_map(|p| p["id"].as_i64()).collect();
    assert_eq!(ids.len(), panels.len(), "panel ids are unique");
}

fn collect_exprs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                if key == "expr" {
                    if let Some(expr) = value.as_str() {
                        out.push(expr.to_string());
                    }
                } else {
                    collect_exprs(value, out);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_exprs(item, out)),
        _ => {}
    }
}

#[test]
fn the_alerts_query_exported_metrics_and_cover_the_runbook() {
    let rules = read(&format!("{CHART}/templates/prometheusrule.yaml"));
    let used = metrics_in(&rules);
    assert_exported(&used, &exported_metrics(), "the PrometheusRule");
    for metric in [
        "gateway_spool_oldest_event_age_seconds",
        "gateway_dispatch_events_total",
        "gateway_refiner_calls_total",
        "gateway_dispatch_circuit_open",
        "gateway_ready",
    ] {
        assert!(used.contains(metric), "no alert on {metric}");
    }
    // Each alert is explained in docs/operations.md, and the runbook anchors exist.
    let operations = read("docs/operations.md");
    for line in rules.lines() {
        if let Some(alert) = line.trim().strip_prefix("- alert: ") {
            assert!(
                operations.contains(&format!("`{alert}`")),
                "docs/operations.md does not explain the alert {alert}"
            );
        }
        if let Some(at) = line.find("runbook_url: {{ . }}#") {
            let anchor = &line[at + "runbook_url: {{ . }}#".len()..];
            let heading_exists = operations.lines().any(|l| {
                l.starts_with('#') && anchor_of(l.trim_start_matches('#')) == anchor.trim()
            });
            assert!(
                heading_exists,
                "docs/operations.md has no heading #{anchor}"
            );
        }
    }
}

/// GitHub's anchor for a heading.
fn anchor_of(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Every dotted key of a TOML table (sections themselves excluded).
fn toml_keys(value: &toml::Value, prefix: &str, out: &mut BTreeSet<String>) {
    if let toml::Value::Table(table) = value {
        for (key, value) in table {
            let path = if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            if value.is_table() {
                toml_keys(value, &path, out);
            } else {
                out.insert(path);
            }
        }
    }
}

/// Every dotted key the schema's `config` object admits.
fn schema_keys(value: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    let Some(properties) = value["properties"].as_object() else {
        return;
    };
    for (key, value) in properties {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        if value["type"] == "object" {
            assert_eq!(
                value["additionalProperties"],
                Value::Bool(false),
                "config.{path} must refuse unknown keys"
            );
            schema_keys(value, &path, out);
        } else {
            out.insert(path);
        }
    }
}

#[test]
fn the_values_schema_admits_exactly_the_gateways_settings() {
    let schema: Value =
        serde_json::from_str(&read(&format!("{CHART}/values.schema.json"))).expect("JSON");
    assert_eq!(schema["additionalProperties"], Value::Bool(false));
    let mut admitted = BTreeSet::new();
    schema_keys(&schema["properties"]["config"], "", &mut admitted);

    // docs/configuration.md's defaults block shows every setting that has a default (the
    // docs test checks it against the code); the chart sets `listen` and `data_dir` itself
    // and keeps secrets (the admin token, the sources' keys) out of the ConfigMap.
    let doc = read("docs/configuration.md");
    let block = doc
        .split("```toml\n")
        .find(|block| block.lines().next().map(str::trim) == Some("# defaults"))
        .expect("a defaults block");
    let block = &block[..block.find("```").expect("end of block")];
    let defaults: toml::Value = toml::from_str(block).expect("TOML");
    let mut settings = BTreeSet::new();
    toml_keys(&defaults, "", &mut settings);
    settings.remove("listen");
    settings.remove("data_dir");
    assert_eq!(
        admitted, settings,
        "values.schema.json's config differs from the settings"
    );
}

fn yaml_scalar(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("no {key}"))
}

#[test]
fn the_chart_and_the_image_match_the_crate() {
    let chart = read(&format!("{CHART}/Chart.yaml"));
    assert_eq!(
        yaml_scalar(&chart, "appVersion"),
        env!("CARGO_PKG_VERSION"),
        "Chart.yaml's appVersion is the crate's version"
    );
    for values in ["default", "with-ingress-and-monitoring", "existing-secret"] {
        let path = root().join(format!("{CHART}/ci/{values}-values.yaml"));
        assert!(path.is_file(), "{} is missing", path.display());
    }

    let dockerfile = read("Dockerfile");
    assert!(dockerfile.contains("cargo build --release --locked"));
    assert!(dockerfile.contains("USER 65532:65532"), "non-root user");
    assert!(dockerfile.contains("VOLUME [\"/var/lib/refiner-gateway\"]"));
    assert!(dockerfile.contains("GATEWAY_DATA_DIR=/var/lib/refiner-gateway"));
    assert!(
        dockerfile.contains("CMD [\"/usr/local/bin/refiner-gateway\", \"healthcheck\"]"),
        "the health check uses the binary's own probe"
    );
    // Everything Cargo.toml needs to build gets into the build context.
    let ignore = read(".dockerignore");
    for needed in ["!Cargo.toml", "!Cargo.lock", "!src/", "!benches/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == needed),
            ".dockerignore excludes {needed}"
        );
    }
    let manifest = read("Cargo.toml");
    for line in manifest.lines().filter(|l| l.starts_with("path = ")) {
        let path = line["path = ".len()..].trim().trim_matches('"');
        assert!(
            path.starts_with("src/") || path.starts_with("benches/"),
            "{path} is outside the Docker build context"
        );
    }
    // The chart's security context matches the image's user.
    let values = read(&format!("{CHART}/values.yaml"));
    assert!(values.contains("runAsUser: 65532"));
    assert!(values.contains("readOnlyRootFilesystem: true"));
}
