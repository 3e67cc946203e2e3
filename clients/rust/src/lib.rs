//! Client library of keybroker: data keys, wrap/unwrap/rewrap (single and batch) over HTTPS,
//! and envelope encryption done locally with AES-256-GCM under broker-wrapped data keys, in the
//! format of `clients/ENVELOPE.md` that the Python library reads and writes too.
//!
//! ```no_run
//! # async fn example() -> Result<(), keybroker_client::Error> {
//! use std::collections::BTreeMap;
//! use keybroker_client::{Client, DataKeyCache};
//!
//! let client = Client::builder("https://127.0.0.1:8443", "client-id", "client-secret")
//!     .ca_file(".local/tls/ca.pem")
//!     .cache(DataKeyCache::new().max_messages(1000))
//!     .build()?;
//! let context = BTreeMap::from([("tenant".to_owned(), "acme".to_owned())]);
//! let envelope = client.encrypt(b"card 4111", &context).await?;
//! let plaintext = client.decrypt(&envelope, &context).await?;
//! assert_eq!(&plaintext[..], b"card 4111");
//! # Ok(()) }
//! ```

mod cache;
mod client;
mod envelope;
mod error;
mod retry;

#[cfg(test)]
mod mock_tests;

pub use cache::DataKeyCache;
pub use client::{Client, ClientBuilder, ClientStats, Context, DataKey, Wrapped};
#[doc(hidden)]
pub use envelope::{open_with, seal_with};
pub use error::{Error, ErrorCode};
pub use retry::{Backoff, parse_retry_after};
