//! The dedup index's building blocks shared by both spools: immutable runs of sorted
//! `(key, value)` entries with a split-block Bloom filter ([`run`]). The embedded spool keeps
//! its runs in its data directory (`spool::sqlite::dedup`); the JetStream spool keeps one
//! index per partition and persists its runs in JetStream (`spool::nats::dedup`).

pub mod run;
