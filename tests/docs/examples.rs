//! Every `sh` example of README.md, `docs/` and the Helm chart's README runs against a live
//! gateway, so that a command, a flag, a route or an answer the documentation shows cannot
//! drift from the code.
//!
//! - A fenced block opened with exactly ```` ```sh ```` is an example. Other shell-looking
//!   fences (`bash`, `shell`, `console`, `zsh`) are refused, so none escapes the check.
//! - `<!-- not-run: why -->` on the line above a block exempts it (a production `serve`,
//!   Docker, Kubernetes, a long build); the exemptions are counted and listed on stderr.
//!   `docs/benchmarks.md` holds `cargo bench` commands only, run by the benchmark harness:
//!   its blocks count as not run without a comment ([`NOT_RUN_FILES`]).
//! - A block runs in `bash` with `set -euo pipefail`; `curl` fails on an HTTP error status
//!   (`--fail-with-body`) and ends its output with a newline. A comment line holding a
//!   JSON value (`# {"success":true}`) is an expected answer: some line of the block's
//!   output must be that JSON value.
//! - README.md's blocks run in order against one `refiner-gateway demo` (the Getting
//!   started path, step by step, as a reader would, with delivery let to catch up between
//!   steps); [`GETTING_STARTED`] names what each step must show. Every other block runs
//!   against a fresh `refiner-gateway serve` whose configuration has what the
//!   documentation's examples name (the sources `default`, `website` and `segment-prod`,
//!   their keys, the admin token `change-me-admin-token`), a Refiner simulator that refuses
//!   its first three calls, and so three dead letters of `website` (ids 1 to 3, event
//!   `Order Completed`), and a `batch.json` in the working directory.
//! - Addresses and paths are rewritten to the test's ([`rewrites`]): `127.0.0.1:8080`,
//!   `https://gateway.example.com` and `127.0.0.1:8090` to free loopback ports,
//!   `/var/lib/refiner-gateway` and `/backup` to temporary directories.
//!
//! The binaries are the ones Cargo built for this test, or those in `$DOCS_BIN_DIR` (CI
//! points it at what `cargo install --locked --path .` installed on a fresh clone).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::root;

/// Files whose blocks are not run, and why (files this test does not annotate).
pub const NOT_RUN_FILES: [(&str, &str); 1] = [(
    "docs/benchmarks.md",
    "cargo bench commands, run by the benchmark harness",
)];

/// The Getting started steps of README.md: a text the step's block contains, and a text
/// its output must contain.
pub const GETTING_STARTED: [(&str, &str); 4] = [
    ("/v1/track", r#"{"success":true}"#),
    ("/_sim/state", "Signed Up"),
    ("/api/profile/default", r#""mtu_count":1"#),
    ("dead-letters list", "(0 dead letters)"),
];

const ADMIN_TOKEN: &str = "change-me-admin-token";
const SIM_KEY: &str = "docs-refiner-key";

/// One fenced `sh` block.
#[derive(Debug, Clone)]
pub struct Example {
    pub file: String,
    /// 1-based line of the opening fence.
    pub line: usize,
    pub code: String,
    pub not_run: Option<String>,
}

impl Example {
    pub fn place(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

/// The documents whose examples run: README.md, docs/*.md, the chart's README.
pub fn documents() -> Vec<String> {
    let mut files = vec!["README.md".to_string()];
    let mut docs: Vec<String> = fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    docs.sort();
    files.extend(docs);
    files.push("helm/refiner-gateway/README.md".into());
    files
}

/// The `sh` blocks of `file` (relative to the repository).
pub fn examples(file: &str) -> Vec<Example> {
    let text = fs::read_to_string(root().join(file)).expect("read document");
    let lines: Vec<&str> = text.lines().collect();
    let file_reason = NOT_RUN_FILES
        .iter()
        .find(|(name, _)| *name == file)
        .map(|(_, why)| why.to_string());
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let fence = lines[i].trim_start();
        let indent = lines[i].len() - fence.len();
        if !fence.starts_with("```") {
            i += 1;
            continue;
        }
        let info = fence.trim_start_matches('`').trim();
        assert!(
            !["bash", "shell", "console", "zsh", "shell-session"].contains(&info),
            "{file}:{}: use ```sh for shell examples (```{info} would not be run)",
            i + 1
        );
        let start = i;
        let mut code = Vec::new();
        i += 1;
        while i < lines.len() && !lines[i].trim_start().starts_with("```") {
            let line = lines[i];
            code.push(
                line.get(indent.min(line.len() - line.trim_start().len())..)
                    .unwrap_or(""),
            );
            i += 1;
        }
        assert!(
            i < lines.len(),
            "{file}:{}: unterminated code block",
            start + 1
        );
        i += 1;
        if info != "sh" {
            continue;
        }
        let above = lines[..start]
            .iter()
            .rev()
            .map(|line| line.trim())
            .find(|line| !line.is_empty())
            .unwrap_or("");
        let annotated = above
            .strip_prefix("<!-- not-run:")
            .and_then(|rest| rest.strip_suffix("-->"))
            .map(|why| why.trim().to_string());
        if let Some(why) = &annotated {
            assert!(
                !why.is_empty(),
                "{file}:{}: not-run without a reason",
                start + 1
            );
        }
        found.push(Example {
            file: file.to_string(),
            line: start + 1,
            code: code.join("\n"),
            not_run: annotated.or_else(|| file_reason.clone()),
        });
    }
    found
}

/// The expected answers a block states: its comment lines that hold a JSON value.
pub fn expected_answers(code: &str) -> Vec<Value> {
    code.lines()
        .filter_map(|line| line.trim().strip_prefix('#'))
        .map(str::trim)
        .filter(|comment| comment.starts_with('{') || comment.starts_with('['))
        .map(|comment| {
            serde_json::from_str(comment)
                .unwrap_or_else(|e| panic!("the expected answer `{comment}` is not JSON: {e}"))
        })
        .collect()
}

/// Whether some line of `output` is the JSON value `expected`.
pub fn output_has(output: &str, expected: &Value) -> bool {
    output
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line.trim()).ok())
        .any(|value| &value == expected)
}

// ---------------------------------------------------------------------------------------
// The environment
// ---------------------------------------------------------------------------------------

/// Two distinct free loopback ports (both held while the second is picked).
fn free_ports() -> (u16, u16) {
    let bind = || TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    let (a, b) = (bind(), bind());
    let port = |l: &TcpListener| l.local_addr().expect("local address").port();
    (port(&a), port(&b))
}

/// Where the binaries are: `$DOCS_BIN_DIR`, else Cargo's build of this test.
pub fn bin_dir() -> PathBuf {
    match std::env::var_os("DOCS_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_BIN_EXE_refiner-gateway"))
            .parent()
            .expect("the binary's directory")
            .to_path_buf(),
    }
}

