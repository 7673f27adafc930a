//! The user-facing documentation in `docs/` is checked against the code, so that a setting,
//! an environment variable, an error code, a skip reason or a metric added without being
//! documented fails the build; every shell example of README.md and `docs/` runs against a
//! live gateway, README.md's Getting started step by step against the demo
//! (`docs/examples.rs`); and every command's `--help` carries an example.
//!
//! Settings are discovered from the `Settings` type itself: every section rejects unknown
//! keys, and serde's "unknown field" error lists the fields the section expects. Probing each
//! section (and each field that turns out to be a table, or an array of tables) with an
//! unknown key therefore yields every key path, without a list to keep up to date by hand.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use actix_web::ResponseError;
use refiner_gateway::config::{Settings, ENV_VARS};
use refiner_gateway::ingest::error::IngestError;
use refiner_gateway::refiner::mapping::NotForwardedReason;
use refiner_gateway::segment::{Reject, Skip};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The documents this test owns, which must exist and whose relative links must resolve.
const DOCS: [&str; 8] = [
    "docs/README.md",
    "docs/configuration.md",
    "docs/segment-setup.md",
    "docs/limits-and-errors.md",
    "docs/delivery.md",
    "docs/architecture.md",
    "docs/operations.md",
    "docs/api.md",
];

// ---------------------------------------------------------------------------------------
// Discovering the settings' keys
// ---------------------------------------------------------------------------------------

const PROBE: &str = "zz_docs_probe";

/// One segment of a key path: a field, and whether it is an array of tables.
#[derive(Debug, Clone)]
struct Segment {
    name: String,
    array: bool,
}

/// The TOML that puts the probe key inside the table at `path`.
fn probe_document(path: &[Segment]) -> String {
    let mut text = String::new();
    for end in 1..=path.len() {
        let dotted: Vec<&str> = path[..end].iter().map(|s| s.name.as_str()).collect();
        let dotted = dotted.join(".");
        if path[end - 1].array {
            text.push_str(&format!("[[{dotted}]]\n"));
        } else if end == path.len() {
            text.push_str(&format!("[{dotted}]\n"));
        }
    }
    text.push_str(&format!("{PROBE} = 1\n"));
    text
}

/// The fields serde expects at `path`, when `path` is a struct that rejects unknown fields;
/// `None` when it is something else (a scalar, a list of scalars, an enum).
fn fields_at(path: &[Segment]) -> Option<Vec<String>> {
    let document = probe_document(path);
    let error = match toml::from_str::<Settings>(&document) {
        Ok(_) => {
            panic!("the probe key was accepted at {path:?}: does a section accept unknown keys?")
        }
        Err(e) => e.message().to_string(),
    };
    let marker = format!("unknown field `{PROBE}`");
    let rest = &error[error.find(&marker)? + marker.len()..];
    if rest.contains("there are no fields") {
        return Some(Vec::new());
    }
    let expected = &rest[rest.find("expected")?..];
    let fields: Vec<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    assert!(!fields.is_empty(), "cannot read the fields from: {error}");
    Some(fields)
}

/// Every key path of `Settings`, dotted (`delivery.max_concurrency`, `sources.slug`).
fn setting_keys() -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    walk(&[], &mut keys);
    assert!(keys.len() > 20, "too few settings found: {keys:?}");
    keys
}

fn walk(path: &[Segment], keys: &mut BTreeSet<String>) {
    let fields = fields_at(path).unwrap_or_else(|| panic!("{path:?} is not a section"));
    for field in fields {
        let mut child = path.to_vec();
        child.push(Segment {
            name: field.clone(),
            array: false,
        });
        let dotted: Vec<&str> = child.iter().map(|s| s.name.as_str()).collect();
        keys.insert(dotted.join("."));
        if fields_at(&child).is_some() {
            walk(&child, keys);
            continue;
        }
        let last = child.len() - 1;
        child[last].array = true;
        if fields_at(&child).is_some() {
            walk(&child, keys);
        }
    }
}

