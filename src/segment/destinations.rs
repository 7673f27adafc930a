//! Destination selection: Segment's `integrations` object.
//!
//! A Segment event may say which destinations receive it: `{"All": false, "Refiner": true}`.
//! The rule, as Segment documents it: `All` is true unless set to `false`; a destination
//! named in the object overrides `All`. A batch's `integrations` is merged into each event's
//! (the event's own keys win, per key) before the rule is applied, so it covers every event
//! that does not say otherwise.
//!
//! The gateway goes by several names (what the user calls it in `integrations`): Refiner,
//! whose delivery it replaces, and Segment's Webhooks destinations, through which it may be
//! reached. [`Destinations`] is the list of those names of one source; the decision:
//!
//! 1. one of the names is enabled (`true`, or an object of options) → selected;
//! 2. else one of the names is `false` → skipped as [`Skip::DestinationDisabled`];
//! 3. else `All` is `false` → skipped as [`Skip::AllDisabled`];
//! 4. else selected.
//!
//! Other values (`null`, strings, numbers, arrays) count as absent. Names are compared
//! exactly (Segment's flags are case sensitive). Pure: no IO; the same rule serves the
//! streaming normalizer (raw member text) and anything holding a `serde_json::Value`.

use serde_json::Value;

use super::Skip;

/// The names that mean "this gateway" by default.
pub const DEFAULT_DESTINATION_NAMES: [&str; 3] = ["Refiner", "Webhooks", "Webhooks (Actions)"];

/// What an `integrations` member says about one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// `true`, or an object (destination options, which Segment reads as enabled).
    On,
    /// `false`.
    Off,
}

impl Flag {
    /// The flag a member's value gives; `None` for values that say nothing.
    pub fn of_value(value: &Value) -> Option<Flag> {
        match value {
            Value::Bool(true) | Value::Object(_) => Some(Flag::On),
            Value::Bool(false) => Some(Flag::Off),
            _ => None,
        }
    }

    /// As [`Flag::of_value`], from a member's raw JSON text (valid JSON, no leading
    /// whitespace, as the scanner hands out).
    pub(super) fn of_raw(raw: &str) -> Option<Flag> {
        match raw.as_bytes().first() {
            Some(b't') => Some(Flag::On),
            Some(b'f') => Some(Flag::Off),
            Some(b'{') => Some(Flag::On),
            _ => None,
        }
    }
}

/// The names in `integrations` that select this gateway, for one source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destinations {
    names: Vec<String>,
}

impl Default for Destinations {
    fn default() -> Self {
        Destinations::new(
            DEFAULT_DESTINATION_NAMES
                .iter()
                .map(|name| name.to_string()),
        )
    }
}

impl Destinations {
    /// The gateway known by `names`.
    pub fn new(names: impl IntoIterator<Item = String>) -> Destinations {
        Destinations {
            names: names.into_iter().collect(),
        }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Applies the rule (see the module header) to an `integrations` object whose members
    /// `flag` looks up by key.
    pub fn decide(&self, mut flag: impl FnMut(&str) -> Option<Flag>) -> Result<(), Skip> {
        let mut disabled = false;
        for name in &self.names {
            match flag(name) {
                Some(Flag::On) => return Ok(()),
                Some(Flag::Off) => disabled = true,
                None => {}
            }
        }
        if disabled {
            return Err(Skip::DestinationDisabled);
        }
        match flag("All") {
            Some(Flag::Off) => Err(Skip::AllDisabled),
            _ => Ok(()),
        }
    }

    /// The rule applied to an event's (merged) `integrations` value; anything but an object
    /// selects nothing away.
    pub fn select(&self, integrations: Option<&Value>) -> Result<(), Skip> {
        match integrations {
            Some(Value::Object(map)) => self.decide(|key| map.get(key).and_then(Flag::of_value)),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn select(integrations: Value) -> Result<(), Skip> {
        Destinations::default().select(Some(&integrations))
    }

    #[test]
    fn all_defaults_to_true_and_a_named_destination_overrides_it() {
        assert_eq!(select(json!({})), Ok(()));
        assert_eq!(select(json!({"All": true})), Ok(()));
        assert_eq!(select(json!({"All": false})), Err(Skip::AllDisabled));
        assert_eq!(select(json!({"All": false, "Refiner": true})), Ok(()));
        assert_eq!(
            select(json!({"All": false, "Refiner": {"x": 1}})),
            Ok(()),
            "options count as enabled"
        );
        assert_eq!(
            select(json!({"Refiner": false})),
            Err(Skip::DestinationDisabled)
        );
        assert_eq!(
            select(json!({"All": true, "Refiner": false})),
            Err(Skip::DestinationDisabled)
        );
        assert_eq!(select(json!({"Mixpanel": false})), Ok(()));
        assert_eq!(
            select(json!({"All": false, "Mixpanel": true})),
            Err(Skip::AllDisabled)
        );
    }

    #[test]
    fn any_of_the_names_enables_and_names_are_case_sensitive() {
        assert_eq!(select(json!({"All": false, "Webhooks": true})), Ok(()));
        assert_eq!(
            select(json!({"All": false, "Webhooks (Actions)": true})),
            Ok(())
        );
        assert_eq!(select(json!({"Refiner": false, "Webhooks": true})), Ok(()));
        assert_eq!(
            select(json!({"All": false, "refiner": true})),
            Err(Skip::AllDisabled)
        );
        let only_refiner = Destinations::new(["Refiner".to_string()]);
        assert_eq!(
            only_refiner.select(Some(&json!({"All": false, "Webhooks": true}))),
            Err(Skip::AllDisabled)
        );
    }

    #[test]
    fn values_that_are_not_flags_say_nothing() {
        for value in [json!(null), json!("false"), json!(0), json!([false])] {
            assert_eq!(select(json!({"All": value.clone()})), Ok(()));
            assert_eq!(
                select(json!({"All": false, "Refiner": value})),
                Err(Skip::AllDisabled)
            );
        }
        assert_eq!(Destinations::default().select(Some(&json!([1]))), Ok(()));
        assert_eq!(Destinations::default().select(None), Ok(()));
    }

    #[test]
    fn raw_flags_read_like_values() {
        for raw in [
            "true",
            "false",
            "{}",
            "{\"a\":1}",
            "null",
            "1",
            "\"x\"",
            "[]",
        ] {
            let value: Value = serde_json::from_str(raw).expect("JSON");
            assert_eq!(Flag::of_raw(raw), Flag::of_value(&value), "{raw}");
        }
    }
}
