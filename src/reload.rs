//! Reloading the configuration without a restart (SIGHUP, `POST /api/reload`).
//!
//! A reload reads the configuration the process started with again (the same `--config`
//! file, then the environment; without `--config` there is nothing to read again and the
//! reload is refused), validates all of it, and only then swaps the delivery
//! routing (Refiner API keys, environments, rules, mapping options) in one step
//! ([`SharedRouting::store`]). An invalid configuration is refused as a whole, with the
//! error naming the key (for a rule: `filters.<source>.rules[<rule>].<field>`); the running
//! configuration stays in force. Runs in progress finish under the routing they started
//! with, so no event is lost or delivered twice by a reload.
//!
//! What needs a restart: ingest's side of a source (adding or removing a source, its write
//! keys, webhook secret and webhook format) is refused by a reload with an error saying so;
//! any other changed section (`delivery`, `limits`, `spool`, ...) is left as it was and
//! named in [`Reloaded::restart_required`].

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::config::{ConfigError, Settings};
use crate::dispatch::routing::{Routing, SharedRouting};

/// What a successful reload applied.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Reloaded {
    pub reloaded: bool,
    pub sources: Vec<ReloadedSource>,
    /// Top-level sections that changed but only take effect after a restart.
    pub restart_required: Vec<&'static str>,
}

/// One source after a reload.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ReloadedSource {
    pub slug: String,
    pub rules: usize,
    pub environments: Vec<String>,
}

/// The configuration in force and how to read it again.
pub struct Reloader {
    file: Mutex<Option<PathBuf>>,
    current: Mutex<Settings>,
    routing: Arc<SharedRouting>,
}

impl Reloader {
    /// `settings` were loaded from `file` (or the environment alone) and `routing` was built
    /// from them.
    pub fn new(file: Option<PathBuf>, settings: Settings, routing: Arc<SharedRouting>) -> Self {
        Reloader {
            file: Mutex::new(file),
            current: Mutex::new(settings),
            routing,
        }
    }

    /// Names the file a reload reads (`serve --config`).
    pub fn set_file(&self, file: Option<PathBuf>) {
        match self.file.lock() {
            Ok(mut guard) => *guard = file,
            Err(poisoned) => *poisoned.into_inner() = file,
        }
    }

    /// What ingest would parse an event of `slug` with: the limits and the source's
    /// destination names (for the preview), or `None` for an unknown source.
    pub fn ingest_view(
        &self,
        slug: &str,
    ) -> Option<(crate::segment::Limits, crate::segment::Destinations)> {
        let current = match self.current.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        current.sources.iter().any(|s| s.slug == slug).then(|| {
            (
                current.limits.clone(),
                current.integrations.destinations(slug),
            )
        })
    }

    /// The routing delivery and the preview use.
    pub fn routing(&self) -> &Arc<SharedRouting> {
        &self.routing
    }

    /// Reads, validates and applies the configuration again (see the module header).
    pub fn reload(&self) -> Result<Reloaded, ConfigError> {
        let file = match self.file.lock() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let Some(file) = file else {
            return Err(ConfigError {
                key: "--config".into(),
                message: "the gateway was started without a configuration file: there is \
                          nothing to read again (the environment of a running process does \
                          not change)"
                    .into(),
            });
        };
        let next = Settings::load(Some(&file))?;
        self.apply(next)
    }

    /// Applies already loaded settings (validated here again).
    pub fn apply(&self, next: Settings) -> Result<Reloaded, ConfigError> {
        next.validate()?;
        let mut current = match self.current.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        ingest_unchanged(&current, &next)?;
        if current.delivery.enabled {
            next.require_refiner_keys()?;
        }
        let routing = Routing::from_settings(&next)?;
        let restart_required = restart_required(&current, &next);
        self.routing.store(routing);
        let sources = next
            .sources
            .iter()
            .map(|s| {
                let filters = next.filters.get(&s.slug);
                ReloadedSource {
                    slug: s.slug.clone(),
                    rules: filters.map_or(0, |f| f.rules.len()),
                    environments: filters
                        .map(|f| f.environments.keys().cloned().collect())
                        .unwrap_or_default(),
                }
            })
            .collect();
        let mut kept = next;
        // Sections that were not applied stay as they are in force.
        for name in &restart_required {
            copy_section(name, &current, &mut kept);
        }
        *current = kept;
        tracing::info!(
            restart_required = ?restart_required,
            "configuration reloaded: Refiner keys, environments, rules and mapping"
        );
        Ok(Reloaded {
            reloaded: true,
            sources,
            restart_required,
        })
    }
}

/// Ingest's view of the sources cannot change without a restart.
fn ingest_unchanged(current: &Settings, next: &Settings) -> Result<(), ConfigError> {
    let restart = |key: String| ConfigError {
        key,
        message: "changing the set of sources, their write keys, webhook secrets or webhook \
                  format needs a restart (a reload applies Refiner keys, environments, rules \
                  and mapping)"
            .into(),
    };
    let slugs = |s: &Settings| s.sources.iter().map(|s| s.slug.clone()).collect::<Vec<_>>();
    if slugs(current) != slugs(next) {
        return Err(restart("sources".into()));
    }
    for (old, new) in current.sources.iter().zip(&next.sources) {
        if old.write_keys != new.write_keys
            || old.webhook_secret != new.webhook_secret
            || old.webhook_format != new.webhook_format
        {
            return Err(restart(format!("sources[{}]", old.slug)));
        }
    }
    Ok(())
}

/// The top-level sections whose change a reload does not apply.
fn restart_required(current: &Settings, next: &Settings) -> Vec<&'static str> {
    let mut changed = Vec::new();
    let mut check = |name: &'static str, same: bool| {
        if !same {
            changed.push(name);
        }
    };
    check("listen", current.listen == next.listen);
    check("data_dir", current.data_dir == next.data_dir);
    check("admin_token", current.admin_token == next.admin_token);
    check("metrics_token", current.metrics_token == next.metrics_token);
    check("log_format", current.log_format == next.log_format);
    check(
        "shutdown_timeout_secs",
        current.shutdown_timeout_secs == next.shutdown_timeout_secs,
    );
    check("refiner", current.refiner == next.refiner);
    check("limits", current.limits == next.limits);
    check("spool", current.spool == next.spool);
    check("delivery", current.delivery == next.delivery);
    check("nats", current.nats == next.nats);
    check("dead_letters", current.dead_letters == next.dead_letters);
    check("integrations", current.integrations == next.integrations);
    check("engage", current.engage == next.engage);
    changed
}

/// Copies one not-applied section back from the settings in force.
fn copy_section(name: &str, from: &Settings, to: &mut Settings) {
    match name {
        "listen" => to.listen = from.listen.clone(),
        "data_dir" => to.data_dir = from.data_dir.clone(),
        "admin_token" => to.admin_token = from.admin_token.clone(),
        "metrics_token" => to.metrics_token = from.metrics_token.clone(),
        "log_format" => to.log_format = from.log_format,
        "shutdown_timeout_secs" => to.shutdown_timeout_secs = from.shutdown_timeout_secs,
        "refiner" => to.refiner = from.refiner.clone(),
        "limits" => to.limits = from.limits.clone(),
        "spool" => to.spool = from.spool.clone(),
        "delivery" => to.delivery = from.delivery.clone(),
        "nats" => to.nats = from.nats.clone(),
        "dead_letters" => to.dead_letters = from.dead_letters.clone(),
        "integrations" => to.integrations = from.integrations.clone(),
        "engage" => to.engage = from.engage.clone(),
        _ => {}
    }
}
