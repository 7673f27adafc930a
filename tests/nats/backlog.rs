//! Ingest while nothing consumes: with delivery off, the partition owners stop pulling at
//! `nats.max_buffered`, and appends, through the queue as the gateway assembles it (the
//! delivery log written behind each append), must keep being acknowledged by JetStream,
//! never hang.

use super::*;
use refiner_gateway::spool::conformance::{event, request, SOURCE};
use refiner_gateway::spool::SpoolError;

/// Appends `requests` batches of `size` events from `writers` concurrent writers; the
/// errors, as text.
async fn append_concurrently(
    spool: &Arc<dyn Spool>,
    writers: usize,
    requests: usize,
    size: usize,
) -> Vec<String> {
    let tasks = (0..writers).map(|w| {
        let spool = spool.clone();
        tokio::spawn(async move {
            let mut errors = Vec::new();
            for r in 0..requests {
                let events = (0..size)
                    .map(|i| event(&format!("w{w}-r{r}-e{i}"), &format!("u:{w}:{i}")))
                    .collect();
                match spool.append(request(SOURCE, 1_000, events)).await {
                    Ok(report) => assert_eq!(report.queued, size, "every event is new"),
                    Err(e) => errors.push(e),
                }
            }
            errors
        })
    });
    let mut errors = Vec::new();
    for task in futures_util::future::join_all(tasks).await {
        for e in task.expect("writer") {
            assert!(
                matches!(&e, SpoolError::Storage(_)),
                "only a storage error (503) is allowed: {e}"
            );
            errors.push(e.to_string());
        }
    }
    errors
}

/// The defaults (the owners' dedup index on, no dedup bucket, the delivery log on) with a
/// small `max_buffered`: many concurrent writers append far more events than the owners hold
/// in memory while nothing leases, and every append is acknowledged in time (the log's
/// writes once took every unacknowledged-publish permit of the client and appends waited
/// for one until `publish_timeout`, for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_keeps_going_past_max_buffered_while_nothing_consumes() {
    use refiner_gateway::spool::delivery_log::DeliveryLogOptions;
    let Some(server) = deps::nats("ingest_keeps_going_past_max_buffered", NatsServer::start) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut options = options(&server);
    options.dedup_dir = dir.path().to_path_buf();
    options.max_buffered = 500;
    let spool = match NatsSpool::open(options, Metrics::new()).await {
        Ok(spool) => spool,
        Err(e) => panic!("opening the JetStream spool failed: {e}"),
    };
    let backend = Backend::nats_with_log(spool, &DeliveryLogOptions::default())
        .await
        .expect("the delivery log");
    let queue = backend.queue.clone();
    let started = std::time::Instant::now();
    let (writers, requests, size) = (24, 4, 1000);
    let errors = append_concurrently(&queue, writers, requests, size).await;
    assert!(
        errors.is_empty(),
        "{} of {} appends failed after {:?}: {:?}",
        errors.len(),
        writers * requests,
        started.elapsed(),
        errors.first()
    );
    let stats = queue.stats().await.expect("stats");
    let total = (writers * requests * size) as u64;
    assert_eq!(stats.depth, total, "every appended event is queued");
    queue.close().await;
}
