//! The distributed scenarios, each on a [`Fleet`] (3-server R3 JetStream cluster, two
//! gateway nodes, the simulator, clients on both nodes), each with a quick form (CI) and a
//! long form (`RELIABILITY_LONG=1`):
//!
//! - **Kill loop**: gateway nodes and `nats-server`s SIGKILLed in turn under load, each
//!   started again after a pause (one process down at a time, so the cluster keeps its
//!   quorum).
//! - **JetStream outage**: every server SIGKILLed at once, then started again: ingest
//!   answers 503 with `Retry-After` while down and accepts nothing, recovers by itself.
//! - **JetStream disk full**: servers with a small `max_file_store` and Refiner refusing
//!   every call (nothing drains): ingest answers 503 once the store is full; Refiner comes
//!   back, the consumers drain the work queue, space is freed and ingest recovers.
//! - **Rolling restart**: each server, then each node, stopped cleanly (SIGTERM) and
//!   started again, one at a time, under load.
//!
//! Every scenario ends in [`Fleet::settle`]: 0 accepted events lost, duplicates counted,
//! per-user order of first deliveries checked.

use std::time::{Duration, Instant};

use refiner_gateway::sim::Faults;

use crate::cluster::NatsCluster;
use crate::fleet::{Fleet, Traffic};
use crate::harness::wait_for;
use crate::report::{secs, Report};

