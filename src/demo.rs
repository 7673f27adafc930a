//! `refiner-gateway demo`: the gateway and a Refiner simulator on loopback, wired together,
//! so events can be seen flowing end to end without a Refiner account.
//!
//! The simulator stands in for `api.refiner.io`; the gateway is the production code with
//! the embedded spool in `data_dir`. Both stop on Ctrl-C / SIGTERM. Nothing leaves
//! 127.0.0.1.

use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use crate::config::{Secret, Settings, SourceSettings, DEFAULT_SOURCE};
use crate::sim::{self, SimOptions};
use crate::startup::Application;

/// The write key the demo accepts.
pub const DEMO_WRITE_KEY: &str = "demo-write-key";
/// The API key the demo's simulator accepts and the gateway sends.
pub const DEMO_REFINER_KEY: &str = "demo-refiner-key";

/// Where the demo listens and keeps its spool.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub listen: String,
    pub sim_listen: String,
    pub data_dir: PathBuf,
}

/// Runs the demo until a signal.
pub async fn run(options: DemoOptions) -> Result<(), String> {
    let sim_listener = TcpListener::bind(&options.sim_listen).map_err(|e| {
        format!(
            "cannot listen on {} for the simulator: {e}",
            options.sim_listen
        )
    })?;
    let simulator = sim::spawn(sim_listener, SimOptions::with_key(DEMO_REFINER_KEY))
        .await
        .map_err(|e| format!("cannot start the simulator: {e}"))?;
    let settings = Settings {
        listen: options.listen.clone(),
        data_dir: options.data_dir.clone(),
        refiner: crate::config::RefinerSettings {
            base_url: simulator.url(),
        },
        sources: vec![SourceSettings {
            slug: DEFAULT_SOURCE.into(),
            write_keys: vec![Secret::new(DEMO_WRITE_KEY)],
            webhook_secret: None,
            refiner_api_key: Some(Secret::new(DEMO_REFINER_KEY)),
            webhook_format: Default::default(),
        }],
        ..Settings::default()
    };
    settings.validate().map_err(|e| e.to_string())?;
    let app = Application::build(&settings).map_err(|e| e.to_string())?;
    let gateway = format!("http://127.0.0.1:{}", app.port());
    let state = simulator.state();
    println!(
        "\nrefiner-gateway demo\n\
         \n  gateway            {gateway}   (write key: {DEMO_WRITE_KEY})\
         \n  Refiner simulator  {}   (API key: {DEMO_REFINER_KEY})\
         \n  spool              {}\
         \n\nSend an event:\n\
         \n  curl -u {DEMO_WRITE_KEY}: {gateway}/v1/identify -d '{{\"userId\":\"u1\",\"traits\":{{\"email\":\"ada@example.com\",\"plan\":\"pro\"}}}}'\
         \n  curl -u {DEMO_WRITE_KEY}: {gateway}/v1/track -d '{{\"userId\":\"u1\",\"event\":\"Signed Up\"}}'\
         \n\nSee what Refiner received:\n\
         \n  curl {}/_sim/state\
         \n  curl {gateway}/metrics\
         \n\nOr point a Segment library at it, e.g. Python:\n\
         \n  Client('{DEMO_WRITE_KEY}', host='{gateway}').track('u1', 'Signed Up')\
         \n\nCtrl-C stops both.\n",
        simulator.url(),
        options.data_dir.display(),
        simulator.base_url(),
    );
    let progress = tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let stats = state.stats();
            if stats.calls.total != seen {
                seen = stats.calls.total;
                println!(
                    "Refiner simulator: {} calls {:?}, {} contacts, {} accounts, {} events",
                    stats.calls.total,
                    stats.calls.by_status,
                    stats.contacts,
                    stats.accounts,
                    stats.events_total
                );
            }
        }
    });
    let result = app.run_until_stopped().await;
    progress.abort();
    simulator.stop().await;
    result.map_err(|e| format!("server error: {e}"))
}
