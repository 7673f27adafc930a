use super::*;
use crate::segment::EventType;
use crate::spool::{RetryAt, Settlement};

fn entry(seq: u64, user: &str, partition: u32) -> Entry {
    Entry {
        event: Leased {
            seq: seq as i64,
            source: "s".into(),
            message_id: format!("m{seq}"),
            kind: EventType::Track,
            user_key: UserKey::from_stored(user),
            payload: Vec::new(),
            attempts: 0,
            received_at_ms: 0,
        },
        partition,
        reply: format!("r{seq}"),
        delivered: 1,
        history: Vec::new(),
    }
}

fn state() -> QueueState {
    let mut state = QueueState::default();
    for p in 0..2 {
        state.partitions.insert(
            p,
            PartitionState {
                leasable: true,
                ..Default::default()
            },
        );
    }
    state
}

fn seqs(leased: &[Leased]) -> Vec<i64> {
    leased.iter().map(|l| l.seq).collect()
}

#[test]
fn redelivery_order_does_not_matter() {
    let mut s = state();
    assert_eq!(s.insert(entry(3, "a", 0), 0), None);
    assert_eq!(s.insert(entry(1, "a", 0), 0), None);
    assert_eq!(seqs(&s.lease(10, 100, 0)), [1, 3]);
}

#[test]
fn a_retry_holds_the_user_until_the_event_is_back() {
    let mut s = state();
    s.insert(entry(1, "a", 0), 0);
    s.insert(entry(2, "a", 0), 0);
    s.insert(entry(3, "b", 1), 0);
    assert_eq!(seqs(&s.lease(1, 100, 0)), [1]);
    let replies = s.settle(
        &Settlement {
            retried: vec![RetryAt {
                seq: 1,
                next_attempt_at_ms: 10_000,
                status: None,
                error: "x".into(),
            }],
            ..Default::default()
        },
        0,
    );
    // The retry and the held-back later event, both nakked with a delay, in order.
    assert_eq!(
        replies,
        [
            Reply::Nak {
                seq: 1,
                reply: "r1".into(),
                delay_ms: 10_000
            },
            Reply::Nak {
                seq: 2,
                reply: "r2".into(),
                delay_ms: 10_005
            }
        ]
    );
    assert_eq!(seqs(&s.lease(10, 100, 20_000)), [3]);
    // A later event that arrives early while the retry is far off goes back again.
    assert!(matches!(
        s.insert(entry(2, "a", 0), 5_000),
        Some(Reply::Nak { seq: 2, .. })
    ));
    // Once the retry is due it waits in memory behind 1, which is not back yet.
    assert_eq!(s.insert(entry(2, "a", 0), 20_000), None);
    assert!(s.lease(10, 100, 20_000).is_empty(), "2 waits for 1");
    assert_eq!(s.insert(entry(1, "a", 0), 20_000), None);
    let again = s.lease(10, 100, 20_000);
    assert_eq!(seqs(&again), [1, 2], "the user's queue, in order");
    assert_eq!(again[0].attempts, 1);
    assert!(s.lease(10, 100, 20_001).is_empty(), "both are leased");
    s.settle(
        &Settlement {
            acked: vec![1],
            released: vec![2],
            ..Default::default()
        },
        20_002,
    );
    assert_eq!(seqs(&s.lease(10, 100, 20_002)), [2]);
}

#[test]
fn skipped_events_leave_like_acked_ones() {
    let mut s = state();
    s.insert(entry(1, "a", 0), 0);
    s.insert(entry(2, "a", 0), 0);
    assert_eq!(seqs(&s.lease(1, 100, 0)), [1]);
    let replies = s.settle(
        &Settlement {
            skipped: vec![crate::spool::Skipped {
                seq: 1,
                reason: "alias".into(),
            }],
            ..Default::default()
        },
        1,
    );
    assert_eq!(
        replies,
        [Reply::Ack {
            seq: 1,
            reply: "r1".into()
        }]
    );
    assert_eq!(seqs(&s.lease(10, 100, 1)), [2]);
}

#[test]
fn a_restored_retry_keeps_its_schedule_and_holds_its_user() {
    let mut s = state();
    s.restore(
        1,
        RetryRecord {
            attempts: 3,
            retry_at_ms: 10_000,
            history: vec![(0, Some(503), "x".into())],
        },
    );
    assert!(matches!(
        s.insert(entry(1, "a", 0), 0),
        Some(Reply::Nak {
            seq: 1,
            delay_ms: 10_000,
            ..
        })
    ));
    assert!(matches!(
        s.insert(entry(2, "a", 0), 0),
        Some(Reply::Nak { seq: 2, .. })
    ));
    assert_eq!(s.insert(entry(3, "b", 0), 0), None);
    assert_eq!(seqs(&s.lease(10, 100_000, 0)), [3], "a waits for its retry");
    assert_eq!(s.insert(entry(1, "a", 0), 10_000), None);
    let leased = s.lease(10, 100, 10_000);
    assert_eq!(seqs(&leased), [1]);
    assert_eq!(leased[0].attempts, 3);
    assert_eq!(s.history(1).len(), 1);
    s.settle(
        &Settlement {
            acked: vec![1],
            ..Default::default()
        },
        10_001,
    );
    assert_eq!(
        s.take_record_changes(),
        [RecordChange::Remove {
            partition: 0,
            seq: 1
        }]
    );
}

