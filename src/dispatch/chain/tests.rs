use serde_json::Map;

use super::*;
use crate::refiner::mapping::UserRef;
use crate::segment::{EventType, UserKey};

fn track(seq: i64, user: &str) -> (Vec<i64>, RefinerCall) {
    (
        vec![seq],
        RefinerCall::TrackEvent {
            user: UserRef::id(user),
            event: format!("e{seq}"),
        },
    )
}

fn identify(seq: i64, user: &str) -> (Vec<i64>, RefinerCall) {
    (
        vec![seq],
        RefinerCall::IdentifyUser {
            user: UserRef::id(user),
            traits: Map::new(),
            account: None,
        },
    )
}

fn shape(steps: &[Calls]) -> Vec<Vec<i64>> {
    steps
        .iter()
        .map(|step| step.iter().flat_map(|(seqs, _)| seqs.clone()).collect())
        .collect()
}

#[test]
fn track_runs_share_a_step_and_state_changes_stand_alone() {
    let calls = vec![
        track(1, "u"),
        track(2, "u"),
        identify(3, "u"),
        track(4, "u"),
        identify(5, "u"),
        identify(6, "u"),
        track(7, "u"),
        track(8, "u"),
        track(9, "u"),
    ];
    assert_eq!(
        shape(&steps(calls.clone(), 16)),
        vec![
            vec![1, 2],
            vec![3],
            vec![4],
            vec![5],
            vec![6],
            vec![7, 8, 9]
        ]
    );
    assert_eq!(
        shape(&steps(calls, 1)),
        (1..=9).map(|s| vec![s]).collect::<Vec<_>>(),
        "strict: one call at a time"
    );
}

fn sync(seq: i64, user: &str, member: bool) -> (Vec<i64>, RefinerCall) {
    (
        vec![seq],
        RefinerCall::SyncSegment {
            user: UserRef::id(user),
            audience: "power_users".into(),
            member,
            segment: None,
        },
    )
}

#[test]
fn sync_segment_calls_are_state_changes_that_stand_alone() {
    // An enter and an exit (each after its attribute's identify-user call, which
    // delivers no event of its own) between tracks: never in flight beside another call.
    let calls = vec![
        track(1, "u"),
        (vec![], identify(2, "u").1),
        sync(2, "u", true),
        track(3, "u"),
        (vec![], identify(4, "u").1),
        sync(4, "u", false),
        track(5, "u"),
    ];
    assert_eq!(
        shape(&steps(calls, 16)),
        vec![vec![1], vec![], vec![2], vec![3], vec![], vec![4], vec![5]]
    );
}

fn leased(seq: i64, attempts: u32, received_at_ms: i64) -> Leased {
    Leased {
        seq,
        source: "web".into(),
        message_id: format!("m{seq}"),
        kind: EventType::Track,
        user_key: UserKey::user_id("u"),
        payload: Vec::new(),
        attempts,
        received_at_ms,
    }
}

const POLICY: Policy = Policy {
    retry_base_ms: 1_000,
    retry_cap_ms: 600_000,
    retry_floor_429_ms: 2_000,
    max_age_ms: 86_400_000,
};

fn apply_to(outcome: Outcome, events: &[Leased], now: i64) -> (Verdict, Settlement) {
    let by_seq = events.iter().map(|e| (e.seq, e)).collect();
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    let mut out = Settlement::default();
    let verdict = apply(&outcome, &seqs, &by_seq, &POLICY, now, 0.5, &mut out);
    (verdict, out)
}

#[test]
fn a_2xx_acks_every_coalesced_event() {
    let events = [leased(1, 0, 0), leased(2, 0, 0)];
    let (verdict, out) = apply_to(
        Outcome::Delivered {
            status: 200,
            body: String::new(),
        },
        &events,
        10,
    );
    assert_eq!(verdict, Verdict::Go);
    assert_eq!(out.acked, vec![1, 2]);
}

#[test]
fn a_transient_failure_retries_with_backoff_and_stops_the_user() {
    let events = [leased(1, 3, 0)];
    let outcome = Outcome::Retry {
        kind: Failure::Status(503),
        status: Some(503),
        retry_after: None,
        error: "HTTP 503".into(),
    };
    let (verdict, out) = apply_to(outcome, &events, 1_000);
    assert_eq!(verdict, Verdict::Stop);
    // 0.5 × 1 s × 2^3
    assert_eq!(out.retried[0].next_attempt_at_ms, 1_000 + 4_000);
    assert_eq!(out.retried[0].status, Some(503));
}

#[test]
fn a_429_waits_at_least_retry_after_and_the_floor() {
    let events = [leased(1, 0, 0)];
    let outcome = |after| Outcome::Retry {
        kind: Failure::Status(429),
        status: Some(429),
        retry_after: after,
        error: "HTTP 429".into(),
    };
    let (_, out) = apply_to(outcome(None), &events, 0);
    assert_eq!(out.retried[0].next_attempt_at_ms, 2_000, "the 429 floor");
    let (_, out) = apply_to(outcome(Some(Duration::from_secs(30))), &events, 0);
    assert_eq!(out.retried[0].next_attempt_at_ms, 30_000, "Retry-After");
}

#[test]
fn a_failure_of_a_too_old_event_dead_letters_it() {
    let events = [leased(1, 7, 0)];
    let outcome = Outcome::Retry {
        kind: Failure::Timeout,
        status: None,
        retry_after: None,
        error: "timeout".into(),
    };
    let (verdict, out) = apply_to(outcome, &events, POLICY.max_age_ms + 1);
    assert_eq!(verdict, Verdict::Go);
    assert!(out.retried.is_empty());
    assert_eq!(out.dead[0].error, "gave up after 8 attempts: timeout");
}

#[test]
fn a_refused_key_dead_letters_nothing() {
    for status in [401, 403] {
        let events = [leased(1, 0, 0)];
        let outcome = Outcome::Reject {
            status,
            body: "unauthorized".into(),
        };
        let (verdict, out) = apply_to(outcome, &events, 0);
        assert_eq!(verdict, Verdict::Refused);
        assert!(out.is_empty(), "{status}: {out:?}");
    }
}

#[test]
fn other_refusals_dead_letter_with_the_answer() {
    let events = [leased(1, 0, 0)];
    let outcome = Outcome::Reject {
        status: 422,
        body: "bad".into(),
    };
    let (verdict, out) = apply_to(outcome, &events, 0);
    assert_eq!(verdict, Verdict::Go);
    assert_eq!(out.dead[0].status, Some(422));
    assert_eq!(out.dead[0].error, "bad");
}
