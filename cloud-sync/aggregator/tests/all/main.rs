//! The aggregator's integration tests, one binary (one link of the crate):
//! `sessions` (nodes over QUIC and TCP: acks, replays, takeover,
//! certificates, malformed batches, a damaged store), `store_contract` (the
//! `Store` contract against SQLite and PostgreSQL, I-3, I-33, I-36),
//! `http_api` (tokens, queries, status, TLS), `fleet_page` (the page in
//! headless Chromium), `status_cli` (`fogline-cloud status`), `fleet` (200 simulated
//! gateways, every reading stored once).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fleet;
mod fleet_page;
mod http_api;
mod sessions;
mod status_cli;
mod store_contract;
