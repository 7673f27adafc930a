//! The simulated project's segments: the list `GET /segments` answers, and the members of
//! manual segments that `POST`/`DELETE /sync-segment` change.
//!
//! Segments are defined by the simulator's operator (`--segment`, `POST /_sim/segments`,
//! [`super::SimOptions::segments`]), as Refiner's are in its dashboard; the API only lists
//! them and changes manual segments' members. Members are contacts (by the store's contact
//! number), so a deleted contact leaves every segment.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::error::SimError;

/// A segment to define.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentSpec {
    pub name: String,
    /// Its uuid; a new random one when absent.
    #[serde(default)]
    pub uuid: Option<String>,
    /// Only manual segments take members through `/sync-segment` (default true).
    #[serde(default = "manual")]
    pub is_manual: bool,
}

fn manual() -> bool {
    true
}

impl SegmentSpec {
    /// Parses `NAME=UUID` or `NAME` (a manual segment), as `--segment` takes it.
    pub fn parse(text: &str) -> Result<SegmentSpec, String> {
        let (name, uuid) = match text.split_once('=') {
            Some((name, uuid)) => (name.trim(), Some(uuid.trim().to_string())),
            None => (text.trim(), None),
        };
        if name.is_empty() || uuid.as_deref() == Some("") {
            return Err(format!("`{text}`: expected NAME=UUID or NAME"));
        }
        Ok(SegmentSpec {
            name: name.to_string(),
            uuid,
            is_manual: true,
        })
    }
}

/// A segment as tests inspect it (`/_sim/state`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentView {
    pub uuid: String,
    pub name: String,
    pub is_manual: bool,
    /// The members' `id`s (their email when they have none), in the order they joined.
    pub members: Vec<String>,
}

#[derive(Debug, Clone)]
struct Segment {
    name: String,
    is_manual: bool,
    /// Contact numbers, with the order they joined in.
    members: BTreeMap<u64, u64>,
}

/// Every segment, by uuid.
#[derive(Debug, Default)]
pub(super) struct SegmentBook {
    segments: BTreeMap<String, Segment>,
    joined: u64,
}

impl SegmentBook {
    /// Defines (or redefines, keeping its members) a segment; returns its uuid.
    pub(super) fn define(&mut self, spec: SegmentSpec) -> String {
        let uuid = spec
            .uuid
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let segment = self.segments.entry(uuid.clone()).or_insert(Segment {
            name: String::new(),
            is_manual: true,
            members: BTreeMap::new(),
        });
        segment.name = spec.name;
        segment.is_manual = spec.is_manual;
        uuid
    }

    /// Checks that `uuid` is a manual segment, before any contact is created for the call.
    pub(super) fn check_manual(&self, uuid: &str) -> Result<(), SimError> {
        match self.segments.get(uuid) {
            None => Err(SimError::NotFound("segment not found")),
            Some(segment) if !segment.is_manual => {
                Err(SimError::bad_request("the segment is not a manual segment"))
            }
            Some(_) => Ok(()),
        }
    }

    /// Adds or removes a contact (a no-op when it already is, or is not, a member).
    pub(super) fn set_member(&mut self, uuid: &str, contact: u64, member: bool) {
        let Some(segment) = self.segments.get_mut(uuid) else {
            return;
        };
        if member {
            if let std::collections::btree_map::Entry::Vacant(entry) =
                segment.members.entry(contact)
            {
                self.joined += 1;
                entry.insert(self.joined);
            }
        } else {
            segment.members.remove(&contact);
        }
    }

    /// A deleted contact leaves every segment.
    pub(super) fn forget(&mut self, contact: u64) {
        for segment in self.segments.values_mut() {
            segment.members.remove(&contact);
        }
    }

    /// One page of `GET /segments`, ordered by name, shaped like Refiner's list answers.
    pub(super) fn page(&self, page: u64, page_length: u64) -> serde_json::Value {
        let mut all: Vec<(&String, &Segment)> = self.segments.iter().collect();
        all.sort_by(|a, b| a.1.name.cmp(&b.1.name).then(a.0.cmp(b.0)));
        let length = page_length.clamp(1, 1000);
        let last_page = (all.len() as u64).div_ceil(length).max(1);
        let items: Vec<serde_json::Value> = all
            .iter()
            .skip(((page.max(1) - 1) * length) as usize)
            .take(length as usize)
            .map(|(uuid, s)| {
                serde_json::json!({"uuid": uuid, "name": s.name, "is_manual": s.is_manual})
            })
            .collect();
        serde_json::json!({
            "items": items,
            "pagination": {
                "items_count": all.len(),
                "current_page": page.max(1),
                "last_page": last_page,
                "page_length": length.to_string(),
            }
        })
    }

    /// Every segment, with its members named by `name_of`.
    pub(super) fn views(&self, name_of: impl Fn(u64) -> Option<String>) -> Vec<SegmentView> {
        self.segments
            .iter()
            .map(|(uuid, segment)| {
                let mut members: Vec<(u64, u64)> =
                    segment.members.iter().map(|(c, j)| (*j, *c)).collect();
                members.sort_unstable();
                SegmentView {
                    uuid: uuid.clone(),
                    name: segment.name.clone(),
                    is_manual: segment.is_manual,
                    members: members
                        .into_iter()
                        .filter_map(|(_, c)| name_of(c))
                        .collect(),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_segment_flags() {
        let spec = SegmentSpec::parse("Power Users=seg-1").expect("spec");
        assert_eq!(spec.name, "Power Users");
        assert_eq!(spec.uuid.as_deref(), Some("seg-1"));
        assert!(SegmentSpec::parse("vip").expect("spec").uuid.is_none());
        assert!(SegmentSpec::parse("=x").is_err());
        assert!(SegmentSpec::parse("x=").is_err());
    }

    #[test]
    fn members_join_leave_and_are_listed_in_joining_order() {
        let mut book = SegmentBook::default();
        let uuid = book.define(SegmentSpec::parse("vip=s1").expect("spec"));
        book.set_member(&uuid, 2, true);
        book.set_member(&uuid, 1, true);
        book.set_member(&uuid, 2, true);
        let names = |c: u64| Some(format!("c{c}"));
        assert_eq!(book.views(names)[0].members, vec!["c2", "c1"]);
        book.set_member(&uuid, 2, false);
        book.forget(1);
        assert!(book.views(names)[0].members.is_empty());
    }

    #[test]
    fn only_manual_segments_take_members() {
        let mut book = SegmentBook::default();
        let auto = book.define(SegmentSpec {
            name: "auto".into(),
            uuid: Some("a".into()),
            is_manual: false,
        });
        assert_eq!(
            book.check_manual(&auto),
            Err(SimError::bad_request("the segment is not a manual segment"))
        );
        assert_eq!(
            book.check_manual("nope"),
            Err(SimError::NotFound("segment not found"))
        );
    }

    #[test]
    fn pages_are_ordered_by_name() {
        let mut book = SegmentBook::default();
        for name in ["b", "a", "c"] {
            book.define(SegmentSpec::parse(name).expect("spec"));
        }
        let page = book.page(2, 2);
        assert_eq!(page["items"][0]["name"], "c");
        assert_eq!(page["pagination"]["last_page"], 2);
        assert_eq!(book.page(1, 2)["items"][0]["name"], "a");
    }
}