/// The output of a finished command: exit status, stdout and stderr.
pub struct Ran {
    pub success: bool,
    pub status: String,
    pub stdout: String,
    pub stderr: String,
}

/// A gateway (and its simulator) for examples to run against; killed when dropped.
pub struct Environment {
    pub dir: tempfile::TempDir,
    pub port: u16,
    children: Vec<Child>,
    rewrites: Vec<(String, String)>,
    /// The token the management API takes (read from the demo's data directory for it).
    pub admin_token: String,
    /// Whether examples get the token as `GATEWAY_ADMIN_TOKEN` and `T` (the
    /// documentation's examples assume an operator who has it); the Getting started
    /// reads it from where the demo keeps it.
    token_in_env: bool,
}

impl Drop for Environment {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    Stdio::from(fs::File::create(dir.join(name)).expect("log file"))
}

/// A command with the environment variables of the gateway's settings removed, so the
/// caller's shell cannot change what the examples see.
fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    for (variable, _) in refiner_gateway::config::ENV_VARS {
        command.env_remove(variable);
    }
    command
        .env_remove("GATEWAY_URL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null());
    command
}

/// Polls `check` every 50 ms until it is true, or fails with `what` after `limit`.
fn wait_for(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `curl` from the harness (not from an example): the body, or `None` on any failure.
fn fetch(args: &[&str]) -> Option<String> {
    let output = Command::new("curl")
        .args(["--fail", "--silent", "--max-time", "5"])
        .args(args)
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

impl Environment {
    fn gateway_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `GET path` on the gateway with the admin token, as JSON.
    pub fn admin_get(&self, path: &str) -> Option<Value> {
        let auth = format!("Authorization: Bearer {}", self.admin_token);
        let body = fetch(&["-H", &auth, &format!("{}{path}", self.gateway_url())])?;
        serde_json::from_str(&body).ok()
    }

    /// Waits until the source's backlog is delivered (or dead-lettered).
    pub fn settle(&self, source: &str) {
        wait_for(
            &format!("source {source}'s backlog to be delivered"),
            Duration::from_secs(30),
            || {
                self.admin_get(&format!("/api/profile/{source}"))
                    .is_some_and(|profile| profile["backlog"]["events"] == 0)
            },
        );
    }

    /// The demo, as README.md's Getting started runs it, on free ports in a fresh
    /// directory (`demo-data` inside it).
    pub fn demo() -> Environment {
        let dir = tempfile::tempdir().expect("temp dir");
        let (port, sim_port) = free_ports();
        let child = clean_command(bin_dir().join("refiner-gateway"))
            .args(["demo", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--sim-listen", &format!("127.0.0.1:{sim_port}")])
            .current_dir(dir.path())
            .stdout(log_file(dir.path(), "demo.out"))
            .stderr(log_file(dir.path(), "demo.err"))
            .spawn()
            .expect("start the demo");
        let mut environment = Environment {
            rewrites: rewrites(port, sim_port, dir.path()),
            dir,
            port,
            children: vec![child],
            admin_token: String::new(),
            token_in_env: false,
        };
        let out = environment.dir.path().join("demo.out");
        wait_for("the demo's banner", Duration::from_secs(30), || {
            fs::read_to_string(&out).is_ok_and(|text| text.contains("Ctrl-C stops both."))
        });
        let token = fs::read_to_string(environment.dir.path().join("demo-data/admin-token"))
            .expect("the demo keeps its admin token in demo-data/admin-token");
        environment.admin_token = token.trim().to_string();
        environment
    }

    /// Stops the demo with SIGINT (Ctrl-C) and returns how it ended and what it printed.
    pub fn interrupt_demo(mut self) -> Ran {
        let mut child = self.children.remove(0);
        // SAFETY: kill(2) on the child's pid, which it still is (not yet waited for).
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(child.id() as i32, libc::SIGINT);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for the demo") {
                break status;
            }
            assert!(Instant::now() < deadline, "the demo did not stop on SIGINT");
            std::thread::sleep(Duration::from_millis(50));
        };
        let read = |name: &str| fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
        Ran {
            success: status.success(),
            status: status.to_string(),
            stdout: read("demo.out"),
            stderr: read("demo.err"),
        }
    }

    /// A `serve` gateway configured for the documentation's examples, with three dead
    /// letters in `website` (see the module header).
    pub fn docs() -> Environment {
        let dir = tempfile::tempdir().expect("temp dir");
        let (port, sim_port) = free_ports();
        let sim = clean_command(bin_dir().join("refiner-sim"))
            .args(["--listen", &format!("127.0.0.1:{sim_port}")])
            .args(["--api-key", SIM_KEY, "--count-400", "3", "--workers", "1"])
            .stdout(log_file(dir.path(), "sim.out"))
            .stderr(log_file(dir.path(), "sim.err"))
            .spawn()
            .expect("start refiner-sim");
        let config = dir.path().join("gateway.toml");
        fs::write(&config, docs_config(port, sim_port, dir.path())).expect("write config");
        fs::write(dir.path().join("batch.json"), BATCH_JSON).expect("write batch.json");
        let mut environment = Environment {
            rewrites: rewrites(port, sim_port, dir.path()),
            dir,
            port,
            children: vec![sim],
            admin_token: ADMIN_TOKEN.to_string(),
            token_in_env: true,
        };
        let sim_out = environment.dir.path().join("sim.out");
        wait_for("refiner-sim", Duration::from_secs(30), || {
            fs::read_to_string(&sim_out).is_ok_and(|text| text.contains("/v1"))
        });
        let gateway = clean_command(bin_dir().join("refiner-gateway"))
            .args(["serve", "--config"])
            .arg(&config)
            .current_dir(environment.dir.path())
            .stdout(log_file(environment.dir.path(), "gateway.out"))
            .stderr(log_file(environment.dir.path(), "gateway.err"))
            .spawn()
            .expect("start the gateway");
        environment.children.push(gateway);
        let ready = format!("{}/readyz", environment.gateway_url());
        wait_for("the gateway's /readyz", Duration::from_secs(30), || {
            fetch(&[&ready]).is_some()
        });
        environment.seed_dead_letters();
        environment
    }

    /// Three `Order Completed` events of three users in `website`, refused by the
    /// simulator's first three answers.
    fn seed_dead_letters(&self) {
        let events: Vec<Value> = (1..=3)
            .map(|n| {
                serde_json::json!({
                    "type": "track", "userId": format!("buyer-{n}"), "event": "Order Completed",
                    "messageId": format!("seed-{n}"), "properties": {"total": 10 * n}
                })
            })
            .collect();
        let body = serde_json::json!({ "batch": events }).to_string();
        let url = format!("{}/v1/batch", self.gateway_url());
        fetch(&[
            "-u",
            "wk-website:",
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
            &url,
        ])
        .expect("seed the dead letters");
        wait_for(
            "three dead letters in website",
            Duration::from_secs(30),
            || {
                self.admin_get("/api/events/website/dead-letters")
                    .is_some_and(|page| page["count"] == 3)
            },
        );
    }

    /// Runs one example (rewritten) in `bash`, in the environment's directory.
    pub fn run(&self, example: &Example) -> Ran {
        let mut code = example.code.clone();
        for (from, to) in &self.rewrites {
            code = code.replace(from, to);
        }
        let script = format!("{PRELUDE}\n{code}\n");
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![bin_dir()];
        paths.extend(std::env::split_paths(&path));
        let (out, err) = (
            self.dir.path().join("example.out"),
            self.dir.path().join("example.err"),
        );
        let mut command = clean_command("bash");
        command
            .args(["-c", &script])
            .current_dir(self.dir.path())
            .env("PATH", std::env::join_paths(paths).expect("PATH"))
            .env("GATEWAY_URL", self.gateway_url())
            .env_remove("GATEWAY_ADMIN_TOKEN")
            .env_remove("T");
        if self.token_in_env {
            command
                .env("GATEWAY_ADMIN_TOKEN", &self.admin_token)
                .env("T", &self.admin_token);
        }
        let mut child = command
            .stdout(log_file(self.dir.path(), "example.out"))
            .stderr(log_file(self.dir.path(), "example.err"))
            .spawn()
            .expect("run bash");
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for bash") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{}: the example did not finish in 120 s", example.place());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ran {
            success: status.success(),
            status: status.to_string(),
            stdout: fs::read_to_string(out).unwrap_or_default(),
            stderr: fs::read_to_string(err).unwrap_or_default(),
        }
    }

    /// The logs of the gateway and the simulator, for a failure's message.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        for name in ["gateway.err", "sim.err", "demo.out", "demo.err"] {
            if let Ok(log) = fs::read_to_string(self.dir.path().join(name)) {
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                text.push_str(&format!("--- {name} (last lines)\n{}\n", tail.join("\n")));
            }
        }
        text
    }
}

