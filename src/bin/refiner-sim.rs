//! The `refiner-sim` command: a Refiner REST API simulator for testing the gateway's
//! delivery. It prints its API URL (`http://HOST:PORT/v1`) as the first line on stdout once
//! it accepts connections, and stops on SIGTERM or Ctrl-C. Exit code 2: bad arguments;
//! 1: cannot start. See `docs/refiner-sim.md`.

use std::io::Write;
use std::net::TcpListener;
use std::process::ExitCode;

use clap::Parser;
use refiner_gateway::sim::{
    self, Faults, LongStrings, SegmentSpec, SimOptions, DEFAULT_LOG_CAPACITY,
};

#[derive(Parser)]
#[command(
    name = "refiner-sim",
    version,
    about = "Refiner REST API simulator with fault injection, for testing the gateway's delivery"
)]
struct Cli {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:8090", value_name = "ADDR")]
    listen: String,
    /// Accepted API key (repeatable). Without any, every non-empty key is accepted.
    #[arg(long = "api-key", value_name = "KEY", env = "REFINER_SIM_API_KEY")]
    api_keys: Vec<String>,
    /// Milliseconds added to every /v1 call.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    latency_ms: u64,
    /// Probability (0..1) of answering 429 with Retry-After.
    #[arg(long, default_value_t = 0.0, value_parser = probability, value_name = "R")]
    rate_429: f64,
    /// The next N calls answer 429.
    #[arg(long, default_value_t = 0, value_name = "N")]
    count_429: u64,
    /// Retry-After of injected 429s (and of 503s with --retry-after-on-503), in seconds.
    #[arg(long = "retry-after", default_value_t = 1, value_name = "S")]
    retry_after_secs: u64,
    /// Also send Retry-After with injected 503s.
    #[arg(long)]
    retry_after_on_503: bool,
    /// Probability (0..1) of answering 500.
    #[arg(long, default_value_t = 0.0, value_parser = probability, value_name = "R")]
    rate_500: f64,
    /// The next N calls answer 500.
    #[arg(long, default_value_t = 0, value_name = "N")]
    count_500: u64,
    /// Probability (0..1) of answering 503.
    #[arg(long, default_value_t = 0.0, value_parser = probability, value_name = "R")]
    rate_503: f64,
    /// The next N calls answer 503.
    #[arg(long, default_value_t = 0, value_name = "N")]
    count_503: u64,
    /// The next N calls answer 401, as if the API key were refused.
    #[arg(long, default_value_t = 0, value_name = "N")]
    count_401: u64,
    /// The next N calls answer 400, as Refiner does for a call it refuses.
    #[arg(long, default_value_t = 0, value_name = "N")]
    count_400: u64,
    /// Probability (0..1) of closing the connection without handling or answering.
    #[arg(long, default_value_t = 0.0, value_parser = probability, value_name = "R")]
    rate_drop: f64,
    /// The next N calls are dropped without being handled.
    #[arg(long, default_value_t = 0, value_name = "N")]
    count_drop: u64,
    /// Probability (0..1) of handling the call, then closing without answering.
    #[arg(long, default_value_t = 0.0, value_parser = probability, value_name = "R")]
    rate_drop_after: f64,
    /// The next N calls are handled, then dropped.
    #[arg(long, default_value_t = 0, value_name = "N")]
    count_drop_after: u64,
    /// Seed of the rate faults' random generator.
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Truncate string traits over 255 characters instead of refusing the call with 400.
    #[arg(long)]
    truncate_long_strings: bool,
    /// Calls (and events) kept for inspection; older ones are evicted.
    #[arg(long, default_value_t = DEFAULT_LOG_CAPACITY, value_name = "N")]
    log_capacity: usize,
    /// HTTP worker threads (default: one per physical core).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// A manual segment, as NAME=UUID or NAME (a random uuid); repeatable. Listed by
    /// GET /segments, joined and left through /sync-segment.
    #[arg(long = "segment", value_name = "NAME=UUID", value_parser = SegmentSpec::parse)]
    segments: Vec<SegmentSpec>,
}

fn probability(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not a probability between 0 and 1"))
    }
}

impl Cli {
    fn options(&self) -> SimOptions {
        let defaults = Faults::none();
        SimOptions {
            api_keys: self.api_keys.clone(),
            faults: Faults {
                latency_ms: self.latency_ms,
                rate_429: self.rate_429,
                count_429: self.count_429,
                retry_after_secs: self.retry_after_secs,
                retry_after_on_503: self.retry_after_on_503,
                rate_500: self.rate_500,
                count_500: self.count_500,
                rate_503: self.rate_503,
                count_503: self.count_503,
                rate_drop: self.rate_drop,
                count_drop: self.count_drop,
                rate_drop_after: self.rate_drop_after,
                count_drop_after: self.count_drop_after,
                count_401: self.count_401,
                count_400: self.count_400,
                seed: self.seed.unwrap_or(defaults.seed),
            },
            long_strings: if self.truncate_long_strings {
                LongStrings::Truncate
            } else {
                LongStrings::Reject
            },
            log_capacity: self.log_capacity,
            workers: self.workers,
            segments: self.segments.clone(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let options = cli.options();
    if let Err(e) = options.faults.validate() {
        eprintln!("refiner-sim: {e}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("refiner-sim: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        let listener = match TcpListener::bind(&cli.listen) {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!("refiner-sim: cannot listen on {}: {e}", cli.listen);
                return ExitCode::from(1);
            }
        };
        let handle = match sim::spawn(listener, options).await {
            Ok(handle) => handle,
            Err(e) => {
                eprintln!("refiner-sim: cannot start: {e}");
                return ExitCode::from(1);
            }
        };
        let mut stdout = std::io::stdout();
        // A script waits for this line; if stdout is gone there is no one to tell.
        let _ = writeln!(stdout, "{}", handle.url());
        let _ = stdout.flush();
        if let Err(e) = shutdown_signal().await {
            eprintln!("refiner-sim: cannot wait for signals: {e}");
            handle.stop().await;
            return ExitCode::from(1);
        }
        handle.stop().await;
        ExitCode::SUCCESS
    })
}

/// Resolves on Ctrl-C (SIGINT) or, on Unix, SIGTERM.
async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
