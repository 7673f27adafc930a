//! The spool conformance suite: checks every [`Spool`] backend must pass.
//!
//! Each check is an `async fn` that drives one backend through the trait only and panics
//! with a message naming the broken guarantee. A backend's test file runs every check
//! against a fresh, empty storage of its own (one storage per check), for example:
//!
//! ```ignore
//! #[tokio::test]
//! async fn appends_report_duplicates() {
//!     let storage = fresh_storage();
//!     conformance::append_reports_queued_and_duplicates(storage.open()).await;
//! }
//! ```
//!
//! Checks that need to reopen the same data take an `open` closure that returns a new
//! handle on that storage each time it is called (the check closes the previous handle
//! first). Every check closes the spool it used before returning.
//!
//! Timing: the expiry checks wait for real time ([`SHORT_LEASE_MS`] then [`EXPIRY_WAIT`]);
//! every other lease uses [`LONG_LEASE_MS`], long enough never to expire during a check.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use super::{
    AppendReport, AppendRequest, Leased, RetryAt, Settlement, Spool, SpoolError, SpoolStats,
};
use crate::segment::{Event, EventType, UserKey};

/// A lease that outlives any check.
pub const LONG_LEASE_MS: i64 = 60_000;
/// A lease the expiry checks let run out.
pub const SHORT_LEASE_MS: i64 = 200;
/// How long the expiry checks wait for a [`SHORT_LEASE_MS`] lease to run out.
pub const EXPIRY_WAIT: Duration = Duration::from_millis(600);
/// The source most checks append to.
pub const SOURCE: &str = "conformance";

/// Bound on any single call in [`close_makes_every_call_fail_with_closed`], so that a
/// backend that hangs after close fails the check instead of stalling the test run.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A track event of the user with id `user_id` whose payload names its `messageId`.
pub fn event(message_id: &str, user_id: &str) -> Event {
    event_of(message_id, UserKey::user_id(user_id))
}

/// A track event of `user_key` whose payload names its `messageId`.
pub fn event_of(message_id: &str, user_key: UserKey) -> Event {
    Event {
        kind: EventType::Track,
        message_id: message_id.to_owned(),
        user_key,
        payload: payload(message_id, "first"),
    }
}