#[test]
fn dropping_a_partition_forgets_its_events_and_holds() {
    let mut s = state();
    s.insert(entry(1, "a", 0), 0);
    s.insert(entry(2, "b", 1), 0);
    assert_eq!(seqs(&s.lease(10, 100, 0)), [1, 2]);
    s.drop_partition(0);
    assert_eq!(s.len(), 1);
    assert!(!s.has_leases(0, 0));
    assert!(s.has_leases(1, 0));
}

#[test]
fn a_replaced_consumer_holds_users_until_their_events_come_again() {
    let mut s = state();
    s.insert(entry(1, "a", 0), 0);
    s.insert(entry(2, "a", 0), 0);
    s.insert(entry(3, "b", 0), 0);
    assert_eq!(seqs(&s.lease(1, 100, 0)), [1]);
    s.reset_partition(0);
    assert_eq!(
        (s.len(), s.live_len()),
        (3, 0),
        "stale events leave room to pull"
    );
    assert!(
        s.lease(10, 100, 0).is_empty(),
        "stale replies are not leased"
    );
    // 1 settles while its reply is stale: acked when the new consumer sends it again.
    let replies = s.settle(
        &Settlement {
            acked: vec![1],
            ..Default::default()
        },
        1,
    );
    assert!(replies.is_empty(), "{replies:?}");
    // 3 comes again first; 2's user waits for 2, the rest goes on.
    assert_eq!(s.insert(entry(3, "b", 0), 2), None);
    assert_eq!(seqs(&s.lease(10, 100, 2)), [3]);
    assert_eq!(
        s.insert(entry(1, "a", 0), 3),
        Some(Reply::Ack {
            seq: 1,
            reply: "r1".into()
        })
    );
    let mut again = entry(2, "a", 0);
    again.reply = "r2-new".into();
    assert_eq!(s.insert(again, 3), None);
    assert_eq!(seqs(&s.lease(10, 100, 3)), [2]);
    let replies = s.settle(
        &Settlement {
            acked: vec![2],
            ..Default::default()
        },
        4,
    );
    assert_eq!(
        replies,
        [Reply::Ack {
            seq: 2,
            reply: "r2-new".into()
        }],
        "answered on the new consumer's reply"
    );
}

#[test]
fn a_pull_that_outlived_its_ownership_takes_nothing_in() {
    let mut s = state();
    s.partitions.get_mut(&0).expect("partition 0").epoch = 7;
    assert_eq!(s.insert_owned(6, entry(1, "a", 0), 0), None);
    assert_eq!(s.len(), 0, "an earlier taking's delivery is not kept");
    s.drop_partition(0);
    assert_eq!(s.insert_owned(7, entry(2, "a", 0), 0), None);
    assert_eq!(s.len(), 0, "nor one of a partition given up");
    assert_eq!(s.insert_owned(0, entry(3, "b", 1), 0), None);
    assert_eq!(s.len(), 1);
}

#[test]
fn stale_events_the_new_consumer_passes_over_are_forgotten() {
    let mut s = state();
    s.insert(entry(1, "a", 0), 0);
    s.insert(entry(2, "a", 0), 0);
    s.insert(entry(3, "b", 0), 0);
    s.reset_partition(0);
    // 1 was acked by another node meanwhile: the new consumer starts at 2.
    assert_eq!(s.insert(entry(2, "a", 0), 1), None);
    assert_eq!(
        seqs(&s.lease(10, 100, 1)),
        [2],
        "1 no longer holds its user"
    );
    // Nothing more comes: the idle check forgets the rest.
    s.forget_stale(0, None);
    assert_eq!(s.len(), 1);
}

#[test]
fn a_retry_keeps_its_time_across_a_replaced_consumer() {
    let mut s = state();
    s.insert(entry(1, "a", 0), 0);
    s.insert(entry(2, "a", 0), 0);
    assert_eq!(seqs(&s.lease(1, 100, 0)), [1]);
    s.settle(
        &Settlement {
            retried: vec![RetryAt {
                seq: 1,
                next_attempt_at_ms: 10_000,
                status: None,
                error: "x".into(),
            }],
            ..Default::default()
        },
        0,
    );
    s.reset_partition(0);
    // The new consumer sends everything at once: both go back until the retry is due.
    assert!(matches!(
        s.insert(entry(1, "a", 0), 100),
        Some(Reply::Nak {
            seq: 1,
            delay_ms: 9_900,
            ..
        })
    ));
    assert!(matches!(
        s.insert(entry(2, "a", 0), 100),
        Some(Reply::Nak { seq: 2, .. })
    ));
    assert!(s.lease(10, 100, 100).is_empty());
    // 2 is back first: it waits in memory behind 1.
    assert_eq!(s.insert(entry(2, "a", 0), 10_000), None);
    assert!(s.lease(10, 100, 10_000).is_empty(), "2 waits for 1");
    assert_eq!(s.insert(entry(1, "a", 0), 10_001), None);
    assert_eq!(seqs(&s.lease(10, 100, 10_001)), [1, 2]);
}

#[test]
fn a_partition_whose_ownership_is_not_renewed_is_not_leased() {
    let mut s = state();
    s.insert(entry(1, "a", 0), 0);
    s.insert(entry(2, "b", 1), 0);
    s.set_fresh_until(0, 1_000);
    s.set_fresh_until(1, 5_000);
    assert_eq!(seqs(&s.lease(10, 1, 999)), [1, 2]);
    assert_eq!(
        seqs(&s.lease(10, 1, 1_000)),
        [2],
        "partition 0 is not fresh"
    );
    s.set_fresh_until(0, 3_000);
    assert_eq!(seqs(&s.lease(10, 1, 2_000)), [1, 2]);
}
