//! Integration tests: the gateway served on 127.0.0.1 with a free port and a temporary data
//! directory, driven over real HTTP.

mod backup;
#[path = "../support/common.rs"]
mod common;
mod console;
mod console_api;
mod crash;
mod delivery;
#[path = "../support/deps.rs"]
mod deps;
mod engage;
mod filters;
mod helpers;
mod hostile;
mod ingest;
mod management;
mod observability;
mod openapi;
mod operator_safety;
mod properties;
mod python_client;
mod sdk_clients;
mod spool;
mod webhook;