fn payload(message_id: &str, variant: &str) -> Vec<u8> {
    format!(r#"{{"type":"track","messageId":"{message_id}","event":"{variant}"}}"#).into_bytes()
}

/// A request of `events` from `source`, received at `received_at_ms`.
pub fn request(source: &str, received_at_ms: i64, events: Vec<Event>) -> AppendRequest {
    AppendRequest {
        source: source.to_owned(),
        received_at_ms,
        events,
    }
}

async fn append(spool: &Arc<dyn Spool>, request: AppendRequest) -> AppendReport {
    let ids: Vec<String> = request
        .events
        .iter()
        .map(|e| e.message_id.clone())
        .collect();
    match spool.append(request).await {
        Ok(report) => report,
        Err(e) => panic!("append of {ids:?} failed: {e}"),
    }
}

async fn lease(spool: &Arc<dyn Spool>, max: usize, lease_ms: i64) -> Vec<Leased> {
    match spool.lease(max, lease_ms).await {
        Ok(leased) => leased,
        Err(e) => panic!("lease(max = {max}, lease_ms = {lease_ms}) failed: {e}"),
    }
}

async fn ack(spool: &Arc<dyn Spool>, seqs: Vec<i64>) {
    if let Err(e) = spool.ack(seqs.clone()).await {
        panic!("ack of seqs {seqs:?} failed: {e}");
    }
}

async fn stats(spool: &Arc<dyn Spool>) -> SpoolStats {
    match spool.stats().await {
        Ok(stats) => stats,
        Err(e) => panic!("stats failed: {e}"),
    }
}

/// Depth and oldest arrival time (other fields of [`SpoolStats`] are not this suite's).
async fn depth_and_oldest(spool: &Arc<dyn Spool>) -> (u64, Option<i64>) {
    let stats = stats(spool).await;
    (stats.depth, stats.oldest_received_at_ms)
}

fn ids(leased: &[Leased]) -> Vec<&str> {
    leased.iter().map(|l| l.message_id.as_str()).collect()
}

fn seqs(leased: &[Leased]) -> Vec<i64> {
    leased.iter().map(|l| l.seq).collect()
}

fn seq_of(leased: &[Leased], message_id: &str) -> i64 {
    match leased.iter().find(|l| l.message_id == message_id) {
        Some(l) => l.seq,
        None => panic!(
            "{message_id} is not among the leased events {:?}",
            ids(leased)
        ),
    }
}

fn assert_report(report: AppendReport, queued: usize, duplicates: usize, what: &str) {
    assert_eq!(
        report,
        AppendReport { queued, duplicates },
        "{what}: expected {queued} queued and {duplicates} duplicates"
    );
}

fn assert_ids(leased: &[Leased], expected: &[&str], what: &str) {
    assert_eq!(ids(leased), expected, "{what}: leased message ids");
}

/// `append` reports how many events it queued and how many it dropped as duplicates, and
/// duplicates are really not queued.
pub async fn append_reports_queued_and_duplicates(spool: Arc<dyn Spool>) {
    let report = append(
        &spool,
        request(
            SOURCE,
            1_000,
            vec![event("m1", "1"), event("m2", "2"), event("m3", "3")],
        ),
    )
    .await;
    assert_report(report, 3, 0, "three new events");

    let report = append(
        &spool,
        request(SOURCE, 2_000, vec![event("m1", "1"), event("m4", "4")]),
    )
    .await;
    assert_report(report, 1, 1, "one repeat and one new event");

    let all = ["m1", "m2", "m3", "m4"]
        .iter()
        .zip(["1", "2", "3", "4"])
        .map(|(id, user)| event(id, user))
        .collect();
    let report = append(&spool, request(SOURCE, 3_000, all)).await;
    assert_report(report, 0, 4, "only repeats");

    let report = append(&spool, request(SOURCE, 4_000, Vec::new())).await;
    assert_report(report, 0, 0, "an empty request");

    assert_eq!(
        stats(&spool).await.depth,
        4,
        "duplicates must not be queued"
    );
    let leased = lease(&spool, 100, LONG_LEASE_MS).await;
    assert_ids(&leased, &["m1", "m2", "m3", "m4"], "after repeats");
    spool.close().await;
}

/// A `messageId` repeated inside one request is queued once, the first copy winning.
pub async fn dedup_within_one_request(spool: Arc<dyn Spool>) {
    let mut repeat = event("m1", "3");
    repeat.payload = payload("m1", "second");
    let report = append(
        &spool,
        request(
            SOURCE,
            1_000,
            vec![event("m1", "1"), event("m1", "1"), event("m2", "2"), repeat],
        ),
    )
    .await;
    assert_report(report, 2, 2, "m1 three times and m2 once in one request");

    let leased = lease(&spool, 100, LONG_LEASE_MS).await;
    assert_ids(&leased, &["m1", "m2"], "one request with repeats");
    assert_eq!(
        leased[0].user_key,
        UserKey::user_id("1"),
        "the first copy of m1 is kept"
    );
    assert_eq!(
        leased[0].payload,
        payload("m1", "first"),
        "the first copy of m1 is kept"
    );
    spool.close().await;
}

/// A `messageId` seen in an earlier request is a duplicate, whatever the new payload.
pub async fn dedup_across_requests(spool: Arc<dyn Spool>) {
    let report = append(&spool, request(SOURCE, 1_000, vec![event("m1", "1")])).await;
    assert_report(report, 1, 0, "first request");

    let mut retry = event("m1", "1");
    retry.payload = payload("m1", "second");
    let report = append(&spool, request(SOURCE, 2_000, vec![retry])).await;
    assert_report(report, 0, 1, "the same messageId in a later request");

    // Still a duplicate once the first copy is leased, and once it is acked.
    let leased = lease(&spool, 100, LONG_LEASE_MS).await;
    assert_ids(&leased, &["m1"], "after the repeat");
    assert_eq!(leased[0].payload, payload("m1", "first"));
    let report = append(&spool, request(SOURCE, 3_000, vec![event("m1", "1")])).await;
    assert_report(report, 0, 1, "the same messageId while leased");
    ack(&spool, seqs(&leased)).await;
    let report = append(&spool, request(SOURCE, 4_000, vec![event("m1", "1")])).await;
    assert_report(report, 0, 1, "the same messageId after delivery");
    assert_eq!(stats(&spool).await.depth, 0, "nothing is queued again");
    spool.close().await;
}

/// Dedup ids and queued events survive closing and reopening the storage.
pub async fn dedup_survives_reopen<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Spool>>,
{
    let spool = open().await;
    let report = append(
        &spool,
        request(SOURCE, 1_000, vec![event("m1", "1"), event("m2", "2")]),
    )
    .await;
    assert_report(report, 2, 0, "before reopening");
    spool.close().await;

    let spool = open().await;
    let report = append(
        &spool,
        request(SOURCE, 2_000, vec![event("m1", "1"), event("m3", "3")]),
    )
    .await;
    assert_report(report, 1, 1, "m1 again after reopening");
    assert_eq!(
        depth_and_oldest(&spool).await,
        (3, Some(1_000)),
        "events appended before reopening are still queued (depth, oldest)"
    );
    let leased = lease(&spool, 100, LONG_LEASE_MS).await;
    assert_ids(&leased, &["m1", "m2", "m3"], "after reopening");
    assert_eq!(leased[0].payload, payload("m1", "first"));
    assert_eq!(leased[0].received_at_ms, 1_000);
    spool.close().await;
}

/// Dedup is per source: the same `messageId` from two sources is two events.
pub async fn dedup_is_per_source(spool: Arc<dyn Spool>) {
    let report = append(&spool, request("source-a", 1_000, vec![event("m1", "a")])).await;
    assert_report(report, 1, 0, "m1 from source-a");
    let report = append(&spool, request("source-b", 1_000, vec![event("m1", "b")])).await;
    assert_report(report, 1, 0, "m1 from source-b");
    let report = append(&spool, request("source-a", 2_000, vec![event("m1", "a")])).await;
    assert_report(report, 0, 1, "m1 from source-a again");
    let report = append(&spool, request("source-b", 2_000, vec![event("m1", "b")])).await;
    assert_report(report, 0, 1, "m1 from source-b again");

    let leased = lease(&spool, 100, LONG_LEASE_MS).await;
    let sources: Vec<(&str, &str)> = leased
        .iter()
        .map(|l| (l.source.as_str(), l.message_id.as_str()))
        .collect();
    assert_eq!(
        sources,
        [("source-a", "m1"), ("source-b", "m1")],
        "one m1 per source"
    );
    spool.close().await;
}

/// `lease` hands out events in append order with every field as appended.
pub async fn lease_returns_events_in_append_order(spool: Arc<dyn Spool>) {
    let requests = [
        (1_000, vec![("e1", "1"), ("e2", "2")]),
        (2_000, vec![("e3", "3")]),
        (3_000, vec![("e4", "4"), ("e5", "5")]),
    ];
    for (received_at_ms, events) in &requests {
        let events: Vec<Event> = events.iter().map(|(id, user)| event(id, user)).collect();
        let count = events.len();
        let report = append(&spool, request(SOURCE, *received_at_ms, events)).await;
        assert_report(report, count, 0, "distinct events");
    }

    let leased = lease(&spool, 100, LONG_LEASE_MS).await;
    assert_ids(&leased, &["e1", "e2", "e3", "e4", "e5"], "append order");
    assert!(
        leased.windows(2).all(|pair| pair[0].seq < pair[1].seq),
        "seq must increase with append order: {:?}",
        seqs(&leased)
    );
    let mut expected = Vec::new();
    for (received_at_ms, events) in &requests {
        for (id, user) in events {
            expected.push(Leased {
                seq: seq_of(&leased, id),
                source: SOURCE.to_owned(),
                message_id: (*id).to_owned(),
                kind: EventType::Track,
                user_key: UserKey::user_id(user),
                payload: payload(id, "first"),
                attempts: 0,
                received_at_ms: *received_at_ms,
            });
        }
    }
    assert_eq!(leased, expected, "leased events carry what was appended");
    spool.close().await;
}

/// A `seq` is never handed out twice, even once every event has been acked: acking a
/// stale `seq` (a redelivered event acked twice) must not remove a later event.
pub async fn seq_is_never_reused(spool: Arc<dyn Spool>) {
    append(&spool, request(SOURCE, 1_000, vec![event("e1", "1")])).await;
    let first = lease(&spool, 100, LONG_LEASE_MS).await;
    assert_ids(&first, &["e1"], "first event");
    ack(&spool, seqs(&first)).await;

    append(&spool, request(SOURCE, 2_000, vec![event("e2", "1")])).await;
    let second = lease(&spool, 100, LONG_LEASE_MS).await;
    assert_ids(&second, &["e2"], "second event");
    assert!(
        second[0].seq > first[0].seq,
        "seq must increase with append order even after the queue emptied: \
         e1 had {}, e2 got {}",
        first[0].seq,
        second[0].seq
    );

    // A late, repeated ack of e1 leaves e2 alone.
    ack(&spool, seqs(&first)).await;
    assert_eq!(
        stats(&spool).await.depth,
        1,
        "acking e1's seq again removed another event"
    );
    spool.close().await;
}

/// `lease` returns at most `max` events, continuing in queue order on the next call.
pub async fn lease_honours_max(spool: Arc<dyn Spool>) {
    let events = (1..=5).map(|i| event(&format!("e{i}"), &i.to_string()));
    let report = append(&spool, request(SOURCE, 1_000, events.collect())).await;
    assert_report(report, 5, 0, "five users");

    assert_ids(
        &lease(&spool, 2, LONG_LEASE_MS).await,
        &["e1", "e2"],
        "first lease of 2",
    );
    assert_ids(
        &lease(&spool, 2, LONG_LEASE_MS).await,
        &["e3", "e4"],
        "second lease of 2",
    );
    assert_ids(
        &lease(&spool, 2, LONG_LEASE_MS).await,
        &["e5"],
        "third lease of 2",
    );
    assert_ids(
        &lease(&spool, 2, LONG_LEASE_MS).await,
        &[],
        "everything is leased",
    );
    spool.close().await;
}

/// A lease takes, per user, a prefix of that user's queue in append order; while one of a
/// user's events is leased, the user's later events wait, and other users do not.
pub async fn lease_holds_back_a_users_events_behind_a_leased_one(spool: Arc<dyn Spool>) {
    for (i, (id, user)) in [
        ("a1", "a"),
        ("b1", "b"),
        ("a2", "a"),
        ("c1", "c"),
        ("b2", "b"),
        ("a3", "a"),
    ]
    .into_iter()
    .enumerate()
    {
        let report = append(
            &spool,
            request(SOURCE, 1_000 + i as i64, vec![event(id, user)]),
        )
        .await;
        assert_report(report, 1, 0, "one event of three users");
    }

    let first = lease(&spool, 2, LONG_LEASE_MS).await;
    assert_ids(&first, &["a1", "b1"], "a lease of 2");
    let second = lease(&spool, 100, LONG_LEASE_MS).await;
    assert_ids(
        &second,
        &["c1"],
        "a2, a3 and b2 wait behind leased a1 and b1; c is not held up",
    );
    assert_ids(
        &lease(&spool, 100, LONG_LEASE_MS).await,
        &[],
        "nothing more while a1, b1 and c1 are leased",
    );

    ack(&spool, vec![seq_of(&first, "a1")]).await;
    let third = lease(&spool, 100, LONG_LEASE_MS).await;
    assert_ids(
        &third,
        &["a2", "a3"],
        "after acking a1: the rest of a's queue",
    );

    ack(&spool, vec![seq_of(&first, "b1")]).await;
    let fourth = lease(&spool, 100, LONG_LEASE_MS).await;
    assert_ids(&fourth, &["b2"], "after acking b1");

    let mut rest = seqs(&second);
    rest.extend(seqs(&third));
    rest.extend(seqs(&fourth));
    ack(&spool, rest).await;
    assert_eq!(stats(&spool).await.depth, 0, "everything acked");
    assert_ids(&lease(&spool, 100, LONG_LEASE_MS).await, &[], "empty queue");
    spool.close().await;
}

/// With nothing leased, one lease takes every user's whole queue, in append order.
pub async fn lease_takes_whole_user_queues_in_append_order(spool: Arc<dyn Spool>) {
    for (i, (id, user)) in [
        ("a1", "a"),
        ("b1", "b"),
        ("a2", "a"),
        ("a3", "a"),
        ("b2", "b"),
    ]
    .into_iter()
    .enumerate()
    {
        append(
            &spool,
            request(SOURCE, 1_000 + i as i64, vec![event(id, user)]),
        )
        .await;
    }
    let leased = lease(&spool, 100, LONG_LEASE_MS).await;
    assert_ids(
        &leased,
        &["a1", "b1", "a2", "a3", "b2"],
        "one lease of everything",
    );
    assert_ids(
        &lease(&spool, 100, LONG_LEASE_MS).await,
        &[],
        "everything is leased",
    );
    spool.close().await;
}

/// One request of many users: every event is leased once, each user's events in the
/// request's order and after every event of an earlier request. Events of different users
/// of one request may come in another order between them (the JetStream spool stores a
/// request's events partition by partition).
pub async fn one_request_keeps_each_users_order(spool: Arc<dyn Spool>) {
    append(&spool, request(SOURCE, 1_000, vec![event("first", "f")])).await;
    let users = 40;
    let events = (0..3 * users)
        .map(|i| event(&format!("e{i}"), &format!("u{}", i % users)))
        .collect();
    let report = append(&spool, request(SOURCE, 2_000, events)).await;
    assert_report(report, 3 * users, 0, "three events of each of 40 users");

    let leased = lease(&spool, 1_000, LONG_LEASE_MS).await;
    assert_eq!(leased.len(), 3 * users + 1, "{:?}", ids(&leased));
    assert_eq!(leased[0].message_id, "first", "the earlier request first");
    for user in 0..users {
        let theirs: Vec<&Leased> = leased
            .iter()
            .filter(|l| l.user_key == UserKey::user_id(&format!("u{user}")))
            .collect();
        let expected: Vec<String> = (0..3).map(|n| format!("e{}", user + n * users)).collect();
        let got: Vec<&str> = theirs.iter().map(|l| l.message_id.as_str()).collect();
        assert_eq!(got, expected, "user u{user}'s events in order");
        assert!(theirs.windows(2).all(|pair| pair[0].seq < pair[1].seq));
    }
    ack(&spool, seqs(&leased)).await;
    assert_eq!(stats(&spool).await.depth, 0, "everything acked");
    assert_ids(&lease(&spool, 100, LONG_LEASE_MS).await, &[], "empty queue");
    spool.close().await;
}

/// The events of one request settle one by one: one user's failed event waits for its
/// retry with that user's later event, while the other users' events of the same request
/// are delivered and leave the queue; the two come back when due, the attempt counted.
pub async fn a_retry_holds_only_its_user_among_a_requests_events(spool: Arc<dyn Spool>) {
    let users = 40;
    let events = (0..2 * users)
        .map(|i| event(&format!("e{i}"), &format!("u{}", i % users)))
        .collect();
    append(&spool, request(SOURCE, 1_000, events)).await;
    let leased = lease(&spool, 1_000, LONG_LEASE_MS).await;
    assert_eq!(leased.len(), 2 * users);
    let (first, second) = (seq_of(&leased, "e0"), seq_of(&leased, &format!("e{users}")));
    let others: Vec<i64> = seqs(&leased)
        .into_iter()
        .filter(|seq| ![first, second].contains(seq))
        .collect();
    let retry_at = chrono::Utc::now().timestamp_millis() + 1_500;
    spool
        .settle(Settlement {
            acked: others,
            retried: vec![RetryAt {
                seq: first,
                next_attempt_at_ms: retry_at,
                status: Some(503),
                error: "unavailable".into(),
            }],
            released: vec![second],
            ..Settlement::default()
        })
        .await
        .expect("settle");
    assert_eq!(stats(&spool).await.depth, 2, "u0's two events are left");
    assert_ids(
        &lease(&spool, 1_000, LONG_LEASE_MS).await,
        &[],
        "u0 waits for its retry",
    );
    let mut back = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while back.len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        back.extend(lease(&spool, 1_000, LONG_LEASE_MS).await);
    }
    let when = chrono::Utc::now().timestamp_millis();
    assert!(when >= retry_at, "not before its retry time");
    let expected = ["e0".to_owned(), format!("e{users}")];
    assert_eq!(ids(&back), expected, "u0's events, in order");
    assert_eq!(back[0].attempts, 1, "the failed attempt counts");
    ack(&spool, seqs(&back)).await;
    assert_eq!(stats(&spool).await.depth, 0, "everything acked");
    spool.close().await;
}