/// Whether the long forms were asked for.
pub fn long() -> bool {
    std::env::var("RELIABILITY_LONG").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn traffic(clients: usize, batch: usize, pace_ms: u64) -> Traffic {
    Traffic {
        clients,
        users: 50,
        batch,
        pace: Duration::from_millis(pace_ms),
        padding: 0,
    }
}

/// A cluster for `test`, or `None` when the JetStream tests are skipped (`deps::nats`).
fn cluster(test: &str, max_file_store: Option<u64>) -> Option<NatsCluster> {
    crate::deps::nats(test, |test| NatsCluster::start(test, 3, max_file_store))
}

async fn fleet(test: &str, cluster: NatsCluster, faults: Faults) -> Fleet {
    match Fleet::start(test, cluster, faults).await {
        Ok(fleet) => fleet,
        Err(e) => panic!("{test}: the fleet did not start: {e}"),
    }
}

// ---------------------------------------------------------------------------------------
// Kill loop

#[derive(Debug, Clone)]
pub struct KillParams {
    pub cycles: usize,
    /// Load between two kills: a random time in this range (ms).
    pub cycle_ms: (u64, u64),
    /// How long a killed process stays down.
    pub pause: Duration,
    pub traffic: Traffic,
    pub drain_limit: Duration,
    pub seed: u64,
}

impl KillParams {
    pub fn quick() -> KillParams {
        KillParams {
            cycles: 5,
            cycle_ms: (1000, 2500),
            pause: Duration::from_millis(1000),
            traffic: traffic(2, 10, 40),
            // Past one `nats.ack_wait_secs` (60 s) after the last kill: a delivery that went
            // out through a killed server and was the partition's last one leaves no gap to
            // notice, and JetStream delivers it again only when its ack wait ends.
            drain_limit: Duration::from_secs(150),
            seed: 19,
        }
    }

    pub fn long() -> KillParams {
        KillParams {
            cycles: 20,
            cycle_ms: (2000, 6000),
            pause: Duration::from_secs(2),
            traffic: traffic(3, 10, 25),
            drain_limit: Duration::from_secs(180),
            seed: 19,
        }
    }
}

/// What a cycle kills.
#[derive(Debug, Clone, Copy)]
enum Target {
    Node(usize),
    Server(usize),
}

/// Nodes and servers in turn: every process is killed once every five cycles.
const TARGETS: [Target; 5] = [
    Target::Node(0),
    Target::Server(0),
    Target::Node(1),
    Target::Server(1),
    Target::Server(2),
];

pub async fn kill_loop(test: &str, params: KillParams) -> Option<Report> {
    let cluster = cluster(test, None)?;
    let mut report = Report::new("Kill loop (2 nodes, 3 servers)");
    report.ran = format!(
        "{} SIGKILL/restart cycles, gateway nodes and nats-servers in turn, each after a \
         random {}–{} ms of load and down for {}; {}; seed {}",
        params.cycles,
        params.cycle_ms.0,
        params.cycle_ms.1,
        secs(params.pause),
        params.traffic.describe(),
        params.seed
    );
    let mut fleet = fleet(test, cluster, Faults::none()).await;
    fleet.start_load(params.traffic);
    let mut rng = fastrand::Rng::with_seed(params.seed);
    let (mut node_ready, mut cluster_ready) = (Vec::new(), Vec::new());
    let (mut node_kills, mut server_kills) = (0, 0);
    let mut stuck = None;
    for cycle in 0..params.cycles {
        let wait = rng.u64(params.cycle_ms.0..=params.cycle_ms.1);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        match TARGETS[cycle % TARGETS.len()] {
            Target::Node(i) => {
                fleet.kill_node(i).await;
                node_kills += 1;
                tokio::time::sleep(params.pause).await;
                node_ready.push(fleet.start_node(i).await);
            }
            Target::Server(i) => {
                fleet.cluster.kill(i);
                server_kills += 1;
                tokio::time::sleep(params.pause).await;
                fleet.cluster.spawn(i);
                match fleet.cluster.wait_ready(3, Duration::from_secs(60)).await {
                    Ok(ready) => cluster_ready.push(ready),
                    Err(e) => {
                        // Reported, and the accepted events still checked.
                        stuck = Some(format!("cycle {cycle}, server {i} restarted: {e}"));
                        break;
                    }
                }
            }
        }
    }
    // Some load after the last restart, so the last restarted process carries traffic.
    tokio::time::sleep(Duration::from_millis(params.cycle_ms.0)).await;
    report.figure(
        "kills",
        format!("{node_kills} of nodes, {server_kills} of servers"),
    );
    report.figure("node restart to /readyz 200", spread(&node_ready));
    report.figure(
        "server restart to an R3 stream accepted",
        spread(&cluster_ready),
    );
    report.check(
        "the cluster took replicated streams again after every server restart",
        stuck.is_none(),
        stuck.unwrap_or_else(|| format!("{server_kills} restarts")),
    );
    fleet.settle(&mut report, params.drain_limit).await;
    Some(report)
}

/// Median and maximum of durations.
fn spread(durations: &[Duration]) -> String {
    if durations.is_empty() {
        return "—".into();
    }
    let mut sorted = durations.to_vec();
    sorted.sort();
    format!(
        "median {}, max {}",
        secs(sorted[sorted.len() / 2]),
        secs(sorted[sorted.len() - 1])
    )
}

// ---------------------------------------------------------------------------------------
// JetStream outage

#[derive(Debug, Clone)]
pub struct OutageParams {
    pub warmup: Duration,
    /// How long every server stays down.
    pub down: Duration,
    pub traffic: Traffic,
    pub drain_limit: Duration,
}

impl OutageParams {
    pub fn quick() -> OutageParams {
        OutageParams {
            warmup: Duration::from_secs(3),
            down: Duration::from_secs(6),
            traffic: traffic(2, 10, 40),
            drain_limit: Duration::from_secs(60),
        }
    }

    pub fn long() -> OutageParams {
        OutageParams {
            warmup: Duration::from_secs(20),
            down: Duration::from_secs(60),
            traffic: traffic(3, 10, 25),
            drain_limit: Duration::from_secs(180),
        }
    }
}

/// What `/readyz` answers on a node.
async fn readyz(fleet: &Fleet, i: usize) -> String {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    match client
        .get(format!("{}/readyz", fleet.address(i)))
        .send()
        .await
    {
        Ok(response) => response.status().as_u16().to_string(),
        Err(e) => format!("error: {e}"),
    }
}

pub async fn outage(test: &str, params: OutageParams) -> Option<Report> {
    let cluster = cluster(test, None)?;
    let mut report = Report::new("JetStream outage (all 3 servers)");
    report.ran = format!(
        "{} of load, then every nats-server SIGKILLed for {}, then started again on the same \
         stores; {}",
        secs(params.warmup),
        secs(params.down),
        params.traffic.describe()
    );
    let mut fleet = fleet(test, cluster, Faults::none()).await;
    fleet.start_load(params.traffic);
    tokio::time::sleep(params.warmup).await;
    let before = fleet.acked();
    for i in 0..3 {
        fleet.cluster.kill(i);
    }
    // A request JetStream acknowledged just before the kill may be answered a moment
    // later; the outage is counted from one second after the last server was gone.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (down_from, refused_from) = (fleet.acked(), fleet.answers("503"));
    tokio::time::sleep(params.down.saturating_sub(Duration::from_secs(1))).await;
    let (down_to, refused_to) = (fleet.acked(), fleet.answers("503"));
    let ready_while_down = readyz(&fleet, 0).await;
    let alive = fleet.nodes_alive();
    for i in 0..3 {
        fleet.cluster.spawn(i);
    }
    let restarted = Instant::now();
    let recovered = wait_for(Duration::from_secs(90), "ingest accepts again", || {
        let acked = fleet.acked();
        async move {
            if acked > down_to + 100 {
                Ok(())
            } else {
                Err(format!("{} accepted since the restart", acked - down_to))
            }
        }
    })
    .await;
    let recovery = restarted.elapsed();
    tokio::time::sleep(params.warmup.min(Duration::from_secs(5))).await;
    report.figure("accepted before the outage", before);
    report.figure("answered 503 while down", refused_to - refused_from);
    report.figure("accepted while down", down_to - down_from);
    report.figure("/readyz while down", &ready_while_down);
    report.figure("ingest accepting again after the restart", secs(recovery));
    report.check(
        "nothing accepted while every server was down",
        down_to == down_from,
        format!("{} events answered 200 while down", down_to - down_from),
    );
    report.check(
        "ingest answered 503 while down",
        refused_to > refused_from,
        format!("{} answers 503", refused_to - refused_from),
    );
    report.check(
        "the nodes stayed up during the outage",
        alive,
        format!("alive: {alive}"),
    );
    report.check(
        "ingest recovered by itself",
        recovered.is_ok(),
        recovered
            .err()
            .unwrap_or_else(|| format!("after {}", secs(recovery))),
    );
    fleet.settle(&mut report, params.drain_limit).await;
    Some(report)
}

// ---------------------------------------------------------------------------------------
// JetStream disk full

/// What fills up.
#[derive(Debug, Clone, Copy)]
pub enum StoreLimit {
    /// Each server's `max_file_store` (bytes): nats-server disables JetStream on a server
    /// whose store is full, so space is freed by restarting the servers with a larger
    /// limit (the second figure), as an operator grows the volumes.
    Server(u64, u64),
    /// The events stream's `max_bytes` (discard new): the stream refuses new messages
    /// until the consumers drain it (a work queue deletes what is acknowledged).
    Stream(i64),
}

#[derive(Debug, Clone)]
pub struct DiskParams {
    pub limit: StoreLimit,
    /// How long the 503s are held once the store is full.
    pub hold: Duration,
    pub traffic: Traffic,
    pub drain_limit: Duration,
}

impl DiskParams {
    fn sized(limit: StoreLimit, hold_secs: u64, clients: usize) -> DiskParams {
        DiskParams {
            limit,
            hold: Duration::from_secs(hold_secs),
            traffic: Traffic {
                padding: 400,
                ..traffic(clients, 20, 20)
            },
            drain_limit: Duration::from_secs(180),
        }
    }

    pub fn quick_server() -> DiskParams {
        DiskParams::sized(StoreLimit::Server(4 << 20, 64 << 20), 3, 2)
    }

    pub fn long_server() -> DiskParams {
        DiskParams::sized(StoreLimit::Server(32 << 20, 256 << 20), 30, 3)
    }

    pub fn quick_stream() -> DiskParams {
        DiskParams::sized(StoreLimit::Stream(2 << 20), 3, 2)
    }

    pub fn long_stream() -> DiskParams {
        DiskParams::sized(StoreLimit::Stream(16 << 20), 30, 3)
    }
}

fn describe_limit(limit: StoreLimit) -> String {
    match limit {
        StoreLimit::Server(bytes, grown) => format!(
            "servers with max_file_store = {} KiB, restarted with {} KiB to free space",
            bytes >> 10,
            grown >> 10
        ),
        StoreLimit::Stream(bytes) => format!(
            "the events stream capped at max_bytes = {} KiB (discard new), freed by the \
             consumers draining it",
            bytes >> 10
        ),
    }
}

pub async fn disk_full(test: &str, params: DiskParams) -> Option<Report> {
    let server_limit = match params.limit {
        StoreLimit::Server(bytes, _) => Some(bytes),
        StoreLimit::Stream(_) => None,
    };
    let cluster = cluster(test, server_limit)?;
    let mut report = Report::new(match params.limit {
        StoreLimit::Server(..) => "JetStream disk full (server store)",
        StoreLimit::Stream(_) => "JetStream disk full (stream max_bytes)",
    });
    report.ran = format!(
        "{}; Refiner refusing every call (503) so nothing drains until ingest answers 503, \
         503s held for {}, then Refiner back; {}, ~{} B padding per event",
        describe_limit(params.limit),
        secs(params.hold),
        params.traffic.describe(),
        params.traffic.padding
    );
    let refusing = Faults {
        rate_503: 1.0,
        ..Faults::none()
    };
    let mut fleet = fleet(test, cluster, refusing).await;
    if let StoreLimit::Stream(bytes) = params.limit {
        if let Err(e) = fleet.cluster.limit_stream("GATEWAY_EVENTS", bytes).await {
            panic!("{test}: cannot cap the events stream: {e}");
        }
    }
    fleet.start_load(params.traffic);
    let filled = Instant::now();
    let full = wait_for(Duration::from_secs(120), "ingest answers 503", || {
        let refused = fleet.answers("503");
        async move {
            if refused > 0 {
                Ok(())
            } else {
                Err("no 503 yet".to_string())
            }
        }
    })
    .await;
    let fill_time = filled.elapsed();
    let (full_at, refused_from) = (fleet.acked(), fleet.answers("503"));
    tokio::time::sleep(params.hold).await;
    let (held_to, refused_to) = (fleet.acked(), fleet.answers("503"));
    let ready_while_full = readyz(&fleet, 0).await;
    let alive = fleet.nodes_alive();
    let freed = Instant::now();
    if let StoreLimit::Server(_, grown) = params.limit {
        free_server_space(&mut fleet, grown).await;
    }
    fleet
        .sim
        .state()
        .set_faults(Faults::none())
        .expect("valid faults");
    let resumed = wait_for(Duration::from_secs(120), "ingest accepts again", || {
        let (acked, refused) = (fleet.acked(), fleet.answers("503"));
        async move {
            if acked > held_to + 500 {
                Ok(())
            } else {
                Err(format!(
                    "{} accepted since space was freed, {refused} answers 503 in all",
                    acked - held_to
                ))
            }
        }
    })
    .await;
    let resume_time = freed.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    report.figure("accepted until the first 503", full_at);
    report.figure("filled in", secs(fill_time));
    report.figure(
        "during the hold",
        format!(
            "{} answers 503, {} events accepted",
            refused_to - refused_from,
            held_to - full_at
        ),
    );
    report.figure("/readyz while full", &ready_while_full);
    report.figure(
        "ingest accepting again after space was freed",
        secs(resume_time),
    );
    report.check(
        "the store filled and ingest answered 503",
        full.is_ok() && refused_to > refused_from,
        full.err().unwrap_or_else(|| {
            format!("{} answers 503 during the hold", refused_to - refused_from)
        }),
    );
    report.check(
        "the nodes stayed up while full",
        alive,
        format!("alive: {alive}"),
    );
    report.check(
        "ingest recovered once space was freed",
        resumed.is_ok(),
        resumed
            .err()
            .unwrap_or_else(|| format!("after {}", secs(resume_time))),
    );
    fleet.settle(&mut report, params.drain_limit).await;
    Some(report)
}

/// Restarts every server with a larger `max_file_store`, one at a time.
async fn free_server_space(fleet: &mut Fleet, grown: u64) {
    fleet.cluster.set_max_file_store(Some(grown));
    for i in 0..fleet.cluster.members.len() {
        fleet.cluster.terminate(i);
        fleet.cluster.spawn(i);
    }
    if let Err(e) = fleet.cluster.wait_ready(3, Duration::from_secs(60)).await {
        panic!("the cluster did not come back with more space: {e}");
    }
}

// ---------------------------------------------------------------------------------------
// Rolling restart

#[derive(Debug, Clone)]
pub struct RollingParams {
    pub rounds: usize,
    /// Load between two restarts.
    pub gap: Duration,
    /// How long a stopped process stays down.
    pub pause: Duration,
    pub traffic: Traffic,
    pub drain_limit: Duration,
}

impl RollingParams {
    pub fn quick() -> RollingParams {
        RollingParams {
            rounds: 1,
            gap: Duration::from_millis(1500),
            pause: Duration::from_millis(500),
            traffic: traffic(2, 10, 40),
            drain_limit: Duration::from_secs(60),
        }
    }

    pub fn long() -> RollingParams {
        RollingParams {
            rounds: 3,
            gap: Duration::from_secs(5),
            pause: Duration::from_secs(2),
            traffic: traffic(3, 10, 25),
            drain_limit: Duration::from_secs(180),
        }
    }
}

pub async fn rolling_restart(test: &str, params: RollingParams) -> Option<Report> {
    let cluster = cluster(test, None)?;
    let mut report = Report::new("Rolling restart (servers, then nodes)");
    report.ran = format!(
        "{} round(s): each nats-server, then each gateway node, stopped with SIGTERM and \
         started again one at a time, {} of load between restarts, down for {}; {}",
        params.rounds,
        secs(params.gap),
        secs(params.pause),
        params.traffic.describe()
    );
    let mut fleet = fleet(test, cluster, Faults::none()).await;
    fleet.start_load(params.traffic);
    let mut unclean = Vec::new();
    let mut handover = Vec::new();
    let mut stuck = None;
    'rounds: for round in 0..params.rounds {
        for i in 0..3 {
            tokio::time::sleep(params.gap).await;
            fleet.cluster.terminate(i);
            tokio::time::sleep(params.pause).await;
            fleet.cluster.spawn(i);
            if let Err(e) = fleet.cluster.wait_ready(3, Duration::from_secs(60)).await {
                // Reported, and the accepted events still checked.
                stuck = Some(format!("round {round}, server {i} restarted: {e}"));
                break 'rounds;
            }
        }
        for i in 0..2 {
            tokio::time::sleep(params.gap).await;
            if let Err(e) = fleet.stop_node(i).await {
                unclean.push(format!("round {round}, node {i}: {e}"));
            }
            tokio::time::sleep(params.pause).await;
            fleet.start_node(i).await;
            match fleet.wait_shared(Duration::from_secs(30)).await {
                Ok(took) => handover.push(took),
                Err(e) => panic!(
                    "{test}: round {round}, node {i}: {e}: {}",
                    fleet.node_logs()
                ),
            }
        }
    }
    tokio::time::sleep(params.gap).await;
    report.figure(
        "restarts",
        format!(
            "{} of servers, {} of nodes",
            3 * params.rounds,
            2 * params.rounds
        ),
    );
    report.figure(
        "node restart to both nodes owning partitions",
        spread(&handover),
    );
    report.check(
        "the cluster took replicated streams again after every server restart",
        stuck.is_none(),
        stuck.unwrap_or_else(|| format!("{} restarts", 3 * params.rounds)),
    );
    report.check(
        "every node stopped cleanly on SIGTERM",
        unclean.is_empty(),
        format!("{unclean:?}"),
    );
    fleet.settle(&mut report, params.drain_limit).await;
    Some(report)
}

/// A row of the distributed results table: scenario | form | duration | accepted |
/// delivered | lost | duplicates | order violations.
pub fn table_row(report: &Report) -> String {
    let figure = |name: &str| {
        report
            .figures
            .iter()
            .find(|(n, _)| n == name)
            .map_or("—".to_string(), |(_, v)| v.clone())
    };
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} |",
        report.scenario,
        if long() { "long" } else { "quick" },
        figure("duration"),
        figure("accepted"),
        figure("delivered"),
        figure("lost"),
        figure("duplicates"),
        figure("order violations"),
    )
}
