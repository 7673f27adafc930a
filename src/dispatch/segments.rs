//! Which Refiner manual segment an Engage audience syncs to.
//!
//! An audience's segment is the one `[engage] segments` names, else (with
//! `sync_segments`) the manual segment whose name is the audience key (see
//! `mapping::segment_name_matches`), from Refiner's `GET /segments`. The list is cached per
//! API key for `segments_ttl_secs`; one lookup at a time per gateway, so a burst of
//! memberships costs one `GET /segments`, not one each.
//!
//! Failure semantics: a failed lookup is the membership call's failure (retried like any
//! call, or dead-lettered on a refusal); an audience without a segment is
//! [`Resolved::Missing`], reported by the caller and never guessed (no other segment, no
//! segment created).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::keys::WARN_EVERY;
use crate::config::EngageSettings;
use crate::refiner::client::{Outcome, RefinerClient, SegmentInfo};
use crate::refiner::mapping::segment_name_matches;

/// What an audience's segment is.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Resolved {
    /// The manual segment's uuid.
    Segment(String),
    /// No manual segment for this audience.
    Missing,
    /// `GET /segments` failed.
    Failed(Outcome),
}

/// A looked-up list: when it was read, and the manual segments in it.
type CachedList = (Instant, Arc<Vec<SegmentInfo>>);

/// Configured segments, and the looked-up lists per API key.
pub(super) struct Segments {
    configured: BTreeMap<String, String>,
    by_name: bool,
    ttl: Duration,
    /// Per API key: when the list was read, and the manual segments in it.
    cache: Mutex<HashMap<String, CachedList>>,
    /// Per (source, audience): when a missing segment was last logged, and how many reports
    /// were held back since.
    warned: std::sync::Mutex<HashMap<(String, String), (Instant, u64)>>,
}