/// Keys that are sections (tables or arrays of tables) rather than values.
fn sections(keys: &BTreeSet<String>) -> BTreeSet<String> {
    keys.iter()
        .filter(|key| {
            let prefix = format!("{key}.");
            keys.iter().any(|other| other.starts_with(&prefix))
        })
        .cloned()
        .collect()
}

#[test]
fn the_key_discovery_finds_known_settings() {
    let keys = setting_keys();
    for known in [
        "listen",
        "delivery.max_concurrency",
        "limits.max_event_bytes",
        "mapping.page_mode",
        "sources.slug",
        "sources.write_keys",
    ] {
        assert!(keys.contains(known), "{known} not in {keys:?}");
    }
}

// ---------------------------------------------------------------------------------------
// docs/configuration.md
// ---------------------------------------------------------------------------------------

/// The ```toml block of `doc` whose first line is `# <title>`.
fn toml_block(doc: &str, title: &str) -> String {
    let heading = format!("# {title}");
    let mut blocks = doc.split("```toml\n").skip(1);
    let block = blocks
        .find(|block| block.lines().next().map(str::trim) == Some(heading.as_str()))
        .unwrap_or_else(|| panic!("no ```toml block starting with `{heading}`"));
    block[..block.find("```").expect("unterminated block")].to_string()
}

/// Every dotted key a TOML document sets (array elements merged).
fn keys_in(value: &toml::Value, prefix: &str, out: &mut BTreeSet<String>) {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                out.insert(path.clone());
                keys_in(value, &path, out);
            }
        }
        toml::Value::Array(items) => {
            for item in items.iter().filter(|item| item.is_table()) {
                keys_in(item, prefix, out);
            }
        }
        _ => {}
    }
}

