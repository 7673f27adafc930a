//! The distributed set-up every scenario runs on: a 3-server JetStream cluster
//! ([`NatsCluster`]), two real `refiner-gateway serve` processes with the JetStream spool
//! (three replicas, per-user window 1), the in-process Refiner simulator, and one group of
//! clients per node ([`Load`], prefix `a` and `b`). A client of a node that is down sends
//! to the other node until its own is back (a load balancer's failover).
//!
//! [`Fleet::settle`] stops the clients, waits for every accepted event to reach the
//! simulator and writes the figures every distributed scenario reports: accepted,
//! delivered (distinct accepted events seen by the simulator), lost, duplicates (2xx
//! calls beyond an event's first) and order violations (users whose first deliveries are
//! out of the order their events were accepted in).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use refiner_gateway::sim::{Faults, SimHandle};

use crate::cluster::NatsCluster;
use crate::harness::{metric_sum, metrics_text, scratch_dir, start_sim, wait_for, Gateway, Spec};
use crate::load::{event_id, Load, LoadSpec, Shared};
use crate::report::Report;
use crate::witness::{CallTimes, Delivered, Witness};

/// Partitions of the events stream.
pub const PARTITIONS: u32 = 8;
/// Client prefixes, one per node.
pub const PREFIXES: [&str; 2] = ["a", "b"];

/// How the clients load the nodes.
#[derive(Debug, Clone, Copy)]
pub struct Traffic {
    /// Clients per node.
    pub clients: usize,
    /// Users per client.
    pub users: usize,
    /// Events per request.
    pub batch: usize,
    /// Time between two requests of one client.
    pub pace: Duration,
    /// Extra bytes of properties per event.
    pub padding: usize,
}

impl Traffic {
    pub fn describe(&self) -> String {
        format!(
            "{} clients ({} per node) × {}-event batches every {} ms, {} users",
            self.clients * 2,
            self.clients,
            self.batch,
            self.pace.as_millis(),
            self.clients * 2 * self.users
        )
    }
}

pub struct Fleet {
    pub cluster: NatsCluster,
    pub sim: SimHandle,
    pub witness: Witness,
    pub nodes: Vec<Option<Gateway>>,
    specs: Vec<Spec>,
    pub loads: Vec<Load>,
    /// Users per client of the load.
    users: u64,
    /// Node starts that exited during start-up (and were started again).
    pub start_failures: usize,
    scratch: tempfile::TempDir,
    pub started: Instant,
}

impl Fleet {
    /// The simulator, two nodes on `cluster` (which must be running) and no load yet.
    pub async fn start(name: &str, cluster: NatsCluster, faults: Faults) -> Result<Fleet, String> {
        cluster.wait_ready(3, Duration::from_secs(60)).await?;
        let sim = start_sim(0, faults, 400_000).await;
        let witness = Witness::start(sim.state(), false);
        let scratch = scratch_dir(name);
        let specs: Vec<Spec> = (0..2)
            .map(|i| {
                node_spec(
                    &scratch.path().join(format!("node-{i}")),
                    &sim.url(),
                    &cluster,
                    i,
                )
            })
            .collect();
        let mut nodes = Vec::new();
        for spec in &specs {
            nodes.push(Some(
                Gateway::start(spec, scratch.path(), Duration::from_secs(60)).await,
            ));
        }
        let fleet = Fleet {
            cluster,
            sim,
            witness,
            nodes,
            specs,
            loads: Vec::new(),
            users: 1,
            start_failures: 0,
            scratch,
            started: Instant::now(),
        };
        fleet.wait_shared(Duration::from_secs(30)).await?;
        Ok(fleet)
    }

    /// Starts one group of clients per node.
    pub fn start_load(&mut self, traffic: Traffic) {
        self.users = traffic.users as u64;
        for (i, prefix) in PREFIXES.iter().enumerate() {
            let mut spec = LoadSpec::new(prefix, traffic.clients, traffic.batch, traffic.pace);
            spec.users = traffic.users;
            spec.padding = traffic.padding;
            spec.retry_cap = Duration::from_millis(500);
            self.loads.push(Load::start(spec, &self.address(i)));
        }
    }

    /// Where node `i`'s clients send: node `i`, or the other node while `i` is down.
    pub fn address(&self, i: usize) -> String {
        match (&self.nodes[i], &self.nodes[1 - i]) {
            (Some(node), _) | (None, Some(node)) => node.address.clone(),
            (None, None) => "http://127.0.0.1:9".into(),
        }
    }

    fn route_clients(&self) {
        for (i, load) in self.loads.iter().enumerate() {
            load.shared.set_address(&self.address(i));
        }
    }

