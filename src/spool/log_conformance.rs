//! The delivery log's conformance checks (see [`super::delivery_log`]): every backend's
//! log must pass them, driven through the [`Spool`] and [`DeliveryLog`] traits only. Like
//! [`super::conformance`], each check takes a fresh backend and closes its spool.
//!
//! A backend may write its log after the queue answered (the JetStream spool does), so the
//! checks poll the log for up to [`WAIT`].

use std::sync::Arc;
use std::time::Duration;

use super::conformance::request;
use super::delivery_log::{
    AttemptNote, CallView, DeliveryLog, EventState, LogKey, LogQuery, LoggedEvent, RefusedEntry,
};
use super::{DeadLetterRequest, RetryAt, Settlement, Skipped, Spool};
use crate::segment::{Event, EventType, UserKey};

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// How long a check waits for the log to show a change.
pub const WAIT: Duration = Duration::from_secs(10);

fn identify(message_id: &str, user: &str, email: &str) -> Event {
    Event {
        kind: EventType::Identify,
        message_id: message_id.into(),
        user_key: UserKey::user_id(user),
        payload: format!(
            r#"{{"type":"identify","messageId":"{message_id}","userId":"{user}","traits":{{"email":"{email}"}}}}"#
        )
        .into_bytes(),
    }
}

fn note(seq: i64, status: u16, body: &str) -> AttemptNote {
    AttemptNote {
        seq,
        at_ms: now_ms() + seq,
        status: Some(status),
        latency_ms: Some(12),
        response_body: Some(body.into()),
        error: None,
        calls: vec![CallView {
            method: "POST".into(),
            path: "/identify-user".into(),
            body: r#"{"id":"x"}"#.into(),
        }],
    }
}

async fn find(log: &Arc<dyn DeliveryLog>, key: LogKey) -> Vec<LoggedEvent> {
    log.find_events(LogQuery {
        source: "web".into(),
        key,
        limit: 50,
    })
    .await
    .expect("find_events")
}

