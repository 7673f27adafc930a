//! refiner-gateway: a Segment-compatible gateway that durably spools events and forwards
//! them to Refiner's REST API.
//!
//! Data flow: `ingest` (HTTP) → `segment` (parse, validate, normalize; pure) →
//! `spool` (durable queue) → delivery. See `docs/architecture.md`.

pub mod activity;
pub mod api;
pub mod backup;
pub mod cli;
pub mod config;
pub mod datadir;
pub mod demo;
pub mod dispatch;
pub mod ingest;
pub mod refiner;
pub mod reload;
pub mod request_id;
pub mod segment;
pub mod sim;
pub mod spool;
pub mod startup;
pub mod telemetry;
