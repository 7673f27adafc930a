//! What delivery decides per source, as one snapshot: API keys, environments, rules and the
//! mapping options; and the preview of one event under it.
//!
//! The snapshot is swapped as a whole ([`SharedRouting::store`]) when the configuration is
//! reloaded. A user's run loads it once ([`SharedRouting::load`]) and keeps it to the end, so
//! every event of a run sees one consistent rule set and key set, old or new, never a mix.
//! Events are stored as received; the rules in force when an event is delivered decide what
//! Refiner gets (`docs/filters.md`, "When rules run").

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use serde::Serialize;
use serde_json::Value;

use crate::config::{ConfigError, Settings, SourceSettings};
use crate::refiner::filters::{Outcome, RuleSet, DEFAULT_ENVIRONMENT};
use crate::refiner::mapping::{self, Mapped, MappingOptions, RefinerCall};

/// The prefix of the skip reason of an event a rule dropped: `filtered:<rule>`.
pub const FILTERED: &str = "filtered:";

/// One source as delivery sees it.
#[derive(Debug, Clone, Default)]
pub struct SourceRoute {
    /// The source's own key (`refiner_api_key`), the `default` environment.
    pub api_key: Option<Arc<str>>,
    /// Other environments' keys by name.
    pub environments: HashMap<String, Arc<str>>,
    pub rules: RuleSet,
}

impl SourceRoute {
    /// The key of an environment (`None`: the default one).
    pub fn key_of(&self, environment: Option<&str>) -> Option<Arc<str>> {
        match environment {
            None => self.api_key.clone(),
            Some(DEFAULT_ENVIRONMENT) => self.api_key.clone(),
            Some(name) => self.environments.get(name).cloned(),
        }
    }
}

/// Every source's route and the mapping options.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    pub sources: HashMap<String, SourceRoute>,
    pub mapping: MappingOptions,
}

impl Routing {
    /// The routing of validated settings (rules compiled again; an error is impossible after
    /// [`Settings::validate`] but is passed on rather than assumed away).
    pub fn from_settings(settings: &Settings) -> Result<Routing, ConfigError> {
        let mut routing = Routing::without_rules(&settings.sources, settings.mapping.clone());
        for (slug, filters) in &settings.filters {
            let Some(route) = routing.sources.get_mut(slug) else {
                continue;
            };
            route.rules = filters.compile(slug)?;
            route.environments = filters
                .environments
                .iter()
                .map(|(name, key)| (name.clone(), Arc::from(key.expose())))
                .collect();
        }
        Ok(routing)
    }

    /// Sources' keys without environments or rules.
    pub fn without_rules(sources: &[SourceSettings], mapping: MappingOptions) -> Routing {
        let sources = sources
            .iter()
            .map(|s| {
                let route = SourceRoute {
                    api_key: s.refiner_api_key.as_ref().map(|k| Arc::from(k.expose())),
                    ..SourceRoute::default()
                };
                (s.slug.clone(), route)
            })
            .collect();
        Routing { sources, mapping }
    }

    /// The rules' and the mapping's verdict on one stored event (see [`Verdict`]).
    pub fn decide(&self, source: &str, kind: &str, payload: &Value) -> Verdict {
        let evaluation = match self.sources.get(source) {
            Some(route) => route.rules.evaluate(kind, payload),
            None => RuleSet::default().evaluate(kind, payload),
        };
        let decision = match evaluation.outcome {
            Outcome::Drop(rule) => Decision::Dropped(format!("{FILTERED}{rule}")),
            Outcome::Forward {
                payload,
                environment,
            } => Decision::Mapped {
                environment,
                mapped: mapping::map_named_event(kind, &payload, &self.mapping),
            },
        };
        Verdict {
            matched: evaluation.matched,
            decision,
        }
    }
}

/// What becomes of one event: the rules that matched (in order), and the decision.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub matched: Vec<Arc<str>>,
    pub decision: Decision,
}

/// Dropped by a rule, or mapped (after the rules' transforms) for an environment.
#[derive(Debug, Clone)]
pub enum Decision {
    /// The skip reason: `filtered:<rule>`.
    Dropped(String),
    Mapped {
        /// The environment a rule routed to (`None`: the source's own key).
        environment: Option<Arc<str>>,
        mapped: Mapped,
    },
}

/// The routing in force, swapped whole on reload.
#[derive(Debug, Default)]
pub struct SharedRouting(RwLock<Arc<Routing>>);

impl SharedRouting {
    pub fn new(routing: Routing) -> SharedRouting {
        SharedRouting(RwLock::new(Arc::new(routing)))
    }

    /// The current snapshot (a reference count, taken under a lock held for no longer).
    pub fn load(&self) -> Arc<Routing> {
        match self.0.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the snapshot; runs in progress finish with the one they loaded.
    pub fn store(&self, routing: Routing) {
        let routing = Arc::new(routing);
        match self.0.write() {
            Ok(mut guard) => *guard = routing,
            Err(poisoned) => *poisoned.into_inner() = routing,
        }
    }
}

/// One event's preview: what Refiner would receive under the current routing.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Preview {
    pub outcome: &'static str,
    pub reason: Option<String>,
    pub matched_rules: Vec<String>,
    pub environment: String,
    pub calls: Vec<PreviewCall>,
}

/// One rendered Refiner call.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PreviewCall {
    pub method: &'static str,
    pub path: &'static str,
    pub body: Value,
}

impl Routing {
    /// The preview of one event of `source`: the same [`Routing::decide`] delivery uses,
    /// and the call rendered as delivery renders it. A ping is shown as the call it becomes
    /// when the user was not pinged within `delivery.ping_interval_secs`.
    pub fn preview(&self, source: &str, kind: &str, payload: &Value) -> Preview {
        let verdict = self.decide(source, kind, payload);
        let matched_rules: Vec<String> = verdict.matched.iter().map(|r| r.to_string()).collect();
        let (environment, mapped) = match verdict.decision {
            Decision::Dropped(reason) => (None, Err(reason)),
            Decision::Mapped {
                environment,
                mapped,
            } => match mapped {
                Mapped::Call(call, _) => (environment, Ok(call)),
                Mapped::Ping(user) => (environment, Ok(RefinerCall::ping(user))),
                Mapped::NotForwarded(reason) => (environment, Err(reason.as_str().to_string())),
            },
        };
        let environment =
            environment.map_or_else(|| DEFAULT_ENVIRONMENT.to_string(), |e| e.to_string());
        match mapped {
            Err(reason) => Preview {
                outcome: "skipped",
                reason: Some(reason),
                matched_rules,
                environment,
                calls: Vec::new(),
            },
            Ok(call) => {
                let request = call.to_request();
                Preview {
                    outcome: "forward",
                    reason: None,
                    matched_rules,
                    environment,
                    calls: vec![PreviewCall {
                        method: request.method.as_str(),
                        path: request.path,
                        body: request.body,
                    }],
                }
            }
        }
    }
}
