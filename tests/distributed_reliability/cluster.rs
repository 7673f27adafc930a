//! A JetStream cluster of real `nats-server` processes on loopback, each started from a
//! configuration file of its own (client port, cluster port, routes to every member, store
//! directory, and optionally a `max_file_store` limit), so that each member can be
//! SIGKILLed and started again on the same ports and store, one at a time or all together.
//!
//! The binary is found as `spool::nats::testing` finds it (`NATS_SERVER_BIN`, else the
//! `PATH`); a missing one is reported by [`NatsCluster::start`] returning `None` after saying
//! why, which `support/deps.rs` turns into a failure (or a skip when asked for).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;

use crate::harness::free_port;

/// One member of the cluster.
pub struct Member {
    pub name: String,
    pub port: u16,
    cluster_port: u16,
    store: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Member {
    /// Whether the process is running.
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The last lines of the server's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// A cluster of `nats-server`s with JetStream, routes between all of them.
pub struct NatsCluster {
    pub members: Vec<Member>,
    routes: Vec<String>,
    binary: PathBuf,
    dir: tempfile::TempDir,
}

impl NatsCluster {
    /// Starts `n` servers for `test`; `max_file_store` (bytes) limits each server's
    /// JetStream file storage. `None` (after printing why) without a usable binary.
    pub fn start(test: &str, n: usize, max_file_store: Option<u64>) -> Option<NatsCluster> {
        let Some(binary) = refiner_gateway::spool::nats::testing::binary() else {
            let _ = writeln!(
                std::io::stderr(),
                "{test}: no nats-server binary (set NATS_SERVER_BIN or put one on the PATH)"
            );
            return None;
        };
        let runs = Command::new(&binary)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !runs {
            let _ = writeln!(
                std::io::stderr(),
                "{test}: {} does not run",
                binary.display()
            );
            return None;
        }
        let dir = crate::harness::scratch_dir("nats");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|(_, cluster)| format!("\"nats://127.0.0.1:{cluster}\""))
            .collect();
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, (port, cluster_port))| {
                let name = format!("n{i}");
                Member {
                    log: dir.path().join(format!("{name}.log")),
                    config: dir.path().join(format!("{name}.conf")),
                    store: dir.path().join(format!("{name}-store")),
                    name,
                    port: *port,
                    cluster_port: *cluster_port,
                    child: None,
                }
            })
            .collect();
        let mut cluster = NatsCluster {
            members,
            routes,
            binary,
            dir,
        };
        cluster.set_max_file_store(max_file_store);
        for i in 0..n {
            cluster.spawn(i);
        }
        Some(cluster)
    }

    /// Every member's URL, comma separated (clients fail over between them).
    pub fn urls(&self) -> String {
        self.members
            .iter()
            .map(Member::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Rewrites every member's configuration with this `max_file_store` (bytes; `None`:
    /// the server's default), for the next start of each.
    pub fn set_max_file_store(&mut self, max_file_store: Option<u64>) {
        let limit = max_file_store
            .map(|bytes| format!("  max_file_store: {bytes}\n"))
            .unwrap_or_default();
        for member in &self.members {
            let text = format!(
                "server_name: {}\nlisten: \"127.0.0.1:{}\"\n\
                 jetstream {{\n  store_dir: {:?}\n{limit}}}\n\
                 cluster {{\n  name: reliability\n  listen: \"127.0.0.1:{}\"\n  \
                 routes: [{}]\n}}\n",
                member.name,
                member.port,
                member.store,
                member.cluster_port,
                self.routes.join(", ")
            );
            std::fs::write(&member.config, text).expect("write the server config");
        }
    }

    /// Starts member `i` (on its ports and store) and waits until it listens.
    pub fn spawn(&mut self, i: usize) {
        let member = &mut self.members[i];
        assert!(member.child.is_none(), "{} is running", member.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&member.log)
            .expect("server log");
        let mut child = Command::new(&self.binary)
            .arg("-c")
            .arg(&member.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", member.port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "nats-server {} exited at start-up ({status}): {}",
                    member.name,
                    member.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "nats-server {} did not listen on {}",
                member.name,
                member.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        member.child = Some(child);
    }

    /// SIGKILLs member `i` (a crash: the store stays) and waits for it to be gone.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs member `i` (a clean stop, as a rolling restart does) and waits up to 30 s.
    pub fn terminate(&mut self, i: usize) {
        let Some(mut child) = self.members[i].child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while matches!(child.try_wait(), Ok(None)) {
            if Instant::now() > deadline {
                let _ = child.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until JetStream takes a replicated stream across the running members (a meta
    /// leader is elected and enough peers are current), by creating and deleting a probe
    /// stream with `replicas`, and until every existing stream has a leader and every
    /// replica current (a restarted server has caught up), as an operator waits before
    /// restarting the next server.
    pub async fn wait_ready(&self, replicas: usize, limit: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < limit {
            let ready = match probe(&self.urls(), replicas).await {
                Ok(()) => streams_current(&self.urls()).await,
                Err(e) => Err(e),
            };
            match ready {
                Ok(()) => return Ok(started.elapsed()),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(format!(
            "the cluster did not take an R{replicas} stream within {limit:?}: {last}"
        ))
    }

    /// Caps the stream `name` at `max_bytes`, refusing new messages beyond (an operator's
    /// limit on the stream itself, as opposed to the server's store).
    pub async fn limit_stream(&self, name: &str, max_bytes: i64) -> Result<(), String> {
        let js = jetstream::new(connect(&self.urls()).await?);
        let mut stream = js.get_stream(name).await.map_err(|e| e.to_string())?;
        let mut config = stream
            .info()
            .await
            .map_err(|e| e.to_string())?
            .config
            .clone();
        config.max_bytes = max_bytes;
        config.discard = jetstream::stream::DiscardPolicy::New;
        js.update_stream(config).await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The scratch directory (configs, logs, stores).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

async fn connect(urls: &str) -> Result<async_nats::Client, String> {
    let servers: Vec<async_nats::ServerAddr> =
        urls.split(',').filter_map(|u| u.parse().ok()).collect();
    tokio::time::timeout(
        Duration::from_secs(3),
        async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(servers),
    )
    .await
    .map_err(|_| "connect timed out".to_string())?
    .map_err(|e| e.to_string())
}

/// Every stream has a leader and all its replicas current and online.
async fn streams_current(urls: &str) -> Result<(), String> {
    use futures_util::StreamExt;
    let js = jetstream::new(connect(urls).await?);
    let names: Vec<String> = js
        .stream_names()
        .filter_map(|name| async move { name.ok() })
        .collect()
        .await;
    for name in names.iter().filter(|n| !n.starts_with("PROBE_")) {
        let mut stream = js
            .get_stream(name)
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        let info = stream.info().await.map_err(|e| format!("{name}: {e}"))?;
        let cluster = info.cluster.clone().unwrap_or_default();
        let behind: Vec<&str> = cluster
            .replicas
            .iter()
            .filter(|peer| !peer.current || peer.offline)
            .map(|peer| peer.name.as_str())
            .collect();
        if cluster.leader.is_none() || !behind.is_empty() {
            return Err(format!(
                "stream {name}: leader {:?}, replicas not current: {behind:?}",
                cluster.leader
            ));
        }
    }
    Ok(())
}

async fn probe(urls: &str, replicas: usize) -> Result<(), String> {
    let js = jetstream::new(connect(urls).await?);
    let name = format!("PROBE_{}", uuid::Uuid::new_v4().simple());
    let created = tokio::time::timeout(
        Duration::from_secs(5),
        js.create_stream(jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![format!("probe.{name}")],
            num_replicas: replicas,
            storage: jetstream::stream::StorageType::Memory,
            ..Default::default()
        }),
    )
    .await;
    let result = match created {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("create stream timed out".into()),
    };
    let _ = js.delete_stream(&name).await;
    result
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