#[test]
fn every_setting_is_documented() {
    let doc = read("docs/configuration.md");
    let keys = setting_keys();
    let sections = sections(&keys);
    let mut missing = Vec::new();
    for key in keys.difference(&sections) {
        // A value is documented in a table row that names it in backticks.
        let named = format!("`{key}`");
        if !doc
            .lines()
            .any(|line| line.starts_with('|') && line.contains(&named))
        {
            missing.push(key.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "settings without a row in docs/configuration.md: {missing:?}"
    );
}

#[test]
fn every_environment_variable_is_documented_with_its_setting() {
    let doc = read("docs/configuration.md");
    let keys = setting_keys();
    for (variable, setting) in ENV_VARS {
        // The setting the variable names exists (`sources[default].x` is `sources.x`).
        let plain = setting.replace("[default]", "");
        assert!(
            keys.contains(&plain),
            "ENV_VARS names `{setting}` for {variable}, which is not a setting"
        );
        let variable = format!("`{variable}`");
        let setting = format!("`{setting}`");
        assert!(
            doc.lines().any(|line| line.starts_with('|')
                && line.contains(&variable)
                && line.contains(&setting)),
            "docs/configuration.md has no table row with both {variable} and {setting}"
        );
    }
}

#[test]
fn the_documented_defaults_are_the_defaults() {
    let doc = read("docs/configuration.md");
    let block = toml_block(&doc, "defaults");
    let parsed: Settings =
        toml::from_str(&block).unwrap_or_else(|e| panic!("the defaults block does not parse: {e}"));
    assert_eq!(
        parsed,
        Settings::default(),
        "the defaults block of docs/configuration.md differs from Settings::default()"
    );
    // It shows every value that has a default; only absent-by-default keys are left out.
    let value: toml::Value = toml::from_str(&block).expect("TOML");
    let mut shown = BTreeSet::new();
    keys_in(&value, "", &mut shown);
    let keys = setting_keys();
    let absent_by_default = |key: &str| {
        key == "admin_token" || key == "metrics_token" || key.split('.').next() == Some("sources")
    };
    let missing: Vec<&String> = keys
        .iter()
        .filter(|key| !absent_by_default(key) && !shown.contains(*key))
        .collect();
    assert!(
        missing.is_empty(),
        "the defaults block of docs/configuration.md lacks {missing:?}"
    );
}

#[test]
fn the_full_example_sets_every_key_and_is_valid() {
    let doc = read("docs/configuration.md");
    let block = toml_block(&doc, "full example");
    let value: toml::Value =
        toml::from_str(&block).unwrap_or_else(|e| panic!("the full example is not TOML: {e}"));
    let mut shown = BTreeSet::new();
    keys_in(&value, "", &mut shown);
    let keys = setting_keys();
    let missing: Vec<&String> = keys.difference(&shown).collect();
    assert!(
        missing.is_empty(),
        "the full example of docs/configuration.md lacks {missing:?}"
    );
    let sources = value
        .get("sources")
        .and_then(toml::Value::as_array)
        .map_or(0, Vec::len);
    assert!(
        sources >= 2,
        "the full example should show several [[sources]]"
    );

    // Loaded as `serve` loads it (unknown keys refused), it passes validation and has the
    // Refiner API keys `serve` needs.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, &block).expect("write");
    let settings = Settings::load_with(Some(Path::new(&path)), |_| None)
        .unwrap_or_else(|e| panic!("the full example is refused: {e}"));
    settings
        .require_refiner_keys()
        .unwrap_or_else(|e| panic!("the full example cannot serve: {e}"));
}

// ---------------------------------------------------------------------------------------
// docs/limits-and-errors.md and docs/delivery.md
// ---------------------------------------------------------------------------------------

fn every_reject() -> Vec<Reject> {
    let all = vec![
        Reject::InvalidJson(String::new()),
        Reject::NotAnObject,
        Reject::InvalidBatch,
        Reject::TooManyEvents { count: 2, limit: 1 },
        Reject::EventTooLarge {
            index: 0,
            size: 2,
            limit: 1,
        },
        Reject::MergedEventTooLarge {
            index: 0,
            size: 2,
            limit: 1,
        },
        Reject::MergedBatchTooLarge { limit: 1 },
        Reject::MessageIdTooLong { index: 0, limit: 1 },
        Reject::InvalidMessageId { index: 0 },
    ];
    // Fails to compile when a variant is added: add it above, and document its code.
    for reject in &all {
        match reject {
            Reject::InvalidJson(_)
            | Reject::NotAnObject
            | Reject::InvalidBatch
            | Reject::TooManyEvents { .. }
            | Reject::EventTooLarge { .. }
            | Reject::MergedEventTooLarge { .. }
            | Reject::MergedBatchTooLarge { .. }
            | Reject::MessageIdTooLong { .. }
            | Reject::InvalidMessageId { .. } => {}
        }
    }
    all
}

/// The `code: "..."` and `"code": "..."` literals of the sources that build error answers:
/// the codes of `IngestError::Unauthorized` and of the operational routes.
fn code_literals() -> BTreeSet<String> {
    let mut codes = BTreeSet::new();
    for file in [
        "src/ingest/mod.rs",
        "src/ingest/auth.rs",
        "src/ingest/error.rs",
        "src/ingest/webhook.rs",
        "src/api/mod.rs",
    ] {
        let text = read(file);
        for marker in ["code: \"", "\"code\": \""] {
            for piece in text.split(marker).skip(1) {
                if let Some(end) = piece.find('"') {
                    codes.insert(piece[..end].to_string());
                }
            }
        }
    }
    codes
}

fn every_ingest_error() -> Vec<IngestError> {
    let mut all: Vec<IngestError> = every_reject().into_iter().map(IngestError::from).collect();
    all.extend([
        IngestError::PayloadTooLarge { limit: 1 },
        IngestError::InvalidGzip,
        IngestError::UnsupportedEncoding("br".into()),
        IngestError::UnreadableBody(String::new()),
        IngestError::Overloaded,
        IngestError::Unavailable(String::new()),
        IngestError::BodyBudgetExhausted,
        IngestError::BodyTimeout,
        IngestError::NotFound,
    ]);
    for code in [
        "unauthorized",
        "write_key_mismatch",
        "invalid_signature",
        "missing_signature",
        "array_not_allowed",
        "signature_reused",
    ] {
        all.push(IngestError::Unauthorized { code, message: "" });
    }
    // Fails to compile when a variant is added: add it above, and document its code.
    for error in &all {
        match error {
            IngestError::Rejected(_)
            | IngestError::PayloadTooLarge { .. }
            | IngestError::InvalidGzip
            | IngestError::UnsupportedEncoding(_)
            | IngestError::UnreadableBody(_)
            | IngestError::Unauthorized { .. }
            | IngestError::Overloaded
            | IngestError::Unavailable(_)
            | IngestError::BodyBudgetExhausted
            | IngestError::BodyTimeout
            | IngestError::NotFound => {}
        }
    }
    all
}

#[test]
fn every_error_code_is_documented_with_its_status() {
    let doc = read("docs/limits-and-errors.md");
    let rows: Vec<&str> = doc.lines().filter(|line| line.starts_with('|')).collect();
    let errors = every_ingest_error();
    for error in &errors {
        let code = format!("`{}`", error.code());
        let status = error.status_code().as_u16().to_string();
        assert!(
            rows.iter()
                .any(|row| row.contains(&code) && row.contains(&status)),
            "docs/limits-and-errors.md has no table row with {code} and status {status}"
        );
    }
    // Codes written as literals in the sources (401 codes, `not_ready`) are documented too,
    // including any added later without a matching variant above.
    let constructed: BTreeSet<&str> = errors.iter().map(IngestError::code).collect();
    for code in code_literals() {
        let named = format!("`{code}`");
        assert!(
            rows.iter().any(|row| row.contains(&named)),
            "error code {named} (found in the sources) is not in docs/limits-and-errors.md"
        );
        if !constructed.contains(code.as_str()) && code != "not_ready" {
            panic!(
                "error code `{code}` is not constructed by this test; add it to every_ingest_error"
            );
        }
    }
}

#[test]
fn every_skip_reason_is_documented() {
    let doc = read("docs/limits-and-errors.md");
    for skip in Skip::ALL {
        let reason = format!("`{}`", skip.as_str());
        assert!(
            doc.lines()
                .any(|line| line.starts_with('|') && line.contains(&reason)),
            "skip reason {reason} is not in docs/limits-and-errors.md"
        );
    }
    assert!(doc.contains("gateway_ingest_events_skipped_total"));
}

#[test]
fn every_not_forwarded_reason_is_documented() {
    let doc = read("docs/delivery.md");
    let reasons = NotForwardedReason::ALL
        .iter()
        .map(|reason| reason.as_str())
        .chain(["ping_throttled"]);
    for reason in reasons {
        let named = format!("`{reason}`");
        assert!(
            doc.lines()
                .any(|line| line.starts_with('|') && line.contains(&named)),
            "not-forwarded reason {named} is not in docs/delivery.md"
        );
    }
    assert!(read("src/dispatch/chain.rs").contains("\"ping_throttled\""));
}

#[test]
fn every_metric_is_documented() {
    let telemetry = read("src/telemetry/mod.rs");
    let metrics: BTreeSet<&str> = telemetry
        .split('"')
        .filter(|piece| {
            piece.starts_with("gateway_")
                && piece
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
        .collect();
    assert!(metrics.len() > 10, "too few metrics found: {metrics:?}");
    let doc = read("docs/architecture.md");
    for metric in metrics {
        let named = format!("`{metric}`");
        assert!(
            doc.lines()
                .any(|line| line.starts_with('|') && line.contains(&named)),
            "metric {named} is not in the metrics table of docs/architecture.md"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Links
// ---------------------------------------------------------------------------------------

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces as dashes.
fn anchor(heading: &str) -> String {
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

fn anchors(doc: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut out = BTreeSet::new();
    for line in doc.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            out.insert(anchor(line.trim_start_matches('#')));
        }
    }
    out
}

#[test]
fn relative_links_resolve() {
    for file in DOCS {
        let doc = read(file);
        for piece in doc.split("](").skip(1) {
            let Some(end) = piece.find(')') else { continue };
            let target = &piece[..end];
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let (path, fragment) = match target.split_once('#') {
                Some((path, fragment)) => (path, Some(fragment)),
                None => (target, None),
            };
            let linked = if path.is_empty() {
                file.to_string()
            } else {
                format!("docs/{path}")
            };
            assert!(
                root().join(&linked).is_file(),
                "{file} links to {target}, which does not exist"
            );
            if let Some(fragment) = fragment {
                assert!(
                    anchors(&read(&linked)).contains(fragment),
                    "{file} links to {target}, but {linked} has no heading #{fragment}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// docs/api.md
// ---------------------------------------------------------------------------------------

#[test]
fn every_management_error_reason_is_documented_with_its_status() {
    use refiner_gateway::api::management::error::ApiError;
    let all = [
        ApiError::Disabled,
        ApiError::MissingToken,
        ApiError::InvalidToken,
        ApiError::parameter("page", ""),
        ApiError::UnknownSource(String::new()),
        ApiError::NotFound(String::new()),
        ApiError::MethodNotAllowed("GET"),
        ApiError::BodyTooLarge(1),
        ApiError::Overloaded,
        ApiError::Unavailable(String::new()),
        ApiError::NotSupported(String::new()),
        ApiError::InvalidSession,
        ApiError::CrossSite(""),
        ApiError::TooManyAttempts,
    ];
    // Fails to compile when a variant is added: add it above, and document its reason.
    for error in &all {
        match error {
            ApiError::Disabled
            | ApiError::MissingToken
            | ApiError::InvalidToken
            | ApiError::InvalidParameter { .. }
            | ApiError::UnknownSource(_)
            | ApiError::NotFound(_)
            | ApiError::MethodNotAllowed(_)
            | ApiError::BodyTooLarge(_)
            | ApiError::Overloaded
            | ApiError::Unavailable(_)
            | ApiError::NotSupported(_)
            | ApiError::InvalidSession
            | ApiError::CrossSite(_)
            | ApiError::TooManyAttempts => {}
        }
    }
    let reasons: BTreeSet<&str> = all.iter().map(ApiError::reason).collect();
    assert_eq!(
        reasons,
        ApiError::REASONS.into_iter().collect::<BTreeSet<_>>()
    );
    let doc = read("docs/api.md");
    let openapi = read("docs/openapi.yaml");
    for error in &all {
        let reason = format!("`{}`", error.reason());
        let status = error.status().as_u16().to_string();
        assert!(
            doc.lines().any(|line| line.starts_with('|')
                && line.contains(&reason)
                && line.contains(&status)),
            "docs/api.md has no table row with {reason} and status {status}"
        );
        assert!(
            openapi.contains(error.reason()),
            "docs/openapi.yaml does not list the reason {reason}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Shell examples (tests/docs/examples.rs) and --help
// ---------------------------------------------------------------------------------------

#[path = "docs/examples.rs"]
mod examples;

use examples::{check, documents, report, Environment, Example, GETTING_STARTED};

fn all_examples() -> Vec<Example> {
    documents()
        .iter()
        .flat_map(|file| examples::examples(file))
        .collect()
}

#[test]
fn every_shell_example_in_docs_runs_against_a_gateway() {
    let all = all_examples();
    let runnable: Vec<&Example> = all
        .iter()
        .filter(|e| e.not_run.is_none() && e.file != "README.md")
        .collect();
    assert!(
        runnable.len() >= 10,
        "only {} runnable examples in docs/: is the extraction broken?",
        runnable.len()
    );
    let mut failures = Vec::new();
    for example in &runnable {
        let environment = Environment::docs();
        let ran = environment.run(example);
        if let Err(failure) = check(example, &ran, &environment) {
            failures.push(failure);
        }
    }
    let not_run = all.iter().filter(|e| e.not_run.is_some()).count();
    let readme = all
        .iter()
        .filter(|e| e.not_run.is_none() && e.file == "README.md")
        .count();
    let mut lines = vec![format!(
        "shell examples: {} run here, {readme} of README.md run by the Getting started test, {not_run} not run",
        runnable.len()
    )];
    lines.extend(examples::not_run_report(&all));
    report(&lines);
    assert!(
        failures.is_empty(),
        "{} of {} examples failed:\n\n{}",
        failures.len(),
        runnable.len(),
        failures.join("\n\n")
    );
}

#[test]
fn the_getting_started_path_works_step_by_step() {
    let readme = examples::examples("README.md");
    let runnable: Vec<&Example> = readme.iter().filter(|e| e.not_run.is_none()).collect();
    for (needle, _) in GETTING_STARTED {
        assert!(
            runnable.iter().any(|e| e.code.contains(needle)),
            "README.md's Getting started has no runnable step with `{needle}`"
        );
    }
    let environment = Environment::demo();
    for example in &runnable {
        // A reader takes a moment between steps; delivery catches up meanwhile.
        environment.settle("default");
        let ran = environment.run(example);
        if let Err(failure) = check(example, &ran, &environment) {
            panic!("{failure}");
        }
        for (needle, shown) in GETTING_STARTED {
            if example.code.contains(needle) {
                assert!(
                    ran.stdout.contains(shown),
                    "{}: the step with `{needle}` should show `{shown}`:\n{}\n{}",
                    example.place(),
                    ran.stdout,
                    environment.logs()
                );
            }
        }
    }
    // Ctrl-C: a graceful stop, said as such, exit 0.
    let stopped = environment.interrupt_demo();
    assert!(stopped.success, "the demo exited {}", stopped.status);
    let printed = format!("{}{}", stopped.stdout, stopped.stderr);
    assert!(!printed.contains("forced"), "{printed}");
    assert!(printed.contains("gateway stopped"), "{printed}");
    // The banner comes after start-up, not interleaved with the servers' lines.
    assert!(!printed.contains("starting service"), "{printed}");
    assert!(
        printed.contains("keeps what it received in memory"),
        "{printed}"
    );
}

#[test]
fn the_example_extraction_reads_annotations_and_expected_answers() {
    let all = all_examples();
    let readme: Vec<&Example> = all.iter().filter(|e| e.file == "README.md").collect();
    assert!(readme.iter().any(|e| e.not_run.is_some()));
    assert!(readme
        .iter()
        .any(|e| e.code.contains("/v1/track") && e.not_run.is_none()));
    // Indented blocks (inside a list) lose their indentation.
    assert!(readme
        .iter()
        .any(|e| e.code.starts_with("curl -u demo-write-key:")));
    let answers = examples::expected_answers("curl x\n# {\"success\":true}\n# a comment\n");
    assert_eq!(answers, vec![serde_json::json!({"success": true})]);
    assert!(examples::output_has(
        "noise\n{\"success\": true}\n",
        &answers[0]
    ));
    assert!(!examples::output_has("{\"success\":false}\n", &answers[0]));
}

/// `refiner-gateway <command> --help` for every command and dead-letters subcommand.
#[test]
fn every_command_help_has_an_example() {
    let binary = env!("CARGO_BIN_EXE_refiner-gateway");
    let help = |args: &[&str]| {
        let output = std::process::Command::new(binary)
            .args(args)
            .arg("--help")
            .output()
            .expect("run --help");
        assert!(output.status.success(), "{args:?} --help failed");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let commands = |text: &str| -> Vec<String> {
        text.split("Commands:\n")
            .nth(1)
            .unwrap_or("")
            .lines()
            .take_while(|line| line.starts_with("  "))
            .filter_map(|line| line.split_whitespace().next())
            .filter(|name| *name != "help")
            .map(str::to_string)
            .collect()
    };
    let top = help(&[]);
    assert!(top.contains("Examples:"), "{top}");
    let names = commands(&top);
    assert!(names.len() >= 6, "{names:?}");
    for name in &names {
        let text = help(&[name]);
        assert!(
            text.contains("Example"),
            "{name} --help has no example:\n{text}"
        );
        for sub in commands(&text) {
            let text = help(&[name, &sub]);
            assert!(
                text.contains("Example"),
                "{name} {sub} --help has no example:\n{text}"
            );
        }
    }
    let serve = help(&["serve"]);
    for (variable, _) in ENV_VARS {
        assert!(serve.contains(variable), "serve --help lacks {variable}");
    }
    let list = help(&["dead-letters", "list"]);
    for flag in ["--query ", "--query-fields ", "--sort "] {
        assert!(list.contains(flag), "dead-letters list --help lacks {flag}");
    }
}
