//! Rules as written in the configuration file, and their validation into a [`RuleSet`].
//!
//! A rule is plain data: `name`, an optional `match` (a condition tree) and `actions`. Each
//! condition and each action is a table with exactly one operator or action key, so a typo
//! is an unknown key (refused by serde) and two keys in one table are refused here.
//! [`compile`] checks everything a rule could get wrong and names the rule and the field in
//! its error: limits (rules, depth, paths, regular expressions), environments that exist,
//! and rules that can never match (an empty `any` or `in`, a `type` that is not a Segment
//! type, contradictory bounds, a rule after one that drops every event).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;

use super::{Action, Condition, Op, Path, Rule, RuleSet};

/// Most rules per source.
pub const MAX_RULES: usize = 256;
/// Most conditions in one rule's `match` (every node of the tree counts).
pub const MAX_CONDITIONS: usize = 256;
/// Deepest nesting of `all` / `any` / `not`.
pub const MAX_DEPTH: usize = 16;
/// Most segments of a field path (`context.traits.email` has 3).
pub const MAX_PATH_SEGMENTS: usize = 16;
/// Longest regular expression, in bytes.
pub const MAX_PATTERN_LEN: usize = 512;
/// Largest compiled regular expression (the `regex` crate's `size_limit`), in bytes.
pub const MAX_REGEX_BYTES: usize = 256 * 1024;
/// Most actions per rule, and most keys in one trait list.
pub const MAX_ACTIONS: usize = 64;

/// The Segment types a `type` condition may name.
const TYPES: [&str; 7] = [
    "identify", "track", "page", "screen", "group", "alias", "delete",
];

/// One condition as written: exactly one of `all`, `any`, `not`, or `field` with exactly one
/// operator.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ConditionSpec {
    pub all: Option<Vec<ConditionSpec>>,
    pub any: Option<Vec<ConditionSpec>>,
    pub not: Option<Box<ConditionSpec>>,
    /// A dotted JSON path into the event (`event`, `type`, `traits.plan`, `context.ip`).
    pub field: Option<String>,
    pub equals: Option<Value>,
    pub not_equals: Option<Value>,
    #[serde(rename = "in")]
    pub in_list: Option<Vec<Value>>,
    pub exists: Option<bool>,
    pub starts_with: Option<String>,
    pub gt: Option<f64>,
    pub lt: Option<f64>,
    pub matches: Option<String>,
}

/// One action as written: exactly one action key (`value` goes with `set_trait`).
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ActionSpec {
    pub drop: Option<bool>,
    pub keep_traits: Option<Vec<String>>,
    pub remove_traits: Option<Vec<String>>,
    pub keep_account_traits: Option<Vec<String>>,
    pub remove_account_traits: Option<Vec<String>>,
    pub rename_event: Option<String>,
    pub set_trait: Option<String>,
    pub value: Option<Value>,
    pub remove_trait: Option<String>,
    pub route: Option<String>,
}

/// One rule as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Unique within the source: `[A-Za-z0-9_.-]`, 1–64 characters. Skips are counted as
    /// `filtered:<name>`.
    pub name: String,
    /// Which events the rule applies to; absent: every event.
    #[serde(rename = "match", default)]
    pub when: Option<ConditionSpec>,
    pub actions: Vec<ActionSpec>,
}

/// Why a rule set was refused: the rule (its name, or its position when the name itself is
/// the problem), the field within it, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule `{rule}`: {field}: {message}")]
pub struct RuleError {
    pub rule: String,
    pub field: String,
    pub message: String,
}

/// Validates `rules` into a [`RuleSet`]; `environments` are the names `route` may use.
pub fn compile(
    rules: &[RuleSpec],
    environments: &BTreeMap<String, impl Sized>,
) -> Result<RuleSet, RuleError> {
    if rules.len() > MAX_RULES {
        return Err(RuleError {
            rule: format!("#{}", MAX_RULES + 1),
            field: "rules".into(),
            message: format!("at most {MAX_RULES} rules per source"),
        });
    }
    let mut names = HashSet::new();
    let mut compiled: Vec<Rule> = Vec::with_capacity(rules.len());
    for (index, spec) in rules.iter().enumerate() {
        let rule = compile_rule(index, spec, environments)?;
        if !names.insert(spec.name.clone()) {
            return Err(fail(&spec.name, "name", "appears twice in this source"));
        }
        if let Some(before) = compiled.iter().find(|r| r.when.is_none() && r.drops()) {
            return Err(fail(
                &spec.name,
                "match",
                format!(
                    "can never match: rule `{}` before it drops every event",
                    before.name
                ),
            ));
        }
        compiled.push(rule);
    }
    Ok(RuleSet {
        rules: compiled.into(),
    })
}

