//! Unit tests of what bounds a request before and while it is parsed: the `writeKey` scan
//! that runs before authentication, the outline of webhook arrays, and the size of events
//! with the batch level merged into them.

use std::time::{Duration, Instant};

use serde_json::json;

use super::oracle;
use super::tests::arrival;
use super::*;

const ITEM: &str = r#"{"type":"page","anonymousId":"a"}"#;

/// `{"context":{"k":"v"},"batch":[ITEM × count]}`: each item merges to its text plus 8 bytes
/// (`k`: 1, `"v"`: 3, and 4).
fn batch_with_context(count: usize) -> String {
    let items = vec![ITEM; count].join(",");
    format!(r#"{{"context":{{"k":"v"}},"batch":[{items}]}}"#)
}

fn both(body: &str, limits: &Limits) -> Result<usize, Reject> {
    refusals(body, limits).map(|(items, _)| items)
}

/// The events a batch keeps, and why the others were refused one by one (checked against
/// the oracle).
fn refusals(body: &str, limits: &Limits) -> Result<(usize, Vec<Reject>), Reject> {
    let outline = |parsed: Parsed| {
        let reasons = parsed.refused.into_iter().map(|r| r.reason).collect();
        (parsed.items.len(), reasons)
    };
    let production = parse_batch(body.as_bytes(), arrival(limits)).map(outline);
    let tree = oracle::parse_batch(body.as_bytes(), arrival(limits)).map(outline);
    assert_eq!(production, tree, "the oracle disagrees on {body}");
    production
}

#[test]
fn the_merged_event_limit_is_inclusive() {
    let merged = ITEM.len() + 8;
    let exact = Limits {
        max_event_bytes: merged,
        ..Limits::default()
    };
    assert_eq!(both(&batch_with_context(3), &exact), Ok(3));
    let smaller = Limits {
        max_event_bytes: merged - 1,
        ..Limits::default()
    };
    let (kept, refused) = refusals(&batch_with_context(3), &smaller).expect("200");
    assert_eq!(kept, 0);
    assert_eq!(refused.len(), 3);
    assert_eq!(
        refused[0],
        Reject::MergedEventTooLarge {
            index: 0,
            size: merged,
            limit: merged - 1,
        }
    );
    let message = refused[0].to_string();
    assert!(
        message.contains("event 0") && message.contains("merged"),
        "{message}"
    );
}

#[test]
fn own_keys_are_not_counted_again_and_sent_at_is() {
    // The item has its own `k`: the batch's adds nothing.
    let own = r#"{"type":"page","anonymousId":"a","context":{"k":"mine"}}"#;
    let limits = Limits {
        max_event_bytes: own.len(),
        ..Limits::default()
    };
    let body = format!(
        r#"{{"context":{{"k":"{}"}},"batch":[{own}]}}"#,
        "v".repeat(500)
    );
    assert_eq!(both(&body, &limits), Ok(1));
    // A batch sentAt counts as its member: `sentAt` (6), its JSON, and 4.
    let sent_at = "\"2025-01-02T03:04:05.000Z\"";
    let body = format!(r#"{{"sentAt":{sent_at},"batch":[{ITEM}]}}"#);
    let expected = ITEM.len() + 6 + sent_at.len() + 4;
    let tight = Limits {
        max_event_bytes: expected - 1,
        ..Limits::default()
    };
    let (_, refused) = refusals(&body, &tight).expect("200");
    assert!(matches!(
        refused[..],
        [Reject::MergedEventTooLarge { size, .. }] if size == expected
    ));
}

#[test]
fn the_merged_total_of_a_batch_is_bounded() {
    let per_event = ITEM.len() + 8;
    let limits = Limits {
        max_batch_merged_bytes: 3 * per_event,
        ..Limits::default()
    };
    assert_eq!(both(&batch_with_context(3), &limits), Ok(3));
    let limits = Limits {
        max_batch_merged_bytes: 3 * per_event - 1,
        ..Limits::default()
    };
    let refused = both(&batch_with_context(3), &limits);
    assert_eq!(
        refused,
        Err(Reject::MergedBatchTooLarge {
            limit: 3 * per_event - 1
        })
    );
    assert_eq!(refused.expect_err("refused").code(), "payload_too_large");
}

#[test]
fn a_batch_context_copied_into_every_event_refuses_every_event_without_copying() {
    // The amplification: 2,500 tiny events and a 380 KB batch context (about 511 KB).
    let context = json!({"blob": "x".repeat(380 * 1024)}).to_string();
    let items: Vec<String> = (0..2500)
        .map(|i| format!(r#"{{"type":"track","userId":"u{i:04}","event":"e"}}"#))
        .collect();
    let body = format!(r#"{{"context":{context},"batch":[{}]}}"#, items.join(","));
    let limits = Limits::default();
    assert!(body.len() > 500_000 && body.len() <= limits.max_batch_bytes);
    let started = Instant::now();
    let parsed = parse_batch(body.as_bytes(), arrival(&limits)).expect("200");
    assert!(parsed.items.is_empty());
    assert_eq!(parsed.refused.len(), 2500);
    assert!(matches!(
        parsed.refused[0].reason,
        Reject::MergedEventTooLarge { index: 0, size, limit: 32_768 } if size > 380 * 1024
    ));
    // What is kept of them is their own text, not the context.
    let kept: usize = parsed.refused.iter().map(|r| r.raw.len()).sum();
    assert!(kept < 200 * 1024, "{kept}");
    // Refused without writing 2,500 copies (which takes seconds and a gigabyte).
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[test]
fn the_write_key_scan_reads_the_top_level_only() {
    let key = |body: &str| body_write_key(body.as_bytes());
    assert_eq!(
        key(r#"{"batch":[{"writeKey":"inner"}],"writeKey":"outer"}"#),
        Ok(Some("outer".into()))
    );
    assert_eq!(key(r#"{"batch":[{"writeKey":"inner"}]}"#), Ok(None));
    assert_eq!(
        key(r#"{"writeKey":"a","writeKey":"b\u0021"}"#),
        Ok(Some("b!".into()))
    );
    assert_eq!(key(r#"{"writeKey":5}"#), Ok(None));
    assert_eq!(key(r#"[{"writeKey":"k"}]"#), Ok(None));
    // A member the parse may refuse later (a number out of range) does not hide the key:
    // the parse's rules apply once the request is authenticated.
    assert_eq!(key(r#"{"writeKey":"k","n":1e400}"#), Ok(Some("k".into())));
    assert!(matches!(
        key(r#"{"writeKey":"k""#),
        Err(Reject::InvalidJson(_))
    ));
    assert!(matches!(key(""), Err(Reject::InvalidJson(_))));
}

#[test]
fn array_outlines_agree_with_collecting_the_elements() {
    for body in [
        "[]",
        " [ 1 ]",
        r#"[{"a" : 1} , 2, "x"]"#,
        "[1,",
        "[1] x",
        "{}",
        "[\"\\ud800\"]",
    ] {
        let collected: Option<Vec<&serde_json::value::RawValue>> =
            serde_json::from_slice(body.as_bytes()).ok();
        let outline = array_outline(body.as_bytes());
        assert_eq!(
            outline.as_ref().map(|o| o.count),
            collected.as_ref().map(Vec::len),
            "{body}"
        );
        assert_eq!(
            first_array_element(body.as_bytes()),
            collected
                .as_ref()
                .and_then(|items| items.first())
                .map(|raw| raw.get().as_bytes()),
            "{body}"
        );
    }
    assert_eq!(
        first_array_element(br#"[ {"a" : 1} , 2]"#),
        Some(&br#"{"a" : 1}"#[..])
    );
}

#[test]
fn a_webhook_array_over_the_count_is_refused_with_its_count() {
    let body = format!("[{}1]", "1,".repeat(9_999));
    assert_eq!(
        parse_webhook(body.as_bytes(), arrival(&Limits::default())),
        Err(Reject::TooManyEvents {
            count: 10_000,
            limit: 4000,
        })
    );
}