/// A user's queued (not yet leased) head keeps its later events back even when `max` stops
/// the lease before it, and a leased head does not hold up other users.
pub async fn queued_head_blocks_only_its_user(spool: Arc<dyn Spool>) {
    let events = vec![
        event("b1", "b"),
        event("a1", "a"),
        event("a2", "a"),
        event("c1", "c"),
    ];
    let report = append(&spool, request(SOURCE, 1_000, events)).await;
    assert_report(report, 4, 0, "three users");

    assert_ids(
        &lease(&spool, 1, LONG_LEASE_MS).await,
        &["b1"],
        "first lease of 1",
    );
    assert_ids(
        &lease(&spool, 1, LONG_LEASE_MS).await,
        &["a1"],
        "second lease of 1: a's head, not a2",
    );
    assert_ids(
        &lease(&spool, 1, LONG_LEASE_MS).await,
        &["c1"],
        "third lease of 1: c is not held up by a",
    );
    assert_ids(
        &lease(&spool, 1, LONG_LEASE_MS).await,
        &[],
        "a2 waits for a1",
    );
    spool.close().await;
}

/// An event whose lease runs out without an ack is leased again, and its user's later
/// events, held back while it was leased, follow it in order.
pub async fn expired_lease_is_leased_again(spool: Arc<dyn Spool>) {
    let events = vec![event("a1", "a"), event("a2", "a"), event("b1", "b")];
    let report = append(&spool, request(SOURCE, 1_000, events)).await;
    assert_report(report, 3, 0, "two users");

    let first = lease(&spool, 1, SHORT_LEASE_MS).await;
    assert_ids(&first, &["a1"], "a short lease of a1");
    let other = lease(&spool, 100, LONG_LEASE_MS).await;
    assert_ids(&other, &["b1"], "a2 waits behind leased a1");

    tokio::time::sleep(EXPIRY_WAIT).await;
    let again = lease(&spool, 100, LONG_LEASE_MS).await;
    assert_ids(&again, &["a1", "a2"], "after a1's lease expired");
    assert_eq!(again[0].seq, first[0].seq, "the same a1 comes back");
    assert_eq!(again[0].payload, first[0].payload);
    assert_ids(
        &lease(&spool, 100, LONG_LEASE_MS).await,
        &[],
        "b1's long lease still holds",
    );
    spool.close().await;
}

