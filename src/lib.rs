//! keybroker: an HSM-backed key broker. Applications ask it over HTTPS for data-encryption keys;
//! it generates, wraps and unwraps them inside a PKCS#11 token, so master keys never leave the
//! token. See `ARCHITECTURE.md` for the design and the module map.

pub mod api;
pub mod audit;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod hsm;
pub mod listener;
pub mod server;
pub mod store;
pub mod tls;