    /// SIGKILLs node `i`; its clients go to the other node.
    pub async fn kill_node(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            node.kill().await;
        }
        self.route_clients();
    }

    /// SIGTERMs node `i` (a clean stop); its clients go to the other node first.
    pub async fn stop_node(&mut self, i: usize) -> Result<(), String> {
        let node = self.nodes[i].take();
        self.route_clients();
        match node {
            Some(node) => node.terminate().await,
            None => Ok(()),
        }
    }

    /// Starts node `i` again (fresh process, its own data dir) and gives it its clients
    /// back. Returns the time to `/readyz` 200.
    ///
    /// A node exits at start-up when JetStream does not answer its set-up in time (a
    /// cluster still settling after a server restart): it is started again after a second,
    /// as a supervisor (systemd, Kubernetes) does, up to ten times; such exits are counted
    /// in `start_failures`.
    pub async fn start_node(&mut self, i: usize) -> Duration {
        let spawned = Instant::now();
        for _ in 0..10 {
            let (spec, logs) = (self.specs[i].clone(), self.scratch.path().to_path_buf());
            // `Gateway::start` panics on an exit during start-up: caught here.
            let attempt =
                tokio::spawn(
                    async move { Gateway::start(&spec, &logs, Duration::from_secs(60)).await },
                );
            match attempt.await {
                Ok(node) => {
                    self.nodes[i] = Some(node);
                    self.route_clients();
                    return spawned.elapsed();
                }
                Err(e) if e.is_panic() => {
                    self.start_failures += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => panic!("starting node {i}: {e}"),
            }
        }
        panic!("node {i} did not start in 10 attempts");
    }

    /// Whether every node that should run still does.
    pub fn nodes_alive(&mut self) -> bool {
        self.nodes.iter_mut().flatten().all(Gateway::alive)
    }

    /// Waits until both nodes own partitions (each reports a share in `/metrics`).
    pub async fn wait_shared(&self, limit: Duration) -> Result<Duration, String> {
        let started = Instant::now();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| e.to_string())?;
        let addresses: Vec<String> = self
            .nodes
            .iter()
            .flatten()
            .map(|n| n.address.clone())
            .collect();
        wait_for(limit, "both nodes own partitions", || {
            let (client, addresses) = (client.clone(), addresses.clone());
            async move {
                let mut owned = Vec::new();
                for address in &addresses {
                    let text = metrics_text(&client, address).await?;
                    owned.push(metric_sum(&text, "gateway_nats_partitions_owned", &[]) as u32);
                }
                let all = owned.iter().sum::<u32>() == PARTITIONS;
                if all && owned.iter().all(|n| *n > 0) {
                    Ok(())
                } else {
                    Err(format!("partitions owned per node: {owned:?}"))
                }
            }
        })
        .await?;
        Ok(started.elapsed())
    }

    /// Events answered 200 so far, over every client.
    pub fn acked(&self) -> u64 {
        self.loads.iter().map(|l| l.shared.acked()).sum()
    }

    /// Answers of a status so far, over every client.
    pub fn answers(&self, status: &str) -> u64 {
        self.loads
            .iter()
            .map(|l| l.shared.status_counts().get(status).copied().unwrap_or(0))
            .sum()
    }

    /// Stops the clients, waits (at most `drain_limit`, or `RELIABILITY_DRAIN_SECS` when
    /// set) until every event answered 200 reached the simulator, and reports the standard
    /// figures and checks.
    pub async fn settle(mut self, report: &mut Report, drain_limit: Duration) {
        let drain_limit = std::env::var("RELIABILITY_DRAIN_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(drain_limit, Duration::from_secs);
        let mut shared = Vec::new();
        for load in std::mem::take(&mut self.loads) {
            shared.push(load.stop().await);
        }
        let accepted_ids = accepted_ids(&shared);
        let accepted = accepted_ids.len() as u64;
        let stopped = Instant::now();
        let missing = wait_for(drain_limit, "every accepted event delivered", || {
            let missing = accepted_ids
                .iter()
                .filter(|id| !self.witness.with(|d| d.contains(id)))
                .count();
            async move {
                if missing == 0 {
                    Ok(())
                } else {
                    Err(format!("{missing} accepted events not delivered"))
                }
            }
        })
        .await;
        let drained = stopped.elapsed();
        // Redeliveries of a partition's unacked events happen within a lease or a take-over:
        // a short quiet period lets late duplicates be counted too.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let delivered = self.witness.clone().finish();
        let lost = accepted_ids
            .iter()
            .filter(|id| !delivered.contains(id))
            .count() as u64;
        let violations = order_violations(&delivered, &shared, self.users);
        let statuses = merged_statuses(&shared);
        let unexpected: Vec<String> = shared
            .iter()
            .flat_map(|s| s.unexpected.lock().expect("lock").clone())
            .collect();
        let no_retry_after: u64 = shared
            .iter()
            .map(|s| {
                s.missing_retry_after
                    .load(std::sync::atomic::Ordering::SeqCst)
            })
            .sum();
        report.figure(
            "duration",
            format!("{:.0} s", self.started.elapsed().as_secs_f64()),
        );
        report.figure("accepted", accepted);
        report.figure("delivered", accepted - lost);
        report.figure("lost", lost);
        report.figure("duplicates", delivered.duplicates());
        report.figure("order violations", violations.len());
        report.figure("ingest answers", format!("{statuses:?}"));
        report.figure("Refiner calls", format!("{:?}", delivered.statuses));
        report.figure(
            "drained after the load stopped",
            crate::report::secs(drained),
        );
        report.check(
            "every event answered 2xx was delivered (lost = 0)",
            lost == 0,
            match &missing {
                Ok(()) => format!("{accepted} accepted, all delivered"),
                Err(e) => e.clone(),
            },
        );
        report.check(
            "per-user order of first deliveries kept",
            violations.is_empty(),
            format!(
                "{} users out of order: {:?}",
                violations.len(),
                &violations[..violations.len().min(5)]
            ),
        );
        report.check(
            "only 200, 429 or 503 answers (or a broken connection to a killed node)",
            unexpected.is_empty(),
            format!("unexpected: {:?}", &unexpected[..unexpected.len().min(5)]),
        );
        report.check(
            "every 429/503 carried Retry-After",
            no_retry_after == 0,
            format!("{no_retry_after} without"),
        );
        let alive = self.nodes_alive();
        report.check(
            "the running nodes stayed up",
            alive,
            format!("alive: {alive}"),
        );
        report.elapsed = self.started.elapsed();
        for node in self.nodes.iter_mut().flatten() {
            let _ = node.child.start_kill();
        }
        self.sim.stop().await;
    }

    /// The last lines of each running node's stderr.
    pub fn node_logs(&self) -> String {
        self.nodes
            .iter()
            .flatten()
            .map(Gateway::stderr_tail)
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

/// A node's configuration: the JetStream spool with three replicas on `cluster`.
fn node_spec(data_dir: &std::path::Path, sim_url: &str, cluster: &NatsCluster, i: usize) -> Spec {
    let mut spec = Spec::new(data_dir, sim_url)
        .delivery("per_user_window", 1)
        .spool("backend", "\"nats\"");
    spec.top.push((
        "nats",
        format!(
            "{{ url = \"{}\", replicas = 3, partitions = {PARTITIONS}, ownership_ttl_secs = 2, \
             publish_timeout_ms = 2000, node_name = \"node-{i}\" }}",
            cluster.urls()
        ),
    ));
    // JetStream reserves a stream's max_bytes on every replica's server: the delivery log's
    // default would not fit the small stores of the disk-full scenarios.
    spec.top
        .push(("delivery_log", "{ max_bytes = 65536 }".to_owned()));
    spec
}

/// Every event answered 200: `n < acked_upto[k]` of each client of each group.
fn accepted_ids(shared: &[Arc<Shared>]) -> Vec<String> {
    let mut ids = Vec::new();
    for (prefix, shared) in PREFIXES.iter().zip(shared) {
        for (k, upto) in shared.acked_upto.iter().enumerate() {
            let upto = upto.load(std::sync::atomic::Ordering::SeqCst);
            ids.extend((0..upto).map(|n| event_id(prefix, k, n)));
        }
    }
    ids
}

fn merged_statuses(shared: &[Arc<Shared>]) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for s in shared {
        for (status, count) in s.status_counts() {
            *out.entry(status).or_default() += count;
        }
    }
    out
}

/// Users whose accepted events were first delivered out of the order they were accepted
/// in (a client sends a user's events in order and moves on only after a 200).
fn order_violations(delivered: &Delivered, shared: &[Arc<Shared>], users: u64) -> Vec<String> {
    let mut violations = Vec::new();
    for (prefix, shared) in PREFIXES.iter().zip(shared) {
        for (k, upto) in shared.acked_upto.iter().enumerate() {
            let upto = upto.load(std::sync::atomic::Ordering::SeqCst);
            // user → (the latest first delivery so far, of which event)
            let mut last: HashMap<u64, (CallTimes, u64)> = HashMap::new();
            for n in 0..upto {
                let Some(&(_, first)) = delivered.tracks.get(&event_id(prefix, k, n)) else {
                    continue;
                };
                let user = n % users;
                match last.get(&user) {
                    Some(&(previous, m)) if previous.seq > first.seq => {
                        violations.push(format!(
                            "{prefix}-u{k}-{user}: event {n} first delivered at {} ms, before \
                             event {m} at {} ms",
                            first.at_ms, previous.at_ms
                        ));
                    }
                    _ => {
                        last.insert(user, (first, n));
                    }
                }
            }
        }
    }
    violations.sort();
    violations.dedup();
    violations
}