/// Acked events leave the queue for good; acking nothing is fine.
pub async fn ack_removes_events(spool: Arc<dyn Spool>) {
    let events = vec![event("e1", "1"), event("e2", "2")];
    let report = append(&spool, request(SOURCE, 1_000, events)).await;
    assert_report(report, 2, 0, "two users");

    let leased = lease(&spool, 100, SHORT_LEASE_MS).await;
    assert_ids(&leased, &["e1", "e2"], "first lease");
    ack(&spool, vec![seq_of(&leased, "e1")]).await;
    assert_eq!(stats(&spool).await.depth, 1, "e1 acked");

    tokio::time::sleep(EXPIRY_WAIT).await;
    let again = lease(&spool, 100, LONG_LEASE_MS).await;
    assert_ids(&again, &["e2"], "an acked event is not leased again");

    ack(&spool, seqs(&again)).await;
    ack(&spool, Vec::new()).await;
    assert_eq!(stats(&spool).await.depth, 0, "both acked");
    tokio::time::sleep(EXPIRY_WAIT).await;
    assert_ids(&lease(&spool, 100, LONG_LEASE_MS).await, &[], "empty queue");
    spool.close().await;
}

/// `stats` counts queued and leased events and reports the oldest one's arrival time.
pub async fn stats_report_depth_and_oldest(spool: Arc<dyn Spool>) {
    assert_eq!(depth_and_oldest(&spool).await, (0, None), "a new spool");

    let first = vec![event("e1", "1"), event("e2", "2")];
    append(&spool, request(SOURCE, 1_000, first)).await;
    append(&spool, request(SOURCE, 2_000, vec![event("e3", "3")])).await;
    let full = (3, Some(1_000));
    assert_eq!(depth_and_oldest(&spool).await, full, "after two requests");

    append(&spool, request(SOURCE, 3_000, vec![event("e1", "1")])).await;
    assert_eq!(
        depth_and_oldest(&spool).await,
        full,
        "a duplicate changes nothing"
    );

    let leased = lease(&spool, 100, LONG_LEASE_MS).await;
    assert_ids(&leased, &["e1", "e2", "e3"], "all three");
    assert_eq!(
        depth_and_oldest(&spool).await,
        full,
        "leased events still count"
    );

    ack(&spool, vec![seq_of(&leased, "e1"), seq_of(&leased, "e2")]).await;
    assert_eq!(
        depth_and_oldest(&spool).await,
        (1, Some(2_000)),
        "after acking the first request"
    );
    ack(&spool, vec![seq_of(&leased, "e3")]).await;
    assert_eq!(
        depth_and_oldest(&spool).await,
        (0, None),
        "after acking everything"
    );
    spool.close().await;
}

