//! Disk full: the data dir lives on a small tmpfs the scenario mounts itself, with a filler
//! file taking part of it. Clients send until the spool cannot grow: from then on ingest must
//! answer 503 with `Retry-After` (never 200 for an event it could not keep) and the process
//! must stay up. Deleting the filler frees space: ingest must resume by itself. Then the
//! gateway is SIGKILLed, and every event answered 200 must be in the spool file exactly once
//! with its payload intact, and must be delivered once the gateway runs again with delivery
//! on.
//!
//! Mounting needs root (or CAP_SYS_ADMIN). Without it the scenario is skipped with the
//! reason, unless the environment variable `CI` is set, in which case it fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use refiner_gateway::sim::Faults;

use crate::harness::{scratch_dir, start_sim, wait_for, Gateway, Spec, SpoolFile};
use crate::load::{event_id, Load, LoadSpec};
use crate::report::{secs, Report};
use crate::witness::Witness;

#[derive(Debug, Clone)]
pub struct DiskParams {
    /// Size of the tmpfs, MiB.
    pub fs_mib: u64,
    /// Filler file created before the gateway starts, deleted to free space, MiB.
    pub filler_mib: u64,
    pub clients: usize,
    pub batch: usize,
    /// Bytes of padding per event.
    pub padding: usize,
    /// How long ingest is kept answering 503 before space is freed.
    pub hold_full: Duration,
}

impl DiskParams {
    pub fn quick() -> DiskParams {
        DiskParams {
            fs_mib: 4,
            filler_mib: 1,
            clients: 3,
            batch: 20,
            padding: 200,
            hold_full: Duration::from_secs(2),
        }
    }
}

/// A tmpfs mounted for the scenario; unmounted on drop.
struct Mounted {
    path: PathBuf,
}

impl Mounted {
    fn tmpfs(path: &Path, size_mib: u64) -> Result<Mounted, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if output.status.success() {
            Ok(Mounted {
                path: path.to_path_buf(),
            })
        } else {
            Err(format!(
                "mount -t tmpfs failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }
}

impl Mounted {
    /// Remounts the tmpfs with a new size.
    fn grow(&self, size_mib: u64) -> Result<(), String> {
        let output = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size_mib}m")])
            .arg(&self.path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_string())
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let unmounted = std::process::Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.path)
                .status();
        }
    }
}

fn write_filler(path: &Path, mib: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![0x5a_u8; 1024 * 1024];
    for _ in 0..mib {
        file.write_all(&chunk)?;
    }
    file.sync_all()
}

