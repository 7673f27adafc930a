//! The reliability suite's long forms, and the results table of `docs/reliability.md`.
//!
//! ```sh
//! cargo run --release --example reliability -- --long            # everything, hours
//! cargo run --release --example reliability -- --long --only soak,backlog
//! cargo run --release --example reliability -- --quick           # the CI sizes, in release
//! ```
//!
//! It runs the same scenarios as `tests/reliability.rs` (the code is shared) against the real
//! `refiner-gateway` binary of the same build profile, which it builds first, prints each
//! scenario's figures and checks as it goes, and rewrites the rows of the scenarios it ran in
//! the results table of `docs/reliability.md` (between the `reliability-results` markers),
//! keeping the rows of the others. It exits 1 if a check failed, after writing the table.

#[allow(dead_code)]
#[path = "../tests/reliability/crash.rs"]
mod crash;
#[allow(dead_code)]
#[path = "../tests/reliability/disk.rs"]
mod disk;
#[allow(dead_code)]
#[path = "../tests/reliability/fuzz.rs"]
mod fuzz;
#[allow(dead_code)]
#[path = "../tests/reliability/harness.rs"]
mod harness;
#[allow(dead_code)]
#[path = "../tests/reliability/load.rs"]
mod load;
#[allow(dead_code)]
#[path = "../tests/reliability/outage.rs"]
mod outage;
#[allow(dead_code)]
#[path = "../tests/reliability/report.rs"]
mod report;
#[allow(dead_code)]
#[path = "../tests/reliability/soak.rs"]
mod soak;
#[allow(dead_code)]
#[path = "../tests/reliability/storm.rs"]
mod storm;
#[allow(dead_code)]
#[path = "../tests/reliability/witness.rs"]
mod witness;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use report::Report;

const BEGIN: &str = "<!-- reliability-results:begin -->";
const END: &str = "<!-- reliability-results:end -->";

/// Every scenario, in the order they run.
const SCENARIOS: [&str; 7] = [
    "crash", "outage", "storm", "disk", "fuzz", "soak", "backlog",
];

#[derive(Parser, Debug)]
#[command(about = "Run the reliability suite and regenerate docs/reliability.md's results")]
struct Cli {
    /// The long forms: 100 crash cycles, 1,000,000 bad inputs, a 10-minute soak at half the
    /// measured maximum ingest rate, a 10,000,000-event backlog.
    #[arg(long, conflicts_with = "quick")]
    long: bool,
    /// The CI sizes (the default).
    #[arg(long)]
    quick: bool,
    /// Only these scenarios (comma-separated): crash, outage, storm, disk, fuzz, soak, backlog.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Override the number of crash cycles.
    #[arg(long)]
    crash_cycles: Option<usize>,
    /// Override the number of bad-input cases.
    #[arg(long)]
    fuzz_cases: Option<u64>,
    /// Override the soak's duration, in seconds.
    #[arg(long)]
    soak_secs: Option<u64>,
    /// Override the soak's rate (events/s) instead of half the measured maximum.
    #[arg(long)]
    soak_rate: Option<f64>,
    /// Override the backlog's size, in events.
    #[arg(long)]
    backlog_events: Option<u64>,
    /// The document whose results table is rewritten.
    #[arg(long, default_value = "docs/reliability.md")]
    out: PathBuf,
    /// Print the results without touching the document.
    #[arg(long)]
    no_write: bool,
}

/// Builds the gateway binary of this build's profile, when run through `cargo run`.
fn build_gateway() {
    let Ok(cargo) = std::env::var("CARGO") else {
        return;
    };
    let mut command = std::process::Command::new(cargo);
    command.args(["build", "--bin", "refiner-gateway"]);
    if !cfg!(debug_assertions) {
        command.arg("--release");
    }
    let status = command.status().expect("run cargo build");
    assert!(status.success(), "building the gateway binary failed");
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or("? GiB".into(), |kib| format!("{} GiB", kib / 1024 / 1024));
    format!("{cpus} cores ({model}), {memory} RAM")
}

fn commit() -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let hash = run(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty =
        run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{hash} + local changes")
    } else {
        hash
    }
}

/// Rewrites the rows of the scenarios in `reports`, keeping the others.
fn write_table(path: &PathBuf, run: &str, reports: &[(String, Report)]) -> std::io::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let (Some(begin), Some(end)) = (text.find(BEGIN), text.find(END)) else {
        return Err(std::io::Error::other(format!(
            "{} lacks the {BEGIN} … {END} markers",
            path.display()
        )));
    };
    let inside = &text[begin + BEGIN.len()..end];
    // Existing rows by scenario key (the first cell's text), in table order.
    let mut rows: BTreeMap<usize, (String, String)> = BTreeMap::new();
    for line in inside
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| Scenario") && !l.starts_with("| ---"))
    {
        let name = line
            .trim_start_matches("| ")
            .split(" |")
            .next()
            .unwrap_or("")
            .to_string();
        let order = order_of(&name);
        rows.insert(order, (name, line.to_string()));
    }
    for (_, report) in reports {
        let order = order_of(&report.scenario);
        let row = report.markdown_row().replacen(
            &format!("| {} |", report.scenario),
            &format!("| {} | {run} |", report.scenario),
            1,
        );
        rows.insert(order, (report.scenario.clone(), row));
    }
    let mut table = String::from(
        "\n| Scenario | Run | What ran | Figures | Checks |\n| --- | --- | --- | --- | --- |\n",
    );
    for (_, (_, row)) in rows {
        table.push_str(&row);
        table.push('\n');
    }
    let rewritten = format!("{}{BEGIN}{table}{}", &text[..begin], &text[end..]);
    std::fs::write(path, rewritten)
}

