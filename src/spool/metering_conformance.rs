//! The conformance suite of the [`Metering`] trait: what every backend's usage and hourly
//! counters must report after appends, duplicates and a settlement. Run against each
//! backend by its integration tests, like [`super::conformance`] for the queue.

use super::admin::HOUR_MS;
use super::conformance::{event, event_of, request, LONG_LEASE_MS, SOURCE};
use super::{Backend, RetryAt, Settlement, Skipped};
use crate::segment::{EventType, UserKey};

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Appends four events of two identified users and an anonymous one (two page views) and
/// a duplicate, then settles them (two forwarded, one skipped, one retried): usage counts
/// events, views and identified users once each; the counters count every outcome; the
/// backlog is what is left in the queue.
pub async fn usage_and_counters_follow_appends_and_settlements(backend: Backend) {
    let (spool, metering) = (backend.queue.clone(), backend.metering.clone());
    let metering = metering.expect("the backend keeps usage");
    let now = now_ms();
    let mut page = event("m2", "1");
    page.kind = EventType::Page;
    let mut screen = event_of("m3", UserKey::anonymous("anon"));
    screen.kind = EventType::Screen;
    let events = vec![
        event("m1", "1"),
        page,
        screen,
        event_of("m4", UserKey::email("a@example.com")),
    ];
    let report = spool
        .append(request(SOURCE, now, events))
        .await
        .expect("append");
    assert_eq!(report.queued, 4);
    let again = spool
        .append(request(SOURCE, now, vec![event("m1", "1")]))
        .await
        .expect("append a duplicate");
    // Recognised at once, or (its first copy came in another request) counted as accepted
    // until the queue drops it as a repeat, and counted as a duplicate then.
    assert_eq!(again.queued + again.duplicates, 1, "{again:?}");
    let mut usage = metering.usage(SOURCE, now).await.expect("usage");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while (usage.mte, usage.backlog) != (4, 4) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        usage = metering.usage(SOURCE, now).await.expect("usage");
    }
    assert_eq!((usage.mte, usage.mpv, usage.mtu), (4, 2, 2), "{usage:?}");
    assert_eq!(usage.backlog, 4, "{usage:?}");
    assert!(usage.mte_updated_at_ms.is_some() && usage.mtu_updated_at_ms.is_some());
    assert!(usage.created_at_ms.is_some(), "{usage:?}");

    let leased = spool.lease(10, LONG_LEASE_MS).await.expect("lease");
    let seq = |id: &str| {
        leased
            .iter()
            .find(|l| l.message_id == id)
            .map(|l| l.seq)
            .expect("leased")
    };
    spool
        .settle(Settlement {
            acked: vec![seq("m1"), seq("m2")],
            skipped: vec![Skipped {
                seq: seq("m3"),
                reason: "throttled".into(),
            }],
            retried: vec![RetryAt {
                seq: seq("m4"),
                next_attempt_at_ms: now + 3_600_000,
                status: Some(503),
                error: "unavailable".into(),
            }],
            ..Settlement::default()
        })
        .await
        .expect("settle");

    let hour = now.div_euclid(HOUR_MS);
    let rows = metering
        .counters(SOURCE, hour - 1, hour + 2)
        .await
        .expect("counters");
    let total = |name: &str| -> u64 {
        rows.iter()
            .filter(|r| r.name == name)
            .map(|r| r.value)
            .sum()
    };
    assert_eq!(total("received"), 4, "{rows:?}");
    assert_eq!(total("duplicates"), 1, "{rows:?}");
    assert_eq!(total("forwarded"), 2, "{rows:?}");
    assert_eq!(total("skipped:throttled"), 1, "{rows:?}");
    assert_eq!(total("retried"), 1, "{rows:?}");
    let none = metering
        .counters(SOURCE, hour + 5, hour + 6)
        .await
        .expect("counters");
    assert!(none.is_empty(), "{none:?}");
    let usage = metering.usage(SOURCE, now).await.expect("usage");
    assert_eq!(
        usage.backlog, 1,
        "the retried event is still queued: {usage:?}"
    );
    assert_eq!(usage.mte, 4, "{usage:?}");
    let other = metering.usage("other", now).await.expect("usage");
    assert_eq!(
        (other.mte, other.mtu, other.backlog),
        (0, 0, 0),
        "{other:?}"
    );
    spool.close().await;
}