/// `check_writable` succeeds on a healthy spool and leaves the queue alone.
pub async fn check_writable_succeeds(spool: Arc<dyn Spool>) {
    for attempt in 1..=2 {
        if let Err(e) = spool.check_writable().await {
            panic!("check_writable #{attempt} on a healthy spool failed: {e}");
        }
    }
    assert_eq!(stats(&spool).await.depth, 0, "probing queues nothing");
    assert_ids(
        &lease(&spool, 100, LONG_LEASE_MS).await,
        &[],
        "probing queues nothing",
    );
    spool.close().await;
}

/// After `close`, every call fails with [`SpoolError::Closed`], and closing again returns.
pub async fn close_makes_every_call_fail_with_closed(spool: Arc<dyn Spool>) {
    append(&spool, request(SOURCE, 1_000, vec![event("e1", "1")])).await;
    bounded("close", spool.close()).await;

    let appended = bounded(
        "append after close",
        spool.append(request(SOURCE, 2_000, vec![event("e2", "2")])),
    )
    .await;
    assert_eq!(appended, Err(SpoolError::Closed), "append after close");
    let leased = bounded("lease after close", spool.lease(10, LONG_LEASE_MS)).await;
    assert_eq!(leased, Err(SpoolError::Closed), "lease after close");
    let acked = bounded("ack after close", spool.ack(vec![1])).await;
    assert_eq!(acked, Err(SpoolError::Closed), "ack after close");
    let probed = bounded("check_writable after close", spool.check_writable()).await;
    assert_eq!(
        probed,
        Err(SpoolError::Closed),
        "check_writable after close"
    );
    let counted = bounded("stats after close", spool.stats()).await;
    assert_eq!(counted, Err(SpoolError::Closed), "stats after close");
    bounded("a second close", spool.close()).await;
}

