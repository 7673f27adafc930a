//! Per-source rules: filters and transforms applied to an event before it is mapped.
//!
//! Pure: no IO, no clock, no randomness; [`RuleSet::evaluate`] is a function of the rule set,
//! the event's type and its payload, never panics on any payload (property-tested), and
//! leaves the input untouched (a transformed copy is returned only when a rule changed it).
//!
//! Evaluation order: rules in the order written. A rule whose `match` holds (or that has no
//! `match`) applies its actions in order; a later rule sees the event as the earlier ones
//! left it. `drop` ends evaluation at once: the event is not forwarded and is counted as
//! skipped with reason `filtered:<rule>`. `route` picks the Refiner environment (the last
//! `route` wins). Which rules matched is reported in order, for the preview.
//!
//! Where the actions act (names are the event's own keys, before the mapping renames or
//! flattens them):
//! - contact traits: `traits` of every event except `group`, and `context.traits`;
//! - account traits: `traits` of a `group` event;
//! - `keep_traits` never removes `email`, which identifies the user;
//! - `set_trait` writes `traits.<key>` of an `identify` (no other type sends contact traits);
//! - `rename_event` renames a `track` event (`event`).
//!
//! The configuration reference is `docs/filters.md`; [`spec`] validates rules as written.

pub mod spec;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::{Map, Value};

pub use spec::{compile, ActionSpec, ConditionSpec, RuleError, RuleSpec};

/// The environment of a source's own `refiner_api_key`.
pub const DEFAULT_ENVIRONMENT: &str = "default";

/// A dotted path into the event: each segment is an object key, or an array index when the
/// value there is an array and the segment is a number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path(Vec<String>);

impl Path {
    fn lookup<'a>(&self, event: &'a Value, kind: &'a Value) -> Option<&'a Value> {
        if self.0.len() == 1 && self.0[0] == "type" {
            return Some(kind);
        }
        let mut here = event;
        for segment in &self.0 {
            here = match here {
                Value::Object(map) => map.get(segment)?,
                Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(here)
    }
}

/// A comparison of one field.
#[derive(Debug, Clone)]
pub enum Op {
    /// Equal JSON values (numbers compared by value: `1` equals `1.0`).
    Equals(Value),
    /// Not [`Op::Equals`]; true when the field is absent.
    NotEquals(Value),
    /// Equal to one of the values.
    In(Vec<Value>),
    /// Present and not null (`true`), or absent or null (`false`).
    Exists(bool),
    /// A string with this prefix.
    StartsWith(String),
    /// A number greater than this.
    Gt(f64),
    /// A number less than this.
    Lt(f64),
    /// A string the regular expression matches (anywhere; anchor with `^…$`).
    Matches(regex::Regex),
}

impl Op {
    /// Whether the operator can only hold for a present, non-null field.
    fn needs_value(&self) -> bool {
        !matches!(self, Op::NotEquals(_) | Op::Exists(_))
    }

    fn holds(&self, value: Option<&Value>) -> bool {
        let value = value.filter(|v| !v.is_null());
        match self {
            Op::Equals(expected) => value.is_some_and(|v| same(v, expected)),
            Op::NotEquals(expected) => !value.is_some_and(|v| same(v, expected)),
            Op::In(list) => value.is_some_and(|v| list.iter().any(|e| same(v, e))),
            Op::Exists(wanted) => value.is_some() == *wanted,
            Op::StartsWith(prefix) => value
                .and_then(Value::as_str)
                .is_some_and(|s| s.starts_with(prefix.as_str())),
            Op::Gt(bound) => value.and_then(Value::as_f64).is_some_and(|n| n > *bound),
            Op::Lt(bound) => value.and_then(Value::as_f64).is_some_and(|n| n < *bound),
            Op::Matches(re) => value
                .and_then(Value::as_str)
                .is_some_and(|s| re.is_match(s)),
        }
    }
}

/// JSON equality, with numbers compared by value.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y || x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// A rule's `match`.
#[derive(Debug, Clone)]
pub enum Condition {
    All(Vec<Condition>),
    Any(Vec<Condition>),
    Not(Box<Condition>),
    Field { path: Path, op: Op },
}

impl Condition {
    fn holds(&self, event: &Value, kind: &Value) -> bool {
        match self {
            Condition::All(items) => items.iter().all(|c| c.holds(event, kind)),
            Condition::Any(items) => items.iter().any(|c| c.holds(event, kind)),
            Condition::Not(inner) => !inner.holds(event, kind),
            Condition::Field { path, op } => op.holds(path.lookup(event, kind)),
        }
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Drop,
    KeepTraits(Vec<String>),
    RemoveTraits(Vec<String>),
    KeepAccountTraits(Vec<String>),
    RemoveAccountTraits(Vec<String>),
    RenameEvent(String),
    SetTrait(String, Value),
    Route(Arc<str>),
}

/// One validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    name: Arc<str>,
    when: Option<Condition>,
    actions: Vec<Action>,
}

impl Rule {
    pub fn name(&self) -> &str {
        &self.name
    }

    fn drops(&self) -> bool {
        self.actions.contains(&Action::Drop)
    }
}

/// A source's rules, validated ([`compile`]). The empty set forwards everything unchanged.
/// Shared, not copied: delivery takes the set of a source for every run of a user's events.
#[derive(Debug, Clone, Default)]
pub struct RuleSet {
    rules: Arc<[Rule]>,
}

/// What the rules decided for one event.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation<'a> {
    /// Names of the rules that matched, in order (the dropping rule last).
    pub matched: Vec<Arc<str>>,
    pub outcome: Outcome<'a>,
}

/// Forward (possibly changed, possibly to another environment) or drop.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<'a> {
    Forward {
        /// The event as the rules left it (borrowed when no rule changed it).
        payload: Cow<'a, Value>,
        /// The environment a `route` chose; `None`: the source's own key.
        environment: Option<Arc<str>>,
    },
    /// Dropped by this rule.
    Drop(Arc<str>),
}