pub async fn run(params: DiskParams) -> Report {
    let started = Instant::now();
    let mut report = Report::new("Disk full");
    report.ran = format!(
        "data dir on a {} MiB tmpfs mounted by the test, {} MiB of it taken by a filler file; \
         {} clients × {}-event batches (≈{} B per event) until ingest answers 503, 503s held \
         for {} s, filler deleted, then SIGKILL, spool file checked, filesystem grown to {} MiB, \
         restart with delivery on",
        params.fs_mib,
        params.filler_mib,
        params.clients,
        params.batch,
        params.padding + 250,
        params.hold_full.as_secs(),
        params.fs_mib * 8
    );
    let scratch = scratch_dir("disk");
    let mount_point = scratch.path().join("mnt");
    let mounted = match Mounted::tmpfs(&mount_point, params.fs_mib) {
        Ok(mounted) => mounted,
        Err(reason) => {
            if std::env::var_os("CI").is_some() {
                report.check(
                    "a small filesystem could be mounted (CI requires it)",
                    false,
                    reason,
                );
            } else {
                report.skipped = Some(format!("{reason} (run as root to include it)"));
            }
            report.elapsed = started.elapsed();
            return report;
        }
    };
    let filler = mount_point.join("filler");
    write_filler(&filler, params.filler_mib).expect("write the filler file");
    let data_dir = mount_point.join("data");

    // Phase 1: fill the disk, delivery off so that everything stays queued.
    let spec = Spec::new(&data_dir, "http://127.0.0.1:9/v1").delivery("enabled", "false");
    let mut gateway = Gateway::start(&spec, scratch.path(), Duration::from_secs(30)).await;
    let mut load_spec = LoadSpec::new("disk", params.clients, params.batch, Duration::ZERO);
    load_spec.padding = params.padding;
    load_spec.retry_cap = Duration::from_millis(100);
    let load = Load::start(load_spec, &gateway.address);
    let full = wait_for(Duration::from_secs(120), "ingest answers 503", || {
        let shared = load.shared.clone();
        async move {
            let statuses = shared.status_counts();
            if statuses.contains_key("503") {
                Ok(shared.acked())
            } else {
                Err(format!("{statuses:?}"))
            }
        }
    })
    .await;
    let acked_when_full = full.as_ref().copied().unwrap_or(0);
    tokio::time::sleep(params.hold_full).await;
    let acked_after_hold = load.shared.acked();
    let client = reqwest::Client::new();
    let readyz_when_full = client
        .get(format!("{}/readyz", gateway.address))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .ok();
    let statuses_when_full = load.shared.status_counts();
    let alive_when_full = gateway.alive();
    let df_when_full = disk_usage(&mount_point);

    // Phase 2: free space; ingest resumes by itself.
    std::fs::remove_file(&filler).expect("delete the filler file");
    let freed = Instant::now();
    let resumed = wait_for(Duration::from_secs(60), "ingest resumes", || {
        let shared = load.shared.clone();
        async move {
            let acked = shared.acked();
            if acked > acked_after_hold {
                Ok(())
            } else {
                Err(format!("{acked} acked; {:?}", shared.status_counts()))
            }
        }
    })
    .await;
    let resume_time = freed.elapsed();
    // Stop at once: the clients would fill the freed space again.
    let shared = load.stop().await;
    let memory = gateway.memory();
    let alive_at_end = gateway.alive();
    gateway.kill().await;

    // Phase 3: the file holds every event answered 200, once, intact.
    let acked: Vec<(usize, u64)> = (0..params.clients)
        .map(|k| (k, shared.acked_upto[k].load(Ordering::SeqCst)))
        .collect();
    let accepted: u64 = acked.iter().map(|(_, n)| n).sum();
    let integrity = SpoolFile::integrity(&data_dir);
    let rows = SpoolFile::events(&data_dir);
    let (missing, duplicated, corrupt) = match &rows {
        Ok(rows) => {
            let mut seen: HashMap<&str, usize> = HashMap::new();
            let mut corrupt = 0;
            for (id, payload) in rows {
                *seen.entry(id.as_str()).or_default() += 1;
                let intact = serde_json::from_slice::<serde_json::Value>(payload)
                    .map(|p| {
                        p["messageId"] == serde_json::json!(id)
                            && p["event"] == serde_json::json!(id)
                    })
                    .unwrap_or(false);
                if !intact {
                    corrupt += 1;
                }
            }
            let mut missing = 0u64;
            for &(k, upto) in &acked {
                for n in 0..upto {
                    if !seen.contains_key(event_id("disk", k, n).as_str()) {
                        missing += 1;
                    }
                }
            }
            let duplicated = seen.values().filter(|n| **n > 1).count();
            (missing, duplicated, corrupt)
        }
        Err(_) => (accepted, 0, 0),
    };

    // Phase 4: deliverable. Delivering is writing too (every acknowledgement is a spool
    // transaction, and the write-ahead log only grows until it is checkpointed), so the
    // filesystem is first grown to give the settles room, as an operator would.
    let grown = mounted.grow(params.fs_mib * 8);
    let sim = start_sim(0, Faults::none(), 200_000).await;
    let witness = Witness::start(sim.state(), false);
    let spec = Spec::new(&data_dir, &sim.url());
    let gateway = Gateway::start(&spec, scratch.path(), Duration::from_secs(30)).await;
    let delivered = wait_for(
        Duration::from_secs(120),
        "everything accepted is delivered",
        || {
            let witness = witness.clone();
            let acked = &acked;
            async move {
                let missing: u64 = witness.with(|d| {
                    acked
                        .iter()
                        .map(|&(k, upto)| {
                            (0..upto)
                                .filter(|n| !d.contains(&event_id("disk", k, *n)))
                                .count() as u64
                        })
                        .sum()
                });
                if missing == 0 {
                    Ok(())
                } else {
                    Err(format!("{missing} not delivered"))
                }
            }
        },
    )
    .await;
    let terminated = gateway.terminate().await;
    let file = SpoolFile::read(&data_dir);
    let calls = witness.finish();
    sim.stop().await;
    drop(mounted);

    let statuses = shared.status_counts();
    let unexpected = shared.unexpected.lock().expect("lock").clone();
    report.figure("accepted (answered 200)", accepted);
    report.figure("accepted when the first 503 came", acked_when_full);
    report.figure(
        "accepted while full",
        format!(
            "{} during the {} s hold",
            acked_after_hold - acked_when_full,
            params.hold_full.as_secs()
        ),
    );
    report.figure("filesystem when full", df_when_full);
    report.figure("answers while full", format!("{statuses_when_full:?}"));
    report.figure("all ingest answers", format!("{statuses:?}"));
    report.figure(
        "/readyz while full",
        readyz_when_full.map_or("no answer".into(), |s| s.to_string()),
    );
    report.figure("ingest resumed after freeing space in", secs(resume_time));
    report.figure("RSS", crate::harness::mib(memory.rss));
    report.figure(
        "delivered after restart",
        format!(
            "{} distinct, {} duplicates",
            calls.tracks.len(),
            calls.duplicates()
        ),
    );
    report.check(
        "the disk filled and ingest answered 503",
        full.is_ok(),
        full.as_ref()
            .map_or_else(|e| e.clone(), |_| format!("{statuses_when_full:?}")),
    );
    report.check(
        "every 503 carried Retry-After",
        shared.missing_retry_after.load(Ordering::SeqCst) == 0,
        format!(
            "{} without",
            shared.missing_retry_after.load(Ordering::SeqCst)
        ),
    );
    report.check(
        "only 200 and 503 (or 429) answers, the process stayed up",
        unexpected.is_empty() && !statuses.contains_key("error") && alive_when_full && alive_at_end,
        format!("{statuses:?} {unexpected:?}"),
    );
    report.check(
        "ingest resumed after space was freed",
        resumed.is_ok(),
        resumed
            .as_ref()
            .map_or_else(|e| e.clone(), |_| secs(resume_time)),
    );
    report.check(
        "every event answered 200 is in the spool once, intact, after SIGKILL",
        rows.is_ok() && missing == 0 && duplicated == 0 && corrupt == 0,
        match &rows {
            Ok(rows) => format!(
                "{} rows; {missing} missing, {duplicated} duplicated, {corrupt} corrupt",
                rows.len()
            ),
            Err(e) => e.clone(),
        },
    );
    report.check(
        "spool file passes integrity_check",
        integrity.as_deref() == Ok("ok"),
        format!("{integrity:?}"),
    );
    report.check(
        "the filesystem could be grown for delivery",
        grown.is_ok(),
        format!("{grown:?}"),
    );
    report.check(
        "everything accepted is delivered after the restart",
        delivered.is_ok(),
        delivered
            .as_ref()
            .map_or_else(|e| e.clone(), |_| "all delivered".into()),
    );
    match file {
        Ok(file) => report.check(
            "nothing dead-lettered or left queued",
            file.dead_letters == 0 && file.queued == 0,
            format!("{} dead letters, {} queued", file.dead_letters, file.queued),
        ),
        Err(e) => report.check("nothing dead-lettered or left queued", false, e),
    }
    report.check(
        "stops cleanly on SIGTERM",
        terminated.is_ok(),
        format!("{terminated:?}"),
    );
    report.elapsed = started.elapsed();
    report
}

/// `df`'s view of a mount point, in KiB.
fn disk_usage(path: &Path) -> String {
    std::process::Command::new("df")
        .args(["-k", "--output=size,used,avail"])
        .arg(path)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|text| text.lines().nth(1).map(str::to_string))
        .map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            format!(
                "{} KiB used of {} KiB, {} KiB free",
                parts.get(1).unwrap_or(&"?"),
                parts.first().unwrap_or(&"?"),
                parts.get(2).unwrap_or(&"?")
            )
        })
        .unwrap_or_else(|| "df failed".into())
}