/// Runs before every example.
const PRELUDE: &str = r#"set -euo pipefail
curl() {
  local rc=0
  command curl --fail-with-body --silent --show-error --max-time 30 "$@" || rc=$?
  echo
  return "$rc"
}"#;

/// The `batch.json` docs/segment-setup.md compresses.
const BATCH_JSON: &str = r#"{"writeKey":"wk-backend","batch":[{"type":"track","userId":"u1","event":"Signed Up","messageId":"gz-1"}]}"#;

/// The documentation's addresses and paths, and the test's.
fn rewrites(port: u16, sim_port: u16, dir: &Path) -> Vec<(String, String)> {
    let dir = dir.display();
    vec![
        (
            "https://gateway.example.com".into(),
            format!("http://127.0.0.1:{port}"),
        ),
        ("127.0.0.1:8080".into(), format!("127.0.0.1:{port}")),
        ("127.0.0.1:8090".into(), format!("127.0.0.1:{sim_port}")),
        ("/var/lib/refiner-gateway".into(), format!("{dir}/data")),
        (" /backup/".into(), format!(" {dir}/backup/")),
    ]
}

/// The configuration of [`Environment::docs`]: the sources, keys and secrets the
/// documentation's examples use.
fn docs_config(port: u16, sim_port: u16, dir: &Path) -> String {
    format!(
        r#"listen = "127.0.0.1:{port}"
data_dir = "{data}"
admin_token = "{ADMIN_TOKEN}"

[refiner]
base_url = "http://127.0.0.1:{sim_port}/v1"

[[sources]]
slug = "default"
write_keys = ["my-write-key", "demo-write-key"]
refiner_api_key = "{SIM_KEY}"

[[sources]]
slug = "website"
write_keys = ["wk-website", "wk-backend"]
refiner_api_key = "{SIM_KEY}"

[[sources]]
slug = "segment-prod"
write_keys = ["wk-segment-prod"]
webhook_secret = "a-long-random-shared-secret"
refiner_api_key = "{SIM_KEY}"
"#,
        data = dir.join("data").display(),
    )
}

