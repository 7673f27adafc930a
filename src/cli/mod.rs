//! The `refiner-gateway` command line: parse it, load settings, start logging,
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

//!
//! `dead-letters` is a client of the management API over HTTP ([`dead_letters`]).

pub mod dead_letters;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::config::{ConfigError, LogFormat, Settings, SpoolBackend, ENV_VARS};
use crate::demo::DemoOptions;
use crate::startup::Application;
use crate::telemetry;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "refiner-gateway",
    version,
    about = "Segment-compatible event gateway for Refiner",
    after_help = "Examples:\n  \
        refiner-gateway demo                          # gateway + Refiner simulator on loopback\n  \
        refiner-gateway serve --config gateway.toml   # production\n  \
        refiner-gateway <command> --help              # each command's options and examples\n\n\
        Documentation: README.md and docs/ in the source tree."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (settings: defaults, then --config, then the environment).
    ///
    /// Every setting has a default except the write keys and the Refiner API key; a TOML
    /// file (--config) overrides the defaults, and the environment variables below
    /// override the file. docs/configuration.md describes every setting.
    #[command(after_help = serve_help())]
    Serve {
        /// TOML settings file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Run the gateway and a Refiner simulator on loopback, to see events flow end to end
    /// without a Refiner account.
    ///
    /// The banner lists the write key, the admin token of the management API (kept in
    /// DATA_DIR/admin-token) and commands to try. The simulator keeps what it received in
    /// memory; the spool in DATA_DIR keeps what the gateway accepted across restarts.
    #[command(after_help = "Examples:\n  \
        refiner-gateway demo\n  \
        refiner-gateway demo --listen 127.0.0.1:9080 --sim-listen 127.0.0.1:9090 --data-dir /tmp/demo")]
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
    ///
    /// Besides the settings themselves it checks what `serve` needs from the machine: a
    /// writable data directory (embedded spool) or a readable NATS credentials file.
    #[command(after_help = "Examples:\n  \
        refiner-gateway check-config --config /etc/refiner-gateway/gateway.toml\n  \
        refiner-gateway check-config --settings-only --config rendered-for-a-pod.toml\n  \
        GATEWAY_WRITE_KEYS=my-write-key REFINER_API_KEY=my-refiner-api-key refiner-gateway check-config")]
    CheckConfig {
        /// TOML settings file.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Check the settings alone, not the data directory or the files they name: for
        /// a configuration made for another machine (the Helm chart's check renders one).
        #[arg(long)]
        settings_only: bool,
    },
    /// Probe a running gateway over HTTP: exit 0 if the URL answers 2xx, else 1 (for
    /// container health checks).
    #[command(after_help = "Examples:\n  \
        refiner-gateway healthcheck\n  \
        refiner-gateway healthcheck --url http://127.0.0.1:8080/readyz --timeout-secs 5")]
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
    #[command(after_help = dead_letters::DEAD_LETTERS_EXAMPLES)]
    DeadLetters(dead_letters::DeadLettersArgs),
    /// Copy a data directory (spool, dedup index, delivered journal) into a new directory a
    /// gateway can be started on; works while the gateway runs.
    #[command(after_help = "Example:\n  \
        refiner-gateway backup --data-dir /var/lib/refiner-gateway --output /backup/gateway-$(date +%Y%m%dT%H%M%S)")]
    Backup {
        /// The gateway's data directory.
        #[arg(long, env = "GATEWAY_DATA_DIR", default_value = "./data")]
        data_dir: PathBuf,
        /// A new (or empty) directory for the copy.
        #[arg(long, value_name = "DIR")]
        output: PathBuf,
    },
}

/// The end of `serve --help`: the environment variables and an example.
fn serve_help() -> String {
    let width = ENV_VARS.iter().map(|(v, _)| v.len()).max().unwrap_or(0);
    let mut text = String::from("Environment variables (override the file's settings):\n");
    for (variable, setting) in ENV_VARS {
        text.push_str(&format!("  {variable:<width$}  {setting}\n"));
    }
    text.push_str(&format!(
        "  {:<width$}  the log filter (default: info)\n",
        "RUST_LOG"
    ));
    text.push_str(
        "\n\
         Examples:\n  \
         GATEWAY_WRITE_KEYS=my-write-key REFINER_API_KEY=my-refiner-api-key refiner-gateway serve\n  \
         refiner-gateway serve --config /etc/refiner-gateway/gateway.toml\n\n\
         Check a configuration without starting: refiner-gateway check-config --config FILE",
    );
    text
}

/// Parses the command line and runs the command; the process's exit code.
pub fn main() -> ExitCode {
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
        Command::CheckConfig {
            config,
            settings_only,
        } => check_config(config, settings_only),
        Command::Healthcheck { url, timeout_secs } => healthcheck(url, timeout_secs),
        Command::DeadLetters(args) => dead_letters::run(args),
    }
}

/// Files and directories created from here on are the user's alone (see the header).
fn private_files() {
    // SAFETY: umask only sets the process's mask and cannot fail; nothing has created
    // files or started threads yet.
    #[allow(unsafe_code)]
    unsafe {
        libc::umask(0o077);
    }
}

fn backup(data_dir: &std::path::Path, output: &std::path::Path) -> ExitCode {
    use crate::backup::{self, BackupError, Step};
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

/// The settings `serve` would run with, or the configuration error it would stop on;
/// `machine` adds what `serve` needs from this machine (`startup::preflight`).
fn load_for_serve(config: Option<&std::path::Path>, machine: bool) -> Result<Settings, String> {
    let settings = Settings::load(config).map_err(|e: ConfigError| e.to_string())?;
    settings.require_refiner_keys().map_err(|e| e.to_string())?;
    if machine {
        crate::startup::preflight(&settings)
            .map_err(|e| format!("cannot start with this configuration: {e}"))?;
    }
    Ok(settings)
}

fn check_config(config: Option<PathBuf>, settings_only: bool) -> ExitCode {
    match load_for_serve(config.as_deref(), !settings_only) {
        Ok(settings) => {
            let slugs: Vec<&str> = settings.sources.iter().map(|s| s.slug.as_str()).collect();
            let spool = match settings.spool.backend {
                SpoolBackend::Sqlite => {
                    format!("sqlite in {}", settings.data_dir.display())
                }
                SpoolBackend::Nats => format!(
                    "nats at {} (stream {}, {} replicas)",
                    settings.nats.url, settings.nats.stream, settings.nats.replicas
                ),
            };
            println!(
                "configuration OK: listen {}, spool {spool}, sources {}, delivery {}, management API {}",
                settings.listen,
                slugs.join(", "),
                if settings.delivery.enabled {
                    "on"
                } else {
                    "off"
                },
                if settings.admin_token.is_some() {
                    "on"
                } else {
                    "off (no admin_token)"
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
    // The HTTP servers' start-up lines would interleave with the banner; they say nothing
    // the banner does not.
    telemetry::init_logging_with(LogFormat::Text, "info,actix_server=warn");
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(crate::demo::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("refiner-gateway: {e}");
            ExitCode::from(1)
        }
    }
}

fn serve(config: Option<PathBuf>) -> ExitCode {
    let settings = match load_for_serve(config.as_deref(), true) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("refiner-gateway: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init_logging(settings.log_format);
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    runtime.block_on(async {
        let app = match Application::build(&settings) {
            Ok(app) => app.with_config_file(config.clone()),
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