fn fail(rule: &str, field: &str, message: impl Into<String>) -> RuleError {
    RuleError {
        rule: rule.into(),
        field: field.into(),
        message: message.into(),
    }
}

fn compile_rule(
    index: usize,
    spec: &RuleSpec,
    environments: &BTreeMap<String, impl Sized>,
) -> Result<Rule, RuleError> {
    let name = &spec.name;
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if !valid {
        return Err(fail(
            &format!("#{}", index + 1),
            "name",
            format!("`{name}` must be 1-64 characters of A-Z, a-z, 0-9, _, - and ."),
        ));
    }
    let when = match &spec.when {
        Some(condition) => {
            let mut budget = MAX_CONDITIONS;
            let compiled = condition_of(name, "match", condition, 0, &mut budget)?;
            if never(&compiled) {
                return Err(fail(name, "match", "can never match any event"));
            }
            Some(compiled)
        }
        None => None,
    };
    if spec.actions.is_empty() {
        return Err(fail(name, "actions", "at least one action is required"));
    }
    if spec.actions.len() > MAX_ACTIONS {
        return Err(fail(
            name,
            "actions",
            format!("at most {MAX_ACTIONS} actions per rule"),
        ));
    }
    let actions = spec
        .actions
        .iter()
        .enumerate()
        .map(|(i, action)| action_of(name, &format!("actions[{i}]"), action, environments))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Rule {
        name: Arc::from(name.as_str()),
        when,
        actions,
    })
}

/// The one key set in a table, or an error naming what is wrong.
fn only_one<'a>(
    rule: &str,
    at: &str,
    set: &[(&'a str, bool)],
    what: &str,
) -> Result<&'a str, RuleError> {
    let present: Vec<&str> = set.iter().filter(|(_, on)| *on).map(|(k, _)| *k).collect();
    match present.as_slice() {
        [one] => Ok(one),
        [] => Err(fail(rule, at, format!("needs one of {what}"))),
        many => Err(fail(
            rule,
            at,
            format!("has {} where one is allowed", many.join(" and ")),
        )),
    }
}