/// Prints straight to stderr, past the harness's capture: the report must be seen.
pub fn report(lines: &[String]) {
    let mut stderr = std::io::stderr();
    for line in lines {
        let _ = writeln!(stderr, "{line}");
    }
}

/// Checks one finished example: success, and every expected answer in its output.
pub fn check(example: &Example, ran: &Ran, environment: &Environment) -> Result<(), String> {
    let context = || {
        format!(
            "{}:\n{}\n--- exit: {}\n--- stdout\n{}\n--- stderr\n{}\n{}",
            example.place(),
            example.code,
            ran.status,
            ran.stdout,
            ran.stderr,
            environment.logs()
        )
    };
    if !ran.success {
        return Err(format!("the example failed: {}", context()));
    }
    for expected in expected_answers(&example.code) {
        if !output_has(&ran.stdout, &expected) {
            return Err(format!("no output line is {expected}: {}", context()));
        }
    }
    Ok(())
}

/// The not-run examples of all documents, grouped by reason, for the report.
pub fn not_run_report(all: &[Example]) -> Vec<String> {
    let mut by_reason: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for example in all {
        if let Some(why) = &example.not_run {
            by_reason.entry(why).or_default().push(example.place());
        }
    }
    by_reason
        .into_iter()
        .map(|(why, places)| format!("  not run ({why}): {}", places.join(", ")))
        .collect()
}
