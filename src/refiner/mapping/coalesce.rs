//! Per-user coalescing of a batch's Refiner calls (see [`coalesce`]): pure, like the rest
//! of the mapping.

use std::collections::HashMap;

use super::{RefinerCall, UserRef};
use crate::segment::UserKey;

/// Merges a batch's calls per user, so that a user who is identified, grouped and pinged
/// several times in one batch costs one identify-user call.
///
/// The input is in delivery order; `K` identifies the event each call came from (the spool
/// sequence number). The rule, per user (same [`UserRef::key`]):
///
/// 1. A *run* is a maximal sequence of a user's identify-user calls (identify, group, ping)
///    with no track-event or delete-contact **of that same user** between them. Calls of
///    other users in between do not end a run.
/// 2. A run's calls merge into one identify-user call: contact traits merged, a later value
///    wins per key; the email beside the id is the latest one given; accounts with the same
///    `id` merged, a later value wins per key; a call without an account keeps the run's.
/// 3. An identify-user call whose account has a different `id` than the run's account ends
///    the run and starts a new one, so that both accounts receive their traits (merging would
///    lose the first account's traits).
/// 4. The merged call takes the position of the run's **last** call, and its key list holds
///    the keys of every merged call in input order. Everything else keeps its position, so
///    each user's calls stay in the input order relative to that user's track-events and
///    deletes, and the output is ordered by the last key of each entry.
/// 5. Track-events and deletes are never merged; every input key appears in exactly one
///    output entry.
pub fn coalesce<K>(calls: Vec<(K, RefinerCall)>) -> Vec<(Vec<K>, RefinerCall)> {
    let mut slots: Vec<Option<(Vec<K>, RefinerCall)>> = Vec::with_capacity(calls.len());
    // Per user key: the slot holding the user's open run.
    let mut open: HashMap<UserKey, usize> = HashMap::new();
    for (key, call) in calls {
        let user = call.user().key();
        if !matches!(call, RefinerCall::IdentifyUser { .. }) {
            open.remove(&user);
            slots.push(Some((vec![key], call)));
            continue;
        }
        let run = open
            .get(&user)
            .and_then(|&index| slots.get_mut(index))
            .and_then(|slot| match slot {
                Some((_, earlier)) if same_account(earlier, &call) => slot.take(),
                _ => None,
            });
        let entry = match run {
            Some((mut keys, earlier)) => {
                keys.push(key);
                (keys, merge(earlier, call))
            }
            None => (vec![key], call),
        };
        open.insert(user, slots.len());
        slots.push(Some(entry));
    }
    slots.into_iter().flatten().collect()
}

/// Whether two identify-user calls may merge: at most one has an account, or both
/// accounts have the same `id`.
fn same_account(earlier: &RefinerCall, later: &RefinerCall) -> bool {
    match (earlier, later) {
        (
            RefinerCall::IdentifyUser {
                account: Some(a), ..
            },
            RefinerCall::IdentifyUser {
                account: Some(b), ..
            },
        ) => a.get("id") == b.get("id"),
        (RefinerCall::IdentifyUser { .. }, RefinerCall::IdentifyUser { .. }) => true,
        _ => false,
    }
}

/// Merges two identify-user calls of one user, the later winning (see [`coalesce`]).
fn merge(earlier: RefinerCall, later: RefinerCall) -> RefinerCall {
    match (earlier, later) {
        (
            RefinerCall::IdentifyUser {
                user: earlier_user,
                traits: mut merged_traits,
                account: earlier_account,
            },
            RefinerCall::IdentifyUser {
                user,
                traits,
                account,
            },
        ) => {
            merged_traits.extend(traits);
            let user = match user {
                UserRef::Id { id, email: None } => UserRef::Id {
                    id,
                    email: earlier_user.email().map(str::to_string),
                },
                user => user,
            };
            let account = match (earlier_account, account) {
                (Some(mut merged), Some(later)) => {
                    merged.extend(later);
                    Some(merged)
                }
                (earlier, later) => later.or(earlier),
            };
            RefinerCall::IdentifyUser {
                user,
                traits: merged_traits,
                account,
            }
        }
        // Only identify-user calls are ever merged; anything else keeps the later call.
        (_, later) => later,
    }
}