impl Segments {
    pub(super) fn new(settings: &EngageSettings) -> Segments {
        Segments {
            configured: settings.segments.clone(),
            by_name: settings.sync_segments,
            ttl: Duration::from_secs(settings.segments_ttl_secs),
            cache: Mutex::new(HashMap::new()),
            warned: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Whether an audience's membership syncs to a manual segment at all.
    pub(super) fn syncs(&self, audience: &str) -> bool {
        self.by_name || self.configured.contains_key(audience)
    }

    /// Logs a missing segment as a warning, at most once per [`WARN_EVERY`] per source and
    /// audience (the metric counts every one).
    pub(super) fn warn_missing(&self, source: &str, audience: &str) {
        let now = Instant::now();
        let suppressed = {
            let mut warned = self
                .warned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let key = (source.to_string(), audience.to_string());
            let entry = warned.entry(key).or_insert((now, u64::MAX));
            if entry.1 != u64::MAX && now.duration_since(entry.0) < WARN_EVERY {
                entry.1 += 1;
                return;
            }
            let suppressed = if entry.1 == u64::MAX { 0 } else { entry.1 };
            *entry = (now, 0);
            suppressed
        };
        tracing::warn!(
            source,
            audience,
            suppressed,
            "no Refiner manual segment for this Engage audience; membership not synced \
             (name one in [engage] segments, or create a manual segment named after the audience)"
        );
    }

    /// The segment of `audience` for the account of `api_key`.
    pub(super) async fn resolve(
        &self,
        client: &RefinerClient,
        api_key: &str,
        audience: &str,
    ) -> Resolved {
        if let Some(uuid) = self.configured.get(audience) {
            return Resolved::Segment(uuid.clone());
        }
        if !self.by_name {
            return Resolved::Missing;
        }
        let list = {
            let mut cache = self.cache.lock().await;
            match cache.get(api_key) {
                Some((read_at, list)) if read_at.elapsed() < self.ttl => list.clone(),
                _ => match client.list_segments(api_key).await {
                    Ok(all) => {
                        let manual: Vec<SegmentInfo> =
                            all.into_iter().filter(|s| s.is_manual).collect();
                        let list = Arc::new(manual);
                        cache.insert(api_key.to_string(), (Instant::now(), list.clone()));
                        list
                    }
                    Err(outcome) => return Resolved::Failed(outcome),
                },
            }
        };
        find(&list, audience)
    }
}

/// The manual segment named after `audience`, if exactly one is (two would be a guess).
fn find(manual: &[SegmentInfo], audience: &str) -> Resolved {
    let mut matching = manual
        .iter()
        .filter(|s| segment_name_matches(&s.name, audience));
    match (matching.next(), matching.next()) {
        (Some(segment), None) => Resolved::Segment(segment.uuid.clone()),
        _ => Resolved::Missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(uuid: &str, name: &str) -> SegmentInfo {
        SegmentInfo {
            uuid: uuid.into(),
            name: name.into(),
            is_manual: true,
        }
    }

    #[test]
    fn finds_the_one_segment_named_after_the_audience() {
        let list = [segment("a", "Power Users"), segment("b", "Churn risk")];
        assert_eq!(find(&list, "power_users"), Resolved::Segment("a".into()));
        assert_eq!(find(&list, "churn_risk"), Resolved::Segment("b".into()));
        assert_eq!(find(&list, "trial_users"), Resolved::Missing);
    }

    #[test]
    fn two_segments_of_the_same_name_are_no_answer() {
        let list = [segment("a", "Power Users"), segment("b", "power_users")];
        assert_eq!(find(&list, "power_users"), Resolved::Missing);
    }

    fn client_of(base_url: String) -> RefinerClient {
        RefinerClient::new(&crate::refiner::client::ClientOptions {
            base_url,
            timeout: Duration::from_secs(5),
            max_idle_per_host: 1,
        })
        .expect("client")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lookups_retry_a_failure_then_cache_the_list_per_key() {
        use crate::sim::{self, Faults, SegmentSpec, SimOptions};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let options = SimOptions {
            segments: vec![SegmentSpec::parse("Power Users=seg-power").expect("spec")],
            faults: Faults {
                count_503: 1,
                ..Faults::none()
            },
            workers: Some(1),
            ..SimOptions::with_key("k")
        };
        let sim = sim::spawn(listener, options).await.expect("simulator");
        let client = client_of(sim.url());
        let segments = Segments::new(&EngageSettings {
            sync_segments: true,
            ..EngageSettings::default()
        });
        let failed = segments.resolve(&client, "k", "power_users").await;
        assert!(
            matches!(
                failed,
                Resolved::Failed(Outcome::Retry {
                    status: Some(503),
                    ..
                })
            ),
            "{failed:?}"
        );
        assert_eq!(
            segments.resolve(&client, "k", "power_users").await,
            Resolved::Segment("seg-power".into())
        );
        // Created after the list was read: not seen before the TTL ends (never guessed).
        sim.state()
            .define_segment(SegmentSpec::parse("beta=seg-beta").expect("spec"));
        assert_eq!(
            segments.resolve(&client, "k", "beta").await,
            Resolved::Missing
        );
        let lookups = sim
            .state()
            .calls()
            .iter()
            .filter(|c| c.path == "/v1/segments")
            .count();
        assert_eq!(lookups, 2, "one failed, one cached");
        // Another key reads its own list.
        let refused = segments.resolve(&client, "other", "beta").await;
        assert!(
            matches!(
                refused,
                Resolved::Failed(Outcome::Reject { status: 401, .. })
            ),
            "{refused:?}"
        );
        sim.stop().await;
    }

    #[tokio::test]
    async fn configured_segments_need_no_lookup_and_others_are_missing_without_by_name() {
        let settings = EngageSettings {
            segments: BTreeMap::from([("vip".to_string(), "seg-vip".to_string())]),
            ..EngageSettings::default()
        };
        let segments = Segments::new(&settings);
        // A client pointing nowhere: any lookup would fail with a connection error.
        let client = client_of("http://127.0.0.1:9/v1".into());
        assert_eq!(
            segments.resolve(&client, "k", "vip").await,
            Resolved::Segment("seg-vip".into())
        );
        assert_eq!(
            segments.resolve(&client, "k", "other").await,
            Resolved::Missing
        );
    }
}
