//! Segment Engage (Personas): audience membership and computed traits, in what Refiner keeps.
//!
//! Engage tells a destination about an audience, a journey step or a computed trait through
//! ordinary calls marked by `context.personas` (`computation_class`, `computation_key`, …):
//! - identify `traits: {<key>: true|false}` (user audiences, journey steps, computed traits);
//! - track `Audience Entered` / `Audience Exited`, `properties: {audience_key, <key>: bool}`;
//! - track `Trait Computed`, `properties: {trait_key, <key>: value}`;
//! - group `traits: {<key>: true|false}` (account audiences).
//!
//! Refiner drops track properties, so a track-shaped one becomes an identify-user call
//! setting the attribute `<key>` instead: the contact then holds what the identify-shaped
//! one gives it. A user audience or journey step also yields a [`Membership`], which the
//! dispatcher turns into manual-segment membership (`/sync-segment`) where configured.
//! Account audiences stay on the account (group traits): a manual segment holds contacts.
//!
//! Pure: no IO. Nothing here fails: an event that does not match a shape exactly is left
//! to the default mapping.

use serde_json::{Map, Value};

/// A user entering (`member`) or leaving an Engage audience or journey step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    /// The audience's key (Segment's `audience_key` / `computation_key`), as sent.
    pub audience: String,
    pub member: bool,
}

/// What a track-shaped Engage event says.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum EngageTrack {
    /// `Audience Entered` / `Audience Exited`: the attribute `<audience>: member`.
    Membership(Membership),
    /// `Trait Computed`: the attribute `<key>: value`.
    Computed { key: String, value: Value },
}

/// Event names Engage sends to track destinations.
const AUDIENCE_ENTERED: &str = "Audience Entered";
const AUDIENCE_EXITED: &str = "Audience Exited";
const TRAIT_COMPUTED: &str = "Trait Computed";

/// `context.personas`, when it is an object.
fn personas(event: &Map<String, Value>) -> Option<&Map<String, Value>> {
    event.get("context")?.get("personas")?.as_object()
}

/// A non-empty string member of an object.
fn text<'a>(object: Option<&'a Map<String, Value>>, key: &str) -> Option<&'a str> {
    object?
        .get(key)?
        .as_str()
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Whether `context.personas.computation_class` names a membership: an audience or a
/// journey step. Computed traits (`trait`) are plain attributes.
fn is_membership_class(personas: Option<&Map<String, Value>>) -> bool {
    matches!(
        text(personas, "computation_class"),
        Some("audience" | "journey_step")
    )
}

/// The membership an identify-shaped Engage event states: `context.personas` names an
/// audience or journey step (`computation_key`) and `traits` holds that key as a boolean.
/// Anything else (a computed trait, a key missing from the traits, a non-boolean value) is
/// no membership; the traits are still sent as attributes by the default mapping.
pub fn identify_membership(
    event: &Map<String, Value>,
    traits: &Map<String, Value>,
) -> Option<Membership> {
    let personas = personas(event);
    if !is_membership_class(personas) {
        return None;
    }
    let audience = text(personas, "computation_key")?;
    let member = traits.get(audience)?.as_bool()?;
    Some(Membership {
        audience: audience.to_string(),
        member,
    })
}

/// What a track-shaped Engage event says, or `None` for any other track.
///
/// - `Audience Entered` / `Audience Exited`: the key is `properties.audience_key`, else
///   `context.personas.computation_key`; membership is `properties[<key>]` when it is a
///   boolean, else what the event name says (entered: true, exited: false).
/// - `Trait Computed`: the key is `properties.trait_key`, else
///   `context.personas.computation_key`; the value is `properties[<key>]` (absent: no value,
///   so the event is left to the default mapping).
pub(super) fn track(event: &Map<String, Value>, name: &str) -> Option<EngageTrack> {
    let properties = event.get("properties").and_then(Value::as_object);
    let personas = personas(event);
    match name {
        AUDIENCE_ENTERED | AUDIENCE_EXITED => {
            let audience =
                text(properties, "audience_key").or_else(|| text(personas, "computation_key"))?;
            let member = properties
                .and_then(|p| p.get(audience))
                .and_then(Value::as_bool)
                .unwrap_or(name == AUDIENCE_ENTERED);
            Some(EngageTrack::Membership(Membership {
                audience: audience.to_string(),
                member,
            }))
        }
        TRAIT_COMPUTED => {
            let key =
                text(properties, "trait_key").or_else(|| text(personas, "computation_key"))?;
            let value = properties?.get(key)?.clone();
            Some(EngageTrack::Computed {
                key: key.to_string(),
                value,
            })
        }
        _ => None,
    }
}

/// Whether a Refiner segment named `name` is the one for `audience`: the same words once
/// both are lowercased and spaces and hyphens become underscores, so the segment
/// `High Value Users` (or `high-value-users`) is the audience `high_value_users`.
pub fn segment_name_matches(name: &str, audience: &str) -> bool {
    fn normal(text: &str) -> String {
        text.trim()
            .chars()
            .map(|c| match c {
                ' ' | '-' => '_',
                c => c.to_ascii_lowercase(),
            })
            .collect()
    }
    !audience.trim().is_empty() && normal(name) == normal(audience)
}

#[cfg(test)]
mod tests;