fn condition_of(
    rule: &str,
    at: &str,
    spec: &ConditionSpec,
    depth: usize,
    budget: &mut usize,
) -> Result<Condition, RuleError> {
    if depth >= MAX_DEPTH {
        return Err(fail(
            rule,
            at,
            format!("nested deeper than {MAX_DEPTH} levels"),
        ));
    }
    if *budget == 0 {
        return Err(fail(
            rule,
            at,
            format!("more than {MAX_CONDITIONS} conditions"),
        ));
    }
    *budget -= 1;
    let shape = only_one(
        rule,
        at,
        &[
            ("all", spec.all.is_some()),
            ("any", spec.any.is_some()),
            ("not", spec.not.is_some()),
            ("field", spec.field.is_some()),
        ],
        "`all`, `any`, `not` or `field`",
    )?;
    let list = |items: &[ConditionSpec], key: &str, budget: &mut usize| {
        items
            .iter()
            .enumerate()
            .map(|(i, c)| condition_of(rule, &format!("{at}.{key}[{i}]"), c, depth + 1, budget))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(match shape {
        "all" => Condition::All(list(
            spec.all.as_deref().unwrap_or_default(),
            "all",
            budget,
        )?),
        "any" => Condition::Any(list(
            spec.any.as_deref().unwrap_or_default(),
            "any",
            budget,
        )?),
        "not" => {
            let inner = spec.not.as_deref().cloned().unwrap_or_default();
            let inner = condition_of(rule, &format!("{at}.not"), &inner, depth + 1, budget)?;
            Condition::Not(Box::new(inner))
        }
        _ => field_condition(rule, at, spec)?,
    })
}

fn field_condition(rule: &str, at: &str, spec: &ConditionSpec) -> Result<Condition, RuleError> {
    let raw = spec.field.as_deref().unwrap_or_default();
    let path = path_of(rule, &format!("{at}.field"), raw)?;
    let op = only_one(
        rule,
        at,
        &[
            ("equals", spec.equals.is_some()),
            ("not_equals", spec.not_equals.is_some()),
            ("in", spec.in_list.is_some()),
            ("exists", spec.exists.is_some()),
            ("starts_with", spec.starts_with.is_some()),
            ("gt", spec.gt.is_some()),
            ("lt", spec.lt.is_some()),
            ("matches", spec.matches.is_some()),
        ],
        "the operators equals, not_equals, in, exists, starts_with, gt, lt, matches",
    )?;
    let here = format!("{at}.{op}");
    let op = match op {
        "equals" => Op::Equals(spec.equals.clone().unwrap_or(Value::Null)),
        "not_equals" => Op::NotEquals(spec.not_equals.clone().unwrap_or(Value::Null)),
        "in" => Op::In(spec.in_list.clone().unwrap_or_default()),
        "exists" => Op::Exists(spec.exists.unwrap_or(true)),
        "starts_with" => Op::StartsWith(spec.starts_with.clone().unwrap_or_default()),
        "gt" => Op::Gt(finite(rule, &here, spec.gt)?),
        "lt" => Op::Lt(finite(rule, &here, spec.lt)?),
        _ => Op::Matches(regex_of(
            rule,
            &here,
            spec.matches.as_deref().unwrap_or(""),
        )?),
    };
    if raw == "type" {
        type_values_exist(rule, &here, &op)?;
    }
    Ok(Condition::Field { path, op })
}

fn finite(rule: &str, at: &str, value: Option<f64>) -> Result<f64, RuleError> {
    match value {
        Some(n) if n.is_finite() => Ok(n),
        _ => Err(fail(rule, at, "must be a finite number")),
    }
}

/// A `type` compared with a name no Segment event has can never match.
fn type_values_exist(rule: &str, at: &str, op: &Op) -> Result<(), RuleError> {
    let values: &[Value] = match op {
        Op::Equals(v) => std::slice::from_ref(v),
        Op::In(list) => list,
        _ => return Ok(()),
    };
    for value in values {
        if !value.as_str().is_some_and(|t| TYPES.contains(&t)) {
            return Err(fail(
                rule,
                at,
                format!(
                    "can never match: {value} is not a Segment type ({})",
                    TYPES.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

fn path_of(rule: &str, at: &str, raw: &str) -> Result<Path, RuleError> {
    let segments: Vec<String> = raw.split('.').map(str::to_string).collect();
    if raw.is_empty() || segments.iter().any(String::is_empty) {
        return Err(fail(
            rule,
            at,
            format!("`{raw}` is not a dotted path like `traits.plan`"),
        ));
    }
    if segments.len() > MAX_PATH_SEGMENTS || raw.len() > 256 {
        return Err(fail(
            rule,
            at,
            format!("at most {MAX_PATH_SEGMENTS} segments and 256 characters"),
        ));
    }
    Ok(Path(segments))
}

fn regex_of(rule: &str, at: &str, pattern: &str) -> Result<regex::Regex, RuleError> {
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(fail(
            rule,
            at,
            format!("too costly: longer than {MAX_PATTERN_LEN} bytes"),
        ));
    }
    regex::RegexBuilder::new(pattern)
        .size_limit(MAX_REGEX_BYTES)
        .dfa_size_limit(MAX_REGEX_BYTES)
        .nest_limit(32)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(limit) => fail(
                rule,
                at,
                format!("too costly: the compiled expression exceeds {limit} bytes"),
            ),
            other => fail(
                rule,
                at,
                format!("not a valid regular expression (backreferences and look-around are not supported): {other}"),
            ),
        })
}

/// Whether a condition can never be true, by its shape alone.
fn never(condition: &Condition) -> bool {
    match condition {
        Condition::Any(items) => items.iter().all(never),
        Condition::All(items) => items.iter().any(never) || contradictory(items),
        Condition::Not(inner) => always(inner),
        Condition::Field {
            op: Op::In(list), ..
        } => list.is_empty(),
        Condition::Field { .. } => false,
    }
}

/// Whether a condition is true of every event, by its shape alone.
fn always(condition: &Condition) -> bool {
    match condition {
        Condition::All(items) => items.iter().all(always),
        Condition::Any(items) => items.iter().any(always),
        Condition::Not(inner) => never(inner),
        Condition::Field { .. } => false,
    }
}

/// Conditions of one `all` that exclude each other: `exists = false` beside any test that
/// needs the field, or `gt` ≥ `lt` on the same field.
fn contradictory(items: &[Condition]) -> bool {
    let fields: Vec<(&Path, &Op)> = items
        .iter()
        .filter_map(|c| match c {
            Condition::Field { path, op } => Some((path, op)),
            _ => None,
        })
        .collect();
    fields.iter().any(|(path, op)| {
        fields.iter().any(|(other, other_op)| {
            path == other
                && match (op, other_op) {
                    (Op::Exists(false), o) => o.needs_value(),
                    (Op::Gt(low), Op::Lt(high)) => low >= high,
                    _ => false,
                }
        })
    })
}

fn keys(rule: &str, at: &str, list: &[String]) -> Result<Vec<String>, RuleError> {
    if list.is_empty() || list.len() > MAX_ACTIONS {
        return Err(fail(
            rule,
            at,
            format!("needs 1 to {MAX_ACTIONS} trait names"),
        ));
    }
    if list.iter().any(String::is_empty) {
        return Err(fail(rule, at, "a trait name is empty"));
    }
    Ok(list.to_vec())
}

fn action_of(
    rule: &str,
    at: &str,
    spec: &ActionSpec,
    environments: &BTreeMap<String, impl Sized>,
) -> Result<Action, RuleError> {
    let kind = only_one(
        rule,
        at,
        &[
            ("drop", spec.drop.is_some()),
            ("keep_traits", spec.keep_traits.is_some()),
            ("remove_traits", spec.remove_traits.is_some()),
            ("keep_account_traits", spec.keep_account_traits.is_some()),
            (
                "remove_account_traits",
                spec.remove_account_traits.is_some(),
            ),
            ("rename_event", spec.rename_event.is_some()),
            ("set_trait", spec.set_trait.is_some()),
            ("remove_trait", spec.remove_trait.is_some()),
            ("route", spec.route.is_some()),
        ],
        "the actions drop, keep_traits, remove_traits, keep_account_traits, \
         remove_account_traits, rename_event, set_trait, remove_trait, route",
    )?;
    let here = format!("{at}.{kind}");
    if spec.value.is_some() && kind != "set_trait" {
        return Err(fail(
            rule,
            &format!("{at}.value"),
            "only goes with set_trait",
        ));
    }
    let text = |value: &Option<String>| value.clone().unwrap_or_default();
    let list = |value: &Option<Vec<String>>| keys(rule, &here, value.as_deref().unwrap_or(&[]));
    Ok(match kind {
        "drop" if spec.drop == Some(true) => Action::Drop,
        "drop" => return Err(fail(rule, &here, "must be true (omit the action instead)")),
        "keep_traits" => Action::KeepTraits(list(&spec.keep_traits)?),
        "remove_traits" => Action::RemoveTraits(list(&spec.remove_traits)?),
        "keep_account_traits" => Action::KeepAccountTraits(list(&spec.keep_account_traits)?),
        "remove_account_traits" => Action::RemoveAccountTraits(list(&spec.remove_account_traits)?),
        "remove_trait" => Action::RemoveTraits(keys(rule, &here, &[text(&spec.remove_trait)])?),
        "rename_event" => {
            let name = text(&spec.rename_event);
            if name.trim().is_empty() || name.chars().count() > 255 {
                return Err(fail(rule, &here, "must be 1-255 characters"));
            }
            Action::RenameEvent(name)
        }
        "set_trait" => {
            let key = keys(rule, &here, &[text(&spec.set_trait)])?.remove(0);
            match &spec.value {
                Some(Value::Null) | None => {
                    return Err(fail(
                        rule,
                        &format!("{at}.value"),
                        "set_trait needs a value (use remove_trait to remove one)",
                    ))
                }
                Some(value) => Action::SetTrait(key, value.clone()),
            }
        }
        _ => {
            let name = text(&spec.route);
            if name != super::DEFAULT_ENVIRONMENT && !environments.contains_key(&name) {
                let known: Vec<&str> = environments.keys().map(String::as_str).collect();
                return Err(fail(
                    rule,
                    &here,
                    format!(
                        "no environment `{name}` in this source's environments (known: default{}{})",
                        if known.is_empty() { "" } else { ", " },
                        known.join(", ")
                    ),
                ));
            }
            Action::Route(Arc::from(name.as_str()))
        }
    })
}
