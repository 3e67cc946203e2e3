//! The integration suite: one binary (each `tests/*.rs` would link separately and slowly).
//! Everything runs against the real SoftHSM2 token and the real Postgres that
//! `scripts/test.sh` sets up, over real HTTPS.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

mod audit;
mod auth_cache;
mod bad_input;
mod child;
mod child_process;
mod console;
mod contract;
mod crypto_api;
mod custody;
mod database_outage;
mod examples;
mod faults;
mod faults_under_load;
mod hardening;
mod limits;
mod listener;
mod managed;
mod metrics;
mod oauth;
mod openapi;
mod operability;
mod random;
mod request_log;
mod request_path;
mod rotation;
mod states;
mod test_databases;
mod token;
mod vendor;
