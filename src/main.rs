//! The `refiner-gateway` command: parse the command line, load settings, start logging,
//! build the application and run it until a signal. Errors end the process with one line
//! on stderr and exit code 2 (configuration) or 1 (start-up).
//!
//! `serve`, `demo` and `backup` run with the file mode creation mask 0o077: every file
//! and directory they create (the spool, its write-ahead log, the dedup runs, the delivered
//! journal, a backup) is readable by the gateway's user alone, whoever creates it (SQLite
//! included). The data directory itself is created 0700 (see `datadir`).
//!
//! `healthcheck` is a tiny HTTP probe for container health checks (runtime images need no
//! curl): exit 0 when the URL answers 2xx within the timeout, 1 otherwise.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use refiner_gateway::config::{ConfigError, LogFormat, Settings};
use refiner_gateway::demo::DemoOptions;
use refiner_gateway::startup::Application;
use refiner_gateway::telemetry;

/// mimalloc instead of the system allocator: delivery allocates per call (requests,
/// answers, JSON), and glibc's malloc and free took about a sixth of the dispatch
/// threads' time; measured in docs/benchmarks.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "refiner-gateway",
    version,
    about = "Segment-compatible event gateway for Refiner"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (settings: defaults, then --config, then the environment).
    Serve {
        /// TOML settings file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run the gateway and a Refiner simulator on loopback, to see events flow end to end
    /// without a Refiner account.
    Demo {
        /// Address of the gateway.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Address of the Refiner simulator.
        #[arg(long, default_value = "127.0.0.1:8090")]
        sim_listen: String,
        /// Directory of the demo's spool.
        #[arg(long, default_value = "./demo-data")]
        data_dir: PathBuf,
    },
    /// Load and check the settings as `serve` does, without starting anything: exit 0 if
    /// `serve` would accept them, else 2 with the problem on stderr.
    CheckConfig {
        /// TOML settings file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Probe a running gateway over HTTP: exit 0 if the URL answers 2xx, else 1 (for
    /// container health checks).
    Healthcheck {
        /// URL to probe. Default: `/healthz` on the port of `GATEWAY_LISTEN` (8080) on
        /// 127.0.0.1.
        #[arg(long)]
        url: Option<String>,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 3)]
        timeout_secs: u64,
    },
    /// List, show, replay or delete dead letters through a running gateway's management API.
    DeadLetters(refiner_gateway::cli::DeadLettersArgs),
    /// Copy a data directory (spool, dedup index, delivered journal) into a new directory a
    /// gateway can be started on; works while the gateway runs.
    Backup {
        /// The gateway's data directory.
        #[arg(long, env = "GATEWAY_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
        /// A new (or empty) directory for the copy.
        #[arg(long, value_name = "DIR")]
        output: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => {
            private_files();
            serve(config)
        }
        Command::Demo {
            listen,
            sim_listen,
            data_dir,
        } => {
            private_files();
            demo(DemoOptions {
                listen,
                sim_listen,
                data_dir,
            })
        }
        Command::Backup { data_dir, output } => {
            private_files();
            backup(&data_dir, &output)
        }
        Command::CheckConfig { config } => check_config(config),
        Command::Healthcheck { url, timeout_secs } => healthcheck(url, timeout_secs),
        Command::DeadLetters(args) => refiner_gateway::cli::run(args),
    }
}

/// Files and directories created from here on are the user's alone (see the header).
fn private_files() {
    // SAFETY: umask only sets the process's mask and cannot fail; nothing has created
    // files or started threads yet.
    unsafe {
        libc::umask(0o077);
    }
}

fn backup(data_dir: &std::path::Path, output: &std::path::Path) -> ExitCode {
    use refiner_gateway::backup::{self, BackupError, Step};
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.enable_steady_tick(Duration::from_millis(120));
    let result = backup::backup(data_dir, output, |step| {
        spinner.set_message(match step {
            Step::Snapshot(1) => "copying spool.db".to_string(),
            Step::Snapshot(n) => {
                format!("copying spool.db again (attempt {n}: a merge replaced dedup runs)")
            }
            Step::DedupRuns => "copying the dedup runs".to_string(),
            Step::Journal => "copying the delivered journal".to_string(),
            Step::Check => "checking the copy".to_string(),
        })
    });
    spinner.finish_and_clear();
    match result {
        Ok(report) => {
            println!(
                "backed up {} into {}: spool.db {} bytes, {} dedup runs, {} journal files",
                data_dir.display(),
                output.display(),
                report.spool_bytes,
                report.runs,
                report.journal_files
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("refiner-gateway: backup failed: {e}");
            let usage = matches!(
                e,
                BackupError::NoSpool { .. } | BackupError::OutputNotEmpty { .. }
            );
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}

/// The settings `serve` would run with, or the configuration error it would stop on.
fn load_for_serve(config: Option<&std::path::Path>) -> Result<Settings, ConfigError> {
    let settings = Settings::load(config)?;
    settings.require_refiner_keys()?;
    Ok(settings)
}

fn check_config(config: Option<PathBuf>) -> ExitCode {
    match load_for_serve(config.as_deref()) {
        Ok(settings) => {
            let slugs: Vec<&str> = settings.sources.iter().map(|s| s.slug.as_str()).collect();
            println!(
                "configuration OK: listen {}, data_dir {}, sources {}, delivery {}",
                settings.listen,
                settings.data_dir.display(),
                slugs.join(", "),
                if settings.delivery.enabled {
                    "on"
                } else {
                    "off"
                }
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("refiner-gateway: {e}");
            ExitCode::from(2)
        }
    }
}

/// The default probe URL: `/healthz` on loopback, at the port `GATEWAY_LISTEN` names.
fn default_probe_url() -> String {
    let port = std::env::var("GATEWAY_LISTEN")
        .ok()
        .and_then(|listen| listen.trim().parse::<std::net::SocketAddr>().ok())
        .map_or(8080, |address| address.port());
    format!("http://127.0.0.1:{port}/healthz")
}

fn healthcheck(url: Option<String>, timeout_secs: u64) -> ExitCode {
    let url = url.unwrap_or_else(default_probe_url);
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let result = runtime.block_on(async {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(timeout_secs.max(1)))
            .build()
            .map_err(|e| e.to_string())?;
        let response = client.get(&url).send().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(response.status())
    });
    match result {
        Ok(status) if status.is_success() => {
            println!("{url}: {status}");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            eprintln!("refiner-gateway: {url}: {status}");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("refiner-gateway: {url}: {e}");
            ExitCode::from(1)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("refiner-gateway: cannot start the runtime: {e}");
            ExitCode::from(1)
        })
}

fn demo(options: DemoOptions) -> ExitCode {
    telemetry::init_logging(LogFormat::Text);
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(refiner_gateway::demo::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("refiner-gateway: {e}");
            ExitCode::from(1)
        }
    }
}

fn serve(config: Option<PathBuf>) -> ExitCode {
    let settings = match load_for_serve(config.as_deref()) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("refiner-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_logging(settings.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("refiner-gateway: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        let app = match Application::build(&settings) {
            Ok(app) => app,
            Err(e) => {
                eprintln!("refiner-gateway: {e}");
                return ExitCode::from(1);
            }
        };
        tracing::info!(
            listen = %settings.listen,
            port = app.port(),
            data_dir = %settings.data_dir.display(),
            sources = settings.sources.len(),
            "gateway listening"
        );
        match app.run_until_stopped().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("refiner-gateway: server error: {e}");
                ExitCode::from(1)
            }
        }
    })
}