/// Table order: the order of the scenarios as they run (unknown rows last).
fn order_of(scenario: &str) -> usize {
    const NAMES: [&str; 8] = [
        "Crash loop",
        "Refiner outage",
        "429 storm",
        "Disk full",
        "Bad input",
        "Maximum ingest rate",
        "Soak and memory",
        "Backlog with Refiner down",
    ];
    NAMES
        .iter()
        .position(|n| *n == scenario)
        .unwrap_or(NAMES.len() + scenario.len())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let long = cli.long;
    for name in &cli.only {
        if !SCENARIOS.contains(&name.as_str()) {
            eprintln!("unknown scenario `{name}`; known: {}", SCENARIOS.join(", "));
            return ExitCode::from(2);
        }
    }
    let wanted = |name: &str| cli.only.is_empty() || cli.only.iter().any(|o| o == name);
    build_gateway();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let date = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let form = if long { "long" } else { "quick" };
    let run = format!("{date}, {form} form, {profile} build, commit {}", commit());
    eprintln!("reliability: {run}; machine: {}", machine());

    let mut reports: Vec<(String, Report)> = Vec::new();
    let mut record = |key: &str, report: Report| {
        eprintln!("{}", report.text());
        reports.push((key.to_string(), report));
    };

    if wanted("crash") {
        let mut params = crash::CrashParams::quick();
        if long {
            params.cycles = 100;
            params.cycle_ms = (1000, 6000);
            params.replay_events = 20_000;
            params.replay_chunk = 100;
            params.replay_pace = Duration::from_millis(200);
            params.drain_limit = Duration::from_secs(600);
        }
        if let Some(cycles) = cli.crash_cycles {
            params.cycles = cycles;
        }
        record("crash", crash::run(params).await);
    }
    if wanted("outage") {
        let mut params = outage::OutageParams::quick();
        if long {
            params.before = Duration::from_secs(10);
            params.unavailable = Duration::from_secs(60);
            params.dropped = Duration::from_secs(60);
            params.refused = Duration::from_secs(60);
            params.default_delivery = true;
            params.drain_limit = Duration::from_secs(900);
        }
        record("outage", outage::run(params).await);
    }
    if wanted("storm") {
        let mut params = storm::StormParams::quick();
        if long {
            params.events_per_client = 500;
            params.rate_429 = 0.2;
            params.drain_limit = Duration::from_secs(1800);
        }
        record("storm", storm::run(params).await);
    }
    if wanted("disk") {
        let mut params = disk::DiskParams::quick();
        if long {
            params.fs_mib = 16;
            params.filler_mib = 4;
            params.hold_full = Duration::from_secs(10);
        }
        record("disk", disk::run(params).await);
    }
    if wanted("fuzz") {
        let mut params = fuzz::FuzzParams::quick();
        if long {
            params.cases = 1_000_000;
            params.warmup = 20_000;
        }
        if let Some(cases) = cli.fuzz_cases {
            params.cases = cases;
        }
        record("fuzz", fuzz::run(params).await);
    }
    if wanted("soak") {
        let mut params = soak::SoakParams::quick();
        if long {
            params.duration = Duration::from_secs(600);
            params.warmup = Duration::from_secs(60);
            params.drain_limit = Duration::from_secs(600);
        }
        if let Some(secs) = cli.soak_secs {
            params.duration = Duration::from_secs(secs);
        }
        match cli.soak_rate {
            Some(rate) => {
                params.rate = rate;
                params.rate_note = "a rate given on the command line".into();
            }
            None if long => {
                // Single-event requests, the shape of Segment's webhooks.
                let max = soak::max_ingest_rate(Duration::from_secs(20), 32, 1).await;
                let rate: f64 = max
                    .figures
                    .iter()
                    .find(|(name, _)| name == "events/s")
                    .and_then(|(_, value)| value.parse().ok())
                    .unwrap_or(1000.0);
                params.rate = (rate / 2.0).max(1.0);
                params.clients = 16;
                params.batch = 1;
                params.rate_note = format!("half the measured maximum of {rate:.0}");
                record("maxrate", max);
            }
            None => {}
        }
        record("soak", soak::soak(params).await);
    }
    if wanted("backlog") {
        let mut params = soak::BacklogParams::quick();
        if long {
            params.events = 10_000_000;
            params.clients = 8;
            params.batch = 500;
            params.hold = Duration::from_secs(30);
        }
        if let Some(events) = cli.backlog_events {
            params.events = events;
        }
        record("backlog", soak::backlog(params).await);
    }

    let failed: Vec<&str> = reports
        .iter()
        .filter(|(_, r)| !r.passed())
        .map(|(_, r)| r.scenario.as_str())
        .collect();
    eprintln!("machine: {}", machine());
    for (_, report) in &reports {
        eprintln!(
            "{}: {}",
            report.scenario,
            if report.skipped.is_some() {
                "skipped"
            } else if report.passed() {
                "passed"
            } else {
                "FAILED"
            }
        );
    }
    if !cli.no_write {
        let run = format!("{run}; {}", machine());
        match write_table(&cli.out, &run, &reports) {
            Ok(()) => eprintln!("results written to {}", cli.out.display()),
            Err(e) => {
                eprintln!("cannot write {}: {e}", cli.out.display());
                return ExitCode::from(1);
            }
        }
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("failed: {}", failed.join(", "));
        ExitCode::from(1)
    }
}