impl RuleSet {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Applies the rules to one event of type `kind` (the type the spool stored; the field
    /// path `type` reads it).
    pub fn evaluate<'a>(&self, kind: &str, payload: &'a Value) -> Evaluation<'a> {
        let mut matched = Vec::new();
        let mut environment = None;
        let mut event = Cow::Borrowed(payload);
        if self.rules.is_empty() {
            return Evaluation {
                matched,
                outcome: Outcome::Forward {
                    payload: event,
                    environment,
                },
            };
        }
        let kind_value = Value::String(kind.to_string());
        for rule in self.rules.iter() {
            let applies = rule
                .when
                .as_ref()
                .is_none_or(|c| c.holds(&event, &kind_value));
            if !applies {
                continue;
            }
            matched.push(rule.name.clone());
            for action in &rule.actions {
                match action {
                    Action::Drop => {
                        return Evaluation {
                            matched,
                            outcome: Outcome::Drop(rule.name.clone()),
                        }
                    }
                    Action::Route(name) => {
                        environment = (&**name != DEFAULT_ENVIRONMENT).then(|| name.clone());
                    }
                    other => apply(other, kind, &mut event),
                }
            }
        }
        Evaluation {
            matched,
            outcome: Outcome::Forward {
                payload: event,
                environment,
            },
        }
    }
}

/// Applies a transform, copying the event only when something changes.
fn apply(action: &Action, kind: &str, event: &mut Cow<'_, Value>) {
    let group = kind == "group";
    match action {
        Action::KeepTraits(keys) => {
            let keep = |k: &str| k == "email" || keys.iter().any(|key| key == k);
            for at in contact_traits(group) {
                retain(event, at, &keep);
            }
        }
        Action::RemoveTraits(keys) => {
            let keep = |k: &str| !keys.iter().any(|key| key == k);
            for at in contact_traits(group) {
                retain(event, at, &keep);
            }
        }
        Action::KeepAccountTraits(keys) if group => {
            retain(event, &["traits"], &|k: &str| {
                keys.iter().any(|key| key == k)
            });
        }
        Action::RemoveAccountTraits(keys) if group => {
            retain(event, &["traits"], &|k: &str| {
                !keys.iter().any(|key| key == k)
            });
        }
        Action::RenameEvent(name)
            if kind == "track"
                && event.get("event").and_then(Value::as_str) != Some(name.as_str()) =>
        {
            if let Some(map) = event.to_mut().as_object_mut() {
                map.insert("event".into(), Value::String(name.clone()));
            }
        }
        Action::SetTrait(key, value) if kind == "identify" => {
            if let Some(map) = event.to_mut().as_object_mut() {
                let traits = map
                    .entry("traits")
                    .or_insert_with(|| Value::Object(Map::new()));
                if !traits.is_object() {
                    *traits = Value::Object(Map::new());
                }
                if let Some(traits) = traits.as_object_mut() {
                    traits.insert(key.clone(), value.clone());
                }
            }
        }
        _ => {}
    }
}

/// Where contact traits live in an event (see the module header).
fn contact_traits(group: bool) -> &'static [&'static [&'static str]] {
    if group {
        &[&["context", "traits"]]
    } else {
        &[&["traits"], &["context", "traits"]]
    }
}

/// Removes the keys of the object at `at` that `keep` refuses (no copy when none is).
fn retain(event: &mut Cow<'_, Value>, at: &[&str], keep: &dyn Fn(&str) -> bool) {
    let object = at
        .iter()
        .try_fold(&**event, |here, key| here.get(key))
        .and_then(Value::as_object);
    if !object.is_some_and(|map| map.keys().any(|k| !keep(k))) {
        return;
    }
    let target = at
        .iter()
        .try_fold(event.to_mut(), |here, key| here.get_mut(*key));
    if let Some(Value::Object(map)) = target {
        map.retain(|k, _| keep(k));
    }
}
