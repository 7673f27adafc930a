//! Integration tests: the gateway served on 127.0.0.1 with a free port and a temporary data
//! directory, driven over real HTTP.

mod helpers;
mod ingest;
mod webhook;
mod crash;
mod properties;
mod python_client;
mod spool;
mod delivery;