/// Appends racing with `close` either succeed, and are then durable, or fail with
/// `Closed`: an acknowledged append is never lost to a shutdown.
pub async fn close_keeps_every_acknowledged_append<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Spool>>,
{
    const TASKS: usize = 8;
    let spool = open().await;
    let mut tasks = Vec::with_capacity(TASKS);
    for task in 0..TASKS {
        let spool = Arc::clone(&spool);
        tasks.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            for n in 0.. {
                let id = format!("t{task}-{n}");
                let events = vec![event(&id, &task.to_string())];
                match spool.append(request(SOURCE, 1_000, events)).await {
                    Ok(report) => {
                        assert_report(report, 1, 0, &id);
                        acknowledged.push(id);
                    }
                    Err(SpoolError::Closed) => break,
                    Err(SpoolError::Overloaded) => tokio::task::yield_now().await,
                    Err(e) => panic!("append of {id} failed: {e}"),
                }
            }
            acknowledged
        }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    bounded("close while appending", spool.close()).await;
    let mut acknowledged = HashSet::new();
    for (task, handle) in tasks.into_iter().enumerate() {
        match bounded("an appending task after close", handle).await {
            Ok(ids) => acknowledged.extend(ids),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("appending task {task} did not finish: {e}"),
        }
    }
    assert!(
        !acknowledged.is_empty(),
        "no append succeeded before close; the check proved nothing"
    );

    let spool = open().await;
    let mut queued = HashSet::new();
    loop {
        let leased = lease(&spool, 10_000, LONG_LEASE_MS).await;
        if leased.is_empty() {
            break;
        }
        queued.extend(leased.iter().map(|l| l.message_id.clone()));
        ack(&spool, seqs(&leased)).await;
    }
    let mut lost: Vec<&String> = acknowledged.difference(&queued).collect();
    lost.sort();
    assert!(
        lost.is_empty(),
        "{} acknowledged appends were lost across close: {lost:?}",
        lost.len()
    );
    spool.close().await;
}

