//! Refiner, the destination: what the gateway sends to Refiner's REST API.
//!
//! - [`mapping`] turns one normalized Segment event into at most one [`mapping::RefinerCall`]
//!   and merges a batch's calls per user ([`mapping::coalesce`]). It is pure: no IO, no clock,
//!   no panics on any input, so every mapping rule is unit- and property-tested.
//! - A call renders itself as the HTTP method, path (relative to the configured base URL,
//!   e.g. `https://api.refiner.io/v1`) and JSON body that Refiner expects
//!   ([`mapping::RefinerCall::to_request`]); sending it is the HTTP client's job.
//!
//! This module never touches the spool: the dispatcher leases events, maps them here, sends
//! the calls and acks. The user-facing reference of the mapping is `docs/mapping.md`.

pub mod client;
pub mod filters;
pub mod mapping;
