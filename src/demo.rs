//! `refiner-gateway demo`: the gateway and a Refiner simulator on loopback, wired together,
//! so events can be seen flowing end to end without a Refiner account.
//!
//! The simulator stands in for `api.refiner.io`; the gateway is the production code with
//! the embedded spool in `data_dir`. Both stop on Ctrl-C / SIGTERM. Nothing leaves
//! 127.0.0.1.
//!
//! The web console is at `/console` on the gateway's address (the banner prints it); it
//! signs in with the admin token.
//!
//! The management API is on: the admin token is made once, kept in `data_dir/admin-token`
//! (readable by the user alone) and printed, so the same token works after a restart and
//! scripts can read it. The simulator keeps what it received in memory only: after a
//! restart it starts empty, while the gateway's spool keeps everything it accepted (the
//! banner says so, lest the empty simulator look like lost data).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::{Secret, Settings, SourceSettings, DEFAULT_SOURCE};
use crate::sim::{self, SimOptions};
use crate::startup::Application;

/// The write key the demo accepts.
pub const DEMO_WRITE_KEY: &str = "demo-write-key";
/// The API key the demo's simulator accepts and the gateway sends.
pub const DEMO_REFINER_KEY: &str = "demo-refiner-key";

/// The file in the demo's data directory that holds its admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

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
    let admin_token = admin_token(&options.data_dir)?;
    let settings = Settings {
        listen: options.listen.clone(),
        data_dir: options.data_dir.clone(),
        admin_token: Some(Secret::new(admin_token.clone())),
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
    let app = Application::build(&settings)
        .await
        .map_err(|e| e.to_string())?;
    let gateway = format!("http://127.0.0.1:{}", app.port());
    let state = simulator.state();
    // Both servers are bound and accepting: the banner is the last thing start-up prints.
    println!(
        "{}",
        banner(&Banner {
            gateway: &gateway,
            simulator: &simulator.base_url(),
            data_dir: &options.data_dir,
            admin_token: &admin_token,
        })
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

/// The demo's admin token: the one in `data_dir/admin-token`, or a new random one written
/// there (the data directory is created as the gateway creates it, private to the user).
fn admin_token(data_dir: &Path) -> Result<String, String> {
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    if let Ok(text) = std::fs::read_to_string(&path) {
        let token = text.trim();
        if token.len() >= 16 {
            return Ok(token.to_string());
        }
    }
    crate::datadir::prepare(data_dir).map_err(|e| e.to_string())?;
    let token = format!("demo-admin-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(&path, format!("{token}\n"))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(token)
}

/// What the banner names.
struct Banner<'a> {
    gateway: &'a str,
    simulator: &'a str,
    data_dir: &'a Path,
    admin_token: &'a str,
}

/// The start-up banner: addresses, keys, and the next steps as commands to paste.
fn banner(b: &Banner) -> String {
    let Banner {
        gateway,
        simulator,
        admin_token,
        ..
    } = *b;
    let data_dir = b.data_dir.display();
    let token_file = b.data_dir.join(ADMIN_TOKEN_FILE);
    let token_file = token_file.display();
    format!(
        "\nrefiner-gateway demo\n\
         \n  gateway            {gateway}   (write key: {DEMO_WRITE_KEY})\
         \n  Refiner simulator  {simulator}/v1   (API key: {DEMO_REFINER_KEY})\
         \n  spool              {data_dir}\
         \n  admin token        {admin_token}   (also in {token_file})\
         \n\nOpen the console and sign in with the admin token:\n\
         \n  {gateway}/console\
         \n\nSend an event:\n\
         \n  curl -u {DEMO_WRITE_KEY}: {gateway}/v1/identify -d '{{\"userId\":\"u1\",\"traits\":{{\"email\":\"ada@example.com\",\"plan\":\"pro\"}}}}'\
         \n  curl -u {DEMO_WRITE_KEY}: {gateway}/v1/track -d '{{\"userId\":\"u1\",\"event\":\"Signed Up\"}}'\
         \n\nSee what Refiner received:\n\
         \n  curl {simulator}/_sim/state\
         \n\nAsk the gateway (management API and metrics):\n\
         \n  curl -H 'Authorization: Bearer {admin_token}' {gateway}/api/profile/default\
         \n  curl -H 'Authorization: Bearer {admin_token}' {gateway}/api/events/default/dead-letters\
         \n  refiner-gateway dead-letters list --url {gateway} --token {admin_token}\
         \n  curl {gateway}/metrics\
         \n\nOr point a Segment library at it, e.g. Python:\n\
         \n  Client('{DEMO_WRITE_KEY}', host='{gateway}').track('u1', 'Signed Up')\
         \n\nThe simulator keeps what it received in memory: after a restart it starts empty,\
         \nwhile the spool in {data_dir} keeps what the gateway accepted.\
         \nCtrl-C stops both.\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_token_is_made_once_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("demo-data");
        let first = admin_token(&data_dir).expect("token");
        assert!(first.len() >= 16, "{first}");
        assert_eq!(admin_token(&data_dir).expect("token"), first);
        let kept = std::fs::read_to_string(data_dir.join(ADMIN_TOKEN_FILE)).expect("file");
        assert_eq!(kept.trim(), first);
    }

    #[test]
    fn the_banner_gives_the_token_and_the_next_steps() {
        let text = banner(&Banner {
            gateway: "http://127.0.0.1:18080",
            simulator: "http://127.0.0.1:18090",
            data_dir: Path::new("./demo-data"),
            admin_token: "demo-admin-0123456789abcdef",
        });
        for expected in [
            "admin token        demo-admin-0123456789abcdef   (also in ./demo-data/admin-token)",
            "curl -H 'Authorization: Bearer demo-admin-0123456789abcdef' http://127.0.0.1:18080/api/events/default/dead-letters",
            "refiner-gateway dead-letters list --url http://127.0.0.1:18080 --token demo-admin-0123456789abcdef",
            "curl http://127.0.0.1:18090/_sim/state",
            "Open the console and sign in with the admin token:\n\n  http://127.0.0.1:18080/console\n",
            "keeps what it received in memory",
        ] {
            assert!(text.contains(expected), "{expected:?} not in:\n{text}");
        }
    }
}