async fn bounded<T>(what: &str, call: impl Future<Output = T>) -> T {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(outcome) => outcome,
        Err(_) => panic!("{what} did not return within {CALL_TIMEOUT:?}"),
    }
}

/// Many tasks appending at once: every append succeeds (overload is retried, as clients
/// do), every event is durable across a reopen, is leased exactly once, and each user's
/// events come out in the order they were appended. Run it on a multi-threaded runtime.
pub async fn concurrent_appends_are_all_durable<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Arc<dyn Spool>>,
{
    const TASKS: usize = 32;
    const REQUESTS: usize = 4;
    const EVENTS: usize = 5;
    const TOTAL: usize = TASKS * REQUESTS * EVENTS;

    let spool = open().await;
    let mut tasks = Vec::with_capacity(TASKS);
    for task in 0..TASKS {
        let spool = Arc::clone(&spool);
        tasks.push(tokio::spawn(async move {
            for r in 0..REQUESTS {
                let events: Vec<Event> = (0..EVENTS)
                    .map(|e| event(&format!("t{task}-r{r}-e{e}"), &task.to_string()))
                    .collect();
                let report = append_retrying(&spool, request(SOURCE, 1_000, events)).await;
                assert_report(report, EVENTS, 0, &format!("task {task} request {r}"));
            }
        }));
    }
    for (task, handle) in tasks.into_iter().enumerate() {
        match handle.await {
            Ok(()) => {}
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("appending task {task} did not finish: {e}"),
        }
    }
    spool.close().await;

    let spool = open().await;
    assert_eq!(
        stats(&spool).await.depth,
        TOTAL as u64,
        "every acknowledged append is queued after a reopen"
    );
    let mut seen = HashSet::with_capacity(TOTAL);
    let mut per_user: HashMap<UserKey, Vec<String>> = HashMap::new();
    // Every round leases whatever is deliverable; the bound is the worst case of one
    // event per user per round.
    for _round in 0..=REQUESTS * EVENTS {
        let leased = lease(&spool, TOTAL, LONG_LEASE_MS).await;
        if leased.is_empty() {
            break;
        }
        for l in &leased {
            assert!(
                seen.insert(l.message_id.clone()),
                "{} was leased twice",
                l.message_id
            );
            per_user
                .entry(l.user_key.clone())
                .or_default()
                .push(l.message_id.clone());
        }
        ack(&spool, seqs(&leased)).await;
    }
    assert_eq!(seen.len(), TOTAL, "every appended event is leased");
    for task in 0..TASKS {
        let expected: Vec<String> = (0..REQUESTS)
            .flat_map(|r| (0..EVENTS).map(move |e| format!("t{task}-r{r}-e{e}")))
            .collect();
        assert_eq!(
            per_user.get(&UserKey::user_id(&task.to_string())),
            Some(&expected),
            "user {task}'s events in append order"
        );
    }
    assert_eq!(stats(&spool).await.depth, 0, "everything acked");
    spool.close().await;
}

async fn append_retrying(spool: &Arc<dyn Spool>, request: AppendRequest) -> AppendReport {
    for _ in 0..200 {
        match spool.append(request.clone()).await {
            Ok(report) => return report,
            Err(SpoolError::Overloaded) => tokio::time::sleep(Duration::from_millis(10)).await,
            Err(e) => panic!("concurrent append failed: {e}"),
        }
    }
    panic!("the spool stayed overloaded for 200 retries")
}