/// Polls `key` until `done` holds; panics with what it last found.
async fn find_until(
    log: &Arc<dyn DeliveryLog>,
    key: LogKey,
    what: &str,
    done: impl Fn(&[LoggedEvent]) -> bool,
) -> Vec<LoggedEvent> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let found = find(log, key.clone()).await;
        if done(&found) {
            return found;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {found:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Accepted events are found by message id, user id and email; their attempts and final
/// states (delivered, skipped, dead, retrying) follow the settlements; refused events are
/// found with their reason.
pub async fn records_events_attempts_and_outcomes(
    spool: Arc<dyn Spool>,
    log: Arc<dyn DeliveryLog>,
) {
    let events = vec![
        identify("ok-1", "u1", "one@example.com"),
        identify("skip-1", "u2", "two@example.com"),
        identify("dead-1", "u3", "three@example.com"),
        identify("retry-1", "u4", "four@example.com"),
    ];
    spool
        .append(request("web", now_ms(), events))
        .await
        .expect("append");
    let leased = spool.lease(10, 60_000).await.expect("lease");
    assert_eq!(leased.len(), 4);
    let seq = |id: &str| leased.iter().find(|l| l.message_id == id).expect(id).seq;
    let (ok, skip, dead, retry) = (seq("ok-1"), seq("skip-1"), seq("dead-1"), seq("retry-1"));
    settle_each_way(spool.as_ref(), ok, skip, dead, retry).await;
    let delivered = find_until(&log, LogKey::MessageId("ok-1".into()), "delivered", |f| {
        f.first().is_some_and(|e| e.state == EventState::Delivered)
    })
    .await;
    let e = &delivered[0];
    assert_eq!(
        (e.kind.as_str(), e.user_id.as_deref()),
        ("identify", Some("u1"))
    );
    assert_eq!(e.email.as_deref(), Some("one@example.com"));
    assert_eq!(e.attempts.len(), 1);
    assert_eq!(e.attempts[0].status, Some(200));
    assert_eq!(
        e.attempts[0].response_body.as_deref(),
        Some(r#"{"message":"ok"}"#)
    );
    // A repeat of the delivered event is a duplicate: it writes no new record, so the log
    // does not show it queued again.
    let repeat = spool
        .append(request(
            "web",
            now_ms(),
            vec![identify("ok-1", "u1", "one@example.com")],
        ))
        .await
        .expect("append a repeat");
    assert_eq!(repeat.duplicates, 1, "{repeat:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = find(&log, LogKey::MessageId("ok-1".into())).await;
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(after[0].state, EventState::Delivered, "{after:?}");
    assert_eq!(e.calls[0].path, "/identify-user");
    assert!(e.payload.contains("\"messageId\":\"ok-1\""));

    let skipped = find_until(&log, LogKey::UserId("u2".into()), "skipped", |f| {
        f.first().is_some_and(|e| e.state == EventState::Skipped)
    })
    .await;
    assert_eq!(skipped[0].reason.as_deref(), Some("alias"));
    let dead_found = find_until(
        &log,
        LogKey::Email("three@example.com".into()),
        "dead",
        |f| f.first().is_some_and(|e| e.state == EventState::Dead),
    )
    .await;
    assert_eq!(dead_found[0].reason.as_deref(), Some("HTTP 400: bad trait"));
    assert_eq!(dead_found[0].attempts[0].status, Some(400));
    let retrying = find_until(&log, LogKey::MessageId("retry-1".into()), "retrying", |f| {
        f.first().is_some_and(|e| e.state == EventState::Retrying)
    })
    .await;
    assert_eq!(retrying[0].next_attempt_at_ms, Some(i64::MAX / 2));
    assert_eq!(retrying[0].attempts[0].status, Some(503));

    refused_events_are_found(&log).await;
    assert!(find(&log, LogKey::MessageId("nope".into()))
        .await
        .is_empty());
    spool.close().await;
}

/// Settles `ok` acked, `skip` skipped, `dead` dead-lettered and `retry` retried, with a
/// note of Refiner's answer for each attempted one.
async fn settle_each_way(spool: &dyn Spool, ok: i64, skip: i64, dead: i64, retry: i64) {
    spool
        .settle(Settlement {
            acked: vec![ok],
            skipped: vec![Skipped {
                seq: skip,
                reason: "alias".into(),
            }],
            dead: vec![DeadLetterRequest {
                seq: dead,
                status: Some(400),
                error: "HTTP 400: bad trait".into(),
                attempted: true,
            }],
            retried: vec![RetryAt {
                seq: retry,
                next_attempt_at_ms: i64::MAX / 2,
                status: Some(503),
                error: "HTTP 503".into(),
            }],
            notes: vec![
                note(ok, 200, r#"{"message":"ok"}"#),
                note(dead, 400, "bad trait"),
                note(retry, 503, "unavailable"),
            ],
            ..Settlement::default()
        })
        .await
        .expect("settle");
}

/// A refused event is recorded and found by its user id with its reason.
async fn refused_events_are_found(log: &Arc<dyn DeliveryLog>) {
    log.record_refused(vec![RefusedEntry {
        source: "web".into(),
        at_ms: now_ms(),
        message_id: "big-1".into(),
        kind: "track".into(),
        user_id: Some("u9".into()),
        email: None,
        reason: "event_too_large: the event is over 32 KB".into(),
        raw: r#"{"type":"track","messageId":"big-1""#.into(),
    }])
    .await
    .expect("record_refused");
    let refused = find_until(log, LogKey::UserId("u9".into()), "refused", |f| {
        !f.is_empty()
    })
    .await;
    assert_eq!(refused[0].state, EventState::Refused);
    assert_eq!(refused[0].message_id, "big-1");
    assert!(refused[0]
        .reason
        .as_deref()
        .is_some_and(|r| r.starts_with("event_too_large")));
}

/// Appending past the byte budget keeps the log within it, oldest records removed first.
/// `budget` is the backend's `max_bytes`.
pub async fn stays_within_its_byte_budget(
    spool: Arc<dyn Spool>,
    log: Arc<dyn DeliveryLog>,
    budget: u64,
) {
    let pad = "p".repeat(1000);
    let mut appended = 0u64;
    for r in 0..40 {
        let events: Vec<Event> = (0..10)
            .map(|i| {
                let id = format!("b{r}-{i}");
                Event {
                    kind: EventType::Track,
                    payload: format!(
                        r#"{{"type":"track","messageId":"{id}","userId":"u","event":"{pad}"}}"#
                    )
                    .into_bytes(),
                    message_id: id,
                    user_key: UserKey::user_id("u"),
                }
            })
            .collect();
        spool
            .append(request("web", now_ms() + r, events))
            .await
            .expect("append");
        appended += 10 * 1100;
        let size = log.log_size().await.expect("log_size");
        assert!(
            size.bytes <= budget,
            "after {appended} bytes appended: {size:?}"
        );
    }
    assert!(
        appended > 3 * budget,
        "the check writes well past the budget"
    );
    find_until(
        &log,
        LogKey::MessageId("b39-9".into()),
        "the newest is kept",
        |f| !f.is_empty(),
    )
    .await;
    assert!(
        find(&log, LogKey::MessageId("b0-0".into()))
            .await
            .is_empty(),
        "the oldest is gone"
    );
    spool.close().await;
}

/// Among `n` records (more than a few of any backend's lookup chunks), the first, a middle
/// and the last are found by message id; a user's records spread over the whole log are
/// found newest first within the limit; an email finds its one record; an unknown id
/// finds nothing.
pub async fn finds_records_among_many(spool: Arc<dyn Spool>, log: Arc<dyn DeliveryLog>, n: usize) {
    append_many(&spool, "many", 0..n).await;
    let last = format!("many-{}", n - 1);
    find_until(
        &log,
        LogKey::MessageId(last.clone()),
        "the last record",
        |f| f.len() == 1,
    )
    .await;
    for i in [0, n / 2, n - 1] {
        let found = find(&log, LogKey::MessageId(format!("many-{i}"))).await;
        assert_eq!(found.len(), 1, "many-{i}: {found:?}");
        assert_eq!(found[0].user_id.as_deref(), Some(&*format!("u{}", i % 7)));
    }
    // u3's records: every 7th, newest first, 50 of them (the limit). A backend may write
    // its index a moment after the records themselves (JetStream gathers it for 250 ms).
    let newest = (0..n).rev().find(|i| i % 7 == 3).expect("a record of u3");
    let found = find_until(&log, LogKey::UserId("u3".into()), "u3's newest", |f| {
        f.first()
            .is_some_and(|e| e.message_id == format!("many-{newest}"))
    })
    .await;
    assert_eq!(found.len(), 50);
    assert!(found
        .windows(2)
        .all(|w| w[0].received_at_ms >= w[1].received_at_ms));
    let email = LogKey::Email(format!("m{}@x.io", n / 3));
    let email = find_until(&log, email, "the email's record", |f| !f.is_empty()).await;
    assert_eq!(email.len(), 1, "{email:?}");
    assert!(find(&log, LogKey::MessageId("never".into()))
        .await
        .is_empty());
    users_newest_across_rounds(&spool, &log).await;
    spool.close().await;
}

/// A user whose events came in rounds further apart than a gathering of the index (and
/// other users' between): the newest 50 are found across the rounds' index records.
async fn users_newest_across_rounds(spool: &Arc<dyn Spool>, log: &Arc<dyn DeliveryLog>) {
    for round in 0..4 {
        let events = (round * 20..round * 20 + 20)
            .map(|i| identify(&format!("spread-{i}"), "spread", "spread@x.io"))
            .collect();
        spool
            .append(request("web", now_ms(), events))
            .await
            .expect("append");
        append_many(spool, &format!("between-{round}"), 0..100).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let found = find_until(
        log,
        LogKey::UserId("spread".into()),
        "spread's newest",
        |f| f.first().is_some_and(|e| e.message_id == "spread-79"),
    )
    .await;
    let mut ids: Vec<&str> = found.iter().map(|e| e.message_id.as_str()).collect();
    ids.sort_by_key(|id| std::cmp::Reverse(id[7..].parse::<u32>().unwrap_or(0)));
    let newest: Vec<String> = (30..80).rev().map(|i| format!("spread-{i}")).collect();
    assert_eq!(ids, newest, "the newest 50, from the last three rounds");
}

/// Appends identify events `<prefix>-<i>` for each `i` of `ids`, of users `u<i % 7>` with
/// emails `m<i>@x.io`, in requests of 500.
pub async fn append_many(spool: &Arc<dyn Spool>, prefix: &str, ids: std::ops::Range<usize>) {
    let start = now_ms();
    let end = ids.end;
    for (r, from) in ids.step_by(500).enumerate() {
        let events: Vec<Event> = (from..(from + 500).min(end))
            .map(|i| {
                identify(
                    &format!("{prefix}-{i}"),
                    &format!("u{}", i % 7),
                    &format!("m{i}@x.io"),
                )
            })
            .collect();
        spool
            .append(request("web", start + r as i64, events))
            .await
            .expect("append");
    }
}
